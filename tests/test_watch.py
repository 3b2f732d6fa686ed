"""``auditctl watch``: one pass through CliRunner, the loop in a real process, the live view in a real terminal."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import make_url

from auditctl.cli import cli
from auditctl.db import read_connection
from auditctl.schema import audit_events, audits

AUDITCTL = Path(sys.executable).parent / "auditctl"
STUCK_IN_DEMO = {
    "https://blog.example.net": "stale_heartbeat",
    "https://payments.example.com": "max_age_exceeded",
    "https://status.example.io": "progress_stalled",
}
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False, prog_name="auditctl")
    return result


@pytest.fixture
def demo(database_url):
    result = invoke("demo", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    return database_url


def stuck_statuses(engine) -> dict[str, str]:
    with read_connection(engine) as connection:
        rows = connection.execute(select(audits.c.target, audits.c.status).where(audits.c.target.in_(STUCK_IN_DEMO)))
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


# --- one pass (CliRunner: not a terminal, so log lines) ---------------------------------


def test_watch_once_recovers_stuck_audits_and_prints_log_lines_when_not_a_terminal(demo, engine):
    result = invoke("watch", "--once", "--database-url", demo)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(re.match(STAMP + " ", line) for line in lines), lines
    assert lines[0].endswith(f"watching {make_url(demo).render_as_string(hide_password=True)}")
    for target, reason in STUCK_IN_DEMO.items():
        assert any(f"({target}): {reason} -> failed; " in line and "recovered audit" in line for line in lines), target
    assert lines[-1].endswith("pass done: 3 recovered, 0 stuck left alone")
    assert "┃" not in result.stdout and "\x1b[" not in result.stdout
    assert result.stderr == "watch stopped.\n"
    assert stuck_statuses(engine) == {target: "failed" for target in STUCK_IN_DEMO}
    with read_connection(engine) as connection:
        actors = connection.execute(select(audit_events.c.actor).where(audit_events.c.event == "recovered")).scalars().all()
    assert actors.count("auditctl watch") == 3


def test_watch_no_recover_once_reports_stuck_audits_and_recovers_nothing(demo, engine):
    before = everything(engine)
    result = invoke("watch", "--no-recover", "--once", "--database-url", demo)
    assert result.exit_code == 0, result.output
    for target, reason in STUCK_IN_DEMO.items():
        assert f"({target}): {reason} (not recovering: --no-recover)" in result.stdout
    assert "recovered audit" not in result.stdout
    assert result.stdout.splitlines()[-1].endswith("pass done: 0 recovered, 3 stuck left alone")
    assert everything(engine) == before


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


def test_watch_once_with_nothing_stuck_says_the_pass_was_clean(database_url):
    result = invoke("watch", "--once", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].endswith("pass done: 0 recovered, 0 stuck left alone")


def test_watch_once_with_the_live_view_forced_draws_running_audits_and_recoveries(demo):
    result = invoke("watch", "--once", "--live", "--database-url", demo, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "auditctl watch" in result.stdout and "status: ok" in result.stdout and "recovered: 3" in result.stdout
    assert "Running audits (4)" in result.stdout and "https://shop.example.com/checkout" in result.stdout
    assert "Recent recoveries" in result.stdout and "auditctl watch" in result.stdout


def test_watch_once_on_a_missing_schema_exits_1_telling_to_run_init(blank_database_url):
    result = invoke("watch", "--once", "--database-url", blank_database_url)
    assert result.exit_code == 1
    assert "run `auditctl init`" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.output


# --- the loop in a real process: SIGTERM ---------------------------------------------------


def lines_of(stream) -> queue.Queue[str | None]:
    """Lines of a pipe as they arrive, read on a thread (None at end of stream)."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_watch_in_a_pipe_stops_cleanly_on_sigterm_within_two_seconds(demo, tmp_path):
    process = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "1s", "--database-url", demo], cwd=tmp_path,
                               env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines, seen, passes = lines_of(process.stdout), [], 0
        deadline = time.monotonic() + 30
        while passes < 2:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"watch ended early: {seen} {process.stderr.read()}"
            seen.append(line)
            passes += "pass done:" in line
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
    done = [line.split(" ", 1)[1] for line in seen if "pass done:" in line]
    assert done == ["pass done: 3 recovered, 0 stuck left alone", "pass done: 0 recovered, 0 stuck left alone"], seen
    assert all(re.match(STAMP + " ", line) for line in seen + rest)
    assert process.stderr.read() == "watch stopped.\n"


