"""The controller link against a real aiohttp controller stand-in on loopback."""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent import reporter
from agent.allocator import Allocator
from agent.app import Agent
from agent.config import Config, ControllersConfig, UpdateMode
from agent.inventory import NodeLayout
from agent.journal import Journal
from agent.node import ExecutorState, Node
from agent.reporter import ControllerLink
from tests.helpers import free_port


def make(port, tmp_path):
    cfg = Config(
        controllers=ControllersConfig(
            endpoints=(f"http://127.0.0.1:{port}",), leadership_check_interval_s=3
        ),
        mode=UpdateMode.RPC,
    )
    layout = {0: NodeLayout(0, frozenset({0}), {0: 0}, 100, 100)}
    node = Node(hostname="h", port=1, allocator=Allocator(layout), state=ExecutorState.ACTIVE)
    link = ControllerLink(cfg, node, tasks=lambda: [])
    journal = Journal(tmp_path)
    link.attach_journal(journal, journal.open())
    return link


async def ping(request):
    return web.json_response({"status": "SUCCESS"})


async def serve(handler):
    app = web.Application()
    app.router.add_get("/apis/v1/ping", ping)
    app.router.add_post("/apis/v1/messages", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


class _Done(Exception):
    pass


async def run_link(link, body):
    """Run the link's loops in a TaskGroup while ``body`` runs, then end them all."""
    try:
        async with asyncio.TaskGroup() as tg:
            await link.run(tg)
            await body()
            raise _Done
    except* _Done:
        pass


def report(n):
    return {"instanceId": f"TI-{n}", "state": "RUNNING", "updated": n}


async def test_a_report_the_leader_refuses_is_dropped_and_snapshots_keep_flowing(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(reporter, "BACKOFF_MAX_S", 0.01)
    monkeypatch.setattr(reporter, "SNAPSHOT_INTERVAL_S", 0.2)
    seen = []

    async def handler(request):
        body = await request.json()
        seen.append(body)
        if body.get("instanceInfo", {}).get("instanceId") == "TI-bad":
            return web.json_response(
                {"status": "FAILED", "message": "Unable to process JSON"}, status=422
            )
        return web.json_response({"header": body["header"], "status": "ACCEPTED"})

    runner, port = await serve(handler)
    link = make(port, tmp_path)

    async def body():
        link.enable_snapshots()
        link.task_changed(report("bad"), {})
        link.task_changed(report("good"), {})
        await link.persisted()
        assert await link.flush(10)
        await asyncio.sleep(0.3)  # a snapshot is due again by now

    try:
        await run_link(link, body)
    finally:
        await link.close()
        await runner.cleanup()
    bad = [m for m in seen if m.get("instanceInfo", {}).get("instanceId") == "TI-bad"]
    assert len(bad) == reporter.MAX_REJECTIONS
    assert any(m.get("instanceInfo", {}).get("instanceId") == "TI-good" for m in seen)
    assert any(m["type"] == "EXECUTOR_SNAPSHOT" for m in seen)
    assert Journal(tmp_path).open() == []


async def test_a_non_leader_answer_is_retried_not_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(reporter, "BACKOFF_MAX_S", 0.01)
    answers = {"n": 0}

    async def handler(request):
        body = await request.json()
        if body["type"] == "TASK_STATE_REPORT":
            answers["n"] += 1
            if answers["n"] <= reporter.MAX_REJECTIONS + 5:
                return web.json_response(
                    {"status": "FAILED", "message": "This node is not the leader controller"},
                    status=400,
                )
        return web.json_response({"header": body["header"], "status": "ACCEPTED"})

    runner, port = await serve(handler)
    link = make(port, tmp_path)

    async def body():
        link.task_changed(report(1), {})
        assert await link.flush(10)

    try:
        await run_link(link, body)
    finally:
        await link.close()
        await runner.cleanup()
    assert answers["n"] == reporter.MAX_REJECTIONS + 6
    assert link.sent == 1


def test_executor_is_not_activated_before_recovery():
    agent = Agent(Config())
    layout = {0: NodeLayout(0, frozenset({0}), {0: 0}, 100, 100)}
    agent.node = Node(hostname="h", port=1, allocator=Allocator(layout))
    agent._activate()
    assert agent.node.state is ExecutorState.UNREADY
    agent.ready.set()
    agent._activate()
    assert agent.node.state is ExecutorState.ACTIVE
