"""Arrays: a job whose folder is a queue of tasks (docs/queue-format.md, "Arrays").

An array's folder ``jobs/ARRAYID/`` is a job folder (job.json with an "array"
field, status.json: the array's own, aggregate record, the manifest and
blobs, ``work/``: the uploaded files, a template never run in) that also
holds, like a queue's root, ``jobs/N/`` (task N's folder, made only when the
task starts, or is cancelled before it starts), ``staging/`` (task folders
being made, renamed into ``jobs/N``: the rename reserves the task) and
``index/`` (the tasks' own index, the queue's format and code). Task N is
``ARRAYID.N`` wherever a job id is taken.
"""

import errno
import os

from ..protocol import (
    ACTIVE_STATES,
    END_STATES,
    ENV_NAME_REGEX,
    ERR_INVALID,
    ERR_JOB_NOT_FOUND,
    MAX_ARRAY_TASKS,
    STATE_CANCELLED,
    STATE_FINISHED,
    STATE_KILLED,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_STARTING,
    parse_array_spec,
)
from .errors import AgentError
from .files import (
    json_loads,
    make_private_dir,
    now_iso,
    randrange,
    read_json,
    remove_tree,
    write_json_new,
)
from .layout import (
    JOB_FILE,
    JOBS_DIR,
    PARAMS_FILE,
    STAGING_DIR,
    STATUS_FILE,
    TASK_DELETED,
    WORK_DIR,
)

# Fields of an array's job.json that its tasks don't take.
ARRAY_ONLY_FIELDS = ("array", "notify", "id", "secret_env")


def is_array(job_dir):
    """Whether a job's folder is an array's (it holds its tasks' jobs/)."""
    return os.path.isdir(os.path.join(job_dir, JOBS_DIR))


def check_array(job, params):
    """Check a submitted array's "array" field and its params (JSON lines text, or None).

    Returns (job normalized, the params' rows as lines of text, or None).
    """
    spec = job.get("array")
    if not isinstance(spec, dict) or not isinstance(spec.get("indexes"), str):
        raise AgentError(ERR_INVALID, 'array must be {"indexes": SPEC, "max_parallel": N}')
    try:
        indexes, _ = parse_array_spec(spec["indexes"])
    except ValueError as exc:
        raise AgentError(ERR_INVALID, str(exc))
    parallel = spec.get("max_parallel")
    if parallel is not None and (
        isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1
    ):
        raise AgentError(ERR_INVALID, "max_parallel must be a whole number of 1 or more")
    lines = None
    if params is not None:
        lines = check_params(params, indexes)
    if job.get("start_at") is not None or job.get("delay") is not None:
        raise AgentError(ERR_INVALID, "An array can't have start_at or delay (yet)")
    array = {"indexes": spec["indexes"], "size": len(indexes), "max_parallel": parallel}
    return dict(job, array=array), lines


def check_params(params, indexes):
    """The rows of a params text (JSON lines of flat objects), one per index: checked."""
    if not isinstance(params, str):
        raise AgentError(ERR_INVALID, "params must be text: JSON lines")
    lines = params.splitlines()
    if not lines or len(lines) > MAX_ARRAY_TASKS:
        raise AgentError(ERR_INVALID, "params must have 1 to %d rows" % MAX_ARRAY_TASKS)
    if indexes[-1] >= len(lines):
        raise AgentError(ERR_INVALID, "params has no row %d" % indexes[-1])
    import re

    name = re.compile(ENV_NAME_REGEX)
    for number, line in enumerate(lines):
        try:
            row = json_loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not all(
            isinstance(key, str)
            and name.match(key)
            and isinstance(value, str)
            and "\0" not in value
            for key, value in row.items()
        ):
            raise AgentError(ERR_INVALID, "params row %d is not a flat object of names" % number)
    return lines


def make_array_folder(staging, params_lines):
    """Give a staged job the folders of an array (its tasks, their staging).

    Its tasks' index is made by the first task that gets a folder (ensure_task_index),
    after the submit's reply: a submit pays for no more than a job's.
    """
    for name in (JOBS_DIR, STAGING_DIR):
        make_private_dir(os.path.join(staging, name))
    if params_lines is not None:
        data = ("\n".join(params_lines) + "\n").encode("utf-8")
        from .files import write_file_atomic

        write_file_atomic(os.path.join(staging, PARAMS_FILE), data, durable=False)


