"""The hand-written baselines: the stuck query and a batched recovery straight through the drivers.

These return the same rows (and make the same changes) as the library, so the
benchmark compares like with like: a ratio over 1 is what the library's layers cost.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone

from sqlalchemy.engine import make_url

SQLITE_STUCK = """
SELECT id, target, status, worker_id, worker_instance, lease, started_at, heartbeat_at, progress,
       age, silence, unchanged, lim
FROM (
  SELECT id, target, status, worker_id, worker_instance, lease, started_at, heartbeat_at, progress, age, lim,
         COALESCE(CASE WHEN hb >= -60 THEN hb END, CASE WHEN lwu >= -60 THEN lwu END, age) AS silence,
         COALESCE(CASE WHEN pc >= -60 THEN pc END, age) AS unchanged
  FROM (
    SELECT *, (julianday('now') - julianday(COALESCE(started_at, created_at))) * 86400.0 AS age,
           (julianday('now') - julianday(heartbeat_at)) * 86400.0 AS hb,
           (julianday('now') - julianday(last_worker_update)) * 86400.0 AS lwu,
           (julianday('now') - julianday(progress_changed_at)) * 86400.0 AS pc,
           CASE WHEN max_age_seconds > 0 THEN max_age_seconds ELSE :max_age END AS lim
    FROM audits WHERE status = 'running'
  )
)
WHERE silence IS NULL OR silence > :stale OR age > lim OR (NOT (silence IS NULL OR silence > :stale) AND unchanged > :stall)
ORDER BY id
"""

PG_STUCK = """
SELECT id, target, status, worker_id, worker_instance, lease, started_at, heartbeat_at, progress,
       age, silence, unchanged, lim
FROM (
  SELECT id, target, status, worker_id, worker_instance, lease, started_at, heartbeat_at, progress, age, lim,
         COALESCE(CASE WHEN hb >= -60 THEN hb END, CASE WHEN lwu >= -60 THEN lwu END, age) AS silence,
         COALESCE(CASE WHEN pc >= -60 THEN pc END, age) AS unchanged
  FROM (
    SELECT *, EXTRACT(EPOCH FROM statement_timestamp() - COALESCE(started_at, created_at)) AS age,
           EXTRACT(EPOCH FROM statement_timestamp() - heartbeat_at) AS hb,
           EXTRACT(EPOCH FROM statement_timestamp() - last_worker_update) AS lwu,
           EXTRACT(EPOCH FROM statement_timestamp() - progress_changed_at) AS pc,
           CASE WHEN max_age_seconds > 0 THEN max_age_seconds ELSE %(max_age)s END AS lim
    FROM audits WHERE status = 'running'
  ) a
) b
WHERE silence IS NULL OR silence > %(stale)s OR age > lim OR (NOT (silence IS NULL OR silence > %(stale)s) AND unchanged > %(stall)s)
ORDER BY id
"""


def dsn(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _params(thresholds):
    return {"stale": thresholds.stale_after, "max_age": thresholds.max_age, "stall": thresholds.stall_after}


def _sqlite(url: str):
    import sqlite3

    connection = sqlite3.connect(make_url(url).database, timeout=30, isolation_level=None)
    return connection


_OPEN: dict[str, object] = {}


def _kept(url: str):
    """One open connection per database, as the library's pool keeps one: timing the query, not the connect."""
    if url not in _OPEN:
        if url.startswith("sqlite"):
            _OPEN[url] = _sqlite(url)
        else:
            import psycopg

            _OPEN[url] = psycopg.connect(dsn(url), autocommit=True)
    return _OPEN[url]


def close_all() -> None:
    while _OPEN:
        _OPEN.popitem()[1].close()


def stuck(url: str, thresholds) -> list[tuple]:
    return _kept(url).execute(SQLITE_STUCK if url.startswith("sqlite") else PG_STUCK, _params(thresholds)).fetchall()


