"""Property-based tests: every parser is total, and the progress path stores only what it can read back.

auditctl reads rows other tools wrote, so each parser must answer for *any* input: a value
or its own error (ConfigError, Unreadable, NotJSON, a flagged problem), never another
exception. These tests state that, and the round trips, over generated inputs: durations,
timestamps (Python and the SQLite rules must judge the same way), stored documents, the
progress path, URLs and their masking, config files, and text made safe for a terminal.

Profiles (``HYPOTHESIS_PROFILE``): ``dev`` (the default, 100 examples a test), ``ci``
(selected by ``CI=true``: derandomized, so CI is stable) and ``thorough``, 100,000 examples
each (hours; ``--timeout=0`` lifts the suite's per-test limit)::

    HYPOTHESIS_PROFILE=thorough pytest -q tests/test_properties.py --timeout=0
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import string
import textwrap
import tomllib
import unicodedata
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, assume, example, given, reject, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

# --- profiles -------------------------------------------------------------------------------
# Registered before any @given below is decorated: each test's settings derive from the
# profile loaded here.

_CI = os.environ.get("CI") == "true"
_COMMON = {
    # A shared 2-core CI machine makes timings meaningless; examples are small anyway.
    "deadline": None,
    "derandomize": _CI,
    # Failures found on a developer's machine are replayed first next time; the database
    # lives at the repository root (ignored by git), not in each test's temporary cwd.
    "database": None if _CI else DirectoryBasedExampleDatabase(Path(__file__).resolve().parents[1] / ".hypothesis" / "examples"),
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("dev", **_COMMON)
settings.register_profile("ci", **_COMMON, print_blob=True)
# HYPOTHESIS_MAX_EXAMPLES shortens a thorough run (a trial of the command, say); unset it is 100,000.
settings.register_profile("thorough", **_COMMON, max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES") or 100_000))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _CI else "dev"))

from auditctl import documents, progress, textsafe, timestamps, urls  # noqa: E402
from auditctl.config import SETTINGS, load_config_file, validate_config  # noqa: E402
from auditctl.errors import ConfigError  # noqa: E402
from auditctl.thresholds import (  # noqa: E402
    FLAG, FLEET, KIND, MAX_DURATION, MIN_HEARTBEAT_INTERVAL, MIN_STALE_AFTER, STALE_INTERVALS, AUDIT, WORKER, Overrides, Policy, Thresholds,
    UnsafeThreshold, format_duration, parse_duration, validate_heartbeat_interval,
)
from auditctl.values import sane_duration  # noqa: E402

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

#: Text without lone surrogates: what a database, a file or a terminal can actually hold.
real_text = st.text(st.characters(blacklist_categories=("Cs",)))
huge_ints = st.sampled_from([2**53 + 1, 2**63, 2**64, 10**30, 10**400, -(10**400), 10**4000])
any_number = st.one_of(st.integers(), huge_ints, st.floats(), st.floats(-1e3, 1e3), st.decimals(allow_nan=True).map(str))
odd_values = st.one_of(st.none(), st.booleans(), any_number, st.text(max_size=20), st.binary(max_size=10),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


# --- durations ------------------------------------------------------------------------------


@st.composite
def duration_texts(draw):
    """``1h30m``, ``2.500M 4s``: what people type, with the seconds they mean."""
    parts = draw(st.lists(st.tuples(st.one_of(st.integers(0, 10**6).map(str), st.decimals(0, 10**4, places=3).map(str)),
                                    st.sampled_from(list(_UNITS))), min_size=1, max_size=4,
                           unique_by=lambda part: part[1]))  # each unit once: "10m10m" is refused as a slip
    expected = 0.0
    for number, unit in parts:
        expected += float(number) * _UNITS[unit]
    spacing = draw(st.sampled_from(["", " "]))
    text = spacing.join(number + (unit.upper() if draw(st.booleans()) else unit) for number, unit in parts)
    return text, expected


duration_values = st.one_of(
    duration_texts().map(lambda pair: pair[0]),
    odd_values,
    st.text(alphabet="0123456789.,-+_ emshdwMSHDWnaif", max_size=12),
    st.timedeltas(),
    st.floats(min_value=1e-3, max_value=MAX_DURATION),
    st.integers(-(10**6), 10**8),
)
valid_durations = st.one_of(st.floats(min_value=1e-3, max_value=MAX_DURATION), st.integers(1, int(MAX_DURATION)),
                            duration_texts().filter(lambda p: 0 < p[1] <= MAX_DURATION).map(lambda p: p[0]))


def _duration_or_error(value):
    try:
        seconds = parse_duration(value, "x")
    except ConfigError:
        return None
    assert isinstance(seconds, float) and math.isfinite(seconds) and 0 < seconds <= MAX_DURATION, (value, seconds)
    return seconds


@given(duration_values)
@example(10**400)  # an int too large for a float raised OverflowError
@example(-(10**5000))  # ... and one too large for repr() raised ValueError from the error message
@example(2**1024 - 1)  # the smallest int float() cannot take
@example("1e999")
@example("nan")
def test_parse_duration_returns_seconds_in_range_or_raises_config_error(value):
    _duration_or_error(value)


@given(duration_texts())
@example(("1H 30m", 5400.0))
def test_parse_duration_text_means_the_sum_of_its_parts(pair):
    text, expected = pair
    seconds = _duration_or_error(text)
    if 0 < expected <= MAX_DURATION:
        assert seconds == expected
    else:
        assert seconds is None


@given(st.one_of(st.none(), st.floats(), st.floats(0, 20), st.floats(0, 100_000), st.floats(0, MAX_DURATION),
                 st.integers(-(10**12), 10**12)))
@example(float("nan"))  # raised ValueError
@example(float("inf"))  # raised OverflowError
@example(math.nextafter(0.9995, 0))  # shown as 1e+03ms
@example(0.0005)
def test_format_duration_is_short_text_and_reads_back_close_to_the_value(seconds):
    text = format_duration(seconds)
    assert isinstance(text, str) and text
    if seconds is None or not math.isfinite(seconds) or not 0.05 <= seconds <= MAX_DURATION:
        return
    # Coarser units drop finer ones: seconds past ten minutes, minutes past a day.
    tolerance = 0.05 if seconds < 10 else 0.5 if seconds < 600 else 60.5 if seconds < 86400 else 3600.5
    assert abs(parse_duration(text) - seconds) <= tolerance * (1 + 1e-9), text


@given(st.one_of(st.none(), duration_values), st.one_of(st.none(), duration_values), st.one_of(st.none(), duration_values))
def test_thresholds_parse_validates_or_raises_config_error(stale_after, max_age, stall_after):
    try:
        values = Thresholds.parse(stale_after, max_age, stall_after)
    except ConfigError:
        return
    for name in ("stale_after", "max_age", "stall_after"):
        assert 0 < getattr(values, name) <= MAX_DURATION
    assert values.stale_after <= values.max_age and values.stall_after <= values.max_age
    values.validate()


@given(st.one_of(st.none(), duration_values), st.one_of(st.none(), duration_values), st.one_of(st.none(), duration_values))
def test_overrides_parse_keeps_what_is_set_or_raises_config_error(stale_after, max_age, stall_after):
    try:
        values = Overrides.parse(stale_after, max_age, stall_after, where="kind x")
    except ConfigError:
        return
    for name, given_value in (("stale_after", stale_after), ("max_age", max_age), ("stall_after", stall_after)):
        value = getattr(values, name)
        assert (value is None) == (given_value is None)
        assert value is None or value == parse_duration(given_value)


@given(st.one_of(duration_values, st.floats(0.1, 100)),
       st.one_of(st.floats(MIN_STALE_AFTER, 200), st.floats(MIN_STALE_AFTER, MAX_DURATION)))
def test_heartbeat_interval_is_accepted_only_when_stale_after_holds_two_beats(interval, stale_after):
    try:
        accepted = validate_heartbeat_interval(interval, stale_after)
    except ConfigError:
        seconds = _duration_or_error(interval)
        assert seconds is None or seconds < MIN_HEARTBEAT_INTERVAL or stale_after < 2 * seconds
        return
    assert accepted == parse_duration(interval) and stale_after >= 2 * accepted


optional_seconds = st.one_of(st.none(), st.floats(1e-3, 30), st.sampled_from([0.5, 1.0, 2.0, 10.0, 600.0]),
                             st.floats(1e-3, MAX_DURATION))
overrides = st.builds(Overrides, optional_seconds, optional_seconds, optional_seconds)


def _agreeing_policy(fleet, override, kinds):
    """Policy.of refuses a kind whose own thresholds contradict the others in force for its audits."""
    try:
        return Policy.of(fleet, override, kinds)
    except ConfigError:
        reject()


policies = st.builds(
    _agreeing_policy,
    fleet=st.builds(Thresholds, st.floats(1e-3, 600), st.floats(600, MAX_DURATION), st.floats(1e-3, 600)),
    override=overrides,
    kinds=st.dictionaries(st.sampled_from(["scan", "full-scan", "quick"]), overrides, max_size=3),
)


@given(policies, st.sampled_from(["stale_after", "max_age", "stall_after"]), optional_seconds, optional_seconds,
       st.sampled_from([None, "scan", "full-scan", "other"]))
def test_policy_resolve_takes_the_first_set_in_precedence_order(policy, name, audit, worker, kind):
    value, source = policy.resolve(name, audit=audit, worker=worker, kind=kind)
    kind_values = policy.kind(kind)
    candidates = [(getattr(policy.override, name), FLAG), (audit, AUDIT), (worker, WORKER),
                  (getattr(kind_values, name) if kind_values else None, f"{KIND} {kind}"),
                  (getattr(policy.fleet, name), FLEET)]
    assert (value, source) == next((v, s) for v, s in candidates if v is not None)


stored_thresholds = st.one_of(optional_seconds, st.floats(allow_nan=True), st.integers(-5, 10**6), st.text(max_size=3),
                              st.binary(max_size=3))


@given(policies, st.lists(st.tuples(st.sampled_from([None, "scan", "full-scan", "other"]), stored_thresholds, stored_thresholds,
                                    stored_thresholds, stored_thresholds), min_size=1, max_size=6))
def test_policy_resolves_each_audit_as_resolve_does_however_often_it_is_asked(policy, audits):
    """resolve_audit remembers its answers: asked again, or for another audit, it must answer as resolve does."""
    for kind, audit_max_age, stale, max_age, stall in audits + audits:
        assert policy.resolve_audit(kind, audit_max_age, stale, max_age, stall) == (
            policy.resolve("stale_after", worker=sane_duration(stale), kind=kind),
            policy.resolve("max_age", audit=sane_duration(audit_max_age), worker=sane_duration(max_age), kind=kind),
            policy.resolve("stall_after", worker=sane_duration(stall), kind=kind))


def test_a_policy_remembers_a_bounded_number_of_audits():
    """A long watch over audits that each carry their own max_age must not grow without bound."""
    policy = Policy()
    for seconds in range(1, 10_000):
        assert policy.resolve_audit(None, float(seconds), None, None, None)[1] == (float(seconds), AUDIT)
    assert len(policy._memo) <= 4096


@given(policies, st.lists(st.tuples(st.sampled_from([None, "scan", "quick"]), st.booleans(),
                                    st.one_of(st.none(), st.floats(-1, 20), st.floats(-1, 4000), st.just(math.nan))), max_size=4),
       st.booleans())
# Between one and two intervals: refused (a healthy audit can look stale between two beats).
@example(Policy.of(Thresholds(30.0, 1800.0, 600.0), Overrides(None, None, None), {}), [(None, False, 20.0)], False)
@example(Policy.of(Thresholds(600.0, 1800.0, 600.0), Overrides(45.0, None, None), {}), [("scan", True, 30.0)], False)
def test_policy_check_bounds_refuses_exactly_the_unsafe_stale_thresholds(policy, groups, allow_unsafe):
    # The flag replaces the fleet's and every kind's value: only what is in force is checked.
    in_force = ([policy.override.stale_after] if policy.override.stale_after is not None
                else [policy.fleet.stale_after] + [o.stale_after for _, o in policy.kinds])
    unsafe = any(v is not None and v < MIN_STALE_AFTER for v in in_force)
    for kind, declares_own, interval in groups:
        if interval is None or not interval > 0:
            continue
        value = policy.override.stale_after
        if value is None and not declares_own:
            kind_values = policy.kind(kind)
            value = kind_values.stale_after if kind_values and kind_values.stale_after is not None else policy.fleet.stale_after
        unsafe = unsafe or (value is not None and value < STALE_INTERVALS * interval)
    try:
        policy.check_bounds(groups, allow_unsafe=allow_unsafe)
    except UnsafeThreshold:
        assert unsafe and not allow_unsafe
    else:
        assert allow_unsafe or not unsafe


@given(policies, st.lists(st.tuples(st.sampled_from([None, "scan", "quick", "other"]), st.booleans(),
                                    st.one_of(st.floats(0, 20), st.floats(0, 4000), st.floats(0, 1e6))), max_size=5))
@example(Policy.of(Thresholds(600.0, 1800.0, 600.0), Overrides(None, None, None), {"scan": Overrides(30.0, None, None)}),
         [("scan", False, 16.0), ("other", False, 16.0)])
# A library caller's NaN fleet threshold refuses nothing; the kind's 30 s must still be checked.
@example(Policy.of(Thresholds(math.nan, 1800.0, 600.0), Overrides(None, None, None), {"scan": Overrides(30.0, None, None)}),
         [("scan", False, 20.0)])
def test_checking_only_the_intervals_longer_than_the_safe_one_decides_as_checking_them_all(policy, groups):
    """``check_against_running`` reads only the declared intervals above ``safe_heartbeat_interval``:
    whatever the flag, fleet and kinds, that must refuse exactly what reading them all refuses."""
    def refused(checked):
        try:
            policy.check_bounds(checked)
        except UnsafeThreshold as error:
            return str(error)
        return None

    safe = policy.safe_heartbeat_interval()
    longer = [group for group in groups if group[2] > safe]
    if refused([]) is None:  # the floors alone decide first, whatever is read
        assert (refused(groups) is None) == (refused(longer) is None)


# --- timestamps -----------------------------------------------------------------------------

CANONICAL = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}", re.ASCII)


@st.composite
def iso_like_texts(draw):
    """Times as other tools write them: extended or basic ISO 8601, any precision, separator
    and offset, comma decimals, padding; with out-of-range fields and the calendar's edges."""
    year = draw(st.one_of(st.sampled_from([0, 1, 2, 999, 1000, 1970, 2024, 9998, 9999]), st.integers(0, 9999)))
    month = draw(st.one_of(st.sampled_from([1, 12]), st.integers(0, 13)))
    day = draw(st.one_of(st.sampled_from([1, 28, 29, 30, 31]), st.integers(0, 32)))
    basic = draw(st.booleans())
    if draw(st.integers(0, 15)) == 0:
        text = f"{year:04d}-W{draw(st.integers(0, 54)):02d}-{draw(st.integers(0, 8))}"  # ISO week date
    else:
        text = f"{year:04d}{month:02d}{day:02d}" if basic else f"{year:04d}-{month:02d}-{day:02d}"
    if draw(st.integers(0, 5)):
        text += draw(st.sampled_from(["T", " ", "t", "_", "T", " "]))
        hour = draw(st.one_of(st.sampled_from([0, 23]), st.integers(0, 25)))
        minute, second = draw(st.integers(0, 60)), draw(st.integers(0, 61))
        colon = "" if basic and draw(st.booleans()) else ":"
        precision = draw(st.sampled_from(["h", "hm", "hms", "hmsf", "hmsf", "hmsf"]))
        text += f"{hour:02d}"
        if precision != "h":
            text += f"{colon}{minute:02d}"
        if precision in ("hms", "hmsf"):
            text += f"{colon}{second:02d}"
        if precision == "hmsf":
            digits = draw(st.integers(1, 9))
            text += draw(st.sampled_from([".", ".", ","])) + "".join(draw(st.lists(st.sampled_from("0123456789"),
                                                                                  min_size=digits, max_size=digits)))
        offset = draw(st.sampled_from(["", "", "Z", "z", "+HH", "+HHMM", "+HH:MM", "+HH:MM", "+HH:MM:SS", "+HH:MM:SS.f"]))
        if offset.startswith("+"):
            sign = draw(st.sampled_from("+-"))
            oh, om, os_ = draw(st.one_of(st.sampled_from([0, 14, 23]), st.integers(0, 24))), draw(st.integers(0, 59)), \
                draw(st.integers(0, 59))
            offset = (offset.replace("+", sign).replace("HH", f"{oh:02d}").replace("MM", f"{om:02d}")
                      .replace("SS", f"{os_:02d}").replace(".f", f".{draw(st.integers(0, 999999)):06d}"))
        text += offset
    padding = draw(st.sampled_from(["", "", "", " ", "\t", "\n"]))
    return padding + text + padding


