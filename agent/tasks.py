"""Tasks: the state machine (spec §3.5) and the TaskManager that drives containers through it.

Start and stop are synchronous (validation and the resource lock happen before the caller answers);
the work runs in one owned coroutine per task. Exits are learnt from Docker's event stream, with a
periodic relist as a safety net: no per-container polling.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.config import Config
from agent.configfiles import materialise
from agent.containers import (
    JOB_TYPE_TASK,
    LABEL_INFO,
    LABEL_INSTANCE_ID,
    LABEL_JOB_TYPE,
    LABEL_SPEC,
    ContainerEvent,
    ContainerParams,
    ContainerRuntime,
    EventKind,
    PullProgress,
)
from agent.errors import AgentError, IllegalTransition, RuntimeUnavailable
from agent.metrics import CgroupUsage, Metrics, TaskUsage, read_usage
from agent.models import (
    DeviceRequestSpec,
    ResultStatus,
    TaskResult,
    TaskSpec,
    TaskState,
    transition_allowed,
)
from agent.node import ExecutorState, Node, now_ms
from agent.tasklogs import LogStore, RotatingLogFile

log = structlog.get_logger(__name__)

RELIST_INTERVAL_S = 10.0
KILL_CONFIRM_S = 15.0
TERMINAL_RETENTION = 1000
DROVE_ENV_KEYS = frozenset(
    {
        "HOST",
        "DROVE_CONTAINER_ID",
        "DROVE_EXECUTOR_HOST",
        "DROVE_TASK_ID",
        "DROVE_INSTANCE_ID",
        "DROVE_SOURCE_APP_NAME",
    }
)


class ControllerSink(Protocol):
    """Where the manager's reports go (reporter.ControllerLink implements it)."""

    def task_changed(self, info: dict[str, Any], snapshot: dict[str, Any]) -> None: ...

    def resources_changed(self) -> None: ...

    async def persisted(self) -> None:
        """Return once every report handed over so far is durable (a no-op when there is no
        journal)."""
        ...


Spawn = Callable[[Coroutine[Any, Any, None], str], object]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to a command: accepted or not, and why (FAILED answers carry the reason)."""

    accepted: bool
    message: str = ""


@dataclass(eq=False)
class TaskRecord:
    spec: TaskSpec
    executor_id: str
    hostname: str
    state: TaskState = TaskState.PENDING
    result: TaskResult | None = None
    error: str = ""
    created: int = field(default_factory=now_ms)
    updated: int = 0
    container_id: str | None = None
    image_id: str | None = None
    stop_requested: bool = False
    exit_seen: bool = False
    oom_seen: bool = False
    never_started: bool = False  # recovered from a container in state "created"
    die_code: int | None = None  # the exit code a die event carried
    die_at_ms: int | None = None
    finished_at_ms: int | None = None
    pid: int = 0
    usage: CgroupUsage | None = None
    stop_logs: Callable[[], None] | None = None
    pull_cancel: threading.Event = field(default_factory=threading.Event)
    pull_progress: PullProgress = field(default_factory=PullProgress)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id

    def stopping(self) -> bool:
        """A stop was asked for (a method, so type narrowing does not go stale across awaits)."""
        return self.stop_requested

    def stamp(self) -> int:
        """A fresh ``updated``: now, and strictly later than the last one of this task."""
        self.updated = max(now_ms(), self.updated + 1)
        return self.updated

    def _spec_fields(self) -> dict[str, Any]:
        """What ExecutorTaskInfo and TaskInfo share (null fields are left out, spec §0)."""
        return _without_nulls(
            {
                "sourceAppName": self.spec.source_app_name,
                "taskId": self.spec.task_id,
                "instanceId": self.instance_id,
                "executorId": self.executor_id,
                "hostname": self.hostname,
                "executable": self.spec.executable_wire(),
                "resources": self.spec.resources_wire(),
                "volumes": self.spec.volumes_wire(),
                "loggingSpec": self.spec.wire.get("loggingSpec"),
                "env": dict(self.spec.env),
                "metadata": {},
            }
        )

    def executor_task_info(self) -> dict[str, Any]:
        """``ExecutorTaskInfo`` (spec §3.2), stored in the container label for recovery."""
        return {
            **self._spec_fields(),
            "created": self.created,
            "updated": self.updated or self.created,
        }

    def to_wire(self) -> dict[str, Any]:
        """``TaskInfo`` (spec §3.3) with a fresh, strictly increasing ``updated``."""
        info = self._spec_fields()
        info["state"] = str(self.state)
        if self.result is not None:
            info["taskResult"] = self.result.to_wire()
        info["errorMessage"] = self.error
        info["created"] = self.created
        info["updated"] = self.stamp()
        return info


def _without_nulls(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def registry_of(image: str) -> str | None:
    """The registry part of an image reference: what comes before the first '/' (spec §5.1)."""
    return image.split("/", 1)[0] if "/" in image else None


def task_env(spec: TaskSpec, hostname: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Container env (spec §5.2): HOST, the spec's vars (an empty value passes the agent's own
    value through, or is dropped), then the DROVE_* vars. A spec var named HOST or DROVE_* is
    dropped: the agent's values win."""
    env = [f"HOST={hostname}"]
    for key, value in spec.env.items():
        if key in DROVE_ENV_KEYS:
            continue
        if value == "":
            value = environ.get(key, "")
            if not value:
                continue
        env.append(f"{key}={value}")
    env += [
        f"DROVE_CONTAINER_ID={spec.image}",
        f"DROVE_EXECUTOR_HOST={hostname}",
        f"DROVE_TASK_ID={spec.task_id}",
        f"DROVE_INSTANCE_ID={spec.instance_id}",
        f"DROVE_SOURCE_APP_NAME={spec.source_app_name}",
    ]
    return tuple(env)


