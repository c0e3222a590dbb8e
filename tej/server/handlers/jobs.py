"""A queue's jobs: status, list, wait, kill, delete, prune."""

import os

from ...protocol import (
    ACTIVE_STATES,
    END_STATES,
    ERR_INVALID,
    ERR_JOB_NOT_FOUND,
    ERR_JOB_RUNNING,
    KILL_GRACE,
    LIST_HEAD,
    MAX_BLOCK,
    MAX_DURATION,
    STATE_LOST,
    STATE_QUEUED,
    task_id_parts,
)
from ..arrays import array_info, is_array, settle_on_read
from ..errors import AgentError, number_arg
from ..files import randrange
from ..index import LIST_FIELDS
from ..layout import JOBS_DIR
from ..queue import open_queue
from ..records import (
    job_metadata,
    job_status,
    live_status,
    public_status,
    wait_for_state,
)
from ..runners import runner_tick


def status(connection, queue, job_id, tasks=False):
    """The status of one job, with the metadata it was submitted with.

    An array's has "array": its fields, the counts of its tasks per state, and
    with tasks, every task's id, state, exit code and times.
    """
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    array = is_array(job_dir)
    if array:
        settle_on_read(job_dir)
    found = job_status(queue, job_id, job_dir)
    if array:
        with_array_info(queue, job_id, job_dir, found, tasks)
    return found


def with_array_info(queue, array_id, array_dir, found, tasks):
    """Add an array's "array" (its counts; with tasks, its tasks) to its status found, and
    its place in the line as its counts tell it (settle_places)."""
    from ..runners.line import settle_places  # loads json: a job's status does not

    found["array"] = array_info(queue, array_id, array_dir, found, tasks)
    settle_places([found])


def wait(connection, queue, job_id, timeout):
    """Block until the job ends or timeout seconds pass (at most MAX_BLOCK)."""
    timeout = number_arg(timeout, "timeout", 0, MAX_DURATION)
    queue = open_queue(queue)
    job_dir = queue.job_dir(job_id)
    if is_array(job_dir):
        settle_on_read(job_dir)
    record = wait_for_state(queue, job_id, job_dir, END_STATES, min(timeout, MAX_BLOCK))
    found = live_status(job_id, job_dir, record)
    if is_array(job_dir):
        with_array_info(queue, job_id, job_dir, found, False)
    return found


