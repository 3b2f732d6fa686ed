"""Bad input gets a clear answer and nothing is lost.

Rows here are written the way another tool would write them: raw SQL straight into the
``audits`` table, bypassing the library's types and checks. Reading, judging and
recovering them must never crash; what cannot be trusted is flagged. Bad settings and
unreachable databases fail with one clear error that never shows a password.
"""

from __future__ import annotations

import os

import logging
from datetime import UTC, datetime, timedelta

import pytest
from dbtools import all_rows, db_time, raw_column, row, worker_rows
from sqlalchemy import text
from sqlalchemy.engine import make_url

from auditctl import StuckAuditPrevention, history, leases
from auditctl import audits as audit_views
from auditctl.db import create_engine
from auditctl.errors import AuditNotFound, ConfigError, DatabaseUnavailable, SchemaMissing
from auditctl.history import Actor
from auditctl.migrate import upgrade
from auditctl.recovery import recover_stuck, reset_failed
from auditctl.rules import find_stuck
from auditctl.thresholds import Thresholds, parse_duration

T = Thresholds(stale_after=600, max_age=1800, stall_after=600)
OPERATOR = Actor.command("recover")
TIME_COLUMNS = ("created_at", "started_at", "heartbeat_at", "last_worker_update", "progress_changed_at", "finished_at")
PG_CASTS = {"progress": "jsonb", "recovery_info": "jsonb", "max_age_seconds": "double precision",
            **{name: "timestamptz" for name in TIME_COLUMNS}}


def insert_raw(engine, **values) -> int:
    """INSERT one audit with raw SQL, as another tool would; returns its id."""
    values = {"target": "https://other-tool.example", "status": "running", "attempts": 0, **values}
    postgres = engine.dialect.name == "postgresql"
    placeholders = [f"CAST(:{name} AS {PG_CASTS[name]})" if postgres and name in PG_CASTS else f":{name}" for name in values]
    sql = f"INSERT INTO audits ({', '.join(values)}) VALUES ({', '.join(placeholders)})"
    with engine.begin() as connection:
        if postgres:
            return connection.execute(text(sql + " RETURNING id"), values).scalar_one()
        return connection.execute(text(sql), values).lastrowid


