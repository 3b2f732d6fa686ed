"""``auditctl report``: a generated month of history, read back as the operator would read it.

The month is written straight into the tables, in the shapes the library writes (a
recovery's history row and its ``recovery_info`` with the row as it was; a refused late
write; a requeue followed by a new run), with one planted pattern: worker-3 stalls at
step 'Port scan'. One test also makes a recovery and a refused write through the library
itself, so the generated shapes cannot drift from the real ones unnoticed.

The thresholds part learns from two kinds whose real durations differ, and its
false-recovery rates are recounted here from the generated values, independently.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tomllib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, text, update

from auditctl import leases
from auditctl.cli import cli
from auditctl.config import validate_config
from auditctl.errors import LeaseLost
from auditctl.history import Actor
from auditctl.learn import suggest_thresholds, to_toml
from auditctl.recovery import recover_stuck
from auditctl.report import percentile, stuck_report
from auditctl.schema import audit_events, audits, workers
from auditctl.sqlfunctions import fetch_now
from auditctl.textsafe import MAX_CELL
from auditctl.thresholds import Thresholds, parse_duration
from auditctl.timestamps import isoformat_z
from auditctl.transactions import read_connection, write_transaction

DAY = 86400.0
WORKERS = ["worker-1", "worker-2", "worker-3", "worker-4", "worker-5"]
STEPS = ["Crawling", "Fingerprinting", "Port scan", "Testing endpoints", "Report"]


def invoke(*args, **options):
    """``auditctl ARGS`` in-process; ``options`` (``env``, ``color``) go to ``CliRunner.invoke``."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, prog_name="auditctl", **options)


# --- a month of history ------------------------------------------------------------------


@dataclass
class Month:
    recoveries: int = 0
    silences: list[float] = field(default_factory=list)
    came_back: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)
    by_step: dict[str, int] = field(default_factory=dict)
    requeued_then_ran: int = 0


def _progress(step: str, percentage: float, at, running: bool) -> dict:
    stamp = isoformat_z(at)
    return {"progress": {"step": step, "percentage": percentage, "is_running": running, "heartbeat": stamp,
                         "last_updated": stamp}, "last_worker_update": stamp}


def make_month(engine, *, seed: int = 11) -> Month:
    """30 days: 24 audits completed a day, and 150 recoveries, 60 of them worker-3 stalling at 'Port scan'."""
    rng = random.Random(seed)
    month = Month()
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    rows, stuck = [], []
    for day in range(30):
        for _ in range(24):
            kind = rng.choice(["full-scan", "quick-scan"])
            run = rng.uniform(1800, 5400) if kind == "full-scan" else rng.uniform(60, 400)
            finished = now - timedelta(seconds=day * DAY + rng.uniform(3600, DAY - 3600))
            started = finished - timedelta(seconds=run)
            created = started - timedelta(seconds=rng.uniform(5, 300))
            worker = rng.choice(WORKERS)
            rows.append({"target": f"https://site-{rng.randint(1, 400)}.example.com", "status": "completed", "kind": kind,
                         "created_at": created, "started_at": started, "finished_at": finished, "heartbeat_at": finished,
                         "last_worker_update": finished, "progress_changed_at": finished, "attempts": 1,
                         "worker_id": worker, "worker_instance": uuid.uuid5(uuid.NAMESPACE_DNS, worker).hex,
                         "progress": _progress("Report", 100.0, finished, False),
                         "longest_gap_seconds": rng.uniform(20, 40), "longest_stall_seconds": rng.uniform(30, 200)})
    plan = ([("progress_stalled", "worker-3", "Port scan")] * 60
            + [("progress_stalled", None, None)] * 20 + [("stale_heartbeat", None, None)] * 40
            + [("max_age_exceeded", None, None)] * 20 + [("worker_gone", None, None)] * 10)
    for index, (reason, worker, step) in enumerate(plan):
        worker = worker or rng.choice(WORKERS)
        step = step or rng.choice(STEPS)
        at = now - timedelta(seconds=rng.uniform(2 * 3600, 30 * DAY - 3600))
        stalled = rng.uniform(700, 3000) if reason == "progress_stalled" else rng.uniform(0, 900)
        silence = rng.uniform(5, 60) if reason in ("progress_stalled", "max_age_exceeded") else rng.uniform(610, 2400)
        age = rng.uniform(1900, 4000) if reason == "max_age_exceeded" else max(stalled, silence) + rng.uniform(10, 600)
        requeued = index % 5 == 0
        month.recoveries += 1
        month.silences.append(round(silence, 3))
        month.by_worker[worker] = month.by_worker.get(worker, 0) + 1
        month.by_step[step] = month.by_step.get(step, 0) + 1
        stuck.append({"reason": reason, "worker": worker, "step": step, "at": at, "silence": silence, "stalled": stalled,
                      "age": age, "requeued": requeued, "came_back": index % 10 == 3, "lease": uuid.uuid4().hex})
    with write_transaction(engine) as connection:
        connection.execute(insert(audits), rows)
        first = connection.execute(select(audits.c.id).order_by(audits.c.id.desc()).limit(1)).scalar_one()
        for item in stuck:
            at, worker = item["at"], item["worker"]
            instance = uuid.uuid5(uuid.NAMESPACE_DNS, worker).hex
            started = at - timedelta(seconds=item["age"])
            heard = at - timedelta(seconds=item["silence"])
            reasons = [item["reason"]]
            measured = {"silence_seconds": round(item["silence"], 3), "age_seconds": round(item["age"], 3),
                        "stalled_seconds": round(item["stalled"], 3), "stale_after": 600.0, "max_age": 1800.0,
                        "stall_after": 600.0}
            original = {"id": None, "status": "running", "worker_id": worker, "worker_instance": instance,
                        "lease": item["lease"], "started_at": isoformat_z(started), "heartbeat_at": isoformat_z(heard),
                        "progress": _progress(item["step"], 40.0, heard, True), "recovery_info": None}
            info = {"recovered_at": isoformat_z(at), "reason": item["reason"], "reasons": reasons,
                    "explanation": [f"{item['reason']} (generated)"], "measured": measured, "thresholds": {},
                    "recovered_by": {"actor": "auditctl watch", "host": "monitor-1", "pid": 4242},
                    "requeued": item["requeued"], "original_status": original}
            row = {"target": f"https://stuck-{rng.randint(1, 50)}.example.com", "kind": rng.choice(["full-scan", "quick-scan"]),
                   "created_at": started - timedelta(seconds=30), "attempts": 1, "recovery_info": info,
                   "recovery_reasons": item["reason"]}
            if item["requeued"]:
                # Back in the queue, then run again to the end by another claim.
                again = at + timedelta(seconds=rng.uniform(60, 900))
                row.update(status="completed", started_at=again, finished_at=again + timedelta(seconds=300),
                           worker_id=rng.choice(WORKERS), progress=_progress("Report", 100.0, again, False))
                month.requeued_then_ran += 1
            else:
                row.update(status="failed", started_at=started, finished_at=at, worker_id=worker, worker_instance=instance,
                           heartbeat_at=heard, progress=_progress(item["step"], 40.0, heard, False),
                           error=f"recovered ({item['reason']})")
            audit_id = connection.execute(insert(audits).values(**row)).inserted_primary_key[0]
            assert audit_id > first
            connection.execute(insert(audit_events).values(
                audit_id=audit_id, at=at, event="requeued" if item["requeued"] else "recovered", from_status="running",
                to_status="pending" if item["requeued"] else "failed", reasons=",".join(reasons), measurements=measured,
                actor="auditctl watch", host="monitor-1", pid=4242,
                details={"from": {"status": "running", "worker_id": worker, "worker_instance": instance,
                                  "lease": item["lease"], "attempts": 1, "started_at": isoformat_z(started),
                                  "heartbeat_at": isoformat_z(heard)},
                         "explanation": info["explanation"], "thresholds": {}}))
            if item["came_back"]:
                month.came_back += 1
                connection.execute(insert(audit_events).values(
                    audit_id=audit_id, at=at + timedelta(seconds=20), event="lease_lost", from_status="failed",
                    to_status="failed", actor=f"worker {worker} ({instance[:8]})", host="scan-node", pid=1,
                    details={"write": "heartbeat", "lease": item["lease"], "worker_id": worker, "instance_id": instance}))
    return month


# --- the report --------------------------------------------------------------------------


