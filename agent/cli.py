"""Command line: ``drove-agent run|inventory|check-config|status|tasks|events|doctor``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config, load_config
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.client import AgentClient


def default_config_path() -> str:
    from agent.commands import default_config_path as path

    return path()


EXIT_CONFIG = 2


def _load(path: str | None) -> Config:
    return Config() if path is None else load_config(path)


def _print_config_error(path: str | None, exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    print(f"{path}: {len(exc.problems)} problem(s); the agent will not start", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from agent import log
    from agent.app import Agent

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _print_config_error(args.config, exc)
        return EXIT_CONFIG
    log.configure(level=args.log_level)
    return asyncio.run(Agent(cfg, sysfs_root=Path(args.sysfs_root)).run())


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        _print_config_error(args.file, exc)
        return EXIT_CONFIG
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok (mode {cfg.mode}, port {cfg.server.port})")
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    from agent.app import discover

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        _print_config_error(args.config, exc)
        return EXIT_CONFIG
    inventory = discover(cfg, Path(args.sysfs_root))
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2, sort_keys=True))
        return 0
    from agent.inventory import format_cpulist

    pinning = "on" if inventory.numa_pinning else "off (disableNUMAPinning: nodes merged as 0)"
    print(f"NUMA nodes: {len(inventory.nodes)}   NUMA pinning: {pinning}")
    for node in inventory.nodes:
        print(f"node {node.node}")
        print(f"  allocatable cores : {format_cpulist(node.allocatable) or '-'}")
        print(f"  reserved (osCores): {format_cpulist(node.reserved) or '-'}")
        print(f"  offline cores     : {format_cpulist(node.offline) or '-'}")
        groups = " ".join("[" + format_cpulist(g) + "]" for g in node.siblings) or "-"
        print(f"  SMT sibling groups: {groups}")
        print(
            f"  memory            : {node.memory_total_mb} MB total, "
            f"{node.memory_exposed_mb} MB exposed"
        )
        if not node.allocatable and node.memory_total_mb:
            print("  note              : memory-only node (no allocatable cores)")
        if node.allocatable and not node.memory_total_mb:
            print("  note              : CPU-only node (no memory)")
    for node_id, layout in sorted(inventory.layout.items()):
        if layout.vcore_map and any(k != v for k, v in layout.vcore_map.items()):
            print(
                f"allocatable node {node_id}: {len(layout.vcore_map)} virtual cores over "
                f"{len(layout.physical_cores)} physical, {layout.memory_mb} MB"
            )
    return 0


def _client(args: argparse.Namespace) -> AgentClient:
    from agent.client import AgentClient as Client

    path = args.config or default_config_path()
    if args.url:
        secret = args.secret
        if secret is None:
            secret = load_config(path).cluster_auth.controller_secret if Path(path).exists() else ""
        return Client(args.url.rstrip("/"), secret, path)
    client = Client.from_config(load_config(path), path)
    if args.secret is not None:
        client = Client(client.url, args.secret, path)
    return client


def _operator(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected failures of an operator command into one line and exit status 1."""

    def wrapped(args: argparse.Namespace) -> int:
        from agent.client import ClientError

        try:
            return run(args)
        except ConfigError as exc:
            _print_config_error(args.config or default_config_path(), exc)
            return EXIT_CONFIG
        except ClientError as exc:
            print(f"drove-agent {args.command}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # e.g. piped into head: the reader has gone
            sys.stderr.close()
            return 141

    return wrapped


@_operator
def cmd_status(args: argparse.Namespace) -> int:
    from agent import commands

    return commands.cmd_status(_client(args), args.json)


@_operator
def cmd_tasks(args: argparse.Namespace) -> int:
    from agent import commands

    client = _client(args)
    if args.tasks_command == "start":
        return commands.cmd_tasks_start(client, args)
    if args.tasks_command == "stop":
        return commands.cmd_tasks_stop(client, args.instance_id)
    if args.tasks_command == "logs":
        return commands.cmd_tasks_logs(client, args.instance_id, args.follow)
    return commands.cmd_tasks_wait(client, args.instance_id, args.timeout)


@_operator
def cmd_events(args: argparse.Namespace) -> int:
    from agent import commands

    return commands.cmd_events(_client(args), args.json, args.count)


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent import commands

    return commands.run_doctor(args.config or default_config_path(), Path(args.sysfs_root))


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="agent config (address and secret); default config/agent.yaml "
        "or /etc/drove-agent/agent.yaml, or $DROVE_AGENT_CONFIG",
    )
    parser.add_argument("--url", help="agent URL, instead of the config's server section")
    parser.add_argument(
        "--secret", help="cluster secret, instead of the config's CONTROLLER secret"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drove-agent",
        description="Executor agent for the Drove container orchestrator.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent",
        description="Run the agent: discover the host, serve the executor API, run tasks.",
    )
    run.add_argument("--config", "-c", required=True, help="YAML config file")
    run.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    inv = sub.add_parser(
        "inventory",
        help="show cores and memory per NUMA node",
        description=(
            "Show what the agent would offer per NUMA node: allocatable cores, cores reserved by "
            "resources.osCores, offline cores, SMT sibling groups and memory."
        ),
    )
    inv.add_argument("--config", "-c", help="apply this config's resources section")
    inv.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    inv.add_argument("--json", action="store_true", help="print JSON in the snapshot layout shape")
    inv.set_defaults(func=cmd_inventory)

    chk = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 0 when it is good, 2 with one line per problem.",
    )
    chk.add_argument("file", help="YAML config file")
    chk.set_defaults(func=cmd_check_config)

    st = sub.add_parser(
        "status",
        help="what runs on this host",
        description=(
            "Show the local agent: executor id, state, leader, uptime; cores and memory per NUMA "
            "node (free, used by which task, reserved, offline); and a table of its tasks."
        ),
    )
    _client_options(st)
    st.add_argument("--json", action="store_true", help="print the raw data")
    st.set_defaults(func=cmd_status)

    tasks = sub.add_parser(
        "tasks",
        help="start, stop, follow and wait for tasks on a standalone agent",
        description="Start, stop, read the logs of, and wait for tasks on the local agent.",
    )
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    start = tsub.add_parser(
        "start",
        help="start a task on free cores of one NUMA node",
        description=(
            "Pick free cores on one NUMA node and send START_TASK; follow it until RUNNING "
            "(showing image pull progress) or until it ends."
        ),
    )
    _client_options(start)
    start.add_argument("--image", required=True, help="Docker image")
    start.add_argument("--cores", type=int, default=1, help="number of cores (default 1)")
    start.add_argument("--memory", type=int, default=128, help="memory in MB (default 128)")
    start.add_argument("--node", type=int, help="NUMA node (default: the first with room)")
    start.add_argument("-e", "--env", action="append", metavar="K=V", help="environment variable")
    start.add_argument("--app", default="standalone", help="sourceAppName (default standalone)")
    start.add_argument("--id", help="taskId (default task-<time>)")
    start.add_argument("--pull-timeout", default="15 minutes", help="dockerPullTimeout")
    start.add_argument("--detach", "-d", action="store_true", help="return once accepted")
    start.add_argument("args", nargs=argparse.REMAINDER, help="-- then the container's command")
    for name, help_text in (
        ("stop", "stop a task (SIGKILL, or SIGTERM first with a grace period) and wait for it"),
        ("logs", "print a task's output (stdout and stderr)"),
        ("wait", "wait for a task to end; exit with its exit code"),
    ):
        action = tsub.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
        )
        _client_options(action)
        action.add_argument("instance_id", help="the task's instanceId")
        if name == "logs":
            action.add_argument("-f", "--follow", action="store_true", help="keep following")
        if name == "wait":
            action.add_argument("--timeout", type=float, help="give up after this many seconds")
    tasks.set_defaults(func=cmd_tasks)

    ev = sub.add_parser(
        "events",
        help="tail state reports and snapshots as they happen",
        description="Follow the agent's live events (/apis/v1/events): every report and snapshot.",
    )
    _client_options(ev)
    ev.add_argument("--json", action="store_true", help="print each event as JSON")
    ev.add_argument("--count", type=int, help="stop after this many events")
    ev.set_defaults(func=cmd_events)

    doc = sub.add_parser(
        "doctor",
        help="check that this host can run the agent",
        description=(
            "Check the config, the Docker engine and its API version, the cpuset and memory "
            "cgroup controllers, sysfs, the state and log directories, and the controller. "
            "Exit 1 when a check fails."
        ),
    )
    doc.add_argument("--config", "-c", help="agent config to check")
    doc.add_argument("--sysfs-root", default="/sys", help="where sysfs is mounted (default /sys)")
    doc.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
