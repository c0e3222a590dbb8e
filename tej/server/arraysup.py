"""The supervisor of an array under the default runner: one process for all its tasks.

It starts tasks up to the array's %N (without one, the server's CPU count) by
forking a child per task (no exec: a new Python per task would be far too
slow), which reserves the task's folder, lays its work/ out and runs the
task's own Supervisor; it reaps them, and starts the next. `tej kill` of a
task signals that task's supervisor (its child); `tej kill` of the array
signals this one: it starts no more tasks (those left are cancelled: they
never get a folder) and passes the kill on to the running tasks.
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
from .index import write_status
from .layout import JOB_FILE, STATUS_FILE, queue_root_of
from .processes import identify_process
from .supervisor import Supervisor
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
        self.running = {}  # type: dict[int, int]  # child pid -> task index
        self.kill_requested = False
        self.rows = None  # the array's manifest, read once for every task (see run)

    def run(self):
        """Start every task (or until killed), wait for them all, record the end."""
        from .launch import prepare_fork
        from .queue import open_queue

        signal.signal(signal.SIGTERM, self.on_kill_request)
        for ignored in (signal.SIGHUP, signal.SIGINT):
            signal.signal(ignored, signal.SIG_IGN)
        self.queue = open_queue(queue_root_of(self.array_dir), with_runner=False)
        self.record["supervisor"] = identify_process(os.getpid())
        self.save()
        prepare_fork()
        prepare_tasks()
        ensure_task_index(self.array_dir)  # once, before the first task (not at submit)
        try:
            self.rows = template_rows(self.array_dir)
        except (OSError, AgentError) as exc:  # each task lays out from the store, and says why
            sys.stderr.write("%s tej array: its manifest: %s\n" % (now_iso(), exc))
        for index in self.indexes:
            while len(self.running) >= self.limit and not self.kill_requested:
                self.reap(0)
            if self.kill_requested:
                break
            self.start_task(index)
            while self.running and self.reap(os.WNOHANG):
                pass
        while self.running:
            self.reap(0)
        self.finish()
        return 0

    def start_task(self, index):
        """Fork the child that starts task index."""
        row = self.params[index] if self.params is not None else None
        job = task_job(self.job, self.array_id, index, row)
        if self.record.get("state") != STATE_RUNNING:
            self.mark_running()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_task(self.queue, self.array_dir, job, self.secrets, self.rows)
            except BaseException as exc:  # noqa: BLE001 - the child must never return
                try:
                    os.write(2, ("%s tej task %d: %s\n" % (now_iso(), index, exc)).encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        self.running[pid] = index
        if self.kill_requested:  # came between the fork and now: pass it on
            signal_task(pid)

    def reap(self, options):
        """Reap one ended task child (options: os.WNOHANG not to wait); whether one was."""
        try:
            pid, _wait_status = os.waitpid(-1, options)
        except ChildProcessError:
            self.running.clear()
            return False
        if pid == 0:
            return False
        self.running.pop(pid, None)
        return True

    def on_kill_request(self, _signum, _frame):
        """SIGTERM from `tej kill`: start no more tasks, kill the running ones."""
        self.kill_requested = True
        for pid in list(self.running):
            signal_task(pid)

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


def signal_task(pid):
    """Pass a kill on to a task's child (its supervisor, once it runs)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


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
