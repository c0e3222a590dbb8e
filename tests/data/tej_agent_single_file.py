"""tej's agent: everything that runs on the server.

This module is shipped as source to the server (which keeps it in a private
cache, see tej/session.py), so it is kept small on purpose: standard library
only, Python 3.8 and newer, plain data (dicts, lists, str, bytes, numbers) on
the wire and on disk. It owns the protocol version, the operation names, the
job states and the queue format; the client restates the few it needs in
tej/protocol.py (a test checks that they are equal), so that no command has to
import this module.

It has two roles:

* Under execnet (imported from the server's cache, then ``serve(channel)``;
  or run with ``__name__ == "__channelexec__"``) it serves requests: a
  request is ``{"v": PROTOCOL_VERSION, "op": NAME, "args": {...}}`` and the
  reply is ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": TYPE,
  "message": TEXT}``. One connection serves any number of requests, in order.
* Imported from the copy it writes into the queue
  (QUEUE/agent/tej_agent_DIGEST.py, then ``main(["supervise", JOBDIR])``), it
  is the supervisor of one job: it starts the job in its own process group, waits for
  it, and records how it ended, whether or not anyone is still connected.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import struct
import sys
import time

# hashlib, random, select, shutil and subprocess are imported where they are used: a
# connection that only reads (status, list) does not pay for them.

PROTOCOL_VERSION = 1
QUEUE_FORMAT = 1
LINK_FORMAT = 1

QUEUE_CONFIG = "tej-queue.json"
JOBS_DIR = "jobs"
STAGING_DIR = "staging"
TRASH_DIR = "trash"
AGENT_DIR = "agent"
STORE_DIR = "store"
LEASES_DIR = "leases"
BLOBS_FILE = "blobs"
JOB_FILE = "job.json"
STATUS_FILE = "status.json"
WORK_DIR = "work"
STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
SUPERVISOR_LOG = "supervisor.log"

STATE_STARTING = "starting"
STATE_QUEUED = "queued"
STATE_SCHEDULED = "scheduled"
STATE_RUNNING = "running"
STATE_FINISHED = "finished"
STATE_KILLED = "killed"
STATE_TIMED_OUT = "timed_out"
STATE_LOST = "lost"
STATE_CANCELLED = "cancelled"
ACTIVE_STATES = (STATE_STARTING, STATE_QUEUED, STATE_SCHEDULED, STATE_RUNNING)
END_STATES = (STATE_FINISHED, STATE_KILLED, STATE_TIMED_OUT, STATE_LOST, STATE_CANCELLED)

OUTPUT_KEPT = "tej"
OUTPUT_DISCARDED = "discard"
STDERR_MERGED = "stdout"

DEFAULT_RUNNER = "default"
RUNNER_FIELDS = ("priority", "after", "slurm")  # job fields only some runners accept
RUNNER_DATA = "runner.json"  # a job's private record kept by its runner
LOCK_FILE = "queue.lock"
LIST_CACHE = "list-cache.json"
LIST_CACHE_FORMAT = 2  # 2: rows (values in LIST_FIELDS order), not status dicts
LIST_FIELDS = (
    "id",
    "state",
    "exit_code",
    "signal",
    "reason",
    "submitted_at",
    "scheduled_for",
    "started_at",
    "ended_at",
    "elapsed",
    "position",
    "notifications",
)
DEFAULT_SCRIPT = "start.sh"
KILL_GRACE = 5.0
START_TIMEOUT = 60.0
MAX_OFFSET = 1 << 62
MAX_READ = 1 << 24
MAX_DURATION = 3650 * 86400.0  # ten years: longer is a mistake, and overflows timers
STALE_UPLOAD = 6 * 3600.0  # an upload untouched this long was abandoned
STALE_TRASH = 3600.0  # a deletion interrupted this long ago
STORE_GC_INTERVAL = 3600.0  # how often an upload looks for unused blobs
STORE_MTIME = 946684800  # 2000-01-01T00:00:00Z: the modification time of every uploaded file
STORE_MTIME_NS = STORE_MTIME * 10**9
MAX_CHUNK = 1 << 20
REGULAR = 0o100000  # stat.S_IFREG
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
MODE_SUFFIXES = ["-%03o" % mode for mode in range(0o1000)]  # the end of a blob's name, by mode
# Why a blob can't be linked: not in the store, too many links, another filesystem, no links.
UNSHARED = (errno.ENOENT, errno.EMLINK, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP)
POLL_INTERVAL = 0.02
MAX_BLOCK = 30.0
MAX_FD = 65536  # file descriptors a forked supervisor closes
MAX_ID_LENGTH = 128
ID_REGEX = r"[A-Za-z0-9_\-.+=@%:,]+\Z"
ID_PATTERN = re.compile(ID_REGEX)

ERR_BAD_REQUEST = "BadRequest"
ERR_INVALID = "InvalidInput"
ERR_JOB_NOT_FOUND = "JobNotFound"
ERR_JOB_EXISTS = "JobExists"
ERR_JOB_RUNNING = "JobRunning"
ERR_QUEUE = "QueueError"
ERR_AGENT_MISSING = "AgentMissing"
ERR_RUNNER_MISSING = "RunnerMissing"
ERR_SERVER = "ServerError"
ERR_INTERNAL = "InternalError"

BOOT_ID_PATH = os.environ.get("TEJ_BOOT_ID_PATH", "/proc/sys/kernel/random/boot_id")


class AgentError(Exception):
    """An anticipated failure, sent to the client as an error reply."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


# -- small helpers ----------------------------------------------------------


def now_iso(when=None):
    """Format a POSIX time (default: now) as ISO 8601 UTC with microseconds."""
    when = time.time() if when is None else when
    micros = int((when % 1) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".%06dZ" % micros


def parse_iso(text):
    """Parse a time written by now_iso back into POSIX time."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hours, minutes, seconds = int(text[11:13]), int(text[14:16]), int(text[17:19])
    days = days_since_epoch(year, month, day)
    fraction = text[20:].rstrip("Z")
    whole = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return whole + (float("0." + fraction) if fraction else 0.0)


def days_since_epoch(year, month, day):
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar.

    As calendar.timegm counts them, without importing calendar (which loads datetime
    and locale: a millisecond of the first status of every connection).
    """
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def randrange(limit):
    """A random number in [0, limit)."""
    import random

    return random.randrange(limit)


def write_json_atomic(path, data, durable=True):
    """Write JSON to path atomically: temp file, fsync (if durable), rename."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_file_atomic(path, text.encode("utf-8"), durable)


def write_file_atomic(path, data, durable=True):
    """Write bytes to path atomically, private to its owner: temp file, fsync, rename.

    Without durable, no fsync: readers still never see a partial file, but
    a power cut may lose the write (for records that a crash makes moot).
    """
    tmp = "%s.tmp-%d-%d" % (path, os.getpid(), randrange(1 << 30))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def read_json(path):
    """Read a JSON document; AgentError if it is not valid JSON."""
    with open(path) as stream:
        text = stream.read()
    try:
        return json.loads(text)
    except ValueError:
        raise AgentError(ERR_QUEUE, "%s is not valid JSON" % path)


def remove_quietly(path):
    """Remove a file, ignoring its absence."""
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_tree(path):
    """Remove a directory tree, making read-only folders writable on the way."""

    def retry_writable(function, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        try:
            os.chmod(parent, 0o700)
            function(failed_path)
        except OSError:
            pass

    import shutil

    shutil.rmtree(path, onerror=retry_writable)


def remove_stale(folder, age):
    """Remove what was left in folder by interrupted work, untouched for age seconds."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    limit = time.time() - age
    for name in names:
        path = os.path.join(folder, name)
        try:
            if os.lstat(path).st_mtime < limit:
                remove_tree(path)
        except OSError:
            pass


def make_private_dirs(path):
    """Create a folder and any missing parents, each private to its owner (whatever the umask)."""
    if os.path.isdir(path):
        return
    make_private_dirs(os.path.dirname(path))
    try:
        make_private_dir(path)
    except FileExistsError:
        pass


def make_private_dir(path):
    """Create a directory readable only by its owner."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


def validate_job_id(job_id):
    """Raise AgentError unless job_id is a valid job identifier."""
    if not isinstance(job_id, str) or not job_id:
        raise AgentError(ERR_INVALID, "A job identifier can't be empty")
    if job_id in (".", "..") or len(job_id) > MAX_ID_LENGTH or not ID_PATTERN.match(job_id):
        raise AgentError(
            ERR_INVALID,
            "Invalid job identifier %r: use at most %d letters, digits and _-.+=@%%:,"
            % (job_id, MAX_ID_LENGTH),
        )


def relative_parts(relpath):
    """Split a relative path (bytes) into parts, refusing anything that escapes."""
    if not isinstance(relpath, bytes) or b"\0" in relpath:
        raise AgentError(ERR_INVALID, "Invalid path %r" % (relpath,))
    if relpath.startswith(b"/"):
        raise AgentError(ERR_INVALID, "Path %s is absolute" % show(relpath))
    parts = [part for part in relpath.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(relpath))
    return parts


def show(path):
    """A printable form of a bytes path."""
    return repr(os.fsdecode(path))


# -- process identity -------------------------------------------------------


def boot_id():
    """An identifier of the current boot of the server, or None."""
    try:
        with open(BOOT_ID_PATH) as stream:
            return stream.read().strip() or None
    except OSError:
        return None


def process_start(pid):
    """The start time of a live process in clock ticks (None if unknowable or dead).

    Returns False when the process does not exist or is a zombie.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as stream:
            fields = stream.read().rsplit(b")", 1)[1].split()
    except (IOError, OSError, IndexError):
        return None if process_exists(pid) else False
    if fields[0] in (b"Z", b"X"):
        return False
    return int(fields[19])


def process_exists(pid):
    """Whether a process with this pid exists (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def identify_process(pid):
    """A record that identifies this process across pid reuse and reboots."""
    return {"pid": pid, "start": process_start(pid), "boot": boot_id()}


def is_same_process(identity):
    """Whether the process recorded in identity is still alive (not a reused pid)."""
    if not identity or not identity.get("pid"):
        return False
    if identity.get("boot") and identity.get("boot") != boot_id():
        return False
    start = process_start(identity["pid"])
    if start is False:
        return False
    return start is None or identity.get("start") in (None, start)


def group_exists(pgid):
    """Whether any live (non-zombie) process is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return has_live_member(pgid)


def live_processes():
    """(pid, parent pid, process group) of every non-zombie process; None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    processes = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as stream:
                fields = stream.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            processes.append((int(name), int(fields[1]), int(fields[2])))
    return processes


def has_live_member(pgid):
    """Whether a non-zombie process is in the group (True where /proc is absent)."""
    processes = live_processes()
    return processes is None or any(group == pgid for _, _, group in processes)


def descendants(root):
    """The pids of the live descendants of a process, even those that left its group."""
    children = {}  # type: dict[int, list[int]]
    for pid, parent, _ in live_processes() or ():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def owns_group(identity):
    """Whether the group led by this recorded process can only hold the job's processes.

    The group's id is the leader's pid: if that pid now belongs to another
    process, or the server rebooted, the group is not the job's.
    """
    if not identity or not identity.get("pid"):
        return False
    if identity.get("boot") and identity.get("boot") != boot_id():
        return False
    start = process_start(identity["pid"])
    return start is False or start is None or identity.get("start") in (None, start)


def signal_group(pgid, signum):
    """Send a signal to a process group, ignoring that it is gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# -- the queue --------------------------------------------------------------


def read_link(path):
    """The target of a tej link file, or None if path is not a link file."""
    try:
        with open(path) as stream:
            data = json.loads(stream.read(65536))
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
        self.config = config
        self.runner = None  # set by open_runner()

    def path(self, *parts):
        """A path inside the queue."""
        return os.path.join(self.root, *parts)

    def job_dir(self, job_id):
        """The directory of an existing job; JobNotFound otherwise."""
        validate_job_id(job_id)
        path = self.path(JOBS_DIR, job_id)
        if not os.path.isdir(path):
            raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)
        return path

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
            return missing_status()
        return self.runner.refresh(job_id, job_dir, record)  # type: ignore[union-attr]


