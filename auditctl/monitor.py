"""One monitor pass (judge, then recover), shared by the worker's heartbeat thread and ``auditctl watch``.

The monitor also owns the outage rule. While it cannot reach the database it sees
nothing, and workers cannot write either; so after an outage it measures silence and
stalls only from the moment it could see again (``seen_since``). An audit whose worker
really died is still caught, one ``stale_after`` after the database came back (at once
when the registry proves the worker gone), and no healthy audit is recovered just
because the database was down.

A server that stops answering without closing the connection (frozen by SIGSTOP, a host paused
by its hypervisor, a stalled network) is an outage too, though no call fails: the pass waits, and
the workers' writes cannot get through meanwhile. So a pass that waited on one call longer than
``blind_after`` commits no recovery (the batch is rolled back and the pass ends as after an outage),
and the next pass measures silence from then on.

A database that answers but holds no auditctl schema (or another application's tables)
is not an outage: the pass reports it as ``fatal``, and ``watch`` exits instead of
retrying forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .errors import AuditctlError, ConfigError, DatabaseMissing, DatabaseUnavailable, SchemaMissing, WriteRefused
from .history import Actor
from .recovery import DEFAULT_MAX_ATTEMPTS, ConcurrentChange, Recovery, Skipped, as_policy, committed_before, recover_stuck
from .rules import Filters, Verdict, find_stuck, gone_instances
from .sqlfunctions import fetch_now
from .sqlitefile import FileWatch
from .thresholds import Policy, Thresholds
from .transactions import read_connection
from .watchdog import thread_waits

log = logging.getLogger("auditctl.monitor")

#: Bounds of how long one call of a pass may wait on PostgreSQL before the pass counts as blind
#: (``blind_after``): a quarter of the shortest ``stale_after`` or ``stall_after`` it applies, within these.
BLIND_AFTER_BOUNDS = (1.0, 5.0)


def blind_after(policy: Policy) -> float:
    """How long one call of a pass may wait on the database before the pass counts as blind: a wait
    that long can have kept a healthy worker's beats out for a good part of its ``stale_after``."""
    shortest = [value for thresholds in (policy.override, policy.fleet, *(values for _, values in policy.kinds))
                for value in (thresholds.stale_after, thresholds.stall_after) if value]
    low, high = BLIND_AFTER_BOUNDS
    return min(max(min(shortest, default=4 * high) / 4, low), high)


class BlindPass(DatabaseUnavailable):
    """A call of the pass waited so long on the database that the workers' silence meanwhile proves nothing."""


@dataclass
class PassResult:
    ok: bool
    error: str | None = None
    #: The database answered but cannot be used (no schema, not ours): retrying will not help.
    fatal: bool = False
    recovered: list[Recovery] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    stuck: list[Verdict] = field(default_factory=list)
    gone: dict[str, str] = field(default_factory=dict)
    resumed_after_outage: bool = False
    seen_since: datetime | None = None
    #: SQLite: the file at the database's path was ``"replaced"`` or is ``"back"`` since the last look.
    file_change: str | None = None
    #: The class of the error that stopped the pass (a fatal one is raised again as that).
    error_type: type | None = None
    #: The error itself, for a caller that shows it in its own terms (``watch``: a filter by its flag).
    exception: BaseException | None = None


