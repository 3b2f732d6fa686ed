"""README's console examples: run them, compare them, and (with --write) refresh them.

Every ```console block in README.md holds ``$ command`` lines, each followed by the output
it prints. This module runs every command in order, in a fresh directory, at 80 columns
(what a terminal shows; plain output fits it), and compares what it printed with what
README shows. Times, durations, ids and pids differ from run to run, so both sides are
normalised first (see ``normalise``); everything else must match line for line.

    python -m tests.readme_examples --write    # run the examples and put their real output in README
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent

#: Exit codes README documents for particular examples (everything else exits 0).
EXPECTED_EXIT = {"auditctl reset-all < /dev/null": 4, "auditctl scan --exit-code -q": 3}

_VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?Z?"), "<time>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<clock>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    (re.compile(r"\b[0-9a-f]{8}\b"), "<id>"),
    (re.compile(r"\b\d+(\.\d+)?(ms|s|m|h|d)(\d+(s|m|h))?\b"), "<dur>"),
    (re.compile(r'("pid": |pid )\d+'), r"\1<pid>"),
    (re.compile(r'"(age|silence|stalled)_seconds": [\d.]+'), r'"\1_seconds": <n>'),
    (re.compile(r'"(heartbeat_age|created_age)_seconds": [\d.]+'), r'"\1_seconds": <n>'),
    # The demo's gaps are the milliseconds between two of its own writes: 0.0 or 0.003 by chance.
    (re.compile(r'"longest_(gap|stall)_seconds": [\d.]+'), r'"longest_\1_seconds": <n>'),
    (re.compile(r'"host": "[^"]*"'), '"host": "<host>"'),
    (re.compile(r"\b\d+\.\d{4,}\b"), "<n>"),
    (re.compile(r"\bvm\b|\b" + re.escape(os.uname().nodename) + r"\b"), "<host>"),
]


def normalise(line: str) -> str:
    """A line with what changes between runs replaced, and runs of spaces collapsed (alignment follows widths)."""
    for pattern, replacement in _VOLATILE:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def same_line(printed: str, documented: str) -> bool:
    """Normalised lines that match, where a cell cut to fit ("scan-node-1.example.inte...") matches the
    whole value: how much of a column fits depends on how wide the durations beside it are this run."""
    ours, theirs = normalise(printed).split(" "), normalise(documented).split(" ")
    if len(ours) != len(theirs):
        return False
    for one, other in zip(ours, theirs):
        if one == other:
            continue
        cut = [word[:-3] for word in (one, other) if word.endswith("...")]
        if not cut or not all(one.startswith(stem) and other.startswith(stem) for stem in cut):
            return False
    return True


def blocks(text: str) -> list[tuple[int, int, list[tuple[str, list[str]]]]]:
    """Each console block: (first line, last line, [(command, output lines)])."""
    lines = text.splitlines()
    found, number = [], 0
    while number < len(lines):
        if lines[number].strip() == "```console":
            start = number + 1
            end = start
            while lines[end].strip() != "```":
                end += 1
            examples: list[tuple[str, list[str]]] = []
            for line in lines[start:end]:
                if line.startswith("$ "):
                    examples.append((line[2:], []))
                elif examples:
                    examples[-1][1].append(line)
            found.append((start, end, examples))
            number = end
        number += 1
    return found


def environment(home: Path) -> dict:
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "COLUMNS": "80", "LANG": "C.UTF-8", "TERM": "dumb",
            "XDG_CONFIG_HOME": str(home / ".config")}


def run_all(workdir: Path) -> list[tuple[str, int, str]]:
    """Run every example in README order; returns (command, exit code, stdout + stderr as a person sees it)."""
    (workdir / ".local/share/bash-completion/completions").mkdir(parents=True, exist_ok=True)
    results = []
    for _start, _end, examples in blocks(README.read_text()):
        for command, _shown in examples:
            if not command.startswith("auditctl"):
                continue
            done = subprocess.run(["bash", "-c", command + " 2>&1"], cwd=workdir, env=environment(workdir),
                                  capture_output=True, text=True, timeout=120)
            results.append((command, done.returncode, done.stdout.rstrip("\n")))
    return results


def write() -> int:
    """Run every example and put its real output under it in README; returns how many ran."""
    text = README.read_text()
    with tempfile.TemporaryDirectory() as directory:
        results = run_all(Path(directory))
    lines = text.splitlines()
    index = len(results)
    # Rewrite from the last block to the first, so earlier line numbers stay valid.
    for start, end, examples in reversed(blocks(text)):
        if not examples:
            continue  # a block of plain commands (the quick start): not an example to run here
        runnable = [command for command, _ in examples if command.startswith("auditctl")]
        outputs = iter(results[index - len(runnable):index])
        index -= len(runnable)
        rendered = []
        for command, shown in examples:
            rendered.append(f"$ {command}")
            if command.startswith("auditctl"):
                ran, _code, output = next(outputs)
                assert ran == command
                rendered.extend(output.splitlines() if output else [])
            else:
                rendered.extend(shown)
        lines[start:end] = rendered
    README.write_text("\n".join(lines) + "\n")
    return len(results)


if __name__ == "__main__":
    if "--write" in sys.argv:
        print(f"README: {write()} examples refreshed")
