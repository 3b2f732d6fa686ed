"""Recovery, requeue and reset: conditional, exactly once, recorded, and never over a finished audit."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from dbtools import all_rows, events, finish, install_abort_trigger, kill_quietly, make_running, read_line, row, spawn
from sqlalchemy import update

from auditctl import LeaseLost, leases
from auditctl import recovery as recovery_module
from auditctl.errors import AuditctlError
from auditctl.history import Actor
from auditctl.progress import isoformat_z
from auditctl.recovery import _apply_recovery, recover_stuck, recover_worker_leftovers, reset_failed
from auditctl.rules import find_stuck, select_stuck
from auditctl.schema import COMPLETED, FAILED, PENDING, RUNNING, audits
from auditctl.thresholds import Thresholds
from auditctl.timestamps import as_datetime
from auditctl.transactions import read_connection, write_transaction

T = Thresholds(stale_after=600, max_age=1800, stall_after=600)
OPERATOR = Actor.command("recover")


def make_stale(backdate, audit_id, seconds=700):
    backdate(audit_id, started_at=seconds, heartbeat_at=seconds, last_worker_update=seconds, progress_changed_at=seconds)


def same_moment(stored, original) -> bool:
    """original_status keeps times as ISO text; read back, it must be the very same moment."""
    if stored is None or original is None:
        return stored is None and original is None
    return as_datetime(original) == stored


# --- recover ------------------------------------------------------------------------------


def test_recover_marks_stuck_audit_failed_with_reason_time_and_full_prior_row(engine, start_audit, backdate):
    audit_id, lease = start_audit()
    leases.write_progress(engine, lease, {"step": "Crawling", "percentage": 40.0, "completed_tasks": 4, "total_tasks": 10},
                          "sig", None, OPERATOR)
    make_stale(backdate, audit_id)
    before = row(engine, audit_id)

    (recovery,) = recover_stuck(engine, T, actor=OPERATOR)

    after = row(engine, audit_id)
    assert (recovery.id, recovery.status, recovery.reasons) == (audit_id, FAILED, ["stale_heartbeat"])
    assert after["status"] == FAILED
    assert after["lease"] is None
    assert after["finished_at"] is not None
    assert "stale_heartbeat" in after["error"]
    assert after["progress"]["progress"]["is_running"] is False
    assert after["progress"]["progress"]["percentage"] == 40.0

    info = after["recovery_info"]
    assert info["reason"] == "stale_heartbeat"
    assert info["recovered_at"] == isoformat_z(recovery.recovered_at) == isoformat_z(after["finished_at"])
    original = info["original_status"]
    # The whole prior row, but not its own earlier recovery_info: that chain lives in the history.
    assert set(original) == {column.name for column in audits.columns} - {"recovery_info", "odd_times"}
    for name, value in before.items():
        if name in ("recovery_info", "odd_times"):
            continue
        if name in ("created_at", "started_at", "finished_at", "heartbeat_at", "last_worker_update", "progress_changed_at"):
            assert same_moment(value, original[name]), name
        elif isinstance(value, float):
            assert original[name] == pytest.approx(value), name
        else:
            assert original[name] == value, name
    assert original["status"] == RUNNING and original["lease"] == lease.token


def test_recovery_writes_exactly_one_history_row_with_actor_host_pid_reasons_and_measurements(engine, start_audit, backdate):
    import os
    import socket

    audit_id, _ = start_audit()
    backdate(audit_id, started_at=4000, heartbeat_at=700, last_worker_update=700, progress_changed_at=4000)
    recover_stuck(engine, T, actor=OPERATOR)
    recover_stuck(engine, T, actor=OPERATOR)  # nothing left to do: no second row

    (event,) = events(engine, audit_id)
    assert event["event"] == "recovered"
    assert (event["from_status"], event["to_status"]) == (RUNNING, FAILED)
    assert (event["actor"], event["host"], event["pid"]) == ("auditctl recover", socket.gethostname(), os.getpid())
    assert event["reasons"] == "stale_heartbeat,max_age_exceeded"
    measured = event["measurements"]
    assert 699 < measured["silence_seconds"] < 720
    assert 3999 < measured["age_seconds"] < 4020
    assert (measured["stale_after"], measured["max_age"], measured["stall_after"]) == (600, 1800, 600)
    assert event["details"]["from"]["status"] == RUNNING  # what it changed from (the full row is in recovery_info)


def test_recovery_leaves_pending_finished_and_healthy_running_audits_alone(engine, start_audit, backdate):
    pending = leases.create_audit(engine, "https://example.com/pending")
    healthy, _ = start_audit()
    done, done_lease = start_audit()
    leases.finish(engine, done_lease, error=None, actor=OPERATOR)
    make_stale(backdate, done)
    stuck, _ = start_audit()
    make_stale(backdate, stuck)
    before = {r["id"]: r for r in all_rows(engine)}

    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR)] == [stuck]

    after = {r["id"]: r for r in all_rows(engine)}
    for untouched in (pending, healthy, done):
        assert after[untouched] == before[untouched]


def test_recover_only_what_the_filters_select(engine, start_audit, backdate):
    of_a, _ = start_audit(worker_id="a")
    of_b, _ = start_audit(worker_id="b")
    for audit_id in (of_a, of_b):
        make_stale(backdate, audit_id)
    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR, worker="b")] == [of_b]
    assert row(engine, of_a)["status"] == RUNNING
    assert recover_stuck(engine, T, actor=OPERATOR, reason="progress_stalled") == []
    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR, ids=[of_a])] == [of_a]


def test_history_rows_are_stored_alike_whether_written_one_or_many_at_a_time(engine):
    """A history row without measurements or details reads back the same from a one-row write
    and from a batch (on PostgreSQL the batch goes as one JSON parameter)."""
    from sqlalchemy import text

    from auditctl import history
    from auditctl.sqlfunctions import fetch_now

    rows = [{"audit_id": 1, "event": "recovered", "reasons": ["stale_heartbeat"], "measurements": {"age_seconds": 1.5},
             "details": {"why": "test"}},
            {"audit_id": 2, "event": "recovered", "reasons": [], "measurements": None, "details": None}]
    with write_transaction(engine) as connection:
        history.record(connection, rows, OPERATOR, fetch_now(connection))
        history.record(connection, [rows[1] | {"audit_id": 3}], OPERATOR, fetch_now(connection))
    with read_connection(engine) as connection:
        stored = connection.execute(text("SELECT audit_id, reasons, CAST(measurements AS text), CAST(details AS text), "
                                         "actor, host, pid FROM audit_events ORDER BY audit_id")).all()
    assert [tuple(r) for r in stored[1:]] == [(2, None, *stored[1][2:4], OPERATOR.name, OPERATOR.host, OPERATOR.pid),
                                             (3, None, *stored[1][2:4], OPERATOR.name, OPERATOR.host, OPERATOR.pid)]
    assert stored[0][1] == "stale_heartbeat" and json.loads(stored[0][2]) == {"age_seconds": 1.5}
    assert json.loads(stored[0][3]) == {"why": "test"}
    assert [e["measurements"] for e in events(engine)] == [{"age_seconds": 1.5}, None, None]


def test_a_history_row_holding_what_json_cannot_is_stored_as_strict_json(engine):
    """NaN, infinity and a datetime in a history row's documents are stored as text, whether the
    row is written alone or in a batch: the write never fails, and the stored text is strict JSON
    (SQLite would keep a bare NaN, which no strict reader accepts)."""
    from datetime import datetime, timezone

    from sqlalchemy import text

    from auditctl import history
    from auditctl.sqlfunctions import fetch_now

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    odd = {"measurements": {"age_seconds": float("nan"), "silence_seconds": float("inf")},
           "details": {"when": datetime(2026, 1, 2, tzinfo=timezone.utc)}}
    with write_transaction(engine) as connection:
        history.record(connection, [{"audit_id": 1, "event": "recovered", **odd},
                                    {"audit_id": 2, "event": "recovered", **odd}], OPERATOR, fetch_now(connection))
        history.record(connection, [{"audit_id": 3, "event": "recovered", **odd}], OPERATOR, fetch_now(connection))
    with read_connection(engine) as connection:
        stored = connection.execute(text("SELECT CAST(measurements AS text), CAST(details AS text) FROM audit_events "
                                         "ORDER BY audit_id")).all()
    assert len(stored) == 3
    for measurements, details in stored:
        assert json.loads(measurements, parse_constant=refuse) == {"age_seconds": "nan", "silence_seconds": "inf"}
        assert json.loads(details, parse_constant=refuse)["when"].startswith("2026-01-02")


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("requeue", [False, True])
def test_a_recovery_on_sqlite_stores_its_times_in_the_canonical_form_and_its_documents_as_json(engine, start_audit,
                                                                                              backdate, requeue):
    """The batch goes through the driver with values converted by auditctl, not by the columns' types:
    they must land as the types would have stored them."""
    import re

    from sqlalchemy import text

    canonical = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}")
    audit_id, _lease = start_audit()
    make_stale(backdate, audit_id)
    (recovery,) = recover_stuck(engine, T, actor=OPERATOR, requeue=requeue)
    with read_connection(engine) as connection:
        finished, odd, info_type, info, lease, worker = connection.execute(text(
            "SELECT finished_at, odd_times, typeof(recovery_info), recovery_info, lease, worker_id FROM audits WHERE id = :id"),
            {"id": audit_id}).one()
        at, details_type, details, measurements = connection.execute(text(
            "SELECT at, typeof(details), details, measurements FROM audit_events WHERE audit_id = :id "
            "AND event IN ('recovered', 'requeued')"), {"id": audit_id}).one()
    assert canonical.fullmatch(at) and odd == 0 and lease is None
    assert (finished, worker) == (None, None) if requeue else canonical.fullmatch(finished) and finished == at
    assert (info_type, details_type) == ("text", "text")
    assert json.loads(info)["reasons"] == recovery.reasons == ["stale_heartbeat"]
    assert json.loads(info)["original_status"]["id"] == audit_id
    assert json.loads(details)["explanation"] == recovery.explanation
    assert json.loads(measurements) == recovery.measurements


def test_every_batch_sends_the_same_statements_whatever_its_size(engine):
    """Recovery's UPDATE and its history INSERT carry the batch as parameters (one JSON document on
    PostgreSQL, executemany on SQLite): a batch of 3 and a batch of 40 send the same SQL text, and
    every audit is recovered once with its history row."""
    from sqlalchemy import event

    texts: list[list[str]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("UPDATE AUDITS", "INSERT INTO AUDIT_EVENTS")):
            texts[-1].append(statement)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        for count in (3, 40):
            ids = make_running(engine, count, worker_id=f"w{count}", instance_id=f"i{count}")
            texts.append([])
            done = recover_stuck(engine, T, actor=OPERATOR)
            assert sorted(r.id for r in done) == ids
            assert all(row(engine, audit_id)["status"] == FAILED for audit_id in ids)
            assert Counter(e["audit_id"] for e in events(engine) if e["audit_id"] in ids) == Counter(ids)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert texts[0] == texts[1] and len(texts[0]) == 2, texts


@pytest.mark.parametrize("requeue", [False, True])
def test_an_audit_that_cannot_be_described_is_still_recovered_failed_on_the_databases_verdict(engine, monkeypatch,
                                                                                               requeue):
    """Whatever goes wrong while describing one stuck audit (here, its explanation raises), that
    audit is still recovered, never requeued, with the problem in its record and its history, and
    the other audits of the batch are recovered as usual. The dry run predicts the same."""
    from auditctl.rules import Verdict

    ids = make_running(engine, 3, silent_for=700, age=2000)
    broken = ids[1]
    explain = Verdict.explain

    def explain_or_fail(self):
        if self.id == broken:
            raise RuntimeError("cannot describe this one")
        return explain(self)

    monkeypatch.setattr(Verdict, "explain", explain_or_fail)
    problem = "RuntimeError: cannot describe this one"
    sentence = f"the row could not be read ({problem}); recovered on the database's verdict"
    reasons = ["stale_heartbeat", "max_age_exceeded"]
    (predicted,) = [r for r in recover_stuck(engine, T, actor=OPERATOR, dry_run=True, requeue=requeue) if r.id == broken]
    assert predicted.status == FAILED and predicted.problems == [f"row_unreadable: {problem}"]
    done = {r.id: r for r in recover_stuck(engine, T, actor=OPERATOR, requeue=requeue)}
    assert sorted(done) == ids
    record = done[broken]
    assert (record.status, record.from_status, record.reasons, record.attempts, record.worker_id, record.measurements) == (
        FAILED, RUNNING, reasons, 0, None, {})
    assert record.explanation == [sentence] and record.problems == predicted.problems
    assert record.target == "https://example.com/1"
    stored = row(engine, broken)
    assert stored["status"] == FAILED and stored["lease"] is None
    assert stored["recovery_reasons"] == "stale_heartbeat,max_age_exceeded"
    assert stored["error"] == f"recovered (stale_heartbeat, max_age_exceeded): {sentence}"
    info = {key: value for key, value in stored["recovery_info"].items() if key != "original_status"}
    assert info == {"recovered_at": isoformat_z(record.recovered_at), "reason": "stale_heartbeat, max_age_exceeded",
                    "reasons": reasons, "explanation": [sentence], "requeued": False,
                    "recovered_by": {"actor": OPERATOR.name, "host": OPERATOR.host, "pid": OPERATOR.pid}}
    (history,) = events(engine, broken)
    assert (history["event"], history["from_status"], history["to_status"], history["reasons"]) == (
        "recovered", RUNNING, FAILED, "stale_heartbeat,max_age_exceeded")
    assert history["details"] == {"explanation": [sentence], "unreadable": problem}
    for other in (ids[0], ids[2]):
        assert done[other].status == (PENDING if requeue else FAILED) and done[other].explanation[0].startswith("no heartbeat")
        assert row(engine, other)["status"] == (PENDING if requeue else FAILED)


# --- requeue ----------------------------------------------------------------------------


def test_requeue_returns_stuck_audit_to_pending_with_attempts_counted(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    make_stale(backdate, audit_id)

    (recovery,) = recover_stuck(engine, T, actor=OPERATOR, requeue=True, max_attempts=3)

    after = row(engine, audit_id)
    assert recovery.status == PENDING and recovery.attempts == 1
    assert after["status"] == PENDING
    assert after["attempts"] == 1
    assert after["lease"] is None and after["worker_id"] is None and after["started_at"] is None
    assert after["recovery_info"]["requeued"] is True
    assert after["recovery_info"]["original_status"]["status"] == RUNNING
    (event,) = events(engine, audit_id)
    assert (event["event"], event["from_status"], event["to_status"]) == ("requeued", RUNNING, PENDING)

    leases.claim(engine, audit_id, worker_id="worker-2", instance_id="instance-2", worker_url=None)
    assert row(engine, audit_id)["attempts"] == 2


def test_requeued_audit_fails_for_good_after_max_attempts(engine, backdate):
    audit_id = leases.create_audit(engine, "https://example.com/flaky")
    outcomes = []
    for attempt in (1, 2):
        leases.claim(engine, audit_id, worker_id="w", instance_id=f"i{attempt}", worker_url=None)
        make_stale(backdate, audit_id)
        (recovery,) = recover_stuck(engine, T, actor=OPERATOR, requeue=True, max_attempts=2)
        outcomes.append((recovery.attempts, recovery.status))

    assert outcomes == [(1, PENDING), (2, FAILED)]
    final = row(engine, audit_id)
    assert final["status"] == FAILED and final["attempts"] == 2
    assert final["recovery_info"]["requeued"] is False
    assert "gave up after 2 attempts (max_attempts 2)" in final["recovery_info"]["explanation"]
    assert [e["event"] for e in events(engine, audit_id)] == ["requeued", "recovered"]
    assert recover_stuck(engine, T, actor=OPERATOR, requeue=True, max_attempts=2) == []


def test_old_worker_of_a_requeued_and_reclaimed_audit_gets_lease_lost(engine, start_audit, backdate):
    audit_id, old_lease = start_audit(instance_id="old")
    make_stale(backdate, audit_id)
    recover_stuck(engine, T, actor=OPERATOR, requeue=True)
    new_lease, _ = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="new", worker_url=None)
    before = row(engine, audit_id)

    with pytest.raises(LeaseLost):
        leases.finish(engine, old_lease, error=None, actor=OPERATOR)
    with pytest.raises(LeaseLost):
        leases.heartbeat(engine, old_lease, OPERATOR)

    assert row(engine, audit_id) == before
    assert leases.finish(engine, new_lease, error=None, actor=OPERATOR) == COMPLETED


def test_recover_refuses_max_attempts_below_one(engine):
    from auditctl.errors import ConfigError

    with pytest.raises(ConfigError, match="max_attempts"):
        recover_stuck(engine, T, actor=OPERATOR, requeue=True, max_attempts=0)


# --- dry run ------------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_says_what_would_change(engine, start_audit, backdate):
    stuck, _ = start_audit()
    make_stale(backdate, stuck)
    start_audit()
    before = all_rows(engine)

    (would,) = recover_stuck(engine, T, actor=OPERATOR, dry_run=True)
    (would_requeue,) = recover_stuck(engine, T, actor=OPERATOR, dry_run=True, requeue=True)

    assert (would.id, would.status, would.reasons, would.recovered_at) == (stuck, FAILED, ["stale_heartbeat"], None)
    assert would_requeue.status == PENDING
    assert all_rows(engine) == before
    assert events(engine) == []


# --- exactly once -----------------------------------------------------------------------


@pytest.mark.parametrize("recoverers", [2, 4])
def test_recoverer_threads_recover_each_audit_exactly_once(engine, recoverers):
    ids = make_running(engine, 200)
    barrier = threading.Barrier(recoverers)
    results: dict[str, list[int]] = {}
    errors = []

    def recoverer(name):
        try:
            barrier.wait(10)
            results[name] = [r.id for r in recover_stuck(engine, T, actor=Actor(name=name), batch_size=10)]
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=recoverer, args=(f"thread-{i}",)) for i in range(recoverers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    recovered = [audit_id for got in results.values() for audit_id in got]
    assert sorted(recovered) == ids  # every stuck audit once, none twice
    history = [e for e in events(engine) if e["event"] == "recovered"]
    assert sorted(e["audit_id"] for e in history) == ids
    by_actor = {e["audit_id"]: e["actor"] for e in history}
    for name, got in results.items():
        assert all(by_actor[audit_id] == name for audit_id in got)
    assert {r["status"] for r in all_rows(engine)} == {FAILED}


RECOVERER = r"""
import json, sys
from auditctl.db import create_engine
from auditctl.history import Actor
from auditctl.recovery import recover_stuck
from auditctl.thresholds import Thresholds

