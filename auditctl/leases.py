"""Claims and fenced writes: the only SQL a worker runs against an audit it is working on.

Claiming a pending audit gives it a fresh lease token. Every later write by that
worker names the token in its WHERE clause, so once the audit has been recovered
or reset (which clears the token) the worker's write matches no row: it changes
nothing and raises ``LeaseLost``. The rejected write is recorded in the history.

Each write is one short transaction. The progress document carries the database's
time, read in the same transaction as the write that stores it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import case, insert, select, update
from sqlalchemy.engine import Engine

from . import history
from .db import db_now, fetch_now, write_transaction
from .errors import AuditNotClaimable, AuditNotFound, ConfigError, LeaseLost
from .history import Actor
from .progress import build_document, isoformat_z
from .schema import COMPLETED, FAILED, PENDING, RUNNING, audits


@dataclass(frozen=True)
class Lease:
    audit_id: int
    token: str
    worker_id: str
    instance_id: str
    worker_url: str | None


def create_audit(engine: Engine, target: str, *, max_age: float | None = None) -> int:
    """Insert a pending audit; ``max_age`` (seconds) is its own deadline, overriding the fleet's."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError("target must be a non-empty string")
    with write_transaction(engine) as connection:
        result = connection.execute(
            insert(audits).values(target=target, status=PENDING, created_at=db_now(), attempts=0, max_age_seconds=max_age)
        )
        return int(result.inserted_primary_key[0])


def _fenced(lease: Lease):
    return (audits.c.id == lease.audit_id, audits.c.lease == lease.token, audits.c.status == RUNNING)


def claim(engine: Engine, audit_id: int, *, worker_id: str, instance_id: str, worker_url: str | None) -> tuple[Lease, dict]:
    """Move a pending audit to running under a new lease. Returns the lease and the first progress document."""
    lease = Lease(audit_id=audit_id, token=uuid.uuid4().hex, worker_id=worker_id, instance_id=instance_id, worker_url=worker_url)
    with write_transaction(engine) as connection:
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
                    attempts=audits.c.attempts + 1)
        )
        if result.rowcount == 1:
            return lease, document
        status = connection.execute(select(audits.c.status).where(audits.c.id == audit_id)).scalar()
    if status is None:
        raise AuditNotFound(f"no audit with id {audit_id}")
    raise AuditNotClaimable(f"audit {audit_id} is {status}, not pending; only a pending audit can be run")


def _lost(engine: Engine, lease: Lease, write: str, actor: Actor) -> LeaseLost:
    """Record the rejected write and build the exception to raise."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        status = connection.execute(select(audits.c.status).where(audits.c.id == lease.audit_id)).scalar()
        history.record(connection, [{
            "audit_id": lease.audit_id, "event": history.LEASE_LOST, "from_status": status, "to_status": status,
            "details": {"write": write, "lease": lease.token, "worker_id": lease.worker_id, "instance_id": lease.instance_id},
        }], actor, now)
    return LeaseLost(lease.audit_id)


def write_progress(engine: Engine, lease: Lease, fields: dict, signature: str, extra: dict | None, actor: Actor) -> dict:
    """Store a full progress report. Raises DocumentError (nothing written) or LeaseLost."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        document, _ = build_document(**fields, is_running=True, now=now, worker_id=lease.worker_id,
                                     worker_url=lease.worker_url, extra=extra)
        result = connection.execute(
            update(audits)
            .where(*_fenced(lease))
            .values(
                progress=document,
                heartbeat_at=now,
                last_worker_update=now,
                progress_changed_at=case(
                    (audits.c.progress_signature.is_distinct_from(signature), now), else_=audits.c.progress_changed_at
                ),
                progress_signature=signature,
            )
        )
        if result.rowcount == 1:
            return document
    raise _lost(engine, lease, "progress", actor)


def heartbeat(engine: Engine, lease: Lease, document: dict | None, actor: Actor) -> dict | None:
    """Refresh the heartbeat (and the document's heartbeat field). Raises LeaseLost."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        values = {"heartbeat_at": now, "last_worker_update": now}
        if document is not None and isinstance(document.get("progress"), dict):
            stamp = isoformat_z(now)
            document = {**document, "progress": {**document["progress"], "heartbeat": stamp}, "last_worker_update": stamp}
            values["progress"] = document
        if connection.execute(update(audits).where(*_fenced(lease)).values(**values)).rowcount == 1:
            return document
    raise _lost(engine, lease, "heartbeat", actor)


def minimal_write(engine: Engine, lease: Lease, actor: Actor) -> None:
    """The emergency write: heartbeat and last_worker_update only, one statement. Raises LeaseLost."""
    with write_transaction(engine) as connection:
        result = connection.execute(update(audits).where(*_fenced(lease)).values(heartbeat_at=db_now(), last_worker_update=db_now()))
        if result.rowcount == 1:
            return
    raise _lost(engine, lease, "emergency", actor)


def finish(engine: Engine, lease: Lease, document: dict | None, *, error: str | None, actor: Actor) -> str:
    """Mark the audit completed (no error) or failed. Raises LeaseLost when it was taken away."""
    status = COMPLETED if error is None else FAILED
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        values = {"status": status, "finished_at": now, "heartbeat_at": now, "last_worker_update": now,
                  "lease": None, "error": error}
        if document is not None and isinstance(document.get("progress"), dict):
            stamp = isoformat_z(now)
            values["progress"] = {**document, "progress": {**document["progress"], "is_running": False, "last_updated": stamp,
                                                           "heartbeat": stamp}, "last_worker_update": stamp}
        if connection.execute(update(audits).where(*_fenced(lease)).values(**values)).rowcount == 1:
            return status
    raise _lost(engine, lease, "finish", actor)
