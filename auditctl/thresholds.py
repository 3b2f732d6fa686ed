"""Thresholds, durations and reason codes: the one place they are defined and parsed.

Pure Python on purpose (no SQLAlchemy), so the CLI can validate ``--stale-after 10m``
without paying for the database layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from .errors import ConfigError, NamedSettingError
from .textsafe import printable

WORKER_GONE = "worker_gone"
STALE_HEARTBEAT = "stale_heartbeat"
MAX_AGE_EXCEEDED = "max_age_exceeded"
PROGRESS_STALLED = "progress_stalled"
WORKER_RESTARTED = "worker_restarted"
MANUAL = "manual"

#: The reasons the stuck query can give, in the order they are reported.
RULE_REASONS = (WORKER_GONE, STALE_HEARTBEAT, MAX_AGE_EXCEEDED, PROGRESS_STALLED)
#: Every reason a recovery can record (the rules', and those of a worker's startup cleanup and of an operator).
RECOVERY_REASONS = RULE_REASONS + (WORKER_RESTARTED, MANUAL)

#: The shortest stale threshold a judge accepts without --unsafe-thresholds.
MIN_STALE_AFTER = 1.0
#: A stale threshold must be at least this many heartbeat intervals (of the audits it judges).
STALE_INTERVALS = 2.0
#: The shortest watch interval accepted without --unsafe-thresholds, and the shortest heartbeat
#: interval a guard takes: shorter, its two threads would spin on the database.
MIN_WATCH_INTERVAL = MIN_HEARTBEAT_INTERVAL = 0.1

#: Where a threshold in force came from, most specific last in precedence order (see ``Policy``).
FLAG, AUDIT, WORKER, KIND, FLEET = "flag", "audit", "worker", "kind", "fleet"

DEFAULT_STALE_AFTER = 600.0
DEFAULT_MAX_AGE = 1800.0
DEFAULT_STALL_AFTER = 600.0
DEFAULT_HEARTBEAT_INTERVAL = 300.0

#: Nothing in this tool waits more than a year; a larger figure is a typo.
MAX_DURATION = 366 * 24 * 3600.0
#: Seconds a timestamp may lie in the future before it is distrusted (clock skew of other writers):
#: the stuck rules, the registry's liveness, the metrics and the listings all use it.
FUTURE_TOLERANCE = 60.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: ASCII digits only (``\d`` and ``float`` take Arabic-Indic or full-width digits), each unit once, blanks
#: around a unit ("1h 30m", "10 m") and nowhere else ("1 0m" is a typo, not ten minutes).
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)\s*")
_NUMBER = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?")


def parse_duration(value, name: str = "duration") -> float:
    """Return seconds for ``90``, ``1.5``, ``"45s"``, ``"10m"``, ``"1h30m"``, ``"2d"`` or a timedelta.

    Raises ConfigError for anything negative, zero, absurdly large or unparsable.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            # An int of hundreds of digits (one of thousands cannot even be repr()'d in the message).
            raise ConfigError(f"{name}: must be greater than zero" if value < 0 else f"{name}: a number that large is "
                              "longer than a year; use a duration such as 45s, 10m or 1h") from None
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


