"""Every state change an operator or monitor makes: recover, requeue, reset.

Each change is conditional: a row is changed only while it is still ``running`` under
the lease that was judged (or still ``failed``, for a reset), inside a short write
transaction that also writes its history row and its outbox event. Two recoverers at
once therefore recover each audit exactly once, and a recovery never overwrites a
worker that has just finished or an audit that was requeued and claimed again. On
PostgreSQL the stuck rows are locked with ``FOR UPDATE SKIP LOCKED`` so a recoverer
never waits on a worker or another recoverer; on SQLite the transaction starts as the
writer (``BEGIN IMMEDIATE``), which serialises them.

Big operations work in batches of ``DEFAULT_BATCH`` audits, each batch atomic: a crash or
Ctrl-C between batches leaves every audit either fully changed (with its history row) or
untouched, and the bind-parameter count stays bounded. On SQLite batches take turns with the
workers for the write lock (``lockturns``), so workers keep beating through a reset of 150,000
audits.
A batch the database refuses is retried in halves, so one row another tool made
unwritable cannot hold back the others; that row is reported as needing an operator.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable

from sqlalchemy import Integer, LargeBinary, Text, bindparam, cast, func, null, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from . import documents, history, outbox
from . import timestamps
from .errors import AuditctlError, ConfigError, DatabaseRefused, Interrupted, WriteRefused
from .gcpause import paused_collector
from .history import Actor
from .lockturns import LockTurns
from .migrate import refuse_newer_schema
from .rules import (
    Filters, GoneInstances, Verdict, find_stuck, fixed_moments, gone_instances, isolate, make_filters, select_stuck,
    stuck_ids,
)
from .schema import ERROR_LIMIT, FAILED, PENDING, RUNNING, Document, audits
from .signals import interrupts_held
from .sqlfunctions import fetch_now, id_in, is_postgres, moments, stored_time
from .textsafe import printable
from .thresholds import RECOVERY_REASONS, Policy, Thresholds
from .timestamps import as_datetime, isoformat_z
from .transactions import driver_form, read_connection, write_transaction
from .values import safe_int, text_value

log = logging.getLogger("auditctl.recovery")

DEFAULT_MAX_ATTEMPTS = 3
#: Audits per batch: bounded parameters (PostgreSQL allows 65,535) and a short lock.
DEFAULT_BATCH = 500
#: How often an operator may reset one audit before reset-all leaves it alone (--max-resets).
DEFAULT_MAX_RESETS = 5


class ConcurrentChange(AuditctlError):
    """A locked row changed under a recovery: the batch was rolled back; the next pass retries."""


def needing_an_operator(count: int, what: str | None = None) -> str:
    """How every face says it: ``1 audit could not be recovered and needs an operator``, or with no
    ``what``, ``2 need an operator``."""
    verb = "needs" if count == 1 else "need"
    if what is None:
        return f"{count} {verb} an operator"
    return f"{count} audit{'' if count == 1 else 's'} could not be {what} and {verb} an operator"


@dataclass
class Recovery:
    """One audit taken away from its worker (or, under dry run, that would be)."""

    id: int
    target: str
    reasons: list[str]
    explanation: list[str]
    from_status: str
    status: str
    worker_id: str | None
    attempts: int
    measurements: dict
    recovered_at: datetime | None
    thresholds: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Skipped:
    """An audit the database would not let a batch change: an operator must look at it."""

    id: int
    error: str


class RecoveryResult(list):
    """The audits recovered (a list of ``Recovery``), plus those that need an operator (``skipped``)."""

    def __init__(self, items=()):
        super().__init__(items)
        self.skipped: list[Skipped] = []


@dataclass
class Reset:
    """One failed audit returned to pending (or, under dry run, that would be)."""

    id: int
    target: str
    from_status: str
    status: str
    reasons: list[str]
    error: str | None
    finished_at: datetime | None
    origin: str = "error"  # "stuck": recovered by auditctl; "error": failed with its own error
    resets: int = 0


class ResetResult(list):
    """The audits reset (a list of ``Reset``), plus those that need an operator (``skipped``)."""

    def __init__(self, items=()):
        super().__init__(items)
        self.skipped: list[Skipped] = []


as_policy = Policy.coerce


# --- the database builds the records ----------------------------------------------------


class with_original_status(FunctionElement):
    """``recovery_info`` = the given document plus ``original_status``: the row as it was before
    this UPDATE, built by the database from the row itself, without the row's own earlier
    ``recovery_info`` (the chain lives in the history, one row per event, so the record keeps
    a fixed size however often an audit is recovered and reset)."""

    type = Document()
    inherit_cache = True


def _sqlite_json_value(column) -> str:
    name = column.name
    if isinstance(column.type, Document):
        return (f"CASE WHEN typeof({name}) = 'blob' THEN hex({name}) "
                f"WHEN json_valid({name}) THEN json({name}) ELSE {name} END")
    return f"CASE WHEN typeof({name}) = 'blob' THEN hex({name}) ELSE {name} END"


_NOT_IN_ORIGINAL = ("recovery_info", "odd_times")


@compiles(with_original_status, "sqlite")
def _with_original_status_sqlite(element, compiler, **kw):
    (info,) = list(element.clauses)
    pairs = ", ".join(f"'{column.name}', {_sqlite_json_value(column)}" for column in audits.columns
                      if column.name not in _NOT_IN_ORIGINAL)
    return f"json_set({compiler.process(info, **kw)}, '$.original_status', json_object({pairs}))"


@compiles(with_original_status, "postgresql")
def _with_original_status_pg(element, compiler, **kw):
    (info,) = list(element.clauses)
    dropped = " - ".join(f"'{name}'" for name in _NOT_IN_ORIGINAL)
    return f"jsonb_set({compiler.process(info, **kw)}, '{{original_status}}', to_jsonb(audits) - {dropped})"


# --- recover --------------------------------------------------------------------------


def _decide(verdict: Verdict, *, requeue: bool, max_attempts: int) -> Recovery:
    """What recovering this audit does to it, and what is reported. Raises for a row too broken to describe."""
    attempts = verdict.attempts
    give_up = requeue and attempts >= max_attempts
    sentences = verdict.explain()
    if give_up:
        sentences = sentences + [f"gave up after {attempts} attempts (max_attempts {max_attempts})"]
    return Recovery(
        id=verdict.id, target=verdict.target, reasons=list(verdict.reasons), explanation=sentences, from_status=RUNNING,
        status=PENDING if requeue and not give_up else FAILED, worker_id=verdict.worker_id, attempts=attempts,
        measurements=verdict.measurements(), recovered_at=None, thresholds=verdict.thresholds(), problems=verdict.problems,
    )


def _recovery_params(verdict: Verdict, *, requeue: bool, max_attempts: int, actor: Actor):
    """What one recovery writes, and what it reports (``recovered_at`` is filled in when it is
    written). Raises for a row too broken to describe."""
    recovery = _decide(verdict, requeue=requeue, max_attempts=max_attempts)
    reasons, sentences = recovery.reasons, recovery.explanation
    info = {
        "recovered_at": None,
        "reason": ", ".join(reasons),
        "reasons": reasons,
        "explanation": sentences,
        "measured": recovery.measurements,
        "thresholds": recovery.thresholds,
        "recovered_by": {"actor": actor.name, "host": actor.host, "pid": actor.pid},
        "requeued": recovery.status == PENDING,
    }
    params = {
        "b_id": verdict.id,
        "b_lease": verdict.lease,
        "v_recovery_info": info,
        "v_recovery_reasons": ",".join(reasons),
        "v_error": f"recovered ({', '.join(reasons)}): {'; '.join(sentences)}"[:ERROR_LIMIT],
    }
    event = {
        "audit_id": verdict.id,
        "event": history.REQUEUED if recovery.status == PENDING else history.RECOVERED,
        "from_status": RUNNING,
        "to_status": recovery.status,
        "reasons": reasons,
        "measurements": recovery.measurements,
        "details": {"from": {"status": RUNNING, "worker_id": verdict.worker_id, "worker_instance": verdict.worker_instance,
                             "step": getattr(verdict, "step", None),
                             "lease": verdict.lease, "attempts": recovery.attempts,
                             # From the exact ISO text the verdict has worked out already, for its problems.
                             "started_at": timestamps.milliseconds(verdict.iso("started_at")),
                             "heartbeat_at": timestamps.milliseconds(verdict.iso("heartbeat_at"))},
                    "explanation": sentences, "thresholds": recovery.thresholds},
    }
    return recovery.status, params, event, recovery


def _minimal_params(verdict: Verdict, problem: str, *, actor: Actor):
    """A recovery for a row that cannot be described: the database's verdict, and what was wrong."""
    recovery = _unreadable_recovery(verdict, problem)
    reasons, sentence = recovery.reasons, recovery.explanation[0]
    info = {"recovered_at": None, "reason": ", ".join(reasons), "reasons": reasons, "explanation": [sentence],
            "recovered_by": {"actor": actor.name, "host": actor.host, "pid": actor.pid}, "requeued": False}
    params = {"b_id": verdict.id, "b_lease": verdict.lease, "v_recovery_info": info,
              "v_recovery_reasons": ",".join(reasons), "v_error": f"recovered ({', '.join(reasons)}): {sentence}"}
    event = {"audit_id": verdict.id, "event": history.RECOVERED, "from_status": RUNNING, "to_status": FAILED,
             "reasons": reasons, "details": {"explanation": [sentence], "unreadable": problem}}
    return FAILED, params, event, recovery


