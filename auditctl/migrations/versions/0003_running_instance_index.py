"""An index of the worker instances holding running audits.

The stuck query's ``worker_gone`` rule compares each running audit's instance with the
instances the registry proves gone: a lookup per running audit, whether or not any gone
instance holds one. With this index, the few gone instances that do hold a running audit
are found first, in one probe each, and the rule is left out of the statement when there
are none (see ``auditctl.rules.GoneInstances.held``).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    running = sa.text("status = 'running'")
    op.create_index("ix_audits_running_instance", "audits", ["worker_instance"], sqlite_where=running,
                    postgresql_where=running)


def downgrade() -> None:
    op.drop_index("ix_audits_running_instance", table_name="audits")