# Offsets in whole seconds: Python 3.11's fromisoformat drops an offset's microseconds
# (``+00:00:00.000001`` reads as +00:00), so a datetime with one does not survive isoformat().
aware_datetimes = st.datetimes(timezones=st.builds(timezone, st.integers(-86399, 86399).map(lambda s: timedelta(seconds=s))))
any_datetimes = st.one_of(st.datetimes(), aware_datetimes)
time_texts = st.one_of(iso_like_texts(), aware_datetimes.map(lambda d: d.isoformat(sep="T" if d.microsecond % 2 else " ")),
                       st.text(alphabet="0123456789-:T .,+Z", max_size=32), st.text(max_size=70))


def _check_reading(moment, text):
    assert moment is None or isinstance(moment, (datetime, timestamps.Unreadable)), moment
    if isinstance(moment, datetime):
        assert moment.utcoffset() == timedelta(0), (text, moment)


@given(st.one_of(time_texts, time_texts.map(lambda t: t.encode()), st.binary(max_size=30), any_datetimes, odd_values))
@example("0001-01-01T00:00:00+01:00")  # before year 1 in UTC
@example("9999-12-31T23:59:59.999999-00:01")  # after year 9999 in UTC
@example("2024-01-02T03:04:05,123+0000")
def test_timestamp_parse_never_raises_and_returns_utc_unreadable_or_none(value):
    _check_reading(timestamps.parse(value), value)


