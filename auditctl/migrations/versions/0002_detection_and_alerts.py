"""Thresholds that travel with each audit, audit kinds, reset counts, gap tracking, the
notification outbox, and (SQLite) one canonical stored form for times.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from auditctl.schema import Document, Id, Timestamp
from auditctl.timestamps import CANONICAL_GLOB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TIME_COLUMNS = ("heartbeat_at", "last_worker_update", "started_at", "created_at", "progress_changed_at")


def odd_time(column: str, row: str = "NEW") -> str:
    """SQL (SQLite) that is 1 when a time column holds anything but a valid canonical time."""
    value = f"{row}.{column}"
    # The GLOB checks the shape; date() of the date part with a "+0 days" modifier normalises an
    # impossible date (Feb 30) to another text and gives NULL for month 13, so IS catches both;
    # the hour is checked apart (the GLOB lets 24-29 through). Only the date part goes to date():
    # SQLite keeps milliseconds, and would round a time like 23:59:59.9999 into the next day.
    return (f"({value} IS NOT NULL AND NOT ({value} GLOB '{CANONICAL_GLOB}' AND {value} >= '0001' "
            f"AND date(substr({value}, 1, 10), '+0 days') IS substr({value}, 1, 10) "
            f"AND substr({value}, 12, 2) <= '23'))")


def odd_times(row: str = "NEW") -> str:
    return "(" + " OR ".join(odd_time(column, row) for column in _TIME_COLUMNS) + ")"


def upgrade() -> None:
    for name in ("declared_heartbeat_interval", "declared_stale_after", "declared_stall_after", "declared_max_age",
                 "longest_gap_seconds", "longest_stall_seconds"):
        op.add_column("audits", sa.Column(name, sa.Float))
    op.add_column("audits", sa.Column("kind", sa.String(100)))
    op.add_column("audits", sa.Column("resets", sa.Integer, nullable=False, server_default="0"))
    op.add_column("audits", sa.Column("odd_times", sa.Integer, nullable=False, server_default="0"))
    op.add_column("workers", sa.Column("heartbeat_interval", sa.Float))
    op.add_column("workers", sa.Column("stale_after", sa.Float))

    op.create_table(
        "notifications",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", Document, nullable=False),
        sa.Column("dedupe_key", sa.String(200)),
        sa.Column("expires_at", Timestamp, nullable=False),
    )
    op.create_index("ix_notifications_created", "notifications", ["created_at"])
    op.create_index("ix_notifications_expires", "notifications", ["expires_at"])
    op.create_index("ux_notifications_dedupe_key", "notifications", ["dedupe_key"], unique=True)
    op.create_table(
        "notification_deliveries",
        sa.Column("notification_id", Id, primary_key=True),
        sa.Column("destination", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", Timestamp),
        sa.Column("claimed_until", Timestamp),
        sa.Column("sent_at", Timestamp),
        sa.Column("last_error", sa.Text),
        sa.Column("label", sa.String(200)),
    )
    op.create_index("ix_notification_deliveries_status", "notification_deliveries", ["status", "next_attempt_at"])

    if op.get_bind().dialect.name == "sqlite":
        # Times written by earlier versions (milliseconds) take the canonical microsecond form.
        for column in _TIME_COLUMNS + ("finished_at",):
            op.execute(f"UPDATE audits SET {column} = {column} || '000' WHERE length({column}) = 23 "
                       f"AND {column} || '000' GLOB '{CANONICAL_GLOB}'")
        # Any writer, auditctl or another tool, keeps odd_times true to what the row holds. The
        # check runs once per write, so the stuck query needs one integer test per row, not a
        # parse of every time of every running audit on every pass.
        op.execute(f"UPDATE audits SET odd_times = {odd_times('audits')}")
        op.execute(f"CREATE TRIGGER audits_odd_times_insert AFTER INSERT ON audits WHEN {odd_times()} "
                   "BEGIN UPDATE audits SET odd_times = 1 WHERE id = NEW.id; END")
        watched = ", ".join(_TIME_COLUMNS + ("odd_times",))
        op.execute(f"CREATE TRIGGER audits_odd_times_update AFTER UPDATE OF {watched} ON audits "
                   f"WHEN {odd_times()} IS NOT NEW.odd_times "
                   f"BEGIN UPDATE audits SET odd_times = {odd_times()} WHERE id = NEW.id; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audits_odd_times_update")
        op.execute("DROP TRIGGER IF EXISTS audits_odd_times_insert")
    op.drop_table("notification_deliveries")
    op.drop_table("notifications")
    for name in ("heartbeat_interval", "stale_after"):
        op.drop_column("workers", name)
    for name in ("declared_heartbeat_interval", "declared_stale_after", "declared_stall_after", "declared_max_age",
                 "longest_gap_seconds", "longest_stall_seconds", "kind", "resets", "odd_times"):
        op.drop_column("audits", name)
