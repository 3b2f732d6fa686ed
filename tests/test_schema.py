"""The shipped migrations: idempotent, safe to run from several processes at once, and exactly schema.metadata."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time

import pytest

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from dbtools import finish, kill_quietly, read_line, spawn, wait_for
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from auditctl import leases
from auditctl.db import create_engine
from auditctl.migrate import _MIGRATION_LOCK_KEY, head_revision, upgrade
from auditctl.schema import metadata


def schema_of(engine) -> dict:
    """Everything the migrations decide: tables, columns, keys, indexes, and the recorded revision."""
    inspector = inspect(engine)
    shape = {}
    for table in sorted(inspector.get_table_names()):
        shape[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
        }
    with engine.connect() as connection:
        shape["revision"] = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return shape


def test_upgrade_creates_the_schema_once_and_a_second_call_changes_nothing(blank_database_url):
    engine = create_engine(blank_database_url)
    try:
        assert "alembic_version" not in inspect(engine).get_table_names()

        first = upgrade(engine)
        assert (first.before, first.after, first.changed) == (None, head_revision(), True)
        created = schema_of(engine)
        assert {"audits", "audit_events", "workers", "alembic_version"} <= set(created)
        audit_id = leases.create_audit(engine, "https://example.com")

        second = upgrade(engine)
        assert (second.before, second.after, second.changed) == (head_revision(), head_revision(), False)
        assert schema_of(engine) == created
        assert created["revision"] == [head_revision()]
        with engine.connect() as connection:  # data survives a repeated init
            assert connection.execute(text("SELECT target FROM audits WHERE id = :id"), {"id": audit_id}).scalar() == \
                "https://example.com"
    finally:
        engine.dispose()


def test_migrations_produce_exactly_the_schema_in_metadata(blank_database_url):
    engine = create_engine(blank_database_url)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
            differences = compare_metadata(context, metadata)
        assert differences == []
        assert set(inspect(engine).get_table_names()) == set(metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


UPGRADER = r"""
import json, sys
from auditctl.db import create_engine
from auditctl.migrate import upgrade

import alembic.command
from auditctl.migrate import head_revision

