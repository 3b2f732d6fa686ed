"""Module lists: what a command imports, and a process that imports exactly that.

    python imports.py capture OUT -- scan --format json --database-url URL
        runs ``auditctl`` with those arguments and writes, at exit, every module in
        ``sys.modules`` in the order it was first imported;
    python imports.py floor LIST
        imports every module of LIST and exits: the import floor of the command.

``rawscan.py`` uses ``load`` to import the same list without auditctl's own modules.
"""

from __future__ import annotations

import importlib
import sys

#: Names in sys.modules that are not modules one can (or should) import by name.
_SKIP = ("__main__", "__mp_main__")


def load(path: str, *, without: tuple[str, ...] = ()) -> int:
    """Import every module named in ``path`` (one a line), except those under ``without``; returns how many."""
    count = 0
    with open(path) as names:
        for name in names.read().split():
            if name in _SKIP or name.split(".")[0] in without:
                continue
            try:
                importlib.import_module(name)
                count += 1
            except Exception:  # noqa: BLE001 - a module only its parent can import (rare): skipped alike on every run
                pass
    return count


def _capture(out: str, argv: list[str]) -> None:
    import atexit

    def dump():
        with open(out, "w") as listing:
            listing.write("\n".join(name for name in list(sys.modules) if name not in _SKIP) + "\n")

    atexit.register(dump)
    sys.argv = ["auditctl", *argv]
    from auditctl.cli import main

    main()


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        _capture(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
    elif sys.argv[1] == "floor":
        load(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
