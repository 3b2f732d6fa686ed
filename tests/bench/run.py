"""auditctl's benchmark: the hot paths against the leanest hand-written SQL, through the bare drivers.

    python -m tests.bench.run                    # every measure, SQLite and PostgreSQL (about 20 minutes)
    python -m tests.bench.run --quick            # the same measures, smaller and fewer runs (a few minutes)
    python -m tests.bench.run --only scan,heartbeat --engines postgresql --sizes 100000
    python -m tests.bench.run --markdown perf.md # also write the table (and the machine) as Markdown

Every figure is the median of alternating runs (library, raw, library, raw, ...; --repeat
pairs), with min and max. The baselines (``raw.py``) go through sqlite3 and psycopg
directly, and each is checked to give the same answer as the library: a difference is
printed as MISMATCH and makes the command exit 1. Nothing here is a test: targets are
printed beside the figures, and a missed one is reported, never failed.

Measures (``--only`` names):
  scan       in-process stuck scan at each size: ``find_stuck`` (what ``auditctl scan`` runs,
             registry included) materialising every verdict's reasons, vs the lean query; and,
             for information, the lean query also returning the columns scan shows (what
             carrying a verdict's data costs with no library at all)
  growth     the same with the running set fixed and history growing 10k -> 100k -> the largest mix
  process    the whole ``auditctl scan --format json`` process vs ``rawscan.py`` (same imports, same JSON)
  heartbeat  p50/p99 of ``run.heartbeat()`` at 1, 8, 32 writer processes and 32 threads of one
             guard, vs the fenced autocommit UPDATE in the same shape; and, for information, the
             library's own heartbeat statement sent the same way (its share of the difference)
  recover    ``recover_stuck`` over 10,000 stuck audits vs an equal-work raw recovery, fresh copies
  monitor    one ``Monitor.run_pass()`` over 100,000 running audits
  startup    ``auditctl --help`` vs ``python -c pass``; ``auditctl scan`` on an empty db vs its import floor
  memory     peak RSS of ``auditctl scan --format json`` over 100,000 stuck audits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

import fixtures  # noqa: E402
import raw  # noqa: E402
from fixtures import Mix  # noqa: E402

PYTHON = sys.executable
AUDITCTL = str(Path(sys.executable).parent / "auditctl")
MEASURES = ("startup", "scan", "growth", "process", "recover", "monitor", "memory", "heartbeat")
#: 10,000 stuck audits with history to recover (the running set of the 1M mix, 10,000 finished).
RECOVER_MIX = Mix(stuck=10_000, healthy=20_000, history=10_000)
#: 100,000 running audits, a few stuck, for one monitor pass.
FLEET_MIX = Mix(stuck=30, healthy=99_970, history=20_000)
#: 100,000 stuck audits for scan's peak memory.
MEMORY_MIX = Mix(stuck=100_000, healthy=2_000, history=10_000)
#: --quick: smaller, so it runs in a few minutes (the table says which size each figure is).
QUICK_FLEET_MIX = Mix(stuck=10, healthy=29_990, history=5_000)
QUICK_MEMORY_MIX = Mix(stuck=20_000, healthy=1_000, history=5_000)
#: Where the heartbeat writers write (a copy; their rows come and go).
BEAT_MIX = Mix.of_size(10_000)

_children: set[subprocess.Popen] = set()


def raw_recovery(db) -> tuple[str, int, float]:
    """The equal-work raw recovery on a fresh copy of ``db``: (the copy's URL, audits changed, seconds)."""
    url = db.copy()
    start = time.perf_counter()
    changed = raw.recover(url)
    return url, changed, time.perf_counter() - start


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- figures and the table -------------------------------------------------------------------


@dataclass
class Series:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def text(self, unit: str) -> str:
        if not self.samples:
            return "-"
        if len(self.samples) == 1:
            return f"{fmt(self.median)} {unit}"
        return f"{fmt(self.median)} {unit} ({fmt(min(self.samples))}–{fmt(max(self.samples))})"


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


@dataclass
class Row:
    measure: str
    engine: str
    size: str
    lib: Series | None
    raw: Series | None
    unit: str = "ms"
    kind: str = "ratio"  # ratio (lib/raw <= limit), abs (lib < limit), delta (lib - raw <= limit), info
    limit: float = 0.0
    target: str = ""
    note: str = ""
    mismatch: bool = False
    error: str = ""
    cells: dict = field(default_factory=dict)  # explicit cell text (the history-growth row)

    @property
    def ratio(self) -> float | None:
        if self.cells.get("ratio_value") is not None:
            return self.cells["ratio_value"]
        if self.lib and self.raw and self.lib.samples and self.raw.samples and self.raw.median > 0:
            return self.lib.median / self.raw.median
        return None

    @property
    def result(self) -> str:
        if self.error:
            return "ERROR"
        if self.mismatch:
            return "MISMATCH"
        if self.kind == "info" or not self.lib or not self.lib.samples:
            return "-"
        if self.kind in ("ratio", "flat"):
            met = self.ratio is not None and self.ratio <= self.limit
        elif self.kind == "abs":
            met = self.lib.median < self.limit
        else:
            met = self.lib.median - self.raw.median <= self.limit
        return "MET" if met else "MISSED"

    def columns(self) -> list[str]:
        lib = self.cells.get("lib") or (self.lib.text(self.unit) if self.lib else "-")
        raw_ = self.cells.get("raw") or (self.raw.text(self.unit) if self.raw else "-")
        if self.kind == "delta" and self.lib and self.raw:
            ratio = f"{self.lib.median - self.raw.median:+.0f} {self.unit}"
        else:
            ratio = f"{self.ratio:.2f}x" if self.ratio is not None else "-"
        return [self.measure, self.engine, self.size, lib, raw_, ratio, self.target, self.result, self.note]


HEADERS = ["#", "measure", "engine", "size", "auditctl: median (min–max)", "raw", "ratio", "target", "result", "note"]


def table(rows: list[Row], markdown: bool = False) -> str:
    cells = [[str(i + 1), *row.columns()] for i, row in enumerate(rows)]
    if markdown:
        escape = lambda text: text.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---:" if h == "#" else "---" for h in HEADERS) + "|"]
        lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# --- databases -------------------------------------------------------------------------------


class Bench:
    """Shared state of one run: where files go, the PostgreSQL server, built databases, the results."""

    def __init__(self, args, workdir: Path, server):
        self.args, self.workdir, self.server = args, workdir, server
        self.dbs: dict[tuple[str, str], Db] = {}
        self.modules: dict[str, Path] = {}
        self.plans: list[str] = []
        self.rows: list[Row] = []
        self.mismatches: list[str] = []
        self.copies = 0
        xdg = workdir / "xdg"
        xdg.mkdir(exist_ok=True)
        # No setting of the developer's reaches the commands: thresholds are the defaults (10m, 30m, 10m).
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_") and k != "PYTHONDONTWRITEBYTECODE"}
        self.env.update(XDG_CONFIG_HOME=str(xdg))
        # Every process reads bytecode, as from an installed package. A stale .pyc under
        # PYTHONDONTWRITEBYTECODE would be compiled again in every process timed (10-30 ms).
        import compileall

        for tree in (ROOT / "auditctl", BENCH):
            compileall.compile_dir(str(tree), quiet=1)

    def db(self, engine: str, mix: Mix) -> "Db":
        key = (engine, mix.key)
        if key not in self.dbs:
            self.dbs[key] = Db(self, engine, mix)
        return self.dbs[key]

    def mismatch(self, message: str) -> None:
        self.mismatches.append(message)
        print("\n" + "!" * 100 + f"\nMISMATCH: {message}\n" + "!" * 100 + "\n", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        say(f"{row.measure} [{row.engine}, {row.size}]: {' | '.join(row.columns()[3:])}")
        return row


class Db:
    """One benchmark database of one engine and mix; built once, copied for destructive runs."""

    def __init__(self, bench: Bench, engine: str, mix: Mix):
        from auditctl.db import create_engine
        from auditctl.migrate import upgrade

        self.bench, self.engine, self.mix = bench, engine, mix
        self.name = f"bench_{mix.key}"
        started = time.perf_counter()
        say(f"building {engine} database: {mix.describe()}")
        if engine == "sqlite":
            self.path = bench.workdir / f"{self.name}.db"
            self.url = f"sqlite:///{self.path}"
            self.drop(self.url)  # what a failed build left
        else:
            bench.server.drop_database(self.name)
            self.url = bench.server.create_database(self.name)
        library = create_engine(self.url)
        upgrade(library)
        library.dispose()
        self.anchor = fixtures.now()
        if engine == "sqlite":
            fixtures.fill_sqlite(str(self.path), mix, self.anchor)
        else:
            fixtures.fill_postgres(raw.dsn(self.url), mix, self.anchor)
        self.check()
        say(f"built in {time.perf_counter() - started:.1f} s")

    @property
    def postgres(self) -> bool:
        return self.engine == "postgresql"

    def check(self) -> None:
        """The mix is what it says: the lean query finds each rule's share, and no time is odd."""
        connection = raw.connect(self.url)
        try:
            found = raw.lean_stuck(connection, self.url)
            odd = 0 if self.postgres else fixtures.odd_rows(connection)
        finally:
            connection.close()
        counts = {r: sum(1 for _i, reasons in found if reasons == (r,)) for r in fixtures.REASONS}
        if counts != self.mix.per_reason() or len(found) != self.mix.stuck or odd:
            self.bench.mismatch(f"{self.engine} {self.mix.describe()}: the lean query finds {counts} "
                                f"({len(found)} stuck), odd_times rows {odd}; expected {self.mix.per_reason()}")

    def align(self) -> None:
        """Keep the mix as built: move the running audits' times forward by the time since building."""
        drift = int(fixtures.now() - self.anchor)
        if drift < fixtures.ALIGN_AFTER:
            return
        connection = raw.connect(self.url)
        try:
            if self.postgres:
                with connection.transaction():
                    fixtures.shift_running(connection, True, drift)
                connection.execute("VACUUM ANALYZE audits")
            else:
                connection.execute("BEGIN IMMEDIATE")
                fixtures.shift_running(connection, False, drift)
                connection.execute("COMMIT")
                odd = fixtures.odd_rows(connection)
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                if odd:
                    self.bench.mismatch(f"{odd} rows have odd_times set after shifting times")
        finally:
            connection.close()
        self.anchor += drift

    def copy(self) -> str:
        """A fresh writable copy (file copy on SQLite, CREATE DATABASE ... TEMPLATE on PostgreSQL)."""
        self.align()
        self.bench.copies += 1
        name = f"{self.name}_c{self.bench.copies}"
        if not self.postgres:
            target = self.bench.workdir / f"{name}.db"
            shutil.copyfile(self.path, target)
            return f"sqlite:///{target}"
        for attempt in range(40):
            try:
                return self.bench.server.create_database(name, template=self.name)
            except Exception as error:  # noqa: BLE001 - a session still on the template (just closed)
                if "being accessed" not in str(error) or attempt == 39:
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def drop(self, url: str) -> None:
        if self.postgres:
            self.bench.server.drop_database(url.rsplit("/", 1)[1])
        else:
            path = Path(raw.sqlite_path(url))
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)


# --- helpers ---------------------------------------------------------------------------------


def alternate(repeat: int, library, baseline, between=None) -> tuple[Series, Series]:
    """Run library, baseline, library, baseline, ...; each returns seconds or None (timed here)."""
    lib, base = Series(), Series()
    for _ in range(repeat):
        for fn, series in ((library, lib), (baseline, base)):
            start = time.perf_counter()
            value = fn()
            elapsed = time.perf_counter() - start
            series.samples.append((value if isinstance(value, float) else elapsed) * 1000.0)
            if between:
                between()
    return lib, base


def policy():
    from auditctl.thresholds import Policy, Thresholds

    return Policy.of(Thresholds(stale_after=fixtures.STALE_AFTER, max_age=fixtures.MAX_AGE, stall_after=fixtures.STALL_AFTER))


def size_label(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10) == 0:
            value = n / div
            return f"{value:g}{unit}"
    return f"{n:,}"


def run_quiet(argv, env, stdout=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, check=True)


# --- 1. in-process stuck scan ----------------------------------------------------------------


def scan_pair(bench: Bench, db: Db, repeat: int, with_data: bool = False):
    """(library, lean, mismatch, verdicts, data): ``data`` (with ``with_data``) times the lean query
    returning also the columns scan shows (raw.SCAN_*), alternated with the lean query: what
    carrying a verdict's data costs with no library at all."""
    from auditctl.db import create_engine
    from auditctl.rules import find_stuck

    db.align()
    rules = policy()
    engine = create_engine(db.url, role="reader")
    connection = raw.connect(db.url)
    data = None
    try:
        def library():
            return [(v.id, tuple(v.reasons)) for v in find_stuck(engine, rules)]

        def baseline():
            return raw.lean_stuck(connection, db.url)

        def with_columns():
            return raw.scan_rows(connection, db.url).fetchall()

        lib_result, raw_result = library(), baseline()  # warm: statement caches, page cache
        same = set(lib_result) == set(raw_result) and len(lib_result) == len(raw_result)
        if not same:
            a, b = set(lib_result), set(raw_result)
            bench.mismatch(f"scan on {db.engine} {db.mix.describe()}: library {len(a)} verdicts, raw {len(b)}; "
                           f"only library: {sorted(a - b)[:5]}; only raw: {sorted(b - a)[:5]}")
        lib, base = alternate(repeat, library, baseline)
        if with_data:
            if sorted(row[0] for row in with_columns()) != sorted(i for i, _ in raw_result):
                bench.mismatch(f"scan on {db.engine} {db.mix.describe()}: the lean query with scan's columns "
                               "finds other ids than the lean query")
            data, _ = alternate(repeat, with_columns, baseline)
    finally:
        engine.dispose()
        connection.close()
    return lib, base, not same, len(lib_result), data


def measure_scan(bench: Bench, engine: str, sizes: list[int]) -> None:
    for size in sizes:
        db = bench.db(engine, Mix.of_size(size))
        lib, base, mismatch, found, data = scan_pair(bench, db, bench.args.repeat, with_data=True)
        gated = size >= 100_000
        if size == max(sizes):
            bench.plans.append(f"{engine}, {size_label(size)} audits:\n{raw.explain(db.url)}")
        bench.add(Row("in-process stuck scan", engine, f"{size_label(size)} audits, 1% stuck", lib, base,
                      kind="ratio" if gated else "info", limit=1.5, target="<= 1.5x raw" if gated else "(info)",
                      note=f"{found:,} verdicts", mismatch=mismatch))
        bench.add(Row("in-process stuck scan: the lean query returning scan's columns (no library)", engine,
                      f"{size_label(size)} audits, 1% stuck", data, base, kind="info", target="(info)",
                      note=f"what the data alone costs; the library is {lib.median / data.median:.2f}x this"))


def measure_growth(bench: Bench, engine: str, largest: int) -> None:
    top = Mix.of_size(largest)
    histories = [h for h in (10_000, 100_000, 1_000_000) if h < top.history] + [top.history]
    figures = []
    for history in histories:
        mix = Mix(stuck=top.stuck, healthy=top.healthy, history=history)
        lib, base, mismatch, found, _ = scan_pair(bench, bench.db(engine, mix), bench.args.repeat)
        figures.append((history, lib, base))
        bench.add(Row("stuck scan, history growing", engine, f"{top.running:,} running + {size_label(history)} history",
                      lib, base, kind="info", target="(series)", note=f"{found:,} verdicts", mismatch=mismatch))
    (h0, lib0, raw0), (h1, lib1, raw1) = figures[0], figures[-1]
    growth = lib1.median / lib0.median
    bench.add(Row("stuck scan: history growth", engine, f"history {size_label(h0)} -> {size_label(h1)}", lib1, lib0,
                  kind="flat", limit=1.2, target="flat (<= 1.2x)",
                  note=f"raw grows {raw1.median / raw0.median:.2f}x",
                  cells={"lib": f"{fmt(lib1.median)} ms at {size_label(h1)}", "raw": f"{fmt(lib0.median)} ms at {size_label(h0)}",
                         "ratio_value": growth}))


# --- 2. the whole scan process -------------------------------------------------------------


def scan_modules(bench: Bench, db: "Db") -> Path:
    """What ``auditctl scan --format json`` imports on this engine (captured once per engine)."""
    if db.engine not in bench.modules:
        bench.modules[db.engine] = capture_modules(bench, db.url, db.engine, "scan", "--format", "json")
    return bench.modules[db.engine]


def capture_modules(bench: Bench, url: str, label: str, *argv: str) -> Path:
    listing = bench.workdir / f"modules_{label}.txt"
    subprocess.run([PYTHON, str(BENCH / "imports.py"), "capture", str(listing), "--", *argv, "--database-url", url],
                   env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return listing


def compare_json(bench: Bench, what: str, lib_text: bytes, raw_text: bytes) -> bool:
    lib, base = json.loads(lib_text), json.loads(raw_text)
    problems = []
    if [r["id"] for r in lib] != [r["id"] for r in base]:
        problems.append(f"ids differ ({len(lib)} vs {len(base)} records)")
    # A duration is compared as a duration: the two processes run a moment apart, so "1h" and
    # "1h1m" can both be right.
    digits = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|[smhd])?)+")
    for a, b in zip(lib, base):
        if list(a) != list(b):
            problems.append(f"keys differ on {a.get('id')}: {list(a)} vs {list(b)}")
            break
        for key in a:
            x, y = a[key], b[key]
            if key.endswith("_seconds") and isinstance(x, float) and isinstance(y, float):
                ok = abs(x - y) < 10.0
            elif key == "explanation":
                ok = [digits.sub("#", s) for s in x] == [digits.sub("#", s) for s in y]
            else:
                ok = x == y
            if not ok:
                problems.append(f"{key} differs on {a['id']}: {x!r} vs {y!r}")
                break
        if len(problems) > 3:
            break
    if problems:
        bench.mismatch(f"{what}: " + "; ".join(problems[:4]))
    return not problems


