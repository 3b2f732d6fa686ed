"""The three stuck rules, each at its boundary, judged by the database's clock."""

import pytest
from sqlalchemy import text, update

from auditctl.errors import ConfigError
from auditctl.rules import find_stuck
from auditctl.schema import audits
from auditctl.thresholds import Thresholds
from auditctl.transactions import write_transaction

T = Thresholds(stale_after=600, max_age=1800, stall_after=300)


def reasons_of(engine, thresholds=T, **filters):
    return {v.id: v.reasons for v in find_stuck(engine, thresholds, **filters)}


def test_fresh_running_audit_is_not_stuck(engine, start_audit):
    start_audit()
    assert reasons_of(engine) == {}


@pytest.mark.parametrize("silence, stuck", [(590, False), (610, True)])
def test_stale_heartbeat_fires_only_past_stale_after(engine, start_audit, backdate, silence, stuck):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=silence, heartbeat_at=silence, last_worker_update=silence, progress_changed_at=silence)
    patient_about_progress = Thresholds(stale_after=600, max_age=1800, stall_after=1200)
    assert reasons_of(engine, patient_about_progress) == ({audit_id: ["stale_heartbeat"]} if stuck else {})


@pytest.mark.parametrize("age, stuck", [(1790, False), (1810, True)])
def test_max_age_fires_only_past_max_age(engine, start_audit, backdate, age, stuck):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=age, heartbeat_at=1, last_worker_update=1, progress_changed_at=1)
    assert reasons_of(engine) == ({audit_id: ["max_age_exceeded"]} if stuck else {})


@pytest.mark.parametrize("unchanged, stuck", [(290, False), (310, True)])
def test_progress_stalled_fires_only_past_stall_after_with_fresh_heartbeats(engine, start_audit, backdate, unchanged, stuck):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=unchanged, heartbeat_at=5, last_worker_update=5, progress_changed_at=unchanged)
    assert reasons_of(engine) == ({audit_id: ["progress_stalled"]} if stuck else {})


def test_a_silence_just_past_its_threshold_is_never_shown_as_the_same_figure(engine, start_audit, backdate):
    """"no heartbeat for 10m (stale_after 10m)" read as not past it: the silence was 10m0.05s."""
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=600.02, heartbeat_at=600.02, last_worker_update=600.02, progress_changed_at=1)
    (verdict,) = find_stuck(engine, T)
    (sentence,) = verdict.explain()
    assert sentence.startswith("no heartbeat for 10m0.") and sentence.endswith("s (stale_after 10m, fleet)"), sentence


