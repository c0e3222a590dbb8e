"""The agent's local process (ssh, or Python for ``local``), started with posix_spawn.

`tej` starts ssh before it loads anything else (see tej.launcher), and importing
the subprocess module alone would delay that by several milliseconds (it loads
locale, re, enum, threading, selectors...). This module starts the process with
the os module only: pipes for its stdin and stdout, a given file for its stderr,
a session of its own (so that a Ctrl-C in the terminal reaches tej, which then
ends it, rather than ssh directly), and SIGPIPE back to its default action.

Descriptors Python opens are not inheritable (PEP 446); those made inheritable
(by os.dup2, for one) are closed in the child, so it gets only these three.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

#: Signals Python ignores and a child should not (as subprocess's restore_signals).
_DEFAULT_SIGNALS = ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
#: How often wait() with a timeout looks whether the process has ended.
_POLL_INTERVAL = 0.001


class Process:
    """A child process with pipes to its stdin (``stdin``) and from its stdout (``stdout``)."""

    def __init__(self, argv: list[str], stderr: IO[bytes]) -> None:
        """Start argv; OSError if it can't be (FileNotFoundError: no such program)."""
        child_in, self_out = os.pipe()
        try:
            self_in, child_out = os.pipe()
        except OSError:
            os.close(child_in)
            os.close(self_out)
            raise
        _reap_detached()
        try:
            self.pid = _spawn(argv, child_in, child_out, stderr.fileno())
        except BaseException:
            for fd in (self_out, self_in):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self.returncode: int | None = None
        self.stdin = os.fdopen(self_out, "wb")
        self.stdout = os.fdopen(self_in, "rb")

    def __del__(self) -> None:
        # Nobody waited for it: it is reaped when it has ended (as subprocess does).
        if getattr(self, "returncode", 0) is None and self.poll() is None:
            _detached.append(self)

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it has ended, how is unknown
                self.returncode = 255
                return self.returncode
            if pid == self.pid:
                self.returncode = _exit_code(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end; its exit code, or None if timeout seconds pass first."""
        if timeout is None:
            while self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    self.returncode = 255
                except InterruptedError:
                    continue
                else:
                    self.returncode = _exit_code(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_POLL_INTERVAL, left))
        return self.returncode

    def kill(self) -> None:
        """Kill the process (SIGKILL) unless it has ended already."""
        if self.poll() is None:
            try:  # noqa: SIM105 - contextlib would load before ssh starts
                os.kill(self.pid, 9)  # SIGKILL: the signal module would load enum
            except ProcessLookupError:
                pass


def _inheritable_descriptors() -> list[int]:
    """This process's descriptors above stderr that a child would inherit (few, usually)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found = []
        for fd in (int(name) for name in names if name.isdigit()):
            try:
                if fd > 2 and os.get_inheritable(fd):
                    found.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return found
    return []


#: Processes dropped while still running; reaped when another one starts.
_detached: list[Process] = []


def _reap_detached() -> None:
    """Reap the dropped processes that have ended since (so none is left a zombie)."""
    for process in list(_detached):
        if process.poll() is not None:
            _detached.remove(process)


def _exit_code(status: int) -> int:
    """A wait status as an exit code: negative for a signal (os.waitstatus_to_exitcode, 3.9+)."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _spawn(argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """Start argv (found on PATH) with these descriptors as 0, 1 and 2; its pid."""
    import _signal  # type: ignore[import-not-found]  # signal would load enum

    moved: list[int] = []  # copies of sources that are 0, 1 or 2 (tej's own were closed)
    try:
        sources = [_above_stderr(fd, moved) for fd in (stdin, stdout, stderr)]
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(sources)
        ]
        closefrom = getattr(os, "POSIX_SPAWN_CLOSEFROM", None)  # Python 3.13+
        if closefrom is not None:
            actions.append((closefrom, 3))
        else:
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_descriptors()]
        defaults = [getattr(_signal, name) for name in _DEFAULT_SIGNALS if hasattr(_signal, name)]
        try:
            return os.posix_spawnp(
                argv[0], argv, os.environ, file_actions=actions, setsid=True, setsigdef=defaults
            )
        except NotImplementedError:  # no POSIX_SPAWN_SETSID here: a process group will do
            return os.posix_spawnp(
                argv[0], argv, os.environ, file_actions=actions, setpgroup=0, setsigdef=defaults
            )
    finally:
        for fd in moved:
            os.close(fd)


def _above_stderr(fd: int, moved: list[int]) -> int:
    """fd, or a copy of it above 2 if it is 0, 1 or 2 (its dup2 would clobber the others)."""
    if fd > 2:
        return fd
    import fcntl

    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    moved.append(copy)
    return copy
