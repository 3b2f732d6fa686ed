"""The one renderer for every listing: table, wide, plain, markdown, csv or json.

Commands hand over records (dicts of JSON-ready values: the stable JSON contract) and
column specs (how a person sees each value). The formats:

* ``table``: aligned columns fitted to the terminal, with colour; the default on a terminal.
* ``plain``: the same layout without colour, fitted to 80 columns (or ``$COLUMNS``); the
  default when stdout is piped. ``TERM=dumb`` and ``NO_COLOR`` make ``table`` plain ASCII.
* ``wide`` (or ``--wide``): every column on one line, nothing cut.
* ``markdown``: a GitHub table; ``csv``: the same columns, exact values; ``json``: one
  array, streamed record by record, through ``json.dumps`` only.

Fitting: columns marked ``whole`` (ids, reason codes, ages) are never cut; ``truncate``
columns (targets, workers) lose their end to an ellipsis; ``detail`` columns (the
explanation, the problems) move to an indented line under their row when the row would
not fit. Every cell from the database goes through ``textsafe``: an escape sequence in a
target is shown, never sent to the terminal.
"""

from __future__ import annotations

import csv
import errno
import functools
import json
import os
import sys
import re
import textwrap
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable

import click

from ..gcpause import listing_pause
from ..textsafe import clipped, csv_cell, json_safe_text, markdown_cell, printable
from ..timestamps import iso

FORMATS = ("table", "wide", "plain", "json", "csv", "markdown")
#: Width of plain output when nothing says otherwise.
PLAIN_WIDTH = 80
GAP = 2


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    human: Callable | None = None  # value (or record, with from_record) -> text
    justify: str = "left"
    style: Callable | None = None  # record -> rich style (table only)
    # "whole": never cut; "truncate": end cut with an ellipsis; "wrap": word-wrapped; "fold": wrapped at
    # spaces and after a '/' only (a path or a name keeps its hyphens: "cli-" / "play" is no break)
    fit: str = "truncate"
    min_width: int = 8
    detail: bool = False  # on a narrow screen, shown on a line under the row
    label: str | None = None  # the detail line's label (default: the header in lower case)
    from_record: bool = False  # human() takes the whole record
    shrink: int = 0  # when the row is too wide, columns with a higher value give up their width first
    csv_keys: tuple[str, ...] | None = None  # the record keys this column stands for in csv (default: key)


def echo(message="", *, nl: bool = True, err: bool = False) -> None:
    """``click.echo`` into this process's own stdout (stderr as click does). Left to pick the stream,
    click takes an ASCII stdout (``PYTHONIOENCODING=ascii``, a C locale without UTF-8 mode) for a
    misconfigured one and writes UTF-8 past it, around the escapes ``group._prepare_streams`` set up
    for what that stdout cannot hold: ``show``, markdown and ``report`` would then write bytes the
    listings do not."""
    click.echo(message, nl=nl, err=err, file=None if err else sys.stdout)


def resolve_format(fmt: str | None) -> str:
    if fmt:
        return fmt
    return "table" if sys.stdout.isatty() else "plain"


def ascii_only() -> bool:
    """TERM=dumb, NO_COLOR, or a stdout that cannot hold "…": no colour, no characters beyond ASCII
    in the decorations."""
    return os.environ.get("TERM") == "dumb" or bool(os.environ.get("NO_COLOR")) or not _stdout_is_unicode()


def _stdout_is_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        "…┃".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def as_written(text: str) -> str:
    """``text`` as stdout writes it: where its encoding cannot hold a character, the escape that
    takes its place (``group._prepare_streams``). The layout measures this, so columns stay aligned."""
    if text.isascii() or _stdout_is_unicode():
        return text
    from ..textsafe import json_escapes_handler

    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    return text.encode(encoding, errors=json_escapes_handler()).decode(encoding)


def ellipsis_mark() -> str:
    """Where text is cut: "..." where decorations stay ASCII (``ascii_only``), else "…"."""
    return "..." if ascii_only() else "…"


def json_default(value):
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def console(stderr: bool = False, force_terminal: bool | None = None):
    """``force_terminal``: draw as on a terminal whatever the output is (``watch --live`` into a pipe)."""
    plain = ascii_only()
    return _console_class()(stderr=stderr, no_color=plain or None, highlight=False, emoji=False,
                            force_terminal=force_terminal, color_system=None if plain else "auto", legacy_windows=False)