def measure_process(bench: Bench, engine: str, size: int) -> None:
    db = bench.db(engine, Mix.of_size(size))
    db.align()
    modules = scan_modules(bench, db)
    count = len(modules.read_text().split())
    third = len([m for m in modules.read_text().split() if not m.startswith("auditctl")])
    library = [AUDITCTL, "scan", "--format", "json", "--database-url", db.url]
    baseline = [PYTHON, str(BENCH / "rawscan.py"), db.url, str(modules)]
    lib_out = run_quiet(library, bench.env, subprocess.PIPE).stdout
    raw_out = run_quiet(baseline, bench.env, subprocess.PIPE).stdout
    same = compare_json(bench, f"scan --format json on {engine} {size_label(size)}", lib_out, raw_out)
    records = len(json.loads(lib_out))
    lib, base = alternate(bench.args.repeat, lambda: run_quiet(library, bench.env), lambda: run_quiet(baseline, bench.env))
    bench.add(Row("whole `scan --format json` process", engine, f"{size_label(size)} audits, {records:,} stuck", lib, base,
                  limit=1.15, target="<= 1.15x raw", mismatch=not same,
                  note=f"raw imports the same {third} non-auditctl modules (of {count})"))


# --- 3. heartbeats -------------------------------------------------------------------------


