"""Fixtures: each test gets its own database, on SQLite and on a real PostgreSQL server.

The PostgreSQL server is a throwaway cluster started once per session (``pgserver``).
Each test gets a fresh database cloned from a migrated template. Where no server can be
started the PostgreSQL half of the suite is skipped with the reason, except under CI
(``CI=true``), where that is a failure.
"""

from __future__ import annotations

import itertools
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgserver import PostgresServer, not_here, require_postgres  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The tests marked ``long`` first (in their order), so the four workers share them from the
    start: collected last, the soak alone kept one worker busy for a minute after the others ended."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)

ENGINES = ["sqlite", "postgresql"]
_counter = itertools.count()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No developer setting leaks in, and the working directory is the test's own."""
    for name in list(os.environ):
        if name.startswith("AUDITCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def statements_built_by_the_code_under_test():
    """Under mutation testing (mutmut sets MUTANT_UNDER_TEST) each mutant runs in a process forked
    after the unmutated run, whose cached stuck statements would hide the mutant: start empty."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        from auditctl import rules

        getattr(rules._statement, "cache_clear", lambda: None)()
    yield


@pytest.fixture(scope="session")
def postgres_server():
    require_postgres()
    server = PostgresServer()
    try:
        server.start()
    except Exception as error:  # pragma: no cover - depends on the machine
        not_here(f"server did not start: {error}")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def postgres_template(postgres_server):
    """A database holding the migrated schema, cloned for every test."""
    from auditctl.db import create_engine
    from auditctl.migrate import upgrade

    url = postgres_server.create_database("auditctl_template")
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return "auditctl_template"


def _new_postgres_database(request, template=None) -> str:
    server = request.getfixturevalue("postgres_server")
    name = f"t{os.getpid()}_{next(_counter)}"
    url = server.create_database(name, template=template)
    request.addfinalizer(lambda: server.drop_database(name))
    return url


@pytest.fixture(params=ENGINES)
def engine_name(request):
    return request.param


@pytest.fixture
def database_url(request, engine_name, tmp_path):
    """A migrated, empty database of the parametrised engine."""
    if engine_name == "postgresql":
        return _new_postgres_database(request, template=request.getfixturevalue("postgres_template"))
    from auditctl.db import create_engine
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def blank_database_url(request, engine_name, tmp_path):
    """A database with no schema at all (for init and 'run auditctl init' tests)."""
    if engine_name == "postgresql":
        return _new_postgres_database(request)
    return f"sqlite:///{tmp_path / 'blank.db'}"


@pytest.fixture
def engine(database_url):
    from auditctl.db import create_engine

    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def guards(database_url):
    """Make StuckAuditPrevention instances that are stopped and closed after the test."""
    from auditctl import StuckAuditPrevention

    made = []

    def make(**kwargs):
        options = {"worker_id": "worker-1", "heartbeat_interval": 0.5, "stale_after": 2, "max_age": 30, "stall_after": 3}
        options.update(kwargs)
        guard = StuckAuditPrevention(database_url, **options)
        made.append(guard)
        return guard

    yield make
    for guard in made:
        guard.close()


@pytest.fixture
def backdate(engine):
    """Move an audit's times into the past, measured on the database's clock: backdate(id, heartbeat_at=700)."""
    from sqlalchemy import update

    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import write_transaction
    from auditctl.schema import audits

    def move(audit_id, **seconds_ago):
        with write_transaction(engine) as connection:
            now = fetch_now(connection)
            values = {column: (None if ago is None else now - timedelta(seconds=ago)) for column, ago in seconds_ago.items()}
            connection.execute(update(audits).where(audits.c.id == audit_id).values(**values))

    return move


@pytest.fixture
def start_audit(engine):
    """Create and claim an audit as a worker would; returns (audit_id, lease)."""
    from auditctl import leases

    def start(target="https://example.com", worker_id="worker-1", instance_id="instance-1", max_age=None):
        audit_id = leases.create_audit(engine, target, max_age=max_age)
        lease, _document = leases.claim(engine, audit_id, worker_id=worker_id, instance_id=instance_id, worker_url=None)
        return audit_id, lease

    return start


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own, so stopping it disturbs no other test."""
    require_postgres()
    server = PostgresServer()
    server.start()
    from auditctl.db import create_engine
    from auditctl.migrate import upgrade

    engine = create_engine(server.url)
    upgrade(engine)
    yield server, engine
    engine.dispose()
    server.cleanup()
