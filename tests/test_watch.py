"""``auditctl watch``: one pass through CliRunner, the loop in a real process, the incident screen in a real terminal."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import make_running, wait_for
from sqlalchemy import select, update
from terminal import Terminal, available

from auditctl.cli import cli
from auditctl.db import create_engine
from auditctl.schema import audit_events, audits
from auditctl.sqlfunctions import fetch_now
from auditctl.transactions import read_connection, write_transaction
from auditctl.urls import mask_url

AUDITCTL = Path(sys.executable).parent / "auditctl"
STUCK_IN_DEMO = {
    "https://blog.example.net": "stale_heartbeat",
    "https://payments.example.com": "max_age_exceeded",
    "https://status.example.io": "progress_stalled",
}
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
needs_tmux = pytest.mark.skipif(not available(), reason="tmux is not installed")


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False, prog_name="auditctl")


@pytest.fixture
def demo(database_url):
    result = invoke("demo", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    return database_url


def stuck_statuses(engine) -> dict[str, str]:
    """The status of each target's newest audit: the demo's stuck one (its finished history has the same targets,
    and PostgreSQL returns updated rows in no fixed order, so the order is asked for)."""
    with read_connection(engine) as connection:
        rows = connection.execute(select(audits.c.target, audits.c.status).where(audits.c.target.in_(STUCK_IN_DEMO))
                                  .order_by(audits.c.id))
        return dict(rows.all())


def everything(engine):
    with read_connection(engine) as connection:
        return ([tuple(r) for r in connection.execute(select(audits).order_by(audits.c.id))],
                [tuple(r) for r in connection.execute(select(audit_events).order_by(audit_events.c.id))])


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUDITCTL_") and k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TMUX")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), TERM="xterm-256color", **extra)
    return env


def backdate_heartbeat(engine, audit_id: int, seconds: float) -> None:
    with write_transaction(engine) as connection:
        moment = fetch_now(connection) - timedelta(seconds=seconds)
        connection.execute(update(audits).where(audits.c.id == audit_id)
                           .values(heartbeat_at=moment, last_worker_update=moment, progress_changed_at=moment))


# --- one pass (CliRunner: not a terminal, so log lines) ---------------------------------


def test_watch_once_recovers_stuck_audits_and_prints_log_lines_when_not_a_terminal(demo, engine):
    result = invoke("watch", "--once", "--database-url", demo)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(re.match(STAMP + " ", line) for line in lines), lines
    assert lines[0].endswith(f"watching {mask_url(demo)}")
    for target, reason in STUCK_IN_DEMO.items():
        assert any(f"({target}): {reason} -> failed; " in line and "recovered audit" in line for line in lines), target
    assert lines[-1].endswith("pass done: 3 recovered, 0 stuck left alone")
    assert "\x1b[" not in result.stdout
    assert result.stderr == "watch stopped.\n"
    assert stuck_statuses(engine) == {target: "failed" for target in STUCK_IN_DEMO}
    with read_connection(engine) as connection:
        actors = [row.actor for row in connection.execute(select(audit_events.c.actor))]
    assert actors.count("auditctl watch") == 3


@pytest.mark.parametrize("engine_name", ["sqlite"])  # a log line's text, not the engine
def test_watch_log_lines_cut_a_target_as_a_table_cell_does_when_it_is_megabytes(demo, engine):
    from auditctl.textsafe import MAX_CELL

    huge = "https://" + "t" * 300_000
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.target == "https://blog.example.net", audits.c.status == "running")
                           .values(target=huge))
    for args in (["--no-recover"], []):
        result = invoke("watch", "--once", *args, "--database-url", demo)
        assert result.exit_code == 0, result.output
        line = next(line for line in result.stdout.splitlines() if "https://ttt" in line)
        assert len(line) < MAX_CELL + 300, f"{len(line):,} characters in one log line"
        assert f"({len(huge) - MAX_CELL:,} more characters)" in line


def test_watch_no_recover_once_reports_stuck_audits_and_recovers_nothing(demo, engine):
    before = everything(engine)
    result = invoke("watch", "--once", "--no-recover", "--database-url", demo)
    assert result.exit_code == 0, result.output
    for target, reason in STUCK_IN_DEMO.items():
        line = next(line for line in result.stdout.splitlines() if f"({target}): {reason}" in line)
        assert "(not recovering: --no-recover)" in line and "fleet)" in line, line  # the explanation, with its source
    assert "recovered audit" not in result.stdout
    assert result.stdout.splitlines()[-1].endswith("pass done: 0 recovered, 3 stuck left alone")
    assert everything(engine) == before


def test_watch_once_exits_1_like_recover_when_an_audit_needs_an_operator(demo, engine):
    from dbtools import install_abort_trigger

    with read_connection(engine) as connection:
        refused = connection.execute(select(audits.c.id).where(audits.c.target == next(iter(STUCK_IN_DEMO)),
                                                               audits.c.status == "running")).scalar_one()
    condition = f"OLD.id = {refused} AND NEW.status <> 'running'"
    install_abort_trigger(engine, "refuse_one", when_sqlite=condition, when_pg=condition)
    result = invoke("watch", "--once", "--database-url", demo)
    assert result.exit_code == 1, result.output
    assert "needs an operator" in result.output
    assert sum(1 for status in stuck_statuses(engine).values() if status == "failed") == len(STUCK_IN_DEMO) - 1


def test_watch_once_requeue_returns_stuck_audits_to_pending(demo, engine):
    result = invoke("watch", "--once", "--requeue", "--database-url", demo)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("-> pending;") == 3
    assert stuck_statuses(engine) == {target: "pending" for target in STUCK_IN_DEMO}


def test_watch_once_quiet_prints_only_what_it_recovered(demo):
    result = invoke("watch", "--once", "-q", "--database-url", demo)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("recovered audit") == 3
    assert "pass done" not in result.stdout and result.stderr == ""
    assert result.stdout.splitlines()[0].split(" ", 1)[1].startswith("recovered audit"), "no 'watching' line"
    again = invoke("watch", "--once", "-q", "--database-url", demo)
    assert again.exit_code == 0 and again.stdout == "" and again.stderr == "", "nothing changed: nothing printed"


def test_watch_once_with_nothing_stuck_says_the_pass_was_clean(database_url):
    result = invoke("watch", "--once", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].endswith("pass done: 0 recovered, 0 stuck left alone")


def test_watch_once_with_the_screen_forced_draws_it_once_after_the_pass(demo):
    result = invoke("watch", "--once", "--live", "--no-recover", "--database-url", demo, env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "auditctl watch" in out and "database: ok" in out
    assert re.search(r"running 7\s+stuck 3 \(1 stale_heartbeat, 1 max_age_exceeded, 1 progress_stalled\)", out), out
    assert "STUCK 1-3 of 3" in out
    assert out.index("https://blog.example.net") < out.index("healthy running") < out.index("https://shop.example.com/checkout")


def test_watch_on_a_missing_schema_exits_1_instead_of_retrying(blank_database_url, engine_name, tmp_path):
    if engine_name == "sqlite":  # the file must exist (read-only commands never create it); give it foreign tables
        import sqlite3

        path = blank_database_url.split("///", 1)[1]
        sqlite3.connect(path).close()
    for args in (["--once"], []):
        started = time.monotonic()
        result = invoke("watch", *args, "--database-url", blank_database_url)
        assert result.exit_code == 1, result.output
        assert "run `auditctl init`" in result.stderr.splitlines()[-1]
        assert "Traceback" not in result.output
        assert time.monotonic() - started < 10, "a missing schema is not an outage to wait out"


def test_watch_on_a_missing_sqlite_file_names_it_and_creates_nothing(tmp_path):
    result = invoke("watch", "--once", "--database-url", "sqlite:///nowhere.db")
    assert result.exit_code == 1
    assert f"no database at {tmp_path / 'nowhere.db'}" in result.stderr
    assert not (tmp_path / "nowhere.db").exists()


@pytest.mark.parametrize("args, floor", [(["--interval", "50ms"], "--interval 0.1s"), (["--refresh", "10ms"], "--refresh 0.0s"),
                                         (["--stale-after", "500ms"], "--stale-after 0.5s")])
def test_watch_refuses_intervals_and_thresholds_below_the_floor_unless_told(database_url, args, floor):
    refused = invoke("watch", "--once", *args, "--database-url", database_url)
    assert refused.exit_code == 2
    assert floor.split()[0] in refused.stderr and "--unsafe-thresholds" in refused.stderr
    allowed = invoke("watch", "--once", *args, "--unsafe-thresholds", "--database-url", database_url)
    assert allowed.exit_code == 0, allowed.output


# --- the loop in a real process (a pipe: log lines per change) ------------------------------------


def lines_of(stream) -> "queue.Queue[str | None]":
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_line(lines, seen, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"watch ended early: {seen}"
        seen.append(line)
        if predicate(line):
            return line


def piped_watch(url: str, tmp_path: Path) -> tuple[subprocess.Popen, "queue.Queue[str | None]", list[str]]:
    """``auditctl watch`` (a pass a second, reads every 0.2 s) in a real process, its stdout a pipe,
    once it has recovered the demo's three stuck audits: (process, lines to come, lines seen)."""
    process = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "1s", "--refresh", "0.2s", "--database-url", url],
                               cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, seen = lines_of(process.stdout), []
    try:
        for target in STUCK_IN_DEMO:
            wait_line(lines, seen, lambda line, t=target: "recovered audit" in line and t in line)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, lines, seen


