"""Resetting failed audits: what a reset clears, counts, records, announces and reports, audit by audit.

test_recovery.py covers which audits a reset takes; these tests pin down what it does to each one,
on both engines, so a reset that forgets a column, miscounts or misreports cannot pass.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from dbtools import all_rows, events, install_abort_trigger, make_running, row
from sqlalchemy import select, update

from auditctl import recovery as recovery_module
from auditctl.errors import Interrupted
from auditctl.history import Actor
from auditctl.recovery import Reset, ResetFilters, plan_reset_all, recover_stuck, reset_all, reset_failed
from auditctl.schema import FAILED, PENDING, audits, notifications
from auditctl.sqlfunctions import fetch_now
from auditctl.thresholds import Thresholds
from auditctl.transactions import read_connection, write_transaction

ACTOR = Actor.command("reset-all")

#: Everything a reset puts back to nothing: the run that failed, and its outcome.
CLEARED = ("error", "finished_at", "started_at", "lease", "worker_id", "worker_instance", "heartbeat_at",
           "progress_changed_at", "progress", "progress_signature")


def recovered_and_errored(engine):
    """Two failed audits: one recovered by auditctl (origin stuck), one that failed with its own error."""
    stuck, errored = make_running(engine, 2)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), ids=[stuck])
    with write_transaction(engine) as connection:
        # Failed by another tool, which left its lease and progress signature behind.
        connection.execute(update(audits).where(audits.c.id == errored).values(
            status=FAILED, error="scanner crashed: out of memory", finished_at=audits.c.heartbeat_at,
            lease="left-by-another-tool", progress_signature="sig-9"))
    return stuck, errored


def reset_announcements(engine) -> list[dict]:
    with read_connection(engine) as connection:
        return [r.payload for r in connection.execute(
            select(notifications.c.payload).where(notifications.c.event == "reset").order_by(notifications.c.id))]


def test_a_reset_clears_the_failed_run_counts_the_reset_and_reports_each_audit_as_it_was(engine):
    stuck, errored = recovered_and_errored(engine)
    before = {audit_id: row(engine, audit_id) for audit_id in (stuck, errored)}
    assert all(before[a][column] is not None for a in (stuck, errored) for column in ("error", "finished_at", "worker_id"))

    done = reset_failed(engine, actor=ACTOR)

    assert done == [
        Reset(id=stuck, target=before[stuck]["target"], from_status=FAILED, status=PENDING, reasons=["stale_heartbeat"],
              error=before[stuck]["error"], finished_at=before[stuck]["finished_at"], origin="stuck", resets=0),
        Reset(id=errored, target=before[errored]["target"], from_status=FAILED, status=PENDING, reasons=[],
              error="scanner crashed: out of memory", finished_at=before[errored]["finished_at"], origin="error", resets=0),
    ]
    for audit_id in (stuck, errored):
        after = row(engine, audit_id)
        assert after["status"] == PENDING
        assert {column: after[column] for column in CLEARED} == dict.fromkeys(CLEARED), "the old run is gone"
        assert after["resets"] == 1
        untouched = set(after) - set(CLEARED) - {"status", "resets"}
        assert {c: after[c] for c in untouched} == {c: before[audit_id][c] for c in untouched}


def test_each_reset_writes_one_history_row_with_the_row_as_it_was_and_its_origin(engine):
    stuck, errored = recovered_and_errored(engine)
    before = {audit_id: row(engine, audit_id) for audit_id in (stuck, errored)}

    reset_failed(engine, actor=ACTOR)

    for audit_id, origin, reasons in ((stuck, "stuck", ["stale_heartbeat"]), (errored, "error", [])):
        written = [e for e in events(engine, audit_id) if e["event"] == "reset"]
        assert len(written) == 1
        event = written[0]
        assert (event["from_status"], event["to_status"], event["actor"]) == (FAILED, PENDING, "auditctl reset-all")
        assert (event["reasons"] or "") == ",".join(reasons)
        assert event["details"]["origin"] == origin
        original = event["details"]["original_status"]
        assert (original["status"], original["error"], original["worker_id"], original["lease"]) == (
            FAILED, before[audit_id]["error"], before[audit_id]["worker_id"], before[audit_id]["lease"])
        assert "odd_times" not in original


def test_a_reset_is_announced_once_per_batch_with_its_count_ids_and_origins(engine):
    stuck, errored = recovered_and_errored(engine)
    more = make_running(engine, 3)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), ids=more)

    reset_failed(engine, actor=ACTOR, batch_size=3)

    with read_connection(engine) as connection:
        announced_at = [r.created_at for r in connection.execute(
            select(notifications.c.created_at).where(notifications.c.event == "reset").order_by(notifications.c.id))]
    written_at = sorted({e["at"] for e in events(engine) if e["event"] == "reset"})
    assert announced_at == written_at, "each batch's announcement carries the moment its history rows were written"
    assert reset_announcements(engine) == [
        {"actor": "auditctl reset-all", "host": ACTOR.host, "count": 3, "ids": [stuck, errored, more[0]],
         "by_origin": {"stuck": 2, "error": 1}},
        {"actor": "auditctl reset-all", "host": ACTOR.host, "count": 2, "ids": more[1:],
         "by_origin": {"stuck": 2, "error": 0}},
    ]


def test_a_second_reset_counts_again_and_reports_the_earlier_count(engine):
    stuck, _errored = recovered_and_errored(engine)
    reset_failed(engine, actor=ACTOR, ids=[stuck])
    with write_transaction(engine) as connection:  # it ran and failed again
        connection.execute(update(audits).where(audits.c.id == stuck).values(status=FAILED, error="again"))

    again = reset_failed(engine, actor=ACTOR, ids=[stuck])

    assert [(r.id, r.resets, r.error, r.origin) for r in again] == [(stuck, 1, "again", "stuck")]
    assert row(engine, stuck)["resets"] == 2
    assert reset_failed(engine, actor=ACTOR, filters=ResetFilters(ids=(stuck,), max_resets=2)) == []


def test_a_dry_run_reports_exactly_what_the_reset_then_does(engine):
    recovered_and_errored(engine)
    before_rows, before_events = all_rows(engine), events(engine)

    preview = reset_failed(engine, actor=ACTOR, dry_run=True)

    assert all_rows(engine) == before_rows and events(engine) == before_events and reset_announcements(engine) == []

    assert reset_failed(engine, actor=ACTOR) == preview


def test_a_dry_run_reads_only_the_columns_a_reset_reports_not_the_documents(engine):
    """Reading and decoding every failed audit's progress and recovery_info made a dry run over
    100,000 audits take 20 s instead of 7 s; what it reports needs neither."""
    from sqlalchemy import event

    recovered_and_errored(engine)
    statements = []
    listener = lambda conn, cursor, statement, *args: statements.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        preview = reset_failed(engine, actor=ACTOR, dry_run=True)
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    assert len(preview) == 2
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM audits" in s]
    assert reads, statements
    for read in reads:
        selected = read.split("FROM audits")[0]
        assert "progress" not in selected and "recovery_info" not in selected, read


def test_an_audit_that_cannot_be_described_is_still_reset_and_listed_by_id(engine, monkeypatch):
    stuck, errored = recovered_and_errored(engine)
    describe = recovery_module._reset_from_row

    def fails_for_the_errored_one(found, status):
        if found.id == errored:
            raise ValueError("a column another tool wrote")
        return describe(found, status)

    monkeypatch.setattr(recovery_module, "_reset_from_row", fails_for_the_errored_one)

    preview = reset_failed(engine, actor=ACTOR, dry_run=True)
    assert preview[1] == Reset(id=errored, target="?", from_status=FAILED, status=PENDING, reasons=[],
                               error="ValueError: a column another tool wrote", finished_at=None)
    done = reset_failed(engine, actor=ACTOR)

    assert [r.id for r in done] == [stuck, errored]
    assert done[1] == Reset(id=errored, target="?", from_status=FAILED, status=PENDING, reasons=[], error=None,
                            finished_at=None)
    assert row(engine, errored)["status"] == PENDING


def test_a_reset_the_database_refuses_is_marked_for_an_operator_as_a_reset(engine):
    stuck, errored = recovered_and_errored(engine)
    install_abort_trigger(engine, "refuse_one_reset", table="audit_events", event="INSERT",
                          when_sqlite=f"NEW.audit_id = {errored} AND NEW.event = 'reset'",
                          when_pg=f"NEW.audit_id = {errored} AND NEW.event = 'reset'")
    progress = []

    done = reset_failed(engine, actor=ACTOR, on_batch=lambda handled, total: progress.append((handled, total)))

    assert [r.id for r in done] == [stuck]
    assert [s.id for s in done.skipped] == [errored]
    marked = events(engine, errored)[-1]
    assert marked["event"] == "needs_operator"
    assert marked["details"]["operation"] == "reset", "the record names the operation that failed"
    assert marked["actor"] == ACTOR.name, "the record names who acted"
    assert progress[-1] == (2, 2), "progress counts every audit handled, the refused one too"


@pytest.mark.parametrize("size", [1, 2, 500])
def test_reset_batches_of_any_size_reset_everything_once(engine, size):
    ids = make_running(engine, 5)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), ids=ids)
    seen = []

    done = reset_failed(engine, actor=ACTOR, batch_size=size, on_batch=lambda handled, total: seen.append((handled, total)))

    assert sorted(r.id for r in done) == ids
    assert seen[-1] == (5, 5) and len(seen) == -(-5 // size)
    assert all(row(engine, audit_id)["resets"] == 1 for audit_id in ids)


def test_a_reset_describes_a_row_with_missing_text_without_failing():
    from types import SimpleNamespace

    from auditctl.recovery import _reset_from_row

    bare = SimpleNamespace(id=5, target=None, status=None, recovery_reasons=None, error=None, finished_at=None, resets=None)
    assert _reset_from_row(bare, PENDING) == Reset(id=5, target="", from_status="?", status=PENDING, reasons=[],
                                                   error=None, finished_at=None, origin="error", resets=0)
    odd = SimpleNamespace(id=6, target=b"https://example.com/6", status="failed", recovery_reasons=",stale_heartbeat,,",
                          error=7, finished_at="not a time", resets=2)
    described = _reset_from_row(odd, PENDING)
    assert (described.target, described.reasons, described.error, described.finished_at, described.origin, described.resets) == (
        "https://example.com/6", ["stale_heartbeat"], "7", None, "stuck", 2)


def test_origins_pick_recovered_audits_or_those_that_failed_on_their_own(engine):
    """An empty reasons text (another tool's) counts as failing on its own, like no reasons at all."""
    stuck, errored = recovered_and_errored(engine)
    (blank,) = make_running(engine, 1)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == blank).values(status=FAILED, error="x", recovery_reasons=""))

    def taken(*origins):
        return [r.id for r in reset_failed(engine, actor=ACTOR, filters=ResetFilters(origins=origins), dry_run=True)]

    assert taken("stuck") == [stuck]
    assert taken("error") == [errored, blank]
    assert taken("stuck", "error") == taken() == [stuck, errored, blank]


