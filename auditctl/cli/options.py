"""Options shared by commands, their types, and the lazily built engines (``CliState``)."""

from __future__ import annotations

import functools
import os

import click
from click.core import ParameterSource

from ..config import MAX_COUNT, SETTINGS
from ..errors import ConfigError
from ..thresholds import MIN_WATCH_INTERVAL, RULE_REASONS, parse_duration, parse_moment
from ..values import MAX_INT  # the bound of --limit (here, cli.judge, cli.views)
from .render import FORMATS, echo


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


class MomentType(click.ParamType):
    """A point in time: a duration ago (``2h``) or an ISO 8601 time (``2026-11-29T08:00Z``)."""

    name = "time"

    def convert(self, value, param, ctx):
        name = param.name if param else "time"
        try:
            return parse_moment(value, name)
        except ConfigError as error:
            self.fail(str(error).removeprefix(f"{name}: "), param, ctx)


MOMENT = MomentType()


class ListType(click.ParamType):
    """Values given several times or comma-separated; checked against ``choices`` when given."""

    name = "list"

    def __init__(self, choices: tuple[str, ...] | None = None, metavar: str = "VALUE"):
        self.choices = choices
        self.metavar = metavar

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.choices) + "]" if self.choices else self.metavar

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in (self.choices or ()) if c.startswith(incomplete)]

    def split_envvar_value(self, rv: str):
        """A variable's value whole, split on commas by ``convert`` as a flag's is: click would split it
        on whitespace first (a webhook URL holding a space became two URLs)."""
        return [rv] if rv.strip() else []

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(part.strip() for part in str(value).split(",") if part.strip())
        if not items:
            self.fail("needs a value", param, ctx)
        if self.choices:
            for item in items:
                if item not in self.choices:
                    self.fail(f"{item!r} is not one of {', '.join(self.choices)}", param, ctx)
        return items


def flatten(values) -> tuple:
    """A multiple ListType option's values as one tuple, order kept, duplicates dropped."""
    seen: dict = {}
    for group in values or ():
        for item in (group if isinstance(group, tuple) else (group,)):
            seen.setdefault(item, None)
    return tuple(seen)


class CliState:
    """What every command shares: settings from options, and engines built on first use."""

    def __init__(self, database_url: str, verbose: int = 0, quiet: bool = False, lock_wait: float | None = None):
        self.database_url = database_url
        self.verbose = verbose
        self.quiet = quiet
        self.lock_wait = lock_wait
        #: PostgreSQL: the client-side deadline of every call (``db.create_engine``); ``watch`` sets one.
        self.call_timeout: float | None = None
        self._engines: dict[str, object] = {}

    def engine_for(self, role: str):
        """The engine for a role: ``reader`` never creates or changes the database; only ``creator``
        (init, demo) may create a SQLite file that does not exist yet."""
        if role not in self._engines:
            from ..db import create_engine

            wait = self.lock_wait if role in ("operator", "creator") else None
            if role == "creator":
                self._engines[role] = create_engine(self.database_url, role="operator", must_exist=False, lock_wait=wait,
                                                    call_timeout=self.call_timeout)
            else:
                self._engines[role] = create_engine(self.database_url, role=role, must_exist=True, lock_wait=wait,
                                                    call_timeout=self.call_timeout)
            from ..gcpause import started

            started()
        return self._engines[role]

    @property
    def engine(self):
        """The operator's engine (commands that change audits)."""
        return self.engine_for("operator")

    @property
    def reader(self):
        """The read-only engine (scan, list, show, workers)."""
        return self.engine_for("reader")

    @property
    def masked_url(self) -> str:
        """The URL for status lines: its password masked, and its control and bidi characters shown
        escaped (a path is free to hold them; the terminal must not act on them)."""
        from ..textsafe import printable
        from ..urls import mask_url

        return printable(mask_url(self.database_url))

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()


def _setting_option(name: str, *decls: str, **kwargs):
    setting = SETTINGS[name]
    return click.option(*decls, envvar=setting.envvar, show_envvar=True, help=kwargs.pop("help", setting.help), **kwargs)