@functools.cache
def _console_class():
    from rich.console import Console

    class PipeAwareConsole(Console):
        """A rich console that leaves a gone reader to the command, as every other write does.

        rich's own answer to a broken pipe is ``SystemExit(1)`` without a word, after pointing stdout
        at /dev/null (even when the pipe was stderr's): ``show --wide | head -1`` failed where the
        README promises exit 0, and a listing or ``watch`` could not finish its work first."""

        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more to write: the rest of this console's output is dropped
            raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")

    return PipeAwareConsole


def terminal_width(fmt: str) -> int | None:
    """How wide the output may be: None for no limit (wide, csv, json, markdown)."""
    columns = os.environ.get("COLUMNS")
    if columns and columns.isdigit() and int(columns) >= 20:
        explicit = int(columns)
    else:
        explicit = None
    if fmt == "plain":
        return explicit or PLAIN_WIDTH
    if fmt == "table":
        if explicit:
            return explicit
        import shutil

        return shutil.get_terminal_size((PLAIN_WIDTH, 24)).columns
    return None


class Lines(tuple):
    """What a column's ``human`` returns to show several lines in one cell (reasons, explanations)."""


def human_text(column: Column, record: dict) -> str:
    """A cell's text. Control characters are shown, never executed, and so is a newline inside a
    value (a target or an error another tool wrote): only a list's items are put on lines of
    their own, so no value can forge a line of the listing."""
    value = record if column.from_record else record.get(column.key)
    if column.human is not None:
        value = column.human(value)
        if type(value) is Lines:
            return "\n".join(printable(line) for line in value) or "-"
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ("\n" if column.fit == "whole" else ", ").join(printable(v) for v in value) or "-"
    if isinstance(value, datetime):
        text = iso(value)
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    else:
        text = value
    return printable(text) or "-"


def _cell_len(text: str) -> int:
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


_PARTIAL_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{0,3})?$")


def _truncate(text: str, width: int, ellipsis: str) -> str:
    # Cells, not characters: a combining accent ("e\u0301") is a character that takes no cell.
    if _cell_len(text) <= width:
        return text
    from rich.cells import set_cell_size

    if width <= len(ellipsis):
        return text[:width]
    kept = set_cell_size(text, width - len(ellipsis)).rstrip()
    if not _stdout_is_unicode():  # never half an escape that stands for a character (``as_written``)
        kept = _PARTIAL_ESCAPE.sub("", kept)
    return kept + ellipsis


@dataclass
class Layout:
    columns: list[Column]
    widths: list[int]
    details: list[Column]
    width: int | None


def plan_layout(rows: list[dict], columns: list[Column], width: int | None) -> tuple[Layout, list[list[str]]]:
    """Decide which columns go inline, and how wide each is, to fit ``width`` (None: no limit)."""
    texts = [[as_written(human_text(c, r)) for c in columns] for r in rows]
    if width is not None:
        texts = [[clipped(t) for t in row] for row in texts]

    def natural(index: int) -> int:
        longest = max((max(_cell_len(line) for line in row[index].split("\n")) for row in texts), default=0)
        return max(_cell_len(columns[index].header), longest)

    naturals = [natural(i) for i in range(len(columns))]
    everything = sum(naturals) + GAP * (len(columns) - 1)
    if width is None or everything <= width:
        return Layout(columns, naturals, [], width), texts
    inline = [i for i, c in enumerate(columns) if not c.detail]
    widths = {i: naturals[i] for i in inline}
    budget = width - GAP * (len(inline) - 1)
    flexible = [i for i in inline if columns[i].fit != "whole"]
    # Take from the least important flexible columns first (highest ``shrink``), widest first,
    # down to each one's minimum.
    while sum(widths.values()) > budget:
        candidates = [i for i in flexible if widths[i] > max(columns[i].min_width, _cell_len(columns[i].header))]
        if not candidates:
            break
        rank = max(columns[i].shrink for i in candidates)
        widest = max((i for i in candidates if columns[i].shrink == rank), key=lambda i: widths[i])
        widths[widest] -= 1
    layout = Layout([columns[i] for i in inline], [widths[i] for i in inline],
                    [c for c in columns if c.detail], width)
    keep = inline + [i for i, c in enumerate(columns) if c.detail]
    return layout, [[row[i] for i in keep] for row in texts]