def test_reset_filters_refuse_what_they_do_not_know_with_the_choices():
    from auditctl.errors import ConfigError
    from auditctl.thresholds import RECOVERY_REASONS

    with pytest.raises(ConfigError) as reason:
        ResetFilters(reasons=("stale",))
    assert str(reason.value) == f"unknown reason 'stale': choose from {', '.join(RECOVERY_REASONS)}"
    with pytest.raises(ConfigError) as origin:
        ResetFilters(origins=("stuck", "bogus"))
    assert str(origin.value) == "unknown origin 'bogus': choose from stuck, error"
    with pytest.raises(ConfigError, match="max_resets must be 0 or more, got -1"):
        ResetFilters(max_resets=-1)
    assert ResetFilters(max_resets=0).max_resets == 0, "0 is a limit: reset nothing again"


# --- reset-all: a plan carried out as it was shown -------------------------------------------


def test_an_odd_reasons_text_shows_the_origin_that_origin_filters_select(engine):
    """',' (another tool's) is text, so the SQL calls it stuck; the listing and the counts now say so too."""
    (odd,) = make_running(engine, 1)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == odd).values(status=FAILED, error="x", recovery_reasons=","))

    listed = reset_failed(engine, actor=ACTOR, filters=ResetFilters(origins=("stuck",)), dry_run=True)

    assert [(r.id, r.origin, r.reasons) for r in listed] == [(odd, "stuck", [])]
    assert reset_failed(engine, actor=ACTOR, filters=ResetFilters(origins=("error",)), dry_run=True) == []
    assert plan_reset_all(engine, ResetFilters()).by_origin == {"stuck": 1, "error": 0}


