"""The one stuck query: three rules, evaluated by the database, on the database's clock.

A running audit is stuck when

* ``stale_heartbeat``: nothing was heard from its worker (heartbeat, progress write)
  for longer than ``stale_after``;
* ``max_age_exceeded``: it has run (since it was claimed) longer than its own
  ``max_age_seconds`` or, when it declares none, the fleet's ``max_age``;
* ``progress_stalled``: heartbeats are fresh but step, task counts and percentage have
  not changed for longer than ``stall_after`` (alive but frozen). A stale audit is
  never also called stalled.

Times the database cannot trust are not used: a heartbeat more than
``FUTURE_TOLERANCE`` seconds in the future (another tool's clock) is ignored and the
audit is judged from its start time instead, and flagged. Likewise a start time that is
unreadable or in the future gives way to the creation time; an audit with no
trustworthy time at all counts as never heard from.

A monitor that could not see the database for a while passes ``seen_since``: silence
and stalls are then never measured from before that moment, so an outage is not
mistaken for dead workers (see ``monitor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from sqlalchemy import Float, and_, case, cast, func, literal, null, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Select

from .db import is_postgres, read_connection, seconds_since
from .errors import ConfigError
from .progress import read_progress
from .schema import IS_RUNNING, audits, parse_timestamp
from .thresholds import MAX_AGE_EXCEEDED, MAX_DURATION, PROGRESS_STALLED, RULE_REASONS, STALE_HEARTBEAT, Thresholds, format_duration

#: The columns the stuck query reads (what a verdict shows and a recovery's history records).
ROW_COLUMNS = ("id", "target", "status", "worker_id", "worker_instance", "lease", "started_at", "heartbeat_at",
               "progress", "attempts", "error", "recovery_info")

#: Seconds a timestamp may lie in the future before it is distrusted (clock skew of other writers).
FUTURE_TOLERANCE = 60.0


@dataclass
class Verdict:
    """A stuck audit and why: each rule that fired, with what was measured."""

    id: int
    target: str
    status: str
    reasons: list[str]
    worker_id: str | None
    worker_instance: str | None
    lease: str | None
    started_at: datetime | None
    last_heartbeat: datetime | None
    age_seconds: float | None
    silence_seconds: float | None
    stalled_seconds: float | None
    max_age_seconds: float
    step: str | None = None
    percentage: float | None = None
    problems: list[str] = field(default_factory=list)
    #: The audit's ROW_COLUMNS as read by the stuck query (a recovery's history records them).
    row: dict | None = field(default=None, repr=False, compare=False)

    def explain(self, thresholds: Thresholds) -> list[str]:
        """One sentence per reason, e.g. ``no heartbeat for 12m (stale_after 10m)``."""
        sentences = []
        for reason in self.reasons:
            if reason == STALE_HEARTBEAT:
                heard = "never heard from" if self.silence_seconds is None else f"no heartbeat for {format_duration(self.silence_seconds)}"
                sentences.append(f"{heard} (stale_after {format_duration(thresholds.stale_after)})")
            elif reason == MAX_AGE_EXCEEDED:
                sentences.append(f"running for {format_duration(self.age_seconds)} (max_age {format_duration(self.max_age_seconds)})")
            elif reason == PROGRESS_STALLED:
                sentences.append(
                    f"no progress for {format_duration(self.stalled_seconds)} (stall_after {format_duration(thresholds.stall_after)})"
                )
        return sentences

    def measurements(self, thresholds: Thresholds) -> dict:
        return {
            "silence_seconds": _round(self.silence_seconds),
            "age_seconds": _round(self.age_seconds),
            "stalled_seconds": _round(self.stalled_seconds),
            "stale_after": thresholds.stale_after,
            "max_age": self.max_age_seconds,
            "stall_after": thresholds.stall_after,
        }


def _round(value):
    return None if value is None else round(float(value), 3)


def _least(*values):
    """The smallest non-NULL value (SQLite's scalar MIN returns NULL if any argument is)."""
    result = values[0]
    for value in values[1:]:
        result = case((result.is_(None), value), (value.is_(None), result), (value < result, value), else_=result)
    return result


def _trusted_age(column):
    """Seconds since ``column``, or NULL when it is missing or too far in the future."""
    age = seconds_since(column)
    return case((age >= -FUTURE_TOLERANCE, age), else_=null())


def stuck_query(
    thresholds: Thresholds,
    *,
    worker: str | None = None,
    reason: str | None = None,
    older_than: float | None = None,
    seen_since: datetime | None = None,
    ids: list[int] | None = None,
) -> Select:
    """The SELECT of stuck running audits with their measured ages and one flag per rule."""
    if reason is not None and reason not in RULE_REASONS:
        raise ConfigError(f"unknown reason {reason!r}: choose from {', '.join(RULE_REASONS)}")
    # Age from the claim, or from creation when the start time is missing, unreadable text
    # (another tool on SQLite) or in the future; NULL when neither can be trusted.
    age = func.coalesce(_trusted_age(audits.c.started_at), _trusted_age(audits.c.created_at))
    silence = func.coalesce(_trusted_age(audits.c.heartbeat_at), _trusted_age(audits.c.last_worker_update), age)
    unchanged = func.coalesce(_trusted_age(audits.c.progress_changed_at), age)
    if seen_since is not None:
        blind = seconds_since(literal(seen_since, type_=audits.c.heartbeat_at.type))
        silence = _least(silence, blind)
        unchanged = _least(unchanged, blind)
    # Only a sane per-audit deadline is trusted. Other tools may leave text in the column on
    # SQLite (where 'abc' > 0 is true; cast, it is 0) or NaN/Infinity on PostgreSQL (NaN sorts
    # above every number): those get the fleet's max_age instead.
    own_deadline = cast(audits.c.max_age_seconds, Float)
    limit = case(
        (and_(own_deadline.is_not(None), own_deadline > 0, own_deadline <= MAX_DURATION), own_deadline),
        else_=literal(thresholds.max_age),
    )
    is_stale = or_(silence.is_(None), silence > thresholds.stale_after)
    is_over_age = and_(age.is_not(None), age > limit)
    is_stalled = and_(~is_stale, unchanged > thresholds.stall_after)
    heartbeat_age = seconds_since(audits.c.heartbeat_at)
    rule = {STALE_HEARTBEAT: is_stale, MAX_AGE_EXCEEDED: is_over_age, PROGRESS_STALLED: is_stalled}

    query = select(
        *[audits.c[name] for name in ROW_COLUMNS],
        age.label("age_seconds"),
        silence.label("silence_seconds"),
        unchanged.label("stalled_seconds"),
        limit.label("max_age_limit"),
        heartbeat_age.label("heartbeat_age"),
        case((is_stale, 1), else_=0).label(STALE_HEARTBEAT),
        case((is_over_age, 1), else_=0).label(MAX_AGE_EXCEEDED),
        case((is_stalled, 1), else_=0).label(PROGRESS_STALLED),
    ).where(IS_RUNNING)
    query = query.where(rule[reason] if reason else or_(*rule.values()))
    if worker is not None:
        query = query.where(audits.c.worker_id == worker)
    if older_than is not None:
        query = query.where(age > older_than)
    if ids is not None:
        query = query.where(audits.c.id.in_(ids))
    return query.order_by(audits.c.id)


def verdict_from_row(row) -> Verdict:
    mapping = row._mapping
    view = read_progress(mapping["progress"])
    problems = list(view.problems)
    heartbeat_age = mapping["heartbeat_age"]
    if heartbeat_age is not None and heartbeat_age < -FUTURE_TOLERANCE:
        problems.append("heartbeat_in_future")
    if mapping["lease"] is None:
        problems.append("no_lease")
    return Verdict(
        id=mapping["id"],
        target=mapping["target"],
        status=mapping["status"],
        reasons=[name for name in RULE_REASONS if mapping[name]],
        worker_id=mapping["worker_id"],
        worker_instance=mapping["worker_instance"],
        lease=mapping["lease"],
        started_at=parse_timestamp(mapping["started_at"]),
        last_heartbeat=parse_timestamp(mapping["heartbeat_at"]),
        age_seconds=_round(mapping["age_seconds"]),
        silence_seconds=_round(mapping["silence_seconds"]),
        stalled_seconds=_round(mapping["stalled_seconds"]),
        max_age_seconds=float(mapping["max_age_limit"]),
        step=view.step,
        percentage=view.percentage,
        problems=problems,
        row={name: mapping[name] for name in ROW_COLUMNS},
    )


def select_stuck(connection: Connection, thresholds: Thresholds, *, limit: int | None = None, lock: bool = False, **filters) -> list[Verdict]:
    """Run the stuck query on an open connection; ``lock`` takes row locks (PostgreSQL) skipping busy rows."""
    query = stuck_query(thresholds, **filters)
    if limit is not None:
        query = query.limit(limit)
    if lock and is_postgres(connection):
        # SKIP LOCKED: a row another recoverer holds is theirs; a row a worker is writing
        # right now will be judged again on the next pass. Never wait on either.
        query = query.with_for_update(skip_locked=True, of=audits)
    return [verdict_from_row(row) for row in connection.execute(query)]


def stuck_ids(connection: Connection, thresholds: Thresholds, **filters) -> list[int]:
    """Only the ids of the stuck audits (the cheap first step of a recovery)."""
    query = stuck_query(thresholds, **filters).with_only_columns(audits.c.id)
    return list(connection.execute(query).scalars())


def find_stuck(engine: Engine, thresholds: Thresholds, **filters) -> list[Verdict]:
    """Every stuck audit, oldest id first."""
    return list(iter_stuck(engine, thresholds, **filters))


def iter_stuck(engine: Engine, thresholds: Thresholds, *, batch: int = 1000, **filters) -> Iterator[Verdict]:
    """Stream stuck audits without holding them all in memory (for large JSON output)."""
    with read_connection(engine) as connection:
        query = stuck_query(thresholds, **filters)
        result = connection.execution_options(stream_results=True, yield_per=batch).execute(query)
        for row in result:
            yield verdict_from_row(row)
