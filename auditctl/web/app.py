"""The dashboard application (``create_app``): its state (engines, sessions, the outage memory),
the HTML pages and the actions (recover, reset).

Every read and every action is one call into the library, run in Starlette's thread pool
(the library is synchronous). The dashboard keeps no data of its own beyond the last
overview it read, shown dimmed under the alert while the database is unreachable.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import (AuditctlError, AuditNotFound, ConfigError, ConnectionSettingRefused, RevisionUnclear, SchemaTooNew,
                      WriteRefused)
from ..history import Actor
from ..thresholds import Policy
from ..urls import scrub
from . import views
from .params import Params
from .security import (
    CSRF_FIELD,
    CSRF_HEADER,
    FLOODED_RETRY_AFTER,
    LOOPBACK_NAMES,
    SESSION_COOKIE,
    SESSION_SECONDS,
    GuardMiddleware,
    Session,
    Sessions,
    WrongTokens,
    is_loopback,
    return_path,
    same,
)

log = logging.getLogger("auditctl.web")
STATIC = Path(__file__).parent / "static"
#: The stuck-over-time chart reads the history at most this often (it moves by the hour).
CHART_SECONDS = 15.0
#: How long a check of the thresholds against the running audits' heartbeat intervals is reused.
THRESHOLD_CHECK_SECONDS = 5.0
#: How many healthy running audits the overview lists (the rest are counted).
HEALTHY_SAMPLE = 20


class Outage(Exception):
    """The database could not be read. The message names it with the password masked."""


def open_engine(database_url: str, role: str):
    """The library's engine for a role, opened the way a long-running viewer needs: on SQLite each read
    opens the file afresh (no pool), so a database file that was moved, deleted or unmounted is
    reported as lost instead of being read on through a stale handle (and ``create_engine`` never
    lets it be replaced by an empty one)."""
    from sqlalchemy.pool import NullPool

    from ..db import create_engine, monitor_call_timeout
    from ..dburl import normalize_url

    if normalize_url(database_url).get_backend_name() != "sqlite":
        # A server that stops answering must not hold a page (and the pool behind it) for good: the
        # same deadline as watch's, then the page shows the database as unreachable.
        return create_engine(database_url, role=role, must_exist=True, call_timeout=monitor_call_timeout())
    return create_engine(database_url, role=role, must_exist=True, poolclass=NullPool)


class Health:
    """Whether the last read reached the database, since when, and when it came back."""

    def __init__(self):
        self.error: str | None = None
        self.lost_at: float | None = None
        self.back_at: float | None = None
        self._lock = threading.Lock()

    def failed(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.lost_at = time.monotonic()
                log.warning("database lost: %s", message)
            self.error = message

    def succeeded(self) -> None:
        with self._lock:
            if self.error is not None:
                self.back_at = time.monotonic()
                log.warning("database back after %.1f s", self.back_at - (self.lost_at or self.back_at))
            self.error = None

    def banner(self) -> str:
        now = time.monotonic()
        with self._lock:
            return views.health_banner(self.error, None if self.lost_at is None else now - self.lost_at,
                                       None if self.back_at is None else now - self.back_at)


class Dashboard:
    """What the routes share: engines, policy, token, sessions and the database's health."""

    def __init__(self, database_url: str, *, policy: Policy | None = None, token: str | None = None,
                 allow_unsafe: bool = False, max_attempts: int | None = None, max_resets: int | None = None):
        from ..dburl import display_url
        from ..recovery import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_RESETS

        self.database_url = database_url
        self.reader = open_engine(database_url, "reader")
        self.where = display_url(self.reader)
        self.policy = Policy.coerce(policy) if policy is not None else Policy.of()
        self.token = token or None
        self.wrong_tokens = WrongTokens()
        self.allow_unsafe = allow_unsafe
        # What the buttons and the API use unless a request says otherwise (serve --max-attempts, --max-resets).
        self.max_attempts = DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
        self.max_resets = DEFAULT_MAX_RESETS if max_resets is None else max_resets
        self.sessions = Sessions()
        self.health = Health()
        self._operator = None
        self._lock = threading.Lock()
        self.last_overview: tuple[dict | None, list | None] = (None, None)
        #: Every stuck audit as last read, by the overview or the stuck list: shown dimmed in an outage.
        self.last_stuck: list[dict] | None = None
        self._chart: tuple[float, list | None] = (0.0, None)
        self._threshold_check: tuple[float, str | None] = (float("-inf"), None)

    # --- engines and reads ----------------------------------------------------------

    @property
    def operator(self):
        """The engine for actions, opened on the first action (a read-only dashboard never opens one)."""
        with self._lock:
            if self._operator is None:
                self._operator = open_engine(self.database_url, "operator")
            return self._operator

    def safe_message(self, error: BaseException) -> str:
        """One line about a database error, for a page, a log or a JSON error: the password masked."""
        if isinstance(error, AuditctlError):
            text = str(error)  # the library's own words, already masked
        else:
            first = (str(error).splitlines() or [""])[0]
            text = f"database unavailable at {self.where}: {type(error).__name__}: {first}"
        return scrub(text, self.database_url)

    def read(self, function, *args, **kwargs):
        """One library read; database trouble is recorded in ``health`` and raised as ``Outage``."""
        try:
            value = function(*args, **kwargs)
        except (AuditNotFound, ConfigError) as error:
            if isinstance(error, AuditNotFound) or request_at_fault(error):
                self.health.succeeded()
                raise
            self._lost(error)  # a URL setting libpq refused: the database not read
        except (AuditctlError, SQLAlchemyError, OSError) as error:
            self._lost(error)
        self.health.succeeded()
        return value

    def _lost(self, error: Exception):
        from ..migrate import explained

        message = self.safe_message(explained(error, self.reader))
        self.health.failed(message)
        raise Outage(message) from None

    def close(self) -> None:
        self.reader.dispose()
        if self._operator is not None:
            self._operator.dispose()

    # --- who is asking --------------------------------------------------------------

    def session(self, request: Request) -> Session | None:
        if self.token is None:
            return None
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def viewer(self, request: Request) -> views.Viewer:
        session = self.session(request)
        return views.Viewer(path=request.url.path, user=session.user if session else None,
                            csrf=session.csrf if session else None, token_configured=self.token is not None,
                            where=self.where, version=__version__, here=_page_address(request))

    @staticmethod
    def actor(user: str) -> Actor:
        return Actor(name=f"dashboard {user}")

    # --- what the pages show --------------------------------------------------------

    def overview(self) -> tuple[dict | None, list | None]:
        """The overview record and the chart; the last ones read when the database is unreachable."""
        from ..overview import fleet_overview
        from ..records import overview_record

        try:
            overview = self.read(fleet_overview, self.reader, self.policy, with_status_counts=True, sample=HEALTHY_SAMPLE)
            result = (overview_record(overview), self.chart())
        except Outage:
            return self.last_overview
        self.remember_overview(*result)
        return result

    def remember_overview(self, record: dict, chart: list | None) -> None:
        self.last_overview = (record, chart)
        self.last_stuck = record["stuck"]

    def chart(self) -> list | None:
        from ..overview import recoveries_by_hour
        from ..records import recoveries_by_hour_record

        read_at, hours = self._chart
        if hours is None or time.monotonic() - read_at > CHART_SECONDS:
            hours = [recoveries_by_hour_record(h) for h in self.read(recoveries_by_hour, self.reader)]
            self._chart = (time.monotonic(), hours)
        return hours

    def stuck(self, filters=None, sort: str = "id", descending: bool = False, limit: int | None = None) -> list[dict]:
        """What ``scan`` shows; refused (UnsafeThreshold, a ConfigError) when ``scan`` would refuse."""
        from ..records import unreadable_verdict_record, verdict_record
        from ..rules import Filters, find_stuck, isolate
        from ..thresholds import UnsafeThreshold

        problem = self.unsafe_thresholds()
        if problem is not None and filters is not None and (filters.workers or filters.kinds):
            try:  # narrowed, as scan narrows it: only the audits the filters name are judged
                self.check_thresholds(filters)
                problem = None
            except UnsafeThreshold as error:
                problem = str(error)
        if problem is not None:
            raise UnsafeThreshold(problem)
        verdicts = self.read(find_stuck, self.reader, self.policy, filters=filters or Filters(), sort=sort,
                             descending=descending, limit=limit)
        return [isolate(v, verdict_record, unreadable_verdict_record) for v in verdicts]

    def audits(self, filters, sort: str, descending: bool, limit: int | None) -> list[dict]:
        from ..audits import iter_audits
        from ..records import audit_record

        return self.read(lambda: [audit_record(a) for a in iter_audits(self.reader, filters, sort=sort,
                                                                       descending=descending, limit=limit)])

    def audit(self, audit_id: int) -> dict:
        from ..audits import get_audit
        from ..records import audit_detail_record

        return audit_detail_record(self.read(get_audit, self.reader, audit_id))

    def workers(self, show_all: bool = False) -> list[dict]:
        from ..records import instance_record
        from ..registry import GONE_RETENTION, instances

        found = self.read(instances, self.reader, self.policy.resolve("stale_after")[0],
                          retention=None if show_all else GONE_RETENTION)
        return [instance_record(i) for i in found]

    # --- actions --------------------------------------------------------------------

    def unsafe_thresholds(self) -> str | None:
        """Why ``scan`` and ``recover`` would refuse the dashboard's thresholds for the audits running
        now (None: they would not). Checked at most every ``THRESHOLD_CHECK_SECONDS``: pages refresh
        every second, and the check is a database read (one index seek; on a file not upgraded to
        revision 0004, a walk of every running audit)."""
        from ..thresholds import UnsafeThreshold

        checked_at, problem = self._threshold_check
        if time.monotonic() - checked_at >= THRESHOLD_CHECK_SECONDS:
            try:
                self.check_thresholds()
                problem = None
            except UnsafeThreshold as error:
                problem = str(error)
            self._threshold_check = (time.monotonic(), problem)
        return problem

    def check_thresholds(self, filters=None) -> None:
        """Refuse thresholds that would fail healthy audits, as ``recover`` does (ConfigError): of the
        audits ``filters`` (workers, kinds) name, when given."""
        from ..rules import check_against_running

        if not self.allow_unsafe:
            self.read(check_against_running, self.reader, self.policy, filters)

    def recover(self, user: str, filters, *, requeue: bool, max_attempts: int, dry_run: bool):
        from ..recovery import recover_stuck

        self.check_thresholds(filters)
        return recover_stuck(self.operator if not dry_run else self.reader, self.policy, actor=self.actor(user),
                             requeue=requeue, max_attempts=max_attempts, dry_run=dry_run, filters=filters)

    def plan_reset(self, filters, include_stuck: bool):
        """The plan ``reset-all`` shows before it asks, and the listing of the audits it names."""
        from ..records import planned_stuck_reset_record, reset_record
        from ..recovery import plan_reset_all, reset_failed

        if include_stuck:
            self.check_thresholds()
        plan = self.read(plan_reset_all, self.reader, filters, include_stuck=include_stuck, policy=self.policy)
        planned = self.read(reset_failed, self.reader, actor=self.actor("preview"), filters=filters, dry_run=True)
        listing = [reset_record(r, True) for r in planned] + [planned_stuck_reset_record(v) for v in plan.stuck]
        return plan, listing

    def reset(self, user: str, plan):
        from ..recovery import reset_all

        return reset_all(self.operator, plan, actor=self.actor(user), policy=self.policy)


