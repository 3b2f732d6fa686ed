"""The conventions an operator relies on: options anywhere, filters that add up, errors in one line,
commands that look without touching, and one way to show times everywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text, update
from test_cli_process import clean_env, on_terminal

from auditctl import leases
from auditctl.cli import cli
from auditctl.schema import audits
from auditctl.sqlfunctions import fetch_now
from auditctl.transactions import write_transaction

AUDITCTL = Path(sys.executable).parent / "auditctl"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture
def demo(database_url):
    assert run("demo", "--database-url", database_url).exit_code == 0
    return database_url


def ids_of(result) -> set[int]:
    assert result.exit_code == 0, result.output
    return {record["id"] for record in json.loads(result.stdout)}


# --- options and filters -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], *([name] for name in cli.list_commands(None))])
def test_help_fits_an_80_column_terminal_when_run_in_one(command):
    """``report --help`` and the exit codes of ``auditctl --help`` were laid out by hand at 82 to 87
    columns, so an 80-column terminal broke each line in two. Only what cannot be broken may be
    longer: a list of choices, or a shell command to copy."""
    shown = run(*command, "--help", env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    too_wide = [line for line in shown.stdout.splitlines()
                if len(line) > 80 and not re.search(r"\[[\w|-]+\]", line) and "auditctl completion" not in line]
    assert too_wide == [], "\n".join(too_wide)


def test_global_options_work_before_or_after_the_command(demo, tmp_path):
    after = run("scan", "-o", "json", "--database-url", demo)
    before = run("--database-url", demo, "scan", "-o", "json")
    assert ids_of(after) == ids_of(before) and len(ids_of(after)) == 3
    config = tmp_path / "c.toml"
    config.write_text(f'database_url = "{demo}"\n')
    assert ids_of(run("scan", "-o", "json", "--config", config)) == ids_of(after)
    assert ids_of(run("--config", config, "scan", "-o", "json")) == ids_of(after)
    quiet = run("-q", "scan", "-o", "json", "--database-url", demo)
    assert quiet.stderr == "", "-q before the command silences the status line too"
    verbose = run("-v", "show", "99999", "--database-url", demo)
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr


@pytest.mark.parametrize("command", ["scan", "list"])
def test_a_kinds_section_in_the_config_file_sets_thresholds_and_filters_nothing(demo, tmp_path, command):
    from sqlalchemy import create_engine as plain_engine

    stuck = ids_of(run("scan", "-o", "json", "--database-url", demo))
    with plain_engine(demo).begin() as connection:
        healthy = connection.execute(  # running, not stuck, without a max_age of its own (which beats the kind's)
            select(audits.c.id).where(audits.c.status == "running", audits.c.id.not_in(stuck),
                                      audits.c.max_age_seconds.is_(None)).order_by(audits.c.id)).scalars().first()
        connection.execute(update(audits).where(audits.c.id == healthy).values(kind="full-scan"))
    config = tmp_path / "c.toml"
    # Its stale_after and stall_after agree with its max_age (the fleet's 10m would not).
    config.write_text('[kinds.full-scan]\nmax_age = "1m"\nstale_after = "1m"\nstall_after = "1m"\n')
    without = ids_of(run(command, "-o", "json", "--database-url", demo))
    with_kinds = run(command, "-o", "json", "--config", config, "--database-url", demo)
    if command == "scan":
        assert ids_of(with_kinds) == without | {healthy}, "the kind's max_age judges its audit; the others stay"
        judged = next(r for r in json.loads(with_kinds.stdout) if r["id"] == healthy)
        assert judged["reasons"] == ["max_age_exceeded"] and judged["thresholds"]["max_age"]["source"] == "kind full-scan"
    else:
        assert ids_of(with_kinds) == without, "a [kinds.NAME] section is no --kind filter"


@pytest.mark.parametrize("name", ['""', "k" * 101])
def test_a_kinds_section_no_audit_could_belong_to_is_refused_in_one_line(demo, tmp_path, name):
    config = tmp_path / "c.toml"
    config.write_text(f'[kinds.{name}]\nmax_age = "1h"\n')
    result = run("scan", "--config", config, "--database-url", demo)
    assert result.exit_code == 2
    assert "a kind's name in [kinds.NAME] must be a non-empty string of at most 100 characters" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_repeated_and_comma_separated_filters_are_unions(demo):
    one = ids_of(run("scan", "-o", "json", "--reason", "stale_heartbeat", "--database-url", demo))
    two = ids_of(run("scan", "-o", "json", "--reason", "max_age_exceeded", "--database-url", demo))
    repeated = ids_of(run("scan", "-o", "json", "--reason", "stale_heartbeat", "--reason", "max_age_exceeded",
                          "--database-url", demo))
    comma = ids_of(run("scan", "-o", "json", "--reason", "stale_heartbeat,max_age_exceeded", "--database-url", demo))
    assert len(one) == len(two) == 1 and repeated == comma == one | two
    workers = ids_of(run("scan", "-o", "json", "--worker", "worker-5,worker-3", "--database-url", demo))
    assert len(workers) == 2
    statuses = run("list", "-o", "json", "--status", "failed", "--status", "pending", "--database-url", demo)
    assert {r["status"] for r in json.loads(statuses.stdout)} == {"failed", "pending"}


def test_target_glob_since_until_sort_and_limit_on_list_and_scan(demo):
    blog = run("scan", "-o", "json", "--target", "https://blog.*", "--database-url", demo)
    assert [r["target"] for r in json.loads(blog.stdout)] == ["https://blog.example.net"]
    assert ids_of(run("scan", "-o", "json", "--since", "30m", "--database-url", demo)) == ids_of(
        run("scan", "-o", "json", "--target", "https://blog.*", "--target", "https://status.*", "--database-url", demo))
    assert len(ids_of(run("scan", "-o", "json", "--until", "30m", "--database-url", demo))) == 1  # the 47-minute one
    by_age = [r["target"] for r in json.loads(run("scan", "-o", "json", "--sort", "age", "--database-url", demo).stdout)]
    assert by_age[0] == "https://payments.example.com", "longest running first"
    assert len(ids_of(run("scan", "-o", "json", "--limit", "2", "--database-url", demo))) == 2
    listed = json.loads(run("list", "-o", "json", "--sort", "target", "--reverse", "--limit", "3", "--database-url", demo).stdout)
    assert [r["target"] for r in listed] == sorted((r["target"] for r in listed), reverse=True)
    recent = json.loads(run("list", "-o", "json", "--since", "2h", "--limit", "0", "--database-url", demo).stdout)
    assert recent and all(r["created_age_seconds"] < 7200 for r in recent)
    iso = run("list", "-o", "json", "--since", "2000-01-01T00:00:00Z", "--limit", "0", "--database-url", demo)
    assert len(json.loads(iso.stdout)) == 18


def test_scan_summary_says_the_limit_cut_the_list_when_limit_is_reached(demo):
    """The demo has 3 stuck audits: "2 stuck audits (...) in DB" under --limit 2 told the operator a count
    of the database's stuck audits that was only the count shown."""
    everything = run("scan", "--database-url", demo)
    assert everything.stderr.startswith("3 stuck audits (") and "--limit" not in everything.stderr
    cut = run("scan", "--limit", "2", "--database-url", demo)
    assert cut.stderr.startswith("2 stuck audits shown (") and cut.stderr.rstrip().endswith("(--limit reached)"), cut.stderr
    assert cut.stderr.count("\n") == 1
    as_json = run("scan", "-o", "json", "--limit", "2", "--database-url", demo)
    assert len(json.loads(as_json.stdout)) == 2 and "(--limit reached)" in as_json.stderr
    for room in ("3", "5", "9223372036854775807"):  # filled to the brim, or with room to spare: nothing was cut
        roomy = run("scan", "--limit", room, "--database-url", demo)
        assert roomy.stderr.startswith("3 stuck audits (") and "--limit" not in roomy.stderr, roomy.stderr


