"""Helpers for the dashboard tests: a real uvicorn server on a free loopback port, and plain HTTP.

``running_dashboard`` serves ``auditctl.web.create_app`` from a thread of the test process
(the same app ``auditctl serve`` runs, started in milliseconds); ``serve_process`` runs the
real ``auditctl serve`` command. ``http`` is urllib without redirects and without raising on
4xx/5xx, so a test sees exactly what the server answered.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from dbtools import python_env

AUDITCTL = Path(sys.executable).parent / "auditctl"
TOKEN = "correct-horse-battery-staple"


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)

    def cookies(self) -> list[str]:
        return [v for k, v in self.headers.items() if k.lower() == "set-cookie"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http(method: str, url: str, *, headers: dict | None = None, form: dict | list | None = None, body=None,
         json_body=None, timeout: float = 30.0) -> Answer:
    headers = dict(headers or {})
    data = None
    if form is not None:
        data = urlencode(form, doseq=True).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif json_body is not None:
        data = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif body is not None:
        data = body if isinstance(body, bytes) else str(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, _headers(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, _headers(error.headers), error.read())


def _headers(message) -> dict:
    # Keep repeated headers (set-cookie) apart by suffixing the repeats.
    found: dict = {}
    for key, value in message.items():
        name = key.lower()
        while name in found:
            name += "_"
        found[name] = value
    return found


@dataclass
class Dashboard:
    url: str
    app: object

    @property
    def origin(self) -> str:
        return self.url.rstrip("/")

    def get(self, path: str, **kwargs) -> Answer:
        return http("GET", self.origin + path, **kwargs)

    def post(self, path: str, **kwargs) -> Answer:
        return http("POST", self.origin + path, **kwargs)

    def sign_in(self, token: str = TOKEN, name: str = "") -> tuple[str, str]:
        """Sign in through the form; returns (the Cookie header value, the session's CSRF token)."""
        answer = self.post("/login", form={"token": token, "name": name}, headers={"Origin": self.origin})
        assert answer.status == 303, answer.text
        cookie = answer.cookies()[0].split(";", 1)[0]
        page = self.get("/", headers={"Cookie": cookie}).text
        marker = 'name="csrf_token" value="'
        csrf = page[page.index(marker) + len(marker):].split('"', 1)[0]
        return cookie, csrf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_dashboard(database_url: str, *, token: str | None = TOKEN, policy=None, allow_unsafe: bool = False,
                      host: str = "127.0.0.1"):
    """``create_app`` served by uvicorn in a thread on a free loopback port, stopped on exit
    (``host``: the ``--host`` the app believes it was given)."""
    import uvicorn

    from auditctl.web import create_app

    app = create_app(database_url, policy=policy, token=token, allow_unsafe=allow_unsafe, host=host)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.01)
    try:
        yield Dashboard(url=f"http://127.0.0.1:{sock.getsockname()[1]}/", app=app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        app.state.dashboard.close()


def serve_process(*args, env: dict | None = None, cwd=None) -> subprocess.Popen:
    """``auditctl serve ARGS`` as a real process (stdout and stderr are text pipes)."""
    environment = {k: v for k, v in python_env().items() if not k.startswith("AUDITCTL_")}
    environment.update(env or {})
    return subprocess.Popen([str(AUDITCTL), "serve", *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment, cwd=cwd)


class Output:
    """Drains a process's stdout and stderr in threads, so a test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._pump, args=(stream,), daemon=True) for stream in (proc.stdout, proc.stderr)]
        for thread in self.threads:
            thread.start()

    def _pump(self, stream):
        for line in stream:
            with self._lock:
                self.lines.append(line)

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line.strip()
            if self.proc.poll() is not None:
                time.sleep(0.1)
                break
            time.sleep(0.02)
        raise AssertionError(f"no line starting {prefix!r} (exit {self.proc.poll()}); output:\n{self.text}")

    def finish(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for thread in self.threads:
            thread.join(5)
        return code


# --- fixtures (imported by the dashboard's test modules under other names, so that a test's
# --- argument does not shadow an import) ----------------------------------------------------


@pytest.fixture(scope="module", name="sqlite_demo_template")
def sqlite_demo_template_fixture(tmp_path_factory):
    """A migrated SQLite file holding the demo fleet, made once per module and copied for each test
    (migrating and seeding costs far more than copying). The demo's times are relative to when it
    was written; a module runs for well under a minute, far inside every threshold."""
    from auditctl.db import create_engine
    from auditctl.demo import seed_demo
    from auditctl.migrate import upgrade

    path = tmp_path_factory.mktemp("demo") / "template.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine)
    seed_demo(engine)
    engine.dispose()  # the last connection checkpoints the WAL into the file
    return path


@pytest.fixture(name="demo_url")
def demo_url_fixture(request, engine_name, tmp_path):
    """A database of the parametrised engine holding the demo fleet (3 stuck, 2 failed, ...)."""
    if engine_name == "sqlite":
        target = tmp_path / "auditctl.db"
        shutil.copyfile(request.getfixturevalue("sqlite_demo_template"), target)
        return f"sqlite:///{target}"
    from auditctl.db import create_engine
    from auditctl.demo import seed_demo

    url = request.getfixturevalue("database_url")
    engine = create_engine(url)
    seed_demo(engine)
    engine.dispose()
    return url


@pytest.fixture(name="demo")
def demo_fixture(demo_url):
    """An engine on ``demo_url``."""
    from auditctl.db import create_engine

    engine = create_engine(demo_url)
    yield engine
    engine.dispose()