def array_indexes(job):
    """The task indexes of an array's metadata, in order."""
    return parse_array_spec(job["array"]["indexes"])[0]


def task_dir(queue, array_id, index):
    """The folder of task index of array_id (whether or not it exists); JobNotFound if the
    array or the index isn't there."""
    array_dir = queue.path(JOBS_DIR, array_id)
    missing = AgentError(ERR_JOB_NOT_FOUND, "No job %r" % ("%s.%d" % (array_id, index)))
    if not is_array(array_dir):
        raise missing
    path = os.path.join(array_dir, JOBS_DIR, str(index))
    if os.path.isdir(path):
        if os.path.lexists(os.path.join(path, TASK_DELETED)):  # a tombstone (delete_task)
            raise AgentError(
                ERR_JOB_NOT_FOUND, "No job %r: it was deleted" % task_id_of(array_id, index)
            )
        return path
    try:
        job = read_json(os.path.join(array_dir, JOB_FILE))
    except (OSError, AgentError):
        raise missing
    if index not in set(array_indexes(job)):
        raise missing
    return path


def array_of_task(task_dir):
    """The folder of the array a task's folder is (or would be) in."""
    return os.path.dirname(os.path.dirname(task_dir))


def unstarted_record(path):
    """The record of a task with no folder yet: queued, or cancelled if its array ended.

    None if path is not a task's.
    """
    array_dir = array_of_task(path)
    if not os.path.isfile(os.path.join(array_dir, JOB_FILE)):
        return None
    from .records import read_status_record, supervised_record

    array = read_status_record(array_dir) or {}
    if array.get("state") not in END_STATES and array.get("supervisor"):
        array = supervised_record(array_dir, array)  # its supervisor died: lost, ended
    if array.get("state") in END_STATES:
        return {"state": STATE_CANCELLED, "reason": "its array ended before it started"}
    return {"state": STATE_QUEUED, "submitted_at": array.get("submitted_at")}


def task_job(array_job, array_id, index, params_row):
    """A task's metadata: its array's, minus the array's own fields, plus its place."""
    job = dict((key, value) for key, value in array_job.items() if key not in ARRAY_ONLY_FIELDS)
    env = dict(job.get("env") or {})
    env.update(
        TEJ_ARRAY_ID=array_id,
        TEJ_ARRAY_INDEX=str(index),
        TEJ_ARRAY_SIZE=str(array_job["array"]["size"]),
    )
    for name, value in (params_row or {}).items():
        env["TEJ_PARAM_" + name] = value
    job.update(id="%s.%d" % (array_id, index), array_id=array_id, index=index, env=env)
    return job


def reserve_task(array_dir, job, record, held=False):
    """Make a task's folder (job.json, status.json) aside, then rename it into jobs/N.

    Returns its path, or None if the task has a folder already (it was cancelled,
    or started by someone else): the rename decides, no lock is needed.
    held: the caller holds an intent for every task (index.ALL_TASKS: server/tasks.py),
    so none is made for this one.
    """
    from .index import Intent, sync

    ensure_task_index(array_dir)
    name = str(job["index"])
    staging = os.path.join(array_dir, STAGING_DIR, "%s-%08x" % (name, randrange(1 << 32)))
    make_private_dir(staging)
    # Written whole before the folder is renamed: nobody reads them in staging/, so not
    # atomically (a temporary file and a rename each) either.
    write_json_new(os.path.join(staging, JOB_FILE), job)
    record = dict(record, id=job["id"], submitted_at=record.get("submitted_at") or now_iso())
    write_json_new(os.path.join(staging, STATUS_FILE), record)
    target = os.path.join(array_dir, JOBS_DIR, name)
    intent = Intent(array_dir, name)
    if not held:
        intent.begin()
    try:
        os.rename(staging, target)
    except OSError as exc:
        remove_tree(staging)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            intent.end()
            return None
        raise  # the intent stays: the task is repaired once this process is gone
    sync(array_dir, name, record, with_row=record.get("state") in END_STATES)
    intent.end()
    return target


def ensure_task_index(array_dir):
    """Build an array's index of its tasks if it has none yet (no task has a folder).

    A task with a folder is always in it: reserve_task calls this first. Until then
    every task is reported queued (cancelled once the array ended) without one.
    """
    from .index import index_path, rebuild
    from .layout import INDEX_COMPLETE

    if not os.path.exists(index_path(array_dir, INDEX_COMPLETE)):
        rebuild(array_dir)


