"""The click group: global options (before or after the command) and the config file in ``default_map``."""

from __future__ import annotations

import os

import click

from .. import __version__
from ..errors import ConfigError
from .group import AuditctlGroup

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def apply_config(ctx: click.Context, path: str | None) -> None:
    """Load the config file into the root's meta and the commands' ``default_map``."""
    from ..config import build_default_map, load_config_file

    root = ctx.find_root()
    try:
        values, found = load_config_file(path)
    except ConfigError as error:
        # Raised when a command runs (``common_options``), not here: `auditctl scan --help` and
        # `auditctl completion` must work while the operator fixes the file.
        root.meta["auditctl.config_error"] = str(error)
        values, found = {}, None
    else:
        root.meta.pop("auditctl.config_error", None)  # --config after the command replaces the one before
    group = root.command
    # The commands loaded so far: the one being run is among them (click resolves it first).
    params = {name: [p.name for p in command.params] for name, command in group.commands.items()}
    root.default_map = build_default_map(values, params)
    root.meta["auditctl.config_path"] = str(found) if found else None
    root.meta["auditctl.config_values"] = values
    if ctx is not root:
        # --config after the command: this command's context already took its default_map.
        ctx.default_map = root.default_map.get(ctx.info_name, {})


@click.group(cls=AuditctlGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="auditctl")
@click.option("--config", "config_path", envvar="AUDITCTL_CONFIG", show_envvar=True, metavar="PATH",
              type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML). Default: $XDG_CONFIG_HOME/auditctl/config.toml.")
@click.option("--database-url", "database_url", default=None, metavar="URL",
              help="Database URL for the command (also accepted after it; env AUDITCTL_DATABASE_URL).")
@click.option("-v", "--verbose", count=True, help="More detail; with -v errors show a traceback.")
@click.option("-q", "--quiet", is_flag=True, help="No status lines on stderr unless something changed or went wrong (stdout keeps its data).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None, verbose: int, quiet: bool) -> None:
    """Detect, recover and reset stuck security audits.

    \b
    Quick start:
      auditctl demo        fill the embedded SQLite database with a sample fleet
      auditctl scan        see what is stuck, and why
      auditctl recover     recover it (cron-safe; --dry-run to look first)
    """
    ctx.meta["auditctl.database_url"] = database_url
    ctx.meta["auditctl.verbose_global"] = verbose
    ctx.meta["auditctl.quiet_global"] = quiet
    if config_path is None and os.environ.get("AUDITCTL_CONFIG") == "":
        # Click takes an empty variable for an unset one: ``AUDITCTL_CONFIG=$UNSET`` in a cron job would
        # read the default file (or none) without a word. Refused when a command runs, as ``--config ''``
        # is; a --config after the command still names the file to read.
        ctx.meta["auditctl.config_error"] = "$AUDITCTL_CONFIG is set but empty: give a config file, or unset it"
        return
    apply_config(ctx, config_path)