@given(st.one_of(time_texts, any_datetimes, st.binary(max_size=30)))
@example("2024-01-02 03:04:05.123456")
@example("  20240102T030405+01  ")
def test_canonical_is_none_or_26_chars_that_parse_to_the_same_moment(value):
    text = timestamps.canonical(value)
    moment = timestamps.parse(value)
    assert (text is None) == (not isinstance(moment, datetime))
    if text is not None:
        assert CANONICAL.fullmatch(text), text
        assert timestamps.parse(text) == moment
        assert timestamps.canonical(text) == text
        assert timestamps.to_storage(value) == text


@given(st.tuples(st.integers(0, 9999), st.integers(0, 19), st.integers(0, 39), st.integers(0, 29), st.integers(0, 59),
                 st.integers(0, 59), st.one_of(st.text(alphabet="0123456789", min_size=6, max_size=6),
                                               st.text(alphabet="0123456789+-:Zz.,T ", min_size=6, max_size=6))))
@example((2024, 1, 2, 3, 4, 5, "123456"))
@example((2024, 1, 2, 3, 4, 5, "1-0500"))
@example((2024, 1, 2, 3, 4, 5, "12345Z"))
@example((2024, 2, 30, 3, 4, 5, "123456"))
def test_text_shaped_like_the_canonical_form_reads_as_any_other_text(parts):
    """parse reads 26-character canonical-looking text in one step; the same text with a leading
    space goes the general way. Both must give the same reading, for a time or for anything else."""
    year, month, day, hour, minute, second, tail = parts
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}.{tail}"
    assert len(text) == 26
    assert timestamps.parse(text) == timestamps.parse(" " + text)


@given(st.one_of(st.tuples(
    st.integers(0, 9999), st.integers(0, 19), st.integers(0, 39), st.integers(0, 29), st.integers(0, 59),
    st.integers(0, 59), st.text(alphabet="0123456789", min_size=6, max_size=6)).map(
    lambda p: f"{p[0]:04d}-{p[1]:02d}-{p[2]:02d} {p[3]:02d}:{p[4]:02d}:{p[5]:02d}.{p[6]}"),
    st.text(alphabet="0123456789-: .,TWZ+", min_size=26, max_size=26)))
@example("2024-01-02 03:04:05.123456")
@example("2024-W01-2 03:04:05.123456")
@example("2024-01-02 24:00:00.000000")
def test_iso_of_stored_text_is_the_iso_of_its_reading(text):
    """iso and isoformat_z rewrite canonical text in place instead of going through a datetime: same answer."""
    assert timestamps.iso(text) == timestamps.iso(timestamps.parse(text))
    assert timestamps.isoformat_z(text) == timestamps.isoformat_z(timestamps.parse(text))


@given(any_datetimes, any_datetimes)
def test_canonical_texts_sort_in_time_order(first, second):
    a, b = timestamps.parse(first), timestamps.parse(second)
    assume(isinstance(a, datetime) and isinstance(b, datetime))
    ca, cb = timestamps.canonical(first), timestamps.canonical(second)
    assert (ca < cb) == (a < b) and (ca == cb) == (a == b)


@given(any_datetimes)
def test_a_time_in_any_zone_is_written_as_its_utc_moment(value):
    """The writer takes any datetime (not only parse's UTC ones): a zone of seconds (+00:00:30) leaves no trace."""
    moment = timestamps.parse(value)
    assume(isinstance(moment, datetime))  # out of range in UTC: unreadable, never written
    text = timestamps._format(value)
    assert len(text) == 26 and timestamps.parse(text) == moment, (value, text)


@given(any_datetimes)
def test_times_round_trip_through_every_written_form(value):
    moment = timestamps.parse(value)
    _check_reading(moment, value)
    if not isinstance(moment, datetime):
        assert timestamps.iso(value) is None and timestamps.isoformat_z(value) is None and timestamps.to_storage(value) is None
        return
    assert timestamps.parse(timestamps.iso(value)) == moment
    assert timestamps.parse(timestamps.to_storage(value)) == moment
    assert timestamps.parse(value.isoformat()) == moment
    assert timestamps.parse(timestamps.isoformat_z(value)) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    assert timestamps.iso(value).endswith("Z") and len(timestamps.iso(value)) == 27


@pytest.fixture(scope="module")
def sqlite_reading():
    """Reads one value as the SQLite rules do, on a connection configured as the library configures
    every one (``auditctl_utc`` registered): (reading, odd, seconds since the epoch)."""
    from auditctl.db import create_engine

    sql = _sql_reading()
    engine = create_engine("sqlite://", allow_memory=True)
    raw = engine.raw_connection()
    connection = raw.driver_connection
    yield lambda value: connection.execute(sql, (value,)).fetchone()
    raw.close()
    engine.dispose()


def _sql_reading() -> str:
    """How the stuck query reads a stored time on SQLite: the odd_times check of migration 0002 (kept
    by triggers), then the column itself or, for odd rows, auditctl_utc of it (rules.py ``time``);
    and the instant julianday() takes it for (``sqlfunctions.seconds_since``)."""
    odd = importlib.import_module("auditctl.migrations.versions.0002_detection_and_alerts").odd_time("v", "t")
    reading = f"CASE WHEN {odd} THEN auditctl_utc(t.v) ELSE t.v END"
    return f"SELECT {reading}, {odd}, (julianday({reading}) - 2440587.5) * 86400.0 FROM (SELECT ? AS v) AS t"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

def _canonical_shape(fields) -> str:
    year, month, day, hour, minute, second, micro = fields
    return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}.{micro:06d}"


sql_time_values = st.one_of(
    iso_like_texts(),
    # Canonical-looking text, valid or not (Feb 30, hour 24, year 0, .9999995 rounding up).
    st.tuples(st.integers(0, 9999), st.integers(0, 19), st.integers(0, 39), st.integers(0, 29), st.integers(0, 59),
              st.integers(0, 59), st.integers(0, 999999)).map(_canonical_shape),
    aware_datetimes.map(timestamps.canonical),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.text(alphabet="0123456789-:T .", max_size=30),
    iso_like_texts().map(str.encode),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)


#: Canonical-looking text of a time that does not exist: Python finds each unreadable, and so must
#: migration 0002's odd_time (SQLite's strftime returns a day past the end of its month, or hour 24,
#: unchanged when it has no modifier, and NULL for month 13 or hour 25: the check handles both).
_IMPOSSIBLE = ["2024-02-30 00:00:00.000000", "2023-02-29 10:00:00.000000", "2024-04-31 12:00:00.000000",
               "2024-01-01 24:00:00.000000", "2024-13-01 00:00:00.000000", "2024-00-10 00:00:00.000000",
               "2024-01-32 00:00:00.000000", "0001-00-00 00:00:00.000000", "2024-01-01 25:00:00.000000"]


def _impossible_canonical(value) -> bool:
    """Text of that known, open case: shaped like the canonical form, from year 1 on, and unreadable."""
    return (isinstance(value, str) and CANONICAL.fullmatch(value) is not None and value >= "0001"
            and timestamps.canonical(value) is None)


@given(sql_time_values)
@example("0000-01-01 00:00:00.000000")
@example("2024-01-01 00:00:59.999900")
@example("2024-01-01 00:00:00.000000\x00junk")
@example("0001-01-01 00:00:00.000000")
@example("9999-12-31 23:59:59.999999")
def test_sqlite_rules_and_python_read_every_stored_time_the_same_way(sqlite_reading, value):
    reading, odd, seconds = sqlite_reading(value)
    expected = timestamps.canonical(value)
    if expected is None:
        assert reading is None, (value, reading)
        return
    assert isinstance(reading, str)
    # SQLite's GLOB and strftime stop at a NUL, and so does Python's fromisoformat: text after
    # one is ignored by both (and sorts after the same time without it).
    assert reading.split("\x00", 1)[0] == expected, (value, reading, odd)
    assert not odd or reading == expected
    moment = timestamps.parse(value)
    if seconds is None:
        # julianday() works in milliseconds: the last half millisecond of year 9999 rounds out of its range.
        assert moment >= datetime(9999, 12, 31, 23, 59, 59, 999500, tzinfo=timezone.utc), value
        return
    assert abs(seconds - (moment - _EPOCH).total_seconds()) < 0.001, (value, seconds, moment)


