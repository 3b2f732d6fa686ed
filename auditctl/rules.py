"""The one stuck query: four rules, evaluated by the database, on the database's clock.

A running audit is stuck when

* ``worker_gone``: the registry proves the worker instance that holds it is gone (it
  stopped cleanly without finishing it, or its process no longer exists on this host);
* ``stale_heartbeat``: nothing was heard from its worker (heartbeat, progress write)
  for longer than its ``stale_after``;
* ``max_age_exceeded``: it has run (since it was claimed) longer than its ``max_age``;
* ``progress_stalled``: heartbeats are fresh but step, task counts and percentage have
  not changed for longer than its ``stall_after`` (alive but frozen). A stale audit, or
  one whose worker is gone, is never also called stalled.

Each audit is judged by its own thresholds where it has them (see ``thresholds.Policy``:
a flag, then the audit's own, then its kind's, then the fleet's).

The query compares stored times with cutoffs computed once per statement, so it costs a
few comparisons per running audit and uses the partial index of running audits; ages are
computed only in the select list, for the audits that are stuck. On SQLite the stored
times are canonical text that sorts in time order; a row another tool wrote in another
form is read through the same parser Python uses (see ``auditctl.timestamps``).

Times the database cannot trust are not used: a time more than ``FUTURE_TOLERANCE``
seconds in the future (another tool's clock) is ignored and the audit is judged from the
next one (heartbeat, last worker update, start, creation), and flagged. An audit with no
trustworthy time at all counts as never heard from.

A monitor that could not see the database for a while passes ``seen_since``: silence and
stalls are then never measured from before that moment, so an outage is not mistaken
for dead workers (see ``monitor``).

A row the reader cannot turn into a verdict (whatever another tool stored) becomes a
verdict marked ``unreadable`` with what was wrong; it never stops the others. The
reasons themselves come from the database, so such an audit is still recovered.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Iterator

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection, Engine

from . import documents, timestamps
from .errors import ConfigError
from .gcpause import paused_collector
from .globs import target_pattern
from .progress import PROGRESS_FIELDS, read_progress, read_progress_fields
from .sqlfunctions import PG_EARLIEST, PG_LATEST, index_present, indexed_by, is_postgres, moments, pg_seconds_since
from .thresholds import (
    FUTURE_TOLERANCE, MAX_AGE_EXCEEDED, MAX_DURATION, PROGRESS_STALLED, RULE_REASONS, STALE_HEARTBEAT, WORKER_GONE, Policy,
    check_window, format_duration, parse_duration,
)
from .transactions import keyset_pages, read_connection
from .values import THRESHOLD_COLUMNS, float_value, invalid_thresholds, rounded, safe_int, text_value

#: Rows per page when streaming (each page is its own short read; nothing is held open between pages).
PAGE_SIZE = 2000
SORTS = ("id", "age", "silence", "target", "worker")


@dataclass(frozen=True)
class Filters:
    """Which stuck audits to look at. Each tuple is a union (any of its values); empty means all.

    ``since`` and ``until`` bound the creation time: seconds ago (a float) or a moment (datetime).
    """

    workers: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    older_than: float | None = None
    since: float | datetime | None = None
    until: float | datetime | None = None
    ids: tuple[int, ...] | None = None

    def __post_init__(self):
        unknown = [r for r in self.reasons if r not in RULE_REASONS]
        if unknown:
            raise ConfigError(f"unknown reason {unknown[0]!r}: choose from {', '.join(RULE_REASONS)}")
        from .globs import check_filter_lists
        check_filter_lists(worker=self.workers, kind=self.kinds, target=self.targets)
        check_window(self.since, self.until)


def make_filters(filters: Filters | None = None, *, worker: str | None = None, reason: str | None = None,
                 older_than: float | None = None, ids=None) -> Filters:
    """Filters from a Filters object and/or the single-value keywords of earlier versions."""
    filters = filters or Filters()
    changes = {}
    if worker is not None:
        changes["workers"] = (worker,)
    if reason is not None:
        changes["reasons"] = (reason,)
    if older_than is not None:
        changes["older_than"] = older_than
    if ids is not None:
        changes["ids"] = tuple(ids)
    return replace(filters, **changes) if changes else filters


# --- verdicts ----------------------------------------------------------------------------

#: The columns of the stuck query, in order (a verdict reads its row by position). ``rules`` holds
#: one bit per rule that fired (in ``RULE_REASONS`` order) and ``_FUTURE_BIT`` for a heartbeat
#: in the future: one small integer instead of five columns.
_COLUMNS = ("id", "target", "worker_id", "worker_instance", "lease", "attempts", "kind", "started_at",
            "heartbeat_at", "progress_fields", "progress", "max_age_seconds", "declared_stale_after",
            "declared_stall_after", "declared_max_age", "rules", "age_seconds", "silence_seconds", "stalled_seconds")
_FUTURE_BIT = 1 << len(RULE_REASONS)
_RULE_MASK = _FUTURE_BIT - 1
#: The reasons for each combination of rule bits, worked out once.
_REASONS_BY_BITS = tuple(tuple(reason for bit, reason in enumerate(RULE_REASONS) if bits & (1 << bit))
                         for bits in range(_FUTURE_BIT))
_AT = {name: index for index, name in enumerate(_COLUMNS)}
_THRESHOLDS_AT = tuple(_AT[name] for name in THRESHOLD_COLUMNS)
_THRESHOLD_AT = {"stale_after": 0, "max_age": 1, "stall_after": 2}
_AGE_AT, _SILENCE_AT, _STALLED_AT = _AT["age_seconds"], _AT["silence_seconds"], _AT["stalled_seconds"]


class Verdict:
    """A stuck audit and why: each rule that fired, with what was measured and the thresholds used.

    Built from the query's row tuple; what is only needed for display (progress fields,
    explanations, threshold sources) is worked out when asked for.
    """

    __slots__ = ("row", "policy", "gone_proof", "unreadable", "_progress", "_reasons", "_thresholds", "_times", "_iso",
                 "_ages")

    def __init__(self, row, policy: Policy, gone: dict[str, str] | None = None):
        self.row = row
        self.policy = policy
        self.unreadable: str | None = None
        self._progress = None
        self._reasons = None
        self._thresholds: tuple | None = None
        self._times: dict | None = None
        self._iso: dict | None = None
        self._ages: tuple | None = None
        instance = row[_AT["worker_instance"]]
        self.gone_proof = gone.get(instance) if gone and isinstance(instance, str) else None

    # The row, by name.
    id = property(lambda self: self.row[0])
    lease = property(lambda self: self.row[_AT["lease"]])
    worker_instance = property(lambda self: text_value(self.row[_AT["worker_instance"]]))
    worker_id = property(lambda self: text_value(self.row[_AT["worker_id"]]))
    kind = property(lambda self: text_value(self.row[_AT["kind"]]))
    status = "running"  # the query reads running audits only
    age_seconds = property(lambda self: (self._ages or self._measured())[0])
    silence_seconds = property(lambda self: (self._ages or self._measured())[1])
    stalled_seconds = property(lambda self: (self._ages or self._measured())[2])
    max_age_seconds = property(lambda self: self.threshold("max_age")[0])

    def _measured(self) -> tuple:
        """The three ages (age, silence, stalled), rounded to the millisecond once: a listing, an
        explanation and a recovery's measurements all show them."""
        row = self.row
        self._ages = (rounded(row[_AGE_AT]), rounded(row[_SILENCE_AT]), rounded(row[_STALLED_AT]))
        return self._ages

    @property
    def target(self) -> str:
        value = self.row[_AT["target"]]
        return value if isinstance(value, str) else text_value(value) or ""

    @property
    def attempts(self) -> int:
        return safe_int(self.row[_AT["attempts"]]) or 0

    @property
    def reasons(self) -> list[str]:
        if self._reasons is None:
            bits = self.row[_AT["rules"]]
            self._reasons = list(_REASONS_BY_BITS[(bits if type(bits) is int else safe_int(bits) or 0) & _RULE_MASK])
        return self._reasons

    def _time(self, name: str):
        """A stored time, parsed once (a datetime, None, or ``timestamps.Unreadable``)."""
        if self._times is None:
            self._times = {}
        if name not in self._times:
            self._times[name] = timestamps.parse(self.row[_AT[name]])
        return self._times[name]

    def judged(self) -> tuple:
        """The row as the rules judged it, without the ages (which grow by the second): two readings
        of an audit that nothing changed in between give equal tuples."""
        return tuple(self.row[:_AT["age_seconds"]])

    def iso(self, name: str) -> str | None:
        """``started_at`` or ``heartbeat_at`` as exact ISO 8601 UTC text, None when absent or unreadable;
        worked out once (canonical text goes straight to ISO text, without a datetime)."""
        found = self._iso
        if found is None:
            found = self._iso = {}
        if name not in found:
            found[name] = timestamps.iso(self.row[_AT[name]])
        return found[name]

    @property
    def started_at(self) -> datetime | None:
        value = self._time("started_at")
        return value if isinstance(value, datetime) else None

    @property
    def last_heartbeat(self) -> datetime | None:
        value = self._time("heartbeat_at")
        return value if isinstance(value, datetime) else None

    @property
    def progress(self):
        if self._progress is None:
            fields, whole = self.row[_AT["progress_fields"]], self.row[_AT["progress"]]
            # ``whole`` is None when PostgreSQL judged the document usual; SQLite always sends it.
            usual = fields is not None and (whole is None or (isinstance(whole, str)
                                                              and documents.read_alike_by_sqlite(whole)))
            if usual:
                self._progress = read_progress_fields(documents.load(fields))
            else:
                self._progress = read_progress(documents.load(whole))
        return self._progress

    @property
    def step(self) -> str | None:
        return self.progress.step

    @property
    def percentage(self) -> float | None:
        return self.progress.percentage

    @property
    def problems(self) -> list[str]:
        problems = list(self.progress.problems)
        row = self.row
        bits = row[_AT["rules"]]
        if (bits if type(bits) is int else safe_int(bits) or 0) & _FUTURE_BIT:
            problems.append("heartbeat_in_future")
        for name in ("started_at", "heartbeat_at"):
            if row[_AT[name]] is not None and self.iso(name) is None:  # stored, but not a time
                problems.append(f"{name}_unreadable")
        if row[_AT["lease"]] is None:
            problems.append("no_lease")
        problems += invalid_thresholds(THRESHOLD_COLUMNS, [row[at] for at in _THRESHOLDS_AT])
        if self.unreadable:
            problems.append(f"row_unreadable: {self.unreadable}")
        return problems

    def _resolved(self) -> tuple:
        """``(stale_after, max_age, stall_after)``, each ``(seconds, source)``: resolved once per verdict."""
        found = self._thresholds
        if found is None:
            row = self.row
            # The same choice the query made in SQL (``_statement``'s cut), made again for display.
            found = self._thresholds = self.policy.resolve_audit(
                self.kind, row[_AT["max_age_seconds"]], row[_AT["declared_stale_after"]], row[_AT["declared_max_age"]],
                row[_AT["declared_stall_after"]])
        return found

    def threshold(self, name: str) -> tuple[float | None, str]:
        """The threshold this audit was judged by, and where it came from (flag, audit, worker, kind, fleet)."""
        return self._resolved()[_THRESHOLD_AT[name]]

    def thresholds(self) -> dict:
        """``{"stale_after": {"seconds": 600.0, "source": "fleet"}, ...}``."""
        (stale, stale_source), (age, age_source), (stall, stall_source) = self._resolved()
        return {"stale_after": {"seconds": stale, "source": stale_source},
                "max_age": {"seconds": age, "source": age_source},
                "stall_after": {"seconds": stall, "source": stall_source}}

    def explain(self) -> list[str]:
        """One sentence per reason, e.g. ``no heartbeat for 12m (stale_after 10m, fleet)``."""
        sentences = []
        for reason in self.reasons:
            if reason == WORKER_GONE:
                sentences.append(self.gone_proof or f"worker instance {(self.worker_instance or '?')[:8]} is gone")
            elif reason == STALE_HEARTBEAT:
                silence, limit = self.silence_seconds, self.threshold("stale_after")
                heard = "never heard from" if silence is None else f"no heartbeat for {_past(silence, limit[0])}"
                sentences.append(f"{heard} {_limit('stale_after', *limit)}")
            elif reason == MAX_AGE_EXCEEDED:
                limit = self.threshold("max_age")
                sentences.append(f"running for {_past(self.age_seconds, limit[0])} {_limit('max_age', *limit)}")
            elif reason == PROGRESS_STALLED:
                limit = self.threshold("stall_after")
                sentences.append(f"no progress for {_past(self.stalled_seconds, limit[0])} {_limit('stall_after', *limit)}")
        return sentences

    def measurements(self) -> dict:
        (stale, _), (age, _), (stall, _) = self._resolved()
        return {
            "silence_seconds": self.silence_seconds,
            "age_seconds": self.age_seconds,
            "stalled_seconds": self.stalled_seconds,
            "stale_after": stale,
            "max_age": age,
            "stall_after": stall,
            **({"worker_gone": self.gone_proof} if self.gone_proof else {}),
        }

    def __repr__(self) -> str:
        return f"Verdict(id={self.id}, reasons={self.reasons})"


