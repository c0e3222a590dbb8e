"""Listing a queue's jobs from its index: the rows of `list`, and the ended jobs `prune` takes.

Active jobs are read from their records (their runner has a say: a queued
job's position, a lost supervisor); ended jobs from the rows the index keeps
(index.py), without reading their folders. Asking for active states only
reads no ended job at all.
"""

from ..protocol import ACTIVE_STATES, END_STATES, ERR_INVALID, STATE_LOST, STATE_RUNNING
from .errors import AgentError
from .index import (
    MERGE_SEGMENTS,
    STATES,
    headless_segments,
    ids_in,
    line_head,
    line_row,
    merge_segments,
    read_rows,
    row_line,
    segment_names,
    state_of,
    sync,
    with_head,
    write_segment,
)
from .records import live_status, read_status_record

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


def list_rows(queue, states=None, tasks=False):
    """The rows of the jobs in states (all if None), oldest first: segment lines (index.py).

    An array is one row, with its counts ("array"); with tasks, its tasks' rows in the
    wanted states follow it, by index.
    """
    from .arrays import list_summary
    from .runners.line import settle_places

    wanted = set(STATES) if states is None else set(states)
    lines = []
    active = set()
    scan = None
    if wanted & set(ACTIVE_STATES) or STATE_LOST in wanted or tasks:
        from .usage import ProcessScan

        scan = ProcessScan()  # one scan of /proc for every running job
    if wanted & set(ACTIVE_STATES) or STATE_LOST in wanted:
        listed, unlisted = [], []
        for job_id, job_dir, record in active_records(queue):
            active.add(job_id)
            if record.get("state") in wanted:
                status = live_status(job_id, job_dir, record, scan)
                status["array"] = list_summary(job_dir, record)  # its live counts
                listed.append((job_id, record, status))
            elif record.get("position") and record.get("state") == STATE_RUNNING:
                # a running array's place, which others count from though it is not listed
                # (only a running array's place can be stale: see settle_places)
                unlisted.append(
                    {"position": record["position"], "array": list_summary(job_dir, record)}
                )
        settle_places([status for _, _, status in listed] + unlisted)
        lines += [row_line(*job).rstrip("\n") for job in listed]
    if wanted & set(END_STATES):
        lines += [line for job_id, line in ended_lines(queue.root, wanted) if job_id not in active]
    lines.sort()  # the ended jobs' come sorted already: this costs little
    if tasks:
        lines = with_tasks(queue, lines, wanted, scan)
    return lines


def job_rows(queue, job_id, states=None, tasks=False):
    """The row of one job (in list_rows' form), whatever its state; with tasks, an array's
    tasks' rows in states (all if None) follow it. JobNotFound if there is no such job."""
    from .arrays import list_summary, task_lines
    from .runners.line import settle_places
    from .usage import ProcessScan

    if not isinstance(job_id, str):
        raise AgentError(ERR_INVALID, "job_id must be a job's identifier")
    job_dir = queue.job_dir(job_id)
    record = queue.record(job_id, job_dir)
    scan = ProcessScan()
    status = live_status(job_id, job_dir, record, scan)
    status["array"] = list_summary(job_dir, record)
    settle_places([status])
    lines = [row_line(job_id, record, status).rstrip("\n")]
    if tasks and status["array"] is not None:
        wanted = set(STATES) if states is None else set(states)
        lines += task_lines(queue, job_id, record.get("state"), wanted, scan)
    return lines


def with_tasks(queue, lines, wanted, scan):
    """The lines of a listing, each array's followed by its tasks' in the wanted states."""
    from .arrays import task_lines

    found = []
    for line in lines:
        found.append(line)
        if line.endswith("}]"):  # "array", the last field, is set: an array's row
            parts = line.split("\t", 3)
            found += task_lines(queue, parts[1], parts[2], wanted, scan)
    return found


def active_records(queue):
    """[(id, dir, record)] of the jobs the index says are active, brought up to date by the
    runner.

    A job whose record says it has ended (a writer died before moving it in the
    index, or a supervisor of an older tej wrote it) is moved now.
    """
    jobs = []
    seen = set()  # a job moving on while the folders are listed is seen in two
    for state in ACTIVE_STATES:
        for job_id in ids_in(queue.root, state):
            if job_id in seen:
                continue
            seen.add(job_id)
            job_dir = queue.path("jobs", job_id)
            record = read_status_record(job_dir)
            if record is None or state_of(record) != state:
                record = sync(queue.root, job_id)
                if state_of(record) not in ACTIVE_STATES:
                    continue
            jobs.append((job_id, job_dir, record))
    return [(job[0], job[1], record) for job, record in zip(jobs, refresh_all(queue, jobs))]


def refresh_all(queue, jobs):
    """The records of jobs [(id, dir, record)], brought up to date by the runner."""
    refresh_many = getattr(queue.runner, "refresh_many", None)
    if refresh_many is not None:
        return refresh_many(jobs)
    return [queue.runner.refresh(*job) for job in jobs]


def ended_lines(root, wanted):
    """[(id, segment line)] of the ended jobs in the wanted states, mostly in order.

    A job whose row is missing or says another state is read from its folder
    (and its row written). When every ended job was read, the segments are
    merged if there are many.
    """
    names = segment_names(root)
    rows = read_rows(root, names)
    markers = dict((state, set(ids_in(root, state))) for state in END_STATES if state in wanted)
    found = [
        (job_id, line)
        for job_id, (state, line) in rows.items()
        if state in markers and job_id in markers[state]
    ]
    listed = set(job_id for job_id, _ in found)
    fixed = []
    for ids in markers.values():
        for job_id in ids - listed:
            listed.add(job_id)
            line = read_line(root, job_id)
            if line is not None:
                fixed.append(line + "\n")
                if line.split("\t", 4)[2] in markers:
                    found.append((job_id, line))
    if fixed:
        names.append(write_segment(root, fixed))
    stale = headless_segments(root, names)
    if stale:  # written by an older tej: given their heads, once
        found = [(job_id, with_head(line)) for job_id, line in found]
    if len(markers) == len(END_STATES) and (len(names) > MERGE_SEGMENTS or stale):
        merge_segments(root, names, sorted(line for _, line in found))
    return found


def read_line(root, job_id):
    """The segment line of an ended job, from its folder (its marker moved if it must be,
    its row written); None if it is active."""
    record = sync(root, job_id, with_row=False)
    if state_of(record) not in END_STATES:
        return None
    return row_line(job_id, record, root=root).rstrip("\n")


def batch_text(lines, number, short=False):
    """The rows of a batch of segment lines (the number-th, from 0) as one JSON text;
    short: only their LIST_HEAD values (index.py)."""
    start = number * BATCH_ROWS
    pick = line_head if short else line_row
    return "[%s]" % ",".join(pick(line) for line in lines[start : start + BATCH_ROWS])
