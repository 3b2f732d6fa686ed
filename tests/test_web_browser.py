"""The dashboard in a real browser: headless Chromium (Debian's package) against ``auditctl.web`` on loopback.

One browser for the module; each test gets a fresh browser context (no cookies carried
over), a real uvicorn server and its own database, on SQLite and on PostgreSQL. Every
test fails if a native dialog opens (the confirmation must be in the page, and stored
markup must never run) or if the page logs an error (a script the CSP blocked, a failed
request). ``test_overview_...`` takes README's screenshot; with ``UPDATE_SCREENSHOTS=1`` it replaces
tests/artifacts/overview.png (so an ordinary run leaves the work tree clean).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from dbtools import all_rows, events, kill_quietly, read_line, spawn
from webtools import TOKEN, running_dashboard
from webtools import demo_fixture, demo_url_fixture, sqlite_demo_template_fixture  # noqa: F401 - fixtures

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WORKER = Path(__file__).parent / "workerproc.py"
SCREENSHOT = Path(__file__).parent / "artifacts" / "overview.png"
#: The engine does not change what the page does with what it reads (tests/test_web.py reads both);
#: only the outage test, whose failure modes differ, runs on both.
sqlite_only = pytest.mark.parametrize("engine_name", ["sqlite"])
#: How long a test waits for the page to show a change. The pages poll every second; this is a
#: deadline for a loaded machine, not a claim about speed (the figures are printed).
LIVE = 10_000
MARKUP = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def report(name: str, value, unit: str = "") -> None:
    print(f"FIGURE {name}: {value} {unit}".rstrip())


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is required in CI (Debian's chromium package; .ci/run installs it)")
        pytest.skip(f"browser tests skipped: no {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.dialogs, page.errors = [], []

    def on_dialog(dialog):
        page.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()
    assert page.dialogs == [], "a native dialog opened"


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def sign_in(page, server, name: str = "") -> None:
    page.goto(server.url + "login")
    page.fill("input[name=token]", TOKEN)
    if name:
        page.fill("input[name=name]", name)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(server.url)


def mark_document(page) -> None:
    """A flag that only this very document carries: a reload or a navigation loses it."""
    page.evaluate("window.__sameDocument = true")


def same_document(page) -> bool:
    return page.evaluate("window.__sameDocument === true")


def statuses(engine) -> dict[int, str]:
    return {row["id"]: row["status"] for row in all_rows(engine)}


@sqlite_only
def test_overview_shows_the_demo_fleets_stuck_audits_with_their_reasons(page, demo_url, demo):
    from auditctl.rules import find_stuck
    from auditctl.thresholds import Policy

    expected = {v.id: v.reasons for v in find_stuck(demo, Policy.of())}
    assert sorted(r for reasons in expected.values() for r in reasons) == [
        "max_age_exceeded", "progress_stalled", "stale_heartbeat"]
    # The file lies in the test's working directory: the picture shows the URL as README's default.
    assert demo_url == f"sqlite:///{Path.cwd() / 'auditctl.db'}"
    with running_dashboard("sqlite:///auditctl.db") as server:
        sign_in(page, server, name="alice")
        expect(page.locator("#stuck-table tbody tr")).to_have_count(len(expected))
        for audit_id, reasons in expected.items():
            row = page.locator(f"#stuck-{audit_id}")
            expect(row.locator(".reasons")).to_have_text(" ".join(reasons))
            expect(row.locator(".why")).not_to_be_empty()
        expect(page.locator("#count-stuck")).to_have_text(str(len(expected)))
        expect(page.get_by_role("button", name="Reset All Audits")).to_be_enabled()
        expect(page.locator("svg.chart rect.bar:not(.none)")).to_have_count(1)
        # The page refreshes every second by morphing: a button someone is about to press stays the same element.
        button = page.locator(f"#stuck-{min(expected)} button").element_handle()
        read_at = page.locator(".updated").inner_text()
        expect(page.locator(".updated")).not_to_have_text(read_at, timeout=LIVE)
        assert button.evaluate("element => element.isConnected"), "the refresh replaced the row's button"
        page.wait_for_timeout(300)  # let the fonts settle for the picture
        picture = page.screenshot(full_page=True)
        assert picture.startswith(b"\x89PNG") and len(picture) > 10_000
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(picture)
    assert page.errors == []


@sqlite_only
def test_a_worker_killed_during_the_test_appears_as_stuck_without_a_reload(page, demo_url, demo):
    # A long stale_after: only the registry's proof that the process is gone can make it stuck quickly.
    worker = spawn(WORKER, demo_url, "--worker-id", "web-worker", "--stale-after", "600", "--heartbeat", "1",
                   "--max-age", "3600", "--seconds", "60", "--tick", "0.2")
    try:
        read_line(worker, startswith="READY")
        audit_id = int(read_line(worker, startswith="CLAIMED").split()[1])
        with running_dashboard(demo_url) as server:
            page.goto(server.url)
            expect(page.locator(f"#healthy-table #audit-{audit_id}")).to_be_visible(timeout=LIVE)
            expect(page.locator(f"#stuck-{audit_id}")).to_have_count(0)
            mark_document(page)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            killed = time.monotonic()
            row = page.locator(f"#stuck-{audit_id}")
            expect(row).to_be_visible(timeout=LIVE)
            latency = time.monotonic() - killed
            expect(row.locator(".reasons")).to_have_text("worker_gone")
            expect(page.locator(f"#healthy-table #audit-{audit_id}")).to_have_count(0)
            assert same_document(page), "the page was reloaded"
    finally:
        kill_quietly(worker)
    report(f"dashboard shows a SIGKILLed worker's audit as stuck ({demo.dialect.name})", round(latency, 2),
           "s after the kill (pages poll every 1 s)")
    assert page.errors == []


@sqlite_only
def test_reset_all_audits_confirms_in_the_page_then_failed_audits_are_pending(page, demo_url, demo):
    before = statuses(demo)
    failed = sorted(i for i, s in before.items() if s == "failed")
    assert len(failed) == 2
    with running_dashboard(demo_url) as server:
        sign_in(page, server, name="carol")
        mark_document(page)
        page.get_by_role("button", name="Reset All Audits").click()
        confirm = page.get_by_role("region", name="Confirm reset")
        expect(confirm).to_be_visible()
        _settled(page)
        expect(confirm.get_by_role("heading")).to_have_text("Reset 2 audits to pending?")
        expect(confirm.locator("#count-stuck-origin")).to_contain_text("2 recovered as stuck")
        expect(confirm.locator("#count-error-origin")).to_contain_text("0 failed with their own error")
        assert statuses(demo) == before, "showing the confirmation changed the database"
        confirm.get_by_role("button", name="Confirm reset").click()
        expect(page.locator("#reset-result")).to_contain_text("Reset 2 audits to pending.")
        assert {i: statuses(demo)[i] for i in failed} == {i: "pending" for i in failed}
        expect(page.locator("#count-failed")).to_have_text("0", timeout=LIVE)
        assert same_document(page)
    assert {e["actor"] for i in failed for e in events(demo, i) if e["event"] == "reset"} == {"dashboard carol"}
    assert page.dialogs == [] and page.errors == []


@sqlite_only
@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "not-signed-in"])
def test_without_the_token_reset_all_is_refused_and_nothing_changes(page, demo_url, demo, token):
    before = statuses(demo)
    with running_dashboard(demo_url, token=token) as server:
        page.goto(server.url)
        button = page.get_by_role("button", name="Reset All Audits")
        expect(button).to_be_disabled()
        expect(page.locator("#actions-disabled")).to_contain_text("without a token" if token is None else "sign in")
        # Someone enables the button in the developer tools and presses it anyway.
        page.evaluate("document.getElementById('reset-all').disabled = false")
        button.click()
        refusal = page.locator("#refused")
        expect(refusal).to_contain_text("actions are disabled" if token is None else "sign in with the token first")
        expect(refusal).to_contain_text("Nothing was changed")
        expect(page.get_by_role("button", name="Confirm reset")).to_have_count(0)
        # And a script in the page posting straight to the API fares no better.
        status = page.evaluate("fetch('/api/reset-all', {method: 'POST'}).then(r => r.status)")
        assert status == (403 if token is None else 401)
    assert statuses(demo) == before


@sqlite_only
def test_a_target_holding_markup_is_shown_as_text(page, database_url, start_audit, backdate):
    audit_id, _ = start_audit(target=MARKUP, worker_id='<b id="bold">w</b>')
    backdate(audit_id, heartbeat_at=700, last_worker_update=700, progress_changed_at=700)
    with running_dashboard(database_url) as server:
        for path in ("", f"audits/{audit_id}", "audits"):
            page.goto(server.url + path)
            expect(page.get_by_text(MARKUP, exact=True).first).to_be_visible()
            page.wait_for_timeout(200)  # a poll or two: the swapped-in fragments must stay text as well
            assert page.evaluate("window.__xss") is None
            assert page.locator("img[src=x], #bold").count() == 0
        expect(page.get_by_text('<b id="bold">w</b>', exact=True).first).to_be_visible()


@pytest.fixture
def outage(request, engine_name, tmp_path):
    """(database URL, stop, start, left alone): a database this test may take away and bring back, and a
    check that the dashboard did not put anything in its place meanwhile."""
    from auditctl.db import create_engine
    from auditctl.demo import seed_demo
    from auditctl.migrate import upgrade

    if engine_name == "sqlite":
        path = tmp_path / "fleet.db"
        url = f"sqlite:///{path}"
        engine = create_engine(url)
        upgrade(engine)
        seed_demo(engine)
        engine.dispose()
        away = tmp_path / "elsewhere.db"
        # The file moves away and back: a reader must report it lost, never create an empty one there.
        yield url, lambda: shutil.move(path, away), lambda: shutil.move(away, path), lambda: not path.exists()
        return
    from pgserver import PostgresServer, require_postgres

    require_postgres()
    server = PostgresServer()
    server.start()
    try:
        engine = create_engine(server.url)
        upgrade(engine)
        seed_demo(engine)
        engine.dispose()
        yield server.url, lambda: server.stop("fast"), server.start, lambda: True
    finally:
        server.cleanup()


def test_stopping_the_database_shows_an_alert_banner_that_clears_when_it_returns(page, outage, engine_name):
    url, stop, start, left_alone = outage
    with running_dashboard(url) as server:
        page.goto(server.url)
        expect(page.locator("#count-stuck")).to_have_text("3")
        expect(page.get_by_role("alert")).to_have_count(0)
        mark_document(page)
        stop()
        lost = time.monotonic()
        banner = page.get_by_role("alert")
        expect(banner).to_be_visible(timeout=LIVE)
        shown = time.monotonic() - lost
        expect(banner).to_contain_text("Database unreachable")
        assert left_alone(), "the dashboard created a database where the lost one was"
        # The last figures stay on the page, dimmed, under the alert.
        expect(page.locator("#count-stuck")).to_have_text("3")
        start()
        back = time.monotonic()
        expect(page.get_by_role("alert")).to_have_count(0, timeout=LIVE)
        cleared = time.monotonic() - back
        expect(page.get_by_role("status").filter(has_text="Database back")).to_be_visible()
        assert same_document(page), "the page was reloaded"
    report(f"dashboard alert after the database stopped ({engine_name})", round(shown, 2), "s")
    report(f"dashboard alert cleared after the database returned ({engine_name})", round(cleared, 2), "s")


def _settled(page) -> None:
    """Wait until htmx has processed what it last swapped in (it does so after a settle delay): a
    button pressed before that submits its form the plain way, a whole page instead of a panel."""
    page.wait_for_function("() => !document.querySelector('.htmx-added, .htmx-settling, .htmx-swapping, .htmx-request')")


def _focused(page) -> str:
    """Where the keyboard focus is: the focused element's id, or its nearest panel's, or its tag."""
    return page.evaluate("""() => { const a = document.activeElement;
        if (!a || a === document.body) return 'body';
        const panel = a.closest('#action-panel');
        return (panel ? 'panel:' : '') + (a.id || a.tagName.toLowerCase()); }""")


@sqlite_only
def test_the_recover_confirmation_keeps_the_keyboard_focus_from_preview_to_result_and_cancel(page, demo_url, demo):
    """With the keyboard only: Confirm and Cancel left the focus on the page's body (the pressed
    button was replaced), so the next Tab started again at the top. The focus now follows the panel."""
    with running_dashboard(demo_url) as server:
        sign_in(page, server, name="erin")
        page.focus("#recover-all")
        page.keyboard.press("Enter")
        expect(page.locator("#recover-confirm")).to_be_visible()
        _settled(page)
        assert _focused(page).startswith("panel:"), _focused(page)
        page.focus("#recover-confirm button.link")  # Cancel
        page.keyboard.press("Enter")
        expect(page.locator("#recover-confirm")).to_have_count(0)
        assert _focused(page) == "recover-all", "after Cancel the focus goes back to the button that asked"
        page.keyboard.press("Enter")
        expect(page.locator("#recover-confirm")).to_be_visible()
        _settled(page)
        page.focus("#confirm-recover")
        page.keyboard.press("Enter")
        expect(page.locator("#recover-result")).to_contain_text("Recovered 3 audits.")
        assert _focused(page).startswith("panel:"), _focused(page)
    assert page.errors == []


@sqlite_only
def test_an_audits_page_whose_own_filter_is_refused_shows_it_once_and_stops_asking(page, demo_url, demo):
    """``/audits?status=bogus`` answered 400, and the page asked for the same refusal every 3 s for as
    long as it stayed open. So did a page whose since/until the database's clock turned backwards
    while it was open. Each now shows the refusal and asks no more, until the filter is changed."""
    from datetime import timedelta

    from dbtools import db_time

    asked: list[str] = []
    page.on("request", lambda request: "/fragments/audits" in request.url and asked.append(request.url))
    with running_dashboard(demo_url) as server:
        page.goto(server.url + "audits?status=bogus")
        expect(page.get_by_role("alert")).to_contain_text("bogus")
        page.wait_for_timeout(7_000)  # two refreshes' worth
        assert asked == [], "a refused filter was asked for again"
        # A window fine when the page opened, turned backwards a few seconds later by the database's clock.
        until = (db_time(demo) - timedelta(hours=1) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
        page.goto(server.url + f"audits?since=1h&until={until}")
        expect(page.locator("#audits-table, p.empty").first).to_be_visible()
        expect(page.get_by_role("alert")).to_contain_text("since is later than until", timeout=LIVE)
        seen = len(asked)
        page.wait_for_timeout(7_000)
        assert len(asked) == seen, "the refused refresh was asked for again"
        expect(page.get_by_role("alert")).to_contain_text("since is later than until")
        # A filter the form fixes is asked for, and refreshed, again.
        page.get_by_label("Until").fill("")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("#audits-table")).to_be_visible()
        page.wait_for_timeout(4_000)
        assert len(asked) > seen
    # The refusals themselves, each logged once (by the browser as a failed load, by htmx as an error response).
    page.errors = [e for e in page.errors if "status of 400" not in e and "Error Code 400" not in e]
    assert page.errors == []


@sqlite_only
def test_signing_in_from_a_filtered_listing_lands_back_on_that_listing(page, demo_url, demo):
    """Sign-in always landed on the overview: an operator looking at the failed audits had to find
    them again. The header's Sign in link now brings them back to the page they were on."""
    with running_dashboard(demo_url) as server:
        page.goto(server.url + "audits?status=failed&sort=target")
        page.get_by_role("link", name="Sign in").click()
        page.fill("input[name=token]", TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(server.url + "audits?status=failed&sort=target")
        expect(page.locator("header .who")).to_contain_text("Signed in as")
        expect(page.get_by_label("failed")).to_be_checked()
    assert page.errors == []


@sqlite_only
def test_the_first_tab_in_a_confirmation_reaches_confirm_before_the_audits_it_lists(page, demo_url, demo):
    """A recovery's preview listed up to 100 audits, each a link, before its Confirm button: a keyboard
    user pressed Tab a hundred times to reach it. Confirm and Cancel now come first, in the recover
    preview and in the reset one; the focus still lands on the panel, as before."""
    from dbtools import make_running

    make_running(demo, 150)
    with running_dashboard(demo_url) as server:
        sign_in(page, server, name="fay")
        page.focus("#recover-all")
        page.keyboard.press("Enter")
        expect(page.locator("#recover-confirm")).to_be_visible()
        expect(page.locator("#recover-confirm tbody a")).to_have_count(100)
        _settled(page)
        assert _focused(page) == "panel:recover-confirm"
        page.keyboard.press("Tab")
        assert _focused(page) == "panel:confirm-recover"
        page.keyboard.press("Tab")
        expect(page.locator("#recover-confirm button.link")).to_be_focused()  # Cancel
        page.keyboard.press("Enter")
        expect(page.locator("#recover-confirm")).to_have_count(0)
        assert _focused(page) == "recover-all"
        page.focus("#reset-all")
        page.keyboard.press("Enter")
        expect(page.locator("#reset-confirm")).to_be_visible()
        expect(page.locator("#reset-confirm tbody a").first).to_be_visible()
        _settled(page)
        assert _focused(page) == "panel:reset-confirm"
        page.keyboard.press("Tab")
        assert _focused(page) == "panel:confirm-reset"
        page.keyboard.press("Enter")
        expect(page.locator("#reset-result")).to_contain_text("Reset 2 audits to pending.")
        assert _focused(page).startswith("panel:")
    assert page.errors == []
