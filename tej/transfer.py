"""Moving files: a job directory up to the server, a job's files back down.

Data moves in chunks of at most CHUNK_SIZE, batched into requests of about
BATCH_SIZE, with a window of requests in flight (Session.pipeline), so many
small files cost no round trip each and large files stream without filling
either side's memory.

Uploads are content-addressed: the client sends the manifest with the sha256
of every file, the server links in what its store already holds and names
the rest, and only those contents are sent. Digests are cached on the client
(HashCache), so an unchanged file is not read again. The few small files that
changed since they were last hashed are sent with the manifest, and so is the
request to submit the job: a directory submitted again with a small change
costs one request.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from tej.errors import InvalidInput, ProtocolError, TejError
from tej.hashcache import HashCache, file_stamp

if TYPE_CHECKING:
    from tej.excludes import Excludes
    from tej.hashcache import Key
    from tej.session import Session

    #: The digests a hash cache knows, by (relative path, stamp).
    Known = dict[Key, str]
    #: Called with (bytes just moved, total bytes of the transfer). Only for type
    #: checking: collections.abc's Callable[...] can't be made at run time before 3.9.
    Progress = Callable[[int, int], None]

CHUNK_SIZE = 1 << 20
BATCH_SIZE = 1 << 20
WINDOW = 8
#: At most this many bytes of new or changed files are sent with the manifest (TreePart.eager):
#: about what a round trip could carry, so that a wrong guess costs little.
EAGER_BYTES = 64 * 1024
#: A manifest is sent in parts of about this many entries, as the directory is read.
PART_ENTRIES = 1000


class Entry(NamedTuple):
    """One file, folder or symlink of a tree, with its path relative to the tree's root."""

    relpath: bytes
    kind: str  # "f" file, "d" folder, "l" symlink (the agent's manifest kinds)
    mode: int
    size: int = 0
    target: bytes = b""
    stamp: tuple[int, ...] = ()  # a file's (size, mtime_ns, ctime_ns, inode, device)
    digest: str = ""  # the sha256 of a file's content (hex), once hashed


_make_entry: Callable[[tuple[Any, ...]], Entry] = functools.partial(tuple.__new__, Entry)
_FORMAT = 0o170000  # stat.S_IFMT's bits


def encode_manifest(entries: list[Entry]) -> dict[str, Any]:
    """The agent's manifest of entries (hashed): columns, see remote_agent.parse_manifest."""
    count = len(entries)
    return {
        "paths": b"\0".join(entry.relpath for entry in entries),
        "kinds": "".join(entry.kind for entry in entries),
        "modes": struct.pack(f"<{count}H", *(entry.mode & 0o7777 for entry in entries)),
        "sizes": struct.pack(f"<{count}Q", *(entry.size for entry in entries)),
        "digests": bytes.fromhex("".join(entry.digest for entry in entries)),
        "targets": b"\0".join(entry.target for entry in entries if entry.kind == "l"),
    }


@dataclass(frozen=True)
class TreePart:
    """Part of a job directory ready to be sent: entries from `start` on, hashed, their manifest.

    eager (in the last part only): the contents of small files the hash cache
    had never seen, new or changed since the directory was last hashed (so the
    server likely lacks them too), as (index of the entry in the tree, content).
    """

    start: int
    entries: list[Entry]
    manifest: dict[str, Any]
    eager: list[tuple[int, bytes]] = field(default_factory=list)
    last: bool = False


@dataclass(frozen=True)
class UploadPlan:
    """The server's answer to a manifest: the upload's token, what it lacks, and the job."""

    token: str
    entries: list[Entry]  # the whole tree's
    missing: list[tuple[int, int]]  # (index of the entry, offset to send it from)
    sent: int = 0  # bytes of contents sent with the manifest
    job_id: str | None = None  # the job, if it was submitted at once


# -- upload -----------------------------------------------------------------


def check_directory(root: str) -> None:
    """Refuse a job directory that doesn't exist or isn't a directory."""
    if not os.path.exists(root):
        raise InvalidInput(f"No such directory: {root}")
    if not os.path.isdir(root):
        raise InvalidInput(f"Not a directory: {root}")


def scan_directory(root: str) -> list[Entry]:
    """List a job directory for upload, refusing what can't be sent faithfully."""
    check_directory(root)
    return scan(root)


