"""A sender in its own daemon thread, for long-running processes (``watch``, a worker's guard).

The monitor kicks it after each pass and carries on at once: a webhook that hangs holds
this thread, never the pass, the heartbeats or the screen. Between kicks it wakes when a
retry falls due (backoff, ``Retry-After``), so a failed message is retried on time even
when passes are minutes apart, and after a minute of quiet to pick up events other
processes wrote.

A destination that starts failing is logged once (WARNING, URL masked) and when it is
back (INFO), not on every retry.
"""

from __future__ import annotations

import logging
import queue
import threading

from sqlalchemy.engine import Engine

from .destinations import DEFAULT_TIMEOUT, Destination
from .sender import MORE_PAUSE, DeliveryReport, deliver

log = logging.getLogger("auditctl.notify")

#: Longest sleep between two looks at the outbox when nothing is due (seconds).
IDLE_WAKE = 60.0


class Notifier:
    def __init__(self, engine: Engine, destinations: list[Destination], *, timeout: float = DEFAULT_TIMEOUT,
                 log_failures: bool = True):
        self.engine = engine
        self.log_failures = log_failures  # False when the face reports failures itself (watch's log lines)
        self.destinations = list(destinations)
        self.timeout = timeout
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reports: "queue.Queue[DeliveryReport]" = queue.Queue(maxsize=1000)
        self._failing: set[str] = set()
        self._starting = threading.Lock()

    def start(self) -> "Notifier":
        """Start the thread unless it runs already (safe to call on every pass)."""
        with self._starting:
            if self.destinations and (self._thread is None or not self._thread.is_alive()):
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="auditctl-notify", daemon=True)
                self._thread.start()
        return self

    def kick(self) -> None:
        """Deliver soon (never blocks)."""
        self._kick.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; waits at most ``timeout`` for a delivery in flight (its claim covers the rest)."""
        self._stop.set()
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def reports(self) -> list[DeliveryReport]:
        """The reports of deliveries that did something, since the last call (for a face to print)."""
        drained = []
        while True:
            try:
                drained.append(self._reports.get_nowait())
            except queue.Empty:
                return drained

    def deliver_now(self) -> DeliveryReport:
        """One delivery in the caller's thread, bounded by the timeout (``watch --once``)."""
        report = deliver(self.engine, self.destinations, timeout=self.timeout)
        self._note(report, publish=False)
        return report

    def _note(self, report: DeliveryReport, *, publish: bool = True) -> None:
        for result in report.results:
            key = result.destination.key
            if result.failed and key not in self._failing:
                self._failing.add(key)
                log.log(logging.WARNING if self.log_failures else logging.INFO,
                        "alerts to %s are failing: %s; kept and retried", result.destination.label, result.error)
            elif result.sent and key in self._failing:
                self._failing.discard(key)
                log.info("alerts to %s are delivered again", result.destination.label)
        if publish and any(r.sent or r.failed or r.expired for r in report.results):
            try:
                self._reports.put_nowait(report)
            except queue.Full:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.clear()
            try:
                report = deliver(self.engine, self.destinations, timeout=self.timeout)
                self._note(report)
            except Exception:  # noqa: BLE001 - the thread outlives any one failure (deliver never raises anyway)
                log.exception("alert delivery failed unexpectedly; retrying")
                report = DeliveryReport()
            if report.more:
                wait = MORE_PAUSE
            elif report.next_due is not None:
                wait = min(IDLE_WAKE, max(0.1, report.next_due))
            else:
                wait = IDLE_WAKE
            self._kick.wait(wait)
