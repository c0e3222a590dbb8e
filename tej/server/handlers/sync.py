"""A job's files for `tej sync`: what changed since the last listing, hashes, checked reads.

sync_list walks the job's directory (or the paths asked for in it) without
following symlinks (tej/server/treewalk.py), and remembers the listing in the connection under a
token: the next sync_list with that token answers only what changed, so a
pass where nothing changed costs one small reply. sync_hash hashes the files
the client may already have; sync_read reads chunks of files that must still
be the file listed (same size, modification time and inode, before and after
the read), so a file that changes while it is read is reported changed, never
sent torn. sync_list with contents_since also sends the small files modified
since then, read with the same checks (recent_contents).

Nothing is kept between connections: a file changed in place keeps its
folder's modification time, so each listing looks at every file (fstatat in
each open folder); reading the folders' names is a tenth of a listing's time,
not worth a cache that could miss a change.
"""

import os
import stat
import struct
import sys
import time

from ...protocol import (
    END_STATES,
    ERR_BAD_REQUEST,
    ERR_INVALID,
    MAX_READ,
    STATE_LOST,
    sha256_hex,
)
from ..errors import AgentError, checked_rows
from ..files import relative_parts, show
from ..layout import WORK_DIR
from ..queue import open_queue
from ..records import read_status_record
from ..treewalk import row_of, walk

LISTINGS_KEPT = 4  # listings a connection remembers (one per sync it serves, in practice)
CHANGED = None  # sync_read's and sync_hash's answer for a file that is no longer the one listed
SAME = True  # sync_read's answer for a file whose digest is the one the client has
# sync_read's answer for a file that can't be read is a str: why (see unreadable).
READ_ROW = struct.Struct("<qqqqQ")  # a chunk for sync_read: offset, length, size, mtime, inode
BUILTIN_HASH_MAX = 1 << 20  # below this, data is hashed without hashlib (see sha256_of)
#: Files sent with a listing (sync_list's contents_since): each at most this long, and at
#: most this many, this many bytes in all (the newest first).
CONTENT_MAX = 64 * 1024
CONTENT_FILES = 32
CONTENT_BUDGET = 256 * 1024


def sync_list(connection, queue, job_id, paths, since=None, missing_ok=False, contents_since=None):
    """The job's state, then its files (all, or only what changed since the listing `since`).

    Returns {"token", "state", "now", "full", "entries": columns, "removed": paths,
    "unreadable": the folders it may not list, whose files are not listed}.
    The state is read before the files, so that a listing made once the job
    has ended holds its last files. With contents_since (ns), also "contents":
    the small files listed that were modified since then (see recent_contents),
    which the client would otherwise read with sync_read.
    """
    opened = open_queue(queue, with_runner=False)
    job_dir = opened.job_dir(job_id)
    state = job_state(opened, job_id, job_dir)
    work = os.fsencode(os.path.realpath(os.path.join(job_dir, WORK_DIR)))
    rows = {}  # type: dict[bytes, tuple[object, ...]]
    for path in checked_paths(paths):
        list_path(work, path, rows, missing_ok)
    listings = connection.sync_listings
    old = listings.pop(since, None) if isinstance(since, str) else None
    token = "%x-%x" % (os.getpid(), int(time.time() * 1e6))
    listings[token] = rows
    while len(listings) > LISTINGS_KEPT:
        listings.pop(next(iter(listings)))
    if old is None:
        changed, removed = list(rows.values()), []
    else:
        changed = [row for path, row in rows.items() if old.get(path) != row]
        removed = [path for path in old if path not in rows]
    reply = {
        "token": token,
        "state": state,
        "now": time.time_ns(),
        "full": old is None,
        "entries": encode_rows(changed),
        "removed": b"\0".join(removed),
        "unreadable": unreadable_folders(work, rows),
    }
    if contents_since is not None:
        reply["contents"] = recent_contents(work, rows.values(), contents_since)
    return reply


