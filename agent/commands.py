"""Operator commands: status, tasks (start, stop, logs, wait), events, doctor."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.client import AgentClient, ClientError
from agent.config import Config, UpdateMode, load_config
from agent.errors import AgentError, ConfigError
from agent.inventory import build_inventory, format_cpulist, read_topology

TERMINAL = ("STOPPED", "LOST")


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _cores_of(info: dict[str, Any]) -> str:
    for res in info.get("resources", []):
        if res.get("type") == "CPU":
            return ";".join(f"{n}:{format_cpulist(c)}" for n, c in sorted(res["cores"].items()))
    return "-"


def _memory_of(info: dict[str, Any]) -> int:
    for res in info.get("resources", []):
        if res.get("type") == "MEMORY":
            return sum(res["memoryInMB"].values())
    return 0


def _result(info: dict[str, Any]) -> str:
    result = info.get("taskResult")
    if not result:
        return "-"
    return f"{result['status']} ({result['exitCode']})"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_status(view: dict[str, Any], now_ms: int | None = None) -> str:
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    lines = [
        f"executor  {view['executorId']}  ({view['hostname']}:{view['port']})",
        f"state     {view['executorState']}   mode {view['mode']}   "
        f"leader {view.get('leader') or '-'}   uptime {_age(view['uptimeSeconds'])}",
        "docker    "
        + ("ok" if view["docker"]["ok"] else f"UNREACHABLE: {view['docker']['error']}"),
        f"reports   {view['reports']['queued']} queued, {view['reports']['sent']} sent, "
        f"{view['reports']['failedAttempts']} failed attempts",
        "",
    ]
    for node in view["nodes"]:
        cores = node["cores"]
        mem = node["memory"]
        lines.append(
            f"NUMA node {node['node']}: {len(cores['allocatable'])} cores "
            f"({len(cores['free'])} free, {len(cores['used'])} used, "
            f"{len(cores['reserved'])} reserved by osCores, {len(cores['offline'])} offline); "
            f"memory {mem['exposed']} MB exposed, {mem['used']} MB used, {mem['free']} MB free"
        )
        owners = cores["used"]
        cells = [f"{c}:{owners.get(str(c), 'free')}" for c in cores["allocatable"]]
        cells += [f"{c}:reserved" for c in cores["reserved"]]
        cells += [f"{c}:offline" for c in cores["offline"]]
        for i in range(0, len(cells), 4):
            lines.append("    " + "   ".join(cells[i : i + 4]))
    lines.append("")
    tasks = view["tasks"]
    if not tasks:
        lines.append("no tasks")
        return "\n".join(lines)
    rows = [["INSTANCE", "TASK", "APP", "STATE", "CORES", "MEM MB", "AGE", "RESULT", "ERROR"]]
    for info in sorted(tasks, key=lambda t: t.get("created", 0)):
        state = info["state"]
        if "pullProgress" in info:
            state += f" {info['pullProgress']:.0f}%"
        rows.append(
            [
                info["instanceId"],
                info["taskId"],
                info["sourceAppName"],
                state,
                _cores_of(info),
                str(_memory_of(info)),
                _age((now_ms - info.get("created", now_ms)) / 1000),
                _result(info),
                (info.get("errorMessage") or "")[:60],
            ]
        )
    lines += _table(rows)
    return "\n".join(lines)


def cmd_status(client: AgentClient, as_json: bool) -> int:
    view = client.get("/apis/v1/agent")
    if as_json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        print(render_status(view))
    return 0


def pick_cores(
    view: dict[str, Any], cores: int, memory_mb: int, node: int | None
) -> tuple[int, list[int]]:
    """Free cores on one NUMA node with room for the memory too."""
    candidates = [n for n in view["nodes"] if node is None or n["node"] == node]
    if node is not None and not candidates:
        raise ClientError(f"NUMA node {node} does not exist on this agent")
    for item in candidates:
        free = sorted(item["cores"]["free"])
        if len(free) >= cores and item["memory"]["free"] >= memory_mb:
            return item["node"], free[:cores]
    where = f"NUMA node {node}" if node is not None else "any NUMA node"
    raise ClientError(f"no room for {cores} core(s) and {memory_mb} MB on {where}")


def start_message(
    *,
    image: str,
    node: int,
    cores: list[int],
    memory_mb: int,
    env: dict[str, str],
    app: str,
    task_id: str,
    args: Sequence[str],
    pull_timeout: str,
) -> dict[str, Any]:
    instance_id = f"TI-{uuid.uuid4()}"
    return {
        "type": "START_TASK",
        "header": {
            "id": str(uuid.uuid4()),
            "senderType": "CONTROLLER",
            "direction": "REQUEST",
            "messageTime": int(time.time() * 1000),
        },
        "spec": {
            "taskId": task_id,
            "sourceAppName": app,
            "instanceId": instance_id,
            "executable": {"type": "DOCKER", "url": image, "dockerPullTimeout": pull_timeout},
            "resources": [
                {"type": "CPU", "cores": {str(node): cores}},
                {"type": "MEMORY", "memoryInMB": {str(node): memory_mb}},
            ],
            "env": env,
            "args": list(args),
        },
    }


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientError(f"-e {item!r}: write it as KEY=VALUE")
        env[key] = value
    return env


def cmd_tasks_start(client: AgentClient, args: Any, out: Callable[[str], None] = print) -> int:
    view = client.get("/apis/v1/agent")
    node, cores = pick_cores(view, args.cores, args.memory, args.node)
    command = list(args.args)
    if command and command[0] == "--":
        command = command[1:]
    message = start_message(
        image=args.image,
        node=node,
        cores=cores,
        memory_mb=args.memory,
        env=_parse_env(args.env or []),
        app=args.app,
        task_id=args.id or f"task-{int(time.time())}",
        args=command,
        pull_timeout=args.pull_timeout,
    )
    instance_id = message["spec"]["instanceId"]
    reply = client.post("/apis/v1/messages", message)
    if reply.get("status") != "ACCEPTED":
        raise ClientError(f"the agent refused the task: {reply.get('message', 'no reason given')}")
    out(f"{instance_id}: accepted on NUMA node {node}, cores {format_cpulist(cores)}")
    if args.detach:
        return 0
    last = ""
    last_progress = -1.0
    while True:
        agent_view = client.get("/apis/v1/agent")
        info = next((t for t in agent_view["tasks"] if t["instanceId"] == instance_id), None)
        if info is None:
            raise ClientError(f"{instance_id} disappeared from the agent")
        state = info["state"]
        progress = info.get("pullProgress")
        if state != last:
            out(f"{instance_id}: {state}")
            last = state
        if progress is not None and progress >= last_progress + 5:
            out(f"{instance_id}: pulling {args.image}: {progress:.0f}%")
            last_progress = progress
        if state == "RUNNING" or state in TERMINAL:
            break
        time.sleep(0.25)
    if state in TERMINAL:
        out(f"{instance_id}: {_result(info)} {info.get('errorMessage', '')}".rstrip())
        result = info.get("taskResult") or {}
        return 0 if result.get("status") == "SUCCESSFUL" else 1
    return 0


def _wait_terminal(
    client: AgentClient, instance_id: str, timeout_s: float | None
) -> dict[str, Any]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.task(instance_id)
        if info is None:
            raise ClientError(f"no task with instanceId {instance_id} on this agent")
        if info["state"] in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClientError(f"{instance_id} is still {info['state']} after {timeout_s:.0f} s")
        time.sleep(0.2)


def cmd_tasks_stop(
    client: AgentClient, instance_id: str, out: Callable[[str], None] = print
) -> int:
    reply = client.post(
        "/apis/v1/messages",
        {"type": "STOP_TASK", "header": {"id": str(uuid.uuid4())}, "instanceId": instance_id},
    )
    if reply.get("status") != "ACCEPTED":
        raise ClientError(reply.get("message") or f"the agent refused to stop {instance_id}")
    info = _wait_terminal(client, instance_id, 120)
    out(f"{instance_id}: {info['state']} {_result(info)}")
    return 0


def exit_code_of(info: dict[str, Any]) -> int:
    result = info.get("taskResult")
    if not result:
        return 1
    return int(result["exitCode"]) & 0xFF


def cmd_tasks_wait(client: AgentClient, instance_id: str, timeout_s: float | None) -> int:
    info = _wait_terminal(client, instance_id, timeout_s)
    message = info.get("errorMessage") or ""
    print(f"{instance_id}: {info['state']} {_result(info)} {message}".rstrip(), file=sys.stderr)
    return exit_code_of(info)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_tasks_logs(
    client: AgentClient, instance_id: str, follow: bool, write: Callable[[str], None] = _stdout
) -> int:
    info = client.task(instance_id)
    if info is None:
        raise ClientError(f"no task with instanceId {instance_id} on this agent")
    base = f"/apis/v1/logs/filestream/{info['sourceAppName']}/{info['taskId']}"
    offset = 0
    while True:
        files = client.get(base + "/list")["files"]
        if "output.log" in files:
            chunk = client.get(f"{base}/read/output.log?offset={offset}&length=65536")
            size = client.get(f"{base}/read/output.log?offset=-1&length=-1")["offset"]
            if size < offset:  # rotated: start over on the new file
                offset = 0
                continue
            data = chunk["data"]
            if data:
                write(data)
                offset += len(data.encode())
                continue
        if not follow:
            return 0
        current = client.task(instance_id)
        if current is None or current["state"] in TERMINAL:
            return 0
        time.sleep(0.5)


def render_event(message: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(message["header"]["messageTime"] / 1000))
    kind = message["type"]
    if kind == "TASK_STATE_REPORT":
        info = message["instanceInfo"]
        extra = _result(info) if info.get("taskResult") else ""
        error = info.get("errorMessage") or ""
        return f"{stamp} {info['instanceId']} {info['state']} {extra} {error}".rstrip()
    if kind == "EXECUTOR_SNAPSHOT":
        data = message["nodeData"]
        free = sum(len(c) for c in data["state"]["cpus"]["freeCores"].values())
        return (
            f"{stamp} snapshot {data['executorState']} tasks={len(data['tasks'])} free_cores={free}"
        )
    return f"{stamp} {kind}"


def cmd_events(client: AgentClient, as_json: bool, limit: int | None = None) -> int:
    for count, message in enumerate(client.events(), start=1):
        print(json.dumps(message) if as_json else render_event(message), flush=True)
        if limit is not None and count >= limit:
            break
    return 0


# --- doctor --------------------------------------------------------------------------------------


def _writable(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _cgroup_controllers(cgroup_root: Path) -> tuple[str, set[str]]:
    unified = cgroup_root / "cgroup.controllers"
    if unified.exists():
        return "v2", set(unified.read_text().split())
    return "v1", {c for c in ("cpuset", "memory") if (cgroup_root / c).is_dir()}


def run_doctor(config_path: str, sysfs_root: Path, out: Callable[[str], None] = print) -> int:
    failures = 0

    def report(ok: bool, what: str, fix: str = "") -> None:
        nonlocal failures
        if ok:
            out(f"ok    {what}")
        else:
            failures += 1
            out(f"FAIL  {what}" + (f"\n      fix: {fix}" if fix else ""))

    try:
        cfg = load_config(config_path)
        report(True, f"config {config_path} is valid (mode {cfg.mode})")
    except ConfigError as exc:
        report(
            False, f"config {config_path}: {len(exc.problems)} problem(s)", "; ".join(exc.problems)
        )
        cfg = Config()

    from agent.runtime import engine_info

    socket_path = cfg.options.docker_socket_path
    try:
        info = engine_info(socket_path)
        report(
            True,
            f"Docker engine {info['version']} answers at {socket_path} (API {info['api']}, "
            f"cgroup {info['cgroup_version']}, driver {info['cgroup_driver']})",
        )
    except AgentError as exc:
        report(
            False,
            f"Docker engine at {socket_path} does not answer: {exc}",
            "start dockerd (systemctl start docker) or set options.dockerSocketPath",
        )

    version, controllers = _cgroup_controllers(sysfs_root / "fs/cgroup")
    missing = {"cpuset", "memory"} - controllers
    report(
        not missing,
        f"cgroup {version} controllers cpuset and memory"
        + (f": missing {', '.join(sorted(missing))}" if missing else " are available"),
        "enable them (cgroup_enable=memory on the kernel command line; cgroup v2: "
        "add +cpuset +memory to cgroup.subtree_control)",
    )

    try:
        topology = read_topology(sysfs_root)
        inventory = build_inventory(topology, cfg.resources)
        cores = sum(len(n.allocatable) for n in inventory.nodes)
        source = "sysfs" if topology.from_sysfs else "psutil (no NUMA information in sysfs)"
        report(
            cores > 0,
            f"host inventory from {source}: {len(inventory.nodes)} NUMA node(s), "
            f"{cores} allocatable cores",
            "check resources.osCores: every core is reserved",
        )
    except (OSError, ValueError) as exc:
        report(
            False,
            f"sysfs under {sysfs_root} cannot be read: {exc}",
            "mount /sys (read-only is enough)",
        )

    for key, path in (
        ("options.stateDir", cfg.options.state_dir),
        ("options.logPath", cfg.options.log_path),
    ):
        error = _writable(Path(path))
        report(
            error is None,
            f"{key} {path} is writable"
            if error is None
            else f"{key} {path} is not writable: {error}",
            f"create it, or point {key} elsewhere",
        )

    if cfg.mode is UpdateMode.RPC and cfg.controllers is not None:
        import urllib.request

        answered = []
        for endpoint in cfg.controllers.endpoints:
            req = urllib.request.Request(f"{endpoint}/apis/v1/ping")
            req.add_header("Cluster-Authorization", cfg.cluster_auth.executor_secret)
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        answered.append(endpoint)
            except OSError:
                continue
        report(
            bool(answered),
            "controller leader reachable: " + (answered[0] if answered else "no endpoint answers"),
            "check controllers.endpoints and the EXECUTOR secret",
        )
    elif cfg.mode is UpdateMode.STANDALONE:
        report(True, "standalone mode: no controller to reach")

    out("")
    out("all checks passed" if not failures else f"{failures} check(s) failed")
    return 0 if not failures else 1


def default_config_path() -> str:
    env = os.environ.get("DROVE_AGENT_CONFIG")
    if env:
        return env
    if Path("config/agent.yaml").exists():
        return "config/agent.yaml"
    return "/etc/drove-agent/agent.yaml"
