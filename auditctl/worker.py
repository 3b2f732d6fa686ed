"""The worker-side guard: ``StuckAuditPrevention`` and the run handle it gives out.

What it owns: registering this process as a worker instance, startup cleanup, the
heartbeat thread (beats for this worker's audits, then a monitor pass over the whole
fleet), claiming audits and fencing every write with the claim's lease, and the
emergency path that keeps an audit alive when a progress write fails.

A monitoring failure never kills the audit it watches: progress writes that fail fall
back to a minimal heartbeat write, retried with backoff and jitter, and the heartbeat
thread keeps trying through a database outage. Only ``LeaseLost`` reaches the caller,
because it means the work must stop: the audit now belongs to someone else.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import signal
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Iterator

from . import leases, registry
from .db import DEFAULT_DATABASE_URL, create_engine, mask_url
from .errors import AuditctlError, ConfigError, LeaseLost
from .history import Actor
from .migrate import upgrade
from .monitor import Monitor
from .progress import derive_percentage, signature
from .recovery import DEFAULT_MAX_ATTEMPTS, Recovery, recover_audits, recover_worker_leftovers
from .schema import audits
from .thresholds import MANUAL, Thresholds, format_duration, parse_duration, validate_heartbeat_interval

log = logging.getLogger("auditctl")

#: Emergency minimal writes: how many tries, and the first backoff (doubled each try, with jitter).
EMERGENCY_TRIES = 4
EMERGENCY_BACKOFF = 0.05


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
        self._fields = {"step": None, "percentage": 0.0, "completed_tasks": None, "total_tasks": None}
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.lost:
            raise LeaseLost(self.audit_id)

    def _mark_lost(self, error: LeaseLost) -> LeaseLost:
        self.lost = True
        log.warning("⛔ LEASE LOST on audit %s: it was recovered or reset; this worker stops writing to it", self.audit_id)
        return error

    def update_progress(self, step: str | None = None, percentage: float | None = None,
                        completed_tasks: int | None = None, total_tasks: int | None = None, **extra) -> bool:
        """Report progress; fields left out keep their last value.

        Returns True when the full document was stored, False when only the emergency
        minimal write (or nothing, with the database down) got through. Raises LeaseLost.
        """
        with self._lock:
            self._check()
            try:
                fields = dict(self._fields)
                for name, value in (("step", step), ("completed_tasks", completed_tasks), ("total_tasks", total_tasks)):
                    if value is not None:
                        fields[name] = value
                if percentage is not None:
                    fields["percentage"] = percentage
                fields = _sanitised(fields)
                if percentage is None and (completed_tasks is not None or total_tasks is not None):
                    fields["percentage"] = derive_percentage(None, fields["completed_tasks"], fields["total_tasks"])
                self.document = leases.write_progress(
                    self.guard.engine, self.lease, fields,
                    signature(fields["step"], fields["percentage"], fields["completed_tasks"], fields["total_tasks"]),
                    extra or None, self.guard.actor,
                )
                self._fields = fields
                return True
            except LeaseLost as error:
                raise self._mark_lost(error) from None
            except Exception as error:  # noqa: BLE001 - a bad report or failed write must not kill the audit
                self._emergency(error)
                return False

    def _emergency(self, error: BaseException) -> None:
        log.warning("🚨 Emergency progress recovery for audit %s: progress write failed (%s); writing heartbeat only",
                    self.audit_id, error)
        delay = EMERGENCY_BACKOFF
        for attempt in range(1, EMERGENCY_TRIES + 1):
            try:
                leases.minimal_write(self.guard.engine, self.lease, self.guard.actor)
                self.emergency_writes += 1
                return
            except LeaseLost as lost:
                raise self._mark_lost(lost) from None
            except Exception as again:  # noqa: BLE001
                if attempt == EMERGENCY_TRIES:
                    log.error("🚨 Emergency progress recovery for audit %s failed %d times (%s); the heartbeat thread keeps trying",
                              self.audit_id, attempt, again)
                    return
                time.sleep(delay * (0.5 + random.random()))
                delay *= 2

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the heartbeat thread does this on its own). Raises LeaseLost."""
        with self._lock:
            if self.finished:
                return  # the heartbeat thread raced the end of the run: nothing left to beat
            self._check()
            try:
                self.document = leases.heartbeat(self.guard.engine, self.lease, self.document, self.guard.actor)
            except LeaseLost as error:
                raise self._mark_lost(error) from None


