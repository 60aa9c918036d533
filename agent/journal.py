"""The report journal: every report is on disk before it is sent, until the controller accepts it.

One file, ``<stateDir>/reports.journal``, JSON lines: a header line with the format version, then
``{"seq": n, "msg": {...}}`` for each report and ``{"ack": n}`` once the controller accepted it.
Appends are fsynced. When nothing is pending, or the file has grown past a bound, it is compacted:
the pending entries are written to a temporary file, fsynced, and renamed over the journal.

A torn last line (a crash in the middle of an append) is ignored. Anything else unreadable makes the
whole file corrupt: it is moved aside (``reports.journal.corrupt-<time>``) and the agent starts with
an empty journal. Blocking file I/O: call from a thread, not the event loop.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

FORMAT = "drove-agent-report-journal"
VERSION = 1
COMPACT_AFTER_LINES = 2000


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "reports.journal"
        self._pending: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lines = 0
        self._next_seq = 1
        self._file: Any = None

    @property
    def pending(self) -> list[tuple[int, dict[str, Any]]]:
        return list(self._pending.items())

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def open(self) -> list[tuple[int, dict[str, Any]]]:
        """Load what was pending at the last stop (in order) and open the journal for appends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            try:
                self._load()
            except (ValueError, KeyError, TypeError) as exc:
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                os.replace(self.path, aside)
                log.error(
                    "report_journal_corrupt",
                    path=str(self.path),
                    moved_to=str(aside),
                    error=str(exc),
                )
                self._pending.clear()
        if self._pending:
            self._next_seq = max(self._pending) + 1
        self._rewrite()
        return self.pending

    def _load(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if not lines:
            return
        header = json.loads(lines[0])
        if not isinstance(header, dict):
            raise ValueError("the header line is not a JSON object")
        if header.get("format") != FORMAT:
            raise ValueError(f"not a report journal (format {header.get('format')!r})")
        if header.get("version") != VERSION:
            raise ValueError(f"unsupported journal version {header.get('version')!r}")
        for index, raw in enumerate(lines[1:], start=2):
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError(f"line {index} is not a JSON object")
            except ValueError:
                if index == len(lines):  # a torn final append: the crash came mid-write
                    log.warning("report_journal_torn_tail_ignored", line=index)
                    break
                raise ValueError(f"line {index} is not JSON") from None
            if "ack" in entry:
                self._pending.pop(int(entry["ack"]), None)
            else:
                seq = int(entry["seq"])
                if not isinstance(entry["msg"], dict):
                    raise ValueError(f"line {index}: msg is not an object")
                self._pending[seq] = entry["msg"]
                self._next_seq = max(self._next_seq, seq + 1)

    def append(self, seq: int, message: dict[str, Any]) -> None:
        self._pending[seq] = message
        self._write_line({"seq": seq, "msg": message})

    def ack(self, seq: int) -> None:
        if self._pending.pop(seq, None) is None:
            return
        if not self._pending or self._lines > COMPACT_AFTER_LINES:
            self._rewrite()
        else:
            self._write_line({"ack": seq})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_line(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._lines += 1

    def _rewrite(self) -> None:
        """Compact: only the header and the pending reports, written atomically."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(json.dumps({"format": FORMAT, "version": VERSION}).encode() + b"\n")
            for seq, message in self._pending.items():
                line = json.dumps({"seq": seq, "msg": message}, separators=(",", ":"))
                handle.write(line.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._lines = len(self._pending)
