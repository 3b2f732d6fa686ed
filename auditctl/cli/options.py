"""Options shared by commands, the lazily built engine, and errors mapped to exit codes.

Exit codes (README carries the same table):

====  ===========================================================
0     success, including "nothing to do"
1     runtime error: database unreachable, schema missing, no such audit
2     usage error: bad flag, bad duration, bad config file
3     ``scan --exit-code`` found stuck audits
4     ``reset-all`` refused or declined: nothing was changed
====  ===========================================================
"""

from __future__ import annotations

import functools
import sys

import click

from ..config import SETTINGS
from ..errors import AuditctlError, ConfigError
from ..thresholds import RULE_REASONS, parse_duration

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STUCK, EXIT_REFUSED = 0, 1, 2, 3, 4
FORMATS = ("table", "json", "csv", "markdown", "plain")


class DurationType(click.ParamType):
    """``45s``, ``10m``, ``1h30m`` or seconds; a bad value is a usage error naming the option."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, param.name if param else "duration")
        except ConfigError as error:
            self.fail(str(error).split(": ", 1)[-1], param, ctx)


DURATION = DurationType()


class CliState:
    """What every command shares: settings from options, and the engine built on first use."""

    def __init__(self, database_url: str, verbose: int = 0, quiet: bool = False):
        self.database_url = database_url
        self.verbose = verbose
        self.quiet = quiet
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            from ..db import create_engine

            self._engine = create_engine(self.database_url)
        return self._engine

    @property
    def masked_url(self) -> str:
        from ..db import mask_url

        return mask_url(self.database_url)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _setting_option(name: str, *decls: str, **kwargs):
    setting = SETTINGS[name]
    return click.option(*decls, envvar=setting.envvar, show_envvar=True, help=kwargs.pop("help", setting.help), **kwargs)


def common_options(command):
    """``--database-url``, ``-v`` and ``-q`` on every command; injects ``state: CliState``."""

    @_setting_option("database_url", "--database-url", default="sqlite:///auditctl.db", show_default=True, metavar="URL",
                     help="Database URL: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB.")
    @click.option("-v", "--verbose", count=True, help="More detail; with -v errors show a traceback.")
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing unless something changed or went wrong.")
    @functools.wraps(command)
    def wrapper(*args, database_url, verbose, quiet, **kwargs):
        state = CliState(database_url, verbose=verbose, quiet=quiet)
        ctx = click.get_current_context()
        ctx.meta["auditctl.verbose"] = verbose
        ctx.call_on_close(state.close)
        return command(*args, state=state, **kwargs)

    return wrapper


def threshold_options(command):
    """``--stale-after``, ``--max-age``, ``--stall-after`` for every command that judges audits; injects ``thresholds``."""

    @_setting_option("stale_after", "--stale-after", type=DURATION, default="10m", show_default=True)
    @_setting_option("max_age", "--max-age", type=DURATION, default="30m", show_default=True)
    @_setting_option("stall_after", "--stall-after", type=DURATION, default="10m", show_default=True)
    @functools.wraps(command)
    def wrapper(*args, stale_after, max_age, stall_after, **kwargs):
        from ..thresholds import Thresholds

        thresholds = Thresholds(stale_after=stale_after, max_age=max_age, stall_after=stall_after)
        try:
            thresholds.validate()
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
        return command(*args, thresholds=thresholds, **kwargs)

    return wrapper


def format_option(command):
    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="Output format. Default: table on a terminal, plain when piped.",
    )(command)


def filter_options(command):
    """``--worker``, ``--reason``, ``--older-than``: which stuck audits a command looks at."""
    command = click.option("--older-than", type=DURATION, default=None, help="Only audits running longer than this.")(command)
    command = click.option("--reason", type=click.Choice(RULE_REASONS), default=None, help="Only audits stuck for this reason.")(command)
    command = click.option("--worker", default=None, metavar="WORKER_ID", help="Only audits held by this worker.")(command)
    return command


def echo_status(state: CliState, message: str, *, err: bool = True, force: bool = False) -> None:
    """A human status line (to stderr by default, so stdout stays data); silent under -q."""
    if state.quiet and not force:
        return
    click.echo(message, err=err)


def paint(text: str, colour: str) -> str:
    """Colour for a terminal; plain when NO_COLOR is set (click already strips it off a terminal)."""
    import os

    return text if os.environ.get("NO_COLOR") else click.style(text, fg=colour)


class AuditctlGroup(click.Group):
    """Maps library errors to one line and an exit code; a traceback only with -v."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            _fail(ctx, error, EXIT_USAGE)
        except AuditctlError as error:
            _fail(ctx, error, EXIT_ERROR)


def _fail(ctx: click.Context, error: Exception, code: int) -> None:
    verbose = _verbosity(ctx)
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    click.echo(paint(f"Error: {error}", "red"), err=True)
    ctx.exit(code)


def _verbosity(ctx: click.Context) -> int:
    # The sub-command's context (where -v was parsed) is gone by now; its meta is shared.
    return int(ctx.meta.get("auditctl.verbose", 0))