def test_stale_audit_is_never_also_called_stalled(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    assert reasons_of(engine) == {audit_id: ["stale_heartbeat"]}


def test_several_reasons_at_once(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=4000, heartbeat_at=700, last_worker_update=700, progress_changed_at=4000)
    assert reasons_of(engine) == {audit_id: ["stale_heartbeat", "max_age_exceeded"]}
    alive_but_frozen, _ = start_audit()
    backdate(alive_but_frozen, started_at=4000, heartbeat_at=5, last_worker_update=5, progress_changed_at=4000)
    assert reasons_of(engine)[alive_but_frozen] == ["max_age_exceeded", "progress_stalled"]


def test_a_gone_workers_audit_keeps_its_other_reasons_but_is_never_also_called_stalled(engine, start_audit, backdate):
    gone = {"gone-1": "stopped cleanly at 12:00"}
    silent, _ = start_audit(instance_id="gone-1")
    backdate(silent, started_at=4000, heartbeat_at=700, last_worker_update=700, progress_changed_at=4000)
    frozen, _ = start_audit(instance_id="gone-1")
    backdate(frozen, started_at=400, heartbeat_at=5, last_worker_update=5, progress_changed_at=400)
    fresh, _ = start_audit(instance_id="gone-1")
    alive_elsewhere, _ = start_audit(instance_id="alive-1")
    backdate(alive_elsewhere, started_at=400, heartbeat_at=5, last_worker_update=5, progress_changed_at=400)
    assert {v.id: v.reasons for v in find_stuck(engine, T, gone=gone)} == {
        silent: ["worker_gone", "stale_heartbeat", "max_age_exceeded"],
        frozen: ["worker_gone"],
        fresh: ["worker_gone"],
        alive_elsewhere: ["progress_stalled"],
    }


def test_per_audit_deadline_overrides_fleet_max_age(engine, start_audit, backdate):
    deep_scan, _ = start_audit(max_age=7200)
    quick_scan, _ = start_audit()
    for audit_id in (deep_scan, quick_scan):
        backdate(audit_id, started_at=3600, heartbeat_at=1, last_worker_update=1, progress_changed_at=1)
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert list(verdicts) == [quick_scan]
    backdate(deep_scan, started_at=7300)
    verdicts = {v.id: v for v in find_stuck(engine, T)}
    assert verdicts[deep_scan].reasons == ["max_age_exceeded"]
    assert verdicts[deep_scan].max_age_seconds == 7200


def test_verdict_says_which_rule_and_measured_age(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=720, heartbeat_at=720, last_worker_update=720, progress_changed_at=720)
    (verdict,) = find_stuck(engine, T)
    assert 719 < verdict.silence_seconds < 730
    assert verdict.explain() == ["no heartbeat for 12m (stale_after 10m, fleet)"]


def test_progress_means_step_counts_or_percentage_changed(engine, guards, backdate):
    guard = guards(stale_after=600, max_age=1800, stall_after=300, heartbeat_interval=60)
    audit_id = guard.create_audit("https://example.com")
    with guard.run(audit_id) as run:
        run.update_progress(step="Crawling", completed_tasks=1, total_tasks=4)
        backdate(audit_id, progress_changed_at=400)
        run.update_progress(step="Crawling", completed_tasks=1, total_tasks=4)  # a heartbeat, not progress
        assert reasons_of(guard.engine) == {audit_id: ["progress_stalled"]}
        run.update_progress(completed_tasks=2)  # counts moved: progress
        assert reasons_of(guard.engine) == {}
        backdate(audit_id, progress_changed_at=400)
        run.update_progress(step="Scanning")  # step moved: progress
        assert reasons_of(guard.engine) == {}
        assert run.document["progress"]["percentage"] == 50.0  # derived from the counts


def test_future_heartbeat_is_not_trusted_and_is_flagged(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=900, heartbeat_at=-3600, last_worker_update=-3600, progress_changed_at=-3600)
    (verdict,) = find_stuck(engine, T)
    assert verdict.reasons == ["stale_heartbeat"]
    assert "heartbeat_in_future" in verdict.problems


def test_seen_since_keeps_an_outage_from_counting_as_silence(engine, start_audit, backdate):
    from auditctl.sqlfunctions import fetch_now
    from auditctl.transactions import read_connection

    audit_id, _ = start_audit()
    backdate(audit_id, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    with read_connection(engine) as connection:
        just_now = fetch_now(connection)
    assert reasons_of(engine, seen_since=just_now) == {}
    assert reasons_of(engine) == {audit_id: ["stale_heartbeat"]}


def test_filters_by_worker_reason_and_age(engine, start_audit, backdate):
    stale, _ = start_audit(worker_id="a")
    backdate(stale, started_at=700, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    old, _ = start_audit(worker_id="b")
    backdate(old, started_at=4000, heartbeat_at=1, last_worker_update=1, progress_changed_at=1)
    assert list(reasons_of(engine, worker="a")) == [stale]
    assert list(reasons_of(engine, reason="max_age_exceeded")) == [old]
    assert list(reasons_of(engine, older_than=1000)) == [old]
    with pytest.raises(ConfigError, match="unknown reason"):
        reasons_of(engine, reason="nonsense' OR 1=1 --")


def test_only_running_audits_are_judged(engine, start_audit, backdate):
    audit_id, _ = start_audit()
    backdate(audit_id, started_at=4000, heartbeat_at=4000, last_worker_update=4000, progress_changed_at=4000)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == audit_id).values(status="completed"))
    assert reasons_of(engine) == {}


# --- target globs ---------------------------------------------------------------------------

GLOB_TARGETS = ["https://blog.example.com/", "https://blogXexample.com/", "https://shop.example.com/a+b",
                "x[1]", "x[", "a]b", "a!b", "a^b", "]x", "back\\slash", "ABC", "abc", "a.c",
                "-x", ":x", "^x", "_x", "`x", "zx", "dx", "[x", "*x", "?x"]
GLOB_PATTERNS = ["https://blog.*", "*example.com/", "https://????.example.com/*", "x[[]1]", "x[", "[!a]*", "[]]*",
                 "a[!]]b", "a[]!]b", "back\\slash", "back[\\]slash", "[A-Z]*", "a?c", "a.c", "*+b", "[ab]*",
                 "[h]ttps://[b]log.*", "a^*", "[a]*[c]",
                 "[[:]*", "[[:alpha:]]*", "[[.a.]]*", "[[=a=]]*", "[z-a]*", "[!z-a]*", "[a-!]*", "[a--]*", "[a-c-e]*",
                 "[]-a]*", "[!]-a]*", "[-a]*", "[a-]*", "[-]*", "[!-]*", "[]]*", "[!]]*", "[]-]*", "[*?[]*", "[!*?[]*",
                 "[\\-a]*", "[+--]*", "[-^]*", "", "[!a-z]x", "[-z]*", "**x", "*" * 1000]


def test_a_run_of_stars_is_written_as_one():
    """PostgreSQL took 14 s over 1,000 stars written as 1,000 ``.*``; a run of stars means one star."""
    from auditctl.globs import target_pattern

    for postgres in (True, False):
        assert target_pattern("a" + "*" * 1000 + "b**", postgres) == target_pattern("a*b*", postgres)


@pytest.mark.parametrize("pattern", GLOB_PATTERNS)
def test_a_target_glob_means_what_the_shell_means_on_both_engines(engine, pattern):
    """`--target` is a shell glob on SQLite (GLOB) and on PostgreSQL (a regular expression): both
    select exactly what fnmatch, case-sensitively, would, for scan's query and for list's."""
    import fnmatch

    from dbtools import make_running

    from auditctl.audits import AuditFilters, list_audits
    from auditctl.rules import Filters

    ids = make_running(engine, len(GLOB_TARGETS))
    with write_transaction(engine) as connection:
        for audit_id, target in zip(ids, GLOB_TARGETS):
            connection.execute(update(audits).where(audits.c.id == audit_id).values(target=target))
    expected = sorted(t for t in GLOB_TARGETS if fnmatch.fnmatchcase(t, pattern))
    stuck = find_stuck(engine, Thresholds(stale_after=600, max_age=1800, stall_after=600), filters=Filters(targets=(pattern,)))
    assert sorted(v.target for v in stuck) == expected
    listed = list_audits(engine, AuditFilters(targets=(pattern,)))
    assert sorted(a.target for a in listed) == expected


@pytest.mark.parametrize("pattern", ["[^a]*", "[^]]*", "[^-]*", "[^]-a]*", "[^z-a]*"])
def test_a_caret_opening_a_set_negates_it_as_in_bash(engine, pattern):
    """`[^...]` is bash's other spelling of `[!...]`, on both engines (fnmatch reads it as a caret)."""
    import fnmatch

    from dbtools import make_running

    from auditctl.audits import AuditFilters, list_audits

    ids = make_running(engine, len(GLOB_TARGETS))
    with write_transaction(engine) as connection:
        for audit_id, target in zip(ids, GLOB_TARGETS):
            connection.execute(update(audits).where(audits.c.id == audit_id).values(target=target))
    expected = sorted(t for t in GLOB_TARGETS if fnmatch.fnmatchcase(t, "[!" + pattern[2:]))
    assert sorted(a.target for a in list_audits(engine, AuditFilters(targets=(pattern,)))) == expected


def test_declared_intervals_groups_running_audits_by_kind_and_whether_they_declared_stale_after(engine):
    """What the threshold floor is checked against: per kind, with and without a declared stale_after,
    the longest heartbeat interval declared by a running audit (finished audits do not count)."""
    from auditctl import leases
    from auditctl.rules import declared_intervals

    def running(kind, **declared):
        audit_id = leases.create_audit(engine, f"https://example.com/{kind}", kind=kind)
        leases.claim(engine, audit_id, worker_id="w", instance_id="i", worker_url=None, declared=declared)
        return audit_id

    running("crawl", heartbeat_interval=5.0)
    running("crawl", heartbeat_interval=20.0)
    running("crawl", heartbeat_interval=60.0, stale_after=600.0)
    finished = running("scan", heartbeat_interval=300.0)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == finished).values(status="completed"))
    running(None, heartbeat_interval=2.5)

    assert sorted(declared_intervals(engine), key=repr) == sorted(
        [("crawl", False, 20.0), ("crawl", True, 60.0), (None, False, 2.5)], key=repr)


