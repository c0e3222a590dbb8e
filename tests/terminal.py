"""A real terminal for tests of what tej draws on a screen: a tmux session, read back."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from helpers import wait_for_value


class Terminal:
    """A tmux session (its own server) running a shell, read back as its screen shows."""

    def __init__(self, socket: Path, env: dict[str, str], cwd: Path) -> None:
        self.socket = str(socket)
        # A fixed COLUMNS or LINES (pytest-xdist's workers have them) would hide the pane's size.
        shell_env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
        shell_env.update(PS1="$ ", TERM="xterm-256color")
        self.tmux("new-session", "-d", "-s", "t", "-x", "150", "-y", "30", "sh", env=shell_env)
        self.run(f"cd {shlex.quote(str(cwd))}")

    def tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-S", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        return done.stdout

    def run(self, command: str) -> None:
        """Type a command line and Enter."""
        self.tmux("send-keys", "-t", "t", "-l", command)
        self.tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        """What the pane shows now."""
        return self.tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, predicate: Any, message: str, timeout: float = 30.0) -> str:
        """Poll the screen until predicate(screen) holds; return that screen."""
        return wait_for_value(self.screen, predicate, timeout, message)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)
