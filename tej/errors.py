"""The exception tree of tej: every anticipated failure is a TejError."""

from __future__ import annotations

from tej import protocol


class TejError(Exception):
    """Root of every error tej reports; its message is meant for the user."""

    exit_code = 1
    #: What the command line prints before the message.
    prefix = "Error: "


class InvalidInput(TejError):
    """Something the user gave (a path, an id, an option) is not acceptable."""


class ConnectionFailed(TejError):
    """The server could not be reached, or the connection was lost."""

    exit_code = 5


class ServerPythonError(ConnectionFailed):
    """The server's Python interpreter is missing or too old to run the agent."""


class ProtocolError(TejError):
    """The agent answered something the client does not understand."""


class QueueError(TejError):
    """The queue directory is missing, damaged, or of an unsupported format."""


class ServerError(TejError):
    """An operation failed on the server (disk full, permission denied...)."""


class JobNotFound(TejError):
    """There is no job with the given identifier."""

    exit_code = 3
    prefix = ""  # "No job 'x'" reads as an answer, as in `tej status`/`tej kill`


class JobStateError(TejError):
    """The job is not in a state that allows the operation."""

    exit_code = 4


class JobExists(JobStateError):
    """A job with the given identifier already exists."""


class JobStillRunning(JobStateError):
    """The job is still running."""


class WaitTimeout(TejError):
    """The job was still running when the wait's timeout expired."""

    exit_code = 6


class RunnerMissing(TejError):
    """The queue's runner is not installed in it, or is older than the client's (handled)."""


#: Error types named in the agent's replies, and the exception each becomes.
ERRORS_BY_TYPE: dict[str, type[TejError]] = {
    protocol.ERR_BAD_REQUEST: ProtocolError,
    protocol.ERR_INVALID: InvalidInput,
    protocol.ERR_JOB_NOT_FOUND: JobNotFound,
    protocol.ERR_JOB_EXISTS: JobExists,
    protocol.ERR_JOB_RUNNING: JobStillRunning,
    protocol.ERR_QUEUE: QueueError,
    protocol.ERR_RUNNER_MISSING: RunnerMissing,
    protocol.ERR_SERVER: ServerError,
    protocol.ERR_INTERNAL: ServerError,
}


def error_from_reply(kind: str, message: str) -> TejError:
    """The exception for an error reply from the agent."""
    return ERRORS_BY_TYPE.get(kind, ProtocolError)(message)