def test_report_on_a_month_names_the_worker_and_step_made_to_stick_most(engine, database_url):
    month = make_month(engine)
    found = stuck_report(engine, 30 * DAY)

    assert found.recoveries == month.recoveries == 150
    assert found.bucket == "day" and sum(slot["count"] for slot in found.frequency) == 150
    assert found.by_worker[0].key == "worker-3" == max(month.by_worker, key=month.by_worker.get)
    assert found.by_worker[0].count == month.by_worker["worker-3"]
    assert found.by_step[0].key == "Port scan" == max(month.by_step, key=month.by_step.get)
    assert found.step_unknown == 0
    named = [o for o in found.outliers if o.dimension == "worker" and o.value == "worker-3"]
    assert named and named[0].reason == "progress_stalled" and named[0].within["value"] == "Port scan", found.outliers
    assert "worker-3 accounts for" in named[0].text and "'Port scan'" in named[0].text
    # Recounted from what was generated.
    assert found.detection.count == 150
    assert found.detection.mean_seconds == pytest.approx(sum(month.silences) / 150, abs=0.01)
    assert found.detection.p95_seconds == pytest.approx(percentile(month.silences, 0.95), abs=0.01)
    assert found.came_back == month.came_back == found.lease_lost_writes
    assert found.recovery.count == month.requeued_then_ran
    assert found.capacity.completed == 720 + month.requeued_then_ran

    text = invoke("report", "--database-url", database_url, "--since", "30d", "--format", "plain")
    assert text.exit_code == 0, text.output
    assert all(len(line) <= 80 for line in text.stdout.splitlines()), "plain output fits 80 columns"
    out = " ".join(text.stdout.split())  # sentences are wrapped to the width
    assert "worker-3 accounts for" in out and "at step 'Port scan'" in out
    assert "Per day" in out and "Verdict:" in out and "Assuming each worker runs one audit at a time" in out

    data = json.loads(invoke("report", "--database-url", database_url, "--since", "30d", "--format", "json").stdout)
    assert data["by_worker"][0]["key"] == "worker-3" and data["by_step"][0]["key"] == "Port scan"
    assert data["recoveries"] == 150 and data["bucket"] == "day"

    rows = list(csv.DictReader(io.StringIO(invoke("report", "--database-url", database_url, "--since", "30d",
                                                  "--format", "csv").stdout)))
    workers = [r for r in rows if r["section"] == "by_worker"]
    assert workers[0]["key"] == "worker-3" and int(workers[0]["count"]) == month.by_worker["worker-3"]
    assert sum(int(r["count"]) for r in rows if r["section"] == "per_day") == 150
    assert any(r["section"] == "outlier" and "Port scan" in r["detail"] for r in rows)


def test_report_reads_what_the_library_really_writes(engine, database_url, start_audit):
    """A recovery and a refused late write made by the library: step, worker and came-back are found."""
    audit_id, lease = start_audit(worker_id="worker-9")
    fields = {"step": "Port scan", "percentage": 10.0, "completed_tasks": None, "total_tasks": None}
    leases.write_progress(engine, lease, fields, "sig-1", None, Actor("worker worker-9"))
    with write_transaction(engine) as connection:
        moment = fetch_now(connection) - timedelta(seconds=900)
        connection.execute(update(audits).where(audits.c.id == audit_id)
                           .values(heartbeat_at=moment, last_worker_update=moment, progress_changed_at=moment))
    assert [r.id for r in recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))] == [audit_id]
    with pytest.raises(LeaseLost):
        leases.heartbeat(engine, lease, Actor("worker worker-9"))

    found = stuck_report(engine, DAY)
    assert found.bucket == "hour" and found.recoveries == 1
    assert (found.by_worker[0].key, found.by_step[0].key, found.by_target[0].key) == ("worker-9", "Port scan", "https://example.com")
    assert found.came_back == 1 and found.lease_lost_writes == 1
    assert found.detection.mean_seconds == pytest.approx(900, abs=5)


def test_report_on_an_empty_database_says_nothing_was_stuck(database_url):
    result = invoke("report", "--database-url", database_url, "--format", "plain")
    assert result.exit_code == 0, result.output
    assert "No audit was recovered as stuck in this window." in result.stdout
    assert "not enough history to size the fleet" in result.stdout


def test_report_neutralises_escape_sequences_and_survives_documents_another_tool_wrote(engine, database_url):
    make_month(engine)
    with write_transaction(engine) as connection:
        connection.execute(update(audit_events).where(audit_events.c.event == "recovered")
                           .values(details={"from": {"worker_id": "evil\x1b]0;owned\x07", "step": "x"}}))
        now = fetch_now(connection)
        connection.execute(insert(audit_events), [
            {"audit_id": 1, "at": now, "event": "recovered", "actor": "other tool", "reasons": "manual",
             "details": ["not", "an", "object"], "measurements": "just text"},
            {"audit_id": 2, "at": now, "event": "lease_lost", "actor": "other tool", "reasons": None,
             "details": {"lease": {"not": "text"}}, "measurements": [1, 2]},
        ])
        connection.execute(update(audits).where(audits.c.id == 1).values(recovery_info=["odd"]))
        if connection.dialect.name == "sqlite":  # text that is not JSON at all
            connection.exec_driver_sql("UPDATE audit_events SET measurements = 'not json{', details = '{broken' "
                                       "WHERE id = (SELECT MIN(id) FROM audit_events WHERE event = 'requeued')")
    result = invoke("report", "--database-url", database_url, "--since", "30d", "--format", "plain")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "evil\\x1b]0;owned\\x07" in result.stdout
    assert stuck_report(engine, 30 * DAY).recoveries == 151


