"""Client-side deadlines for PostgreSQL calls: a server that stops answering cannot hold a worker.

``statement_timeout`` and ``lock_timeout`` are enforced by the server. A backend that is frozen
(SIGSTOP, a host paused by its hypervisor) or a network path that silently drops packets never
answers at all, and psycopg waits on the socket for ever: one such connection would block
``update_progress`` past its budget, and the heartbeat thread with it. TCP keepalives do not help
while the server's kernel still acknowledges, and a cancel request goes to the same frozen server.

So every wait on a guarded connection has a deadline. The connection class (a psycopg
``Connection`` whose ``wait`` is the one place every round trip goes through: execute, fetch,
commit, rollback) registers each wait with one watchdog thread per process. When a deadline
passes, the watchdog shuts the socket down; the blocked wait wakes at once, the connection is
closed, and the call fails with ``connection_class().TimedOut`` (an ``OperationalError``), which
the pool treats as a dead connection. A deadline fires within a second of when it is due.

An engine's deadline is longer than the server's own bound on the same call (its
``statement_timeout`` is set ``CALL_GRACE`` shorter), so a slow but living server answers first.
A worker's single writes get shorter ones (``worker.WRITE_TIMEOUT``; at most half a heartbeat
interval for a beat): such a write only waits on a row lock, and one that comes that late is worth
less than the beats of the worker's other audits. A statement already sent may still run if the
server wakes up later. Every write a worker makes is fenced by its lease, so a late one can touch
only its own audit: at worst it puts back an older progress report until the next one.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import socket
import threading
import time
from typing import Iterator

log = logging.getLogger("auditctl")

#: How much longer than the server-side timeout a call may take before it counts as no answer.
CALL_GRACE = 1.0
#: The watchdog thread looks at least this often (seconds), armed calls or not.
IDLE_TICK = 1.0


class _Watchdog:
    """One thread that shuts down the sockets of calls past their deadline.

    Arming and disarming are a dict assignment and a ``pop`` (atomic under the GIL): whichever of
    the caller and the thread pops a call's entry first owns it, so a socket is shut down only
    before its call disarms (when the answer came in at that moment, the caller closes the
    connection too). The thread wakes every
    ``IDLE_TICK``, and sooner only for a call whose deadline comes before its next look.
    """

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # held by the thread while it shuts sockets down
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, socket fd)
        self._tokens = itertools.count(1)
        self._wake_at = float("inf")
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def after_fork(self) -> None:
        """In a forked child: no thread runs there, and the parent's calls are not the child's to end."""
        self._reset()

    def arm(self, fd: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        token = next(self._tokens)
        self._armed[token] = (deadline, fd)
        if deadline < self._wake_at:
            if self._thread is None:
                self._start()
            self._wake_at = deadline
            self._wake.set()
        return token

    def disarm(self, token: int) -> bool:
        """True when the deadline passed and the socket was shut down."""
        if self._armed.pop(token, None) is not None:
            return False
        with self._lock:  # the thread took it: wait until the socket is shut, then say so
            return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._watch, name="auditctl-watchdog", daemon=True)
                thread.start()
                self._thread = thread

    def _watch(self) -> None:
        while True:
            with self._lock:
                # Cleared before the look: a call armed meanwhile sets it again and is seen at once.
                self._wake.clear()
                now = time.monotonic()
                try:
                    for token, (deadline, fd) in list(self._armed.items()):
                        if deadline <= now and self._armed.pop(token, None) is not None:
                            _shut_down(fd)
                    # Idle or not, look again within IDLE_TICK: a call armed with a later deadline then
                    # needs no wake-up (one per call cost a twentieth of a heartbeat's time).
                    self._wake_at = min([deadline for deadline, _ in list(self._armed.values())] + [now + IDLE_TICK])
                except Exception:  # noqa: BLE001 - the watchdog must outlive anything
                    log.exception("auditctl watchdog: unexpected error; it keeps watching")
                    self._wake_at = now + IDLE_TICK
                wait = max(0.0, self._wake_at - now)
            self._wake.wait(wait)


def _shut_down(fd: int) -> None:
    """Shut the socket down (both ways) without closing the caller's descriptor."""
    try:
        with socket.socket(fileno=os.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side: the wait is waking up anyway


class WaitLog:
    """The longest single wait on PostgreSQL (a round trip, or opening a connection) one thread has made
    since the log was last cleared, in seconds. A monitor reads it before it recovers anything: a long
    wait means the server was not answering, and its workers could not write meanwhile either."""

    __slots__ = ("longest",)

    def __init__(self):
        self.longest = 0.0

    def saw(self, seconds: float) -> None:
        if seconds > self.longest:
            self.longest = seconds

    def clear(self) -> None:
        self.longest = 0.0


_waits = threading.local()


def thread_waits() -> WaitLog:
    """This thread's ``WaitLog`` (connections with deadlines only: PostgreSQL engines auditctl made)."""
    log_ = getattr(_waits, "log", None)
    if log_ is None:
        log_ = _waits.log = WaitLog()
    return log_


def _noted(started: float) -> None:
    thread_waits().saw(time.monotonic() - started)


#: The shortest connect timeout libpq and psycopg accept (seconds).
MIN_CONNECT_TIMEOUT = 2
_connecting = threading.local()


@contextlib.contextmanager
def connect_within(seconds: float | None) -> Iterator[None]:
    """A new connection opened in this thread meanwhile gives up after ``seconds`` (at least
    ``MIN_CONNECT_TIMEOUT``) instead of the engine's connect timeout: a write's budget covers the
    connection it has to open too."""
    previous = getattr(_connecting, "seconds", None)
    _connecting.seconds = seconds
    try:
        yield
    finally:
        _connecting.seconds = previous


def connect_timeout(default: int | None) -> int | None:
    """The connect timeout for a connection opened now in this thread (see ``connect_within``)."""
    budget = getattr(_connecting, "seconds", None)
    if budget is None:
        return default
    shortest = max(MIN_CONNECT_TIMEOUT, math.floor(budget))
    return shortest if default is None or default <= 0 else min(int(default), shortest)


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.after_fork)


