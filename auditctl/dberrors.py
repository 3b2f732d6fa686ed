"""Database errors in human words: what the driver said, turned into one of auditctl's errors
with the URL masked and, where it helps, what to do."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from .dburl import LIBPQ_BAD_OPTION_VALUE, display_url, sqlite_path, value_refused
from .errors import (ConnectionSettingRefused, DatabaseMissing, DatabaseRefused, DatabaseUnavailable, NotADatabase,
                     SchemaMissing, TextNotUtf8, WriteRefused)
from .textsafe import printable
from .urls import mask_url, scrub

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
        directory = missing_directory(path) if path is not None and not os.path.exists(path) else None
        if directory is not None:  # the message names the file itself: beside it, the URL as typed
            return DatabaseMissing(no_directory_message(path, directory, _shown_url(engine_or_url)))
        if path is not None and os.path.isdir(path):
            # Nor is a directory at the path an outage: retrying will not help (as SQLITE_NOTADB below).
            return NotADatabase(f"the path at {where} is a directory, not a database file; "
                                "point the database URL at auditctl's database")
        if path is not None and (problem := access_problem(path)) is not None:
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
        refused = LIBPQ_BAD_OPTION_VALUE.search(detail) if url.get_backend_name() != "sqlite" else None
        if refused is not None:
            # Found only on connecting (create_engine's check cannot see it), and said on every
            # connection: not an outage to wait out.
            return value_refused(printable(refused.group(0))[:200], url, where, ConnectionSettingRefused)
        return DatabaseUnavailable(f"database unavailable at {where}: {detail}{_read_only_directory_hint(url, detail)}")
    return DatabaseRefused(f"database error at {where}: {detail}")


def missing_directory(path: str) -> str | None:
    """The directory a SQLite file would be in, when it does not exist (not when it cannot be searched)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except FileNotFoundError:
        return directory
    except OSError:
        return None
    return None


def access_problem(path: str) -> str | None:
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


def no_directory_message(path: str, directory: str, where: str) -> str:
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
