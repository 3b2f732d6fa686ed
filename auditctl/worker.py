"""The worker-side guard: ``StuckAuditPrevention`` and the run handle it gives out.

What it owns: registering this process as a worker instance, startup cleanup, the
heartbeat thread (beats for this instance and its audits) and the monitor thread (a
monitor pass over the whole fleet), claiming audits and fencing every write with the
claim's lease, and the emergency path that keeps an audit alive when a progress write fails.

The two threads are apart so that a monitor pass waiting on the database never delays a
heartbeat, and each heartbeat write is bounded (``WRITE_TIMEOUT``, enforced on PostgreSQL by
``auditctl.watchdog`` even when the server stops answering), so one run's stuck connection
cannot silence the others.

A monitoring failure never kills the audit it watches: a progress write that fails falls
back to a minimal heartbeat write, and the heartbeat thread keeps trying through a
database outage. ``update_progress`` never blocks its caller for more than
``PROGRESS_CALL_BUDGET`` seconds and never holds the run's lock while it waits to retry.
Only ``LeaseLost`` reaches the caller, because it means the work must stop: the audit
now belongs to someone else.

Runs are kept by lease, not by audit id: an audit requeued and claimed again (even by
another thread of the same guard) is a new run with a new lease, and the old run's
handle can never stop the new one's heartbeats.

A SIGTERM never interrupts a write in flight: the signal is held while the main thread
is inside one (a claim, a progress write, the final write), and acted on right after.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from collections.abc import Mapping
from typing import Iterator

from . import leases, registry
from .db import DEFAULT_DATABASE_URL, WORKER_LOCK_WAIT, create_engine, monitor_call_timeout, never_create, sqlite_file
from .dburl import display_url
from .errors import AuditctlError, AuditNotFound, ConfigError, DatabaseRefused, LeaseLost, RunEnded, SchemaMissing
from .history import Actor
from .migrate import explained, upgrade
from .monitor import Monitor
from .progress import OWN_FIELDS, clean_report, derive_percentage, signature, storable_extra
from .recovery import DEFAULT_MAX_ATTEMPTS, Recovery, committed_before, recover_audits, recover_worker_leftovers
from .schema import ERROR_LIMIT, audits
from .signals import set_from_handler
from .sqlitefile import FileWatch
from .textsafe import printable
from .thresholds import (
    DEFAULT_HEARTBEAT_INTERVAL, MANUAL, Overrides, Policy, Thresholds, format_duration, kind_name, parse_duration,
    validate_heartbeat_interval,
)
from .transactions import HeldConnection, POOL_SPARE, fit_pool
from .urls import mask_url
from .values import MAX_INT, MIN_INT, storable_text
from .watchdog import CALL_GRACE

log = logging.getLogger("auditctl")

#: The longest one write of a run (a heartbeat, a progress report) waits for the server's answer on
#: PostgreSQL: the row-lock wait the server enforces, plus a grace. A connection whose server froze
#: holds the heartbeat thread or ``update_progress`` no longer than this, once: the write fails and
#: the next one opens a fresh connection.
WRITE_TIMEOUT = WORKER_LOCK_WAIT + CALL_GRACE
#: The longest ``worker_url``: every progress document carries it, and one holds at most 64 KiB.
MAX_WORKER_URL = 2000
#: Emergency minimal writes: the first backoff (doubled each try, with jitter).
EMERGENCY_BACKOFF = 0.05
#: The longest ``update_progress`` blocks its caller, whatever the database does (seconds).
PROGRESS_CALL_BUDGET = 5.0
#: How long the end of an audit interrupted by SIGTERM may wait for the database: well inside the
#: usual 30 s grace period before a SIGKILL (a recoverer judges the audit if this gives up).
SIGNAL_PATIENCE = 10.0


class _Turn:
    """The shared state of guards that share their monitor passes."""

    __slots__ = ("runner", "started", "in_outage", "outage_at", "seen_since")

    def __init__(self):
        self.runner: str | None = None  # the instance id of the guard that ran the last pass
        self.started = 0.0  # when it started (monotonic)
        self.in_outage = False  # a heartbeat thread of any of them could not reach the database
        self.outage_at = -1.0  # when that was last reported (monotonic)
        self.seen_since = None  # the moment silence is measured from after the last outage (Monitor.seen_since)


class PassTurns:
    """The monitor passes of this process's guards. Guards on one database with the same settings
    (thresholds, requeue, alert destinations) take turns: a guard skips its pass when another of
    them ran one within its interval. One process with a guard per worker thread made a fleet-wide
    pass per guard per interval (twenty threads, twenty passes), all judging the same audits.

    The outage state travels with the turn: an outage any of them saw is known to whichever runs the
    next pass, and an outage the passes have got past is forgotten by all of them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._turns: dict[tuple, _Turn] = {}

    def take(self, settings: tuple, instance_id: str, interval: float) -> float:
        """0 when this guard runs the pass now (it is marked as running it); otherwise the seconds
        until another guard's pass is due again, when this one should look again."""
        now = time.monotonic()
        with self._lock:
            turn = self._turns.setdefault(settings, _Turn())
            if turn.runner is not None and turn.runner != instance_id and now - turn.started < interval:
                return turn.started + interval - now
            turn.runner, turn.started = instance_id, now
            return 0.0

    def outage(self, settings: tuple) -> None:
        with self._lock:
            turn = self._turns.setdefault(settings, _Turn())
            turn.in_outage, turn.outage_at = True, time.monotonic()

    def state(self, settings: tuple) -> tuple[bool, object]:
        """``(in_outage, seen_since)`` for the pass about to run."""
        with self._lock:
            turn = self._turns.setdefault(settings, _Turn())
            return turn.in_outage, turn.seen_since

    def passed(self, settings: tuple, started: float, in_outage: bool, seen_since) -> None:
        """After a pass that started at ``started``: what it left, keeping an outage reported meanwhile."""
        with self._lock:
            turn = self._turns.setdefault(settings, _Turn())
            turn.in_outage = in_outage or turn.outage_at >= started
            turn.seen_since = seen_since


_PASS_TURNS = PassTurns()
os.register_at_fork(after_in_child=_PASS_TURNS.__init__)  # a lock held at the fork stays held


def stored_error(error: BaseException) -> str:
    """What an audit's ``error`` keeps of the exception that ended its run: its type and message,
    a URL's password masked (``show`` and ``list`` print it), in text every database takes (NUL
    and a lone surrogate, from a file name that is not UTF-8, written as escapes), at most
    ``ERROR_LIMIT`` characters. Never raises: a message that cannot be read is replaced by a note."""
    name = type(error).__name__
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - the exception's own __str__ raised: the audit still ends as failed
        message = "(its message could not be read)"
    # Masked before the cut, so a URL the cut would split is still recognised; a window of a few
    # cuts bounds the work for a message of megabytes (a response body, say).
    text = mask_url((f"{name}: {message}" if message else name)[:4 * ERROR_LIMIT])  # "KeyboardInterrupt", no ": "
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:ERROR_LIMIT]


