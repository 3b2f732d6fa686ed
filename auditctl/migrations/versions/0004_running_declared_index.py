"""An index of the heartbeat intervals running audits declare.

Every command that judges audits first checks that its stale threshold is at least twice the
heartbeat interval the running audits declare (``Policy.check_bounds``). That read walked every
running audit: 20 ms at 30,000 of them, before every scan, recovery and dashboard refresh. With
this index only the intervals long enough to fail a threshold in force are read, one seek
(see ``auditctl.rules.check_against_running``); it also covers the whole grouping ``learn``
reads.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    running = sa.text("status = 'running'")
    op.create_index("ix_audits_running_declared", "audits", ["declared_heartbeat_interval", "kind", "declared_stale_after"],
                    sqlite_where=running, postgresql_where=running)


def downgrade() -> None:
    op.drop_index("ix_audits_running_declared", table_name="audits")
