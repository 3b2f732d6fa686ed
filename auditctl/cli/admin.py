"""``init``, ``demo``, ``config`` and ``completion``: setting up and looking at the setup."""

from __future__ import annotations

import click

from ..config import SETTINGS
from .app import cli
from .notify import destination_options
from .options import (DURATION, check_interval, common_options, echo_status, max_attempts_option,
                      max_resets_option, output_options, threshold_options)
from .render import echo

#: The SOURCE column is never narrower than "env " and the longest variable name, which it cannot
#: break: at 60 columns, or beside a long database URL, "AUDITCTL_DATABASE_URL" was cut in three.
_ENV_NAME_WIDTH = len("env ") + max(len(setting.envvar) for setting in SETTINGS.values())


@cli.command()
@common_options
def init(state):
    """Create or upgrade the database schema. Safe to run any number of times."""
    from ..migrate import upgrade

    result = upgrade(state.engine_for("creator"))
    if result.changed:
        echo(f"Schema {'created' if result.before is None else 'upgraded'} at revision {result.after} "
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

    engine = state.engine_for("creator")
    upgrade(engine)
    fleet = seed_demo(engine, force=force)
    stuck = sum(fleet.stuck.values())
    echo(
        f"Demo fleet written to {state.masked_url}: {fleet.completed} completed, {fleet.failed} failed, "
        f"{fleet.running_healthy} running and healthy, {stuck} stuck ({', '.join(fleet.stuck)}), {fleet.pending} pending.\n"
        "Next: auditctl scan"
    )


@cli.command("config")
@common_options
@threshold_options
@output_options
@click.option("--interval", type=DURATION, default="5m", show_default=True, envvar=SETTINGS["interval"].envvar,
              show_envvar=True, help=SETTINGS["interval"].help)
@click.option("--refresh", type=DURATION, default="1s", show_default=True, envvar=SETTINGS["refresh"].envvar,
              show_envvar=True, help=SETTINGS["refresh"].help)
@max_attempts_option(SETTINGS["max_attempts"].help)
@max_resets_option(SETTINGS["max_resets"].help)
@destination_options
def config_command(state, policy, allow_unsafe, fmt, interval, refresh, max_attempts, max_resets, destinations,
                   notify_timeout):
    """Print the settings in force and where each came from (flag, env, file, default).

    Durations are shown the same way in every format (10m, 1h30m); json adds the seconds.
    """
    from click.core import ParameterSource

    from ..thresholds import format_duration
    from .render import Column, render

    # A URL every other command would refuse is refused before this (common_options), and so are
    # thresholds below their floor (threshold_options); intervals below theirs are refused here (the
    # running audits' declared intervals need the database, which config does not read: recover and
    # watch still check those).
    check_interval(interval, allow_unsafe)
    check_interval(refresh, allow_unsafe, "refresh")
    ctx = click.get_current_context()
    path = ctx.find_root().meta.get("auditctl.config_path")
    durations = {
        "stale_after": policy.override.stale_after or policy.fleet.stale_after,
        "max_age": policy.override.max_age or policy.fleet.max_age,
        "stall_after": policy.override.stall_after or policy.fleet.stall_after,
        "interval": interval,
        "refresh": refresh,
        "lock_wait": state.lock_wait,
        "notify_timeout": notify_timeout,
    }
    from ..urls import mask_webhook

    webhooks = {f"{kind}_webhook" if kind != "webhook" else kind:  # masked: a webhook URL is a secret
                ", ".join(mask_webhook(d.url) for d in destinations if d.kind == kind) or None
                for kind in ("slack", "discord", "webhook")}
    values = {"database_url": state.masked_url, **durations, "max_attempts": max_attempts, "max_resets": max_resets,
              **webhooks}
    names = {
        ParameterSource.COMMANDLINE: lambda s: "flag",
        ParameterSource.ENVIRONMENT: lambda s: f"env {s.envvar}",
        ParameterSource.DEFAULT_MAP: lambda s: f"file {path}",
        ParameterSource.DEFAULT: lambda s: "default",
    }
    root = ctx.find_root()
    records = []
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if name == "database_url" and root.meta.get("auditctl.database_url") is not None and source != ParameterSource.COMMANDLINE:
            source = ParameterSource.COMMANDLINE
        record = {"setting": name, "value": format_duration(value, exact=True) if name in durations else value,
                  "source": names.get(source, lambda s: "default")(SETTINGS[name])}
        if name in durations:
            record["seconds"] = value
        records.append(record)
    for kind, overrides in policy.kinds:
        for name, value in overrides.as_dict().items():
            flag = getattr(policy.override, name)
            if flag is not None:  # a flag replaces the fleet's and every kind's value
                value, source = flag, f"flag (the file's {format_duration(value, exact=True)} is replaced)"
            else:
                source = f"file {path}"
            records.append({"setting": f"kinds.{kind}.{name}", "value": format_duration(value, exact=True),
                            "source": source, "seconds": value})
    from ..textsafe import printable

    # A kind's name comes from a file (one `report --suggest-thresholds` may have written): a line
    # break in it is shown escaped, so a row stays one setting.
    columns = [Column("setting", "SETTING", human=printable, fit="whole"), Column("value", "VALUE", fit="whole"),
               Column("source", "SOURCE", fit="fold", min_width=_ENV_NAME_WIDTH, shrink=1)]
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
    echo(completion_script(shell), nl=False)


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from .app import cli as group
    from .completion import register
    from .group import COMPLETE_VAR

    register()

    completer = get_completion_class(shell)(group, {}, "auditctl", COMPLETE_VAR)
    return completer.source()
