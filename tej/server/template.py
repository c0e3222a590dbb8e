"""An array's template: its work/, the uploaded files that no task runs in.

Each task's work/ is copied from it, file by file and checked (copy_template);
a resubmitted array's template is laid out as hard links to the old one's
(link_template). See docs/queue-format.md, "Arrays".
"""

import errno
import os
import stat

from ..protocol import ERR_INVALID
from .errors import AgentError
from .files import make_private_dir
from .layout import MANIFEST_FILE, WORK_DIR


def template_rows(array_dir):
    """An array's manifest rows (parse_manifest's), for copy_template.

    None if a file of it can't be copied from the template (its owner can't read it).
    """
    from .manifest import parse_manifest, read_parts

    rows = []
    for part in read_parts(os.path.join(array_dir, MANIFEST_FILE)):
        rows += parse_manifest(part)
    if any(kind == "f" and not mode & 0o400 for kind, _, mode, _, _ in rows):
        return None
    return rows


def copy_template(array_dir, task_dir, rows):
    """Make the task's work/ a checked private copy of the array's; False if a file of the
    template is not as uploaded (then what was made is the caller's to remove).

    Folders first (as the manifest lists them, or as files need them), then
    files, then symlinks, so no path here leads through a symlink; folders get
    their modes last, deepest first, as an upload's do.
    """
    target = os.path.join(task_dir, WORK_DIR)
    make_private_dir(target)
    flags = os.O_RDONLY | os.O_DIRECTORY
    source_fd = os.open(os.path.join(array_dir, WORK_DIR), flags)
    try:
        target_fd = os.open(target, flags)
        try:
            return copy_rows(source_fd, target_fd, rows)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def copy_rows(source_fd, target_fd, rows):
    """copy_template's work, between two open folders; False if a file is not as uploaded."""
    folders = []
    for kind, relpath, mode, _, _ in rows:
        if kind == "d":
            make_folder(target_fd, relpath)
            folders.append((relpath.count(b"/"), relpath, mode))
    for _, relpath, mode, size, _ in (row for row in rows if row[0] == "f"):
        try:
            copied = copy_file(source_fd, target_fd, relpath, mode & 0o777, size)
        except FileNotFoundError:  # a folder the manifest didn't list
            make_folder(target_fd, os.path.dirname(relpath))
            copied = copy_file(source_fd, target_fd, relpath, mode & 0o777, size)
        if not copied:
            return False
    for kind, relpath, _, link, _ in rows:
        if kind == "l":
            os.symlink(link, relpath, dir_fd=target_fd)
    for _, relpath, mode in sorted(folders, reverse=True):
        os.chmod(relpath, (mode & 0o777) | 0o700, dir_fd=target_fd)
    return True


def make_folder(root_fd, relpath):
    """Make a private folder (and its missing parents) at relpath under an open folder."""
    try:
        os.mkdir(relpath, 0o700, dir_fd=root_fd)
    except FileExistsError:
        return
    except FileNotFoundError:
        make_folder(root_fd, os.path.dirname(relpath))
        os.mkdir(relpath, 0o700, dir_fd=root_fd)
    os.chmod(relpath, 0o700, dir_fd=root_fd)  # whatever the umask


def copy_file(source_fd, target_fd, relpath, mode, size):
    """Copy a template file into a new private file; False if it is not as uploaded.

    As uploaded: a regular file of the manifest's size, whose mtime is still
    STORE_MTIME (nothing wrote to it since); unchanged while copied: the same
    size, mtime and ctime after the copy as before (any write moves the ctime).
    """
    from .store import CREATE_NEW, STORE_MTIME_NS, finish_file

    if not size:  # empty files are made, not copied
        fd = os.open(relpath, CREATE_NEW, 0o600, dir_fd=target_fd)
        try:
            finish_file(fd, mode)
        finally:
            os.close(fd)
        return True
    source = os.open(relpath, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=source_fd)
    try:
        before = os.fstat(source)
        if before.st_mtime_ns != STORE_MTIME_NS or before.st_size != size:
            return False
        if not stat.S_ISREG(before.st_mode):
            return False
        fd = os.open(relpath, CREATE_NEW, 0o600, dir_fd=target_fd)
        try:
            copied = copy_bytes(source, fd, size)
            after = os.fstat(source)
            same = (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
                before.st_mtime_ns,
                before.st_ctime_ns,
                before.st_size,
            )
            if copied == size and same:
                finish_file(fd, mode)
                return True
        finally:
            os.close(fd)
        return False
    finally:
        os.close(source)