def _past(seconds: float | None, limit: float | None) -> str:
    """A measurement beside the threshold it passed, never rounded to the same figure or below it:
    "no heartbeat for 3.0s (stale_after 3s)" reads as not past it, where the silence was 3.04s."""
    text = format_duration(seconds)
    if seconds is not None and limit is not None and _read_back(text) <= limit:
        return format_duration(seconds, exact=True)
    return text


@functools.lru_cache(maxsize=1024)
def _read_back(shown: str) -> float:
    """What a shown duration reads as (``"3.0s"``: 3); infinity for one no setting could be (over a
    year, ``"<1ms"``), which no threshold is mistaken for."""
    try:
        return parse_duration(shown)
    except ConfigError:
        return float("inf")


@functools.lru_cache(maxsize=1024)
def _setting(seconds: float | None) -> str:
    """A threshold as explanations show it: the same few for a whole scan."""
    return format_duration(seconds, exact=True)


@functools.lru_cache(maxsize=1024)
def _limit(name: str, seconds: float | None, source: str) -> str:
    """The threshold part of an explanation, ``(stale_after 10m, fleet)``: the same few for a whole scan."""
    return f"({name} {_setting(seconds)}, {source})"


def isolate(item, convert, on_error):
    """``convert(item)``, or ``on_error(item, description)`` when that raises: one row never stops the others."""
    try:
        return convert(item)
    except Exception as error:  # noqa: BLE001 - whatever another tool stored, the next row still runs
        return on_error(item, f"{type(error).__name__}: {error}"[:200])


