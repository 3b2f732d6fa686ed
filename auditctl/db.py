"""Engines: one per role, configured for SQLite and for PostgreSQL.

Each engine has a role, which decides how long it may wait:

* ``worker``: a worker's fenced writes. On SQLite a write waits at most
  ``WORKER_LOCK_WAIT`` seconds for the lock; on PostgreSQL ``lock_timeout`` and
  ``statement_timeout`` bound it the same way. A worker's caller is never blocked for long.
* ``operator``: recover, reset-all, watch, init. They work in short batches; one batch
  waits at most ``OPERATOR_LOCK_WAIT`` seconds for a lock (the SQLite write lock, a
  PostgreSQL row lock), then the operation reports the database locked and stops.
* ``reader``: scan, list, show, workers. They never change the database: on SQLite they do
  not switch it to WAL (nor create the file), on PostgreSQL their sessions are read-only.

SQLite runs in WAL mode (switched on by the first writer), and every transaction that
writes starts as the writer (``BEGIN IMMEDIATE``): concurrent processes then queue on
the lock instead of failing half-way with "database is locked". PostgreSQL goes through
psycopg 3; a server-side setting ends a session left idle inside a transaction, so a
frozen process cannot hold row locks for long.

The URL is checked in ``dburl``, connections are used through ``transactions``, driver errors
are said in ``dberrors``, and the SQL that differs per engine (the database's clock) is in
``sqlfunctions``.
"""

from __future__ import annotations

import os
import random
import re
import time

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, URL

from . import documents, timestamps
from .dberrors import access_problem, missing_directory, no_directory_message
from .dburl import (SQLITE_URI_PARAMS, check_libpq_options, check_sqlite_options, normalize_url, sqlite_path,
                    statement_timeout_ms)
from .errors import ConfigError, DatabaseMissing, DatabaseUnavailable
from .schema import DISTINCTIVE_AUDIT_COLUMNS, DISTINCTIVE_ENOUGH
from .textsafe import printable
from .urls import mask_url, scrub
from .watchdog import CALL_GRACE

DEFAULT_DATABASE_URL = "sqlite:///auditctl.db"

#: PostgreSQL ends a session idle inside a transaction for this long (seconds).
IDLE_IN_TRANSACTION_TIMEOUT = 30.0
#: The longest a worker's write waits for a lock (SQLite busy timeout, PostgreSQL lock_timeout).
WORKER_LOCK_WAIT = 2.0
#: The longest a worker's statement may run on PostgreSQL (a stalled network, a frozen server).
WORKER_STATEMENT_TIMEOUT = 10.0
#: The longest one batch of recover, reset-all or watch waits for the SQLite write lock.
OPERATOR_LOCK_WAIT = 30.0
#: The longest a reader waits on SQLite (readers only wait while another process recovers a crashed WAL).
READER_LOCK_WAIT = 5.0

ROLES = ("worker", "operator", "reader")
_SQLITE_WAIT = {"worker": WORKER_LOCK_WAIT, "operator": OPERATOR_LOCK_WAIT, "reader": READER_LOCK_WAIT}


def monitor_call_timeout(lock_wait: float | None = None) -> float:
    """How long one call of a long-running monitor (a worker's monitor pass, ``watch``) waits for
    PostgreSQL's answer: twice its lock wait, plus the grace (``auditctl.watchdog``)."""
    return 2 * max(OPERATOR_LOCK_WAIT, lock_wait or 0.0) + CALL_GRACE


#: The longest wait SQLite's busy timeout and PostgreSQL's lock_timeout take, in milliseconds (a C int):
#: a longer one (``--lock-wait 25d``) would wrap around to no wait at all.
MAX_WAIT_MS = 2**31 - 1


def wait_ms(seconds: float) -> int:
    return min(MAX_WAIT_MS, int(seconds * 1000))


