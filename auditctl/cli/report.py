"""``auditctl report``: what makes audits stick, and (``--suggest-thresholds``) thresholds learned per kind.

The analysis is the library's (``auditctl.report``, ``auditctl.learn``); this module parses
the options, calls it, and renders: a terminal report (chart, tables, sentences) that fits
80 columns, json and csv for dashboards, and a config block in toml.
"""

from __future__ import annotations

import json

import click

from .app import cli
from .options import DURATION, MOMENT, common_options, threshold_options
from .render import echo

REPORT_FORMATS = ("table", "plain", "json", "csv", "toml")
#: Default windows: a week for the report, a month of history to learn thresholds from.
DEFAULT_SINCE = 7 * 86400.0
DEFAULT_SUGGEST_SINCE = 30 * 86400.0
#: The chart never grows wider than this, whatever the terminal.
CHART_WIDTH = 80


@cli.command()
@common_options
@threshold_options
@click.option("--since", type=MOMENT, default=None,
              help="How far back to look: a duration (7d; 30d with --suggest-thresholds) or an ISO 8601 time.")
@click.option("--suggest-thresholds", "suggest", is_flag=True,
              help="Propose stale_after, stall_after and max_age per kind from completed audits.")
@click.option("--interval", type=DURATION, default="5m", show_default=True, envvar="AUDITCTL_INTERVAL", show_envvar=True,
              help="The monitor's interval (watch --interval), added to the detection latency of proposals.")
@click.option("-o", "--format", "fmt", type=click.Choice(REPORT_FORMATS), default=None,
              help="Output format: table|plain|json|csv, and toml with --suggest-thresholds (a [kinds.NAME] "
                   "block to paste into the config file). Default: table on a terminal, plain when piped.")
def report(state, policy, allow_unsafe, since, suggest, interval, fmt):
    """Report what makes audits stick: when, why, where, how fast it was caught, and whether more workers are needed.

    Over the --since window: stuck audits per hour or per day as a chart; by reason,
    worker, step, target and kind; time to detection (last heartbeat to recovery) and to
    recovery (last heartbeat to running again); how often a recovered audit's worker came
    back and was refused; the outliers in words; and, from the backlog, throughput and
    wait time, whether the fleet needs more workers (with the assumptions).

    With --suggest-thresholds: per kind, from the audits that completed, proposals for
    stale_after, stall_after and max_age (99th percentile of what healthy audits showed,
    x1.5, rounded up; at least two heartbeat intervals), each with the false-recovery
    rate it would have had on that history and the detection latency it gives.
    """
    from .render import resolve_format

    if fmt == "toml" and not suggest:
        raise click.UsageError("--format toml goes with --suggest-thresholds")
    fmt = resolve_format(fmt)
    if suggest:
        from ..learn import suggest_thresholds

        found = suggest_thresholds(state.reader, since or DEFAULT_SUGGEST_SINCE, policy, interval=interval)
        _render_suggestions(found, fmt)
        return
    from ..report import stuck_report

    # The threshold in force: --stale-after when given, else the fleet's (env, config file, default).
    stale_after, _source = policy.resolve("stale_after")
    _render_report(stuck_report(state.reader, since or DEFAULT_SINCE, stale_after=stale_after), fmt)


# --- helpers -----------------------------------------------------------------------------------


def _dur(seconds) -> str:
    from ..thresholds import format_duration

    return "-" if seconds is None else format_duration(seconds)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _safe(text) -> str:
    from ..textsafe import printable

    return printable(text)


def _json(data) -> None:
    from ..textsafe import json_safe_text
    from .render import json_default

    echo(json_safe_text(json.dumps(data, default=json_default, ensure_ascii=False, indent=2)))


def _heading(text: str, fmt: str) -> None:
    echo("")
    _say(text, fmt, bold=True)


def _say(text: str, fmt: str, *, bold: bool = False, indent: str = "") -> None:
    """A sentence wrapped to the output's width (80 columns when piped), continuation lines indented.

    ``bold`` only in a table, and never under NO_COLOR or TERM=dumb (``ascii_only``), as the listings do."""
    import textwrap

    from .render import ascii_only, terminal_width

    width = min(CHART_WIDTH, terminal_width(fmt) or CHART_WIDTH)
    styled = bold and fmt == "table" and not ascii_only()
    for line in textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]:
        echo(click.style(line, bold=True) if styled else line)