# --- HTML routes --------------------------------------------------------------------------


#: The largest form body read (the dashboard's forms are a few hundred bytes).
MAX_FORM_BYTES = 64 * 1024


async def read_form(request: Request):
    """An url-encoded form body as a multi-dict, or None for one larger than ``MAX_FORM_BYTES`` or
    in another encoding (the dashboard's forms upload nothing, so no multipart)."""
    from urllib.parse import parse_qsl

    from starlette.datastructures import ImmutableMultiDict

    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    if "multipart/" in request.headers.get("content-type", ""):
        return None
    return ImmutableMultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _page_address(request: Request) -> str:
    """The page a request shows or refreshes, path and query: where signing in from it returns to."""
    path = request.url.path
    if path.startswith("/fragments/"):
        path = path[len("/fragments"):]
        path = "/" if path == "/overview" else path
    elif path == "/login":
        return return_path(request.query_params.get("next"))
    query = request.url.query
    return return_path(f"{path}?{query}" if query else path)


def _dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


def _htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def overview_page(request: Request):
    d = _dashboard(request)
    viewer = d.viewer(request)
    fragment = await run_in_threadpool(_overview_fragment, d, viewer)
    return HTMLResponse(views.overview_page(viewer, fragment))


def _overview_fragment(d: Dashboard, viewer) -> str:
    record, hours = d.overview()
    return views.overview_fragment(viewer, record, hours, d.health.banner() + _threshold_warning(d))