def _parse(value):
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def naive(url: str, thresholds) -> list[int]:
    """Load every running audit into Python and judge it there."""
    query = ("SELECT id, created_at, started_at, heartbeat_at, last_worker_update, progress_changed_at, max_age_seconds, "
             "progress FROM audits WHERE status = 'running'")
    rows = _kept(url).execute(query).fetchall()
    now = datetime.now(timezone.utc)
    found = []
    for audit_id, created, started, heartbeat, lwu, changed, max_age, progress in rows:
        if isinstance(progress, str):
            json.loads(progress)
        start = _parse(started) or _parse(created)
        age = (now - start).total_seconds()
        seen = [(now - t).total_seconds() for t in (_parse(heartbeat), _parse(lwu)) if t is not None]
        seen = [s for s in seen if s >= -60]
        silence = seen[0] if seen else age
        moved = _parse(changed)
        unchanged = (now - moved).total_seconds() if moved is not None else age
        limit = max_age if max_age and max_age > 0 else thresholds.max_age
        stale = silence > thresholds.stale_after
        if stale or age > limit or (not stale and unchanged > thresholds.stall_after):
            found.append(audit_id)
    return found


def recover(url: str, thresholds, batch: int = 500) -> int:
    """Mark every stuck audit failed with recovery_info and a history row, in batches, by hand."""
    rows = stuck(url, thresholds)
    host, pid = socket.gethostname(), os.getpid()
    total = 0
    if url.startswith("sqlite"):
        connection = _sqlite(url)
        for start in range(0, len(rows), batch):
            ids = [r[0] for r in rows[start:start + batch]]
            marks = ",".join("?" * len(ids))
            connection.execute("BEGIN IMMEDIATE")
            now = connection.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").fetchone()[0]
            connection.execute(
                "INSERT INTO audit_events (audit_id, at, event, from_status, to_status, reasons, actor, host, pid, details) "
                f"SELECT id, ?, 'recovered', 'running', 'failed', 'stale_heartbeat', 'raw', ?, ?, "
                "json_object('original_status', json_object('status', status, 'worker_id', worker_id, 'lease', lease, "
                "'progress', json(progress), 'started_at', started_at, 'heartbeat_at', heartbeat_at)) "
                f"FROM audits WHERE id IN ({marks})", [now, host, pid, *ids])
            total += connection.execute(
                "UPDATE audits SET status = 'failed', finished_at = ?, lease = NULL, error = 'recovered', "
                "recovery_reasons = 'stale_heartbeat', recovery_info = json_object('recovered_at', ?, 'reason', "
                "'stale_heartbeat', 'original_status', json_object('status', status, 'worker_id', worker_id, 'lease', lease, "
                "'progress', json(progress), 'started_at', started_at, 'heartbeat_at', heartbeat_at)) "
                f"WHERE status = 'running' AND id IN ({marks})", [now, now, *ids]).rowcount
            connection.execute("COMMIT")
        connection.close()
        return total
    import psycopg

    with psycopg.connect(dsn(url)) as connection:
        for start in range(0, len(rows), batch):
            ids = [r[0] for r in rows[start:start + batch]]
            with connection.transaction():
                connection.execute("SELECT id FROM audits WHERE id = ANY(%s) FOR UPDATE SKIP LOCKED", [ids])
                connection.execute(
                    "INSERT INTO audit_events (audit_id, at, event, from_status, to_status, reasons, actor, host, pid, details) "
                    "SELECT id, statement_timestamp(), 'recovered', 'running', 'failed', 'stale_heartbeat', 'raw', %s, %s, "
                    "jsonb_build_object('original_status', to_jsonb(a.*)) FROM audits a WHERE id = ANY(%s)", [host, pid, ids])
                total += connection.execute(
                    "UPDATE audits a SET status = 'failed', finished_at = statement_timestamp(), lease = NULL, "
                    "error = 'recovered', recovery_reasons = 'stale_heartbeat', recovery_info = jsonb_build_object("
                    "'recovered_at', statement_timestamp(), 'reason', 'stale_heartbeat', 'original_status', to_jsonb(a.*)) "
                    "WHERE status = 'running' AND id = ANY(%s)", [ids]).rowcount
    return total


def explain(url: str, thresholds) -> str:
    if url.startswith("sqlite"):
        connection = _sqlite(url)
        plan = connection.execute("EXPLAIN QUERY PLAN " + SQLITE_STUCK, _params(thresholds)).fetchall()
        connection.close()
        return "\n".join(f"  {row[-1]}" for row in plan)
    import psycopg

    with psycopg.connect(dsn(url)) as connection:
        plan = connection.execute("EXPLAIN " + PG_STUCK, _params(thresholds)).fetchall()
    return "\n".join(f"  {row[0]}" for row in plan)
