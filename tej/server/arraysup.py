"""The supervisor of an array under the default runner: one process for all its tasks.

It starts tasks up to the array's %N (without one, the server's CPU count):
for each, it reserves the task's folder, lays its work/ out and spawns its
script itself (server/tasks.py: no Python process per task), then waits for
them all in one loop, starting the next as each ends. `tej kill` of a task
asks this supervisor to kill that task (SIGUSR1 and the task's TASK_KILL
file); `tej kill` of the array (SIGTERM) makes it start no more tasks (those
left are cancelled: they never get a folder) and kill the running ones.
`supervise_task` and `TaskSupervisor` are a task's own supervisor, for a task a
batch system starts (Slurm).
"""

import os
import signal
import sys

from ..protocol import (
    END_STATES,
    STATE_RUNNING,
)
from .arrays import (
    array_indexes,
    end_record,
    ensure_task_index,
    lay_out_task,
    new_task_record,
    read_params,
    reserve_task,
    task_job,
)
from .errors import AgentError
from .files import now_iso, read_json
from .index import ALL_TASKS, Intent, write_status
from .layout import JOB_FILE, STATUS_FILE, queue_root_of
from .processes import become_subreaper, identify_process
from .supervisor import Supervisor, ignore_signal
from .template import template_rows

TASK_TAKEN = 3  # a task child's exit code: the task had a folder already (cancelled)


class ArraySupervisor(object):
    """Runs an array's tasks, at most max_parallel at once; records the array's end."""

    def __init__(self, array_dir, secrets):
        self.array_dir = array_dir
        self.array_id = os.path.basename(array_dir)
        self.job = read_json(os.path.join(array_dir, JOB_FILE))
        self.record = read_json(os.path.join(array_dir, STATUS_FILE))
        self.secrets = secrets or {}
        self.indexes = array_indexes(self.job)
        self.limit = self.job["array"].get("max_parallel") or os.cpu_count() or 1
        self.params = read_params(array_dir)
        self.kill_requested = False
        self.rows = None  # the array's manifest, read once for every task (see run)

    def run(self):
        """Start every task (or until killed), wait for them all, record the end."""
        from .queue import open_queue
        from .tasks import TaskBatch, TaskLoop

        for ignored in (signal.SIGHUP, signal.SIGINT):
            # A handler, not SIG_IGN: handlers are reset by exec, so tasks start with the
            # default dispositions.
            signal.signal(ignored, ignore_signal)
        loop = TaskLoop()  # before anything: it takes SIGTERM (a kill of the array)
        self.queue = open_queue(queue_root_of(self.array_dir), with_runner=False)
        self.record["supervisor"] = identify_process(os.getpid())
        self.save()
        become_subreaper()
        prepare_tasks()
        ensure_task_index(self.array_dir)  # once, before the first task (not at submit)
        intent = Intent(self.array_dir, ALL_TASKS).begin()  # for every task it runs
        try:
            self.rows = template_rows(self.array_dir)
        except (OSError, AgentError) as exc:  # each task lays out from the store, and says why
            sys.stderr.write("%s tej array: its manifest: %s\n" % (now_iso(), exc))
        batch = TaskBatch(self.array_dir)
        for index in self.indexes:
            while loop.active() >= self.limit and not loop.kill_all:
                loop.turn(block=True)
                batch.flush()
            if loop.kill_all:
                break
            task = self.start_task(index, batch)
            if task is not None:
                loop.add(task)
            loop.turn(block=False)
            batch.flush()
        while loop.active():
            loop.turn(block=True)
            batch.flush()
        batch.flush(force=True)
        intent.end()
        self.kill_requested = loop.kill_all
        self.finish()
        return 0

    def start_task(self, index, batch):
        """Reserve task index, lay it out and start it: its TaskRun (None if it was taken,
        or failed before it started: recorded)."""
        from .supervisor import record_supervisor_failure
        from .tasks import TaskRun

        row = self.params[index] if self.params is not None else None
        job = task_job(self.job, self.array_id, index, row)
        if self.record.get("state") != STATE_RUNNING:
            self.mark_running()
        record = dict(new_task_record(), id=job["id"], array_supervised=True)
        record["supervisor"] = self.record["supervisor"]
        task_dir = reserve_task(self.array_dir, job, record, held=True)
        if task_dir is None:
            return None
        try:
            lay_out_task(self.queue, self.array_dir, task_dir, self.rows)
        except Exception as exc:  # noqa: BLE001 - recorded as the task's failure
            sys.stderr.write("%s tej task %s: %s\n" % (now_iso(), job["id"], exc))
            record_supervisor_failure(task_dir, exc)
            return None
        task = TaskRun(task_dir, job, record, self.secrets, batch)
        task.start()
        return task

    def finish(self):
        """Record the array's end: its state, and the exit code of its first failure."""
        from .supervisor import tick_after_end

        end_record(self.array_dir, self.record, self.kill_requested)
        self.save()
        tick_after_end(self.array_dir)
        from .notify import send_notifications

        results = send_notifications(self.job, self.record, self.array_dir)
        if results:
            self.record["notifications"] = results
            self.save()

    def save(self):
        """Write the array's record (durably once it has ended)."""
        write_status(self.array_dir, self.record, self.record.get("state") in END_STATES)

    def mark_running(self):
        """The first task started: the array is running."""
        self.record.update(state=STATE_RUNNING, started_at=now_iso())
        self.save()