class Writers:
    """Heartbeat writer processes (``beatproc.py``), started once and run round by round."""

    def __init__(self, bench: Bench, mode: str, url: str, processes: int, threads: int, seconds: float):
        self.mode, self.procs, self.logs, self.failures = mode, [], [], []
        for i in range(processes):
            log = open(bench.workdir / f"beat_{mode}_{i}.log", "w+")
            self.logs.append(log)
            proc = subprocess.Popen([PYTHON, str(BENCH / "beatproc.py"), mode, url, str(seconds), str(threads)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=bench.env)
            _children.add(proc)
            self.procs.append(proc)
        for proc in self.procs:
            line = proc.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"a {mode} heartbeat writer did not start: {self._why(line, proc)}")

    def _why(self, line: str, proc) -> str:
        try:
            return "; ".join(json.loads(line)["failures"]) or line
        except (ValueError, KeyError):
            return line or f"exited {proc.wait()}"

    def round(self) -> dict:
        """Release every writer at once; their latencies, pooled and sorted."""
        for proc in self.procs:
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        samples, errors, messages = [], 0, []
        for proc in self.procs:
            line = proc.stdout.readline().strip()
            if not line:
                raise RuntimeError(f"a {self.mode} heartbeat writer died: {self._why(line, proc)}")
            result = json.loads(line)
            samples += result["samples"]
            errors += result["errors"]
            messages += result["failures"]
        if messages:
            say(f"heartbeat {self.mode}: {errors} failed beats, e.g. {messages[0]}")
        samples.sort()
        return {"samples": samples, "errors": errors}

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write("STOP\n")
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _children.discard(proc)
        for log in self.logs:
            log.close()


