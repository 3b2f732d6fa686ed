"""Tables, indexes and the two column types that make SQLite and PostgreSQL agree.

What the rules query lives in real, indexed columns (status, heartbeat time, the time
progress last changed, worker, lease); the progress document is kept as JSON for
people and tools. The history table has no foreign key on purpose: an audit row
deleted by another tool must not take its history with it.

Migrations (``auditctl/migrations``) create these tables; this module is what the code
queries and what a test compares the migrations against.
"""

from __future__ import annotations

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

from . import documents, timestamps

from .statuses import COMPLETED, FAILED, PENDING, RUNNING, STATUSES  # noqa: F401 - re-exported


class Timestamp(types.TypeDecorator):
    """timestamptz on PostgreSQL; canonical UTC text on SQLite (see ``timestamps``).

    Reading never fails: a value that cannot be read comes back as ``timestamps.Unreadable``.
    """

    impl = types.String
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(TIMESTAMP(timezone=True))
        return dialect.type_descriptor(types.String(40))

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value
        return timestamps.to_storage(value)

    def process_result_value(self, value, dialect):
        return timestamps.parse(value)


class Document(types.TypeDecorator):
    """JSONB on PostgreSQL; JSON text on SQLite. Reading never fails (see ``documents.load``)."""

    impl = types.Text
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(types.Text())

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "postgresql":
            return value  # psycopg serialises with documents.dumps_strict (see db.create_engine)
        return documents.dumps_strict(value)

    def process_result_value(self, value, dialect):
        if dialect.name == "postgresql":
            return value  # decoded once, safely, by psycopg's loader (documents.loads_for_driver)
        return documents.load(value)


Id = BigInteger().with_variant(Integer, "sqlite")

#: The longest text auditctl stores in an audit's ``error``: a run's exception, a recovery's explanation.
ERROR_LIMIT = 2000

metadata = MetaData()

#: The condition of the partial indexes of running audits.
_RUNNING = text("status = 'running'")

audits = Table(
    "audits",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("target", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("progress", Document),
    Column("last_worker_update", Timestamp),
    Column("recovery_info", Document),
    Column("error", Text),  # at most ERROR_LIMIT characters
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("attempts", Integer, nullable=False, server_default="0"),
    #: The audit's own deadline, from ``create_audit(max_age=...)``.
    Column("max_age_seconds", Float),
    Column("worker_id", String(200)),
    Column("worker_instance", String(64)),
    Column("lease", String(64)),
    Column("heartbeat_at", Timestamp),
    Column("progress_changed_at", Timestamp),
    Column("progress_signature", Text),
    Column("recovery_reasons", Text),
    #: What kind of audit (``full-scan``, ``quick-scan``): thresholds can be configured per kind.
    Column("kind", String(100)),
    #: The thresholds the worker that claimed it runs under (NULL: it declared none).
    Column("declared_heartbeat_interval", Float),
    Column("declared_stale_after", Float),
    Column("declared_stall_after", Float),
    Column("declared_max_age", Float),
    #: How often an operator has reset this audit (reset-all's per-audit limit).
    Column("resets", Integer, nullable=False, server_default="0"),
    #: The longest silence between two writes and the longest time without progress of the
    #: current or last run, kept by the worker's own writes (what threshold suggestions learn from).
    Column("longest_gap_seconds", Float),
    Column("longest_stall_seconds", Float),
    #: SQLite only, kept by triggers: 1 when a time column holds text not in the canonical
    #: form (another tool wrote it), so the stuck query reads those rows through ``auditctl_utc``.
    Column("odd_times", Integer, nullable=False, server_default="0"),
    Index("ix_audits_status_heartbeat", "status", "heartbeat_at"),
    Index("ix_audits_worker_status", "worker_id", "status"),
    Index("ix_audits_status_finished", "status", "finished_at"),
    # The running set is small and every monitor pass reads it: a partial index keeps that
    # read proportional to the running audits however many finished ones pile up.
    Index("ix_audits_running", "id", sqlite_where=_RUNNING, postgresql_where=_RUNNING),
    # Which instances hold running audits: the few gone instances that do are found in one probe
    # each, instead of every running audit being looked up among the gone (``rules.GoneInstances.held``).
    Index("ix_audits_running_instance", "worker_instance", sqlite_where=_RUNNING, postgresql_where=_RUNNING),
    # The heartbeat intervals running audits declare, which every judging command checks its stale
    # threshold against: only the few long enough to matter are read (``rules.check_against_running``).
    Index("ix_audits_running_declared", "declared_heartbeat_interval", "kind", "declared_stale_after",
          sqlite_where=_RUNNING, postgresql_where=_RUNNING),
)

#: The time columns the stuck rules read (the SQLite triggers watch these for odd text).
#: Columns of ``audits`` no other application's table of that name is likely to have: two of them
#: make a table auditctl's (an application of its own may well have an ``audits`` table).
DISTINCTIVE_AUDIT_COLUMNS = ("lease", "worker_instance", "progress_signature", "recovery_reasons", "progress_changed_at")
DISTINCTIVE_ENOUGH = 2
RULE_TIME_COLUMNS = ("heartbeat_at", "last_worker_update", "started_at", "created_at", "progress_changed_at")

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
    #: What the instance declared: how often it beats, and after how much silence it counts as gone.
    Column("heartbeat_interval", Float),
    Column("stale_after", Float),
    Index("ix_workers_worker_id", "worker_id"),
)

#: The outbox: one row per event to announce, written in the same transaction as the change.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("created_at", Timestamp, nullable=False),
    Column("event", String(32), nullable=False),
    Column("payload", Document, nullable=False),
    #: Makes an event that several processes may notice (the fleet back to healthy) be written once.
    Column("dedupe_key", String(200)),
    Column("expires_at", Timestamp, nullable=False),
    Index("ix_notifications_created", "created_at"),
    # The sender looks for unexpired events on every delivery: this keeps that read to the live ones.
    Index("ix_notifications_expires", "expires_at"),
    Index("ux_notifications_dedupe_key", "dedupe_key", unique=True),
)

#: Delivery of each event to each destination (a webhook, named by a hash of its URL).
notification_deliveries = Table(
    "notification_deliveries",
    metadata,
    Column("notification_id", Id, primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("status", String(16), nullable=False),  # pending, sending, sent, expired
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Timestamp),
    Column("claimed_until", Timestamp),
    Column("sent_at", Timestamp),
    Column("last_error", Text),
    #: The destination as people may see it: kind and masked URL (``slack https://hooks.slack.com/***``).
    Column("label", String(200)),
    Index("ix_notification_deliveries_status", "status", "next_attempt_at"),
)
