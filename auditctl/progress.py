"""The progress document: what a worker may report, building it, and reading it back safely.

The document is the platform's public shape (``{"progress": {...}, "last_worker_update": ...}``)
and is kept for people and tools; the rules never read it. The library stores only what it
can read back: a percentage between 0 and 100, task counts that are whole numbers no
larger than ``MAX_COUNT`` with completed never above total, a step of bounded length.
``clean_report`` clamps a worker's report into that shape and says what it changed.

Rows are also written by other tools, so reading must survive anything: broken JSON, wrong
types, a percentage of 250, a 400-digit count. ``read_progress`` returns what can be
trusted plus a list of the problems it found, and never raises.
"""

from __future__ import annotations

import decimal
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .documents import MAX_DEPTH, NotJSON, encode_strict
from .timestamps import isoformat_z

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_COUNT", "MAX_STEP", "DocumentError", "NotJSON", "ProgressView", "build_document",
           "clean_report", "derive_percentage", "isoformat_z", "read_progress", "signature", "storable_extra"]

#: A progress document bigger than this is refused (and the emergency minimal write used):
#: it would bloat every row read by ``show`` and every heartbeat write.
MAX_DOCUMENT_BYTES = 64 * 1024
#: The largest task count stored: every count up to it is exact as a float, in JSON and in SQL.
MAX_COUNT = 2**53
#: The longest step text stored.
MAX_STEP = 500
#: What PostgreSQL's jsonb refuses in a string (``\u0000``, an unpaired surrogate): the whole report would be lost.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str) -> str | None:
    """``text`` with what no database here stores (NUL, a lone surrogate) replaced by U+FFFD; None
    when it holds none."""
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else None


class DocumentError(ValueError):
    """The worker's progress report cannot be stored (unserialisable or oversized)."""


