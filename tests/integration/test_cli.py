from __future__ import annotations

import json
import re
import signal
import socket
import subprocess

import pytest

from tests.helpers import (
    CONTROLLER_SECRET,
    EXECUTOR_SECRET,
    AgentProcess,
    cli,
    free_port,
    http_json,
    write_config,
)
from tests.sysfs import build_sysfs


@pytest.mark.parametrize("command", [[], ["run"], ["inventory"], ["check-config"]])
def test_help_on_every_command(command):
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: drove-agent" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def test_check_config_good_and_bad(tmp_path):
    good = write_config(tmp_path / "good.yaml", 3000)
    result = cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("resources: {exposedMemPercentage: 120}\noptions: {bogus: 1}\n")
    result = cli("check-config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "resources.exposedMemPercentage: 120 is above the maximum 100" in lines
    assert "options.bogus: unknown key" in lines


def test_run_refuses_bad_config_before_binding(tmp_path):
    port = free_port()
    bad = write_config(tmp_path / "bad.yaml", port, resources={"exposedMemPercentage": 120})
    result = cli("run", "--config", str(bad), timeout=30)
    assert result.returncode == 2
    assert "resources.exposedMemPercentage: 120 is above the maximum 100" in result.stderr
    # nothing listens on the port
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_run_serves_ping_and_status_then_stops_on_sigterm(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", port, resources={"tags": ["edge"]})
    agent = AgentProcess(cfg, tmp_path / "agent.log", port).start()
    try:
        agent.wait_state("ACTIVE")
        assert http_json(f"{agent.url}/apis/v1/ping", secret=None)[0] == 200
        assert http_json(f"{agent.url}/apis/v1/status", secret=None)[0] == 401
        assert http_json(f"{agent.url}/apis/v1/status", secret="nope")[0] == 401
        for secret in (CONTROLLER_SECRET, EXECUTOR_SECRET):
            status, data = http_json(f"{agent.url}/apis/v1/status", secret=secret)
            assert status == 200
            assert data["port"] == port
            assert data["executorState"] == "ACTIVE"
            assert "edge" in data["tags"]
        assert agent.stop(signal.SIGTERM) == 0
    finally:
        agent.kill()
    started = [e for e in agent.events() if e.get("event") == "agent_started"]
    assert started, agent.log()
    assert started[0]["port"] == port
    assert started[0]["nodes"]


def test_ctrl_c_stops_cleanly(tmp_path):
    port = free_port()
    agent = AgentProcess(write_config(tmp_path / "a.yaml", port), tmp_path / "a.log", port).start()
    try:
        assert agent.stop(signal.SIGINT) == 0
    finally:
        agent.kill()


def test_inventory_on_synthetic_tree(tmp_path):
    root = build_sysfs(
        tmp_path / "sys",
        {0: ([0, 2], 2048), 1: ([1, 3], 1024)},
        online=[0, 1, 2],
        siblings=[(0, 2)],
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("resources: {osCores: [2], exposedMemPercentage: 50}\n")
    result = cli("inventory", "--config", str(cfg), "--sysfs-root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cores"] == {"0": [0], "1": [1]}
    assert data["memory"] == {"0": 1024, "1": 512}
    assert data["reservedCores"] == {"0": [2], "1": []}
    assert data["offlineCores"] == {"0": [], "1": [3]}
    assert data["siblings"]["0"] == [[0, 2]]
    text = cli("inventory", "--config", str(cfg), "--sysfs-root", str(root))
    assert text.returncode == 0
    assert "reserved (osCores): 2" in text.stdout
    assert "offline cores     : 3" in text.stdout


def _numactl() -> dict[str, dict[str, object]]:
    out = subprocess.run(["numactl", "-H"], capture_output=True, text=True, check=True).stdout
    nodes: dict[str, dict[str, object]] = {}
    for line in out.splitlines():
        if m := re.match(r"node (\d+) cpus:(.*)", line):
            nodes.setdefault(m.group(1), {})["cores"] = [int(x) for x in m.group(2).split()]
        elif m := re.match(r"node (\d+) size: (\d+) MB", line):
            nodes.setdefault(m.group(1), {})["memory"] = int(m.group(2))
    return nodes


def test_inventory_json_matches_numactl_on_this_host():
    result = cli("inventory", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = _numactl()
    assert data["cores"] == {n: v["cores"] for n, v in expected.items()}
    assert data["memory"] == {n: v["memory"] for n, v in expected.items()}
