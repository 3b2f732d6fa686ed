"""The installed ``auditctl`` as a real process: what an operator's shell, cron or a terminal sees.

CliRunner (test_cli.py) fakes the streams; these tests do not: real stdin that is or is
not a terminal, real pipes, real exit codes, real start-up imports.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, text
from sqlalchemy import select as sql_select

from auditctl import __version__
from auditctl.cli import cli
from auditctl.db import create_engine
from auditctl.schema import audit_events, audits
from auditctl.transactions import read_connection
from dbtools import make_running

AUDITCTL = Path(sys.executable).parent / "auditctl"
STUCK_IN_DEMO = {
    "https://blog.example.net": "stale_heartbeat",
    "https://payments.example.com": "max_age_exceeded",
    "https://status.example.io": "progress_stalled",
}
UNREACHABLE = "postgresql://bob:s3cret@127.0.0.1:1/x"
SGR = re.compile(r"\x1b\[([0-9;]*)m")


def clean_env(tmp_path: Path, **extra) -> dict:
    """The caller's environment without any auditctl setting or colour override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUDITCTL_") and k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "TERM")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), TERM="xterm-256color", **extra)
    return env


def auditctl(*args, cwd: Path, env: dict, input: str | None = None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(AUDITCTL), *map(str, args)], cwd=cwd, env=env, input=input, stdin=stdin,
                          check=False, capture_output=True, text=True, timeout=60)


def on_terminal(args, *, cwd: Path, env: dict, answer: bytes | None = None, timeout: float = 30) -> tuple[int, str]:
    """Run auditctl with stdin, stdout and stderr on a 200x50 pseudo-terminal; type ``answer`` at the [y/N] prompt."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns: no target folds
    def controlling_terminal():
        # A session of its own with the pseudo-terminal as its controlling terminal, as a login
        # shell gives it: then Ctrl-C typed at the terminal is SIGINT for the process, as for real.
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # A shell starts a foreground command with SIGINT at its default, whatever the test runner
        # inherited (a background job's SIGINT is ignored, and that would be passed on).
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([str(AUDITCTL), *map(str, args)], stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                               env=env, close_fds=True, preexec_fn=controlling_terminal)
    # The slave stays open here until the process is gone: closed early, a Ctrl-C typed at the
    # master was at times never turned into SIGINT for the child.
    output, answered, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal is gone
                    break
                output += chunk
                if answer is not None and not answered and b"[y/N]" in output:
                    # A person answers a moment after the question appears: typed at the very instant
                    # it is printed, a Ctrl-C can land before Python waits for input, which then waits on.
                    time.sleep(0.3)
                    os.write(master, answer)
                    answered = True
            elif process.poll() is not None:
                break  # exited, and everything it wrote has been read
        else:
            process.kill()
            pytest.fail(f"auditctl {' '.join(map(str, args))} did not finish on the terminal:\n{output.decode(errors='replace')}")
        return process.wait(timeout=10), output.decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
        if process.poll() is None:
            process.kill()


def colour_codes(text: str) -> list[str]:
    """The SGR sequences in ``text`` that set a foreground or background colour."""
    found = []
    for params in SGR.findall(text):
        codes = [int(p) for p in params.split(";") if p]
        if any(30 <= c <= 49 or 90 <= c <= 107 for c in codes):
            found.append(params)
    return found


def count(url: str, table=audits, **where) -> int:
    engine = create_engine(url)
    try:
        with read_connection(engine) as connection:
            query = sql_select(func.count()).select_from(table)
            for column, value in where.items():
                query = query.where(table.c[column] == value)
            return connection.execute(query).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A working directory whose embedded default database (./auditctl.db) holds the demo fleet.

    Read-only tests share it; what they run must not write."""
    path = tmp_path_factory.mktemp("demo")
    env = clean_env(path)
    result = auditctl("demo", cwd=path, env=env)
    assert result.returncode == 0, result.stderr
    return path


# --- the README quick start -----------------------------------------------------------


