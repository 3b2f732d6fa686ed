"""What one message says: the events claimed for a destination, summarised.

Every destination module renders a ``Digest``; none reads an event itself, so Slack,
Discord and the generic webhook can never disagree about what happened. Pure Python.

Event payloads come from the database, where another tool may have written anything:
every field is read defensively, and an event that cannot be read at all is counted,
not allowed to stop the message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from ..thresholds import WORKER_GONE, format_duration
from ..timestamps import iso
from ..values import float_value, safe_int, text_value

RECOVERED, RESET, FLEET_HEALTHY = "recovered", "reset", "fleet_healthy"  # as in auditctl.outbox

#: Audits listed by name in one message; the rest are counted ("and 12 more").
MAX_LISTED = 10
#: Where a message that lists MAX_LISTED audits sends the reader for the others.
MORE_AUDITS = "`auditctl list --status failed,pending` lists them, `auditctl show ID` has each one's history"


@dataclass(frozen=True)
class OutboxEvent:
    """One claimed outbox row."""

    id: int
    created_at: datetime | None
    event: str
    payload: dict

    @property
    def key(self) -> str:
        """This event's idempotency key: stable for as long as the row exists, unique across databases."""
        digest = hashlib.sha256(f"{self.id}|{iso(self.created_at)}".encode()).hexdigest()
        return f"auditctl-{self.id}-{digest[:12]}"


@dataclass
class AuditLine:
    id: int | None
    target: str
    reasons: list[str]
    status: str
    worker_id: str | None
    explanation: list[str]
    measured: dict

    @property
    def evidence(self) -> str:
        return evidence(self.measured)


@dataclass
class GoneWorker:
    worker_id: str
    proof: str
    audits: int = 0


@dataclass
class ResetLine:
    actor: str
    host: str | None
    count: int
    by_origin: dict[str, int]
    ids: list[int]


@dataclass
class Digest:
    events: list[OutboxEvent]
    recovered: list[AuditLine] = field(default_factory=list)
    requeued: list[AuditLine] = field(default_factory=list)
    gone: list[GoneWorker] = field(default_factory=list)
    resets: list[ResetLine] = field(default_factory=list)
    healthy: OutboxEvent | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    actors: list[str] = field(default_factory=list)
    unreadable: int = 0

    @property
    def last_at(self) -> datetime | None:
        times = [e.created_at for e in self.events if isinstance(e.created_at, datetime)]  # not one another tool garbled
        return max(times) if times else None

    @property
    def reset_total(self) -> int:
        return sum(r.count for r in self.resets)

    def resets_not_listed(self) -> str | None:
        """The line that counts the resets past the ``MAX_LISTED`` a message lists, or None."""
        rest = self.resets[MAX_LISTED:]
        return _not_listed(rest, "more reset", "", sum(r.count for r in rest), "back to pending")

    def gone_not_listed(self) -> str | None:
        """The line that counts the workers gone past the ``MAX_LISTED`` a message lists, or None."""
        rest = self.gone[MAX_LISTED:]
        return _not_listed(rest, "more worker", " gone", sum(g.audits for g in rest), "recovered")

    def reason_counts(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))

    def parts(self) -> list[str]:
        """The headline, one phrase per kind of news, most urgent first."""
        parts = []
        if self.recovered:
            parts.append(f"{_plural(len(self.recovered), 'stuck audit')} recovered")
        if self.requeued:
            parts.append(f"{_plural(len(self.requeued), 'stuck audit')} requeued")
        if self.gone:
            parts.append(f"worker {self.gone[0].worker_id} gone" if len(self.gone) == 1 else f"{len(self.gone)} workers gone")
        if self.resets:
            who = ", ".join(sorted({r.actor for r in self.resets}))
            parts.append(f"{_plural(self.reset_total, 'audit')} reset by {who}")
        if self.healthy is not None:
            parts.append("fleet healthy again")
        if not parts and self.unreadable:
            parts.append(f"{_plural(self.unreadable, 'event')} that could not be read")
        return parts

    @property
    def title(self) -> str:
        text = "; ".join(self.parts()) or "nothing to report"
        return text[:1].upper() + text[1:]

    @property
    def severity(self) -> str:
        """``alert`` (audits were failed), ``warning`` (requeued), ``info`` (resets), ``ok`` (healthy)."""
        if self.recovered or self.gone:
            return "alert"
        if self.requeued:
            return "warning"
        if self.resets or self.unreadable:
            return "info"
        return "ok"

    def counts(self) -> dict:
        return {"recovered": len(self.recovered), "requeued": len(self.requeued), "workers_gone": len(self.gone),
                "reset": self.reset_total, "fleet_healthy": self.healthy is not None, "events": len(self.events)}


