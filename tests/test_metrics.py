"""Prometheus metrics: ``/metrics`` from a real ``watch`` process and the textfile from ``recover``,
both parsed with prometheus_client's own parser, and every value recounted from the database here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import registry_row_unreadable, wait_for
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select, text

from auditctl.cli import cli
from auditctl.db import create_engine
from auditctl.documents import load
from auditctl.report import DETECTION_BUCKETS
from auditctl.schema import audit_events, audits, notification_deliveries, notifications, workers
from auditctl.sqlfunctions import fetch_now
from auditctl.thresholds import RULE_REASONS
from auditctl.transactions import read_connection, write_transaction

AUDITCTL = Path(sys.executable).parent / "auditctl"
UNREACHABLE = "postgresql://bob:s3cret@127.0.0.1:1/x"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, prog_name="auditctl")


def samples(exposition: str) -> dict:
    """{(sample name, frozenset of labels): value} from Prometheus text, through prometheus_client's parser."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture
def fleet(database_url, engine):
    """The demo fleet plus history of every kind: a requeue, refused writes, a reset, a refused recovery,
    and rows another tool wrote with measurements the metrics cannot use."""
    result = invoke("demo", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        row = {"audit_id": 1, "at": now, "from_status": "running", "actor": "test", "host": "h", "pid": 1, "reasons": None,
               "measurements": None, "details": None}
        connection.execute(insert(audit_events), [
            {**row, "event": "requeued", "to_status": "pending", "reasons": "stale_heartbeat,worker_gone",
             "measurements": {"silence_seconds": 42.0, "age_seconds": 100.0}},
            {**row, "event": "recovered", "to_status": "failed", "reasons": "progress_stalled",
             "measurements": {"silence_seconds": "not a number"}},
            {**row, "event": "recovered", "to_status": "failed", "reasons": "manual", "measurements": ["odd"]},
            {**row, "event": "lease_lost", "to_status": "failed", "details": {"lease": "x"}},
            {**row, "event": "lease_lost", "to_status": "failed", "details": {"lease": "y"}},
            {**row, "event": "reset", "from_status": "failed", "to_status": "pending"},
            {**row, "event": "needs_operator", "to_status": "running"},
        ])
        if connection.dialect.name == "sqlite":  # text that is not JSON at all
            connection.exec_driver_sql("UPDATE audit_events SET measurements = 'not json{' WHERE reasons = 'manual'")
        # One event already delivered everywhere, one still owed to a destination, one nobody took yet.
        for number, status in ((1, "sent"), (2, "pending")):
            event_id = connection.execute(insert(notifications).values(
                created_at=now - timedelta(minutes=number), event="recovered", payload={"n": number},
                expires_at=now + timedelta(hours=1))).inserted_primary_key[0]
            connection.execute(insert(notification_deliveries).values(notification_id=event_id, destination="d1",
                                                                      status=status, attempts=1))
    return database_url


def recount(engine) -> dict:
    """What the metrics must say, counted straight from the tables."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        by_status = dict(connection.execute(select(audits.c.status, func.count()).group_by(audits.c.status)).all())
        events = connection.execute(select(audit_events.c.event, audit_events.c.reasons, audit_events.c.measurements)).all()
        beats = connection.execute(select(audits.c.heartbeat_at).where(audits.c.status == "running")).scalars().all()
        registered = connection.execute(select(workers.c.last_heartbeat_at)).scalars().all()
        backlog = connection.execute(text(
            "SELECT COUNT(*) FROM notifications n WHERE n.expires_at > :now AND (NOT EXISTS (SELECT 1 FROM "
            "notification_deliveries d WHERE d.notification_id = n.id) OR EXISTS (SELECT 1 FROM notification_deliveries d "
            "WHERE d.notification_id = n.id AND d.status IN ('pending', 'sending')))"),
            {"now": now if connection.dialect.name == "postgresql" else now.strftime("%Y-%m-%d %H:%M:%S.%f")}).scalar()
    counts = {name: sum(1 for e in events if e.event == name) for name in ("recovered", "requeued", "reset", "lease_lost",
                                                                           "needs_operator")}
    reasons: dict[str, int] = {}
    silences = []
    for event in events:
        if event.event in ("recovered", "requeued"):
            for reason in (event.reasons or "").split(","):
                reasons[reason] = reasons.get(reason, 0) + 1
            measured = event.measurements if isinstance(event.measurements, (dict, list)) else load(event.measurements)
            silence = measured.get("silence_seconds") if isinstance(measured, dict) else None
            if isinstance(silence, (int, float)) and not isinstance(silence, bool):
                silences.append(float(silence))
    alive = sum(1 for moment in registered if (now - moment).total_seconds() <= 600)  # demo workers declare nothing
    return {"by_status": by_status, "counts": counts, "reasons": reasons, "silences": silences, "alive": alive,
            "gone": len(registered) - alive, "oldest": max((now - b).total_seconds() for b in beats), "backlog": backlog}


def check_fleet_values(found: dict, expected: dict) -> None:
    for status, count in expected["by_status"].items():
        assert value(found, "auditctl_audits", status=status) == count, status
    assert value(found, "auditctl_recoveries_total", outcome="failed") == expected["counts"]["recovered"]
    assert value(found, "auditctl_recoveries_total", outcome="requeued") == expected["counts"]["requeued"]
    for reason, count in expected["reasons"].items():
        assert value(found, "auditctl_recovery_reasons_total", reason=reason) == count, reason
    assert value(found, "auditctl_resets_total") == expected["counts"]["reset"]
    assert value(found, "auditctl_lease_lost_total") == expected["counts"]["lease_lost"] == 2
    assert value(found, "auditctl_needs_operator_total") == expected["counts"]["needs_operator"]
    silences = expected["silences"]
    assert value(found, "auditctl_detection_latency_seconds_count") == len(silences)
    assert value(found, "auditctl_detection_latency_seconds_sum") == pytest.approx(sum(silences))
    for bound in DETECTION_BUCKETS:
        assert value(found, "auditctl_detection_latency_seconds_bucket", le=repr(bound)) == sum(1 for s in silences if s <= bound)
    assert value(found, "auditctl_detection_latency_seconds_bucket", le="+Inf") == len(silences)
    assert value(found, "auditctl_workers", state="alive") == expected["alive"] == 3
    assert value(found, "auditctl_workers", state="gone") == expected["gone"] == 2
    assert value(found, "auditctl_oldest_heartbeat_age_seconds") == pytest.approx(expected["oldest"], abs=30)
    assert value(found, "auditctl_notification_backlog") == expected["backlog"] >= 2
    assert value(found, "auditctl_database_up") == 1


def test_metrics_served_by_a_real_watch_process_match_the_database(fleet, engine, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    proc = subprocess.Popen([str(AUDITCTL), "watch", "--database-url", fleet, "--no-recover", "--no-live", "--interval", "1h",
                             "--metrics-port", "0"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving metrics at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()

        def scrape():
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                return samples(response.read().decode())

        # The first pass runs at once; once it is counted, nothing else changes until the next (an hour away).
        found = wait_for(lambda: (lambda s: s if s.get(("auditctl_monitor_pass_duration_seconds_count", frozenset())) else None)(
            scrape()), timeout=20, message="the first pass to be counted")
        check_fleet_values(found, recount(engine))
        for reason in ("stale_heartbeat", "max_age_exceeded", "progress_stalled"):
            assert value(found, "auditctl_stuck_audits", reason=reason) == 1  # the demo's three, left alone
        assert value(found, "auditctl_stuck_audits", reason="worker_gone") == 0
        assert value(found, "auditctl_monitor_passes_total", result="ok") == 1
        assert not any(name.endswith("_created") for name, _ in found)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        finally:
            proc.stderr.close()
    assert proc.returncode == 0


def test_recover_writes_the_textfile_atomically_with_values_that_match_the_database(fleet, engine, tmp_path):
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = directory / "auditctl.prom"
    path.write_text("# an old scrape\n")
    before = path.stat().st_ino
    result = invoke("recover", "--database-url", fleet, "--metrics-file", path)
    assert result.exit_code == 0, result.output
    assert os.listdir(directory) == ["auditctl.prom"], "no temporary file left beside it"
    assert path.stat().st_ino != before, "replaced by a rename, never rewritten in place"
    found = samples(path.read_text())
    expected = recount(engine)
    assert expected["counts"]["recovered"] == 2 + 2 + 3  # demo's two, two of the fixture's, and the three this run
    check_fleet_values(found, expected)
    assert all(value(found, "auditctl_stuck_audits", reason=r) == 0 for r in ("stale_heartbeat", "progress_stalled"))
    assert value(found, "auditctl_monitor_pass_duration_seconds_count") == 1
    assert value(found, "auditctl_monitor_passes_total", result="ok") == 1


def test_watch_once_writes_the_textfile_after_its_pass(fleet, tmp_path):
    path = tmp_path / "watch.prom"
    result = invoke("watch", "--database-url", fleet, "--once", "--no-live", "--metrics-file", path)
    assert result.exit_code == 0, result.output
    found = samples(path.read_text())
    assert value(found, "auditctl_monitor_passes_total", result="ok") == 1
    assert value(found, "auditctl_recoveries_total", outcome="failed") == 7  # the pass's three are counted


def test_a_port_in_use_is_one_error_line_and_exit_1_before_anything_is_recovered(fleet, engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("watch", "--database-url", fleet, "--once", "--no-live", "--metrics-port", port)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"]
    with read_connection(engine) as connection:
        assert connection.execute(select(func.count()).select_from(audits).where(audits.c.status == "failed")).scalar() == 2


@pytest.mark.parametrize("parent, why", [("missing", "does not exist"), ("a-file", "is not a directory")])
def test_a_metrics_file_that_cannot_be_written_stops_recover_before_it_changes_anything(fleet, engine, tmp_path, parent,
                                                                                       why):
    (tmp_path / "a-file").write_text("")
    result = invoke("recover", "--database-url", fleet, "--metrics-file", tmp_path / parent / "auditctl.prom")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and "cannot write the metrics file" in result.stderr
    assert f"{tmp_path / parent} {why}" in result.stderr
    with read_connection(engine) as connection:
        assert connection.execute(select(func.count()).select_from(audits).where(audits.c.status == "failed")).scalar() == 2


@pytest.mark.parametrize("command", [["recover"], ["watch", "--once", "--no-live"]])
def test_an_empty_metrics_file_path_is_a_usage_error_before_anything_changes(fleet, engine, command):
    result = invoke(*command, "--database-url", fleet, "--metrics-file", "")
    assert result.exit_code == 2 and "the path is empty" in result.stderr
    with read_connection(engine) as connection:
        assert connection.execute(select(func.count()).select_from(audits).where(audits.c.status == "failed")).scalar() == 2


@pytest.mark.parametrize("command", [["recover"], ["watch", "--once", "--no-live"]])
def test_a_missing_database_still_replaces_the_textfile_with_database_up_0(tmp_path, command):
    path = tmp_path / "auditctl.prom"
    path.write_text("auditctl_database_up 1.0\n")  # the last good run's: node_exporter must not keep serving it
    missing = f"sqlite:///{tmp_path / 'gone' / 'auditctl.db'}"
    # A real process: the scrape's warning goes through logging, which CliRunner does not capture.
    result = subprocess.run([AUDITCTL, *command, "--database-url", missing, "--metrics-file", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no database at" in result.stderr
    errors = [line for line in result.stderr.splitlines() if "no database at" in line]
    assert len(errors) == 1, f"one error line, not the scrape's failure too: {result.stderr}"
    found = samples(path.read_text())
    assert value(found, "auditctl_database_up") == 0
    assert not any(name.startswith("auditctl_audits") for name, _ in found)
    assert not (tmp_path / "gone").exists(), "the database is never created by a metrics scrape"


@pytest.mark.parametrize("command", [["recover"], ["watch", "--once", "--no-live"]])
def test_a_file_that_is_not_a_database_is_said_once_not_again_by_the_textfiles_scrape(tmp_path, command):
    path, junk = tmp_path / "auditctl.prom", tmp_path / "notes.txt"
    junk.write_text("not a database\n" * 100)
    result = subprocess.run([AUDITCTL, *command, "--database-url", f"sqlite:///{junk}", "--metrics-file", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    said = [line for line in (result.stdout + result.stderr).splitlines() if "is not a database" in line]
    assert len(said) == (2 if command[0] == "watch" else 1), said  # watch: its pass's log line, then the error
    assert not any(line.startswith("metrics:") for line in said)
    assert value(samples(path.read_text()), "auditctl_database_up") == 0


def test_a_scrape_that_keeps_failing_the_same_way_is_logged_once_until_it_reads_again(caplog, engine):
    from auditctl.metrics import Metrics

    broken = create_engine(UNREACHABLE, role="reader")
    current = [broken]
    metrics = Metrics(lambda: current[0])
    with caplog.at_level("WARNING", logger="auditctl"):
        for _ in range(3):
            metrics.exposition()
        assert len([r for r in caplog.records if r.getMessage().startswith("metrics:")]) == 1
        current[0] = engine
        assert value(samples(metrics.exposition().decode()), "auditctl_database_up") == 1
        current[0] = broken
        metrics.exposition()
    assert len([r for r in caplog.records if r.getMessage().startswith("metrics:")]) == 2, "a new outage is said again"
    assert "s3cret" not in caplog.text


def test_a_database_that_cannot_be_read_gives_database_up_0_not_a_failed_scrape():
    from auditctl.metrics import Metrics

    metrics = Metrics(create_engine(UNREACHABLE, role="reader"))
    found = samples(metrics.exposition().decode())
    assert value(found, "auditctl_database_up") == 0
    assert not any(name.startswith("auditctl_audits") for name, _ in found)
    assert "s3cret" not in metrics.exposition().decode()


def test_statuses_and_reasons_another_tool_wrote_are_counted_as_other_never_shown(fleet, engine, tmp_path):
    hostile = "\x1b]0;pwned\x07x"
    with write_transaction(engine) as connection:
        connection.execute(audits.update().where(audits.c.id.in_([1, 2])).values(status=hostile))
        connection.execute(audits.update().where(audits.c.id == 3).values(status="RUNNING"))
        connection.execute(audit_events.update().where(audit_events.c.id == 1).values(reasons=f"stale_heartbeat,{hostile}"))
    path = tmp_path / "hostile.prom"
    assert invoke("watch", "--database-url", fleet, "--once", "--no-live", "--no-recover", "--metrics-file", path).exit_code == 0
    exposition = path.read_text()
    assert "\x1b" not in exposition and "pwned" not in exposition and "RUNNING" not in exposition
    found = samples(exposition)
    assert value(found, "auditctl_audits", status="other") == 3
    assert value(found, "auditctl_recovery_reasons_total", reason="other") >= 1


def test_a_stale_after_flag_decides_which_workers_count_alive_as_the_fleet_value_does(fleet, engine):
    """``watch --stale-after 1d``, ``serve --stale-after 1d``: the flag, not the fleet's default,
    says how long a silent worker still counts alive (it was ignored there, as in ``report``)."""
    from auditctl.overview import fleet_overview
    from auditctl.thresholds import Overrides, Policy, Thresholds

    default = fleet_overview(engine, Policy.of()).workers_alive
    by_fleet = fleet_overview(engine, Policy.of(fleet=Thresholds(stale_after=86400))).workers_alive
    by_flag = fleet_overview(engine, Policy.of(override=Overrides(stale_after=86400))).workers_alive

    assert by_flag == by_fleet > default


def test_an_interrupted_watch_leaves_its_textfile_as_the_last_pass_wrote_it(tmp_path, engine):
    """The second Ctrl-C ends watch at once: a last textfile write would read the database again,
    and a frozen server held that read for a minute. A command that ends otherwise still writes it."""
    from types import SimpleNamespace

    from auditctl.cli.metrics_options import MetricsSink, _own_passes

    path = tmp_path / "auditctl.prom"
    state = SimpleNamespace(reader=engine, quiet=True)

    def interrupted(**_kwargs):
        raise KeyboardInterrupt

    sink = MetricsSink(path=str(path))
    sink.start(state, None)
    with pytest.raises(KeyboardInterrupt):
        _own_passes(sink, interrupted, (), {})
    sink.close()
    assert not path.exists()

    sink = MetricsSink(path=str(path))
    sink.start(state, None)
    _own_passes(sink, lambda **_kwargs: None, (), {})
    sink.close()
    assert "auditctl_database_up 1.0" in path.read_text()


def test_the_oldest_heartbeat_skips_one_from_the_future_as_the_stuck_rules_do(engine):
    from auditctl.report import oldest_heartbeat_age

    with read_connection(engine) as connection:
        now = fetch_now(connection)
    with write_transaction(engine) as connection:
        connection.execute(insert(audits).values(
            target="https://example.com/clock-ahead", status="running", lease="x", attempts=1,
            created_at=now - timedelta(minutes=90), started_at=now - timedelta(minutes=90),
            heartbeat_at=now + timedelta(days=30), last_worker_update=now - timedelta(minutes=85),
            progress_changed_at=now - timedelta(minutes=85)))
    # The rules call it silent since its last worker update; a heartbeat a month ahead is not trusted.
    assert oldest_heartbeat_age(engine) == pytest.approx(85 * 60, abs=30)


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("heartbeat", ["0044-03-15 BC", "-infinity", "10000-01-01"])
def test_the_oldest_heartbeat_skips_a_time_python_cannot_read_on_postgresql(engine, heartbeat):
    from auditctl.report import oldest_heartbeat_age

    with write_transaction(engine) as connection:
        connection.execute(text(
            "INSERT INTO audits (target, status, lease, attempts, created_at, started_at, heartbeat_at, "
            "last_worker_update) VALUES ('https://example.com/bc', 'running', 'x', 1, now() - interval '90 minutes', "
            "now() - interval '90 minutes', CAST(:heartbeat AS timestamptz), now() - interval '85 minutes')"),
            {"heartbeat": heartbeat})
    # As SQLite reads a heartbeat it cannot parse: silent since the last worker update.
    assert oldest_heartbeat_age(engine) == pytest.approx(85 * 60, abs=30)


def test_a_quiet_watch_on_port_0_still_says_which_port_it_serves(fleet):
    """With --metrics-port 0 the port is known only from that line: -q drops status lines, not it."""
    result = invoke("watch", "--database-url", fleet, "--once", "--no-live", "--no-recover", "-q", "--metrics-port", "0")
    assert result.exit_code == 0, result.output
    assert re.search(r"^serving metrics at http://127\.0\.0\.1:[1-9][0-9]*/metrics$", result.stderr, re.M), result.stderr


def test_the_stuck_gauge_counts_the_whole_fleet_whatever_watch_is_filtered_to(fleet, tmp_path):
    path = tmp_path / "watch.prom"
    scanned = invoke("scan", "--database-url", fleet, "--format", "json")
    stuck = json.loads(scanned.stdout)
    assert stuck, "the demo fleet has stuck audits"
    expected = {reason: sum(reason in record["reasons"] for record in stuck) for reason in RULE_REASONS}
    result = invoke("watch", "--database-url", fleet, "--once", "--no-live", "--no-recover", "--kind", "no-such-kind",
                    "--target", "nothing-matches-*", "--metrics-file", path)
    assert result.exit_code == 0, result.output
    found = samples(path.read_text())
    for reason, count in expected.items():
        assert value(found, "auditctl_stuck_audits", reason=reason) == count, reason


def test_a_worker_registry_row_that_cannot_be_read_counts_as_neither_alive_nor_gone(fleet, engine, tmp_path, monkeypatch):
    """An unreadable registry row (``auditctl workers`` shows it ``unreadable``) proves nothing about its
    worker, but the overview's ``workers_gone`` and ``auditctl_workers{state="gone"}`` counted it as gone.
    No stored value makes a row unreadable today (each reader turns it into None), so the reading of one
    row is made to fail, as another tool's row one day might (as tests/test_web.py does)."""
    from auditctl.overview import fleet_overview
    from auditctl.records import overview_record
    from auditctl.thresholds import Policy

    alive = [w for w in json.loads(invoke("workers", "-o", "json", "--database-url", fleet).stdout) if w["alive"]]
    victim = alive[0]["instance_id"]
    registry_row_unreadable(monkeypatch, victim)
    path = tmp_path / "auditctl.prom"
    assert invoke("watch", "--once", "--no-live", "--no-recover", "--database-url", fleet, "--metrics-file", path).exit_code == 0
    found = samples(path.read_text())
    expected = recount(engine)
    assert value(found, "auditctl_workers", state="alive") == expected["alive"] - 1 == 2
    assert value(found, "auditctl_workers", state="gone") == expected["gone"] == 2
    record = overview_record(fleet_overview(engine, Policy()))
    assert (record["workers_alive"], record["workers_gone"]) == (2, 2)
    assert [w["problems"] for w in record["workers"] if w["instance_id"] == victim] == [
        ["row_unreadable: ValueError: year 0 is out of range"]]


def test_a_detection_latency_past_the_last_bucket_is_counted_in_inf_its_count_and_its_sum(engine):
    from auditctl.metrics import Metrics

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audit_events), [
            {"audit_id": number, "at": now, "event": "recovered", "from_status": "running", "to_status": "failed",
             "reasons": "stale_heartbeat", "actor": "test", "host": "h", "pid": 1, "details": None,
             "measurements": {"silence_seconds": silence}} for number, silence in ((1, 30.0), (2, DETECTION_BUCKETS[-1] + 3600))])
    metrics = Metrics(engine)
    found = samples(metrics.exposition().decode())
    assert value(found, "auditctl_detection_latency_seconds_bucket", le=repr(DETECTION_BUCKETS[-1])) == 1
    assert value(found, "auditctl_detection_latency_seconds_bucket", le="+Inf") == 2
    assert value(found, "auditctl_detection_latency_seconds_count") == 2
    assert value(found, "auditctl_detection_latency_seconds_sum") == 30.0 + DETECTION_BUCKETS[-1] + 3600