def layout_lines(layout: Layout, texts: list[list[str]], records: list[dict], *, ellipsis: str = "…"):
    """Yield (segments, is_header) for each output line; a segment is (text, style or None)."""
    inline = len(layout.columns)
    header = []
    for index, (column, width) in enumerate(zip(layout.columns, layout.widths)):
        text = _truncate(column.header, width, ellipsis)
        padded = text.rjust(width) if column.justify == "right" else text.ljust(width)
        header.append((padded if index < inline - 1 else padded.rstrip(), "bold"))
    yield _join(header), True
    indent = layout.widths[0] + GAP if layout.columns else 0
    for row, record in zip(texts, records):
        cells = []
        for index, (column, width) in enumerate(zip(layout.columns, layout.widths)):
            lines = row[index].split("\n")
            if column.fit == "wrap":
                lines = [part for line in lines for part in (wrap(line, width) or [""])]
            elif column.fit == "fold":
                lines = [part for line in lines for part in (fold(line, width) or [""])]
            elif column.fit == "truncate":
                lines = [_truncate(line, width, ellipsis) for line in lines]
            style = column.style(record) if column.style is not None else None
            cells.append((lines, style))
        height = max((len(lines) for lines, _ in cells), default=1)
        for line_number in range(height):
            segments = []
            for index, ((lines, style), column, width) in enumerate(zip(cells, layout.columns, layout.widths)):
                text = lines[line_number] if line_number < len(lines) else ""
                text = _pad(text, width, column.justify)
                segments.append((text if index < inline - 1 else text.rstrip(), style))
            yield _join(segments), False
        for offset, column in enumerate(layout.details):
            text = row[inline + offset]
            if text in ("-", ""):
                continue
            label = (column.label or column.header.lower()) + ": "
            available = (layout.width or 10_000) - indent
            for line in text.split("\n"):
                wrapped = wrap(label + line, max(20, available), subsequent_indent=" " * len(label)) or [label]
                for piece in wrapped:
                    style = column.style(record) if column.style is not None else "dim"
                    yield [(" " * indent, None), (piece, style)], False
                label = " " * len(label)


def wrap(text: str, width: int, *, subsequent_indent: str = "") -> list[str]:
    """Lines of at most ``width`` terminal cells. ASCII text: ``textwrap.wrap``, without its cost for
    a line that already fits, which is most of them (the same lines: a property test compares the
    two; wrapping cost a third of a plain ``scan``). Other text is measured in cells: a Chinese
    character or an emoji takes two, which ``textwrap`` counts as one."""
    if not text.isascii():
        return _wrap_cells(text, width, subsequent_indent)
    if len(text) <= width and text.isprintable():
        kept = text.rstrip(" ")
        return [kept] if kept else []
    return textwrap.wrap(text, width, subsequent_indent=subsequent_indent)


#: What ``fold`` breaks between: a run of spaces (dropped at the break), or text up to and with a '/'.
_FOLD_PIECES = re.compile(r"\s+|[^\s/]*/+|[^\s/]+")


