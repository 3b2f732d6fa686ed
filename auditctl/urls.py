"""The one URL masker: every database and webhook URL auditctl shows or logs goes through here.

Pure Python (no SQLAlchemy), so the command line can mask a URL it has not parsed yet,
and so a URL too broken to parse is still masked. Users type URLs in every form:
an unencoded space or ``@`` in the password, ``%``-encoding, the password as a
``password=`` or ``sslpassword=`` query parameter. Masking errs on the side of hiding
too much: when it cannot tell where a password ends, it hides more of the URL rather
than leak a character of it.

Webhook URLs (Slack, Discord, generic) carry their secret in the path, so they are
shown as scheme and host only.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

MASK = "***"

#: A scheme's ``://``, tried only where a run of scheme characters begins (so a long run with no
#: ``://``, a hex or base64 body in an error message, is read once, not once per character).
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[0-9+.\-]*[A-Za-z][A-Za-z0-9+.\-]*://")
_HOST_PART = re.compile(r"[^/?#]*")
#: What may follow the ``@`` that ends the user information, up to the path, query or fragment (or
#: the end): a host, a port, an IPv6 literal, or several of them separated by commas (libpq's
#: multi-host form ``h1:5432,h2:5433``).
_HOST_AFTER_AT = re.compile(r"[\w.\-\[\]:%,]*(?=[/?#]|\Z)")
#: Query parameters that hold secrets (libpq: password, sslpassword; common API forms too). The value
#: runs to the next '&': a database URL has no fragment, and SQLAlchemy reads ``?password=ab#cd`` as ``ab#cd``.
_SECRET_PARAM = re.compile(
    r"(?i)(?:^|[?&;\s])(?:[\w.\-]*pass(?:word|wd|phrase)?|[\w.\-]*secret|[\w.\-]*token|api[_-]?key|pwd)=([^&]*)"
)


def _userinfo_secret(text: str, start: int, last_at: int | None = None) -> tuple[int, int] | None:
    """The span of the password of the URL whose ``scheme://`` ends at ``start``, if it has one.

    ``last_at`` is ``_last_host_at(text)``, for a caller that asks about several URLs of one text."""
    # A host never contains '@'; a password may hold '@', '/', '?' or spaces. The user
    # information ends at the last '@' followed by something host-like. If that '@' sits in
    # the query instead, more than the password is hidden, never less.
    at = _last_host_at(text) if last_at is None else last_at
    if at < start:
        return None
    colon = text.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def _last_host_at(text: str) -> int:
    """Where the last '@' followed by something host-like is (-1: nowhere). Each character is
    read about once: an error message may hold thousands of '@'."""
    at = text.rfind("@")
    while at >= 0 and not _HOST_AFTER_AT.match(text, at + 1):
        at = text.rfind("@", 0, at)
    return at


def _spans(text: str) -> list[tuple[int, int]]:
    spans = []
    last_at = _last_host_at(text)
    for scheme in _SCHEME.finditer(text):
        span = _userinfo_secret(text, scheme.end(), last_at)
        if span is not None and span[1] > span[0]:
            spans.append(span)
    for param in _SECRET_PARAM.finditer(text):
        if param.end(1) > param.start(1):
            spans.append((param.start(1), param.end(1)))
    return spans


def secret_spans(text: str) -> list[tuple[int, int]]:
    """Where the secrets are in a text holding URLs: passwords in user information and secret parameters."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(_spans(text)):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    render = getattr(value, "render_as_string", None)
    return render(hide_password=False) if render is not None else str(value)


def mask_url(value) -> str:
    """The URL (text, or a SQLAlchemy URL) with every password replaced by ``***``; safe to show or log."""
    text = _as_text(value)
    out, position = [], 0
    for start, end in secret_spans(text):
        out.append(text[position:start])
        out.append(MASK)
        position = end
    out.append(text[position:])
    return "".join(out)


def mask_unread_url(value) -> str:
    """A database URL that could not be parsed, safe to show: ``mask_url``, and when no ``scheme://``
    leads to its password (a mistyped scheme: ``postgresql//u:pw@h/db``, ``postgresql:/u:pw@h/db``,
    ``u:pw@h/db``), everything from its first ':' to the '@' before its host is hidden too. A
    ``scheme://`` further on (``?application_name=https://...``) comes after the password: only
    one that begins the URL leads to it."""
    text = _as_text(value)
    masked = mask_url(text)
    if _SCHEME.match(text.lstrip()):
        return masked
    span = _userinfo_secret(masked, 0)
    if span is None or span[1] <= span[0]:
        return masked
    return masked[:span[0]] + MASK + masked[span[1]:]


