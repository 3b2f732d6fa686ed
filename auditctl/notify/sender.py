"""The sender: claim the events due for each destination, post ONE message, mark the result.

See ``auditctl.notify`` for the guarantees. What each step writes, and why:

* **claim** (one short write transaction per destination): rows whose event expired
  become ``expired``; each unexpired event without a row for this destination gets one
  (``pending``, due at once unless the destination is held back by a failure); then up to
  ``MAX_EVENTS`` due rows are switched to ``sending`` with a claim that ends after the POST's
  timeout plus ``CLAIM_MARGIN``. On PostgreSQL the due rows are read ``FOR UPDATE SKIP
  LOCKED``: a second sender skips what the first is claiming instead of waiting for it, and
  once the first commits the rows are ``sending`` and no longer due. On SQLite the
  transaction holds the write lock (``BEGIN IMMEDIATE``), which serialises senders.
* **post**: outside any transaction, bounded by the timeout.
* **mark**: ``sent``; or back to ``pending`` with the next try after an exponential
  backoff (or the destination's ``Retry-After``), applied to every pending row of the
  destination so new events wait too. A claim that ran out (the sender died) makes its
  rows due again: that is the at-least-once case.

Before any of that, one read asks whether the destination has anything to do, so an idle
sender never takes SQLite's write lock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import String, and_, case, exists, func, literal, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ..errors import AuditctlError
from ..outbox import expired_events, live_events
from ..schema import Timestamp, notification_deliveries, notifications
from ..sqlfunctions import fetch_now, is_postgres
from ..textsafe import printable
from ..transactions import read_connection, write_transaction
from ..values import safe_int
from . import digest as digests
from .destinations import DEFAULT_TIMEOUT, Destination
from .transport import MAX_RETRY_AFTER, post_json

log = logging.getLogger("auditctl.notify")

PENDING, SENDING, SENT, EXPIRED = "pending", "sending", "sent", "expired"
#: Events in one message at most; more wait for the next message (a summary, never a flood).
MAX_EVENTS = 200
#: The HTTP status of a body larger than the receiver takes ("Content Too Large"): the message is
#: sent again in halves (``_mark_failed``), down to one event.
TOO_LARGE = 413
#: A claim outlives the POST's timeout by this much (seconds), so a slow but live sender is never raced.
CLAIM_MARGIN = 30.0
#: Backoff after a failed POST: BACKOFF_BASE, doubled per attempt, at most BACKOFF_MAX (seconds), with jitter.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
#: The furthest ahead a sender sets a next try (a Retry-After, or the backoff), with as much again
#: for a clock set back. A next try beyond it no sender wrote: another tool did (PostgreSQL's
#: infinity, year 9999; on SQLite also where text that is no time and bytes sort), so it is due now.
LONGEST_WAIT = 2 * max(MAX_RETRY_AFTER, BACKOFF_MAX)
#: How long the database part of a delivery may add to the POST's timeout before ``deliver`` stops waiting.
DATABASE_MARGIN = 5.0

D, N = notification_deliveries, notifications


@dataclass
class DestinationResult:
    """What one delivery call did for one destination."""

    destination: Destination
    events: int = 0  # events in the message sent or tried (0: nothing was due)
    sent: bool = False
    error: str | None = None
    status: int | None = None  # the HTTP status, when there was an answer
    pending: int = 0  # events still undelivered to this destination afterwards
    retry_in: float | None = None  # seconds until the next try of what is pending
    expired: int = 0  # events that expired undelivered in this call (dropped: see ``describe_expired``)
    more: bool = False  # more events were due than one message holds
    seconds: float = 0.0
    #: Delivery rows whose tries count is no number (text another tool wrote): read as 0 tries.
    unreadable_tries: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None

    def describe(self) -> str:
        """One line for people: what happened, with the destination masked."""
        label = self.destination.label
        if self.sent:
            return f"sent {self.events} event{'s' if self.events != 1 else ''} in 1 message to {label}"
        if self.error is not None:
            kept = f"; {self.pending} event{'s' if self.pending != 1 else ''} kept" if self.pending else ""
            retry = f", next try in {_seconds(self.retry_in)}" if self.retry_in is not None and self.pending else ""
            return f"could not deliver to {label}: {self.error}{kept}{retry}{self._problems()}"
        if self.pending:
            return (f"{self.pending} event{'s' if self.pending != 1 else ''} for {label} wait for a retry"
                    + (f" in {_seconds(self.retry_in)}" if self.retry_in is not None else ""))
        return f"nothing to deliver to {label}"

    def describe_waiting(self) -> str:
        """One line for people on what still waits after a run (``DeliveryReport.waiting``): a destination
        that took a message this call still has events due (the run stopped at its last message, or at
        another destination's failure)."""
        if not self.sent:
            return self.describe()
        events = f"{self.pending} event{' still waits' if self.pending == 1 else 's still wait'}"
        return f"{events} for a message to {self.destination.label}"

    def describe_expired(self) -> str | None:
        """One line for people on the events this call dropped because they expired undelivered (None: none)."""
        if not self.expired:
            return None
        from ..outbox import EVENT_TTL

        return (f"{self.expired} event{'s' if self.expired != 1 else ''} for {self.destination.label} expired "
                f"undelivered (kept {_seconds(EVENT_TTL)}) and {'were' if self.expired != 1 else 'was'} dropped")

    def _problems(self) -> str:
        if not self.unreadable_tries:
            return ""
        rows = "1 delivery row" if self.unreadable_tries == 1 else f"{self.unreadable_tries} delivery rows"
        return f"; {rows} held a tries count that is no number (read as 0)"


def _seconds(value: float | None) -> str:
    from ..thresholds import format_duration

    return format_duration(max(0.0, value or 0.0))


@dataclass
class DeliveryReport:
    results: list[DestinationResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.results)

    @property
    def sent(self) -> int:
        return sum(r.events for r in self.results if r.sent)

    @property
    def pending(self) -> int:
        return sum(r.pending for r in self.results)

    @property
    def more(self) -> bool:
        return any(r.more for r in self.results)

    @property
    def waiting(self) -> list[DestinationResult]:
        """The destinations whose events still wait without having failed now (a backoff, a
        ``Retry-After``, another sender's claim, or more than one run sends)."""
        return [r for r in self.results if r.pending and not r.failed]

    @property
    def next_due(self) -> float | None:
        """Seconds until the earliest retry of something pending (None: nothing pending)."""
        waits = [r.retry_in for r in self.results if r.pending and r.retry_in is not None]
        return min(waits) if waits else None


def backoff(attempts: int) -> float:
    # The doubling stops long before BACKOFF_MAX is passed: a tries count another tool set to 2**63
    # must not become a number of 2**63 bits.
    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(max(0, attempts - 1), 64))
    return delay * (0.8 + 0.4 * random.random())


