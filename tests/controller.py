"""A stand-in Drove controller on loopback: answers /apis/v1/ping and records every message the
agent sends to /apis/v1/messages. Runs its own event loop in a thread, so sync tests can use it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.helpers import EXECUTOR_SECRET, free_port


class StandInController:
    def __init__(self, port: int | None = None, secret: str = EXECUTOR_SECRET) -> None:
        self.port = port or free_port()
        self.secret = secret
        self.messages: list[dict[str, Any]] = []
        self.rejected = 0
        self.accepting = True  # False: answer 400 "not the leader", as a non-leader does
        self.known_instances: dict[str, list[str]] = {}
        self.files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- server ----------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Cluster-Authorization") == self.secret

    async def _ping(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        return web.json_response({"status": "SUCCESS", "data": "pong", "message": "success"})

    async def _messages(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        body = await request.json()
        if not self.accepting:
            with self._lock:
                self.rejected += 1
            return web.json_response(
                {"status": "FAILED", "message": "This node is not the leader controller"},
                status=400,
            )
        with self._lock:
            self.messages.append(
                {"received": time.time(), "headers": dict(request.headers), **body}
            )
        return web.json_response({"header": body.get("header"), "status": "ACCEPTED"})

    async def _instances(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        data = self.known_instances.get(request.match_info["which"])
        if data is None:
            return web.json_response({"status": "FAILED", "data": None, "message": "no data"})
        return web.json_response(
            {
                "status": "SUCCESS",
                "data": {
                    "appInstanceIds": [],
                    "staleAppInstanceIds": [],
                    "taskInstanceIds": data,
                    "staleTaskInstanceIds": [],
                    "localServiceInstanceIds": [],
                    "staleLocalServiceInstanceIds": [],
                },
                "message": "success",
            }
        )

    async def _file(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        if request.headers.get("Authorization") != "Basic dXNlcjpwYXNz":  # user:pass
            return web.Response(status=403)
        return web.Response(body=data)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/apis/v1/ping", self._ping)
        app.router.add_post("/apis/v1/messages", self._messages)
        app.router.add_get(
            "/apis/v1/internal/cluster/executors/{executor_id}/instances/{which}", self._instances
        )
        app.router.add_get("/files/{name}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> StandInController:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
            self._started.set()
            self._loop.run_forever()
            assert self._runner is not None
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="stand-in-controller", daemon=True)
        self._thread.start()
        assert self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None
        self._started.clear()

    # --- queries ---------------------------------------------------------------------------

    def reports(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            msgs = list(self.messages)
        return [
            m
            for m in msgs
            if m.get("type") == "TASK_STATE_REPORT"
            and (instance_id is None or m["instanceInfo"]["instanceId"] == instance_id)
        ]

    def states(self, instance_id: str) -> list[str]:
        return [m["instanceInfo"]["state"] for m in self.reports(instance_id)]

    def snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if m.get("type") == "EXECUTOR_SNAPSHOT"]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")

    def wait_state(self, instance_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for m in self.reports(instance_id):
                if m["instanceInfo"]["state"] == state:
                    return m
            return None

        return self.wait_for(
            found, timeout, f"{instance_id} -> {state} (seen {self.states(instance_id)})"
        )