def test_a_long_declared_heartbeat_interval_is_still_refused_when_only_the_long_ones_are_read(engine):
    """The check before judging reads only the intervals some stale threshold in force could fail:
    one of 400 s fails the fleet's 10m (600 < 800), one of 250 s passes it, and a kind whose own
    stale_after is 1m only fails the audits of that kind."""
    from auditctl import leases
    from auditctl.rules import Filters, check_against_running, declared_intervals
    from auditctl.thresholds import Overrides, Policy, Thresholds, UnsafeThreshold

    def running(kind, **declared):
        audit_id = leases.create_audit(engine, f"https://example.com/{kind}", kind=kind)
        leases.claim(engine, audit_id, worker_id="w", instance_id="i", worker_url=None, declared=declared)

    running("crawl", heartbeat_interval=250.0)
    running("quick", heartbeat_interval=20.0)
    fleet = Policy.of(Thresholds(600.0, 1800.0, 600.0), Overrides(None, None, None), {"quick": Overrides(60.0, None, None)})
    check_against_running(engine, fleet)
    assert declared_intervals(engine, longer_than=fleet.safe_heartbeat_interval()) == [("crawl", False, 250.0)]
    running("quick", heartbeat_interval=45.0)
    with pytest.raises(UnsafeThreshold, match="kind 'quick'.*45s"):
        check_against_running(engine, fleet)
    check_against_running(engine, fleet, Filters(kinds=("crawl",)))
    running("crawl", heartbeat_interval=400.0)
    with pytest.raises(UnsafeThreshold, match="stale_after 10m.*6m40s"):
        check_against_running(engine, fleet, Filters(kinds=("crawl",)))
    if engine.dialect.name == "sqlite":  # a file not upgraded yet has no index of the intervals
        with write_transaction(engine) as connection:
            connection.execute(text("DROP INDEX ix_audits_running_declared"))
        with pytest.raises(UnsafeThreshold, match="stale_after 10m.*6m40s"):
            check_against_running(engine, fleet, Filters(kinds=("crawl",)))


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_the_check_of_declared_intervals_seeks_the_index_of_them_on_a_file_nobody_analyzed(engine):
    """Reading every running audit's interval cost 20 ms at 30,000 running audits, before every scan,
    recovery and dashboard refresh; the intervals long enough to matter are one seek."""
    from sqlalchemy import event

    from auditctl.rules import check_against_running
    from auditctl.thresholds import Policy

    statements = []

    def capture(_conn, _cursor, statement, parameters, *_):
        if "declared_heartbeat_interval" in statement:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        check_against_running(engine, Policy())
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    ((statement, parameters),) = statements
    assert 300.0 in parameters, "only the intervals the fleet's 10m stale_after could fail (over 5m) are read"
    with engine.connect() as connection:
        plan = [row[3] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()]
    assert any(d.startswith("SEARCH audits USING") and "ix_audits_running_declared (declared_heartbeat_interval>?" in d
               for d in plan), plan


