"""Tables, indexes and the two column types that make SQLite and PostgreSQL agree.

What the rules query lives in real, indexed columns (status, heartbeat time, the time
progress last changed, worker, lease); the progress document is kept as JSON for
people and tools. The history table has no foreign key on purpose: an audit row
deleted by another tool must not take its history with it.

Migrations (``auditctl/migrations``) create these tables; this module is what the code
queries and what a test compares the migrations against.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    literal_column,
    text,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    types,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP

from .progress import NotJSON

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED)


def parse_timestamp(value) -> datetime | None:
    """Any stored time (aware, naive, ISO text with T/Z/offset) as aware UTC; None if unreadable."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        # Naive times written by other tools are taken as UTC, the only zone auditctl writes.
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class Timestamp(types.TypeDecorator):
    """timestamptz on PostgreSQL; sortable UTC text on SQLite, read back leniently."""

    impl = types.String
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(TIMESTAMP(timezone=True))
        return dialect.type_descriptor(types.String(40))

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(timezone.utc).replace(tzinfo=None)
            return value.isoformat(" ", "microseconds")
        return value

    def process_result_value(self, value, dialect):
        return parse_timestamp(value)


def _reject_constant(name):
    # NaN and Infinity are not JSON; a document holding them is read back as text, like broken JSON.
    raise ValueError(f"{name} is not JSON")


class Document(types.TypeDecorator):
    """JSONB on PostgreSQL; JSON text on SQLite. Reading never fails: bad JSON comes back as text."""

    impl = types.Text
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(types.Text())

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        return json.dumps(value, allow_nan=False)

    def process_result_value(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        if isinstance(value, (bytes, bytearray)):
            # SQLite lets another tool store a BLOB here; as text it can be shown and copied.
            return NotJSON(bytes(value).decode("utf-8", "replace"))
        try:
            return json.loads(value, parse_constant=_reject_constant)
        except (TypeError, ValueError):
            return NotJSON(value)


Id = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()

audits = Table(
    "audits",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("target", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("progress", Document),
    Column("last_worker_update", Timestamp),
    Column("recovery_info", Document),
    Column("error", Text),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_age_seconds", Float),
    Column("worker_id", String(200)),
    Column("worker_instance", String(64)),
    Column("lease", String(64)),
    Column("heartbeat_at", Timestamp),
    Column("progress_changed_at", Timestamp),
    Column("progress_signature", Text),
    Column("recovery_reasons", Text),
    Index("ix_audits_status_heartbeat", "status", "heartbeat_at"),
    Index("ix_audits_worker_status", "worker_id", "status"),
    Index("ix_audits_status_finished", "status", "finished_at"),
    # The running set is small and every monitor pass reads it: a partial index keeps that
    # read proportional to the running audits however many finished ones pile up.
    Index("ix_audits_running", "id", sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),
)

#: ``status = 'running'`` with the literal in the SQL, so both engines can match the partial index
#: (SQLite cannot use a partial index against a bound parameter).
IS_RUNNING = audits.c.status == literal_column("'running'")

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("audit_id", Id, nullable=False),
    Column("at", Timestamp, nullable=False),
    Column("event", String(32), nullable=False),
    Column("from_status", String(32)),
    Column("to_status", String(32)),
    Column("reasons", Text),
    Column("measurements", Document),
    Column("actor", String(200), nullable=False),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("details", Document),
    Index("ix_audit_events_audit", "audit_id", "id"),
    Index("ix_audit_events_at", "at"),
)

workers = Table(
    "workers",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("worker_id", String(200), nullable=False),
    Column("worker_url", Text),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("process_key", String(200)),
    Column("started_at", Timestamp, nullable=False),
    Column("last_heartbeat_at", Timestamp),
    Column("stopped_at", Timestamp),
    Index("ix_workers_worker_id", "worker_id"),
)