def scan(root: str, excludes: Excludes | None = None) -> list[Entry]:
    """List a directory: each folder's entries sorted, folders first, then its sub-folders'.

    What excludes leaves out isn't listed (nor read, for a folder).
    """
    walk = _walk(os.fsencode(root), b"", {}, excludes)
    return [entry for entries in walk for entry in entries]


def _walk(
    base: bytes, prefix: bytes, known: Known, excludes: Excludes | None
) -> Iterator[list[Entry]]:
    """The entries of the folder at prefix (its folders, then the rest), then its sub-folders'.

    A file whose digest `known` has gets it.
    """
    folders, others = _list_folder(base, prefix, known, excludes)
    yield folders + others
    for entry in folders:
        yield from _walk(base, entry.relpath + b"/", known, excludes)


def _list_folder(
    base: bytes, prefix: bytes, known: Known, excludes: Excludes | None
) -> tuple[list[Entry], list[Entry]]:
    folder = base + b"/" + prefix if prefix else base
    try:
        with os.scandir(folder) as items:
            found = sorted(items, key=_name_of)
    except OSError as exc:
        raise InvalidInput(f"Can't read {os.fsdecode(folder)}: {exc.strerror}") from None
    if excludes is not None:  # before anything is read: an excluded item may be unreadable
        found = [item for item in found if not _excluded(excludes, prefix, item)]
    folders: list[Entry] = []
    others: list[Entry] = []
    for item in found:
        try:
            info = item.stat(follow_symlinks=False)
        except OSError as exc:
            raise InvalidInput(f"Can't read {os.fsdecode(item.path)}: {exc.strerror}") from None
        mode = info.st_mode
        kind = mode & _FORMAT
        if kind == stat.S_IFREG:  # whether it can be read: see _Hasher
            size = info.st_size
            relpath = prefix + item.name
            stamp = file_stamp(info)
            digest = known.get((relpath, stamp), "") if size else ""
            others.append(_make_entry((relpath, "f", mode & 0o7777, size, b"", stamp, digest)))
        elif kind == stat.S_IFDIR:
            if not os.access(item.path, os.R_OK | os.X_OK):
                raise InvalidInput(f"Can't read the folder {os.fsdecode(item.path)}")
            folders.append(Entry(prefix + item.name, "d", mode & 0o7777))
        elif kind == stat.S_IFLNK:
            try:
                target = os.readlink(item.path)
            except OSError as exc:
                what = os.fsdecode(item.path)
                raise InvalidInput(f"Can't read {what}: {exc.strerror}") from None
            others.append(Entry(prefix + item.name, "l", 0o777, 0, target))
        else:
            what = os.fsdecode(item.path)
            raise InvalidInput(f"Can't upload {what}: only files, folders and symlinks can be sent")
    return folders, others


def _name_of(item: os.DirEntry[bytes]) -> bytes:
    return item.name


def _excluded(excludes: Excludes, prefix: bytes, item: os.DirEntry[bytes]) -> bool:
    try:
        is_folder = item.is_dir(follow_symlinks=False)
    except OSError:
        is_folder = False
    return excludes(prefix + item.name, is_folder)


def scan_tree(
    root: str, part_size: int | None = None, excludes: Excludes | None = None
) -> Iterator[TreePart]:
    """Scan and hash a job directory, in parts of about part_size entries (at least one part).

    A part comes as soon as it is read, so that the server lays it out while
    the rest is read; each is held until the next one is ready, so that the
    last one says it is. The hash cache is saved after the last part. What
    excludes leaves out is neither listed nor read.
    """
    hasher = _Hasher(root)
    part_size = part_size or PART_ENTRIES
    held: TreePart | None = None
    batch: list[Entry] = []
    start = 0
    for entries in _walk(os.fsencode(root), b"", hasher.cache.known, excludes):
        batch += entries
        if len(batch) >= part_size:
            if held is not None:
                yield held
            held = hasher.part(start, batch)
            start, batch = start + len(batch), []
    if batch or held is None:
        if held is not None:
            yield held
        held = hasher.part(start, batch)
    yield dataclasses.replace(held, eager=hasher.eager, last=True)
    hasher.save()


def hash_files(root: str, entries: list[Entry]) -> list[Entry]:
    """The entries with the digest of every non-empty file (from the cache where it can)."""
    hasher = _Hasher(root)
    hashed = hasher.hash(0, entries)
    hasher.save()
    return hashed