# --- the query ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What decides the text of the statement (values travel as parameters)."""

    postgres: bool
    flags: tuple[bool, bool, bool]  # a flag overrides stale_after, max_age, stall_after
    kinds: tuple[tuple[str, bool, bool, bool], ...]  # per kind: which thresholds it sets
    gone: bool
    seen_since: bool
    workers: bool
    kind_filter: bool
    targets: int
    reasons: tuple[str, ...]
    older_than: bool
    since: bool
    until: bool
    ids: bool
    after: bool
    ids_only: bool
    sort: str
    descending: bool
    limit: bool
    lock: bool


_NAMES = ("stale_after", "max_age", "stall_after")


class _Dialect:
    """The few pieces of SQL that differ between the engines.

    Every moment the statement compares with ("now minus a threshold") is computed once, in a
    one-row derived table ``c`` joined to the audits: each row then compares with a column.
    """

    def __init__(self, postgres: bool):
        self.postgres = postgres
        self.moments: dict[str, str] = {}

    def cut(self, param: str) -> str:
        """The moment ``:param`` seconds ago, computed once per statement."""
        if self.postgres:
            self.moments[param] = f"statement_timestamp() - make_interval(secs => CAST(:{param} AS double precision))"
        else:
            self.moments[param] = f"strftime('%Y-%m-%d %H:%M:%f', 'now', :{param})"
        return f"c.{param}"

    def julian_now(self) -> str:
        """SQLite: now as a julian day, computed once per statement (PostgreSQL writes statement_timestamp())."""
        self.moments["now_jd"] = "julianday('now')"
        return "c.now_jd"

    def moments_table(self) -> str:
        """The derived table of moments, for the FROM clause."""
        # Never empty: every statement has at least the future cut.
        return f"(SELECT {', '.join(f'{expression} AS {name}' for name, expression in self.moments.items())}) c"

    def running_index(self) -> str:
        """SQLite: read the partial index of running audits (without statistics, SQLite took the
        status index and sorted: twice the time at a million audits)."""
        return indexed_by(self.postgres, "ix_audits_running")

    def cut_value(self, seconds: float) -> object:
        return float(seconds) if self.postgres else f"{-float(seconds):+.6f} seconds"

    def row_cut(self, expression: str) -> str:
        """The moment ``expression`` seconds ago, for a per-row threshold."""
        if self.postgres:
            return f"(statement_timestamp() - make_interval(secs => {expression}))"
        return f"strftime('%Y-%m-%d %H:%M:%f', {self.julian_now()} - ({expression}) / 86400.0)"

    def sane(self, column: str) -> str:
        """A per-audit threshold if it is a number in (0, MAX_DURATION], else NULL (text, NaN, negative)."""
        return f"(CASE WHEN a.{column} > 0 AND a.{column} <= :max_duration THEN a.{column} END)"

    def seconds_to(self, moment: str) -> str:
        """Seconds from ``moment`` to now, as a float (NULL when moment is NULL or unreadable)."""
        if self.postgres:
            return pg_seconds_since(moment)
        return f"(({self.julian_now()} - julianday({moment})) * 86400.0)"

    def glob(self, index: int) -> str:
        return f"a.target ~ :target_{index}" if self.postgres else f"a.target GLOB :target_{index}"

    def progress(self) -> list[str]:
        """Two columns: the progress fields scan shows, as one JSON list ``[step, percentage,
        completed_tasks, total_tasks]``, when the document has the shape workers write (an object
        whose ``progress`` is an object), and the whole document as text, for Python to read as
        ``show`` does when it has another shape or may nest deeper than ``documents.MAX_DEPTH``.

        The database takes the four fields out far cheaper than Python decodes a document. On
        PostgreSQL, where a jsonb document as text costs more than the rest of the row, the
        database also checks the depth and sends the text only when it is needed. On SQLite the
        stored text costs little, and Python checks it (``documents.read_alike_by_sqlite``:
        brackets, escapes, NUL) faster than SQL can. The fields come as Python would read them
        from the whole text (on PostgreSQL both read jsonb's own rendering), with two exceptions
        auditctl never writes: a key written twice (SQLite takes the first, Python the last), and
        a number no float holds elsewhere in the document, for which Python refuses the whole
        document (``progress_not_json``) and scan still shows the fields."""
        if self.postgres:
            too_deep = (f"jsonb_path_exists(a.progress, 'strict $.**{{{documents.MAX_DEPTH} to last}} "
                        "? (@.type() == \"array\" || @.type() == \"object\")')")
            usual = f"(jsonb_typeof(a.progress -> 'progress') = 'object' AND NOT {too_deep})"
            fields = ", ".join(f"a.progress -> 'progress' -> '{name}'" for name in PROGRESS_FIELDS)
            return [f"(CASE WHEN {usual} THEN CAST(jsonb_build_array({fields}) AS text) END)",
                    f"(CASE WHEN {usual} THEN NULL ELSE CAST(a.progress AS text) END)"]
        # json_valid first: the other JSON functions fail the whole statement on malformed text.
        # A BLOB is left to Python: SQLite 3.45 and later read one as its binary JSONB.
        usual = ("(typeof(a.progress) = 'text' AND json_valid(a.progress) "
                 "AND json_type(a.progress, '$.progress') = 'object')")
        paths = ", ".join(f"'$.progress.{name}'" for name in PROGRESS_FIELDS)
        return [f"(CASE WHEN {usual} THEN json_extract(a.progress, {paths}) END)", "a.progress"]

    def trusted(self, column: str, future: str) -> str:
        """A stored time the rules may judge by: not in the future and, on PostgreSQL, one Python can
        read (a BC or -infinity time is skipped, as SQLite skips a time it cannot read)."""
        if self.postgres:
            return f"{column} BETWEEN {PG_EARLIEST} AND {future}"
        return f"{column} <= {future}"

    def time_text(self, column: str) -> str:
        """A stored time as text the verdict parses when shown (on SQLite, the stored text).

        PostgreSQL writes UTC in the canonical form whatever the session's DateStyle; a time
        Python cannot hold (infinity, BC, year 10000) comes as PostgreSQL's own text, which
        reads as unreadable. Text costs the driver far less than building a datetime per row."""
        if not self.postgres:
            return column
        return (f"(CASE WHEN {column} BETWEEN {PG_EARLIEST} AND {PG_LATEST} "
                f"THEN to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') ELSE CAST({column} AS text) END)")


