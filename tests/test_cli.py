"""Every ``auditctl`` command driven through click's CliRunner, on SQLite and PostgreSQL.

Each test is a scenario an operator lives through: the demo fleet then a scan, a
recovery from cron, the "Reset All Audits" button off a terminal, a typo in a flag or
in the config file, a database that is down. Every run on a database whose URL holds a
password also checks that the password was printed nowhere (see ``on``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from auditctl import __version__, leases
from auditctl.cli import cli
from auditctl.schema import audit_events, audits
from auditctl.transactions import read_connection

STUCK_IN_DEMO = {
    "https://blog.example.net": ["stale_heartbeat"],
    "https://payments.example.com": ["max_age_exceeded"],
    "https://status.example.io": ["progress_stalled"],
}
SCAN_KEYS = {"id", "target", "status", "reasons", "worker_id", "step", "percentage", "last_heartbeat", "started_at",
             "age_seconds"}
UNREACHABLE = "postgresql://bob:s3cret@127.0.0.1:1/x"
ESC = "\x1b["
WIDE = {"COLUMNS": "200"}  # rich draws a table to a pipe 80 columns wide; wide enough that no target folds


def invoke(*args, env=None, input=None, color=False, secrets=()):
    """Run ``auditctl ARGS`` in-process; any exception other than a clean exit fails the test."""
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input, color=color,
                                catch_exceptions=False, prog_name="auditctl")
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr, f"password printed by auditctl {args[0]}"
    return result


def as_read(result, fmt: str) -> str:
    """The output as a reader sees it: Markdown's backslash escapes (``stale\\_after``) rendered."""
    return re.sub(r"\\(.)", r"\1", result.stdout) if fmt == "markdown" else result.stdout


def on(url, command, *args, **kwargs):
    """``auditctl COMMAND --database-url URL ARGS``, checking that the URL's password never shows."""
    password = make_url(url).password
    return invoke(command, "--database-url", url, *args, secrets=[password] if password else [], **kwargs)


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def statuses(engine) -> dict[int, str]:
    with read_connection(engine) as connection:
        return dict(connection.execute(select(audits.c.id, audits.c.status)).all())


def everything(engine):
    """Every audit row and every history row: to prove a command changed nothing at all."""
    with read_connection(engine) as connection:
        rows = [tuple(r) for r in connection.execute(select(audits).order_by(audits.c.id))]
        events = [tuple(r) for r in connection.execute(select(audit_events).order_by(audit_events.c.id))]
    return rows, events


def events_of(engine, audit_id) -> list[tuple]:
    with read_connection(engine) as connection:
        query = (select(audit_events.c.event, audit_events.c.from_status, audit_events.c.to_status, audit_events.c.actor)
                 .where(audit_events.c.audit_id == audit_id).order_by(audit_events.c.id))
        return [tuple(r) for r in connection.execute(query)]


def count_audits(engine, **where) -> int:
    with read_connection(engine) as connection:
        query = select(func.count()).select_from(audits)
        for column, value in where.items():
            query = query.where(audits.c[column] == value)
        return connection.execute(query).scalar_one()


def stuck_ids(url) -> dict[str, int]:
    return {r["target"]: r["id"] for r in as_json(on(url, "scan", "--format", "json"))}


ENGINES = ["sqlite", "postgresql"]


def new_postgres_database(request, template: str) -> str:
    """A PostgreSQL database cloned from ``template`` on the session's server, dropped after its fixture."""
    server = request.getfixturevalue("postgres_server")
    name = f"cli_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name, template=template)
    request.addfinalizer(lambda: server.drop_database(name))
    return url


def seed_demo(url) -> str:
    result = on(url, "demo")
    assert result.exit_code == 0, result.output
    return url


@pytest.fixture(scope="session")
def demo_templates():
    """Per engine, a database ``auditctl demo`` filled once per session (SQLite file or PostgreSQL template)."""
    return {}


@pytest.fixture
def demo(request, engine_name, tmp_path, demo_templates):
    """A fresh database after ``auditctl demo``: 18 audits, 3 of them stuck, one of each kind.

    Seeded once per engine by the real command, then cloned for each test (a PostgreSQL
    template, a SQLite file copy): the fleet's ages have minutes of margin either side.
    Returns the URL; pair it with ``demo_engine``.
    """
    if engine_name == "postgresql":
        if engine_name not in demo_templates:
            server = request.getfixturevalue("postgres_server")
            seed_demo(server.create_database("auditctl_cli_demo", template=request.getfixturevalue("postgres_template")))
            demo_templates[engine_name] = "auditctl_cli_demo"
        return new_postgres_database(request, demo_templates[engine_name])
    if engine_name not in demo_templates:
        seeded = request.getfixturevalue("tmp_path_factory").mktemp("demo") / "auditctl.db"
        seed_demo(f"sqlite:///{seeded}")
        demo_templates[engine_name] = seeded
    seeded = demo_templates[engine_name]
    for suffix in ("", "-wal"):
        if Path(f"{seeded}{suffix}").exists():
            shutil.copyfile(f"{seeded}{suffix}", tmp_path / f"demo.db{suffix}")
    return f"sqlite:///{tmp_path / 'demo.db'}"


@pytest.fixture
def demo_engine(demo):
    from auditctl.db import create_engine

    engine = create_engine(demo)
    yield engine
    engine.dispose()


def backdate_in(engine, audit_id, **seconds_ago):
    """Move an audit's times into the past on the database's clock (as conftest's ``backdate``)."""
    from datetime import timedelta

    from sqlalchemy import update

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        values = {column: now - timedelta(seconds=ago) for column, ago in seconds_ago.items()}
        connection.execute(update(audits).where(audits.c.id == audit_id).values(**values))


@pytest.fixture(scope="module", params=ENGINES)
def fleet(request, tmp_path_factory):
    """One ``auditctl demo`` database per engine, shared by this module's read-only tests.

    Only commands that must not write may run on it; its teardown proves that none did.
    ``ids`` maps each stuck target to its audit id.
    """
    if request.param == "postgresql":
        url = new_postgres_database(request, request.getfixturevalue("postgres_template"))
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('fleet') / 'auditctl.db'}"
    result = on(url, "demo")
    assert result.exit_code == 0, result.output
    from auditctl.db import create_engine

    engine = create_engine(url)
    before = everything(engine)
    yield SimpleNamespace(url=url, engine=engine, ids=stuck_ids(url))
    try:
        assert everything(engine) == before, "a read-only test changed the shared demo fleet"
    finally:
        engine.dispose()


def make_stuck(engine, start_audit, backdate, target, worker_id="worker-1"):
    """A running audit whose worker went silent 700 s ago (stale_heartbeat under the defaults)."""
    audit_id, _ = start_audit(target=target, worker_id=worker_id)
    backdate(audit_id, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    return audit_id


def failed_ids(engine) -> set[int]:
    return {i for i, s in statuses(engine).items() if s == "failed"}


# --- the group ------------------------------------------------------------------------


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"auditctl, version {__version__}"


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("init", "demo", "scan", "recover", "reset-all", "watch", "list", "show", "workers", "config",
                    "completion"):
        assert f"  {command} " in result.stdout, command


def test_unknown_command_is_a_usage_error():
    result = invoke("frobnicate")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr and "Did you mean" not in result.stderr


@pytest.mark.parametrize("typed, meant", [("scna", "scan"), ("recovr", "recover"), ("reset_all", "reset-all"),
                                          ("worker", "workers")])
def test_a_mistyped_command_is_refused_with_the_closest_command_suggested(typed, meant):
    result = invoke(typed, "--database-url", "sqlite:///never-created.db")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: No such command '{typed}'. Did you mean '{meant}'?"), result.stderr


# --- init -----------------------------------------------------------------------------


def test_init_on_blank_database_creates_schema_then_second_run_has_nothing_to_do(blank_database_url):
    first = on(blank_database_url, "init")
    assert first.exit_code == 0, first.output
    assert "Schema created" in first.stdout
    scan = on(blank_database_url, "scan")
    assert scan.exit_code == 0, scan.output
    assert "No stuck audits" in scan.stderr
    second = on(blank_database_url, "init")
    assert second.exit_code == 0, second.output
    assert "nothing to do" in second.stdout
    assert "created" not in second.stdout


def test_init_quiet_on_current_schema_prints_nothing(database_url):
    result = on(database_url, "init", "-q")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


# --- demo -----------------------------------------------------------------------------


def test_demo_then_scan_shows_exactly_the_three_stuck_kinds(fleet):
    result = on(fleet.url, "scan", "--format", "json")
    assert {r["target"]: r["reasons"] for r in as_json(result)} == STUCK_IN_DEMO
    assert "3 stuck audits (1 stale_heartbeat, 1 max_age_exceeded, 1 progress_stalled)" in result.stderr


def test_demo_on_blank_database_creates_the_schema_first(blank_database_url):
    result = on(blank_database_url, "demo")
    assert result.exit_code == 0, result.output
    assert "3 stuck (stale_heartbeat, max_age_exceeded, progress_stalled)" in result.stdout
    assert "Next: auditctl scan" in result.stdout
    assert {r["target"] for r in as_json(on(blank_database_url, "scan", "--format", "json"))} == set(STUCK_IN_DEMO)


def test_demo_twice_refuses_without_force_and_adds_nothing(demo, demo_engine):
    before = everything(demo_engine)
    again = on(demo, "demo")
    assert again.exit_code == 1
    assert "already holds 18 audits" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.output
    assert everything(demo_engine) == before


def test_demo_on_a_database_with_one_audit_says_one_audit_not_one_audits(database_url, engine):
    from dbtools import make_running

    make_running(engine, 1)
    again = on(database_url, "demo")
    assert again.exit_code == 1 and "already holds 1 audit;" in again.stderr, again.stderr


def test_demo_force_adds_a_second_fleet_and_leaves_the_audits_already_there_alone(demo, demo_engine):
    first_stuck = set(stuck_ids(demo).values())
    forced = on(demo, "demo", "--force")
    assert forced.exit_code == 0, forced.output
    assert count_audits(demo_engine) == 36
    now = statuses(demo_engine)
    assert all(now[i] == "running" for i in first_stuck), "demo --force must not recover audits it did not create"
    assert len(as_json(on(demo, "scan", "--format", "json"))) == 6


# --- scan -----------------------------------------------------------------------------


def test_scan_json_is_one_array_of_objects_with_the_documented_keys(fleet):
    records = as_json(on(fleet.url, "scan", "--format", "json"))
    assert isinstance(records, list) and len(records) == 3
    for record in records:
        assert SCAN_KEYS <= set(record), SCAN_KEYS - set(record)
        assert record["status"] == "running"
        assert isinstance(record["id"], int)
        assert isinstance(record["age_seconds"], float) and record["age_seconds"] > 0
        assert record["last_heartbeat"].endswith("Z") and record["started_at"].endswith("Z")
        assert record["worker_id"].startswith("worker-")
        assert 0 <= record["percentage"] <= 100
    blog = next(r for r in records if r["target"] == "https://blog.example.net")
    assert (blog["worker_id"], blog["step"], blog["percentage"]) == ("worker-5", "Crawling", 30.0)
    assert 21 * 60 < blog["age_seconds"] < 30 * 60


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown"])
def test_scan_human_formats_show_each_stuck_audit_with_its_reason(fleet, fmt):
    result = on(fleet.url, "scan", "--format", fmt, env=WIDE)
    assert result.exit_code == 0, result.output
    lines = as_read(result, fmt).splitlines()
    for target, reasons in STUCK_IN_DEMO.items():
        line = next((line for line in lines if target in line), None)
        assert line is not None, f"{target} missing from:\n{result.stdout}"
        assert reasons[0] in line and str(fleet.ids[target]) in line
    assert "REASONS" in result.stdout
    assert "https://shop.example.com" not in result.stdout, "a healthy audit is not stuck"
    if fmt == "markdown":
        assert lines[0].startswith("| ID") and set(lines[1]) <= set("|-: ")
    if fmt == "table":
        assert lines[0] == "Stuck audits" and lines[1].split()[:3] == ["ID", "TARGET", "REASONS"]


def test_scan_csv_has_a_header_and_one_row_per_stuck_audit(fleet):
    result = on(fleet.url, "scan", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["target"]: r["reasons"] for r in rows} == {t: ",".join(r) for t, r in STUCK_IN_DEMO.items()}
    assert {"id", "target", "reasons", "worker_id", "step", "percentage"} <= set(rows[0])


@pytest.mark.parametrize("command", [["scan"], ["list"], ["workers"], ["recover"], ["reset-all", "--yes"],
                                     ["notify", "--status"]])
def test_an_empty_csv_listing_is_its_header_as_an_empty_json_listing_is_brackets(database_url, command):
    assert on(database_url, "init").exit_code == 0
    empty = on(database_url, *command, "-o", "csv")
    assert empty.exit_code == 0, empty.output
    (header,) = list(csv.reader(io.StringIO(empty.stdout)))
    assert len(header) >= 5 and "id" in header[0], empty.stdout
    assert on(database_url, *command, "-o", "json").stdout.strip() == "[]"


def test_scan_piped_without_format_prints_plain_text(fleet):
    result = on(fleet.url, "scan")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split()[:3] == ["ID", "TARGET", "REASONS"]
    assert "┃" not in result.stdout and "|" not in result.stdout
    rows = [line for line in result.stdout.splitlines()[1:] if not line.startswith(" ")]
    assert len(rows) == 3
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), "plain output fits 80 columns"
    assert "why: no heartbeat for 17m (stale_after 10m, fleet)" in result.stdout  # the explanation is in every format


