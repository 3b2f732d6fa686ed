"""Claims and fenced writes: the only SQL a worker runs against an audit it is working on.

Claiming a pending audit gives it a fresh lease token and records the thresholds the
worker runs under, so every judge uses the audit's own values. Every later write by
that worker names the token in its WHERE clause, so once the audit has been recovered
or reset (which clears the token) the worker's write matches no row: it changes nothing
and raises ``LeaseLost``. The rejected write is recorded in the history.

Each write is one statement on the database's clock: the times, and the stamps inside
the progress document, are set by the database in the UPDATE itself. The same write
keeps the run's longest silence between writes and longest time without progress
(what threshold suggestions learn from).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import and_, bindparam, case, func, insert, select, update
from sqlalchemy import types
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from . import documents, history
from .errors import AuditctlError, AuditNotClaimable, AuditNotFound, ConfigError, LeaseLost
from .history import Actor
from .progress import build_document
from .schema import COMPLETED, FAILED, PENDING, RUNNING, Document, audit_events, audits
from .sqlfunctions import db_now, fetch_now, pg_seconds_since
from .textsafe import printable
from .thresholds import kind_name
from .transactions import HeldConnection, PreparedWrite, retried_transaction, single_write, write_transaction
from .values import storable_text, text_value

log = logging.getLogger("auditctl")  # the worker's logger: its lease-lost warnings go with the guard's


@dataclass(frozen=True)
class Lease:
    audit_id: int
    token: str
    worker_id: str
    instance_id: str
    worker_url: str | None
    #: The database's time of the claim (the run's ``started_at``): what tells this run's own end,
    #: already written, from another's (see ``finish``). None for a lease read back from a row.
    claimed_at: datetime | None = None


def create_audit(engine: Engine, target: str, *, max_age: float | None = None, kind: str | None = None) -> int:
    """Insert a pending audit; ``max_age`` (seconds) is its own deadline; ``kind`` picks per-kind thresholds."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError("target must be a non-empty string")
    if kind is not None:
        kind_name(kind, "kind")
    storable_text("target", target)
    if kind is not None:
        storable_text("kind", kind)
    def attempt(connection):
        result = connection.execute(
            insert(audits).values(target=target, status=PENDING, created_at=db_now(), attempts=0, max_age_seconds=max_age,
                                  kind=kind)
        )
        return int(result.inserted_primary_key[0])

    # A connection lost before the COMMIT went out committed nothing: the audit is created once more
    # on a fresh one. One whose COMMIT may have gone out is never repeated: that could make two audits.
    return retried_transaction(engine, attempt)


def _fenced(lease: Lease):
    return (audits.c.id == lease.audit_id, audits.c.lease == lease.token, audits.c.status == RUNNING)


class stamped(FunctionElement):
    """A progress document with its heartbeat stamps set to the database's time by the database.

    ``progress.heartbeat`` and ``last_worker_update`` always; ``progress.last_updated`` when
    ``updated``; ``progress.is_running`` false when ``finished``. A document of another shape
    (another tool's) is left as it is.
    """

    type = Document()
    inherit_cache = True

    def __init__(self, document, *, updated: bool = False, finished: bool = False):
        self.updated = updated
        self.finished = finished
        super().__init__(document)


@compiles(stamped, "sqlite")
def _stamped_sqlite(element, compiler, **kw):
    (document,) = list(element.clauses)
    doc = compiler.process(document, **kw)
    now = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    pairs = [f"'$.progress.heartbeat', {now}", f"'$.last_worker_update', {now}"]
    if element.updated:
        pairs.append(f"'$.progress.last_updated', {now}")
    if element.finished:
        pairs.append("'$.progress.is_running', json('false')")
    return (f"CASE WHEN typeof({doc}) = 'text' AND json_valid({doc}) AND json_type({doc}, '$.progress') = 'object' "
            f"THEN json_set({doc}, {', '.join(pairs)}) ELSE {doc} END")


@compiles(stamped, "postgresql")
def _stamped_pg(element, compiler, **kw):
    (document,) = list(element.clauses)
    doc = compiler.process(document, **kw)
    now = "to_jsonb(to_char(statement_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))"
    value = f"jsonb_set(jsonb_set(CAST({doc} AS jsonb), '{{progress,heartbeat}}', {now}), '{{last_worker_update}}', {now})"
    if element.updated:
        value = f"jsonb_set({value}, '{{progress,last_updated}}', {now})"
    if element.finished:
        value = f"jsonb_set({value}, '{{progress,is_running}}', 'false'::jsonb)"
    return f"CASE WHEN jsonb_typeof(CAST({doc} AS jsonb) -> 'progress') = 'object' THEN {value} ELSE CAST({doc} AS jsonb) END"


