"""Big operations work in batches: more failed audits than PostgreSQL's 65,535 bind parameters, and a
reset of 150,000 on SQLite while a worker keeps beating without a single failed write."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from dbtools import python_env, read_line, spawn
from sqlalchemy import func, insert, select, text  # noqa: F401

from auditctl.db import fetch_now, write_transaction
from auditctl.schema import FAILED, audit_events, audits

AUDITCTL = Path(sys.executable).parent / "auditctl"
HEARTBEATER = """
import logging, os, sys, time
from auditctl import StuckAuditPrevention
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
guard = StuckAuditPrevention(sys.argv[1], worker_id="busy-worker", heartbeat_interval=0.1, stale_after=30, max_age=3600,
                             stall_after=600)
audit_id = guard.create_audit("https://example.com/long-scan")
writes = failures = 0
with guard.run(audit_id) as run:
    print("RUNNING", flush=True)
    while not os.path.exists(sys.argv[2]):
        writes += 1
        if not run.update_progress(step="Crawling", completed_tasks=writes, total_tasks=10**6):
            failures += 1
        run.heartbeat()
        time.sleep(0.05)
print("WRITES", writes, "FAILURES", failures, flush=True)
guard.close()
"""


def fill_failed(engine, count: int) -> None:
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        for start in range(0, count, 10_000):
            connection.execute(insert(audits), [
                {"target": f"https://example.com/{i}", "status": FAILED, "created_at": now, "finished_at": now, "attempts": 1,
                 "error": "scanner crashed", "recovery_reasons": "stale_heartbeat" if i % 2 else None}
                for i in range(start, min(count, start + 10_000))
            ])


def counts(engine) -> tuple[Counter, int]:
    with engine.connect() as connection:
        statuses = Counter(dict(connection.execute(select(audits.c.status, func.count()).group_by(audits.c.status)).all()))
        resets = connection.execute(select(func.count()).select_from(audit_events).where(audit_events.c.event == "reset")).scalar()
    return statuses, resets


def test_a_batch_statement_has_the_same_few_parameters_however_many_audits_it_names(engine):
    """PostgreSQL refuses a statement with more than 65,535 parameters; a batch names its audits in one."""
    from auditctl.db import id_in

    for count in (1, 500, 100_000):
        compiled = select(audits.c.id).where(id_in(audits.c.id, range(count))).compile(engine)
        assert len(compiled.params) == 1, count


def test_reset_in_batches_changes_every_audit_and_writes_one_history_row_each(engine, database_url):
    fill_failed(engine, 1_234)
    done = subprocess.run([str(AUDITCTL), "reset-all", "--yes", "--max-resets", "0", "--database-url", database_url],
                          capture_output=True, text=True, env=python_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Reset 1234 audits to pending." in done.stderr
    assert counts(engine) == (Counter({"pending": 1_234}), 1_234)
    with engine.connect() as connection:
        details = connection.execute(select(audit_events.c.details).limit(1)).scalar()
    assert details["original_status"]["status"] == "failed" and details["origin"] in ("stuck", "error")


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_reset_all_of_70000_failed_audits_on_postgresql_changes_every_one_with_its_history(engine, database_url):
    fill_failed(engine, 70_000)
    done = subprocess.run([str(AUDITCTL), "reset-all", "--yes", "--max-resets", "0", "-o", "json", "--database-url",
                           database_url], capture_output=True, text=True, env=python_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Reset 70000 audits to pending." in done.stderr
    statuses, resets = counts(engine)
    assert statuses == Counter({"pending": 70_000}) and resets == 70_000


def busy_worker_during_reset(engine, database_url, tmp_path, count: int) -> None:
    fill_failed(engine, count)
    with engine.begin() as connection:  # a realistic file: WAL, as every worker leaves it
        connection.execute(text("SELECT 1"))
    script = tmp_path / "heartbeater.py"
    script.write_text(HEARTBEATER)
    stop = tmp_path / "stop"
    worker = spawn(script, database_url, stop)
    try:
        read_line(worker, startswith="RUNNING", timeout=60)
        started = time.monotonic()
        done = subprocess.run([str(AUDITCTL), "reset-all", "--yes", "--max-resets", "0", "--database-url", database_url],
                              capture_output=True, text=True, env=python_env(), timeout=600)
        took = time.monotonic() - started
        stop.touch()
        report = read_line(worker, startswith="WRITES", timeout=60)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert done.returncode == 0, done.stderr
    assert f"Reset {count} audits to pending." in done.stderr
    statuses, resets = counts(engine)
    assert statuses[FAILED] == 0 and statuses["pending"] == count and resets == count
    _, writes, _, failures = report.split()
    assert int(writes) > 10 and int(failures) == 0, f"the worker's writes during a {took:.0f}s reset: {report}"
    stderr = "".join(worker._stderr_seen)
    assert "Emergency" not in stderr and "could not beat" not in stderr, stderr


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reset_of_30000_on_sqlite_lets_a_busy_worker_keep_writing_without_a_failure(engine, database_url, tmp_path):
    busy_worker_during_reset(engine, database_url, tmp_path, 30_000)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reset_of_150000_on_sqlite_lets_a_busy_worker_keep_writing_without_a_failure(engine, database_url, tmp_path):
    busy_worker_during_reset(engine, database_url, tmp_path, 150_000)
