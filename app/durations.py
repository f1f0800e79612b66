"""Durations and sizes as operators type them: ``90``, ``30s``, ``15m``, ``26h``, ``7d``; ``16MiB``, ``64MB``."""

from __future__ import annotations

import re

from healthcheck.check import format_age

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError with the accepted forms in the message."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (use seconds or 30s, 15m, 26h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_size(text: str) -> int:
    """Bytes in ``text``: plain bytes, or K/M/G/T with an optional ``i`` for powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (use bytes or 16MiB, 64MB, 1GiB)")
    unit = m.group(2).lower()
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    if "i" in unit and not prefix:
        raise ValueError(f"{text!r} is not a size (use bytes or 16MiB, 64MB, 1GiB)")
    base = 1024 if "i" in unit else 1000
    factor = base ** (" kmgt".index(prefix) if prefix else 0)
    return int(m.group(1)) * factor


def format_duration(seconds: float) -> str:
    """Short human form used in logs and health lines: ``2d3h``, ``3h12m``, ``45s``.

    The standard-library health checker owns the formatting, so its Nagios line and the sidecar's own
    messages always write an age the same way.
    """
    return format_age(max(seconds, 0))


def format_size(n: int | float) -> str:
    """Bytes in binary units with one decimal, for tables and messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