def recent_contents(work, rows, since):
    """The files among rows (listed) of at most CONTENT_MAX bytes modified at or after since
    (ns), newest first, within CONTENT_FILES and CONTENT_BUDGET: [[relpath, mtime_ns,
    inode, data]]. Each is read as sync_read reads (the file listed, before and after the
    read): a file that is no longer the one listed is left out, never sent torn.
    """
    if not isinstance(since, int):
        raise AgentError(ERR_BAD_REQUEST, "contents_since must be an int")
    recent = [row for row in rows if row[4] >= since and row[1] == "f" and row[3] <= CONTENT_MAX]
    recent.sort(key=lambda row: row[4], reverse=True)
    contents = []  # type: list[list[object]]
    budget = CONTENT_BUDGET
    for relpath, _, _, size, mtime, inode, _ in recent:
        if len(contents) >= CONTENT_FILES:
            break
        if size > budget:
            continue
        fd = open_listed(work, relpath, (size, mtime, inode))
        if fd is None:
            continue
        try:
            data = os.pread(fd, size, 0) if size else b""
            same = stamp_of(os.fstat(fd)) == (size, mtime, inode)
        finally:
            os.close(fd)
        if same and len(data) == size:
            contents.append([relpath, mtime, inode, data])
            budget -= size
    return contents


def sync_hash(connection, queue, job_id, files):
    """The sha256 of files [path, size, mtime_ns, inode]: hex, or None if one changed."""
    import hashlib

    work = work_dir(queue, job_id)
    digests = []  # type: list[object]
    for relpath, size, mtime, inode in checked_rows(files, (bytes, int, int, int)):
        fd = open_listed(work, relpath, (size, mtime, inode))
        if fd is None:
            digests.append(CHANGED)
            continue
        try:
            hasher = hashlib.sha256()
            offset = 0
            while offset < size:
                data = os.pread(fd, min(MAX_READ, size - offset), offset)
                if not data:
                    break
                hasher.update(data)
                offset += len(data)
            same = offset == size and stamp_of(os.fstat(fd)) == (size, mtime, inode)
            digests.append(hasher.hexdigest() if same else CHANGED)
        finally:
            os.close(fd)
    return digests


def sync_read(connection, queue, job_id, paths, numbers, checks):
    """Read chunks of listed files: their paths (NUL-separated), and numbers (READ_ROW each:
    offset, length, size, mtime_ns, inode); checks: [index, digest] of whole-file chunks.

    Each answer is the data; None if the file is no longer the one listed
    (checked before and after the read); True if the digest (hex) given for
    it is the file's own: the client has it already.
    """
    if not isinstance(paths, bytes) or not isinstance(numbers, bytes):
        raise AgentError(ERR_BAD_REQUEST, "paths and numbers must be bytes")
    relpaths = paths.split(b"\0")
    if len(numbers) != READ_ROW.size * len(relpaths):
        raise AgentError(ERR_BAD_REQUEST, "paths and numbers differ in length")
    digests = dict(checked_rows(checks, (int, str)))
    work = work_dir(queue, job_id)
    answers = []  # type: list[object]
    for index, (relpath, row) in enumerate(zip(relpaths, READ_ROW.iter_unpack(numbers))):
        offset, length, size, mtime, inode = row
        fd = open_listed(work, relpath, (size, mtime, inode))
        if fd is None:
            answers.append(unreadable(work, relpath) or CHANGED)
            continue
        try:
            data = os.pread(fd, min(max(length, 0), MAX_READ), max(offset, 0))
            same = stamp_of(os.fstat(fd)) == (size, mtime, inode)
        finally:
            os.close(fd)
        whole = offset == 0 and len(data) == size
        answers.append(checked_answer(data, same, digests.get(index), whole))
    return answers


def checked_answer(data, same, digest, whole):
    """sync_read's answer for a chunk read: CHANGED, SAME (digest is the whole file's), or data."""
    if not same:
        return CHANGED
    if digest and whole and sha256_of(data) == digest:
        return SAME
    return data


def sha256_of(data):
    """The sha256 of data (hex): by Python's built-in module for a small one, unless hashlib
    is loaded already (loading it, and OpenSSL, costs more than hashing a few files)."""
    if len(data) < BUILTIN_HASH_MAX and "hashlib" not in sys.modules:
        return sha256_hex(data)
    import hashlib

    return hashlib.sha256(data).hexdigest()


