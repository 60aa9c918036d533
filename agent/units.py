"""Dropwizard-compatible Duration and DataSize values (spec §0)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(\S+)\s*$")
_DURATION_UNITS: dict[str, tuple[str, float]] = {}
for _name, _secs, _suffixes in (
    ("nanoseconds", 1e-9, ("ns", "nanosecond", "nanoseconds")),
    ("microseconds", 1e-6, ("us", "microsecond", "microseconds")),
    ("milliseconds", 1e-3, ("ms", "millisecond", "milliseconds")),
    ("seconds", 1.0, ("s", "second", "seconds")),
    ("minutes", 60.0, ("m", "min", "mins", "minute", "minutes")),
    ("hours", 3600.0, ("h", "hour", "hours")),
    ("days", 86400.0, ("d", "day", "days")),
):
    for _suffix in _suffixes:
        _DURATION_UNITS[_suffix] = (_name, _secs)


@dataclass(frozen=True, slots=True)
class Duration:
    """A count of a time unit, written back the way Dropwizard writes it."""

    count: int
    unit: str  # plural lowercase TimeUnit name, e.g. "seconds"

    @property
    def seconds(self) -> float:
        return self.count * _DURATION_UNITS[self.unit][1]

    def __str__(self) -> str:
        unit = self.unit[:-1] if self.count == 1 else self.unit
        return f"{self.count} {unit}"

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse "15 minutes", "100s", "1 second"; raises ValueError naming the problem."""
        match = _DURATION_RE.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a duration like '30 seconds'")
        unit = _DURATION_UNITS.get(match.group(2))
        if unit is None:
            raise ValueError(f"{text!r} has an unknown time unit {match.group(2)!r}")
        return cls(int(match.group(1)), unit[0])

    @classmethod
    def of_seconds(cls, seconds: int) -> Duration:
        return cls(seconds, "seconds")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS: dict[str, int] = {}
for _exp, (_si, _iec, _si_word, _iec_word) in enumerate(
    (
        ("k", "ki", "kilobyte", "kibibyte"),
        ("m", "mi", "megabyte", "mebibyte"),
        ("g", "gi", "gigabyte", "gibibyte"),
        ("t", "ti", "terabyte", "tebibyte"),
        ("p", "pi", "petabyte", "pebibyte"),
    ),
    start=1,
):
    for _suffix in (_si, _si + "b", _si_word, _si_word + "s"):
        _SIZE_UNITS[_suffix] = 1000**_exp
    for _suffix in (_iec, _iec + "b", _iec_word, _iec_word + "s"):
        _SIZE_UNITS[_suffix] = 1024**_exp
for _suffix in ("", "b", "byte", "bytes"):
    _SIZE_UNITS[_suffix] = 1


def parse_data_size(text: str) -> int:
    """Parse "10MB", "5m", "20 megabytes", "1KiB" into bytes (K/M/G are SI, KiB/MiB are IEC)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a data size like '10MB'")
    factor = _SIZE_UNITS.get(match.group(2).lower())
    if factor is None:
        raise ValueError(f"{text!r} has an unknown size unit {match.group(2)!r}")
    return int(match.group(1)) * factor
