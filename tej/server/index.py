"""The queue's index: which jobs are in which state, and the list rows of ended jobs.

The index (QUEUE/index, docs/queue-format.md) is derived state: the job
folders stay the truth, and it can always be rebuilt from them. It is made
of renames and new files only, so that it is correct on a network file
system without locks:

* ``STATE/ID``: one empty marker per job, in the folder of the state its
  status record says. A status record is written, then its job's marker is
  moved (``sync``); the mover reads the record again after the move, and
  moves again if it changed meanwhile, so that concurrent writers converge on
  the last record.
* ``pending/ID~HOST~PID~START~N``: an intent, made before a job's record or
  folder changes and taken away once its marker is right. One left by a process
  that died (SIGKILL) names the job to repair: the next command does. An
  intent is a spare empty file of ``spares/`` renamed (created only if there
  is none), and is renamed back there at its end: a new file costs far more
  than a rename, and a removed one makes the next creates dearer still.
* ``rows/SEGMENT``: the list rows of ended jobs, in files that are never
  changed once written (one per ended job, merged by `list` from time to time).
* ``complete``: written once the index was built; without it, the next command
  rebuilds the index from the job folders (a queue of format 1, a crash during
  a rebuild, an index removed by hand).
"""

import itertools
import os
import time

from ..protocol import ACTIVE_STATES, END_STATES, LIST_HEAD, STATE_LOST
from .files import make_private_dir, randrange, remove_quietly, write_file_atomic
from .layout import (
    ID_PATTERN,
    INDEX_COMPLETE,
    INDEX_DIR,
    INDEX_PENDING,
    INDEX_ROWS,
    INDEX_SPARES,
    JOBS_DIR,
    QUEUE_FORMAT,
)
from .records import live_status, public_status, read_status_record

STATES = ACTIVE_STATES + END_STATES
# The job id of the one intent an array's supervisor holds for every task it runs, from its
# start to its end (server/tasks.py): a crash of it has every task folder's marker placed again.
ALL_TASKS = "*"
STALE_INTENT = 60.0  # an intent of another machine this old is a crashed writer's
MERGE_SEGMENTS = 32  # `list` merges the row segments once there are more
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
    "resources",
    "progress",
    "array",
)
# Tests only: a process SIGKILLs itself at this point of an update ("POINT" or
# "POINT:STATE", see crash_point), so that tests can check what a crash leaves.
CRASH_AT = os.environ.get("TEJ_TEST_CRASH_AT")
_intents = itertools.count()
_writer = []  # type: list[str]  # this process's HOST~PID~START, made once
_writer_pid = [0]  # the process _writer names (a forked child names itself)
_spares = {}  # type: dict[str, list[str]]  # root -> spares this process gave back, by path
_spares_pid = [0]  # the process _spares belong to (a forked child starts with none)
MAX_ADOPTED = 4  # spares taken from spares/'s listing at once


def index_path(root, *parts):
    """A path in the index of the queue at root."""
    return os.path.join(root, INDEX_DIR, *parts)


def has_index(root):
    """Whether the queue at root has an index to keep (one built, or being built)."""
    return os.path.isdir(index_path(root, INDEX_PENDING))


def state_of(record):
    """The index folder of a job whose record is this (None: the job is gone)."""
    if record is None:
        return None
    state = record.get("state")
    return state if state in STATES else STATE_LOST


# writing


def write_status(job_dir, record, durable=True, batch=None):
    """Write a job's status record (atomically), then move the job in the index.

    The one way a job's record changes, once the job is in jobs/ (see sync).
    batch: for the records of the tasks an array's supervisor runs itself
    (server/tasks.py), which holds one intent for them all (ALL_TASKS) from its
    start to its end, keeps the array's record, and writes the rows of ended tasks in batches (an
    ended task's row is added to batch.rows, not written in a segment of its own).
    """
    from .files import write_json_atomic
    from .layout import STATUS_FILE

    record["rev"] = int(record.get("rev") or 0) + 1
    root = os.path.dirname(os.path.dirname(job_dir))
    job_id = os.path.basename(job_dir)
    if batch is not None:
        write_json_atomic(os.path.join(job_dir, STATUS_FILE), record, durable)
        crash_point("status-written", record.get("state"))
        again = sync(root, job_id, record, with_row=False)
        if state_of(again) in END_STATES:  # its row with its last progress, as note_row's
            batch.rows.append(row_line(job_id, again, live_status(job_id, job_dir, again)))
        return
    with Intent(root, job_id):
        write_json_atomic(os.path.join(job_dir, STATUS_FILE), record, durable)
        crash_point("status-written", record.get("state"))
        sync(root, job_id, record)
        crash_point("marker-moved", record.get("state"))
    if is_task_dir(job_dir):  # after its marker moved: see arrays.note_task_change
        from .arrays import note_task_change

        note_task_change(job_dir, record)


