"""The queue directory: links to it, its configuration, opening it, its lock."""

import errno
import fcntl
import os

from ..protocol import (
    DEFAULT_RUNNER,
    ERR_INVALID,
    ERR_JOB_NOT_FOUND,
    ERR_QUEUE,
    task_id_parts,
)
from .errors import (
    AgentError,
)
from .files import (
    json_loads,
    make_private_dir,
    make_private_dirs,
    now_iso,
    randrange,
    read_json,
    remove_quietly,
    remove_tree,
    write_json_atomic,
)
from .layout import (
    AGENT_DIR,
    ID_PATTERN,
    JOBS_DIR,
    LINK_FORMAT,
    LIST_CACHE,
    QUEUE_CONFIG,
    QUEUE_FORMAT,
    STAGING_DIR,
    TRASH_DIR,
    validate_job_id,
)
from .records import (
    missing_status,
    read_status_record,
)


def read_link(path):
    """The target of a tej link file, or None if path is not a link file."""
    try:
        with open(path) as stream:
            data = json_loads(stream.read(65536))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("tej_link"), str):
        return data["tej_link"]
    return None


def resolve_queue_path(text):
    """Follow tej links from the path the user gave to the real queue directory."""
    if not isinstance(text, str) or not text or "\0" in text:
        raise AgentError(ERR_INVALID, "Invalid queue path %r" % (text,))
    path = os.path.abspath(os.path.expanduser(text))
    seen = []  # type: list[str]
    while os.path.isfile(path):
        if path in seen:
            raise AgentError(ERR_QUEUE, "Links form a loop: %s" % " -> ".join(seen + [path]))
        seen.append(path)
        target = read_link(path)
        if target is None:
            raise AgentError(ERR_QUEUE, "%s is a file, not a tej queue or link" % path)
        target = os.path.expanduser(target)
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return path


class Queue(object):
    """A queue directory on this server."""

    def __init__(self, root, config):
        self.root = root
        self.config = config  # None: there is no queue at root
        self.runner = None  # set by open_runner()

    @property
    def exists(self):
        """Whether there is a queue at root."""
        return self.config is not None

    def path(self, *parts):
        """A path inside the queue."""
        return os.path.join(self.root, *parts)

    def job_dir(self, job_id):
        """The directory of an existing job; JobNotFound otherwise."""
        validate_job_id(job_id)
        path = self.path(JOBS_DIR, job_id)
        if os.path.isdir(path):
            return path
        task = task_id_parts(job_id)
        if task is not None:
            from .arrays import task_dir

            return task_dir(self, task[0], task[1])
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)

    def job_ids(self):
        """The identifiers of the jobs in the queue, in no particular order."""
        try:
            names = os.listdir(self.path(JOBS_DIR))
        except OSError:
            return []
        return [name for name in names if ID_PATTERN.match(name)]

    def record(self, job_id, job_dir):
        """A job's status record, brought up to date by the queue's runner."""
        record = read_status_record(job_dir)
        if record is None:
            if not os.path.isdir(job_dir):  # an array's task not started yet, or deleted
                from .arrays import unstarted_record

                unstarted = unstarted_record(job_dir)
                if unstarted is None:  # deleted since its folder was found
                    raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)
                return unstarted
            return missing_status()
        return self.runner.refresh(job_id, job_dir, record)  # type: ignore[union-attr]


def read_queue_config(root):
    """A queue's configuration; None if root holds no queue (QueueError if something else)."""
    config_path = os.path.join(root, QUEUE_CONFIG)
    try:  # read at once (every request opens its queue): the checks below when it isn't there
        config = read_json(config_path)
        found = True
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        found = False
    if found:
        version = config.get("format") if isinstance(config, dict) else None
        if not isinstance(version, int):
            raise AgentError(ERR_QUEUE, "%s is not a valid tej queue configuration" % config_path)
        if version > QUEUE_FORMAT:
            raise AgentError(
                ERR_QUEUE,
                "The queue %s was written by a newer tej (format %d; this tej reads up to %d): "
                "upgrade tej" % (root, version, QUEUE_FORMAT),
            )
        return config
    if os.path.isdir(root):
        if os.listdir(root):
            raise AgentError(ERR_QUEUE, "%s exists but is not a tej queue" % root)
        return None
    if os.path.lexists(root):
        raise AgentError(ERR_QUEUE, "%s exists but is not a tej queue" % root)
    return None


