"""Benchmark databases: a realistic mix of audits, written fast through the bare drivers.

A ``Mix`` says how many running audits are stuck (spread evenly over stale_heartbeat,
max_age_exceeded and progress_stalled), how many run healthily, and how many are history
(completed, and a tenth failed: recovered by auditctl, with recovery_info and a history
row). ``Mix.of_size(n)`` is the issue's mix: 1% stuck, 2% healthy running, the rest history.

Rows look like what auditctl writes: canonical times on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``,
so the ``odd_times`` triggers leave every row at 0, which ``build`` checks), progress documents
as workers report them, leases, worker instances registered alive in ``workers`` (on other
hosts, so none can be proven gone; twenty running audits each) next to the instances they
replaced (stopped cleanly hours ago: provably gone, holding nothing), and every claimed audit
declaring its worker's heartbeat interval and no other threshold. History takes the lowest ids and the running audits the
newest, as in a real table.

The schema comes from ``auditctl.migrate.upgrade``; the rows go in with sqlite3
``executemany`` or PostgreSQL ``COPY``, then ANALYZE, because building a million rows
through the library would make the benchmark about its own setup.

Times are relative to the moment of building. A healthy audit stays healthy for about five
minutes and no stuck audit gains a second reason for about eight, so ``align`` shifts the
running audits' times forward before each measure (at most every ``ALIGN_AFTER`` seconds).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

#: The fleet thresholds every measure judges by (seconds).
STALE_AFTER, MAX_AGE, STALL_AFTER = 600.0, 1800.0, 600.0
#: Running audits per registered worker instance.
PER_INSTANCE = 20
#: Share of history that failed (and was recovered by auditctl).
FAILED_SHARE = 0.10
#: Shift the running audits' times once they are this old (seconds); see the module docstring.
ALIGN_AFTER = 90.0

REASONS = ("stale_heartbeat", "max_age_exceeded", "progress_stalled")
KINDS = ("full-scan", "quick-scan", "api-scan")
STEPS = ("Resolving", "Crawling", "Fingerprinting", "Testing endpoints", "Scanning dependencies", "Writing report")

COLUMNS = ("id", "target", "status", "kind", "progress", "last_worker_update", "recovery_info", "error", "created_at",
           "started_at", "finished_at", "attempts", "max_age_seconds", "worker_id", "worker_instance", "lease",
           "heartbeat_at", "progress_changed_at", "progress_signature", "recovery_reasons", "declared_heartbeat_interval",
           "resets", "longest_gap_seconds", "longest_stall_seconds")
TIMES = tuple(COLUMNS.index(c) for c in ("last_worker_update", "created_at", "started_at", "finished_at", "heartbeat_at",
                                         "progress_changed_at"))
EVENT_COLUMNS = ("audit_id", "at", "event", "from_status", "to_status", "reasons", "measurements", "actor", "host", "pid",
                 "details")
EVENT_TIMES = (1,)
WORKER_COLUMNS = ("instance_id", "worker_id", "worker_url", "host", "pid", "process_key", "started_at", "last_heartbeat_at",
                  "stopped_at", "heartbeat_interval", "stale_after")
WORKER_TIMES = (6, 7, 8)
#: The time columns of a running audit that ``align`` shifts.
RUNNING_TIMES = ("heartbeat_at", "last_worker_update", "started_at", "created_at", "progress_changed_at")


@dataclass(frozen=True)
class Mix:
    stuck: int
    healthy: int
    history: int
    seed: int = 7

    @classmethod
    def of_size(cls, size: int) -> "Mix":
        stuck, healthy = size // 100, size // 50
        return cls(stuck=stuck, healthy=healthy, history=size - stuck - healthy)

    @property
    def running(self) -> int:
        return self.stuck + self.healthy

    @property
    def size(self) -> int:
        return self.running + self.history

    @property
    def key(self) -> str:
        return f"s{self.stuck}_h{self.healthy}_p{self.history}"

    def per_reason(self) -> dict[str, int]:
        base, extra = divmod(self.stuck, 3)
        return {reason: base + (1 if i < extra else 0) for i, reason in enumerate(REASONS)}

    def describe(self) -> str:
        return f"{self.size:,} audits: {self.stuck:,} stuck, {self.healthy:,} healthy running, {self.history:,} history"


# --- formatting -----------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1)


def canonical(epoch: float) -> str:
    """The library's stored form on SQLite: ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC."""
    return (_EPOCH + timedelta(seconds=epoch)).isoformat(" ", "microseconds")