@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)))
@example(datetime(2026, 11, 30, 1, 58, 45, 926957))
@example(datetime(2024, 12, 31, 23, 59, 59, 999999))
def test_every_time_in_the_canonical_form_takes_the_fast_path_on_sqlite(sqlite_reading, moment):
    """What the library writes is never odd: the stuck query reads it as plain text, no Python call per row.
    (SQLite's date functions keep milliseconds: a check that rounded would send half the rows to the slow path.)"""
    value = timestamps.canonical(moment)
    reading, odd, _ = sqlite_reading(value)
    assert not odd and reading == value, (value, odd)


@given(st.tuples(st.integers(1, 9999), st.integers(0, 19), st.integers(0, 39), st.integers(0, 29), st.integers(0, 59),
                 st.integers(0, 59), st.integers(0, 999999)).map(_canonical_shape))
@example(_IMPOSSIBLE[0])
@example(_IMPOSSIBLE[4])
@example(_IMPOSSIBLE[8])
def test_sqlite_rules_flag_canonical_looking_text_of_a_time_that_does_not_exist(sqlite_reading, value):
    assume(_impossible_canonical(value))
    reading, odd, _ = sqlite_reading(value)
    assert odd and reading is None, (value, reading, odd)


# --- documents ------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))


def arrays_and_objects(keys, size: int):
    """``extend`` for st.recursive: lists and objects of what is inside (a named function, so hypothesis
    can see that it uses its argument)."""
    def extend(children):
        return st.one_of(st.lists(children, max_size=size), st.dictionaries(keys, children, max_size=size))
    return extend


json_values = st.recursive(json_scalars, arrays_and_objects(st.text(max_size=8), 4), max_leaves=20)


class Nested:
    """A value nested ``depth`` levels deep, built in the test: hypothesis's printer recurses on the value itself."""

    def __init__(self, depth: int, kind: str = "list"):
        self.depth, self.kind = depth, kind

    def __repr__(self) -> str:
        return f"Nested({self.depth}, {self.kind!r})"

    def build(self):
        value = 1
        for _ in range(self.depth):
            value = [value] if self.kind == "list" else {"a": value}
        return value


def built(value):
    return value.build() if isinstance(value, Nested) else value


depths = st.one_of(st.integers(0, 80), st.sampled_from([63, 64, 65, 1000, 5000]))
nested_values = st.builds(Nested, depths, st.sampled_from(["list", "dict"]))
nested_texts = depths.flatmap(lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))
document_texts = st.one_of(
    json_values.map(json.dumps),
    nested_texts,
    st.sampled_from(["NaN", "Infinity", "-Infinity", '{"percentage": NaN}', "1e400", '{"p": -1e999}', "1" * 5000,
                     '{"completed_tasks": ' + "9" * 400 + "}", "", "{", "null", '"text"']),
    st.text(max_size=40),
    st.text(alphabet='[]{}",:0123456789.eE-+ntrufalsNIiy', max_size=40),
)


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


@given(st.one_of(document_texts, document_texts.map(str.encode), st.binary(max_size=40), nested_values, json_values,
                 st.none(), st.builds(documents.NotJSON, st.text())))
@example(Nested(5000))  # a driver's deeply nested value: repr() raised RecursionError
@example("1e400")  # a float too large: was loaded as inf, which no JSON output can hold
def test_documents_load_never_raises_and_gives_strict_shallow_json_or_not_json(raw):
    value = documents.load(built(raw))
    if value is None or isinstance(value, documents.NotJSON):
        assert value is None or value.problem in ("not_json", "too_deep")
        assert isinstance(documents.dumps(value), str)
        return
    assert not documents.depth_exceeds(value)
    assert _strict_json(json.dumps(value, allow_nan=False)) == value
    assert _strict_json(documents.dumps(value)) == value


def _outcome(decode, text):
    try:
        return "value", decode(text)
    except ValueError:
        return "refused", None
    except RecursionError:
        return "too deep", None


@given(st.one_of(document_texts, st.text(alphabet='[]{}",:0123456789 .eE-+ntrufals', max_size=40).map(lambda t: f"[{t}]"),
                 st.text(alphabet='[]{}",:0123456789 .eE-+ntrufals', max_size=40).map(lambda t: f"{{{t}}}")))
@example("[1] [2]")
@example("[1]]")
@example("{}{}")
@example('["a", 1e400]')
@example(" [1]")
@example("[1] ")
def test_the_decoders_shortcut_accepts_and_refuses_exactly_what_the_decoder_does(text):
    assert _outcome(documents._decode, text) == _outcome(documents._DECODER.decode, text)


@given(json_values)
def test_documents_load_reads_json_text_back_exactly(value):
    assert documents.load(json.dumps(value)) == value
    assert documents.load(json.dumps(value).encode()) == value


python_values = st.recursive(
    st.one_of(json_scalars, st.floats(), huge_ints, st.binary(max_size=5), any_datetimes, st.sets(st.integers(), max_size=2),
              st.builds(timestamps.Unreadable, st.text(max_size=5))),
    lambda children: st.one_of(st.lists(children, max_size=3), st.tuples(children),
                               st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), children, max_size=3)),
    max_leaves=12,
)


@given(st.one_of(python_values, nested_values))
@example(Nested(5000))  # raised RecursionError
@example({"count": 10**5000})  # an int too long for str() raised ValueError
def test_dumps_and_dumps_strict_never_raise_and_give_strict_json(value):
    value = built(value)
    _strict_json(documents.dumps(value))
    _strict_json(documents.dumps(value, indent=2, ensure_ascii=False))
    _strict_json(documents.dumps_strict(value))
    if not isinstance(value, int) or -(2**63) <= value < 2**64:  # a column's integer
        _strict_json(json.dumps(documents.strict_value(value), allow_nan=False))


@given(json_values)
def test_dumps_strict_keeps_json_values_exactly(value):
    assert _strict_json(documents.dumps_strict(value)) == value
    assert documents.strict_value(value) == value


# --- progress -------------------------------------------------------------------------------

steps = st.one_of(st.none(), st.text(max_size=30), st.text(min_size=190, max_size=600), st.integers(),
                  st.sampled_from(["a\x00b", "\ud800", "x" * 501, "\U0001f600" * 300]))
counts = st.one_of(st.none(), st.integers(-5, 200), st.integers(0, 2**53 + 2), huge_ints, st.floats(), st.booleans(),
                   st.text(max_size=5), st.floats(0, 1e6).map(float.__floor__).map(float))
percentages = st.one_of(st.none(), any_number, st.floats(-50, 150), st.booleans(), st.text(max_size=5))


def _check_view_bounds(view):
    assert view.step is None or (isinstance(view.step, str) and len(view.step) <= progress.MAX_STEP)
    assert view.percentage is None or (isinstance(view.percentage, float) and 0.0 <= view.percentage <= 100.0)
    for count in (view.completed_tasks, view.total_tasks):
        assert count is None or (type(count) is int and 0 <= count <= progress.MAX_COUNT)
    if view.completed_tasks is not None and view.total_tasks is not None:
        assert view.completed_tasks <= view.total_tasks
    assert all(isinstance(problem, str) for problem in view.problems)


def _stored(fields):
    _, text = progress.build_document(**fields, is_running=True, now=datetime(2024, 1, 2, tzinfo=timezone.utc),
                                      worker_id="worker-1", worker_url="http://worker-1:8000/")
    # What both engines can store: PostgreSQL's jsonb refuses \u0000 and unpaired surrogates.
    assert "\\u0000" not in text
    json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    return text


@given(steps, percentages, counts, counts)
@example("a\x00b", 10, None, None)  # a NUL in the step made PostgreSQL refuse the whole report
@example("\ud800", None, None, None)  # ... and so did a lone surrogate
@example("x" * 300, None, None, None)  # a 300-character step was read back cut to 200
@example(None, None, 30, 20)
@example(None, 10**400, 2**53, 2**53 + 1)
def test_a_cleaned_report_is_stored_and_read_back_exactly_without_problems(step, percentage, completed, total):
    fields, changed = progress.clean_report(step, percentage, completed, total)
    assert all(isinstance(c, str) for c in changed)
    _check_view_bounds(progress.ProgressView(**fields))
    view = progress.read_progress(documents.load(_stored(fields)))
    assert view.problems == []
    assert (view.step, view.completed_tasks, view.total_tasks) == (
        fields["step"], fields["completed_tasks"], fields["total_tasks"])
    expected = fields["percentage"]
    if expected is None:
        expected = progress.derive_percentage(None, fields["completed_tasks"], fields["total_tasks"])
    assert view.percentage == expected
    # With the percentage following the counts (as the worker stores it), everything reads back as stored.
    fields["percentage"] = expected
    again = progress.read_progress(documents.load(_stored(fields)))
    assert (again.step, again.percentage, again.completed_tasks, again.total_tasks, again.problems) == (
        fields["step"], fields["percentage"], fields["completed_tasks"], fields["total_tasks"], [])


