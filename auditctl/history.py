"""The history table: who changed which audit from what to what, and why.

Every recovery, requeue, reset and rejected late write (``lease_lost``) adds one row here,
inside the same transaction as the change it describes, so the two can never disagree. A
change the database refused adds a ``needs_operator`` row of its own: there is no change
to go with it. So does a ``lease_lost`` the database refused at the time, which the worker's
guard records later (``recorded_late`` in its details).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection, Engine

from .documents import dumps_strict
from .schema import audit_events
from .timestamps import as_datetime, to_storage
from .transactions import read_connection
from .values import safe_int, text_value

RECOVERED = "recovered"
REQUEUED = "requeued"
RESET = "reset"
LEASE_LOST = "lease_lost"
#: A recovery could not change this audit (the database refused its row): an operator must look.
NEEDS_OPERATOR = "needs_operator"


@dataclass(frozen=True)
class Actor:
    """Who acted: a command (``auditctl recover``) or a worker (``worker worker-1``), on which host and pid."""

    name: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def command(cls, name: str) -> "Actor":
        return cls(name=f"auditctl {name}")

    @classmethod
    def worker(cls, worker_id: str, instance_id: str) -> "Actor":
        return cls(name=f"worker {worker_id} ({instance_id[:8]})")


@dataclass
class Event:
    id: int
    audit_id: int
    at: datetime | None
    event: str
    from_status: str | None
    to_status: str | None
    reasons: list[str]
    measurements: dict | None
    actor: str
    host: str | None
    pid: int | None
    details: dict | None


def record(connection: Connection, rows: list[dict], actor: Actor, now) -> None:
    """Insert history rows (each: audit_id, event, from_status, to_status, reasons, measurements, details)."""
    if not rows:
        return
    if connection.dialect.name == "postgresql":
        if len(rows) > 1:
            _record_as_one_parameter(connection, rows, actor, now)
        else:
            connection.execute(audit_events.insert(), [_row_values(row, actor, now) for row in rows])
        return
    _record_through_driver(connection, rows, actor, now)


def _row_values(row: dict, actor: Actor, now) -> dict:
    return {
        "audit_id": row["audit_id"],
        "at": now,
        "event": row["event"],
        "from_status": row.get("from_status"),
        "to_status": row.get("to_status"),
        "reasons": ",".join(row.get("reasons") or []) or None,
        "measurements": row.get("measurements"),
        "actor": actor.name[:200],
        "host": actor.host[:255],
        "pid": actor.pid,
        "details": row.get("details"),
    }


_COLUMNS = ("audit_id", "at", "event", "from_status", "to_status", "reasons", "measurements", "actor", "host", "pid",
            "details")
_SQLITE_INSERT = f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def _record_through_driver(connection: Connection, rows: list[dict], actor: Actor, now) -> None:
    """SQLite: the rows as tuples through the driver's ``executemany``, each value stored as its
    column type stores it (``Timestamp``: canonical text; ``Document``: strict JSON text). SQLAlchemy's
    processing of eleven parameters a row cost more than the insert itself (a recovery of 500: 13
    against 8 ms)."""
    at = to_storage(now)
    name, host, pid = actor.name[:200], actor.host[:255], actor.pid

    def document(value):
        return None if value is None else dumps_strict(value)

    connection.exec_driver_sql(_SQLITE_INSERT, [
        (row["audit_id"], at, row["event"], row.get("from_status"), row.get("to_status"),
         ",".join(row.get("reasons") or []) or None, document(row.get("measurements")), name, host, pid,
         document(row.get("details")))
        for row in rows
    ])


def _record_as_one_parameter(connection: Connection, rows: list[dict], actor: Actor, now) -> None:
    """PostgreSQL: the rows as one JSON parameter unpacked by ``jsonb_to_recordset``, so every batch
    sends the same short statement (a multi-row VALUES of 500 rows is compiled and parsed anew each
    time, which cost more than the insert itself)."""
    from sqlalchemy import BigInteger, Text, cast, column, func, insert, literal, literal_column
    from sqlalchemy.dialects.postgresql import JSONB

    batch = func.jsonb_to_recordset(cast(bindparam("rows", type_=Text), JSONB)).table_valued(
        column("audit_id", BigInteger), column("event", Text), column("from_status", Text), column("to_status", Text),
        column("reasons", Text), column("measurements", JSONB), column("details", JSONB),
    ).render_derived(name="r", with_types=True)
    source = select(
        batch.c.audit_id, literal(now, audit_events.c.at.type), batch.c.event, batch.c.from_status, batch.c.to_status,
        # A missing document is stored as JSON null, as the row-by-row insert stores it.
        batch.c.reasons, func.coalesce(batch.c.measurements, literal_column("'null'::jsonb")),
        literal(actor.name[:200]), literal(actor.host[:255]), literal(actor.pid, audit_events.c.pid.type),
        func.coalesce(batch.c.details, literal_column("'null'::jsonb")),
    )
    payload = [{"audit_id": row["audit_id"], "event": row["event"], "from_status": row.get("from_status"),
                "to_status": row.get("to_status"), "reasons": ",".join(row.get("reasons") or []) or None,
                "measurements": row.get("measurements"), "details": row.get("details")} for row in rows]
    connection.execute(insert(audit_events).from_select(list(_COLUMNS), source), {"rows": dumps_strict(payload)})


def record_from_rows(connection: Connection, condition, *, event: str, from_status, to_status, reasons, details,
                     actor: Actor, now) -> int:
    """One history row per audit matching ``condition``, in one INSERT ... SELECT: the database builds
    each row from the audit itself (``reasons`` and ``details`` are SQL expressions over ``audits``)."""
    from sqlalchemy import insert, literal

    from .schema import audits

    columns = ("audit_id", "at", "event", "from_status", "to_status", "reasons", "actor", "host", "pid", "details")
    source = select(
        audits.c.id,
        literal(now, audit_events.c.at.type),
        literal(event),
        literal(from_status, audit_events.c.from_status.type),
        literal(to_status, audit_events.c.to_status.type),
        reasons,
        literal(actor.name[:200]),
        literal(actor.host[:255]),
        literal(actor.pid),
        details,
    ).where(condition)
    return connection.execute(insert(audit_events).from_select(list(columns), source)).rowcount


def _event(row) -> Event:
    """One history row, read whatever another tool stored in it."""
    m = row._mapping
    reasons = text_value(m["reasons"]) or ""
    return Event(
        id=safe_int(m["id"]) or 0,
        audit_id=safe_int(m["audit_id"]) or 0,
        at=as_datetime(m["at"]),
        event=text_value(m["event"]) or "?",
        from_status=text_value(m["from_status"]),
        to_status=text_value(m["to_status"]),
        reasons=[r for r in reasons.split(",") if r],
        measurements=m["measurements"] if isinstance(m["measurements"], dict) else None,
        actor=text_value(m["actor"]) or "?",
        host=text_value(m["host"]),
        pid=safe_int(m["pid"]),
        details=m["details"] if isinstance(m["details"], dict) else None,
    )


def events_for(engine: Engine, audit_id: int) -> list[Event]:
    """The whole history of one audit, oldest first."""
    with read_connection(engine) as connection:
        query = select(audit_events).where(audit_events.c.audit_id == audit_id).order_by(audit_events.c.id)
        return [_event(row) for row in connection.execute(query)]
