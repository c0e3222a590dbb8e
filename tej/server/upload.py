"""An upload in progress: laying out a job's tree from the store, receiving missing contents."""

import fcntl
import os

from ..protocol import (
    ERR_INVALID,
    ERR_SERVER,
    MAX_CHUNK,
)
from .errors import (
    AgentError,
)
from .files import (
    make_private_dirs,
    remove_quietly,
    show,
)
from .layout import (
    BLOBS_FILE,
    STAGING_DIR,
    STORE_DIR,
    WORK_DIR,
)
from .manifest import (
    check_paths,
)
from .store import (
    CREATE_NEW,
    MODE_SUFFIXES,
    REGULAR,
    STORE_MTIME_NS,
    UNSHARED,
    busy_inodes,
    copy_verified,
    evict,
    finish_file,
    lease_count,
    lease_path,
    new_sha256,
    store_lock,
    store_mode,
    write_all,
)


class StagedFolders(object):
    """The folders of a tree being laid out, opened by path relative to its root.

    The last one asked for stays open: a manifest lists the files of a folder
    together, so each folder is opened about once. Nothing in a staged tree is a
    symlink until the upload is finished, so no path here leads out of it.
    """

    def __init__(self, root):
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.relpath = b""
        self.fd = self.root_fd

    def open(self, relpath):
        """The open folder at relpath (b"": the root), created if the manifest didn't list it."""
        if relpath == self.relpath:
            return self.fd
        self.release()
        if relpath:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
            try:
                self.fd = os.open(relpath, flags, dir_fd=self.root_fd)
            except FileNotFoundError:
                make_private_dirs(self.root + b"/" + relpath)
                self.fd = os.open(relpath, flags, dir_fd=self.root_fd)
        self.relpath = relpath
        return self.fd

    def make(self, fd, name):
        """Create a private folder in the open folder fd (it may exist: see open)."""
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            return
        os.chmod(name, 0o700, dir_fd=fd)  # whatever the umask

    def release(self):
        """Close the folder kept open, unless it is the root."""
        if self.fd != self.root_fd:
            os.close(self.fd)
        self.relpath, self.fd = b"", self.root_fd

    def close(self):
        """Close every folder."""
        self.release()
        os.close(self.root_fd)


class Partial(object):
    """A content arriving: its file (open, locked), the hash of what came, and its size."""

    def __init__(self, fd, hasher, offset):
        self.fd = fd
        self.hasher = hasher
        self.offset = offset


def new_token():
    """A new upload token: the time, then a random part (hex)."""
    import time

    from .files import randrange

    return "%x%08x" % (int(time.time()), randrange(1 << 32))


def lay_out_kept(upload, manifest_path, keep_to):
    """Lay an upload out from a kept manifest (resubmit, an array's task): nothing is sent.

    keep_to: where to keep a copy of the manifest (the new job's), or None.
    The upload is planned; AgentError (invalid) naming the first file whose
    content the store no longer holds, if one is missing. OSError if there
    is no manifest.
    """
    from .manifest import keep_part, parse_manifest, read_parts

    for part in read_parts(manifest_path):
        if keep_to is not None:
            keep_part(keep_to, part)
        upload.add(parse_manifest(part))
    missing = upload.plan()
    if missing:
        path = upload.rows[missing[0][0]][1].decode("utf-8", "replace")
        raise AgentError(
            ERR_INVALID,
            "The queue's store no longer holds the uploaded content of %s: submit the "
            "directory again" % path,
        )


SMALL_BLOB = 256 * 1024  # a shared blob this small may be copied without reading the leases
# Reading the leases costs a few opens per lease; copying a small blob, about one create (and
# creates cost the most here). So small shared blobs are copied without reading the leases when
# there are at most COPY_FREELY of them (a tiny job), or when reading the leases would cost more
# than the copies (a lease costs about 1 / LEASES_PER_COPY of a copy).
COPY_FREELY = 8
LEASES_PER_COPY = 4


