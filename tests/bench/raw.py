"""The baselines: what a person would write by hand, through the bare drivers (sqlite3, psycopg).

* ``LEAN``: the leanest stuck query. It compares stored times with cutoffs computed once per
  statement (scalar subqueries on the database's clock) and returns the id and the three
  reason flags, nothing else. It knows what the benchmark data holds: every running audit
  has a heartbeat and a start time, declares no threshold of its own, and no worker is gone
  (the library also asks the registry; here it proves nobody gone, so ``worker_gone`` is
  left out).
* ``recover``: an equal-work recovery: the same changes the library makes, written as lean
  as possible (set-based per batch of 500).
* ``HEARTBEAT``: one autocommit fenced UPDATE per beat.

No import of auditctl here: ``rawscan.py`` runs this in a process that must not load it.
``tests/test_faults.py`` imports ``dsn`` from here.
"""

from __future__ import annotations

import json
import math
import os
import socket

STALE_AFTER, MAX_AGE, STALL_AFTER = 600.0, 1800.0, 600.0
REASONS = ("stale_heartbeat", "max_age_exceeded", "progress_stalled")
BATCH = 500


def dsn(url: str) -> str:
    """A libpq connection string from a SQLAlchemy URL (``postgresql+psycopg://...``)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1]


def connect(url: str, *, wait: float = 30.0):
    """A bare connection in autocommit, set up as a careful person would (WAL writers: NORMAL sync)."""
    if is_postgres(url):
        import psycopg

        return psycopg.connect(dsn(url), autocommit=True)
    import sqlite3

    connection = sqlite3.connect(sqlite_path(url), timeout=wait, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


# --- the lean stuck query -----------------------------------------------------------------

_SQLITE_CUT = "(SELECT strftime('%Y-%m-%d %H:%M:%f', 'now', {}))"
_PG_CUT = "(SELECT statement_timestamp() - {})"


def _lean(cut, p, extra: str = "", order: bool = True) -> str:
    stale, age, stall = cut.format(p("stale")), cut.format(p("age")), cut.format(p("stall"))
    return (f"SELECT id, heartbeat_at < {stale}, started_at < {age}, "
            f"heartbeat_at >= {stale} AND progress_changed_at < {stall}{extra} "
            f"FROM audits WHERE status = 'running' "
            f"AND (heartbeat_at < {stale} OR started_at < {age} OR progress_changed_at < {stall})"
            + (" ORDER BY id" if order else ""))


LEAN_SQLITE = _lean(_SQLITE_CUT, lambda n: f":{n}")
LEAN_PG = _lean(_PG_CUT, lambda n: f"%({n})s")


def params(url: str, stale: float = STALE_AFTER, age: float = MAX_AGE, stall: float = STALL_AFTER) -> dict:
    if is_postgres(url):
        from datetime import timedelta

        return {"stale": timedelta(seconds=stale), "age": timedelta(seconds=age), "stall": timedelta(seconds=stall)}
    return {"stale": f"-{stale} seconds", "age": f"-{age} seconds", "stall": f"-{stall} seconds"}


def lean_stuck(connection, url: str, values: dict | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """(id, reasons) of every stuck audit, by the lean query."""
    rows = connection.execute(LEAN_PG if is_postgres(url) else LEAN_SQLITE, values or params(url)).fetchall()
    return [(row[0], tuple(r for r, flag in zip(REASONS, row[1:4]) if flag)) for row in rows]


# --- what scan's JSON needs, on top of the lean query ---------------------------------------

#: The extra columns of the JSON records (ages only for the stuck rows, in the select list).
_SCAN_EXTRA_SQLITE = (", target, kind, worker_id, worker_instance, started_at, heartbeat_at, "
                      "progress ->> '$.progress.step', progress ->> '$.progress.percentage', "
                      "((SELECT julianday('now')) - julianday(started_at)) * 86400.0, "
                      "((SELECT julianday('now')) - julianday(heartbeat_at)) * 86400.0, "
                      "((SELECT julianday('now')) - julianday(progress_changed_at)) * 86400.0, lease, attempts")
_ISO = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'"
_SCAN_EXTRA_PG = (", target, kind, worker_id, worker_instance, "
                  f"to_char(started_at AT TIME ZONE 'UTC', {_ISO}), to_char(heartbeat_at AT TIME ZONE 'UTC', {_ISO}), "
                  "progress -> 'progress' ->> 'step', (progress -> 'progress' ->> 'percentage')::float8, "
                  "date_part('epoch', statement_timestamp() - started_at), "
                  "date_part('epoch', statement_timestamp() - heartbeat_at), "
                  "date_part('epoch', statement_timestamp() - progress_changed_at), lease, attempts")
SCAN_SQLITE = _lean(_SQLITE_CUT, lambda n: f":{n}", _SCAN_EXTRA_SQLITE)
SCAN_PG = _lean(_PG_CUT, lambda n: f"%({n})s", _SCAN_EXTRA_PG)

THRESHOLDS = {"stale_after": {"seconds": STALE_AFTER, "source": "fleet"},
              "max_age": {"seconds": MAX_AGE, "source": "fleet"},
              "stall_after": {"seconds": STALL_AFTER, "source": "fleet"}}


def format_duration(seconds):
    """auditctl's short human duration (``12m``, ``1h5m``, ``45s``), written out again here."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"
    return f"{secs}s"


