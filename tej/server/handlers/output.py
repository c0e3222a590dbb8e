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


def read_output(connection, queue, job_id, stream, offset, length, wait=0):
    """Read the job's stdout or stderr from offset, waiting up to wait s for new data.

    "ended" says the job had ended before the read: an empty read with
    "ended" set means every byte has been delivered.
    """
    offset = number_arg(offset, "offset", 0, MAX_OFFSET)
    length = int(number_arg(length, "length", 1, MAX_READ))
    wait = number_arg(wait, "wait", 0, MAX_DURATION)
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    path = output_file(job_dir, stream)
    deadline = time.time() + min(wait, MAX_BLOCK)
    while True:
        ended = queue.record(job_id, job_dir).get("state") in END_STATES
        data = read_at(path, int(offset), length)
        if data or ended or time.time() >= deadline:
            return {"data": data, "offset": offset + len(data), "ended": ended}
        time.sleep(POLL_INTERVAL * 5)


def tail_offset(connection, queue, job_id, stream, lines):
    """The offset where the last `lines` lines of the job's output begin."""
    lines = int(number_arg(lines, "lines", 0, MAX_OFFSET))
    job_dir = open_queue(queue, with_runner=False).job_dir(job_id)
    return find_tail(output_file(job_dir, stream), lines)


def output_file(job_dir, stream):
    """The file holding a job's stdout or stderr."""
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
