"""``auditctl serve`` over HTTP: the JSON API, sign-in, CSRF and cross-site refusals, the real command.

Every test talks to a real uvicorn server on a free loopback port (in a thread, or the real
``auditctl serve`` process) over real HTTP, on SQLite and on PostgreSQL. The JSON is compared
with what the CLI's ``--format json`` prints for the same database.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from auditctl.cli import cli
from auditctl.schema import audits
from auditctl.transactions import write_transaction
from dbtools import all_rows, events, registry_row_unreadable, wait_for
from webtools import TOKEN, Output, http, running_dashboard, serve_process
from webtools import demo_fixture, demo_url_fixture, sqlite_demo_template_fixture  # noqa: F401 - fixtures

BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: For what does not depend on the engine (who may act, escaping): SQLite only, to keep the suite fast.
sqlite_only = pytest.mark.parametrize("engine_name", ["sqlite"])
#: Measured on the database's clock at each read: they differ between two reads a moment apart.
MOVING = {"age_seconds", "silence_seconds", "stalled_seconds", "heartbeat_age_seconds", "created_age_seconds",
          "explanation", "gone_for"}


def cli_json(database_url: str, *args, arguments=()):
    result = CliRunner().invoke(cli, [*args, "--database-url", database_url, "--format", "json", "--", *arguments],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def still(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in MOVING}


def statuses(engine) -> dict[int, str]:
    return {row["id"]: row["status"] for row in all_rows(engine)}


# --- the JSON API: the CLI's shapes ----------------------------------------------------------


def test_api_stuck_audits_and_workers_are_what_the_cli_prints_as_json(demo_url, demo):
    with running_dashboard(demo_url) as server:
        stuck = server.get("/api/stuck")
        audits = server.get("/api/audits?status=failed,pending&sort=id&limit=0")
        workers = server.get("/api/workers")
        reason = server.get("/api/stuck?reason=progress_stalled")
    assert stuck.status == 200 and stuck.headers["content-type"] == "application/json"
    assert [still(r) for r in stuck.json()] == [still(r) for r in cli_json(demo_url, "scan")]
    assert sorted(r["reasons"][0] for r in stuck.json()) == ["max_age_exceeded", "progress_stalled", "stale_heartbeat"]
    assert [r["reasons"] for r in reason.json()] == [["progress_stalled"]]
    expected = cli_json(demo_url, "list", "--status", "failed,pending", "--limit", "0")
    assert [still(r) for r in audits.json()] == [still(r) for r in expected]
    assert {r["status"] for r in audits.json()} == {"failed", "pending"}
    assert [still(r) for r in workers.json()] == [still(r) for r in cli_json(demo_url, "workers")]


def test_api_one_audit_is_what_show_prints_and_an_unknown_id_is_404(demo_url, demo):
    stuck_id = cli_json(demo_url, "scan")[0]["id"]
    with running_dashboard(demo_url) as server:
        found = server.get(f"/api/audits/{stuck_id}")
        missing = server.get("/api/audits/999999")
        huge = server.get(f"/api/audits/{2**70}")
        page = server.get("/audits/999999")
    assert still(found.json()) == still(cli_json(demo_url, "show", str(stuck_id)))
    assert {"progress", "recovery_info", "history"} <= set(found.json())
    assert missing.status == 404 and missing.json() == {"error": "no audit with id 999999"}
    assert huge.status == 404
    assert page.status == 404 and "no audit with id 999999" in page.text


def test_an_audit_another_tool_gave_a_negative_id_has_its_page_and_its_record(demo_url, demo):
    from sqlalchemy import text

    from auditctl.db import create_engine

    engine = create_engine(demo_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO audits (id, target, status, attempts, created_at) "
                                "VALUES (-3, 'https://negative.example', 'failed', 0, CURRENT_TIMESTAMP)"))
    engine.dispose()
    with running_dashboard(demo_url) as server:
        record = server.get("/api/audits/-3")
        page = server.get("/audits/-3")
    assert record.status == 200 and still(record.json()) == still(cli_json(demo_url, "show", arguments=["-3"]))
    assert page.status == 200 and "negative.example" in page.text


@sqlite_only
def test_api_bad_parameters_are_400_with_the_name_of_the_parameter(demo_url, demo):
    with running_dashboard(demo_url) as server:
        status = server.get("/api/audits?status=sleeping")
        duration = server.get("/api/stuck?older_than=soon")
        body = server.post("/api/recover", body="dry_run=1", headers={**BEARER, "Content-Type": "text/plain"})
        unreadable_since = server.get("/api/audits?since=soon")
        too_long_since = server.get("/api/audits?since=53w")
    assert status.status == 400 and "status" in status.json()["error"] and "sleeping" in status.json()["error"]
    assert duration.status == 400 and "older_than" in duration.json()["error"]
    assert unreadable_since.status == 400 and "cannot read 'soon' as a time" in unreadable_since.json()["error"]
    assert too_long_since.status == 400 and "'53w' is longer than a year" in too_long_since.json()["error"]
    assert body.status == 415


def test_api_overview_counts_the_fleet_and_charts_the_recoveries(demo_url, demo):
    with running_dashboard(demo_url) as server:
        overview = server.get("/api/overview").json()
    assert overview["stuck_count"] == 3 and len(overview["stuck"]) == 3
    assert overview["by_status"] == {"pending": 3, "running": 7, "completed": 6, "failed": 2}
    assert {k: v for k, v in overview["stuck_by_reason"].items() if v} == {
        "stale_heartbeat": 1, "max_age_exceeded": 1, "progress_stalled": 1}
    hours = overview["recoveries_by_hour"]
    assert len(hours) == 24
    # The demo's two failed audits were recovered as stuck when it was written: this hour (or, just
    # past the hour, the one before) holds them.
    assert sum(h["count"] for h in hours[-2:]) == 2 and sum(h["count"] for h in hours) == 2


def test_api_recover_previews_with_dry_run_then_recovers_as_the_dashboard(demo_url, demo):
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        preview = server.post("/api/recover", json_body={"dry_run": True}, headers=BEARER)
        assert statuses(demo) == before, "a dry run changed the database"
        one = preview.json()[0]["id"]
        done = server.post("/api/recover", json_body={"id": [one]}, headers=BEARER)
    assert preview.status == 200 and len(preview.json()) == 3
    assert all(r["dry_run"] for r in preview.json())
    expected_keys = set(cli_json(demo_url, "recover", "--dry-run")[0])
    assert set(preview.json()[0]) == expected_keys
    assert done.status == 200 and [r["id"] for r in done.json()] == [one] and not done.json()[0]["dry_run"]
    after = statuses(demo)
    assert after[one] == "failed" and {k: v for k, v in after.items() if k != one} == {k: v for k, v in before.items() if k != one}
    recovered = [e for e in events(demo, one) if e["event"] == "recovered"]
    assert [e["actor"] for e in recovered] == ["dashboard token"]


def test_api_reset_all_previews_with_dry_run_then_resets_failed_audits_to_pending(demo_url, demo):
    failed = [i for i, s in statuses(demo).items() if s == "failed"]
    expected = cli_json(demo_url, "reset-all", "--dry-run")
    with running_dashboard(demo_url) as server:
        preview = server.post("/api/reset-all?dry_run=true", headers=BEARER)
        assert all(statuses(demo)[i] == "failed" for i in failed)
        done = server.post("/api/reset-all", json_body={"dry_run": False}, headers=BEARER)
    assert preview.json() == expected
    assert sorted(r["id"] for r in done.json()) == sorted(failed) and {r["status"] for r in done.json()} == {"pending"}
    assert all(statuses(demo)[i] == "pending" for i in failed)
    assert {e["actor"] for i in failed for e in events(demo, i) if e["event"] == "reset"} == {"dashboard token"}


def test_api_actions_answer_500_naming_the_audits_the_database_refused_and_list_the_rest(demo_url, demo):
    from dbtools import install_abort_trigger

    stuck = [r["id"] for r in cli_json(demo_url, "scan", "-o", "json")]
    failed = [i for i, s in statuses(demo).items() if s == "failed"]
    refused = {stuck[0], failed[0]}
    install_abort_trigger(demo, "refuse_one", when_sqlite=f"OLD.id IN ({stuck[0]}, {failed[0]})",
                          when_pg=f"OLD.id IN ({stuck[0]}, {failed[0]})")
    with running_dashboard(demo_url) as server:
        recovered = server.post("/api/recover", json_body={}, headers=BEARER)
        reset = server.post("/api/reset-all", json_body={}, headers=BEARER)
    for answer, done, what in ((recovered, "recovered", "recovered"), (reset, "reset", "reset")):
        body = answer.json()
        assert answer.status == 500 and f"1 audit could not be {what} and needs an operator: " in body["error"]
        assert [r["id"] for r in body[done]] and not {r["id"] for r in body[done]} & refused
    assert f"{stuck[0]} (" in recovered.json()["error"] and f"{failed[0]} (" in reset.json()["error"]
    assert statuses(demo)[stuck[0]] == "running" and statuses(demo)[failed[0]] == "failed"


@pytest.mark.parametrize("engine_name", ["postgresql"])
def test_api_actions_the_roles_privileges_refuse_say_nothing_was_changed(demo_url, demo):
    """A dashboard whose role may not write (SQLSTATE 42501: SELECT only, or a standby): the API said
    the database's refusal and left the caller to guess whether some batch had gone through."""
    from dbtools import drop_trigger, install_abort_trigger

    before = statuses(demo)
    install_abort_trigger(demo, "no_privilege", errcode="42501")
    try:
        with running_dashboard(demo_url) as server:
            recovered = server.post("/api/recover", json_body={}, headers=BEARER)
            reset = server.post("/api/reset-all", json_body={}, headers=BEARER)
    finally:
        drop_trigger(demo, "no_privilege")
    for answer in (recovered, reset):
        assert answer.status == 503, answer.text
        assert answer.json()["error"].endswith("; nothing was changed"), answer.text
    assert statuses(demo) == before

