"""make bench: the agent against the Docker engine it drives, on loopback.

Starts a stand-in controller and the agent (RPC mode, a subprocess), then measures in one run,
against the same engine and the same local image: start latency (vs. a direct docker-py
create-and-start), exit-to-report latency, a burst of starts (vs. direct parallel starts), message
ack latency under 50 concurrent senders, the agent's footprint idle and with 100 running tasks, and
recovery of 100 running tasks after a SIGKILL. Prints a table and writes bench/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import docker
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import new_instance_id, start_message, stop_message  # noqa: E402
from tests.controller import StandInController  # noqa: E402
from tests.helpers import (  # noqa: E402
    CONTROLLER_SECRET,
    TEST_IMAGE,
    AgentProcess,
    free_port,
    http_json,
    write_config,
)

MULTIPLIER = 50  # 2 physical cores -> 100 virtual cores: room for 100 pinned tasks
TASK_MB = 16


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 4),
        "p99": round(pct(values, 99), 4),
        "max": round(max(values), 4),
    }


class DieWatcher:
    """Docker `die` events with their engine timestamps, by container name."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.died: dict[str, float] = {}
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._stream = self.client.api.events(
            decode=True, filters={"type": "container", "event": "die"}
        )
        for event in self._stream:
            name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
            self.died[name] = event["timeNano"] / 1e9

    def start(self) -> DieWatcher:
        self._thread.start()
        time.sleep(0.3)
        return self

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.close()


