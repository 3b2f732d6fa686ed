"""The initial schema: audits, their history, and worker instances.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from auditctl.schema import Document, Id, Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audits",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("progress", Document),
        sa.Column("last_worker_update", Timestamp),
        sa.Column("recovery_info", Document),
        sa.Column("error", sa.Text),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("started_at", Timestamp),
        sa.Column("finished_at", Timestamp),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_age_seconds", sa.Float),
        sa.Column("worker_id", sa.String(200)),
        sa.Column("worker_instance", sa.String(64)),
        sa.Column("lease", sa.String(64)),
        sa.Column("heartbeat_at", Timestamp),
        sa.Column("progress_changed_at", Timestamp),
        sa.Column("progress_signature", sa.Text),
        sa.Column("recovery_reasons", sa.Text),
    )
    op.create_index("ix_audits_status_heartbeat", "audits", ["status", "heartbeat_at"])
    op.create_index("ix_audits_worker_status", "audits", ["worker_id", "status"])
    op.create_index("ix_audits_status_finished", "audits", ["status", "finished_at"])
    op.create_index("ix_audits_running", "audits", ["id"], sqlite_where=sa.text("status = 'running'"),
                    postgresql_where=sa.text("status = 'running'"))

    op.create_table(
        "audit_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("audit_id", Id, nullable=False),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(32)),
        sa.Column("to_status", sa.String(32)),
        sa.Column("reasons", sa.Text),
        sa.Column("measurements", Document),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("details", Document),
    )
    op.create_index("ix_audit_events_audit", "audit_events", ["audit_id", "id"])
    op.create_index("ix_audit_events_at", "audit_events", ["at"])

    op.create_table(
        "workers",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("worker_url", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("process_key", sa.String(200)),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("last_heartbeat_at", Timestamp),
        sa.Column("stopped_at", Timestamp),
    )
    op.create_index("ix_workers_worker_id", "workers", ["worker_id"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("audit_events")
    op.drop_table("audits")