def iso_ago(engine, seconds: float) -> str:
    """The database's now minus ``seconds``, as the ISO text other tools write (``...Z``)."""
    return (db_time(engine) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def running_since(engine, *, heard: float = 700, started: float | None = None, **values) -> int:
    """A running audit from another tool, started ``started`` and last heard from ``heard`` seconds ago."""
    started = heard if started is None else started
    times = {"created_at": iso_ago(engine, started), "started_at": iso_ago(engine, started),
             "heartbeat_at": iso_ago(engine, heard), "last_worker_update": iso_ago(engine, heard),
             "progress_changed_at": iso_ago(engine, heard), "lease": "lease-from-other-tool", "worker_id": "other-tool"}
    return insert_raw(engine, **{**times, **values})


def never_crash_anywhere(engine, audit_id):
    """Every reader and the recoverer handle the row; returns (verdict or None, summary, detail)."""
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    summaries = {s.id: s for s in audit_views.list_audits(engine, limit=None)}
    detail = audit_views.get_audit(engine, audit_id)
    listed, shown = summaries[audit_id], detail.summary
    assert (listed.status, listed.step, listed.percentage, listed.problems) == (shown.status, shown.step, shown.percentage,
                                                                               shown.problems)
    return verdicts.get(audit_id), summaries[audit_id], detail


# --- the progress column ------------------------------------------------------------------

# (name, value on SQLite, value on PostgreSQL (JSONB cannot hold broken JSON), problems, step, percentage)
BAD_PROGRESS = [
    # On PostgreSQL the broken text can only be stored as a JSON string: a document, but not an object.
    ("truncated JSON", '{"progress": {"step": "Crawl', '"{\\"progress\\": {\\"step\\": \\"Crawl"',
     {"sqlite": ["progress_not_json"], "postgresql": ["progress_not_object"]}, None, None),
    ("JSON array", "[1, 2, 3]", "[1, 2, 3]", ["progress_not_object"], None, None),
    ("JSON number", "42", "42", ["progress_not_object"], None, None),
    ("progress not an object", '{"progress": "half done"}', '{"progress": "half done"}', ["progress_not_object"], None, None),
    ("SQL NULL", None, None, [], None, None),
    ("JSON null", "null", "null", [], None, None),
    ("wrong types", '{"progress": {"percentage": "abc", "step": 42}}', '{"progress": {"percentage": "abc", "step": 42}}',
     ["step_not_text", "percentage_invalid"], "42", None),
    ("percentage 250", '{"progress": {"step": "Crawling", "percentage": 250}}',
     '{"progress": {"step": "Crawling", "percentage": 250}}', ["percentage_out_of_range"], "Crawling", 100.0),
    ("percentage -3", '{"progress": {"percentage": -3}}', '{"progress": {"percentage": -3}}',
     ["percentage_out_of_range"], None, 0.0),
    # A bare NaN is not JSON (SQLite keeps the text); JSONB can only hold the string "NaN".
    ("percentage NaN", '{"progress": {"percentage": NaN}}', '{"progress": {"percentage": "NaN"}}',
     {"sqlite": ["progress_not_json"], "postgresql": ["percentage_invalid"]}, None, None),
    ("bad task counts", '{"progress": {"completed_tasks": -1, "total_tasks": "ten"}}',
     '{"progress": {"completed_tasks": -1, "total_tasks": "ten"}}', ["completed_tasks_invalid", "total_tasks_invalid"],
     None, None),
    ("counts only", '{"progress": {"completed_tasks": 3, "total_tasks": 4}}',
     '{"progress": {"completed_tasks": 3, "total_tasks": 4}}', [], None, 75.0),
    ("no wrapper", '{"step": "Crawling", "percentage": 40}', '{"step": "Crawling", "percentage": 40}', [], "Crawling", 40.0),
    # Every field well typed (what auditctl writes), but more done than there is to do.
    ("completed over total", '{"progress": {"step": "Crawling", "percentage": 50.0, "completed_tasks": 30, "total_tasks": 20}}',
     '{"progress": {"step": "Crawling", "percentage": 50.0, "completed_tasks": 30, "total_tasks": 20}}',
     ["completed_over_total"], "Crawling", 50.0),
    # Two documents one after the other: JSON text holds one value (jsonb cannot store it; a string there).
    ("two documents", '{"progress": {"step": "a"}} {"progress": {"step": "b"}}',
     '"{\\"progress\\": {}} {}"', {"sqlite": ["progress_not_json"], "postgresql": ["progress_not_object"]}, None, None),
]


@pytest.mark.parametrize("name, sqlite_value, pg_value, problems, step, percentage", BAD_PROGRESS,
                         ids=[case[0] for case in BAD_PROGRESS])
def test_any_progress_value_is_read_judged_flagged_and_recovered_without_crashing(
        engine, engine_name, name, sqlite_value, pg_value, problems, step, percentage):
    audit_id = running_since(engine, progress=sqlite_value if engine_name == "sqlite" else pg_value)

    verdict, summary, detail = never_crash_anywhere(engine, audit_id)
    if isinstance(problems, dict):
        problems = problems[engine_name]

    assert verdict is not None and verdict.reasons == ["stale_heartbeat"]  # judged by the columns it can trust
    assert verdict.problems == problems
    assert summary.problems == problems
    assert (verdict.step, verdict.percentage) == (step, percentage)
    assert (summary.step, summary.percentage) == (step, percentage)

    raw_before = raw_column(engine, audit_id, "progress")
    (recovery,) = recover_stuck(engine, T, actor=OPERATOR)
    assert recovery.id == audit_id
    after = row(engine, audit_id)
    assert after["status"] == "failed"
    if isinstance(after["progress"], dict) and isinstance(after["progress"].get("progress"), dict):
        assert after["progress"]["progress"].pop("is_running") is False
        assert after["progress"] == detail.progress  # everything else kept as it was
    else:
        assert raw_column(engine, audit_id, "progress") == raw_before  # another tool's value is left exactly as is
    assert after["recovery_info"]["original_status"]["progress"] == detail.progress


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_binary_progress_on_sqlite_is_flagged_and_does_not_block_recovery(engine):
    blob = insert_raw(engine, created_at=iso_ago(engine, 700), progress=b"\xff\xfe\x00garbage")
    good = running_since(engine)

    verdict, summary, detail = never_crash_anywhere(engine, blob)
    assert verdict.problems == ["progress_not_json", "no_lease"]
    assert summary.problems == ["progress_not_json"]
    assert isinstance(detail.progress, str)  # shown as text (with replacement characters), not raw bytes

    assert sorted(r.id for r in recover_stuck(engine, T, actor=OPERATOR)) == [blob, good]
    assert raw_column(engine, blob, "progress") == b"\xff\xfe\x00garbage"
    assert isinstance(row(engine, blob)["recovery_info"]["original_status"]["progress"], str)


# --- times ----------------------------------------------------------------------------------


def test_heartbeat_in_the_future_is_distrusted_flagged_and_judged_from_the_start(engine):
    old = running_since(engine, started=700, heard=-86400)
    young = running_since(engine, started=30, heard=-86400)

    verdict, summary, _ = never_crash_anywhere(engine, old)
    assert verdict.reasons == ["stale_heartbeat"]
    assert 699 < verdict.silence_seconds < 720  # measured from the start, not from a day ahead
    assert "heartbeat_in_future" in verdict.problems
    assert summary.heartbeat_age_seconds < -86000
    assert [v.id for v in find_stuck(engine, T)] == [old]  # the young one is judged fresh, not stale
    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR)] == [old]
    assert row(engine, young)["status"] == "running"


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_naive_and_odd_timestamp_text_on_sqlite_is_read_as_utc(engine):
    # PostgreSQL's timestamptz cannot hold a naive time; on SQLite other tools write any text.
    naive = (db_time(engine) - timedelta(seconds=700)).strftime("%Y-%m-%dT%H:%M:%S")
    stale = insert_raw(engine, created_at=naive, started_at=naive, heartbeat_at=naive, lease="l1")
    fresh_text = (db_time(engine) - timedelta(seconds=100)).strftime("%Y-%m-%d %H:%M:%S")
    fresh = insert_raw(engine, created_at=fresh_text, started_at=fresh_text, heartbeat_at=fresh_text, lease="l2")
    new_year = insert_raw(engine, created_at="2026-01-01T00:00:00", started_at="2026-01-01T00:00:00",
                          heartbeat_at="2026-01-01T00:00:00", lease="l3")
    offset = insert_raw(engine, created_at=iso_ago(engine, 50), heartbeat_at=(db_time(engine) + timedelta(hours=2)).strftime(
        "%Y-%m-%dT%H:%M:%S+02:00"), lease="l4")  # two hours ahead, written in UTC+2: really now
    garbage = insert_raw(engine, created_at=iso_ago(engine, 50), started_at="yesterday", heartbeat_at="", lease="l5")

    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert 699 < verdicts[stale].silence_seconds < 720
    assert verdicts[stale].reasons == ["stale_heartbeat"]
    assert fresh not in verdicts and offset not in verdicts and garbage not in verdicts
    assert verdicts[new_year].reasons == ["stale_heartbeat", "max_age_exceeded"]
    assert verdicts[new_year].started_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert audit_views.get_audit(engine, new_year).summary.started_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert audit_views.get_audit(engine, garbage).summary.started_at is None  # unreadable: shown as unknown
    assert audit_views.get_audit(engine, garbage).summary.age_seconds < 60  # aged from its creation instead

    assert sorted(r.id for r in recover_stuck(engine, T, actor=OPERATOR)) == [stale, new_year]
    assert {r["id"]: r["status"] for r in all_rows(engine)} == {stale: "failed", fresh: "running", new_year: "failed",
                                                              offset: "running", garbage: "running"}


