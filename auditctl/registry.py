"""Worker instances: who is alive, and who shares a ``worker_id`` with whom.

Every process start of a worker is its own instance (a random id) beside the
configured ``worker_id``, so a restarted worker is told apart from its previous run.
An earlier instance counts as gone when it stopped cleanly; when it ran in this boot
and pid namespace and its process (pid and start time) no longer exists, or is this
process but not a live guard; or when it ran anywhere else (another host or container,
even one with the same hostname) and has not beaten within ``stale_after``. Any other
instance with the same ``worker_id`` is a live duplicate (a reused pod name): it is
reported, and what it holds is left alone.
"""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from .db import db_now, read_connection, seconds_since, write_transaction
from .schema import IS_RUNNING, audits, workers

#: Instance ids of the guards alive in this very process (a same-pid row may be one of them).
_LIVE_HERE: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


@dataclass
class Instance:
    instance_id: str
    worker_id: str
    worker_url: str | None
    host: str | None
    pid: int | None
    started_at: datetime | None
    last_heartbeat_at: datetime | None
    stopped_at: datetime | None
    heartbeat_age: float | None
    process_key: str | None = None
    alive: bool = False
    running_audits: int = 0
    duplicate: bool = False  # alive while another live instance uses the same worker_id


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _namespace() -> str | None:
    """This boot and this pid namespace: where a pid means the same process as here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def process_key(pid: int | None = None) -> str | None:
    """``boot:pid-namespace:pid:start-time``: names one process, even across pid reuse and containers."""
    pid = pid or os.getpid()
    namespace, start = _namespace(), _process_start(pid)
    return None if namespace is None or start is None else f"{namespace}:{pid}:{start}"


def _judge(instance: Instance, stale_after: float) -> bool:
    if instance.stopped_at is not None:
        return False
    namespace = _namespace()
    if instance.process_key and namespace and instance.process_key.startswith(namespace + ":"):
        # Same boot, same pid namespace: the process table is the truth, at once.
        pid, start = instance.process_key[len(namespace) + 1:].split(":", 1)
        if int(pid) == os.getpid():
            return instance.instance_id in _LIVE_HERE
        return _process_start(int(pid)) == start
    # Another host, container or boot (a reused pod name looks like this): only a fresh
    # heartbeat says it is alive.
    return instance.heartbeat_age is not None and instance.heartbeat_age <= stale_after


def register(engine: Engine, *, instance_id: str, worker_id: str, worker_url: str | None, guard: object) -> None:
    _LIVE_HERE[instance_id] = guard
    with write_transaction(engine) as connection:
        connection.execute(
            insert(workers).values(instance_id=instance_id, worker_id=worker_id, worker_url=worker_url,
                                   host=socket.gethostname(), pid=os.getpid(), process_key=process_key(),
                                   started_at=db_now(), last_heartbeat_at=db_now())
        )


def beat(engine: Engine, instance_id: str) -> None:
    with write_transaction(engine) as connection:
        connection.execute(update(workers).where(workers.c.instance_id == instance_id).values(last_heartbeat_at=db_now()))


def mark_stopped(engine: Engine, instance_id: str) -> None:
    _LIVE_HERE.pop(instance_id, None)
    with write_transaction(engine) as connection:
        connection.execute(update(workers).where(workers.c.instance_id == instance_id).values(stopped_at=db_now()))


def instances(engine: Engine, stale_after: float, *, worker_id: str | None = None, include_stopped: bool = True) -> list[Instance]:
    """Every known instance with ``alive`` judged and the count of running audits it holds."""
    held = (
        select(audits.c.worker_instance, func.count().label("n"))
        .where(IS_RUNNING)
        .group_by(audits.c.worker_instance)
        .subquery()
    )
    query = (
        select(workers, seconds_since(workers.c.last_heartbeat_at).label("heartbeat_age"), func.coalesce(held.c.n, 0).label("held"))
        .select_from(workers.outerjoin(held, held.c.worker_instance == workers.c.instance_id))
        .order_by(workers.c.worker_id, workers.c.started_at)
    )
    if worker_id is not None:
        query = query.where(workers.c.worker_id == worker_id)
    if not include_stopped:
        query = query.where(workers.c.stopped_at.is_(None))
    found = []
    with read_connection(engine) as connection:
        for row in connection.execute(query):
            m = row._mapping
            instance = Instance(
                instance_id=m["instance_id"], worker_id=m["worker_id"], worker_url=m["worker_url"], host=m["host"], pid=m["pid"],
                started_at=m["started_at"], last_heartbeat_at=m["last_heartbeat_at"], stopped_at=m["stopped_at"],
                heartbeat_age=None if m["heartbeat_age"] is None else round(float(m["heartbeat_age"]), 3),
                process_key=m["process_key"],
                running_audits=int(m["held"]),
            )
            instance.alive = _judge(instance, stale_after)
            found.append(instance)
    live_count: dict[str, int] = {}
    for instance in found:
        if instance.alive:
            live_count[instance.worker_id] = live_count.get(instance.worker_id, 0) + 1
    for instance in found:
        instance.duplicate = instance.alive and live_count[instance.worker_id] > 1
    return found


def live_peers(engine: Engine, worker_id: str, instance_id: str, stale_after: float) -> list[Instance]:
    """Other live instances using the same ``worker_id``: duplicates to report."""
    return [
        i for i in instances(engine, stale_after, worker_id=worker_id, include_stopped=False)
        if i.instance_id != instance_id and i.alive
    ]


__all__ = ["Instance", "register", "beat", "mark_stopped", "instances", "live_peers", "process_key"]