@functools.lru_cache(maxsize=256)
def _statement(shape: _Shape):
    d = _Dialect(shape.postgres)
    future = d.cut("future")

    def col(name: str, slow: bool) -> str:
        # On SQLite a row whose times another tool wrote in an odd form (odd_times, kept by triggers)
        # reads them through auditctl_utc; every other row compares its canonical text directly.
        # As a BLOB: Python decodes a function's text arguments strictly, so text that is not UTF-8
        # would fail the whole statement; the function reads bytes leniently.
        return f"auditctl_utc(CAST(a.{name} AS BLOB))" if slow else f"a.{name}"

    def first_trusted(names: tuple[str, ...], slow: bool) -> str:
        """The first of the times that is present, readable and not in the future: one CASE, each
        time read once."""
        whens = " ".join(f"WHEN {d.trusted(col(n, slow), future)} THEN {col(n, slow)}" for n in names)
        return f"(CASE {whens} END)"

    def heard(slow):
        value = first_trusted(("heartbeat_at", "last_worker_update", "started_at", "created_at"), slow)
        return _at_least(value, ":seen_since", d) if shape.seen_since else value

    def changed(slow):
        value = first_trusted(("progress_changed_at", "started_at", "created_at"), slow)
        return _at_least(value, ":seen_since", d) if shape.seen_since else value

    def basis(slow):
        return first_trusted(("started_at", "created_at"), slow)

    def cut(name: str, index: int) -> str:
        """The moment past which one threshold fires, per row: flag > audit > worker > kind > fleet."""
        if shape.flags[index]:
            return d.cut(f"flag_{name}_cut")
        whens = []
        if name == "max_age":
            whens.append(f"WHEN {d.sane('max_age_seconds')} IS NOT NULL THEN {d.row_cut('a.max_age_seconds')}")
        whens.append(f"WHEN {d.sane(f'declared_{name}')} IS NOT NULL THEN {d.row_cut(f'a.declared_{name}')}")
        for position, (kind, *sets) in enumerate(shape.kinds):
            if sets[index]:
                whens.append(f"WHEN a.kind = :kind_{position} THEN {d.cut(f'kind_{position}_{name}_cut')}")
        return f"(CASE {' '.join(whens)} ELSE {d.cut(f'fleet_{name}_cut')} END)"

    stale_cut, age_cut, stall_cut = cut("stale_after", 0), cut("max_age", 1), cut("stall_after", 2)

    def per_row(expression) -> str:
        """An expression over the row's times, fast for canonical rows, through auditctl_utc for odd ones."""
        if shape.postgres:
            return expression(False)
        return f"(CASE WHEN a.odd_times THEN {expression(True)} ELSE {expression(False)} END)"

    # Never NULL (a row with no instance is not gone), so NOT gone is true for it.
    # The gone instances travel as one parameter (an array; a JSON list on SQLite), so the statement's
    # text stays the same however many there are.
    gone_set = "ANY(CAST(:gone AS text[]))" if shape.postgres else "(SELECT value FROM json_each(:gone))"
    gone = (f"a.worker_instance IS NOT NULL AND a.worker_instance {'=' if shape.postgres else 'IN'} {gone_set}"
            if shape.gone else "0 = 1")
    true = "TRUE" if shape.postgres else "1"

    def rules(slow: bool) -> dict[str, str]:
        """The four rules over one reading of the row's times (canonical or through auditctl_utc)."""
        if shape.seen_since:
            stale = f"({heard(slow)} < {stale_cut})"  # never NULL: at worst it is seen_since
        else:
            # Never heard from at all (no trustworthy time) counts as stale: the comparison is NULL.
            stale = f"COALESCE({heard(slow)} < {stale_cut}, {true})"
        unchanged = f"({changed(slow)} < {stall_cut})"
        return {
            WORKER_GONE: f"({gone})",
            STALE_HEARTBEAT: stale,
            MAX_AGE_EXCEEDED: f"({basis(slow)} < {age_cut})",
            # A stale audit, or one whose worker is gone, is never also called stalled.
            PROGRESS_STALLED: f"({unchanged} AND NOT ({gone}) AND NOT {stale})",
            "unchanged": unchanged,
        }

    def any_rule(slow: bool) -> str:
        rule = rules(slow)
        if shape.reasons:
            return "(" + " OR ".join(rule[r] for r in RULE_REASONS if r in shape.reasons) + ")"
        # (stale OR (unchanged AND NOT stale ...)) is (stale OR unchanged): each piece once, cheapest
        # first; the registry lookup last, so a row another rule already caught skips it.
        return f"({rule[MAX_AGE_EXCEEDED]} OR {rule[STALE_HEARTBEAT]} OR {rule['unchanged']} OR {rule[WORKER_GONE]})"

    where = ["a.status = 'running'"]
    if shape.ids:
        where.append("a.id IN :ids")
    if shape.after:
        where.append("a.id > :after")
    if shape.workers:
        where.append("a.worker_id IN :workers")
    if shape.kind_filter:
        where.append("a.kind IN :kinds")
    if shape.targets:
        where.append("(" + " OR ".join(d.glob(i) for i in range(shape.targets)) + ")")
    if shape.since:
        where.append(per_row(lambda slow: f"{col('created_at', slow)} >= :since"))
    if shape.until:
        where.append(per_row(lambda slow: f"{col('created_at', slow)} <= :until"))
    if shape.older_than:
        where.append(per_row(lambda slow: f"{basis(slow)} < {d.cut('older_than_cut')}"))
    where.append(per_row(any_rule))

    def flag(condition: str) -> str:
        return f"(CASE WHEN {condition} THEN 1 ELSE 0 END)"

    if shape.ids_only:
        columns = "a.id"
    else:
        # Evaluated only for the rows the WHERE kept (the stuck ones): flags and ages as floats.
        def bits(slow: bool) -> str:
            rule = rules(slow)
            bit = {reason: 1 << position for position, reason in enumerate(RULE_REASONS)}
            gone_bit, stale_bit, stall_bit = bit[WORKER_GONE], bit[STALE_HEARTBEAT], bit[PROGRESS_STALLED]
            # Stalled is "unchanged, and neither gone nor stale": nested so that the registry lookup
            # and the silence are each evaluated once per row.
            silence_and_stall = (f"(CASE WHEN {rule[WORKER_GONE]} THEN (CASE WHEN {rule[STALE_HEARTBEAT]} "
                                 f"THEN {gone_bit + stale_bit} ELSE {gone_bit} END) "
                                 f"WHEN {rule[STALE_HEARTBEAT]} THEN {stale_bit} "
                                 f"WHEN {rule['unchanged']} THEN {stall_bit} ELSE 0 END)")
            return (f"({silence_and_stall} + (CASE WHEN {rule[MAX_AGE_EXCEEDED]} THEN {bit[MAX_AGE_EXCEEDED]} ELSE 0 END) "
                    f"+ (CASE WHEN {col('heartbeat_at', slow)} > {future} THEN {_FUTURE_BIT} ELSE 0 END))")

        columns = ", ".join([
            "a.id", "a.target", "a.worker_id", "a.worker_instance", "a.lease", "a.attempts", "a.kind",
            d.time_text("a.started_at"), d.time_text("a.heartbeat_at"), *d.progress(), "a.max_age_seconds", "a.declared_stale_after",
            "a.declared_stall_after", "a.declared_max_age", per_row(bits),
            d.seconds_to(per_row(basis)), d.seconds_to(per_row(heard)), d.seconds_to(per_row(changed)),
        ])
    # Text in code point order on both engines: PostgreSQL would otherwise follow the database's
    # locale ("a A b B" under en_US, "A B a b" in SQLite), and --limit would keep other audits.
    collate = ' COLLATE "C"' if shape.postgres else ""
    order = {"id": "a.id", "age": per_row(basis), "silence": per_row(heard), "target": f"a.target{collate}",
             "worker": f"a.worker_id{collate}"}[shape.sort]
    direction = " DESC" if shape.descending else ""
    if shape.postgres and shape.sort != "id":
        # Where SQLite puts NULL (never heard from, no target): first going up, last going down.
        direction += " NULLS LAST" if shape.descending else " NULLS FIRST"
    # Older first for age and silence means the earliest moment first.
    # A list of ids (a batch being recovered) is looked up by primary key: through the partial index
    # each id is found there first and then in the table (5.0 against 3.7 ms for 500 of 40,000).
    source = "" if shape.ids else d.running_index()
    sql = (f"SELECT {columns} FROM audits a{source} CROSS JOIN {d.moments_table()} WHERE {' AND '.join(where)} "
           f"ORDER BY {order}{direction}, a.id")
    if shape.limit:
        sql += " LIMIT :limit"
    if shape.lock and shape.postgres:
        # SKIP LOCKED: a row another recoverer holds is theirs; a row a worker is writing
        # right now will be judged again on the next pass. Never wait on either.
        sql += " FOR UPDATE OF a SKIP LOCKED"
    statement = text(sql)
    expanding = [name for name, used in (("workers", shape.workers), ("kinds", shape.kind_filter), ("ids", shape.ids))
                 if used]
    if expanding:
        statement = statement.bindparams(*[bindparam(name, expanding=True) for name in expanding])
    return statement


