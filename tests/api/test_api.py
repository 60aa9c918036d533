from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from agent import api
from agent.allocator import Allocator
from agent.inventory import NodeLayout
from agent.node import ExecutorState, Node, executor_id


class Core:
    def __init__(self) -> None:
        layout = {0: NodeLayout(0, frozenset({0, 1}), {0: 0, 1: 1}, 1024, 1024)}
        self.node = Node(
            hostname="exec-1.local", port=3000, allocator=Allocator(layout), tags=["gpu"]
        )
        self.node.state = ExecutorState.ACTIVE

    def node_data(self):
        return self.node.node_data()

    def handle_message(self, message):
        return True, ""

    def task_infos(self):
        return []

    def task_info(self, instance_id):
        return None

    def recent_reports(self):
        return []

    def agent_view(self):
        return {}

    def subscribe(self):
        import asyncio

        return asyncio.Queue()

    def unsubscribe(self, queue):
        pass

    def metrics_text(self):
        return b""

    def observe_message(self, kind, seconds):
        pass

    def log_store(self):
        return None


async def client() -> TestClient:
    app = api.build_app(Core(), ("ControllerSecret", "ExecutorSecret"))
    c = TestClient(TestServer(app))
    await c.start_server()
    return c


async def test_ping_needs_no_auth():
    c = await client()
    try:
        resp = await c.get("/apis/v1/ping")
        assert resp.status == 200
    finally:
        await c.close()


async def test_status_without_or_with_wrong_secret_is_401_with_empty_body():
    c = await client()
    try:
        for headers in ({}, {"Cluster-Authorization": "wrong"}, {"Cluster-Authorization": ""}):
            resp = await c.get("/apis/v1/status", headers=headers)
            assert resp.status == 401
            assert await resp.read() == b""
    finally:
        await c.close()


async def test_status_with_either_secret_returns_node_data():
    c = await client()
    try:
        for secret in ("ControllerSecret", "ExecutorSecret"):
            resp = await c.get("/apis/v1/status", headers={"Cluster-Authorization": secret})
            assert resp.status == 200
            data = await resp.json()
            assert data["type"] == "EXECUTOR"
            assert data["hostname"] == "exec-1.local"
            assert data["port"] == 3000
            assert data["executorState"] == "ACTIVE"
            assert data["tags"] == ["exec-1.local", "gpu"]
            assert data["tasks"] == []
            assert data["state"]["executorId"] == executor_id("exec-1.local", 3000)
            assert data["state"]["layout"] == {"cores": {"0": [0, 1]}, "memory": {"0": 1024}}
    finally:
        await c.close()


def test_executor_id_matches_java_name_uuid():
    # Java 17: UUID.nameUUIDFromBytes("exec-1.local:3000".getBytes()) printed this value
    assert executor_id("exec-1.local", 3000) == "47ae6651-ccb0-3ae5-b5f8-85aa1e75bd3f"


def test_node_data_updated_strictly_increases():
    core = Core()
    stamps = [core.node.node_data()["updated"] for _ in range(50)]
    assert stamps == sorted(set(stamps))
