"""One HTTP POST of a JSON body, with a hard timeout, through the standard library (urllib).

No third-party HTTP client: a POST is all alerts need. The timeout bounds the whole call,
not only each socket operation: the request runs in a daemon thread that is abandoned
when the time is up (its connection shut down, so the thread ends too), so a webhook that
trickles its answer byte by byte cannot hold a sender longer either. Redirects are not
followed (a webhook that redirects is misconfigured, and following one would turn the POST
into a GET, or post the alert to another host): the error says where it points, scheme and
host only. Error texts never hold the URL.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from urllib.parse import unquote, urljoin, urlsplit

from .. import __version__
from ..textsafe import printable
from ..urls import MASK, mask_webhook, secrets_of

#: The longest Retry-After honoured (seconds): a longer one is most likely a mistake.
MAX_RETRY_AFTER = 3600.0


@dataclass
class Response:
    status: int | None  # None: no answer at all (refused, timed out, DNS)
    error: str | None = None  # None when the destination took it (2xx)
    retry_after: float | None = None  # seconds, from a 429's Retry-After

    @property
    def ok(self) -> bool:
        return self.error is None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _opener(sockets: list) -> urllib.request.OpenerDirector:
    """An opener that follows no redirect and adds every socket it opens to ``sockets``, so the
    caller can hang up when its time is up (a thread blocked reading the answer wakes, and ends)."""

    def create_connection(*args, **kwargs):
        sock = socket.create_connection(*args, **kwargs)
        sockets.append(sock)
        return sock

    def tracked(base):
        class Connection(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._create_connection = create_connection  # what connect() opens the socket with

        return Connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, request):
            return self.do_open(tracked(http.client.HTTPConnection), request)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, request):
            options = {"context": self._context}
            if hasattr(self, "_check_hostname"):  # Python before 3.12
                options["check_hostname"] = self._check_hostname
            return self.do_open(tracked(http.client.HTTPSConnection), request, **options)

    return urllib.request.build_opener(_NoRedirect, HTTP, HTTPS)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now, at most ``MAX_RETRY_AFTER``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = moment.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


#: The shortest part of a webhook's path or query masked on its own in an error: long enough to
#: leave a word like "hooks" or "api" alone, short enough for any token.
MIN_SECRET_PART = 6


def hide_url(text: str, url: str) -> str:
    """``text`` with the URL's secrets masked: the URL, its path and query (where a webhook's secret
    is), its user information and password (as ``urls.secrets_of`` finds it, decoded too); each as
    typed and as a repr shows it (http.client's InvalidURL quotes the URL with ``\\n`` for a line
    break). ``destinations.check_url`` refuses URLs with user information or control characters;
    this is the second line, for one that reached a sender another way."""
    secrets = set(secrets_of(url))
    # urlsplit drops tabs and line breaks, which http.client quotes: each blank-separated piece on its own.
    for piece in {url, *re.split(r"[\s\x00-\x1f\x7f]+", url)}:
        parts = urlsplit(piece)
        userinfo, _, _ = parts.netloc.rpartition("@")
        secrets.update({piece, piece.strip(), parts.path + ("?" + parts.query if parts.query else ""), parts.path,
                        parts.query, userinfo, parts.password or ""})
        # A receiver's error may quote one part of the path or query ("invalid token: xoxb...").
        for part in re.split(r"[/?&=;]+", parts.path + "?" + parts.query):
            if len(part) >= MIN_SECRET_PART:
                secrets.update({part, unquote(part)})
    secrets |= {repr(secret)[1:-1] for secret in secrets}
    for secret in sorted({s for s in secrets if len(s) > 1}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _post(url: str, data: bytes, headers: dict, timeout: float, sockets: list) -> Response:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _opener(sockets).open(request, timeout=timeout) as answer:
            answer.read(4096)
            return Response(status=answer.status)
    except urllib.error.HTTPError as error:
        try:
            body = error.read(300).decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - the status says enough
            body = ""
        retry = retry_after_seconds(error.headers.get("Retry-After")) if error.headers is not None else None
        text = f"HTTP {error.code}" + (f": {body.splitlines()[0][:200]}" if body else "")
        location = error.headers.get("Location") if error.headers is not None else None
        if 300 <= error.code < 400 and location:
            # Where it points, scheme and host only (the new URL may hold the secret too).
            try:
                target = mask_webhook(urljoin(url, location.strip()))
            except ValueError:  # a Location no URL parser reads ("http://[::1")
                target = "a URL that cannot be read"
            text = (f"HTTP {error.code}: the webhook redirects to {target}; "
                    "redirects are not followed: give the URL it redirects to")
        return Response(status=error.code, error=text, retry_after=retry if error.code in (429, 503) else None)
    except urllib.error.URLError as error:
        reason = error.reason
        text = "timed out" if isinstance(reason, TimeoutError) else str(reason)
        return Response(status=None, error=f"no answer: {text}")
    except TimeoutError:
        return Response(status=None, error=f"no answer within {timeout:g}s")
    except (OSError, ValueError, HTTPException) as error:
        return Response(status=None, error=f"no answer: {type(error).__name__}: {error}")


def post_json(url: str, body: dict, *, timeout: float, idempotency_key: str | None = None) -> Response:
    """POST ``body`` as JSON; never raises, never takes longer than ``timeout`` (plus a hair)."""
    data = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": f"auditctl/{__version__}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    outcome: list[Response] = []
    sockets: list[socket.socket] = []

    def run():
        try:
            outcome.append(_post(url, data, headers, timeout, sockets))
        except Exception as error:  # noqa: BLE001 - a sender never raises
            outcome.append(Response(status=None, error=f"no answer: {type(error).__name__}: {error}"))

    thread = threading.Thread(target=run, name="auditctl-notify-post", daemon=True)
    thread.start()
    thread.join(timeout + 0.2)
    if thread.is_alive():
        # Hang up: a webhook that trickles its answer would otherwise hold the thread (and the
        # connection) for as long as it likes, one more at every retry of a long-running sender.
        # The answer is the timeout's: what the thread makes of the cut connection comes too late.
        for sock in list(sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        response = Response(status=None, error=f"no answer within {timeout:g}s")
    else:
        response = outcome[0] if outcome else Response(status=None, error=f"no answer within {timeout:g}s")
    if response.error is not None:
        response.error = printable(hide_url(response.error, url))[:300]
    return response