@pytest.mark.parametrize("engine_name", ["postgresql"])
def test_api_actions_stopped_partway_answer_503_listing_what_their_committed_batches_did(demo_url, demo):
    """An outage after the first batch of 500 (a trigger raising SQLSTATE 57P01, an administrator's
    shutdown): the answer names the error, lists the audits that were changed and names the one that
    needs an operator, not the error alone."""
    from dbtools import drop_trigger, install_abort_trigger, make_running

    make_running(demo, 600)
    stuck = sorted(r["id"] for r in cli_json(demo_url, "scan", "-o", "json"))
    install_abort_trigger(demo, "outage", when_pg=f"NEW.status = 'failed' AND NEW.id > {stuck[499]}", errcode="57P01")
    install_abort_trigger(demo, "refuse_one", when_pg=f"NEW.status = 'failed' AND NEW.id = {stuck[0]}")
    with running_dashboard(demo_url) as server:
        recovered = server.post("/api/recover", json_body={}, headers=BEARER)
        drop_trigger(demo, "outage")
        drop_trigger(demo, "refuse_one")
        assert server.post("/api/recover", json_body={}, headers=BEARER).status == 200  # the rest, now
        failed = sorted(i for i, s in statuses(demo).items() if s == "failed")
        install_abort_trigger(demo, "outage", when_pg=f"NEW.status = 'pending' AND NEW.id > {failed[499]}",
                              errcode="57P01")
        reset = server.post("/api/reset-all", json_body={}, headers=BEARER)
    for answer, key, expected in ((recovered, "recovered", stuck[1:500]), (reset, "reset", failed[:500])):
        body = answer.json()
        assert answer.status == 503 and body["error"].startswith("stopped partway by an error: "), body.get("error")
        assert sorted(r["id"] for r in body[key]) == expected
    # the audit its first batch could not recover is named too, not only what committed
    assert f"1 audit could not be recovered and needs an operator: {stuck[0]} (" in recovered.json()["error"]
    assert sum(1 for s in statuses(demo).values() if s == "pending") >= 500


# --- who may act -------------------------------------------------------------------------------


@sqlite_only
def test_without_a_token_the_dashboard_is_read_only_and_refuses_every_action(demo_url, demo):
    before = statuses(demo)
    with running_dashboard(demo_url, token=None) as server:
        page = server.get("/")
        api = server.post("/api/reset-all", headers={"Authorization": "Bearer anything"})
        recover = server.post("/api/recover", headers={"Authorization": "Bearer "})
        html = server.post("/actions/reset-all", form={"csrf_token": "x"}, headers={"Origin": server.origin})
        login = server.post("/login", form={"token": ""}, headers={"Origin": server.origin})
        reads = server.get("/api/stuck")
    assert api.status == 403 and "without a token" in api.json()["error"]
    assert recover.status == 403 and html.status == 403 and login.status == 403
    assert 'id="reset-all" disabled' in page.text and "started without a token" in page.text
    assert reads.status == 200 and len(reads.json()) == 3
    assert statuses(demo) == before


@sqlite_only
@pytest.mark.parametrize("token", [TOKEN, None], ids=["with a token", "read-only"])
def test_a_proxys_basic_authorization_header_leaves_reads_open_and_acts_on_nothing(demo_url, demo, token):
    before = statuses(demo)
    basic = {"Authorization": "Basic YWRtaW46cHJveHlwYXNz"}  # admin:proxypass, forwarded by a proxy in front
    with running_dashboard(demo_url, token=token) as server:
        health = server.get("/api/health", headers=basic)
        stuck = server.get("/api/stuck", headers=basic)
        recover = server.post("/api/recover", json_body={"dry_run": False}, headers=basic)
    assert health.status == 200 and stuck.status == 200 and len(stuck.json()) == 3
    assert recover.status == (401 if token else 403)
    assert statuses(demo) == before


@sqlite_only
def test_actions_need_the_token_and_a_wrong_one_is_401(demo_url, demo):
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        anonymous = server.post("/api/reset-all")
        wrong = server.post("/api/reset-all", headers={"Authorization": "Bearer not-the-token"})
        wrong_read = server.get("/api/stuck", headers={"Authorization": "Bearer not-the-token"})
        right_read = server.get("/api/stuck", headers=BEARER)
        html = server.post("/actions/reset-all", form={}, headers={"Origin": server.origin})
        page = server.get("/")
    assert anonymous.status == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status == 401 and wrong_read.status == 401 and right_read.status == 200
    assert html.status == 401 and "sign in" in html.text
    assert 'id="reset-all" disabled' in page.text
    assert statuses(demo) == before


@sqlite_only
def test_wrong_tokens_are_answered_one_at_a_time_and_a_right_one_is_not_kept_waiting(demo_url, demo, caplog):
    """Guessing in parallel gains nothing: every wrong token, from any client, at sign-in or in a header,
    waits its turn for WRONG_TOKEN_DELAY."""
    from concurrent.futures import ThreadPoolExecutor

    from auditctl.web.security import WRONG_TOKEN_DELAY

    guesses = 6
    with running_dashboard(demo_url) as server:
        def guess(number):
            if number % 2:
                return server.post("/login", form={"token": f"guess-{number}"}, headers={"Origin": server.origin}).status
            return server.get("/api/stuck", headers={"Authorization": f"Bearer guess-{number}"}).status

        with ThreadPoolExecutor(guesses + 1) as pool:
            started = time.monotonic()
            answers = [pool.submit(guess, number) for number in range(guesses)]
            time.sleep(0.2)
            right = server.get("/api/stuck", headers=BEARER)
            right_after = time.monotonic() - started
            statuses_seen = [answer.result() for answer in answers]
            all_after = time.monotonic() - started
    assert statuses_seen == [401] * guesses and right.status == 200
    assert all_after >= guesses * WRONG_TOKEN_DELAY * 0.9, f"{guesses} wrong tokens answered in {all_after:.2f}s"
    assert right_after < all_after, "the right token waited behind the guesses"
    assert caplog.text.count("wrong token") >= guesses


@sqlite_only
def test_a_flood_of_wrong_tokens_is_refused_at_once_without_comparing_any_token(demo_url, demo, monkeypatch):
    """Queued guesses each hold a connection: past the cap, every token is answered 429 at once, the right
    one too (telling them apart would answer a guess early). Signed-in sessions are untouched."""
    from concurrent.futures import ThreadPoolExecutor

    from auditctl.web import security

    monkeypatch.setattr(security, "MAX_WAITING_WRONG_TOKENS", 3)
    with running_dashboard(demo_url) as server:
        cookie, _ = server.sign_in()
        dashboard = server.app.state.dashboard
        with ThreadPoolExecutor(8) as pool:
            guesses = [pool.submit(server.get, "/api/stuck", headers={"Authorization": f"Bearer guess-{n}"})
                       for n in range(8)]
            wait_for(lambda: dashboard.wrong_tokens.flooded(), timeout=5, message="the queue to fill")
            during = server.get("/api/stuck", headers=BEARER)
            signed_in = server.get("/api/stuck", headers={"Cookie": cookie})
            answers = sorted(guess.result().status for guess in guesses)
        after = server.get("/api/stuck", headers=BEARER)
    assert during.status == 429 and during.headers["retry-after"] == "10"
    assert signed_in.status == 200 and after.status == 200
    assert set(answers) == {401, 429} and answers.count(401) >= 3


@sqlite_only
def test_sign_in_sets_an_httponly_samesite_strict_session_cookie(demo_url, demo):
    with running_dashboard(demo_url) as server:
        wrong = server.post("/login", form={"token": "guess"}, headers={"Origin": server.origin})
        right = server.post("/login", form={"token": TOKEN, "name": "alice"}, headers={"Origin": server.origin})
        cookie = right.cookies()[0]
        page = server.get("/", headers={"Cookie": cookie.split(";", 1)[0]})
    assert wrong.status == 401 and not wrong.cookies() and "not the dashboard" in wrong.text
    assert right.status == 303 and right.headers["location"] == "/"
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert TOKEN not in cookie
    assert "Signed in as <strong>alice</strong>" in page.text and 'id="reset-all" disabled' not in page.text


@sqlite_only
def test_a_token_pasted_with_spaces_or_a_newline_signs_in_as_the_api_takes_it(demo_url, demo):
    """The API and ``serve --token`` strip the token; the sign-in form did not, so a token pasted with
    its line's end was "not the dashboard's token"."""
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in(token=f"  {TOKEN}\n", name="pat")
        page = server.get("/", headers={"Cookie": cookie})
    assert csrf and "Signed in as <strong>pat</strong>" in page.text

@sqlite_only
def test_a_cross_site_request_is_refused_even_with_a_valid_session_and_changes_nothing(demo_url, demo):
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in()
        session = {"Cookie": cookie, "X-CSRF-Token": csrf}
        foreign = server.post("/actions/reset-all", form={"csrf_token": csrf},
                              headers={**session, "Origin": "http://evil.example"})
        referer = server.post("/actions/reset-all", form={"csrf_token": csrf},
                              headers={**session, "Referer": "http://evil.example/page"})
        null = server.post("/actions/recover", form={"csrf_token": csrf, "confirm": "1"}, headers={**session, "Origin": "null"})
        unreadable = server.post("/actions/recover", form={"csrf_token": csrf, "confirm": "1"},
                                 headers={**session, "Referer": "http://[::1"})
        unreadable_api = server.post("/api/recover", headers={**BEARER, "Referer": "http://[x]/"})
        schemeless = server.post("/actions/recover", form={"csrf_token": csrf, "confirm": "1"},
                                 headers={**session, "Referer": "//evil.example/page"})
        api = server.post("/api/reset-all", headers={**BEARER, "Origin": "http://evil.example"})
        api_session = server.post("/api/reset-all", headers={**session, "Origin": "http://evil.example"})
        login = server.post("/login", form={"token": TOKEN}, headers={"Origin": "http://evil.example"})
        assert statuses(demo) == before
        # The control: the same request from the dashboard's own origin is served.
        own = server.post("/actions/reset-all", form={"csrf_token": csrf}, headers={**session, "Origin": server.origin})
    for answer in (foreign, referer, null, unreadable, unreadable_api, schemeless, api, api_session, login):
        assert answer.status == 403, answer.text
        assert "cross-site" in answer.text
    assert unreadable_api.headers["content-type"] == "application/json" and unreadable_api.headers.get("x-content-type-options") == "nosniff"
    assert own.status == 200 and "Confirm reset" in own.text
    assert statuses(demo) == before, "showing the confirmation changed something"


