"""``scan``, ``recover`` and ``reset-all``: the commands that judge audits and act on the verdict."""

from __future__ import annotations

import sys

import click

from ..thresholds import RULE_REASONS, WORKER_RESTARTED
from .app import cli
from .options import (
    DURATION,
    EXIT_REFUSED,
    EXIT_STUCK,
    common_options,
    echo_status,
    filter_options,
    format_option,
    threshold_options,
)


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[r]} {r}" for r in RULE_REASONS if counts.get(r))


@cli.command()
@common_options
@threshold_options
@filter_options
@format_option
@click.option("--exit-code", is_flag=True, help=f"Exit with {EXIT_STUCK} when anything is stuck (for monitoring and cron).")
def scan(state, thresholds, worker, reason, older_than, fmt, exit_code):
    """Show the stuck audits and why each is stuck.

    An audit is stuck when its worker has been silent longer than --stale-after
    (stale_heartbeat), it has run longer than --max-age or its own deadline
    (max_age_exceeded), or heartbeats arrive but progress has not moved for
    --stall-after (progress_stalled).
    """
    from ..rules import iter_stuck
    from .render import render
    from .records import VERDICT_COLUMNS, verdict_record

    counts: dict[str, int] = {}

    def records():
        for verdict in iter_stuck(state.engine, thresholds, worker=worker, reason=reason, older_than=older_than):
            for r in verdict.reasons:
                counts[r] = counts.get(r, 0) + 1
            yield verdict_record(verdict, thresholds)

    found = render(records(), VERDICT_COLUMNS, fmt, title="Stuck audits")
    if found:
        echo_status(state, f"{found} stuck audit{'s' if found != 1 else ''} ({_summary(counts)}) in {state.masked_url}")
    else:
        echo_status(state, f"No stuck audits in {state.masked_url}.")
    if exit_code and found:
        click.get_current_context().exit(EXIT_STUCK)


@cli.command()
@common_options
@threshold_options
@filter_options
@format_option
@click.option("--dry-run", is_flag=True, help="Show exactly what would change; change nothing.")
@click.option("--requeue", is_flag=True, help="Return stuck audits to pending (attempts counted) instead of failing them.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True, envvar="AUDITCTL_MAX_ATTEMPTS",
              show_envvar=True, help="With --requeue: after this many claims an audit fails for good.")
def recover(state, thresholds, worker, reason, older_than, fmt, dry_run, requeue, max_attempts):
    """Recover stuck audits: mark them failed (or --requeue them) with the reason recorded.

    Safe to run from cron and to overlap: each audit is recovered exactly once, and an
    audit whose worker finished meanwhile is left alone. Silent with -q unless
    something was recovered.
    """
    from ..history import Actor
    from ..recovery import recover_stuck
    from .render import render, resolve_format
    from .records import RECOVERY_COLUMNS, recovery_record

    done = recover_stuck(state.engine, thresholds, actor=Actor.command("recover"), requeue=requeue,
                         max_attempts=max_attempts, dry_run=dry_run, worker=worker, reason=reason, older_than=older_than)
    if not done:
        if resolve_format(fmt) == "json":
            render([], RECOVERY_COLUMNS, fmt)
        echo_status(state, "Nothing to recover.")
        return
    render((recovery_record(r, dry_run) for r in done), RECOVERY_COLUMNS, fmt,
           title="Would recover" if dry_run else "Recovered")
    verb = "Would recover" if dry_run else "Recovered"
    requeued = sum(1 for r in done if r.status == "pending")
    outcomes = [f"{requeued} pending (requeued)" if requeued else "", f"{len(done) - requeued} failed" if len(done) - requeued else ""]
    echo_status(state, f"{verb} {len(done)} audit{'s' if len(done) != 1 else ''} -> {', '.join(o for o in outcomes if o)}"
                + (" (dry run: nothing changed)" if dry_run else ""), force=not dry_run)


@cli.command("reset-all")
@common_options
@threshold_options
@format_option
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Show which audits would be reset; change nothing.")
@click.option("--since", type=DURATION, default=None, help="Only audits that failed within this long (e.g. 2h).")
@click.option("--reason", type=click.Choice(RULE_REASONS + (WORKER_RESTARTED,)), default=None,
              help="Only audits recovered for this reason.")
@click.option("--include-stuck", is_flag=True, help="First recover stuck running audits, then reset them too.")
def reset_all(state, thresholds, fmt, assume_yes, dry_run, since, reason, include_stuck):
    """Reset failed audits to pending: the "Reset All Audits" button.

    Shows how many and which, then asks. Without a terminal it refuses unless --yes
    is given, and changes nothing. All resets happen in one transaction (with
    --include-stuck, the recoveries too), each recorded in the audit's history.
    """
    from ..history import Actor
    from ..recovery import reset_failed
    from ..rules import find_stuck
    from .render import render, resolve_format
    from .records import RESET_COLUMNS, reset_record

    actor = Actor.command("reset-all")
    failed = reset_failed(state.engine, actor=actor, since=since, reason=reason, dry_run=True)
    # --reason narrows the stuck audits too: only those stuck for that reason are recovered and reset.
    stuck = find_stuck(state.engine, thresholds, reason=reason) if include_stuck and reason != WORKER_RESTARTED else []
    planned = [reset_record(r, True) for r in failed] + [
        {"id": v.id, "target": v.target, "previous_status": "running", "status": "pending", "reasons": v.reasons,
         "error": None, "finished_at": None, "dry_run": True}
        for v in stuck
    ]
    total = len(planned)
    if total == 0:
        if resolve_format(fmt) == "json":
            render([], RESET_COLUMNS, fmt)
        echo_status(state, "Nothing to reset.")
        return
    if dry_run:
        render(planned, RESET_COLUMNS, fmt, title="Would reset")
        echo_status(state, f"Would reset {total} audit{'s' if total != 1 else ''} to pending (dry run: nothing changed).")
        return
    if not assume_yes:
        if not sys.stdin.isatty():
            raise_refusal(total)
        render(planned, RESET_COLUMNS, "table", title="Will reset")
        if not click.confirm(f"Reset {total} audit{'s' if total != 1 else ''} to pending?", default=False, err=True):
            click.echo("Aborted: nothing changed.", err=True)
            click.get_current_context().exit(EXIT_REFUSED)
    # One transaction: the stuck audits are recovered and everything reset together, or nothing is.
    done = reset_failed(state.engine, actor=actor, ids=[r.id for r in failed],
                        recover_first=[v.id for v in stuck], thresholds=thresholds)
    render((reset_record(r, False) for r in done), RESET_COLUMNS, fmt, title="Reset")
    echo_status(state, f"Reset {len(done)} audit{'s' if len(done) != 1 else ''} to pending.", force=True)


def raise_refusal(total: int) -> None:
    click.echo(
        f"Error: refusing to reset {total} audit{'s' if total != 1 else ''} without confirmation: "
        "there is no terminal to ask on. Pass --yes to confirm, or --dry-run to look first. Nothing was changed.",
        err=True,
    )
    click.get_current_context().exit(EXIT_REFUSED)
