"""A resubmitted job's files, laid out by its supervisor rather than in the request.

`tej resubmit` of a job under the default runner (started at once) checks that
the store holds every content of the old job's manifest (a stat per content,
not a link per file), keeps the manifest, and leaves LAYOUT_PENDING in the new
job's folder, naming the upload whose lease is the job's. The job's supervisor,
once forked and before its script starts (the job is starting meanwhile), lays
work/ out from the store as an upload is laid out (the same links, checks,
leases and copies: server/upload.py), then removes the file. A content the
store lost meanwhile ends the job lost, with the reason. See
docs/queue-format.md, "Processes".
"""

import os
import stat

from ..protocol import ERR_INVALID
from .errors import AgentError
from .files import make_private_dir, remove_tree
from .layout import (
    BLOBS_FILE,
    LAYOUT_PENDING,
    MANIFEST_FILE,
    STORE_DIR,
    WORK_DIR,
    queue_root_of,
)


def store_rows(manifest_path):
    """The rows of a kept manifest (parse_manifest's), every part."""
    from .manifest import parse_manifest, read_parts

    rows = []
    for part in read_parts(manifest_path):
        rows += parse_manifest(part)
    return rows


def defer_layout(upload, old_dir, job):
    """Prepare a resubmit whose files its supervisor lays out; False if it can't be (the
    caller lays them out now): another runner than the default one, a start time, an
    array, or a script that is not a file of the manifest (its check needs the files).

    AgentError (invalid) if the store no longer holds a content, as lay_out_kept says.
    """
    from ..protocol import DEFAULT_RUNNER
    from .jobs import start_time_of
    from .store import CREATE_NEW, lease_path
    from .template import copy_small_file

    queue = upload.queue
    if (queue.config or {}).get("runner", DEFAULT_RUNNER) != DEFAULT_RUNNER:
        return False
    if not isinstance(job, dict) or job.get("array") is not None or start_time_of(job):
        return False
    manifest = os.path.join(old_dir, MANIFEST_FILE)
    rows = store_rows(manifest)
    script = os.fsencode(os.path.normpath(job.get("script") or ""))
    if not any(kind == "f" and path == script for kind, path, _, _, _ in rows):
        return False
    check_store_holds(queue, rows)
    copy_small_file(manifest, os.path.join(upload.staging, MANIFEST_FILE))
    # The lease, and its BLOBS_FILE (empty: a lease whose job has none is taken for an
    # abandoned one, and removed), before the job is renamed into place.
    os.close(os.open(os.path.join(upload.staging, BLOBS_FILE), CREATE_NEW, 0o600))
    os.close(os.open(lease_path(queue, upload.token), os.O_WRONLY | os.O_CREAT, 0o600))
    fd = os.open(os.path.join(upload.staging, LAYOUT_PENDING), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, upload.token.encode("ascii"))
    finally:
        os.close(fd)
    upload.planned = True  # nothing to receive: finish() has no rows to make
    return True


def check_store_holds(queue, rows):
    """Refuse (AgentError) a manifest one of whose contents the store no longer holds intact.

    Each content's blob is the one its first owner-readable file would be linked to
    (Upload.lay_out): a regular file of the manifest's size, its mtime STORE_MTIME.
    """
    from .store import MODE_SUFFIXES, STORE_MTIME_NS

    store = queue.path(STORE_DIR)
    seen = set()
    unreadable = {}  # type: dict[str, bytes]  # contents with no file its owner can read yet
    for kind, relpath, mode, size, digest in rows:
        if kind != "f" or not size or digest in seen:
            continue
        if not mode & 0o400:
            unreadable.setdefault(digest, relpath)
            continue
        seen.add(digest)
        unreadable.pop(digest, None)
        blob = os.path.join(store, digest[:2], digest + MODE_SUFFIXES[mode & 0o777])
        try:
            info = os.lstat(blob)
        except OSError:
            raise_lost(relpath)
        intact = stat.S_ISREG(info.st_mode) and info.st_mtime_ns == STORE_MTIME_NS
        if not intact or info.st_size != size:
            raise_lost(relpath)
    for relpath in unreadable.values():
        raise_lost(relpath)


def raise_lost(relpath):
    """The error of a content the store no longer holds (lay_out_kept's)."""
    raise AgentError(
        ERR_INVALID,
        "The queue's store no longer holds the uploaded content of %s: submit the "
        "directory again" % relpath.decode("utf-8", "replace"),
    )


def lay_out_pending(job_dir):
    """In a job's supervisor: lay its files out if its resubmit left them to it (nothing
    otherwise). AgentError or OSError if it can't: the store lost a content meanwhile."""
    from .queue import open_queue
    from .upload import Upload, lay_out_kept

    pending = os.path.join(job_dir, LAYOUT_PENDING)
    try:
        with open(pending) as stream:
            token = stream.read().strip()
    except FileNotFoundError:
        return
    work = os.path.join(job_dir, WORK_DIR)
    if os.listdir(work):  # a supervisor before this one died while laying out: again
        remove_tree(work)
        make_private_dir(work)
    queue = open_queue(queue_root_of(job_dir), with_runner=False)
    upload = Upload(queue, token, job_dir)
    # The lease and its BLOBS_FILE are the resubmit's (defer_layout): appended to (lines a
    # supervisor that died left are inodes no longer in work/, harmless).
    upload.blobs = os.open(os.path.join(job_dir, BLOBS_FILE), os.O_WRONLY | os.O_APPEND)
    try:
        lay_out_kept(upload, os.path.join(job_dir, MANIFEST_FILE), None)
        upload.finish()
    finally:
        upload.discard_files()
    os.unlink(pending)
