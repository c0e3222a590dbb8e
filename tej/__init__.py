"""tej: throw a job directory at any server you can SSH into, and come back for the results."""

from tej.api import JobState, JobStatus, KillResult, RemoteQueue, SetupResult
from tej.errors import (
    ConnectionFailed,
    InvalidInput,
    JobExists,
    JobNotFound,
    JobStateError,
    JobStillRunning,
    QueueError,
    ServerError,
    ServerPythonError,
    TejError,
    WaitTimeout,
)

__version__ = "1.0.0.dev0"

__all__ = [
    "ConnectionFailed",
    "InvalidInput",
    "JobExists",
    "JobNotFound",
    "JobState",
    "JobStateError",
    "JobStatus",
    "JobStillRunning",
    "KillResult",
    "QueueError",
    "RemoteQueue",
    "ServerError",
    "ServerPythonError",
    "SetupResult",
    "TejError",
    "WaitTimeout",
    "__version__",
]
