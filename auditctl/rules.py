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

import functools

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator, Mapping

from sqlalchemy import bindparam, Float, and_, case, cast, func, null, or_, select
from sqlalchemy import types
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.sql import Select

from .db import is_postgres, read_connection, seconds_since
from .errors import ConfigError
from .progress import view_from_fields
from .schema import IS_RUNNING, audits
from .thresholds import MAX_AGE_EXCEEDED, MAX_DURATION, PROGRESS_STALLED, RULE_REASONS, STALE_HEARTBEAT, Thresholds, format_duration

#: The columns the stuck query reads (what a verdict shows and a recovery's history records).
ROW_COLUMNS = ("id", "target", "status", "worker_id", "worker_instance", "lease", "started_at", "heartbeat_at",
               "attempts", "error", "recovery_info")

#: Fields of the progress document the stuck query extracts in SQL (parsing whole documents in
#: Python would cost more than the query).
PROGRESS_FIELDS = ("step", "percentage", "completed_tasks", "total_tasks")

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
    row: Mapping | None = field(default=None, repr=False, compare=False)

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


def _trusted(age):
    """An age in seconds, or NULL when its time is missing or too far in the future."""
    return case((age >= -FUTURE_TOLERANCE, age), else_=null())


class progress_shape(FunctionElement):
    """'object' when the progress document's fields can be read, 'not_json' or 'not_object' when not, NULL when absent."""

    type = types.String()
    inherit_cache = True


@compiles(progress_shape, "sqlite")
def _progress_shape_sqlite(element, compiler, **kw):
    (column,) = list(element.clauses)
    p = compiler.process(column, **kw)
    return (f"CASE WHEN {p} IS NULL THEN NULL WHEN typeof({p}) != 'text' OR NOT json_valid({p}) THEN 'not_json' "
            f"WHEN json_type({p}) = 'null' THEN NULL WHEN json_type({p}) != 'object' THEN 'not_object' "
            f"WHEN json_type({p}, '$.progress') IS NOT NULL AND json_type({p}, '$.progress') != 'object' THEN 'not_object' "
            "ELSE 'object' END")


@compiles(progress_shape, "postgresql")
def _progress_shape_pg(element, compiler, **kw):
    (column,) = list(element.clauses)
    p = compiler.process(column, **kw)
    return (f"CASE WHEN {p} IS NULL OR jsonb_typeof({p}) = 'null' THEN NULL WHEN jsonb_typeof({p}) <> 'object' THEN 'not_object' "
            f"WHEN {p} ? 'progress' AND jsonb_typeof({p} -> 'progress') <> 'object' THEN 'not_object' ELSE 'object' END")


class progress_field(FunctionElement):
    """One field of the progress document (``progress.<name>``, or ``<name>`` for a flat document), as a scalar.

    Only meaningful where progress_shape is 'object'; the driver's own value type comes back
    (text, number), so a wrong type is seen and flagged in Python.
    """

    type = types.NullType()
    inherit_cache = True

    def __init__(self, column, name):
        self.field_name = name
        super().__init__(column)


@compiles(progress_field, "sqlite")
def _progress_field_sqlite(element, compiler, **kw):
    (column,) = list(element.clauses)
    p, name = compiler.process(column, **kw), element.field_name
    return (f"CASE WHEN typeof({p}) = 'text' AND json_valid({p}) AND json_type({p}) = 'object' THEN "
            f"CASE WHEN json_type({p}, '$.progress') IS NULL THEN json_extract({p}, '$.{name}') "
            f"ELSE json_extract({p}, '$.progress.{name}') END END")


@compiles(progress_field, "postgresql")
def _progress_field_pg(element, compiler, **kw):
    (column,) = list(element.clauses)
    p, name = compiler.process(column, **kw), element.field_name
    return (f"CASE WHEN jsonb_typeof({p}) = 'object' THEN "
            f"CASE WHEN {p} ? 'progress' THEN {p} #> '{{progress,{name}}}' ELSE {p} -> '{name}' END END")


