"""A queue's jobs: status, list, wait, kill, delete."""

import json
import os

from ...protocol import (
    ACTIVE_STATES,
    END_STATES,
    ERR_JOB_NOT_FOUND,
    ERR_JOB_RUNNING,
    KILL_GRACE,
    MAX_BLOCK,
    MAX_DURATION,
    STATE_LOST,
    STATE_QUEUED,
)
from ..errors import AgentError, number_arg
from ..files import make_private_dir, randrange
from ..layout import JOBS_DIR, LIST_CACHE, TRASH_DIR
from ..listcache import LIST_FIELDS, ListCache
from ..queue import open_queue
from ..records import (
    job_metadata,
    job_status,
    live_status,
    missing_status,
    public_status,
    read_status_record,
    wait_for_state,
)
from ..runners import runner_tick
from ..usage import ProcessScan


def status(connection, queue, job_id):
    """The status of one job, with the metadata it was submitted with."""
    queue = open_queue(queue)
    return job_status(queue, job_id, queue.job_dir(job_id))


def wait(connection, queue, job_id, timeout):
    """Block until the job ends or timeout seconds pass (at most MAX_BLOCK)."""
    timeout = number_arg(timeout, "timeout", 0, MAX_DURATION)
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    record = wait_for_state(queue, job_id, job_dir, END_STATES, min(timeout, MAX_BLOCK))
    return live_status(job_id, job_dir, record)


def list_jobs(connection, queue):
    """The status of every job, oldest first: {"fields": names, "rows": JSON of values}.

    Without metadata (see status). Ended jobs come from the list cache
    while their status file is unchanged; the others from their runner.
    """
    queue = open_queue(queue)
    runner_tick(queue)
    cache = ListCache(queue.path(LIST_CACHE))
    rows, pending = [], []
    jobs = queue.path(JOBS_DIR) + "/"  # ids are single path components
    for name in queue.job_ids():
        job_dir = jobs + name
        key = cache.key(job_dir)
        row = cache.get(name, key)
        if row is not None:
            rows.append(row)
            continue
        record = read_status_record(job_dir)
        if record is not None or os.path.isdir(job_dir):
            pending.append((name, job_dir, record or missing_status(), key))
    scan = ProcessScan()  # one scan of /proc for every running job
    for (name, job_dir, written, key), record in zip(pending, refresh_all(queue, pending)):
        row = [live_status(name, job_dir, record, scan)[field] for field in LIST_FIELDS]
        rows.append(row)
        if key is not None and written.get("state") in END_STATES:
            cache.put(name, key, row)
    cache.save()
    submitted, ident = LIST_FIELDS.index("submitted_at"), LIST_FIELDS.index("id")
    rows.sort(key=lambda row: (row[submitted] or "", row[ident]))
    # As JSON text: thousands of rows go faster as one string than as execnet objects.
    return {"fields": LIST_FIELDS, "rows": json.dumps(rows)}


def refresh_all(queue, jobs):
    """The records of jobs [(id, dir, record, ...)], brought up to date by the runner."""
    jobs = [job[:3] for job in jobs]
    refresh_many = getattr(queue.runner, "refresh_many", None)
    if refresh_many is not None:
        return refresh_many(jobs)
    return [queue.runner.refresh(*job) for job in jobs]


def kill(connection, queue, job_id):
    """Kill a job (through its runner); reports whether this call killed it."""
    queue = open_queue(queue)
    return kill_job(queue, job_id)


def kill_job(queue, job_id):
    """Kill a job of an open queue: {"killed": whether this call killed it, "status": ...}."""
    job_dir = queue.job_dir(job_id)
    grace = float(job_metadata(job_dir, job_id).get("kill_grace", KILL_GRACE))
    killed, record = queue.runner.kill(job_id, job_dir, queue.record(job_id, job_dir), grace)
    runner_tick(queue)
    return {"killed": killed, "status": public_status(job_id, record)}


def delete(connection, queue, job_id, force=False):
    """Delete a job's directory; a running job only with force (killed first)."""
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    state = queue.record(job_id, job_dir).get("state")
    if state in ACTIVE_STATES and not force:
        raise AgentError(
            ERR_JOB_RUNNING,
            "Job %r is still %s: kill it first (tej kill), or delete with --force"
            % (job_id, "queued" if state == STATE_QUEUED else "running"),
        )
    if state in ACTIVE_STATES or state == STATE_LOST:
        result = kill_job(queue, job_id)  # a lost job may have processes left
        if result["status"]["state"] in ACTIVE_STATES:
            raise AgentError(
                ERR_JOB_RUNNING,
                "Job %r is being killed (its grace period is long): delete it once it has "
                "ended" % job_id,
            )
    runner_tick(queue)  # first, so that jobs waiting for this one know how it ended
    trash = queue.path(TRASH_DIR, "%s.%d" % (job_id, randrange(1 << 30)))
    if not os.path.isdir(queue.path(TRASH_DIR)):
        make_private_dir(queue.path(TRASH_DIR))
    try:
        os.rename(job_dir, trash)
    except FileNotFoundError:  # deleted meanwhile by another client
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)
    from ..store import remove_job_tree

    remove_job_tree(queue, trash)
    runner_tick(queue)


HANDLERS = {"status": status, "list": list_jobs, "wait": wait, "kill": kill, "delete": delete}