def is_task_dir(job_dir):
    """Whether a job folder is an array's task's: QUEUE/jobs/ARRAYID/jobs/N (a stat only
    when the path has that shape)."""
    from .layout import JOB_FILE

    parent = os.path.dirname(job_dir)
    array_dir = os.path.dirname(parent)
    above = os.path.basename(os.path.dirname(array_dir))
    if os.path.basename(parent) != JOBS_DIR or above != JOBS_DIR:
        return False
    return os.path.isfile(os.path.join(array_dir, JOB_FILE))


class Intent(object):
    """A change to a job in progress, for a with statement (see the module's doc)."""

    def __init__(self, root, job_id):
        self.root = root
        self.job_id = job_id
        self.path = None

    def begin(self):
        """Say the job is about to change (before it does); returns self."""
        name = "%s~%s~%d" % (self.job_id, writer_tag(), next(_intents))
        path = index_path(self.root, INDEX_PENDING, name)
        if take_spare(self.root, path):
            self.path = path
        elif has_index(self.root):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.path = path
        return self

    def end(self):
        """The change is done, and the index says so."""
        if self.path is not None:
            give_back(self.root, self.path)
            self.path = None

    def __enter__(self):
        return self.begin()

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.end()
        # On an error the intent stays: the job is repaired once this process is gone.


def spare_pool(root):
    """The spares this process gave back to the index at root (paths), the next to take last."""
    if _spares_pid[0] != os.getpid():
        _spares.clear()
        _spares_pid[0] = os.getpid()
    return _spares.setdefault(root, [])


def take_spare(root, path):
    """Rename a spare of the index at root to path (an intent); False if none could be had.

    This process's own spares first, else some of spares/ (another process may
    take the same one first: a rename is atomic, so only one of them has it).
    The intent's modification time is set: another machine's reader goes by it.
    """
    pool = spare_pool(root)
    listed = False
    while True:
        if not pool:
            if listed:
                return False
            listed = True
            try:
                names = os.listdir(index_path(root, INDEX_SPARES))
            except OSError:
                return False
            pool += [index_path(root, INDEX_SPARES, name) for name in names[:MAX_ADOPTED]]
            continue
        try:
            os.rename(pool.pop(), path)
        except OSError:  # taken by another process, or the index is gone
            continue
        os.utime(path)
        return True


def give_back(root, path):
    """End an intent: rename it to a spare of the index at root (removed if it can't be)."""
    spare = index_path(root, INDEX_SPARES, "%s~%d" % (writer_tag(), next(_intents)))
    for attempt in range(2):
        try:
            os.rename(path, spare)
            spare_pool(root).append(spare)
            return
        except FileNotFoundError:
            if attempt or not os.path.lexists(path):
                break
            try:
                make_private_dir(os.path.dirname(spare))  # a queue whose index had no spares yet
            except FileExistsError:
                pass
            except OSError:
                break
        except OSError:
            break
    remove_quietly(path)


def crash_point(name, state=None):
    """Tests only: die here (SIGKILL) if TEJ_TEST_CRASH_AT names this point."""
    if CRASH_AT is not None and CRASH_AT in (name, "%s:%s" % (name, state)):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def writer_tag():
    """This process, as an intent names it: HOST~PID~START (HOST: the boot's id).

    Made again in a forked child (a supervisor forked by a single-threaded
    process): the parent's would name its intents, and its spares, as the parent's.
    """
    pid = os.getpid()
    if not _writer or _writer_pid[0] != pid:
        from .processes import identify_process

        me = identify_process(pid)
        host = me["boot"] or "host-" + os.uname()[1]
        _writer[:] = ["%s~%d~%s" % (host.replace("~", "-"), me["pid"], me["start"])]
        _writer_pid[0] = pid
    return _writer[0]


def sync(root, job_id, record=None, with_row=True):
    """Move a job's marker to the folder of its record's state; returns the record.

    After the move the record is read again: if it changed meanwhile, the
    marker follows it. So whoever moves last has seen the last record.
    with_row: write the row of an ended job in a segment of its own.
    """
    job_dir = os.path.join(root, JOBS_DIR, job_id)
    for _ in range(100):
        if record is None:
            record = current_record(job_dir)
        state = state_of(record)
        place(root, job_id, state)
        again = current_record(job_dir)
        if state_of(again) == state:
            if with_row and state in END_STATES:
                note_row(root, job_id, again)
            return again
        record = again
    return record