# --- the queries ----------------------------------------------------------------------


def _due_rows(key: str, now):
    next_try = D.c.next_attempt_at
    return and_(D.c.destination == key,
                or_(and_(D.c.status == PENDING, or_(next_try.is_(None), next_try <= now,
                                                    next_try > now + timedelta(seconds=LONGEST_WAIT))),
                    and_(D.c.status == SENDING, or_(D.c.claimed_until.is_(None), D.c.claimed_until <= now))))


def _unseen(key: str, now):
    """Unexpired events with no delivery row for this destination yet."""
    return and_(live_events(now),
                ~exists().where(D.c.notification_id == N.c.id, D.c.destination == key))


def _expired_rows(key: str, now):
    return and_(D.c.destination == key, D.c.status.in_((PENDING, SENDING)),
                D.c.notification_id.in_(select(N.c.id).where(expired_events(now))))


def has_work(connection: Connection, destination: Destination, now) -> bool:
    """Whether the destination has anything to claim or expire (one read, no lock)."""
    key = destination.key
    due = select(D.c.notification_id).where(_due_rows(key, now), D.c.notification_id.in_(
        select(N.c.id).where(live_events(now))))
    query = select(or_(exists(select(N.c.id).where(_unseen(key, now))), exists(due),
                       exists(select(D.c.notification_id).where(_expired_rows(key, now)))))
    return bool(connection.execute(query).scalar())


def _insert_ignoring_duplicates(connection: Connection, table):
    if is_postgres(connection):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


#: The largest tries count a claim counts on from; anything else (NULL, text, a negative count, one
#: near PostgreSQL's largest integer, where ``+ 1`` would fail every claim) starts again at 1.
MAX_COUNTED_TRIES = 1_000_000_000


def _next_tries():
    return case((D.c.attempts.between(0, MAX_COUNTED_TRIES), D.c.attempts + 1), else_=1)


