"""HTML for every page and fragment, from the library's records (the same dicts the JSON API returns).

Every value that came from the database goes through ``e()``: control and bidi characters
made visible (``textsafe.printable``), then HTML-escaped, quotes included. Nothing else
builds markup from data, so a target of ``<script>`` is text on every page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from string import Template
from urllib.parse import urlencode

from ..records import instance_note, instance_state
from ..recovery import needing_an_operator
from ..statuses import STATUSES
from ..textsafe import MAX_CELL, clipped, printable
from ..thresholds import RULE_REASONS, format_duration

TEMPLATES = Path(__file__).parent / "templates"
_LAYOUT: Template | None = None

#: htmx settings: no eval, no script tags from responses, requests to this server only, and
#: error responses (403 refused, 503 database lost) shown in the page rather than dropped.
HTMX_CONFIG = {
    "allowEval": False,
    "allowScriptTags": False,
    "includeIndicatorStyles": False,
    "selfRequestsOnly": True,
    "historyCacheSize": 0,
    "responseHandling": [
        {"code": "204", "swap": False},
        {"code": "[23]..", "swap": True},
        {"code": "[45]..", "swap": True, "error": True},
    ],
}

NAV = (("/", "Overview"), ("/stuck", "Stuck"), ("/audits", "Audits"), ("/workers", "Workers"))


def e(value) -> str:
    """Text from anywhere, safe inside HTML text and attribute values."""
    if value is None:
        return ""
    return escape(printable(value), quote=True)


def cell(value) -> str:
    """Text from the database in a cell or field: safe, and clipped (``textsafe.clipped``), since
    every page's fragment is sent again at each refresh. The API's records keep it whole."""
    if value is None:
        return ""
    return escape(clipped(printable(value)), quote=True)


def dash(value) -> str:
    """A table cell's text (clipped), or "-" when there is none."""
    return "-" if value in (None, "", [], {}) else cell(value)


def dur(seconds) -> str:
    return "-" if seconds is None else e(format_duration(max(0.0, float(seconds))))