@pytest.mark.parametrize("fmt", ["table", "wide", "plain", "markdown", "json", "csv"])
def test_list_says_the_limit_cut_the_list_when_limit_is_reached_in_every_format(demo, fmt):
    """``list`` stops at 50 by default: ``list -o json | jq length`` read 50 as every audit, with no word on
    stderr that more matched, while ``scan -o json`` says so. Every format now says it, as scan does."""
    cut = run("list", "-o", fmt, "--limit", "2", "--database-url", demo)
    assert cut.exit_code == 0, cut.output
    assert cut.stderr.strip() == "2 audits (--limit reached)", cut.stderr
    roomy = run("list", "-o", fmt, "--limit", "0", "--database-url", demo)
    assert roomy.stderr.strip() == "18 audits", roomy.stderr
    quiet = run("list", "-q", "-o", fmt, "--limit", "2", "--database-url", demo)
    assert quiet.stderr == "", "-q keeps stderr quiet, as for scan"


def test_help_lists_the_exit_codes():
    shown = run("--help").stdout
    assert "Exit codes:" in shown and "130" in shown and "reset-all refused or declined" in shown


def test_help_and_readme_document_exactly_the_exit_codes_auditctl_uses():
    from auditctl.cli import group

    used = {value for name, value in vars(group).items() if name.startswith("EXIT_") and isinstance(value, int)}
    in_help = {int(code) for code in re.findall(r"^  (\d+) ", group.EXIT_CODES_HELP, re.M)}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    in_readme = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert used == in_help == in_readme == {0, 1, 2, 3, 4, 130}


def test_the_command_table_names_every_command_and_the_module_that_defines_it():
    import importlib
    import pkgutil

    import auditctl.cli
    from auditctl.cli.group import COMMANDS

    for module in pkgutil.iter_modules(auditctl.cli.__path__):
        importlib.import_module(f"auditctl.cli.{module.name}")
    assert set(cli.commands) == set(COMMANDS), "a command defined in a module must be in group.COMMANDS, and back"
    for name, (module, short_help) in COMMANDS.items():
        assert cli.commands[name].callback.__module__ == f"auditctl.cli.{module}", name
        # One line in an 80-column --help beside the longest command name (reset-all, completion).
        assert short_help.endswith(".") and len(short_help) <= 64, name


