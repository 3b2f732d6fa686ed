"""Thresholds learned from history, per kind of audit: ``auditctl report --suggest-thresholds``.

The method, for each kind (audits with no kind are the fleet's, the top-level settings):

1. Take the audits of that kind that **completed** in the window: each was healthy from
   start to finish, so any threshold it exceeded would have recovered it wrongly.
2. For each, read what it showed: its longest silence between two writes
   (``longest_gap_seconds``), its longest time without progress (``longest_stall_seconds``),
   both kept by the worker's own writes, and its run time (``finished_at - started_at``).
3. Propose, per threshold, the 99th percentile of what healthy audits showed, times
   ``MARGIN`` (1.5), rounded up to a round duration. The percentile keeps one freak run
   from setting the threshold for everyone; the margin leaves room for runs a little worse
   than any seen. Then the floors: ``stale_after`` and ``stall_after`` are at least
   ``STALE_INTERVALS`` (2) times the longest heartbeat interval the kind's workers declared,
   in its completed audits and in its running ones, which ``recover`` checks the thresholds
   against (a worker is heard from, and its progress seen, only when it writes); the fleet's values
   (audits with no kind) also judge the kinds that get no proposal, so theirs count too. And
   ``max_age`` is at least the other two (the config file refuses less).
4. For each proposal, the **false-recovery rate**: the share of those completed audits whose
   gap, stall or run time is above it, so that the rule would have recovered them although
   they were healthy. It assumes a monitor that looks continuously; a monitor that looks every
   ``--interval`` can only do better. The current thresholds get the same count.
5. The **detection latency** it gives: a stuck audit is recovered at most the threshold plus
   one monitor interval after its last heartbeat (``stale_after``), its last progress
   (``stall_after``) or its start (``max_age``); sooner when the registry proves its worker gone.

A kind with fewer than ``MIN_SAMPLES`` completed audits gets no proposal: too little history
to learn from. Audits whose worker declared its own thresholds are judged by those, not by
the kind's; they are counted, so the operator knows a ``[kinds]`` block will not apply to them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine

from .errors import ConfigError
from .report import Sql, percentile, window
from .schema import COMPLETED
from .sqlfunctions import fetch_now, is_postgres
from .thresholds import MAX_DURATION, MAX_KIND, MIN_STALE_AFTER, STALE_INTERVALS, Policy, format_duration, kind_name
from .timestamps import isoformat_z
from .transactions import read_connection
from .values import float_value, sane_duration, text_value

#: Proposals are this multiple of the 99th percentile of what healthy audits showed.
MARGIN = 1.5
QUANTILE = 0.99
#: Fewer completed audits than this: no proposal for the kind.
MIN_SAMPLES = 20
NAMES = ("stale_after", "stall_after", "max_age")
#: What each threshold is measured against, in words.
MEASURES = {"stale_after": "longest silence between writes", "stall_after": "longest time without progress",
            "max_age": "run time"}
LATENCY_FROM = {"stale_after": "last heartbeat", "stall_after": "last progress", "max_age": "start"}


@dataclass
class Proposal:
    name: str
    seconds: float | None
    text: str | None  # the duration as the config file takes it ("7m30s")
    samples: int
    observed_p50: float | None
    observed_p99: float | None
    observed_max: float | None
    false_recoveries: int | None
    false_recovery_rate: float | None
    detection_latency_seconds: float | None
    floor: str | None  # why the proposal was raised above what the data asked for
    current_seconds: float
    current_source: str
    current_false_recoveries: int
    current_false_recovery_rate: float | None


@dataclass
class KindSuggestion:
    kind: str | None
    completed: int
    heartbeat_interval: float | None
    declaring_own: int
    enough: bool
    proposals: dict[str, Proposal] = field(default_factory=dict)
    #: Completed audits that at least one proposal would have recovered wrongly.
    false_recoveries: int | None = None
    false_recovery_rate: float | None = None
    note: str | None = None


@dataclass
class Suggestions:
    since: datetime
    until: datetime
    interval: float
    kinds: list[KindSuggestion]

    def as_dict(self) -> dict:
        data = asdict(self)
        data["since"], data["until"] = isoformat_z(self.since), isoformat_z(self.until)
        data["method"] = method_summary()
        return data


def method_summary() -> str:
    return (f"per kind, from audits that completed: the {QUANTILE * 100:.0f}th percentile of each audit's longest silence, "
            f"longest time without progress and run time, times {MARGIN}, rounded up; stale_after and stall_after at "
            f"least {STALE_INTERVALS:g} declared heartbeat intervals, max_age at least both. A false recovery is a "
            "completed audit that went past the proposal.")


# --- round durations -------------------------------------------------------------------------


#: (up to, round up to a multiple of): durations people can read and type.
_STEPS = ((60.0, 5.0), (600.0, 30.0), (3600.0, 60.0), (6 * 3600.0, 300.0), (86400.0, 900.0), (math.inf, 3600.0))


def round_up(seconds: float) -> float:
    """``seconds`` rounded up to a round duration: 5s steps under a minute, then 30s, 1m, 5m, 15m, 1h."""
    for limit, step in _STEPS:
        if seconds <= limit:
            return max(step, math.ceil(seconds / step - 1e-9) * step)
    return seconds  # pragma: no cover - the last step has no limit


def duration_text(seconds: float) -> str:
    """Seconds as the config file writes a duration, exactly: ``450`` -> ``"7m30s"``, ``5400`` -> ``"1h30m"``."""
    whole = int(round(seconds))
    if whole != seconds or whole <= 0:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --- reading the history -----------------------------------------------------------------------


@dataclass
class _Sample:
    gap: float | None
    stall: float | None
    run: float | None
    interval: float | None
    own: bool


def _measure(value) -> float | None:
    number = float_value(value)
    return number if number is not None and 0 <= number <= MAX_DURATION else None


def _samples(engine: Engine, since: "float | datetime") -> tuple[datetime, datetime, dict[str | None, list[_Sample]]]:
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        start, _ = window(now, since)
        sql = Sql(is_postgres(connection))
        # Plain numbers straight from the database (the run time subtracted there): a month of a big
        # fleet is a hundred thousand rows.
        rows = connection.execute(text(
            f"SELECT kind, {sql.elapsed('finished_at', 'started_at')}, longest_gap_seconds, longest_stall_seconds, "
            "declared_heartbeat_interval, declared_stale_after, declared_stall_after, declared_max_age "
            f"FROM audits WHERE status = '{COMPLETED}' AND finished_at >= :start"), {"start": sql.moment(start)}).all()
    by_kind: dict[str | None, list[_Sample]] = {}
    for kind, run, gap, stall, interval, *declared in rows:
        by_kind.setdefault(text_value(kind), []).append(_Sample(
            gap=_measure(gap), stall=_measure(stall), run=_measure(run), interval=sane_duration(interval),
            own=any(sane_duration(v) is not None for v in declared)))
    return start, now, by_kind


def _values(samples: list[_Sample], name: str) -> list[float]:
    attribute = {"stale_after": "gap", "stall_after": "stall", "max_age": "run"}[name]
    return [v for v in (getattr(s, attribute) for s in samples) if v is not None]


def _running_intervals(engine: Engine) -> dict[str | None, float]:
    """Per kind, the longest heartbeat interval declared by running audits that take their
    stale_after from the config (not their worker's own): what ``Policy.check_bounds`` holds a
    stale_after to when ``recover`` or ``watch`` starts."""
    from .rules import declared_intervals

    found: dict[str | None, float] = {}
    for kind, declares_own, interval in declared_intervals(engine):
        if not declares_own and interval is not None:
            found[kind] = max(interval, found.get(kind, 0.0))
    return found


def _fleet_judged_intervals(by_kind: dict[str | None, list[_Sample]], running: dict[str | None, float], policy: Policy,
                            min_samples: int) -> dict[str, float]:
    """The longest heartbeat interval declared in each kind that the fleet's stale_after would judge
    once the suggestions are pasted: a kind with no proposal of its own (too little history, no
    measurements, a name no ``[kinds.NAME]`` takes, or only running audits) and no stale_after of
    its own in force now."""
    found = {}
    for kind in {*by_kind, *running} - {None}:
        own = policy.kind(kind)
        if own is not None and own.stale_after is not None:
            continue
        samples = by_kind.get(kind, [])
        learned = len(samples) >= min_samples and all(_values(samples, name) for name in NAMES) and _nameable(kind)
        intervals = [s.interval for s in samples if s.interval is not None] + ([running[kind]] if kind in running else [])
        if not learned and intervals:
            found[kind] = max(intervals)
    return found


def false_recoveries(values: list[float], threshold: float) -> int:
    """How many healthy audits went past ``threshold`` (the rules fire on strictly more than it)."""
    return sum(1 for v in values if v > threshold)


def suggest_thresholds(engine: Engine, since: "float | datetime", policy: Policy | None = None, *, interval: float = 300.0,
                       min_samples: int = MIN_SAMPLES) -> Suggestions:
    """Per kind, thresholds learned from the audits that completed in the last ``since`` seconds.

    ``policy`` gives the thresholds in force now (compared with the proposals); ``interval``
    is the monitor's (``watch --interval``), added to the detection latency.
    """
    policy = Policy.coerce(policy)
    start, now, by_kind = _samples(engine, since)
    running = _running_intervals(engine)
    fallback = _fleet_judged_intervals(by_kind, running, policy, min_samples)
    result = []
    for kind in sorted(by_kind, key=lambda k: (k is not None, k or "")):
        samples = by_kind[kind]
        intervals = [s.interval for s in samples if s.interval is not None]
        suggestion = KindSuggestion(kind=kind, completed=len(samples), heartbeat_interval=max(intervals) if intervals else None,
                                    declaring_own=sum(1 for s in samples if s.own), enough=len(samples) >= min_samples)
        raw: dict[str, float] = {}
        floors: dict[str, str] = {}
        for name in NAMES:
            values = _values(samples, name)
            if values and suggestion.enough:
                raw[name] = min(MAX_DURATION, round_up(max(percentile(values, QUANTILE) * MARGIN, MIN_STALE_AFTER)))
        if suggestion.enough and len(raw) == len(NAMES):
            beat, whose = suggestion.heartbeat_interval, ""
            if running.get(kind) is not None and (beat is None or running[kind] > beat):
                # `recover` and `watch` refuse a stale_after below two beats of a running audit they judge.
                beat, whose = running[kind], " by running audits"
            if kind is None and fallback and (beat is None or max(fallback.values()) > beat):
                # The fleet's values also judge the kinds given no values of their own: `recover` and
                # `watch` refuse a stale_after below two beats of any running audit they judge.
                whose = max(fallback, key=lambda k: (fallback[k], k))
                beat, whose = fallback[whose], f" by kind {whose}, which the fleet's values also judge"
            if beat is not None:
                # Within a year, as every duration the config file takes (a declared interval may be up to one).
                floor = min(MAX_DURATION, round_up(STALE_INTERVALS * beat))
                for name in ("stale_after", "stall_after"):
                    if raw[name] < floor:
                        raw[name] = floor
                        floors[name] = (f"raised to {STALE_INTERVALS:g} heartbeat intervals "
                                        f"({format_duration(beat)} declared{whose})")
            longest = max(raw["stale_after"], raw["stall_after"])
            if raw["max_age"] < longest:
                raw["max_age"] = longest
                floors["max_age"] = "raised to the longer of stale_after and stall_after"
        elif suggestion.enough:
            suggestion.note = ("completed audits carry no gap or stall measurements (workers older than schema "
                               "revision 0002, or another tool): nothing to learn from")
            suggestion.enough = False
            raw = {}
        else:
            suggestion.note = (f"only {len(samples)} completed audit{'s' if len(samples) != 1 else ''}; "
                               f"at least {min_samples} are needed to propose thresholds")
        wrong = set()
        for name in NAMES:
            values = _values(samples, name)
            current, source = policy.resolve(name, kind=kind)
            proposal = raw.get(name)
            if proposal is not None:
                attribute = {"stale_after": "gap", "stall_after": "stall", "max_age": "run"}[name]
                wrong |= {i for i, s in enumerate(samples) if getattr(s, attribute) is not None and getattr(s, attribute) > proposal}
            count = None if proposal is None else false_recoveries(values, proposal)
            suggestion.proposals[name] = Proposal(
                name=name, seconds=proposal, text=None if proposal is None else duration_text(proposal), samples=len(values),
                observed_p50=percentile(values, 0.5), observed_p99=percentile(values, QUANTILE),
                observed_max=max(values) if values else None,
                false_recoveries=count, false_recovery_rate=None if count is None or not values else round(count / len(values), 6),
                detection_latency_seconds=None if proposal is None else proposal + interval, floor=floors.get(name),
                current_seconds=current, current_source=source, current_false_recoveries=false_recoveries(values, current),
                current_false_recovery_rate=round(false_recoveries(values, current) / len(values), 6) if values else None,
            )
        if raw:
            suggestion.false_recoveries = len(wrong)
            suggestion.false_recovery_rate = round(len(wrong) / len(samples), 6)
        result.append(suggestion)
    return Suggestions(since=start, until=now, interval=interval, kinds=result)


# --- the config block ----------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    """A TOML basic string for ``value``: quotes and backslashes escaped, and every character a
    terminal would act on or hide (``textsafe``'s controls, bidi and zero-width characters), and the
    line separators editors break at, as ``\\uXXXX``: TOML reads it back as the same text."""
    from .textsafe import unicode_escaped

    text = unicode_escaped(value.replace("\\", "\\\\").replace('"', '\\"'))
    return '"' + text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + '"'


def _toml_key(value: str) -> str:
    bare = value and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    return value if bare else _toml_string(value)


def _comment(text: str) -> str:
    """A TOML comment line: nothing in ``text`` can end it or reach a terminal as a control."""
    from .textsafe import printable

    return "# " + printable(text)


def _nameable(kind: str) -> bool:
    """Whether a ``[kinds.NAME]`` section can name ``kind`` (``thresholds.kind_name``)."""
    try:
        kind_name(kind, "kind")
    except ConfigError:
        return False
    return True


def to_toml(suggestions: Suggestions) -> str:
    """The proposals as config file text: top-level keys for audits with no kind, then one
    ``[kinds.NAME]`` table per kind. Kinds without a proposal appear as comments only."""
    lines = [_comment(f"Thresholds learned by `auditctl report --suggest-thresholds` from audits completed "
                      f"{isoformat_z(suggestions.since)} .. {isoformat_z(suggestions.until)}."),
             _comment(f"Method: {QUANTILE * 100:.0f}th percentile of what healthy audits showed, x{MARGIN}, rounded up; "
                      f"latency includes a {format_duration(suggestions.interval)} monitor interval.")]
    ordered = sorted(suggestions.kinds, key=lambda k: k.kind is not None)  # top-level keys before any table

    def block(item: KindSuggestion, header: str | None) -> list[str]:
        out = [""]
        label = "audits with no kind (the fleet's values; these replace the top-level ones)" if item.kind is None \
            else f"kind {item.kind}"
        if not item.enough:
            out.append(_comment(f"{label}: no proposal: {item.note}"))
            return out
        if item.kind is not None and not _nameable(item.kind):
            # Another tool wrote a kind no audit made by auditctl can have (blank, longer than the
            # column): the config file refuses its section, and with it the whole block.
            shown = repr(item.kind[:40]) + ("..." if len(item.kind) > 40 else "")
            out.append(_comment(f"kind {shown}: no [kinds.NAME] section can name it (a kind is 1 to {MAX_KIND} characters, "
                                "not blank); its audits are judged by the fleet's values. Proposed: "
                                + ", ".join(f"{name} {item.proposals[name].text}" for name in NAMES)))
            return out
        out.append(_comment(f"{label}: {item.completed} completed audits; would have recovered "
                            f"{item.false_recoveries} of them wrongly ({item.false_recovery_rate:.1%})"))
        if item.declaring_own:
            out.append(_comment(f"{item.declaring_own} of them ran under thresholds their worker declared, "
                                "which take precedence over these"))
        if header:
            out.append(header)
        for name in NAMES:
            p = item.proposals[name]
            out.append(f"{name} = {_toml_string(p.text)}  "
                       + _comment(f"{MEASURES[name]} p99 {format_duration(p.observed_p99)}, max {format_duration(p.observed_max)}; "
                                  f"false recoveries {p.false_recoveries}/{p.samples} ({p.false_recovery_rate:.1%}); "
                                  f"caught within {format_duration(p.detection_latency_seconds)} of the {LATENCY_FROM[name]}"
                                  + (f"; {p.floor}" if p.floor else "")))
        return out

    for item in ordered:
        header = None if item.kind is None else f"[kinds.{_toml_key(item.kind)}]"
        lines += block(item, header)
    return "\n".join(lines) + "\n"


__all__ = ["KindSuggestion", "MARGIN", "MIN_SAMPLES", "Proposal", "QUANTILE", "Suggestions", "duration_text",
           "false_recoveries", "method_summary", "round_up", "suggest_thresholds", "to_toml"]