def test_report_stale_after_flag_counts_alive_workers_as_the_environment_does(engine, database_url):
    """A worker last heard 20 minutes ago is alive under ``--stale-after 30m``: the capacity count must
    follow the flag (the threshold in force), as it follows AUDITCTL_STALE_AFTER, not the fleet's 10m."""
    with write_transaction(engine) as connection:
        heard = fetch_now(connection) - timedelta(minutes=20)
        connection.execute(insert(workers).values(instance_id=uuid.uuid4().hex, worker_id="worker-1",
                                                  started_at=heard - timedelta(hours=1), last_heartbeat_at=heard))

    def alive(*args, env=None):
        result = invoke("report", "--database-url", database_url, "--format", "json", *args, env=env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["capacity"]["workers_alive"]

    assert alive() == 0
    assert alive(env={"AUDITCTL_STALE_AFTER": "30m"}) == 1
    assert alive("--stale-after", "30m") == 1


@pytest.mark.parametrize("env", [{"NO_COLOR": "1", "TERM": "xterm"}, {"NO_COLOR": None, "TERM": "dumb"}])
@pytest.mark.parametrize("suggest", [[], ["--suggest-thresholds"]])
def test_report_on_a_terminal_prints_no_bold_under_no_color_or_a_dumb_terminal(engine, database_url, env, suggest):
    """The headings and the verdict are bold in a table, but NO_COLOR and TERM=dumb mean no escape
    codes at all, as for every listing."""
    with write_transaction(engine) as connection:  # something to learn from: a heading per kind
        now = fetch_now(connection)
        connection.execute(insert(audits), [{"target": "t", "status": "completed", "created_at": now, "attempts": 1,
                                             "started_at": now - timedelta(seconds=600), "finished_at": now}] * 3)
    styled = invoke("report", "--database-url", database_url, "--format", "table", *suggest, color=True,
                    env={"NO_COLOR": None, "TERM": "xterm"})
    assert "\x1b[1m" in styled.stdout  # what a terminal that takes colour gets
    result = invoke("report", "--database-url", database_url, "--format", "table", *suggest, color=True, env=env)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert result.stdout == re.sub("\x1b\\[[0-9;]*m", "", styled.stdout)


def completed_runs_of_kind(engine, kind: str, count: int = 25) -> None:
    """``count`` healthy completed runs of ``kind``: enough for --suggest-thresholds to propose for it."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [{"target": "t", "status": "completed", "kind": kind, "created_at": now,
                                             "started_at": now - timedelta(seconds=600 + i), "finished_at": now,
                                             "attempts": 1, "longest_gap_seconds": 20.0 + i,
                                             "longest_stall_seconds": 60.0 + i} for i in range(count)])


def test_suggested_toml_escapes_bidi_and_zero_width_characters_of_a_kind_name(engine, database_url):
    """A kind name with a right-to-left override, an isolate, a zero-width space or a BOM must not reach
    the terminal raw in its ``[kinds."..."]`` header (it would reorder or hide what is shown), and the
    escaped header is still the same key to TOML."""
    odd = "scan\u202egnp.exe\u2066x\u2069\u200b\u200f\u061c\ufeff"
    completed_runs_of_kind(engine, odd)
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    assert not re.search("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]", result.stdout), ascii(result.stdout)
    assert '[kinds."scan\\u202egnp.exe\\u2066x\\u2069\\u200b\\u200f\\u061c\\ufeff"]' in result.stdout
    assert set(validate_config(tomllib.loads(result.stdout), "suggested")["kinds"]) == {odd}


def test_what_stands_out_names_a_huge_target_clipped_as_the_by_target_table_does(engine, database_url, start_audit,
                                                                                  backdate):
    """Another tool stored a 2,000,000-character target, and it stands out: its sentence names it cut at
    ``MAX_CELL`` like a table cell, not in full (megabytes on the terminal); the JSON keeps the exact value."""
    huge = "https://example.com/" + "a" * 2_000_000
    for target in [huge] * 4 + ["https://other.example.com"]:
        audit_id, _lease = start_audit(target=target)
        backdate(audit_id, started_at=900, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    assert len(recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))) == 5

    (outlier,) = stuck_report(engine, DAY).outliers
    assert outlier.value == huge and outlier.dimension == "target"
    assert len(outlier.text) < MAX_CELL + 200 and "more characters" in outlier.text
    result = invoke("report", "--database-url", database_url, "--format", "plain")
    assert result.exit_code == 0, result.output
    stands_out = " ".join(result.stdout.split("What stands out", 1)[1].split("Capacity", 1)[0].split())
    assert stands_out.startswith("- target https://example.com/aaa") and "accounts for 80% of" in stands_out
    assert len(stands_out) < MAX_CELL + 200
    assert len(result.stdout) < 5 * MAX_CELL + 5_000, "every part of the report clips the target"


def _numbers(value, path="") -> list[tuple[str, float]]:
    """Every numeric leaf of a JSON value, with its path."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [leaf for index, item in enumerate(value) for leaf in _numbers(item, f"{path}[{index}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(path, float(value))]
    return []


def test_report_csv_carries_every_figure_of_the_json(engine, database_url):
    """README: json and csv give the same figures for dashboards. Every number of the JSON (each
    occurrence: a 0 in one place does not stand for a 0 elsewhere) must be a cell of the CSV."""
    make_month(engine)
    # Two windows: per day, and per hour (the last two days), with a leftover "(other)" target row.
    for since in ("30d", "2d"):
        data = json.loads(invoke("report", "--database-url", database_url, "--since", since, "--format", "json").stdout)
        rows = list(csv.DictReader(io.StringIO(invoke("report", "--database-url", database_url, "--since", since,
                                                      "--format", "csv").stdout)))
        cells = Counter(float(row[column]) for row in rows for column in ("count", "share", "value") if row[column])
        leaves = _numbers(data)
        missing = Counter(value for _path, value in leaves) - cells
        assert not missing, [path for path, value in leaves if value in missing]
        by = {(row["section"], row["key"]): row for row in rows}
        assert float(by[("totals", "recoveries")]["count"]) == data["recoveries"]
        assert float(by[("by_worker.came_back", "worker-3")]["count"]) == data["by_worker"][0]["extra"]["came_back"]
        assert float(by[("capacity", "arrivals")]["count"]) == data["capacity"]["arrivals"]  # whole numbers in count


def test_report_on_the_demo_fleet_sees_runs_of_minutes_that_finished_in_the_past(blank_database_url):
    """The demo's completed audits ran for minutes, hours ago: not for hours up to the second the demo
    was seeded. Else report says a run takes 4h35m, and --suggest-thresholds that the fleet's thresholds
    would have recovered every one of those healthy audits (a false-recovery rate of 1.0)."""
    from auditctl.db import create_engine

    assert invoke("demo", "--database-url", blank_database_url).exit_code == 0
    report = json.loads(invoke("report", "--database-url", blank_database_url, "--format", "json").stdout)
    assert report["capacity"]["completed"] == 6
    assert 5 * 60 <= report["capacity"]["mean_run_seconds"] <= 30 * 60
    learned = json.loads(invoke("report", "--database-url", blank_database_url, "--suggest-thresholds",
                                "--format", "json").stdout)
    (fleet,) = learned["kinds"]
    assert {name: p["current_false_recovery_rate"] for name, p in fleet["proposals"].items()} == {
        "stale_after": 0.0, "stall_after": 0.0, "max_age": 0.0}
    engine = create_engine(blank_database_url)
    try:
        with read_connection(engine) as connection:
            now = fetch_now(connection)
            runs = connection.execute(select(audits.c.started_at, audits.c.heartbeat_at, audits.c.finished_at)
                                      .where(audits.c.status == "completed")).all()
    finally:
        engine.dispose()
    for started, heard, finished in runs:
        assert finished == heard and finished < now - timedelta(hours=3)
        assert timedelta(minutes=5) <= finished - started <= timedelta(minutes=30)


def test_toml_format_needs_suggest_thresholds(database_url):
    result = invoke("report", "--database-url", database_url, "--format", "toml")
    assert result.exit_code == 2 and "--format toml goes with --suggest-thresholds" in result.stderr


# --- thresholds learned per kind -------------------------------------------------------------


@dataclass
class Kind:
    name: str
    interval: float
    gaps: list[float]
    stalls: list[float]
    runs: list[float]


def make_kinds(engine, *, seed: int = 7) -> dict[str, Kind]:
    """200 completed audits of each kind; quick scans take minutes, full scans an hour or more.

    Two quick scans of each measure are freaks, far past anything else: the proposals must
    not follow them, so they are the false recoveries the rate reports.
    """
    rng = random.Random(seed)
    kinds = {
        "quick-scan": Kind("quick-scan", 5.0, [rng.uniform(4, 12) for _ in range(198)] + [400.0, 500.0],
                           [rng.uniform(10, 40) for _ in range(198)] + [900.0, 1000.0],
                           [rng.uniform(60, 300) for _ in range(198)] + [7000.0, 8000.0]),
        # Full scans beat every two minutes (so stale_after has a floor of 4m above their gaps).
        "full-scan": Kind("full-scan", 120.0, [rng.uniform(30, 70) for _ in range(200)],
                          [rng.uniform(60, 600) for _ in range(200)], [rng.uniform(1800, 5400) for _ in range(200)]),
    }
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    rows = []
    for kind in kinds.values():
        for gap, stall, run in zip(kind.gaps, kind.stalls, kind.runs):
            finished = now - timedelta(seconds=rng.uniform(60, 20 * DAY))
            started = finished - timedelta(seconds=run)
            rows.append({"target": "https://example.com", "status": "completed", "kind": kind.name,
                         "created_at": started, "started_at": started, "finished_at": finished, "attempts": 1,
                         "declared_heartbeat_interval": kind.interval, "longest_gap_seconds": gap,
                         "longest_stall_seconds": stall, "worker_id": "worker-1"})
    with write_transaction(engine) as connection:
        connection.execute(insert(audits), rows)
    return kinds


def test_suggestions_differ_per_kind_with_false_recovery_rates_that_match_a_recount(engine, database_url):
    kinds = make_kinds(engine)
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    found = {item["kind"]: item for item in data["kinds"]}
    assert set(found) == set(kinds)
    measure = {"stale_after": "gaps", "stall_after": "stalls", "max_age": "runs"}
    for name, kind in kinds.items():
        item = found[name]
        assert item["enough"] and item["completed"] == 200
        for threshold, attribute in measure.items():
            proposal = item["proposals"][threshold]
            values = getattr(kind, attribute)
            # Recounted here: healthy audits that went past the proposal would have been recovered wrongly.
            wrong = sum(1 for v in values if v > proposal["seconds"])
            assert proposal["false_recoveries"] == wrong, (name, threshold)
            assert proposal["false_recovery_rate"] == pytest.approx(wrong / len(values))
            assert proposal["detection_latency_seconds"] == proposal["seconds"] + data["interval"]
            assert parse_duration(proposal["text"]) == proposal["seconds"]
            assert proposal["seconds"] >= max(values[:198])  # never below what ordinary runs showed
        assert item["proposals"]["stale_after"]["seconds"] >= 2 * kind.interval
        assert item["proposals"]["max_age"]["seconds"] >= max(item["proposals"]["stale_after"]["seconds"],
                                                             item["proposals"]["stall_after"]["seconds"])
    quick, full = found["quick-scan"]["proposals"], found["full-scan"]["proposals"]
    for threshold in measure:
        assert quick[threshold]["seconds"] < full[threshold]["seconds"], threshold
    # The freaks of quick-scan are the only false recoveries: 2 of 200 per measure.
    assert [quick[t]["false_recoveries"] for t in measure] == [2, 2, 2]
    assert found["quick-scan"]["false_recoveries"] == 2 and found["quick-scan"]["false_recovery_rate"] == 0.01
    # The declared heartbeat interval sets the floor where full scans' gaps would ask for less.
    assert full["stale_after"]["seconds"] == 240.0 and "heartbeat intervals" in full["stale_after"]["floor"]
    # The current fleet default (30m) would have recovered most full scans wrongly.
    assert full["max_age"]["current_false_recoveries"] == sum(1 for r in kinds["full-scan"].runs if r > 1800)


def test_suggested_toml_is_a_config_block_the_config_file_accepts(engine, database_url, tmp_path):
    make_kinds(engine)
    odd = 'deep scan "v2"'  # a kind name TOML must quote
    completed_runs_of_kind(engine, odd)
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    parsed = tomllib.loads(result.stdout)
    settings = validate_config(parsed, "suggested")
    assert set(settings["kinds"]) == {"quick-scan", "full-scan", odd}
    learned = suggest_thresholds(engine, 30 * DAY)
    for item in learned.kinds:
        block = settings["kinds"][item.kind]
        assert block.stale_after == item.proposals["stale_after"].seconds
        assert block.stall_after == item.proposals["stall_after"].seconds
        assert block.max_age == item.proposals["max_age"].seconds
    # Pasted into a config file, the commands take it: scan judges quick scans by the learned values.
    config = tmp_path / "config.toml"
    config.write_text(result.stdout)
    shown = invoke("--config", config, "report", "--database-url", database_url, "--suggest-thresholds", "--format", "json")
    now = {item["kind"]: item["proposals"]["stale_after"] for item in json.loads(shown.stdout)["kinds"]}
    assert now["quick-scan"]["current_source"] == "kind quick-scan"
    assert now["quick-scan"]["current_seconds"] == now["quick-scan"]["seconds"]


def test_suggestions_table_and_a_kind_with_too_little_history(engine, database_url):
    make_kinds(engine)
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [{"target": "t", "status": "completed", "kind": 'odd "kind"\x1b[2J',
                                             "created_at": now, "started_at": now - timedelta(seconds=30),
                                             "finished_at": now, "attempts": 1, "longest_gap_seconds": 3.0,
                                             "longest_stall_seconds": 3.0}] * 3)
    table = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "plain")
    assert table.exit_code == 0, table.output
    assert "quick-scan" in table.stdout and "full-scan" in table.stdout and "\x1b" not in table.stdout
    assert "only 3 completed audits" in " ".join(table.stdout.split())
    block = to_toml(suggest_thresholds(engine, 30 * DAY))
    assert "\x1b" not in block and "[kinds.odd" not in block  # no proposal: a comment only, control shown escaped
    validate_config(tomllib.loads(block), "suggested")


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_completions_per_worker_read_the_finish_time_index_whatever_the_statistics_say(engine, database_url):
    """With the statistics of a million-audit file (four statuses, 750 workers), SQLite grouped the
    window's completions by walking the worker index over every completed audit: 2.5 s instead of
    31 ms for a report over the last week."""
    import sqlite3

    from sqlalchemy import event

    from auditctl.report import _completed_by_worker

    path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        connection.execute("ANALYZE")
        connection.execute("DELETE FROM sqlite_stat1 WHERE tbl = 'audits'")
        connection.executemany("INSERT INTO sqlite_stat1 VALUES ('audits', ?, ?)", [
            ("ix_audits_running", "30000 1"), ("ix_audits_status_finished", "1000000 333334 1"),
            ("ix_audits_worker_status", "1000000 4000 1334"), ("ix_audits_status_heartbeat", "1000000 333334 1")])
    engine.dispose()  # statistics are read when a connection opens
    sent = []
    listener = lambda conn, cursor, statement, parameters, *args: sent.append((statement, parameters))  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with read_connection(engine) as connection:
            start = fetch_now(connection) - timedelta(days=7)
        assert _completed_by_worker(engine, start) == {}
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    statement, parameters = next((s, p) for s, p in sent if "GROUP BY worker_id" in s)
    with sqlite3.connect(path) as connection:
        plan = " ".join(row[-1] for row in connection.execute("EXPLAIN QUERY PLAN " + statement, parameters))
    assert "ix_audits_status_finished" in plan and "ix_audits_worker_status" not in plan, plan


