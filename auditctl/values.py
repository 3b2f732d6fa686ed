"""Single stored values read safely: whatever another tool stored in a column, these answer.

SQLite lets any column hold any type (text in ``attempts``, a float in ``pid``, a BLOB in
``worker_id``); PostgreSQL can hold NaN in a float column. Readers go through these so a
value they cannot use becomes None, never an exception.
"""

from __future__ import annotations

import math

from .errors import ConfigError
from .thresholds import MAX_DURATION


def float_value(value) -> float | None:
    """A finite number as a float, else None."""
    if type(value) is float:  # what the drivers return for ages and thresholds
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, str, bytes, bytearray)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def sane_duration(value) -> float | None:
    """A stored threshold as the stuck query trusts it: a number in (0, MAX_DURATION], else None."""
    number = float_value(value)
    return number if number is not None and 0 < number <= MAX_DURATION else None


#: The per-audit thresholds a row stores: the audit's own max_age and those its worker declared.
THRESHOLD_COLUMNS = ("max_age_seconds", "declared_stale_after", "declared_max_age", "declared_stall_after")


def invalid_thresholds(names, values) -> list[str]:
    """``<column>_invalid`` for each per-audit threshold that holds something but not a sane
    duration (NaN, zero, negative, text): the rules ignore it and judge by the next source."""
    return [f"{name}_invalid" for name, value in zip(names, values) if value is not None and sane_duration(value) is None]


def safe_int(value) -> int | None:
    """An integer column as an int, else None (text, fractions, NaN, and a number no 64-bit integer
    holds: 1e300 stored as a float by another tool is no PID or count, and would print 301 digits)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if MIN_INT <= value <= MAX_INT else None
    number = float_value(value)
    if number is None or not number.is_integer() or not MIN_INT <= number <= MAX_INT:
        return None
    return int(number)


def text_value(value) -> str | None:
    """A text column as str (a BLOB decoded, a number as its digits), None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def rounded(value, digits: int = 3) -> float | None:
    """A finite number rounded to ``digits`` places, else None."""
    if type(value) is float and math.isfinite(value):  # what the drivers return for ages: no detour
        return round(value, digits)
    number = float_value(value)
    return None if number is None else round(number, digits)


#: What a database integer column holds (SQLite's INTEGER, PostgreSQL's bigint): the bounds of ids
#: and limits. Another tool may have written an id of 0 or below; such an audit can still be shown.
MIN_INT, MAX_INT = -(2**63), 2**63 - 1


def storable_text(name: str, text: str) -> str:
    """Text any database here can store as given, else ConfigError naming it: no NUL character
    (PostgreSQL text cannot hold one) and no lone surrogate (``"\\ud800"``, or bytes that were not
    UTF-8 read with surrogateescape: no encoding holds one)."""
    if "\x00" in text:
        raise ConfigError(f"{name}: a NUL character is not allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name}: not valid Unicode text (a lone surrogate, or bytes that are not UTF-8)") from None
    return text


def audit_id(text: str) -> int | None:
    """Text a person typed as an audit id, else None."""
    number = whole_number(text.strip())
    return number if number is not None and MIN_INT <= number <= MAX_INT else None


def whole_number(text: str) -> int | None:
    """Text a person typed as a whole number (``42``, ``-5``), else None: ASCII digits only
    (``"²".isdigit()`` is true, but ``int`` refuses it) and at most 20 of them."""
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
        return None
    return int(text)
