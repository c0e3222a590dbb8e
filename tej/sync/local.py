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


def prepare_destination(to: str, job_id: str, delete: bool, force: bool, dry_run: bool) -> None:
    """Check (and create, unless dry_run) the local folder; refuse to --delete in a foreign one."""
    if os.path.lexists(to) and not os.path.isdir(to):
        raise InvalidInput(f"--to {to} is not a folder")
    if delete and not force and os.path.isdir(to):
        marker = read_marker(to)
        others = [name for name in os.listdir(to) if name != PRIVATE]
        if others and (marker is None or marker.get("job_id") != job_id):
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