def test_scan_summary_line_goes_to_stderr_so_stdout_stays_data(fleet):
    result = on(fleet.url, "scan", "--format", "json")
    json.loads(result.stdout)
    assert "stuck audit" not in result.stdout
    assert result.stderr.strip().startswith("3 stuck audits")
    quiet = on(fleet.url, "scan", "--format", "json", "-q")
    assert quiet.stderr == "" and len(json.loads(quiet.stdout)) == 3


def test_scan_on_empty_database_says_none_and_json_is_an_empty_array(database_url):
    result = on(database_url, "scan", "--format", "json")
    assert as_json(result) == []
    assert "No stuck audits" in result.stderr
    assert on(database_url, "scan", "--format", "csv").stdout.splitlines() == [
        "id,target,reasons,worker_id,step,percentage,silence_seconds,age_seconds,explanation,problems"]


@pytest.mark.parametrize("args, expected", [
    (["--worker", "worker-5"], {"https://blog.example.net"}),
    (["--worker", "worker-9"], set()),
    (["--reason", "progress_stalled"], {"https://status.example.io"}),
    (["--reason", "max_age_exceeded"], {"https://payments.example.com"}),
    (["--older-than", "45m"], {"https://payments.example.com"}),
    (["--older-than", "21m"], {"https://payments.example.com", "https://blog.example.net"}),
    (["--worker", "worker-2", "--reason", "stale_heartbeat"], set()),
])
def test_scan_filters_narrow_the_stuck_audits(fleet, args, expected):
    assert {r["target"] for r in as_json(on(fleet.url, "scan", "--format", "json", *args))} == expected


def test_scan_thresholds_from_flags_change_the_verdict(fleet):
    # A flag overrides every audit's own threshold: the deep scan's own 4h deadline too (it has run 95m).
    patient = as_json(on(fleet.url, "scan", "--stale-after", "20m", "--stall-after", "20m", "--max-age", "2h",
                         "--format", "json"))
    assert patient == [], "17m of silence, 16m without progress and 95m of age are all within these thresholds"
    assert {r["target"] for r in as_json(on(fleet.url, "scan", "--max-age", "1h", "--format", "json"))} >= {
        "https://docs.example.org/deep-scan"}
    strict = {r["target"] for r in as_json(on(fleet.url, "scan", "--stale-after", "25s", "--format", "json"))}
    assert {"https://api.example.com/v2", "https://docs.example.org/deep-scan"} <= strict, "heard 45s and 30s ago"
    assert "https://intranet.example.org/login" not in strict, "heard 5s ago"


def test_scan_exit_code_is_3_when_something_is_stuck_and_0_when_not(fleet):
    stuck = on(fleet.url, "scan", "--exit-code", "--format", "json")
    assert stuck.exit_code == 3
    assert len(json.loads(stuck.stdout)) == 3, "stdout is still the full listing"
    assert on(fleet.url, "scan").exit_code == 0, "without --exit-code, finding stuck audits is a success"
    assert on(fleet.url, "scan", "--exit-code", "--worker", "nobody").exit_code == 0


def test_scan_exit_code_is_0_once_everything_is_recovered(demo):
    assert on(demo, "scan", "--exit-code", "-q").exit_code == 3
    assert on(demo, "recover", "-q").exit_code == 0
    assert on(demo, "scan", "--exit-code", "-q").exit_code == 0


def test_scan_invalid_reason_is_a_usage_error():
    result = invoke("scan", "--reason", "slow")
    assert result.exit_code == 2
    assert "'--reason'" in result.stderr


# --- recover --------------------------------------------------------------------------


def test_recover_dry_run_changes_nothing_and_json_lists_what_would_change(fleet):
    before = everything(fleet.engine)
    result = on(fleet.url, "recover", "--dry-run", "--format", "json")
    records = as_json(result)
    assert everything(fleet.engine) == before
    assert {r["target"]: r["reasons"] for r in records} == STUCK_IN_DEMO
    assert {r["id"] for r in records} == set(fleet.ids.values())
    for record in records:
        assert record["status"] == "failed" and record["previous_status"] == "running" and record["dry_run"] is True
    assert "Would recover 3 audits -> 3 failed (dry run: nothing changed)" in result.stderr
    requeue = as_json(on(fleet.url, "recover", "--dry-run", "--requeue", "--format", "json"))
    assert {r["status"] for r in requeue} == {"pending"}
    assert everything(fleet.engine) == before


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown", "csv"])
def test_recover_dry_run_shows_what_would_change_in_every_format(fleet, fmt):
    result = on(fleet.url, "recover", "--dry-run", "--format", fmt, env=WIDE)
    assert result.exit_code == 0, result.output
    for target, reasons in STUCK_IN_DEMO.items():
        line = next(line for line in as_read(result, fmt).splitlines() if target in line)
        assert reasons[0] in line and "failed" in line
    if fmt == "csv":  # a dry run's rows say so, as in json
        assert {r["dry_run"] for r in csv.DictReader(io.StringIO(result.stdout))} == {"true"}
        reset = on(fleet.url, "reset-all", "--dry-run", "--format", "csv")
        assert {r["dry_run"] for r in csv.DictReader(io.StringIO(reset.stdout))} == {"true"}


def test_recover_fails_the_stuck_audits_and_records_each_in_the_history(demo, demo_engine):
    ids = stuck_ids(demo)
    result = on(demo, "recover", "--format", "json")
    records = as_json(result)
    assert {r["id"]: r["status"] for r in records} == {i: "failed" for i in ids.values()}
    assert {r["target"]: r["reasons"] for r in records} == STUCK_IN_DEMO
    assert all(r["dry_run"] is False and r["recovered_at"].endswith("Z") for r in records)
    assert "Recovered 3 audits -> 3 failed" in result.stderr
    now = statuses(demo_engine)
    assert all(now[i] == "failed" for i in ids.values())
    for audit_id in ids.values():
        assert events_of(demo_engine, audit_id) == [("recovered", "running", "failed", "auditctl recover")]
    assert as_json(on(demo, "scan", "--format", "json")) == []


def test_recover_plain_output_names_each_audit_and_its_new_status(demo):
    result = on(demo, "recover")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TARGET", "REASONS"]
    rows = [line for line in lines[1:] if not line.startswith(" ")]
    assert len(rows) == 3 and all(line.split()[-1] == "failed" for line in rows)
    assert sum(1 for line in lines if line.strip().startswith("why: ")) == 3


def test_recover_requeue_returns_stuck_audits_to_pending(demo, demo_engine):
    ids = stuck_ids(demo)
    result = on(demo, "recover", "--requeue", "--format", "json")
    assert {r["id"]: r["status"] for r in as_json(result)} == {i: "pending" for i in ids.values()}
    assert "-> 3 pending (requeued)" in result.stderr
    now = statuses(demo_engine)
    assert [now[i] for i in ids.values()] == ["pending"] * 3
    assert events_of(demo_engine, ids["https://blog.example.net"]) == [("requeued", "running", "pending", "auditctl recover")]


def test_recover_requeue_fails_an_audit_that_used_up_its_attempts(demo, demo_engine):
    ids = stuck_ids(demo)
    records = as_json(on(demo, "recover", "--requeue", "--max-attempts", "1", "--format", "json"))
    assert {r["id"]: r["status"] for r in records} == {i: "failed" for i in ids.values()}, "each was claimed once already"


def test_recover_quiet_prints_nothing_when_there_is_nothing_to_recover(database_url):
    result = on(database_url, "recover", "-q")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_recover_quiet_still_reports_what_it_recovered(demo):
    result = on(demo, "recover", "-q")
    assert result.exit_code == 0, result.output
    for target in STUCK_IN_DEMO:
        assert target in result.stdout
    assert "Recovered 3 audits" in result.stderr
    again = on(demo, "recover", "-q")
    assert again.exit_code == 0 and again.stdout == "" and again.stderr == "", "a second cron run has nothing to say"


def test_recover_with_nothing_to_do_prints_an_empty_json_array(database_url):
    result = on(database_url, "recover", "--format", "json")
    assert as_json(result) == []
    assert "Nothing to recover" in result.stderr


def test_recover_filters_leave_other_stuck_audits_alone(demo, demo_engine):
    ids = stuck_ids(demo)
    records = as_json(on(demo, "recover", "--reason", "stale_heartbeat", "--format", "json"))
    assert [r["id"] for r in records] == [ids["https://blog.example.net"]]
    now = statuses(demo_engine)
    assert now[ids["https://payments.example.com"]] == "running"
    assert now[ids["https://status.example.io"]] == "running"
    by_worker = as_json(on(demo, "recover", "--worker", "worker-2", "--format", "json"))
    assert [r["id"] for r in by_worker] == [ids["https://payments.example.com"]]
    assert statuses(demo_engine)[ids["https://status.example.io"]] == "running"


# --- reset-all ------------------------------------------------------------------------


def test_reset_all_yes_resets_failed_audits_and_writes_history_rows(demo, demo_engine):
    failed = failed_ids(demo_engine)
    assert len(failed) == 2
    result = on(demo, "reset-all", "--yes", "--format", "json")
    records = as_json(result)
    assert {r["id"] for r in records} == failed
    assert all(r["status"] == "pending" and r["previous_status"] == "failed" and r["dry_run"] is False for r in records)
    assert "Reset 2 audits to pending" in result.stderr
    now = statuses(demo_engine)
    assert [now[i] for i in sorted(failed)] == ["pending", "pending"]
    for audit_id in failed:
        assert events_of(demo_engine, audit_id)[-1] == ("reset", "failed", "pending", "auditctl reset-all")
    again = on(demo, "reset-all", "--yes")
    assert again.exit_code == 0 and "Nothing to reset" in again.stderr


def test_reset_all_refuses_without_terminal_and_changes_nothing(fleet):
    before = everything(fleet.engine)
    result = on(fleet.url, "reset-all")
    assert result.exit_code == 4
    assert "refusing to reset 2 audits" in result.stderr and "--yes" in result.stderr
    assert "Nothing was changed" in result.stderr
    assert result.stdout == ""
    assert everything(fleet.engine) == before


def test_reset_all_refuses_a_piped_yes_because_stdin_is_not_a_terminal(fleet):
    before = everything(fleet.engine)
    result = on(fleet.url, "reset-all", "--include-stuck", input="y\n")
    assert result.exit_code == 4
    assert "refusing to reset 5 audits" in result.stderr
    assert everything(fleet.engine) == before, "neither the failed nor the stuck audits may change"


def test_reset_all_dry_run_lists_what_would_be_reset_and_changes_nothing(fleet):
    before = everything(fleet.engine)
    records = as_json(on(fleet.url, "reset-all", "--dry-run", "--format", "json"))
    assert {r["id"] for r in records} == failed_ids(fleet.engine)
    assert {r["target"] for r in records} == {"https://cdn.example.com", "https://auth.example.com"}
    assert all(r["dry_run"] is True and r["status"] == "pending" for r in records)
    plain = on(fleet.url, "reset-all", "--dry-run", "--include-stuck")
    assert plain.exit_code == 0
    assert "Would reset 5 audits to pending (dry run: nothing changed)" in plain.stderr
    for target in STUCK_IN_DEMO:
        assert target in plain.stdout
    origins = {r["id"]: (r["origin"], r["previous_status"]) for r in
               as_json(on(fleet.url, "reset-all", "--dry-run", "--include-stuck", "--format", "json"))}
    # The demo's failed audits failed by a stuck recovery too; the stuck ones would be recovered first.
    assert sorted(origins.values()) == [("stuck", "failed")] * 2 + [("stuck", "running")] * 3, origins
    assert everything(fleet.engine) == before


@pytest.mark.parametrize("given, says", [("soon", "cannot read 'soon' as a time"), ("53w", "'53w' is longer than a year"),
                                         ("0", "must be greater than zero")])
def test_since_that_is_no_usable_time_says_why_in_one_line(demo, given, says):
    for command in ("list", "scan"):
        result = on(demo, command, "--since", given)
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output


