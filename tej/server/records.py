"""Job status records: reading them, the public status, lost supervisors, waiting."""

import os
import time

from ..protocol import (
    ACTIVE_STATES,
    ERR_JOB_NOT_FOUND,
    STATE_LOST,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_STARTING,
)
from .errors import (
    AgentError,
)
from .files import (
    POLL_INTERVAL,
    now_iso,
    parse_iso,
    read_json,
)
from .layout import (
    JOB_FILE,
    STATUS_FILE,
)
from .processes import (
    boot_id,
    is_same_process,
)

START_TIMEOUT = 60.0


def read_status_record(job_dir):
    """The raw status record of a job, as last written; None if it has none.

    A job its agent gave no record (see first_record_of) is `starting`.
    """
    try:
        return read_json(os.path.join(job_dir, STATUS_FILE))
    except FileNotFoundError:
        return first_record_of(job_dir)
    except (OSError, AgentError):
        return None


def first_record_of(job_dir, job=None):
    """The record of a job that has no STATUS_FILE yet (a new job of the default runner,
    whose supervisor writes its first record): `starting` since its job.json was
    written; None if job.json (job, if read already) can't be read either. See
    docs/queue-format.md: a job whose supervisor never writes is lost 60 s later."""
    path = os.path.join(job_dir, JOB_FILE)
    try:
        if job is None:
            job = read_json(path)
        written = os.stat(path).st_mtime
    except (OSError, AgentError):
        return None
    if not isinstance(job, dict) or not isinstance(job.get("id"), str):
        return None
    return {"id": job["id"], "state": STATE_STARTING, "submitted_at": now_iso(written)}


def public_status(job_id, record):
    """The status the client sees, with elapsed time computed on the server clock."""
    started = record.get("started_at")
    ended = record.get("ended_at")
    elapsed = None
    if started:
        end = parse_iso(ended) if ended else time.time()
        elapsed = max(0.0, round(end - parse_iso(started), 3))
    start_time = record.get("start_time")
    return {
        "id": job_id,
        "state": record.get("state"),
        "exit_code": record.get("exit_code"),
        "signal": record.get("signal"),
        "reason": record.get("reason"),
        "submitted_at": record.get("submitted_at"),
        "scheduled_for": now_iso(start_time) if start_time else None,
        "started_at": started,
        "ended_at": ended,
        "elapsed": elapsed,
        "position": record.get("position"),
        "notifications": record.get("notifications", []),
        "resources": record.get("resources"),
        "progress": None,
        "attempts": record.get("attempts") or [],
        "max_attempts": record.get("max_attempts"),
        "retry_at": now_iso(record["retry_at"]) if record.get("retry_at") else None,
    }


def live_status(job_id, job_dir, record, scan=None):
    """A job's public status with what its files and processes say now: its progress,
    and a running job's current memory and CPU use (scan: a ProcessScan to share)."""
    from .progress import read_progress

    status = public_status(job_id, record)
    if record.get("started_at"):
        status["progress"] = read_progress(job_dir)
    if record.get("state") == STATE_RUNNING:
        from .usage import ProcessScan

        status["resources"] = (scan or ProcessScan()).of_job(record.get("job")) or status[
            "resources"
        ]
    return status


def job_metadata(job_dir, job_id):
    """A job's metadata; JobNotFound if the job was deleted meanwhile."""
    try:
        return read_json(os.path.join(job_dir, JOB_FILE))
    except FileNotFoundError:
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)


def job_status(queue, job_id, job_dir):
    """A job's public status, with the metadata it was submitted with."""
    status = live_status(job_id, job_dir, queue.record(job_id, job_dir))
    try:
        status["metadata"] = read_json(os.path.join(job_dir, JOB_FILE))
    except (OSError, AgentError):
        status["metadata"] = None
    return status


def missing_status():
    """The record of a job whose status file is gone."""
    return {"state": STATE_LOST, "reason": "the job's status file is missing"}


def supervised_record(job_dir, record=None):
    """The job's status record, with dead supervisors reported as lost.

    A queued job has no supervisor yet, so it is never lost.
    """
    record = record or read_status_record(job_dir)
    if record is None:
        return missing_status()
    if record.get("state") not in ACTIVE_STATES or record.get("state") == STATE_QUEUED:
        return record
    if record.get("kept_by_tasks"):  # an array whose tasks keep its record: no supervisor
        return record
    if is_same_process(record.get("supervisor")):
        return record
    if is_starting_in_time(record):
        return record
    # The supervisor is gone: it may have just written the final status.
    latest = read_status_record(job_dir)
    if latest is None and not os.path.isdir(job_dir):
        return record  # it ended and was deleted meanwhile: as last seen, not lost
    record = latest or record
    if record.get("state") in ACTIVE_STATES:
        record = dict(record)
        reason = "the server restarted" if rebooted(record) else "the job's supervisor died"
        record.update(state=STATE_LOST, reason=reason)
    return record


def is_starting_in_time(record):
    """Whether a job is being started, and still within the time allowed for it."""
    if record.get("state") != STATE_STARTING or record.get("supervisor"):
        return False
    since = record.get("admitted_at") or record["submitted_at"]
    return time.time() - parse_iso(since) < START_TIMEOUT


def rebooted(record):
    """Whether the server rebooted since the record's supervisor started."""
    recorded = (record.get("supervisor") or {}).get("boot")
    return bool(recorded) and recorded != boot_id()


def wait_for_state(queue, job_id, job_dir, states, timeout):
    """Poll a job's record until its state is one of states, or timeout."""
    deadline = time.time() + timeout
    interval = getattr(queue.runner, "poll_interval", POLL_INTERVAL)
    while True:
        record = queue.record(job_id, job_dir)
        if record.get("state") in states or time.time() >= deadline:
            return record
        time.sleep(interval)
