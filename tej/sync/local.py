"""The local folder of a sync: its private `.tej-sync/` folder, its marker, and its scan."""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any, NamedTuple

from tej.errors import InvalidInput
from tej.hashcache import file_stamp

if TYPE_CHECKING:
    pass


PRIVATE = ".tej-sync"  # the sync's own folder in the destination: marker, partial files
MARKER = "sync.json"
MARKER_FORMAT = 1
PARTIAL = "partial"
LOCK = "lock"


class Local(NamedTuple):
    """A file, folder, symlink (or other thing) of the local folder."""

    kind: str  # f, d, l, or s (anything else)
    size: int
    mtime: int
    mode: int
    target: bytes
    stamp: tuple[int, ...]  # as tej.transfer.Entry's: for the hash cache


def check_folder(to: str) -> None:
    """Refuse a --to that can't be a local folder: empty, a file, or in no folder."""
    if not to:
        raise InvalidInput("--to is empty: name a local folder")
    if os.path.lexists(to) and not os.path.isdir(to):
        raise InvalidInput(f"--to {to} is not a folder")
    parent = os.path.dirname(os.path.abspath(to))
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise InvalidInput(f"{parent} is not a folder")


def holds_others(to: str, job_id: str, marker: dict[str, Any] | None) -> bool:
    """Whether a local folder holds things no sync of this job put there.

    With a marker of this job: what its first sync into the folder found (held_others).
    Otherwise: anything in it but the sync's private folder (another job's sync too).
    """
    if marker is not None and marker.get("job_id") == job_id:
        return bool(marker.get("held_others"))
    return os.path.isdir(to) and any(name != PRIVATE for name in os.listdir(to))


def prepare_destination(to: str, job_id: str, delete: bool, force: bool, dry_run: bool) -> None:
    """Check the local folder; refuse to --delete in one that holds other things than a
    sync of this job (see holds_others), unless force."""
    check_folder(to)
    if delete and not force and holds_others(to, job_id, read_marker(to)):
        raise InvalidInput(
            f"--delete: {to} holds other things than a sync of job {job_id!r}; "
            "choose another --to, or use --force to delete what the job doesn't have"
        )
    parent = os.path.dirname(os.path.abspath(to))
    if not dry_run and not os.path.isdir(parent):
        raise InvalidInput(f"No such local folder: {parent}")


def read_marker(to: str) -> dict[str, Any] | None:
    """The record of the last sync into to, if there is one."""
    try:
        with open(os.path.join(to, PRIVATE, MARKER), encoding="utf-8") as stream:
            marker = json.load(stream)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def scan_local(root: bytes) -> dict[bytes, Local]:
    """Every entry of the local folder (but .tej-sync), by relative path; symlinks not followed."""
    found: dict[bytes, Local] = {}
    pending = [b""]
    while pending:
        prefix = pending.pop()
        try:
            items = list(os.scandir(root + b"/" + prefix if prefix else root))
        except OSError:
            continue
        for item in items:
            relpath = prefix + item.name
            if relpath == PRIVATE.encode():
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue
            found[relpath] = _local_of(item, info)
            if found[relpath].kind == "d":
                pending.append(relpath + b"/")
    return found


class LocalScan:
    """scan_local in a thread, started at once."""

    def __init__(self, root: bytes) -> None:
        import threading

        self.found: dict[bytes, Local] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self.thread.start()

    def _run(self, root: bytes) -> None:
        try:
            self.found = scan_local(root)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self.error = exc

    def result(self) -> dict[bytes, Local]:
        """What the scan found (its error raised again)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.found


def _local_of(item: os.DirEntry[bytes], info: os.stat_result) -> Local:
    kind = stat.S_IFMT(info.st_mode)
    mode = info.st_mode & 0o7777
    if kind == stat.S_IFREG:
        return Local("f", info.st_size, info.st_mtime_ns, mode, b"", file_stamp(info))
    if kind == stat.S_IFDIR:
        return Local("d", 0, 0, mode, b"", ())
    if kind == stat.S_IFLNK:
        try:
            return Local("l", 0, 0, mode, os.readlink(item.path), ())
        except OSError:
            pass
    return Local("s", 0, 0, mode, b"", ())