def test_carrying_out_a_plan_leaves_alone_an_audit_that_stopped_matching_its_filters(engine):
    """Planned under --origin stuck; while the operator read the question the audit was reset,
    run again and failed with its own error. The reset takes what it showed, not that."""
    stuck, errored = recovered_and_errored(engine)
    plan = plan_reset_all(engine, ResetFilters(origins=("stuck",)))
    assert plan.ids == [stuck]
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == stuck).values(
            recovery_reasons=None, error="scanner crashed on its own", resets=1))

    done = reset_all(engine, plan, actor=ACTOR)

    assert done == [] and done.skipped == []
    assert row(engine, stuck)["status"] == FAILED


def test_include_stuck_leaves_an_audit_at_the_reset_limit_running_and_counts_it_held_back(engine):
    limited, free = make_running(engine, 2)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == limited).values(resets=5))

    plan = plan_reset_all(engine, ResetFilters(max_resets=5), include_stuck=True, policy=Thresholds())
    done = reset_all(engine, plan, actor=ACTOR, policy=Thresholds())

    assert [v.id for v in plan.stuck] == [free] and (plan.held_back, plan.stuck_held_back) == (0, 1)
    assert [r.id for r in done] == [free]
    assert row(engine, limited)["status"] == "running", "recovering it would only have left it failed"
    assert row(engine, free)["status"] == PENDING


