"""The columns people see for each listing, over the library's records.

The records (the stable JSON contract, ``*_record``) are ``auditctl.records``'; they are
imported here for the commands. The ``*_COLUMNS`` lists say how the table, plain, markdown
and csv views show them: the same columns in every format. Times are exact ISO 8601 UTC in
the records (json, csv) and short relative ages in the human views ("17m ago", "in the future").
"""

from __future__ import annotations

from ..records import (  # noqa: F401 - the records are the library's; the columns are this face's
    audit_record,
    event_record,
    instance_note,
    instance_record,
    instance_state,
    recovery_record,
    reset_record,
    unreadable_verdict_record,
    verdict_record,
)
from ..thresholds import FUTURE_TOLERANCE, format_duration
from .render import Column, Lines, status_style

#: A time this far ahead of the database's clock is shown as "in the future" (another writer's clock).
FUTURE = -FUTURE_TOLERANCE


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"


def ago(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < FUTURE:
        return "in the future"
    return f"{format_duration(max(0.0, seconds))} ago"


def _dur(seconds) -> str:
    return "-" if seconds is None else format_duration(max(0.0, seconds))


def _progress(record: dict) -> str:
    step, percentage = record.get("step"), record.get("percentage")
    if step is None and percentage is None:
        return "-"
    return " ".join(part for part in (_pct(percentage) if percentage is not None else None, step) if part)


def _lines(values) -> Lines | str:
    return Lines(values) if values else "-"


VERDICT_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("reasons", "REASONS", fit="whole", human=_lines,
           style=lambda r: "red" if {"stale_heartbeat", "worker_gone"} & set(r["reasons"]) else "yellow"),
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("step", "STEP", human=_progress, from_record=True, min_width=4, shrink=2,
           csv_keys=("step", "percentage")),
    Column("silence_seconds", "SILENT", human=_dur, justify="right", fit="whole"),
    Column("age_seconds", "AGE", human=_dur, justify="right", fit="whole"),
    Column("explanation", "WHY", human=_lines, fit="wrap", detail=True, label="why", min_width=20),
    Column("problems", "PROBLEMS", human=_lines, fit="wrap", detail=True, label="problems", min_width=12,
           style=lambda r: "magenta"),
]


RECOVERY_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("status", "NEW STATUS", fit="whole", style=status_style, csv_keys=("status", "dry_run")),
    Column("explanation", "WHY", human=_lines, fit="wrap", detail=True, label="why", min_width=20),
    Column("problems", "PROBLEMS", human=_lines, fit="wrap", detail=True, label="problems", min_width=12),
]


RESET_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("origin", "ORIGIN", fit="whole"),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("resets", "RESETS", justify="right", fit="whole"),
    Column("status", "TO", fit="whole", csv_keys=("status", "dry_run")),
    Column("error", "ERROR", fit="wrap", detail=True, label="error", min_width=20),
]


AUDIT_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("status", "STATUS", fit="whole", style=status_style),
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("step", "STEP", human=_progress, from_record=True, min_width=8, shrink=2,
           csv_keys=("step", "percentage")),
    Column("heartbeat_age_seconds", "HEARD", human=ago, justify="right", fit="whole"),
    Column("attempts", "TRIES", justify="right", fit="whole"),
    Column("created_at", "CREATED", human=lambda r: ago(r.get("created_age_seconds")), from_record=True, justify="right",
           fit="whole"),
    Column("error", "ERROR", fit="wrap", detail=True, label="error", min_width=20),
    Column("problems", "PROBLEMS", human=_lines, fit="wrap", detail=True, label="problems", min_width=12),
]


EVENT_COLUMNS = [
    Column("at", "AT", fit="whole"),
    Column("event", "EVENT", fit="whole"),
    Column("from_status", "FROM", fit="whole"),
    Column("to_status", "TO", fit="whole"),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("actor", "BY", min_width=10),
]


_STATE_STYLES = {"alive": "green", "gone": "red", "silent": "dim", "unreadable": "bold red"}


def _note(record: dict) -> str:
    return instance_note(record) or "-"


INSTANCE_COLUMNS = [
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("instance_id", "INSTANCE", human=lambda v: (v or "?")[:8], fit="whole"),
    Column("host", "HOST", min_width=8, shrink=1),
    Column("pid", "PID", justify="right", fit="whole"),
    Column("heartbeat_age_seconds", "HEARD", human=ago, justify="right", fit="whole"),
    Column("alive", "STATE", human=instance_state, from_record=True, fit="whole", csv_keys=("alive", "heartbeat_late", "gone"),
           style=lambda r: _STATE_STYLES[instance_state(r)]),
    Column("running_audits", "AUDITS", justify="right", fit="whole"),
    Column("duplicate", "NOTE", human=_note, from_record=True, fit="wrap", detail=True, label="note",
           csv_keys=("duplicate", "problems"),
           style=lambda r: "bold red" if r.get("duplicate") or r.get("problems") else "dim"),
]