@sqlite_only
def test_a_session_without_its_csrf_token_is_refused(demo_url, demo):
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in()
        missing = server.post("/actions/reset-all", form={}, headers={"Cookie": cookie, "Origin": server.origin})
        wrong = server.post("/actions/recover", form={"csrf_token": "forged", "confirm": "1"},
                            headers={"Cookie": cookie, "Origin": server.origin})
        api = server.post("/api/recover", headers={"Cookie": cookie})
        with_header = server.post("/api/recover", json_body={"dry_run": True}, headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert missing.status == 403 and "CSRF" in missing.text
    assert wrong.status == 403 and api.status == 401
    assert with_header.status == 200 and len(with_header.json()) == 3
    assert statuses(demo) == before


@sqlite_only
def test_signing_out_without_the_sessions_csrf_token_is_refused_and_the_session_stays(demo_url):
    """A cross-site form cannot sign the operator out (a nuisance CSRF): /logout wants the session's token too."""
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in()
        session = {"Cookie": cookie, "Origin": server.origin}
        missing = server.post("/logout", form={}, headers=session)
        forged = server.post("/logout", form={"csrf_token": "forged"}, headers=session)
        still_in = server.get("/", headers={"Cookie": cookie})
        signed_out = server.post("/logout", form={"csrf_token": csrf}, headers=session)
        after = server.get("/", headers={"Cookie": cookie})
    assert (missing.status, forged.status) == (403, 403) and "CSRF" in missing.text
    assert 'name="csrf_token"' in still_in.text
    assert signed_out.status == 303 and signed_out.headers["location"] == "/"
    assert 'name="csrf_token"' not in after.text

@sqlite_only
def test_static_files_may_be_cached_and_nothing_else_may(demo_url):
    with running_dashboard(demo_url) as server:
        script, page, api = server.get("/static/dashboard.js"), server.get("/"), server.get("/api/workers")
    assert script.status == 200 and "no-store" not in script.headers.get("cache-control", "")
    assert script.headers.get("x-content-type-options") == "nosniff"
    assert page.headers.get("cache-control") == "no-store" and api.headers.get("cache-control") == "no-store"

def test_no_other_site_may_load_an_answer_or_keep_a_handle_on_a_dashboard_window_when_it_opens_one(demo_url):
    """Reads need no credential, so a page on any site the operator visits could load
    ``/api/overview`` (or a page) as an image or a script: the browser hides the bytes, yet puts them
    in that site's process. Every answer now refuses other origins (CORP), and a dashboard window
    opened from another site keeps no ``window.opener`` link to it (COOP)."""
    with running_dashboard(demo_url) as server:
        answers = {path: server.get(path) for path in ("/", "/api/overview", "/static/dashboard.js", "/nope", "/login")}
    for path, answer in answers.items():
        assert answer.headers.get("cross-origin-resource-policy") == "same-origin", path
        assert answer.headers.get("cross-origin-opener-policy") == "same-origin", path


def _reset_on_the_page(server, *, twice: bool = False):
    """Sign in as bob, press Reset All Audits, confirm (twice: the same confirmation again):
    (the preview, the confirmation's answer, the second answer or None)."""
    cookie, csrf = server.sign_in(name="bob")
    headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
    shown = server.post("/actions/reset-all", form={"csrf_token": csrf}, headers=headers)
    plan = shown.text.split('name="plan" value="', 1)[1].split('"', 1)[0]
    confirm = {"csrf_token": csrf, "plan": plan}
    confirmed = server.post("/actions/reset-all/confirm", form=confirm, headers=headers)
    again = server.post("/actions/reset-all/confirm", form=confirm, headers=headers) if twice else None
    return shown, confirmed, again


@pytest.mark.parametrize("engine_name", ["postgresql"])
def test_a_reset_confirmed_on_the_page_and_stopped_partway_shows_what_it_reset_with_the_error(demo_url, demo):
    from dbtools import install_abort_trigger, make_running

    make_running(demo, 600)
    assert CliRunner().invoke(cli, ["recover", "--database-url", demo_url]).exit_code == 0
    failed = sorted(i for i, s in statuses(demo).items() if s == "failed")
    install_abort_trigger(demo, "outage", when_pg=f"NEW.status = 'pending' AND NEW.id > {failed[499]}", errcode="57P01")
    with running_dashboard(demo_url) as server:
        shown, confirmed, again = _reset_on_the_page(server, twice=True)
    assert confirmed.status == 503
    assert "Reset 500 audits to pending." in confirmed.text and "Stopped partway by an error: " in confirmed.text
    assert "changed meanwhile" not in confirmed.text, "the others were never reached"
    assert "still stands" not in confirmed.text and again.status == 409, "batches committed: the confirmation is used up"
    assert sum(1 for s in statuses(demo).values() if s == "pending") >= 500


@sqlite_only
def test_a_reset_confirmation_is_used_once_and_resets_what_it_showed(demo_url, demo):
    failed = [i for i, s in statuses(demo).items() if s == "failed"]
    with running_dashboard(demo_url) as server:
        shown, confirmed, again = _reset_on_the_page(server, twice=True)
    assert f"Reset {len(failed)} audits to pending?" in shown.text
    assert confirmed.status == 200 and f"Reset {len(failed)} audits to pending." in confirmed.text
    assert confirmed.headers["hx-trigger"] == "auditctl:refresh"
    assert again.status == 409
    assert all(statuses(demo)[i] == "pending" for i in failed)
    assert {e["actor"] for i in failed for e in events(demo, i) if e["event"] == "reset"} == {"dashboard bob"}


@sqlite_only
def test_recover_one_audit_from_its_page_previews_then_recovers_only_it(demo_url, demo):
    stuck = cli_json(demo_url, "scan")
    one = stuck[0]["id"]
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in(name="dave")
        headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
        page = server.get(f"/audits/{one}", headers={"Cookie": cookie})
        preview = server.post("/actions/recover", form={"csrf_token": csrf, "id": one}, headers=headers)
        assert statuses(demo)[one] == "running", "the preview recovered the audit"
        done = server.post("/actions/recover", form={"csrf_token": csrf, "id": one, "confirm": "1"}, headers=headers)
        again = server.post("/actions/recover", form={"csrf_token": csrf, "id": one, "confirm": "1"}, headers=headers)
    assert "Recover this audit" in page.text
    assert '<pre class="doc">{\n  &quot;progress&quot;: {\n' in page.text, "the progress document is not shown as lines"
    assert "Recover 1 stuck audit?" in preview.text and "Confirm recover" in preview.text
    assert "Recovered 1 audit." in done.text and done.headers["hx-trigger"] == "auditctl:refresh"
    assert "Nothing was recovered" in again.text
    after = statuses(demo)
    assert after[one] == "failed" and all(after[v["id"]] == "running" for v in stuck[1:])
    assert [e["actor"] for e in events(demo, one) if e["event"] == "recovered"] == ["dashboard dave"]


@sqlite_only
def test_the_audits_page_takes_the_filters_of_list(demo_url, demo):
    failed = sorted(i for i, s in statuses(demo).items() if s == "failed")
    with running_dashboard(demo_url) as server:
        page = server.get("/audits?status=failed&sort=id&reverse=1")
        bad = server.get("/audits?status=sleeping")
    rows = [int(part.split('"', 1)[0]) for part in page.text.split('<tr id="audit-')[1:]]
    assert rows == failed
    assert bad.status == 400 and "sleeping" in bad.text and 'role="alert"' in bad.text


@sqlite_only
def test_a_host_header_that_is_not_loopback_is_refused(demo_url, demo):
    """DNS rebinding: a foreign name resolving to 127.0.0.1 would make its page same-origin with us."""
    with running_dashboard(demo_url) as server:
        port = server.origin.rsplit(":", 1)[1]
        rebound = server.get("/api/stuck", headers={"Host": f"attacker.example:{port}"})
        local = server.get("/api/stuck", headers={"Host": f"localhost:{port}"})
    assert rebound.status == 400 and local.status == 200
    assert rebound.headers.get("x-content-type-options") == "nosniff" and rebound.headers.get("cache-control") == "no-store"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                           ("[::1]", True), ("0:0:0:0:0:0:0:1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("::", False), ("192.0.2.7", False),
                                           ("no-such-host.invalid", False)])
def test_loopback_is_judged_by_address_not_by_spelling(host, loopback):
    from auditctl.web.security import is_loopback

    assert is_loopback(host) is loopback


@sqlite_only
@pytest.mark.parametrize("host", ["0:0:0:0:0:0:0:1", "127.0.1.1"])
def test_a_loopback_host_in_another_spelling_keeps_the_dns_rebinding_guard(demo_url, demo, host):
    with running_dashboard(demo_url, host=host) as server:
        port = server.origin.rsplit(":", 1)[1]
        rebound = server.get("/api/stuck", headers={"Host": f"attacker.example:{port}"})
        spelled = server.get("/api/stuck", headers={"Host": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})
        local = server.get("/api/stuck", headers={"Host": f"[::1]:{port}"})
    assert rebound.status == 400 and spelled.status == 200 and local.status == 200


