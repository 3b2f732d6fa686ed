"""A SQLite file that moves: whether the file at an engine's path is still the one it opened."""

from __future__ import annotations

import logging
import os

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .db import sqlite_file, wait_ms
from .textsafe import printable
from .transactions import idle_connections, pool_count

log = logging.getLogger(__name__)


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
        if any(idle_connections(engine) or pool_count(engine, "checkedout") for engine in self.engines):
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
