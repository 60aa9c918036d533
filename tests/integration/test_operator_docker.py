"""The operator surface against a real agent and the real Docker engine: the CLI, live events,
metrics, task logs and their API, sd_notify, systemd-analyze and doctor."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import new_instance_id, start_message
from tests.helpers import (
    CONTROLLER_SECRET,
    FULL_SEQUENCE,
    TEST_IMAGE,
    AgentProcess,
    cli,
    free_port,
    http_json,
    write_config,
)

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("operator")
    port = free_port()
    cfg = write_config(
        root / "agent.yaml",
        port,
        options={"usageSampleInterval": "1 second", "taskLogMaxSize": "1MB", "taskLogMaxFiles": 2},
    )
    proc = AgentProcess(cfg, root / "agent.log", port).start()
    proc.wait_state("ACTIVE")
    yield proc
    proc.stop()
    proc.kill()


def op(agent, *args, timeout=60):
    return (
        cli(*args[:2], "--config", str(agent.config), *args[2:], timeout=timeout)
        if args[0] == "tasks"
        else cli(args[0], "--config", str(agent.config), *args[1:], timeout=timeout)
    )


def test_operator_day(agent):
    # start a task from the CLI: it picks free cores and follows the task to RUNNING
    started = op(
        agent,
        "tasks",
        "start",
        "--image",
        TEST_IMAGE,
        "--cores",
        "1",
        "--memory",
        "48",
        "--app",
        "demo",
        "--id",
        "hello",
        "-e",
        "WHO=operator",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo hello $WHO $i; sleep 0.3; done; echo oops >&2; exit 3",
    )
    assert started.returncode == 0, started.stderr
    instance_id = started.stdout.split(":")[0]
    assert instance_id.startswith("TI-")
    assert (
        f"{instance_id}: RUNNING" in started.stdout or f"{instance_id}: STOPPED" in started.stdout
    )

    status = op(agent, "status")
    assert status.returncode == 0, status.stderr
    assert "NUMA node 0:" in status.stdout
    assert instance_id in status.stdout
    data = json.loads(op(agent, "status", "--json").stdout)
    assert data["executorState"] == "ACTIVE"
    assert any(t["instanceId"] == instance_id for t in data["tasks"])

    logs = op(agent, "tasks", "logs", "-f", instance_id)
    assert logs.returncode == 0, logs.stderr
    assert "hello operator 1\nhello operator 2\nhello operator 3\n" in logs.stdout
    assert "oops" in logs.stdout

    waited = op(agent, "tasks", "wait", instance_id)
    assert waited.returncode == 3
    assert "Task instance exited with status: 3" in waited.stderr

    final = op(agent, "status").stdout
    row = next(line for line in final.splitlines() if line.startswith(instance_id))
    assert "STOPPED" in row
    assert "FAILED (3)" in row


def test_stop_from_the_cli(agent):
    started = op(
        agent, "tasks", "start", "--image", TEST_IMAGE, "--memory", "32", "-d", "--", "sleep", "300"
    )
    instance_id = started.stdout.split(":")[0]
    stopped = op(agent, "tasks", "stop", instance_id)
    assert stopped.returncode == 0, stopped.stderr
    assert "STOPPED CANCELLED (-1)" in stopped.stdout
    assert op(agent, "tasks", "wait", instance_id).returncode == 255


def test_cli_errors_are_one_clear_line(agent, tmp_path):
    wrong = cli("status", "--config", str(agent.config), "--secret", "nope")
    assert wrong.returncode == 1
    assert wrong.stderr.strip().endswith(f"check clusterAuth.secrets in {agent.config}")
    assert len(wrong.stderr.strip().splitlines()) == 1
    down = cli("status", "--url", f"http://127.0.0.1:{free_port()}", "--secret", "x")
    assert down.returncode == 1
    assert "no agent answers at" in down.stderr
    assert "is it running?" in down.stderr
    unknown = op(agent, "tasks", "wait", "TI-unknown")
    assert unknown.returncode == 1
    assert "no task with instanceId TI-unknown" in unknown.stderr
    huge = op(agent, "tasks", "start", "--image", TEST_IMAGE, "--cores", "64", "-d", "--", "true")
    assert huge.returncode == 1
    assert "no room for 64 core(s)" in huge.stderr


def test_events_stream_every_report_to_a_client(agent):
    iid = new_instance_id()

    async def follow():
        events = []
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{agent.url}/apis/v1/events", headers={"Cluster-Authorization": CONTROLLER_SECRET}
            ) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            status, _ = await asyncio.to_thread(
                http_json,
                f"{agent.url}/apis/v1/messages",
                body=start_message(iid, ["sh", "-c", "exit 0"]),
            )
            assert status == 200
            kind = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind == "TASK_STATE_REPORT":
                    info = json.loads(line[5:])["instanceInfo"]
                    if info["instanceId"] == iid:
                        events.append(info["state"])
                        if info["state"] == "STOPPED":
                            return events
        return events

    states = asyncio.run(asyncio.wait_for(follow(), 30))
    assert states == FULL_SEQUENCE
    # and the CLI tails the same stream
    tail = subprocess.Popen(
        [sys.executable, "-m", "agent", "events", "--config", str(agent.config)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        time.sleep(1)
        other = new_instance_id()
        http_json(f"{agent.url}/apis/v1/messages", body=start_message(other, ["true"]))
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = tail.stdout.readline()
            if other in line:
                seen.append(line.split()[2])
            if f"{other} STOPPED SUCCESSFUL (0)" in line:
                break
        assert seen == FULL_SEQUENCE
    finally:
        tail.kill()
        tail.wait(10)
        if tail.stdout is not None:
            tail.stdout.close()


def _metrics(agent):
    import urllib.request

    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_cover_the_agent(agent):
    iid = new_instance_id()
    http_json(
        f"{agent.url}/apis/v1/messages",
        body=start_message(
            iid, ["sh", "-c", "x=0; while [ $x -lt 300000 ]; do x=$((x+1)); done; sleep 30"]
        ),
    )
    deadline = time.monotonic() + 30
    cpu = None
    while time.monotonic() < deadline:
        families = _metrics(agent)
        samples = [
            s
            for s in families["drove_agent_task_cpu_seconds"].samples
            if s.labels.get("instance_id") == iid
        ]
        if samples and samples[0].value > 0.05:
            cpu = samples[0].value
            break
        time.sleep(0.5)
    assert cpu is not None, "per-task CPU from cgroup files"
    mem = [
        s
        for s in families["drove_agent_task_memory_bytes"].samples
        if s.labels["instance_id"] == iid
    ]
    assert mem
    assert mem[0].value > 0
    cores = {
        (s.labels["node"], s.labels["kind"]): s.value for s in families["drove_agent_cores"].samples
    }
    assert cores[("0", "used")] == 1
    assert cores[("0", "free")] + cores[("0", "used")] == cores[("0", "total")]
    memory = {
        (s.labels["node"], s.labels["kind"]): s.value
        for s in families["drove_agent_memory_mb"].samples
    }
    assert memory[("0", "used")] == 64
    tasks = {s.labels["state"]: s.value for s in families["drove_agent_tasks"].samples}
    assert tasks["RUNNING"] >= 1
    assert "drove_agent_reports_queued" in families
    assert "drove_agent_report_send_failures" in families
    handled = [
        s for s in families["drove_agent_message_seconds"].samples if s.name.endswith("_count")
    ]
    assert any(s.labels["type"] == "START_TASK" and s.value >= 1 for s in handled)
    docker_calls = [
        s for s in families["drove_agent_docker_call_seconds"].samples if s.name.endswith("_count")
    ]
    assert {"create", "start"} <= {s.labels["call"] for s in docker_calls}
    assert "drove_agent_exit_to_report_seconds" in families
    assert op(agent, "tasks", "stop", iid).returncode == 0


def test_log_endpoints_match_the_reference(agent):
    iid = new_instance_id()
    msg = start_message(iid, ["sh", "-c", "echo first line; echo second line"])
    http_json(f"{agent.url}/apis/v1/messages", body=msg)
    app, task = msg["spec"]["sourceAppName"], msg["spec"]["taskId"]
    base = f"{agent.url}/apis/v1/logs/filestream/{app}/{task}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body = http_json(f"{base}/read/output.log?offset=0&length=-1")
        if status == 200 and "second line" in body["data"]:
            break
        time.sleep(0.2)
    assert body == {"data": "first line\nsecond line\n", "offset": 0}
    assert http_json(f"{base}/list")[1] == {"files": ["output.log"]}
    assert http_json(f"{base}/read/output.log?offset=-1&length=-1")[1] == {"data": "", "offset": 23}
    assert http_json(f"{base}/read/output.log?offset=6&length=4")[1] == {
        "data": "line",
        "offset": 6,
    }
    import urllib.request

    req = urllib.request.Request(
        f"{base}/download/output.log", headers={"Cluster-Authorization": CONTROLLER_SECRET}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.read() == b"first line\nsecond line\n"
        assert resp.headers["Content-Disposition"] == "attachment; filename=output.log"
    # traversal and bad names are refused with the reference's 400 {"error": ...}
    for path in (
        f"{agent.url}/apis/v1/logs/filestream/{app}/..%2F..%2F..%2Fetc/read/passwd",
        f"{agent.url}/apis/v1/logs/filestream/../../read/output.log",
        f"{base}/read/..%2F..%2F..%2Fagent.yaml",
        f"{base}/download/..%2F..%2Fagent.yaml",
        f"{base}/read/missing.log",
    ):
        status, body = http_json(path)
        assert status in (400, 404), (path, status, body)
        if status == 400:
            assert set(body) == {"error"}
    assert http_json(f"{base}/list", secret=None)[0] == 401
    assert http_json(f"{agent.url}/apis/v1/logs/filestream/none/none/list")[1] == {"files": []}


def test_sd_notify_ready_and_watchdog_from_a_real_agent(tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(20)
    port = free_port()
    cfg = write_config(tmp_path / "a.yaml", port)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    with (tmp_path / "a.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        received = []
        while "READY=1" not in "".join(received) or received.count("WATCHDOG=1") < 2:
            received.append(server.recv(100).decode())
        assert any(m.startswith("READY=1") for m in received)
        # READY comes after the API is bound
        assert http_json(f"http://127.0.0.1:{port}/apis/v1/ping", secret=None)[0] == 200
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in received:
            received.append(server.recv(100).decode())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()


def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "systemd/drove-agent.service").read_text()
    assert "Type=notify" in unit
    assert "KillMode=process" in unit
    assert "WatchdogSec=" in unit
    assert "Restart=on-failure" in unit
    assert "After=network-online.target docker.service" in unit
    executable = shutil.which("drove-agent") or str(Path(sys.executable).parent / "drove-agent")
    local = tmp_path / "drove-agent.service"
    local.write_text(unit.replace("/usr/local/bin/drove-agent", executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "drove-agent.service" not in result.stderr, result.stderr


def test_dockerfile_is_pinned_and_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms
    assert all(":" in image and "latest" not in image for image in froms)
    assert "USER 10001:10001" in text
    assert "-c requirements.lock" in text
    assert "docker run" in text
    lock = (ROOT / "requirements.lock").read_text()
    for dep in (
        "aiohttp==",
        "docker==",
        "psutil==",
        "structlog==",
        "PyYAML==",
        "prometheus_client==",
    ):
        assert dep in lock


def test_doctor(agent, tmp_path):
    good = cli("doctor", "--config", str(agent.config))
    assert good.returncode == 0, good.stdout
    assert "ok    Docker engine" in good.stdout
    assert "ok    cgroup v" in good.stdout
    assert "all checks passed" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"options: {{dockerSocketPath: {tmp_path}/no.sock, stateDir: /proc/nope}}\n"
        "controllers: {endpoints: ['http://127.0.0.1:9']}\n"
    )
    result = cli("doctor", "--config", str(bad))
    assert result.returncode == 1
    assert "FAIL  Docker engine at" in result.stdout
    assert "fix: start dockerd" in result.stdout
    assert "FAIL  options.stateDir /proc/nope is not writable" in result.stdout
    assert "FAIL  controller leader reachable: no endpoint answers" in result.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text("optons: {}\n")
    result = cli("doctor", "--config", str(typo))
    assert result.returncode == 1
    assert "optons: unknown key" in result.stdout