def _check_audit_id(audit_id) -> bool:
    """Refuse what is no audit id with ConfigError (text, a float, ``True``: SQL would compare them
    as numbers, or fail); return whether an audit can have it (False: out of the column's range)."""
    if not isinstance(audit_id, int) or isinstance(audit_id, bool):
        raise ConfigError(f"audit_id must be a whole number, not {type(audit_id).__name__}")
    return MIN_INT <= audit_id <= MAX_INT


class RunBusy(Exception):
    """A progress write could not take its run's lock within the call's budget."""


class AuditRun:
    """The handle ``guard.run(audit_id)`` yields: report progress through it."""

    def __init__(self, guard: "StuckAuditPrevention", lease: leases.Lease, document: dict):
        self.guard = guard
        self.lease = lease
        self.audit_id = lease.audit_id
        self.document = document
        self.lost = False
        self.finished = False
        self.emergency_writes = 0
        self.clamped: set[str] = set()
        self._fields = {"step": None, "percentage": 0.0, "completed_tasks": None, "total_tasks": None}
        self._lock = threading.Lock()
        #: This run's own connection for its heartbeats and progress writes (None once the run is over).
        self._connection: HeldConnection | None = HeldConnection()
        self._heartbeat = leases.prepare_heartbeat(guard.engine, lease)

    def _release(self) -> None:
        """The block has ended: give the run's connection back to the pool (a write after this, a
        late heartbeat, borrows one), and refuse later reports with ``RunEnded`` even when the final
        write could not be recorded: a late report would keep that audit looking alive to every
        judge, where it must be left to a recoverer."""
        with self._lock:
            connection, self._connection = self._connection, None
            if not self.lost:
                self.finished = True
        if connection is not None:
            if self.guard._closed:
                # close() came during the run and emptied the pool, which forgot this connection: given
                # back, it would stay open in a pool nobody uses.
                connection.drop()
            else:
                connection.close()

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        """The run's lock, waited for only while the budget still leaves a database write room after it
        (the heartbeat thread holds it while its own beat waits for the database)."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic() - WORKER_LOCK_WAIT)):
            raise RunBusy(f"the heartbeat thread holds audit {self.audit_id}'s run while the database is slow")
        try:
            yield
        finally:
            self._lock.release()

    def _check(self) -> None:
        if self.lost:
            raise LeaseLost(self.audit_id)
        self.guard._refuse_if_forked()

    def _mark_lost(self, error: LeaseLost) -> LeaseLost:
        # Said once per run: the heartbeat thread and a progress write can both find it lost.
        already, self.lost = self.lost, True
        if not already:
            log.warning("⛔ LEASE LOST on audit %s: it was recovered or reset; this worker stops writing to it", self.audit_id)
        if error.unrecorded is not None:
            self.guard._owe_record(error.unrecorded)
            error.unrecorded = None
        return error

    def update_progress(self, step: str | None = None, percentage: float | None = None,
                        completed_tasks: int | None = None, total_tasks: int | None = None, **extra) -> bool:
        """Report progress; fields left out keep their last value (the last reported, also when
        that report's write failed).

        Values are clamped into what the document promises (percentage 0..100, whole task
        counts, completed never above total); a value that cannot be stored (NaN, text) is
        dropped, with a warning the first time. Returns True when the full document was
        stored, False when only the emergency minimal write (or nothing, with the database
        down) got through. Raises LeaseLost. Never blocks longer than PROGRESS_CALL_BUDGET.
        """
        deadline = time.monotonic() + PROGRESS_CALL_BUDGET
        self._check_running()
        for name in OWN_FIELDS.intersection(extra):
            if f"extra_{name}" not in self.clamped:
                self.clamped.add(f"extra_{name}")
                log.warning("audit %s: the extra progress field %r is one the document keeps itself; it is not stored",
                            self.audit_id, name)
        try:
            if extra:
                # NUL or a lone surrogate (a file name that is not UTF-8) in one extra field made
                # PostgreSQL refuse the whole report: replaced, as in the step.
                extra, replaced = storable_extra(extra)
                if replaced and "extra_characters_replaced" not in self.clamped:
                    self.clamped.add("extra_characters_replaced")
                    log.warning("audit %s: progress report adjusted (%s); the stored document holds what can be read back",
                                self.audit_id, "extra_characters_replaced")
            with self.guard._holding_signals(), self._locked(deadline):
                # Under the run's lock, both the check and the merge: the run may have ended while this
                # call waited, and two threads reporting at once must each merge with the other's report.
                self._check_running()
                fields = self._report(step, percentage, completed_tasks, total_tasks)
                # Kept as the last report before the write: one the database did not take (an outage, an
                # extra field it cannot hold) is still what the next report merges with. Kept only once
                # stored, a step reported in a failed write was lost to every later report that left the
                # step out. The fields are clean values (text, numbers): they never make a write fail.
                self._fields = fields
                self.document = leases.write_progress(
                    self.guard.engine, self.lease, fields,
                    signature(fields["step"], fields["percentage"], fields["completed_tasks"], fields["total_tasks"]),
                    extra or None, self.guard.actor, held=self._connection,
                    # Half of what is left: an emergency write on a fresh connection still fits after it.
                    timeout=min(WRITE_TIMEOUT, (deadline - time.monotonic()) / 2),
                )
                return True
        except RunEnded:
            raise
        except LeaseLost as error:
            raise self._mark_lost(error) from None
        except Exception as error:  # noqa: BLE001 - a bad report (a value whose own methods raise) or a failed write
            self._emergency(error, deadline)
            return False

    def _check_running(self) -> None:
        """Raise ``RunEnded`` once the run has ended (nobody took the audit away: no "lease lost"
        warning, no event in its history), ``LeaseLost`` once it was taken away."""
        if self.finished:
            raise RunEnded(self.audit_id, f"the run of audit {self.audit_id} has ended; this report was not written")
        self._check()

    def _report(self, step, percentage, completed_tasks, total_tasks) -> dict:
        """The fields to store: this report merged with the last, each value clamped or dropped."""
        given = {"step": step, "percentage": percentage, "completed_tasks": completed_tasks, "total_tasks": total_tasks}
        # Judged on their own first: a value that cannot be stored changes nothing, so the last good
        # one stays (merged with it, an unreadable count would erase the count and the percentage).
        _, refused = clean_report(**given)
        merged = dict(self._fields)
        for name, value in given.items():
            if value is not None and f"{name}_invalid" not in refused:
                merged[name] = value
        fields, changed = clean_report(merged["step"], merged["percentage"], merged["completed_tasks"], merged["total_tasks"])
        changed = list(dict.fromkeys(refused + changed))
        usable_percentage = percentage is not None and "percentage_invalid" not in refused
        counts_given = any(given[name] is not None and f"{name}_invalid" not in refused
                           for name in ("completed_tasks", "total_tasks"))
        if not usable_percentage:
            derived = derive_percentage(None, fields["completed_tasks"], fields["total_tasks"]) if counts_given else None
            if derived is not None:
                # Counts given without a (usable) percentage: the percentage follows the counts.
                fields["percentage"] = derived
            elif counts_given or fields["percentage"] is None:
                # Counts that give none (no total, a total of 0) keep the last percentage, as a
                # percentage left out or unusable does.
                fields["percentage"] = self._fields.get("percentage")
        for problem in changed:
            if problem not in self.clamped:
                self.clamped.add(problem)
                log.warning("audit %s: progress report adjusted (%s); the stored document holds what can be read back",
                            self.audit_id, problem)
        return fields

    def _emergency(self, error: BaseException, deadline: float) -> None:
        log.warning("🚨 Emergency progress recovery for audit %s: progress write failed (%s); writing heartbeat only",
                    self.audit_id, printable(error))
        delay = EMERGENCY_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() + WORKER_LOCK_WAIT > deadline:
                # A try could wait for the lock past the budget: leave it to the heartbeat thread.
                log.error("🚨 Emergency progress recovery for audit %s gave up after %d tries within %s; "
                          "the heartbeat thread keeps trying", self.audit_id, attempt - 1, format_duration(PROGRESS_CALL_BUDGET))
                return
            try:
                with self.guard._holding_signals(), self._locked(deadline):
                    self._check_running()
                    leases.minimal_write(self.guard.engine, self.lease, self.guard.actor, held=self._connection,
                                         timeout=min(WRITE_TIMEOUT, deadline - time.monotonic()))
                self.emergency_writes += 1
                return
            except RunEnded:
                raise
            except LeaseLost as lost:
                raise self._mark_lost(lost) from None
            except Exception as again:  # noqa: BLE001
                pause = delay * (0.5 + random.random())
                if time.monotonic() + pause >= deadline:
                    log.error("🚨 Emergency progress recovery for audit %s failed %d times (%s); "
                              "the heartbeat thread keeps trying", self.audit_id, attempt, printable(again))
                    return
                # Outside the run's lock: the heartbeat thread may beat meanwhile.
                time.sleep(pause)
                delay *= 2

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the heartbeat thread does this on its own). Raises LeaseLost, and
        ``RunEnded`` after the run's block ended (as ``update_progress`` does; it did nothing)."""
        self._check_running()
        self._beat(blocking=True)

    def _beat(self, *, blocking: bool) -> None:
        """One heartbeat write, bounded by the guard's ``beat_timeout``. Not ``blocking``: skipped while a progress
        write holds the run, since that write refreshes the heartbeat itself (the heartbeat thread
        must not wait behind one run's slow write while the others go silent)."""
        if not self._lock.acquire(blocking):  # positional: the keyword form costs three times as much
            return
        try:
            if self.finished:
                return  # the heartbeat thread raced the end of the run: nothing left to beat
            self._check()
            try:
                leases.heartbeat(self.guard.engine, self.lease, self.guard.actor, held=self._connection,
                                 timeout=self.guard.beat_timeout, prepared=self._heartbeat)
            except LeaseLost as error:
                raise self._mark_lost(error) from None
        finally:
            self._lock.release()


class StuckAuditPrevention:
    """Keeps a worker's audits honest: cleanup on start, heartbeats, fenced writes, recovery.

    ::

        guard = StuckAuditPrevention("sqlite:///auditctl.db", worker_id="worker-1")
        guard.cleanup_stuck_audits_on_startup()
        guard.start_heartbeat_monitor()
        with guard.run(audit_id) as run:
            run.update_progress(step="Crawling", completed_tasks=3, total_tasks=20)
        guard.stop()

    ``stale_after``, ``max_age`` and ``stall_after`` given here are recorded on every audit
    this worker claims, and every judge (``auditctl scan``, another worker's monitor) uses
    them for those audits. Left out, the audits declare none and the judges' own settings
    apply (the defaults are 10m, 30m, 10m). The heartbeat interval is always recorded.

    ``slack_webhook``, ``discord_webhook`` and ``webhook`` (a URL or a list) make the guard
    announce what its monitor passes recover (see ``auditctl.notify``), from a thread of its
    own, so a slow webhook never delays a heartbeat.
    """

    def __init__(
        self,
        database_url: str = DEFAULT_DATABASE_URL,
        *,
        worker_id: str | None = None,
        worker_url: str | None = None,
        heartbeat_interval: float | timedelta = DEFAULT_HEARTBEAT_INTERVAL,
        stale_after: float | timedelta | None = None,
        max_age: float | timedelta | None = None,
        stall_after: float | timedelta | None = None,
        requeue: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        create_schema: bool = True,
        kinds: dict | None = None,
        slack_webhook: str | list[str] | None = None,
        discord_webhook: str | list[str] | None = None,
        webhook: str | list[str] | None = None,
        notify_timeout: float | timedelta | str = 5.0,
    ):
        self.declared = Overrides.parse(stale_after, max_age, stall_after)
        self.thresholds = Thresholds.parse(stale_after, max_age, stall_after)
        self.heartbeat_interval = validate_heartbeat_interval(heartbeat_interval, self.thresholds.stale_after)
        #: How long one heartbeat write may wait for the server's answer (PostgreSQL). At most half an
        #: interval, so a frozen connection delays the other runs' beats by less than the margin
        #: ``stale_after`` (at least two intervals) leaves; a beat later than that is late anyway.
        self.beat_timeout = min(WRITE_TIMEOUT, self.heartbeat_interval / 2)
        notify_timeout = parse_duration(notify_timeout, "notify_timeout")  # "5s" as in the config file
        if kinds is not None and not isinstance(kinds, Mapping):
            raise ConfigError(f"kinds must be a mapping of kind names to their thresholds, not {type(kinds).__name__}")
        kind_overrides = {kind_name(name, "a kind's name in kinds"): Overrides.from_mapping(values, f"kind {name}")
                          for name, values in (kinds or {}).items()}
        if self.declared.stale_after is None:  # then a kind's stale_after judges this worker's audits of that kind
            for name, values in kind_overrides.items():
                if values.stale_after is not None:
                    validate_heartbeat_interval(heartbeat_interval, values.stale_after, f"stale_after of kind {name!r}")
        self.policy = Policy.of(self.thresholds, kinds=kind_overrides)
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be a whole number of at least 1, got {max_attempts!r}")
        self.worker_id = socket.gethostname() if worker_id is None else worker_id
        if not isinstance(self.worker_id, str) or len(self.worker_id) > 200:
            raise ConfigError("worker_id must be text of at most 200 characters")
        if not self.worker_id.strip():
            # Left out, it is the host name; given empty, two workers on one host would silently share it.
            raise ConfigError("worker_id is empty: give each worker its own, or leave it out for the host name")
        for name, flag in (("requeue", requeue), ("create_schema", create_schema)):
            if not isinstance(flag, bool):  # "false" would be true
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        storable_text("worker_id", self.worker_id)
        if worker_url is not None and (not isinstance(worker_url, str) or len(worker_url) > MAX_WORKER_URL):
            raise ConfigError(f"worker_url must be text of at most {MAX_WORKER_URL} characters")
        if worker_url is not None:
            storable_text("worker_url", worker_url)
        self.worker_url = worker_url
        self.instance_id = uuid.uuid4().hex
        self.requeue = requeue
        self.max_attempts = max_attempts
        # Writes for this worker's own audits wait briefly for locks; fleet-wide recovery
        # (the monitor pass, startup cleanup) is an operator's work with an operator's patience.
        # The pool grows with the runs held at once (``fit_pool``): one connection per run, plus spares.
        self.engine = create_engine(database_url, role="worker", pool_size=8)
        self.operator_engine = create_engine(database_url, role="operator", pool_size=2, call_timeout=monitor_call_timeout())
        self.database = display_url(self.engine)
        self.actor = Actor.worker(self.worker_id, self.instance_id)
        self.monitor = Monitor(self.operator_engine, self.policy, actor=self.actor, requeue=requeue, max_attempts=max_attempts)
        # Alerts (auditctl.notify) go out from their own thread, kicked after each monitor pass:
        # a webhook that hangs must never delay the heartbeats of the audits this worker runs.
        from .notify.destinations import destinations_from

        destinations = destinations_from(slack=slack_webhook, discord=discord_webhook, webhook=webhook)
        self.notifier = None
        if destinations:
            from .notify.background import Notifier

            self.notifier = Notifier(self.operator_engine, destinations, timeout=notify_timeout)
        #: What decides a monitor pass's outcome: guards of this process that share it share their passes.
        self._pass_settings = (self.database, sqlite_file(self.engine), self.policy, requeue, max_attempts,
                               tuple(sorted(d.key for d in destinations)))
        self._monitor_wait = self.heartbeat_interval  # until the next look at the monitor pass
        self._duplicates_checked = -math.inf
        self.duplicates: list[registry.Instance] = []
        self._runs: dict[str, AuditRun] = {}
        self._runs_lock = threading.Lock()
        #: run() calls inside their claim, under ``_runs_lock``: a stop() then must not mark the instance
        #: stopped, since the claim may land an audit running under it (see ``_stop_threads``).
        self._claiming = 0
        #: The process this guard belongs to: a child forked from it must not act for it (``_forked``).
        self._pid = os.getpid()
        self._lifecycle = threading.RLock()  # start_heartbeat_monitor and stop, one at a time
        self._monitor_wanted: bool | None = None  # handle_sigterm of the last start_heartbeat_monitor
        self._stop = threading.Event()
        #: Stops the monitor passes only: set by SIGTERM too, which must not stop the heartbeats of
        #: work that goes on (an application draining its audits, other threads finishing theirs).
        self._monitor_stop = threading.Event()
        self._thread: threading.Thread | None = None  # the heartbeats
        self._monitor_thread: threading.Thread | None = None  # the monitor passes
        self._previous_sigterm = None
        self._mark_stopped_when_idle = False  # stop() came while runs went on (see _stop_threads)
        self._held = 0  # main-thread writes in flight (SIGTERM waits for them)
        self._pending_signal: int | None = None
        self._pending_sigint = False  # Ctrl-C held during a write (see _holding_signals)
        self._unrecorded: list = []  # lease_lost events the database refused at the time (see _settle_records)
        self._stopped = False  # stop() marked the instance stopped; using the guard again un-marks it
        #: close() was called: a run or claim still under way closes the pools again when the last one ends.
        self._closed = False
        try:
            if create_schema:
                upgrade(self.operator_engine)
            try:
                registry.register(self.engine, instance_id=self.instance_id, worker_id=self.worker_id, worker_url=worker_url,
                                  guard=self, heartbeat_interval=self.heartbeat_interval,
                                  stale_after=self.thresholds.stale_after)
            except SchemaMissing as missing:  # said as the CLI says it: another application's tables, or an old schema
                raise explained(missing, self.operator_engine) from None
            self._check_duplicates()
            # SQLite: the file this guard opened. Deleted, moved or replaced under a running worker, it
            # would take the worker's writes where nobody reads them (``_check_database_file``), and a
            # new connection must never create an empty file in its place.
            self._file_watch = FileWatch(self.engine, self.operator_engine)
            never_create(self.engine)
            never_create(self.operator_engine)
        except BaseException:
            # No guard is handed back to close: the connections the start opened (the schema check, the
            # registration) were left open until the garbage collector found the engines, two more on
            # each try of a worker that retries its start while the database is not ready.
            registry.forget_here(self.instance_id)
            self.engine.dispose()
            self.operator_engine.dispose()
            raise
        log.info("✅ Stuck audit prevention system initialized: worker %s (instance %s) on %s; heartbeat every %s, "
                 "stale after %s, max age %s, stall after %s", printable(self.worker_id), self.instance_id[:8], self.database,
                 format_duration(self.heartbeat_interval), format_duration(self.thresholds.stale_after),
                 format_duration(self.thresholds.max_age), format_duration(self.thresholds.stall_after))

    def _declared(self) -> dict:
        """What each claim records: the heartbeat interval, and the thresholds this worker was given."""
        return {"heartbeat_interval": self.heartbeat_interval, **self.declared.as_dict()}

    # --- the seed's API -------------------------------------------------------------

    def cleanup_stuck_audits_on_startup(self) -> list[Recovery]:
        """Recover what earlier instances of this worker left running, then every stuck audit."""
        self._refuse_if_unusable()
        live = {self.instance_id} | {peer.instance_id for peer in self._check_duplicates()}
        try:
            leftovers = recover_worker_leftovers(self.operator_engine, self.worker_id, live, actor=self.actor,
                                                 requeue=self.requeue, max_attempts=self.max_attempts,
                                                 instance_id=self.instance_id)
        except AuditctlError as error:  # an outage partway: what the committed batches did is said first
            self._log_leftovers(committed_before(error) or [])
            raise
        self._log_leftovers(leftovers)
        # One of this process's passes (``PassTurns``): an outage its other guards saw and have not got
        # past yet holds for it too, or it would judge their workers by the silence the outage imposed.
        started = time.monotonic()
        self.monitor.in_outage, self.monitor.seen_since = _PASS_TURNS.state(self._pass_settings)
        stuck = self._monitor_pass(marker="🧹 STARTUP CLEANUP")
        _PASS_TURNS.passed(self._pass_settings, started, self.monitor.in_outage, self.monitor.seen_since)
        log.info("🧹 STARTUP CLEANUP: %d left by earlier instances, %d stuck audits recovered", len(leftovers), len(stuck))
        return list(leftovers) + list(stuck)

    def _log_leftovers(self, leftovers) -> None:
        for recovery in leftovers:
            log.warning("🧹 STARTUP CLEANUP: audit %s (%s) was left running by an earlier instance of %s; now %s",
                        recovery.id, printable(recovery.target), printable(self.worker_id), recovery.status)

    def start_heartbeat_monitor(self, *, handle_sigterm: bool = True) -> None:
        """Start the background thread; on the main thread, also stop cleanly on SIGTERM.

        SIGTERM raises ``SystemExit(143)`` in the main thread (so ``run`` blocks unwind and
        record their end), but never in the middle of a write: a write in flight finishes
        first. ``stop()`` then runs as the process exits, which joins the threads and marks
        the instance stopped, unless the application called it first.
        """
        self._refuse_if_forked()
        with self._lifecycle:
            self._refuse_if_closed()
            self._start_heartbeat_monitor(handle_sigterm)

    def _start_heartbeat_monitor(self, handle_sigterm: bool) -> None:
        self._monitor_wanted = handle_sigterm  # a run() after a stop() starts them again the same way
        threads = [thread for thread in (self._thread, self._monitor_thread) if thread is not None and thread.is_alive()]
        if threads:
            if not self._stop.is_set():
                if self._monitor_stop.is_set():  # SIGTERM ended the monitor passes only: start them again
                    if self._monitor_thread is not None:
                        self._monitor_thread.join(5.0)
                    self._monitor_stop = threading.Event()
                    self._monitor_thread = self._new_monitor_thread()
                    self._monitor_thread.start()
                return
            for thread in threads:
                thread.join(5.0)
        self._resume_if_stopped()
        # A stop signal of their own: a thread of an earlier start still waiting on the database
        # (stop() joins with a timeout) still ends when it is done, and never runs beside these.
        self._stop = threading.Event()
        self._monitor_stop = threading.Event()
        # Two threads: a monitor pass that waits on the database (a lock, a slow recovery) must never
        # delay the heartbeats of the audits this worker runs.
        self._thread = threading.Thread(target=self._every_interval, args=(self._beat_once, self._stop),
                                        name=f"auditctl-heartbeat-{self.worker_id}", daemon=True)
        self._monitor_thread = self._new_monitor_thread()
        self._thread.start()
        self._monitor_thread.start()
        # At exit, not inside the signal handler: the interrupted main thread may hold a
        # write transaction (on SQLite, the write lock) that is only released as it unwinds.
        atexit.register(self._stop_at_exit)
        if (handle_sigterm and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) not in (self._on_sigterm, signal.SIG_IGN)):
            # An application that ignores SIGTERM (it drains on its own) keeps ignoring it: taking
            # it would stop the heartbeats of work that goes on, and get that work recovered.
            # Chain to whatever was there, never to ourselves (a restart after a stop() made
            # off the main thread would otherwise make the handler call itself).
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        log.info("💓 HEARTBEAT monitor started: every %s", format_duration(self.heartbeat_interval))

    def _new_monitor_thread(self) -> threading.Thread:
        return threading.Thread(target=self._every_interval,
                                args=(self._monitor_once, self._monitor_stop, lambda: self._monitor_wait),
                                name=f"auditctl-monitor-{self.worker_id}", daemon=True)

    def _heartbeat_cleanup(self, marker: str = "💓 HEARTBEAT") -> list[Recovery]:
        """One monitor pass over the whole fleet: recover every stuck audit."""
        self._refuse_if_unusable()
        return self._monitor_pass(marker)

    def _monitor_pass(self, marker: str = "💓 HEARTBEAT") -> list[Recovery]:
        """``_heartbeat_cleanup``, for the monitor thread: a pass in flight as close() begins is not refused."""
        result = self.monitor.run_pass()
        if self.notifier is not None and result.ok and not self._stopped:
            self.notifier.start().kick()  # never waits for the webhook
        if result.ok and result.resumed_after_outage:
            log.warning("%s: database reachable again; silence is measured from now on, not across the outage", marker)
        for recovery in result.recovered:  # a pass that stopped partway keeps what its committed batches did
            log.warning("%s: recovered audit %s (%s): %s -> %s; %s", marker, recovery.id, printable(recovery.target),
                        ", ".join(recovery.reasons), recovery.status, printable("; ".join(recovery.explanation)))
        for skipped in result.skipped:
            log.error("%s: audit %s could not be recovered (%s); it needs an operator", marker, skipped.id,
                      printable(skipped.error))
        if not result.ok:
            # Fatal: the database answered, but will not do it (no schema, no right to write).
            trouble = "cannot recover stuck audits" if result.fatal else "cannot reach the database"
            log.error("%s: %s (%s); will retry", marker, trouble, printable(result.error))
        return result.recovered

    def _recover_stuck_audit(self, audit_id: int, reason: str = MANUAL, explanation: str | None = None) -> Recovery | None:
        """Recover one running audit now, whatever the rules say. Returns None when it was not running.

        A bad request (an id that is not a whole number, an explanation that is not text any database
        stores, or longer than ``ERROR_LIMIT``) raises ConfigError before anything is read or written."""
        self._refuse_if_unusable()
        if explanation is not None:
            if not isinstance(explanation, str) or len(explanation) > ERROR_LIMIT:
                raise ConfigError(f"explanation must be text of at most {ERROR_LIMIT} characters")
            storable_text("explanation", explanation)
        if not _check_audit_id(audit_id):
            return None  # no audit can have it: not running
        done = recover_audits(self.operator_engine, audits.c.id == audit_id, reason=reason,
                              explanation=explanation or f"recovered by {self.actor.name}", actor=self.actor,
                              requeue=self.requeue, max_attempts=self.max_attempts)
        return done[0] if done else None

    # --- audits -----------------------------------------------------------------------

    def create_audit(self, target: str, max_age: float | timedelta | None = None, kind: str | None = None) -> int:
        """A new pending audit; ``max_age`` gives it its own deadline, ``kind`` its kind's thresholds."""
        self._refuse_if_unusable()
        deadline = parse_duration(max_age, "max_age") if max_age is not None else None
        return leases.create_audit(self.engine, target, max_age=deadline, kind=kind)

    @contextlib.contextmanager
    def run(self, audit_id: int) -> Iterator[AuditRun]:
        """Claim a pending audit; completed when the block exits, failed when it raises.

        After ``LeaseLost`` nothing more is written: the exception leaves the block and the
        audit stays as its recoverer left it. After ``close()`` it raises ConfigError.
        """
        self._refuse_if_forked()
        if not _check_audit_id(audit_id):
            raise AuditNotFound(f"no audit with id {audit_id}")
        with self._lifecycle:  # one at a time with a stop() and with the end of the last run after one
            self._refuse_if_closed()
            if self._resume_if_stopped() and self._monitor_wanted is not None:
                # Started before the stop(): without its threads this run would get no heartbeat and
                # be recovered as stale while it works.
                self._start_heartbeat_monitor(self._monitor_wanted)
            with self._runs_lock:  # counted before a stop() can look: it waits for the lifecycle lock
                self._claiming += 1
        holding = self._holding_signals()
        holding.__enter__()
        try:
            lease, document = leases.claim(self.engine, audit_id, worker_id=self.worker_id, instance_id=self.instance_id,
                                           worker_url=self.worker_url, declared=self._declared())
        except BaseException:
            with self._runs_lock:
                self._claiming -= 1
                last = self._stop_waits_for_none()
            try:
                self._after_leaving(last)  # a stop() that came during this claim, which took nothing, is due now
            finally:
                holding.__exit__(*sys.exc_info())
            raise
        handle = AuditRun(self, lease, document)
        with self._runs_lock:  # one step from a claim in flight to a run: a stop() sees one or the other
            self._runs[lease.token] = handle
            self._claiming -= 1
            held = len(self._runs)
        try:
            try:
                # A SIGTERM held during the claim is acted on here, inside the run, so the audit
                # it claimed is marked failed ("SystemExit: 143") instead of left running.
                holding.__exit__(None, None, None)
                fit_pool(self.engine, held + POOL_SPARE)
                yield handle
            except LeaseLost as lost:
                if lost.audit_id == audit_id:
                    handle.lost = True
                    raise
                # Another audit's lease (a nested run): this one still ends as failed.
                if not handle.lost:
                    self._finish(handle, stored_error(lost))
                raise
            except BaseException as error:
                if not handle.lost and not self._forked():  # a forked child leaving the block: the run is its parent's
                    try:
                        self._finish(handle, stored_error(error),
                                     patience=SIGNAL_PATIENCE if isinstance(error, SystemExit) else None)
                    except Exception as trouble:  # noqa: BLE001 - never in place of the block's own exception
                        # The block's own exception (SystemExit(143) included) is what the caller gets;
                        # the audit stays running until a recoverer judges it.
                        log.error("could not record the end of audit %s (%s): %s", audit_id,
                                  printable(f"{type(error).__name__}"), printable(trouble))
                raise
            if handle.lost:
                raise LeaseLost(audit_id, f"lease lost on audit {audit_id} while it ran: the result was not written")
            if not self._forked():
                self._finish(handle, None)
        finally:
            # In a forked child the locks may have been copied held by a thread that did not follow
            # the fork (a beat in flight): the run, its connection and its locks are the parent's.
            if not self._forked():
                with self._runs_lock:
                    self._runs.pop(lease.token, None)
                    last = self._stop_waits_for_none()
                handle._release()
                self._after_leaving(last)

    def _stop_waits_for_none(self) -> bool:
        """Under ``_runs_lock``: a stop() came while runs or claims went on, and none is left now."""
        return not self._runs and not self._claiming and self._mark_stopped_when_idle

    def _after_leaving(self, last: bool) -> None:
        """A run or a claim has ended: what a stop() or close() that came meanwhile left for the last one."""
        if last:
            self._stopped_after_last_run()
        self._dispose_if_closed()

    def _finish(self, handle: AuditRun, error: str | None, *, patience: float | None = None) -> None:
        """The final write, retried until the database takes it (bounded); a SIGTERM waits for it."""
        delay = EMERGENCY_BACKOFF
        # A SIGTERM's patience runs from now: the process must exit within it. Otherwise the budget runs
        # from the first failure, so a pause (SIGSTOP) inside the first attempt does not spend it.
        deadline = time.monotonic() + patience if patience is not None else None
        patience = patience if patience is not None else min(60.0, self.thresholds.stale_after / 2)
        with self._holding_signals():
            while True:
                with handle._lock:
                    try:
                        leases.finish(self.engine, handle.lease, error=error, actor=self.actor)
                        handle.finished = True
                        return
                    except LeaseLost as lost:
                        raise handle._mark_lost(lost) from None
                    except AuditctlError as trouble:
                        deadline = deadline if deadline is not None else time.monotonic() + patience
                        if time.monotonic() >= deadline:
                            raise
                        log.warning("🚨 Emergency progress recovery: cannot record the end of audit %s yet (%s); retrying",
                                    handle.audit_id, printable(trouble))
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    # --- signals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _holding_signals(self) -> Iterator[None]:
        """Inside, a SIGTERM on the main thread is held; it takes effect when the outermost write ends.
        So is Ctrl-C while SIGINT has Python's own handler (an application's own is left alone): a
        KeyboardInterrupt inside the claim or the final write left the audit running under a lease
        no thread of this guard held or beat, until a recoverer judged it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._held += 1
        sigint = None
        if self._held == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            sigint = signal.signal(signal.SIGINT, self._hold_sigint)
        try:
            yield
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
            self._held -= 1
            if self._held == 0 and self._pending_signal is not None:
                signum, self._pending_signal = self._pending_signal, None
                self._deliver(signum, None)
            if self._held == 0 and self._pending_sigint:
                self._pending_sigint = False
                raise KeyboardInterrupt

    def _hold_sigint(self, signum, frame) -> None:
        self._pending_sigint = True

    def _on_sigterm(self, signum, frame) -> None:
        if self._forked():
            # Inherited by a forked child: the child ends as it would have without the guard, by
            # the handler that was there before (by the signal itself, for the default).
            previous = self._previous_sigterm
            if callable(previous) and previous != self._on_sigterm:
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL if previous in (None, self._on_sigterm) else previous)
            os.kill(os.getpid(), signum)
            return
        log.info("💓 HEARTBEAT: SIGTERM received; stopping the monitor (heartbeats go on while audits run)")
        set_from_handler(self._monitor_stop)  # the main thread may be inside this event's set() (stop())
        if self._held:
            # A write is in flight on the main thread: interrupting it could leave finished
            # work "running" under a lease nobody holds. Act as soon as it is done.
            self._pending_signal = signum
            return
        self._deliver(signum, frame)

    def _deliver(self, signum, frame) -> None:
        previous = self._previous_sigterm
        if callable(previous) and previous != self._on_sigterm:
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    # --- lifecycle --------------------------------------------------------------------

    def stop(self, timeout: float | timedelta | str | None = None) -> None:
        """Stop the heartbeat and monitor threads (joins them) and mark this instance stopped: at
        once when no ``run`` block is under way, else when the last one ends (until then its
        audits are still this live instance's, not a gone worker's).

        In a child forked from the guard's process it does nothing: the threads and the worker
        instance are the parent's, which goes on running.

        ``timeout`` (seconds, a timedelta or ``"5s"``; 0 waits for nothing) bounds the wait for the
        threads; a bad one raises ConfigError before anything is stopped."""
        if timeout is not None and not (type(timeout) in (int, float) and timeout == 0):
            timeout = parse_duration(timeout, "timeout")
        if self._forked() or self._closed:  # closed: close() has stopped it already
            return
        with self._lifecycle:
            self._stop_threads(timeout)

    def _stop_threads(self, timeout: float | None, *, exiting: bool = False) -> None:
        atexit.unregister(self._stop_at_exit)
        self._stop.set()
        self._monitor_stop.set()
        self._stopped = True  # before the threads end: a last monitor pass then wakes no alert sender
        until = None if timeout is None else time.monotonic() + timeout  # one timeout for both threads
        for thread in (self._thread, self._monitor_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(None if until is None else max(0.0, until - time.monotonic()))
        if self.notifier is not None:
            # A delivery still in flight is covered by its claim: wait a second at most, and never
            # past stop()'s own timeout (0 waits for nothing, even for a webhook that hangs).
            left = 1.0 if until is None else min(1.0, max(0.0, until - time.monotonic()))
            self.notifier.stop(timeout=left)
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == self._on_sigterm):
            # Only put back what we replaced, and only if nobody (another guard) replaced us since.
            signal.signal(signal.SIGTERM, self._previous_sigterm if self._previous_sigterm is not None else signal.SIG_DFL)
            self._previous_sigterm = None
        with self._runs_lock:
            # Marked stopped, the instance's audits are recovered at once (worker_gone): not while
            # this process still runs one, or is claiming one (the claim may land after this). The
            # process exiting leaves them, and says so.
            running = len(self._runs) + self._claiming
            self._mark_stopped_when_idle = bool(running) and not exiting
        if self._mark_stopped_when_idle:
            # The process may exit before the runs end (a daemon thread's): it marks the instance stopped then.
            atexit.register(self._stop_at_exit)
            log.warning("💓 HEARTBEAT monitor stopped for worker %s with %d audit(s) still running here: they get no "
                        "more heartbeats, and the instance is marked stopped when the last one ends",
                        printable(self.worker_id), running)
            return
        self._mark_stopped()
        log.info("💓 HEARTBEAT monitor stopped for worker %s", printable(self.worker_id))

    def _stopped_after_last_run(self) -> None:
        """stop() was called while runs went on (or claims), and the last one has ended: mark the instance stopped,
        unless a new run has made it live again meanwhile (``_resume_if_stopped``, under the same lock)."""
        with self._lifecycle:
            with self._runs_lock:
                due = self._mark_stopped_when_idle and self._stopped and not self._runs and not self._claiming
                self._mark_stopped_when_idle = False
            if due:
                self._mark_stopped()
                atexit.unregister(self._stop_at_exit)  # nothing left for the exit to do

    def _mark_stopped(self) -> None:
        try:
            # Bounded as a beat is: a process exiting (SIGTERM) with its database frozen waited the
            # full connection timeout here, after its final write had already waited.
            registry.mark_stopped(self.engine, self.instance_id, timeout=self.beat_timeout)
        except AuditctlError as error:
            registry.forget_here(self.instance_id)
            log.warning("could not mark worker instance %s stopped: %s", self.instance_id[:8], printable(error))

    def _resume_if_stopped(self) -> bool:
        """Used again after ``stop()``: the instance is live again. Marked stopped, its audits would be
        recovered at once as those of a worker that stopped without finishing them (``worker_gone``),
        by other recoverers and by this guard's own monitor. Returns whether it was stopped."""
        if not self._stopped:
            return False
        with self._runs_lock:
            self._mark_stopped_when_idle = False
        registry.mark_running(self.engine, self.instance_id, guard=self)
        self._stopped = False
        log.info("✅ Stuck audit prevention system resumed: worker %s (instance %s)", printable(self.worker_id),
                 self.instance_id[:8])
        return True

    def _stop_at_exit(self) -> None:
        if self._forked():
            return  # a forked child's exit says nothing of the parent's work
        left = self.active_audits  # run blocks of daemon threads: the others ended before at-exit calls
        if left:
            log.warning("the process is exiting with audit(s) %s still running here (a run block it did not wait "
                        "for): they get no final write, and are recovered as worker_gone once worker %s is marked "
                        "stopped", ", ".join(map(str, left)), printable(self.worker_id))
        with self._lifecycle:
            self._stop_threads(10.0, exiting=True)
        self._settle_records(last=True)

    def _settle_at_exit(self) -> None:
        """A process that exits without ``close()`` still records the ``lease_lost`` events it owes."""
        if not self._forked():
            self._settle_records(last=True)

    def _forked(self) -> bool:
        """Whether this is a child forked from the process that made the guard."""
        return os.getpid() != self._pid

    def _refuse_if_forked(self) -> None:
        if os.getpid() != self._pid:
            raise ConfigError(f"this StuckAuditPrevention belongs to process {self._pid}, not to this child forked "
                              "from it (its threads did not follow the fork): make a new one in the child")

    def _refuse_if_unusable(self) -> None:
        """What every entry point checks first: this process made the guard, and it is not closed."""
        self._refuse_if_forked()
        self._refuse_if_closed()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ConfigError(f"this StuckAuditPrevention (worker {printable(self.worker_id)}) is closed: close() "
                              "ended it for good; make a new one to claim or recover audits again")

    def close(self) -> None:
        """``stop()``, then close the pools' connections. A run still under way (close() from a shutdown
        hook on another thread) keeps its own connection until it ends; its final write and the
        instance's stop then take connections again, and the last run to end closes them too.

        The guard is then done: ``run()``, ``create_audit()``, ``start_heartbeat_monitor()`` and the
        recovery calls raise ConfigError. A second ``close()`` (or ``stop()``) does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._forked():
                with self._lifecycle:
                    self._stop_threads(None)
                self._settle_records(last=True)
        finally:
            self._dispose()

    def _dispose(self) -> None:
        # A forked child's pooled connections share their sockets with the parent's: closing them
        # would end the parent's sessions, so the child only forgets them.
        ours = not self._forked()
        self.engine.dispose(close=ours)
        self.operator_engine.dispose(close=ours)

    def _dispose_if_closed(self) -> None:
        """The last run or claim has ended after close(): give back what its end took from the pools."""
        with self._runs_lock:
            idle = self._closed and not self._runs and not self._claiming
        if idle:
            self._dispose()

    def __enter__(self) -> "StuckAuditPrevention":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the heartbeat thread -----------------------------------------------------------

    def _check_duplicates(self) -> list[registry.Instance]:
        peers = registry.live_peers(self.engine, self.worker_id, self.instance_id, self.thresholds.stale_after)
        fresh = {p.instance_id for p in peers} - {p.instance_id for p in self.duplicates}
        for peer in peers:
            if peer.instance_id in fresh:
                log.error("⚠️ worker_id %r is also used by a live instance %s on host %s (pid %s); "
                          "its audits are left alone, but give each worker its own worker_id",
                          printable(self.worker_id), printable(peer.instance_id[:8]), printable(peer.host), peer.pid)
        self.duplicates = peers
        return peers

    def _check_database_file(self) -> bool:
        """SQLite: False while no file is at the database's path. When the file this guard opened was
        deleted, moved or replaced, its open connections would go on writing to it, where no one
        else reads: they are closed, so every write opens the path again (and fails while nothing
        is there, which the heartbeat thread then reports as an outage)."""
        if not self._file_watch.changed():
            return self._file_watch.present
        with self._runs_lock:
            runs = list(self._runs.values())
        with contextlib.ExitStack() as holding:
            # Every run held still (a write in flight finishes first, on the old file): no run writes to
            # the old file after ``check`` wrote its log into it and emptied the pools, so a run that
            # starts now cannot take a connection to it; then the runs' own connections are dropped.
            for handle in runs:
                holding.enter_context(handle._lock)
            change = self._file_watch.check()
            for handle in runs:
                if handle._connection is not None:
                    handle._connection.drop()
        if change is None:
            return self._file_watch.present
        path = self._file_watch.path
        if change == "gone":
            log.error("🚨 DATABASE FILE %s was deleted or moved away while this worker ran; its audits are no longer "
                      "where anyone can see them, and writes fail until a database is at that path again",
                      printable(path))
        elif change == "back":
            log.warning("✅ DATABASE FILE %s is there again; writing to it", printable(path))
        else:
            log.error("🚨 DATABASE FILE %s was replaced by another file while this worker ran; writing to the new one",
                      printable(path))
        return self._file_watch.present

    def _beat_once(self) -> bool:
        """Heartbeat this instance and each of its runs. True when the database answered."""
        if not self._check_database_file():
            self._mark_outage()
            return False
        self._settle_records()
        # A failed registry beat does not stop the runs' own beats: the workers row alone may be what
        # is refused (another tool's trigger, a lock on that row), and skipping the runs made healthy
        # audits look stale. Only a database that is away (the first run's beat fails too) ends the round.
        away = None
        try:
            registry.beat(self.engine, self.instance_id, timeout=self.beat_timeout)
        except DatabaseRefused as error:
            log.error("💓 HEARTBEAT: the database refused this instance's own beat (%s); its audits still beat",
                      printable(error))
        except AuditctlError as error:
            log.error("💓 HEARTBEAT: database unavailable (%s); retrying", printable(error))
            away = error
        with self._runs_lock:
            runs = list(self._runs.values())
        healthy = away is None
        for handle in runs:
            if handle.lost:
                continue
            try:
                handle._beat(blocking=False)
            except LeaseLost:
                continue
            except Exception as error:  # noqa: BLE001 - the thread must outlive any single failure
                healthy = False
                log.error("💓 HEARTBEAT: could not beat for audit %s (%s); retrying", handle.audit_id, printable(error))
                if away is not None:
                    break  # the database is away: each other run would wait out its own timeout as well
            else:
                away = None  # a run's beat got through: the database is there
        if away is not None:
            self._mark_outage()
        log.debug("💓 HEARTBEAT: %d audits beating", len(runs))
        return healthy

    def _owe_record(self, record) -> None:
        """A ``lease_lost`` event the database refused when the lease was found lost: made later."""
        with self._runs_lock:
            self._unrecorded.append(record)
            # Paid by the heartbeat thread or close(); a process that exits first pays it as it goes
            # (it was dropped without a word). Registered once, however many are owed; under the lock,
            # as _settle_records unregisters it, so a debt is never left without it.
            atexit.unregister(self._settle_at_exit)
            atexit.register(self._settle_at_exit)

    def _settle_records(self, *, last: bool = False) -> None:
        """Record the ``lease_lost`` events owed, oldest first; what the database still refuses waits
        for the next beat, or, at ``close()`` (``last``), is given up with a warning (its details
        were in the warning when the lease was found lost)."""
        with self._runs_lock:
            owed, self._unrecorded = self._unrecorded, []
            if owed:
                atexit.unregister(self._settle_at_exit)  # put back below for what the database still refuses
        for index, record in enumerate(owed):
            try:
                record()
            except AuditctlError as error:
                if last:
                    log.warning("%d lease_lost event(s) could not be recorded before close() or the process's exit (%s); the warnings "
                                "logged when the leases were lost hold what they would have said",
                                len(owed) - index, printable(error))
                else:
                    with self._runs_lock:
                        self._unrecorded[:0] = owed[index:]
                        atexit.unregister(self._settle_at_exit)
                        atexit.register(self._settle_at_exit)
                return
            log.info("a lease_lost event the database had refused is now recorded (marked recorded_late)")

    def _mark_outage(self) -> None:
        """The heartbeat thread could not reach the database: the next monitor pass, whichever guard of
        this process runs it, measures silence from when the database is back."""
        self.monitor.in_outage = True
        _PASS_TURNS.outage(self._pass_settings)

    def _monitor_once(self) -> bool:
        """One monitor pass over the whole fleet (or another guard of this process ran it: see
        ``PassTurns``), after a look for live duplicates of this worker. True when the database answered."""
        due = _PASS_TURNS.take(self._pass_settings, self.instance_id, self.heartbeat_interval)
        now = time.monotonic()
        if due:
            # Look again when the other guard's next pass is due, so a stopped one is replaced at once.
            self._monitor_wait = due + 0.01
            if now - self._duplicates_checked < self.heartbeat_interval:
                return True
        else:
            self._monitor_wait = self.heartbeat_interval
        try:
            self._duplicates_checked = now
            self._check_duplicates()
        except AuditctlError:
            return False
        if due:
            log.debug("💓 HEARTBEAT: another guard of this process runs the monitor pass")
            return True
        self.monitor.in_outage, self.monitor.seen_since = _PASS_TURNS.state(self._pass_settings)
        recovered = self._monitor_pass()
        _PASS_TURNS.passed(self._pass_settings, now, self.monitor.in_outage, self.monitor.seen_since)
        log.debug("💓 HEARTBEAT: monitor pass, %d recovered", len(recovered))
        return not self.monitor.in_outage

    def _every_interval(self, step, stop: threading.Event, next_wait=None) -> None:
        """Run ``step`` every heartbeat interval (or after ``next_wait()`` seconds) until ``stop``; sooner
        again, with backoff, after a failure."""
        retry = 1.0
        while not stop.is_set():
            try:
                healthy = step()
            except Exception as error:  # noqa: BLE001
                log.error("💓 HEARTBEAT: unexpected error (%s); the monitor keeps running", printable(error))
                log.debug("💓 HEARTBEAT: traceback", exc_info=True)
                healthy = False
            if healthy:
                retry = 1.0
                wait = self.heartbeat_interval if next_wait is None else next_wait()
            else:
                # Come back soon after the database does, without hammering it.
                wait = min(self.heartbeat_interval, retry * (0.5 + random.random()))
                retry = min(retry * 2, 30.0)
            stop.wait(wait)

    @property
    def active_audits(self) -> list[int]:
        with self._runs_lock:
            return sorted({run.audit_id for run in self._runs.values()})
