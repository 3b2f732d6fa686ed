"""The SQL auditctl writes differently per engine: the database clock, ages, stored times read
as the rules read them, lists of ids, and index hints.

The database's clock is the only clock. Worker and monitor hosts may disagree by minutes; the
database is the one thing every party already agrees on.
"""

from __future__ import annotations

from sqlalchemy import types
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from . import timestamps
from .schema import RULE_TIME_COLUMNS


def is_postgres(bind) -> bool:
    return bind.dialect.name == "postgresql"


def indexed_by(postgres: bool, index: str) -> str:
    """SQLite: `` INDEXED BY index``, for a hand-written read whose plan must not follow the file's
    statistics, or their absence (nothing runs ANALYZE on a user's file, and either way SQLite
    has picked a plan many times slower for auditctl's reads). PostgreSQL: nothing; its
    autovacuum keeps the statistics its planner needs."""
    return "" if postgres else f" INDEXED BY {index}"


def index_present(connection: Connection, name: str) -> bool:
    """SQLite: whether the file has index ``name`` (one a later migration added is missing from a file
    not upgraded yet, and ``INDEXED BY`` a missing index is an error). PostgreSQL: True, as its
    planner plans around a missing index itself."""
    if connection.dialect.name != "sqlite":
        return True
    return connection.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)).first() is not None


# --- the database clock ---------------------------------------------------------------


class db_now(FunctionElement):
    """The database's current time (UTC), as a timestamp comparable with stored ones."""

    type = types.DateTime(timezone=True)
    inherit_cache = True


@compiles(db_now, "sqlite")
def _db_now_sqlite(element, compiler, **kw):
    # SQLite's clock has millisecond resolution; the padding keeps the canonical stored form.
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


@compiles(db_now, "postgresql")
def _db_now_pg(element, compiler, **kw):
    return "statement_timestamp()"


#: The stored times Python can hold, on PostgreSQL (which also stores BC times, year 10000 and
#: ±infinity): any other reads as unreadable, as SQLite reads a time it cannot parse.
PG_EARLIEST = "'0001-01-01 00:00:00+00'"
PG_LATEST = "'9999-12-31 23:59:59.999999+00'"


def pg_seconds_since(value: str) -> str:
    """PostgreSQL: seconds from a readable stored time to now, as a float; NULL for any other."""
    return (f"(CASE WHEN {value} BETWEEN {PG_EARLIEST} AND {PG_LATEST} "
            f"THEN date_part('epoch', statement_timestamp() - {value}) END)")


class seconds_since(FunctionElement):
    """``now - moment`` in seconds (float), computed by the database; NULL when moment is NULL or unreadable."""

    type = types.Float()
    inherit_cache = True


@compiles(seconds_since, "sqlite")
def _seconds_since_sqlite(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return f"((julianday('now') - julianday(auditctl_utc(CAST({compiler.process(moment, **kw)} AS BLOB)))) * 86400.0)"


@compiles(seconds_since, "postgresql")
def _seconds_since_pg(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return pg_seconds_since(compiler.process(moment, **kw))


class stored_time(FunctionElement):
    """A stored time column as the rules read it: on SQLite through ``auditctl_utc`` (any form
    Python reads becomes canonical text, anything else NULL); on PostgreSQL the column itself.

    On SQLite a column the ``odd_times`` triggers watch is read through Python only on rows whose
    times are not all canonical; the others compare their text directly, as the stuck query does
    (``list --since`` over a million audits called Python once per row: 25 s)."""

    type = types.String()
    inherit_cache = True


@compiles(stored_time, "sqlite")
def _stored_time_sqlite(element, compiler, **kw):
    (moment,) = list(element.clauses)
    column = compiler.process(moment, **kw)
    # As a BLOB: Python decodes a function's text arguments strictly (see rules._statement).
    read = f"auditctl_utc(CAST({column} AS BLOB))"
    table = getattr(moment, "table", None)
    if getattr(moment, "name", None) in RULE_TIME_COLUMNS and table is not None and "odd_times" in table.c:
        return f"(CASE WHEN {compiler.process(table.c.odd_times, **kw)} THEN {read} ELSE {column} END)"
    return read


@compiles(stored_time, "postgresql")
def _stored_time_pg(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return compiler.process(moment, **kw)


class id_in(FunctionElement):
    """``column IN (ids)`` with one bound parameter however many ids: an array on PostgreSQL,
    a JSON list through ``json_each`` on SQLite. Keeps a batch's statement text and parameter count
    fixed (PostgreSQL allows 65,535 parameters; drivers spend time splitting long lists)."""

    type = types.Boolean()
    inherit_cache = True
    # A comparison already: without this, SQLite would get "(id IN (...)) = 1", which no index serves.
    _is_implicitly_boolean = True

    def __init__(self, column, ids):
        from sqlalchemy import bindparam
        from sqlalchemy.types import JSON

        self.ids = [int(i) for i in ids]
        super().__init__(column, bindparam(None, self.ids, type_=JSON(), unique=True))


@compiles(id_in, "sqlite")
def _id_in_sqlite(element, compiler, **kw):
    column, ids = list(element.clauses)
    return f"{compiler.process(column, **kw)} IN (SELECT value FROM json_each({compiler.process(ids, **kw)}))"


@compiles(id_in, "postgresql")
def _id_in_pg(element, compiler, **kw):
    column, ids = list(element.clauses)
    return (f"{compiler.process(column, **kw)} = ANY(ARRAY(SELECT jsonb_array_elements_text("
            f"CAST({compiler.process(ids, **kw)} AS jsonb))::bigint))")


def fetch_now(connection: Connection):
    """The database's time as a timezone-aware UTC datetime."""
    from sqlalchemy import select

    value = connection.execute(select(db_now())).scalar_one()
    return timestamps.as_datetime(value)


def moments(connection: Connection, **bounds) -> dict:
    """Time filters as moments (``since=7200, until=datetime(...)``): seconds ago on the database's
    clock, read once for all of them, and a datetime as given. Bounds that are None are left out."""
    from datetime import timedelta

    now, found = None, {}
    for name, value in bounds.items():
        if isinstance(value, (int, float)):
            now = now or fetch_now(connection)
            value = now - timedelta(seconds=float(value))
        if value is not None:
            found[name] = value
    return found
