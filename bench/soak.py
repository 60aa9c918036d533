"""make soak: about 500 random starts, stops and exits (some OOM, some non-zero) at a concurrency
of 20, against the real engine, with the agent reporting to a stand-in controller. At the end every
task must have a STOPPED report with the right outcome, no container of ours may be left, and the
agent's free cores and memory must equal its layout. Prints a one-line verdict; exit 1 on failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import new_instance_id, start_message, stop_message  # noqa: E402
from tests.controller import StandInController  # noqa: E402
from tests.helpers import AgentProcess, free_port, http_json, write_config  # noqa: E402

MULTIPLIER = 20
KINDS = ["exit0", "nonzero", "oom", "stopped", "stop_early"]
WEIGHTS = [30, 25, 15, 20, 10]


def expected_ok(kind: str, code: int, info: dict[str, Any]) -> bool:
    result = info.get("taskResult")
    error = info.get("errorMessage", "")
    if kind == "exit0":
        return result == {"status": "SUCCESSFUL", "exitCode": 0}
    if kind == "nonzero":
        return result == {"status": "FAILED", "exitCode": code} and error == (
            f"Task instance exited with status: {code}"
        )
    if kind == "oom":
        return result == {"status": "FAILED", "exitCode": 137} and error.startswith("OOM killed")
    if kind == "stopped":
        return result == {"status": "CANCELLED", "exitCode": -1}
    return result in (None, {"status": "CANCELLED", "exitCode": -1})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ctl = StandInController().start()
    client = docker.from_env()
    failures: list[str] = []
    kinds: Counter[str] = Counter()
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="drove-soak-") as tmp:
        port = free_port()
        cfg = write_config(
            Path(tmp) / "agent.yaml",
            port,
            controllers={"endpoints": [ctl.url], "leadershipCheckInterval": "10 seconds"},
            resources={"overProvisioning": {"enabled": True, "cpuMultiplier": MULTIPLIER}},
        )
        agent = AgentProcess(cfg, Path(tmp) / "agent.log", port).start()
        started = time.monotonic()
        try:
            agent.wait_state("ACTIVE")
            node = http_json(f"{agent.url}/apis/v1/status")[1]
            vcores = sorted(node["state"]["cpus"]["freeCores"]["0"])[: args.concurrency]
            plan = [
                (rng.choices(KINDS, WEIGHTS)[0], rng.randint(1, 125), rng.uniform(0, 1.5))
                for _ in range(args.tasks)
            ]
            todo = iter(plan)

            def worker(vcore: int) -> None:
                while True:
                    with lock:
                        item = next(todo, None)
                    if item is None:
                        return
                    kind, code, delay = item
                    iid = new_instance_id()
                    memory = 16
                    script = {
                        "exit0": f"sleep {delay:.2f}",
                        "nonzero": f"sleep {delay:.2f}; exit {code}",
                        "oom": f"sleep {delay:.2f}; tail /dev/zero",
                        "stopped": "sleep 120",
                        "stop_early": "sleep 120",
                    }[kind]
                    msg = start_message(
                        iid, ["sh", "-c", script], cores={"0": [vcore]}, memory={"0": memory}
                    )
                    status, reply = http_json(f"{agent.url}/apis/v1/messages", body=msg)
                    if status != 200 or reply.get("status") != "ACCEPTED":
                        with lock:
                            failures.append(f"{iid} ({kind}): start answered {status} {reply}")
                        continue
                    if kind == "stopped":
                        ctl.wait_state(iid, "RUNNING", 120)
                        time.sleep(delay)
                    if kind in ("stopped", "stop_early"):
                        http_json(f"{agent.url}/apis/v1/messages", body=stop_message(iid))
                    stopped = ctl.wait_state(iid, "STOPPED", 180)["instanceInfo"]
                    states = ctl.states(iid)
                    done = next(
                        (
                            m["instanceInfo"]
                            for m in ctl.reports(iid)
                            if m["instanceInfo"]["state"] == "RUN_COMPLETED"
                        ),
                        stopped,
                    )
                    ok = "LOST" not in states and expected_ok(kind, code, done)
                    with lock:
                        kinds[kind] += 1
                        if not ok:
                            failures.append(
                                f"{iid} ({kind} {code}): states {states}, result {done.get('taskResult')}, error {done.get('errorMessage')!r}"
                            )

            threads = [threading.Thread(target=worker, args=(v,)) for v in vcores]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            left = client.containers.list(all=True, filters={"label": "drove.job.type"})
            node = http_json(f"{agent.url}/apis/v1/status")[1]
            snap = node["state"]
            layout_cores = sum(len(v) for v in snap["layout"]["cores"].values())
            free_cores = sum(len(v) for v in snap["cpus"]["freeCores"].values())
            free_ok = (
                snap["cpus"]["usedCores"] == {}
                and snap["memory"]["usedMemory"] == {}
                and free_cores == layout_cores * MULTIPLIER
                and snap["memory"]["freeMemory"] == snap["layout"]["memory"]
            )
        finally:
            agent.stop()
            agent.kill()
            ctl.stop()
    elapsed = time.monotonic() - started
    total = sum(kinds.values())
    counts = ", ".join(f"{kinds[k]} {k}" for k in KINDS)
    passed = not failures and not left and free_ok and total == args.tasks
    print(
        f"soak {'PASS' if passed else 'FAIL'}: {total}/{args.tasks} tasks ({counts}) in {elapsed:.0f} s "
        f"at concurrency {args.concurrency}, seed {args.seed}: {len(failures)} wrong outcome(s), "
        f"{len(left)} container(s) left, resources {'all free' if free_ok else 'NOT free'}"
    )
    for line in failures[:20]:
        print("  " + line)
    for c in left:
        c.remove(force=True)
    client.close()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