def test_help_lists_every_command_with_its_line_from_the_table():
    from auditctl.cli.group import COMMANDS

    listed = run("--help").stdout.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in listed.splitlines()]
    assert rows == [[name, COMMANDS[name][1]] for name in sorted(COMMANDS)]


# --- do no harm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["scan"], ["list"], ["workers"], ["show", "1"], ["recover"], ["watch", "--once"],
                                     ["reset-all", "--yes"]])
def test_a_cron_job_in_another_directory_gets_the_missing_file_named_and_nothing_created(tmp_path, command):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([str(AUDITCTL), *command], cwd=home, env=clean_env(home), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"Error: no database at {home / 'auditctl.db'} (from sqlite:///auditctl.db): "
                                   "run `auditctl init` to create it there, or pass --database-url")
    assert list(home.iterdir()) == [], "looking must not create an empty database"


@pytest.mark.parametrize("command", [["init"], ["demo"], ["scan"]])
def test_a_database_in_a_directory_that_does_not_exist_names_the_directory(tmp_path, command):
    """SQLite says only "unable to open database file", which init and demo passed on as an outage."""
    path = tmp_path / "missing" / "auditctl.db"
    result = run(*command, "--database-url", f"sqlite:///{path}")
    assert result.exit_code == 1 and f"no directory {path.parent} to create it in" in result.stderr, result.output
    assert "unavailable" not in result.stderr and not path.parent.exists()


@pytest.mark.parametrize("command", [["init"], ["demo"], ["scan"]])
def test_a_relative_database_path_in_a_missing_directory_is_named_once_beside_the_url(tmp_path, command):
    """init and demo said "(from sqlite:///missing/x.db (/abs/missing/x.db))": the absolute path twice."""
    done = subprocess.run([str(AUDITCTL), *command, "--database-url", "sqlite:///missing/x.db"], cwd=tmp_path,
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: no database at {tmp_path / 'missing' / 'x.db'} (from sqlite:///missing/x.db), and no directory "
        f"{tmp_path / 'missing'} to create it in: create the directory first, or pass --database-url"), done.stderr


def test_read_only_commands_leave_another_tools_file_as_it_was_and_read_a_read_only_file(demo, tmp_path, engine_name):
    if engine_name != "sqlite":
        pytest.skip("SQLite files only")
    path = Path(demo.split("///", 1)[1])
    copy = tmp_path / "theirs.db"
    source = sqlite3.connect(path)
    source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    target = sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.execute("PRAGMA journal_mode=DELETE")  # another tool's file, in rollback-journal mode
    target.close()
    url = f"sqlite:///{copy}"
    for command in (["scan"], ["list"], ["workers"], ["show", "12"], ["recover", "--dry-run"], ["reset-all", "--dry-run"]):
        assert run(*command, "--database-url", url).exit_code == 0
    with sqlite3.connect(copy) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "a read or a dry run must not switch it to WAL"
    copy.chmod(0o444)
    try:
        if os.geteuid() != 0:  # root can write anything: the read-only open is what is tested, not the permission
            assert len(json.loads(run("scan", "-o", "json", "--database-url", url).stdout)) == 3
        assert len(json.loads(run("scan", "-o", "json", "--database-url", f"{url}?mode=ro").stdout)) == 3
        ro = run("scan", "--database-url", f"{url}?mode=ro")
        assert "Warning" not in ro.stderr and ro.stderr.count("\n") == 1
    finally:
        copy.chmod(0o644)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop the file-permission override")
def test_a_wal_database_in_a_directory_the_reader_may_not_write_is_explained(demo, tmp_path, engine_name):
    if engine_name != "sqlite":
        pytest.skip("SQLite files only")
    source = sqlite3.connect(Path(demo.split("///", 1)[1]))
    source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    locked = tmp_path / "locked"
    locked.mkdir()
    target = sqlite3.connect(locked / "ro.db")
    source.backup(target)
    source.close()
    target.close()  # in WAL mode, its -wal and -shm gone
    (locked / "ro.db").chmod(0o444)
    locked.chmod(0o555)
    try:  # root without CAP_DAC_OVERRIDE: file permissions apply, as to an operator with read access only
        done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                               "--inh-caps=-dac_override,-dac_read_search", str(AUDITCTL), "scan", "--database-url",
                               f"sqlite:///{locked / 'ro.db'}"], env=clean_env(tmp_path), capture_output=True, text=True,
                              timeout=60, check=False)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"SQLite creates ro.db-shm beside it, and {locked} is not writable" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop the file-permission override")