def load_queue(root):
    """Read a queue's configuration; None if root holds no queue."""
    config_path = os.path.join(root, QUEUE_CONFIG)
    if os.path.isdir(root) and os.path.isfile(config_path):
        config = read_json(config_path)
        version = config.get("format") if isinstance(config, dict) else None
        if not isinstance(version, int):
            raise AgentError(ERR_QUEUE, "%s is not a valid tej queue configuration" % config_path)
        if version > QUEUE_FORMAT:
            raise AgentError(
                ERR_QUEUE,
                "The queue %s was written by a newer tej (format %d; this tej reads up to %d): "
                "upgrade tej" % (root, version, QUEUE_FORMAT),
            )
        return Queue(root, config)
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


def create_queue(root, runner="default", options=None):
    """Create a queue at root atomically (built aside, then renamed into place)."""
    parent = os.path.dirname(root)
    if not os.path.isdir(parent):
        make_private_dirs(parent)
    building = "%s.tej-new-%d-%d" % (root, os.getpid(), randrange(1 << 30))
    make_private_dir(building)
    try:
        for name in (JOBS_DIR, STAGING_DIR, TRASH_DIR, AGENT_DIR):
            make_private_dir(os.path.join(building, name))
        write_json_atomic(os.path.join(building, QUEUE_CONFIG), queue_config(runner, options or {}))
        try:
            os.rename(building, root)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if os.path.isdir(building):
            remove_tree(building)


def open_queue(text, create):
    """The Queue the user's path leads to, created with defaults if asked."""
    if not isinstance(text, str) or not text:
        raise AgentError(ERR_INVALID, "The queue path can't be empty")
    root = resolve_queue_path(text)
    queue = load_queue(root)
    if queue is None and create:
        create_queue(root)
        queue = load_queue(root)
    if queue is None:
        return None
    return queue


# -- job status -------------------------------------------------------------


def read_status_record(job_dir):
    """The raw status record of a job, as last written."""
    try:
        return read_json(os.path.join(job_dir, STATUS_FILE))
    except (OSError, AgentError):
        return None


def public_status(job_id, record):
    """The status the client sees, with elapsed time computed on the server clock."""
    started = record.get("started_at")
    ended = record.get("ended_at")
    elapsed = None
    if started:
        end = parse_iso(ended) if ended else time.time()
        elapsed = max(0.0, round(end - parse_iso(started), 3))
    start_time = record.get("start_time")
    return {
        "id": job_id,
        "state": record.get("state"),
        "exit_code": record.get("exit_code"),
        "signal": record.get("signal"),
        "reason": record.get("reason"),
        "submitted_at": record.get("submitted_at"),
        "scheduled_for": now_iso(start_time) if start_time else None,
        "started_at": started,
        "ended_at": ended,
        "elapsed": elapsed,
        "position": record.get("position"),
        "notifications": record.get("notifications", []),
    }


def read_job(job_dir, job_id):
    """A job's metadata; JobNotFound if the job was deleted meanwhile."""
    try:
        return read_json(os.path.join(job_dir, JOB_FILE))
    except FileNotFoundError:
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)


def job_status(queue, job_id, job_dir):
    """A job's public status, with the metadata it was submitted with."""
    status = public_status(job_id, queue.record(job_id, job_dir))
    try:
        status["metadata"] = read_json(os.path.join(job_dir, JOB_FILE))
    except (OSError, AgentError):
        status["metadata"] = None
    return status


def missing_status():
    """The record of a job whose status file is gone."""
    return {"state": STATE_LOST, "reason": "the job's status file is missing"}


def supervised_record(job_dir, record=None):
    """The job's status record, with dead supervisors reported as lost.

    A queued job has no supervisor yet, so it is never lost.
    """
    record = record or read_status_record(job_dir)
    if record is None:
        return missing_status()
    if record.get("state") not in ACTIVE_STATES or record.get("state") == STATE_QUEUED:
        return record
    if is_same_process(record.get("supervisor")):
        return record
    if is_starting_in_time(record):
        return record
    # The supervisor is gone: it may have just written the final status.
    record = read_status_record(job_dir) or record
    if record.get("state") in ACTIVE_STATES:
        record = dict(record)
        reason = "the server restarted" if rebooted(record) else "the job's supervisor died"
        record.update(state=STATE_LOST, reason=reason)
    return record


def is_starting_in_time(record):
    """Whether a job is being started, and still within the time allowed for it."""
    if record.get("state") != STATE_STARTING or record.get("supervisor"):
        return False
    since = record.get("admitted_at") or record["submitted_at"]
    return time.time() - parse_iso(since) < START_TIMEOUT


def rebooted(record):
    """Whether the server rebooted since the record's supervisor started."""
    recorded = (record.get("supervisor") or {}).get("boot")
    return bool(recorded) and recorded != boot_id()


def wait_for_state(queue, job_id, job_dir, states, timeout):
    """Poll a job's record until its state is one of states, or timeout."""
    deadline = time.time() + timeout
    interval = getattr(queue.runner, "poll_interval", POLL_INTERVAL)
    while True:
        record = queue.record(job_id, job_dir)
        if record.get("state") in states or time.time() >= deadline:
            return record
        time.sleep(interval)


# -- runners ----------------------------------------------------------------
#
# A queue's runner decides how its jobs run: at once (the default runner,
# below), in a queue with limits, through a batch system... A runner other
# than the default one is a stdlib-only module shipped by the client and kept
# in QUEUE/agent/; its class Runner(host) gets a RunnerHost.  See
# docs/runners.md for the interface.


