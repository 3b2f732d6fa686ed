"""Sparing Python's cyclic garbage collector work it does for nothing.

``paused_collector``: the collector waits while a large result is built. Building thousands of
objects that all stay alive (a page of rows and their verdicts) makes the collector run again
and again, each time over more of the heap, for nothing: none of them is garbage yet. At 10,000
stuck audits that was a quarter of a scan's time. Mercurial pauses the collector the same way
(``util.nogc``) while it builds large structures.

- Reference counting goes on; only the search for reference cycles waits.
- A pause never spans a round trip to a server or a wait for a lock: in a worker, the
  application's own collector would wait with it. (On SQLite, turning a page's rows into
  verdicts also steps the statement: that is this process's own work, not a wait.)
- The switch is process-wide, so pauses on several threads share it: the collector is switched
  on again when the last one ends, and only if it was on when the first began. An application
  that switches it off itself while a pause is under way finds it on again after.
- A child forked during a pause starts with the collector as the pause found it.

``listing_pause``: in the ``auditctl`` process only, the collector also waits through a whole
listing (``cli.render``), its page reads included: each record makes a dozen containers that are
garbage as soon as it is written, so the collections they set off find nothing (about 25 ms of a
10,000-record ``scan --format json``). That process holds no application whose collector would
wait with it. A listing makes no reference cycles, so its memory stays as it was.

``own_process`` and ``started``: in the ``auditctl`` process (not in an application using the
library, nor under a test runner), what exists once the first engine is made (the modules,
their classes, the engine) lives until the process ends. ``gc.freeze`` moves it out of the
collector's sight, so each full collection no longer walks the whole of SQLAlchemy and click:
one such walk was 16 ms of a 0.5 s ``scan --format json``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from typing import Iterator

_lock = threading.Lock()
_pauses = 0
_was_enabled = False
_held = threading.local()  # this thread's pauses under way: the one a forked child keeps


@contextlib.contextmanager
def paused_collector() -> Iterator[None]:
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def _after_fork_in_child() -> None:
    """Only the forking thread lives on in a child: the pauses of the others never end there, and
    the lock may have been held by one of them."""
    global _lock, _pauses
    inherited = _pauses
    _lock, _pauses = threading.Lock(), getattr(_held, "depth", 0)
    if inherited and not _pauses and _was_enabled:
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_owns_process = False
_frozen = False


def own_process() -> None:
    """Called by the ``auditctl`` entry point: this process is the command's own."""
    global _owns_process
    _owns_process = True


def owns_process() -> bool:
    """Whether this process is the ``auditctl`` command's own (not a program that called it in-process)."""
    return _owns_process


def listing_pause():
    """``paused_collector`` for a whole listing in the command's own process; elsewhere (a program
    rendering through the library) nothing is paused."""
    return paused_collector() if _owns_process else contextlib.nullcontext()


def started() -> None:
    """Start-up is over (the first engine exists): freeze what it made, once, in the command's own process."""
    global _frozen
    with _lock:
        if _owns_process and not _frozen:
            _frozen = True
            gc.freeze()
