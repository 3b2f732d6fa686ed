"""Discord: a webhook payload with embeds, one per kind of news, coloured by severity.

Mentions are switched off (``allowed_mentions``), so a target named ``@everyone`` pings
nobody; markdown in database text (the ``content`` line too) is escaped, mention markup
(``<@123>``, ``<#123>``, ``<t:...>``) included, and control characters are shown. Discord's
limits are kept: at most 10 embeds, 25 fields each (``MAX_LISTED`` audits are listed),
256 characters per title and field name, 1,024 per field value, 6,000 in all. Discord
refuses a message over any limit (HTTP 400), and a refused message holds back every later
alert to that destination, so the limits are kept whatever the database holds; audits dropped to
fit are counted in the "and N more" line, which is never cut.
"""

from __future__ import annotations

import re

from ..textsafe import printable
from ..timestamps import iso
from .digest import MAX_LISTED, MORE_AUDITS, Digest

RED, ORANGE, DARK_RED, BLUE, GREEN = 0xD62828, 0xF77F00, 0x9D0208, 0x3A86FF, 0x2A9D8F
TOTAL_LIMIT = 5800
#: The shortest a description is cut to when the message is still too long without any field.
DESCRIPTION_FLOOR = 300
# ``<`` opens Discord's mention and timestamp markup (``<@123>``, ``<@&123>``, ``<#123>``, ``<t:0:R>``):
# Discord honours a backslash before it, as before the other markdown characters, and shows the rest as text.
_MARKDOWN = re.compile(r"([\\*_~`|<>#\[\]])")


def escape(value) -> str:
    """Database text shown as text by Discord: control characters shown, markdown and mention markup escaped."""
    return _MARKDOWN.sub(r"\\\1", printable(value))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _audit_field(line) -> dict:
    worker = f" · worker {escape(line.worker_id)}" if line.worker_id else ""
    value = f"**{escape(', '.join(line.reasons) or '-')}** → {escape(line.status)}{worker}"
    if line.explanation:
        value += f"\n{escape('; '.join(line.explanation))}"
    if line.evidence:
        value += f"\nMeasured: {escape(line.evidence)}"
    return {"name": _cut(f"#{line.id} {escape(line.target)}", 256), "value": _cut(value, 1024), "inline": False}


def _audits_embed(title: str, colour: int, lines: list, digest: Digest) -> dict:
    head = f"Reasons: {escape(digest.reason_counts())}"
    if digest.actors:
        head += f"\nRecovered by {escape(', '.join(digest.actors))}"
    embed = {"title": _cut(title, 256), "color": colour, "fields": [_audit_field(line) for line in lines[:MAX_LISTED]],
             _HEAD: head, _AUDITS: len(lines)}
    _describe(embed, 4000)
    return embed


#: Private keys of an audits embed (removed before sending): its description without the "and N more"
#: line, and how many audits it stands for, so the line can be rewritten when ``_fit`` drops fields.
_HEAD, _AUDITS = "_head", "_audits"
#: Private key of a gone-workers or resets embed (removed before sending): its "and N more" line.
_LAST = "_last"


def _describe(embed: dict, limit: int) -> None:
    """An audits embed's description in at most ``limit`` characters: the reasons and recoverers, cut
    first, then how many audits are not listed as fields (those ``_fit`` dropped included)."""
    more = embed[_AUDITS] - len(embed["fields"])
    embed["description"] = _with_last_line(embed[_HEAD], f"and {more} more ({MORE_AUDITS})" if more > 0 else None, limit)


def _gone_title(worker_id) -> str:
    """``Worker NAME gone``, the name cut so the title keeps Discord's 256 characters (a worker id may
    hold 200, and each control character is shown as four)."""
    room = 256 - len("Worker  gone")
    return f"Worker {_cut(escape(worker_id), room)} gone"


def _size(embed: dict) -> int:
    return (len(embed.get("title", "")) + len(embed.get("description", "")) + len(embed.get("footer", {}).get("text", ""))
            + sum(len(f["name"]) + len(f["value"]) for f in embed.get("fields", [])))


def _with_last_line(text: str, last: str | None, limit: int) -> str:
    """``text`` cut to fit ``limit`` with the ``last`` line (an "and N more" count) kept whole."""
    if last is None:
        return _cut(text, limit)
    return f"{_cut(text, max(1, limit - len(last) - 1))}\n{last}"