def _unreadable_recovery(verdict: Verdict, problem: str) -> Recovery:
    """What is reported of a row that cannot be described (``problem`` is at most 200 characters)."""
    reasons = list(verdict.reasons) or ["unreadable"]
    sentence = f"the row could not be read ({problem}); recovered on the database's verdict"
    return Recovery(id=verdict.id, target=text_value(verdict.row[1]) or "?", reasons=reasons, explanation=[sentence],
                    from_status=RUNNING, status=FAILED, worker_id=None, attempts=0, measurements={},
                    recovered_at=None, problems=[f"row_unreadable: {problem}"])


def _build(verdict, *, requeue: bool, max_attempts: int, actor: Actor) -> tuple:
    """``(new status, params, history event, Recovery)`` for one verdict; a row too broken to
    describe is recovered on the database's verdict."""
    return isolate(verdict, lambda v: _recovery_params(v, requeue=requeue, max_attempts=max_attempts, actor=actor),
                   lambda v, problem: _minimal_params(v, problem, actor=actor))


def _build_ahead(verdicts: list[Verdict], *, requeue: bool, max_attempts: int, actor: Actor) -> dict[int, tuple]:
    """What recovering each verdict writes, worked out before the batch takes the write lock:
    ``{id: (the row as judged, without its ages; what _build gave)}``. Under the lock the batch is
    judged again, and only an audit whose row is still exactly as judged here uses it."""
    with paused_collector():
        return {verdict.id: (verdict.judged(), _build(verdict, requeue=requeue, max_attempts=max_attempts, actor=actor))
                for verdict in verdicts}


def _apply_recovery(connection: Connection, verdicts: list, *, requeue: bool, max_attempts: int,
                    actor: Actor, ahead: dict[int, tuple] | None = None) -> list[Recovery]:
    """Recover ``verdicts`` (judged under this transaction's lock). ``ahead``: what ``_build_ahead``
    worked out for them before the lock; an audit whose row changed since is worked out again.
    The ages reported for an audit built ahead are those measured when it was read, during a
    pause a few batches before (well under a second before the lock, ``LockTurns``)."""
    if not verdicts:
        return []
    now = fetch_now(connection)
    recovered_at = isoformat_z(now)
    groups: dict[str, list[dict]] = {}
    events, done = [], []
    with paused_collector():  # what is written and reported for each audit: Python only, no database wait
        for verdict in verdicts:
            early = ahead.get(verdict.id) if ahead else None
            if early is not None and early[0] == verdict.judged():
                new_status, params, event, recovery = early[1]
            else:
                new_status, params, event, recovery = _build(verdict, requeue=requeue, max_attempts=max_attempts,
                                                             actor=actor)
            params["v_recovery_info"]["recovered_at"] = recovered_at
            recovery.recovered_at = now
            groups.setdefault(new_status, []).append(params)
            events.append(event)
            done.append(recovery)
    postgres = is_postgres(connection)
    for new_status, params in groups.items():
        # Conditional on the lease that was judged: the audit is changed only while it is still
        # running under that lease. The rows are locked by this transaction (FOR UPDATE on
        # PostgreSQL, the write lock on SQLite), so every row still matches; if one did not,
        # something bypassed the locks and the whole batch is rolled back.
        if postgres:
            changed = _update_from_values(connection, _recovered_values(new_status, now), params)
        else:
            changed = _update_through_driver(connection, new_status, now, params)
        if changed != len(params):
            raise ConcurrentChange(f"recovery expected to change {len(params)} audits but changed {changed}; rolled back")
    history.record(connection, events, actor, now)
    outbox.enqueue(connection, outbox.RECOVERED, _recovery_payload(done, actor), now=now)
    return done


