"""The shell completion scripts committed in completions/ stay what ``auditctl completion SHELL`` prints,
and the installed ``auditctl`` answers them with the commands it really has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from auditctl.cli import cli

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"
AUDITCTL = Path(sys.executable).parent / "auditctl"
SHELLS = ["bash", "zsh", "fish"]
REGENERATE = "for s in bash zsh fish; do auditctl completion $s > completions/auditctl.$s; done"


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_script_matches_what_auditctl_prints(shell):
    committed = COMPLETIONS / f"auditctl.{shell}"
    assert committed.is_file(), f"{committed} is missing; generate it with: {REGENERATE}"
    printed = CliRunner().invoke(cli, ["completion", shell], prog_name="auditctl", catch_exceptions=False)
    assert printed.exit_code == 0
    assert committed.read_text(encoding="utf-8") == printed.stdout, (
        f"completions/auditctl.{shell} is out of date with the commands; regenerate with: {REGENERATE}"
    )


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_completion_script_parses_in_its_shell(shell):
    program = shutil.which(shell)
    if program is None:
        pytest.skip(f"{shell} is not installed")
    result = subprocess.run([program, "-n", str(COMPLETIONS / f"auditctl.{shell}")], check=False, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr


def complete(shell_var: str, words: str, cword: str) -> list[str]:
    """Ask the installed auditctl what the shell's completion function would ask it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env.update(_AUDITCTL_COMPLETE=shell_var, COMP_WORDS=words, COMP_CWORD=cword)
    result = subprocess.run([str(AUDITCTL)], env=env, check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_installed_auditctl_completes_every_command_for_bash():
    offered = {line.split(",", 1)[1] for line in complete("bash_complete", "auditctl ", "1")}
    has = {name for name in cli.list_commands(None) if cli.get_command(None, name) is not None}
    assert offered == has, "bash completion must offer exactly the commands auditctl has"


def test_installed_auditctl_completes_a_command_prefix_and_option_values():
    assert complete("bash_complete", "auditctl re", "1") == ["plain,recover", "plain,report", "plain,reset-all"]
    formats = complete("zsh_complete", "auditctl scan --format ", "3")
    assert [formats[i + 1] for i in range(0, len(formats), 3)] == ["table", "wide", "plain", "json", "csv", "markdown"]
    fish = complete("fish_complete", "auditctl w", "w")
    assert [line.split("\t")[0] for line in fish] == ["plain,watch", "plain,workers"]
