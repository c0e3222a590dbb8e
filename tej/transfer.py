"""Moving files: a job directory up to the server, a job's files back down.

Data moves in chunks of at most CHUNK_SIZE, batched into requests of about
BATCH_SIZE, with a window of requests in flight (Session.pipeline), so many
small files cost no round trip each and large files stream without filling
either side's memory.

Uploads are content-addressed: the client sends the manifest with the sha256
of every file, the server links in what its store already holds and names
the rest, and only those contents are sent. Digests are cached on the client
(HashCache), so an unchanged file is not read again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from tej.errors import InvalidInput, ProtocolError

if TYPE_CHECKING:
    from tej.session import Session

    #: Called with (bytes just moved, total bytes of the transfer). Only for type
    #: checking: collections.abc's Callable[...] can't be made at run time before 3.9.
    Progress = Callable[[int, int], None]

CHUNK_SIZE = 1 << 20
BATCH_SIZE = 1 << 20
WINDOW = 8
#: A digest is cached only for a file unchanged this long before it was read (in ns):
#: a change within the same timestamp tick would otherwise go unseen.
CACHE_MARGIN = 2 * 10**9
CACHE_FILES = 256


class Entry(NamedTuple):
    """One file, folder or symlink of a tree, with its path relative to the tree's root."""

    relpath: bytes
    kind: str  # "f" file, "d" folder, "l" symlink (the agent's manifest kinds)
    mode: int
    size: int = 0
    target: bytes = b""
    stamp: tuple[int, ...] = ()  # a file's (mtime_ns, ctime_ns, inode, device): the cache key
    digest: str = ""  # the sha256 of a file's content (hex), once hashed


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
class UploadPlan:
    """The server's answer to a manifest: the upload's token, and what it lacks."""

    token: str
    missing: list[tuple[int, int]]  # (index of the entry, offset to send it from)


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


def scan(root: str) -> list[Entry]:
    """List a directory: each folder's entries sorted, folders first, then its sub-folders'."""
    entries: list[Entry] = []
    _scan_folder(os.fsencode(root), b"", entries)
    return entries


def _scan_folder(base: bytes, prefix: bytes, entries: list[Entry]) -> None:
    folder = os.path.join(base, prefix) if prefix else base
    try:
        with os.scandir(folder) as items:
            found = sorted((item.name, item) for item in items)
    except OSError as exc:
        raise InvalidInput(f"Can't read {os.fsdecode(folder)}: {exc.strerror}") from None
    folders: list[Entry] = []
    files: list[Entry] = []
    for name, item in found:
        relpath = prefix + name
        try:
            info = item.stat(follow_symlinks=False)
            target = os.readlink(item.path) if stat.S_ISLNK(info.st_mode) else b""
        except OSError as exc:
            raise InvalidInput(f"Can't read {os.fsdecode(item.path)}: {exc.strerror}") from None
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            if not os.access(item.path, os.R_OK | os.X_OK):
                raise InvalidInput(f"Can't read the folder {os.fsdecode(item.path)}")
            folders.append(Entry(relpath, "d", mode))
        elif stat.S_ISLNK(info.st_mode):
            files.append(Entry(relpath, "l", 0o777, 0, target))
        elif stat.S_ISREG(info.st_mode):  # whether it can be read: see hash_files
            stamp = (info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)
            files.append(Entry(relpath, "f", mode, info.st_size, b"", stamp))
        else:
            what = os.fsdecode(item.path)
            raise InvalidInput(f"Can't upload {what}: only files, folders and symlinks can be sent")
    entries += folders
    entries += files
    for entry in folders:
        _scan_folder(base, entry.relpath + b"/", entries)


def hash_files(root: str, entries: list[Entry]) -> list[Entry]:
    """The entries with the digest of every non-empty file (from the cache where it can).

    Files the cache doesn't know are checked to be readable, empty ones too (a
    file made unreadable has a new ctime: the cache doesn't know it anymore).
    """
    cache = HashCache(root)
    base = os.fsencode(root)
    hashed = []
    for entry in entries:
        digest = cache.get(entry) if entry.kind == "f" and entry.size else None
        if entry.kind == "f" and digest is None:
            path = os.path.join(base, entry.relpath)
            if not os.access(path, os.R_OK):
                raise InvalidInput(f"Can't read the file {os.fsdecode(path)}")
            if entry.size:
                started = time.time_ns()
                digest = _hash_file(path, entry.size)
                cache.put(entry, digest, started)
        hashed.append(Entry(*entry[:6], digest) if digest else entry)
    cache.save()
    return hashed