class _seconds_since_column(FunctionElement):
    """Seconds from a stored time to now, in an UPDATE (NULL when the time is missing or unreadable).

    Not ``sqlfunctions.seconds_since``: on SQLite this reads the column as it is, with no call back into
    Python (``auditctl_utc``) in a worker's every write. The times it reads are the ones the
    worker's own writes keep, in the canonical form; one ``julianday`` cannot read is NULL,
    which ``_greatest`` takes as 0."""

    type = types.Float()
    inherit_cache = True


@compiles(_seconds_since_column, "sqlite")
def _seconds_since_column_sqlite(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return f"((julianday('now') - julianday({compiler.process(moment, **kw)})) * 86400.0)"


@compiles(_seconds_since_column, "postgresql")
def _seconds_since_column_pg(element, compiler, **kw):
    (moment,) = list(element.clauses)
    return pg_seconds_since(compiler.process(moment, **kw))


class _greatest(FunctionElement):
    """The larger of two numbers, either of which may be NULL."""

    type = types.Float()
    inherit_cache = True


@compiles(_greatest, "sqlite")
def _greatest_sqlite(element, compiler, **kw):
    a, b = [compiler.process(c, **kw) for c in element.clauses]
    return f"max(coalesce({a}, 0.0), coalesce({b}, 0.0))"


@compiles(_greatest, "postgresql")
def _greatest_pg(element, compiler, **kw):
    a, b = [compiler.process(c, **kw) for c in element.clauses]
    return f"GREATEST(COALESCE({a}, 0.0), COALESCE({b}, 0.0))"


def _gaps() -> dict:
    """The run's longest silence and longest time without progress, extended by this write."""
    return {
        "longest_gap_seconds": _greatest(audits.c.longest_gap_seconds, _seconds_since_column(audits.c.heartbeat_at)),
        "longest_stall_seconds": _greatest(audits.c.longest_stall_seconds, _seconds_since_column(audits.c.progress_changed_at)),
    }


#: The largest attempts counter a claim counts on from; anything else starts again at 1.
MAX_COUNTED_ATTEMPTS = 1_000_000_000


def _next_attempt():
    """The claim's attempts counter: the stored one plus 1, or 1 when another tool left one that cannot
    count on (NULL, text, negative, a fraction or infinite on SQLite, which everything reads as 0, so
    ``--max-attempts`` would never fire; 2,147,483,647 on PostgreSQL: ``+ 1`` would refuse every claim)."""
    whole = and_(audits.c.attempts.between(0, MAX_COUNTED_ATTEMPTS), audits.c.attempts == func.round(audits.c.attempts))
    return case((whole, audits.c.attempts + 1), else_=1)


def claim(engine: Engine, audit_id: int, *, worker_id: str, instance_id: str, worker_url: str | None,
          declared: dict | None = None) -> tuple[Lease, dict]:
    """Move a pending audit to running under a new lease. Returns the lease and the first progress document.

    ``declared`` holds the thresholds the worker runs under (``heartbeat_interval`` always;
    ``stale_after``, ``stall_after``, ``max_age`` when the worker was given them).
    """
    declared = declared or {}
    lease = Lease(audit_id=audit_id, token=uuid.uuid4().hex, worker_id=worker_id, instance_id=instance_id, worker_url=worker_url)

    def attempt(connection):
        now = fetch_now(connection)
        document, _ = build_document(step=None, percentage=0.0, completed_tasks=None, total_tasks=None, is_running=True,
                                     now=now, worker_id=worker_id, worker_url=worker_url)
        result = connection.execute(
            update(audits)
            .where(audits.c.id == audit_id, audits.c.status == PENDING)
            .values(status=RUNNING, lease=lease.token, worker_id=worker_id, worker_instance=instance_id,
                    started_at=now, heartbeat_at=now, last_worker_update=now, progress_changed_at=now,
                    progress=document, progress_signature=None, finished_at=None, error=None,
                    # A new run: the reasons of an earlier recovery (kept in history and
                    # recovery_info) must not make reset-all --reason pick this run's failure.
                    recovery_reasons=None,
                    declared_heartbeat_interval=declared.get("heartbeat_interval"),
                    declared_stale_after=declared.get("stale_after"),
                    declared_stall_after=declared.get("stall_after"),
                    declared_max_age=declared.get("max_age"),
                    longest_gap_seconds=0.0, longest_stall_seconds=0.0,
                    attempts=_next_attempt())
        )
        if result.rowcount == 1:
            return (replace(lease, claimed_at=now), document), None
        return None, connection.execute(select(audits.c.status).where(audits.c.id == audit_id)).scalar()

    # A connection lost before the COMMIT went out (a deadline that closed it as an answer came in)
    # committed nothing: the claim is made once more on a fresh one (``retried_transaction``).
    claimed, status = retried_transaction(engine, attempt)
    if claimed is not None:
        return claimed
    if status is None:
        raise AuditNotFound(f"no audit with id {audit_id}")
    # The status is whatever the row holds (another tool's text, a BLOB): shown, never sent to a terminal as it is.
    raise AuditNotClaimable(f"audit {audit_id} is {printable(text_value(status))}, not pending; "
                            "only a pending audit can be run")


def _lost(engine: Engine, lease: Lease, write: str, actor: Actor) -> LeaseLost:
    """Record the rejected write and build the exception to raise. Like a claim, the record is made
    once more on a fresh connection when the first was lost before its COMMIT went out.

    The write matched no row: the lease is lost whatever happens to the record. A record the
    database refuses (the SQLite file locked past the worker's wait, the server gone) is logged
    as a warning with what it would have held, and the caller still gets ``LeaseLost``: told
    ``DatabaseUnavailable``, its code would go on working on an audit that is no longer its own.
    The exception then carries ``unrecorded``, a call that records the event later (marked
    ``recorded_late``): the guard owes it, and its heartbeat thread and ``close()`` pay it. That
    call records nothing when the event is already there: an attempt whose COMMIT went through
    but whose answer was lost is tried again, and the history keeps one row."""
    details = {"write": write, "lease": lease.token, "worker_id": lease.worker_id, "instance_id": lease.instance_id}

    def recording(late: bool):
        def attempt(connection):
            if late and _already_recorded(connection, lease.audit_id, details):
                return  # an earlier attempt went through, but its answer was lost on the way back
            now = fetch_now(connection)
            status = connection.execute(select(audits.c.status).where(audits.c.id == lease.audit_id)).scalar()
            history.record(connection, [{
                "audit_id": lease.audit_id, "event": history.LEASE_LOST, "from_status": status, "to_status": status,
                "details": {**details, "recorded_late": True} if late else details,
            }], actor, now)
        return attempt

    lost = LeaseLost(lease.audit_id)
    try:
        retried_transaction(engine, recording(late=False))
    except AuditctlError as error:
        log.warning("audit %s: its lease is lost (the %s write matched no row and changed nothing), but the lease_lost "
                    "event could not be recorded in its history yet (%s); it would hold %s, by %s", lease.audit_id,
                    write, printable(error), printable(str(details)), printable(actor.name))
        lost.unrecorded = lambda: retried_transaction(engine, recording(late=True))
    return lost


def _already_recorded(connection, audit_id: int, details: dict) -> bool:
    """A ``lease_lost`` event of this lease and write is in the audit's history already."""
    recorded = connection.execute(select(audit_events.c.details).where(
        audit_events.c.audit_id == audit_id, audit_events.c.event == history.LEASE_LOST)).scalars()
    return any(isinstance(found, dict) and found.get("lease") == details["lease"] and found.get("write") == details["write"]
               for found in recorded)


#: The three writes a run makes while it works, built once with the lease as parameters: building a
#: statement and its cache key per call cost more than the database's work (issue 13).
_BY_LEASE = (audits.c.id == bindparam("audit_id"), audits.c.lease == bindparam("token"), audits.c.status == RUNNING)
_PROGRESS_CHANGED = audits.c.progress_signature.is_distinct_from(bindparam("signature"))
# The document travels as JSON text the library serialised (documents.dumps_strict, as the column's
# type would): with no conversion left for SQLAlchemy, the write goes straight to the driver.
_WRITE_PROGRESS = update(audits).where(*_BY_LEASE).values(
    progress=stamped(bindparam("document", type_=types.Text()), updated=True),
    heartbeat_at=db_now(),
    last_worker_update=db_now(),
    progress_changed_at=case((_PROGRESS_CHANGED, db_now()), else_=audits.c.progress_changed_at),
    progress_signature=bindparam("signature"),
    **_gaps(),
)
_HEARTBEAT = update(audits).where(*_BY_LEASE).values(
    heartbeat_at=db_now(), last_worker_update=db_now(), progress=stamped(audits.c.progress), **_gaps())
_MINIMAL_WRITE = update(audits).where(*_BY_LEASE).values(heartbeat_at=db_now(), last_worker_update=db_now())


def _lease_params(lease: Lease) -> dict:
    return {"audit_id": lease.audit_id, "token": lease.token}


def write_progress(engine: Engine, lease: Lease, fields: dict, signature: str, extra: dict | None, actor: Actor, *,
                   held: HeldConnection | None = None, timeout: float | None = None) -> dict:
    """Store a full progress report. Raises DocumentError (nothing written) or LeaseLost.

    Returns the document as built (its stamps are the database's, set in the UPDATE). ``held``:
    the run's own connection (``transactions.HeldConnection``), for this and the other single writes;
    ``timeout``: how long the write may wait for the server's answer (``transactions.single_write``)."""
    from datetime import datetime, timezone

    document, _ = build_document(**fields, is_running=True, now=datetime.now(timezone.utc), worker_id=lease.worker_id,
                                 worker_url=lease.worker_url, extra=extra)
    text = documents.dumps_strict(document)
    if single_write(engine, _WRITE_PROGRESS, {**_lease_params(lease), "document": text, "signature": signature},
                    held=held, timeout=timeout) == 1:
        return document
    raise _lost(engine, lease, "progress", actor)


def prepare_heartbeat(engine: Engine, lease: Lease) -> PreparedWrite:
    """A run's heartbeat, ready to send (``heartbeat(prepared=...)``): built once, as its lease never changes."""
    return PreparedWrite(engine, _HEARTBEAT, _lease_params(lease))


def heartbeat(engine: Engine, lease: Lease, actor: Actor, *, held: HeldConnection | None = None,
              timeout: float | None = None, prepared: PreparedWrite | None = None) -> None:
    """Refresh the heartbeat (and the document's heartbeat stamps), one statement. Raises LeaseLost.
    ``prepared``: this lease's ``prepare_heartbeat``."""
    if prepared is None:
        prepared = prepare_heartbeat(engine, lease)
    if single_write(engine, prepared, held=held, timeout=timeout) == 1:
        return
    raise _lost(engine, lease, "heartbeat", actor)


def minimal_write(engine: Engine, lease: Lease, actor: Actor, *, held: HeldConnection | None = None,
                  timeout: float | None = None) -> None:
    """The emergency write: heartbeat and last_worker_update only, one statement. Raises LeaseLost."""
    if single_write(engine, _MINIMAL_WRITE, _lease_params(lease), held=held, timeout=timeout) == 1:
        return
    raise _lost(engine, lease, "emergency", actor)


def finish(engine: Engine, lease: Lease, *, error: str | None, actor: Actor) -> str:
    """Mark the audit completed (no error) or failed. Raises LeaseLost when it was taken away."""
    status = COMPLETED if error is None else FAILED
    with write_transaction(engine) as connection:
        values = {"status": status, "finished_at": db_now(), "heartbeat_at": db_now(), "last_worker_update": db_now(),
                  "lease": None, "error": error,
                  "progress": stamped(audits.c.progress, updated=True, finished=True), **_gaps()}
        if connection.execute(update(audits).where(*_fenced(lease)).values(**values)).rowcount == 1:
            return status
        if _ended_by_this_run(connection, lease, status):
            return status  # a retry of a write whose commit did commit, though its answer was lost
    raise _lost(engine, lease, "finish", actor)


def _ended_by_this_run(connection, lease: Lease, status: str) -> bool:
    """Whether the audit already holds this run's own end: the status it wrote, no lease, this
    instance, this run's start, and no recovery's reasons (a recovery leaves the same instance
    and start, with its reasons). Without it, a retried final write whose first commit reached
    the server but whose answer was lost reported the worker's own success as a lost lease."""
    if lease.claimed_at is None:
        return False
    return connection.execute(
        select(func.count()).select_from(audits).where(
            audits.c.id == lease.audit_id, audits.c.status == status, audits.c.lease.is_(None),
            audits.c.worker_instance == lease.instance_id, audits.c.started_at == lease.claimed_at,
            audits.c.recovery_reasons.is_(None))
    ).scalar_one() == 1
