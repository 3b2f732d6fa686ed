"""Real HTTP servers on loopback that stand in for Slack, Discord and webhook receivers.

Each records every request it gets (arrival time, path, headers, decoded JSON body) and
answers as scripted: 200 by default, or a queue of answers (500, 429 with Retry-After, a
hang until released or for so many seconds), and 413 to a body over ``max_body`` bytes, as nginx
does past its ``client_max_body_size``. Threaded, so a hanging request does not
hold the next one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The secret part of every test webhook URL: it must never appear in any output or log.
SECRET = "T0SECRET/B0SECRET/xoxb-s3cr3t-token"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict = field(default_factory=dict)
    hang: float = 0.0  # seconds to wait before answering (cut short by Webhook.release())


@dataclass
class Request:
    at: float  # time.monotonic() on arrival
    path: str
    headers: dict
    body: dict | None
    answered: int | None = None
    size: int = 0  # bytes of the body


class Webhook:
    def __init__(self):
        self.requests: list[Request] = []
        self._answers: list[Answer] = []
        self.default = Answer()
        #: A body over this many bytes is answered 413 (None: any size is taken).
        self.max_body: int | None = None
        self._released = threading.Event()
        self._changed = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                request = Request(time.monotonic(), self.path, dict(self.headers), body, size=length)
                with hook._changed:
                    hook.requests.append(request)
                    if hook.max_body is not None and length > hook.max_body:
                        answer = Answer(status=413, body=b"<html><head><title>413 Request Entity Too Large</title>")
                    else:
                        answer = hook._answers.pop(0) if hook._answers else hook.default
                    hook._changed.notify_all()
                if answer.hang:
                    hook._released.wait(answer.hang)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                    request.answered = answer.status
                except OSError:
                    pass  # the client gave up (its timeout): that is the point of a hang

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, name: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/services/{name}/{SECRET}"

    def answer(self, *answers: Answer) -> None:
        """Answer the next requests so, in order; then the default."""
        with self._changed:
            self._answers.extend(answers)

    def always(self, answer: Answer) -> None:
        self.default = answer

    def release(self) -> None:
        """End every hang now, and answer later requests at once."""
        self._released.set()

    def bodies(self) -> list[dict]:
        return [r.body for r in self.requests]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {count} requests, got {len(self.requests)}")
                self._changed.wait(left)
            return list(self.requests)

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
