"""The agent's HTTP API (aiohttp). Handlers stay thin: parse, call the core, serialise."""

from __future__ import annotations

import asyncio
import hmac
import json
import mimetypes
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from agent.errors import AgentError, MessageError, TaskNotFound
from agent.metrics import CONTENT_TYPE
from agent.models import ExecutorMessage, parse_executor_message
from agent.tasklogs import LogAccessError, LogStore

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 4 << 20


class AgentCore(Protocol):
    """What the API needs from the rest of the agent."""

    def node_data(self) -> dict[str, Any]: ...

    def handle_message(self, message: ExecutorMessage) -> tuple[bool, str]: ...

    def task_infos(self) -> list[dict[str, Any]]: ...

    def task_info(self, instance_id: str) -> dict[str, Any] | None: ...

    def recent_reports(self) -> list[dict[str, Any]]: ...

    def agent_view(self) -> dict[str, Any]: ...

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None: ...

    def metrics_text(self) -> bytes: ...

    def observe_message(self, kind: str, seconds: float) -> None: ...

    def log_store(self) -> LogStore | None: ...


CORE = web.AppKey("core", AgentCore)
SECRETS = web.AppKey("secrets", tuple[str, ...])

_OPEN_PATHS = frozenset({"/apis/v1/ping", "/metrics"})
SSE_HEARTBEAT_S = 15.0


def secret_ok(given: str | None, secrets: tuple[str, ...]) -> bool:
    """Constant-time check of a Cluster-Authorization value against every accepted secret."""
    if not given:
        return False
    supplied = given.encode()
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(supplied, secret.encode())
    return ok


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in _OPEN_PATHS and not secret_ok(
        request.headers.get("Cluster-Authorization"), request.app[SECRETS]
    ):
        return web.Response(status=401)
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except AgentError as exc:
        return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.http_status)
    except Exception:
        log.exception("api_request_failed", method=request.method, path=request.path)
        return web.json_response(
            {"error": "internal_error", "message": "internal error; see the agent log"},
            status=500,
        )


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"status": "SUCCESS", "message": "pong"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[CORE].node_data())


async def messages(request: web.Request) -> web.Response:
    started = time.perf_counter()
    kind = "invalid"
    try:
        response, kind = await _messages(request)
        return response
    finally:
        request.app[CORE].observe_message(kind, time.perf_counter() - started)


async def _messages(request: web.Request) -> tuple[web.Response, str]:
    raw = await request.read()
    if not raw:
        raise MessageError("(body): is empty; expected an ExecutorMessage JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"(body): is not valid JSON: {exc}") from None
    message = parse_executor_message(body)
    accepted, detail = request.app[CORE].handle_message(message)
    reply: dict[str, Any] = {
        "header": dict(message.header),
        "status": "ACCEPTED" if accepted else "FAILED",
    }
    if detail:
        reply["message"] = detail
    return web.json_response(reply), str(message.type)


async def tasks(request: web.Request) -> web.Response:
    return web.json_response(request.app[CORE].task_infos())


async def task(request: web.Request) -> web.Response:
    instance_id = request.match_info["instance_id"]
    info = request.app[CORE].task_info(instance_id)
    if info is None:
        raise TaskNotFound(f"no task with instanceId {instance_id} on this executor")
    return web.json_response(info)


async def reports(request: web.Request) -> web.Response:
    """The most recent reports and snapshots (what a controller would have been sent)."""
    instance_id = request.query.get("instanceId")
    found = [
        m
        for m in request.app[CORE].recent_reports()
        if instance_id is None or m.get("instanceInfo", {}).get("instanceId") == instance_id
    ]
    return web.json_response(found)


async def agent_view(request: web.Request) -> web.Response:
    return web.json_response(request.app[CORE].agent_view())


async def events(request: web.Request) -> web.StreamResponse:
    """Every state report and snapshot as Server-Sent Events, as they happen."""
    core = request.app[CORE]
    queue = core.subscribe()
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await response.prepare(request)
        await response.write(b": connected\n\n")
        while True:
            try:
                async with asyncio.timeout(SSE_HEARTBEAT_S):
                    message = await queue.get()
            except TimeoutError:
                await response.write(b": heartbeat\n\n")
                continue
            data = json.dumps(message, separators=(",", ":"))
            await response.write(
                f"event: {message.get('type', 'message')}\ndata: {data}\n\n".encode()
            )
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        core.unsubscribe(queue)
    return response


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(request.app[CORE].metrics_text)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _logs(request: web.Request) -> tuple[LogStore, str, str]:
    store = request.app[CORE].log_store()
    if store is None:
        raise LogAccessError("This only works if task logs are written (options.logPath)")
    return store, request.match_info["app"], request.match_info["task"]


def _log_error(exc: LogAccessError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=400)


async def logs_list(request: web.Request) -> web.Response:
    try:
        store, app, task = _logs(request)
        files = await asyncio.to_thread(store.list, app, task)
    except LogAccessError as exc:
        return _log_error(exc)
    return web.json_response({"files": files})


def _int_query(request: web.Request, key: str) -> int:
    raw = request.query.get(key, "-1")
    try:
        return int(raw)
    except ValueError:
        raise LogAccessError(f"{key}: {raw!r} is not a number") from None


async def logs_read(request: web.Request) -> web.Response:
    try:
        store, app, task = _logs(request)
        offset, length = _int_query(request, "offset"), _int_query(request, "length")
        data, at = await asyncio.to_thread(
            store.read, app, task, request.match_info["file"], offset, length
        )
    except LogAccessError as exc:
        return _log_error(exc)
    return web.json_response({"data": data, "offset": at})


async def logs_download(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    try:
        store, app, task = _logs(request)
        path = await asyncio.to_thread(store.file, app, task, name)
    except LogAccessError as exc:
        return _log_error(exc)
    kind = mimetypes.guess_type(name)[0] or "text/plain"
    return web.FileResponse(
        path,
        headers={
            "Content-Disposition": f"attachment; filename={name}",
            "Content-Type": kind,
        },
    )


def build_app(core: AgentCore, secrets: tuple[str, ...]) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY)
    app[CORE] = core
    app[SECRETS] = tuple(secrets)
    app.router.add_get("/apis/v1/ping", ping)
    app.router.add_get("/apis/v1/status", status)
    app.router.add_post("/apis/v1/messages", messages)
    app.router.add_get("/apis/v1/tasks", tasks)
    app.router.add_get("/apis/v1/tasks/{instance_id}", task)
    app.router.add_get("/apis/v1/reports", reports)
    app.router.add_get("/apis/v1/agent", agent_view)
    app.router.add_get("/apis/v1/events", events)
    app.router.add_get("/metrics", metrics)
    base = "/apis/v1/logs/filestream/{app}/{task}"
    app.router.add_get(base + "/list", logs_list)
    app.router.add_get(base + "/read/{file}", logs_read)
    app.router.add_get(base + "/download/{file}", logs_download)
    return app
