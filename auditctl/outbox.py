"""The notification outbox: events written in the same transaction as the change they report.

A recovery, a reset or the fleet turning healthy again adds one row here inside the
transaction that makes the change, so an event exists exactly when its change
committed: never a message about a recovery that rolled back, never a recovery nobody
hears of. Delivery (Slack, Discord, webhooks) happens later, outside any transaction
(see ``auditctl.notify``). Events nobody delivers expire after ``EVENT_TTL``.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, insert, not_, or_, select
from sqlalchemy.engine import Connection, Engine

from .schema import notifications
from .sqlfunctions import fetch_now, is_postgres
from .transactions import read_connection, write_transaction

RECOVERED = "recovered"
RESET = "reset"
FLEET_HEALTHY = "fleet_healthy"

#: How long an undelivered event is kept before it expires (seconds).
EVENT_TTL = 24 * 3600.0


def live_events(now):
    """The events not expired at ``now``. An ``expires_at`` further ahead than any event this
    library writes (``EVENT_TTL``, with as much again for a clock set back) is not trusted: on
    SQLite that is also where text that is not a time sorts (``'garbage' > '2026-...'``), which
    would otherwise keep an event, and its retries, alive for ever."""
    expires = notifications.c.expires_at
    return and_(expires > now, expires <= now + timedelta(seconds=2 * EVENT_TTL))


def expired_events(now):
    """The events ``live_events`` leaves out, a missing ``expires_at`` included."""
    return or_(notifications.c.expires_at.is_(None), not_(live_events(now)))


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

        # RETURNING, not rowcount: psycopg reports rowcount -1 for the INSERT SQLAlchemy sends.
        statement = pg_insert(notifications).values(**values).on_conflict_do_nothing().returning(notifications.c.id)
        return connection.execute(statement).first() is not None
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    result = connection.execute(sqlite_insert(notifications).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


def _last_live_recovery(connection: Connection, now) -> int | None:
    """The latest ``recovered`` event, if it has not expired (an all-clear for last month's recovery is noise)."""
    return connection.execute(
        select(notifications.c.id).where(notifications.c.event == RECOVERED, live_events(now))
        .order_by(notifications.c.id.desc()).limit(1)
    ).scalar()


def announce_healthy(engine: Engine, actor) -> bool:
    """After a pass found nothing stuck: enqueue ``fleet_healthy`` once per latest recovery.

    The dedupe key names the recovery it follows, so every monitor that notices the same
    all-clear writes the same row and only the first succeeds. One read when there is
    nothing to announce (the usual case): no write lock is taken. Returns True when written.
    """
    with read_connection(engine) as connection:
        last = _last_live_recovery(connection, fetch_now(connection))
        if last is None:
            return False
        key = f"{FLEET_HEALTHY}:after:{last}"
        if connection.execute(select(notifications.c.id).where(notifications.c.dedupe_key == key)).first() is not None:
            return False
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        if _last_live_recovery(connection, now) != last:
            return False  # a recovery landed meanwhile: the next clean pass announces the all-clear after it
        return enqueue(connection, FLEET_HEALTHY, {"actor": actor.name, "host": actor.host, "after_event": last},
                       dedupe_key=key, now=now)
