"""A realistic sample fleet for ``auditctl demo``, so a newcomer's first ``scan`` shows something real.

It writes through the same claim and progress functions a worker uses, then moves
timestamps into the past (on the database's clock) to stand for time that has passed:
completed and failed audits, healthy running ones, one audit of each stuck kind, and
a few pending.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from . import leases
from .errors import AuditctlError
from .history import Actor
from .progress import derive_percentage, isoformat_z, signature
from .recovery import recover_stuck
from .schema import audits, workers
from .sqlfunctions import fetch_now
from .thresholds import Thresholds
from .transactions import read_connection, write_transaction

TARGETS = [
    "https://shop.example.com", "https://api.example.com", "https://intranet.example.org", "https://blog.example.net",
    "https://payments.example.com", "https://status.example.io", "https://cdn.example.com", "https://auth.example.com",
    "https://docs.example.org", "https://mail.example.com", "https://legacy.example.com", "https://staging.example.com",
]


@dataclass
class DemoFleet:
    completed: int
    failed: int
    running_healthy: int
    stuck: dict[str, int]
    pending: int


class DatabaseNotEmpty(AuditctlError):
    """The demo refuses to mix sample audits into real ones."""


def _running(engine, target, worker, *, step, done, total, started_ago, heard_ago, changed_ago, max_age=None):
    audit_id = leases.create_audit(engine, target, max_age=max_age)
    lease, _ = leases.claim(engine, audit_id, worker_id=worker, instance_id=_instance(worker),
                            worker_url=f"https://{worker}.workers.example.com")
    fields = {"step": step, "completed_tasks": done, "total_tasks": total,
              "percentage": derive_percentage(None, done, total)}
    leases.write_progress(engine, lease, fields, signature(step, fields["percentage"], done, total), None, Actor("auditctl demo"))
    _age(engine, audit_id, started_at=started_ago, heartbeat_at=heard_ago, last_worker_update=heard_ago,
         progress_changed_at=changed_ago, created_at=started_ago + 30)
    return audit_id


def _completed(engine, target, worker, *, started_ago, run, longest_gap, longest_stall, actor):
    """An audit run to the end by ``worker`` ``run`` seconds long, started ``started_ago`` seconds ago.

    Finished through the library, then moved into the past as a whole: its last heartbeat and its
    finish are the end of its run, and its longest silence and stall are what a healthy run shows
    (what ``report`` and ``report --suggest-thresholds`` learn from), not the hours since it started."""
    audit_id = _running(engine, target, worker, step="Report", done=20, total=20, started_ago=0, heard_ago=0, changed_ago=0)
    leases.finish(engine, _lease(engine, audit_id), error=None, actor=actor)
    ended = started_ago - run
    _age(engine, audit_id, created_at=started_ago + 30, started_at=started_ago, heartbeat_at=ended,
         last_worker_update=ended, progress_changed_at=ended, finished_at=ended)
    with write_transaction(engine) as connection:
        connection.execute(update(audits).where(audits.c.id == audit_id)
                           .values(longest_gap_seconds=longest_gap, longest_stall_seconds=longest_stall))
    return audit_id


def _age(engine, audit_id, **seconds_ago):
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        values = {name: now - timedelta(seconds=ago) for name, ago in seconds_ago.items()}
        document = connection.execute(select(audits.c.progress).where(audits.c.id == audit_id)).scalar()
        if isinstance(document, dict) and isinstance(document.get("progress"), dict) and "heartbeat_at" in values:
            heard = isoformat_z(values["heartbeat_at"])
            changed = isoformat_z(values.get("progress_changed_at", values["heartbeat_at"]))
            values["progress"] = {**document, "last_worker_update": heard,
                                  "progress": {**document["progress"], "heartbeat": heard, "last_updated": changed}}
        connection.execute(update(audits).where(audits.c.id == audit_id).values(**values))


def seed_demo(engine: Engine, *, force: bool = False) -> DemoFleet:
    """Fill the database with the sample fleet; refuses a database that already holds audits unless ``force``."""
    with read_connection(engine) as connection:
        existing = connection.execute(select(func.count()).select_from(audits)).scalar_one()
    if existing and not force:
        raise DatabaseNotEmpty(f"the database already holds {existing} audit{'' if existing == 1 else 's'}; "
                               "`auditctl demo --force` adds the sample fleet anyway")
    actor = Actor("auditctl demo")
    minutes = 60
    # History first: audits that finished, and ones a monitor already failed.
    for index, target in enumerate(TARGETS[:6]):
        _completed(engine, target, f"worker-{index % 3 + 1}", started_ago=(30 - index) * minutes * 10,
                   run=(12 + 2 * index) * minutes, longest_gap=25 + 3 * index, longest_stall=90 + 20 * index, actor=actor)
    abandoned = [
        _running(engine, target, "worker-4", step="Crawling", done=3, total=20, started_ago=(5 + index) * 3600,
                 heard_ago=(5 + index) * 3600 - 300, changed_ago=(5 + index) * 3600 - 300)
        for index, target in enumerate(TARGETS[6:8])
    ]
    # Only the demo's own audits: under --force the database may hold real ones, which are not the demo's to recover.
    recover_stuck(engine, Thresholds(), actor=actor, ids=abandoned)
    # The live fleet: healthy audits and one of each stuck kind.
    _running(engine, "https://shop.example.com/checkout", "worker-1", step="Crawling", done=12, total=40,
             started_ago=8 * minutes, heard_ago=20, changed_ago=20)
    _running(engine, "https://api.example.com/v2", "worker-2", step="Testing endpoints", done=7, total=10,
             started_ago=14 * minutes, heard_ago=45, changed_ago=70)
    _running(engine, "https://intranet.example.org/login", "worker-3", step="Fingerprinting", done=2, total=25,
             started_ago=3 * minutes, heard_ago=5, changed_ago=5)
    _running(engine, "https://blog.example.net", "worker-5", step="Crawling", done=9, total=30,
             started_ago=22 * minutes, heard_ago=17 * minutes, changed_ago=17 * minutes)        # stale_heartbeat
    _running(engine, "https://payments.example.com", "worker-2", step="Scanning dependencies", done=38, total=40,
             started_ago=47 * minutes, heard_ago=60, changed_ago=2 * minutes)                 # max_age_exceeded
    _running(engine, "https://status.example.io", "worker-3", step="Waiting for rate limit", done=5, total=20,
             started_ago=19 * minutes, heard_ago=40, changed_ago=16 * minutes)                # progress_stalled
    _running(engine, "https://docs.example.org/deep-scan", "worker-1", step="Deep crawl", done=140, total=900,
             started_ago=95 * minutes, heard_ago=30, changed_ago=60, max_age=4 * 3600)       # own deadline: healthy
    for target in TARGETS[8:11]:
        leases.create_audit(engine, target)
    _register_workers(engine, {"worker-1": 20, "worker-2": 45, "worker-3": 5, "worker-4": 5 * 3600, "worker-5": 17 * minutes})
    return DemoFleet(completed=6, failed=2, running_healthy=4,
                     stuck={"stale_heartbeat": 1, "max_age_exceeded": 1, "progress_stalled": 1}, pending=3)


def _instance(worker: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_DNS, f"{worker}.demo.auditctl").hex


def _register_workers(engine, last_heard: dict[str, float]) -> None:
    """Worker instances as the fleet's hosts would have registered them (worker-4 and worker-5 are gone).

    A second fleet (``demo --force``) is held by the same instances: those already registered are kept."""
    with write_transaction(engine) as connection:
        now = fetch_now(connection)
        known = set(connection.execute(select(workers.c.instance_id)
                                       .where(workers.c.instance_id.in_([_instance(w) for w in last_heard]))).scalars())
        for number, (worker, ago) in enumerate(last_heard.items(), start=1):
            if _instance(worker) in known:
                continue
            connection.execute(insert(workers).values(
                instance_id=_instance(worker), worker_id=worker, worker_url=f"https://{worker}.workers.example.com",
                host=f"scan-node-{number}.example.internal", pid=1000 + number,
                started_at=now - timedelta(hours=6), last_heartbeat_at=now - timedelta(seconds=ago),
            ))


def _lease(engine, audit_id) -> leases.Lease:
    with read_connection(engine) as connection:
        row = connection.execute(select(audits.c.lease, audits.c.worker_id, audits.c.worker_instance)
                                 .where(audits.c.id == audit_id)).one()
    return leases.Lease(audit_id=audit_id, token=row.lease, worker_id=row.worker_id, instance_id=row.worker_instance,
                        worker_url=None)
