"""Worker instances: who is alive, who is provably gone, and who shares a ``worker_id`` with whom.

Every process start of a worker is its own instance (a random id) beside the
configured ``worker_id``, so a restarted worker is told apart from its previous run.

An instance is **provably gone** when it stopped cleanly (``stop()`` marks it), or when it
ran in this boot and pid namespace and its process (pid and start time) no longer
exists, or is this very process but no live guard here carries it. Proof is never a
guess: an instance on another host, container or boot is judged only by its silence,
against the ``stale_after`` it declared (or the judge's). The stuck rules recover the
audits of a provably gone instance at once (``worker_gone``).

Any other live instance with the same ``worker_id`` is a duplicate (a reused pod name):
it is reported, and what it holds is left alone.
"""

from __future__ import annotations

import functools
import os
import socket
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists, func, insert, or_, select, type_coerce, update
from sqlalchemy.engine import Engine
from sqlalchemy.types import NullType

from .errors import TextNotUtf8
from .migrate import refuse_newer_schema
from .schema import IS_RUNNING, audits, workers
from .sqlfunctions import db_now, fetch_now, index_present
from .thresholds import FUTURE_TOLERANCE
from .timestamps import as_datetime
from .transactions import read_connection, single_write, write_transaction
from .values import sane_duration, safe_int, text_value

#: Instance ids of the guards alive in this very process (a same-pid row may be one of them).
_LIVE_HERE: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()

