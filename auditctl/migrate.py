"""Schema creation, upgrades and checks: one idempotent call over the shipped Alembic migrations.

Several workers may boot at once against a fresh database. On PostgreSQL an advisory
lock makes them take turns; on SQLite the migration runs inside ``BEGIN IMMEDIATE``,
which does the same. The second one finds the schema current and does nothing.

Before touching anything, ``upgrade`` checks that the database is auditctl's: tables
named like ours without auditctl's revision table belong to another application, and a
revision this version does not know means a newer auditctl migrated it. Both are
refused with advice that works, never with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from sqlalchemy import column, inspect, select, table, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from .dberrors import describe, translate_errors
from .errors import (AuditctlError, DatabaseRefused, NotOurDatabase, RevisionUnclear, SchemaMissing, SchemaTooNew,
                     WriteRefused)
from .schema import DISTINCTIVE_AUDIT_COLUMNS, DISTINCTIVE_ENOUGH
from .sqlfunctions import is_postgres
from .textsafe import printable
from .transactions import write_transaction

#: Arbitrary but fixed: the advisory lock key auditctl's migrations take on PostgreSQL.
_MIGRATION_LOCK_KEY = 0x6175646974
_OUR_TABLES = ("audits", "audit_events", "workers", "notifications", "notification_deliveries")


@dataclass
class UpgradeResult:
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _alembic_config(connection, schema: str | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "auditctl:migrations")
    config.attributes["connection"] = connection
    config.attributes["version_table_schema"] = schema  # see migrations/env.py
    return config


def known_revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    return [script.revision for script in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()]


def _shipped_revisions() -> frozenset[str]:
    """The revisions this auditctl ships, read from its migration files' names (``0003_...py``, or
    ``.pyc`` in an install that ships only those): what ``known_revisions`` reads through Alembic,
    without Alembic's import (a third of a second)."""
    from pathlib import Path

    return frozenset(path.name.split("_", 1)[0] for path in (Path(__file__).parent / "migrations" / "versions")
                     .glob("[0-9]*_*.py*"))


def refuse_newer_schema(engine: Engine) -> None:
    """Before a change: a schema at a revision this auditctl does not know was migrated by a newer
    one, whose rules for its tables this one cannot know; ``SchemaTooNew`` (``init`` says the same).
    A database with no revision table, or one this role may not read, is left to the change itself,
    whose own error says what is wrong; so is any reading that fails (an outage)."""
    from .transactions import read_connection

    shipped = _shipped_revisions()
    if not shipped:  # an install without its migration files: nothing to compare with
        return
    try:
        with read_connection(engine) as connection:
            schema = _schema(connection)
            if not inspect(connection).has_table("alembic_version", schema=schema):
                return
            revisions = _recorded_revisions(connection, schema)
    except AuditctlError:
        return
    if len(revisions) > 1:
        raise _unclear(engine, revisions)
    revision = revisions[0] if revisions else None
    if revision is not None and revision not in shipped:
        raise _unknown(describe(engine), revision, max(shipped))


def _unknown(where: str, revision, head: str) -> SchemaMissing:
    """A recorded revision this auditctl does not know: a newer auditctl's (four digits, as auditctl's
    are, past ``head``), or text no auditctl writes (a hand edit: "garbage", "0004 " with a space)."""
    if isinstance(revision, str) and len(revision) == len(head) and revision.isascii() and revision.isdigit() \
            and revision > head:
        return SchemaTooNew(f"the database at {where} is at schema revision {revision}, which this auditctl does not "
                            f"know (it knows up to {head}): a newer auditctl migrated it; upgrade auditctl; nothing was "
                            "changed")
    return RevisionUnclear(f"the database at {where} records schema revision '{printable(str(revision))[:40]}', which is "
                           f"no auditctl revision (auditctl's are {len(head)} digits; this one knows up to {head}): "
                           "alembic_version was edited by hand or by another tool; set it to the revision its tables "
                           "are at, or restore the database from a backup; nothing was changed")


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


@contextlib.contextmanager
def _quiet_alembic():
    """Alembic tells INFO about every step; a worker's log should hold its own events only."""
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


#: Columns of ``audits`` that every auditctl revision has and another application's ``audits`` would not:
#: a table with none (or one) of them is not auditctl's, whatever revision the database records. Two
#: suffice, so auditctl's own database an operator damaged (a column dropped) is still its own.
_OUR_AUDIT_COLUMNS = set(DISTINCTIVE_AUDIT_COLUMNS)


