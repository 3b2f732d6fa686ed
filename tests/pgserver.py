"""Throwaway PostgreSQL server for the auditctl test suite.

Owns the whole lifecycle of a private, disposable cluster: ``initdb`` into a
fresh temp dir, ``postgres`` on a free 127.0.0.1 port plus a private unix
socket, the ``auditctl`` role (scram password over TCP) and database, simulated
outages (``stop``/``kill`` then ``restart`` on the same port and data dir), and
removal (``cleanup``, with an ``atexit`` safety net).  Durability is off (fsync,
synchronous_commit, full_page_writes) for speed.  As root, the server binaries
run as the ``postgres`` system user (they refuse root) and the temp dir is
chowned to it; otherwise they run as the current user.  Admin SQL uses psycopg
3 over the unix socket as superuser ``postgres`` (trust on local only).
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_HBA = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300"}


def _has_server(d: str) -> bool:
    return all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "postgres"))


def find_bindir() -> str | None:
    """Directory holding initdb+postgres: ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/*/bin; None when no server binaries are installed."""
    if shutil.which("pg_config"):
        try:
            d = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
            if d and _has_server(d):
                return d
        except (OSError, subprocess.SubprocessError):
            pass
    found = sorted((d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server(d)),
                   key=lambda d: [int(x) for x in d.split("/")[-2].split(".") if x.isdigit()])
    return found[-1] if found else None


def _run_as() -> dict:
    """Popen kwargs to drop to the postgres user when root (empty otherwise)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def not_here(reason: str) -> None:
    """PostgreSQL cannot run here: a failure under CI (where it must), a skip elsewhere."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


def require_postgres() -> None:
    """Go on only where a throwaway server can be started (see ``not_here``)."""
    reason = unavailable_reason()
    if reason is not None:
        not_here(reason)


def unavailable_reason() -> str | None:
    """None when a throwaway server can be started here, else a one-line reason."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (v3) is not installed"
    bindir = find_bindir()
    if bindir is None:
        return "no PostgreSQL server binaries (initdb, postgres) found"
    try:
        kw = _run_as()
    except KeyError:
        return "running as root but there is no 'postgres' system user to run initdb/postgres as"
    try:
        subprocess.run([os.path.join(bindir, "initdb"), "--version"], capture_output=True,
                       check=True, timeout=10, cwd="/", **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run {bindir}/initdb{' as postgres' if kw else ''}: {e}"
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback for the test suite."""

    def __init__(self, base_dir: str | None = None, settings: dict | None = None):
        self.base_dir = base_dir                 # parent for the temp dir (default: system tmp)
        self.settings = {**_SETTINGS, **(settings or {})}  # postgres -c options
        self.bindir: str = find_bindir() or ""
        self.password: str = secrets.token_hex(16)
        self.port: int = 0
        self.tmp_dir = self.data_dir = self.socket_dir = self.log_path = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        """First call: initdb into a fresh temp dir, start, create role+db.
        Later calls (after stop/kill): start again on the same port/data dir."""
        if self._proc is not None:
            return
        if self.data_dir:
            self._launch()
            return
        if not self.bindir:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL binaries found")
        try:
            self._init_cluster()
        except BaseException:
            self.cleanup()  # never leave a half-built cluster behind; the error carries the log
            raise

    def _init_cluster(self) -> None:
        kw = _run_as()
        self.tmp_dir = tempfile.mkdtemp(prefix="auditctl-pg-", dir=self.base_dir)
        atexit.register(self.cleanup)
        self.data_dir = os.path.join(self.tmp_dir, "data")
        self.socket_dir = os.path.join(self.tmp_dir, "sock")
        self.log_path = os.path.join(self.tmp_dir, "postgres.log")
        if len(self.socket_dir) > 90:  # unix socket paths are limited to ~107 bytes
            raise RuntimeError(f"socket dir path too long for a unix socket: {self.socket_dir}")
        os.mkdir(self.socket_dir, 0o700)
        open(self.log_path, "w").close()
        if kw:
            for p in (self.tmp_dir, self.socket_dir, self.log_path):
                os.chown(p, kw["user"], kw["group"])
        r = subprocess.run([os.path.join(self.bindir, "initdb"), "-D", self.data_dir, "-U", "postgres",
                            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                           capture_output=True, text=True, env=self._env(), cwd=self.tmp_dir, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as f:
            f.write(_HBA)
        for attempt in range(3):  # the free port may be grabbed by someone else in between
            self.port = _free_port()
            try:
                self._launch()
                break
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise
        from psycopg import sql
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE auditctl LOGIN PASSWORD {}").format(sql.Literal(self.password)))
            conn.execute("CREATE DATABASE auditctl OWNER auditctl")

    def stop(self, mode: str = "fast") -> None:
        """Shut the postmaster down (smart=SIGTERM, fast=SIGINT, immediate=SIGQUIT) and
        wait; idempotent.  Only a postmaster still hung after 60 s gets SIGKILL."""
        sig0 = _SIGNALS[mode]  # KeyError on an unknown mode, before touching state
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig0)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # hung postmaster: last resort only
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop, then start again on the same port and data directory."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Simulated outage: immediate shutdown (no SIGKILL); data kept for restart()."""
        self.stop("immediate")

    def cleanup(self) -> None:
        """Stop the server and delete the temp dir; safe to call repeatedly."""
        self.stop("immediate")
        atexit.unregister(self.cleanup)
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir = self.data_dir = self.socket_dir = self.log_path = ""

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``auditctl`` database as the ``auditctl`` role."""
        return self._url("auditctl")

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE name OWNER auditctl [TEMPLATE template]; returns its SQLAlchemy URL."""
        from psycopg import sql
        statement = sql.SQL("CREATE DATABASE {} OWNER auditctl").format(sql.Identifier(name))
        if template:
            statement = statement + sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(statement)
        return self._url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS name WITH (FORCE) (kicks out open sessions)."""
        from psycopg import sql
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _url(self, db: str) -> str:
        if not self.port:
            raise RuntimeError("PostgresServer.start() has not been called")
        return f"postgresql+psycopg://auditctl:{self.password}@127.0.0.1:{self.port}/{quote(db, safe='')}"

    def _env(self) -> dict:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}

    def _admin(self, timeout: float = 30):
        # Generous: with every core busy (the suite on two workers beside other work) a new backend
        # has taken over 5 s to start, and a test failed in its setup for it.
        import psycopg
        return psycopg.connect(host=self.socket_dir, port=self.port, user="postgres", dbname="postgres",
                               autocommit=True, connect_timeout=max(1, int(timeout)))

    def _log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def _launch(self, timeout: float = 30) -> None:
        cmd = [os.path.join(self.bindir, "postgres"), "-D", self.data_dir, "-k", self.socket_dir,
               "-h", "127.0.0.1", "-p", str(self.port)] + [f"-c{k}={v}" for k, v in self.settings.items()]
        with open(self.log_path, "a") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                          cwd=self.tmp_dir, start_new_session=True, **_run_as())
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                rc, self._proc = self._proc.returncode, None
                raise RuntimeError(f"postgres exited with {rc} during startup; log tail:\n{self._log_tail()}")
            try:
                self._admin(1).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop("immediate")
                    raise RuntimeError(f"postgres not ready after {timeout}s on port {self.port}; "
                                       f"log tail:\n{self._log_tail()}")
                time.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