def _claim(connection: Connection, destination: Destination, now, until, limit: int):
    key = destination.key
    expired = connection.execute(update(D).where(_expired_rows(key, now))
                                 .values(status=EXPIRED, claimed_until=None)).rowcount
    # A destination held back (a failure's backoff, a 429's Retry-After) holds its new events too;
    # by a next try a sender wrote, not by one further ahead than any (see ``LONGEST_WAIT``).
    held = connection.execute(select(func.max(D.c.next_attempt_at))
                              .where(D.c.destination == key, D.c.status == PENDING,
                                     D.c.next_attempt_at <= now + timedelta(seconds=LONGEST_WAIT))).scalar()
    start = held if isinstance(held, datetime) and held > now else now
    columns = ["notification_id", "destination", "status", "attempts", "next_attempt_at", "label"]
    new_rows = select(N.c.id, literal(key, String()), literal(PENDING, String()), literal(0),
                      literal(start, Timestamp()), literal(destination.label, String())).where(_unseen(key, now))
    statement = _insert_ignoring_duplicates(connection, D).from_select(columns, new_rows).on_conflict_do_nothing()
    connection.execute(statement)
    # A message tried before (its sender died, or its POST failed, perhaps after the receiver took
    # it) goes again alone, as it was, so its idempotency key is the same: its rows keep the claim
    # they were sent under. Then the events never sent.
    query = (select(D.c.notification_id, D.c.attempts, D.c.claimed_until, N.c.created_at, N.c.event, N.c.payload)
             .select_from(D.join(N, N.c.id == D.c.notification_id))
             .where(_due_rows(key, now), live_events(now))
             .order_by(D.c.claimed_until.is_(None), D.c.claimed_until, D.c.notification_id).limit(limit))
    if is_postgres(connection):
        # Another sender claiming the same rows right now is skipped, not waited for.
        query = query.with_for_update(of=D, skip_locked=True)
    rows = connection.execute(query).all()
    if not rows:
        return [], expired, False
    more = len(rows) >= limit
    if rows[0].claimed_until is not None:
        # Whole or not at all: a part another sender holds locked (SKIP LOCKED passed over it) would
        # make the rest a new message, under a new key. It is that sender's to send. The message is
        # matched by the claim as stored, in SQL: one another tool garbled (an infinity, text, bytes,
        # a time in another form) reads back as no value that matches it. A row whose event is gone
        # (deleted or renumbered: there is no foreign key) is no part of it.
        stored = (select(D.c.claimed_until)
                  .where(D.c.destination == key, D.c.notification_id == rows[0].notification_id).scalar_subquery())
        members = set(connection.execute(
            select(D.c.notification_id).select_from(D.join(N, N.c.id == D.c.notification_id))
            .where(D.c.destination == key, D.c.claimed_until == stored, D.c.status.in_((PENDING, SENDING)),
                   live_events(now))).scalars())
        again = [r for r in rows if r.notification_id in members]
        # No claim takes more rows than a message holds: a larger set sharing one value is another tool's.
        if len(again) != len(members) and len(members) <= max(limit, MAX_EVENTS):
            return [], expired, False
        more, rows = more or len(again) < len(rows), again
    claim = (update(D).where(D.c.notification_id.in_([r.notification_id for r in rows]), _due_rows(key, now))
             .values(status=SENDING, claimed_until=until, attempts=_next_tries()))
    if not is_postgres(connection):
        # The write lock is ours since BEGIN IMMEDIATE: nothing changed since the read. (No
        # RETURNING here: SQLite before 3.35 has none.)
        connection.execute(claim)
        return rows, expired, more
    # Only what this UPDATE switched is ours (still due as it ran): the row locks make that all of
    # them, and if anything ever bypassed the locks it would still not be sent twice.
    claimed = set(connection.execute(claim.returning(D.c.notification_id)).scalars())
    return [r for r in rows if r.notification_id in claimed], expired, more


def _mark_sent(engine: Engine, destination: Destination, ids: list[int]) -> None:
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        # Sent is sent: even if the claim ran out meanwhile and another sender took the rows.
        connection.execute(update(D).where(D.c.destination == destination.key, D.c.notification_id.in_(ids),
                                           D.c.status != SENT)
                           .values(status=SENT, sent_at=now, claimed_until=None, last_error=None))