def _at_least(value: str, floor: str, d: "_Dialect") -> str:
    """The later of a moment and ``floor`` (NULL counts as earlier than anything)."""
    if d.postgres:
        return f"GREATEST({value}, {floor})"
    return f"COALESCE(max({value}, {floor}), {floor})"


def stuck_query(connection: Connection, policy: Policy, *, gone: dict[str, str] | None = None,
                seen_since: datetime | None = None, filters: Filters | None = None, sort: str = "id",
                descending: bool = False, limit: int | None = None, after: int | None = None,
                ids_only: bool = False, lock: bool = False, **legacy_filters):
    """The statement and its parameters for one reading of the stuck audits."""
    policy = Policy.coerce(policy)
    filters = make_filters(filters, **legacy_filters)
    if sort not in SORTS:
        raise ConfigError(f"unknown sort {sort!r}: choose from {', '.join(SORTS)}")
    postgres = is_postgres(connection)
    d = _Dialect(postgres)
    flags = tuple(getattr(policy.override, name) is not None for name in _NAMES)
    kinds = tuple((kind, *(getattr(values, name) is not None for name in _NAMES)) for kind, values in policy.kinds
                  if values.any())
    held = GoneInstances.of(gone).held(connection) if gone else None
    has_gone = bool(held)
    shape = _Shape(
        postgres=postgres, flags=flags, kinds=kinds, gone=has_gone, seen_since=seen_since is not None,
        workers=bool(filters.workers), kind_filter=bool(filters.kinds), targets=len(filters.targets),
        reasons=tuple(r for r in RULE_REASONS if r in filters.reasons), older_than=filters.older_than is not None,
        since=filters.since is not None, until=filters.until is not None, ids=filters.ids is not None,
        after=after is not None, ids_only=ids_only, sort=sort, descending=descending, limit=limit is not None, lock=lock,
    )
    params: dict = {"max_duration": MAX_DURATION, "future": d.cut_value(-FUTURE_TOLERANCE)}
    for index, name in enumerate(_NAMES):
        fleet = getattr(policy.fleet, name)
        params[f"fleet_{name}"] = fleet
        params[f"fleet_{name}_cut"] = d.cut_value(fleet)
        if flags[index]:
            value = getattr(policy.override, name)
            params[f"flag_{name}"] = value
            params[f"flag_{name}_cut"] = d.cut_value(value)
    for position, (kind, *sets) in enumerate(kinds):
        params[f"kind_{position}"] = kind
        values = policy.kind(kind)
        for index, name in enumerate(_NAMES):
            if sets[index]:
                params[f"kind_{position}_{name}"] = getattr(values, name)
                params[f"kind_{position}_{name}_cut"] = d.cut_value(getattr(values, name))
    if has_gone:
        params["gone"] = held.parameter(postgres)
    if seen_since is not None:
        params["seen_since"] = seen_since if postgres else timestamps.to_storage(seen_since)
    if filters.workers:
        params["workers"] = list(filters.workers)
    if filters.kinds:
        params["kinds"] = list(filters.kinds)
    for index, pattern in enumerate(filters.targets):
        params[f"target_{index}"] = target_pattern(pattern, postgres)  # None (matches nothing) compares as NULL
    if filters.older_than is not None:
        params["older_than_cut"] = d.cut_value(filters.older_than)
    window = moments(connection, since=filters.since, until=filters.until)
    check_window(window.get("since"), window.get("until"))  # one a duration, the other a time: known only now
    for name, value in window.items():
        params[name] = value if postgres else timestamps.to_storage(value)
    if filters.ids is not None:
        params["ids"] = list(filters.ids) or [-1]
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    return _statement(shape), params


