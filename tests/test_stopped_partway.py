"""A change made in batches that stops partway: what its committed batches did is shown with the
error, and a database that will not let auditctl write at all stops it at once.

The database's own errors, raised for real by triggers with the SQLSTATE a server gives: 57P01
(an administrator's shutdown: an outage) once the first batch has committed, 42501 (no privilege)
for every write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import events, install_abort_trigger, make_running, row
from sqlalchemy import text

from auditctl.cli import cli

AUDITCTL = Path(sys.executable).parent / "auditctl"
BATCH = 500

pytestmark = pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def statuses(engine, ids) -> dict[str, int]:
    counts: dict[str, int] = {}
    for audit_id in ids:
        status = row(engine, audit_id)["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def outage_after_the_first_batch(engine, ids, to_status: str) -> None:
    install_abort_trigger(engine, "outage", when_pg=f"NEW.status = '{to_status}' AND NEW.id > {ids[BATCH - 1]}",
                          errcode="57P01")


def test_recover_stopped_by_an_outage_lists_what_it_recovered_then_fails(engine, database_url):
    ids = make_running(engine, BATCH + 300)
    outage_after_the_first_batch(engine, ids, "failed")

    result = run("recover", "-o", "json", "--database-url", database_url)

    assert result.exit_code == 1, result.output
    listed = [record["id"] for record in json.loads(result.stdout)]
    assert listed == ids[:BATCH], "the committed batch, shown"
    assert "Recovered 500 audits" in result.stderr and "Stopped partway" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: database unavailable"), result.stderr
    assert statuses(engine, ids) == {"failed": BATCH, "running": 300}


def test_a_monitor_pass_stopped_by_an_outage_reports_what_its_committed_batches_recovered(engine):
    from auditctl.history import Actor
    from auditctl.monitor import Monitor
    from auditctl.thresholds import Thresholds

    ids = make_running(engine, BATCH + 300)
    outage_after_the_first_batch(engine, ids, "failed")

    result = Monitor(engine, Thresholds(), actor=Actor.command("test")).run_pass()

    assert not result.ok and "database unavailable" in result.error.lower(), result.error
    assert [recovery.id for recovery in result.recovered] == ids[:BATCH]
    assert statuses(engine, ids) == {"failed": BATCH, "running": 300}


def test_reset_all_stopped_by_an_outage_lists_what_it_reset_then_fails(engine, database_url):
    ids = make_running(engine, BATCH + 300)
    assert run("recover", "--database-url", database_url).exit_code == 0
    outage_after_the_first_batch(engine, ids, "pending")

    result = run("reset-all", "--yes", "-o", "json", "--database-url", database_url)

    assert result.exit_code == 1, result.output
    assert [record["id"] for record in json.loads(result.stdout)] == ids[:BATCH]
    assert "Reset 500 audits to pending." in result.stderr and "Stopped partway" in result.stderr
    assert "changed meanwhile" not in result.stderr, "the 300 were never reached, not left alone"
    assert statuses(engine, ids) == {"pending": BATCH, "failed": 300}


def test_a_role_that_may_not_write_stops_recover_at_once_in_one_line(engine, database_url):
    ids = make_running(engine, 2 * BATCH)
    install_abort_trigger(engine, "no_privilege", errcode="42501")

    result = run("recover", "--database-url", database_url)

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "will not let auditctl write" in lines[0], lines[:5]
    assert "needs an operator" not in result.stderr, "the role's fault, not each audit's"
    assert statuses(engine, ids) == {"running": 2 * BATCH}
    assert not [e for audit_id in ids[:20] for e in events(engine, audit_id)], "no 'needs an operator' history"


def test_watch_stops_with_one_line_when_its_role_may_not_write(engine, database_url):
    make_running(engine, 3)
    install_abort_trigger(engine, "no_privilege", errcode="42501")

    watch = subprocess.run([AUDITCTL, "watch", "--interval", "1s", "--no-live", "--database-url", database_url],
                           capture_output=True, text=True, timeout=60)

    assert watch.returncode == 1, watch.stderr
    assert "cannot watch: the database at" in watch.stdout and "will not let auditctl write" in watch.stdout
    assert "needs an operator" not in watch.stdout + watch.stderr


def test_a_watch_pass_stopped_by_an_outage_logs_what_it_recovered(engine, database_url):
    ids = make_running(engine, BATCH + 100)
    outage_after_the_first_batch(engine, ids, "failed")

    watch = subprocess.run([AUDITCTL, "watch", "--once", "--no-live", "--database-url", database_url],
                           capture_output=True, text=True, timeout=60)

    assert watch.returncode == 1
    recovered = [line for line in watch.stdout.splitlines() if " recovered audit " in line]
    assert len(recovered) == BATCH, watch.stdout[-2000:]
    assert "database lost" in watch.stdout


def test_reset_all_leaves_a_row_another_transaction_holds_and_resets_the_others(engine, database_url):
    ids = make_running(engine, 5)
    assert run("recover", "--database-url", database_url).exit_code == 0
    with engine.connect() as holder:
        holder.execute(text("SELECT id FROM audits WHERE id = :id FOR UPDATE"), {"id": ids[2]})
        result = run("reset-all", "--yes", "--lock-wait", "3s", "--database-url", database_url)
        holder.rollback()

    assert result.exit_code == 0, result.output
    assert "Reset 4 audits to pending; 1 changed meanwhile and were left alone" in result.stderr, result.stderr
    assert statuses(engine, ids) == {"pending": 4, "failed": 1}


def test_a_worker_startup_cleanup_stopped_partway_logs_what_it_recovered_then_raises(engine, database_url, caplog):
    """What an earlier instance left, recovered batch by batch: an outage after the first batch
    committed still leaves one log line per audit it recovered, before the error reaches the caller."""
    import logging

    from auditctl import StuckAuditPrevention
    from auditctl.errors import DatabaseUnavailable

    ids = make_running(engine, BATCH + 300, worker_id="restarting", instance_id="an-earlier-instance")
    outage_after_the_first_batch(engine, ids, "failed")
    guard = StuckAuditPrevention(database_url, worker_id="restarting", heartbeat_interval=1, stale_after=600)
    try:
        with caplog.at_level(logging.WARNING, logger="auditctl"), pytest.raises(DatabaseUnavailable):
            guard.cleanup_stuck_audits_on_startup()
    finally:
        guard.stop()
    logged = [record.getMessage() for record in caplog.records if "was left running by an earlier instance" in record.getMessage()]
    assert len(logged) == BATCH and f"audit {ids[0]} " in logged[0], logged[:2]
    assert statuses(engine, ids) == {"failed": BATCH, "running": 300}


def test_a_reset_stopped_after_only_an_audit_needing_an_operator_still_reports_that_audit(engine):
    """The batches before the outage changed no audit, but one was refused and recorded as needing an
    operator: that is done, and the caller is handed it with the error (not the error alone, as if
    nothing had happened)."""
    from auditctl.errors import AuditctlError
    from auditctl.history import Actor
    from auditctl.recovery import committed_before, recover_stuck, reset_failed, until_stopped
    from auditctl.thresholds import Thresholds

    refused, unreached = make_running(engine, 2)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))
    install_abort_trigger(engine, "refuse_one", when_pg=f"NEW.status = 'pending' AND NEW.id = {refused}")
    install_abort_trigger(engine, "outage", when_pg=f"NEW.status = 'pending' AND NEW.id = {unreached}", errcode="57P01")

    done, error = until_stopped(lambda: reset_failed(engine, actor=Actor.command("reset-all"), batch_size=1))

    assert isinstance(error, AuditctlError) and committed_before(error) is done
    assert list(done) == [] and [s.id for s in done.skipped] == [refused]
    assert events(engine, refused)[-1]["event"] == "needs_operator"
    assert statuses(engine, [refused, unreached]) == {"failed": 2}