class Monitor:
    def __init__(self, engine: Engine, thresholds: Policy | Thresholds, *, actor: Actor, recover: bool = True,
                 requeue: bool = False, max_attempts: int = DEFAULT_MAX_ATTEMPTS, filters: Filters | None = None,
                 file_watch: FileWatch | None = None):
        """``file_watch``: the SQLite file to follow (``sqlitefile.FileWatch``): a monitor that runs for long
        must judge the database at the path, not a file that was deleted or replaced under it."""
        self.engine = engine
        self.file_watch = file_watch
        self.policy = as_policy(thresholds)
        self.actor = actor
        self.recover = recover
        self.requeue = requeue
        self.max_attempts = max_attempts
        self.filters = filters or Filters()
        self.seen_since: datetime | None = None
        self.in_outage = False
        #: Only PostgreSQL calls are timed (``watchdog``), and a SQLite database cannot freeze under a pass.
        self.watches_waits = engine.dialect.name == "postgresql"
        if self.watches_waits:
            # This thread's waits before this monitor existed (another engine's, a long ``init``) say
            # nothing of what its first pass sees.
            thread_waits().clear()

    @property
    def blind_after(self) -> float:
        return blind_after(self.policy)

    @property
    def thresholds(self) -> Thresholds:
        return self.policy.fleet

    def look_at_file(self) -> str | None:
        """SQLite: follow the file at the path (see ``file_watch``). Returns what changed, if anything;
        raises DatabaseMissing while nothing is there."""
        if self.file_watch is None:
            return None
        change = self.file_watch.check()
        if not self.file_watch.present:
            raise DatabaseMissing(f"the database file {self.file_watch.path} was deleted or moved away; "
                                  "waiting for a database at that path")
        return change

    def saw_outage(self) -> None:
        """A read between passes could not reach the database: from its return, silence counts
        afresh, as after an outage a pass saw (``resume``)."""
        self.in_outage = True

    def resume(self) -> bool:
        """After an outage: silence counts from now, on the database's clock (``seen_since``). True
        when this call ended the outage. Raises on database trouble (the outage goes on)."""
        if not self.in_outage:
            return False
        # Cleared first: an outage a worker's heartbeat thread reports meanwhile stays reported.
        self.in_outage = False
        try:
            with read_connection(self.engine) as connection:
                self.seen_since = fetch_now(connection)
        except BaseException:
            self.in_outage = True
            raise
        return True

    def ready_to_read(self) -> str | None:
        """Before a read between passes (``watch``'s screen and log): the file followed (what changed
        is returned, as ``look_at_file`` does), and an outage ended, so no read measures silence
        across it. Raises on database trouble."""
        change = self.look_at_file()
        self.resume()
        return change

    def judge_now(self) -> tuple[list[Verdict], dict[str, str]]:
        """The stuck audits as of now (no recovery), under the outage rule. Raises on database trouble."""
        self.ready_to_read()
        gone = gone_instances(self.engine)
        return find_stuck(self.engine, self.policy, gone=gone, seen_since=self.seen_since, filters=self.filters), gone

    def _all_clear(self, result: PassResult) -> PassResult:
        """A pass over the whole fleet that found nothing stuck tells the outbox, once, that the
        fleet is healthy again (``outbox.announce_healthy``). A filtered monitor sees only part
        of the fleet, so it never says so; and an all-clear that cannot be written is not worth
        failing a pass over."""
        if result.recovered or result.skipped or result.stuck or self.filters != Filters():
            return result
        from .outbox import announce_healthy

        try:
            announce_healthy(self.engine, self.actor)
        except (AuditctlError, SQLAlchemyError) as error:
            log.info("could not record that the fleet is healthy again: %s", error)
        return result

    def run_pass(self) -> PassResult:
        """Judge and (unless told not to) recover. Never raises for database trouble: reports it."""
        # Since the last pass: the reads between passes (watch's screen) count too.
        waits = thread_waits() if self.watches_waits else None
        try:
            result = self._run_pass(waits)
        finally:
            blind = waits is not None and waits.longest > self.blind_after
            if waits is not None:
                waits.clear()
        if result.ok and blind:
            # The pass recovered nothing on what it saw then (it would have stopped), but the workers
            # were kept silent too: the next pass measures silence from the database's return.
            self.saw_outage()
        return result

    def _check_sight(self, waits) -> None:
        """Before a batch commits: had a call of this thread waited past ``blind_after`` since the last
        pass, the workers could not write meanwhile either, and their silence proves nothing."""
        if waits is not None and waits.longest > self.blind_after:
            raise BlindPass(f"the database did not answer for {waits.longest:.1f}s (a frozen server or a stalled "
                            "network): nothing judged then was recovered, and silence counts from its return")

    def _run_pass(self, waits) -> PassResult:
        try:
            file_change = self.look_at_file()
            resumed = self.resume()
            gone = gone_instances(self.engine)
            if self.recover:
                result = recover_stuck(self.engine, self.policy, actor=self.actor, requeue=self.requeue,
                                       max_attempts=self.max_attempts, gone=gone, seen_since=self.seen_since,
                                       filters=self.filters, before_commit=lambda: self._check_sight(waits))
                return self._all_clear(PassResult(ok=True, recovered=list(result), skipped=result.skipped, gone=gone,
                                                  resumed_after_outage=resumed, seen_since=self.seen_since,
                                                  file_change=file_change))
            stuck = find_stuck(self.engine, self.policy, gone=gone, seen_since=self.seen_since, filters=self.filters)
            return self._all_clear(PassResult(ok=True, stuck=stuck, gone=gone, resumed_after_outage=resumed,
                                              seen_since=self.seen_since, file_change=file_change))
        except ConcurrentChange as exc:
            # Not an outage: the database answered; a batch was rolled back and the next pass retries.
            return self._failed(exc)
        except (SchemaMissing, WriteRefused, ConfigError) as exc:
            # Retrying will not help: no schema, no right to write, or filters every pass would refuse.
            return self._failed(exc, fatal=True)
        except (AuditctlError, SQLAlchemyError) as exc:
            # SQLAlchemyError: a pool or driver failure that reached us untranslated is trouble
            # reaching the database all the same; the monitor reports it and retries.
            self.saw_outage()
            return self._failed(exc)

    @staticmethod
    def _failed(exc: Exception, **how) -> PassResult:
        """A pass that stopped on ``exc``, with what its committed batches recovered before it (``done``)."""
        done = committed_before(exc) or []
        return PassResult(ok=False, error=str(exc), recovered=list(done), skipped=list(getattr(done, "skipped", [])),
                          error_type=type(exc), exception=exc if how.get("fatal") else None, **how)
