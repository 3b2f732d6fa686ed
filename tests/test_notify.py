"""Alerts: events in the outbox reach Slack, Discord and webhooks once, summarised, never in the way.

Every destination here is a real HTTP server on loopback (``webhooks``) that records what
it gets and can hang, fail or rate-limit. Every URL holds a secret (``webhooks.SECRET``)
that must appear in no output, no log and no database row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbtools import make_running, wait_for
from sqlalchemy import func, select, update
from sqlalchemy import text as sql_text
from webhooks import SECRET, Answer, Webhook

from auditctl.cli import cli
from auditctl.db import create_engine
from auditctl.history import Actor
from auditctl.monitor import Monitor
from auditctl.notify import deliver, destinations_from, discord, sender, slack, undelivered
from auditctl.notify.digest import MORE_AUDITS, OutboxEvent, build
from auditctl.recovery import ResetFilters, recover_stuck, reset_failed
from auditctl.rules import Filters
from auditctl.schema import notification_deliveries, notifications
from auditctl.sqlfunctions import fetch_now
from auditctl.thresholds import Thresholds
from auditctl.transactions import read_connection, write_transaction

AUDITCTL = Path(sys.executable).parent / "auditctl"
STUCK_IN_DEMO = {
    "https://blog.example.net": "stale_heartbeat",
    "https://payments.example.com": "max_age_exceeded",
    "https://status.example.io": "progress_stalled",
}
ACTOR = Actor.command("test")


@pytest.fixture
def hooks():
    """Make loopback webhook servers, closed after the test."""
    made = []

    def make() -> Webhook:
        made.append(Webhook())
        return made[-1]

    yield make
    for hook in made:
        hook.close()


@pytest.fixture
def fast_backoff(monkeypatch):
    """Retries after a tenth of a second, for tests of what a retry does rather than when."""
    monkeypatch.setattr(sender, "BACKOFF_BASE", 0.1)


@pytest.fixture
def sqlite_url(tmp_path):
    """A migrated SQLite database, for behaviour that does not depend on the engine."""
    from auditctl.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def sqlite_engine(sqlite_url):
    engine = create_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def secret_never_logged(caplog):
    caplog.set_level(logging.INFO, logger="auditctl")
    yield
    assert SECRET not in caplog.text, "a webhook URL was logged unmasked"


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False, prog_name="auditctl")
    assert SECRET not in result.stdout and SECRET not in result.stderr, f"auditctl {args[0]} printed a webhook URL"
    return result


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_") and k not in ("NO_COLOR", "COLUMNS")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), TERM="dumb", **extra)
    return env


def stuck_and_recovered(engine, count: int = 2, *, batch_size: int = 500, worker_id: str = "worker-1") -> list[int]:
    """``count`` stuck audits, recovered (one outbox event per batch)."""
    ids = make_running(engine, count, silent_for=700, worker_id=worker_id)
    done = recover_stuck(engine, Thresholds(), actor=ACTOR, batch_size=batch_size, filters=Filters(ids=tuple(ids)))
    assert sorted(r.id for r in done) == ids
    return ids


def delivery_states(engine) -> list[str]:
    with read_connection(engine) as connection:
        return list(connection.execute(select(notification_deliveries.c.status)
                                        .order_by(notification_deliveries.c.notification_id)).scalars())


def event_count(engine, event: str | None = None) -> int:
    query = select(func.count()).select_from(notifications)
    if event is not None:
        query = query.where(notifications.c.event == event)
    with read_connection(engine) as connection:
        return connection.execute(query).scalar_one()


def failed_message(engine, hooks, events: int = 2):
    """``events`` events sent in one message to a webhook that answers 500: they go again only together."""
    hook = hooks()
    hook.always(Answer(status=500, body=b"down"))
    destinations = destinations_from(webhook=hook.url())
    for _ in range(events):
        stuck_and_recovered(engine, 1)
    assert deliver(engine, destinations).results[0].error == "HTTP 500: down"
    return hook, destinations


def audit_ids_in(body: dict) -> list[int]:
    """The audits a generic webhook message reports."""
    return [a["id"] for e in body["events"] if e["event"] == "recovered" for a in e["payload"]["audits"]]


# --- one summarising message per destination --------------------------------------------------------------------


def test_one_message_per_destination_summarises_every_event_due(engine, hooks):
    slack_hook, discord_hook, generic = hooks(), hooks(), hooks()
    destinations = destinations_from(slack=slack_hook.url(), discord=[discord_hook.url()], webhook=generic.url())
    recovered = stuck_and_recovered(engine, 5, batch_size=2)  # three batches: three events
    reset = reset_failed(engine, actor=Actor.command("reset-all"), filters=ResetFilters(ids=tuple(recovered[:2])))
    assert len(reset) == 2 and event_count(engine) == 4

    report = deliver(engine, destinations)

    assert report.ok and [r.events for r in report.results] == [4, 4, 4]
    for hook in (slack_hook, discord_hook, generic):
        assert len(hook.requests) == 1, "one message per destination, never one per event"
    body = generic.requests[0].body
    assert audit_ids_in(body) == recovered
    assert body["title"] == "5 stuck audits recovered; 2 audits reset by auditctl reset-all"
    assert generic.requests[0].headers["Idempotency-Key"] == body["idempotency_key"]
    assert len({e["key"] for e in body["events"]}) == 4
    slack_text = json.dumps(slack_hook.requests[0].body)
    assert "Reset by auditctl reset-all" in slack_text and "2 audits back to pending" in slack_text
    assert set(delivery_states(engine)) == {"sent"}

    again = deliver(engine, destinations)
    assert again.ok and again.sent == 0 and len(generic.requests) == 1, "a sent event is never sent again"


def test_slack_and_discord_messages_show_hostile_targets_as_text_and_name_the_worker_gone():
    hostile = "<!channel> @everyone [click](http://evil) \x1b]0;owned\x07"
    events = [OutboxEvent(7, None, "recovered", {"actor": "worker w (1234abcd)", "audits": [
        {"id": 41, "target": hostile, "reasons": ["worker_gone"], "status": "failed", "worker_id": "worker-7",
         "explanation": ["worker process 999 on vm (worker-7, instance 1234abcd) no longer exists"],
         "measured": {"silence_seconds": 3.0, "worker_gone": "worker process 999 on vm no longer exists"}}]}),
        OutboxEvent(8, None, "unknown-kind", {})]
    digest = build(events)
    assert digest.title == "1 stuck audit recovered; worker worker-7 gone"
    slack_body = json.dumps(slack.message(digest, "k"))
    assert "&lt;!channel&gt;" in slack_body and "<!channel>" not in slack_body
    assert "\\u001b" not in slack_body and "\\\\x1b" in slack_body  # shown, not sent
    assert "Worker worker-7 gone:* worker process 999 on vm no longer exists" in slack_body
    discord_body = discord.message(digest, "k")
    assert discord_body["allowed_mentions"] == {"parse": []}
    titles = [e["title"] for e in discord_body["embeds"]]
    assert titles == ["1 stuck audit recovered", "Worker worker-7 gone"]
    assert "\\[click\\]" in discord_body["embeds"][0]["fields"][0]["name"]  # no masked link

    gone_by_name = build([OutboxEvent(9, None, "recovered", {"audits": [
        {"id": 42, "target": "t", "reasons": ["worker_gone"], "status": "failed", "worker_id": hostile,
         "explanation": ["gone"], "measured": {"worker_gone": "gone"}}]})])
    slack_text = slack.message(gone_by_name, "k")["text"]
    assert "&lt;!channel&gt;" in slack_text and "<!channel>" not in slack_text, "the notification text pings nobody"


def test_a_message_that_lists_ten_audits_names_commands_that_exist_for_the_others():
    digest = build([gone_worker_event(1, "worker-1", audits=24)])  # 12 recovered, 12 requeued
    texts = [json.dumps(slack.message(digest, "k")), json.dumps(discord.message(digest, "k"))]
    for text in texts:
        assert "more (`auditctl list --status failed,pending` lists them" in text
    for command in ("list", "show"):
        assert CliRunner().invoke(cli, [command, "--help"]).exit_code == 0


PHISHING_WORKER = "[Re-login here](https://evil.example/login) <@&123> <@42> <#7> <t:0:R> @everyone "


def discord_embed_chars(body: dict) -> int:
    """What Discord counts against its 6,000 characters: titles, descriptions, footers, field names and values."""
    return sum(len(e.get("title", "")) + len(e.get("description", "")) + len(e.get("footer", {}).get("text", ""))
               + sum(len(f["name"]) + len(f["value"]) for f in e.get("fields", [])) for e in body["embeds"])


def gone_worker_event(number: int, worker_id: str, *, audits: int = 1) -> OutboxEvent:
    """A recovery by a worker's startup cleanup of ``audits`` audits whose worker ``worker_id`` is gone."""
    measured = f"worker instance abcd1234 of {worker_id} stopped cleanly"
    return OutboxEvent(number, None, "recovered", {"actor": f"worker {worker_id} (abcd1234)", "host": "h", "audits": [
        {"id": number * 100 + i, "target": f"https://t{i}.example", "reasons": ["worker_gone"],
         "status": "failed" if i % 2 == 0 else "pending", "worker_id": worker_id, "explanation": [measured],
         "measured": {"worker_gone": measured}} for i in range(audits)]})


def unescaped_markup(text: str) -> list[str]:
    """The characters that open a Discord masked link or mention and are not escaped by a backslash."""
    return [text[i:i + 2] for i in range(len(text)) if text[i] in "[<" and (i == 0 or text[i - 1] != "\\")]


def test_a_discord_worker_gone_title_keeps_256_characters_whatever_the_worker_id_holds():
    worker_id = PHISHING_WORKER + "\x01" * (200 - len(PHISHING_WORKER))  # 200 characters, each \x01 shown as four
    body = discord.message(build([gone_worker_event(1, worker_id)]), "k")
    title = next(e["title"] for e in body["embeds"] if e["color"] == discord.DARK_RED)
    assert len(title) <= 256, f"a {len(title)}-character title: Discord answers 400 and holds back every later alert"
    assert title.startswith("Worker \\[Re-login here\\](https://evil.example/login) \\<@&123\\>") and title.endswith(" gone")
    assert "\x01" not in title and "\\\\x01" in title
    assert discord_embed_chars(body) <= 6000


def test_discord_content_shows_a_worker_id_as_text_not_a_masked_link_or_a_mention():
    body = discord.message(build([gone_worker_event(1, PHISHING_WORKER)]), "k")
    assert "Re-login here" in body["content"] and "worker" in body["content"]
    assert unescaped_markup(body["content"]) == [], body["content"]
    for embed in body["embeds"]:
        for text in (embed["title"], embed.get("description", ""), *(f["value"] for f in embed.get("fields", []))):
            assert unescaped_markup(text) == [], text
    assert body["allowed_mentions"] == {"parse": []}
    assert discord.escape("<@123> <@&123> <#123> <t:1700000000:R>") == "\\<@123\\> \\<@&123\\> \\<\\#123\\> \\<t:1700000000:R\\>"


def test_a_discord_message_keeps_6000_characters_when_long_worker_ids_fill_the_descriptions():
    events = [gone_worker_event(n, f"w{n}-" + "x" * 190, audits=2) for n in range(1, 13)]  # 200-character ids
    body = discord.message(build(events), "k")
    assert discord_embed_chars(body) <= 6000, "Discord answers 400 and holds back every later alert"
    titles = [e["title"] for e in body["embeds"]]
    assert titles == ["12 stuck audits recovered", "12 stuck audits requeued", "Workers gone"]
    assert all(e["description"] for e in body["embeds"]), "every embed still says something"
    assert body["embeds"][0]["description"].startswith("Reasons: 24 worker\\_gone")
    assert body["embeds"][-1]["footer"]["text"] == "auditctl · events #1-#12 (12) · idempotency key k"


# --- a recovery in watch --------------------------------------------------------------------------------------------


def test_a_recovery_in_watch_posts_one_slack_and_one_discord_message_with_reasons_and_evidence(sqlite_url, hooks,
                                                                                                tmp_path):
    database_url = sqlite_url  # PostgreSQL: see the two-process test below
    slack_hook, discord_hook = hooks(), hooks()
    assert invoke("demo", "--database-url", database_url).exit_code == 0
    env = clean_env(tmp_path, AUDITCTL_DISCORD_WEBHOOK=discord_hook.url())  # one from the environment
    done = subprocess.run([str(AUDITCTL), "watch", "--once", "--database-url", database_url,
                           "--slack-webhook", slack_hook.url()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert f"alerts: sent 2 events in 1 message to slack http://127.0.0.1:{slack_hook.port}/***" in done.stdout
    assert f"to discord http://127.0.0.1:{discord_hook.port}/***" in done.stdout
    assert len(slack_hook.requests) == 1 and len(discord_hook.requests) == 1

    blocks = slack_hook.requests[0].body["blocks"]
    assert blocks[0]["type"] == "header" and blocks[0]["text"]["text"] == "5 stuck audits recovered"
    assert blocks[-1]["type"] == "context" and "idempotency key auditctl-" in blocks[-1]["elements"][0]["text"]
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
    for target, reason in STUCK_IN_DEMO.items():
        section = next(s for s in sections if target in s)
        assert f"*Reasons:* {reason}" in section
        assert "*Why:* " in section and "*Measured:* silent " in section and "limits stale_after 10m" in section

    embed = discord_hook.requests[0].body["embeds"][0]
    assert embed["title"] == "5 stuck audits recovered" and embed["color"] == discord.RED
    for target, reason in STUCK_IN_DEMO.items():
        field = next(f for f in embed["fields"] if target in f["name"])
        assert f"**{reason.replace('_', chr(92) + '_')}** → failed" in field["value"]
        assert "Measured: silent " in field["value"]
    assert "idempotency key auditctl-" in embed["footer"]["text"]


# --- two watch processes on one PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def postgres_url(request):
    from conftest import _new_postgres_database

    return _new_postgres_database(request, template=request.getfixturevalue("postgres_template"))


def test_two_watch_processes_on_one_postgresql_send_each_event_once(postgres_url, hooks, tmp_path):
    generic = hooks()
    # A slow receiver widens every window two senders could race in; its first answers are failures, so
    # both processes also wake for the same retry at the same moment.
    generic.always(Answer(hang=0.3))
    generic.answer(Answer(status=500, hang=0.3), Answer(status=500, hang=0.3))
    engine = create_engine(postgres_url)
    watchers = [subprocess.Popen([str(AUDITCTL), "watch", "--interval", "0.3s", "--refresh", "0.3s",
                                  "--database-url", postgres_url, "--webhook", generic.url()],
                                 cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    lines: list[list[str]] = [[], []]
    for watcher, seen in zip(watchers, lines):
        threading.Thread(target=lambda w=watcher, seen=seen: seen.extend(w.stdout), daemon=True).start()
    try:
        wait_for(lambda: all(seen for seen in lines), timeout=20, message="both watch processes running")
        stuck = []
        for _round in range(6):
            stuck += make_running(engine, 2, silent_for=700)
            time.sleep(0.25)

        def all_delivered():
            with read_connection(engine) as connection:
                recovered = connection.execute(select(func.count()).select_from(notifications)
                                               .where(notifications.c.event == "recovered")).scalar_one()
                unsent = connection.execute(select(func.count()).select_from(notification_deliveries)
                                            .where(notification_deliveries.c.status != "sent")).scalar_one()
                events = connection.execute(select(func.count()).select_from(notifications)).scalar_one()
                sent = connection.execute(select(func.count()).select_from(notification_deliveries)).scalar_one()
            reported = sum(len(audit_ids_in(r.body)) for r in generic.requests if r.answered == 200)
            return reported >= len(stuck) and unsent == 0 and sent == events and recovered >= 1

        wait_for(all_delivered, timeout=20, interval=0.1, message="every recovery delivered")
    finally:
        outputs = []
        for watcher, seen in zip(watchers, lines):
            watcher.terminate()
            watcher.wait(10)
            outputs.append(("".join(seen), watcher.stderr.read()))
        engine.dispose()
    delivered = [r.body for r in generic.requests if r.answered == 200]
    keys = [e["key"] for body in delivered for e in body["events"]]
    assert len(keys) == len(set(keys)), "an event was sent twice"
    assert sorted(i for body in delivered for i in audit_ids_in(body)) == sorted(stuck)
    assert sum(body["counts"]["fleet_healthy"] for body in delivered) >= 1
    for out, err in outputs:
        assert SECRET not in out + err
    print("\nmessages sent by each watch:", [out.count("alerts: sent") for out, _ in outputs])


# --- a webhook that hangs or fails ----------------------------------------------------------------------------------


def test_a_hanging_or_failing_webhook_never_holds_a_watch_pass_and_gets_its_events_when_back(sqlite_url, sqlite_engine,
                                                                                         hooks, tmp_path):
    database_url, engine = sqlite_url, sqlite_engine  # the pass's independence from the webhook is engine-neutral
    hanging, failing = hooks(), hooks()
    hanging.always(Answer(hang=60))  # answers (200) only when released, long after the 5s timeout would pass
    failing.always(Answer(status=500, body=b"internal error"))
    assert invoke("demo", "--database-url", database_url).exit_code == 0
    watch = subprocess.Popen([str(AUDITCTL), "watch", "--interval", "0.3s", "--refresh", "0.2s", "--notify-timeout", "5s",
                              "--database-url", database_url, "--slack-webhook", hanging.url(),
                              "--discord-webhook", failing.url()],
                             cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True).start()
    try:
        wait_for(lambda: hanging.requests, timeout=15, message="the Slack webhook called")
        # While the Slack webhook hangs, passes go on: a newly stuck audit is recovered within a few passes.
        late = make_running(engine, 1, silent_for=700)[0]
        made = time.monotonic()
        wait_for(lambda: any(f"recovered audit {late} " in line for line in lines), timeout=10, message="the late recovery")
        took = time.monotonic() - made
        assert took < 3.0, f"a pass was held up {took:.1f}s by a hanging webhook (timeout 5s)"
        assert not any(r.answered for r in hanging.requests), "the Slack webhook was still hanging meanwhile"
        wait_for(lambda: any("alerts: could not deliver to discord" in line for line in lines), timeout=10,
                 message="the failure logged")
        hanging.always(Answer())
        hanging.release()
        failing.always(Answer())
        wait_for(lambda: set(delivery_states(engine)) == {"sent"} and len(delivery_states(engine)) == 2 * event_count(engine),
                 timeout=15, message="every event delivered once the webhooks are back")
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=10)
    text = "".join(lines) + out + err
    assert SECRET not in text
    assert f"alerts: could not deliver to discord http://127.0.0.1:{failing.port}/***: HTTP 500: internal error" in text
    assert text.count("could not deliver to discord") == 1, "one log line per change, not one per retry"
    delivered = [r.body for r in failing.requests if r.answered == 200]
    assert any(f"#{late} " in field["name"] for b in delivered for e in b["embeds"] for field in e.get("fields", []))
    print(f"\nlate audit recovered {took:.2f}s after it went stuck, with Slack hanging and Discord failing")


def test_deliver_returns_within_its_timeout_when_a_webhook_hangs_and_sends_when_it_answers(engine, hooks, fast_backoff):
    hook = hooks()
    hook.always(Answer(hang=60))
    destinations = destinations_from(webhook=hook.url())
    ids = stuck_and_recovered(engine, 2)
    started = time.monotonic()
    report = deliver(engine, destinations, timeout=0.5)
    took = time.monotonic() - started
    assert took < 2.0, f"deliver took {took:.2f}s with a 0.5s timeout"
    assert not report.ok and report.results[0].error == "no answer within 0.5s" and report.pending == 1
    assert delivery_states(engine) == ["pending"]
    listed = undelivered(engine)
    assert [(u.status, u.attempts, u.last_error) for u in listed] == [("pending", 1, "no answer within 0.5s")]
    assert listed[0].destination == f"webhook http://127.0.0.1:{hook.port}/***"

    hook.always(Answer())
    hook.release()
    wait_for(lambda: deliver(engine, destinations, timeout=0.5).sent, timeout=5, interval=0.2, message="the retry")
    assert audit_ids_in(hook.requests[-1].body) == ids
    assert delivery_states(engine) == ["sent"]


def test_a_guard_with_a_hanging_webhook_keeps_beating_and_alerts_from_its_own_thread(sqlite_url, sqlite_engine, hooks,
                                                                                    caplog, fast_backoff):
    from auditctl import StuckAuditPrevention

    hook = hooks()
    hook.always(Answer(hang=60))
    options = {"heartbeat_interval": 0.5, "stale_after": 2, "max_age": 30, "stall_after": 3}
    with StuckAuditPrevention(sqlite_url, worker_id="quiet", **options) as quiet:
        started = time.monotonic()
        quiet._monitor_once()
        baseline = time.monotonic() - started
    with StuckAuditPrevention(sqlite_url, worker_id="alerting", slack_webhook=[hook.url()], notify_timeout=2,
                              **options) as guard:
        stuck = make_running(sqlite_engine, 1, silent_for=700)[0]
        started = time.monotonic()
        assert guard._monitor_once() is True  # the monitor thread's work: a pass, then a kick to the sender
        took = time.monotonic() - started
        assert took < 1.0, f"a monitor pass took {took:.2f}s with a hanging webhook"
        hook.wait_for(1)
        wait_for(lambda: "are failing: no answer within 2s" in caplog.text, timeout=5, message="the failure logged")
        assert f"alerts to slack http://127.0.0.1:{hook.port}/*** are failing" in caplog.text
        hook.always(Answer())
        hook.release()
        wait_for(lambda: delivery_states(sqlite_engine) == ["sent"], timeout=5, message="the retry from the guard's thread")
    assert f"#{stuck}" in json.dumps(hook.requests[-1].body)
    print(f"\nmonitor pass: {baseline * 1000:.0f} ms without alerts, {took * 1000:.0f} ms with a hanging webhook")


def test_a_guard_takes_notify_timeout_as_any_duration_and_refuses_a_bad_one(sqlite_url, sqlite_engine, hooks):
    from auditctl import StuckAuditPrevention
    from auditctl.errors import ConfigError

    hook = hooks()
    for bad in ("soon", -1, 0, float("nan")):
        with pytest.raises(ConfigError, match="notify_timeout"):
            StuckAuditPrevention(sqlite_url, worker_id="w", slack_webhook=[hook.url()], notify_timeout=bad)
    options = {"heartbeat_interval": 0.5, "stale_after": 2, "max_age": 30, "stall_after": 3}
    with StuckAuditPrevention(sqlite_url, worker_id="alerting", slack_webhook=[hook.url()], notify_timeout="2s",
                              **options) as guard:
        stuck = make_running(sqlite_engine, 1, silent_for=700)[0]
        assert guard._monitor_once() is True
        wait_for(lambda: delivery_states(sqlite_engine) == ["sent"], timeout=5, message="the alert, as a config file's 2s")
    assert f"#{stuck}" in json.dumps(hook.requests[-1].body)


# --- rate limits, crashes, expiry -----------------------------------------------------------------------------------


def test_a_429_with_retry_after_holds_every_event_for_that_destination_until_then(engine, hooks, fast_backoff):
    hook = hooks()
    hook.answer(Answer(status=429, headers={"Retry-After": "1"}, body=b"slow down"))
    destinations = destinations_from(webhook=hook.url())
    first = stuck_and_recovered(engine, 1)
    report = deliver(engine, destinations)
    assert report.results[0].status == 429 and report.results[0].error == "HTTP 429: slow down"
    assert 0.9 <= report.next_due <= 1.0
    second = stuck_and_recovered(engine, 1)  # a new event waits with the others
    assert deliver(engine, destinations).sent == 0 and len(hook.requests) == 1, "asked again before Retry-After"
    wait_for(lambda: deliver(engine, destinations).sent, timeout=5, interval=0.1, message="the retry")
    assert len(hook.requests) == 2
    assert hook.requests[1].at - hook.requests[0].at >= 0.95
    # The message refused goes again as it was; the event written meanwhile follows in its own.
    assert audit_ids_in(hook.requests[1].body) == first
    assert deliver(engine, destinations).sent == 1 and audit_ids_in(hook.requests[2].body) == second


def test_a_crash_between_sending_and_marking_sends_again_with_the_same_idempotency_key(engine, hooks, monkeypatch):
    hook = hooks()
    destinations = destinations_from(webhook=hook.url())
    stuck_and_recovered(engine, 1)
    monkeypatch.setattr(sender, "CLAIM_MARGIN", 0.0)

    def crash(*_args):
        raise RuntimeError("the process died here")

    monkeypatch.setattr(sender, "_mark_sent", crash)
    # The claim lasts the timeout (CLAIM_MARGIN 0): long enough that the next call surely comes
    # inside it, even on a loaded machine (0.3 s was not, once).
    deliver(engine, destinations, timeout=1.5)
    assert len(hook.requests) == 1 and delivery_states(engine) == ["sending"]
    [held] = undelivered(engine, destinations)
    with read_connection(engine) as connection:
        assert held.status == "sending" and held.next_attempt_at > fetch_now(connection), "next try: when the claim ends"
    monkeypatch.undo()
    assert deliver(engine, destinations, timeout=0.3).sent == 0, "claimed by a live sender: not sent again"
    stuck_and_recovered(engine, 1)  # a new event meanwhile: it must not change the message sent again
    time.sleep(1.6)  # the dead sender's claim runs out
    assert deliver(engine, destinations, timeout=0.3).sent == 1
    assert deliver(engine, destinations, timeout=0.3).sent == 1
    first, again, new = hook.requests
    assert again.headers["Idempotency-Key"] == first.headers["Idempotency-Key"] == first.body["idempotency_key"]
    assert again.body == first.body
    assert new.headers["Idempotency-Key"] != first.headers["Idempotency-Key"] and len(new.body["events"]) == 1
    assert delivery_states(engine) == ["sent", "sent"]


def test_a_failed_message_is_tried_again_alone_with_its_key_while_newer_events_wait_their_turn(engine, hooks,
                                                                                              fast_backoff):
    """A POST that timed out may have reached the receiver: its retry must be the same message."""
    hook = hooks()
    destinations = destinations_from(webhook=hook.url())
    stuck_and_recovered(engine, 1)
    hook.answer(Answer(status=504, body=b"gateway timeout"))
    assert deliver(engine, destinations).results[0].error.startswith("HTTP 504")
    stuck_and_recovered(engine, 1)
    wait_for(lambda: deliver(engine, destinations).sent, timeout=5, interval=0.1, message="the retry")
    assert deliver(engine, destinations).sent == 1
    failed, retried, new = hook.requests
    assert retried.headers["Idempotency-Key"] == failed.headers["Idempotency-Key"] and retried.body == failed.body
    assert len(new.body["events"]) == 1 and new.body["events"][0] != failed.body["events"][0]
    assert delivery_states(engine) == ["sent", "sent"]


def test_a_receiver_that_refuses_a_large_body_with_413_gets_the_events_in_smaller_messages_each_once(engine, hooks):
    """nginx answers 413 to a body over its client_max_body_size (1 MB by default). A message of many
    events was sent whole again and again, refused every time, until its events expired a day later."""
    hook = hooks()
    destinations = destinations_from(webhook=hook.url())
    recovered = [stuck_and_recovered(engine, 3) for _ in range(8)]  # 8 events of 3 audits each
    one_event = len(json.dumps(sender._message(destinations[0], [
        OutboxEvent(1, None, "recovered", {"audits": [{"id": 1, "target": "x" * 40, "reasons": ["stale_heartbeat"]}] * 3})],
        "auditctl-" + "0" * 32)))
    hook.max_body = 3 * one_event
    for _ in range(20):
        if not deliver(engine, destinations).results[0].pending:
            break
    taken = [r for r in hook.requests if r.answered == 200]
    assert any(r.answered == 413 for r in hook.requests) and all(r.size <= hook.max_body for r in taken)
    sent = [audit for r in taken for audit in audit_ids_in(r.body)]
    assert sorted(sent) == sorted(i for ids in recovered for i in ids), "every audit reported once"
    assert delivery_states(engine) == ["sent"] * 8
    assert len(hook.requests) <= 2 * 8, "each half a message of its own, never merged again into one too large"


def test_one_event_a_receiver_refuses_as_too_large_on_its_own_is_kept_and_said(engine, hooks, fast_backoff):
    hook = hooks()
    hook.max_body = 100
    destinations = destinations_from(webhook=hook.url())
    stuck_and_recovered(engine, 1)
    stuck_and_recovered(engine, 1)
    first = deliver(engine, destinations).results[0]
    assert first.status == 413 and "too large" in first.error and first.pending == 2
    wait_for(lambda: deliver(engine, destinations).results[0].error.startswith("HTTP 413"), timeout=5, interval=0.1,
             message="the event on its own")
    assert [len(r.body["events"]) for r in hook.requests][:2] == [2, 1]
    assert delivery_states(engine) == ["pending", "pending"]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_sender_never_sends_part_of_a_message_another_sender_holds_locked(engine):
    """Two earlier messages are due; a sender whose LIMIT stops inside the second locks part of it
    (FOR UPDATE SKIP LOCKED) while it sends the first. Another sender must not send the rest as a
    message of its own, under another key."""
    from sqlalchemy import update

    from auditctl.notify.sender import _claim
    from auditctl.schema import notification_deliveries as D

    # 6 outbox events (one per batch), all with a delivery row for the destination.
    stuck_and_recovered(engine, 6, batch_size=1)
    [dest] = destinations_from(webhook="http://127.0.0.1:9/hook/secretsecret")
    with write_transaction(engine) as c:
        now = fetch_now(c)
        rows, _, _ = _claim(c, dest, now, now + timedelta(seconds=5), 200)  # inserts the rows, claims all 6
    ids = sorted(r.notification_id for r in rows)
    assert len(ids) == 6
    # Two earlier messages that failed: G = first 2 events (claim T1), H = last 4 (claim T2).
    t1, t2 = now - timedelta(seconds=30), now - timedelta(seconds=20)
    with write_transaction(engine) as c:
        c.execute(update(D).where(D.c.notification_id.in_(ids[:2])).values(status="pending", claimed_until=t1,
                                                                            next_attempt_at=now - timedelta(seconds=10)))
        c.execute(update(D).where(D.c.notification_id.in_(ids[2:])).values(status="pending", claimed_until=t2,
                                                                            next_attempt_at=now - timedelta(seconds=10)))
    # Sender A (limit 4) holds its transaction: it locked G and half of H, claims G.
    a_inside, b_done = threading.Event(), threading.Event()
    got = {}

    def sender_b():
        a_inside.wait()
        with write_transaction(engine) as c:
            n = fetch_now(c)
            got["b"] = sorted(r.notification_id for r in _claim(c, dest, n, n + timedelta(seconds=5), 4)[0])
        b_done.set()

    thread = threading.Thread(target=sender_b)
    thread.start()
    with write_transaction(engine) as c:
        n = fetch_now(c)
        got["a"] = sorted(r.notification_id for r in _claim(c, dest, n, n + timedelta(seconds=5), 4)[0])
        a_inside.set()
        b_done.wait(10)
    thread.join()
    assert got["a"] == ids[:2]
    # Expected: B takes nothing or H whole (ids[2:]); a part of H is a new message with a new key.
    assert got["b"] in ([], ids[2:]), f"B sent part of H as its own message: {got['b']} of {ids[2:]}"


def test_one_notify_run_sends_the_message_tried_before_then_the_newer_events_a_second_later(engine, database_url,
                                                                                          hooks, fast_backoff):
    hook = hooks()
    url = hook.url()
    stuck_and_recovered(engine, 1)
    hook.answer(Answer(status=500, body=b"down"))
    assert invoke("notify", "--database-url", database_url, "--webhook", url).exit_code == 1
    stuck_and_recovered(engine, 1)
    time.sleep(0.3)  # past the backoff
    sent = invoke("notify", "--database-url", database_url, "--webhook", url)
    assert sent.exit_code == 0 and sent.stderr.count("Alerts: sent 1 event in 1 message") == 2, sent.stderr
    failed, retried, new = hook.requests
    assert retried.body == failed.body and new.at - retried.at >= 0.95


def test_notify_says_how_many_events_still_wait_for_a_destination_it_sent_to_when_the_run_stops(sqlite_engine,
                                                                                                  sqlite_url, hooks):
    """A run stops when a delivery fails: the destination that took a message and still has events due
    was reported again as "sent 200 events in 1 message", not as what still waits."""
    good, bad = hooks(), hooks()
    bad.always(Answer(status=500, body=b"down"))
    make_running(sqlite_engine, 201, silent_for=700)
    recover_stuck(sqlite_engine, Thresholds(), actor=ACTOR, batch_size=1)  # 201 events: more than one message
    said = invoke("notify", "--database-url", sqlite_url, "--webhook", good.url("good"), "--webhook", bad.url("bad"))
    assert said.exit_code == 1, said.stderr
    assert len(good.requests) == 1 and sum("sent 200 events in 1 message" in line for line in said.stderr.splitlines()) == 1, said.stderr
    assert any(line.startswith("Alerts: 1 event still waits for a message to webhook ")
               for line in said.stderr.splitlines()), said.stderr


def test_a_tries_count_another_tool_wrote_as_text_is_counted_as_a_problem_when_the_retry_fails(sqlite_engine, sqlite_url,
                                                                                                  hooks, caplog):
    """The sender read a delivery's tries with a bare int(): 'many' (SQLite keeps text in an integer
    column) failed the attempt as "ValueError", left the row claimed until its claim ran out, and set no backoff."""
    hook, destinations = failed_message(sqlite_engine, hooks, events=1)
    with write_transaction(sqlite_engine) as connection:
        connection.execute(sql_text("UPDATE notification_deliveries SET attempts = 'many', "
                                    "next_attempt_at = '2000-01-01 00:00:00.000000'"))
    with caplog.at_level(logging.INFO, logger="auditctl.notify"):
        result = deliver(sqlite_engine, destinations).results[0]
    assert len(hook.requests) == 2, "the message was tried again"
    assert result.error == "HTTP 500: down", result.error
    assert result.unreadable_tries == 1
    assert "1 delivery row held a tries count that is no number (read as 0)" in result.describe()
    assert delivery_states(sqlite_engine) == ["pending"], "marked failed, with a backoff, not left claimed"
    assert "failed unexpectedly" not in caplog.text and "Traceback" not in caplog.text
    assert "tries count that is no number" in caplog.text
    # A count as large as SQLite holds is read, and the backoff stays the longest one.
    with write_transaction(sqlite_engine) as connection:
        connection.execute(sql_text("UPDATE notification_deliveries SET attempts = 9223372036854775807, "
                                    "next_attempt_at = '2000-01-01 00:00:00.000000'"))
    huge = deliver(sqlite_engine, destinations).results[0]
    assert huge.error == "HTTP 500: down" and huge.unreadable_tries == 0 and huge.retry_in <= sender.BACKOFF_MAX * 1.2
    # The command line says it too, and goes on.
    with write_transaction(sqlite_engine) as connection:
        connection.execute(sql_text("UPDATE notification_deliveries SET attempts = 'x''); --', "
                                    "next_attempt_at = '2000-01-01 00:00:00.000000'"))
    said = invoke("notify", "--database-url", sqlite_url, "--webhook", hook.url())
    assert said.exit_code == 1 and "HTTP 500: down" in said.stderr and "tries count that is no number" in said.stderr


def test_events_expire_undelivered_and_leave_the_backlog(engine, database_url, hooks):
    hook = hooks()
    hook.always(Answer(status=500))
    destinations = destinations_from(slack=hook.url())
    stuck_and_recovered(engine, 1)
    deliver(engine, destinations)
    assert delivery_states(engine) == ["pending"]
    stuck_and_recovered(engine, 1)  # never seen by any sender
    with write_transaction(engine) as connection:
        connection.execute(update(notifications).values(expires_at=fetch_now(connection) - timedelta(seconds=1)))
    hook.always(Answer())
    report = deliver(engine, destinations)
    assert report.sent == 0 and report.results[0].expired == 1 and len(hook.requests) == 1
    assert delivery_states(engine) == ["expired"], "an expired event gets no delivery row"
    assert undelivered(engine, destinations) == []
    status = invoke("notify", "--status", "--database-url", database_url)
    assert status.exit_code == 0 and status.stderr.startswith("Nothing undelivered")


def test_an_event_whose_creation_time_another_tool_garbled_is_still_sent_to_discord_and_slack(sqlite_engine, hooks):
    hook = hooks()
    stuck_and_recovered(sqlite_engine, 1)
    stuck_and_recovered(sqlite_engine, 1)
    with write_transaction(sqlite_engine) as connection:
        first = connection.execute(select(func.min(notifications.c.id))).scalar_one()
        connection.exec_driver_sql("UPDATE notifications SET created_at = 'garbage' WHERE id = ?", (first,))
    report = deliver(sqlite_engine, destinations_from(discord=hook.url("discord"), slack=hook.url("slack")))
    assert report.sent == 4, report  # both events, to both destinations
    discord_body = next(r.body for r in hook.requests if "embeds" in r.body)
    assert discord_body["embeds"][-1]["timestamp"].endswith("Z"), "the readable event's time"


def test_a_measurement_too_large_for_a_float_in_an_event_another_tool_wrote_does_not_hold_back_the_alert(engine, hooks):
    """JSON holds a 400-digit number (so do SQLite's text and PostgreSQL's jsonb); Python reads it as an
    int that no float holds. The message is still formatted and sent, that figure left out."""
    hook = hooks()
    stuck_and_recovered(engine, 1)
    with write_transaction(engine) as connection:
        event_id, payload = connection.execute(select(notifications.c.id, notifications.c.payload)).one()
        payload["audits"][0]["measured"].update(silence_seconds=10**400, stale_after=10**400)
        cast = "CAST(:payload AS jsonb)" if engine.dialect.name == "postgresql" else ":payload"
        connection.execute(sql_text(f"UPDATE notifications SET payload = {cast} WHERE id = :id"),
                           {"payload": json.dumps(payload), "id": event_id})
    report = deliver(engine, destinations_from(slack=hook.url("slack"), discord=hook.url("discord"), webhook=hook.url()))
    assert report.sent == 3 and [r.error for r in report.results] == [None] * 3, report
    assert set(delivery_states(engine)) == {"sent"}
    slack_body = json.dumps(next(r.body for r in hook.requests if "/slack/" in r.path))
    assert "running " in slack_body and "silent " not in slack_body, "the figures that can be read, and not the other"


def test_an_event_whose_expiry_another_tool_garbled_expires_instead_of_being_retried_for_ever(sqlite_engine, hooks):
    hook = hooks()
    stuck_and_recovered(sqlite_engine, 1)
    stuck_and_recovered(sqlite_engine, 1)
    with write_transaction(sqlite_engine) as connection:
        first, second = connection.execute(select(notifications.c.id).order_by(notifications.c.id)).scalars()
        connection.exec_driver_sql("UPDATE notifications SET expires_at = 'garbage' WHERE id = ?", (first,))
        connection.exec_driver_sql("UPDATE notifications SET expires_at = '9999-01-01 00:00:00.000000' WHERE id = ?",
                                   (second,))
    destinations = destinations_from(slack=hook.url())
    assert [u.id for u in undelivered(sqlite_engine, destinations)] == []
    report = deliver(sqlite_engine, destinations)
    assert report.sent == 0 and hook.requests == []
    assert delivery_states(sqlite_engine) == []


# --- several senders at once ----------------------------------------------------------------------------------------


def test_concurrent_senders_claim_each_event_once(engine, database_url, hooks):
    hook = hooks()
    hook.always(Answer(hang=0.05))
    destinations = destinations_from(webhook=hook.url())
    engines = [create_engine(database_url) for _ in range(3)]
    done = threading.Event()

    def send(own):
        while not done.is_set():
            deliver(own, destinations)

    senders = [threading.Thread(target=send, args=(own,)) for own in engines]
    for thread in senders:
        thread.start()
    try:
        recovered = []
        for _ in range(6):
            recovered += stuck_and_recovered(engine, 2)
        wait_for(lambda: sorted(i for r in hook.requests if r.body for i in audit_ids_in(r.body)) == recovered,
                 timeout=15, message="every event delivered")
    finally:
        done.set()
        for thread in senders:
            thread.join(10)
        for own in engines:
            own.dispose()
    keys = [e["key"] for r in hook.requests for e in r.body["events"]]
    assert len(keys) == len(set(keys)) == 6


def test_an_idle_sender_waits_for_another_senders_claim_to_run_out_instead_of_polling(engine, database_url, hooks,
                                                                                     monkeypatch):
    from auditctl.notify import Notifier, background

    hook = hooks()
    hook.always(Answer(hang=60))
    destinations = destinations_from(webhook=hook.url())
    stuck_and_recovered(engine, 1)
    other = threading.Thread(target=deliver, args=(engine, destinations), kwargs={"timeout": 10})
    other.start()  # another sender: it claims the event for 10 s + CLAIM_MARGIN, and its POST hangs
    try:
        hook.wait_for(1)
        report = deliver(engine, destinations, timeout=10)
        assert report.sent == 0 and report.pending == 1 and delivery_states(engine) == ["sending"]
        assert report.next_due > 10 + sender.CLAIM_MARGIN - 5, "the event is next tried when the claim runs out"
        calls = []
        monkeypatch.setattr(background, "deliver", lambda *a, **k: calls.append(1) or deliver(*a, **k))
        notifier = Notifier(create_engine(database_url), destinations, timeout=10).start()
        time.sleep(2)
        notifier.stop()
        notifier.engine.dispose()
        assert len(calls) == 1, f"{len(calls)} looks at the outbox in 2 s while another sender held the claim"
    finally:
        hook.release()
        other.join(15)
    assert delivery_states(engine) == ["sent"] and len(hook.requests) == 1


# --- the fleet back to healthy --------------------------------------------------------------------------------------


def test_the_fleet_healthy_event_is_written_once_after_recoveries_whoever_notices(engine):
    first, second = Monitor(engine, Thresholds(), actor=ACTOR), Monitor(engine, Thresholds(), actor=Actor.command("other"))
    first.run_pass()
    assert event_count(engine, "fleet_healthy") == 0, "no recovery yet: nothing to announce"
    make_running(engine, 2, silent_for=700)
    assert len(first.run_pass().recovered) == 2 and event_count(engine, "fleet_healthy") == 0
    first.run_pass()
    assert event_count(engine, "fleet_healthy") == 1
    second.run_pass()
    first.run_pass()
    assert event_count(engine, "fleet_healthy") == 1, "announced once, whoever notices"
    filtered = Monitor(engine, Thresholds(), actor=ACTOR, filters=Filters(workers=("worker-9",)))
    make_running(engine, 1, silent_for=700)
    assert len(filtered.run_pass().recovered) == 0 and event_count(engine, "fleet_healthy") == 1
    assert len(second.run_pass().recovered) == 1
    filtered.run_pass()
    assert event_count(engine, "fleet_healthy") == 1, "a filtered monitor sees part of the fleet only"
    second.run_pass()
    assert event_count(engine, "fleet_healthy") == 2


def test_the_fleet_is_not_announced_healthy_when_a_pass_skips_an_audit_it_could_not_recover(engine):
    from dbtools import install_abort_trigger

    monitor = Monitor(engine, Thresholds(), actor=ACTOR)
    stuck, refused = make_running(engine, 2, silent_for=700)
    install_abort_trigger(engine, "refuse_history", table="audit_events", event="INSERT",
                          when_sqlite=f"NEW.audit_id = {refused}", when_pg=f"NEW.audit_id = {refused}")
    first = monitor.run_pass()
    assert [r.id for r in first.recovered] == [stuck] and [s.id for s in first.skipped] == [refused]
    again = monitor.run_pass()
    assert again.recovered == [] and [s.id for s in again.skipped] == [refused]
    assert event_count(engine, "fleet_healthy") == 0, "an audit still stuck was reported as a healthy fleet"


def test_two_processes_noticing_the_same_thing_write_one_event_and_neither_fails(engine):
    """The unique key, not a read before the write, is what keeps a second noticer out: the read
    cannot see a replica's write that has not committed yet."""
    from auditctl import outbox

    for expected in (True, False):
        with write_transaction(engine) as connection:
            assert outbox.enqueue(connection, "fleet_healthy", {"after_event": 7}, dedupe_key="fleet_healthy:after:7") \
                is expected
    assert event_count(engine, "fleet_healthy") == 1


def test_a_failed_post_is_retried_after_1_2_4_seconds_up_to_5_minutes_as_readme_says():
    for attempts, seconds in ((1, 1), (2, 2), (3, 4), (4, 8), (9, 256), (10, 300), (60, 300)):
        waits = [sender.backoff(attempts) for _ in range(200)]
        assert 0.8 * seconds <= min(waits) and max(waits) <= 1.2 * seconds, (attempts, min(waits), max(waits))


# --- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["recover"], ["reset-all", "--include-stuck", "--yes"]])
def test_a_reader_that_leaves_early_cuts_the_listing_not_the_summary_or_the_alerts(sqlite_url, sqlite_engine, hooks,
                                                                                 tmp_path, command):
    hook = hooks()
    make_running(sqlite_engine, 1500, silent_for=700)  # far more than a pipe holds: head leaves mid-listing
    piped = subprocess.run(["bash", "-c", f'"{AUDITCTL}" "$@" -o csv --webhook "{hook.url()}" | head -1; '
                            'exit "${PIPESTATUS[0]}"', "run", *command, "--database-url", sqlite_url],
                           cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "Traceback" not in piped.stderr and len(piped.stdout.splitlines()) == 1
    assert "1500 audits" in piped.stderr and "Alerts: sent" in piped.stderr, piped.stderr
    assert len(hook.requests) >= 1


def test_recover_and_reset_all_alert_at_the_end_and_notify_retries_what_failed(database_url, engine, hooks, fast_backoff):
    hook = hooks()
    hook.always(Answer(status=500, body=b"no_service"))
    url = hook.url()
    make_running(engine, 2, silent_for=700)
    recovered = invoke("recover", "--database-url", database_url, "--webhook", url)
    assert recovered.exit_code == 0, "a failed alert never fails a recovery"
    assert (f"Alerts: could not deliver to webhook http://127.0.0.1:{hook.port}/***: HTTP 500: no_service; 1 event kept"
            in recovered.stderr)

    listed = invoke("notify", "--status", "-o", "json", "--database-url", database_url)
    records = json.loads(listed.stdout)
    assert [(r["event"], r["status"], r["attempts"], r["last_error"]) for r in records] == \
        [("recovered", "pending", 1, "HTTP 500: no_service")]
    assert records[0]["destination"] == f"webhook http://127.0.0.1:{hook.port}/***"
    assert records[0]["summary"] == "2 stuck audits recovered"
    as_csv = invoke("notify", "--status", "-o", "csv", "--database-url", database_url)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 1 and set(rows[0]) == set(records[0]), "the CSV has the columns JSON has keys for"
    table = invoke("notify", "--status", "--database-url", database_url, env={"COLUMNS": "200"})
    assert "recovered" in table.stdout and "HTTP 500: no_service" in table.stdout
    assert table.stderr.startswith("1 undelivered event")

    assert invoke("notify", "--database-url", database_url, "--webhook", url).exit_code == 1, "still failing"
    hook.always(Answer())
    wait_for(lambda: invoke("notify", "--database-url", database_url, "--webhook", url).exit_code == 0, timeout=10,
             interval=0.5, message="notify to succeed after the backoff")
    assert invoke("notify", "--status", "--database-url", database_url).stderr.startswith("Nothing undelivered")

    reset = invoke("reset-all", "--yes", "--database-url", database_url, env={"AUDITCTL_WEBHOOK": url})
    assert reset.exit_code == 0 and "Alerts: sent 1 event in 1 message" in reset.stderr
    assert hook.requests[-1].body["title"] == "2 audits reset by auditctl reset-all"
    assert invoke("notify", "--database-url", database_url, "--webhook", url).stderr == "Nothing to deliver.\n"


def test_recover_says_when_its_alert_waits_for_a_destinations_retry_after(sqlite_url, sqlite_engine, hooks):
    hook = hooks()
    hook.answer(Answer(status=429, headers={"Retry-After": "60"}, body=b"slow down"))
    url = hook.url()
    make_running(sqlite_engine, 1, silent_for=700)
    first = invoke("recover", "--database-url", sqlite_url, "--webhook", url)
    assert "Alerts: could not deliver" in first.stderr and "next try in 1m" in first.stderr, first.stderr
    make_running(sqlite_engine, 1, silent_for=700, worker_id="worker-2")
    second = invoke("recover", "--database-url", sqlite_url, "--webhook", url)
    assert second.exit_code == 0 and len(hook.requests) == 1, "asked again before Retry-After"
    assert f"Alerts: 2 events for webhook http://127.0.0.1:{hook.port}/*** wait for a retry in" in second.stderr, \
        second.stderr
    assert "(`auditctl notify` retries)" in second.stderr


def test_watch_once_says_auditctl_notify_retries_when_its_alert_fails_not_that_it_is_retrying(sqlite_url,
                                                                                                 sqlite_engine, hooks):
    """``watch --once`` exits after its pass: its failed alert said "; retrying", but nothing in it retries.
    It says what recover says: the event is kept, and `auditctl notify` retries."""
    hook = hooks()
    hook.always(Answer(status=500, body=b"no_service"))
    make_running(sqlite_engine, 1, silent_for=700)
    result = invoke("watch", "--once", "--no-live", "--webhook", hook.url(), "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    failed = [line for line in result.output.splitlines() if "alerts: could not deliver" in line]
    assert len(failed) == 1, result.output
    assert failed[0].endswith("(`auditctl notify` retries)") and "retrying" not in failed[0], failed[0]


def test_notify_without_a_destination_or_with_a_bad_url_is_a_usage_error(sqlite_url):
    database_url = sqlite_url
    missing = invoke("notify", "--database-url", database_url)
    assert missing.exit_code == 2 and "no destination" in missing.stderr
    bad = invoke("recover", "--database-url", database_url, "--slack-webhook", f"ftp://example.com/{SECRET}")
    assert bad.exit_code == 2 and "slack webhook ftp://example.com/*** is not an http(s) URL" in bad.stderr
    for broken in (f"http://[::1/{SECRET}", f"https://[fe80::1%eth0/{SECRET}", f"http://example.com:port/{SECRET}"):
        refused = invoke("recover", "--database-url", database_url, "--webhook", broken)
        assert refused.exit_code == 2 and "is not an http(s) URL" in refused.stderr and "Traceback" not in refused.output
        assert SECRET not in refused.output


PASSWORD = "S3cretPassw0rd"


@pytest.mark.parametrize("flag, value, why", [
    ("--webhook", f"https://alerts:{PASSWORD}@hooks.example.com/incoming/{SECRET}",
     "webhook https://hooks.example.com/*** holds a user name or password before its host: auditctl cannot send them"),
    ("--discord-webhook", f"http://127.0.0.1:9/api/webhooks/{SECRET}\nhttp://127.0.0.1:9/api/webhooks/other{SECRET}",
     "discord webhook http://127.0.0.1:9/*** holds a space, line break or control character"),
    ("--slack-webhook", f"http://127.0.0.1:9/services/{SECRET} {PASSWORD}",
     "slack webhook http://127.0.0.1:9/*** holds a space, line break or control character"),
])
def test_a_webhook_url_with_a_password_or_a_line_break_is_refused_masked_before_anything_is_sent(sqlite_url, sqlite_engine,
                                                                                                flag, value, why):
    stuck_and_recovered(sqlite_engine, 1)
    refused = invoke("notify", "--database-url", sqlite_url, flag, value)
    assert refused.exit_code == 2 and why in refused.stderr, refused.stderr
    assert PASSWORD not in refused.output and "Traceback" not in refused.output
    assert delivery_states(sqlite_engine) == [], "nothing was tried, so nothing was recorded"


def test_a_webhook_password_from_the_environment_or_the_config_file_is_refused_masked_too(sqlite_url, tmp_path):
    url = f"https://alerts:{PASSWORD}@hooks.example.com/incoming/{SECRET}"
    config = tmp_path / "auditctl.toml"
    config.write_text(f'webhook = ["{url}"]\n')
    for args, env in (([], {"AUDITCTL_WEBHOOK": url}), (["--config", config], None)):
        refused = invoke(*args, "notify", "--database-url", sqlite_url, env=env)
        assert refused.exit_code == 2, refused.output
        assert "webhook https://hooks.example.com/*** holds a user name or password" in refused.stderr
        assert PASSWORD not in refused.output and "Traceback" not in refused.output


def test_a_webhook_variable_is_split_on_commas_only_like_the_flag(sqlite_url):
    spaced = invoke("notify", "--database-url", sqlite_url,
                    env={"AUDITCTL_SLACK_WEBHOOK": f"https://hooks.example.com/a/{SECRET} https://hooks.example.com/b/{SECRET}"})
    assert spaced.exit_code == 2 and "holds a space, line break or control character" in spaced.stderr, spaced.stderr
    two = invoke("config", "-o", "json", "--database-url", sqlite_url,
                 env={"AUDITCTL_SLACK_WEBHOOK": f"https://hooks.example.com/a/{SECRET}, https://hooks.example.com/b/{SECRET}"})
    slack_setting = next(r for r in json.loads(two.stdout) if r["setting"] == "slack_webhook")
    assert slack_setting["value"] == "https://hooks.example.com/***, https://hooks.example.com/***"


@pytest.mark.parametrize("url", [f"http://alerts:{PASSWORD}@127.0.0.1/services/{SECRET}",
                                 f"http://127.0.0.1:9/services/{SECRET}\nhttp://127.0.0.1:9/services/{SECRET}2",
                                 f"http://127.0.0.1:9/services/{SECRET}\x01{PASSWORD}"])
def test_a_url_that_reached_a_sender_unchecked_leaves_no_secret_in_its_error_or_the_database(sqlite_url, sqlite_engine,
                                                                                           url):
    from auditctl.notify import Destination

    stuck_and_recovered(sqlite_engine, 1)
    report = deliver(sqlite_engine, [Destination("webhook", url)], timeout=2)  # not through check_url
    error = report.results[0].error
    assert error.startswith("no answer: ") and "***" in error
    listed = invoke("notify", "--status", "-o", "json", "--database-url", sqlite_url)
    [record] = json.loads(listed.stdout)
    assert record["last_error"] == error
    for shown in (error, listed.stdout):
        assert SECRET not in shown and PASSWORD not in shown and "services" not in shown, shown


@pytest.mark.parametrize("body", [b"invalid token: xoxb-s3cr3t-token",
                                  b'The requested webhook "POST B0SECRET" is not registered.',
                                  b"no team T0SECRET"])
def test_a_receiver_that_quotes_part_of_the_url_back_leaves_no_part_of_the_secret_anywhere(sqlite_url, sqlite_engine,
                                                                                           hooks, body):
    hook = hooks()
    hook.always(Answer(status=403, body=body))
    stuck_and_recovered(sqlite_engine, 1)
    sent = invoke("notify", "--database-url", sqlite_url, "--webhook", hook.url())
    listed = invoke("notify", "--status", "-o", "json", "--database-url", sqlite_url)
    assert sent.exit_code == 1 and "HTTP 403: " in sent.stderr and "***" in sent.stderr
    with read_connection(sqlite_engine) as connection:
        stored = str(connection.execute(select(notification_deliveries)).all())
    for shown in (sent.output, listed.stdout, stored):
        for part in ("xoxb-s3cr3t-token", "T0SECRET", "B0SECRET"):
            assert part not in shown, (part, shown)


@pytest.mark.parametrize("url, shown", [
    (f"https://hooks.example.com:8443/hook/v1@{SECRET}", "https://***/***"),
    (f"http://127.0.0.1:9/hooks/team:ops@{SECRET}", "http://***/***"),
])
def test_a_webhook_whose_path_holds_an_at_sign_is_labelled_without_guessing_its_host(sqlite_url, url, shown):
    settings = json.loads(invoke("config", "-o", "json", "--database-url", sqlite_url, "--webhook", url).stdout)
    assert next(r for r in settings if r["setting"] == "webhook")["value"] == shown


def test_a_webhook_written_with_backslashes_is_refused_not_read_as_a_host(sqlite_url):
    refused = invoke("notify", "--database-url", sqlite_url, "--slack-webhook", "https://hooks.slack.com\\services\\T0SECRET")
    assert refused.exit_code == 2 and "slack webhook https://***/*** is not an http(s) URL" in refused.stderr
    assert "T0SECRET" not in refused.output


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_a_webhook_on_a_long_but_valid_host_name_is_delivered(engine, database_url):
    from auditctl.notify import Destination

    host = ".".join(["a" * 60] * 3) + ".example.com"  # 194 characters: a legal DNS name, longer than a label column
    stuck_and_recovered(engine, 1)
    report = deliver(engine, [Destination("webhook", f"http://{host}/services/{SECRET}")], timeout=2)
    assert report.results[0].error is not None and "value too long" not in report.results[0].error
    assert delivery_states(engine) == ["pending"], "the attempt was recorded, to be tried again"


def test_webhooks_come_from_the_config_file_too(sqlite_url, hooks, tmp_path):
    database_url = sqlite_url
    hook = hooks()
    config = tmp_path / "auditctl.toml"
    config.write_text(f'slack_webhook = ["{hook.url()}"]\nnotify_timeout = "2s"\n')
    assert invoke("demo", "--database-url", database_url).exit_code == 0
    result = invoke("--config", config, "recover", "--database-url", database_url)
    assert result.exit_code == 0 and f"Alerts: sent 2 events in 1 message to slack http://127.0.0.1:{hook.port}/***" \
        in result.stderr
    assert len(hook.requests) == 1 and hook.requests[0].body["blocks"][0]["text"]["text"] == "5 stuck audits recovered"


def requeued_gone_worker_event(number: int) -> OutboxEvent:
    return OutboxEvent(number, None, "recovered", {"actor": "watch", "audits": [
        {"id": 5, "target": "t", "reasons": ["worker_gone"], "status": "pending", "worker_id": "worker-3",
         "explanation": ["gone"], "measured": {"worker_gone": "worker process 9 no longer exists"}}]})


def test_fleet_healthy_followed_by_a_new_recovery_in_one_message_does_not_say_healthy_again():
    """Only the latest news counts: healthy, then stuck again, is not "healthy again"; the other way round it is."""
    healthy = OutboxEvent(1, None, "fleet_healthy", {"actor": "watch"})
    then_stuck = build([healthy, requeued_gone_worker_event(2)])
    assert then_stuck.healthy is None and "healthy" not in then_stuck.title
    assert "healthy" not in json.dumps(slack.message(then_stuck, "k")).lower()
    assert all("healthy" not in e["title"].lower() for e in discord.message(then_stuck, "k")["embeds"])

    stuck_then_healthy = build([requeued_gone_worker_event(1), OutboxEvent(2, None, "fleet_healthy", {"actor": "watch"})])
    assert stuck_then_healthy.healthy is not None and stuck_then_healthy.title.endswith("; fleet healthy again")


def test_a_requeued_audit_whose_worker_is_gone_is_an_alert_not_a_warning_as_readme_says():
    """README: ``severity`` is ``alert`` when audits failed *or a worker is gone*, even when every audit was requeued."""
    digest = build([requeued_gone_worker_event(1)])
    assert digest.recovered == [] and [g.worker_id for g in digest.gone] == ["worker-3"]
    assert digest.severity == "alert"
    assert slack.message(digest, "k")["text"].startswith(slack.EMOJI["alert"])
    assert build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": 6, "target": "t", "reasons": ["stale_heartbeat"], "status": "pending"}]})]).severity == "warning"


def test_reset_batches_of_one_operation_read_as_one_reset_with_their_origins_added_up():
    """A reset-all of several batches announces each batch; the message says one reset, counting every batch."""
    def batch(number, by_origin, count):
        return OutboxEvent(number, None, "reset", {"actor": "reset-all", "host": "ops-1", "count": count,
                                                   "ids": list(range(number * 10, number * 10 + count)),
                                                   "by_origin": by_origin})

    digest = build([batch(1, {"stuck": 1, "error": 1}, 2), batch(2, {"stuck": 2, "error": 0}, 2)])
    assert digest.title == "4 audits reset by reset-all"
    assert "*Reset by reset-all* on ops-1: 4 audits back to pending (1 error, 3 stuck)" in json.dumps(slack.message(digest, "k"))
    (embed,) = discord.message(digest, "k")["embeds"]
    assert embed["title"] == "4 audits reset" and "reset 4 audits to pending (1 error, 3 stuck)" in embed["description"]


def test_a_reset_event_another_tool_wrote_without_a_count_is_counted_by_its_ids():
    digest = build([OutboxEvent(1, None, "reset", {"actor": "script", "ids": [4, 5, "6"]})])
    assert digest.title == "3 audits reset by script" and digest.counts()["reset"] == 3
    assert discord.message(digest, "k")["embeds"][0]["title"] == "3 audits reset"


def test_the_idempotency_key_of_a_message_does_not_depend_on_the_order_its_events_were_claimed():
    from auditctl.notify.digest import idempotency_key

    first, second = OutboxEvent(3, None, "reset", {"count": 1}), OutboxEvent(9, None, "reset", {"count": 2})
    assert idempotency_key("slack:1", [second, first]) == idempotency_key("slack:1", [first, second])
    assert idempotency_key("slack:1", [first, second]) != idempotency_key("discord:1", [first, second])


def test_a_message_lists_ten_audits_by_name_and_counts_the_eleventh():
    digest = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": i, "target": f"https://t{i}.example", "reasons": ["stale_heartbeat"], "status": "failed"} for i in range(11)]})])
    (embed,) = discord.message(digest, "k")["embeds"]
    assert len(embed["fields"]) == 10 and "and 1 more" in embed["description"]
    blocks = slack.message(digest, "k")["blocks"]
    assert sum(1 for b in blocks if b.get("text", {}).get("text", "").startswith("*#")) == 10
    assert any("_and 1 more (" in b.get("text", {}).get("text", "") for b in blocks)
    # Slack lists failed and requeued audits together: 5 failed and 6 requeued are 11, one counted.
    mixed = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": i, "target": f"https://t{i}.example", "reasons": ["stale_heartbeat"], "status": "pending" if i % 2 else "failed"}
        for i in range(11)]})])
    assert any("_and 1 more (" in b.get("text", {}).get("text", "") for b in slack.message(mixed, "k")["blocks"])


def test_a_slack_header_keeps_150_characters_when_a_long_worker_id_is_gone():
    digest = build([gone_worker_event(1, "w" * 200)])
    header = slack.message(digest, "k")["blocks"][0]
    assert header["type"] == "header" and len(header["text"]["text"]) == 150


def test_a_digest_names_each_recoverer_once_however_many_of_its_events_it_carries():
    def recovery(number):
        return OutboxEvent(number, None, "recovered", {"actor": "watch", "audits": [
            {"id": number, "target": "t", "reasons": ["stale_heartbeat"], "status": "failed"}]})

    digest = build([recovery(1), recovery(2), OutboxEvent(3, None, "recovered", {"actor": "recover", "audits": []})])
    assert digest.actors == ["watch", "recover"]
    assert "*Recovered by:* watch, recover" in json.dumps(slack.message(digest, "k"))


def test_an_events_key_differs_between_two_databases_whose_outboxes_reuse_an_id():
    """"Unique across databases": a restored or second database numbers its events from 1 again."""
    from datetime import datetime, timezone

    one = OutboxEvent(1, datetime(2026, 1, 1, tzinfo=timezone.utc), "reset", {})
    other = OutboxEvent(1, datetime(2026, 3, 1, tzinfo=timezone.utc), "reset", {})
    assert one.key != other.key and one.key == OutboxEvent(1, one.created_at, "reset", {"count": 9}).key


def test_a_message_of_only_unreadable_events_is_info_not_ok():
    digest = build([OutboxEvent(1, None, "garbled", {}), OutboxEvent(2, None, "recovered", {"audits": "x"})])
    assert digest.unreadable == 2 and digest.severity == "info"
    assert slack.message(digest, "k")["text"].startswith(slack.EMOJI["info"])


def test_slack_shows_an_ampersand_in_database_text_as_text_so_no_entity_reaches_slack_unescaped():
    """Slack reads ``&lt;`` in a message as ``<``: a target holding the entity text is escaped as ``&amp;lt;``."""
    digest = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": 1, "target": "a&b &lt;!channel&gt;", "reasons": ["stale_heartbeat"], "status": "failed"}]})])
    body = json.dumps(slack.message(digest, "k"))
    assert "a&amp;b &amp;lt;!channel&amp;gt;" in body and "&lt;!channel&gt;" not in body


def test_resets_by_many_operators_list_ten_in_slack_and_discord_and_keep_the_key_block():
    digest = build([OutboxEvent(i, None, "reset", {"actor": f"op-{i}", "count": 1, "ids": [i]}) for i in range(1, 61)])
    blocks = slack.message(digest, "k")["blocks"]
    assert sum(1 for b in blocks if b.get("text", {}).get("text", "").startswith("*Reset by")) == 10
    assert blocks[-1]["type"] == "context" and "idempotency key k" in blocks[-1]["elements"][0]["text"]
    (embed,) = discord.message(digest, "k")["embeds"]
    assert embed["title"] == "60 audits reset" and len(embed["description"].splitlines()) == 11


