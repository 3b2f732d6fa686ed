"""``auditctl notify`` and the alert options every command that changes audits shares.

``destination_options`` gives ``watch``, ``recover``, ``reset-all``, ``notify`` (and ``config``,
which shows them) the same ``--slack-webhook``, ``--discord-webhook``, ``--webhook`` (each
repeatable and comma-separated; env ``AUDITCTL_SLACK_WEBHOOK`` etc.; config keys
``slack_webhook`` etc.) and ``--notify-timeout``. URLs are secrets: everything printed names a destination by
its kind and masked URL. The sending itself is the library's (``auditctl.notify``).
"""

from __future__ import annotations

import functools

import click

from .app import cli
from .group import EXIT_ERROR
from .options import DURATION, ListType, _setting_option, common_options, echo_status, flatten, output_options

_URLS = ListType(metavar="URL")


def _destinations(slack, discord, webhook):
    from ..errors import ConfigError
    from ..notify.destinations import destinations_from

    try:
        return destinations_from(slack=flatten(slack), discord=flatten(discord), webhook=flatten(webhook))
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


def destination_options(command=None, *, deliver: bool = False):
    """The alert destinations and ``--notify-timeout``.

    Plain (``@destination_options``): injects ``destinations`` (a list of
    ``notify.Destination``) and ``notify_timeout`` (seconds). With ``deliver=True`` (recover,
    reset-all) the command keeps its signature, and once it has changed something the
    pending alerts are delivered, bounded by the timeout; a webhook that fails is reported
    on stderr and never changes the command's exit code.
    """
    if command is None:
        return functools.partial(destination_options, deliver=deliver)

    @_setting_option("slack_webhook", "--slack-webhook", type=_URLS, multiple=True, metavar="URL",
                     help="Post alerts to this Slack incoming webhook; repeatable, comma-separated.")
    @_setting_option("discord_webhook", "--discord-webhook", type=_URLS, multiple=True, metavar="URL",
                     help="Post alerts to this Discord webhook; repeatable, comma-separated.")
    @_setting_option("webhook", "--webhook", type=_URLS, multiple=True, metavar="URL",
                     help="Post alerts as JSON to this webhook; repeatable, comma-separated.")
    @_setting_option("notify_timeout", "--notify-timeout", type=DURATION, default="5s", show_default=True,
                     metavar="DURATION", help="The longest one alert may take to post.")
    @functools.wraps(command)
    def wrapper(*args, slack_webhook, discord_webhook, webhook, notify_timeout, **kwargs):
        destinations = _destinations(slack_webhook, discord_webhook, webhook)
        if not deliver:
            return command(*args, destinations=destinations, notify_timeout=notify_timeout, **kwargs)
        if not destinations or kwargs.get("dry_run"):
            return command(*args, **kwargs)
        state = kwargs["state"]
        try:
            outcome = command(*args, **kwargs)
        except click.exceptions.Exit as leaving:
            # 1: some audits needed an operator, the others changed and their alerts are owed.
            if leaving.exit_code in (0, EXIT_ERROR):
                deliver_and_say(state, destinations, notify_timeout)
            raise
        deliver_and_say(state, destinations, notify_timeout)
        return outcome

    return wrapper


def deliver_and_say(state, destinations, timeout: float, *, hint: str = " (`auditctl notify` retries)") -> tuple:
    """Deliver what is due, a message a second while more is due; one ``Alerts:`` line per message
    sent or failed, and one per destination whose events still wait (a backoff, a ``Retry-After``,
    another sender's claim), and one per destination whose events expired undelivered. Returns (messages
    sent, failed, destinations waiting, events expired). Never raises."""
    from ..notify import deliver, deliveries

    sent = failed = expired = 0
    report = None
    for report in deliveries(lambda: deliver(state.engine, destinations, timeout=timeout)):
        for result in report.results:
            if result.expired:  # alerts dropped: said even with -q
                expired += result.expired
                echo_status(state, f"Alerts: {result.describe_expired()}.", force=True)
            if result.sent:
                sent += 1
                echo_status(state, f"Alerts: {result.describe()}.")
            elif result.failed:
                failed += 1
                echo_status(state, f"Alerts: {result.describe()}{hint}.", force=True)
    waiting = report.waiting if report is not None else []  # each run reports every destination
    for result in waiting:
        echo_status(state, f"Alerts: {result.describe_waiting()}{hint}.", force=True)
    return sent, failed, waiting, expired


