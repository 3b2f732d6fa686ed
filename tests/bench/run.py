"""auditctl benchmarks: the library against hand-written SQL, at 10k, 100k and 1M audits.

    python -m tests.bench.run                       # SQLite, all sizes, PostgreSQL too when a server can start
    python -m tests.bench.run --sizes 10000 --engines sqlite --repeat 3
    python -m tests.bench.run --markdown bench.md   # also write the table as Markdown

Every figure is the median of --repeat runs, with min and max. Nothing here is a
test: targets are printed beside the figures, and a missed one is reported, not failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from auditctl.db import create_engine  # noqa: E402
from auditctl.history import Actor  # noqa: E402
from auditctl.migrate import upgrade  # noqa: E402
from auditctl.recovery import recover_stuck  # noqa: E402
from auditctl.rules import find_stuck  # noqa: E402
from auditctl.thresholds import Thresholds  # noqa: E402

from bench import fixtures, raw  # noqa: E402

THRESHOLDS = Thresholds(stale_after=600, max_age=1800, stall_after=600)


@dataclass
class Figure:
    name: str
    engine: str
    size: str
    samples: list[float] = field(default_factory=list)
    unit: str = "ms"
    target: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cells(self):
        scale = 1000.0 if self.unit == "ms" else 1.0
        if not self.samples:
            return [self.name, self.engine, self.size, "-", "-", "-", self.target, self.note]
        return [self.name, self.engine, self.size, f"{self.median * scale:.1f}", f"{min(self.samples) * scale:.1f}",
                f"{max(self.samples) * scale:.1f}", self.target, self.note]


def timed(fn, repeat: int, setup=None) -> tuple[list[float], object]:
    samples, result = [], None
    for _ in range(repeat):
        if setup:
            setup()
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return samples, result


class Database:
    """A benchmark database of one engine and size, built once and copied for destructive runs."""

    def __init__(self, engine_name: str, size: int, workdir: Path, server=None, stuck_running: int | None = None):
        self.engine_name, self.size, self.workdir, self.server = engine_name, size, workdir, server
        tag = f"{size}" + (f"_s{stuck_running}" if stuck_running is not None else "")
        if engine_name == "sqlite":
            self.path = workdir / f"bench_{tag}.db"
            self.url = f"sqlite:///{self.path}"
        else:
            self.name = f"bench_{tag}"
            self.url = server.create_database(self.name)
        engine = create_engine(self.url)
        upgrade(engine)
        engine.dispose()
        if engine_name == "sqlite":
            fixtures.fill_sqlite(str(self.path), size, stuck_running=stuck_running)
        else:
            fixtures.fill_postgres(raw.dsn(self.url), size, stuck_running=stuck_running)

    def fresh_copy(self, label: str) -> str:
        """A writable copy for a destructive run; returns its URL."""
        if self.engine_name == "sqlite":
            target = self.workdir / f"copy_{label}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(target) + suffix).unlink(missing_ok=True)
            shutil.copyfile(self.path, target)
            return f"sqlite:///{target}"
        copy = f"{self.name}_{label}"
        self.server.drop_database(copy)
        return self.server.create_database(copy, template=self.name)


def bench_scan(db: Database, repeat: int) -> list[Figure]:
    engine = create_engine(db.url)
    find_stuck(engine, THRESHOLDS)  # warm: compile cache, page cache
    library, verdicts = timed(lambda: find_stuck(engine, THRESHOLDS), repeat)
    hand, rows = timed(lambda: raw.stuck(db.url, THRESHOLDS), repeat)
    naive, naive_ids = timed(lambda: raw.naive(db.url, THRESHOLDS), repeat)
    assert sorted(v.id for v in verdicts) == sorted(r[0] for r in rows) == sorted(naive_ids), "the three scans disagree"
    engine.dispose()
    raw.close_all()  # a PostgreSQL database with sessions open cannot serve as a template
    ratio = statistics.median(library) / statistics.median(hand)
    size = f"{db.size:,}"
    return [
        Figure("scan: library", db.engine_name, size, library, target="<= 1.5x raw",
               note=f"{ratio:.2f}x raw; {len(verdicts)} stuck"),
        Figure("scan: raw SQL", db.engine_name, size, hand),
        Figure("scan: naive (judge in Python)", db.engine_name, size, naive,
               note=f"{statistics.median(naive) / statistics.median(hand):.2f}x raw"),
    ]


def bench_recover(db: Database, repeat: int) -> list[Figure]:
    library_samples, raw_samples, counts = [], [], []
    for run in range(repeat):
        url = db.fresh_copy(f"lib{run}")
        engine = create_engine(url)
        start = time.perf_counter()
        done = recover_stuck(engine, THRESHOLDS, actor=Actor.command("bench"))
        library_samples.append(time.perf_counter() - start)
        counts.append(len(done))
        engine.dispose()
        url = db.fresh_copy(f"raw{run}")
        start = time.perf_counter()
        raw_count = raw.recover(url, THRESHOLDS)
        raw_samples.append(time.perf_counter() - start)
        raw.close_all()
        assert raw_count == counts[-1], f"raw recovered {raw_count}, library {counts[-1]}"
    ratio = statistics.median(library_samples) / statistics.median(raw_samples)
    size = f"{counts[0]:,} stuck of {db.size:,}"
    return [
        Figure("recover: library (+history)", db.engine_name, size, library_samples, target="<= 3x raw, << 300 s",
               note=f"{ratio:.2f}x raw"),
        Figure("recover: raw batched UPDATE (+history)", db.engine_name, size, raw_samples),
    ]


def bench_writes(db: Database, writes: int) -> list[Figure]:
    from auditctl import leases
    from auditctl.progress import signature

    engine = create_engine(db.url)
    audit_id = leases.create_audit(engine, "https://bench.example.com")
    lease, document = leases.claim(engine, audit_id, worker_id="bench", instance_id="bench", worker_url=None)
    actor = Actor("bench")
    beats, progress = [], []
    for i in range(writes):
        start = time.perf_counter()
        document = leases.heartbeat(engine, lease, document, actor)
        beats.append(time.perf_counter() - start)
        fields = {"step": "Crawling", "percentage": round(100 * i / writes, 1), "completed_tasks": i, "total_tasks": writes}
        start = time.perf_counter()
        document = leases.write_progress(engine, lease, fields, signature("Crawling", fields["percentage"], i, writes), None, actor)
        progress.append(time.perf_counter() - start)

    engine.dispose()

    def p99(samples):
        return sorted(samples)[int(len(samples) * 0.99) - 1]

    return [
        Figure("heartbeat write", db.engine_name, f"{db.size:,}", beats, note=f"p99 {p99(beats) * 1000:.2f} ms over {writes}"),
        Figure("progress write", db.engine_name, f"{db.size:,}", progress, note=f"p99 {p99(progress) * 1000:.2f} ms over {writes}"),
    ]


def bench_monitor_capacity(db: Database, repeat: int) -> Figure:
    """A monitor pass over all running audits (the read that must fit in a 5 s interval)."""
    from auditctl.audits import list_audits

    engine = create_engine(db.url)
    samples, running = timed(lambda: list_audits(engine, status="running", limit=None), repeat)
    pass_samples, _ = timed(lambda: find_stuck(engine, THRESHOLDS), repeat)
    engine.dispose()
    per_audit = (statistics.median(samples) + statistics.median(pass_samples)) / max(1, len(running))
    capacity = int(5.0 / per_audit)
    return Figure("monitor pass (read running + judge)", db.engine_name, f"{len(running):,} running", [
        a + b for a, b in zip(samples, pass_samples)], note=f"~{capacity:,} running audits fit a 5 s pass")


def bench_startup(repeat: int, workdir: Path) -> list[Figure]:
    exe = Path(sys.executable).parent / "auditctl"
    empty = workdir / "empty.db"
    upgrade(create_engine(f"sqlite:///{empty}"))
    env = {**os.environ, "AUDITCTL_DATABASE_URL": f"sqlite:///{empty}"}

    def run(argv):
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            samples.append(time.perf_counter() - start)
        return samples

    floor_modules = "import auditctl.cli, auditctl.rules, auditctl.db, auditctl.cli.records, auditctl.cli.render, tabulate"
    bare = run([sys.executable, "-c", "pass"])
    imports = run([sys.executable, "-c", floor_modules])
    help_ = run([str(exe), "--help"])
    scan = run([str(exe), "scan"])
    return [
        Figure("python -c pass", "-", "-", bare),
        Figure("import floor of scan", "-", "-", imports),
        Figure("auditctl --help", "-", "-", help_, target="<= pass + 50 ms",
               note=f"+{(statistics.median(help_) - statistics.median(bare)) * 1000:.0f} ms over bare Python"),
        Figure("auditctl scan (empty db)", "sqlite", "0", scan, target="<= import floor + 60 ms",
               note=f"+{(statistics.median(scan) - statistics.median(imports)) * 1000:.0f} ms over the import floor"),
    ]


def bench_memory(db: Database) -> Figure:
    exe = Path(sys.executable).parent / "auditctl"
    proc = subprocess.Popen([str(exe), "scan", "--format", "json", "--database-url", db.url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    count = 0
    for line in proc.stdout:
        count += line.startswith(b"  {")
    _, status, usage = os.wait4(proc.pid, 0)
    peak_mb = usage.ru_maxrss / 1024.0
    return Figure("scan --format json peak RSS", db.engine_name, f"{count:,} stuck", [peak_mb], unit="MB",
                  target="< 150 MB", note="streams" if peak_mb < 150 else "over target")


def explain(db: Database) -> str:
    return raw.explain(db.url, THRESHOLDS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--markdown", default=None, help="also write the results table (and query plans) to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="auditctl-bench-"))
    server = None
    if "postgresql" in engines:
        from pgserver import PostgresServer, unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
            engines.remove("postgresql")
        else:
            server = PostgresServer()
            server.start()
    figures: list[Figure] = []
    plans: list[str] = []
    try:
        figures += bench_startup(max(args.repeat, 10), workdir)
        for engine_name in engines:
            for size in sizes:
                print(f"building {engine_name} database of {size:,} audits…", file=sys.stderr)
                db = Database(engine_name, size, workdir, server)
                figures += bench_scan(db, args.repeat)
                figures.append(bench_monitor_capacity(db, args.repeat))
                plans.append(f"{engine_name}, {size:,} audits:\n{explain(db)}")
                if size == sizes[-1]:
                    figures += bench_writes(db, args.writes)
                print_table(figures)
            print(f"building {engine_name} database with 10,000 stuck audits…", file=sys.stderr)
            stuck_db = Database(engine_name, 100_000, workdir, server, stuck_running=10_000)
            figures += bench_recover(stuck_db, max(1, min(args.repeat, 3)))
            memory_db = Database(engine_name, 200_000, workdir, server, stuck_running=100_000)
            figures.append(bench_memory(memory_db))
            print_table(figures)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    table = print_table(figures)
    machine = f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nmachine: {machine}")
    print("\nquery plans (EXPLAIN of the stuck query):\n" + "\n\n".join(plans))
    if args.markdown:
        Path(args.markdown).write_text(f"Machine: {machine}\n\n{markdown(figures)}\n\nQuery plans:\n\n```\n"
                                       + "\n\n".join(plans) + "\n```\n")
    return 0


HEADERS = ["measure", "engine", "size", "median", "min", "max", "target", "note"]


def print_table(figures) -> str:
    from tabulate import tabulate

    rows = [f.cells() for f in figures]
    for row, figure in zip(rows, figures):
        row[3] = f"{row[3]} {figure.unit}"
    text = tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)
    print(text, file=sys.stderr)
    return text


def markdown(figures) -> str:
    from tabulate import tabulate

    rows = [f.cells() for f in figures]
    for row, figure in zip(rows, figures):
        row[3] = f"{row[3]} {figure.unit}"
    return tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    sys.exit(main())