def secrets_of(value) -> list[str]:
    """The secret strings a URL holds, as typed and decoded, longest first (to scrub messages)."""
    text = _as_text(value)
    found = set()
    # Each secret on its own, not merged with overlapping spans: in ``user@host:5432/db?password=a@b``
    # the '@' makes ``5432/db?password=a`` look like a password too, and a message may hold ``a@b`` alone.
    for start, end in _spans(text):
        secret = text[start:end]
        found.update({secret, unquote(secret), unquote_plus(secret)})
        found.update(_split_at_at(secret))
    password = getattr(value, "password", None)
    if password:
        found.add(str(password))
    return sorted((s for s in found if s), key=len, reverse=True)


def _split_at_at(secret: str) -> set[str]:
    """The pieces of a password holding an unencoded '@' that a driver may show on their own.

    ``u:hunter2@Tr0ub4dor@host`` is read by SQLAlchemy as password ``hunter2`` and host
    ``Tr0ub4dor@host``, so an error says "cannot resolve host 'Tr0ub4dor@host'". Each tail is
    taken with the '@' that follows it, distinctive enough to replace anywhere. The heads are
    what the driver takes as the password, which it never repeats; masked alone they would
    hide ordinary words ("pass" in "password authentication failed").
    """
    parts = secret.split("@")
    return {"@".join(parts[cut:]) + "@" for cut in range(1, len(parts)) if "@".join(parts[cut:])}


def scrub(message, *urls) -> str:
    """A message (a driver's error, say) with the secrets of the given URLs, and of any URL inside it, masked.

    Outside a URL a secret is masked where it stands as a word of its own, never inside another
    word: with the password ``fail``, "connection ***ed" would tell it. And it is left alone
    when it is also a word of what the URL shows (its user, a piece of its host, its port, its
    database): masking ``postgres`` in ``for user "postgres"``, or ``1`` in ``127.0.0.1``, would
    tell the password to whoever compares the message with the URL. Drivers do not repeat a
    password; what they repeat is the URL's other parts and their own words."""
    text = str(message)
    for url in urls:
        shown = mask_url(url)
        for secret in secrets_of(url):
            word = _as_word(secret)
            if not word.search(shown):
                text = word.sub(MASK, text)
    return mask_url(text)


def _as_word(secret: str) -> re.Pattern:
    """``secret`` where no letter or digit runs on from either of its ends."""
    head = r"(?<![^\W_])" if re.match(r"[^\W_]", secret[0]) else ""
    tail = r"(?![^\W_])" if re.match(r"[^\W_]", secret[-1]) else ""
    return re.compile(head + re.escape(secret) + tail)


#: A host name or address, with its port: what a webhook's label may show.
_HOST_LIKE = re.compile(r"(?:[\w\-.~%]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
#: The longest label a destination is stored under (``notification_deliveries.label``).
MAX_LABEL = 200


def mask_webhook(url: str | None) -> str:
    """A webhook URL as scheme and host only: its path and query are the secret. When the host
    cannot be told for sure (an '@' after it, which may end a password holding '/'; a backslash;
    anything that is no host name) it is masked too."""
    if not url:
        return ""
    match = re.match(r"\s*([A-Za-z][A-Za-z0-9+.\-]*://)", url)
    if match is None:
        return MASK
    authority = _HOST_PART.match(url, match.end()).group(0)
    host = authority.rsplit("@", 1)[-1]
    if "@" in url[match.end() + len(authority):]:
        if _HOST_LIKE.fullmatch(host):
            # A host and a path holding '@' (".../v1@TOKEN/"), or a password of digits before its
            # '/' ("user:12/x@host"): which, no one can tell.
            host = MASK
        else:  # no host before the first '/': a password holding '/' ends at the '@' before the host
            span = _userinfo_secret(url, match.end())
            host = _HOST_PART.match(url, span[1] + 1).group(0) if span else MASK
    if not _HOST_LIKE.fullmatch(host) or "\\" in authority:  # a backslash: a browser's '/', a path in the authority
        host = MASK
    label = f"{match.group(1)}{host}/{MASK}"
    return label if len(label) <= MAX_LABEL - 10 else f"{match.group(1)}{MASK}"
