"""Property-based fuzzing (hypothesis): malformed and hostile ExecutorMessages and config files.

The endpoint never answers 5xx, never shows a traceback, and never leaves a lock or a container
behind. ``make fuzz`` runs at least 10,000 cases per target (FUZZ_EXAMPLES); ``make test`` a short
run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import urllib.error
import urllib.request
from typing import Any

import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import api
from agent.allocator import Allocator
from agent.app import Agent
from agent.config import Config, ConfigError, load_config, parse_config
from agent.errors import MessageError
from agent.inventory import NodeLayout
from agent.models import parse_executor_message
from agent.node import ExecutorState, Node
from agent.reporter import ControllerLink
from agent.tasks import TaskManager
from tests.conftest import start_message
from tests.fakes import FakeRuntime
from tests.helpers import CONTROLLER_SECRET, free_port

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 150,  # make test: the same short run every time
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(
        ["", "START_TASK", "STOP_TASK", "0", "-1", "../../etc/passwd", "\x00", "%s%n", "☃" * 50]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

BASE = start_message("TI-fuzz", ["true"], cores={"0": [1]}, memory={"0": 8})
BASE["spec"]["configs"] = [{"type": "INLINE", "localFilename": "/f", "data": "eA=="}]
BASE["spec"]["volumes"] = [{"pathInContainer": "/d", "pathOnHost": "/tmp", "mode": "READ_ONLY"}]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(BASE) if p]


@st.composite
def mutated_messages(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values)
    msg = copy.deepcopy(BASE)
    if draw(st.booleans()):
        msg["type"] = draw(
            st.sampled_from(
                ["START_TASK", "STOP_TASK", "BLACKLIST", "start_task", "START_INSTANCE"]
            )
        )
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        target = msg
        try:
            for key in path[:-1]:
                target = target[key]
            if draw(st.integers(0, 3)) == 0:
                del target[path[-1]]
            else:
                target[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return msg


# --- the parser ----------------------------------------------------------------------------------


@FUZZ
@given(mutated_messages())
def test_parser_raises_only_message_errors(body):
    try:
        parse_executor_message(body)
    except MessageError as exc:
        assert str(exc)
        assert "Traceback" not in str(exc)


# --- the endpoint --------------------------------------------------------------------------------


class Server:
    """A whole agent core (real TaskManager, fake runtime) behind the real aiohttp app, in a
    thread of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self.ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        cfg = Config()
        layout = {0: NodeLayout(0, frozenset({0, 1}), {0: 0, 1: 1}, 1024, 1024)}
        self.agent = agent = Agent(cfg)
        agent.node = Node(
            hostname="fuzz", port=self.port, allocator=Allocator(layout), state=ExecutorState.ACTIVE
        )
        agent.link = ControllerLink(cfg, agent.node, tasks=lambda: [])
        self.runtime = FakeRuntime()
        self.tasks: set[asyncio.Task[None]] = set()

        def spawn(coro, name):
            task = self.loop.create_task(coro, name=name)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return task

        agent.manager = TaskManager(
            cfg=cfg, node=agent.node, runtime=self.runtime, sink=agent.link, spawn=spawn
        )
        self.runtime.start_events(agent.manager.on_event)
        agent.inventory = None
        runner = web.AppRunner(
            api.build_app(agent, (*cfg.cluster_auth.accepted(), CONTROLLER_SECRET))
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()

    def call(self, fn):
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(30)

    def post(self, data: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/apis/v1/messages", data=data, method="POST"
        )
        req.add_header("Cluster-Authorization", CONTROLLER_SECRET)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def settle(self) -> None:
        """Stop whatever was accepted, let every task end, and check nothing is left."""

        async def run() -> None:
            manager = self.agent.manager
            for rec in manager.active():
                manager.stop(rec.instance_id)
            for cid, c in list(self.runtime.containers.items()):
                if c["running"]:
                    self.runtime.exit(cid, 0)
            async with asyncio.timeout(10):
                while manager.active():
                    await asyncio.sleep(0.001)
            manager.records.clear()

        self.call(run)
        assert self.agent.node.allocator.is_free(), self.agent.node.allocator.locks()
        assert self.runtime.containers == {}


_server: Server | None = None


def server() -> Server:
    global _server
    if _server is None:
        _server = Server()
    return _server


def _check(status: int, body: bytes, srv: Server) -> None:
    assert status < 500, (status, body[:500])
    assert b"Traceback" not in body
    if status == 400:
        reply = json.loads(body)
        assert reply["error"] == "bad_message"
        assert ": " in reply["message"]
        # a refused message locks nothing and registers nothing
        assert srv.agent.node.allocator.is_free()
        assert not srv.agent.manager.active()
    srv.settle()


@FUZZ
@given(mutated_messages())
def test_endpoint_survives_hostile_messages(body):
    srv = server()
    status, raw = srv.post(json.dumps(body).encode())
    _check(status, raw, srv)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_endpoint_survives_garbage_bodies(data):
    srv = server()
    status, raw = srv.post(data)
    _check(status, raw, srv)


# --- config files --------------------------------------------------------------------------------

SECTIONS = [
    "server",
    "options",
    "resources",
    "controllers",
    "zookeeper",
    "clusterAuth",
    "dockerAuth",
    "logging",
]
config_docs = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    json_values
    | st.dictionaries(
        st.sampled_from(
            [
                "port",
                "hostname",
                "osCores",
                "exposedMemPercentage",
                "endpoints",
                "secrets",
                "cacheImages",
                "overProvisioning",
                "containerCommandTimeout",
                "logBufferSize",
                "entries",
                "metadata",
            ]
        ),
        json_values,
        max_size=5,
    ),
    max_size=6,
)


@FUZZ
@given(config_docs)
def test_config_parser_raises_only_config_errors(doc):
    try:
        cfg = parse_config(doc)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert ": " in problem
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(st.text(max_size=400) | config_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
def test_config_files_raise_only_config_errors(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, env={"A": "1"})
    except ConfigError as exc:
        assert exc.problems
