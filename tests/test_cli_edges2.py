"""Edges of the command line an operator meets unattended: a reset limit nobody was shown, a stderr
the shell closed, a database URL that is not text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from auditctl.cli import cli
from auditctl.schema import audits
from auditctl.transactions import read_connection, write_transaction

AUDITCTL = Path(sys.executable).parent / "auditctl"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_") and k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), **extra)
    return env


def with_stderr_closed(args, *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``auditctl ARGS 2>&-``: the process starts with no descriptor 2 at all (not /dev/null)."""
    return subprocess.run(["sh", "-c", '"$0" "$@" 2>&-', str(AUDITCTL), *args], cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, check=False, timeout=60)


def status_of(engine, audit_id: int) -> str:
    with read_connection(engine) as connection:
        return connection.execute(select(audits.c.status).where(audits.c.id == audit_id)).scalar_one()


# --- reset-all --yes says what the reset limit held back ----------------------------------------


def test_reset_all_yes_says_which_audits_it_held_back_at_max_resets(database_url, engine):
    assert run("demo", "--database-url", database_url).exit_code == 0
    with read_connection(engine) as connection:
        failed = connection.execute(select(audits.c.id).where(audits.c.status == "failed").order_by(audits.c.id)).scalars().first()
        stuck = connection.execute(select(audits.c.id).where(audits.c.target == "https://blog.example.net",
                                                             audits.c.status == "running")).scalar_one()
    with write_transaction(engine) as connection:  # each already reset once, by an earlier incident
        connection.execute(update(audits).where(audits.c.id.in_([failed, stuck])).values(resets=1))

    dry = run("reset-all", "--include-stuck", "--max-resets", "1", "--dry-run", "--database-url", database_url)
    result = run("reset-all", "--include-stuck", "--max-resets", "1", "--yes", "--database-url", database_url)

    assert result.exit_code == 0, "an audit left alone at the limit is not an error"
    lines = result.stderr.splitlines()
    assert lines[0] == "Reset 3 audits to pending."
    held_back = ["1 audit already reset 1 time stays failed (--max-resets to change).",
                 "1 stuck audit already reset 1 time stays running (--max-resets to change)."]
    assert lines[1:] == held_back, "said unattended as the dry run said it"
    assert all(line in dry.stderr.splitlines() for line in held_back)
    assert (status_of(engine, failed), status_of(engine, stuck)) == ("failed", "running")


# --- a closed stderr ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    assert subprocess.run([str(AUDITCTL), "demo"], cwd=path, env=clean_env(path), capture_output=True,
                          timeout=60).returncode == 0
    return path


@pytest.mark.parametrize("args", [["list"], ["scan"], ["config"], ["recover", "--dry-run"], ["reset-all", "--dry-run"]],
                         ids=lambda args: " ".join(args))
def test_a_status_line_lost_to_a_closed_stderr_exits_1_whatever_the_command(demo_dir, args):
    env = clean_env(demo_dir)
    lost = with_stderr_closed(args, cwd=demo_dir, env=env)
    written = subprocess.run([str(AUDITCTL), *args], cwd=demo_dir, env=env, capture_output=True, text=True, timeout=60)
    assert written.stderr and written.returncode == 0, "each of these says something on stderr"
    assert lost.returncode == 1, f"{args}: its status line {written.stderr.splitlines()[0]!r} was lost"


def test_a_closed_stderr_loses_nothing_under_quiet_and_nothing_when_read_by_dev_null(demo_dir):
    env = clean_env(demo_dir)
    assert with_stderr_closed(["list", "-q"], cwd=demo_dir, env=env).returncode == 0
    assert subprocess.run([str(AUDITCTL), "list"], cwd=demo_dir, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=60).returncode == 0, "/dev/null takes the line"


def test_an_error_line_lost_to_a_closed_stderr_exits_1_as_one_on_a_full_disk_does(demo_dir):
    env = clean_env(demo_dir)
    with open("/dev/full", "w") as full:
        assert subprocess.run([str(AUDITCTL), "scan", "--stale-after", "abc"], cwd=demo_dir, env=env,
                              stderr=full, timeout=60).returncode == 1, "the control: a full stderr"
    assert with_stderr_closed(["scan", "--stale-after", "abc"], cwd=demo_dir, env=env).returncode == 1
    assert with_stderr_closed(["show", "999999"], cwd=demo_dir, env=env).returncode == 1


# --- a database URL that is not UTF-8 -----------------------------------------------------------

NOT_UTF8 = b"sqlite:///\xff.db"


@pytest.mark.parametrize("given", ["flag", "flag after the command", "environment"])
@pytest.mark.parametrize("command", [["init"], ["demo"], ["scan"], ["list"], ["config"], ["reset-all", "--dry-run"]],
                         ids=lambda args: " ".join(args))
def test_a_database_url_whose_bytes_are_not_utf8_is_a_usage_error_before_anything_is_created(tmp_path, command, given):
    env = clean_env(tmp_path)
    if given == "flag":
        args = [b"--database-url", NOT_UTF8, *command]
    elif given == "flag after the command":
        args = [*command, b"--database-url", NOT_UTF8]
    else:
        args, env = command, {**env, "AUDITCTL_DATABASE_URL": NOT_UTF8}
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([str(AUDITCTL), *args], cwd=work, env=env, capture_output=True, timeout=60)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "not UTF-8" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    if given == "environment":
        assert "$AUDITCTL_DATABASE_URL" in stderr, "it names where the value came from"
    assert os.listdir(work) == [], "no database file by that name"


def test_a_config_file_database_url_that_no_file_can_be_named_is_a_usage_error(tmp_path):
    config = tmp_path / "auditctl.toml"
    config.write_text('database_url = "sqlite:///a\\u0000b.db"\n')
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([str(AUDITCTL), "--config", str(config), "init"], cwd=work, env=clean_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "database_url: a NUL character is not allowed" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(work) == []
