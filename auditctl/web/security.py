"""Who may act, and the checks every request passes: sessions, CSRF tokens, Origin, Host, headers.

Reading needs no credential (the pages and ``GET /api/*`` show what ``auditctl scan`` shows
to anyone who can reach the port, which is loopback by default). Acting needs the token:

* a person signs in at ``/login`` with it and gets a random session id in an HttpOnly,
  SameSite=Strict cookie. Each session has its own CSRF token, which every form and every
  htmx request carries; a POST whose token is missing or wrong is refused.
* a script sends ``Authorization: Bearer TOKEN`` (no cookie, so nothing for CSRF to abuse).

Every state-changing request (any method but GET, HEAD, OPTIONS) with a foreign ``Origin``
(or, without one, a foreign ``Referer``) is refused before any route runs, even with a valid
cookie. When the server listens on loopback, a ``Host`` other than a loopback name is
refused too: a DNS-rebinding page would otherwise be same-origin with the dashboard.

Sessions live in the server's memory: a restart signs everybody out, which is the safe failure.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..textsafe import printable

_log = logging.getLogger("auditctl.web")

SESSION_COOKIE = "auditctl_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
#: A session ends this long after sign-in.
SESSION_SECONDS = 12 * 3600
#: A reset shown for confirmation must be confirmed within this long, or shown again.
PLAN_SECONDS = 600
#: Sessions kept at most (the oldest are dropped first): sign-ins cannot grow memory without bound.
MAX_SESSIONS = 1000
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: A wrong token is answered after this long, and one at a time for the whole server.
WRONG_TOKEN_DELAY = 0.5
#: Wrong tokens waiting for their answer at most (ten seconds' worth). Past that, a token is refused
#: (429) without being compared: a flood of guesses cannot hold an unbounded number of connections.
MAX_WAITING_WRONG_TOKENS = 20
#: What a refusal while flooded asks the client to wait (its ``Retry-After`` header): the queue's length in seconds.
FLOODED_RETRY_AFTER = {"Retry-After": str(int(MAX_WAITING_WRONG_TOKENS * WRONG_TOKEN_DELAY))}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

#: No inline script or style, nothing from elsewhere, never framed (clickjacking).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    # Reads need no credential: no other site may load an answer as an image or a script (its
    # bytes would sit in that site's process), nor keep a handle on a dashboard window it opened.
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class WrongTokens:
    """Answers every wrong token (at sign-in, or in an ``Authorization`` header) after
    ``WRONG_TOKEN_DELAY``, one at a time for the whole server: guessing runs at two tries a second
    however many clients try at once. A right token is never slowed; the event loop serves
    everybody else meanwhile. While ``MAX_WAITING_WRONG_TOKENS`` wait, the server is ``flooded``:
    every token, right or wrong, is then refused at once (comparing it would tell a guess apart)."""

    def __init__(self):
        self._turn = asyncio.Lock()
        self.waiting = 0

    def flooded(self) -> bool:
        return self.waiting >= MAX_WAITING_WRONG_TOKENS

    async def judge(self, given: str, token: str, *, what: str, request) -> bool | None:
        """True for the token; False for a wrong one, answered late and logged (``what`` was refused);
        None while flooded, without comparing."""
        if self.flooded():
            return None
        if same(given, token):
            return True
        self.waiting += 1
        try:
            async with self._turn:
                await asyncio.sleep(WRONG_TOKEN_DELAY)
        finally:
            self.waiting -= 1
        # The client's address may come from a forwarded header (uvicorn trusts one from loopback): text.
        _log.warning("%s refused: wrong token (from %s)", what, printable(request.client.host) if request.client else "?")
        return False


def same(given: str | None, expected: str | None) -> bool:
    """Compare secrets in constant time; an absent value never matches."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


#: Confirmations one session keeps at once; an older one is dropped (press the button again).
MAX_PLANS = 20


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    created: float = field(default_factory=time.monotonic)
    #: Reset and recover plans shown for confirmation: plan id -> (the plan, when it was made).
    plans: dict = field(default_factory=dict)

    def keep_plan(self, plan) -> str:
        now = time.monotonic()
        for key in [k for k, (_, made) in self.plans.items() if now - made > PLAN_SECONDS]:
            del self.plans[key]
        while len(self.plans) >= MAX_PLANS:  # the oldest first: a recover plan may hold thousands of ids
            del self.plans[next(iter(self.plans))]
        plan_id = secrets.token_urlsafe(16)
        self.plans[plan_id] = (plan, now)
        return plan_id

    def take_entry(self, plan_id: str, kind: type):
        """The plan of ``kind`` shown under this id (once), as (the plan, when it was made) for
        ``give_back``; None when unknown, expired or of another kind (which stays, for the
        confirmation it belongs to)."""
        entry = self.plans.get(plan_id or "")
        if entry is None or not isinstance(entry[0], kind):
            return None
        del self.plans[plan_id]
        return entry if time.monotonic() - entry[1] <= PLAN_SECONDS else None

    def give_back(self, plan_id: str, entry) -> None:
        """A confirmation taken by ``take_entry`` whose action changed nothing (the database failed
        before any batch committed): usable again under the same id until it would have expired."""
        if plan_id in self.plans:
            return
        while len(self.plans) >= MAX_PLANS:
            del self.plans[next(iter(self.plans))]
        self.plans[plan_id] = entry