def test_watch_in_a_pipe_logs_each_change_once_and_stops_cleanly_on_sigterm(demo, engine, tmp_path):
    process, lines, seen = piped_watch(demo, tmp_path)
    try:
        # A healthy audit goes silent: it is reported stuck within a refresh, then recovered on the next pass.
        healthy = make_running(engine, 1, silent_for=5, worker_id="worker-9")[0]
        backdate_heartbeat(engine, healthy, 700)
        found = wait_line(lines, seen, lambda line: f"stuck audit {healthy} " in line)
        assert "stale_heartbeat" in found
        wait_line(lines, seen, lambda line: f"recovered audit {healthy} " in line)
        time.sleep(1.5)  # two more passes with nothing to do: nothing more is logged
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = process.wait(timeout=5)
        took = time.monotonic() - sent
        rest = []
        while (line := lines.get(timeout=5)) is not None:
            rest.append(line)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0
    assert took < 2.0, f"watch took {took:.2f}s to stop after SIGTERM"
    assert all(re.match(STAMP + " ", line) for line in seen + rest)
    assert not [line for line in rest if "pass done" in line or "stuck audit" in line], rest
    assert sum(1 for line in seen + rest if f"stuck audit {healthy} " in line) == 1, "one line per change"
    assert process.stderr.read() == "watch stopped.\n"