def parse_moment(value, name: str = "time") -> "float | datetime":
    """A point in time as ``--since`` takes it: a duration ago (``2h``: returned as seconds) or an
    ISO 8601 time (``2026-11-29T08:00Z``: returned as an aware datetime). Raises ConfigError, with
    the duration's own complaint for text that is a duration out of range (``53w``)."""
    from datetime import datetime

    from .timestamps import as_datetime

    if isinstance(value, (float, datetime)):
        return value
    try:
        return parse_duration(value, name)
    except ConfigError as error:
        as_duration = error
    text = str(value).strip()
    moment = as_datetime(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    if moment is not None:
        return moment
    if not isinstance(as_duration, _NotADuration):
        raise as_duration  # a duration, but not one that can be used (over a year, zero)
    raise ConfigError(f"{name}: cannot read {value!r} as a time: use a duration ago (2h, 30m) "
                      "or an ISO 8601 time (2026-11-29T08:00Z)")


def check_window(since, until) -> None:
    """Refuse a creation window that ends before it starts: ``since`` and ``until`` as ``parse_moment``
    gives them (seconds ago, or a datetime). Bounds of the two kinds are compared by the database."""
    if since is None or until is None:
        return
    if isinstance(since, datetime) and isinstance(until, datetime):
        from .timestamps import as_datetime

        # In UTC, a naive time taken as UTC, as the stuck query reads it.
        backwards = (as_datetime(since) or since) > (as_datetime(until) or until)
    elif not isinstance(since, datetime) and not isinstance(until, datetime):
        backwards = since < until  # seconds ago: a smaller figure is a later moment
    else:
        return
    if backwards:
        raise NamedSettingError("{since} is later than {until}: no audit was created in that window", "since", "until")


class _NotADuration(ConfigError):
    """Text that does not read as a duration at all (``parse_moment`` then tries it as a time)."""


def _parse_duration_text(text: str, name: str) -> float:
    cleaned = text.strip().lower()
    shown = text if len(text) <= 40 else text[:40] + "…"
    if not cleaned:
        raise _NotADuration(f"{name}: empty duration; use a duration such as 45s, 10m or 1h")
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned)
    if cleaned.startswith("-"):
        raise ConfigError(f"{name}: must be greater than zero, got {shown!r}")
    position, total, units = 0, 0.0, set()
    for match in _PART.finditer(cleaned):
        if match.start() != position or match.group(2) in units:  # "10m10m" is a slip, not 20 minutes
            break
        units.add(match.group(2))
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned) or position == 0:
        raise _NotADuration(
            f"{name}: cannot read {shown!r} as a duration; use seconds or a number with a unit "
            "(ms, s, m, h, d, w), such as 45s, 10m, 1h30m"
        )
    return total


def format_duration(seconds: float | None, *, exact: bool = False) -> str:
    """``3725`` -> ``"1h2m"``; short and human, for tables and log lines.

    ``exact`` is for a setting (a threshold given, a limit): every part is kept (``"1h2m5s"``,
    ``"10m59s"``, ``"1.25s"``), so what is shown is the value in force, not a rounding of it.
    Whole seconds are shown whole either way (``"5s"``, as help and durations typed are written);
    ``"5.0s"`` is a measurement rounded to it."""
    if seconds is None or not math.isfinite(seconds):
        return "-"  # NaN or infinity (a measurement from a broken row) is no duration to show
    if seconds < 0:
        return "-" + format_duration(-seconds, exact=exact)
    if exact:
        return _exact_duration(seconds) if seconds else "0s"
    if 0 < seconds < 0.9995:  # "0.0s" would hide a sub-second threshold the operator set
        if seconds < 0.001:
            return "<1ms"
        text = f"{seconds * 1000:.3g}"
        if "e" not in text:  # 999.5 ms and up round to 1e+03: shown as seconds below
            return f"{text}ms"
    if seconds < 10:
        return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.1f}s"
    days, hours, minutes, secs = _day_parts(int(round(seconds)))
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        # Past ten minutes the seconds are noise to a person (json carries the exact figure).
        return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"
    return f"{secs}s"


def _exact_duration(seconds: float) -> str:
    """Every part of a setting (``10m0.4s``, ``23h59m59.6s``, ``250ms``), or, when that would not read
    back as the very same value (a part finer than a millisecond), plain seconds with every digit
    (``600.0004s``, ``0.0000001s``). Checked by reading it back."""
    whole, ms = divmod(int(round(seconds * 1000)), 1000)
    days, hours, minutes, secs = _day_parts(whole)
    text = "".join(f"{amount}{unit}" for amount, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if amount)
    if ms:
        text = text + (f"{secs}.{ms:03d}".rstrip("0") + "s" if whole else f"{ms}ms")
    elif secs or not text:
        text += f"{secs}s"
    try:
        if parse_duration(text) == seconds:
            return text
    except ConfigError:
        pass
    from decimal import Decimal

    return format(Decimal(repr(float(seconds))), "f") + "s"


def _day_parts(whole: int) -> tuple[int, int, int, int]:
    """Whole seconds as (days, hours, minutes, seconds)."""
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return days, hours, minutes, secs


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
        _check_order(self.stale_after, self.max_age, self.stall_after)


#: The thresholds that must not outlast max_age, and which audit would then hit max_age first.
_BOUNDED_BY_MAX_AGE = (("stale_after", "a silent"), ("stall_after", "a frozen"))


