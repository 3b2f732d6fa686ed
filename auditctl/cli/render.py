"""The one renderer for every listing: rich table, plain, markdown, csv or json.

Commands hand over records (dicts of JSON-ready values, the stable JSON contract) and
column specs (how a human sees each value). ``json`` writes one array, streamed record
by record so a listing of 100,000 audits never sits in memory twice; it goes through
``json.dumps``, never through rich. The default format is a table on a terminal and
plain text when stdout is piped.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

import click


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    human: Callable | None = None  # value -> text for table/plain/markdown
    justify: str = "left"
    style: Callable | None = None  # record -> rich style (table only)
    max_width: int | None = None


def resolve_format(fmt: str | None) -> str:
    if fmt:
        return fmt
    return "table" if sys.stdout.isatty() else "plain"


def json_default(value):
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")) or None, highlight=False)


def _human(column: Column, record: dict) -> str:
    value = record.get(column.key)
    if column.human is not None:
        return column.human(value)
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def render(records: Iterable[dict], columns: list[Column], fmt: str | None, *, title: str | None = None,
           empty: str | None = None) -> int:
    """Write records in the chosen format; returns how many were written."""
    fmt = resolve_format(fmt)
    out = sys.stdout
    if fmt == "json":
        return _render_json(records, out)
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.key for c in columns])
        count = 0
        for record in records:
            writer.writerow([_csv_value(record.get(c.key)) for c in columns])
            count += 1
        return count
    rows = list(records)
    if not rows and empty:
        click.echo(empty, err=True)
        return 0
    if fmt == "table":
        _render_rich(rows, columns, title)
    else:
        from tabulate import tabulate

        table = [[_human(c, r) for c in columns] for r in rows]
        tablefmt = "github" if fmt == "markdown" else "plain"
        if rows:
            click.echo(tabulate(table, headers=[c.header for c in columns], tablefmt=tablefmt, disable_numparse=True))
    return len(rows)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=json_default)
    if isinstance(value, datetime):
        return iso(value)
    return value


def _render_json(records: Iterable[dict], out) -> int:
    count = 0
    out.write("[")
    for record in records:
        out.write(",\n  " if count else "\n  ")
        out.write(json.dumps(record, default=json_default, ensure_ascii=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    out.flush()
    return count


def render_object(record: dict) -> None:
    """One JSON object (``show``)."""
    click.echo(json.dumps(record, default=json_default, indent=2, ensure_ascii=False))


def rich_table(rows: list[dict], columns: list[Column], title: str | None = None):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column.header, justify=column.justify, max_width=column.max_width, overflow="fold")
    for row in rows:
        style = None
        for column in columns:
            if column.style is not None:
                style = column.style(row) or style
        # Text, not str: a target like "https://x/[admin]" must not be read as rich markup.
        table.add_row(*[Text(_human(c, row)) for c in columns], style=style)
    return table


def _render_rich(rows: list[dict], columns: list[Column], title: str | None) -> None:
    console().print(rich_table(rows, columns, title))


STATUS_STYLES = {"running": "cyan", "completed": "green", "failed": "red", "pending": "yellow"}


def status_style(record: dict) -> str | None:
    return STATUS_STYLES.get(record.get("status"))
