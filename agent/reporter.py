"""The controller link (RPC mode, spec §1.2, §1.3): leader discovery, the report outbox with a
single sender, and node snapshots. In standalone mode reports are only kept for local readers.

Reports never hold up task control: ``task_changed`` only appends to the outbox. In RPC mode every
report is written to the journal (one writer thread, fsynced) before it is first sent, and stays
there until the controller answers ACCEPTED, across restarts and crashes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp
import structlog

from agent.config import Config, UpdateMode
from agent.journal import Journal
from agent.node import Node, now_ms
from agent.recovery import KnownInstances

log = structlog.get_logger(__name__)

SNAPSHOT_INTERVAL_S = 20.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
RECENT_REPORTS = 1000
MAX_REJECTIONS = 10  # a report the leader refuses this often is dropped, with an error log


def message_header() -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "senderType": "EXECUTOR",
        "direction": "REQUEST",
        "messageTime": now_ms(),
    }


class Delivery(Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # no leader, a network error, a non-leader or a passing failure
    REJECTED = "rejected"  # the controller refuses this very message


@dataclass(slots=True)
class _Outgoing:
    seq: int
    message: dict[str, Any]
    written: asyncio.Future[None] | None


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
        self._outbox: deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        self._snapshot_due = True
        self.snapshots_enabled = False
        self._journal: Journal | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._last_written: asyncio.Future[None] | None = None
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
            written: asyncio.Future[None] | None = None
            seq = 0
            if self._journal is not None and self._writer is not None:
                seq = self._journal.next_seq()
                loop = asyncio.get_running_loop()
                written = loop.run_in_executor(self._writer, self._journal.append, seq, message)
                self._last_written = written
            self._outbox.append(_Outgoing(seq, message, written))
            self._drained.clear()
            self._wake.set()

    def snapshot_message(self) -> dict[str, Any]:
        return {
            "type": "EXECUTOR_SNAPSHOT",
            "header": message_header(),
            "nodeData": self.node.node_data(self._tasks()),
        }

    def attach_journal(self, journal: Journal, pending: list[tuple[int, dict[str, Any]]]) -> None:
        """Use ``journal``; the reports a previous run left unsent go out first."""
        self._journal = journal
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        for seq, message in pending:
            self._outbox.append(_Outgoing(seq, message, None))
        if pending:
            self._drained.clear()
            self._wake.set()
            log.info("report_journal_replayed", reports=len(pending))

    async def known_instances(self, executor_id: str, which: str) -> KnownInstances:
        """The controller's KnownInstancesData for this executor (``last`` or ``current``)."""
        if self.leader is None or self._session is None:
            return None
        url = f"{self.leader}/apis/v1/internal/cluster/executors/{executor_id}/instances/{which}"
        try:
            async with self._session.get(url) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info(
                "known_instances_unavailable", which=which, error=str(exc) or type(exc).__name__
            )
            return None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            return None
        current = data.get("taskInstanceIds") or []
        stale = data.get("staleTaskInstanceIds") or []
        return frozenset(map(str, current)), frozenset(map(str, stale))

    def enable_snapshots(self) -> None:
        self.snapshots_enabled = True
        self.resources_changed()

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
        if self._writer is not None:
            await asyncio.to_thread(self._writer.shutdown, wait=True)
            self._writer = None
        if self._journal is not None:
            self._journal.close()

    async def _snapshot_ticker(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            self.resources_changed()
            if not self.remote and self.snapshots_enabled:
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

    async def _post(self, message: dict[str, Any]) -> Delivery:
        """One attempt. REJECTED only when the controller refuses this very message (a 4xx that
        is not about leadership or auth); anything else that is not ACCEPTED may pass."""
        if self.leader is None or self._session is None:
            return Delivery.RETRY
        try:
            async with self._session.post(f"{self.leader}/apis/v1/messages", json=message) as resp:
                status = resp.status
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("report_send_failed", error=str(exc) or type(exc).__name__)
            self._check_leader_now.set()
            return Delivery.RETRY
        if status == 200:
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if isinstance(body, dict) and str(body.get("status", "")).upper() == "ACCEPTED":
                return Delivery.ACCEPTED
        self._check_leader_now.set()
        if 400 <= status < 500 and status != 401 and "leader" not in text.lower():
            return Delivery.REJECTED
        return Delivery.RETRY

    async def persisted(self) -> None:
        """Return once every report handed over so far is on disk (at most 10 s)."""
        written = self._last_written
        if written is None or written.done():
            return
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(written)
        except (TimeoutError, OSError) as exc:
            log.warning("report_journal_not_confirmed", error=str(exc) or type(exc).__name__)

    async def _written(self, head: _Outgoing) -> None:
        """A report is on disk before it is first sent; a failed write is logged, and the report
        is sent all the same (better sent without a journal than not at all)."""
        if head.written is None:
            return
        try:
            await head.written
        except OSError as exc:
            log.error("report_journal_write_failed", error=str(exc))
        head.written = None

    def _acknowledge(self, seq: int) -> None:
        if self._journal is None or self._writer is None or not seq:
            return
        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._writer, self._journal.ack, seq).add_done_callback(_log_failure)

    async def _sender(self) -> None:
        """The single sender: reports in order, each retried with capped backoff until the
        controller accepts it; a fresh snapshot whenever one is due and no report waits, and at
        least every 20 s even behind a backlog (so the controller never drops the executor)."""
        backoff = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        last_snapshot = loop.time()
        rejections = 0
        while True:
            snapshot_due = self._snapshot_due and self.snapshots_enabled
            if not self._outbox and not snapshot_due:
                self._wake.clear()
                await self._wake.wait()
                continue
            overdue = snapshot_due and loop.time() - last_snapshot >= SNAPSHOT_INTERVAL_S
            if self._outbox and not overdue:
                head = self._outbox[0]
                await self._written(head)
                outcome = await self._post(head.message)
                if outcome is Delivery.REJECTED:
                    rejections += 1
                    if rejections >= MAX_REJECTIONS:
                        log.error(
                            "report_rejected_dropped",
                            attempts=rejections,
                            type=head.message.get("type"),
                            instance_id=head.message.get("instanceInfo", {}).get("instanceId"),
                            state=head.message.get("instanceInfo", {}).get("state"),
                        )
                        outcome = Delivery.ACCEPTED  # give it up like an accepted one
                if outcome is Delivery.ACCEPTED:
                    rejections = 0
                    self._outbox.popleft()
                    self.sent += 1
                    self._acknowledge(head.seq)
                    if not self._outbox:
                        self._drained.set()
            else:
                self._snapshot_due = False
                snapshot = self.snapshot_message()
                outcome = await self._post(snapshot)
                if outcome is Delivery.ACCEPTED:
                    last_snapshot = loop.time()
                    self._publish(snapshot, queue=False)
                else:
                    self._snapshot_due = True
            if outcome is Delivery.ACCEPTED:
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


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("report_journal_ack_failed", error=str(future.exception()))