def _load_config_here(ctx: click.Context, _param, value):
    """``--config`` after the command: read the file now, before the other options take their defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    from .app import apply_config

    apply_config(ctx, value)
    return value


def common_options(command):
    """``--database-url``, ``--config``, ``-v`` and ``-q`` on every command (also accepted before
    the command name); injects ``state: CliState``."""

    @_setting_option("database_url", "--database-url", default="sqlite:///auditctl.db", show_default=True, metavar="URL",
                     help="Database URL: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB.")
    @click.option("--config", "config_path", metavar="PATH", type=click.Path(dir_okay=False), default=None, is_eager=True,
                  expose_value=False, callback=_load_config_here, help="Config file (TOML), as with `auditctl --config`.")
    @click.option("-v", "--verbose", count=True, help="More detail; with -v errors show a traceback.")
    @click.option("-q", "--quiet", is_flag=True, help="No status lines on stderr unless something changed or went wrong (stdout keeps its data).")
    @_setting_option("lock_wait", "--lock-wait", type=DURATION, default="30s", show_default=True,
                     help="Longest a change waits for a database lock (SQLite's write lock, a PostgreSQL row lock).")
    @functools.wraps(command)
    def wrapper(*args, database_url, verbose, quiet, lock_wait, **kwargs):
        ctx = click.get_current_context()
        root = ctx.find_root()
        if root.meta.get("auditctl.config_error"):
            raise click.UsageError(root.meta["auditctl.config_error"])
        # Given before the command name, a global option counts as given on the command line,
        # unless it is given again after it.
        # An empty one is given too (``--database-url "$UNSET"`` in a cron job): refused below, never
        # replaced by the environment's database.
        if root.meta.get("auditctl.database_url") is not None and ctx.get_parameter_source("database_url") != ParameterSource.COMMANDLINE:
            database_url = root.meta["auditctl.database_url"]
        elif (ctx.get_parameter_source("database_url") != ParameterSource.COMMANDLINE
              and os.environ.get(SETTINGS["database_url"].envvar) == ""):
            # Click takes an empty variable for an unset one: ``AUDITCTL_DATABASE_URL=$UNSET`` in a cron
            # job would then work on ./auditctl.db (or the config file's database) without a word.
            raise click.UsageError(f"${SETTINGS['database_url'].envvar} is set but empty: give a database URL, or unset it")
        refuse_empty_variables(ctx)
        _check_database_url(ctx, database_url)
        verbose += root.meta.get("auditctl.verbose_global", 0)
        quiet = quiet or root.meta.get("auditctl.quiet_global", False)
        state = CliState(database_url, verbose=verbose, quiet=quiet, lock_wait=lock_wait)
        ctx.meta["auditctl.verbose"] = verbose
        ctx.meta["auditctl.state"] = state
        ctx.call_on_close(state.close)
        return command(*args, state=state, **kwargs)

    return wrapper


#: What an empty variable should have held, by the kind of setting (``config.Setting.kind``).
_WANTED = {"duration": "a duration such as 10m", "count": "a whole number", "count0": "a whole number",
           "urls": "a webhook URL", "url": "a database URL"}


def refuse_empty_variables(ctx: click.Context) -> None:
    """An ``AUDITCTL_*`` variable of this command's options that is set but empty (or blank) is a usage
    error naming it: click takes an empty variable for an unset one, so ``AUDITCTL_STALE_AFTER=$UNSET``
    in a cron job would judge audits by the config file's value or the default without a word. An
    option given on the command line wins, and its variable is not read at all."""
    for param in ctx.command.params:
        envvar = getattr(param, "envvar", None)
        if not isinstance(envvar, str) or not envvar.startswith("AUDITCTL_") or param.name == "database_url":
            continue  # the database URL has its own line (common_options), which knows the global flag
        value = os.environ.get(envvar)
        if value is None or value.strip() or ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            continue
        setting = SETTINGS.get(param.name)
        wanted = _WANTED.get(setting.kind, "a value") if setting is not None and setting.envvar == envvar else "a value"
        raise click.UsageError(f"${envvar} is set but empty: give {wanted}, or unset it")


def _check_database_url(ctx: click.Context, database_url: str) -> None:
    """A database URL no database can be named by (bytes that are not UTF-8, which Python keeps as
    lone surrogates), or that no engine takes, is a usage error naming how it was given, before any
    engine exists: otherwise ``init`` would create a file by that name and every other command refuse it."""
    from ..values import storable_text

    # Given before the command, on the group: the flag (the command's own context knows nothing of it).
    given_first = ctx.find_root().meta.get("auditctl.database_url") is not None
    where = "--database-url" if given_first else given_as("database_url", ctx)
    try:
        storable_text(where, database_url)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    # The URL itself (its database, its options), said with where it came from, before anything
    # looks for the file: a bad option is the same usage error whether or not the file exists.
    from ..db import create_engine

    try:
        create_engine(database_url, role="reader", must_exist=False).dispose()
    except ConfigError as error:
        if given_first or where == "--database-url":
            raise  # typed on this command line: the message quotes it
        raise ConfigError(f"{where}: {error}") from None


def threshold_options(command):
    """``--stale-after``, ``--max-age``, ``--stall-after`` and ``--unsafe-thresholds`` for the commands
    that judge audits; injects ``policy`` (a ``thresholds.Policy``) and ``allow_unsafe``.

    Given on the command line, a threshold overrides every audit's own; from the environment,
    the config file or the default, it is the fleet's value, for audits that declare none.
    """

    @_setting_option("stale_after", "--stale-after", type=DURATION, default="10m", show_default=True)
    @_setting_option("max_age", "--max-age", type=DURATION, default="30m", show_default=True)
    @_setting_option("stall_after", "--stall-after", type=DURATION, default="10m", show_default=True)
    @click.option("--unsafe-thresholds", "allow_unsafe", is_flag=True,
                  help="Accept a stale threshold below 1s or below twice the audits' heartbeat interval, "
                       "and a watch --interval or --refresh below 100ms.")
    @functools.wraps(command)
    def wrapper(*args, stale_after, max_age, stall_after, allow_unsafe, **kwargs):
        from ..thresholds import Overrides, Policy, Thresholds

        ctx = click.get_current_context()
        given = {name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
                 for name in ("stale_after", "max_age", "stall_after")}
        values = {"stale_after": stale_after, "max_age": max_age, "stall_after": stall_after}
        fleet_values = {name: (value if not given[name] else _fleet_value(ctx, name)) for name, value in values.items()}
        try:
            fleet = Thresholds(**fleet_values)
            override = Overrides(**{name: value for name, value in values.items() if given[name]})
            # The thresholds in force must agree, however each was given; a value a flag replaces
            # (the environment's, the file's) is not in force, so it is not checked.
            Thresholds(**values).validate()
        except ConfigError as error:
            sources = [given_as(name) for name in values if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
            raise click.UsageError(str(error) + (f" (given as {', '.join(sources)})" if sources else "")) from None
        kinds = ctx.find_root().meta.get("auditctl.config_values", {}).get("kinds", {})
        try:
            policy = Policy.of(fleet, override, kinds)  # a kind's values checked against those in force beside them
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
        # The floor (``thresholds.MIN_STALE_AFTER``) holds for every command that takes thresholds, here,
        # before any of them runs: report and reset-all once took what scan, recover and watch refuse.
        check_floors(policy, allow_unsafe)
        return command(*args, policy=policy, allow_unsafe=allow_unsafe, **kwargs)

    return wrapper


def _fleet_value(ctx: click.Context, name: str) -> float:
    """The value a threshold would have without the flag: env, then config file, then default."""
    import os

    from ..thresholds import DEFAULT_MAX_AGE, DEFAULT_STALE_AFTER, DEFAULT_STALL_AFTER

    env = os.environ.get(SETTINGS[name].envvar)
    if env:
        try:
            return parse_duration(env, name)
        except ConfigError:
            pass
    from_file = (ctx.default_map or {}).get(name)
    if from_file is not None:
        return parse_duration(from_file, name)
    return {"stale_after": DEFAULT_STALE_AFTER, "max_age": DEFAULT_MAX_AGE, "stall_after": DEFAULT_STALL_AFTER}[name]


def check_bounds(state: CliState, policy, allow_unsafe: bool, filters=None) -> None:
    """Refuse thresholds that would fail healthy audits (usage error, exit 2): of the audits
    ``filters`` (workers, kinds) name, when given."""
    from ..rules import check_against_running
    from ..thresholds import UnsafeThreshold

    check_floors(policy, allow_unsafe)
    if allow_unsafe:
        return
    try:
        check_against_running(state.reader, policy, filters)
    except UnsafeThreshold as error:
        raise click.UsageError(str(error)) from None


def check_floors(policy, allow_unsafe: bool) -> None:
    """Refuse a stale threshold below its floor (usage error, exit 2), without the database: done for
    every command by ``threshold_options``, and again as the first step of ``check_bounds``."""
    from ..thresholds import UnsafeThreshold

    try:
        policy.check_bounds([], allow_unsafe=allow_unsafe)
    except UnsafeThreshold as error:
        raise click.UsageError(str(error)) from None


def given_as(name: str, ctx: click.Context | None = None) -> str:
    """How the operator gave a setting, for a message: its flag, its variable, or its key in the file."""
    option = "--" + name.replace("_", "-")
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    if source == ParameterSource.ENVIRONMENT and name in SETTINGS:
        return f"{option} (${SETTINGS[name].envvar})"
    if source == ParameterSource.DEFAULT_MAP:
        return f"{name} in the config file {ctx.find_root().meta.get('auditctl.config_path')}"
    return option


def check_interval(interval: float, allow_unsafe: bool, name: str = "interval") -> None:
    if interval < MIN_WATCH_INTERVAL and not allow_unsafe:
        from ..thresholds import format_duration

        raise click.UsageError(f"{given_as(name)}: {format_duration(interval)} is below the floor of "
                               f"{format_duration(MIN_WATCH_INTERVAL)}; pass --unsafe-thresholds to use it anyway")


class LimitCut:
    """A listing under ``--limit`` (0: no limit) that knows whether the limit cut it: the library is
    asked for one item more (``asked``), and ``cut`` says whether it was there, so a list the
    stuck or matching audits merely fill is not reported as cut."""

    def __init__(self, limit: int):
        self.limit = limit
        self.asked = None if not limit else (limit + 1 if limit < MAX_INT else limit)
        self.cut = False

    def __call__(self, items):
        for shown, item in enumerate(items):
            if self.limit and shown == self.limit:
                self.cut = True
                return
            yield item


def output_options(command):
    """``-o/--format`` and ``--wide`` for every listing; injects ``fmt``."""

    @click.option("-o", "--format", "fmt", type=click.Choice(FORMATS), default=None,
                  help="Output format. Default: table on a terminal, plain when piped.")
    @click.option("--wide", is_flag=True, help="Every column on one line, nothing cut (same as -o wide).")
    @functools.wraps(command)
    def wrapper(*args, fmt, wide, **kwargs):
        if wide:
            if fmt not in (None, "table", "wide", "plain"):
                raise click.UsageError(f"--wide goes with the table and plain formats, not --format {fmt}")
            fmt = "wide"
        return command(*args, fmt=fmt, **kwargs)

    return wrapper


def judge_filter_options(command):
    """``--worker``, ``--reason``, ``--kind``, ``--target``, ``--older-than``, ``--since``, ``--until``:
    which stuck audits a command looks at. Repeated and comma-separated values are unions."""
    options = [
        click.option("--until", type=MOMENT, default=None, help="Only audits created before this (2h = two hours ago, or ISO time)."),
        click.option("--since", type=MOMENT, default=None, help="Only audits created after this (2h = two hours ago, or ISO time)."),
        click.option("--older-than", type=DURATION, default=None, help="Only audits running longer than this."),
        click.option("--target", "targets", type=ListType(metavar="GLOB"), multiple=True,
                     help="Only targets matching this glob (*, ?, [..]); repeatable, comma-separated."),
        click.option("--kind", "kinds", type=ListType(metavar="KIND"), multiple=True, help="Only audits of this kind; repeatable, comma-separated."),
        click.option("--reason", "reasons", type=ListType(RULE_REASONS), multiple=True,
                     help="Only audits stuck for this reason; repeatable, comma-separated."),
        click.option("--worker", "workers", type=ListType(metavar="WORKER_ID"), multiple=True,
                     help="Only audits held by this worker; repeatable, comma-separated."),
    ]
    for option in options:
        command = option(command)

    @functools.wraps(command)
    def wrapper(*args, workers, reasons, kinds, targets, older_than, since, until, **kwargs):
        from ..rules import Filters

        filters = Filters(workers=flatten(workers), reasons=flatten(reasons), kinds=flatten(kinds),
                          targets=flatten(targets), older_than=older_than, since=since, until=until)
        return command(*args, filters=filters, **kwargs)

    return wrapper


def echo_status(state: CliState, message: str, *, err: bool = True, force: bool = False) -> None:
    """A human status line (to stderr by default, so stdout stays data); silent under -q."""
    if state.quiet and not force:
        return
    echo(message, err=err)


def refuse_without_requeue(requeue: bool, *, recovering: bool = True) -> None:
    """``--max-attempts`` typed without ``--requeue`` (or ``--requeue`` with ``--no-recover``) would do
    nothing: say so rather than run as if it had been heard. From the environment or the config
    file they are fleet settings, and stay quiet."""
    ctx = click.get_current_context()
    typed = {name for name in ("requeue", "max_attempts") if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if not recovering and ("max_attempts" in typed or (requeue and "requeue" in typed)):
        flag = "--requeue" if requeue and "requeue" in typed else "--max-attempts"
        raise click.UsageError(f"{flag} does nothing with --no-recover: nothing is recovered")
    if not requeue and "max_attempts" in typed:
        raise click.UsageError("--max-attempts counts the claims of requeued audits: give --requeue too, or leave it out")


def max_attempts_option(help: str = "With --requeue: after this many claims an audit fails for good."):
    """``--max-attempts`` (env, config file), bounded by what the database's integer column holds."""
    return click.option("--max-attempts", type=click.IntRange(1, MAX_COUNT), default=3, show_default=True,
                        envvar=SETTINGS["max_attempts"].envvar, show_envvar=True, help=help)


def max_resets_option(help: str = "Leave alone an audit already reset this many times (0: no limit)."):
    """``--max-resets`` (env, config file), bounded by what the database's integer column holds."""
    return click.option("--max-resets", type=click.IntRange(0, MAX_COUNT), default=5, show_default=True,
                        envvar=SETTINGS["max_resets"].envvar, show_envvar=True, help=help)
