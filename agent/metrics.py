"""Prometheus metrics (prometheus-client, one registry per agent) and per-task usage read straight
from cgroup files (v1 and v2), which is nearly free next to Docker's stats stream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class CgroupUsage:
    cpu_seconds: float
    memory_bytes: int


def cgroup_paths(proc_root: Path, pid: int) -> dict[str, str]:
    """controller -> cgroup path of ``pid`` (``""`` is the cgroup v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_usage(cgroup_root: Path, proc_root: Path, pid: int) -> CgroupUsage | None:
    """CPU time and memory of the cgroup ``pid`` lives in; None when it cannot be read."""
    paths = cgroup_paths(proc_root, pid)
    if "cpuacct" in paths or "memory" in paths:  # cgroup v1
        cpu_dir = cgroup_root / "cpuacct" / paths.get("cpuacct", "/").lstrip("/")
        mem_dir = cgroup_root / "memory" / paths.get("memory", "/").lstrip("/")
        cpu_ns = _read_int(cpu_dir / "cpuacct.usage")
        memory = _read_int(mem_dir / "memory.usage_in_bytes")
        if cpu_ns is None and memory is None:
            return None
        return CgroupUsage((cpu_ns or 0) / 1e9, memory or 0)
    if "" in paths:  # cgroup v2
        directory = cgroup_root / paths[""].lstrip("/")
        usage_usec = None
        try:
            match = re.search(r"^usage_usec (\d+)", (directory / "cpu.stat").read_text(), re.M)
            usage_usec = int(match.group(1)) if match else None
        except OSError:
            pass
        memory = _read_int(directory / "memory.current")
        if usage_usec is None and memory is None:
            return None
        return CgroupUsage((usage_usec or 0) / 1e6, memory or 0)
    return None


@dataclass(frozen=True, slots=True)
class TaskUsage:
    instance_id: str
    task_id: str
    app: str
    usage: CgroupUsage


class AgentCollector(Collector):
    """Gauges computed at scrape time from the agent's own state."""

    def __init__(self, view: Callable[[], Mapping[str, Any]]) -> None:
        self._view = view

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        view = self._view()
        cores = GaugeMetricFamily(
            "drove_agent_cores", "Allocatable cores per NUMA node", labels=["node", "kind"]
        )
        memory = GaugeMetricFamily(
            "drove_agent_memory_mb",
            "Allocatable memory (MB) per NUMA node",
            labels=["node", "kind"],
        )
        snapshot = view["snapshot"]
        for node, layout_cores in snapshot["layout"]["cores"].items():
            free = snapshot["cpus"]["freeCores"].get(node, [])
            used = snapshot["cpus"]["usedCores"].get(node, [])
            cores.add_metric([node, "total"], len(free) + len(used))
            cores.add_metric([node, "used"], len(used))
            cores.add_metric([node, "free"], len(free))
            cores.add_metric([node, "physical"], len(layout_cores))
        for node, free_mb in snapshot["memory"]["freeMemory"].items():
            used_mb = snapshot["memory"]["usedMemory"].get(node, 0)
            memory.add_metric([node, "total"], free_mb + used_mb)
            memory.add_metric([node, "used"], used_mb)
            memory.add_metric([node, "free"], free_mb)
        yield cores
        yield memory
        tasks = GaugeMetricFamily("drove_agent_tasks", "Tasks by state", labels=["state"])
        for state, count in sorted(view["tasks_by_state"].items()):
            tasks.add_metric([state], count)
        yield tasks
        yield GaugeMetricFamily(
            "drove_agent_reports_queued", "Reports waiting for the controller", value=view["queued"]
        )
        yield CounterMetricFamily(
            "drove_agent_report_send_failures",
            "Failed attempts to deliver a report or snapshot",
            value=view["send_failures"],
        )
        yield CounterMetricFamily(
            "drove_agent_reports_sent", "Reports the controller accepted", value=view["sent"]
        )
        yield GaugeMetricFamily(
            "drove_agent_docker_up", "1 when the Docker engine answers", value=view["docker_up"]
        )
        cpu = CounterMetricFamily(
            "drove_agent_task_cpu_seconds",
            "CPU time of a task's container (from its cgroup)",
            labels=["instance_id", "task_id", "app"],
        )
        mem = GaugeMetricFamily(
            "drove_agent_task_memory_bytes",
            "Memory in use by a task's container (from its cgroup)",
            labels=["instance_id", "task_id", "app"],
        )
        for item in view["usage"]:
            labels = [item.instance_id, item.task_id, item.app]
            cpu.add_metric(labels, item.usage.cpu_seconds)
            mem.add_metric(labels, item.usage.memory_bytes)
        yield cpu
        yield mem


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Histogram(
            "drove_agent_message_seconds",
            "Time to handle a command on /apis/v1/messages",
            ["type"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.docker_calls = Histogram(
            "drove_agent_docker_call_seconds",
            "Docker engine API calls",
            ["call"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0),
        )
        self.exit_to_report = Histogram(
            "drove_agent_exit_to_report_seconds",
            "From a container's exit (Docker's FinishedAt) to its RUN_COMPLETED report",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.docker_errors = Counter(
            "drove_agent_docker_call_errors",
            "Docker engine API calls that failed",
            ["call"],
            registry=self.registry,
        )

    def attach(self, view: Callable[[], Mapping[str, Any]]) -> None:
        self.registry.register(AgentCollector(view))

    def render(self) -> bytes:
        return generate_latest(self.registry)
