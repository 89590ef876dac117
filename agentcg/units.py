"""Quantities with their units: parse what people type, print what people read.

Sizes are bytes (binary multiples: 1K = 1024), durations are nanoseconds inside
the program and seconds or milliseconds only at the edges.
"""
from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$", re.IGNORECASE)
_DUR_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
           "m": 60_000_000_000, "h": 3_600_000_000_000}


class UnitError(ValueError):
    """A quantity that could not be parsed; the message quotes the input."""


def parse_bytes(text: str | int) -> int:
    """'512M' -> 536870912. Integers pass through; suffixes K/M/G/T/P are
    binary (KiB, MiB, ...), an optional trailing 'B' or 'iB' is accepted."""
    if isinstance(text, bool):
        raise UnitError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise UnitError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UnitError(f"not a size: {text!r} (expected e.g. 512M, 2G, 1048576)")
    value = float(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
    return int(value)


def format_bytes(n: int | None) -> str:
    """536870912 -> '512M'; exact binary multiples print without decimals."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    for suffix, mult in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            q = n / mult
            return f"{sign}{q:.0f}{suffix}" if n % mult == 0 else f"{sign}{q:.1f}{suffix}"
    return f"{sign}{n}B"


def parse_duration_ns(text: str | int | float) -> int:
    """'30s' -> 30_000_000_000; a bare number is seconds."""
    if isinstance(text, bool):
        raise UnitError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise UnitError(f"duration must not be negative: {text}")
        return int(text * 1_000_000_000)
    m = _DUR_RE.match(str(text))
    if not m:
        raise UnitError(f"not a duration: {text!r} (expected e.g. 500ms, 30s, 5m)")
    return int(float(m.group(1)) * _DUR_NS[(m.group(2) or "s").lower()])
