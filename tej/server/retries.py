"""Retries: whether a job's attempt is tried again, when, and lost jobs started again.

A job's "retries" (tej.json, checked by tej.protocol.check_retries) say how many
times its script is run again, after which endings ("failure": a non-zero exit
code or a timeout; exit codes; "lost": its supervisor died). Its supervisor
retries failures itself, in the same job folder; a lost job has no supervisor
left, so the next tej command that finds it lost starts a new one (there is no
daemon), under the queue's lock so that two clients never both do.
"""

import os
import time

from ..protocol import (
    RETRY_ON_FAILURE,
    RETRY_ON_LOST,
    STATE_FINISHED,
    STATE_LOST,
    STATE_STARTING,
    STATE_TIMED_OUT,
)
from .errors import AgentError
from .files import now_iso, read_json
from .layout import JOB_FILE


def policy_of(job):
    """A job's retries (normalized by the agent at submit), or None if it has none."""
    policy = (job or {}).get("retries")
    if not isinstance(policy, dict) or not policy.get("max"):
        return None
    return policy


def max_attempts(job):
    """How many times a job's script may run in all (1 without retries)."""
    policy = policy_of(job)
    return 1 + int(policy["max"]) if policy else 1


def retried_on(policy, state, exit_code):
    """Whether an attempt that ended so is retried under policy (attempts left aside)."""
    on = policy["on"]
    if state == STATE_TIMED_OUT:
        return RETRY_ON_FAILURE in on
    if state == STATE_LOST:
        return RETRY_ON_LOST in on
    if state != STATE_FINISHED or not exit_code:
        return False
    return RETRY_ON_FAILURE in on or exit_code in on


def delay_before(policy, retry):
    """Seconds to wait before the retry-th retry (1 for the second attempt)."""
    return float(policy.get("delay") or 0) * float(policy.get("backoff") or 1) ** (retry - 1)


def next_retry(job, attempts, state, exit_code):
    """Seconds to wait before running the job again after an attempt; None: it has ended."""
    policy = policy_of(job)
    if policy is None or len(attempts) > policy["max"]:
        return None
    if not retried_on(policy, state, exit_code):
        return None
    return delay_before(policy, len(attempts))


def close_attempt(record, state, reason=None):
    """Note in the record's last attempt how it ended (one is added if none had started)."""
    attempts = record.setdefault("attempts", [])
    if not attempts or attempts[-1].get("ended_at"):
        attempts.append({"attempt": len(attempts) + 1, "started_at": None})
    attempts[-1].update(
        ended_at=now_iso(),
        state=state,
        exit_code=record.get("exit_code"),
        signal=record.get("signal"),
        reason=reason or record.get("reason"),
    )


def retry_if_lost(host, job_dir, record):
    """A lost job's record, or, if its retries say so, the record of its new attempt.

    record is the job's as supervised_record reported it. Under the queue's
    lock, the job is found lost again (another client may have just started
    it again), its attempt is closed, and a new supervisor is started.
    """
    if record.get("state") != STATE_LOST or record.get("ended_at"):
        return record  # not lost, or recorded lost for good (its supervisor failed)
    if record.get("max_attempts") == 1:
        return record  # no retries: its job.json needn't be read
    try:
        job = read_json(os.path.join(job_dir, JOB_FILE))
    except (OSError, AgentError):  # unreadable: it stays lost
        return record
    attempts = record.get("attempts") or [{}]
    delay = next_retry(job, attempts, STATE_LOST, None)
    if delay is None:
        return record
    with host.lock():
        current = host.read_record(job_dir)
        if current is None:
            return record
        current = host.supervised_record(job_dir, current, retry=False)
        if current.get("state") != STATE_LOST or current.get("ended_at"):
            return current  # another client started it again
        return start_again(host, job_dir, current, delay)


def start_again(host, job_dir, record, delay):
    """Record a lost job's new attempt as starting, and start its supervisor."""
    record = dict(record)
    attempts = record.get("attempts") or []
    if not attempts or not attempts[-1].get("ended_at"):  # else lost between two attempts
        close_attempt(record, STATE_LOST, record.get("reason"))
    record.pop("supervisor", None)
    record.update(state=STATE_STARTING, admitted_at=now_iso(), reason=None)
    if delay:
        record["retry_at"] = time.time() + delay
    host.write_record(job_dir, record)
    try:
        host.start_supervisor(job_dir)
    except Exception as exc:  # noqa: BLE001 - recorded: the job is lost for good
        record.update(state=STATE_LOST, ended_at=now_iso(), reason=str(exc))
        host.write_record(job_dir, record)
    return record