def _schema(connection) -> str | None:
    """The schema auditctl's tables are in, or would be created in: on PostgreSQL ``current_schema()``, the
    first schema of the search path that exists. Not every schema on the path: with
    ``search_path=auditctl,public`` another application's tables in ``public`` are none of auditctl's
    business (its unqualified queries find its own tables first). None on SQLite, and on a PostgreSQL
    search path that names no existing schema (there is nowhere to create a table in then)."""
    if not is_postgres(connection):
        return None
    return connection.execute(text("SELECT current_schema()")).scalar()


#: How many of the rows of an ``alembic_version`` holding several are named in the error.
_SHOWN_REVISIONS = 5


def _recorded_revisions(connection, schema: str | None) -> list:
    """The rows of ``alembic_version`` (auditctl's migrations keep exactly one), at most a few more than shown."""
    version = table("alembic_version", column("version_num"), schema=schema)
    return list(connection.execute(select(version.c.version_num).order_by(version.c.version_num)
                                   .limit(_SHOWN_REVISIONS + 1)).scalars())


def _unclear(engine_or_connection, revisions: list) -> RevisionUnclear:
    engine = getattr(engine_or_connection, "engine", engine_or_connection)
    shown = ", ".join(printable(str(r))[:40] for r in revisions[:_SHOWN_REVISIONS])
    count = f"{len(revisions)}" if len(revisions) <= _SHOWN_REVISIONS else f"more than {_SHOWN_REVISIONS}"
    return RevisionUnclear(f"the database at {describe(engine)} cannot be migrated or changed: its alembic_version holds "
                           f"{count} rows ({shown}) where auditctl's migrations keep one, so which revision its tables "
                           "are at is unknown (a hand edit or another tool wrote there); restore the database from a "
                           "backup, or delete the rows that are not its tables' revision; nothing was changed")


def _recorded_revision(connection, schema: str | None) -> str | None:
    """The one revision ``alembic_version`` records (None: no row); ``RevisionUnclear`` when it holds several."""
    revisions = _recorded_revisions(connection, schema)
    if len(revisions) > 1:
        raise _unclear(connection, revisions)
    return revisions[0] if revisions else None


def _state(connection, schema: str | None) -> tuple[str | None, set[str], bool]:
    """(recorded revision or None, which of auditctl's table names exist, whether its ``audits`` table
    is auditctl's as far as the columns every revision has can tell), all in ``schema`` (``_schema``).
    ``RevisionUnclear`` when auditctl's tables are there under several recorded revisions; another
    application's ``alembic_version`` may hold several (its branches), and is named by its first."""
    inspector = inspect(connection)
    names = set(inspector.get_table_names(schema=schema))
    revisions = _recorded_revisions(connection, schema) if "alembic_version" in names else []
    ours = "audits" in names and \
        len(_OUR_AUDIT_COLUMNS & {c["name"] for c in inspector.get_columns("audits", schema=schema)}) >= DISTINCTIVE_ENOUGH
    if len(revisions) > 1 and ours:
        raise _unclear(connection, revisions)
    return (revisions[0] if revisions else None), names & set(_OUR_TABLES), ours


def _refuse_foreign(engine_or_connection, revision: str | None, present: set[str], where: str, ours: bool = True,
                    schema: str | None = None) -> None:
    advice = ("give auditctl its own database, or its own schema (CREATE SCHEMA auditctl, then "
              "?options=-csearch_path%3Dauditctl in the URL)") if is_postgres(engine_or_connection) \
        else "point --database-url at a file of auditctl's own"
    if revision is not None and "audits" in present and not ours:
        # An Alembic revision and tables named like auditctl's, but not auditctl's tables: migrating
        # them would change another application's database.
        raise NotOurDatabase(f"the database at {where} records an Alembic revision ({printable(str(revision))[:40]}) "
                             f"and has tables named like auditctl's that auditctl did not create; {advice}")
    if revision is None and present and ours:
        raise _unrecorded(engine_or_connection, schema, present, where)
    if revision is None and present:
        tables = ", ".join(sorted(present))
        raise NotOurDatabase(f"the database at {where} has tables named like auditctl's ({tables}) that auditctl did not "
                             f"create; {advice}")
    if revision is not None and "audits" not in present:
        # Every auditctl revision has the audits table: this alembic_version is another application's.
        raise NotOurDatabase(f"the database at {where} records another application's Alembic revision "
                             f"({printable(str(revision))[:40]}) and has no auditctl tables; {advice}")
    if revision is not None and revision not in known_revisions():
        raise _unknown(where, revision, head_revision())


#: The triggers revision 0002 makes on SQLite, which ``schema.metadata`` (and a schema made from it) lacks.
_SQLITE_TRIGGERS = ("audits_odd_times_insert", "audits_odd_times_update")