def test_flags_that_would_do_nothing_are_refused_and_the_same_settings_from_the_environment_are_not(demo, demo_engine):
    before = statuses(demo_engine)
    alone = on(demo, "recover", "--max-attempts", "2")
    assert alone.exit_code == 2 and "give --requeue too" in alone.stderr
    watching = on(demo, "watch", "--once", "--no-recover", "--requeue")
    assert watching.exit_code == 2 and "--requeue does nothing with --no-recover" in watching.stderr
    counting = on(demo, "watch", "--once", "--no-recover", "--max-attempts", "3")
    assert counting.exit_code == 2 and "--max-attempts does nothing with --no-recover" in counting.stderr
    assert statuses(demo_engine) == before, "nothing ran"
    from_env = on(demo, "recover", "--dry-run", env={"AUDITCTL_MAX_ATTEMPTS": "2"})
    assert from_env.exit_code == 0, from_env.output


@pytest.mark.parametrize("since, until", [("1h", "2h"), ("2026-11-30T10:00Z", "2026-11-30T09:00Z"),
                                          ("1h", "2020-01-01"), ("2999-01-01", "1h")])  # mixed: judged on the database's clock
def test_a_creation_window_that_ends_before_it_starts_is_a_usage_error(demo, since, until):
    for command in ("list", "scan", "recover"):
        result = on(demo, command, "--since", since, "--until", until)
        assert result.exit_code == 2 and "--since is later than --until" in result.stderr, (command, result.output)
    assert on(demo, "list", "--since", until, "--until", since).exit_code == 0


def test_reset_all_since_takes_only_audits_that_failed_recently(demo, demo_engine):
    old, recent = sorted(failed_ids(demo_engine))
    backdate_in(demo_engine, old, finished_at=3 * 3600)
    records = as_json(on(demo, "reset-all", "--since", "1h", "--yes", "--format", "json"))
    assert [r["id"] for r in records] == [recent]
    assert statuses(demo_engine)[old] == "failed"


def test_reset_all_reason_takes_only_audits_recovered_for_that_reason(demo, demo_engine):
    ids = stuck_ids(demo)
    assert on(demo, "recover", "-q").exit_code == 0
    records = as_json(on(demo, "reset-all", "--reason", "progress_stalled", "--yes", "--format", "json"))
    assert [r["id"] for r in records] == [ids["https://status.example.io"]]
    assert records[0]["reasons"] == ["progress_stalled"]
    now = statuses(demo_engine)
    assert now[ids["https://blog.example.net"]] == "failed" and now[ids["https://payments.example.com"]] == "failed"


def test_reset_all_include_stuck_recovers_running_stuck_audits_then_resets_them(demo, demo_engine):
    ids = stuck_ids(demo)
    failed = failed_ids(demo_engine)
    records = as_json(on(demo, "reset-all", "--include-stuck", "--yes", "--format", "json"))
    assert {r["id"] for r in records} == failed | set(ids.values())
    now = statuses(demo_engine)
    assert all(now[i] == "pending" for i in failed | set(ids.values()))
    assert [e[0] for e in events_of(demo_engine, ids["https://blog.example.net"])] == ["recovered", "reset"]
    assert as_json(on(demo, "scan", "--format", "json")) == []


def test_reset_all_include_stuck_with_reason_leaves_stuck_audits_of_other_reasons_alone(demo, demo_engine):
    ids = stuck_ids(demo)
    records = as_json(on(demo, "reset-all", "--include-stuck", "--reason", "progress_stalled", "--yes", "--format", "json"))
    assert [r["id"] for r in records] == [ids["https://status.example.io"]]
    now = statuses(demo_engine)
    assert now[ids["https://blog.example.net"]] == "running"
    assert now[ids["https://payments.example.com"]] == "running"
    assert events_of(demo_engine, ids["https://blog.example.net"]) == []


def test_reset_all_with_nothing_failed_says_so_and_exits_0(database_url):
    result = on(database_url, "reset-all")
    assert result.exit_code == 0
    assert "Nothing to reset" in result.stderr
    assert as_json(on(database_url, "reset-all", "--format", "json")) == []


# --- list -----------------------------------------------------------------------------


def test_list_shows_every_audit_newest_first(fleet):
    records = as_json(on(fleet.url, "list", "--format", "json"))
    assert [r["id"] for r in records] == sorted(statuses(fleet.engine), reverse=True)
    assert {"id", "target", "status", "worker_id", "attempts", "created_at", "last_heartbeat"} <= set(records[0])


@pytest.mark.parametrize("sort", ["id", "target"])
def test_list_reads_no_recovery_record_it_never_shows(fleet, sort):
    """Decoding every audit's recovery_info cost a third of listing 100,000 failed audits."""
    from sqlalchemy import event

    from auditctl.audits import list_audits

    statements = []
    listener = lambda conn, cursor, statement, *args: statements.append(statement)  # noqa: E731
    event.listen(fleet.engine, "before_cursor_execute", listener)
    try:
        listed = list_audits(fleet.engine, sort=sort, limit=None)
    finally:
        event.remove(fleet.engine, "before_cursor_execute", listener)
    assert len(listed) == 18 and any(a.step for a in listed)
    reads = [s.split("FROM audits")[0] for s in statements if "FROM audits" in s and "progress" in s]
    assert reads and not any("recovery_info" in read for read in reads), statements


def test_list_status_filter_returns_exactly_the_audits_in_that_state(fleet):
    for status, expected in (("pending", 3), ("running", 7), ("completed", 6), ("failed", 2)):
        records = as_json(on(fleet.url, "list", "--status", status, "--format", "json"))
        assert len(records) == expected == count_audits(fleet.engine, status=status), status
        assert {r["status"] for r in records} == {status}


def test_list_worker_filter_and_limit(fleet):
    mine = as_json(on(fleet.url, "list", "--worker", "worker-1", "--format", "json"))
    assert mine and {r["worker_id"] for r in mine} == {"worker-1"}
    assert len(mine) == count_audits(fleet.engine, worker_id="worker-1")
    newest = sorted(statuses(fleet.engine), reverse=True)
    assert [r["id"] for r in as_json(on(fleet.url, "list", "--limit", "2", "--format", "json"))] == newest[:2]
    assert len(as_json(on(fleet.url, "list", "--limit", "0", "--format", "json"))) == len(newest)
    plain = on(fleet.url, "list", "--limit", "2")
    assert plain.exit_code == 0 and len(plain.stdout.splitlines()) == 3
    assert "2 audits (--limit reached)" in plain.stderr
    everything = len(newest)
    for room in (everything, everything + 1):  # filled to the brim, or with room to spare: nothing was cut
        roomy = on(fleet.url, "list", "--limit", str(room), "--format", "plain")
        assert roomy.stderr.strip() == f"{everything} audits", roomy.stderr


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown", "csv"])
def test_list_every_format_shows_the_targets_and_states(fleet, fmt):
    result = on(fleet.url, "list", "--format", fmt, env=WIDE)
    assert result.exit_code == 0, result.output
    for target, status in (("https://shop.example.com/checkout", "running"), ("https://cdn.example.com", "failed"),
                           ("https://mail.example.com", "pending")):
        line = next(line for line in result.stdout.splitlines() if target in line)
        assert status in line


def test_list_on_empty_database_says_no_audits_match(database_url):
    result = on(database_url, "list")
    assert result.exit_code == 0 and result.stdout == ""
    assert "No audits match" in result.stderr
    assert as_json(on(database_url, "list", "--format", "json")) == []


def test_list_invalid_status_or_negative_limit_is_a_usage_error():
    assert invoke("list", "--status", "stuck").exit_code == 2
    assert invoke("list", "--limit", "-1").exit_code == 2


# --- show -----------------------------------------------------------------------------


def test_show_json_is_one_object_with_progress_recovery_info_and_history(demo):
    audit_id = stuck_ids(demo)["https://blog.example.net"]
    assert on(demo, "recover", "-q").exit_code == 0
    record = as_json(on(demo, "show", audit_id, "--format", "json"))
    assert isinstance(record, dict)
    assert record["id"] == audit_id and record["status"] == "failed"
    assert record["progress"]["progress"]["step"] == "Crawling"
    assert record["progress"]["progress"]["is_running"] is False
    assert record["recovery_info"]["reasons"] == ["stale_heartbeat"]
    assert record["recovery_info"]["original_status"]["status"] == "running"
    assert [e["event"] for e in record["history"]] == ["recovered"]
    assert record["history"][0]["actor"] == "auditctl recover"


def test_show_running_audit_has_no_recovery_info_and_empty_history(fleet):
    record = as_json(on(fleet.url, "show", fleet.ids["https://status.example.io"], "--format", "json"))
    assert record["status"] == "running" and record["recovery_info"] is None and record["history"] == []
    assert record["has_lease"] is True and record["progress"]["progress"]["step"] == "Waiting for rate limit"


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown", "csv"])
def test_show_every_format_shows_target_progress_and_recovery(fleet, fmt):
    (failed,) = [r["id"] for r in as_json(on(fleet.url, "list", "--status", "failed", "--format", "json"))
                 if r["target"] == "https://cdn.example.com"]
    result = on(fleet.url, "show", failed, "--format", fmt, env=WIDE)
    assert result.exit_code == 0, result.output
    for expected in ("https://cdn.example.com", "Crawling", "stale_heartbeat", "max_age_exceeded"):
        assert expected in result.stdout, expected
    if fmt != "csv":
        assert "auditctl demo" in result.stdout and "recovered" in result.stdout, "the history is shown"


def test_show_unknown_id_is_one_line_error_and_exit_1(database_url):
    result = on(database_url, "show", "999999")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["Error: no audit with id 999999"]


@pytest.mark.parametrize("bad_id", ["1.5", "abc", "-3", "9223372036854775808"])  # -3 alone reads as an option
def test_show_id_that_cannot_be_an_audit_is_a_usage_error(bad_id):
    assert invoke("show", bad_id).exit_code == 2


# --- workers --------------------------------------------------------------------------


def test_workers_shows_a_registered_guard_alive(database_url, guards):
    guard = guards(worker_id="scanner-7")
    (record,) = as_json(on(database_url, "workers", "--format", "json"))
    assert record["worker_id"] == "scanner-7" and record["instance_id"] == guard.instance_id
    assert record["alive"] is True and record["stopped_at"] is None and record["running_audits"] == 0
    plain = on(database_url, "workers")
    assert plain.exit_code == 0
    assert "scanner-7" in plain.stdout and " alive " in plain.stdout.splitlines()[1]


def test_a_worker_on_another_host_beating_from_the_future_is_not_called_alive(database_url, engine):
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(workers).values(instance_id="f" * 32, worker_id="clock-ahead", host="elsewhere",
                                                  pid=1, process_key="other-boot:1", started_at=now - timedelta(hours=1),
                                                  last_heartbeat_at=now + timedelta(days=30)))
    (record,) = as_json(on(database_url, "workers", "--format", "json"))
    assert record["worker_id"] == "clock-ahead" and record["alive"] is False, record


def test_workers_counts_the_audits_a_guard_holds_and_hides_instances_gone_for_longer_than_a_day(database_url, guards, engine):
    from datetime import timedelta

    from sqlalchemy import update

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    guard = guards(worker_id="scanner-8")
    audit_id = guard.create_audit("https://example.com/held")
    with guard.run(audit_id):
        (record,) = as_json(on(database_url, "workers", "--format", "json"))
        assert record["running_audits"] == 1
    guard.close()
    (stopped,) = as_json(on(database_url, "workers", "--format", "json"))  # gone just now: still listed, as gone
    assert stopped["alive"] is False and stopped["stopped_at"] is not None and "stopped cleanly" in stopped["gone"]
    assert "without finishing" not in stopped["gone"], "it completed its audit before it stopped"
    assert "gone" in on(database_url, "workers").stdout
    with write_transaction(engine) as connection:
        two_days_ago = fetch_now(connection) - timedelta(days=2)
        connection.execute(update(workers).values(stopped_at=two_days_ago, last_heartbeat_at=two_days_ago))
    assert as_json(on(database_url, "workers", "--format", "json")) == []  # past the 24h retention
    (kept,) = as_json(on(database_url, "workers", "--all", "--format", "json"))
    assert kept["instance_id"] == guard.instance_id


def test_workers_marks_only_instances_sharing_a_worker_id_with_another_live_one_as_duplicates(database_url, guards):
    first = guards(worker_id="scanner-dup")
    second = guards(worker_id="scanner-dup")
    alone = guards(worker_id="scanner-alone")
    duplicate = {r["instance_id"]: r["duplicate"] for r in as_json(on(database_url, "workers", "--format", "json"))}
    assert duplicate == {first.instance_id: True, second.instance_id: True, alone.instance_id: False}


