"""The queue's content store: blobs, leases, garbage collection."""

import contextlib
import errno
import fcntl
import os
import re
import time

from ..protocol import (
    ACTIVE_STATES,
    ERR_SERVER,
    MAX_BLOCK,
    MAX_CHUNK,
    STATE_LOST,
)
from .errors import (
    AgentError,
)
from .files import (
    POLL_INTERVAL,
    remove_quietly,
    remove_tree,
)
from .layout import (
    BLOBS_FILE,
    ID_PATTERN,
    JOBS_DIR,
    LEASES_DIR,
    STAGING_DIR,
    STALE_UPLOAD,
    STORE_DIR,
    job_path,
)
from .records import (
    rebooted,
    supervised_record,
)

STORE_GC_INTERVAL = 3600.0  # how often an upload looks for unused blobs


STORE_MTIME = 946684800  # 2000-01-01T00:00:00Z: the modification time of every uploaded file


STORE_MTIME_NS = STORE_MTIME * 10**9


REGULAR = 0o100000  # stat.S_IFREG


CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


MODE_SUFFIXES = ["-%03o" % mode for mode in range(0o1000)]  # the end of a blob's name, by mode


# Why a blob can't be linked: not in the store, too many links, another filesystem, no links.
UNSHARED = (errno.ENOENT, errno.EMLINK, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP)


def lease_path(queue, token):
    """The lease of an upload, and then of its job, on the store's blobs."""
    return queue.path(STORE_DIR, LEASES_DIR, token)


def store_mode(mode):
    """The mode of a file's blob in the store: the file's own, always readable by its owner."""
    return (mode & 0o777) | 0o400


def finish_file(fd, mode):
    """Give a new file its final mode and the store's modification time."""
    os.fchmod(fd, mode)
    os.utime(fd, ns=(STORE_MTIME_NS, STORE_MTIME_NS))


