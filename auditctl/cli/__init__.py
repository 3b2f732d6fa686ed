"""The ``auditctl`` command: the click group, the config file, and the command modules.

Commands are thin: parse options, call the library, render. A command's module is imported
only when that command runs (``group.COMMANDS``), and heavy modules (SQLAlchemy, rich,
alembic) only inside the commands that need them, so ``auditctl --help`` and tab completion
start fast.
"""

from __future__ import annotations

from .app import cli


def main() -> None:
    from ..gcpause import own_process

    own_process()
    cli(prog_name="auditctl")


__all__ = ["cli", "main"]
