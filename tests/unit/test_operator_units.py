"""Pure pieces of the operator surface: cgroup usage, log files and their API paths, sd_notify,
status rendering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from agent.commands import exit_code_of, pick_cores, render_status
from agent.metrics import cgroup_paths, read_usage
from agent.sdnotify import notify, watchdog_interval_s
from agent.tasklogs import LogAccessError, LogStore, RotatingLogFile


def test_cgroup_v1_usage(tmp_path):
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text(
        "12:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
    )
    cg = tmp_path / "cgroup"
    (cg / "cpuacct/docker/abc").mkdir(parents=True)
    (cg / "memory/docker/abc").mkdir(parents=True)
    (cg / "cpuacct/docker/abc/cpuacct.usage").write_text("2500000000\n")
    (cg / "memory/docker/abc/memory.usage_in_bytes").write_text("1048576\n")
    assert cgroup_paths(proc, 42)["cpuacct"] == "/docker/abc"
    usage = read_usage(cg, proc, 42)
    assert usage is not None
    assert usage.cpu_seconds == pytest.approx(2.5)
    assert usage.memory_bytes == 1048576


def test_cgroup_v2_usage(tmp_path):
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_text("0::/system.slice/docker-abc.scope\n")
    d = tmp_path / "cgroup/system.slice/docker-abc.scope"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    (d / "memory.current").write_text("4096\n")
    usage = read_usage(tmp_path / "cgroup", proc, 7)
    assert usage is not None
    assert usage.cpu_seconds == pytest.approx(1.5)
    assert usage.memory_bytes == 4096


def test_cgroup_usage_of_a_gone_process(tmp_path):
    assert read_usage(tmp_path, tmp_path, 999) is None


def test_rotating_log_file(tmp_path):
    path = tmp_path / "app/t1/output.log"
    log = RotatingLogFile(path, max_bytes=10, max_files=2)
    for chunk in (b"aaaa\n", b"bbbb\n", b"cccc\n", b"dddd\n", b"eeee\n", b"ffff\n"):
        log.write(chunk)
    log.close()
    assert path.read_bytes() == b"eeee\nffff\n"
    assert path.with_name("output.log.1").read_bytes() == b"cccc\ndddd\n"
    assert path.with_name("output.log.2").read_bytes() == b"aaaa\nbbbb\n"
    assert not path.with_name("output.log.3").exists()


def test_log_store_reads_and_refuses_traversal(tmp_path):
    store = LogStore(tmp_path / "logs")
    out = store.output_file("app", "t1")
    out.parent.mkdir(parents=True)
    out.write_text("hello world")
    (tmp_path / "secret.txt").write_text("no")
    assert store.list("app", "t1") == ["output.log"]
    assert store.list("app", "missing") == []
    assert store.read("app", "t1", "output.log", -1, -1) == ("", 11)
    assert store.read("app", "t1", "output.log", 6, -1) == ("world", 6)
    assert store.read("app", "t1", "output.log", 0, 5) == ("hello", 0)
    for app, task, name in [
        ("..", "..", "secret.txt"),
        ("app", "..", "../secret.txt"),
        ("app", "t1", "../../../secret.txt"),
    ]:
        with pytest.raises(LogAccessError):
            store.read(app, task, name, 0, -1)
    with pytest.raises(LogAccessError, match="out of bounds"):
        store.list("..", "..")
    with pytest.raises(LogAccessError, match="Could not read log file"):
        store.read("app", "t1", "other.txt", 0, -1)


def test_notify_reaches_a_real_datagram_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert server.recv(100) == b"READY=1"


def test_notify_abstract_namespace():
    name = f"drove-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(100) == b"WATCHDOG=1"


def test_notify_without_systemd_is_a_no_op(tmp_path):
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_watchdog_interval():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


VIEW = {
    "executorId": "e1",
    "hostname": "h",
    "port": 3000,
    "mode": "STANDALONE",
    "executorState": "ACTIVE",
    "leader": None,
    "uptimeSeconds": 3725,
    "docker": {"ok": True, "error": ""},
    "reports": {"queued": 0, "sent": 3, "failedAttempts": 0},
    "nodes": [
        {
            "node": 0,
            "cores": {
                "allocatable": [1, 2, 3],
                "free": [2, 3],
                "used": {"1": "TI-a"},
                "reserved": [0],
                "offline": [7],
            },
            "memory": {"exposed": 1000, "used": 100, "free": 900},
        },
        {
            "node": 1,
            "cores": {
                "allocatable": [4, 5],
                "free": [4, 5],
                "used": {},
                "reserved": [],
                "offline": [],
            },
            "memory": {"exposed": 2000, "used": 0, "free": 2000},
        },
    ],
    "tasks": [
        {
            "instanceId": "TI-a",
            "taskId": "t",
            "sourceAppName": "app",
            "state": "RUN_COMPLETED",
            "resources": [
                {"type": "CPU", "cores": {"0": [1]}},
                {"type": "MEMORY", "memoryInMB": {"0": 100}},
            ],
            "created": 1000,
            "taskResult": {"status": "FAILED", "exitCode": 137},
            "errorMessage": "OOM killed (memory limit 100 MB)",
        }
    ],
}


def test_render_status():
    text = render_status(VIEW, now_ms=61000)
    assert "uptime 1h02m" in text
    assert "NUMA node 0: 3 cores (2 free, 1 used, 1 reserved by osCores, 1 offline)" in text
    assert "1:TI-a" in text
    assert "0:reserved" in text
    assert "7:offline" in text
    assert "memory 1000 MB exposed, 100 MB used, 900 MB free" in text
    row = next(line for line in text.splitlines() if line.startswith("TI-a"))
    assert "FAILED (137)" in row
    assert "OOM killed" in row
    assert "1m00s" in row


def test_pick_cores():
    assert pick_cores(VIEW, 2, 100, None) == (0, [2, 3])
    assert pick_cores(VIEW, 2, 1500, None) == (1, [4, 5])
    assert pick_cores(VIEW, 1, 10, 1) == (1, [4])
    with pytest.raises(Exception, match="no room for 3 core"):
        pick_cores(VIEW, 3, 10, None)
    with pytest.raises(Exception, match="NUMA node 9 does not exist"):
        pick_cores(VIEW, 1, 10, 9)


@pytest.mark.parametrize(
    ("result", "code"),
    [
        ({"status": "SUCCESSFUL", "exitCode": 0}, 0),
        ({"status": "FAILED", "exitCode": 3}, 3),
        ({"status": "CANCELLED", "exitCode": -1}, 255),
        (None, 1),
    ],
)
def test_exit_code_of(result, code):
    assert exit_code_of({"taskResult": result} if result else {}) == code


def test_logs_are_json_lines_off_a_terminal_and_bridge_stdlib_loggers():
    code = (
        "import logging, structlog; from agent import log; log.configure();"
        "structlog.contextvars.bind_contextvars(instance_id='TI-1');"
        "structlog.get_logger('agent.tasks').info('task_state_changed', new='RUNNING');"
        "logging.getLogger('aiohttp.server').error('boom %s', 1)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["event"] == "task_state_changed"
    assert first["instance_id"] == "TI-1"
    assert second["event"] == "boom 1"
    assert second["logger"] == "aiohttp.server"
    assert second["level"] == "error"


def test_console_renderer_on_a_terminal():
    code = "from agent import log; import structlog; log.configure(json=False); structlog.get_logger('x').info('hello_there', a=1)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "hello_there" in out
    with pytest.raises(json.JSONDecodeError, match="Expecting value"):
        json.loads(out)


def test_pull_progress_is_tracked_per_layer():
    from agent.containers import PullProgress
    from agent.runtime import _track, split_image

    progress = PullProgress()
    assert progress.percent is None
    _track(progress, {"status": "Pulling fs layer", "id": "a"})
    _track(
        progress,
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 25, "total": 100}},
    )
    _track(
        progress,
        {"status": "Downloading", "id": "b", "progressDetail": {"current": 0, "total": 100}},
    )
    assert progress.percent == 12.5
    _track(progress, {"status": "Download complete", "id": "a"})
    assert progress.percent == 50
    _track(progress, {"status": "Pull complete", "id": "b"})
    assert progress.percent == 100
    assert split_image("reg:5000/app") == ("reg:5000/app", "latest")
    assert split_image("reg:5000/app:1.2") == ("reg:5000/app", "1.2")
    assert split_image("app@sha256:abc") == ("app", "sha256:abc")