_SENTENCES = {
    "stale_heartbeat": lambda silence, age, stalled: f"no heartbeat for {format_duration(silence)} (stale_after 10m, fleet)",
    "max_age_exceeded": lambda silence, age, stalled: f"running for {format_duration(age)} (max_age 30m, fleet)",
    "progress_stalled": lambda silence, age, stalled: f"no progress for {format_duration(stalled)} (stall_after 10m, fleet)",
}


def iso_text(value: str | None) -> str | None:
    """Canonical SQLite text to the JSON form (``2025-08-23T06:45:00.123456Z``)."""
    return None if value is None else f"{value[:10]}T{value[11:]}Z"


def scan_rows(connection, url: str):
    """The lean query with the columns scan's JSON shows."""
    return connection.execute(SCAN_PG if is_postgres(url) else SCAN_SQLITE, params(url))


def scan_record(row, postgres: bool) -> dict:
    """One record of ``scan --format json`` (same keys, same order) from a ``scan_rows`` row."""
    (audit_id, stale, over_age, stalled, target, kind, worker_id, instance, started, heartbeat, step, percentage,
     age, silence, unchanged) = row[:15]
    reasons = [r for r, flag in zip(REASONS, (stale, over_age, stalled)) if flag]
    age, silence, unchanged = round(age, 3), round(silence, 3), round(unchanged, 3)
    return {
        "id": audit_id, "target": target, "status": "running", "kind": kind, "reasons": reasons,
        "worker_id": worker_id, "worker_instance": instance, "step": step,
        "percentage": None if percentage is None else float(percentage),
        "last_heartbeat": heartbeat if postgres else iso_text(heartbeat),
        "started_at": started if postgres else iso_text(started),
        "age_seconds": age, "silence_seconds": silence, "stalled_seconds": unchanged, "max_age_seconds": MAX_AGE,
        "thresholds": THRESHOLDS, "explanation": [_SENTENCES[r](silence, age, unchanged) for r in reasons],
        "problems": [],
    }


# --- equal-work recovery --------------------------------------------------------------------

#: The audit columns ``original_status`` copies (the row without recovery_info and odd_times).
ORIGINAL_COLUMNS = ("id", "target", "status", "progress", "last_worker_update", "error", "created_at", "started_at",
                    "finished_at", "attempts", "max_age_seconds", "worker_id", "worker_instance", "lease", "heartbeat_at",
                    "progress_changed_at", "progress_signature", "recovery_reasons", "kind", "declared_heartbeat_interval",
                    "declared_stale_after", "declared_stall_after", "declared_max_age", "resets", "longest_gap_seconds",
                    "longest_stall_seconds")

