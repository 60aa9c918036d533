"""Command line: ``drove-agent run|inventory|check-config``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import Config, load_config
from agent.errors import ConfigError

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