def _recovered_values(new_status: str, finished_at) -> dict:
    """What recovering sets besides the per-audit record, reasons and error."""
    values = {
        "status": new_status,
        "lease": null(),
        # Only a well-formed document is marked not running; anything else another tool
        # stored is left exactly as it is (original_status has a copy either way).
        "progress": not_running(audits.c.progress),
    }
    if new_status == PENDING:
        # Back in the queue: nothing of the old run may look current (its step, its worker).
        values.update({name: null() for name in ("worker_id", "worker_instance", "started_at", "heartbeat_at",
                                                 "progress_changed_at", "finished_at", "progress", "progress_signature")})
    else:
        values["finished_at"] = finished_at
    return values


@functools.lru_cache(maxsize=None)
def _sqlite_recovery(new_status: str):
    """SQLite: the UPDATE recovering one audit to ``new_status``, built once. Every parameter is
    sent as stored (JSON and times as text), so it runs through the driver's ``executemany``
    (``transactions.driver_form``): SQLAlchemy's processing of each row's parameters cost a third of the
    UPDATE's time.

    The lease is compared as bytes: one another tool stored as text that is not UTF-8 reads back
    with replacement characters, and as text it would never match (``_stored_leases``)."""
    statement = (
        update(audits)
        .where(audits.c.id == bindparam("b_id", type_=Integer), audits.c.status == RUNNING,
               cast(audits.c.lease, LargeBinary).is_not_distinct_from(cast(bindparam("b_lease", type_=Text), LargeBinary)))
        .values({
            **_recovered_values(new_status, bindparam("v_finished_at", type_=Text)),
            "recovery_info": with_original_status(bindparam("v_recovery_info", type_=Text)),
            "recovery_reasons": bindparam("v_recovery_reasons", type_=Text),
            "error": bindparam("v_error", type_=Text),
        })
    )
    return statement


def _update_through_driver(connection: Connection, new_status: str, now, params: list[dict]) -> int:
    """SQLite: recover the batch's audits of one new status with one prepared statement executed
    per row (it runs in this process: no round trips); returns how many changed."""
    sql, arguments = driver_form(connection.engine, _sqlite_recovery(new_status))
    finished_at = timestamps.to_storage(now)
    rows = [arguments({"b_id": p["b_id"], "b_lease": p["b_lease"], "v_recovery_info": documents.dumps_strict(p["v_recovery_info"]),
                       "v_recovery_reasons": p["v_recovery_reasons"], "v_error": p["v_error"], "v_finished_at": finished_at})
            for p in _stored_leases(connection, params)]
    return connection.exec_driver_sql(sql, rows).rowcount


def _stored_leases(connection: Connection, params: list[dict]) -> list[dict]:
    """SQLite: the batch's parameters with each lease that was read leniently (it holds a replacement
    character) replaced by the bytes stored, read again under the batch's lock."""
    lossy = [p["b_id"] for p in params if isinstance(p["b_lease"], str) and "\ufffd" in p["b_lease"]]
    if not lossy:
        return params
    stored = dict(connection.execute(select(audits.c.id, cast(audits.c.lease, LargeBinary)).where(id_in(audits.c.id, lossy))).all())
    return [{**p, "b_lease": stored[p["b_id"]]} if p["b_id"] in stored else p for p in params]


def _update_from_values(connection: Connection, values: dict, params: list[dict]) -> int:
    """The batch's recoveries as one ``UPDATE audits ... FROM jsonb_to_recordset(batch)``
    (PostgreSQL): one statement and one round trip for the batch, each row still conditional on
    its lease.

    The batch travels as one JSON parameter, so the statement's text is the same for every batch:
    SQLAlchemy compiles it once and psycopg parses it once (a VALUES list of 500 rows was compiled
    and parsed again for every batch, most of a recovery's time)."""
    from sqlalchemy import BigInteger, Text, cast, column
    from sqlalchemy.dialects.postgresql import JSONB

    batch = func.jsonb_to_recordset(cast(bindparam("batch", type_=Text), JSONB)).table_valued(
        column("b_id", BigInteger), column("b_lease", Text), column("v_recovery_info", JSONB),
        column("v_recovery_reasons", Text), column("v_error", Text),
    ).render_derived(name="batch", with_types=True)
    from_batch = {
        "recovery_info": with_original_status(batch.c.v_recovery_info),
        "recovery_reasons": batch.c.v_recovery_reasons,
        "error": batch.c.v_error,
    }
    statement = (
        update(audits)
        .where(audits.c.id == batch.c.b_id, audits.c.status == RUNNING, audits.c.lease.is_not_distinct_from(batch.c.b_lease))
        .values({**values, **from_batch})
    )
    rows = [{key: p[key] for key in ("b_id", "b_lease", "v_recovery_info", "v_recovery_reasons", "v_error")} for p in params]
    return connection.execute(statement, {"batch": documents.dumps_strict(rows)}).rowcount


def _recovery_payload(done: list[Recovery], actor: Actor) -> dict:
    return {
        "actor": actor.name, "host": actor.host,
        "audits": [{"id": r.id, "target": r.target, "reasons": r.reasons, "status": r.status, "worker_id": r.worker_id,
                    "explanation": r.explanation, "measured": r.measurements} for r in done],
    }