_ACTOR = "bench raw"


def _ms(iso: str | None) -> str | None:
    """``...SS.ffffffZ`` to the history's millisecond form ``...SS.fffZ``."""
    return None if iso is None else iso[:23] + "Z"


def _plan(row, postgres: bool):
    """What one recovery writes: (id, lease, reasons text, error, info without time and original, measured,
    history details, outbox item)."""
    (audit_id, stale, over_age, stalled, target, kind, worker_id, instance, started, heartbeat, step, _percentage,
     age, silence, unchanged, lease, attempts) = row
    reasons = [r for r, flag in zip(REASONS, (stale, over_age, stalled)) if flag]
    age, silence, unchanged = round(age, 3), round(silence, 3), round(unchanged, 3)
    sentences = [_SENTENCES[r](silence, age, unchanged) for r in reasons]
    measured = {"silence_seconds": silence, "age_seconds": age, "stalled_seconds": unchanged,
                "stale_after": STALE_AFTER, "max_age": MAX_AGE, "stall_after": STALL_AFTER}
    joined = ", ".join(reasons)
    info = {"reason": joined, "reasons": reasons, "explanation": sentences, "measured": measured,
            "thresholds": THRESHOLDS, "recovered_by": {"actor": _ACTOR, "host": socket.gethostname(), "pid": os.getpid()},
            "requeued": False}
    details = {"from": {"status": "running", "worker_id": worker_id, "worker_instance": instance, "step": step,
                        "lease": lease, "attempts": attempts,
                        "started_at": _ms(started if postgres else iso_text(started)),
                        "heartbeat_at": _ms(heartbeat if postgres else iso_text(heartbeat))},
               "explanation": sentences, "thresholds": THRESHOLDS}
    item = {"id": audit_id, "target": target, "reasons": reasons, "status": "failed", "worker_id": worker_id,
            "explanation": sentences, "measured": measured}
    error = f"recovered ({joined}): {'; '.join(sentences)}"[:2000]
    return audit_id, lease, ",".join(reasons), error, info, measured, details, item


_PG_RECOVER = f"""
WITH v AS (
  SELECT * FROM unnest(%(ids)b::bigint[], %(leases)b::text[], %(reasons)b::text[], %(errors)b::text[], %(infos)b::text[],
                       %(measured)b::text[], %(details)b::text[], %(items)b::text[])
         AS v(id, lease, reasons, error, info, measured, details, item)
), changed AS (
  UPDATE audits a SET status = 'failed', lease = NULL, finished_at = statement_timestamp(), error = v.error,
         recovery_reasons = v.reasons,
         recovery_info = v.info::jsonb || jsonb_build_object(
             'recovered_at', to_char(statement_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
             'original_status', to_jsonb(a) - 'recovery_info' - 'odd_times'),
         progress = jsonb_set(a.progress, '{{progress,is_running}}', 'false')
  FROM v
  WHERE a.id = v.id AND a.status = 'running' AND a.lease = v.lease
    AND (a.heartbeat_at < {_PG_CUT.format('%(stale)s')} OR a.started_at < {_PG_CUT.format('%(age)s')}
         OR a.progress_changed_at < {_PG_CUT.format('%(stall)s')})
  RETURNING a.id, v.reasons, v.measured, v.details, v.item
), events AS (
  INSERT INTO audit_events (audit_id, at, event, from_status, to_status, reasons, measurements, actor, host, pid, details)
  SELECT id, statement_timestamp(), 'recovered', 'running', 'failed', reasons, measured::jsonb, %(actor)s, %(host)s,
         %(pid)s, details::jsonb
  FROM changed
), outbox AS (
  INSERT INTO notifications (created_at, event, payload, expires_at)
  SELECT statement_timestamp(), 'recovered',
         jsonb_build_object('actor', %(actor)s, 'host', %(host)s, 'audits', jsonb_agg(item::jsonb ORDER BY id)),
         statement_timestamp() + interval '24 hours'
  FROM changed HAVING count(*) > 0
)
SELECT count(*) FROM changed
"""