progress_fields = st.fixed_dictionaries({}, optional={
    "step": st.one_of(json_values, st.text(max_size=600)), "percentage": st.one_of(json_values, any_number.filter(
        lambda v: not isinstance(v, float) or math.isfinite(v))), "completed_tasks": st.one_of(json_values, counts),
    "total_tasks": st.one_of(json_values, counts)}).map(
    lambda d: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()})
stored_progress = st.one_of(
    progress_fields.map(lambda f: {"progress": f, "last_worker_update": "x"}),
    progress_fields,
    json_values,
    st.builds(lambda f, extra: {"progress": {**extra, **f}}, progress_fields, st.dictionaries(st.text(max_size=5), json_values)),
)


@given(st.one_of(stored_progress.map(lambda doc: json.dumps(doc)), document_texts, st.binary(max_size=30)))
@example('{"progress": {"completed_tasks": 30, "total_tasks": 20}}')
@example('{"progress": {"percentage": 1e400}}')
@example('{"progress": {"step": "s", "percentage": 50.0, "completed_tasks": 30, "total_tasks": 20}}')
@example('{"progress": {"step": "%s", "percentage": 50.0, "completed_tasks": 1, "total_tasks": 2}}' % ("x" * 600))
def test_read_progress_of_any_stored_text_never_raises_and_stays_in_bounds(text):
    _check_view_bounds(progress.read_progress(documents.load(text)))


@given(st.one_of(stored_progress, nested_values, odd_values))
def test_read_progress_of_any_decoded_value_never_raises_and_stays_in_bounds(document):
    _check_view_bounds(progress.read_progress(built(document)))


# --- the stuck query's progress fields ---------------------------------------------------------

#: Stored documents whose reading by the query and by Python could differ, if either were wrong.
_STUCK_EXAMPLES = [
    '{"progress": "x"}', '{"progress": null}', '{"progress": {}}', "[]", "{}",
    '{"progress": {"step": "s", "percentage": 1e400}}',
    '{"progress": {"completed_tasks": true, "total_tasks": 1.0}}',
    '{"progress": {"step": %s}}' % ("[" * 70 + "]" * 70),
    # nested too deep beside the fields, and just not; brackets in text that nest nothing
    '{"progress": {"step": "s"}, "x": %s}' % ("[" * 64 + "]" * 64),
    '{"progress": {"step": "s"}, "x": %s}' % ("[" * 63 + "]" * 63),
    '{"progress": {"step": "s", "x": {"y": %s}}}' % ("[" * 62 + "]" * 62),
    '{"progress": {"step": "s", "x": {"y": %s}}}' % ("[" * 61 + "]" * 61),
    '{"progress": {"step": "[[[[", "percentage": 5.0}, "n": "%s"}' % ("{" * 80),
    # numbers past what a double or a bigint holds, and in unusual forms, come as written
    '{"progress": {"completed_tasks": 100000000000000000000000000000, "total_tasks": 1e400, "percentage": 1e-400, '
    '"step": 1E+2}}',
    '{"progress": {"completed_tasks": 9223372036854775808, "total_tasks": -9223372036854775809, "percentage": -0.0}}',
    '{"progress": {"completed_tasks": 12.50e1, "total_tasks": 2e2, "percentage": 1E1}}',
    # escapes: SQLite looks a key up as written, Python decodes it first; text after a NUL
    '{"progress": {"st\\u0065p": "hello", "percent\\u0061ge": 5.0}}',
    '{"progress": {"step": "s"}, "progr\\u0065ss": "x"}',
    '{"progress": {"step": "a \\"quoted\\" step", "total_tasks": 3}}',
    '{"progress": {"step": "s"}}\x00garbage',
    b'{"progress": {"step": "a BLOB", "total_tasks": 2}}',
    b'{"progress": {"step": "not UTF-8 \xff"}}',
]
_stuck_documents = st.one_of(stored_progress.map(json.dumps), document_texts, st.binary(max_size=30),
                             st.sampled_from(_STUCK_EXAMPLES))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents_stored=st.lists(_stuck_documents, min_size=1, max_size=20))
@example(documents_stored=_STUCK_EXAMPLES)
def test_scan_reads_the_progress_fields_as_the_whole_document_reads(engine, documents_stored):
    """The stuck query hands over only the four fields of a usual document: what scan shows from
    them (step, percentage, counts, problems) is what reading the whole stored document gives.
    (Not generated: a key written twice, which SQLite reads first-wins and Python last-wins, and
    a number no float holds beside the fields: see the next test.)"""
    from dbtools import make_running
    from sqlalchemy import text as sql

    from auditctl.sqlfunctions import is_postgres
    from auditctl.transactions import write_transaction
    from auditctl.rules import find_stuck

    postgres = is_postgres(engine)
    with write_transaction(engine) as connection:
        connection.execute(sql("DELETE FROM audits"))
    ids = make_running(engine, len(documents_stored))
    for audit_id, document in zip(ids, documents_stored):
        try:
            with write_transaction(engine) as connection:
                connection.execute(sql("UPDATE audits SET progress = " + ("CAST(:d AS jsonb)" if postgres else ":d")
                                       + " WHERE id = :i"), {"d": document, "i": audit_id})
        except Exception:  # noqa: BLE001 - what PostgreSQL's jsonb refuses (NaN, \u0000, not JSON) stays as it was
            assert postgres
    with engine.connect() as connection:
        stored = dict(connection.execute(sql("SELECT id, " + ("CAST(progress AS text)" if postgres else "progress")
                                             + " FROM audits")).all())
    verdicts = find_stuck(engine, Thresholds(stale_after=60, max_age=3600, stall_after=60))
    assert sorted(v.id for v in verdicts) == sorted(ids)
    for verdict in verdicts:
        whole = progress.read_progress(documents.load(stored[verdict.id]))
        shown = verdict.progress
        assert (shown.step, shown.percentage, shown.completed_tasks, shown.total_tasks, shown.problems) == (
            whole.step, whole.percentage, whole.completed_tasks, whole.total_tasks, whole.problems), stored[verdict.id]


@pytest.mark.parametrize("number", ["1e400", "1" + "0" * 5000], ids=["past a float", "5001 digits"])
def test_scan_shows_the_fields_of_a_document_holding_elsewhere_a_number_python_cannot(engine, number):
    """The one documented difference with reading the whole document (``show``), which refuses
    it: the four fields are still shown, and the document is not called broken."""
    from dbtools import make_running
    from sqlalchemy import text as sql

    from auditctl.sqlfunctions import is_postgres
    from auditctl.transactions import write_transaction
    from auditctl.rules import find_stuck

    (audit_id,) = make_running(engine, 1)
    document = '{"progress": {"step": "Crawling", "total_tasks": 4}, "x": %s}' % number
    with write_transaction(engine) as connection:
        connection.execute(sql("UPDATE audits SET progress = " + ("CAST(:d AS jsonb)" if is_postgres(engine) else ":d")
                               + " WHERE id = :i"), {"d": document, "i": audit_id})
    assert progress.read_progress(documents.load(document)).problems == ["progress_not_json"]
    (verdict,) = find_stuck(engine, Thresholds(stale_after=60, max_age=3600, stall_after=60))
    assert (verdict.step, verdict.progress.total_tasks, verdict.problems) == ("Crawling", 4, [])


@given(percentages, counts, counts)
def test_derive_percentage_is_none_or_between_0_and_100(percentage, completed, total):
    value = progress.derive_percentage(percentage, completed, total)
    assert value is None or 0.0 <= value <= 100.0


@pytest.mark.parametrize("completed, total", [(0, 0), (5, 5), (progress.MAX_COUNT, progress.MAX_COUNT)])
def test_clean_report_changes_nothing_when_completed_equals_total_up_to_max_count(completed, total):
    fields, changed = progress.clean_report("Crawling", None, completed, total)
    assert changed == []
    assert (fields["completed_tasks"], fields["total_tasks"]) == (completed, total)
    view = progress.read_progress(documents.load(_stored(fields)))
    assert (view.completed_tasks, view.total_tasks, view.problems) == (completed, total, [])