def stuck_query(
    thresholds: Thresholds,
    *,
    worker: str | None = None,
    reason: str | None = None,
    older_than: float | None = None,
    seen_since: datetime | None = None,
    ids: list[int] | None = None,
    ids_only: bool = False,
) -> tuple[Select, dict]:
    """The SELECT of stuck running audits (with measured ages and one flag per rule), and its parameters.

    The statement's shape depends only on which filters are used, so it is built once per
    shape and cached; thresholds and filter values travel as bound parameters.
    """
    if reason is not None and reason not in RULE_REASONS:
        raise ConfigError(f"unknown reason {reason!r}: choose from {', '.join(RULE_REASONS)}")
    statement = _stuck_statement(reason, worker is not None, older_than is not None, seen_since is not None,
                                 ids is not None, ids_only)
    params = {"stale_after": thresholds.stale_after, "max_age": thresholds.max_age, "stall_after": thresholds.stall_after}
    for name, value in (("worker", worker), ("older_than", older_than), ("seen_since", seen_since)):
        if value is not None:
            params[name] = value
    if ids is not None:
        params["ids"] = list(ids)
    return statement, params


@functools.lru_cache(maxsize=64)
def _stuck_statement(reason, by_worker: bool, by_age: bool, seen_since: bool, by_ids: bool, ids_only: bool) -> Select:
    # Three levels, each computing its values once per running audit: the raw ages, then the
    # trusted ones, then the rules. Written flat, the database would evaluate every age
    # expression again inside every rule and output column.
    raw_ages = select(
        *[audits.c[name] for name in ROW_COLUMNS],
        audits.c.progress,
        audits.c.max_age_seconds,
        seconds_since(audits.c.started_at).label("started_age"),
        seconds_since(audits.c.created_at).label("created_age"),
        seconds_since(audits.c.heartbeat_at).label("heartbeat_age"),
        seconds_since(audits.c.last_worker_update).label("update_age"),
        seconds_since(audits.c.progress_changed_at).label("changed_age"),
    ).where(IS_RUNNING)
    if by_worker:
        raw_ages = raw_ages.where(audits.c.worker_id == bindparam("worker", type_=audits.c.worker_id.type))
    if by_ids:
        raw_ages = raw_ages.where(audits.c.id.in_(bindparam("ids", expanding=True)))
    a = raw_ages.subquery("raw_ages")
    # Age from the claim, or from creation when the start time is missing, unreadable text
    # (another tool on SQLite) or in the future; NULL when neither can be trusted.
    age = func.coalesce(_trusted(a.c.started_age), _trusted(a.c.created_age))
    silence = func.coalesce(_trusted(a.c.heartbeat_age), _trusted(a.c.update_age), age)
    unchanged = func.coalesce(_trusted(a.c.changed_age), age)
    if seen_since:
        blind = seconds_since(bindparam("seen_since", type_=audits.c.heartbeat_at.type))
        silence = _least(silence, blind)
        unchanged = _least(unchanged, blind)
    # Only a sane per-audit deadline is trusted. Other tools may leave text in the column on
    # SQLite (where 'abc' > 0 is true; cast, it is 0) or NaN/Infinity on PostgreSQL (NaN sorts
    # above every number): those get the fleet's max_age instead.
    own_deadline = cast(a.c.max_age_seconds, Float)
    limit = case(
        (and_(own_deadline.is_not(None), own_deadline > 0, own_deadline <= MAX_DURATION), own_deadline),
        else_=bindparam("max_age", type_=Float),
    )
    inner = select(
        *[a.c[name] for name in ROW_COLUMNS],
        a.c.progress,
        age.label("age_seconds"),
        silence.label("silence_seconds"),
        unchanged.label("stalled_seconds"),
        limit.label("max_age_limit"),
        a.c.heartbeat_age,
    )
    judged = inner.subquery("judged")
    is_stale = or_(judged.c.silence_seconds.is_(None), judged.c.silence_seconds > bindparam("stale_after", type_=Float))
    is_over_age = and_(judged.c.age_seconds.is_not(None), judged.c.age_seconds > judged.c.max_age_limit)
    is_stalled = and_(~is_stale, judged.c.stalled_seconds > bindparam("stall_after", type_=Float))
    rule = {STALE_HEARTBEAT: is_stale, MAX_AGE_EXCEEDED: is_over_age, PROGRESS_STALLED: is_stalled}

    columns = [judged.c.id] if ids_only else [
        *[judged.c[name] for name in ROW_COLUMNS],
        judged.c.age_seconds,
        judged.c.silence_seconds,
        judged.c.stalled_seconds,
        judged.c.max_age_limit,
        judged.c.heartbeat_age,
        progress_shape(judged.c.progress).label("progress_shape"),
        *[progress_field(judged.c.progress, name).label(f"progress_{name}") for name in PROGRESS_FIELDS],
        case((is_stale, 1), else_=0).label(STALE_HEARTBEAT),
        case((is_over_age, 1), else_=0).label(MAX_AGE_EXCEEDED),
        case((is_stalled, 1), else_=0).label(PROGRESS_STALLED),
    ]
    query = select(*columns).where(rule[reason] if reason else or_(*rule.values()))
    if by_age:
        query = query.where(judged.c.age_seconds > bindparam("older_than", type_=Float))
    return query.order_by(judged.c.id)