class GoneInstances(dict):
    """The gone instances (instance id -> proof) for one reading that runs several statements (the
    pages of a scan, the batches of a recovery), with their statement parameter built once: one
    JSON list on SQLite, one text[] literal on PostgreSQL. psycopg's list dumper checks each
    element with a regular expression on every execution: 1,500 instances cost about 3 ms a page.
    Read-only once used: the parameter is not built again.

    The statement takes only the instances that hold a running audit (``held``): the registry
    keeps every instance that stopped within ``GONE_RETENTION``, thousands in a day of
    restarts and nearly all holding nothing, and looking each running audit up among them was
    the costliest part of the stuck query (at a million audits on SQLite, 19 of its 101 ms with
    1,500 gone instances).
    """

    __slots__ = ("_parameters", "_held")

    def __init__(self, gone=(), *, only_holders: bool = False):
        super().__init__(gone)
        self._parameters: dict[bool, str] = {}
        self._held: GoneInstances | None = self if only_holders else None

    @classmethod
    def of(cls, gone: dict[str, str]) -> "GoneInstances":
        return gone if isinstance(gone, cls) else cls(gone)

    def held(self, connection: Connection) -> "GoneInstances":
        """Those holding a running audit, the only ones ``worker_gone`` can fire for: found once per
        reading, one probe each in the index of running audits' instances; with none, the rule
        leaves the statement. An instance that claims an audit later in the reading (one marked
        stopped whose guard is used again) is judged by the next reading: the rule never fires for
        an instance the registry did not prove gone."""
        if self._held is None:
            postgres = is_postgres(connection)
            if not self or not index_present(connection, "ix_audits_running_instance"):
                self._held = self  # a SQLite file not upgraded yet (``auditctl init``): narrow nothing
            else:
                rows = connection.execute(_held_by_running(postgres), {"gone": self.parameter(postgres)})
                holding = {row[0] for row in rows}
                self._held = GoneInstances({instance: proof for instance, proof in self.items() if instance in holding})
        return self._held

    def parameter(self, postgres: bool) -> str:
        cache = self._parameters
        if postgres not in cache:
            ids = sorted(str(instance) for instance in self)
            # Inside double quotes only a backslash and a double quote need escaping.
            cache[postgres] = ("{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in ids) + "}"
                               if postgres else json.dumps(ids))
        return cache[postgres]


