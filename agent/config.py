"""Load and validate the agent's YAML configuration (Drove executor key names, spec §7.2).

``load_config(path)`` returns a frozen :class:`Config` or raises :class:`ConfigError` listing every
problem, one line each, starting with the dotted key at fault. Unknown keys are errors, except the
Dropwizard ``logging`` section, which is ignored with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.errors import ConfigError
from agent.units import Duration, parse_data_size

T = TypeVar("T")
_MB = 1024 * 1024


class UpdateMode(StrEnum):
    STANDALONE = "STANDALONE"
    RPC = "RPC"
    STORE = "STORE"


class ImagePullPolicy(StrEnum):
    ALWAYS = "ALWAYS"
    IF_NOT_PRESENT = "IF_NOT_PRESENT"
    NEVER = "NEVER"


class NodeType(StrEnum):
    CONTROLLER = "CONTROLLER"
    EXECUTOR = "EXECUTOR"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 3000


@dataclass(frozen=True, slots=True)
class UserSpec:
    user: str
    group: str | None = None

    def docker_user(self) -> str:
        return f"{self.user}:{self.group}" if self.group else self.user


@dataclass(frozen=True, slots=True)
class OptionsConfig:
    hostname: str | None = None
    cache_images: bool = True
    max_open_files: int = 470_000
    log_buffer_size_mb: int = 10
    cache_file_size_mb: int = 20
    cache_file_count: int = 3
    container_command_timeout_s: float = 30.0
    docker_socket_path: str = "/var/run/docker.sock"
    default_user_spec: UserSpec | None = None
    remote_update_mode: UpdateMode | None = None
    controller_connect_timeout_s: float = 1.0
    controller_response_timeout_s: float = 1.0
    image_pull_policy: ImagePullPolicy = ImagePullPolicy.IF_NOT_PRESENT
    task_stop_grace_period_s: float = 0.0
    state_dir: str = "/var/lib/drove-agent"
    docker_pool_size: int = 8
    log_path: str = "/var/log/drove-agent/tasks"
    task_log_max_size_mb: int = 10
    task_log_max_files: int = 5
    usage_sample_interval_s: float = 15.0


@dataclass(frozen=True, slots=True)
class OverProvisioningConfig:
    enabled: bool = False
    cpu_multiplier: int = 1
    memory_multiplier: int = 1


@dataclass(frozen=True, slots=True)
class ResourcesConfig:
    os_cores: frozenset[int] = frozenset()
    exposed_mem_percentage: int = 100
    disable_numa_pinning: bool = False
    enable_nvidia_gpu: bool = False
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    over_provisioning: OverProvisioningConfig = OverProvisioningConfig()


@dataclass(frozen=True, slots=True)
class ControllersConfig:
    endpoints: tuple[str, ...]
    leadership_check_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ZookeeperConfig:
    connection_string: str
    namespace: str = "drove"


@dataclass(frozen=True, slots=True)
class ClusterAuthConfig:
    controller_secret: str = "DefaultControllerSecret"
    executor_secret: str = "DefaultExecutorSecret"

    def accepted(self) -> tuple[str, ...]:
        """Secrets accepted on incoming requests: those of either node type (spec §1.4)."""
        return (self.controller_secret, self.executor_secret)


@dataclass(frozen=True, slots=True)
class RegistryCredentials:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    options: OptionsConfig = OptionsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    controllers: ControllersConfig | None = None
    zookeeper: ZookeeperConfig | None = None
    cluster_auth: ClusterAuthConfig = ClusterAuthConfig()
    docker_auth: Mapping[str, RegistryCredentials] = field(default_factory=dict)
    mode: UpdateMode = UpdateMode.STANDALONE
    warnings: tuple[str, ...] = ()


# --- reading ---------------------------------------------------------------

_ENV_RE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_.]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: Mapping[str, str], problems: list[str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; ``$${VAR}`` stays literal. Unset ``${VAR}`` is an
    error, as in Dropwizard's strict substitutor."""

    def replace_at(match: re.Match[str], offset: int) -> str:
        escaped, name, default = match.groups()
        if escaped:
            return match.group(0)[1:]
        value = env.get(name)
        if value is not None:
            return value
        if default is not None:
            return default
        line = text.count("\n", 0, offset + match.start()) + 1
        problems.append(f"line {line}: environment variable {name} is not set (${{{name}}})")
        return ""

    # Comments are left alone, so a config may document ${VAR} in a comment.
    out: list[str] = []
    offset = 0
    for line in text.splitlines(keepends=True):
        cut = _comment_start(line)
        out.append(_ENV_RE.sub(partial(replace_at, offset=offset), line[:cut]) + line[cut:])
        offset += len(line)
    return "".join(out)