def test_build_document_accepts_a_document_when_it_is_exactly_max_document_bytes():
    def build(padding):
        return progress.build_document(step="s", percentage=1.0, completed_tasks=None, total_tasks=None, is_running=True,
                                       now=datetime(2024, 1, 2, tzinfo=timezone.utc), worker_id="w", worker_url=None,
                                       extra={"pad": "x" * padding})

    _, small = build(0)
    exact = progress.MAX_DOCUMENT_BYTES - len(small.encode("utf-8"))
    _, text = build(exact)
    assert len(text.encode("utf-8")) == progress.MAX_DOCUMENT_BYTES
    with pytest.raises(progress.DocumentError):
        build(exact + 1)


def test_read_progress_clamps_a_float_percentage_over_100_when_every_other_field_is_as_auditctl_writes_it():
    view = progress.read_progress({"progress": {"step": "s", "percentage": 250.0, "completed_tasks": 1, "total_tasks": 2}})
    assert (view.percentage, view.problems) == (100.0, ["percentage_out_of_range"])


@pytest.mark.parametrize("length, shown", [(200, "x" * 200), (201, "x" * 200 + "…")])
def test_read_progress_shows_text_that_is_not_json_whole_when_it_is_at_most_200_characters(length, shown):
    view = progress.read_progress(b"x" * length)
    assert (view.document, view.problems) == (shown, ["progress_not_json"])


def test_read_progress_derives_no_percentage_from_the_counts_when_the_stored_percentage_is_invalid():
    view = progress.read_progress({"progress": {"step": "s", "percentage": "half", "completed_tasks": 1, "total_tasks": 2}})
    assert (view.percentage, view.completed_tasks, view.total_tasks) == (None, 1, 2)
    assert view.problems == ["percentage_invalid"]


# --- URLs -----------------------------------------------------------------------------------

passwords = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=16),
    st.text(alphabet="@:/?#&%=+ ;ab1*", min_size=1, max_size=12),
    st.text(alphabet=string.ascii_letters + string.digits, min_size=4, max_size=16),
)
_label = st.builds(lambda first, rest: first + rest, st.sampled_from(string.ascii_lowercase),
                   st.text(string.ascii_lowercase + string.digits + "-", max_size=8))
hosts = st.lists(_label, min_size=1, max_size=3).map(".".join)
users = st.sampled_from(["", "auditctl", "app.user", "u-1"])
ports = st.sampled_from(["", ":5432", ":6543"])
databases = st.builds(lambda first, rest: first + rest, st.sampled_from(string.ascii_lowercase),
                      st.text(string.ascii_lowercase + string.digits + "_", max_size=8))

#: How users type a password: (form, how the password appears in the URL, the URL with a placeholder).
URL_FORMS = {
    "raw": (lambda p: p, "postgresql://{user}:{pw}@{host}{port}/{db}"),
    "encoded": (lambda p: quote(p, safe=""), "postgresql+psycopg://{user}:{pw}@{host}{port}/{db}?sslmode=require"),
    "query": (lambda p: p, "postgresql://{user}@{host}{port}/{db}?password={pw}"),
    "query-encoded": (lambda p: quote_plus(p), "postgresql://{user}@{host}{port}/{db}?application_name=x&password={pw}"),
    "sslpassword": (lambda p: quote(p, safe=""), "postgresql://{user}@{host}{port}/{db}?sslmode=verify-full&sslpassword={pw}"),
    "sslpassword-raw": (lambda p: p, "postgresql://{user}@{host}{port}/{db}?sslpassword={pw}"),
}


@given(st.sampled_from(sorted(URL_FORMS)), passwords, users, hosts, ports, databases)
@example("raw", "p@ss word", "auditctl", "db", ":5432", "audits")
@example("raw", "a@b:c/d?e#f", "auditctl", "db", "", "audits")
@example("query", "a@b", "auditctl", "db", ":5432", "audits")
@example("sslpassword-raw", "s3cret pass", "auditctl", "db", "", "audits")
def test_mask_url_never_shows_the_password_and_keeps_the_rest(form, password, user, host, port, db):
    encode, template = URL_FORMS[form]
    typed = encode(password)
    # A raw '&' ends a query parameter for every URL parser: such a password must be %-encoded there.
    assume(form in ("raw", "encoded") or "&" not in typed)
    url = template.format(user=user, pw=typed, host=host, port=port, db=db)
    expected = template.format(user=user, pw=urls.MASK, host=host, port=port, db=db)
    # A password that is also part of the rest of the URL (``a`` in host ``db.a``) cannot be hidden.
    assume(password not in expected and typed not in expected)
    masked = urls.mask_url(url)
    assert password not in masked and typed not in masked, masked
    assert urls.mask_url(masked) == masked
    if "*" not in typed:
        # Masking may hide more than the password, never less: whatever it shows is text of the URL around it.
        around = expected.split(urls.MASK)
        assert all(any(piece in whole for whole in around) for piece in masked.split(urls.MASK)), masked
    if "@" not in typed:
        assert f"{host}{port}/{db}" in masked, masked
        assert masked == expected
    message = f"connection to {url} failed: FATAL: password authentication failed (password was {password!s}; {typed})"
    # What a perfect scrub leaves; a password that is part of it (``*;`` beside a mask) cannot be hidden.
    perfect = f"connection to {expected} failed: FATAL: password authentication failed (password was {urls.MASK}; {urls.MASK})"
    assume(password not in perfect and typed not in perfect)
    scrubbed = urls.scrub(message, url)
    assert password not in scrubbed and typed not in scrubbed, scrubbed


@given(passwords, hosts, databases)
def test_mask_url_hides_the_password_of_a_sqlalchemy_url(password, host, db):
    from sqlalchemy.engine import URL

    url = URL.create("postgresql+psycopg", username="auditctl", password=password, host=host, database=db)
    assume(password not in f"postgresql+psycopg://auditctl:{urls.MASK}@{host}/{db}")
    assert password not in urls.mask_url(url)
    # A password that is part of what a perfect scrub leaves (``f`` in "failed") cannot be hidden.
    assume(password not in f"failed for {urls.MASK}")
    assert password not in urls.scrub(f"failed for {password}", url)


@given(st.one_of(st.text(max_size=80), st.text(alphabet="ab:/@?#&=% ;password", max_size=60),
                 st.builds(lambda p, h: f"see postgresql://u:{p}@{h}/db and ?token={p}", passwords, hosts)))
def test_mask_url_is_idempotent_and_never_raises(text):
    masked = urls.mask_url(text)
    assert urls.mask_url(masked) == masked
    assert isinstance(urls.scrub(text, text), str)


@given(st.sampled_from(["https", "http"]), hosts, st.text(alphabet=string.ascii_letters + string.digits + "/_-", min_size=8),
       st.sampled_from(["", "?token=abc", "#frag"]),
       st.one_of(st.sampled_from(["", "user@"]), passwords.map(lambda p: f"user:{p}@")))
@example("https", "hooks.example.com", "T000/B000/XXXX", "", "user:pa/ss@")  # showed https://user:pa/***
def test_mask_webhook_shows_scheme_and_host_only(scheme, host, secret, query, userinfo):
    url = f"{scheme}://{userinfo}{host}/services/{secret}{query}"
    expected = f"{scheme}://{host}/{urls.MASK}"
    password = userinfo[len("user:"):-1] if userinfo.startswith("user:") else None
    assume(secret not in expected and (password is None or password not in expected))
    masked = urls.mask_webhook(url)
    if not any(c in userinfo for c in "/?#\\"):
        assert masked == expected
    else:  # a password holding '/' (or '\\', a browser's '/') may leave the host unknowable: then it is masked too
        assert masked in (expected, f"{scheme}://{urls.MASK}/{urls.MASK}")
    assert secret not in masked and (password is None or password not in masked)


@example("https", "hooks.example.com:8443", "/", "hook/v1@SECRETTOKEN/x")  # showed https://SECRETTOKEN/***
@example("http", "127.0.0.1:18765", "/", "hooks/team:ops@SECRETTOKEN/x")
@example("https", "hooks.slack.com", "\\", "services\\T0SECRET\\xoxbSECRETTOKEN")  # showed the whole URL
@given(st.sampled_from(["https", "http"]), hosts, st.sampled_from(["/", "\\"]),
       st.text(alphabet=string.ascii_letters + string.digits + "/_-@:\\", min_size=1, max_size=40))
def test_mask_webhook_shows_the_host_or_nothing_never_the_path(scheme, host, separator, path):
    masked = urls.mask_webhook(f"{scheme}://{host}{separator}{path}")
    assert masked in (f"{scheme}://{host}/{urls.MASK}", f"{scheme}://{urls.MASK}/{urls.MASK}")