def _sanitised(fields: dict) -> dict:
    """Clamp what a worker reports into what the document promises (0..100, counts >= 0)."""
    percentage = fields.get("percentage")
    if percentage is not None:
        try:
            percentage = float(percentage)
        except (TypeError, ValueError, OverflowError):
            percentage = None
        else:
            if percentage != percentage:
                percentage = None
            else:
                percentage = min(100.0, max(0.0, percentage))
    out = dict(fields, percentage=percentage)
    for name in ("completed_tasks", "total_tasks"):
        value = out.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            out[name] = None
    if out.get("step") is not None:
        out["step"] = str(out["step"])[:500]
    return out


class StuckAuditPrevention:
    """Keeps a worker's audits honest: cleanup on start, heartbeats, fenced writes, recovery.

    ::

        guard = StuckAuditPrevention("sqlite:///auditctl.db", worker_id="worker-1")
        guard.cleanup_stuck_audits_on_startup()
        guard.start_heartbeat_monitor()
        with guard.run(audit_id) as run:
            run.update_progress(step="Crawling", completed_tasks=3, total_tasks=20)
        guard.stop()
    """

    def __init__(
        self,
        database_url: str = DEFAULT_DATABASE_URL,
        *,
        worker_id: str | None = None,
        worker_url: str | None = None,
        heartbeat_interval: float | timedelta = 300,
        stale_after: float | timedelta = 600,
        max_age: float | timedelta = 1800,
        stall_after: float | timedelta = 600,
        requeue: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        create_schema: bool = True,
    ):
        self.thresholds = Thresholds.parse(stale_after, max_age, stall_after)
        self.heartbeat_interval = validate_heartbeat_interval(heartbeat_interval, self.thresholds)
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be a whole number of at least 1, got {max_attempts!r}")
        self.worker_id = worker_id or socket.gethostname()
        if len(self.worker_id) > 200:
            raise ConfigError("worker_id is longer than 200 characters")
        self.worker_url = worker_url
        self.instance_id = uuid.uuid4().hex
        self.requeue = requeue
        self.max_attempts = max_attempts
        self.engine = create_engine(database_url)
        self.database = mask_url(self.engine.url)
        self.actor = Actor.worker(self.worker_id, self.instance_id)
        self.monitor = Monitor(self.engine, self.thresholds, actor=self.actor, requeue=requeue, max_attempts=max_attempts)
        self.duplicates: list[registry.Instance] = []
        self._runs: dict[int, AuditRun] = {}
        self._runs_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_sigterm = None
        if create_schema:
            upgrade(self.engine)
        registry.register(self.engine, instance_id=self.instance_id, worker_id=self.worker_id,
                          worker_url=worker_url, guard=self)
        self._check_duplicates()
        log.info("✅ Stuck audit prevention system initialized: worker %s (instance %s) on %s; heartbeat every %s, "
                 "stale after %s, max age %s, stall after %s", self.worker_id, self.instance_id[:8], self.database,
                 format_duration(self.heartbeat_interval), format_duration(self.thresholds.stale_after),
                 format_duration(self.thresholds.max_age), format_duration(self.thresholds.stall_after))

    # --- the seed's API -------------------------------------------------------------

    def cleanup_stuck_audits_on_startup(self) -> list[Recovery]:
        """Recover what earlier instances of this worker left running, then every stuck audit."""
        live = {self.instance_id} | {peer.instance_id for peer in self._check_duplicates()}
        leftovers = recover_worker_leftovers(self.engine, self.worker_id, live, actor=self.actor,
                                             requeue=self.requeue, max_attempts=self.max_attempts)
        for recovery in leftovers:
            log.warning("🧹 STARTUP CLEANUP: audit %s (%s) was left running by an earlier instance of %s; now %s",
                        recovery.id, recovery.target, self.worker_id, recovery.status)
        stuck = self._heartbeat_cleanup(marker="🧹 STARTUP CLEANUP")
        log.info("🧹 STARTUP CLEANUP: %d left by earlier instances, %d stuck audits recovered", len(leftovers), len(stuck))
        return leftovers + stuck

    def start_heartbeat_monitor(self, *, handle_sigterm: bool = True) -> None:
        """Start the background thread; on the main thread, also stop cleanly on SIGTERM.

        SIGTERM raises ``SystemExit(143)`` in the main thread (so ``run`` blocks unwind and
        record their end); ``stop()`` then runs as the process exits, which joins the thread
        and marks the instance stopped, unless the application called it first.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"auditctl-heartbeat-{self.worker_id}", daemon=True)
        self._thread.start()
        # At exit, not inside the signal handler: the interrupted main thread may hold a
        # write transaction (on SQLite, the write lock) that is only released as it unwinds.
        atexit.register(self._stop_at_exit)
        if (handle_sigterm and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) != self._on_sigterm):
            # Chain to whatever was there, never to ourselves (a restart after a stop() made
            # off the main thread would otherwise make the handler call itself).
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        log.info("💓 HEARTBEAT monitor started: every %s", format_duration(self.heartbeat_interval))

    def _heartbeat_cleanup(self, marker: str = "💓 HEARTBEAT") -> list[Recovery]:
        """One monitor pass over the whole fleet: recover every stuck audit."""
        result = self.monitor.run_pass()
        if not result.ok:
            log.error("%s: cannot reach the database (%s); will retry", marker, result.error)
            return []
        if result.resumed_after_outage:
            log.warning("%s: database reachable again; silence is measured from now on, not across the outage", marker)
        for recovery in result.recovered:
            log.warning("%s: recovered audit %s (%s): %s -> %s; %s", marker, recovery.id, recovery.target,
                        ", ".join(recovery.reasons), recovery.status, "; ".join(recovery.explanation))
        return result.recovered

    def _recover_stuck_audit(self, audit_id: int, reason: str = MANUAL, explanation: str | None = None) -> Recovery | None:
        """Recover one running audit now, whatever the rules say. Returns None when it was not running."""
        done = recover_audits(self.engine, audits.c.id == audit_id, reason=reason,
                              explanation=explanation or f"recovered by {self.actor.name}", actor=self.actor,
                              requeue=self.requeue, max_attempts=self.max_attempts)
        return done[0] if done else None

    # --- audits -----------------------------------------------------------------------

    def create_audit(self, target: str, max_age: float | timedelta | None = None) -> int:
        """A new pending audit; ``max_age`` gives it its own deadline."""
        deadline = parse_duration(max_age, "max_age") if max_age is not None else None
        return leases.create_audit(self.engine, target, max_age=deadline)

    @contextlib.contextmanager
    def run(self, audit_id: int) -> Iterator[AuditRun]:
        """Claim a pending audit; completed when the block exits, failed when it raises.

        After ``LeaseLost`` nothing more is written: the exception leaves the block and the
        audit stays as its recoverer left it.
        """
        lease, document = leases.claim(self.engine, audit_id, worker_id=self.worker_id, instance_id=self.instance_id,
                                       worker_url=self.worker_url)
        handle = AuditRun(self, lease, document)
        with self._runs_lock:
            self._runs[audit_id] = handle
        try:
            try:
                yield handle
            except LeaseLost as lost:
                if lost.audit_id == audit_id:
                    handle.lost = True
                    raise
                # Another audit's lease (a nested run): this one still ends as failed.
                if not handle.lost:
                    self._finish(handle, f"{type(lost).__name__}: {lost}"[:2000])
                raise
            except BaseException as error:
                if not handle.lost:
                    self._finish(handle, f"{type(error).__name__}: {error}"[:2000])
                raise
            if handle.lost:
                raise LeaseLost(audit_id, f"lease lost on audit {audit_id} while it ran: the result was not written")
            self._finish(handle, None)
        finally:
            with self._runs_lock:
                self._runs.pop(audit_id, None)

    def _finish(self, handle: AuditRun, error: str | None) -> None:
        delay = EMERGENCY_BACKOFF
        deadline = time.monotonic() + min(60.0, self.thresholds.stale_after / 2)
        while True:
            with handle._lock:
                try:
                    leases.finish(self.engine, handle.lease, handle.document, error=error, actor=self.actor)
                    handle.finished = True
                    return
                except LeaseLost as lost:
                    raise handle._mark_lost(lost) from None
                except AuditctlError as trouble:
                    if time.monotonic() >= deadline:
                        raise
                    log.warning("🚨 Emergency progress recovery: cannot record the end of audit %s yet (%s); retrying",
                                handle.audit_id, trouble)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    # --- lifecycle --------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """Stop the heartbeat thread (joins it) and mark this instance stopped."""
        atexit.unregister(self._stop_at_exit)
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == self._on_sigterm):
            # Only put back what we replaced, and only if nobody (another guard) replaced us since.
            signal.signal(signal.SIGTERM, self._previous_sigterm if self._previous_sigterm is not None else signal.SIG_DFL)
            self._previous_sigterm = None
        try:
            registry.mark_stopped(self.engine, self.instance_id)
        except AuditctlError as error:
            log.warning("could not mark worker instance %s stopped: %s", self.instance_id[:8], error)
        log.info("💓 HEARTBEAT monitor stopped for worker %s", self.worker_id)

    def _stop_at_exit(self) -> None:
        self.stop(timeout=10.0)

    def close(self) -> None:
        self.stop()
        self.engine.dispose()

    def __enter__(self) -> "StuckAuditPrevention":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_sigterm(self, signum, frame) -> None:
        log.info("💓 HEARTBEAT: SIGTERM received; stopping the monitor")
        self._stop.set()
        previous = self._previous_sigterm
        if callable(previous) and previous != self._on_sigterm:
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    # --- the heartbeat thread -----------------------------------------------------------

    def _check_duplicates(self) -> list[registry.Instance]:
        peers = registry.live_peers(self.engine, self.worker_id, self.instance_id, self.thresholds.stale_after)
        fresh = {p.instance_id for p in peers} - {p.instance_id for p in self.duplicates}
        for peer in peers:
            if peer.instance_id in fresh:
                log.error("⚠️ worker_id %r is also used by a live instance %s on host %s (pid %s); "
                          "its audits are left alone, but give each worker its own worker_id",
                          self.worker_id, peer.instance_id[:8], peer.host, peer.pid)
        self.duplicates = peers
        return peers

    def _beat_once(self) -> bool:
        """Heartbeat this instance and each of its runs, then a monitor pass. True when the database answered."""
        try:
            registry.beat(self.engine, self.instance_id)
        except AuditctlError as error:
            log.error("💓 HEARTBEAT: database unavailable (%s); retrying", error)
            self.monitor.in_outage = True
            return False
        with self._runs_lock:
            runs = list(self._runs.values())
        healthy = True
        for handle in runs:
            if handle.lost:
                continue
            try:
                handle.heartbeat()
            except LeaseLost:
                continue
            except Exception as error:  # noqa: BLE001 - the thread must outlive any single failure
                healthy = False
                log.error("💓 HEARTBEAT: could not beat for audit %s (%s); retrying", handle.audit_id, error)
        try:
            self._check_duplicates()
        except AuditctlError:
            healthy = False
        recovered = self._heartbeat_cleanup()
        log.debug("💓 HEARTBEAT: %d audits beating, %d recovered", len(runs), len(recovered))
        return healthy and not self.monitor.in_outage

    def _heartbeat_loop(self) -> None:
        retry = 1.0
        while not self._stop.is_set():
            try:
                healthy = self._beat_once()
            except Exception:  # noqa: BLE001
                log.exception("💓 HEARTBEAT: unexpected error; the monitor keeps running")
                healthy = False
            if healthy:
                retry = 1.0
                wait = self.heartbeat_interval
            else:
                # Come back soon after the database does, without hammering it.
                wait = min(self.heartbeat_interval, retry * (0.5 + random.random()))
                retry = min(retry * 2, 30.0)
            self._stop.wait(wait)

    @property
    def active_audits(self) -> list[int]:
        with self._runs_lock:
            return sorted(self._runs)
