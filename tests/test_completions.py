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


def _shell_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDITCTL_")}
    env.update(PATH=f"{AUDITCTL.parent}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp_path), LANG="C.UTF-8")
    return env


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.parametrize("line, completed", [
    ("auditctl --database-url sqlite:///k.db scan --for", "auditctl --database-url sqlite:///k.db scan --format"),
    ("auditctl --database-url postgresql://bob@db:5432/audits recover --dry", "recover --dry-run"),
    ("auditctl scan --database-url sqlite:///k.db --rev", "scan --database-url sqlite:///k.db --reverse"),
])
def test_bash_completes_after_a_database_url_whose_colon_bash_splits_at(tmp_path, line, completed):
    from terminal import Terminal

    rc = tmp_path / "bashrc"
    rc.write_text(f"PS1='$ '\nsource {COMPLETIONS / 'auditctl.bash'}\n")
    with Terminal(tmp_path, width=200, height=10, env=_shell_env(tmp_path)) as term:
        term.run("bash", "--noprofile", "--rcfile", str(rc), "-i")
        term.wait_for(lambda screen: "$" in screen, message="the prompt")
        term.keys("-l", line)
        term.keys("Tab")
        term.wait_for(lambda screen: completed in screen, message=f"{completed!r} completed", timeout=10)


def test_fish_shows_each_commands_help_whole_not_cut_at_a_comma(tmp_path):
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")
    done = subprocess.run([fish, "--no-config", "-c", f"source {COMPLETIONS / 'auditctl.fish'}; complete -C 'auditctl re'"],
                          env=_shell_env(tmp_path), check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    offered = dict(line.split("\t", 1) for line in done.stdout.splitlines())
    assert offered["recover"] == "Recover stuck audits: mark them failed, or requeue them."


@pytest.mark.parametrize("command", sorted(name for name in cli.list_commands(None) if name != "completion"))
def test_config_after_the_command_completes_file_names_when_before_it_does(command):
    """README: ``--config PATH`` is taken before or after the command name. Before it, Tab offered the
    files; after it, nothing, as if the option took no path."""
    assert complete("bash_complete", "auditctl --config ", "2") == ["file,"]
    assert complete("bash_complete", f"auditctl {command} --config ", "3") == ["file,"]