@pytest.mark.parametrize("body", ["aB3" * 400_000, "x://a:b@" * 150_000, "@h " * 400_000],
                         ids=["a-run-of-letters", "urls-and-ats", "many-ats"])
def test_mask_url_reads_a_megabyte_message_once_not_once_per_character(body, tmp_path):
    """A driver's error or a worker's exception may carry a response body: masking it must end.
    In a process of its own: a regular expression holds the interpreter's lock while it runs."""
    import subprocess
    import sys

    source = tmp_path / "message.txt"
    source.write_text(f"postgresql://bob:s3cret@db/x {body}")
    script = "import sys; from auditctl.urls import mask_url; print(mask_url(open(sys.argv[1]).read())[:40])"
    # A run of letters took 14 s at 200 KB, quadratic in its length; this is 1.2 MB.
    done = subprocess.run([sys.executable, "-c", script, str(source)], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("postgresql://bob:***@"), done.stderr


@given(st.one_of(st.none(), st.text(max_size=40)))
def test_mask_webhook_never_raises(url):
    assert isinstance(urls.mask_webhook(url), str)


# --- config files ---------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    return '"' + "".join(c if c not in '"\\' and ord(c) >= 0x20 and c != "\x7f" else f"\\u{ord(c):04x}" for c in text) + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else {"nan": "nan"}.get(
            repr(value), "inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # dates and datetimes


def toml_text(data: dict) -> str:
    return "".join(f"{_toml_string(key)} = {_toml_value(value)}\n" for key, value in data.items())


toml_keys = st.one_of(st.sampled_from(list(SETTINGS) + ["kinds", "auditctl", "stale_after", "max_age", "stall_after"]),
                      st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
toml_scalars = st.one_of(st.integers(), st.integers(-(10**30), 10**30), st.floats(), st.booleans(),
                         real_text.filter(lambda s: len(s) < 30), st.dates(), st.datetimes(), valid_durations,
                         st.sampled_from(["", "  ", "sqlite:///x.db", "10m"]))
toml_values = st.recursive(toml_scalars, arrays_and_objects(toml_keys, 3), max_leaves=10)
toml_documents = st.dictionaries(toml_keys, toml_values, max_size=5)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("config")


def _load_text(directory, text) -> dict | None:
    path = directory / "config.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        values, where = load_config_file(path)
    except ConfigError:
        return None
    assert where == path
    return values


@given(toml_documents)
def test_validate_config_of_any_parsed_toml_returns_settings_or_raises_config_error(data):
    try:
        validate_config(tomllib.loads(toml_text(data)), "config.toml")
    except ConfigError:
        pass


@given(st.one_of(toml_documents.map(toml_text), st.text(max_size=60), st.binary(max_size=40),
                 st.text(alphabet='[]{}=".,abc123\n ', max_size=60)))
@example("a = " + "[" * 5000 + "]" * 5000)  # tomllib raised RecursionError
@example("stale_after = " + "9" * 5000)  # ... and ValueError for an int with more than 4300 digits
@example(b"\xff\xfe")
def test_load_config_file_loads_or_raises_config_error(config_dir, text):
    _load_text(config_dir, text)


valid_settings = st.fixed_dictionaries({}, optional={
    "database_url": st.sampled_from(["sqlite:///audits.db", "postgresql://auditctl@db/audits"]),
    "stale_after": valid_durations, "max_age": valid_durations, "stall_after": valid_durations,
    "interval": valid_durations, "refresh": valid_durations,
    "max_attempts": st.integers(1, 10**6), "max_resets": st.integers(0, 10**6),
    "slack_webhook": st.one_of(st.just(" https://hooks.slack.com/services/T/B/x "), st.lists(
        st.sampled_from(["https://a.example/x", "https://b.example/y "]), max_size=3)),
    "kinds": st.dictionaries(st.text(string.ascii_lowercase + "-", min_size=1, max_size=8), st.fixed_dictionaries(
        {}, optional={"stale_after": valid_durations, "max_age": valid_durations, "stall_after": valid_durations}
    ).filter(lambda section: _within_max_age(section)), max_size=3),
})


def _within_max_age(section: dict) -> bool:
    """A kind whose own stale_after or stall_after outlasts its own max_age is refused (not valid)."""
    if "max_age" not in section:
        return True
    limit = parse_duration(section["max_age"])
    return all(parse_duration(section[name]) <= limit for name in ("stale_after", "stall_after") if name in section)


@given(valid_settings, st.booleans())
def test_valid_settings_round_trip_through_a_config_file(config_dir, data, wrapped):
    text = toml_text({"auditctl": data} if wrapped else data)
    values = _load_text(config_dir, text)
    assert values is not None and set(values) == set(data)
    for key, value in data.items():
        kind = "kinds" if key == "kinds" else SETTINGS[key].kind
        if kind == "duration":
            assert parse_duration(values[key]) == parse_duration(value)
        elif kind == "urls":
            assert values[key] == [u.strip() for u in (value if isinstance(value, list) else [value])]
        elif kind == "kinds":
            assert values[key] == {name: Overrides.parse(**section) for name, section in value.items()}
        else:
            assert values[key] == value


# --- text made safe -------------------------------------------------------------------------

BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
LINE_SEPARATORS = set("\u2028\u2029")  # an editor or a TOML reader breaks a line at them
hostile_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["\x1b]0;title\x07", "\x1b[2J", "\x1b]8;;http://x\x1b\\", "\x9b", "\u202e", "\u061c", "\u2066",
                              "\u200b", "\ufeff", "\u2028", "\u2029", "\u00ad", "\u180e", "\ufff9", "\U000e0041",
                              "\U0001d173", "\u034f", "\u3164", "\ufe0f", "\U000e0100", "=", "+", "-", "@", "\t", "\r", "\n",
                              "a", " "]), max_size=8).map("".join),
    st.lists(st.sampled_from(["\x1b]0;title\x07", "\x1b[2J", "\x9b1m", "\u202e", "\u061c", "=cmd()", "@SUM(A1)", "-1+1",
                              "\t", "\r\n", "ok"]), max_size=6).map("".join),
)


#: Characters drawn as nothing that are not format controls (Unicode's other default-ignorables): a grapheme
#: joiner, Hangul fillers, Khmer inherent vowels, variation selectors, and the code points kept for more of them.
IGNORABLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\ufff0-\ufff8"
                       "\U000e0000-\U000e0fff]")

#: Format characters that are drawn (prepended concatenation marks: an Arabic number sign and the like).
DRAWN_FORMAT = set("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")


def _visible(text: str, keep_newlines: bool) -> bool:
    allowed = {"\n", "\t"} if keep_newlines else set()
    return not any((unicodedata.category(c) == "Cc" and c not in allowed) or c in BIDI_CONTROLS or c in LINE_SEPARATORS
                   or (unicodedata.category(c) == "Cf" and c not in DRAWN_FORMAT) or IGNORABLE.match(c) for c in text)


@given(hostile_text, st.booleans())
@example("\u061cabc", False)  # the Arabic letter mark, a bidi control, was passed through
@example("kind \u2028ls", False)  # a line separator in a TOML comment (report --format toml) was passed through
@example("https://a.example\U000e0020\U000e0049\U000e0047", False)  # tag characters spelling hidden text
@example("pay\u00adments\u180e\ufff9", True)  # a soft hyphen, a Mongolian vowel separator, an annotation anchor
@example("worker-1\u3164\ufe0f", False)  # a Hangul filler and a variation selector: "worker-1" to the eye
def test_printable_leaves_no_control_or_bidi_characters(text, keep_newlines):
    shown = textsafe.printable(text, keep_newlines=keep_newlines)
    assert _visible(shown, keep_newlines), ascii(shown)
    if _visible(text, keep_newlines) and not re.search("[\u200b-\u200d\u2060-\u2065\ufeff]", text):
        assert shown == text


@given(hostile_text)
def test_csv_cells_never_start_a_formula(text):
    cell = textsafe.csv_cell(text)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n"))
    assert _visible(cell, keep_newlines=True)


@given(hostile_text)
@example("costs $5 and $6")  # GitHub renders text between two dollar signs as math
def test_markdown_cells_are_printable_text_with_every_special_escaped(text):
    cell = textsafe.markdown_cell(text)
    assert re.sub(r"\\(.)", r"\1", cell) == textsafe.printable(text)
    assert not set(re.sub(r"\\[\\`*_~\[\]<>|&$]", "", cell)) & set("\\`*_~[]<>|&$")


def test_markdown_cells_show_underscores_and_tildes_instead_of_emphasis_or_strikethrough():
    """A step named ``__init__`` or a target with ``~~`` would render bold or struck through in a
    Markdown table: each ``_`` and ``~`` from the database is escaped."""
    assert textsafe.markdown_cell("__init__ ~~old~~ _x_") == r"\_\_init\_\_ \~\~old\~\~ \_x\_"


