"""A generic JSON webhook: the summary, and every event exactly as the outbox holds it.

For receivers that route or store alerts themselves. The body carries the message's
``idempotency_key`` (also sent as the ``Idempotency-Key`` header) and each event's own
stable ``key``: a receiver that keeps the keys it has seen drops the rare repeat that
at-least-once delivery allows (see ``auditctl.notify``).
"""

from __future__ import annotations

from .. import __version__
from ..timestamps import iso
from .digest import Digest


def message(digest: Digest, idempotency_key: str) -> dict:
    return {
        "source": "auditctl",
        "version": __version__,
        "idempotency_key": idempotency_key,
        "title": digest.title,
        "severity": digest.severity,
        "counts": digest.counts(),
        "events": [{"key": event.key, "id": event.id, "event": event.event, "created_at": iso(event.created_at),
                    "payload": event.payload} for event in digest.events],
    }
