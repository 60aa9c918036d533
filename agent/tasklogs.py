"""Task output files, Drove-compatible (spec §7.1): <logPath>/<sourceAppName>/<taskId>/output.log
with size-based rotation (``output.log.1`` is the newest rotated file), and the filestream reads
the controller proxies: list, read (offset/length) and download. Blocking file I/O: call from a
thread. Paths are resolved and must stay below ``logPath``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DEFAULT_READ = 32768
MAX_READ = 4 << 20


class LogAccessError(Exception):
    """A filestream request that cannot be served; the message is the reference's wording."""


class RotatingLogFile:
    """Appends a task's output; rotates when the file would pass ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, max_files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max(1, max_files)
        self._file: BinaryIO | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.max_files}")
        if oldest.exists():
            oldest.unlink()
        for n in range(self.max_files - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("ab")
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True, slots=True)
class LogStore:
    root: Path

    def task_dir(self, app: str, task_id: str) -> Path:
        return self._inside(self.root / app / task_id, f"{app}/{task_id}")

    def output_file(self, app: str, task_id: str) -> Path:
        return self.task_dir(app, task_id) / "output.log"

    def _inside(self, path: Path, shown: str) -> Path:
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise LogAccessError(f"Log read request to out of bounds directory/file: {shown}")
        return resolved

    def list(self, app: str, task_id: str) -> list[str]:
        directory = self.task_dir(app, task_id)
        if not directory.is_dir():
            return []
        return sorted(
            entry.name
            for entry in directory.iterdir()
            if entry.name.startswith("output.") and entry.is_file() and os.access(entry, os.R_OK)
        )

    def file(self, app: str, task_id: str, name: str) -> Path:
        path = self._inside(self.task_dir(app, task_id) / name, f"{app}/{task_id}/{name}")
        if not path.name.startswith("output.") or not path.is_file():
            raise LogAccessError(f"Could not read log file: {name}")
        return path

    def read(self, app: str, task_id: str, name: str, offset: int, length: int) -> tuple[str, int]:
        """The reference's read: offset=-1 and length=-1 give ("", size); length=-1 means 32 KiB."""
        path = self.file(app, task_id, name)
        size = path.stat().st_size
        if offset < 0 and length < 0:
            return "", size
        offset = max(0, offset)
        length = DEFAULT_READ if length < 0 else min(length, MAX_READ)
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError as exc:
            raise LogAccessError(f"Error reading file {name}: {exc.strerror or exc}") from exc
        return data.decode("utf-8", errors="replace"), offset