#: Stopped or dead instances older than this are left out of ``auditctl workers`` unless --all.
GONE_RETENTION = 24 * 3600.0


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
    heartbeat_interval: float | None = None
    stale_after: float | None = None
    alive: bool = False
    #: How the instance was proven gone (None: alive, or only silent).
    gone_proof: str | None = None
    #: Seconds since it was last seen alive (stopped, or last heartbeat) when it is not alive.
    gone_for: float | None = None
    running_audits: int = 0
    duplicate: bool = False  # alive while another live instance uses the same worker_id
    unreadable: str | None = None
    #: Its process is here (so it is not gone), but it has not beaten within its stale_after: stopped
    #: (SIGSTOP) or hung. Shown as silent; its audits are judged by their own heartbeats.
    late: bool = False

    @property
    def beating(self) -> bool:
        """Alive and beating: what the fleet's counts of alive workers count."""
        return self.alive and not self.late

    @property
    def not_beating(self) -> bool:
        """Read, and not alive and beating (proven gone, or silent): what the fleet's counts of gone
        workers count. A row that cannot be read proves nothing, and counts as neither."""
        return not self.beating and self.unreadable is None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when there is no such
    process running: none at all, or a dead one its parent has not reaped yet (a zombie, state Z or X)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return fields[19].decode()
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def _namespace() -> str | None:
    """This boot and this pid namespace: where a pid means the same process as here.

    Read once per process (46 µs a time: ``workers`` judged 3,000 instances with 4,500 reads). A
    process's own pid namespace never changes; a forked child reads it again, as its parent
    may have made it a new one (``unshare``)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


os.register_at_fork(after_in_child=_namespace.cache_clear)


def process_key(pid: int | None = None) -> str | None:
    """``boot:pid-namespace:pid:start-time``: names one process, even across pid reuse and containers."""
    pid = pid or os.getpid()
    namespace, start = _namespace(), _process_start(pid)
    return None if namespace is None or start is None else f"{namespace}:{pid}:{start}"


def _stopped_proof(instance_id: str, worker_id: str) -> str:
    # The same words on an instance (which may have finished all its work) and in the verdict of an
    # audit it still holds (where worker_gone says it left that audit unfinished).
    return f"worker instance {instance_id[:8]} of {worker_id} stopped cleanly"


def prove_gone(instance: Instance) -> str | None:
    """How this instance is proven gone, in words; None when it cannot be proven (it may be alive)."""
    if instance.stopped_at is not None:
        return _stopped_proof(instance.instance_id, instance.worker_id)
    namespace = _namespace()
    key = instance.process_key
    if not (isinstance(key, str) and namespace and key.startswith(namespace + ":")):
        return None  # another host, container or boot: only silence can tell
    try:
        pid_text, start = key[len(namespace) + 1:].split(":", 1)
        pid = int(pid_text)
    except ValueError:
        return None
    where = f"on {instance.host or 'this host'}"
    if pid == os.getpid():
        if instance.instance_id in _LIVE_HERE:
            return None
        return f"worker instance {instance.instance_id[:8]} of {instance.worker_id} belonged to this process, which no longer runs it"
    if _process_start(pid) == start:
        return None
    return (f"worker process {pid} {where} ({instance.worker_id}, instance {instance.instance_id[:8]}) "
            "no longer exists")


def _judge(instance: Instance, stale_after: float) -> None:
    instance.gone_proof = prove_gone(instance)
    if instance.gone_proof is not None:
        instance.alive = False
        return
    # Only a fresh heartbeat says it beats, by the silence it declared it may keep. One further
    # ahead than the stuck rules trust (a writer's clock, or another tool) says nothing.
    limit = instance.stale_after or stale_after
    age = instance.heartbeat_age
    beating = age is not None and -FUTURE_TOLERANCE <= age <= limit
    if instance.process_key and _namespace() and instance.process_key.startswith(_namespace() + ":"):
        instance.alive = True  # same boot and namespace, and the process is there
        instance.late = not beating
        return
    # Another host, container or boot (a reused pod name looks like this): only its heartbeat tells.
    instance.alive = beating


def register(engine: Engine, *, instance_id: str, worker_id: str, worker_url: str | None, guard: object,
             heartbeat_interval: float | None = None, stale_after: float | None = None) -> None:
    refuse_newer_schema(engine)
    _LIVE_HERE[instance_id] = guard
    with write_transaction(engine) as connection:
        connection.execute(
            insert(workers).values(instance_id=instance_id, worker_id=worker_id, worker_url=worker_url,
                                   host=socket.gethostname(), pid=os.getpid(), process_key=process_key(),
                                   started_at=db_now(), last_heartbeat_at=db_now(),
                                   heartbeat_interval=heartbeat_interval, stale_after=stale_after)
        )


_BEAT = update(workers).where(workers.c.instance_id == bindparam("instance_id")).values(last_heartbeat_at=db_now())


def beat(engine: Engine, instance_id: str, *, timeout: float | None = None) -> None:
    """This instance is alive: one statement (``transactions.single_write``), ``timeout`` as there."""
    single_write(engine, _BEAT, {"instance_id": instance_id}, timeout=timeout)


def forget_here(instance_id: str) -> None:
    """This process no longer runs the instance (its guard stopped)."""
    _LIVE_HERE.pop(instance_id, None)


def mark_running(engine: Engine, instance_id: str, guard: object) -> None:
    """The instance runs again here (its guard is used after ``stop()``): no longer provably gone."""
    _LIVE_HERE[instance_id] = guard
    with write_transaction(engine) as connection:
        connection.execute(update(workers).where(workers.c.instance_id == instance_id)
                           .values(stopped_at=None, last_heartbeat_at=db_now()))


_STOPPED = update(workers).where(workers.c.instance_id == bindparam("instance_id")).values(stopped_at=db_now())


def mark_stopped(engine: Engine, instance_id: str, *, timeout: float | None = None) -> None:
    """This instance stopped cleanly: one statement, ``timeout`` as in ``transactions.single_write``."""
    forget_here(instance_id)
    single_write(engine, _STOPPED, {"instance_id": instance_id}, timeout=timeout)


def _instance(m) -> Instance:
    return Instance(
        instance_id=text_value(m["instance_id"]) or "?", worker_id=text_value(m["worker_id"]) or "?",
        worker_url=text_value(m["worker_url"]), host=text_value(m["host"]), pid=safe_int(m["pid"]),
        started_at=as_datetime(m["started_at"]), last_heartbeat_at=as_datetime(m["last_heartbeat_at"]),
        stopped_at=as_datetime(m["stopped_at"]), heartbeat_age=None, process_key=text_value(m["process_key"]),
        heartbeat_interval=sane_duration(m["heartbeat_interval"]), stale_after=sane_duration(m["stale_after"]),
    )


def instances(engine: Engine, stale_after: float, *, worker_id: str | None = None, include_gone: bool = True,
              retention: float | None = None) -> list[Instance]:
    """Every known instance with ``alive`` judged and the count of running audits it holds.

    ``include_gone=False`` leaves out every instance that is not alive; ``retention`` (seconds)
    leaves out instances not alive for longer than that which hold no running audit.
    """
    held = (
        select(audits.c.worker_instance, func.count().label("n"))
        .where(IS_RUNNING)
        .group_by(audits.c.worker_instance)
        .subquery()
    )
    query = (
        select(workers, func.coalesce(held.c.n, 0).label("held"))
        .select_from(workers.outerjoin(held, held.c.worker_instance == workers.c.instance_id))
        .order_by(workers.c.worker_id, workers.c.started_at)
    )
    if worker_id is not None:
        query = query.where(workers.c.worker_id == worker_id)
    with read_connection(engine) as connection:
        now = fetch_now(connection)
        rows = connection.execute(query).all()
    found = []
    for row in rows:
        m = row._mapping
        try:
            instance = _instance(m)
            instance.running_audits = safe_int(m["held"]) or 0
            if instance.last_heartbeat_at is not None:
                instance.heartbeat_age = round((now - instance.last_heartbeat_at).total_seconds(), 3)
            _judge(instance, stale_after)
        except Exception as error:  # noqa: BLE001 - another tool's row must not hide the others
            instance = Instance(instance_id=text_value(m.get("instance_id")) or "?", worker_id=text_value(m.get("worker_id")) or "?",
                                worker_url=None, host=None, pid=None, started_at=None, last_heartbeat_at=None,
                                stopped_at=None, heartbeat_age=None, unreadable=f"{type(error).__name__}: {error}"[:200],
                                running_audits=safe_int(m.get("held")) or 0)
        if not instance.alive:
            last = instance.stopped_at or instance.last_heartbeat_at
            instance.gone_for = None if last is None else round((now - last).total_seconds(), 3)
        found.append(instance)
    live_count: dict[str, int] = {}
    for instance in found:
        if instance.alive:
            live_count[instance.worker_id] = live_count.get(instance.worker_id, 0) + 1
    for instance in found:
        instance.duplicate = instance.alive and live_count[instance.worker_id] > 1
    if not include_gone:
        found = [i for i in found if i.alive]
    elif retention is not None:
        found = [i for i in found if i.alive or i.running_audits or i.gone_for is None or i.gone_for <= retention]
    return found


def gone_instances(engine: Engine, *, holding_running: bool = False) -> dict[str, str]:
    """The instances the registry proves gone: instance id -> proof in words.

    Only two kinds of instance can be proven gone (see ``prove_gone``): one that stopped, and
    one whose process lived on this host; only those are read, and only those heard from
    within ``GONE_RETENTION`` (the audits of an instance silent for longer are stale by then
    anyway), so the list stays bounded however long the registry's history. The answer feeds
    the stuck query's ``worker_gone`` rule, which takes only the instances that hold a running
    audit (``rules.GoneInstances.held``); the whole list is what ``watch`` and alerts report.

    ``holding_running``: only those holding a running audit, found in the same statement (one
    probe each in the index of running audits' instances): a reading that only judges audits
    needs no more. With 1,500 gone instances that read took 2.7 ms on PostgreSQL where reading all
    of them and probing after took 10.3 (1.7 against 9.2 on SQLite). On a SQLite file without
    that index (not upgraded yet) every candidate is read, as ``held`` then narrows nothing.
    """
    namespace = _namespace()
    try:
        rows = _gone_rows(engine, namespace, holding_running, strict_text=True)
    except TextNotUtf8:
        rows = _gone_rows(engine, namespace, holding_running)  # the engine reads leniently from now on
    gone = {}
    for instance_id, worker_id, host, key, stopped_at in rows:
        try:
            instance_id, worker_id = text_value(instance_id) or "?", text_value(worker_id) or "?"
            if stopped_at is not None and as_datetime(stopped_at) is not None:  # unreadable proves nothing
                proof = _stopped_proof(instance_id, worker_id)
            else:
                proof = prove_gone(Instance(instance_id=instance_id, worker_id=worker_id, worker_url=None,
                                            host=text_value(host), pid=None, started_at=None, last_heartbeat_at=None,
                                            stopped_at=None, heartbeat_age=None, process_key=text_value(key)))
        except Exception:  # noqa: BLE001 - an unreadable registry row proves nothing
            continue
        if proof is not None:
            gone[instance_id] = proof
    return gone


def _gone_rows(engine: Engine, namespace: str | None, holding_running: bool, *, strict_text: bool = False) -> list:
    """The candidate rows. Read strictly first: a lenient decoder costs about a third of this read
    (five text values a row, thousands of stopped instances in a day of restarts)."""
    with read_connection(engine, strict_text=strict_text) as connection:
        cutoff = fetch_now(connection) - timedelta(seconds=GONE_RETENTION)
        if holding_running and not index_present(connection, "ix_audits_running_instance"):
            holding_running = False  # each probe would walk every running audit
        return connection.execute(_gone_candidates(namespace, holding_running), {"cutoff": cutoff}).all()


@functools.lru_cache(maxsize=8)
def _gone_candidates(namespace: str | None, holding_running: bool = False):
    """The registry rows that may prove an instance gone: stopped, or a process of this namespace.
    The stop time comes as the driver gives it (read once, by ``as_datetime``): this runs before
    every stuck query."""
    candidates = workers.c.stopped_at.is_not(None)
    if namespace:
        prefix = namespace + ":"
        candidates = or_(candidates, func.substr(workers.c.process_key, 1, len(prefix)) == prefix)
    last_heard = func.coalesce(workers.c.stopped_at, workers.c.last_heartbeat_at, workers.c.started_at,
                               type_=workers.c.started_at.type)
    query = (select(workers.c.instance_id, workers.c.worker_id, workers.c.host, workers.c.process_key,
                    type_coerce(workers.c.stopped_at, NullType()))
             .where(candidates, last_heard >= bindparam("cutoff", type_=workers.c.started_at.type)))
    if holding_running:
        query = query.where(exists().where(IS_RUNNING, audits.c.worker_instance == workers.c.instance_id))
    return query


def live_peers(engine: Engine, worker_id: str, instance_id: str, stale_after: float) -> list[Instance]:
    """Other live instances using the same ``worker_id``: duplicates to report."""
    return [
        i for i in instances(engine, stale_after, worker_id=worker_id, include_gone=False)
        if i.instance_id != instance_id and i.alive
    ]


__all__ = ["Instance", "GONE_RETENTION", "register", "beat", "mark_stopped", "forget_here", "instances",
           "gone_instances", "live_peers", "process_key", "prove_gone"]