def log_settings(spec: TaskSpec, cfg: Config) -> tuple[str, dict[str, str]]:
    """Docker log driver and options (spec §5.5)."""
    opts = cfg.options
    common = {
        "cache-disabled": "false",
        "cache-max-size": f"{opts.cache_file_size_mb}m",
        "cache-max-file": str(opts.cache_file_count),
        "cache-compress": "true",
        "mode": "non-blocking",
        "max-buffer-size": f"{max(1, opts.log_buffer_size_mb)}m",
    }
    logging = spec.logging
    if logging is not None and logging.kind == "RSYSLOG":
        return "syslog", {
            **common,
            "syslog-address": logging.server,
            "tag": f"{logging.tag_prefix}{spec.instance_id}{logging.tag_suffix}",
            "syslog-facility": "daemon",
        }
    max_size = logging.max_size if logging else "10m"
    max_files = logging.max_files if logging else 3
    compress = logging.compress if logging else True
    return "json-file", {
        **common,
        "max-size": max_size,
        "max-file": str(max_files),
        "compress": "true" if compress else "false",
    }


def container_params(
    rec: TaskRecord,
    cfg: Config,
    cpuset: tuple[int, ...],
    files: tuple[tuple[str, bytes], ...],
    environ: Mapping[str, str],
) -> ContainerParams:
    spec = rec.spec
    user = spec.user
    group = spec.group
    if user is None and cfg.options.default_user_spec is not None:
        user = cfg.options.default_user_spec.user
        group = cfg.options.default_user_spec.group
    driver, options = log_settings(spec, cfg)
    device_requests = list(spec.device_requests)
    if cfg.resources.enable_nvidia_gpu:
        device_requests.append(DeviceRequestSpec("nvidia", -1, (), (("gpu",),), {}))
    return ContainerParams(
        name=spec.instance_id,
        image=spec.image,
        labels={
            LABEL_JOB_TYPE: JOB_TYPE_TASK,
            LABEL_INSTANCE_ID: spec.instance_id,
            LABEL_SPEC: json.dumps(spec.wire, separators=(",", ":")),
            LABEL_INFO: json.dumps(rec.executor_task_info(), separators=(",", ":")),
        },
        env=task_env(spec, rec.hostname, environ),
        command=spec.args or None,
        user=f"{user}:{group}" if user and group else user,
        mem_limit_bytes=spec.resources.total_memory_mb * (1 << 20),
        cpuset_cpus=",".join(str(c) for c in cpuset) or None,
        cpuset_mems=(
            ",".join(str(n) for n in sorted(spec.resources.memory_mb))
            if not cfg.resources.disable_numa_pinning
            else None
        ),
        nofile=cfg.options.max_open_files,
        volumes=spec.volumes,
        devices=tuple(
            f"{d.path_on_host}:{d.path_in_container}:{d.permissions}" for d in spec.direct_devices
        ),
        device_requests=tuple(device_requests),
        log_driver=driver,
        log_options=options,
        files=files,
    )