def test_workers_keeps_an_instance_gone_for_longer_than_a_day_while_it_still_holds_a_running_audit(database_url, guards,
                                                                                                   engine):
    from datetime import timedelta

    from sqlalchemy import update

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    guard = guards(worker_id="scanner-held")
    audit_id = guard.create_audit("https://example.com/held-long")
    with guard.run(audit_id):
        with write_transaction(engine) as connection:
            two_days_ago = fetch_now(connection) - timedelta(days=2)
            connection.execute(update(workers).where(workers.c.instance_id == guard.instance_id)
                               .values(stopped_at=two_days_ago, last_heartbeat_at=two_days_ago))
        (record,) = as_json(on(database_url, "workers", "--format", "json"))
        assert record["instance_id"] == guard.instance_id and record["alive"] is False
        assert record["running_audits"] == 1


def test_workers_of_the_demo_fleet_tell_the_living_from_the_gone(fleet):
    alive = {r["worker_id"]: r["alive"] for r in as_json(on(fleet.url, "workers", "--format", "json"))}
    assert alive == {"worker-1": True, "worker-2": True, "worker-3": True, "worker-4": False, "worker-5": False}


def test_workers_csv_tells_a_gone_instance_from_a_silent_one_as_the_table_does(database_url, engine):
    from sqlalchemy import update

    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    assert on(database_url, "demo").exit_code == 0
    with write_transaction(engine) as connection:
        connection.execute(update(workers).where(workers.c.worker_id == "worker-4")
                           .values(stopped_at=workers.c.last_heartbeat_at))
    table = {line.split()[0]: line for line in on(database_url, "workers", "-o", "plain").stdout.splitlines()[1:]
             if line.startswith("worker-")}
    rows = {r["worker_id"]: r for r in csv.DictReader(io.StringIO(on(database_url, "workers", "-o", "csv").stdout))}
    assert " gone " in table["worker-4"] and " silent " in table["worker-5"]
    assert rows["worker-4"]["alive"] == rows["worker-5"]["alive"] == "false"
    assert rows["worker-4"]["gone"] and not rows["worker-5"]["gone"]


def test_workers_with_none_registered_says_so(database_url):
    result = on(database_url, "workers")
    assert result.exit_code == 0 and result.stdout == ""
    assert "No workers have registered" in result.stderr


# --- config ---------------------------------------------------------------------------


def config_of(result) -> dict[str, tuple]:
    return {r["setting"]: (r["value"], r["source"]) for r in as_json(result)}