@sqlite_only
def test_oversized_and_malformed_parameters_are_400s_and_never_look_like_an_outage(demo_url, demo):
    many = ",".join(f"t{i}" for i in range(1200))
    with running_dashboard(demo_url) as server:
        answers = {
            "many targets": server.get(f"/api/audits?target={many}"),
            "many targets, stuck": server.get(f"/api/stuck?target={many}"),
            "one long pattern": server.get("/api/audits?target=" + "a" * 60_000),
            "a superscript digit": server.get("/api/audits?limit=%C2%B2"),
            "two minus signs": server.get("/api/audits?limit=--5"),
            "5,000 digits": server.get("/api/audits?limit=" + "9" * 5000),
            "a superscript id": server.get("/api/stuck?id=%C2%B2"),
        }
        long_path = server.get("/api/audits/" + "9" * 5000)
        beyond = server.get("/api/audits/9999999999999999999")
        no_endpoint = server.get("/api/nope")
        wrong_method = http("PUT", server.origin + "/api/recover", headers=BEARER)
        health = server.get("/api/health")
        page = server.get("/fragments/workers")
    for name, answer in answers.items():
        assert answer.status == 400 and "error" in answer.json(), name
    assert long_path.status == 404 and beyond.status == 404
    for answer in (long_path, beyond, no_endpoint, wrong_method):
        assert "error" in answer.json(), "every /api/ answer is JSON, a missing route's included"
    assert no_endpoint.status == 404 and (wrong_method.status, wrong_method.headers.get("allow")) == (405, "POST")
    assert health.status == 200 and "Database unreachable" not in page.text, "a bad filter is no outage"


def test_api_refuses_what_it_would_misread_and_changes_nothing(demo_url, demo):
    before = statuses(demo)
    json_type = {**BEARER, "Content-Type": "application/json"}
    with running_dashboard(demo_url) as server:
        actions = {
            "a bare dry_run": server.post("/api/recover?dry_run", headers=BEARER),
            "dry-run misspelt": server.post("/api/recover", json_body={"dry-run": True}, headers=BEARER),
            "ids for id": server.post("/api/recover", json_body={"dry_run": True, "ids": [1]}, headers=BEARER),
            "a null dry_run": server.post("/api/recover", json_body={"dry_run": None}, headers=BEARER),
            "an empty dry_run": server.post("/api/recover", json_body={"dry_run": []}, headers=BEARER),
            "an empty id list": server.post("/api/recover", json_body={"dry_run": False, "id": []}, headers=BEARER),
            "a null reset dry_run": server.post("/api/reset-all", json_body={"dry_run": None}, headers=BEARER),
            "max_attempts without requeue": server.post("/api/recover", json_body={"max_attempts": 5}, headers=BEARER),
            "a lone surrogate": server.post("/api/recover", body='{"worker": "\\ud800", "dry_run": true}', headers=json_type),
            "status on reset-all": server.post("/api/reset-all", json_body={"dry_run": True, "status": "failed"},
                                               headers=BEARER),
        }
        reads = {
            "id on audits": server.get("/api/audits?id=5"),
            "status on stuck": server.get("/api/stuck?status=failed"),
            "a NUL in a filter": server.get("/api/audits?worker=%00"),
            "a NUL in a stuck filter": server.get("/api/stuck?kind=%00"),
        }
        health = server.get("/api/health")
        page = server.get("/fragments/workers")
    for name, answer in {**actions, **reads}.items():
        assert answer.status == 400 and "error" in answer.json(), (name, answer.status, answer.text)
    assert actions["dry-run misspelt"].json()["error"].startswith("unknown parameter 'dry-run' (this takes: ")
    assert "dry_run: give it a value" in actions["a bare dry_run"].json()["error"]
    assert "give requeue too" in actions["max_attempts without requeue"].json()["error"]
    assert actions["a null dry_run"].json()["error"] == "dry_run: null is no value: give one, or leave dry_run out"
    assert statuses(demo) == before
    assert health.status == 200 and "Database" not in page.text, "a bad filter is no outage"


def test_an_empty_filter_on_the_api_is_refused_never_read_as_the_whole_fleet(demo_url, demo):
    """An unset shell variable sends ``"worker": ""``: read as no filter, it recovered every stuck audit."""
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        answers = {
            "empty worker": server.post("/api/recover", json_body={"worker": ""}, headers=BEARER),
            "blank reason": server.post("/api/recover", json_body={"reason": " , "}, headers=BEARER),
            "empty worker in the query": server.post("/api/recover?worker=", headers=BEARER),
            "empty since on reset-all": server.post("/api/reset-all", json_body={"since": ""}, headers=BEARER),
            "empty origin on reset-all": server.post("/api/reset-all", json_body={"origin": ""}, headers=BEARER),
            "empty max_resets": server.post("/api/reset-all", json_body={"dry_run": True, "max_resets": ""},
                                            headers=BEARER),
            "empty kind on a read": server.get("/api/stuck?kind="),
        }
        page = server.get("/audits?worker=&kind=&status=")  # a page's form sends its empty fields
    for name, answer in answers.items():
        assert answer.status == 400, (name, answer.status, answer.text)
    assert answers["empty worker"].json()["error"] == "worker: an empty value is no value: give one, or leave worker out"
    assert statuses(demo) == before
    assert page.status == 200


def test_api_reset_all_takes_since_as_a_time_like_the_command_line(demo_url, demo):
    from datetime import datetime, timedelta, timezone

    hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expected = cli_json(demo_url, "reset-all", "--dry-run", "--since", hour_ago)
    with running_dashboard(demo_url) as server:
        preview = server.post("/api/reset-all", json_body={"dry_run": True, "since": hour_ago}, headers=BEARER)
        future = server.post("/api/reset-all", json_body={"dry_run": True, "since": "2999-01-01T00:00Z"}, headers=BEARER)
    assert len(expected) == 2 and preview.status == 200 and preview.json() == expected
    assert future.status == 200 and future.json() == []


@sqlite_only
def test_the_stuck_list_keeps_its_own_last_figures_dimmed_while_the_database_is_away(demo_url, demo, tmp_path):
    path = Path(demo_url.removeprefix("sqlite:///"))
    with running_dashboard(demo_url) as server:
        before = server.get("/fragments/stuck")
        path.rename(tmp_path / "away.db")
        during = server.get("/fragments/stuck")
        path.with_name("away.db").rename(path)
    assert "3 stuck audits." in before.text
    assert 'role="alert"' in during.text and '<div class="stale">' in during.text
    assert "3 stuck audits." in during.text and "blog.example.net" in during.text


@sqlite_only
def test_a_recover_pressed_while_the_database_is_away_says_so_in_whole_sentences(demo_url, demo, tmp_path):
    """The error ran into the next sentence: "...: unable to open database file Nothing was changed."."""
    path = Path(demo_url.removeprefix("sqlite:///"))
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in()
        headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
        path.rename(tmp_path / "away.db")
        try:
            answer = server.post("/actions/recover", form={"csrf_token": csrf}, headers=headers)
        finally:
            path.with_name("away.db").rename(path)
    assert answer.status == 503 and "The database is unreachable: " in answer.text
    assert "unable to open database file. Nothing was changed." in answer.text, answer.text


@sqlite_only
def test_the_pages_list_the_first_500_stuck_audits_and_count_the_rest_when_thousands_are_stuck(demo_url, demo):
    """The overview and the stuck list refresh every second and listed every stuck audit: 12,000 stuck
    (a fleet-wide incident) made 5 MB of HTML each second, per open page."""
    _add_stuck_running(demo, 700)
    stuck = len(cli_json(demo_url, "scan"))
    assert stuck > 700
    with running_dashboard(demo_url) as server:
        listing = server.get("/fragments/stuck")
        overview = server.get("/fragments/overview")
    for answer in (listing, overview):
        assert answer.status == 200
        assert answer.text.count('<tr id="stuck-') == 500
        assert f"and {stuck - 500} more stuck audits, not listed here" in answer.text
    assert f"{stuck} stuck audits." in listing.text
    assert f'<span class="n" id="count-stuck">{stuck}</span>' in overview.text


def _add_stuck_running(demo, count: int) -> None:
    """SQLite: ``count`` audits running for two hours without a heartbeat since, by worker-x."""
    from sqlalchemy import text

    with write_transaction(demo) as connection:
        connection.execute(text(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count) "
            "INSERT INTO audits (target, status, created_at, started_at, heartbeat_at, attempts, worker_id, lease) "
            "SELECT 'https://example.com/' || i, 'running', strftime('%Y-%m-%d %H:%M:%f000', 'now', '-2 hours'), "
            "strftime('%Y-%m-%d %H:%M:%f000', 'now', '-2 hours'), strftime('%Y-%m-%d %H:%M:%f000', 'now', '-2 hours'), "
            "1, 'worker-x', 'lease-' || i FROM n"), {"count": count})


def _hidden_fields(html: str) -> dict:
    import re

    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', html))


@sqlite_only
def test_recover_all_confirmed_as_the_page_served_it_recovers_thousands_of_stuck_audits_once(demo_url, demo):
    """The confirmation used to carry one hidden id per audit: past 64 KiB (about 6,500 audits) the
    form was read as empty and refused as a forged request, so it could never be confirmed."""
    _add_stuck_running(demo, 7_000)
    stuck = len(cli_json(demo_url, "scan"))
    assert stuck > 7000
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in(name="erin")
        headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
        preview = server.post("/actions/recover", form={"csrf_token": csrf, "requeue": "1"}, headers=headers)
        fields = _hidden_fields(preview.text.split('id="recover-confirm"', 1)[1])
        assert set(fields) == {"csrf_token", "plan", "confirm"}
        done = server.post("/actions/recover", form=fields, headers=headers)
        again = server.post("/actions/recover", form=fields, headers=headers)
        huge = server.post("/actions/recover", form={"csrf_token": csrf, "id": "1" * 70000}, headers=headers)
    assert done.status == 200 and f"Recovered {stuck} audits." in done.text
    assert again.status == 409 and "already used" in again.text
    assert huge.status == 413 and "64 KiB" in huge.text
    assert sum(1 for status in statuses(demo).values() if status == "pending") >= stuck, "requeue was kept in the plan"