def exit_result(code: int, oom: bool, memory_mb: int) -> tuple[TaskResult, str | None]:
    """taskResult and errorMessage for a container that exited by itself (spec §3.5), with an
    honest OOM message. None as message means: leave errorMessage as it is."""
    if code == 0:
        return TaskResult(ResultStatus.SUCCESSFUL, 0), None
    result = TaskResult(ResultStatus.FAILED, code)
    if oom and code == 137:
        return result, f"OOM killed (memory limit {memory_mb} MB)"
    if oom:
        return result, (
            f"Task instance exited with status: {code} after an OOM kill inside the container "
            f"(memory limit {memory_mb} MB)"
        )
    return result, f"Task instance exited with status: {code}"


class TaskManager:
    def __init__(
        self,
        *,
        cfg: Config,
        node: Node,
        runtime: ContainerRuntime,
        sink: ControllerSink,
        spawn: Spawn,
        environ: Mapping[str, str] | None = None,
        logs: LogStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.runtime = runtime
        self.sink = sink
        self._spawn = spawn
        self._environ = dict(os.environ if environ is None else environ)
        self.records: dict[str, TaskRecord] = {}
        self._by_container: dict[str, TaskRecord] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._message_ids: OrderedDict[str, str] = OrderedDict()
        self.docker_ok = True
        self.docker_error = ""
        self.accepting = True
        self.logs = logs
        self.metrics = metrics

    # --- queries -----------------------------------------------------------------------------

    def active(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if not r.state.terminal]

    def task_infos(self, include_finished: bool = True) -> list[dict[str, Any]]:
        return [
            r.to_wire() for r in self.records.values() if include_finished or not r.state.terminal
        ]

    def get(self, instance_id: str) -> TaskRecord | None:
        return self.records.get(instance_id)

    # --- commands ----------------------------------------------------------------------------

    def start(self, spec: TaskSpec, message_id: str = "") -> Verdict:
        """Register and lock; the rest runs in the background. Never awaits."""
        if message_id and message_id in self._message_ids:
            return Verdict(True, "duplicate message; already accepted")
        known = self.records.get(spec.instance_id)
        if known is not None:
            if known.spec.identity() == spec.identity():
                self._remember(message_id, spec.instance_id)
                return Verdict(
                    True, f"task {spec.instance_id} is already known; nothing new started"
                )
            return Verdict(
                False,
                f"task {spec.instance_id} is already known with a different spec",
            )
        if not self.accepting:
            return Verdict(False, "the agent is shutting down; starts are refused")
        if self.node.state is not ExecutorState.ACTIVE:
            return Verdict(False, f"the executor is {self.node.state}; starts are refused")
        if not self.docker_ok:
            return Verdict(
                False, f"the Docker engine is unreachable; starts are refused ({self.docker_error})"
            )
        try:
            self.node.allocator.lock(spec.instance_id, spec.resources)
        except AgentError as exc:
            return Verdict(False, f"could not lock resources for {spec.instance_id}: {exc}")
        rec = TaskRecord(spec=spec, executor_id=self.node.executor_id, hostname=self.node.hostname)
        rec.updated = rec.created
        self.records[spec.instance_id] = rec
        self._remember(message_id, spec.instance_id)
        self.sink.resources_changed()
        log.info(
            "task_registered",
            instance_id=spec.instance_id,
            task_id=spec.task_id,
            app=spec.source_app_name,
            image=spec.image,
            cores={str(n): sorted(c) for n, c in spec.resources.cores.items()},
            memory_mb=dict(spec.resources.memory_mb),
        )
        try:
            self._spawn(self._run(rec), f"task:{spec.instance_id}")
        except RuntimeError as exc:  # the owning TaskGroup is shutting down
            self.node.allocator.reclaim(spec.instance_id)
            self.records.pop(spec.instance_id, None)
            self.sink.resources_changed()
            return Verdict(False, f"the agent is shutting down; starts are refused ({exc})")
        return Verdict(True)

    def stop(self, instance_id: str) -> Verdict:
        rec = self.records.get(instance_id)
        if rec is None:
            return Verdict(False, f"no task with instanceId {instance_id} on this executor")
        if rec.state.terminal:
            return Verdict(True, f"task {instance_id} is already {rec.state}")
        if not rec.stop_requested:
            log.info("task_stop_requested", instance_id=instance_id, state=str(rec.state))
        rec.stop_requested = True
        rec.pull_cancel.set()
        rec.stop_event.set()
        rec.wake.set()
        return Verdict(True)

    def adopt(
        self,
        spec: TaskSpec,
        *,
        executor_id: str,
        created: int,
        updated: int,
        container_id: str,
        image_id: str,
        never_started: bool = False,
    ) -> Verdict:
        """Re-attach a container found at start-up (recovery): lock its resources again and follow
        it from UNKNOWN. An exited container goes on to report its real outcome."""
        if spec.instance_id in self.records:
            return Verdict(False, f"task {spec.instance_id} is already known")
        try:
            self.node.allocator.restore(spec.instance_id, spec.resources)
        except AgentError as exc:
            return Verdict(False, f"could not lock resources again: {exc}")
        rec = TaskRecord(
            spec=spec,
            executor_id=executor_id or self.node.executor_id,
            hostname=self.node.hostname,
            state=TaskState.UNKNOWN,
            created=created or now_ms(),
            updated=updated,
            container_id=container_id,
            image_id=image_id or None,
            exit_seen=True,  # the first look inspects the container
            never_started=never_started,
        )
        self.records[spec.instance_id] = rec
        self._by_container[container_id] = rec
        self.sink.resources_changed()
        self._spawn(self._run(rec), f"task:{spec.instance_id}")
        return Verdict(True)

    def owns(self, instance_id: str, container_id: str) -> bool:
        """Whether a live (non-terminal) task claims this container."""
        rec = self._by_container.get(container_id) or self.records.get(instance_id)
        return rec is not None and not rec.state.terminal

    def _remember(self, message_id: str, instance_id: str) -> None:
        if not message_id:
            return
        self._message_ids[message_id] = instance_id
        while len(self._message_ids) > 10_000:
            self._message_ids.popitem(last=False)

    # --- container events --------------------------------------------------------------------

    def on_event(self, event: ContainerEvent) -> None:
        if event.kind is EventKind.UNAVAILABLE:
            self._docker_down("the Docker event stream is disconnected")
            return
        if event.kind is EventKind.RESYNC:
            self._spawn(self.relist(), "relist")
            return
        rec = self._by_container.get(event.container_id)
        if rec is None:
            return
        log.debug("container_event", instance_id=rec.instance_id, kind=str(event.kind))
        if event.kind is EventKind.OOM:
            rec.oom_seen = True
            log.info("container_oom", instance_id=rec.instance_id)
        elif event.kind in (EventKind.DIE, EventKind.DESTROY):
            if event.kind is EventKind.DIE and event.exit_code is not None:
                rec.die_code = event.exit_code
                rec.die_at_ms = event.time_ns // 1_000_000 if event.time_ns else now_ms()
            rec.exit_seen = True
            rec.wake.set()

    def _docker_down(self, why: str) -> None:
        if self.docker_ok:
            log.warning("docker_unavailable", detail=why)
        self.docker_ok = False
        self.docker_error = why

    def _docker_up(self) -> None:
        if not self.docker_ok:
            log.info("docker_available")
        self.docker_ok = True
        self.docker_error = ""

    async def relist(self) -> None:
        """Catch exits the event stream missed: one list call for all containers."""
        try:
            summaries = await self.runtime.list_managed()
        except RuntimeUnavailable as exc:
            self._docker_down(str(exc))
            return
        except AgentError as exc:
            log.warning("relist_failed", error=str(exc))
            return
        self._docker_up()
        running = {s.id for s in summaries if s.running}
        for rec in self.active():
            if rec.state is TaskState.RUNNING and rec.container_id not in running:
                rec.exit_seen = True
                rec.wake.set()

    async def relist_forever(self) -> None:
        while True:
            await asyncio.sleep(RELIST_INTERVAL_S)
            await self.relist()

    # --- the state machine -------------------------------------------------------------------

    def _transition(
        self,
        rec: TaskRecord,
        new: TaskState,
        *,
        result: TaskResult | None = None,
        error: str | None = None,
    ) -> None:
        old = rec.state
        if not transition_allowed(old, new):
            raise IllegalTransition(rec.instance_id, str(old), str(new))
        rec.state = new
        if result is not None:
            rec.result = result
        if error is not None:
            rec.error = error
        if new.terminal:
            # Resources are free before the terminal report goes out (spec §3.5).
            self.node.allocator.reclaim(rec.instance_id)
            if rec.container_id:
                self._by_container.pop(rec.container_id, None)
            self._finished[rec.instance_id] = None
            while len(self._finished) > TERMINAL_RETENTION:
                old_id, _ = self._finished.popitem(last=False)
                self.records.pop(old_id, None)
            self.sink.resources_changed()
            rec.done.set()
        if (
            new is TaskState.RUN_COMPLETED
            and rec.finished_at_ms is not None
            and self.metrics is not None
        ):
            self.metrics.exit_to_report.observe(max(0.0, (now_ms() - rec.finished_at_ms) / 1000))
        log.info(
            "task_state_changed",
            instance_id=rec.instance_id,
            old=str(old),
            new=str(new),
            result=rec.result.to_wire() if rec.result else None,
            error=rec.error or None,
        )
        self.sink.task_changed(rec.to_wire(), self.node.resource_snapshot())

    async def _run(self, rec: TaskRecord) -> None:
        with structlog.contextvars.bound_contextvars(instance_id=rec.instance_id):
            try:
                await self._drive(rec)
            except asyncio.CancelledError:
                raise  # agent shutdown: the container is left for recovery
            except Exception as exc:
                log.exception("task_state_machine_failed")
                await self._lose(rec, f"SM Execution error: {exc}")

    async def _lose(self, rec: TaskRecord, message: str) -> None:
        if rec.state.terminal:
            return
        if rec.container_id:
            try:
                await self.runtime.remove(rec.container_id)
            except AgentError as exc:
                log.warning("container_remove_failed", error=str(exc))
        self._transition(rec, TaskState.LOST, error=message)

    async def _drive(self, rec: TaskRecord) -> None:
        if rec.state is TaskState.UNKNOWN:
            if rec.never_started:
                # The agent stopped between create and start: the task never ran.
                await self._remove_container(rec)
                self._transition(
                    rec,
                    TaskState.STOPPED,
                    result=TaskResult(ResultStatus.FAILED, -1),
                    error="Task container was created but never started "
                    "(the agent stopped while starting it)",
                )
                return
            self._transition(rec, TaskState.RUNNING)
            await self._follow_logs(rec, since=await self._last_log_time(rec))
            await self._monitor(rec)
            await self._deprovision(rec)
            return
        if rec.stopping():
            self._transition(rec, TaskState.STOPPED)
            return
        self._transition(rec, TaskState.PROVISIONING)
        failure = await self._provision(rec)
        if failure is not None:
            self._transition(rec, TaskState.PROVISIONING_FAILED, error=failure)
        else:
            self._transition(rec, TaskState.STARTING)
            if rec.stopping():
                self._cancelled(rec)
            else:
                await self._start_container(rec)
            if rec.state is TaskState.RUNNING:
                await self._monitor(rec)
        await self._deprovision(rec)

    def _cancelled(self, rec: TaskRecord) -> None:
        self._transition(
            rec, TaskState.RUN_COMPLETED, result=TaskResult(ResultStatus.CANCELLED, -1)
        )

    async def _provision(self, rec: TaskRecord) -> str | None:
        """Make the image present per imagePullPolicy; returns an error message or None."""
        image = rec.spec.image
        policy = self.cfg.options.image_pull_policy
        try:
            present = await self.runtime.image_present(image)
            if policy == "NEVER" and not present:
                return f"Image {image} is not present and imagePullPolicy is NEVER"
            if policy == "ALWAYS" or not present:
                error = await self._pull(rec)
                if error is not None:
                    return error
            if rec.stopping():
                return None
            rec.image_id = await self.runtime.image_id(image)
        except AgentError as exc:
            return f"Error while pulling image {image}: {exc}"
        return None

    async def _pull(self, rec: TaskRecord) -> str | None:
        image = rec.spec.image
        registry = registry_of(image)
        creds = self.cfg.docker_auth.get(registry) if registry else None
        auth = {"username": creds.username, "password": creds.password} if creds else None
        timeout = rec.spec.pull_timeout
        log.info("image_pull_started", image=image, authenticated=auth is not None)
        started = time.monotonic()
        # A stop ends the wait at once, even while a stalled registry sends nothing; the pulling
        # thread is abandoned and stops at its next chunk.
        pull = asyncio.ensure_future(
            self.runtime.pull(image, auth, rec.pull_cancel, rec.pull_progress)
        )
        stop = asyncio.ensure_future(rec.stop_event.wait())
        try:
            async with asyncio.timeout(timeout.seconds):
                await asyncio.wait({pull, stop}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.warning("image_pull_timed_out", image=image, timeout=str(timeout))
            return f"Error while pulling image {image}: pull did not finish within {timeout}"
        finally:
            stop.cancel()
            if not pull.done():
                rec.pull_cancel.set()
                pull.cancel()
        if not pull.done() or rec.stopping():
            return None
        pull.result()  # the pull's own error, if it failed
        log.info("image_pulled", image=image, seconds=round(time.monotonic() - started, 3))
        return None

    async def _start_container(self, rec: TaskRecord) -> None:
        spec = rec.spec
        try:
            files = tuple(await materialise(spec.configs))
            cpuset = self.node.allocator.physical_cores(rec.instance_id)
            params = container_params(rec, self.cfg, cpuset, files, self._environ)
            try:
                rec.container_id = await self.runtime.create(params)
            except AgentError:
                await self._remove_half_created(rec)
                raise
            self._by_container[rec.container_id] = rec
            log.info("container_created", container_id=rec.container_id[:12])
            await self.runtime.put_files(rec.container_id, params.files)
            if rec.stopping():
                self._cancelled(rec)
                return
            await self.runtime.start(rec.container_id)
            await self._follow_logs(rec, since=None)
        except AgentError as exc:
            self._transition(
                rec,
                TaskState.RUN_FAILED,
                result=TaskResult(ResultStatus.FAILED, -1),
                error=str(exc),
            )
            return
        self._transition(rec, TaskState.RUNNING, error="")

    async def _remove_half_created(self, rec: TaskRecord) -> None:
        """A create that failed or timed out may still have made the container: find it by name
        and remove it, so nothing leaks."""
        try:
            status = await self.runtime.inspect(rec.instance_id)
            if status is not None and status.labels.get(LABEL_INSTANCE_ID) == rec.instance_id:
                await self.runtime.remove(status.id)
                log.info("half_created_container_removed", container_id=status.id[:12])
        except AgentError as exc:
            log.warning("half_created_container_check_failed", error=str(exc))

    async def _monitor(self, rec: TaskRecord) -> None:
        """Wait for the container's exit or a stop; then RUN_COMPLETED with the outcome."""
        assert rec.container_id is not None
        memory_mb = rec.spec.resources.total_memory_mb
        while True:
            rec.wake.clear()  # before any check: whatever arrives from here on wakes us again
            code = rec.die_code
            if code is not None and not rec.stopping() and (code != 137 or rec.oom_seen):
                # The die event's exit code is the answer: an inspect right after a die waits for
                # dockerd's clean-up (tens of ms). Only a 137 without an oom event is looked at
                # again, for State.OOMKilled.
                rec.finished_at_ms = rec.die_at_ms
                result, message = exit_result(code, rec.oom_seen, memory_mb)
                self._transition(rec, TaskState.RUN_COMPLETED, result=result, error=message)
                return
            if rec.exit_seen or rec.stopping():
                rec.exit_seen = False
                status = await self._inspect(rec)
                if status is None:
                    self._transition(
                        rec,
                        TaskState.RUN_COMPLETED,
                        result=TaskResult(ResultStatus.LOST, -1),
                        error=f"Task instance lost for container: {rec.container_id}",
                    )
                    return
                if not status.running:
                    rec.finished_at_ms = status.finished_at_ms
                    result, message = exit_result(
                        status.exit_code, rec.oom_seen or status.oom_killed, memory_mb
                    )
                    self._transition(rec, TaskState.RUN_COMPLETED, result=result, error=message)
                    return
                if rec.stopping():
                    await self._kill(rec)
                    self._cancelled(rec)
                    return
                continue  # look again: an event may have come while we inspected
            await rec.wake.wait()

    async def _inspect(self, rec: TaskRecord) -> Any:
        """Inspect until Docker answers: no false exits while it is unreachable or erring."""
        assert rec.container_id is not None
        delay = 0.5
        while True:
            try:
                return await self.runtime.inspect(rec.container_id)
            except RuntimeUnavailable as exc:
                self._docker_down(str(exc))
            except AgentError as exc:
                log.warning("container_inspect_failed", error=str(exc), retry_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _kill(self, rec: TaskRecord) -> None:
        assert rec.container_id is not None
        grace = self.cfg.options.task_stop_grace_period_s
        if grace > 0:
            await self._signal(rec, "SIGTERM")
            if await self._wait_exit(rec, grace):
                return
        await self._signal(rec, "SIGKILL")
        if not await self._wait_exit(rec, KILL_CONFIRM_S):
            log.warning("container_kill_unconfirmed", seconds=KILL_CONFIRM_S)

    async def _signal(self, rec: TaskRecord, signal: str) -> None:
        """A failed kill is logged: the removal that follows is forced anyway."""
        assert rec.container_id is not None
        try:
            await self.runtime.kill(rec.container_id, signal)
        except AgentError as exc:
            log.warning("container_kill_failed", signal=signal, error=str(exc))

    async def _wait_exit(self, rec: TaskRecord, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if rec.exit_seen:
                return True
            rec.wake.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await rec.wake.wait()
            except TimeoutError:
                break
        status = await self._inspect(rec)
        return status is None or not status.running

    async def _follow_logs(self, rec: TaskRecord, since: int | None) -> None:
        """Copy the container's output to <logPath>/<app>/<taskId>/output.log (in a thread)."""
        if self.logs is None or rec.container_id is None:
            return
        try:
            path = await asyncio.to_thread(
                self.logs.output_file, rec.spec.source_app_name, rec.spec.task_id
            )
        except Exception as exc:
            log.warning("task_log_unavailable", error=str(exc))
            return
        opts = self.cfg.options
        writer = RotatingLogFile(path, opts.task_log_max_size_mb << 20, opts.task_log_max_files)

        def write(data: bytes) -> None:
            try:
                writer.write(data)
            except OSError as exc:
                log.warning("task_log_write_failed", error=str(exc))

        rec.stop_logs = self.runtime.follow_logs(rec.container_id, write, writer.close, since)

    async def _last_log_time(self, rec: TaskRecord) -> int | None:
        if self.logs is None:
            return None
        logs = self.logs

        def mtime() -> float:
            return logs.output_file(rec.spec.source_app_name, rec.spec.task_id).stat().st_mtime

        try:
            return int(await asyncio.to_thread(mtime)) + 1
        except Exception:
            return None

    async def sample_usage_forever(self, cgroup_root: Path, proc_root: Path) -> None:
        interval = self.cfg.options.usage_sample_interval_s
        while True:
            await self.sample_usage(cgroup_root, proc_root)
            await asyncio.sleep(interval)

    async def sample_usage(self, cgroup_root: Path, proc_root: Path) -> None:
        """CPU and memory of every running task, from its cgroup files (one thread hop)."""
        running = [r for r in self.active() if r.state is TaskState.RUNNING and r.container_id]
        for rec in running:
            if not rec.pid:
                try:
                    status = await self.runtime.inspect(rec.container_id or "")
                except AgentError:
                    continue
                rec.pid = status.pid if status is not None and status.running else 0

        def read_all() -> list[tuple[TaskRecord, CgroupUsage | None]]:
            return [(r, read_usage(cgroup_root, proc_root, r.pid)) for r in running if r.pid]

        for rec, usage in await asyncio.to_thread(read_all):
            rec.usage = usage

    def usage(self) -> list[TaskUsage]:
        return [
            TaskUsage(r.instance_id, r.spec.task_id, r.spec.source_app_name, r.usage)
            for r in self.active()
            if r.usage is not None
        ]

    async def _remove_container(self, rec: TaskRecord) -> None:
        """Remove the container, a few tries; the reaper is the net for what still fails."""
        if not rec.container_id:
            return
        for attempt in range(3):
            try:
                await self.runtime.remove(rec.container_id)
                break
            except AgentError as exc:
                rec.error = f"Error removing container {rec.container_id}: {exc}"
                if attempt < 2:
                    await asyncio.sleep(1.0)
        self._by_container.pop(rec.container_id, None)

    async def _deprovision(self, rec: TaskRecord) -> None:
        # The container's labels and exit state are the other record of the outcome: remove it
        # only once the RUN_COMPLETED report is safely on disk.
        await self.sink.persisted()
        await self._remove_container(rec)
        self._transition(rec, TaskState.DEPROVISIONING)
        if not self.cfg.options.cache_images and rec.image_id:
            try:
                await self.runtime.remove_image(rec.image_id)
            except AgentError as exc:
                rec.error = f"Error removing image {rec.spec.image}: {exc}"
        self._transition(rec, TaskState.STOPPED)