@functools.lru_cache(maxsize=2)
def _held_by_running(postgres: bool):
    """Which of the gone instances (one parameter, as the stuck query takes it) hold a running audit:
    one probe per instance in the index of running audits' instances. Written as a semi-join
    from the list, both engines take that index: SQLite with or without statistics, PostgreSQL
    without planning thousands of constants (``worker_instance = ANY(...)`` spent 9 ms planning
    5,000 of them, then sometimes read every running audit instead: 37 ms against 4)."""
    listed = "unnest(CAST(:gone AS text[])) AS g(value)" if postgres else "json_each(:gone) g"
    return text(f"SELECT g.value FROM {listed} "
                "WHERE EXISTS (SELECT 1 FROM audits a WHERE a.status = 'running' AND a.worker_instance = g.value)")


def check_window_now(engine: Engine, filters: Filters) -> None:
    """Refuse (ConfigError) a ``since`` later than ``until`` when one is a duration and the other a
    time: only the database's clock can compare them. For a command that reads again and again
    (``watch``), so the refusal comes once, at the start, not as a failed pass."""
    if filters.since is None or filters.until is None:
        return
    with read_connection(engine) as connection:
        fixed = fixed_moments(connection, filters)
    check_window(fixed.since, fixed.until)


def fixed_moments(connection: Connection, filters: Filters) -> Filters:
    """``since``/``until`` given as seconds ago, turned into moments once: the batches of one
    recovery then all draw the line where its candidates were chosen."""
    if not isinstance(filters.since, (int, float)) and not isinstance(filters.until, (int, float)):
        return filters
    return replace(filters, **moments(connection, since=filters.since, until=filters.until))