def test_a_database_file_this_user_may_not_read_is_said_so(tmp_path):
    """SQLite says only "unable to open database file" for a file (or a directory on its path) that
    this user may not read: the line now says which, rather than leave it to read like an outage."""
    assert run("demo", "--database-url", f"sqlite:///{tmp_path / 'audits.db'}").exit_code == 0
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copy(tmp_path / "audits.db", hidden / "audits.db")
    (tmp_path / "audits.db").chmod(0o000)
    hidden.chmod(0o000)
    try:  # root without CAP_DAC_OVERRIDE: file permissions apply, as to an operator without access
        said = {}
        for name, path in (("file", tmp_path / "audits.db"), ("directory", hidden / "audits.db")):
            for command in ("scan", "recover"):
                done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                                       "--inh-caps=-dac_override,-dac_read_search", str(AUDITCTL), command,
                                       "--database-url", f"sqlite:///{path}"], env=clean_env(tmp_path),
                                      capture_output=True, text=True, timeout=60, check=False)
                assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
                said[name] = done.stderr
    finally:
        (tmp_path / "audits.db").chmod(0o644)
        hidden.chmod(0o755)
    assert f"this user may not read {tmp_path / 'audits.db'}" in said["file"], said["file"]
    assert f"this user may not search {hidden}" in said["directory"], said["directory"]


