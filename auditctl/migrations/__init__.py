"""Alembic migrations shipped inside the package; run them with ``auditctl.migrate.upgrade``."""