def test_the_notification_backlogs_age_is_that_of_its_oldest_undelivered_event(engine):
    from auditctl.report import notification_backlog

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(notifications), [
            {"created_at": now - timedelta(minutes=minutes), "event": "recovered", "payload": {"n": minutes},
             "expires_at": now + timedelta(hours=1)} for minutes in (1, 30, 10)])
    backlog = notification_backlog(engine)
    assert backlog.count == 3
    assert backlog.oldest_age_seconds >= 30 * 60  # the oldest, not the newest (1 minute) nor the middle one


def test_the_gone_workers_gauge_leaves_out_an_instance_stopped_longer_ago_than_a_day(engine):
    """As `auditctl workers` lists them: gone within 24 hours, or still holding an audit."""
    from auditctl.report import fleet_figures

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(workers), [
            {"instance_id": f"instance-{hours}", "worker_id": f"worker-{hours}", "started_at": now - timedelta(hours=hours + 1),
             "last_heartbeat_at": now - timedelta(hours=hours), "stopped_at": now - timedelta(hours=hours)}
            for hours in (2, 48)])
    figures = fleet_figures(engine)
    assert (figures.workers_alive, figures.workers_gone) == (0, 1)


def test_the_pass_counter_shows_ok_and_error_at_zero_before_any_pass(engine):
    """An alert on a rise of errors needs the series from the start: both results exist before the first pass."""
    from auditctl.metrics import Metrics

    metrics = Metrics(engine)
    found = samples(metrics.exposition().decode())
    assert value(found, "auditctl_monitor_passes_total", result="ok") == 0
    assert value(found, "auditctl_monitor_passes_total", result="error") == 0
    metrics.observe_pass(0.2, ok=False)
    found = samples(metrics.exposition().decode())
    assert (value(found, "auditctl_monitor_passes_total", result="ok"), value(found, "auditctl_monitor_passes_total", result="error")) == (0, 1)


