"""The database URL: parsed, checked against what its driver takes, and shown masked.

A URL is checked before any connection: a SQLite URL with two slashes, a password whose ``@`` is
not percent-encoded, an option neither SQLite nor libpq takes, a value libpq refuses. Each is a
``ConfigError`` (a usage error) here, where a connection would fail later with a runtime error
that ``watch`` would retry as an outage for good.
"""

from __future__ import annotations

import functools
import math
import os
import re

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url, URL

from .errors import ConfigError
from .textsafe import printable
from .urls import mask_unread_url, mask_url, scrub

#: The drivers auditctl ships and tests, per database.
_DRIVERS = {"sqlite": ("pysqlite",), "postgresql": ("psycopg",)}
#: Query parameters of a SQLite URL that belong to SQLite's own URI filenames.
SQLITE_URI_PARAMS = ("mode", "cache", "immutable", "nolock", "psow", "vfs", "modeof")
#: What the sqlite3 driver itself takes from a URL's query string (SQLAlchemy's pysqlite dialect).
_SQLITE_DRIVER_PARAMS = ("timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements", "uri")


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


def statement_timeout_ms(options: str) -> float | None:
    """The last ``statement_timeout`` libpq ``options`` set, in milliseconds (0: none); None when
    they set none, infinity for one this cannot read (taken as longer than any deadline)."""
    found = _STATEMENT_TIMEOUT_OPTION.findall(options)
    if not found:
        return None
    match = re.fullmatch(r"'?(\d+(?:\.\d+)?)\s*([a-z]*)'?", found[-1].lower())
    if match is None or match.group(2) not in _PG_TIME_UNITS:
        return math.inf
    return float(match.group(1)) * _PG_TIME_UNITS[match.group(2)]


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
LIBPQ_BAD_OPTION_VALUE = re.compile(r'invalid [\w ]*value "[^"]*" for connection option "[^"]*"')


def value_refused(said: str, url: URL, shown: str, error=ConfigError) -> ConfigError:
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


def check_sqlite_options(database_url, url: URL) -> None:
    """Refuse a query option neither SQLite's URI filenames nor the sqlite3 driver take."""
    unknown = sorted(set(url.query) - set(SQLITE_URI_PARAMS) - set(_SQLITE_DRIVER_PARAMS))
    if unknown:
        # SQLAlchemy would ignore them with a warning, and SQLite ignores unknown URI options.
        raise ConfigError(f"the database URL {mask_url(database_url)} has an option SQLite does not take: "
                          f"{', '.join(unknown)} (it takes {', '.join(_SQLITE_DRIVER_PARAMS + SQLITE_URI_PARAMS)})")


def check_libpq_options(database_url, url: URL) -> None:
    """Refuse a query option libpq does not take, or a value of one it refuses."""
    unknown = sorted(set(url.query) - _libpq_keywords())
    if unknown:
        # libpq would refuse them on connecting ("invalid connection option"): a runtime error that
        # ``watch`` would retry as an outage for good, and that ``config`` could not see.
        raise ConfigError(f"the database URL {_unknown_values_masked(database_url, url, unknown)} has an option "
                          f"PostgreSQL's client (libpq) does not take: {printable(', '.join(unknown))[:200]}")
    refused = _libpq_refusal(url)
    if refused is not None:
        # libpq would refuse it on every connection: not an outage for ``watch`` to wait out.
        raise value_refused(printable(scrub(refused, database_url))[:200], url, mask_url(database_url))


def display_url(engine: Engine) -> str:
    """The engine's URL as the user typed it, with the password masked."""
    return getattr(engine, "_auditctl_display_url", None) or mask_url(engine.url)