def fold(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` cells, broken at spaces and after a '/' only: a file's path folds
    between its directories, a word never at a hyphen (``textwrap`` breaks "cli-play" after "cli-").
    A piece no line holds is cut where the line ends."""
    lines: list[str] = []
    current, space = "", False
    width = max(1, width)
    for piece in _FOLD_PIECES.findall(text):
        if piece.isspace():
            space = bool(current)
            continue
        candidate = current + (" " if space else "") + piece
        space = False
        if _cell_len(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _cell_len(piece) > width:
            head, piece = _cut_cells(piece, width)
            lines.append(head)
        current = piece
    if current:
        lines.append(current)
    return lines


def _wrap_cells(text: str, width: int, indent: str) -> list[str]:
    """Greedy word wrap by cell width; a word wider than a line is cut where the line ends (text
    without spaces, as Chinese is written, is cut anywhere)."""
    lines: list[str] = []
    current = ""

    def room() -> int:
        return max(1, width - (_cell_len(indent) if lines else 0))

    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _cell_len(candidate) <= room():
            current = candidate
            continue
        if current:
            space = room() - _cell_len(current) - 1
            if _cell_len(word) > room() and space > 0 and _cell_len(word[0]) <= space:
                # A word no line holds is cut anyway: its start fills this line ("error: 错误…").
                head, word = _cut_cells(word, space)
                current = f"{current} {head}"
            lines.append(current)
            current = ""
        while _cell_len(word) > room():
            head, word = _cut_cells(word, room())
            lines.append(head)
        current = word
    if current:
        lines.append(current)
    return [line if number == 0 else indent + line for number, line in enumerate(lines)]


def _cut_cells(word: str, cells: int) -> tuple[str, str]:
    """``word`` split after as many characters as fit in ``cells`` (at least one)."""
    used = 0
    for index, char in enumerate(word):
        used += _cell_len(char)
        if used > cells:
            return word[:max(1, index)], word[max(1, index):]
    return word, ""


def _pad(text: str, width: int, justify: str) -> str:
    gap = max(0, width - _cell_len(text))
    return " " * gap + text if justify == "right" else text + " " * gap


def _join(segments):
    joined = []
    for index, segment in enumerate(segments):
        if index:
            joined.append((" " * GAP, None))
        joined.append(segment)
    return joined


class _Taken:
    """The records a listing took, counted: what it had written when its reader left."""

    __slots__ = ("records", "count")

    def __init__(self, records: Iterable[dict]):
        self.records, self.count = iter(records), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        record = next(self.records)
        self.count += 1
        return record


def discard_stdout() -> None:
    """The reader of stdout went away (``| head``): the rest of stdout goes nowhere, so later
    writes and the interpreter's last flush cannot fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def render(records: Iterable[dict], columns: list[Column], fmt: str | None, *, title: str | None = None,
           empty: str | None = None, err: bool = False) -> int:
    """Write records in the chosen format; returns how many were written. ``err`` writes them to
    stderr: a preview that goes with a question asked there, never into stdout's data.

    A reader that goes away (``| head``) cuts the listing, not the command: the count is of the
    records taken so far (the rest of ``records`` is left to the caller), and the command goes
    on to its summary, its alerts and its exit code."""
    with listing_pause():
        if err:
            return _render(records, columns, fmt, title=title, empty=empty, err=True)
        taken = _Taken(records)
        try:
            return _render(taken, columns, fmt, title=title, empty=empty, err=False)
        except BrokenPipeError:
            discard_stdout()
            return taken.count


def _render(records: Iterable[dict], columns: list[Column], fmt: str | None, *, title: str | None,
            empty: str | None, err: bool) -> int:
    fmt = resolve_format(fmt)
    out = sys.stderr if err else sys.stdout
    if fmt == "json":
        return _render_json(records, out)
    if fmt == "csv":
        return _render_csv(records, columns, out)
    rows = list(records)
    if not rows:
        if empty:
            echo(empty, err=True)
        return 0
    if fmt == "markdown":
        _render_markdown(rows, columns)
        return len(rows)
    width = None if fmt == "wide" else terminal_width(fmt)
    layout, texts = plan_layout(rows, columns, width)
    styled = fmt in ("table", "wide") and not ascii_only() and out.isatty()
    ellipsis = ellipsis_mark()
    if styled:
        from rich.text import Text

        term = console(stderr=err)
        if title:
            term.print(Text(title, style="bold"), soft_wrap=True)
        for segments, _header in layout_lines(layout, texts, rows, ellipsis=ellipsis):
            line = Text()
            for text, style in segments:
                line.append(text, style=style)
            term.print(line, soft_wrap=True, no_wrap=True, crop=False)
    else:
        if title and fmt in ("table", "wide"):
            echo(title, err=err)
        # Written as a stream and flushed once: click.echo flushes every line, one system call each.
        write = out.write
        for segments, _header in layout_lines(layout, texts, rows, ellipsis=ellipsis):
            write("".join(text for text, _style in segments).rstrip() + "\n")
        out.flush()
    return len(rows)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return csv_cell(",".join(str(v) for v in value))
    if isinstance(value, dict):
        return csv_cell(json.dumps(value, default=json_default, ensure_ascii=False))
    if isinstance(value, datetime):
        return iso(value)
    return csv_cell(value)


def _render_csv(records: Iterable[dict], columns: list[Column], out) -> int:
    writer = csv.writer(out, lineterminator="\n")
    keys = [key for c in columns for key in (c.csv_keys or (c.key,))]
    writer.writerow(keys)
    count = 0
    for record in records:
        writer.writerow([_csv_value(record.get(key)) for key in keys])
        count += 1
    return count


def _render_markdown(rows: list[dict], columns: list[Column]) -> None:
    echo("| " + " | ".join(markdown_cell(c.header) for c in columns) + " |")
    echo("|" + "|".join("---:" if c.justify == "right" else "---" for c in columns) + "|")
    for record in rows:
        cells = [markdown_cell(human_text(c, record).replace("\n", ", ")) for c in columns]
        echo("| " + " | ".join(cells) + " |")


def _render_json(records: Iterable[dict], out) -> int:
    encode = json.JSONEncoder(default=json_default, ensure_ascii=False).encode  # one encoder, not one per record
    count = 0
    out.write("[")
    for record in records:
        out.write(",\n  " if count else "\n  ")
        out.write(json_safe_text(encode(record)))
        count += 1
    out.write("\n]\n" if count else "]\n")
    out.flush()
    return count


def render_object(record: dict) -> None:
    """One JSON object (``show``)."""
    from ..documents import dumps

    echo(json_safe_text(dumps(record, indent=2, ensure_ascii=False)))


STATUS_STYLES = {"running": "cyan", "completed": "green", "failed": "red", "pending": "yellow"}


def status_style(record: dict) -> str | None:
    return STATUS_STYLES.get(record.get("status"))
