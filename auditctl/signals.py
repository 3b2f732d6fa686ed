"""Signal handling the library shares: setting a ``threading.Event`` from a handler, and holding
Ctrl-C and SIGTERM back across the moment between a commit and counting it.

Setting a ``threading.Event`` from a signal handler:

A handler runs in the main thread between two of its bytecodes, and that thread may hold the
event's lock at that very moment (it was inside ``set`` or ``wait`` itself). The lock is not
reentrant, so a handler calling ``event.set()`` then waits for ever: a second Ctrl-C landing
inside the first one's ``set`` hung ``auditctl watch`` for good, deaf to every later signal.
``set_from_handler`` hands the call to a new low-level thread, which takes no lock the
interrupted thread can hold, and returns at once; the event is set as soon as the main thread
lets go of its lock.
"""

from __future__ import annotations

import _thread
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


def set_from_handler(event: threading.Event) -> None:
    """``event.set()``, safe to call from a signal handler."""
    _thread.start_new_thread(event.set, ())


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: only where watch handles it


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM (and SIGHUP where a command handles it: ``watch``) wait until the block
    ends, then act as they would have.

    For the moment between a batch's COMMIT and counting it: a ``KeyboardInterrupt`` raised in
    between left the batch changed in the database but missing from what the interruption
    reported. A second signal while one waits acts at once (the operator insists: a COMMIT
    that hangs must not make the command deaf). Only Python handlers are held (``SIG_DFL`` and
    ``SIG_IGN`` are left as they are), and only in the main thread, where handlers run.

    For a process auditctl owns (a command's batches). A worker's guard lives in someone else's
    program, whose own SIGINT handler it must leave alone, and holds nested writes under its own
    SIGTERM handler: it keeps its own hold (``StuckAuditPrevention._holding_signals``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    waiting: list[int] = []
    previous = {}

    def hold(signum, frame):
        if waiting:
            previous[signum](signum, frame)
        waiting.append(signum)

    for signum in _HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = handler
            signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if waiting:
            previous[waiting[0]](waiting[0], None)