_SQLITE_ORIGINAL = "json_object(" + ", ".join(
    f"'{c}', json({c})" if c == "progress" else f"'{c}', {c}" for c in ORIGINAL_COLUMNS) + ")"
_SQLITE_RECOVER = (
    "UPDATE audits SET status = 'failed', lease = NULL, finished_at = :now, error = :error, recovery_reasons = :reasons, "
    f"recovery_info = json_set(:info, '$.original_status', {_SQLITE_ORIGINAL}), "
    "progress = json_set(progress, '$.progress.is_running', json('false')) "
    "WHERE id = :id AND status = 'running' AND lease = :lease "
    f"AND (heartbeat_at < {_SQLITE_CUT.format(':stale')} OR started_at < {_SQLITE_CUT.format(':age')} "
    f"OR progress_changed_at < {_SQLITE_CUT.format(':stall')})"
)
_SQLITE_EVENT = ("INSERT INTO audit_events (audit_id, at, event, from_status, to_status, reasons, measurements, actor, host, "
                 "pid, details) VALUES (?, ?, 'recovered', 'running', 'failed', ?, ?, ?, ?, ?, ?)")
_SQLITE_OUTBOX = ("INSERT INTO notifications (created_at, event, payload, expires_at) "
                  "VALUES (?, 'recovered', ?, strftime('%Y-%m-%d %H:%M:%f', ?, '+1 day') || '000')")


def recover(url: str, batch: int = BATCH) -> int:
    """Recover every stuck audit as the library does, batch by batch; returns how many changed."""
    postgres = is_postgres(url)
    connection = connect(url)
    host, pid = socket.gethostname(), os.getpid()
    values = params(url)
    total = 0
    try:
        plans = [_plan(row, postgres) for row in scan_rows(connection, url).fetchall()]
        for start in range(0, len(plans), batch):
            chunk = plans[start:start + batch]
            if postgres:
                ids, leases, reasons, errors, infos, measured, details, items = zip(*chunk)
                total += connection.execute(_PG_RECOVER, {
                    "ids": list(ids), "leases": list(leases), "reasons": list(reasons), "errors": list(errors),
                    "infos": [json.dumps(i) for i in infos], "measured": [json.dumps(m) for m in measured],
                    "details": [json.dumps(d) for d in details], "items": [json.dumps(i) for i in items],
                    "actor": _ACTOR, "host": host, "pid": pid, **values,
                }).fetchone()[0]
                continue
            connection.execute("BEGIN IMMEDIATE")
            try:
                now = connection.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now') || '000'").fetchone()[0]
                stamp = iso_text(now)[:23] + "Z"
                changed = connection.executemany(_SQLITE_RECOVER, [
                    {"id": audit_id, "lease": lease, "reasons": reasons, "error": error, "now": now,
                     "info": json.dumps({"recovered_at": stamp, **info}), **values}
                    for audit_id, lease, reasons, error, info, _m, _d, _i in chunk]).rowcount
                if changed != len(chunk):
                    raise RuntimeError(f"raw recovery changed {changed} of {len(chunk)}")
                connection.executemany(_SQLITE_EVENT, [
                    (audit_id, now, reasons, json.dumps(m), _ACTOR, host, pid, json.dumps(d))
                    for audit_id, _lease, reasons, _e, _info, m, d, _i in chunk])
                connection.execute(_SQLITE_OUTBOX, (now, json.dumps({"actor": _ACTOR, "host": host,
                                                                      "audits": [p[7] for p in chunk]}), now))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            total += changed
    finally:
        connection.close()
    return total