class not_running(FunctionElement):
    """The progress document with ``progress.is_running`` set to false, when it has that shape."""

    type = Document()
    inherit_cache = True


@compiles(not_running, "sqlite")
def _not_running_sqlite(element, compiler, **kw):
    (column,) = list(element.clauses)
    name = compiler.process(column, **kw)
    return (f"CASE WHEN typeof({name}) = 'text' AND json_valid({name}) AND json_type({name}, '$.progress') = 'object' "
            f"THEN json_set({name}, '$.progress.is_running', json('false')) ELSE {name} END")


@compiles(not_running, "postgresql")
def _not_running_pg(element, compiler, **kw):
    (column,) = list(element.clauses)
    name = compiler.process(column, **kw)
    return (f"CASE WHEN jsonb_typeof({name} -> 'progress') = 'object' "
            f"THEN jsonb_set({name}, '{{progress,is_running}}', 'false'::jsonb) ELSE {name} END")


def _in_batches(engine: Engine, ids: list[int], batch_size: int, apply: Callable[..., list],
                result: list, *, on_batch: Callable[[int, int], None] | None = None, describe: str, actor: Actor,
                read_ahead: Callable[[list[int]], object] | None = None) -> None:
    """Run ``apply`` over ``ids`` batch by batch, each in its own transaction.

    A batch the database refuses (not an outage: it answered, and said no) is split in two
    and both halves retried, down to single audits; a single audit it still refuses is
    reported in ``result.skipped`` and recorded in its history as needing an operator.

    A refusal of every write (``WriteRefused``: the role, not a row) and an outage stop the run:
    the error raised carries ``done``, what ``result`` holds (the batches that committed), so the
    caller reports them with it. Ctrl-C raises ``Interrupted``, which counts them.

    ``read_ahead(batch)``, when given, works out the next batches' writes while the write lock is
    left free between batches (SQLite, ``LockTurns``: as many as the pause has time for); ``apply``
    is then called as ``apply(connection, batch, ahead)`` with what it returned, or None when
    nothing was read ahead. It only reads: what it returns is checked under the lock, and when it
    fails the batch is worked out under the lock as usual.
    """
    try:
        _run_batches(engine, ids, batch_size, apply, result, on_batch=on_batch, describe=describe, actor=actor,
                     read_ahead=read_ahead)
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Interrupted):
            raise
        raise Interrupted(len(result), "recovered" if describe == "recover" else describe) from None
    except AuditctlError as error:
        error.done = result
        raise


def committed_before(error: BaseException):
    """What a change made in batches had committed when ``error`` stopped it (its result: the audits
    of the batches done, and those that needed an operator), or None when nothing had been."""
    done = getattr(error, "done", None)
    return done if done is not None and (done or getattr(done, "skipped", None)) else None


def stopped_partway(what: str, which: str) -> str:
    """What every face says after a change in batches stopped partway (``until_stopped``)."""
    return (f"the audits {which} were {what} (their batches committed); the others were not reached and "
            "are unchanged")


def until_stopped(change: Callable[[], list]) -> tuple[list, AuditctlError | None]:
    """Run a change made in batches (``recover_stuck``, ``reset_all``...): ``(its result, None)``, or,
    when an error stopped it after some batches committed, ``(what they did, the error)``, so a caller
    shows what was done with the error (an outage mid-run). An error before any commit is raised."""
    try:
        return change(), None
    except AuditctlError as error:
        done = committed_before(error)
        if done is None:
            raise
        return done, error


def _run_batches(engine: Engine, ids: list[int], batch_size: int, apply: Callable[..., list],
                 result: list, *, on_batch: Callable[[int, int], None] | None, describe: str, actor: Actor,
                 read_ahead: Callable[[list[int]], object] | None = None) -> None:
    queue = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    if queue:
        refuse_newer_schema(engine)
    handled = 0
    turns = LockTurns() if engine.dialect.name == "sqlite" else None
    ahead: dict[int, tuple[list[int], object]] = {}  # id(batch) -> (the batch, what read_ahead gave for it)

    def read_next(until: float) -> None:
        """While the lock is left free: read ahead the next batches not read yet, until the pause ends
        (at least one)."""
        for following in queue:
            if id(following) in ahead:
                continue
            try:
                ahead[id(following)] = (following, read_ahead(following))
            except Exception as error:  # noqa: BLE001 - only a head start: the batch is worked out under its lock
                log.debug("reading a batch ahead failed (%s); it is read under its lock", printable(str(error)[:200]))
                return
            if time.monotonic() >= until:
                return

    while queue:
        batch = queue.pop(0)
        early = ahead.pop(id(batch), None)
        early = early[1] if early is not None and early[0] is batch else None
        try:
            with ExitStack() as counting:
                with write_transaction(engine) as connection:
                    if turns is not None:
                        turns.batch_began(connection)
                    done = apply(connection, batch) if read_ahead is None else apply(connection, batch, early)
                    counting.enter_context(interrupts_held())  # a Ctrl-C at the COMMIT acts once the batch is counted
                result.extend(done)  # committed: only now does it count
            if turns is not None and queue:
                turns.batch_committed(read_next if read_ahead is not None else None)
        except WriteRefused:
            raise  # no batch, however small, would fare better
        except (DatabaseRefused, ConcurrentChange, ValueError, TypeError, OverflowError, RecursionError) as error:
            if len(batch) > 1:
                middle = len(batch) // 2
                queue[:0] = [batch[:middle], batch[middle:]]
                continue
            problem = f"{type(error).__name__}: {error}"[:300] if not isinstance(error, AuditctlError) else str(error)[:300]
            log.error("%s of audit %s failed: %s; it needs an operator", describe, batch[0], printable(problem))
            result.skipped.append(Skipped(id=batch[0], error=problem))
            _record_needs_operator(engine, batch[0], describe, problem, actor)
        handled += len(batch)
        if on_batch is not None:
            on_batch(handled, len(ids))