class Bench:
    def __init__(self, root: Path, runs: int, burst: int, running: int) -> None:
        self.root = root
        self.runs = runs
        self.burst = burst
        self.running = running
        self.docker = docker.DockerClient(
            base_url="unix:///var/run/docker.sock", version="auto", max_pool_size=128
        )
        self.ctl = StandInController().start()
        port = free_port()
        cfg = write_config(
            root / "agent.yaml",
            port,
            controllers={"endpoints": [self.ctl.url], "leadershipCheckInterval": "10 seconds"},
            resources={
                "overProvisioning": {
                    "enabled": True,
                    "cpuMultiplier": MULTIPLIER,
                    "memoryMultiplier": 1,
                }
            },
        )
        self.agent = AgentProcess(cfg, root / "agent.log", port)
        self.results: dict[str, Any] = {}

    # --- helpers ---------------------------------------------------------------------------

    def free_vcores(self) -> list[int]:
        node = http_json(f"{self.agent.url}/apis/v1/status")[1]
        return sorted(node["state"]["cpus"]["freeCores"]["0"])

    def received(self, iid: str, state: str) -> float | None:
        for m in self.ctl.reports(iid):
            if m["instanceInfo"]["state"] == state:
                return float(m["received"])
        return None

    def wait_states(self, ids: list[str], state: str, timeout: float = 120) -> None:
        self.ctl.wait_for(
            lambda: all(self.received(i, state) is not None for i in ids),
            timeout,
            f"{len(ids)} tasks {state}",
        )

    def direct_start(self, cpuset: str, command: list[str]) -> tuple[str, float]:
        """The same create-and-start the agent does, straight through docker-py."""
        started = time.time()
        host = self.docker.api.create_host_config(
            cpuset_cpus=cpuset,
            cpuset_mems="0",
            mem_limit=TASK_MB << 20,
            memswap_limit=TASK_MB << 20,
            ulimits=[docker.types.Ulimit(name="nofile", soft=4096, hard=4096)],
        )
        created = self.docker.api.create_container(
            TEST_IMAGE, command=command, host_config=host, labels={"bench": "direct"}
        )
        self.docker.api.start(created["Id"])
        return created["Id"], time.time() - started

    def stop_all(self, ids: list[str]) -> None:
        for iid in ids:
            http_json(f"{self.agent.url}/apis/v1/messages", body=stop_message(iid))
        self.wait_states(ids, "STOPPED", 300)

    def process(self) -> psutil.Process:
        assert self.agent.proc is not None
        return psutil.Process(self.agent.proc.pid)

    def footprint(self, seconds: float) -> dict[str, float]:
        proc = self.process()
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        cpu = max(0.0, (after.user + after.system - before.user - before.system) / seconds)
        return {
            "rss_mib": round(proc.memory_info().rss / 2**20, 1),
            "cpu_percent_of_core": round(cpu * 100, 2),
        }

    # --- measurements ----------------------------------------------------------------------

    def start_and_exit_latency(self) -> None:
        watcher = DieWatcher(self.docker).start()
        agent_times: list[float] = []
        direct_times: list[float] = []
        exit_times: list[float] = []
        vcore = self.free_vcores()[0]
        for _ in range(self.runs):
            iid = new_instance_id()
            msg = start_message(
                iid, ["sh", "-c", "sleep 0.3"], cores={"0": [vcore]}, memory={"0": TASK_MB}
            )
            sent = time.time()
            http_json(f"{self.agent.url}/apis/v1/messages", body=msg)
            self.wait_states([iid], "RUNNING")
            agent_times.append(self.received(iid, "RUNNING") - sent)  # type: ignore[operator]
            self.wait_states([iid], "STOPPED")
            completed = self.received(iid, "RUN_COMPLETED")
            died = watcher.died.get(iid)
            if completed is not None and died is not None:
                exit_times.append(completed - died)
            cid, took = self.direct_start("1", ["sh", "-c", "sleep 0.3"])
            direct_times.append(took)
            self.docker.api.wait(cid)
            self.docker.api.remove_container(cid, force=True)
        watcher.stop()
        ratio = statistics.median(agent_times) / statistics.median(direct_times)
        self.results["start_latency"] = {
            "agent_s": summary(agent_times),
            "direct_s": summary(direct_times),
            "ratio_of_medians": round(ratio, 3),
            "target": "ratio <= 1.15",
            "met": ratio <= 1.15,
        }
        p99 = pct(exit_times, 99)
        self.results["exit_to_report"] = {
            "seconds": summary(exit_times),
            "target": "p99 <= 0.100 s",
            "met": p99 <= 0.100,
        }

    def burst_and_acks(self) -> list[str]:
        vcores = self.free_vcores()[: self.burst]
        ids = [new_instance_id() for _ in vcores]
        messages = [
            start_message(iid, ["sleep", "3600"], cores={"0": [v]}, memory={"0": TASK_MB})
            for iid, v in zip(ids, vcores, strict=True)
        ]
        replies: list[float] = []

        async def send_all() -> None:
            async with aiohttp.ClientSession(
                headers={"Cluster-Authorization": CONTROLLER_SECRET},
                connector=aiohttp.TCPConnector(limit=0),
            ) as session:

                async def one(msg: dict[str, Any]) -> None:
                    t = time.perf_counter()
                    async with session.post(f"{self.agent.url}/apis/v1/messages", json=msg) as resp:
                        body = await resp.json()
                        assert body["status"] == "ACCEPTED", body
                    replies.append(time.perf_counter() - t)

                await asyncio.gather(*(one(m) for m in messages))

        started = time.time()
        asyncio.run(send_all())
        self.wait_states(ids, "RUNNING", 300)
        agent_burst = max(self.received(i, "RUNNING") for i in ids) - started  # type: ignore[type-var,operator]

        direct_ids: list[str] = []
        with ThreadPoolExecutor(max_workers=len(vcores)) as pool:
            t0 = time.time()
            for cid, _ in pool.map(
                lambda _: self.direct_start("0", ["sleep", "3600"]), range(len(vcores))
            ):
                direct_ids.append(cid)
            direct_burst = time.time() - t0
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda c: self.docker.api.remove_container(c, force=True), direct_ids))
        ratio = agent_burst / direct_burst
        self.results["burst"] = {
            "tasks": len(ids),
            "agent_s": round(agent_burst, 3),
            "direct_s": round(direct_burst, 3),
            "ratio": round(ratio, 3),
            "slowest_reply_s": round(max(replies), 4),
            "target": "ratio <= 1.3 and every reply within 1 s",
            "met": ratio <= 1.3 and max(replies) < 1.0,
        }
        self.ack_latency(messages)
        return ids

    def ack_latency(
        self, messages: list[dict[str, Any]], senders: int = 50, per_sender: int = 40
    ) -> None:
        """50 concurrent senders (in a separate process) re-sending START_TASKs of running tasks
        (full parse, idempotent answer) and STOP_TASKs of unknown tasks."""
        mixed: list[dict[str, Any]] = []
        for n, msg in enumerate(messages):
            mixed.append(msg)
            mixed.append(stop_message(f"TI-none-{n}"))
        spec = {
            "url": f"{self.agent.url}/apis/v1/messages",
            "secret": CONTROLLER_SECRET,
            "messages": mixed,
            "senders": senders,
            "per_sender": per_sender,
        }
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench/ackload.py")],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        latencies: list[float] = json.loads(out)
        p99 = pct(latencies, 99)
        self.results["message_ack"] = {
            "senders": senders,
            "seconds": summary(latencies),
            "target": "p99 <= 0.020 s",
            "met": p99 <= 0.020,
        }

    def fill_to(self, running: list[str], total: int) -> list[str]:
        vcores = self.free_vcores()[: total - len(running)]
        more = [new_instance_id() for _ in vcores]
        for iid, v in zip(more, vcores, strict=True):
            msg = start_message(iid, ["sleep", "3600"], cores={"0": [v]}, memory={"0": TASK_MB})
            http_json(f"{self.agent.url}/apis/v1/messages", body=msg)
        ids = running + more
        self.wait_states(ids, "RUNNING", 300)
        return ids

    def recovery(self, ids: list[str]) -> None:
        before = {i: len(self.ctl.reports(i)) for i in ids}
        self.agent.kill()
        started = time.time()
        self.agent.start(wait=False)

        def all_back() -> bool:
            return all(
                any(
                    m["instanceInfo"]["state"] == "RUNNING"
                    for m in self.ctl.reports(i)[before[i] :]
                )
                for i in ids
            )

        self.ctl.wait_for(all_back, 120, "every task re-attached")
        took = (
            max(
                next(
                    float(m["received"])
                    for m in self.ctl.reports(i)[before[i] :]
                    if m["instanceInfo"]["state"] == "RUNNING"
                )
                for i in ids
            )
            - started
        )
        self.results["recovery"] = {
            "tasks": len(ids),
            "seconds": round(took, 3),
            "target": "<= 5 s",
            "met": took <= 5.0,
        }

    def run_quick(self) -> dict[str, Any]:
        """Start latency, exit latency, burst and acks only (for profiling)."""
        self.agent.start()
        self.agent.wait_state("ACTIVE")
        self.start_and_exit_latency()
        ids = self.burst_and_acks()
        self.stop_all(ids)
        return self.results

    def run(self) -> dict[str, Any]:
        self.agent.start()
        self.agent.wait_state("ACTIVE")
        time.sleep(2)
        self.results["footprint_idle"] = {
            **self.footprint(20),
            "target": "RSS <= 60 MiB, CPU < 1 % of a core",
        }
        idle = self.results["footprint_idle"]
        idle["met"] = idle["rss_mib"] <= 60 and idle["cpu_percent_of_core"] < 1
        self.start_and_exit_latency()
        ids = self.burst_and_acks()
        ids = self.fill_to(ids, self.running)
        time.sleep(5)
        loaded = {**self.footprint(20), "tasks": len(ids), "target": "RSS <= 100 MiB"}
        loaded["met"] = loaded["rss_mib"] <= 100
        self.results["footprint_loaded"] = loaded
        self.recovery(ids)
        self.stop_all(ids)
        return self.results

    def close(self) -> None:
        self.agent.stop()
        self.agent.kill()
        self.ctl.stop()
        for c in self.docker.containers.list(all=True, filters={"label": "bench"}):
            c.remove(force=True)
        self.docker.close()