def _threshold_warning(d: Dashboard) -> str:
    """Above the verdicts: the refusal ``scan`` and ``recover`` would give these thresholds, if any."""
    try:
        problem = d.unsafe_thresholds()
    except Outage:
        return ""
    if problem is None:
        return ""
    return views.message("error", views.e(f"These verdicts come from thresholds scan and recover refuse: {problem}."))


async def overview_fragment(request: Request):
    d = _dashboard(request)
    return HTMLResponse(await run_in_threadpool(_overview_fragment, d, d.viewer(request)))


def _stuck_fragment(d: Dashboard, viewer) -> str:
    try:
        verdicts = d.last_stuck = d.stuck()
    except ConfigError as refused:
        return views.stuck_fragment(viewer, None, d.health.banner() + views.message(
            "error", views.e(f"Refused, as scan refuses: {refused}.")))
    except Outage:
        verdicts = d.last_stuck
    return views.stuck_fragment(viewer, verdicts, d.health.banner())


async def stuck_page(request: Request):
    d = _dashboard(request)
    viewer = d.viewer(request)
    return HTMLResponse(views.stuck_page(viewer, await run_in_threadpool(_stuck_fragment, d, viewer)))


async def stuck_fragment(request: Request):
    d = _dashboard(request)
    return HTMLResponse(await run_in_threadpool(_stuck_fragment, d, d.viewer(request)))