def recovery_state(url: str, ids) -> dict[int, tuple]:
    """Per audit: status, recovery_reasons, recovery_info's keys, original_status's keys, history rows, is_running."""
    connection = connect(url)
    try:
        counts = dict(connection.execute("SELECT audit_id, count(*) FROM audit_events GROUP BY audit_id").fetchall())
        if is_postgres(url):
            rows = connection.execute("SELECT id, status, recovery_reasons, recovery_info::text, progress::text FROM audits "
                                      "WHERE id = ANY(%s)", [list(ids)]).fetchall()
        else:
            wanted = set(ids)
            rows = [r for r in connection.execute("SELECT id, status, recovery_reasons, recovery_info, progress FROM audits "
                                                  "WHERE status <> 'completed'") if r[0] in wanted]
    finally:
        connection.close()
    state = {}
    for audit_id, status, reasons, info, progress in rows:
        info = json.loads(info) if info else {}
        state[audit_id] = (status, reasons, tuple(sorted(info)), tuple(sorted(info.get("original_status") or {})),
                           counts.get(audit_id, 0), json.loads(progress)["progress"]["is_running"])
    return state


# --- the fenced heartbeat -------------------------------------------------------------------

HEARTBEAT_SQLITE = ("UPDATE audits SET heartbeat_at = strftime('%Y-%m-%d %H:%M:%f', 'now') || '000', "
                    "last_worker_update = strftime('%Y-%m-%d %H:%M:%f', 'now') || '000' "
                    "WHERE id = ? AND lease = ? AND status = 'running'")
HEARTBEAT_PG = ("UPDATE audits SET heartbeat_at = statement_timestamp(), last_worker_update = statement_timestamp() "
                "WHERE id = %s AND lease = %s AND status = 'running'")


def running_audit(connection, url: str, target: str) -> tuple[int, str]:
    """Insert one running audit under a fresh lease, as a claim would leave it; returns (id, lease)."""
    import uuid

    lease = uuid.uuid4().hex
    document = json.dumps({"progress": {"step": "Crawling", "percentage": 7.5, "completed_tasks": 3, "total_tasks": 40,
                                        "is_running": True, "last_updated": None, "heartbeat": None,
                                        "worker_id": "bench-raw", "worker_url": None}, "last_worker_update": None})
    if is_postgres(url):
        sql = ("INSERT INTO audits (target, status, progress, created_at, started_at, heartbeat_at, last_worker_update, "
               "progress_changed_at, attempts, worker_id, worker_instance, lease, declared_heartbeat_interval) VALUES "
               "(%s, 'running', %s::jsonb, now(), now(), now(), now(), now(), 1, 'bench-raw', 'bench-raw', %s, 30) "
               "RETURNING id")
        return connection.execute(sql, (target, document, lease)).fetchone()[0], lease
    now = "strftime('%Y-%m-%d %H:%M:%f', 'now') || '000'"
    sql = ("INSERT INTO audits (target, status, progress, created_at, started_at, heartbeat_at, last_worker_update, "
           f"progress_changed_at, attempts, worker_id, worker_instance, lease, declared_heartbeat_interval) VALUES "
           f"(?, 'running', ?, {now}, {now}, {now}, {now}, {now}, 1, 'bench-raw', 'bench-raw', ?, 30) RETURNING id")
    return connection.execute(sql, (target, document, lease)).fetchone()[0], lease


def explain(url: str) -> str:
    """The plan of the lean query."""
    connection = connect(url)
    try:
        if is_postgres(url):
            rows = connection.execute("EXPLAIN " + LEAN_PG, params(url)).fetchall()
            return "\n".join(f"  {r[0]}" for r in rows)
        rows = [r[-1] for r in connection.execute("EXPLAIN QUERY PLAN " + LEAN_SQLITE, params(url))]
        cuts = sum(r.startswith("SCALAR SUBQUERY") for r in rows)
        shown = [r for r in rows if not r.startswith("SCALAR SUBQUERY") and r != "SCAN CONSTANT ROW"]
        return "\n".join(f"  {r}" for r in shown) + f"\n  ({cuts} scalar subqueries: the cutoffs, once each)"
    finally:
        connection.close()