def verdict_from_row(row) -> Verdict:
    mapping = row._mapping
    view = view_from_fields(mapping["progress_shape"], *[mapping[f"progress_{name}"] for name in PROGRESS_FIELDS])
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
        started_at=mapping["started_at"],
        last_heartbeat=mapping["heartbeat_at"],
        age_seconds=_round(mapping["age_seconds"]),
        silence_seconds=_round(mapping["silence_seconds"]),
        stalled_seconds=_round(mapping["stalled_seconds"]),
        max_age_seconds=float(mapping["max_age_limit"]),
        step=view.step,
        percentage=view.percentage,
        problems=problems,
        row=mapping,
    )


def select_stuck(connection: Connection, thresholds: Thresholds, *, limit: int | None = None, lock: bool = False, **filters) -> list[Verdict]:
    """Run the stuck query on an open connection; ``lock`` takes row locks (PostgreSQL) skipping busy rows."""
    query, params = stuck_query(thresholds, **filters)
    if limit is not None:
        query = query.limit(limit)
    if lock and is_postgres(connection):
        # SKIP LOCKED: a row another recoverer holds is theirs; a row a worker is writing
        # right now will be judged again on the next pass. Never wait on either.
        query = query.with_for_update(skip_locked=True, of=query.selected_columns.id.table)
    return [verdict_from_row(row) for row in connection.execute(query, params)]


def stuck_ids(connection: Connection, thresholds: Thresholds, **filters) -> list[int]:
    """Only the ids of the stuck audits (the cheap first step of a recovery)."""
    query, params = stuck_query(thresholds, ids_only=True, **filters)
    return list(connection.execute(query, params).scalars())


def find_stuck(engine: Engine, thresholds: Thresholds, **filters) -> list[Verdict]:
    """Every stuck audit, oldest id first."""
    return list(iter_stuck(engine, thresholds, **filters))


def iter_stuck(engine: Engine, thresholds: Thresholds, *, batch: int = 1000, **filters) -> Iterator[Verdict]:
    """Stream stuck audits without holding them all in memory (for large JSON output)."""
    with read_connection(engine) as connection:
        query, params = stuck_query(thresholds, **filters)
        result = connection.execution_options(stream_results=True, yield_per=batch).execute(query, params)
        for row in result:
            yield verdict_from_row(row)
