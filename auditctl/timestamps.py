"""One reading of stored times, shared by the SQL rules and by Python.

On SQLite a time is text. auditctl writes one canonical form, ``YYYY-MM-DD HH:MM:SS.ffffff``
in UTC, which sorts as text in time order: the stuck query compares stored times with
cutoffs as plain text, without date arithmetic on every row. Rows written by other tools
may hold any ISO 8601 form Python reads (``T`` and ``Z``, ``+0000``, ``+00``, the basic
format, comma decimals) or something unreadable. For those the SQL calls back into
``canonical`` below (registered on every SQLite connection as ``auditctl_utc``), so the
rules and Python always agree on what a stored time means. What neither can read is
unreadable for both, and flagged.

Pure Python, no SQLAlchemy: the command line and the property tests use it directly.
"""

from __future__ import annotations

from datetime import datetime, timezone


#: A GLOB pattern matching exactly the canonical form (GLOB matches the whole text).
CANONICAL_GLOB = ("[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]."
                  "[0-9][0-9][0-9][0-9][0-9][0-9]")

#: Text longer than this is not a time (and is not worth parsing).
_MAX_TEXT = 64


class Unreadable:
    """A stored time that cannot be read (another tool's text, a PostgreSQL infinity, a year out of range)."""

    __slots__ = ("raw",)

    def __init__(self, raw):
        self.raw = str(raw)[:_MAX_TEXT]

    def __repr__(self) -> str:
        return f"Unreadable({self.raw!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Unreadable) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)


def _canonical_shape(value) -> bool:
    """Text laid out as ``YYYY-MM-DD HH:MM:SS.ffffff`` (whether it is a real time is for fromisoformat)."""
    return (type(value) is str and len(value) == 26 and value[10] == " " and value[19] == "." and value[4] == "-"
            and value[7] == "-" and value[13] == ":" and value[16] == ":")


def parse(value) -> datetime | Unreadable | None:
    """Any stored time as an aware UTC datetime; None when absent; ``Unreadable`` when it cannot be read.

    Never raises. Naive times are taken as UTC, the only zone auditctl writes.
    """
    if value is None:
        return None
    if _canonical_shape(value):
        # The canonical form, as auditctl writes it (every running audit's times on SQLite):
        # read as UTC in one step. Text of that shape that is not a time falls through.
        try:
            return datetime.fromisoformat(value + "+00:00")
        except ValueError:
            pass
    if isinstance(value, datetime):
        if value.tzinfo is timezone.utc:
            return value  # already what this returns (every verdict's time, read once, then shown)
        moment = value
    elif isinstance(value, Unreadable):
        return value
    elif isinstance(value, (str, bytes, bytearray)):
        text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
        text = text.strip()
        if not text or len(text) > _MAX_TEXT:
            return Unreadable(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return Unreadable(text)
    else:
        return Unreadable(repr(value))
    try:
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        # Year 1 with a positive offset, or 9999 with a negative one: not a time in UTC.
        return Unreadable(moment.isoformat() if hasattr(moment, "isoformat") else repr(moment))


def as_datetime(value) -> datetime | None:
    """A readable time, or None (absent or unreadable)."""
    moment = parse(value)
    return moment if isinstance(moment, datetime) else None


def _format(moment: datetime, separator: str = " ", digits: int = 6, suffix: str = "") -> str:
    """``moment`` in UTC as text without an offset (naive is taken as UTC, as ``parse`` takes it)."""
    if moment.tzinfo is not None and moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)  # parse's times never take this turn
    # Not strftime: it does not zero-pad years below 1000 on every platform, and the text must sort.
    # isoformat always writes four-digit years, and truncates (never rounds) to the digits asked for.
    text = moment.isoformat(separator, "microseconds" if digits == 6 else "milliseconds")
    if moment.tzinfo is not None:
        text = text[:-6]  # "+00:00" (cutting it costs less than a replace(tzinfo=None))
    return text + suffix if suffix else text


def canonical(value) -> str | None:
    """The canonical stored text of a time, or None when it cannot be read. Never raises.

    Registered on SQLite connections as ``auditctl_utc(text)``.
    """
    moment = parse(value)
    if not isinstance(moment, datetime):
        return None
    return _format(moment)


def to_storage(value):
    """What the library writes for a time on SQLite: canonical text (datetimes and readable text)."""
    if value is None or isinstance(value, Unreadable):
        return None
    if isinstance(value, datetime):
        text = canonical(value)
        return text if text is not None else None
    text = canonical(value)
    return text if text is not None else value


def _stored_iso(value) -> str | None:
    """Stored canonical text that reads as a time, as ``YYYY-MM-DDTHH:MM:SS.ffffff`` (else None): the
    text a round trip through datetime would give, at a fifth of the cost."""
    if _canonical_shape(value):
        try:
            datetime.fromisoformat(value + "+00:00")
        except ValueError:
            return None
        return f"{value[:10]}T{value[11:]}"
    return None


def milliseconds(iso_text: str | None) -> str | None:
    """Exact ISO text (``_stored_iso``'s, or ``iso``'s with its ``Z``) cut to ``isoformat_z``'s
    millisecond form; isoformat truncates to milliseconds the same way."""
    return None if iso_text is None else iso_text[:23] + "Z"


def isoformat_z(moment) -> str | None:
    """``2025-08-23T06:45:00.123Z``: the progress document's form (always UTC, milliseconds).

    ``moment`` is a datetime or a stored time."""
    text = _stored_iso(moment)
    if text is not None:
        return milliseconds(text)
    moment = as_datetime(moment)
    if moment is None:
        return None
    return _format(moment, "T", 3, "Z")


def iso(moment) -> str | None:
    """Exact ISO 8601 in UTC for json and csv: ``2025-08-23T06:45:00.123456Z``; None when absent or unreadable.

    ``moment`` is a datetime or a stored time.
    """
    text = _stored_iso(moment)
    if text is not None:
        return text + "Z"
    moment = as_datetime(moment)
    if moment is None:
        return None
    return _format(moment, "T", 6, "Z")