def test_a_database_holding_another_applications_audits_table_is_recognised_as_not_ours(tmp_path):
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE audits (id INTEGER PRIMARY KEY, name TEXT)")
    url = f"sqlite:///{path}"
    for command in (["scan"], ["list"], ["init"], ["watch", "--once"], ["recover"], ["demo"]):
        result = run(*command, "--database-url", url)
        assert result.exit_code == 1, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert "tables named like auditctl's (audits) that auditctl did not create" in line, line
        assert "run `auditctl init`" not in line, "advice that would fail is no advice"
    with sqlite3.connect(path) as connection:
        assert [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["audits"]
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "its journal mode was changed"


def test_a_file_that_is_not_a_database_is_said_so_not_retried_as_an_outage(tmp_path):
    from auditctl.db import create_engine
    from auditctl.errors import DatabaseUnavailable, SchemaMissing
    from auditctl.rules import find_stuck
    from auditctl.thresholds import Thresholds

    path = tmp_path / "garbage.db"
    path.write_text("not a database at all\n" * 100)
    url = f"sqlite:///{path}"
    watched = run("watch", "--database-url", url)  # without --once: an outage would be retried for ever
    assert watched.exit_code == 1 and "is not a database" in watched.stderr.strip().splitlines()[-1]
    engine = create_engine(url, role="reader")
    with pytest.raises(SchemaMissing) as caught:
        find_stuck(engine, Thresholds())
    engine.dispose()
    assert isinstance(caught.value, DatabaseUnavailable), "a worker's callers catch DatabaseUnavailable, as README says"


def test_a_directory_at_the_database_path_is_said_so_not_retried_as_an_outage(tmp_path):
    """SQLite says only "unable to open database file" for a directory, which read as an outage:
    every command said "database unavailable", and watch retried it for as long as it ran."""
    from auditctl.db import create_engine
    from auditctl.errors import DatabaseUnavailable, SchemaMissing
    from auditctl.rules import find_stuck
    from auditctl.thresholds import Thresholds

    path = tmp_path / "audits.db"
    path.mkdir()
    url = f"sqlite:///{path}"
    said = f"Error: the path at {url} is a directory, not a database file; point the database URL at auditctl's database"
    for command in (["scan"], ["init"], ["demo"], ["recover"]):
        result = run(*command, "--database-url", url)
        assert result.exit_code == 1 and result.stderr.strip() == said, (command, result.output)
    watched = subprocess.run([str(AUDITCTL), "watch", "--no-live", "--interval", "1s", "--database-url", url],
                             cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert watched.returncode == 1 and watched.stderr.strip().splitlines()[-1] == said, watched.stderr
    engine = create_engine(url, role="reader")
    with pytest.raises(SchemaMissing) as caught:
        find_stuck(engine, Thresholds())
    engine.dispose()
    assert isinstance(caught.value, DatabaseUnavailable), "a worker's callers catch DatabaseUnavailable, as README says"
    assert path.is_dir() and not list(path.iterdir()), "nothing was created in it"


@pytest.mark.parametrize("revision", ["0001", "0002", "ae1027a6acf"])
def test_a_database_holding_another_applications_alembic_revision_is_recognised_as_not_ours(tmp_path, revision):
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    url = f"sqlite:///{path}"
    for command in (["init"], ["scan"], ["demo"]):
        result = run(*command, "--database-url", url)
        line = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 1 and f"records another application's Alembic revision ({revision})" in line, line
    with sqlite3.connect(path) as connection:
        tables = sorted(r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert tables == ["alembic_version", "customers"], "nothing of auditctl's was added to it"
    assert mode == "delete", "its journal mode was changed"


@pytest.mark.parametrize("revision", ["0001", "0002", "abc123"])
def test_another_applications_audits_and_workers_tables_under_a_known_revision_are_never_migrated(
        blank_database_url, revision):
    """Its Alembic revision happened to be 0001: `init` migrated it on PostgreSQL (new columns in its
    tables, auditctl's tables beside them, its revision changed); with 0002 it said "nothing to do"
    while scan said "run init"; with another revision, "upgrade auditctl"."""
    from sqlalchemy import create_engine as plain_engine
    from sqlalchemy import inspect

    from auditctl.dburl import normalize_url

    theirs = plain_engine(normalize_url(blank_database_url))
    with theirs.begin() as connection:
        connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        connection.execute(text("INSERT INTO alembic_version VALUES (:revision)"), {"revision": revision})
        connection.execute(text("CREATE TABLE audits (id INTEGER PRIMARY KEY, name TEXT)"))
        connection.execute(text("CREATE TABLE workers (id INTEGER PRIMARY KEY, host TEXT)"))
        connection.execute(text("CREATE TABLE audit_events (id INTEGER PRIMARY KEY)"))
    for command in (["init"], ["scan"]):
        result = run(*command, "--database-url", blank_database_url)
        line = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 1 and "tables named like auditctl's that auditctl did not create" in line, line
    inspector = inspect(theirs)
    assert sorted(inspector.get_table_names()) == ["alembic_version", "audit_events", "audits", "workers"]
    assert [c["name"] for c in inspector.get_columns("audits")] == ["id", "name"]
    with theirs.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == revision
    theirs.dispose()


def test_init_that_fails_says_what_the_database_said_not_to_run_init(tmp_path):
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE alembic_version (version TEXT)")  # not Alembic's own shape
    result = run("init", "--database-url", f"sqlite:///{path}")
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "cannot create or upgrade the schema" in line and "version_num" in line, line
    assert "run `auditctl init`" not in line


def test_init_against_a_newer_schema_says_so_in_one_line(database_url, engine):
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    result = run("init", "--database-url", database_url)
    assert result.exit_code == 1
    assert "at schema revision 0099, which this auditctl does not know" in result.stderr and "upgrade auditctl" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["recover"], ["reset-all", "--yes"], ["watch", "--once"], ["recover", "--requeue"]])
def test_no_command_changes_a_schema_a_newer_auditctl_migrated(demo, engine, command):
    """Its tables may carry rules this version cannot know: changed as 0003 would change them,
    they could break the newer version's."""
    from auditctl import StuckAuditPrevention
    from auditctl.errors import SchemaTooNew
    from dbtools import all_rows

    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    before = all_rows(engine)
    result = run(*command, "--database-url", demo)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and "at schema revision 0099, which this auditctl does not know" in line, result.output
    assert all_rows(engine) == before
    with pytest.raises(SchemaTooNew):
        StuckAuditPrevention(demo, worker_id="worker-9", create_schema=False)


def test_a_database_without_its_revision_table_is_still_recovered_as_before(demo, engine):
    """The newer-schema check reads the revision; with no revision table there is nothing to compare."""
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    result = run("recover", "--database-url", demo)
    assert result.exit_code == 0 and "Recovered 3 audits" in result.stderr, result.output


def test_the_revisions_read_from_the_file_names_are_alembics():
    from auditctl.migrate import _shipped_revisions, known_revisions

    assert _shipped_revisions() == set(known_revisions())


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["show", "abc"], "Error: Invalid value for 'ID': 'abc' is not an audit id"),
    (["show", "²"], "Error: Invalid value for 'ID': '²' is not an audit id"),  # isdigit() is true of it
    (["show", "99999999999999999999"], "Error: Invalid value for 'ID': '99999999999999999999' is not an audit id"),
    (["list", "--limit", "99999999999999999999"], "Error: Invalid value for '--limit'"),
    (["scan", "--database-url", "sqlite://relative.db"], "Error: sqlite://relative.db names no file: a SQLite URL has three "
                                                         "slashes, as in sqlite:///relative.db"),
    (["scan", "--stale-after", "ten minutes"], "Error: Invalid value for '--stale-after': cannot read 'ten minutes'"),
    (["scan", "--bogus"], "Error: No such option '--bogus'"),
    (["scan", "--database-url", "sqlite://alice:S3cret@/tmp/x.db"], "Error: sqlite://alice:***@/tmp/x.db: a SQLite URL "
                                                                    "takes no user name, password or port"),
    (["config", "--database-url", "sqlite://"], "Error: sqlite:// is an in-memory SQLite database"),
    (["completion"], "Error: Missing argument '{bash|zsh|fish}'. Choose from: bash, zsh, fish"),
])
def test_usage_errors_are_one_line_naming_what_was_wrong(args, message, tmp_path):
    result = run(*args)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert result.exit_code in (1, 2)
    assert "env var" not in result.stderr and "$AUDITCTL" not in result.stderr, "no variable the user did not use"


def test_an_error_from_the_environment_names_the_variable(tmp_path):
    result = run("scan", env={"AUDITCTL_STALE_AFTER": "soon"})
    assert result.exit_code == 2
    assert "Invalid value for '--stale-after' (from $AUDITCTL_STALE_AFTER): cannot read 'soon'" in result.stderr