def test_a_file_gone_that_only_the_reads_between_passes_saw_still_restarts_the_silence_clock(tmp_path, capsys):
    """The file moved away and back between two passes: workers could not beat meanwhile, so the
    audit must not be taken for silent across that time, though no pass saw the outage."""
    import types

    from auditctl import leases
    from auditctl.cli.watch import LogView
    from auditctl.db import create_engine
    from auditctl.sqlitefile import FileWatch
    from auditctl.history import Actor
    from auditctl.migrate import upgrade
    from auditctl.monitor import Monitor
    from auditctl.thresholds import Thresholds

    path = tmp_path / "fleet.db"
    setup = create_engine(f"sqlite:///{path}")
    upgrade(setup)
    leases.claim(setup, leases.create_audit(setup, "https://example.com/beating"), worker_id="w", instance_id="i",
                 worker_url=None)
    setup.dispose()
    operator = create_engine(f"sqlite:///{path}", role="operator", must_exist=True)
    reader = create_engine(f"sqlite:///{path}", role="reader", must_exist=True)
    monitor = Monitor(operator, Thresholds(stale_after=2, max_age=600, stall_after=600), actor=Actor.command("watch"),
                      file_watch=FileWatch(operator, reader))
    view = LogView(types.SimpleNamespace(quiet=False, verbose=0, masked_url=f"sqlite:///{path}"))
    try:
        view.after_pass(monitor.run_pass())
        path.rename(tmp_path / "away.db")
        view.observe(monitor, None)  # a read between passes finds nothing at the path
        time.sleep(2.5)  # longer than stale_after: nobody could beat into a file that was not there
        (tmp_path / "away.db").rename(path)
        view.observe(monitor, None)
        after = monitor.run_pass()
    finally:
        operator.dispose()
        reader.dispose()
    shown = capsys.readouterr().out
    assert "database lost" in shown and "database back" in shown
    assert "stuck audit" not in shown and after.ok and after.recovered == [], shown


def test_watch_whose_output_cannot_be_written_still_recovers_and_exits_1(demo, engine, tmp_path):
    result = subprocess.run([str(AUDITCTL), "watch", "--once", "--database-url", demo], stdout=open("/dev/full", "w"),
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=clean_env(tmp_path), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: cannot write the output: No space left on device"
    assert set(stuck_statuses(engine).values()) == {"failed"}, "the pass ran: the work is done"


def test_watch_piped_into_a_reader_that_leaves_stops_quietly(demo, tmp_path):
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | head -1; exit "${{PIPESTATUS[0]}}"', "run", "watch",
                            "--interval", "1s", "--database-url", demo],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == "watch stopped.\n", piped.stderr
    assert piped.stdout.startswith(tuple("0123456789")) and "watching" in piped.stdout