def ago(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < -60:
        return "in the future"
    return f"{dur(seconds)} ago"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def clock(iso_text: str | None) -> str:
    """``2026-11-30T00:32:12.813000Z`` -> ``00:32:12 UTC``."""
    if not iso_text or "T" not in iso_text:
        return "-"
    return e(iso_text.split("T", 1)[1][:8]) + " UTC"


@dataclass
class Viewer:
    """Who is looking, and what the page may offer them."""

    path: str
    user: str | None  # signed in as
    csrf: str | None
    token_configured: bool
    where: str  # the database, password masked
    version: str
    #: The page being looked at, path and query (a fragment's is its page's): where sign-in returns.
    here: str = "/"

    @property
    def can_act(self) -> bool:
        return self.token_configured and self.user is not None

    @property
    def login_href(self) -> str:
        """``/login``, carrying the page to come back to after signing in."""
        return "/login" if self.here == "/" else "/login?" + urlencode({"next": self.here})

    def why_not(self) -> str:
        if not self.token_configured:
            return ("Actions are disabled: this dashboard was started without a token "
                    "(auditctl serve --token, or AUDITCTL_WEB_TOKEN).")
        return f'Actions need the token: <a href="{e(self.login_href)}">sign in</a>.'

    def csrf_input(self) -> str:
        return f'<input type="hidden" name="csrf_token" value="{e(self.csrf)}">' if self.csrf else ""


# --- the layout -------------------------------------------------------------------------


def page(viewer: Viewer, title: str, body: str) -> str:
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = Template((TEMPLATES / "layout.html").read_text(encoding="utf-8"))
    current = ' aria-current="page"'
    nav = "".join(f'<a href="{href}"{current if _current(viewer.path, href) else ""}>{label}</a>' for href, label in NAV)
    if viewer.user is not None:
        who = (f'<span>Signed in as <strong>{e(viewer.user)}</strong></span>'
               f'<form method="post" action="/logout" class="inline">{viewer.csrf_input()}'
               f'<button type="submit" class="link">Sign out</button></form>')
    elif viewer.token_configured:
        who = f'<a href="{e(viewer.login_href)}">Sign in</a>'
    else:
        who = '<span class="muted">Read-only</span>'
    headers = {"X-CSRF-Token": viewer.csrf} if viewer.csrf else {}
    return _LAYOUT.substitute(
        title=e(title), nav=nav, who=who, body=body, version=e(viewer.version), where=e(viewer.where),
        htmx_config=e(json.dumps(HTMX_CONFIG)), hx_headers=e(json.dumps(headers)),
    )


def _current(path: str, href: str) -> bool:
    return path == href if href == "/" else path == href or path.startswith(href + "/")


def live(url: str, content: str, every: str = "1s") -> str:
    """A region that replaces itself from ``url`` every ``every`` (and at once after an action)."""
    # Morphed, not replaced: the rows, links and buttons that did not change stay the same elements,
    # so a click, the keyboard focus or a selection survives the refresh every second.
    return (f'<div id="live" hx-get="{e(url)}" hx-trigger="every {every}, auditctl:refresh from:body" '
            f'hx-swap="morph:innerHTML" hx-sync="this:drop">{content}</div>')


def still(content: str) -> str:
    """The region ``live`` makes, without the refresh: for a page whose own request was refused (a
    bad filter, an audit that is no longer there). Asking again would be refused again; the page
    asks anew once the request is changed (the filter form loads a new page)."""
    return f'<div id="live">{content}</div>'


def message(kind: str, text_html: str) -> str:
    """A result or error box; ``kind`` is ok, error or info. ``text_html`` is already safe HTML."""
    role = ' role="alert"' if kind == "error" else ' role="status"'
    return f'<div class="msg {kind}"{role}>{text_html}</div>'


def _sentence(text: str) -> str:
    """``text`` as a sentence after another: its first letter a capital."""
    return text[:1].upper() + text[1:]


def health_banner(error: str | None, lost_for: float | None, back_for: float | None) -> str:
    """The database banner: an alert while it is unreachable, a short note once it is back."""
    if error is not None:
        since = f" for {dur(lost_for)}" if lost_for is not None and lost_for >= 1 else ""
        return (f'<div class="banner" role="alert" id="db-banner"><strong>Database unreachable{since}.</strong> '
                f'{e(_sentence(error.rstrip(".")))}. The dashboard keeps trying and updates by itself when it is back.</div>')
    if back_for is not None and back_for < 10:
        return '<div class="banner back" role="status" id="db-back">Database back: the figures below are live again.</div>'
    return ""


# --- pieces -----------------------------------------------------------------------------


def reason_badges(reasons) -> str:
    """Reason codes as badges. Another tool may have stored anything as reasons: each is clipped, and
    so is the list (``cell``'s bound, as for every cell)."""
    badges, room = [], MAX_CELL
    for reason in reasons or []:
        if room <= 0:
            badges.append(f'<span class="badge">+{len(reasons) - len(badges)} more</span>')
            break
        text = clipped(printable(reason))
        room -= len(text)
        badges.append(f'<span class="badge r-{e(text)}">{e(text)}</span>')
    return " ".join(badges) or "-"


def status_badge(status) -> str:
    return f'<span class="status s-{e(status)}">{e(status)}</span>'


def progress_text(record: dict) -> str:
    step, percentage = record.get("step"), record.get("percentage")
    parts = []
    if percentage is not None:
        parts.append(f"{float(percentage):.0f}%")
    if step:
        parts.append(str(step))
    return cell(" ".join(parts)) if parts else "-"


def lines(values) -> str:
    return "<br>".join(cell(v) for v in values or []) or "-"


def recover_button(viewer: Viewer, audit_id: int, label: str = "Recover…") -> str:
    if not viewer.can_act:
        return ""
    # Named for a screen reader by the audit it recovers: a table has one per row.
    named = f' aria-label="Recover audit {int(audit_id)}…"'
    return (f'<form method="post" action="/actions/recover" hx-post="/actions/recover" hx-target="#action-panel" '
            f'class="inline">{viewer.csrf_input()}<input type="hidden" name="id" value="{int(audit_id)}">'
            f'<button type="submit" class="small"{named}>{e(label)}</button></form>')


#: The most stuck audits a page lists. The overview and the stuck list refresh every second: in a
#: fleet-wide incident, thousands of rows each second would hold the server and the browser. The
#: counts stay whole, and Recover all stuck takes every one.
STUCK_ROWS_SHOWN = 500


def stuck_table(viewer: Viewer, verdicts: list[dict]) -> str:
    if not verdicts:
        return '<p class="empty" id="no-stuck">No stuck audits.</p>'
    act = viewer.can_act
    rows = []
    for v in verdicts[:STUCK_ROWS_SHOWN]:
        why = lines(v.get("explanation"))
        if v.get("problems"):
            why += f'<div class="problems">problems: {e(", ".join(v["problems"]))}</div>'
        rows.append(
            f'<tr id="stuck-{int(v["id"])}" data-audit-id="{int(v["id"])}">'
            f'<td class="num"><a href="/audits/{int(v["id"])}">{int(v["id"])}</a></td>'
            f'<td class="target">{cell(v.get("target"))}</td>'
            f'<td class="reasons">{reason_badges(v.get("reasons"))}</td>'
            f'<td>{dash(v.get("worker_id"))}</td>'
            f'<td>{progress_text(v)}</td>'
            f'<td class="num">{dur(v.get("silence_seconds"))}</td>'
            f'<td class="num">{dur(v.get("age_seconds"))}</td>'
            f'<td class="why">{why}</td>'
            + (f'<td>{recover_button(viewer, v["id"])}</td>' if act else "")
            + "</tr>"
        )
    head = ("<tr><th>ID</th><th>Target</th><th>Reasons</th><th>Worker</th><th>Step</th><th>Silent</th>"
            "<th>Age</th><th>Why</th>" + ("<th></th>" if act else "") + "</tr>")
    hidden = len(verdicts) - len(rows)
    more = (f'<p class="muted" id="stuck-more">and {plural(hidden, "more stuck audit")}, not listed here (the page '
            f'lists the first {STUCK_ROWS_SHOWN}): Recover all stuck takes them all; <code>GET /api/stuck</code> '
            f'or <code>auditctl scan</code> lists them.</p>') if hidden > 0 else ""
    return f'<table class="grid" id="stuck-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>{more}'


def audits_table(records: list[dict], *, table_id: str = "audits-table", with_status: bool = True) -> str:
    if not records:
        return '<p class="empty">No audits match.</p>'
    rows = []
    for a in records:
        rows.append(
            f'<tr id="audit-{int(a["id"])}" data-audit-id="{int(a["id"])}">'
            f'<td class="num"><a href="/audits/{int(a["id"])}">{int(a["id"])}</a></td>'
            f'<td class="target">{cell(a.get("target"))}</td>'
            + (f'<td>{status_badge(a.get("status"))}</td>' if with_status else "")
            + f'<td>{dash(a.get("worker_id"))}</td><td>{progress_text(a)}</td>'
            f'<td class="num">{ago(a.get("heartbeat_age_seconds"))}</td>'
            f'<td class="num">{int(a.get("attempts") or 0)}</td>'
            f'<td class="num">{ago(a.get("created_age_seconds"))}</td>'
            f'<td class="why">{dash(a.get("error"))}'
            + (f'<div class="problems">problems: {e(", ".join(a["problems"]))}</div>' if a.get("problems") else "")
            + "</td></tr>"
        )
    head = ("<tr><th>ID</th><th>Target</th>" + ("<th>Status</th>" if with_status else "")
            + "<th>Worker</th><th>Step</th><th>Heard</th><th>Tries</th><th>Created</th><th>Error</th></tr>")
    return f'<table class="grid" id="{e(table_id)}"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def workers_table(records: list[dict]) -> str:
    if not records:
        return '<p class="empty">No workers have registered.</p>'
    rows = []
    for w in records:
        state, note = instance_state(w), instance_note(w) or ""
        rows.append(
            f'<tr><td>{cell(w.get("worker_id"))}</td><td class="mono">{e((w.get("instance_id") or "?")[:8])}</td>'
            f'<td>{dash(w.get("host"))}</td><td class="num">{dash(w.get("pid"))}</td>'
            f'<td class="num">{ago(w.get("heartbeat_age_seconds"))}</td>'
            f'<td><span class="state w-{state}">{state}</span></td>'
            f'<td class="num">{int(w.get("running_audits") or 0)}</td><td class="why">{dash(note)}</td></tr>'
        )
    head = ("<tr><th>Worker</th><th>Instance</th><th>Host</th><th>PID</th><th>Heard</th><th>State</th>"
            "<th>Audits</th><th>Note</th></tr>")
    return f'<table class="grid" id="workers-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def chart(hours: list[dict] | None) -> str:
    """Stuck audits recovered per hour over the last day, as an SVG bar chart (no script, no inline CSS)."""
    if not hours:
        return '<p class="empty">No history yet.</p>'
    width, height, bar, gap, top, bottom, left = 20, 110, 14, 6, 14, 18, 28
    peak = max(max(h["count"] for h in hours), 1)
    total = sum(h["count"] for h in hours)
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {left + len(hours) * width + 4} {height + top + bottom}" '
             f'width="{left + len(hours) * width + 4}" height="{height + top + bottom}" '
             f'aria-label="Stuck audits recovered per hour, last {len(hours)} hours: {total} in all">']
    parts.append(f'<text x="0" y="{top + 4}" class="axis">{peak}</text>')
    parts.append(f'<text x="0" y="{top + height}" class="axis">0</text>')
    parts.append(f'<line x1="{left - 2}" y1="{top + height}" x2="{left + len(hours) * width}" y2="{top + height}" class="base"/>')
    for index, hour in enumerate(hours):
        x = left + index * width + gap // 2
        h = round(height * hour["count"] / peak)
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(hour["by_reason"].items()))
        label = f"{hour['start'][11:16] if hour.get('start') else '?'} UTC: {plural(hour['count'], 'audit')}"
        label += f" ({reasons})" if reasons else ""
        kind = "bar" if hour["count"] else "bar none"
        # The reasons are the history's text, which another tool may have filled with anything: clipped
        # like a cell, or one hour's label could weigh megabytes in a fragment refreshed every second.
        parts.append(f'<rect class="{kind}" x="{x}" y="{top + height - max(h, 1)}" width="{bar}" height="{max(h, 1)}">'
                     f'<title>{cell(label)}</title></rect>')
        if index % 6 == 0 and hour.get("start"):
            parts.append(f'<text x="{x}" y="{top + height + 14}" class="axis">{e(hour["start"][11:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- pages ------------------------------------------------------------------------------


def overview_fragment(viewer: Viewer, record: dict | None, hours: list[dict] | None, banner: str) -> str:
    if record is None:
        return banner + '<p class="empty">No data yet: the database has not answered since the dashboard started.</p>'
    counts = record.get("by_status") or {}
    stuck = record["stuck"]
    cards = [
        f'<div class="card"><span class="n" id="count-running">{int(record["running"])}</span> running</div>',
        f'<div class="card {"bad" if stuck else "good"}"><span class="n" id="count-stuck">{len(stuck)}</span> stuck</div>',
    ]
    for status in STATUSES:
        if status != "running":
            cards.append(f'<div class="card"><span class="n" id="count-{status}">{int(counts.get(status, 0))}</span> {status}</div>')
    cards.append(f'<div class="card"><span class="n">{int(record["workers_alive"])}</span> workers alive, '
                 f'<span class="n small">{int(record["workers_gone"])}</span> gone</div>')
    by_reason = record.get("stuck_by_reason") or {}
    reasons = "".join(f'<li><span class="badge r-{e(r)}">{e(r)}</span> <span class="n">{int(by_reason.get(r, 0))}</span></li>'
                      for r in RULE_REASONS)
    healthy = record.get("healthy_sample") or []
    more = int(record.get("healthy_more") or 0)
    stale = ' class="stale"' if banner and 'role="alert"' in banner else ""
    return (
        banner
        + f'<div{stale}>'
        + f'<section class="cards" aria-label="Counts">{"".join(cards)}</section>'
        + f'<section><h2>Stuck by reason</h2><ul class="by-reason">{reasons}</ul></section>'
        + f'<section><h2>Stuck audits</h2>{stuck_table(viewer, stuck)}</section>'
        + f'<section><h2>Stuck audits over time</h2><p class="muted">Recovered as stuck, per hour, last 24 hours '
          f'(from the history).</p>{chart(hours)}</section>'
        + f'<section><h2>Running and healthy</h2>{audits_table(healthy, table_id="healthy-table", with_status=False)}'
        + (f'<p class="muted">and {more} more.</p>' if more else "")
        + "</section>"
        + f'<p class="updated">Read at {clock(record.get("at"))} (the database\'s clock).</p>'
        + "</div>"
    )


def actions_bar(viewer: Viewer) -> str:
    disabled = "" if viewer.can_act else " disabled"
    hint = "" if viewer.can_act else f'<p class="hint" id="actions-disabled">{viewer.why_not()}</p>'
    return (
        '<section class="actions" aria-label="Actions">'
        f'<form method="post" action="/actions/reset-all" hx-post="/actions/reset-all" hx-target="#action-panel">'
        f'{viewer.csrf_input()}<button type="submit" class="danger" id="reset-all"{disabled}>Reset All Audits</button> '
        f'<label><input type="checkbox" name="include_stuck" value="1"{disabled}> also recover and reset the stuck '
        f'running audits</label></form>'
        f'<form method="post" action="/actions/recover" hx-post="/actions/recover" hx-target="#action-panel">'
        f'{viewer.csrf_input()}<button type="submit" id="recover-all"{disabled}>Recover all stuck…</button> '
        f'<label><input type="checkbox" name="requeue" value="1"{disabled}> requeue (pending) instead of failing them'
        f'</label></form>'
        f'{hint}</section><div id="action-panel" aria-live="polite"></div>'
    )


def overview_page(viewer: Viewer, fragment: str) -> str:
    return page(viewer, "Overview", '<h1>Overview</h1>' + actions_bar(viewer) + live("/fragments/overview", fragment))


def stuck_fragment(viewer: Viewer, verdicts: list[dict] | None, banner: str) -> str:
    if verdicts is None:
        return banner
    stale = ' class="stale"' if banner and 'role="alert"' in banner else ""
    return banner + f'<div{stale}>{stuck_table(viewer, verdicts)}<p class="muted">{plural(len(verdicts), "stuck audit")}.</p></div>'


def stuck_page(viewer: Viewer, fragment: str) -> str:
    return page(viewer, "Stuck audits", '<h1>Stuck audits</h1><p class="muted">Each with why it is stuck and by which '
                "thresholds; the same as <code>auditctl scan</code>.</p>" + actions_bar(viewer)
                + live("/fragments/stuck", fragment))


def audits_form(query: dict) -> str:
    def value(name):
        return e(query.get(name, [""])[-1] if query.get(name) else "")

    chosen = {s for v in query.get("status", []) for s in v.split(",")}
    statuses = "".join(f'<label><input type="checkbox" name="status" value="{s}"{" checked" if s in chosen else ""}> {s}</label>'
                       for s in STATUSES)
    sort = query.get("sort", ["id"])[-1]
    sorts = "".join(f'<option value="{s}"{" selected" if s == sort else ""}>{s}</option>'
                    for s in ("id", "created", "target", "status", "worker"))
    reverse = " checked" if query.get("reverse", [""])[-1] in ("1", "on", "true") else ""
    return (
        '<form method="get" action="/audits" class="filters">'
        f'<fieldset><legend>Status</legend>{statuses}</fieldset>'
        f'<label>Worker <input name="worker" value="{value("worker")}" placeholder="worker-1,worker-2"></label>'
        f'<label>Kind <input name="kind" value="{value("kind")}"></label>'
        f'<label>Target <input name="target" value="{value("target")}" placeholder="https://*.example.com"></label>'
        f'<label>Since <input name="since" value="{value("since")}" placeholder="2h or 2026-11-29T08:00Z" size="12"></label>'
        f'<label>Until <input name="until" value="{value("until")}" size="12"></label>'
        f'<label>Sort <select name="sort">{sorts}</select></label>'
        f'<label><input type="checkbox" name="reverse" value="1"{reverse}> reverse</label>'
        f'<label>Limit <input name="limit" value="{value("limit") or 50}" size="5" inputmode="numeric"></label>'
        '<button type="submit">Filter</button></form>'
    )


def audits_fragment(records: list[dict] | None, banner: str, error: str | None = None, limit: int | None = None) -> str:
    if error is not None:
        return message("error", e(error))
    if records is None:
        return banner
    more = " (the limit was reached)" if limit and len(records) >= limit else ""
    return banner + audits_table(records) + f'<p class="muted">{plural(len(records), "audit")}{more}.</p>'


def audits_page(viewer: Viewer, query: dict, fragment: str, query_string: str, refused: bool = False) -> str:
    """``refused``: the query itself was refused (``fragment`` says why): shown once, not asked again every 3 s."""
    url = "/fragments/audits" + (f"?{query_string}" if query_string else "")
    return page(viewer, "Audits", '<h1>Audits</h1><p class="muted">The same filters as <code>auditctl list</code>.</p>'
                + audits_form(query) + (still(fragment) if refused else live(url, fragment, every="3s")))


def _document(value) -> str:
    from ..documents import shown

    if value is None:
        return '<p class="empty">none</p>'
    text = printable(shown(value), keep_newlines=True)
    return f'<pre class="doc">{escape(text, quote=True)}</pre>'


_DETAIL_FIELDS = ("target", "status", "kind", "worker_id", "worker_instance", "step", "percentage", "attempts", "resets",
                  "created_at", "started_at", "finished_at", "last_heartbeat", "last_worker_update", "max_age_seconds",
                  "declared_thresholds", "has_lease", "error", "problems")


def audit_fragment(viewer: Viewer, record: dict | None, banner: str) -> str:
    if record is None:
        return banner
    fields = []
    for key in _DETAIL_FIELDS:
        value = record.get(key)
        if key == "status":
            shown = status_badge(value)
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        elif isinstance(value, (dict, list)):
            shown = dash(json.dumps(value, ensure_ascii=False)) if value else "-"
        else:
            shown = dash(value)
        fields.append(f"<dt>{key}</dt><dd>{shown}</dd>")
    history = record.get("history") or []
    if history:
        rows = "".join(
            f'<tr><td>{dash(h.get("at"))}</td><td>{cell(h.get("event"))}</td><td>{dash(h.get("from_status"))}</td>'
            f'<td>{dash(h.get("to_status"))}</td><td>{reason_badges(h.get("reasons"))}</td><td>{cell(h.get("actor"))}</td>'
            f'<td>{dash(h.get("host"))}</td></tr>' for h in history)
        history_html = ('<table class="grid" id="history"><thead><tr><th>At</th><th>Event</th><th>From</th><th>To</th>'
                        f'<th>Reasons</th><th>By</th><th>Host</th></tr></thead><tbody>{rows}</tbody></table>')
    else:
        history_html = '<p class="empty">No history.</p>'
    stale = ' class="stale"' if banner and 'role="alert"' in banner else ""
    return (banner + _audit_actions(viewer, record) + f'<div{stale}><dl class="fields">{"".join(fields)}</dl>'
            f'<h2>Progress document</h2>{_document(record.get("progress"))}'
            f'<h2>recovery_info</h2>{_document(record.get("recovery_info"))}'
            f'<h2>History</h2>{history_html}</div>')


def _audit_actions(viewer: Viewer, record: dict) -> str:
    """A running audit's Recover button (or why there is none). In the refreshed fragment, not the
    page: an audit that starts running, or gets stuck, while its page is open is offered it then."""
    if record.get("status") != "running":
        return ""
    button = (recover_button(viewer, int(record["id"]), "Recover this audit…") if viewer.can_act
              else f'<p class="hint">{viewer.why_not()}</p>')
    return f'<div class="audit-actions">{button}</div>'


def audit_page(viewer: Viewer, audit_id: int, fragment: str) -> str:
    # The panel stays outside the refreshed region, so a preview or a result is not wiped by the refresh.
    return page(viewer, f"Audit {audit_id}", f'<h1>Audit {int(audit_id)}</h1><div id="action-panel" aria-live="polite"></div>'
                + live(f"/fragments/audits/{int(audit_id)}", fragment, every="2s"))


def workers_fragment(records: list[dict] | None, banner: str) -> str:
    if records is None:
        return banner
    return banner + workers_table(records)


def workers_page(viewer: Viewer, fragment: str) -> str:
    return page(viewer, "Workers", '<h1>Workers</h1><p class="muted">Each worker instance: last heartbeat, alive, silent '
                "or provably gone, and the audits it holds.</p>" + live("/fragments/workers", fragment, every="2s"))


def not_found_page(viewer: Viewer, text: str) -> str:
    return page(viewer, "Not found", f"<h1>Not found</h1>{message('error', e(text))}")


def login_page(viewer: Viewer, error: str | None = None, back_to: str = "/") -> str:
    """``back_to``: the page the form returns to once signed in (``security.return_path``)."""
    if not viewer.token_configured:
        body = ("<h1>Sign in</h1>" + message("info", viewer.why_not()))
    elif viewer.user is not None:
        body = f"<h1>Sign in</h1>{message('ok', f'Signed in as <strong>{e(viewer.user)}</strong>.')}"
    else:
        body = (
            "<h1>Sign in</h1>"
            + (message("error", e(error)) if error else "")
            + '<form method="post" action="/login" class="login">'
            '<label>Token <input type="password" name="token" autocomplete="current-password" required autofocus></label>'
            '<label>Your name, for the history (optional) <input name="name" maxlength="64" autocomplete="username"></label>'
            + (f'<input type="hidden" name="next" value="{e(back_to)}">' if back_to != "/" else "") +
            '<button type="submit">Sign in</button></form>'
            '<p class="muted">The token is the one the dashboard was started with (--token or AUDITCTL_WEB_TOKEN).</p>'
        )
    return page(viewer, "Sign in", body)


# --- action panels ----------------------------------------------------------------------


def _reset_rows(records: list[dict]) -> str:
    rows = "".join(
        f'<tr><td class="num"><a href="/audits/{int(r["id"])}">{int(r["id"])}</a></td><td class="target">{cell(r.get("target"))}</td>'
        f'<td>{e(r.get("origin"))}</td><td>{reason_badges(r.get("reasons"))}</td><td class="num">{int(r.get("resets") or 0)}</td>'
        f'<td>{status_badge(r.get("status"))}</td><td class="why">{dash(r.get("error"))}</td></tr>'
        for r in records)
    return ('<table class="grid"><thead><tr><th>ID</th><th>Target</th><th>Origin</th><th>Reasons</th><th>Resets</th>'
            f'<th>To</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>')


def reset_confirmation(viewer: Viewer, plan, listing: list[dict], plan_id: str, include_stuck: bool) -> str:
    """The in-page confirmation step, with the counts ``reset-all`` shows before it asks."""
    total = plan.total
    cancel = ('<button type="button" hx-get="/fragments/empty" hx-target="#action-panel" class="link">Cancel</button>')
    held = ""
    if plan.held_back:
        held = (f'<li id="held-back"><strong>{int(plan.held_back)}</strong> already reset {int(plan.max_resets)} times '
                f'{"stays" if plan.held_back == 1 else "stay"} failed.</li>')
    if plan.stuck_held_back:
        held += (f'<li id="held-back-stuck"><strong>{int(plan.stuck_held_back)}</strong> stuck, already reset '
                 f'{int(plan.max_resets)} times, {"stays" if plan.stuck_held_back == 1 else "stay"} running.</li>')
    if total == 0:
        return (f'<div class="panel" id="reset-confirm"><h2>Nothing to reset</h2><ul class="counts">{held}</ul>'
                f'<p>There are no failed audits to return to pending.</p>{cancel}</div>')
    reasons = ", ".join(f"{n} {cell(r)}" for r, n in sorted(plan.by_reason.items()))
    counts = [f'<li id="count-stuck-origin"><strong>{int(plan.by_origin.get("stuck", 0))}</strong> recovered as stuck'
              + (f" ({reasons})" if reasons else "") + "</li>",
              f'<li id="count-error-origin"><strong>{int(plan.by_origin.get("error", 0))}</strong> failed with their own error</li>']
    if include_stuck:
        counts.append(f'<li id="count-stuck-running"><strong>{len(plan.stuck)}</strong> stuck running audits to recover '
                      f'first</li>')
    shown = listing[:100]
    more = f'<p class="muted">and {len(listing) - len(shown)} more.</p>' if len(listing) > len(shown) else ""
    return (
        f'<div class="panel confirm" id="reset-confirm" role="region" aria-label="Confirm reset">'
        f'<h2>Reset {plural(total, "audit")} to pending?</h2>'
        f'<ul class="counts">{"".join(counts)}{held}</ul>'
        # The buttons before the list: with the keyboard, Confirm is the first Tab, not the 101st.
        f'<form method="post" action="/actions/reset-all/confirm" hx-post="/actions/reset-all/confirm" '
        f'hx-target="#action-panel" class="inline">{viewer.csrf_input()}'
        f'<input type="hidden" name="plan" value="{e(plan_id)}">'
        f'<button type="submit" class="danger" id="confirm-reset">Confirm reset</button></form> {cancel}'
        f'<p class="muted">Nothing changes until you confirm. Audits that change meanwhile are left alone.</p>'
        f'{_reset_rows(shown)}{more}</div>'
    )


def reset_result(records: list[dict], left_alone: int, skipped, stopped: str | None = None) -> str:
    text = f"Reset {plural(len(records), 'audit')} to pending"
    text += f"; {left_alone} changed meanwhile and {'was' if left_alone == 1 else 'were'} left alone." if left_alone > 0 else "."
    body = message("ok", e(text))
    if stopped is not None:
        from ..recovery import stopped_partway

        body += message("error", e(f"Stopped partway by an error: {stopped}; {stopped_partway('reset', 'listed')}: "
                                   "press Reset All Audits again."))
    if skipped:
        body += message("error", e(f"{needing_an_operator(len(skipped), 'reset')}: "
                                   + ", ".join(str(s.id) for s in skipped[:20])))
    return f'<div class="panel" id="reset-result">{body}{_reset_rows(records[:100]) if records else ""}</div>'


def _recovery_rows(records: list[dict]) -> str:
    rows = "".join(
        f'<tr><td class="num"><a href="/audits/{int(r["id"])}">{int(r["id"])}</a></td><td class="target">{cell(r.get("target"))}</td>'
        f'<td>{reason_badges(r.get("reasons"))}</td><td>{dash(r.get("worker_id"))}</td><td>{status_badge(r.get("status"))}</td>'
        f'<td class="why">{lines(r.get("explanation"))}</td></tr>' for r in records)
    return ('<table class="grid"><thead><tr><th>ID</th><th>Target</th><th>Reasons</th><th>Worker</th><th>New status</th>'
            f'<th>Why</th></tr></thead><tbody>{rows}</tbody></table>')


def recover_confirmation(viewer: Viewer, records: list[dict], requeue: bool, policy_text: str, plan_id: str) -> str:
    cancel = '<button type="button" hx-get="/fragments/empty" hx-target="#action-panel" class="link">Cancel</button>'
    if not records:
        return (f'<div class="panel" id="recover-confirm"><h2>Nothing to recover</h2><p>No audit is stuck now.</p>'
                f'<p class="muted">Thresholds: {e(policy_text)}.</p>{cancel}</div>')
    failed = sum(1 for r in records if r.get("status") == "failed")
    outcome = ", ".join(part for part in (f"{len(records) - failed} pending (requeued)" if len(records) - failed else "",
                                          f"{failed} failed" if failed else "") if part)
    more = f'<p class="muted">and {len(records) - 100} more.</p>' if len(records) > 100 else ""
    return (
        f'<div class="panel confirm" id="recover-confirm" role="region" aria-label="Confirm recovery">'
        f'<h2>Recover {plural(len(records), "stuck audit")}? ({e(outcome)})</h2>'
        # The buttons before the list: with the keyboard, Confirm is the first Tab, not the 101st.
        f'<form method="post" action="/actions/recover" hx-post="/actions/recover" hx-target="#action-panel" class="inline">'
        f'{viewer.csrf_input()}<input type="hidden" name="plan" value="{e(plan_id)}">'
        f'<input type="hidden" name="confirm" value="1">'
        f'<button type="submit" class="danger" id="confirm-recover">Confirm recover</button></form> {cancel}'
        f'<p class="muted">Dry run: nothing changed yet. Thresholds: {e(policy_text)}. An audit whose worker finished or '
        f'beat meanwhile is left alone.</p>'
        f'{_recovery_rows(records[:100])}{more}</div>'
    )


def recover_result(records: list[dict], skipped, listed: int | None = None, stopped: str | None = None) -> str:
    """``listed``: how many audits the confirmed preview showed (None: no preview was confirmed).
    ``stopped``: the error that stopped it after some batches committed (``records``: what they did)."""
    if stopped is not None:
        from ..recovery import stopped_partway

        body = message("ok", e(f"Recovered {plural(len(records), 'audit')}."))
        body += message("error", e(f"Stopped partway by an error: {stopped}; {stopped_partway('recovered', 'listed')}: "
                                   "press Recover again to see what is still stuck."))
    elif records:
        text = f"Recovered {plural(len(records), 'audit')}."
        left_alone = 0 if listed is None else listed - len(records) - len(skipped or ())
        if left_alone > 0:
            were = "was" if left_alone == 1 else "were"
            text += f" {left_alone} of the {listed} listed {were} no longer stuck and {were} left alone."
        body = message("ok", e(text))
    else:
        body = message("info", "Nothing was recovered: no audit was still stuck.")
    if skipped:
        body += message("error", e(f"{needing_an_operator(len(skipped), 'recovered')}: "
                                   + "; ".join(f"{s.id} ({s.error})" for s in skipped[:10])))
    return f'<div class="panel" id="recover-result">{body}{_recovery_rows(records[:100]) if records else ""}</div>'


#: What a kept confirmation offers again: (its action, the button's id and words, what else the form sends).
_KEPT = {
    "reset": ("/actions/reset-all/confirm", "confirm-reset", "Confirm reset", ""),
    "recover": ("/actions/recover", "confirm-recover", "Confirm recover", '<input type="hidden" name="confirm" value="1">'),
}


_UNCHANGED = "; nothing was changed"


def confirmation_kept(viewer: Viewer, kind: str, plan_id: str, problem: str, when: str = "once the database is back") -> str:
    """A confirmed reset or recover that the database failed before it changed anything: the error,
    and the same confirmation offered again (it was given back, so it works once more) ``when``."""
    action, button_id, label, extra = _KEPT[kind]
    problem = problem.rstrip(".")
    if problem.lower().endswith(_UNCHANGED):  # the library's refusal says it too: said once, below
        problem = problem[:-len(_UNCHANGED)]
    text = f"{problem}. Nothing was changed, and this confirmation still stands: press {label} again ({when})."
    cancel = '<button type="button" hx-get="/fragments/empty" hx-target="#action-panel" class="link">Cancel</button>'
    return (f'<div class="panel confirm" id="{kind}-confirm" role="region" aria-label="Confirm {"reset" if kind == "reset" else "recovery"}">'
            f'{message("error", e(text))}'
            f'<form method="post" action="{action}" hx-post="{action}" hx-target="#action-panel" class="inline">'
            f'{viewer.csrf_input()}<input type="hidden" name="plan" value="{e(plan_id)}">{extra}'
            f'<button type="submit" class="danger" id="{button_id}">{label}</button></form> {cancel}</div>')


def refusal(status: int, text: str) -> str:
    return f'<div class="panel" id="refused">{message("error", e(text))}</div>'


def query_string(query: dict) -> str:
    return urlencode([(k, v) for k, values in query.items() for v in values])
