"""Composition root: builds the components, owns the TaskGroup and the shutdown order."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent import api
from agent.allocator import Allocator
from agent.config import Config, UpdateMode
from agent.inventory import HostInventory, build_inventory, read_topology
from agent.node import ExecutorState, Node, canonical_hostname

log = structlog.get_logger(__name__)


def discover(cfg: Config, sysfs_root: Path = Path("/sys")) -> HostInventory:
    return build_inventory(read_topology(sysfs_root), cfg.resources)


class Agent:
    def __init__(self, cfg: Config, sysfs_root: Path = Path("/sys")) -> None:
        self.cfg = cfg
        self.sysfs_root = sysfs_root
        self.stop_requested = asyncio.Event()
        self.node: Node | None = None
        self._signals = 0

    # --- api.AgentCore -------------------------------------------------------------------------
    def node_data(self) -> dict[str, Any]:
        assert self.node is not None
        return self.node.node_data()

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

    async def _run(self) -> int:
        cfg = self.cfg
        for warning in cfg.warnings:
            log.warning("config_warning", detail=warning)
        inventory = await asyncio.to_thread(discover, cfg, self.sysfs_root)
        allocator = Allocator(inventory.layout)
        hostname = cfg.options.hostname or canonical_hostname()

        runner = web.AppRunner(api.build_app(self, cfg.cluster_auth.accepted()), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.server.host, cfg.server.port)
        await site.start()
        port = _bound_port(runner, cfg.server.port)
        state = ExecutorState.ACTIVE if cfg.mode is UpdateMode.STANDALONE else ExecutorState.UNREADY
        self.node = Node(
            hostname=hostname,
            port=port,
            allocator=allocator,
            tags=cfg.resources.tags,
            metadata=cfg.resources.metadata,
            state=state,
        )
        log.info(
            "agent_started",
            executor_id=self.node.executor_id,
            hostname=hostname,
            host=cfg.server.host,
            port=port,
            mode=str(cfg.mode),
            executor_state=str(state),
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
        try:
            await self.stop_requested.wait()
        finally:
            try:
                async with asyncio.timeout(10):
                    await runner.cleanup()
            except TimeoutError:
                log.warning("shutdown_stage_timed_out", stage="http")
        log.info("agent_stopped")
        return 0


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured
