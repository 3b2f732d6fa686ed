"""A kind's thresholds are checked against the values in force for its audits, not only against each other.

For the audits of a kind, each threshold is the flag's, else the kind's own, else the fleet's
(``Policy.resolve``). A ``stale_after`` or ``stall_after`` longer than the ``max_age`` in force could
never be why such an audit is stuck, so it is refused: in the guard (``kinds=``), in ``Policy.of``,
and on the command line (a ``[kinds.NAME]`` section, exit 2), naming the kind, both values and where
each comes from. A kind's value that a flag replaces is not in force, so it is not refused.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from auditctl import StuckAuditPrevention
from auditctl.cli import cli
from auditctl.errors import ConfigError
from auditctl.thresholds import Overrides, Policy, Thresholds


def refusal(**policy) -> str:
    with pytest.raises(ConfigError) as refused:
        Policy.of(**policy)
    return refusal_line(refused.value)


def refusal_line(error: ConfigError) -> str:
    text = str(error)
    assert "\n" not in text, "one line"
    return text


def auditctl(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, prog_name="auditctl")


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    assert auditctl("init", "--database-url", url).exit_code == 0
    return url


def config(tmp_path, text: str):
    path = tmp_path / "kinds.toml"
    path.write_text(text)
    return path


# --- the library: Policy.of and the guard -----------------------------------------------------------


def test_a_kind_whose_stale_after_outlasts_the_fleets_max_age_is_refused():
    message = refusal(kinds={"full-scan": Overrides(stale_after=3600.0)})
    assert message.startswith("kind 'full-scan': ")
    assert "stale_after 1h (the kind's own) is longer than max_age 30m (the fleet's)" in message
    assert "lower the kind's stale_after to at most 30m or give the kind its own max_age of at least 1h" in message


def test_a_kind_whose_max_age_is_shorter_than_the_fleets_stale_after_is_refused():
    message = refusal(fleet=Thresholds(stale_after=600.0, max_age=3600.0, stall_after=60.0),
                      kinds={"quick": Overrides(max_age=300.0)})
    assert message.startswith("kind 'quick': ")
    assert "stale_after 10m (the fleet's) is longer than max_age 5m (the kind's own)" in message


def test_a_kind_whose_stall_after_outlasts_the_max_age_in_force_is_refused():
    message = refusal(kinds={"crawl": Overrides(stall_after=3600.0)})
    assert "kind 'crawl': stall_after 1h (the kind's own) is longer than max_age 30m (the fleet's)" in message
    assert "a frozen audit of this kind would hit max_age first" in message
    # The fleet's stall_after against the kind's max_age (its stale_after agrees).
    message = refusal(kinds={"crawl": Overrides(stale_after=60.0, max_age=300.0)})
    assert "kind 'crawl': stall_after 10m (the fleet's) is longer than max_age 5m (the kind's own)" in message
    # The fleet's own values among themselves are checked where they are given (Thresholds.parse, the
    # commands' options): a kind that takes no part in their contradiction is not refused for it.
    Policy.of(fleet=Thresholds(stale_after=86400.0), kinds={"crawl": Overrides(stall_after=60.0)})


def test_a_kind_is_judged_against_the_flags_that_replace_the_fleets_values():
    message = refusal(override=Overrides(max_age=600.0), kinds={"full-scan": Overrides(stale_after=3600.0)})
    assert "kind 'full-scan': stale_after 1h (the kind's own) is longer than max_age 10m (--max-age)" in message
    assert "pass a --max-age of at least 1h" in message
    message = refusal(override=Overrides(stale_after=900.0), kinds={"quick": Overrides(max_age=600.0)})
    assert "kind 'quick': stale_after 15m (--stale-after) is longer than max_age 10m (the kind's own)" in message
    # A --max-age long enough for the kind's stale_after makes them agree.
    Policy.of(override=Overrides(max_age=7200.0), kinds={"full-scan": Overrides(stale_after=3600.0)})


def test_a_kinds_value_that_a_flag_replaces_is_not_refused():
    kinds = {"full-scan": Overrides(stale_after=3600.0), "quick": Overrides(max_age=300.0)}
    refusal(kinds=kinds)  # as configured, both kinds contradict the fleet's values
    # --stale-after replaces full-scan's stale_after; with --stall-after it leaves quick's max_age 5m agreeing.
    policy = Policy.of(override=Overrides(stale_after=120.0, stall_after=240.0), kinds=kinds)
    assert policy.resolve("max_age", kind="quick") == (300.0, "kind quick")
    assert policy.resolve("stale_after", kind="full-scan") == (120.0, "flag")


def test_a_guard_refuses_a_kind_that_contradicts_the_fleets_thresholds(tmp_path):
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    for kinds, expected in (
        ({"k": {"stale_after": "1h"}}, "kind 'k': stale_after 1h (the kind's own) is longer than max_age 30m (the fleet's)"),
        ({"k": {"max_age": "5m"}}, "kind 'k': stale_after 10m (the fleet's) is longer than max_age 5m (the kind's own)"),
    ):
        with pytest.raises(ConfigError) as refused:
            StuckAuditPrevention(url, worker_id="w", kinds=kinds)
        assert expected in refusal_line(refused.value)
    # The guard's own thresholds are the fleet's for its monitor: they must agree with the kind too.
    with pytest.raises(ConfigError, match=r"stall_after 10m \(the fleet's\) is longer than max_age 5m"):
        StuckAuditPrevention(url, worker_id="w", heartbeat_interval=30, stale_after="2m", kinds={"k": {"max_age": "5m"}})
    guard = StuckAuditPrevention(url, worker_id="w", heartbeat_interval=30, stale_after="2m", stall_after="5m",
                                 kinds={"k": {"max_age": "5m"}})
    guard.close()


# --- the command line: a [kinds.NAME] section -------------------------------------------------------


def test_a_config_kind_whose_stale_after_outlasts_the_fleets_max_age_stops_the_command(tmp_path, database):
    path = config(tmp_path, '[kinds.k]\nstale_after = "1h"\n')
    for command in ("scan", "recover"):
        result = auditctl("-v", "--config", path, command, "--database-url", database)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert ("kind 'k': stale_after 1h (the kind's own) is longer than max_age 30m (the fleet's)"
                in result.stderr), result.stderr


def test_a_config_kind_is_checked_against_the_values_in_force_after_the_flags(tmp_path, database):
    path = config(tmp_path, '[kinds.k]\nmax_age = "5m"\n')
    refused = auditctl("--config", path, "scan", "--database-url", database)
    assert refused.exit_code == 2 and "kind 'k': stale_after 10m (the fleet's) is longer than max_age 5m" in refused.stderr
    # Flags replace the fleet's stale_after and stall_after for every kind: now they agree.
    agreed = auditctl("--config", path, "scan", "--stale-after", "1m", "--stall-after", "2m", "--database-url", database)
    assert agreed.exit_code == 0, agreed.output
    # A flag that replaces the kind's own contradicting value: nothing of the kind's is left to refuse.
    path = config(tmp_path, '[kinds.k]\nstale_after = "1h"\n')
    assert auditctl("--config", path, "scan", "--database-url", database).exit_code == 2
    assert auditctl("--config", path, "scan", "--stale-after", "5m", "--database-url", database).exit_code == 0
    too_short = auditctl("--config", path, "scan", "--max-age", "45m", "--database-url", database)
    assert too_short.exit_code == 2 and "max_age 45m (--max-age)" in too_short.stderr
