"""``auditctl watch``: the heartbeat monitor in the foreground, and the incident screen.

Two cadences. Every ``--interval`` it runs one monitor pass (judge, then recover unless
``--no-recover``). Every ``--refresh`` (1s by default) it reads the fleet again, read
only, so a newly stuck audit shows within seconds whatever the interval.

On a terminal it draws the incident screen: a header that counts running audits, stuck
ones by reason, recoveries since it started and workers alive and gone; then every
stuck audit (paged when they do not fit: n/p or space to turn, and pages turn by
themselves); healthy running audits fill what space is left, with "and N more". Piped,
it writes one log line per change: an audit found stuck, recovered, a worker gone, the
database lost or back.

Ctrl-C, SIGTERM and SIGHUP stop it after the pass in progress, within a second between passes; a
second one stops it at once (exit 130), abandoning a read or a batch in flight.
A database outage is reported and retried (the monitor's outage rule keeps it from being
counted as silence); a database without auditctl's schema is not an outage: watch says
so and exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import click

from .app import cli
from .metrics_options import metrics_options
from .notify import WatchAlerts, destination_options
from .options import (DURATION, check_bounds, check_interval, common_options, judge_filter_options, max_attempts_option,
                      refuse_without_requeue,
                      threshold_options)
from .render import echo

#: Seconds between turns of the stuck-audit pages on the screen.
PAGE_TURN = 5.0
#: What ``Monitor.look_at_file`` saw, as a line says it.
FILE_CHANGES = {"back": "is there again", "replaced": "was replaced by another file; watching the new one"}


@cli.command()
@common_options
@threshold_options
@judge_filter_options
@destination_options
@click.option("--interval", type=DURATION, default="5m", show_default=True, envvar="AUDITCTL_INTERVAL", show_envvar=True,
              help="Time between monitor passes (judge and recover).")
@click.option("--refresh", type=DURATION, default="1s", show_default=True, envvar="AUDITCTL_REFRESH", show_envvar=True,
              help="Time between reads of the fleet for the screen and the log (read only).")
@click.option("--once", is_flag=True, help="Run a single pass and exit.")
@click.option("--no-recover", is_flag=True, help="Only watch and report; recover nothing.")
@click.option("--requeue", is_flag=True, help="Requeue stuck audits (pending) instead of failing them.")
@max_attempts_option()
@click.option("--live/--no-live", default=None, help="Force the screen on or off. Default: the screen on a terminal.")
@metrics_options(serve=True, inject=True)
def watch(state, policy, allow_unsafe, filters, interval, refresh, once, no_recover, requeue, max_attempts, live, metrics,
          destinations, notify_timeout):
    """Run the heartbeat monitor in the foreground: the incident screen on a terminal, log lines when piped."""
    from ..db import monitor_call_timeout
    from ..sqlitefile import FileWatch
    from ..errors import DatabaseUnavailable
    from ..history import Actor
    from ..monitor import Monitor
    from ..rules import check_window_now

    refuse_without_requeue(requeue, recovering=not no_recover)
    # A long-running monitor: a PostgreSQL server that stops answering must not hold it for good.
    state.call_timeout = monitor_call_timeout(state.lock_wait)
    check_interval(interval, allow_unsafe)
    check_interval(refresh, allow_unsafe, "refresh")
    try:
        check_bounds(state, policy, allow_unsafe, filters)
        check_window_now(state.reader, filters)
    except DatabaseUnavailable:
        pass  # the database may come back; the first pass reports it
    monitor = Monitor(state.engine, policy, actor=Actor.command("watch"), recover=not no_recover, requeue=requeue,
                      max_attempts=max_attempts, filters=filters, file_watch=FileWatch(state.engine, state.reader))
    use_screen = live if live is not None else (sys.stdout.isatty() and os.environ.get("TERM") != "dumb")
    if use_screen:
        view = Screen(state, policy, interval, one_shot=once)
        metrics.warn = view.note  # the metrics file's trouble shown in the header, not over the screen
    else:
        view = LogView(state, once)
    # The view says the database is lost the moment a read between passes finds it so: a scrape
    # meanwhile says database_up 0 without a warning repeating it (as after a pass that failed).
    view.on_read = metrics.database_shown
    # Alerts go out from their own thread (or, with --once, after the pass, bounded by the timeout).
    alerts = WatchAlerts(state, destinations, notify_timeout, once=once,
                         echo=view._line if isinstance(view, LogView) else view.note) if destinations else None
    stop = threading.Event()
    view.stop_event = stop

    from ..signals import set_from_handler

    asked = []  # a list, not the event: the event is set by another thread, a moment later

    def on_signal(*_):
        if asked:
            # The second Ctrl-C or SIGTERM: the operator will not wait for a read or a batch in flight
            # (a server that stopped answering holds one up to its deadline). Exit 130, batches done stay done.
            raise KeyboardInterrupt
        asked.append(True)
        set_from_handler(stop)

    # SIGHUP (a terminal closed, a container runtime or supervisor passing it on) stops watch as SIGTERM
    # does, rather than killing it between a batch's commit and its log lines; left ignored under nohup.
    hangup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL else []
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, *hangup)}
    result = None
    try:
        view.start()
        next_pass = time.monotonic()
        retry = 1.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_pass:
                result = metrics.timed_pass(monitor.run_pass)
                view.after_pass(result)
                if alerts is not None and result.ok:
                    alerts.after_pass()
                if result.fatal:
                    break
                if once:
                    if result.ok and isinstance(view, Screen):
                        view.observe(monitor, stop)  # the screen, drawn once after the pass
                    break
                if result.ok:
                    retry, next_pass = 1.0, time.monotonic() + interval
                else:
                    next_pass, retry = time.monotonic() + min(interval, retry), min(retry * 2, 30.0)
                view.next_pass_at = next_pass
            view.observe(monitor, stop)
            if alerts is not None:
                alerts.show()
            view.wait(stop, max(0.0, min(refresh, next_pass - time.monotonic())))
    finally:
        # Leaving: one more Ctrl-C must not cut the cleanup that gives the terminal back.
        for sig in previous:
            signal.signal(sig, lambda *_: set_from_handler(stop))
        if alerts is not None:
            alerts.close()
        view.stop()
        metrics.warn = None  # the last textfile write, after this, says its trouble on stderr again
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result is not None and result.fatal:
        from ..errors import ConfigError, SchemaMissing, WriteRefused

        # ConfigError: exit 2, the filters refused (a since/until window that turned backwards as time
        # went on), not the database. WriteRefused: exit 1, the role may not write, as it said.
        for kind in (ConfigError, WriteRefused):
            if result.error_type is not None and issubclass(result.error_type, kind):
                if isinstance(result.exception, kind):
                    raise result.exception  # as it was: a refused filter is then named by its flag (group.as_typed)
                raise kind(result.error)
        raise SchemaMissing(result.error)  # exit 1, with the precise diagnosis (see group._explain_and_fail)
    if isinstance(view, LogView) and view.output_error is not None:
        raise view.output_error  # one line, exit 1 (group.main): the passes ran, the output did not
    if not state.quiet:
        echo("watch stopped.", err=True)
    if once and result is not None and not result.ok:
        # A single pass that could not run is a runtime error (exit 1), not a success for cron to trust.
        raise DatabaseUnavailable(result.error)
    if once and result is not None and result.skipped:
        # As recover: an audit the database would not let it change needs an operator (it was logged).
        from .group import EXIT_ERROR

        click.get_current_context().exit(EXIT_ERROR)


def _fatal_error(result) -> str:
    """Why a pass stopped, with a refused filter named by its flag (``--since``), as typed."""
    from ..errors import ConfigError
    from .group import as_typed

    if isinstance(result.exception, ConfigError):
        return str(as_typed(result.exception))
    return str(result.error)


class _NoteHandler(logging.Handler):
    """Warnings of the ``auditctl`` loggers, handed to the screen instead of stderr."""

    def __init__(self, note):
        super().__init__(logging.WARNING)
        self._note = note

    def emit(self, record):
        try:
            self._note(record.getMessage())
        except Exception:  # noqa: BLE001 - a warning that cannot be shown must not stop the watch
            self.handleError(record)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_pipe(stream) -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, ValueError, OSError):
        return False


def _safe(text) -> str:
    """Text from the database in a log line: shown, not executed, and cut as a table cell is (a
    target of megabytes would otherwise be one line of megabytes in the journal)."""
    from ..textsafe import clipped, printable

    return clipped(printable(text))


class LogView:
    """One line per change: for journald, files and pipes."""

    def __init__(self, state, once: bool = False):
        self.state = state
        self.once = once
        self.stop_event: threading.Event | None = None  # set when the reader of stdout went away
        self.reader_left = False
        self.output_error: OSError | None = None
        self.outage_reported = False
        #: Told whether each read between passes could read the database, before the view says so.
        self.on_read: Callable[[bool], None] | None = None
        self.next_pass_at: float | None = None
        self.known_stuck: dict[int, tuple[str, ...]] = {}
        self.known_gone: set[str] = set()
        self.first = True
        self.piped = _is_pipe(sys.stdout)

    def start(self):
        if not self.state.quiet:  # -q: only what changed or went wrong
            self._line(f"watching {self.state.masked_url}")

    def _line(self, text):
        if self.output_error is not None or self.reader_left:
            return
        try:
            echo(f"{_stamp()} {text}")
            sys.stdout.flush()
        except BrokenPipeError as error:
            if not self.piped:
                # A socket (journald, a log collector that restarted) is not a reader that took what it
                # wanted: stopping there, exit 0, would leave stuck audits to nobody. As any output lost.
                from .render import discard_stdout

                discard_stdout()  # the line left in the buffer would fail again at exit
                self._unwritable(error)
                return
            # The reader went away (| head): like any listing, the output ends, quietly; so does watch,
            # once the pass in hand is done.
            from .render import discard_stdout

            discard_stdout()
            self.reader_left = True
            if self.stop_event is not None:
                self.stop_event.set()
        except OSError as error:
            self._unwritable(error)

    def _unwritable(self, error: OSError):
        """A full disk, a closed stdout: the passes go on (recovering is the work); said once now,
        and watch exits 1 when it stops."""
        self.output_error = error
        with contextlib.suppress(OSError):
            echo(f"warning: cannot write the output ({error.strerror or error}); watching on", err=True)

    def _lost(self, error: str):
        if not self.outage_reported:
            self._line(f"database lost: {_safe(error)}" + ("" if self.once else "; retrying"))
        self.outage_reported = True

    def _read(self, readable: bool):
        if self.on_read is not None:
            self.on_read(readable)

    def _back(self):
        if self.outage_reported:
            self._line("database back; silence is measured from now, not across the outage")
            self.outage_reported = False

    def _file_changed(self, change: str | None):
        if change is not None:
            self._line(f"database file {_safe(self.state.masked_url)} {FILE_CHANGES[change]}")

    def after_pass(self, result):
        if not result.ok:
            self._changes(result)  # what the pass's committed batches did before it stopped
            if result.fatal:
                self._line(f"cannot watch: {_safe(_fatal_error(result))}")
                return
            self._lost(result.error)
            return
        self._file_changed(result.file_change)
        if result.resumed_after_outage:
            self.outage_reported = True
        self._back()
        self._gone(result.gone)
        self._changes(result)
        for v in result.stuck:
            if self.known_stuck.get(v.id) != tuple(v.reasons):
                self.known_stuck[v.id] = tuple(v.reasons)
                self._line(f"stuck audit {v.id} ({_safe(v.target)}): {', '.join(v.reasons)}; {_safe('; '.join(v.explain()))} "
                           "(not recovering: --no-recover)")
        if (self.once or self.state.verbose) and not self.state.quiet:
            from ..recovery import needing_an_operator

            needs = f", {needing_an_operator(len(result.skipped))}" if result.skipped else ""
            self._line(f"pass done: {len(result.recovered)} recovered, {len(result.stuck)} stuck left alone{needs}")

    def _changes(self, result):
        for r in result.recovered:
            self.known_stuck.pop(r.id, None)
            self._line(f"recovered audit {r.id} ({_safe(r.target)}): {', '.join(r.reasons)} -> {r.status}; "
                       f"{_safe('; '.join(r.explanation))}")
        for s in result.skipped:
            self._line(f"audit {s.id} could not be recovered and needs an operator: {_safe(s.error)}")

    def _gone(self, gone: dict[str, str]):
        for instance, proof in gone.items():
            if instance not in self.known_gone:
                self.known_gone.add(instance)
                self._line(f"worker gone: {_safe(proof)}")

    def observe(self, monitor, stop):
        """Between passes: report audits newly found stuck (read only)."""
        from ..errors import AuditctlError, SchemaMissing

        try:
            self._file_changed(monitor.ready_to_read())
            stuck, gone = monitor.judge_now()
        except SchemaMissing:
            return
        except AuditctlError as error:
            monitor.saw_outage()  # silence counts afresh from its return, as after an outage a pass saw
            self._read(False)
            self._lost(str(error))
            return
        self._read(True)
        self._back()
        self._gone(gone)
        current = {}
        for verdict in stuck:
            reasons = tuple(verdict.reasons)
            current[verdict.id] = reasons
            if self.known_stuck.get(verdict.id) != reasons:
                self._line(f"stuck audit {verdict.id} ({_safe(verdict.target)}): {', '.join(reasons)}; "
                           f"{_safe('; '.join(verdict.explain()))}")
        self.known_stuck = current

    def wait(self, stop, seconds):
        from .group import reader_gone

        if self.piped and not self.reader_left and reader_gone(sys.stdout):
            # The reader went away with nothing more logged since (``| head`` that took its lines):
            # stop now, as a failed write would, rather than at the next line, which may be hours away.
            # Pipes only: a terminal that hung up (watch kept alive with nohup's SIGHUP ignored) or a
            # log socket is not a reader that took what it wanted, and the recovering goes on.
            from .render import discard_stdout

            discard_stdout()
            self.reader_left = True
            stop.set()
            return
        stop.wait(seconds)

    def stop(self):
        pass


#: Recoveries the screen keeps to show (newest first), and how many it shows at most.
RECENT_KEPT = 20
RECENT_SHOWN = 5


class Screen:
    """The incident screen (rich Live, alternate screen): stuck audits first, always all of them,
    then the latest recoveries, then the healthy running audits as room allows."""

    def __init__(self, state, policy, interval, one_shot: bool = False):
        self.state = state
        self.policy = policy
        self.interval = interval
        self.one_shot = one_shot  # --once: draw the screen once, in the scrollback, and leave
        self.next_pass_at: float | None = None
        #: Told whether each read between passes could read the database, before the screen says so.
        self.on_read: Callable[[bool], None] | None = None
        self.live = None
        #: Set when stdout's reader went away (``--live`` into a pipe): nothing more is drawn.
        self.reader_left = False
        self.stop_event: threading.Event | None = None
        self.status = "starting"
        self.status_ok = True
        self.last_pass: str = "not yet"
        self.recovered_total = 0
        self.recent: list = []
        self.overview = None
        self.page = 0
        self.page_turned = time.monotonic()
        self.keys = None
        self.notice: str | None = None
        self._notes: logging.Handler | None = None

    def start(self):
        from rich.live import Live

        from .render import console

        # --live asked for the live screen where stdout is no terminal: it is drawn all the same (--once
        # prints the screen once, as text).
        self.console = console(force_terminal=True if not (self.one_shot or sys.stdout.isatty()) else None)
        if self.one_shot:
            return
        self.live = Live(console=self.console, auto_refresh=False, screen=True, transient=False, redirect_stderr=False)
        try:
            self.live.start()
        except BrokenPipeError:
            self.live = None  # it stopped partway: nothing to give back (stop() would fail on it)
            self._reader_went_away()
            return
        # The library's warnings (a metrics scrape that cannot read the database, say) go to the
        # header while the screen is up: written to stderr they would scroll it away.
        self._notes = _NoteHandler(self.note)
        logging.getLogger("auditctl").addHandler(self._notes)
        self.keys = _KeyReader(self)
        self.keys.start()
        self._refresh()

    def after_pass(self, result):
        self.last_pass = datetime.now().strftime("%H:%M:%S")
        # A pass that stopped partway still counts what its committed batches recovered.
        self.recovered_total += len(result.recovered)
        self.recent = ([(self.last_pass, r) for r in reversed(result.recovered)] + self.recent)[:RECENT_KEPT]
        if result.ok:
            self.status_ok = True
            self.status = "database back" if result.resumed_after_outage else "ok"
        else:
            self.status_ok = False
            self.status = ("CANNOT WATCH: " if result.fatal else "DATABASE LOST (retrying): ") + _fatal_error(result)
        self._refresh()

    def observe(self, monitor, stop):
        from ..errors import AuditctlError, SchemaMissing
        from ..overview import fleet_overview

        try:
            change = monitor.ready_to_read()
            if change is not None:
                self.status_ok, self.status = True, f"database file {FILE_CHANGES[change]}"
            self.overview = fleet_overview(self.state.engine, self.policy, seen_since=monitor.seen_since,
                                           filters=monitor.filters, sample=200)
            self._read(True)
            if not self.status_ok and not self.status.startswith("CANNOT"):
                self.status_ok, self.status = True, "database back"
        except AuditctlError as error:
            if not isinstance(error, SchemaMissing):
                monitor.saw_outage()
            self._read(False)
            self.status_ok = False
            self.status = f"DATABASE LOST (retrying): {error}"
        self._refresh()

    def _read(self, readable: bool):
        if self.on_read is not None:
            self.on_read(readable)

    def turn(self, step: int):
        self.page += step
        self.page_turned = time.monotonic()
        self._refresh()

    def wait(self, stop, seconds):
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            stop.wait(min(0.25, left))
            if time.monotonic() - self.page_turned >= PAGE_TURN:
                self.turn(1)

    def note(self, text: str):
        """A warning for the operator, shown in the header until the next one."""
        self.notice = f"{_stamp()} {_safe(text)}"
        self._refresh()

    def stop(self):
        if self.keys is not None:
            self.keys.stop()
        if self._notes is not None:
            logging.getLogger("auditctl").removeHandler(self._notes)
        if self.live is not None:
            self.live.stop()
            if self.recovered_total:
                # The alternate screen is gone with everything on it: what was recovered stays said.
                echo(self.summary(), err=True)
        elif self.one_shot:
            width, height = self.console.size
            self.console.print(self.render(height=10_000), soft_wrap=True)

    def summary(self) -> str:
        """One line: how many audits this watch recovered, and which (the latest ``RECENT_KEPT``)."""
        listed = ", ".join(f"{r.id} ({_safe(','.join(r.reasons))})" for _, r in reversed(self.recent))
        more = self.recovered_total - len(self.recent)
        return (f"watch recovered {self.recovered_total} audit{'s' if self.recovered_total != 1 else ''}: "
                + (f"{more} earlier, then " if more > 0 else "") + listed)

    def _refresh(self):
        if self.live is None or self.reader_left:
            return
        try:
            self.live.update(self.render(), refresh=True)
        except BrokenPipeError:
            self._reader_went_away()

    def _reader_went_away(self):
        """The screen forced into a pipe (--live) whose reader left: as in log lines, the output
        ends quietly, and so does watch, once the pass in hand is done."""
        from .render import discard_stdout

        discard_stdout()
        self.reader_left = True
        if self.stop_event is not None:
            self.stop_event.set()

    def render(self, height: int | None = None):
        from rich.console import Group
        from rich.text import Text

        width, screen_height = self.console.size
        lines = self.screen_lines(width, height or screen_height)
        text = Text()
        for index, segments in enumerate(lines):
            if index:
                text.append("\n")
            for piece, style in segments:
                text.append(piece, style=style)
        return Group(text)

    def screen_lines(self, width: int, height: int) -> list:
        """The whole screen as lines of (text, style) segments, fitted to width x height."""
        from ..thresholds import RULE_REASONS
        from .records import AUDIT_COLUMNS, RECOVERY_COLUMNS, VERDICT_COLUMNS, audit_record, recovery_record, verdict_record
        from .render import Column, ellipsis_mark, layout_lines, plan_layout

        o = self.overview
        header = [[("auditctl watch ", "bold"), (_safe(self.state.masked_url), None)]]
        state_style = "green" if self.status_ok else "bold red"
        upcoming = ""
        if self.next_pass_at is not None:
            upcoming = f", next in {_duration(max(0.0, self.next_pass_at - time.monotonic()))}"
        header.append([("database: ", None), (_safe(self.status)[: max(10, width - 50)], state_style),
                       (f"  last pass {self.last_pass}{upcoming} (every {_duration(self.interval)})", "dim")])
        if self.notice is not None:
            header.append([("warning: ", "bold yellow"), (self.notice[: max(10, width - 10)], "yellow")])
        if o is None:
            header.append([(f"reading the fleet{ellipsis_mark()}", "dim")])
            return header
        stuck_counts = ", ".join(f"{o.stuck_by_reason[r]} {r}" for r in RULE_REASONS if o.stuck_by_reason.get(r))
        header.append([(f"running {o.running}", "bold"), ("  stuck ", None), (str(len(o.stuck)), "bold red" if o.stuck else "green"),
                       (f" ({stuck_counts})" if stuck_counts else "", None),
                       (f"  recovered {self.recovered_total}", None)])
        header.append([(f"workers {o.workers_alive} alive, {o.workers_gone} gone", None)])
        lines = list(header)
        room = height - len(lines) - 1  # the last line says how to leave
        verdict_columns = [c for c in VERDICT_COLUMNS if c.key not in ("problems",)]
        if o.stuck:
            records = [verdict_record(v) for v in o.stuck]
            layout, texts = plan_layout(records, verdict_columns, width)
            rendered = list(layout_lines(layout, texts, records, ellipsis=ellipsis_mark()))
            head, rows = rendered[0], _group_rows(rendered[1:])
            pages = _paginate(rows, max(1, room - 3))
            self.page %= len(pages)
            shown = pages[self.page]
            first = sum(len(p) for p in pages[:self.page]) + 1
            title = f"STUCK {first}-{first + len(shown) - 1} of {len(o.stuck)}"
            if len(pages) > 1:
                title += f"  page {self.page + 1}/{len(pages)} (n/p or space to turn; turns every {int(PAGE_TURN)}s)"
            lines.append([(title, "bold red")])
            lines.append(head[0])
            for row in shown:
                lines.extend(segments for segments, _ in row)
            room = height - len(lines) - 1
        else:
            lines.append([("No stuck audits.", "green")])
            room -= 1
        if self.recent and room >= 3:
            shown = min(len(self.recent), RECENT_SHOWN, room - 2)
            records = [{**recovery_record(r, dry_run=False), "at": at} for at, r in self.recent[:shown]]
            columns = [Column("at", "AT", fit="whole"),
                       *(c for c in RECOVERY_COLUMNS if c.key not in ("explanation", "problems"))]
            layout, texts = plan_layout(records, columns, width)
            rendered = list(layout_lines(layout, texts, records, ellipsis=ellipsis_mark()))
            lines.append([("recently recovered" + (f" (latest {shown} of {self.recovered_total})"
                                                   if self.recovered_total > shown else ""), "bold yellow")])
            lines.extend(segments for segments, _ in rendered)
            room = height - len(lines) - 1
        if room >= 3 and o.healthy_sample:
            records = [audit_record(a) for a in o.healthy_sample]
            columns = [c for c in AUDIT_COLUMNS if c.key not in ("attempts", "created_at", "status", "error", "problems")]
            layout, texts = plan_layout(records, columns, width)
            rendered = list(layout_lines(layout, texts, records, ellipsis=ellipsis_mark()))
            visible = max(0, min(len(rendered) - 1, room - 2))
            if o.healthy_more or visible < len(rendered) - 1:
                visible = max(0, min(len(rendered) - 1, room - 3))  # keep a line to say how many more
            more = o.healthy_more + (len(rendered) - 1 - visible)
            lines.append([("healthy running", "bold cyan")])
            lines.append(rendered[0][0])
            lines.extend(segments for segments, _ in rendered[1:1 + visible])
            if more > 0:
                lines.append([(f"and {more} more running", "dim")])
        elif o.healthy_sample or o.healthy_more:
            lines.append([(f"and {o.healthy_more + len(o.healthy_sample)} healthy running audits", "dim")])
        lines = lines[: max(1, height - 1)]
        lines.append([("Ctrl-C to stop", "dim")])
        return [_crop(line, width) for line in lines]


def _crop(segments: list, width: int) -> list:
    """A line of segments cut to ``width`` characters (a screen line never wraps)."""
    out, used = [], 0
    for piece, style in segments:
        if used + len(piece) > width:
            from .render import ellipsis_mark

            mark = ellipsis_mark()[: max(0, width - used)]
            piece = piece[: max(0, width - used - len(mark))] + mark
            out.append((piece, style))
            break
        out.append((piece, style))
        used += len(piece)
    return out


def _duration(seconds: float) -> str:
    from ..thresholds import format_duration

    return format_duration(seconds)


def _group_rows(lines: list) -> list[list]:
    """Lines of a layout grouped per record (a record's detail lines stay with it)."""
    rows: list[list] = []
    for segments, header in lines:
        first = segments[0][0] if segments else ""
        if rows and first.strip() == "" and first:
            rows[-1].append((segments, header))
        else:
            rows.append([(segments, header)])
    return rows


def _paginate(rows: list[list], room: int) -> list[list[list]]:
    pages, current, used = [], [], 0
    for row in rows:
        if current and used + len(row) > room:
            pages.append(current)
            current, used = [], 0
        current.append(row)
        used += len(row)
    pages.append(current)
    return pages


class _KeyReader:
    """Reads single keys from the terminal (n, p, space) to turn pages; leaves Ctrl-C alone."""

    def __init__(self, screen: Screen):
        self.screen = screen
        self.thread = None
        self.saved = None
        self.running = False

    def start(self):
        if not sys.stdin.isatty():
            return
        try:
            import termios
            import tty

            fd = sys.stdin.fileno()
            self.saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except Exception:  # noqa: BLE001 - paging by key is a convenience; pages still turn by themselves
            self.saved = None
            return
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        import select

        fd = sys.stdin.fileno()
        while self.running:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                key = os.read(fd, 1)
            except OSError:
                return
            if key in (b"n", b" ", b"j"):
                self.screen.turn(1)
            elif key in (b"p", b"k"):
                self.screen.turn(-1)

    def stop(self):
        self.running = False
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved)
