"""A real worker process for the fault tests: one guard, one audit, progress every --tick.

    python workerproc.py URL --worker-id w1 --seconds 20 [--stale-after 2 --heartbeat 0.5 ...]

Prints ``READY <instance_id>``, ``CLAIMED <audit_id>``, then at the end one of ``DONE <status>``,
``LEASE_LOST <audit_id>``, with ``EMERGENCY <n>`` (how many progress writes fell back to the
minimal write). Flushes every line so a test can follow it through a pipe.
"""

import argparse
import logging
import sys
import time

from auditctl import LeaseLost, StuckAuditPrevention


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--worker-id", default="worker-1")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tick", type=float, default=0.1)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--stale-after", type=float, default=2.0)
    parser.add_argument("--max-age", type=float, default=120.0)
    parser.add_argument("--stall-after", type=float, default=30.0)
    parser.add_argument("--audit-id", type=int, default=None, help="run this pending audit instead of creating one")
    parser.add_argument("--no-monitor", action="store_true", help="do not start the heartbeat thread")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    guard = StuckAuditPrevention(args.url, worker_id=args.worker_id, heartbeat_interval=args.heartbeat,
                                 stale_after=args.stale_after, max_age=args.max_age, stall_after=args.stall_after)
    guard.cleanup_stuck_audits_on_startup()
    if not args.no_monitor:
        guard.start_heartbeat_monitor()
    print(f"READY {guard.instance_id}", flush=True)
    audit_id = args.audit_id or guard.create_audit(f"https://{args.worker_id}.example.com")
    emergencies = 0
    try:
        with guard.run(audit_id) as run:
            print(f"CLAIMED {audit_id}", flush=True)
            deadline = time.monotonic() + args.seconds
            tasks = 0
            while time.monotonic() < deadline:
                tasks += 1
                if not run.update_progress(step="Crawling", completed_tasks=tasks, total_tasks=tasks + 10):
                    emergencies += 1
                time.sleep(args.tick)
        print(f"EMERGENCY {emergencies}", flush=True)
        print("DONE completed", flush=True)
    except LeaseLost:
        print(f"EMERGENCY {emergencies}", flush=True)
        print(f"LEASE_LOST {audit_id}", flush=True)
    finally:
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