def test_iter_stuck_lists_oldest_id_first_unless_asked_otherwise(engine):
    from dbtools import make_running

    from auditctl.rules import iter_stuck

    ids = make_running(engine, 3)
    assert [v.id for v in iter_stuck(engine, T)] == ids
    assert [v.id for v in iter_stuck(engine, T, descending=True)] == ids[::-1]
    assert [v.id for v in iter_stuck(engine, T, limit=2, page_size=1)] == ids[:2]
    assert [v.id for v in iter_stuck(engine, T, sort="target", limit=2)] == ids[:2]


def test_iter_stuck_in_another_order_uses_the_given_gone_instances_and_limit(engine):
    from dbtools import make_running

    from auditctl.rules import iter_stuck

    quiet = make_running(engine, 3, silent_for=1, age=30, instance_id="gone-1")  # stuck only because its worker is gone
    gone = {"gone-1": "stopped cleanly at 12:00"}
    assert list(iter_stuck(engine, T, sort="age")) == [], "the registry knows no gone instance"
    found = list(iter_stuck(engine, T, gone=gone, sort="target", descending=True, limit=2))
    assert [v.id for v in found] == quiet[::-1][:2]
    assert all(v.reasons == ["worker_gone"] for v in found)
    (slow,) = make_running(engine, 1, silent_for=120, age=120)  # stale only for a 1-minute stale_after
    short = Thresholds(stale_after=60, max_age=3600, stall_after=3600)
    assert [v.id for v in iter_stuck(engine, short, gone={}, sort="age")] == [slow]
    from auditctl.rules import Filters

    assert list(iter_stuck(engine, short, gone={}, sort="age", filters=Filters(workers=("nobody",)))) == []