def _audits_fragment(d: Dashboard, request: Request) -> tuple[str, int]:
    from .params import PAGE_MAX_ROWS, audit_listing

    try:
        filters, sort, descending, limit = audit_listing(Params(request.query_params, blank_is_unset=True),
                                                         most=PAGE_MAX_ROWS)
    except ConfigError as error:
        return views.audits_fragment(None, "", error=str(error)), 400
    try:
        records = d.audits(filters, sort, descending, limit or None)
    except ConfigError as error:  # a since/until pair the database's clock puts backwards
        return views.audits_fragment(None, "", error=str(error)), 400
    except Outage:
        records = None
    return views.audits_fragment(records, d.health.banner(), limit=limit), 200


async def audits_page(request: Request):
    d = _dashboard(request)
    viewer = d.viewer(request)
    fragment, status = await run_in_threadpool(_audits_fragment, d, request)
    query = {k: request.query_params.getlist(k) for k in request.query_params.keys()}
    return HTMLResponse(views.audits_page(viewer, query, fragment, views.query_string(query), refused=status == 400),
                        status_code=status)


def _refused_region(fragment: str, status: int) -> Response:
    """A refresh whose own request is refused (a filter the database's clock has since turned backwards,
    an audit deleted by another tool): the refreshing region is replaced by one that does not refresh,
    so the page shows the refusal once instead of asking for it again every few seconds."""
    return HTMLResponse(views.still(fragment), status_code=status, headers={"HX-Reswap": "outerHTML"})


async def audits_fragment(request: Request):
    d = _dashboard(request)
    fragment, status = await run_in_threadpool(_audits_fragment, d, request)
    if status == 400:
        return _refused_region(fragment, status)
    return HTMLResponse(fragment, status_code=status)


def _audit_fragment(d: Dashboard, viewer, audit_id: int) -> str:
    try:
        record = d.audit(audit_id)
    except Outage:
        record = None
    return views.audit_fragment(viewer, record, d.health.banner())


async def audit_page(request: Request):
    d = _dashboard(request)
    viewer = d.viewer(request)
    audit_id = request.path_params["audit_id"]
    try:
        fragment = await run_in_threadpool(_audit_fragment, d, viewer, audit_id)
    except AuditNotFound as error:
        return HTMLResponse(views.not_found_page(viewer, str(error)), status_code=404)
    return HTMLResponse(views.audit_page(viewer, audit_id, fragment))


async def audit_fragment(request: Request):
    d = _dashboard(request)
    try:
        fragment = await run_in_threadpool(_audit_fragment, d, d.viewer(request), request.path_params["audit_id"])
    except AuditNotFound as error:
        return _refused_region(views.message("error", views.e(str(error))), 404)
    return HTMLResponse(fragment)


def _workers_fragment(d: Dashboard) -> str:
    try:
        records = d.workers()
    except Outage:
        records = None
    return views.workers_fragment(records, d.health.banner())


async def workers_page(request: Request):
    d = _dashboard(request)
    return HTMLResponse(views.workers_page(d.viewer(request), await run_in_threadpool(_workers_fragment, d)))


