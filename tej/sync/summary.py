"""What a sync did: SyncSummary."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class SyncSummary:
    """What one sync (or one pass of a followed sync) did, or would do with dry_run."""

    files_sent: int = 0
    bytes_sent: int = 0
    files_unchanged: int = 0
    files_deleted: int = 0
    files_copied: int = 0  # found elsewhere in the local folder, copied there
    #: Files that kept changing while they were read: left for the next sync.
    files_changing: int = 0
    #: The files and folders the server can't read (its permissions), each "PATH (why)".
    unreadable: tuple[str, ...] = ()
    state: str | None = None  # the job's state when the files were listed
    requests: int = 0  # requests to the server (round trips, bar pipelining)
    dry_run: bool = False
    #: With dry_run: the paths that would be sent, copied and deleted.
    to_send: tuple[str, ...] = ()
    to_copy: tuple[str, ...] = ()
    to_delete: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        document: dict[str, Any] = {
            "files_sent": self.files_sent,
            "bytes_sent": self.bytes_sent,
            "files_unchanged": self.files_unchanged,
            "files_deleted": self.files_deleted,
            "files_copied": self.files_copied,
            "files_changing": self.files_changing,
            "unreadable": list(self.unreadable),
            "state": self.state,
            "requests": self.requests,
        }
        if self.dry_run:
            document.update(
                dry_run=True,
                to_send=list(self.to_send),
                to_copy=list(self.to_copy),
                to_delete=list(self.to_delete),
            )
        return document

    def __add__(self, other: SyncSummary) -> SyncSummary:
        """The totals of two passes (the later one's state)."""
        counts = {name: getattr(self, name) + getattr(other, name) for name in _COUNTS}
        return SyncSummary(
            **counts,
            state=other.state or self.state,
            dry_run=self.dry_run or other.dry_run,
            to_send=self.to_send + other.to_send,
            to_copy=self.to_copy + other.to_copy,
            to_delete=self.to_delete + other.to_delete,
            unreadable=self.unreadable + other.unreadable,
        )

    def then(self, later: SyncSummary) -> SyncSummary:
        """The totals of a pass and a later one over the same folder: what each sent,
        copied and deleted, and what either could not read, added up; what the later one
        found unchanged or changing."""
        return replace(
            self + later,
            files_unchanged=later.files_unchanged,
            files_changing=later.files_changing,
            unreadable=tuple(dict.fromkeys(self.unreadable + later.unreadable)),
        )


_COUNTS = (
    "files_sent",
    "bytes_sent",
    "files_unchanged",
    "files_deleted",
    "files_copied",
    "files_changing",
    "requests",
)