def prepare_tasks():
    """Load, before forking tasks, what each task's child needs besides the supervisor
    (imported above): the children inherit it instead of each importing it."""
    from . import store  # noqa: F401 - the checks and modes of a task's copies


def run_task(queue, array_dir, job, secrets, rows):
    """In a task's child: reserve its folder, lay it out (rows: its array's manifest, see
    lay_out_task), supervise it; an exit code."""
    from .supervisor import record_supervisor_failure

    holder = []  # type: list[TaskSupervisor]  # the task's supervisor, once made
    killed = []  # type: list[bool]

    def on_kill(_signum, _frame):
        killed.append(True)
        for supervisor in holder:
            supervisor.kill_requested = True

    signal.signal(signal.SIGTERM, on_kill)
    task_dir = reserve_task(array_dir, job, new_task_record())
    if task_dir is None:
        return TASK_TAKEN
    try:
        lay_out_task(queue, array_dir, task_dir, rows)
        supervisor = TaskSupervisor(task_dir, secrets)
    except Exception as exc:  # noqa: BLE001 - recorded as the task's failure
        sys.stderr.write("%s tej task %s: %s\n" % (now_iso(), job["id"], exc))
        record_supervisor_failure(task_dir, exc)
        return 1
    holder.append(supervisor)
    supervisor.kill_requested = bool(killed)
    return supervisor.run()


def supervise_task(array_dir, index):
    """Entry point of a task's supervisor started by a batch system (a Slurm array job's
    task): reserve the task, lay it out, supervise it; an exit code (0 for a task cancelled
    before it started: it never runs)."""
    from .queue import open_queue

    try:
        job = read_json(os.path.join(array_dir, JOB_FILE))
        if index not in set(array_indexes(job)):
            sys.stderr.write("%s tej: the array has no task %d\n" % (now_iso(), index))
            return 2
        params = read_params(array_dir)
        task = task_job(job, os.path.basename(array_dir), index, params and params[index])
        queue = open_queue(queue_root_of(array_dir), with_runner=False)
    except Exception as exc:  # noqa: BLE001 - logged in the batch job's output
        sys.stderr.write("%s tej task %d: %s\n" % (now_iso(), index, exc))
        return 1
    code = run_task(queue, array_dir, task, {}, None)
    return 0 if code == TASK_TAKEN else code


class TaskSupervisor(Supervisor):
    """A task's supervisor: a job's, whose records are all written without fsync.

    They are made durable before the array's end is recorded (arrays.end_record
    flushes the file system): a power cut while the array runs may lose the ends of
    tasks that had just ended, and they are then reported lost, as the tasks
    that were running are (docs/queue-format.md, Arrays).
    """

    def save(self):
        """Write the task's status record atomically (never durably: see the class)."""
        write_status(self.job_dir, self.record, False)