class _Hasher:
    """Hashes a tree's files, part by part, with the tree's HashCache.

    Files the cache doesn't know are checked to be readable, empty ones too (a
    file made unreadable has a new ctime: the cache doesn't know it anymore).
    Small ones the cache has never seen are kept whole, up to EAGER_BYTES, to
    be sent with the manifest.
    """

    def __init__(self, root: str) -> None:
        self.cache = HashCache(root)
        self.base = os.fsencode(root)
        self.hashed: list[Entry] = []
        self.eager: list[tuple[int, bytes]] = []
        self.budget = EAGER_BYTES

    def part(self, start: int, entries: list[Entry]) -> TreePart:
        """The part of the tree made of entries, from index start on, hashed."""
        hashed = self.hash(start, entries)
        return TreePart(start, hashed, encode_manifest(hashed))

    def hash(self, start: int, entries: list[Entry]) -> list[Entry]:
        """The entries with the digest of every non-empty file (some may have theirs already)."""
        known = self.cache.known
        hashed = list(entries)
        for at, entry in enumerate(entries):
            if entry.kind == "f" and not entry.digest:
                digest = known.get((entry.relpath, entry.stamp)) if entry.size else None
                if digest is None:
                    digest = self._hash(start + at, entry)
                if digest:
                    hashed[at] = _make_entry((*entry[:6], digest))
        self.hashed += hashed
        return hashed

    def _hash(self, index: int, entry: Entry) -> str:
        path = self.base + b"/" + entry.relpath
        if not os.access(path, os.R_OK):
            raise InvalidInput(f"Can't read the file {os.fsdecode(path)}")
        if not entry.size:
            return ""
        started = time.time_ns()
        if entry.size <= self.budget and not self.cache.saw((entry.relpath, entry.stamp)):
            data = _read_whole(path, entry.size)
            digest = hashlib.sha256(data).hexdigest()
            self.eager.append((index, data))
            self.budget -= entry.size
        else:
            digest = _hash_file(path, entry.size)
        self.cache.put((entry.relpath, entry.stamp), digest, started)
        return digest

    def save(self) -> None:
        """Save the hash cache, with the files hashed."""
        self.cache.save((e.relpath, e.stamp) for e in self.hashed if e.kind == "f")


def _hash_file(path: bytes, size: int) -> str:
    hasher = hashlib.sha256()
    for _, data in _read_chunks(path, size):
        hasher.update(data)
    return hasher.hexdigest()


def _read_whole(path: bytes, size: int) -> bytes:
    return b"".join(data for _, data in _read_chunks(path, size))


def new_token() -> str:
    """A fresh upload token: the time and a random part, in hex (as the agent makes them)."""
    return "%x%s" % (int(time.time()), os.urandom(4).hex())


def begin_upload(
    session: Session,
    queue: str,
    parts: Iterable[TreePart],
    token: str,
    submit: dict[str, Any] | None = None,
) -> UploadPlan:
    """Send the manifest part by part as it comes; the server answers what it lacks.

    token: the upload's (new_token()). The last part carries the eager
    contents, and submit, the arguments of the agent's submit: the job is
    submitted at once if nothing is missing (the plan's job_id). A problem
    with the directory, found while it is read, stops the upload and is
    raised: the caller aborts the upload.
    """
    entries: list[Entry] = []
    eager: list[tuple[int, bytes]] = []
    failed: list[Exception] = []

    def requests() -> Iterator[tuple[str, dict[str, Any]]]:
        source = iter(parts)
        while True:
            try:
                part = next(source)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - raised once the replies are in
                failed.append(exc)
                return
            entries.extend(part.entries)
            args: dict[str, Any] = {"queue": queue, "token": token, "manifest": part.manifest}
            if not part.last:
                args["more"] = True
            else:
                eager.extend(part.eager)
                if part.eager:
                    args["contents"] = [[index, data] for index, data in part.eager]
                if submit is not None:
                    args["submit"] = submit
            yield ("upload_manifest" if part.start else "upload_begin"), args
            if part.last:
                for _ in source:  # the reader's end (saving the hash cache), as the server works
                    pass
                return

    try:
        replies = list(session.pipeline(requests(), WINDOW))
    except TejError:
        if not failed:
            raise
    if failed:  # a problem with the directory comes first
        raise failed[0]
    return _plan(token, entries, eager, replies[-1])