head_revision()  # load alembic and the migration scripts now, so the upgrades really overlap
engine = create_engine(sys.argv[1])
print("READY", flush=True)
sys.stdin.readline()
print("GO", flush=True)
result = upgrade(engine)
print("DONE " + json.dumps([result.before, result.after]), flush=True)
"""


@contextlib.contextmanager
def migration_lock_held(database_url):
    """Hold the lock upgrade() takes, so every upgrader is made to wait for the same moment.

    Yields a function that returns once ``count`` upgraders are queued on it.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        holder = sqlite3.connect(url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            # SQLite shows no queue of waiting writers to poll; by now they are blocked on the lock.
            yield lambda count: time.sleep(0.5)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = create_engine(database_url)
    waiting = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    try:
        with engine.connect() as connection, engine.connect() as observer:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            connection.commit()

            def all_waiting(count):
                def queued():
                    found = observer.execute(waiting).scalar()
                    observer.rollback()
                    return found >= count
                wait_for(queued, message="the upgraders to queue on the lock")

            try:
                yield all_waiting
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                connection.commit()
    finally:
        engine.dispose()


def test_several_processes_upgrading_a_blank_database_at_once_all_succeed(blank_database_url, tmp_path):
    script = tmp_path / "upgrader.py"
    script.write_text(UPGRADER)
    procs = [spawn(script, blank_database_url, stdin=subprocess.PIPE) for _ in range(4)]
    try:
        for proc in procs:
            read_line(proc, startswith="READY")
        with migration_lock_held(blank_database_url) as all_waiting:
            for proc in procs:  # release them together, against a lock none of them has yet
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                read_line(proc, startswith="GO")
            all_waiting(len(procs))
        results = []
        for proc in procs:
            code, out, err = finish(proc, timeout=60)
            assert code == 0, err
            (done,) = [line for line in out.splitlines() if line.startswith("DONE ")]
            results.append(tuple(json.loads(done[5:])))
    finally:
        for proc in procs:
            kill_quietly(proc)

    head = head_revision()
    assert all(after == head for _, after in results)
    assert sorted(results, key=str) == sorted([(None, head)] + [(head, head)] * 3, key=str)  # exactly one created it
    engine = create_engine(blank_database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            assert compare_metadata(context, metadata) == []
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    finally:
        engine.dispose()


def test_a_worker_on_a_database_at_an_older_revision_is_told_to_run_init_not_that_the_database_is_down(
        blank_database_url):
    """SQLite words a missing column in an INSERT as "has no column named": that read as an outage
    (DatabaseUnavailable, retried) where PostgreSQL's wording already gave SchemaMissing."""
    import pytest
    from alembic import command

    from auditctl import StuckAuditPrevention
    from auditctl.errors import SchemaMissing
    from auditctl.migrate import _alembic_config

    engine = create_engine(blank_database_url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0001")
    engine.dispose()
    with pytest.raises(SchemaMissing, match="run `auditctl init`"):
        StuckAuditPrevention(blank_database_url, worker_id="worker-1", create_schema=False)


def test_creating_the_schema_logs_no_alembic_steps_into_a_workers_info_log(blank_database_url, caplog):
    """A worker's log at INFO holds its own events: Alembic's step-by-step INFO lines are held back,
    and its logger's level is left as it was."""
    import logging

    engine = create_engine(blank_database_url)
    before = logging.getLogger("alembic").level
    try:
        with caplog.at_level(logging.INFO):
            assert upgrade(engine).changed
        assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []
        assert logging.getLogger("alembic").level == before
    finally:
        engine.dispose()


def run(*args):
    from click.testing import CliRunner

    from auditctl.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _recorded(url) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version ORDER BY version_num")).scalars().all()
    finally:
        engine.dispose()


def test_init_and_a_workers_start_refuse_in_one_line_when_alembic_version_holds_two_rows(database_url, tmp_path):
    """Alembic's own error ("more than one head present; please use get_current_heads()") came out of
    `init` as a traceback and out of a worker's start as a raw alembic CommandError; recover, reading the
    first row only, went on changing a schema whose revision may be one it does not know."""
    import pytest

    from auditctl import StuckAuditPrevention
    from auditctl.errors import AuditctlError
    from dbtools import make_running

    engine = create_engine(database_url)
    make_running(engine, 1, silent_for=3600)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO alembic_version VALUES ('0099')"))
    engine.dispose()
    for command in (["init"], ["recover"]):
        result = run(*command, "--database-url", database_url)
        assert result.exit_code == 1 and "Traceback" not in result.output, (command, result.output)
        line = result.stderr.strip().splitlines()[-1]
        assert "alembic_version holds 2 rows (0004, 0099)" in line and "nothing was changed" in line, (command, line)
    with pytest.raises(AuditctlError, match="alembic_version holds 2 rows"):
        StuckAuditPrevention(database_url, worker_id="worker-1")
    assert _recorded(database_url) == ["0004", "0099"]
    assert json.loads(run("scan", "-o", "json", "--database-url", database_url).stdout)[0]["status"] == "running", \
        "the readers still read it, and nothing was recovered"


@pytest.mark.parametrize("how", ["emptied", "dropped", "made by hand"])
def test_init_on_auditctls_own_tables_without_a_recorded_revision_says_how_to_record_it_when_created_by_hand(
        blank_database_url, how):
    """auditctl's own tables with no row in alembic_version (or no such table: made from schema.py by
    hand, the record deleted) were refused as "tables named like auditctl's that auditctl did not create;
    point --database-url at a file of auditctl's own": advice that sends an operator away from the
    fleet's own data. The line says the revision is not recorded and how to record it; following it works."""
    from sqlalchemy import inspect as inspect_

    from auditctl import StuckAuditPrevention
    from auditctl.errors import SchemaMissing
    from auditctl.schema import metadata

    engine = create_engine(blank_database_url)
    if how == "made by hand":
        metadata.create_all(engine)
    else:
        upgrade(engine)
    audit_id = leases.create_audit(engine, "https://kept.example")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version" if how == "emptied" else "DROP TABLE IF EXISTS alembic_version"))
    result = run("init", "--database-url", blank_database_url)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "did not create" not in line and "of auditctl's own" not in line, line
    assert "no record of their schema revision" in line and "nothing was changed" in line, line
    with pytest.raises(SchemaMissing, match="no record of their schema revision"):
        StuckAuditPrevention(blank_database_url, worker_id="worker-1")
    assert ("alembic_version" in inspect_(engine).get_table_names()) == (how == "emptied"), "nothing was created"
    if how == "made by hand" and engine.dialect.name == "sqlite":
        # Without the triggers revision 0002 makes on SQLite: recording 0004 would leave them out.
        assert "restore the database from a backup" in line and "INSERT" not in line, line
        engine.dispose()
        return

    advice = line.split("record it with: ", 1)[1].split(", then run", 1)[0]
    with engine.begin() as connection:
        for statement in advice.split("; "):
            connection.execute(text(statement))
    again = run("init", "--database-url", blank_database_url)
    assert again.exit_code == 0 and f"Schema already at revision {head_revision()}" in again.output, again.output
    assert leases.create_audit(engine, "https://new.example") > audit_id
    assert [r["target"] for r in json.loads(run("list", "-o", "json", "--database-url", blank_database_url).stdout)] == \
        ["https://new.example", "https://kept.example"]
    engine.dispose()


def test_init_on_auditctls_tables_of_an_older_revision_without_a_recorded_revision_says_to_restore_them(
        blank_database_url):
    """Tables of revision 0001 with the record gone: which migrations they need cannot be told, and
    recording the head's revision would skip them; the line says to restore from a backup."""
    from alembic import command

    from auditctl.migrate import _alembic_config

    engine = create_engine(blank_database_url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    result = run("init", "--database-url", blank_database_url)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "no record of their schema revision" in line, line
    assert "restore the database from a backup" in line and "INSERT" not in line, line


@pytest.mark.parametrize("recorded", ["garbage", "0004 ", "", "0002\n"])
def test_init_and_recover_say_the_record_was_edited_not_to_upgrade_auditctl_when_the_revision_is_not_a_revision(
        database_url, recorded):
    """A revision no auditctl writes ("garbage", "0004 " with a space, an empty string) was taken for
    a newer auditctl's: "at schema revision 0004 , which this auditctl does not know (it knows up to
    0004): ... upgrade auditctl", advice that cannot help."""
    from auditctl import StuckAuditPrevention
    from auditctl.errors import AuditctlError
    from dbtools import make_running

    engine = create_engine(database_url)
    make_running(engine, 1, silent_for=3600)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": recorded})
    engine.dispose()
    shown = recorded.replace("\n", "\\n")
    for command in (["init"], ["recover"]):
        result = run(*command, "--database-url", database_url)
        line = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 1 and "Traceback" not in result.output, (command, result.output)
        assert f"records schema revision '{shown}', which is no auditctl revision" in line, (command, line)
        assert "upgrade auditctl" not in line and "nothing was changed" in line, (command, line)
    with pytest.raises(AuditctlError, match="which is no auditctl revision"):
        StuckAuditPrevention(database_url, worker_id="worker-1")
    assert _recorded(database_url) == [recorded]


def test_a_four_digit_revision_past_the_newest_is_still_a_newer_auditctls(database_url):
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0005'"))
    engine.dispose()
    result = run("init", "--database-url", database_url)
    assert result.exit_code == 1 and "a newer auditctl migrated it; upgrade auditctl" in result.stderr, result.output


@pytest.mark.parametrize("recorded", ["0001", "0003"])
def test_init_on_tables_already_past_the_recorded_revision_says_so_not_that_the_database_is_unavailable(
        database_url, recorded):
    """alembic_version set back by hand (or restored apart from the tables): the migration met a column
    or index that already exists, and init said "database unavailable at ...: index ... already exists"
    (on SQLite an outage, which a worker's start would take as one to retry), without saying whether
    anything had changed."""
    from auditctl import StuckAuditPrevention
    from auditctl.errors import DatabaseRefused

    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": recorded})
    before = schema_of(engine)
    result = run("init", "--database-url", database_url)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "unavailable" not in line and f"from revision {recorded}" in line, line
    assert "the tables already hold what the migration adds" in line and line.endswith("nothing was changed"), line
    with pytest.raises(DatabaseRefused, match="the tables already hold what the migration adds") as caught:
        StuckAuditPrevention(database_url, worker_id="worker-1")
    assert type(caught.value) is DatabaseRefused
    assert schema_of(engine) == before
    engine.dispose()


def test_another_applications_alembic_version_with_two_rows_is_still_named_as_theirs(tmp_path):
    """Several rows are an Alembic application's branches: without auditctl's tables beside them they
    are another application's record, named by its first row, as with one."""
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('abc'), ('def')")
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    for command in (["init"], ["scan"]):
        result = run(*command, "--database-url", f"sqlite:///{path}")
        line = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 1 and "records another application's Alembic revision (abc)" in line, line
    with sqlite3.connect(path) as connection:
        assert sorted(r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")) == \
            ["alembic_version", "customers"]