class WatchAlerts:
    """``watch``'s alerts: a sender in a background thread, kicked after each pass, so a webhook
    that hangs never holds a pass or the screen; with ``--once``, a delivery after the pass (each
    message bounded by the timeout). Its news becomes log lines or the live screen's notice
    (``echo``), one per change."""

    def __init__(self, state, destinations, timeout: float, *, once: bool, echo=None):
        from ..notify import Notifier

        self.state = state
        self.once = once
        self.echo = echo
        self.failing: set[str] = set()
        # Failures are this face's to report (as log lines): a library warning on stderr would
        # only repeat them, and would scribble over the incident screen.
        self.notifier = Notifier(state.engine, destinations, timeout=timeout, log_failures=False)
        if not once:
            self.notifier.start()

    def after_pass(self) -> None:
        if not self.once:
            self.notifier.kick()
            return
        from ..notify import deliveries

        for report in deliveries(self.notifier.deliver_now):
            self._say([report])
        if self.echo is not None:  # the last word of a single pass: what still waits, and until when
            for result in report.waiting:
                self.echo(f"alerts: {result.describe_waiting()} (`auditctl notify` retries)")

    def show(self) -> None:
        """Log lines for what the background sender did since the last call (main thread only)."""
        self._say(self.notifier.reports())

    def close(self) -> None:
        self.notifier.stop(timeout=1.0)
        self.show()

    def _say(self, reports) -> None:
        if self.echo is None:
            return
        for report in reports:
            for result in report.results:
                key = result.destination.key
                if result.expired:
                    self.echo(f"alerts: {result.describe_expired()}")
                if result.sent:
                    self.failing.discard(key)
                    if not self.state.quiet:
                        self.echo(f"alerts: {result.describe()}")
                elif result.failed and key not in self.failing:
                    self.failing.add(key)
                    # --once stops after its pass: nothing here retries, the next sender does (as recover says).
                    self.echo(f"alerts: {result.describe()}" + (" (`auditctl notify` retries)" if self.once else "; retrying"))


def _when(value) -> str:
    from ..timestamps import iso

    text = iso(value)
    return "-" if text is None else text[:19].replace("T", " ")


def notify_columns():
    from .render import Column

    return [
        Column("id", "ID", justify="right", fit="whole", min_width=2),
        Column("event", "EVENT", fit="whole"),
        Column("created_at", "CREATED", human=_when, fit="whole"),
        Column("destination", "DESTINATION", min_width=24, human=lambda v: v or "(none given)"),
        Column("status", "STATE", fit="whole"),
        Column("attempts", "TRIES", justify="right", fit="whole"),
        Column("summary", "SUMMARY", fit="wrap", detail=True, label="what"),
        Column("next_attempt_at", "NEXT TRY", human=_when, fit="whole", detail=True, label="next try"),
        Column("expires_at", "EXPIRES", human=_when, fit="whole", detail=True, label="expires"),
        Column("last_error", "LAST ERROR", fit="wrap", detail=True, label="last error"),
    ]


@cli.command()
@common_options
@output_options
@destination_options
@click.option("--status", "show_status", is_flag=True, help="List the events not yet delivered, and why; send nothing.")
def notify(state, fmt, destinations, notify_timeout, show_status):
    """Deliver pending alerts once (for cron), or list what is undelivered (--status).

    Each destination gets ONE message summarising every event due for it: audits
    recovered or requeued (with reasons and the measured evidence), workers gone,
    resets (who, how many), the fleet healthy again. Safe to run while `watch` runs, from
    several hosts at once: each event goes to each destination once (a crash between
    sending and recording it can repeat it; every message carries an idempotency key).
    A failed destination is retried with backoff, or after its Retry-After; events
    expire undelivered after a day.

    Exits 0 when everything is delivered, 1 when some events failed or wait for a retry,
    2 when no destination is configured or a flag or setting is wrong.
    """
    if show_status:
        from ..notify import undelivered
        from .render import render

        found = undelivered(state.reader, destinations)
        if not found:
            render([], notify_columns(), fmt)  # json's [] and csv's header; nothing in the human formats
            echo_status(state, f"Nothing undelivered in {state.masked_url}.")
            return
        render((item.record() for item in found), notify_columns(), fmt, title="Undelivered alerts")
        events = len({item.id for item in found})
        echo_status(state, f"{events} undelivered event{'s' if events != 1 else ''} in {state.masked_url}.")
        return
    if not destinations:
        raise click.UsageError("no destination: pass --slack-webhook, --discord-webhook or --webhook "
                               "(or set AUDITCTL_SLACK_WEBHOOK, AUDITCTL_DISCORD_WEBHOOK, AUDITCTL_WEBHOOK or the config file)")
    from ..notify import backlog

    backlog(state.engine)  # a database that cannot be read fails here, with the usual one-line error
    sent, failed, waiting, expired = deliver_and_say(state, destinations, notify_timeout, hint="")
    if not sent and not failed and not waiting and not expired:
        echo_status(state, "Nothing to deliver.")
    if failed or waiting:
        click.get_current_context().exit(EXIT_ERROR)
