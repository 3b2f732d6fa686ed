"""The soak: simulated workers on PostgreSQL, with faults, and ``watch`` running.

    pytest -m slow -s tests/test_soak.py        (200 workers; SOAK_SECONDS=180 by default)

The default run (and CI) holds a shortened soak: 24 workers for 25 seconds, with the same faults.

Ten processes of twenty worker threads each (``soakfleet.py``) run audits with random
fates (healthy, slow, hung, crashed); the driver also SIGKILLs and SIGSTOPs whole processes.
``auditctl watch`` recovers with short thresholds. Afterwards the history is checked
against what really happened: how many stuck audits were recovered, whether any healthy
audit was recovered (it must not be), and the worst detection latency.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dbtools import events, finish, kill_quietly, python_env
from pgserver import PostgresServer, require_postgres
from test_faults import AUDITCTL, report

FLEET = Path(__file__).parent / "soakfleet.py"
PROCESSES, WORKERS_EACH = 10, 20
HEARTBEAT, STALE_AFTER, STALL_AFTER, MAX_AGE, INTERVAL = 2.0, 6.0, 8.0, 120.0, 1.0
MAX_CONNECTIONS = 1200


def _start_process(url, index, seconds, log_path, workers_each=WORKERS_EACH):
    return subprocess.Popen(
        [sys.executable, str(FLEET), url, "--index", str(index), "--workers", str(workers_each), "--seconds", str(seconds),
         "--heartbeat", str(HEARTBEAT), "--stale-after", str(STALE_AFTER), "--stall-after", str(STALL_AFTER),
         "--max-age", str(MAX_AGE), "--log", str(log_path)],
        stdout=subprocess.DEVNULL, stderr=open(str(log_path) + f".{index}.err", "a"), env=python_env(), cwd=FLEET.parent,
    )


@pytest.mark.slow
@pytest.mark.postgres_only
@pytest.mark.timeout(float(os.environ.get("SOAK_SECONDS", "180")) + 600)
def test_soak_200_workers_with_faults_recovers_every_stuck_audit_and_no_healthy_one(tmp_path):
    soak(tmp_path, float(os.environ.get("SOAK_SECONDS", "180")), PROCESSES, WORKERS_EACH, fault_every=(8, 15))


@pytest.mark.long
@pytest.mark.postgres_only
@pytest.mark.timeout(300)
def test_short_soak_24_workers_with_faults_recovers_every_stuck_audit_and_no_healthy_one(tmp_path):
    soak(tmp_path, 25.0, 3, 8, fault_every=(4, 6), label="short soak")


def connections_in_use(engine) -> int:
    from sqlalchemy import text

    with engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")).scalar()


def soak(tmp_path, seconds: float, process_count: int, workers_each: int, *, fault_every: tuple, label: str = "soak"):
    require_postgres()
    server = PostgresServer(settings={"max_connections": str(MAX_CONNECTIONS), "shared_buffers": "256MB"})
    server.start()
    rng = random.Random(2026)
    log_path = tmp_path / "fleet.jsonl"
    faults = []  # (kind, process index, pid, start, end)
    processes = {}
    watch = None
    peak_connections = 0
    try:
        from auditctl.db import create_engine
        from auditctl.migrate import upgrade

        engine = create_engine(server.url)
        upgrade(engine)
        watch = subprocess.Popen(
            [str(AUDITCTL), "watch", "--interval", f"{INTERVAL}s", "--stale-after", f"{STALE_AFTER}s",
             "--stall-after", f"{STALL_AFTER}s", "--max-age", f"{MAX_AGE}s", "--no-live", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**python_env(), "AUDITCTL_DATABASE_URL": server.url})
        stop_at = time.time() + seconds
        for index in range(process_count):
            processes[index] = _start_process(server.url, index, seconds, log_path, workers_each)
        time.sleep(min(10, seconds / 4))
        while time.time() < stop_at - 15:
            time.sleep(rng.uniform(*fault_every))
            peak_connections = max(peak_connections, connections_in_use(engine))
            index = rng.randrange(process_count)
            proc = processes[index]
            if rng.random() < 0.5:
                start = time.time()
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                faults.append(("kill", index, proc.pid, start, start))
                processes[index] = _start_process(server.url, index, max(5.0, stop_at - time.time()), log_path, workers_each)
            else:
                pause = rng.uniform(1.0, 2 * STALE_AFTER)
                start = time.time()
                proc.send_signal(signal.SIGSTOP)
                time.sleep(pause)
                proc.send_signal(signal.SIGCONT)
                faults.append(("pause", index, proc.pid, start, time.time()))
        for proc in processes.values():
            proc.wait(timeout=max(5.0, stop_at - time.time()) + 60)
        time.sleep(STALE_AFTER + 2 * INTERVAL)  # let watch catch the last crashes
        watch.send_signal(signal.SIGTERM)
        code, _, watch_err = finish(watch)
        assert code == 0, watch_err
        history = events(engine)
    finally:
        for proc in processes.values():
            kill_quietly(proc)
        if watch is not None:
            kill_quietly(watch)
        server.cleanup()

    (tmp_path / "faults.json").write_text(json.dumps(faults))
    (tmp_path / "history.json").write_text(json.dumps([{**e, "at": e["at"].timestamp()} for e in history
                                                       if e["event"] not in ("heartbeat",)], default=str))
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    audits = {r["audit"]: r for r in records if r["event"] == "audit"}
    crashes = {r["audit"]: r["t"] for r in records if r["event"] == "crash"}
    hangs = {r["audit"]: r["t"] for r in records if r["event"] == "hang"}
    given_up = {r["audit"] for r in records if r["event"] == "db_error" and r["audit"] is not None}
    recoveries = {}
    for event in history:
        if event["event"] in ("recovered", "requeued"):
            assert event["audit_id"] not in recoveries, f"audit {event['audit_id']} recovered twice"
            recoveries[event["audit_id"]] = event

    def disturbed(pid, at, window):
        """Was this process killed or paused in the window before ``at``? Then silence was real."""
        return any(f[2] == pid and f[3] <= at and f[4] >= at - window for f in faults) or \
            any(f[0] == "kill" and f[2] == pid and f[3] <= at for f in faults)

    false_recoveries, latencies, hang_latencies = [], [], []
    for audit_id, event in recoveries.items():
        at = event["at"].timestamp()
        record = audits.get(audit_id)
        if record is None:
            continue
        if audit_id in crashes:
            latencies.append(at - crashes[audit_id])
        elif audit_id in hangs:
            hang_latencies.append(at - hangs[audit_id] - STALL_AFTER)
        elif audit_id in given_up:
            continue  # its worker could not reach the database and left it: recovering it is right
        elif not disturbed(record["pid"], at, max(STALE_AFTER, STALL_AFTER) + 2):
            false_recoveries.append((audit_id, record["fate"], event["reasons"]))
    deaths = [r for r in records if r["event"] == "died"]
    unrecovered_crashes = [a for a in crashes if a not in recoveries]
    unrecovered_hangs = [a for a in hangs if a not in recoveries]
    fates = Counter(r["fate"] for r in audits.values())
    workers = len({r["worker"] for r in audits.values()})
    report(f"{label}: duration and fleet", f"{seconds:.0f} s",
           f"{workers} worker ids, {len(audits)} audits ({dict(fates)}), {Counter(f[0] for f in faults)} process faults")
    report(f"{label}: stuck audits recovered", len(recoveries),
           f"{len(crashes)} crashed, {len(hangs)} hung; recoveries by reason {Counter(e['reasons'] for e in recoveries.values())}")
    report(f"{label}: healthy audits wrongly recovered", len(false_recoveries), str(false_recoveries[:5]))
    if latencies:
        report(f"{label}: worst detection latency after a crash", round(max(latencies), 2),
               f"s (median {sorted(latencies)[len(latencies) // 2]:.2f} s; bound stale_after {STALE_AFTER} s + interval {INTERVAL} s)")
    if hang_latencies:
        report(f"{label}: worst detection latency after a hang became stalled", round(max(hang_latencies), 2), "s")
    report(f"{label}: most connections to the server", peak_connections, f"of max_connections {MAX_CONNECTIONS}")
    report(f"{label}: worker calls that found the database unavailable", sum(r["event"] == "db_error" for r in records),
           f"({len(given_up)} during a run)")
    # The property needs a server that can take every worker's beats: out of connections, healthy
    # workers cannot beat (and new ones cannot start), and are rightly recovered as silent.
    assert not deaths, f"worker threads died of something other than their simulated crash: {deaths[:5]}"
    assert peak_connections < MAX_CONNECTIONS * 0.9, "the fleet came near the server's max_connections"
    assert not false_recoveries
    assert not unrecovered_crashes, f"crashed audits never recovered: {unrecovered_crashes[:10]}"
    assert not unrecovered_hangs, f"hung audits never recovered: {unrecovered_hangs[:10]}"