@sqlite_only
def test_a_body_that_is_not_a_json_object_is_refused_and_changes_nothing(demo_url, demo):
    before = statuses(demo)
    json_type = {**BEARER, "Content-Type": "application/json"}
    with running_dashboard(demo_url) as server:
        answers = {
            "null": server.post("/api/recover", body="null", headers=json_type),
            "nested 5,000 deep": server.post("/api/recover", body='{"a":' * 5000 + "1" + "}" * 5000, headers=json_type),
            "a media type that only mentions json": server.post(
                "/api/recover", body="{}", headers={**BEARER, "Content-Type": "text/plain; charset=notjson"}),
        }
        too_big = server.post("/api/reset-all", body='{"dry_run": true, "x": "' + "a" * 100_000 + '"}', headers=json_type)
        head = http("HEAD", server.origin + "/login")
    for name, answer in answers.items():
        assert answer.status == 415, (name, answer.status)
    assert too_big.status == 413
    assert statuses(demo) == before
    assert head.status == 200, "HEAD is GET without a body, not a wrong sign-in"


@sqlite_only
def test_health_is_503_when_the_file_is_no_longer_a_database(tmp_path, demo_url, demo):
    import shutil

    copy = tmp_path / "copy.db"
    source = demo_url.split("///", 1)[1]
    for suffix in ("", "-wal", "-shm"):
        if Path(source + suffix).exists():
            shutil.copyfile(source + suffix, str(copy) + suffix)
    with running_dashboard(f"sqlite:///{copy}") as server:
        assert server.get("/api/health").status == 200
        for suffix in ("-wal", "-shm"):
            Path(str(copy) + suffix).unlink(missing_ok=True)
        copy.write_bytes(b"not a database at all" * 100)
        broken = server.get("/api/health")
    assert broken.status == 503 and broken.json()["database"] == "unavailable"


@sqlite_only
def test_pages_carry_a_strict_content_security_policy_and_escape_stored_markup(database_url, engine, start_audit, backdate):
    audit_id, _ = start_audit(target='<script>alert(1)</script><img src=x onerror="alert(2)">')
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    with running_dashboard(database_url) as server:
        pages = [server.get(path) for path in ("/", "/stuck", "/audits", f"/audits/{audit_id}",
                                               "/fragments/overview", "/fragments/stuck")]
        api = server.get(f"/api/audits/{audit_id}")
    for answer in pages:
        assert answer.status == 200
        assert "<script>alert" not in answer.text and "<img src=x" not in answer.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in answer.text
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"
    assert api.json()["target"] == '<script>alert(1)</script><img src=x onerror="alert(2)">'


@sqlite_only
def test_the_dashboard_refuses_verdicts_under_thresholds_scan_refuses(database_url, engine, start_audit, backdate):
    audit_id, _ = start_audit(target="https://slow-beats.example")
    with write_transaction(engine) as connection:  # a worker that beats every 10 minutes
        connection.execute(update(audits).where(audits.c.id == audit_id).values(declared_heartbeat_interval=600))
    backdate(audit_id, heartbeat_at=900, last_worker_update=900, progress_changed_at=900)
    scan = CliRunner().invoke(cli, ["scan", "--database-url", database_url])
    with running_dashboard(database_url) as server:
        stuck = server.get("/api/stuck")
        fragment = server.get("/fragments/stuck")
        overview = server.get("/api/overview")
        page = server.get("/fragments/overview")
    assert scan.exit_code == 2 and "below twice the heartbeat interval" in scan.output
    assert stuck.status == 400 and "below twice the heartbeat interval" in stuck.json()["error"]
    assert "Refused, as scan refuses" in fragment.text and "slow-beats" not in fragment.text
    assert "below twice the heartbeat interval" in overview.json()["unsafe_thresholds"]
    assert "thresholds scan and recover refuse" in page.text
    with running_dashboard(database_url, allow_unsafe=True) as server:
        insisted = server.get("/api/stuck")
        calm = server.get("/api/overview")
    assert insisted.status == 200 and [r["id"] for r in insisted.json()] == [audit_id]
    assert calm.json()["unsafe_thresholds"] is None


@sqlite_only
def test_a_five_megabyte_target_is_clipped_on_the_refreshed_pages_and_whole_in_the_api(database_url, engine,
                                                                                             start_audit, backdate):
    target = "https://huge.example/" + "x" * 5_000_000
    audit_id, _ = start_audit(target=target)
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    with running_dashboard(database_url) as server:
        fragments = [server.get(path) for path in ("/fragments/overview", "/fragments/stuck", "/fragments/audits")]
        page = server.get(f"/audits/{audit_id}")
        api = server.get(f"/api/audits/{audit_id}")
    for answer in [*fragments, page]:
        assert answer.status == 200 and "https://huge.example/xxx" in answer.text
        assert len(answer.body) < 100_000 and "4,998,021 more characters" in answer.text
    assert api.json()["target"] == target


# --- the real command ----------------------------------------------------------------------------


def test_serve_survives_an_unreachable_database_shows_it_masked_and_stops_cleanly_on_sigterm(tmp_path):
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/audits"
    proc = serve_process("--port", "0", env={"AUDITCTL_DATABASE_URL": url, "AUDITCTL_WEB_TOKEN": TOKEN}, cwd=tmp_path)
    output = Output(proc)
    try:
        line = output.wait_for("Dashboard at ")
        base = line.split()[2].rstrip("/")
        assert "postgresql://bob:***@127.0.0.1:1/audits" in line and "actions need the token" in line
        page = http("GET", base + "/")
        health = http("GET", base + "/api/health")
        stuck = http("GET", base + "/api/stuck")
        action = http("POST", base + "/api/recover", headers=BEARER)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = output.finish()
    assert page.status == 200 and 'role="alert"' in page.text and "Database unreachable" in page.text
    assert health.status == 503 and health.json()["database"] == "unavailable"
    assert stuck.status == 503 and action.status == 503
    assert code == 0 and "serve stopped." in output.text
    assert "database lost" in output.text
    for text in (page.text, health.text, stuck.text, action.text, output.text):
        assert "s3cret" not in text


@pytest.mark.long
def test_serve_closes_a_connection_that_sends_no_whole_request_head_and_keeps_serving(tmp_path):
    """A connection that opens and sends nothing, or half a request head, used to stay open for good:
    enough of them use up the server's files. Each now closes after the head deadline, and so does
    a keep-alive connection that answered once and then went quiet."""
    from urllib.parse import urlsplit

    from auditctl.cli.serve import REQUEST_HEAD_DEADLINE

    database_url = f"sqlite:///{tmp_path / 'a.db'}"
    CliRunner().invoke(cli, ["init", "--database-url", database_url], catch_exceptions=False)
    proc = serve_process("--port", "0", "--database-url", database_url, cwd=tmp_path)
    output = Output(proc)
    clients = []
    try:
        base = output.wait_for("Dashboard at ").split()[2].rstrip("/")
        address = (urlsplit(base).hostname, urlsplit(base).port)
        idle, half, answered = (socket.create_connection(address, timeout=5) for _ in range(3))
        clients = [idle, half, answered]
        host = f"Host: {address[0]}:{address[1]}\r\n".encode()
        half.sendall(b"GET /api/health HTTP/1.1\r\n" + host)
        answered.sendall(b"GET /api/health HTTP/1.1\r\n" + host + b"\r\n")
        assert answered.recv(65536).startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        closed = {}
        for name, client in (("idle", idle), ("half", half), ("answered", answered)):
            client.settimeout(max(0.1, opened + REQUEST_HEAD_DEADLINE + 10 - time.monotonic()))
            try:
                while client.recv(65536):  # the rest of the one answer, then the end
                    pass
                closed[name] = True
            except (TimeoutError, socket.timeout):
                closed[name] = False
        fresh = http("GET", base + "/api/health")
    finally:
        for client in clients:
            client.close()
        proc.send_signal(signal.SIGTERM)
        code = output.finish()
    assert closed == {"idle": True, "half": True, "answered": True}
    assert fresh.status == 200 and code == 0


def test_serve_on_a_port_in_use_is_one_error_line_and_exit_1(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'a.db'}"
    CliRunner().invoke(cli, ["init", "--database-url", database_url], catch_exceptions=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = serve_process("--port", port, "--database-url", database_url, cwd=tmp_path)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: address already in use; "
                                        "another process listens there: pick another --port"]
    assert out == ""


@sqlite_only
def test_serve_takes_max_attempts_and_max_resets_from_the_environment_like_recover_and_reset_all(demo_url, demo, tmp_path):
    stuck = sorted(r["id"] for r in cli_json(demo_url, "scan"))
    proc = serve_process("--port", "0", env={"AUDITCTL_DATABASE_URL": demo_url, "AUDITCTL_WEB_TOKEN": TOKEN,
                                             "AUDITCTL_MAX_ATTEMPTS": "1", "AUDITCTL_MAX_RESETS": "1"}, cwd=tmp_path)
    output = Output(proc)
    try:
        base = output.wait_for("Dashboard at ").split()[2].rstrip("/")
        given_up = http("POST", base + "/api/recover", json_body={"id": [stuck[0]], "requeue": True}, headers=BEARER)
        asked = http("POST", base + "/api/recover", json_body={"id": [stuck[1]], "requeue": True, "max_attempts": 3},
                     headers=BEARER)
        first = http("POST", base + "/api/reset-all", json_body={"dry_run": False}, headers=BEARER)
        with write_transaction(demo) as connection:  # the audits reset once fail again
            connection.execute(update(audits).where(audits.c.id.in_([r["id"] for r in first.json()]))
                               .values(status="failed", lease=None))
        second = http("POST", base + "/api/reset-all", json_body={"dry_run": True}, headers=BEARER)
    finally:
        proc.send_signal(signal.SIGTERM)
        output.finish()
    assert given_up.status == 200 and given_up.json()[0]["status"] == "failed", "AUDITCTL_MAX_ATTEMPTS=1: given up"
    assert asked.status == 200 and asked.json()[0]["status"] == "pending", "a request's own max_attempts wins"
    assert first.status == 200 and first.json()
    assert second.status == 200
    assert not {r["id"] for r in first.json()} & {r["id"] for r in second.json()}, "AUDITCTL_MAX_RESETS=1: left alone"


