"""Query strings, forms and JSON bodies turned into the library's filter objects.

The same names as the CLI's options (``status``, ``worker``, ``reason``, ``kind``, ``target``,
``older_than``, ``since``, ``until``, ``sort``, ``reverse``, ``limit``, ``dry_run``, ...). A list
may be given by repeating the name or comma-separated, as on the command line. A bad value
raises ``ConfigError`` naming it (HTTP 400 on the API, a message on the page).
"""

from __future__ import annotations

from datetime import datetime

from ..errors import ConfigError
from ..statuses import STATUSES
from ..textsafe import printable
from ..thresholds import RECOVERY_REASONS, RULE_REASONS, parse_duration, parse_moment
from ..values import MAX_INT, audit_id, storable_text, whole_number

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Params:
    """Values by name from a query string or form (a multi-dict) or a JSON object."""

    def __init__(self, *sources, blank_is_unset: bool = False):
        self.sources = [s for s in sources if s is not None]
        #: A page's form sends its empty fields; to the API an empty value is a mistake (an unset
        #: shell variable), refused as the command line refuses ``--worker ''``: read as "no
        #: filter", it would let a recover or reset take the whole fleet.
        self.blank_is_unset = blank_is_unset
        #: The names the endpoint asked for, given or not (``refuse_unknown``).
        self.asked: set[str] = set()
        for source in self.sources:
            if not hasattr(source, "getlist") and not isinstance(source, dict):
                raise ConfigError("the request body must be a JSON object")

    def refuse_unknown(self) -> None:
        """Refuse a name the endpoint never asked for, as the command line refuses an unknown option:
        a misspelt ``dry-run`` or ``ids`` must not run the request as if it had not been given.
        Call it once every parameter has been read, before acting."""
        given = {str(name) for source in self.sources for name in source.keys()}
        unknown = sorted(given - self.asked)
        if unknown:
            takes = ", ".join(sorted(self.asked)) or "no parameters"
            named = ", ".join(repr(printable(n[:40])) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ConfigError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {named} (this takes: {takes})")

    def values(self, name: str) -> list:
        """Every value given for ``name`` (the last source that has it wins)."""
        self.asked.add(name)
        for source in reversed(self.sources):
            if hasattr(source, "getlist"):
                found = source.getlist(name)
                if found:
                    return found
            elif name in source:
                value = source[name]
                if value is None or value == []:
                    # A JSON null or [] (a variable a client left unset) must not read as "not given":
                    # without its filter, or its dry_run, a request would take every stuck audit.
                    raise ConfigError(f"{name}: {_json_name(value)} is no value: give one, or leave {name} out")
                return list(value) if isinstance(value, (list, tuple)) else [value]
        return []

    def text(self, name: str) -> str | None:
        found = self.values(name)
        if not found:
            return None
        value = found[-1]
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a single value")
        text = storable_text(name, str(value)).strip()
        if not text:
            self._blank(name)
        return text or None

    def _blank(self, name: str) -> None:
        if not self.blank_is_unset:
            raise ConfigError(f"{name}: an empty value is no value: give one, or leave {name} out")

    def items(self, name: str, choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """A list option: repeated and/or comma-separated, order kept, duplicates dropped."""
        seen: dict[str, None] = {}
        for value in self.values(name):
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{name}: expected text values")
            parts = [part.strip() for part in storable_text(name, str(value)).split(",")]
            if not any(parts):
                self._blank(name)
            for part in parts:
                if not part:
                    continue
                if choices is not None and part not in choices:
                    raise ConfigError(f"{name}: {part!r} is not one of {', '.join(choices)}")
                seen.setdefault(part, None)
        return tuple(seen)

    def flag(self, name: str, default: bool = False) -> bool:
        found = self.values(name)
        if not found:
            return default
        value = found[-1]
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if not text:  # ?dry_run with no value: it was meant, but which way must not be guessed
            raise ConfigError(f"{name}: give it a value: true or false (1, 0, yes, no)")
        raise ConfigError(f"{name}: {printable(str(value))!r} is not a yes/no value (true, false, 1, 0)")

    def integer(self, name: str, default: int | None, *, low: int = 0, high: int = MAX_INT) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        number = whole_number(value)
        if isinstance(self.values(name)[-1], bool) or number is None or not low <= number <= high:
            raise ConfigError(f"{name}: {value!r} is not a whole number from {low} to {high}")
        return number

    def duration(self, name: str) -> float | None:
        value = self.text(name)
        return None if value is None else parse_duration(value, name)

    def moment(self, name: str) -> float | datetime | None:
        """A duration ago (``2h``) or an ISO 8601 time (``2026-11-29T08:00Z``), as ``--since`` takes."""
        value = self.text(name)
        return None if value is None else parse_moment(value, name)

    def ids(self, name: str = "id") -> tuple[int, ...] | None:
        found = self.values(name)
        if not found:
            return None
        ids = []
        for value in found:
            for part in (value if isinstance(value, (list, tuple)) else str(value).split(",")):
                number = audit_id(str(part))
                if number is None:
                    raise ConfigError(f"{name}: {part!r} is not an audit id")
                ids.append(number)
        return tuple(dict.fromkeys(ids))


def _json_name(value) -> str:
    return "null" if value is None else "[]"


#: The most audits the ``/audits`` page lists: it reads its listing again every few seconds, so
#: "all" (``limit=0``) of a large database would be rendered over and over. The API (and
#: ``auditctl list``) answer once, and still take 0 for all.
PAGE_MAX_ROWS = 1000


def audit_listing(params: Params, *, most: int | None = None):
    """``GET /audits`` and ``/api/audits``: what ``auditctl list`` takes. Returns (filters, sort, descending, limit).
    ``most``: the page's cap (``PAGE_MAX_ROWS``): a limit of 0 (all) or above it is refused."""
    from ..audits import SORTS, AuditFilters

    filters = AuditFilters(statuses=params.items("status", STATUSES), workers=params.items("worker"),
                           kinds=params.items("kind"), targets=params.items("target"),
                           since=params.moment("since"), until=params.moment("until"))
    sort = params.text("sort") or "id"
    if sort not in SORTS:
        raise ConfigError(f"sort: {sort!r} is not one of {', '.join(SORTS)}")
    descending = (sort in ("id", "created")) != params.flag("reverse")
    limit = params.integer("limit", 50)
    if most is not None and not 1 <= limit <= most:
        raise ConfigError(f"limit: this page lists at most {most} audits (it refreshes every few seconds); "
                          f"for more, or for all (limit=0), use /api/audits or auditctl list")
    return filters, sort, descending, limit


def stuck_listing(params: Params):
    """``/api/stuck``: what ``auditctl scan`` takes. Returns (filters, sort, descending, limit)."""
    from ..rules import SORTS

    filters = stuck_filters(params)
    sort = params.text("sort") or "id"
    if sort not in SORTS:
        raise ConfigError(f"sort: {sort!r} is not one of {', '.join(SORTS)}")
    return filters, sort, params.flag("reverse"), params.integer("limit", 0)


def stuck_filters(params: Params):
    from ..rules import Filters

    return Filters(workers=params.items("worker"), reasons=params.items("reason", RULE_REASONS),
                   kinds=params.items("kind"), targets=params.items("target"), older_than=params.duration("older_than"),
                   since=params.moment("since"), until=params.moment("until"), ids=params.ids("id"))


def recover_request(params: Params, max_attempts: int):
    """``recover``'s options: returns (Filters, requeue, max_attempts, dry_run). ``max_attempts`` is
    the dashboard's (``serve --max-attempts``) for a request that names none; naming one without
    ``requeue`` is refused, as on the command line, since it would do nothing."""
    from ..config import MAX_COUNT

    requeue, dry_run = params.flag("requeue"), params.flag("dry_run")
    given = params.integer("max_attempts", None, low=1, high=MAX_COUNT)
    if given is not None and not requeue:
        raise ConfigError("max_attempts counts the claims of requeued audits: give requeue too, or leave it out")
    return stuck_filters(params), requeue, max_attempts if given is None else given, dry_run


def reset_request(params: Params, max_resets: int):
    """``reset-all``'s options: returns (ResetFilters, include_stuck). ``since`` is a duration
    (failed within the last 2h, on the database's clock) or an ISO time, as ``--since`` takes.
    ``max_resets`` is the dashboard's (``serve --max-resets``), for a request that names none."""
    from ..config import MAX_COUNT
    from ..recovery import ORIGINS, ResetFilters

    filters = ResetFilters(since=params.moment("since"), reasons=params.items("reason", RECOVERY_REASONS),
                           origins=params.items("origin", ORIGINS),
                           max_resets=params.integer("max_resets", max_resets, high=MAX_COUNT) or None)
    return filters, params.flag("include_stuck")