def iso_ms(epoch: float) -> str:
    """The progress document's form: ``2025-08-23T06:45:00.123Z``."""
    return (_EPOCH + timedelta(seconds=epoch)).isoformat("T", "milliseconds") + "Z"


def _duration(seconds: float) -> str:
    whole = int(round(seconds))
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"


def _document(rng, step, done, total, running, stamp, worker, url):
    """A progress document as ``build_document`` writes it, with the extra fields workers report.
    Written from a template (the values need no escaping): building a million rows is then quick."""
    r = rng.random
    return (f'{{"progress": {{"step": "{step}", "percentage": {round(100.0 * done / total, 1)}, "completed_tasks": {done}, '
            f'"total_tasks": {total}, "is_running": {"true" if running else "false"}, "last_updated": "{stamp}", '
            f'"heartbeat": "{stamp}", "worker_id": "{worker}", "worker_url": "{url}", '
            f'"current_url": "/api/v{1 + int(r() * 3)}/items/{int(r() * 10_000)}", '
            f'"findings": {{"high": {int(r() * 3)}, "medium": {int(r() * 9)}, "low": {int(r() * 30)}}}}}, '
            f'"last_worker_update": "{stamp}"}}')


def _signature(step, done, total):
    return f'["{step}", {round(100.0 * done / total, 1)}, {done}, {total}]'


# --- rows -----------------------------------------------------------------------------------


