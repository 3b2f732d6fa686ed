"""A real terminal for tests: a private tmux server, a pane running a command, and its screen.

    with Terminal(tmp_path, width=80, height=24) as term:
        term.run("auditctl", "watch")
        term.wait_for(lambda screen: "STUCK" in screen)
        term.keys("C-c")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path


def available() -> bool:
    return shutil.which("tmux") is not None


class Terminal:
    def __init__(self, workdir: Path, *, width: int = 80, height: int = 24, env: dict | None = None):
        self.workdir = Path(workdir)
        self.width, self.height = width, height
        self.socket = f"auditctl-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.config = self.workdir / f"{self.socket}.conf"
        self.config.write_text("set -g remain-on-exit on\nset -g status off\n")
        self.env = {**(env or os.environ), "LANG": "C.UTF-8"}
        self.exit_file = self.workdir / f"{self.socket}.exit"

    def tmux(self, *args) -> str:
        done = subprocess.run(["tmux", "-u", "-L", self.socket, "-f", str(self.config), *args], env=self.env, check=False,
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def run(self, *command: str, term: str = "xterm-256color") -> None:
        """Start the command in a pane of the terminal's size; its exit status lands in ``exit_code``."""
        # bash waits for a child that handles Ctrl-C itself, then records how it ended.
        self.tmux("new-session", "-d", "-s", "main", "-x", str(self.width), "-y", str(self.height), "-c", str(self.workdir),
                  "bash", "-c", 'out="$1"; shift; "$@"; echo $? > "$out"', "wrapper", str(self.exit_file),
                  "env", f"TERM={term}", *command)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main")

    def dead(self) -> bool:
        return self.tmux("display-message", "-p", "-t", "main", "#{pane_dead}").strip() == "1"

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "main", *keys)

    def wait_for(self, predicate, *, timeout: float = 20.0, message: str = "the screen") -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if predicate(shown):
                return shown
            if self.dead():
                # It may have ended between the look and this check: one last look at what it left.
                shown = self.screen()
                assert predicate(shown), f"the program ended before {message}:\n{shown}"
                return shown
            assert time.monotonic() < deadline, f"timed out waiting for {message}:\n{shown}"
            time.sleep(0.05)

    @property
    def exit_code(self) -> int | None:
        if not self.exit_file.exists() or not self.exit_file.read_text().strip():
            return None
        return int(self.exit_file.read_text().strip())

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, check=False, capture_output=True, timeout=10)
        Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.socket).unlink(missing_ok=True)

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
