"""Helpers shared by the recovery, worker, bad-input and schema tests.

Reading rows and history straight from the tables, making many stuck audits at once,
installing triggers that make the database itself refuse a write, and driving real
subprocesses (wait for a line, wait for exit) with deadlines instead of sleeps.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, text
from sqlalchemy import select as sa_select

from auditctl.schema import RUNNING, audit_events, audits, workers
from auditctl.sqlfunctions import fetch_now
from auditctl.transactions import read_connection, write_transaction

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --- reading --------------------------------------------------------------------------


def row(engine, audit_id: int) -> dict:
    """The audit's full row, every column, as the library reads it."""
    with read_connection(engine) as connection:
        found = connection.execute(sa_select(audits).where(audits.c.id == audit_id)).first()
    assert found is not None, f"audit {audit_id} is gone"
    return dict(found._mapping)


def all_rows(engine) -> list[dict]:
    with read_connection(engine) as connection:
        return [dict(r._mapping) for r in connection.execute(sa_select(audits).order_by(audits.c.id))]


def raw_column(engine, audit_id: int, column: str):
    """A column's stored value, bypassing the library's types (what another tool would see)."""
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT {column} FROM audits WHERE id = :id"), {"id": audit_id}).scalar()


def events(engine, audit_id: int | None = None) -> list[dict]:
    """History rows, oldest first (all of them, or one audit's)."""
    query = sa_select(audit_events).order_by(audit_events.c.id)
    if audit_id is not None:
        query = query.where(audit_events.c.audit_id == audit_id)
    with read_connection(engine) as connection:
        return [dict(r._mapping) for r in connection.execute(query)]


def worker_rows(engine, worker_id: str | None = None) -> list[dict]:
    query = sa_select(workers).order_by(workers.c.started_at)
    if worker_id is not None:
        query = query.where(workers.c.worker_id == worker_id)
    with read_connection(engine) as connection:
        return [dict(r._mapping) for r in connection.execute(query)]


def db_time(engine) -> datetime:
    with read_connection(engine) as connection:
        return fetch_now(connection)


# --- making audits --------------------------------------------------------------------


def make_running(engine, count: int, *, silent_for: float = 700, age: float | None = None, worker_id: str = "worker-1",
                 instance_id: str = "instance-1") -> list[int]:
    """Insert ``count`` running audits under fresh leases, last heard from ``silent_for`` seconds ago."""
    age = silent_for if age is None else age
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        heard, started = now - timedelta(seconds=silent_for), now - timedelta(seconds=age)
        first = connection.execute(sa_select(func.coalesce(func.max(audits.c.id), 0))).scalar_one()
        connection.execute(insert(audits), [
            {"target": f"https://example.com/{i}", "status": RUNNING, "created_at": started, "started_at": started,
             "attempts": 1, "worker_id": worker_id, "worker_instance": instance_id, "lease": uuid.uuid4().hex,
             "heartbeat_at": heard, "last_worker_update": heard, "progress_changed_at": heard,
             "progress": {"progress": {"step": "Crawling", "percentage": 10.0, "is_running": True}}}
            for i in range(count)
        ])
        ids = connection.execute(sa_select(audits.c.id).where(audits.c.id > first).order_by(audits.c.id)).scalars().all()
    assert len(ids) == count
    return list(ids)


# --- making the database refuse writes -------------------------------------------------


def install_abort_trigger(engine, name: str, *, table: str = "audits", event: str = "UPDATE",
                          when_sqlite: str | None = None, when_pg: str | None = None, errcode: str | None = None) -> None:
    """A trigger that makes the database reject matching writes with a real error ('boom'); on
    PostgreSQL ``errcode`` gives it a SQLSTATE (42501: no privilege, 57P01: an administrator's shutdown)."""
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            when = f" WHEN {when_sqlite}" if when_sqlite else ""
            connection.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{when} BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        else:
            connection.exec_driver_sql(
                f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'"
                + (f" USING ERRCODE = '{errcode}'" if errcode else "") + "; END $$"
            )
            when = f" WHEN ({when_pg})" if when_pg else ""
            connection.exec_driver_sql(
                f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{when} EXECUTE FUNCTION {name}_fn()"
            )


def drop_trigger(engine, name: str, *, table: str = "audits") -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql(f"DROP TRIGGER {name}")
        else:
            connection.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
            connection.exec_driver_sql(f"DROP FUNCTION {name}_fn()")


def fail_progress_writes(engine, name: str = "refuse_progress") -> None:
    """Abort every UPDATE that changes the ``progress`` column (and only those)."""
    install_abort_trigger(engine, name, event="UPDATE OF progress",
                          when_sqlite="NEW.progress IS NOT OLD.progress",
                          when_pg="NEW.progress IS DISTINCT FROM OLD.progress")


