"""``auditctl watch``: the heartbeat monitor in the foreground.

Every --interval it runs one monitor pass (judge, then recover unless --no-recover);
``--once`` runs one pass and exits 1 if the database could not be read.
On a terminal it shows a live view, refreshed in place; otherwise it writes one log
line per event. Ctrl-C and SIGTERM stop it after the pass in progress, within a
second when it is between passes. A database outage is reported and retried; the
monitor's outage rule (see ``auditctl.monitor``) keeps the outage from being counted
as silence from the workers.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import datetime, timezone

import click

from .app import cli
from .options import DURATION, common_options, threshold_options

#: How often the live view re-reads running audits between passes (seconds).
REFRESH = 1.0


@cli.command()
@common_options
@threshold_options
@click.option("--interval", type=DURATION, default="5m", show_default=True, envvar="AUDITCTL_INTERVAL", show_envvar=True,
              help="Time between monitor passes.")
@click.option("--once", is_flag=True, help="Run a single pass and exit.")
@click.option("--no-recover", is_flag=True, help="Only watch and report; recover nothing.")
@click.option("--requeue", is_flag=True, help="Requeue stuck audits (pending) instead of failing them.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True, envvar="AUDITCTL_MAX_ATTEMPTS",
              show_envvar=True, help="With --requeue: after this many claims an audit fails for good.")
@click.option("--live/--no-live", default=None, help="Force the live view on or off. Default: live on a terminal.")
def watch(state, thresholds, interval, once, no_recover, requeue, max_attempts, live):
    """Run the heartbeat monitor in the foreground, with a live view on a terminal."""
    from ..history import Actor
    from ..monitor import Monitor

    monitor = Monitor(state.engine, thresholds, actor=Actor.command("watch"), recover=not no_recover,
                      requeue=requeue, max_attempts=max_attempts)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    view = LiveView(state, thresholds, interval, monitor) if (live if live is not None else sys.stdout.isatty()) else LogView(state, once)
    try:
        view.start()
        retry = 1.0
        while True:
            result = monitor.run_pass()
            view.after_pass(result)
            if once or stop.is_set():
                break
            if result.ok:
                retry, wait = 1.0, interval
            else:
                wait, retry = min(interval, retry), min(retry * 2, 30.0)
            view.wait(stop, wait)
            if stop.is_set():
                break
    finally:
        view.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not state.quiet:
        click.echo("watch stopped.", err=True)
    if once and not result.ok:
        # A single pass that could not run is a runtime error (exit 1), not a success for cron to trust.
        from ..errors import DatabaseUnavailable

        raise DatabaseUnavailable(result.error)


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LogView:
    """One line per pass and per recovery: for journald, files and pipes."""

    def __init__(self, state, once: bool = False):
        self.state = state
        self.once = once
        self.outage_reported = False

    def start(self):
        self._line(f"watching {self.state.masked_url}")

    def _line(self, text):
        click.echo(f"{_stamp()} {text}")
        sys.stdout.flush()

    def after_pass(self, result):
        if not result.ok:
            if not self.outage_reported:
                self._line(f"database unavailable: {result.error}" + ("" if self.once else "; retrying"))
            self.outage_reported = True
            return
        if result.resumed_after_outage or self.outage_reported:
            self._line("database reachable again; silence is measured from now, not across the outage")
            self.outage_reported = False
        for r in result.recovered:
            self._line(f"recovered audit {r.id} ({r.target}): {', '.join(r.reasons)} -> {r.status}; {'; '.join(r.explanation)}")
        for v in result.stuck:
            self._line(f"stuck audit {v.id} ({v.target}): {', '.join(v.reasons)} (not recovering: --no-recover)")
        if not self.state.quiet:
            self._line(f"pass done: {len(result.recovered)} recovered, {len(result.stuck)} stuck left alone")

    def wait(self, stop, seconds):
        stop.wait(seconds)

    def stop(self):
        pass


class LiveView:
    """A rich Live screen: running audits with heartbeat ages, recent recoveries, the monitor's state."""

    def __init__(self, state, thresholds, interval, monitor):
        self.state = state
        self.thresholds = thresholds
        self.interval = interval
        self.monitor = monitor
        self.live = None
        self.last_pass: str = "not yet"
        self.next_pass_at: float | None = None
        self.status = "starting"
        self.recovered_total = 0
        self.stuck: dict[int, list[str]] = {}  # from the last pass, under --no-recover

    def start(self):
        from rich.live import Live

        from .render import console

        self.live = Live(self._render(), console=console(), auto_refresh=False, screen=False, transient=False)
        self.live.start()

    def after_pass(self, result):
        self.last_pass = datetime.now().strftime("%H:%M:%S")
        if result.ok:
            self.status = "database reachable again" if result.resumed_after_outage else "ok"
            self.recovered_total += len(result.recovered)
            self.stuck = {verdict.id: verdict.reasons for verdict in result.stuck}
        else:
            self.status = f"DATABASE UNAVAILABLE: {result.error} (retrying)"
        self._refresh()

    def wait(self, stop, seconds):
        self.next_pass_at = time.monotonic() + seconds
        while not stop.is_set():
            left = self.next_pass_at - time.monotonic()
            if left <= 0:
                break
            stop.wait(min(REFRESH, left))
            self._refresh()
        self.next_pass_at = None

    def stop(self):
        if self.live is not None:
            self.live.stop()

    def _refresh(self):
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        from ..errors import AuditctlError
        from ..history import RECOVERED, REQUEUED, recent_events
        from ..thresholds import format_duration
        from .records import AUDIT_COLUMNS, EVENT_COLUMNS, audit_record, event_record
        from .render import rich_table

        header = Text()
        header.append("auditctl watch ", style="bold")
        header.append(f"{self.state.masked_url}  ")
        header.append(f"status: {self.status}", style="green" if self.status == "ok" else "bold red")
        header.append(f"  last pass: {self.last_pass}")
        if self.next_pass_at is not None:
            header.append(f"  next in {format_duration(max(0.0, self.next_pass_at - time.monotonic()))}")
        header.append(f"  recovered: {self.recovered_total}")
        header.append("  (Ctrl-C to stop)", style="dim")
        parts = [header]
        try:
            from ..audits import list_audits

            running = [{**audit_record(a), "stuck": self.stuck.get(a.id, [])}
                       for a in list_audits(self.state.engine, status="running", limit=30)]
            events = [event_record(e) for e in recent_events(self.state.engine, limit=8, events=(RECOVERED, REQUEUED))]
        except AuditctlError as error:
            parts.append(Text(f"cannot read the database: {error}", style="red"))
            return Group(*parts)
        from .render import Column

        columns = [c for c in AUDIT_COLUMNS if c.key not in ("attempts", "created_at", "status")]
        columns.append(Column("stuck", "STUCK", human=lambda v: ",".join(v) if v else "",
                              style=lambda r: "bold red" if r["stuck"] else None))
        parts.append(rich_table(running, columns, title=f"Running audits ({len(running)})") if running
                     else Text("No running audits."))
        parts.append(rich_table(events, EVENT_COLUMNS, title="Recent recoveries") if events else Text("No recoveries yet."))
        return Group(*parts)
