"""What an operator setting auditctl up on a shared PostgreSQL meets: a schema of its own on a search
path that ends in ``public``, another application's ``audits`` table, and a connect timeout of the URL's."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine as plain_engine
from sqlalchemy import inspect, text

from auditctl.cli import cli
from auditctl.dburl import normalize_url

ANOTHER_APPLICATIONS_TABLE = "CREATE TABLE public.audits (id INTEGER PRIMARY KEY, name TEXT)"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def with_search_path(url: str, search_path: str) -> str:
    return f"{url}?options=-csearch_path%3D{search_path}"


@pytest.fixture
def theirs(blank_database_url):
    """The database as its owner sees it, with no auditctl anywhere in it."""
    engine = plain_engine(normalize_url(blank_database_url))
    yield engine
    engine.dispose()


def tables(engine, schema):
    return sorted(inspect(engine).get_table_names(schema=schema))


AUDITCTL_TABLES = ["alembic_version", "audit_events", "audits", "notification_deliveries", "notifications", "workers"]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("their_revision", [None, "0001"])
def test_init_takes_its_own_schema_first_on_a_search_path_that_ends_in_public(blank_database_url, theirs, their_revision):
    """The setup the refusal itself recommends: CREATE SCHEMA, then search_path=ac2,public. The other
    application's tables in public (even an Alembic revision auditctl also has) are none of init's business."""
    with theirs.begin() as connection:
        connection.execute(text(ANOTHER_APPLICATIONS_TABLE))
        connection.execute(text("INSERT INTO public.audits VALUES (1, 'theirs')"))
        if their_revision:
            connection.execute(text("CREATE TABLE public.alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
            connection.execute(text("INSERT INTO public.alembic_version VALUES (:r)"), {"r": their_revision})
        connection.execute(text("CREATE SCHEMA ac2"))
    url = with_search_path(blank_database_url, "ac2,public")

    result = run("init", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert tables(theirs, "ac2") == AUDITCTL_TABLES
    assert tables(theirs, "public") == (["alembic_version", "audits"] if their_revision else ["audits"])
    assert [c["name"] for c in inspect(theirs).get_columns("audits", schema="public")] == ["id", "name"]
    with theirs.connect() as connection:
        assert connection.execute(text("SELECT name FROM public.audits")).scalars().all() == ["theirs"]
        if their_revision:
            assert connection.execute(text("SELECT version_num FROM public.alembic_version")).scalar() == their_revision

    again = run("init", "--database-url", url)
    assert again.exit_code == 0 and "Traceback" not in again.output, again.output
    for command in (["demo"], ["scan"], ["list"], ["show", "1"]):
        result = run(*command, "--database-url", url)
        assert result.exit_code == 0, (command, result.output)
    with theirs.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM ac2.audits")).scalar() > 0
        assert connection.execute(text("SELECT name FROM public.audits")).scalars().all() == ["theirs"]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_init_takes_a_quoted_schema_set_for_the_database_before_public(blank_database_url, theirs):
    """ALTER DATABASE (or ROLE) ... SET search_path = "Ops-Audit", public: nothing in the URL at all."""
    with theirs.begin() as connection:
        connection.execute(text(ANOTHER_APPLICATIONS_TABLE))
        connection.execute(text('CREATE SCHEMA "Ops-Audit"'))
        database = connection.execute(text("SELECT current_database()")).scalar()
        connection.execute(text(f'ALTER DATABASE "{database}" SET search_path = "Ops-Audit", public'))

    result = run("init", "--database-url", blank_database_url)
    assert result.exit_code == 0, result.output
    assert tables(theirs, "Ops-Audit") == AUDITCTL_TABLES
    assert tables(theirs, "public") == ["audits"]
    assert run("scan", "--database-url", blank_database_url).exit_code == 0


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_init_still_refuses_another_applications_audits_table_in_the_schema_it_would_use(blank_database_url, theirs):
    with theirs.begin() as connection:
        connection.execute(text("CREATE SCHEMA ac2"))
        connection.execute(text("CREATE TABLE ac2.audits (id INTEGER PRIMARY KEY, name TEXT)"))
    result = run("init", "--database-url", with_search_path(blank_database_url, "ac2,public"))
    assert result.exit_code == 1
    assert "tables named like auditctl's (audits) that auditctl did not create" in last_line(result), result.output
    assert tables(theirs, "ac2") == ["audits"] and tables(theirs, "public") == []


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_init_upgrades_auditctls_tables_where_they_are_when_a_schema_is_made_first_on_the_search_path_later(
        blank_database_url, theirs):
    """auditctl's tables in public; later someone creates a schema that comes first on the search path
    (one named like the role, for "$user"). init (and a worker's start) upgrades them in place: new empty
    tables first on the path would take every read from then on."""
    from alembic import command

    from auditctl.migrate import _alembic_config, head_revision

    with theirs.begin() as connection:  # an older install, in public
        command.upgrade(_alembic_config(connection), "0001")
        connection.execute(text("INSERT INTO public.audits (target, status, created_at) VALUES ('https://a.example', "
                                "'pending', now())"))
        connection.execute(text("CREATE SCHEMA ac3"))
    later = with_search_path(blank_database_url, "ac3,public")
    result = run("init", "--database-url", later)
    assert result.exit_code == 0, result.output
    assert f"Schema upgraded at revision {head_revision()}" in result.output
    assert tables(theirs, "ac3") == [], "nothing created first on the path"
    with theirs.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM public.alembic_version")).scalar() == head_revision()
    again = run("init", "--database-url", later)
    assert again.exit_code == 0 and f"Schema already at revision {head_revision()}" in again.output, again.output
    listed = run("list", "-o", "json", "--database-url", later)
    assert listed.exit_code == 0 and [r["target"] for r in json.loads(listed.stdout)] == ["https://a.example"]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_init_on_a_search_path_whose_schemas_do_not_exist_says_so(blank_database_url, theirs):
    result = run("init", "--database-url", with_search_path(blank_database_url, "auditctl"))
    assert result.exit_code == 1
    line = last_line(result)
    assert "none of the schemas on its search_path (auditctl) exists" in line and "CREATE SCHEMA" in line, line
    assert tables(theirs, "public") == []


@pytest.mark.parametrize("engine_name", ["postgresql", "sqlite"], indirect=True)
def test_list_and_show_on_another_applications_audits_table_say_it_is_not_auditctls(blank_database_url):
    """PostgreSQL writes ``column audits.target does not exist`` (qualified, unquoted): not a raw SQL error."""
    engine = plain_engine(normalize_url(blank_database_url))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE audits (id INTEGER PRIMARY KEY, name TEXT)"))
        connection.execute(text("INSERT INTO audits VALUES (1, 'theirs')"))
    engine.dispose()
    for command in (["list"], ["show", "1"]):
        result = run(*command, "--database-url", blank_database_url)
        line = last_line(result)
        assert result.exit_code == 1, (command, result.output)
        assert "tables named like auditctl's (audits) that auditctl did not create" in line, (command, line)
        assert "does not exist" not in line and "no such column" not in line, (command, line)


def test_a_missing_column_is_a_missing_schema_in_every_wording_the_databases_use():
    from sqlalchemy import exc as sa_exc

    from auditctl.dberrors import database_error
    from auditctl.errors import SchemaMissing

    url = normalize_url("postgresql://nc:hunter2@db.example/y")
    for said in ('column "target" does not exist', "column audits.target does not exist",
                 'column "Odd Name".target does not exist', 'column audits."Target" does not exist',
                 'column "target" of relation "audits" does not exist',
                 'relation "audits" does not exist', "no such table: audits", "no such column: target",
                 "table audits has no column named target"):
        error = database_error(sa_exc.ProgrammingError("SELECT 1", {}, Exception(said)), url)
        assert isinstance(error, SchemaMissing), said
    other = database_error(sa_exc.ProgrammingError("SELECT 1", {}, Exception('function audits.x() does not exist')), url)
    assert not isinstance(other, SchemaMissing)


def test_a_refusal_of_the_roles_privileges_stops_a_change_but_a_read_is_told_as_a_read():
    """42501 on a write: WriteRefused (a change in batches stops at once). The same code on a read (a
    role without SELECT) is a plain refusal: no advice about writing or standbys."""
    from sqlalchemy import exc as sa_exc

    from auditctl.dberrors import database_error
    from auditctl.errors import DatabaseRefused, WriteRefused

    class Denied(Exception):
        sqlstate = "42501"

    url = normalize_url("postgresql://nc:hunter2@db.example/y")
    refused = sa_exc.ProgrammingError("UPDATE audits", {}, Denied("permission denied for table audits"))
    assert isinstance(database_error(refused, url, writing=True), WriteRefused)
    read = database_error(refused, url)
    assert isinstance(read, DatabaseRefused) and not isinstance(read, WriteRefused)
    assert "write" not in str(read) and "hunter2" not in str(read)


class _Refused(Exception):
    """Raised instead of connecting, once the parameters the driver would get are recorded."""


def _connect_timeout_given(engine, monkeypatch, budget=None):
    """The connect_timeout the driver is handed for a new connection of ``engine`` (never connects)."""
    import psycopg

    from auditctl.watchdog import connect_within, connection_class

    given = []

    def record(*_args, **kwargs):
        given.append(kwargs.get("connect_timeout"))
        raise _Refused()

    # A worker's engine connects through the deadline connection class, the others through psycopg.connect.
    monkeypatch.setattr(connection_class(), "connect", classmethod(lambda cls, *a, **k: record(*a, **k)))
    monkeypatch.setattr(psycopg, "connect", record)
    with pytest.raises(_Refused), connect_within(budget):
        engine.connect()
    engine.dispose()
    return given[0]


@pytest.mark.parametrize("role", ["reader", "worker"])
def test_a_connect_timeout_in_the_url_is_what_the_driver_is_given(monkeypatch, role):
    from auditctl.db import create_engine

    url = "postgresql://nc:hunter2@127.0.0.1:1/w"
    assert _connect_timeout_given(create_engine(f"{url}?connect_timeout=2", role=role), monkeypatch) == 2
    assert _connect_timeout_given(create_engine(url, role=role), monkeypatch) == 10, "auditctl's own without one"


@pytest.mark.parametrize("url_timeout, budget, expected", [(30, 2, 2), (2, 8, 2), (30, 5.5, 5), (30, 0.5, 2)])
def test_a_writes_budget_still_shortens_the_urls_connect_timeout_and_never_lengthens_it(monkeypatch, url_timeout,
                                                                                        budget, expected):
    from auditctl.db import create_engine

    engine = create_engine(f"postgresql://nc:hunter2@127.0.0.1:1/w?connect_timeout={url_timeout}", role="worker")
    assert _connect_timeout_given(engine, monkeypatch, budget) == expected


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_connect_timeout_in_the_url_of_a_real_server_is_taken(database_url):
    assert run("scan", "--database-url", f"{database_url}?connect_timeout=3").exit_code == 0


@pytest.mark.parametrize("value", ["abc", "0", "-5", "2.5", "1e3", "99999999999"])
def test_a_connect_timeout_that_is_not_a_whole_number_of_seconds_is_refused_in_one_line(value):
    url = f"postgresql://nc:hunter2@127.0.0.1:1/w?connect_timeout={value}"
    result = run("scan", "--database-url", url)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "connect_timeout" in lines[0] and "hunter2" not in result.output, result.output


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_session_date_style_of_another_country_changes_nothing_auditctl_reads_or_shows(blank_database_url, theirs):
    with theirs.begin() as connection:  # the database's own default, and the URL's, both foreign
        connection.execute(text(f"ALTER DATABASE {theirs.url.database} SET datestyle = 'German'"))
    url = f"{blank_database_url}?options=-c%20DateStyle%3DSQL,DMY%20-c%20TimeZone%3DPacific/Chatham"
    assert run("init", "--database-url", url).exit_code == 0
    assert run("demo", "--database-url", url).exit_code == 0
    for args in (["scan", "-o", "json"], ["list", "-o", "json"], ["workers"], ["report"], ["show", "1"]):
        result = run(*args, "--database-url", url)
        assert result.exit_code == 0, (args, result.output)
    records = json.loads(run("scan", "-o", "json", "--database-url", url).stdout)
    assert records and all(r["last_heartbeat"].endswith("Z") and r["last_heartbeat"][10] == "T" for r in records)
    assert run("recover", "--database-url", url).exit_code == 0


def _role_url(url: str, role: str, password: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(username=role, password=password).render_as_string(hide_password=False)


@pytest.fixture
def read_only_role(request, postgres_server):
    """A role an operator would give a dashboard or a report: CONNECT, USAGE, SELECT and nothing else,
    or (``default_transaction_read_only``) every privilege in transactions that are read-only, as on a
    hot standby. Yields ``make(url, how)``, the role's URL for the database at ``url``."""
    import secrets

    import psycopg
    from psycopg import sql

    made = []

    def make(url: str, how: str) -> str:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        role, password = f"ro_{secrets.token_hex(6)}", "r@d/o%n:ly"
        with postgres_server._admin() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        made.append((role, database))
        with psycopg.connect(host=postgres_server.socket_dir, port=postgres_server.port, user="postgres",
                             dbname=database, autocommit=True) as db:
            if how == "select only":
                db.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(role)))
                db.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
                db.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)))
            else:
                db.execute(sql.SQL("GRANT auditctl TO {}").format(sql.Identifier(role)))
                db.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(role)))
        return _role_url(url, role, password)

    yield make
    for role, database in made:  # its grants first (DROP OWNED), then the role, which is the cluster's
        with psycopg.connect(host=postgres_server.socket_dir, port=postgres_server.port, user="postgres",
                             dbname=database, autocommit=True) as db:
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with postgres_server._admin() as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _everything(url: str) -> dict:
    engine = plain_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return {table: connection.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
                    for table in ("audits", "audit_events", "workers", "notifications", "notification_deliveries")}
    finally:
        engine.dispose()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("how", ["select only", "read-only transactions"])