def write_all(fd, data, offset):
    """Write data at offset, however many calls it takes."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def new_sha256():
    """A new SHA-256 hasher (hashlib is imported on first use: status and list don't)."""
    import hashlib

    return hashlib.sha256()


def copy_verified(source, target, digest, mode):
    """Copy a content into a new file, checking it on the way; False if it isn't digest."""
    hasher = new_sha256()
    fd = os.open(target, CREATE_NEW, 0o600)
    try:
        with open(source, "rb") as stream:
            offset = 0
            for data in iter(lambda: stream.read(MAX_CHUNK), b""):
                hasher.update(data)
                write_all(fd, data, offset)
                offset += len(data)
        if hasher.hexdigest() == digest:
            finish_file(fd, mode)
            return True
    except BaseException:
        remove_quietly(target)
        raise
    finally:
        os.close(fd)
    remove_quietly(target)
    return False


def evict(path, info):
    """Drop a damaged blob from the store (if it is still the one examined)."""
    try:
        if os.lstat(path).st_ino == info.st_ino:
            os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def store_lock(queue):
    """Hold the store's lock: one upload at a time links blobs and reads the leases."""
    fd = os.open(queue.path(STORE_DIR, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.time() + MAX_BLOCK
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise AgentError(ERR_SERVER, "The queue's store stays locked: try again")
                time.sleep(POLL_INTERVAL)
        yield
    finally:
        os.close(fd)


def busy_inodes(queue, own_token):
    """The inodes that other uploads, and the jobs that may still run, share with the store.

    An upload's BLOBS_FILE is in its staging area; once it is a job, its lease
    names the job (written before the staging area is renamed to jobs/ID).
    Leases of jobs that ended or went away are removed.
    """
    busy = set()  # type: set[int]
    folder = queue.path(STORE_DIR, LEASES_DIR)
    for token in os.listdir(folder):
        if token == own_token or not re.match(r"[0-9a-f]+\Z", token):
            continue
        if read_inodes(queue.path(STAGING_DIR, token, BLOBS_FILE), busy):
            continue
        try:
            with open(os.path.join(folder, token)) as stream:
                job_id = stream.read()
        except (OSError, ValueError):
            continue
        if ID_PATTERN.match(job_id) and job_id not in (".", ".."):
            job_dir = job_path(queue.root, job_id)
            if may_run(job_dir) and read_inodes(os.path.join(job_dir, BLOBS_FILE), busy):
                continue
        remove_quietly(os.path.join(folder, token))  # ended, deleted, or abandoned
    return busy


def lease_count(queue):
    """How many leases the store holds (uploads, and jobs not yet found ended)."""
    try:
        return len(os.listdir(queue.path(STORE_DIR, LEASES_DIR)))
    except OSError:
        return 0


def read_inodes(path, inodes):
    """Add the inodes listed in a BLOBS_FILE to a set; False if there is no such file."""
    try:
        with open(path, "rb") as stream:
            for line in stream:
                fields = line.split()
                if line.endswith(b"\n") and len(fields) == 2 and fields[1].isdigit():
                    inodes.add(int(fields[1]))
    except OSError:
        return False
    return True


def may_run(job_dir):
    """Whether a job's processes may still run (and write to its files)."""
    if not os.path.isdir(job_dir):
        return False
    record = supervised_record(job_dir)
    state = record.get("state")
    return state in ACTIVE_STATES or (state == STATE_LOST and not rebooted(record))


def note_lease(queue, staging, job_id):
    """Tell other uploads which job an upload's lease now belongs to, before it is renamed.

    Written in place: others read it only once the staging area is gone.
    """
    try:
        fd = os.open(lease_path(queue, os.path.basename(staging)), os.O_WRONLY | os.O_TRUNC)
    except FileNotFoundError:
        return  # an upload without a lease: nothing of the store to hold
    try:
        os.write(fd, job_id.encode("ascii"))
    finally:
        os.close(fd)


def blob_keys(job_dir):
    """The blobs a job's BLOBS_FILE lists (DIGEST-MODE)."""
    try:
        with open(os.path.join(job_dir, BLOBS_FILE), "rb") as stream:
            return [line.split()[0].decode("ascii") for line in stream if line.strip()]
    except (OSError, ValueError, IndexError):
        return []


def remove_job_tree(queue, path):
    """Remove a job's folder (moved to trash), then the blobs only it used (an array's:
    those its tasks used too)."""
    keys = blob_keys(path)
    try:
        tasks = os.listdir(os.path.join(path, JOBS_DIR))
    except OSError:
        tasks = []
    for task in tasks:
        keys += blob_keys(os.path.join(path, JOBS_DIR, task))
    remove_tree(path)
    for key in keys:
        blob = queue.path(STORE_DIR, key[:2], key)
        try:
            if re.match(r"[0-9a-f]{64}-[0-7]{3}\Z", key) and os.lstat(blob).st_nlink == 1:
                os.unlink(blob)
        except OSError:
            pass


def collect_garbage(queue):
    """Remove blobs no job has used for STALE_UPLOAD seconds (a scan at most every hour)."""
    stamp = queue.path(STORE_DIR, "last-gc")
    try:
        if time.time() - os.stat(stamp).st_mtime < STORE_GC_INTERVAL:
            return
    except OSError:
        pass
    os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT, 0o600))
    os.utime(stamp)
    with store_lock(queue):
        busy_inodes(queue, None)  # removes the leases of jobs that ended or are gone
    limit = time.time() - STALE_UPLOAD
    for folder in os.listdir(queue.path(STORE_DIR)):
        if not re.match(r"[0-9a-f]{2}\Z", folder):
            continue
        for name in os.listdir(queue.path(STORE_DIR, folder)):
            path = queue.path(STORE_DIR, folder, name)
            try:
                info = os.lstat(path)
                if info.st_nlink == 1 and info.st_ctime < limit:
                    os.unlink(path)
            except OSError:
                pass