def source_column(table: str) -> list[str]:
    """Each row's SOURCE cell of ``auditctl config``'s table, its folded lines joined again: a line
    that ends in '/' runs on into the next; any other break stands for a space."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("SETTING"))
    at = lines[header].index("SOURCE")
    cells: list[list[str]] = []
    for line in lines[header + 1:]:
        if line.startswith("Config file:"):
            break
        assert len(line) <= 80, line
        if line[:at].strip():
            cells.append([])
        cells[-1].append(line[at:].rstrip())
    joined = []
    for pieces in cells:
        text = pieces[0]
        for piece in pieces[1:]:
            text += piece if text.endswith("/") else " " + piece
        joined.append(text)
    return joined


def folded_config(tmp_path) -> tuple[list, str]:
    folder = tmp_path / "site-settings" / "auditctl-prod-eu-west"
    folder.mkdir(parents=True)
    path = folder / "config.toml"
    path.write_text('stale_after = "12m"\n[kinds.full-scan]\nmax_age = "4h"\nstall_after = "30m"\n')
    args = ["--config", path.relative_to(tmp_path), "config", "--stall-after", "20m"]  # run in tmp_path
    return args, [r["source"] for r in as_json(invoke(*args, "--format", "json", env={"AUDITCTL_MAX_AGE": "40m"}))]


def test_config_wraps_its_source_column_at_words_and_paths_when_the_terminal_is_80_wide(tmp_path):
    """At 80 columns the SOURCE column was cut mid-word ("file /tmp/.../site-" / "settings/...")."""
    args, sources = folded_config(tmp_path)
    result = invoke(*args, "--format", "table", env={"COLUMNS": "80", "AUDITCTL_MAX_AGE": "40m"})
    assert result.exit_code == 0, result.output
    assert source_column(result.stdout) == sources, result.stdout
    assert "flag (the file's 30m is replaced)" in sources
    # The other formats are untouched: plain keeps one line per setting when it fits, markdown and json never fold.
    markdown = invoke(*args, "--format", "markdown", env={"COLUMNS": "80", "AUDITCTL_MAX_AGE": "40m"})
    assert all(source.replace("_", "\\_") in markdown.stdout or source in markdown.stdout for source in sources)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_config_wraps_its_source_column_at_words_and_paths_in_a_real_80_column_terminal(tmp_path):
    import os
    import sys

    from terminal import Terminal

    args, sources = folded_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_") and k not in ("COLUMNS", "LINES", "TMUX")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), AUDITCTL_MAX_AGE="40m")
    with Terminal(tmp_path, width=80, height=40, env=env) as term:
        term.run(str(Path(sys.executable).parent / "auditctl"), *map(str, args))
        shown = term.wait_for(lambda screen: "Config file:" in screen, message="the settings")
    assert source_column(shown) == sources, shown


@pytest.mark.parametrize("columns", ["60", "80"])
def test_config_keeps_an_environment_variables_name_whole_beside_a_long_database_url(columns):
    """The SOURCE column shrank to 10 cells beside a long URL (or at 60 columns) and cut the variable's
    name mid-word ("env AUDITCTL_D" / "ATABASE_UR" / "L"): `auditctl config | grep` found no source."""
    url = "postgresql://auditor:pw@a-very-long-host-name.internal.example.com:5432/auditdb"
    result = invoke("config", "--format", "plain", env={"COLUMNS": columns, "AUDITCTL_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("database_url")]
    assert line.split()[-1] in ("AUDITCTL_DATABASE_URL", "env"), result.stdout
    assert "AUDITCTL_DATABASE_URL" in result.stdout.split(), result.stdout


def test_config_with_nothing_set_shows_every_default():
    result = invoke("config", "--format", "json")
    settings = config_of(result)
    assert settings == {
        "database_url": ("sqlite:///auditctl.db", "default"),
        "stale_after": ("10m", "default"),
        "max_age": ("30m", "default"),
        "stall_after": ("10m", "default"),
        "interval": ("5m", "default"),
        "refresh": ("1s", "default"),
        "lock_wait": ("30s", "default"),
        "notify_timeout": ("5s", "default"),
        "max_attempts": (3, "default"),
        "max_resets": (5, "default"),
        "slack_webhook": (None, "default"),
        "discord_webhook": (None, "default"),
        "webhook": (None, "default"),
    }
    # Durations read the same in every format; json adds the exact seconds.
    assert {r["setting"]: r.get("seconds") for r in as_json(result)}["stale_after"] == 600.0
    assert "stale_after      10m" in invoke("config", "--format", "plain").stdout


def test_config_precedence_is_flag_over_env_over_file_over_default(tmp_path):
    path = tmp_path / "auditctl.toml"
    path.write_text('stale_after = "7m"\nmax_age = "40m"\n')
    file_only = config_of(invoke("--config", path, "config", "--format", "json"))
    assert file_only["stale_after"] == ("7m", f"file {path}")
    assert file_only["max_age"] == ("40m", f"file {path}")
    assert file_only["stall_after"] == ("10m", "default")
    env = {"AUDITCTL_STALE_AFTER": "8m"}
    with_env = config_of(invoke("--config", path, "config", "--format", "json", env=env))
    assert with_env["stale_after"] == ("8m", "env AUDITCTL_STALE_AFTER")
    assert with_env["max_age"] == ("40m", f"file {path}")
    with_flag = config_of(invoke("--config", path, "config", "--stale-after", "9m", "--format", "json", env=env))
    assert with_flag["stale_after"] == ("9m", "flag")
    assert with_flag["max_age"] == ("40m", f"file {path}")


def test_config_shows_a_kinds_value_a_flag_replaced_as_the_flags(fleet, tmp_path):
    path = tmp_path / "kinds.toml"
    path.write_text('[kinds.x]\nstale_after = "25m"\nmax_age = "3h"\n')
    settings = config_of(invoke("--config", path, "config", "--stale-after", "12m", "--format", "json"))
    assert settings["kinds.x.stale_after"] == ("12m", "flag (the file's 25m is replaced)")
    assert settings["kinds.x.max_age"] == ("3h", f"file {path}")
    recover = invoke("--config", path, "recover", "--dry-run", "--stale-after", "12m", "--database-url", fleet.url)
    assert "; kind x: max_age 3h." in recover.stderr and "25m" not in recover.stderr, recover.stderr


@pytest.mark.parametrize("setting", ['stale_after = "1ms"', 'interval = "10ms"', 'refresh = "1ms"',
                                     '[kinds.x]\nstale_after = "1ms"'])
def test_config_refuses_what_recover_and_watch_refuse_unless_unsafe_thresholds(tmp_path, setting):
    path = tmp_path / "low.toml"
    path.write_text(setting + "\n")
    refused = invoke("--config", path, "config")
    assert refused.exit_code == 2 and "is below the floor of" in refused.stderr, refused.output
    assert invoke("--config", path, "config", "--unsafe-thresholds").exit_code == 0


@pytest.mark.parametrize("command", [["report"], ["report", "--suggest-thresholds"], ["reset-all", "--dry-run"],
                                     ["scan"], ["recover", "--dry-run"], ["watch", "--once"], ["config"]])
def test_every_command_refuses_a_stale_after_below_the_floor_when_report_or_reset_all_is_run(demo, command, tmp_path):
    """report and reset-all (without --include-stuck) took --stale-after 500ms that every other command refuses."""
    by_flag = on(demo, *command, "--stale-after", "500ms")
    assert by_flag.exit_code == 2, by_flag.output
    assert "Error: --stale-after 500ms is below the floor of 1s" in by_flag.stderr
    by_env = on(demo, *command, env={"AUDITCTL_STALE_AFTER": "0.5s"})
    assert by_env.exit_code == 2 and "stale_after 500ms is below the floor of 1s" in by_env.stderr, by_env.output
    path = tmp_path / "low.toml"
    path.write_text('[kinds.x]\nstale_after = "1ms"\n')
    by_file = invoke("--config", path, *command, "--database-url", demo, secrets=[p for p in [make_url(demo).password] if p])
    assert by_file.exit_code == 2 and "stale_after of kind 'x' 1ms is below the floor of 1s" in by_file.stderr
    assert on(demo, *command, "--stale-after", "500ms", "--unsafe-thresholds").exit_code == 0


def test_config_precedence_decides_what_scan_finds(fleet, tmp_path):
    """The blog audit has been silent 17m: stuck under 10m, not under 20m (stall_after raised to match)."""
    path = tmp_path / "patient.toml"
    path.write_text(f'database_url = "{fleet.url}"\nstale_after = "20m"\nstall_after = "20m"\n')

    def blog_is_stuck(*flags, env=None):
        found = as_json(invoke("--config", path, "scan", "--format", "json", *flags, env=env))
        return "https://blog.example.net" in {r["target"] for r in found}

    assert not blog_is_stuck(), "file over default"
    assert blog_is_stuck(env={"AUDITCTL_STALE_AFTER": "10m"}), "env over file"
    assert not blog_is_stuck("--stale-after", "20m", env={"AUDITCTL_STALE_AFTER": "10m"}), "flag over env"


def test_config_file_is_found_through_auditctl_config_and_xdg_config_home(tmp_path, monkeypatch):
    named = tmp_path / "named.toml"
    named.write_text("max_attempts = 5\n")
    by_env = invoke("config", "--format", "json", env={"AUDITCTL_CONFIG": str(named)})
    assert config_of(by_env)["max_attempts"] == (5, f"file {named}")
    xdg = tmp_path / "xdg"
    (xdg / "auditctl").mkdir(parents=True)
    (xdg / "auditctl" / "config.toml").write_text('[auditctl]\ninterval = "1m"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    result = invoke("config", "--format", "json")
    assert config_of(result)["interval"] == ("1m", f"file {xdg / 'auditctl' / 'config.toml'}")
    assert f"Config file: {xdg / 'auditctl' / 'config.toml'}" in result.stderr


def test_config_masks_the_password_from_flag_env_and_file(tmp_path):
    url = "postgresql://bob:s3cret@db.internal:5432/audits"
    by_flag = invoke("config", "--database-url", url, secrets=["s3cret"])
    assert "postgresql://bob:***@db.internal:5432/audits" in by_flag.stdout
    by_env = invoke("config", "--format", "json", env={"AUDITCTL_DATABASE_URL": url}, secrets=["s3cret"])
    assert config_of(by_env)["database_url"] == ("postgresql://bob:***@db.internal:5432/audits", "env AUDITCTL_DATABASE_URL")
    path = tmp_path / "secret.toml"
    path.write_text(f'database_url = "{url}"\n')
    by_file = invoke("--config", path, "config", "--format", "csv", secrets=["s3cret"])
    assert f"postgresql://bob:***@db.internal:5432/audits,file {path}" in by_file.stdout


def test_config_shows_the_lock_wait_the_alert_timeout_and_each_webhook_masked(tmp_path):
    path = tmp_path / "alerts.toml"
    path.write_text('notify_timeout = "9s"\ndiscord_webhook = "https://discord.com/api/webhooks/1/s3cret"\n')
    env = {"AUDITCTL_SLACK_WEBHOOK": "https://hooks.slack.com/services/T0/B0/s3cret,https://hooks.slack.com/services/T1/B1/s3cret"}
    settings = config_of(invoke("--config", path, "config", "--format", "json", "--lock-wait", "2m", env=env,
                                secrets=["s3cret", "T0", "services"]))
    assert settings["lock_wait"] == ("2m", "flag")
    assert settings["notify_timeout"] == ("9s", f"file {path}")
    assert settings["slack_webhook"] == ("https://hooks.slack.com/***, https://hooks.slack.com/***", "env AUDITCTL_SLACK_WEBHOOK")
    assert settings["discord_webhook"] == ("https://discord.com/***", f"file {path}")
    assert settings["webhook"] == (None, "default")


def test_config_masks_a_password_given_as_a_query_parameter():
    result = invoke("config", "--database-url", "postgresql://bob@db.internal/audits?sslmode=require&password=s3cret",
                    secrets=["s3cret"])
    assert result.exit_code == 0
    assert "password=***" in result.stdout


def test_config_and_explanations_show_a_threshold_exactly_as_it_is_in_force(fleet):
    """10m59s was shown as 10m and 25h30m as 1d1h: not the settings in force."""
    shown = invoke("config", "--stale-after", "10m59s", "--max-age", "25h30m", "--stall-after", "14m30s", "-o", "plain")
    assert shown.exit_code == 0, shown.output
    values = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines() if line.strip()}
    assert (values["stale_after"], values["max_age"], values["stall_after"]) == ("10m59s", "1d1h30m", "14m30s")
    scanned = on(fleet.url, "scan", "--stale-after", "14m30s", "-o", "json")
    assert any("(stale_after 14m30s, flag)" in sentence for v in json.loads(scanned.stdout) for sentence in v["explanation"])


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown", "csv"])
def test_config_every_format_names_each_setting_and_its_source(fmt):
    result = invoke("config", "--format", fmt, env={"AUDITCTL_MAX_AGE": "1h", **WIDE})
    assert result.exit_code == 0, result.output
    for name in ("database_url", "stale_after", "stall_after", "interval", "max_attempts"):
        line = next(line for line in as_read(result, fmt).splitlines() if name in line)
        assert "default" in line
    assert "env AUDITCTL_MAX_AGE" in next(line for line in as_read(result, fmt).splitlines() if "max_age" in line)


# --- completion -----------------------------------------------------------------------


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _auditctl_completion auditctl"),
                                           ("zsh", "compdef _auditctl_completion auditctl"),
                                           ("fish", "complete --no-files --command auditctl")])
def test_completion_prints_the_script_for_each_shell(shell, marker):
    result = invoke("completion", shell)
    assert result.exit_code == 0
    assert marker in result.stdout and "_AUDITCTL_COMPLETE" in result.stdout


def test_completion_for_an_unknown_shell_is_a_usage_error():
    result = invoke("completion", "tcsh")
    assert result.exit_code == 2
    assert "'tcsh' is not one of" in result.stderr


# --- usage errors ---------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["scan", "--bogus"], "No such option '--bogus'"),
    (["recover", "--format", "yaml"], "'yaml' is not one of"),
    (["reset-all", "--yes", "--since"], "Option '--since' requires an argument"),
    (["list", "--limit", "many"], "'many' is not a valid integer"),
    (["watch", "--interval"], "Option '--interval' requires an argument"),
    (["show"], "Missing argument 'ID'"),
])
def test_bad_flag_is_a_usage_error_with_clicks_message(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


@pytest.mark.parametrize("value", ["abc", "-5m", "999999d", "0", ""])
@pytest.mark.parametrize("command, option", [("scan", "--stale-after"), ("scan", "--older-than"), ("recover", "--max-age"),
                                             ("reset-all", "--since"), ("watch", "--interval"), ("workers", "--stale-after")])
def test_bad_duration_is_a_usage_error_naming_the_option(command, option, value):
    result = invoke(command, option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.stderr
    assert "Traceback" not in result.output


def test_bad_duration_from_the_environment_names_the_option_and_the_variable():
    result = invoke("scan", env={"AUDITCTL_STALE_AFTER": "soon"})
    assert result.exit_code == 2
    assert "'--stale-after'" in result.stderr and "AUDITCTL_STALE_AFTER" in result.stderr


def test_stale_after_longer_than_max_age_is_a_usage_error():
    result = invoke("scan", "--stale-after", "2h", "--max-age", "1h")
    assert result.exit_code == 2
    assert "stale_after (2h) is longer than max_age (1h)" in result.stderr


@pytest.mark.parametrize("content, expected", [
    ('stale_after = \n', "is not valid TOML"),
    ('stale_aftr = "10m"\n', "unknown setting 'stale_aftr'"),
    ('stale_after = "soon"\n', "stale_after: cannot read 'soon' as a duration"),
    ('max_age = "-5m"\n', "max_age: must be greater than zero"),
    ('max_attempts = 0\n', "max_attempts must be a whole number"),
    ('database_url = 5\n', "database_url must be a non-empty string"),
    ('slack_webhook = "ftp://hooks.slack.com/T0/B0/s3cret"\n', "slack_webhook: slack webhook ftp://hooks.slack.com/*** is not"),
    ('webhook = ["https://ok.example/a, nohost"]\n', "webhook: webhook *** is not an http(s) URL"),
])
def test_bad_config_file_is_a_usage_error_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "broken.toml"
    path.write_text(content)
    for args, env in ((["--config", path, "scan"], None), (["scan"], {"AUDITCTL_CONFIG": str(path)})):
        result = invoke(*args, env=env)
        assert result.exit_code == 2
        assert f"config file {path}" in result.stderr and expected in result.stderr
        assert "Traceback" not in result.output


def test_a_broken_config_file_leaves_help_and_completion_working_and_stops_every_command(tmp_path, monkeypatch):
    (tmp_path / "auditctl").mkdir()
    (tmp_path / "auditctl" / "config.toml").write_text("stale_after = \n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for command in (["scan", "--help"], ["reset-all", "--help"], ["completion", "bash"], ["--help"]):
        assert invoke(*command).exit_code == 0, command
    for command in (["scan"], ["recover", "--dry-run"], ["config"]):
        refused = invoke(*command)
        assert refused.exit_code == 2 and "is not valid TOML" in refused.stderr, command
    good = tmp_path / "good.toml"
    good.write_text('max_attempts = 7\n')
    replaced = invoke("config", "-o", "json", "--config", good)
    assert replaced.exit_code == 0 and config_of(replaced)["max_attempts"] == (7, f"file {good}"), "--config replaces it"


def test_an_os_error_about_a_file_names_the_file_not_the_output(demo, monkeypatch):
    import auditctl.rules

    def unreadable(*args, **kwargs):
        raise OSError(36, "File name too long", "/srv/audits/" + "a" * 20)

    monkeypatch.setattr(auditctl.rules, "iter_stuck", unreadable)
    result = on(demo, "scan")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == "Error: /srv/audits/aaaaaaaaaaaaaaaaaaaa: File name too long"


def test_missing_config_file_named_explicitly_is_a_usage_error(tmp_path):
    result = invoke("--config", tmp_path / "nope.toml", "scan")
    assert result.exit_code == 2
    assert "nope.toml does not exist" in result.stderr
    empty = invoke("--config", "", "scan")
    assert empty.exit_code == 2 and "the config file path is empty" in empty.stderr
    too_long = invoke("--config", "a" * 5000, "scan")
    assert too_long.exit_code == 2 and "cannot read config file" in too_long.stderr


def test_an_empty_auditctl_config_is_refused_not_read_as_unset(tmp_path):
    """``AUDITCTL_CONFIG=$UNSET`` (a cron job, a unit file) is refused as ``--config ''`` is: click takes an
    empty variable for an unset one, and the default file was read in its place without a word."""
    default = tmp_path / "xdg-config" / "auditctl" / "config.toml"
    default.parent.mkdir(parents=True)
    default.write_text("max_attempts = 7\n")
    for args in (["config"], ["scan"], ["--database-url", "sqlite:///auditctl.db", "list"]):
        result = invoke(*args, env={"AUDITCTL_CONFIG": ""})
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1 and "$AUDITCTL_CONFIG is set but empty" in result.stderr
    # A --config given on the command line, before or after the command, is the file read.
    named = tmp_path / "named.toml"
    named.write_text("max_attempts = 4\n")
    for args in (["config", "--config", named], ["--config", named, "config"]):
        given = invoke(*args, "--format", "json", env={"AUDITCTL_CONFIG": ""})
        assert config_of(given)["max_attempts"] == (4, f"file {named}")
    # Help and completion still work while the variable is fixed.
    assert invoke("scan", "--help", env={"AUDITCTL_CONFIG": ""}).exit_code == 0
    assert invoke("completion", "bash", env={"AUDITCTL_CONFIG": ""}).exit_code == 0


def test_config_file_contradicting_the_defaults_is_a_usage_error(tmp_path):
    path = tmp_path / "contradiction.toml"
    path.write_text('stall_after = "2h"\n')
    result = invoke("--config", path, "scan")
    assert result.exit_code == 2
    assert "stall_after (2h) is longer than max_age (30m)" in result.stderr
    assert f"(given as stall_after in the config file {path})" in result.stderr, "the file is named, not a flag"


def test_a_watch_interval_below_the_floor_is_named_where_it_was_given(tmp_path):
    path = tmp_path / "fast.toml"
    path.write_text('interval = "1ms"\n')
    from_file = invoke("--config", path, "watch", "--once")
    assert from_file.exit_code == 2 and f"interval in the config file {path}: 1ms is below the floor of 100ms" in from_file.stderr
    from_env = invoke("watch", "--once", env={"AUDITCTL_REFRESH": "10ms"})
    assert from_env.exit_code == 2 and "--refresh ($AUDITCTL_REFRESH): 10ms is below the floor" in from_env.stderr


@pytest.mark.parametrize("url", ["mysql://bob:s3cret@127.0.0.1/x", "postgresql://bob:s3cret@[::1",
                                 "postgresql+psycopg2://bob:s3cret@127.0.0.1:1/x", "postgresql+asyncpg://bob:s3cret@h/x",
                                 "sqlite+aiosqlite://bob:s3cret@/x.db"])
def test_unusable_database_url_is_a_usage_error_without_the_password(url):
    result = invoke("scan", "--database-url", url, secrets=["s3cret"])
    assert result.exit_code == 2
    assert "bob:***@" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("url", ["postgresql//bob:s3cret@db.internal/audits", "postgresql:/bob:s3cret@db.internal/audits",
                                 "bob:s3cret@db.internal/audits", "postgresql:bob:s3cret@db.internal:5432/audits"])
def test_a_database_url_too_broken_to_parse_is_refused_without_its_password_when_the_scheme_is_mistyped(url):
    # A typo in the scheme (a missing ':' or '/') leaves no "scheme://" to find the password after.
    from auditctl import StuckAuditPrevention
    from auditctl.errors import ConfigError
    for how in (("scan", "--database-url", url), ("config", "--database-url", url)):
        result = invoke(*how, secrets=["s3cret"])
        assert result.exit_code == 2 and "cannot read the database URL" in result.stderr
        assert "***@db.internal" in result.stderr, "the rest of the URL is shown, to find the typo in"
    from_env = invoke("scan", env={"AUDITCTL_DATABASE_URL": url}, secrets=["s3cret"])
    assert from_env.exit_code == 2 and "$AUDITCTL_DATABASE_URL" in from_env.stderr
    with pytest.raises(ConfigError) as caught:
        StuckAuditPrevention(url, worker_id="w")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("url", ["postgresql//bob:s3cret@db.internal/audits?application_name=https://ops.example/runbook",
                                 "bob:s3cret@db.internal/audits?options=see%20file:///etc/auditctl"])
def test_a_database_url_too_broken_to_parse_is_refused_without_its_password_when_its_query_holds_another_url(url):
    # The "scheme://" found is the one in the query, after the password: masking from it hid nothing.
    from auditctl import StuckAuditPrevention
    from auditctl.errors import ConfigError
    result = invoke("scan", "--database-url", url, secrets=["s3cret"])
    assert result.exit_code == 2 and "cannot read the database URL" in result.stderr
    assert "s3cret" not in result.stderr and "***@db.internal" in result.stderr, result.stderr
    with pytest.raises(ConfigError) as caught:
        StuckAuditPrevention(url, worker_id="w")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("query, message", [("timeout=abc", "could not convert string to float: 'abc'"),
                                            ("check_same_thread=maybe", "String is not true/false: 'maybe'")])
def test_a_bad_value_in_a_sqlite_url_is_a_usage_error(tmp_path, query, message):
    result = invoke("init", "--database-url", f"sqlite:///{tmp_path / 'a.db'}?{query}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip() == f"Error: cannot use the database URL sqlite:///{tmp_path / 'a.db'}?{query}: {message}"


def test_a_bad_database_url_names_the_file_or_variable_it_came_from(tmp_path):
    path = tmp_path / "auditctl.toml"
    path.write_text('database_url = "foo://x"\n')
    by_file = invoke("--config", path, "scan")
    assert by_file.exit_code == 2
    assert by_file.stderr.startswith(f"Error: database_url in the config file {path}: unsupported database 'foo'")
    by_env = invoke("scan", env={"AUDITCTL_DATABASE_URL": "postgresql://u:s3cret@h/db?connect_timeout=abc"},
                    secrets=["s3cret"])
    assert by_env.exit_code == 2 and by_env.stderr.startswith(
        "Error: --database-url ($AUDITCTL_DATABASE_URL): the database URL postgresql://u:***@h/db?connect_timeout=abc has")


@pytest.mark.parametrize("exists", [True, False], ids=["file exists", "no file"])
def test_an_option_sqlite_does_not_take_is_a_usage_error_whether_or_not_the_file_exists(tmp_path, exists):
    path = tmp_path / "a.db"
    if exists:
        assert invoke("init", "--database-url", f"sqlite:///{path}").exit_code == 0
    result = invoke("scan", "--database-url", f"sqlite:///{path}?foo=1")
    assert result.exit_code == 2 and "has an option SQLite does not take: foo" in result.stderr, result.output


@pytest.mark.parametrize("command", [["scan"], ["config"], ["recover"], ["watch", "--once"]])
def test_an_option_postgresql_does_not_take_is_a_usage_error_before_any_connection(command):
    """A typo in a PostgreSQL URL's options (``sslmod=``) was found only on connecting: exit 1 as
    "database error", ``config`` took the URL as fine, and ``watch`` retried it as an outage for good."""
    url = "postgresql://bob:s3cret@127.0.0.1:1/x?sslmod=require&connect_timeout=1"
    result = invoke(*command, "--database-url", url, secrets=["s3cret"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: the database URL postgresql://bob:***@127.0.0.1:1/x?sslmod=***&connect_timeout=1 has an option "
        "PostgreSQL's client (libpq) does not take: sslmod"]
    # A misspelt password parameter holds a password all the same: never shown.
    typo = invoke(*command, "--database-url", "postgresql://bob@127.0.0.1:1/x?pasword=hunter2", secrets=["hunter2"])
    assert typo.exit_code == 2 and "does not take: pasword" in typo.stderr
    # libpq's own parameters (several hosts, a service, keepalives) are still handed through.
    fine = invoke("config", "--database-url", "postgresql://bob:s3cret@h1,h2:5433/x?sslmode=require"
                  "&keepalives_idle=30&options=-csearch_path%3Dauditctl&target_session_attrs=read-write",
                  secrets=["s3cret"])
    assert fine.exit_code == 0, fine.output


@pytest.mark.parametrize("option, shown", [("sslmode=bogus", 'invalid sslmode value: "bogus"'),
                                           ("target_session_attrs=nonsense", 'invalid target_session_attrs value: "nonsense"'),
                                           ("gssencmode=x", 'invalid gssencmode value: "x"')])
def test_a_value_libpq_refuses_is_a_usage_error_when_the_server_is_up(postgres_server, option, shown):
    """A bad value of an option libpq knows (``sslmode=bogus``) was found only on connecting: exit 1
    as if the database were down. libpq's own check says what is wrong, and it is a usage error."""
    url = make_url(postgres_server.url)
    typed = f"postgresql://{url.username}:s3cret-pw@{url.host}:{url.port}/{url.database}?{option}"
    for command in (["scan"], ["config"], ["recover", "--dry-run"]):
        result = invoke(*command, "--database-url", typed, secrets=["s3cret-pw"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            f"Error: the database URL postgresql://{url.username}:***@{url.host}:{url.port}/{url.database}?{option} "
            f"has a value PostgreSQL's client (libpq) does not take: {shown}"]
    by_env = invoke("scan", env={"AUDITCTL_DATABASE_URL": typed}, secrets=["s3cret-pw"])
    assert by_env.exit_code == 2 and by_env.stderr.startswith("Error: --database-url ($AUDITCTL_DATABASE_URL): ")


@pytest.mark.parametrize("option, refusal", [
    ("sslmode=bogus", 'invalid sslmode value: "bogus"'),  # judged before connecting
    ("keepalives_idle=x", 'invalid integer value "x" for connection option "keepalives_idle"'),  # only on connecting
])
def test_watch_stops_with_a_usage_error_when_libpq_refuses_a_value_in_the_url(postgres_server, tmp_path, option, refusal):
    """``watch`` retried a URL libpq refuses on every connection for ever, as an outage."""
    import os
    import subprocess
    import sys

    url = make_url(postgres_server.url)
    typed = f"postgresql://{url.username}:s3cret-pw@{url.host}:{url.port}/{url.database}?{option}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    try:
        result = subprocess.run([str(Path(sys.executable).parent / "auditctl"), "watch", "--interval", "1s",
                                 "--database-url", typed], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("watch kept retrying a URL libpq refuses")
    assert result.returncode == 2, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert refusal in result.stderr


@pytest.mark.parametrize("option", ["keepalives=abc", "keepalives_idle=x", "tcp_user_timeout=x", "keepalives_count=1.5"])
def test_a_value_libpq_judges_only_on_connecting_is_a_usage_error_when_the_server_is_up(postgres_server, option):
    """libpq reads some values (``keepalives=abc``) only once it has a TCP socket, so the check made
    before connecting passed them, and the connection's refusal was taken for an outage: exit 1."""
    url = make_url(postgres_server.url)
    typed = f"postgresql://{url.username}:s3cret-pw@{url.host}:{url.port}/{url.database}?{option}"
    key, value = option.split("=")
    for command in (["scan"], ["recover", "--dry-run"], ["watch", "--once"]):
        result = invoke(*command, "--database-url", typed, secrets=["s3cret-pw"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: the database URL postgresql://{url.username}:***@{url.host}:{url.port}/{url.database}?{option} "
            f"has a value PostgreSQL's client (libpq) does not take: "
            f'invalid integer value "{value}" for connection option "{key}"')


@pytest.mark.parametrize("command, option", [(["reset-all", "--dry-run"], "max-resets"), (["recover", "--requeue"], "max-attempts"),
                                             (["watch", "--once"], "max-attempts"), (["serve"], "max-resets")])
def test_a_count_larger_than_a_database_integer_is_a_usage_error_from_flag_env_and_file(command, option, tmp_path):
    too_big = str(2**31)
    by_flag = invoke(*command, f"--{option}", too_big)
    assert by_flag.exit_code == 2 and "is not in the range" in by_flag.stderr and "Traceback" not in by_flag.output
    by_env = invoke(*command, env={f"AUDITCTL_{option.upper().replace('-', '_')}": "9" * 30})
    assert by_env.exit_code == 2 and "is not in the range" in by_env.stderr
    config = tmp_path / "big.toml"
    config.write_text(f"{option.replace('-', '_')} = {too_big}\n")
    by_file = invoke("--config", config, *command)
    assert by_file.exit_code == 2 and f"must be a whole number from {'0' if 'resets' in option else '1'} to 2147483647" \
        in by_file.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_empty_database_url_is_refused_wherever_it_is_given_and_never_falls_back(tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    args = ["--database-url", "", "init"] if where == "before" else ["init", "--database-url", ""]
    result = invoke(*args, env={"AUDITCTL_DATABASE_URL": elsewhere})
    assert result.exit_code == 2 and "cannot read the database URL ''" in result.stderr
    assert list(tmp_path.iterdir()) == [], "neither the environment's database nor ./auditctl.db was created"


def test_an_empty_database_url_variable_is_refused_and_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text(f'database_url = "sqlite:///{tmp_path / "from-file.db"}"\n')
    result = invoke("--config", str(tmp_path / "config.toml"), "init", env={"AUDITCTL_DATABASE_URL": ""})
    assert result.exit_code == 2 and "$AUDITCTL_DATABASE_URL is set but empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"], "neither ./auditctl.db nor the file's database"
    given = invoke("init", "--database-url", f"sqlite:///{tmp_path / 'given.db'}", env={"AUDITCTL_DATABASE_URL": ""})
    assert given.exit_code == 0, "a URL given on the command line wins over the empty variable"


@pytest.mark.parametrize("variable, command", [
    ("AUDITCTL_STALE_AFTER", ["scan"]), ("AUDITCTL_MAX_AGE", ["recover", "--dry-run"]), ("AUDITCTL_STALL_AFTER", ["config"]),
    ("AUDITCTL_INTERVAL", ["watch", "--once"]), ("AUDITCTL_REFRESH", ["config"]), ("AUDITCTL_MAX_ATTEMPTS", ["config"]),
    ("AUDITCTL_MAX_RESETS", ["reset-all", "--dry-run"]), ("AUDITCTL_LOCK_WAIT", ["list"]),
    ("AUDITCTL_SLACK_WEBHOOK", ["notify"]), ("AUDITCTL_DISCORD_WEBHOOK", ["config"]), ("AUDITCTL_WEBHOOK", ["recover"]),
    ("AUDITCTL_NOTIFY_TIMEOUT", ["config"]), ("AUDITCTL_STALE_AFTER", ["workers"]), ("AUDITCTL_INTERVAL", ["report"]),
    ("AUDITCTL_WEB_TOKEN", ["serve"]), ("AUDITCTL_WEB_PORT", ["serve"]), ("AUDITCTL_WEB_HOST", ["serve"])])
def test_an_empty_setting_variable_is_refused_when_a_command_reads_it(tmp_path, variable, command):
    """``AUDITCTL_STALE_AFTER=$UNSET`` read as unset: the file's value or the default was used without a
    word, while an empty AUDITCTL_CONFIG or AUDITCTL_DATABASE_URL is refused."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert invoke("init", "--database-url", url).exit_code == 0
    result = invoke(*command, "--database-url", url, env={variable: ""})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"Error: ${variable} is set but empty: "), \
        result.stderr
    blank = invoke(*command, "--database-url", url, env={variable: "  "})  # refused too, by the type or as empty
    assert blank.exit_code == 2 and f"${variable}" in blank.stderr and blank.stderr.count("\n") == 1, blank.output
    # The flag, given, wins over the variable: nothing of it is read.
    flag = {"AUDITCTL_WEB_TOKEN": "--token", "AUDITCTL_WEB_PORT": "--port", "AUDITCTL_WEB_HOST": "--host"}.get(
        variable, "--" + variable.removeprefix("AUDITCTL_").lower().replace("_", "-"))
    if command[0] in ("config", "scan", "list", "workers", "report"):
        value = {"--max-attempts": "3", "--max-resets": "5", "--discord-webhook": "https://discord.example/x"}.get(flag, "20m")
        assert invoke(*command, "--database-url", url, flag, value, env={variable: ""}).exit_code == 0


@pytest.mark.parametrize("flag, value", [("--token", ""), ("--token", "   "), ("--host", "")])
def test_serve_refuses_an_empty_token_or_host_flag_when_given_as_an_unset_shell_variable(tmp_path, flag, value):
    """``serve --token "$TOKEN"`` with TOKEN unset started a read-only dashboard without a word (and an
    empty --host failed as "cannot listen on :", exit 1), while an empty AUDITCTL_WEB_TOKEN is refused."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert invoke("init", "--database-url", url).exit_code == 0
    result = invoke("serve", "--database-url", url, "--port", "0", flag, value,
                    env={"AUDITCTL_WEB_TOKEN": "a-token-from-the-environment"})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"'{flag}'" in result.stderr and "empty" in result.stderr, result.stderr
    assert "Dashboard at" not in result.output


def test_a_config_file_with_settings_both_in_its_auditctl_table_and_at_the_top_is_refused(tmp_path):
    path = tmp_path / "wrapped.toml"
    path.write_text('stale_after = "20m"\n[auditctl]\nmax_age = "40m"\n')
    result = invoke("config", "--config", str(path))
    assert result.exit_code == 2 and "settings both in [auditctl] and at the top level (stale_after)" in result.stderr
    shared = tmp_path / "shared.toml"  # another tool's table beside auditctl's is no conflict
    shared.write_text('[othertool]\nstale_after = "1s"\n[auditctl]\nmax_age = "40m"\n')
    assert config_of(invoke("config", "--config", str(shared), "--format", "json"))["max_age"] == ("40m", f"file {shared}")


def test_config_shows_a_kind_name_with_a_line_break_on_one_line(tmp_path):
    path = tmp_path / "kinds.toml"
    path.write_text('[kinds."full\\"]\\n[evil"]\nmax_age = "1h"\n')
    shown = invoke("config", "--config", str(path), "--format", "plain")
    row = [line for line in shown.stdout.splitlines() if line.startswith("kinds.")]
    assert shown.exit_code == 0 and len(row) == 1 and row[0].startswith('kinds.full"]\\n[evil.max_age'), shown.stdout


def test_a_relative_xdg_config_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relx" / "auditctl").mkdir(parents=True)
    (tmp_path / "relx" / "auditctl" / "config.toml").write_text("max_attempts = 7\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relx")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_of(invoke("config", "--format", "json"))["max_attempts"] == (3, "default")


@pytest.mark.parametrize("command", ["scan", "list"])
def test_a_filter_list_too_long_for_one_statement_is_a_usage_error(command, tmp_path):
    many = ",".join(f"t{i}" for i in range(101))
    result = invoke(command, "--target", many, "--database-url", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.exit_code == 2 and "--target: 101 values; at most 100 at once" in result.stderr


@pytest.mark.parametrize("command", [["scan"], ["list"], ["recover", "--dry-run"], ["watch", "--once"]])
def test_a_refused_filter_is_named_as_its_flag_when_the_command_line_gave_it(demo, command):
    """"worker: 101 values" named the filter by the library's keyword: the operator typed --worker."""
    many = ",".join(f"w{i}" for i in range(101))
    for flag in ("--worker", "--kind", "--target"):
        result = on(demo, *command, flag, many)
        assert result.exit_code == 2 and f"Error: {flag}: 101 values; at most 100 at once" in result.stderr, result.output
    long = on(demo, *command, "--target", "x" * 1001)
    assert long.exit_code == 2 and "Error: --target: a value of 1,001 characters; at most 1,000" in long.stderr
    for since, until in (("1h", "2h"), ("1h", "2020-01-01")):  # the second judged on the database's clock
        backwards = on(demo, *command, "--since", since, "--until", until)
        assert backwards.exit_code == 2 and "Error: --since is later than --until: no audit was created in that window" \
            in backwards.stderr, backwards.output


def test_a_report_since_not_in_the_past_is_named_as_its_flag(demo):
    ahead = on(demo, "report", "--since", "2999-01-01T00:00Z")
    assert ahead.exit_code == 2 and ahead.stderr.startswith("Error: --since 2999-01-01T00:00:00.000Z is not in the past")
    ancient = on(demo, "report", "--suggest-thresholds", "--since", "0001-01-01T00:00:00Z")
    assert ancient.exit_code == 2 and ancient.stderr.startswith("Error: --since 0001-01-01T00:00:00.000Z is more than")


def test_the_library_names_a_refused_filter_by_its_keyword_when_a_program_gave_it():
    from auditctl.errors import ConfigError
    from auditctl.rules import Filters

    with pytest.raises(ConfigError, match="^worker: 101 values"):
        Filters(workers=tuple(f"w{i}" for i in range(101)))
    with pytest.raises(ConfigError, match="^since is later than until"):
        Filters(since=60.0, until=120.0)


# --- runtime errors -------------------------------------------------------------------


@pytest.mark.parametrize("command", [["scan"], ["recover"], ["reset-all", "--yes"], ["list"], ["show", "1"], ["workers"]])
def test_missing_schema_is_one_line_telling_to_run_init(blank_database_url, command):
    result = on(blank_database_url, *command)
    assert result.exit_code == 1
    assert "run `auditctl init`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["scan"], ["recover", "--dry-run"], ["reset-all", "--yes"], ["list"], ["show", "1"],
                                     ["workers"], ["init"], ["demo"], ["watch", "--once"]])
def test_unreachable_database_is_one_error_line_naming_the_host_without_the_password(command):
    result = invoke(*command, env={"AUDITCTL_DATABASE_URL": UNREACHABLE}, secrets=["s3cret"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: database unavailable at postgresql://bob:***@127.0.0.1:1/x: ")  # as typed
    if command[0] != "watch":  # watch also says it stopped
        assert len(lines) == 1 and result.stdout == ""
    assert "Traceback" not in result.output


def test_unreachable_database_with_verbose_shows_a_traceback_but_still_no_password():
    result = invoke("scan", "-v", "--database-url", UNREACHABLE, secrets=["s3cret"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: database unavailable at")


def test_a_password_with_an_unencoded_at_sign_is_hidden_also_where_the_driver_reads_it_as_the_host():
    url = "postgresql://u:hunter2@Tr0ub4dor@127.0.0.1:1/db"
    result = invoke("scan", "--database-url", url, secrets=["hunter2", "Tr0ub4dor"])
    assert result.exit_code == 2 and "Error: the database URL postgresql://u:***@127.0.0.1:1/db" in result.stderr


PIECES = ["Kx7", "Qz9", "Wv%3", "Wv", "Lm"]  # what the URL parser would take for password, host and database


@pytest.mark.parametrize("command", [["scan"], ["recover"], ["init"], ["watch", "--once"], ["serve"], ["notify", "--status"]])
@pytest.mark.parametrize("given", ["flag", "config file"])
def test_a_password_with_an_unencoded_at_and_slash_is_refused_showing_no_piece_of_it_when_given_by_flag_or_file(
        tmp_path, command, given):
    """An '@' then a '/' in a password not percent-encoded: the URL parser took the piece after the '@' for
    the host, and the driver said "failed to resolve host 'Qz9'", a piece of the password. Such a URL can
    never connect as typed: it is refused before any connection, exit 2, saying what to encode."""
    url = "postgresql://u:Kx7@Qz9/Wv%3:Lm@127.0.0.1:1/db"
    if given == "flag":
        result = invoke(*command, "--database-url", url, secrets=PIECES)
    else:
        config = tmp_path / "config.toml"
        config.write_text(f'[auditctl]\ndatabase_url = "{url}"\n')
        result = invoke(*command, env={"AUDITCTL_CONFIG": str(config)}, secrets=PIECES)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2, result.output
    assert "the database URL postgresql://u:***@127.0.0.1:1/db has an '@' in its password" in line and "%40" in line, line
    assert given == "flag" or "in the config file" in line, line


def test_the_pieces_of_a_password_with_at_signs_are_hidden_without_hiding_ordinary_words():
    from auditctl.urls import scrub

    message = "password authentication failed for admin@example.com; could not resolve host 'word@@db'"
    assert scrub(message, "postgresql://u:pass@word@@db/x") == \
        "password authentication failed for admin@example.com; could not resolve host '***db'"


@pytest.mark.parametrize("url, host", [("postgresql://postgres:postgres@127.0.0.1:1/postgres", "127.0.0.1"),
                                       ("postgresql://u:1@127.0.0.1:1/db", "127.0.0.1"),
                                       ("postgresql://u:fail@db.internal:1/x", "db.internal")])
def test_a_password_that_is_also_a_word_of_the_message_is_masked_only_where_it_is_the_password(url, host):
    from auditctl.urls import mask_url, scrub

    message = f'database unavailable at {url}: connection to server at "{host}", port 1 failed for user "postgres"'
    expected = message.replace(url, mask_url(url))
    assert scrub(message, url) == expected and ":***@" in expected


def test_a_password_the_url_does_not_show_elsewhere_is_masked_wherever_it_stands_as_a_word():
    from auditctl.urls import scrub

    assert scrub('password "data" rejected by metadata', "postgresql://u:data@h/metadata") == \
        'password "***" rejected by metadata'
    assert scrub("s3cret (s3cret) s3cret:", "postgresql://u:s3cret@h/db") == "*** (***) ***:"


def test_a_url_with_several_hosts_never_shows_its_password():
    url = "postgresql://auditctl:S3CRET-multi@127.0.0.1,localhost:1/x"  # libpq's multi-host form
    scanned = invoke("scan", "--database-url", url, secrets=["S3CRET-multi"])
    shown = invoke("config", "--database-url", url, "-o", "json", secrets=["S3CRET-multi"])
    assert scanned.exit_code == 1 and "postgresql://auditctl:***@127.0.0.1,localhost:1/x" in scanned.stderr
    assert shown.exit_code == 0 and "auditctl:***@127.0.0.1,localhost:1/x" in shown.stdout


def test_unreachable_database_with_password_in_query_string_does_not_print_it():
    result = invoke("scan", "--database-url", "postgresql://bob@127.0.0.1:1/x?password=s3cret", secrets=["s3cret"])
    assert result.exit_code == 1
    assert "127.0.0.1" in result.stderr and "password=***" in result.stderr


def test_errors_are_red_on_a_colour_terminal_and_plain_under_no_color():
    coloured = invoke("show", "1", "--database-url", UNREACHABLE, color=True)
    assert coloured.exit_code == 1
    assert f"{ESC}31m" in coloured.stderr, "the control: with colour on, the error is red"
    plain = invoke("show", "1", "--database-url", UNREACHABLE, color=True, env={"NO_COLOR": "1"})
    assert plain.exit_code == 1
    assert ESC not in plain.output
    assert plain.stderr.startswith("Error: database unavailable")


# --- hostile input --------------------------------------------------------------------


@pytest.mark.parametrize("worker", ["x' OR 1=1 --", "worker-1'; DROP TABLE audits; --", "%", "worker-_"])
def test_sql_in_the_worker_filter_finds_nothing_and_breaks_nothing(fleet, worker):
    before = everything(fleet.engine)
    assert as_json(on(fleet.url, "scan", "--worker", worker, "--format", "json")) == []
    assert as_json(on(fleet.url, "list", "--worker", worker, "--format", "json")) == []
    assert as_json(on(fleet.url, "recover", "--worker", worker, "--format", "json")) == []
    assert everything(fleet.engine) == before
    assert len(as_json(on(fleet.url, "scan", "--format", "json"))) == 3


def test_unicode_target_and_worker_show_up_intact_in_every_format(database_url, engine, start_audit, backdate):
    target = "https://例え.テスト/パス?q=ü&emoji=🔥 [bold]not markup[/bold]"
    audit_id = make_stuck(engine, start_audit, backdate, target, worker_id="wörker-ñ")
    (record,) = as_json(on(database_url, "scan", "--format", "json"))
    assert (record["id"], record["target"], record["worker_id"]) == (audit_id, target, "wörker-ñ")
    assert as_json(on(database_url, "scan", "--worker", "wörker-ñ", "--format", "json"))[0]["id"] == audit_id
    rows = list(csv.DictReader(io.StringIO(on(database_url, "scan", "--format", "csv").stdout)))
    assert rows[0]["target"] == target
    shown = on(database_url, "show", audit_id, "--format", "table", env=WIDE)
    assert shown.exit_code == 0
    assert target in shown.stdout, "rich must not read brackets in a target as markup"
    for fmt in ("plain", "markdown", "table"):
        result = on(database_url, "list", "--format", fmt, env=WIDE)
        assert result.exit_code == 0 and "https://例え.テスト/パス" in result.stdout, fmt


def test_ten_megabyte_target_shows_up_in_scan_and_list_without_crashing(database_url, engine, start_audit, backdate):
    target = "https://huge.example.com/" + "a" * (10 * 1024 * 1024)
    audit_id = make_stuck(engine, start_audit, backdate, target)
    (record,) = as_json(on(database_url, "scan", "--format", "json"))
    assert record["id"] == audit_id and record["target"] == target
    (listed,) = as_json(on(database_url, "list", "--format", "json"))
    assert listed["target"] == target
    for command in ("scan", "list"):
        for fmt in ("plain", "table"):
            result = on(database_url, command, "--format", fmt, env=WIDE)
            assert result.exit_code == 0, result.output[:500]
            assert "https://huge.example.com/aaaa" in result.stdout
            assert len(result.stdout) < 10_000, "human formats cut a long target short"


def test_target_with_newlines_quotes_and_commas_survives_csv(database_url, engine, start_audit, backdate):
    target = 'https://x.example.com/a,b\n"quoted"\r\nnext'
    make_stuck(engine, start_audit, backdate, target)
    result = on(database_url, "scan", "--format", "csv")
    # Result.stdout turns \r\n into \n; the raw bytes are what a pipe receives.
    rows = list(csv.DictReader(io.StringIO(result.stdout_bytes.decode(), newline="")))
    # Commas, quotes and newlines survive; a carriage return (which would redraw a terminal line
    # when the file is printed) is shown as \r, like every control character in human formats.
    assert [r["target"] for r in rows] == [target.replace("\r", "\\r")]


def test_audit_created_by_the_library_is_listed_by_the_cli(database_url, engine):
    audit_id = leases.create_audit(engine, "https://pending.example.com")
    (record,) = as_json(on(database_url, "list", "--format", "json"))
    assert (record["id"], record["status"], record["worker_id"]) == (audit_id, "pending", None)


# --- secrets, on both engines -------------------------------------------------------------------

WEBHOOK_SECRET = "T00SECRET/B00SECRET/xoxb-very-secret-token"


@pytest.mark.parametrize("command", [["scan"], ["recover"], ["watch", "--once"], ["reset-all", "--yes"], ["list"],
                                     ["show", "12"], ["workers"], ["config"], ["notify"], ["notify", "--status"],
                                     ["scan", "-v", "--stale-after", "bad"]])
def test_no_password_or_webhook_url_appears_in_any_output_on_either_engine(demo, command, tmp_path):
    """On SQLite the URL holds no password, so the webhook URLs (secrets too) are what is checked there;
    on PostgreSQL both are."""
    password = make_url(demo).password
    hook = f"http://127.0.0.1:9/services/{WEBHOOK_SECRET}"
    env = {"AUDITCTL_SLACK_WEBHOOK": hook, "AUDITCTL_WEBHOOK": hook + "?token=another-secret",
           "AUDITCTL_NOTIFY_TIMEOUT": "1s"}
    secrets = ["very-secret-token", "another-secret", "B00SECRET"] + ([password] if password else [])
    result = invoke(command[0], "--database-url", demo, *command[1:], env=env, secrets=secrets)
    assert "Traceback" not in result.stdout
    for secret in secrets:
        assert secret not in result.output


def test_a_workers_log_never_shows_its_database_password_or_webhook_on_either_engine(database_url, guards, caplog,
                                                                                    start_audit, backdate):
    import logging

    caplog.set_level(logging.DEBUG)
    stuck, _ = start_audit(worker_id="someone-else")
    backdate(stuck, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    hook = f"http://127.0.0.1:9/services/{WEBHOOK_SECRET}"
    guard = guards(heartbeat_interval=0.2, slack_webhook=hook, notify_timeout=0.5)
    guard.cleanup_stuck_audits_on_startup()
    guard.start_heartbeat_monitor(handle_sigterm=False)
    from dbtools import wait_for

    wait_for(lambda: "could not deliver" in caplog.text or "Alerts" in caplog.text or "alerts" in caplog.text, timeout=15,
             message="the guard to try its webhook")
    guard.stop()
    password = make_url(database_url).password
    for secret in ["very-secret-token", "B00SECRET"] + ([password] if password else []):
        assert secret not in caplog.text
    assert "127.0.0.1" in caplog.text, "the destination is named, masked"


def test_watch_refuses_a_backwards_window_of_a_duration_and_a_time_at_the_start(demo):
    """Judged on the database's clock, once: it used to fail every pass as a database outage."""
    result = on(demo, "watch", "--once", "--since", "1h", "--until", "2020-01-01")
    assert result.exit_code == 2 and "--since is later than --until" in result.stderr, result.output


def test_watch_stops_with_a_usage_error_when_its_window_turns_backwards_as_time_goes_on(demo):
    """--until a moment ahead, --since a duration: after a while the window is backwards. That was
    reported as a database outage on every pass, for good."""
    from datetime import datetime, timedelta, timezone

    until = (datetime.now(timezone.utc) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    result = on(demo, "watch", "--no-recover", "--interval", "0.5s", "--since", "1s", "--until", until)
    assert result.exit_code == 2 and "--since is later than --until" in result.stderr, result.output
    assert "database lost" not in result.output
    assert "since is later than until" not in result.output, "the log line names the flags too"


def test_a_silent_instance_is_never_coloured_as_alive():
    from auditctl.cli.records import INSTANCE_COLUMNS

    (state,) = [c for c in INSTANCE_COLUMNS if c.key == "alive"]
    frozen = {"alive": True, "heartbeat_late": True, "gone": None}  # its process here, its heartbeat not
    assert (state.human(frozen), state.style(frozen)) == ("silent", "dim")
    assert state.style({"alive": True, "heartbeat_late": False, "gone": None}) == "green"
    assert state.style({"alive": False, "heartbeat_late": False, "gone": "stopped cleanly"}) == "red"


def test_an_instance_whose_process_is_here_but_has_not_beaten_is_silent_everywhere_and_counted_gone(database_url, engine):
    """Its process runs on this host (stopped or hung: here a sleeping one), but its last heartbeat is an hour
    old: not gone (nothing proves it), yet not alive and beating either."""
    import subprocess
    import sys
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.registry import process_key
    from auditctl.report import fleet_figures
    from auditctl.schema import workers

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with write_transaction(engine) as connection:
            hour_ago = fetch_now(connection) - timedelta(hours=1)
            connection.execute(insert(workers).values(
                instance_id=uuid.uuid4().hex, worker_id="hung-1", host="here", pid=sleeper.pid,
                process_key=process_key(sleeper.pid), started_at=hour_ago, last_heartbeat_at=hour_ago))
        (record,) = as_json(on(database_url, "workers", "--format", "json"))
        assert (record["alive"], record["heartbeat_late"], record["gone"]) == (True, True, None), record
        (line,) = [line for line in on(database_url, "workers", "-o", "wide").stdout.splitlines() if "hung-1" in line]
        assert " silent " in line and "has not beaten within its stale_after" in line, line
        figures = fleet_figures(engine)
        assert (figures.workers_alive, figures.workers_gone) == (0, 1)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_heartbeat_a_little_ahead_of_the_database_clock_is_no_problem_in_list_but_one_far_ahead_is(database_url, start_audit,
                                                                                                     backdate):
    """A writer's clock 30 s ahead is within the tolerance the stuck rules allow (60 s); 10 minutes is not."""
    near, _ = start_audit(target="https://near.example")
    far, _ = start_audit(target="https://far.example")
    backdate(near, heartbeat_at=-30)
    backdate(far, heartbeat_at=-600)
    problems = {r["id"]: r["problems"] for r in as_json(on(database_url, "list", "--format", "json"))}
    assert "heartbeat_in_future" not in problems[near] and "heartbeat_in_future" in problems[far], problems


def test_a_pending_audit_lists_no_step_or_percentage_whatever_its_progress_document_still_holds(database_url, engine):
    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction

    with write_transaction(engine) as connection:
        connection.execute(insert(audits).values(
            target="https://queued.example", status="pending", created_at=fetch_now(connection), attempts=1,
            progress={"progress": {"step": "Port scan", "percentage": 40.0}}))
    (record,) = as_json(on(database_url, "list", "--format", "json"))
    assert (record["status"], record["step"], record["percentage"]) == ("pending", None, None), record


def test_list_since_and_until_as_moments_take_audits_created_at_exactly_those_moments(database_url, engine):
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.timestamps import isoformat_z

    with write_transaction(engine) as connection:
        start = fetch_now(connection).replace(microsecond=0) - timedelta(hours=2)
        end = start + timedelta(hours=1)
        connection.execute(insert(audits), [
            {"target": f"https://{name}.example", "status": "pending", "attempts": 0, "created_at": at}
            for name, at in (("before", start - timedelta(seconds=1)), ("at-start", start), ("at-end", end),
                             ("after", end + timedelta(seconds=1)))])
    listed = as_json(on(database_url, "list", "--since", isoformat_z(start), "--until", isoformat_z(end), "--format", "json"))
    assert sorted(r["target"] for r in listed) == ["https://at-end.example", "https://at-start.example"]


def test_workers_lists_an_instance_never_heard_from_as_silent_whatever_the_retention(database_url, engine):
    """A registry row another tool wrote with no heartbeat and no stop time: not alive, gone for an unknown time."""
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        connection.execute(insert(workers).values(instance_id="never-heard", worker_id="mute-1",
                                                  started_at=fetch_now(connection) - timedelta(days=3)))
    (record,) = as_json(on(database_url, "workers", "--format", "json"))
    assert (record["instance_id"], record["alive"], record["gone"], record["last_heartbeat"]) == ("never-heard", False, None, None)


def test_show_lists_only_the_thresholds_an_audits_worker_declared(database_url, engine, start_audit):
    from sqlalchemy import update

    from auditctl.transactions import write_transaction

    quiet, _ = start_audit(target="https://quiet.example")
    declaring, _ = start_audit(target="https://declaring.example")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == declaring).values(declared_stale_after=120.0))
    shown = {audit_id: as_json(on(database_url, "show", str(audit_id), "--format", "json"))["declared_thresholds"]
             for audit_id in (quiet, declaring)}
    assert shown == {quiet: {}, declaring: {"stale_after": 120.0}}
    assert "declared_thresholds: -" in on(database_url, "show", str(quiet)).stdout


def test_list_gives_a_heartbeat_age_only_for_running_audits(database_url, engine, start_audit):
    from sqlalchemy import update

    from auditctl.transactions import write_transaction

    running, _ = start_audit(target="https://running.example")
    done, _ = start_audit(target="https://done.example")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == done).values(status="completed", finished_at=audits.c.heartbeat_at))
    ages = {r["id"]: r["heartbeat_age_seconds"] for r in as_json(on(database_url, "list", "--format", "json"))}
    assert ages[running] is not None and ages[done] is None, ages


def test_show_json_says_who_wrote_each_history_row_with_its_host_and_pid(database_url, engine, start_audit, backdate):
    import os
    import socket

    from auditctl.history import Actor
    from auditctl.recovery import recover_stuck
    from auditctl.thresholds import Thresholds

    audit_id, _ = start_audit()
    backdate(audit_id, heartbeat_at=3600, last_worker_update=3600, progress_changed_at=3600)
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))] == [audit_id]
    (event,) = as_json(on(database_url, "show", str(audit_id), "--format", "json"))["history"]
    assert (event["event"], event["actor"], event["host"], event["pid"]) == (
        "recovered", "auditctl recover", socket.gethostname(), os.getpid())


def test_workers_keeps_an_instance_stopped_within_a_day_whose_last_heartbeat_is_older(database_url, engine):
    """Gone since it stopped (23 hours ago), not since its last heartbeat (25 hours ago): still listed."""
    from datetime import timedelta

    from sqlalchemy import insert

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(workers).values(instance_id="stopped-late", worker_id="w-1", started_at=now - timedelta(hours=30),
                                                  last_heartbeat_at=now - timedelta(hours=25),
                                                  stopped_at=now - timedelta(hours=23)))
    assert [r["instance_id"] for r in as_json(on(database_url, "workers", "--format", "json"))] == ["stopped-late"]


