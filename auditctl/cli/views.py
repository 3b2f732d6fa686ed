"""``list``, ``show`` and ``workers``: read-only views for an operator."""

from __future__ import annotations

import click

from .app import cli
from .options import DURATION, common_options, echo_status, format_option

STATUSES = ("pending", "running", "completed", "failed")


@cli.command("list")
@common_options
@format_option
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only audits in this state.")
@click.option("--worker", default=None, metavar="WORKER_ID", help="Only audits of this worker.")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True, help="At most this many (0: no limit).")
def list_command(state, fmt, status, worker, limit):
    """List audits, newest first."""
    from ..audits import iter_audits
    from .records import AUDIT_COLUMNS, audit_record
    from .render import render, resolve_format

    records = (audit_record(a) for a in iter_audits(state.engine, status=status, worker=worker, limit=limit or None))
    shown = render(records, AUDIT_COLUMNS, fmt, title="Audits", empty="No audits match.")
    if shown and resolve_format(fmt) in ("table", "plain", "markdown"):
        more = " (--limit reached)" if limit and shown >= limit else ""
        echo_status(state, f"{shown} audit{'s' if shown != 1 else ''}{more}")


@cli.command()
@common_options
@format_option
@click.argument("audit_id", type=click.IntRange(min=1), metavar="ID")
def show(state, fmt, audit_id):
    """Show one audit: its progress document, recovery_info and full history."""
    from ..audits import get_audit
    from .records import audit_record, event_record
    from .render import iso, render, render_object, resolve_format

    detail = get_audit(state.engine, audit_id)
    record = audit_record(detail.summary)
    record.update(
        max_age_seconds=detail.max_age_seconds,
        worker_instance=detail.worker_instance,
        has_lease=detail.has_lease,
        last_worker_update=iso(detail.last_worker_update),
        progress=detail.progress,
        recovery_info=detail.recovery_info,
        history=[event_record(e) for e in detail.history],
    )
    fmt = resolve_format(fmt)
    if fmt == "json":
        render_object(record)
        return
    if fmt == "csv":
        render([{k: v for k, v in record.items() if k != "history"}], _csv_columns(record), "csv")
        return
    _show_human(record, detail, fmt)


def _csv_columns(record):
    from .render import Column

    return [Column(k, k) for k in record if k != "history"]


def _show_human(record: dict, detail, fmt: str) -> None:
    import json

    from .records import EVENT_COLUMNS, event_record
    from .render import render

    fields = [(k, record[k]) for k in ("id", "target", "status", "worker_id", "worker_instance", "step", "percentage",
                                       "attempts", "created_at", "started_at", "finished_at", "last_heartbeat",
                                       "last_worker_update", "max_age_seconds", "has_lease", "error", "problems")]
    documents = [("progress", record["progress"]), ("recovery_info", record["recovery_info"])]
    if fmt == "table":
        from rich.console import Group
        from rich.panel import Panel
        from rich.syntax import Syntax
        from rich.table import Table
        from rich.text import Text

        from .render import console, rich_table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in fields:
            grid.add_row(key, Text("-" if value in (None, [], "") else str(value)))
        out = console()
        out.print(Panel(grid, title=f"audit {record['id']}", title_align="left"))
        for name, document in documents:
            if document is not None:
                text = json.dumps(document, indent=2, default=str) if not isinstance(document, str) else document
                out.print(Panel(Group(Syntax(text, "json", word_wrap=True)), title=name, title_align="left"))
        out.print(rich_table([event_record(e) for e in detail.history], EVENT_COLUMNS, title="History")
                  if detail.history else Text("History: none"))
        return
    for key, value in fields:
        click.echo(f"{key}: {'-' if value in (None, [], '') else value}")
    for name, document in documents:
        click.echo(f"{name}: {json.dumps(document, default=str) if document is not None else '-'}")
    if not detail.history:
        click.echo("history: none")
        return
    click.echo("history:")
    render([event_record(e) for e in detail.history], EVENT_COLUMNS, fmt)


@cli.command()
@common_options
@format_option
@click.option("--all", "show_all", is_flag=True, help="Include instances that stopped cleanly.")
@click.option("--stale-after", "stale_after", default="10m", show_default=True, envvar="AUDITCTL_STALE_AFTER",
              type=DURATION, help="An instance on another host is alive if it beat within this.")
def workers(state, fmt, show_all, stale_after):
    """Each worker instance: last heartbeat, alive or not, audits it holds."""
    from ..registry import instances
    from .records import INSTANCE_COLUMNS, instance_record
    from .render import render

    found = instances(state.engine, stale_after, include_stopped=show_all)
    render((instance_record(i) for i in found), INSTANCE_COLUMNS, fmt, title="Workers", empty="No workers have registered.")