def test_running_audit_without_start_time_is_aged_from_its_creation(engine):
    audit_id = running_since(engine, heard=5, started=4000, started_at=None)
    verdict, summary, _ = never_crash_anywhere(engine, audit_id)
    assert verdict.reasons == ["max_age_exceeded"]
    assert 3999 < verdict.age_seconds < 4020 and verdict.started_at is None
    assert 3999 < summary.age_seconds < 4020


def test_running_audit_with_nothing_but_a_creation_time_is_judged_stale(engine):
    audit_id = insert_raw(engine, created_at=iso_ago(engine, 700))
    verdict, summary, _ = never_crash_anywhere(engine, audit_id)
    assert verdict.reasons == ["stale_heartbeat"]
    assert "no_lease" in verdict.problems
    assert summary.last_heartbeat is None and summary.heartbeat_age_seconds is None
    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR)] == [audit_id]


def test_running_audit_without_lease_is_flagged_and_still_recovered_once(engine):
    audit_id = running_since(engine, lease=None)
    verdict, _, detail = never_crash_anywhere(engine, audit_id)
    assert "no_lease" in verdict.problems and detail.has_lease is False
    assert [r.id for r in recover_stuck(engine, T, actor=OPERATOR)] == [audit_id]
    assert recover_stuck(engine, T, actor=OPERATOR) == []
    assert [e.event for e in history.events_for(engine, audit_id)] == ["recovered"]


