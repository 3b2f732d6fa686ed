"""Library results as records (the stable JSON shape) and the columns people see.

Each ``*_record`` function defines the JSON contract of one listing; README documents
the same keys. The ``*_COLUMNS`` lists say how the table/plain/markdown/csv views show them.
"""

from __future__ import annotations

from ..thresholds import format_duration
from .render import Column, iso, status_style


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _ago(seconds) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def _dur(seconds) -> str:
    return format_duration(seconds)


def _short(text, width=48):
    if text is None:
        return "-"
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def verdict_record(verdict, thresholds) -> dict:
    return {
        "id": verdict.id,
        "target": verdict.target,
        "status": verdict.status,
        "reasons": verdict.reasons,
        "worker_id": verdict.worker_id,
        "step": verdict.step,
        "percentage": verdict.percentage,
        "last_heartbeat": iso(verdict.last_heartbeat),
        "started_at": iso(verdict.started_at),
        "age_seconds": verdict.age_seconds,
        "silence_seconds": verdict.silence_seconds,
        "stalled_seconds": verdict.stalled_seconds,
        "max_age_seconds": verdict.max_age_seconds,
        "explanation": verdict.explain(thresholds),
        "problems": verdict.problems,
    }


VERDICT_COLUMNS = [
    Column("id", "ID", justify="right"),
    Column("target", "TARGET", human=_short, max_width=48),
    Column("reasons", "REASONS", style=lambda r: "red" if "stale_heartbeat" in r["reasons"] else "yellow"),
    Column("worker_id", "WORKER"),
    Column("step", "STEP", human=lambda v: _short(v, 24)),
    Column("percentage", "PCT", human=_pct, justify="right"),
    Column("silence_seconds", "LAST HEARTBEAT", human=_ago, justify="right"),
    Column("age_seconds", "AGE", human=_dur, justify="right"),
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
        "recovered_at": iso(recovery.recovered_at),
        "dry_run": dry_run,
    }


RECOVERY_COLUMNS = [
    Column("id", "ID", justify="right"),
    Column("target", "TARGET", human=_short, max_width=48),
    Column("reasons", "REASONS"),
    Column("worker_id", "WORKER"),
    Column("status", "NEW STATUS", style=status_style),
    Column("explanation", "WHY", human=lambda v: "; ".join(v or []) or "-", max_width=60),
]


def reset_record(reset, dry_run: bool) -> dict:
    return {
        "id": reset.id,
        "target": reset.target,
        "previous_status": reset.from_status,
        "status": reset.status,
        "reasons": reset.reasons,
        "error": reset.error,
        "finished_at": iso(reset.finished_at),
        "dry_run": dry_run,
    }


RESET_COLUMNS = [
    Column("id", "ID", justify="right"),
    Column("target", "TARGET", human=_short, max_width=48),
    Column("previous_status", "FROM"),
    Column("status", "TO"),
    Column("reasons", "REASONS"),
    Column("finished_at", "FAILED AT"),
]


def audit_record(summary) -> dict:
    return {
        "id": summary.id,
        "target": summary.target,
        "status": summary.status,
        "worker_id": summary.worker_id,
        "step": summary.step,
        "percentage": summary.percentage,
        "attempts": summary.attempts,
        "created_at": iso(summary.created_at),
        "started_at": iso(summary.started_at),
        "finished_at": iso(summary.finished_at),
        "last_heartbeat": iso(summary.last_heartbeat),
        "heartbeat_age_seconds": summary.heartbeat_age_seconds,
        "age_seconds": summary.age_seconds,
        "error": summary.error,
        "problems": summary.problems,
    }


AUDIT_COLUMNS = [
    Column("id", "ID", justify="right"),
    Column("target", "TARGET", human=_short, max_width=48),
    Column("status", "STATUS", style=status_style),
    Column("worker_id", "WORKER"),
    Column("step", "STEP", human=lambda v: _short(v, 24)),
    Column("percentage", "PCT", human=_pct, justify="right"),
    Column("heartbeat_age_seconds", "LAST HEARTBEAT", human=_ago, justify="right"),
    Column("attempts", "TRIES", justify="right"),
    Column("created_at", "CREATED"),
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
    Column("at", "AT"),
    Column("audit_id", "AUDIT", justify="right"),
    Column("event", "EVENT"),
    Column("from_status", "FROM"),
    Column("to_status", "TO"),
    Column("reasons", "REASONS"),
    Column("actor", "BY"),
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
        "running_audits": instance.running_audits,
        "duplicate": instance.duplicate,
    }


INSTANCE_COLUMNS = [
    Column("worker_id", "WORKER"),
    Column("instance_id", "INSTANCE", human=lambda v: v[:8]),
    Column("host", "HOST"),
    Column("pid", "PID", justify="right"),
    Column("heartbeat_age_seconds", "LAST HEARTBEAT", human=_ago, justify="right"),
    Column("alive", "ALIVE", human=lambda v: "yes" if v else "no",
           style=lambda r: "green" if r["alive"] else "dim"),
    Column("running_audits", "AUDITS", justify="right"),
    Column("duplicate", "NOTE", human=lambda v: "duplicate worker_id" if v else "",
           style=lambda r: "bold red" if r["duplicate"] else None),
]