@functools.cache
def connection_class():
    """The psycopg connection class with deadlines (built on first use: psycopg is a heavy import).

    A call past its deadline raises ``connection_class().TimedOut``, a ``psycopg.OperationalError``."""
    import psycopg

    from .thresholds import format_duration

    class CallTimedOut(psycopg.OperationalError):
        def __init__(self, limit: float):
            super().__init__(f"the database did not answer within {format_duration(limit)}, so auditctl closed the connection "
                             "(a frozen server or a stalled network)")

    class DeadlineConnection(psycopg.Connection):
        """A psycopg connection whose every wait on the server ends by ``call_timeout`` seconds."""

        TimedOut = CallTimedOut
        call_timeout: float | None = None

        @classmethod
        def connect(cls, *args, **kwargs):
            started = time.monotonic()
            try:
                return super().connect(*args, **kwargs)
            finally:
                _noted(started)

        def wait(self, gen, *args, **kwargs):
            started = time.monotonic()
            try:
                return self._wait_within_deadline(gen, *args, **kwargs)
            finally:
                _noted(started)

        def _wait_within_deadline(self, gen, *args, **kwargs):
            limit = self.call_timeout
            if limit is None:
                return super().wait(gen, *args, **kwargs)
            try:
                fd = self.pgconn.socket
            except psycopg.Error:
                return super().wait(gen, *args, **kwargs)  # closed: psycopg says so in its own words
            token = None
            try:
                token = _WATCHDOG.arm(fd, limit)
                result = super().wait(gen, *args, **kwargs)
            except BaseException as error:
                if token is not None and _WATCHDOG.disarm(token):
                    self.pgconn.finish()
                    if isinstance(error, Exception):
                        raise CallTimedOut(limit) from None
                raise  # Ctrl-C, SystemExit: never turned into a database error
            if _WATCHDOG.disarm(token):
                self.pgconn.finish()  # the answer came in as the socket was shut: no later call may use it
            return result

    return DeadlineConnection
