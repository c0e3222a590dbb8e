"""A job's output: reading it as it grows, and finding where its last lines begin."""

import os
import time

from ...protocol import (
    END_STATES,
    ERR_BAD_REQUEST,
    ERR_INVALID,
    MAX_BLOCK,
    MAX_DURATION,
    MAX_OFFSET,
    MAX_READ,
)
from ..errors import AgentError, number_arg
from ..files import POLL_INTERVAL, read_at, read_json
from ..jobs import output_path
from ..layout import JOB_FILE
from ..queue import open_queue
from ..records import read_status_record


def read_output(connection, queue, job_id, stream, offset, length, wait=0, attempt=None):
    """Read the job's stdout or stderr from offset, waiting up to wait s for new data.

    attempt: the output of that attempt (1 for the first; None: the current
    one). "ended" says the attempt had ended before the read: an empty read
    with "ended" set means every byte of it has been delivered. "attempt" is
    the attempt read, "attempts" how many the job has had so far.
    """
    offset = number_arg(offset, "offset", 0, MAX_OFFSET)
    length = int(number_arg(length, "length", 1, MAX_READ))
    wait = number_arg(wait, "wait", 0, MAX_DURATION)
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    path = output_file(job_dir, stream)
    deadline = time.time() + min(wait, MAX_BLOCK)
    while True:
        record = queue.record(job_id, job_dir)
        count = len(record.get("attempts") or [])
        number = count if attempt is None else attempt_arg(attempt, count)
        ended = record.get("state") in END_STATES or number < count
        data = read_attempt(path, number, count, int(offset), length)
        if data or ended or time.time() >= deadline:
            reply = {"data": data, "offset": offset + len(data), "ended": ended}
            reply.update(attempt=number, attempts=count)
            return reply
        time.sleep(POLL_INTERVAL * 5)


def tail_offset(connection, queue, job_id, stream, lines, attempt=None):
    """The offset where the last `lines` lines of the job's output (of attempt) begin."""
    lines = int(number_arg(lines, "lines", 0, MAX_OFFSET))
    job_dir = open_queue(queue, with_runner=False).job_dir(job_id)
    path = output_file(job_dir, stream)
    if attempt is None:
        return find_tail(path, lines)
    count = len((read_status_record(job_dir) or {}).get("attempts") or [])
    return find_tail(attempt_path(path, attempt_arg(attempt, count), count), lines)


def attempt_arg(attempt, count):
    """Check the number of an attempt the job has had (count so far)."""
    attempt = int(number_arg(attempt, "attempt", 1, MAX_OFFSET))
    if attempt > max(count, 1):
        raise AgentError(
            ERR_INVALID, "This job has had %d attempts: there is no attempt %d" % (count, attempt)
        )
    return attempt


def attempt_path(path, number, count):
    """Where the output of attempt number is: path.NUMBER once a later one began."""
    kept = "%s.%d" % (path, number)
    if number < count and os.path.exists(kept):
        return kept
    return path


def read_attempt(path, number, count, offset, length):
    """Read an attempt's output at offset (its file is renamed when the next one begins)."""
    if number < count:
        return read_at(attempt_path(path, number, count), offset, length)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        renamed = "%s.%d" % (path, number)
        if os.path.exists(renamed) and os.stat(renamed).st_ino != os.fstat(fd).st_ino:
            return read_at(renamed, offset, length)  # the next attempt began meanwhile
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def output_file(job_dir, stream):
    """The file holding a job's stdout or stderr (of its current attempt)."""
    if stream not in ("stdout", "stderr"):
        raise AgentError(ERR_BAD_REQUEST, "stream must be stdout or stderr")
    path = output_path(job_dir, read_json(os.path.join(job_dir, JOB_FILE)), stream)
    if path is None:
        raise AgentError(ERR_INVALID, "This job's %s is discarded" % stream)
    return path


def find_tail(path, lines):
    """The offset of the start of the last `lines` lines of a file."""
    try:
        with open(path, "rb") as stream:
            return tail_start(stream, lines)
    except FileNotFoundError:
        return 0


def tail_start(stream, lines):
    """The offset of the start of the last `lines` lines of an open binary file."""
    end = position = stream.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    while position > 0:
        size = min(65536, position)
        position -= size
        stream.seek(position)
        block = stream.read(size)
        if position + size == end and block.endswith(b"\n"):
            block = block[:-1]  # the final newline ends the last line, starts none
        index = len(block)
        while lines > 0:
            index = block.rfind(b"\n", 0, index)
            if index < 0:
                break
            lines -= 1
        if lines == 0:
            return position + index + 1
    return 0


HANDLERS = {"read_output": read_output, "tail_offset": tail_offset}