@given(st.recursive(st.one_of(json_scalars, hostile_text), arrays_and_objects(hostile_text, 3), max_leaves=10),
       st.sampled_from([None, 2]))
@example("\U000e0049\U000e0047 hidden", None)  # beyond the BMP: escaped as a surrogate pair, the same value
def test_json_safe_text_keeps_the_same_json_value(value, indent):
    text = textsafe.json_safe_text(json.dumps(value, ensure_ascii=False, indent=indent))
    assert json.loads(text) == value
    assert _visible(text, keep_newlines=True) and not re.search("[\u200b-\u200f\u2060-\u2069\ufeff]", text)


@given(st.one_of(hostile_text.filter(str.isascii), st.text(alphabet=st.sampled_from(list("ab -.,\t")), max_size=60)),
       st.integers(1, 80), st.sampled_from(["", "    "]))
@example("why: ", 20, "     ")  # a label with nothing after it
@example("  indented but short  ", 40, "")
def test_the_table_wraps_ascii_exactly_as_textwrap_does(text, width, indent):
    from auditctl.cli.render import wrap

    assert wrap(text, width, subsequent_indent=indent) == textwrap.wrap(text, width, subsequent_indent=indent)


@given(st.text(alphabet=st.sampled_from(list("ab \u00a0\u3000-\u2014.,\u00e9\t错误日本語😀")), min_size=1, max_size=80),
       st.integers(2, 80), st.sampled_from(["", "    "]))
@example("error: " + "错误" * 35, 60, "       ")  # a label, then Chinese without spaces: 148 cells on one line
def test_the_table_wraps_other_text_by_terminal_cells_keeping_every_word(text, width, indent):
    from rich.cells import cell_len

    from auditctl.cli.render import wrap

    lines = wrap(text, width, subsequent_indent=indent)
    assert all(cell_len(line) <= max(width, cell_len(indent) + 2) for line in lines), lines
    assert "".join(line.removeprefix(indent) if n else line for n, line in enumerate(lines)).replace(" ", "") == \
        "".join(text.split())


@given(st.text(alphabet=st.sampled_from(list("ab /-._ 错😀")), max_size=80), st.integers(1, 80))
@example("file /tmp/rev/cli-play/k.toml", 18)
def test_a_folded_cell_keeps_every_character_fits_its_width_and_breaks_only_at_spaces_or_after_a_slash(text, width):
    from rich.cells import cell_len

    from auditctl.cli.render import fold

    lines = fold(text, width)
    assert all(cell_len(line) <= max(width, 2) for line in lines), lines
    assert "".join(lines).replace(" ", "") == "".join(text.split())
    for line, after in zip(lines, lines[1:]):
        whole = not line.endswith("/") and cell_len(line) + 1 + cell_len(after.split(" ")[0]) > width
        assert line.endswith("/") or whole or cell_len(line) >= width - 1, (lines, width)


def test_a_label_before_chinese_text_keeps_the_start_of_the_text_on_its_line():
    from auditctl.cli.render import wrap

    first, *rest = wrap("error: " + "错误" * 35, 60, subsequent_indent=" " * 7)
    assert first == "error: " + "错误" * 13 and all(line.startswith(" " * 7 + "错") for line in rest)


@given(st.one_of(st.floats(min_value=1e-3, max_value=MAX_DURATION), st.integers(1, int(MAX_DURATION)),
                 st.integers(1, int(MAX_DURATION) * 1000).map(lambda ms: ms / 1000)))
@example(600.4)
@example(86399.6)
@example(0.9996)
@example(600.0004)  # "10m" once: "stale_after (10m) is longer than max_age (10m)"
@example(1.0000001)
@example(1000000.0004)
@example(3326951.8536)
def test_a_threshold_shown_exactly_reads_back_as_the_same_value(seconds):
    """``config`` and the explanations show a setting exactly: what they show is what is in force."""
    shown = format_duration(seconds, exact=True)
    assert parse_duration(shown) == seconds, shown


@given(st.integers(0, int(MAX_DURATION)), st.booleans())
@example(1, True)  # "below the floor of 1.0s" where help and flags say 1s
@example(5, True)  # config's notify_timeout "5.0s"
@example(5, False)  # report's "heartbeat every 5.0s"
def test_whole_seconds_show_without_a_decimal_when_a_duration_is_whole(seconds, exact):
    shown = format_duration(seconds, exact=exact)
    assert ".0s" not in shown, shown
    assert format_duration(float(seconds), exact=exact) == shown


@given(st.floats(min_value=1.0, max_value=MAX_DURATION - 86400), st.floats(min_value=1e-6, max_value=1.0))
@example(3.0, 0.04)  # "no heartbeat for 3.0s (stale_after 3s)": the silence was 3.04s
@example(620.0, 9.0)  # "running for 10m (max_age 10m20s)": it ran 10m29s
def test_an_explanation_never_shows_a_measurement_at_or_below_the_threshold_it_passed(limit, over):
    from auditctl.rules import _past

    measured = limit + over
    if measured == limit:
        return
    assert parse_duration(_past(measured, limit)) > limit


def test_a_document_that_is_not_json_keeps_exactly_its_first_200_characters_and_marks_a_cut():
    from auditctl.documents import KEPT_TEXT, NotJSON, load

    whole = load("x" * KEPT_TEXT)
    cut = load("y" * (KEPT_TEXT + 1))
    assert isinstance(whole, NotJSON) and str(whole) == "x" * KEPT_TEXT
    assert isinstance(cut, NotJSON) and str(cut) == "y" * KEPT_TEXT + "…"


def test_a_lone_surrogate_escaped_in_a_document_reads_as_a_replacement_character_a_pair_as_its_character():
    from auditctl.documents import load

    assert load('{"step": "scan \\ud800 now", "\\udfff": ["\\ud83d\\ude00"]}') == {"step": "scan \ufffd now",
                                                                                   "\ufffd": ["\U0001f600"]}


def test_a_shown_document_exactly_at_the_limit_is_shown_whole():
    from auditctl.documents import dumps, shown

    value = {"step": "x" * 100}
    text = dumps(value, indent=2, ensure_ascii=False)
    assert shown(value, limit=len(text)) == text
    assert shown(value, limit=len(text) - 1).startswith(text[:-1] + "\n… (1 more characters not shown")


def test_a_row_too_wide_takes_width_from_the_columns_that_give_it_up_first_then_from_the_widest():
    from auditctl.cli.render import Column, plan_layout

    rows = [{"a": "a" * 20, "b": "b" * 20}]
    keep, give = Column("a", "A"), Column("b", "B", shrink=1)
    layout, _texts = plan_layout(rows, [keep, give], 35)
    assert layout.widths == [20, 13]  # 35 less the gap: all 7 from the column that gives up width first

    rows = [{"a": "a" * 30, "b": "b" * 15}]
    layout, _texts = plan_layout(rows, [Column("a", "A"), Column("b", "B")], 40)
    assert layout.widths == [23, 15]  # from the widest, not the narrowest


def test_a_detail_line_is_left_out_for_a_value_that_is_not_there():
    from auditctl.cli.render import Column, layout_lines, plan_layout

    rows = [{"target": "t" * 60, "why": None}, {"target": "u" * 60, "why": "stale"}]
    columns = [Column("target", "TARGET"), Column("why", "WHY", detail=True)]
    layout, texts = plan_layout(rows, columns, 40)
    lines = ["".join(text for text, _style in segments).strip() for segments, _header in layout_lines(layout, texts, rows)]
    assert [line for line in lines if line.startswith("why:")] == ["why: stale"], lines


def test_a_detail_line_on_the_narrowest_screen_still_wraps_at_20_characters():
    from auditctl.cli.render import Column, layout_lines, plan_layout

    rows = [{"id": "1234567890", "target": "t" * 30, "why": "no heartbeat for 17 minutes while running"}]
    columns = [Column("id", "ID", fit="whole"), Column("target", "TARGET"), Column("why", "WHY", detail=True)]
    layout, texts = plan_layout(rows, columns, 20)
    lines = ["".join(text for text, _style in segments) for segments, _header in layout_lines(layout, texts, rows)]
    detail = [line.strip() for line in lines[2:]]
    assert detail == ["why: no heartbeat", "for 17 minutes", "while running"], lines


def test_a_whole_column_keeps_its_width_however_narrow_the_screen():
    from auditctl.cli.render import Column, plan_layout

    rows = [{"id": "12345678901234567890", "target": "t" * 40}]
    layout, _texts = plan_layout(rows, [Column("id", "ID", fit="whole", min_width=2), Column("target", "TARGET")], 30)
    assert layout.widths == [20, 8]  # the target gives up all it may; the id is never cut