@sqlite_only
def test_a_bug_answers_500_in_the_apis_shape_with_every_security_header(demo_url, demo, monkeypatch, caplog):
    with running_dashboard(demo_url) as server:
        def broken(*args, **kwargs):
            raise RuntimeError("a bug, with sqlite:////secret/path in its message")

        monkeypatch.setattr(server.app.state.dashboard, "workers", broken)
        answer = server.get("/api/workers")
    assert answer.status == 500 and answer.json() == {"error": "Internal error: the dashboard's log has the details."}
    assert answer.headers.get("x-content-type-options") == "nosniff" and answer.headers.get("x-frame-options") == "DENY"
    assert "content-security-policy" in answer.headers and answer.headers.get("cache-control") == "no-store"
    assert "internal error answering GET /api/workers" in caplog.text


@sqlite_only
def test_a_backwards_window_of_a_duration_and_a_time_is_a_400_on_the_audits_page(demo_url, demo):
    """Only the database's clock can compare the two; the page answered 500 with a traceback."""
    with running_dashboard(demo_url) as server:
        page = server.get("/audits?since=1h&until=2020-01-01")
    assert page.status == 400 and "since is later than until" in page.text


def test_the_audits_page_refuses_a_limit_of_all_or_past_its_most_rows_when_asked_for_them(demo_url, demo):
    """The page re-reads its listing every 3 s: limit=0 (all) or 10^9 rendered every audit of the
    database again and again (100,000 audits: 67 MB of HTML, 20 s a refresh). The API and
    ``auditctl list`` still take 0 for all: they answer once."""
    PAGE_MAX_ROWS = 1000  # auditctl.web.params.PAGE_MAX_ROWS

    with running_dashboard(demo_url) as server:
        refused = {limit: server.get(f"/audits?limit={limit}") for limit in ("0", "1000000000", str(PAGE_MAX_ROWS + 1))}
        fragment = server.get("/fragments/audits?limit=0")
        most = server.get(f"/audits?limit={PAGE_MAX_ROWS}")
        api_all = server.get("/api/audits?limit=0")
    for limit, page in refused.items():
        assert page.status == 400 and f"at most {PAGE_MAX_ROWS}" in page.text and 'role="alert"' in page.text, limit
        assert "/api/audits" in page.text, "the refusal says where to get them all"
        assert '<tr id="audit-' not in page.text, limit
    assert fragment.status == 400 and f"at most {PAGE_MAX_ROWS}" in fragment.text
    assert most.status == 200 and most.text.count('<tr id="audit-') == len(statuses(demo))
    assert api_all.status == 200 and len(api_all.json()) == len(statuses(demo))


