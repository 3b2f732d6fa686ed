"""The JSON shape of every listing: one record per verdict, recovery, reset, audit, event, worker.

These are the stable contract of ``--format json``, of the dashboard's JSON API and of
README's documented keys: every face renders the same records. Times are exact ISO 8601
UTC; durations are seconds.
"""

from __future__ import annotations

from .timestamps import iso


def verdict_record(verdict) -> dict:
    thresholds = verdict.thresholds()
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
        "last_heartbeat": verdict.iso("heartbeat_at"),
        "started_at": verdict.iso("started_at"),
        "age_seconds": verdict.age_seconds,
        "silence_seconds": verdict.silence_seconds,
        "stalled_seconds": verdict.stalled_seconds,
        "max_age_seconds": thresholds["max_age"]["seconds"],
        "thresholds": thresholds,
        "explanation": verdict.explain(),
        "problems": verdict.problems,
    }


def unreadable_verdict_record(verdict, problem: str) -> dict:
    """What scan shows for a row it could not read: its id, the database's verdict, and what was wrong."""
    return {"id": verdict.id, "target": "?", "status": "running", "kind": None, "reasons": list(verdict.reasons),
            "worker_id": None, "worker_instance": None, "step": None, "percentage": None, "last_heartbeat": None,
            "started_at": None, "age_seconds": None, "silence_seconds": None, "stalled_seconds": None,
            "max_age_seconds": None, "thresholds": {}, "explanation": [], "problems": [f"row_unreadable: {problem}"]}


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


def instance_state(record: dict) -> str:
    """``alive``, ``gone`` (proven) or ``silent`` (not heard within its stale_after, or its process
    here but not beating), or ``unreadable`` (its registry row could not be read, so nothing is
    known of it): one word for every face that lists workers."""
    if record.get("problems"):
        return "unreadable"
    if record.get("alive") and not record.get("heartbeat_late"):
        return "alive"
    if record.get("gone"):
        return "gone"
    return "silent"


def instance_note(record: dict) -> str | None:
    """What a face says beside an instance's state, if anything."""
    if record.get("problems"):
        return "; ".join(record["problems"])
    if record.get("duplicate"):
        return "duplicate worker_id: another live instance uses it"
    if record.get("heartbeat_late"):
        return "its process is still here but has not beaten within its stale_after (stopped or hung?)"
    return record.get("gone")


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
        "heartbeat_late": instance.late,
        "gone": instance.gone_proof,
        "running_audits": instance.running_audits,
        "duplicate": instance.duplicate,
        "heartbeat_interval": instance.heartbeat_interval,
        "stale_after": instance.stale_after,
        # Its registry row could not be read (another tool's values): shown as such, never as silent.
        "problems": [f"row_unreadable: {instance.unreadable}"] if instance.unreadable else [],
    }


def audit_detail_record(detail) -> dict:
    """One audit in full (``show``, ``GET /api/audits/{id}``): the summary, documents and history."""
    from .documents import strict_value

    record = audit_record(detail.summary)
    record.update(
        max_age_seconds=detail.max_age_seconds,
        declared_thresholds=detail.declared,
        worker_instance=detail.worker_instance,
        has_lease=detail.has_lease,
        last_worker_update=iso(detail.last_worker_update),
        progress=strict_value(detail.progress),
        recovery_info=strict_value(detail.recovery_info),
        history=[event_record(e) for e in detail.history],
    )
    return record


def planned_stuck_reset_record(verdict) -> dict:
    """A stuck running audit that a reset would recover first and then reset (the reset record's shape)."""
    return {"id": verdict.id, "target": verdict.target, "previous_status": "running", "status": "pending",
            "origin": "stuck", "reasons": verdict.reasons, "resets": 0, "error": None, "finished_at": None, "dry_run": True}


def overview_record(overview) -> dict:
    """The fleet at a glance (``GET /api/overview``): counts, every stuck audit, a sample of the healthy ones, the workers."""
    from .rules import isolate

    return {
        "at": iso(overview.at),
        "running": overview.running,
        "by_status": overview.by_status,
        "stuck_count": len(overview.stuck),
        "stuck_by_reason": overview.stuck_by_reason,
        "stuck": [isolate(v, verdict_record, unreadable_verdict_record) for v in overview.stuck],
        "healthy_sample": [audit_record(a) for a in overview.healthy_sample],
        "healthy_more": overview.healthy_more,
        "workers_alive": overview.workers_alive,
        "workers_gone": overview.workers_gone,
        "workers": [instance_record(w) for w in overview.workers],
        "oldest_heartbeat_age_seconds": overview.oldest_heartbeat_age,
    }


def recoveries_by_hour_record(hour) -> dict:
    """One hour of the stuck-over-time chart (``GET /api/overview``'s ``recoveries_by_hour``)."""
    return {"start": iso(hour.start), "count": hour.count, "by_reason": hour.by_reason}