def percentile(sorted_samples: list[float], fraction: float) -> float:
    if not sorted_samples:
        return float("nan")
    return sorted_samples[min(len(sorted_samples) - 1, int(fraction * len(sorted_samples)))]


def measure_heartbeat(bench: Bench, engine: str) -> None:
    db = bench.db(engine, BEAT_MIX)
    url = db.copy()
    seconds = bench.args.beat_seconds
    repeat = bench.args.beat_repeat
    shapes = [(f"{n} writer process{'es' if n > 1 else ''}", n, 1) for n in bench.args.writers]
    shapes.append((f"{max(bench.args.writers)} threads of one guard", 1, max(bench.args.writers)))
    try:
        for label, processes, threads in shapes:
            modes = ("lib", "raw", "stmt")
            figures = {mode: {"p50": Series(), "p99": Series(), "beats": 0, "errors": 0} for mode in modes}
            writers = {}
            try:
                for mode in modes:
                    writers[mode] = Writers(bench, mode, url, processes, threads, seconds)
                for _ in range(repeat):
                    for mode in modes:
                        result = writers[mode].round()
                        figure = figures[mode]
                        figure["p50"].samples.append(percentile(result["samples"], 0.50))
                        figure["p99"].samples.append(percentile(result["samples"], 0.99))
                        figure["beats"] += len(result["samples"])
                        figure["errors"] += result["errors"]
            finally:
                for group in writers.values():
                    group.close()
            lib, base = figures["lib"], figures["raw"]
            rate = f"{lib['beats'] / (repeat * seconds):,.0f} vs {base['beats'] / (repeat * seconds):,.0f} beats/s"
            errors = f"; errors {lib['errors']} vs {base['errors']}" if lib["errors"] or base["errors"] else ""
            for name in ("p50", "p99"):
                bench.add(Row(f"heartbeat {name}", engine, label, lib[name], base[name], limit=1.5, target="<= 1.5x raw",
                              note=(rate + errors) if name == "p50" else ""))
            for name in ("p50", "p99"):
                bench.add(Row(f"heartbeat {name}: the library's statement on the bare driver", engine, label,
                              figures["stmt"][name], base[name], kind="info", target="(info)",
                              note="the database's share of a beat: no library Python"))
    finally:
        db.drop(url)


