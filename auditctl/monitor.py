"""One monitor pass (judge, then recover), shared by the worker's heartbeat thread and ``auditctl watch``.

The monitor also owns the outage rule. While it cannot reach the database it sees
nothing, and workers cannot write either; so after an outage it measures silence and
stalls only from the moment it could see again (``seen_since``). An audit whose worker
really died is still caught, one ``stale_after`` after the database came back, and no
healthy audit is recovered just because the database was down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .db import fetch_now, read_connection
from .errors import AuditctlError
from .history import Actor
from .recovery import DEFAULT_MAX_ATTEMPTS, ConcurrentChange, Recovery, recover_stuck
from .rules import Verdict, find_stuck
from .thresholds import Thresholds

log = logging.getLogger("auditctl.monitor")


@dataclass
class PassResult:
    ok: bool
    error: str | None = None
    recovered: list[Recovery] = field(default_factory=list)
    stuck: list[Verdict] = field(default_factory=list)
    resumed_after_outage: bool = False
    seen_since: datetime | None = None


class Monitor:
    def __init__(self, engine: Engine, thresholds: Thresholds, *, actor: Actor, recover: bool = True,
                 requeue: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        self.engine = engine
        self.thresholds = thresholds
        self.actor = actor
        self.recover = recover
        self.requeue = requeue
        self.max_attempts = max_attempts
        self.seen_since: datetime | None = None
        self.in_outage = False
        self.outages = 0

    def run_pass(self) -> PassResult:
        """Judge and (unless told not to) recover. Never raises for database trouble: reports it."""
        resumed = False
        try:
            if self.in_outage:
                with read_connection(self.engine) as connection:
                    self.seen_since = fetch_now(connection)
                self.in_outage = False
                resumed = True
            filters = {"seen_since": self.seen_since} if self.seen_since is not None else {}
            if self.recover:
                recovered = recover_stuck(self.engine, self.thresholds, actor=self.actor, requeue=self.requeue,
                                          max_attempts=self.max_attempts, **filters)
                return PassResult(ok=True, recovered=recovered, resumed_after_outage=resumed, seen_since=self.seen_since)
            stuck = find_stuck(self.engine, self.thresholds, **filters)
            return PassResult(ok=True, stuck=stuck, resumed_after_outage=resumed, seen_since=self.seen_since)
        except ConcurrentChange as exc:
            # Not an outage: the database answered; a batch was rolled back and the next pass retries.
            return PassResult(ok=False, error=str(exc))
        except (AuditctlError, SQLAlchemyError) as exc:
            # SQLAlchemyError: a pool or driver failure that reached us untranslated is trouble
            # reaching the database all the same; the monitor reports it and retries.
            if not self.in_outage:
                self.outages += 1
            self.in_outage = True
            return PassResult(ok=False, error=str(exc))
