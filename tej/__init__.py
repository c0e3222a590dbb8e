"""tej: throw a job directory at any server you can SSH into, and come back for the results."""

from __future__ import annotations

# Not `from typing import ...`: `tej` starts ssh before it would load typing (tej.launcher).
TYPE_CHECKING = False

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
    "SyncSummary",
    "TejError",
    "WaitTimeout",
    "__version__",
]

if TYPE_CHECKING:
    from typing import Any

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
    from tej.sync import SyncSummary

# The public names are imported on first use: `python -m tej` and `import tej.cli`
# load only what their command needs.
_API = {"JobState", "JobStatus", "KillResult", "RemoteQueue", "SetupResult"}


def __getattr__(name: str) -> Any:
    if name not in __all__ or name == "__version__":
        raise AttributeError(f"module 'tej' has no attribute {name!r}")
    if name in _API:
        from tej import api as module
    elif name == "SyncSummary":
        from tej import sync as module  # type: ignore[no-redef]
    else:
        from tej import errors as module  # type: ignore[no-redef]
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