def _count(value) -> int | None:
    """A task count if it is a whole number in 0..MAX_COUNT, else None (a worker's ``Decimal("3")``,
    ``Fraction(6, 2)`` is a whole number too; a stored document holds ints and floats)."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, int) and isinstance(value, _NUMBERS):
        number = _fraction(value)
        value = int(value) if number is not None and number.is_integer() and value == int(value) else None
    if not isinstance(value, int) or value < 0 or value > MAX_COUNT:
        return None
    return int(value)


def _fraction(value) -> float | None:
    """A finite number as a float, else None (text, NaN, infinities, ints too large for a float).
    Any real number a worker may hold (``Decimal``, ``Fraction``, any ``numbers.Real``) counts."""
    if isinstance(value, bool) or not isinstance(value, _REAL):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):  # a huge int; Decimal("sNaN")
        return None
    return number if math.isfinite(number) else None


#: The numbers besides int and float: every ``numbers.Real`` (Fraction, and those other libraries
#: register), and Decimal, which the standard library registers as a Number only.
_NUMBERS = (numbers.Real, decimal.Decimal)
_REAL = (int, float, *_NUMBERS)


def derive_percentage(percentage, completed_tasks, total_tasks) -> float | None:
    """The reported percentage, or one derived from task counts when only those were given; always 0..100."""
    number = _fraction(percentage)
    if number is not None:
        return min(100.0, max(0.0, number))
    completed, total = _count(completed_tasks), _count(total_tasks)
    if completed is not None and total:
        return round(100.0 * min(completed, total) / total, 1)
    return None


def clean_report(step, percentage, completed_tasks, total_tasks) -> tuple[dict, list[str]]:
    """A worker's report clamped into what the document promises; returns (fields, what was changed).

    Values that are not given (None) stay None. A percentage outside 0..100 is clamped; NaN,
    infinities and text are dropped; counts must be whole numbers in 0..MAX_COUNT; completed
    is never above total; the step is text of at most MAX_STEP characters.
    """
    changed: list[str] = []
    fields: dict[str, Any] = {"step": None, "percentage": None, "completed_tasks": None, "total_tasks": None}
    if step is not None:
        text = step if isinstance(step, str) else str(step)
        if len(text) > MAX_STEP:
            text = text[:MAX_STEP]
            changed.append("step_truncated")
        if (replaced := _storable(text)) is not None:
            text = replaced
            changed.append("step_characters_replaced")
        fields["step"] = text
    if percentage is not None:
        number = _fraction(percentage)
        if number is None:
            changed.append("percentage_invalid")
        else:
            if not 0.0 <= number <= 100.0:
                changed.append("percentage_out_of_range")
            fields["percentage"] = min(100.0, max(0.0, number))
    for name, value in (("completed_tasks", completed_tasks), ("total_tasks", total_tasks)):
        if value is None:
            continue
        count = _count(value)
        if count is None:
            changed.append(f"{name}_invalid")
        fields[name] = count
    completed, total = fields["completed_tasks"], fields["total_tasks"]
    if completed is not None and total is not None and completed > total:
        fields["completed_tasks"] = total
        changed.append("completed_over_total")
    return fields, changed


def signature(step, percentage, completed_tasks, total_tasks) -> str:
    """What "progress" means: any change of step, task counts or percentage changes this string."""
    return json.dumps([step, percentage, completed_tasks, total_tasks], default=str)


def storable_extra(extra: dict) -> tuple[dict, bool]:
    """A report's extra fields with what PostgreSQL's jsonb cannot store (NUL, a lone surrogate, as in
    a file name that is not UTF-8) replaced by U+FFFD in every key and text value, at any depth, as
    ``clean_report`` does for the step: one such character made the whole report fail, and only the
    emergency write got through. Returns ``(fields, whether anything was replaced)``; the caller's
    values are not changed. Values of other types are left to the document's own checks."""
    changed = False
    done: dict[int, Any] = {}  # each container once: a shared one, or a cycle, is not walked again

    def clean(value, depth: int):
        nonlocal changed
        if isinstance(value, str):
            if (replaced := _storable(value)) is not None:
                changed = True
                return replaced
            return value
        if depth > MAX_DEPTH or not isinstance(value, (dict, list, tuple)):
            return value  # too deep, or not text: the document's own checks judge it
        if id(value) in done:
            return done[id(value)]
        done[id(value)] = value  # a cycle leads back here: left as it is, and refused as unserialisable
        if isinstance(value, dict):
            cleaned = {clean(key, depth + 1): clean(item, depth + 1) for key, item in value.items()}
        else:
            cleaned = [clean(item, depth + 1) for item in value]
        done[id(value)] = cleaned
        return cleaned

    return clean(extra, 0), changed


#: The fields of the progress document the library writes itself: an extra field of the same name is not stored.
OWN_FIELDS = frozenset({"step", "percentage", "completed_tasks", "total_tasks", "is_running", "last_updated", "heartbeat",
                        "worker_id", "worker_url"})


def build_document(
    *,
    step: str | None,
    percentage: float | None,
    completed_tasks: int | None,
    total_tasks: int | None,
    is_running: bool,
    now: datetime,
    worker_id: str | None,
    worker_url: str | None,
    extra: dict | None = None,
) -> tuple[dict, str]:
    """Return ``(document, json_text)``; raises DocumentError when it cannot be stored."""
    stamp = isoformat_z(now)
    progress: dict[str, Any] = {
        "step": step,
        "percentage": percentage,
        "completed_tasks": completed_tasks,
        "total_tasks": total_tasks,
        "is_running": is_running,
        "last_updated": stamp,
        "heartbeat": stamp,
        "worker_id": worker_id,
        "worker_url": worker_url,
    }
    if extra:
        for key, value in extra.items():
            progress.setdefault(str(key), value)
    document = {"progress": progress, "last_worker_update": stamp}
    try:
        text = encode_strict(document)
    except (TypeError, ValueError, RecursionError) as exc:
        raise DocumentError(f"progress document is not JSON-serialisable: {exc}") from exc
    size = len(text.encode("utf-8"))
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"progress document is {size} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit")
    return document, text


