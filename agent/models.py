"""Wire types of the Drove protocol: executor messages, task specs, task states and results.

``parse_executor_message(body)`` turns a request body into a typed message or raises
:class:`MessageError` naming the field at fault (dotted path). Parsing follows Drove's JSON rules
(spec §0, §8.18): enums in any case, unknown fields ignored, null accepted for any list or map.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from agent.allocator import ResourceRequest
from agent.errors import MessageError
from agent.units import Duration


class TaskState(StrEnum):
    PENDING = "PENDING"
    PROVISIONING = "PROVISIONING"
    PROVISIONING_FAILED = "PROVISIONING_FAILED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RUN_COMPLETED = "RUN_COMPLETED"
    RUN_FAILED = "RUN_FAILED"
    DEPROVISIONING = "DEPROVISIONING"
    STOPPED = "STOPPED"
    LOST = "LOST"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.STOPPED, TaskState.LOST)

    @property
    def error(self) -> bool:
        return self in (TaskState.PROVISIONING_FAILED, TaskState.RUN_FAILED)


S = TaskState
# The reference's transitions (spec §3.5). Any state may also go to LOST when the state machine
# itself fails (the reference's "SM Execution error").
TRANSITIONS: Final[Mapping[TaskState, frozenset[TaskState]]] = {
    S.PENDING: frozenset({S.PROVISIONING, S.STOPPED}),
    S.PROVISIONING: frozenset({S.STARTING, S.PROVISIONING_FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.RUN_FAILED, S.RUN_COMPLETED}),
    S.RUNNING: frozenset({S.RUN_COMPLETED}),
    S.RUN_COMPLETED: frozenset({S.DEPROVISIONING}),
    S.RUN_FAILED: frozenset({S.DEPROVISIONING}),
    S.PROVISIONING_FAILED: frozenset({S.DEPROVISIONING}),
    S.DEPROVISIONING: frozenset({S.STOPPED}),
    S.UNKNOWN: frozenset({S.RUNNING, S.STOPPED}),
    S.STOPPED: frozenset(),
    S.LOST: frozenset(),
}
del S


def transition_allowed(old: TaskState, new: TaskState) -> bool:
    return new in TRANSITIONS[old] or (new is TaskState.LOST and not old.terminal)


class ResultStatus(StrEnum):
    SUCCESSFUL = "SUCCESSFUL"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    LOST = "LOST"


@dataclass(frozen=True, slots=True)
class TaskResult:
    status: ResultStatus
    exit_code: int

    def to_wire(self) -> dict[str, Any]:
        return {"status": str(self.status), "exitCode": self.exit_code}


class MessageType(StrEnum):
    START_INSTANCE = "START_INSTANCE"
    STOP_INSTANCE = "STOP_INSTANCE"
    START_TASK = "START_TASK"
    STOP_TASK = "STOP_TASK"
    START_LOCAL_SERVICE_INSTANCE = "START_LOCAL_SERVICE_INSTANCE"
    STOP_LOCAL_SERVICE_INSTANCE = "STOP_LOCAL_SERVICE_INSTANCE"
    BLACKLIST_REQUESTED = "BLACKLIST_REQUESTED"
    BLACKLIST = "BLACKLIST"
    UNBLACKLIST = "UNBLACKLIST"


UNSUPPORTED_TYPES: Final = frozenset(
    {
        MessageType.START_INSTANCE,
        MessageType.STOP_INSTANCE,
        MessageType.START_LOCAL_SERVICE_INSTANCE,
        MessageType.STOP_LOCAL_SERVICE_INSTANCE,
    }
)


# --- reading JSON with paths ------------------------------------------------------------------


class _Obj:
    """A JSON object being read; every problem raises MessageError naming ``path.key``."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise MessageError(f"{path}: must be a JSON object, not {_kind(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def opt(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, *, required: bool = True, empty: bool = False) -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise MessageError(f"{self.at(key)}: is required")
            return ""
        if not isinstance(value, str):
            raise MessageError(f"{self.at(key)}: must be a string, not {_kind(value)}")
        if not value and required and not empty:
            raise MessageError(f"{self.at(key)}: must not be empty")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key)
        if value is None:
            if default is None:
                raise MessageError(f"{self.at(key)}: is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{self.at(key)}: must be a whole number, not {_kind(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise MessageError(f"{self.at(key)}: must be true or false, not {_kind(value)}")
        return value

    def enum(self, key: str, choices: list[str], default: str | None = None) -> str:
        value = self.data.get(key)
        if value is None:
            if default is None:
                raise MessageError(f"{self.at(key)}: is required (one of {', '.join(choices)})")
            return default
        if not isinstance(value, str) or value.upper() not in choices:
            raise MessageError(f"{self.at(key)}: {value!r} is not one of {', '.join(choices)}")
        return value.upper()

    def obj(self, key: str, *, required: bool = True) -> _Obj | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise MessageError(f"{self.at(key)}: is required")
            return None
        return _Obj(value, self.at(key))

    def array(self, key: str) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise MessageError(f"{self.at(key)}: must be a list, not {_kind(value)}")
        return value

    def str_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise MessageError(f"{self.at(key)}: must be an object, not {_kind(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if v is None:
                v = ""
            if not isinstance(v, str | int | float | bool):
                raise MessageError(f"{self.at(key)}.{k}: must be a string, not {_kind(v)}")
            out[str(k)] = v if isinstance(v, str) else json.dumps(v)
        return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _node_key(path: str, key: Any) -> int:
    try:
        node = int(str(key))
    except ValueError:
        raise MessageError(f"{path}: NUMA node key {key!r} is not a number") from None
    if node < 0:
        raise MessageError(f"{path}: NUMA node key {key!r} is negative")
    return node


# --- task spec --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Volume:
    path_in_container: str
    path_on_host: str
    read_only: bool


@dataclass(frozen=True, slots=True)
class HttpFetch:
    protocol: str
    hostname: str
    port: int
    path: str
    verb: str
    success_codes: frozenset[int]
    payload: str | None
    connection_timeout_s: float
    operation_timeout_s: float
    username: str | None
    password: str | None
    auth_header: str | None
    headers: Mapping[str, str]
    insecure: bool

    @property
    def url(self) -> str:
        path = self.path if self.path.startswith("/") else "/" + self.path
        return f"{self.protocol.lower()}://{self.hostname}:{self.port}{path}"


@dataclass(frozen=True, slots=True)
class ConfigFile:
    kind: str  # INLINE | EXECUTOR_LOCAL_FILE | EXECUTOR_HTTP_FETCH
    local_filename: str
    data: bytes | None = None
    file_path_on_host: str | None = None
    http: HttpFetch | None = None


@dataclass(frozen=True, slots=True)
class LoggingSpec:
    kind: str  # LOCAL | RSYSLOG
    max_size: str = "10m"
    max_files: int = 3
    compress: bool = True
    server: str = ""
    tag_prefix: str = ""
    tag_suffix: str = ""


@dataclass(frozen=True, slots=True)
class DirectDevice:
    path_on_host: str
    path_in_container: str
    permissions: str  # docker cgroup permissions: r, w, m, rw, rwm


@dataclass(frozen=True, slots=True)
class DeviceRequestSpec:
    driver: str
    count: int
    device_ids: tuple[str, ...]
    capabilities: tuple[tuple[str, ...], ...]
    options: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task_id: str
    source_app_name: str
    instance_id: str
    image: str
    pull_timeout: Duration
    resources: ResourceRequest
    volumes: tuple[Volume, ...] = ()
    configs: tuple[ConfigFile, ...] = ()
    logging: LoggingSpec | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    direct_devices: tuple[DirectDevice, ...] = ()
    device_requests: tuple[DeviceRequestSpec, ...] = ()
    user: str | None = None
    group: str | None = None
    wire: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def identity(self) -> str:
        """A canonical JSON of the spec, to tell an identical resend from a different spec."""
        return json.dumps(self.wire, sort_keys=True, separators=(",", ":"))

    def executable_wire(self) -> dict[str, Any]:
        return {"type": "DOCKER", "url": self.image, "dockerPullTimeout": str(self.pull_timeout)}

    def resources_wire(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "CPU",
                "cores": {str(n): sorted(c) for n, c in sorted(self.resources.cores.items())},
            },
            {
                "type": "MEMORY",
                "memoryInMB": {str(n): m for n, m in sorted(self.resources.memory_mb.items())},
            },
        ]

    def volumes_wire(self) -> list[dict[str, Any]]:
        return [
            {
                "pathInContainer": v.path_in_container,
                "pathOnHost": v.path_on_host,
                "mode": "READ_ONLY" if v.read_only else "READ_WRITE",
            }
            for v in self.volumes
        ]


_DEFAULT_PULL_TIMEOUT = Duration(15, "minutes")
_PERMS = {"READ_ONLY": "r", "WRITE_ONLY": "w", "MKNOD_ONLY": "m", "ALL": "rwm", "READ_WRITE": "rw"}


def _parse_resources(spec: _Obj) -> ResourceRequest:
    items = spec.array("resources")
    if not items:
        raise MessageError(f"{spec.at('resources')}: is required (CPU and MEMORY allocations)")
    cores: dict[int, frozenset[int]] = {}
    memory: dict[int, int] = {}
    for index, item in enumerate(items):
        res = _Obj(item, spec.at(f"resources[{index}]"))
        kind = res.enum("type", ["CPU", "MEMORY"])
        if kind == "CPU":
            raw = res.opt("cores")
            if raw is not None and not isinstance(raw, dict):
                raise MessageError(f"{res.at('cores')}: must be an object of node -> core list")
            for key, value in (raw or {}).items():
                node = _node_key(res.at("cores"), key)
                if not isinstance(value, list) or not all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value
                ):
                    raise MessageError(f"{res.at('cores')}.{key}: must be a list of core numbers")
                cores[node] = cores.get(node, frozenset()) | frozenset(value)
        else:
            raw = res.opt("memoryInMB")
            if raw is not None and not isinstance(raw, dict):
                raise MessageError(f"{res.at('memoryInMB')}: must be an object of node -> MB")
            for key, value in (raw or {}).items():
                node = _node_key(res.at("memoryInMB"), key)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise MessageError(
                        f"{res.at('memoryInMB')}.{key}: must be a positive whole number of MB"
                    )
                memory[node] = memory.get(node, 0) + value
    if not any(cores.values()):
        raise MessageError(f"{spec.at('resources')}: no CPU cores are allocated")
    if not memory:
        raise MessageError(f"{spec.at('resources')}: no memory is allocated")
    return ResourceRequest(cores={n: c for n, c in cores.items() if c}, memory_mb=memory)


def _parse_duration(obj: _Obj, key: str, default: Duration) -> Duration:
    value = obj.opt(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MessageError(f"{obj.at(key)}: must be a duration such as '100 seconds'")
    try:
        return Duration.parse(str(value))
    except ValueError as exc:
        raise MessageError(f"{obj.at(key)}: {exc}") from None


def _parse_http(obj: _Obj) -> HttpFetch:
    codes = obj.array("successCodes") or [200]
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise MessageError(f"{obj.at('successCodes')}: must be a list of HTTP status codes")
    port = obj.integer("port", 0)
    if not 0 < port < 65536:
        raise MessageError(f"{obj.at('port')}: {port} is not a TCP port")
    return HttpFetch(
        protocol=obj.enum("protocol", ["HTTP", "HTTPS"], "HTTP"),
        hostname=obj.string("hostname"),
        port=port,
        path=obj.string("path", required=False) or "/",
        verb=obj.enum("verb", ["GET", "POST", "PUT"], "GET"),
        success_codes=frozenset(codes),
        payload=obj.string("payload", required=False) or None,
        connection_timeout_s=_parse_duration(
            obj, "connectionTimeout", Duration(1, "seconds")
        ).seconds,
        operation_timeout_s=_parse_duration(
            obj, "operationTimeout", Duration(1, "seconds")
        ).seconds,
        username=obj.string("username", required=False) or None,
        password=obj.string("password", required=False) or None,
        auth_header=obj.string("authHeader", required=False) or None,
        headers=obj.str_map("headers"),
        insecure=obj.boolean("insecure", False),
    )


def _parse_config_file(obj: _Obj) -> ConfigFile:
    kind = obj.enum(
        "type", ["INLINE", "EXECUTOR_LOCAL_FILE", "EXECUTOR_HTTP_FETCH", "CONTROLLER_HTTP_FETCH"]
    )
    name = obj.string("localFilename")
    if not name.startswith("/"):
        raise MessageError(f"{obj.at('localFilename')}: {name!r} must be an absolute path")
    if ".." in name.split("/"):
        raise MessageError(f"{obj.at('localFilename')}: {name!r} must not contain '..'")
    if kind == "INLINE":
        raw = obj.string("data", required=False)
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise MessageError(f"{obj.at('data')}: is not valid base64") from None
        return ConfigFile(kind, name, data=data)
    if kind == "EXECUTOR_LOCAL_FILE":
        return ConfigFile(kind, name, file_path_on_host=obj.string("filePathOnHost"))
    if kind == "EXECUTOR_HTTP_FETCH":
        http = obj.obj("http")
        assert http is not None
        return ConfigFile(kind, name, http=_parse_http(http))
    # CONTROLLER_HTTP_FETCH must have been resolved by the controller; the task fails to start
    # (RUN_FAILED), as in the reference.
    return ConfigFile(kind, name)


def _parse_logging(obj: _Obj | None) -> LoggingSpec | None:
    if obj is None:
        return None
    kind = obj.enum("type", ["LOCAL", "RSYSLOG"], "LOCAL")
    if kind == "LOCAL":
        return LoggingSpec(
            kind,
            max_size=obj.string("maxSize", required=False) or "10m",
            max_files=obj.integer("maxFiles", 3),
            compress=obj.boolean("compress", True),
        )
    return LoggingSpec(
        kind,
        server=obj.string("server"),
        tag_prefix=obj.string("tagPrefix", required=False),
        tag_suffix=obj.string("tagSuffix", required=False),
    )


def _parse_devices(spec: _Obj) -> tuple[tuple[DirectDevice, ...], tuple[DeviceRequestSpec, ...]]:
    direct: list[DirectDevice] = []
    requests: list[DeviceRequestSpec] = []
    for index, item in enumerate(spec.array("devices")):
        dev = _Obj(item, spec.at(f"devices[{index}]"))
        kind = dev.enum("type", ["DIRECT", "DETAILED"], "DIRECT")
        if kind == "DIRECT":
            host = dev.string("pathOnHost")
            perms = dev.enum("permissions", list(_PERMS), "ALL")
            direct.append(
                DirectDevice(
                    host, dev.string("pathInContainer", required=False) or host, _PERMS[perms]
                )
            )
        else:
            caps = dev.array("capabilities")
            if not all(isinstance(c, list) and all(isinstance(x, str) for x in c) for c in caps):
                raise MessageError(f"{dev.at('capabilities')}: must be a list of string lists")
            ids = dev.array("deviceIds")
            requests.append(
                DeviceRequestSpec(
                    driver=dev.string("driver", required=False),
                    count=dev.integer("count", 0),
                    device_ids=tuple(str(i) for i in ids),
                    capabilities=tuple(tuple(c) for c in caps),
                    options=dev.str_map("options"),
                )
            )
    return tuple(direct), tuple(requests)


def parse_task_spec(data: Any, path: str = "spec") -> TaskSpec:
    if data is None:
        raise MessageError(f"{path}: is required")
    spec = _Obj(data, path)
    executable = spec.obj("executable")
    assert executable is not None
    executable.enum("type", ["DOCKER"], "DOCKER")
    args = spec.array("args")
    if not all(isinstance(a, str) for a in args):
        raise MessageError(f"{spec.at('args')}: must be a list of strings")
    volumes = []
    for index, item in enumerate(spec.array("volumes")):
        vol = _Obj(item, spec.at(f"volumes[{index}]"))
        host = vol.string("pathOnHost")
        volumes.append(
            Volume(
                path_in_container=vol.string("pathInContainer", required=False) or host,
                path_on_host=host,
                read_only=vol.enum("mode", ["READ_WRITE", "READ_ONLY"], "READ_WRITE")
                == "READ_ONLY",
            )
        )
    configs = tuple(
        _parse_config_file(_Obj(item, spec.at(f"configs[{index}]")))
        for index, item in enumerate(spec.array("configs"))
    )
    user_obj = spec.obj("userSpec", required=False)
    direct, requests = _parse_devices(spec)
    instance_id = spec.string("instanceId")
    if "/" in instance_id or len(instance_id) > 200:
        raise MessageError(f"{spec.at('instanceId')}: {instance_id!r} is not a valid instance id")
    return TaskSpec(
        task_id=spec.string("taskId"),
        source_app_name=spec.string("sourceAppName"),
        instance_id=instance_id,
        image=executable.string("url"),
        pull_timeout=_parse_duration(executable, "dockerPullTimeout", _DEFAULT_PULL_TIMEOUT),
        resources=_parse_resources(spec),
        volumes=tuple(volumes),
        configs=configs,
        logging=_parse_logging(spec.obj("loggingSpec", required=False)),
        env=spec.str_map("env"),
        args=tuple(args),
        direct_devices=direct,
        device_requests=requests,
        user=user_obj.string("user") if user_obj else None,
        group=(user_obj.string("group", required=False) or None) if user_obj else None,
        wire=dict(spec.data),
    )


# --- executor messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorMessage:
    type: MessageType
    header: Mapping[str, Any]
    spec: TaskSpec | None = None
    instance_id: str | None = None

    @property
    def message_id(self) -> str:
        return str(self.header.get("id", ""))


def parse_executor_message(body: Any) -> ExecutorMessage:
    msg = _Obj(body, "(body)")
    msg.path = ""
    kind = MessageType(msg.enum("type", list(MessageType)))
    header = msg.obj("header")
    assert header is not None
    header.string("id")
    header.enum("senderType", ["CONTROLLER", "EXECUTOR"], "CONTROLLER")
    header.enum("direction", ["REQUEST", "REPLY"], "REQUEST")
    if header.opt("messageTime") is not None:
        header.integer("messageTime")
    address = msg.obj("address", required=False)
    if address is not None and address.opt("port") is not None:
        address.integer("port")
    if kind is MessageType.START_TASK:
        return ExecutorMessage(kind, header.data, spec=parse_task_spec(msg.opt("spec")))
    if kind is MessageType.STOP_TASK:
        return ExecutorMessage(kind, header.data, instance_id=msg.string("instanceId"))
    return ExecutorMessage(kind, header.data)