def test_resets_and_gone_workers_past_ten_are_counted_in_an_and_more_line_in_slack_and_discord():
    """Ten of each are listed by name; the others were dropped without a word, so a reader could take
    the ten for all of them."""
    resets = [OutboxEvent(i, None, "reset", {"actor": f"op-{i}", "count": 2, "ids": [2 * i, 2 * i + 1]})
              for i in range(1, 61)]
    gone = [gone_worker_event(100 + n, f"w{n}", audits=3) for n in range(13)]
    digest = build(resets + gone)
    texts = [b.get("text", {}).get("text", "") for b in slack.message(digest, "k")["blocks"]]
    assert "_and 50 more resets (100 audits back to pending)_" in texts
    assert "_and 3 more workers gone (9 audits recovered)_" in texts
    embeds = {e["title"]: e for e in discord.message(digest, "k")["embeds"]}
    assert embeds["120 audits reset"]["description"].splitlines()[-1] == "and 50 more resets (100 audits back to pending)"
    assert embeds["Workers gone"]["description"].splitlines()[-1] == "and 3 more workers gone (9 audits recovered)"


def test_a_discord_message_cut_to_fit_keeps_the_and_more_line_of_resets_and_gone_workers():
    long = "x" * 190
    digest = build([OutboxEvent(i, None, "reset", {"actor": f"op-{i}-{long}", "count": 1, "ids": [i]}) for i in range(1, 31)]
                   + [gone_worker_event(100 + n, f"w{n}-{long}", audits=2) for n in range(30)])
    body = discord.message(digest, "k")
    assert discord_embed_chars(body) <= discord.TOTAL_LIMIT
    embeds = {e["title"]: e for e in body["embeds"]}
    assert embeds["30 audits reset"]["description"].endswith("\nand 20 more resets (20 audits back to pending)")
    assert embeds["Workers gone"]["description"].endswith("\nand 20 more workers gone (40 audits recovered)")
    assert all(not key.startswith("_") for e in body["embeds"] for key in e)