def list_jobs(connection, queue, states=None, tasks=False, short=False, job_id=None):
    """The first batch of the jobs' statuses, oldest first (all jobs, or those in states).

    {"fields": names, "rows": JSON text of rows (lists of values), "count": how
    many jobs, "batches": how many batches, "cursor": for list_more}. Without
    metadata (see status); short: only the fields of a plain `tej list`
    (LIST_HEAD). A listing of active states reads no ended job. An array is one
    row (its "array": size, counts); with tasks, its tasks' rows (ARRAYID.N, in
    the states asked for too) follow it. job_id: that job's row only (whatever its
    state), and with tasks an array's tasks' rows.
    """
    from ..listing import BATCH_ROWS, batch_text, check_states, list_rows

    states = check_states(states)
    if not isinstance(tasks, bool) or not isinstance(short, bool):
        raise AgentError(ERR_INVALID, "tasks and short must be true or false")
    queue = open_queue(queue)
    runner_tick(queue)
    if job_id is not None:
        from ..listing import job_rows

        rows = job_rows(queue, job_id, states, tasks)
    else:
        rows = list_rows(queue, states, tasks)
    count = -(-len(rows) // BATCH_ROWS)  # the later batches are made as they are asked for
    cursor = None
    if count > 1:
        cursor = "%08x" % randrange(1 << 32)
        connection.listings = {cursor: (rows, short)}  # one listing at a time per connection
    return {
        "fields": LIST_HEAD if short else LIST_FIELDS,
        "rows": batch_text(rows, 0, short),
        "count": len(rows),
        "batches": max(count, 1),
        "cursor": cursor,
    }


def list_more(connection, queue, cursor, batch):
    """The batch number `batch` (from 1) of the listing `cursor` (see list)."""
    from ..listing import BATCH_ROWS, batch_text

    listing = connection.listings.get(cursor) if isinstance(cursor, str) else None
    rows, short = listing or ((), False)
    count = -(-len(rows) // BATCH_ROWS)
    if not isinstance(batch, int) or not 1 <= batch < count:
        raise AgentError(ERR_INVALID, "No such listing %r, or batch %r" % (cursor, batch))
    if batch == count - 1:
        connection.listings = {}
    return {"rows": batch_text(rows, batch, short)}


def kill(connection, queue, job_id):
    """Kill a job (through its runner); reports whether this call killed it."""
    queue = open_queue(queue)
    return kill_job(queue, job_id)


def kill_job(queue, job_id):
    """Kill a job of an open queue: {"killed": whether this call killed it, "status": ...}."""
    job_dir = queue.job_dir(job_id)
    if not os.path.isdir(job_dir):  # a task not started yet: it never will be
        from ..arrays import cancel_unstarted

        record = queue.record(job_id, job_dir)
        if record.get("state") in END_STATES:  # its array ended: cancelled already
            return {"killed": False, "status": public_status(job_id, record)}
        record = cancel_unstarted(queue, job_dir)
        if record is not None:
            cancelled = getattr(queue.runner, "task_cancelled", None)
            if cancelled is not None:  # a batch system's own pending task (Slurm's ID_N)
                cancelled(job_dir)
            return {"killed": True, "status": public_status(job_id, record)}
    grace = float(job_metadata(job_dir, job_id).get("kill_grace", KILL_GRACE))
    killed, record = queue.runner.kill(job_id, job_dir, queue.record(job_id, job_dir), grace)
    runner_tick(queue)
    found = public_status(job_id, record)
    if is_array(job_dir):  # with its counts, as status gives them
        with_array_info(queue, job_id, job_dir, found, False)
    return {"killed": killed, "status": found}


def delete(connection, queue, job_id, force=False):
    """Delete a job's directory; a running job only with force (killed first)."""
    delete_job(open_queue(queue), job_id, force)


def delete_job(queue, job_id, force=False):
    """Delete a job of an open queue (see delete)."""
    job_dir = queue.job_dir(job_id)
    task = task_id_parts(job_id)
    if task is not None and os.path.isdir(queue.path(JOBS_DIR, job_id)):
        task = None  # a job's own folder (made by an older tej): deleted as a job
    state = queue.record(job_id, job_dir).get("state")
    if task is not None and state in END_STATES and not os.path.isdir(job_dir):
        raise AgentError(ERR_INVALID, "Task %r never started: it has no files to delete" % job_id)
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
    if task is not None:
        from ..arrays import delete_task

        delete_task(queue, task[0], job_dir)
        return
    runner_tick(queue)  # first, so that jobs waiting for this one know how it ended
    from ..removal import to_trash

    trash = to_trash(queue, job_id)
    if trash is None:  # deleted meanwhile by another client
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)
    from ..store import remove_job_tree

    remove_job_tree(queue, trash)
    runner_tick(queue)


def prune(connection, queue, states=None, older_than=None, dry_run=False):
    """Delete ended jobs in bulk (in states, ended more than older_than seconds ago).

    The same guarantees as delete: the jobs waiting for one learn how it
    ended first, and the store's blobs only they used are freed. Returns
    {"ids": the jobs deleted (or that would be, with dry_run)}.
    """
    from ..listing import check_states
    from ..removal import prune_jobs

    states = check_states(states if states is not None else list(END_STATES))
    if not states <= set(END_STATES):
        raise AgentError(ERR_INVALID, "Only ended jobs can be pruned (%s)" % ", ".join(END_STATES))
    if older_than is not None:
        older_than = number_arg(older_than, "older_than", 0, MAX_DURATION)
    queue = open_queue(queue)
    ids = prune_jobs(queue, states, older_than, dry_run)
    if STATE_LOST in states:
        ids = sorted(ids + prune_lost(queue, older_than, dry_run))
    return {"ids": ids}


def prune_lost(queue, older_than, dry_run):
    """Delete the jobs found lost (their supervisors gone, their records still say they
    run), as delete does (their processes left are killed first); their ids.

    Their end is unknown: older_than counts from their record's last change.
    """
    from ..removal import lost_jobs

    chosen = lost_jobs(queue, older_than)
    if dry_run:
        return chosen
    deleted = []
    for job_id in chosen:
        try:
            delete_job(queue, job_id)
        except AgentError:  # it moved on meanwhile (deleted, or running again: a retry)
            continue
        deleted.append(job_id)
    return deleted


HANDLERS = {
    "status": status,
    "list": list_jobs,
    "list_more": list_more,
    "wait": wait,
    "kill": kill,
    "delete": delete,
    "prune": prune,
}
