"""Building benchmark databases fast: bulk rows written straight through the drivers.

About 1% of audits are running (a twentieth of those stuck, split over the three rules),
about 2% failed with recovery_info and a history row, the rest completed; every row
carries a realistic progress document. Rows go in with sqlite3 ``executemany`` or
PostgreSQL ``COPY`` because building a million rows through the library would make
the benchmark about its own setup.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timedelta, timezone

COLUMNS = ("id", "target", "status", "progress", "last_worker_update", "recovery_info", "error", "created_at", "started_at",
           "finished_at", "attempts", "max_age_seconds", "worker_id", "worker_instance", "lease", "heartbeat_at",
           "progress_changed_at", "progress_signature", "recovery_reasons")
EVENT_COLUMNS = ("audit_id", "at", "event", "from_status", "to_status", "reasons", "measurements", "actor", "host", "pid", "details")

STEPS = ["Resolving", "Crawling", "Fingerprinting", "Testing endpoints", "Scanning dependencies", "Report"]


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _document(step, done, total, running, heard, worker):
    stamp = _iso(heard)
    return json.dumps({"progress": {"step": step, "percentage": round(100.0 * done / total, 1), "completed_tasks": done,
                                    "total_tasks": total, "is_running": running, "last_updated": stamp, "heartbeat": stamp,
                                    "worker_id": worker, "worker_url": f"https://{worker}.workers.example.com"},
                       "last_worker_update": stamp})


def generate(size: int, *, stuck_running: int | None = None, seed: int = 7):
    """Yield (audit_row, event_row_or_None) tuples. ``stuck_running`` overrides how many running audits are stuck."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    running = max(1, size // 100)
    stuck = max(1, running // 20) if stuck_running is None else stuck_running
    running = max(running, stuck)
    failed = size // 50
    for audit_id in range(1, size + 1):
        worker = f"worker-{rng.randrange(1, 51)}"
        total = rng.randrange(10, 400)
        target = f"https://host{audit_id}.example.com/"
        event = None
        if audit_id <= running:
            kind = audit_id % 3 if audit_id <= stuck else None
            started = now - timedelta(seconds=rng.uniform(60, 1500))
            heard = now - timedelta(seconds=rng.uniform(1, 200))
            changed = heard
            if kind == 0:
                heard = changed = now - timedelta(seconds=rng.uniform(700, 1400))
            elif kind == 1:
                started = now - timedelta(seconds=rng.uniform(1900, 4000))
            elif kind == 2:
                changed = now - timedelta(seconds=rng.uniform(700, 1400))
            started = min(started, changed)
            done = rng.randrange(0, total)
            row = (audit_id, target, "running", _document(rng.choice(STEPS), done, total, True, heard, worker), heard, None, None,
                   started - timedelta(seconds=5), started, None, 1, None, worker, uuid.uuid4().hex, uuid.uuid4().hex, heard,
                   changed, json.dumps(["Crawling", round(100.0 * done / total, 1), done, total]), None)
        elif audit_id <= running + failed:
            started = now - timedelta(days=rng.uniform(1, 300))
            heard = started + timedelta(seconds=rng.uniform(60, 600))
            finished = heard + timedelta(seconds=700)
            info = json.dumps({"recovered_at": _iso(finished), "reason": "stale_heartbeat", "reasons": ["stale_heartbeat"],
                               "original_status": {"status": "running", "worker_id": worker}})
            row = (audit_id, target, "failed", _document("Crawling", 3, total, False, heard, worker), heard, info,
                   "recovered (stale_heartbeat)", started - timedelta(seconds=5), started, finished, 1, None, worker, None, None,
                   heard, heard, None, "stale_heartbeat")
            event = (audit_id, finished, "recovered", "running", "failed", "stale_heartbeat",
                     json.dumps({"silence_seconds": 700.0}), "auditctl recover", "bench-host", 1, json.dumps({}))
        else:
            started = now - timedelta(days=rng.uniform(1, 300))
            finished = started + timedelta(seconds=rng.uniform(120, 1700))
            row = (audit_id, target, "completed", _document("Report", total, total, False, finished, worker), finished, None, None,
                   started - timedelta(seconds=5), started, finished, 1, None, worker, None, None, finished, finished, None, None)
        yield row, event


def _sqlite_value(value):
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def fill_sqlite(path: str, size: int, **options) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = OFF")
    placeholders = ",".join("?" * len(COLUMNS))
    audits_sql = f"INSERT INTO audits ({','.join(COLUMNS)}) VALUES ({placeholders})"
    events_sql = f"INSERT INTO audit_events ({','.join(EVENT_COLUMNS)}) VALUES ({','.join('?' * len(EVENT_COLUMNS))})"
    batch, events = [], []
    with connection:
        for row, event in generate(size, **options):
            batch.append(tuple(_sqlite_value(v) for v in row))
            if event:
                events.append(tuple(_sqlite_value(v) for v in event))
            if len(batch) >= 20000:
                connection.executemany(audits_sql, batch)
                connection.executemany(events_sql, events)
                batch, events = [], []
        connection.executemany(audits_sql, batch)
        connection.executemany(events_sql, events)
    connection.execute("ANALYZE")
    connection.close()


def fill_postgres(dsn: str, size: int, **options) -> None:
    import psycopg

    with psycopg.connect(dsn) as connection:
        with connection.cursor() as cursor:
            with cursor.copy(f"COPY audits ({','.join(COLUMNS)}) FROM STDIN") as audits_copy:
                events = []
                for row, event in generate(size, **options):
                    audits_copy.write_row(row)
                    if event:
                        events.append(event)
            with cursor.copy(f"COPY audit_events ({','.join(EVENT_COLUMNS)}) FROM STDIN") as events_copy:
                for event in events:
                    events_copy.write_row(event)
            cursor.execute("SELECT setval(pg_get_serial_sequence('audits', 'id'), (SELECT max(id) FROM audits))")
        connection.commit()
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE audits")
        connection.execute("VACUUM ANALYZE audit_events")
