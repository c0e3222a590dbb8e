"""A job's files, for download: listing them, and reading them in chunks or as a raw stream."""

import os

from ...protocol import ERR_INVALID, MAX_READ
from ..errors import AgentError, checked_rows
from ..files import relative_parts, show
from ..layout import WORK_DIR
from ..queue import open_queue


def job_path(queue, job_id, relpath):
    """The real path of a file in a job's directory, refusing any escape."""
    job_dir = open_queue(queue, with_runner=False).job_dir(job_id)
    work = os.path.realpath(os.path.join(job_dir, WORK_DIR))
    parts = relative_parts(relpath)
    path = os.path.realpath(os.path.join(work.encode(), *parts) if parts else work.encode())
    if path != work.encode() and not path.startswith(work.encode() + b"/"):
        raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(relpath))
    if not os.path.lexists(path):
        raise AgentError(ERR_INVALID, "No file %s in job %r" % (show(relpath), job_id))
    return path


def list_files(connection, queue, job_id, path):
    """Describe a file or folder of a job: [relpath, kind, mode, size-or-target]."""
    root = job_path(queue, job_id, path)
    if not os.path.isdir(root):
        info = os.stat(root)
        return [[b"", "f", info.st_mode & 0o7777, info.st_size]]
    entries = [[b"", "d", os.stat(root).st_mode & 0o7777, 0]]
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(folder, name)
            entries.append(describe_entry(os.path.relpath(full, root), full))
    return entries


def file_identity(connection, queue, job_id, path):
    """A job's regular file, for a raw stream: [real path, device, inode, size]."""
    real = job_path(queue, job_id, path)
    info = os.stat(real)
    if not os.path.isfile(real):
        raise AgentError(ERR_INVALID, "%s is not a file" % show(path))
    return [real, info.st_dev, info.st_ino, info.st_size]


def read_chunks(connection, queue, job_id, chunks):
    """Read chunks [path, offset, length] of a job's files."""
    data = []
    for relpath, offset, length in checked_rows(chunks, (bytes, int, int)):
        with open(job_path(queue, job_id, relpath), "rb") as stream:
            stream.seek(offset)
            data.append(stream.read(min(length, MAX_READ)))
    return data


def describe_entry(relpath, full):
    """One entry of list_files: [relpath, kind, mode, size-or-target]."""
    info = os.lstat(full)
    if os.path.islink(full):
        return [relpath, "l", 0o777, os.readlink(full)]
    if os.path.isdir(full):
        return [relpath, "d", info.st_mode & 0o7777, 0]
    if os.path.isfile(full):
        return [relpath, "f", info.st_mode & 0o7777, info.st_size]
    return [relpath, "s", info.st_mode & 0o7777, 0]


HANDLERS = {
    "list_files": list_files,
    "file_identity": file_identity,
    "read_chunks": read_chunks,
}