# --- waiting ----------------------------------------------------------------------------


def wait_for(predicate, *, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# --- freezing a worker -----------------------------------------------------------------


def is_stopped(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def writer_holds_a_lock(engine, audit_id) -> bool:
    """Whether a (frozen) worker is inside a write transaction that would make recovery wait."""
    if engine.dialect.name == "sqlite":
        probe = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    with engine.connect() as connection:
        try:
            connection.execute(text("SELECT id FROM audits WHERE id = :id FOR UPDATE NOWAIT"), {"id": audit_id})
            return False
        except sa_exc.OperationalError:
            return True
        finally:
            connection.rollback()


def freeze_between_writes(proc, engine, audit_id):
    """SIGSTOP the worker, retrying until it froze outside a transaction (SQLite would block on its lock)."""
    for _ in range(100):
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: is_stopped(proc.pid), timeout=5, message="SIGSTOP to take effect")
        if not writer_holds_a_lock(engine, audit_id):
            return
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.013)  # let it leave the transaction, then try again at another moment
    raise AssertionError("could not freeze the worker between two writes")


# --- subprocesses ----------------------------------------------------------------------


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(script: Path, *args, stdin=subprocess.DEVNULL, env: dict | None = None) -> subprocess.Popen:
    """Start ``python script args...`` with the test's interpreter; stdout is a text pipe."""
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**python_env(), **(env or {})}, cwd=script.parent,
    )


def _pumps(proc: subprocess.Popen):
    """Threads that drain the child's stdout (line by line, into a queue) and stderr.

    select() on the pipe cannot be used with a buffered reader: two lines that arrive in
    one chunk would leave the second in Python's buffer, invisible to select(), and the
    test would wait for output that is already there. Draining stderr also keeps a chatty
    child from blocking on a full pipe.
    """
    if not hasattr(proc, "_lines"):
        proc._lines = queue.Queue()
        proc._stdout_seen = []
        proc._stderr_seen = []

        def pump_stdout():
            for line in proc.stdout:
                proc._stdout_seen.append(line)
                proc._lines.put(line)
            proc._lines.put(None)

        def pump_stderr():
            for line in proc.stderr:
                proc._stderr_seen.append(line)

        proc._pump_threads = [threading.Thread(target=pump_stdout, daemon=True),
                              threading.Thread(target=pump_stderr, daemon=True)]
        for thread in proc._pump_threads:
            thread.start()
    return proc._lines


def read_line(proc: subprocess.Popen, *, timeout: float = 30.0, startswith: str = "") -> str:
    """The next stdout line starting with ``startswith``; fails with the process's stderr on timeout or exit."""
    lines = _pumps(proc)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"no {startswith!r} line from subprocess in {timeout}s; stderr:\n{''.join(proc._stderr_seen)}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            proc.wait(5)
            for thread in proc._pump_threads:
                thread.join(5)
            raise AssertionError(f"subprocess exited ({proc.returncode}) before printing {startswith!r}; "
                                 f"stderr:\n{''.join(proc._stderr_seen)}")
        if line.startswith(startswith):
            return line.strip()


def finish(proc: subprocess.Popen, *, timeout: float = 30.0) -> tuple[int, str, str]:
    """Wait for exit; returns (returncode, stdout, stderr), stdout being what no read_line consumed."""
    if not hasattr(proc, "_lines"):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"subprocess did not exit within {timeout}s; stderr:\n{err}")
        return proc.returncode, out, err
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"subprocess did not exit within {timeout}s; stderr:\n{''.join(proc._stderr_seen)}")
    for thread in proc._pump_threads:
        thread.join(10)
    unread = []
    while True:
        try:
            line = proc._lines.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            unread.append(line)
    return proc.returncode, "".join(unread), "".join(proc._stderr_seen)


def kill_quietly(proc: subprocess.Popen) -> None:
    """Test cleanup: make sure a subprocess we started is gone and reaped."""
    if proc.poll() is None:
        proc.kill()
    try:
        if hasattr(proc, "_lines"):
            proc.wait(10)
        else:
            proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        pass


def registry_row_unreadable(monkeypatch, instance_id: str) -> None:
    """Make reading one worker-registry row fail, as another tool's row one day might: no stored
    value found so far makes ``registry._instance`` raise (each reader turns it into None)."""
    from auditctl import registry

    reading = registry._instance

    def failing_on_one(mapping):
        if mapping["instance_id"] == instance_id:
            raise ValueError("year 0 is out of range")
        return reading(mapping)

    monkeypatch.setattr(registry, "_instance", failing_on_one)
