"""Resource accounting per instanceId (spec §4.2, §4.4). Pure: no I/O, no asyncio.

Cores are the ids of the layout (virtual ids under over-provisioning); ``physical_cores`` maps a
lock back to the physical cores a container is pinned to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import (
    AlreadyLocked,
    CoresUnavailable,
    InsufficientMemory,
    InvalidRequest,
    UnknownNode,
)
from agent.inventory import NodeLayout, format_cpulist


@dataclass(frozen=True, slots=True)
class ResourceRequest:
    """Cores and memory (MB) per NUMA node, as in a TaskInstanceSpec's resources."""

    cores: Mapping[int, frozenset[int]]
    memory_mb: Mapping[int, int]

    @property
    def total_cores(self) -> int:
        return sum(len(c) for c in self.cores.values())

    @property
    def total_memory_mb(self) -> int:
        return sum(self.memory_mb.values())

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.cores) | set(self.memory_mb)))


class Allocator:
    def __init__(self, layout: Mapping[int, NodeLayout]) -> None:
        self._layout = dict(layout)
        self._free_cores: dict[int, set[int]] = {n: set(v.cores) for n, v in layout.items()}
        self._free_memory: dict[int, int] = {n: v.memory_mb for n, v in layout.items()}
        self._locks: dict[str, ResourceRequest] = {}

    @property
    def layout(self) -> Mapping[int, NodeLayout]:
        return self._layout

    def locks(self) -> Mapping[str, ResourceRequest]:
        return dict(self._locks)

    def lock(self, instance_id: str, request: ResourceRequest) -> None:
        """Take the cores and memory for ``instance_id``, or raise without changing anything."""
        if instance_id in self._locks:
            raise AlreadyLocked(f"resources for {instance_id} are already locked")
        self._check(request)
        for node, cores in request.cores.items():
            self._free_cores[node] -= cores
        for node, mb in request.memory_mb.items():
            self._free_memory[node] -= mb
        self._locks[instance_id] = request

    def restore(self, instance_id: str, request: ResourceRequest) -> None:
        """Lock again what a recovered instance holds; a no-op if the same lock already exists."""
        if self._locks.get(instance_id) == request:
            return
        self.lock(instance_id, request)

    def reclaim(self, instance_id: str) -> ResourceRequest | None:
        """Free what ``instance_id`` holds; returns the released request (None if none)."""
        request = self._locks.pop(instance_id, None)
        if request is None:
            return None
        for node, cores in request.cores.items():
            self._free_cores[node] |= cores
        for node, mb in request.memory_mb.items():
            self._free_memory[node] += mb
        return request

    def physical_cores(self, instance_id: str) -> tuple[int, ...]:
        """The physical cores behind a lock (for cpuset-cpus); the identity without
        over-provisioning."""
        request = self._locks.get(instance_id)
        if request is None:
            return ()
        return self.physical_cores_of(request)

    def physical_cores_of(self, request: ResourceRequest) -> tuple[int, ...]:
        physical: set[int] = set()
        for node, cores in request.cores.items():
            vmap = self._layout[node].vcore_map
            physical.update(vmap[c] for c in cores)
        return tuple(sorted(physical))

    def is_free(self) -> bool:
        """True when nothing is locked and every core and MB is back."""
        return not self._locks and all(
            self._free_cores[n] == set(v.cores) and self._free_memory[n] == v.memory_mb
            for n, v in self._layout.items()
        )

    def free_cores(self) -> Mapping[int, frozenset[int]]:
        return {n: frozenset(c) for n, c in self._free_cores.items()}

    def free_memory(self) -> Mapping[int, int]:
        return dict(self._free_memory)

    def _check(self, request: ResourceRequest) -> None:
        if not request.cores and not request.memory_mb:
            raise InvalidRequest("the request has neither cores nor memory")
        for node in request.nodes:
            if node not in self._layout:
                known = ", ".join(str(n) for n in sorted(self._layout)) or "none"
                raise UnknownNode(f"NUMA node {node} does not exist on this host (nodes: {known})")
        for node, cores in request.cores.items():
            unknown = cores - self._layout[node].cores
            if unknown:
                raise CoresUnavailable(
                    f"cores {format_cpulist(unknown)} do not exist on NUMA node {node}"
                )
            busy = cores - self._free_cores[node]
            if busy:
                raise CoresUnavailable(
                    f"cores {format_cpulist(busy)} on NUMA node {node} are not free"
                )
        for node, mb in request.memory_mb.items():
            if mb <= 0:
                raise InvalidRequest(f"memory on NUMA node {node} must be positive, not {mb} MB")
            if mb > self._free_memory[node]:
                raise InsufficientMemory(
                    f"{mb} MB requested on NUMA node {node}, only {self._free_memory[node]} MB free"
                )

    def snapshot(self, executor_id: str) -> dict[str, Any]:
        """The ``ExecutorResourceSnapshot`` of spec §4.4."""
        used_cores: dict[int, set[int]] = {}
        used_memory: dict[int, int] = {}
        for request in self._locks.values():
            for node, cores in request.cores.items():
                used_cores.setdefault(node, set()).update(cores)
            for node, mb in request.memory_mb.items():
                used_memory[node] = used_memory.get(node, 0) + mb
        return {
            "executorId": executor_id,
            "cpus": {
                "type": "CPU",
                "freeCores": {str(n): sorted(c) for n, c in sorted(self._free_cores.items())},
                "usedCores": {str(n): sorted(c) for n, c in sorted(used_cores.items())},
            },
            "memory": {
                "type": "MEMORY",
                "freeMemory": {str(n): m for n, m in sorted(self._free_memory.items())},
                "usedMemory": {str(n): m for n, m in sorted(used_memory.items())},
            },
            "layout": {
                "cores": {
                    str(n): sorted(v.physical_cores) for n, v in sorted(self._layout.items())
                },
                "memory": {str(n): v.physical_memory_mb for n, v in sorted(self._layout.items())},
            },
        }