def _unrecorded(connection, schema: str | None, present: set[str], where: str) -> RevisionUnclear:
    """auditctl's own tables with no revision recorded (``alembic_version`` missing or empty: made by hand
    from ``schema.py``, or the record deleted): which migrations they need cannot be told. When they
    hold every part of the newest revision, how to record it; else, a backup."""
    tables = ", ".join(sorted(present))
    said = (f"the database at {where} holds auditctl's tables ({tables}) but no record of their schema revision "
            "(no row in alembic_version, or no such table: they were made by hand, or the record was deleted), so "
            "init cannot tell which migrations they need")
    complete = not _missing_parts(connection, schema)
    if complete and not is_postgres(connection):
        triggers = set(connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())
        complete = set(_SQLITE_TRIGGERS) <= triggers
    if not complete:
        return RevisionUnclear(f"{said}; restore the database from a backup; nothing was changed")
    name = f"{_quoted(connection, schema)}.alembic_version" if schema is not None else "alembic_version"
    steps = [] if inspect(connection).has_table("alembic_version", schema=schema) else \
        [f"CREATE TABLE {name} (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"]
    steps.append(f"INSERT INTO {name} (version_num) VALUES ('{head_revision()}')")
    return RevisionUnclear(f"{said}; they hold every table and column of revision {head_revision()}: if they were "
                           f"made from this auditctl's schema, record it with: {'; '.join(steps)}, then run init "
                           "again; else restore the database from a backup; nothing was changed")


def _ours_later_on_the_path(connection, schema: str | None) -> str | None:
    """PostgreSQL: the schema later on the search path that holds auditctl's own tables, when
    ``schema`` (the first) holds none of them; else None."""
    if schema is None:
        return None
    for other in connection.execute(text("SELECT unnest(current_schemas(false))")).scalars():
        if other != schema:
            _revision, present, ours = _state(connection, other)
            if "audits" in present and ours:
                return other
    return None


def diagnose(engine: Engine) -> SchemaMissing:
    """Why a query found no schema, in words that say what to do (run after a SchemaMissing)."""
    where = describe(engine)
    try:
        with translate_errors(engine), engine.connect() as connection:
            connection = connection.execution_options(auditctl_read_only=True)
            schema = _schema(connection)
            revision, present, ours = _state(connection, schema)
            _refuse_foreign(connection, revision, present, where, ours, schema)
    except SchemaMissing as error:
        return error
    except Exception:  # noqa: BLE001 - the diagnosis is a courtesy; the original error stands
        return SchemaMissing(f"the database at {where} has no auditctl schema, or an older one; run `auditctl init`")
    if revision is not None and revision != head_revision():
        return SchemaMissing(f"the database at {where} has an older auditctl schema (revision {revision}); "
                             "run `auditctl init` to upgrade it")
    if revision is not None and (damaged := _damage(engine, revision)) is not None:
        return damaged
    return SchemaMissing(f"the database at {where} has no auditctl schema; run `auditctl init`")


def _damage(engine: Engine, revision: str, schema: str | None = None) -> SchemaMissing | None:
    """The error for a schema at ``revision`` that lacks tables or columns of it (dropped by hand), else
    None. One query that reads no row answers for a whole schema; only a damaged one is inspected,
    to say what is missing (inspecting every table doubled a worker's start on SQLite)."""
    from sqlalchemy import func, union_all

    from .schema import metadata

    probe = union_all(*(select(func.count()).select_from(select(*t.c).limit(0).subquery())
                        for t in metadata.tables.values()))
    with translate_errors(engine), engine.connect() as connection:
        connection = connection.execution_options(auditctl_read_only=True)
        if schema is not None and is_postgres(connection):
            # For this transaction only: the tables init upgraded may be later on the search path.
            connection.execute(text("SELECT set_config('search_path', :path, true)"), {"path": _quoted(connection, schema)})
        try:
            connection.execute(probe).all()
            return None
        except DBAPIError:
            connection.rollback()
        missing = _missing_parts(connection, schema if schema is not None else _schema(connection))
    if not missing:
        return None
    return SchemaMissing(f"the database at {describe(engine)} is at auditctl's schema revision {revision}, but "
                         f"{missing} missing (dropped by hand?); `auditctl init` does not repair a schema: "
                         "restore the database from a backup")


def _quoted(connection, schema: str) -> str:
    return connection.dialect.identifier_preparer.quote(schema)


def _missing_parts(connection, schema: str | None) -> str:
    """The tables and columns of auditctl's schema that ``schema`` lacks, in words ("" when none)."""
    from .schema import metadata

    inspector = inspect(connection)
    present = set(inspector.get_table_names(schema=schema))
    missing = []
    for name, expected in metadata.tables.items():
        if name not in present:
            missing.append(f"table {name}")
            continue
        columns = {c["name"] for c in inspector.get_columns(name, schema=schema)}
        missing += [f"column {name}.{c.name}" for c in expected.columns if c.name not in columns]
    if not missing:
        return ""
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{shown} {'is' if len(missing) == 1 else 'are'}"


