"""Engines, transactions, the database clock, and database errors in human words.

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

The database's clock is the only clock. Worker and monitor hosts may disagree by
minutes; the database is the one thing every party already agrees on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import re
import time
from typing import Iterator

from sqlalchemy import event, exc as sa_exc, types
from sqlalchemy.engine import Connection, Engine, make_url, URL
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from . import documents, timestamps
from .schema import DISTINCTIVE_AUDIT_COLUMNS, DISTINCTIVE_ENOUGH, RULE_TIME_COLUMNS
from .errors import (ConfigError, ConnectionSettingRefused, DatabaseMissing, DatabaseRefused, DatabaseUnavailable,
                     NotADatabase, SchemaMissing, TextNotUtf8, WriteRefused)
from .textsafe import printable
from .urls import mask_unread_url, mask_url, scrub
from .watchdog import CALL_GRACE, connect_within

log = logging.getLogger("auditctl.db")

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
#: The drivers auditctl ships and tests, per database.
_DRIVERS = {"sqlite": ("pysqlite",), "postgresql": ("psycopg",)}
#: Query parameters of a SQLite URL that belong to SQLite's own URI filenames.
_SQLITE_URI_PARAMS = ("mode", "cache", "immutable", "nolock", "psow", "vfs", "modeof")
#: What the sqlite3 driver itself takes from a URL's query string (SQLAlchemy's pysqlite dialect).
_SQLITE_DRIVER_PARAMS = ("timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements", "uri")
_SQLITE_WAIT = {"worker": WORKER_LOCK_WAIT, "operator": OPERATOR_LOCK_WAIT, "reader": READER_LOCK_WAIT}


def normalize_url(database_url: str | URL) -> URL:
    """Parse a URL; ``postgresql://`` and ``postgres://`` mean psycopg 3, the driver we ship."""
    if not isinstance(database_url, (str, URL)):
        # An Engine or a connection handed where the URL goes: its repr is no URL, and says nothing useful.
        raise ConfigError(f"the database URL must be text or a SQLAlchemy URL, not {type(database_url).__name__}"
                          + (" (pass engine.url)" if hasattr(database_url, "url") else ""))
    try:
        url = make_url(database_url.strip() if isinstance(database_url, str) else database_url)
    except (sa_exc.ArgumentError, ValueError, TypeError):
        raise ConfigError(f"cannot read the database URL {mask_unread_url(database_url)!r}: "
                          "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend == "postgresql" and ("@" in (url.host or "") or re.search(r"@[^/?#]*/", url.database or "")):
        # u:Kx7@Qz9/x@host/db: the parser ends the password at its first '@' and takes what follows for
        # the host (and the database), so a driver's "failed to resolve host 'Qz9'" would show a piece
        # of the password. Such a URL never connects as typed: refused before any connection.
        raise ConfigError(f"the database URL {mask_url(database_url)} has an '@' in its password that is not "
                          "percent-encoded, so a piece of the password would be read as the host: write the "
                          "password's '@' as %40 (and '/' as %2F, '%' as %25, ':' as %3A)")
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"unsupported database {backend!r} in {mask_url(database_url)}: use sqlite:///PATH or postgresql://...")
    driver = url.get_driver_name()
    if driver not in _DRIVERS[backend]:
        # Another driver may not be installed (an import error deep in SQLAlchemy), and is not tested.
        raise ConfigError(f"unsupported driver {driver!r} in {mask_url(database_url)}: auditctl talks to "
                          f"{'PostgreSQL through psycopg 3: write postgresql://...' if backend == 'postgresql' else 'SQLite through Python sqlite3: write sqlite:///PATH'}")
    if backend == "sqlite" and url.database and url.host:
        # sqlite://relative.db (two slashes) puts the file name where a host would be.
        raise ConfigError(f"{mask_url(database_url)} names no file: a SQLite URL has three slashes, "
                          f"as in sqlite:///{url.host}{'/' + url.database if url.database else ''}")
    if backend == "sqlite" and not url.database and url.host:
        raise ConfigError(f"{mask_url(database_url)} names no file: a SQLite URL has three slashes, "
                          f"as in sqlite:///{url.host}")
    if backend == "sqlite" and (url.username is not None or url.password is not None or url.port is not None):
        # sqlite://user:pw@/tmp/x.db: SQLAlchemy refuses it, after reading "tmp/x.db" as a relative path.
        raise ConfigError(f"{mask_url(database_url)}: a SQLite URL takes no user name, password or port; "
                          "write sqlite:///PATH")
    if backend == "sqlite" and (url.database or "").startswith("file:") and not _query_true(url, "uri"):
        # SQLite reads a file: name as a URI only when told; otherwise it is a file named "file:...",
        # and parts of auditctl that read the path would look at another file.
        raise ConfigError(f"{mask_url(database_url)}: a file: name is a SQLite URI; add ?uri=true "
                          "(sqlite:///file:PATH?uri=true), or give the path itself (sqlite:///PATH)")
    return url


def _query_true(url: URL, name: str) -> bool:
    """Whether a URL's query option reads as true the way SQLAlchemy reads it (``true``, ``True``,
    ``1``, ``yes``...; the last one when it is given twice)."""
    from sqlalchemy.util import asbool

    value = url.query.get(name)
    if isinstance(value, tuple):
        value = value[-1] if value else None
    try:
        return value is not None and asbool(value)
    except ValueError:
        return False


def monitor_call_timeout(lock_wait: float | None = None) -> float:
    """How long one call of a long-running monitor (a worker's monitor pass, ``watch``) waits for
    PostgreSQL's answer: twice its lock wait, plus the grace (``auditctl.watchdog``)."""
    return 2 * max(OPERATOR_LOCK_WAIT, lock_wait or 0.0) + CALL_GRACE


def sqlite_path(url: URL) -> str | None:
    """The absolute path of a SQLite file URL (None for an in-memory database)."""
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory" or url.query.get("vfs") == "memdb":
        return None
    if database.startswith("file:"):
        from urllib.parse import parse_qs

        database, _, options = database[5:].partition("?")
        given = parse_qs(options)
        if database in ("", ":memory:") or "memory" in given.get("mode", ()) or "memdb" in given.get("vfs", ()):
            return None
    return os.path.abspath(database)


#: A ``statement_timeout`` set in libpq ``options`` (``-c statement_timeout=5s``, ``--statement-timeout=5s``).
_STATEMENT_TIMEOUT_OPTION = re.compile(r"(?:-c\s*|--)statement[_-]timeout\s*=\s*(\S+)")
#: PostgreSQL's time units, in milliseconds (a bare number is milliseconds).
_PG_TIME_UNITS = {"": 1.0, "us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0, "d": 86_400_000.0}


def _statement_timeout_ms(options: str) -> float | None:
    """The last ``statement_timeout`` libpq ``options`` set, in milliseconds (0: none); None when
    they set none, infinity for one this cannot read (taken as longer than any deadline)."""
    found = _STATEMENT_TIMEOUT_OPTION.findall(options)
    if not found:
        return None
    match = re.fullmatch(r"'?(\d+(?:\.\d+)?)\s*([a-z]*)'?", found[-1].lower())
    if match is None or match.group(2) not in _PG_TIME_UNITS:
        return math.inf
    return float(match.group(1)) * _PG_TIME_UNITS[match.group(2)]


#: The longest wait SQLite's busy timeout and PostgreSQL's lock_timeout take, in milliseconds (a C int):
#: a longer one (``--lock-wait 25d``) would wrap around to no wait at all.
MAX_WAIT_MS = 2**31 - 1


def wait_ms(seconds: float) -> int:
    return min(MAX_WAIT_MS, int(seconds * 1000))


@functools.lru_cache(maxsize=1)
def _libpq_keywords() -> frozenset[str]:
    """The connection parameters the libpq psycopg uses takes (``PQconndefaults``): what a PostgreSQL
    URL's query may hold, since every one of them is handed to libpq."""
    from psycopg import pq

    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


#: libpq's words for a value it refuses while reading its settings, before any connection
#: ('invalid sslmode value: "bogus"', 'invalid integer value "x" for connection option "port"',
#: 'sslmode value "require" invalid when SSL support is not compiled in').
_LIBPQ_BAD_VALUE = re.compile(r'invalid [\w ]*value\b|\w+ value "[^"]*" invalid\b')
#: Where the check below points libpq: a socket directory no one has, so nothing is ever reached.
_NOWHERE = "/nonexistent/auditctl-settings-check"


def _libpq_refusal(url: URL) -> str | None:
    """libpq's own complaint about a value of the URL's options (``sslmode=bogus``), None when it
    takes them all. libpq checks its settings when a connection starts, before it reaches any
    server; started towards a socket that does not exist, nothing is reached at all, and the values
    are judged by the one list that counts (the libpq psycopg loads), not a copy of it."""
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    params = {key: (value[-1] if isinstance(value, tuple) else value) for key, value in url.query.items()}
    # The hosts are replaced by the missing socket; ports stay when there is one for it to go with.
    params.update(host=_NOWHERE, hostaddr="")
    if "," in str(params.get("port", "")):
        params.pop("port")
    try:
        connection = pq.PGconn.connect_start(make_conninfo("", **params).encode())
    except Exception:  # a conninfo psycopg cannot build: the connection itself will say
        return None
    try:
        message = connection.error_message.decode("utf-8", "replace").strip()
    finally:
        connection.finish()
    first = message.splitlines()[0] if message else ""
    return first if _LIBPQ_BAD_VALUE.match(first) else None


#: libpq's words for a value it reads only once it has a socket for a TCP connection (its keepalive
#: and TCP settings), said when the connection fails: 'invalid integer value "abc" for connection
#: option "keepalives"'.
_LIBPQ_BAD_OPTION_VALUE = re.compile(r'invalid [\w ]*value "[^"]*" for connection option "[^"]*"')


def _value_refused(said: str, url: URL, shown: str, error=ConfigError) -> ConfigError:
    """The usage error for a value libpq refused (``said``, scrubbed): the URL's, or, when the URL
    holds no option it names, one from libpq's environment (a PG* variable)."""
    if any(re.search(rf"\b{re.escape(key)}\b", said) for key in url.query):
        return error(f"the database URL {shown} has a value PostgreSQL's client (libpq) does not take: {said}")
    return error(f"PostgreSQL's client (libpq) refuses a setting from its environment (a PG* variable) "
                 f"for the database URL {shown}: {said}")


def _unknown_values_masked(database_url, url: URL, unknown: list[str]) -> str:
    """The URL, masked, with the values of options no one knows masked too: a misspelt ``pasword=``
    holds a password all the same. When a value cannot be found to mask, the query is left out."""
    shown = mask_url(database_url)
    for key in unknown:
        shown = re.sub(rf"([?&]{re.escape(key)}=)[^&#]*", r"\1***", shown)
    values = [v for key in unknown for v in (url.query[key] if isinstance(url.query[key], tuple) else (url.query[key],))]
    if any(value and value in shown for value in values):
        shown = shown.split("?", 1)[0] + "?..."
    return shown


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
        theirs_ms = _statement_timeout_ms(theirs) if theirs else None
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
            if (problem := _access_problem(path)) is not None:
                # It may well be there: "no database ... run `auditctl init`" would be wrong advice.
                raise DatabaseUnavailable(f"database unavailable at {mask_url(database_url)} ({path}): {problem}")
            if (directory := _missing_directory(path)) is not None:
                raise DatabaseMissing(_no_directory(path, directory, mask_url(database_url)))
            raise DatabaseMissing(f"no database at {path} (from {mask_url(database_url)}): run `auditctl init` "
                                  "to create it there, or pass --database-url")
        unknown = sorted(set(url.query) - set(_SQLITE_URI_PARAMS) - set(_SQLITE_DRIVER_PARAMS))
        if unknown:
            # SQLAlchemy would ignore them with a warning, and SQLite ignores unknown URI options.
            raise ConfigError(f"the database URL {mask_url(database_url)} has an option SQLite does not take: "
                              f"{', '.join(unknown)} (it takes {', '.join(_SQLITE_DRIVER_PARAMS + _SQLITE_URI_PARAMS)})")
        uri_params = {k: v for k, v in url.query.items() if k in _SQLITE_URI_PARAMS}
        if uri_params and path is not None and not (url.database or "").startswith("file:"):
            # sqlite:///x.db?mode=ro means what it says: SQLite's URI form, which pysqlite otherwise ignores
            # (with a warning) unless uri=true is given too, and with uri=true opens a file named
            # "x.db?mode=ro" unless the path is written as a file: URI.
            from urllib.parse import quote, urlencode

            driver_options = {k: v for k, v in url.query.items() if k not in _SQLITE_URI_PARAMS}
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
        unknown = sorted(set(url.query) - _libpq_keywords())
        if unknown:
            # libpq would refuse them on connecting ("invalid connection option"): a runtime error that
            # ``watch`` would retry as an outage for good, and that ``config`` could not see.
            raise ConfigError(f"the database URL {_unknown_values_masked(database_url, url, unknown)} has an option "
                              f"PostgreSQL's client (libpq) does not take: {printable(', '.join(unknown))[:200]}")
        refused = _libpq_refusal(url)
        if refused is not None:
            # libpq would refuse it on every connection: not an outage for ``watch`` to wait out.
            raise _value_refused(printable(scrub(refused, database_url))[:200], url, mask_url(database_url))
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


def display_url(engine: Engine) -> str:
    """The engine's URL as the user typed it, with the password masked."""
    return getattr(engine, "_auditctl_display_url", None) or mask_url(engine.url)


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


def file_identity(engine: Engine) -> tuple[int, int] | None:
    """``(device, inode)`` of a SQLite engine's file: another value later means the file at that path
    was deleted, moved or replaced. None for PostgreSQL, an in-memory database, or no file there."""
    path = sqlite_file(engine)
    return None if path is None else _identity_of(path)


#: The longest ``FileWatch`` waits, once, for another connection to the file that left the path (a
#: read in progress, a write) before it writes that file's log into it.
CHECKPOINT_WAIT = 2.0


def _identity_of(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``, or None when nothing is there."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class FileWatch:
    """SQLite: whether the file at the engines' path is still the one they opened.

    An open connection to a file that was deleted, moved away or replaced goes on reading and
    writing it, where nobody else does. On a change the engines' pools are emptied, so the next
    connection opens the path again (engines made with ``never_create`` then fail while nothing
    is there, rather than create an empty file). Inactive for PostgreSQL or a file missing at start.

    In WAL mode the latest changes sit in ``PATH-wal`` beside the path until a checkpoint writes
    them into the file. SQLite skips the checkpoint of the last close when the file has moved: the
    changes would stay at the path, missing from the moved file, and SQLite would replay them into
    the next file put there (a restored backup damaged, a file that is no database made "malformed").
    So before the pools are emptied, a connection idle in one of them (never a new one: that would
    open what is now at the path) writes them into the file it has open, wherever it is now, and
    empties the log (``PRAGMA wal_checkpoint(TRUNCATE)``). While changes of a file that left the path
    are still in the log there (another process was reading that file and the checkpoint could not
    finish; a write came after it), no connection of these engines opens the path: they fail with
    ``stale_wal``'s reason, an outage, until the log is gone or its own file is back.
    """

    def __init__(self, *engines: Engine):
        self.engines = engines
        self.path = sqlite_file(engines[0]) if engines else None
        self.identity = file_identity(engines[0]) if engines else None
        self.active = self.identity is not None
        self.wal = f"{self.path}-wal" if self.path else None
        #: The log beside the file while it was the one at the path (device, inode).
        self._own_wal = _identity_of(self.wal) if self.active else None
        #: A log that may hold changes of a file that left the path: (its identity, that file's identity).
        self._old_wal: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._warned = False
        if self.active:
            for engine in engines:
                event.listen(engine, "do_connect", self._before_connect)
                event.listen(engine, "connect", self._after_connect)

    @property
    def present(self) -> bool:
        """False while no file is at the path (as of the last ``check``)."""
        return not self.active or self.identity is not None

    def changed(self) -> bool:
        """Whether ``check`` would find a change (one stat; nothing is done about it)."""
        return self.active and file_identity(self.engines[0]) != self.identity

    def check(self) -> str | None:
        """None when nothing changed; else ``"gone"``, ``"back"`` or ``"replaced"`` (the pools emptied)."""
        if not self.active:
            return None
        current = file_identity(self.engines[0])
        if current == self.identity:
            if current is not None and self._old_wal is None:
                self._own_wal = _identity_of(self.wal)
            return None
        previous = self.identity
        if previous is not None:
            self._write_back(previous)  # while the pools still hold connections to the file that left
        self.identity = current
        for engine in self.engines:
            engine.dispose()
        if current is not None and self._old_wal is None:
            self._own_wal = _identity_of(self.wal)
        return "gone" if current is None else "back" if previous is None else "replaced"

    def stale_wal(self) -> str | None:
        """Why no connection may open the path now (changes of another file in the log beside it), or None."""
        if self._old_wal is None:
            return None
        wal_identity, owner = self._old_wal
        here = _identity_of(self.path)
        if _identity_of(self.wal) != wal_identity or here == owner:
            self._old_wal = None  # the log was removed or replaced, or the file it belongs to is back
            return None
        if here is None or _size_of(self.wal) == 0:
            return None  # nothing to open yet, or nothing to replay
        name = os.path.basename(self.path)
        reason = (f"{self.wal} is the log of the database file that was at {self.path} before it was moved or "
                  f"deleted, and may hold changes missing from that file; SQLite would replay them into the file "
                  f"now at the path and damage it. To keep them, put that file back at {self.path}; to drop them, "
                  f"move {name}-wal and {name}-shm out of the way")
        if not self._warned:
            self._warned = True
            log.warning("not opening %s: %s", printable(self.path), printable(reason))
        return reason

    def _before_connect(self, dialect, _record, _cargs, _cparams):
        """Every new connection: refused while the log at the path holds another file's changes."""
        reason = self.stale_wal()
        if reason is None and self._old_wal is None and self.identity is not None and _size_of(self.wal) > 0:
            here = _identity_of(self.path)
            if here is not None and here != self.identity:
                # Another file at the path that ``check`` has not seen yet (another thread's connection):
                # the log beside it may still be the old file's.
                reason = (f"the database file at {self.path} was replaced and the log beside it "
                          f"({self.wal}) may hold changes of the file that was there; not opened until it is checked")
        if reason is not None:
            raise dialect.loaded_dbapi.OperationalError(reason)

    def _after_connect(self, _connection, _record):
        """A connection that did open the file now at the path, beside an empty log, makes that log the
        new file's own. Not before it opened: one that fails (nothing at the path) proves nothing, and
        another program may still write the old file's changes into the log meanwhile."""
        if self._old_wal is not None and _identity_of(self.path) not in (None, self._old_wal[1]) \
                and _size_of(self.wal) == 0:
            self._old_wal = None

    def _write_back(self, previous: tuple[int, int]) -> None:
        """The file that left the path: its log written into it, and emptied, through a connection
        idle in a pool; then whatever is left of that log at the path recorded (``stale_wal``)."""
        if self._old_wal is not None and _identity_of(self.wal) == self._old_wal[0]:
            return  # still the log of a file that left earlier (no connection opened the one leaving now)
        done = True
        if any(_idle_connections(engine) or _pool_count(engine, "checkedout") for engine in self.engines):
            # One checkpoint is enough (every connection to the file shares its log); another after a
            # busy one would only wait again.
            done = next((result for result in map(_checkpoint_idle, self.engines) if result is not None), False)
        found = _identity_of(self.wal)
        # A log never seen beside the file (made after the last look) may be its log all the same.
        if found is not None and (found == self._own_wal or self._own_wal is None or not done):
            self._old_wal, self._warned = (found, previous), False
            if _size_of(self.wal) > 0:
                log.warning(
                    "the database file %s left the path while another connection had it open: its log %s "
                    "could not be emptied and may hold changes missing from that file", printable(self.path),
                    printable(self.wal))
        else:
            self._old_wal = None


def _checkpoint_idle(engine: Engine) -> bool | None:
    """Write the log of the file a connection idle in the engine's pool has open into that file, and
    empty it: True when done in full, False when not, None when no connection was idle (none is
    ever opened for it)."""
    queue = getattr(engine.pool, "_pool", None)
    if queue is None or not callable(getattr(queue, "get", None)):
        return None  # a pool that keeps no connection
    try:
        record = queue.get(False)
    except Exception:  # noqa: BLE001 - Empty: none idle now
        return None
    try:
        connection = record.dbapi_connection
        if connection is None:
            return None
        connection.execute(f"PRAGMA busy_timeout = {wait_ms(CHECKPOINT_WAIT)}")  # closed right after, by dispose
        busy, _log, _done = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0
    except Exception:  # noqa: BLE001 - the file is gone from under it: what is left is ``stale_wal``'s to refuse
        return False
    finally:
        try:
            queue.put(record, False)
        except Exception:  # noqa: BLE001 - Full: another connection came back meanwhile
            record.close()


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


# --- transactions ---------------------------------------------------------------------


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A short transaction that will write; commits on success. Text it reads is never refused
    for not being UTF-8 (see ``read_connection``).

    The ``DatabaseUnavailable`` it raises has ``nothing_committed`` true when the PostgreSQL connection
    was lost inside the transaction before its COMMIT was sent: the server ended the session, or a
    deadline closed the connection as an answer came in (``auditctl.watchdog``), and the next
    statement, or the COMMIT itself, found it closed. Nothing of the transaction can have been
    committed then (see ``retried_transaction``). A COMMIT sent on a connection that looked alive may
    have taken effect, and a call that got no answer by its deadline is not said to have committed
    nothing either: its budget is spent."""
    state = {"begun": False, "commit_sent": False}
    try:
        if not getattr(engine, "_auditctl_ping_writes", False):
            with engine.begin() as connection:
                state["begun"] = True
                _text_mode(connection, strict=False)
                yield connection
                state["commit_sent"] = not _closed_here(connection)
            return
        connection, transaction = _live_transaction(engine)
        state["begun"] = True
        with connection, transaction:
            _text_mode(connection, strict=False)
            yield connection
            state["commit_sent"] = not _closed_here(connection)
    except sa_exc.DBAPIError as exc:
        error = database_error(exc, engine, writing=True)
        error.nothing_committed = state["begun"] and not state["commit_sent"] and _lost_not_timed_out(engine, exc)
        raise error from None


def _closed_here(connection: Connection) -> bool:
    """Whether the client has already closed the driver's connection (a PostgreSQL deadline that
    passed as an answer came in): then no COMMIT can be sent on it."""
    try:
        driver = connection.connection.driver_connection
    except sa_exc.SQLAlchemyError:
        return False  # invalidated: SQLAlchemy knows, and says so at the commit
    return bool(getattr(driver, "closed", False)) and connection.dialect.name == "postgresql"


def _timed_out(engine: Engine, exc: sa_exc.DBAPIError) -> bool:
    """A PostgreSQL call that ended at its own deadline (``auditctl.watchdog``)."""
    if engine.dialect.name != "postgresql":
        return False
    from .watchdog import connection_class

    return isinstance(exc.orig, connection_class().TimedOut)


def _lost_not_timed_out(engine: Engine, exc: sa_exc.DBAPIError) -> bool:
    """A PostgreSQL connection found lost, other than by a call of its own past its deadline."""
    return engine.dialect.name == "postgresql" and exc.connection_invalidated and not _timed_out(engine, exc)


def retried_transaction(engine: Engine, work):
    """``work(connection)`` inside a ``write_transaction``; returns what it returns. When the
    connection is lost before the transaction's COMMIT was sent (``nothing_committed``), ``work``
    runs once more, on a fresh connection. A transaction whose COMMIT may have been sent is never
    repeated. ``work`` must be safe to run again from the start (it writes only through ``connection``)."""
    try:
        with write_transaction(engine) as connection:
            return work(connection)
    except DatabaseUnavailable as lost:
        if not getattr(lost, "nothing_committed", False):
            raise
        log.info("the connection was lost inside a transaction before its COMMIT was sent (%s); nothing was "
                 "committed: trying once more on a fresh connection", printable(lost))
    with write_transaction(engine) as connection:
        return work(connection)


def _live_transaction(engine: Engine) -> tuple[Connection, object]:
    """A transaction begun on a connection known to be alive, for an engine without pre-ping (a
    worker's). After a server restart every idle pooled connection is dead: the first statement
    finds it, and SQLAlchemy then recycles the whole pool, so one more try gets a fresh connection.
    Only the ping is retried, never the transaction's own statements (a lost COMMIT is ambiguous),
    and never a ping that ran to its own deadline: the server stopped answering, and one more
    connection would add a second deadline (and an unbounded connect) to a write promised one.
    A ping whose deadline passed just as its answer came in succeeded on a connection the watchdog
    then closed (``auditctl.watchdog``): that one is thrown away too, and the next taken."""
    retried = False
    while True:
        connection = engine.connect()
        transaction = connection.begin()
        try:
            connection.exec_driver_sql("SELECT 1")
        except sa_exc.DBAPIError as exc:
            connection.close()
            # Found dead (a server restart): the next connection is fresh. Past its own deadline: the
            # server stopped answering, and a fresh connection would wait as long again.
            if retried or not exc.connection_invalidated or _timed_out(engine, exc):
                raise
        else:
            if retried or not _closed_here(connection):
                return connection, transaction  # closed on the retry too: the first statement says so
            connection.invalidate()  # this connection only: the others in the pool are not suspect
            connection.close()
        retried = True


#: Connections a worker's pool keeps beyond one per run it holds: the heartbeat thread's and the monitor's.
POOL_SPARE = 2


def fit_pool(engine: Engine, connections: int) -> None:
    """Let the engine's pool keep at least ``connections`` connections open (it never shrinks).

    A worker calls this as it takes on runs, so each run's progress writes and the heartbeat
    thread never wait for a connection, and never pay for opening one (an overflow connection
    is closed when given back). SQLAlchemy's QueuePool cannot be resized through its public
    API; this grows its queue and its overflow allowance together, under the pool's own lock.
    """
    from sqlalchemy.pool import QueuePool

    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return
    lock, queue = getattr(pool, "_overflow_lock", None), getattr(pool, "_pool", None)
    if lock is None or not hasattr(queue, "maxsize") or not hasattr(pool, "_overflow"):
        return  # another SQLAlchemy: keep the size it was made with
    with lock:
        grow = connections - queue.maxsize
        if grow > 0:
            queue.maxsize += grow
            pool._overflow -= grow


class HeldConnection:
    """One pooled connection kept between the single writes of one owner (an audit run), so a
    heartbeat skips the pool's checkout and return: about a third of a beat's own time on SQLite.

    Not thread-safe: the owner serialises its writes (a run's lock). ``close`` gives the
    connection back to the pool; a connection found dead is dropped and replaced on next use.
    A PostgreSQL connection stays in autocommit while it is held (each switch is a call through
    the driver's lock and the watchdog: two of a beat's three), and leaves it when given back.
    """

    __slots__ = ("pooled", "driver", "autocommit")

    def __init__(self):
        self.pooled = None
        #: ``pooled.driver_connection``, looked up once: the lookup was a tenth of a beat's Python.
        self.driver = None
        self.autocommit = False  # the held PostgreSQL connection was switched to autocommit

    def hold(self, pooled) -> None:
        self.pooled, self.driver, self.autocommit = pooled, pooled.driver_connection, False

    def close(self) -> None:
        pooled, driver, autocommit = self.pooled, self.driver, self.autocommit
        self.pooled, self.driver, self.autocommit = None, None, False
        if pooled is not None:
            if autocommit and pooled.is_valid and not driver.closed:
                with contextlib.suppress(Exception):  # as the pool's other users expect it
                    driver.autocommit = False
            pooled.close()

    def drop(self) -> None:
        """Close the connection for good (it points at a database that is no longer there)."""
        if self.pooled is not None:
            self.pooled.invalidate()
        self.close()


class PreparedWrite:
    """A statement with its parameters in the driver's form, for ``single_write``: built once and
    sent many times (a run's heartbeat, whose lease never changes). Building the parameters cost
    a tenth of a SQLite heartbeat's time."""

    __slots__ = ("sql", "values", "error_class", "postgres")

    def __init__(self, engine: Engine, statement, parameters: dict):
        self.sql, arguments = driver_form(engine, statement)
        self.values = arguments(parameters)
        self.error_class, self.postgres = _driver_facts(engine)


def single_write(engine: Engine, statement, parameters: dict | None = None, *, held: HeldConnection | None = None,
                 timeout: float | None = None) -> int:
    """Run one writing statement on its own, committed as it runs; return its row count.

    One round trip: no BEGIN, no COMMIT (autocommit on PostgreSQL; on SQLite a lone statement
    is its own transaction and waits on the busy timeout for the write lock), and no pre-ping.
    A pooled connection found dead when used (the server restarted, a proxy dropped it) is
    replaced and the write retried: the statement never ran on the dead one. A restart cuts the
    pool's idle connections too, so the retries go on past each of those to a fresh connection
    (the pre-ping a worker's engine skips, paid only after an error).

    The statement is compiled once per engine and sent through the driver's own cursor:
    SQLAlchemy's per-call bookkeeping cost about five times the database's work for these
    one-row writes (issue 13). Its parameters must need no conversion (send JSON as text).
    ``statement`` may be a ``PreparedWrite`` (then ``parameters`` is not given). With ``held``,
    the connection stays checked out between calls (see ``HeldConnection``).

    ``timeout`` (PostgreSQL) bounds the whole call, a connection it has to open included (down to
    libpq's 2 s minimum for that): a write whose server stopped answering fails after it
    (``auditctl.watchdog``), and is not retried.
    """
    limit_at = None if timeout is None else time.monotonic() + timeout
    if type(statement) is PreparedWrite:
        sql, values, error_class, postgres = statement.sql, statement.values, statement.error_class, statement.postgres
    else:
        sql, arguments = driver_form(engine, statement)
        values = arguments(parameters or {})
        error_class, postgres = _driver_facts(engine)
    retries = None  # set at the first dead connection
    while True:
        pooled = held.pooled if held is not None else None
        if pooled is None:
            try:
                with connect_within(None if limit_at is None else limit_at - time.monotonic()):
                    pooled = engine.raw_connection()
            except error_class as exc:
                raise database_error(_wrapped(engine, sql, values, exc, invalidated=False), engine, writing=True) from None
            if held is not None:
                held.hold(pooled)
        driver = held.driver if held is not None else pooled.driver_connection
        try:
            if postgres and (held is None or not held.autocommit):
                driver.autocommit = True
                if held is not None:
                    held.autocommit = True
            if postgres and limit_at is not None and getattr(driver, "call_timeout", None) is not None:
                # What is left of the budget once connected (a moment, at least: the statement is sent).
                left = max(0.1, limit_at - time.monotonic())
                default, driver.call_timeout = driver.call_timeout, min(driver.call_timeout, left)
                try:
                    cursor = driver.execute(sql, values)
                finally:
                    driver.call_timeout = default
            else:
                cursor = driver.execute(sql, values)
            count = cursor.rowcount
            cursor.close()
            if postgres and held is None and not driver.closed:  # closed: its deadline passed as the answer came in
                driver.autocommit = False
        except error_class as exc:
            dead = engine.dialect.is_disconnect(exc, driver, None)
            # A call past its deadline may have reached the server: its budget is spent, no retry.
            timed_out = getattr(driver, "TimedOut", None)
            timed_out = bool(timed_out and isinstance(exc, timed_out))
            if dead:
                if retries is None:
                    retries = _idle_connections(engine) + 1  # each may be as dead, then one fresh
                pooled.invalidate(exc)
            _give_back(pooled, held, driver if postgres else None)
            if dead and retries and not timed_out:
                retries -= 1
                continue
            raise database_error(_wrapped(engine, sql, values, exc, invalidated=dead), engine, writing=True) from None
        except BaseException:
            _give_back(pooled, held, driver if postgres else None)  # interrupted (Ctrl-C): nothing leaks
            raise
        if held is None:
            pooled.close()  # back to the pool
        return count


def _idle_connections(engine: Engine) -> int:
    """How many connections wait in the engine's pool (0 for a pool that keeps none)."""
    return _pool_count(engine, "checkedin")


def _pool_count(engine: Engine, which: str) -> int:
    """The pool's ``checkedin()`` or ``checkedout()`` (0 for a pool that counts neither)."""
    count = getattr(engine.pool, which, None)
    return count() if callable(count) else 0


def _give_back(pooled, held: HeldConnection | None, postgres_driver) -> None:
    """After a failed single write: the connection back to the pool, or dropped when it is dead."""
    if pooled.is_valid and postgres_driver is not None:
        with contextlib.suppress(Exception):
            postgres_driver.autocommit = False
        if held is not None:
            held.autocommit = False
    if held is None:
        pooled.close()
    elif not pooled.is_valid:
        held.close()  # dead: back to the pool, which opens a fresh one next time


def _driver_facts(engine: Engine) -> tuple[type[Exception], bool]:
    """The driver's base error class, and whether the engine is PostgreSQL's."""
    return engine.dialect.loaded_dbapi.Error, engine.dialect.name == "postgresql"


def driver_form(engine: Engine, statement):
    """``(sql, arguments)`` for sending ``statement`` on this engine's driver. Compiled once per engine."""
    forms = engine.__dict__.setdefault("_auditctl_driver_forms", {})
    if statement not in forms:
        compiled = statement.compile(dialect=engine.dialect)
        fixed = compiled.construct_params(_check=False)  # the statement's own literals; the rest come per call
        if compiled._bind_processors:
            raise TypeError("single_write takes statements whose parameters need no conversion by SQLAlchemy")
        if compiled.positional:
            order = compiled.positiontup
            forms[statement] = (compiled.string,
                                lambda given: tuple(given[name] if name in given else fixed[name] for name in order))
        else:
            forms[statement] = (compiled.string, lambda given: {**fixed, **given})
    return forms[statement]


def _wrapped(engine: Engine, sql: str, values, exc: Exception, *, invalidated: bool) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError.instance(sql, values, exc, engine.dialect.loaded_dbapi.Error,
                                      connection_invalidated=invalidated, dialect=engine.dialect)


@contextlib.contextmanager
def read_connection(engine: Engine, *, strict_text: bool = False) -> Iterator[Connection]:
    """A connection for reads only. On SQLite it takes no transaction (each SELECT is its own
    snapshot, and nothing holds a lock between statements). Callers that stream keep each
    page's read short and do not hold the connection while writing out (see ``pages``).

    SQLite keeps whatever bytes another tool stored as text. Text that is not UTF-8 is read
    with replacement characters, unless ``strict_text``: then the read raises ``TextNotUtf8``
    until the first such row is met, and leniently after. Strict is the fast way (the driver's
    own decoding costs nothing, a lenient decoder about 0.45 µs per text value, a third of a
    large scan); ``keyset_pages`` uses it and reads a refused page again.
    """
    with translate_errors(engine):
        with engine.connect() as connection:
            _text_mode(connection, strict=strict_text)
            yield connection.execution_options(auditctl_read_only=True)


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _text_mode(connection: Connection, *, strict: bool) -> None:
    engine = connection.engine
    if engine.dialect.name == "sqlite":  # PostgreSQL refuses text that is not in its encoding
        strict = strict and not engine.__dict__.get("_auditctl_lenient_text")
        connection.connection.driver_connection.text_factory = str if strict else _lenient_text


def keyset_pages(engine: Engine, read_page, *, page_size: int, limit: int | None, key) -> Iterator:
    """Stream rows page by page, each page one short read fetched whole before it is handed out,
    so a slow consumer (a pipe, a terminal) never holds a transaction open.

    ``read_page(connection, size, after)`` returns up to ``size`` items after the key ``after``
    (None for the first page); ``key(item)`` is the key the next page starts after.
    """
    after, produced = None, 0
    while True:
        size = page_size if limit is None else min(page_size, limit - produced)
        if size <= 0:
            return
        try:
            with read_connection(engine, strict_text=True) as connection:
                page = read_page(connection, size, after)
        except TextNotUtf8:
            with read_connection(engine) as connection:  # the engine reads leniently now
                page = read_page(connection, size, after)
        yield from page
        produced += len(page)
        if len(page) < size:
            return
        after = key(page[-1])


#: PostgreSQL's insufficient_privilege and read_only_sql_transaction: the role, not a row.
_WRITES_REFUSED = {"42501", "25006"}
#: PostgreSQL's query_canceled: a statement_timeout, or pg_cancel_backend.
_CANCELLED = "57014"
#: PostgreSQL's lock_not_available: a lock wait past auditctl's lock_timeout.
_LOCK_NOT_AVAILABLE = "55P03"
_NOT_UTF8 = re.compile(r"Could not decode to UTF-8 column '([^']*)'")
# PostgreSQL names a missing column quoted (column "target" does not exist), qualified and unquoted
# (column audits.target does not exist), or with its table (column "target" of relation "audits" ...).
_PG_NAME = r'(?:"[^"]*"|[\w$]+)'
_MISSING_TABLE = re.compile(r"no such table|relation \"[^\"]*\" does not exist|no such column|has no column named|"
                            rf"column {_PG_NAME}(?:\.{_PG_NAME})*(?: of relation \"[^\"]*\")? does not exist")


@contextlib.contextmanager
def translate_errors(engine: Engine, *, writing: bool = False) -> Iterator[None]:
    """Turn driver errors into DatabaseUnavailable / SchemaMissing with a masked URL (``writing``:
    inside a change, where a refusal of the role's writes is ``WriteRefused``)."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise database_error(exc, engine, writing=writing) from None


def database_error(exc: sa_exc.DBAPIError, engine_or_url, *, writing: bool = False) -> Exception:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    raw = getattr(engine_or_url, "_auditctl_raw_url", None)
    original = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = scrub(original[0] if original else type(exc).__name__, url, raw)
    where = describe(engine_or_url)
    not_utf8 = _NOT_UTF8.match(detail)
    if not_utf8:
        if isinstance(engine_or_url, Engine):
            # Sticky: every later read on this engine decodes text leniently (``_text_mode``).
            engine_or_url._auditctl_lenient_text = True
        return TextNotUtf8(f"a row at {where} holds text that is not UTF-8 in column {printable(not_utf8.group(1))[:64]}; "
                           "it is read with replacement characters")
    if "unable to open database file" in detail and url.get_backend_name() == "sqlite":
        # SQLite says no more, which reads like an outage; a missing directory is the usual cause.
        path = sqlite_path(url)
        directory = _missing_directory(path) if path is not None and not os.path.exists(path) else None
        if directory is not None:  # the message names the file itself: beside it, the URL as typed
            return DatabaseMissing(_no_directory(path, directory, _shown_url(engine_or_url)))
        if path is not None and os.path.isdir(path):
            # Nor is a directory at the path an outage: retrying will not help (as SQLITE_NOTADB below).
            return NotADatabase(f"the path at {where} is a directory, not a database file; "
                                "point the database URL at auditctl's database")
        if path is not None and (problem := _access_problem(path)) is not None:
            return DatabaseUnavailable(f"database unavailable at {where}: {detail} ({problem})")
    if "file is not a database" in detail:
        # SQLite's SQLITE_NOTADB: something else is at the path. Not an outage: retrying will not help.
        return NotADatabase(f"the file at {where} is not a database ({detail}); "
                            "point the database URL at auditctl's database")
    if _MISSING_TABLE.search(detail):
        missing = SchemaMissing(f"the database at {where} has no auditctl schema, or an older one ({detail}); "
                                "run `auditctl init`")
        missing.detail = detail  # what the database said, for a caller that is itself ``init`` (migrate.upgrade)
        return missing
    if writing and (getattr(getattr(exc, "orig", None), "sqlstate", None) in _WRITES_REFUSED
                    or "attempt to write a readonly database" in detail):
        advice = ("give its role the right to change auditctl's tables, or point at a server that takes writes (not a "
                  "standby)") if url.get_backend_name() != "sqlite" else "open it read-write, as a user who may write it"
        return WriteRefused(f"the database at {where} will not let auditctl write ({detail}"
                            f"{_read_only_directory_hint(url, detail)}): {advice}")
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if sqlstate in (_CANCELLED, _LOCK_NOT_AVAILABLE) and not getattr(exc, "connection_invalidated", False):
        # The server answered: it cancelled the statement (its statement_timeout, auditctl's lock wait,
        # or an administrator's pg_cancel_backend), not an outage however it reads. Still a
        # DatabaseUnavailable: it ends a change in batches (those committed stay) and a monitor tries
        # again at its next pass.
        advice = ""
        if sqlstate == _LOCK_NOT_AVAILABLE:
            advice = ("; another transaction held a lock it needed for longer than auditctl's lock wait (a command's "
                      "--lock-wait): try again once that transaction has finished")
        elif "statement timeout" in detail and not getattr(engine_or_url, "_auditctl_own_statement_timeout", False):
            advice = ("; a statement_timeout set for the role or database (ALTER ROLE ... SET statement_timeout) is too "
                      "short for auditctl: give it a longer one in the URL (?options=-c%20statement_timeout%3D5min)")
        return DatabaseUnavailable(f"the database at {where} cancelled a statement ({detail}); its transaction was "
                                   f"rolled back{advice}")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) or getattr(exc, "connection_invalidated", False):
        refused = _LIBPQ_BAD_OPTION_VALUE.search(detail) if url.get_backend_name() != "sqlite" else None
        if refused is not None:
            # Found only on connecting (create_engine's check cannot see it), and said on every
            # connection: not an outage to wait out.
            return _value_refused(printable(refused.group(0))[:200], url, where, ConnectionSettingRefused)
        return DatabaseUnavailable(f"database unavailable at {where}: {detail}{_read_only_directory_hint(url, detail)}")
    return DatabaseRefused(f"database error at {where}: {detail}")


def _missing_directory(path: str) -> str | None:
    """The directory a SQLite file would be in, when it does not exist (not when it cannot be searched)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except FileNotFoundError:
        return directory
    except OSError:
        return None
    return None


def _access_problem(path: str) -> str | None:
    """Why this user cannot open the SQLite file at ``path`` (a directory on the way it may not
    search, the file it may not read), which SQLite says only as "unable to open database file"."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except PermissionError:
        directory = os.path.dirname(os.path.abspath(path))
        parts = directory.split(os.sep)
        for end in range(2, len(parts) + 1):  # the first one on the way from the root
            step = os.sep.join(parts[:end]) or os.sep
            if not os.access(step, os.X_OK):
                directory = step
                break
        return f"this user may not search {directory}: check its permissions, or run as a user who may"
    except OSError:
        return None
    if not stat.S_ISREG(mode):
        return None  # a directory is said otherwise; opening a FIFO would wait for a writer
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return f"this user may not read {path}: check its permissions, or run as a user who may"
    except OSError:
        return None
    return None


def _no_directory(path: str, directory: str, where: str) -> str:
    return (f"no database at {path} (from {where}), and no directory {directory} to create it in: create the "
            "directory first, or pass --database-url")


def _read_only_directory_hint(url, detail: str) -> str:
    """Why SQLite says it would write when only asked to read: a WAL database is read through the
    ``-shm`` file beside it, which SQLite must create when it is missing."""
    if url.get_backend_name() != "sqlite" or "readonly database" not in detail:
        return ""
    path = sqlite_path(url)
    if path is None or os.access(os.path.dirname(path), os.W_OK) or os.path.exists(path + "-shm"):
        return ""
    return (f" (to read a database in WAL mode SQLite creates {os.path.basename(path)}-shm beside it, and "
            f"{os.path.dirname(path)} is not writable: run as a user who may write there)")


def _shown_url(engine_or_url) -> str:
    """The URL as typed, masked."""
    return display_url(engine_or_url) if isinstance(engine_or_url, Engine) else mask_url(engine_or_url)


def describe(engine_or_url) -> str:
    """Where the database is, for messages: the URL as typed (masked), and for SQLite the absolute file."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    shown = _shown_url(engine_or_url)
    if url.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is not None and os.path.abspath(path) != shown.split("///", 1)[-1]:
            return f"{shown} ({path})"
    return shown


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
