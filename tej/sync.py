"""`tej sync`: mirror a job's files into a local folder, sending only what changed.

One pass: the agent lists the job's files (sync_list: only what changed since
the previous listing of this connection, so an idle pass is one small round
trip); the client compares them with the local folder by size and
modification time, and where those differ, by content hash (sync_hash, or a
digest sent with a small file's read, which the agent answers "same" instead
of the data). A file that the local folder already holds elsewhere is copied
locally. The rest is read with sync_read (checked chunks) or as a raw stream
(tej.rawstream) for big files, written to a partial file in the folder's
private `.tej-sync/` folder (resumed where it stopped by a later sync), then
renamed into place whole. A file that changed on the server while it was
read is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import operator
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, Tuple

from tej import protocol
from tej.errors import InvalidInput, ProtocolError
from tej.excludes import sync_excludes
from tej.transfer import BATCH_SIZE, CHUNK_SIZE, WINDOW, HashCache, _make_entry

if TYPE_CHECKING:
    from tej.session import Session
    from tej.transfer import Progress

PRIVATE = ".tej-sync"  # the sync's own folder in the destination: marker, partial files
MARKER = "sync.json"
MARKER_FORMAT = 1
PARTIAL = "partial"
LOCK = "lock"
#: A file modified this recently on the server (ns) is checked by content on the next pass:
#: a change within the same timestamp tick would not show in its size and time.
RECENT = 2 * 10**9
#: A file that keeps changing while it is read is tried this many times in a pass.
ATTEMPTS = 3
#: Below this size, a file the local folder may hold elsewhere is just sent (a hash costs more).
COPY_MIN = 64 * 1024


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


class Remote(NamedTuple):
    """A file, folder or symlink of the job, as listed."""

    relpath: bytes
    kind: str
    mode: int
    size: int
    mtime: int
    inode: int
    target: bytes


#: A row of the listing as kept: Remote's fields in a plain tuple.
Listed = Tuple[bytes, str, int, int, int, int, bytes]


class Local(NamedTuple):
    """A file, folder, symlink (or other thing) of the local folder."""

    kind: str  # f, d, l, or s (anything else)
    size: int
    mtime: int
    mode: int
    target: bytes
    stamp: tuple[int, ...]  # as tej.transfer.Entry's: for the hash cache


def decode_listing(columns: dict[str, Any]) -> list[Listed]:
    """The rows of sync_list's columns (see tej/server/handlers/sync.py encode_rows), as
    plain tuples (Remote's fields: ten times faster to make than Remote rows).

    Every path is checked at once, on the columns: none may leave the local folder.
    """
    kinds = columns["kinds"]
    count = len(kinds)
    if not count:
        return []
    blob = columns["paths"]
    paths = blob.split(b"\0")
    if len(paths) != count:
        raise ProtocolError("The agent's listing is malformed")
    # Each path between slashes: an empty, absolute or "/"-ended path, or an empty, "." or ".."
    # part, shows as "//", "/./" or "/../".
    parts = b"/" + blob.replace(b"\0", b"/") + b"/"
    if b"//" in parts or b"/./" in parts or b"/../" in parts:
        raise ProtocolError("The agent listed an invalid path (empty, absolute, or with . or ..)")
    modes = struct.unpack(f"<{count}H", columns["modes"])
    sizes = struct.unpack(f"<{count}Q", columns["sizes"])
    mtimes = struct.unpack(f"<{count}q", columns["mtimes"])
    inodes = struct.unpack(f"<{count}Q", columns["inodes"])
    if "l" in kinds:
        found = iter(columns["targets"].split(b"\0"))
        targets: Iterable[bytes] = [next(found) if kind == "l" else b"" for kind in kinds]
    else:
        targets = itertools.repeat(b"")
    return list(zip(paths, kinds, modes, sizes, mtimes, inodes, targets))


_PRIVATE_PATH = re.compile(re.escape(PRIVATE.encode()) + rb"(?:/|\Z)")


def check_job_path(path: str) -> bytes:
    """A path of the job asked for on the command line, checked before anything is sent."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise InvalidInput(f"The path {path!r} leaves the job's directory")
    return "/".join(parts).encode("utf-8", "surrogateescape")


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


class _LocalScan:
    """scan_local in a thread, started at once."""

    def __init__(self, root: bytes) -> None:
        import threading

        self.found: dict[bytes, Local] = {}
        self.keys: set[tuple[bytes, str, int, int, int]] = set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self.thread.start()

    def _run(self, root: bytes) -> None:
        try:
            self.found = scan_local(root)
            self.keys = file_keys(self.found)
        except BaseException as exc:  # noqa: BLE001 - raised again by result()
            self.error = exc

    def result(self) -> dict[bytes, Local]:
        """What the scan found (its error raised again)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.found


def file_keys(local: dict[bytes, Local]) -> set[tuple[bytes, str, int, int, int]]:
    """The local files as (path, "f", size, mtime, mode): what _same_files compares."""
    return {
        (path, "f", have.size, have.mtime, have.mode)
        for path, have in local.items()
        if have.kind == "f"
    }


def _same_files(
    listing: dict[bytes, Listed], keys: set[tuple[bytes, str, int, int, int]]
) -> set[bytes]:
    """The listed files the local folder has (keys: file_keys) with the same size, time and
    mode, found in bulk."""
    return set(map(_PATH, keys.intersection(map(_REMOTE_KEY, listing.values()))))


_REMOTE_KEY = operator.itemgetter(0, 1, 3, 4, 2)  # path, kind, size, mtime, mode
_PATH = operator.itemgetter(0)


def _local_of(item: os.DirEntry[bytes], info: os.stat_result) -> Local:
    kind = stat.S_IFMT(info.st_mode)
    mode = info.st_mode & 0o7777
    if kind == stat.S_IFREG:
        stamp = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)
        return Local("f", info.st_size, info.st_mtime_ns, mode, b"", stamp)
    if kind == stat.S_IFDIR:
        return Local("d", 0, 0, mode, b"", ())
    if kind == stat.S_IFLNK:
        try:
            return Local("l", 0, 0, mode, os.readlink(item.path), ())
        except OSError:
            pass
    return Local("s", 0, 0, mode, b"", ())


@dataclass
class Plan:
    """What a pass does to the local folder."""

    folders: list[Remote] = field(default_factory=list)
    links: list[Remote] = field(default_factory=list)
    unchanged: list[Remote] = field(default_factory=list)  # same content: only its mode
    same: int = 0  # files the same in every way
    verify: list[Remote] = field(default_factory=list)  # same size, other time: hash decides
    send: list[Remote] = field(default_factory=list)
    copy: list[tuple[Remote, bytes]] = field(default_factory=list)  # (file, local source)
    delete: list[bytes] = field(default_factory=list)


class Syncer:
    """One job's files mirrored into one local folder, pass after pass, over one session."""

    def __init__(
        self,
        session: Callable[[], Session],
        queue: str,
        job_id: str,
        to: str,
        paths: Sequence[str] = (),
        *,
        delete: bool = False,
        exclude: Sequence[str] = (),
        dry_run: bool = False,
        progress: Progress | None = None,
        destination: str = "",
    ) -> None:
        self.session = session
        self.queue = queue
        self.job_id = job_id
        self.to = os.path.abspath(to)
        self.root = os.fsencode(self.to)
        self.paths = [check_job_path(path) for path in paths]
        self.delete = delete
        self.excludes = sync_excludes(exclude)
        self.dry_run = dry_run
        self.progress = progress
        self.destination = destination
        self.token: str | None = None
        self.listing: dict[bytes, Listed] = {}  # the job's files, as last listed
        self.requests = 0
        self.cache: HashCache | None = None
        self._lock: BinaryIO | None = None
        self._real_root = os.path.realpath(self.root)
        #: Local folders checked to be inside --to, in this pass (see local_path).
        self._safe: set[bytes] = set()
        self._partials: dict[Remote, bytes] = {}
        marker = read_marker(self.to) if os.path.isdir(self.to) else None
        same = marker is not None and marker.get("job_id") == job_id
        recent = marker.get("recent", []) if same and marker is not None else []
        self.recent = {os.fsencode(path) for path in recent if isinstance(path, str)}

    # talking to the agent

    def call(self, op: str, **args: Any) -> Any:
        """One request about the job."""
        self.requests += 1
        return self.session().call(op, queue=self.queue, job_id=self.job_id, **args)

    def pipeline(self, requests: list[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
        """Requests about the job, pipelined."""
        self.requests += len(requests)
        common = {"queue": self.queue, "job_id": self.job_id}
        return self.session().pipeline(((op, {**common, **a}) for op, a in requests), WINDOW)

    def refresh(self, missing_ok: bool) -> tuple[bool, str | None, int]:
        """List what changed on the server: (anything changed, the job's state, server time)."""
        reply = self.call("sync_list", paths=self.paths, since=self.token, missing_ok=missing_ok)
        if reply["full"]:
            self.listing = {}
        changed = decode_listing(reply["entries"])
        removed = [path for path in reply["removed"].split(b"\0") if path]
        for path in removed:
            self.listing.pop(path, None)
        self.listing.update(zip(map(_PATH, changed), changed))
        if PRIVATE.encode() in reply["entries"]["paths"]:
            # A job's own .tej-sync (a sync into a job) can't be mirrored.
            for path in list(filter(_PRIVATE_PATH.match, self.listing)):
                del self.listing[path]
        self.token = reply["token"]
        return bool(reply["full"] or changed or removed), reply["state"], int(reply["now"])

    # one pass

    def lock(self) -> None:
        """Make sure no other sync writes into the same folder (held until this process ends)."""
        import fcntl

        if self._lock is not None or self.dry_run:
            return
        try:
            os.makedirs(os.path.join(self.to, PRIVATE, PARTIAL), 0o700, exist_ok=True)
        except OSError as exc:
            raise InvalidInput(f"Can't create {self.to}: {exc.strerror}") from None
        stream = open(os.path.join(self.to, PRIVATE, LOCK), "ab")  # noqa: SIM115 - kept open
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            raise InvalidInput(f"Another tej sync is writing into {self.to}") from None
        self._lock = stream

    def run(self, missing_ok: bool = False, idle_ok: bool = False) -> SyncSummary:
        """One pass; with idle_ok, a pass where nothing changed on the server does nothing more."""
        start = self.requests
        totals = SyncSummary(dry_run=self.dry_run)
        changing: list[Remote] = []
        for attempt in range(ATTEMPTS):
            # The local folder is read while the server lists the job's files.
            local = None if idle_ok and attempt == 0 else _LocalScan(self.root)
            changed, state, now = self.refresh(missing_ok)
            self.lock()  # the folder is made once the job's files are known
            if local is None and not changed:
                files = sum(1 for row in self.listing.values() if row[1] == "f")
                return SyncSummary(files_unchanged=files, state=state, requests=1)
            try:
                if local is None:
                    local = _LocalScan(self.root)
                found = local.result()
                summary, changing = self.apply(self.plan(now, found, local.keys), state)
            except OSError as exc:
                where = os.fsdecode(exc.filename) if exc.filename else self.to
                raise InvalidInput(f"Can't write {where}: {exc.strerror or exc}") from None
            totals = totals + summary
            if not changing:
                break
        if not self.dry_run:
            self.finish()
        end = SyncSummary(files_changing=len(changing), requests=self.requests - start)
        return totals + end

    def plan(self, now: int, local: dict[bytes, Local], keys: set[Any] | None = None) -> Plan:
        """Compare the listing with the local folder (as scan_local found it; keys: its
        file_keys, if known)."""
        self._safe = set()
        plan = Plan()
        skipped = self._excluded((path, row[1] == "d") for path, row in self.listing.items())
        keys = file_keys(local) if keys is None else keys
        same = _same_files(self.listing, keys) - self.recent - skipped
        plan.same = len(same)
        for relpath in sorted(self.listing.keys() - same - skipped):
            row, have = Remote._make(self.listing[relpath]), local.get(relpath)
            if row.kind == "d":
                if have is None or have.kind != "d" or have.mode != (row.mode | 0o700):
                    plan.folders.append(row)
            elif row.kind == "l":
                if have is None or have.kind != "l" or have.target != row.target:
                    plan.links.append(row)
            elif have is None or have.kind != "f" or have.size != row.size:
                plan.send.append(row)
            elif have.mtime != row.mtime or relpath in self.recent:
                plan.verify.append(row)
            elif have.mode & 0o777 != row.mode & 0o777:
                plan.unchanged.append(row)  # only its mode to set
            else:
                plan.same += 1
        if self.delete:
            plan.delete = self._to_delete(local)
        since = now - RECENT
        self.recent = {row[0] for row in self.listing.values() if row[4] > since and row[1] == "f"}
        self._find_copies(plan, local)
        return plan

    def _excluded(self, entries: Iterable[tuple[bytes, bool]]) -> set[bytes]:
        """The paths of entries (path, is_folder) that --exclude leaves alone: matched, or
        in a folder matched."""
        excludes = self.excludes
        if excludes is None:
            return set()
        folders = {b"": False}  # whether a folder is left alone, itself or by a parent

        def in_excluded(folder: bytes) -> bool:
            if folder not in folders:
                parent = folder.rpartition(b"/")[0]
                folders[folder] = in_excluded(parent) or excludes(folder, True)
            return folders[folder]

        return {
            path
            for path, is_folder in entries
            if in_excluded(path.rpartition(b"/")[0]) or excludes(path, is_folder)
        }

    def _to_delete(self, local: dict[bytes, Local]) -> list[bytes]:
        """Local paths the job doesn't have (within the paths synced), deepest first."""
        scopes = [path for path in self.paths if path] or [b""]
        gone = []
        candidates = local.keys() - self.listing.keys()
        folders = ((path, local[path].kind == "d") for path in candidates)
        for relpath in candidates - self._excluded(folders):
            if any(not s or relpath == s or relpath.startswith(s + b"/") for s in scopes):
                gone.append(relpath)
        return sorted(gone, key=lambda path: (-path.count(b"/"), path))

    def _find_copies(self, plan: Plan, local: dict[bytes, Local]) -> None:
        """Move files to send that the local folder holds elsewhere (same content) to plan.copy.

        Only files of COPY_MIN or more with a local file of the same size are
        hashed on the server; local files are hashed (or found in the hash
        cache) for at most as many bytes as sending would cost.
        """
        if not any(row.size >= COPY_MIN for row in plan.send):
            return
        by_size: dict[int, list[bytes]] = {}
        for relpath, have in local.items():
            if have.kind == "f" and have.size >= COPY_MIN:
                by_size.setdefault(have.size, []).append(relpath)
        wanted = [row for row in plan.send if row.size >= COPY_MIN and row.size in by_size]
        if not wanted:
            return
        digests = self.call(
            "sync_hash", files=[[r.relpath, r.size, r.mtime, r.inode] for r in wanted]
        )
        self.cache = self.cache or HashCache(self.to)
        budget = sum(row.size for row in wanted)
        found: dict[str, bytes] = {}
        for row, digest in zip(wanted, digests):
            for source in by_size[row.size]:
                if digest is None or digest in found or budget <= 0:
                    break
                known = self._local_digest(source, local[source])
                if known is None:
                    budget -= row.size
                    known = self._hash_local(source, local[source])
                found.setdefault(known, source)
            if digest is not None and digest in found:
                plan.send.remove(row)
                plan.copy.append((row, found[digest]))

    def _local_digest(self, relpath: bytes, have: Local) -> str | None:
        assert self.cache is not None
        return self.cache.known.get((relpath, have.stamp))

    def _hash_local(self, relpath: bytes, have: Local) -> str:
        assert self.cache is not None
        started = time.time_ns()
        digest = self.hash_file(relpath)
        entry = _make_entry((relpath, "f", have.mode, have.size, b"", have.stamp, digest))
        self.cache.put(entry, digest, started)
        return digest

    def hash_file(self, relpath: bytes) -> str:
        """The sha256 of a local file (hex)."""
        hasher = hashlib.sha256()
        with open(self.root + b"/" + relpath, "rb") as stream:
            for data in iter(lambda: stream.read(CHUNK_SIZE), b""):
                hasher.update(data)
        return hasher.hexdigest()

    # changing the local folder

    def apply(self, plan: Plan, state: str | None) -> tuple[SyncSummary, list[Remote]]:
        """Carry out a plan; returns what it did and the files that changed while read."""
        if self.dry_run:
            return self._dry(plan, state), []
        for row in plan.folders:
            self._make_folder(row)
        for row in plan.links:
            self._make_link(row)
        for row in plan.unchanged:
            self._touch(row)
        for row, source in plan.copy:
            self._copy(row, source)
        fetcher = Fetcher(self, plan.verify + plan.send, {row.relpath for row in plan.verify})
        changing = fetcher.run()
        for path in plan.delete:
            self._remove_local(path)
        unchanged = plan.same + len(plan.unchanged) + fetcher.same
        summary = SyncSummary(
            files_sent=fetcher.files,
            bytes_sent=fetcher.bytes,
            files_unchanged=unchanged,
            files_deleted=len(plan.delete),
            files_copied=len(plan.copy),
            state=state,
        )
        return summary, changing

    def _dry(self, plan: Plan, state: str | None) -> SyncSummary:
        show = os.fsdecode
        send = plan.verify + plan.send
        return SyncSummary(
            files_sent=len(send),
            bytes_sent=sum(row.size for row in send),
            files_unchanged=plan.same + len(plan.unchanged),
            files_deleted=len(plan.delete),
            files_copied=len(plan.copy),
            state=state,
            dry_run=True,
            to_send=tuple(show(row.relpath) for row in send),
            to_copy=tuple(show(row.relpath) for row, _ in plan.copy),
            to_delete=tuple(show(path) for path in plan.delete),
        )

    def local_path(self, relpath: bytes) -> bytes:
        """The local path of a job's path, its folder made if missing; refused outside --to."""
        path = self.root + b"/" + relpath
        parent = os.path.dirname(path)
        if parent in self._safe:
            return path
        if not os.path.isdir(parent) or os.path.islink(parent):
            self._make_parents(relpath)
        real = os.path.realpath(parent)
        if real != self._real_root and not real.startswith(self._real_root + b"/"):
            raise InvalidInput(f"{os.fsdecode(path)} would be written outside {self.to}")
        self._safe.add(parent)
        return path

    def _make_parents(self, relpath: bytes) -> None:
        parts = relpath.split(b"/")[:-1]
        for count in range(1, len(parts) + 1):
            path = self.root + b"/" + b"/".join(parts[:count])
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                os.unlink(path)
            if not os.path.isdir(path):
                os.mkdir(path, 0o755)

    def _make_folder(self, row: Remote) -> None:
        path = self.local_path(row.relpath)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
        os.chmod(path, row.mode | 0o700)

    def _make_link(self, row: Remote) -> None:
        path = self.local_path(row.relpath)
        if os.path.lexists(path):
            self._remove_local(row.relpath)
        os.symlink(row.target, path)

    def _touch(self, row: Remote) -> None:
        """Give an unchanged file the server's mode (its time is already the server's)."""
        os.chmod(self.local_path(row.relpath), row.mode & 0o777)

    def _remove_local(self, relpath: bytes) -> None:
        path = self.local_path(relpath)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def _copy(self, row: Remote, source: bytes) -> None:
        partial = self.partial_path(row)
        shutil.copyfile(self.root + b"/" + source, partial)
        self.install(row, partial)

    def partial_path(self, row: Remote) -> bytes:
        """Where a file is written until it is whole: named by its path and version."""
        path = self._partials.get(row)
        if path is None:
            key = b"%s\0%d\0%d\0%d" % (row.relpath, row.size, row.mtime, row.inode)
            name = hashlib.sha256(key).hexdigest()[:40]
            path = self._partials[row] = self.root + f"/{PRIVATE}/{PARTIAL}/{name}".encode()
        return path

    def install(self, row: Remote, partial: bytes) -> None:
        """Put a whole file in place: its mode, the server's time, then an atomic rename."""
        os.chmod(partial, row.mode & 0o777)
        os.utime(partial, ns=(row.mtime, row.mtime))
        path = self.local_path(row.relpath)
        if os.path.isdir(path) and not os.path.islink(path):
            self._clear_folder(path)
        os.replace(partial, path)

    def _clear_folder(self, path: bytes) -> None:
        """Make room for a file where a folder is: only with --delete, or if it is empty."""
        if self.delete:
            shutil.rmtree(path)
            return
        try:
            os.rmdir(path)
        except OSError:
            raise InvalidInput(
                f"{os.fsdecode(path)} is a folder, a file in the job: use --delete to replace it"
            ) from None

    def finish(self) -> None:
        """Write the marker, drop partial files no longer needed, save the hash cache."""
        marker = {
            "format": MARKER_FORMAT,
            "job_id": self.job_id,
            "destination": self.destination,
            "queue": self.queue,
            "recent": sorted(os.fsdecode(path) for path in self.recent),
        }
        private = os.path.join(self.to, PRIVATE)
        tmp = os.path.join(private, MARKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as stream:
            json.dump(marker, stream)
        os.replace(tmp, os.path.join(private, MARKER))
        folder = os.path.join(private, PARTIAL)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        if self.cache is not None:
            entries = scan_local(self.root)
            self.cache.save(
                [
                    _make_entry((p, "f", e.mode, e.size, b"", e.stamp, ""))
                    for p, e in entries.items()
                ]
            )


READ_ROW = struct.Struct("<qqqqQ")  # see tej/server/handlers/sync.py sync_read


def _read_request(batch: list[tuple[Remote, int, int, str]]) -> dict[str, Any]:
    """sync_read's arguments for chunks (file, offset, length, digest of the local copy)."""
    pack = READ_ROW.pack
    return {
        "paths": b"\0".join(row.relpath for row, _, _, _ in batch),
        "numbers": b"".join(pack(o, n, r.size, r.mtime, r.inode) for r, o, n, _ in batch),
        "checks": [[index, chunk[3]] for index, chunk in enumerate(batch) if chunk[3]],
    }


def _stamped(row: Remote) -> list[Any]:
    """A file as the agent checks it: [path, size, mtime_ns, inode]."""
    return [row.relpath, row.size, row.mtime, row.inode]


class Fetcher:
    """Files read from the job into their partial files, then put in place.

    Small ones through sync_read, in pipelined batches (with the local digest
    of a file the local folder may hold already, so the agent answers "same"
    instead of its data); big ones as raw streams.
    """

    def __init__(self, syncer: Syncer, rows: list[Remote], verify: set[bytes]) -> None:
        from tej import rawstream

        self.s = syncer
        self.rows = rows
        self.small = [row for row in rows if row.size < rawstream.RAW_STREAM_MIN]
        self.big = [row for row in rows if row.size >= rawstream.RAW_STREAM_MIN]
        self.total = sum(row.size for row in rows)
        self.files = self.bytes = self.same = 0
        self.changing: list[Remote] = []
        self.verify = verify  # files the local folder has, of the same size: sent if they differ

    def run(self) -> list[Remote]:
        """Fetch every file; returns those that changed while they were read."""
        self._small()
        for row in self.big:
            self._big(row)
        return self.changing

    def advance(self, count: int) -> None:
        """Count bytes received."""
        self.bytes += count
        if self.s.progress is not None:
            self.s.progress(count, self.total)

    def _start(self, row: Remote) -> int:
        """Where a file's transfer starts: the length of its partial file, if any."""
        try:
            done = os.path.getsize(self.s.partial_path(row))
        except OSError:
            return 0
        return done if done <= row.size else 0

    def _small(self) -> None:
        batches: list[list[tuple[Remote, int, int, str]]] = [[]]
        size = 0
        partials = set(os.listdir(self.s.root + f"/{PRIVATE}/{PARTIAL}".encode()))
        for row in self.small:
            start = (
                self._start(row) if os.path.basename(self.s.partial_path(row)) in partials else 0
            )
            digest = self._local_digest(row) if start == 0 and row.size <= CHUNK_SIZE else ""
            if start >= row.size and row.size:
                self._done(row, self.s.partial_path(row))
                continue
            for offset in range(start, max(row.size, 1), CHUNK_SIZE):
                length = min(CHUNK_SIZE, row.size - offset)
                batches[-1].append((row, offset, length, digest))
                size += length + 100
                if size >= BATCH_SIZE:
                    batches.append([])
                    size = 0
        batches = [batch for batch in batches if batch]
        requests = [("sync_read", _read_request(batch)) for batch in batches]
        writer = _Writer(self)
        for batch, answers in zip(batches, self.s.pipeline(requests)):
            for (row, offset, _, _), answer in zip(batch, answers):
                writer.take(row, offset, answer)
        writer.close()

    def _local_digest(self, row: Remote) -> str:
        """The local file's digest, for a file of the same size whose time differs."""
        if row.relpath not in self.verify or not row.size:
            return ""
        return self.s.hash_file(row.relpath)

    def _big(self, row: Remote) -> None:
        from tej import rawstream

        if row.relpath in self.verify:
            digest = self.s.call(
                "sync_hash", files=[[row.relpath, row.size, row.mtime, row.inode]]
            )[0]
            if digest is not None and digest == self.s.hash_file(row.relpath):
                self._done_same(row)
                return
        identity = self.s.call("file_identity", path=row.relpath)
        if (identity[2], identity[3]) != (row.inode, row.size):
            self.changing.append(row)
            return
        partial = self.s.partial_path(row)
        with _locked_partial(partial, row.size) as out:
            start = out.tell()
            try:
                rawstream.download_to(
                    self.s.session(), identity, out, self.advance, start, (row.size, row.mtime)
                )
            except rawstream.FileChanged:
                self.changing.append(row)
                os.unlink(partial)
                return
        self._done(row, partial)

    def _done(self, row: Remote, partial: bytes) -> None:
        self.s.install(row, partial)
        self.files += 1

    def _done_same(self, row: Remote) -> None:
        os.utime(self.s.root + b"/" + row.relpath, ns=(row.mtime, row.mtime))
        os.chmod(self.s.root + b"/" + row.relpath, row.mode & 0o777)
        self.same += 1


def _locked_partial(path: bytes, size: int) -> BinaryIO:
    """A big file's partial file, opened to append to, locked (flock) while it is written.

    A raw stream's process may outlive a client killed mid-transfer, and go on
    appending to its partial file, which it keeps locked: such a file is left to
    it (unlinked) and a new one started.
    """
    import fcntl

    for _ in range(2):
        stream = open(path, "ab")  # noqa: SIM115 - returned
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            os.unlink(path)
            continue
        if stream.tell() > size:
            stream.truncate(0)
        return stream
    raise InvalidInput(f"Can't lock {os.fsdecode(path)}: is another tej sync writing there?")


class _Writer:
    """Writes sync_read's answers into partial files, one file at a time, in order."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.f = fetcher
        self.row: Remote | None = None
        self.stream: Any = None
        self.skip: bytes | None = None  # a file that changed: its other chunks are ignored

    def take(self, row: Remote, offset: int, answer: Any) -> None:
        """One chunk's answer: data, None (the file changed) or True (the same as ours)."""
        if row.relpath == self.skip:
            return
        if answer is None or answer is True:
            self._drop(row)
            self.skip = row.relpath
            if answer is None:
                self.f.changing.append(row)
            else:
                self.f._done_same(row)
            return
        if not isinstance(answer, bytes):
            raise ProtocolError("Unexpected answer to sync_read")
        if self.row is not row:
            self.close()
            self.row, self.stream = row, open(self.f.s.partial_path(row), "ab")  # noqa: SIM115
        self.stream.write(answer)
        self.f.advance(len(answer))
        if offset + len(answer) >= row.size:
            self.close()
            self.f._done(row, self.f.s.partial_path(row))

    def _drop(self, row: Remote) -> None:
        if self.row is row:
            self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.f.s.partial_path(row))

    def close(self) -> None:
        """Close the file being written (complete or not)."""
        if self.stream is not None:
            self.stream.close()
        self.row = self.stream = None


def follow(
    syncer: Syncer, interval: float, sleep: Callable[[float], None] = time.sleep
) -> Iterator[SyncSummary]:
    """Pass after pass, every interval seconds, until a pass made after the job ended."""
    first = True
    while True:
        started = time.monotonic()
        summary = syncer.run(missing_ok=True, idle_ok=not first)
        first = False
        yield summary
        if summary.state not in protocol.ACTIVE_STATES:
            return
        sleep(max(0.0, interval - (time.monotonic() - started)))