def job_state(opened, job_id, job_dir):
    """A job's state. Its runner is asked (and loaded) only while the job's record says it
    is active or lost: an end state is final."""
    record = read_status_record(job_dir)
    state = record.get("state") if isinstance(record, dict) else None
    if state in END_STATES and state != STATE_LOST:
        return state
    from ..runners import open_runner

    open_runner(opened)
    return opened.record(job_id, job_dir).get("state")


def work_dir(queue, job_id):
    """The real path of a job's directory (bytes)."""
    job_dir = open_queue(queue, with_runner=False).job_dir(job_id)
    return os.fsencode(os.path.realpath(os.path.join(job_dir, WORK_DIR)))


def checked_paths(paths):
    """The relative paths asked for, normalized (b"" for the whole job); escapes refused."""
    if not isinstance(paths, list) or not all(isinstance(path, bytes) for path in paths):
        raise AgentError(ERR_BAD_REQUEST, "paths must be a list of bytes")
    return [b"/".join(relative_parts(path)) for path in paths] or [b""]


def list_path(work, path, rows, missing_ok):
    """Add a path of the job (a folder's whole tree) to rows {relpath: row}. A symlink is
    listed as one, not followed (one that leaves the job is refused)."""
    full = os.path.join(work, path) if path else work
    real = os.path.realpath(full)
    if real != work and not real.startswith(work + b"/"):
        raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(path))
    try:
        info = os.lstat(full)
        if path and stat.S_ISLNK(info.st_mode):
            rows[path] = (path, "l", 0o777, 0, 0, 0, os.readlink(full))
            return
    except FileNotFoundError:
        if missing_ok:
            return
        raise AgentError(ERR_INVALID, "No file %s in the job" % show(path))
    if not stat.S_ISDIR(info.st_mode):
        if stat.S_ISREG(info.st_mode):
            rows[path] = row_of(path, "f", info)
        return
    if path:
        rows[path] = row_of(path, "d", info)
    walk(full, path + b"/" if path else b"", rows)


def encode_rows(rows):
    """Rows as columns (fast to send): see tej.sync.decode_listing."""
    count = len(rows)
    paths, kind_column, modes, sizes, mtimes, inodes, targets = list(zip(*rows)) or [()] * 7
    kinds = "".join(kind_column)
    links = [target for kind, target in zip(kinds, targets) if kind == "l"] if "l" in kinds else []
    return {
        "paths": b"\0".join(paths),
        "kinds": kinds,
        "modes": struct.pack("<%dH" % count, *modes),
        "sizes": struct.pack("<%dQ" % count, *sizes),
        "mtimes": struct.pack("<%dq" % count, *mtimes),
        "inodes": struct.pack("<%dQ" % count, *inodes),
        "targets": b"\0".join(links),
    }


def open_listed(work, relpath, stamp):
    """An open descriptor of a job's file if it is still the one listed (stamp), else None."""
    full = os.path.join(work, *relative_parts(relpath))
    real = os.path.realpath(os.path.dirname(full))
    if real != work and not real.startswith(work + b"/"):
        raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(relpath))
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or stamp_of(info) != stamp:
        os.close(fd)
        return None
    return fd


def unreadable_folders(work, rows):
    """The folders among rows (listed) this process may not list: listed empty."""
    return [
        path
        for path, row in rows.items()
        if row[1] == "d" and not os.access(os.path.join(work, path), os.R_OK | os.X_OK)
    ]


def unreadable(work, relpath):
    """Why a job's file that open_listed did not open can't be read (permissions), or None
    (it is gone or no longer the one listed: CHANGED)."""
    try:
        os.close(os.open(os.path.join(work, *relative_parts(relpath)), os.O_RDONLY | os.O_NOFOLLOW))
    except PermissionError as exc:
        return exc.strerror or str(exc)
    except OSError:
        pass
    return None


def stamp_of(info):
    """What tells a file's version: (size, mtime_ns, inode)."""
    return (info.st_size, info.st_mtime_ns, info.st_ino)


HANDLERS = {
    "sync_list": sync_list,
    "sync_hash": sync_hash,
    "sync_read": sync_read,
}
