"""The ``auditctl`` command: the click group, the config file, and the command modules.

Commands are thin: parse options, call the library, render. Heavy modules
(SQLAlchemy, rich, alembic) are imported inside the commands that need them, so
``auditctl --help`` and tab completion start fast.
"""

from __future__ import annotations

from . import admin, judge, notify, report, serve, views, watch  # noqa: F401  (each registers its commands on the group)
from .app import cli


def main() -> None:
    cli(prog_name="auditctl")


__all__ = ["cli", "main"]
