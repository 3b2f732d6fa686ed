"""The ``auditctl`` group's class: the command table, loaded on demand, and errors mapped to exit codes.

Exit codes: ``EXIT_*`` below, explained in ``EXIT_CODES_HELP`` (the end of ``auditctl --help``)
and in README's table; a test keeps the three to the same codes.

A command's module is imported only when that command is asked for: ``auditctl --help`` and
every tab press list the commands from ``COMMANDS`` without building any of them. Building
all of them (their options, and the modules behind the options) was about a quarter of
``--help``'s start-up.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
from click.core import ParameterSource

from ..errors import AuditctlError, ConfigError, Interrupted

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STUCK, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES_HELP = """\b
Exit codes:
  0    success, including "nothing to do"
  1    runtime error: database unreachable or missing, no schema, no such audit
  2    usage error: bad flag, bad duration, unsafe threshold, bad config file
  3    scan --exit-code found stuck audits
  4    reset-all refused or declined (also Ctrl-C or Ctrl-D at its prompt)
  130  interrupted during a long operation (batches already done stay done)"""

#: Every command: the module (in ``auditctl.cli``) that defines it, and the line ``--help`` lists it with.
COMMANDS: dict[str, tuple[str, str]] = {
    "completion": ("admin", "Print the shell completion script for bash, zsh or fish."),
    "config": ("admin", "Print the settings in force and where each came from."),
    "demo": ("admin", "Fill the database with a sample fleet to try the commands on."),
    "init": ("admin", "Create or upgrade the database schema."),
    "list": ("views", "List audits, newest first."),
    "notify": ("notify", "Deliver pending alerts once (for cron), or list them."),
    "recover": ("judge", "Recover stuck audits: mark them failed, or requeue them."),
    "report": ("report", "Report what makes audits stick, and what to change."),
    "reset-all": ("judge", "Reset failed audits to pending: the incident button."),
    "scan": ("judge", "Show the stuck audits, and why each is stuck."),
    "serve": ("serve", "Serve the web dashboard."),
    "show": ("views", "Show one audit: its progress, recovery and history."),
    "watch": ("watch", "Run the heartbeat monitor in the foreground."),
    "workers": ("views", "Each worker instance: alive, silent or gone, and what it holds."),
}


def paint(text: str, colour: str) -> str:
    """Colour for a terminal; plain when NO_COLOR or TERM=dumb (click already strips it off a terminal)."""
    from .render import ascii_only

    return text if ascii_only() else click.style(text, fg=colour)


#: The variable through which a shell's completion script asks auditctl for completions.
COMPLETE_VAR = "_AUDITCTL_COMPLETE"


class AuditctlGroup(click.Group):
    """Loads each command when it is asked for; maps library errors to one line and an exit
    code, with a traceback only with -v."""

    def list_commands(self, ctx):
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMANDS:
            # Importing the module registers its commands on this group (``@cli.command``).
            importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")
            command = self.commands.get(name)
            if command is not None and command.short_help is None:
                command.short_help = COMMANDS[name][1]
        return self.commands.get(name)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            typed = args[0] if args else ""
            if not typed or typed.startswith("-") or self.get_command(ctx, typed) is not None:
                raise
            import difflib

            close = difflib.get_close_matches(typed.replace("_", "-"), self.list_commands(ctx), n=1, cutoff=0.6)
            if not close:
                raise
            raise click.UsageError(f"{error.message.rstrip('.')}. Did you mean {close[0]!r}?", ctx) from None

    def format_commands(self, ctx, formatter):
        rows = [(name, self._short_help(name)) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def shell_complete(self, ctx, incomplete):
        from click.shell_completion import CompletionItem

        names = [name for name in self.list_commands(ctx) if name.startswith(incomplete)]
        # click.Command's own completion: the group's options, when the word starts with a dash.
        return [CompletionItem(name, help=self._short_help(name)) for name in names] + \
            click.Command.shell_complete(self, ctx, incomplete)

    def _short_help(self, name: str) -> str:
        if name in COMMANDS:
            return COMMANDS[name][1]
        return self.commands[name].get_short_help_str()

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            _fail(ctx, as_typed(error), EXIT_USAGE)
        except AuditctlError as error:
            _explain_and_fail(ctx, error)
        except UnicodeEncodeError as error:
            if "surrogates not allowed" not in str(error):
                raise
            # A value typed or set in the environment held bytes that are not UTF-8 (Python keeps them
            # as lone surrogates); no database or URL can carry it.
            _fail(ctx, ConfigError("a value given holds bytes that are not UTF-8 text (an argument, an AUDITCTL_* "
                                   "variable or the config file); it cannot be sent to the database"), EXIT_USAGE)
        except BrokenPipeError:
            # The reader of stdout left (``show 12 | head -3``): it took what it wanted, exit 0. Listings
            # see this themselves and finish their work (``render``); any other output just stops here.
            # A stderr nobody reads cut a status or an error line, and with it the command's own exit
            # code: that stays a failure (1), as click makes it.
            if reader_gone(sys.stderr) or not reader_gone(sys.stdout):
                raise
            from .render import discard_stdout

            discard_stdout()
            ctx.exit(EXIT_OK)
        except KeyboardInterrupt as interrupt:
            done = f" ({interrupt.done} audits {interrupt.verb})" if isinstance(interrupt, Interrupted) else ""
            click.echo(f"Interrupted: batches already done stay done{done}; nothing else was changed.", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    def format_epilog(self, ctx, formatter):
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(EXIT_CODES_HELP)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Usage errors as one line: the message, the option that was wrong (and the variable, only when
        the value came from one), and where help is; exit 2. Click's own form takes four lines."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _prepare_streams()
        previous_sigterm = _sigterm_as_interrupt()
        try:
            self._main(args, prog_name, complete_var, **extra)
        finally:
            if previous_sigterm is not None:
                import signal

                from ..gcpause import owns_process

                # In the command's own process the exit code is chosen and the process is ending: a
                # SIGTERM now (a second one, after watch stopped) must not turn it into 143.
                signal.signal(signal.SIGTERM, signal.SIG_IGN if owns_process() else previous_sigterm)

    def _main(self, args, prog_name, complete_var, **extra):
        if os.environ.get(complete_var or COMPLETE_VAR):  # a shell asks: answer as auditctl's own scripts expect
            from .completion import register

            register()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except OSError as error:
            # Writing the output failed (a full disk, a closed descriptor): what was done stays done.
            # An error that names a file is about that file.
            from ..textsafe import printable

            what = f"{printable(error.filename)}: " if error.filename else "cannot write the output: "
            _last_line(paint(f"Error: {what}{printable(error.strerror or error)}", "red"), EXIT_ERROR)
        except click.UsageError as error:
            if isinstance(error, _NO_ARGS_IS_HELP) and error.ctx is not None:  # bare `auditctl`
                _last_line(error.ctx.get_help(), error.exit_code)  # the help as it is, on stderr, not one squashed line
            where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            _last_line(paint(f"Error: {_usage_message(error)}{where}", "red"), error.exit_code)
        except click.ClickException as error:
            _last_line(paint(f"Error: {error.format_message()}", "red"), error.exit_code)
        except click.Abort:
            _last_line("Aborted.", EXIT_ERROR)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


#: Click 8.2+ raises it for a group run with no command; older versions print the help themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _last_line(text: str, code: int) -> None:
    """The command's error line on stderr, then its exit code; a stderr that cannot take the line
    (closed, full) makes it exit 1, as any lost status or error line does."""
    try:
        click.echo(text, err=True)
    except OSError:
        code = EXIT_ERROR
    sys.exit(code)


def reader_gone(stream) -> bool:
    """Whether the pipe ``stream`` writes to has no reader left (poll reports an error on its end)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):
        return False