async def workers_fragment(request: Request):
    return HTMLResponse(await run_in_threadpool(_workers_fragment, _dashboard(request)))


async def empty_fragment(request: Request):
    return HTMLResponse("")


# --- signing in ----------------------------------------------------------------------------


async def login(request: Request):
    d = _dashboard(request)
    viewer = d.viewer(request)
    if request.method in ("GET", "HEAD"):
        return HTMLResponse(views.login_page(viewer, back_to=viewer.here))
    if d.token is None:
        return HTMLResponse(views.login_page(viewer), status_code=403)
    form = await read_form(request) or {}
    # The page the person asked for before signing in: a path on this dashboard, never another site.
    back_to = return_path(form.get("next"))
    # Stripped as the API's bearer token and serve's --token are: a token pasted with a newline still signs in.
    right = await d.wrong_tokens.judge(str(form.get("token") or "").strip(), d.token, what="sign-in", request=request)
    if right is None:
        return HTMLResponse(views.login_page(viewer, "Too many wrong tokens at once: try again in a few seconds.", back_to),
                            status_code=429, headers=FLOODED_RETRY_AFTER)
    if not right:
        return HTMLResponse(views.login_page(viewer, "That is not the dashboard's token.", back_to), status_code=401)
    # The name goes into every action's history (``dashboard NAME``) and the log: printable text only.
    from ..textsafe import printable

    name = " ".join(printable(str(form.get("name") or "")).split())[:64]
    session = d.sessions.create(name or "token")
    log.info("signed in: %s", name or "token")
    response = RedirectResponse(back_to, status_code=303)
    response.set_cookie(SESSION_COOKIE, session.id, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


async def logout(request: Request):
    d = _dashboard(request)
    session = d.session(request)
    if session is not None:
        form = await read_form(request) or {}
        if not same(request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD) or ""), session.csrf):
            return HTMLResponse(views.refusal(403, "Refused: the form's CSRF token is missing or wrong."), status_code=403)
        d.sessions.drop(session.id)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- actions (HTML) --------------------------------------------------------------------------


async def _acting_session(request: Request, d: Dashboard):
    """(session, form, None) for a person allowed to act, or (None, None, the refusal to send)."""
    form = await read_form(request)
    if d.token is None:
        return None, None, _panel(request, 403, views.refusal(403, "Refused: actions are disabled on this dashboard (it was "
                                                            "started without a token). Nothing was changed."))
    session = d.session(request)
    if session is None:
        return None, None, _panel(request, 401, views.refusal(401, "Refused: sign in with the token first. Nothing was changed."))
    if form is None:
        return None, None, _panel(request, 413, views.refusal(413, f"Refused: the form is not a URL-encoded form of at "
                                                            f"most {MAX_FORM_BYTES // 1024} KiB. Nothing was changed."))
    if not same(request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD) or ""), session.csrf):
        return None, None, _panel(request, 403, views.refusal(403, "Refused: the request's CSRF token is missing or wrong "
                                                            "(reload the page). Nothing was changed."))
    return session, form, None


def _panel(request: Request, status: int, html: str, *, changed: bool = False) -> Response:
    """An action's result: the panel for htmx, a whole page for a browser without JavaScript."""
    if _htmx(request):
        response = HTMLResponse(html, status_code=status)
        if changed:
            response.headers["HX-Trigger"] = "auditctl:refresh"
        return response
    d = _dashboard(request)
    viewer = d.viewer(request)
    return HTMLResponse(views.page(viewer, "Action", f'{html}<p><a href="/">Back to the overview</a></p>'),
                        status_code=status)


def _not_reached(error: Exception) -> bool:
    """The database was not reached: an outage a read met, or a setting of the URL libpq refused on
    the action's own connection, which the reads show as unreachable too."""
    return isinstance(error, (Outage, ConnectionSettingRefused))


def request_at_fault(error: Exception) -> bool:
    """A refusal of what the request asked (400), not of the server's own settings: libpq refusing a
    value of the URL (``ConnectionSettingRefused``, a ConfigError too) is the database not reached (503)."""
    return isinstance(error, ConfigError) and not isinstance(error, ConnectionSettingRefused)


def _action_problem(error: Exception, d: Dashboard) -> tuple[int, str]:
    """An action's error as (status, one line for the page)."""
    if _not_reached(error):
        return 503, f"The database is unreachable: {error if isinstance(error, Outage) else d.safe_message(error)}"
    if request_at_fault(error):
        return 400, f"Refused: {error}"
    from ..recovery import ConcurrentChange

    if isinstance(error, ConcurrentChange):
        return 409, f"{error}: try again."
    return 503, f"Error: {d.safe_message(error)}"


