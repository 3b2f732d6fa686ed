"""Reading audits for people: listings and one audit in full.

Everything here is read-only and returns plain dataclasses; the faces render them.
Listings stream page by page (each page one short read, fetched whole), so a slow reader
never holds a transaction open. Every row is read on its own: a row another tool filled
with something unreadable is listed as such, with what was wrong, and never stops the
listing. Ages are measured on the database's clock, read once per listing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from sqlalchemy import false, or_, select
from sqlalchemy.engine import Engine

from .errors import AuditNotFound, ConfigError
from .history import Event, events_for
from .progress import read_progress
from .rules import FUTURE_TOLERANCE, isolate
from .schema import IS_RUNNING, RUNNING, STATUSES, audits
from .sqlfunctions import fetch_now, is_postgres, moments, stored_time
from .thresholds import check_window
from .timestamps import Unreadable, as_datetime, parse, to_storage
from .transactions import keyset_pages, read_connection
from .values import MAX_INT, MIN_INT, THRESHOLD_COLUMNS, float_value, invalid_thresholds, safe_int, text_value

PAGE_SIZE = 2000
SORTS = ("id", "created", "target", "status", "worker")


@dataclass(frozen=True)
class AuditFilters:
    """Which audits a listing shows. Each tuple is a union; ``since``/``until`` bound the creation time
    (seconds ago as a float, or a datetime)."""

    statuses: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    since: float | datetime | None = None
    until: float | datetime | None = None

    def __post_init__(self):
        from .globs import check_filter_lists
        check_filter_lists(worker=self.workers, kind=self.kinds, target=self.targets)
        check_window(self.since, self.until)


@dataclass
class AuditSummary:
    id: int
    target: str
    status: str
    worker_id: str | None
    step: str | None
    percentage: float | None
    attempts: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    last_heartbeat: datetime | None
    heartbeat_age_seconds: float | None
    age_seconds: float | None
    error: str | None
    kind: str | None = None
    resets: int = 0
    created_age_seconds: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class AuditDetail:
    summary: AuditSummary
    progress: object
    recovery_info: object
    last_worker_update: datetime | None
    max_age_seconds: float | None
    worker_instance: str | None
    has_lease: bool
    history: list[Event]
    declared: dict = field(default_factory=dict)


def _seconds(now: datetime | None, moment) -> float | None:
    moment = as_datetime(moment)
    if now is None or moment is None:
        return None
    return round((now - moment).total_seconds(), 3)


def summarise(m, now: datetime | None) -> AuditSummary:
    """One row as a summary; raises only for a row too broken to describe (see ``unreadable_summary``)."""
    view = read_progress(m["progress"])
    status = text_value(m["status"]) or "?"
    running = status == RUNNING
    problems = list(view.problems)
    for name in ("created_at", "started_at", "finished_at", "heartbeat_at"):
        if isinstance(parse(m[name]), Unreadable):
            problems.append(f"{name}_unreadable")
    heartbeat_age = _seconds(now, m["heartbeat_at"]) if running else None
    if heartbeat_age is not None and heartbeat_age < -FUTURE_TOLERANCE:
        problems.append("heartbeat_in_future")
    if status not in STATUSES:
        problems.append("unknown_status")
    age = None
    if running:
        age = _seconds(now, m["started_at"])
        if age is None:
            age = _seconds(now, m["created_at"])
    attempts = safe_int(m["attempts"])
    if attempts is None and m["attempts"] is not None:
        problems.append("attempts_not_a_number")
    return AuditSummary(
        id=m["id"], target=text_value(m["target"]) or "", status=status, worker_id=text_value(m["worker_id"]),
        step=view.step if status not in ("pending",) else None, percentage=view.percentage if status != "pending" else None,
        attempts=attempts or 0, created_at=as_datetime(m["created_at"]), started_at=as_datetime(m["started_at"]),
        finished_at=as_datetime(m["finished_at"]), last_heartbeat=as_datetime(m["heartbeat_at"]),
        heartbeat_age_seconds=heartbeat_age, age_seconds=age, error=text_value(m["error"]),
        kind=text_value(m["kind"]), resets=safe_int(m["resets"]) or 0, created_age_seconds=_seconds(now, m["created_at"]),
        problems=problems,
    )


#: What ``summarise`` reads: a listing never decodes ``recovery_info`` (a third of ``list``'s time).
_SUMMARY_COLUMNS = tuple(audits.c[name] for name in (
    "id", "target", "status", "worker_id", "progress", "created_at", "started_at", "finished_at", "heartbeat_at",
    "attempts", "error", "kind", "resets"))


def unreadable_summary(m, problem: str) -> AuditSummary:
    return AuditSummary(id=m["id"], target=text_value(m.get("target")) or "?", status=text_value(m.get("status")) or "?",
                        worker_id=None, step=None, percentage=None, attempts=0, created_at=None, started_at=None,
                        finished_at=None, last_heartbeat=None, heartbeat_age_seconds=None, age_seconds=None, error=None,
                        problems=[f"row_unreadable: {problem}"])


def _conditions(connection, filters: AuditFilters) -> list:
    postgres = is_postgres(connection)
    conditions = []
    if filters.statuses == (RUNNING,):
        conditions.append(IS_RUNNING)  # the partial index
    elif filters.statuses:
        conditions.append(audits.c.status.in_(filters.statuses))
    if filters.workers:
        conditions.append(audits.c.worker_id.in_(filters.workers))
    if filters.kinds:
        conditions.append(audits.c.kind.in_(filters.kinds))
    if filters.targets:
        from .globs import target_pattern

        patterns = [target_pattern(p, postgres) for p in filters.targets]
        matchers = [audits.c.target.regexp_match(p) if postgres else audits.c.target.op("GLOB")(p)
                    for p in patterns if p is not None]  # None: a glob that matches nothing
        conditions.append(or_(false(), *matchers))
    window = moments(connection, since=filters.since, until=filters.until)
    check_window(window.get("since"), window.get("until"))  # one a duration, the other a time: known only now
    for name, compare in (("since", "__ge__"), ("until", "__le__")):
        if name in window:
            bound = window[name] if postgres else to_storage(window[name])
            conditions.append(getattr(stored_time(audits.c.created_at), compare)(bound))
    return conditions


_ORDER = {"id": audits.c.id, "created": audits.c.created_at, "target": audits.c.target, "status": audits.c.status,
          "worker": audits.c.worker_id}


def list_audits(engine: Engine, filters: AuditFilters | None = None, **options) -> list[AuditSummary]:
    """Audits, newest first."""
    return list(iter_audits(engine, filters, **options))


def iter_audits(engine: Engine, filters: AuditFilters | None = None, *, sort: str = "id", descending: bool = True,
                limit: int | None = 50, page_size: int = PAGE_SIZE, status: str | None = None,
                worker: str | None = None) -> Iterator[AuditSummary]:
    """Stream audits (newest first by default), page by page."""
    filters = filters or AuditFilters(statuses=(status,) if status else (), workers=(worker,) if worker else ())
    if sort not in SORTS:
        raise ConfigError(f"unknown sort {sort!r}: choose from {', '.join(SORTS)}")
    order = _ORDER[sort]
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        conditions = _conditions(connection, filters)
    base = select(*_SUMMARY_COLUMNS).where(*conditions)
    if sort != "id":
        postgres = engine.dialect.name == "postgresql"
        if postgres and sort in ("target", "status", "worker"):
            order = order.collate("C")  # text in code point order, as SQLite sorts it, whatever the database's locale
        ordered = order.desc() if descending else order
        if postgres:
            # Where SQLite puts NULL (a pending audit's worker): first going up, last going down.
            ordered = ordered.nulls_last() if descending else ordered.nulls_first()
        query = base.order_by(ordered, audits.c.id)
        if limit is not None:
            query = query.limit(limit)
        with read_connection(engine) as connection:
            rows = connection.execute(query).all()
        for row in rows:
            yield isolate(row._mapping, lambda m: summarise(m, now), unreadable_summary)
        return

    def read_page(connection, size: int, after: int | None) -> list:
        query = base.order_by(audits.c.id.desc() if descending else audits.c.id).limit(size)
        if after is not None:
            query = query.where(audits.c.id < after if descending else audits.c.id > after)
        return connection.execute(query).all()

    for row in keyset_pages(engine, read_page, page_size=page_size, limit=limit, key=lambda row: row._mapping["id"]):
        yield isolate(row._mapping, lambda m: summarise(m, now), unreadable_summary)


def get_audit(engine: Engine, audit_id: int) -> AuditDetail:
    if not MIN_INT <= audit_id <= MAX_INT:  # no database integer holds it (the driver would raise)
        raise AuditNotFound(f"no audit with id {audit_id}")
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        row = connection.execute(select(audits).where(audits.c.id == audit_id)).first()
    if row is None:
        raise AuditNotFound(f"no audit with id {audit_id}")
    m = row._mapping
    summary = isolate(m, lambda r: summarise(r, now), unreadable_summary)
    summary.problems += invalid_thresholds(THRESHOLD_COLUMNS, [m[name] for name in THRESHOLD_COLUMNS])
    declared = {name: float_value(m[f"declared_{name}"]) for name in ("heartbeat_interval", "stale_after", "stall_after", "max_age")}
    return AuditDetail(
        summary=summary, progress=m["progress"], recovery_info=m["recovery_info"],
        last_worker_update=as_datetime(m["last_worker_update"]), max_age_seconds=float_value(m["max_age_seconds"]),
        worker_instance=text_value(m["worker_instance"]), has_lease=m["lease"] is not None,
        history=events_for(engine, audit_id), declared={k: v for k, v in declared.items() if v is not None},
    )


__all__ = ["AuditFilters", "AuditSummary", "AuditDetail", "SORTS", "list_audits", "iter_audits", "get_audit"]