def test_runs_of_an_exact_length_are_measured_exactly_so_the_proposal_is_not_rounded_a_step_up(engine, database_url):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    rows = []
    for i in range(20):
        finished = now - timedelta(seconds=3600 + 977.123457 * i)  # odd microseconds, as stored times have
        started = finished - timedelta(seconds=600)
        rows.append({"target": "https://example.com", "status": "completed", "kind": "exact", "created_at": started,
                     "started_at": started, "finished_at": finished, "attempts": 1, "declared_heartbeat_interval": 5.0,
                     "longest_gap_seconds": 10.0, "longest_stall_seconds": 20.0, "worker_id": "worker-1"})
    with write_transaction(engine) as connection:
        connection.execute(insert(audits), rows)
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--max-age", "10m",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    exact = next(item for item in json.loads(result.stdout)["kinds"] if item["kind"] == "exact")
    max_age = exact["proposals"]["max_age"]
    assert max_age["text"] == "15m", max_age  # 600 s x 1.5, already a round duration
    assert max_age["current_false_recoveries"] == 0, "a run of exactly max_age did not go past it"


def test_suggestions_as_csv_keep_their_columns_when_there_is_nothing_to_learn_from(engine, database_url):
    empty = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "csv")
    assert empty.exit_code == 0, empty.output
    make_kinds(engine)
    full = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "csv")
    header = full.stdout.splitlines()[0]
    assert empty.stdout.splitlines() == [header] and header.startswith("kind,threshold,completed,")
    assert len(full.stdout.splitlines()) == 1 + 2 * 3