def _action_error(request: Request, error: Exception, d: Dashboard) -> Response:
    status, text = _action_problem(error, d)
    if _not_reached(error):  # a sentence of its own: the error's last words end without a full stop
        text = f"{text.rstrip('.')}. Nothing was changed."
    return _panel(request, status, views.refusal(status, text))


def _confirmation_failed(request: Request, error: Exception, d: Dashboard, session: Session, plan_id: str, entry,
                         confirm) -> Response:
    """A confirmed action that raised. When the error says nothing was committed (the database
    failed before the first batch, or refused the action as a whole) the confirmation is given back,
    usable again under its id: the answer says so and offers the button again. Otherwise (an error
    of unknown extent) it stays used, as before."""
    from ..recovery import committed_before

    nothing_done = isinstance(error, (Outage, AuditctlError)) and committed_before(error) is None
    if not nothing_done:
        return _action_error(request, error, d)
    session.give_back(plan_id, entry)
    status, text = _action_problem(error, d)
    # A role that may not write (or a standby) never went away: pressing again waits for its privileges.
    # A schema this auditctl may not change never went away either: pressing again waits for what its error says.
    if isinstance(error, WriteRefused):
        when = "once the database lets auditctl write"
    elif isinstance(error, SchemaTooNew):
        when = "once auditctl is upgraded"
    elif isinstance(error, RevisionUnclear):
        when = "once the schema's revision record is set right"
    else:
        when = "once the database is back"
    return _panel(request, status, confirm(text, when))


async def reset_preview(request: Request):
    from .params import reset_request

    d = _dashboard(request)
    session, form, refusal = await _acting_session(request, d)
    if refusal is not None:
        return refusal
    try:
        filters, include_stuck = reset_request(Params(form, blank_is_unset=True), d.max_resets)
        plan, listing = await run_in_threadpool(d.plan_reset, filters, include_stuck)
    except (Outage, AuditctlError, SQLAlchemyError, OSError) as error:
        return _action_error(request, error, d)
    plan_id = session.keep_plan(plan)
    return _panel(request, 200, views.reset_confirmation(d.viewer(request), plan, listing, plan_id, include_stuck))


async def reset_confirm(request: Request):
    from ..records import reset_record
    from ..recovery import ResetPlan, until_stopped

    d = _dashboard(request)
    session, form, refusal = await _acting_session(request, d)
    if refusal is not None:
        return refusal
    plan_id = str(form.get("plan") or "")
    entry = session.take_entry(plan_id, ResetPlan)
    if entry is None:
        return _panel(request, 409, views.refusal(409, "This confirmation has expired or was already used: press "
                                                       "Reset All Audits again to see the counts. Nothing was changed."))
    plan = entry[0]
    try:
        done, stopped = await run_in_threadpool(until_stopped, lambda: d.reset(session.user, plan))
    except (Outage, AuditctlError, SQLAlchemyError, OSError) as error:
        return _confirmation_failed(request, error, d, session, plan_id, entry,
                                    lambda text, when: views.confirmation_kept(d.viewer(request), "reset", plan_id, text, when))
    left_alone = plan.left_alone(done, stopped)
    log.info("dashboard %s reset %d audits to pending", session.user, len(done))
    return _panel(request, 200 if stopped is None else 503,
                  views.reset_result([reset_record(r, False) for r in done], left_alone, done.skipped,
                                     None if stopped is None else d.safe_message(stopped)),
                  changed=True)


@dataclass(frozen=True)
class RecoverPlan:
    """A recovery shown for confirmation: the audits it listed (each judged again when confirmed)."""

    ids: tuple[int, ...]
    requeue: bool


