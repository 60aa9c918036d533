"""Composition root: builds the components, owns the TaskGroup and the shutdown order."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent import api, sdnotify
from agent.allocator import Allocator
from agent.config import Config, UpdateMode
from agent.containers import ContainerRuntime
from agent.errors import AgentError
from agent.inventory import HostInventory, build_inventory, read_topology
from agent.journal import Journal
from agent.metrics import Metrics
from agent.models import UNSUPPORTED_TYPES, ExecutorMessage, MessageType
from agent.node import ExecutorState, Node, canonical_hostname
from agent.recovery import Reaper, recover
from agent.reporter import ControllerLink
from agent.tasklogs import LogStore
from agent.tasks import TaskManager

log = structlog.get_logger(__name__)

SHUTDOWN_FLUSH_S = 10.0


def discover(cfg: Config, sysfs_root: Path = Path("/sys")) -> HostInventory:
    return build_inventory(read_topology(sysfs_root), cfg.resources)


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel every owned task at shutdown."""


class Agent:
    def __init__(
        self,
        cfg: Config,
        sysfs_root: Path = Path("/sys"),
        runtime: ContainerRuntime | None = None,
    ) -> None:
        self.cfg = cfg
        self.sysfs_root = sysfs_root
        self.stop_requested = asyncio.Event()
        self._runtime = runtime
        self._signals = 0
        self.node: Node | None = None
        self.manager: TaskManager | None = None
        self.link: ControllerLink | None = None
        self.ready = asyncio.Event()  # recovery done and the API bound
        self.metrics = Metrics()
        self.inventory: HostInventory | None = None
        self.logs = LogStore(Path(cfg.options.log_path))
        self.started_at = time.time()
        self.runtime: ContainerRuntime | None = None

    # --- api.AgentCore -------------------------------------------------------------------------

    def node_data(self) -> dict[str, Any]:
        assert self.node is not None
        assert self.manager is not None
        return self.node.node_data(self.manager.task_infos(include_finished=False))

    def task_infos(self) -> list[dict[str, Any]]:
        assert self.manager is not None
        return self.manager.task_infos()

    def task_info(self, instance_id: str) -> dict[str, Any] | None:
        assert self.manager is not None
        rec = self.manager.get(instance_id)
        return rec.to_wire() if rec is not None else None

    def recent_reports(self) -> list[dict[str, Any]]:
        assert self.link is not None
        return list(self.link.recent)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        assert self.link is not None
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.link.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        if self.link is not None:
            self.link.subscribers.discard(queue)

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def observe_message(self, kind: str, seconds: float) -> None:
        self.metrics.messages.labels(kind).observe(seconds)

    def log_store(self) -> LogStore | None:
        return self.logs

    def _metrics_view(self) -> dict[str, Any]:
        assert self.node is not None
        by_state: dict[str, int] = {}
        if self.manager is not None:
            for rec in self.manager.active():
                by_state[str(rec.state)] = by_state.get(str(rec.state), 0) + 1
        link = self.link
        return {
            "snapshot": self.node.resource_snapshot(),
            "tasks_by_state": by_state,
            "queued": link.pending if link else 0,
            "send_failures": link.failed_attempts if link else 0,
            "sent": link.sent if link else 0,
            "docker_up": 1 if self.manager is None or self.manager.docker_ok else 0,
            "usage": self.manager.usage() if self.manager else [],
        }

    def agent_view(self) -> dict[str, Any]:
        """What an operator wants to see (``drove-agent status``)."""
        assert self.node is not None
        assert self.manager is not None
        assert self.inventory is not None
        allocator = self.node.allocator
        owners: dict[str, dict[str, str]] = {}
        for iid, request in allocator.locks().items():
            for node_id, cores in request.cores.items():
                for core in cores:
                    owners.setdefault(str(node_id), {})[str(core)] = iid
        snapshot = self.node.resource_snapshot()
        nodes = []
        for node_id, layout in sorted(allocator.layout.items()):
            key = str(node_id)
            physical = [n for n in self.inventory.nodes if n.node == node_id]
            nodes.append(
                {
                    "node": node_id,
                    "cores": {
                        "allocatable": sorted(layout.cores),
                        "free": snapshot["cpus"]["freeCores"].get(key, []),
                        "used": owners.get(key, {}),
                        "reserved": sorted(c for n in physical for c in n.reserved),
                        "offline": sorted(c for n in physical for c in n.offline),
                    },
                    "memory": {
                        "exposed": layout.memory_mb,
                        "used": snapshot["memory"]["usedMemory"].get(key, 0),
                        "free": snapshot["memory"]["freeMemory"].get(key, 0),
                    },
                }
            )
        tasks = []
        for rec in self.manager.records.values():
            info = rec.to_wire()
            percent = rec.pull_progress.percent
            if rec.state.value == "PROVISIONING" and percent is not None:
                info["pullProgress"] = round(percent, 1)
            tasks.append(info)
        return {
            "executorId": self.node.executor_id,
            "hostname": self.node.hostname,
            "port": self.node.port,
            "mode": str(self.cfg.mode),
            "executorState": str(self.node.state),
            "leader": self.link.leader if self.link else None,
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "ready": self.ready.is_set(),
            "docker": {"ok": self.manager.docker_ok, "error": self.manager.docker_error},
            "numaPinning": self.inventory.numa_pinning,
            "nodes": nodes,
            "tasks": tasks,
            "reports": {
                "queued": self.link.pending if self.link else 0,
                "sent": self.link.sent if self.link else 0,
                "failedAttempts": self.link.failed_attempts if self.link else 0,
            },
        }

    def handle_message(self, message: ExecutorMessage) -> tuple[bool, str]:
        assert self.manager is not None
        kind = message.type
        with structlog.contextvars.bound_contextvars(message_id=message.message_id):
            if kind is MessageType.START_TASK:
                assert message.spec is not None
                verdict = self.manager.start(message.spec, message.message_id)
            elif kind is MessageType.STOP_TASK:
                assert message.instance_id is not None
                verdict = self.manager.stop(message.instance_id)
            elif kind in UNSUPPORTED_TYPES:
                return False, f"{kind} is not supported yet by this executor (it runs tasks only)"
            else:
                self._executor_command(kind)
                return True, ""
        if not verdict.accepted:
            log.warning("message_failed", type=str(kind), reason=verdict.message)
        return verdict.accepted, verdict.message

    # --- executor state (spec §6.5) ------------------------------------------------------------

    def _executor_command(self, kind: MessageType) -> None:
        if kind is MessageType.BLACKLIST_REQUESTED:
            self._set_state(ExecutorState.BLACKLIST_REQUESTED)
        elif kind is MessageType.BLACKLIST:
            self._set_state(ExecutorState.BLACKLISTED)
        elif kind is MessageType.UNBLACKLIST:
            self._set_state(ExecutorState.UNREADY)
            self._activate()

    def _set_state(self, state: ExecutorState) -> None:
        assert self.node is not None
        if self.node.state is state:
            return
        log.info("executor_state_changed", old=str(self.node.state), new=str(state))
        self.node.state = state
        if self.link is not None:
            self.link.resources_changed()

    def _activate(self) -> None:
        """UNREADY -> ACTIVE once recovery is done and a leader answers (at once in standalone
        mode): until then the resources of containers not yet re-attached are not locked."""
        if self.node is None or self.node.state is not ExecutorState.UNREADY:
            return
        if not self.ready.is_set():
            return
        if self.cfg.mode is UpdateMode.STANDALONE or (self.link and self.link.leader):
            self._set_state(ExecutorState.ACTIVE)

    # --- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("agent_forced_exit")
            raise SystemExit(1)
        log.info("agent_stop_requested")
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _make_runtime(self) -> ContainerRuntime:
        if self._runtime is not None:
            return self._runtime
        from agent.runtime import DockerRuntime

        opts = self.cfg.options
        return DockerRuntime(
            socket_path=opts.docker_socket_path,
            command_timeout_s=opts.container_command_timeout_s,
            pool_size=opts.docker_pool_size,
            observe=self._observe_docker,
        )

    def _observe_docker(self, call: str, seconds: float, ok: bool) -> None:
        self.metrics.docker_calls.labels(call).observe(seconds)
        if not ok:
            self.metrics.docker_errors.labels(call).inc()

    async def _run(self) -> int:
        cfg = self.cfg
        for warning in cfg.warnings:
            log.warning("config_warning", detail=warning)
        self.inventory = inventory = await asyncio.to_thread(discover, cfg, self.sysfs_root)
        hostname: str = cfg.options.hostname or ""
        if not hostname:
            hostname = await asyncio.to_thread(canonical_hostname)
        journal: Journal | None = None
        pending: list[tuple[int, dict[str, Any]]] = []
        if cfg.mode is UpdateMode.RPC:
            journal = Journal(Path(cfg.options.state_dir))
            try:
                pending = await asyncio.to_thread(journal.open)
            except OSError as exc:
                log.error(
                    "state_dir_unusable",
                    key="options.stateDir",
                    path=cfg.options.state_dir,
                    error=exc.strerror or str(exc),
                )
                return 1
        self.runtime = runtime = self._make_runtime()

        runner = web.AppRunner(
            api.build_app(self, cfg.cluster_auth.accepted()), access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, cfg.server.host, cfg.server.port)
        await site.start()
        port = _bound_port(runner, cfg.server.port)
        self.node = node = Node(
            hostname=hostname,
            port=port,
            allocator=Allocator(inventory.layout),
            tags=cfg.resources.tags,
            metadata=cfg.resources.metadata,
        )
        self.link = link = ControllerLink(
            cfg,
            node,
            tasks=lambda: self.manager.task_infos(include_finished=False) if self.manager else [],
            on_leader=self._activate,
        )
        _log_start(cfg, node, inventory)
        try:
            if journal is not None:
                link.attach_journal(journal, pending)
            async with asyncio.TaskGroup() as tg:

                def spawn(coro: Any, name: str) -> asyncio.Task[None]:
                    return tg.create_task(coro, name=name)

                self.manager = manager = TaskManager(
                    cfg=cfg,
                    node=node,
                    runtime=runtime,
                    sink=link,
                    spawn=spawn,
                    logs=self.logs,
                    metrics=self.metrics,
                )
                self.metrics.attach(self._metrics_view)
                watchdog = sdnotify.watchdog_interval_s()
                if watchdog is not None:
                    tg.create_task(self._watchdog(watchdog), name="watchdog")
                runtime.start_events(manager.on_event)
                await link.run(tg)
                if await self._recover(manager, runtime, link):
                    link.enable_snapshots()
                    self.ready.set()
                    self._activate()
                    sdnotify.notify("READY=1\nSTATUS=ready")
                    log.info("agent_ready", tasks=len(manager.active()))
                    # Start-up objects never die: keep them out of the collector's full passes.
                    gc.freeze()
                    tg.create_task(manager.relist_forever(), name="relist")
                    tg.create_task(
                        manager.sample_usage_forever(self.sysfs_root / "fs/cgroup", Path("/proc")),
                        name="usage-sampler",
                    )
                    reaper = Reaper(cfg, manager, runtime, self._current, node.executor_id)
                    tg.create_task(reaper.run_forever(), name="reaper")
                    await self.stop_requested.wait()
                await self._shutdown(runner)
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            await runner.cleanup()
            await link.close()
            await runtime.close()
        log.info("agent_stopped")
        return 0

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 from the event loop itself: a stuck loop stops the pings and systemd
        restarts the agent."""
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _current(self, executor_id: str) -> Any:
        assert self.link is not None
        return await self.link.known_instances(executor_id, "current")

    async def _recover(
        self, manager: TaskManager, runtime: ContainerRuntime, link: ControllerLink
    ) -> bool:
        """Recovery before ready; while Docker does not answer, keep trying (the API serves and
        the executor stays UNREADY). False when a stop came first."""
        assert self.node is not None
        backoff = 0.5
        while not self.stop_requested.is_set():
            known = await link.known_instances(self.node.executor_id, "last")
            try:
                result = await recover(manager, runtime, known)
            except AgentError as exc:
                log.warning("recovery_waiting_for_docker", error=str(exc), retry_s=backoff)
                try:
                    async with asyncio.timeout(backoff):
                        await self.stop_requested.wait()
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)
                continue
            log.info("recovery_done", adopted=len(result.adopted), skipped=len(result.skipped))
            return True
        return False

    async def _shutdown(self, runner: web.AppRunner) -> None:
        """Refuse new starts, stop serving, flush reports. Containers keep running."""
        assert self.manager is not None
        assert self.link is not None
        sdnotify.notify("STOPPING=1")
        self.manager.accepting = False
        try:
            async with asyncio.timeout(10):
                await runner.cleanup()
        except TimeoutError:
            log.warning("shutdown_stage_timed_out", stage="http")
        if self.link.remote and not await self.link.flush(SHUTDOWN_FLUSH_S):
            log.warning("shutdown_stage_timed_out", stage="report_flush", pending=self.link.pending)


def _log_start(cfg: Config, node: Node, inventory: HostInventory) -> None:
    log.info(
        "agent_started",
        executor_id=node.executor_id,
        hostname=node.hostname,
        host=cfg.server.host,
        port=node.port,
        mode=str(cfg.mode),
        numa_pinning=inventory.numa_pinning,
        nodes=[
            {
                "node": n.node,
                "cores": list(n.allocatable),
                "reserved": list(n.reserved),
                "offline": list(n.offline),
                "memory_total_mb": n.memory_total_mb,
                "memory_exposed_mb": n.memory_exposed_mb,
            }
            for n in inventory.nodes
        ],
    )


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured
