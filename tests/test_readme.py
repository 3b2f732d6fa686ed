"""README stays true: every ``$ auditctl ...`` example runs, in order, on a fresh embedded
database, exits as documented, and prints what README shows (at 80 columns, with times,
durations and ids normalised: see ``readme_examples``). The library example runs too."""

import re
import subprocess
import sys

import pytest
from readme_examples import EXPECTED_EXIT, README, blocks, run_all, same_line


def test_readme_shows_the_commands_operators_need():
    commands = " ".join(command for _s, _e, examples in blocks(README.read_text()) for command, _ in examples)
    for name in ("init", "demo", "scan", "recover", "reset-all", "watch", "list", "show", "workers", "config", "completion"):
        assert f"auditctl {name}" in commands, f"README shows no example of auditctl {name}"


@pytest.mark.long
def test_every_readme_example_prints_what_readme_shows(tmp_path):
    shown = [(command, output) for _s, _e, examples in blocks(README.read_text()) for command, output in examples
             if command.startswith("auditctl")]
    ran = run_all(tmp_path)
    assert [command for command, _ in shown] == [command for command, _, _ in ran]
    for (command, documented), (_, code, output) in zip(shown, ran):
        assert code == EXPECTED_EXIT.get(command, 0), f"{command!r} exited {code}:\n{output}"
        assert "Traceback" not in output, output
        printed = output.splitlines()
        assert len(printed) == len(documented) and all(map(same_line, printed, documented)), (
            f"{command!r} prints something other than README shows (refresh with python -m tests.readme_examples "
            f"--write):\n{output}")


def test_readme_library_example_runs(tmp_path):
    text = README.read_text()
    example = text.split("## The library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "✅ Stuck audit prevention system initialized" in done.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "auditctl.db") as connection:
        assert connection.execute("SELECT status FROM audits").fetchall() == [("completed",)]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second_exactly():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("```", 1)[0].strip() for block in quick.split("```console\n")[1:]]
    assert len(commands) == 2 and all(commands), f"the quick start must show two commands, it shows {commands!r}"
    install_and_run, test = commands
    assert "pip install" in install_and_run and "auditctl scan" in install_and_run
    assert "pytest" in test
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run README's test command exactly"


def _demo_metrics(tmp_path) -> str:
    from click.testing import CliRunner

    from auditctl.cli import cli

    url = f"sqlite:///{tmp_path / 'auditctl.db'}"
    for args in (["demo"], ["recover", "--metrics-file", tmp_path / "auditctl.prom"]):
        done = CliRunner().invoke(cli, [*map(str, args), "--database-url", url], catch_exceptions=False)
        assert done.exit_code == 0, done.output
    return (tmp_path / "auditctl.prom").read_text()


def test_readme_metrics_example_shows_every_series_the_demo_fleet_writes_when_recovered(tmp_path):
    """README shows the textfile of the demo fleet after ``recover --metrics-file``, HELP lines and buckets
    left out: every series and TYPE line it writes, with its values where they cannot vary, and the
    metrics table names every family. A metric added or renamed in code fails here until README follows."""
    text = README.read_text()
    intro, example = text.split("What the demo fleet looks like after `auditctl recover --metrics-file auditctl.prom`", 1)
    example = example.split("```text\n", 1)[1].split("```", 1)[0]
    shown = [line for line in example.splitlines() if line]
    written = [line for line in _demo_metrics(tmp_path).splitlines()
               if line and not line.startswith("# HELP") and "_bucket{" not in line and not line.endswith("_created")]

    def key(line: str) -> str:
        return line if line.startswith("#") else line.rsplit(" ", 1)[0]

    assert [key(line) for line in shown] == [key(line) for line in written]
    varies = ("_seconds ", "_seconds_sum ", "_duration_seconds ")
    for documented, real in zip(shown, written):
        if not documented.startswith("#") and not any(part in documented for part in varies):
            assert documented == real, "a figure of the demo fleet that does not depend on timing"
    families = {line.split()[2] for line in written if line.startswith("# TYPE")}
    table = text.split("| metric | type | what |", 1)[1].split("\n\n", 1)[0]
    assert {re.sub(r"\{.*", "", cell) for cell in re.findall(r"^\| `([^`]+)`", table, re.M)} == families
