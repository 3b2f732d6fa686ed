"""How a change made in many batches shares SQLite's write lock with the workers.

SQLite's write lock is not fair. A writer that finds it taken sleeps in its busy handler
(``SQLITE_BUSY_SLEEPS``) and tries again when it wakes, so a recoverer that begins its next
batch at once keeps the lock from every worker asleep meanwhile, until its last batch. After a
batch, ``LockTurns`` leaves the lock free long enough for each writer that waited to wake and
take it (``lock_handover_pause``).

Those pauses cost a third of a long recovery's time, and they are wasted when nobody else
writes. So ``LockTurns`` watches whether they are used: at the start of each batch it reads
``PRAGMA data_version``, which changes when another connection has committed. While others
commit, every batch is followed by a pause. After a pause nobody used, the next comes once the
lock has been held ``SOLO_HOLD`` seconds: a writer that arrives then waits at most about that
long and one batch (well within a worker's ``WORKER_LOCK_WAIT``), and once it has taken its turn,
every batch is followed by a pause again.

A pause need not be idle: the recoverer reads, judges and builds its next batches while the lock
is free (a read takes no write lock in WAL mode), as many as the pause has time for, so the
workers get their turn and the recovery loses little time to it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from sqlalchemy.engine import Connection

log = logging.getLogger("auditctl.recovery")  # its pauses belong to the recovery's or reset's log

#: The sleeps of SQLite's busy handler between tries for a lock, in order, then the last one
#: again and again (``sqliteDefaultBusyCallback`` in SQLite's main.c; Python's ``timeout`` and
#: auditctl's ``PRAGMA busy_timeout`` use it).
SQLITE_BUSY_SLEEPS = (0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.025, 0.025, 0.025, 0.050, 0.050, 0.100)
#: Beyond its sleep, time for a woken writer to be scheduled and take the lock.
_WAKE_MARGIN = 0.010
#: How long batches may keep the lock without a pause while no other connection writes (seconds).
SOLO_HOLD = 0.5


def lock_handover_pause(held: float) -> float:
    """How long to leave SQLite's write lock free after holding it ``held`` seconds, so that every
    writer that waited meanwhile wakes and takes it before this one begins again.

    A writer that began waiting when the lock was taken has slept through the busy handler's
    schedule for ``held`` seconds; the sleep it is in then is the longest any waiter can still
    be in (the schedule never shortens), so it wakes within that sleep. A batch holding the lock
    0.2 s leaves it free 60 ms; a flat 0.1 s made recovering 10,000 audits take about 10% longer."""
    elapsed = 0.0
    for sleep in SQLITE_BUSY_SLEEPS:
        if held < elapsed + sleep:
            return sleep + _WAKE_MARGIN
        elapsed += sleep
    return SQLITE_BUSY_SLEEPS[-1] + _WAKE_MARGIN


class LockTurns:
    """The turns one run of batches gives other writers (see the module docstring)."""

    def __init__(self):
        self._free_since = time.monotonic()  # when the lock was last left free for the others
        self._last: tuple[object, int] | None = None  # (driver connection, data_version) as the last batch began
        self._others_wrote = True  # nothing known yet: as if they had

    def batch_began(self, connection: Connection) -> None:
        """Inside a batch's transaction (the lock held): note whether another connection committed
        since the last batch began. Another connection from the pool than last time counts as yes."""
        driver = connection.connection.dbapi_connection
        version = connection.exec_driver_sql("PRAGMA data_version").scalar()
        last, self._last = self._last, (driver, version)
        self._others_wrote = last is None or last[0] is not driver or last[1] != version

    def batch_committed(self, meanwhile: Callable[[float], None] | None = None) -> None:
        """Between two batches: leave the lock free if others use their turns, or if it was held
        ``SOLO_HOLD`` seconds since it was last left free.

        ``meanwhile(until)`` runs while the lock is left free, with the ``time.monotonic()`` moment
        the pause ends: the recoverer reads and builds its next batches then, which takes no write
        lock. The lock stays free at least as long as the pause, so the others get the same turn and
        the pause is not time lost."""
        held = time.monotonic() - self._free_since
        if not self._others_wrote and held < SOLO_HOLD:
            return
        pause = lock_handover_pause(held)
        began = time.monotonic()
        if meanwhile is not None:
            meanwhile(began + pause)
        used = time.monotonic() - began
        if used < pause:
            time.sleep(pause - used)
        log.debug("left the write lock free for %.0f ms (%.0f ms of it reading ahead) after holding it %.0f ms",
                  max(pause, used) * 1000, used * 1000, held * 1000)
        self._free_since = time.monotonic()