def test_a_discord_message_too_long_drops_audits_from_the_fullest_embed_first_and_cuts_each_field_to_1024():
    """Ten failed and three requeued audits with long explanations: fields go from the fullest embed
    first, so the requeued audits are not the first to disappear; each field value keeps 1,024."""
    digest = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": i, "target": f"https://t{i}.example", "reasons": ["stale_heartbeat"], "status": "pending" if i >= 10 else "failed",
         "explanation": ["x" * 3000]} for i in range(13)]})])
    body = discord.message(digest, "k")
    failed, requeued = body["embeds"]
    assert discord_embed_chars(body) <= discord.TOTAL_LIMIT
    assert failed["fields"] and requeued["fields"] and abs(len(failed["fields"]) - len(requeued["fields"])) <= 1
    assert all(len(f["value"]) == 1024 for e in body["embeds"] for f in e["fields"])


def test_a_discord_message_of_long_descriptions_is_cut_to_its_own_limit_not_just_discords():
    events = [gone_worker_event(n, f"w{n}-" + "x" * 190, audits=2) for n in range(1, 13)]
    assert discord_embed_chars(discord.message(build(events), "k")) <= discord.TOTAL_LIMIT


def test_a_gone_worker_is_listed_once_with_every_audit_it_left_and_reasons_stored_as_one_text_still_count():
    """Two recoveries of one dead worker's audits, in two events; another tool wrote one audit's reasons as
    a plain string instead of a list."""
    digest = build([
        OutboxEvent(1, None, "recovered", {"audits": [
            {"id": 1, "target": "a", "reasons": ["worker_gone"], "status": "failed", "worker_id": "worker-3"},
            {"id": 2, "target": "b", "reasons": "worker_gone", "status": "failed", "worker_id": "worker-3"}]}),
        OutboxEvent(2, None, "recovered", {"audits": [
            {"id": 3, "target": "c", "reasons": ["worker_gone", "stale_heartbeat"], "status": "pending",
             "worker_id": "worker-3"}]})])
    assert [(g.worker_id, g.audits) for g in digest.gone] == [("worker-3", 3)]
    assert digest.reasons == {"worker_gone": 3, "stale_heartbeat": 1}
    assert digest.recovered[1].reasons == ["worker_gone"]


def test_a_digests_title_starts_with_a_capital_and_an_audit_without_a_status_counts_as_failed():
    assert build([OutboxEvent(1, None, "fleet_healthy", {"actor": "watch"})]).title == "Fleet healthy again"
    no_status = build([OutboxEvent(1, None, "recovered", {"audits": [{"id": 4, "target": "t", "reasons": ["stale_heartbeat"]}]})])
    assert (len(no_status.recovered), len(no_status.requeued), no_status.severity) == (1, 0, "alert")


def test_evidence_with_only_limits_reads_limits_without_a_leading_separator():
    from auditctl.notify.digest import evidence

    assert evidence({"stale_after": 600.0, "max_age": 1800.0}) == "limits stale_after 10m, max_age 30m"
    assert evidence({"silence_seconds": 1020.0, "stale_after": 600.0}) == "silent 17m; limits stale_after 10m"


def test_a_digests_reasons_read_most_frequent_first_then_by_name():
    digest = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": 1, "target": "a", "reasons": ["stale_heartbeat"]}, {"id": 2, "target": "b", "reasons": ["max_age_exceeded"]},
        {"id": 3, "target": "c", "reasons": ["worker_gone"]}, {"id": 4, "target": "d", "reasons": ["worker_gone"]}]})])
    assert digest.reason_counts() == "2 worker_gone, 1 max_age_exceeded, 1 stale_heartbeat"


def test_a_discord_message_still_says_how_many_audits_it_left_out_when_long_texts_drop_listed_audits():
    """5,000 recovered audits whose targets, worker ids and recoverer hold 100 KB each: the message keeps
    Discord's 6,000 characters and still says how many audits are not listed, fields dropped to fit included."""
    big = 100_000
    audits = [{"id": i, "target": "https://t.example/" + "x" * big, "reasons": ["stale_heartbeat"],
               "status": "failed" if i % 2 else "pending", "worker_id": "w" * big, "explanation": ["why"]}
              for i in range(5000)]
    body = discord.message(build([OutboxEvent(1, None, "recovered", {"actor": "a" * big, "audits": audits})]), "k")
    assert discord_embed_chars(body) <= 6000
    for embed in body["embeds"]:
        assert f"and {2500 - len(embed['fields'])} more (" in embed["description"], embed["description"][-200:]


def test_a_discord_message_counts_the_audits_it_drops_to_fit_in_its_and_more_line():
    """Ten failed audits with long explanations: those dropped to keep 6,000 characters are counted."""
    digest = build([OutboxEvent(1, None, "recovered", {"audits": [
        {"id": i, "target": f"https://t{i}.example", "reasons": ["stale_heartbeat"], "status": "failed",
         "explanation": ["x" * 3000]} for i in range(10)]})])
    (embed,) = discord.message(digest, "k")["embeds"]
    assert len(embed["fields"]) < 10
    assert embed["description"].endswith(f"and {10 - len(embed['fields'])} more ({MORE_AUDITS})")


def test_a_slack_message_keeps_40000_characters_when_5000_audits_and_resets_hold_100_kb_texts():
    """Long targets, worker ids, recoverers and resetting operators: every section is cut to Slack's
    3,000, and the sections together to Slack's 40,000, so Slack never refuses the message for its size."""
    big = 100_000
    audits = [{"id": i, "target": "https://t.example/" + "x" * big, "reasons": ["worker_gone"], "status": "failed",
               "worker_id": f"w{i}-" + "w" * big, "explanation": ["why"]} for i in range(5000)]
    events = [OutboxEvent(1, None, "recovered", {"actor": "a" * big, "audits": audits})]
    events += [OutboxEvent(n, None, "reset", {"actor": f"op{n}-" + "o" * big, "host": "h" * big, "count": 1, "ids": [n]})
               for n in range(2, 14)]
    body = slack.message(build(events), "k")
    texts = [b["text"]["text"] for b in body["blocks"] if "text" in b]
    texts += [e["text"] for b in body["blocks"] for e in b.get("elements", [])]
    assert len(body["blocks"]) <= 50 and all(len(t) <= 3000 for t in texts)
    assert sum(map(len, texts)) + len(body["text"]) <= 40_000
    assert any(t.startswith("_and 4990 more (") for t in texts)
    assert body["blocks"][-1]["type"] == "context" and "idempotency key k" in body["blocks"][-1]["elements"][0]["text"]