def test_a_sign_in_name_with_a_nul_or_an_escape_acts_and_is_recorded_as_printable_text(demo_url, demo):
    """The name is the actor of every action in the history: a NUL made every action fail on
    PostgreSQL (and marked the audit as needing an operator), and an escape reached the log raw."""
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in(name="bob\x00\x1b[31mevil")
        session = {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": server.origin}
        done = server.post("/actions/recover", form={"csrf_token": csrf, "confirm": "1", "id": "12"}, headers=session)
    assert done.status == 200 and "Recovered 1 audit" in done.text, done.text
    (recovered,) = [e for e in events(demo, 12) if e["event"] == "recovered"]
    assert recovered["actor"] == "dashboard bob\\x00\\x1b[31mevil"


@sqlite_only
def test_workers_history_and_previews_clip_a_megabyte_value_like_every_other_page(demo_url, demo):
    from auditctl.schema import workers

    huge = "w" * 1_000_000
    with write_transaction(demo) as connection:
        connection.execute(update(workers).values(worker_id=huge))
        connection.execute(update(audits).where(audits.c.id == 12).values(target=huge))
    with running_dashboard(demo_url) as server:
        listed = server.get("/fragments/workers")
        cookie, csrf = server.sign_in()
        preview = server.post("/actions/recover", form={"csrf_token": csrf, "id": "12"},
                              headers={"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": server.origin})
    assert listed.status == 200 and preview.status == 200, preview.text
    assert len(listed.text) < 100_000 and len(preview.text) < 100_000


@sqlite_only
def test_reasons_of_any_length_are_clipped_on_the_history_and_in_the_reset_preview(demo_url, demo):
    with write_transaction(demo) as connection:
        connection.execute(update(audits).where(audits.c.id == 7).values(recovery_reasons="Q" * 500_000))
        connection.exec_driver_sql("UPDATE audit_events SET reasons = ? WHERE audit_id = 7", ("R" * 500_000,))
    with running_dashboard(demo_url) as server:
        history = server.get("/fragments/audits/7")
        cookie, csrf = server.sign_in()
        preview = server.post("/actions/reset-all", form={"csrf_token": csrf},
                              headers={"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": server.origin})
    assert history.status == 200 and preview.status == 200, preview.text
    assert len(history.text) < 100_000 and len(preview.text) < 100_000


@sqlite_only
def test_a_forwarded_address_reaches_the_log_as_printable_text(demo_url, demo, caplog):
    """uvicorn takes X-Forwarded-For from loopback as the client's address: a refused sign-in logged it raw."""
    import logging

    with caplog.at_level(logging.WARNING, logger="auditctl.web"), running_dashboard(demo_url) as server:
        refused = server.post("/login", form={"token": "wrong"},
                              headers={"Origin": server.origin, "X-Forwarded-For": "\x1b[31mRED"})
    assert refused.status == 401
    (line,) = [r.getMessage() for r in caplog.records if "refused: wrong token" in r.getMessage()]
    assert "\x1b" not in line and "\\x1b[31mRED" in line


def test_a_confirmation_taken_as_the_wrong_kind_stays_for_its_own_and_a_session_keeps_the_latest_twenty():
    from auditctl.recovery import ResetPlan
    from auditctl.web.app import RecoverPlan
    from auditctl.web.security import MAX_PLANS, Session

    session = Session(id="s", user="ann", csrf="c")
    recover = session.keep_plan(RecoverPlan(ids=(1, 2), requeue=False))
    assert session.take_entry(recover, ResetPlan) is None, "a recover plan is no reset plan"
    assert session.take_entry(recover, RecoverPlan)[0] == RecoverPlan(ids=(1, 2), requeue=False)
    assert session.take_entry(recover, RecoverPlan) is None, "used once"
    kept = [session.keep_plan(RecoverPlan(ids=(n,), requeue=False)) for n in range(MAX_PLANS + 5)]
    assert len(session.plans) == MAX_PLANS
    assert session.take_entry(kept[0], RecoverPlan) is None and session.take_entry(kept[-1], RecoverPlan) is not None


@sqlite_only
def test_a_recovered_event_with_a_megabyte_of_reasons_is_clipped_in_the_overview_chart(demo_url, demo):
    """The chart's per-hour labels name the reasons the history holds: another tool may have stored anything."""
    from sqlalchemy import insert

    from auditctl.schema import audit_events

    with write_transaction(demo) as connection:
        now = connection.exec_driver_sql("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").scalar()
        connection.execute(insert(audit_events).values(audit_id=12, at=now, event="recovered", from_status="running",
                                                       to_status="failed", reasons="R" * 1_000_000, actor="elsewhere"))
        connection.execute(insert(audit_events).values(audit_id=12, at=now, event="recovered", from_status="running",
                                                       to_status="failed", actor="elsewhere",
                                                       reasons=",".join(f"r{i}" for i in range(50_000))))
    with running_dashboard(demo_url) as server:
        page = server.get("/fragments/overview")
    assert page.status == 200
    assert "R" * 2001 not in page.text and len(page.text) < 100_000, len(page.text)


@sqlite_only
def test_an_audit_page_opened_before_its_audit_ran_offers_recover_once_the_refresh_finds_it_stuck(demo_url, demo):
    """The page was opened while the audit was pending (or the database away): the Recover button
    came only with the page, so an audit that got stuck while it was open could not be recovered
    from it without a reload."""
    with running_dashboard(demo_url) as server:
        cookie, _ = server.sign_in()
        page = server.get("/audits/16", headers={"Cookie": cookie})
        with write_transaction(demo) as connection:
            connection.execute(update(audits).where(audits.c.id == 16).values(
                status="running", worker_id="worker-9", started_at="2000-01-01 00:00:00.000000",
                heartbeat_at="2000-01-01 00:00:00.000000"))
        assert 16 in [v["id"] for v in cli_json(demo_url, "scan")]
        refreshed = server.get("/fragments/audits/16", headers={"Cookie": cookie})
        anonymous = server.get("/fragments/audits/16")
    assert page.status == 200 and "Recover this audit" not in page.text
    assert 'id="action-panel"' in page.text, "no panel for a recovery started once the audit runs"
    assert "Recover this audit" in refreshed.text and 'name="id" value="16"' in refreshed.text
    assert "Recover this audit" not in anonymous.text and "sign in" in anonymous.text


@sqlite_only
def test_a_recovery_confirmed_after_a_listed_audit_finished_says_it_was_left_alone(demo_url, demo):
    """As the confirmed reset does: "Recovered 2 audits." alone, after a confirmation that listed
    three, leaves the operator to guess what became of the third."""
    stuck = [v["id"] for v in cli_json(demo_url, "scan")]
    assert len(stuck) == 3
    with running_dashboard(demo_url) as server:
        cookie, csrf = server.sign_in()
        headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
        preview = server.post("/actions/recover", form={"csrf_token": csrf}, headers=headers)
        plan = preview.text.split('name="plan" value="', 1)[1].split('"', 1)[0]
        with write_transaction(demo) as connection:  # its worker finished it meanwhile
            connection.execute(update(audits).where(audits.c.id == stuck[0]).values(
                status="completed", finished_at="2099-01-01 00:00:00.000000"))
        done = server.post("/actions/recover", form={"csrf_token": csrf, "plan": plan, "confirm": "1"}, headers=headers)
    assert "Recover 3 stuck audits?" in preview.text
    assert done.status == 200 and "Recovered 2 audits" in done.text, done.text
    assert "1 of the 3 listed was no longer stuck and was left alone" in done.text, done.text


@sqlite_only
def test_a_history_row_with_an_unreadable_time_shows_a_dash_as_show_does(demo_url, demo):
    with write_transaction(demo) as connection:
        connection.exec_driver_sql("UPDATE audit_events SET at = 'yesterday-ish' WHERE audit_id = 7")
    shown = CliRunner().invoke(cli, ["show", "7", "--database-url", demo_url], catch_exceptions=False).output
    assert "\n-  " in shown.split("history:", 1)[1], shown
    with running_dashboard(demo_url) as server:
        page = server.get("/fragments/audits/7")
    history = page.text.split('id="history"', 1)[1]
    assert "<tr><td></td>" not in history, "an empty cell: the time looks missing, not unreadable"
    assert "<tr><td>-</td>" in history


@sqlite_only
def test_each_stuck_rows_recover_button_names_its_audit_for_a_screen_reader(demo_url, demo):
    """Three buttons all called "Recover…": listed by a screen reader (or reached by Tab), which is which?"""
    import re

    stuck = [v["id"] for v in cli_json(demo_url, "scan")]
    with running_dashboard(demo_url) as server:
        cookie, _ = server.sign_in()
        pages = [server.get(path, headers={"Cookie": cookie}).text for path in ("/fragments/overview", "/fragments/stuck")]
    for text in pages:
        labels = re.findall(r'<button type="submit" class="small"[^>]*aria-label="([^"]*)"', text)
        assert labels == [f"Recover audit {i}…" for i in stuck], labels


@sqlite_only
def test_a_refused_filter_or_a_deleted_audit_stops_its_pages_refresh_when_the_refresh_is_refused(demo_url, demo):
    """The refreshed region asked for its refusal again every few seconds for as long as the page was
    open. A refused page now has no refresh, and a refused refresh replaces the region with one
    that has none (htmx's ``HX-Reswap: outerHTML``), the refusal's status kept."""
    from sqlalchemy import delete

    from auditctl.schema import audit_events

    hx = {"HX-Request": "true"}
    with running_dashboard(demo_url) as server:
        refused = server.get("/audits?status=bogus")
        fine = server.get("/audits?status=failed")
        fragment = server.get("/fragments/audits?since=1h&until=2020-01-01", headers=hx)
        audit_id = max(statuses(demo))
        with write_transaction(demo) as connection:  # another tool deletes the audit while its page is open
            connection.execute(delete(audit_events).where(audit_events.c.audit_id == audit_id))
            connection.execute(delete(audits).where(audits.c.id == audit_id))
        gone = server.get(f"/fragments/audits/{audit_id}", headers=hx)
    assert refused.status == 400 and "bogus" in refused.text and 'hx-trigger="every' not in refused.text
    assert fine.status == 200 and 'hx-trigger="every 3s' in fine.text
    for answer, status, text in ((fragment, 400, "since is later than until"), (gone, 404, str(audit_id))):
        assert answer.status == status and text in answer.text
        assert answer.headers.get("hx-reswap") == "outerHTML"
        assert answer.text.startswith('<div id="live">') and "hx-trigger" not in answer.text


@sqlite_only
def test_signing_in_from_a_page_returns_to_that_page_and_never_to_another_site(demo_url, demo):
    """Sign-in always went back to the overview, whatever page the operator was on. The page's
    Sign in link now carries it (``next``), and only a path on this dashboard is followed."""
    import html
    from urllib.parse import unquote

    running = next(i for i, s in statuses(demo).items() if s == "running")

    def link(text: str) -> str:
        return html.unescape(text.split('href="/login?', 1)[1].split('"', 1)[0])

    with running_dashboard(demo_url) as server:
        origin = {"Origin": server.origin}
        listing = server.get("/audits?status=failed&sort=target")
        form = server.get("/login?" + link(listing.text))
        fragment = server.get(f"/fragments/audits/{running}")  # its "sign in" hint, refreshed with the page
        back = server.post("/login", form={"token": TOKEN, "next": "/audits?status=failed&sort=target"}, headers=origin)
        wrong = server.post("/login", form={"token": "guess", "next": "/audits?status=failed"}, headers=origin)
        hostile = {target: server.post("/login", form={"token": TOKEN, "next": target}, headers=origin)
                   for target in ("//evil.example", "https://evil.example/", "/\\evil.example", "/\\/evil.example",
                                  "/\t/evil.example", " //evil.example", "javascript:alert(1)", "http:evil.example",
                                  "/login?next=//evil.example", "evil.example",
                                  "///evil.example", "////evil.example/x")}
    assert unquote(link(listing.text)) == "next=/audits?status=failed&sort=target"
    assert 'name="next" value="/audits?status=failed&amp;sort=target"' in form.text
    assert unquote(link(fragment.text)) == f"next=/audits/{running}"
    assert back.status == 303 and back.headers["location"] == "/audits?status=failed&sort=target"
    assert wrong.status == 401 and 'name="next" value="/audits?status=failed"' in wrong.text
    assert {target: (a.status, a.headers["location"]) for target, a in hostile.items()} == {
        target: (303, "/") for target in hostile}


@sqlite_only
def test_a_return_address_with_quotes_stays_inside_its_attribute_on_the_sign_in_page(demo_url):
    """``next`` may be any printable path, quotes included: the page shows it escaped, never as markup."""
    with running_dashboard(demo_url) as server:
        wrong = server.post("/login", form={"token": "guess", "next": '/audits?x="onfocus="alert(1)'},
                            headers={"Origin": server.origin})
    assert wrong.status == 401
    assert 'name="next" value="/audits?x=&quot;onfocus=&quot;alert(1)"' in wrong.text
    assert 'onfocus="alert' not in wrong.text

def _confirmation_offered(server, action: str, *, name: str):
    """Sign in as ``name`` and press Reset All Audits or Recover: (headers, the path that confirms,
    the confirming form, the preview's answer)."""
    cookie, csrf = server.sign_in(name=name)
    headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
    preview, confirm = (("/actions/reset-all", "/actions/reset-all/confirm") if action == "reset"
                        else ("/actions/recover", "/actions/recover"))
    shown = server.post(preview, form={"csrf_token": csrf}, headers=headers)
    plan = shown.text.split('name="plan" value="', 1)[1].split('"', 1)[0]
    return headers, confirm, {"csrf_token": csrf, "plan": plan, "confirm": "1"}, shown


def _database_away(demo):
    """(take it away, bring it back): on SQLite the file moves away and back; on PostgreSQL every
    change of an audit fails as in an administrator's shutdown (SQLSTATE 57P01), before any commits."""
    import shutil

    from dbtools import drop_trigger, install_abort_trigger

    if demo.dialect.name == "sqlite":
        path = Path(demo.url.database)
        away = path.with_name("elsewhere.db")
        return lambda: shutil.move(path, away), lambda: shutil.move(away, path)
    return (lambda: install_abort_trigger(demo, "outage", errcode="57P01"), lambda: drop_trigger(demo, "outage"))


@pytest.mark.parametrize("action", ["reset", "recover"])
def test_a_confirmation_the_database_failed_before_any_change_stays_usable_once(demo_url, demo, action):
    """A confirmed reset or recover the database failed before it changed anything used up its
    confirmation: the operator had to start over though nothing had changed. The answer now says
    nothing changed and offers the same confirmation again, which works (once) when the database is back."""
    before = statuses(demo)
    away, back = _database_away(demo)
    with running_dashboard(demo_url) as server:
        headers, confirm, form, _shown = _confirmation_offered(server, action, name="dora")
        plan = form["plan"]
        away()
        try:
            failed = server.post(confirm, form=form, headers=headers)
        finally:
            back()
        unchanged = statuses(demo)
        again = server.post(confirm, form=form, headers=headers)
        third = server.post(confirm, form=form, headers=headers)
    assert failed.status == 503, failed.text
    assert "Nothing was changed, and this confirmation still stands" in failed.text
    assert f'name="plan" value="{plan}"' in failed.text, "the same confirmation is offered again"
    assert unchanged == before
    done = "Reset 2 audits to pending." if action == "reset" else "Recovered 3 audits."
    assert again.status == 200 and done in again.text, again.text
    assert third.status == 409, "a confirmation that did its work is used up"


@pytest.mark.parametrize("engine_name", ["postgresql"])
@pytest.mark.parametrize("action", ["reset", "recover"])
def test_a_confirmation_refused_by_the_roles_privileges_says_to_press_again_once_it_may_write_when_kept(
        demo_url, demo, action):
    """A dashboard whose role may not write (SQLSTATE 42501, as for a role with SELECT only or a
    standby): the confirmation is kept, and pressing again is not tied to "the database is back",
    which it never went away from."""
    from dbtools import drop_trigger, install_abort_trigger

    with running_dashboard(demo_url) as server:
        headers, confirm, form, _shown = _confirmation_offered(server, action, name="dora")
        install_abort_trigger(demo, "no_privilege", errcode="42501")
        try:
            failed = server.post(confirm, form=form, headers=headers)
        finally:
            drop_trigger(demo, "no_privilege")
    assert "will not let auditctl write" in failed.text, failed.text
    assert "Nothing was changed, and this confirmation still stands" in failed.text
    assert "once the database lets auditctl write" in failed.text and "once the database is back" not in failed.text


@pytest.mark.parametrize("engine_name", ["postgresql"])
def test_a_recovery_confirmed_on_the_page_and_stopped_partway_says_what_it_did_and_is_used_up(demo_url, demo):
    """It answered only the error, as if nothing had changed, though its first batch had committed.
    It now says what it recovered and that the rest were not reached; its confirmation is used up
    (pressing Recover again shows what is still stuck), never redone blindly."""
    from dbtools import install_abort_trigger, make_running

    make_running(demo, 600)
    stuck = sorted(r["id"] for r in cli_json(demo_url, "scan", "-o", "json"))
    install_abort_trigger(demo, "outage", when_pg=f"NEW.status = 'failed' AND NEW.id > {stuck[499]}", errcode="57P01")
    with running_dashboard(demo_url) as server:
        headers, _confirm, form, _shown = _confirmation_offered(server, "recover", name="eve")
        confirmed = server.post("/actions/recover", form=form, headers=headers)
        again = server.post("/actions/recover", form=form, headers=headers)
    assert confirmed.status == 503
    assert "Recovered 500 audits." in confirmed.text and "Stopped partway by an error: " in confirmed.text
    assert "left alone" not in confirmed.text and "still stands" not in confirmed.text
    assert confirmed.headers["hx-trigger"] == "auditctl:refresh"
    assert again.status == 409
    assert sum(1 for s in statuses(demo).values() if s == "failed") >= 500


@sqlite_only
def test_a_worker_registry_row_that_cannot_be_read_is_shown_as_unreadable_when_listing_workers(demo_url, demo,
                                                                                              monkeypatch):
    """A registry row ``instances`` could not read was listed as an ordinary silent instance holding no
    audit, with no note: the operator never learnt something was wrong with it. It is now
    ``unreadable``, with what was wrong, on the dashboard, in its JSON and in ``auditctl workers``.
    No value found so far makes a row unreadable (the readers turn each into None), so the reading
    of one row is made to fail here, as another tool's row one day might."""

    victim = cli_json(demo_url, "workers")[0]["instance_id"]
    registry_row_unreadable(monkeypatch, victim)
    listed = {w["instance_id"]: w for w in cli_json(demo_url, "workers")}
    table = CliRunner().invoke(cli, ["workers", "--database-url", demo_url], catch_exceptions=False, env={"COLUMNS": "200"})
    with running_dashboard(demo_url) as server:
        page = server.get("/workers")
        api = {w["instance_id"]: w for w in server.get("/api/workers").json()}
    assert listed[victim]["problems"] == ["row_unreadable: ValueError: year 0 is out of range"]
    assert all(w["problems"] == [] for i, w in listed.items() if i != victim)
    assert api[victim]["problems"] == listed[victim]["problems"]
    line = next(line for line in table.stdout.splitlines() if victim[:8] in line)
    assert "unreadable" in line and "silent" not in line, table.stdout
    assert "row_unreadable: ValueError: year 0 is out of range" in table.stdout
    row = page.text.split(f'>{victim[:8]}<', 1)[1].split("</tr>", 1)[0]
    assert 'class="state w-unreadable">unreadable<' in row and "row_unreadable: ValueError" in row


@sqlite_only
def test_the_outage_banner_starts_the_databases_error_as_a_sentence_when_the_file_is_emptied(demo_url, demo):
    """It read "Database unreachable. the database at ... has no auditctl schema": the error's own
    first word in lower case, after a full stop."""
    with running_dashboard(demo_url) as server:
        Path(demo.url.database).write_bytes(b"")
        page = wait_for(lambda: (answer := server.get("/")) and 'id="db-banner"' in answer.text and answer,
                        timeout=20, message="the outage banner")
    banner = page.text.split('id="db-banner">', 1)[1].split("</div>", 1)[0]
    error = banner.split("</strong> ", 1)[1]
    assert error[:1].isupper(), banner

def test_dashboard_shows_the_database_unavailable_when_libpq_refuses_a_url_value_on_connecting(tmp_path):
    """A value libpq reads only on connecting (``keepalives=abc``) is a usage error for the commands;
    on the dashboard it was answered as the request's fault (400), and health said the database was up."""
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/audits?keepalives=abc"
    with running_dashboard(url, token=TOKEN) as server:
        base = server.url.rstrip("/")
        health = http("GET", base + "/api/health")
        stuck = http("GET", base + "/api/stuck")
        action = http("POST", base + "/api/recover", headers=BEARER)
        page = http("GET", base + "/")
    assert health.status == 503 and health.json()["database"] == "unavailable"
    assert 'invalid integer value \\"abc\\" for connection option \\"keepalives\\"' in health.text
    assert stuck.status == 503 and action.status == 503, (stuck.text, action.text)
    assert page.status == 200 and "Database unreachable" in page.text
    for text in (health.text, stuck.text, action.text, page.text):
        assert "s3cret" not in text


def test_recover_answers_the_database_unreachable_not_refused_when_libpq_refuses_a_url_value_under_unsafe_thresholds(
        tmp_path):
    """Under ``serve --unsafe-thresholds`` no threshold check reads first, so the recovery's own
    connection met libpq's refusal of the URL: the buttons and ``POST /api/recover`` answered 400
    "Refused", blaming the request, where the reads (and Reset All Audits) say the database cannot be
    reached (503). A server-side setting is not the operator's input."""
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/audits?keepalives=abc"
    with running_dashboard(url, token=TOKEN, allow_unsafe=True) as server:
        stuck = server.get("/api/stuck")
        api = server.post("/api/recover", headers=BEARER)
        cookie, csrf = server.sign_in()
        headers = {"Cookie": cookie, "Origin": server.origin, "HX-Request": "true"}
        preview = server.post("/actions/recover", form={"csrf_token": csrf}, headers=headers)
        confirm = server.post("/actions/recover", form={"csrf_token": csrf, "confirm": "1"}, headers=headers)
        reset = server.post("/actions/reset-all", form={"csrf_token": csrf}, headers=headers)
    assert stuck.status == api.status == 503, (stuck.text, api.text)
    assert api.json() == {"error": stuck.json()["error"] + "; nothing was changed"}, "the read's error, and what the action did"
    for answer in (preview, confirm, reset):
        assert answer.status == 503, answer.text
        assert "The database is unreachable: " in answer.text and "Refused" not in answer.text
        assert "for connection option &quot;keepalives&quot;" in answer.text and "Nothing was changed." in answer.text
    for text in (stuck.text, api.text, preview.text, confirm.text, reset.text):
        assert "s3cret" not in text


def test_the_dashboard_keeps_at_most_max_sessions_dropping_the_oldest_sign_in():
    from auditctl.web.security import MAX_SESSIONS, Sessions

    sessions = Sessions()
    made = [sessions.create(f"user-{i}") for i in range(MAX_SESSIONS + 1)]
    assert sessions.get(made[0].id) is None, "the oldest sign-in is dropped"
    assert all(sessions.get(s.id) is s for s in (made[1], made[-1]))


def test_api_overview_counts_the_healthy_audits_its_sample_leaves_out(demo_url, demo):
    with running_dashboard(demo_url) as server:
        overview = server.get("/api/overview").json()
    healthy = overview["by_status"]["running"] - overview["stuck_count"]
    assert overview["healthy_more"] == healthy - len(overview["healthy_sample"]) >= 0
    assert healthy == 4


@pytest.mark.parametrize("record", ["UPDATE alembic_version SET version_num = '0099'",
                                    "INSERT INTO alembic_version VALUES ('0099')"])
def test_api_recover_on_a_schema_it_may_not_change_says_nothing_was_changed_once(demo_url, demo, record):
    """The library's refusal of a newer (or unclear) schema already ends "nothing was changed"; the API
    added its own: "...upgrade auditctl; nothing was changed; nothing was changed"."""
    from sqlalchemy import text

    with demo.begin() as connection:
        connection.execute(text(record))
    before = statuses(demo)
    with running_dashboard(demo_url) as server:
        answer = server.post("/api/recover", json_body={}, headers=BEARER)
    error = answer.json()["error"]
    assert answer.status == 503 and error.lower().count("nothing was changed") == 1, error
    assert error.endswith("nothing was changed"), error
    assert statuses(demo) == before


@pytest.mark.parametrize("record, when", [("UPDATE alembic_version SET version_num = '0099'", "once auditctl is upgraded"),
                                          ("INSERT INTO alembic_version VALUES ('0099')",
                                           "once the schema's revision record is set right")])
def test_a_confirmation_kept_on_a_schema_it_may_not_change_says_nothing_was_changed_once_and_what_to_wait_for(
        demo_url, demo, record, when):
    """A newer auditctl migrated the database between the preview and the confirmation: the panel said
    "...upgrade auditctl; nothing was changed. Nothing was changed, and this confirmation still stands:
    press Recover again (once the database is back)", which never went away."""
    import html

    from sqlalchemy import text

    with running_dashboard(demo_url) as server:
        headers, confirm, form, _shown = _confirmation_offered(server, "recover", name="dora")
        with demo.begin() as connection:
            connection.execute(text(record))
        before = statuses(demo)
        failed = server.post(confirm, form=form, headers=headers)
    assert failed.status == 503, failed.text
    assert failed.text.lower().count("nothing was changed") == 1, failed.text
    assert "Nothing was changed, and this confirmation still stands" in failed.text
    assert when in html.unescape(failed.text) and "once the database is back" not in failed.text, failed.text
    assert statuses(demo) == before