def _check_order(stale_after: float | None, max_age: float | None, stall_after: float | None, prefix: str = "") -> None:
    """A heartbeat silence (or a stall) longer than the whole allowed run time could never be the
    reason an audit is stuck: max_age would always fire first. A misconfiguration, not a choice."""
    if max_age is None:
        return
    for (name, what), value in zip(_BOUNDED_BY_MAX_AGE, (stale_after, stall_after)):
        if value is not None and value > max_age:
            raise ConfigError(
                f"{prefix}{name} ({format_duration(value, exact=True)}) is longer than {prefix}max_age "
                f"({format_duration(max_age, exact=True)}): {what} audit would hit max_age first; lower {name} or raise max_age"
            )


_SOURCE_WORDS = {KIND: "the kind's own", FLEET: "the fleet's"}


def _kind_order_message(kind: str, name: str, value: float, source: str, max_age: float, max_age_source: str,
                        what: str) -> str:
    """One line naming the kind, both values and where each comes from, and how to make them agree."""
    def said(setting: str, seconds: float, origin: str) -> str:
        where = f"--{setting.replace('_', '-')}" if origin == FLAG else _SOURCE_WORDS[origin]
        return f"{setting} {format_duration(seconds, exact=True)} ({where})"

    def remedy(setting: str, origin: str, bound: str, seconds: float) -> str:
        shown = format_duration(seconds, exact=True)
        if origin == FLAG:
            return f"pass a --{setting.replace('_', '-')} of {bound} {shown}"
        verb = "lower" if bound == "at most" else "raise"
        return (f"{verb} the kind's {setting} to {bound} {shown}" if origin == KIND
                else f"give the kind its own {setting} of {bound} {shown}")

    return (f"kind {kind!r}: {said(name, value, source)} is longer than {said('max_age', max_age, max_age_source)}, "
            f"and both judge its audits: {what} audit of this kind would hit max_age first; "
            f"{remedy(name, source, 'at most', max_age)} or {remedy('max_age', max_age_source, 'at least', value)}")


def validate_heartbeat_interval(interval: float, stale_after: float, label: str = "stale_after") -> float:
    """A worker must beat at least twice within ``stale_after`` (named ``label`` in the error), or a
    healthy audit looks dead between beats."""
    interval = parse_duration(interval, "heartbeat_interval")
    if interval < MIN_HEARTBEAT_INTERVAL:
        raise ConfigError(f"heartbeat_interval ({format_duration(interval, exact=True)}) is below the floor of "
                          f"{format_duration(MIN_HEARTBEAT_INTERVAL, exact=True)}: the heartbeat and monitor threads would "
                          "spin on the database")
    if stale_after < STALE_INTERVALS * interval:
        raise ConfigError(
            f"{label} ({format_duration(stale_after, exact=True)}) must be at least twice heartbeat_interval "
            f"({format_duration(interval, exact=True)}), or a healthy audit would look stale between two beats; "
            f"raise stale_after to {format_duration(STALE_INTERVALS * interval, exact=True)} or beat more often"
        )
    return interval


class UnsafeThreshold(ConfigError):
    """A threshold so short it would fail healthy audits; refused unless the operator insists."""


@dataclass(frozen=True)
class Overrides:
    """Some thresholds, each optional (seconds): what a flag, a kind or an audit sets."""

    stale_after: float | None = None
    max_age: float | None = None
    stall_after: float | None = None

    @classmethod
    def parse(cls, stale_after=None, max_age=None, stall_after=None, where: str = "") -> "Overrides":
        """Thresholds given together (a kind's, a worker's, flags): each readable, and none of them
        contradicting another (a stale_after longer than the max_age given with it)."""
        prefix = f"{where} " if where else ""
        made = cls(
            stale_after=None if stale_after is None else parse_duration(stale_after, f"{prefix}stale_after"),
            max_age=None if max_age is None else parse_duration(max_age, f"{prefix}max_age"),
            stall_after=None if stall_after is None else parse_duration(stall_after, f"{prefix}stall_after"),
        )
        _check_order(made.stale_after, made.max_age, made.stall_after, prefix)
        return made

    @classmethod
    def from_mapping(cls, values, where: str) -> "Overrides":
        """A kind's thresholds as given in code or a config file: a mapping of the three names."""
        if isinstance(values, Overrides):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where} must be a table (a mapping) of stale_after, max_age or stall_after, "
                              f"not {type(values).__name__}")
        unknown = sorted(str(name) for name in values if name not in ("stale_after", "max_age", "stall_after"))
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; a kind sets stale_after, max_age, stall_after")
        return cls.parse(**values, where=where)

    def any(self) -> bool:
        return any(v is not None for v in (self.stale_after, self.max_age, self.stall_after))

    def as_dict(self) -> dict:
        return {k: v for k, v in (("stale_after", self.stale_after), ("max_age", self.max_age),
                                  ("stall_after", self.stall_after)) if v is not None}


