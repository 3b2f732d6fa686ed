"""Setting a ``threading.Event`` from a signal handler.

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
import threading


def set_from_handler(event: threading.Event) -> None:
    """``event.set()``, safe to call from a signal handler."""
    _thread.start_new_thread(event.set, ())
