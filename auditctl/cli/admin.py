"""``init``, ``demo``, ``config`` and ``completion``: setting up and looking at the setup."""

from __future__ import annotations

import click

from ..config import SETTINGS
from .app import cli
from .options import DURATION, common_options, echo_status, format_option, threshold_options


@cli.command()
@common_options
def init(state):
    """Create or upgrade the database schema. Safe to run any number of times."""
    from ..migrate import upgrade

    result = upgrade(state.engine)
    if result.changed:
        click.echo(f"Schema {'created' if result.before is None else 'upgraded'} at revision {result.after} "
                   f"in {state.masked_url}.")
    else:
        echo_status(state, f"Schema already at revision {result.after} in {state.masked_url}; nothing to do.", err=False)


@cli.command()
@common_options
@click.option("--force", is_flag=True, help="Add the sample fleet even if the database already holds audits.")
def demo(state, force):
    """Fill the database with a sample fleet: finished, healthy, stuck and failed audits.

    Creates the schema first if needed. Then try `auditctl scan`.
    """
    from ..demo import seed_demo
    from ..migrate import upgrade

    upgrade(state.engine)
    fleet = seed_demo(state.engine, force=force)
    stuck = sum(fleet.stuck.values())
    click.echo(
        f"Demo fleet written to {state.masked_url}: {fleet.completed} completed, {fleet.failed} failed, "
        f"{fleet.running_healthy} running and healthy, {stuck} stuck ({', '.join(fleet.stuck)}), {fleet.pending} pending.\n"
        "Next: auditctl scan"
    )


@cli.command("config")
@common_options
@threshold_options
@format_option
@click.option("--interval", type=DURATION, default="5m", envvar=SETTINGS["interval"].envvar, show_envvar=True,
              help=SETTINGS["interval"].help)
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, envvar=SETTINGS["max_attempts"].envvar,
              show_envvar=True, help=SETTINGS["max_attempts"].help)
def config_command(state, thresholds, fmt, interval, max_attempts):
    """Print the settings in force and where each came from (flag, env, file, default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    path = ctx.find_root().meta.get("auditctl.config_path")
    values = {
        "database_url": state.masked_url,
        "stale_after": thresholds.stale_after,
        "max_age": thresholds.max_age,
        "stall_after": thresholds.stall_after,
        "interval": interval,
        "max_attempts": max_attempts,
    }
    names = {
        ParameterSource.COMMANDLINE: lambda s: "flag",
        ParameterSource.ENVIRONMENT: lambda s: f"env {s.envvar}",
        ParameterSource.DEFAULT_MAP: lambda s: f"file {path}",
        ParameterSource.DEFAULT: lambda s: "default",
    }
    records = []
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        records.append({"setting": name, "value": value, "source": names.get(source, lambda s: "default")(SETTINGS[name])})
    from ..thresholds import format_duration
    from .render import Column, render

    columns = [
        Column("setting", "SETTING"),
        Column("value", "VALUE", human=lambda v: format_duration(v) if isinstance(v, float) else str(v)),
        Column("source", "SOURCE"),
    ]
    render(records, columns, fmt, title="Settings in force")
    echo_status(state, f"Config file: {path or 'none (looked at $AUDITCTL_CONFIG, then $XDG_CONFIG_HOME/auditctl/config.toml)'}")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for bash, zsh or fish.

    \b
    bash:  auditctl completion bash > ~/.local/share/bash-completion/completions/auditctl
    zsh:   auditctl completion zsh > "${fpath[1]}/_auditctl"
    fish:  auditctl completion fish > ~/.config/fish/completions/auditctl.fish
    """
    click.echo(completion_script(shell), nl=False)


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from .app import cli as group

    completer = get_completion_class(shell)(group, {}, "auditctl", "_AUDITCTL_COMPLETE")
    return completer.source()
