"""Listing a queue's jobs from its index: the rows of `list`, and the ended jobs `prune` takes.

Active jobs are read from their records (their runner has a say: a queued
job's position, a lost supervisor); ended jobs from the rows the index keeps
(index.py), without reading their folders. Asking for active states only
reads no ended job at all.
"""

import json

from ..protocol import ACTIVE_STATES, END_STATES, ERR_INVALID, STATE_LOST
from .errors import AgentError
from .index import (
    MERGE_SEGMENTS,
    STATES,
    ids_in,
    merge_segments,
    read_rows,
    row_line,
    row_of,
    segment_names,
    state_of,
    sync,
)
from .records import read_status_record

BATCH_ROWS = 5000  # rows per reply of a listing


def check_states(states):
    """The states a listing asks for (None: all), checked."""
    if states is None:
        return None
    if not isinstance(states, list) or not all(state in STATES for state in states):
        raise AgentError(
            ERR_INVALID, "states must be a list of job states (%s)" % ", ".join(STATES)
        )
    return set(states)


def list_rows(queue, states=None):
    """The rows of the jobs in states (all if None), oldest first: [(submitted, id, row JSON)]."""
    wanted = set(STATES) if states is None else set(states)
    found = {}  # type: dict[str, tuple[str, str, str]]
    if wanted & set(ACTIVE_STATES) or STATE_LOST in wanted:
        for job_id, record in active_records(queue):
            if record.get("state") in wanted:
                row = json.dumps(row_of(job_id, record), separators=(",", ":"))
                found[job_id] = (record.get("submitted_at") or "", job_id, row)
    if wanted & set(END_STATES):
        for job_id, (state, _, submitted, row) in ended_rows(queue.root, wanted).items():
            if state in wanted and job_id not in found:
                found[job_id] = (submitted, job_id, row)
    return sorted(found.values())


def active_records(queue):
    """[(id, record)] of the jobs the index says are active, brought up to date by the runner.

    A job whose record says it has ended (a writer died before moving it in the
    index, or a supervisor of an older tej wrote it) is moved now.
    """
    jobs = []
    for state in ACTIVE_STATES:
        for job_id in ids_in(queue.root, state):
            job_dir = queue.path("jobs", job_id)
            record = read_status_record(job_dir)
            if record is None or state_of(record) != state:
                record = sync(queue.root, job_id)
                if state_of(record) not in ACTIVE_STATES:
                    continue
            jobs.append((job_id, job_dir, record))
    return [(job[0], record) for job, record in zip(jobs, refresh_all(queue, jobs))]


def refresh_all(queue, jobs):
    """The records of jobs [(id, dir, record)], brought up to date by the runner."""
    refresh_many = getattr(queue.runner, "refresh_many", None)
    if refresh_many is not None:
        return refresh_many(jobs)
    return [queue.runner.refresh(*job) for job in jobs]


def ended_rows(root, wanted):
    """{id: (state, rev, submitted, row JSON)} of the ended jobs in the wanted states.

    A job whose row is missing or says another state is read from its folder
    (and its row written). When every ended job was read, the segments are
    merged if there are many.
    """
    names = segment_names(root)
    rows = read_rows(root, names)
    found = {}
    every = set(END_STATES) <= wanted
    for state in END_STATES:
        if state not in wanted:
            continue
        for job_id in ids_in(root, state):
            row = rows.get(job_id)
            if row is None or row[0] != state:
                row = read_row(root, job_id)
                if row is None:
                    continue
            found[job_id] = row
    if every and len(names) > MERGE_SEGMENTS:
        merge_segments(root, names, found)
    return found


def read_row(root, job_id):
    """The row of an ended job from its folder (its marker moved if it must be); None if active."""
    record = sync(root, job_id)
    if state_of(record) not in END_STATES:
        return None
    job_id, state, rev, submitted, row = row_line(job_id, record).rstrip("\n").split("\t", 4)
    return state, int(rev), submitted, row


def batches(rows):
    """The rows in replies' batches: JSON texts of lists of rows."""
    for start in range(0, len(rows), BATCH_ROWS):
        yield "[%s]" % ",".join(row for _, _, row in rows[start : start + BATCH_ROWS])
