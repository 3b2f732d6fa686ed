"""What is undelivered: for ``auditctl notify --status``, and the backlog figure for metrics.

An event is undelivered to a destination while its delivery row is ``pending`` or
``sending``, or, for a destination given now, while it has no row yet (``new``: no sender
for that destination has seen it). An event no sender has seen at all, with no destination
given to ask about, is listed once with no destination. Expired events are gone from the
backlog: they will never be sent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.engine import Engine

from ..outbox import live_events
from ..schema import notification_deliveries as D
from ..schema import notifications as N
from ..sqlfunctions import fetch_now
from ..timestamps import as_datetime
from ..transactions import read_connection
from ..values import safe_int, text_value
from .destinations import Destination
from .digest import event_summary

NEW, UNSEEN = "new", "undelivered"


@dataclass
class Undelivered:
    id: int
    event: str
    created_at: datetime | None
    expires_at: datetime | None
    summary: str
    destination: str | None  # kind and masked URL; None: no sender has seen the event
    status: str  # pending, sending, new (this destination has not seen it), undelivered (nobody has)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None

    def record(self) -> dict:
        return asdict(self)


def undelivered(engine: Engine, destinations: list[Destination] | tuple = ()) -> list[Undelivered]:
    """Every unexpired event not yet delivered, once per destination it is owed to, oldest first."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        live_ids = select(N.c.id).where(live_events(now))
        events = connection.execute(select(N.c.id, N.c.created_at, N.c.event, N.c.payload, N.c.expires_at)
                                    .where(live_events(now)).order_by(N.c.id)).all()
        rows = connection.execute(select(D).where(D.c.notification_id.in_(live_ids))
                                  .order_by(D.c.notification_id, D.c.destination)).all()
    given = {d.key: d for d in destinations}
    by_event: dict[int, list] = {}
    for row in rows:
        by_event.setdefault(row.notification_id, []).append(row)
    found = []
    for event in events:
        deliveries = by_event.get(event.id, [])
        summary = event_summary(text_value(event.event) or "?", event.payload)
        common = {"id": event.id, "event": text_value(event.event) or "?", "created_at": as_datetime(event.created_at),
                  "expires_at": as_datetime(event.expires_at), "summary": summary}
        for row in deliveries:
            if row.status not in ("pending", "sending"):
                continue
            known = given.get(row.destination)
            label = known.label if known else (text_value(row.label) or f"destination {str(row.destination)[:12]}")
            # A row a sender holds is next tried when that claim runs out, not at the time it fell due.
            next_try = row.claimed_until if row.status == "sending" else row.next_attempt_at
            found.append(Undelivered(**common, destination=label, status=row.status,
                                     attempts=safe_int(row.attempts) or 0, next_attempt_at=as_datetime(next_try),
                                     last_error=text_value(row.last_error)))
        seen = {row.destination for row in deliveries}
        for key, destination in given.items():
            if key not in seen:
                found.append(Undelivered(**common, destination=destination.label, status=NEW))
        if not deliveries and not given:
            found.append(Undelivered(**common, destination=None, status=UNSEEN))
    return found


def in_backlog(now):
    """The events the backlog counts (a condition on ``notifications``): unexpired, and not yet
    delivered everywhere they were tried, or not tried at all. The metrics count these too."""
    open_delivery = exists().where(D.c.notification_id == N.c.id, D.c.status.in_(("pending", "sending")))
    any_delivery = exists().where(D.c.notification_id == N.c.id)
    return and_(live_events(now), or_(open_delivery, ~any_delivery))


def backlog(engine: Engine) -> int:
    """How many events ``in_backlog``."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        return int(connection.execute(select(func.count()).select_from(N).where(in_backlog(now))).scalar() or 0)
