"""Where alerts go: a destination is a kind (slack, discord, webhook) and a URL, which is a secret.

The URL is used exactly as given (so a test can point one at loopback) and is never shown:
messages, logs and ``notify --status`` name a destination by its kind and masked URL
(scheme and host only). The database knows it only by a hash.

Pure Python (no SQLAlchemy): the command line parses destinations before it needs a database.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..textsafe import printable
from ..urls import mask_webhook

#: The longest one POST may take, connecting included (seconds).
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Destination:
    kind: str
    url: str = field(repr=False)

    @property
    def key(self) -> str:
        """How the database names this destination: a hash of the URL, never the URL itself."""
        return hashlib.sha256(self.url.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        """``slack https://hooks.slack.com/***``: safe to show and to store."""
        return f"{self.kind} {mask_webhook(self.url)}"

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"Destination({self.label!r})"


def _split(value) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) else list(value)
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"a webhook URL must be text, got {type(item).__name__}")
        urls.extend(part.strip() for part in item.split(",") if part.strip())
    return urls


def check_url(kind: str, url: str) -> str:
    """``url`` if it can be posted to as it is; else a ConfigError naming it masked (scheme and host).

    A space or control character is refused, not sent: it is most often two URLs in one value
    (a line break in a variable), and urllib's error would quote the URL, secret included. So is
    user information (``https://user:password@host/``): urllib does not send it as credentials
    but reads the password as part of the host, and its error would quote it."""
    label = "webhook" if kind == "webhook" else f"{kind} webhook"
    shown = printable(mask_webhook(url))  # the host may hold the line break
    if printable(url) != url or re.search(r"\s", url):  # control, invisible or blank characters
        raise ConfigError(f"{label} {shown} holds a space, line break or control character: "
                          "give one URL per value, or separate URLs with commas")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError:  # an unclosed IPv6 bracket, a port that is no number
        hostname = None
    if hostname is None or parts.scheme.lower() not in ("http", "https") or not hostname \
            or not re.fullmatch(r"[\w\-.~%:]+", hostname):  # a backslash for a slash: the path read as the host
        raise ConfigError(f"{label} {shown} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(f"{label} {shown} holds a user name or password before its host: auditctl cannot send "
                          "them (urllib does not turn them into credentials); use the URL the service gives, "
                          "with its secret in the path or query")
    return url


def destinations_from(slack=None, discord=None, webhook=None) -> list[Destination]:
    """Destinations from URLs (each a string, comma-separated, or a list); the same URL counts once."""
    found: dict[str, Destination] = {}
    for kind, value in (("slack", slack), ("discord", discord), ("webhook", webhook)):
        for url in _split(value):
            destination = Destination(kind, check_url(kind, url))
            found.setdefault(destination.key, destination)
    return list(found.values())
