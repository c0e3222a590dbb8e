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
read is read again. The small files modified since the previous listing (its
server time is kept in the marker) come with the listing (sync_list's
contents_since): the Fetcher takes one instead of reading it when its stamp is
the listed one, so a re-sync of a few changed files is one request.

Here: `Syncer` (a pass: the listing, the plan, carrying it out) and `follow`;
`listing` decodes the agent's listing and finds, in bulk, the files the local
folder has already; `local` is the local folder (its private folder, marker
and scan); `fetch` reads files into partial files; `summary` is what a pass
did (`SyncSummary`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, BinaryIO

from tej import protocol
from tej.errors import InvalidInput, ProtocolError
from tej.excludes import sync_excludes
from tej.hashcache import HashCache
from tej.sync.fetch import Fetcher
from tej.sync.listing import PRIVATE_PATH, Listed, Remote, decode_listing, path_of, same_files
from tej.sync.local import (
    LOCK,
    MARKER,
    MARKER_FORMAT,
    PARTIAL,
    PRIVATE,
    Local,
    LocalScan,
    check_folder,
    holds_others,
    prepare_destination,
    read_marker,
    scan_local,
)
from tej.sync.summary import SyncSummary
from tej.transfer import CHUNK_SIZE, WINDOW

if TYPE_CHECKING:
    from tej.session import Session
    from tej.transfer import Progress


__all__ = [
    "LOCK",
    "MARKER",
    "MARKER_FORMAT",
    "PARTIAL",
    "PRIVATE",
    "Fetcher",
    "Local",
    "Plan",
    "Remote",
    "SyncSummary",
    "Syncer",
    "check_folder",
    "check_interval",
    "check_job_path",
    "decode_listing",
    "follow",
    "prepare_destination",
    "read_marker",
    "scan_local",
]

#: A file modified this recently on the server (ns) is checked by content on the next pass:
#: a change within the same timestamp tick would not show in its size and time.
RECENT = 2 * 10**9
#: A file that keeps changing while it is read is tried this many times in a pass.
ATTEMPTS = 3
#: The shortest interval between a follow's passes (seconds): each pass is a request.
MIN_INTERVAL = 0.1
#: Below this size, a file the local folder may hold elsewhere is just sent (a hash costs more).
COPY_MIN = 64 * 1024


def check_interval(interval: float) -> None:
    """Refuse a follow's interval shorter than MIN_INTERVAL (or not a number)."""
    if not interval >= MIN_INTERVAL:
        raise InvalidInput(
            f"The interval (--interval) must be at least {MIN_INTERVAL} seconds, not {interval}"
        )


def check_job_path(path: str) -> bytes:
    """A path of the job asked for on the command line, checked before anything is sent."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise InvalidInput(f"The path {path!r} leaves the job's directory")
    return "/".join(parts).encode("utf-8", "surrogateescape")


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
        session: Callable[..., Session],
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
        #: The files put in place by the current attempt of a pass (see install).
        self.installed: set[bytes] = set()
        marker = read_marker(self.to) if os.path.isdir(self.to) else None
        #: Whether the folder held other things when this job's first sync into it began:
        #: kept in the marker, it makes --delete ask for --force (see prepare_destination).
        self.held_others = holds_others(self.to, job_id, marker)
        same = marker is not None and marker.get("job_id") == job_id
        self._marked = same  # the folder's marker is this job's
        recent = marker.get("recent", []) if same and marker is not None else []
        self.recent = {os.fsencode(path) for path in recent if isinstance(path, str)}
        listed_at = marker.get("listed_at") if same and marker is not None else None
        #: The server's time of the last listing (ns): its small files modified since (within
        #: RECENT) come with the next listing, in preloaded: {relpath: (size, mtime, inode, data)}.
        self.listed_at = listed_at if isinstance(listed_at, int) else None
        self.preloaded: dict[bytes, tuple[int, int, int, bytes]] = {}
        #: The folders the last listing could not look into, each "PATH/ (why)".
        self.unreadable: tuple[str, ...] = ()

    # talking to the agent

    def call(self, op: str, **args: Any) -> Any:
        """One request about the job."""
        self.requests += 1
        request = {"queue": self.queue, "job_id": self.job_id, **args}
        return self.session((op, request)).call(op, **request)

    def pipeline(self, requests: list[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
        """Requests about the job, pipelined."""
        self.requests += len(requests)
        common = {"queue": self.queue, "job_id": self.job_id}
        return self.session().pipeline(((op, {**common, **a}) for op, a in requests), WINDOW)

    def refresh(self, missing_ok: bool) -> tuple[bool, str | None, int]:
        """List what changed on the server: (anything changed, the job's state, server time)."""
        args: dict[str, Any] = {"paths": self.paths, "since": self.token, "missing_ok": missing_ok}
        if self.listed_at is not None and not self.dry_run:
            args["contents_since"] = self.listed_at - RECENT
        reply = self.call("sync_list", **args)
        self.preloaded = _preloaded(reply.get("contents", []))
        if reply["full"]:
            self.listing = {}
        changed = decode_listing(reply["entries"])
        removed = [path for path in reply["removed"].split(b"\0") if path]
        for path in removed:
            self.listing.pop(path, None)
        self.listing.update(zip(map(path_of, changed), changed))
        if PRIVATE.encode() in reply["entries"]["paths"]:
            # A job's own .tej-sync (a sync into a job) can't be mirrored.
            for path in list(filter(PRIVATE_PATH.match, self.listing)):
                del self.listing[path]
        self.token = reply["token"]
        self.listed_at = int(reply["now"])
        self.unreadable = tuple(
            f"{os.fsdecode(path)}/ (Permission denied)" for path in reply.get("unreadable", [])
        )
        return bool(reply["full"] or changed or removed), reply["state"], self.listed_at

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
        if not self._marked:  # before any file of the job is written: held_others is kept
            self._write_marker(listed_at=None, recent=set())
            self._marked = True

    def run(self, missing_ok: bool = False, idle_ok: bool = False) -> SyncSummary:
        """One pass; with idle_ok, a pass where nothing changed on the server does nothing more."""
        start = self.requests
        if self.token is None and self.listed_at is None and not self.dry_run:
            _load_ahead()  # a re-sync's changed small files are likely to come with the listing
        collecting = gc.isenabled()
        gc.disable()  # a pass makes tens of thousands of tuples, and frees them all at once
        try:
            return self._run(missing_ok, idle_ok, start)
        finally:
            if collecting:
                gc.enable()

    def _run(self, missing_ok: bool, idle_ok: bool, start: int) -> SyncSummary:
        totals = SyncSummary(dry_run=self.dry_run)
        changing: list[Remote] = []
        installed: set[bytes] = set()  # by the attempts before this one
        for attempt in range(ATTEMPTS):
            self.installed = set()
            # The local folder is read while the server lists the job's files.
            local = None if idle_ok and attempt == 0 else LocalScan(self.root)
            changed, state, now = self.refresh(missing_ok)
            self.lock()  # the folder is made once the job's files are known
            if local is None and not changed:
                files = sum(1 for row in self.listing.values() if row[1] == "f")
                return SyncSummary(
                    files_unchanged=files, state=state, requests=1, unreadable=self.unreadable
                )
            try:
                if local is None:
                    local = LocalScan(self.root)
                found = local.result()
                summary, changing = self.apply(self.plan(now, found), state)
            except OSError as exc:
                where = os.fsdecode(exc.filename) if exc.filename else self.to
                raise InvalidInput(f"Can't write {where}: {exc.strerror or exc}") from None
            # What an attempt installed, a later one finds unchanged: not counted twice.
            again = installed - self.installed - {row.relpath for row in changing}
            summary = replace(
                summary, files_unchanged=summary.files_unchanged - len(again & self.listing.keys())
            )
            totals = totals.then(summary)
            installed |= self.installed
            if not changing:
                break
        if not self.dry_run:
            self.finish()
        return replace(totals, files_changing=len(changing), requests=self.requests - start)

    def plan(self, now: int, local: dict[bytes, Local]) -> Plan:
        """Compare the listing with the local folder (as scan_local found it)."""
        self._safe = set()
        plan = Plan()
        skipped = self._excluded((path, row[1] == "d") for path, row in self.listing.items())
        same = same_files(self.listing, local) - self.recent - skipped
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
        return self.cache.get((relpath, have.stamp))

    def _hash_local(self, relpath: bytes, have: Local) -> str:
        assert self.cache is not None
        started = time.time_ns()
        digest = self.hash_file(relpath)
        self.cache.put((relpath, have.stamp), digest, started)
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
            unreadable=self.unreadable + tuple(fetcher.unreadable),
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
        if os.path.isdir(path) and not os.path.islink(path):
            self._clear_folder(path)
        elif os.path.lexists(path):
            os.unlink(path)
        os.symlink(row.target, path)

    def _touch(self, row: Remote) -> None:
        """Give an unchanged file the server's mode (its time is already the server's)."""
        os.chmod(self.local_path(row.relpath), row.mode & 0o777)

    def _remove_local(self, relpath: bytes) -> None:
        """Remove a local path the job no longer has (gone already if its folder is)."""
        parent = self.root + b"/" + relpath.rpartition(b"/")[0]
        if not os.path.isdir(parent) or os.path.islink(parent):
            return  # replaced by a file or a link of the job: its folder's things went with it
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
        self.installed.add(row.relpath)

    def _clear_folder(self, path: bytes) -> None:
        """Make room for a file or link where a folder is: only with --delete, or if it is
        empty."""
        if self.delete:
            shutil.rmtree(path)
            return
        try:
            os.rmdir(path)
        except OSError:
            raise InvalidInput(
                f"{os.fsdecode(path)} is a folder, not one in the job: use --delete to replace it"
            ) from None

    def finish(self) -> None:
        """Write the marker, drop partial files no longer needed, save the hash cache."""
        self._write_marker(self.listed_at, self.recent)
        folder = os.path.join(self.to, PRIVATE, PARTIAL)
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        if self.cache is not None:
            entries = scan_local(self.root)
            self.cache.save((p, e.stamp) for p, e in entries.items() if e.kind == "f")

    def _write_marker(self, listed_at: int | None, recent: set[bytes]) -> None:
        """Replace the folder's marker (atomically): this job's, as of listed_at."""
        marker = {
            "format": MARKER_FORMAT,
            "job_id": self.job_id,
            "held_others": self.held_others,
            "destination": self.destination,
            "queue": self.queue,
            "recent": sorted(os.fsdecode(path) for path in recent),
            "listed_at": listed_at,
        }
        private = os.path.join(self.to, PRIVATE)
        tmp = os.path.join(private, MARKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as stream:
            json.dump(marker, stream)
        os.replace(tmp, os.path.join(private, MARKER))


def _preloaded(contents: Any) -> dict[bytes, tuple[int, int, int, bytes]]:
    """sync_list's contents ([[relpath, mtime, inode, data]]) by path: (size, mtime, inode,
    data), the stamp the Fetcher checks against the listing before using one."""
    found = {}
    try:
        for relpath, mtime, inode, data in contents:
            if not (isinstance(relpath, bytes) and isinstance(data, bytes)):
                raise TypeError
            found[relpath] = (len(data), int(mtime), int(inode), data)
    except (TypeError, ValueError):
        raise ProtocolError("Unexpected contents in the agent's listing") from None
    return found


def _load_ahead() -> None:
    """Load what reading files needs (execnet's gateway_base, tej.rawstream) in a thread,
    while the first listing is on its way: it comes with the bootstrap, without them."""
    import threading

    def load() -> None:
        from tej.gateway import gateway_base

        gateway_base()
        import tej.rawstream  # noqa: F401 - loaded for the Fetcher

    threading.Thread(target=load, daemon=True).start()


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
