"""The worker's edges: runs kept by lease, SIGTERM during the final write, a locked database,
clamped reports, and recoveries whose judgement the world overtook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from dbtools import drop_trigger, events, finish, install_abort_trigger, read_line, row, spawn, wait_for
from sqlalchemy import text

from auditctl import LeaseLost, leases
from auditctl.history import Actor
from auditctl.monitor import Monitor
from auditctl.recovery import _apply_recovery, recover_stuck
from auditctl.rules import find_stuck, select_stuck
from auditctl.schema import COMPLETED, RUNNING
from auditctl.thresholds import Thresholds
from auditctl.transactions import write_transaction
from auditctl.worker import PROGRESS_CALL_BUDGET

OPERATOR = Actor.command("test")


# --- runs are kept by lease ---------------------------------------------------------------


def test_a_requeued_audit_claimed_again_by_another_thread_of_the_same_guard_keeps_beating(engine, guards):
    guard = guards(heartbeat_interval=0.2, stale_after=1.5, max_age=60, stall_after=30, requeue=True)
    guard.start_heartbeat_monitor(handle_sigterm=False)
    audit_id = guard.create_audit("https://example.com/requeued")
    first_inside, first_may_leave, second_claimed, second_may_leave = (threading.Event() for _ in range(4))
    outcome = {}

    def first_run():
        try:
            with guard.run(audit_id) as run:
                first_inside.set()
                first_may_leave.wait(10)
                run.update_progress(step="late write")  # the audit was taken away meanwhile
        except LeaseLost:
            outcome["first"] = "lease lost"

    def second_run():
        with guard.run(audit_id):
            second_claimed.set()
            second_may_leave.wait(20)  # no progress writes at all: only the heartbeat thread keeps it alive
        outcome["second"] = "completed"

    first = threading.Thread(target=first_run)
    first.start()
    assert first_inside.wait(5)
    recovery = guard._recover_stuck_audit(audit_id, explanation="requeued by the test")
    assert recovery.status == "pending"
    second = threading.Thread(target=second_run)
    second.start()
    assert second_claimed.wait(5)
    first_may_leave.set()
    first.join(10)
    assert outcome["first"] == "lease lost"
    # The first run's end must not stop the second run's heartbeats: wait several stale_afters.
    time.sleep(4.0)
    assert find_stuck(engine, guard.thresholds, gone={}) == []
    assert row(engine, audit_id)["status"] == RUNNING
    second_may_leave.set()
    second.join(10)
    assert outcome["second"] == "completed" and row(engine, audit_id)["status"] == COMPLETED


# --- SIGTERM never interrupts a write in flight -----------------------------------------------

FINISHER = """
import logging, os, sys, time
from auditctl import StuckAuditPrevention
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
url, go = sys.argv[1], sys.argv[2]
guard = StuckAuditPrevention(url, worker_id="finisher", heartbeat_interval=0.5, stale_after=30, max_age=600, stall_after=60)
guard.start_heartbeat_monitor()
audit_id = guard.create_audit("https://example.com/finishing")
with guard.run(audit_id) as run:
    run.update_progress(step="Report", completed_tasks=10, total_tasks=10)
    print("WORKING", audit_id, flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    print("FINISHING", flush=True)
print("FINISHED", flush=True)
"""


def test_sigterm_during_the_final_write_still_records_the_end_and_then_exits(engine, database_url, tmp_path):
    script = tmp_path / "finisher.py"
    script.write_text(FINISHER)
    go = tmp_path / "go"
    proc = spawn(script, database_url, go)
    try:
        audit_id = int(read_line(proc, startswith="WORKING").split()[1])
        holder = None
        if engine.dialect.name == "postgresql":
            # The final write takes 2 s inside the database.
            with engine.begin() as connection:
                connection.exec_driver_sql("CREATE FUNCTION slow_finish() RETURNS trigger LANGUAGE plpgsql AS "
                                           "$$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$")
                connection.exec_driver_sql("CREATE TRIGGER slow_finish BEFORE UPDATE ON audits FOR EACH ROW "
                                           "WHEN (NEW.status = 'completed') EXECUTE FUNCTION slow_finish()")
        else:
            # Another process holds the write lock for longer than a worker waits (2 s): the final write
            # fails once, and is retried.
            holder = sqlite3.connect(engine.url.database, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
        go.touch()
        read_line(proc, startswith="FINISHING")
        time.sleep(0.5)  # well inside the final write
        proc.send_signal(signal.SIGTERM)
        if holder is not None:
            time.sleep(2.5)  # past the worker's lock wait: it is now between two tries of the final write
            holder.execute("ROLLBACK")
            holder.close()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = row(engine, audit_id)
    assert after["status"] == COMPLETED, f"the end of the run was recorded before the worker left (exit {code})"
    assert after["lease"] is None
    assert code == 128 + signal.SIGTERM, "then SIGTERM took effect"
    assert [e["event"] for e in events(engine, audit_id)] == []


# --- a locked database does not hold the caller ---------------------------------------------------


@contextlib.contextmanager
def sqlite_write_lock_held(engine):
    """Another connection holds the SQLite file's write lock for the duration."""
    holder = sqlite3.connect(engine.url.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("run_held", [False, True], ids=["run-free", "heartbeat-thread-holds-the-run"])
def test_update_progress_on_a_locked_sqlite_file_returns_within_its_budget_and_the_audit_survives(engine, guards,
                                                                                                   run_held):
    guard = guards(heartbeat_interval=60, stale_after=600, max_age=3600, stall_after=600)
    audit_id = guard.create_audit("https://example.com/locked")
    with guard.run(audit_id) as run:
        with sqlite_write_lock_held(engine):
            # The heartbeat thread holds the run while its own beat waits for the file (it took 7.9 s once).
            holder = threading.Thread(target=lambda: (run._lock.acquire(), time.sleep(4.0), run._lock.release()))
            if run_held:
                holder.start()
                time.sleep(0.1)
            started = time.monotonic()
            stored = run.update_progress(step="Scanning", percentage=50)
            took = time.monotonic() - started
            if run_held:
                holder.join()
            assert stored is False
            assert took <= PROGRESS_CALL_BUDGET + 0.5, f"update_progress held its caller {took:.1f}s"
            assert not run._lock.locked(), "the run's lock is not held once the call returns"
        assert run.update_progress(step="Scanning", percentage=60) is True
    assert row(engine, audit_id)["status"] == COMPLETED


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_heartbeat_on_a_locked_sqlite_file_gives_up_after_the_worker_wait_with_one_clear_error(engine, guards):
    from auditctl.db import WORKER_LOCK_WAIT
    from auditctl.errors import DatabaseUnavailable

    guard = guards(heartbeat_interval=60, stale_after=600, max_age=3600, stall_after=600)
    audit_id = guard.create_audit("https://example.com/locked-beat")
    with guard.run(audit_id) as run:
        with sqlite_write_lock_held(engine):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="locked") as raised:
                run.heartbeat()
            took = time.monotonic() - started
            assert WORKER_LOCK_WAIT - 0.5 <= took <= WORKER_LOCK_WAIT + 1.5, f"waited {took:.1f}s for the lock"
            assert "\n" not in str(raised.value) and "sqlite3" not in str(raised.value)
        before = row(engine, audit_id)["heartbeat_at"]
        run.heartbeat()
        assert row(engine, audit_id)["heartbeat_at"] > before, "the next beat, with the lock free, is written"


@contextlib.contextmanager
def write_lock_taken_at_begin(guard, engine, nth: int):
    """Once armed (``armed.set()``), another connection takes the SQLite file's write lock just
    before the guard's ``nth`` write transaction begins (``BEGIN IMMEDIATE``), and holds it until
    the block ends. Yields (armed, the guard's transactions begun since)."""
    from sqlalchemy import event

    holder = sqlite3.connect(engine.url.database, isolation_level=None, check_same_thread=False)
    armed, begun = threading.Event(), []

    def before(conn, cursor, statement, parameters, context, executemany):
        if armed.is_set() and statement.strip().upper() == "BEGIN IMMEDIATE":
            begun.append(statement)
            if len(begun) == nth:
                holder.execute("BEGIN IMMEDIATE")

    event.listen(guard.engine, "before_cursor_execute", before)
    try:
        yield armed, begun
    finally:
        event.remove(guard.engine, "before_cursor_execute", before)
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("write", ["heartbeat", "progress", "finish"])
def test_a_late_write_raises_lease_lost_when_recording_its_lease_lost_event_finds_the_database_locked(
        engine, guards, caplog, write):
    """The fenced write matched no row, so the lease is known lost; recording the ``lease_lost`` event
    then waited for a write lock another process held. The worker got DatabaseUnavailable (its code
    went on working on an audit that was no longer its own) until a later call found the lock free.
    It gets LeaseLost at once, and a warning says the event could not be recorded."""
    from auditctl.recovery import recover_audits
    from auditctl.schema import audits

    guard = guards(heartbeat_interval=60, stale_after=600, max_age=3600, stall_after=600)
    audit_id = guard.create_audit("https://example.com/lost-while-locked")
    # The finish's own UPDATE is a transaction of its own: the recording is the second one.
    nth = 2 if write == "finish" else 1
    with write_lock_taken_at_begin(guard, engine, nth) as (armed, begun):
        with pytest.raises(LeaseLost) as lost, guard.run(audit_id) as run:
            recover_audits(engine, audits.c.id == audit_id, reason="manual", explanation="taken away by the test",
                           actor=OPERATOR)
            recovered = row(engine, audit_id)
            armed.set()
            if write == "heartbeat":
                run.heartbeat()
            elif write == "progress":
                run.update_progress(step="late")
    assert len(begun) == nth, "the lock was taken as the recording began"
    assert lost.value.audit_id == audit_id and run.lost
    assert row(engine, audit_id) == recovered
    warning = next(r for r in caplog.records if "lease_lost" in r.getMessage())
    assert warning.levelname == "WARNING" and f"audit {audit_id}" in warning.getMessage()
    assert "locked" in warning.getMessage(), warning.getMessage()
    # Owed, not dropped: once the database takes it (here at close()), the event is recorded.
    assert "lease_lost" not in [e["event"] for e in events(engine, audit_id)]
    guard.close()
    late = [e for e in events(engine, audit_id) if e["event"] == "lease_lost"]
    assert len(late) == 1 and late[0]["details"]["write"] == write and late[0]["details"]["recorded_late"] is True


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_lease_lost_event_refused_at_the_time_is_recorded_by_the_next_heartbeat_round(engine, guards):
    from auditctl.recovery import recover_audits
    from auditctl.schema import audits

    guard = guards(heartbeat_interval=0.2, stale_after=600, max_age=3600, stall_after=600)
    audit_id = guard.create_audit("https://example.com/lost-then-recorded")
    with write_lock_taken_at_begin(guard, engine, 1) as (armed, begun):
        with pytest.raises(LeaseLost), guard.run(audit_id) as run:
            recover_audits(engine, audits.c.id == audit_id, reason="manual", explanation="taken away by the test",
                           actor=OPERATOR)
            armed.set()
            run.heartbeat()
    assert "lease_lost" not in [e["event"] for e in events(engine, audit_id)]
    guard.start_heartbeat_monitor()
    deadline = time.monotonic() + 15
    while "lease_lost" not in [e["event"] for e in events(engine, audit_id)] and time.monotonic() < deadline:
        time.sleep(0.05)
    late = [e for e in events(engine, audit_id) if e["event"] == "lease_lost"]
    assert len(late) == 1 and late[0]["details"]["recorded_late"] is True
    guard.close()
    assert len([e for e in events(engine, audit_id) if e["event"] == "lease_lost"]) == 1, "recorded once"


def test_an_owed_lease_lost_event_is_recorded_once_when_an_earlier_attempt_went_through_unanswered(engine, guards):
    """The owed record was made, but its answer never came back (the connection died after the
    COMMIT went out), so the guard still owes it and tries again: the history must hold it once."""
    from auditctl.recovery import recover_audits
    from auditctl.schema import audits

    guard = guards(heartbeat_interval=60, stale_after=600, max_age=3600, stall_after=600)
    audit_id = guard.create_audit("https://example.com/lost-answer")
    with pytest.raises(LeaseLost), guard.run(audit_id) as run:
        recover_audits(engine, audits.c.id == audit_id, reason="manual", explanation="taken away by the test",
                       actor=OPERATOR)
        install_abort_trigger(engine, "refuse_history", table="audit_events", event="INSERT")
        try:
            run.heartbeat()
        finally:
            drop_trigger(engine, "refuse_history", table="audit_events")
    [owed] = guard._unrecorded
    owed()  # went through; as far as the guard knows, it failed
    guard.close()  # pays what it owes
    lost = [e for e in events(engine, audit_id) if e["event"] == "lease_lost"]
    assert len(lost) == 1 and lost[0]["details"]["recorded_late"] is True, lost


# --- what the library stores it can read back ---------------------------------------------------


def test_progress_given_as_decimals_and_fractions_is_stored_not_dropped_as_invalid(engine, guards, caplog):
    """A percentage computed with ``decimal`` (money-style code, a database's NUMERIC) or counts
    that are whole ``Fraction``/``Decimal`` values were dropped as invalid, with a warning."""
    from decimal import Decimal
    from fractions import Fraction

    guard = guards()
    audit_id = guard.create_audit("https://example.com/decimal")
    with guard.run(audit_id) as run:
        assert run.update_progress(step="Crawling", percentage=Decimal("42.5"), completed_tasks=Decimal("3"),
                                   total_tasks=Fraction(12, 2)) is True
        document = row(engine, audit_id)["progress"]["progress"]
    assert (document["percentage"], document["completed_tasks"], document["total_tasks"]) == (42.5, 3, 6)
    assert type(document["completed_tasks"]) is int and type(document["percentage"]) is float
    assert not [r for r in caplog.records if "adjusted" in r.getMessage()]
    with guard.run(guard.create_audit("https://example.com/decimal-odd")) as run:
        assert run.update_progress(percentage=Decimal("NaN"), completed_tasks=Decimal("2.5"), total_tasks=Decimal("sNaN"))
        document = row(engine, run.audit_id)["progress"]["progress"]
    assert (document["percentage"], document["completed_tasks"], document["total_tasks"]) == (0.0, None, None), \
        "NaN, a fraction of a task and a signalling NaN are refused, as their float and text forms are"


def test_the_worker_stores_clamped_values_not_what_it_was_handed(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/clamped")

    def stored():
        document = row(engine, audit_id)["progress"]["progress"]
        return (document["step"], document["percentage"], document["completed_tasks"], document["total_tasks"])

    with guard.run(audit_id) as run:
        assert run.update_progress(step="Crawling", completed_tasks=30, total_tasks=20) is True
        assert stored() == ("Crawling", 100.0, 20, 20), "completed is never above total, the percentage never above 100"
        assert run.update_progress(percentage=250) is True
        assert stored()[1] == 100.0
        assert run.update_progress(percentage=-3) is True
        assert stored()[1] == 0.0
        assert run.update_progress(percentage=float("nan"), completed_tasks=5) is True
        assert stored()[1:3] == (25.0, 5), "NaN is dropped; the percentage follows the counts"
        assert run.update_progress(completed_tasks=10**30) is True
        assert stored()[1:3] == (25.0, 5), "a count no float can hold exactly is not stored: the last one stays"
        assert run.update_progress(step="x" * 5000) is True
        assert stored()[0] == "x" * 500
        assert run.update_progress(step="Crawling", percentage=40, completed_tasks=3, total_tasks=20) is True
        changed_at = row(engine, audit_id)["progress_changed_at"]
        for unusable in ({"completed_tasks": "4"}, {"total_tasks": -1}, {"completed_tasks": float("nan")},
                         {"percentage": "most"}):
            assert run.update_progress(**unusable) is True
            assert stored() == ("Crawling", 40.0, 3, 20), f"{unusable} changes nothing"
        assert row(engine, audit_id)["progress_changed_at"] == changed_at, "garbage is no progress for the stall rule"

        class Unprintable:
            def __str__(self):
                raise RuntimeError("no text for you")

        assert run.update_progress(step=Unprintable()) is False, "only LeaseLost is raised; the heartbeat got through"
        assert stored() == ("Crawling", 40.0, 3, 20)
    with engine.connect() as connection:
        raw = connection.execute(text("SELECT CAST(progress AS TEXT) FROM audits WHERE id = :id"), {"id": audit_id}).scalar()
    json.loads(raw)  # strict JSON: readable by any tool


def test_counts_that_give_no_percentage_keep_the_last_one(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/counts-only")

    def percentage():
        return row(engine, audit_id)["progress"]["progress"]["percentage"]

    with guard.run(audit_id) as run:
        run.update_progress(step="Crawling", percentage=50)
        run.update_progress(completed_tasks=5)
        assert percentage() == 50.0, "no total: the counts give no percentage, so the last one stays"
        run.update_progress(percentage=60)
        run.update_progress(completed_tasks=0, total_tasks=0)
        assert percentage() == 60.0, "a total of 0 gives none either"
        run.update_progress(completed_tasks=3, total_tasks=4)
        assert percentage() == 75.0, "counts that give one still move it"


def test_an_extra_field_named_like_the_documents_own_is_not_stored_and_a_warning_says_so(engine, guards, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/extras")
    with guard.run(audit_id) as run:
        assert run.update_progress(step="Crawling", worker_id="evil", is_running=False, pages=3) is True
        progress = row(engine, audit_id)["progress"]["progress"]
        assert (progress["worker_id"], progress["is_running"], progress["pages"]) == ("worker-1", True, 3)
        assert run.update_progress(step="Crawling", worker_id="evil again") is True
    warnings = [r.getMessage() for r in caplog.records if "keeps itself" in r.getMessage()]
    assert len(warnings) == 2 and {"'worker_id'" in w or "'is_running'" in w for w in warnings} == {True}


def test_an_extra_field_holding_a_nul_or_a_lone_surrogate_is_stored_instead_of_losing_the_report(engine, guards, caplog):
    """PostgreSQL's jsonb holds neither: the whole report failed, and only the emergency write got through."""
    guard = guards()
    audit_id = guard.create_audit("https://example.com/unstorable-extras")
    with guard.run(audit_id) as run:
        assert run.update_progress(step="Crawling", completed_tasks=3, total_tasks=20, note="before\x00after",
                                   file="name-\udcff.txt", nested={"key\x00": ["\ud800", 7, None]},
                                   **{"odd\ud800key": True}) is True
        assert run.emergency_writes == 0
        progress = row(engine, audit_id)["progress"]["progress"]
        assert (progress["step"], progress["completed_tasks"], progress["total_tasks"]) == ("Crawling", 3, 20)
        assert progress["note"] == "before\ufffdafter"
        assert progress["file"] == "name-\ufffd.txt"
        assert progress["nested"] == {"key\ufffd": ["\ufffd", 7, None]}
        assert progress["odd\ufffdkey"] is True
        assert run.update_progress(step="Crawling", note="fine") is True
        assert row(engine, audit_id)["progress"]["progress"]["note"] == "fine"
    assert row(engine, audit_id)["status"] == COMPLETED
    assert caplog.text.count("extra_characters_replaced") == 1, "said once per run"


def test_starting_the_monitor_from_many_threads_at_once_starts_it_once_and_stop_ends_it(engine, guards):
    for attempt in range(5):
        guard = guards(worker_id=f"racing-{attempt}", heartbeat_interval=0.2, stale_after=1.5)
        gate, failures = threading.Barrier(4), []

        def start():
            gate.wait()
            try:
                guard.start_heartbeat_monitor(handle_sigterm=False)
            except Exception as error:  # noqa: BLE001 - what a racing start raised is the finding
                failures.append(error)

        starters = [threading.Thread(target=start) for _ in range(4)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        guard.stop()
        left = [t.name for t in threading.enumerate() if t.name.endswith(f"racing-{attempt}") and t.is_alive()]
        assert not failures and not left, (failures, left)


# --- recovery's conditional write --------------------------------------------------------------


def test_a_recovery_judged_before_a_requeue_and_reclaim_never_touches_the_new_run(engine, start_audit, backdate):
    audit_id, old_lease = start_audit()
    backdate(audit_id, started_at=900, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    thresholds = Thresholds(stale_after=600, max_age=1800, stall_after=600)
    with engine.connect() as connection:
        judged = select_stuck(connection, thresholds, gone={})  # a recoverer judges the old run...
    (requeued,) = recover_stuck(engine, thresholds, actor=OPERATOR, requeue=True, gone={})  # ...someone requeues it...
    new_lease, _ = leases.claim(engine, audit_id, worker_id="worker-2", instance_id="instance-2", worker_url=None)
    claimed = row(engine, audit_id)  # ...and a worker claims it again: running, under a new lease
    assert claimed["status"] == RUNNING and claimed["lease"] == new_lease.token != old_lease.token
    try:
        with write_transaction(engine) as connection:
            applied = _apply_recovery(connection, judged, requeue=False, max_attempts=3, actor=OPERATOR)
    except Exception:  # noqa: BLE001 - refusing the whole batch is as safe as skipping the row
        applied = []
    assert applied == [], "the late recovery matched no row: the lease it judged is gone"
    assert row(engine, audit_id) == claimed
    assert [e["event"] for e in events(engine, audit_id)] == ["requeued"]


# --- the outage rule -----------------------------------------------------------------------


@pytest.mark.postgres_only
def test_after_an_outage_silence_is_measured_from_when_the_monitor_could_see_again(own_postgres):
    """No worker writes at all here, so nothing but the outage rule keeps the audit from being recovered
    when the database comes back; a really dead worker is still caught one stale_after later."""
    server, engine = own_postgres
    stale_after = 2.0
    thresholds = Thresholds(stale_after=stale_after, max_age=600, stall_after=300)
    audit_id = leases.create_audit(engine, "https://example.com/outage")
    leases.claim(engine, audit_id, worker_id="far-away", instance_id="elsewhere", worker_url=None)
    monitor = Monitor(engine, thresholds, actor=OPERATOR)
    assert monitor.run_pass().ok
    server.stop()
    try:
        assert not monitor.run_pass().ok and monitor.in_outage
        time.sleep(stale_after + 1.0)  # the outage lasts longer than stale_after
    finally:
        server.start()
    back = monitor.run_pass()
    assert back.ok and back.resumed_after_outage
    assert back.recovered == [], "silence during the outage is not the worker's silence"
    assert row(engine, audit_id)["status"] == RUNNING
    later = wait_for(lambda: monitor.run_pass().recovered, timeout=stale_after + 5, message="the silent audit to be recovered")
    assert [r.id for r in later] == [audit_id]
    assert 0 < (row(engine, audit_id)["finished_at"] - back.seen_since).total_seconds() < stale_after + 5


# --- the hot path: one statement per beat, a pool that follows the runs -------------------------


def test_a_heartbeat_is_one_autocommitted_statement(engine, guards):
    """Watched at the driver, below SQLAlchemy: the beat and the progress write each send one
    UPDATE and nothing else (no BEGIN, no SELECT of the time, no COMMIT)."""
    from sqlalchemy import event

    guard = guards()
    audit_id = guard.create_audit("https://example.com/one-statement")
    seen = []

    if engine.dialect.name == "postgresql":
        import psycopg

        class Recording(psycopg.Cursor):
            def execute(self, query, params=None, **kwargs):
                seen.append((str(query).split()[0].upper(), self.connection.autocommit, query))
                return super().execute(query, params, **kwargs)

        def observe(dbapi_connection, _record, _proxy):
            dbapi_connection.cursor_factory = Recording

        def forget(dbapi_connection):
            dbapi_connection.cursor_factory = psycopg.Cursor
    else:
        def observe(dbapi_connection, _record, _proxy):
            # SQLite reports a trigger's work as the statement that fired it again: keep one.
            def trace(sql):
                if not seen or seen[-1][2] != sql:
                    seen.append((sql.split()[0].upper(), True, sql))

            dbapi_connection.set_trace_callback(trace)

        def forget(dbapi_connection):
            dbapi_connection.set_trace_callback(None)

    with guard.run(audit_id) as run:
        event.listen(guard.engine, "checkout", observe)
        try:
            run.heartbeat()
            run.update_progress(step="scanning", percentage=10)
        finally:
            event.remove(guard.engine, "checkout", observe)
            for record in list(guard.engine.pool._pool.queue):
                if record.dbapi_connection is not None:
                    forget(record.dbapi_connection)
    assert [(verb, autocommit) for verb, autocommit, _ in seen] == [("UPDATE", True), ("UPDATE", True)], \
        "no BEGIN, no SELECT of the time, no COMMIT round trip"


def test_a_heartbeat_after_the_server_dropped_every_connection_retries_once_and_succeeds(own_postgres):
    from auditctl import StuckAuditPrevention

    server, admin_engine = own_postgres
    guard = StuckAuditPrevention(server.url, worker_id="w", heartbeat_interval=0.5, stale_after=5)
    try:
        audit_id = guard.create_audit("https://example.com/dropped")
        with guard.run(audit_id) as run:
            run.heartbeat()  # the pool now holds a connection
            with admin_engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = 'auditctl-worker'"))
                admin.commit()
            run.heartbeat()  # no pre-ping: the dead connection fails, is thrown away, and the beat is retried
            run.update_progress(step="after the drop")
        assert row(admin_engine, audit_id)["status"] == COMPLETED
    finally:
        guard.close()


def test_the_worker_pool_grows_with_the_runs_it_holds(engine, guards):
    from auditctl.transactions import POOL_SPARE

    guard = guards()
    runs, ready, release = 12, threading.Barrier(13), threading.Event()

    def hold():
        with guard.run(guard.create_audit("https://example.com/many")) as run:
            ready.wait(10)
            release.wait(10)
            run.update_progress(step="together")

    threads = [threading.Thread(target=hold) for _ in range(runs)]
    for thread in threads:
        thread.start()
    ready.wait(10)
    assert guard.engine.pool.size() >= runs + POOL_SPARE
    release.set()
    for thread in threads:
        thread.join(10)
    assert guard.engine.pool.overflow() <= 0, "every run's write had a pooled connection"


def test_a_run_keeps_one_connection_for_its_writes_and_gives_it_back_when_it_ends(engine, guards):
    """A beat borrows no connection from the pool: the run holds one for all its single writes."""
    from sqlalchemy import event

    guard = guards()
    checkouts = []

    def count(_dbapi_connection, _record, _proxy):
        checkouts.append(1)

    with guard.run(guard.create_audit("https://example.com/held")) as run:
        event.listen(guard.engine, "checkout", count)
        try:
            for _ in range(5):
                run.heartbeat()
            assert run.update_progress(step="crawling", percentage=5)
            assert not run.update_progress(step="too big to store", blob="x" * 70_000), "the emergency write"
            assert run.emergency_writes == 1
            assert len(checkouts) == 1, "one checkout for five beats, a progress write and an emergency write"
            assert guard.engine.pool.checkedout() == 1
        finally:
            event.remove(guard.engine, "checkout", count)
    assert guard.engine.pool.checkedout() == 0, "the run's connection went back to the pool"
    run._beat(blocking=False)  # the heartbeat thread's late beat (racing the end) writes nothing and holds nothing
    assert guard.engine.pool.checkedout() == 0


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_run_gives_its_connection_back_out_of_autocommit_so_the_pools_transactions_stay_transactions(engine, guards):
    """The held connection stays in autocommit while the run beats (two fewer calls a beat), and leaves it when given back."""
    guard = guards()
    with guard.run(guard.create_audit("https://example.com/autocommit")) as run:
        for _ in range(3):
            run.heartbeat()
        assert run._connection.driver.autocommit is True
    idle = [guard.engine.raw_connection() for _ in range(guard.engine.pool.checkedin())]
    try:
        assert idle and all(c.driver_connection.autocommit is False for c in idle)
    finally:
        for connection in idle:
            connection.close()


def test_a_guard_used_again_after_stop_is_live_again_and_its_audits_are_not_taken_as_gone(engine, guards):
    guard = guards()
    first, second = guard.create_audit("https://example.com/after-stop"), guard.create_audit("https://example.com/restart")
    guard.stop()
    with guard.run(first) as run:
        run.update_progress(step="Crawling")
        assert not recover_stuck(engine, Thresholds(stale_after=600, max_age=1800, stall_after=600), actor=OPERATOR), \
            "a stopped instance's audit would be recovered at once as worker_gone"
    assert row(engine, first)["status"] == COMPLETED
    guard.stop()
    guard.start_heartbeat_monitor(handle_sigterm=False)
    with guard.run(second) as run:
        assert guard._monitor_once() is True  # its own monitor pass
        run.update_progress(step="Crawling")
    assert row(engine, second)["status"] == COMPLETED, "the guard's own monitor took its running audit as gone"


def test_a_heartbeat_asked_for_after_the_block_ended_says_so_like_a_late_report(engine, guards):
    from auditctl.errors import RunEnded

    guard = guards()
    audit_id = guard.create_audit("https://example.com/late-beat")
    with guard.run(audit_id) as run:
        run.heartbeat()
    with pytest.raises(RunEnded):
        run.heartbeat()
    assert row(engine, audit_id)["status"] == COMPLETED and events(engine, audit_id) == []


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reports_after_a_block_whose_end_could_not_be_recorded_are_refused_so_a_recoverer_judges_it(engine, guards):
    from auditctl.errors import RunEnded

    guard = guards(heartbeat_interval=0.5, stale_after=1, max_age=None)  # the final write retries for 0.5 s
    audit_id = guard.create_audit("https://example.com/end-not-recorded")
    holder = sqlite3.connect(engine.url.database, isolation_level=None)
    with pytest.raises(RuntimeError, match="crawler crashed"):
        with guard.run(audit_id) as run:
            holder.execute("BEGIN IMMEDIATE")  # held until after the block: its final write is refused
            raise RuntimeError("crawler crashed")
    holder.execute("ROLLBACK")
    holder.close()
    assert row(engine, audit_id)["status"] == RUNNING, "the database refused the final write"
    beat_before = row(engine, audit_id)["heartbeat_at"]
    with pytest.raises(RunEnded):
        run.update_progress(step="late")
    with pytest.raises(RunEnded):
        run.heartbeat()
    assert row(engine, audit_id)["heartbeat_at"] == beat_before, "nothing keeps the ended run looking alive"
    time.sleep(1.2)
    (verdict,) = find_stuck(engine, Thresholds(stale_after=1, max_age=3600, stall_after=600))
    assert verdict.id == audit_id and verdict.reasons == ["stale_heartbeat"]


def test_a_run_after_stop_starts_the_heartbeats_again_so_it_is_not_recovered_as_stale(engine, guards):
    guard = guards(heartbeat_interval=0.2, stale_after=1)
    audit_id = guard.create_audit("https://example.com/beats-again")
    guard.start_heartbeat_monitor(handle_sigterm=False)
    guard.stop()
    with guard.run(audit_id):
        time.sleep(2.0)  # twice stale_after, with no write of its own: only the heartbeat thread speaks
        assert not find_stuck(engine, Thresholds(stale_after=1, max_age=1800, stall_after=600)), \
            "the run went silent: stop() ended the heartbeat thread and run() did not start it again"
    guard.stop()
    assert row(engine, audit_id)["status"] == COMPLETED


# --- SIGTERM at the edges of a run (real processes, real signals; SQLite's write lock held by the test) ----------

_CHILD = """
import logging, signal, sys, threading, time
from auditctl import StuckAuditPrevention
logging.basicConfig(level=logging.WARNING)
if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--drain-handler" in sys.argv:  # the application's own handler: it finishes the audit in hand, then exits
    signal.signal(signal.SIGTERM, lambda *_: print("DRAINING", flush=True))
if "--say-claiming" in sys.argv:  # the test sends its signal once the claim is under way
    from auditctl import db, leases
    # The test holds the write lock until the signal has reached this process: however long that
    # takes on a loaded machine, the claim must still be waiting then, not have given up after 2 s.
    db._SQLITE_WAIT["worker"] = 120.0
    claim = leases.claim
    def saying_claim(*args, **kwargs):
        print("CLAIMING", flush=True)
        return claim(*args, **kwargs)
    leases.claim = saying_claim
if "--patience" in sys.argv:
    import auditctl.worker
    auditctl.worker.SIGNAL_PATIENCE = float(sys.argv[sys.argv.index("--patience") + 1])
guard = StuckAuditPrevention(sys.argv[1], worker_id="w-sig", heartbeat_interval=0.5, stale_after=float(sys.argv[2]),
                             max_age=600, stall_after=600)
guard.start_heartbeat_monitor()
audit_id = guard.create_audit("https://example.com/signals")
print(audit_id, flush=True)
sys.stdin.readline()

def work():
    with guard.run(audit_id) as run:
        print("ENTERED", flush=True)
        if "--no-progress-calls" in sys.argv:
            time.sleep(5)  # only the heartbeat thread keeps the audit alive (the test looks at 3 s)
        for _ in range(int(float(sys.argv[3]) * 10)):
            run.update_progress(step="working")
            time.sleep(0.1)

if "--on-a-thread" in sys.argv:  # a pool's thread runs the audit; SIGTERM ends the main thread's wait
    threading.Thread(target=work).start()
    while True:
        time.sleep(0.1)
work()
print("DONE", flush=True)
"""


def _signal_child(tmp_path, database_url, *args, stale_after=2.0, seconds=6.0):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = spawn(script, database_url, stale_after, seconds, *args, stdin=subprocess.PIPE)
    return child, int(read_line(child))


def _write_lock(database_url):
    lock = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    return lock


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` sent to the process is still waiting to be taken (Linux's /proc)."""
    with open(f"/proc/{pid}/status") as status:
        masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def _signal_during_the_claim(tmp_path, database_url, signum: int) -> tuple[int, str, int]:
    """Send ``signum`` to a child whose claim waits for the SQLite write lock; the lock is released
    only once the signal has been taken, so it arrives inside the claim however loaded the machine.
    Returns the exit code, the stdout no read_line consumed and the audit's id."""
    child, audit_id = _signal_child(tmp_path, database_url, "--say-claiming")
    lock = _write_lock(database_url)  # the claim waits for the lock...
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        assert read_line(child) == "CLAIMING"
        child.send_signal(signum)  # ...and the signal arrives meanwhile
        wait_for(lambda: not _pending(child.pid, signum), timeout=60, message="the child to take the signal")
    finally:
        lock.execute("COMMIT")
        lock.close()
    returncode, out, err = finish(child, timeout=60)
    return returncode, out + err, audit_id


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_a_sigterm_during_the_claim_marks_the_claimed_audit_failed(engine, database_url, tmp_path):
    returncode, output, audit_id = _signal_during_the_claim(tmp_path, database_url, signal.SIGTERM)
    assert returncode == 143, output
    assert "ENTERED" not in output, "the block never started"
    claimed = row(engine, audit_id)
    assert claimed["status"] == "failed" and claimed["error"] == "SystemExit: 143", "left running under a dead lease"


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_a_ctrl_c_during_the_claim_marks_the_claimed_audit_failed_instead_of_leaving_it_running(engine, database_url,
                                                                                                tmp_path):
    returncode, output, audit_id = _signal_during_the_claim(tmp_path, database_url, signal.SIGINT)  # Ctrl-C
    assert returncode in (-signal.SIGINT, 130), output
    assert "ENTERED" not in output, "the block never started"
    claimed = row(engine, audit_id)
    assert claimed["status"] == "failed" and claimed["error"] == "KeyboardInterrupt", claimed


def _sigterm_then_still_beating(tmp_path, database_url, engine, *args, said: str | None = None):
    """Start an audit in a child (no progress calls: only the heartbeat thread keeps it alive), send
    SIGTERM, and check the heartbeat thread goes on: two more beats land while the work lasts, and
    the audit is not stale (stale_after is 2 s). Beats are waited for, not slept on, so a loaded
    machine that delays one does not fail the test."""
    child, audit_id = _signal_child(tmp_path, database_url, *args, "--no-progress-calls", seconds=0.0)
    child.stdin.write("go\n")
    child.stdin.flush()
    assert read_line(child) == "ENTERED"
    child.send_signal(signal.SIGTERM)
    if said is not None:
        assert read_line(child) == said
    seen = [row(engine, audit_id)["heartbeat_at"]]

    def beat_after_the_signal():
        now = row(engine, audit_id)
        assert now["status"] == RUNNING, "the work ended before two beats after SIGTERM: SIGTERM stopped the heartbeats"
        if now["heartbeat_at"] != seen[-1]:
            seen.append(now["heartbeat_at"])
        return len(seen) == 3

    wait_for(beat_after_the_signal, timeout=30, message="two heartbeats after SIGTERM")
    assert not list(find_stuck(engine, Thresholds(stale_after=2, max_age=600, stall_after=600))), \
        "SIGTERM stopped the heartbeats of work that goes on"
    return child, audit_id


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_an_application_that_ignores_sigterm_keeps_its_heartbeats(engine, database_url, tmp_path):
    child, _ = _sigterm_then_still_beating(tmp_path, database_url, engine, "--ignore-sigterm")
    child.kill()
    child.wait(10)


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_an_application_draining_on_its_own_sigterm_handler_keeps_its_heartbeats(engine, database_url, tmp_path):
    child, audit_id = _sigterm_then_still_beating(tmp_path, database_url, engine, "--drain-handler", said="DRAINING")
    assert read_line(child, timeout=15) == "DONE"
    assert child.wait(10) == 0
    assert row(engine, audit_id)["status"] == COMPLETED
    assert [e["event"] for e in events(engine, audit_id)] == [], "no recovery, no lost lease"


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_a_sigterm_keeps_beating_for_an_audit_another_thread_still_runs(engine, database_url, tmp_path):
    # The main thread exits 143; the process waits for the audit's thread.
    child, audit_id = _sigterm_then_still_beating(tmp_path, database_url, engine, "--on-a-thread")
    assert child.wait(15) == 143
    assert row(engine, audit_id)["status"] == COMPLETED
    assert [e["event"] for e in events(engine, audit_id)] == [], "no recovery, no lost lease"


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_a_sigterm_while_the_database_stays_locked_still_exits_143_within_its_patience(engine, database_url, tmp_path):
    patience = 2.0  # the default is 60 s with stale_after 600: the exit must keep to the patience instead
    child, audit_id = _signal_child(tmp_path, database_url, "--patience", patience, stale_after=600.0, seconds=30.0)
    child.stdin.write("go\n")
    child.stdin.flush()
    assert read_line(child) == "ENTERED"
    lock = _write_lock(database_url)
    child.send_signal(signal.SIGTERM)
    try:
        # Its patience, then one attempt in flight to its own limit (the worker's lock wait) and the exit.
        child.wait(patience + 15)
    finally:
        lock.execute("COMMIT")
        lock.close()
    child.communicate(timeout=10)
    err = "".join(child._stderr_seen)  # read_line's pump drained stderr
    assert child.returncode == 143, err[-2000:]
    assert "could not record the end of audit" in err


def test_a_password_in_the_blocks_exception_is_not_stored_with_the_error(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/secret-error")
    with pytest.raises(RuntimeError), guard.run(audit_id):
        raise RuntimeError("cannot reach postgresql://bob:s3cret@db.internal/scans")
    assert row(engine, audit_id)["error"] == "RuntimeError: cannot reach postgresql://bob:***@db.internal/scans"


def test_a_report_after_the_run_ended_is_refused_without_a_lease_lost_in_the_history(engine, guards, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/late-report")
    with guard.run(audit_id) as run:
        run.update_progress(step="Crawling")
    with pytest.raises(LeaseLost, match="has ended; this report was not written"):
        run.update_progress(step="late")
    assert "lease_lost" not in [e["event"] for e in events(engine, audit_id)]
    assert "LEASE LOST" not in caplog.text and row(engine, audit_id)["status"] == COMPLETED


# --- the SQLite file taken away under a running worker -----------------------------------------------------------


def test_a_worker_whose_sqlite_file_is_deleted_says_so_and_writes_to_whatever_is_at_the_path_next(tmp_path, caplog):
    """Its open connections would go on writing to the deleted file, where nobody reads, and a new one
    would create an empty database in its place."""
    import os

    from auditctl import StuckAuditPrevention
    from auditctl.db import create_engine
    from auditctl.migrate import upgrade

    path = tmp_path / "fleet.db"
    guard = StuckAuditPrevention(f"sqlite:///{path}", worker_id="w", heartbeat_interval=0.2, stale_after=2,
                                 max_age=600, stall_after=60)
    try:
        audit_id = guard.create_audit("https://example.com/vanishing")
        guard.start_heartbeat_monitor(handle_sigterm=False)
        with pytest.raises(LeaseLost):
            with guard.run(audit_id) as run:
                assert run.update_progress(step="before") is True
                for suffix in ("", "-wal", "-shm"):
                    os.unlink(f"{path}{suffix}")
                wait_for(lambda: "was deleted or moved away while this worker ran" in caplog.text, timeout=5,
                         message="the worker to notice")
                assert run.update_progress(step="after") is False, "nothing to write to"
                assert not path.exists(), "a worker's connection created an empty database in its place"

                restored = create_engine(f"sqlite:///{path}")  # an operator puts a database back (`auditctl init`)
                upgrade(restored)
                restored.dispose()
                wait_for(lambda: f"DATABASE FILE {path} is there again" in caplog.text, timeout=5,
                         message="the worker to see it")
                run.update_progress(step="into the new database")  # whose audits do not include this one
    finally:
        guard.close()


def test_a_worker_that_changes_directory_keeps_beating_into_its_relative_sqlite_url(tmp_path, monkeypatch, caplog):
    import os

    from auditctl import StuckAuditPrevention

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    guard = StuckAuditPrevention("sqlite:///fleet.db", worker_id="w", heartbeat_interval=0.2, stale_after=2,
                                 max_age=600, stall_after=60)
    try:
        audit_id = guard.create_audit("https://example.com/wandering")
        guard.start_heartbeat_monitor(handle_sigterm=False)
        with guard.run(audit_id) as run:
            os.chdir(tmp_path / "work")  # a per-audit work directory; fleet.db is not here
            time.sleep(1.0)
            assert run.update_progress(step="still here") is True
            assert "DATABASE FILE" not in caplog.text, "the file was taken for deleted after a chdir"
    finally:
        guard.close()
    assert not (tmp_path / "work" / "fleet.db").exists()


def test_an_outage_reported_while_a_monitor_pass_resumes_is_not_lost(engine, monkeypatch):
    """A worker's heartbeat thread flags an outage on the monitor its monitor thread runs: a flag raised
    while a pass is reading the database's time after the last outage must survive that pass."""
    from auditctl import monitor as monitor_module
    from auditctl.thresholds import Policy

    monitor = Monitor(engine, Policy.of(Thresholds()), actor=Actor.command("test"))
    monitor.in_outage = True
    real_fetch_now = monitor_module.fetch_now

    def fetch_now_while_the_heartbeat_thread_reports_again(connection):
        moment = real_fetch_now(connection)
        monitor.in_outage = True  # the other thread, between the read and the rest of the pass
        return moment

    monkeypatch.setattr(monitor_module, "fetch_now", fetch_now_while_the_heartbeat_thread_reports_again)
    assert monitor.run_pass().ok
    assert monitor.in_outage, "the second outage was forgotten: silence would be measured from inside it"


def test_a_read_between_passes_after_an_outage_measures_silence_from_when_the_database_came_back(engine, start_audit,
                                                                                                 backdate):
    audit_id, _ = start_audit(target="https://example.com/silent-through-the-outage")
    backdate(audit_id, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    monitor = Monitor(engine, Thresholds(), actor=OPERATOR, recover=False)
    monitor.in_outage = True  # the last pass could not reach the database
    stuck, _gone = monitor.judge_now()  # watch's read between passes, once the database answers again
    assert stuck == [], "silence across the outage was counted"
    assert not monitor.in_outage and monitor.seen_since is not None
    after = monitor.run_pass()
    assert after.ok and not after.resumed_after_outage and after.stuck == [], "the return was already said once"


def test_a_read_between_passes_keeps_the_outage_when_the_database_is_still_away(engine, start_audit, backdate,
                                                                               monkeypatch):
    """watch reads between passes; one that fails because the database is still away must leave the outage
    standing, or the next pass would measure the audits' silence across it and recover healthy ones."""
    from auditctl import monitor as monitor_module
    from auditctl.errors import DatabaseUnavailable

    audit_id, _ = start_audit(target="https://example.com/silent-through-a-longer-outage")
    backdate(audit_id, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    monitor = Monitor(engine, Thresholds(), actor=OPERATOR, recover=False)
    monitor.in_outage = True  # the last pass could not reach the database

    def still_away(connection):
        raise DatabaseUnavailable("the database is still away")

    monkeypatch.setattr(monitor_module, "fetch_now", still_away)
    with pytest.raises(DatabaseUnavailable):
        monitor.judge_now()
    assert monitor.in_outage
    monkeypatch.undo()
    back = monitor.run_pass()
    assert back.ok and back.resumed_after_outage
    assert back.stuck == [], "silence across the outage was counted"


def test_a_forked_child_reads_its_own_pid_namespace_instead_of_its_parents():
    """The boot and pid namespace that tell whether a pid is a process here are read once per
    process; a parent may have put its children in a new pid namespace, so a child reads them again."""
    import os

    from auditctl import registry

    parent = registry._namespace()
    assert registry._namespace.cache_info().currsize == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns to pytest
        try:
            os.write(write, f"{registry._namespace.cache_info().currsize} {registry._namespace()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    cached_in_child, namespace = os.read(read, 1000).decode().split(" ", 1)
    os.close(read)
    assert cached_in_child == "0", "the child trusted its parent's reading"
    assert namespace == parent  # forked without a new namespace: the same place


_FORKING_WORKER = '''
import json, os, signal, sys, time
from auditctl import StuckAuditPrevention
from auditctl.errors import ConfigError

guard = StuckAuditPrevention(sys.argv[1], worker_id="forking", heartbeat_interval=0.2, stale_after=1.5,
                             max_age=60, stall_after=30)
guard.start_heartbeat_monitor()
audit_id, other = guard.create_audit("https://example.com/parent"), guard.create_audit("https://example.com/other")
outcome = {}
with guard.run(audit_id) as run:
    leaving = os.fork()
    if leaving == 0:
        sys.exit(0)  # inside the inherited run block, then the inherited at-exit stop
    os.waitpid(leaving, 0)
    stopped = os.fork()
    if stopped == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(0.3)
    os.kill(stopped, signal.SIGTERM)  # the inherited handler
    outcome["sigterm_exit"] = os.waitstatus_to_exitcode(os.waitpid(stopped, 0)[1])
    read, write = os.pipe()
    claiming = os.fork()
    if claiming == 0:
        try:
            with guard.run(other):
                message = "claimed"
        except ConfigError as error:
            message = str(error)
        os.write(write, message.encode())
        os._exit(0)
    os.waitpid(claiming, 0)
    outcome["child_claim"] = os.read(read, 1000).decode()
    time.sleep(2.5)  # past stale_after: a parent taken for gone would lose its lease here
    outcome["progress"] = run.update_progress(step="after the children")
closing = os.fork()
if closing == 0:
    with guard:  # leaving it closes the guard: in a child, without closing the parent's connections
        pass
    os._exit(0)
os.waitpid(closing, 0)
try:
    with guard.run(guard.create_audit("https://example.com/after-a-child-closed")):
        pass
    outcome["after_close"] = "completed"
except Exception as error:
    outcome["after_close"] = repr(error)
guard.stop()
print(json.dumps(outcome), flush=True)
'''


def test_a_forked_child_never_acts_for_its_parents_guard(tmp_path, database_url, engine):
    script = tmp_path / "forking_worker.py"
    script.write_text(_FORKING_WORKER)
    proc = spawn(script, database_url)
    outcome = json.loads(read_line(proc, timeout=60))
    assert proc.wait(30) == 0
    assert outcome["progress"] is True, "the parent lost its audit after a child left"
    assert outcome["after_close"] == "completed", "a child closing its copy of the guard cut the parent's connections"
    assert outcome["sigterm_exit"] == -signal.SIGTERM, "SIGTERM ends the child as it would without the guard"
    assert "belongs to process" in outcome["child_claim"] and "make a new one in the child" in outcome["child_claim"]
    parent = row(engine, 1)
    assert parent["status"] == COMPLETED and not parent["error"]
    assert not events(engine, 1), "nothing recovered it, nothing lost its lease"
    assert row(engine, 2)["status"] == "pending"


@pytest.mark.parametrize("error", [None, "scanner crashed"], ids=["completed", "failed"])
def test_a_final_write_retried_after_its_commit_took_effect_is_the_runs_own_end_not_a_lost_lease(engine, error):
    """The answer to the final write's COMMIT was lost (a connection cut as it came back), so the
    worker wrote again: the row already held its own end. That was reported as LeaseLost, with a
    lease_lost event in the history, for an audit the worker had just finished itself."""
    audit_id = leases.create_audit(engine, "https://example.com/ends")
    lease, _document = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)
    actor = Actor.command("worker")

    assert leases.finish(engine, lease, error=error, actor=actor) == leases.finish(engine, lease, error=error, actor=actor)

    assert row(engine, audit_id)["status"] == ("completed" if error is None else "failed")
    assert [e["event"] for e in events(engine, audit_id)] == []


def test_a_final_write_after_a_recovery_still_loses_its_lease(engine, backdate):
    """The same instance and start, failed by a recovery (with its reasons): not this run's own end."""
    audit_id = leases.create_audit(engine, "https://example.com/recovered")
    lease, _document = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))] == [audit_id]

    with pytest.raises(LeaseLost):
        leases.finish(engine, lease, error="scanner crashed", actor=Actor.command("worker"))
    assert [e["event"] for e in events(engine, audit_id)] == ["recovered", "lease_lost"]


def test_a_final_write_after_a_requeue_and_a_new_run_of_the_same_instance_still_loses_its_lease(engine, backdate):
    """The same instance, requeued and claimed again: that later run's end is not this run's own."""
    audit_id = leases.create_audit(engine, "https://example.com/requeued")
    first, _document = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), requeue=True)] == [audit_id]
    second, _document = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)
    assert leases.finish(engine, second, error=None, actor=Actor.command("worker")) == COMPLETED

    with pytest.raises(LeaseLost):
        leases.finish(engine, first, error=None, actor=Actor.command("worker"))
    assert [e["event"] for e in events(engine, audit_id)][-1] == "lease_lost"


def test_a_requeued_audit_claimed_again_keeps_no_error_from_its_recovery_when_it_completes(engine, backdate):
    audit_id = leases.create_audit(engine, "https://example.com/requeued-then-done")
    leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), requeue=True)
    assert row(engine, audit_id)["error"].startswith("recovered")
    again, _document = leases.claim(engine, audit_id, worker_id="worker-2", instance_id="instance-2", worker_url=None)
    assert row(engine, audit_id)["error"] is None, "the new run is shown with the last run's error"
    leases.finish(engine, again, error=None, actor=Actor.command("worker"))
    assert (row(engine, audit_id)["status"], row(engine, audit_id)["error"]) == (COMPLETED, None)


def test_the_final_writes_retries_are_counted_from_its_first_failure_not_from_before_a_pause(engine, guards, monkeypatch):
    """A worker paused (SIGSTOP) inside its final write: the pause used up the whole retry budget, so
    the write was not tried again and the worker saw DatabaseUnavailable instead of its answer."""
    from auditctl.errors import DatabaseUnavailable

    guard = guards(stale_after=2)  # retries for up to 1 s
    audit_id = guard.create_audit("https://example.com/paused-finish")
    real_finish, calls = leases.finish, []

    def paused_then_cut(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.5)  # the pause, longer than the budget, then the connection is found cut
            raise DatabaseUnavailable("terminating connection due to idle-in-transaction timeout")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(leases, "finish", paused_then_cut)
    with guard.run(audit_id):
        pass

    assert len(calls) == 2 and row(engine, audit_id)["status"] == COMPLETED


def test_a_write_past_its_own_deadline_keeps_the_pools_other_connections(engine, database_url):
    """Only a connection the server cut says the others died too; one closed by its own deadline
    (a slow statement) does not, and replacing the pool for it left healthy connections open."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a call deadline: PostgreSQL's")
    from auditctl.db import create_engine
    from auditctl.transactions import single_write
    from auditctl.errors import DatabaseUnavailable

    worker_engine = create_engine(database_url, role="worker")
    try:
        def backends() -> set[int]:
            held = [worker_engine.raw_connection() for _ in range(3)]
            try:
                return {c.driver_connection.execute("SELECT pg_backend_pid()").fetchone()[0] for c in held}
            finally:
                for connection in held:
                    connection.close()

        before = backends()
        with pytest.raises(DatabaseUnavailable):
            single_write(worker_engine, text("SELECT pg_sleep(5)"), timeout=1.0)
        assert len(backends() & before) == 2, "only the connection the deadline closed is replaced"
    finally:
        worker_engine.dispose()


def test_a_write_after_a_restart_cut_every_pooled_connection_reaches_the_server(engine, database_url):
    """A server restart cuts the pool's idle connections as well as the one in use: the write must
    get past each of them to a fresh connection, not give up at the second dead one (a worker's
    progress report was dropped after every PostgreSQL restart)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("connections a server cuts: PostgreSQL's")
    from auditctl.db import create_engine
    from auditctl.transactions import single_write

    worker_engine = create_engine(database_url, role="worker")
    try:
        pooled = [worker_engine.raw_connection() for _ in range(4)]
        cut = [c.driver_connection.execute("SELECT pg_backend_pid()").fetchone()[0] for c in pooled]
        for connection in pooled:
            connection.close()  # idle in the pool, as between a run's beats
        with engine.begin() as admin:
            admin.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid"), {"pids": cut})

        def still_there() -> int:
            # A transaction of its own each time: pg_stat_activity is a snapshot kept for the whole transaction.
            with engine.connect() as admin:
                return admin.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(CAST(:pids AS int[]))"),
                                     {"pids": cut}).scalar()

        wait_for(lambda: not still_there(), timeout=60, message="the backends to end")

        assert single_write(worker_engine, text("SELECT 1")) == 1
    finally:
        worker_engine.dispose()


def test_a_sigterm_final_write_keeps_to_its_patience_from_the_start(engine, guards, monkeypatch):
    """The process must exit within SIGNAL_PATIENCE of the SIGTERM: a first attempt that used the
    whole patience is not retried (the budget of an ordinary end runs from the first failure)."""
    from auditctl import worker
    from auditctl.errors import DatabaseUnavailable

    monkeypatch.setattr(worker, "SIGNAL_PATIENCE", 0.5)
    guard = guards()
    audit_id = guard.create_audit("https://example.com/sigterm-finish")
    calls = []

    def frozen(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.8)
        raise DatabaseUnavailable("did not answer within 0.8s")

    monkeypatch.setattr(leases, "finish", frozen)
    with pytest.raises(SystemExit):
        with guard.run(audit_id):
            raise SystemExit(143)
    assert len(calls) == 1


# --- threads and exceptions at the edges of a run ----------------------------------------------


def _stored_progress(engine, audit_id) -> dict:
    stored = row(engine, audit_id)["progress"]
    return (json.loads(stored) if isinstance(stored, str) else stored)["progress"]


def test_two_threads_reporting_at_once_each_keep_the_fields_of_the_other(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/two-reporters")
    count = 150
    with guard.run(audit_id) as run:
        start = threading.Barrier(2)

        def steps():
            start.wait()
            for i in range(count):
                run.update_progress(step=f"step-{i}")

        def counts():
            start.wait()
            for i in range(count):
                run.update_progress(completed_tasks=i + 1, total_tasks=count)

        threads = [threading.Thread(target=steps), threading.Thread(target=counts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = _stored_progress(engine, audit_id)
    assert (stored["step"], stored["completed_tasks"], stored["total_tasks"]) == (f"step-{count - 1}", count, count), \
        "a report merged with a copy taken before the other thread's report"


def test_a_report_racing_the_end_of_its_run_is_not_recorded_as_a_lost_lease(engine, guards, caplog):
    guard = guards()
    ended = []
    for attempt in range(10):
        audit_id = guard.create_audit(f"https://example.com/end-race-{attempt}")
        with guard.run(audit_id) as run:
            def report():
                for i in range(100_000):
                    try:
                        run.update_progress(completed_tasks=i % 100, total_tasks=100)
                    except LeaseLost as error:
                        ended.append(error)
                        return

            reporter = threading.Thread(target=report)
            reporter.start()
            time.sleep(0.02)
        reporter.join(30)
        assert row(engine, audit_id)["status"] == COMPLETED
        assert [e["event"] for e in events(engine, audit_id)] == [], "the run's own end recorded as a lost lease"
    assert len(ended) == 10 and all(type(error).__name__ == "RunEnded" for error in ended)
    assert "LEASE LOST" not in caplog.text


class _Unreadable(Exception):
    def __str__(self):
        raise RuntimeError("this message cannot be read")


class _NotText(Exception):
    def __str__(self):
        return 42


@pytest.mark.parametrize("error, stored", [
    (RuntimeError("cannot parse r\udcffport.txt"), "RuntimeError: cannot parse r\\udcffport.txt"),
    (ValueError("a NUL \x00 in the message"), "ValueError: a NUL \\x00 in the message"),
    (_Unreadable(), "_Unreadable: (its message could not be read)"),
    (_NotText(), "_NotText: (its message could not be read)"),
], ids=["lone-surrogate", "nul", "str-raises", "str-not-text"])
def test_the_blocks_own_exception_reaches_the_caller_and_fails_the_audit_whatever_its_message(engine, guards, error,
                                                                                               stored):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/odd-message")
    with pytest.raises(type(error)):
        with guard.run(audit_id):
            raise error
    ended = row(engine, audit_id)
    assert ended["status"] == "failed" and ended["error"] == stored and ended["lease"] is None


def test_a_megabyte_exception_message_ends_the_run_at_once_cut_and_masked(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com/huge-message")
    body = "postgresql://bob:s3cret@db/x " + "QUJD" * 500_000  # a response body in the message
    outcome = []

    def run_and_raise():
        try:
            with guard.run(audit_id):
                raise RuntimeError(body)
        except RuntimeError:
            outcome.append("raised")

    thread = threading.Thread(target=run_and_raise, daemon=True)
    thread.start()
    thread.join(60)  # masking the whole message took minutes (quadratic in a run of letters)
    assert outcome == ["raised"], "the run did not end"
    error = row(engine, audit_id)["error"]
    assert len(error) == 2000 and error.startswith("RuntimeError: postgresql://bob:***@db/x QUJD")


def test_stop_while_a_run_goes_on_leaves_the_instance_live_until_the_run_ends(engine, guards):
    from auditctl.rules import gone_instances

    guard = guards()
    guard.start_heartbeat_monitor()
    audit_id = guard.create_audit("https://example.com/stopped-mid-run")
    with guard.run(audit_id) as run:
        stopper = threading.Thread(target=guard.stop)  # a shutdown hook on another thread
        stopper.start()
        stopper.join(30)
        assert guard.instance_id not in gone_instances(engine), "its live audit would be recovered as worker_gone"
        assert run.update_progress(step="still working")
    assert row(engine, audit_id)["status"] == COMPLETED
    assert guard.instance_id in gone_instances(engine), "marked stopped once its last run ended"


def test_a_run_begun_as_the_last_one_after_stop_ends_keeps_the_instance_live(engine, guards, monkeypatch):
    """stop() came during a run; as that run ends, another thread begins one. The first run's end must
    not mark the instance stopped after the new run made it live again (worker_gone would take it)."""
    from auditctl.rules import gone_instances
    from auditctl.worker import AuditRun

    guard = guards()
    guard.start_heartbeat_monitor()
    first, second = guard.create_audit("https://example.com/first"), guard.create_audit("https://example.com/second")
    second_running, seen_gone = threading.Event(), []
    release = AuditRun._release

    def run_second():
        with guard.run(second):
            second_running.set()
            time.sleep(1.0)  # meanwhile the first run's end decides whether to mark the instance stopped
            seen_gone.append(guard.instance_id in gone_instances(engine))

    def release_then_begin_another(handle):
        release(handle)
        if handle.audit_id == first:
            threading.Thread(target=run_second).start()
            assert second_running.wait(10)

    monkeypatch.setattr(AuditRun, "_release", release_then_begin_another)
    with guard.run(first):
        stopper = threading.Thread(target=guard.stop)
        stopper.start()
        stopper.join(30)
    wait_for(lambda: seen_gone, timeout=20, message="the second run to look")
    assert seen_gone == [False], "the instance was marked stopped under a live run"


_EXITS_WITH_A_RUN = """
import logging, sys, threading
from auditctl import StuckAuditPrevention

logging.basicConfig(level=logging.WARNING)
guard = StuckAuditPrevention(sys.argv[1], worker_id="w-exit", heartbeat_interval=60, stale_after=600, max_age=3600,
                             stall_after=600)
guard.start_heartbeat_monitor()
audit_id = guard.create_audit("https://example.com/left-running")
started = threading.Event()

def work():
    with guard.run(audit_id):
        started.set()
        threading.Event().wait()  # a daemon thread's work, which the exit does not wait for

threading.Thread(target=work, daemon=True).start()
started.wait(30)
if sys.argv[2:] == ["stop"]:
    guard.stop()  # a run goes on: the instance is left live...
print(guard.instance_id, flush=True)
# ...and the process exits, abandoning the daemon thread's audit
"""


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_a_process_that_exits_after_a_deferred_stop_marks_its_instance_stopped(engine, database_url, tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(_EXITS_WITH_A_RUN)
    done = subprocess.run([sys.executable, str(script), database_url, "stop"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from dbtools import worker_rows

    (instance,) = [r for r in worker_rows(engine, "w-exit") if r["instance_id"] == done.stdout.strip()]
    # Here the dead pid would tell too; on another host only silence would, after stale_after.
    assert instance["stopped_at"] is not None, "the exit left the instance marked live"


def test_an_application_that_survives_sigterm_can_start_the_monitor_passes_again(guards):
    before = signal.signal(signal.SIGTERM, lambda *_: None)  # the application's own handler: it goes on
    try:
        guard = guards()
        guard.start_heartbeat_monitor()
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: not guard._monitor_thread.is_alive(), timeout=10, message="the monitor passes to stop")
        assert guard._thread.is_alive(), "the heartbeats go on"
        guard.start_heartbeat_monitor()
        assert guard._monitor_thread.is_alive(), "asked to start again, the monitor passes did not"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_monitor_pass_the_database_will_not_let_write_says_so_not_that_it_is_unreachable(engine, guards, caplog):
    if engine.dialect.name != "postgresql":
        pytest.skip("a role's refusal: PostgreSQL's SQLSTATE 42501")
    from dbtools import install_abort_trigger, make_running

    make_running(engine, 2)
    guard = guards()
    install_abort_trigger(engine, "no_privilege", errcode="42501")
    with caplog.at_level("ERROR", logger="auditctl"):
        assert guard._heartbeat_cleanup() == []
    said = [r.getMessage() for r in caplog.records if "HEARTBEAT" in r.getMessage()]
    assert said and "cannot recover stuck audits" in said[-1] and "will not let auditctl write" in said[-1], said
    assert "cannot reach the database" not in caplog.text


@pytest.mark.postgres_only
def test_a_worker_claims_and_creates_after_the_server_restarted_between_audits(own_postgres):
    """The worker's engine has no pre-ping (a beat pays one round trip): after a restart every idle
    pooled connection is dead, and the next claim, creation or end must replace its connection and
    go on, as a heartbeat does, instead of failing the worker's first write after each restart."""
    from auditctl import StuckAuditPrevention

    server, admin_engine = own_postgres
    guard = StuckAuditPrevention(server.url, worker_id="w", heartbeat_interval=0.5, stale_after=5)
    try:
        first = guard.create_audit("https://example.com/before")
        with guard.run(first):
            pass
        waiting = guard.create_audit("https://example.com/waiting")
        pooled = [guard.engine.raw_connection() for _ in range(3)]
        for connection in pooled:
            connection.close()  # idle in the pool: each will be dead after the restart
        admin_engine.dispose()
        server.restart()
        with guard.run(waiting) as run:  # the claim: the pooled connection is dead
            run.update_progress(step="after the restart")
        server.restart()
        created = guard.create_audit("https://example.com/after")  # the creation, likewise
        assert row(admin_engine, waiting)["status"] == COMPLETED
        assert row(admin_engine, created)["status"] == "pending"
    finally:
        guard.close()


@pytest.mark.parametrize("claimable", [True, False], ids=["claim-lands", "claim-refused"])
def test_stop_during_claim_does_not_record_a_clean_stop(engine, guards, monkeypatch, claimable):
    """stop() (a shutdown hook) came while another thread's run() was inside its claim: it saw no run and
    marked the instance stopped, and the claim then landed, an audit running under an instance every
    judge takes for gone (worker_gone). It is marked stopped when the claim has ended, and its run with it."""
    from auditctl import worker
    from auditctl.errors import AuditNotClaimable
    from auditctl.rules import gone_instances

    guard = guards()
    guard.start_heartbeat_monitor()
    audit_id = guard.create_audit("https://example.com/claimed-during-stop")
    if not claimable:
        with guard.run(audit_id):
            pass
    claiming, release = threading.Event(), threading.Event()
    claim = worker.leases.claim

    def slow_claim(*args, **kwargs):
        claiming.set()
        assert release.wait(30)
        return claim(*args, **kwargs)

    monkeypatch.setattr(worker.leases, "claim", slow_claim)
    seen = []

    def work():
        try:
            with guard.run(audit_id) as run:
                seen.append(guard.instance_id in gone_instances(engine))
                seen.append(run.update_progress(step="working"))
        except AuditNotClaimable:
            seen.append("not claimable")

    thread = threading.Thread(target=work)
    thread.start()
    assert claiming.wait(10)
    guard.stop()  # decides while the claim is in flight
    release.set()
    thread.join(30)
    if claimable:
        assert seen == [False, True], "the claimed audit ran under an instance marked stopped"
        assert row(engine, audit_id)["status"] == COMPLETED
    else:
        assert seen == ["not claimable"]
    wait_for(lambda: guard.instance_id in gone_instances(engine), timeout=10,
             message="the instance marked stopped once the claim and its run ended")


_FORKED_CHILD_CALLS = '''
import json, os, sys
from auditctl import StuckAuditPrevention, leases
from auditctl.errors import ConfigError

guard = StuckAuditPrevention(sys.argv[1], worker_id="parent", heartbeat_interval=0.5, stale_after=60, max_age=600,
                             stall_after=600)
running = guard.create_audit("https://example.com/someone-elses")
leases.claim(guard.engine, running, worker_id="someone-else", instance_id="elsewhere", worker_url=None)
calls = {
    "create_audit": lambda: guard.create_audit("https://example.com/made-in-the-child"),
    "cleanup_stuck_audits_on_startup": guard.cleanup_stuck_audits_on_startup,
    "_recover_stuck_audit": lambda: guard._recover_stuck_audit(running),
    "_heartbeat_cleanup": guard._heartbeat_cleanup,
}
read, write = os.pipe()
child = os.fork()
if child == 0:
    outcome = {}
    for name, call in calls.items():
        try:
            call()
            outcome[name] = "ran"
        except ConfigError as error:
            outcome[name] = "refused" if "make a new one in the child" in str(error) else repr(error)
        except Exception as error:
            outcome[name] = repr(error)
    os.write(write, json.dumps(outcome).encode())
    os._exit(0)
os.close(write)
os.waitpid(child, 0)
with os.fdopen(read) as answer:
    print(answer.read(), flush=True)
guard.stop()
'''


def test_a_forked_child_is_refused_the_guards_audit_and_recovery_calls(tmp_path, database_url, engine):
    """run(), update_progress() and start_heartbeat_monitor() already refused a forked child; these wrote
    through the parent's pooled connections (shared sockets), as the parent's worker."""
    script = tmp_path / "forked_calls.py"
    script.write_text(_FORKED_CHILD_CALLS)
    proc = spawn(script, database_url)
    outcome = json.loads(read_line(proc, timeout=60))
    assert proc.wait(30) == 0, proc.stderr.read()
    assert outcome == {"create_audit": "refused", "cleanup_stuck_audits_on_startup": "refused",
                       "_recover_stuck_audit": "refused", "_heartbeat_cleanup": "refused"}
    assert row(engine, 1)["status"] == RUNNING, "the child recovered nothing"
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audits")).scalar() == 1, "the child created nothing"


def test_close_during_a_run_gives_the_runs_connections_back_when_the_run_ends(engine, guards):
    """close() (a shutdown hook on another thread) while a run goes on: the pools it emptied were
    filled again by the run's end, its final write and the instance's stop, and never emptied again."""
    from auditctl.rules import gone_instances

    guard = guards()
    guard.start_heartbeat_monitor()
    audit_id = guard.create_audit("https://example.com/closed-mid-run")
    with guard.run(audit_id) as run:
        closer = threading.Thread(target=guard.close)
        closer.start()
        closer.join(30)
        assert run.update_progress(step="still working") is True
        held = run._connection.driver  # checked out of the pool close() emptied, which forgot it
    assert row(engine, audit_id)["status"] == COMPLETED
    assert guard.instance_id in gone_instances(engine), "marked stopped once its last run ended"
    if isinstance(held, sqlite3.Connection):
        with pytest.raises(sqlite3.ProgrammingError):
            held.execute("SELECT 1")
    else:
        assert held.closed, "the run's own connection is still open"
    for pool in (guard.engine.pool, guard.operator_engine.pool):
        assert (pool.checkedout(), pool.checkedin()) == (0, 0), f"{pool.status()}: connections left open after close()"


def test_stop_with_timeout_zero_does_not_wait_for_a_hanging_webhook(engine, guards):
    """stop(timeout=0) waits for nothing, as its docstring says; it waited a second more for the alert
    sender while a webhook hung (the delivery in flight is covered by its claim, and retried)."""
    from dbtools import make_running
    from webhooks import Answer, Webhook

    hook = Webhook()
    try:
        hook.always(Answer(hang=60))
        guard = guards(webhook=hook.url(), notify_timeout=30)
        make_running(engine, 1, silent_for=700, worker_id="someone-else")
        assert guard._monitor_once() is True  # recovers it and kicks the sender
        hook.wait_for(1)  # the delivery hangs in the sender's thread
        started = time.monotonic()
        guard.stop(timeout=0)
        took = time.monotonic() - started
        assert took < 0.5, f"stop(timeout=0) took {took:.2f}s with a hanging webhook"
    finally:
        hook.close()


def test_runs_keep_beating_while_only_the_registry_write_is_refused(engine, guards):
    """Another tool's trigger refuses every update of the workers table: the registry beat fails
    each round, but the runs' own beats still reach their audits, so a healthy run is not left to
    look stale (and be recovered) for a trouble that is not its own."""
    guard = guards(heartbeat_interval=0.2, stale_after=2, max_age=30, stall_after=3)
    guard.start_heartbeat_monitor()
    audit_id = guard.create_audit("https://example.com/registry-refused")
    with guard.run(audit_id):
        install_abort_trigger(engine, "no_registry_beats", table="workers")
        try:
            refused_from = row(engine, audit_id)["heartbeat_at"]
            time.sleep(1.2)  # six rounds of the heartbeat thread
            assert row(engine, audit_id)["heartbeat_at"] > refused_from, "the run's beats went on"
            assert row(engine, audit_id)["status"] == RUNNING
        finally:
            drop_trigger(engine, "no_registry_beats", table="workers")


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_registry_beat_stuck_on_a_row_lock_is_no_outage_when_the_runs_beats_get_through(engine, guards):
    """Another session holds the workers row: the registry beat gives up, but the runs' beats reach the
    database, so it is there. Taken for an outage, the next monitor pass would measure silence afresh
    and leave an audit whose worker really died uncaught for another stale_after."""
    guard = guards()
    audit_id = guard.create_audit("https://example.com/registry-row-locked")
    with guard.run(audit_id):
        before = row(engine, audit_id)["heartbeat_at"]
        with engine.connect() as holder:
            holder.execute(text("SELECT 1 FROM workers WHERE instance_id = :i FOR UPDATE"), {"i": guard.instance_id})
            guard._beat_once()
            holder.rollback()
        assert row(engine, audit_id)["heartbeat_at"] > before, "the run's beat got through"
        assert not guard.monitor.in_outage


def test_a_refused_registry_beat_is_no_outage_when_the_guard_runs_no_audit(engine, guards, caplog):
    """The database answered (another tool's trigger refused the workers row): that is no outage, even with
    no run's beat to show the database is there, so the next monitor pass does not restart every silence."""
    guard = guards()
    install_abort_trigger(engine, "no_registry_beats", table="workers")
    with caplog.at_level("ERROR", logger="auditctl"):
        assert guard._beat_once() is True
    assert not guard.monitor.in_outage
    assert "refused this instance's own beat" in caplog.text


def test_a_closed_guard_refuses_new_work_and_a_second_close_does_nothing(engine, guards):
    """close() ends the guard: a run(), create_audit(), a monitor start or pass after it raises
    ConfigError ("closed") before anything is written, instead of opening the pools it emptied
    again (and marking the stopped instance running again). close() a second time does nothing."""
    from auditctl.errors import ConfigError
    from auditctl.rules import gone_instances

    guard = guards()
    audit_id = guard.create_audit("https://example.com/after-close")
    guard.close()
    assert guard.instance_id in gone_instances(engine)
    refused = [lambda: guard.run(audit_id).__enter__(), lambda: guard.create_audit("https://example.com/more"),
               guard.start_heartbeat_monitor, guard.cleanup_stuck_audits_on_startup, guard._heartbeat_cleanup,
               lambda: guard._recover_stuck_audit(audit_id)]
    for call in refused:
        with pytest.raises(ConfigError, match="closed"):
            call()
    guard.close()
    guard.stop()
    assert row(engine, audit_id)["status"] == "pending", "nothing was claimed"
    assert guard.instance_id in gone_instances(engine), "still marked stopped"
    for pool in (guard.engine.pool, guard.operator_engine.pool):
        assert (pool.checkedout(), pool.checkedin()) == (0, 0), f"{pool.status()}: connections opened after close()"


def _open_connections(url: str) -> int:
    """Connections this process holds to the database: sessions on the PostgreSQL server, or file
    descriptors open on the SQLite file (counted by the kernel, whatever object holds them)."""
    from sqlalchemy.engine import make_url

    from auditctl.db import create_engine

    where = make_url(url)
    if where.get_backend_name() == "sqlite":
        path = os.path.realpath(where.database)
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == path for fd in os.listdir("/proc/self/fd"))
    counter = create_engine(url)
    try:
        with counter.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND pid <> pg_backend_pid()")).scalar()
    finally:
        counter.dispose()


def test_a_guard_whose_start_fails_leaves_no_connection_open_when_the_schema_is_missing(blank_database_url):
    """The start connected (the schema check), then raised: no guard came back to close, and its
    connections stayed open until the garbage collector happened to find the engines; a worker that
    retries its start until `auditctl init` has run held two more on each try."""
    import gc

    from auditctl import StuckAuditPrevention
    from auditctl.errors import SchemaMissing

    gc.collect()
    gc.disable()  # what the collector would close some time later is not what the start closed
    try:
        for _attempt in range(3):
            with pytest.raises(SchemaMissing):
                StuckAuditPrevention(blank_database_url, worker_id="worker-1", create_schema=False)
        assert _open_connections(blank_database_url) == 0, "a failed start left its connections open"
    finally:
        gc.enable()


_OWES_A_RECORD_AT_EXIT = '''
import sqlite3, sys
from sqlalchemy import event
from auditctl import LeaseLost, StuckAuditPrevention
from auditctl.history import Actor
from auditctl.recovery import recover_audits
from auditctl.schema import audits

guard = StuckAuditPrevention(sys.argv[1], worker_id="exits", heartbeat_interval=60, stale_after=600, max_age=3600,
                             stall_after=600)
guard.start_heartbeat_monitor()
audit_id = guard.create_audit("https://example.com/owed-at-exit")
holder = sqlite3.connect(guard.engine.url.database, isolation_level=None)
armed = []

def lock_the_recording(conn, cursor, statement, parameters, context, executemany):
    if armed and statement.strip().upper() == "BEGIN IMMEDIATE" and not holder.in_transaction:
        holder.execute("BEGIN IMMEDIATE")  # another process's write lock, as the record of the lost lease begins

event.listen(guard.engine, "before_cursor_execute", lock_the_recording)
try:
    with guard.run(audit_id) as run:
        recover_audits(guard.operator_engine, audits.c.id == audit_id, reason="manual", explanation="taken away",
                       actor=Actor.command("test"))
        armed.append(True)
        run.heartbeat()
except LeaseLost:
    print("lost", flush=True)
event.remove(guard.engine, "before_cursor_execute", lock_the_recording)
holder.execute("ROLLBACK")
holder.close()
# The application exits without close(): the event it owes is recorded as it goes.
'''


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_lease_lost_event_owed_is_recorded_when_the_process_exits_without_close(tmp_path, database_url, engine):
    """The database refused the record of a lost lease at the time (locked), so the guard owed it to
    its next heartbeat round or close(). A process that exited first dropped it without a word."""
    script = tmp_path / "owes_a_record.py"
    script.write_text(_OWES_A_RECORD_AT_EXIT)
    proc = spawn(script, database_url)
    assert read_line(proc, timeout=60) == "lost"
    code, _out, stderr = finish(proc, timeout=60)
    assert code == 0, stderr
    late = [e for e in events(engine, 1) if e["event"] == "lease_lost"]
    assert len(late) == 1 and late[0]["details"]["recorded_late"] is True


def test_exiting_with_a_run_under_way_in_a_daemon_thread_warns_when_the_audit_is_left_running(
        tmp_path, database_url, engine):
    """The exit marked the instance stopped (so the audit is recovered as worker_gone) and said only
    "HEARTBEAT monitor stopped": nothing told the operator that an audit was left unfinished."""
    script = tmp_path / "exits_with_a_run.py"
    script.write_text(_EXITS_WITH_A_RUN)
    proc = spawn(script, database_url)
    assert read_line(proc, timeout=60) is not None  # the instance id, once the run is under way
    code, _out, stderr = finish(proc, timeout=60)
    assert code == 0, stderr
    assert "exiting with audit(s) 1 still running here" in stderr, stderr
    assert row(engine, 1)["status"] == RUNNING