def test_unknown_status_is_listed_but_never_judged_or_recovered(engine):
    zombie = running_since(engine, heard=90000, status="zombie")
    before = row(engine, zombie)

    verdict, summary, detail = never_crash_anywhere(engine, zombie)

    assert verdict is None
    assert summary.status == "zombie" and detail.summary.status == "zombie"
    assert [s.id for s in audit_views.list_audits(engine, status="zombie")] == [zombie]
    assert recover_stuck(engine, T, actor=OPERATOR) == []
    assert reset_failed(engine, actor=OPERATOR) == []
    assert row(engine, zombie) == before


def test_unreadable_per_audit_deadline_falls_back_to_the_fleet_max_age(engine, engine_name):
    # SQLite accepts any text in a REAL column; PostgreSQL accepts NaN and Infinity.
    unreadable = ["abc", "-5", "0"] if engine_name == "sqlite" else ["NaN", "Infinity", "-5"]
    ids = [running_since(engine, heard=5, started=2000, max_age_seconds=value) for value in unreadable]
    deep = running_since(engine, heard=5, started=2000, max_age_seconds="7200")

    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert sorted(verdicts) == ids
    assert all(verdicts[i].reasons == ["max_age_exceeded"] and verdicts[i].max_age_seconds == 1800 for i in ids)
    for audit_id in ids:
        audit_views.get_audit(engine, audit_id)
    assert sorted(r.id for r in recover_stuck(engine, T, actor=OPERATOR)) == ids
    assert row(engine, deep)["status"] == "running"


def test_one_table_full_of_bad_rows_is_read_and_recovered_in_one_pass(engine, engine_name):
    ids = [running_since(engine, progress=case[1] if engine_name == "sqlite" else case[2]) for case in BAD_PROGRESS]
    ids.append(running_since(engine, heard=-86400, started=700))
    ids.append(running_since(engine, started_at=None))
    ids.append(running_since(engine, lease=None, worker_id=None))
    zombie = running_since(engine, status="zombie")
    healthy = leases.create_audit(engine, "https://example.com")

    assert sorted(v.id for v in find_stuck(engine, T)) == ids
    assert len(audit_views.list_audits(engine, limit=None)) == len(ids) + 2
    for audit_id in ids + [zombie, healthy]:
        audit_views.get_audit(engine, audit_id)
    assert sorted(r.id for r in recover_stuck(engine, T, actor=OPERATOR, batch_size=4)) == ids
    assert find_stuck(engine, T) == []
    assert sorted(r.id for r in reset_failed(engine, actor=OPERATOR)) == ids


# --- bad database URLs --------------------------------------------------------------------