def _under_claim(destination: Destination, ids: list[int], claimed_until):
    """The rows of ``ids`` still under this sender's claim: one another sender took over is its business."""
    return and_(D.c.destination == destination.key, D.c.notification_id.in_(ids), D.c.status == SENDING,
                D.c.claimed_until == claimed_until)


def _mark_failed(engine: Engine, destination: Destination, ids: list[int], claimed_until, wait: float,
                 error: str, *, split_off: list[int] = ()) -> None:
    """The message failed: its rows wait ``wait`` seconds, and so does every other row of the destination.

    ``split_off``: rows of a message the receiver refused as too large, made a message of their own.
    Their claim moves a microsecond on, so they are sent together, after the rows that keep the claim
    (``_claim``), and never merged with newer events into a message as large again. The receiver took
    no part of the refused message: each part has a new idempotency key."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        retry_at = now + timedelta(seconds=wait)
        if split_off:
            connection.execute(update(D).where(_under_claim(destination, split_off, claimed_until))
                               .values(status=PENDING, claimed_until=claimed_until + timedelta(microseconds=1),
                                       next_attempt_at=None))
        # The claim stays on the rows as the mark of the message they were (``_claim``).
        connection.execute(update(D).where(_under_claim(destination, ids, claimed_until))
                           .values(status=PENDING, next_attempt_at=retry_at, last_error=error))
        connection.execute(update(D).where(D.c.destination == destination.key, D.c.status == PENDING,
                                           or_(D.c.next_attempt_at.is_(None), D.c.next_attempt_at < retry_at))
                           .values(next_attempt_at=retry_at))


def _left(engine: Engine, destination: Destination) -> tuple[int, float | None]:
    """How many events are still undelivered to the destination, and seconds until the next try.

    A row another sender claimed (``sending``) is next tried when its claim runs out, not at its
    ``next_attempt_at`` (long past: it was due when claimed). Counting that would have an idle
    sender ask again and again while the other one's POST is in flight."""
    next_try = case((D.c.status == SENDING, D.c.claimed_until), else_=D.c.next_attempt_at)
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        count, first = connection.execute(
            select(func.count(), func.min(next_try))
            .select_from(D.join(N, N.c.id == D.c.notification_id))
            .where(D.c.destination == destination.key, D.c.status.in_((PENDING, SENDING)), live_events(now))
        ).one()
    wait = None
    if count and isinstance(first, datetime):
        wait = max(0.0, (first - now).total_seconds())
    elif count:
        wait = 0.0
    return int(count or 0), wait


# --- one destination ------------------------------------------------------------------


def _message(destination: Destination, events: list[digests.OutboxEvent], key: str) -> dict:
    from . import discord, slack, webhook

    module = {"slack": slack, "discord": discord, "webhook": webhook}[destination.kind]
    return module.message(digests.build(events), key)


