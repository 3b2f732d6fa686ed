"""Text from the database, made safe for a terminal, a spreadsheet or a Markdown page.

Anything another tool wrote (a target, a worker id, a step, an error, a host name) may
hold escape sequences: a window-title change, a hyperlink, a clear-screen. Every human
format shows such characters as visible escapes (``\\x1b``) instead of sending them to
the terminal; JSON keeps the exact text (``json.dumps`` escapes control characters
itself). CSV cells that a spreadsheet would run as a formula get a leading quote.
"""

from __future__ import annotations

import re

# Shown escaped: C0 controls (but tab and newline are handled by the caller's choice), DEL, C1
# controls, and ``_HIDING``: the characters that reorder or hide text (bidi overrides, marks and
# isolates, the Arabic letter mark U+061C, zero-width and other invisible format characters: the
# soft hyphen, U+180E, the deprecated format controls, interlinear annotation, hieroglyph, shorthand
# and musical format controls, the tag characters that spell hidden ASCII), the other characters
# Unicode says to draw as nothing (default-ignorable: the combining grapheme joiner U+034F, the
# Hangul fillers, the Khmer inherent vowels, the Mongolian and other variation selectors, and the
# code points kept for more of them), by which "worker-1" and "worker-1\u3164" look the same, the
# line and paragraph separators U+2028 and U+2029 (an editor or a TOML reader breaks a line at
# them), the byte-order mark, and lone surrogates (a JSON document may hold "\ud800", which no UTF-8
# output can encode).
_HIDING = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f"
           "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\ud800-\udfff"
           "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff")
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_HIDING}]")
_CONTROL_AND_LINES = re.compile(f"[\x00-\x1f\x7f-\x9f{_HIDING}]")


def _escape(match: re.Match) -> str:
    char = match.group(0)
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if char == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else _toml_escape(match)


def json_escape(char: str) -> str:
    """One character as a JSON escape (a pair of surrogate escapes beyond the BMP)."""
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xd800 + (code >> 10):04x}\\u{0xdc00 + (code & 0x3ff):04x}"


def _json_escape(match: re.Match) -> str:
    return json_escape(match.group(0))


#: The codec error handler that writes what an encoding cannot hold as JSON's escapes.
JSON_ESCAPES = "auditctl.json_escapes"


def _json_escapes(error: UnicodeEncodeError) -> tuple[str, int]:
    return "".join(json_escape(char) for char in error.object[error.start:error.end]), error.end


def json_escapes_handler() -> str:
    """The name of the error handler (``errors=``) that writes what an encoding cannot hold as
    JSON's escapes (``\\u00e9``): JSON stays valid JSON with the same values, and a table shows
    the code points. Registered on first use."""
    import codecs

    codecs.register_error(JSON_ESCAPES, _json_escapes)
    return JSON_ESCAPES


#: Longest text of one cell of a listing, in a terminal table or a dashboard table: a 10 MB target
#: would otherwise be laid out in full, or sent to every open page at each refresh.
MAX_CELL = 2000


def clipped(text: str) -> str:
    """A cell's text, cut at ``MAX_CELL`` with a count of what was left out."""
    return text if len(text) <= MAX_CELL else f"{text[:MAX_CELL]}… ({len(text) - MAX_CELL:,} more characters)"


def printable(value, *, keep_newlines: bool = False) -> str:
    """``value`` as text whose control and escape characters are shown, not executed."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    pattern = _CONTROL if keep_newlines else _CONTROL_AND_LINES
    return pattern.sub(_escape, text)


def unicode_escaped(text: str) -> str:
    """``text`` with every character ``printable`` would show escaped (controls, newlines, bidi and
    invisible characters) written as ``\\uXXXX`` (``\\UXXXXXXXX`` beyond the BMP): inside a TOML
    string, the same text."""
    return _CONTROL_AND_LINES.sub(_toml_escape, text)


def _toml_escape(match: re.Match) -> str:
    code = ord(match.group(0))
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value) -> str:
    """A text cell for CSV: control characters shown, and a leading quote before anything a
    spreadsheet would evaluate as a formula (``=``, ``+``, ``-``, ``@``)."""
    text = printable(value, keep_newlines=True)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


#: Markdown's active characters in a cell; ``$`` too, which GitHub renders as math between two.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_~\[\]<>|&$])")


def markdown_cell(value) -> str:
    """Text for a Markdown table cell: shown as text, never as markup, links, HTML or a new cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(value))


# In JSON text these can only sit inside strings, where \uXXXX is the same character: escaping
# them keeps the JSON exact and keeps a terminal that prints it from acting on them.
_JSON_RISKY = re.compile(f"[\x7f-\x9f{_HIDING}]")


def json_safe_text(text: str) -> str:
    """JSON text with the invisible and terminal-active characters escaped (still the same JSON value)."""
    if text.isascii() and "\x7f" not in text:
        return text  # the usual record: str knows it is ASCII without a scan, and DEL is the only risky ASCII
    return _JSON_RISKY.sub(_json_escape, text)