class Upload(object):
    """An upload of this connection: the tree it lays out, and the contents it still expects.

    Files are linked to the store's blobs; the first file of each content gets
    the blob's own inode, the others (same content twice, other modes) get
    checked copies of it, so no two files of a job ever share an inode. The
    inodes the job shares with the store are listed in its BLOBS_FILE, and its
    lease (store/leases/TOKEN) tells other uploads whose they are while the job
    may still run: an upload never links an inode another live job holds.
    """

    def __init__(self, queue, token, staging):
        self.queue = queue
        self.token = token
        self.staging = staging
        self.work = os.fsencode(os.path.join(staging, WORK_DIR))
        self.store = os.fsencode(queue.path(STORE_DIR)) + b"/"
        self.rows = []  # parse_manifest's rows, of every part
        self.paths = set()  # type: set[bytes]  # the rows' paths
        self.files = {}  # type: dict[str, list[tuple[bytes, int]]]  # digest -> its files
        self.heads = {}  # type: dict[str, int]  # digest -> the manifest index of its first file
        self.sizes = {}  # type: dict[str, int]
        self.linked = {}  # type: dict[str, os.stat_result]  # digest -> its blob, linked
        self.planned = False  # whether the whole manifest arrived, and what to send is known
        self.expected = {}  # type: dict[int, str]  # manifest index -> digest still to send
        self.partials = {}  # type: dict[str, Partial]  # the contents arriving
        self.blobs = -1  # the BLOBS_FILE, open for appending

    def path(self, relpath):
        """The full path of a manifest entry in the staged tree."""
        return self.work + b"/" + relpath

    def blob(self, digest, mode):
        """Where the store keeps a content, for files of that mode."""
        return self.store + ("%s/%s-%03o" % (digest[:2], digest, mode)).encode("ascii")

    def discard(self):
        """Let go of the upload's files and lease (its staging area is removed by the caller)."""
        self.discard_files()
        remove_quietly(lease_path(self.queue, self.token))

    def note_blob(self, digest, mode, info):
        """Note in BLOBS_FILE an inode the job shares with the store, before others can see it."""
        line = "%s-%03o %d\n" % (digest, mode, info.st_ino)
        os.write(self.blobs, line.encode("ascii"))

    def add(self, rows):
        """Lay out a part of the manifest (its entries follow the previous parts', their paths too).

        Under the store's lock: link what the store has, and note the inodes in
        BLOBS_FILE (the lease is made first), before the lock lets others see them.
        """
        paths = [row[1] for row in rows]
        if not self.paths.isdisjoint(paths):  # parse_manifest checked this part alone
            check_paths(paths, self.paths)
        self.paths.update(paths)
        start = len(self.rows)
        self.rows += rows
        queue = self.queue
        with store_lock(queue):
            if self.blobs < 0:
                os.close(os.open(lease_path(queue, self.token), os.O_WRONLY | os.O_CREAT, 0o600))
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL
                self.blobs = os.open(os.path.join(self.staging, BLOBS_FILE), flags, 0o600)
            linked, lines = self.lay_out(rows, start)
            os.write(self.blobs, "".join(lines).encode("ascii"))
        self.linked.update(linked)

    def plan(self):
        """Once the whole manifest is laid out: the [[index, offset]] of the contents to send.

        Under the store's lock, the other leases are read, and the inodes a live
        job holds are replaced with fresh copies. Then the other files of each
        content linked are filled in, and partial contents taken over.
        """
        linked = self.linked
        # Only a blob with another link than the store's and this upload's may be
        # shared with a live job: the leases say which. Reading them may cost more
        # than copying the small ones (the copy replaces the blob in the store): see
        # read_leases.
        shared = [digest for digest, info in linked.items() if info.st_nlink > 2]
        if shared:
            with store_lock(self.queue):
                read = self.read_leases(shared)
                busy = busy_inodes(self.queue, self.token) if read else set()
                for digest in shared:
                    small = self.sizes[digest] <= SMALL_BLOB and not read
                    copy = small or linked[digest].st_ino in busy
                    if copy and not self.refresh(digest):
                        del linked[digest]
        for digest in linked:
            files = self.files[digest]
            if len(files) > 1:
                self.fill(digest, files[0][0], files[1:])
        wanted = [digest for digest in self.files if digest not in linked]
        offsets = self.adopt_partials(set(wanted)) if wanted else {}
        missing = []
        for digest in wanted:
            if offsets.get(digest, 0) is not None:
                index = self.heads[digest]
                self.expected[index] = digest
                missing.append([index, offsets.get(digest, 0)])
        self.planned = True
        return missing

    def read_leases(self, shared):
        """Whether to read the leases to know which of the shared blobs a live job holds.

        Always with a large one among them (a copy costs its size). Else only if
        copying the small ones would cost more than reading the leases: not for a
        few (a tiny job), and not when the leases outnumber them LEASES_PER_COPY to one.
        """
        small = sum(1 for digest in shared if self.sizes[digest] <= SMALL_BLOB)
        if small < len(shared):
            return True
        return small > COPY_FREELY and small * LEASES_PER_COPY > lease_count(self.queue)

    def lay_out(self, rows, start):
        """Lay rows out in one pass, linking each content's first file to its blob.

        Folders and empty files are created; each content's first file (one whose
        mode the blob can have, readable by its owner, if there is one) is linked
        to its blob if the store holds it intact: nothing wrote to it (its mtime
        is still STORE_MTIME), and its size and mode are right. A damaged blob is
        dropped from the store. Paths are relative to open folders (StagedFolders),
        so each link and check costs the kernel no path walk. Returns the stat of
        each blob linked, by digest, and the BLOBS_FILE lines that list them.
        """
        linked, lines = {}, []
        files_of, sizes, heads = self.files, self.sizes, self.heads
        work = self.work + b"/"
        folders = StagedFolders(self.work)
        store = os.open(self.store, os.O_RDONLY | os.O_DIRECTORY)
        current, fd = b"", folders.root_fd
        try:
            for index, (kind, relpath, mode, extra, digest) in enumerate(rows, start):
                parent, _, name = relpath.rpartition(b"/")
                if parent != current:
                    current, fd = parent, folders.open(parent)
                if kind == "f" and extra:
                    mode &= 0o777
                    files = files_of.get(digest)
                    if files is None:
                        files = files_of[digest] = []
                        sizes[digest] = extra
                        heads[digest] = index
                    if not mode & 0o400 or (files and files[0][1] & 0o400):
                        files.append((work + relpath, mode))
                        continue  # a copy: made once the content is there
                    files.insert(0, (work + relpath, mode))
                    heads[digest] = index
                    blob = digest[:2] + "/" + digest + MODE_SUFFIXES[mode]
                    try:
                        os.link(blob, name, src_dir_fd=store, dst_dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in UNSHARED:
                            continue  # not in the store, or can't be shared: the client sends it
                        raise
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if (
                        info.st_mtime_ns != STORE_MTIME_NS
                        or info.st_size != extra
                        or info.st_mode != REGULAR | mode
                    ):
                        os.unlink(name, dir_fd=fd)
                        evict(self.store + blob.encode("ascii"), info)
                        continue
                    linked[digest] = info
                    lines.append(f"{blob[3:]} {info.st_ino}\n")
                elif kind == "f":
                    empty = os.open(name, CREATE_NEW, 0o600, dir_fd=fd)
                    try:
                        finish_file(empty, mode & 0o777)
                    finally:
                        os.close(empty)
                elif kind == "d":
                    folders.make(fd, name)
        finally:
            folders.close()
            os.close(store)
        return linked, lines

    def linkable(self, digest):
        """Whether a content's first file can be the blob itself (else all its files are copies)."""
        return bool(self.files[digest][0][1] & 0o400)

    def refresh(self, digest):
        """Give a content a fresh blob, copied from one that a live job shares; False if damaged."""
        path, mode = self.files[digest][0]
        blob = self.blob(digest, mode)
        fresh = os.path.join(self.staging, "fresh-" + digest)
        if not copy_verified(path, fresh, digest, mode):
            evict(blob, os.lstat(path))
            os.unlink(path)
            return False
        self.note_blob(digest, mode, os.lstat(fresh))
        os.rename(fresh, path)
        os.link(path, fresh)
        os.rename(fresh, blob)
        return True

    def fill(self, digest, source, files):
        """Give files of a content checked copies of source."""
        for path, mode in files:
            if not copy_verified(source, path, digest, mode):
                raise AgentError(ERR_SERVER, "A stored file changed while it was copied: retry")

    def adopt_partials(self, digests):
        """Take over what interrupted uploads left of these contents; {digest: offset}."""
        found = {}  # type: dict[str, str]
        folder = self.queue.path(STAGING_DIR)
        for name in os.listdir(folder):
            if name == self.token:
                continue
            try:
                names = os.listdir(os.path.join(folder, name))
            except OSError:
                continue
            for entry in names:
                if entry.startswith("part-") and entry[5:] in digests:
                    found.setdefault(entry[5:], os.path.join(folder, name, entry))
        offsets = {}  # type: dict[str, int | None]
        for digest, path in found.items():
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its writer is gone
                os.rename(path, self.partial_path(digest))
            except OSError:
                os.close(fd)
                continue
            hasher, offset = new_sha256(), 0
            while True:
                data = os.read(fd, MAX_CHUNK)
                if not data:
                    break
                hasher.update(data)
                offset += len(data)
            self.partials[digest] = Partial(fd, hasher, offset)
            if offset >= self.sizes[digest]:
                try:
                    self.complete(digest)
                    offsets[digest] = None
                    continue
                except AgentError:
                    self.partials[digest] = self.new_partial(digest)
            offsets[digest] = self.partials[digest].offset
        return offsets

    def partial_path(self, digest):
        """Where a content arrives, in the staging area."""
        return os.path.join(self.staging, "part-" + digest)

    def new_partial(self, digest):
        """Start receiving a content: an empty file, locked before others can see it."""
        path = self.partial_path(digest)
        tmp = os.path.join(self.staging, "new-" + digest)
        remove_quietly(tmp)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            raise
        return Partial(fd, new_sha256(), 0)

    def receive_whole(self, contents, missing):
        """Take the whole contents [[index, data]] sent along with the manifest; still missing."""
        asked = dict((self.rows[index][4], (index, offset)) for index, offset in missing)
        for index, data in contents:
            if index >= len(self.rows) or self.rows[index][4] not in asked:
                continue  # not a file, or the store has it
            wanted, offset = asked.pop(self.rows[index][4])
            if len(data) != self.rows[index][3]:
                raise AgentError(ERR_INVALID, "File %d was sent with the wrong size" % index)
            self.receive(wanted, offset, data[offset:])
        return [[index, offset] for index, offset in missing if index in self.expected]

    def receive(self, index, offset, data):
        """Write a chunk of a content the client was asked for; store it once whole."""
        digest = self.expected.get(index)
        if digest is None:
            raise AgentError(ERR_INVALID, "File %d of the manifest was not asked for" % index)
        partial = self.partials.get(digest)
        if partial is None:
            partial = self.partials[digest] = self.new_partial(digest)
        if offset != partial.offset or offset + len(data) > self.sizes[digest]:
            raise AgentError(
                ERR_INVALID,
                "Data of file %d at %d, where %d bytes have arrived"
                % (index, offset, partial.offset),
            )
        write_all(partial.fd, data, offset)
        partial.hasher.update(data)
        partial.offset += len(data)
        if partial.offset == self.sizes[digest]:
            self.complete(digest)
            del self.expected[index]

    def complete(self, digest):
        """Check a content that arrived whole and put it in place: files, then the store."""
        partial = self.partials.pop(digest)
        fd, hasher, size = partial.fd, partial.hasher, partial.offset
        part = self.partial_path(digest)
        path, mode = self.files[digest][0]
        try:
            if hasher.hexdigest() != digest or size != self.sizes[digest]:
                remove_quietly(part)
                raise AgentError(
                    ERR_INVALID,
                    "The content sent for %s is not the one announced: did it change while it was "
                    "uploaded?" % show(path[len(self.work) + 1 :]),
                )
            finish_file(fd, store_mode(mode))
            if not self.linkable(digest):  # no file can share it: copies only, nothing stored
                self.fill(digest, part, self.files[digest])
                os.unlink(part)
                return
            self.note_blob(digest, mode, os.fstat(fd))
            os.link(part, path)
            self.fill(digest, part, self.files[digest][1:])
            blob = self.blob(digest, mode)
            try:
                os.rename(part, blob)
            except FileNotFoundError:
                make_private_dirs(os.path.dirname(blob))
                os.rename(part, blob)
        finally:
            os.close(fd)

    def finish(self):
        """Check that every content arrived; make the symlinks, give folders their modes."""
        self.discard_files()
        if not self.planned:
            raise AgentError(ERR_INVALID, "The upload is incomplete: its manifest is not")
        for index in sorted(self.expected):
            path = self.rows[index][1]
            raise AgentError(ERR_INVALID, "The upload is incomplete: %s is missing" % show(path))
        folders = []
        for kind, relpath, mode, extra, _ in self.rows:
            if kind == "l":
                os.symlink(extra, self.path(relpath))
            elif kind == "d":
                folders.append((relpath.count(b"/"), self.path(relpath), mode))
        for _, path, mode in sorted(folders, reverse=True):
            os.chmod(path, (mode & 0o777) | 0o700)

    def discard_files(self):
        """Close what the upload holds open, keeping its lease (the job takes it over)."""
        for partial in self.partials.values():
            os.close(partial.fd)
        self.partials = {}
        if self.blobs >= 0:
            os.close(self.blobs)
            self.blobs = -1