# --- 4. recovery ----------------------------------------------------------------------------


def measure_recover(bench: Bench, engine: str, repeat: int) -> None:
    from auditctl.db import create_engine
    from auditctl.history import Actor
    from auditctl.recovery import recover_stuck

    db = bench.db(engine, RECOVER_MIX)
    db.align()
    connection = raw.connect(db.url)
    ids = [audit_id for audit_id, _ in raw.lean_stuck(connection, db.url)]
    connection.close()
    counts = {"lib": [], "raw": []}
    states = {}
    rules = policy()

    def library():
        url = db.copy()
        engine_ = create_engine(url)
        start = time.perf_counter()
        done = recover_stuck(engine_, rules, actor=Actor.command("recover"))
        elapsed = time.perf_counter() - start
        engine_.dispose()
        counts["lib"].append(len(done))
        if "lib" not in states:
            states["lib"] = raw.recovery_state(url, ids)
        db.drop(url)
        return elapsed

    def baseline():
        url, changed, elapsed = raw_recovery(db)
        counts["raw"].append(changed)
        if "raw" not in states:
            states["raw"] = raw.recovery_state(url, ids)
        db.drop(url)
        return elapsed

    lib, base = alternate(repeat, library, baseline)
    mismatch = False
    if set(counts["lib"]) != {len(ids)} or set(counts["raw"]) != {len(ids)}:
        mismatch = True
        bench.mismatch(f"recover on {engine}: {len(ids)} stuck; library recovered {counts['lib']}, raw {counts['raw']}")
    elif states["lib"] != states["raw"]:
        mismatch = True
        differ = [i for i in ids if states["lib"].get(i) != states["raw"].get(i)][:3]
        bench.mismatch(f"recover on {engine}: audits end differently, e.g. "
                       + "; ".join(f"{i}: {states['lib'].get(i)} vs {states['raw'].get(i)}" for i in differ))
    size = f"{len(ids):,} stuck of {db.mix.size:,}"
    bench.add(Row("recover stuck audits (+history)", engine, size, lib, base, limit=1.5, target="<= 1.5x raw",
                  mismatch=mismatch, note="same statuses, reasons, record keys, history rows"))
    if engine == "sqlite":
        bench.add(Row("recover stuck audits (+history)", engine, size, Series([s / 1000 for s in lib.samples]), None,
                      unit="s", kind="abs", limit=1.0, target="< 1 s"))