def test_include_stuck_reports_a_stuck_audit_the_database_refuses_as_needing_an_operator(engine):
    refused, taken = make_running(engine, 2)
    install_abort_trigger(engine, "refuse_one", when_sqlite=f"OLD.id = {refused}", when_pg=f"OLD.id = {refused}")

    plan = plan_reset_all(engine, ResetFilters(), include_stuck=True, policy=Thresholds())
    done = reset_all(engine, plan, actor=ACTOR, policy=Thresholds())

    assert [r.id for r in done] == [taken]
    assert [s.id for s in done.skipped] == [refused]
    assert row(engine, refused)["status"] == "running"
    assert events(engine, refused)[-1]["event"] == "needs_operator"


def test_interrupting_include_stuck_leaves_each_stuck_audit_reset_or_running_never_just_failed(engine, monkeypatch):
    monkeypatch.setattr(recovery_module, "DEFAULT_BATCH", 2)
    ids = make_running(engine, 6)
    plan = plan_reset_all(engine, ResetFilters(), include_stuck=True, policy=Thresholds())

    def stop_after_the_first_batch(handled, total):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as interrupted:
        reset_all(engine, plan, actor=ACTOR, policy=Thresholds(), on_batch=stop_after_the_first_batch)

    statuses = [row(engine, audit_id)["status"] for audit_id in ids]
    assert statuses == [PENDING, PENDING, "running", "running", "running", "running"]
    assert (interrupted.value.done, interrupted.value.verb) == (2, "reset")


def test_an_interrupted_recovery_counts_the_batches_that_committed(engine):
    ids = make_running(engine, 5)

    def stop_after_the_second_batch(handled, total):
        if handled == 4:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as interrupted:
        recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), batch_size=2,
                      on_batch=stop_after_the_second_batch)

    assert (interrupted.value.done, interrupted.value.verb) == (4, "recovered")
    assert [row(engine, audit_id)["status"] for audit_id in ids].count(FAILED) == 4


def test_since_given_in_seconds_is_fixed_to_one_moment_for_the_whole_reset(engine):
    """Every batch draws --since where the plan drew it, however long the question took."""
    plan = plan_reset_all(engine, ResetFilters(since=3600))
    with read_connection(engine) as connection:
        now = fetch_now(connection)

    assert isinstance(plan.filters.since, datetime)
    assert timedelta(seconds=3590) < now - plan.filters.since < timedelta(seconds=3700)


def test_since_as_a_moment_takes_an_audit_that_failed_at_exactly_that_moment(engine):
    """``--since`` is "failed within": an audit whose finish is the very moment named is in the
    reset (the plan, its dry run and the reset itself), one a millisecond earlier is not."""
    on_the_line, just_before = make_running(engine, 2)
    with read_connection(engine) as connection:
        moment = fetch_now(connection).replace(microsecond=123000) - timedelta(hours=1)
    with write_transaction(engine) as connection:
        for audit_id, finished in ((on_the_line, moment), (just_before, moment - timedelta(milliseconds=1))):
            connection.execute(update(audits).where(audits.c.id == audit_id).values(
                status=FAILED, error="scanner crashed", finished_at=finished))

    filters = ResetFilters(since=moment)
    assert plan_reset_all(engine, filters).ids == [on_the_line]
    assert [r.id for r in reset_failed(engine, actor=ACTOR, filters=filters, dry_run=True)] == [on_the_line]
    assert [r.id for r in reset_failed(engine, actor=ACTOR, filters=filters)] == [on_the_line]
    assert row(engine, on_the_line)["status"] == PENDING
    assert row(engine, just_before)["status"] == FAILED


def test_include_stuck_leaves_alone_a_stuck_audit_that_reached_the_reset_limit_after_the_plan(engine):
    """Between the plan and its confirmation someone else reset the audit to the limit (and it was
    claimed and stuck again): the batch checks the limit again under its lock, and leaves it running,
    unreported, rather than recovering it, finding it cannot be reset, and calling for an operator."""
    late, free = make_running(engine, 2)
    plan = plan_reset_all(engine, ResetFilters(max_resets=2), include_stuck=True, policy=Thresholds())
    assert [v.id for v in plan.stuck] == [late, free]
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == late).values(resets=2))

    done = reset_all(engine, plan, actor=ACTOR, policy=Thresholds())

    assert [r.id for r in done] == [free] and done.skipped == []
    assert row(engine, late)["status"] == "running"
    assert events(engine, late) == []


