"""Prometheus metrics: the library's figures as metric families, for ``watch --metrics-port`` and the textfile.

The figures are read from the database at each scrape (``report.fleet_figures``), by a
custom collector: nothing is counted in memory, so every replica of ``watch`` serves the
same totals and a restarted one loses nothing. Counters (``_total``) are counts of the
history table. Only the monitor pass duration and the pass count are this process's own.

Metrics (all prefixed ``auditctl_``):

==========================================  =========  ==================================================
``database_up``                             gauge      1 when the last scrape could read the database
``audits{status}``                          gauge      audits in each state
``stuck_audits{reason}``                    gauge      running audits stuck now, per reason (one audit may
                                                       count under two reasons)
``recoveries_total{outcome}``               counter    recoveries in the history: ``failed`` or ``requeued``
``recovery_reasons_total{reason}``          counter    recoveries per reason
``resets_total``                            counter    audits reset to pending by an operator
``lease_lost_total``                        counter    late writes refused because the audit was taken away
``needs_operator_total``                    counter    recoveries the database refused (see ``needs_operator``)
``detection_latency_seconds``               histogram  last heartbeat to recovery, per recovery in the history
``workers{state}``                          gauge      worker instances ``alive`` and not (``gone``: proven gone or silent;
                                                       an unreadable registry row counts as neither)
``oldest_heartbeat_age_seconds``            gauge      silence of the least recently heard running audit (0: none)
``notification_backlog``                    gauge      unexpired notification events not yet delivered
``notification_backlog_oldest_age_seconds`` gauge      age of the oldest undelivered event (0: none)
``monitor_pass_duration_seconds``           histogram  this process's monitor passes (``watch``, ``recover``)
``monitor_passes_total{result}``            counter    this process's passes, ``ok`` or ``error``
``scrape_duration_seconds``                 gauge      time this scrape spent reading the database
==========================================  =========  ==================================================
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest, start_http_server, write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from .errors import AuditctlError
from .statuses import STATUSES
from .thresholds import RECOVERY_REASONS, Policy

log = logging.getLogger("auditctl.metrics")

PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Longest a scrape waits for the database before it answers ``auditctl_database_up 0``: under
#: Prometheus's default ``scrape_timeout`` (10 s). A PostgreSQL server that stopped answering holds a
#: read for its whole deadline (a connection attempt 10 s, a query about a minute).
SCRAPE_DEADLINE = 8.0


class MetricsUnavailable(AuditctlError):
    """The metrics cannot be served or written (port in use, directory missing)."""


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def families(figures) -> list:
    """The metric families for one reading of ``report.FleetFigures``."""
    out = []
    audits = GaugeMetricFamily("auditctl_audits", "Audits in each state (other: a status auditctl does not know).",
                               labels=["status"])
    for status, count in sorted(_folded(figures.by_status, STATUSES).items()):
        audits.add_metric([status], count)
    out.append(audits)
    stuck = GaugeMetricFamily("auditctl_stuck_audits", "Running audits stuck now, per reason (an audit may have two).",
                              labels=["reason"])
    for reason, count in figures.stuck_by_reason.items():
        stuck.add_metric([reason], count)
    out.append(stuck)
    history = figures.history
    recoveries = CounterMetricFamily("auditctl_recoveries", "Stuck audits recovered, from the history.", labels=["outcome"])
    for outcome, count in history.recoveries.items():
        recoveries.add_metric([outcome], count)
    out.append(recoveries)
    reasons = CounterMetricFamily("auditctl_recovery_reasons", "Recoveries per reason, from the history "
                                  "(other: a reason another tool wrote).", labels=["reason"])
    for reason, count in _folded(history.reasons, RECOVERY_REASONS).items():
        reasons.add_metric([reason], count)
    out.append(reasons)
    out.append(CounterMetricFamily("auditctl_resets", "Audits reset to pending by an operator, from the history.",
                                   value=history.resets))
    out.append(CounterMetricFamily("auditctl_lease_lost", "Worker writes refused after their audit was recovered or reset.",
                                   value=history.lease_lost))
    out.append(CounterMetricFamily("auditctl_needs_operator", "Recoveries the database refused: an operator must look.",
                                   value=history.needs_operator))
    detection = history.detection
    buckets = [(_bound(b), c) for b, c in zip(detection.bounds, detection.cumulative)] + [("+Inf", detection.count)]
    out.append(HistogramMetricFamily("auditctl_detection_latency_seconds",
                                     "Time from an audit's last heartbeat to its recovery, from the history.",
                                     buckets=buckets, sum_value=detection.sum))
    workers = GaugeMetricFamily("auditctl_workers", "Worker instances alive and gone (gone within 24h or holding audits).",
                                labels=["state"])
    workers.add_metric(["alive"], figures.workers_alive)
    workers.add_metric(["gone"], figures.workers_gone)
    out.append(workers)
    out.append(GaugeMetricFamily("auditctl_oldest_heartbeat_age_seconds",
                                 "Seconds since the least recently heard running audit was heard from (0: none running).",
                                 value=figures.oldest_heartbeat_age_seconds or 0.0))
    if figures.notifications is not None:
        out.append(GaugeMetricFamily("auditctl_notification_backlog",
                                     "Unexpired notification events not yet delivered (as auditctl notify --status counts).",
                                     value=figures.notifications.count))
        out.append(GaugeMetricFamily("auditctl_notification_backlog_oldest_age_seconds",
                                     "Age of the oldest undelivered notification event (0: none).",
                                     value=figures.notifications.oldest_age_seconds or 0.0))
    return out


def _folded(counts: dict, known) -> dict:
    """Counts per label value, with every value auditctl does not know added up under ``other``.

    Another tool may write any status or reason: shown as they are, each would be a new time
    series, and its escape sequences would reach whoever reads the exposition in a terminal.
    """
    folded: dict[str, int] = {}
    for value, count in counts.items():
        label = value if value in known else "other"
        folded[label] = folded.get(label, 0) + count
    return folded


class FleetCollector:
    """Reads the fleet's figures at scrape time. A database that cannot be read, or gives no answer
    within ``deadline`` seconds, gives ``auditctl_database_up 0`` and nothing else from the database,
    never a failed scrape.

    ``engine`` is an engine, or a function that returns one, called at each scrape: making the
    engine can fail too (a SQLite file that is not there), and that must be a scrape saying
    ``database_up 0``, not a command that ends before it writes its textfile."""

    def __init__(self, engine, policy: Policy | None = None, deadline: float = SCRAPE_DEADLINE):
        self.engine = engine
        self.policy = Policy.coerce(policy)
        self.deadline = deadline
        # Overlapping scrapes (two Prometheus servers) share the read in flight instead of doubling the load.
        self.lock = threading.Lock()
        #: The read in flight: (done, outcome); a scrape that gave up on it leaves it to finish on its own.
        self._reading: tuple[threading.Event, dict] | None = None
        #: The failure last logged: the same one again is not logged at every scrape of an outage.
        self.reported: str | None = None
        #: Set when the command already said why the database cannot be read (its one error line).
        self.muted = False

    def describe(self):
        return []  # families are known only when read; registering must not query the database

    def collect(self):
        from .report import fleet_figures

        started = time.perf_counter()
        done, outcome = self._read(fleet_figures)
        if not done.wait(self.deadline):
            # The read goes on in its thread (to its own deadline) and the next scrape waits on it in
            # turn: the answer is due now, before Prometheus gives up on the whole scrape.
            outcome = {"error": f"no answer within {self.deadline:g}s"}
        error = outcome.get("error")
        if isinstance(error, BaseException) and not isinstance(error, (AuditctlError, SQLAlchemyError)):
            raise error
        with self.lock:  # overlapping scrapes: one warning per failure, as before
            if error is None:
                out, up = families(outcome["figures"]), 1
                self.reported = None
            else:
                if str(error) != self.reported and not self.muted:
                    log.warning("metrics: cannot read the database: %s", error)
                self.reported = str(error)
                out, up = [], 0
        elapsed = time.perf_counter() - started
        yield from out
        yield GaugeMetricFamily("auditctl_database_up", "1 when this scrape could read the database.", value=up)
        yield GaugeMetricFamily("auditctl_scrape_duration_seconds", "Time this scrape spent reading the database.",
                                value=round(elapsed, 6))

    def _read(self, fleet_figures) -> tuple[threading.Event, dict]:
        """The read in flight, or a new one in its own thread: ``outcome`` gets ``figures`` or ``error``."""
        with self.lock:
            if self._reading is not None and not self._reading[0].is_set():
                return self._reading
            done, outcome = threading.Event(), {}

            def read():
                try:
                    engine = self.engine() if callable(self.engine) else self.engine
                    outcome["figures"] = fleet_figures(engine, self.policy)
                except BaseException as error:  # noqa: BLE001 - the scrape decides what to make of it
                    outcome["error"] = error
                finally:
                    done.set()

            self._reading = (done, outcome)
            threading.Thread(target=read, name="auditctl-metrics-read", daemon=True).start()
            return self._reading


class Metrics:
    """The registry of one process: the fleet collector and this process's pass figures."""

    def __init__(self, engine, policy: Policy | None = None):
        # The ``_created`` series say when this process made its counters: noise in a textfile that
        # a cron job rewrites, and not what anyone alerts on.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.fleet = FleetCollector(engine, policy)
        self.registry.register(self.fleet)
        self.pass_duration = Histogram("auditctl_monitor_pass_duration_seconds",
                                       "Duration of this process's monitor passes (judge and recover).",
                                       buckets=PASS_BUCKETS, registry=self.registry)
        self.passes = Counter("auditctl_monitor_passes", "This process's monitor passes, by result.", ["result"],
                              registry=self.registry)
        for result in ("ok", "error"):
            self.passes.labels(result)
        self.server = None
        self.thread = None

    def observe_pass(self, seconds: float, ok: bool) -> None:
        self.pass_duration.observe(seconds)
        self.passes.labels("ok" if ok else "error").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on a background thread; returns the address bound (port 0: one the OS chose)."""
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise MetricsUnavailable(f"cannot serve metrics on {_address(host, port)}: "
                                     f"{error.strerror or error}") from None
        bound = self.server.server_address
        return bound[0], bound[1]

    def write_textfile(self, path: str) -> None:
        """Write the textfile atomically: a temporary file beside it, then a rename (node_exporter never
        reads half a file, and ignores the temporary one: its name does not end in ``.prom``)."""
        try:
            write_to_textfile(path, self.registry)
        except OSError as error:
            raise MetricsUnavailable(f"cannot write the metrics file {path}: {error.strerror or error}") from None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["FleetCollector", "Metrics", "MetricsUnavailable", "PASS_BUCKETS", "families"]
