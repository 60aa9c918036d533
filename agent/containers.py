"""The container-runtime seam: value types and the ``ContainerRuntime`` Protocol.

``tasks`` and ``recovery`` reach Docker only through this Protocol; ``runtime.DockerRuntime``
implements it, and tests use a fake. Nothing here imports docker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from agent.models import DeviceRequestSpec, Volume

LABEL_JOB_TYPE = "drove.job.type"
LABEL_INSTANCE_ID = "drove.instance.id"
LABEL_SPEC = "drove.instance.spec"
LABEL_INFO = "drove.instance.info"
JOB_TYPE_TASK = "COMPUTATION"


@dataclass(frozen=True, slots=True)
class ContainerParams:
    """Everything needed to create one task container (spec §5.2)."""

    name: str
    image: str
    labels: Mapping[str, str]
    env: tuple[str, ...]
    command: tuple[str, ...] | None
    user: str | None
    mem_limit_bytes: int
    cpuset_cpus: str | None
    cpuset_mems: str | None
    nofile: int
    volumes: tuple[Volume, ...] = ()
    devices: tuple[str, ...] = ()
    device_requests: tuple[DeviceRequestSpec, ...] = ()
    log_driver: str = "json-file"
    log_options: Mapping[str, str] = field(default_factory=dict)
    files: tuple[tuple[str, bytes], ...] = ()  # (absolute path in container, content)


@dataclass(frozen=True, slots=True)
class ContainerStatus:
    id: str
    name: str
    running: bool
    exit_code: int
    oom_killed: bool
    finished_at_ms: int | None
    labels: Mapping[str, str]
    image_id: str
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    memory_bytes: int = 0
    pid: int = 0


@dataclass(frozen=True, slots=True)
class ContainerSummary:
    """A container as a list call shows it (no exit code; inspect for that)."""

    id: str
    name: str
    running: bool
    labels: Mapping[str, str]
    image_id: str
    state: str = ""  # Docker's State: created, running, exited, ...


class EventKind(StrEnum):
    DIE = "die"
    OOM = "oom"
    START = "start"
    DESTROY = "destroy"
    # The stream broke or was (re)connected: whoever listens must relist to catch up.
    RESYNC = "resync"
    # The engine cannot be reached at the moment.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    kind: EventKind
    container_id: str = ""
    instance_id: str = ""
    exit_code: int | None = None
    time_ns: int = 0


@dataclass(slots=True)
class PullProgress:
    """Progress of one image pull, updated by the pulling thread."""

    layers_total: dict[str, int] = field(default_factory=dict)
    layers_done: dict[str, int] = field(default_factory=dict)
    status: str = ""

    @property
    def percent(self) -> float | None:
        total = sum(self.layers_total.values())
        if not total:
            return None
        return 100.0 * min(sum(self.layers_done.values()), total) / total


class ContainerRuntime(Protocol):
    async def version(self) -> str: ...

    async def image_present(self, image: str) -> bool: ...

    async def pull(
        self,
        image: str,
        auth: Mapping[str, str] | None,
        cancel: threading.Event,
        progress: PullProgress | None = None,
    ) -> None: ...

    async def image_id(self, image: str) -> str: ...

    async def create(self, params: ContainerParams) -> str: ...

    async def put_files(self, container_id: str, files: Sequence[tuple[str, bytes]]) -> None: ...

    async def start(self, container_id: str) -> None: ...

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> None: ...

    async def inspect(self, container_id: str) -> ContainerStatus | None: ...

    async def remove(self, container_id: str) -> None: ...

    async def remove_image(self, image_id: str) -> None: ...

    async def list_managed(self) -> list[ContainerSummary]: ...

    def start_events(self, sink: Callable[[ContainerEvent], None]) -> None: ...

    def follow_logs(
        self,
        container_id: str,
        on_data: Callable[[bytes], None],
        on_end: Callable[[], None],
        since: int | None = None,
    ) -> Callable[[], None]:
        """Stream a container's stdout and stderr to ``on_data`` (called in a thread of the
        runtime's) until the container stops; returns a function that ends it early."""
        ...

    async def close(self) -> None: ...
