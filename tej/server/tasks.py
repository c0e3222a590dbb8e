"""An array's tasks run by its own supervisor (default runner): no process of tej per task.

The array's supervisor (server/arraysup.py) reserves each task's folder, lays
its work/ out, and spawns its script itself (fork and exec, as a job's
supervisor does), in a session and process group of its own. One loop then
waits for them all: it reaps each script (wait4: its exit status and resource
use), enforces each task's max_runtime and kill grace, runs its retries, and
records its end. So a task costs a spawn and its files, not a Python process.

What a task's own supervisor did is done here, per task (``TaskRun``): its
records (never with fsync: arrays.end_record flushes the file system before the
array's end), its attempts, and its end. Its record names the array's
supervisor as its own, with ``"array_supervised": true``: `tej kill` of the task
creates its folder's TASK_KILL file and signals the array's supervisor with
SIGUSR1 (runners.kill_supervised), which kills that task only. The index's
intent of a task is held from its reservation to its end (one intent, not one
per record), and the rows of ended tasks are written in one segment per batch.
"""

import os
import select
import signal
import time

from ..protocol import (
    STATE_FINISHED,
    STATE_KILLED,
    STATE_RUNNING,
)
from .index import write_segment, write_status
from .layout import TASK_KILL
from .processes import group_exists, signal_group
from .processes import spawn_script as spawn_task
from .retries import close_attempt, next_retry
from .supervisor import (  # RUNNING_AFTER: a task too is recorded running once it ran that long
    RUNNING_AFTER,
    Supervisor,
    exit_code_fields,
    ignore_signal,
    rotate_outputs,
)
from .usage import SOURCE_TEJ, usage_figures

ROWS_FLUSH = 2.0  # at most this many seconds between two segments of ended tasks' rows


class TaskBatch(object):
    """What the array's supervisor keeps across its tasks' records: the rows of ended tasks,
    written as one segment per batch (index.write_status's batch)."""

    def __init__(self, array_dir):
        self.array_dir = array_dir
        self.rows = []  # type: list[str]  # segment lines of tasks that ended since the last
        self.flushed = time.time()

    def flush(self, force=False):
        """Write the rows collected as one segment (if any, and if it is time or forced)."""
        if self.rows and (force or time.time() - self.flushed >= ROWS_FLUSH):
            write_segment(self.array_dir, self.rows)
            self.rows = []
            self.flushed = time.time()