def test_notify_says_how_many_events_expired_undelivered_when_they_pass_their_expiry(sqlite_url, sqlite_engine, hooks):
    """Two events a failing webhook never took pass their expiry: notify drops them and says so (with -q
    too), beside the message it sends for a newer event; a run that only drops events says so as well."""
    hook = hooks()
    hook.always(Answer(status=500))
    stuck_and_recovered(sqlite_engine, 1)
    stuck_and_recovered(sqlite_engine, 1)
    assert invoke("notify", "--webhook", hook.url(), "--database-url", sqlite_url).exit_code == 1

    def expire():
        with write_transaction(sqlite_engine) as connection:
            connection.execute(update(notifications).values(expires_at=fetch_now(connection) - timedelta(seconds=1)))

    expire()
    newer = stuck_and_recovered(sqlite_engine, 1)
    hook.always(Answer())
    result = invoke("notify", "-q", "--webhook", hook.url(), "--database-url", sqlite_url)
    dropped = f"2 events for webhook http://127.0.0.1:{hook.port}/*** expired undelivered (kept 1d) and were dropped"
    assert result.exit_code == 0 and result.stderr == f"Alerts: {dropped}.\n"
    assert len(hook.requests) == 2 and audit_ids_in(hook.requests[-1].body) == newer, "the newer event is sent"

    def expire_all():
        with write_transaction(sqlite_engine) as connection:
            connection.execute(update(notification_deliveries).values(status="pending"))
        expire()

    expire_all()
    result = invoke("notify", "--webhook", hook.url(), "--database-url", sqlite_url)
    assert "3 events for webhook" in result.stderr and "Nothing to deliver" not in result.stderr, result.stderr
    expire_all()
    result = invoke("watch", "--once", "--webhook", hook.url(), "--database-url", sqlite_url)
    assert "alerts: 3 events for webhook" in result.output and "were dropped" in result.output, result.output


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_webhook_that_redirects_is_not_followed_and_the_error_says_it_redirected_when_it_answers_3xx(sqlite_url,
                                                                                                      sqlite_engine,
                                                                                                      hooks, status):
    """A redirect to another host (or its own): the payload is never posted there, the event is kept,
    and the line says the webhook redirected (to which host) instead of a bare "HTTP 301"."""
    hook, elsewhere = hooks(), hooks()
    hook.always(Answer(status=status, body=b"", headers={"Location": elsewhere.url("moved")}))
    stuck_and_recovered(sqlite_engine, 1)
    result = invoke("notify", "--slack-webhook", hook.url(), "--database-url", sqlite_url)
    assert result.exit_code == 1 and not elsewhere.requests and delivery_states(sqlite_engine) == ["pending"]
    assert (f"HTTP {status}: the webhook redirects to http://127.0.0.1:{elsewhere.port}/***; redirects are not "
            "followed: give the URL it redirects to") in result.stderr, result.stderr


def test_a_post_that_times_out_closes_its_connection_when_the_webhook_trickles_its_answer_byte_by_byte():
    """A webhook that answers one byte at a time, for ever: the POST gives up at its timeout and hangs up,
    rather than leaving a thread reading the trickle (one more at every retry of a long-running watch)."""
    import socket

    from auditctl.notify.transport import post_json

    server = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def trickle():
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            try:
                for byte in iter(lambda: b"H", None):
                    connection.send(byte)
                    time.sleep(0.1)
            except OSError:
                hung_up.set()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        response = post_json(f"http://127.0.0.1:{server.getsockname()[1]}/services/{SECRET}", {"text": "x"}, timeout=1)
        assert response.status is None and response.error == "no answer within 1s"
        assert hung_up.wait(30), "the POST's thread still reads the trickle"
    finally:
        server.close()


@pytest.mark.parametrize("garbled", ["far future", "not a time"])
def test_a_delivery_whose_next_try_another_tool_garbled_is_due_and_does_not_hold_back_the_rest_of_its_message(
        engine, hooks, garbled):
    """A next try no sender writes (PostgreSQL's infinity, year 9999, text or bytes SQLite keeps in the column)
    was never due: the other events of the failed message, which go again only together, waited with it until
    all of them expired a day later, and ``notify`` said every run that they would be retried in 0s."""
    hook, destinations = failed_message(engine, hooks)
    postgres = engine.dialect.name == "postgresql"
    value = {"far future": "'9999-12-31 23:59:59+00'" if postgres else "'9999-12-31 23:59:59.000000'",
             "not a time": "'infinity'" if postgres else "X'00ff'"}[garbled]
    with write_transaction(engine) as connection:
        first = connection.execute(select(func.min(notifications.c.id))).scalar_one()
        connection.execute(sql_text(f"UPDATE notification_deliveries SET next_attempt_at = {value} "
                                    "WHERE notification_id = :id"), {"id": first})
        connection.execute(update(notification_deliveries).where(notification_deliveries.c.notification_id != first)
                           .values(next_attempt_at=fetch_now(connection) - timedelta(seconds=1)))
    hook.always(Answer())
    report = deliver(engine, destinations)
    assert report.results[0].error is None and report.sent == 2, report
    assert len(hook.requests) == 2 and len(hook.requests[1].body["events"]) == 2, "the message, whole, once more"
    assert delivery_states(engine) == ["sent", "sent"]


@pytest.mark.parametrize("how", ["deleted", "renumbered"])
def test_a_failed_message_one_of_whose_events_another_tool_deleted_is_still_sent_with_the_others(engine, hooks, how):
    """The notifications table has no foreign key: an event deleted (or renumbered) by another tool leaves its
    delivery row. Counted as part of the message it was tried in, that row kept the others from ever going
    again (a message goes again only whole), until all of them expired a day later."""
    hook, destinations = failed_message(engine, hooks)
    with write_transaction(engine) as connection:
        first = connection.execute(select(func.min(notifications.c.id))).scalar_one()
        if how == "deleted":
            connection.execute(sql_text("DELETE FROM notifications WHERE id = :id"), {"id": first})
        else:
            connection.execute(sql_text("UPDATE notification_deliveries SET notification_id = -5 "
                                        "WHERE notification_id = :id"), {"id": first})
        connection.execute(update(notification_deliveries)
                           .values(next_attempt_at=fetch_now(connection) - timedelta(seconds=1)))
    hook.always(Answer())
    report = deliver(engine, destinations)
    assert report.results[0].error is None and report.sent == 1, report
    assert len(hook.requests) == 2 and [e["id"] for e in hook.requests[1].body["events"]] == [first + 1]
    if how == "renumbered":  # the event itself, with no delivery row of its own now, is new: it goes next
        assert deliver(engine, destinations).sent == 1 and [e["id"] for e in hook.requests[2].body["events"]] == [first]
    assert undelivered(engine, destinations) == []


def test_a_tries_count_another_tool_set_to_the_columns_largest_value_does_not_stop_the_destinations_alerts(
        engine, hooks):
    """PostgreSQL's ``attempts`` is a 32-bit integer: the claim's ``attempts + 1`` on 2,147,483,647 failed every
    delivery to that destination ("integer out of range"), new events included, until the row expired."""
    hook, destinations = failed_message(engine, hooks, events=1)
    with write_transaction(engine) as connection:
        connection.execute(update(notification_deliveries).values(
            attempts=2147483647, next_attempt_at=fetch_now(connection) - timedelta(seconds=1)))
    hook.always(Answer())
    report = deliver(engine, destinations)
    assert report.results[0].error is None and report.sent == 1, report
    assert delivery_states(engine) == ["sent"]


@pytest.mark.parametrize("garbled", ["before any time", "after any time", "a time in another form"])
def test_a_failed_message_whose_claim_mark_another_tool_garbled_is_sent_again(engine, hooks, garbled):
    """A failed message's rows keep the claim they were sent under, to go again together. A claim no time
    can be read from (PostgreSQL's infinities; text or bytes on SQLite) could not be matched against:
    PostgreSQL failed every delivery to the destination ("cannot adapt type 'Unreadable'"). On SQLite, a
    time in another form than auditctl writes matched nothing as the time it reads as, and held back
    every later message to the destination."""
    hook, destinations = failed_message(engine, hooks)
    postgres = engine.dialect.name == "postgresql"
    value = {"before any time": "'-infinity'" if postgres else "-1",
             "after any time": "'infinity'" if postgres else "X'00ff'",
             "a time in another form": "'2000-01-01 00:00+00'" if postgres else "'2000-01-01 00:00'"}[garbled]
    with write_transaction(engine) as connection:
        connection.execute(sql_text(f"UPDATE notification_deliveries SET claimed_until = {value}"))
        connection.execute(update(notification_deliveries)
                           .values(next_attempt_at=fetch_now(connection) - timedelta(seconds=1)))
    hook.always(Answer())
    report = deliver(engine, destinations)
    assert report.results[0].error is None and report.sent >= 1, report
    while report.results[0].more:
        report = deliver(engine, destinations)
        assert report.results[0].error is None, report
    assert delivery_states(engine) == ["sent", "sent"]


def test_more_events_than_a_message_holds_sharing_one_garbled_claim_are_sent_a_message_at_a_time(engine, hooks,
                                                                                              monkeypatch):
    """No claim takes more rows than a message holds: more sharing one claim value is another tool's
    doing, not a message to send whole, and they go as any new events do."""
    monkeypatch.setattr(sender, "MAX_EVENTS", 2)
    hook = hooks()
    destinations = destinations_from(webhook=hook.url())
    stuck_and_recovered(engine, 3, batch_size=1)
    hook.always(Answer(status=500, body=b"down"))
    deliver(engine, destinations, limit=2)
    value = "'infinity'" if engine.dialect.name == "postgresql" else "'garbage'"
    with write_transaction(engine) as connection:
        connection.execute(sql_text(f"UPDATE notification_deliveries SET claimed_until = {value}, status = 'pending'"))
        connection.execute(sql_text("UPDATE notification_deliveries SET next_attempt_at = NULL"))
    hook.always(Answer())
    first = deliver(engine, destinations, limit=2)
    assert first.sent == 2 and first.results[0].more, first
    assert deliver(engine, destinations, limit=2).sent == 1
    assert delivery_states(engine) == ["sent", "sent", "sent"]
