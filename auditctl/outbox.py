"""The notification outbox: events written in the same transaction as the change they report.

A recovery, a reset or the fleet turning healthy again adds one row here inside the
transaction that makes the change, so an event exists exactly when its change
committed: never a message about a recovery that rolled back, never a recovery nobody
hears of. Delivery (Slack, Discord, webhooks) happens later, outside any transaction
(see ``auditctl.notify``). Events nobody delivers expire after ``EVENT_TTL``.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from .db import fetch_now, is_postgres
from .schema import notifications

RECOVERED = "recovered"
RESET = "reset"
FLEET_HEALTHY = "fleet_healthy"
EVENTS = (RECOVERED, RESET, FLEET_HEALTHY)

#: How long an undelivered event is kept before it expires (seconds).
EVENT_TTL = 24 * 3600.0


def enqueue(connection: Connection, event: str, payload: dict, *, dedupe_key: str | None = None, now=None) -> bool:
    """Add an event to the outbox inside the caller's transaction. Returns False when an event
    with the same ``dedupe_key`` already exists (several processes noticed the same thing)."""
    now = now or fetch_now(connection)
    values = {"created_at": now, "event": event, "payload": payload, "dedupe_key": dedupe_key,
              "expires_at": now + timedelta(seconds=EVENT_TTL)}
    if dedupe_key is None:
        connection.execute(insert(notifications).values(**values))
        return True
    if is_postgres(connection):
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        result = connection.execute(pg_insert(notifications).values(**values).on_conflict_do_nothing())
        return result.rowcount == 1
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    result = connection.execute(sqlite_insert(notifications).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


def latest_id(connection: Connection, event: str | None = None) -> int | None:
    query = select(notifications.c.id).order_by(notifications.c.id.desc()).limit(1)
    if event is not None:
        query = query.where(notifications.c.event == event)
    return connection.execute(query).scalar()