def test_runtime_errors_say_it_once(tmp_path):
    result = run("scan", "--database-url", "postgresql://bob:s3cret@127.0.0.1:1/x")
    line = result.stderr.strip()
    assert line.count("database unavailable") == 1 and "s3cret" not in line and line.count("\n") == 0


# --- reset-all shows what it will do ---------------------------------------------------------------------


def test_reset_all_shows_counts_by_origin_and_limits_resets_per_audit(demo, engine):
    audit_id = leases.create_audit(engine, "https://example.com/own-error")
    lease, _ = leases.claim(engine, audit_id, worker_id="w", instance_id="i", worker_url=None)
    from auditctl.history import Actor

    leases.finish(engine, lease, error="scanner crashed: out of memory", actor=Actor("test"))
    dry = run("reset-all", "--dry-run", "--database-url", demo)
    assert "Failed audits to reset: 2 recovered as stuck (2 stale_heartbeat, 2 max_age_exceeded); " \
           "1 failed with their own error." in dry.stderr
    only_errors = json.loads(run("reset-all", "--dry-run", "--origin", "error", "-o", "json", "--database-url", demo).stdout)
    assert [r["id"] for r in only_errors] == [audit_id] and only_errors[0]["origin"] == "error"
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == audit_id).values(resets=5))
    limited = run("reset-all", "--yes", "--database-url", demo)
    assert "Reset 2 audits to pending." in limited.stderr
    assert "1 audit already reset 5 times stays failed (--max-resets to change)." in limited.stderr or \
        "1 audit already reset 5 times" in run("reset-all", "--dry-run", "--database-url", demo).stderr
    assert run("reset-all", "--yes", "--max-resets", "6", "--database-url", demo).stderr.startswith("Reset 1 audit")


@pytest.mark.parametrize("key, name", [(b"\x03", "Ctrl-C"), (b"\x04", "Ctrl-D")])
def test_reset_all_answered_with_ctrl_c_or_ctrl_d_exits_4_and_changes_nothing(tmp_path, key, name):
    env = clean_env(tmp_path)
    assert subprocess.run([str(AUDITCTL), "demo"], cwd=tmp_path, env=env, capture_output=True).returncode == 0
    code, screen = on_terminal(["reset-all"], cwd=tmp_path, env=env, answer=key)
    assert "2 recovered as stuck" in screen, "what it would take is shown before the question"
    assert code == 4, f"{name}: {screen}"
    assert "Aborted: nothing changed." in screen and "Traceback" not in screen


# --- presentation --------------------------------------------------------------------------------------


def test_times_have_one_style_exact_in_json_relative_in_tables_and_the_future_is_flagged(demo, engine):
    listed = json.loads(run("list", "-o", "json", "--limit", "0", "--database-url", demo).stdout)
    for record in listed:
        for key in ("created_at", "started_at", "finished_at", "last_heartbeat"):
            assert record[key] is None or ISO.match(record[key]), (key, record[key])
    running = [r for r in listed if r["status"] == "running"][0]["id"]
    with write_transaction(engine) as connection:
        ahead = fetch_now(connection) + timedelta(hours=3)
        connection.execute(update(audits).where(audits.c.id == running).values(heartbeat_at=ahead))
    table = run("list", "--status", "running", "--database-url", demo).stdout
    line = next(line for line in table.splitlines() if line.strip().startswith(str(running)))
    assert "in the future" in line and "-2h" not in table
    record = next(r for r in json.loads(run("list", "-o", "json", "--database-url", demo).stdout) if r["id"] == running)
    assert "heartbeat_in_future" in record["problems"]


def test_a_reset_audit_shows_no_stale_step(demo):
    run("reset-all", "--yes", "--database-url", demo)
    pending = [r for r in json.loads(run("list", "-o", "json", "--limit", "0", "--database-url", demo).stdout)
               if r["status"] == "pending"]
    assert pending and all(r["step"] is None and r["percentage"] is None for r in pending)


def test_show_as_markdown_is_markdown(demo):
    shown = run("show", "12", "-o", "markdown", "--database-url", demo).stdout
    assert shown.startswith("## Audit 12\n") and "| field | value |" in shown
    assert "```json" in shown and "### History" in shown


@pytest.mark.parametrize("env", [{"TERM": "dumb"}, {"NO_COLOR": "1"}])
def test_dumb_terminals_and_no_color_get_plain_ascii(tmp_path, env):
    base = clean_env(tmp_path)
    base.update(env)
    assert subprocess.run([str(AUDITCTL), "demo"], cwd=tmp_path, env=base, capture_output=True).returncode == 0
    code, screen = on_terminal(["scan"], cwd=tmp_path, env=base)
    assert code == 0
    assert screen.isascii() and "\x1b" not in screen, screen


def test_the_library_keeps_alembic_quiet_in_an_info_log(database_url, guards, caplog):
    caplog.set_level(logging.INFO)
    guards(worker_id="quiet")
    alembic = [r for r in caplog.records if r.name.startswith("alembic")]
    assert alembic == [], [r.getMessage() for r in alembic]