def _comment_start(line: str) -> int:
    """Index where a YAML comment starts in ``line`` (len(line) when there is none)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return len(line)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class _Section:
    """Reads one mapping of the YAML document, recording problems under dotted key paths."""

    def __init__(self, data: Any, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(None, f"must be a mapping, not {type(data).__name__}")
            data = {}
        self.data: dict[Any, Any] = data

    def key(self, key: str | None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> None:
        self.problems.append(f"{self.key(key)}: {message}")

    def has(self, key: str) -> bool:
        self.seen.add(key)
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def _get(self, key: str, default: T, convert: Callable[[Any], T]) -> T:
        value = self.raw(key)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def string(self, key: str, default: str | None = None, max_len: int = 4096) -> str | None:
        def convert(value: Any) -> str:
            if isinstance(value, bool | dict | list):
                raise ValueError(f"{_fmt(value)} is not a string")
            text = str(value)
            if len(text) > max_len:
                raise ValueError(f"is {len(text)} characters long, above the maximum {max_len}")
            return text

        return self._get(key, default, convert)

    def required_string(self, key: str) -> str:
        value = self.string(key)
        if not value:
            self.error(key, "is required and must not be empty")
            return ""
        return value

    def boolean(self, key: str, default: bool) -> bool:
        def convert(value: Any) -> bool:
            if not isinstance(value, bool):
                raise ValueError(f"{_fmt(value)} is not true or false")
            return value

        return self._get(key, default, convert)

    def integer(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        def convert(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError(f"{_fmt(value)} is not a whole number")
            try:
                number = int(str(value).replace("_", ""))
            except ValueError:
                raise ValueError(f"{_fmt(value)} is not a whole number") from None
            _bounded(number, lo, hi, str(number))
            return number

        return self._get(key, default, convert)

    def seconds(
        self, key: str, default: float, lo: float | None = None, hi: float | None = None
    ) -> float:
        def convert(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError(f"{_fmt(value)} is not a duration like '30 seconds'")
            duration = Duration.parse(str(value))
            return _bounded(duration.seconds, lo, hi, str(value), unit=" seconds")

        return self._get(key, default, convert)

    def megabytes(self, key: str, default: int, lo_mb: float, hi_mb: float) -> int:
        def convert(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ValueError(f"{_fmt(value)} is not a data size like '10MB'")
            size = parse_data_size(str(value))
            _bounded(size / 1_000_000, lo_mb, hi_mb, str(value), unit=" MB")
            return max(1, size // _MB)

        return self._get(key, default, convert)

    def choice(self, key: str, default: T, enum: Callable[[str], T], names: list[str]) -> T:
        def convert(value: Any) -> T:
            text = str(value).upper()
            if text not in names:
                raise ValueError(f"{_fmt(value)} is not one of {', '.join(names)}")
            return enum(text)

        return self._get(key, default, convert)

    def sequence(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be a list, not {type(value).__name__}")
            return []
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key), self.key(key), self.problems)

    def finish(self, ignored: Mapping[str, str] | None = None) -> None:
        for key in self.data:
            if str(key) in self.seen:
                continue
            if ignored and str(key) in ignored:
                continue
            self.error(str(key), "unknown key")


def _bounded(value: float, lo: float | None, hi: float | None, shown: str, unit: str = "") -> float:
    if lo is not None and value < lo:
        raise ValueError(f"{shown} is below the minimum {lo:g}{unit}")
    if hi is not None and value > hi:
        raise ValueError(f"{shown} is above the maximum {hi:g}{unit}")
    return value


def _read_server(sec: _Section) -> ServerConfig:
    host = sec.string("host", "0.0.0.0") or "0.0.0.0"
    port: int | None = None
    connectors = sec.sequence("applicationConnectors")
    for index, item in enumerate(connectors):
        conn = _Section(item, sec.key(f"applicationConnectors[{index}]"), sec.problems)
        kind = conn.string("type", "http") or "http"
        if kind.lower() != "http":
            conn.error("type", f"{kind!r} is not supported; only plain http connectors are")
        conn_port = conn.integer("port", 3000, 0, 65535)
        bind = conn.string("bindHost")
        conn.finish()
        if index == 0:
            port = conn_port
            host = bind or host
    # Admin connectors and the server type belong to Dropwizard; they are accepted and unused.
    sec.raw("adminConnectors")
    sec.raw("type")
    if sec.has("port"):
        port = sec.integer("port", 3000, 0, 65535)
    sec.finish()
    return ServerConfig(host=host, port=3000 if port is None else port)


def _read_user(sec: _Section) -> UserSpec | None:
    if not sec.data:
        return None
    user = sec.required_string("user")
    group = sec.string("group")
    sec.finish()
    return UserSpec(user=user, group=group or None)


def _read_options(sec: _Section) -> OptionsConfig:
    d = OptionsConfig()
    mode = sec.choice("remoteUpdateMode", None, UpdateMode, ["STORE", "RPC"])
    options = OptionsConfig(
        hostname=sec.string("hostname", None, max_len=255) or None,
        cache_images=sec.boolean("cacheImages", d.cache_images),
        max_open_files=sec.integer("maxOpenFiles", 0, 0) or d.max_open_files,
        log_buffer_size_mb=sec.megabytes("logBufferSize", d.log_buffer_size_mb, 1, 128),
        cache_file_size_mb=sec.megabytes("cacheFileSize", d.cache_file_size_mb, 10, 100 * 1024),
        cache_file_count=sec.integer("cacheFileCount", 0, None, 1024) or d.cache_file_count,
        container_command_timeout_s=sec.seconds(
            "containerCommandTimeout", d.container_command_timeout_s, 5, 300
        ),
        docker_socket_path=sec.string("dockerSocketPath", d.docker_socket_path)
        or d.docker_socket_path,
        default_user_spec=_read_user(sec.section("defaultUserSpec")),
        remote_update_mode=mode,
        controller_connect_timeout_s=sec.seconds(
            "controllerConnectTimeout", d.controller_connect_timeout_s, 0.001, 60
        ),
        controller_response_timeout_s=sec.seconds(
            "controllerResponseTimeout", d.controller_response_timeout_s, 0.001, 300
        ),
        image_pull_policy=sec.choice(
            "imagePullPolicy", d.image_pull_policy, ImagePullPolicy, list(ImagePullPolicy)
        ),
        task_stop_grace_period_s=sec.seconds(
            "taskStopGracePeriod", d.task_stop_grace_period_s, 0, 3600
        ),
        state_dir=sec.string("stateDir", d.state_dir) or d.state_dir,
        docker_pool_size=sec.integer("dockerPoolSize", d.docker_pool_size, 1, 64),
        log_path=sec.string("logPath", d.log_path) or d.log_path,
        task_log_max_size_mb=sec.megabytes("taskLogMaxSize", d.task_log_max_size_mb, 1, 10240),
        task_log_max_files=sec.integer("taskLogMaxFiles", d.task_log_max_files, 1, 100),
        usage_sample_interval_s=sec.seconds(
            "usageSampleInterval", d.usage_sample_interval_s, 1, 3600
        ),
    )
    sec.finish()
    return options


def _read_int_list(sec: _Section, key: str) -> frozenset[int]:
    result: set[int] = set()
    for index, item in enumerate(sec.sequence(key)):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            sec.error(f"{key}[{index}]", f"{_fmt(item)} is not a core number")
        else:
            result.add(item)
    return frozenset(result)


def _read_metadata(sec: _Section) -> dict[str, str]:
    """Static metadata: CONFIGURED providers and ENVIRONMENT providers (read once at start)."""
    limit = sec.integer("valueMaxLimit", 1024, 1)
    blacklist: list[re.Pattern[str]] = []
    for index, item in enumerate(sec.sequence("blacklistedKeys")):
        try:
            blacklist.append(re.compile(str(item)))
        except re.error as exc:
            sec.error(f"blacklistedKeys[{index}]", f"{item!r} is not a regular expression: {exc}")
    providers = sec.section("metadataProviders")
    seen: dict[str, int] = {}
    merged: dict[str, str] = {}
    for name in list(providers.data):
        prov = providers.section(str(name))
        kind = prov.choice("type", "", str, ["CONFIGURED", "ENVIRONMENT", "DYNAMIC_COMMAND"])
        values: dict[str, str] = {}
        if kind == "CONFIGURED":
            for key, value in prov.section("metadata").data.items():
                values[str(key)] = "" if value is None else str(value)
            prov.seen.add("metadata")
        elif kind == "ENVIRONMENT":
            patterns = [str(p) for p in prov.sequence("whitelistedVariables")]
            for key, value in os.environ.items():
                if any(re.fullmatch(p, key) for p in patterns):
                    values[key] = value
        elif kind == "DYNAMIC_COMMAND":
            prov.error("type", "DYNAMIC_COMMAND metadata providers are not supported yet")
            prov.raw("commandRerunInSecs")
            prov.raw("commands")
        elif not prov.has("type"):
            prov.error("type", "is required (CONFIGURED, ENVIRONMENT or DYNAMIC_COMMAND)")
        prov.finish()
        for key, value in values.items():
            seen[key] = seen.get(key, 0) + 1
            merged[key] = value
    providers.finish({k: "" for k in providers.data})
    sec.finish()
    return {
        k: v
        for k, v in merged.items()
        if seen[k] == 1 and len(v) <= limit and not any(p.search(k) for p in blacklist)
    }


def _read_resources(sec: _Section) -> ResourcesConfig:
    over = sec.section("overProvisioning")
    over_cfg = OverProvisioningConfig(
        enabled=over.boolean("enabled", False),
        cpu_multiplier=over.integer("cpuMultiplier", 1, 1, 64),
        memory_multiplier=over.integer("memoryMultiplier", 1, 1, 20),
    )
    over.finish()
    tags = tuple(str(t) for t in sec.sequence("tags"))
    resources = ResourcesConfig(
        os_cores=_read_int_list(sec, "osCores"),
        exposed_mem_percentage=sec.integer("exposedMemPercentage", 100, 50, 100),
        disable_numa_pinning=sec.boolean("disableNUMAPinning", False),
        enable_nvidia_gpu=sec.boolean("enableNvidiaGpu", False),
        tags=tags,
        metadata=_read_metadata(sec.section("metadata")),
        over_provisioning=over_cfg,
    )
    sec.finish()
    return resources


def _read_controllers(sec: _Section) -> ControllersConfig:
    endpoints: list[str] = []
    for index, item in enumerate(sec.sequence("endpoints")):
        url = str(item).rstrip("/")
        match = re.fullmatch(r"(https?)://([^/:]+)(?::(\d+))?(/.*)?", url)
        if not match:
            sec.error(f"endpoints[{index}]", f"{item!r} is not an http(s) URL")
        elif match.group(3) is None:
            sec.error(f"endpoints[{index}]", f"{item!r} has no port; write it as host:port")
        else:
            endpoints.append(url)
    if not sec.sequence("endpoints"):
        sec.error("endpoints", "must list at least one controller URL")
    interval = sec.seconds("leadershipCheckInterval", 10.0, 3, 60)
    sec.finish()
    return ControllersConfig(endpoints=tuple(endpoints), leadership_check_interval_s=interval)


def _read_zookeeper(sec: _Section) -> ZookeeperConfig:
    zk = ZookeeperConfig(
        connection_string=sec.required_string("connectionString"),
        namespace=sec.string("nameSpace", "drove") or "drove",
    )
    sec.raw("port")
    sec.finish()
    return zk


def _read_cluster_auth(sec: _Section) -> ClusterAuthConfig:
    found: dict[NodeType, str] = {}
    for index, item in enumerate(sec.sequence("secrets")):
        entry = _Section(item, sec.key(f"secrets[{index}]"), sec.problems)
        node_type = entry.choice("nodeType", None, NodeType, list(NodeType))
        secret = entry.required_string("secret")
        entry.finish()
        if node_type is None:
            entry.error("nodeType", "is required (CONTROLLER or EXECUTOR)")
        elif node_type in found:
            entry.error("nodeType", f"{node_type} is listed twice")
        elif secret:
            found[node_type] = secret
    sec.finish()
    auth = ClusterAuthConfig(
        controller_secret=found.get(NodeType.CONTROLLER, "DefaultControllerSecret"),
        executor_secret=found.get(NodeType.EXECUTOR, "DefaultExecutorSecret"),
    )
    if auth.controller_secret == auth.executor_secret:
        sec.error("secrets", "secrets must be unique")
    return auth


def _read_docker_auth(sec: _Section) -> dict[str, RegistryCredentials]:
    entries = sec.section("entries")
    result: dict[str, RegistryCredentials] = {}
    for registry in list(entries.data):
        entry = entries.section(str(registry))
        entry.choice("type", "CREDENTIALS", str, ["CREDENTIALS"])
        result[str(registry)] = RegistryCredentials(
            username=entry.required_string("username"), password=entry.required_string("password")
        )
        entry.finish()
    entries.finish({k: "" for k in entries.data})
    sec.finish()
    return result


_IGNORED_TOP = {"logging": "Dropwizard logging is not used; the agent logs to stdout"}


def parse_config(data: Any, problems: list[str] | None = None) -> Config:
    """Convert a parsed YAML document into a Config; raises ConfigError with every problem."""
    problems = [] if problems is None else problems
    top = _Section(data, "", problems)
    warnings = [f"{key}: ignored ({why})" for key, why in _IGNORED_TOP.items() if key in top.data]
    server = _read_server(top.section("server"))
    options = _read_options(top.section("options"))
    resources = _read_resources(top.section("resources"))
    controllers = _read_controllers(top.section("controllers")) if top.has("controllers") else None
    zookeeper = _read_zookeeper(top.section("zookeeper")) if top.has("zookeeper") else None
    cluster_auth = _read_cluster_auth(top.section("clusterAuth"))
    docker_auth = _read_docker_auth(top.section("dockerAuth"))
    top.finish(_IGNORED_TOP)

    mode = options.remote_update_mode
    if mode is None:
        if zookeeper is not None:
            mode = UpdateMode.STORE
        elif controllers is not None:
            mode = UpdateMode.RPC
        else:
            mode = UpdateMode.STANDALONE
    if mode is UpdateMode.RPC and controllers is None:
        problems.append(
            "controllers: is required when options.remoteUpdateMode is RPC "
            "(list the controller URLs in controllers.endpoints)"
        )
    if mode is UpdateMode.STORE:
        if zookeeper is None:
            problems.append("zookeeper: is required when options.remoteUpdateMode is STORE")
        else:
            problems.append(
                "options.remoteUpdateMode: STORE (ZooKeeper) is not supported yet; "
                "set it to RPC and list controllers.endpoints"
            )
    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        options=options,
        resources=resources,
        controllers=controllers,
        zookeeper=zookeeper,
        cluster_auth=cluster_auth,
        docker_auth=docker_auth,
        mode=mode,
        warnings=tuple(warnings),
    )


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from exc
    problems: list[str] = []
    text = substitute_env(text, os.environ if env is None else env, problems)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([*problems, f"{path}: {where}not valid YAML: {problem}"]) from exc
    return parse_config(data, problems)