def _chain(error: BaseException) -> str:
    """The text of an exception and everything chained to it (what a traceback could show)."""
    parts = []
    while error is not None and len(parts) < 10:
        parts.append(f"{type(error).__name__}: {error!s} {error!r}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


UNREACHABLE = "postgresql://user:s3cret@127.0.0.1:1/x"


@pytest.mark.parametrize("operation", ["find_stuck", "list_audits", "recover_stuck", "upgrade", "guard"])
def test_unreachable_server_is_one_clear_error_naming_the_masked_url(operation, caplog):
    caplog.set_level(logging.DEBUG)
    engine = create_engine(UNREACHABLE)
    calls = {
        "find_stuck": lambda: find_stuck(engine, T),
        "list_audits": lambda: audit_views.list_audits(engine),
        "recover_stuck": lambda: recover_stuck(engine, T, actor=OPERATOR),
        "upgrade": lambda: upgrade(engine),
        "guard": lambda: StuckAuditPrevention(UNREACHABLE, worker_id="w"),
    }
    with pytest.raises(DatabaseUnavailable) as caught:
        calls[operation]()
    message = str(caught.value)
    assert message.startswith("database unavailable at postgresql://user:***@127.0.0.1:1/x: ")  # as the user typed it
    assert "s3cret" not in _chain(caught.value)
    assert "s3cret" not in caplog.text


def test_wrong_credentials_or_missing_directory_is_database_unavailable(engine_name, database_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    if engine_name == "postgresql":
        real_password = make_url(database_url).password
        wrong = make_url(database_url).set(password="s3cret").render_as_string(hide_password=False)
        expected = make_url(wrong).render_as_string(hide_password=True)
    else:
        real_password = None
        wrong = f"sqlite:///{tmp_path}/no-such-directory/auditctl.db"
        expected = f"{tmp_path}/no-such-directory/auditctl.db"
    with pytest.raises(DatabaseUnavailable) as caught:
        find_stuck(create_engine(wrong), T)
    with pytest.raises(DatabaseUnavailable):
        StuckAuditPrevention(wrong, worker_id="w")
    assert expected in str(caught.value)
    for secret in filter(None, ["s3cret", real_password]):
        assert secret not in _chain(caught.value)
        assert secret not in caplog.text


@pytest.mark.parametrize("url", ["mysql://user:s3cret@db.example.com/audits", "oracle://user:s3cret@db/x",
                                 "not a database url", "s3cret"])
def test_unsupported_or_unreadable_url_is_a_config_error(url):
    with pytest.raises(ConfigError) as caught:
        create_engine(url)
    with pytest.raises(ConfigError):
        StuckAuditPrevention(url, worker_id="w")
    if "://" in url:
        assert "unsupported database" in str(caught.value) and "sqlite:///" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    else:
        assert "cannot read the database URL" in str(caught.value) and "sqlite:///" in str(caught.value)


def test_an_engine_handed_where_the_url_goes_is_refused_saying_to_pass_its_url(tmp_path):
    """The guard said "cannot read the database URL 'Engine(sqlite:///...)'", as if the text were mistyped."""
    engine = create_engine(f"sqlite:///{tmp_path / 'given.db'}")
    try:
        with pytest.raises(ConfigError) as caught:
            StuckAuditPrevention(engine, worker_id="w")
        assert str(caught.value) == "the database URL must be text or a SQLAlchemy URL, not Engine (pass engine.url)"
        with pytest.raises(ConfigError, match="not int$"):
            create_engine(5432)
        guard = StuckAuditPrevention(engine.url, worker_id="w")  # as the message says
        guard.close()
    finally:
        engine.dispose()

@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true",
                                 "sqlite:////tmp/named.db?vfs=memdb", "sqlite:///file:named%3Fmode%3Dmemory?uri=true"])