def queue_config(runner, options):
    """The configuration document of a new queue."""
    return {
        "format": QUEUE_FORMAT,
        "runner": runner,
        "options": options,
        "created_at": now_iso(),
    }


def create_queue(root, runner=DEFAULT_RUNNER, options=None):
    """Create a queue at root atomically (built aside, then renamed into place)."""
    from .index import rebuild

    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        make_private_dirs(parent)
    building = "%s.tej-new-%d-%d" % (root, os.getpid(), randrange(1 << 30))
    make_private_dir(building)
    try:
        for name in (JOBS_DIR, STAGING_DIR, TRASH_DIR, AGENT_DIR):
            make_private_dir(os.path.join(building, name))
        rebuild(building)  # an empty index, whole
        write_json_atomic(os.path.join(building, QUEUE_CONFIG), queue_config(runner, options or {}))
        try:
            os.rename(building, root)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if os.path.isdir(building):
            remove_tree(building)


def open_queue(path, create=False, with_runner=True, with_index=True):
    """The queue the user's path leads to (following links), the one way to open a queue.

    create: make it, with default settings, if there is none. Without a queue
    there, the Queue is an empty stand-in (its .exists is false: it has no
    jobs). with_runner: give it its runner (queue.runner), for requests that
    the runner has a say in (reading a job's files doesn't). with_index: upgrade
    a queue of an older format, and build or repair its index if it must be.
    """
    if not isinstance(path, str) or not path:
        raise AgentError(ERR_INVALID, "The queue path can't be empty")
    root = resolve_queue_path(path)
    config = read_queue_config(root)
    if config is None and create:
        create_queue(root)
        config = read_queue_config(root)
    if config is not None and with_index:
        config = prepare_index(root, config)
    queue = Queue(root, config)
    if with_runner:
        from .runners import open_runner

        open_runner(queue)
    return queue


def prepare_index(root, config):
    """Upgrade a queue of format 1 in place (its index built); repair the index if need be."""
    from .index import ensure_index, rebuild

    if config["format"] >= QUEUE_FORMAT:
        ensure_index(root)
        return config
    rebuild(root)  # format 1 -> 2: the index, built from the job folders
    remove_quietly(os.path.join(root, LIST_CACHE))
    config = dict(config, format=QUEUE_FORMAT, upgraded_at=now_iso())
    write_json_atomic(os.path.join(root, QUEUE_CONFIG), config)
    return config


def link_location(link, root, force):
    """Check that a link to root can be written at link; returns its absolute path."""
    if not isinstance(link, str) or not link or "\0" in link:
        raise AgentError(ERR_INVALID, "A link path can't be empty")
    path = os.path.abspath(os.path.expanduser(link))
    if path == root:
        raise AgentError(ERR_INVALID, "A link can't point to itself: %s" % path)
    if os.path.isdir(path):
        raise AgentError(ERR_QUEUE, "Can't make a link at %s: it is a directory" % path)
    if os.path.lexists(path):
        target = read_link(path)
        if target is None:
            raise AgentError(ERR_QUEUE, "Can't make a link at %s: a file is there" % path)
        if not force and resolve_queue_path(path) != root:
            raise AgentError(
                ERR_QUEUE, "%s already links to %s (use --force to replace it)" % (path, target)
            )
    return path


def write_link(path, root):
    """Write a link file at path that leads to the queue at root."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        make_private_dirs(parent)
    write_json_atomic(path, {"tej_link": root, "format": LINK_FORMAT})


HELD_LOCKS = {}  # type: dict[str, int]  # path -> how many QueueLocks hold it in this process


class QueueLock(object):
    """An exclusive advisory lock (flock) on a file of the queue.

    Reentrant within a process: a lock taken while this process holds it
    already (a lost job retried while the queue runner decides) just counts.
    """

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        if HELD_LOCKS.get(self.path):
            HELD_LOCKS[self.path] += 1
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        HELD_LOCKS[self.path] = 1
        return self

    def __exit__(self, *exc_info):
        HELD_LOCKS[self.path] -= 1
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
