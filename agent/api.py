"""The agent's HTTP API (aiohttp). Handlers stay thin: parse, call the core, serialise."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from agent.errors import AgentError, MessageError, TaskNotFound
from agent.models import ExecutorMessage, parse_executor_message

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


CORE = web.AppKey("core", AgentCore)
SECRETS = web.AppKey("secrets", tuple[str, ...])

_OPEN_PATHS = frozenset({"/apis/v1/ping"})


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
    return web.json_response(reply)


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
    return app