def _described(text: str, last: str | None) -> dict:
    """A description of at most 4,000 characters ending with ``last`` (kept whole when ``_fit`` cuts)."""
    return {"description": _with_last_line(text, last, 4000), **({_LAST: last} if last else {})}


def message(digest: Digest, idempotency_key: str) -> dict:
    embeds = []
    if digest.recovered:
        embeds.append(_audits_embed(f"{len(digest.recovered)} stuck audit{'s' if len(digest.recovered) != 1 else ''} recovered",
                                    RED, digest.recovered, digest))
    if digest.requeued:
        embeds.append(_audits_embed(f"{len(digest.requeued)} stuck audit{'s' if len(digest.requeued) != 1 else ''} requeued",
                                    ORANGE, digest.requeued, digest))
    if digest.gone:
        embeds.append({"title": "Workers gone" if len(digest.gone) > 1 else _gone_title(digest.gone[0].worker_id),
                       "color": DARK_RED,
                       **_described("\n".join(f"**{escape(g.worker_id)}**: {escape(g.proof)} "
                                               f"({g.audits} audit{'s' if g.audits != 1 else ''} recovered)"
                                               for g in digest.gone[:MAX_LISTED]), digest.gone_not_listed())})
    if digest.resets:
        lines = []
        for reset in digest.resets[:MAX_LISTED]:
            origins = ", ".join(f"{count} {origin}" for origin, count in sorted(reset.by_origin.items()) if count)
            host = f" on {escape(reset.host)}" if reset.host else ""
            lines.append(f"**{escape(reset.actor)}**{host} reset {reset.count} audit{'s' if reset.count != 1 else ''} "
                         f"to pending" + (f" ({escape(origins)})" if origins else ""))
        embeds.append({"title": f"{digest.reset_total} audit{'s' if digest.reset_total != 1 else ''} reset", "color": BLUE,
                       **_described("\n".join(lines), digest.resets_not_listed())})
    if digest.healthy is not None:
        embeds.append({"title": "Fleet healthy again", "color": GREEN, "description": "Nothing is stuck."})
    if not embeds:
        embeds.append({"title": _cut(escape(digest.title), 256), "color": BLUE,
                       "description": f"{digest.unreadable} event(s) could not be read; see `auditctl notify --status`"})
    ids = [e.id for e in digest.events]
    span = f"event #{ids[0]}" if len(ids) == 1 else f"events #{ids[0]}-#{ids[-1]} ({len(ids)})"
    embeds = embeds[:10]
    embeds[-1]["footer"] = {"text": f"auditctl · {span} · idempotency key {idempotency_key}"}
    if digest.last_at is not None:
        embeds[-1]["timestamp"] = iso(digest.last_at)
    _fit(embeds)
    # The content is the notification's text: Discord reads markdown, links and mentions there as in embeds.
    return {"username": "auditctl", "content": _cut(escape(digest.title), 2000), "embeds": embeds,
            "allowed_mentions": {"parse": []}}


def _fit(embeds: list[dict]) -> None:
    """Keep the embeds under Discord's total: drop listed audits from the end, the fullest embed
    first; then, if descriptions alone are too long (many long worker ids), cut descriptions, the
    last embed first, to no less than ``DESCRIPTION_FLOOR``. Titles and the footer are kept, so the
    message still says what happened and which events it carries. There are at most five embeds
    (256-character titles), so with their descriptions at the floor the total is far under the limit."""
    while sum(_size(e) for e in embeds) > TOTAL_LIMIT and any(e.get("fields") for e in embeds):
        fullest = max((e for e in embeds if e.get("fields")), key=lambda e: len(e["fields"]))
        fullest["fields"].pop()
        _describe(fullest, 4000)
    for embed in reversed(embeds):
        excess = sum(_size(e) for e in embeds) - TOTAL_LIMIT
        if excess <= 0:
            break
        description = embed.get("description", "")
        if len(description) > DESCRIPTION_FLOOR:
            limit = max(DESCRIPTION_FLOOR, len(description) - excess)
            if _HEAD in embed:
                _describe(embed, limit)  # the "and N more" line is kept whole
            elif _LAST in embed:
                last = embed[_LAST]
                embed["description"] = _with_last_line(description[:-len(last) - 1], last, limit)
            else:
                embed["description"] = _cut(description, limit)
    for embed in embeds:
        embed.pop(_HEAD, None)
        embed.pop(_AUDITS, None)
        embed.pop(_LAST, None)