#: The longest kind an audit can have (the width of its column).
MAX_KIND = 100


def kind_name(name, where: str):
    """``name`` when an audit can have it as its kind: text, not blank, at most ``MAX_KIND``
    characters. Thresholds set for any other name would never apply to anything."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_KIND:
        shown = printable(repr(name)) if isinstance(name, str) else type(name).__name__
        raise ConfigError(f"{where} must be a non-empty string of at most {MAX_KIND} characters, not "
                          f"{shown[:40] + '...' if len(shown) > 40 else shown}")
    return name


#: Answers one policy remembers (``Policy.resolve_audit``) before it starts again.
_MEMO_SIZE = 4096


@dataclass(frozen=True)
class Policy:
    """How a judge picks each audit's thresholds. For each threshold, the first that is set wins:

    1. a flag on the command line (``override``);
    2. the audit's own: ``max_age`` given to ``create_audit``, then what the worker that
       claimed it declared (its ``stale_after``, ``stall_after``, ``max_age``);
    3. the audit's kind, from the config file (``kinds``);
    4. the fleet's: config file, environment, or the built-in default (``fleet``).
    """

    fleet: Thresholds = Thresholds()
    override: Overrides = Overrides()
    kinds: tuple[tuple[str, Overrides], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_memo", {})  # resolve_audit's answers; not a field (equality, hash, repr)
        self._check_kinds_order()

    def _check_kinds_order(self) -> None:
        """Refuse a kind whose thresholds in force contradict each other: for its audits, each is the
        flag's, else the kind's own, else the fleet's, so a kind that sets only ``stale_after`` is judged
        against the fleet's ``max_age`` (or --max-age). Only a contradiction the kind's own value takes
        part in is the kind's: the fleet's and the flags' among themselves are checked where they are
        given (``Thresholds.parse``, the commands' options), and a value a flag replaces is not in force."""
        for kind, _values in self.kinds:
            in_force = {}
            for name in ("stale_after", "max_age", "stall_after"):
                value, source = self.resolve(name, kind=kind)
                in_force[name] = (value, source.partition(" ")[0])  # "kind crawl": the origin alone
            max_age, max_age_source = in_force["max_age"]
            for name, what in _BOUNDED_BY_MAX_AGE:
                value, source = in_force[name]
                if KIND in (source, max_age_source) and value > max_age:
                    raise ConfigError(_kind_order_message(kind, name, value, source, max_age, max_age_source, what))

    @classmethod
    def of(cls, fleet: Thresholds | None = None, override: Overrides | None = None,
           kinds: dict[str, Overrides] | None = None) -> "Policy":
        return cls(fleet=fleet or Thresholds(), override=override or Overrides(),
                   kinds=tuple(sorted((kinds or {}).items())))

    @classmethod
    def coerce(cls, value) -> "Policy":
        """A Policy from a Policy, or from plain Thresholds (the fleet's values), or None (the defaults)."""
        if isinstance(value, Policy):
            return value
        if isinstance(value, Thresholds):
            return cls(fleet=value)
        if value is None:
            return cls()
        raise TypeError(f"expected Policy or Thresholds, got {type(value).__name__}")

    def kind(self, name: str | None) -> Overrides | None:
        for kind, values in self.kinds:
            if kind == name:
                return values
        return None

    def resolve(self, name: str, *, audit: float | None = None, worker: float | None = None,
                kind: str | None = None) -> tuple[float, str]:
        """The value of one threshold for one audit, and where it came from (flag, audit, worker, kind, fleet)."""
        flag = getattr(self.override, name)
        if flag is not None:
            return flag, FLAG
        if audit is not None:
            return audit, AUDIT
        if worker is not None:
            return worker, WORKER
        values = self.kind(kind)
        if values is not None and getattr(values, name) is not None:
            return getattr(values, name), f"{KIND} {kind}"
        return getattr(self.fleet, name), FLEET

    def resolve_audit(self, kind, audit_max_age, worker_stale_after, worker_max_age, worker_stall_after) -> tuple:
        """``(stale_after, max_age, stall_after)`` for one audit, each ``(seconds, source)``, from its stored
        values as read (a value that is not a sane duration counts as unset, as the stuck query counts it).

        Remembered per policy: most audits of a reading share their kind and declared values.
        """
        key = (kind, audit_max_age, worker_stale_after, worker_max_age, worker_stall_after)
        memo = self._memo
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:  # a stored value that cannot be a key (never a number the drivers return)
            return self._resolve_audit(*key)
        if len(memo) >= _MEMO_SIZE:
            memo.clear()  # every audit with its own max_age in a long watch: start again rather than grow
        found = memo[key] = self._resolve_audit(*key)
        return found

    def _resolve_audit(self, kind, audit_max_age, worker_stale_after, worker_max_age, worker_stall_after) -> tuple:
        from .values import sane_duration

        return (self.resolve("stale_after", worker=sane_duration(worker_stale_after), kind=kind),
                self.resolve("max_age", audit=sane_duration(audit_max_age), worker=sane_duration(worker_max_age), kind=kind),
                self.resolve("stall_after", worker=sane_duration(worker_stall_after), kind=kind))

    def describe(self) -> str:
        """The thresholds in force, in human form, for summaries and dry runs."""
        parts = []
        for name in ("stale_after", "max_age", "stall_after"):
            flag = getattr(self.override, name)
            if flag is not None:
                parts.append(f"{name} {format_duration(flag, exact=True)} (flag: overrides every audit's own)")
            else:
                parts.append(f"{name} {format_duration(getattr(self.fleet, name), exact=True)}")
        text = ", ".join(parts)
        if not all(getattr(self.override, name) is not None for name in ("stale_after", "max_age", "stall_after")):
            text += "; an audit's own thresholds win where it declares them"
        for kind, values in self.kinds:
            # Only what is in force: a flag replaces every kind's value.
            kept = {k: v for k, v in values.as_dict().items() if getattr(self.override, k) is None}
            if kept:
                text += f"; kind {kind}: " + ", ".join(f"{k} {format_duration(v, exact=True)}" for k, v in kept.items())
        return text

    def safe_heartbeat_interval(self) -> float:
        """The longest heartbeat interval no stale threshold in force can refuse (``check_bounds``):
        the flag's, else the shortest of the fleet's and the kinds' (an audit that declares its own
        stale_after is checked only against the flag), over ``STALE_INTERVALS``. Only a finite value
        can refuse an interval (NaN compares false), so only those count; with none, 0."""
        if self.override.stale_after is not None:
            values = [self.override.stale_after]
        else:
            values = [self.fleet.stale_after, *(v.stale_after for _, v in self.kinds)]
        shortest = min((v for v in values if v is not None and math.isfinite(v)), default=None)
        return 0.0 if shortest is None else max(0.0, shortest / STALE_INTERVALS)

    def check_bounds(self, declared_intervals: list[tuple[str | None, bool, float]], *, allow_unsafe: bool = False) -> None:
        """Refuse a stale threshold below ``MIN_STALE_AFTER`` or below twice the heartbeat interval
        declared by the running audits it would judge. ``declared_intervals`` holds, per group of
        running audits, (kind, declares its own stale_after, longest declared heartbeat interval)."""
        if allow_unsafe:
            return
        hint = "; pass --unsafe-thresholds to use it anyway"
        candidates = [("--stale-after", self.override.stale_after)]
        if self.override.stale_after is None:  # the flag replaces the fleet's and every kind's
            candidates += [("stale_after", self.fleet.stale_after)]
            candidates += [(f"stale_after of kind {kind!r}", values.stale_after) for kind, values in self.kinds]
        for label, value in candidates:
            if value is not None and value < MIN_STALE_AFTER:
                raise UnsafeThreshold(f"{label} {format_duration(value, exact=True)} is below the floor of "
                                      f"{format_duration(MIN_STALE_AFTER, exact=True)}: it would fail healthy audits between beats{hint}")
        for kind, declares_own, interval in declared_intervals:
            if interval is None or interval <= 0:
                continue
            value, source = self.override.stale_after, "--stale-after"
            if value is None and not declares_own:
                kind_values = self.kind(kind)
                if kind_values is not None and kind_values.stale_after is not None:
                    value, source = kind_values.stale_after, f"stale_after of kind {kind!r}"
                else:
                    value, source = self.fleet.stale_after, "stale_after"
            if value is not None and value < STALE_INTERVALS * interval:
                raise UnsafeThreshold(
                    f"{source} {format_duration(value, exact=True)} is below twice the heartbeat interval "
                    f"({format_duration(interval, exact=True)}) that running audits declare: it would fail them between "
                    f"two beats; use at least {format_duration(STALE_INTERVALS * interval, exact=True)}{hint}")
