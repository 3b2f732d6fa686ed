"""``--target`` globs: one reading of a shell glob, written for each engine's matcher.

A glob means what it means to ``fnmatch`` and bash: ``*``, ``?``, sets ``[abc]`` with ranges
``[a-z]``, negated as ``[!...]`` (or bash's ``[^...]``), a ``]`` first in a set and a ``-``
first or last are ordinary members, a backwards range (``[z-a]``) is empty, and a ``[`` with
no closing ``]`` is an ordinary character. The glob is parsed here once and then written as an
anchored PostgreSQL regular expression (``~``) or as a SQLite ``GLOB`` pattern, whose own
readings of the same text differ (``[!a]``, ``[]-a]``, ``[[:]``...). A glob that can match
nothing (an empty set) is ``None``: compared with NULL, it selects no row on either engine.
"""

from __future__ import annotations

import re
from typing import Iterator

#: A set is its negation and its members, each a (low, high) range; a single character is (c, c).
_Set = tuple[bool, list[tuple[str, str]]]


def _members(body: str) -> list[tuple[str, str]]:
    members, i = [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            if low <= high:
                members.append((low, high))
            i += 3
        else:
            members.append((body[i], body[i]))
            i += 1
    return members


def parse(pattern: str) -> Iterator[tuple[str, object]]:
    """The glob as parts: ("any", None), ("one", None), ("char", c) and ("set", (negated, members))."""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            yield "any", None
        elif char == "?":
            yield "one", None
        elif char == "[":
            start = i + 1
            negated = pattern[start:start + 1] in ("!", "^")
            if negated:
                start += 1
            end = pattern.find("]", start + 1 if pattern[start:start + 1] == "]" else start)
            if end < 0:
                yield "char", char
            else:
                yield "set", (negated, _members(pattern[start:end]))
                i = end
        else:
            yield "char", char
        i += 1


def _regex_char(char: str) -> str:
    # Inside a PostgreSQL bracket expression a backslash escapes; before a letter or digit it
    # would start an escape of its own (\d, \w), so only other characters are escaped.
    return char if char.isalnum() else "\\" + char


def _regex_set(negated: bool, members: list[tuple[str, str]]) -> str | None:
    if not members:
        return "." if negated else None
    body = "".join(_regex_char(low) if low == high else f"{_regex_char(low)}-{_regex_char(high)}" for low, high in members)
    return f"[{'^' if negated else ''}{body}]"


def _sqlite_set(negated: bool, members: list[tuple[str, str]]) -> str | None:
    """SQLite's GLOB reads a set its own way: a ``]`` is a member only first, a ``-`` only last,
    a ``^`` first negates, and a range cannot start at ``]`` or end at it. Write the members so."""
    if not members:
        return "?" if negated else None
    singles, ranges = set(), []
    for low, high in members:
        while low <= high and low in "]-^":  # an end SQLite cannot take: a member of its own
            singles.add(low)
            low = chr(ord(low) + 1)
        if low <= high and high in "]-":
            singles.add(high)
            high = chr(ord(high) - 1)
        if low < high:
            ranges.append(f"{low}-{high}")
        elif low == high:
            singles.add(low)
    if not negated and not ranges and len(singles) == 1:
        (char,) = singles
        return f"[{char}]" if char in "*?[" else char
    bracket, caret, dash = ("]" if "]" in singles else ""), ("^" if "^" in singles else ""), ("-" if "-" in singles else "")
    rest = "".join(sorted(singles - {"]", "-", "^"})) + "".join(ranges)
    if not negated and not bracket and not rest:
        return "[-^]"  # "^" and "-": neither may come first, but "-" first is taken as itself
    return f"[{'^' if negated else ''}{bracket}{rest}{caret}{dash}]"


def target_pattern(pattern: str, postgres: bool) -> str | None:
    """What a ``--target`` glob is matched with: an anchored regular expression on PostgreSQL
    (``~``), a ``GLOB`` pattern on SQLite; ``None`` when it can match nothing."""
    out, previous = [], None
    for kind, value in parse(pattern):
        if kind == "any":
            if previous != "any":  # "**" means "*": PostgreSQL took 14 s over ".*" written 1,000 times
                out.append(".*" if postgres else "*")
        elif kind == "one":
            out.append("." if postgres else "?")
        elif kind == "set":
            written = _regex_set(*value) if postgres else _sqlite_set(*value)
            if written is None:
                return None
            out.append(written)
        else:
            out.append(re.escape(value) if postgres else (f"[{value}]" if value in "*?[" else value))
        previous = kind
    return "^" + "".join(out) + "$" if postgres else "".join(out)


#: At most this many values in one list filter, and characters in one value. More is no filter a
#: person means, and the database would refuse the statement ("Expression tree is too large",
#: "LIKE or GLOB pattern too complex"), which reads like an outage.
MAX_FILTER_VALUES = 100
MAX_FILTER_TEXT = 1000


def check_filter_lists(**lists: tuple[str, ...]) -> None:
    """Refuse (``ConfigError``) a list filter with too many values or too long a value."""
    from .errors import NamedSettingError

    for name, values in lists.items():
        if len(values) > MAX_FILTER_VALUES:
            raise NamedSettingError(f"{{{name}}}: {len(values)} values; at most {MAX_FILTER_VALUES} at once", name)
        for value in values:
            if len(value) > MAX_FILTER_TEXT:
                raise NamedSettingError(f"{{{name}}}: a value of {len(value):,} characters; at most {MAX_FILTER_TEXT:,}", name)
