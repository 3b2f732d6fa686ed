"""Slack: an incoming-webhook payload with blocks (and ``text``, the fallback for notifications).

Text from the database (targets, worker ids, explanations) is escaped for Slack's mrkdwn
(``&``, ``<``, ``>``), so a target can never mention ``@channel`` or forge a link, and
control characters are shown, not sent. Slack's limits are kept: a header of at most 150
characters, sections of at most 3,000, 40,000 characters in all (the longest sections are cut
to one length) and at most 50 blocks (at most ``MAX_LISTED`` audits are listed; the rest are
counted).
"""

from __future__ import annotations

from ..textsafe import printable
from .digest import MAX_LISTED, MORE_AUDITS, Digest

EMOJI = {"alert": ":rotating_light:", "warning": ":warning:", "info": ":arrows_counterclockwise:", "ok": ":white_check_mark:"}
SECTION_LIMIT = 2900
#: Slack's 40,000 characters for a whole message (text and blocks), with room to spare.
TOTAL_LIMIT = 39_000


def escape(value) -> str:
    return printable(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _section(text: str) -> dict:
    if len(text) > SECTION_LIMIT:
        text = text[:SECTION_LIMIT - 1] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _audit(line) -> str:
    worker = f" (worker {escape(line.worker_id)})" if line.worker_id else ""
    text = f"*#{line.id}* {escape(line.target)} → *{escape(line.status)}*{worker}\n*Reasons:* {escape(', '.join(line.reasons) or '-')}"
    if line.explanation:
        text += f"\n*Why:* {escape('; '.join(line.explanation))}"
    if line.evidence:
        text += f"\n*Measured:* {escape(line.evidence)}"
    return text


def message(digest: Digest, idempotency_key: str) -> dict:
    title = f"{EMOJI[digest.severity]} {digest.title}"
    blocks: list[dict] = [{"type": "header", "text": {"type": "plain_text", "text": printable(digest.title)[:150],
                                                       "emoji": True}}]
    if digest.recovered or digest.requeued:
        summary = f"*Reasons:* {escape(digest.reason_counts())}"
        if digest.actors:
            summary += f"\n*Recovered by:* {escape(', '.join(digest.actors))}"
        blocks.append(_section(summary))
        listed = (digest.recovered + digest.requeued)[:MAX_LISTED]
        for line in listed:
            blocks.append(_section(_audit(line)))
        more = len(digest.recovered) + len(digest.requeued) - len(listed)
        if more > 0:
            blocks.append(_section(f"_and {more} more ({MORE_AUDITS})_"))
    if digest.gone:
        lines = [f"*Worker {escape(g.worker_id)} gone:* {escape(g.proof)} ({g.audits} audit{'s' if g.audits != 1 else ''} recovered)"
                 for g in digest.gone[:MAX_LISTED]]
        blocks.append(_section("\n".join(lines)))
        if (more_gone := digest.gone_not_listed()) is not None:
            blocks.append(_section(f"_{more_gone}_"))  # its own section: never cut (``_fit``)
    for reset in digest.resets[:MAX_LISTED]:
        origins = ", ".join(f"{count} {origin}" for origin, count in sorted(reset.by_origin.items()) if count)
        host = f" on {escape(reset.host)}" if reset.host else ""
        blocks.append(_section(f"*Reset by {escape(reset.actor)}*{host}: {reset.count} audit{'s' if reset.count != 1 else ''} "
                               f"back to pending" + (f" ({escape(origins)})" if origins else "")))
    if (more_resets := digest.resets_not_listed()) is not None:
        blocks.append(_section(f"_{more_resets}_"))
    if digest.healthy is not None:
        blocks.append(_section(":white_check_mark: *Fleet healthy again:* nothing is stuck."))
    if digest.unreadable:
        blocks.append(_section(f"_{digest.unreadable} event(s) could not be read; see `auditctl notify --status`_"))
    ids = [e.id for e in digest.events]
    span = f"event #{ids[0]}" if len(ids) == 1 else f"events #{ids[0]}–#{ids[-1]} ({len(ids)})"
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"auditctl · {span} · idempotency key {idempotency_key}"}]})
    # The top-level text is the notification (and the fallback): Slack reads <!channel> and <url|label> there too.
    text = escape(title)[:3000]
    blocks = blocks[:50]
    _fit(blocks, TOTAL_LIMIT - len(text))
    return {"text": text, "blocks": blocks}


def _fit(blocks: list[dict], room: int) -> None:
    """Cut the longest sections, to one length for all, until the blocks' text fits in ``room``
    characters: every section keeps its start (at least ``room`` / 50), none is dropped, so the
    "and N more" line and the idempotency key stay."""
    sections = [b for b in blocks if b["type"] == "section"]
    others = sum(len(b.get("text", {}).get("text", "")) + sum(len(e.get("text", "")) for e in b.get("elements", []))
                 for b in blocks if b["type"] != "section")
    lengths = sorted(len(b["text"]["text"]) for b in sections)
    left = room - others
    if sum(lengths) <= left:
        return
    cap = 0
    for index, length in enumerate(lengths):  # the longest cap with the total in room
        share = left // (len(lengths) - index)
        if length > share:
            cap = share
            break
        left -= length
    for block in sections:
        if len(block["text"]["text"]) > cap:
            block["text"]["text"] = block["text"]["text"][:max(1, cap) - 1] + "…"
