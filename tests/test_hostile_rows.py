"""The hostile-row corpus: rows another tool wrote, next to valid stuck audits, on both engines.

Each class the hardening issue names (a time at the edge of the calendar, PostgreSQL's
infinities, a progress document nested thousands of levels deep, a task count too large
for a float, text in ``attempts``, escape sequences in every text column) sits in one table
with valid stuck audits. Every valid audit must be recovered, every command must exit
with at most one clear line, never a traceback, a long-running ``watch`` and a worker's
heartbeat thread must keep running, and no escape sequence may reach a terminal.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import all_rows, db_time, events, make_running, wait_for
from sqlalchemy import text

from auditctl import audits as audit_views
from auditctl.cli import cli
from auditctl.history import Actor
from auditctl.recovery import ResetFilters, recover_stuck, reset_failed
from auditctl.rules import find_stuck
from auditctl.thresholds import Thresholds

AUDITCTL = Path(sys.executable).parent / "auditctl"
T = Thresholds(stale_after=600, max_age=1800, stall_after=600)
ESCAPES = ["\x1b]0;pwned\x07", "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\", "\x1b[2J\x1b[H", "\x9b31m", "\u202e"]
HOSTILE_TEXT = "x" + "".join(ESCAPES) + "y"
DEEP = "[" * 5000 + "]" * 5000


def insert(engine, **values) -> int:
    """INSERT one running audit with raw SQL, as another tool would (PostgreSQL casts text to the column types)."""
    values = {"target": "https://other-tool.example", "status": "running", "attempts": 0, "lease": "other-tool", **values}
    postgres = engine.dialect.name == "postgresql"
    casts = {"progress": "jsonb", "recovery_info": "jsonb", "max_age_seconds": "double precision"}
    casts.update({c: "timestamptz" for c in ("created_at", "started_at", "heartbeat_at", "last_worker_update",
                                             "progress_changed_at", "finished_at")})
    placeholders = [f"CAST(:{name} AS {casts[name]})" if postgres and name in casts else f":{name}" for name in values]
    sql = f"INSERT INTO audits ({', '.join(values)}) VALUES ({', '.join(placeholders)})"
    with engine.begin() as connection:
        if postgres:
            return connection.execute(text(sql + " RETURNING id"), values).scalar_one()
        return connection.execute(text(sql), values).lastrowid


def ago(engine, seconds: float) -> str:
    return (db_time(engine) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stale_times(engine, seconds: float = 900) -> dict:
    moment = ago(engine, seconds)
    return {"created_at": moment, "started_at": moment, "heartbeat_at": moment, "last_worker_update": moment,
            "progress_changed_at": moment}


def corpus(engine) -> dict[str, int]:
    """One row of each hostile class, all of them silent long enough to be stuck if they can be judged."""
    postgres = engine.dialect.name == "postgresql"
    rows: dict[str, int] = {}
    edge_early, edge_late = "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"
    if postgres:
        rows["year 1 with an offset"] = insert(engine, **{**stale_times(engine), "started_at": edge_early})
        rows["infinity heartbeat"] = insert(engine, **{**stale_times(engine), "heartbeat_at": "infinity",
                                                       "last_worker_update": "infinity"})
        rows["-infinity heartbeat"] = insert(engine, **{**stale_times(engine), "heartbeat_at": "-infinity"})
        rows["-infinity start"] = insert(engine, **{**stale_times(engine), "started_at": "-infinity",
                                                    "created_at": "-infinity"})
    else:
        rows["year 1 with an offset"] = insert(engine, **{**stale_times(engine), "started_at": edge_early})
        rows["year 9999 with an offset"] = insert(engine, **{**stale_times(engine), "heartbeat_at": edge_late})
        rows["text in attempts"] = insert(engine, **stale_times(engine), attempts="many")
        rows["blob target"] = insert(engine, **stale_times(engine), target=b"\xff\xfe\x1b[2J")
        rows["odd time forms"] = insert(engine, created_at="20251101T000000Z", started_at="2025-11-01T00:00:00+0000",
                                        heartbeat_at="2025-11-01T00:00:00,5+00", last_worker_update="2025-11-01 00:00:00+00")
        rows["text that is not UTF-8"] = not_utf8 = insert(engine, **stale_times(engine))
        with engine.begin() as connection:  # SQLite keeps the bytes it is given as TEXT; Python cannot decode them
            connection.execute(text("UPDATE audits SET target = CAST(X'68747470733a2f2fff' AS TEXT), "
                                    "worker_id = CAST(X'77ff' AS TEXT), kind = CAST(X'6bff' AS TEXT), "
                                    "error = CAST(X'ff41' AS TEXT) WHERE id = :id"), {"id": not_utf8})
        rows["a time that is not UTF-8"] = bad_time = insert(engine, **stale_times(engine))
        with engine.begin() as connection:  # read through auditctl_utc, whose text arguments Python decodes strictly
            connection.execute(text("UPDATE audits SET heartbeat_at = CAST(X'323032362d31312d3330ff' AS TEXT), "
                                    "finished_at = CAST(X'ff' AS TEXT) WHERE id = :id"), {"id": bad_time})
        rows["a lone surrogate in the step"] = insert(engine, **stale_times(engine),
                                                      progress='{"progress": {"step": "S\\ud800", "percentage": 30}}')
    rows["deep progress"] = insert(engine, **stale_times(engine), progress=DEEP)
    rows["huge task counts"] = insert(engine, **stale_times(engine), progress=json.dumps(
        {"progress": {"step": "Crawl", "completed_tasks": 10**400, "total_tasks": 10**401}}))
    rows["escape sequences"] = insert(engine, **stale_times(engine), target=f"https://{HOSTILE_TEXT}.example",
                                      worker_id=HOSTILE_TEXT, error=HOSTILE_TEXT,
                                      progress=json.dumps({"progress": {"step": HOSTILE_TEXT, "percentage": 5}}))
    rows["nested recovery_info"] = insert(engine, **stale_times(engine), recovery_info=_nested_recovery_info(400))
    return rows


def _nested_recovery_info(depth: int) -> str:
    """What ~``depth`` recover/reset cycles of an earlier version left: each record nested in the next
    (built as text: Python's own encoder gives up on such depth)."""
    opening = '{"reason": "stale_heartbeat", "original_status": {"status": "running", "recovery_info": '
    return opening * depth + '{"reason": "stale_heartbeat"}' + "}}" * depth


def assert_no_escape_reaches_the_terminal(output: str) -> None:
    assert "\x1b" not in output and "\x9b" not in output and "\u202e" not in output and "\x07" not in output, repr(output)


def test_hostile_rows_do_not_stop_any_reader_and_every_valid_audit_is_recovered(engine, database_url):
    hostile = corpus(engine)
    valid = make_running(engine, 20, silent_for=900, worker_id="valid-worker", instance_id="valid-instance")

    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert set(valid) <= set(verdicts)
    for verdict in verdicts.values():  # every verdict can be shown
        verdict.explain(), verdict.problems, verdict.thresholds(), verdict.step, verdict.target  # noqa: B018
    listed = {a.id: a for a in audit_views.list_audits(engine, limit=None)}
    assert set(hostile.values()) | set(valid) <= set(listed)
    for audit_id in hostile.values():
        audit_views.get_audit(engine, audit_id)

    runner = CliRunner()
    for command in (["scan"], ["scan", "-o", "json"], ["scan", "-o", "csv"], ["scan", "-o", "markdown"], ["scan", "--wide"],
                    ["list", "--limit", "0"], ["list", "-o", "json", "--limit", "0"], ["recover", "--dry-run"],
                    ["reset-all", "--dry-run"], ["workers"],
                    *[["show", str(audit_id)] for audit_id in hostile.values()],
                    *[["show", "-o", "markdown", str(audit_id)] for audit_id in hostile.values()]):
        result = runner.invoke(cli, [*command, "--database-url", database_url], catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
        assert "Traceback" not in result.output
        if "json" not in command:
            assert_no_escape_reaches_the_terminal(result.output)
        else:
            json.loads(result.stdout)

    done = recover_stuck(engine, T, actor=Actor.command("test"))
    recovered = {r.id for r in done}
    assert set(valid) <= recovered, "a hostile row must never keep valid audits from recovery"
    states = {r["id"]: r["status"] for r in all_rows(engine)}
    assert all(states[i] == "failed" for i in valid)
    for name, audit_id in hostile.items():
        # Judged by what the database can read: recovered, or listed as needing an operator, never silently stuck.
        assert audit_id in recovered or audit_id in {s.id for s in done.skipped} or audit_id not in verdicts, name
    assert {e["audit_id"] for e in events(engine) if e["event"] == "recovered"} >= set(valid)
    reset = reset_failed(engine, actor=Actor.command("test"))
    assert set(valid) <= {r.id for r in reset}


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("requeue", [False, True], ids=["failed", "requeued"])
def test_an_audit_whose_lease_is_not_utf8_is_recovered_once_like_any_other(engine, requeue):
    """SQLite keeps the bytes another tool gives it as TEXT. Read back with replacement characters, the
    lease never matched the recovery's fenced UPDATE as text: the audit was reported as needing an
    operator on every pass, and stayed running for good."""
    odd, plain = insert(engine, **stale_times(engine), lease="x"), insert(engine, **stale_times(engine), lease="plain-lease")
    with engine.begin() as connection:
        connection.execute(text("UPDATE audits SET lease = CAST(X'6c65617365ff00fe' AS TEXT) WHERE id = :id"), {"id": odd})

    done = recover_stuck(engine, T, actor=Actor.command("test"), requeue=requeue)

    assert sorted(r.id for r in done) == [odd, plain] and list(done.skipped) == []
    states = {r["id"]: r["status"] for r in all_rows(engine)}
    assert states[odd] == states[plain] == ("pending" if requeue else "failed")
    recovered = [e for e in events(engine) if e["audit_id"] == odd]
    assert [e["event"] for e in recovered] == ["requeued" if requeue else "recovered"]
    assert recover_stuck(engine, T, actor=Actor.command("test")) == [], "each audit is recovered exactly once"


def test_list_since_reads_an_odd_creation_time_as_the_time_it_is_and_only_odd_ones_through_python(engine, monkeypatch):
    """A creation time another tool wrote with an offset compares as the moment it names; rows whose
    times are all canonical compare their text in SQL (through Python, a million of them took 25 s)."""
    from auditctl import timestamps

    now = db_time(engine)

    def stored(seconds_ago: float):  # as auditctl writes it: canonical text on SQLite
        moment = now - timedelta(seconds=seconds_ago)
        return moment if engine.dialect.name == "postgresql" else timestamps.to_storage(moment)

    odd = insert(engine, created_at=(now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+02:00"))  # an hour ago
    recent, old = insert(engine, created_at=stored(3600)), insert(engine, created_at=stored(3 * 3600))
    plain = [insert(engine, created_at=stored(60 + i)) for i in range(20)]
    calls = []
    canonical = timestamps.canonical
    monkeypatch.setattr(timestamps, "canonical", lambda value: calls.append(value) or canonical(value))
    engine.dispose()  # the function is registered as connections open

    def listed(since: float) -> set[int]:
        return {a.id for a in audit_views.list_audits(engine, audit_views.AuditFilters(since=since), limit=None)}

    assert listed(2 * 3600) == {odd, recent, *plain}
    assert listed(30 * 60) == set(plain)
    assert listed(4 * 3600) == {odd, recent, old, *plain}
    if engine.dialect.name == "sqlite":
        from_sql = [value for value in calls if isinstance(value, bytes)]  # what auditctl_utc was given
        assert from_sql == [from_sql[0]] * 3 and b"+02:00" in from_sql[0], "only the odd row goes through Python"


def test_hostile_rows_do_not_stop_a_long_running_watch_or_a_workers_heartbeat_thread(engine, database_url, guards, tmp_path):
    corpus(engine)
    first = make_running(engine, 5, silent_for=900, worker_id="valid-worker", instance_id="valid-instance")
    guard = guards(worker_id="neighbour", heartbeat_interval=0.3, stale_after=600, max_age=3600, stall_after=600)
    guard.start_heartbeat_monitor(handle_sigterm=False)
    watch = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "0.5s", "--refresh", "0.5s", "--database-url", database_url],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "watching" in watch.stdout.readline()  # up, with its signal handlers in place
        wait_for(lambda: all(r["status"] == "failed" for r in all_rows(engine) if r["id"] in first), timeout=30,
                 message="the first valid audits to be recovered")
        later = make_running(engine, 5, silent_for=900, worker_id="valid-worker", instance_id="valid-instance")
        wait_for(lambda: all(r["status"] == "failed" for r in all_rows(engine) if r["id"] in later), timeout=30,
                 message="audits that went stuck later to be recovered too: watch is still at work")
        assert watch.poll() is None, "watch keeps running"
        assert guard._thread is not None and guard._thread.is_alive(), "the heartbeat thread keeps running"
    finally:
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err
    assert "Traceback" not in out + err
    assert_no_escape_reaches_the_terminal(out + err)


def test_a_workers_startup_cleanup_survives_hostile_rows(engine, guards, caplog):
    corpus(engine)
    valid = make_running(engine, 3, silent_for=900, worker_id="valid-worker", instance_id="valid-instance")
    guard = guards(worker_id="fresh-worker", stale_after=600, max_age=1800, stall_after=600, heartbeat_interval=60)
    recovered = {r.id for r in guard.cleanup_stuck_audits_on_startup()}
    assert set(valid) <= recovered
    assert_no_escape_reaches_the_terminal(caplog.text)


def recover_reset_cycles(engine, start_audit, backdate, cycles: int) -> None:
    from auditctl import leases

    audit_id, _ = start_audit()
    sizes = []
    for cycle in range(cycles):
        backdate(audit_id, started_at=900, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
        (recovery,) = recover_stuck(engine, T, actor=Actor.command("test"), gone={})
        assert recovery.id == audit_id
        with engine.connect() as connection:
            sizes.append(len(connection.execute(text("SELECT CAST(recovery_info AS TEXT) FROM audits WHERE id = :id"),
                                                {"id": audit_id}).scalar()))
        assert reset_failed(engine, actor=Actor.command("test"), filters=ResetFilters(ids=(audit_id,), max_resets=None))
        leases.claim(engine, audit_id, worker_id="worker-1", instance_id=f"instance-{cycle}", worker_url=None)
    assert max(sizes) < 4096, "recovery_info stays small however often an audit is recovered and reset"
    assert max(sizes) - min(sizes) < 200, f"and does not grow: {min(sizes)}..{max(sizes)} bytes"
    history = events(engine, audit_id)
    assert [e["event"] for e in history].count("recovered") == cycles, "the chain lives in the history, one row per event"


@pytest.mark.long
def test_recover_reset_cycles_keep_recovery_info_under_a_fixed_size(engine, start_audit, backdate):
    recover_reset_cycles(engine, start_audit, backdate, 200)  # the whole thousand: the slow variant below


@pytest.mark.slow
def test_a_thousand_recover_reset_cycles_keep_recovery_info_under_a_fixed_size(engine, start_audit, backdate):
    recover_reset_cycles(engine, start_audit, backdate, 1000)


def test_existing_deeply_nested_recovery_info_is_read_safely_and_replaced_by_a_bounded_one(engine):
    audit_id = insert(engine, **stale_times(engine), recovery_info=_nested_recovery_info(490))
    detail = audit_views.get_audit(engine, audit_id)  # readable, never a RecursionError
    assert detail.recovery_info is not None
    (recovery,) = recover_stuck(engine, T, actor=Actor.command("test"))
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT CAST(recovery_info AS TEXT) FROM audits WHERE id = :id"), {"id": audit_id}).scalar()
    assert len(stored) < 4096 and "recovery_info" not in json.loads(stored)["original_status"]


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_odd_time_forms_on_sqlite_are_judged_like_python_reads_them(engine):
    """A fresh audit written with ``+0000``, ``+00``, the basic format or a comma decimal is not 'never heard from'."""
    now = db_time(engine)
    forms = {
        "basic": now.strftime("%Y%m%dT%H%M%SZ"),
        "+0000": now.strftime("%Y-%m-%dT%H:%M:%S+0000"),
        "+00": now.strftime("%Y-%m-%dT%H:%M:%S+00"),
        "comma": now.strftime("%Y-%m-%dT%H:%M:%S,%f+00:00"),
        "T and Z": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    fresh = {name: insert(engine, created_at=value, started_at=value, heartbeat_at=value, last_worker_update=value,
                          progress_changed_at=value) for name, value in forms.items()}
    old = (now - timedelta(seconds=900)).strftime("%Y%m%dT%H%M%SZ")
    stale = insert(engine, created_at=old, started_at=old, heartbeat_at=old)
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert not set(fresh.values()) & set(verdicts), {n: verdicts[i].explain() for n, i in fresh.items() if i in verdicts}
    assert verdicts[stale].reasons == ["stale_heartbeat"] and 899 < verdicts[stale].silence_seconds < 960


def test_an_audit_another_tool_gave_id_zero_or_below_is_listed_shown_and_recovered(engine, database_url):
    for audit_id in (0, -3):
        insert(engine, id=audit_id, **stale_times(engine))
    runner = CliRunner()
    scan = runner.invoke(cli, ["scan", "-o", "json", "--database-url", database_url], catch_exceptions=False)
    assert [r["id"] for r in json.loads(scan.stdout)] == [-3, 0]
    for audit_id in (0, -3):
        shown = runner.invoke(cli, ["show", "-o", "json", "--database-url", database_url, "--", str(audit_id)],
                              catch_exceptions=False)
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["id"] == audit_id
    assert sorted(r.id for r in recover_stuck(engine, T, actor=Actor.command("test"))) == [-3, 0]


def test_escape_sequences_are_shown_not_executed_in_every_human_format(engine, database_url):
    audit_id = insert(engine, **stale_times(engine), target=f"https://{HOSTILE_TEXT}.example", worker_id=HOSTILE_TEXT,
                      error=HOSTILE_TEXT, progress=json.dumps({"progress": {"step": HOSTILE_TEXT}}))
    # DEL is the one terminal-active character that is ASCII: a record of plain ASCII text is escaped too.
    insert(engine, **stale_times(engine), target="https://del\x7fete.example", worker_id="w\x7f")
    runner = CliRunner()
    for args in (["scan", "-o", "table"], ["scan", "-o", "plain"], ["scan", "--wide"], ["scan", "-o", "markdown"],
                 ["scan", "-o", "csv"], ["list", "-o", "table"], ["show", str(audit_id)], ["recover", "--dry-run"]):
        result = runner.invoke(cli, [*args, "--database-url", database_url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert_no_escape_reaches_the_terminal(result.output)
        assert "x1b]0;pwned" in result.output.replace("\\", ""), f"{args}: the sequence is shown, escaped"
    as_json = runner.invoke(cli, ["scan", "-o", "json", "--database-url", database_url], catch_exceptions=False)
    records = json.loads(as_json.stdout)
    assert [r["target"] for r in records] == [f"https://{HOSTILE_TEXT}.example", "https://del\x7fete.example"], "exact"
    assert "\u202e" not in as_json.stdout and "\x9b" not in as_json.stdout, "escaped inside JSON strings"
    assert "\x7f" not in as_json.stdout and "del\\u007fete" in as_json.stdout


#: Invisible characters (Unicode's default-ignorables) that are not format controls: a grapheme joiner,
#: the Hangul fillers, variation selectors, Khmer inherent vowels, a Mongolian free variation selector.
INVISIBLE = "\u034f\u115f\u1160\u3164\uffa0\ufe00\ufe0f\U000e0100\u17b4\u180b"


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)  # rendering, not the engine
def test_invisible_fillers_and_selectors_are_shown_escaped_when_a_target_or_worker_id_holds_them(engine, database_url):
    # "worker-1" and "worker-1" + a Hangul filler or a variation selector look the same on a terminal.
    target, worker = "https://pay\u034fments.example/" + INVISIBLE, "worker-1\u3164\ufe0f"
    audit_id = insert(engine, **stale_times(engine), target=target, worker_id=worker)
    runner = CliRunner()
    for args in (["scan", "--wide"], ["scan", "-o", "markdown"], ["scan", "-o", "csv"], ["list", "--wide"],
                 ["show", str(audit_id)], ["recover", "--dry-run", "--wide"]):
        result = runner.invoke(cli, [*args, "--database-url", database_url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert not re.search(f"[{INVISIBLE}]", result.output), f"{args}: {ascii(result.output)}"
        assert "pay\\u034fments.example/\\u034f\\u115f" in result.output.replace("\\\\", "\\"), f"{args}: {result.output}"
        assert "worker-1\\u3164\\ufe0f" in result.output.replace("\\\\", "\\"), f"{args}: {result.output}"
    as_json = runner.invoke(cli, ["scan", "-o", "json", "--database-url", database_url], catch_exceptions=False)
    assert [(r["target"], r["worker_id"]) for r in json.loads(as_json.stdout)] == [(target, worker)], "exact"
    assert not re.search(f"[{INVISIBLE}]", as_json.stdout), "escaped inside JSON strings"


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)  # rendering, not the engine
def test_text_with_combining_accents_is_not_cut_when_its_column_holds_it(engine, database_url):
    # "wo\u0308rker-5" (decomposed, as macOS writes file names) is 9 characters in 8 cells: it was cut to
    # "wörker-…" in a column 8 cells wide, even with --wide, hiding which worker it was.
    worker = "wo\u0308rker-5"
    insert(engine, **stale_times(engine), worker_id=worker, target="https://cafe\u0301.example")
    runner = CliRunner()
    for args in (["scan", "--wide"], ["scan", "-o", "plain"], ["list", "--wide"]):
        result = runner.invoke(cli, [*args, "--database-url", database_url], catch_exceptions=False, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert worker in result.stdout and "https://cafe\u0301.example" in result.stdout, f"{args}: {result.stdout}"


def test_a_newline_another_tool_stored_cannot_forge_a_line_of_a_listing(engine, database_url):
    forged = "https://a.example\n 13  https://spoof.example  stale_heartbeat  worker-9"
    insert(engine, **stale_times(engine, 3600), target=forged, worker_id="w1\nw2", error="boom\nerror: fake")
    runner = CliRunner()
    for args in (["scan", "-o", "plain"], ["scan", "--wide"], ["scan", "-o", "markdown"], ["list", "-o", "plain"],
                 ["list", "--wide"], ["recover", "--dry-run", "-o", "plain"]):
        result = runner.invoke(cli, [*args, "--database-url", database_url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        lines = [line.strip() for line in result.stdout.splitlines()]
        assert not [line for line in lines if line.startswith(("13 ", "w2", "error: fake"))], f"{args}:\n{result.stdout}"
        assert "w1\\nw2" in result.stdout.replace("\\\\", "\\"), f"{args}: the newline is shown, escaped"
        if args[0] == "scan" and "markdown" not in args:
            # A cell of several values still puts each on its own line.
            assert [line for line in lines if line.startswith("max_age_exceeded")], f"{args}: the second reason under the first"
    wide = runner.invoke(cli, ["list", "--wide", "--database-url", database_url], catch_exceptions=False).stdout
    assert "https://a.example\\n 13  https://spoof.example  stale_heartbeat  worker-9" in wide
    assert "boom\\nerror: fake" in wide


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(engine, database_url):
    for target in ("=HYPERLINK(\"https://evil.example\")", "+1+1", "-2", "@SUM(A1)"):
        insert(engine, **stale_times(engine), target=target)
    result = CliRunner().invoke(cli, ["scan", "-o", "csv", "--database-url", database_url], catch_exceptions=False)
    import csv
    import io

    targets = [row["target"] for row in csv.DictReader(io.StringIO(result.stdout))]
    assert sorted(targets) == sorted(["'=HYPERLINK(\"https://evil.example\")", "'+1+1", "'-2", "'@SUM(A1)"])
    assert all(not re.match(r"[=+\-@]", t) for t in targets)


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_slow_reader_of_a_long_json_listing_gets_valid_json_whatever_the_idle_timeout(engine, database_url):
    """A consumer that pauses longer than PostgreSQL's idle-in-transaction timeout (here 1 s, set through
    the URL's own options, which auditctl merges with its own) still gets the whole array: no transaction
    is held open while output is written."""
    from auditctl.rules import PAGE_SIZE

    make_running(engine, PAGE_SIZE + 500, silent_for=900)  # two pages
    url = database_url + ("&" if "?" in database_url else "?") + "options=-c%20idle_in_transaction_session_timeout%3D1000"
    process = subprocess.Popen([str(AUDITCTL), "scan", "-o", "json", "--database-url", url], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    first = process.stdout.read(65536)
    time.sleep(2.0)  # the writer is blocked on a full pipe in the middle of the first page
    rest = process.stdout.read()
    code = process.wait(timeout=60)
    assert code == 0, process.stderr.read()
    assert len(json.loads(first + rest)) == PAGE_SIZE + 500


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_times_python_cannot_hold_read_as_unreadable_and_every_other_time_exactly(engine):
    """PostgreSQL hands the verdict its times as text: infinity, a moment before year 1 in UTC
    and year 10000 must come out unreadable (not absent, not another year), the rest to the
    microsecond."""
    from datetime import datetime, timezone

    exact = "2025-11-01T06:07:08.123456+02:00"
    rows = {
        "exact": insert(engine, **{**stale_times(engine), "started_at": exact, "heartbeat_at": "2025-11-01T04:07:09Z"}),
        "infinity": insert(engine, **{**stale_times(engine), "heartbeat_at": "infinity"}),
        "before year 1": insert(engine, **{**stale_times(engine), "started_at": "0001-01-01T00:00:00+14:00"}),
        "year 10000": insert(engine, **{**stale_times(engine), "heartbeat_at": "10000-01-01T00:00:00Z"}),
    }
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert set(rows.values()) <= set(verdicts)
    exact_verdict = verdicts[rows["exact"]]
    assert exact_verdict.started_at == datetime(2025, 11, 1, 4, 7, 8, 123456, tzinfo=timezone.utc)
    assert exact_verdict.last_heartbeat == datetime(2025, 11, 1, 4, 7, 9, tzinfo=timezone.utc)
    assert not [p for p in exact_verdict.problems if "unreadable" in p]
    assert "heartbeat_at_unreadable" in verdicts[rows["infinity"]].problems
    assert verdicts[rows["infinity"]].last_heartbeat is None
    assert "started_at_unreadable" in verdicts[rows["before year 1"]].problems
    assert "heartbeat_at_unreadable" in verdicts[rows["year 10000"]].problems


@pytest.mark.parametrize("engine_name", ["sqlite"])  # PostgreSQL's integer column holds only integers
@pytest.mark.parametrize("counter", ["'many'", "X'00'"])
def test_a_reset_counter_another_tool_made_unreadable_counts_as_no_reset(engine, database_url, counter):
    audit_id = insert(engine, **stale_times(engine), status="failed")
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE audits SET resets = {counter} WHERE id = :id"), {"id": audit_id})
    shown = CliRunner().invoke(cli, ["show", str(audit_id), "-o", "json", "--database-url", database_url])
    assert json.loads(shown.stdout)["resets"] == 0
    done = CliRunner().invoke(cli, ["reset-all", "--yes", "--database-url", database_url])
    assert done.exit_code == 0 and "Reset 1 audit to pending." in done.stderr, done.output
    assert {r["id"]: r["status"] for r in all_rows(engine)}[audit_id] == "pending"


def test_a_document_of_megabytes_is_shown_cut_to_people_and_whole_as_json(engine, database_url):
    from webtools import running_dashboard

    big = json.dumps({"progress": {"step": "A" * 2_000_000, "percentage": 5}})
    audit_id = insert(engine, **stale_times(engine), target="https://" + "t" * 100_000, progress=big)
    human = CliRunner().invoke(cli, ["show", str(audit_id), "-o", "plain", "--database-url", database_url])
    assert human.exit_code == 0 and len(human.stdout) < 100_000, len(human.stdout)
    assert "more characters not shown; --format json has the whole document" in human.stdout
    assert f"({len('https://') + 100_000 - 2000:,} more characters)" in human.stdout  # the target, cut as a table cell is
    whole = CliRunner().invoke(cli, ["show", str(audit_id), "-o", "json", "--database-url", database_url])
    assert json.loads(whole.stdout)["progress"]["progress"]["step"] == "A" * 2_000_000
    for fmt in ("wide", "markdown"):  # every column, nothing cut, as in the listings
        uncut = CliRunner().invoke(cli, ["show", str(audit_id), "-o", fmt, "--database-url", database_url])
        assert "t" * 100_000 in uncut.stdout and "A" * 2_000_000 in uncut.stdout and "more characters" not in uncut.stdout
    with running_dashboard(database_url) as server:
        page = server.get(f"/fragments/audits/{audit_id}")
    assert page.status == 200 and len(page.text) < 200_000 and "more characters not shown" in page.text


def test_a_time_python_cannot_read_is_skipped_by_the_rules_on_both_engines(engine):
    """A BC or -infinity time on PostgreSQL is judged as SQLite judges a time it cannot parse: the
    rules go on to the next trustworthy time, so the silence is measured from that one."""
    postgres = engine.dialect.name == "postgresql"
    unreadable, never = ("0044-03-15 BC", "-infinity") if postgres else ("the ides of March", "long ago")
    recent = stale_times(engine, 100)
    rows = {
        "unreadable heartbeat, silent": insert(engine, **{**stale_times(engine, 900), "heartbeat_at": unreadable}),
        "unreadable heartbeat, recent update": insert(engine, **{**recent, "heartbeat_at": unreadable}),
        "no readable start": insert(engine, **{**recent, "started_at": never, "created_at": never}),
    }
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    silent = verdicts[rows["unreadable heartbeat, silent"]]
    assert silent.reasons == ["stale_heartbeat"]
    assert silent.silence_seconds == pytest.approx(900, abs=30)
    assert "heartbeat_at_unreadable" in silent.problems
    assert rows["unreadable heartbeat, recent update"] not in verdicts
    assert rows["no readable start"] not in verdicts


def test_an_invalid_per_audit_threshold_is_flagged_and_the_next_source_judges(engine, database_url):
    nan = float("nan") if engine.dialect.name == "postgresql" else "NaN"
    audit_id = insert(engine, **stale_times(engine, 900), max_age_seconds=nan)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audits SET declared_stale_after = -5, declared_stall_after = 0, "
                                "declared_max_age = 120 WHERE id = :id"), {"id": audit_id})
    (verdict,) = find_stuck(engine, T)
    expected = ["max_age_seconds_invalid", "declared_stale_after_invalid", "declared_stall_after_invalid"]
    assert [p for p in verdict.problems if p.endswith("_invalid")] == expected
    assert verdict.thresholds()["stale_after"] == {"seconds": 600.0, "source": "fleet"}
    assert verdict.thresholds()["max_age"] == {"seconds": 120.0, "source": "worker"}
    shown = CliRunner().invoke(cli, ["show", str(audit_id), "-o", "json", "--database-url", database_url])
    assert [p for p in json.loads(shown.stdout)["problems"] if p.endswith("_invalid")] == expected


@pytest.mark.parametrize("column", ["max_age_seconds", "declared_stale_after", "declared_stall_after", "declared_max_age"])
def test_a_zero_per_audit_threshold_is_ignored_so_a_healthy_audit_is_not_stuck(engine, column):
    """Zero is no duration: taken at its word, it would make an audit that beat a second ago stuck."""
    healthy = insert(engine, **stale_times(engine, 5), **{column: 0})
    assert healthy not in [verdict.id for verdict in find_stuck(engine, T)]
    silent = insert(engine, **stale_times(engine, 900), **{column: 0})
    (verdict,) = [v for v in find_stuck(engine, T) if v.id == silent]
    assert f"{column}_invalid" in verdict.problems


def test_a_status_another_tool_wrote_is_shown_as_text_in_the_error_of_a_claim(engine, guards):
    """``run`` of an audit that is not pending says what it is: the status is the database's text."""
    from auditctl.errors import AuditNotClaimable

    audit_id = insert(engine, **stale_times(engine), status="p\x1b]0;pwned\x07\x1b[2J\u202e")  # PostgreSQL: 32 at most
    guard = guards()
    with pytest.raises(AuditNotClaimable) as raised:
        with guard.run(audit_id):
            pass
    assert_no_escape_reaches_the_terminal(str(raised.value))
    assert "x1b]0;pwned" in str(raised.value).replace("\\", ""), "shown, escaped"


def test_a_live_peer_whose_instance_id_another_tool_filled_with_escapes_is_logged_as_text(engine, guards, caplog):
    """The duplicate worker_id warning names the other instance: its id is the database's text."""
    import socket

    from sqlalchemy import insert as sql_insert

    from auditctl.sqlfunctions import db_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import workers

    with write_transaction(engine) as connection:
        connection.execute(sql_insert(workers).values(
            instance_id="\x1b[2J\x1b]0;x\x07", worker_id="worker-1", host=socket.gethostname(), pid=4194301,
            process_key="another-boot:4026531836:4194301:12345", started_at=db_now(), last_heartbeat_at=db_now()))
    caplog.set_level("ERROR", logger="auditctl")
    guard = guards(worker_id="worker-1", stale_after=600, max_age=1800, stall_after=600, heartbeat_interval=60)
    guard.cleanup_stuck_audits_on_startup()
    assert [peer.instance_id for peer in guard.duplicates] == ["\x1b[2J\x1b]0;x\x07"]
    assert "also used by a live instance" in caplog.text
    assert_no_escape_reaches_the_terminal(caplog.text)


@pytest.mark.parametrize("engine_name", ["sqlite"])  # PostgreSQL's integer columns hold only integers
def test_a_huge_float_another_tool_stored_as_a_pid_or_attempts_is_shown_as_unreadable_not_301_digits(engine, database_url):
    """1e300 in ``attempts`` or a ``pid`` is a whole number to Python: ``show`` printed
    ``attempts: 1000000000000000052504...`` and ``workers`` a PID of 301 digits."""
    audit_id = insert(engine, **stale_times(engine), attempts=1e300)
    now = db_time(engine).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO workers (instance_id, worker_id, host, pid, started_at, last_heartbeat_at) "
                                "VALUES ('huge-pid', 'other-tool', 'h', 1e300, :now, :now)"), {"now": now})
        connection.execute(text("INSERT INTO audit_events (audit_id, at, event, actor, host, pid) "
                                "VALUES (:id, :now, 'reset', 'other-tool', 'h', -1e300)"), {"id": audit_id, "now": now})
    runner = CliRunner()
    for args in (["show", str(audit_id)], ["show", str(audit_id), "-o", "json"], ["list"], ["list", "-o", "json"],
                 ["workers"], ["workers", "-o", "json"], ["scan"], ["scan", "-o", "json"]):
        result = runner.invoke(cli, [*args, "--database-url", database_url])
        assert result.exit_code == 0, (args, result.output)
        assert not re.search(r"\d{30}", result.stdout), (args, result.stdout[:2000])
    shown = json.loads(runner.invoke(cli, ["show", str(audit_id), "-o", "json", "--database-url", database_url]).stdout)
    assert shown["attempts"] == 0 and "attempts_not_a_number" in shown["problems"]
    (instance,) = [i for i in json.loads(runner.invoke(cli, ["workers", "-o", "json", "--database-url", database_url]).stdout)
                   if i["instance_id"] == "huge-pid"]
    assert instance["pid"] is None


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_status_another_tool_stored_as_bytes_is_counted_with_the_same_status_as_text(engine):
    """SQL groups a BLOB 'running' apart from the text one; the counts add them, not keep the last group."""
    from auditctl.overview import count_by_status

    ids = make_running(engine, 3)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audits SET status = CAST('running' AS BLOB) WHERE id = :id"), {"id": ids[0]})
    assert count_by_status(engine)["running"] == 3


def test_a_history_row_whose_documents_another_tool_stored_as_lists_reads_as_having_none(engine):
    from auditctl import history

    (audit_id,) = make_running(engine, 1)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))
    with engine.begin() as connection:
        doc = "'[1, 2]'" if engine.dialect.name == "sqlite" else "'[1, 2]'::jsonb"
        connection.execute(text(f"UPDATE audit_events SET measurements = {doc}, details = {doc} WHERE audit_id = :id"),
                           {"id": audit_id})
    (event,) = history.events_for(engine, audit_id)
    assert event.event == "recovered" and event.measurements is None and event.details is None


def test_a_reset_counter_another_tool_set_to_the_columns_largest_value_does_not_stop_the_reset(engine, database_url):
    """PostgreSQL's ``resets`` is a 32-bit integer: ``resets + 1`` on 2,147,483,647 failed the whole
    batch ("integer out of range; it needs an operator") under ``--max-resets 0`` (no limit)."""
    odd, plain = insert(engine, **stale_times(engine), status="failed"), insert(engine, **stale_times(engine), status="failed")
    with engine.begin() as connection:
        connection.execute(text("UPDATE audits SET resets = 2147483647 WHERE id = :id"), {"id": odd})
    done = CliRunner().invoke(cli, ["reset-all", "--yes", "--max-resets", "0", "--database-url", database_url])
    assert done.exit_code == 0 and "Reset 2 audits to pending." in done.stderr, done.output
    rows = {r["id"]: r for r in all_rows(engine)}
    assert rows[odd]["status"] == rows[plain]["status"] == "pending"
    assert rows[odd]["resets"] == 2147483647 and rows[plain]["resets"] == 1