def _hash_file(path: bytes, size: int) -> str:
    hasher = hashlib.sha256()
    for _, data in _read_chunks(path, size):
        hasher.update(data)
    return hasher.hexdigest()


class HashCache:
    """The digests of a directory's files, kept between runs in the user's cache folder.

    An entry is trusted only while the file's size, mtime, ctime, inode and
    device are those it was hashed with, and only if the file had not changed
    for CACHE_MARGIN before it was read (a later change in the same timestamp
    tick would not show). The cache is a convenience: any problem with it
    means hashing again, never an error.
    """

    def __init__(self, root: str) -> None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        real = os.fsencode(os.path.realpath(root))
        self.folder = os.path.join(base, "tej", "hashes")
        self.path = os.path.join(self.folder, hashlib.sha256(real).hexdigest()[:32] + ".json")
        self.old: dict[str, list[Any]] = {}
        self.new: dict[str, list[Any]] = {}
        self.learned = False
        try:
            with open(self.path, encoding="ascii") as stream:
                data = json.load(stream)
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self.old = data["files"]
        except (OSError, ValueError):
            pass

    @staticmethod
    def _key(entry: Entry) -> tuple[str, list[Any]]:
        return entry.relpath.decode("utf-8", "surrogateescape"), [entry.size, *entry.stamp]

    def get(self, entry: Entry) -> str | None:
        """The cached digest of a file, if it is still the file that was hashed."""
        name, key = self._key(entry)
        row = self.old.get(name)
        if isinstance(row, list) and row[:-1] == key and _is_digest(row[-1]):
            self.new[name] = row
            return str(row[-1])
        return None

    def put(self, entry: Entry, digest: str, started: int) -> None:
        """Remember a digest computed from a read that started at `started` (ns)."""
        name, key = self._key(entry)
        if started - max(entry.stamp[:2]) >= CACHE_MARGIN:
            self.new[name] = [*key, digest]
            self.learned = True

    def save(self) -> None:
        """Write the cache (the files of this run only) if it learned a digest.

        Entries of files that changed or went away are dropped then; until then
        they do no harm (a changed file's stamp never matches its old entry).
        """
        if not self.learned:
            return
        tmp = None
        try:
            os.makedirs(self.folder, 0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
            with os.fdopen(fd, "w", encoding="ascii") as stream:
                json.dump({"version": 1, "files": self.new}, stream, separators=(",", ":"))
            os.replace(tmp, self.path)
            tmp = None
            self._prune()
        except OSError:
            pass
        finally:
            if tmp is not None:
                _remove(tmp)

    def _prune(self) -> None:
        """Keep the CACHE_FILES most recently written caches."""
        names = [name for name in os.listdir(self.folder) if name.endswith(".json")]
        if len(names) > CACHE_FILES:
            paths = sorted((os.path.join(self.folder, n) for n in names), key=os.path.getmtime)
            for path in paths[: len(paths) - CACHE_FILES]:
                os.unlink(path)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64


def begin_upload(
    session: Session, queue: str, entries: list[Entry], manifest: dict[str, Any] | None = None
) -> UploadPlan:
    """Send the manifest (entries with their digests); the server answers what it lacks."""
    if manifest is None:
        manifest = encode_manifest(entries)
    reply = session.call("upload_begin", queue=queue, manifest=manifest)
    try:
        missing = [(int(index), int(offset)) for index, offset in json.loads(reply["missing"])]
        token = str(reply["token"])
        if not all(0 <= offset <= entries[index].size for index, offset in missing):
            raise ValueError
    except (KeyError, TypeError, ValueError, IndexError):
        raise ProtocolError(f"Unexpected reply from the agent: {reply!r:.200}") from None
    return UploadPlan(token, missing)


def upload_tree(
    session: Session,
    queue: str,
    plan: UploadPlan,
    root: str,
    entries: list[Entry],
    progress: Progress | None = None,
) -> None:
    """Send the contents the server lacks; progress counts the bytes sent, of all to send."""
    base = os.fsencode(root)
    total = sum(entries[index].size - offset for index, offset in plan.missing)
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
