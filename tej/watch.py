"""`tej list --watch`: the queue as a live table on the terminal, as `watch` or `htop` show.

The jobs are asked for every REFRESH seconds over the one connection the
RemoteQueue keeps; the table is drawn on the terminal's alternate screen, which
is left (and the terminal's modes restored) on every exit: `q`, Ctrl-C (then
reported as an interruption, exit code 130, as every command's), or an error,
which is then reported as any other.
"""

from __future__ import annotations

import collections
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from tej.api import JobState, JobStatus
from tej.errors import InvalidInput
from tej.protocol import task_id_parts
from tej.text import cut, display_width, format_bytes, format_elapsed, progress_cell

if TYPE_CHECKING:
    from tej.api import RemoteQueue

REFRESH = 2.0  # seconds between two looks at the queue
TICK = 0.2  # seconds between two looks at the keyboard and the terminal's size
ENTER = "\033[?1049h\033[?25l"  # the alternate screen, the cursor hidden
LEAVE = "\033[?25h\033[?1049l"  # the cursor shown, the screen as it was
HEADER = ("ID", "STATE", "ELAPSED", "MEMORY", "CPU", "PROGRESS")
STATE_ORDER = [state for state in JobState]


def check_terminal() -> None:
    """Refuse to run without a terminal to draw on and to read keys from."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInput(
            "--watch needs a terminal (it draws a live table): "
            "use tej list, or tej list --json, from a script"
        )


def watch(
    remote: RemoteQueue,
    interval: float = REFRESH,
    tasks: bool = False,
    states: Sequence[str] | None = None,
) -> None:
    """Show the queue's jobs (those in states, as RemoteQueue.list picks them), refreshed
    every interval seconds, until q or Ctrl-C (with tasks, each array's tasks after it)."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    resized = [False]

    def on_resize(_signum: int, _frame: object) -> None:
        resized[0] = True

    previous = signal.signal(signal.SIGWINCH, on_resize)
    out = sys.stdout
    try:
        tty.setcbreak(fd)  # keys without Enter; Ctrl-C still interrupts
        out.write(ENTER)
        title = f"tej list --watch: {remote.destination} {remote.queue}"
        if states:
            title += f" ({', '.join(states)})"
        while True:
            jobs = remote.list(states, tasks=tasks)
            next_look = time.monotonic() + interval
            draw(out, title, jobs)
            while time.monotonic() < next_look:
                if quit_key(fd, min(TICK, next_look - time.monotonic())):
                    return
                if resized[0]:
                    resized[0] = False
                    draw(out, title, jobs)
    finally:
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)


def quit_key(fd: int, timeout: float) -> bool:
    """Wait up to timeout for keys; whether q (or Q) was pressed."""
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return False
    keys = os.read(fd, 64)
    return not keys or b"q" in keys.lower()  # no keys: the terminal is gone


def draw(out: TextIO, title: str, jobs: list[JobStatus]) -> None:
    """Draw the whole screen at once: the title, the state counts, the table."""
    size = shutil.get_terminal_size()
    lines = screen_lines(title, jobs, size.columns, size.lines)
    frame = "".join(f"\033[{number};1H\033[2K{line}" for number, line in enumerate(lines, 1))
    out.write(frame + "\033[J")
    out.flush()


def screen_lines(title: str, jobs: list[JobStatus], width: int, height: int) -> list[str]:
    """The screen's lines, each at most width columns, at most height of them."""
    clock = time.strftime("%H:%M:%S")
    top = cut(title, max(width - len(clock) - 1, 0))
    room = width - display_width(top)
    counts = collections.Counter(job.state for job in jobs)
    summary = ", ".join(f"{counts[state]} {state.value}" for state in STATE_ORDER if counts[state])
    lines = [
        top + clock.rjust(room) if room > len(clock) else top,
        cut(f"{len(jobs)} jobs: {summary or 'none'}   (q: quit)", width),
        "",
    ]
    shown = ordered(jobs)
    room = max(height - len(lines) - 1, 0)
    more = len(shown) - room if len(shown) > room else 0
    if more:
        shown = shown[: max(room - 1, 0)]
        more = len(jobs) - len(shown)
    lines += [cut(line, width) for line in table(shown)]
    if more:
        lines.append(cut(f"... and {more} more", width))
    return lines[:height]


def ordered(jobs: list[JobStatus]) -> list[JobStatus]:
    """The jobs that may still run first (oldest first), then the ended ones, newest first,
    by their own state: an array's tasks stay right after it, by index, as in `tej list`."""
    groups: list[list[JobStatus]] = []
    for job in jobs:  # a task follows its array (or its array's other tasks) in the listing
        if groups and task_id_parts(job.id) is not None:
            groups[-1].append(job)
        else:
            groups.append([job])
    active = [group for group in groups if group[0].state.is_active]
    ended = [group for group in groups if not group[0].state.is_active]
    return [job for group in active + ended[::-1] for job in group]


def table(jobs: list[JobStatus]) -> list[str]:
    """The table's lines: a header and one row per job, the progress last."""
    rows = [HEADER]
    for job in jobs:
        resources = job.resources
        memory = resources.memory if resources else None
        cpu = resources.cpu if resources else None
        rows.append(
            (
                job.id,
                job.state.value,
                format_elapsed(job.elapsed) if job.elapsed is not None else "",
                "" if memory is None else format_bytes(memory),
                "" if cpu is None else format_elapsed(round(cpu)),
                progress_cell(job),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER) - 1)]
    return [
        ("  ".join(cell.ljust(size) for cell, size in zip(row, widths)) + "  " + row[-1]).rstrip()
        for row in rows
    ]
