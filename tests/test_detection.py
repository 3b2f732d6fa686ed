"""Detection: thresholds that travel with each audit, dead workers proven gone at once, and bounds
that keep a typo from failing a healthy fleet."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import freeze_between_writes, kill_quietly, python_env, read_line, row, spawn, wait_for
from sqlalchemy import text, update

from auditctl import leases, registry
from auditctl.cli import cli
from auditctl.rules import find_stuck
from auditctl.schema import audits, workers
from auditctl.thresholds import Overrides, Policy, Thresholds
from auditctl.transactions import write_transaction

AUDITCTL = Path(sys.executable).parent / "auditctl"
WORKER = Path(__file__).parent / "workerproc.py"


def scan_json(database_url, *args) -> list[dict]:
    result = CliRunner().invoke(cli, ["scan", "-o", "json", *args, "--database-url", database_url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def start_worker(database_url, *extra, worker_id="detected"):
    proc = spawn(WORKER, database_url, "--worker-id", worker_id, *extra)
    read_line(proc, startswith="READY")
    audit_id = int(read_line(proc, startswith="CLAIMED").split()[1])
    return proc, audit_id


# --- thresholds travel with the audit ---------------------------------------------------------------


def test_the_thresholds_a_worker_runs_under_are_recorded_on_every_audit_it_claims(engine, guards):
    guard = guards(worker_id="declaring", heartbeat_interval=1, stale_after=3, max_age=900, stall_after=60)
    plain = guards(worker_id="silent-about-it", heartbeat_interval=120, stale_after=None, max_age=None, stall_after=None)
    for who in (guard, plain):
        audit_id = who.create_audit(f"https://{who.worker_id}.example.com")
        with who.run(audit_id):
            stored = row(engine, audit_id)
            if who is guard:
                assert (stored["declared_heartbeat_interval"], stored["declared_stale_after"], stored["declared_max_age"],
                        stored["declared_stall_after"]) == (1.0, 3.0, 900.0, 60.0)
            else:  # only what it was given: its heartbeat; the judges' own settings apply to the rest
                assert (stored["declared_heartbeat_interval"], stored["declared_stale_after"]) == (120.0, None)


def test_a_frozen_worker_that_declared_3s_is_caught_by_a_scan_with_no_threshold_flags(engine, database_url):
    proc, audit_id = start_worker(database_url, "--stale-after", "3", "--heartbeat", "1", "--max-age", "900")
    try:
        assert scan_json(database_url) == []
        freeze_between_writes(proc, engine, audit_id)  # alive to the process table: only silence can tell
        frozen = time.monotonic()
        found = wait_for(lambda: scan_json(database_url), timeout=20, interval=0.25, message="the frozen audit in scan")
        latency = time.monotonic() - frozen
        (record,) = found
        assert record["id"] == audit_id and record["reasons"] == ["stale_heartbeat"]
        assert record["thresholds"]["stale_after"] == {"seconds": 3.0, "source": "worker"}
        assert "(stale_after 3s, worker)" in record["explanation"][0]
        assert latency < 60, f"caught after {latency:.1f}s: judged by the worker's 3s, not the fleet's 10 minutes"
        # `workers` agrees: its process is here (not gone), but it is silent, not alive.
        listed = CliRunner().invoke(cli, ["workers", "-o", "json", "--database-url", database_url], catch_exceptions=False)
        (instance,) = [i for i in json.loads(listed.stdout) if i["pid"] == proc.pid]
        assert instance["alive"] is True and instance["heartbeat_late"] is True and instance["gone"] is None
        table = CliRunner().invoke(cli, ["workers", "-o", "plain", "--database-url", database_url]).stdout
        assert re.search(rf"\b{proc.pid}\b.*\bsilent\b", table) and "stopped or hung?" in table, table
    finally:
        proc.send_signal(signal.SIGCONT)
        kill_quietly(proc)


def test_a_flag_on_the_command_line_overrides_the_audits_own_threshold(engine, database_url):
    proc, audit_id = start_worker(database_url, "--stale-after", "3", "--heartbeat", "1", "--max-age", "900")
    try:
        freeze_between_writes(proc, engine, audit_id)
        wait_for(lambda: scan_json(database_url), timeout=20, message="the frozen audit")
        assert scan_json(database_url, "--stale-after", "1h", "--max-age", "2h") == []
        (record,) = scan_json(database_url, "--stale-after", "2s")
        assert record["thresholds"]["stale_after"] == {"seconds": 2.0, "source": "flag"}
    finally:
        proc.send_signal(signal.SIGCONT)
        kill_quietly(proc)


def test_each_threshold_comes_from_the_most_specific_source_that_sets_it(engine, start_audit, backdate):
    own, _ = start_audit(max_age=100)  # create_audit(max_age=...)
    declared, _ = start_audit()
    kinded = leases.create_audit(engine, "https://kind.example.com", kind="quick-scan")
    leases.claim(engine, kinded, worker_id="w", instance_id="i", worker_url=None)
    fleet, _ = start_audit()
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == declared).values(declared_max_age=200.0, declared_stale_after=60.0))
    for audit_id in (own, declared, kinded, fleet):
        backdate(audit_id, started_at=7200, heartbeat_at=5, last_worker_update=5, progress_changed_at=5)
    policy = Policy.of(Thresholds(stale_after=600, max_age=3600, stall_after=600),
                       kinds={"quick-scan": Overrides(stale_after=300, max_age=300, stall_after=300)})
    verdicts = {v.id: v for v in find_stuck(engine, policy, gone={})}
    assert verdicts[own].threshold("max_age") == (100.0, "audit")
    assert verdicts[declared].threshold("max_age") == (200.0, "worker")
    assert verdicts[declared].threshold("stale_after") == (60.0, "worker")
    assert verdicts[kinded].threshold("max_age") == (300.0, "kind quick-scan")
    assert verdicts[fleet].threshold("max_age") == (3600.0, "fleet")
    flagged = Policy.of(Thresholds(), Overrides(max_age=7000))
    assert {v.id for v in find_stuck(engine, flagged, gone={})} == {own, declared, kinded, fleet}
    assert all(v.threshold("max_age") == (7000.0, "flag") for v in find_stuck(engine, flagged, gone={}))
    assert find_stuck(engine, Policy.of(Thresholds(), Overrides(max_age=8000)), gone={}) == [], "the flag beats them all"


# --- dead instances are caught at once --------------------------------------------------------------


def test_an_instance_killed_on_this_host_is_reported_worker_gone_by_the_next_scan(engine, database_url):
    proc, audit_id = start_worker(database_url, "--stale-after", "600", "--heartbeat", "60", "--max-age", "3600")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed = time.monotonic()
    done = subprocess.run([str(AUDITCTL), "scan", "-o", "json", "--database-url", database_url], capture_output=True,
                          text=True, env=python_env(), timeout=60)
    took = time.monotonic() - killed
    (record,) = json.loads(done.stdout)
    assert record["id"] == audit_id and record["reasons"] == ["worker_gone"]
    assert f"worker process {proc.pid} on" in record["explanation"][0] and "no longer exists" in record["explanation"][0]
    print(f"FIGURE worker_gone in scan: {took:.2f} s from SIGKILL to scan's answer, the scan process included")
    assert took < 60, took  # the verdict needs no waiting (600 s of silence would be needed otherwise)


def test_a_killed_worker_not_yet_reaped_by_its_parent_is_already_worker_gone(engine, database_url):
    proc, audit_id = start_worker(database_url, "--stale-after", "600", "--heartbeat", "60", "--max-age", "3600")
    try:
        proc.send_signal(signal.SIGKILL)
        # Not waited for: the process is a zombie until its parent (this test) reaps it.
        wait_for(lambda: open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=10,
                 message="the killed worker to become a zombie")
        (verdict,) = find_stuck(engine, Thresholds())
        assert verdict.id == audit_id and verdict.reasons == ["worker_gone"]
    finally:
        kill_quietly(proc)


def test_an_instance_that_stopped_cleanly_without_finishing_leaves_its_audits_worker_gone(engine, guards):
    guard = guards(worker_id="leaving", heartbeat_interval=60, stale_after=600, max_age=1800, stall_after=600)
    audit_id = guard.create_audit("https://example.com/abandoned")
    leases.claim(engine, audit_id, worker_id=guard.worker_id, instance_id=guard.instance_id, worker_url=None)
    assert find_stuck(engine, guard.thresholds) == []
    guard.stop()
    (verdict,) = find_stuck(engine, guard.thresholds)
    assert verdict.reasons == ["worker_gone"] and "stopped cleanly" in verdict.explain()[0]


def test_the_gone_instances_leave_out_one_that_stopped_longer_ago_than_the_retention(engine):
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.registry import GONE_RETENTION, gone_instances
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        long_ago = now - timedelta(seconds=GONE_RETENTION + 3600)
        for instance_id, when in (("a" * 32, now), ("b" * 32, long_ago)):
            connection.execute(insert(workers).values(instance_id=instance_id, worker_id="worker-r", host="elsewhere", pid=1,
                                                      process_key="other-boot:1", started_at=when, last_heartbeat_at=when,
                                                      stopped_at=when))
    assert set(gone_instances(engine)) == {"a" * 32}


@pytest.mark.parametrize("process_key", [None, "another-boot:4026531836:999999:12345", "garbage"])
def test_an_instance_whose_host_cannot_be_checked_is_never_reported_gone_only_silent(engine, start_audit, backdate,
                                                                                     process_key):
    audit_id, _ = start_audit(worker_id="far-away", instance_id="elsewhere")
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(instance_id="elsewhere", worker_id="far-away", host="other-host",
                                                   pid=999999, process_key=process_key, started_at=registry.db_now(),
                                                   last_heartbeat_at=registry.db_now()))
    assert registry.gone_instances(engine) == {}
    assert find_stuck(engine, Thresholds()) == []
    backdate(audit_id, started_at=900, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    (verdict,) = find_stuck(engine, Thresholds())
    assert verdict.reasons == ["stale_heartbeat"], "judged by silence alone"


def test_a_stopped_at_no_one_can_read_proves_nothing_and_the_audit_is_judged_by_silence(engine, start_audit, backdate):
    audit_id, _ = start_audit(worker_id="odd-writer", instance_id="odd-stop")
    unreadable = "infinity" if engine.dialect.name == "postgresql" else "stopped, more or less"
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(instance_id="odd-stop", worker_id="odd-writer", host="other-host",
                                                   pid=4242, process_key=None, started_at=registry.db_now(),
                                                   last_heartbeat_at=registry.db_now()))
        connection.execute(text("UPDATE workers SET stopped_at = :odd WHERE instance_id = 'odd-stop'"), {"odd": unreadable})
    assert registry.gone_instances(engine) == {}
    assert find_stuck(engine, Thresholds()) == []
    with write_transaction(engine) as connection:
        connection.execute(update(workers).where(workers.c.instance_id == "odd-stop").values(stopped_at=registry.db_now()))
    (verdict,) = find_stuck(engine, Thresholds())
    assert verdict.id == audit_id and verdict.reasons == ["worker_gone"], "a readable stop does prove it"


def test_a_registry_row_with_text_that_is_not_utf8_still_proves_its_instance_and_the_others_gone(engine, start_audit):
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses text that is not in its encoding")
    odd_held, _ = start_audit(worker_id="odd-bytes", instance_id="odd-bytes-1")
    plain_held, _ = start_audit(worker_id="plain", instance_id="plain-1")
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(host="here", pid=1, started_at=registry.db_now(), stopped_at=registry.db_now()),
                           [{"instance_id": "odd-bytes-1", "worker_id": "odd-bytes"}, {"instance_id": "plain-1", "worker_id": "plain"}])
        connection.execute(text("UPDATE workers SET worker_id = CAST(X'6f6464ff' AS TEXT), host = CAST(X'ff' AS TEXT) "
                                "WHERE instance_id = 'odd-bytes-1'"))
    gone = registry.gone_instances(engine)
    assert set(gone) == {"odd-bytes-1", "plain-1"}
    assert "odd\ufffd" in gone["odd-bytes-1"]
    assert {v.id: v.reasons for v in find_stuck(engine, Thresholds())} == {odd_held: ["worker_gone"], plain_held: ["worker_gone"]}


def test_gone_instance_ids_with_quotes_backslashes_and_braces_still_match_their_audits(engine, start_audit):
    """Another tool may name an instance anything; the gone list travels as one quoted parameter."""
    odd = ['quo"ted', "back\\slash", "{braces},comma", "NULL", " spaced "]
    held = [start_audit(worker_id=f"odd-{n}", instance_id=instance)[0] for n, instance in enumerate(odd)]
    healthy, _ = start_audit(worker_id="alive", instance_id='quo"ted-but-alive')
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(host="here", pid=1, started_at=registry.db_now(),
                                                   stopped_at=registry.db_now()),
                           [{"instance_id": instance, "worker_id": f"odd-{n}"} for n, instance in enumerate(odd)])
    assert set(registry.gone_instances(engine)) == set(odd)
    verdicts = find_stuck(engine, Thresholds(), page_size=2)  # several pages share one parameter
    assert sorted(v.id for v in verdicts) == sorted(held) and all(v.reasons == ["worker_gone"] for v in verdicts)


def test_a_reused_pid_does_not_hide_a_dead_instance(engine, start_audit):
    audit_id, _ = start_audit(worker_id="reused", instance_id="old-instance")
    me = registry.process_key()  # this very process's pid, but another start time: not the same process
    namespace, pid, _start = me.rsplit(":", 2)
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(instance_id="old-instance", worker_id="reused", host="here", pid=int(pid),
                                                   process_key=f"{namespace}:{pid}:1", started_at=registry.db_now(),
                                                   last_heartbeat_at=registry.db_now()))
    (verdict,) = find_stuck(engine, Thresholds())
    assert verdict.id == audit_id and verdict.reasons == ["worker_gone"]


def test_a_registry_full_of_stopped_instances_costs_one_parameter_and_finds_only_their_held_audits(engine, start_audit):
    """1,500 stopped instances (a busy day of restarts), two still holding an audit: the stuck
    query is the same statement as with two gone instances, and it finds exactly those two."""
    from sqlalchemy import event

    held = [start_audit(worker_id=f"restarted-{n}", instance_id=f"held-{n}")[0] for n in range(2)]
    healthy, _ = start_audit(worker_id="alive", instance_id="alive-instance")
    rows = [{"instance_id": f"stopped-{n}", "worker_id": f"restarted-{n % 40}"} for n in range(1500)]
    rows += [{"instance_id": f"held-{n}", "worker_id": f"restarted-{n}"} for n in range(2)]
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(host="here", pid=1, started_at=registry.db_now(),
                                                   stopped_at=registry.db_now()), rows)

    statements = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("SELECT a.id"):  # the stuck query, not the probe for the instances holding one
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        gone = registry.gone_instances(engine)
        assert len(gone) == 1502
        verdicts = find_stuck(engine, Thresholds(), gone=gone)
        assert sorted(v.id for v in verdicts) == sorted(held) and healthy not in {v.id for v in verdicts}
        assert all(v.reasons == ["worker_gone"] for v in verdicts)
        find_stuck(engine, Thresholds(), gone={f"held-{n}": "stopped" for n in range(2)})
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(statements) == 2 and statements[0] == statements[1], "the gone instances are one parameter"


def _stopped_instances_one_holding_a_running_audit(engine, start_audit, *, idle: int) -> tuple[int, list[str]]:
    """The registry proves gone: "held-instance", holding a running audit (its id is returned),
    "finished-instance", whose audit finished, and ``idle`` more that hold nothing."""
    from auditctl.history import Actor

    held, _ = start_audit(worker_id="restarted", instance_id="held-instance")
    _, lease = start_audit(worker_id="finished", instance_id="finished-instance")
    leases.finish(engine, lease, error=None, actor=Actor.command("test"))
    names = ["held-instance", "finished-instance", *(f"stopped-{n}" for n in range(idle))]
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(host="here", pid=1, started_at=registry.db_now(),
                                                   stopped_at=registry.db_now()),
                           [{"instance_id": name, "worker_id": "restarted"} for name in names])
    return held, names


def test_the_stuck_query_looks_up_only_the_gone_instances_that_hold_a_running_audit(engine, start_audit):
    """The registry proves 41 instances gone; one holds a running audit, one held an audit that
    finished, the rest hold nothing. Only the one holding a running audit reaches the statement,
    and with none holding one the worker_gone rule is not in the statement at all."""
    from auditctl.transactions import read_connection
    from auditctl.rules import GoneInstances, gone_instances, stuck_query
    from auditctl.thresholds import Policy

    held, names = _stopped_instances_one_holding_a_running_audit(engine, start_audit, idle=39)
    gone = gone_instances(engine)
    assert sorted(gone) == sorted(names), "the registry's proof is every stopped instance"
    postgres = engine.dialect.name == "postgresql"
    with read_connection(engine) as connection:
        _, params = stuck_query(connection, Policy.coerce(Thresholds()), gone=gone)
        assert params["gone"] == ('{"held-instance"}' if postgres else '["held-instance"]')
        holding_nothing = GoneInstances({name: "stopped" for name in names[1:]})
        statement, params = stuck_query(connection, Policy.coerce(Thresholds()), gone=holding_nothing)
        assert "gone" not in params and ":gone" not in statement.text
    (verdict,) = find_stuck(engine, Thresholds(), gone=gone)
    assert (verdict.id, verdict.reasons, verdict.gone_proof) == (held, ["worker_gone"], gone["held-instance"])


def test_a_scan_reads_from_the_registry_only_the_gone_instances_that_hold_a_running_audit(engine, start_audit):
    """A scan (``find_stuck`` asking the registry itself) needs the gone instances holding a running
    audit and no others: it reads just those, in one statement, and still fires worker_gone with
    the registry's proof. What watch and alerts report is still every gone instance."""
    from sqlalchemy import event

    from auditctl.rules import gone_instances

    held, names = _stopped_instances_one_holding_a_running_audit(engine, start_audit, idle=9)
    assert sorted(gone_instances(engine)) == sorted(names)
    holders = gone_instances(engine, holding_running=True)
    assert dict(holders) == {"held-instance": gone_instances(engine)["held-instance"]}
    statements = []

    def capture(_conn, _cursor, statement, *_):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        (verdict,) = find_stuck(engine, Thresholds())
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert (verdict.id, verdict.reasons, verdict.gone_proof) == (held, ["worker_gone"], holders["held-instance"])
    assert not any(s.startswith("SELECT g.value") for s in statements), "no second probe of the gone instances"
    assert sum(s.startswith("SELECT workers.instance_id") for s in statements) == 1


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_the_registry_read_of_gone_instances_holding_audits_probes_the_index_of_their_instances(engine):
    """One probe per candidate instance, on a file nobody analyzed."""
    from auditctl.registry import _gone_candidates

    sql = str(_gone_candidates("namespace", True).compile(dialect=engine.dialect))
    with engine.connect() as connection:
        plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, (1, 10, "namespace:", "2000-01-01")).all()
    details = [detail for *_, detail in plan]
    assert any("INDEX ix_audits_running_instance (worker_instance=?)" in d for d in details), details


