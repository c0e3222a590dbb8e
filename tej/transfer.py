"""Moving files: a job directory up to the server, a job's files back down.

Data moves in chunks of at most CHUNK_SIZE, batched into requests of about
BATCH_SIZE, with a window of requests in flight (Session.pipeline), so many
small files cost no round trip each and large files stream without filling
either side's memory.
"""

from __future__ import annotations

import collections
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from tej.errors import InvalidInput

if TYPE_CHECKING:
    from tej.session import Session

#: Called with (bytes just moved, total bytes of the transfer).
Progress = Callable[[int, int], None]

CHUNK_SIZE = 1 << 20
BATCH_SIZE = 1 << 20
WINDOW = 8


@dataclass(frozen=True)
class Entry:
    """One file, folder or symlink of a tree, with its path relative to the tree's root."""

    relpath: bytes
    kind: str  # "f" file, "d" folder, "l" symlink (the agent's manifest kinds)
    mode: int
    size: int = 0
    target: bytes = b""

    def manifest_row(self) -> list[Any]:
        """The entry as a row of the agent's manifest."""
        extra: int | bytes = self.target if self.kind == "l" else self.size
        return [self.relpath, self.kind, self.mode, extra]


# -- upload -----------------------------------------------------------------


def scan_directory(root: str) -> list[Entry]:
    """List a job directory for upload, refusing what can't be sent faithfully."""
    if not os.path.exists(root):
        raise InvalidInput(f"No such directory: {root}")
    if not os.path.isdir(root):
        raise InvalidInput(f"Not a directory: {root}")
    base = os.fsencode(root)
    entries = []

    def unreadable(error: OSError) -> None:
        raise InvalidInput(f"Can't read {error.filename}: {error.strerror}")

    for folder, dirs, files in os.walk(base, onerror=unreadable):
        for name in sorted(dirs) + sorted(files):
            entries.append(_scan_entry(base, os.path.join(folder, name)))
    return entries


def _scan_entry(base: bytes, path: bytes) -> Entry:
    relpath = os.path.relpath(path, base)
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return Entry(relpath, "l", 0o777, target=os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise InvalidInput(f"Can't read the folder {os.fsdecode(path)}")
        return Entry(relpath, "d", mode)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput(
            f"Can't upload {os.fsdecode(path)}: only files, folders and symlinks can be sent"
        )
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"Can't read the file {os.fsdecode(path)}")
    return Entry(relpath, "f", mode, size=info.st_size)


def upload_tree(
    session: Session,
    queue: str,
    token: str,
    root: str,
    entries: list[Entry],
    progress: Progress | None = None,
) -> None:
    """Send the data of every file in entries into the upload staged under token."""
    base = os.fsencode(root)
    total = sum(entry.size for entry in entries if entry.kind == "f")
    sizes: collections.deque[int] = collections.deque()

    def requests() -> Iterator[tuple[str, dict[str, Any]]]:
        for batch in _upload_batches(base, entries):
            sizes.append(sum(len(chunk[2]) for chunk in batch))
            yield "upload_data", {"queue": queue, "token": token, "chunks": batch}

    for _ in session.pipeline(requests(), WINDOW):
        if progress is not None:
            progress(sizes.popleft(), total)


def _upload_batches(base: bytes, entries: list[Entry]) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    size = 0
    for entry in entries:
        if entry.kind != "f" or entry.size == 0:
            continue
        for offset, data in _read_chunks(os.path.join(base, entry.relpath), entry.size):
            batch.append([entry.relpath, offset, data])
            size += len(data)
            if size >= BATCH_SIZE:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _read_chunks(path: bytes, size: int) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as stream:
            offset = 0
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
            for data in stream_file(session, queue, job_id, remote, entry.size, progress):
                stream.write(data)
        os.chmod(partial, entry.mode & 0o777)
        os.replace(partial, local)
    except BaseException:
        _remove(partial)
        raise


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