# --- the live view in a real terminal (tmux) ------------------------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_watch_in_a_terminal_draws_refreshes_and_exits_on_ctrl_c_within_a_second(request, tmp_path):
    assert invoke("demo", "--database-url", f"sqlite:///{tmp_path / 'demo.db'}").exit_code == 0
    config = tmp_path / "tmux.conf"
    config.write_text("set -g remain-on-exit on\nset -g status off\n")
    socket = f"auditctl-watch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    env = clean_env(tmp_path, LANG="C.UTF-8")

    def tmux(*args) -> str:
        done = subprocess.run(["tmux", "-u", "-L", socket, "-f", str(config), *args], env=env, check=False, capture_output=True,
                              text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop_server():
        subprocess.run(["tmux", "-L", socket, "kill-server"], env=env, check=False, capture_output=True, timeout=10)
        Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", socket).unlink(missing_ok=True)

    request.addfinalizer(stop_server)
    # bash waits for a child that handles Ctrl-C itself, then records how it ended (tmux may not get to know).
    exit_file = tmp_path / "exit-status"
    tmux("new-session", "-d", "-s", "watch", "-x", "200", "-y", "50", "-c", str(tmp_path),
         "bash", "-c", 'out="$1"; shift; "$@"; echo $? > "$out"', "wrapper", str(exit_file),
         "env", "TERM=xterm-256color", str(AUDITCTL), "watch", "--interval", "2s", "--database-url", "sqlite:///demo.db")

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "watch")

    def pane_dead() -> bool:
        return tmux("display-message", "-p", "-t", "watch", "#{pane_dead}").strip() == "1"

    deadline = time.monotonic() + 20
    while "Running audits" not in (shown := screen()):
        assert not pane_dead(), f"watch died before drawing:\n{shown}"
        assert time.monotonic() < deadline, f"watch never drew its view:\n{shown}"
        time.sleep(0.1)
    assert "auditctl watch sqlite:///demo.db" in shown and "(Ctrl-C to stop)" in shown
    assert "Running audits (4)" in shown and "ID" in shown and "LAST HEARTBEAT" in shown

    # The header counts down to the next pass ("next in 1.0s" ...) and names the last pass; both change in place.
    countdowns: set[str | None] = set()
    passes: set[str] = set()
    deadline = time.monotonic() + 15
    while len(countdowns) < 2 or len(passes) < 2:
        header = screen().splitlines()[0]
        countdowns.add(next(iter(re.findall(r"next in (\S+)", header)), None))
        passes.update(re.findall(r"last pass: (\S+)", header))
        assert time.monotonic() < deadline, f"the view never refreshed: {countdowns} {passes}\n{screen()}"
        time.sleep(0.1)
    assert countdowns - {None}, "the countdown to the next pass is shown"
    shown = screen()
    assert "recovered: 3" in shown and "Recent recoveries" in shown
    assert shown.count("auditctl watch sqlite") == 1, "refreshed in place, not printed again below"

    tmux("send-keys", "-t", "watch", "C-c")
    pressed = time.monotonic()
    while not exit_file.exists() or not exit_file.read_text().strip():
        assert time.monotonic() - pressed < 1.0, f"watch still running 1s after Ctrl-C:\n{screen()}"
        time.sleep(0.02)
    assert exit_file.read_text().strip() == "0", f"watch exited {exit_file.read_text().strip()} after Ctrl-C:\n{screen()}"
    assert "watch stopped." in screen() and "Traceback" not in screen()