def test_readme_quick_start_demo_then_scan_shows_the_three_stuck_audits(tmp_path):
    env = clean_env(tmp_path, PATH=f"{AUDITCTL.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run("auditctl demo && auditctl scan", shell=True, cwd=tmp_path, env=env, check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "auditctl.db").is_file(), "the embedded SQLite default lives in the working directory"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Demo fleet written to sqlite:///auditctl.db")
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["ID", "TARGET", "REASONS"])
    rows = [line for line in lines[header + 1:] if not line.startswith(" ")]  # each row may have a "why:" line under it
    assert len(rows) == 3
    for target, reason in STUCK_IN_DEMO.items():
        assert any(target in row and reason in row for row in rows), f"{target} ({reason}) missing:\n{result.stdout}"
    assert "3 stuck audits (1 stale_heartbeat, 1 max_age_exceeded, 1 progress_stalled) in sqlite:///auditctl.db" in result.stderr


def test_scan_json_from_a_real_pipe_parses_as_one_array(demo_dir):
    result = auditctl("scan", "--format", "json", cwd=demo_dir, env=clean_env(demo_dir))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert {r["target"]: r["reasons"] for r in records} == {t: [r] for t, r in STUCK_IN_DEMO.items()}


def test_scan_exit_code_from_a_real_process_is_3_for_monitoring(demo_dir):
    result = auditctl("scan", "--exit-code", "-q", cwd=demo_dir, env=clean_env(demo_dir))
    assert result.returncode == 3
    assert result.stderr == ""


@pytest.mark.parametrize("fmt", ["json", "csv", "plain"])
def test_a_reader_that_leaves_early_cuts_the_scan_not_its_count_or_exit_code(tmp_path, fmt):
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'piped.db'}"
    engine = create_engine(url)
    upgrade(engine)
    make_running(engine, 1500, silent_for=700)  # far more than a pipe holds: head leaves mid-listing
    engine.dispose()
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | head -1; exit "${{PIPESTATUS[0]}}"', "run",
                            "--database-url", url, "scan", "--exit-code", "--format", fmt],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert piped.returncode == 3, piped.stderr
    assert len(piped.stdout.splitlines()) == 1 and piped.stderr.count("\n") == 1, piped.stderr
    assert piped.stderr.startswith("1500 stuck audits (1500 stale_heartbeat)"), piped.stderr


def test_a_listing_cut_by_its_reader_ends_quietly_with_its_own_exit_code(tmp_path):
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'piped.db'}"
    engine = create_engine(url)
    upgrade(engine)
    make_running(engine, 1500, silent_for=5)
    engine.dispose()
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | head -1; exit "${{PIPESTATUS[0]}}"', "run",
                            "--database-url", url, "list", "--limit", "0", "--format", "csv"],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    # The summary counts every audit, not only those the reader took (README, "Exit codes").
    assert (piped.returncode, piped.stderr) == (0, "1500 audits\n"), piped.stderr
    assert piped.stdout.startswith("id,")


@pytest.mark.parametrize("command", [["show", "{id}"], ["report"], ["completion", "bash"]])
def test_output_whose_reader_is_gone_ends_quietly_with_exit_0(tmp_path, command):
    """Not a listing: the command just stops writing. It used to exit 1 through click's pipe handling."""
    from auditctl.history import Actor
    from auditctl.migrate import upgrade
    from auditctl.recovery import recover_stuck
    from auditctl.thresholds import Thresholds

    url = f"sqlite:///{tmp_path / 'piped.db'}"
    engine = create_engine(url)
    upgrade(engine)
    (audit_id,) = make_running(engine, 1)
    recover_stuck(engine, Thresholds(), actor=Actor.command("recover"))  # something for the report to tell
    engine.dispose()
    argv = [part.format(id=audit_id) for part in command]
    # The reader closes the pipe at once: the command's first write finds nobody there.
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | (exec <&-; sleep 0.2); exit "${{PIPESTATUS[0]}}"',
                            "run", "--database-url", url, *argv],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert (piped.returncode, piped.stderr) == (0, ""), piped.stderr


@pytest.mark.parametrize("fmt", [["--format", "table"], ["--wide"]])
def test_show_drawn_by_rich_ends_quietly_with_exit_0_when_its_reader_is_gone(tmp_path, fmt):
    """show -o table and --wide print through rich, whose own answer to a gone reader is exit 1, without a word."""
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'piped.db'}"
    engine = create_engine(url)
    upgrade(engine)
    (audit_id,) = make_running(engine, 1)
    engine.dispose()
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | (exec <&-; sleep 0.2); exit "${{PIPESTATUS[0]}}"',
                            "run", "--database-url", url, "show", str(audit_id), *fmt],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert (piped.returncode, piped.stderr) == (0, ""), piped.stderr


