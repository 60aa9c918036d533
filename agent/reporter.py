"""The controller link (RPC mode, spec §1.2, §1.3): leader discovery, the report outbox with a
single sender, and node snapshots. In standalone mode reports are only kept for local readers.

Reports never hold up task control: ``task_changed`` only appends to the outbox.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

from agent.config import Config, UpdateMode
from agent.node import Node, now_ms

log = structlog.get_logger(__name__)

SNAPSHOT_INTERVAL_S = 20.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
RECENT_REPORTS = 1000


def message_header() -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "senderType": "EXECUTOR",
        "direction": "REQUEST",
        "messageTime": now_ms(),
    }


class ControllerLink:
    def __init__(
        self,
        cfg: Config,
        node: Node,
        tasks: Callable[[], list[dict[str, Any]]],
        on_leader: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self._tasks = tasks
        self._on_leader = on_leader
        self.leader: str | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REPORTS)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._outbox: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._snapshot_due = True
        self._check_leader_now = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.failed_attempts = 0

    @property
    def remote(self) -> bool:
        return self.cfg.mode is UpdateMode.RPC

    @property
    def pending(self) -> int:
        return len(self._outbox)

    # --- tasks.ControllerSink -----------------------------------------------------------------

    def task_changed(self, info: dict[str, Any], snapshot: dict[str, Any]) -> None:
        self._publish(
            {
                "type": "TASK_STATE_REPORT",
                "header": message_header(),
                "resourceSnapshot": snapshot,
                "instanceInfo": info,
            },
            queue=True,
        )

    def resources_changed(self) -> None:
        self._snapshot_due = True
        self._wake.set()

    # --- internals ----------------------------------------------------------------------------

    def _publish(self, message: dict[str, Any], queue: bool) -> None:
        self.recent.append(message)
        for sub in list(self.subscribers):
            if sub.qsize() < 10_000:
                sub.put_nowait(message)
        if queue and self.remote:
            self._outbox.append(message)
            self._drained.clear()
            self._wake.set()

    def snapshot_message(self) -> dict[str, Any]:
        return {
            "type": "EXECUTOR_SNAPSHOT",
            "header": message_header(),
            "nodeData": self.node.node_data(self._tasks()),
        }

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Start the link's long-lived tasks in the agent's TaskGroup."""
        tg.create_task(self._snapshot_ticker(), name="snapshot-ticker")
        if not self.remote:
            return
        timeout = aiohttp.ClientTimeout(
            total=self.cfg.options.controller_connect_timeout_s
            + self.cfg.options.controller_response_timeout_s,
            sock_connect=self.cfg.options.controller_connect_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers={
                "Cluster-Authorization": self.cfg.cluster_auth.executor_secret,
                "NodeId": self.node.hostname,
            },
        )
        await self.find_leader()
        tg.create_task(self._leader_loop(), name="leader-discovery")
        tg.create_task(self._sender(), name="report-sender")

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued report was accepted, at most ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _snapshot_ticker(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.resources_changed()
            if not self.remote:
                self._snapshot_due = False
                self._publish(self.snapshot_message(), queue=False)

    async def find_leader(self) -> str | None:
        """The first endpoint whose ping answers 200 is the leader (spec §1.3)."""
        assert self.cfg.controllers is not None
        assert self._session is not None
        leader = None
        for endpoint in self.cfg.controllers.endpoints:
            try:
                async with self._session.get(f"{endpoint}/apis/v1/ping") as resp:
                    if resp.status == 200:
                        leader = endpoint
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("controller_ping_failed", endpoint=endpoint, error=str(exc))
        if leader != self.leader:
            log.info("controller_leader_changed", leader=leader, previous=self.leader)
            self.leader = leader
            if leader is not None:
                self._retry_now.set()
        if leader is not None:
            self._on_leader()
        return leader

    async def _leader_loop(self) -> None:
        assert self.cfg.controllers is not None
        interval = self.cfg.controllers.leadership_check_interval_s
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._check_leader_now.wait()
            except TimeoutError:
                pass
            self._check_leader_now.clear()
            await self.find_leader()

    async def _post(self, message: dict[str, Any]) -> bool:
        """One attempt; True when the controller answered ACCEPTED."""
        if self.leader is None or self._session is None:
            return False
        try:
            async with self._session.post(f"{self.leader}/apis/v1/messages", json=message) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("report_send_failed", error=str(exc) or type(exc).__name__)
            self._check_leader_now.set()
            return False
        ok = isinstance(body, dict) and str(body.get("status", "")).upper() == "ACCEPTED"
        if not ok:
            self._check_leader_now.set()
        return ok

    async def _sender(self) -> None:
        """The single sender: reports in order, each retried with capped backoff until the
        controller accepts it; a fresh snapshot whenever one is due and no report waits."""
        backoff = BACKOFF_MIN_S
        while True:
            if not self._outbox and not self._snapshot_due:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._outbox:
                message = self._outbox[0]
                ok = await self._post(message)
                if ok:
                    self._outbox.popleft()
                    self.sent += 1
                    if not self._outbox:
                        self._drained.set()
            else:
                self._snapshot_due = False
                snapshot = self.snapshot_message()
                ok = await self._post(snapshot)
                if ok:
                    self._publish(snapshot, queue=False)
                else:
                    self._snapshot_due = True
            if ok:
                backoff = BACKOFF_MIN_S
                continue
            self.failed_attempts += 1
            self._retry_now.clear()
            try:
                async with asyncio.timeout(backoff):
                    await self._retry_now.wait()
            except TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_MAX_S)