class TaskRun(Supervisor):
    """One task run by its array's supervisor: its attempts, limits and records, driven by
    the supervisor's loop (TaskLoop) rather than by a process of its own."""

    def __init__(self, task_dir, job, record, secrets, batch):
        # Not Supervisor.__init__: the job and record are known, nothing is read again.
        self.job_dir = task_dir
        self.job = job
        self.record = record
        self.grace = max(float(job.get("kill_grace", 5.0)), 0.001)
        self.pgid = None
        self.kill_requested = False
        self.timed_out = False
        self.alarm_phase = None
        self.secrets = secrets
        self.batch = batch
        self.ended = False  # whether its end is recorded
        self.pid = None  # the script's, while it runs
        self.deadline = None  # when this task must be looked at again (time limit, grace, retry)
        self.usage = {"max_rss": 0, "cpu_user": 0.0, "cpu_system": 0.0}
        self.filed_pid = None  # type: int | None  # the pid TaskLoop files it under
        self.ran = False  # whether an attempt's script was spawned
        self.spawned = None  # type: float | None  # when, while its running record is unwritten

    def start(self):
        """Start the task's next attempt (or record its end if it can't start)."""
        rotate_outputs(self.job_dir, self.job, len(self.record.get("attempts") or []))
        self.timed_out = False
        proc = self.launch()
        if proc is None:  # it could not start: exit code 126 or 127, recorded by launch
            self.attempt_ended(STATE_FINISHED)
            return
        self.pid = proc
        self.alarm_phase = None
        self.deadline = None
        limit = self.job.get("max_runtime")
        if self.kill_requested:
            self.terminate()
        elif limit:
            self.alarm_phase = "runtime"
            self.deadline = time.time() + float(limit)

    def launch(self):
        """Spawn the script (Supervisor.launch's), without recording it running yet: see
        note_running. None if it could not start (recorded)."""
        from .files import now_iso

        started_at = now_iso()  # before the spawn: the job may be at work before it returns
        pid = self.open_and_start()
        if pid is None:
            return None
        self.pgid = pid
        self.record.update(state=STATE_RUNNING, job={"pid": pid, "start": False})
        self.record["job"]["boot"] = self.record["supervisor"].get("boot")
        self.start_attempt(started_at)
        self.ran, self.spawned = True, time.time()
        return pid

    @staticmethod
    def spawn(argv, cwd, env, out, err):
        """Start argv as Supervisor.spawn does, with posix_spawn (no fork of this process,
        whose memory grows with the array); its pid."""
        return spawn_task(argv, cwd, env, out, err)

    def note_running(self):
        """Record the task running, once it has run for RUNNING_AFTER seconds: a task that
        ends sooner goes from starting to its end, one record fewer (its script's start
        time, read from /proc, is then not known: it was reaped)."""
        from .processes import process_start

        self.spawned = None
        start = process_start(self.pid)
        if start is False:
            return  # it has just ended: its end is recorded once it is reaped
        self.record["job"]["start"] = start
        self.save()

    def terminate(self):
        """SIGTERM the task's process group now; SIGKILL when its grace period ends."""
        signal_group(self.pgid, signal.SIGTERM)
        self.alarm_phase = "grace"
        self.deadline = time.time() + self.grace

    def request_kill(self):
        """`tej kill` of the task (or of its array): terminate it, or end it if it waits."""
        if self.kill_requested or self.ended:
            return
        self.kill_requested = True
        if self.pgid is not None:
            if self.alarm_phase != "grace":
                self.terminate()
        elif self.pid is None:  # waiting to retry
            self.record.pop("retry_at", None)
            self.end(STATE_KILLED, reason=self.cancelled_reason())

    def on_time(self):
        """Its deadline has come: time limit, end of the grace period, or a retry's time."""
        self.deadline = None
        if self.alarm_phase == "runtime":
            self.timed_out = True
            self.terminate()
        elif self.alarm_phase == "grace":
            signal_group(self.pgid, signal.SIGKILL)
            self.alarm_phase = "killed"
        elif self.pid is None and self.pgid is None:  # a retry's time
            self.record.pop("retry_at", None)
            self.start()

    def reaped(self, wait_status, rusage):
        """Its script ended: note its use; the attempt ends once its group is empty."""
        self.pid = None
        used = usage_figures(rusage)
        self.usage["max_rss"] = max(self.usage["max_rss"], used["max_rss"])
        self.usage["cpu_user"] += used["cpu_user"]
        self.usage["cpu_system"] += used["cpu_system"]
        self.record.update(exit_code_fields(wait_status))
        if group_exists(self.pgid):  # what it left running: SIGTERM, then SIGKILL after grace
            if self.alarm_phase not in ("grace", "killed"):
                self.terminate()
            return
        self.group_empty()

    def group_empty(self):
        """The script and everything left in its group are gone: the attempt has ended."""
        self.pgid, self.alarm_phase, self.deadline = None, None, None
        self.attempt_ended(self.end_state())

    def attempt_ended(self, state):
        """Close the attempt; run it again later (retries), or record the task's end."""
        close_attempt(self.record, state)
        delay = next_retry(self.job, self.record["attempts"], state, self.record.get("exit_code"))
        if delay is None or self.kill_requested:
            if self.ran:  # it ran (a script that could not start didn't)
                self.record["resources"] = dict(
                    max_rss=self.usage["max_rss"],
                    cpu_user=round(self.usage["cpu_user"], 3),
                    cpu_system=round(self.usage["cpu_system"], 3),
                    source=SOURCE_TEJ,
                )
            self.end(state)
            return
        self.record.update(state=STATE_RUNNING, retry_at=time.time() + delay)
        self.save()
        self.deadline = self.record["retry_at"]

    def end(self, state, reason=None):
        """Record the task's end (its row goes in the batch's next segment); let go of it."""
        from .files import now_iso

        self.record.update(state=state, ended_at=now_iso())
        if reason:
            self.record["reason"] = reason
        self.save()
        self.deadline = None
        self.ended = True

    def save(self):
        """Write the task's record: never durably (see the module), its intent held."""
        write_status(self.job_dir, self.record, False, self.batch)