def test_an_in_memory_sqlite_database_is_refused_as_nothing_would_outlive_the_process(url, tmp_path):
    with pytest.raises(ConfigError, match="in-memory SQLite database"):
        create_engine(url)
    with pytest.raises(ConfigError, match="in-memory"):
        StuckAuditPrevention(url, worker_id="w")
    from click.testing import CliRunner

    from auditctl.cli import cli

    result = CliRunner().invoke(cli, ["init", "--database-url", url], env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert result.exit_code == 2 and "in-memory" in result.output and "Schema created" not in result.output


def test_a_sqlite_url_with_uri_true_and_mode_ro_reads_the_named_file_and_creates_no_other(engine_name, database_url, tmp_path):
    if engine_name != "sqlite":
        pytest.skip("SQLite URLs only")
    path = database_url.removeprefix("sqlite:///")
    running_since(create_engine(database_url), heard=700)
    before = sorted(p.name for p in tmp_path.iterdir())
    for query in ("?uri=true&mode=ro", "?mode=ro&uri=true&timeout=5", "?mode=ro"):
        reader = create_engine(f"sqlite:///{path}{query}", role="reader")
        assert len(find_stuck(reader, T)) == 1, query
        with pytest.raises(DatabaseUnavailable, match="readonly"):
            recover_stuck(create_engine(f"sqlite:///{path}{query}"), T, actor=OPERATOR)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no file named after the query string"


def test_a_sqlite_url_option_sqlite_does_not_take_is_a_config_error_naming_it_without_the_password():
    with pytest.raises(ConfigError) as caught:
        create_engine("sqlite:///audits.db?bogus=1&password=s3cret")
    assert "bogus, password" in str(caught.value) and "s3cret" not in str(caught.value)
    create_engine("sqlite:///audits.db?timeout=5&mode=ro&uri=true", role="operator").dispose()  # all known: accepted


def test_a_creation_window_compares_a_naive_time_as_utc_and_refuses_only_a_backwards_one():
    from datetime import timezone

    from auditctl.audits import AuditFilters
    from auditctl.rules import Filters

    naive, aware = datetime(2020, 1, 1), datetime(2030, 1, 1, tzinfo=timezone.utc)
    for filters in (Filters, AuditFilters):
        filters(since=naive, until=aware)
        with pytest.raises(ConfigError, match="since is later than until"):
            filters(since=aware, until=naive)


def test_a_lock_wait_longer_than_the_databases_can_count_waits_as_long_as_they_can(database_url, engine_name):
    engine = create_engine(database_url, lock_wait=25 * 86400.0)  # past 2**31 milliseconds
    try:
        with engine.connect() as connection:
            if engine_name == "sqlite":
                assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2**31 - 1
            else:
                assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "2147483647ms"
    finally:
        engine.dispose()


# --- bad settings ---------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"heartbeat_interval": -1}, "heartbeat_interval: must be greater than zero"),
    ({"heartbeat_interval": timedelta(seconds=-5)}, "heartbeat_interval: must be greater than zero"),
    ({"stale_after": 0}, "stale_after: must be greater than zero"),
    ({"stale_after": "-5m"}, "stale_after: must be greater than zero"),
    ({"max_age": "abc"}, "max_age: cannot read 'abc' as a duration"),
    ({"stall_after": float("nan")}, "stall_after: nan is not a finite duration"),
    ({"stale_after": True}, "stale_after: expected a duration"),
    ({"max_age": [30]}, "max_age: expected a duration"),
    ({"max_age": 10**9}, "max_age: 1000000000 is longer than a year"),
    ({"stale_after": 700, "max_age": 600}, "stale_after (11m40s) is longer than max_age (10m)"),
    ({"stall_after": 2000, "max_age": 1800}, "stall_after (33m20s) is longer than max_age (30m)"),
    ({"heartbeat_interval": 600, "stale_after": 600}, "stale_after (10m) must be at least twice heartbeat_interval (10m)"),
    ({"heartbeat_interval": 400}, "stale_after (10m) must be at least twice heartbeat_interval (6m40s)"),
    ({"heartbeat_interval": 2, "kinds": {"quick": {"stale_after": 3}}},
     "stale_after of kind 'quick' (3s) must be at least twice heartbeat_interval (2s)"),
    ({"max_attempts": 0}, "max_attempts must be a whole number of at least 1"),
    ({"heartbeat_interval": 1e-9, "stale_after": 1}, "heartbeat_interval (0.000000001s) is below the floor of 100ms"),
    ({"kinds": {"deep": {"bogus": 1}}}, "kind deep: unknown setting 'bogus'"),
    ({"kinds": [1]}, "kinds must be a mapping of kind names to their thresholds, not list"),
    ({"kinds": {"": {"max_age": "1h"}}}, "a kind's name in kinds must be a non-empty string of at most 100 characters, not ''"),
    ({"kinds": {"k" * 101: {"max_age": "1h"}}}, "a kind's name in kinds must be a non-empty string of at most 100 characters"),
    ({"kinds": {5: {"max_age": "1h"}}}, "a kind's name in kinds must be a non-empty string of at most 100 characters, not int"),
    ({"kinds": {"deep": 5}}, "kind deep must be a table (a mapping) of stale_after, max_age or stall_after, not int"),
    ({"kinds": {"deep": {"stale_after": "2h", "max_age": "1h"}}}, "kind deep stale_after (2h) is longer than kind deep max_age (1h)"),
    ({"slack_webhook": 5}, "a webhook URL must be text, got int"),
    ({"worker_url": "http://w\udcff.example"}, "worker_url: not valid Unicode text"),
    ({"worker_url": "https://" + "x" * 70_000}, "worker_url must be text of at most 2000 characters"),
    ({"worker_id": ""}, "worker_id is empty"),
    ({"worker_id": "   "}, "worker_id is empty"),
    ({"worker_id": 0}, "worker_id must be text"),
    ({"requeue": "false"}, "requeue must be True or False, got 'false'"),
    ({"create_schema": "no"}, "create_schema must be True or False, got 'no'"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS, ids=[m.split(":")[0].split(" (")[0] + f"-{i}"
                                                                 for i, (_, m) in enumerate(BAD_SETTINGS)])
def test_invalid_durations_and_thresholds_are_a_clear_config_error_before_touching_the_database(engine, database_url,
                                                                                                 settings, message):
    with pytest.raises(ConfigError) as caught:
        StuckAuditPrevention(database_url, **{"worker_id": "w", **settings})
    assert message in str(caught.value)
    assert worker_rows(engine) == []  # nothing registered, nothing written


def test_a_kinds_short_stale_after_is_allowed_when_the_guards_own_stale_after_judges_its_audits(database_url):
    guard = StuckAuditPrevention(database_url, worker_id="w", heartbeat_interval=2, stale_after=10,
                                 kinds={"quick": {"stale_after": 3}})  # its claims declare 10s: the kind's 3s never judges them
    guard.close()


def test_a_sqlite_url_with_a_user_name_and_password_is_a_config_error_with_the_password_masked(tmp_path):
    with pytest.raises(ConfigError) as caught:
        StuckAuditPrevention(f"sqlite://alice:S3cretPW@/{tmp_path}/x.db", worker_id="w")
    assert "a SQLite URL takes no user name, password or port" in str(caught.value)
    assert "S3cretPW" not in str(caught.value) and not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("name", ["\udcff.db", "a\x00b.db"], ids=["not UTF-8", "NUL"])
def test_a_guard_given_a_database_url_no_file_can_be_named_by_says_so_and_creates_nothing(tmp_path, monkeypatch, name):
    """What the commands refuse as a usage error, the library refuses too: SQLite would otherwise
    create a file under a mangled name (a worker's URL from an environment that was not UTF-8)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the database URL: "):
        StuckAuditPrevention(f"sqlite:///{name}", worker_id="w")
    assert os.listdir(tmp_path) == []


def test_text_no_database_can_hold_and_ids_no_column_can_hold_are_clear_errors(engine, database_url):
    with pytest.raises(ConfigError, match="worker_id: not valid Unicode text"):
        StuckAuditPrevention(database_url, worker_id="w\udcff")  # an environment value that was not UTF-8
    assert worker_rows(engine) == []
    guard = StuckAuditPrevention(database_url, worker_id="w")
    try:
        with pytest.raises(ConfigError, match="target: not valid Unicode text"):
            guard.create_audit("https://example.com/\udcff")
        with pytest.raises(ConfigError, match="target: a NUL character is not allowed"):
            guard.create_audit("https://example.com/\x00")
        with pytest.raises(AuditNotFound, match=f"no audit with id {2**70}"):
            with guard.run(2**70):
                pass
        with pytest.raises(ConfigError, match="audit_id must be a whole number, not str"):
            with guard.run("5"):
                pass
    finally:
        guard.close()


def test_any_mapping_of_kinds_and_any_iterable_of_webhooks_is_taken(engine, database_url):
    from types import MappingProxyType

    guard = StuckAuditPrevention(database_url, worker_id="w", kinds=MappingProxyType({"deep": MappingProxyType({"max_age": "4h"})}),
                                 webhook=(url for url in ["https://hooks.example/a"]))
    try:
        assert dict(guard.policy.kinds)["deep"].max_age == 4 * 3600
        assert [d.kind for d in guard.notifier.destinations] == ["webhook"]
    finally:
        guard.close()


@pytest.mark.parametrize("text_value, seconds", [("45s", 45), ("10m", 600), ("1h30m", 5400), ("1.5", 1.5), (" 2d ", 172800),
                                                  ("250ms", 0.25), ("1h 30m", 5400), ("1e3", 1000), ("+300", 300),
                                                  ("10 m", 600)])
def test_duration_text_forms_are_understood(text_value, seconds):
    assert parse_duration(text_value) == seconds


@pytest.mark.parametrize("text_value", ["", "10x", "m10", "1h-5m", "ten minutes", "-0.5",
                                        # slips that used to read as something: 10m, 10m, 10m, 20m, 1000s
                                        "\u0661\u0660m", "\uff11\uff10m", "1 0m", "10m10m", "1_000"])
def test_unreadable_duration_text_is_a_config_error(text_value):
    with pytest.raises(ConfigError, match="duration|greater than zero"):
        Thresholds.parse(stale_after=text_value)


def test_invalid_audit_arguments_are_config_errors_and_write_nothing(engine):
    with pytest.raises(ConfigError, match="target"):
        leases.create_audit(engine, "   ")
    guard = StuckAuditPrevention(engine.url.render_as_string(hide_password=False), worker_id="w")
    try:
        with pytest.raises(ConfigError, match="max_age: must be greater than zero"):
            guard.create_audit("https://example.com", max_age=-1)
        with pytest.raises(ConfigError, match="max_age"):
            guard.create_audit("https://example.com", max_age="soon")
    finally:
        guard.close()
    assert all_rows(engine) == []


# --- a database without the schema ------------------------------------------------------------------


def test_missing_schema_says_run_auditctl_init(blank_database_url, engine_name):
    engine = create_engine(blank_database_url)
    try:
        calls = [
            lambda: find_stuck(engine, T),
            lambda: audit_views.list_audits(engine),
            lambda: audit_views.get_audit(engine, 1),
            lambda: recover_stuck(engine, T, actor=OPERATOR),
            lambda: reset_failed(engine, actor=OPERATOR),
            lambda: history.events_for(engine, 1),
            lambda: leases.create_audit(engine, "https://example.com"),
            lambda: StuckAuditPrevention(blank_database_url, worker_id="w", create_schema=False),
        ]
        for call in calls:
            with pytest.raises(SchemaMissing) as caught:
                call()
            assert "auditctl init" in str(caught.value)
            password = make_url(blank_database_url).password
            if password:
                assert password not in str(caught.value)

        guard = StuckAuditPrevention(blank_database_url, worker_id="w")  # the default creates the schema
        guard.close()
        assert audit_views.list_audits(engine) == []
        with pytest.raises(AuditNotFound):
            audit_views.get_audit(engine, 1)
    finally:
        engine.dispose()


@pytest.mark.parametrize("stored", ["infinite", "the largest integer", "text", "negative", "a fraction"])
def test_a_claim_starts_a_broken_attempts_counter_again_at_1(engine, stored):
    """``inf + 1`` kept an audit's counter infinite, so ``--max-attempts`` never fired (read as 0);
    on PostgreSQL ``2147483647 + 1`` refused every claim of the audit."""
    postgres = engine.dialect.name == "postgresql"
    if stored in ("infinite", "text", "a fraction") and postgres:
        pytest.skip("PostgreSQL's integer column cannot hold it")
    audit_id = leases.create_audit(engine, "https://example.com")
    value = {"infinite": "9e999", "the largest integer": "2147483647", "text": "'many'", "negative": "-4",
             "a fraction": "2.5"}[stored]
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE audits SET attempts = {value} WHERE id = :id"), {"id": audit_id})

    leases.claim(engine, audit_id, worker_id="worker-1", instance_id="instance-1", worker_url=None)

    assert raw_column(engine, audit_id, "attempts") == 1


@pytest.mark.parametrize("audit_id", [2**63, -(2**63) - 1, 10**30])
def test_an_audit_id_no_database_integer_holds_is_no_such_audit_not_a_driver_error(engine, audit_id):
    with pytest.raises(AuditNotFound, match=f"no audit with id {audit_id}"):
        audit_views.get_audit(engine, audit_id)
