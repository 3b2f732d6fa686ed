"""A SQLite file moved away (or deleted) under a running ``watch``, then another file put at its path.

In WAL mode SQLite keeps the latest changes in ``PATH-wal`` and skips the checkpoint of the last close
when the database file has moved, so without care the recoveries watch made stay beside the old path,
missing from the moved file, and SQLite replays them into whatever file is put there next. Each test
runs a real ``auditctl watch`` on real files.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from auditctl.cli import cli

AUDITCTL = Path(sys.executable).parent / "auditctl"
STUCK_IN_DEMO = ("https://blog.example.net", "https://payments.example.com", "https://status.example.io")


def make_database(path: Path, command: str = "demo") -> None:
    result = CliRunner().invoke(cli, [command, "--database-url", f"sqlite:///{path}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not Path(f"{path}-wal").exists(), "closed cleanly: everything is in the file itself"


def dump(path: Path) -> list[str]:
    """Every row and schema object of a database file, as SQL, and what ``integrity_check`` says."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [*connection.execute("PRAGMA integrity_check").fetchone(), *connection.iterdump()]
    finally:
        connection.close()


def statuses(path: Path) -> dict[str, str]:
    """The status of each of the demo's three stuck audits (the newest audit of its target)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT target, status FROM audits WHERE target IN (?, ?, ?) ORDER BY id",
                                  STUCK_IN_DEMO).fetchall()
    finally:
        connection.close()
    return dict(rows)


def opened_by(pid: int, path: Path) -> bool:
    """Whether the process has the file now at ``path`` open (Linux's /proc)."""
    wanted = os.stat(path)
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found = os.stat(fd)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


class Watch:
    """``auditctl watch`` (a pass a second, reads every 0.2 s) in a real process, its output piped."""

    def __init__(self, path: Path, cwd: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
        env["XDG_CONFIG_HOME"] = str(cwd / "xdg")
        self.process = subprocess.Popen(
            [str(AUDITCTL), "watch", "--interval", "1s", "--refresh", "0.2s", "--no-live", "--database-url",
             f"sqlite:///{path}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s: {self.seen}") from None
            assert line is not None, f"watch ended early (exit {self.process.wait()}): {self.seen}"
            self.seen.append(line)
            if text in line:
                return line

    def recovered_the_demo(self) -> None:
        for target in STUCK_IN_DEMO:
            self.wait_line(f"({target})")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def rest(self) -> str:
        """What watch wrote after the lines waited for (once it has ended)."""
        self.process.wait(timeout=10)
        while (line := self.lines.get(timeout=5)) is not None:
            self.seen.append(line)
        return "\n".join(self.seen)


def test_recoveries_watch_made_before_the_file_was_moved_away_are_in_the_moved_file(tmp_path):
    path, moved = tmp_path / "wd.db", tmp_path / "moved.db"
    make_database(path)
    watch = Watch(path, tmp_path)
    try:
        watch.recovered_the_demo()
        path.rename(moved)
        watch.wait_line("database lost")
    finally:
        assert watch.stop() == 0, watch.rest()
    assert statuses(moved) == dict.fromkeys(STUCK_IN_DEMO, "failed"), "the recoveries went with the file"
    assert os.path.getsize(f"{path}-wal") == 0, "nothing of the moved file is left beside the old path"
    assert dump(moved)[0] == "ok"


def test_a_backup_copied_to_the_path_after_a_move_is_intact_and_holds_only_its_own_rows(tmp_path):
    path, moved = tmp_path / "wd.db", tmp_path / "moved.db"
    make_database(path)
    backup = tmp_path / "backup.db"
    make_database(backup, "init")  # another database: its own pages, no stuck audit for watch to recover
    before = dump(backup)
    assert before[0] == "ok"
    watch = Watch(path, tmp_path)
    try:
        watch.recovered_the_demo()
        path.rename(moved)
        watch.wait_line("database lost")
        path.write_bytes(backup.read_bytes())  # cp backup.db wd.db
        watch.wait_line("database back")
    finally:
        assert watch.stop() == 0, watch.rest()
    assert dump(path) == before, "the backup put at the path is exactly the backup: nothing of the moved file in it"
    assert statuses(moved) == dict.fromkeys(STUCK_IN_DEMO, "failed")


def test_a_file_that_is_not_a_database_put_at_the_path_after_a_move_makes_watch_say_so_and_exit_1(tmp_path):
    path = tmp_path / "wd.db"
    make_database(path)
    watch = Watch(path, tmp_path)
    try:
        watch.recovered_the_demo()
        path.rename(tmp_path / "moved.db")
        watch.wait_line("database lost")
        path.write_bytes(b"these are notes, not a database\n" * 200)
        line = watch.wait_line("cannot watch")
        code = watch.process.wait(timeout=10)
    finally:
        watch.stop()
    assert "is not a database" in line and code == 1, (code, watch.rest())
    assert path.read_bytes() == b"these are notes, not a database\n" * 200, "the file is left as it was"


def test_a_log_the_move_could_not_empty_is_never_replayed_into_a_file_put_at_the_path(tmp_path):
    """Another process reads the old file while it is moved: its log cannot be emptied then. No file
    put at the path is opened while that log is there (an outage, with why and what to do); moved
    out of the way, the file at the path is watched from then on, intact."""
    path, moved = tmp_path / "wd.db", tmp_path / "moved.db"
    make_database(path)
    backup = tmp_path / "backup.db"
    make_database(backup, "init")
    before = dump(backup)
    watch = Watch(path, tmp_path)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        watch.recovered_the_demo()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM audits").fetchall()  # a snapshot held open: no log reset meanwhile
        path.rename(moved)
        watch.wait_line("database lost")
        reader.execute("COMMIT")
        reader.close()
        assert os.path.getsize(f"{path}-wal") > 0, "the log could not be emptied: the case under test"
        path.write_bytes(backup.read_bytes())
        time.sleep(1.5)  # several reads of watch's, each refused
        assert not opened_by(watch.process.pid, path), "watch must not open the file while that log is there"
        assert path.read_bytes() == backup.read_bytes(), "nothing replayed into the file put at the path"
        for leftover in ("-wal", "-shm"):
            Path(f"{path}{leftover}").rename(tmp_path / f"stale{leftover}")
        watch.wait_line("database back")
    finally:
        reader.close()
        code = watch.stop()
    errors = watch.process.stderr.read()
    assert code == 0, (errors, watch.rest())
    assert "database back" not in "\n".join(watch.seen[:-1]), "not back before the stale log was moved away"
    assert f"not opening {path}: {path}-wal is the log of the database file that was at {path}" in errors, errors
    assert "move wd.db-wal and wd.db-shm out of the way" in errors
    assert dump(path) == before
    assert dump(moved)[0] == "ok"


def _followed_file(tmp_path):
    """``a.db`` (200 rows A...) followed by a FileWatch, with a connection left idle in its engine's
    pool, and ``backup.db`` (200 rows B...) to put at the path later."""
    from sqlalchemy import text

    from auditctl.db import create_engine, never_create
    from auditctl.sqlitefile import FileWatch

    path, backup = tmp_path / "a.db", tmp_path / "backup.db"
    _table_of(path, "A")
    _table_of(backup, "B")
    engine = create_engine(f"sqlite:///{path}")
    never_create(engine)
    watch = FileWatch(engine)
    with engine.connect() as connection:
        connection.execute(text("SELECT count(*) FROM t")).scalar()
    return path, backup, engine, watch


def _table_of(path: Path, tag: str) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x TEXT)")
    connection.executemany("INSERT INTO t VALUES (?)", [(f"{tag}{i:03d}",) for i in range(200)])
    connection.commit()
    connection.close()


@pytest.mark.parametrize("checked_before_the_move", [True, False], ids=["log-seen", "log-never-seen"])
@pytest.mark.parametrize("connect_while_gone", [True, False], ids=["failed-connect-meanwhile", "no-connect"])
def test_another_programs_late_writes_to_the_moved_file_are_never_replayed_into_a_backup(tmp_path, connect_while_gone,
                                                                                        checked_before_the_move):
    """Another program keeps the moved file open and writes to it, into the log left at the path;
    a failed connection while nothing was at the path must not make that log look like nobody's."""
    from sqlalchemy import text

    path, backup, engine, watch = _followed_file(tmp_path)
    if checked_before_the_move:
        watch.check()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("SELECT 1 FROM t").fetchall()
    os.rename(path, tmp_path / "moved.db")
    assert watch.check() == "gone"
    if connect_while_gone:
        with contextlib.suppress(Exception):
            engine.connect()  # a worker's write while nothing is at the path: it fails
    other.execute("DELETE FROM t WHERE x < 'A050'")
    other.execute("INSERT INTO t VALUES ('from-the-moved-file')")
    other.close()
    shutil.copy(backup, path)
    assert watch.check() == "back"
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT x FROM t ORDER BY x")).scalars().all()
    except Exception as refused:  # noqa: BLE001 - the log is refused: the backup is left as it was
        assert "may hold changes missing from that file" in str(refused)
        rows = None
    engine.dispose()
    assert dump(path)[0] == "ok"
    if rows is not None:
        assert rows == [f"B{i:03d}" for i in range(200)], "the moved file's pages were replayed into the backup"


def test_the_log_beside_a_file_put_at_the_path_becomes_its_own_once_a_connection_opened_it(tmp_path):
    """The old file's log was emptied: the file put at the path writes into it, and every later
    connection (a second one while the first is still open) opens the file, not a refusal."""
    from sqlalchemy import text

    path, backup, engine, watch = _followed_file(tmp_path)
    watch.check()
    os.rename(path, tmp_path / "moved.db")
    assert watch.check() == "gone"
    shutil.copy(backup, path)
    assert watch.check() == "back"
    with engine.connect() as first:
        first.execute(text("INSERT INTO t VALUES ('written-after')"))
        first.commit()
        assert os.path.getsize(f"{path}-wal") > 0
        with engine.connect() as second:  # a new connection while the first keeps the log open
            assert second.execute(text("SELECT count(*) FROM t")).scalar() == 201
    engine.dispose()
