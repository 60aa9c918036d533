"""Start-up recovery from container labels (spec §6.3) and the zombie reaper (spec §6.6).

Container labels are the source of truth: every task container carries its spec and its
ExecutorTaskInfo. Recovery re-attaches running containers and reports the real outcome of those that
exited while the agent was down. The reaper removes containers of ours that no live task owns and
the controller does not list; a container with garbled labels is reaped, never a crash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.config import Config
from agent.containers import (
    JOB_TYPE_TASK,
    LABEL_INFO,
    LABEL_INSTANCE_ID,
    LABEL_JOB_TYPE,
    LABEL_SPEC,
    ContainerRuntime,
    ContainerSummary,
)
from agent.errors import AgentError, MessageError
from agent.models import TaskSpec, parse_task_spec
from agent.tasks import TaskManager

log = structlog.get_logger(__name__)

REAP_INTERVAL_S = 60.0
KNOWN_JOB_TYPES = frozenset({"COMPUTATION", "SERVICE", "LOCAL_SERVICE"})

# instanceIds the controller knows for this executor: (current ids, stale ids), or None when it
# could not say (no leader, an error, or no data).
KnownInstances = tuple[frozenset[str], frozenset[str]] | None
FetchKnown = Callable[[str], Awaitable[KnownInstances]]


@dataclass(frozen=True, slots=True)
class ParsedContainer:
    summary: ContainerSummary
    spec: TaskSpec
    info: dict[str, Any]


@dataclass(slots=True)
class RecoveryResult:
    adopted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def parse_labels(summary: ContainerSummary) -> ParsedContainer | str:
    """The spec and info of a task container, or why its labels cannot be used."""
    labels = summary.labels
    if labels.get(LABEL_JOB_TYPE) != JOB_TYPE_TASK:
        return f"job type {labels.get(LABEL_JOB_TYPE)!r} is not {JOB_TYPE_TASK}"
    instance_id = labels.get(LABEL_INSTANCE_ID)
    if not instance_id:
        return f"label {LABEL_INSTANCE_ID} is missing"
    try:
        spec = parse_task_spec(json.loads(labels.get(LABEL_SPEC) or "null"), LABEL_SPEC)
        info = json.loads(labels.get(LABEL_INFO) or "{}")
    except (ValueError, MessageError) as exc:
        return f"labels cannot be parsed: {exc}"
    if not isinstance(info, dict):
        return f"label {LABEL_INFO} is not a JSON object"
    if spec.instance_id != instance_id:
        return f"label {LABEL_INSTANCE_ID} ({instance_id}) does not match the spec"
    return ParsedContainer(summary, spec, info)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def recover(
    manager: TaskManager, runtime: ContainerRuntime, known: KnownInstances
) -> RecoveryResult:
    """Re-attach every container of ours; raises RuntimeUnavailable when Docker does not answer."""
    result = RecoveryResult()
    containers = await runtime.list_managed()
    current, stale = known if known is not None else (frozenset(), frozenset())
    for summary in containers:
        parsed = parse_labels(summary)
        if isinstance(parsed, str):
            if (
                summary.labels.get(LABEL_JOB_TYPE) == JOB_TYPE_TASK
                or LABEL_JOB_TYPE not in summary.labels
            ):
                log.warning(
                    "recovery_container_unusable", container_id=summary.id[:12], reason=parsed
                )
            result.skipped.append(summary.id)
            continue
        iid = parsed.spec.instance_id
        if (current and iid not in current) or iid in stale:
            log.warning(
                "recovery_unknown_task_left_for_reaper",
                instance_id=iid,
                reason="stale" if iid in stale else "not known to the controller",
            )
            result.skipped.append(summary.id)
            continue
        verdict = manager.adopt(
            parsed.spec,
            executor_id=str(parsed.info.get("executorId") or ""),
            created=_int(parsed.info.get("created")),
            updated=_int(parsed.info.get("updated")),
            container_id=summary.id,
            image_id=summary.image_id,
            never_started=summary.state == "created",
        )
        if verdict.accepted:
            log.info("task_recovered", instance_id=iid, running=summary.running)
            result.adopted.append(iid)
        else:
            log.error("task_recovery_failed", instance_id=iid, reason=verdict.message)
            result.skipped.append(summary.id)
    return result


class Reaper:
    """Every minute: remove containers of ours that no live task owns and the controller does not
    list. Never touches a container of a known task; errors are logged, never raised."""

    def __init__(
        self,
        cfg: Config,
        manager: TaskManager,
        runtime: ContainerRuntime,
        fetch_current: FetchKnown,
        executor_id: str,
    ) -> None:
        self.cfg = cfg
        self.manager = manager
        self.runtime = runtime
        self.fetch_current = fetch_current
        self.executor_id = executor_id
        self.reaped = 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            await self.reap_once()

    async def reap_once(self) -> list[str]:
        try:
            containers = await self.runtime.list_managed()
        except AgentError as exc:
            log.info("reaper_skipped", reason=str(exc))
            return []
        known = await self.fetch_current(self.executor_id)
        listed = known[0] if known is not None else frozenset()
        removed: list[str] = []
        for summary in containers:
            labels = summary.labels
            job_type = labels.get(LABEL_JOB_TYPE)
            iid = labels.get(LABEL_INSTANCE_ID, "")
            if job_type in KNOWN_JOB_TYPES and job_type != JOB_TYPE_TASK:
                continue  # app / local-service containers are not ours to judge
            if self.manager.owns(iid, summary.id) or (iid and iid in listed):
                continue
            if await self._remove(summary, iid):
                removed.append(summary.id)
        return removed

    async def _remove(self, summary: ContainerSummary, instance_id: str) -> bool:
        try:
            if summary.running:
                await self.runtime.kill(summary.id)
            await self.runtime.remove(summary.id)
            if not self.cfg.options.cache_images and summary.image_id:
                await self.runtime.remove_image(summary.image_id)
        except AgentError as exc:
            log.warning("zombie_remove_failed", container_id=summary.id[:12], error=str(exc))
            return False
        self.reaped += 1
        log.warning(
            "zombie_container_removed",
            container_id=summary.id[:12],
            instance_id=instance_id or None,
            was_running=summary.running,
        )
        return True
