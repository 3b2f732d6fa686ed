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

from auditctl.schema import FAILED, audit_events, audits
from auditctl.sqlfunctions import fetch_now
from auditctl.transactions import write_transaction

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
    from auditctl.sqlfunctions import id_in

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


@pytest.mark.long
@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reset_of_30000_on_sqlite_lets_a_busy_worker_keep_writing_without_a_failure(engine, database_url, tmp_path):
    busy_worker_during_reset(engine, database_url, tmp_path, 30_000)


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reset_of_150000_on_sqlite_lets_a_busy_worker_keep_writing_without_a_failure(engine, database_url, tmp_path):
    busy_worker_during_reset(engine, database_url, tmp_path, 150_000)


def test_the_pause_after_a_batch_outlasts_the_busy_handler_sleep_of_every_writer_that_waited_meanwhile():
    """Simulated: a writer that began waiting w seconds before the commit sleeps through SQLite's
    schedule of sleeps; it tries again at the end of the sleep it is in. The pause must reach that
    try for every w up to the time the lock was held, and waste little beyond the longest."""
    from auditctl.lockturns import SQLITE_BUSY_SLEEPS, lock_handover_pause

    def next_try_after(waited: float) -> float:
        tried = 0.0
        for count in range(10_000):
            tried += SQLITE_BUSY_SLEEPS[min(count, len(SQLITE_BUSY_SLEEPS) - 1)]
            if tried > waited:
                return tried - waited
        raise AssertionError("unreachable")

    for held_ms in range(0, 600):
        held = held_ms / 1000
        longest = max(next_try_after(w / 2000) for w in range(0, held_ms * 2 + 1))
        assert longest <= lock_handover_pause(held) <= longest + 0.015, held


@pytest.mark.parametrize("waited_before_commit", [0.02, 0.132, 0.182])
def test_the_pause_after_a_batch_lets_a_writer_asleep_in_its_busy_handler_take_the_lock(tmp_path, waited_before_commit):
    """A batch holds SQLite's write lock 0.22 s; a worker that began waiting for it part-way through is
    asleep in SQLite's busy handler when the batch commits. The pause that follows must outlast that
    sleep, or the recoverer takes the lock again first and the worker waits through the next batch."""
    import sqlite3
    import threading

    from auditctl.lockturns import lock_handover_pause

    path = tmp_path / "lock.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("CREATE TABLE turns (who TEXT)")
    setup.close()
    held = 0.22

    def one_handover() -> list[str]:
        recoverer = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
        worker = sqlite3.connect(path, isolation_level=None, timeout=5, check_same_thread=False)
        recoverer.execute("DELETE FROM turns")
        recoverer.execute("BEGIN IMMEDIATE")
        taken = time.monotonic()
        beat = threading.Thread(target=lambda: worker.execute("INSERT INTO turns VALUES ('worker')"))
        time.sleep(held - waited_before_commit)
        beat.start()  # the worker's beat finds the lock taken and sleeps in the busy handler
        time.sleep(max(0.0, taken + held - time.monotonic()))
        recoverer.execute("COMMIT")
        time.sleep(lock_handover_pause(time.monotonic() - taken))
        recoverer.execute("BEGIN IMMEDIATE")  # the next batch
        recoverer.execute("INSERT INTO turns VALUES ('next batch')")
        recoverer.execute("COMMIT")
        beat.join(10)
        order = [who for (who,) in recoverer.execute("SELECT who FROM turns ORDER BY rowid")]
        recoverer.close()
        worker.close()
        return order

    # Three tries: a loaded machine may wake the worker late once; a pause shorter than the busy
    # handler's sleep loses every time.
    orders = []
    for _ in range(3):
        orders.append(one_handover())
        if orders[-1] == ["worker", "next batch"]:
            return
    pytest.fail(f"the next batch took the lock before the waiting worker every time: {orders}")


# --- turns at SQLite's write lock between batches (auditctl.lockturns) --------------------------


BATCH_HOLD = 0.04  # each batch below holds the write lock this long


def run_batches(engine, batches: int, on_batch=None) -> list:
    """A change of ``batches`` batches through the seam recover and reset use, each writing one row;
    ``on_batch(handled, total)`` runs after each batch and its pause, before the next batch begins."""
    from auditctl.history import Actor
    from auditctl.recovery import ResetResult, _in_batches

    turns_table(engine)

    def apply(connection, batch):
        connection.execute(text("INSERT INTO turns VALUES ('batch')"))
        time.sleep(BATCH_HOLD)
        return batch

    result = ResetResult()
    _in_batches(engine, list(range(batches)), 1, apply, result, describe="reset", actor=Actor.command("reset-all"),
                on_batch=on_batch)
    return result


def pauses_logged(caplog) -> int:
    return sum(1 for record in caplog.records if record.getMessage().startswith("left the write lock free"))


def turns_table(engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE IF NOT EXISTS turns (who TEXT)"))


def writing_thread(database_url: str, write) -> tuple:
    """A thread that runs ``write(connection)`` on its own sqlite3 connection, waiting for the lock as
    long as a worker does; returns the started thread and the list its failure goes to."""
    import sqlite3
    import threading

    from auditctl.db import WORKER_LOCK_WAIT

    failures = []

    def run():
        writer = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None, timeout=WORKER_LOCK_WAIT,
                                 check_same_thread=False)
        try:
            write(writer)
        except sqlite3.Error as error:
            failures.append(error)
        finally:
            writer.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


