"""README's examples stay true: every ``$ auditctl ...`` line it shows is run, in order, on a
fresh embedded database, and must exit as documented; where README shows a table, the
real output has the same header."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent

#: Exit codes README documents for particular examples (everything else exits 0).
EXPECTED = {"auditctl reset-all < /dev/null": 4}


def examples():
    """(command, the header line README shows right after it, or None)."""
    lines = README.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        if line.startswith("$ auditctl"):
            following = lines[number + 1] if number + 1 < len(lines) else ""
            header = following if re.match(r"^[A-Z][A-Z ]+\s{2,}[A-Z]", following) else None
            found.append((line[2:], header))
    return found


def test_readme_shows_the_commands_operators_need():
    commands = " ".join(command for command, _ in examples())
    for name in ("init", "demo", "scan", "recover", "reset-all", "watch", "list", "show", "workers", "config", "completion"):
        assert f"auditctl {name}" in commands, f"README shows no example of auditctl {name}"


def test_every_readme_example_runs_as_documented(tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "120", "LANG": "C.UTF-8"}
    (tmp_path / ".local/share/bash-completion/completions").mkdir(parents=True)
    for command, header in examples():
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == EXPECTED.get(command, 0), f"{command!r} exited {done.returncode}: {done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        if header is not None:
            assert header.split() == next(
                (line.split() for line in done.stdout.splitlines() if line.split()[:1] == header.split()[:1]), None
            ), f"{command!r}: README's header {header!r} is not what the command prints:\n{done.stdout}"


def test_readme_library_example_runs(tmp_path):
    text = README.read_text()
    example = text.split("## The library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "✅ Stuck audit prevention system initialized" in done.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "auditctl.db") as connection:
        assert connection.execute("SELECT status FROM audits").fetchall() == [("completed",)]