def _sigterm_as_interrupt():
    """SIGTERM (a supervisor, ``timeout``, ``kill``) stops a command as Ctrl-C does: the batch in
    flight rolls back, the message says what was done, exit 130. Returns the handler it replaced,
    None when it left SIGTERM alone (not the main thread, or a handler someone else installed).
    ``watch`` and ``serve`` put their own in place while they run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


class _ClosedStream:
    """Stands for a standard stream the shell closed (``>&-``, ``2>&-``): the first write fails as a
    write to a closed descriptor would, after the command did its work. A closed stderr is thus what
    a full one is: a status or error line lost there ends the command with exit 1 (``_main``), where
    Python alone would drop the line and let the command exit 0."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        import errno

        raise OSError(errno.EBADF, f"{self.name} is closed")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise ValueError(f"{self.name} is closed")


def _prepare_streams() -> None:
    """A closed stdout or stderr gets a stand-in that fails on write; a stdout whose encoding cannot
    hold every character (``PYTHONIOENCODING=ascii``, a POSIX locale) writes the others as JSON
    escapes instead of failing mid-listing."""
    if sys.stderr is None:
        sys.stderr = _ClosedStream("standard error")
    if sys.stdout is None:
        sys.stdout = _ClosedStream("standard output")
        return
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding not in ("utf8", "utf8sig") and hasattr(sys.stdout, "reconfigure"):
        from ..textsafe import json_escapes_handler

        sys.stdout.reconfigure(errors=json_escapes_handler())


def _usage_message(error: click.UsageError) -> str:
    if isinstance(error, click.BadParameter) and not isinstance(error, click.MissingParameter) and error.param is not None:
        param = error.param
        names = [param.human_readable_name] if isinstance(param, click.Argument) else (param.opts or [param.human_readable_name])
        hint = " / ".join(f"'{name}'" for name in names)
        envvar = getattr(param, "envvar", None)
        ctx = error.ctx
        if envvar and ctx is not None and ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT:
            hint += f" (from ${envvar if isinstance(envvar, str) else envvar[0]})"
        return f"Invalid value for {hint}: {error.message}"
    # One line: click lists a missing choice's values one per line ("Choose from:\n\tbash,\n\tzsh").
    return " ".join(error.format_message().split())


def _explain_and_fail(ctx: click.Context, error: AuditctlError) -> None:
    from ..errors import SchemaMissing

    state = ctx.meta.get("auditctl.state")
    if isinstance(error, SchemaMissing) and state is not None:
        # Say precisely why: no schema, an old one, or tables that are not ours.
        from ..migrate import explained

        try:
            error = explained(error, state.engine_for("reader"))
        except AuditctlError:
            pass  # no engine to ask: the error as it came
    _fail(ctx, error, EXIT_ERROR)


def as_typed(error: ConfigError) -> ConfigError:
    """The library's refusal with the settings it names (``worker``, ``since``) named as their flags
    (``--worker``, ``--since``): what the operator typed on this command line."""
    from ..errors import NamedSettingError

    if not isinstance(error, NamedSettingError):
        return error
    typed = ConfigError(error.naming(lambda name: "--" + name.replace("_", "-")))
    typed.__cause__ = error
    return typed


def _fail(ctx: click.Context, error: Exception, code: int) -> None:
    from ..textsafe import printable

    if _verbosity(ctx):
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    click.echo(paint(f"Error: {printable(error)}", "red"), err=True)
    ctx.exit(code)


def _verbosity(ctx: click.Context) -> int:
    # The sub-command's context (where -v was parsed) is gone by now; its meta is shared.
    return int(ctx.meta.get("auditctl.verbose", 0)) + int(ctx.meta.get("auditctl.verbose_global", 0))