def _plan(
    token: str, entries: list[Entry], eager: list[tuple[int, bytes]], reply: Any
) -> UploadPlan:
    """The plan a reply to the manifest's last part gives."""
    try:
        missing = [(int(index), int(offset)) for index, offset in json.loads(reply["missing"])]
        job_id = reply.get("job_id")
        if reply["token"] != token:
            raise ValueError
        if not all(0 <= offset <= entries[index].size for index, offset in missing):
            raise ValueError
        if job_id is not None and (missing or not isinstance(job_id, str)):
            raise ValueError
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        raise ProtocolError(f"Unexpected reply from the agent: {reply!r:.200}") from None
    return UploadPlan(token, entries, missing, sum(len(data) for _, data in eager), job_id)


def upload_tree(
    session: Session,
    queue: str,
    plan: UploadPlan,
    root: str,
    progress: Progress | None = None,
) -> None:
    """Send the contents the server lacks; progress counts the bytes sent, of all to send.

    The bytes sent with the manifest (plan.sent) count as sent first.
    """
    base = os.fsencode(root)
    entries = plan.entries
    total = plan.sent + sum(entries[index].size - offset for index, offset in plan.missing)
    if progress is not None and plan.sent:
        progress(plan.sent, total)
    sizes: collections.deque[int] = collections.deque()

    def requests() -> Iterator[tuple[str, dict[str, Any]]]:
        for batch in _upload_batches(base, entries, plan.missing):
            sizes.append(sum(len(chunk[2]) for chunk in batch))
            yield "upload_data", {"queue": queue, "token": plan.token, "chunks": batch}

    for _ in session.pipeline(requests(), WINDOW):
        if progress is not None:
            progress(sizes.popleft(), total)


