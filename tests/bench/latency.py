"""Detection latency: how long a dead or frozen worker's audit stays running, and what else gets hit.

    python -m tests.bench.latency                      # both engines, heartbeat 1 s, 5 s, 60 s (~11 min per engine)
    python -m tests.bench.latency --quick              # heartbeat 1 s and 5 s, fewer victims (~2.5 min per engine)
    python -m tests.bench.latency --engines sqlite --intervals 1,5 --rounds 1 --markdown latency.md

For each engine, one fleet runs for the whole benchmark: for each heartbeat interval I, healthy,
slow and long-running audits (see ``latency_worker.py``), every worker declaring
``stale_after`` = 2 x I, the tightest a worker may declare. Then, in turn, each recoverer
runs alone with NO threshold flags (the thresholds travel with each audit):

* ``watch``: ``auditctl watch --interval 1s --no-live -q``, one long-running process;
* ``cron``: a new ``auditctl recover -q`` process every 60 s on a fixed schedule, the
  finest a crontab line can do.

While a recoverer runs, victims (one worker process, one audit each) are started and, at
planned moments, killed with SIGKILL (and reaped at once, as a supervisor would) or frozen
with SIGSTOP (between two writes: a SQLite writer frozen inside its transaction holds the
whole file). Kill moments are spread evenly, with jitter, over a whole number of judge
periods, so each victim dies at a random point of the judge's schedule.

Latency is measured on the database's clock, from the signal to the recovery's history row:
the kill time is ``SELECT now()`` (SQLite: ``strftime('now')``) right after the signal took effect,
the recovery time is ``audit_events.at``, which the recoverer writes from the database's clock.
The host clock is sampled too, to show the two agree.

A recovery of anything but a victim is a false recovery. Correctness is checked and every
problem printed (every victim recovered exactly once, by the recoverer under test, for
``worker_gone`` after SIGKILL and ``stale_heartbeat`` after SIGSTOP, judged by the audit's own
``stale_after``; no bystander recovered; resumed victims get ``LeaseLost``). The exit code is 1
when there is such a problem. Timing never fails anything: bounds are printed beside the figures.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import select  # noqa: E402

from auditctl.db import create_engine  # noqa: E402
from auditctl.migrate import upgrade  # noqa: E402
from auditctl.schema import audit_events, audits  # noqa: E402
from auditctl.sqlfunctions import fetch_now  # noqa: E402
from auditctl.transactions import read_connection  # noqa: E402

from dbtools import freeze_between_writes  # noqa: E402
from pgserver import PostgresServer, unavailable_reason  # noqa: E402

WORKER = Path(__file__).with_name("latency_worker.py")
AUDITCTL = Path(sys.executable).parent / "auditctl"

#: Seconds between two planned kills (keeps the number of victims starting at once low on a small machine).
KILL_SPACING = 1.0
#: A victim is started this long before its planned kill (start-up, claim, a few progress writes).
LEAD = 8.0
#: The first kill of a phase comes this long after the recoverer started.
FIRST_KILL = 10.0
#: What a watch pass may add to its --interval, for the "over bound" count (watch waits --interval after each pass).
WATCH_PASS_ALLOWANCE = 0.5
#: Extra waiting, beyond the slowest bound, before a victim still running counts as never recovered.
GRACE = 60.0

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}
EXPECTED_REASON = {"SIGKILL": "worker_gone", "SIGSTOP": "stale_heartbeat"}
ROLES = ("healthy", "slow", "long")
TARGET = re.compile(r"https://(?P<role>[a-z]+)\.i(?P<interval>[0-9.]+)\.latency\.example/")


def stall_after(interval: float) -> float:
    """Generous: slow steps take 50-80% of it; at 60 s beats the slow step spans several beats."""
    return max(30.0, 4 * interval)


def max_age(interval: float) -> float:
    """Generous: far beyond any healthy or slow audit and any victim's detection."""
    return max(900.0, 2 * stall_after(interval))


# --- children ---------------------------------------------------------------------------------


