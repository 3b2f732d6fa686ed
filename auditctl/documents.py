"""Stored JSON documents (progress, recovery_info, history details), read so that reading never fails.

Another tool may store anything in a document column: broken JSON, a BLOB, NaN, a
document nested thousands of levels deep, a number with 400 digits. ``load`` turns each
into either a plain JSON value auditctl can walk safely, or a ``NotJSON`` text that says
what was wrong; ``dumps`` shows any of them without raising.
"""

from __future__ import annotations

import json
import math
import re
import reprlib

#: Deeper documents are not walked (a recursive reader would fail on them); auditctl writes depth 3.
MAX_DEPTH = 64
#: Text kept of a document that cannot be read, for people to look at.
KEPT_TEXT = 200


class NotJSON(str):
    """A stored document that cannot be used as JSON, kept as (the start of) its text.

    ``problem`` says why: ``not_json``, ``too_deep``.
    """

    problem = "not_json"

    def __new__(cls, text, problem: str = "not_json"):
        text = str(text)
        value = super().__new__(cls, text if len(text) <= KEPT_TEXT else text[:KEPT_TEXT] + "…")
        value.problem = problem
        return value


def _reject_constant(name):
    # NaN and Infinity are not JSON; a document holding them is treated like broken JSON.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    # 1e400 is JSON but becomes inf, which no JSON output can hold: treated like Infinity.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:20]} is too large for a float")
    return number


def _shown(value) -> str:
    # repr() recurses (RecursionError on a value nested thousands deep); reprlib stops at six levels.
    try:
        return reprlib.repr(value)
    except ValueError:  # an int with more digits than Python prints
        return f"<{type(value).__name__}>"


#: One decoder for every document (``json.loads`` with options builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def depth_exceeds(value, limit: int = MAX_DEPTH) -> bool:
    """True when a JSON value nests deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _decode(text: str):
    """``_DECODER.decode``, without its two whitespace scans for the usual document (an object, no
    padding) and the usual list (the progress fields the stuck query takes out: 0.6 against 1.3 µs)."""
    if (text.startswith("{") and text.endswith("}")) or (text.startswith("[") and text.endswith("]")):
        try:
            value, end = _DECODER.scan_once(text, 0)
        except StopIteration as stop:
            raise ValueError(f"not JSON at {stop.value}") from None
        if end != len(text):
            raise ValueError(f"extra data at {end}")
        return value
    return _DECODER.decode(text)


def surely_shallow(text: str) -> bool:
    """Too few brackets to nest deeper than ``MAX_DEPTH``: depth never exceeds the number of
    opening brackets, so most documents need no walk."""
    return text.count("{") + text.count("[") <= MAX_DEPTH


def read_alike_by_sqlite(text: str) -> bool:
    """SQLite's JSON functions take out of this stored text what Python would: it is shallow
    enough, and holds no escape (SQLite looks up a key as written, ``"st\\u0065p"`` is not
    ``step`` to it) and no NUL (they stop reading there). Cheap checks, no parse: a document
    that fails one is read whole by Python."""
    return "\\" not in text and "\x00" not in text and surely_shallow(text)


def load(raw):
    """A stored document as a JSON value, or NotJSON. Never raises."""
    if raw is None or isinstance(raw, NotJSON):
        return raw
    if isinstance(raw, (bytes, bytearray, memoryview)):
        text = bytes(raw).decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    else:
        # Already decoded by a driver (PostgreSQL jsonb through our loader).
        return NotJSON(_shown(raw), "too_deep") if depth_exceeds(raw) else raw
    try:
        value = _decode(text)
    except RecursionError:
        return NotJSON(text, "too_deep")
    except (TypeError, ValueError):
        return NotJSON(text)
    if not surely_shallow(text) and depth_exceeds(value):
        return NotJSON(text, "too_deep")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        return _without_lone_surrogates(value)
    return value


#: ``\ud800``-style escapes: JSON may encode half of a surrogate pair alone, which Python keeps as
#: a lone surrogate that no UTF-8 output (a terminal, a page, a pipe) can encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value, depth: int = 0):
    """The document with each lone surrogate replaced by U+FFFD (pairs were joined by the decoder)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if depth > MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(item, depth + 1) for item in value]
    return value


def loads_for_driver(text):
    """psycopg's JSON loader for PostgreSQL: like ``load``, for the driver's bytes or text."""
    return load(text)


def dumps(value, **kwargs) -> str:
    """JSON text of a document for display; never raises (a value it cannot show says so)."""
    if isinstance(value, NotJSON):
        return json.dumps(str(value), ensure_ascii=kwargs.get("ensure_ascii", False))
    try:
        return json.dumps(value, allow_nan=False, default=str, **kwargs)
    except (RecursionError, ValueError, TypeError, OverflowError):
        return json.dumps("<document that cannot be shown>")


#: How much of one document a person is shown (``show``, the dashboard); JSON output has it whole.
SHOWN_LIMIT = 64 * 1024


def shown(value, limit: int = SHOWN_LIMIT) -> str:
    """A document as indented JSON text for a person, cut at ``limit`` characters with a note saying
    how much was left out (another tool may store megabytes; the dashboard redraws it every 2 s)."""
    text = dumps(value, indent=2, ensure_ascii=False)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… ({len(text) - limit:,} more characters not shown; --format json has the whole document)"


#: One encoder for every stored document: ``json.dumps(value, allow_nan=False)`` builds a new
#: encoder on each call, which costs about a sixth of encoding a recovery record (it holds no
#: state between calls, so threads share it).
_STRICT_ENCODER = json.JSONEncoder(allow_nan=False)


def encode_strict(value) -> str:
    """Strict JSON text (no NaN or infinity), as ``json.dumps(value, allow_nan=False)``; raises as it does."""
    return _STRICT_ENCODER.encode(value)


def dumps_strict(value) -> str:
    """JSON text to store: strict JSON, never NaN. A value that is not (NaN, a set, a datetime)
    is stored with those leaves as text rather than failing the write that carries it."""
    try:
        return encode_strict(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return encode_strict(_strict(value))


def _strict(value, depth: int = 0):
    if depth > MAX_DEPTH:
        return "<nested too deeply>"
    if isinstance(value, dict):
        return {str(key): _strict(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item, depth + 1) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            int.__repr__(value)
        except ValueError:  # more digits than Python prints (sys.get_int_max_str_digits): json.dumps cannot either
            return f"<integer of {value.bit_length()} bits>"
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def strict_value(value):
    """A column value as strict JSON for a record: times as ISO text, bytes decoded, NaN as text."""
    from datetime import datetime

    from .timestamps import Unreadable, iso

    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Unreadable):
        return value.raw
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (dict, list)):
        return json.loads(dumps_strict(value))
    return str(value)
