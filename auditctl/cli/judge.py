"""``scan``, ``recover`` and ``reset-all``: the commands that judge audits and act on the verdict."""

from __future__ import annotations

import sys

import click

from ..errors import AuditctlError
from ..thresholds import RECOVERY_REASONS, RULE_REASONS
from .app import cli
from .metrics_options import metrics_options
from .notify import destination_options
from .group import EXIT_ERROR, EXIT_REFUSED, EXIT_STUCK
from .options import (
    MAX_INT,
    MOMENT,
    LimitCut,
    ListType,
    check_bounds,
    common_options,
    echo_status,
    flatten,
    judge_filter_options,
    max_attempts_option,
    refuse_without_requeue,
    max_resets_option,
    output_options,
    threshold_options,
)

SCAN_SORTS = ("id", "age", "silence", "target", "worker")


def _counts(counts: dict[str, int], order=RULE_REASONS) -> str:
    return ", ".join(f"{counts[r]} {r}" for r in order if counts.get(r))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def progress_reporter(label: str):
    """A progress bar on stderr for long operations on a terminal; a no-op otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .render import console

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console(stderr=True), transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if total < 1000:
            return  # quick enough: no bar
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total)
        bar.update(task, completed=done)

    return update, bar.stop


@cli.command()
@common_options
@threshold_options
@judge_filter_options
@output_options
@click.option("--sort", type=click.Choice(SCAN_SORTS), default="id", show_default=True,
              help="Order: id, age (longest running first), silence (longest silent first), target, worker.")
@click.option("--reverse", is_flag=True, help="Reverse the order.")
@click.option("--limit", type=click.IntRange(0, MAX_INT), default=0, help="At most this many (0: all).")
@click.option("--exit-code", is_flag=True, help=f"Exit with {EXIT_STUCK} when anything is stuck (for monitoring and cron).")
def scan(state, policy, allow_unsafe, filters, fmt, sort, reverse, limit, exit_code):
    """Show the stuck audits, why each is stuck, and by which thresholds.

    An audit is stuck when the registry proves its worker gone (worker_gone), its worker
    has been silent longer than its stale_after (stale_heartbeat), it has run longer than
    its max_age (max_age_exceeded), or heartbeats arrive but progress has not moved for
    its stall_after (progress_stalled). Each audit is judged by its own thresholds where
    its worker declared them; flags given here override them. Changes nothing.
    """
    from ..rules import isolate, iter_stuck
    from .records import VERDICT_COLUMNS, unreadable_verdict_record, verdict_record
    from .render import render

    check_bounds(state, policy, allow_unsafe, filters)
    counts: dict[str, int] = {}
    limited = LimitCut(limit)  # when the limit cut the list, the count is not the database's

    def records():
        for verdict in limited(iter_stuck(state.reader, policy, filters=filters, sort=sort, descending=reverse,
                                          limit=limited.asked)):
            record = isolate(verdict, verdict_record, unreadable_verdict_record)
            for reason in record["reasons"]:
                counts[reason] = counts.get(reason, 0) + 1
            yield record

    listing = records()
    found = render(listing, VERDICT_COLUMNS, fmt, title="Stuck audits")
    found += sum(1 for _ in listing)  # what a reader that left early (| head) did not take still counts
    if found and limited.cut:
        echo_status(state, f"{_plural(found, 'stuck audit')} shown ({_counts(counts)}) in {state.masked_url} "
                           "(--limit reached)")
    elif found:
        echo_status(state, f"{_plural(found, 'stuck audit')} ({_counts(counts)}) in {state.masked_url}")
    else:
        echo_status(state, f"No stuck audits in {state.masked_url}.")
    if exit_code and found:
        click.get_current_context().exit(EXIT_STUCK)


@cli.command()
@common_options
@threshold_options
@judge_filter_options
@output_options
@metrics_options()
@destination_options(deliver=True)
@click.option("--dry-run", is_flag=True, help="Show exactly what would change; change nothing.")
@click.option("--requeue", is_flag=True, help="Return stuck audits to pending (attempts counted) instead of failing them.")
@max_attempts_option()
def recover(state, policy, allow_unsafe, filters, fmt, dry_run, requeue, max_attempts):
    """Recover stuck audits: mark them failed (or --requeue them) with the reason recorded.

    Safe to run from cron and to overlap: each audit is recovered exactly once, and an
    audit whose worker finished meanwhile is left alone. Works in batches; Ctrl-C between
    batches leaves each audit either recovered or untouched. Silent with -q unless
    something was recovered. Exits 1 when an audit could not be recovered (it is listed).
    """
    refuse_without_requeue(requeue)
    from ..history import Actor
    from ..recovery import recover_stuck
    from .records import RECOVERY_COLUMNS, recovery_record
    from .render import render

    check_bounds(state, policy, allow_unsafe, filters)
    update, finish = progress_reporter("Recovering")
    try:
        done, stopped = _until_stopped(lambda: recover_stuck(
            state.reader if dry_run else state.engine,  # a dry run never opens the file for writing
            policy, actor=Actor.command("recover"), requeue=requeue, max_attempts=max_attempts,
            dry_run=dry_run, filters=filters, on_batch=update))
    finally:
        finish()
    thresholds = f"Thresholds: {policy.describe()}."
    if not done and not done.skipped:
        render([], RECOVERY_COLUMNS, fmt)  # json's [] and csv's header; nothing in the human formats
        echo_status(state, "Nothing to recover.")
        echo_status(state, thresholds)
        return
    render((recovery_record(r, dry_run) for r in done), RECOVERY_COLUMNS, fmt,
           title="Would recover" if dry_run else "Recovered")
    verb = "Would recover" if dry_run else "Recovered"
    requeued = sum(1 for r in done if r.status == "pending")
    outcomes = [f"{requeued} pending (requeued)" if requeued else "", f"{len(done) - requeued} failed" if len(done) - requeued else ""]
    if done:
        echo_status(state, f"{verb} {_plural(len(done), 'audit')} -> {', '.join(o for o in outcomes if o)}"
                    + (" (dry run: nothing changed)." if dry_run else "."), force=not dry_run)
        echo_status(state, thresholds, force=not dry_run)
    if done.skipped:
        listing = "; ".join(f"{s.id} ({s.error})" for s in done.skipped[:10])
        from ..textsafe import printable

        from ..recovery import needing_an_operator

        click.echo(f"Error: {needing_an_operator(len(done.skipped), 'recovered')}: {printable(listing)}", err=True)
    _say_stopped(state, stopped)
    if done.skipped:
        click.get_current_context().exit(EXIT_ERROR)


@cli.command("reset-all")
@common_options
@threshold_options
@output_options
@destination_options(deliver=True)
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Show which audits would be reset; change nothing.")
@click.option("--since", type=MOMENT, default=None, help="Only audits that failed after this (2h = two hours ago, or ISO time).")
@click.option("--reason", "reasons", type=ListType(RECOVERY_REASONS), multiple=True,
              help="Only audits recovered for this reason; repeatable, comma-separated.")
@click.option("--origin", "origins", type=ListType(("stuck", "error")), multiple=True,
              help="stuck: recovered by auditctl; error: failed with their own error. Default: both.")
@max_resets_option()
@click.option("--include-stuck", is_flag=True, help="First recover stuck running audits, then reset them too.")
def reset_all(state, policy, allow_unsafe, fmt, assume_yes, dry_run, since, reasons, origins, max_resets, include_stuck):
    """Reset failed audits to pending: the "Reset All Audits" button.

    Shows what it will take, by origin (recovered as stuck, by reason, or failed with
    their own error), then asks. Without a terminal it refuses unless --yes is given, and
    changes nothing. Works in batches, each atomic and each reset recorded in the audit's
    history; an audit reset --max-resets times already is left failed.
    """
    from ..history import Actor
    from ..records import planned_stuck_reset_record
    from ..recovery import ResetFilters, plan_reset_all, reset_all, reset_failed
    from .records import RESET_COLUMNS, reset_record
    from .render import render

    reasons, origins = flatten(reasons), flatten(origins)
    filters = ResetFilters(since=since, reasons=reasons, origins=origins, max_resets=max_resets or None)
    actor = Actor.command("reset-all")
    if include_stuck:
        check_bounds(state, policy, allow_unsafe)
    plan = plan_reset_all(state.reader, filters, include_stuck=include_stuck, policy=policy)
    total = plan.total
    summary = _reset_summary(plan, policy if include_stuck else None)

    def listing():
        planned = reset_failed(state.reader, actor=actor, filters=filters, dry_run=True)
        return [reset_record(r, True) for r in planned] + [planned_stuck_reset_record(v) for v in plan.stuck]

    if total == 0:
        render([], RESET_COLUMNS, fmt)  # json's [] and csv's header; nothing in the human formats
        echo_status(state, "Nothing to reset." + (f"\n{summary}" if plan.held_back or plan.stuck_held_back else ""))
        return
    if dry_run:
        render(listing(), RESET_COLUMNS, fmt, title="Would reset")
        echo_status(state, f"Would reset {_plural(total, 'audit')} to pending (dry run: nothing changed).\n{summary}")
        return
    if not assume_yes:
        if not sys.stdin.isatty():
            raise_refusal(total)
        if total <= 20:
            render(listing(), RESET_COLUMNS, "table", title="Will reset", err=True)  # with the question, not in the data
        click.echo(summary, err=True)
        try:
            confirmed = click.confirm(f"Reset {_plural(total, 'audit')} to pending?", default=False, err=True)
        except click.Abort:
            confirmed = False
            click.echo("", err=True)
        if not confirmed:
            click.echo("Aborted: nothing changed.", err=True)
            click.get_current_context().exit(EXIT_REFUSED)
    update, finish = progress_reporter("Resetting")
    try:
        done, stopped = _until_stopped(lambda: reset_all(state.engine, plan, actor=actor, policy=policy, on_batch=update))
    finally:
        finish()
    if fmt is not None or len(done) <= 20:  # a long listing only when asked for by its format
        render((reset_record(r, False) for r in done), RESET_COLUMNS, fmt, title="Reset")
    left_alone = plan.left_alone(done, stopped)
    echo_status(state, f"Reset {_plural(len(done), 'audit')} to pending"
                + (f"; {left_alone} changed meanwhile and were left alone" if left_alone > 0 else "") + ".", force=True)
    if assume_yes:  # nobody saw the summary: say what the reset limit held back (not an error: exit 0)
        for line in _held_back(plan):
            echo_status(state, line)
    if done.skipped:
        from ..recovery import needing_an_operator

        click.echo(f"Error: {needing_an_operator(len(done.skipped), 'reset')}: "
                   + ", ".join(str(s.id) for s in done.skipped[:20]), err=True)
    _say_stopped(state, stopped)
    if done.skipped:
        click.get_current_context().exit(EXIT_ERROR)


def _until_stopped(change):
    """``recovery.until_stopped``; a database that refused every write before any batch committed
    (a read-only role, a standby) is told with "nothing was changed", as it is so."""
    from ..errors import WriteRefused
    from ..recovery import until_stopped

    try:
        return until_stopped(change)
    except WriteRefused as error:  # raised by until_stopped only when no batch had committed
        raise WriteRefused(f"{error}; nothing was changed") from error


def _say_stopped(state, stopped: AuditctlError | None) -> None:
    from ..recovery import stopped_partway

    if stopped is not None:
        echo_status(state, f"Stopped partway by the error below: {stopped_partway('changed', 'counted above')}: "
                           "run it again.", force=True)
        raise stopped


def _reset_summary(plan, policy) -> str:
    parts = []
    if plan.by_origin.get("stuck"):
        reasons = _counts(plan.by_reason, RECOVERY_REASONS)
        parts.append(f"{plan.by_origin['stuck']} recovered as stuck ({reasons})")
    if plan.by_origin.get("error"):
        parts.append(f"{plan.by_origin['error']} failed with their own error")
    lines = [("Failed audits to reset: " + "; ".join(parts) + ".") if parts else "No failed audits to reset."]
    if plan.stuck:
        lines.append(f"Stuck running audits to recover first: {len(plan.stuck)}.")
    lines += _held_back(plan)
    if policy is not None:
        lines.append(f"Thresholds: {policy.describe()}.")
    return "\n".join(lines)


def _held_back(plan) -> list[str]:
    """What the reset limit leaves alone, one line each for failed and stuck running audits: in the
    summary before the question (or the dry run's), and after an unattended reset."""
    lines = []
    for count, what, stays in ((plan.held_back, "audit", "failed"), (plan.stuck_held_back, "stuck audit", "running")):
        if count:
            lines.append(f"{_plural(count, what)} already reset {_plural(plan.max_resets, 'time')} "
                         f"{'stays' if count == 1 else 'stay'} {stays} (--max-resets to change).")
    return lines


def raise_refusal(total: int) -> None:
    click.echo(
        f"Error: refusing to reset {_plural(total, 'audit')} without confirmation: there is no terminal to ask on. "
        f"Pass --yes to confirm, or --dry-run to look first. Nothing was changed.",
        err=True,
    )
    click.get_current_context().exit(EXIT_REFUSED)
