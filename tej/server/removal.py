"""Removing jobs: one (delete), or the ended ones in bulk (prune)."""

import json
import os
import time

from ..protocol import END_STATES
from .files import make_private_dir, parse_iso, randrange
from .index import LIST_FIELDS, Intent, crash_point, forget, line_row, state_of
from .layout import JOBS_DIR, TRASH_DIR
from .records import read_status_record

ENDED_AT = LIST_FIELDS.index("ended_at")


def to_trash(queue, job_id):
    """Move a job's folder to the trash, and out of the index; its path there (None: gone)."""
    trash = queue.path(TRASH_DIR, "%s.%d" % (job_id, randrange(1 << 30)))
    if not os.path.isdir(queue.path(TRASH_DIR)):
        make_private_dir(queue.path(TRASH_DIR))
    with Intent(queue.root, job_id):
        try:
            os.rename(queue.path(JOBS_DIR, job_id), trash)
        except FileNotFoundError:
            trash = None
        crash_point("job-trashed")
        forget(queue.root, job_id)
    return trash


def prunable(queue, states, older_than):
    """The ids of the ended jobs in states, ended more than older_than seconds ago (if given)."""
    from .listing import ended_lines

    cutoff = None if older_than is None else time.time() - older_than
    chosen = []
    for job_id, line in ended_lines(queue.root, states):
        if cutoff is not None:
            ended_at = json.loads(line_row(line))[ENDED_AT]
            if not ended_at or parse_iso(ended_at) > cutoff:
                continue
        chosen.append(job_id)
    return sorted(chosen)


def prune_jobs(queue, states, older_than, dry_run):
    """Delete the ended jobs prunable() finds; returns their ids.

    As delete does: the queue's runner first lets the jobs waiting for them
    learn how they ended; every job is moved to the trash (gone at once),
    then removed with the store's blobs only it used. A job whose record no
    longer says it has ended is left.
    """
    from .runners import runner_tick
    from .store import remove_job_tree

    chosen = prunable(queue, states, older_than)
    if dry_run or not chosen:
        return chosen
    runner_tick(queue)
    deleted, trash = [], []
    for job_id in chosen:
        if state_of(read_status_record(queue.path(JOBS_DIR, job_id))) not in END_STATES:
            continue
        path = to_trash(queue, job_id)
        if path is not None:
            deleted.append(job_id)
            trash.append(path)
    for path in trash:
        remove_job_tree(queue, path)
    runner_tick(queue)
    return deleted


def lost_jobs(queue, older_than):
    """The ids of the jobs found lost (see records.supervised_record): the index says they
    are active; their records, last changed more than older_than seconds ago (if given)."""
    from ..protocol import STATE_LOST
    from .layout import STATUS_FILE
    from .listing import active_records

    cutoff = None if older_than is None else time.time() - older_than
    chosen = []
    for job_id, job_dir, record in active_records(queue):
        if record.get("state") != STATE_LOST:
            continue
        if cutoff is not None:
            try:
                if os.stat(os.path.join(job_dir, STATUS_FILE)).st_mtime > cutoff:
                    continue
            except OSError:
                continue
        chosen.append(job_id)
    return sorted(chosen)
