"""Builds synthetic sysfs trees (devices/system/{node,cpu}) for inventory tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from agent.inventory import format_cpulist


def build_sysfs(
    root: Path,
    nodes: Mapping[int, tuple[Iterable[int], int]] | None,
    *,
    online: Iterable[int] | None = None,
    siblings: Iterable[Iterable[int]] = (),
    all_cpus: Iterable[int] | None = None,
) -> Path:
    """nodes: node -> (cpus, MemTotal in MB). online defaults to every cpu named.
    siblings: SMT groups; cpus not in a group are their own group."""
    nodes = nodes or {}
    cpus: set[int] = set(all_cpus or ())
    for node_cpus, _ in nodes.values():
        cpus.update(node_cpus)
    cpu_dir = root / "devices/system/cpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    online_set = set(cpus if online is None else online)
    (cpu_dir / "online").write_text(format_cpulist(online_set) + "\n")
    groups = {cpu: {cpu} for cpu in cpus}
    for group in siblings:
        members = set(group)
        for cpu in members:
            groups[cpu] = members
    for cpu in cpus:
        topo = cpu_dir / f"cpu{cpu}/topology"
        topo.mkdir(parents=True, exist_ok=True)
        if cpu in online_set:  # the kernel hides topology of offline cpus
            (topo / "thread_siblings_list").write_text(format_cpulist(groups[cpu]) + "\n")
    if nodes:
        node_dir = root / "devices/system/node"
        for node, (node_cpus, mem_mb) in nodes.items():
            d = node_dir / f"node{node}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "cpulist").write_text(format_cpulist(node_cpus) + "\n")
            (d / "meminfo").write_text(
                f"Node {node} MemTotal:       {mem_mb * 1024} kB\n"
                f"Node {node} MemFree:        {mem_mb * 512} kB\n"
            )
    return root