class Sessions:
    def __init__(self):
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> Session:
        session = Session(id=secrets.token_urlsafe(32), user=user, csrf=secrets.token_urlsafe(32))
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and time.monotonic() - session.created > SESSION_SECONDS:
                del self._sessions[session_id]
                return None
        return session

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


#: The longest page address sign-in returns to (a filtered listing's is a few hundred characters).
MAX_RETURN_PATH = 2000


def return_path(value) -> str:
    r"""Where sign-in sends the browser back to: ``value`` when it is a path on this dashboard
    (``/audits?status=failed``), else ``/``. Never another site: not ``//host`` or ``/\\host`` (which
    browsers read as ``//host``), not ``https://host``, nor anything but printable ASCII (browsers
    drop a tab or a newline from an address, so ``/\t/host`` would become ``//host``; a page's own
    address arrives percent-encoded)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_RETURN_PATH:
        return "/"
    if value.startswith("//") or "\\" in value or any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return "/"
    try:
        parts = urlsplit(value)
    except ValueError:
        return "/"
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or parts.path.startswith("/login"):
        return "/"
    return value


def request_origin(headers) -> str | None:
    """Where a request comes from: ``Origin``, else the origin of ``Referer``, else None (not a browser)."""
    origin = headers.get("origin")
    if origin:
        return origin.strip().lower()
    referer = headers.get("referer")
    if referer:
        try:
            parts = urlsplit(referer)
        except ValueError:  # http://[::1 : no origin can be read from it, so it is nobody's
            return "null"
        return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme else "null"
    return None


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port: ``[::1]:8080`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_literal(host: str) -> bool:
    """``host`` is a loopback address written as one, in any spelling (``127.0.1.1``, ``[::1]``,
    ``0:0:0:0:0:0:0:1``)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """``--host`` listens on loopback only: judged by address, not by spelling; a name counts when
    every address it resolves to is loopback (``localhost``, a machine's name in /etc/hosts)."""
    import socket

    if loopback_literal(host) or host.strip().lower() == "localhost":  # by name too: a resolver may not know it
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host.strip(), None)}
    except (OSError, UnicodeError, ValueError):
        return False
    return bool(addresses) and all(loopback_literal(address.split("%", 1)[0]) for address in addresses)


class GuardMiddleware:
    """Pure ASGI middleware: Host check (on loopback), foreign-Origin refusal for unsafe methods,
    security headers on every response, and no caching of anything but static files."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers, URL

        static = scope["path"].startswith("/static/")
        started = False

        async def send_with_headers(message):
            # Every response goes out through here, refusals and errors included: one list of headers.
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = list(SECURITY_HEADERS)
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        headers = Headers(scope=scope)
        if self.allowed_hosts is not None:
            name = host_name(headers.get("host", ""))
            if name not in self.allowed_hosts and not loopback_literal(name):
                await _refuse(scope, receive, send_with_headers, 400, "Refused: this dashboard answers only to its "
                              "loopback address (a Host header of another name may be a DNS-rebinding attack).")
                return
        if scope["method"] not in SAFE_METHODS:
            origin = request_origin(headers)
            url = URL(scope=scope)
            if origin is not None and origin != f"{url.scheme}://{url.netloc}".lower():
                await _refuse(scope, receive, send_with_headers, 403, "Refused: a cross-site request (its Origin is not "
                                                                      "this dashboard). Nothing was changed.")
                return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # noqa: BLE001 - a bug answers 500 in the API's shape, with every header
            if started:
                raise
            _log.exception("internal error answering %s %s", scope["method"], scope["path"])
            await _refuse(scope, receive, send_with_headers, 500, "Internal error: the dashboard's log has the details.")


async def _refuse(scope, receive, send, status: int, text: str) -> None:
    from starlette.responses import JSONResponse, PlainTextResponse

    if scope["path"].startswith("/api/"):
        response = JSONResponse({"error": text}, status_code=status)
    else:
        response = PlainTextResponse(text, status_code=status)
    await response(scope, receive, send)
