"""The client's cache of file digests, by each file's stamp: a file that stat says is
unchanged is not read again.

Uploads use it for the job's directory (tej.transfer), and the bootstrap for
tej's own code that the server caches by digest (tej.bootstrap): a command
then names that code from a few stat calls, without reading or hashing it.
This module loads little (the `tej` command uses it before ssh's handshake is
done).
"""

from __future__ import annotations

import os
import struct
import time

from tej.protocol import sha256_hex

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    #: A file's (relative path, stamp): what a digest is cached under.
    Key = tuple[bytes, tuple[int, ...]]

#: A digest is cached only for a file unchanged this long before it was read (in ns):
#: a change within the same timestamp tick would otherwise go unseen.
CACHE_MARGIN = 2 * 10**9
CACHE_FILES = 256
CACHE_MAGIC = b"tej hash cache 2\n"
#: A cached file's (size, mtime_ns, ctime_ns, inode, device), as stored.
CACHE_STAMP = struct.Struct("<qqqQQ")


def file_stamp(info: os.stat_result) -> tuple[int, ...]:
    """What tells a file's version apart, from its stat: (size, mtime_ns, ctime_ns, inode,
    device), as HashCache keeps it."""
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


class HashCache:
    """The digests of a directory's files, kept between runs in the user's cache folder.

    An entry is trusted only while the file's size, mtime, ctime, inode and
    device are those it was hashed with, and only if the file had not changed
    for CACHE_MARGIN before it was read (a later change in the same timestamp
    tick would not show). A file too recent to be trusted is remembered as
    seen, without its digest: seen again unchanged, it isn't new. The cache is
    a convenience: any problem with it means hashing again, never an error.

    Files are named by their key: (path relative to the directory, file_stamp).

    On disk (binary, so that a big tree costs little to read): CACHE_MAGIC,
    the numbers of trusted and seen files T and S (uint32 each), T + S stamps
    (CACHE_STAMP), T sha256 digests (32 bytes each), then the T + S relative
    paths, NUL-separated; the trusted files first.
    """

    def __init__(self, root: str) -> None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        real = os.fsencode(os.path.realpath(root))
        self.folder = os.path.join(base, "tej", "hashes")
        self.path = os.path.join(self.folder, sha256_hex(real)[:32] + ".bin")
        #: key -> digest, for the files trusted.
        self.known: dict[Key, str] = {}
        #: The keys of the files seen too soon after they changed.
        self.seen: set[Key] = set()
        self.changed = False
        try:
            with open(self.path, "rb") as stream:
                self._parse(stream.read())
        except (OSError, ValueError, struct.error):
            self.known, self.seen = {}, set()

    def _parse(self, data: bytes) -> None:
        if not data.startswith(CACHE_MAGIC):
            raise ValueError("not a hash cache")
        trusted, seen = struct.unpack_from("<II", data, len(CACHE_MAGIC))
        count = trusted + seen
        stamps_at = len(CACHE_MAGIC) + 8
        digests_at = stamps_at + count * CACHE_STAMP.size
        paths_at = digests_at + trusted * 32
        paths = data[paths_at:].split(b"\0") if count else []
        if len(data) < paths_at or len(paths) != count:
            raise ValueError("a damaged hash cache")
        keys = list(zip(paths, CACHE_STAMP.iter_unpack(data[stamps_at:digests_at])))
        hexes = data[digests_at:paths_at].hex()
        digests = [hexes[at : at + 64] for at in range(0, trusted * 64, 64)]
        self.known = dict(zip(keys[:trusted], digests))
        self.seen = set(keys[trusted:])

    def get(self, key: Key) -> str | None:
        """The cached digest of a file, if it is still the file that was hashed."""
        return self.known.get(key)

    def saw(self, key: Key) -> bool:
        """Whether the file was hashed before as it is now (trusted or not)."""
        return key in self.known or key in self.seen

    def put(self, key: Key, digest: str, started: int) -> None:
        """Remember a digest computed from a read that started at `started` (ns)."""
        if started - max(key[1][1:3]) >= CACHE_MARGIN:
            self.known[key] = digest
            self.changed = True
        elif key not in self.seen:
            self.seen.add(key)
            self.changed = True

    def save(self, files: Iterable[Key]) -> None:
        """Write the cache (those of files, the directory's files now, that it knows) if it
        learned anything.

        Entries of files that changed or went away are dropped then; until then
        they do no harm (a changed file's stamp never matches its old entry).
        """
        if not self.changed:
            return
        known, seen = self.known, self.seen
        files = list(files)
        trusted = [key for key in files if key in known]
        recent = [key for key in files if key in seen and key not in known]
        keys = trusted + recent
        data = b"".join(
            [
                CACHE_MAGIC,
                struct.pack("<II", len(trusted), len(recent)),
                b"".join(CACHE_STAMP.pack(*stamp) for _, stamp in keys),
                bytes.fromhex("".join(known[key] for key in trusted)),
                b"\0".join(path for path, _ in keys),
            ]
        )
        import tempfile

        tmp = None
        try:
            for folder in (os.path.dirname(self.folder), self.folder):  # tej's folders: private
                os.makedirs(folder, 0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.replace(tmp, self.path)
            tmp = None
            self._prune()
        except OSError:
            pass
        finally:
            if tmp is not None:
                try:  # noqa: SIM105 - contextlib is not loaded for this
                    os.unlink(tmp)
                except OSError:
                    pass

    def _prune(self) -> None:
        """Keep the CACHE_FILES most recently written caches (older formats' files too).

        Also removes what a process that ended while writing one left (after a day).
        """
        names = os.listdir(self.folder)
        caches = [name for name in names if name.endswith((".bin", ".json"))]
        if len(caches) > CACHE_FILES:
            paths = sorted((os.path.join(self.folder, n) for n in caches), key=os.path.getmtime)
            for path in paths[: len(paths) - CACHE_FILES]:
                os.unlink(path)
        for name in names:
            path = os.path.join(self.folder, name)
            if name.startswith(".tmp-") and time.time() - os.path.getmtime(path) > 86400:
                os.unlink(path)
