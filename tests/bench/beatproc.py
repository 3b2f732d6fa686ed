"""One heartbeat writer process for the heartbeat measure.

    python beatproc.py lib|raw|stmt URL SECONDS THREADS

``lib``: one ``StuckAuditPrevention`` (its heartbeat thread is not started, so no monitor pass
runs); each of THREADS threads claims an audit with ``guard.run`` and calls ``run.heartbeat()``
in a tight loop. ``raw``: each thread opens its own bare-driver connection, inserts a running
audit under a lease, and runs the fenced autocommit UPDATE of ``raw.HEARTBEAT_*`` in a tight loop.
``stmt``: as ``raw``, but the statement is the library's own heartbeat (``leases._HEARTBEAT``, which
also stamps the progress document and keeps the longest-gap columns), compiled once: the database's
share of a library beat, without the library's Python.

Prints ``READY`` once every thread is set up. Then, for each ``GO`` line on stdin, every thread
beats for SECONDS and the process prints one JSON line: each beat's latency in milliseconds
and the errors. ``STOP`` (or end of input) ends the runs (the library's audits are finished).
Both sides wait at most 2 s for a lock (the library's worker lock wait).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import raw

LOCK_WAIT = 2.0


def _retry(action, tries: int = 50):
    """Set-up under contention (32 processes claiming at once on SQLite) may meet a locked database."""
    for attempt in range(tries):
        try:
            return action()
        except Exception:  # noqa: BLE001
            if attempt == tries - 1:
                raise
            time.sleep(0.05 + 0.01 * attempt)


class Rounds:
    """The main thread starts each round; the writers beat for ``seconds`` and report."""

    def __init__(self, threads: int, seconds: float):
        self.seconds = seconds
        self.start = threading.Barrier(threads + 1)
        self.end = threading.Barrier(threads + 1)
        self.stopping = False
        self.samples: list[list[float]] = [[] for _ in range(threads)]
        self.errors = [0] * threads
        self.failures: list[str] = []

    def beat(self, index: int, call) -> None:
        """The writer's side: wait for a round, beat, report; until told to stop."""
        self.start.wait()  # set up
        clock = time.perf_counter
        while True:
            self.start.wait()
            if self.stopping:
                return
            mine = self.samples[index]
            deadline = clock() + self.seconds
            while True:
                begin = clock()
                if begin >= deadline:
                    break
                try:
                    call()
                except Exception as error:  # noqa: BLE001 - counted, the loop goes on
                    self.errors[index] += 1
                    if len(self.failures) < 3:
                        self.failures.append(f"{type(error).__name__}: {error}"[:200])
                    continue
                mine.append((clock() - begin) * 1000.0)
            self.end.wait()

    def report(self) -> str:
        line = json.dumps({"samples": [s for mine in self.samples for s in mine], "errors": sum(self.errors),
                           "failures": self.failures})
        self.samples = [[] for _ in self.samples]
        self.errors = [0] * len(self.errors)
        self.failures = []
        return line


def main() -> int:
    mode, url, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    rounds = Rounds(threads, seconds)
    guard = None
    if mode == "lib":
        from auditctl import StuckAuditPrevention

        guard = _retry(lambda: StuckAuditPrevention(url, worker_id=f"bench-{os.getpid()}", heartbeat_interval=30,
                                                    create_schema=False))

    def lib_writer(index: int) -> None:
        audit_id = _retry(lambda: guard.create_audit(f"https://bench.example.com/{os.getpid()}/{index}", kind="bench"))
        for attempt in range(50):
            claimed = False
            try:
                with guard.run(audit_id) as run:
                    claimed = True
                    run.update_progress(step="Crawling", completed_tasks=3, total_tasks=40, current_url="/api/v1/items/1")
                    rounds.beat(index, run.heartbeat)
                return
            except Exception:  # noqa: BLE001 - a claim that met a locked database is tried again
                if claimed or attempt == 49:
                    raise
                time.sleep(0.05 + 0.01 * attempt)

    def raw_writer(index: int) -> None:
        connection = raw.connect(url, wait=30.0)
        audit_id, lease = _retry(lambda: raw.running_audit(connection, url, f"https://bench.example.com/{os.getpid()}/{index}"))
        if raw.is_postgres(url):
            statement = raw.HEARTBEAT_PG
        else:
            statement = raw.HEARTBEAT_SQLITE
            connection.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT * 1000)}")

        def one():
            if connection.execute(statement, (audit_id, lease)).rowcount != 1:
                raise RuntimeError("lease lost")

        rounds.beat(index, one)
        connection.close()

    def statement_writer(index: int) -> None:
        from auditctl import leases
        from auditctl.db import create_engine
        from auditctl.transactions import driver_form

        engine = create_engine(url, role="worker")
        sql, arguments = driver_form(engine, leases._HEARTBEAT)  # compiles only; connects to nothing
        engine.dispose()
        connection = raw.connect(url, wait=30.0)
        audit_id, lease = _retry(lambda: raw.running_audit(connection, url, f"https://bench.example.com/{os.getpid()}/{index}"))
        if not raw.is_postgres(url):
            connection.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT * 1000)}")
        values = arguments({"audit_id": audit_id, "token": lease})

        def one():
            if connection.execute(sql, values).rowcount != 1:
                raise RuntimeError("lease lost")

        rounds.beat(index, one)
        connection.close()

    def guarded(target, index):
        try:
            target(index)
        except BaseException as error:  # noqa: BLE001
            rounds.failures.append(f"set-up failed: {type(error).__name__}: {error}"[:300])
            rounds.start.abort()
            rounds.end.abort()

    writer = {"lib": lib_writer, "raw": raw_writer, "stmt": statement_writer}[mode]
    workers = [threading.Thread(target=guarded, args=(writer, i), daemon=True)
               for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        rounds.start.wait()
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() != "GO":
                break
            rounds.start.wait()
            rounds.end.wait()
            print(rounds.report(), flush=True)
        rounds.stopping = True
        rounds.start.wait()
    except threading.BrokenBarrierError:
        print(json.dumps({"samples": [], "errors": threads, "failures": rounds.failures}), flush=True)
        return 1
    for worker in workers:
        worker.join()
    if guard is not None:
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