def generate(mix: Mix, now: float):
    """Yield ("audit", row) / ("event", row) / ("worker", row); times are epoch floats."""
    rng = random.Random(mix.seed)
    instances = []
    for k in range(max(1, -(-mix.running // PER_INSTANCE))):
        worker = f"worker-{k % 250:03d}"
        instance = uuid.UUID(int=rng.getrandbits(128)).hex
        pid = rng.randrange(100, 60_000)
        interval = rng.choice((30.0, 60.0))
        instances.append((instance, worker, f"https://{worker}.workers.example.com", interval))
        yield "worker", (instance, worker, f"https://{worker}.workers.example.com", f"bench-node-{k % 97}", pid,
                         f"bench-boot-{k % 97}:4026531836:{pid}:{rng.randrange(10_000, 9_000_000)}",
                         now - 7200.0, now - rng.uniform(0.0, 30.0), None, interval, STALE_AFTER)
        # The instance this one replaced (a deploy, a restart), stopped cleanly a few hours ago:
        # provably gone, but holding no running audit, so no audit is worker_gone.
        old_pid = rng.randrange(100, 60_000)
        stopped = now - rng.uniform(3600.0, 12 * 3600.0)
        yield "worker", (uuid.UUID(int=rng.getrandbits(128)).hex, worker, f"https://{worker}.workers.example.com",
                         f"bench-node-{k % 97}", old_pid,
                         f"bench-boot-{k % 97}:4026531836:{old_pid}:{rng.randrange(10_000, 9_000_000)}",
                         stopped - 86400.0, stopped - rng.uniform(0.0, 30.0), stopped, interval, STALE_AFTER)
    # History: the oldest ids, created over the last 300 days in id order.
    span = 300 * 86400.0
    for audit_id in range(1, mix.history + 1):
        created = now - span + span * (audit_id / max(1, mix.history)) - 3600.0 + rng.uniform(-60, 60)
        started = created + rng.uniform(1.0, 600.0)
        worker = f"worker-{int(rng.random() * 250):03d}"
        url = f"https://{worker}.workers.example.com"
        instance = uuid.UUID(int=rng.getrandbits(128)).hex
        kind = rng.choice(KINDS)
        interval = rng.choice((30.0, 60.0))
        total = 10 + int(rng.random() * 390)
        target = f"https://app{audit_id % 5000}.example.com/{kind}/{audit_id}"
        if rng.random() < FAILED_SHARE:
            heard = started + rng.uniform(60.0, 1200.0)
            finished = heard + rng.uniform(610.0, 1500.0)
            silence = finished - heard
            done = int(rng.random() * total)
            step = rng.choice(STEPS)
            document = _document(rng, step, done, total, False, iso_ms(heard), worker, url)
            reason = "stale_heartbeat"
            sentence = f"no heartbeat for {_duration(silence)} (stale_after 10m, fleet)"
            measured = {"silence_seconds": round(silence, 3), "age_seconds": round(finished - started, 3),
                        "stalled_seconds": round(silence, 3), "stale_after": STALE_AFTER, "max_age": MAX_AGE,
                        "stall_after": STALL_AFTER}
            thresholds = {n: {"seconds": v, "source": "fleet"} for n, v in
                          (("stale_after", STALE_AFTER), ("max_age", MAX_AGE), ("stall_after", STALL_AFTER))}
            actor = {"actor": "auditctl watch", "host": "ops-1", "pid": 4242}
            original = {"id": audit_id, "target": target, "status": "running", "kind": kind, "worker_id": worker,
                        "worker_instance": instance, "lease": uuid.UUID(int=rng.getrandbits(128)).hex,
                        "started_at": canonical(started), "heartbeat_at": canonical(heard),
                        "progress": json.loads(document), "attempts": 1}
            info = json.dumps({"recovered_at": iso_ms(finished), "reason": reason, "reasons": [reason],
                               "explanation": [sentence], "measured": measured, "thresholds": thresholds,
                               "recovered_by": actor, "requeued": False, "original_status": original})
            yield "audit", (audit_id, target, "failed", kind, document, heard, info, f"recovered ({reason}): {sentence}",
                            created, started, finished, 1, None, worker, instance, None, heard, heard,
                            _signature(step, done, total), reason, interval, 0,
                            interval * 1.1, 120.0)
            yield "event", (audit_id, finished, "recovered", "running", "failed", reason, json.dumps(measured),
                            "auditctl watch", "ops-1", 4242,
                            json.dumps({"from": {"status": "running", "worker_id": worker, "worker_instance": instance,
                                                 "step": step, "lease": original["lease"], "attempts": 1,
                                                 "started_at": iso_ms(started), "heartbeat_at": iso_ms(heard)},
                                        "explanation": [sentence], "thresholds": thresholds}))
        else:
            finished = started + rng.uniform(120.0, 1700.0)
            document = _document(rng, "Writing report", total, total, False, iso_ms(finished), worker, url)
            yield "audit", (audit_id, target, "completed", kind, document, finished, None, None, created, started,
                            finished, 1, None, worker, instance, None, finished, finished,
                            _signature("Writing report", total, total), None, interval, 0, interval * 1.2,
                            rng.uniform(30.0, 300.0))
    # Running: the newest ids; categories interleaved.
    categories = ["healthy"] * mix.healthy
    for reason, count in mix.per_reason().items():
        categories += [reason] * count
    rng.shuffle(categories)
    for offset, category in enumerate(categories):
        audit_id = mix.history + 1 + offset
        instance, worker, url, interval = instances[offset % len(instances)]
        # Seconds ago; margins keep each category pure for ALIGN_AFTER + a few minutes.
        if category == "healthy":
            started, heard, changed = rng.uniform(300, 900), rng.uniform(5, 120), rng.uniform(5, 250)
        elif category == "stale_heartbeat":
            started, heard = rng.uniform(1000, 1200), rng.uniform(700, 900)
            changed = heard + rng.uniform(0, 90)
        elif category == "max_age_exceeded":
            started, heard, changed = rng.uniform(2000, 4000), rng.uniform(5, 120), rng.uniform(5, 250)
        else:
            started, heard, changed = rng.uniform(1000, 1200), rng.uniform(5, 120), rng.uniform(700, 900)
        heard = min(heard, changed)  # a progress write is also a heartbeat
        kind = rng.choice(KINDS)
        total = 10 + int(rng.random() * 390)
        done = int(rng.random() * total)
        step = rng.choice(STEPS[:-1])
        target = f"https://app{audit_id % 5000}.example.com/{kind}/{audit_id}"
        yield "audit", (audit_id, target, "running", kind,
                        _document(rng, step, done, total, True, iso_ms(now - heard), worker, url), now - heard, None, None,
                        now - started - rng.uniform(1, 30), now - started, None, 1, None, worker, instance,
                        uuid.UUID(int=rng.getrandbits(128)).hex, now - heard, now - changed,
                        _signature(step, done, total), None, interval, 0,
                        interval * 1.05, started - changed if category == "healthy" else 0.0)


def _converted(row, positions, convert):
    row = list(row)
    for i in positions:
        if row[i] is not None:
            row[i] = convert(row[i])
    return row


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


# --- building -------------------------------------------------------------------------------


def fill_sqlite(path: str, mix: Mix, now: float) -> None:
    """Rows into a SQLite file whose schema ``upgrade`` created."""
    import sqlite3

    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous = OFF")
    sql = {
        "audit": f"INSERT INTO audits ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
        "event": f"INSERT INTO audit_events ({','.join(EVENT_COLUMNS)}) VALUES ({','.join('?' * len(EVENT_COLUMNS))})",
        "worker": f"INSERT INTO workers ({','.join(WORKER_COLUMNS)}) VALUES ({','.join('?' * len(WORKER_COLUMNS))})",
    }
    times = {"audit": TIMES, "event": EVENT_TIMES, "worker": WORKER_TIMES}
    batches: dict[str, list] = {"audit": [], "event": [], "worker": []}
    connection.execute("BEGIN")
    for table, row in generate(mix, now):
        batch = batches[table]
        batch.append(_converted(row, times[table], canonical))
        if len(batch) >= 20_000:
            connection.executemany(sql[table], batch)
            batch.clear()
    for table, batch in batches.items():
        if batch:
            connection.executemany(sql[table], batch)
    connection.execute("COMMIT")
    connection.execute("ANALYZE")
    odd = connection.execute("SELECT count(*) FROM audits WHERE odd_times <> 0").fetchone()[0]
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    if odd:
        raise RuntimeError(f"{odd} rows have odd_times set: the fixture wrote a time in a non-canonical form")


def fill_postgres(dsn: str, mix: Mix, now: float) -> None:
    import psycopg

    with psycopg.connect(dsn) as connection:
        with connection.cursor() as cursor:
            events, workers = [], []
            with cursor.copy(f"COPY audits ({','.join(COLUMNS)}) FROM STDIN") as copy:
                for table, row in generate(mix, now):
                    if table == "audit":
                        copy.write_row(_converted(row, TIMES, _utc))
                    elif table == "event":
                        events.append(_converted(row, EVENT_TIMES, _utc))
                    else:
                        workers.append(_converted(row, WORKER_TIMES, _utc))
            with cursor.copy(f"COPY audit_events ({','.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                for row in events:
                    copy.write_row(row)
            with cursor.copy(f"COPY workers ({','.join(WORKER_COLUMNS)}) FROM STDIN") as copy:
                for row in workers:
                    copy.write_row(row)
            cursor.execute("SELECT setval(pg_get_serial_sequence('audits', 'id'), (SELECT max(id) FROM audits))")
        connection.commit()
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")


def shift_running(connection, postgres: bool, seconds: int) -> None:
    """Move every running audit's times (and the registry's heartbeats) ``seconds`` forward."""
    if postgres:
        sets = ", ".join(f"{c} = {c} + make_interval(secs => {seconds})" for c in RUNNING_TIMES)
        connection.execute(f"UPDATE audits SET {sets} WHERE status = 'running'")
        connection.execute(f"UPDATE workers SET last_heartbeat_at = last_heartbeat_at + make_interval(secs => {seconds}), "
                           f"started_at = started_at + make_interval(secs => {seconds})")
        return

    def moved(column):
        return f"strftime('%Y-%m-%d %H:%M:%S', {column}, '+{seconds} seconds') || substr({column}, 20, 7)"

    connection.execute(f"UPDATE audits SET {', '.join(f'{c} = {moved(c)}' for c in RUNNING_TIMES)} WHERE status = 'running'")
    connection.execute(f"UPDATE workers SET last_heartbeat_at = {moved('last_heartbeat_at')}, started_at = {moved('started_at')}")


def odd_rows(connection) -> int:
    return connection.execute("SELECT count(*) FROM audits WHERE odd_times <> 0").fetchone()[0]


def now() -> float:
    return time.time()