def test_a_change_refused_by_a_read_only_role_says_permission_was_denied_and_nothing_was_changed_when_run(
        database_url, read_only_role, how):
    """recover, reset-all and init as a role that may only read (a dashboard's, or any role on a hot
    standby): one line saying why the database refused and that nothing was changed, exit 1. The
    readers work as that role."""
    assert run("demo", "--database-url", database_url).exit_code == 0
    reader = read_only_role(database_url, how)
    before = _everything(database_url)
    for command in (["recover"], ["recover", "--requeue"], ["reset-all", "--yes"], ["reset-all", "--yes", "--include-stuck"]):
        result = run(*command, "--database-url", reader)
        line = last_line(result)
        assert result.exit_code == 1 and "Traceback" not in result.output, (command, result.output)
        assert "will not let auditctl write" in line and line.endswith("nothing was changed"), (command, line)
        assert "r@d/o%n:ly" not in result.output and "o%n" not in result.output
    for command in (["scan"], ["list"], ["show", "1"], ["workers"], ["report"], ["recover", "--dry-run"],
                    ["reset-all", "--dry-run"], ["notify", "--status"], ["init"]):
        result = run(*command, "--database-url", reader)
        assert result.exit_code == 0, (command, result.output)
    assert _everything(database_url) == before


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("how", ["select only", "read-only transactions"])
def test_init_refused_by_a_read_only_role_says_nothing_was_changed_when_the_schema_is_older(
        blank_database_url, theirs, read_only_role, how):
    from alembic import command

    from auditctl.migrate import _alembic_config

    with theirs.begin() as connection:
        command.upgrade(_alembic_config(connection), "0003")
    reader = read_only_role(blank_database_url, how)
    result = run("init", "--database-url", reader)
    line = last_line(result)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "will not let auditctl write" in line and line.endswith("nothing was changed"), line
    with theirs.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_recover_says_the_database_cancelled_a_statement_when_its_statement_timeout_is_too_short(engine, database_url):
    """A statement_timeout the database (or role) sets, shorter than a batch takes: recover stops
    partway with every batch whole, and its line says the server cancelled the statement and how to
    give auditctl a longer one; not "database unavailable", which sends an operator to the network."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from dbtools import make_running

    from auditctl.recovery import DEFAULT_BATCH as BATCH_SIZE

    ids = make_running(engine, BATCH_SIZE + 200)
    with engine.begin() as connection:  # the second batch outlasts the timeout: it sleeps past it
        connection.exec_driver_sql("CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS "
                                   "$$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$")
        connection.exec_driver_sql(f"CREATE TRIGGER linger BEFORE UPDATE ON audits FOR EACH ROW "
                                   f"WHEN (NEW.id = {ids[BATCH_SIZE + 1]}) EXECUTE FUNCTION linger()")
        connection.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET statement_timeout = '1s'")

    result = run("recover", "--database-url", database_url)

    line = last_line(result)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Stopped partway" in result.stderr
    assert "cancelled a statement (canceling statement due to statement timeout)" in line, line
    assert "statement_timeout%3D" in line and "unavailable" not in line, line
    with engine.connect() as connection:
        counts = dict(connection.execute(text("SELECT status, count(*) FROM audits GROUP BY status")).all())
    assert counts == {"failed": BATCH_SIZE, "running": 200}, "each batch whole: the first committed, the second not"


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_recover_says_another_transaction_held_a_lock_when_its_lock_wait_runs_out(engine, database_url):
    """A table lock held past --lock-wait (an index build, an administrator's LOCK TABLE): the line
    said "database unavailable", as for a server that went away. It says the statement was cancelled
    at the lock wait, and that nothing of that transaction stayed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from dbtools import make_running

    ids = make_running(engine, 3)
    holder = plain_engine(normalize_url(database_url)).connect()
    try:
        holder.execute(text("LOCK TABLE audits IN SHARE MODE"))  # as CREATE INDEX holds it
        result = run("recover", "--lock-wait", "1s", "--database-url", database_url)
    finally:
        holder.rollback()
        holder.close()
    line = last_line(result)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "cancelled a statement (canceling statement due to lock timeout)" in line, line
    assert "another transaction held a lock" in line and "unavailable" not in line, line
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audits WHERE status = 'running'")).scalar() == len(ids)


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_worker_keeps_beating_when_the_database_sets_a_statement_timeout_shorter_than_its_writes_take(
        engine, database_url, guards):
    """``ALTER DATABASE ... SET statement_timeout = '1ms'`` (or the role's, as an operator might set
    for every application): a worker's sessions set their own statement and lock timeouts, so its
    claim, heartbeats and final write are not cancelled by it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from dbtools import row, wait_for

    from auditctl.db import create_engine

    with engine.begin() as connection:
        connection.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET statement_timeout = '1ms'")
        connection.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET lock_timeout = '1ms'")
    reading = create_engine(f"{database_url}?options=-c%20statement_timeout%3D0")  # the test's own reads: none
    guard = guards(heartbeat_interval=0.2, stale_after=2)
    guard.start_heartbeat_monitor()
    with guard.engine.connect() as connection:
        assert connection.execute(text("SHOW statement_timeout")).scalar() != "1ms"
        assert connection.execute(text("SHOW lock_timeout")).scalar() != "1ms"
    try:
        audit_id = guard.create_audit("https://example.com/short-timeouts")
        with guard.run(audit_id) as audit_run:
            first = row(reading, audit_id)["heartbeat_at"]
            wait_for(lambda: row(reading, audit_id)["heartbeat_at"] > first, message="a heartbeat after the first")
            assert audit_run.update_progress(step="still here", percentage=50) is True
        assert row(reading, audit_id)["status"] == "completed"
    finally:
        reading.dispose()
