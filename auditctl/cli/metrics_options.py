"""``--metrics-port``, ``--metrics-host`` and ``--metrics-file``: one decorator for ``watch`` and ``recover``.

prometheus_client is imported only when one of the options is given, so a command
without them (and ``--help``) never loads it.
"""

from __future__ import annotations

import functools
import os
import time

import click

from ..errors import AuditctlError


class MetricsSink:
    """What a command does with its metrics: serve them, write the textfile, time its passes.

    Without any metrics option it does nothing but run the pass it is given.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", path: str | None = None):
        self.port, self.host, self.path = port, host, path
        self.metrics = None
        #: Where a failed textfile write is said (``watch``'s screen puts it in its header); stderr by default.
        self.warn = None

    @property
    def enabled(self) -> bool:
        return self.port is not None or self.path is not None

    def check_path(self) -> None:
        """Refuse a textfile that cannot be written before anything runs (exit 1, one line)."""
        if self.path is None:
            return
        from ..metrics import MetricsUnavailable

        directory = os.path.dirname(os.path.abspath(self.path)) or "."
        if not os.path.isdir(directory):
            why = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise MetricsUnavailable(f"cannot write the metrics file {self.path}: {directory} {why}")
        if not os.access(directory, os.W_OK):
            raise MetricsUnavailable(f"cannot write the metrics file {self.path}: directory {directory} is not writable")

    def start(self, state, policy) -> None:
        if not self.enabled:
            return
        from ..metrics import Metrics

        self.check_path()
        # The engine is made at each scrape, not here: a database that is missing must still give a
        # textfile (database_up 0) when the command fails on it, never leave node_exporter an old one.
        self.metrics = Metrics(lambda: state.reader, policy)
        if self.port is not None:
            host, port = self.metrics.serve(self.host, self.port)
            shown = f"[{host}]" if ":" in host else host
            # -q drops status lines; a port the OS chose is known only from this one, so it stays.
            if not state.quiet or self.port == 0:
                click.echo(f"serving metrics at http://{shown}:{port}/metrics", err=True)

    def timed_pass(self, run):
        """Run one monitor pass (``run()`` returns a PassResult), time it, and rewrite the textfile."""
        if self.metrics is None:
            return run()
        started = time.perf_counter()
        result = run()
        ok = bool(getattr(result, "ok", True))
        self.metrics.observe_pass(time.perf_counter() - started, ok)
        self.metrics.fleet.muted = not ok  # the command says why its pass failed; the scrape would say it again
        self.write(fatal=False)
        return result

    def write(self, *, fatal: bool = True) -> None:
        if self.metrics is None or self.path is None:
            return
        from ..metrics import MetricsUnavailable

        try:
            self.metrics.write_textfile(self.path)
        except MetricsUnavailable as error:
            if fatal:
                raise
            from ..textsafe import printable

            if self.warn is not None:
                self.warn(str(error))
            else:
                click.echo(f"warning: {printable(error)}", err=True)

    def database_shown(self, readable: bool) -> None:
        """The command has just shown whether the database can be read (``watch`` between passes):
        while it shows it cannot, a scrape says ``database_up 0`` without a warning saying it again."""
        if self.metrics is not None:
            self.metrics.fleet.muted = not readable

    def command_failed(self) -> None:
        """The command ends on an error it reports in one line: the textfile written after it says
        ``database_up 0`` without a second line saying the same."""
        if self.metrics is not None:
            self.metrics.fleet.muted = True

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def metrics_options(*, serve: bool = False, inject: bool = False):
    """``--metrics-file PATH`` (and with ``serve``: ``--metrics-port``, ``--metrics-host``).

    With ``inject`` the command receives ``metrics`` (a ``MetricsSink``) and times its own passes;
    otherwise the whole command counts as one pass and the textfile is written when it ends.
    Apply it below ``common_options`` and ``threshold_options`` (it needs ``state`` and ``policy``).
    """

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, metrics_file=None, metrics_port=None, metrics_host="127.0.0.1", **kwargs):
            sink = MetricsSink(metrics_port, metrics_host, metrics_file)
            if not sink.enabled:
                if inject:
                    kwargs["metrics"] = sink
                return command(*args, **kwargs)
            sink.start(kwargs["state"], kwargs.get("policy"))
            try:
                if inject:
                    kwargs["metrics"] = sink
                    return _own_passes(sink, command, args, kwargs)
                return _one_pass(sink, command, args, kwargs)
            finally:
                sink.close()

        options = [click.option("--metrics-file", "metrics_file", metavar="PATH", default=None,
                                type=click.Path(dir_okay=False), callback=_named_file,
                                help="Write Prometheus metrics to this file (atomically) for node_exporter's "
                                     "textfile collector; name it *.prom.")]
        if serve:
            options += [
                click.option("--metrics-host", "metrics_host", default="127.0.0.1", show_default=True, metavar="HOST",
                             help="Address --metrics-port binds to (0.0.0.0 or :: for every interface)."),
                click.option("--metrics-port", "metrics_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
                             help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)."),
            ]
        for option in options:
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _named_file(_ctx, _param, value):
    # An empty path (``--metrics-file "$UNSET"``) would be tried at every write and fail each time.
    if value is not None and not value.strip():
        raise click.BadParameter("the path is empty; name the file, such as /var/lib/node_exporter/auditctl.prom")
    return value


def _own_passes(sink: MetricsSink, command, args, kwargs):
    """A command that times its own passes; the textfile is written once more however it ends
    (a database missing at start included), except on a usage error."""
    write = True
    try:
        return command(*args, **kwargs)
    except click.UsageError:
        write = False  # nothing ran: no file
        raise
    except AuditctlError:
        sink.command_failed()
        raise
    except KeyboardInterrupt:
        write = False  # the second Ctrl-C: the operator will not wait for one more read of the database
        raise
    finally:
        if write:
            sink.write(fatal=False)


def _one_pass(sink: MetricsSink, command, args, kwargs):
    """The whole command is the pass; the textfile is written however it ends (except on a usage error)."""
    started = time.perf_counter()
    ok = False
    try:
        result = command(*args, **kwargs)
        ok = True
        return result
    except click.exceptions.Exit as done:
        ok = done.exit_code == 0
        raise
    except click.UsageError:
        sink.metrics = None  # nothing ran: no file
        raise
    except AuditctlError:
        sink.command_failed()
        raise
    finally:
        if sink.metrics is not None:
            sink.metrics.observe_pass(time.perf_counter() - started, ok)
            sink.write(fatal=ok)
