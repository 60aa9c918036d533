"""The agent's exception tree. Every error the agent raises on purpose is one of these::

    AgentError
    ├── ConfigError                 bad configuration (one line per problem)
    ├── AllocationError             a resource lock cannot be taken
    │   ├── UnknownNode
    │   ├── CoresUnavailable
    │   ├── InsufficientMemory
    │   ├── InvalidRequest
    │   └── AlreadyLocked
    ├── MessageError                a malformed command from the controller (HTTP 400)
    ├── TaskNotFound                an instanceId the agent does not know (HTTP 404)
    ├── IllegalTransition           a task state change the state machine does not allow
    └── ContainerRuntimeError         the container runtime failed
        ├── RuntimeUnavailable      the Docker engine does not answer
        ├── ContainerNotFound
        ├── ImageNotFound
        └── ImagePullFailed

Each class has a stable ``code`` and the HTTP status the API answers with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class AgentError(Exception):
    code: ClassVar[str] = "agent_error"
    http_status: ClassVar[int] = 500


class ConfigError(AgentError):
    """One or more problems in a configuration file; each names its dotted key."""

    code = "config_error"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class AllocationError(AgentError):
    code = "allocation_failed"
    http_status = 409


class UnknownNode(AllocationError):
    code = "unknown_numa_node"


class CoresUnavailable(AllocationError):
    code = "cores_unavailable"


class InsufficientMemory(AllocationError):
    code = "insufficient_memory"


class InvalidRequest(AllocationError):
    code = "invalid_resource_request"


class AlreadyLocked(AllocationError):
    code = "already_locked"


class MessageError(AgentError):
    """A command body that cannot be understood; the message names the field."""

    code = "bad_message"
    http_status = 400


class TaskNotFound(AgentError):
    code = "task_not_found"
    http_status = 404


class IllegalTransition(AgentError):
    code = "illegal_transition"

    def __init__(self, instance_id: str, old: str, new: str) -> None:
        super().__init__(f"{instance_id}: no defined transition from {old} to {new}")


class ContainerRuntimeError(AgentError):
    code = "runtime_error"
    http_status = 503


class RuntimeUnavailable(ContainerRuntimeError):
    code = "docker_unavailable"


class ContainerNotFound(ContainerRuntimeError):
    code = "container_not_found"
    http_status = 404


class ImageNotFound(ContainerRuntimeError):
    code = "image_not_found"
    http_status = 404


class ImagePullFailed(ContainerRuntimeError):
    code = "image_pull_failed"
