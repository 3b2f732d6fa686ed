"""Library results as records (the stable JSON shape) and the columns people see.

Each ``*_record`` function defines the JSON contract of one listing; README documents
the same keys. The ``*_COLUMNS`` lists say how the table, plain, markdown and csv views
show them: the same columns in every format. Times are exact ISO 8601 UTC in the records
(json, csv) and short relative ages in the human views ("17m ago", "in the future").
"""

from __future__ import annotations

from ..thresholds import format_duration
from ..timestamps import iso
from .render import Column, status_style

#: A time this far ahead of the database's clock is shown as "in the future" (another writer's clock).
FUTURE = -60.0


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


def _lines(values) -> str:
    return "\n".join(str(v) for v in values) if values else "-"


def verdict_record(verdict) -> dict:
    return {
        "id": verdict.id,
        "target": verdict.target,
        "status": verdict.status,
        "kind": verdict.kind,
        "reasons": verdict.reasons,
        "worker_id": verdict.worker_id,
        "worker_instance": verdict.worker_instance,
        "step": verdict.step,
        "percentage": verdict.percentage,
        "last_heartbeat": iso(verdict.last_heartbeat),
        "started_at": iso(verdict.started_at),
        "age_seconds": verdict.age_seconds,
        "silence_seconds": verdict.silence_seconds,
        "stalled_seconds": verdict.stalled_seconds,
        "max_age_seconds": verdict.max_age_seconds,
        "thresholds": verdict.thresholds(),
        "explanation": verdict.explain(),
        "problems": verdict.problems,
    }


def unreadable_verdict_record(verdict, problem: str) -> dict:
    """What scan shows for a row it could not read: its id, the database's verdict, and what was wrong."""
    return {"id": verdict.id, "target": "?", "status": "running", "kind": None, "reasons": list(verdict.reasons),
            "worker_id": None, "worker_instance": None, "step": None, "percentage": None, "last_heartbeat": None,
            "started_at": None, "age_seconds": None, "silence_seconds": None, "stalled_seconds": None,
            "max_age_seconds": None, "thresholds": {}, "explanation": [], "problems": [f"row_unreadable: {problem}"]}


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


def recovery_record(recovery, dry_run: bool) -> dict:
    return {
        "id": recovery.id,
        "target": recovery.target,
        "reasons": recovery.reasons,
        "previous_status": recovery.from_status,
        "status": recovery.status,
        "worker_id": recovery.worker_id,
        "explanation": recovery.explanation,
        "thresholds": recovery.thresholds,
        "problems": recovery.problems,
        "recovered_at": iso(recovery.recovered_at),
        "dry_run": dry_run,
    }


RECOVERY_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("status", "NEW STATUS", fit="whole", style=status_style),
    Column("explanation", "WHY", human=_lines, fit="wrap", detail=True, label="why", min_width=20),
    Column("problems", "PROBLEMS", human=_lines, fit="wrap", detail=True, label="problems", min_width=12),
]


def reset_record(reset, dry_run: bool) -> dict:
    return {
        "id": reset.id,
        "target": reset.target,
        "previous_status": reset.from_status,
        "status": reset.status,
        "origin": reset.origin,
        "reasons": reset.reasons,
        "resets": reset.resets,
        "error": reset.error,
        "finished_at": iso(reset.finished_at),
        "dry_run": dry_run,
    }


RESET_COLUMNS = [
    Column("id", "ID", justify="right", fit="whole", min_width=2),
    Column("target", "TARGET", min_width=16),
    Column("origin", "ORIGIN", fit="whole"),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("resets", "RESETS", justify="right", fit="whole"),
    Column("status", "TO", fit="whole"),
    Column("error", "ERROR", fit="wrap", detail=True, label="error", min_width=20),
]


def audit_record(summary) -> dict:
    return {
        "id": summary.id,
        "target": summary.target,
        "status": summary.status,
        "kind": summary.kind,
        "worker_id": summary.worker_id,
        "step": summary.step,
        "percentage": summary.percentage,
        "attempts": summary.attempts,
        "resets": summary.resets,
        "created_at": iso(summary.created_at),
        "started_at": iso(summary.started_at),
        "finished_at": iso(summary.finished_at),
        "last_heartbeat": iso(summary.last_heartbeat),
        "heartbeat_age_seconds": summary.heartbeat_age_seconds,
        "age_seconds": summary.age_seconds,
        "created_age_seconds": summary.created_age_seconds,
        "error": summary.error,
        "problems": summary.problems,
    }


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


def event_record(event) -> dict:
    return {
        "id": event.id,
        "audit_id": event.audit_id,
        "at": iso(event.at),
        "event": event.event,
        "from_status": event.from_status,
        "to_status": event.to_status,
        "reasons": event.reasons,
        "measurements": event.measurements,
        "actor": event.actor,
        "host": event.host,
        "pid": event.pid,
    }


EVENT_COLUMNS = [
    Column("at", "AT", fit="whole"),
    Column("event", "EVENT", fit="whole"),
    Column("from_status", "FROM", fit="whole"),
    Column("to_status", "TO", fit="whole"),
    Column("reasons", "REASONS", fit="whole", human=_lines),
    Column("actor", "BY", min_width=10),
]


def instance_record(instance) -> dict:
    return {
        "worker_id": instance.worker_id,
        "instance_id": instance.instance_id,
        "worker_url": instance.worker_url,
        "host": instance.host,
        "pid": instance.pid,
        "started_at": iso(instance.started_at),
        "last_heartbeat": iso(instance.last_heartbeat_at),
        "heartbeat_age_seconds": instance.heartbeat_age,
        "stopped_at": iso(instance.stopped_at),
        "alive": instance.alive,
        "gone": instance.gone_proof,
        "running_audits": instance.running_audits,
        "duplicate": instance.duplicate,
        "heartbeat_interval": instance.heartbeat_interval,
        "stale_after": instance.stale_after,
    }


def _state(record: dict) -> str:
    if record.get("alive"):
        return "alive"
    if record.get("gone"):
        return "gone"
    return "silent"


def _note(record: dict) -> str:
    if record.get("duplicate"):
        return "duplicate worker_id: another live instance uses it"
    return record.get("gone") or "-"


INSTANCE_COLUMNS = [
    Column("worker_id", "WORKER", min_width=8, shrink=1),
    Column("instance_id", "INSTANCE", human=lambda v: (v or "?")[:8], fit="whole"),
    Column("host", "HOST", min_width=8, shrink=1),
    Column("pid", "PID", justify="right", fit="whole"),
    Column("heartbeat_age_seconds", "HEARD", human=ago, justify="right", fit="whole"),
    Column("alive", "STATE", human=_state, from_record=True, fit="whole",
           style=lambda r: "green" if r["alive"] else ("red" if r.get("gone") else "dim")),
    Column("running_audits", "AUDITS", justify="right", fit="whole"),
    Column("duplicate", "NOTE", human=_note, from_record=True, fit="wrap", detail=True, label="note",
           style=lambda r: "bold red" if r.get("duplicate") else "dim"),
]
