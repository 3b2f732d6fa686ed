"""``list``, ``show`` and ``workers``: read-only views for an operator. None of them changes the database."""

from __future__ import annotations

import click

from ..statuses import STATUSES
from .app import cli
from .options import (DURATION, MAX_INT, MOMENT, LimitCut, ListType, common_options, echo_status, flatten,
                      output_options)
from .render import echo


class AuditIdType(click.ParamType):
    """An audit id: a whole number a database integer holds (``show -- -3`` for a negative one)."""

    name = "id"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from ..values import audit_id

        number = audit_id(str(value))
        if number is None:
            self.fail(f"{value!r} is not an audit id (a whole number that fits in 64 bits)", param, ctx)
        return number


@cli.command("list")
@common_options
@output_options
@click.option("--status", "statuses", type=ListType(STATUSES), multiple=True,
              help="Only audits in this state; repeatable, comma-separated.")
@click.option("--worker", "workers", type=ListType(metavar="WORKER_ID"), multiple=True, help="Only audits of this worker; repeatable, comma-separated.")
@click.option("--kind", "kinds", type=ListType(metavar="KIND"), multiple=True, help="Only audits of this kind; repeatable, comma-separated.")
@click.option("--target", "targets", type=ListType(metavar="GLOB"), multiple=True, help="Only targets matching this glob; repeatable, comma-separated.")
@click.option("--since", type=MOMENT, default=None, help="Only audits created after this (2h = two hours ago, or ISO time).")
@click.option("--until", type=MOMENT, default=None, help="Only audits created before this (2h = two hours ago, or ISO time).")
@click.option("--sort", type=click.Choice(("id", "created", "target", "status", "worker")), default="id", show_default=True,
              help="Order (newest first for id and created).")
@click.option("--reverse", is_flag=True, help="Reverse the order.")
@click.option("--limit", type=click.IntRange(0, MAX_INT), default=50, show_default=True, help="At most this many (0: no limit).")
def list_command(state, fmt, statuses, workers, kinds, targets, since, until, sort, reverse, limit):
    """List audits, newest first."""
    from ..audits import AuditFilters, iter_audits
    from .records import AUDIT_COLUMNS, audit_record
    from .render import render

    filters = AuditFilters(statuses=flatten(statuses), workers=flatten(workers), kinds=flatten(kinds),
                           targets=flatten(targets), since=since, until=until)
    descending = (sort in ("id", "created")) != reverse
    limited = LimitCut(limit)
    records = (audit_record(a) for a in limited(iter_audits(state.reader, filters, sort=sort, descending=descending,
                                                            limit=limited.asked)))
    shown = render(records, AUDIT_COLUMNS, fmt, title="Audits", empty="No audits match.")
    shown += sum(1 for _ in records)  # what a reader that left early (| head) did not take still counts
    if shown:  # every format: json and csv are cut at --limit (50 by default) too, and stderr is not their data
        more = " (--limit reached)" if limited.cut else ""
        echo_status(state, f"{shown} audit{'s' if shown != 1 else ''}{more}")


@cli.command()
@common_options
@output_options
@click.argument("audit_id", type=AuditIdType(), metavar="ID")
def show(state, fmt, audit_id):
    """Show one audit: its progress document, recovery_info and full history."""
    from ..audits import get_audit
    from ..records import audit_detail_record
    from .render import render, render_object, resolve_format

    record = audit_detail_record(get_audit(state.reader, audit_id))
    fmt = resolve_format(fmt)
    if fmt == "json":
        render_object(record)
        return
    if fmt == "csv":
        from .render import Column

        render([{k: v for k, v in record.items() if k != "history"}], [Column(k, k) for k in record if k != "history"], "csv")
        return
    if fmt == "markdown":
        _show_markdown(record)
        return
    _show_human(record, fmt)