def deliver_to(engine: Engine, destination: Destination, *, timeout: float = DEFAULT_TIMEOUT,
               limit: int = MAX_EVENTS) -> DestinationResult:
    """Claim what is due for one destination, send it as one message, mark the outcome. Never raises."""
    started = time.monotonic()
    result = DestinationResult(destination)
    try:
        with read_connection(engine) as connection:
            if not has_work(connection, destination, fetch_now(connection)):
                result.pending, result.retry_in = _left(engine, destination)
                return result
        with write_transaction(engine) as connection:
            now = fetch_now(connection)
            claimed_until = now + timedelta(seconds=timeout + CLAIM_MARGIN)
            rows, result.expired, more = _claim(connection, destination, now, claimed_until, limit)
        if result.expired:
            log.warning("%d alert event(s) for %s expired undelivered and were dropped", result.expired,
                        destination.label)
        if rows:
            events = [digests.OutboxEvent(id=r.notification_id, created_at=r.created_at, event=r.event,
                                          payload=r.payload if isinstance(r.payload, dict) else {}) for r in rows]
            ids = [e.id for e in events]
            key = digests.idempotency_key(destination.key, events)
            result.events, result.more = len(events), more
            try:
                body = _message(destination, events, key)
            except Exception as error:  # noqa: BLE001 - a row no formatter can read must not stop the others
                body = None
                response_error = f"could not format the message: {type(error).__name__}: {error}"[:300]
            if body is not None:
                response = post_json(destination.url, body, timeout=timeout, idempotency_key=key)
                result.status = response.status
                response_error = response.error
            if body is not None and response.ok:
                # A crash right here (sent, not yet marked) means the rows are sent again when the
                # claim runs out: at least once, with the same idempotency key.
                _mark_sent(engine, destination, ids)
                result.sent = True
                log.info("alert sent to %s: %d event(s), idempotency key %s", destination.label, len(ids), key)
            else:
                # Another tool may have written anything into the column (SQLite keeps text there):
                # read as no tries, and counted, rather than failing this attempt.
                tries = [safe_int(r.attempts) for r in rows]
                result.unreadable_tries = sum(1 for r, n in zip(rows, tries) if n is None and r.attempts is not None)
                if result.unreadable_tries:
                    log.warning("%d delivery row(s) for %s held a tries count that is no number; read as 0",
                                result.unreadable_tries, destination.label)
                attempts = max(n or 0 for n in tries) + 1
                wait = backoff(attempts)
                if body is not None and response.retry_after is not None:
                    wait = max(response.retry_after, 0.5)  # the destination said when: exactly then, not sooner
                split_off: list[int] = []
                if body is not None and response.status == TOO_LARGE and len(ids) > 1:
                    # The receiver takes smaller bodies (nginx's client_max_body_size): the first half goes
                    # again at once, under this claim, and the rest as a message of its own after it.
                    kept = ids[:len(ids) // 2]
                    response_error += (f"; too large for the receiver: sent again as {len(kept)} and "
                                       f"{len(ids) - len(kept)} events")
                    ids, split_off, wait = kept, ids[len(kept):], 0.0
                elif body is not None and response.status == TOO_LARGE:
                    response_error += "; one event is too large for the receiver: raise the size of body it takes"
                result.error = response_error
                _mark_failed(engine, destination, ids, claimed_until, wait, response_error, split_off=split_off)
                log.info("alert to %s failed (%s); %d event(s) kept, next try in %.1fs", destination.label,
                         response_error, len(ids), wait)
        result.pending, result.retry_in = _left(engine, destination)
    except (AuditctlError, SQLAlchemyError) as error:
        result.error = f"database: {printable(error)}"[:300]
        log.info("alert delivery to %s could not use the database: %s", destination.label, printable(error))
    except Exception as error:  # noqa: BLE001 - a sender never raises into the pass that called it
        result.error = f"{type(error).__name__}: {printable(error)}"[:300]
        log.warning("alert delivery to %s failed unexpectedly: %s", destination.label, result.error, exc_info=True)
    finally:
        result.seconds = time.monotonic() - started
    return result


#: A destination's rate limit: while more is due, the next message a second later.
MORE_PAUSE = 1.0
#: The most messages one run of ``deliveries`` sends a destination.
MAX_ROUNDS = 20


def deliveries(deliver_once: Callable[[], DeliveryReport], *, rounds: int = MAX_ROUNDS) -> Iterator[DeliveryReport]:
    """Deliver until nothing more is due or a delivery fails, a message a second: each report as it
    comes, at most ``rounds`` (``notify``, and ``recover``, ``reset-all`` and ``watch --once`` after
    their change). ``deliver_once`` is one ``deliver`` call."""
    for number in range(rounds):
        if number:
            time.sleep(MORE_PAUSE)
        report = deliver_once()
        yield report
        if not report.more or not report.ok:
            return


def deliver(engine: Engine, destinations: list[Destination], *, timeout: float = DEFAULT_TIMEOUT,
            limit: int = MAX_EVENTS) -> DeliveryReport:
    """Deliver what is due once: one message at most per destination, all destinations at once.

    Returns within ``timeout`` plus ``DATABASE_MARGIN`` whatever the webhooks do; a destination
    still busy then is reported as such and finishes (or its claim runs out) in the background.
    Never raises.
    """
    if not destinations:
        return DeliveryReport()
    results: dict[int, DestinationResult] = {}

    def run(index: int, destination: Destination) -> None:
        results[index] = deliver_to(engine, destination, timeout=timeout, limit=limit)

    threads = [threading.Thread(target=run, args=(i, d), name=f"auditctl-notify-{d.kind}", daemon=True)
               for i, d in enumerate(destinations)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + DATABASE_MARGIN
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    report = DeliveryReport()
    for index, destination in enumerate(destinations):
        result = results.get(index)
        if result is None:
            result = DestinationResult(destination, error="still sending when the time was up", pending=1)
        report.results.append(result)
    return report