def _pg_options(url: URL, role: str, lock_wait: float, statement_timeout: float | None) -> tuple[URL, str]:
    """libpq ``options`` for the role, merged with the URL's own (which win over ours, but for a
    ``statement_timeout`` longer than the engine's client-side deadline allows)."""
    ours = [f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}",
            f"-c lock_timeout={wait_ms(lock_wait)}"]
    if role == "reader":
        ours += ["-c default_transaction_read_only=on"]
    theirs = url.query.get("options")
    if isinstance(theirs, tuple):
        theirs = " ".join(theirs)
    # psycopg reads times and intervals only in these styles ("can't parse timestamptz with DateStyle
    # 'SQL, DMY'"): they shape the text the server sends, never what it means, so they come last and
    # win over a URL's or a database's own (ALTER DATABASE ... SET datestyle).
    after = ["-c DateStyle=ISO,MDY", "-c IntervalStyle=postgres"]
    if statement_timeout is not None:
        ours_ms = max(1, wait_ms(statement_timeout))
        theirs_ms = statement_timeout_ms(theirs) if theirs else None
        # The server must end a statement before the client gives up on it (``watchdog``): their
        # shorter timeout stands, a longer one (or none, 0) gives way to ours.
        (ours if theirs_ms is None or 0 < theirs_ms <= ours_ms else after).append(f"-c statement_timeout={ours_ms}")
    # The URL's own settings (a search_path that separates two fleets, say) come after ours: libpq
    # applies -c settings in order, so a user who sets one of ours on purpose keeps theirs.
    options = " ".join(ours + ([theirs] if theirs else []) + after)
    return url.difference_update_query(["options"]), options