async def recover_action(request: Request):
    from ..records import recovery_record
    from ..recovery import until_stopped
    from ..rules import Filters

    d = _dashboard(request)
    session, form, refusal = await _acting_session(request, d)
    if refusal is not None:
        return refusal
    params = Params(form, blank_is_unset=True)
    entry = None
    try:
        ids = params.ids("id")
        requeue = params.flag("requeue")
        confirmed = params.flag("confirm")
        plan_id = params.text("plan")
        listed = None
        if plan_id is not None:  # the confirmation of a preview: the audits it showed, kept here
            entry = session.take_entry(plan_id, RecoverPlan)
            if entry is None:
                return _panel(request, 409, views.refusal(409, "This confirmation has expired or was already used: "
                                                               "press Recover again to see what is stuck. Nothing was changed."))
            ids, requeue, listed = entry[0].ids, entry[0].requeue, len(entry[0].ids)
        filters = Filters(ids=ids)
        done, stopped = await run_in_threadpool(until_stopped, lambda: d.recover(
            session.user, filters, requeue=requeue, max_attempts=d.max_attempts, dry_run=not confirmed))
    except (Outage, AuditctlError, SQLAlchemyError, OSError) as error:
        if entry is not None:
            return _confirmation_failed(request, error, d, session, plan_id, entry,
                                        lambda text, when: views.confirmation_kept(d.viewer(request), "recover", plan_id, text, when))
        return _action_error(request, error, d)
    records = [recovery_record(r, not confirmed) for r in done]
    if not confirmed:
        # The audits shown stay on the server: thousands of ids would not fit in the form.
        plan_id = session.keep_plan(RecoverPlan(tuple(int(r["id"]) for r in records), requeue)) if records else ""
        return _panel(request, 200, views.recover_confirmation(d.viewer(request), records, requeue, d.policy.describe(),
                                                               plan_id))
    log.info("dashboard %s recovered %d audits", session.user, len(done))
    return _panel(request, 200 if stopped is None else 503,
                  views.recover_result(records, done.skipped, None if stopped is not None else listed,
                                       None if stopped is None else d.safe_message(stopped)),
                  changed=True)


# --- the application ----------------------------------------------------------------------


class _AuditIdConvertor(Convertor):
    """``/audits/ID``: at most 19 digits, so a 5,000-digit path is no page (404) instead of a failed
    conversion; an id beyond what the database holds is a missing audit. Another tool may have
    written 0 or a negative id."""

    regex = "-?[0-9]{1,19}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("audit_id", _AuditIdConvertor())


async def _not_found(request: Request, problem) -> Response:
    """No such page (404) or method (405): under ``/api/`` in the API's own shape, ``{"error": ...}``."""
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse

    from .api import error

    status = problem.status_code if isinstance(problem, HTTPException) else 404
    headers = getattr(problem, "headers", None)  # 405 carries Allow
    if request.url.path.startswith("/api/"):
        text = (f"{request.method} is not allowed here" if status == 405
                else "no such endpoint or audit (see GET /api/overview, /api/stuck, /api/audits, /api/workers)")
        return error(status, text, headers)
    return PlainTextResponse("Method Not Allowed" if status == 405 else "Not Found", status_code=status, headers=headers)


def create_app(database_url: str, *, policy: Policy | None = None, token: str | None = None, host: str = "127.0.0.1",
               allow_unsafe: bool = False, max_attempts: int | None = None, max_resets: int | None = None) -> Starlette:
    """The dashboard as an ASGI application. Opening it does not connect; a database that is down
    at start is reported in the pages like any later outage."""
    from . import api

    dashboard = Dashboard(database_url, policy=policy, token=token, allow_unsafe=allow_unsafe, max_attempts=max_attempts,
                          max_resets=max_resets)
    routes = [
        Route("/", overview_page),
        Route("/stuck", stuck_page),
        Route("/audits", audits_page),
        Route("/audits/{audit_id:audit_id}", audit_page),
        Route("/workers", workers_page),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/fragments/overview", overview_fragment),
        Route("/fragments/stuck", stuck_fragment),
        Route("/fragments/audits", audits_fragment),
        Route("/fragments/audits/{audit_id:audit_id}", audit_fragment),
        Route("/fragments/workers", workers_fragment),
        Route("/fragments/empty", empty_fragment),
        Route("/actions/reset-all", reset_preview, methods=["POST"]),
        Route("/actions/reset-all/confirm", reset_confirm, methods=["POST"]),
        Route("/actions/recover", recover_action, methods=["POST"]),
        *api.routes(),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    # On loopback, answer only to loopback names: a DNS-rebinding page cannot reach the dashboard.
    allowed = tuple(sorted(set(LOOPBACK_NAMES) | {host.lower()})) if is_loopback(host.lower()) else None
    app = Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, allowed_hosts=allowed)],
                    exception_handlers={404: _not_found, 405: _not_found})
    app.state.dashboard = dashboard
    return app
