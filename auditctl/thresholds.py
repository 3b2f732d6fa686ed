"""Thresholds, durations and reason codes: the one place they are defined and parsed.

Pure Python on purpose (no SQLAlchemy), so the CLI can validate ``--stale-after 10m``
without paying for the database layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta

from .errors import ConfigError

STALE_HEARTBEAT = "stale_heartbeat"
MAX_AGE_EXCEEDED = "max_age_exceeded"
PROGRESS_STALLED = "progress_stalled"
WORKER_RESTARTED = "worker_restarted"
MANUAL = "manual"

#: The reasons the stuck query can give, in the order they are reported.
RULE_REASONS = (STALE_HEARTBEAT, MAX_AGE_EXCEEDED, PROGRESS_STALLED)

DEFAULT_STALE_AFTER = 600.0
DEFAULT_MAX_AGE = 1800.0
DEFAULT_STALL_AFTER = 600.0
DEFAULT_HEARTBEAT_INTERVAL = 300.0

#: Nothing in this tool waits more than a year; a larger figure is a typo.
MAX_DURATION = 366 * 24 * 3600.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")

Duration = "int | float | str | timedelta"


def parse_duration(value, name: str = "duration") -> float:
    """Return seconds for ``90``, ``1.5``, ``"45s"``, ``"10m"``, ``"1h30m"``, ``"2d"`` or a timedelta.

    Raises ConfigError for anything negative, zero, absurdly large or unparsable.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value, name)
    else:
        raise ConfigError(f"{name}: expected a duration such as 45s, 10m or 1h, got {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigError(f"{name}: {value!r} is not a finite duration")
    if seconds <= 0:
        raise ConfigError(f"{name}: must be greater than zero, got {value!r}")
    if seconds > MAX_DURATION:
        raise ConfigError(f"{name}: {value!r} is longer than a year; use a duration such as 45s, 10m or 1h")
    return seconds


def _parse_duration_text(text: str, name: str) -> float:
    cleaned = text.strip().lower().replace(" ", "")
    shown = text if len(text) <= 40 else text[:40] + "…"
    if not cleaned:
        raise ConfigError(f"{name}: empty duration; use a duration such as 45s, 10m or 1h")
    try:
        return float(cleaned)
    except ValueError:
        pass
    if cleaned.startswith("-"):
        raise ConfigError(f"{name}: must be greater than zero, got {shown!r}")
    position, total = 0, 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned) or position == 0:
        raise ConfigError(
            f"{name}: cannot read {shown!r} as a duration; use seconds or a number with a unit "
            "(ms, s, m, h, d, w), such as 45s, 10m, 1h30m"
        )
    return total


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h2m"``; short and human, for tables and log lines."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


@dataclass(frozen=True)
class Thresholds:
    """When a running audit counts as stuck. All figures are seconds."""

    stale_after: float = DEFAULT_STALE_AFTER
    max_age: float = DEFAULT_MAX_AGE
    stall_after: float = DEFAULT_STALL_AFTER

    @classmethod
    def parse(cls, stale_after=None, max_age=None, stall_after=None) -> "Thresholds":
        """Build from durations in any accepted form; ``None`` keeps the default. Validates."""
        values = cls(
            stale_after=parse_duration(stale_after, "stale_after") if stale_after is not None else DEFAULT_STALE_AFTER,
            max_age=parse_duration(max_age, "max_age") if max_age is not None else DEFAULT_MAX_AGE,
            stall_after=parse_duration(stall_after, "stall_after") if stall_after is not None else DEFAULT_STALL_AFTER,
        )
        values.validate()
        return values

    def validate(self) -> None:
        for name in ("stale_after", "max_age", "stall_after"):
            parse_duration(getattr(self, name), name)
        # A heartbeat silence longer than the whole allowed run time could never be the reason an
        # audit is stuck: max_age would always fire first. That is a misconfiguration, not a choice.
        if self.stale_after > self.max_age:
            raise ConfigError(
                f"stale_after ({format_duration(self.stale_after)}) is longer than max_age "
                f"({format_duration(self.max_age)}): a silent audit would hit max_age first; lower stale_after or raise max_age"
            )
        if self.stall_after > self.max_age:
            raise ConfigError(
                f"stall_after ({format_duration(self.stall_after)}) is longer than max_age "
                f"({format_duration(self.max_age)}): a frozen audit would hit max_age first; lower stall_after or raise max_age"
            )


def validate_heartbeat_interval(interval: float, thresholds: Thresholds) -> float:
    """A worker that beats less often than ``stale_after`` would be judged dead between beats."""
    interval = parse_duration(interval, "heartbeat_interval")
    if interval >= thresholds.stale_after:
        raise ConfigError(
            f"heartbeat_interval ({format_duration(interval)}) must be shorter than stale_after "
            f"({format_duration(thresholds.stale_after)}), or every healthy audit would look stale between beats"
        )
    return interval