def test_stuck_filters_take_workers_reasons_kinds_creation_times_and_ids_in_process(engine):
    """Every filter of `scan`, applied by the library itself: each tuple is a union, filters combine."""
    from datetime import timedelta

    from dbtools import db_time, make_running

    from auditctl.rules import Filters, make_filters

    stale_a = make_running(engine, 2, silent_for=700, age=700, worker_id="a")       # stale only
    old_b = make_running(engine, 1, silent_for=100, age=2000, worker_id="b")        # max_age only
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == old_b[0]).values(kind="crawl"))
    everyone = [*stale_a, *old_b]

    def ids(**given):
        return [v.id for v in find_stuck(engine, T, filters=Filters(**given))]

    assert ids() == everyone
    assert ids(workers=("a",)) == stale_a and ids(workers=("a", "b")) == everyone
    assert ids(reasons=("max_age_exceeded",)) == old_b and ids(reasons=("stale_heartbeat",)) == stale_a
    assert ids(kinds=("crawl",)) == old_b and ids(kinds=("crawl", "other")) == old_b
    assert ids(since=1000) == stale_a and ids(until=1000) == old_b, "created within / before 1000 s ago"
    now = db_time(engine)
    assert ids(since=now - timedelta(seconds=1000)) == stale_a and ids(until=now - timedelta(seconds=1000)) == old_b
    assert ids(ids=(old_b[0], stale_a[1])) == [stale_a[1], old_b[0]] and ids(ids=()) == []
    assert ids(workers=("a",), reasons=("max_age_exceeded",)) == []

    legacy = make_filters(worker="a", reason="stale_heartbeat", older_than=600, ids=[stale_a[0]])
    assert legacy == Filters(workers=("a",), reasons=("stale_heartbeat",), older_than=600, ids=(stale_a[0],))
    assert make_filters(legacy) is legacy and make_filters() == Filters()
    with pytest.raises(ConfigError) as refused:
        Filters(reasons=("stale_heartbeat", "slow"))
    assert str(refused.value) == ("unknown reason 'slow': choose from worker_gone, stale_heartbeat, max_age_exceeded, "
                                  "progress_stalled")


def _row(**values):
    """A stuck-query row as a tuple, in the query's column order (rules._COLUMNS)."""
    from auditctl.rules import _COLUMNS

    base = {"id": 1, "target": "https://example.com/1", "worker_id": "w", "worker_instance": "inst-1234567890",
            "lease": "lease-1", "attempts": 1, "kind": None, "started_at": "2026-01-01 10:00:00.000000000",
            "heartbeat_at": "2026-01-01 10:00:00.000000000", "progress_fields": None, "progress": None, "max_age_seconds": None,
            "declared_stale_after": None, "declared_stall_after": None, "declared_max_age": None, "rules": 0,
            "age_seconds": None, "silence_seconds": None, "stalled_seconds": None}
    base.update(values)
    return tuple(base[name] for name in _COLUMNS)


