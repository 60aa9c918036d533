"""Shared test helpers: free ports, writing configs, running the agent as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

CONTROLLER_SECRET = "TestControllerSecret"
EXECUTOR_SECRET = "TestExecutorSecret"
# The reports of a task that runs and ends (spec §3.5).
FULL_SEQUENCE = [
    "PROVISIONING",
    "STARTING",
    "RUNNING",
    "RUN_COMPLETED",
    "DEPROVISIONING",
    "STOPPED",
]
TEST_IMAGE = os.environ.get("DROVE_TEST_IMAGE", "drove-agent-test/busybox:latest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, port: int, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "options": {
            "hostname": "127.0.0.1",
            "stateDir": str(path.parent / "state"),
            "logPath": str(path.parent / "logs"),
            "maxOpenFiles": 4096,
        },
        "clusterAuth": {
            "secrets": [
                {"nodeType": "CONTROLLER", "secret": CONTROLLER_SECRET},
                {"nodeType": "EXECUTOR", "secret": EXECUTOR_SECRET},
            ]
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def http_json(
    url: str, *, secret: str | None = CONTROLLER_SECRET, body: Any = None, timeout: float = 5
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if secret is not None:
        req.add_header("Cluster-Authorization", secret)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode()


class AgentProcess:
    """``drove-agent run`` in a subprocess, its output in a log file."""

    def __init__(self, config: Path, log_path: Path, port: int, sysfs_root: str = "/sys") -> None:
        self.config = config
        self.log_path = log_path
        self.port = port
        self.sysfs_root = sysfs_root
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = self._spawn(log)
        if wait:
            self.wait_ready()
        return self

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(self.config),
                "--sysfs-root",
                self.sysfs_root,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_json(f"{self.url}/apis/v1/ping", secret=None, timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.log()}")

    def wait_state(self, state: str = "ACTIVE", timeout: float = 30) -> None:
        """Wait for the executor state (ACTIVE comes after recovery, and a leader in RPC mode)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            status, data = http_json(f"{self.url}/apis/v1/status", timeout=2)
            seen = data.get("executorState") if status == 200 and isinstance(data, dict) else None
            if seen == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"executor state {seen}, not {state}, after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            spy = Path(sys.executable).parent / "py-spy"
            stacks = ""
            if spy.exists():
                stacks = subprocess.run(
                    [str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True
                ).stdout
            raise AssertionError(
                f"agent did not stop within {timeout}s\n{stacks}\n{self.log()[-3000:]}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
