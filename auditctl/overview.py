"""The fleet at a glance: what ``watch``'s screen, the dashboard and the metrics all show.

One call reads, on one clock: the stuck audits with their verdicts (all of them), the
running count, a sample of the healthy running audits, the workers alive and gone, and
(optionally) the count of audits in every state. Faces render it; none of them queries
the database on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from .audits import AuditFilters, AuditSummary, iter_audits
from .history import RECOVERED, REQUEUED
from .registry import GONE_RETENTION, Instance, instances
from .rules import Filters, Verdict, find_stuck
from .schema import IS_RUNNING, RUNNING, STATUSES, audit_events, audits
from .sqlfunctions import fetch_now
from .thresholds import RULE_REASONS, Policy
from .timestamps import as_datetime
from .transactions import read_connection
from .values import safe_int, text_value


@dataclass
class Overview:
    at: datetime | None
    running: int
    stuck: list[Verdict]
    stuck_by_reason: dict[str, int]
    healthy_sample: list[AuditSummary]
    healthy_more: int
    workers: list[Instance]
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self.workers if w.beating)

    @property
    def workers_gone(self) -> int:
        return sum(1 for w in self.workers if w.not_beating)

    @property
    def oldest_heartbeat_age(self) -> float | None:
        """Seconds since the least recent heartbeat of a running audit (None when nothing runs)."""
        ages = [v.silence_seconds for v in self.stuck if v.silence_seconds is not None]
        ages += [a.heartbeat_age_seconds for a in self.healthy_sample if a.heartbeat_age_seconds is not None]
        return max(ages) if ages else None


def count_by_status(engine: Engine) -> dict[str, int]:
    """Audits in each state (unknown states, another tool's, are counted under their own name)."""
    with read_connection(engine) as connection:
        rows = connection.execute(select(audits.c.status, func.count()).group_by(audits.c.status)).all()
    counts = {status: 0 for status in STATUSES}
    for status, count in rows:
        # Added, not set: a BLOB 'running' is its own group in SQL and the same status read as text.
        key = text_value(status) or "?"
        counts[key] = counts.get(key, 0) + (safe_int(count) or 0)
    return counts


def fleet_overview(engine: Engine, policy: Policy, *, seen_since: datetime | None = None, filters: Filters | None = None,
                   sample: int = 50, with_status_counts: bool = False, stale_after: float | None = None) -> Overview:
    """Read the overview. ``sample`` bounds how many healthy running audits are listed (the rest are counted)."""
    stuck = find_stuck(engine, policy, seen_since=seen_since, filters=filters or Filters())
    by_reason = {reason: 0 for reason in RULE_REASONS}
    for verdict in stuck:
        for reason in verdict.reasons:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        running = connection.execute(select(func.count()).select_from(audits).where(IS_RUNNING)).scalar_one()
    stuck_ids = {v.id for v in stuck}
    healthy: list[AuditSummary] = []
    for summary in iter_audits(engine, AuditFilters(statuses=(RUNNING,)), limit=sample + len(stuck_ids)):
        if summary.id not in stuck_ids and len(healthy) < sample:
            healthy.append(summary)
    healthy_total = max(0, running - len(stuck))
    # The same window as `auditctl workers` and the metrics, so the counts agree.
    workers = instances(engine, stale_after or policy.resolve("stale_after")[0], include_gone=True, retention=GONE_RETENTION)
    return Overview(at=now, running=running, stuck=stuck, stuck_by_reason=by_reason, healthy_sample=healthy,
                    healthy_more=max(0, healthy_total - len(healthy)), workers=workers,
                    by_status=count_by_status(engine) if with_status_counts else {})


@dataclass
class HourOfRecoveries:
    """Audits recovered as stuck (failed or requeued) in one hour of the history, by reason."""

    start: datetime
    count: int
    by_reason: dict[str, int]


def recoveries_by_hour(engine: Engine, *, hours: int = 24) -> list[HourOfRecoveries]:
    """Stuck audits over time, from the history: the recoveries in each of the last ``hours`` hours
    (the current hour last), on the database's clock. Reads the history's time index only."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        start = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
        rows = connection.execute(
            select(audit_events.c.at, audit_events.c.reasons)
            .where(audit_events.c.at >= start, audit_events.c.event.in_((RECOVERED, REQUEUED)))
        ).all()
    found = [HourOfRecoveries(start=start + timedelta(hours=index), count=0, by_reason={}) for index in range(hours)]
    for at, reasons in rows:
        moment = as_datetime(at)
        if moment is None:
            continue
        index = int((moment - start).total_seconds() // 3600)
        if not 0 <= index < hours:
            continue
        hour = found[index]
        hour.count += 1
        for reason in (text_value(reasons) or "").split(","):
            if reason:
                hour.by_reason[reason] = hour.by_reason.get(reason, 0) + 1
    return found