def test_a_sqlite_file_without_the_index_of_holders_still_finds_the_gone_workers_audits(engine, start_audit):
    """A file at revision 0002 (not yet `auditctl init`ed after an upgrade) has no index of running
    audits' instances: every gone instance goes to the statement, as before, rather than one
    walk of the running audits per gone instance."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL plans around a missing index itself")
    from auditctl.transactions import read_connection
    from auditctl.rules import GoneInstances, gone_instances

    held, _ = start_audit(worker_id="restarted", instance_id="held-instance")
    with write_transaction(engine) as connection:
        connection.execute(text("DROP INDEX ix_audits_running_instance"))
    gone = GoneInstances({"held-instance": "stopped", "idle-instance": "stopped"})
    with read_connection(engine) as connection:
        assert gone.held(connection) == gone, "nothing narrowed without the index"
    (verdict,) = find_stuck(engine, Thresholds(), gone=gone)
    assert (verdict.id, verdict.reasons) == (held, ["worker_gone"])
    with write_transaction(engine) as connection:
        connection.execute(workers.insert().values(host="here", pid=1, started_at=registry.db_now(),
                                                   stopped_at=registry.db_now()),
                           [{"instance_id": name, "worker_id": "restarted"} for name in ("held-instance", "idle-instance")])
    assert sorted(gone_instances(engine, holding_running=True)) == ["held-instance", "idle-instance"], \
        "the registry reads every candidate rather than walk the running audits once per instance"
    (verdict,) = find_stuck(engine, Thresholds())
    assert (verdict.id, verdict.reasons) == (held, ["worker_gone"])


# --- sane bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["scan"], ["recover"], ["watch", "--once"], ["reset-all", "--include-stuck", "--dry-run"]])
def test_a_stale_threshold_below_the_floor_is_refused_naming_the_floor_and_the_override(database_url, command):
    runner = CliRunner()
    result = runner.invoke(cli, [*command, "--stale-after", "5ms", "--database-url", database_url])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "--stale-after 5.0ms" in line or "--stale-after 0.0s" in line or "5ms" in line or "0.005" in line or "below" in line
    assert "floor of 1s" in line and "--unsafe-thresholds" in line, line
    assert runner.invoke(cli, [*command, "--stale-after", "5ms", "--unsafe-thresholds", "--database-url", database_url,
                               "--max-age", "1h"]).exit_code == 0


def test_a_stale_threshold_shorter_than_two_beats_of_the_running_audits_is_refused(engine, database_url, guards):
    guard = guards(worker_id="slow-beater", heartbeat_interval=60, stale_after=600, max_age=1800, stall_after=600)
    audit_id = guard.create_audit("https://example.com/slow-beats")
    with guard.run(audit_id):
        result = CliRunner().invoke(cli, ["recover", "--stale-after", "90", "--database-url", database_url])
        assert result.exit_code == 2
        assert "twice the heartbeat interval (1m)" in result.stderr and "at least 2m" in result.stderr
        assert "--unsafe-thresholds" in result.stderr
        ok = CliRunner().invoke(cli, ["recover", "--stale-after", "2m", "--database-url", database_url])
        assert ok.exit_code == 0, ok.output
    assert row(engine, audit_id)["status"] == "completed", "the healthy audit was never failed"


def test_the_two_beats_check_judges_only_the_kinds_and_workers_the_filters_name(engine, database_url, guards):
    """A slow-beating kind elsewhere in the fleet does not make a threshold unsafe for a scan of another kind."""
    slow = guards(worker_id="slow-beater", heartbeat_interval=300, stale_after=600, max_age=1800, stall_after=600)
    fast = guards(worker_id="fast-beater", heartbeat_interval=1, stale_after=600, max_age=1800, stall_after=600)
    with slow.run(slow.create_audit("https://example.com/slow", kind="slow")), \
            fast.run(fast.create_audit("https://example.com/fast", kind="fast")):
        for narrowed in (["--kind", "fast"], ["--worker", "fast-beater"]):
            result = CliRunner().invoke(cli, ["scan", "--stale-after", "5s", *narrowed, "--database-url", database_url])
            assert result.exit_code == 0, result.output
        whole = CliRunner().invoke(cli, ["scan", "--stale-after", "5s", "--database-url", database_url])
        assert whole.exit_code == 2 and "twice the heartbeat interval (5m)" in whole.stderr
        slow_only = CliRunner().invoke(cli, ["recover", "--dry-run", "--stale-after", "5s", "--kind", "slow",
                                            "--database-url", database_url])
        assert slow_only.exit_code == 2
        watched = CliRunner().invoke(cli, ["watch", "--once", "--no-recover", "--stale-after", "5s", "--kind", "fast",
                                          "--database-url", database_url])
        assert watched.exit_code == 0, watched.output
        from auditctl.thresholds import Overrides, Policy
        from webtools import running_dashboard

        with running_dashboard(database_url, policy=Policy.of(override=Overrides(stale_after=5.0))) as server:
            assert server.get("/api/stuck?kind=fast").status == 200
            assert server.get("/api/stuck").status == 400


def test_a_stale_after_flag_replaces_an_unsafe_fleet_or_kind_value_instead_of_being_refused_for_it(database_url, tmp_path):
    result = CliRunner().invoke(cli, ["scan", "--stale-after", "10m", "--database-url", database_url],
                                env={"AUDITCTL_STALE_AFTER": "500ms"})
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(cli, ["scan", "--database-url", database_url], env={"AUDITCTL_STALE_AFTER": "500ms"})
    assert refused.exit_code == 2 and "floor of 1s" in refused.stderr


def test_a_stall_after_flag_longer_than_max_age_is_refused_as_the_same_value_from_the_environment_is():
    for args, env in ((["--stall-after", "1h"], {}), ([], {"AUDITCTL_STALL_AFTER": "1h"})):
        result = CliRunner().invoke(cli, ["config", *args], env=env)
        assert result.exit_code == 2, result.output
        assert "stall_after (1h) is longer than max_age (30m)" in result.stderr


@pytest.mark.parametrize("args, env", [(["--stale-after", "10m"], {"AUDITCTL_STALE_AFTER": "40m"}),
                                       (["--max-age", "1h"], {"AUDITCTL_MAX_AGE": "5m"})])
def test_thresholds_agree_as_they_are_in_force_not_as_the_values_a_flag_replaced(args, env):
    result = CliRunner().invoke(cli, ["config", *args], env=env)
    assert result.exit_code == 0, result.output


def test_recover_and_reset_all_print_the_thresholds_in_force_in_human_form(database_url):
    runner = CliRunner()
    recover = runner.invoke(cli, ["recover", "--dry-run", "--stale-after", "15m", "--database-url", database_url])
    assert "Thresholds: stale_after 15m (flag: overrides every audit's own), max_age 30m, stall_after 10m" in recover.stderr
    reset = runner.invoke(cli, ["reset-all", "--dry-run", "--include-stuck", "--database-url", database_url])
    assert reset.exit_code == 0
    result = runner.invoke(cli, ["recover", "--database-url", database_url], env={"AUDITCTL_MAX_AGE": "1h"})
    assert "max_age 1h;" in result.stderr or "max_age 1h," in result.stderr


def test_a_monitor_recovers_when_its_thread_waited_long_on_another_database_before_it_existed(engine):
    """Only a wait on this monitor's own PostgreSQL, since it exists, can blind its pass. A thread that had
    waited long on another engine (a PostgreSQL test, a slow ``init``) made a new monitor's first pass, on
    SQLite too, roll its recovery back as if the server had frozen under it."""
    from dbtools import make_running

    from auditctl.history import Actor
    from auditctl.monitor import Monitor
    from auditctl.watchdog import thread_waits

    stuck = make_running(engine, 1, silent_for=700)
    thread_waits().saw(30.0)
    result = Monitor(engine, Thresholds(), actor=Actor.command("test")).run_pass()
    assert result.ok, result.error
    assert [r.id for r in result.recovered] == stuck