def cancel_unstarted(queue, job_dir):
    """Kill a task that has no folder yet: its folder is made, cancelled (None if it started)."""
    array_dir = array_of_task(job_dir)
    array_job = read_json(os.path.join(array_dir, JOB_FILE))
    index = int(os.path.basename(job_dir))
    job = task_job(array_job, os.path.basename(array_dir), index, None)
    record = {
        "state": STATE_KILLED,
        "reason": "cancelled before it started",
        "ended_at": now_iso(),
    }
    task = reserve_task(array_dir, job, record)
    if task is None:
        return None
    note_task_change(task, record)  # it may have been the array's last task
    return record


def read_params(array_dir):
    """An array's params rows (dicts), or None if it has none."""
    try:
        with open(os.path.join(array_dir, PARAMS_FILE), encoding="utf-8") as stream:
            return [json_loads(line) for line in stream if line.strip()]
    except FileNotFoundError:
        return None


def lay_out_task(queue, array_dir, task_dir, rows=None):
    """Lay a started task's work/ out: private copies of its array's template, checked.

    rows: the array's manifest (template_rows), read once by its supervisor (read here
    if None). Each
    file is copied from the template (work/ of the array, never run in) and
    checked as the store checks a blob: as uploaded before the copy (its size,
    and STORE_MTIME), unchanged during it (the same fstat after). The task holds
    none of the store's inodes, so a task that writes to its input changes
    neither the store nor another task's files. Without rows, or if a template
    file is not as uploaded, the task is laid out from the store instead (as
    resubmit lays a job out): AgentError if the store no longer holds a content.
    """
    from .template import copy_template, lay_out_from_store, template_rows

    if rows is None:
        rows = template_rows(array_dir)
    if rows is not None:
        if copy_template(array_dir, task_dir, rows):
            return
        remove_tree(os.path.join(task_dir, WORK_DIR))
    lay_out_from_store(queue, array_dir, task_dir)


def counts(array_dir, size, array_state):
    """How many tasks are in each state, from the array's index (a listdir per state).

    Tasks with no folder are queued, or cancelled once the array has ended.
    """
    from .index import STATES, ids_in

    found = dict((state, len(ids_in(array_dir, state))) for state in STATES)
    unstarted = max(size - sum(found.values()), 0)
    if array_state in END_STATES:
        found[STATE_CANCELLED] += unstarted
    else:
        found[STATE_QUEUED] += unstarted
    return dict((state, count) for state, count in found.items() if count)


def array_info(queue, array_id, array_dir, status, with_tasks):
    """What status says of an array besides its own record: counts, fields, tasks."""
    job = read_json(os.path.join(array_dir, JOB_FILE))
    spec = job["array"]
    info = dict(spec, counts=counts(array_dir, spec["size"], status.get("state")))
    if with_tasks:
        info["tasks"] = task_rows(queue, array_id, array_dir, array_indexes(job), status)
    return info


def task_rows(queue, array_id, array_dir, indexes, array_status):
    """Every task's id, state, exit code and times: rows of ended ones from the index."""
    from .index import read_rows, segment_names
    from .records import public_status, read_status_record

    ended = read_rows(array_dir, segment_names(array_dir))
    unstarted = unstarted_record(os.path.join(array_dir, JOBS_DIR, "0"))
    fields = ("id", "state", "exit_code", "submitted_at", "started_at", "ended_at", "elapsed")
    rows = []
    for index in indexes:
        name = str(index)
        task_id = "%s.%d" % (array_id, index)
        line = ended.get(name)
        if line is not None:
            values = json_loads(line[1][line[1].index("\t[") + 1 :])
            from .index import LIST_FIELDS

            row = dict(zip(LIST_FIELDS, values))
        else:
            path = os.path.join(array_dir, JOBS_DIR, name)
            record = read_status_record(path)
            if record is None:
                record = unstarted
            elif record.get("state") not in END_STATES:
                record = queue.record(task_id, path)
            row = public_status(task_id, record)
        row["id"] = task_id
        rows.append(dict((field, row.get(field)) for field in fields))
    return rows