def chart_lines(frequency: list[dict], bucket: str, width: int = CHART_WIDTH, *, ascii_bars: bool = False) -> list[str]:
    """One bar per hour or day: ``Mon 11-29  ████████  12``, fitted to ``width`` columns."""
    from datetime import datetime

    block = "#" if ascii_bars else "█"
    peak = max((slot["count"] for slot in frequency), default=0)
    digits = max(1, len(str(peak)))
    room = max(10, width - 9 - 2 - 2 - digits)
    lines = []
    for slot in frequency:
        moment = datetime.fromisoformat(slot["start"].replace("Z", "+00:00"))
        label = moment.strftime("%m-%d %Hh") if bucket == "hour" else moment.strftime("%a %m-%d")
        count = slot["count"]
        length = 0 if not peak else max(1 if count else 0, round(room * count / peak))
        lines.append(f"{label}  {(block * length).ljust(room)}  {str(count).rjust(digits)}")
    return lines


# --- the report --------------------------------------------------------------------------------


def _share_columns(label: str, extra: list, none: str = "(unknown)"):
    from .render import Column

    return [Column("key", label, min_width=10, human=lambda v: none if v is None else str(v)),
            Column("count", "COUNT", justify="right", fit="whole"),
            Column("share", "SHARE", justify="right", fit="whole", human=_pct)] + extra


def _records(shares) -> list[dict]:
    return [{"key": s.key, "count": s.count, "share": s.share, **s.extra} for s in shares]


def _render_report(found, fmt: str) -> None:
    from ..report import format_rate, format_share

    if fmt == "json":
        _json(found.as_dict())
        return
    if fmt == "csv":
        _report_csv(found)
        return
    from .render import Column, ascii_only, render, terminal_width

    data = found.as_dict()
    window = _dur(found.window_seconds)
    runs = found.recoveries + found.completed
    head = (f"Stuck audits since {data['since'][:16]}Z ({window}): {found.recoveries} recoveries of {found.audits} audits"
            + (f" ({format_share(found.recoveries / runs)} of {runs} finished runs)" if runs else ""))
    _say(head, fmt, bold=True)
    if found.unreadable_events:
        echo(f"({found.unreadable_events} history rows skipped: their time cannot be read, "
             "or reads as outside the window)")
    width = min(CHART_WIDTH, terminal_width(fmt) or CHART_WIDTH)
    _heading(f"Per {found.bucket}", fmt)
    for line in chart_lines(data["frequency"], found.bucket, width, ascii_bars=ascii_only() or fmt == "plain"):
        echo(line)
    if found.recoveries:
        _heading("By reason", fmt)
        render(_records(found.by_reason), _share_columns("REASON", [
            Column("time_lost_mean_seconds", "TIME LOST (MEAN)", justify="right", fit="whole", human=_dur),
            Column("time_lost_p95_seconds", "P95", justify="right", fit="whole", human=_dur)]), fmt)
        _heading("By worker", fmt)
        render(_records(found.by_worker), _share_columns("WORKER", [
            Column("stuck_rate", "STUCK RATE", justify="right", fit="whole", human=_pct),
            Column("came_back", "CAME BACK", justify="right", fit="whole"),
            Column("top_step", "MOSTLY AT STEP", from_record=True, shrink=1,
                   human=lambda r: "-" if not r.get("top_step") else f"{r['top_step']} ({_pct(r['top_step_share'])})")]), fmt)
        _heading("By step", fmt)
        render(_records(found.by_step), _share_columns("STEP", [
            Column("top_worker", "MOSTLY ON", from_record=True, shrink=1,
                   human=lambda r: "-" if not r.get("top_worker") else f"{r['top_worker']} ({_pct(r['top_worker_share'])})")]),
               fmt)
        if found.step_unknown:
            echo(f"(step unknown for {found.step_unknown}: recovered again before the step was kept)")
        _heading("By target", fmt)
        render(_records(found.by_target), _share_columns("TARGET", []), fmt)
        _heading("By kind", fmt)
        render(_records(found.by_kind), _share_columns("KIND", [], none="(no kind)"), fmt)
        _heading("Timing", fmt)
        d, r = found.detection, found.recovery
        _say(f"Time to detection (last heartbeat to recovery): mean {_dur(d.mean_seconds)}, "
             f"p95 {_dur(d.p95_seconds)} (n={d.count})", fmt)
        _say(f"Time to recovery (last heartbeat to running again): mean {_dur(r.mean_seconds)}, "
             f"p95 {_dur(r.p95_seconds)} (n={r.count}; {found.never_ran_again} not run again yet)", fmt)
        _say(f"Workers that came back after their audit was recovered and were refused: {found.came_back} of "
             f"{found.recoveries} recoveries ({found.came_back / found.recoveries:.0%}); "
             f"{found.lease_lost_writes} refused writes in all", fmt)
        _heading("What stands out", fmt)
        if found.outliers:
            for outlier in found.outliers[:8]:
                _say(f"- {_safe(outlier.text)}", fmt, indent="  ")
        else:
            echo("- Nothing: no worker, step, target or kind accounts for an outsized share.")
    else:
        echo("")
        echo("No audit was recovered as stuck in this window.")
    c = found.capacity
    _heading("Capacity", fmt)
    _say(f"Backlog: {c.pending} pending" + (f", oldest waiting {_dur(c.oldest_pending_seconds)}" if c.pending else "")
         + f". Throughput: {format_rate(c.completed_per_hour)} completed/hour ({c.completed} in the window); "
         f"arrivals {format_rate(c.arrivals_per_hour)}/hour.", fmt)
    _say(f"Wait before start: mean {_dur(c.wait.mean_seconds)}, p95 {_dur(c.wait.p95_seconds)} (n={c.wait.count}); "
         f"mean run {_dur(c.mean_run_seconds)}.", fmt)
    _say(f"Verdict: {c.verdict}.", fmt, bold=True)
    _say("Assuming " + "; ".join(c.assumptions) + ".", fmt)