class TaskLoop(object):
    """The array's supervisor's wait for its tasks: reaping, deadlines, kill requests.

    Signals (SIGCHLD, SIGTERM, SIGUSR1) only set flags, and wake it through
    signal.set_wakeup_fd: the loop acts on them between its steps.
    """

    def __init__(self):
        self.tasks = {}  # type: dict[int, TaskRun]  # running: by the pid of their script
        self.waiting = set()  # type: set[TaskRun]  # between attempts, or their group draining
        self.kill_all = False  # the array's kill was requested (SIGTERM)
        self.killed_all = False  # and passed on to every task
        self.look_for_kills = False  # a task's kill was requested (SIGUSR1)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.wakeup = read_fd
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, ignore_signal)
        signal.signal(signal.SIGUSR1, self.on_task_kill)
        signal.signal(signal.SIGTERM, self.on_array_kill)

    def active(self):
        """How many tasks have not ended yet."""
        return len(self.tasks) + len(self.waiting)

    def everyone(self):
        """The tasks that have not ended."""
        return list(self.tasks.values()) + list(self.waiting)

    def follow(self, task):
        """File a task by what it waits for (its script's end, or time); drop it once ended."""
        self.waiting.discard(task)
        filed = task.filed_pid
        if filed is not None and self.tasks.get(filed) is task:
            del self.tasks[filed]
        task.filed_pid = task.pid
        if task.pid is not None:
            self.tasks[task.pid] = task
        elif not task.ended:
            self.waiting.add(task)

    def add(self, task):
        """A task was just started (or ended at once, if its script could not start)."""
        if self.killed_all:
            task.request_kill()
        self.follow(task)

    def on_task_kill(self, _signum, _frame):
        """SIGUSR1: a task's kill was requested (its folder has TASK_KILL)."""
        self.look_for_kills = True

    def on_array_kill(self, _signum, _frame):
        """SIGTERM from `tej kill` of the array: no task starts any more, every task is killed."""
        self.kill_all = True

    def turn(self, block):
        """Reap what ended, act on kills and deadlines; wait first for something to happen
        if block (at most until the next deadline)."""
        if block:
            self.sleep()
        if self.kill_all and not self.killed_all:
            self.killed_all = True
            for task in self.everyone():
                task.request_kill()
                self.follow(task)
        if self.look_for_kills:
            self.look_for_kills = False
            for task in self.everyone():
                if os.path.lexists(os.path.join(task.job_dir, TASK_KILL)):
                    task.request_kill()
                    self.follow(task)
        self.reap()
        now = time.time()
        for task in list(self.tasks.values()):
            if task.spawned is not None and task.spawned + RUNNING_AFTER <= now:
                task.note_running()
        due = [task for task in self.tasks.values() if task.deadline and task.deadline <= now]
        for task in due + list(self.waiting):
            if task.pgid is not None and task.pid is None and not group_exists(task.pgid):
                task.group_empty()
            elif task.deadline is not None and task.deadline <= now:
                task.on_time()
            self.follow(task)

    def sleep(self):
        """Wait for a signal (SIGCHLD...) or the next deadline."""
        deadlines = [task.deadline for task in self.everyone() if task.deadline]
        deadlines += [task.spawned + RUNNING_AFTER for task in self.tasks.values() if task.spawned]
        timeout = max(min(deadlines) - time.time(), 0) if deadlines else None
        if any(task.pid is None and task.pgid is not None for task in self.waiting):
            timeout = 0.02 if timeout is None else min(timeout, 0.02)  # a group draining
        try:
            select.select([self.wakeup], [], [], timeout)
            os.read(self.wakeup, 4096)
        except (BlockingIOError, InterruptedError):
            pass

    def reap(self):
        """Reap every child that ended: tasks' scripts, and orphans adopted (ignored)."""
        while True:
            try:
                pid, wait_status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.tasks.get(pid)
            if task is not None:
                task.reaped(wait_status, rusage)
                self.follow(task)