def writer_turns(database_url: str) -> tuple:
    """For ``on_batch``: between two batches, note whether the writer took its turn in the pause, then
    wait for its row before the next batch begins. A writer the machine's load woke after a pause
    takes the lock just after it instead; without the wait the next batch would find nobody had
    written, and the pauses would stop until SOLO_HOLD: one late wake-up would cost many of them.
    Returns ``(on_batch, took, close)``; ``took`` gets one bool per pause."""
    import sqlite3

    from dbtools import wait_for

    # Its own connection: a read through the engine's pool could hand the next batch another pooled
    # connection, which LockTurns counts as "others wrote" whatever they did.
    looking = sqlite3.connect(database_url.split(":///", 1)[1], isolation_level=None, check_same_thread=False)
    took = []

    def went_since_the_last_batch() -> bool:
        return looking.execute("SELECT count(*) FROM turns WHERE who = 'worker' AND rowid > "
                               "(SELECT max(rowid) FROM turns WHERE who LIKE 'batch%')").fetchone()[0] > 0

    def on_batch(handled, total):
        if handled == total:
            return
        took.append(went_since_the_last_batch())
        wait_for(went_since_the_last_batch, timeout=60, interval=0.005, message="the writer's turn")

    return on_batch, took, looking.close


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_long_change_nobody_else_writes_during_leaves_the_lock_free_only_every_solo_hold(engine, caplog):
    from auditctl.lockturns import SOLO_HOLD

    caplog.set_level("DEBUG", logger="auditctl.recovery")
    batches = 30
    started = time.monotonic()
    assert len(run_batches(engine, batches)) == batches
    took = time.monotonic() - started
    # The first pause learns that nobody waited; then one each time the lock was held SOLO_HOLD
    # (counted against the run's own length, so a loaded machine's slower batches are allowed for).
    pauses = pauses_logged(caplog)
    assert 2 <= pauses <= 2 + took / SOLO_HOLD and pauses < batches // 2, (pauses, took, caplog.text)


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_writer_using_its_turns_gets_one_after_every_batch(engine, database_url, caplog):
    """A writer keeps writing, asleep in SQLite's busy handler while each batch holds the lock: every
    batch but the last is followed by a pause, and the writer takes its turn in it (``writer_turns``
    keeps a late wake-up on a loaded machine to the one pause it missed)."""
    import threading

    caplog.set_level("DEBUG", logger="auditctl.recovery")
    turns_table(engine)
    done = threading.Event()

    def keep_writing(writer):
        while not done.is_set():
            writer.execute("INSERT INTO turns VALUES ('worker')")
            time.sleep(0.01)

    between_batches, took_its_turn_in_the_pause, stop_looking = writer_turns(database_url)
    thread, failures = writing_thread(database_url, keep_writing)
    try:
        batches = 15
        run_batches(engine, batches, on_batch=between_batches)
    finally:
        done.set()
        thread.join(10)
        stop_looking()
    assert not failures
    assert pauses_logged(caplog) == batches - 1, caplog.text  # none after the last
    # A pause too short for a writer asleep in its busy handler leaves it most of them. A writer the
    # loaded machine woke late misses that one pause, no more (the next batch still sees its row).
    assert sum(took_its_turn_in_the_pause) >= batches - 4, took_its_turn_in_the_pause


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reading_ahead_during_the_pauses_still_gives_a_writer_its_turn_after_every_batch(engine, database_url, caplog):
    """A recovery reads and builds its next batches while it leaves the lock free: the writer still
    takes the lock in every pause, and the reading fills the pause instead of adding to it."""
    import threading

    from auditctl.history import Actor
    from auditctl.recovery import ResetResult, _in_batches

    caplog.set_level("DEBUG", logger="auditctl.recovery")
    turns_table(engine)
    done, read = threading.Event(), []

    def keep_writing(writer):
        while not done.is_set():
            writer.execute("INSERT INTO turns VALUES ('worker')")
            time.sleep(0.01)

    def read_ahead(batch):
        time.sleep(0.02)  # reading and building, no write lock
        read.append(batch[0])
        return batch[0]

    def apply(connection, batch, ahead):
        connection.execute(text("INSERT INTO turns VALUES (:who)"), {"who": "batch" if ahead is None else "batch read ahead"})
        time.sleep(BATCH_HOLD)
        return batch

    between_batches, took_its_turn_in_the_pause, stop_looking = writer_turns(database_url)
    thread, failures = writing_thread(database_url, keep_writing)
    batches = 15
    try:
        _in_batches(engine, list(range(batches)), 1, apply, ResetResult(), describe="recover", actor=Actor.command("recover"),
                    read_ahead=read_ahead, on_batch=between_batches)
    finally:
        done.set()
        thread.join(10)
        stop_looking()
    assert not failures
    with engine.connect() as connection:
        order = [who for (who,) in connection.execute(text("SELECT who FROM turns ORDER BY rowid"))]
    # A writer the loaded machine woke late misses that one pause, no more (see writer_turns).
    assert sum(took_its_turn_in_the_pause) >= batches - 4, (took_its_turn_in_the_pause, order)
    # Every batch but the first was read ahead, each once, in the pause before it.
    assert order.count("batch read ahead") == batches - 1 and sorted(read) == list(range(1, batches)), (order, read)


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_writer_arriving_while_nobody_else_writes_gets_its_turn_within_a_workers_lock_wait(engine, database_url):
    """Without the pause every SOLO_HOLD, the writer would wait for the whole change (3 s and more)
    and fail after the 2 s a worker waits for the lock."""
    turns_table(engine)

    def write_once(writer):
        time.sleep(0.3)  # past the first pause, which found nobody waiting
        writer.execute("INSERT INTO turns VALUES ('worker')")

    thread, failures = writing_thread(database_url, write_once)
    batches = 80
    run_batches(engine, batches)
    thread.join(10)
    assert not failures
    with engine.connect() as connection:
        order = [who for (who,) in connection.execute(text("SELECT who FROM turns ORDER BY rowid"))]
    assert order.count("batch") == batches and order.index("worker") < batches - 10, order
