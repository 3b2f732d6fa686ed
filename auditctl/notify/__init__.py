"""Alerts: the outbox sender and one small module per destination (Slack, Discord, a generic webhook).

How an event travels. A recovery, a reset or the fleet turning healthy writes one row to
the outbox (``auditctl.outbox``) in the same transaction as the change. A sender (``watch``'s
background thread, a worker guard's, ``recover`` and ``reset-all`` at their end, or
``auditctl notify`` from cron) then, for each destination:

1. **claims** the events due for it in one short write transaction: a delivery row per
   (event, destination) is created on first sight, and the due rows are switched to
   ``sending`` with a claim that expires (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
   write lock on SQLite). Two senders on one database therefore never claim the same
   event for the same destination, and never wait for each other;
2. **groups** everything it claimed into ONE message (a summary, never a flood);
3. **posts** it with a hard timeout, outside any transaction;
4. **marks** the rows ``sent``, or puts them back to ``pending`` with a retry time:
   exponential backoff, or the destination's ``Retry-After`` on HTTP 429. The retry time
   holds the whole destination, new events included, so a rate-limited webhook is left alone.

Events older than their ``expires_at`` (a day) are no longer sent: their rows become
``expired``, as do those of an event whose ``expires_at`` is missing, unreadable or implausibly
far ahead (``outbox.live_events``). ``auditctl notify --status`` lists what is still undelivered.

Delivery is **at least once**. A sender that dies between the POST and the mark leaves
its rows ``sending``; when the claim expires another sender sends them again. Every
message therefore carries an idempotency key (derived from the events it holds and the
destination; each event also has its own stable key in the generic webhook's body), so a
receiver can drop the repeat. A message is never sent twice for any other reason.

A dead or slow webhook never delays or fails the change it reports: delivery happens
after the change committed, is bounded by its timeout, and never raises.
"""

from __future__ import annotations

from .destinations import DEFAULT_TIMEOUT, Destination, destinations_from

__all__ = ["DEFAULT_TIMEOUT", "Destination", "destinations_from", "deliver", "deliveries", "DeliveryReport", "Notifier",
           "undelivered", "backlog"]


def __getattr__(name):
    # The sender needs SQLAlchemy; the destinations do not (the command line parses them at start-up).
    if name in ("deliver", "deliveries", "DeliveryReport", "DestinationResult"):
        from . import sender

        return getattr(sender, name)
    if name == "Notifier":
        from .background import Notifier

        return Notifier
    if name in ("undelivered", "backlog", "Undelivered"):
        from . import status

        return getattr(status, name)
    raise AttributeError(f"module 'auditctl.notify' has no attribute {name!r}")
