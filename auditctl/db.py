"""Engines, transactions, the database clock, and database errors in human words.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every
transaction that writes starts as a writer (``BEGIN IMMEDIATE``): concurrent
processes then queue on the lock instead of failing half-way with "database is
locked". PostgreSQL goes through psycopg 3 with pre-ping, so a connection that died
in an outage is replaced instead of failing the next heartbeat.

The database's clock is the only clock. Worker and monitor hosts may disagree by
minutes; the database is the one thing every party already agrees on.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from typing import Iterator

from sqlalchemy import event, exc as sa_exc, types
from sqlalchemy.engine import Connection, Engine, make_url, URL
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from .errors import ConfigError, DatabaseUnavailable, SchemaMissing

DEFAULT_DATABASE_URL = "sqlite:///auditctl.db"

#: PostgreSQL ends a session idle inside a transaction for this long (seconds).
IDLE_IN_TRANSACTION_TIMEOUT = 30.0

#: How long a SQLite writer waits for the lock before giving up (seconds).
SQLITE_BUSY_TIMEOUT = 30.0


def normalize_url(database_url: str | URL) -> URL:
    """Parse a URL; ``postgresql://`` and ``postgres://`` mean psycopg 3, the driver we ship."""
    try:
        url = make_url(database_url) if isinstance(database_url, str) else database_url
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise ConfigError(f"invalid database URL {mask_url(str(database_url))!r}: {mask_url(str(exc))}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {url.get_backend_name()!r} in {mask_url(url)}: use sqlite:///PATH or postgresql://..."
        )
    return url


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)(\S*)(@)")
#: libpq also takes the password as a query parameter: ``postgresql://bob@host/db?password=...``.
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)([^&\s]*)", re.IGNORECASE)


#: A URL too broken to parse may still hold ``user:password@``; never echo that either.
_PASSWORD_ANYWHERE = re.compile(r"(:)([^:@/\s]+)(@)")


def mask_url(database_url) -> str:
    """The URL with its password replaced by ``***``; safe for any output or log."""
    if isinstance(database_url, URL):
        return _PASSWORD_IN_QUERY.sub(r"\1***", database_url.render_as_string(hide_password=True))
    masked = _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***\3", str(database_url)))
    return _PASSWORD_ANYWHERE.sub(r"\1***\3", masked)


def scrub(message: str, url: URL | None) -> str:
    """Remove a URL's password from a driver's error message, whatever shape it takes."""
    if url is not None:
        query_password = url.query.get("password")
        for secret in (url.password, *(query_password if isinstance(query_password, tuple) else (query_password,))):
            if secret:
                message = message.replace(str(secret), "***")
    message = _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***\3", message))
    return _PASSWORD_ANYWHERE.sub(r"\1***\3", message)


def create_engine(database_url: str | URL = DEFAULT_DATABASE_URL, **kwargs) -> Engine:
    """An engine configured for this tool; does not connect yet."""
    from sqlalchemy import create_engine as sa_create_engine

    url = normalize_url(database_url)
    if url.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
        engine = sa_create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
    else:
        # A process frozen inside a transaction (SIGSTOP, a debugger, a stalled VM) would hold
        # its row locks forever and keep recovery off those rows; the server ends such a
        # session instead. auditctl's own transactions are never idle for anything like this long.
        connect_args = {"connect_timeout": 10, "application_name": "auditctl",
                        "options": f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}"}
        engine = sa_create_engine(url, connect_args=connect_args, pool_pre_ping=True, **kwargs)
    return engine


def _enable_wal(cursor) -> None:
    """Switch to WAL, waiting like any writer would.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database is
    locked" at once instead of calling the busy handler while another process holds the
    write lock (several workers starting against a fresh file). Retry up to the busy timeout.
    """
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin, so
        # writers can begin IMMEDIATE (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
        if engine.url.database not in (None, "", ":memory:"):
            _enable_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection):
        # A deferred transaction that later writes can fail with "database is locked"
        # without waiting; an IMMEDIATE one takes the write lock up front and waits on the
        # busy timeout like everybody else.
        # Reads take no transaction at all: each SELECT is its own consistent snapshot, and
        # a monitor's read costs one statement instead of three.
        if not connection.get_execution_options().get("auditctl_read_only"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A short transaction that will write; commits on success."""
    with translate_errors(engine):
        with engine.begin() as connection:
            yield connection


@contextlib.contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only. On SQLite it takes no transaction (each SELECT is its own
    snapshot, and nothing holds a lock between statements); on PostgreSQL it stays in a
    transaction, which server-side cursors (streamed listings) need."""
    with translate_errors(engine):
        with engine.connect() as connection:
            yield connection.execution_options(auditctl_read_only=True)


_MISSING_TABLE = re.compile(r"no such table|relation \"[^\"]*\" does not exist|no such column|column \"[^\"]*\" does not exist")


@contextlib.contextmanager
def translate_errors(engine: Engine) -> Iterator[None]:
    """Turn driver errors into DatabaseUnavailable / SchemaMissing with a masked URL."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise database_error(exc, engine.url) from None


def database_error(exc: sa_exc.DBAPIError, url: URL) -> Exception:
    original = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = scrub(original[0] if original else type(exc).__name__, url)
    if _MISSING_TABLE.search(detail):
        return SchemaMissing(f"the database at {mask_url(url)} has no auditctl schema (or an old one): run `auditctl init` ({detail})")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) or getattr(exc, "connection_invalidated", False):
        return DatabaseUnavailable(f"database unavailable at {describe_url(url)}: {detail}")
    return DatabaseUnavailable(f"database error at {describe_url(url)}: {detail}")


def describe_url(url: URL) -> str:
    """Where the database is, for error messages: host and port, or the SQLite file."""
    if url.get_backend_name() == "sqlite":
        return f"{mask_url(url)} ({os.path.abspath(url.database) if url.database else 'memory'})"
    return mask_url(url)


def is_postgres(bind) -> bool:
    return bind.dialect.name == "postgresql"


# --- the database clock ---------------------------------------------------------------


class db_now(FunctionElement):
    """The database's current time (UTC), as a timestamp comparable with stored ones."""

    type = types.DateTime(timezone=True)
    inherit_cache = True


@compiles(db_now, "sqlite")
def _db_now_sqlite(element, compiler, **kw):
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


@compiles(db_now, "postgresql")
def _db_now_pg(element, compiler, **kw):
    return "statement_timestamp()"


class seconds_since(FunctionElement):
    """``now - moment`` in seconds (float), computed by the database; NULL when moment is NULL."""

    type = types.Float()
    inherit_cache = True


@compiles(seconds_since, "sqlite")
def _seconds_since_sqlite(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return f"((julianday('now') - julianday({compiler.process(moment, **kw)})) * 86400.0)"


@compiles(seconds_since, "postgresql")
def _seconds_since_pg(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return f"EXTRACT(EPOCH FROM (statement_timestamp() - {compiler.process(moment, **kw)}))"


def fetch_now(connection: Connection):
    """The database's time as a timezone-aware UTC datetime."""
    from sqlalchemy import select

    from .schema import parse_timestamp

    value = connection.execute(select(db_now())).scalar_one()
    return parse_timestamp(value)