@dataclass
class ProgressView:
    """What a reader may trust of a stored progress document."""

    step: str | None = None
    percentage: float | None = None
    completed_tasks: int | None = None
    total_tasks: int | None = None
    document: Any = None
    problems: list[str] = field(default_factory=list)


def _unreadable(raw) -> str:
    """The problem of a stored value ``documents.load`` could not read."""
    return "progress_too_deep" if getattr(raw, "problem", "") == "too_deep" else "progress_not_json"


def read_progress(raw) -> ProgressView:
    """Interpret a stored ``progress`` value of any shape. Never raises."""
    view = ProgressView()
    if raw is None:
        return view
    if isinstance(raw, (NotJSON, bytes, bytearray)):
        # Stored text that is not JSON at all (documents.NotJSON); a plain str is a JSON string.
        text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
        view.document = text if len(text) <= 200 else text[:200] + "…"
        view.problems.append(_unreadable(raw))
        return view
    view.document = raw
    if not isinstance(raw, dict):
        view.problems.append("progress_not_object")
        return view
    inner = raw.get("progress", raw)
    if not isinstance(inner, dict):
        view.problems.append("progress_not_object")
        return view
    _judge_fields(view, inner.get("step"), inner.get("percentage"), inner.get("completed_tasks"), inner.get("total_tasks"))
    return view


#: The fields of a progress document a reader shows, in the order ``read_progress_fields`` takes them.
PROGRESS_FIELDS = ("step", "percentage", "completed_tasks", "total_tasks")


def read_progress_fields(values) -> ProgressView:
    """Interpret ``PROGRESS_FIELDS`` as a query took them out of a document whose ``progress`` is
    an object (a JSON list, decoded by ``documents.load``): judged as ``read_progress`` judges
    them in the whole document. Never raises."""
    view = ProgressView()
    if type(values) is list and len(values) == len(PROGRESS_FIELDS):
        _judge_fields(view, *values)
    else:  # a field Python cannot hold (a number past a float), or nested too deep
        view.problems.append(_unreadable(values))
    return view


def _judge_fields(view: ProgressView, step, raw_percentage, completed_tasks, total_tasks) -> None:
    if (type(step) is str and len(step) <= MAX_STEP and type(raw_percentage) is float and 0.0 <= raw_percentage <= 100.0
            and type(completed_tasks) is int and type(total_tasks) is int and 0 <= completed_tasks <= total_tasks <= MAX_COUNT):
        # What auditctl writes, judged in one test: every field as the slow path below would keep it.
        view.step, view.percentage, view.completed_tasks, view.total_tasks = step, raw_percentage, completed_tasks, total_tasks
        return
    if step is not None and not isinstance(step, str):
        view.problems.append("step_not_text")
        try:
            step = json.dumps(step)[:200]
        except (TypeError, ValueError, RecursionError):
            step = None
    view.step = step[:MAX_STEP] if isinstance(step, str) else None
    for name, value in (("completed_tasks", completed_tasks), ("total_tasks", total_tasks)):
        if value is None:
            continue
        count = _count(value)
        if count is None:
            view.problems.append(f"{name}_invalid")
        else:
            setattr(view, name, count)
    if view.completed_tasks is not None and view.total_tasks is not None and view.completed_tasks > view.total_tasks:
        view.problems.append("completed_over_total")
        view.completed_tasks = view.total_tasks  # as clean_report does: never more done than there is
    if raw_percentage is not None:
        number = _fraction(raw_percentage)
        if number is None:
            view.problems.append("percentage_invalid")
        elif not 0 <= number <= 100:
            view.problems.append("percentage_out_of_range")
            view.percentage = min(100.0, max(0.0, number))
        else:
            view.percentage = number
    if view.percentage is None and "percentage_invalid" not in view.problems:
        view.percentage = derive_percentage(None, view.completed_tasks, view.total_tasks)
