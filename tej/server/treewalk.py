"""Walking a job's tree for `tej sync`: a row per entry, on two cores when the tree is big.

A row is (relpath, kind, mode, size, mtime_ns, inode, symlink target), kind "f"
(file), "d" (folder) or "l" (symlink); other kinds are left out. Symlinks are
never followed, and each folder's entries are looked up in the open folder
(fstatat), not by path.

Nearly all of a big walk's time is the kernel's, one fstatat per entry. Once a
walk has listed SHARE_AFTER entries, a forked child walks every other one of the
top folder's remaining subfolders (or those of the first folder that has several)
and sends its rows back marshalled, while this process walks the rest. Only a
process with one thread forks (Linux, where /proc says so); elsewhere, and if
anything goes wrong with the child, this process walks its folders itself.
"""

import gc
import marshal
import os
import stat
import sys

FS_ENCODING = sys.getfilesystemencoding()
#: A walk shares its remaining folders with a forked child once it has listed this many
#: entries: below that, a fork costs more than it saves.
SHARE_AFTER = 1000
OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def walk(folder, prefix, rows):
    """Add a folder's entries to rows {relpath: row}, recursively (prefix: the folder's
    relpath and a slash, or b"" for the job's own folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # gone, or unreadable: listed as empty
    try:
        walk_top(fd, prefix, rows)
    finally:
        os.close(fd)


def row_of(relpath, kind, info):
    """A row from an entry's stat."""
    size = info.st_size if kind == "f" else 0
    return (relpath, kind, info.st_mode & 0o7777, size, info.st_mtime_ns, info.st_ino, b"")


def walk_top(fd, prefix, rows):
    """walk() in the open folder fd, sharing its subfolders with a child once the walk is
    big enough (see the module's docstring)."""
    folders = list_folder(fd, prefix, rows)
    if len(folders) == 1:  # one folder holds the rest of the tree: share at its level
        inner = open_folder(fd, folders[0][0])
        if inner is not None:
            try:
                walk_top(inner, folders[0][1] + b"/", rows)
            finally:
                os.close(inner)
        return
    at = 0
    while at < len(folders) and len(rows) < SHARE_AFTER:
        walk_folder(fd, folders[at][0], folders[at][1], rows)
        at += 1
    rest = folders[at:]
    if len(rest) >= 2 and single_threaded():
        walk_shared(fd, rest, rows)
        return
    for name, relpath in rest:
        walk_folder(fd, name, relpath, rows)


def walk_folder(fd, name, relpath, rows):
    """Add the tree of the subfolder name of the open folder fd to rows."""
    inner = open_folder(fd, name)
    if inner is None:
        return
    try:
        for inner_name, inner_relpath in list_folder(inner, relpath + b"/", rows):
            walk_folder(inner, inner_name, inner_relpath, rows)
    finally:
        os.close(inner)


def open_folder(fd, name):
    """The subfolder name of the open folder fd, opened (None if it can't be: not listed)."""
    try:
        return os.open(name, OPEN_FOLDER, dir_fd=fd)
    except OSError:
        return None


def list_folder(fd, prefix, rows):
    """Add the entries of the open folder fd to rows; its subfolders as (name, relpath)."""
    try:
        items = list(os.scandir(fd))
    except OSError:
        return []
    folders = []
    for item in items:
        relpath = prefix + item.name.encode(FS_ENCODING, "surrogateescape")  # as os.fsencode
        try:
            info = item.stat(follow_symlinks=False)
        except OSError:
            continue
        kind = stat.S_IFMT(info.st_mode)
        if kind == stat.S_IFREG:
            rows[relpath] = (
                relpath,
                "f",
                info.st_mode & 0o7777,
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
                b"",
            )
        elif kind == stat.S_IFDIR:
            rows[relpath] = row_of(relpath, "d", info)
            folders.append((item.name, relpath))
        elif kind == stat.S_IFLNK:
            try:
                target = os.readlink(item.name, dir_fd=fd)
            except OSError:
                continue
            rows[relpath] = (relpath, "l", 0o777, 0, 0, 0, os.fsencode(target))
    return folders


def single_threaded():
    """Whether this process has one thread, as Linux's /proc says (False if it can't say):
    only then is a fork sure to leave the child nothing half-done by another thread."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def walk_shared(fd, folders, rows):
    """Add the trees of folders (subfolders of the open folder fd) to rows, on two cores: a
    forked child walks every other one; this process walks the rest, then reads the
    child's rows. If the child fails, its folders are walked here."""
    theirs, ours = folders[1::2], folders[0::2]
    child = start_child(fd, theirs)
    if child is None:
        ours = folders
    try:
        for name, relpath in ours:
            walk_folder(fd, name, relpath, rows)
    finally:
        found = finish_child(*child) if child is not None else None
    if found is None and child is not None:
        for name, relpath in theirs:
            walk_folder(fd, name, relpath, rows)
    elif found is not None:
        rows.update(found)


def start_child(fd, folders):
    """Fork a child that walks folders and writes its rows, marshalled, to a pipe: (pid,
    the pipe's read end), or None if it could not be started."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:
        child_walk(fd, folders, read_end, write_end)  # never returns
    os.close(write_end)
    return pid, read_end


def child_walk(fd, folders, parent_end, out):
    """The child's part: walk folders, write the rows to out, exit (whatever happens: the
    child never returns into the agent, nor flushes what the agent had buffered)."""
    code = 1
    try:
        gc.disable()  # a collection would write to the pages it still shares with its parent
        os.close(parent_end)
        rows = {}  # type: dict[bytes, tuple[object, ...]]
        for name, relpath in folders:
            walk_folder(fd, name, relpath, rows)
        data = memoryview(marshal.dumps(rows))
        while data:
            data = data[os.write(out, data) :]
        code = 0
    finally:
        os._exit(code)


def finish_child(pid, read_end):
    """The rows the child sent ({relpath: row}), or None if it did not send them whole."""
    chunks = []
    try:
        while True:
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        chunks = []
    finally:
        os.close(read_end)
        reap(pid)
    try:
        found = marshal.loads(b"".join(chunks))
    except (EOFError, ValueError, TypeError):
        return None
    return found if isinstance(found, dict) else None


def reap(pid):
    """Wait for the child (already reaped where SIGCHLD is ignored)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
