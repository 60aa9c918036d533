"""A private dockerd for tests that restart the engine: its own socket, data root, exec root and
pid file, no bridge and no iptables, live-restore so containers outlive the daemon. It runs in a
network namespace of its own: a dockerd started with --bridge=none deletes the host's docker0,
which would break the main engine."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import docker
import docker.errors

from tests.helpers import TEST_IMAGE


class PrivateDockerd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.pidfile = root / "docker.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> PrivateDockerd:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--net",
                    "--",
                    "dockerd",
                    "--host",
                    self.url,
                    "--data-root",
                    str(self.root / "data"),
                    "--exec-root",
                    str(self.root / "exec"),
                    "--pidfile",
                    str(self.pidfile),
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--live-restore",
                    "--cgroup-parent=/drove-agent-test",
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.socket.exists():
                try:
                    client = docker.DockerClient(base_url=self.url, version="auto", timeout=5)
                except docker.errors.DockerException:
                    time.sleep(0.2)
                    continue
                try:
                    client.ping()
                    return self
                except docker.errors.DockerException:
                    pass
                finally:
                    client.close()
            time.sleep(0.2)
        raise AssertionError((self.root / "dockerd.log").read_text()[-3000:])

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version="auto", timeout=30)

    def load_test_image(self, source: docker.DockerClient) -> None:
        data = b"".join(source.images.get(TEST_IMAGE).save(named=TEST_IMAGE))
        client = self.client()
        try:
            client.images.load(data)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.pidfile.exists():
            os.unlink(self.pidfile)

    def destroy(self) -> None:
        """Remove every container, stop the daemon and unmount what it left below its root."""
        if self.proc is not None:
            client = self.client()
            try:
                for container in client.containers.list(all=True):
                    container.remove(force=True)
            finally:
                client.close()
        self.stop()
        with open("/proc/mounts") as mounts:
            points = [line.split()[1] for line in mounts if str(self.root) in line.split()[1]]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
