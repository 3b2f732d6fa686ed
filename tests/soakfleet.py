"""One process of the soak's simulated fleet: --workers worker threads, each its own guard.

Each worker runs audits back to back, and each audit gets a fate:

* ``healthy``: a few steps of 0.2-1 s, then completed;
* ``slow``: one step takes up to half of stall_after (legitimately slow: must not be recovered);
* ``hang``: progress stops for twice stall_after while heartbeats go on (must be recovered
  as progress_stalled; the worker then gets LeaseLost);
* ``crash``: the worker dies mid-audit: its heartbeats stop and it never writes again (must be
  recovered as stale_heartbeat); a replacement worker takes its slot.

Every audit and every fate is written as a JSON line to --log, with wall-clock times, for
the soak's analysis. The driver adds whole-process faults (SIGKILL, SIGSTOP) on top.
"""

import argparse
import json
import os
import random
import sys
import threading
import time

from auditctl import LeaseLost, StuckAuditPrevention
from auditctl.errors import DatabaseUnavailable

FATES = (("healthy", 0.80), ("slow", 0.08), ("hang", 0.06), ("crash", 0.06))


class Log:
    def __init__(self, path):
        self.handle = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, **record):
        record.setdefault("t", time.time())
        record.setdefault("pid", os.getpid())
        with self.lock:
            self.handle.write(json.dumps(record) + "\n")


def worker(args, worker_id, log, stop_at):
    rng = random.Random(f"{worker_id}-{os.getpid()}")
    guard = StuckAuditPrevention(args.url, worker_id=worker_id, heartbeat_interval=args.heartbeat,
                                 stale_after=args.stale_after, max_age=args.max_age, stall_after=args.stall_after,
                                 create_schema=False)
    for recovery in guard.cleanup_stuck_audits_on_startup():
        log.write(event="startup_recovered", audit=recovery.id, worker=worker_id)
    guard.start_heartbeat_monitor(handle_sigterm=False)
    while time.time() < stop_at:
        fate = rng.choices([f for f, _ in FATES], [w for _, w in FATES])[0]
        audit_id = None
        try:
            audit_id = guard.create_audit(f"https://{worker_id}.soak.example.com/{rng.randrange(10**6)}")
            log.write(event="audit", audit=audit_id, worker=worker_id, fate=fate)
            with guard.run(audit_id) as run:
                steps = rng.randrange(3, 8)
                for step in range(steps):
                    if step == 1 and fate == "slow":
                        time.sleep(rng.uniform(0.2, 0.5) * args.stall_after)
                    elif step == 1 and fate == "hang":
                        log.write(event="hang", audit=audit_id, worker=worker_id)
                        time.sleep(2 * args.stall_after)
                    elif step == 1 and fate == "crash":
                        log.write(event="crash", audit=audit_id, worker=worker_id)
                        die(guard, run)
                        threading.Thread(target=replacement, args=(args, worker_id, log, stop_at), daemon=True).start()
                        threading.Event().wait()  # never returns: nothing more is ever written
                    else:
                        time.sleep(rng.uniform(0.2, 1.0))
                    run.update_progress(step=f"step {step}", completed_tasks=step + 1, total_tasks=steps)
            log.write(event="completed", audit=audit_id, worker=worker_id)
        except LeaseLost:
            log.write(event="lease_lost", audit=audit_id, worker=worker_id)
        except DatabaseUnavailable as error:
            # What an application does: try again. On a loaded machine a call can pass its deadline
            # (the watchdog then closes its connection); a run whose end could not be recorded is
            # left running, and recovering it is right: the soak does not count it as a healthy one.
            log.write(event="db_error", audit=audit_id, worker=worker_id, error=str(error)[:300])
            time.sleep(0.5)
    guard.close()


def die(guard, run):
    """What dying takes with it: the guard's threads stop and its connections close. (Kept open, the
    dead workers' connections filled the server's max_connections part-way through the soak, and then
    healthy workers could not beat and were recovered.) The audit's row is left exactly as it was."""
    guard._stop.set()
    guard._monitor_stop.set()
    for thread in (guard._thread, guard._monitor_thread):
        thread.join(30)
    run._connection.drop()
    guard.engine.dispose()
    guard.operator_engine.dispose()


def worker_or_record_death(args, worker_id, log, stop_at):
    """A worker thread that dies of anything but its simulated crash is recorded: the soak fails on it."""
    try:
        while True:
            try:
                return worker(args, worker_id, log, stop_at)
            except DatabaseUnavailable as error:  # starting up (registering, the startup cleanup): start again
                log.write(event="db_error", audit=None, worker=worker_id, error=str(error)[:300])
                if time.time() >= stop_at:
                    return
                time.sleep(0.5)
    except BaseException as error:
        log.write(event="died", worker=worker_id, error=f"{type(error).__name__}: {error}"[:500])
        raise


def replacement(args, worker_id, log, stop_at):
    time.sleep(1.0)
    worker_or_record_death(args, f"{worker_id}r", log, stop_at)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--heartbeat", type=float, default=2)
    parser.add_argument("--stale-after", type=float, default=6)
    parser.add_argument("--stall-after", type=float, default=8)
    parser.add_argument("--max-age", type=float, default=120)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    log = Log(args.log)
    stop_at = time.time() + args.seconds
    threads = [threading.Thread(target=worker_or_record_death, args=(args, f"p{args.index}-w{n}", log, stop_at), daemon=True)
               for n in range(args.workers)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    print("READY", flush=True)
    give_up = stop_at + 30  # a crashed worker's thread never ends, by design
    for thread in threads:
        thread.join(max(0.0, give_up - time.time()))
    os._exit(0)  # crashed workers are blocked forever by design


if __name__ == "__main__":
    sys.exit(main())
