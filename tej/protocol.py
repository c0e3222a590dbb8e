"""What the client needs to know of the agent's protocol, without importing the agent.

The agent (tej/remote_agent.py, 1,700 lines) owns these values. The client only
needs this handful, and importing the agent would cost every command its
compilation and its imports, so they are restated here;
tests/test_agent.py::test_client_protocol_matches_the_agent checks that each one
is equal to the agent's.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1

STATE_STARTING = "starting"
STATE_QUEUED = "queued"
STATE_SCHEDULED = "scheduled"
STATE_RUNNING = "running"
STATE_FINISHED = "finished"
STATE_KILLED = "killed"
STATE_TIMED_OUT = "timed_out"
STATE_LOST = "lost"
STATE_CANCELLED = "cancelled"
ACTIVE_STATES = (STATE_STARTING, STATE_QUEUED, STATE_SCHEDULED, STATE_RUNNING)
END_STATES = (STATE_FINISHED, STATE_KILLED, STATE_TIMED_OUT, STATE_LOST, STATE_CANCELLED)

DEFAULT_RUNNER = "default"

DEFAULT_SCRIPT = "start.sh"
KILL_GRACE = 5.0
MAX_DURATION = 3650 * 86400.0
MAX_BLOCK = 30.0
MAX_ID_LENGTH = 128
#: What a job identifier is made of (the agent compiles it as ID_PATTERN).
ID_REGEX = r"[A-Za-z0-9_\-.+=@%:,]+\Z"

ERR_BAD_REQUEST = "BadRequest"
ERR_INVALID = "InvalidInput"
ERR_JOB_NOT_FOUND = "JobNotFound"
ERR_JOB_EXISTS = "JobExists"
ERR_JOB_RUNNING = "JobRunning"
ERR_QUEUE = "QueueError"
ERR_AGENT_MISSING = "AgentMissing"
ERR_RUNNER_MISSING = "RunnerMissing"
ERR_SERVER = "ServerError"
ERR_INTERNAL = "InternalError"


def job_id_problem(job_id: object) -> str | None:
    """Why job_id is not a valid job identifier (the agent's rule), or None if it is."""
    if not isinstance(job_id, str) or not job_id:
        return "A job identifier can't be empty"
    import re  # here: tej starts ssh before it would load re (see tej.launcher)

    if job_id in (".", "..") or len(job_id) > MAX_ID_LENGTH or not re.match(ID_REGEX, job_id):
        return (
            f"Invalid job identifier {job_id!r}: use at most {MAX_ID_LENGTH} letters, "
            "digits and _-.+=@%:,"
        )
    return None


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of data, in hex, from Python's built-in module if it has one.

    hashlib would load OpenSSL, which costs a command more than hashing tej's
    code does (a few hundred kilobytes).
    """
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
        except ImportError:
            from hashlib import sha256  # type: ignore[assignment,unused-ignore]
    return sha256(data).hexdigest()  # type: ignore[no-any-return,unused-ignore]