def _not_listed(rest: list, what: str, after: str, audits: int, done: str) -> str | None:
    """``and 3 more workers gone (9 audits recovered)``: the items a message does not list, counted."""
    return f"and {_plural(len(rest), what)}{after} ({_plural(audits, 'audit')} {done})" if rest else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _list_of_text(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [text for text in (text_value(v) for v in value) if text]
    text = text_value(value)
    return [text] if text else []


def evidence(measured) -> str:
    """``silent 17m, running 22m, no progress 17m; limits stale_after 10m, max_age 30m``."""
    if not isinstance(measured, dict):
        return ""

    def seconds(name):
        # float_value, not float(): JSON may hold a whole number no float holds (a 400-digit figure
        # another tool wrote), and one unreadable figure must not keep the message from being sent.
        value = measured.get(name)
        return float_value(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    seen = [f"{label} {format_duration(value)}" for label, value in
            (("silent", seconds("silence_seconds")), ("running", seconds("age_seconds")),
             ("no progress", seconds("stalled_seconds"))) if value is not None]
    limits = [f"{name} {format_duration(value)}" for name, value in
              ((name, seconds(name)) for name in ("stale_after", "max_age", "stall_after")) if value is not None]
    text = ", ".join(seen)
    if limits:
        text += ("; " if text else "") + "limits " + ", ".join(limits)
    return text


def _audit_line(item) -> AuditLine:
    if not isinstance(item, dict):
        raise TypeError("an audit entry is not an object")
    measured = item.get("measured") if isinstance(item.get("measured"), dict) else {}
    return AuditLine(id=safe_int(item.get("id")), target=text_value(item.get("target")) or "?",
                     reasons=_list_of_text(item.get("reasons")), status=text_value(item.get("status")) or "failed",
                     worker_id=text_value(item.get("worker_id")), explanation=_list_of_text(item.get("explanation")),
                     measured=measured)


def build(events: list[OutboxEvent]) -> Digest:
    """The digest of events, oldest first."""
    digest = Digest(events=sorted(events, key=lambda e: e.id))
    gone: dict[str, GoneWorker] = {}
    last_recovery = -1
    for event in digest.events:
        payload = event.payload if isinstance(event.payload, dict) else {}
        try:
            if event.event == RECOVERED:
                audits = payload.get("audits")
                if not isinstance(audits, list):
                    raise TypeError("no list of audits")
                actor = text_value(payload.get("actor"))
                if actor and actor not in digest.actors:
                    digest.actors.append(actor)
                for item in audits:
                    line = _audit_line(item)
                    (digest.requeued if line.status == "pending" else digest.recovered).append(line)
                    for reason in line.reasons:
                        digest.reasons[reason] = digest.reasons.get(reason, 0) + 1
                    if WORKER_GONE in line.reasons:
                        name = line.worker_id or "?"
                        proof = text_value(line.measured.get("worker_gone")) or next(
                            (s for s in line.explanation if "gone" in s or "no longer" in s), "its process is gone")
                        gone.setdefault(name, GoneWorker(name, proof)).audits += 1
                last_recovery = event.id
            elif event.event == RESET:
                by_origin = payload.get("by_origin") if isinstance(payload.get("by_origin"), dict) else {}
                ids = payload.get("ids") if isinstance(payload.get("ids"), list) else []
                digest.resets.append(ResetLine(
                    actor=text_value(payload.get("actor")) or "?", host=text_value(payload.get("host")),
                    count=safe_int(payload.get("count")) or len(ids),
                    by_origin={str(k): safe_int(v) or 0 for k, v in by_origin.items()},
                    ids=[i for i in (safe_int(v) for v in ids) if i is not None]))
            elif event.event == FLEET_HEALTHY:
                digest.healthy = event
            else:
                digest.unreadable += 1
        except (TypeError, ValueError, AttributeError):
            digest.unreadable += 1
    if digest.healthy is not None and digest.healthy.id < last_recovery:
        digest.healthy = None  # healthy, then stuck again: only the latest news counts
    digest.gone = list(gone.values())
    # Several reset batches of one operation read as one reset.
    merged: dict[tuple, ResetLine] = {}
    for line in digest.resets:
        key = (line.actor, line.host)
        if key in merged:
            into = merged[key]
            into.count += line.count
            into.ids.extend(line.ids)
            for origin, count in line.by_origin.items():
                into.by_origin[origin] = into.by_origin.get(origin, 0) + count
        else:
            merged[key] = line
    digest.resets = list(merged.values())
    return digest


def idempotency_key(destination_key: str, events: list[OutboxEvent]) -> str:
    """The message's key: the same events to the same destination always give the same key."""
    text = destination_key + "|" + ",".join(e.key for e in sorted(events, key=lambda e: e.id))
    return "auditctl-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def event_summary(event: str, payload) -> str:
    """One line about one event, for ``notify --status``."""
    digest = build([OutboxEvent(0, None, event, payload)])
    return digest.title


__all__ = ["Digest", "OutboxEvent", "AuditLine", "GoneWorker", "ResetLine", "build", "evidence", "idempotency_key",
           "event_summary", "MAX_LISTED"]