def test_a_verdict_reads_its_row_by_position_and_explains_each_rule_with_the_threshold_and_its_source():
    from auditctl.rules import Verdict
    from auditctl.thresholds import Overrides, Policy

    policy = Policy.of(Thresholds(stale_after=600, max_age=1800, stall_after=300),
                       kinds={"crawl": Overrides(stall_after=900.0)})
    every_rule = 0b1111
    verdict = Verdict(_row(rules=every_rule, kind="crawl", declared_stale_after=120.0, max_age_seconds=3600.0,
                           age_seconds=4000.12345, silence_seconds=130.5, stalled_seconds=950.0,
                           progress='{"progress": {"step": "Crawling", "percentage": 40}}'),
                      policy, {"inst-1234567890": "stopped cleanly at 10:05"})
    assert verdict.reasons == ["worker_gone", "stale_heartbeat", "max_age_exceeded", "progress_stalled"]
    assert verdict.explain() == [
        "stopped cleanly at 10:05",
        "no heartbeat for 2m10s (stale_after 2m, worker)",
        "running for 1h6m (max_age 1h, audit)",
        "no progress for 15m50s (stall_after 15m, kind crawl)",  # not "15m": past its 15m
    ]
    assert verdict.thresholds() == {"stale_after": {"seconds": 120.0, "source": "worker"},
                                    "max_age": {"seconds": 3600.0, "source": "audit"},
                                    "stall_after": {"seconds": 900.0, "source": "kind crawl"}}
    assert verdict.measurements() == {"silence_seconds": 130.5, "age_seconds": 4000.123, "stalled_seconds": 950.0,
                                      "stale_after": 120.0, "max_age": 3600.0, "stall_after": 900.0,
                                      "worker_gone": "stopped cleanly at 10:05"}
    assert (verdict.step, verdict.percentage, verdict.max_age_seconds, verdict.kind) == ("Crawling", 40.0, 3600.0, "crawl")
    assert verdict.problems == [] and repr(verdict) == (
        "Verdict(id=1, reasons=['worker_gone', 'stale_heartbeat', 'max_age_exceeded', 'progress_stalled'])")


def test_a_verdict_of_an_odd_row_reports_what_is_wrong_instead_of_failing():
    from auditctl.rules import _FUTURE_BIT, Verdict
    from auditctl.thresholds import Policy

    odd = Verdict(_row(rules=0b0010 | _FUTURE_BIT, target=b"https://example.com/bytes", attempts="two", lease=None,
                       worker_instance=7, started_at="yesterday", heartbeat_at="not a time", silence_seconds=None),
                  Policy.coerce(T), {"7": "gone"})
    odd.unreadable = "ValueError: something"
    assert odd.reasons == ["stale_heartbeat"] and odd.gone_proof is None, "a proof needs a text instance id"
    assert (odd.target, odd.attempts, odd.started_at, odd.last_heartbeat, odd.worker_instance) == (
        "https://example.com/bytes", 0, None, None, "7")
    assert odd.explain() == ["never heard from (stale_after 10m, fleet)"]
    assert odd.problems == ["heartbeat_in_future", "started_at_unreadable", "heartbeat_at_unreadable", "no_lease",
                            "row_unreadable: ValueError: something"]
    assert Verdict(_row(worker_instance=7), Policy.coerce(T), {7: "gone"}).gone_proof is None
    assert Verdict(_row(), Policy.coerce(T), None).gone_proof is None, "no registry read: nobody is proven gone"
    anonymous = Verdict(_row(rules=0b0001, worker_instance=None), Policy.coerce(T), {})
    assert anonymous.explain() == ["worker instance ? is gone"]
    named = Verdict(_row(rules=0b0001), Policy.coerce(T), {})
    assert named.explain() == ["worker instance inst-123 is gone"] and "worker_gone" not in named.measurements()


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("options", [{}, {"limit": 2000, "after": 5}, {"sort": "age"}], ids=["first page", "next page", "by age"])
def test_the_stuck_query_reads_the_running_index_on_a_sqlite_file_nobody_analyzed(engine, options):
    """Nothing runs ANALYZE on a user's file; without statistics SQLite took the status index and
    sorted every running audit, twice the time at a million audits."""
    from sqlalchemy import text

    from auditctl.rules import stuck_query
    from auditctl.thresholds import Policy

    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").scalar() == 0
        statement, params = stuck_query(connection, Policy.coerce(T), gone={"gone-instance": "stopped"}, **options)
        plan = connection.execute(text("EXPLAIN QUERY PLAN " + statement.text), params).all()
    scans = [detail for *_, detail in plan if " a " in f" {detail} "]
    assert scans and all("ix_audits_running" in detail for detail in scans), plan


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_a_batch_being_recovered_is_looked_up_by_primary_key_not_through_the_running_index(engine):
    """A recovery judges each batch again by its ids: through the partial index every id was found
    there first and then in the table (5.0 against 3.7 ms for 500 of 40,000)."""
    from sqlalchemy import bindparam, text

    from auditctl.rules import Filters, stuck_query
    from auditctl.thresholds import Policy

    with engine.connect() as connection:
        statement, params = stuck_query(connection, Policy.coerce(T), filters=Filters(ids=(1, 2, 3)), lock=True)
        explain = text("EXPLAIN QUERY PLAN " + statement.text).bindparams(bindparam("ids", expanding=True))
        plan = [detail for *_, detail in connection.execute(explain, params).all()]
    assert any(d.startswith("SEARCH a USING INTEGER PRIMARY KEY") for d in plan), plan
    assert not any("ix_audits_running" in d for d in plan), plan


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_finding_which_gone_instances_hold_a_running_audit_probes_the_index_of_their_instances(engine):
    """One probe per gone instance, on a file nobody analyzed: scanning the running audits
    instead would cost what looking each of them up among the gone instances did."""
    from sqlalchemy import text

    from auditctl.rules import _held_by_running

    with engine.connect() as connection:
        plan = connection.execute(text("EXPLAIN QUERY PLAN " + _held_by_running(False).text), {"gone": '["a", "b"]'}).all()
    details = [detail for *_, detail in plan]
    assert any(d.startswith("SEARCH a USING") and "INDEX ix_audits_running_instance (worker_instance=?)" in d
               for d in details), details


