"""How tej writes a job's state for people: the lines of `tej status`, sizes and times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tej.api import ArrayStatus, JobState, JobStatus

if TYPE_CHECKING:
    from datetime import datetime


def format_elapsed(seconds: float | None) -> str:
    """Elapsed time as H:MM:SS."""
    total = int(seconds or 0)
    text = _ELAPSED.get(total)
    if text is None:  # `tej list` of many jobs formats the same few values again and again
        text = _ELAPSED[total] = f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"
    return text


_ELAPSED: dict[int, str] = {}


def format_bytes(count: int) -> str:
    """A size for people: 512 B, 9.8 MB, 310 MB, 1.9 GB (units of 1024)."""
    value, unit = float(count), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"


def describe_usage(status: JobStatus) -> str:
    """`; peak memory 1.9 GB, CPU 0:47:10` (`memory` while it runs), or "" if unknown."""
    resources = status.resources
    if resources is None:
        return ""
    parts = []
    if resources.max_rss is not None:
        parts.append(f"peak memory {format_bytes(resources.max_rss)}")
    elif resources.rss is not None:
        parts.append(f"memory {format_bytes(resources.rss)}")
    if resources.cpu is not None:
        parts.append(f"CPU {format_elapsed(round(resources.cpu))}")
    return "; " + ", ".join(parts) if parts else ""


# The order an array's counts are given in: ended tasks first, then those still to end.
COUNT_ORDER = (
    *("finished", "killed", "timed_out", "lost", "cancelled"),
    *("running", "starting", "scheduled", "queued"),
)


def describe_array(status: ArrayStatus) -> str:
    """`Array is running: 40 finished, 8 running, 52 queued (0:12:31)`, with its position
    while tasks of it wait in the queue's line (`, position 1 of 3`); an ended one's exit
    code (0: every task finished with 0; else the first failed task's, by index)."""
    counts = describe_counts(status.counts)
    text = f"Array is {status.state.value.replace('_', ' ')}: {counts} "
    text += f"({format_elapsed(status.elapsed)})"
    if status.position:  # its tasks still to start wait in the queue's line
        text += f", position {status.position[0]} of {status.position[1]}"
    if status.state is JobState.LOST:
        return f"{text} ({status.reason or 'unknown reason'})"
    if not status.state.is_active and status.exit_code is not None:
        return f"{text} with exit code {status.exit_code}"
    return text


def describe_counts(counts: Mapping[str, int]) -> str:
    """`40 finished, 8 running, 52 queued`: an array's tasks per state."""
    return ", ".join(
        f"{counts[state]} {state.replace('_', ' ')}" for state in COUNT_ORDER if counts.get(state)
    )


def array_cell(array: Mapping[str, Any] | None) -> str:
    """What `tej list` shows of an array in its PROGRESS column (a job: "")."""
    if not array:
        return ""
    return f"array of {array['size']}: {describe_counts(array.get('counts') or {})}"


def progress_cell(job: JobStatus) -> str:
    """A job's PROGRESS cell in `tej list`: its progress; an array's size and counts."""
    if isinstance(job, ArrayStatus):
        return array_cell({"size": job.size, "counts": job.counts})
    return job.progress or ""


def describe_status(status: JobStatus, width: int | None = None) -> str:
    """The one-line text of `tej status`; width cuts the job's progress to fit a terminal."""
    if isinstance(status, ArrayStatus):
        return describe_array(status)
    state, usage = describe_state(status), describe_usage(status)
    if status.state is not JobState.RUNNING or not status.progress:
        return state + usage
    room = None if width is None else width - 1 - display_width(state + usage) - 2
    if room is not None and room < 4:
        return state + usage
    return f"{state}: {cut(status.progress, room)}{usage}"


def display_width(text: str) -> int:
    """The columns text takes on a terminal: East Asian wide and fullwidth characters
    (emoji among them) take 2, combining marks 0, the others 1."""
    if text.isascii():  # most of what tej shows: no need to look at each character
        return len(text)
    return sum(char_width(char) for char in text)


def char_width(char: str) -> int:
    """The columns one character takes on a terminal (see display_width)."""
    import unicodedata  # here: a command that shows only ASCII doesn't load it

    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def cut(text: str, width: int | None) -> str:
    """text, cut to width columns (its end replaced by ...) if it takes more (display_width):
    a character is never split from its combining marks, nor a wide one cut in half."""
    if width is None or display_width(text) <= width:
        return text
    room, mark = (width - 3, "...") if width > 3 else (max(width, 0), "")
    used = 0
    for end, char in enumerate(text):
        used += char_width(char)
        if used > room:  # its combining marks (0 columns) went with the character before
            return text[:end] + mark
    return text


def describe_state(status: JobStatus) -> str:
    """What `tej status` says of a job's state, time and attempts, without usage or progress."""
    text = describe_attempt(status, format_elapsed(status.elapsed))
    if status.attempt > 1 and not status.state.is_active:
        return f"{text} after {status.attempt} attempts"
    return text


def describe_attempt(status: JobStatus, elapsed: str) -> str:
    """The state part of `tej status`'s line (describe_state adds the attempts' count)."""
    tries = status.max_attempts or 1
    if status.state is JobState.RUNNING and status.retry_at is not None:
        return (
            f"Job is waiting to retry (attempt {status.attempt + 1} of {tries} "
            f"at {format_local(status.retry_at)})"
        )
    if status.state is JobState.RUNNING and tries > 1:
        return f"Job is running (attempt {status.attempt} of {tries}, {elapsed})"
    if status.state is JobState.RUNNING:
        return f"Job is still running ({elapsed})"
    if status.state is JobState.STARTING:
        return "Job is starting"
    if status.state is JobState.QUEUED:
        if status.position:
            return f"Job is queued (position {status.position[0]} of {status.position[1]})"
        return f"Job is queued ({status.reason})" if status.reason else "Job is queued"
    if status.state is JobState.CANCELLED:
        return f"Job was cancelled ({status.reason or 'unknown reason'})"
    if status.state is JobState.FINISHED:
        text = f"Job is finished ({elapsed}) with exit code {status.exit_code}"
        return f"{text} ({status.reason})" if status.reason else text  # such as a failed start
    if status.state is JobState.SCHEDULED:
        return f"Job is scheduled to start at {format_local(status.scheduled_for)}"
    if status.state is JobState.TIMED_OUT:
        return f"Job timed out after {elapsed}"
    if status.state is JobState.KILLED and status.started_at is None:
        return "Job was cancelled before it started"
    if status.state is JobState.KILLED:
        return f"Job was killed ({elapsed})"
    return f"Job was lost ({status.reason or 'unknown reason'})"


def format_local(when: datetime | None) -> str:
    """A time in the local time zone, as YYYY-MM-DD HH:MM:SS TZ."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if when else "an unknown time"