engine = create_engine(sys.argv[1])
with engine.connect():
    pass
print("READY", flush=True)
sys.stdin.readline()
done = recover_stuck(engine, Thresholds(stale_after=600, max_age=1800, stall_after=600),
                     actor=Actor(name=sys.argv[2]), batch_size=10)
print("DONE " + json.dumps([r.id for r in done]), flush=True)
"""


def test_recoverer_processes_recover_each_audit_exactly_once(engine, database_url, tmp_path):
    ids = make_running(engine, 200)
    script = tmp_path / "recoverer.py"
    script.write_text(RECOVERER)
    import subprocess

    procs = [spawn(script, database_url, f"process-{i}", stdin=subprocess.PIPE) for i in range(4)]
    try:
        for proc in procs:
            read_line(proc, startswith="READY")
        for proc in procs:  # release them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for i, proc in enumerate(procs):
            code, out, err = finish(proc, timeout=60)
            assert code == 0, err
            (done_line,) = [line for line in out.splitlines() if line.startswith("DONE ")]
            results[f"process-{i}"] = json.loads(done_line[5:])
    finally:
        for proc in procs:
            kill_quietly(proc)

    recovered = [audit_id for got in results.values() for audit_id in got]
    assert len(recovered) == len(ids) == 200
    assert sorted(recovered) == ids
    history = [e for e in events(engine) if e["event"] == "recovered"]
    assert Counter(e["audit_id"] for e in history) == Counter(ids)
    by_actor = {e["audit_id"]: e["actor"] for e in history}
    for name, got in results.items():
        assert all(by_actor[audit_id] == name for audit_id in got)


# --- the race between a worker finishing and a recoverer recovering ------------------------


def test_finish_lands_first_then_recovery_skips_and_audit_stays_completed(engine, start_audit, backdate, monkeypatch):
    audit_id, lease = start_audit()
    make_stale(backdate, audit_id)
    judge = recovery_module.stuck_ids
    finished = {}

    def judged_then_the_worker_finishes(*args, **kwargs):
        stuck = judge(*args, **kwargs)  # the recoverer has judged it stuck...
        assert stuck == [audit_id]
        assert leases.finish(engine, lease, error=None, actor=OPERATOR) == COMPLETED  # ...then the finish lands
        finished.update(row(engine, audit_id))
        return stuck

    monkeypatch.setattr(recovery_module, "stuck_ids", judged_then_the_worker_finishes)
    assert recover_stuck(engine, T, actor=OPERATOR) == []  # ...and the recovery skips it
    monkeypatch.undo()

    assert finished["status"] == COMPLETED and finished["recovery_info"] is None
    assert row(engine, audit_id) == finished
    assert events(engine, audit_id) == []


def test_recovery_written_from_a_stale_judgement_never_overwrites_a_finished_audit(engine, start_audit, backdate):
    audit_id, lease = start_audit()
    make_stale(backdate, audit_id)
    with read_connection(engine) as connection:
        judged = select_stuck(connection, T)
    leases.finish(engine, lease, error=None, actor=OPERATOR)
    finished = row(engine, audit_id)
    try:  # skipping the row and refusing the whole batch are both safe; overwriting is not
        with write_transaction(engine) as connection:
            applied = _apply_recovery(connection, judged, requeue=False, max_attempts=3, actor=OPERATOR)
    except AuditctlError:
        applied = []
    assert applied == []
    assert row(engine, audit_id) == finished and finished["status"] == COMPLETED
    assert events(engine, audit_id) == []


def test_recovery_lands_first_then_finish_gets_lease_lost_and_audit_stays_failed(engine, guards, backdate):
    guard = guards()
    audit_id = guard.create_audit("https://example.com")
    with pytest.raises(LeaseLost), guard.run(audit_id) as run:
        run.update_progress(step="Crawling", percentage=60)
        make_stale(backdate, audit_id)
        assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR)] == [audit_id]
        recovered = row(engine, audit_id)
        # leaving the block tries to record "completed": the lease is gone

    assert row(engine, audit_id) == recovered
    assert recovered["status"] == FAILED
    kinds = [(e["event"], e["from_status"], e["to_status"]) for e in events(engine, audit_id)]
    assert kinds == [("recovered", RUNNING, FAILED), ("lease_lost", FAILED, FAILED)]
    assert events(engine, audit_id)[1]["details"]["write"] == "finish"


def test_late_failure_report_after_recovery_gets_lease_lost_too(engine, start_audit, backdate):
    audit_id, lease = start_audit()
    make_stale(backdate, audit_id)
    recover_stuck(engine, T, actor=OPERATOR)
    recovered = row(engine, audit_id)
    with pytest.raises(LeaseLost):
        leases.finish(engine, lease, error="scanner crashed", actor=OPERATOR)
    assert row(engine, audit_id) == recovered


def test_racing_finisher_and_recoverer_never_mark_a_completed_audit_failed(engine, monkeypatch):
    ids = make_running(engine, 80)
    with read_connection(engine) as connection:
        tokens = dict(connection.execute(audits.select().with_only_columns(audits.c.id, audits.c.lease)).all())
    finished_ok, lost, recovered, errors = set(), set(), set(), []
    finisher_done = threading.Event()
    # The finisher starts once the recoverer holds its candidates: started together, on SQLite the
    # finisher often ended all 80 before the recoverer's first pass had read them, and nothing raced.
    judge, judged = recovery_module.stuck_ids, threading.Event()

    def stuck_ids(*args, **kwargs):
        found = judge(*args, **kwargs)
        judged.set()
        return found

    monkeypatch.setattr(recovery_module, "stuck_ids", stuck_ids)

    def finisher():
        try:
            assert judged.wait(10)
            for audit_id in reversed(ids):  # meets the recoverer, which goes in id order, half-way
                lease = leases.Lease(audit_id, tokens[audit_id], "worker-1", "instance-1", None)
                try:
                    leases.finish(engine, lease, error=None, actor=Actor(name="finisher"))
                    finished_ok.add(audit_id)
                except LeaseLost:
                    lost.add(audit_id)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            finisher_done.set()

    def recoverer():
        try:
            while True:
                got = recover_stuck(engine, T, actor=OPERATOR, batch_size=4)
                recovered.update(r.id for r in got)
                if not got and finisher_done.is_set():
                    return
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=finisher), threading.Thread(target=recoverer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    assert finished_ok | recovered == set(ids)
    assert finished_ok & recovered == set()
    assert lost == recovered
    rows = {r["id"]: r for r in all_rows(engine)}
    history = Counter((e["audit_id"], e["event"]) for e in events(engine))
    for audit_id in finished_ok:
        assert rows[audit_id]["status"] == COMPLETED and rows[audit_id]["recovery_info"] is None
        assert history[(audit_id, "recovered")] == 0
    for audit_id in recovered:
        assert rows[audit_id]["status"] == FAILED
        assert history[(audit_id, "recovered")] == 1 and history[(audit_id, "lease_lost")] == 1


# --- reset ----------------------------------------------------------------------------------


def failed_audits(engine, backdate, count):
    """``count`` audits recovered as stale_heartbeat just now (status failed)."""
    ids = make_running(engine, count)
    recover_stuck(engine, T, actor=OPERATOR, ids=ids)
    return ids


def test_reset_failed_returns_failed_audits_to_pending_with_one_reset_row_each(engine, start_audit, backdate):
    ids = failed_audits(engine, backdate, 3)
    running, _ = start_audit()
    completed = leases.create_audit(engine, "https://example.com/done")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == completed).values(status=COMPLETED))
    before = {r["id"]: r for r in all_rows(engine)}

    done = reset_failed(engine, actor=Actor.command("reset-all"))

    assert [r.id for r in done] == ids
    assert all((r.from_status, r.status, r.reasons) == (FAILED, PENDING, ["stale_heartbeat"]) for r in done)
    after = {r["id"]: r for r in all_rows(engine)}
    for audit_id in ids:
        assert after[audit_id]["status"] == PENDING
        assert after[audit_id]["error"] is None and after[audit_id]["finished_at"] is None
        resets = [e for e in events(engine, audit_id) if e["event"] == "reset"]
        assert len(resets) == 1
        assert (resets[0]["from_status"], resets[0]["to_status"], resets[0]["actor"]) == (FAILED, PENDING, "auditctl reset-all")
        assert resets[0]["details"]["original_status"]["status"] == FAILED
        assert resets[0]["details"]["original_status"]["error"] == before[audit_id]["error"]
    assert after[running] == before[running] and after[completed] == before[completed]
    assert reset_failed(engine, actor=Actor.command("reset-all")) == []
    leases.claim(engine, ids[0], worker_id="w", instance_id="i", worker_url=None)  # claimable again


def test_reset_failed_filters_by_since_reason_and_ids(engine, backdate):
    old, recent, other_reason, picked = failed_audits(engine, backdate, 4)
    backdate(old, finished_at=7200)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == other_reason).values(recovery_reasons="worker_restarted"))
    actor = Actor.command("reset-all")

    assert [r.id for r in reset_failed(engine, actor=actor, since=3600, dry_run=True)] == [recent, other_reason, picked]
    assert [r.id for r in reset_failed(engine, actor=actor, reason="worker_restarted", dry_run=True)] == [other_reason]
    assert [r.id for r in reset_failed(engine, actor=actor, ids=[picked, old])] == [old, picked]
    assert [r.id for r in reset_failed(engine, actor=actor, since=3600, reason="stale_heartbeat")] == [recent]
    assert {r["id"]: r["status"] for r in all_rows(engine)} == {old: PENDING, recent: PENDING, other_reason: FAILED,
                                                              picked: PENDING}
    from auditctl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown reason"):
        reset_failed(engine, actor=actor, reason="x' OR '1'='1")


def test_reset_failed_dry_run_changes_nothing(engine, backdate):
    ids = failed_audits(engine, backdate, 2)
    before, history = all_rows(engine), events(engine)
    assert [r.id for r in reset_failed(engine, actor=OPERATOR, dry_run=True)] == ids
    assert all_rows(engine) == before and events(engine) == history


def test_reset_that_the_database_refuses_for_one_audit_resets_the_others_and_reports_that_one(engine, backdate):
    ids = failed_audits(engine, backdate, 3)
    refused = ids[-1]
    before = row(engine, refused)
    # The database refuses the history row of one audit: its reset cannot be recorded, so it must not happen.
    install_abort_trigger(engine, "refuse_reset_history", table="audit_events", event="INSERT",
                          when_sqlite=f"NEW.audit_id = {refused} AND NEW.event = 'reset'",
                          when_pg=f"NEW.audit_id = {refused} AND NEW.event = 'reset'")

    done = reset_failed(engine, actor=OPERATOR)

    assert [r.id for r in done] == ids[:-1]
    assert [s.id for s in done.skipped] == [refused] and "boom" in done.skipped[0].error
    for audit_id in ids[:-1]:  # each reset whole: the row and its history row
        assert row(engine, audit_id)["status"] == PENDING
        assert [e["event"] for e in events(engine, audit_id)][-1] == "reset"
    assert row(engine, refused) == before  # untouched, and marked for an operator in its history
    assert events(engine, refused)[-1]["event"] == "needs_operator"


def test_an_audit_the_database_keeps_refusing_is_marked_for_an_operator_once_per_episode(engine):
    """Two audits whose recovery the database refuses, one of them with older history: each
    gets its own needs_operator row naming the operation and the error, a second run adds none
    while that is still the latest word, and a new row follows once something else happened."""
    from dbtools import drop_trigger

    from auditctl import history
    from auditctl.sqlfunctions import fetch_now

    def lease_lost(audit_id):
        with write_transaction(engine) as connection:
            history.record(connection, [{"audit_id": audit_id, "event": history.LEASE_LOST, "details": {"write": "progress"}}],
                           OPERATOR, fetch_now(connection))

    ids = make_running(engine, 4)
    refused = ids[1:3]
    lease_lost(refused[0])  # older history for one of them
    condition = f"OLD.id IN ({refused[0]}, {refused[1]}) AND NEW.status <> 'running'"
    install_abort_trigger(engine, "refuse_two", when_sqlite=condition, when_pg=condition)

    watcher = history.Actor.command("watch")
    first = recover_stuck(engine, T, actor=watcher)
    assert sorted(r.id for r in first) == [ids[0], ids[3]] and sorted(s.id for s in first.skipped) == refused
    second = recover_stuck(engine, T, actor=OPERATOR)
    assert list(second) == [] and sorted(s.id for s in second.skipped) == refused
    for audit_id in refused:
        marks = [e for e in events(engine, audit_id) if e["event"] == "needs_operator"]
        assert len(marks) == 1, "not repeated while it is the latest word"
        assert marks[0]["details"]["operation"] == "recover" and "boom" in marks[0]["details"]["error"]
        assert marks[0]["actor"] == "auditctl watch", "the record names who acted"
        assert row(engine, audit_id)["status"] == RUNNING
    assert [e["event"] for e in events(engine, refused[0])] == ["lease_lost", "needs_operator"]

    lease_lost(refused[1])  # something else happens to one of them
    recover_stuck(engine, T, actor=OPERATOR)
    assert [e["event"] for e in events(engine, refused[1])] == ["needs_operator", "lease_lost", "needs_operator"]
    assert [e["event"] for e in events(engine, refused[0])] == ["lease_lost", "needs_operator"]
    drop_trigger(engine, "refuse_two")
    assert sorted(r.id for r in recover_stuck(engine, T, actor=OPERATOR)) == refused


def test_when_the_database_refuses_even_the_operator_mark_the_log_names_the_audit_and_why(engine, caplog):
    stuck, refused = make_running(engine, 2)
    install_abort_trigger(engine, "refuse_all_history", table="audit_events", event="INSERT",
                          when_sqlite=f"NEW.audit_id = {refused}", when_pg=f"NEW.audit_id = {refused}")

    with caplog.at_level("ERROR", logger="auditctl"):
        done = recover_stuck(engine, T, actor=OPERATOR)

    assert [r.id for r in done] == [stuck] and [s.id for s in done.skipped] == [refused]
    assert events(engine, refused) == [] and row(engine, refused)["status"] == RUNNING
    failed = [r.getMessage() for r in caplog.records if "it needs an operator" in r.getMessage()
              and not r.getMessage().startswith("could not record")]
    assert len(failed) == 1 and failed[0].startswith(f"recover of audit {refused} failed: ")
    assert "boom" in failed[0] and failed[0].endswith("; it needs an operator")
    unrecorded = [r.getMessage() for r in caplog.records if "could not record" in r.getMessage()]
    assert len(unrecorded) == 1
    assert unrecorded[0].startswith(f"could not record that audit {refused} needs an operator: ")
    assert "boom" in unrecorded[0]


def test_a_row_that_cannot_be_described_is_reported_on_the_databases_verdict(engine):
    from types import SimpleNamespace

    from auditctl.recovery import _unreadable_recovery

    nameless = SimpleNamespace(id=7, reasons=(), row=(7, None), lease="l")
    judged = SimpleNamespace(id=8, reasons=("stale_heartbeat",), row=(8, "https://example.com/8"), lease="l")

    unknown = _unreadable_recovery(nameless, "ValueError: bad")
    assert (unknown.target, unknown.reasons, unknown.status, unknown.problems) == (
        "?", ["unreadable"], FAILED, ["row_unreadable: ValueError: bad"])
    assert unknown.explanation == ["the row could not be read (ValueError: bad); recovered on the database's verdict"]
    assert (_unreadable_recovery(judged, "x").target, _unreadable_recovery(judged, "x").reasons) == (
        "https://example.com/8", ["stale_heartbeat"])


def test_reset_all_plans_the_stuck_audits_by_the_given_thresholds_and_origins(engine):
    from auditctl.recovery import ResetFilters, plan_reset_all

    (quiet,) = make_running(engine, 1, silent_for=300, age=300)  # stuck for stale_after 2m, not for the 10m default
    short = Thresholds(stale_after=120, max_age=3600, stall_after=3600)
    assert plan_reset_all(engine, ResetFilters(), include_stuck=True).stuck == []
    assert plan_reset_all(engine, ResetFilters(), policy=Thresholds(stale_after=120, max_age=3600, stall_after=3600)).stuck == [], \
        "stuck audits are planned only when asked for"
    assert [v.id for v in plan_reset_all(engine, ResetFilters(), include_stuck=True, policy=short).stuck] == [quiet]
    stuck_only = ResetFilters(origins=("stuck",))
    assert [v.id for v in plan_reset_all(engine, stuck_only, include_stuck=True, policy=short).stuck] == [quiet]
    assert plan_reset_all(engine, ResetFilters(origins=("error",)), include_stuck=True, policy=short).stuck == []
    assert plan_reset_all(engine, ResetFilters(reasons=("max_age_exceeded",)), include_stuck=True, policy=short).stuck == []
    assert plan_reset_all(engine, ResetFilters(), include_stuck=False, policy=short).stuck == []


def test_the_reset_plan_counts_by_origin_and_reason_and_what_the_limit_holds_back(engine, backdate):
    from auditctl.recovery import ResetFilters, plan_reset

    stale = failed_audits(engine, backdate, 3)
    (both,) = make_running(engine, 1, silent_for=700, age=4000)  # stale and over max_age
    recover_stuck(engine, T, actor=OPERATOR, ids=[both])
    own_error = leases.create_audit(engine, "https://example.com/own-error")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == own_error).values(status=FAILED, error="scanner crashed"))
        connection.execute(update(audits).where(audits.c.id.in_(stale[:2])).values(resets=5))
        connection.execute(update(audits).where(audits.c.id == stale[2]).values(resets=4))
    reset_often_but_pending = leases.create_audit(engine, "https://example.com/pending")  # not failed: never held back
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == reset_often_but_pending).values(resets=9))

    plan = plan_reset(engine, ResetFilters(max_resets=5))
    assert plan.ids == [stale[2], both, own_error] and plan.held_back == 2 and plan.max_resets == 5
    assert plan.by_origin == {"stuck": 2, "error": 1}
    assert plan.by_reason == {"stale_heartbeat": 2, "max_age_exceeded": 1}
    unlimited = plan_reset(engine, ResetFilters(max_resets=None))
    assert unlimited.ids == sorted([*stale, both, own_error]) and unlimited.held_back == 0
    assert plan_reset(engine, ResetFilters(max_resets=4)).held_back == 3
    assert plan_reset(engine, ResetFilters(max_resets=4, reasons=("max_age_exceeded",))).held_back == 0, \
        "only the audits the filters take can be held back"


def test_reset_all_recovers_the_planned_stuck_audits_by_the_given_thresholds_then_resets_within_the_limit(engine,
                                                                                                            backdate):
    from auditctl.recovery import ResetFilters, plan_reset_all, reset_all

    (quiet,) = make_running(engine, 1, silent_for=300, age=300)  # stuck for stale_after 2m, not for the 10m default
    failed = failed_audits(engine, backdate, 2)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == failed[0]).values(resets=1))
    short = Thresholds(stale_after=120, max_age=3600, stall_after=3600)
    plan = plan_reset_all(engine, ResetFilters(max_resets=1), include_stuck=True, policy=short)
    assert plan.ids == [failed[1]] and [v.id for v in plan.stuck] == [quiet] and plan.held_back == 1
    with write_transaction(engine) as connection:  # reset by someone else meanwhile, and failed again
        connection.execute(update(audits).where(audits.c.id == failed[1]).values(resets=1))
    batches = []
    done = reset_all(engine, plan, actor=OPERATOR, policy=short, on_batch=lambda n, total: batches.append((n, total)))
    assert [r.id for r in done] == [quiet] and batches
    assert row(engine, quiet)["status"] == PENDING
    assert row(engine, failed[0])["status"] == row(engine, failed[1])["status"] == FAILED, "the plan's limit still holds"
    assert [e["event"] for e in events(engine, quiet)] == ["recovered", "reset"]


def test_reset_batches_are_each_atomic(engine, backdate):
    ids = failed_audits(engine, backdate, 6)
    install_abort_trigger(engine, "refuse_third", table="audit_events", event="INSERT",
                          when_sqlite=f"NEW.audit_id = {ids[2]} AND NEW.event = 'reset'",
                          when_pg=f"NEW.audit_id = {ids[2]} AND NEW.event = 'reset'")
    done = reset_failed(engine, actor=OPERATOR, batch_size=2)
    assert sorted(r.id for r in done) == [i for i in ids if i != ids[2]]
    states = {r["id"]: r["status"] for r in all_rows(engine)}
    history = {e["audit_id"] for e in events(engine) if e["event"] == "reset"}
    # Every audit is either fully reset (state and history) or untouched.
    assert {i for i in ids if states[i] == PENDING} == history == set(ids) - {ids[2]}


# --- a worker's leftovers ---------------------------------------------------------------------


def test_recover_worker_leftovers_takes_only_what_dead_instances_of_that_worker_left(engine, start_audit):
    dead, _ = start_audit(worker_id="w", instance_id="dead")
    live, _ = start_audit(worker_id="w", instance_id="live")
    other, _ = start_audit(worker_id="other", instance_id="dead")
    anonymous, _ = start_audit(worker_id="w")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == anonymous).values(worker_instance=None))

    done = recover_worker_leftovers(engine, "w", {"live"}, actor=Actor.worker("w", "live-instance"))

    assert [r.id for r in done] == [dead, anonymous]
    assert all(r.reasons == ["worker_restarted"] for r in done)
    for audit_id in (dead, anonymous):
        after = row(engine, audit_id)
        assert after["status"] == FAILED and after["recovery_info"]["reason"] == "worker_restarted"
        (event,) = events(engine, audit_id)
        assert (event["event"], event["reasons"]) == ("recovered", "worker_restarted")
        assert event["measurements"]["age_seconds"] < 60  # at once, not after stale_after
    assert row(engine, live)["status"] == RUNNING and row(engine, other)["status"] == RUNNING
    assert find_stuck(engine, T) == []  # nothing was stuck by the rules: this was the restart


def test_a_restarted_workers_leftover_is_recorded_as_it_was_left(engine, start_audit, backdate):
    """The record and the history of a leftover say what the audit was: its target, worker,
    instance, attempts and times, how long it ran and was silent, and the restart sentence."""
    audit_id, _ = start_audit(target="https://example.com/left-behind", worker_id="w", instance_id="dead")
    backdate(audit_id, started_at=300, heartbeat_at=50)
    before = row(engine, audit_id)
    (done,) = recover_worker_leftovers(engine, "w", {"live"}, actor=OPERATOR)
    assert (done.id, done.target, done.worker_id, done.attempts, done.status, done.from_status) == (
        audit_id, "https://example.com/left-behind", "w", 1, FAILED, RUNNING)
    assert done.explanation == ["worker w restarted; the instance that held this audit is gone"]
    assert done.problems == [] and done.thresholds == {}
    assert 290 < done.measurements["age_seconds"] < 360 and 40 < done.measurements["silence_seconds"] < 110
    (event,) = events(engine, audit_id)
    assert event["details"]["from"] == {
        "status": RUNNING, "worker_id": "w", "worker_instance": "dead", "step": None, "lease": before["lease"],
        "attempts": 1, "started_at": isoformat_z(before["started_at"]), "heartbeat_at": isoformat_z(before["heartbeat_at"])}
    assert event["measurements"] == done.measurements


def test_a_leftover_that_never_beat_is_recovered_with_its_silence_unknown(engine, start_audit):
    audit_id, _ = start_audit(worker_id="w", instance_id="dead")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == audit_id).values(heartbeat_at=None))
    (done,) = recover_worker_leftovers(engine, "w", {"live"}, actor=OPERATOR)
    assert done.problems == [] and done.reasons == ["worker_restarted"], "described, not recovered as unreadable"
    assert done.measurements["silence_seconds"] is None and 0 <= done.measurements["age_seconds"] < 60
    assert events(engine, audit_id)[0]["details"]["from"]["heartbeat_at"] is None


def test_a_leftover_never_claimed_twice_is_requeued_not_given_up(engine, start_audit):
    """attempts counts claims: an audit left with none counted still has its first retry."""
    audit_id, _ = start_audit(worker_id="w", instance_id="dead")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == audit_id).values(attempts=0))
    tried, _ = start_audit(worker_id="w", instance_id="dead")  # claimed once already: that was its one attempt
    first, second = recover_worker_leftovers(engine, "w", set(), actor=OPERATOR, requeue=True, max_attempts=1)
    assert (first.id, first.status, first.attempts) == (audit_id, PENDING, 0)
    assert (second.id, second.status, second.attempts) == (tried, FAILED, 1)
    assert second.explanation[-1] == "gave up after 1 attempts (max_attempts 1)"


def test_recover_audits_takes_only_running_audits_in_id_order_and_refuses_an_unknown_reason(engine, start_audit):
    from auditctl.recovery import recover_audits

    started = [start_audit(worker_id="w", instance_id=f"i{n}") for n in range(3)]
    finished, lease = started.pop(1)
    leases.finish(engine, lease, error=None, actor=OPERATOR)
    running = [audit_id for audit_id, _ in started]
    pending = leases.create_audit(engine, "https://example.com/pending")
    everything = audits.c.id.in_([*running, finished, pending])
    with pytest.raises(AuditctlError, match="unknown reason 'because'"):
        recover_audits(engine, everything, reason="because", explanation="no", actor=OPERATOR)
    done = recover_audits(engine, everything, reason="manual", explanation="taken back", actor=OPERATOR)
    assert [r.id for r in done] == running and [r.reasons for r in done] == [["manual"], ["manual"]]
    assert row(engine, finished)["status"] == COMPLETED and row(engine, pending)["status"] == PENDING
    assert [e["event"] for e in events(engine, finished)] == [] and events(engine, pending) == []


def test_recover_audits_judges_each_batch_again_as_it_is_when_the_batch_runs(engine, start_audit, monkeypatch):
    """Between choosing the audits and recovering a batch, one finished, one was claimed again by a live
    instance (no longer matching the condition) and a new one started: only the still-matching
    running audits that were chosen are recovered."""
    from auditctl.recovery import recover_audits

    chosen = [start_audit(worker_id="w", instance_id="dead") for _ in range(3)]
    (kept, _), (finished, finished_lease), (reclaimed, _) = chosen
    real_in_batches = recovery_module._in_batches

    def meanwhile(*args, **kwargs):
        leases.finish(engine, finished_lease, error=None, actor=OPERATOR)
        with write_transaction(engine) as connection:
            connection.execute(update(audits).where(audits.c.id == reclaimed).values(worker_instance="live"))
        start_audit(worker_id="w", instance_id="dead")  # started after the choice: not this run's to take
        return real_in_batches(*args, **kwargs)

    monkeypatch.setattr(recovery_module, "_in_batches", meanwhile)
    done = recover_audits(engine, audits.c.worker_instance == "dead", reason="manual", explanation="x", actor=OPERATOR)

    assert [r.id for r in done] == [kept] and list(done.skipped) == [], "the others are simply no longer chosen"
    assert row(engine, finished)["status"] == COMPLETED and row(engine, reclaimed)["status"] == RUNNING
    assert sum(1 for r in all_rows(engine) if r["status"] == RUNNING) == 2


def _read_ahead_scenario(engine, start_audit, backdate):
    """Four audits stuck past max_age, recovered two per batch: the second batch is read and built
    while the lock is left free after the first (SQLite's first pause always comes)."""
    ids = []
    for _ in range(4):
        audit_id, lease = start_audit()
        leases.write_progress(engine, lease, {"step": "Crawling", "percentage": 10.0, "completed_tasks": 1,
                                              "total_tasks": 10}, "sig-1", None, OPERATOR)
        backdate(audit_id, started_at=4000)  # stuck by age alone: heartbeats keep it stuck
        ids.append((audit_id, lease))
    return ids


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_the_next_batch_is_built_while_the_lock_is_free_and_each_audit_only_once(engine, start_audit, backdate,
                                                                                 monkeypatch):
    _read_ahead_scenario(engine, start_audit, backdate)
    built, ahead = [], []
    real_build, real_ahead = recovery_module._build, recovery_module._build_ahead
    monkeypatch.setattr(recovery_module, "_build", lambda verdict, **kw: built.append(verdict.id) or real_build(verdict, **kw))
    monkeypatch.setattr(recovery_module, "_build_ahead",
                        lambda verdicts, **kw: ahead.extend(v.id for v in verdicts) or real_ahead(verdicts, **kw))

    done = recover_stuck(engine, T, actor=OPERATOR, batch_size=2)

    assert len(done) == 4 and len(ahead) == 2, "the second batch was read ahead, during the first pause"
    assert sorted(built) == sorted(r.id for r in done), "what was built ahead was used: no audit built twice"
    for recovery in done:
        info = row(engine, recovery.id)["recovery_info"]
        assert info["recovered_at"] == isoformat_z(recovery.recovered_at), "the time it was written, not read"


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_an_audit_that_changed_after_it_was_read_ahead_is_judged_and_described_as_it_is_under_the_lock(
        engine, start_audit, backdate, monkeypatch):
    """After the second batch was read ahead, one of its workers reported a new step (still stuck by
    age) and the other finished: the first is recovered with its new step, the second left alone."""
    stuck = _read_ahead_scenario(engine, start_audit, backdate)
    (moved, moved_lease), (finished, finished_lease) = stuck[2], stuck[3]
    real_ahead = recovery_module._build_ahead

    def then_workers_write(verdicts, **kw):
        early = real_ahead(verdicts, **kw)
        leases.write_progress(engine, moved_lease, {"step": "Writing report", "percentage": 90.0, "completed_tasks": 9,
                                                    "total_tasks": 10}, "sig-2", None, OPERATOR)
        leases.finish(engine, finished_lease, error=None, actor=OPERATOR)
        return early

    monkeypatch.setattr(recovery_module, "_build_ahead", then_workers_write)
    done = recover_stuck(engine, T, actor=OPERATOR, batch_size=2)

    assert sorted(r.id for r in done) == sorted([stuck[0][0], stuck[1][0], moved])
    assert events(engine, moved)[-1]["details"]["from"]["step"] == "Writing report"
    assert row(engine, finished)["status"] == COMPLETED


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_reading_ahead_that_fails_only_leaves_the_batch_to_be_read_under_its_lock(engine, start_audit, backdate,
                                                                                  monkeypatch):
    _read_ahead_scenario(engine, start_audit, backdate)

    def broken(verdicts, **kw):
        raise RuntimeError("disk hiccup")

    monkeypatch.setattr(recovery_module, "_build_ahead", broken)
    done = recover_stuck(engine, T, actor=OPERATOR, batch_size=2)
    assert len(done) == 4 and list(done.skipped) == []


def test_recover_audits_marks_an_audit_the_database_refuses_as_a_recover_for_an_operator(engine, start_audit):
    from auditctl.recovery import recover_audits

    (fine, _), (refused, _) = start_audit(worker_id="w"), start_audit(worker_id="w")
    condition = f"OLD.id = {refused} AND NEW.status <> 'running'"
    install_abort_trigger(engine, "refuse_manual", when_sqlite=condition, when_pg=condition)
    done = recover_audits(engine, audits.c.worker_id == "w", reason="manual", explanation="x", actor=OPERATOR)
    assert [r.id for r in done] == [fine] and [s.id for s in done.skipped] == [refused]
    assert events(engine, refused)[-1]["details"]["operation"] == "recover"


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_recover_audits_skips_an_audit_another_transaction_holds_and_recovers_the_rest(engine, start_audit):
    """PostgreSQL: a row locked by someone else (a worker's write in flight) is skipped, not waited for."""
    import time as clock

    from sqlalchemy import text as sql

    from auditctl.recovery import recover_audits

    (free, _), (held, _) = start_audit(worker_id="w"), start_audit(worker_id="w")
    with engine.connect() as other:
        other.execute(sql("SELECT id FROM audits WHERE id = :id FOR UPDATE"), {"id": held})
        started = clock.monotonic()
        done = recover_audits(engine, audits.c.worker_id == "w", reason="manual", explanation="x", actor=OPERATOR)
        took = clock.monotonic() - started
        other.rollback()
    assert [r.id for r in done] == [free] and list(done.skipped) == []
    assert took < 5, f"waited {took:.1f}s for a locked row"
    assert row(engine, held)["status"] == RUNNING


def test_a_peer_that_registered_after_the_cleanup_read_its_live_set_keeps_its_fresh_audit(engine, start_audit, backdate):
    """The cleanup reads which instances are alive, then recovers the others' audits: an instance of the
    same worker_id that started in between (a reused pod name) and claimed at once is no earlier one."""
    from datetime import timedelta

    from auditctl.sqlfunctions import fetch_now
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        for instance, started in (("earlier", 3600), ("cleaning", 10), ("started-meanwhile", 0)):
            connection.execute(workers.insert().values(instance_id=instance, worker_id="w", host="h", pid=1,
                                                       started_at=now - timedelta(seconds=started)))
    left, _ = start_audit(worker_id="w", instance_id="earlier")
    backdate(left, started_at=1800)  # claimed before the cleaning instance registered: a leftover
    fresh, _ = start_audit(worker_id="w", instance_id="started-meanwhile")
    claimed_since, _ = start_audit(worker_id="w", instance_id="earlier")  # after "cleaning" registered

    done = recover_worker_leftovers(engine, "w", {"cleaning"}, actor=Actor.worker("w", "cleaning"),
                                    instance_id="cleaning")

    assert [r.id for r in done] == [left]
    assert row(engine, fresh)["status"] == RUNNING
    assert row(engine, claimed_since)["status"] == RUNNING, "claimed after the cleaner registered: no leftover"


def test_recover_worker_leftovers_can_requeue(engine, start_audit):
    dead, _ = start_audit(worker_id="w", instance_id="dead")
    (recovery,) = recover_worker_leftovers(engine, "w", {"live"}, actor=OPERATOR, requeue=True)
    assert recovery.status == PENDING
    assert row(engine, dead)["status"] == PENDING
    assert [e["event"] for e in events(engine, dead)] == ["requeued"]


def test_dry_run_with_requeue_predicts_the_audits_that_would_fail_for_good(engine, backdate, start_audit):
    from auditctl.history import Actor
    from auditctl.recovery import recover_stuck
    from auditctl.thresholds import Thresholds

    audit_id, _ = start_audit()  # claimed once: attempts == 1
    backdate(audit_id, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    thresholds = Thresholds(stale_after=600, max_age=1800, stall_after=600)
    (predicted,) = recover_stuck(engine, thresholds, actor=Actor.command("test"), requeue=True, max_attempts=1, dry_run=True)
    (done,) = recover_stuck(engine, thresholds, actor=Actor.command("test"), requeue=True, max_attempts=1)
    assert predicted.status == done.status == "failed"
    assert predicted.explanation == done.explanation


def test_a_new_claim_forgets_the_reasons_of_an_earlier_recovery(engine, backdate, start_audit):
    from auditctl import leases
    from auditctl.history import Actor
    from auditctl.recovery import recover_stuck, reset_failed
    from auditctl.thresholds import Thresholds

    audit_id, _ = start_audit()
    backdate(audit_id, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    recover_stuck(engine, Thresholds(), actor=Actor.command("test"))
    reset_failed(engine, actor=Actor.command("test"), ids=[audit_id])
    lease, _ = leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-2", worker_url=None)
    leases.finish(engine, lease, error="crawler crashed", actor=Actor.command("test"))
    # It failed on its own this time: reset-all --reason stale_heartbeat must not pick it.
    assert reset_failed(engine, actor=Actor.command("test"), reason="stale_heartbeat", dry_run=True) == []
    assert [r.id for r in reset_failed(engine, actor=Actor.command("test"), dry_run=True)] == [audit_id]


def test_a_manual_verdict_reports_times_to_the_millisecond_and_survives_missing_columns():
    """_ManualVerdict, what startup cleanup and explicit recoveries are judged by, read from a row as
    another tool may have left it."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from auditctl.recovery import _ManualVerdict, _unreadable_recovery

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    row = SimpleNamespace(id=3, target="https://example.com/3", lease="l", worker_id="w", worker_instance="i",
                          attempts=2, started_at=now - timedelta(seconds=1.23456), heartbeat_at=None)
    verdict = _ManualVerdict(row, "manual", "taken back", now)
    assert verdict.measurements() == {"age_seconds": 1.235, "silence_seconds": None}
    assert (verdict.target, verdict.attempts, verdict.reasons, verdict.explain()) == (
        "https://example.com/3", 2, ["manual"], ["taken back"])
    assert _unreadable_recovery(verdict, "x").target == "https://example.com/3"

    bare = _ManualVerdict(SimpleNamespace(id=4, target=None, lease=None, worker_id=None, worker_instance=None,
                                          attempts=None, started_at=None, heartbeat_at=None), "manual", "x", now)
    assert (bare.target, bare.attempts, bare.worker_id, bare.measurements()) == (
        "", 0, None, {"age_seconds": None, "silence_seconds": None})


def test_a_batch_of_recoveries_is_built_without_the_collector_walking_it(engine):
    """Recovering a batch builds what is recorded and reported for every audit in it, all alive
    until the batch commits: the collector waits while that is built (``gcpause``; not while the
    database is waited for), and is on again after."""
    import gc
    import sys

    make_running(engine, 400)
    policy = Thresholds(stale_after=60, max_age=3600, stall_after=60)
    collections = []

    def count(phase, info):
        """Note each collection that starts while a batch is applied (the frames it interrupted)."""
        if phase == "start":
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != "_recovery_params":
                frame = frame.f_back
            collections.append(frame is not None)

    threshold = gc.get_threshold()
    gc.set_threshold(50, 10, 10)
    gc.callbacks.append(count)
    try:
        done = recover_stuck(engine, policy, actor=Actor.command("recover"), batch_size=400)
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
    assert len(done) == 400
    assert collections and not any(collections), "collections ran, and none while the batch's recoveries were built"


def test_a_leftover_cleanup_leaves_an_audit_claimed_at_the_very_moment_the_cleaner_registered(engine, start_audit):
    """"Claimed at or after that registration" is no leftover: an audit whose start is exactly the cleaning
    instance's registration stays running; one claimed a millisecond before it is recovered."""
    from datetime import timedelta

    from auditctl.sqlfunctions import fetch_now
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        registered = fetch_now(connection).replace(microsecond=250000) - timedelta(seconds=60)
        connection.execute(workers.insert().values(instance_id="cleaning", worker_id="w", host="h", pid=1,
                                                   started_at=registered))
    same_moment, _ = start_audit(worker_id="w", instance_id="earlier")
    before, _ = start_audit(worker_id="w", instance_id="earlier")
    with write_transaction(engine) as connection:
        for audit_id, started in ((same_moment, registered), (before, registered - timedelta(milliseconds=1))):
            connection.execute(update(audits).where(audits.c.id == audit_id).values(started_at=started))

    done = recover_worker_leftovers(engine, "w", {"cleaning"}, actor=Actor.worker("w", "cleaning"), instance_id="cleaning")

    assert [r.id for r in done] == [before]
    assert row(engine, same_moment)["status"] == RUNNING


def test_the_overview_counts_the_healthy_audits_it_does_not_list_and_its_oldest_silence(engine, backdate):
    from auditctl.overview import fleet_overview
    from auditctl.thresholds import Policy

    stuck, *healthy = make_running(engine, 4, silent_for=5)
    backdate(stuck, heartbeat_at=700, last_worker_update=700)
    overview = fleet_overview(engine, Policy.coerce(Thresholds()), sample=1)
    assert [v.id for v in overview.stuck] == [stuck] and overview.running == 4
    assert len(overview.healthy_sample) == 1 and overview.healthy_more == 2
    assert 690 <= overview.oldest_heartbeat_age <= 800


def test_a_history_row_without_reasons_stores_none_on_every_engine(engine):
    from auditctl import history
    from auditctl.sqlfunctions import fetch_now

    with write_transaction(engine) as connection:
        history.record(connection, [{"audit_id": 1, "event": history.NEEDS_OPERATOR, "details": {"operation": "reset"}}],
                       OPERATOR, fetch_now(connection))
    (event,) = events(engine, 1)
    assert event["reasons"] is None and event["from_status"] is None


def test_a_refused_late_write_of_a_worker_with_the_longest_worker_id_records_its_actor_cut_to_the_column(engine, start_audit,
                                                                                                        backdate):
    """``worker <200 characters> (instance)`` is longer than the history's actor column (200): it is cut, not refused."""
    from auditctl.history import events_for

    worker_id = "w" * 200
    audit_id, lease = start_audit(worker_id=worker_id)
    backdate(audit_id, heartbeat_at=3600, last_worker_update=3600, progress_changed_at=3600)
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))] == [audit_id]
    with pytest.raises(LeaseLost):
        leases.heartbeat(engine, lease, Actor.worker(worker_id, "0123456789abcdef"))
    late = [e for e in events_for(engine, audit_id) if e.event == "lease_lost"]
    assert [e.actor for e in late] == [("worker " + worker_id)[:200]]