def machine() -> dict[str, Any]:
    client = docker.from_env()
    try:
        version = client.version()["Version"]
    finally:
        client.close()
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": version,
        "date": time.strftime("%Y-%m-%d"),
    }


def table(results: dict[str, Any]) -> str:
    rows = [("measure", "value", "target", "met")]
    s = results["start_latency"]
    rows.append(
        (
            "start latency p50/p99 (agent)",
            f"{s['agent_s']['p50'] * 1000:.0f} / {s['agent_s']['p99'] * 1000:.0f} ms",
            "",
            "",
        )
    )
    rows.append(
        (
            "start latency p50/p99 (direct)",
            f"{s['direct_s']['p50'] * 1000:.0f} / {s['direct_s']['p99'] * 1000:.0f} ms",
            "",
            "",
        )
    )
    rows.append(
        ("start latency ratio of medians", f"{s['ratio_of_medians']:.3f}", "<= 1.15", str(s["met"]))
    )
    e = results["exit_to_report"]
    rows.append(
        (
            "exit -> report p50/p99",
            f"{e['seconds']['p50'] * 1000:.1f} / {e['seconds']['p99'] * 1000:.1f} ms",
            "p99 <= 100 ms",
            str(e["met"]),
        )
    )
    b = results["burst"]
    rows.append(
        (
            f"burst of {b['tasks']}: agent / direct",
            f"{b['agent_s']:.2f} / {b['direct_s']:.2f} s (x{b['ratio']:.2f})",
            "<= 1.3",
            str(b["met"]),
        )
    )
    rows.append(
        (
            "burst: slowest reply",
            f"{b['slowest_reply_s'] * 1000:.0f} ms",
            "< 1 s",
            str(b["slowest_reply_s"] < 1),
        )
    )
    a = results["message_ack"]
    rows.append(
        (
            f"message ack, {a['senders']} senders p50/p99",
            f"{a['seconds']['p50'] * 1000:.1f} / {a['seconds']['p99'] * 1000:.1f} ms",
            "p99 <= 20 ms",
            str(a["met"]),
        )
    )
    i = results["footprint_idle"]
    rows.append(
        (
            "idle RSS / CPU",
            f"{i['rss_mib']} MiB / {i['cpu_percent_of_core']} %",
            "<= 60 MiB / < 1 %",
            str(i["met"]),
        )
    )
    f = results["footprint_loaded"]
    rows.append(
        (
            f"RSS / CPU with {f['tasks']} tasks",
            f"{f['rss_mib']} MiB / {f['cpu_percent_of_core']} %",
            "<= 100 MiB",
            str(f["met"]),
        )
    )
    r = results["recovery"]
    rows.append(
        (f"recovery of {r['tasks']} tasks", f"{r['seconds']:.2f} s", "<= 5 s", str(r["met"]))
    )
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "bench/results.json"))
    parser.add_argument("--quick", action="store_true", help="latencies, burst and acks only")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="drove-bench-") as tmp:
        bench = Bench(Path(tmp), args.runs, args.burst, args.running)
        try:
            results = bench.run_quick() if args.quick else bench.run()
        finally:
            bench.close()
    if args.quick:
        print(json.dumps(results, indent=2))
        return 0
    results = {"machine": machine(), **results}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