class RunnerHost(object):
    """What tej offers a runner: the queue's jobs, their records, supervisors."""

    STATES = {
        "starting": STATE_STARTING,
        "queued": STATE_QUEUED,
        "scheduled": STATE_SCHEDULED,
        "running": STATE_RUNNING,
        "finished": STATE_FINISHED,
        "killed": STATE_KILLED,
        "timed_out": STATE_TIMED_OUT,
        "lost": STATE_LOST,
        "cancelled": STATE_CANCELLED,
    }
    ACTIVE_STATES = ACTIVE_STATES
    END_STATES = END_STATES

    def __init__(self, queue, agent_path):
        self.queue = queue
        self.root = queue.root
        self.options = dict((queue.config or {}).get("options") or {})
        self.agent_path = agent_path

    # the queue's jobs

    def job_ids(self):
        """The identifiers of the queue's jobs."""
        return self.queue.job_ids()

    def job_dir(self, job_id):
        """The directory of a job; JobNotFound if there is none."""
        return self.queue.job_dir(job_id)

    def job_path(self, job_id):
        """Where a job's directory is (whether or not it exists)."""
        return self.queue.path(JOBS_DIR, job_id)

    def has_job(self, job_id):
        """Whether the queue holds a job with this identifier."""
        return bool(ID_PATTERN.match(job_id)) and os.path.isdir(self.queue.path(JOBS_DIR, job_id))

    def read_job(self, job_dir):
        """A job's metadata (its job.json), or None if it is gone."""
        try:
            return read_json(os.path.join(job_dir, JOB_FILE))
        except (OSError, AgentError):
            return None

    def read_record(self, job_dir):
        """A job's status record as last written, or None if it is gone."""
        return read_status_record(job_dir)

    def supervised_record(self, job_dir, record=None):
        """A job's status record, with a dead supervisor reported as lost."""
        return supervised_record(job_dir, record)

    def write_record(self, job_dir, record):
        """Replace a job's status record (atomically)."""
        write_json_atomic(os.path.join(job_dir, STATUS_FILE), record)

    def read_data(self, job_dir):
        """The runner's own record of a job (a dict; empty if none)."""
        try:
            data = read_json(os.path.join(job_dir, RUNNER_DATA))
        except (OSError, AgentError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_data(self, job_dir, data):
        """Replace the runner's own record of a job (atomically)."""
        write_json_atomic(os.path.join(job_dir, RUNNER_DATA), data)

    # supervisors and processes

    def start_supervisor(self, job_dir, secrets=None):
        """Start a job's supervisor here, detached; returns once it is forked (job starting)."""
        start_supervisor(self.agent_path, job_dir, secrets or {})

    def supervisor_command(self, job_dir):
        """The command (a list) that runs a job's supervisor in the foreground."""
        return supervisor_command(self.agent_path, job_dir)

    def kill_supervised(self, job_id, job_dir, record, grace):
        """Kill a job through its supervisor on this machine; returns (killed, record)."""
        return kill_supervised(self.queue, job_id, job_dir, record, grace)

    def lock(self):
        """An exclusive lock on the queue, for a with statement."""
        return QueueLock(self.queue.path(LOCK_FILE))

    # helpers

    def now(self):
        """The current time, as recorded in status records (ISO 8601, UTC)."""
        return now_iso()

    def invalid(self, message):
        """An error to raise for bad input; the user sees message."""
        return AgentError(ERR_INVALID, message)

    def failure(self, message):
        """An error to raise when the server can't do what was asked."""
        return AgentError(ERR_SERVER, message)


def batch_systems():
    """The batch systems whose commands this server has (for setup to mention)."""
    import shutil

    return [name for name in ("sbatch",) if shutil.which(name)]


class QueueLock(object):
    """An exclusive advisory lock (flock) on a file of the queue."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        os.close(self.fd)  # type: ignore[arg-type]  # releases the lock
        self.fd = None


class DefaultRunner(object):
    """Runs each job at once, under its own supervisor on this machine."""

    name = DEFAULT_RUNNER
    job_fields = ()
    initial_state = STATE_STARTING
    takes_secrets = True

    def __init__(self, host):
        self.host = host

    def submit(self, job_id, job_dir, job, secrets):
        """Start the job now."""
        self.host.start_supervisor(job_dir, secrets)

    def refresh(self, job_id, job_dir, record):
        """The job's record, lost if its supervisor died."""
        return self.host.supervised_record(job_dir, record)

    def kill(self, job_id, job_dir, record, grace):
        """Kill the job through its supervisor."""
        return self.host.kill_supervised(job_id, job_dir, record, grace)


RUNNER_CACHE = {}  # type: dict[str, object]  # runner modules imported by this process


def runner_module_name(name, digest):
    """The module name of a runner's copy in a queue."""
    return "tej_runner_%s_%s" % (name, digest)


def open_runner(queue, agent_path, wanted=None):
    """Give queue its runner; wanted maps runner names to the digests the client has.

    A runner module missing from the queue, or older than the client's,
    gives RunnerMissing: the client then installs it and asks again.
    """
    config = queue.config or {}
    name = config.get("runner") or DEFAULT_RUNNER
    host = RunnerHost(queue, agent_path)
    if name == DEFAULT_RUNNER:
        queue.runner = DefaultRunner(host)
        return queue.runner
    module_name = config.get("runner_module")
    digest = (wanted or {}).get(name)
    if digest is not None and module_name != runner_module_name(name, digest):
        raise AgentError(ERR_RUNNER_MISSING, name)
    path = queue.path(AGENT_DIR, "%s.py" % module_name)
    if not isinstance(module_name, str) or not os.path.isfile(path):
        raise AgentError(ERR_RUNNER_MISSING, name)
    queue.runner = load_runner_module(path, module_name).Runner(host)
    return queue.runner


def load_runner_module(path, module_name):
    """Import a runner module from the queue (once per process); its .pyc is cached."""
    if module_name not in RUNNER_CACHE:
        import importlib.util

        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        RUNNER_CACHE[module_name] = module
    return RUNNER_CACHE[module_name]


def install_runner(queue, name, source):
    """Write a runner module into the queue; returns its module name."""
    import hashlib

    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    module_name = runner_module_name(name, digest)
    target = queue.path(AGENT_DIR, "%s.py" % module_name)
    make_private_dirs(queue.path(AGENT_DIR, "__pycache__"))
    if not os.path.exists(target):
        write_file_atomic(target, source.encode("utf-8"))
    try:
        module = load_runner_module(target, module_name)
    except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's to fix
        remove_quietly(target)
        RUNNER_CACHE.pop(module_name, None)
        raise AgentError(ERR_INVALID, "The runner %r does not load: %s" % (name, exc))
    if not hasattr(module, "Runner"):
        raise AgentError(ERR_INVALID, "The runner %r has no Runner class" % name)
    return module_name, module


def configure_runner(module, name, options):
    """Check a runner's setup options with the runner; returns them normalized."""
    if not isinstance(options, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in options.items()
    ):
        raise AgentError(ERR_BAD_REQUEST, "options must map names to strings")
    configure = getattr(module, "configure", None)
    if configure is None:
        if options:
            raise AgentError(ERR_INVALID, "The runner %r takes no options" % name)
        return {}
    try:
        return configure(dict(options))
    except ValueError as exc:
        raise AgentError(ERR_INVALID, "%s runner: %s" % (name, exc))


def check_runner_change(queue, runner):
    """Refuse to give a queue another runner while jobs wait in it: it wouldn't run them."""
    current = (queue.config or {}).get("runner") or DEFAULT_RUNNER
    if runner == current:
        return
    waiting = sorted(
        job_id
        for job_id in queue.job_ids()
        if (read_status_record(queue.path(JOBS_DIR, job_id)) or {}).get("state") == STATE_QUEUED
    )
    if waiting:
        raise AgentError(
            ERR_QUEUE,
            "Can't change the runner of %s from %r to %r while jobs are queued in it "
            "(%d, such as %s): kill or delete them first"
            % (queue.root, current, runner, len(waiting), waiting[0]),
        )


def check_runner_fields(runner, job, secrets):
    """Refuse job fields and secrets the queue's runner doesn't support."""
    for field in RUNNER_FIELDS:
        if job.get(field) is not None and field not in runner.job_fields:
            suggestion = "queue" if field in ("priority", "after") else field
            raise AgentError(
                ERR_INVALID,
                "%s needs a runner that supports it; this queue's runner is %r "
                "(see tej setup --plugin %s)" % (field, runner.name, suggestion),
            )
    if secrets and not runner.takes_secrets:
        raise AgentError(
            ERR_INVALID,
            "The %s runner can't take secrets: tej keeps them only in the memory of a "
            "running supervisor, and this runner doesn't start the job at once" % runner.name,
        )
    check = getattr(runner, "check_job", None)
    if check is not None:
        check(job)


def runner_tick(queue):
    """Let the queue's runner catch up (start queued jobs...), if it wants to."""
    tick = getattr(queue.runner, "tick", None)
    if tick is not None:
        tick()


def kill_supervised(queue, job_id, job_dir, record, grace):
    """Kill a job through its supervisor on this machine; returns (killed, record)."""
    settled = (STATE_QUEUED, STATE_SCHEDULED, STATE_RUNNING) + END_STATES
    if record.get("state") not in settled:
        record = wait_for_state(queue, job_id, job_dir, settled, START_TIMEOUT)
    if record.get("state") in (STATE_SCHEDULED, STATE_RUNNING):
        try:
            os.kill(record["supervisor"]["pid"], signal.SIGTERM)
        except ProcessLookupError:  # it has just ended (or left the job to its runner)
            pass
        # A long grace period goes on after the reply: the supervisor finishes the kill.
        record = wait_for_state(queue, job_id, job_dir, END_STATES, min(grace + 10, MAX_BLOCK))
        state = record.get("state")
        return state == STATE_KILLED or state in ACTIVE_STATES, record
    if record.get("state") == STATE_LOST:
        return kill_orphan(job_dir, record, grace)
    return False, record


def kill_orphan(job_dir, record, grace):
    """Kill what is left of a job whose supervisor is gone, and record it as killed."""
    job = record.get("job") or {}
    if not (owns_group(job) and group_exists(job["pid"])):
        return False, record
    terminate_group(job["pid"], grace)
    record = dict(record, state=STATE_KILLED, ended_at=now_iso())
    write_json_atomic(os.path.join(job_dir, STATUS_FILE), record)
    return True, record


def start_supervisor(agent_path, job_dir, secrets):
    """Start the detached supervisor of a job; returns once it is forked.

    The job is then `starting`: the supervisor starts its script and records
    `running`, or records why it could not (see Supervisor.launch). The
    supervisor is forked, not started as a new interpreter: from this
    process if it has a single thread, else (the agent, under execnet) from
    a fork server, a single-threaded process this agent starts once.
    """
    if agent_path is None:
        raise AgentError(ERR_BAD_REQUEST, "hello must come first")
    if threading_count() > 1:
        report = fork_server(agent_path).start(job_dir, secrets)
    else:
        report = fork_supervisor(agent_path, job_dir, secrets)
    if not report.startswith(b"forked "):
        detail = report.decode("utf-8", "replace").strip()
        raise AgentError(
            ERR_SERVER,
            "Could not start the job's supervisor: %s"
            % (detail[len("failed ") :] if detail.startswith("failed ") else "no answer"),
        )


def threading_count():
    """How many threads this process runs (execnet starts them with _thread, not threading)."""
    import _thread

    return _thread._count() + 1


def fork_supervisor(agent_path, job_dir, secrets):
    """Fork a detached supervisor for a job from a single-threaded process; its report.

    It forks twice, so that the supervisor is not a child of this process,
    which may be a supervisor itself (starting the next queued job): it must
    neither wait for nor signal another job's supervisor.
    """
    prepare_fork()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # a short-lived child: it forks the supervisor and exits
        try:
            os.close(read_end)
            os.write(write_end, spawn_supervisor(agent_path, job_dir, secrets))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb", 0) as pipe:
            return read_line_with_timeout(pipe, START_TIMEOUT)
    finally:
        os.waitpid(pid, 0)


def prepare_fork():
    """Flush this process's output, and load what every supervisor needs, before forking.

    Forked supervisors inherit the modules loaded here: imported in each of
    them instead, they would cost it more than the rest of its work.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    import random  # noqa: F401 - names of the status records' temporary files
    import subprocess  # noqa: F401 - starting the job

    c_library()


def spawn_supervisor(agent_path, job_dir, secrets):
    """Fork a job's supervisor; returns the report, "forked PID" or "failed WHY".

    What can fail is done before the fork, so that the agent hears of it.
    """
    try:
        log = os.open(
            os.path.join(job_dir, SUPERVISOR_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
    except OSError as exc:
        return failed_report(exc)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(log)
        return failed_report(exc)
    if pid == 0:
        code = 1
        try:
            code = run_forked_supervisor(agent_path, job_dir, secrets, log)
        finally:
            os._exit(code)
    os.close(log)
    return b"forked %d\n" % pid


def failed_report(exc):
    """The report of a supervisor that could not be forked: "failed WHY"."""
    detail = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
    return ("failed %s\n" % detail).encode("utf-8", "replace")


def run_forked_supervisor(agent_path, job_dir, secrets, log):
    """In the forked supervisor: a session and files of its own, then supervise; an exit code.

    Its stdin and stdout are /dev/null, its stderr supervisor.log.
    """
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a fork server ignores it (see serve_forks)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd, target in ((0, devnull), (1, devnull), (2, log)):
            os.dup2(target, fd)
        close_inherited_files()
        os.chdir("/")
        return supervise(job_dir, secrets, agent_path)
    except BaseException as exc:  # noqa: BLE001 - the child must never return to its caller
        try:
            os.write(2, ("tej supervisor: %s\n" % exc).encode("utf-8", "replace"))
        except OSError:
            pass
        return 1


def close_inherited_files():
    """Close every file descriptor above 2.

    Before Python 3.10, os.closerange closes each number in turn (some ms for
    MAX_FD): where /proc lists the open ones, only those are closed.
    """
    if sys.version_info < (3, 10):
        try:
            open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
        except (OSError, ValueError):
            open_fds = None
        if open_fds is not None:
            for fd in open_fds:
                if fd > 2:
                    try:
                        os.close(fd)
                    except OSError:  # the listing's own descriptor, closed already
                        pass
            return
    os.closerange(3, MAX_FD)


class ForkServer(object):
    """A single-threaded child of the agent that forks supervisors on request.

    Forking the agent itself is unsafe (execnet runs threads in it), and a
    new interpreter per job is slow; this process is started once per
    connection, from the agent's compiled copy in the queue. One request is
    a JSON line {"job_dir", "secrets"}; the answer is a line, "forked PID"
    once the supervisor is forked, or "failed WHY".
    """

    def __init__(self, agent_path):
        import subprocess

        self.proc = subprocess.Popen(
            fork_server_command(agent_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            cwd="/",
        )

    def start(self, job_dir, secrets):
        """Have a supervisor forked for job_dir; returns the report (empty if none came)."""
        request = json.dumps({"job_dir": job_dir, "secrets": secrets}) + "\n"
        try:
            self.proc.stdin.write(request.encode("utf-8"))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            report = read_line_with_timeout(self.proc.stdout, START_TIMEOUT + 5)
        except OSError:
            report = b""
        if not report.endswith(b"\n"):  # no answer in time: a late one must not answer another
            self.proc.kill()
            self.proc.wait()
        return report

    def alive(self):
        """Whether the fork server still runs."""
        return self.proc.poll() is None


FORK_SERVERS = {}  # type: dict[str, ForkServer]  # by agent copy, in this agent


def fork_server(agent_path):
    """This agent's fork server for supervisors run from agent_path (started if need be)."""
    server = FORK_SERVERS.get(agent_path)
    if server is None or not server.alive():
        server = FORK_SERVERS[agent_path] = ForkServer(agent_path)
    return server


def serve_forks(stdin, stdout):
    """The fork server's loop: fork a supervisor per request, until stdin closes.

    Each supervisor is forked once, as a child of this process: with SIGCHLD
    ignored, the kernel reaps them as they end, so none is left a zombie;
    they outlive this process, which ends with the connection.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    prepare_fork()
    agent_path = os.path.abspath(__file__)
    for line in stdin:
        try:
            request = json.loads(line)
            secrets = request.get("secrets") or {}
            report = spawn_supervisor(agent_path, request["job_dir"], secrets)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            report = failed_report(exc)
        stdout.write(report.strip() + b"\n")
        stdout.flush()
    return 0


# -- the list cache ---------------------------------------------------------


class ListCache(object):
    """The list rows of ended jobs, kept so that `list` needn't read every job.

    An entry is keyed by the (inode, mtime) of the job's status.json: status
    files are replaced, never edited, so any change misses the cache. It is
    only a cache: lost, unreadable or unwritable, it is rebuilt.
    """

    def __init__(self, path):
        self.path = path
        self.entries = {}  # type: dict[str, list[object]]  # job id -> [key, row]
        self.used = {}  # type: dict[str, list[object]]  # the entries of the jobs seen
        self.changed = False
        try:
            data = read_json(path)
            # Rows of another format or layout (LIST_FIELDS) are not used.
            if (
                isinstance(data, dict)
                and data.get("format") == LIST_CACHE_FORMAT
                and data.get("fields") == list(LIST_FIELDS)
            ):
                self.entries = data.get("jobs") or {}
        except (OSError, AgentError):
            pass

    @staticmethod
    def key(job_dir):
        """The cache key of a job's status file, or None if it has none."""
        try:
            info = os.stat(job_dir + "/" + STATUS_FILE)
        except OSError:
            return None
        return [info.st_ino, info.st_mtime_ns]

    def get(self, job_id, key):
        """The cached row of a job, if its status file is unchanged."""
        entry = self.entries.get(job_id)
        if key is None or not isinstance(entry, list) or len(entry) != 2 or entry[0] != key:
            return None
        row = entry[1]
        if not isinstance(row, list) or len(row) != len(LIST_FIELDS):
            return None
        self.used[job_id] = entry
        return row

    def put(self, job_id, key, row):
        """Remember the row of an ended job."""
        self.used[job_id] = [key, row]
        self.changed = True

    def save(self):
        """Write the entries of the jobs seen (dropping deleted ones), if anything changed."""
        if not self.changed and len(self.used) == len(self.entries):
            return
        try:
            data = {"format": LIST_CACHE_FORMAT, "fields": LIST_FIELDS, "jobs": self.used}
            write_file_atomic(self.path, json.dumps(data).encode("utf-8"), durable=False)
        except OSError:
            pass


# -- the request handlers ---------------------------------------------------


class Agent(object):
    """Serves the client's requests; one instance per connection."""

    def __init__(self):
        self.digest = None
        self.runners = {}
        self.uploads = {}
        self.handlers = {
            "hello": self.hello,
            "setup": self.setup,
            "install_agent": self.install_agent,
            "install_runner": self.install_runner,
            "upload_begin": self.upload_begin,
            "upload_manifest": self.upload_manifest,
            "upload_data": self.upload_data,
            "upload_abort": self.upload_abort,
            "submit": self.submit,
            "status": self.status,
            "list": self.list_jobs,
            "kill": self.kill,
            "delete": self.delete,
            "list_files": self.list_files,
            "file_identity": self.file_identity,
            "read_chunks": self.read_chunks,
            "wait": self.wait,
            "read_output": self.read_output,
            "tail_offset": self.tail_offset,
        }

    def handle(self, request):
        """Answer one request with a reply dict; never raises."""
        try:
            op, args = self.parse_request(request)
            return {"ok": True, "result": self.handlers[op](**args)}  # type: ignore[operator]
        except AgentError as exc:
            return {"ok": False, "error": exc.kind, "message": exc.message}
        except TypeError as exc:
            if exc.__traceback__ and exc.__traceback__.tb_next:  # raised inside the handler: a bug
                return internal_error(exc)
            return {"ok": False, "error": ERR_BAD_REQUEST, "message": "Bad arguments: %s" % exc}
        except OSError as exc:
            return {"ok": False, "error": ERR_SERVER, "message": describe_os_error(exc)}
        except Exception as exc:  # noqa: BLE001 - the agent must answer, whatever happens
            return internal_error(exc)

    def parse_request(self, request):
        """Check a request's envelope; return its operation name and arguments."""
        if not isinstance(request, dict):
            raise AgentError(ERR_BAD_REQUEST, "A request must be a dict")
        if request.get("v") != PROTOCOL_VERSION:
            raise AgentError(ERR_BAD_REQUEST, "Unsupported protocol version %r" % request.get("v"))
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(op, str) or op not in self.handlers:
            raise AgentError(ERR_BAD_REQUEST, "Unknown operation %r" % (op,))
        if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
            raise AgentError(ERR_BAD_REQUEST, "Arguments must be a dict")
        return op, args

    # connection

    def hello(self, protocol, digest, runners=None):
        """Handshake: check the protocol and describe this server.

        runners maps the names of the runners the client can install to their digests.
        """
        if not isinstance(digest, str) or not re.match(r"[0-9a-f]{1,64}\Z", digest):
            raise AgentError(ERR_BAD_REQUEST, "Invalid agent digest %r" % (digest,))
        if protocol != PROTOCOL_VERSION:
            raise AgentError(
                ERR_BAD_REQUEST, "Protocol %r is not %d" % (protocol, PROTOCOL_VERSION)
            )
        runners = runners or {}
        if not isinstance(runners, dict) or not all(
            isinstance(name, str)
            and re.match(r"[a-z][a-z0-9_]{0,63}\Z", name)
            and isinstance(value, str)
            and re.match(r"[0-9a-f]{16}\Z", value)
            for name, value in runners.items()
        ):
            raise AgentError(ERR_BAD_REQUEST, "Invalid runner digests %r" % (runners,))
        self.digest = digest
        self.runners = runners
        return {
            "protocol": PROTOCOL_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "platform": sys.platform,
            "home": os.path.expanduser("~"),
            "pid": os.getpid(),
        }

    # setup

    def setup(
        self,
        queue,
        links=(),
        runner=DEFAULT_RUNNER,
        force=False,
        only_links=False,
        runner_source=None,
        options=None,
    ):
        """Create or reconfigure a queue and make links to it.

        A runner other than the default one comes with its source, which is
        installed in the queue; options are its settings (names to strings).
        """
        if not isinstance(links, (list, tuple)):
            raise AgentError(ERR_BAD_REQUEST, "links must be a list")
        if runner != DEFAULT_RUNNER and not isinstance(runner_source, str):
            raise AgentError(ERR_INVALID, "Unknown plugin %r" % (runner,))
        root = resolve_queue_path(queue)
        existing = load_queue(root)
        paths = [self.link_location(link, root, force) for link in links]
        created = False
        if not only_links:
            if existing is not None and not force:
                raise AgentError(
                    ERR_QUEUE, "A queue already exists at %s (use --force to reconfigure it)" % root
                )
            if existing is not None:
                check_runner_change(existing, runner)
            if existing is None:
                create_queue(root)
                created = True
            try:
                self.configure_queue(load_queue(root), runner, runner_source, options or {})
            except BaseException:
                if created:
                    remove_tree(root)
                raise
            self.tick_after_setup(root)
        for path in paths:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                make_private_dirs(parent)
            write_json_atomic(path, {"tej_link": root, "format": LINK_FORMAT})
        return {
            "queue": root,
            "created": created,
            "runner": runner,
            "links": paths,
            "batch_systems": batch_systems(),
        }

    def tick_after_setup(self, root):
        """Let a reconfigured queue move on (a higher max_running starts jobs now)."""
        queue = self.open_queue(root)
        if self.digest and os.path.exists(self.agent_path(queue)):
            runner_tick(queue)  # else the next submit does it, with the agent installed

    def configure_queue(self, queue, runner, source, options):
        """Install a queue's runner and record it, with its checked options."""
        config = dict(queue.config, runner=runner)
        config.pop("runner_module", None)
        if runner == DEFAULT_RUNNER:
            config["options"] = configure_runner(DefaultRunner, runner, options)
        else:
            if not re.match(r"[a-z][a-z0-9_]{0,63}\Z", runner):
                raise AgentError(ERR_INVALID, "Invalid plugin name %r" % (runner,))
            module_name, module = install_runner(queue, runner, source)
            config.update(
                runner_module=module_name, options=configure_runner(module, runner, options)
            )
        write_json_atomic(queue.path(QUEUE_CONFIG), config)

    def install_runner(self, queue, runner, source):
        """Install the source of the runner a queue uses (a newer one, or a missing one)."""
        if not isinstance(source, str) or not isinstance(runner, str):
            raise AgentError(ERR_BAD_REQUEST, "runner and source must be strings")
        found = open_queue(queue, create=False)
        if found is None or (found.config or {}).get("runner") != runner:
            raise AgentError(ERR_QUEUE, "This queue does not use the runner %r" % runner)
        with QueueLock(found.path(LOCK_FILE)):
            module_name, _ = install_runner(found, runner, source)
            config = dict(load_queue(found.root).config, runner_module=module_name)
            write_json_atomic(found.path(QUEUE_CONFIG), config)

    def link_location(self, link, root, force):
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

    def install_agent(self, queue, source):
        """Write this agent's source into the queue, where supervisors run from."""
        if not isinstance(source, str):
            raise AgentError(ERR_BAD_REQUEST, "source must be a string")
        target = self.agent_path(open_queue(queue, create=True))
        # Python caches the compiled copy there: make it private before Python does.
        make_private_dirs(os.path.join(os.path.dirname(target), "__pycache__"))
        if not os.path.exists(target):
            write_file_atomic(target, source.encode("utf-8"))

    def agent_path(self, queue):
        """Where this agent's copy lives in a queue."""
        if not self.digest:
            raise AgentError(ERR_BAD_REQUEST, "hello must come first")
        return queue.path(AGENT_DIR, "%s.py" % agent_module_name(self.digest))

    def existing_queue(self, text):
        """The queue at text, for a request its runner has no say in (reading files).

        An empty stand-in if there is none yet.
        """
        queue = open_queue(text, False)
        return queue if queue is not None else Queue(resolve_queue_path(text), None)

    def open_queue(self, text, create=False):
        """The queue at text, with its runner; an empty stand-in if there is none yet."""
        queue = open_queue(text, True) if create else self.existing_queue(text)
        agent_path = self.agent_path(queue) if self.digest else None
        open_runner(queue, agent_path, self.runners)
        return queue

    def open_ticking_queue(self, text):
        """The queue at text, for a request that lets its runner move it on.

        A runner that ticks may start jobs, from this agent's copy in the
        queue: if it is missing (the queue was used by another version of
        tej), the client installs it first.
        """
        queue = self.open_queue(text)
        if getattr(queue.runner, "tick", None) is not None and not os.path.exists(
            self.agent_path(queue)
        ):
            raise AgentError(ERR_AGENT_MISSING, "The agent is not installed in this queue")
        return queue

    # upload and submit

    def upload_begin(self, queue, manifest, contents=None, submit=None, token=None, more=False):
        """Open a staging area for a new job and lay out its tree from the manifest.

        Every file whose content the store holds is linked in at once; the reply
        lists the others, {"token": T, "missing": JSON [[index, offset], ...]}: the
        client sends those (one file per content) with upload_data, from offset.
        contents, [[index, data], ...], are whole contents of files sent along in
        case the store lacks them (those it has are ignored). submit, the
        arguments of submit but the token: if nothing is missing, the upload is
        submitted at once, and the reply's "job_id" names the job (None if the
        queue's agent or runner must be installed first: then submit the token).

        token: the upload's, chosen by the client (a new one: 16 to 32 hex
        digits), so that it can send what follows without waiting for the reply.
        more: the manifest goes on in upload_manifest requests; this reply is
        {"token": T}, and the last part's is the one described here.
        """
        rows, contents = parse_part(manifest, contents, submit, more)
        text, queue = queue, open_queue(queue, create=True)
        if token is None:
            token = "%x%08x" % (int(time.time()), randrange(1 << 32))
        elif not isinstance(token, str) or not re.match(r"[0-9a-f]{16,32}\Z", token):
            raise AgentError(ERR_BAD_REQUEST, "Invalid upload token %r" % (token,))
        remove_stale(queue.path(STAGING_DIR), STALE_UPLOAD)
        remove_stale(queue.path(TRASH_DIR), STALE_TRASH)
        staging = queue.path(STAGING_DIR, token)
        try:
            make_private_dir(staging)
        except FileExistsError:
            raise AgentError(ERR_INVALID, "An upload with token %r exists already" % token)
        upload = Upload(queue, token, staging)
        try:
            make_private_dir(os.path.join(staging, WORK_DIR))
            make_private_dirs(queue.path(STORE_DIR, LEASES_DIR))
            collect_garbage(queue)
        except BaseException:
            remove_tree(staging)
            raise
        self.uploads[token] = upload
        return self.take_manifest(text, upload, rows, contents, submit, more)

    def upload_manifest(self, queue, token, manifest, contents=None, submit=None, more=False):
        """Lay out the next part of an upload's manifest: see upload_begin's more.

        Its entries follow the previous parts' (their indices too).
        """
        upload = self.upload_of(queue, token)
        if upload.planned:
            raise AgentError(ERR_INVALID, "The manifest of upload %r is complete" % token)
        try:
            rows, contents = parse_part(manifest, contents, submit, more)
        except BaseException:
            self.upload_abort(queue, token)
            raise
        return self.take_manifest(queue, upload, rows, contents, submit, more)

    def take_manifest(self, queue, upload, rows, contents, submit, more):
        """Lay out a part of an upload's manifest; after its last part, plan the upload.

        Anything wrong throws the upload away.
        """
        import gc

        collecting = gc.isenabled()
        gc.disable()  # the rows are many small objects: the collector would walk them for nothing
        try:
            upload.add(rows)
            if more:
                return {"token": upload.token}
            missing = upload.plan()
            if contents and missing:
                missing = upload.receive_whole(contents, missing)
        except BaseException:
            self.uploads.pop(upload.token, None)
            upload.discard()
            remove_tree(upload.staging)
            raise
        finally:
            if collecting:
                gc.enable()
        reply = {"token": upload.token, "missing": json.dumps(missing).encode("ascii")}
        if submit is not None and not missing:
            reply["job_id"] = self.submit_at_once(queue, upload.token, submit)
        return reply

    def submit_at_once(self, queue, token, submit):
        """Submit a complete upload; None if the queue's agent or runner must be installed first."""
        try:
            return self.submit(queue, token, **submit)
        except AgentError as exc:
            if exc.kind in (ERR_AGENT_MISSING, ERR_RUNNER_MISSING):
                return None  # the upload waits: the client installs it, then submits
            self.abort_quietly(queue, token)
            raise
        except BaseException:
            self.abort_quietly(queue, token)
            raise

    def abort_quietly(self, queue, token):
        """Throw away an upload a failed submit may have left (a submit leaves nothing)."""
        try:
            self.upload_abort(queue, token)
        except (AgentError, OSError):
            pass

    def staging_dir(self, queue, token):
        """The staging area of an upload in progress."""
        if not isinstance(token, str) or not re.match(r"[0-9a-f]+\Z", token):
            raise AgentError(ERR_INVALID, "Invalid upload token %r" % (token,))
        path = queue.path(STAGING_DIR, token) if queue is not None else None
        if path is None or not os.path.isdir(path):
            raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
        return path

    def upload_of(self, queue, token):
        """The upload in progress on this connection with that token."""
        staging = self.staging_dir(open_queue(queue, create=False), token)
        upload = self.uploads.get(token)
        if upload is None or upload.staging != staging:
            raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
        return upload

    def upload_data(self, queue, token, chunks):
        """Write chunks [index, offset, data] of the files upload_begin asked for."""
        upload = self.upload_of(queue, token)
        for index, offset, data in checked_rows(chunks, (int, int, bytes)):
            upload.receive(index, offset, data)

    def upload_abort(self, queue, token):
        """Throw away an upload in progress (what reached the store stays there)."""
        staging = self.staging_dir(open_queue(queue, create=False), token)
        upload = self.uploads.pop(token, None)
        if upload is not None:
            upload.discard()
        remove_tree(staging)

    def drop_upload(self, queue, token):
        """Forget an upload after a failed submit: the files it holds open, its lease."""
        upload = self.uploads.pop(token, None)
        if upload is not None:
            upload.discard_files()
        remove_quietly(lease_path(queue, token))

    def finish_upload(self, token):
        """Complete the tree of a planned upload: every file arrived, symlinks, folder modes."""
        upload = self.uploads.pop(token, None)
        if upload is None:
            raise AgentError(ERR_INVALID, "No upload in progress with token %r" % token)
        upload.finish()

    def submit(self, queue, token, job_id=None, id_prefix=None, job=None, secrets=None):
        """Turn a completed upload into a job and start it.

        secrets are environment variables for the job that are never written
        to disk: they reach the supervisor through a pipe (job.json keeps
        their names only).
        """
        secrets = validate_secrets(secrets or {})
        queue = self.open_queue(queue, create=True)
        if not os.path.exists(self.agent_path(queue)):
            raise AgentError(ERR_AGENT_MISSING, "The agent is not installed in this queue")
        staging = self.staging_dir(queue, token)
        try:
            job = dict(validate_job(job or {}), secret_env=sorted(secrets))
            check_runner_fields(queue.runner, job, secrets)
            self.finish_upload(token)
            check_script(os.path.join(staging, WORK_DIR), job["script"])
            job_id, job_dir = self.reserve_id(queue, staging, job_id, id_prefix, job)
        except BaseException:
            self.drop_upload(queue, token)
            remove_tree(staging)  # a failed submit leaves nothing, not even the upload
            raise
        try:
            queue.runner.submit(job_id, job_dir, job, secrets)
        except BaseException:
            remove_tree(job_dir)
            raise
        return job_id

    def reserve_id(self, queue, staging, job_id, id_prefix, job):
        """Atomically move the staged job to jobs/ID; returns (id, job_dir)."""
        candidates = [job_id]
        if job_id is None:
            if not isinstance(id_prefix, str):
                raise AgentError(ERR_INVALID, "Give a job identifier or a prefix for one")
            candidates = ["%s_%06d" % (id_prefix, randrange(10**6)) for _ in range(50)]
        validate_job_id(candidates[0])
        start_time = start_time_of(job)
        for candidate in candidates:
            record = {
                "id": candidate,
                "state": queue.runner.initial_state,
                "submitted_at": now_iso(),
            }
            if start_time is not None:
                record["start_time"] = start_time
            prepare = getattr(queue.runner, "prepare", None)
            if prepare is not None:
                record = prepare(dict(job, id=candidate), record)
            write_json_atomic(os.path.join(staging, JOB_FILE), dict(job, id=candidate))
            # Not durable: after a power cut, a job that was starting is lost anyway.
            write_json_atomic(os.path.join(staging, STATUS_FILE), record, durable=False)
            note_lease(queue, staging, candidate)
            job_dir = queue.path(JOBS_DIR, candidate)
            try:
                os.rename(staging, job_dir)
                return candidate, job_dir
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if job_id is not None:
            raise AgentError(ERR_JOB_EXISTS, "A job %r already exists" % job_id)
        raise AgentError(ERR_JOB_EXISTS, "Could not find a free identifier for %r" % id_prefix)

    # status, list, kill, delete

    def status(self, queue, job_id):
        """The status of one job, with the metadata it was submitted with."""
        queue = self.open_queue(queue)
        return job_status(queue, job_id, queue.job_dir(job_id))

    def wait(self, queue, job_id, timeout):
        """Block until the job ends or timeout seconds pass (at most MAX_BLOCK)."""
        timeout = number_arg(timeout, "timeout", 0, MAX_DURATION)
        queue = self.open_queue(queue)
        job_dir = queue.job_dir(job_id)
        record = wait_for_state(queue, job_id, job_dir, END_STATES, min(timeout, MAX_BLOCK))
        return public_status(job_id, record)

    def read_output(self, queue, job_id, stream, offset, length, wait=0):
        """Read the job's stdout or stderr from offset, waiting up to wait s for new data.

        "ended" says the job had ended before the read: an empty read with
        "ended" set means every byte has been delivered.
        """
        offset = number_arg(offset, "offset", 0, MAX_OFFSET)
        length = int(number_arg(length, "length", 1, MAX_READ))
        wait = number_arg(wait, "wait", 0, MAX_DURATION)
        queue = self.open_queue(queue)
        job_dir = queue.job_dir(job_id)
        path = self.output_file(job_dir, stream)
        deadline = time.time() + min(wait, MAX_BLOCK)
        while True:
            ended = queue.record(job_id, job_dir).get("state") in END_STATES
            data = read_at(path, int(offset), length)
            if data or ended or time.time() >= deadline:
                return {"data": data, "offset": offset + len(data), "ended": ended}
            time.sleep(POLL_INTERVAL * 5)

    def tail_offset(self, queue, job_id, stream, lines):
        """The offset where the last `lines` lines of the job's output begin."""
        lines = int(number_arg(lines, "lines", 0, MAX_OFFSET))
        job_dir = self.existing_queue(queue).job_dir(job_id)
        return find_tail(self.output_file(job_dir, stream), lines)

    def output_file(self, job_dir, stream):
        """The file holding a job's stdout or stderr."""
        if stream not in ("stdout", "stderr"):
            raise AgentError(ERR_BAD_REQUEST, "stream must be stdout or stderr")
        path = output_path(job_dir, read_json(os.path.join(job_dir, JOB_FILE)), stream)
        if path is None:
            raise AgentError(ERR_INVALID, "This job's %s is discarded" % stream)
        return path

    def list_jobs(self, queue):
        """The status of every job, oldest first: {"fields": names, "rows": JSON of values}.

        Without metadata (see status). Ended jobs come from the list cache
        while their status file is unchanged; the others from their runner.
        """
        queue = self.open_ticking_queue(queue)
        runner_tick(queue)
        cache = ListCache(queue.path(LIST_CACHE))
        rows, pending = [], []
        jobs = queue.path(JOBS_DIR) + "/"  # ids are single path components
        for name in queue.job_ids():
            job_dir = jobs + name
            key = cache.key(job_dir)
            row = cache.get(name, key)
            if row is not None:
                rows.append(row)
                continue
            record = read_status_record(job_dir)
            if record is not None or os.path.isdir(job_dir):
                pending.append((name, job_dir, record or missing_status(), key))
        for (name, _, written, key), record in zip(pending, self.refresh_all(queue, pending)):
            status = public_status(name, record)
            row = [status[field] for field in LIST_FIELDS]
            rows.append(row)
            if key is not None and written.get("state") in END_STATES:
                cache.put(name, key, row)
        cache.save()
        submitted, ident = LIST_FIELDS.index("submitted_at"), LIST_FIELDS.index("id")
        rows.sort(key=lambda row: (row[submitted] or "", row[ident]))
        # As JSON text: thousands of rows go faster as one string than as execnet objects.
        return {"fields": LIST_FIELDS, "rows": json.dumps(rows)}

    def refresh_all(self, queue, jobs):
        """The records of jobs [(id, dir, record, ...)], brought up to date by the runner."""
        jobs = [job[:3] for job in jobs]
        refresh_many = getattr(queue.runner, "refresh_many", None)
        if refresh_many is not None:
            return refresh_many(jobs)
        return [queue.runner.refresh(*job) for job in jobs]

    def kill(self, queue, job_id):
        """Kill a job (through its runner); reports whether this call killed it."""
        queue = self.open_ticking_queue(queue)
        job_dir = queue.job_dir(job_id)
        grace = float(read_job(job_dir, job_id).get("kill_grace", KILL_GRACE))
        killed, record = queue.runner.kill(job_id, job_dir, queue.record(job_id, job_dir), grace)
        runner_tick(queue)
        return {"killed": killed, "status": public_status(job_id, record)}

    def delete(self, queue, job_id, force=False):
        """Delete a job's directory; a running job only with force (killed first)."""
        queue = self.open_ticking_queue(queue)
        job_dir = queue.job_dir(job_id)
        state = queue.record(job_id, job_dir).get("state")
        if state in ACTIVE_STATES and not force:
            raise AgentError(
                ERR_JOB_RUNNING,
                "Job %r is still %s: kill it first (tej kill), or delete with --force"
                % (job_id, "queued" if state == STATE_QUEUED else "running"),
            )
        if state in ACTIVE_STATES or state == STATE_LOST:
            result = self.kill(queue.root, job_id)  # a lost job may have processes left
            if result["status"]["state"] in ACTIVE_STATES:
                raise AgentError(
                    ERR_JOB_RUNNING,
                    "Job %r is being killed (its grace period is long): delete it once it has "
                    "ended" % job_id,
                )
        runner_tick(queue)  # first, so that jobs waiting for this one know how it ended
        trash = queue.path(TRASH_DIR, "%s.%d" % (job_id, randrange(1 << 30)))
        if not os.path.isdir(queue.path(TRASH_DIR)):
            make_private_dir(queue.path(TRASH_DIR))
        try:
            os.rename(job_dir, trash)
        except FileNotFoundError:  # deleted meanwhile by another client
            raise AgentError(ERR_JOB_NOT_FOUND, "No job %r" % job_id)
        remove_job_tree(queue, trash)
        runner_tick(queue)

    # download

    def job_path(self, queue, job_id, relpath):
        """The real path of a file in a job's directory, refusing any escape."""
        work = os.path.realpath(os.path.join(self.existing_queue(queue).job_dir(job_id), WORK_DIR))
        parts = relative_parts(relpath)
        path = os.path.realpath(os.path.join(work.encode(), *parts) if parts else work.encode())
        if path != work.encode() and not path.startswith(work.encode() + b"/"):
            raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(relpath))
        if not os.path.lexists(path):
            raise AgentError(ERR_INVALID, "No file %s in job %r" % (show(relpath), job_id))
        return path

    def list_files(self, queue, job_id, path):
        """Describe a file or folder of a job: [relpath, kind, mode, size-or-target]."""
        root = self.job_path(queue, job_id, path)
        if not os.path.isdir(root):
            info = os.stat(root)
            return [[b"", "f", info.st_mode & 0o7777, info.st_size]]
        entries = [[b"", "d", os.stat(root).st_mode & 0o7777, 0]]
        for folder, dirs, files in os.walk(root):
            for name in sorted(dirs) + sorted(files):
                full = os.path.join(folder, name)
                entries.append(describe_entry(os.path.relpath(full, root), full))
        return entries

    def file_identity(self, queue, job_id, path):
        """A job's regular file, for a raw stream: [real path, device, inode, size]."""
        real = self.job_path(queue, job_id, path)
        info = os.stat(real)
        if not os.path.isfile(real):
            raise AgentError(ERR_INVALID, "%s is not a file" % show(path))
        return [real, info.st_dev, info.st_ino, info.st_size]

    def read_chunks(self, queue, job_id, chunks):
        """Read chunks [path, offset, length] of a job's files."""
        data = []
        for relpath, offset, length in checked_rows(chunks, (bytes, int, int)):
            with open(self.job_path(queue, job_id, relpath), "rb") as stream:
                stream.seek(offset)
                data.append(stream.read(min(length, MAX_READ)))
        return data


