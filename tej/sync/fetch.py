"""Files read from the job into partial files in the local folder, then put in place."""

from __future__ import annotations

import contextlib
import os
import struct
from typing import TYPE_CHECKING, Any, BinaryIO

from tej.errors import InvalidInput, ProtocolError
from tej.sync.listing import Remote
from tej.sync.local import PARTIAL, PRIVATE
from tej.transfer import BATCH_SIZE, CHUNK_SIZE

if TYPE_CHECKING:
    from tej.sync import Syncer


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
    instead of its data); big ones as raw streams. Those that came with the
    listing (syncer.preloaded, as listed) are taken from it.
    """

    def __init__(self, syncer: Syncer, rows: list[Remote], verify: set[bytes]) -> None:
        self.s = syncer
        self.rows = rows
        if all(self._preloaded(row) is not None for row in rows):
            self.small, self.big = rows, []  # all small: tej.rawstream isn't loaded
        else:
            from tej import rawstream

            self.small = [row for row in rows if row.size < rawstream.RAW_STREAM_MIN]
            self.big = [row for row in rows if row.size >= rawstream.RAW_STREAM_MIN]
        self.total = sum(row.size for row in rows)
        self.files = self.bytes = self.same = 0
        self.changing: list[Remote] = []
        self.unreadable: list[str] = []  # "PATH (why)" of the files the server can't read
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
            preloaded = self._preloaded(row)
            if preloaded is not None:
                self._take_preloaded(row, preloaded)
                continue
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
        if not requests:
            return  # all came with the listing, or none to read: no execnet started
        writer = _Writer(self)
        for batch, answers in zip(batches, self.s.pipeline(requests)):
            for (row, offset, _, _), answer in zip(batch, answers):
                writer.take(row, offset, answer)
        writer.close()

    def _preloaded(self, row: Remote) -> bytes | None:
        """The content of a file that came with the listing, if it is the version listed."""
        preloaded = self.s.preloaded.get(row.relpath)
        if preloaded is None or preloaded[:3] != (row.size, row.mtime, row.inode):
            return None
        return preloaded[3]

    def _take_preloaded(self, row: Remote, data: bytes) -> None:
        """A file whose content came with the listing: the same as the local copy (a file of
        the same size), or written to its partial file and put in place as one read."""
        if row.relpath in self.verify:
            with open(self.s.root + b"/" + row.relpath, "rb") as stream:
                if stream.read(row.size + 1) == data:
                    self._done_same(row)
                    return
        partial = self.s.partial_path(row)
        with open(partial, "wb") as out:
            out.write(data)
        self.advance(len(data))
        self._done(row, partial)

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
            except rawstream.FileUnreadable as exc:
                self.unreadable.append(f"{os.fsdecode(row.relpath)} ({exc})")
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
        """One chunk's answer: data, None (the file changed), True (the same as ours), or
        why the server can't read the file (a str)."""
        if row.relpath == self.skip:
            return
        if isinstance(answer, str):  # the server can't read it (permissions): left alone
            self._drop(row)
            self.skip = row.relpath
            self.f.unreadable.append(f"{os.fsdecode(row.relpath)} ({answer})")
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
