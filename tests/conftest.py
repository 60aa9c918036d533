from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.controller import StandInController
from tests.helpers import TEST_IMAGE, AgentProcess, free_port, write_config

REGISTRY_USER = "user"
REGISTRY_PASSWORD = "pass"


def new_instance_id() -> str:
    return f"TI-{uuid.uuid4()}"


def start_message(
    instance_id: str,
    args: list[str] | None = None,
    *,
    cores: dict[str, list[int]] | None = None,
    memory: dict[str, int] | None = None,
    image: str = TEST_IMAGE,
    pull_timeout: str = "100 seconds",
    header_id: str | None = None,
    **spec_extra: Any,
) -> dict[str, Any]:
    spec = {
        "taskId": "T-" + instance_id[-8:],
        "sourceAppName": "TEST_APP",
        "instanceId": instance_id,
        "executable": {"type": "DOCKER", "url": image, "dockerPullTimeout": pull_timeout},
        "resources": [
            {"type": "CPU", "cores": cores or {"0": [1]}},
            {"type": "MEMORY", "memoryInMB": memory or {"0": 64}},
        ],
        "volumes": [],
        "configs": [],
        "env": {},
        "args": args or ["sh", "-c", "exit 0"],
        **spec_extra,
    }
    return {
        "type": "START_TASK",
        "header": {
            "id": header_id or str(uuid.uuid4()),
            "senderType": "CONTROLLER",
            "direction": "REQUEST",
            "messageTime": int(time.time() * 1000),
        },
        "address": {
            "executorId": "x",
            "hostname": "127.0.0.1",
            "port": 3000,
            "transportType": "HTTP",
        },
        "spec": spec,
    }


def stop_message(instance_id: str) -> dict[str, Any]:
    return {
        "type": "STOP_TASK",
        "header": {"id": str(uuid.uuid4()), "senderType": "CONTROLLER", "direction": "REQUEST"},
        "instanceId": instance_id,
    }


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory, docker_client) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 with htpasswd auth, holding the test image as
    <host:port>/drove/busybox:1 (pushed with credentials, local tag removed)."""
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    htpasswd = subprocess.run(
        ["htpasswd", "-Bbn", REGISTRY_USER, REGISTRY_PASSWORD],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (root / "htpasswd").write_text(htpasswd)
    (root / "config.yml").write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}, secret: test}}\n"
        f"auth: {{htpasswd: {{realm: test, path: {root / 'htpasswd'}}}}}\n"
    )
    with (root / "log").open("wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=log
        )
    host = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    break
            except OSError:
                time.sleep(0.1)
        repo = f"{host}/drove/busybox"
        docker_client.images.get(TEST_IMAGE).tag(repo, "1")
        out = docker_client.images.push(
            repo, "1", auth_config={"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}
        )
        assert "digest" in out, out
        docker_client.images.remove(f"{repo}:1")
        yield host
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def controller() -> Iterator[StandInController]:
    ctl = StandInController().start()
    yield ctl
    ctl.stop()


@pytest.fixture(scope="session")
def rpc_agent(tmp_path_factory, controller, registry) -> Iterator[AgentProcess]:
    """One agent in RPC mode for the task tests, reporting to the stand-in controller."""
    root: Path = tmp_path_factory.mktemp("rpc-agent")
    port = free_port()
    registry_port = registry.split(":")[1]
    cfg = write_config(
        root / "agent.yaml",
        port,
        controllers={"endpoints": [controller.url], "leadershipCheckInterval": "3 seconds"},
        dockerAuth={
            "entries": {
                registry: {
                    "type": "CREDENTIALS",
                    "username": REGISTRY_USER,
                    "password": REGISTRY_PASSWORD,
                },
                f"localhost:{registry_port}": {
                    "type": "CREDENTIALS",
                    "username": REGISTRY_USER,
                    "password": "wrong",
                },
            }
        },
    )
    agent = AgentProcess(cfg, root / "agent.log", port).start()
    try:
        agent.wait_state("ACTIVE")
        yield agent
    finally:
        agent.stop()
        agent.kill()


@pytest.fixture(autouse=True)
def _no_leaked_containers(request) -> Iterator[None]:
    """Docker tests must leave no task container behind."""
    yield
    if "docker" not in request.keywords:
        return
    client = docker.from_env()
    try:
        left = client.containers.list(all=True, filters={"label": "drove.job.type"})
        names = [f"{c.name} ({c.status})" for c in left]
        for c in left:
            c.remove(force=True)
    finally:
        client.close()
    assert not names, f"containers left behind: {names}"


@pytest.fixture(scope="session")
def stalling_registry() -> Iterator[str]:
    """A registry that answers /v2/ and then never answers a manifest request."""
    import asyncio
    import threading

    from aiohttp import web

    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def v2(request: web.Request) -> web.Response:
        return web.json_response({})

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(600)
        return web.Response(status=500)

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/v2/", v2)
        app.router.add_route("*", "/v2/{tail:.*}", stall)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    holder: dict[str, web.AppRunner] = {}

    def run() -> None:
        holder["runner"] = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(holder["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