def current_record(job_dir):
    """A job's record; a stand-in for one without (lost); None if the job is gone."""
    record = read_status_record(job_dir)
    if record is None and os.path.isdir(job_dir):
        return {"state": STATE_LOST, "reason": "the job's status file is missing"}
    return record


def place(root, job_id, state):
    """Leave the job's marker in the folder of state only (state None: nowhere)."""
    target = index_path(root, state, job_id) if state else None
    found = target is not None and os.path.lexists(target)
    for other in STATES:
        if other == state:
            continue
        path = index_path(root, other, job_id)
        if found or target is None:
            remove_quietly(path)
            continue
        try:
            os.rename(path, target)
            found = True
        except FileNotFoundError:
            pass
    if target is not None and not found:
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
        except FileNotFoundError:  # the index is being removed: it will be rebuilt
            pass


def forget(root, job_id):
    """Take a deleted job out of the index."""
    place(root, job_id, None)


# rows of ended jobs


def row_of(status):
    """A job's list row: the values of LIST_FIELDS of its public status ("array": an
    array's size and counts, None for a job)."""
    return [status.get(field) for field in LIST_FIELDS]


def row_line(job_id, record, status=None, root=None):
    """A row as a segment holds it: SUBMITTED_AT HEAD, ID, STATE, REV, then the row in JSON.

    Tab-separated (no field holds a tab), so that lines sort by submit time, then id.
    HEAD, after a space, is the JSON of the row's LIST_HEAD values: what a plain `tej
    list` shows, read without decoding the row (a line of an older tej has none).
    status: the job's public status, if not the one its record makes (a running
    job's live figures). root: the queue's, to give the row the job's last progress
    and an array's counts.
    """
    if status is None and root is None:
        status = public_status(job_id, record)
    elif status is None:
        from .arrays import list_summary

        job_dir = os.path.join(root, JOBS_DIR, job_id)
        status = live_status(job_id, job_dir, record)  # its last progress too
        status["array"] = list_summary(job_dir, record)
    import json

    row = json.dumps(row_of(status), separators=(",", ":"))
    head = json.dumps([status.get(field) for field in LIST_HEAD], separators=(",", ":"))
    fields = ("%s %s" % (record.get("submitted_at") or "", head), job_id, record.get("state"))
    return "%s\t%s\t%s\t%d\t%s\n" % (fields + (int(record.get("rev") or 0), row))


def line_row(line):
    """The row (JSON text) of a segment's line."""
    return line[line.index("\t[") + 1 :]


def line_head(line):
    """The JSON text of the LIST_HEAD values of a segment's line (see row_line)."""
    tab = line.index("\t")
    space = line.find(" ", 0, tab)
    if space >= 0:
        return line[space + 1 : tab]
    import json

    values = dict(zip(LIST_FIELDS, json.loads(line_row(line))))  # an older tej's line
    return json.dumps([values.get(field) for field in LIST_HEAD], separators=(",", ":"))


def with_head(line):
    """A segment's line with its head (an older tej's line has none: it is added)."""
    tab = line.index("\t")
    if line.find(" ", 0, tab) >= 0:
        return line
    return "%s %s%s" % (line[:tab], line_head(line), line[tab:])


def headless_segments(root, names):
    """The segments an older tej wrote, whose lines have no head (a segment's lines are
    written at once, by one tej: its first line tells)."""
    found = []
    for name in names:
        try:
            with open(index_path(root, INDEX_ROWS, name)) as stream:
                first = stream.readline()
        except OSError:
            continue
        if "\t" in first and " " not in first[: first.index("\t")]:
            found.append(name)
    return found


def note_row(root, job_id, record):
    """Write the row of a job that has ended, in a segment of its own."""
    write_segment(root, [row_line(job_id, record, root=root)])


def write_segment(root, lines, name=None):
    """Write rows as a new segment (named after the time, so later ones sort last)."""
    if name is None:
        name = "%016x-%08x" % (int(time.time() * 1e6), randrange(1 << 32))
    try:
        write_file_atomic(index_path(root, INDEX_ROWS, name), "".join(lines).encode(), False)
    except FileNotFoundError:  # no index (yet): the rebuild writes the rows
        pass
    return name


def segment_names(root):
    """The names of the row segments, oldest first (temporary files left out)."""
    try:
        names = os.listdir(index_path(root, INDEX_ROWS))
    except OSError:
        return []
    return sorted(name for name in names if "." not in name)