def test_a_file_uri_without_uri_true_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    """Without ?uri=true SQLite opened a file named "file:rel.db" while the rest of auditctl looked at
    rel.db: init said it created the schema, and scan then said there was no database."""
    monkeypatch.chdir(tmp_path)
    for command in (["init"], ["scan"]):
        result = run(*command, "--database-url", "sqlite:///file:rel.db")
        assert result.exit_code == 2 and "add ?uri=true" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []
    assert run("init", "--database-url", f"sqlite:///file:{tmp_path / 'rel.db'}?uri=true").exit_code == 0
    for spelled in ("uri=True", "uri=1", "uri=yes", "uri=true&uri=true"):  # as SQLAlchemy reads a flag
        result = run("scan", "--database-url", f"sqlite:///file:{tmp_path / 'rel.db'}?{spelled}")
        assert result.exit_code == 0, (spelled, result.output)


@pytest.mark.parametrize("damage", ["DROP TABLE workers", "DROP TABLE audit_events",
                                    "ALTER TABLE audits DROP COLUMN progress_signature",
                                    # Two of its distinctive columns left: still enough to tell.
                                    "ALTER TABLE audits DROP COLUMN progress_signature; "
                                    "ALTER TABLE audits DROP COLUMN recovery_reasons; ALTER TABLE audits DROP COLUMN lease"])
def test_auditctls_own_database_an_operator_damaged_is_still_its_own(blank_database_url, damage):
    """Not "another application's": init names what is missing from auditctl's own schema."""
    from sqlalchemy import create_engine as plain_engine

    from auditctl.dburl import normalize_url

    assert run("init", "--database-url", blank_database_url).exit_code == 0
    ours = plain_engine(normalize_url(blank_database_url))
    with ours.begin() as connection:
        for statement in damage.split("; "):
            connection.execute(text(statement))
    ours.dispose()
    result = run("init", "--database-url", blank_database_url)
    assert result.exit_code == 1 and "at auditctl's schema revision" in result.stderr, result.output
    assert damage.split()[-1] in result.stderr and "another application" not in result.stderr


def test_the_dashboard_and_the_worker_library_say_another_applications_tables_are_not_auditctls(tmp_path):
    """As the CLI says it: "run `auditctl init`" there would be refused by init itself."""
    from auditctl import StuckAuditPrevention
    from auditctl.errors import NotOurDatabase
    from webtools import running_dashboard

    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE audits (id INTEGER PRIMARY KEY, name TEXT)")
    url = f"sqlite:///{path}"
    with pytest.raises(NotOurDatabase):
        StuckAuditPrevention(url, worker_id="worker-1", create_schema=False)
    with running_dashboard(url) as server:
        overview = server.get("/api/overview")
    assert "did not create" in overview.text and "auditctl init" not in overview.text, overview.text


def test_init_puts_a_new_file_and_auditctls_own_in_wal_mode(tmp_path):
    new, own = tmp_path / "new.db", tmp_path / "own.db"
    assert run("init", "--database-url", f"sqlite:///{new}").exit_code == 0
    assert run("init", "--database-url", f"sqlite:///{own}").exit_code == 0
    with sqlite3.connect(own) as connection:
        connection.execute("PRAGMA journal_mode = DELETE")
    assert run("recover", "--database-url", f"sqlite:///{own}").exit_code == 0
    for path in (new, own):
        with sqlite3.connect(path) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal", path


def test_a_damaged_schema_at_the_current_revision_is_named_not_sent_to_init(tmp_path):
    path = tmp_path / "damaged.db"
    url = f"sqlite:///{path}"
    assert run("demo", "--database-url", url).exit_code == 0
    with sqlite3.connect(path) as connection:
        connection.execute("ALTER TABLE audits DROP COLUMN target")
        connection.execute("DROP TABLE notifications")
    for command in (["scan"], ["recover"], ["init"]):  # init too: it said "nothing to do"
        result = run(*command, "--database-url", url)
        line = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 1 and "at auditctl's schema revision" in line, line
        assert "column audits.target" in line and "table notifications" in line and "restore" in line, line
        assert "run `auditctl init`" not in line, "init says there is nothing to do"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become another user")
def test_a_home_the_user_may_not_search_holds_no_config_and_stops_nothing(tmp_path):
    home = tmp_path / "someone-elses-home"
    (home / ".config").mkdir(parents=True)
    home.chmod(0o700)
    other = tmp_path / "other"
    other.mkdir()
    other.chmod(0o777)
    tmp_path.chmod(0o755)
    env = {**clean_env(tmp_path), "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        done = subprocess.run([*drop, str(AUDITCTL), "config", "-o", "json"], env=env, capture_output=True, text=True,
                              timeout=60, check=False, cwd=other)
        named = subprocess.run([*drop, str(AUDITCTL), "--config", str(home / ".config" / "x.toml"), "config"], env=env,
                               capture_output=True, text=True, timeout=60, check=False, cwd=other)
    finally:
        home.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert "Config file: none" in done.stderr
    assert named.returncode == 2 and "Permission denied" in named.stderr, "a file asked for by name is still an error"


