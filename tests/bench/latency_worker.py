"""Worker processes for the detection-latency benchmark (``tests/bench/latency.py``).

    python latency_worker.py victim URL --worker-id ID --interval I --stall-after S --max-age M --target T
    python latency_worker.py fleet URL --interval I --healthy 3 --slow 2 --long 1 ...

A **victim** is one guard running one audit, reporting progress every 0.2-1 s, until the
benchmark kills it (SIGKILL) or freezes it (SIGSTOP). It prints ``READY`` and ``CLAIMED <id>``;
resumed after its audit was recovered, its next write raises ``LeaseLost`` and it prints
``LEASE_LOST <id>`` and exits.

A **fleet** process runs bystanders, one guard per thread, audits back to back, until a line
``STOP`` (or end of file) arrives on stdin:

* ``healthy``: 3-8 steps of 0.2-1 s each, then completed;
* ``slow``: one step lasts 50-80% of ``stall_after`` with no progress written, so only the
  heartbeat thread speaks for the audit: legitimately slow, within every threshold;
* ``long``: one audit for the whole run, created with its own ``max_age`` (hours) by a worker
  that declares a short ``max_age``: the audit's own deadline must win.

Every worker declares ``stale_after`` = 2 x its heartbeat interval, the tightest a worker may
declare. Targets name the role (``https://healthy.i5.latency.example/...``), which is how the
benchmark tells victims and bystanders apart in the history.

Why the fleet-wide monitor pass is switched off here: every guard's monitor thread also
judges and recovers the whole fleet every heartbeat interval, so the bystanders would recover the
victims themselves (within one of their own intervals) and the benchmark would not measure
``watch`` or ``recover``. The worker's own heartbeats and fenced writes are untouched.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import random
import signal
import sys
import threading
import time

from auditctl import LeaseLost, StuckAuditPrevention


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the benchmark dies, even while it is stopped (SIGSTOP)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def guard_for(args, worker_id: str, *, stall_after: float, max_age: float) -> StuckAuditPrevention:
    guard = StuckAuditPrevention(args.url, worker_id=worker_id, heartbeat_interval=args.interval,
                                 stale_after=2 * args.interval, stall_after=stall_after, max_age=max_age,
                                 create_schema=False)
    # See the module's docstring: the judges under test are watch and recover, not the fleet itself.
    guard._monitor_pass = lambda marker="": []  # the passes of its monitor thread
    return guard


def victim(args) -> int:
    guard = guard_for(args, args.worker_id, stall_after=args.stall_after, max_age=args.max_age)
    guard.start_heartbeat_monitor(handle_sigterm=False)
    print(f"READY {guard.instance_id}", flush=True)
    audit_id = guard.create_audit(args.target)
    rng = random.Random()
    try:
        with guard.run(audit_id) as run:
            print(f"CLAIMED {audit_id}", flush=True)
            deadline = time.monotonic() + args.seconds  # a safety net: the benchmark kills it long before
            tasks = 0
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0.2, 1.0))
                tasks += 1
                run.update_progress(step="Crawling", completed_tasks=tasks, total_tasks=tasks + 10)
        print("DONE", flush=True)
    except LeaseLost:
        print(f"LEASE_LOST {audit_id}", flush=True)
    finally:
        guard.close()
    return 0


class Fleet:
    def __init__(self, args):
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts = {"healthy": 0, "slow": 0, "long": 0, "lease_lost": 0, "errors": 0}
        self.ready = threading.Semaphore(0)

    def count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def target(self, role: str, worker_id: str, n: int) -> str:
        return f"https://{role}.i{self.args.interval:g}.latency.example/{worker_id}/{n}"

    def worker(self, role: str, worker_id: str) -> None:
        args, rng = self.args, random.Random(worker_id)
        signalled = False
        try:
            if role == "long":
                long_stall = max(30.0, 2 * args.interval)
                guard = guard_for(args, worker_id, stall_after=long_stall, max_age=max(60.0, 2 * args.interval, long_stall))
            else:
                guard = guard_for(args, worker_id, stall_after=args.stall_after, max_age=args.max_age)
            guard.start_heartbeat_monitor(handle_sigterm=False)
        except Exception as error:  # noqa: BLE001 - reported to the benchmark, which says so
            print(f"ERROR {worker_id}: {type(error).__name__}: {error}", flush=True)
            self.count("errors")
            self.ready.release()
            return
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                own_max_age = args.long_max_age if role == "long" else None
                audit_id = guard.create_audit(self.target(role, worker_id, n), max_age=own_max_age)
                try:
                    with guard.run(audit_id) as run:
                        if not signalled:
                            signalled = True
                            self.ready.release()
                        self.count(role)
                        steps = rng.randrange(3, 8)
                        step = 0
                        while True:
                            if role == "long":
                                if self.stop.wait(rng.uniform(0.2, 1.0)):
                                    break
                            elif role == "slow" and step == 1:
                                self.stop.wait(rng.uniform(0.5, 0.8) * args.stall_after)
                            else:
                                self.stop.wait(rng.uniform(0.2, 1.0))
                            step += 1
                            run.update_progress(step=f"step {step}", completed_tasks=step, total_tasks=max(steps, step + 1))
                            if role != "long" and step >= steps:
                                break
                except LeaseLost:
                    self.count("lease_lost")
                    print(f"LEASE_LOST {audit_id} {role}", flush=True)
        except Exception as error:  # noqa: BLE001
            print(f"ERROR {worker_id}: {type(error).__name__}: {error}", flush=True)
            self.count("errors")
        finally:
            if not signalled:
                self.ready.release()
            guard.close()

    def run(self) -> int:
        args = self.args
        roles = ["healthy"] * args.healthy + ["slow"] * args.slow + ["long"] * args.long
        threads = [threading.Thread(target=self.worker, args=(role, f"{role}-i{args.interval:g}-{i}"), daemon=True)
                   for i, role in enumerate(roles)]
        for thread in threads:
            thread.start()
        for _ in threads:
            self.ready.acquire()
        print("READY", flush=True)
        for line in sys.stdin:  # STOP, or end of file when the benchmark goes away
            if line.strip() == "STOP":
                break
        self.stop.set()
        for thread in threads:
            thread.join(60)
        print("COUNTS " + " ".join(f"{k}={v}" for k, v in self.counts.items()), flush=True)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("victim", "fleet"))
    parser.add_argument("url")
    parser.add_argument("--interval", type=float, required=True, help="heartbeat interval (stale_after is twice this)")
    parser.add_argument("--stall-after", type=float, required=True)
    parser.add_argument("--max-age", type=float, required=True)
    parser.add_argument("--worker-id")
    parser.add_argument("--target")
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--healthy", type=int, default=3)
    parser.add_argument("--slow", type=int, default=2)
    parser.add_argument("--long", type=int, default=1)
    parser.add_argument("--long-max-age", type=float, default=4 * 3600.0)
    args = parser.parse_args()
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    return victim(args) if args.mode == "victim" else Fleet(args).run()


if __name__ == "__main__":
    sys.exit(main())
