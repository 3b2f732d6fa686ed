"""The worker-side guard: runs, fencing, heartbeats, the emergency path, identity and shutdown.

Where the scenario is about a process (paused, killed, terminated, a second live process
with the same worker_id) the worker is a real subprocess running a small script.
"""

from __future__ import annotations

import contextlib
import logging
import re
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
from dbtools import (
    drop_trigger,
    events,
    fail_progress_writes,
    finish,
    freeze_between_writes,
    install_abort_trigger,
    kill_quietly,
    read_line,
    row,
    spawn,
    wait_for,
    worker_rows,
    writer_holds_a_lock,
)
from sqlalchemy.engine import make_url

from auditctl import LeaseLost, StuckAuditPrevention, registry
from auditctl.history import Actor
from auditctl.progress import MAX_DOCUMENT_BYTES
from auditctl.recovery import recover_audits, recover_stuck
from auditctl.rules import find_stuck
from auditctl.schema import COMPLETED, FAILED, RUNNING, audits
from auditctl.thresholds import Thresholds

OPERATOR = Actor.command("recover")
PATIENT = {"heartbeat_interval": 60, "stale_after": 600, "max_age": 1800, "stall_after": 600}


def recover_now(engine, audit_id):
    """An operator takes the audit away from its worker, whatever the rules say."""
    (recovery,) = recover_audits(engine, audits.c.id == audit_id, reason="manual", explanation="taken away by the test",
                                 actor=OPERATOR)
    return recovery


def distinct_values(read, count, *, timeout=10.0, message="values"):
    """Poll ``read()`` until it has returned ``count`` different values; return them in order seen."""
    seen = []

    def enough():
        value = read()
        if not seen or seen[-1] != value:
            seen.append(value)
        return len(seen) >= count

    wait_for(enough, timeout=timeout, message=message)
    return seen


# --- run ----------------------------------------------------------------------------------