def first_failure(array_dir, indexes):
    """The exit code of the first task (by index) that didn't finish with 0; 0 if none."""
    from .records import read_status_record

    for index in indexes:
        record = read_status_record(os.path.join(array_dir, JOBS_DIR, str(index)))
        if record is None:
            continue
        code = record.get("exit_code")
        if record.get("state") != "finished" or code != 0:
            return code if code else 1
    return 0


def end_record(array_dir, record, killed):
    """An array's record updated with its end: finished, or killed (cancelled if no task
    started: no exit code, no start), and the exit code of its first failed task. Shared
    by the default runner's ArraySupervisor and the hook that keeps the record under the
    other runners."""
    from .files import flush_file_system

    flush_file_system(array_dir)  # the tasks' records, written without fsync (TaskSupervisor)
    from .records import read_status_record

    if killed and not any(
        (read_status_record(os.path.join(array_dir, JOBS_DIR, name)) or {}).get("started_at")
        for name in os.listdir(os.path.join(array_dir, JOBS_DIR))
    ):  # no task ran (those killed one by one before they started included)
        record.update(state=STATE_CANCELLED, ended_at=now_iso(), exit_code=None)
        return record
    job = read_json(os.path.join(array_dir, JOB_FILE))
    record.update(
        state=STATE_KILLED if killed else STATE_FINISHED,
        ended_at=now_iso(),
        exit_code=first_failure(array_dir, array_indexes(job)),
    )
    record.setdefault("started_at", record["ended_at"])
    return record


def note_task_change(task_dir, task_record):
    """After a task's record was written (and its marker moved): keep its array's record.

    Only for an array whose record says its tasks keep it (``kept_by_tasks``: the queue and
    Slurm runners; under the default runner its ArraySupervisor does). It becomes running
    when a task starts; once a task ends, the array's end is recorded if every task ended.
    """
    from .index import write_status
    from .records import read_status_record

    array_dir = array_of_task(task_dir)
    record = read_status_record(array_dir)
    if not record or not record.get("kept_by_tasks") or record.get("state") in END_STATES:
        return
    state = task_record.get("state")
    if state in END_STATES:
        settle_array(array_dir, record)
    elif state in (STATE_STARTING, STATE_RUNNING) and record.get("state") != STATE_RUNNING:
        record.update(state=STATE_RUNNING, started_at=record.get("started_at") or now_iso())
        write_status(array_dir, record, False)


def settle_array(array_dir, record):
    """Record an array's end (and send its notifications) if every task has ended.

    Each ender moves its task's marker first, then looks: the last one sees every
    end. Cheap unless it may be the end: the folders of every task are listed only
    once no task is active. Returns the array's record.
    """
    from .index import write_status

    if record.get("state") in END_STATES or not tasks_all_ended(array_dir, record):
        return record
    record = end_record(array_dir, record, bool(record.get("kill_requested")))
    write_status(array_dir, record)
    job = read_json(os.path.join(array_dir, JOB_FILE))
    if job.get("notify"):
        from .notify import send_notifications

        results = send_notifications(job, record, array_dir)
        if results:
            record["notifications"] = results
            write_status(array_dir, record)
    return record


def tasks_all_ended(array_dir, record):
    """Whether no task of an array is active or will start (or its kill left none to run).

    The folders are listed before the active markers and intents are looked at again:
    a task seen with a folder has its intent, or its active marker, in place by then.
    """
    from .index import count_in, ids_in
    from .layout import INDEX_PENDING

    active = ACTIVE_STATES

    def busy():
        return bool(ids_in(array_dir, INDEX_PENDING)) or bool(count_in(array_dir, active))

    if busy():
        return False
    if not record.get("kill_requested"):
        size = read_json(os.path.join(array_dir, JOB_FILE))["array"]["size"]
        if len(os.listdir(os.path.join(array_dir, JOBS_DIR))) < size:
            return False
    return not busy()


def settle_on_read(array_dir):
    """For status: repair an array whose tasks all ended but whose record says it is active
    (a task's writer died between its end and the array's); the index of one whose
    supervisor died (the default runner's: the tasks it was running)."""
    from .index import repair_pending
    from .records import read_status_record

    record = read_status_record(array_dir)
    if not record or record.get("state") in END_STATES:
        return
    if record.get("kept_by_tasks"):
        repair_pending(array_dir)
        settle_array(array_dir, record)
        return
    from .processes import is_same_process

    if record.get("supervisor") and not is_same_process(record["supervisor"]):
        repair_pending(array_dir)  # its supervisor died: the tasks it ran (index.ALL_TASKS)