@pytest.mark.parametrize("sort", ["age", "silence"])
def test_an_audit_never_heard_from_sorts_as_the_oldest_on_both_engines(engine, sort):
    """Its moments are unknown (NULL): SQLite and PostgreSQL put NULL at opposite ends unless told,
    so ``scan --sort silence --limit 1`` showed different audits on the two engines."""
    from datetime import timedelta

    from dbtools import make_running

    from auditctl.sqlfunctions import fetch_now
    from auditctl.rules import iter_stuck

    older, newer = make_running(engine, 1, silent_for=3 * 3600)[0], make_running(engine, 1, silent_for=3600)[0]
    (unknown,) = make_running(engine, 1)
    with write_transaction(engine) as connection:
        ahead = fetch_now(connection) + timedelta(days=1)  # another tool's clock: nothing to trust
        connection.execute(update(audits).where(audits.c.id == unknown).values(
            created_at=ahead, started_at=None, heartbeat_at=None, last_worker_update=None, progress_changed_at=None))

    assert [v.id for v in iter_stuck(engine, T, gone={}, sort=sort)] == [unknown, older, newer]
    assert [v.id for v in iter_stuck(engine, T, gone={}, sort=sort, descending=True)] == [newer, older, unknown]


def test_a_pending_audit_without_a_worker_sorts_by_worker_in_the_same_place_on_both_engines(engine):
    from dbtools import make_running

    from auditctl.audits import list_audits
    from auditctl.schema import PENDING

    (running,) = make_running(engine, 1, worker_id="worker-1")
    (waiting,) = make_running(engine, 1)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == waiting).values(status=PENDING, worker_id=None))

    assert [s.id for s in list_audits(engine, sort="worker", descending=False)] == [waiting, running]
    assert [s.id for s in list_audits(engine, sort="worker", descending=True)] == [running, waiting]