def _record_needs_operator(engine: Engine, audit_id: int, what: str, problem: str, actor: Actor) -> None:
    """One history row saying an operator must look (not repeated while the last row says the same)."""
    try:
        with write_transaction(engine) as connection:
            last = connection.execute(
                select(history.audit_events.c.event).where(history.audit_events.c.audit_id == audit_id)
                .order_by(history.audit_events.c.id.desc()).limit(1)
            ).scalar()
            if last == history.NEEDS_OPERATOR:
                return
            history.record(connection, [{"audit_id": audit_id, "event": history.NEEDS_OPERATOR,
                                         "details": {"operation": what, "error": problem}}],
                           actor, fetch_now(connection))
    except AuditctlError as error:
        log.error("could not record that audit %s needs an operator: %s", audit_id, error)


def recover_stuck(
    engine: Engine,
    thresholds: Policy | Thresholds,
    *,
    actor: Actor,
    requeue: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    gone: dict[str, str] | None = None,
    seen_since: datetime | None = None,
    filters: Filters | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    **legacy_filters,
) -> RecoveryResult:
    """Recover every audit the stuck query finds, in batches of short transactions.

    Under ``dry_run`` nothing is written and the result says what would change. ``gone``
    None asks the registry which worker instances are provably gone. ``before_commit``, when
    given, is called in each batch's transaction once its changes are made: an error it raises
    rolls the batch back and stops the run (a monitor that finds it could not see the database
    meanwhile, ``monitor``).
    """
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
    policy = as_policy(thresholds)
    filters = make_filters(filters, **legacy_filters)
    gone = GoneInstances.of(gone_instances(engine, holding_running=True) if gone is None else gone)  # one parameter for every batch
    result = RecoveryResult()
    if dry_run:
        for verdict in find_stuck(engine, policy, gone=gone, seen_since=seen_since, filters=filters):
            result.append(isolate(verdict, lambda v: _decide(v, requeue=requeue, max_attempts=max_attempts),
                                  _unreadable_recovery))
        return result
    # Find the candidates once, then judge each batch again under its lock: the batch
    # query is then an id lookup, so the whole run costs O(stuck), not O(running x batches).
    with read_connection(engine) as connection:
        filters = fixed_moments(connection, filters)  # every batch draws --since/--until where the candidates did
        candidates = stuck_ids(connection, policy, gone=gone, seen_since=seen_since, filters=filters)

    def read_ahead(batch: list[int]) -> dict[int, tuple]:
        with read_connection(engine) as connection:
            verdicts = select_stuck(connection, policy, gone=gone, seen_since=seen_since,
                                    filters=replace(filters, ids=tuple(batch)))
        return _build_ahead(verdicts, requeue=requeue, max_attempts=max_attempts, actor=actor)

    def apply(connection: Connection, batch: list[int], ahead: dict[int, tuple] | None) -> list[Recovery]:
        verdicts = select_stuck(connection, policy, gone=gone, seen_since=seen_since, lock=True,
                                filters=replace(filters, ids=tuple(batch)))
        done = _apply_recovery(connection, verdicts, requeue=requeue, max_attempts=max_attempts, actor=actor,
                               ahead=ahead)
        if before_commit is not None and done:
            before_commit()
        return done

    _in_batches(engine, candidates, batch_size, apply, result, on_batch=on_batch, describe="recover", actor=actor,
                read_ahead=read_ahead)
    return result


