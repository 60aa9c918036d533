"""The executor's own identity and state: executor id, hostname, ExecutorState, node data."""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from agent.allocator import Allocator


class ExecutorState(StrEnum):
    ACTIVE = "ACTIVE"
    BLACKLIST_REQUESTED = "BLACKLIST_REQUESTED"
    BLACKLISTED = "BLACKLISTED"
    UNREADY = "UNREADY"
    REMOVED = "REMOVED"


def executor_id(hostname: str, port: int) -> str:
    """Java's ``UUID.nameUUIDFromBytes("host:port")``: an MD5, version-3 UUID with no namespace."""
    digest = hashlib.md5(f"{hostname}:{port}".encode(), usedforsecurity=False).digest()
    return str(uuid.UUID(bytes=digest, version=3))


def canonical_hostname() -> str:
    return socket.getfqdn() or socket.gethostname()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Node:
    """Holds what ``ExecutorNodeData`` is built from (spec §4.4)."""

    def __init__(
        self,
        *,
        hostname: str,
        port: int,
        allocator: Allocator,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        state: ExecutorState = ExecutorState.UNREADY,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.executor_id = executor_id(hostname, port)
        self.allocator = allocator
        self.tags = [hostname, *[t for t in tags if t != hostname]]
        self.metadata = dict(metadata or {})
        self.state = state
        self.started_at = time.time()
        self._last_updated = 0

    def fresh_updated(self) -> int:
        """A strictly increasing epoch-ms timestamp for node data."""
        self._last_updated = max(now_ms(), self._last_updated + 1)
        return self._last_updated

    def resource_snapshot(self) -> dict[str, Any]:
        return self.allocator.snapshot(self.executor_id)

    def node_data(self, tasks: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        return {
            "type": "EXECUTOR",
            "hostname": self.hostname,
            "port": self.port,
            "transportType": "HTTP",
            "updated": self.fresh_updated(),
            "state": self.resource_snapshot(),
            "instances": [],
            "tasks": list(tasks),
            "serviceInstances": [],
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
            "executorState": str(self.state),
        }
