"""Host inventory: cores and memory per NUMA node, read from sysfs (pure: no asyncio, no Docker).

``read_topology(sysfs_root)`` reads what the kernel says; ``build_inventory(topology, resources)``
applies osCores, exposedMemPercentage, over-provisioning and disableNUMAPinning as the Drove
executor does (spec §4.1), except that virtual cores are mapped per node, not shared across nodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.config import ResourcesConfig

_NODE_DIR = re.compile(r"^node(\d+)$")
_CPU_DIR = re.compile(r"^cpu(\d+)$")


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse a kernel cpu list such as ``0-3,8-11`` or ``0,2,4`` (empty text is no cpus)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo_text, hi_text = part.split("-", 1)
            step = 1
            if ":" in hi_text:  # the kernel's strided form 0-7:2
                hi_text, step_text = hi_text.split(":", 1)
                step = int(step_text.split("/")[0])
            lo, hi = int(lo_text), int(hi_text)
            if hi < lo:
                raise ValueError(f"cpu range {part!r} runs backwards")
            cpus.update(range(lo, hi + 1, step))
        else:
            cpus.add(int(part))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of parse_cpulist, compressing runs: {0,1,2,3,8} -> '0-3,8'."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class RawNode:
    """One NUMA node as the kernel describes it."""

    node: int
    cpus: frozenset[int]
    memory_total_mb: int


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: Mapping[int, RawNode]
    online: frozenset[int]
    siblings: Mapping[int, frozenset[int]]  # cpu -> its SMT group (itself included)
    from_sysfs: bool = True


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _meminfo_total_mb(text: str | None) -> int:
    if not text:
        return 0
    for line in text.splitlines():
        # "Node 0 MemTotal:       24576000 kB"
        if "MemTotal:" in line:
            fields = line.split("MemTotal:", 1)[1].split()
            if fields:
                return int(fields[0]) // 1024
    return 0


def read_topology(
    sysfs_root: Path = Path("/sys"), fallback_memory_bytes: int | None = None
) -> Topology:
    """Read NUMA nodes, online CPUs and SMT siblings below ``sysfs_root`` (normally ``/sys``).

    Without a node directory, one node 0 holds every online CPU and psutil's total memory.
    """
    cpu_dir = sysfs_root / "devices/system/cpu"
    node_dir = sysfs_root / "devices/system/node"

    online_text = _read(cpu_dir / "online")
    if online_text is not None:
        online = parse_cpulist(online_text)
    else:
        online = frozenset(range(psutil.cpu_count(logical=True) or 1))

    siblings: dict[int, frozenset[int]] = {}
    if cpu_dir.is_dir():
        for entry in cpu_dir.iterdir():
            match = _CPU_DIR.match(entry.name)
            if not match:
                continue
            text = _read(entry / "topology/thread_siblings_list")
            if text is not None and text.strip():
                siblings[int(match.group(1))] = parse_cpulist(text)

    nodes: dict[int, RawNode] = {}
    if node_dir.is_dir():
        for entry in node_dir.iterdir():
            match = _NODE_DIR.match(entry.name)
            if not match:
                continue
            node = int(match.group(1))
            nodes[node] = RawNode(
                node=node,
                cpus=parse_cpulist(_read(entry / "cpulist") or ""),
                memory_total_mb=_meminfo_total_mb(_read(entry / "meminfo")),
            )
    if nodes:
        return Topology(nodes=nodes, online=online, siblings=siblings)

    memory = fallback_memory_bytes
    if memory is None:
        memory = psutil.virtual_memory().total
    return Topology(
        nodes={0: RawNode(0, online, memory // (1024 * 1024))},
        online=online,
        siblings=siblings,
        from_sysfs=False,
    )


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """What the operator sees for one node (physical view, before over-provisioning)."""

    node: int
    allocatable: tuple[int, ...]
    reserved: tuple[int, ...]  # online cores left out by resources.osCores
    offline: tuple[int, ...]
    siblings: tuple[tuple[int, ...], ...]
    memory_total_mb: int
    memory_exposed_mb: int


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """One node as the allocator sees it (spec §4.2): physical cores, the virtual -> physical core
    map (the identity without over-provisioning) and memory."""

    node: int
    physical_cores: frozenset[int]
    vcore_map: Mapping[int, int]
    physical_memory_mb: int
    memory_mb: int

    @property
    def cores(self) -> frozenset[int]:
        """The core ids that are allocated and reported as free (virtual when over-provisioning)."""
        return frozenset(self.vcore_map)


@dataclass(frozen=True, slots=True)
class HostInventory:
    nodes: tuple[NodeInventory, ...]
    layout: Mapping[int, NodeLayout]
    numa_pinning: bool

    def to_json(self) -> dict[str, object]:
        """The ``drove-agent inventory --json`` shape: the snapshot ``layout`` plus extras."""
        return {
            "cores": {str(n.node): sorted(n.allocatable) for n in self.nodes},
            "memory": {str(n.node): n.memory_exposed_mb for n in self.nodes},
            "reservedCores": {str(n.node): list(n.reserved) for n in self.nodes},
            "offlineCores": {str(n.node): list(n.offline) for n in self.nodes},
            "siblings": {str(n.node): [list(g) for g in n.siblings] for n in self.nodes},
            "memoryTotal": {str(n.node): n.memory_total_mb for n in self.nodes},
            "numaPinning": self.numa_pinning,
            "allocatable": {
                str(k): {"cores": sorted(v.cores), "memory": v.memory_mb}
                for k, v in sorted(self.layout.items())
            },
        }


def next_prime_above(n: int) -> int:
    candidate = n + 1
    while candidate < 2 or any(candidate % d == 0 for d in range(2, int(candidate**0.5) + 1)):
        candidate += 1
    return candidate


def virtual_cores(cores: Iterable[int], multiplier: int) -> dict[int, int]:
    """Over-provisioning (spec §4.1 step 2): core c becomes (c+1)*p + i for i in 1..m, where p is
    the smallest prime above m. Returns vcore -> physical core."""
    prime = next_prime_above(multiplier)
    return {
        (core + 1) * prime + i: core for core in sorted(cores) for i in range(1, multiplier + 1)
    }


def build_inventory(topology: Topology, resources: ResourcesConfig) -> HostInventory:
    node_views: list[NodeInventory] = []
    layout: dict[int, NodeLayout] = {}
    over = resources.over_provisioning
    for node_id in sorted(topology.nodes):
        raw = topology.nodes[node_id]
        online = raw.cpus & topology.online
        allocatable = online - resources.os_cores
        exposed = raw.memory_total_mb * resources.exposed_mem_percentage // 100
        groups = sorted(
            {tuple(sorted(topology.siblings.get(cpu, frozenset({cpu})) & online)) for cpu in online}
        )
        node_views.append(
            NodeInventory(
                node=node_id,
                allocatable=tuple(sorted(allocatable)),
                reserved=tuple(sorted(online & resources.os_cores)),
                offline=tuple(sorted(raw.cpus - topology.online)),
                siblings=tuple(g for g in groups if g),
                memory_total_mb=raw.memory_total_mb,
                memory_exposed_mb=exposed,
            )
        )
        if over.enabled:
            vmap = virtual_cores(allocatable, over.cpu_multiplier)
            memory = exposed * over.memory_multiplier
        else:
            vmap = {core: core for core in allocatable}
            memory = exposed
        layout[node_id] = NodeLayout(node_id, frozenset(allocatable), vmap, exposed, memory)

    if resources.disable_numa_pinning and layout:
        merged_map: dict[int, int] = {}
        for item in layout.values():
            merged_map.update(item.vcore_map)
        layout = {
            0: NodeLayout(
                node=0,
                physical_cores=frozenset().union(*(n.physical_cores for n in layout.values())),
                vcore_map=merged_map,
                physical_memory_mb=sum(n.physical_memory_mb for n in layout.values()),
                memory_mb=sum(n.memory_mb for n in layout.values()),
            )
        }
    return HostInventory(
        nodes=tuple(node_views), layout=layout, numa_pinning=not resources.disable_numa_pinning
    )