def test_since_takes_an_iso_time_as_recover_does_and_refuses_one_not_in_the_past(engine, database_url):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    start = (now - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = invoke("report", "--database-url", database_url, "--since", start, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["since"].startswith(start[:19]) and 3 * 3600 - 5 <= data["window_seconds"] <= 3 * 3600 + 60
    suggested = invoke("report", "--database-url", database_url, "--since", start, "--suggest-thresholds", "-o", "json")
    assert suggested.exit_code == 0 and json.loads(suggested.stdout)["since"].startswith(start[:19])
    ahead = invoke("report", "--database-url", database_url, "--since", "2999-01-01T00:00Z")
    assert ahead.exit_code == 2 and "--since 2999-01-01T00:00:00.000Z is not in the past" in ahead.stderr and "Traceback" not in ahead.output
    # As a duration is bounded to a year: year 1 drew 740,000 chart lines.
    ancient = invoke("report", "--database-url", database_url, "--since", "0001-01-01T00:00:00Z")
    assert ancient.exit_code == 2 and "is more than 366d before now" in ancient.stderr, ancient.output


def test_history_rows_whose_time_reads_outside_the_window_are_skipped_counted_and_never_crash(engine, database_url):
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        audit_id = connection.execute(insert(audits).values(
            target="https://example.com", status="failed", created_at=now - timedelta(hours=1), attempts=1)).inserted_primary_key[0]
        event = {"audit_id": audit_id, "event": "recovered", "from_status": "running", "to_status": "failed",
                 "reasons": "stale_heartbeat", "measurements": {"silence_seconds": 100}, "actor": "other tool"}
        connection.execute(insert(audit_events).values(at=now - timedelta(minutes=5), **event))  # the one that counts
        # Committed after the report read its clock (a watch recovering meanwhile): past the window, not unreadable.
        connection.execute(insert(audit_events).values(at=now + timedelta(seconds=30), **event))
        connection.execute(insert(audit_events).values(at=now + timedelta(days=365 * 70), **event))  # dated 2096
        if connection.dialect.name == "sqlite":
            # U+3000 sorts after every digit, so the text passes the window's comparison, yet reads as year 1:
            # subtracting its silence overflowed and the report was a traceback.
            connection.execute(text("UPDATE audit_events SET at = :at WHERE id = (SELECT MAX(id) FROM audit_events)"),
                               {"at": "\u30000001-01-01 00:00:05"})
            connection.execute(insert(audit_events).values(at=now + timedelta(days=365 * 70), **event))

    found = stuck_report(engine, 3600)
    assert (found.recoveries, found.unreadable_events) == (1, 2 if engine.dialect.name == "sqlite" else 1)
    assert sum(slot["count"] for slot in found.frequency) == found.recoveries, "the header and the chart agree"
    shown = invoke("report", "--database-url", database_url, "--since", "1h", "--format", "plain")
    assert shown.exit_code == 0 and "1 recoveries of 1 audits" in shown.stdout
    assert "history rows skipped: their time cannot be read, or reads as outside the window" in shown.stdout
    as_json = json.loads(invoke("report", "--database-url", database_url, "--since", "1h", "-o", "json").stdout)
    assert as_json["unreadable_events"] == found.unreadable_events


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_the_same_status_or_worker_stored_as_text_and_as_bytes_is_counted_once_whole(engine, database_url):
    from auditctl.overview import count_by_status

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        for _ in range(3):
            connection.execute(insert(audits).values(target="https://example.com", status="completed", worker_id="worker-1",
                                                     created_at=now, finished_at=now, attempts=1))
        connection.execute(insert(audits).values(target="https://example.com", status="pending", created_at=now))
        # Another tool wrote the same words as BLOBs: SQL groups them apart from the text.
        connection.execute(text("INSERT INTO audits (target, status, worker_id, created_at, finished_at, attempts) "
                                "SELECT target, status, CAST(worker_id AS BLOB), created_at, finished_at, attempts "
                                "FROM audits WHERE id = 1"))
        connection.execute(text("INSERT INTO audits (target, status, created_at) "
                                "SELECT target, CAST(status AS BLOB), created_at FROM audits WHERE id = 4"))

    counts = count_by_status(engine)
    assert (counts["completed"], counts["pending"]) == (4, 2), counts
    assert stuck_report(engine, DAY).completed == 4


def test_a_requeued_audit_waited_from_its_requeue_not_from_its_creation(engine, start_audit, backdate):
    audit_id, _lease = start_audit()
    backdate(audit_id, created_at=7200, started_at=7000, heartbeat_at=3600, last_worker_update=3600,
             progress_changed_at=3600)
    recovered = recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), requeue=True)
    assert [(r.id, r.status) for r in recovered] == [(audit_id, "pending")]
    backdate(audit_id, created_at=7200)  # the requeue is now; it waits 5 minutes for a worker
    with write_transaction(engine) as connection:
        connection.execute(update(audit_events).where(audit_events.c.audit_id == audit_id).values(
            at=fetch_now(connection) - timedelta(seconds=300)))
    leases.claim(engine, audit_id, worker_id="worker-2", instance_id="instance-2", worker_url=None)

    wait = stuck_report(engine, DAY).capacity.wait
    assert wait.count == 1
    assert wait.mean_seconds == pytest.approx(300, abs=30)  # not the two hours since it was created


def test_a_silence_stored_as_text_counts_neither_in_the_report_nor_in_the_detection_metric(engine):
    from auditctl.report import history_totals

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        audit_id = connection.execute(insert(audits).values(
            target="https://example.com", status="failed", created_at=now - timedelta(hours=1), attempts=1)).inserted_primary_key[0]
        for silence in (720, "720", "twelve minutes"):
            connection.execute(insert(audit_events).values(
                audit_id=audit_id, at=now - timedelta(minutes=5), event="recovered", from_status="running",
                to_status="failed", reasons="stale_heartbeat", measurements={"silence_seconds": silence}, actor="other tool"))

    assert stuck_report(engine, DAY).detection.count == 1
    assert stuck_report(engine, DAY).detection.mean_seconds == 720
    assert history_totals(engine).detection.count == 1


@pytest.mark.parametrize("odd", ["   ", "k" * 150], ids=["blank", "over-100-characters"])
def test_suggested_toml_comments_out_a_kind_no_kinds_section_can_name(engine, engine_name, database_url, odd):
    """Another tool wrote a kind no ``[kinds.NAME]`` section accepts (blank, or on SQLite longer than
    the column): the block must still be one the config file takes, the other kinds' proposals in it."""
    if engine_name == "postgresql" and len(odd) > 100:
        pytest.skip("PostgreSQL's varchar(100) cannot hold a longer kind")
    completed_runs_of_kind(engine, odd)
    completed_runs_of_kind(engine, "quick-scan")
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    settings = validate_config(tomllib.loads(result.stdout), "suggested")
    assert set(settings["kinds"]) == {"quick-scan"}
    assert "no [kinds.NAME] section can name it" in result.stdout


def test_suggested_toml_keeps_a_floor_from_a_heartbeat_interval_over_half_a_year_within_a_year(engine, database_url):
    """Twice a declared heartbeat interval of 200 days is longer than any duration the config file
    takes: the proposal stops at the longest one, and the block is still accepted."""
    completed_runs_of_kind(engine, "slow")
    with write_transaction(engine) as connection:
        connection.execute(update(audits).values(declared_heartbeat_interval=200 * DAY))
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    block = validate_config(tomllib.loads(result.stdout), "suggested")["kinds"]["slow"]
    assert block.stale_after == block.stall_after == block.max_age == 366 * DAY


def test_suggested_fleet_stale_after_is_one_recover_accepts_beside_a_kind_too_young_for_its_own(engine, database_url,
                                                                                                  tmp_path):
    """Audits with no kind beat every 5 s; a kind with too little history to get a proposal beats
    every 2 minutes and falls back on the fleet's values. The pasted block must not set a fleet
    stale_after that `recover` then refuses for that kind's running audits (below two of its beats)."""
    completed_runs_of_kind(engine, None)
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(update(audits).values(declared_heartbeat_interval=5.0, longest_gap_seconds=6.0))
        young = {"target": "t", "kind": "full-scan", "created_at": now, "attempts": 1, "declared_heartbeat_interval": 120.0}
        connection.execute(insert(audits), [{**young, "status": "completed", "started_at": now - timedelta(hours=1),
                                             "finished_at": now, "longest_gap_seconds": 100.0,
                                             "longest_stall_seconds": 300.0}] * 3)
        connection.execute(insert(audits).values(**young, status="running", started_at=now, heartbeat_at=now,
                                                 worker_id="worker-1", lease="lease-1"))
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    assert parse_duration(validate_config(tomllib.loads(result.stdout), "suggested")["stale_after"]) >= 240.0
    config = tmp_path / "learned.toml"
    config.write_text(result.stdout)
    recovered = invoke("--config", config, "recover", "--dry-run", "--database-url", database_url)
    assert recovered.exit_code == 0, recovered.output


def _requeued_five_minutes_ago(engine, start_audit, backdate) -> tuple:
    """An audit created three days ago, silent for an hour, requeued by a recovery recorded five
    minutes ago: (its id, the lease of its run before)."""
    audit_id, lease = start_audit()
    backdate(audit_id, created_at=3 * DAY, started_at=3 * DAY - 60, heartbeat_at=3600, last_worker_update=3600,
             progress_changed_at=3600)
    recovered = recover_stuck(engine, Thresholds(), actor=Actor.command("recover"), requeue=True)
    assert [(r.id, r.status) for r in recovered] == [(audit_id, "pending")]
    with write_transaction(engine) as connection:
        connection.execute(update(audit_events).where(audit_events.c.audit_id == audit_id).values(
            at=fetch_now(connection) - timedelta(seconds=300)))
    return audit_id, lease


def test_a_requeued_audit_pending_now_has_waited_since_its_requeue_not_since_its_creation(engine, start_audit, backdate):
    """The backlog's "oldest waiting" counts as the wait before start does: from the requeue (or
    reset) that last made the audit pending, not from its creation days before."""
    audit_id, _lease = _requeued_five_minutes_ago(engine, start_audit, backdate)

    capacity = stuck_report(engine, DAY).capacity
    assert capacity.pending == 1
    assert capacity.oldest_pending_seconds == pytest.approx(300, abs=30)  # not three days