def test_show_json_lists_an_audits_history_oldest_first_and_a_row_without_reasons_has_none(database_url, engine, start_audit,
                                                                                          backdate):
    from auditctl import leases
    from auditctl.errors import LeaseLost
    from auditctl.history import Actor
    from auditctl.recovery import recover_stuck
    from auditctl.thresholds import Thresholds

    audit_id, lease = start_audit()
    backdate(audit_id, heartbeat_at=3600, last_worker_update=3600, progress_changed_at=3600)
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), requeue=True)] == [audit_id]
    with pytest.raises(LeaseLost):
        leases.heartbeat(engine, lease, Actor("worker worker-1"))
    history = as_json(on(database_url, "show", str(audit_id), "--format", "json"))["history"]
    assert [(e["event"], e["reasons"]) for e in history] == [("requeued", ["stale_heartbeat"]), ("lease_lost", [])], history


def test_scan_as_markdown_lists_an_audits_reasons_in_one_cell_separated_by_commas(database_url, start_audit, backdate):
    audit_id, _ = start_audit(target="https://two-reasons.example")
    backdate(audit_id, created_at=7200, started_at=7200, heartbeat_at=3600, last_worker_update=3600, progress_changed_at=3600)
    result = on(database_url, "scan", "--format", "markdown")
    (row,) = [line for line in result.stdout.splitlines() if "two-reasons" in line]
    assert "| stale\\_heartbeat, max\\_age\\_exceeded |" in row and "\\n" not in row, row


def test_status_lines_show_the_database_path_escaped_when_it_holds_an_escape_sequence_or_a_bidi_control(tmp_path):
    # The URL is the operator's (a flag, AUDITCTL_DATABASE_URL, a config file someone else wrote): `config` showed it
    # escaped, while the status lines of every other command sent its escape sequences and bidi controls as they were.
    path = tmp_path / "fleet-\x1b[31mred-ce-ri-\u202egnp.db"
    url = f"sqlite:///{path}"
    for command in (["demo"], ["init"], ["scan"], ["watch", "--once"]):
        result = invoke(*command, "--database-url", url, color=True)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\u202e" not in result.output, f"{command}: {result.output!r}"
        assert "fleet-\\x1b[31mred-ce-ri-\\u202egnp.db" in result.output, f"{command}: {result.output!r}"