def test_text_sorts_in_code_point_order_on_postgresql_whatever_the_collation(engine):
    """SQLite sorts text by code point; PostgreSQL by the database's locale unless told, so
    ``scan --sort target --limit 1`` and ``list --sort worker`` kept other audits under en_US."""
    from dbtools import make_running

    from auditctl.audits import list_audits
    from auditctl.rules import iter_stuck

    names = ["b", "B", "a", "A", "_x", "é", "z", "Z", "e"]
    ids = make_running(engine, len(names))
    with write_transaction(engine) as connection:
        if connection.dialect.name == "postgresql":
            locale = connection.exec_driver_sql("SELECT collname FROM pg_collation WHERE collname = 'en-US-x-icu'").scalar()
            if locale is None:
                pytest.skip("this PostgreSQL has no ICU collations")
            for column in ("target", "worker_id"):  # as a database created under en_US would compare them
                connection.exec_driver_sql(f'ALTER TABLE audits ALTER COLUMN {column} TYPE varchar COLLATE "en-US-x-icu"')
        for audit_id, name in zip(ids, names):
            connection.execute(update(audits).where(audits.c.id == audit_id).values(target=name, worker_id=name))
    code_point_order = sorted(names)

    assert [v.target for v in iter_stuck(engine, T, gone={}, sort="target")] == code_point_order
    assert [v.worker_id for v in iter_stuck(engine, T, gone={}, sort="worker")] == code_point_order
    assert [s.target for s in list_audits(engine, sort="target", descending=False)] == code_point_order
    assert [s.worker_id for s in list_audits(engine, sort="worker", descending=False)] == code_point_order


def test_a_page_of_verdicts_is_built_without_the_collector_walking_it(engine):
    """Building a page of verdicts (objects that all stay alive) sets off no collection: the
    collector waits until the page is built, and is on again after."""
    import gc

    from dbtools import make_running

    from auditctl.transactions import read_connection
    from auditctl.rules import select_stuck

    make_running(engine, 600)
    policy = Thresholds(stale_after=60, max_age=3600, stall_after=60)
    with read_connection(engine) as connection:
        select_stuck(connection, policy)  # the statement is built and cached: what is left to count is the page
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    threshold = gc.get_threshold()
    gc.set_threshold(50, 10, 10)  # without the pause, a page of 600 verdicts sets off a dozen collections
    gc.callbacks.append(count)
    try:
        with read_connection(engine) as connection:
            verdicts = select_stuck(connection, policy)
        during = list(collections)
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)
    assert len(verdicts) == 600
    assert len(during) <= 2, during  # the parameters, before the page: without the pause, 23


def test_pauses_of_the_collector_on_several_threads_end_with_it_as_it_was():
    import gc
    import threading

    from auditctl.gcpause import paused_collector

    inside, release = threading.Barrier(3), threading.Event()

    def pause():
        with paused_collector():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=pause) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        inside.wait()
        with paused_collector():
            assert not gc.isenabled()
        assert not gc.isenabled(), "the other threads' pauses are still under way"
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert gc.isenabled()

    gc.disable()  # an application that runs without the collector keeps it off
    try:
        with paused_collector():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_child_forked_while_another_thread_pauses_the_collector_gets_it_back():
    """Only the forking thread lives on in the child: a pause another thread had under way would
    never end there, and the child would run without its collector."""
    import gc
    import os
    import threading

    from auditctl.gcpause import paused_collector

    inside, release = threading.Event(), threading.Event()

    def pause():
        with paused_collector():
            inside.set()
            release.wait()

    thread = threading.Thread(target=pause)
    thread.start()
    read, write = os.pipe()
    try:
        assert inside.wait(5) and not gc.isenabled()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's clean-up
            try:
                with paused_collector():
                    during = gc.isenabled()
                os.write(write, f"{gc.isenabled()} {during}".encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 100).decode() == "True False"
    finally:
        release.set()
        thread.join()
        os.close(read)
        os.close(write)
    assert gc.isenabled()


def test_a_listing_pauses_the_collector_in_the_commands_own_process_only(monkeypatch, capsys):
    """The auditctl process renders a listing without collections (its records die as they are
    written); a program that renders through the library keeps its collector running."""
    import gc

    from auditctl import gcpause
    from auditctl.cli.render import render

    seen = []

    def records():
        for number in range(3):
            seen.append(gc.isenabled())
            yield {"id": number}

    monkeypatch.setattr(gcpause, "_owns_process", True)
    assert render(records(), [], "json") == 3
    assert seen == [False, False, False] and gc.isenabled()
    seen.clear()
    monkeypatch.setattr(gcpause, "_owns_process", False)
    assert render(records(), [], "json") == 3
    assert seen == [True, True, True]
    assert capsys.readouterr().out.count('{"id": 2}') == 2, "both listings were written whole"