def new_task_record():
    """The first record of a task being started."""
    return {"state": STATE_STARTING, "submitted_at": now_iso()}


def task_id_of(array_id, index):
    """The id of task index of array_id: ARRAYID.N."""
    return "%s.%d" % (array_id, index)


def list_summary(job_dir, record):
    """An array's "array" field in `list`: its size, spec and counts (None: not an array).

    The counts are listdirs of its index, as status's (see counts).
    """
    if not is_array(job_dir):
        return None
    try:
        spec = read_json(os.path.join(job_dir, JOB_FILE))["array"]
    except (OSError, AgentError, KeyError, TypeError):
        return None
    return {
        "size": spec["size"],
        "max_parallel": spec.get("max_parallel"),
        "indexes": spec["indexes"],
        "counts": counts(job_dir, spec["size"], record.get("state")),
    }


def task_lines(queue, array_id, array_state, wanted, scan=None):
    """The list rows (segment lines, see index.row_line) of an array's tasks in the wanted
    states, by index: ended ones from the array's index rows, active ones from their
    records (live), unstarted ones queued (cancelled once the array has ended)."""
    from .index import STATES, ids_in, read_rows, row_line, segment_names
    from .records import live_status, read_status_record

    array_dir = queue.path(JOBS_DIR, array_id)
    try:
        indexes = array_indexes(read_json(os.path.join(array_dir, JOB_FILE)))
    except (OSError, AgentError):
        return []  # deleted meanwhile
    markers = {}  # type: dict[str, str]
    for folder in STATES:
        for name in ids_in(array_dir, folder):
            markers[name] = folder
    ended = read_rows(array_dir, segment_names(array_dir))
    unstarted = {"state": STATE_CANCELLED if array_state in END_STATES else STATE_QUEUED}
    if array_state in END_STATES:
        unstarted["reason"] = "its array ended before it started"
    # Tasks not started have one row but for their ids: made once (most of a big array's).
    same = row_line("", unstarted)
    same = same[same.index("\t[") + 5 :].rstrip("\n")  # what follows ["",
    lines = []
    for index in indexes:
        name = str(index)
        state = markers.get(name)
        if state is None:
            if unstarted["state"] in wanted:
                lines.append('\t\t\t\t["%s.%s",%s' % (array_id, name, same))
            continue
        if state not in wanted:
            continue
        row = ended.get(name)
        task = task_id_of(array_id, index)
        if row is not None and row[0] == state:  # its id in the row is N: made ARRAYID.N
            text = row[1][row[1].index("\t[") + 1 :]
            lines.append("\t%s\t%s\t0\t%s" % (task, state, '["%s.' % array_id + text[2:]))
            continue
        path = os.path.join(array_dir, JOBS_DIR, name)
        record = read_status_record(path)
        if record is None:  # gone meanwhile: a record of its own stands in
            record = {"state": state}
        elif record.get("state") not in END_STATES:
            record = queue.record(task, path)
        status = live_status(task, path, record, scan)
        lines.append(row_line(task, record, status).rstrip("\n"))
    return lines


def delete_task(queue, array_id, task_dir):
    """Delete an ended task's files, keeping its folder as a tombstone: job.json, status.json
    and TASK_DELETED (when), so its array still counts it as it ended (its marker stays
    in the array's index) and it never looks queued again; its id is then not found.
    """
    from .files import make_private_dir as make_dir
    from .layout import TRASH_DIR

    task = task_id_of(array_id, int(os.path.basename(task_dir)))
    try:
        fd = os.open(
            os.path.join(task_dir, TASK_DELETED), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
    except FileExistsError:
        raise AgentError(ERR_JOB_NOT_FOUND, "No job %r: it was deleted" % task)
    try:
        os.write(fd, (now_iso() + "\n").encode())
    finally:
        os.close(fd)
    if not os.path.isdir(queue.path(TRASH_DIR)):
        make_dir(queue.path(TRASH_DIR))
    trash = queue.path(TRASH_DIR, "%s.%d" % (task, randrange(1 << 30)))
    make_dir(trash)
    for name in os.listdir(task_dir):  # gone at once (renamed), then removed
        if name not in (JOB_FILE, STATUS_FILE, TASK_DELETED):
            os.rename(os.path.join(task_dir, name), os.path.join(trash, name))
    remove_tree(trash)