_FIELDS = ("id", "target", "status", "kind", "worker_id", "worker_instance", "step", "percentage", "attempts", "resets",
           "created_at", "started_at", "finished_at", "last_heartbeat", "last_worker_update", "max_age_seconds",
           "declared_thresholds", "has_lease", "error", "problems")


def _field_text(value, whole: bool = False) -> str:
    """A field of ``show`` as text; cut at a cell's limit unless ``whole`` (``--wide``, markdown:
    nothing cut there, as in the listings)."""
    from ..documents import dumps

    if value in (None, [], "", {}):
        return "-"
    if isinstance(value, (dict, list)):
        text = dumps(value, ensure_ascii=False)
    elif isinstance(value, bool):
        return "yes" if value else "no"
    else:
        text = str(value)
    # A table cell's limit: another tool may have stored megabytes in a target or an error.
    from ..textsafe import clipped

    return text if whole else clipped(text)


def _document_text(document, whole: bool) -> str:
    import sys

    from ..documents import shown

    return shown(document, limit=sys.maxsize) if whole else shown(document)


def _show_human(record: dict, fmt: str) -> None:
    from ..textsafe import printable
    from .records import EVENT_COLUMNS
    from .render import ascii_only, console, render

    styled = fmt in ("table", "wide") and not ascii_only()
    whole = fmt == "wide"
    out = console() if styled else None
    for key in _FIELDS:
        text = printable(_field_text(record[key], whole))
        if out is not None:
            from rich.text import Text

            line = Text(f"{key}: ", style="bold")
            line.append(text)
            out.print(line, soft_wrap=True)
        else:
            echo(f"{key}: {text}")
    for name in ("progress", "recovery_info"):
        document = record[name]
        text = "-" if document is None else printable(_document_text(document, whole), keep_newlines=True)
        echo(f"{name}: {text}")
    if not record["history"]:
        echo("history: none")
        return
    echo("history:")
    render(record["history"], EVENT_COLUMNS, fmt)


def _show_markdown(record: dict) -> None:
    import re

    from ..textsafe import markdown_cell, printable
    from .records import EVENT_COLUMNS
    from .render import render

    echo(f"## Audit {record['id']}\n")
    echo("| field | value |\n|---|---|")
    for key in _FIELDS:
        echo(f"| {key} | {markdown_cell(_field_text(record[key], whole=True))} |")
    for name in ("progress", "recovery_info"):
        echo(f"\n### {name}\n")
        if record[name] is None:
            echo("none")
        else:
            # A fence longer than any run of backticks in the text, so the text cannot close it.
            text = printable(_document_text(record[name], whole=True), keep_newlines=True)
            fence = "`" * max(3, max((len(run) for run in re.findall("`+", text)), default=0) + 1)
            echo(f"{fence}json\n{text}\n{fence}")
    echo("\n### History\n")
    if not record["history"]:
        echo("none")
    else:
        render(record["history"], EVENT_COLUMNS, "markdown")


@cli.command()
@common_options
@output_options
@click.option("--all", "show_all", is_flag=True, help="Also instances gone for longer than the retention (24h).")
@click.option("--stale-after", "stale_after", default="10m", show_default=True, envvar="AUDITCTL_STALE_AFTER", show_envvar=True,
              type=DURATION, help="An instance on another host that declared no threshold is alive if it beat within this.")
def workers(state, fmt, show_all, stale_after):
    """Each worker instance: last heartbeat, alive, silent or provably gone, and the audits it holds.

    Instances gone (stopped, or dead, or silent) for longer than 24 hours are left out
    unless they still hold running audits, or --all is given.
    """
    from ..registry import GONE_RETENTION, instances
    from .records import INSTANCE_COLUMNS, instance_record
    from .render import render

    found = instances(state.reader, stale_after, retention=None if show_all else GONE_RETENTION)
    render((instance_record(i) for i in found), INSTANCE_COLUMNS, fmt, title="Workers", empty="No workers have registered.")