def create_engine(database_url: str | URL = DEFAULT_DATABASE_URL, *, role: str = "operator",
                  pool_size: int | None = None, must_exist: bool | None = None, lock_wait: float | None = None,
                  call_timeout: float | None = None, allow_memory: bool = False, **kwargs) -> Engine:
    """An engine for one role (``worker``, ``operator``, ``reader``); does not connect yet.

    An in-memory SQLite database (``sqlite://``, ``sqlite:///``, ``:memory:``) is refused unless
    ``allow_memory``: it would vanish with the process, and each thread of a guard would see its own.

    On SQLite, ``must_exist`` (the default for a ``reader``) refuses a file that does not exist
    (``DatabaseMissing``): looking, or recovering, must never create an empty database.

    On PostgreSQL, ``call_timeout`` bounds every wait for the server's answer on the client side
    (``auditctl.watchdog``), because a frozen server cannot enforce its own timeouts; the session's
    ``statement_timeout`` is set ``CALL_GRACE`` shorter (half, for a deadline under twice the grace),
    so a living server always answers first.
    A worker's engine always has one (``WORKER_STATEMENT_TIMEOUT`` plus the grace); other roles
    have none unless given (a long-running monitor gives one, a one-off command can be interrupted).
    """
    from sqlalchemy import create_engine as sa_create_engine

    from .values import storable_text

    if role not in ROLES:
        raise ValueError(f"unknown engine role {role!r}")
    if isinstance(database_url, str):
        # No database is named by a NUL or by bytes that were not UTF-8: SQLite would create a file
        # under a mangled name, and every later reader refuse it.
        storable_text("the database URL", database_url)
    lock_wait = _SQLITE_WAIT[role] if lock_wait is None else float(lock_wait)
    url = normalize_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is None and not allow_memory:
            raise ConfigError(f"{mask_url(database_url)} is an in-memory SQLite database: nothing written to it "
                              "outlives the process; give a file (sqlite:///PATH)")
        read_only = role == "reader"
        if (must_exist if must_exist is not None else read_only) and path is not None and not os.path.exists(path):
            if (problem := access_problem(path)) is not None:
                # It may well be there: "no database ... run `auditctl init`" would be wrong advice.
                raise DatabaseUnavailable(f"database unavailable at {mask_url(database_url)} ({path}): {problem}")
            if (directory := missing_directory(path)) is not None:
                raise DatabaseMissing(no_directory_message(path, directory, mask_url(database_url)))
            raise DatabaseMissing(f"no database at {path} (from {mask_url(database_url)}): run `auditctl init` "
                                  "to create it there, or pass --database-url")
        check_sqlite_options(database_url, url)
        uri_params = {k: v for k, v in url.query.items() if k in SQLITE_URI_PARAMS}
        if uri_params and path is not None and not (url.database or "").startswith("file:"):
            # sqlite:///x.db?mode=ro means what it says: SQLite's URI form, which pysqlite otherwise ignores
            # (with a warning) unless uri=true is given too, and with uri=true opens a file named
            # "x.db?mode=ro" unless the path is written as a file: URI.
            from urllib.parse import quote, urlencode

            driver_options = {k: v for k, v in url.query.items() if k not in SQLITE_URI_PARAMS}
            url = url.set(database=f"file:{quote(path)}?{urlencode(uri_params)}", query={**driver_options, "uri": "true"})
        elif read_only and path is not None and not os.access(path, os.W_OK) and url.query.get("mode") is None:
            # A file this process may not write: open it read-only, through SQLite's URI form.
            url = url.set(database=f"file:{path}?mode=ro").update_query_dict({"uri": "true"})
        connect_args = {"timeout": wait_ms(lock_wait) / 1000, "check_same_thread": False}
        try:
            engine = sa_create_engine(url, connect_args=connect_args, **kwargs)
        except (ValueError, TypeError) as error:  # ?timeout=abc, ?check_same_thread=maybe
            raise ConfigError(f"cannot use the database URL {mask_url(database_url)}: "
                              f"{scrub(error, database_url)}") from None
        _configure_sqlite(engine, lock_wait, wal=not read_only)
        # Absolute now: the process may change directory later, the engine's file does not move with it.
        engine._auditctl_sqlite_path = path
        if must_exist if must_exist is not None else read_only:
            never_create(engine)
    else:
        if role == "worker" and call_timeout is None:
            call_timeout = WORKER_STATEMENT_TIMEOUT + CALL_GRACE
        # The server bounds each statement first; the client's deadline only catches a server that cannot.
        statement_timeout = None
        if call_timeout is not None:
            statement_timeout = call_timeout - CALL_GRACE if call_timeout > 2 * CALL_GRACE else call_timeout / 2
        check_libpq_options(database_url, url)
        url, options = _pg_options(url, role, lock_wait, statement_timeout)
        # The URL's connect_timeout wins over ours (10 s); a write's budget still shortens either
        # (``watchdog.connect_timeout``). libpq takes whole seconds, and reads 0 as "wait for ever".
        connect_timeout = url.query.get("connect_timeout", "10")
        if not (isinstance(connect_timeout, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", connect_timeout)
                and int(connect_timeout) > 0):
            raise ConfigError(f"the database URL {mask_url(database_url)} has connect_timeout="
                              f"{printable(str(connect_timeout))[:40]}: give one whole number of seconds from 1 to "
                              "999999999 (or none, for 10)")
        connect_args = {"connect_timeout": int(connect_timeout), "application_name": f"auditctl-{role}", "options": options}
        if pool_size is not None:
            kwargs.setdefault("pool_size", pool_size)
            kwargs.setdefault("max_overflow", max(5, pool_size // 2))
        # A worker's writes are single statements that retry on a dead connection
        # (``single_write``): a pre-ping would double the round trips of every heartbeat.
        # The pool's reset is ours (``_configure_postgresql``), unless the caller chose one.
        own_reset = "pool_reset_on_return" not in kwargs
        if own_reset:
            kwargs["pool_reset_on_return"] = None
        engine = sa_create_engine(url, connect_args=connect_args, pool_pre_ping=role != "worker",
                                  json_serializer=documents.dumps_strict, json_deserializer=documents.loads_for_driver,
                                  **kwargs)
        _configure_postgresql(engine, call_timeout, own_reset=own_reset)
        # Whether auditctl (or the URL) set the session's statement_timeout, not the role or database.
        engine._auditctl_own_statement_timeout = "statement_timeout" in options
        # Its transactions (a claim, an end, a creation) ping first instead (``write_transaction``).
        engine._auditctl_ping_writes = role == "worker"
    engine._auditctl_display_url = mask_url(database_url)  # the URL as the user typed it, masked
    engine._auditctl_raw_url = database_url if isinstance(database_url, str) else None
    return engine


# --- SQLite -----------------------------------------------------------------------------


def _enable_wal(cursor, wait: float) -> None:
    """Switch to WAL, waiting like any writer would.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database is
    locked" at once instead of calling the busy handler while another process holds the
    write lock (several workers starting against a fresh file). Retry up to the busy timeout.
    """
    import sqlite3

    deadline = time.monotonic() + wait
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


def _new_or_ours(cursor) -> bool:
    """The file is empty or holds auditctl's tables. WAL changes the file for every program that
    opens it, so another application's database (which ``init`` refuses) is left in its own mode."""
    columns = ", ".join("?" * len(DISTINCTIVE_AUDIT_COLUMNS))
    cursor.execute(f"SELECT (SELECT count(*) FROM sqlite_master), (SELECT count(*) FROM pragma_table_info('audits') "
                   f"WHERE name IN ({columns}))", DISTINCTIVE_AUDIT_COLUMNS)
    objects, ours = cursor.fetchone()
    return objects == 0 or ours >= DISTINCTIVE_ENOUGH


def _configure_sqlite(engine: Engine, wait: float, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin, so
        # writers can begin IMMEDIATE (see _on_begin).
        dbapi_connection.isolation_level = None
        # The stuck query reads a time another tool wrote in an odd form through the same
        # parser Python uses, so the two always agree (see auditctl.timestamps).
        dbapi_connection.create_function("auditctl_utc", 1, timestamps.canonical, deterministic=True)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {wait_ms(wait)}")
        if wal and engine.url.database not in (None, "", ":memory:") and _new_or_ours(cursor):
            _enable_wal(cursor, wait)
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection):
        # A deferred transaction that later writes can fail with "database is locked"
        # without waiting; an IMMEDIATE one takes the write lock up front and waits on the
        # busy timeout like everybody else.
        # Reads take no transaction at all: each SELECT is its own consistent snapshot, and
        # a monitor's read costs one statement instead of three.
        options = connection.get_execution_options()
        if not options.get("auditctl_read_only"):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_file(engine: Engine) -> str | None:
    """The absolute path of a SQLite engine's file, as resolved when the engine was made."""
    return getattr(engine, "_auditctl_sqlite_path", None)

def never_create(engine: Engine) -> None:
    """From now on, open a SQLite engine's file with ``mode=rw``: a database that vanished (moved,
    deleted, unmounted) is then an error, never silently replaced by an empty file. Nothing for
    PostgreSQL or an in-memory database."""
    if sqlite_file(engine) is None:
        return
    from urllib.parse import quote

    @event.listens_for(engine, "do_connect")
    def _open_existing(dialect, connection_record, cargs, cparams):
        if not cparams.get("uri") and cargs and cargs[0] not in ("", ":memory:"):
            cargs[0] = f"file:{quote(os.path.abspath(cargs[0]))}?mode=rw"
            cparams["uri"] = True


# --- PostgreSQL -------------------------------------------------------------------------


def _safe_time_loaders():
    """psycopg loaders for timestamps that never raise: 'infinity' or a year psycopg cannot
    represent comes back as ``timestamps.Unreadable`` instead of failing the whole result.

    Each wraps the loader psycopg would use anyway (the C one from psycopg-binary, when it is
    installed): subclassing the pure-Python loader instead made every time read cost about 12 µs,
    most of a scan's time on PostgreSQL."""
    import psycopg
    from psycopg import DataError
    from psycopg.adapt import Loader
    from psycopg.postgres import types as pg_types
    from psycopg.pq import Format

    def safe(name):
        fast = psycopg.adapters.get_loader(pg_types[name].oid, Format.TEXT)

        class Safe(Loader):
            def __init__(self, oid, context=None):
                super().__init__(oid, context)
                self._load = fast(oid, context).load

            def load(self, data):
                try:
                    return self._load(data)
                except (DataError, ValueError, OverflowError):
                    return timestamps.Unreadable(bytes(data).decode("utf-8", "replace"))

        Safe.__name__ = f"Safe{fast.__name__}"
        return Safe

    return safe("timestamptz"), safe("timestamp")


def _configure_postgresql(engine: Engine, call_timeout: float | None, *, own_reset: bool = False) -> None:
    tz_loader, naive_loader = _safe_time_loaders()
    if own_reset:
        event.listen(engine, "reset", _reset_on_return)
    # A list of rows to INSERT (history rows, outbox deliveries) goes as multi-row INSERT statements
    # of up to 1,000 rows each, as SQLAlchemy already does for INSERT ... RETURNING, instead of one
    # statement per row.
    engine.dialect.use_insertmanyvalues_wo_returning = True

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.adapters.register_loader("timestamptz", tz_loader)
        dbapi_connection.adapters.register_loader("timestamp", naive_loader)

    if call_timeout is not None:
        from .watchdog import connect_timeout, connection_class

        deadline_connection = connection_class()

        @event.listens_for(engine, "do_connect")
        def _connect_with_deadlines(_dialect, _record, cargs, cparams):
            # A single write's budget covers the connection it opens (``single_write``); the engine's
            # own parameters are left as they are for the next connection.
            params = {**cparams, "connect_timeout": connect_timeout(cparams.get("connect_timeout"))}
            connection = deadline_connection.connect(*cargs, **params)
            connection.call_timeout = call_timeout
            return connection


def _reset_on_return(dbapi_connection, record, state) -> None:
    """A PostgreSQL connection given back to the pool: rolled back, as SQLAlchemy's own reset does,
    unless the client has already closed it (a deadline that passed just as an answer came in,
    ``auditctl.watchdog``). Such a connection is thrown away at once: the ROLLBACK SQLAlchemy would
    try on it fails, and the pool logged "Exception during reset or similar" with a traceback for
    a connection it then threw away anyway."""
    if dbapi_connection.closed:
        if record is not None:
            record.invalidate()  # the record opens a fresh connection when next checked out
        return
    if not state.transaction_was_reset:
        dbapi_connection.rollback()
