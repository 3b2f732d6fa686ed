"""Transactions, single writes and reads: how auditctl uses a connection once it has an engine.

A change runs in a short ``write_transaction`` (retried once only when nothing can have been
committed); a worker's heartbeat and progress are ``single_write`` calls, one round trip each;
reads stream in ``keyset_pages`` so a slow consumer never holds a transaction open.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .dberrors import database_error, translate_errors
from .errors import DatabaseUnavailable, TextNotUtf8
from .textsafe import printable
from .watchdog import connect_within

log = logging.getLogger(__name__)


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
                    retries = idle_connections(engine) + 1  # each may be as dead, then one fresh
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


def idle_connections(engine: Engine) -> int:
    """How many connections wait in the engine's pool (0 for a pool that keeps none)."""
    return pool_count(engine, "checkedin")


def pool_count(engine: Engine, which: str) -> int:
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