@pytest.mark.parametrize("engine_name", ["sqlite"])  # the pipe, not the engine
def test_watch_piped_stops_quietly_when_its_reader_leaves_and_nothing_more_is_logged(demo, tmp_path):
    # The reader takes what is in the pipe, then leaves; with the stuck audits already logged and the
    # next pass an hour away, watch used to run on (and the shell's pipeline with it) until it wrote
    # again. It sees the reader gone at its next read of the fleet.
    piped = subprocess.Popen(["bash", "-c", f'"{AUDITCTL}" "$@" | {{ sleep 2; head -c 1 >/dev/null; }}; '
                              'exit "${PIPESTATUS[0]}"', "run", "watch", "--no-recover", "--interval", "1h",
                              "--database-url", demo],
                             cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _, stderr = piped.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(piped.pid, signal.SIGKILL)  # watch too, not only bash
        piped.communicate()
        pytest.fail("watch ran on after its reader left")
    assert piped.returncode == 0 and stderr == "watch stopped.\n", stderr


@pytest.mark.parametrize("engine_name", ["sqlite"])  # the pipe, not the engine
@pytest.mark.parametrize("reader", ["head -c 1 >/dev/null", "(exec <&-; sleep 0.2)"])  # a frame drawn; none
def test_watch_live_forced_into_a_pipe_stops_quietly_when_its_reader_leaves(demo, tmp_path, reader):
    # As the log lines do: rich's own answer to a gone reader was exit 1, without a word.
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" | {reader}; exit "${{PIPESTATUS[0]}}"', "run",
                            "watch", "--live", "--no-recover", "--refresh", "100ms", "--database-url", demo],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == "watch stopped.\n", piped.stderr


def test_watch_follows_a_sqlite_file_that_was_deleted_then_replaced_and_recovers_in_the_new_one(tmp_path):
    path = tmp_path / "watched.db"
    url = f"sqlite:///{path}"
    assert invoke("demo", "--database-url", url).exit_code == 0
    spare = tmp_path / "spare.db"
    assert invoke("demo", "--database-url", f"sqlite:///{spare}").exit_code == 0
    process, lines, seen = piped_watch(url, tmp_path)
    try:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        lost = wait_line(lines, seen, lambda line: "database lost" in line)
        assert "was deleted or moved away" in lost and not path.exists(), "watch must not create an empty file there"
        spare.rename(path)  # another database at the path, with its own three stuck audits
        wait_line(lines, seen, lambda line: "is there again" in line or "database back" in line)
        # Silence counts from the return (nobody could beat into a file that was not there), so of the
        # new file's three only the one over its max_age is recovered now, and in the new file.
        wait_line(lines, seen, lambda line: "recovered audit" in line and "payments.example.com" in line)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    reader = create_engine(url, role="reader")
    rows = stuck_statuses(reader)
    reader.dispose()
    assert rows["https://payments.example.com"] == "failed" and rows["https://blog.example.net"] == "running", rows


# --- the incident screen in a real terminal (tmux) ------------------------------------------------


def fleet_of(engine, running: int, stuck: int) -> list[int]:
    """``running`` healthy running audits plus ``stuck`` silent ones; returns the stuck ids."""
    make_running(engine, running, silent_for=5, age=60, worker_id="healthy-worker")
    return make_running(engine, stuck, silent_for=900, age=1200, worker_id="dead-worker", instance_id="dead-instance")


@needs_tmux
def test_watch_screen_at_80x24_shows_every_stuck_audit_of_a_big_fleet_and_a_new_one_within_3s(tmp_path, database_url, engine):
    stuck = fleet_of(engine, 200, 5)
    with Terminal(tmp_path, width=80, height=24, env=clean_env(tmp_path)) as term:
        term.run(str(AUDITCTL), "watch", "--no-recover", "--database-url", database_url)  # the default settings
        # Its last line drawn too: under load tmux can show a screen half written.
        shown = term.wait_for(lambda screen: "STUCK" in screen and re.search(r"and \d+ more running", screen),
                              message="the stuck audits, and the healthy audits beyond the screen counted")
        lines = shown.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert re.search(r"running 205\s+stuck 5 \(5 stale_heartbeat\)", shown), shown
        assert "STUCK 1-5 of 5" in shown
        for audit_id in stuck:
            assert re.search(rf"^\s*{audit_id}\s", shown, re.M), f"stuck audit {audit_id} not on screen:\n{shown}"

        healthy_id = stuck[0] - 1
        backdate_heartbeat(engine, healthy_id, 700)
        became_stuck = time.monotonic()
        shown = term.wait_for(lambda screen: "STUCK 1-6 of 6" in screen, timeout=10, message="the newly stuck audit")
        assert time.monotonic() - became_stuck < 3.0, "a newly stuck audit shows within 3s with the default settings"
        assert re.search(rf"^\s*{healthy_id}\s", shown, re.M)

        term.keys("C-c")
        pressed = time.monotonic()
        while term.exit_code is None:
            assert time.monotonic() - pressed < 1.5, f"watch still running after Ctrl-C:\n{term.screen()}"
            time.sleep(0.02)
        assert term.exit_code == 0 and "Traceback" not in term.screen()


