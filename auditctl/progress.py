"""The progress document: building it from a worker's report and reading it back safely.

The document is the platform's public shape (``{"progress": {...}, "last_worker_update": ...}``)
and is kept for people and tools; the rules never read it. Rows are also written by
other tools, so reading it must survive anything: broken JSON, wrong types, a
percentage of 250. ``read_progress`` returns what can be trusted plus a list of the
problems it found, and never raises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: A progress document bigger than this is refused (and the emergency minimal write used):
#: it would bloat every row read by ``show`` and every heartbeat write.
MAX_DOCUMENT_BYTES = 64 * 1024


class NotJSON(str):
    """A stored document that is not JSON at all (as opposed to a JSON string), kept as its text."""


class DocumentError(ValueError):
    """The worker's progress report cannot be stored (unserialisable or oversized)."""


def isoformat_z(moment: datetime | None) -> str | None:
    """``2025-08-23T06:45:00.123Z``: the document's timestamp form (always UTC)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def derive_percentage(percentage, completed_tasks, total_tasks) -> float | None:
    """The reported percentage, or one derived from task counts when only those were given."""
    if percentage is not None:
        return float(percentage)
    if completed_tasks is not None and total_tasks:
        return round(100.0 * completed_tasks / total_tasks, 1)
    return None


def signature(step, percentage, completed_tasks, total_tasks) -> str:
    """What "progress" means: any change of step, task counts or percentage changes this string."""
    return json.dumps([step, percentage, completed_tasks, total_tasks], default=str)


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
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DocumentError(f"progress document is not JSON-serialisable: {exc}") from exc
    if len(text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
        raise DocumentError(
            f"progress document is {len(text.encode('utf-8'))} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit"
        )
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


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def read_progress(raw) -> ProgressView:
    """Interpret a stored ``progress`` value of any shape. Never raises."""
    view = ProgressView()
    if raw is None:
        return view
    document = raw
    if isinstance(raw, (NotJSON, bytes, bytearray)):
        # Stored text that is not JSON at all (schema.NotJSON); a plain str is a JSON string.
        text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
        view.document = text if len(text) <= 200 else text[:200] + "…"
        view.problems.append("progress_not_json")
        return view
    view.document = document
    if not isinstance(document, dict):
        view.problems.append("progress_not_object")
        return view
    inner = document.get("progress", document)
    if not isinstance(inner, dict):
        view.problems.append("progress_not_object")
        return view
    _judge_fields(view, inner.get("step"), inner.get("percentage"), inner.get("completed_tasks"), inner.get("total_tasks"))
    return view


#: What the database says a stored document is (see rules.progress_shape): fields can be trusted
#: only for an "object".
SHAPE_PROBLEMS = {"not_json": "progress_not_json", "not_object": "progress_not_object"}


def view_from_fields(shape: str | None, step, percentage, completed_tasks, total_tasks) -> ProgressView:
    """The same judgement as ``read_progress``, from fields the database already extracted."""
    view = ProgressView()
    if shape in SHAPE_PROBLEMS:
        view.problems.append(SHAPE_PROBLEMS[shape])
    elif shape is not None:
        _judge_fields(view, step, percentage, completed_tasks, total_tasks)
    return view


def _judge_fields(view: ProgressView, step, raw_percentage, completed_tasks, total_tasks) -> None:
    if step is not None and not isinstance(step, str):
        view.problems.append("step_not_text")
        step = str(step)
    view.step = step[:200] if isinstance(step, str) else None
    for name, value in (("completed_tasks", completed_tasks), ("total_tasks", total_tasks)):
        if value is None:
            continue
        number = _number(value)
        if number is None or number < 0:
            view.problems.append(f"{name}_invalid")
        else:
            setattr(view, name, int(number))
    if raw_percentage is not None:
        number = _number(raw_percentage)
        if number is None:
            view.problems.append("percentage_invalid")
        elif not 0 <= number <= 100:
            view.problems.append("percentage_out_of_range")
            view.percentage = float(min(100.0, max(0.0, number)))
        else:
            view.percentage = float(number)
    if view.percentage is None and "percentage_invalid" not in view.problems:
        view.percentage = derive_percentage(None, view.completed_tasks, view.total_tasks)
