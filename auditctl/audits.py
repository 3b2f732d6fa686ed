"""Reading audits for people: listings, one audit in full, running audits with their ages.

Everything here is read-only and returns plain dataclasses; the CLI renders them.
Malformed progress documents are read with ``progress.read_progress`` and flagged,
never trusted and never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from .db import read_connection, seconds_since
from .errors import AuditNotFound
from .history import Event, events_for
from .progress import read_progress
from .schema import IS_RUNNING, RUNNING, audits


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


def _columns():
    return (
        audits,
        seconds_since(audits.c.heartbeat_at).label("heartbeat_age"),
        # Per column: a start time another tool left unreadable gives way to the creation time.
        func.coalesce(seconds_since(audits.c.started_at), seconds_since(audits.c.created_at)).label("age"),
    )


def _summary(row) -> AuditSummary:
    m = row._mapping
    view = read_progress(m["progress"])
    running = m["status"] == RUNNING
    return AuditSummary(
        id=m["id"], target=m["target"], status=m["status"], worker_id=m["worker_id"], step=view.step,
        percentage=view.percentage, attempts=m["attempts"] or 0, created_at=m["created_at"], started_at=m["started_at"],
        finished_at=m["finished_at"], last_heartbeat=m["heartbeat_at"],
        heartbeat_age_seconds=None if m["heartbeat_age"] is None or not running else round(float(m["heartbeat_age"]), 3),
        age_seconds=None if m["age"] is None or not running else round(float(m["age"]), 3),
        error=m["error"], problems=view.problems,
    )


def list_audits(engine: Engine, *, status: str | None = None, worker: str | None = None, limit: int | None = 50) -> list[AuditSummary]:
    """Audits, newest first."""
    return list(iter_audits(engine, status=status, worker=worker, limit=limit))


def iter_audits(engine: Engine, *, status: str | None = None, worker: str | None = None, limit: int | None = 50) -> Iterator[AuditSummary]:
    query = select(*_columns()).order_by(audits.c.id.desc())
    if status == RUNNING:
        query = query.where(IS_RUNNING)
    elif status is not None:
        query = query.where(audits.c.status == status)
    if worker is not None:
        query = query.where(audits.c.worker_id == worker)
    if limit is not None:
        query = query.limit(limit)
    with read_connection(engine) as connection:
        for row in connection.execution_options(stream_results=True, yield_per=1000).execute(query):
            yield _summary(row)


def get_audit(engine: Engine, audit_id: int) -> AuditDetail:
    with read_connection(engine) as connection:
        row = connection.execute(select(*_columns()).where(audits.c.id == audit_id)).first()
    if row is None:
        raise AuditNotFound(f"no audit with id {audit_id}")
    m = row._mapping
    return AuditDetail(
        summary=_summary(row), progress=m["progress"], recovery_info=m["recovery_info"],
        last_worker_update=m["last_worker_update"], max_age_seconds=m["max_age_seconds"],
        worker_instance=m["worker_instance"], has_lease=m["lease"] is not None, history=events_for(engine, audit_id),
    )