def test_the_oldest_heartbeat_gauge_reads_zero_when_nothing_runs(engine):
    from auditctl.metrics import Metrics

    found = samples(Metrics(engine).exposition().decode())
    assert value(found, "auditctl_oldest_heartbeat_age_seconds") == 0
    assert value(found, "auditctl_notification_backlog_oldest_age_seconds") == 0


def test_a_textfile_that_can_no_longer_be_written_is_metrics_unavailable_naming_it(engine, tmp_path):
    """The directory checked at the start may go away while `watch` runs: one clear error, not an OSError."""
    from auditctl.metrics import Metrics, MetricsUnavailable

    path = tmp_path / "gone" / "auditctl.prom"
    with pytest.raises(MetricsUnavailable, match=f"cannot write the metrics file {re.escape(str(path))}: "):
        Metrics(engine).write_textfile(str(path))


def test_a_scrape_answers_database_up_0_within_prometheus_timeout_when_the_postgresql_server_stops_answering(own_postgres,
                                                                                                            tmp_path):
    """A frozen server (its processes stopped: a hung host, a network that drops packets) held a scrape
    until the read's deadline, over a minute: Prometheus gave up first (10 s by default), so the target
    was down and ``auditctl_database_up 0``, the series its alert watches, was never seen."""
    import signal

    server, engine = own_postgres
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    proc = subprocess.Popen([str(AUDITCTL), "watch", "--database-url", server.url, "--no-recover", "--no-live",
                             "--interval", "1h", "--refresh", "1h", "--metrics-port", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    frozen: list[int] = []
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving metrics at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()

        def scrape():  # as Prometheus does, with its default scrape_timeout
            with urllib.request.urlopen(url, timeout=10) as response:
                return samples(response.read().decode())

        assert value(scrape(), "auditctl_database_up") == 1
        postmaster = server._proc.pid
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        down = scrape()
        assert value(down, "auditctl_database_up") == 0
        assert not any(name == "auditctl_audits" for name, _ in down)
        again = scrape()  # the first scrape's read is still waiting: this one does not queue behind it
        assert value(again, "auditctl_database_up") == 0
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        if frozen:
            def up_again():
                try:
                    return value(scrape(), "auditctl_database_up") == 1
                except OSError:  # a scrape cut short while the server wakes up
                    return False

            wait_for(up_again, timeout=120, interval=0.5, message="the scrape to read again")
        proc.terminate()
        try:
            proc.wait(90)
        finally:
            proc.stderr.close()