# --- 5. the monitor pass --------------------------------------------------------------------


def measure_monitor(bench: Bench, engine: str, repeat: int) -> None:
    from auditctl.db import create_engine
    from auditctl.history import Actor
    from auditctl.monitor import Monitor

    db = bench.db(engine, QUICK_FLEET_MIX if bench.args.quick else FLEET_MIX)
    rules = policy()
    steady_lib, steady_raw = Series(), Series()
    problems = []

    def library():
        url = db.copy()
        engine_ = create_engine(url)
        monitor = Monitor(engine_, rules, actor=Actor.command("watch"))
        start = time.perf_counter()
        first = monitor.run_pass()
        elapsed = time.perf_counter() - start
        monitor.run_pass()  # writes the all-clear once
        start = time.perf_counter()
        steady = monitor.run_pass()
        steady_lib.samples.append((time.perf_counter() - start) * 1000)
        engine_.dispose()
        db.drop(url)
        if not first.ok or len(first.recovered) != db.mix.stuck or not steady.ok or steady.recovered:
            problems.append(f"library pass: ok={first.ok} recovered {len(first.recovered)} ({first.error}); "
                            f"steady ok={steady.ok} recovered {len(steady.recovered)}")
        return elapsed

    def baseline():
        url, changed, elapsed = raw_recovery(db)
        connection = raw.connect(url)
        start = time.perf_counter()
        left = raw.lean_stuck(connection, url)
        steady_raw.samples.append((time.perf_counter() - start) * 1000)
        connection.close()
        db.drop(url)
        if changed != db.mix.stuck or left:
            problems.append(f"raw pass recovered {changed}, then found {len(left)}")
        return elapsed

    lib, base = alternate(repeat, library, baseline)
    for problem in problems[:2]:
        bench.mismatch(f"monitor on {engine}: {problem}")
    gated = engine == "postgresql"
    common = dict(kind="abs" if gated else "info", limit=1000.0, target="< 1 s" if gated else "(info)", mismatch=bool(problems))
    bench.add(Row("monitor pass (recovers the stuck)", engine, f"{db.mix.running:,} running, {db.mix.stuck} stuck", lib, base,
                  note="raw: lean query + equal-work recovery", **common))
    bench.add(Row("monitor pass (nothing stuck)", engine, f"{db.mix.running:,} running", steady_lib, steady_raw,
                  note="raw: the lean query", **common))


