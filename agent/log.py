"""structlog set-up: JSON lines when stdout is not a terminal, the console renderer when it is.

The agent's own events go through structlog's fast path (a filtering bound logger writing straight
to stdout); standard-library loggers (aiohttp, docker, urllib3) go through the same processors and
renderer via ProcessorFormatter, so every line has one shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _NamedWriter(structlog.WriteLogger):
    """A WriteLogger that knows its name, so ``add_logger_name`` works without the stdlib."""

    def __init__(self, name: str, file: TextIO) -> None:
        super().__init__(file)
        self.name = name


def configure(level: str = "INFO", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stdout.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    numeric = logging.getLevelName(level)

    def factory(*args: Any) -> _NamedWriter:
        return _NamedWriter(str(args[0]) if args else "agent", sys.stdout)

    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter stays at WARNING unless the agent itself runs at DEBUG.
    for name in ("urllib3", "docker", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