@needs_tmux
def test_reset_all_at_a_terminal_shows_its_preview_with_the_question_and_writes_only_json_to_a_redirected_stdout(
        tmp_path, demo):
    out = tmp_path / "reset.json"
    with Terminal(tmp_path, width=120, height=30, env=clean_env(tmp_path)) as term:
        term.run("bash", "-c", f'"{AUDITCTL}" reset-all -o json --database-url "{demo}" > "{out}"')
        shown = term.wait_for(lambda screen: "to pending? [y/N]" in screen, message="the question")
        assert "Will reset" in shown and "https://" in shown, f"the operator sees which audits:\n{shown}"
        term.keys("y", "Enter")
        term.wait_for(lambda _screen: term.exit_code is not None, message="the end")
        assert term.exit_code == 0, term.screen()
    records = json.loads(out.read_text())
    assert len(records) == 2 and {r["status"] for r in records} == {"pending"}


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)  # a SQLite read never waits on a lock
def test_a_second_signal_stops_watch_at_once_while_a_read_waits_on_a_lock(demo, engine, tmp_path):
    process = subprocess.Popen([str(AUDITCTL), "watch", "--no-recover", "--refresh", "0.2s", "--database-url", demo],
                               cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, seen = lines_of(process.stdout), []
    try:
        wait_line(lines, seen, lambda line: "stuck audit" in line)
        with engine.connect() as blocker:
            blocker.exec_driver_sql("BEGIN")
            blocker.exec_driver_sql("LOCK TABLE audits IN ACCESS EXCLUSIVE MODE")  # the next read waits (30 s)
            time.sleep(1.0)
            process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            assert process.poll() is None, "the first signal waits for the read in flight"
            process.send_signal(signal.SIGINT)
            sent = time.monotonic()
            code = process.wait(timeout=20)
            took = time.monotonic() - sent
            blocker.exec_driver_sql("ROLLBACK")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130 and took < 3, (code, took)
    assert "Interrupted" in process.stderr.read()


def test_a_second_ctrl_c_during_the_cleanup_still_gives_the_terminal_back(demo, tmp_path):
    """The first Ctrl-C starts the cleanup, which waits for an alert in flight (a webhook that never
    answers); the second must not cut it before the screen is left and the terminal restored."""
    import pty
    import select
    import socket
    import termios

    hook = socket.socket()
    hook.bind(("127.0.0.1", 0))
    hook.listen(8)  # accepts, never answers
    env = {**clean_env(tmp_path), "TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes auditctl
        os.execve(str(AUDITCTL), ["auditctl", "watch", "--live", "--database-url", demo, "--webhook",
                                  f"http://127.0.0.1:{hook.getsockname()[1]}/hook", "--notify-timeout", "30s"], env)
    out = b""

    def drain(seconds):
        nonlocal out
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        drain(4)
        os.kill(pid, signal.SIGINT)
        drain(0.3)
        os.kill(pid, signal.SIGINT)
        drain(3)
        modes = termios.tcgetattr(fd)[3]
        _, status = os.waitpid(pid, 0)
    finally:
        hook.close()
        with contextlib.suppress(OSError):
            os.close(fd)
    assert b"\x1b[?1049h" in out and b"\x1b[?1049l" in out, "the alternate screen was left"
    assert modes & termios.ECHO and modes & termios.ICANON, "the terminal's modes were given back"
    assert os.waitstatus_to_exitcode(status) == 0


def test_watch_live_forced_into_a_pipe_draws_the_screen(demo, tmp_path):
    process = subprocess.Popen([str(AUDITCTL), "watch", "--live", "--no-recover", "--database-url", demo], cwd=tmp_path,
                               env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drawn = b""
    while b"stuck" not in drawn:  # the first frame drawn (watch has its Ctrl-C handler by then)
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, f"watch ended before drawing: {process.stderr.read()!r}"
        drawn += chunk
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=10)
    out = (drawn + rest).decode()
    assert process.returncode == 0 and err.decode() == "watch stopped.\n"
    assert "auditctl watch" in out and "stuck" in out, out[:500]


@needs_tmux
def test_warnings_while_the_screen_is_up_go_to_its_header_not_over_it(tmp_path, demo):
    import socket
    import urllib.request

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Terminal(tmp_path, width=120, height=30, env=clean_env(tmp_path)) as term:
        term.run(str(AUDITCTL), "watch", "--no-recover", "--interval", "1s", "--metrics-file",
                 str(metrics_dir / "auditctl.prom"), "--metrics-port", str(port), "--database-url", demo)
        term.wait_for(lambda screen: "last pass" in screen and (metrics_dir / "auditctl.prom").exists(),
                      message="the first pass")
        (metrics_dir / "auditctl.prom").unlink()
        metrics_dir.rmdir()
        shown = term.wait_for(lambda screen: "warning:" in screen, message="the warning in the header")
        lines = shown.splitlines()
        assert lines[0].startswith("auditctl watch"), f"the screen scrolled:\n{shown}"
        assert any(line.startswith("warning: ") and "metrics" in line for line in lines[:6]), shown
        if demo.startswith("sqlite"):
            # The database gone: the screen says so once, in its header; a scrape meanwhile says nothing
            # more. The metrics directory back first, so no other warning takes the header's note.
            metrics_dir.mkdir()
            database = Path(demo.split(":///", 1)[1])
            for suffix in ("", "-wal", "-shm"):
                Path(f"{database}{suffix}").unlink(missing_ok=True)
            shown = term.wait_for(lambda screen: "DATABASE LOST" in screen, message="the outage in the header")
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert "auditctl_database_up 0.0" in scraped
            for _ in range(12):  # three refreshes of the screen, looked at as they come
                shown = term.screen()
                assert shown.splitlines()[0].startswith("auditctl watch"), f"the screen scrolled:\n{shown}"
                assert "cannot read the database" not in shown, "the scrape repeated what the header says"
                time.sleep(0.25)
        term.keys("C-c")


@needs_tmux
def test_the_screen_lists_what_it_recovered_and_leaves_that_said_when_it_closes(tmp_path, demo, engine):
    with Terminal(tmp_path, width=120, height=30, env=clean_env(tmp_path)) as term:
        term.run("bash", "-c", f'"{AUDITCTL}" watch --interval 1s --database-url "{demo}"; sleep 30')
        shown = term.wait_for(lambda screen: "recovered 3" in screen and "recently recovered" in screen,
                              message="the demo's three stuck audits recovered, and listed")
        listed = shown.split("recently recovered", 1)[1]
        for reason in ("stale_heartbeat", "max_age_exceeded", "progress_stalled"):
            assert re.search(rf"^\d\d:\d\d:\d\d\s+\d+\s+https://\S+\s+{reason}\s.*failed", listed, re.M), shown
        term.keys("C-c")
        left = term.wait_for(lambda screen: "watch stopped." in screen, message="the screen closed")
    assert re.search(r"^watch recovered 3 audits: \d+ \(\w+\), \d+ \(\w+\), \d+ \(\w+\)$", left, re.M), left
    assert set(stuck_statuses(engine).values()) == {"failed"}


def sqlite_demo(tmp_path: Path) -> tuple[str, Path]:
    """A demo fleet in a SQLite file of its own: (its URL, its path)."""
    path = tmp_path / "fleet.db"
    result = invoke("demo", "--database-url", f"sqlite:///{path}")
    assert result.exit_code == 0, result.output
    return f"sqlite:///{path}", path


def delete_sqlite_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.mark.skipif(not available(), reason="needs tmux")
def test_a_failing_webhook_is_shown_in_the_screens_header(tmp_path, demo):
    from webhooks import Answer, Webhook

    hook = Webhook()
    hook.always(Answer(status=500, body=b"internal error"))
    try:
        with Terminal(tmp_path, width=140, height=30, env=clean_env(tmp_path)) as term:
            term.run(str(AUDITCTL), "watch", "--interval", "5s", "--webhook", hook.url(), "--database-url", demo)
            shown = term.wait_for(lambda screen: "could not deliver" in screen, message="the failed alert in the header")
    finally:
        hook.close()
    header = [line for line in shown.splitlines()[:6] if "could not deliver" in line]
    assert header and "HTTP 500: internal error" in header[0] and "/services/" not in shown, shown


def test_a_scrape_while_the_log_says_the_database_is_lost_warns_nothing_more(tmp_path):
    """Only a read between passes has seen the outage (the next pass is an hour away): the log has
    said the database is lost, so a scrape meanwhile answers database_up 0 and logs nothing."""
    from webtools import free_port

    url, path = sqlite_demo(tmp_path)
    port = free_port()
    process = subprocess.Popen([str(AUDITCTL), "watch", "--no-recover", "--interval", "1h", "--refresh", "0.2s",
                                "--metrics-port", str(port), "--database-url", url],
                               cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, seen = lines_of(process.stdout), []
    try:
        wait_line(lines, seen, lambda line: "stuck audit 14 " in line)  # the first pass is done
        assert "auditctl_database_up 1.0" in scrape(port)
        delete_sqlite_file(path)
        wait_line(lines, seen, lambda line: "database lost" in line)
        assert "auditctl_database_up 0.0" in scrape(port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = process.stderr.read()
    assert "cannot read the database" not in errors, "the scrape repeated what the log says"
    assert errors.endswith("watch stopped.\n"), errors


@needs_tmux
def test_a_scrape_while_the_screen_says_the_database_is_lost_adds_no_warning_to_it(tmp_path):
    """As above, on the screen: its header says DATABASE LOST, and a scrape before the next pass
    puts no second note about the same outage there."""
    from webtools import free_port

    url, path = sqlite_demo(tmp_path)
    port = free_port()
    with Terminal(tmp_path, width=120, height=30, env=clean_env(tmp_path)) as term:
        term.run(str(AUDITCTL), "watch", "--no-recover", "--interval", "1h", "--refresh", "0.2s",
                 "--metrics-port", str(port), "--database-url", url)
        term.wait_for(lambda screen: "last pass" in screen and "not yet" not in screen, message="the first pass")
        delete_sqlite_file(path)
        term.wait_for(lambda screen: "DATABASE LOST" in screen, message="the outage in the header")
        assert "auditctl_database_up 0.0" in scrape(port)
        for _ in range(8):  # several refreshes of the screen, looked at as they come
            shown = term.screen()
            assert "cannot read the database" not in shown, f"the scrape repeated what the header says:\n{shown}"
            time.sleep(0.25)
        term.keys("C-c")


@needs_tmux
def test_the_screen_under_no_color_cuts_text_with_ascii_dots(tmp_path, demo):
    with Terminal(tmp_path, width=60, height=24, env=clean_env(tmp_path, NO_COLOR="1")) as term:
        term.run(str(AUDITCTL), "watch", "--no-recover", "--database-url", demo)
        shown = term.wait_for(lambda screen: "https://" in screen and "..." in screen, message="a cut line")
        term.keys("C-c")
    assert "\u2026" not in shown, shown
    assert all(len(line) <= 60 for line in shown.splitlines())


@needs_tmux
def test_watch_screen_pages_through_more_stuck_audits_than_fit(tmp_path, database_url, engine):
    stuck = fleet_of(engine, 3, 30)
    with Terminal(tmp_path, width=80, height=24, env=clean_env(tmp_path)) as term:
        term.run(str(AUDITCTL), "watch", "--no-recover", "--database-url", database_url)
        shown = term.wait_for(lambda screen: "page 1/" in screen, message="the first page")
        assert re.search(r"STUCK 1-\d+ of 30", shown)
        seen = {int(m) for m in re.findall(r"^\s*(\d+)\s+https://", shown, re.M)}
        term.keys("n")
        shown = term.wait_for(lambda screen: "page 2/" in screen, timeout=5, message="the second page after n")
        seen |= {int(m) for m in re.findall(r"^\s*(\d+)\s+https://", shown, re.M)}
        while not set(stuck) <= seen:
            previous = re.search(r"page (\d+)/", shown).group(1)
            term.keys(" ")
            shown = term.wait_for(lambda screen, p=previous: f"page {p}/" not in screen, timeout=5, message="the next page")
            seen |= {int(m) for m in re.findall(r"^\s*(\d+)\s+https://", shown, re.M)}
        term.keys("C-c")


@needs_tmux
def test_watch_on_a_dumb_terminal_writes_log_lines_not_a_screen(tmp_path, demo):
    with Terminal(tmp_path, width=80, height=24, env=clean_env(tmp_path)) as term:
        term.run(str(AUDITCTL), "watch", "--once", "--database-url", demo, term="dumb")
        shown = term.wait_for(lambda screen: "pass done" in screen, message="the log lines")
        assert "recovered audit" in shown and "\x1b" not in shown


@pytest.mark.parametrize("engine_name", ["sqlite"])
def test_watch_on_a_file_opened_read_only_says_it_cannot_write_and_exits_1(demo):
    """Not an outage to retry for ever: nothing it could recover would ever be written."""
    watch = subprocess.run([AUDITCTL, "watch", "--interval", "1s", "--no-live", "--database-url", f"{demo}?mode=ro"],
                           capture_output=True, text=True, timeout=60)
    assert watch.returncode == 1, watch.stdout + watch.stderr
    assert "cannot watch: " in watch.stdout and "will not let auditctl write" in watch.stdout
    assert "database lost" not in watch.stdout


def test_a_stop_asked_by_a_signal_that_lands_inside_the_events_own_lock_neither_hangs_nor_is_lost():
    import threading

    from auditctl.signals import set_from_handler

    stop = threading.Event()
    returned = threading.Event()

    def thread_interrupted_inside_stop_set():
        # A second Ctrl-C landing while the first one's set() holds the event's (non-reentrant) lock.
        with stop._cond:
            set_from_handler(stop)
            returned.set()

    threading.Thread(target=thread_interrupted_inside_stop_set, daemon=True).start()
    assert returned.wait(5), "the handler waited for the lock its own thread holds: watch would hang for good"
    assert stop.wait(5), "the stop was set once the lock was free"


def test_watch_interrupted_by_two_signals_back_to_back_always_ends(tmp_path):
    url = f"sqlite:///{tmp_path / 'signals.db'}"
    assert invoke("demo", "--database-url", url).exit_code == 0
    for attempt in range(8):
        process = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "1s", "--database-url", url], cwd=tmp_path,
                                   env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        wait_line(lines_of(process.stdout), [], lambda line: "watching" in line)
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"watch hung after two signals (attempt {attempt})") from None
        assert code in (0, 130), code


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)  # a batch waits on a row lock only there
def test_watch_stops_cleanly_and_logs_its_recoveries_when_sighup_lands_during_a_recovery_batch(engine, database_url, tmp_path):
    """SIGHUP (a closed terminal, a container runtime, ``systemctl kill -s HUP``) used to end watch at once:
    batches already committed stayed recovered but no log line ever said so, and no ``watch stopped.``."""
    ids = make_running(engine, 1200, silent_for=900)
    process = None
    with engine.connect() as blocker:
        blocker.exec_driver_sql("BEGIN")
        blocker.exec_driver_sql("LOCK TABLE audits IN SHARE MODE")  # reads go on, the pass's UPDATE waits here
        try:
            process = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "1h", "--database-url", database_url],
                                       cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while not _waits_on_a_lock(engine):
                assert process.poll() is None and time.monotonic() < deadline, "the pass never reached its batch"
                time.sleep(0.1)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        finally:
            blocker.exec_driver_sql("ROLLBACK")
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, (process.returncode, err)
    assert err.endswith("watch stopped.\n"), err
    logged = {int(m) for m in re.findall(r"recovered audit (\d+) ", out)}
    assert logged == set(ids)
    with read_connection(engine) as connection:
        recovered = set(connection.execute(select(audit_events.c.audit_id)).scalars())
    assert recovered == set(ids)