class Child:
    """A subprocess whose stdout lines are read by a thread (so waiting for a line never blocks on a pipe)."""

    registry: ClassVar[list["Child"]] = []

    def __init__(self, args: list[str], *, env: dict, log: Path, stdin=subprocess.DEVNULL):
        self.log = log
        self.handle = open(log, "w")
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=self.handle, text=True, env=env,
                                     start_new_session=True)  # Ctrl-C reaches the benchmark only; it cleans up
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        Child.registry.append(self)

    def _pump(self):
        for line in self.proc.stdout:
            self.seen.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, prefix: str, timeout: float) -> str | None:
        """The next stdout line starting with ``prefix``; None on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)
                return None
            if line.startswith(prefix):
                return line

    def stderr_tail(self, n: int = 15) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def end(self, timeout: float = 10.0) -> None:
        """Make sure it is gone and reaped (a stopped process is resumed so it can die)."""
        if self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(self.proc.pid, sig)
                except ProcessLookupError:
                    break
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.handle.close()

    @classmethod
    def end_all(cls) -> None:
        for child in cls.registry:
            child.end()
        cls.registry.clear()


def child_env(url: str, workdir: Path) -> dict:
    """No AUDITCTL_* setting and no config file of the person running this: the judges get no thresholds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env.update(AUDITCTL_DATABASE_URL=url, XDG_CONFIG_HOME=str(workdir / "xdg"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


# --- plan and samples -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recoverer:
    name: str  # watch or cron
    period: float

    @property
    def label(self) -> str:
        return f"watch --interval {self.period:g}s" if self.name == "watch" else f"recover every {self.period:g}s (cron)"


@dataclass
class Victim:
    interval: float
    fault: str
    recoverer: Recoverer
    round: int
    index: int
    kill_at: float = 0.0  # planned, seconds after the phase started
    child: Child | None = None
    audit_id: int | None = None
    killed_db: datetime | None = None
    killed_host: float | None = None
    event: dict | None = None
    events: int = 0
    lease_lost: bool | None = None
    skipped: str | None = None  # why this victim is left out of the figures

    @property
    def worker_id(self) -> str:
        return f"victim-i{self.interval:g}-{self.fault.lower()}-{self.recoverer.name}-r{self.round}-{self.index}"

    @property
    def target(self) -> str:
        return f"https://victim.i{self.interval:g}.latency.example/{self.worker_id}"

    @property
    def latency(self) -> float | None:
        if self.event is None or self.killed_db is None:
            return None
        return (self.event["at"] - self.killed_db).total_seconds()

    def bound(self) -> float:
        return self.recoverer.period + (2 * self.interval if self.fault == "SIGSTOP" else 0.0)


def plan(intervals, faults, recoverer: Recoverer, victims_each: int, round_: int, rng: random.Random) -> list[Victim]:
    """Kill moments spread evenly over a whole number of judge periods, with jitter inside each slot."""
    cells = sorted(((i, f) for i in intervals for f in faults), key=lambda c: -(2 * c[0] if c[1] == "SIGSTOP" else 0))
    total = len(cells) * victims_each
    span = recoverer.period * max(1, math.ceil(total * KILL_SPACING / recoverer.period))
    slot = span / total
    if victims_each * slot >= recoverer.period:
        # Each cell's block of slots covers a judge period: the slowest cells first, so the phase ends sooner.
        order = [(c, k) for c in cells for k in range(victims_each)]
    else:
        # Interleave the cells, so each one's kills spread over the whole (single) period.
        order = [(c, k) for k in range(victims_each) for c in cells]
    found = []
    for position, ((interval, fault), k) in enumerate(order):
        victim = Victim(interval, fault, recoverer, round_, k)
        victim.kill_at = FIRST_KILL + (position + rng.random()) * slot
        found.append(victim)
    return found


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (``statistics.quantiles``, inclusive)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if abs(value) < 10 else f"{value:.1f} s"


# --- one engine ---------------------------------------------------------------------------------


class Run:
    def __init__(self, engine_name: str, args, workdir: Path, rng: random.Random):
        self.engine_name, self.args, self.rng = engine_name, args, rng
        self.workdir = workdir / engine_name
        (self.workdir / "logs").mkdir(parents=True)
        (self.workdir / "xdg").mkdir()
        self.server = None
        self.victims: list[Victim] = []
        self.fleet: dict[float, Child] = {}
        self.fleet_counts: dict[float, str] = {}
        self.phases: list[dict] = []  # recoverer, start and end on the database's clock
        self.problems: list[str] = []
        self.loads: list[float] = []
        self.clock_gap = 0.0  # largest |database clock - host clock| seen at a kill
        self.cron_runs: list[tuple[float, int, str]] = []
        self.started = time.monotonic()
        self.version = ""

    # setup and teardown

    def open(self) -> None:
        if self.engine_name == "sqlite":
            self.url = f"sqlite:///{self.workdir / 'latency.db'}"
            self.version = f"SQLite {sqlite3.sqlite_version}"
        else:
            # In the system temp dir: as root the server runs as postgres, which cannot enter ours (0700).
            self.server = PostgresServer(settings={"max_connections": "500"})
            self.server.start()
            self.url = self.server.url
        self.engine = create_engine(self.url, role="operator")
        upgrade(self.engine)
        if self.server is not None:
            with read_connection(self.engine) as connection:
                self.version = "PostgreSQL " + connection.exec_driver_sql("SHOW server_version").scalar().split()[0]
        self.env = child_env(self.url, self.workdir)

    def close(self) -> None:
        Child.end_all()
        try:
            self.engine.dispose()
        except Exception:  # noqa: BLE001
            pass
        if self.server is not None:
            self.server.cleanup()

    def spawn(self, name: str, *args, stdin=subprocess.DEVNULL) -> Child:
        return Child([sys.executable, str(WORKER), *map(str, args)], env=self.env, log=self.workdir / "logs" / f"{name}.log",
                     stdin=stdin)

    def start_fleet(self) -> None:
        for interval in self.args.intervals:
            child = self.spawn(f"fleet-i{interval:g}", "fleet", self.url, "--interval", interval,
                               "--stall-after", stall_after(interval), "--max-age", max_age(interval),
                               "--healthy", self.args.healthy, "--slow", self.args.slow, "--long", self.args.long,
                               stdin=subprocess.PIPE)
            self.fleet[interval] = child
        for interval, child in self.fleet.items():
            if child.line("READY", 180) is None:
                raise RuntimeError(f"the fleet of heartbeat {interval:g}s did not start:\n{child.stderr_tail()}")

    def stop_fleet(self) -> None:
        for child in self.fleet.values():
            try:
                child.proc.stdin.write("STOP\n")
                child.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for interval, child in self.fleet.items():
            counts = child.line("COUNTS", 120)
            self.fleet_counts[interval] = counts or "(no counts: the fleet did not stop cleanly)"
            for line in child.seen:
                if line.startswith(("ERROR", "LEASE_LOST")):
                    self.problems.append(f"fleet of heartbeat {interval:g}s: {line}")
            child.end(30)

    # the clock

    def db_now(self) -> datetime:
        with read_connection(self.engine) as connection:
            return fetch_now(connection)

    def stamp(self, victim: Victim) -> None:
        host = time.time()
        victim.killed_db = self.db_now()
        victim.killed_host = host
        self.clock_gap = max(self.clock_gap, abs(victim.killed_db.timestamp() - host))

    # recoverers

    def start_recoverer(self, recoverer: Recoverer, t0: float):
        if recoverer.name == "watch":
            watch = Child([str(AUDITCTL), "watch", "--interval", f"{recoverer.period:g}s", "--no-live", "-q"], env=self.env,
                          log=self.workdir / "logs" / f"watch-{len(self.phases)}.log")
            return watch, None
        stop = threading.Event()
        state = {"proc": None}

        def cron():
            # A fixed schedule, as cron keeps: ticks at t0 + k * period whatever each run took.
            k = 0
            while True:
                tick = t0 + k * recoverer.period
                if stop.wait(max(0.0, tick - time.monotonic())):
                    return
                began = time.monotonic()
                proc = subprocess.Popen([str(AUDITCTL), "recover", "-q"], env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
                state["proc"] = proc
                try:
                    _, err = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                state["proc"] = None
                self.cron_runs.append((time.monotonic() - began, proc.returncode, err.strip()[-500:]))
                k = max(k + 1, math.floor((time.monotonic() - t0) / recoverer.period) + 1)

        thread = threading.Thread(target=cron, daemon=True)
        thread.start()
        return None, (stop, thread, state)

    def stop_recoverer(self, watch: Child | None, cron) -> None:
        if watch is not None:
            if watch.proc.poll() is not None:
                self.problems.append(f"watch exited early ({watch.proc.returncode}):\n{watch.stderr_tail()}")
            else:
                watch.proc.send_signal(signal.SIGTERM)
                try:
                    watch.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.problems.append("watch did not stop within 30 s of SIGTERM")
            watch.end()
        if cron is not None:
            stop, thread, state = cron
            stop.set()
            thread.join(60)
            proc = state["proc"]
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    # a phase: one recoverer, victims of every interval and fault

    def kill(self, victim: Victim) -> None:
        child = victim.child
        claimed = child.line("CLAIMED", 60)
        if claimed is None:
            self.problems.append(f"{victim.worker_id} never claimed its audit:\n{child.stderr_tail()}")
            child.end()
            return
        victim.audit_id = int(claimed.split()[1])
        if victim.fault == "SIGKILL":
            os.kill(child.pid, signal.SIGKILL)
            child.proc.wait(10)  # reaped at once: an unreaped zombie still looks alive by pid and start time
        else:
            try:
                freeze_between_writes(child.proc, self.engine, victim.audit_id)
            except AssertionError as error:  # never froze outside a transaction (a very busy SQLite file)
                victim.skipped = str(error)
                self.problems.append(f"{victim.worker_id}: {error}; left out of the figures")
                child.end()
                return
        self.stamp(victim)

    def recovered(self, ids: list[int]) -> dict[int, list[dict]]:
        query = (select(audit_events).where(audit_events.c.event.in_(("recovered", "requeued")),
                                            audit_events.c.audit_id.in_(ids)).order_by(audit_events.c.id))
        found = defaultdict(list)
        with read_connection(self.engine) as connection:
            for row in connection.execute(query):
                found[row.audit_id].append(dict(row._mapping))
        return found

    def phase(self, recoverer: Recoverer, round_: int) -> None:
        victims = plan(self.args.intervals, self.args.faults, recoverer, self.args.victims, round_, self.rng)
        self.victims += victims
        print(f"  {self.engine_name}, round {round_ + 1}: {recoverer.label}, {len(victims)} victims", flush=True)
        t0 = time.monotonic()
        phase = {"recoverer": recoverer, "round": round_, "start": self.db_now()}
        watch, cron = self.start_recoverer(recoverer, t0)
        # (when, 0 = start it / 1 = kill it, which victim)
        steps = sorted([(v.kill_at - LEAD, 0, n) for n, v in enumerate(victims)]
                       + [(v.kill_at, 1, n) for n, v in enumerate(victims)])
        deadline = FIRST_KILL + max(v.kill_at for v in victims) + max(v.bound() for v in victims) + GRACE
        pending = {}  # audit id -> victim, killed and not yet seen recovered
        next_poll = 0.0
        try:
            while True:
                now = time.monotonic() - t0
                while steps and steps[0][0] <= now:
                    _, kind, n = steps.pop(0)
                    victim = victims[n]
                    if kind == 0:
                        interval = victim.interval
                        victim.child = self.spawn(victim.worker_id, "victim", self.url, "--interval", interval,
                                                  "--stall-after", stall_after(interval), "--max-age", max_age(interval),
                                                  "--worker-id", victim.worker_id, "--target", victim.target)
                    else:
                        self.kill(victim)
                        if victim.audit_id is not None:
                            pending[victim.audit_id] = victim
                    now = time.monotonic() - t0
                if now >= next_poll:
                    next_poll = now + 0.5
                    self.loads.append(os.getloadavg()[0])
                    if pending:
                        for audit_id, found in self.recovered(list(pending)).items():
                            victim = pending.pop(audit_id)
                            victim.event, victim.events = found[0], len(found)
                    if not steps and not pending:
                        break
                    if now > deadline:
                        for victim in pending.values():
                            self.problems.append(f"{victim.worker_id} (audit {victim.audit_id}, {victim.fault}, heartbeat "
                                                 f"{victim.interval:g}s) was not recovered within "
                                                 f"{deadline - victim.kill_at:.0f} s "
                                                 f"of its {victim.fault} under {recoverer.label}")
                        break
                wait = min([next_poll - now] + ([steps[0][0] - now] if steps else []))
                time.sleep(max(0.0, min(wait, 0.5)))
            if watch is not None and watch.proc.poll() is not None:
                self.problems.append(f"watch exited during the phase ({watch.proc.returncode}):\n{watch.stderr_tail()}")
        finally:
            self.stop_recoverer(watch, cron)
        phase["end"] = self.db_now()
        self.phases.append(phase)
        self.resume(victims)

    def resume(self, victims: list[Victim]) -> None:
        """Frozen victims resumed after their recovery must get LeaseLost on their next write and write nothing."""
        for victim in victims:
            if victim.fault == "SIGSTOP" and victim.child is not None and victim.child.proc.poll() is None:
                os.kill(victim.child.pid, signal.SIGCONT)
        for victim in victims:
            if victim.fault == "SIGSTOP" and victim.child is not None:
                victim.lease_lost = victim.child.line("LEASE_LOST", 30) is not None
            if victim.child is not None:
                victim.child.end()

    # the whole engine

    def execute(self) -> None:
        self.open()
        print(f"{self.engine_name}: {self.version}; starting the fleet "
              f"({self.args.healthy} healthy, {self.args.slow} slow, {self.args.long} long-running per interval)", flush=True)
        self.start_fleet()
        for round_ in range(self.args.rounds):
            for recoverer in self.args.recoverers:
                self.phase(recoverer, round_)
        self.stop_fleet()
        self.analyse()
        self.elapsed = time.monotonic() - self.started

    def analyse(self) -> None:
        with read_connection(self.engine) as connection:
            history = [dict(r._mapping) for r in connection.execute(select(audit_events).order_by(audit_events.c.id))]
            rows = [dict(r._mapping) for r in connection.execute(
                select(audits.c.id, audits.c.target, audits.c.status, audits.c.started_at, audits.c.finished_at))]
        by_id = {r["id"]: r for r in rows}
        victim_ids = {v.audit_id: v for v in self.victims if v.audit_id is not None}
        # Bystanders: what ran, and anything that recovered one of them.
        self.bystanders = Counter()
        self.long_runs: dict[float, float] = {}
        self.false = Counter()  # (interval, recoverer name, role) -> recoveries
        for row in rows:
            match = TARGET.match(row["target"] or "")
            if not match or match["role"] == "victim":
                continue
            interval, role = float(match["interval"]), match["role"]
            self.bystanders[(interval, role)] += 1
            if row["status"] != "completed":
                self.problems.append(f"bystander audit {row['id']} ({role}, heartbeat {interval:g}s) ended {row['status']}")
            if role == "long" and row["started_at"] and row["finished_at"]:
                self.long_runs[interval] = max(self.long_runs.get(interval, 0.0),
                                               (row["finished_at"] - row["started_at"]).total_seconds())
        for event in history:
            if event["event"] not in ("recovered", "requeued", "lease_lost"):
                continue
            audit_id = event["audit_id"]
            if audit_id in victim_ids:
                continue
            match = TARGET.match(by_id.get(audit_id, {}).get("target") or "")
            if not match:
                self.problems.append(f"history row for an unknown audit {audit_id}: {event['event']}")
                continue
            if match["role"] == "victim":
                continue  # a victim left out of the figures (reported where it was left out)
            interval, role = float(match["interval"]), match["role"]
            if event["event"] == "lease_lost":
                self.problems.append(f"bystander audit {audit_id} ({role}) had a late write rejected (lease_lost)")
                continue
            recoverer = "watch" if "watch" in event["actor"] else "cron" if "recover" in event["actor"] else event["actor"]
            self.false[(interval, recoverer, role)] += 1
            self.problems.append(f"FALSE RECOVERY: {role} audit {audit_id} (heartbeat {interval:g}s) recovered by "
                                 f"{event['actor']} for {event['reasons']}: {(event['details'] or {}).get('explanation')}")
        # Victims: recovered once, by the recoverer under test, for the expected reason, by their own thresholds.
        expected_actor = {"watch": "auditctl watch", "cron": "auditctl recover"}
        for victim in self.victims:
            if victim.audit_id is None or victim.event is None or victim.skipped:
                continue  # already reported
            event, name = victim.event, victim.worker_id
            every = [e for e in history if e["audit_id"] == victim.audit_id and e["event"] in ("recovered", "requeued")]
            if len(every) != 1:
                self.problems.append(f"{name}: recovered {len(every)} times")
            if event["actor"] != expected_actor[victim.recoverer.name]:
                self.problems.append(f"{name}: recovered by {event['actor']}, not by the recoverer under test")
            reasons = (event["reasons"] or "").split(",")
            # A worker dead for longer than its stale_after is also silent: worker_gone may come with
            # stale_heartbeat. A frozen worker's process exists, so it must never be called gone.
            if EXPECTED_REASON[victim.fault] not in reasons or (victim.fault == "SIGSTOP" and "worker_gone" in reasons):
                self.problems.append(f"{name}: reason {event['reasons']}, expected {EXPECTED_REASON[victim.fault]}")
            source = (((event["details"] or {}).get("thresholds") or {}).get("stale_after") or {}).get("source")
            if victim.fault == "SIGSTOP" and source != "worker":
                self.problems.append(f"{name}: judged by a stale_after from {source!r}, not the one its worker declared")
            if victim.latency is not None and victim.latency < 0:
                self.problems.append(f"{name}: recovered {-victim.latency:.2f} s BEFORE it was {victim.fault}ed")
            if victim.fault == "SIGSTOP" and victim.lease_lost is False:
                self.problems.append(f"{name}: resumed after its recovery, it did not report LeaseLost")

    # output

    def cells(self):
        groups = defaultdict(list)
        for victim in self.victims:
            if not victim.skipped:
                groups[(victim.interval, victim.fault, victim.recoverer)].append(victim)
        order = {r: n for n, r in enumerate(self.args.recoverers)}
        return sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][2]], kv[0][1]))

    def allowance(self, recoverer: Recoverer) -> float:
        if recoverer.name == "watch":
            return WATCH_PASS_ALLOWANCE
        return max((d for d, _, _ in self.cron_runs), default=0.0)

    def stats(self) -> dict:
        """(interval, fault, recoverer) -> the figures of that cell."""
        found = {}
        for (interval, fault, recoverer), victims in self.cells():
            latencies = sorted(v.latency for v in victims if v.latency is not None)
            missing = len(victims) - len(latencies)
            bound = victims[0].bound()
            over = sum(1 for x in latencies if x > bound + self.allowance(recoverer))
            note = []
            if missing:
                note.append(f"{missing} NOT RECOVERED")
            extra = Counter(v.event["reasons"] for v in victims if v.event is not None
                            and v.event["reasons"] != EXPECTED_REASON[fault])
            note += [f"{count} also {reasons.replace(EXPECTED_REASON[fault], '').strip(',')}"
                     for reasons, count in sorted(extra.items())]
            if over:
                note.append(f"{over} over bound")
            found[(interval, fault, recoverer)] = {
                "n": len(latencies),
                "median": seconds(statistics.median(latencies)) if latencies else "-",
                "p99": seconds(percentile(latencies, 99)) if latencies else "-",
                "worst": seconds(latencies[-1]) if latencies else "-",
                "bound": (f"≤ {2 * interval:g} + {recoverer.period:g} = {bound:g} s" if fault == "SIGSTOP"
                          else f"≤ {recoverer.period:g} s"),
                "false": "/".join(str(self.false[(interval, recoverer.name, role)]) for role in ROLES),
                "check": "; ".join(note) or "ok",
            }
        return found

    def table(self) -> list[list[str]]:
        return [[f"{interval:g} s / {2 * interval:g} s", fault, recoverer.label, str(c["n"]), c["median"], c["p99"],
                 c["worst"], c["bound"], c["false"], c["check"]]
                for (interval, fault, recoverer), c in self.stats().items()]

    HEADER: ClassVar[list[str]] = ["heartbeat / stale_after", "fault", "recoverer", "n", "median", "p99", "worst",
                                   "bound (+ the pass)", "false recoveries (healthy/slow/long)", "check"]

    def bystander_line(self) -> str:
        parts = []
        for interval in self.args.intervals:
            counts = ", ".join(f"{self.bystanders[(interval, role)]} {role}" for role in ROLES)
            long_run = self.long_runs.get(interval)
            declared = max(60.0, 2 * interval, max(30.0, 2 * interval))
            extra = (f"; long-running audits ran up to {long_run / 60:.1f} min against their workers' max_age of "
                     f"{declared:g} s (their own: 4 h)") if long_run else ""
            parts.append(f"heartbeat {interval:g} s: {counts}{extra}")
        return "; ".join(parts)


