"""Alembic environment: always handed a live connection by ``auditctl.migrate``."""

from alembic import context

from auditctl.schema import metadata

connection = context.config.attributes["connection"]
# Alembic's own table kept where auditctl's are (``migrate._schema``): left to itself Alembic would
# take an ``alembic_version`` anywhere on a PostgreSQL search path for auditctl's.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  version_table_schema=context.config.attributes.get("version_table_schema"))
with context.begin_transaction():
    context.run_migrations()