def test_auditctl_with_no_command_shows_its_help_as_it_is_on_stderr_and_exits_2():
    result = run()
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and "Commands:" in lines and len(lines) > 20, "not squashed into one error line"
    assert not result.stderr.startswith("Error:")


def test_quiet_keeps_the_line_saying_what_a_reset_changed(engine, database_url):
    """-q silences progress and summaries, never the one line saying what a change did."""
    from dbtools import make_running

    make_running(engine, 1)
    assert run("recover", "--database-url", database_url).exit_code == 0
    result = run("reset-all", "--yes", "-q", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == "Reset 1 audit to pending.", result.stderr


def test_a_config_file_may_set_max_resets_to_0_but_no_other_count(tmp_path):
    from auditctl.config import validate_config
    from auditctl.errors import ConfigError

    assert validate_config({"max_resets": 0}, tmp_path / "c.toml") == {"max_resets": 0}
    with pytest.raises(ConfigError, match="max_attempts must be a whole number from 1"):
        validate_config({"max_attempts": 0}, tmp_path / "c.toml")


@pytest.mark.parametrize("fmt", ["json", "csv", "markdown"])
def test_wide_with_a_machine_format_is_a_usage_error_not_a_silent_table(database_url, fmt):
    result = run("scan", "--wide", "-o", fmt, "--database-url", database_url)
    assert result.exit_code == 2 and f"--wide goes with the table and plain formats, not --format {fmt}" in result.stderr
    assert result.stdout == ""
    assert run("scan", "--wide", "-o", "plain", "--database-url", database_url).exit_code == 0


def test_an_interval_of_exactly_the_floor_is_taken_and_one_below_it_refused(tmp_path):
    """The floor is the least interval allowed (100ms), not the first refused."""
    path = tmp_path / "floor.toml"
    path.write_text('interval = "100ms"\n')
    assert run("--config", path, "config").exit_code == 0
    path.write_text('interval = "99ms"\n')
    refused = run("--config", path, "config")
    assert refused.exit_code == 2 and "is below the floor of 100ms" in refused.stderr, refused.output


def test_a_config_file_count_may_not_be_true_or_false(tmp_path):
    from auditctl.config import validate_config
    from auditctl.errors import ConfigError

    for key in ("max_attempts", "max_resets"):
        with pytest.raises(ConfigError, match=f"{key} must be a whole number"):
            validate_config({key: True}, tmp_path / "c.toml")


def test_plain_output_takes_columns_of_20_or_more_and_ignores_a_narrower_value(monkeypatch):
    from auditctl.cli.render import PLAIN_WIDTH, terminal_width

    for columns, width in (("20", 20), ("19", PLAIN_WIDTH), ("120", 120), ("wide", PLAIN_WIDTH)):
        monkeypatch.setenv("COLUMNS", columns)
        assert terminal_width("plain") == width, columns


def test_a_yes_no_value_reads_yes_or_no_in_a_table_and_true_or_false_in_csv(capsys):
    from auditctl.cli.render import Column, render

    records = [{"id": 1, "requeued": True}, {"id": 2, "requeued": False}]
    columns = [Column("id", "ID", fit="whole"), Column("requeued", "REQUEUED")]
    render(records, columns, "plain")
    assert [line.split() for line in capsys.readouterr().out.splitlines()] == [["ID", "REQUEUED"], ["1", "yes"], ["2", "no"]]
    render(records, columns, "csv")
    assert capsys.readouterr().out.splitlines() == ["id,requeued", "1,true", "2,false"]


def test_markdown_aligns_number_columns_right_and_a_whole_list_column_keeps_one_item_per_line(capsys):
    from auditctl.cli.render import Column, render

    records = [{"id": 7, "reasons": ["stale_heartbeat", "max_age_exceeded"], "workers": ["w1", "w2"]}]
    columns = [Column("id", "ID", justify="right", fit="whole"), Column("reasons", "REASONS", fit="whole"),
               Column("workers", "WORKERS")]
    render(records, columns, "markdown")
    assert capsys.readouterr().out.splitlines()[1] == "|---:|---|---|"
    render(records, columns, "wide")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["7", "stale_heartbeat", "w1,", "w2"] and lines[2].split() == ["max_age_exceeded"]


def test_a_fitted_listing_clips_a_huge_detail_cell_and_says_how_much_was_left_out(capsys, monkeypatch):
    from auditctl.cli.render import Column, render
    from auditctl.textsafe import MAX_CELL

    monkeypatch.setenv("COLUMNS", "80")
    huge = "word " * 20_000
    render([{"id": 1, "error": huge}], [Column("id", "ID", fit="whole"), Column("error", "ERROR", fit="wrap", detail=True)],
           "plain")
    out = capsys.readouterr().out
    assert len(out) < 2 * MAX_CELL and f"({len(huge) - MAX_CELL:,} more characters)" in out