def test_run_marks_audit_completed_on_clean_exit(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        assert row(engine, audit_id)["status"] == RUNNING
        assert guard.active_audits == [audit_id]
        assert run.update_progress(step="Crawling", completed_tasks=20, total_tasks=20) is True

    done = row(engine, audit_id)
    assert done["status"] == COMPLETED
    assert done["error"] is None and done["lease"] is None and done["finished_at"] is not None
    assert done["progress"]["progress"]["is_running"] is False
    assert done["progress"]["progress"]["percentage"] == 100.0
    assert guard.active_audits == []
    assert events(engine, audit_id) == []


def test_run_marks_audit_failed_with_error_text_when_the_block_raises(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(ValueError, match="scanner crashed"), guard.run(audit_id):
        raise ValueError("scanner crashed")

    failed = row(engine, audit_id)
    assert failed["status"] == FAILED
    assert failed["error"] == "ValueError: scanner crashed"
    assert failed["recovery_info"] is None
    assert guard.active_audits == []


def test_run_refuses_an_audit_that_is_not_pending(engine, guards):
    from auditctl.errors import AuditNotClaimable, AuditNotFound

    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id):
        pass
    with pytest.raises(AuditNotClaimable, match="completed"), guard.run(audit_id):
        pass  # pragma: no cover
    with pytest.raises(AuditNotFound), guard.run(10**9):
        pass  # pragma: no cover
    assert row(engine, audit_id)["status"] == COMPLETED


# --- fencing ------------------------------------------------------------------------------


def test_worker_gets_lease_lost_after_recovery_and_its_write_changes_nothing(engine, guards, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(LeaseLost), guard.run(audit_id) as run:
        run.update_progress(step="Crawling", percentage=30)
        recover_now(engine, audit_id)
        recovered = row(engine, audit_id)

        with pytest.raises(LeaseLost) as lost:
            run.update_progress(step="Reporting", percentage=90)
        assert lost.value.audit_id == audit_id
        assert row(engine, audit_id) == recovered
        assert run.lost

        (late,) = [e for e in events(engine, audit_id) if e["event"] == "lease_lost"]
        assert (late["from_status"], late["to_status"]) == (FAILED, FAILED)
        assert late["actor"].startswith("worker worker-1")
        assert late["details"]["write"] == "progress"

        with pytest.raises(LeaseLost):  # known lost: refused without touching the database
            run.heartbeat()
        with pytest.raises(LeaseLost):
            run.update_progress(step="Reporting", percentage=95)
        run._mark_lost(LeaseLost(audit_id))  # the heartbeat thread's beat, in flight as the write found it lost
        assert [e["event"] for e in events(engine, audit_id)] == ["recovered", "lease_lost"]
        assert caplog.text.count("LEASE LOST") == 1, "one lost lease, said once"
        raise lost.value

    assert row(engine, audit_id) == recovered


@pytest.mark.parametrize("write", ["heartbeat", "emergency", "progress", "finish"])
def test_each_fenced_write_after_recovery_is_refused_and_recorded_under_its_own_name(engine, write):
    """Every fenced write a recovered worker attempts raises LeaseLost, changes nothing, and leaves
    one lease_lost row naming the write, the lease, the worker and the instance, by its actor."""
    from auditctl import leases

    audit_id = leases.create_audit(engine, "https://example.com/fenced")
    lease, _ = leases.claim(engine, audit_id, worker_id="fenced-worker", instance_id="fenced-instance", worker_url=None)
    actor = Actor.worker("fenced-worker", "fenced-instance")
    recover_now(engine, audit_id)
    recovered = row(engine, audit_id)
    attempt = {
        "heartbeat": lambda: leases.heartbeat(engine, lease, actor),
        "emergency": lambda: leases.minimal_write(engine, lease, actor),
        "progress": lambda: leases.write_progress(engine, lease, {"step": "Late", "percentage": 50.0, "completed_tasks": 1,
                                                          "total_tasks": 2}, "sig", None, actor),
        "finish": lambda: leases.finish(engine, lease, error=None, actor=actor),
    }[write]
    with pytest.raises(LeaseLost) as lost:
        attempt()
    assert lost.value.audit_id == audit_id and row(engine, audit_id) == recovered
    (late,) = [e for e in events(engine, audit_id) if e["event"] == "lease_lost"]
    assert (late["from_status"], late["to_status"], late["actor"]) == (FAILED, FAILED, actor.name)
    assert late["details"] == {"write": write, "lease": lease.token, "worker_id": "fenced-worker",
                               "instance_id": "fenced-instance"}


def test_a_progress_write_and_the_finish_stamp_the_document_with_the_database_time(engine):
    """What write_progress stores and returns: the report, running, the lease's worker and URL,
    and stamps; finishing marks the document not running and stamps last_updated again."""
    from datetime import datetime, timedelta, timezone

    from auditctl import leases
    from sqlalchemy import update

    from auditctl.transactions import write_transaction
    from auditctl.timestamps import parse

    audit_id = leases.create_audit(engine, "https://example.com/stamped")
    lease, _ = leases.claim(engine, audit_id, worker_id="stamper", instance_id="stamper-1", worker_url="http://stamper:8080")
    actor = Actor.worker("stamper", "stamper-1")
    fields = {"step": "Crawling", "percentage": 40.0, "completed_tasks": 4, "total_tasks": 10}
    returned = leases.write_progress(engine, lease, fields, "sig-1", None, actor)
    stored = row(engine, audit_id)["progress"]
    for document in (returned, stored):
        progress = document["progress"]
        assert {k: progress[k] for k in fields} == fields
        assert (progress["is_running"], progress["worker_id"], progress["worker_url"]) == (True, "stamper", "http://stamper:8080")
        for stamp in (progress["last_updated"], progress["heartbeat"], document["last_worker_update"]):
            assert abs(parse(stamp) - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert stored["progress"]["heartbeat"] == stored["progress"]["last_updated"] == stored["last_worker_update"]
    with write_transaction(engine) as connection:  # an old stamp, so the finish's own is seen
        connection.execute(update(audits).where(audits.c.id == audit_id).values(progress={
            **stored, "progress": {**stored["progress"], "last_updated": "2020-01-01T00:00:00.000Z"}}))
    assert leases.finish(engine, lease, error=None, actor=actor) == COMPLETED
    finished = row(engine, audit_id)["progress"]
    assert finished["progress"]["is_running"] is False
    assert finished["progress"]["last_updated"] == finished["progress"]["heartbeat"] != "2020-01-01T00:00:00.000Z"


def test_a_heartbeat_stamps_the_documents_heartbeat_and_last_worker_update_but_not_last_updated(engine):
    from sqlalchemy import update

    from auditctl import leases
    from auditctl.transactions import write_transaction

    audit_id = leases.create_audit(engine, "https://example.com/beating")
    lease, _ = leases.claim(engine, audit_id, worker_id="beater", instance_id="beater-1", worker_url=None)
    old = "2020-01-01T00:00:00.000Z"
    stored = row(engine, audit_id)["progress"]
    with write_transaction(engine) as connection:  # old stamps, so the heartbeat's own are seen
        connection.execute(update(audits).where(audits.c.id == audit_id).values(progress={
            **stored, "last_worker_update": old,
            "progress": {**stored["progress"], "heartbeat": old, "last_updated": old}}))
    leases.heartbeat(engine, lease, Actor.worker("beater", "beater-1"))
    beaten = row(engine, audit_id)["progress"]
    assert beaten["progress"]["heartbeat"] == beaten["last_worker_update"] != old
    assert beaten["progress"]["last_updated"] == old, "a heartbeat is no progress"


def test_the_document_a_progress_write_returns_is_stamped_in_utc_whatever_the_hosts_time_zone(engine, monkeypatch):
    import time as clock
    from datetime import datetime, timedelta, timezone

    from auditctl import leases
    from auditctl.timestamps import parse

    audit_id = leases.create_audit(engine, "https://example.com/zoned")
    lease, _ = leases.claim(engine, audit_id, worker_id="w", instance_id="w-1", worker_url=None)
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30
    clock.tzset()
    try:
        returned = leases.write_progress(engine, lease, {"step": "Crawling", "percentage": 1.0, "completed_tasks": None,
                                                         "total_tasks": None}, "sig", None, Actor.worker("w", "w-1"))
    finally:
        monkeypatch.delenv("TZ")
        clock.tzset()
    stamp = parse(returned["progress"]["last_updated"])
    assert abs(stamp - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_a_run_keeps_its_longest_silence_and_longest_stall_through_every_kind_of_write(engine, backdate):
    """longest_gap_seconds and longest_stall_seconds (what `report` suggests thresholds from) grow
    to the longest silence and stall each beat, progress write and finish ends, and never shrink."""
    from auditctl import leases

    audit_id = leases.create_audit(engine, "https://example.com/gaps")
    lease, _ = leases.claim(engine, audit_id, worker_id="w", instance_id="w-1", worker_url=None)
    actor = Actor.worker("w", "w-1")

    def gaps():
        found = row(engine, audit_id)
        return found["longest_gap_seconds"], found["longest_stall_seconds"]

    assert gaps() == (0.0, 0.0)
    backdate(audit_id, heartbeat_at=100, progress_changed_at=200)
    leases.heartbeat(engine, lease, actor)
    gap, stall = gaps()
    assert 99 <= gap < 110 and 199 <= stall < 210
    leases.heartbeat(engine, lease, actor)
    again_gap, again_stall = gaps()
    assert again_gap == gap, "a short silence after a long one keeps the long one"
    assert stall <= again_stall < stall + 5, "the stall goes on: no progress was reported"

    backdate(audit_id, heartbeat_at=300, progress_changed_at=400)
    leases.write_progress(engine, lease, {"step": "Crawling", "percentage": 10.0, "completed_tasks": None,
                                          "total_tasks": None}, "sig-1", None, actor)
    gap, stall = gaps()
    assert 299 <= gap < 310 and 399 <= stall < 410

    backdate(audit_id, heartbeat_at=500, progress_changed_at=30)
    assert leases.finish(engine, lease, error=None, actor=actor) == COMPLETED
    final_gap, final_stall = gaps()
    assert 499 <= final_gap < 510 and final_stall == stall


def test_leaving_the_run_block_after_lease_lost_writes_nothing(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(LeaseLost, match="not written"), guard.run(audit_id) as run:
        recover_now(engine, audit_id)
        try:
            run.update_progress(step="Crawling", percentage=50)
        except LeaseLost:
            pass  # a careless worker swallows it and carries on to the end of the block
        recovered, history = row(engine, audit_id), events(engine, audit_id)

    assert row(engine, audit_id) == recovered
    assert events(engine, audit_id) == history
    assert recovered["status"] == FAILED


def test_a_report_after_a_lost_runs_block_ended_still_says_lease_lost_not_run_ended(engine, guards):
    """A run taken away stays "taken away" after its block: the late caller is told why, as before the end."""
    from auditctl.errors import RunEnded

    guard = guards()
    audit_id = guard.create_audit("https://example.com/taken-away")
    with pytest.raises(LeaseLost), guard.run(audit_id) as run:
        recover_now(engine, audit_id)
        run.update_progress(step="Crawling")
    for late in (lambda: run.update_progress(step="Late"), run.heartbeat):
        with pytest.raises(LeaseLost) as raised:
            late()
        assert not isinstance(raised.value, RunEnded)


def test_worker_that_raises_after_lease_lost_does_not_record_its_failure(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(RuntimeError), guard.run(audit_id) as run:
        recover_now(engine, audit_id)
        with pytest.raises(LeaseLost):
            run.update_progress(percentage=10)
        recovered, history = row(engine, audit_id), events(engine, audit_id)
        raise RuntimeError("cleanup after the lost lease went wrong")
    assert row(engine, audit_id) == recovered
    assert events(engine, audit_id) == history


def test_an_outer_run_ends_as_failed_when_a_nested_runs_lease_lost_leaves_its_block(engine, guards):
    guard = guards()
    outer_id, inner_id = guard.create_audit("https://example.com/outer"), guard.create_audit("https://example.com/inner")
    with pytest.raises(LeaseLost) as raised, guard.run(outer_id):
        with guard.run(inner_id) as inner:
            recover_now(engine, inner_id)
            inner.update_progress(step="Crawling")
    assert raised.value.audit_id == inner_id
    outer = row(engine, outer_id)
    assert outer["status"] == FAILED and "LeaseLost" in outer["error"], "the outer audit was left running"
    assert outer["lease"] is None


# --- the heartbeat thread -------------------------------------------------------------------


def test_heartbeat_thread_keeps_a_running_audit_fresh(engine, guards):
    guard = guards(heartbeat_interval=0.2)
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        run.update_progress(step="Crawling", percentage=5)
        guard.start_heartbeat_monitor(handle_sigterm=False)
        beats = distinct_values(lambda: row(engine, audit_id)["heartbeat_at"], 4, message="heartbeats")
        assert beats == sorted(beats)
        current = row(engine, audit_id)
        assert current["progress"]["progress"]["step"] == "Crawling"  # the beat keeps the document
        assert current["progress"]["progress"]["heartbeat"] >= current["progress"]["progress"]["last_updated"]
    guard.stop()
    assert row(engine, audit_id)["status"] == COMPLETED


def test_heartbeat_thread_stops_beating_for_a_recovered_audit(engine, guards, database_url):
    guard = guards(heartbeat_interval=0.2)
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(LeaseLost), guard.run(audit_id) as run:
        guard.start_heartbeat_monitor(handle_sigterm=False)
        distinct_values(lambda: row(engine, audit_id)["heartbeat_at"], 2, message="a first heartbeat")
        recover_now(engine, audit_id)
        wait_for(lambda: run.lost, message="the heartbeat thread to notice the lost lease")
        frozen = row(engine, audit_id)
        # The thread keeps looping (the instance keeps beating) but leaves the audit alone.
        distinct_values(lambda: worker_rows(engine, "worker-1")[0]["last_heartbeat_at"], 3, message="instance beats")
        assert row(engine, audit_id) == frozen
        assert [e["event"] for e in events(engine, audit_id)] == ["recovered", "lease_lost"]
        assert events(engine, audit_id)[1]["details"]["write"] == "heartbeat"
        assert guard._thread.is_alive()
        run.update_progress(percentage=99)
    assert row(engine, audit_id) == frozen


# --- the emergency path -----------------------------------------------------------------------


def _assert_minimal_write_only(engine, backdate, run, audit_id, caplog, break_database=None, **report):
    assert run.update_progress(step="Crawling", percentage=10) is True
    backdate(audit_id, heartbeat_at=30, last_worker_update=30)
    if break_database is not None:
        break_database()
    before = row(engine, audit_id)
    with caplog.at_level(logging.WARNING, logger="auditctl"):
        assert run.update_progress(**report) is False
    after = row(engine, audit_id)
    assert after["status"] == RUNNING and after["lease"] == before["lease"]
    assert after["heartbeat_at"] > before["heartbeat_at"]
    assert after["last_worker_update"] > before["last_worker_update"]
    unchanged = ("progress", "progress_signature", "progress_changed_at", "recovery_info", "error")
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert run.emergency_writes == 1
    assert "🚨 Emergency progress recovery" in caplog.text
    assert find_stuck(engine, Thresholds(stale_after=20, max_age=1800, stall_after=600)) == []


def test_unserialisable_progress_falls_back_to_the_minimal_write(engine, guards, backdate, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        _assert_minimal_write_only(engine, backdate, run, audit_id, caplog, step="Scanning", percentage=20, handle=object())
        assert run.update_progress(step="Scanning", percentage=20) is True  # the audit carries on
    assert row(engine, audit_id)["status"] == COMPLETED


def test_oversized_progress_falls_back_to_the_minimal_write(engine, guards, backdate, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        _assert_minimal_write_only(engine, backdate, run, audit_id, caplog, step="Scanning",
                                   findings="x" * (MAX_DOCUMENT_BYTES + 1))
        assert "64" in caplog.text or str(MAX_DOCUMENT_BYTES) in caplog.text
        assert run.update_progress(step="Scanning", findings="x" * 1000) is True
    assert row(engine, audit_id)["status"] == COMPLETED


def test_database_error_on_the_progress_write_falls_back_to_the_minimal_write(engine, guards, backdate, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        _assert_minimal_write_only(engine, backdate, run, audit_id, caplog, break_database=lambda: fail_progress_writes(engine),
                                   step="Scanning", percentage=20)
        assert "boom" in caplog.text  # a real error from the database, not a simulated one
        drop_trigger(engine, "refuse_progress")
        assert run.update_progress(step="Scanning", percentage=20) is True
    assert row(engine, audit_id)["status"] == COMPLETED


@pytest.mark.parametrize("failure", ["unserialisable extra", "database refuses"])
def test_a_step_reported_in_a_failed_write_is_kept_when_the_next_report_leaves_the_step_out(engine, guards, failure):
    """The report the database did not take was forgotten: the next report, giving counts only,
    stored the step from before it, so the audit showed "Phase 1" through the whole of phase 2."""
    guard = guards()
    audit_id = guard.create_audit("https://example.com/phases")
    with guard.run(audit_id) as run:
        assert run.update_progress(step="Phase 1", completed_tasks=1, total_tasks=10) is True
        if failure == "database refuses":
            fail_progress_writes(engine)
            assert run.update_progress(step="Phase 2", completed_tasks=2) is False
            drop_trigger(engine, "refuse_progress")
        else:
            assert run.update_progress(step="Phase 2", completed_tasks=2, handle=object()) is False
        assert run.update_progress(completed_tasks=3) is True
        stored = row(engine, audit_id)["progress"]["progress"]
    assert (stored["step"], stored["completed_tasks"], stored["total_tasks"], stored["percentage"]) == \
        ("Phase 2", 3, 10, 30.0)


def test_database_refusing_every_write_does_not_kill_the_audit(engine, guards, caplog):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        before = row(engine, audit_id)
        install_abort_trigger(engine, "refuse_all")
        with caplog.at_level(logging.WARNING, logger="auditctl"):
            assert run.update_progress(step="Scanning", percentage=20) is False  # no exception reaches the audit
        assert row(engine, audit_id) == before
        assert run.emergency_writes == 0
        assert re.search(r"failed \d+ times|gave up after \d+ tries", caplog.text)
        drop_trigger(engine, "refuse_all")
        assert run.update_progress(step="Scanning", percentage=30) is True
    assert row(engine, audit_id)["status"] == COMPLETED


def test_finish_is_retried_until_the_database_takes_it(engine, guards):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    install_abort_trigger(engine, "refuse_finish", when_sqlite="NEW.status = 'completed'",
                          when_pg="NEW.status = 'completed'")
    with guard.run(audit_id):
        back = threading.Timer(0.3, drop_trigger, args=(engine, "refuse_finish"))
        back.start()
    back.join()
    assert row(engine, audit_id)["status"] == COMPLETED


# --- real worker processes ----------------------------------------------------------------------

WORKER = r"""
import sys, time
from auditctl import LeaseLost, StuckAuditPrevention

url, worker_id, mode, report = sys.argv[1:5]


def note(line):
    with open(report, "a") as f:
        f.write(line + "\n")


guard = StuckAuditPrevention(url, worker_id=worker_id, heartbeat_interval=0.2, stale_after=1, max_age=60,
                             stall_after=30, create_schema=False)
if mode == "monitor":
    guard.start_heartbeat_monitor()
audit_id = guard.create_audit("https://example.com/" + worker_id)
try:
    with guard.run(audit_id) as run:
        print("READY", audit_id, guard.instance_id, flush=True)
        tick = 0
        while True:
            tick += 1
            try:
                stored = run.update_progress(step="Crawling", completed_tasks=tick, total_tasks=1000000)
            except LeaseLost:
                note(f"lease_lost {tick}")
                raise
            note(f"wrote {tick} {stored}")
            time.sleep(0.1)
except LeaseLost:
    note("left the run block with LeaseLost")
    sys.exit(3)
"""


@pytest.fixture
def worker_process(tmp_path, database_url):
    """Start the worker script as a real process: returns (proc, audit_id, instance_id, report_path)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started = []

    def start(worker_id, mode="run"):
        report = tmp_path / f"{worker_id}.log"
        proc = spawn(script, database_url, worker_id, mode, report)
        started.append(proc)
        _, audit_id, instance_id = read_line(proc, startswith="READY").split()
        wait_for(lambda: report.exists() and "wrote 2 True" in report.read_text(), message="the worker to write progress")
        return proc, int(audit_id), instance_id, report

    yield start
    for proc in started:
        kill_quietly(proc)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to see that SIGSTOP took effect")
def test_paused_worker_gets_lease_lost_after_recovery_and_changes_nothing(engine, worker_process):
    proc, audit_id, instance_id, report = worker_process("paused-worker")
    freeze_between_writes(proc, engine, audit_id)
    try:
        last_stored = row(engine, audit_id)["progress"]["progress"]["completed_tasks"]
        short = Thresholds(stale_after=1, max_age=60, stall_after=30)
        wait_for(lambda: find_stuck(engine, short, ids=[audit_id]), message="the frozen worker to go stale")
        (recovery,) = recover_stuck(engine, short, actor=OPERATOR, ids=[audit_id])
        assert recovery.reasons == ["stale_heartbeat"]
        recovered = row(engine, audit_id)
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    code, _, err = finish(proc, timeout=20)
    assert code == 3, err
    assert row(engine, audit_id) == recovered
    lines = report.read_text().splitlines()
    assert lines[-2:] == [f"lease_lost {last_stored + 1}", "left the run block with LeaseLost"]  # the very next write
    assert all(int(line.split()[1]) <= last_stored for line in lines if line.startswith("wrote"))
    history = events(engine, audit_id)
    assert [e["event"] for e in history] == ["recovered", "lease_lost"]
    assert history[1]["details"]["instance_id"] == instance_id and history[1]["pid"] == proc.pid


def _wait_until_unlocked(engine, audit_id):
    # A killed process's transaction is rolled back by the server once it sees the socket close.
    wait_for(lambda: not writer_holds_a_lock(engine, audit_id), message="the dead worker's locks to go")


def test_worker_killed_with_sigkill_is_recovered_by_the_next_startup_cleanup_at_once(engine, guards, worker_process):
    proc, audit_id, instance_id, _ = worker_process("restarting-worker")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _wait_until_unlocked(engine, audit_id)
    left = row(engine, audit_id)
    assert left["status"] == RUNNING and left["worker_instance"] == instance_id

    restarted = guards(worker_id="restarting-worker", **PATIENT)  # stale_after 10 minutes: silence alone would not tell yet
    # ...but the registry proves the process gone, so any judge sees it at once (on a loaded
    # machine the killed worker's own stale_after of 1 s may have passed too),
    (verdict,) = find_stuck(engine, restarted.thresholds)
    assert verdict.reasons[0] == "worker_gone" and set(verdict.reasons) <= {"worker_gone", "stale_heartbeat"}
    assert "no longer exists" in verdict.explain()[0]
    # and the restarted worker's startup cleanup takes what its earlier instance left.
    recovered = restarted.cleanup_stuck_audits_on_startup()

    assert [(r.id, r.reasons) for r in recovered] == [(audit_id, ["worker_restarted"])]
    after = row(engine, audit_id)
    assert after["status"] == FAILED
    assert after["recovery_info"]["reason"] == "worker_restarted"
    assert after["recovery_info"]["original_status"]["worker_instance"] == instance_id
    (event,) = events(engine, audit_id)
    assert event["actor"] == f"worker restarting-worker ({restarted.instance_id[:8]})"
    assert event["measurements"]["silence_seconds"] < 30
    assert restarted.duplicates == []


def test_second_live_process_with_the_same_worker_id_leaves_the_first_alone_and_reports_it(engine, guards, worker_process,
                                                                                          caplog):
    proc, audit_id, first_instance, report = worker_process("reused-pod-name")
    held = row(engine, audit_id)

    with caplog.at_level(logging.ERROR, logger="auditctl"):
        second = guards(worker_id="reused-pod-name", **PATIENT)
    assert [d.instance_id for d in second.duplicates] == [first_instance]
    assert second.duplicates[0].pid == proc.pid
    assert "also used by a live instance" in caplog.text
    assert second.cleanup_stuck_audits_on_startup() == []

    still = row(engine, audit_id)
    assert (still["status"], still["lease"], still["worker_instance"]) == (RUNNING, held["lease"], first_instance)
    writes = report.read_text().count("wrote")
    wait_for(lambda: report.read_text().count("wrote") > writes + 1, message="the first worker to keep writing")
    assert "lease_lost" not in report.read_text()
    assert proc.poll() is None


def test_two_guards_in_one_process_with_one_worker_id(engine, guards):
    from auditctl import leases

    first = guards(worker_id="shared", **PATIENT)
    audit_id = first.create_audit("https://example.com")
    leases.claim(engine, audit_id, worker_id="shared", instance_id=first.instance_id, worker_url=None)

    second = guards(worker_id="shared", **PATIENT)
    assert [d.instance_id for d in second.duplicates] == [first.instance_id]
    assert second.cleanup_stuck_audits_on_startup() == []
    assert row(engine, audit_id)["status"] == RUNNING

    first.stop()  # gone for good: what it held is a leftover now
    third = guards(worker_id="shared", **PATIENT)
    assert [d.instance_id for d in third.duplicates] == [second.instance_id]
    assert [(r.id, r.reasons) for r in third.cleanup_stuck_audits_on_startup()] == [(audit_id, ["worker_restarted"])]


def test_a_duplicate_worker_id_is_reported_once_per_other_instance_not_at_every_look(engine, guards, caplog):
    """The monitor thread looks for duplicates every interval: the error is said when another live instance
    first shows up, not again at every look while it stays."""
    first = guards(worker_id="shared-quietly", **PATIENT)
    with caplog.at_level("ERROR", logger="auditctl"):
        second = guards(worker_id="shared-quietly", **PATIENT)
        second._check_duplicates()
        second._check_duplicates()
        third = guards(worker_id="shared-quietly", **PATIENT)
        second._check_duplicates()
    said = [r.getMessage() for r in caplog.records if "is also used by a live instance" in r.getMessage()]
    assert len([m for m in said if first.instance_id[:8] in m]) == 2, said  # once to second, once to third
    assert len([m for m in said if third.instance_id[:8] in m]) == 1, said  # to second, when third showed up


def test_guards_of_one_process_with_the_same_settings_share_one_monitor_pass_per_interval(engine, guards):
    """Twenty worker threads with a guard each made twenty fleet-wide passes per interval."""
    passes: dict[str, int] = {}

    def counted(guard):
        run_pass = guard.monitor.run_pass

        def counting():
            passes[guard.worker_id] = passes.get(guard.worker_id, 0) + 1
            return run_pass()

        guard.monitor.run_pass = counting
        return guard

    sharing = [counted(guards(worker_id=f"sharing-{n}", heartbeat_interval=0.5)) for n in range(4)]
    apart = counted(guards(worker_id="apart", heartbeat_interval=0.5, stale_after=3))  # other thresholds: its own passes
    for guard in (*sharing, apart):
        guard.start_heartbeat_monitor(handle_sigterm=False)
    time.sleep(3.0)
    shared = sum(passes.get(g.worker_id, 0) for g in sharing)
    own = passes.get("apart", 0)
    # About six passes each way in 3 s at a 0.5 s interval; four guards apart would make about twenty-four.
    assert 2 <= shared <= 10, passes
    assert own >= 2, passes

    runner = max(sharing, key=lambda g: passes.get(g.worker_id, 0))
    runner.stop()  # another guard takes the turn within an interval
    before = {g.worker_id: passes.get(g.worker_id, 0) for g in sharing if g is not runner}
    time.sleep(2.0)
    assert sum(passes.get(name, 0) - count for name, count in before.items()) >= 1, passes


def test_a_guard_that_takes_the_monitor_turn_knows_the_outages_the_others_saw_and_got_past(engine, guards):
    slow = {"heartbeat_interval": 2, "stale_after": 5}  # a pass takes far less than an interval here
    first, second = guards(worker_id="first", **slow), guards(worker_id="second", **slow)  # they share passes
    assert first._monitor_once() is True and first.monitor.seen_since is None
    second._mark_outage()  # second's heartbeat thread could not reach the database
    assert first._monitor_once() is True  # first's pass learns of it: silence is measured from now on
    resumed_at = first.monitor.seen_since
    assert resumed_at is not None and not first.monitor.in_outage
    assert second.monitor.in_outage, "second's own flag is stale now"
    time.sleep(0.5)
    assert second._monitor_once() is True  # skipped: first ran a pass half a second ago
    assert second._monitor_wait < 1.6, "second looks again when first's next pass is due, not a whole interval later"
    first.stop()
    time.sleep(first.heartbeat_interval)
    assert second._monitor_once() is True  # second takes the turn
    assert second.monitor.seen_since == resumed_at, "an outage already got past must not restart the silence"
    assert not second.monitor.in_outage


def test_an_outage_a_guard_reports_while_another_guards_pass_runs_is_kept_for_the_next_pass():
    """The pass ended well, but it had read the database before the outage: the next pass, whichever
    guard runs it, must still measure silence from when the database is back."""
    from auditctl.worker import PassTurns

    turns, settings = PassTurns(), ("sqlite:///fleet.db", "one setting")
    assert turns.take(settings, "first", 10.0) == 0.0
    started = time.monotonic()
    turns.outage(settings)  # another guard's heartbeat thread, while first's pass runs
    turns.passed(settings, started, False, None)
    assert turns.state(settings) == (True, None)


def test_sigterm_stops_a_worker_process_cleanly(engine, worker_process):
    proc, audit_id, instance_id, _ = worker_process("terminated-worker", mode="monitor")
    distinct_values(lambda: worker_rows(engine, "terminated-worker")[0]["last_heartbeat_at"], 3,
                    message="the heartbeat thread to beat")

    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, timeout=20)

    assert code in (0, 128 + signal.SIGTERM), err
    assert "Traceback" not in err
    (instance,) = worker_rows(engine, "terminated-worker")
    assert instance["instance_id"] == instance_id
    assert instance["stopped_at"] is not None
    ended = row(engine, audit_id)
    assert ended["status"] == FAILED and "SystemExit" in ended["error"]  # not left running for stale_after


# --- lifecycle -------------------------------------------------------------------------------------


def test_stop_joins_the_heartbeat_thread_and_marks_the_instance_stopped(engine, guards):
    guard = guards(**PATIENT)  # beats only once a minute: stop must not wait for the next beat
    previous = signal.getsignal(signal.SIGTERM)
    guard.start_heartbeat_monitor()
    thread = guard._thread
    assert thread.is_alive()
    assert signal.getsignal(signal.SIGTERM) == guard._on_sigterm

    started = time.monotonic()
    guard.stop()

    assert time.monotonic() - started < 5
    assert not thread.is_alive()
    assert signal.getsignal(signal.SIGTERM) == previous
    (instance,) = worker_rows(engine, "worker-1")
    assert instance["stopped_at"] is not None
    (judged,) = registry.instances(engine, 600, worker_id="worker-1")
    assert judged.alive is False


def test_durations_accept_seconds_as_int_or_float_and_timedelta(engine, guards):
    guard = guards(heartbeat_interval=timedelta(milliseconds=500), stale_after=2.5, max_age=30,
                   stall_after=timedelta(seconds=3))
    assert guard.heartbeat_interval == 0.5
    assert guard.thresholds == Thresholds(stale_after=2.5, max_age=30.0, stall_after=3.0)
    assert isinstance(guard.thresholds.max_age, float)
    deep = guard.create_audit("https://example.com/deep", max_age=timedelta(hours=2))
    quick = guard.create_audit("https://example.com/quick", max_age=90.5)
    plain = guard.create_audit("https://example.com/plain", max_age=600)
    assert [row(engine, i)["max_age_seconds"] for i in (deep, quick, plain)] == [7200.0, 90.5, 600.0]


def test_startup_cleanup_also_recovers_any_stuck_audit_of_the_fleet(engine, guards, start_audit, backdate):
    stuck, _ = start_audit(worker_id="someone-else")
    backdate(stuck, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    healthy, _ = start_audit(worker_id="someone-else")
    guard = guards(**PATIENT)
    assert [(r.id, r.reasons) for r in guard.cleanup_stuck_audits_on_startup()] == [(stuck, ["stale_heartbeat"])]
    assert row(engine, healthy)["status"] == RUNNING


def test_recover_stuck_audit_takes_one_running_audit_on_demand(engine, guards, start_audit):
    audit_id, _ = start_audit(worker_id="someone-else")
    guard = guards()
    recovery = guard._recover_stuck_audit(audit_id, explanation="operator asked")
    assert (recovery.id, recovery.reasons, recovery.status) == (audit_id, ["manual"], FAILED)
    assert row(engine, audit_id)["recovery_info"]["explanation"] == ["operator asked"]
    assert guard._recover_stuck_audit(audit_id) is None  # not running any more


def test_guard_logs_its_markers_and_never_the_database_password(engine, guards, database_url, caplog, start_audit,
                                                               backdate):
    caplog.set_level(logging.DEBUG, logger="auditctl")
    stuck, _ = start_audit(worker_id="someone-else")
    backdate(stuck, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    guard = guards(heartbeat_interval=0.2)
    guard.cleanup_stuck_audits_on_startup()
    guard.start_heartbeat_monitor(handle_sigterm=False)
    wait_for(lambda: "💓 HEARTBEAT: 0 audits beating" in caplog.text, message="a heartbeat pass to be logged")
    guard.stop()

    for marker in ("✅ Stuck audit prevention system initialized", "🧹 STARTUP CLEANUP", "💓 HEARTBEAT"):
        assert marker in caplog.text
    password = make_url(database_url).password
    if password:
        assert password not in caplog.text
        assert "***" in caplog.text


def test_package_exports_the_seed_api():
    import auditctl

    assert auditctl.StuckAuditPrevention is StuckAuditPrevention
    assert auditctl.LeaseLost is LeaseLost
    for name in ("cleanup_stuck_audits_on_startup", "start_heartbeat_monitor", "create_audit", "run", "stop",
                 "_heartbeat_cleanup", "_recover_stuck_audit"):
        assert callable(getattr(StuckAuditPrevention, name))


def test_live_instance_in_another_container_with_the_same_hostname_keeps_its_audit(engine, guards, start_audit):
    """A reused pod name: same host name, another pid namespace (its pid means nothing here), fresh
    heartbeats. Not ours to take."""
    import socket

    from sqlalchemy import insert

    from auditctl.sqlfunctions import db_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    audit_id, _ = start_audit(worker_id="worker-1", instance_id="other-container")
    with write_transaction(engine) as connection:
        connection.execute(insert(workers).values(
            instance_id="other-container", worker_id="worker-1", host=socket.gethostname(), pid=4194301,
            process_key="another-boot:4026531836:4194301:12345", started_at=db_now(), last_heartbeat_at=db_now()))
    guard = guards(worker_id="worker-1", stale_after=600, max_age=1800, stall_after=600, heartbeat_interval=60)
    guard.cleanup_stuck_audits_on_startup()
    assert row(engine, audit_id)["status"] == "running"
    assert [peer.instance_id for peer in guard.duplicates] == ["other-container"]


def test_dead_process_in_this_namespace_is_recognised_even_if_its_pid_was_reused(engine, guards, start_audit):
    import os
    import socket

    from sqlalchemy import insert

    from auditctl import registry
    from auditctl.sqlfunctions import db_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    audit_id, _ = start_audit(worker_id="worker-1", instance_id="crashed")
    namespace = registry.process_key().rsplit(":", 2)[0]
    # pid 1 exists, but it is not the process that registered (its start time differs).
    with write_transaction(engine) as connection:
        connection.execute(insert(workers).values(
            instance_id="crashed", worker_id="worker-1", host=socket.gethostname(), pid=1,
            process_key=f"{namespace}:1:999999999", started_at=db_now(), last_heartbeat_at=db_now()))
    assert os.path.exists("/proc/1/stat")
    guard = guards(worker_id="worker-1", stale_after=600, max_age=1800, stall_after=600, heartbeat_interval=60)
    recovered = guard.cleanup_stuck_audits_on_startup()
    assert [(r.id, r.reasons) for r in recovered] == [(audit_id, ["worker_restarted"])]


@pytest.mark.parametrize("report", [
    {"completed_tasks": "3", "total_tasks": 20},
    {"percentage": 10**400},
    {"completed_tasks": 10**400, "total_tasks": 1},
    {"step": object()},
], ids=["counts as text", "huge percentage", "huge counts", "odd step"])
def test_a_bad_progress_report_never_kills_the_audit(engine, guards, report):
    guard = guards(heartbeat_interval=1)
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        run.update_progress(**report)  # stored as well as it can be, or the emergency write: never raises
        assert row(engine, audit_id)["status"] == "running"
    assert row(engine, audit_id)["status"] == "completed"


def test_a_heartbeat_racing_the_end_of_the_run_records_no_lease_lost(engine, guards):
    guard = guards(heartbeat_interval=1)
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        pass
    run._beat(blocking=False)  # the heartbeat thread's own call: its snapshot of runs may still hold this one
    assert [e["event"] for e in events(engine, audit_id)] == []


def test_stop_takes_its_timeout_as_any_duration_and_refuses_a_bad_one_before_stopping_anything(guards):
    from auditctl.errors import ConfigError

    guard = guards(heartbeat_interval=1)
    guard.start_heartbeat_monitor()
    for bad in (-1, float("nan"), "soon", True):
        with pytest.raises(ConfigError, match="^timeout: "):
            guard.stop(timeout=bad)
        assert guard._thread.is_alive() and not guard._stopped, f"{bad!r} stopped the guard halfway"
    guard.stop(timeout="5s")
    assert not guard._thread.is_alive()


def test_sigterm_landing_while_the_main_thread_is_inside_stop_neither_hangs_nor_loses_the_stop(guards):
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    guard = guards(heartbeat_interval=1)
    try:
        guard.start_heartbeat_monitor()
        monitor = guard._monitor_stop
        returned = threading.Event()

        def main_thread_inside_monitor_stop_set():
            # Where stop() is when the signal lands: inside the event's set(), holding its lock.
            with monitor._cond:
                with pytest.raises(SystemExit):
                    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
                returned.set()

        threading.Thread(target=main_thread_inside_monitor_stop_set, daemon=True).start()
        if not returned.wait(5):
            guard._monitor_stop = threading.Event()  # that thread holds the old one's lock for good
            raise AssertionError("the handler waited for the lock its own thread holds")
        assert monitor.wait(5), "the monitor was told to stop once the lock was free"
    finally:
        guard.stop()
        signal.signal(signal.SIGTERM, before)


def test_sigterm_handler_survives_a_stop_from_another_thread_and_a_restart(guards):
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    guard = guards(heartbeat_interval=1)
    try:
        guard.start_heartbeat_monitor()
        stopper = threading.Thread(target=guard.stop)
        stopper.start()
        stopper.join()
        guard.start_heartbeat_monitor()
        with pytest.raises(SystemExit) as exited:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert exited.value.code == 143
    finally:
        guard.stop()
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("audit_id, explanation", [
    (True, None), ("1", None), (1.0, None), (None, None),
    (1, 42), (1, "NUL \x00 inside"), (1, "lone \ud800 surrogate"), (1, "x" * 2001),
], ids=["bool-id", "text-id", "float-id", "no-id", "number-explanation", "nul-explanation", "surrogate-explanation",
        "long-explanation"])
def test_recover_stuck_audit_refuses_a_bad_audit_id_or_explanation_with_config_error(engine, guards, start_audit,
                                                                                    audit_id, explanation):
    from auditctl.errors import ConfigError

    running, _ = start_audit(worker_id="someone-else")
    assert running == 1
    guard = guards()
    with pytest.raises(ConfigError):
        guard._recover_stuck_audit(audit_id, explanation=explanation)
    assert row(engine, running)["status"] == RUNNING, "a refused request recovered nothing"
    assert guard._recover_stuck_audit(2**80) is None, "an id no audit can have is simply not running"


def test_startup_cleanup_leaves_an_audit_claimed_after_this_instance_registered(engine, guards):
    """The cleanup reads which instances are alive, then recovers what the others of its worker_id hold.
    An earlier instance that was stopped, and is used again in between (its run() marks it live and
    claims), holds an audit claimed after the cleaning instance registered: no leftover of a restart."""
    earlier = guards(**PATIENT)
    earlier.stop()  # marked stopped: the cleanup below reads it as gone
    cleaning = guards(**PATIENT)
    audit_id = cleaning.create_audit("https://example.com/claimed-after-registration")
    running = contextlib.ExitStack()
    read_live = cleaning._check_duplicates

    def then_the_earlier_instance_claims():
        peers = read_live()
        running.enter_context(earlier.run(audit_id))  # live again, and claiming, after the read
        return peers

    cleaning._check_duplicates = then_the_earlier_instance_claims
    with running:
        assert cleaning.cleanup_stuck_audits_on_startup() == []
        assert row(engine, audit_id)["status"] == RUNNING, "a claim made after the cleaner started is no leftover"
    assert row(engine, audit_id)["status"] == COMPLETED


def test_startup_cleanup_recovers_no_silent_audit_when_another_guard_of_the_process_saw_an_outage(
        engine, guards, start_audit, backdate):
    """A replacement worker started in a process whose other guards could not reach the database: its
    startup cleanup's pass is one of the process's passes, and measures silence from the database's
    return, as theirs do. (Seen in a chaos run: a replacement started half a second after the server
    thawed recovered a healthy audit whose worker had not beaten again yet.)"""
    silent, _ = start_audit(worker_id="someone-else")
    backdate(silent, started_at=20, heartbeat_at=20, last_worker_update=20, progress_changed_at=20)
    first = guards(worker_id="first")  # stale_after 2 s: the silent audit is stale by 18 s
    first._mark_outage()  # first's heartbeat thread could not reach the database
    replacement = guards(worker_id="replacement")  # the same settings: they share the passes
    assert replacement.cleanup_stuck_audits_on_startup() == []
    assert row(engine, silent)["status"] == RUNNING, "silence during the outage is not the worker's silence"
    assert replacement.monitor.seen_since is not None
    assert first._monitor_once() is True
    assert first.monitor.seen_since == replacement.monitor.seen_since, "the outage got past once, for both"