def number_arg(value, name, low, high):
    """Check a numeric argument: a finite int or float within [low, high]."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not low <= value <= high:
        raise AgentError(ERR_BAD_REQUEST, "%s must be a number from %s to %s" % (name, low, high))
    return value


def checked_rows(rows, types):
    """Check a list of rows of the given types (ints non-negative); BadRequest otherwise."""
    if not isinstance(rows, list):
        raise AgentError(ERR_BAD_REQUEST, "Expected a list of rows")
    for row in rows:
        valid = isinstance(row, list) and len(row) == len(types)
        for value, kind in zip(row if valid else (), types):
            valid = valid and isinstance(value, kind)
            valid = valid and not (kind is int and not 0 <= value < MAX_OFFSET)
        if not valid:
            raise AgentError(ERR_BAD_REQUEST, "Invalid row %r" % (row,))
    return rows


def internal_error(exc):
    """The reply for an unexpected exception in a handler."""
    return {"ok": False, "error": ERR_INTERNAL, "message": "%s: %s" % (type(exc).__name__, exc)}


def read_at(path, offset, length):
    """Read up to length bytes at offset (nothing if the file doesn't exist yet)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            return stream.read(length)
    except FileNotFoundError:
        return b""


def find_tail(path, lines):
    """The offset of the start of the last `lines` lines of a file."""
    try:
        with open(path, "rb") as stream:
            return tail_start(stream, lines)
    except FileNotFoundError:
        return 0


def tail_start(stream, lines):
    """The offset of the start of the last `lines` lines of an open binary file."""
    end = position = stream.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    while position > 0:
        size = min(65536, position)
        position -= size
        stream.seek(position)
        block = stream.read(size)
        if position + size == end and block.endswith(b"\n"):
            block = block[:-1]  # the final newline ends the last line, starts none
        index = len(block)
        while lines > 0:
            index = block.rfind(b"\n", 0, index)
            if index < 0:
                break
            lines -= 1
        if lines == 0:
            return position + index + 1
    return 0


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


def describe_os_error(exc):
    """A one-line description of an OSError on the server."""
    name = exc.filename if exc.filename is not None else ""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    text = exc.strerror or str(exc)
    return "%s: %s" % (text, name) if name else text


def agent_module_name(digest):
    """The module name of this agent's copy in a queue."""
    return "tej_agent_%s" % digest


def agent_copy_command(agent_path, *arguments):
    """The command that runs the agent's copy in the queue with arguments (see main()).

    The copy is imported as a module (not run as a script), so Python keeps
    its compiled form in agent/__pycache__ and starts it fast.
    """
    module = os.path.splitext(os.path.basename(agent_path))[0]
    code = "import sys; sys.path.insert(0, sys.argv[1]); import %s as agent; " % module
    code += "sys.exit(agent.main(sys.argv[2:]))"
    return [sys.executable, "-c", code, os.path.dirname(agent_path)] + list(arguments)


def supervisor_command(agent_path, job_dir):
    """The command that supervises a job in the foreground (for a batch system)."""
    return agent_copy_command(agent_path, "supervise", job_dir)


def fork_server_command(agent_path):
    """The command that runs a fork server for supervisors."""
    return agent_copy_command(agent_path, "fork-server")


def read_line_with_timeout(stream, timeout):
    """Read one line from a pipe, giving up (empty result) after timeout."""
    import select

    deadline = time.time() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.time()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            break
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data


def validate_job(job):
    """Check the job's metadata sent by the client; returns it normalized."""
    if not isinstance(job, dict) or not all(isinstance(key, str) for key in job):
        raise AgentError(ERR_BAD_REQUEST, "Job metadata must be a dict with string keys")
    script = job.get("script", DEFAULT_SCRIPT)
    args = job.get("args", [])
    if not isinstance(script, str) or not script:
        raise AgentError(ERR_INVALID, "The script must be a path")
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise AgentError(ERR_INVALID, "The script's arguments must be strings")
    relative_parts(os.fsencode(script))
    env = job.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in env.items()
    ):
        raise AgentError(ERR_INVALID, "env must map names to strings")
    for key in ("max_runtime", "kill_grace", "delay"):
        value = job.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and 0 <= value <= MAX_DURATION
        ):
            raise AgentError(ERR_INVALID, "%s must be a number of seconds" % key)
    for stream in ("stdout", "stderr"):
        check_output_target(stream, job.get(stream, OUTPUT_KEPT))
    if not isinstance(job.get("notify") or {}, dict):
        raise AgentError(ERR_INVALID, "notify must be a dict")
    return dict(job, script=script, args=args, env=env)