def read_rows(root, names):
    """The rows in segments: {id: (state, line)}; of two rows of a job, the higher REV wins
    (then the later segment)."""
    rows = {}  # type: dict[str, tuple[str, str]]
    for name in names:
        try:
            with open(index_path(root, INDEX_ROWS, name)) as stream:
                text = stream.read()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split("\t", 4)
            if len(parts) != 5 or not parts[3].isdigit() or not parts[4].startswith("["):
                continue
            known = rows.get(parts[1])
            if known is not None and int(known[1].split("\t", 4)[3]) > int(parts[3]):
                continue
            rows[parts[1]] = (parts[2], line)
    return rows


def merge_segments(root, names, lines):
    """Replace the segments names with one holding lines (sorted: by submit time, then id).

    It takes the place of the newest of them (its name sorts right after it),
    so rows written meanwhile in newer segments still come later.
    """
    merged = write_segment(root, [line + "\n" for line in lines], names[-1] + "~")
    for name in names:
        if name != merged:
            remove_quietly(index_path(root, INDEX_ROWS, name))


# reading


def ids_in(root, state):
    """The ids of the jobs whose markers are in a state's folder."""
    try:
        return os.listdir(index_path(root, state))
    except OSError:
        return []


def count_in(root, states):
    """How many jobs have markers in these states' folders."""
    return sum(len(ids_in(root, state)) for state in states)


# building and repairing


def ensure_index(root):
    """Make sure the queue at root has a whole index: repair, or build it, if it must."""
    if not os.path.exists(index_path(root, INDEX_COMPLETE)):
        rebuild(root)
        return
    repair_pending(root)


def repair_pending(root):
    """Repair the jobs named by intents of writers that died; returns how many."""
    try:
        names = os.listdir(index_path(root, INDEX_PENDING))
    except OSError:
        return 0
    repaired = 0
    for name in names:
        parts = name.split("~")
        path = index_path(root, INDEX_PENDING, name)
        if len(parts) != 5 or writer_alive(parts, path):
            continue
        if parts[0] == ALL_TASKS:  # an array's supervisor died: every task it ran
            for name in os.listdir(os.path.join(root, JOBS_DIR)):
                if ID_PATTERN.match(name):
                    sync(root, name, with_row=False)
        elif ID_PATTERN.match(parts[0]):
            sync(root, parts[0])
            repair_runner(root, parts[0])
        else:
            continue
        remove_quietly(path)
        repaired += 1
    return repaired


def writer_alive(parts, path):
    """Whether the process that made an intent may still be at work."""
    from .processes import is_same_process

    host, pid, start = parts[1], parts[2], parts[3]
    if host == writer_tag().split("~")[0] and pid.isdigit():
        start_ticks = int(start) if start.isdigit() else None
        return is_same_process({"pid": int(pid), "start": start_ticks, "boot": None})
    try:
        return time.time() - os.lstat(path).st_mtime < STALE_INTENT
    except OSError:
        return True  # removed meanwhile: its writer finished


def repair_runner(root, job_id):
    """Let the queue's runner repair its own state of a job a writer left (queue runner)."""
    from .queue import open_queue

    try:
        queue = open_queue(root, with_index=False)
    except Exception:  # noqa: BLE001 - a runner that can't load repairs nothing
        return
    repair = getattr(queue.runner, "repair", None)
    if repair is not None:
        repair(job_id)


def rebuild(root):
    """Build the index from the job folders (in place: concurrent writers keep it right)."""
    for folder in (INDEX_PENDING, INDEX_SPARES, INDEX_ROWS) + STATES:
        make_dirs(index_path(root, folder))
    jobs = os.path.join(root, JOBS_DIR)
    try:
        ids = [name for name in os.listdir(jobs) if ID_PATTERN.match(name)]
    except OSError:
        ids = []
    lines = []
    for number, job_id in enumerate(ids):
        if number == len(ids) // 2:
            crash_point("rebuilding")
        record = sync(root, job_id, with_row=False)
        if state_of(record) in END_STATES:
            lines.append(row_line(job_id, record, root=root))
    present = set(ids)
    for state in STATES:
        for job_id in ids_in(root, state):
            if job_id not in present and not os.path.isdir(os.path.join(jobs, job_id)):
                remove_quietly(index_path(root, state, job_id))
    old = segment_names(root)
    write_segment(root, lines)
    for name in old:
        remove_quietly(index_path(root, INDEX_ROWS, name))
    repair_pending(root)
    write_file_atomic(index_path(root, INDEX_COMPLETE), b"%d\n" % QUEUE_FORMAT)


def make_dirs(path):
    """Make a private folder and its parent (the index) if they are missing."""
    parent = os.path.dirname(path)
    for folder in (parent, path):
        try:
            make_private_dir(folder)
        except FileExistsError:
            pass