def test_suggested_stale_after_is_one_recover_accepts_for_running_audits_that_beat_slower_than_finished_ones(
        engine, database_url, tmp_path):
    """Workers of a kind now beat every 2 minutes, the completed history at 5 s: `recover` judges the
    running audits, and refuses a stale_after under two of their beats. The proposal must not be one."""
    completed_runs_of_kind(engine, "quick-scan")
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(update(audits).values(declared_heartbeat_interval=5.0))
        connection.execute(insert(audits).values(target="t", kind="quick-scan", status="running", created_at=now,
                                                 started_at=now, heartbeat_at=now, attempts=1, worker_id="worker-1",
                                                 lease="lease-1", declared_heartbeat_interval=120.0))
    result = invoke("report", "--database-url", database_url, "--suggest-thresholds", "--format", "toml")
    assert result.exit_code == 0, result.output
    config = tmp_path / "learned.toml"
    config.write_text(result.stdout)
    recovered = invoke("--config", config, "recover", "--dry-run", "--database-url", database_url)
    assert recovered.exit_code == 0, recovered.output


def test_percentiles_are_nearest_rank_values_that_were_really_observed():
    eleven = [float(v) for v in range(1, 12)]
    assert percentile(eleven, 0.95) == 11.0, "rank ceil(10.45) = 11, not the rounded 10"
    assert percentile(eleven, 0.5) == 6.0 and percentile([3.0, 1.0, 2.0], 0.0) == 1.0 and percentile([], 0.95) is None


def _recoveries_with_silences(engine, silences) -> None:
    from auditctl import history

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        history.record(connection, [{"audit_id": 1000 + i, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"],
                                     "measurements": {"silence_seconds": silence}, "details": {"from": {}}}
                                    for i, silence in enumerate(silences)], Actor.command("recover"), now)


def test_a_recovery_noticed_with_no_silence_at_all_counts_in_the_report_as_in_the_metrics(engine):
    """A silence of 0 seconds (noticed at once) is a measurement: the report's detection times and the
    metrics' histogram count it alike."""
    from auditctl.report import history_totals

    _recoveries_with_silences(engine, [0, 10.0])
    report = stuck_report(engine, 3600)
    totals = history_totals(engine)
    assert (report.detection.count, report.detection.mean_seconds) == (2, 5.0)
    assert totals.detection.count == 2 and totals.detection.cumulative[0] == 1


def test_a_silence_exactly_on_a_bucket_bound_falls_in_that_bucket_as_prometheus_le_says(engine):
    from auditctl.report import DETECTION_BUCKETS, history_totals

    _recoveries_with_silences(engine, [5.0, 5.5])
    cumulative = dict(zip(DETECTION_BUCKETS, history_totals(engine).detection.cumulative))
    assert (cumulative[1.0], cumulative[5.0], cumulative[15.0]) == (0, 1, 2)


def _events_by(*pairs):
    """StuckEvents, one per (worker, step), an hour ago in a row."""
    from datetime import datetime, timezone

    from auditctl.report import StuckEvent

    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [StuckEvent(audit_id=i, at=at, requeued=False, reasons=["stale_heartbeat"], worker=worker, lease=None,
                       run_started=None, silence=None, stalled=None, age=None, max_age=None, step=step)
            for i, (worker, step) in enumerate(pairs)]


def test_an_outlier_must_have_half_again_its_fair_share_not_just_the_most():
    """Two workers, four recoveries against two: 67% is the most, but not 1.5 times the fair 50%."""
    from auditctl.report import find_outliers

    assert find_outliers(_events_by(*[("w1", None)] * 4, *[("w2", None)] * 2)) == []
    (outlier,) = find_outliers(_events_by(*[("w1", None)] * 6, *[("w2", None)] * 1, *[("w3", None)] * 1))
    assert (outlier.dimension, outlier.value, outlier.count) == ("worker", "w1", 6)


def test_a_tie_for_a_workers_top_step_names_the_first_step_alphabetically(engine):
    from auditctl import history

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        history.record(connection, [{"audit_id": 2000 + i, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"], "measurements": {},
                                     "details": {"from": {"worker_id": "w1", "step": step}}}
                                    for i, step in enumerate(["Port scan", "Crawling", "Port scan", "Crawling"])],
                       Actor.command("recover"), now)
    (worker,) = stuck_report(engine, 3600).by_worker
    assert (worker.key, worker.extra["top_step"], worker.extra["top_step_share"]) == ("w1", "Crawling", 0.5)


def test_an_outlier_says_where_it_happens_when_one_step_has_exactly_sixty_percent_of_it():
    from auditctl.report import find_outliers

    (outlier,) = find_outliers(_events_by(("w1", "A"), ("w1", "A"), ("w1", "A"), ("w1", "B"), ("w1", "B"),
                                          ("w2", None), ("w3", None)))
    assert outlier.value == "w1" and outlier.within == {"dimension": "step", "value": "A", "share": 0.6}
    assert outlier.text.endswith(", 60% of them at step 'A'.")


def test_a_report_of_two_days_is_charted_per_hour_and_a_longer_one_per_day(engine):
    assert stuck_report(engine, 2 * 86400).bucket == "hour"
    assert stuck_report(engine, 2 * 86400 + 1).bucket == "day"


def test_a_recovery_at_the_very_start_of_the_window_is_in_the_report(engine):
    from auditctl import history

    with write_transaction(engine) as connection:
        at = fetch_now(connection).replace(microsecond=500000) - timedelta(hours=1)
        history.record(connection, [{"audit_id": 3000, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"], "measurements": {},
                                     "details": {"from": {}}}], Actor.command("recover"), at)
    report = stuck_report(engine, at)
    assert report.since == at and report.recoveries == 1 and report.unreadable_events == 0


def test_capacity_counts_the_workers_alive_now_before_those_active_in_the_window(engine):
    """Two workers completed audits this window but only one is alive now: the fleet is sized against
    the one that can take work."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(workers).values(instance_id=uuid.uuid4().hex, worker_id="w-a",
                                                  started_at=now - timedelta(hours=1), last_heartbeat_at=now))
        connection.execute(insert(audits), [
            {"target": f"https://t{i}.example", "status": "completed", "worker_id": worker,
             "created_at": now - timedelta(minutes=30), "started_at": now - timedelta(minutes=20),
             "finished_at": now - timedelta(minutes=10)} for i, worker in enumerate(["w-a", "w-b"])])
    capacity = stuck_report(engine, 3600).capacity
    assert (capacity.workers_alive, capacity.workers_active) == (1, 2)
    assert "1 alive now" in capacity.verdict, capacity.verdict


def test_a_run_that_started_the_moment_it_was_queued_counts_as_a_wait_of_zero(engine):
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        queued = now - timedelta(minutes=20)
        connection.execute(insert(audits), [
            {"target": "https://at-once.example", "status": "running", "created_at": queued, "started_at": queued},
            {"target": "https://later.example", "status": "running", "created_at": queued,
             "started_at": queued + timedelta(seconds=60)}])
    wait = stuck_report(engine, 3600).capacity.wait
    assert (wait.count, wait.mean_seconds) == (2, 30.0)


def test_with_runs_longer_than_the_drain_time_each_worker_starts_one_pending_audit_within_it(engine):
    """A worker frees up every mean run, at least once within DRAIN_WITHIN: with two-hour runs, three
    pending audits need three workers to start within the hour, not six."""
    import math

    from auditctl.report import UTILISATION

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [
            {"target": "https://long.example", "status": "completed", "worker_id": "w", "created_at": now - timedelta(hours=3),
             "started_at": now - timedelta(hours=2, minutes=30), "finished_at": now - timedelta(minutes=30)},
            *({"target": f"https://p{i}.example", "status": "pending", "worker_id": None,
               "created_at": now - timedelta(hours=20), "started_at": None, "finished_at": None} for i in range(3))])
    capacity = stuck_report(engine, 86400).capacity
    assert capacity.mean_run_seconds == 7200.0 and capacity.pending == 3
    keep_up = capacity.arrivals / 86400 * 7200 / UTILISATION
    assert capacity.workers_needed == math.ceil(keep_up + 3 - 1e-9)


def test_the_hourly_chart_of_recoveries_leaves_out_one_recorded_in_the_next_hour(engine):
    """A history row another host wrote with its clock an hour ahead is past the chart, not a crash."""
    from auditctl import history
    from auditctl.overview import recoveries_by_hour

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        for audit_id, at in ((4000, now), (4001, now + timedelta(hours=1))):
            history.record(connection, [{"audit_id": audit_id, "event": history.RECOVERED, "from_status": "running",
                                         "to_status": "failed", "reasons": ["stale_heartbeat"]}], Actor.command("recover"), at)
    hours = recoveries_by_hour(engine, hours=24)
    assert len(hours) == 24 and sum(h.count for h in hours) == 1 and hours[-1].count == 1


def test_a_slow_fleets_rates_read_as_figures_not_zero_when_three_audits_completed_in_a_week(engine, database_url):
    """Three audits created and completed in a 7-day window: 3/168 per hour. The text keeps two
    significant figures (0.018/hour, not 0.0/hour); the JSON keeps the rate unrounded, under its key."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [
            {"target": f"https://slow-{i}.example", "status": "completed", "worker_id": "w",
             "created_at": now - timedelta(days=i + 1, minutes=30), "started_at": now - timedelta(days=i + 1, minutes=20),
             "finished_at": now - timedelta(days=i + 1, minutes=10)} for i in range(3)])
    text_out = " ".join(invoke("report", "--database-url", database_url, "--since", "7d", "--format", "plain").stdout.split())
    assert "Throughput: 0.018 completed/hour (3 in the window); arrivals 0.018/hour." in text_out, text_out
    assert "at this window's rate (0.018/hour)" in text_out, text_out
    capacity = json.loads(invoke("report", "--database-url", database_url, "--since", "7d", "--format", "json").stdout)["capacity"]
    assert capacity["completed_per_hour"] == capacity["arrivals_per_hour"] == 3 / 168