def check_output_target(stream, target):
    """Refuse an output target that is neither a keyword nor a path inside the job."""
    if not isinstance(target, str) or not target:
        raise AgentError(ERR_INVALID, "%s must be a string" % stream)
    keywords = (OUTPUT_KEPT, OUTPUT_DISCARDED, STDERR_MERGED)
    if target in keywords:
        return
    if not relative_parts(os.fsencode(target)) or target.endswith(("/", "/.")):
        raise AgentError(ERR_INVALID, "Invalid %s path %r: name a file" % (stream, target))


def validate_secrets(secrets):
    """Check the secret environment variables of a submit."""
    if not isinstance(secrets, dict) or not all(
        isinstance(name, str)
        and re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name)
        and isinstance(value, str)
        for name, value in secrets.items()
    ):
        raise AgentError(ERR_INVALID, "secrets must map variable names to strings")
    return secrets


def read_secrets(stream):
    """The secret environment variables the agent sends the supervisor on its stdin."""
    try:
        data = json.loads(stream.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start_time_of(job):
    """When a job should start (POSIX time), from its delay or start_at; None for now."""
    if job.get("delay") is not None:
        return time.time() + float(job["delay"])
    if job.get("start_at") is None:
        return None
    import datetime

    try:
        when = datetime.datetime.fromisoformat(str(job["start_at"]))
    except ValueError:
        raise AgentError(ERR_INVALID, "Invalid start_at %r" % (job["start_at"],))
    if when.tzinfo is None:  # naive: the server's local time
        start = time.mktime(when.timetuple()) + when.microsecond / 1e6
    else:
        start = when.timestamp()
    if start > time.time() + MAX_DURATION:
        raise AgentError(ERR_INVALID, "start_at is more than ten years away")
    return start


def check_script(work, script):
    """Refuse a script that isn't a regular file inside the job's directory."""
    path = os.path.join(work, script)
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(work) + "/"):
        raise AgentError(ERR_INVALID, "The script %s is outside the job's directory" % script)
    if not os.path.isfile(real):
        raise AgentError(ERR_INVALID, "The script %s is not a file in the job's directory" % script)