def render(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def combined_markdown(runs: list[Run]) -> str:
    """One Markdown table for README: a row per heartbeat, fault and recoverer, the engines side by side."""
    names = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    figures = {run.engine_name: run.stats() for run in runs}
    keys = list(dict.fromkeys(key for run in runs for key in figures[run.engine_name]))
    header = ["heartbeat / stale_after", "fault", "recoverer", "bound"]
    header += [f"{names[run.engine_name]}: median / p99 / worst (n)" for run in runs]
    header += [f"{names[run.engine_name]}: false recoveries healthy/slow/long" for run in runs]
    rows, notes = [], []
    for key in keys:
        interval, fault, recoverer = key
        cells = [figures[run.engine_name].get(key) for run in runs]
        bound = next(c["bound"] for c in cells if c)
        row = [f"{interval:g} s / {2 * interval:g} s", fault, recoverer.label, bound]
        row += [f"{c['median'].removesuffix(' s')} / {c['p99'].removesuffix(' s')} / {c['worst']} ({c['n']})" if c else "-"
                for c in cells]
        row += [c["false"] if c else "-" for c in cells]
        rows.append(row)
        for run, c in zip(runs, cells):
            if c and c["check"] != "ok":
                notes.append(f"{names[run.engine_name]}, heartbeat {interval:g} s, {fault}, {recoverer.label}: {c['check']}")
    text = render(header, rows, markdown=True)
    if notes:
        text += "\n\n" + "\n".join(f"- {note}" for note in notes)
    return text


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")


# --- the command -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--intervals", default=None, help="heartbeat intervals in seconds (default 1,5,60; --quick 1,5)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every recoverer (default 2; --quick 1)")
    parser.add_argument("--victims", type=int, default=None,
                        help="victims per interval, fault, recoverer and round (default 6; --quick 3)")
    parser.add_argument("--watch-interval", type=float, default=1.0, help="watch --interval, seconds (default 1)")
    parser.add_argument("--cron-every", type=float, default=60.0, help="seconds between two recover runs (default 60)")
    parser.add_argument("--recoverers", default="watch,cron", help="comma-separated: watch, cron")
    parser.add_argument("--faults", default="SIGKILL,SIGSTOP")
    parser.add_argument("--healthy", type=int, default=3, help="healthy workers per interval (default 3)")
    parser.add_argument("--slow", type=int, default=2, help="slow workers per interval (default 2)")
    parser.add_argument("--long", type=int, default=1, help="long-running workers per interval (default 1)")
    parser.add_argument("--quick", action="store_true", help="intervals 1,5, 3 victims, 1 round: a few minutes per engine")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown (for README)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (databases, logs)")
    args = parser.parse_args(argv)
    args.intervals = [float(x) for x in (args.intervals or ("1,5" if args.quick else "1,5,60")).split(",")]
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.victims = args.victims or (3 if args.quick else 6)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.faults = [f.strip().upper() for f in args.faults.split(",")]
    periods = {"watch": args.watch_interval, "cron": args.cron_every}
    args.recoverers = [Recoverer(name.strip(), periods[name.strip()]) for name in args.recoverers.split(",")]
    for engine in args.engines:
        if engine not in ("sqlite", "postgresql"):
            parser.error(f"unknown engine {engine!r}")
    for fault in args.faults:
        if fault not in SIGNALS:
            parser.error(f"unknown fault {fault!r}: SIGKILL or SIGSTOP")
    if min(args.intervals) < 0.5:
        parser.error("heartbeat intervals below 0.5 s are not worth measuring")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="auditctl-latency-"))
    atexit.register(Child.end_all)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    began = datetime.now(timezone.utc)
    print(f"auditctl detection latency, {began:%Y-%m-%d %H:%M} UTC, seed {seed}; intervals "
          f"{', '.join(f'{i:g} s' for i in args.intervals)}; {args.victims} victims per cell and round, "
          f"{args.rounds} round(s); recoverers: {', '.join(r.label for r in args.recoverers)}", flush=True)
    print(f"machine: {machine().replace(' at the end', ' at the start')}", flush=True)
    runs, problems = [], []
    try:
        for engine_name in args.engines:
            if engine_name == "postgresql":
                reason = unavailable_reason()
                if reason:
                    problems.append(f"postgresql skipped: {reason}")
                    print(f"postgresql: SKIPPED ({reason})", flush=True)
                    continue
            run = Run(engine_name, args, workdir, rng)
            try:
                run.execute()
            finally:
                run.close()
            runs.append(run)
    except KeyboardInterrupt:
        print("\ninterrupted: every worker, recoverer and server this run started has been stopped", flush=True)
        return 130
    finally:
        Child.end_all()
        if args.keep or problems or any(r.problems for r in runs):
            print(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    output, markdown = [], []
    load_note = ""
    for run in runs:
        loads = run.loads or [0.0]
        load_note = f"load average during the run: mean {statistics.mean(loads):.2f}, max {max(loads):.2f}"
        title = (f"{run.engine_name} ({run.version}): {run.elapsed / 60:.1f} min; {load_note}; "
                 f"database and host clocks agreed within {run.clock_gap * 1000:.0f} ms at the kills")
        output += ["", title, render(Run.HEADER, run.table()), "bystanders: " + run.bystander_line()]
        markdown += [f"- {title}. Bystanders: {run.bystander_line()}."]
        if run.cron_runs:
            durations = sorted(d for d, _, _ in run.cron_runs)
            failed = [(code, err) for _, code, err in run.cron_runs if code != 0]
            line = (f"cron: {len(durations)} recover runs, each {durations[len(durations) // 2]:.2f} s median, "
                    f"{durations[-1]:.2f} s worst (process start included)")
            output.append(line)
            markdown[-1] += f" C{line[1:]}."
            for code, err in failed[:5]:
                run.problems.append(f"cron: recover exited {code}: {err}")
        problems += [f"{run.engine_name}: {p}" for p in run.problems]
    footer = f"machine: {machine()}; finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    print("\n".join(output))
    print("\n" + footer)
    if problems:
        print(f"\nPROBLEMS ({len(problems)}):")
        for problem in problems:
            print(f"  - {problem}")
    else:
        print("\nChecks passed: every victim recovered once, by the recoverer under test, for the expected reason "
              "(worker_gone after SIGKILL, stale_heartbeat after SIGSTOP, by the worker's own stale_after); "
              "no bystander recovered; every resumed victim got LeaseLost.")
    if args.markdown:
        command = " ".join(["python -m tests.bench.latency", *(argv if argv is not None else sys.argv[1:])])
        Path(args.markdown).write_text("\n".join([f"`{command}`, {began:%Y-%m-%d}, seed {seed}. Machine: {machine()}.", "",
                                                  combined_markdown(runs), "", *markdown, ""]))
        print(f"Markdown written to {args.markdown}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