def _waits_on_a_lock(engine) -> bool:
    """Whether another session of this test's database waits on a lock (pg_stat_activity)."""
    with engine.connect() as connection:
        return bool(connection.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid() "
            "AND datname = current_database()").scalar())


@pytest.mark.parametrize("engine_name", ["sqlite"])  # the log stream, not the engine
def test_watch_logging_to_a_socket_keeps_recovering_when_the_log_collector_goes_away(demo, engine, tmp_path):
    """stdout a stream socket (journald, a log collector): a peer that goes away is not a reader that
    took what it wanted (``| head``). watch used to stop at its next line, exit 0, so a unit with
    ``Restart=on-failure`` was not restarted and nothing recovered stuck audits any more."""
    import socket

    collector, stream = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "0.5s", "--refresh", "0.2s", "--database-url", demo],
                               cwd=tmp_path, env=clean_env(tmp_path), stdout=stream, stderr=subprocess.PIPE, text=True)
    stream.close()
    try:
        with collector.makefile("r") as lines_in:
            recovered = 0
            while recovered < len(STUCK_IN_DEMO):  # the demo's three, logged
                line = lines_in.readline()
                assert line, "watch stopped writing"
                recovered += "recovered audit" in line
        collector.close()  # the collector restarts: its end of the stream is gone
        for _ in range(2):  # the first one's line fails to be written; the second shows watch went on
            audit = make_running(engine, 1, silent_for=900)[0]
            wait_for(lambda a=audit: status_of(engine, a) == "failed", timeout=30, interval=0.2,
                     message=f"audit {audit} to be recovered")
            assert process.poll() is None, "watch stopped when its log went away"
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read()
    assert code == 1, stderr
    assert "warning: cannot write the output" in stderr and "Traceback" not in stderr


def status_of(engine, audit_id: int) -> str:
    with read_connection(engine) as connection:
        return connection.execute(select(audits.c.status).where(audits.c.id == audit_id)).scalar_one()
