"""Schema creation and upgrades: one idempotent call over the shipped Alembic migrations.

Several workers may boot at once against a fresh database. On PostgreSQL an advisory
lock makes them take turns; on SQLite the migration runs inside ``BEGIN IMMEDIATE``,
which does the same. The second one finds the schema current and does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from .db import is_postgres, translate_errors, write_transaction

#: Arbitrary but fixed: the advisory lock key auditctl's migrations take on PostgreSQL.
_MIGRATION_LOCK_KEY = 0x6175646974


@dataclass
class UpgradeResult:
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "auditctl:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None when it has no auditctl schema."""
    with translate_errors(engine), engine.connect() as connection:
        connection = connection.execution_options(auditctl_read_only=True)
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> UpgradeResult:
    """Create or upgrade the schema to the newest revision. Safe to call any number of times."""
    from alembic import command

    from alembic.migration import MigrationContext

    with write_transaction(engine) as connection:
        if is_postgres(connection):
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        # Read under the lock: a process that waited for another's migration reports "no change".
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(_alembic_config(connection), "head")
    return UpgradeResult(before=before, after=current_revision(engine))