# -- uploads and the content store ------------------------------------------


MANIFEST_FIELDS = ("paths", "kinds", "modes", "sizes", "digests", "targets")
SUBMIT_FIELDS = frozenset(("job_id", "id_prefix", "job", "secrets"))


def parse_manifest(manifest):
    """Decode and check a manifest; returns rows (kind, path, mode, size-or-target, digest).

    A manifest lists N entries, in columns: "paths" (bytes: the N relative
    paths, NUL-separated), "kinds" (str: N letters, d folder, f file, l
    symlink), "modes" and "sizes" (bytes: N little-endian uint16 and uint64;
    0 for folders and symlinks), "digests" (bytes: the 32-byte sha256 of
    each non-empty file, in order), "targets" (bytes: the symlinks' targets,
    NUL-separated, in order).
    """
    valid = isinstance(manifest, dict) and sorted(manifest) == sorted(MANIFEST_FIELDS)
    valid = valid and isinstance(manifest["kinds"], str)
    valid = valid and all(isinstance(manifest[name], bytes) for name in MANIFEST_FIELDS[2:])
    valid = valid and isinstance(manifest["paths"], bytes)
    if not valid:
        raise AgentError(
            ERR_BAD_REQUEST, "Invalid manifest: expected %s" % ", ".join(MANIFEST_FIELDS)
        )
    kinds = manifest["kinds"]
    count = len(kinds)
    paths = manifest["paths"].split(b"\0") if count or manifest["paths"] else []
    links = manifest["targets"].split(b"\0") if "l" in kinds or manifest["targets"] else []
    digests = manifest["digests"]
    if not set(kinds) <= set("dfl"):
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: kinds must be d, f or l")
    lengths = [len(paths), len(manifest["modes"]) // 2, len(manifest["sizes"]) // 8]
    if lengths != [count] * 3 or len(manifest["modes"]) % 2 or len(manifest["sizes"]) % 8:
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: its columns differ in length")
    modes = struct.unpack("<%dH" % count, manifest["modes"])
    sizes = struct.unpack("<%dQ" % count, manifest["sizes"])
    if count and (max(modes) > 0o7777 or max(sizes) >= MAX_OFFSET):
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: a mode or a size is out of range")
    check_paths(paths)
    rows = []
    hexes = digests.hex()
    files = symlinks = 0
    for kind, path, mode, size in zip(kinds, paths, modes, sizes):
        if kind == "f" and size:
            rows.append((kind, path, mode, size, hexes[files : files + 64]))
            files += 64
        elif size:
            raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: %s has a size" % show(path))
        elif kind == "l":
            rows.append((kind, path, mode, links[symlinks], ""))
            symlinks += 1
        else:
            rows.append((kind, path, mode, 0, ""))
    if len(hexes) != files or symlinks != len(links) or b"" in links:
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: digests or targets don't match")
    return rows


def parse_part(manifest, contents, submit, more):
    """Check a part of a manifest and what comes with it; returns (rows, contents)."""
    if not isinstance(more, bool):
        raise AgentError(ERR_BAD_REQUEST, "more must be true or false")
    rows = parse_manifest(manifest)
    contents = checked_rows(contents or [], (int, bytes))
    if submit is not None and (not isinstance(submit, dict) or set(submit) - SUBMIT_FIELDS):
        raise AgentError(ERR_BAD_REQUEST, "submit must be a dict of submit's arguments")
    if more and (contents or submit is not None):
        raise AgentError(ERR_BAD_REQUEST, "contents and submit come with the manifest's last part")
    return rows, contents


def check_paths(paths, earlier=frozenset()):
    """Refuse paths that aren't plain relative paths, or that repeat (here or in earlier)."""
    joined = b"/" + b"/\0/".join(paths) + b"/"
    if b"//" in joined or b"/./" in joined or b"/../" in joined:
        for path in paths:
            if b"/".join(relative_parts(path)) != path or not path:
                raise AgentError(ERR_BAD_REQUEST, "Invalid path %s in the manifest" % show(path))
    if len(set(paths)) != len(paths) or not earlier.isdisjoint(paths):
        seen = set(earlier)
        for path in paths:
            if path in seen:
                raise AgentError(ERR_INVALID, "The manifest names %s twice" % show(path))
            seen.add(path)


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

    def record(self, digest, mode, info):
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
        with store_lock(self.queue):
            busy = busy_inodes(self.queue, self.token)
            for digest, info in list(linked.items()):
                if info.st_ino in busy and not self.refresh(digest):
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
        self.record(digest, mode, os.lstat(fresh))
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
            self.record(digest, mode, os.fstat(fd))
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
            job_dir = queue.path(JOBS_DIR, job_id)
            if may_run(job_dir) and read_inodes(os.path.join(job_dir, BLOBS_FILE), busy):
                continue
        remove_quietly(os.path.join(folder, token))  # ended, deleted, or abandoned
    return busy


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


def remove_job_tree(queue, path):
    """Remove a job's folder (moved to trash), then the blobs only it used."""
    try:
        with open(os.path.join(path, BLOBS_FILE), "rb") as stream:
            keys = [line.split()[0].decode("ascii") for line in stream if line.strip()]
    except (OSError, ValueError, IndexError):
        keys = []
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


# -- the supervisor ---------------------------------------------------------


class Supervisor(object):
    """Starts one job (on time), enforces its time limit, records its end, notifies."""

    def __init__(self, job_dir, secrets, agent_path):
        self.job_dir = job_dir
        self.agent_path = agent_path
        self.job = read_json(os.path.join(job_dir, JOB_FILE))
        self.record = read_json(os.path.join(job_dir, STATUS_FILE))
        self.grace = max(float(self.job.get("kill_grace", KILL_GRACE)), 0.001)
        self.pgid = None
        self.kill_requested = False
        self.timed_out = False
        self.alarm_phase = None
        self.secrets = read_secrets(sys.stdin) if secrets is None else secrets

    def run(self):
        """Supervise the job from start to end; returns the process exit code."""
        signal.signal(signal.SIGTERM, self.on_kill_request)
        signal.signal(signal.SIGALRM, self.on_alarm)
        for ignored in (signal.SIGHUP, signal.SIGINT):
            # A handler, not SIG_IGN: handlers are reset by exec, so the job
            # starts with the default dispositions.
            signal.signal(ignored, ignore_signal)
        become_subreaper()
        self.record["supervisor"] = identify_process(os.getpid())
        if not self.wait_for_start_time():
            self.end(STATE_KILLED, reason="cancelled before it started")
            return 0
        if self.record.get("start_time") and not self.admitted():
            return 0  # queued: the runner starts the job later
        if self.kill_requested:
            self.end(STATE_KILLED, reason="cancelled before it started")
            return 0
        proc = self.launch()
        if proc is None:
            return 0
        self.arm_time_limit()
        wait_status = wait_for_child(proc.pid)
        terminate_group(self.pgid, self.grace, with_descendants=True)
        reap_remaining(time.time() + 1.0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.record.update(exit_code_fields(wait_status))
        self.end(self.end_state())
        return 0

    def wait_for_start_time(self):
        """Stay scheduled until the start time; False if killed meanwhile."""
        start_time = self.record.get("start_time")
        if not start_time or start_time <= time.time():
            return not self.kill_requested
        self.record.update(state=STATE_SCHEDULED)
        self.save()
        while not self.kill_requested and time.time() < start_time:
            time.sleep(min(start_time - time.time(), 0.2))
        return not self.kill_requested

    def admitted(self):
        """Whether the queue's runner lets a job start now that its start time has come."""
        runner = runner_of_job(self.job_dir, self.agent_path)
        admit = getattr(runner, "admit", None)
        if admit is None:
            return True
        self.record = admit(self.job["id"], self.job_dir, self.record)
        if self.record.get("state") != STATE_QUEUED:
            return True
        if self.kill_requested:  # it came while the job joined the queue: pass it on
            record = supervised_record(self.job_dir)
            runner.kill(self.job["id"], self.job_dir, record, self.grace)
        return False

    def launch(self):
        """Start the job and record it running; None if it could not start (recorded)."""
        started_at = now_iso()  # before the spawn: the job may be at work before it returns
        try:
            out, err = open_outputs(self.job_dir, self.job)
        except (OSError, AgentError) as exc:
            why = exc.message if isinstance(exc, AgentError) else describe_os_error(exc)
            return self.fail_to_start("cannot open its output: %s" % why, 126)
        try:
            proc = self.start_job(out, err)
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
            return self.fail_to_start(self.cannot_run(exc), code)
        finally:
            os.close(out)
            os.close(err)
        self.pgid = proc.pid
        self.record.update(
            state=STATE_RUNNING, started_at=started_at, job=identify_process(proc.pid)
        )
        self.save()
        return proc

    def start_job(self, out, err):
        """Spawn the job's script in its own session, its output to out and err."""
        work = os.path.join(self.job_dir, WORK_DIR)
        script = os.path.join(work, self.job["script"])
        env = dict(os.environ, TEJ_JOB_ID=self.job["id"], TEJ_JOB_DIR=work)
        env.update(self.job.get("env") or {})
        env.update(self.secrets)
        args = list(self.job.get("args", []))
        try:
            return spawn(script_command(script) + args, work, env, out, err)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
            return spawn(["/bin/sh", script] + args, work, env, out, err)

    def cannot_run(self, exc):
        """Why the script could not be run (exc: the error of its start)."""
        name = self.job["script"]
        script = os.path.join(self.job_dir, WORK_DIR, name)
        if exc.errno == errno.ENOENT and os.path.isfile(script):
            interpreter = script_interpreter(script)
            if interpreter:  # the script is there: its #! line names a missing program
                return "cannot run %s: its interpreter %s is not found" % (name, interpreter)
        return "cannot run %s: %s" % (name, describe_os_error(exc))

    def fail_to_start(self, reason, exit_code):
        """Record a job that could not be started, with a shell's exit code (126, 127)."""
        try:
            with open(os.path.join(self.job_dir, STDERR_FILE), "a") as stream:
                stream.write("tej: %s\n" % reason)
        except OSError:
            pass
        self.record.update(started_at=now_iso(), exit_code=exit_code, reason=reason)
        self.end(STATE_FINISHED)

    def arm_time_limit(self):
        """Start the clock of max_runtime, if the job has one."""
        limit = self.job.get("max_runtime")
        if limit and not self.kill_requested:
            self.alarm_phase = "runtime"
            signal.setitimer(signal.ITIMER_REAL, float(limit))
        elif self.kill_requested:
            self.terminate()

    def terminate(self):
        """SIGTERM the job's processes now; SIGKILL when the grace period ends."""
        signal_job(self.pgid, signal.SIGTERM, with_descendants=True)
        self.alarm_phase = "grace"
        signal.setitimer(signal.ITIMER_REAL, self.grace)

    def on_kill_request(self, _signum, _frame):
        """SIGTERM from `tej kill`: terminate the job (or cancel it if not started)."""
        self.kill_requested = True
        if self.pgid is not None and self.alarm_phase != "grace":
            self.terminate()

    def on_alarm(self, _signum, _frame):
        """SIGALRM: max_runtime is reached, or the grace period after SIGTERM is over."""
        if self.alarm_phase == "runtime":
            self.timed_out = True
            self.terminate()
        elif self.alarm_phase == "grace":
            signal_job(self.pgid, signal.SIGKILL, with_descendants=True)

    def end_state(self):
        """How the job ended: timed out, killed, or finished by itself."""
        if self.timed_out:
            return STATE_TIMED_OUT
        return STATE_KILLED if self.kill_requested else STATE_FINISHED

    def end(self, state, reason=None):
        """Record the job's end, tell the agent if it still waits, then notify."""
        self.record.update(state=state, ended_at=now_iso())
        if reason:
            self.record["reason"] = reason
        self.save()
        self.let_go()
        tick_after_end(self.job_dir, self.agent_path)
        results = send_notifications(self.job, self.record, self.job_dir)
        if results:
            self.record["notifications"] = results
            self.save()

    def let_go(self):
        """The job is over: ignore late kill requests and alarms, adopt no more orphans.

        The queue's tick may start the next job's supervisor from this process: a
        kill of this job arriving late must not reach it, nor must it be re-parented
        here.
        """
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.pgid = None
        self.alarm_phase = None
        become_subreaper(adopt=False)

    def save(self):
        """Write the status record atomically; durably once the job has ended."""
        durable = self.record.get("state") in END_STATES
        write_json_atomic(os.path.join(self.job_dir, STATUS_FILE), self.record, durable)


def runner_of_job(job_dir, agent_path):
    """The runner of the queue a job is in (for a supervisor); None for the default one."""
    queue = load_queue(os.path.dirname(os.path.dirname(job_dir)))
    if queue is None or (queue.config or {}).get("runner", DEFAULT_RUNNER) == DEFAULT_RUNNER:
        return None
    return open_runner(queue, agent_path)


def tick_after_end(job_dir, agent_path):
    """Let the queue's runner react to a job's end (start the next queued job...)."""
    try:
        runner = runner_of_job(job_dir, agent_path)
        tick = getattr(runner, "tick", None)
        if tick is not None:
            tick()
    except Exception as exc:  # noqa: BLE001 - the job's end is recorded: log, don't fail
        sys.stderr.write("%s tej: the queue's runner failed: %s\n" % (now_iso(), exc))
        sys.stderr.flush()


def exit_code_fields(wait_status):
    """The exit code (128 + N for a signal, as in a shell) and signal name of a wait status."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        return {"exit_code": 128 + signum, "signal": signal_name(signum)}
    return {"exit_code": os.WEXITSTATUS(wait_status)}


def output_path(job_dir, job, stream):
    """Where a job's stdout or stderr goes: a path, or None when discarded."""
    target = job.get(stream) or OUTPUT_KEPT
    if stream == "stderr" and target == STDERR_MERGED:
        raise AgentError(ERR_INVALID, "This job's stderr goes to its stdout: read stdout")
    if target == OUTPUT_DISCARDED:
        return None
    if target == OUTPUT_KEPT:
        return os.path.join(job_dir, stream)
    work = os.path.realpath(os.path.join(job_dir, WORK_DIR))
    path = os.path.join(work, target)
    real = os.path.realpath(os.path.dirname(path))
    if real != work and not real.startswith(work + "/"):
        raise AgentError(ERR_INVALID, "The %s path %r leaves the job's folder" % (stream, target))
    return path


def open_outputs(job_dir, job):
    """Open the job's stdout and stderr targets; returns two file descriptors."""
    out = open_output(output_path(job_dir, job, "stdout"))
    if (job.get("stderr") or OUTPUT_KEPT) == STDERR_MERGED:
        return out, os.dup(out)
    return out, open_output(output_path(job_dir, job, "stderr"))


def open_output(path):
    """Open an output file for appending (private), or /dev/null for None."""
    if path is None:
        return os.open(os.devnull, os.O_WRONLY)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        make_private_dirs(parent)
    # O_NOCTTY: a supervisor leads its session, and must not take a terminal as its own.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOCTTY, 0o600)


# -- notifications ----------------------------------------------------------


def send_notifications(job, record, job_dir):
    """Send the job's webhooks and emails for its end state; returns one result each."""
    notify = job.get("notify") or {}
    if record.get("state") not in notify.get("on", ()):
        return []
    status = public_status(job["id"], record)
    status.update(host=socket_hostname(), queue=os.path.dirname(os.path.dirname(job_dir)))
    results = []
    for url in notify.get("webhook", ()):
        results.append(with_retries("webhook", url, lambda url=url: post_webhook(url, status)))
    for address in notify.get("email", ()):
        send = lambda address=address: send_email(notify, address, status)  # noqa: E731
        results.append(with_retries("email", address, send))
    return results


def with_retries(kind, target, action, attempts=4, backoff=1.0):
    """Run action until it succeeds, backing off between attempts; log each failure."""
    error = None
    for attempt in range(1, attempts + 1):
        try:
            action()
            return {
                "kind": kind,
                "target": target,
                "ok": True,
                "attempts": attempt,
                "at": now_iso(),
            }
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, none is fatal
            error = "%s: %s" % (type(exc).__name__, exc)
            sys.stderr.write(
                "%s tej: %s %s failed (attempt %d): %s\n"
                % (now_iso(), kind, target, attempt, error)
            )
            sys.stderr.flush()
            if getattr(exc, "code", 500) in (400, 401, 403, 404, 405, 410, 422):
                break
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    return {
        "kind": kind,
        "target": target,
        "ok": False,
        "attempts": attempt,
        "error": error,
        "at": now_iso(),
    }


def socket_hostname():
    """This server's host name."""
    import socket

    return socket.gethostname()


def post_webhook(url, status):
    """POST the job's status as JSON to url."""
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(status).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": "tej"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        response.read()


def send_email(notify, address, status):
    """Send a short plain-text summary of the job's end through SMTP."""
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = "tej: job %s %s" % (status["id"], status["state"].replace("_", " "))
    message["From"] = notify.get("from") or "tej@%s" % status["host"]
    message["To"] = address
    lines = ["Job %s on %s: %s." % (status["id"], status["host"], status["state"])]
    for key in ("exit_code", "signal", "reason", "started_at", "ended_at", "elapsed", "queue"):
        if status.get(key) is not None:
            lines.append("%s: %s" % (key.replace("_", " ").capitalize(), status[key]))
    message.set_content("\n".join(lines) + "\n")
    host, _, port = notify.get("smtp", "localhost:25").rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        smtp.send_message(message)


def spawn(command, work, env, out, err):
    """Start the job's command in a session of its own, detached from any terminal."""
    import subprocess

    return subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        close_fds=True,
        start_new_session=True,
        restore_signals=True,
    )


def ignore_signal(_signum, _frame):
    """A signal handler that does nothing."""


def script_command(script):
    """The command that runs a script: itself if executable, else its #! line or /bin/sh."""
    if os.access(script, os.X_OK):
        return [script]
    line = shebang(script)
    if line is not None:
        interpreter, _, argument = line.partition(" ")
        return [interpreter] + ([argument.strip()] if argument.strip() else []) + [script]
    return ["/bin/sh", script]


def shebang(script):
    """The #! line of a script (without #!), or None if it has none; OSError if unreadable."""
    with open(script, "rb") as stream:
        first = stream.readline(4096)
    return os.fsdecode(first[2:].strip()) if first.startswith(b"#!") else None


def script_interpreter(script):
    """The program a script's #! line names, or None (none, or unreadable)."""
    try:
        line = shebang(script)
    except OSError:
        return None
    return line.partition(" ")[0] if line else None


LIBC = []  # type: list[object]  # the C library, once loaded (see c_library)


def c_library():
    """The C library through ctypes, loaded once (forked supervisors inherit it); or None."""
    if not LIBC:
        try:
            import ctypes

            LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (ImportError, OSError):
            LIBC.append(None)
    return LIBC[0]


def become_subreaper(adopt=True):
    """On Linux, adopt the job's orphaned descendants, so they can be reaped and counted.

    adopt=False stops it: the job is over, and what this process starts next (the
    supervisor of the queue's next job) must not be re-parented to it.
    """
    try:
        c_library().prctl(36, 1 if adopt else 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except AttributeError:  # no C library, or no prctl: not Linux
        pass


def wait_for_child(pid):
    """Wait for the job's main process, reaping adopted orphans meanwhile."""
    while True:
        try:
            reaped, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if reaped == pid:
            return wait_status


def reap_children():
    """Reap every child that has exited, without blocking; whether any child is left."""
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if reaped == 0:
            return True


def reap_remaining(deadline):
    """Reap the children that are dying, so none is left a zombie (until deadline)."""
    while time.time() < deadline:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            time.sleep(0.01)


def terminate_group(pgid, grace, with_descendants=False):
    """Terminate a process group: SIGTERM, then SIGKILL after grace.

    with_descendants (for a supervisor): also every descendant of this
    process, which catches the job's processes that left its group.
    """
    for signum, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not job_alive(pgid, with_descendants):
            return
        signal_job(pgid, signum, with_descendants)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not job_alive(pgid, with_descendants):
                return
            time.sleep(0.02)


def job_alive(pgid, with_descendants):
    """Whether anything is left of the job's group (or of this process's descendants)."""
    # Without a child, this process has no descendant: none needs looking for in /proc.
    has_children = reap_children()
    if with_descendants and has_children and descendants(os.getpid()):
        return True
    return group_exists(pgid)


def signal_job(pgid, signum, with_descendants):
    """Signal the job's group (and this process's descendants)."""
    signal_group(pgid, signum)
    for pid in descendants(os.getpid()) if with_descendants else ():
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def signal_name(signum):
    """The name of a signal number, such as SIGKILL."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "SIG%d" % signum


def supervise(job_dir, secrets=None, agent_path=None):
    """Entry point of the supervisor process (secrets: read from stdin if None).

    agent_path is the agent's copy in the queue (this module's file if None),
    which the supervisor gives the queue's runner.
    """
    agent_path = agent_path or os.path.abspath(__file__)
    try:
        return Supervisor(job_dir, secrets, agent_path).run()
    except Exception as exc:  # noqa: BLE001 - logged in supervisor.log, and recorded
        sys.stderr.write("%s tej supervisor: %s\n" % (now_iso(), exc))
        sys.stderr.flush()
        record_supervisor_failure(job_dir, agent_path, exc)
        return 1


def record_supervisor_failure(job_dir, agent_path, exc):
    """Record as lost, with the reason, a job whose supervisor failed before starting it.

    The agent answered the submit once the supervisor was forked: the record
    is how the user hears of it. A job that started is left as it is: its
    record says lost once this supervisor is gone.
    """
    record = read_status_record(job_dir)
    if not record or record.get("state") not in (STATE_STARTING, STATE_SCHEDULED):
        return
    if record.get("job"):
        return
    record.update(
        state=STATE_LOST,
        ended_at=now_iso(),
        reason="the job's supervisor failed before starting it: %s" % exc,
    )
    try:
        write_json_atomic(os.path.join(job_dir, STATUS_FILE), record)
    except OSError:
        return
    tick_after_end(job_dir, agent_path)


def serve(channel):
    """Answer requests on an execnet channel until the client closes it."""
    agent = Agent()
    for request in channel:
        channel.send(agent.handle(request))


def main(argv):
    """Command-line entry point, used to run the supervisor."""
    if len(argv) == 2 and argv[0] == "supervise":
        return supervise(argv[1])
    if argv == ["fork-server"]:
        return serve_forks(sys.stdin.buffer, sys.stdout.buffer)
    sys.stderr.write("usage: tej-agent supervise JOBDIR | fork-server\n")
    return 2


if __name__ == "__channelexec__":
    serve(channel)  # type: ignore[name-defined]  # noqa: F821 - provided by execnet
elif __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
