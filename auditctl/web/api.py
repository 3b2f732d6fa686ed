"""The JSON API under ``/api/``: the records of ``auditctl.records``, exactly what ``--format json`` prints.

======================  ===================================================================
``GET /api/health``     ``{"database": "ok", "where": ...}``, or 503 ``{"database": "unavailable",
                        "error": ..., "where": ...}``
``GET /api/overview``   the fleet at a glance (``records.overview_record``), ``recoveries_by_hour`` and
                        ``unsafe_thresholds`` (why ``scan`` would refuse the thresholds, or null)
``GET /api/stuck``      ``auditctl scan --format json``: ``worker, reason, kind, target, older_than,
                        since, until, id, sort, reverse, limit`` (400 where ``scan`` refuses the thresholds)
``GET /api/audits``     ``auditctl list --format json``: ``status, worker, kind, target, since, until,
                        sort, reverse, limit`` (default 50, 0 for all)
``GET /api/audits/ID``  ``auditctl show ID --format json`` (404 when there is no such audit)
``GET /api/workers``    ``auditctl workers --format json`` (``all=1`` for ``--all``)
``POST /api/recover``   ``auditctl recover --format json``: the stuck filters above plus ``id``,
                        ``requeue``, ``max_attempts``, ``dry_run``
``POST /api/reset-all`` ``auditctl reset-all --yes --format json``: ``since`` (a duration or ISO time),
                        ``reason``, ``origin``, ``max_resets``, ``include_stuck``, ``dry_run``
======================  ===================================================================

Parameters come in the query string or, for POST, in a JSON object body (lists as arrays or
comma-separated text). A name an endpoint does not take is refused (400), as the command line
refuses an unknown option, and so is a yes/no parameter given no value (``?dry_run``). Reads are open like the pages; a POST needs ``Authorization: Bearer
TOKEN`` (or a signed-in session's cookie with its ``X-CSRF-Token`` header). Errors are
``{"error": "..."}`` with 400 (bad parameter), 401 (no or wrong credential), 403 (actions
disabled, cross-site request), 404, 405 (a method the endpoint does not take), 409 and 500 (as
README's API section says), 413 (a body over 64 KiB), 415 (body not JSON) or 503 (database
unreachable).
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import AuditctlError, AuditNotFound, ConfigError
from ..textsafe import json_safe_text
from ..timestamps import iso
from .params import Params
from .security import CSRF_HEADER, FLOODED_RETRY_AFTER, same


def _default(value):
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def json_response(value, status: int = 200, headers: dict | None = None) -> Response:
    text = json_safe_text(json.dumps(value, default=_default, ensure_ascii=False))
    return Response(text + "\n", status_code=status, media_type="application/json", headers=headers)


def error(status: int, text: str, headers: dict | None = None) -> Response:
    return json_response({"error": text}, status, headers)


def _unauthorised(text: str) -> Response:
    return error(401, text, {"WWW-Authenticate": 'Bearer realm="auditctl"'})


async def _credential(request: Request, d) -> tuple[str | None, Response | None]:
    """(user, None) when the request carries a valid credential, (None, None) when it carries none,
    (None, refusal) when it carries a wrong one (answered late, as at sign-in: ``WrongTokens``)."""
    header = request.headers.get("authorization")
    scheme, _, value = (header or "").partition(" ")
    # Another scheme (a proxy in front with its own Basic authentication forwards it), or any token
    # to a dashboard that has none: no credential of this dashboard's, so reads stay open.
    if header is not None and scheme.lower() == "bearer" and d.token is not None:
        right = await d.wrong_tokens.judge(value.strip(), d.token, what="API request", request=request)
        if right is None:
            return None, error(429, "too many wrong tokens at once: try again in a few seconds", FLOODED_RETRY_AFTER)
        if right:
            return "token", None
        return None, _unauthorised("the Authorization header does not carry this dashboard's token")
    session = d.session(request)
    if session is not None and same(request.headers.get(CSRF_HEADER), session.csrf):
        return session.user, None
    return None, None


async def _actor_or_refusal(request: Request, d) -> tuple[str | None, Response | None]:
    if d.token is None:
        return None, error(403, "actions are disabled: the dashboard was started without a token "
                                "(auditctl serve --token, or AUDITCTL_WEB_TOKEN); nothing was changed")
    user, refusal = await _credential(request, d)
    if refusal is not None:
        return None, refusal
    if user is None:
        return None, _unauthorised("send Authorization: Bearer TOKEN (or sign in and send X-CSRF-Token); nothing was changed")
    return user, None


#: The largest request body the API reads: its parameters are a few filters, never more.
MAX_BODY = 64 * 1024


async def _params(request: Request) -> Params:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _BodyTooLarge()
    if not body.strip():
        return Params(request.query_params)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise _BodyNotJSON()
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a document nested thousands deep
        raise _BodyNotJSON() from None
    if not isinstance(data, dict):  # null included: it is no options object, and must not mean "none given"
        raise _BodyNotJSON()
    return Params(request.query_params, data)


class _BodyNotJSON(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


def _read_route(handler):
    """A GET endpoint: a wrong credential is refused; database trouble is 503; bad parameters 400."""

    async def endpoint(request: Request):
        from .app import Outage

        d = request.app.state.dashboard
        _user, refusal = await _credential(request, d)
        if refusal is not None:
            return refusal
        try:
            return await run_in_threadpool(handler, d, request, Params(request.query_params))
        except ConfigError as problem:
            return error(400, str(problem))
        except AuditNotFound as problem:
            return error(404, str(problem))
        except Outage as problem:
            return error(503, str(problem))

    return endpoint


def _health(d, request, params):
    from .app import Outage

    params.refuse_unknown()
    try:
        d.read(_ping, d.reader)
    except Outage as problem:
        return json_response({"database": "unavailable", "error": str(problem), "where": d.where}, 503)
    return json_response({"database": "ok", "where": d.where})


def _ping(engine):
    """Healthy means the schema can be read, not only that a connection opens (a SQLite file that
    was replaced by garbage or emptied still opens)."""
    from sqlalchemy import select

    from ..sqlfunctions import fetch_now
    from ..transactions import read_connection
    from ..schema import audits

    with read_connection(engine) as connection:
        connection.execute(select(audits.c.id).limit(1)).all()
        return fetch_now(connection)


def _overview(d, request, params):
    from ..overview import fleet_overview
    from ..records import overview_record

    sample = params.integer("sample", 50, high=10_000)
    params.refuse_unknown()
    overview = d.read(fleet_overview, d.reader, d.policy, with_status_counts=True, sample=sample)
    record = overview_record(overview)
    d.remember_overview(record, d.chart())
    record["recoveries_by_hour"] = d.last_overview[1]
    # Why scan and recover would refuse the thresholds these verdicts come from (null: they would not).
    record["unsafe_thresholds"] = d.unsafe_thresholds()
    return json_response(record)


def _stuck(d, request, params):
    from .params import stuck_listing

    filters, sort, descending, limit = stuck_listing(params)
    params.refuse_unknown()
    return json_response(d.stuck(filters, sort=sort, descending=descending, limit=limit or None))


def _audits(d, request, params):
    from .params import audit_listing

    filters, sort, descending, limit = audit_listing(params)
    params.refuse_unknown()
    return json_response(d.audits(filters, sort, descending, limit or None))


def _audit(d, request, params):
    params.refuse_unknown()
    return json_response(d.audit(request.path_params["audit_id"]))


def _workers(d, request, params):
    show_all = params.flag("all")
    params.refuse_unknown()
    return json_response(d.workers(show_all=show_all))


async def _action(request: Request, work) -> Response:
    """One action: the caller authorised, its parameters read, ``work(d, user, params)`` awaited,
    and each kind of failure answered with its own status (see ``_action_error``)."""
    d = request.app.state.dashboard
    user, refusal = await _actor_or_refusal(request, d)
    if refusal is not None:
        return refusal
    try:
        return await work(d, user, await _params(request))
    except Exception as problem:  # noqa: BLE001 - each kind is mapped to its status there
        return _action_error(problem, d)


def _stopped(records: list, skipped: list, message: str, what: str, key: str) -> Response:
    """503 after an action stopped partway: what its committed batches did, and the audits that need an operator."""
    from ..recovery import stopped_partway

    error = f"stopped partway by an error: {message}; {stopped_partway(what, 'listed')}: try again"
    if skipped:
        error += f"; {_need_operator(skipped, what)}"
    return json_response({"error": error, key: records}, 503)


def _need_operator(skipped: list, what: str) -> str:
    listing = "; ".join(f"{s.id} ({s.error})" for s in skipped[:10])
    from ..recovery import needing_an_operator

    return f"{needing_an_operator(len(skipped), what)}: {listing}"


def _done(records: list, skipped: list, what: str, key: str) -> Response:
    """The records of what an action changed; 500 with the audits that need an operator, if any."""
    if skipped:
        return json_response({"error": _need_operator(skipped, what), key: records}, 500)
    return json_response(records)


async def recover(request: Request):
    from ..records import recovery_record
    from ..recovery import until_stopped
    from .params import recover_request

    async def work(d, user, params):
        filters, requeue, max_attempts, dry_run = recover_request(params, d.max_attempts)
        params.refuse_unknown()
        done, stopped = await run_in_threadpool(until_stopped, lambda: d.recover(
            user, filters, requeue=requeue, max_attempts=max_attempts, dry_run=dry_run))
        if stopped is not None:
            return _stopped([recovery_record(r, dry_run) for r in done], done.skipped, d.safe_message(stopped), "recovered",
                            "recovered")
        return _done([recovery_record(r, dry_run) for r in done], done.skipped, "recovered", "recovered")

    return await _action(request, work)


async def reset_all(request: Request):
    from ..records import reset_record
    from ..recovery import until_stopped
    from .params import reset_request

    async def work(d, user, params):
        filters, include_stuck = reset_request(params, d.max_resets)
        dry_run = params.flag("dry_run")
        params.refuse_unknown()
        plan, listing = await run_in_threadpool(d.plan_reset, filters, include_stuck)
        if dry_run:
            return json_response(listing)
        done, stopped = await run_in_threadpool(until_stopped, lambda: d.reset(user, plan))
        if stopped is not None:
            return _stopped([reset_record(r, False) for r in done], done.skipped, d.safe_message(stopped), "reset", "reset")
        return _done([reset_record(r, False) for r in done], done.skipped, "reset", "reset")

    return await _action(request, work)


def _action_error(problem: Exception, d) -> Response:
    from .app import Outage, request_at_fault

    if isinstance(problem, _BodyNotJSON):
        return error(415, "the request body must be a JSON object (Content-Type: application/json)")
    if isinstance(problem, _BodyTooLarge):
        return error(413, f"the request body is larger than {MAX_BODY // 1024} KiB: its parameters are a few filters")
    if request_at_fault(problem):
        return error(400, str(problem))
    from ..recovery import ConcurrentChange, committed_before

    if isinstance(problem, ConcurrentChange):
        return error(409, f"{problem}: try again")
    # As the dashboard's panels say it: a change that failed before any batch committed (or that the
    # database refused as a whole) changed nothing, and a caller deciding whether to retry needs that.
    unchanged = "; nothing was changed" if isinstance(problem, (Outage, AuditctlError)) and committed_before(problem) is None else ""
    if isinstance(problem, Outage):
        return error(503, _said_once(str(problem).rstrip('.'), unchanged))
    if isinstance(problem, (AuditctlError, SQLAlchemyError, OSError)):
        return error(503, _said_once(d.safe_message(problem).rstrip('.'), unchanged))
    raise problem


def _said_once(message: str, unchanged: str) -> str:
    """The error and that nothing was changed, unless the error says so itself (a schema the library
    refuses to change: "...upgrade auditctl; nothing was changed")."""
    return message if message.lower().endswith("nothing was changed") else f"{message}{unchanged}"


def routes() -> list[Route]:
    return [
        Route("/api/health", _read_route(_health)),
        Route("/api/overview", _read_route(_overview)),
        Route("/api/stuck", _read_route(_stuck)),
        Route("/api/audits", _read_route(_audits)),
        Route("/api/audits/{audit_id:audit_id}", _read_route(_audit)),
        Route("/api/workers", _read_route(_workers)),
        Route("/api/recover", recover, methods=["POST"]),
        Route("/api/reset-all", reset_all, methods=["POST"]),
    ]