def copy_bytes(source, target, size):
    """Copy up to size bytes from one open file to another, in the kernel when it can;
    how many were copied."""
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    while copy_range is not None and done < size:
        try:
            count = copy_range(source, target, size - done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break  # not on this file system: copied through this process below
        if not count:
            return done
        done += count
    from ..protocol import MAX_CHUNK

    while done < size:
        data = os.pread(source, min(MAX_CHUNK, size - done), done)
        if not data:
            break
        os.lseek(target, done, os.SEEK_SET)
        while data:
            written = os.write(target, data)
            data, done = data[written:], done + written
    return done


def link_template(upload, array_dir):
    """Lay a new array's template out as hard links to an old array's (a resubmit of an
    array): one pass, no store lock, nothing copied. False if a file of the old
    template is not as uploaded (what was made is then the caller's to remove).

    The old template is never run in, so its files are as the store gave them (the
    same inodes, listed in its BLOBS_FILE, which the new array takes too). The
    upload is planned, as after lay_out_kept: its finish makes the symlinks and
    gives folders their modes.
    """
    from .layout import BLOBS_FILE
    from .manifest import parse_manifest, read_parts
    from .store import STORE_MTIME_NS, UNSHARED, lease_path

    rows = []
    for part in read_parts(os.path.join(array_dir, MANIFEST_FILE)):
        rows += parse_manifest(part)
    os.close(os.open(lease_path(upload.queue, upload.token), os.O_WRONLY | os.O_CREAT, 0o600))
    flags = os.O_RDONLY | os.O_DIRECTORY
    source_fd = os.open(os.path.join(array_dir, WORK_DIR), flags)
    target_fd = os.open(upload.work, flags)
    try:
        for kind, relpath, _, _, _ in rows:
            if kind == "d":
                make_folder(target_fd, relpath)
        for kind, relpath, _, size, _ in rows:
            if kind != "f":
                continue
            try:
                os.link(relpath, relpath, src_dir_fd=source_fd, dst_dir_fd=target_fd)
            except FileNotFoundError:  # a folder the manifest didn't list, or no such file
                try:
                    os.stat(relpath, dir_fd=source_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                make_folder(target_fd, os.path.dirname(relpath))
                os.link(relpath, relpath, src_dir_fd=source_fd, dst_dir_fd=target_fd)
            except OSError as exc:
                if exc.errno in UNSHARED:  # another's file, too many links...
                    return False
                raise
            info = os.stat(relpath, dir_fd=target_fd, follow_symlinks=False)
            if info.st_mtime_ns != STORE_MTIME_NS or info.st_size != size:
                return False
    finally:
        os.close(source_fd)
        os.close(target_fd)
    copy_small_file(os.path.join(array_dir, BLOBS_FILE), os.path.join(upload.staging, BLOBS_FILE))
    upload.rows, upload.planned = rows, True
    return True


def copy_small_file(source, target):
    """Copy a small file (read whole) into a new private one; nothing if there is no source."""
    try:
        with open(source, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def lay_out_from_store(queue, array_dir, task_dir):
    """Lay a task's work/ out from its array's manifest and the store, as resubmit lays a
    job out, then replace every file the store gave with a checked private copy
    (see lay_out_task). AgentError if the store no longer holds a content.
    """
    from .files import remove_quietly
    from .layout import BLOBS_FILE
    from .store import copy_verified, lease_path
    from .upload import Upload, lay_out_kept, new_token

    token = new_token()
    make_private_dir(os.path.join(task_dir, WORK_DIR))
    lease = lease_path(queue, token)
    with open(lease, "w") as stream:  # whose it is, before any blob is linked
        stream.write("%s.%s" % (os.path.basename(array_dir), os.path.basename(task_dir)))
    upload = Upload(queue, token, task_dir)
    try:
        lay_out_kept(upload, os.path.join(array_dir, MANIFEST_FILE), None)
        for digest in upload.linked:
            path, mode = upload.files[digest][0]
            private = path + b".tej-copy"
            if not copy_verified(path, private, digest, mode):
                raise AgentError(ERR_INVALID, "A stored file changed while it was copied: retry")
            os.rename(private, path)
        upload.finish()
    finally:
        upload.discard_files()
        remove_quietly(os.path.join(task_dir, BLOBS_FILE))
        remove_quietly(lease)