def _upload_batches(
    base: bytes, entries: list[Entry], missing: list[tuple[int, int]]
) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    size = 0
    for index, start in missing:
        entry = entries[index]
        for offset, data in _read_chunks(os.path.join(base, entry.relpath), entry.size, start):
            batch.append([index, offset, data])
            size += len(data)
            if size >= BATCH_SIZE:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _read_chunks(path: bytes, size: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as stream:
            stream.seek(start)
            offset = start
            while offset < size:
                data = stream.read(min(CHUNK_SIZE, size - offset))
                if not data:
                    raise InvalidInput(f"{os.fsdecode(path)} shrank while it was being uploaded")
                yield offset, data
                offset += len(data)
    except OSError as exc:
        raise InvalidInput(f"Can't read {os.fsdecode(path)}: {exc.strerror}") from None


# -- download ---------------------------------------------------------------


def list_remote(session: Session, queue: str, job_id: str, remote: str) -> list[Entry]:
    """Describe a job's file or folder (first entry: the path itself)."""
    rows = session.call("list_files", queue=queue, job_id=job_id, path=os.fsencode(remote))
    entries = []
    for relpath, kind, mode, extra in rows:
        if kind == "l":
            entries.append(Entry(relpath, kind, mode, target=extra))
        else:
            entries.append(Entry(relpath, kind, mode, size=extra if kind == "f" else 0))
    return entries


def stream_file(
    session: Session,
    queue: str,
    job_id: str,
    remote: str,
    size: int,
    progress: Progress | None = None,
) -> Iterator[bytes]:
    """Yield the content of a job's file, chunk by chunk."""
    files = [(os.fsencode(remote), size)]
    for _, _, data in _fetch(session, queue, job_id, files, progress):
        yield data


def download_tree(
    session: Session,
    queue: str,
    job_id: str,
    remote: str,
    entries: list[Entry],
    local: str,
    progress: Progress | None = None,
) -> None:
    """Download a job's file or folder to local, atomically (all or nothing)."""
    parent = os.path.dirname(os.path.abspath(local))
    if entries[0].kind == "d" and os.path.lexists(local):
        raise InvalidInput(f"Can't download the folder {remote} to {local}: it already exists")
    if not os.path.isdir(parent):
        raise InvalidInput(f"No such local folder: {parent}")
    try:
        if entries[0].kind == "f":
            _download_file(session, queue, job_id, remote, entries[0], local, progress)
        else:
            _download_folder(session, queue, job_id, remote, entries, local, progress)
    except OSError as exc:
        raise InvalidInput(f"Can't write {local}: {exc.strerror or exc}") from None


def _download_file(
    session: Session,
    queue: str,
    job_id: str,
    remote: str,
    entry: Entry,
    local: str,
    progress: Progress | None,
) -> None:
    fd, partial = tempfile.mkstemp(
        prefix=".tej-partial-", dir=os.path.dirname(os.path.abspath(local))
    )
    try:
        with os.fdopen(fd, "wb") as stream:
            if not _raw_download(session, queue, job_id, remote, entry.size, stream, progress):
                for data in stream_file(session, queue, job_id, remote, entry.size, progress):
                    stream.write(data)
        os.chmod(partial, entry.mode & 0o777)
        os.replace(partial, local)
    except BaseException:
        _remove(partial)
        raise


def _raw_download(
    session: Session,
    queue: str,
    job_id: str,
    remote: str,
    size: int,
    stream: BinaryIO,
    progress: Progress | None,
) -> bool:
    """Download a big file as a raw stream (see tej.rawstream); False if it couldn't start."""
    from tej import rawstream

    if size < rawstream.RAW_STREAM_MIN:
        return False
    identity = session.call("file_identity", queue=queue, job_id=job_id, path=os.fsencode(remote))

    def advance(count: int) -> None:
        if progress is not None:
            progress(count, size)

    stream.flush()
    try:
        rawstream.download_to(session, identity, stream, advance)
    except rawstream.RawStreamFailed as exc:
        if exc.received:
            raise
        return False  # it couldn't even start: the session's chunks will do
    return True


def _download_folder(
    session: Session,
    queue: str,
    job_id: str,
    remote: str,
    entries: list[Entry],
    local: str,
    progress: Progress | None,
) -> None:
    partial = tempfile.mkdtemp(prefix=".tej-partial-", dir=os.path.dirname(os.path.abspath(local)))
    base = os.fsencode(partial)
    try:
        files = _create_skeleton(base, entries)
        prefix = os.fsencode(remote).rstrip(b"/") + b"/"
        remote_files = [(prefix + entry.relpath, entry.size) for entry in files]
        local_paths = {prefix + entry.relpath: os.path.join(base, entry.relpath) for entry in files}
        for path, offset, data in _fetch(session, queue, job_id, remote_files, progress):
            with open(local_paths[path], "r+b") as stream:
                stream.seek(offset)
                stream.write(data)
        _apply_modes(base, entries)
        os.rename(partial, local)
    except BaseException:
        _remove(partial)
        raise


def _create_skeleton(base: bytes, entries: list[Entry]) -> list[Entry]:
    """Create folders, empty files and symlinks; return the files to fill."""
    files = []
    for entry in entries[1:]:
        path = os.path.join(base, entry.relpath)
        if entry.kind == "d":
            os.makedirs(path, 0o700, exist_ok=True)
        elif entry.kind == "f":
            with open(path, "wb"):
                files.append(entry)
        elif entry.kind == "l":
            os.symlink(entry.target, path)
    return files


def _apply_modes(base: bytes, entries: list[Entry]) -> None:
    for entry in entries:
        if entry.kind == "f":
            os.chmod(os.path.join(base, entry.relpath), entry.mode & 0o777)
    folders = [entry for entry in entries if entry.kind == "d"]
    for entry in sorted(folders, key=lambda e: e.relpath.count(b"/"), reverse=True):
        path = os.path.join(base, entry.relpath) if entry.relpath else base
        os.chmod(path, (entry.mode & 0o777) | 0o700)


def _fetch(
    session: Session,
    queue: str,
    job_id: str,
    files: list[tuple[bytes, int]],
    progress: Progress | None = None,
) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (path, offset, data) for every chunk of the given files."""
    total = sum(size for _, size in files)
    batches = list(_read_batches(files))
    requests = (
        ("read_chunks", {"queue": queue, "job_id": job_id, "chunks": batch}) for batch in batches
    )
    for batch, results in zip(batches, session.pipeline(requests, WINDOW)):
        for (path, offset, _), data in zip(batch, results):
            if progress is not None:
                progress(len(data), total)
            yield path, offset, data


def _read_batches(files: list[tuple[bytes, int]]) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    size = 0
    for path, length in files:
        for offset in range(0, length, CHUNK_SIZE):
            chunk = min(CHUNK_SIZE, length - offset)
            batch.append([path, offset, chunk])
            size += chunk
            if size >= BATCH_SIZE:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            for folder, dirs, _ in os.walk(path):
                for name in dirs:
                    os.chmod(os.path.join(folder, name), 0o700)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def write_to(stream: BinaryIO, chunks: Iterator[bytes]) -> int:
    """Copy chunks to a binary stream; returns the number of bytes written."""
    total = 0
    for data in chunks:
        stream.write(data)
        total += len(data)
    stream.flush()
    return total