def test_one_recovery_among_thousands_of_finished_runs_reads_as_a_share_not_zero_percent(engine, database_url):
    """1 recovery and 4,999 completed audits: "0.020% of 5000 finished runs", not "0.0%"."""
    from auditctl import history

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [
            {"target": f"https://many-{i}.example", "status": "completed", "worker_id": "w",
             "created_at": now - timedelta(hours=2), "started_at": now - timedelta(hours=2),
             "finished_at": now - timedelta(hours=1)} for i in range(4999)])
        history.record(connection, [{"audit_id": 90_000, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"],
                                     "measurements": {"silence_seconds": 700.0}}], Actor.command("recover"), now)
    text_out = " ".join(invoke("report", "--database-url", database_url, "--since", "1d", "--format", "plain").stdout.split())
    assert "(0.020% of 5000 finished runs)" in text_out, text_out


def _completed(engine, count: int, *, finished, gap: float, stall: float, run: float = 600.0, interval: float = 5.0,
               kind: str = "exact") -> None:
    """``count`` completed audits of ``kind`` that finished at ``finished``, each with the same measurements."""
    started = finished - timedelta(seconds=run)
    with write_transaction(engine) as connection:
        connection.execute(insert(audits), [
            {"target": "https://example.com", "status": "completed", "kind": kind, "created_at": started,
             "started_at": started, "finished_at": finished, "attempts": 1, "declared_heartbeat_interval": interval,
             "longest_gap_seconds": gap, "longest_stall_seconds": stall, "worker_id": "worker-1"} for _ in range(count)])


def test_audits_whose_progress_never_stalled_still_teach_a_stall_after(engine):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=10.0, stall=0.0)
    exact = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind == "exact")
    stall = exact.proposals["stall_after"]
    assert exact.enough and exact.note is None
    assert stall.samples == 20 and stall.observed_max == 0.0 and stall.seconds is not None


def test_a_proposal_exactly_at_the_heartbeat_floor_says_it_was_not_raised(engine):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    # 26 s x 1.5 = 39 s, rounded up to 40 s: exactly two declared 20 s intervals.
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=26.0, stall=26.0, interval=20.0)
    exact = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind == "exact")
    for name in ("stale_after", "stall_after"):
        assert exact.proposals[name].seconds == 40.0
        assert exact.proposals[name].floor is None, name


def test_suggestions_since_a_moment_learn_from_an_audit_that_finished_at_exactly_that_moment(engine):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    moment = now - timedelta(hours=1)
    _completed(engine, 20, finished=moment, gap=10.0, stall=20.0)
    suggestions = suggest_thresholds(engine, moment)
    assert suggestions.since == moment
    exact = next(item for item in suggestions.kinds if item.kind == "exact")
    assert exact.completed == 20 and exact.enough


def test_a_running_audit_whose_worker_declared_its_own_stale_after_sets_no_floor_for_its_kind(engine):
    """Its worker's own stale_after judges it, not the kind's: `recover` checks the kind's against it not."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=10.0, stall=10.0)
    with write_transaction(engine) as connection:
        connection.execute(insert(audits).values(target="t", kind="exact", status="running", created_at=now, started_at=now,
                                                 heartbeat_at=now, attempts=1, worker_id="worker-1", lease="lease-1",
                                                 declared_heartbeat_interval=120.0, declared_stale_after=600.0))
    exact = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind == "exact")
    assert exact.proposals["stale_after"].seconds == 15.0 and exact.proposals["stale_after"].floor is None


def test_a_kind_with_its_own_stale_after_in_the_config_sets_no_floor_for_the_fleets_values(engine):
    """A kind too young for a proposal falls back on the fleet's values, unless the config gives it its own."""
    from auditctl.thresholds import Overrides, Policy

    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=10.0, stall=10.0, kind=None)
    _completed(engine, 3, finished=now - timedelta(hours=1), gap=100.0, stall=100.0, interval=120.0, kind="slow")
    policy = Policy.of(kinds={"slow": Overrides(stale_after=600.0)})
    fleet = next(item for item in suggest_thresholds(engine, 7 * DAY, policy).kinds if item.kind is None)
    assert fleet.proposals["stale_after"].seconds == 15.0 and fleet.proposals["stale_after"].floor is None
    unconfigured = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind is None)
    assert unconfigured.proposals["stale_after"].seconds == 240.0  # two of slow's beats: the fleet's values judge it


def test_suggested_toml_says_how_many_audits_ran_under_thresholds_their_worker_declared(engine):
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=10.0, stall=10.0)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id <= 7).values(declared_max_age=3600.0))
    block = to_toml(suggest_thresholds(engine, 7 * DAY))
    assert "# 7 of them ran under thresholds their worker declared, which take precedence over these" in block