def test_a_stderr_nobody_reads_never_turns_a_result_into_success(tmp_path):
    """Only a gone reader of stdout is exit 0: on a dead stderr, scan --exit-code's summary line is
    what fails, before the command could give its own code; that stays a failure."""
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'piped.db'}"
    engine = create_engine(url)
    upgrade(engine)
    make_running(engine, 1)
    engine.dispose()
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([str(AUDITCTL), "--database-url", url, "scan", "--exit-code"], cwd=tmp_path,
                                env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=writer, timeout=60)
    finally:
        os.close(writer)
    assert result.returncode == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_reset_stopped_by_a_signal_exits_130_saying_how_many_it_reset_and_leaves_the_rest_untouched(tmp_path, sig):
    from sqlalchemy import update

    from auditctl.migrate import upgrade
    from dbtools import write_transaction

    url = f"sqlite:///{tmp_path / 'reset.db'}"
    engine = create_engine(url)
    upgrade(engine)
    ids = make_running(engine, 5000)  # ten batches: seconds of work
    with write_transaction(engine) as connection:
        connection.execute(update(audits).values(status="failed", error="scanner crashed", finished_at=audits.c.heartbeat_at))

    def pending() -> int:
        with read_connection(engine) as connection:
            return connection.execute(sql_select(func.count()).where(audits.c.status == "pending")).scalar_one()

    process = subprocess.Popen([str(AUDITCTL), "--database-url", url, "reset-all", "--yes", "--format", "json"],
                               cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while pending() == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(sig)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    done = pending()
    assert 0 < done < len(ids), "the signal landed mid-reset"
    assert process.returncode == 130, stderr
    assert f"Interrupted: batches already done stay done ({done} audits reset); nothing else was changed." in stderr
    with read_connection(engine) as connection:
        statuses = dict(connection.execute(sql_select(audits.c.status, func.count()).group_by(audits.c.status)).all())
        resets = connection.execute(sql_select(func.count()).where(audit_events.c.event == "reset")).scalar_one()
    engine.dispose()
    assert statuses == {"pending": done, "failed": len(ids) - done} and resets == done


# --- reset-all: refuses off a terminal, asks on one -------------------------------------


@pytest.mark.parametrize("stdin, typed", [(subprocess.DEVNULL, None), (None, "y\n")], ids=["no-stdin", "piped-yes"])
def test_reset_all_refuses_when_stdin_is_not_a_terminal_and_changes_nothing(demo_dir, stdin, typed):
    url = f"sqlite:///{demo_dir / 'auditctl.db'}"
    failed, history = count(url, status="failed"), count(url, audit_events)
    result = auditctl("reset-all", cwd=demo_dir, env=clean_env(demo_dir), stdin=stdin, input=typed)
    assert result.returncode == 4
    assert "refusing to reset 2 audits" in result.stderr and "Pass --yes" in result.stderr
    assert (count(url, status="failed"), count(url, audit_events)) == (failed, history)


def test_reset_all_on_a_terminal_asks_and_declining_changes_nothing(demo_dir):
    url = f"sqlite:///{demo_dir / 'auditctl.db'}"
    failed, history = count(url, status="failed"), count(url, audit_events)
    code, screen = on_terminal(["reset-all"], cwd=demo_dir, env=clean_env(demo_dir), answer=b"n\n")
    assert "https://cdn.example.com" in screen and "https://auth.example.com" in screen, "it shows which audits first"
    assert "Reset 2 audits to pending? [y/N]" in screen
    assert "Aborted: nothing changed." in screen
    assert code == 4
    assert (count(url, status="failed"), count(url, audit_events)) == (failed, history)


def test_reset_all_on_a_terminal_asks_and_yes_resets(tmp_path):
    env = clean_env(tmp_path)
    assert auditctl("demo", cwd=tmp_path, env=env).returncode == 0
    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    code, screen = on_terminal(["reset-all"], cwd=tmp_path, env=env, answer=b"y\n")
    assert code == 0, screen
    assert "Reset 2 audits to pending." in screen
    assert count(url, status="failed") == 0
    assert count(url, audit_events, event="reset") == 2


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_unreachable_database_exits_1_naming_the_host_without_the_password(tmp_path, verbose):
    args = ["scan", "--database-url", UNREACHABLE] + (["-v"] if verbose else [])
    result = auditctl(*args, cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 1
    assert "s3cret" not in result.stdout + result.stderr
    assert "127.0.0.1" in result.stderr and result.stdout == ""
    if verbose:
        assert "Traceback" in result.stderr
    else:
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_flag_from_a_real_process_exits_2(tmp_path):
    result = auditctl("scan", "--stale-after", "abc", cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 2
    assert "Invalid value for '--stale-after'" in result.stderr


@pytest.mark.parametrize("args", [["list", "--target", b"x\xff"], ["scan", "--worker", b"w\xff"],
                                  ["scan", "--database-url", b"postgresql://bob:s3cret\xffPW@127.0.0.1:1/x"]])
def test_a_value_whose_bytes_are_not_utf8_is_one_usage_error_line(demo_dir, args):
    result = subprocess.run([str(AUDITCTL), *args], cwd=demo_dir, env=clean_env(demo_dir), capture_output=True, timeout=60)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "not UTF-8" in stderr and "s3cret" not in stderr


@pytest.mark.parametrize("args", [["scan"], ["--help"], ["completion", "bash"]])
def test_output_that_cannot_be_written_is_one_error_line_and_exit_1(demo_dir, args):
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(AUDITCTL), *args], cwd=demo_dir, env=clean_env(demo_dir), stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "Error: cannot write the output: No space left on device" in result.stderr


def test_a_closed_stdout_is_one_error_line_after_the_work_is_done(tmp_path):
    env = clean_env(tmp_path)
    assert auditctl("demo", cwd=tmp_path, env=env).returncode == 0
    result = subprocess.run(["bash", "-c", f'"{AUDITCTL}" recover >&-'], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "standard output is closed" in result.stderr
    assert auditctl("scan", "--exit-code", cwd=tmp_path, env=env).returncode == 0, "the recovery itself was done"


def test_a_stdout_that_is_not_utf8_gets_json_escapes_instead_of_a_traceback(tmp_path):
    from auditctl.migrate import upgrade
    from auditctl.worker import StuckAuditPrevention

    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    upgrade(create_engine(url))
    target = "https://caf\u00e9.example/\U0001f600/\u2026"
    guard = StuckAuditPrevention(url, worker_id="w", create_schema=False)
    guard.create_audit(target)
    guard.close()
    for encoding in ("ascii", "latin-1"):
        env = clean_env(tmp_path, PYTHONIOENCODING=encoding)
        listed = subprocess.run([str(AUDITCTL), "list", "-o", "json", "--database-url", url], cwd=tmp_path, env=env,
                                capture_output=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert [r["target"] for r in json.loads(listed.stdout.decode(encoding))] == [target], "the same value, escaped"
    table = auditctl("list", "-o", "plain", "--database-url", url, cwd=tmp_path,
                     env=clean_env(tmp_path, PYTHONIOENCODING="ascii", COLUMNS="200"))
    assert table.returncode == 0 and "caf\\u00e9.example/\\ud83d\\ude00" in table.stdout, table.stderr


def test_show_markdown_report_and_watch_lines_write_escapes_when_stdout_is_ascii(tmp_path):
    # click.echo takes an ASCII stdout for a misconfigured one and writes UTF-8 past it: every
    # command must write what ASCII cannot hold as the same escapes the listings write.
    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    assert auditctl("demo", "--database-url", url, cwd=tmp_path, env=clean_env(tmp_path)).returncode == 0
    engine = create_engine(url)
    with engine.begin() as connection:
        stuck = connection.execute(text("SELECT id FROM audits WHERE target = 'https://blog.example.net' AND status = 'running'")).scalar_one()
        connection.execute(text("UPDATE audits SET target = :t WHERE id = :id"),
                           {"t": "https://caf\u00e9.example/\U0001f600", "id": stuck})
    engine.dispose()
    env = clean_env(tmp_path, PYTHONIOENCODING="ascii", COLUMNS="200")
    for args in (["watch", "--once", "--no-live"], ["show", stuck], ["show", stuck, "-o", "markdown"],
                 ["show", stuck, "-o", "json"], ["list", "-o", "markdown"], ["report"], ["report", "-o", "json"]):
        shown = subprocess.run([str(AUDITCTL), *map(str, args), "--database-url", url], cwd=tmp_path, env=env,
                               capture_output=True, timeout=60)
        assert shown.returncode == 0, (args, shown.stderr)
        assert shown.stdout.isascii(), (args, shown.stdout)
        assert b"caf\\u00e9.example/\\ud83d\\ude00" in shown.stdout, (args, shown.stdout)
        if "json" in args:
            json.loads(shown.stdout)  # still one valid document


def test_on_a_stdout_that_is_not_utf8_columns_stay_aligned_and_cuts_are_ascii(tmp_path):
    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    assert auditctl("demo", "--database-url", url, cwd=tmp_path, env=clean_env(tmp_path)).returncode == 0
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audits SET target = :t WHERE status = 'running' AND target LIKE '%blog%'"),
                           {"t": "https://\u5bbd\u5bbd.example/\U0001f600"})
    engine.dispose()
    env = clean_env(tmp_path, PYTHONIOENCODING="ascii", COLUMNS="100")
    shown = auditctl("scan", "-o", "plain", "--database-url", url, cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "\\u5bbd\\u5bbd" in shown.stdout and "\\u2026" not in shown.stdout and "..." in shown.stdout
    header, *rows = [line for line in shown.stdout.splitlines() if not line.startswith(" ")]
    starts = {header.index("REASONS")} | {re.search(r"stale_heartbeat|max_age_exceeded|progress_stalled", row).start()
                                          for row in rows}
    assert len(starts) == 1, shown.stdout
    for columns in range(67, 73):  # a cut at each place of a six-character escape, never half of it
        narrow = auditctl("scan", "-o", "plain", "--database-url", url, cwd=tmp_path,
                          env=clean_env(tmp_path, PYTHONIOENCODING="ascii", COLUMNS=str(columns)))
        assert not re.search(r"\\(u[0-9a-f]{0,3})?\.\.\.", narrow.stdout), narrow.stdout


# --- colour ---------------------------------------------------------------------------


def test_on_a_terminal_listings_are_coloured_tables_unless_no_color_is_set(demo_dir):
    env = clean_env(demo_dir)
    code, coloured = on_terminal(["list"], cwd=demo_dir, env=env)
    assert code == 0
    assert SGR.sub("", coloured).splitlines()[0] == "Audits", "without --format, a terminal gets a table with its title"
    assert colour_codes(coloured), "the control: on a terminal, statuses are coloured"
    code, plain = on_terminal(["list"], cwd=demo_dir, env={**env, "NO_COLOR": "1"})
    assert code == 0
    assert plain.splitlines()[1].split()[:2] == ["ID", "TARGET"] and "https://shop.example.com/checkout" in plain
    assert colour_codes(plain) == [] and plain.isascii(), "NO_COLOR: plain ASCII"


def test_error_on_a_terminal_is_red_unless_no_color_is_set(tmp_path):
    env = clean_env(tmp_path)
    code, red = on_terminal(["show", "1", "--database-url", UNREACHABLE], cwd=tmp_path, env=env)
    assert code == 1 and colour_codes(red)
    code, plain = on_terminal(["show", "1", "--database-url", UNREACHABLE], cwd=tmp_path, env={**env, "NO_COLOR": "1"})
    assert code == 1 and "\x1b[" not in plain
    assert "s3cret" not in red + plain


# --- start-up -------------------------------------------------------------------------


IMPORTS = """
import sys
from auditctl.cli import main
sys.argv = ["auditctl", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules}
               & {"sqlalchemy", "rich", "alembic", "psycopg", "tabulate", "prometheus_client", "starlette", "uvicorn"})
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
print("COMMAND_MODULES=" + ",".join(sorted(m for m in sys.modules if m.startswith("auditctl.cli.")
                                           and m.split(".")[2] in {"admin", "judge", "notify", "report", "serve", "views",
                                                                   "watch"})), file=sys.stderr)
"""


def imported(tmp_path, what: str, *args, **env) -> set[str]:
    """The modules of one kind (``HEAVY`` or ``COMMAND_MODULES``) an auditctl process run with ``args`` imported."""
    result = subprocess.run([sys.executable, "-c", IMPORTS, *args], cwd=tmp_path, env=clean_env(tmp_path, **env),
                            check=False, capture_output=True, text=True, timeout=60)
    line = next(line for line in result.stderr.splitlines() if line.startswith(f"{what}="))
    return set(filter(None, line[len(what) + 1:].split(",")))


def heavy_imports(tmp_path, *args, **env) -> set[str]:
    return imported(tmp_path, "HEAVY", *args, **env)


@pytest.mark.parametrize("args, env", [
    (["--help"], {}),
    (["scan", "--help"], {}),
    (["watch", "--help"], {}),
    (["report", "--help"], {}),
    (["serve", "--help"], {}),
    (["--version"], {}),
    ([], {"_AUDITCTL_COMPLETE": "bash_complete", "COMP_WORDS": "auditctl sc", "COMP_CWORD": "1"}),
], ids=["help", "scan-help", "watch-help", "report-help", "serve-help", "version", "tab-completion"])
def test_help_version_and_completion_do_not_import_sqlalchemy_rich_or_alembic(tmp_path, args, env):
    assert heavy_imports(tmp_path, *args, **env) == set()


@pytest.mark.parametrize("args, env", [
    (["--help"], {}),
    (["--version"], {}),
    ([], {"_AUDITCTL_COMPLETE": "bash_complete", "COMP_WORDS": "auditctl ", "COMP_CWORD": "1"}),
    ([], {"_AUDITCTL_COMPLETE": "zsh_complete", "COMP_WORDS": "auditctl re", "COMP_CWORD": "1"}),
], ids=["help", "version", "tab-completion-bash", "tab-completion-zsh"])
def test_listing_the_commands_loads_none_of_their_modules(tmp_path, args, env):
    assert imported(tmp_path, "COMMAND_MODULES", *args, **env) == set()


def test_a_command_loads_only_the_modules_it_needs(tmp_path):
    """The control for the test above: ``workers --help`` loads the module that defines it, and not the others."""
    assert imported(tmp_path, "COMMAND_MODULES", "workers", "--help") == {"auditctl.cli.views"}


def test_the_import_check_sees_sqlalchemy_when_a_command_really_runs(tmp_path):
    """The control for the test above: a command that touches the database does import it."""
    assert {"sqlalchemy", "alembic"} <= heavy_imports(tmp_path, "init", "--database-url", f"sqlite:///{tmp_path / 'x.db'}")


def test_python_dash_m_auditctl_version(tmp_path):
    result = subprocess.run([sys.executable, "-m", "auditctl", "--version"], cwd=tmp_path, env=clean_env(tmp_path),
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"auditctl, version {__version__}"


# --- cron: overlapping recovers ---------------------------------------------------------


def test_overlapping_recover_processes_recover_each_audit_exactly_once(database_url, tmp_path):
    demo = CliRunner().invoke(cli, ["demo", "--database-url", database_url], catch_exceptions=False)
    assert demo.exit_code == 0, demo.output
    env = clean_env(tmp_path, AUDITCTL_DATABASE_URL=database_url)
    processes = [subprocess.Popen([str(AUDITCTL), "recover", "--format", "json"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0] * 3, [err for _, err in outputs]
    recovered = [record["target"] for out, _ in outputs for record in json.loads(out)]
    assert sorted(recovered) == sorted(STUCK_IN_DEMO), "each stuck audit recovered by exactly one of the processes"
    assert count(database_url, audit_events, actor="auditctl recover") == 3


# --- the collector in the command's own process ----------------------------------------------


def test_the_command_freezes_what_start_up_made_and_a_test_runner_is_left_alone(demo_dir):
    """In its own process, ``auditctl`` moves start-up's objects out of the collector's sight once
    the first engine exists; invoked inside another program (here the test runner) it never does."""
    import gc

    report = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr)); "
              "sys.argv = ['auditctl', 'scan', '--format', 'json']; from auditctl.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", report], cwd=demo_dir, env=clean_env(demo_dir), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    frozen = int(re.search(r"^frozen (\d+)$", result.stderr, re.M).group(1))
    assert frozen > 10_000, "SQLAlchemy, click and the engine are frozen"
    assert len(json.loads(result.stdout)) == 3

    before = gc.get_freeze_count()
    invoked = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{demo_dir / 'auditctl.db'}", "scan"])
    assert invoked.exit_code == 0, invoked.output
    assert gc.get_freeze_count() == before


def test_a_sigterm_after_the_command_finished_does_not_turn_its_exit_code_into_143(tmp_path):
    # The latest moment a signal can land: at exit, after the command chose its code (a second
    # SIGTERM to a watch that had stopped). The entry point's own process ignores it by then.
    script = ("import atexit, os, signal, sys\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              "sys.argv = ['auditctl', '--version']\n"
              "from auditctl.cli import main\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.startswith("auditctl, version")