#: In the csv, the figures a breakdown's own row carries (``value``, ``detail``) beside its count and
#: share; every other figure of the breakdown gets a row of its own.
_ROW_VALUE = ("time_lost_mean_seconds", "stuck_rate")
_ROW_DETAIL = ("top_step", "top_worker")
#: Top-level figures with rows of their own section (``came_back``); the others are ``totals``.
_CAME_BACK = ("came_back", "lease_lost_writes")


def _cells(name: str, value) -> dict:
    """Where a figure goes in a csv row: text in ``detail``, whole numbers in ``count``, shares in
    ``share``, any other number (seconds, rates) in ``value``."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"detail": value}
    if isinstance(value, int) and not isinstance(value, bool):
        return {"count": value}
    return {"share": value} if name.endswith("share") else {"value": value}


def _figure_rows(section: str, key, figures: dict, shown=()) -> list[dict]:
    """One row per figure of ``figures`` not in ``shown``: section ``SECTION.NAME`` (``.``-joined
    through nested objects), the same key, and the figure in its column (``_cells``)."""
    rows = []
    for name, value in figures.items():
        if name in shown:
            continue
        if isinstance(value, dict):
            rows += _figure_rows(f"{section}.{name}", key, value)
        else:
            rows.append({"section": f"{section}.{name}", "key": key, **_cells(name, value)})
    return rows


def _timing_rows(name: str, timing: dict) -> list[dict]:
    return [{"section": "timing", "key": f"{name}_{figure}_seconds", "count": timing["count"],
             "value": timing[f"{figure}_seconds"]} for figure in ("mean", "p95")]


def _report_csv(found) -> None:
    """Long format: section, key, count, share, value (seconds or a rate), detail. Made from the JSON
    (``as_dict``), so it holds every figure the JSON has: a test compares the two."""
    from .render import Column, render

    data = found.as_dict()
    rows = []
    for name, value in data.items():
        if not isinstance(value, (dict, list)) and name not in _CAME_BACK:
            rows.append({"section": "totals", "key": name, **_cells(name, value)})
    for slot in data["frequency"]:
        rows.append({"section": f"per_{found.bucket}", "key": slot["start"], "count": slot["count"]})
        for reason, count in slot["by_reason"].items():
            rows.append({"section": f"per_{found.bucket}.by_reason", "key": slot["start"], "count": count, "detail": reason})
    for section in ("by_reason", "by_worker", "by_step", "by_target", "by_kind"):
        for share in data[section]:
            extra = share["extra"]
            value = next((name for name in _ROW_VALUE if name in extra), None)
            detail = next((name for name in _ROW_DETAIL if name in extra), None)
            rows.append({"section": section, "key": share["key"], "count": share["count"], "share": share["share"],
                         "value": extra.get(value), "detail": extra.get(detail)})
            rows += _figure_rows(section, share["key"], extra, shown=(value, detail))
    for name in ("detection", "recovery"):
        rows += _timing_rows(name, data[name])
    rows += _timing_rows("wait", data["capacity"]["wait"])
    rows.append({"section": "came_back", "key": "recoveries_refused_later", "count": data["came_back"],
                 "share": round(data["came_back"] / data["recoveries"], 4) if data["recoveries"] else None})
    rows.append({"section": "came_back", "key": "lease_lost_writes", "count": data["lease_lost_writes"]})
    for outlier in data["outliers"]:
        rows.append({"section": "outlier", "key": outlier["value"], "count": outlier["count"], "share": outlier["share"],
                     "detail": outlier["text"]})
        rows += _figure_rows("outlier", outlier["value"], outlier, shown=("value", "count", "share", "text"))
    for key, value in data["capacity"].items():
        if key == "assumptions":
            rows += [{"section": "capacity", "key": "assumption", "detail": text} for text in value]
        elif isinstance(value, str):
            rows.append({"section": "capacity", "key": key, "detail": value})
        elif not isinstance(value, dict):  # the wait is a timing, above
            whole = isinstance(value, int) and not isinstance(value, bool)
            rows.append({"section": "capacity", "key": key, "count" if whole else "value": value})
    render(rows, [Column(k, k) for k in ("section", "key", "count", "share", "value", "detail")], "csv")


# --- suggestions -------------------------------------------------------------------------------


#: The columns of ``report --suggest-thresholds -o csv``, the same with or without data.
SUGGESTION_KEYS = ("kind", "threshold", "completed", "samples", "current_seconds", "current_source",
                   "current_false_recoveries", "current_false_recovery_rate", "proposed_seconds", "proposed",
                   "false_recoveries", "false_recovery_rate", "detection_latency_seconds", "observed_p50_seconds",
                   "observed_p99_seconds", "observed_max_seconds", "note")


def _suggestion_records(found) -> list[dict]:
    records = []
    for item in found.kinds:
        for name, p in item.proposals.items():
            records.append({
                "kind": item.kind, "threshold": name, "completed": item.completed, "samples": p.samples,
                "current_seconds": p.current_seconds, "current_source": p.current_source,
                "current_false_recoveries": p.current_false_recoveries,
                "current_false_recovery_rate": p.current_false_recovery_rate,
                "proposed_seconds": p.seconds, "proposed": p.text, "false_recoveries": p.false_recoveries,
                "false_recovery_rate": p.false_recovery_rate, "detection_latency_seconds": p.detection_latency_seconds,
                "observed_p50_seconds": p.observed_p50, "observed_p99_seconds": p.observed_p99,
                "observed_max_seconds": p.observed_max, "note": p.floor or item.note,
            })
    return records


def _render_suggestions(found, fmt: str) -> None:
    from ..report import format_share

    if fmt == "json":
        _json(found.as_dict())
        return
    if fmt == "toml":
        import tomllib

        from ..config import validate_config
        from ..learn import to_toml

        block = to_toml(found)
        # What is printed must be what the config file accepts: checked here, every time.
        validate_config(tomllib.loads(block), "(suggested block)")
        echo(block, nl=False)
        return
    from .render import Column, render

    records = _suggestion_records(found)
    if fmt == "csv":
        render(records, [Column(k, k) for k in SUGGESTION_KEYS], "csv")
        return
    if not records:
        echo("No audit completed in this window: nothing to learn from.")
        return

    def rate(value):
        return "-" if value is None else format_share(value)

    columns = [
        Column("threshold", "THRESHOLD", fit="whole"),
        Column("current_seconds", "NOW", fit="whole", justify="right", human=_dur),
        Column("current_false_recovery_rate", "WRONG NOW", justify="right", fit="whole", human=rate),
        Column("proposed", "PROPOSED", fit="whole", justify="right"),
        Column("false_recovery_rate", "WRONG THEN", justify="right", fit="whole", human=rate),
        Column("detection_latency_seconds", "CAUGHT IN", justify="right", fit="whole", human=_dur),
        Column("observed", "SEEN P99/MAX", from_record=True, justify="right", fit="whole",
               human=lambda r: f"{_dur(r['observed_p99_seconds'])}/{_dur(r['observed_max_seconds'])}"),
        Column("note", "NOTE", detail=True),
    ]
    _say("Thresholds learned from completed audits", fmt, bold=True)
    for item in found.kinds:
        name = "audits with no kind (fleet)" if item.kind is None else f"kind {_safe(item.kind)}"
        facts = [f"{item.completed} completed"]
        if item.heartbeat_interval is not None:
            facts.append(f"heartbeat every {_dur(item.heartbeat_interval)}")
        if item.declaring_own:
            facts.append(f"{item.declaring_own} ran under their worker's own thresholds")
        if item.false_recovery_rate is not None:
            facts.append(f"proposals would have recovered {item.false_recoveries} wrongly ({format_share(item.false_recovery_rate)})")
        _heading(f"{name}: " + "; ".join(facts), fmt)
        if item.enough:
            render([r for r in records if r["kind"] == item.kind], columns, fmt)
        else:
            _say(f"no proposal: {item.note}", fmt)
    from ..learn import method_summary
    from ..thresholds import format_duration

    echo("")
    _say("NOW: in force (flag, kind or fleet). WRONG: completed (healthy) audits the threshold would have recovered. "
         f"CAUGHT IN: threshold plus one {format_duration(found.interval)} monitor interval, from the last heartbeat "
         "(stale_after), last progress (stall_after) or start (max_age).", fmt)
    _say(f"Method: {method_summary()}", fmt)
    _say("Paste-ready: auditctl report --suggest-thresholds --format toml", fmt)