# --- 6. start-up ----------------------------------------------------------------------------


def measure_startup(bench: Bench, repeat: int) -> None:
    from auditctl.db import create_engine
    from auditctl.migrate import upgrade

    empty = bench.workdir / "empty.db"
    engine = create_engine(f"sqlite:///{empty}")
    upgrade(engine)
    engine.dispose()
    url = f"sqlite:///{empty}"
    modules = capture_modules(bench, url, "empty", "scan")
    count = len(modules.read_text().split())
    help_, bare = alternate(repeat, lambda: run_quiet([AUDITCTL, "--help"], bench.env),
                            lambda: run_quiet([PYTHON, "-c", "pass"], bench.env))
    bench.add(Row("`auditctl --help` start-up", "-", "-", help_, bare, kind="delta", limit=50.0, target="<= +50 ms",
                  note="raw: python -c pass"))
    scan, floor = alternate(repeat, lambda: run_quiet([AUDITCTL, "scan", "--database-url", url], bench.env),
                            lambda: run_quiet([PYTHON, str(BENCH / "imports.py"), "floor", str(modules)], bench.env))
    bench.add(Row("`auditctl scan`, empty db", "sqlite", "0 audits", scan, floor, kind="delta", limit=80.0,
                  target="<= +80 ms", note=f"raw: python importing the {count} modules scan imports"))


# --- 7. memory ------------------------------------------------------------------------------