def test_a_kinds_false_recoveries_count_each_audit_once_whichever_of_its_measures_went_past(engine):
    """110 audits: nearest-rank p99 leaves out the longest of each measure. One audit's silence and another's
    run time are those freaks: the kind's proposals would have recovered two audits wrongly, one per measure."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 108, finished=now - timedelta(hours=1), gap=10.0, stall=10.0)
    _completed(engine, 1, finished=now - timedelta(hours=1), gap=500.0, stall=10.0)
    _completed(engine, 1, finished=now - timedelta(hours=1), gap=10.0, stall=10.0, run=9000.0)
    exact = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind == "exact")
    assert [exact.proposals[name].false_recoveries for name in ("stale_after", "stall_after", "max_age")] == [1, 0, 1]
    assert exact.false_recoveries == 2 and exact.false_recovery_rate == round(2 / 110, 6)


def test_time_lost_is_measured_from_the_last_sign_each_rule_watches(engine):
    """A stall from the last progress, an overrun from the deadline (run time minus max_age), a silence
    from the last heartbeat: the same recovery measurements give each reason its own time lost."""
    from auditctl import history

    measured = {"silence_seconds": 30.0, "stalled_seconds": 900.0, "age_seconds": 2000.0, "max_age": 1800.0}
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        history.record(connection, [{"audit_id": 2000 + i, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": [reason], "measurements": measured,
                                     "details": {"from": {}}}
                                    for i, reason in enumerate(["progress_stalled", "max_age_exceeded", "stale_heartbeat"])],
                       Actor.command("recover"), now)
    lost = {share.key: share.extra["time_lost_mean_seconds"] for share in stuck_report(engine, 3600).by_reason}
    assert lost == {"progress_stalled": 900.0, "max_age_exceeded": 200.0, "stale_heartbeat": 30.0}


def test_a_breakdown_lists_the_ten_most_stuck_workers_and_sums_the_rest_as_other(engine):
    from auditctl import history

    workers_seen = [f"worker-{n:02d}" for n in range(12)]
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        history.record(connection, [{"audit_id": 3000 + i, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"],
                                     "measurements": {"silence_seconds": 700.0},
                                     "details": {"from": {"worker_id": worker}}}
                                    for i, worker in enumerate(workers_seen + ["worker-00"])], Actor.command("recover"), now)
    by_worker = stuck_report(engine, 3600).by_worker
    assert [share.key for share in by_worker] == ["worker-00", *workers_seen[1:10], "(other)"]
    assert (by_worker[0].count, by_worker[-1].count) == (2, 2)
    assert by_worker[-1].share == round(2 / 13, 4)
    # The "(other)" row says how many workers it sums, as the target and kind breakdowns' do.
    assert by_worker[-1].extra["values"] == 2


def test_a_requeued_audit_that_ran_again_is_timed_from_its_last_heartbeat_and_one_that_did_not_is_counted(engine):
    """Three audits of worker w recovered ten minutes ago: one requeued and started again five minutes ago
    (recovered 15 minutes after its last heartbeat), two failed for good. w also completed two audits."""
    from auditctl import history

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        hour_ago, recovered_at = now - timedelta(hours=1), now - timedelta(minutes=10)
        ids = [connection.execute(insert(audits).values(target=f"https://{name}.example", status=status, worker_id=worker,
                                                        created_at=hour_ago, started_at=started, finished_at=finished))
               .inserted_primary_key[0]
               for name, status, worker, started, finished in (
                   ("again", "running", "w", now - timedelta(minutes=5), None),
                   ("never", "failed", None, hour_ago, recovered_at),
                   ("never-2", "failed", None, hour_ago, recovered_at),
                   ("done-1", "completed", "w", hour_ago, now - timedelta(minutes=30)),
                   ("done-2", "completed", "w", hour_ago, now - timedelta(minutes=20)))]
        history.record(connection, [
            {"audit_id": audit_id, "event": event, "from_status": "running", "to_status": to_status,
             "reasons": ["stale_heartbeat"], "measurements": {"silence_seconds": 600.0},
             "details": {"from": {"worker_id": "w", "started_at": isoformat_z(hour_ago)}}}
            for audit_id, event, to_status in ((ids[0], history.REQUEUED, "pending"), (ids[1], history.RECOVERED, "failed"),
                                               (ids[2], history.RECOVERED, "failed"))],
            Actor.command("recover"), recovered_at)
    found = stuck_report(engine, 2 * 3600)
    assert found.recoveries == 3 and found.never_ran_again == 2
    assert (found.recovery.count, found.recovery.mean_seconds) == (1, 900.0)  # 10 min before the recovery + 5 after it
    (worker,) = found.by_worker
    assert (worker.key, worker.count, worker.extra["completed"], worker.extra["stuck_rate"]) == ("w", 3, 2, 0.6)


def test_capacity_keeps_workers_at_most_80_percent_busy_and_asks_for_one_even_when_nothing_arrives(engine):
    """Ten 10-minute audits arrived and completed in the last hour: 10 x 600 s an hour is 1.67 busy
    workers, 2.08 at 80%: three. A window where the only audit arrived before it still needs one."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        connection.execute(insert(audits), [
            {"target": f"https://a{i}.example", "status": "completed", "worker_id": "w", "created_at": now - timedelta(minutes=50),
             "started_at": now - timedelta(minutes=50), "finished_at": now - timedelta(minutes=40)} for i in range(10)])
    capacity = stuck_report(engine, 3600).capacity
    assert (capacity.arrivals, capacity.mean_run_seconds, capacity.workers_needed) == (10, 600.0, 3)
    quiet = stuck_report(engine, now - timedelta(minutes=45)).capacity
    assert (quiet.arrivals, quiet.completed, quiet.pending, quiet.workers_needed) == (0, 10, 0, 1)


def test_suggestions_raise_the_fleets_stale_after_for_a_kind_no_kinds_section_can_name(engine):
    """A kind whose name the config file refuses (blank) gets no [kinds] block: the fleet's values judge it,
    so its heartbeat interval is a floor of theirs, whatever history it has."""
    with read_connection(engine) as connection:
        now = fetch_now(connection)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=10.0, stall=10.0, kind=None)
    _completed(engine, 20, finished=now - timedelta(hours=1), gap=100.0, stall=100.0, interval=120.0, kind="   ")
    fleet = next(item for item in suggest_thresholds(engine, 7 * DAY).kinds if item.kind is None)
    assert fleet.proposals["stale_after"].seconds == 240.0, fleet.proposals["stale_after"]


def test_a_report_since_a_moment_counts_an_audit_completed_at_exactly_that_moment(engine):
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        moment = now - timedelta(minutes=30)
        connection.execute(insert(audits).values(target="https://edge.example", status="completed", worker_id="w",
                                                 created_at=moment - timedelta(minutes=5),
                                                 started_at=moment - timedelta(minutes=5), finished_at=moment))
    found = stuck_report(engine, moment)
    assert found.completed == 1 and found.capacity.completed == 1


def test_a_report_window_of_exactly_the_longest_duration_is_taken():
    from datetime import datetime, timezone

    from auditctl.report import window
    from auditctl.thresholds import MAX_DURATION

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert window(now, now - timedelta(seconds=MAX_DURATION)) == (now - timedelta(seconds=MAX_DURATION), MAX_DURATION)


def test_a_requeued_audit_has_waited_since_its_requeue_when_its_old_worker_wrote_late_since(engine, start_audit, backdate):
    """The refused late write of the run before is recorded (lease_lost, pending to pending), but it did
    not make the audit pending: the wait still counts from the requeue."""
    audit_id, lease = _requeued_five_minutes_ago(engine, start_audit, backdate)
    with pytest.raises(LeaseLost):
        leases.heartbeat(engine, lease, Actor("worker worker-1"))
    with read_connection(engine) as connection:
        late = connection.execute(select(audit_events.c.from_status, audit_events.c.to_status)
                                  .where(audit_events.c.event == "lease_lost")).one()
    assert tuple(late) == ("pending", "pending")

    capacity = stuck_report(engine, DAY).capacity
    assert capacity.pending == 1
    assert capacity.oldest_pending_seconds >= 300  # since the requeue, not since the refused write


def test_a_worker_stuck_at_one_step_is_told_once_not_again_as_that_step_on_that_worker(engine):
    make_month(engine)
    outliers = stuck_report(engine, 30 * DAY).outliers
    said = [(o.dimension, o.value, o.reason) for o in outliers
            if {o.value, (o.within or {}).get("value")} == {"worker-3", "Port scan"}]
    assert said and all(dimension == "worker" for dimension, _value, _reason in said), outliers


def test_the_step_of_a_recovery_whose_record_a_reset_cleared_is_read_from_the_resets_history_row(engine):
    """History written before recoveries recorded the step: the step is in the recovery record, which a
    later reset cleared from the row and kept in its own history row."""
    from auditctl import history

    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        recovered_at = now - timedelta(minutes=30)
        audit_id = connection.execute(insert(audits).values(target="https://reset.example", status="pending",
                                                            created_at=now - timedelta(hours=2))).inserted_primary_key[0]
        history.record(connection, [{"audit_id": audit_id, "event": history.RECOVERED, "from_status": "running",
                                     "to_status": "failed", "reasons": ["stale_heartbeat"],
                                     "measurements": {"silence_seconds": 700.0},
                                     "details": {"from": {"worker_id": "w"}}}], Actor.command("recover"), recovered_at)
        record = {"recovered_at": isoformat_z(recovered_at),
                  "original_status": {"status": "running", "progress": _progress("Port scan", 40.0, recovered_at, True)}}
        history.record(connection, [{"audit_id": audit_id, "event": history.RESET, "from_status": "failed",
                                     "to_status": "pending", "details": {"original_status": {"recovery_info": record}}}],
                       Actor.command("reset"), now - timedelta(minutes=10))
    found = stuck_report(engine, 3600)
    assert [(share.key, share.count) for share in found.by_step] == [("Port scan", 1)] and found.step_unknown == 0


@pytest.mark.parametrize("since", [0, -60, float("nan"), float("inf"), 2 * 366 * DAY])
def test_a_library_report_over_a_window_no_command_would_take_is_refused_with_its_name(engine, since):
    """``stuck_report(engine, 0)`` divided by zero; a negative, NaN or endless window read nonsense.
    The library refuses them as the commands do (their durations are parsed before they get here)."""
    from auditctl.errors import ConfigError

    with pytest.raises(ConfigError, match="since"):
        stuck_report(engine, since)