def explained(error: BaseException, engine: Engine) -> BaseException:
    """A missing schema said precisely (``diagnose``): no schema, an old one, or another application's
    tables, where "run `auditctl init`" would be wrong advice. Any other error as it is. For every
    face that reports a SchemaMissing: the CLI, the dashboard, the worker library."""
    if not isinstance(error, SchemaMissing) or isinstance(error, (NotOurDatabase, SchemaTooNew, RevisionUnclear)):
        return error
    try:
        return diagnose(engine)
    except AuditctlError:
        return error


#: PostgreSQL's duplicate_table, duplicate_column and duplicate_object: what a migration meets on
#: tables already past the revision recorded.
_ALREADY_THERE_STATES = frozenset({"42P07", "42701", "42710"})


def _already_there(error: DBAPIError) -> bool:
    """Whether a migration step failed on a table, column, index or trigger that already exists."""
    state = getattr(error.orig, "sqlstate", None)
    if state is not None:
        return state in _ALREADY_THERE_STATES
    message = str(error.orig)
    return "already exists" in message or "duplicate column name" in message


def _first_line(error: DBAPIError) -> str:
    lines = str(error.orig).strip().splitlines()
    return printable(lines[0] if lines else type(error.orig).__name__)[:200]


def upgrade(engine: Engine) -> UpgradeResult:
    """Create or upgrade the schema to the newest revision. Safe to call any number of times."""
    from alembic import command
    from alembic.migration import MigrationContext

    where = describe(engine)
    try:
        with _quiet_alembic(), write_transaction(engine) as connection:
            if is_postgres(connection):
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            # Read under the lock: a process that waited for another's migration reports "no change".
            schema = _schema(connection)
            if schema is None and is_postgres(connection):
                search_path = connection.execute(text("SHOW search_path")).scalar()
                raise DatabaseRefused(f"cannot create the schema of the database at {where}: none of the schemas on its "
                                      f"search_path ({printable(str(search_path))[:80]}) exists, so there is nowhere to "
                                      "create auditctl's tables; CREATE SCHEMA one of them, or set another search_path; "
                                      "nothing was changed")
            revision, present, ours = _state(connection, schema)
            if not present and (found := _ours_later_on_the_path(connection, schema)) is not None:
                # auditctl's tables are in a schema later on the search path (a schema named like the
                # role was made after they went into public): upgrade them where they are, never make
                # new empty ones first on the path, which every read would then find instead.
                schema = found
                connection.execute(text(f"SET LOCAL search_path TO {_quoted(connection, schema)}"))
                revision, present, ours = _state(connection, schema)
            _refuse_foreign(connection, revision, present, where, ours, schema)
            before = MigrationContext.configure(connection, opts={"version_table_schema": schema}).get_current_revision()
            try:
                command.upgrade(_alembic_config(connection, schema), "head")
            except DBAPIError as error:
                if not _already_there(error):
                    raise
                raise DatabaseRefused(
                    f"cannot upgrade the schema of the database at {where} from revision {printable(str(before))[:40]}: "
                    f"{_first_line(error)}: the tables already hold what the migration adds (alembic_version set back "
                    "by hand or restored apart from the tables, or an index made by hand?); set alembic_version to "
                    "the revision the tables are at, drop what was made by hand, or restore the database from a "
                    "backup; nothing was changed") from None
            after = _recorded_revision(connection, schema)  # in the schema upgraded, which may be later on the path
    except WriteRefused as error:
        # A role that may only read, or a standby: the migration is one transaction, rolled back whole.
        raise WriteRefused(f"{error}; nothing was changed") from error
    except SchemaMissing as error:
        if isinstance(error, (NotOurDatabase, SchemaTooNew, RevisionUnclear)) or not hasattr(error, "detail"):
            raise
        # A table or column the migration expected is not there: "run `auditctl init`" is what failed.
        raise DatabaseRefused(f"cannot create or upgrade the schema of the database at {where}: {error.detail}; "
                              "nothing was changed") from None
    # Already at head: a part dropped by hand would otherwise pass as "nothing to do" here, and fail
    # later, in whichever command or worker write first needs it. Looked for after the commit: the
    # write lock (or the migration lock) is not held meanwhile.
    if before == after and after is not None and (damaged := _damage(engine, after, schema)) is not None:
        raise damaged
    return UpgradeResult(before=before, after=after)
