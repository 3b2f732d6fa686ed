"""Every state change an operator or monitor makes: recover, requeue, reset.

Each change is conditional: a row is changed only while it is still ``running``
under the lease that was judged (or still ``failed``, for a reset), inside a short
write transaction that also writes its history row. Two recoverers at once therefore
recover each audit exactly once, and a recovery never overwrites a worker that has
just finished. On PostgreSQL the stuck rows are locked with ``FOR UPDATE SKIP
LOCKED`` so a recoverer never waits on a worker or another recoverer; on SQLite the
transaction starts as the writer (``BEGIN IMMEDIATE``), which serialises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from . import history
from .db import fetch_now, is_postgres, read_connection, seconds_since, write_transaction
from .errors import AuditctlError, ConfigError
from .history import Actor
from .progress import isoformat_z
from .rules import ROW_COLUMNS, Verdict, select_stuck, stuck_ids
from .schema import FAILED, PENDING, RUNNING, Document, audits, parse_timestamp
from .thresholds import RULE_REASONS, WORKER_RESTARTED, Thresholds

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BATCH = 500


class ConcurrentChange(AuditctlError):
    """A locked row changed under a recovery: the batch was rolled back; the next pass retries."""


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


def _snapshot(row) -> dict:
    """The full prior state of an audit, as JSON, for ``recovery_info.original_status``."""
    mapping = row if isinstance(row, dict) else row._mapping
    return {column.name: _json_safe(mapping[column.name]) for column in audits.columns}


_ALREADY_JSON = frozenset({str, int, bool, type(None), dict, list})


def _json_safe(value):
    """A stored column value as strict JSON: rows written by other tools may hold bytes or NaN,
    which would otherwise make the recovery's own write fail (and with it the whole batch).
    Documents need no walk: ``schema.Document`` only ever returns strict JSON."""
    if type(value) in _ALREADY_JSON:
        return value
    if isinstance(value, datetime):
        return isoformat_z(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


#: What a recovery's history row keeps of the prior state; the whole row is in recovery_info.
_FROM_COLUMNS = ("status", "worker_id", "worker_instance", "lease", "started_at", "heartbeat_at", "attempts", "error")


def _recovery_details(row: dict, sentences: list[str]) -> dict:
    details = {"from": {name: _json_safe(row[name]) for name in _FROM_COLUMNS}, "explanation": sentences}
    if row["recovery_info"] is not None:
        # This recovery overwrites an earlier one's record (the audit was requeued and ran
        # again): keep that record here so it is never lost.
        details["replaced_recovery_info"] = row["recovery_info"]
    return details


class with_original_status(FunctionElement):
    """``recovery_info`` = the given document plus ``original_status``: the whole row as it was
    before this UPDATE, built by the database from the row itself."""

    type = Document()
    inherit_cache = True


def _sqlite_json_value(column) -> str:
    name = column.name
    if isinstance(column.type, Document):
        return (f"CASE WHEN typeof({name}) = 'blob' THEN hex({name}) "
                f"WHEN json_valid({name}) THEN json({name}) ELSE {name} END")
    return f"CASE WHEN typeof({name}) = 'blob' THEN hex({name}) ELSE {name} END"


@compiles(with_original_status, "sqlite")
def _with_original_status_sqlite(element, compiler, **kw):
    (info,) = list(element.clauses)
    pairs = ", ".join(f"'{column.name}', {_sqlite_json_value(column)}" for column in audits.columns)
    return f"json_set({compiler.process(info, **kw)}, '$.original_status', json_object({pairs}))"


@compiles(with_original_status, "postgresql")
def _with_original_status_pg(element, compiler, **kw):
    (info,) = list(element.clauses)
    return f"jsonb_set({compiler.process(info, **kw)}, '{{original_status}}', to_jsonb(audits))"


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


def _apply_recovery(
    connection: Connection,
    verdicts: list[Verdict],
    explanations: dict[int, list[str]],
    measurements: dict[int, dict],
    *,
    requeue: bool,
    max_attempts: int,
    actor: Actor,
) -> list[Recovery]:
    if not verdicts:
        return []
    now = fetch_now(connection)
    missing = [v.id for v in verdicts if v.row is None]
    current = {v.id: v.row for v in verdicts if v.row is not None}
    if missing:
        query = select(*[audits.c[name] for name in ROW_COLUMNS]).where(audits.c.id.in_(missing))
        current.update({row.id: dict(row._mapping) for row in connection.execute(query)})
    done: list[Recovery] = []
    events: list[dict] = []
    groups: dict[str, list[dict]] = {}
    recovered_at = isoformat_z(now)
    for verdict in verdicts:
        row = current.get(verdict.id)
        if row is None:
            continue
        attempts = row["attempts"] or 0
        give_up = requeue and attempts >= max_attempts
        new_status = PENDING if requeue and not give_up else FAILED
        reasons = list(verdict.reasons)
        sentences = explanations.get(verdict.id, [])
        if give_up:
            sentences = sentences + [f"gave up after {attempts} attempts (max_attempts {max_attempts})"]
        # original_status (the whole prior row) is added by the database in the UPDATE itself:
        # see with_original_status. Building it here would cost more than the write.
        info = {
            "recovered_at": recovered_at,
            "reason": ", ".join(reasons),
            "reasons": reasons,
            "explanation": sentences,
            "measured": measurements.get(verdict.id, {}),
            "recovered_by": {"actor": actor.name, "host": actor.host, "pid": actor.pid},
            "requeued": new_status == PENDING,
        }
        params = {
            "b_id": verdict.id,
            "b_lease": verdict.lease,
            "v_recovery_info": info,
            "v_recovery_reasons": ",".join(reasons),
            "v_error": f"recovered ({', '.join(reasons)}): {'; '.join(sentences)}"[:2000],
        }
        groups.setdefault(new_status, []).append(params)
        done.append(
            Recovery(
                id=verdict.id, target=verdict.target, reasons=reasons, explanation=sentences, from_status=RUNNING,
                status=new_status, worker_id=verdict.worker_id, attempts=attempts,
                measurements=measurements.get(verdict.id, {}), recovered_at=now,
            )
        )
        events.append({
            "audit_id": verdict.id,
            "event": history.REQUEUED if new_status == PENDING else history.RECOVERED,
            "from_status": RUNNING,
            "to_status": new_status,
            "reasons": reasons,
            "measurements": measurements.get(verdict.id),
            "details": _recovery_details(row, sentences),
        })
    for new_status, params in groups.items():
        values = {
            "status": new_status,
            "recovery_info": with_original_status(bindparam("v_recovery_info", type_=audits.c.recovery_info.type)),
            "recovery_reasons": bindparam("v_recovery_reasons", type_=audits.c.recovery_reasons.type),
            "error": bindparam("v_error", type_=audits.c.error.type),
            "lease": None,
            # Only a well-formed document is marked not running; anything else another tool
            # stored is left exactly as it is (original_status has a copy either way).
            "progress": not_running(audits.c.progress),
        }
        if new_status == PENDING:
            values.update(worker_id=None, worker_instance=None, started_at=None, heartbeat_at=None,
                          progress_changed_at=None, finished_at=None)
        else:
            values.update(finished_at=now)
        # Conditional on the lease that was judged. The rows are locked by this transaction
        # (FOR UPDATE on PostgreSQL, the write lock on SQLite), so every row still matches;
        # if one did not, something bypassed the locks and the whole batch is rolled back.
        statement = (
            update(audits)
            .where(audits.c.id == bindparam("b_id"), audits.c.status == RUNNING,
                   audits.c.lease.is_not_distinct_from(bindparam("b_lease", type_=audits.c.lease.type)))
            .values(values)
        )
        changed = connection.execute(statement, params).rowcount
        if changed != len(params):
            raise ConcurrentChange(f"recovery expected to change {len(params)} audits but changed {changed}; rolled back")
    history.record(connection, events, actor, now)
    return done


def recover_stuck(
    engine: Engine,
    thresholds: Thresholds,
    *,
    actor: Actor,
    requeue: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    **filters,
) -> list[Recovery]:
    """Recover every audit the stuck query finds (filters as for ``rules.stuck_query``).

    Works in batches of short transactions. Under ``dry_run`` nothing is written and
    the result says what would change.
    """
    if max_attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
    if dry_run:
        return [_would_recover(v, thresholds, requeue, max_attempts) for v in _find(engine, thresholds, **filters)]
    # Find the candidates once, then judge each batch again under its lock: the batch
    # query is then an id lookup, so the whole run costs O(stuck), not O(running x batches).
    with read_connection(engine) as connection:
        candidates = stuck_ids(connection, thresholds, **filters)
    filters.pop("ids", None)
    recovered: list[Recovery] = []
    for start in range(0, len(candidates), batch_size):
        with write_transaction(engine) as connection:
            verdicts = select_stuck(connection, thresholds, lock=True, ids=candidates[start:start + batch_size], **filters)
            recovered += _apply_recovery(
                connection,
                verdicts,
                {v.id: v.explain(thresholds) for v in verdicts},
                {v.id: v.measurements(thresholds) for v in verdicts},
                requeue=requeue,
                max_attempts=max_attempts,
                actor=actor,
            )
    return recovered


def _find(engine, thresholds, **filters) -> list[Verdict]:
    with read_connection(engine) as connection:
        return select_stuck(connection, thresholds, **filters)


def _would_recover(verdict: Verdict, thresholds: Thresholds, requeue: bool, max_attempts: int) -> Recovery:
    """What ``_apply_recovery`` would do to this audit, decided the same way, without writing."""
    attempts = (verdict.row["attempts"] if verdict.row is not None else 0) or 0
    give_up = requeue and attempts >= max_attempts
    explanation = verdict.explain(thresholds)
    if give_up:
        explanation = explanation + [f"gave up after {attempts} attempts (max_attempts {max_attempts})"]
    return Recovery(
        id=verdict.id, target=verdict.target, reasons=verdict.reasons, explanation=explanation,
        from_status=RUNNING, status=PENDING if requeue and not give_up else FAILED, worker_id=verdict.worker_id,
        attempts=attempts, measurements=verdict.measurements(thresholds), recovered_at=None,
    )


def recover_audits(
    engine: Engine,
    condition,
    *,
    reason: str,
    explanation: str,
    actor: Actor,
    requeue: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[Recovery]:
    """Recover the running audits matching a SQL ``condition`` for a reason no rule gave.

    Used by a worker's startup cleanup (``worker_restarted``) and by ``_recover_stuck_audit``.
    """
    with write_transaction(engine) as connection:
        query = (
            select(audits.c.id, audits.c.target, audits.c.worker_id, audits.c.lease, audits.c.started_at,
                   audits.c.heartbeat_at, seconds_since(func.coalesce(audits.c.started_at, audits.c.created_at)).label("age"),
                   seconds_since(audits.c.heartbeat_at).label("silence"))
            .where(audits.c.status == RUNNING, condition)
            .order_by(audits.c.id)
        )
        if is_postgres(connection):
            query = query.with_for_update(skip_locked=True, of=audits)
        rows = connection.execute(query).all()
        verdicts = [
            Verdict(id=r.id, target=r.target, status=RUNNING, reasons=[reason], worker_id=r.worker_id, worker_instance=None,
                    lease=r.lease, started_at=parse_timestamp(r.started_at), last_heartbeat=parse_timestamp(r.heartbeat_at),
                    age_seconds=r.age, silence_seconds=r.silence, stalled_seconds=None, max_age_seconds=0.0)
            for r in rows
        ]
        measured = {
            v.id: {"age_seconds": None if v.age_seconds is None else round(v.age_seconds, 3),
                   "silence_seconds": None if v.silence_seconds is None else round(v.silence_seconds, 3)}
            for v in verdicts
        }
        return _apply_recovery(
            connection, verdicts, {v.id: [explanation] for v in verdicts}, measured,
            requeue=requeue, max_attempts=max_attempts, actor=actor,
        )


def recover_worker_leftovers(engine: Engine, worker_id: str, live_instances: set[str], *, actor: Actor,
                             requeue: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[Recovery]:
    """Recover what earlier, dead instances of ``worker_id`` left running (reason ``worker_restarted``)."""
    condition = audits.c.worker_id == worker_id
    if live_instances:
        condition = and_(condition, or_(audits.c.worker_instance.is_(None), audits.c.worker_instance.not_in(sorted(live_instances))))
    return recover_audits(
        engine, condition, reason=WORKER_RESTARTED,
        explanation=f"worker {worker_id} restarted; the instance that held this audit is gone",
        actor=actor, requeue=requeue, max_attempts=max_attempts,
    )


# --- reset-all ------------------------------------------------------------------------


def _reset_query(*, since: float | None, reason: str | None, ids: list[int] | None):
    if reason is not None and reason not in RULE_REASONS + (WORKER_RESTARTED,):
        raise ConfigError(f"unknown reason {reason!r}: choose from {', '.join(RULE_REASONS + (WORKER_RESTARTED,))}")
    query = select(audits).where(audits.c.status == FAILED)
    if since is not None:
        query = query.where(seconds_since(func.coalesce(audits.c.finished_at, audits.c.created_at)) <= since)
    if reason is not None:
        # The reason codes are a fixed vocabulary checked above; LIKE on the comma list is exact enough.
        query = query.where(("," + audits.c.recovery_reasons + ",").like(f"%,{reason},%"))
    if ids is not None:
        query = query.where(audits.c.id.in_(ids))
    return query.order_by(audits.c.id)


def _reset_from_row(row, status: str) -> Reset:
    return Reset(
        id=row.id, target=row.target, from_status=row.status, status=status,
        reasons=[r for r in (row.recovery_reasons or "").split(",") if r], error=row.error,
        finished_at=parse_timestamp(row.finished_at),
    )


def reset_failed(
    engine: Engine,
    *,
    actor: Actor,
    since: float | None = None,
    reason: str | None = None,
    ids: list[int] | None = None,
    dry_run: bool = False,
    recover_first: list[int] | None = None,
    thresholds: Thresholds | None = None,
) -> list[Reset]:
    """Return failed audits to pending, all in one transaction, each reset written to the history.

    ``recover_first`` (with ``thresholds``) names stuck running audits to recover in the same
    transaction and reset with the rest (``reset-all --include-stuck``); each is judged again
    under its lock, so one that recovered meanwhile is left running.
    """
    query = _reset_query(since=since, reason=reason, ids=ids)
    if dry_run:
        with read_connection(engine) as connection:
            return [_reset_from_row(row, PENDING) for row in connection.execute(query)]
    with write_transaction(engine) as connection:
        if recover_first:
            if thresholds is None:
                raise ConfigError("recover_first needs the thresholds to judge those audits by")
            verdicts = select_stuck(connection, thresholds, lock=True, ids=recover_first)
            recovered = _apply_recovery(connection, verdicts, {v.id: v.explain(thresholds) for v in verdicts},
                                        {v.id: v.measurements(thresholds) for v in verdicts}, requeue=False,
                                        max_attempts=DEFAULT_MAX_ATTEMPTS, actor=actor)
            if recovered and ids is not None:
                # Named audits plus the ones just recovered; with ids=None the filters already
                # take in every failed audit, the just-recovered ones among them.
                query = _reset_query(since=since, reason=reason, ids=ids + [r.id for r in recovered])
        if is_postgres(connection):
            query = query.with_for_update(of=audits)
        rows = connection.execute(query).all()
        if not rows:
            return []
        now = fetch_now(connection)
        done, events = [], []
        for row in rows:
            result = connection.execute(
                update(audits)
                .where(audits.c.id == row.id, audits.c.status == FAILED)
                .values(status=PENDING, error=None, finished_at=None, started_at=None, lease=None,
                        worker_id=None, worker_instance=None, heartbeat_at=None, progress_changed_at=None)
            )
            if result.rowcount != 1:
                continue
            done.append(_reset_from_row(row, PENDING))
            events.append({
                "audit_id": row.id, "event": history.RESET, "from_status": FAILED, "to_status": PENDING,
                "reasons": [r for r in (row.recovery_reasons or "").split(",") if r],
                "details": {"original_status": _snapshot(row)},
            })
        history.record(connection, events, actor, now)
        return done
