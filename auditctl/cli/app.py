"""The click group: global options and the config file loaded into ``default_map``."""

from __future__ import annotations

import click

from .. import __version__
from ..config import build_default_map, load_config_file
from ..errors import ConfigError
from .options import AuditctlGroup

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=AuditctlGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="auditctl")
@click.option("--config", "config_path", envvar="AUDITCTL_CONFIG", show_envvar=True, metavar="PATH",
              type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML). Default: $XDG_CONFIG_HOME/auditctl/config.toml.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Detect, recover and reset stuck security audits.

    \b
    Quick start:
      auditctl demo        fill the embedded SQLite database with a sample fleet
      auditctl scan        see what is stuck, and why
      auditctl recover     recover it (cron-safe; --dry-run to look first)
    """
    try:
        values, path = load_config_file(config_path)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    params = {name: [p.name for p in command.params] for name, command in ctx.command.commands.items()}
    ctx.default_map = build_default_map(values, params)
    ctx.meta["auditctl.config_path"] = str(path) if path else None
    ctx.meta["auditctl.config_values"] = values