def recover_audits(
    engine: Engine,
    condition,
    *,
    reason: str,
    explanation: str,
    actor: Actor,
    requeue: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> RecoveryResult:
    """Recover the running audits matching a SQL ``condition`` for a reason no rule gave.

    Used by a worker's startup cleanup (``worker_restarted``) and by ``_recover_stuck_audit``.
    """
    if reason not in RECOVERY_REASONS:
        raise ConfigError(f"unknown reason {reason!r}")
    with read_connection(engine) as connection:
        ids = list(connection.execute(select(audits.c.id).where(audits.c.status == RUNNING, condition)
                                      .order_by(audits.c.id)).scalars())
    result = RecoveryResult()

    def apply(connection: Connection, batch: list[int]) -> list[Recovery]:
        query = (select(audits.c.id, audits.c.target, audits.c.worker_id, audits.c.worker_instance, audits.c.lease,
                        audits.c.attempts, audits.c.started_at, audits.c.heartbeat_at)
                 .where(audits.c.id.in_(batch), audits.c.status == RUNNING, condition).order_by(audits.c.id))
        if is_postgres(connection):
            query = query.with_for_update(skip_locked=True, of=audits)
        rows = connection.execute(query).all()
        return _apply_manual(connection, rows, reason=reason, explanation=explanation, actor=actor,
                             requeue=requeue, max_attempts=max_attempts)

    _in_batches(engine, ids, DEFAULT_BATCH, apply, result, describe="recover", actor=actor)
    return result


class _ManualVerdict:
    """A verdict for a recovery no rule decided (startup cleanup, an explicit request)."""

    def __init__(self, row, reason: str, explanation: str, now: datetime):
        self.row = (row.id, row.target)
        self.now = now
        self.id, self.lease = row.id, row.lease
        self.target = text_value(row.target) or ""
        self.worker_id, self.worker_instance = text_value(row.worker_id), text_value(row.worker_instance)
        self.attempts = safe_int(row.attempts) or 0
        self._stored = {"started_at": row.started_at, "heartbeat_at": row.heartbeat_at}
        self.started_at, self.last_heartbeat = as_datetime(row.started_at), as_datetime(row.heartbeat_at)
        self.reasons, self._explanation = [reason], explanation
        self.problems: list[str] = []

    def iso(self, name: str) -> str | None:
        return timestamps.iso(self._stored[name])

    def explain(self) -> list[str]:
        return [self._explanation]

    def measurements(self) -> dict:
        def since(moment):
            return None if moment is None else round((self.now - moment).total_seconds(), 3)

        return {"age_seconds": since(self.started_at), "silence_seconds": since(self.last_heartbeat)}

    def thresholds(self) -> dict:
        return {}


def _apply_manual(connection, rows, *, reason, explanation, actor, requeue, max_attempts) -> list[Recovery]:
    now = fetch_now(connection)
    verdicts = [_ManualVerdict(row, reason, explanation, now) for row in rows]
    return _apply_recovery(connection, verdicts, requeue=requeue, max_attempts=max_attempts, actor=actor)


def recover_worker_leftovers(engine: Engine, worker_id: str, live_instances: set[str], *, actor: Actor,
                             requeue: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                             instance_id: str | None = None) -> RecoveryResult:
    """Recover what earlier, dead instances of ``worker_id`` left running (reason ``worker_restarted``).

    ``instance_id`` is the instance cleaning up: one that registered at or after it is no earlier
    instance but a live peer that started meanwhile (after ``live_instances`` was read), and what
    it holds is left alone. So is any audit claimed at or after that registration, whoever holds
    it: this very instance, a newer peer, or an earlier instance used again after its ``stop()``
    (read as gone, it claimed after the read); a leftover is what was claimed before. Judged under
    each batch's lock, so its first claim is never taken."""
    from sqlalchemy import and_

    from .schema import workers
    from .thresholds import WORKER_RESTARTED

    condition = audits.c.worker_id == worker_id
    held = []
    if live_instances:
        held.append(audits.c.worker_instance.not_in(sorted(live_instances)))
    if instance_id is not None:
        own_start = select(workers.c.started_at).where(workers.c.instance_id == instance_id).scalar_subquery()
        later = select(workers.c.instance_id).where(workers.c.worker_id == worker_id, workers.c.started_at >= own_start)
        held.append(audits.c.worker_instance.not_in(later))
    if held:
        condition = and_(condition, or_(audits.c.worker_instance.is_(None), and_(*held)))
    if instance_id is not None:
        # Claimed before this instance registered (a start another tool left out proves nothing).
        condition = and_(condition, or_(audits.c.started_at.is_(None), audits.c.started_at < own_start))
    return recover_audits(
        engine, condition, reason=WORKER_RESTARTED,
        explanation=f"worker {worker_id} restarted; the instance that held this audit is gone",
        actor=actor, requeue=requeue, max_attempts=max_attempts,
    )


# --- reset-all ------------------------------------------------------------------------

ORIGINS = ("stuck", "error")


@dataclass
class ResetFilters:
    """Which failed audits a reset takes. ``since``: failed within so many seconds (on the database's
    clock), or after a moment (a datetime, naive meaning UTC); ``reasons`` and ``origins`` are unions."""

    since: float | datetime | None = None
    reasons: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    ids: tuple[int, ...] | None = None
    max_resets: int | None = DEFAULT_MAX_RESETS

    def __post_init__(self):
        for reason in self.reasons:
            if reason not in RECOVERY_REASONS:
                raise ConfigError(f"unknown reason {reason!r}: choose from {', '.join(RECOVERY_REASONS)}")
        for origin in self.origins:
            if origin not in ORIGINS:
                raise ConfigError(f"unknown origin {origin!r}: choose from {', '.join(ORIGINS)}")
        if self.max_resets is not None and self.max_resets < 0:
            raise ConfigError(f"max_resets must be 0 or more, got {self.max_resets}")


def _is_failed(by_ids: bool):
    """``status = 'failed'``; written so no index on status can serve it when the rows are named by id:
    a planner that takes the status index there walks every failed audit for each batch of 500."""
    return func.coalesce(audits.c.status, "") == FAILED if by_ids else audits.c.status == FAILED


def _fixed_since(connection: Connection, filters: ResetFilters) -> ResetFilters:
    """``since`` as a moment in UTC, worked out once: every batch of one reset draws the same line."""
    if filters.since is None:
        return filters
    since = moments(connection, since=filters.since)["since"]
    return replace(filters, since=timestamps.as_datetime(since) or since)  # naive taken as UTC


def _stored_resets(connection: Connection):
    """``resets`` as the reset limit compares it. SQLite sorts any text or BLOB above every number:
    a counter another tool made unreadable would hold the audit back for good. It counts as 0,
    as everything that shows it reads it."""
    if is_postgres(connection):
        return audits.c.resets
    from sqlalchemy import case

    return case((func.typeof(audits.c.resets).in_(["integer", "real"]), audits.c.resets), else_=0)


#: The largest reset counter PostgreSQL's column holds: a reset counts up to it and stays there.
MAX_RESETS_COUNTED = 2**31 - 1


def _next_resets(connection: Connection):
    """The reset counter plus one, counted on from what ``_stored_resets`` reads (a counter another tool
    made unreadable starts again at 1), and held at ``MAX_RESETS_COUNTED``: ``+ 1`` on PostgreSQL's
    largest integer failed the whole batch."""
    from sqlalchemy import case

    stored = _stored_resets(connection)
    return case((stored >= MAX_RESETS_COUNTED, MAX_RESETS_COUNTED), else_=stored + 1)


def _reset_condition(connection: Connection, filters: ResetFilters, *, limit_resets: bool = True):
    conditions = [_is_failed(filters.ids is not None)]
    if filters.since is not None:
        since = _fixed_since(connection, filters).since
        conditions.append(stored_time(audits.c.finished_at) >= (since if is_postgres(connection) else timestamps.to_storage(since)))
    if filters.reasons:
        # The reason codes are a fixed vocabulary checked above; LIKE on the comma list is exact enough.
        conditions.append(or_(*[("," + audits.c.recovery_reasons + ",").like(f"%,{reason},%") for reason in filters.reasons]))
    if filters.origins and set(filters.origins) != set(ORIGINS):
        stuck = audits.c.recovery_reasons.is_not(None) & (audits.c.recovery_reasons != "")
        conditions.append(stuck if "stuck" in filters.origins else ~stuck | audits.c.recovery_reasons.is_(None))
    if filters.ids is not None:
        conditions.append(id_in(audits.c.id, filters.ids))
    if limit_resets and filters.max_resets is not None:
        conditions.append(_stored_resets(connection) < filters.max_resets)
    return conditions


def _origin(recovery_reasons) -> str:
    """"stuck" (recovered by auditctl) or "error" (failed with its own error): the test the SQL makes
    (``_reset_condition``, ``reset_details``), so what is shown is what ``--origin`` selects."""
    return "error" if recovery_reasons is None or recovery_reasons == "" else "stuck"


def _reasons(recovery_reasons) -> list[str]:
    return [r for r in (text_value(recovery_reasons) or "").split(",") if r]


#: What ``_reset_from_row`` reads, and nothing more: a reset or its dry run never decodes the documents
#: (progress, recovery_info), which cost most of a dry run's time (20 s for 100,000 failed audits on SQLite).
_RESET_COLUMNS = (audits.c.id, audits.c.target, audits.c.status, audits.c.recovery_reasons, audits.c.error,
                  audits.c.finished_at, audits.c.resets)


def _reset_from_row(row, status: str) -> Reset:
    return Reset(
        id=row.id, target=text_value(row.target) or "", from_status=text_value(row.status) or "?", status=status,
        reasons=_reasons(row.recovery_reasons), error=text_value(row.error), finished_at=as_datetime(row.finished_at),
        origin=_origin(row.recovery_reasons), resets=safe_int(row.resets) or 0,
    )


@dataclass
class ResetPlan:
    """What a reset would take, before it asks: counts by origin and reason, and who is held back."""

    ids: list[int]
    by_origin: dict[str, int]
    by_reason: dict[str, int]
    held_back: int  # failed audits matching the filters that reached the reset limit: they stay failed
    max_resets: int | None
    #: With ``include_stuck``: the stuck running audits to recover first and reset with the rest.
    stuck: list = field(default_factory=list)
    #: The filters, ``since`` fixed to a moment: carrying out the plan checks each audit against them again.
    filters: ResetFilters | None = None
    #: The stuck audits' reasons asked for (empty: any).
    stuck_reasons: tuple[str, ...] = ()
    #: Stuck running audits left out because they reached the reset limit: they stay running.
    stuck_held_back: int = 0

    @property
    def total(self) -> int:
        return len(self.ids) + len(self.stuck)

    def left_alone(self, done: "ResetResult", stopped: BaseException | None) -> int:
        """The audits counted here that ``done`` (what ``reset_all`` did) left alone because they changed
        meanwhile. None when an error stopped it: the audits it did not change were never reached."""
        return self.total - len(done) - len(done.skipped) if stopped is None else 0


def plan_reset(engine: Engine, filters: ResetFilters) -> ResetPlan:
    """Count what ``reset_failed`` would take (ids in order), and what the reset limit holds back."""
    with read_connection(engine) as connection:
        filters = _fixed_since(connection, filters)
        rows = connection.execute(select(audits.c.id, audits.c.recovery_reasons)
                                  .where(*_reset_condition(connection, filters)).order_by(audits.c.id)).all()
        held_back = 0
        if filters.max_resets is not None:
            held_back = connection.execute(
                select(func.count()).select_from(audits)
                .where(*_reset_condition(connection, filters, limit_resets=False),
                       _stored_resets(connection) >= filters.max_resets)).scalar_one()
    by_origin = {"stuck": 0, "error": 0}
    by_reason: dict[str, int] = {}
    for _id, reasons_text in rows:
        by_origin[_origin(reasons_text)] += 1
        for reason in _reasons(reasons_text):
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return ResetPlan(ids=[row[0] for row in rows], by_origin=by_origin, by_reason=by_reason, held_back=held_back,
                     max_resets=filters.max_resets, filters=filters)


def _under_reset_limit(connection: Connection, ids: list[int], max_resets: int | None) -> list[int]:
    """Those of ``ids`` whose audit has been reset fewer than ``max_resets`` times."""
    if max_resets is None or not ids:
        return list(ids)
    return list(connection.execute(select(audits.c.id).where(id_in(audits.c.id, ids), _stored_resets(connection) < max_resets)
                                   .order_by(audits.c.id)).scalars())


def plan_reset_all(engine: Engine, filters: ResetFilters, *, include_stuck: bool = False,
                   policy: Policy | None = None) -> ResetPlan:
    """The "Reset All Audits" plan: the failed audits to reset and, with ``include_stuck``, the stuck
    running ones to recover first (only those stuck for the chosen reasons, when reasons are given)."""
    plan = plan_reset(engine, filters)
    if include_stuck and (not filters.origins or "stuck" in filters.origins):
        from .thresholds import RULE_REASONS

        rule_reasons = tuple(r for r in filters.reasons if r in RULE_REASONS)
        if not filters.reasons or rule_reasons:
            stuck = find_stuck(engine, Policy.coerce(policy), filters=Filters(reasons=rule_reasons))
            with read_connection(engine) as connection:
                allowed = set(_under_reset_limit(connection, [v.id for v in stuck], filters.max_resets))
            plan.stuck = [v for v in stuck if v.id in allowed]
            plan.stuck_held_back = len(stuck) - len(plan.stuck)  # recovering them would leave them failed
            plan.stuck_reasons = rule_reasons
    return plan


def reset_all(engine: Engine, plan: ResetPlan, *, actor: Actor, policy: Policy | None = None,
              on_batch: Callable[[int, int], None] | None = None) -> ResetResult:
    """Carry out a plan from ``plan_reset_all``, batch by batch: each batch of its stuck audits is
    recovered and reset in one transaction, then its failed audits are reset. Each audit is
    checked again against the plan's filters under the batch's lock: one that changed since the
    plan was made (claimed, finished, reset by someone else, no longer stuck) is left alone."""
    filters = plan.filters or ResetFilters(max_resets=plan.max_resets)
    result = ResetResult()

    def progress(offset: int):
        return None if on_batch is None else (lambda handled, _count: on_batch(offset + handled, plan.total))

    if plan.stuck:
        policy = Policy.coerce(policy)
        gone = GoneInstances.of(gone_instances(engine, holding_running=True))

        def recover_and_reset(connection: Connection, batch: list[int]) -> list[Reset]:
            batch = _under_reset_limit(connection, batch, filters.max_resets)
            verdicts = select_stuck(connection, policy, gone=gone, lock=True,
                                    filters=Filters(ids=tuple(batch), reasons=plan.stuck_reasons)) if batch else []
            recovered = _apply_recovery(connection, verdicts, requeue=False, max_attempts=DEFAULT_MAX_ATTEMPTS, actor=actor)
            done = _apply_reset(connection, replace(filters, ids=tuple(r.id for r in recovered)), actor) if recovered else []
            if len(done) != len(recovered):
                raise ConcurrentChange(f"reset {len(done)} of the {len(recovered)} audits just recovered; rolled back")
            return done

        _in_batches(engine, sorted(v.id for v in plan.stuck), DEFAULT_BATCH, recover_and_reset, result,
                    on_batch=progress(0), describe="reset", actor=actor)
    _in_batches(engine, sorted(set(plan.ids)), DEFAULT_BATCH, _resetting(filters, actor), result,
                on_batch=progress(len(plan.stuck)), describe="reset", actor=actor)
    return result


def reset_failed(
    engine: Engine,
    *,
    actor: Actor,
    filters: ResetFilters | None = None,
    since: float | None = None,
    reason: str | None = None,
    ids: list[int] | None = None,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> ResetResult:
    """Return failed audits to pending in batches, each reset written to the history.

    Each batch is one transaction; a reset clears the run (worker, lease, times, progress)
    and counts the reset on the audit (``resets``), so ``max_resets`` can stop an audit from
    being requeued forever. The rows are read under the batch's lock, so an audit claimed or
    reset meanwhile by someone else is left as it is.
    """
    if filters is None:
        filters = ResetFilters(since=since, reasons=(reason,) if reason else (), ids=tuple(ids) if ids is not None else None)
    result = ResetResult()
    if dry_run:
        with read_connection(engine) as connection:
            rows = connection.execute(select(*_RESET_COLUMNS).where(*_reset_condition(connection, filters))
                                      .order_by(audits.c.id)).all()
        for row in rows:
            result.append(isolate(row, lambda r: _reset_from_row(r, PENDING),
                                  lambda r, problem: Reset(id=r.id, target="?", from_status=FAILED, status=PENDING,
                                                           reasons=[], error=problem, finished_at=None)))
        return result
    # Named audits are taken as named (each batch checks them again under its lock); otherwise
    # the filters decide, once, which audits this reset covers.
    if filters.ids is not None:
        candidates = sorted(set(filters.ids))
        if filters.since is not None:
            with read_connection(engine) as connection:
                filters = _fixed_since(connection, filters)
    else:
        plan = plan_reset(engine, filters)
        candidates, filters = plan.ids, plan.filters
    _in_batches(engine, candidates, batch_size, _resetting(filters, actor), result, on_batch=on_batch, describe="reset",
                actor=actor)
    return result


def _resetting(filters: ResetFilters, actor: Actor) -> Callable[[Connection, list[int]], list]:
    """A batch's work for ``_in_batches``: reset the batch's audits that still match ``filters``."""
    return lambda connection, batch: _apply_reset(connection, replace(filters, ids=tuple(batch)), actor)


def _apply_reset(connection: Connection, filters: ResetFilters, actor: Actor) -> list[Reset]:
    """Reset the audits ``filters`` names (``ids``) that still match it, read under the batch's lock."""
    query = select(*_RESET_COLUMNS).where(*_reset_condition(connection, filters)).order_by(audits.c.id)
    if is_postgres(connection):
        # SKIP LOCKED, as a recovery's batch: a row another transaction holds is left alone (counted as
        # changed meanwhile), never waited for until the lock wait fails the whole batch.
        query = query.with_for_update(of=audits, skip_locked=True)
    rows = connection.execute(query).all()
    if not rows:
        return []
    now = fetch_now(connection)
    chosen = [row.id for row in rows]
    # The history rows first, built by the database from the rows as they are (set-based: one
    # statement per batch, whatever another tool left in the columns), then the reset itself.
    history.record_from_rows(connection, id_in(audits.c.id, chosen), event=history.RESET, from_status=FAILED,
                             to_status=PENDING, reasons=audits.c.recovery_reasons,
                             details=reset_details(), actor=actor, now=now)
    changed = connection.execute(
        update(audits)
        .where(id_in(audits.c.id, chosen), _is_failed(True))
        .values(status=PENDING, error=None, finished_at=None, started_at=None, lease=None, worker_id=None,
                worker_instance=None, heartbeat_at=None, progress_changed_at=None, progress=None,
                progress_signature=None, resets=_next_resets(connection))
    ).rowcount
    if changed != len(chosen):
        raise ConcurrentChange(f"reset expected to change {len(chosen)} audits but changed {changed}; rolled back")
    done = [isolate(row, lambda r: _reset_from_row(r, PENDING),
                    lambda r, problem: Reset(id=r.id, target="?", from_status=FAILED, status=PENDING, reasons=[],
                                             error=None, finished_at=None))
            for row in rows]
    outbox.enqueue(connection, outbox.RESET, {"actor": actor.name, "host": actor.host, "count": len(done),
                                              "ids": [r.id for r in done],
                                              "by_origin": {o: sum(1 for r in done if r.origin == o) for o in ORIGINS}},
                   now=now)
    return done


class reset_details(FunctionElement):
    """A reset's history details, built by the database: ``{"original_status": <the row as it was>,
    "origin": "stuck" | "error"}`` (the row's own recovery_info included: bounded, see with_original_status)."""

    type = Document()
    inherit_cache = True


@compiles(reset_details, "sqlite")
def _reset_details_sqlite(element, compiler, **kw):
    pairs = ", ".join(f"'{column.name}', {_sqlite_json_value(column)}" for column in audits.columns
                      if column.name != "odd_times")
    return ("json_object('original_status', json_object(" + pairs + "), 'origin', "
            "CASE WHEN recovery_reasons IS NULL OR recovery_reasons = '' THEN 'error' ELSE 'stuck' END)")


@compiles(reset_details, "postgresql")
def _reset_details_pg(element, compiler, **kw):
    return ("jsonb_build_object('original_status', to_jsonb(audits) - 'odd_times', 'origin', "
            "CASE WHEN recovery_reasons IS NULL OR recovery_reasons = '' THEN 'error' ELSE 'stuck' END)")