def test_include_stuck_with_only_reasons_no_rule_gives_takes_no_stuck_audit(engine):
    """``--reason worker_restarted`` (or ``manual``) names failed audits a worker or an operator recovered:
    no stuck running audit is stuck for it, so none is recovered and reset along with them."""
    (stuck,) = make_running(engine, 1)
    for reasons in (("worker_restarted",), ("manual",), ("worker_restarted", "manual")):
        plan = plan_reset_all(engine, ResetFilters(reasons=reasons), include_stuck=True, policy=Thresholds())
        assert plan.stuck == [] and plan.stuck_held_back == 0, reasons
    assert [v.id for v in plan_reset_all(engine, ResetFilters(reasons=("manual", "stale_heartbeat")), include_stuck=True,
                                         policy=Thresholds()).stuck] == [stuck]


def test_reset_all_does_not_count_an_audit_needing_an_operator_as_changed_meanwhile(engine, database_url):
    """An audit the database refused is reported as needing an operator, and only so: it was reached,
    not left alone because it changed since the plan."""
    from click.testing import CliRunner

    from auditctl.cli import cli

    refused, taken = make_running(engine, 2)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))
    install_abort_trigger(engine, "refuse_one", when_sqlite=f"OLD.id = {refused}", when_pg=f"OLD.id = {refused}")

    plan = plan_reset_all(engine, ResetFilters())
    done = reset_all(engine, plan, actor=ACTOR)
    assert [r.id for r in done] == [taken] and [s.id for s in done.skipped] == [refused]
    assert plan.left_alone(done, None) == 0

    result = CliRunner().invoke(cli, ["reset-all", "--yes", "--database-url", database_url], catch_exceptions=False)
    assert "need" in result.stderr and "operator" in result.stderr, result.stderr
    assert "left alone" not in result.stderr, result.stderr


def test_since_in_seconds_with_named_audits_is_fixed_once_for_every_batch(engine):
    """``reset --id A --id B --since 6s``: the line is drawn when the reset starts, not again at each
    batch, so an audit inside the window when it started is reset even if a later batch runs after
    it would have left the window."""
    import time

    first, second = make_running(engine, 2)
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(update(audits).where(audits.c.id.in_([first, second])).values(
            status=FAILED, error="scanner crashed", finished_at=now - timedelta(seconds=3)))

    def between_batches(handled, _count):
        if handled == 1:
            time.sleep(4)  # the database's clock moves on: 7s after the finish, past the 6s window

    done = reset_failed(engine, actor=ACTOR, filters=ResetFilters(since=6, ids=(first, second)), batch_size=1,
                        on_batch=between_batches)

    assert [r.id for r in done] == [first, second]


def test_a_ctrl_c_landing_just_after_a_batch_committed_still_counts_that_batch(engine):
    """SIGINT delivered as the committed batch's connection goes back to the pool (after COMMIT,
    before the batch was counted): the interruption reports the audits the database changed."""
    import os
    import signal

    from sqlalchemy import event

    ids = make_running(engine, 5)
    committed = []

    def on_commit(connection):
        committed.append(True)

    def on_checkin(dbapi_connection, record):
        if committed and len(committed) == 1:
            committed.append(True)  # once
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    event.listen(engine, "commit", on_commit)
    event.listen(engine.pool, "checkin", on_checkin)
    try:
        with pytest.raises(Interrupted) as interrupted:
            recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), batch_size=2)
    finally:
        event.remove(engine.pool, "checkin", on_checkin)
        event.remove(engine, "commit", on_commit)
        signal.signal(signal.SIGINT, previous)

    failed = [row(engine, audit_id)["status"] for audit_id in ids].count(FAILED)
    assert failed == 2
    assert (interrupted.value.done, interrupted.value.verb) == (failed, "recovered")


def test_a_second_ctrl_c_while_the_first_waits_for_a_batch_to_be_counted_acts_at_once():
    """``interrupts_held``: the first signal waits for the block's end; a second one (the operator
    insists, a COMMIT hangs) interrupts inside the block; outside it, the handlers are as before."""
    import os
    import signal

    from auditctl.signals import interrupts_held

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the first")
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the first, again")
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the second")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == ["after the first", "after the first, again"]