#: Starts the command from a small process: Linux carries the parent's peak RSS into a child's
#: ru_maxrss across fork and exec, so a command spawned straight from this (large) process
#: would report at least this process's size.
_LAUNCH = ("import os, sys\n"
           "pid = os.fork()\n"
           "if pid == 0:\n"
           "    os.execvp(sys.argv[2], sys.argv[2:])\n"
           "_, status, usage = os.wait4(pid, 0)\n"
           "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


def peak_rss(bench: Bench, argv, env) -> tuple[float, int]:
    """(peak RSS in MB, JSON records written) of one process, its output read as it comes."""
    report = bench.workdir / "maxrss.txt"
    proc = subprocess.Popen([PYTHON, "-c", _LAUNCH, str(report), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    _children.add(proc)
    records = 0
    for line in proc.stdout:
        records += line.startswith(b"  {")
    proc.wait()
    _children.discard(proc)
    return int(report.read_text()) / 1024.0, records


def measure_memory(bench: Bench, engine: str, repeat: int) -> None:
    db = bench.db(engine, QUICK_MEMORY_MIX if bench.args.quick else MEMORY_MIX)
    db.align()
    modules = scan_modules(bench, db)
    lib, base, seen = Series(), Series(), set()
    for _ in range(repeat):
        mb, records = peak_rss(bench, [AUDITCTL, "scan", "--format", "json", "--database-url", db.url], bench.env)
        lib.samples.append(mb)
        seen.add(("lib", records))
        mb, records = peak_rss(bench, [PYTHON, str(BENCH / "rawscan.py"), db.url, str(modules)], bench.env)
        base.samples.append(mb)
        seen.add(("raw", records))
    mismatch = seen != {("lib", db.mix.stuck), ("raw", db.mix.stuck)}
    if mismatch:
        bench.mismatch(f"memory on {engine}: records written {sorted(seen)}, expected {db.mix.stuck}")
    bench.add(Row("`scan --format json` peak RSS", engine, f"{db.mix.stuck:,} stuck", lib, base, unit="MB", kind="abs",
                  limit=150.0, target="< 150 MB", mismatch=mismatch, note="raw: rawscan.py (streams the cursor)"))


def attempt(bench: Bench, name: str, engine: str, measure, *args) -> None:
    """Run one measure; a library error is reported as a row (and the rest still runs)."""
    import traceback

    try:
        measure(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        bench.add(Row(name, engine, "-", None, None, kind="info", error=message, note=message))


# --- the run --------------------------------------------------------------------------------


def versions(server) -> list[str]:
    import sqlite3
    from importlib.metadata import version

    lines = [f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
             + ", ".join(f"{name} {version(name)}" for name in ("auditctl", "SQLAlchemy", "psycopg", "click", "rich"))]
    if server is not None:
        try:
            with server._admin() as admin:
                lines.append("PostgreSQL " + admin.execute("SHOW server_version").fetchone()[0]
                             + f" (throwaway cluster: fsync off, synchronous_commit off; {PG_SETTINGS_TEXT})")
        except Exception as error:  # noqa: BLE001
            lines.append(f"PostgreSQL: {error}")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
        lines.append(f"auditctl at commit {commit}" + (" plus uncommitted changes" if changed else ""))
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


PG_SETTINGS = {"shared_buffers": "512MB", "autovacuum": "off"}
PG_SETTINGS_TEXT = "shared_buffers 512MB, autovacuum off (the benchmark runs VACUUM ANALYZE itself)"


def machine() -> str:
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            memory = f", {int(info.readline().split()[1]) / 1024 / 1024:.0f} GB RAM"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--sizes", default=None, help="audits in the scan databases (default 10000,100000,1000000; "
                                                      "--quick: 10000,100000); the largest also sets growth and process")
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated, of: {', '.join(MEASURES)}")
    parser.add_argument("--repeat", type=int, default=None, help="alternating pairs per figure (default 5; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer and shorter runs")
    parser.add_argument("--beat-seconds", type=float, default=None, help="seconds each heartbeat run lasts (default 3)")
    parser.add_argument("--writers", default="1,8,32", help="concurrent heartbeat writers (processes; the largest also "
                                                            "as threads of one guard)")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as Markdown to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (SQLite files, logs)")
    args = parser.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    args.only = [m for m in args.only.split(",") if m]
    unknown = [m for m in args.only if m not in MEASURES] + [e for e in args.engines if e not in ("sqlite", "postgresql")]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    args.sizes = [int(s) for s in (args.sizes or ("10000,100000" if args.quick else "10000,100000,1000000")).split(",")]
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.beat_seconds = args.beat_seconds or (1.0 if args.quick else 3.0)
    args.beat_repeat = 1 if args.quick else min(args.repeat, 3)
    args.writers = [int(w) for w in args.writers.split(",")]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="auditctl-bench-"))
    server = None

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (a background job);
    # SIGTERM and SIGHUP end the run too, and every path below stops the server and the writers.
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = None
    try:
        if "postgresql" in args.engines:
            from pgserver import PostgresServer, unavailable_reason

            reason = unavailable_reason()
            if reason:
                say(f"PostgreSQL skipped: {reason}")
                args.engines.remove("postgresql")
            else:
                server = PostgresServer(settings=PG_SETTINGS)
                server.start()
        bench = Bench(args, workdir, server)
        load_start = load()
        say(f"machine: {machine()}; load average {load_start}")
        if "startup" in args.only:
            attempt(bench, "startup", "-", measure_startup, bench, max(10, 2 * args.repeat) if not args.quick else 6)
        largest = max(args.sizes)
        for engine in args.engines:
            plan = [("scan", measure_scan, (args.sizes,)), ("growth", measure_growth, (largest,)),
                    ("process", measure_process, (largest,)),
                    ("recover", measure_recover, (1 if args.quick else min(args.repeat, 5),)),
                    ("monitor", measure_monitor, (1 if args.quick else min(args.repeat, 3),)),
                    ("memory", measure_memory, (1 if args.quick else 2,)), ("heartbeat", measure_heartbeat, ())]
            for name, measure, extra in plan:
                if name in args.only:
                    attempt(bench, name, engine, measure, bench, engine, *extra)
            say(f"{engine} done; load average {load()}")
        header = [f"Machine: {machine()}. Load average (1, 5, 15 min) at start {load_start}, at end {load()}.",
                  *versions(server),
                  f"Command: python -m tests.bench.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
                  + f" (took {(time.perf_counter() - started) / 60:.1f} min; {args.repeat} alternating pairs per figure)"]
        print("\n".join(header) + "\n")
        print(table(bench.rows))
        missed = [f"#{i + 1}" for i, row in enumerate(bench.rows) if row.result == "MISSED"]
        print(f"\n{sum(r.result == 'MET' for r in bench.rows)} met, {len(missed)} missed ({', '.join(missed) or 'none'}), "
              f"{len(bench.mismatches)} mismatches")
        for message in bench.mismatches:
            print(f"MISMATCH: {message}")
        plans = "The lean query's plan at the largest size:\n\n" + "\n\n".join(bench.plans) if bench.plans else ""
        if plans:
            print("\n" + plans)
        if args.markdown:
            parts = ["\n".join(f"{line}  " for line in header), table(bench.rows, True)]
            if plans:
                parts.append(f"```\n{plans}\n```")
            Path(args.markdown).write_text("\n\n".join(parts) + "\n")
        return 1 if bench.mismatches else 0
    finally:
        for proc in list(_children):
            if proc.poll() is None:
                proc.kill()
        if server is not None:
            server.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