# --- reading -------------------------------------------------------------------------------


def select_stuck(connection: Connection, policy: Policy, *, gone: dict[str, str] | None = None, **options) -> list[Verdict]:
    """Run the stuck query on an open connection (``lock`` takes row locks on PostgreSQL, skipping busy rows)."""
    policy = Policy.coerce(policy)
    statement, params = stuck_query(connection, policy, gone=gone, **options)
    rows = connection.execute(statement, params)
    with paused_collector():  # not while the database is waited for: the application's collector would wait too
        return [Verdict(row, policy, gone) for row in rows.all()]


def stuck_ids(connection: Connection, policy: Policy, *, gone: dict[str, str] | None = None, **options) -> list[int]:
    """Only the ids of the stuck audits (the cheap first step of a recovery)."""
    statement, params = stuck_query(connection, policy, gone=gone, ids_only=True, **options)
    return [row[0] for row in connection.execute(statement, params).all()]


def gone_instances(engine: Engine, *, holding_running: bool = False) -> dict[str, str]:
    """The worker instances the registry proves gone (instance id -> how it was proven).
    ``holding_running``: only those holding a running audit, all a reading of the stuck needs."""
    from .registry import gone_instances as registry_gone

    return GoneInstances(registry_gone(engine, holding_running=holding_running), only_holders=holding_running)


def find_stuck(engine: Engine, policy: Policy, **options) -> list[Verdict]:
    """Every stuck audit (oldest id first unless sorted otherwise)."""
    return list(iter_stuck(engine, policy, **options))


def iter_stuck(engine: Engine, policy: Policy, *, gone: dict[str, str] | None = None, sort: str = "id",
               descending: bool = False, limit: int | None = None, page_size: int = PAGE_SIZE, **options) -> Iterator[Verdict]:
    """Stream the stuck audits page by page. Each page is one short read, fetched whole before
    it is handed out, so a slow consumer (a pipe, a terminal) never holds a transaction open.

    ``gone`` None asks the registry which worker instances are provably gone.
    """
    policy = Policy.coerce(policy)
    gone = GoneInstances.of(gone_instances(engine, holding_running=True) if gone is None else gone)
    if sort != "id" or descending:
        # Another order cannot be paged by id: one read, bounded by --limit.
        with read_connection(engine) as connection:
            verdicts = select_stuck(connection, policy, gone=gone, sort=sort, descending=descending, limit=limit, **options)
        yield from verdicts
        return
    yield from keyset_pages(
        engine, lambda connection, size, after: select_stuck(connection, policy, gone=gone, limit=size, after=after, **options),
        page_size=page_size, limit=limit, key=lambda verdict: verdict.id)


def check_against_running(engine: Engine, policy: Policy, filters: Filters | None = None) -> None:
    """``Policy.check_bounds`` against the heartbeat intervals the running audits declare (raises
    ``UnsafeThreshold``). Only the intervals some stale threshold in force could fail are read:
    one seek in ``ix_audits_running_declared``, where reading them all walked every running audit."""
    policy = Policy.coerce(policy)
    policy.check_bounds(declared_intervals(engine, filters, longer_than=policy.safe_heartbeat_interval()))


def declared_intervals(engine: Engine, filters: Filters | None = None, *,
                       longer_than: float | None = None) -> list[tuple[str | None, bool, float]]:
    """Per kind of running audit: (kind, declares its own stale_after, longest declared heartbeat interval).

    What ``Policy.check_bounds`` needs to refuse a stale threshold shorter than two beats. With
    ``filters``, only the audits whose workers and kinds they name: those are the ones judged.
    ``longer_than``: only the intervals longer than that many seconds.
    """
    filters = filters or Filters()
    where = ""
    params: dict = {"max_duration": MAX_DURATION, "longer_than": 0.0 if longer_than is None else float(longer_than)}
    if filters.workers:
        where += " AND worker_id IN :workers"
        params["workers"] = list(filters.workers)
    if filters.kinds:
        where += " AND kind IN :kinds"
        params["kinds"] = list(filters.kinds)
    with read_connection(engine) as connection:
        # SQLite without statistics walked every running audit by the status index instead.
        seek = indexed_by(is_postgres(connection), "ix_audits_running_declared") \
            if index_present(connection, "ix_audits_running_declared") else ""
        sql = text("SELECT kind, CASE WHEN declared_stale_after > 0 THEN 1 ELSE 0 END, MAX(declared_heartbeat_interval) "
                   f"FROM audits{seek} WHERE status = 'running' AND declared_heartbeat_interval > :longer_than "
                   f"AND declared_heartbeat_interval <= :max_duration{where} GROUP BY 1, 2")
        sql = sql.bindparams(*[bindparam(name, expanding=True) for name in ("workers", "kinds") if name in params])
        rows = connection.execute(sql, params).all()
    return [(text_value(kind), bool(own), float_value(interval)) for kind, own, interval in rows]


__all__ = ["Filters", "GoneInstances", "Verdict", "FUTURE_TOLERANCE", "SORTS", "check_against_running", "declared_intervals", "find_stuck", "fixed_moments", "isolate", "iter_stuck",
           "select_stuck", "stuck_ids", "stuck_query", "safe_int"]
