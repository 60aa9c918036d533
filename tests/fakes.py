"""FakeRuntime: a hand-written ContainerRuntime for unit tests of the task state machine."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence

from agent.containers import (
    ContainerEvent,
    ContainerParams,
    ContainerStatus,
    ContainerSummary,
    EventKind,
    PullProgress,
)
from agent.errors import ContainerRuntimeError, ImagePullFailed, RuntimeUnavailable


class FakeRuntime:
    def __init__(self) -> None:
        self.images: dict[str, str] = {"busybox:latest": "sha256:busybox"}
        self.containers: dict[str, dict] = {}
        self.calls: list[tuple[str, object]] = []
        self.sink: Callable[[ContainerEvent], None] | None = None
        self.pull_gate: asyncio.Event | None = None  # when set, pulls wait on it
        self.pull_error: str | None = None
        self.start_error: str | None = None
        self.create_gate: asyncio.Event | None = None
        self.down = False
        self._ids = itertools.count(1)

    def _check(self) -> None:
        if self.down:
            raise RuntimeUnavailable("the Docker engine does not answer (fake)")

    async def version(self) -> str:
        self._check()
        return "1.41"

    async def image_present(self, image: str) -> bool:
        self._check()
        return image in self.images

    async def pull(
        self, image, auth, cancel: threading.Event, progress: PullProgress | None = None
    ):
        self.calls.append(("pull", image))
        if self.pull_gate is not None:
            while not self.pull_gate.is_set() and not cancel.is_set():
                await asyncio.sleep(0.01)
        if self.pull_error:
            raise ImagePullFailed(self.pull_error)
        if not cancel.is_set():
            self.images[image] = f"sha256:{image}"

    async def image_id(self, image: str) -> str:
        self._check()
        return self.images[image]

    async def create(self, params: ContainerParams) -> str:
        self._check()
        if self.create_gate is not None:
            await self.create_gate.wait()
        cid = f"c{next(self._ids):04d}"
        self.containers[cid] = {"params": params, "running": False, "exit": None, "oom": False}
        self.calls.append(("create", params))
        return cid

    async def put_files(self, container_id: str, files: Sequence[tuple[str, bytes]]) -> None:
        self.calls.append(("put_files", list(files)))

    async def start(self, container_id: str) -> None:
        self._check()
        if self.start_error:
            raise ContainerRuntimeError(self.start_error)
        self.containers[container_id]["running"] = True
        self.calls.append(("start", container_id))

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        self._check()
        self.calls.append(("kill", signal))
        if signal == "SIGKILL" or self.containers[container_id].get("dies_on_term"):
            self.exit(container_id, 137 if signal == "SIGKILL" else 143)

    async def inspect(self, container_id: str) -> ContainerStatus | None:
        self._check()
        c = self.containers.get(container_id)
        if c is None:
            return None
        return ContainerStatus(
            id=container_id,
            name=c["params"].name,
            running=c["running"],
            exit_code=c["exit"] if c["exit"] is not None else 0,
            oom_killed=c["oom"],
            finished_at_ms=None,
            labels=dict(c["params"].labels),
            image_id="sha256:x",
        )

    async def remove(self, container_id: str) -> None:
        self._check()
        self.calls.append(("remove", container_id))
        self.containers.pop(container_id, None)

    async def remove_image(self, image_id: str) -> None:
        self.calls.append(("remove_image", image_id))

    async def list_managed(self) -> list[ContainerSummary]:
        self._check()
        return [
            ContainerSummary(cid, c["params"].name, c["running"], dict(c["params"].labels), "x")
            for cid, c in self.containers.items()
        ]

    def start_events(self, sink: Callable[[ContainerEvent], None]) -> None:
        self.sink = sink

    def follow_logs(self, container_id, on_data, on_end, since=None):
        self.calls.append(("follow_logs", container_id))
        output = self.containers.get(container_id, {}).get("output", b"")
        if output:
            on_data(output)
        on_end()
        return lambda: None

    async def close(self) -> None:
        pass

    # --- test controls --------------------------------------------------------------------

    def exit(self, container_id: str, code: int, oom: bool = False, event: bool = True) -> None:
        c = self.containers[container_id]
        c["running"] = False
        c["exit"] = code
        c["oom"] = oom
        if event and self.sink is not None:
            if oom:
                self.sink(ContainerEvent(EventKind.OOM, container_id))
            self.sink(ContainerEvent(EventKind.DIE, container_id, exit_code=code))

    def container_of(self, instance_id: str) -> str:
        for cid, c in self.containers.items():
            if c["params"].name == instance_id:
                return cid
        raise KeyError(instance_id)


class RecordingSink:
    def __init__(self) -> None:
        self.reports: list[tuple[dict, dict]] = []
        self.resource_changes = 0

    def task_changed(self, info: dict, snapshot: dict) -> None:
        self.reports.append((info, snapshot))

    def resources_changed(self) -> None:
        self.resource_changes += 1

    async def persisted(self) -> None:
        pass

    def states(self, instance_id: str) -> list[str]:
        return [i["state"] for i, _ in self.reports if i["instanceId"] == instance_id]

    def last(self, instance_id: str) -> dict:
        return [i for i, _ in self.reports if i["instanceId"] == instance_id][-1]


def mapping(**kw: object) -> Mapping[str, object]:
    return kw
