"""The Slurm runner's arrays: one Slurm array job (sbatch --array) per tej array.

Task N of the array is Slurm's ``ID_N``; its batch script reserves, lays out
and supervises the task (``supervise-task ARRAYDIR N``), so a task is
supervised as a job is. The array's own record is kept by its tasks
(arrays.note_task_change); once Slurm lists none of its tasks, those that
never said how they ended get their end from Slurm, and so does the array,
as does an array recorded finished of which Slurm ended a task itself.
Standard library only, Python 3.8 and newer, as slurm.py.
"""

import os
import time
from typing import Any  # noqa: F401 - for the type comments

from ...protocol import END_STATES


class SlurmArrays(object):
    """The Slurm runner's methods for arrays (a base of slurm.Runner)."""

    # slurm.Runner's, as are query and refresh:
    host = None  # type: Any
    queried_at = None  # type: float | None
    poll_interval = 0.25

    def query(self):
        """The user's active Slurm jobs (slurm.Runner's)."""
        raise NotImplementedError

    def refresh(self, job_id, job_dir, record):
        """A job's record (slurm.Runner's)."""
        raise NotImplementedError

    def prepare(self, job, record):
        """An array's first record: its tasks keep it (see arrays.note_task_change)."""
        if job.get("array") is not None:
            record = dict(record, kept_by_tasks=True)
        return record

    def slurm_id(self, job_dir, data=None):
        """A job's Slurm id (runner.json); a task's is its array's, then _N."""
        from ..index import is_task_dir

        data = self.host.read_data(job_dir) if data is None else data
        if data.get("slurm_id") or not is_task_dir(job_dir):
            return data.get("slurm_id")
        array_id = self.host.read_data(os.path.dirname(os.path.dirname(job_dir))).get("slurm_id")
        return array_id and "%s_%s" % (array_id, os.path.basename(job_dir))

    def task_cancelled(self, task_dir):
        """A task killed before it started: its Slurm task is cancelled too (else, when it
        runs, it finds the task taken and exits at once)."""
        from .slurm import run_command

        slurm_id = self.slurm_id(task_dir)
        if slurm_id:
            self.host.write_data(task_dir, dict(self.host.read_data(task_dir), killed_by_tej=True))
            run_command(["scancel", slurm_id])

    def array_in_slurm(self, slurm_id):
        """The states of an array's tasks squeue lists (pending ranges as ID_[0-9%2]),
        or None if squeue fails."""
        active = self.query()
        if active is None:
            return None
        prefix = slurm_id + "_"
        return [state for key, (state, _) in active.items() if key.startswith(prefix)]

    def refresh_array(self, array_dir, record):
        """An array's record: its tasks keep it; once Slurm lists none of them, those that
        never said how they ended get their end from Slurm, then the array's is recorded
        (tasks that never started were cancelled in Slurm)."""
        from ..arrays import settle_array
        from .slurm import STATES

        data = self.host.read_data(array_dir)
        slurm_id = data.get("slurm_id")
        if not slurm_id:
            return record
        if record.get("state") in END_STATES:
            return self.with_array_slurm_end(array_dir, record, data)
        listed = self.array_in_slurm(slurm_id)
        if listed is None:
            return dict(record, reason="Slurm does not answer (squeue failed)")
        if listed:
            running = any(STATES.get(state) == "running" for state in listed)
            if record.get("state") == "queued" and running:
                return dict(record, state="running")  # its first task will say so
            return record
        self.settle_tasks(array_dir)
        latest = settle_array(array_dir, self.host.read_record(array_dir) or record)
        if latest.get("state") not in END_STATES:  # tasks Slurm ended before they started
            latest = settle_array(array_dir, dict(latest, kill_requested=True))
        return self.with_array_slurm_end(array_dir, latest, data)

    def with_array_slurm_end(self, array_dir, record, data):
        """An ended array's record, as Slurm ended it if it ended one of its started tasks
        itself (``scancel`` of the array outside tej, preemption, a time limit): its tasks'
        supervisors record each such end, but the array's, kept by its tasks, would say
        finished. Its first such task's state (killed or timed_out) becomes the array's,
        reason "Slurm: STATE"; tasks tej killed (runner.json's killed_by_tej) don't count.
        Slurm is asked once the array has left squeue, and its answer kept (slurm_state:
        that task's state, else the first task's)."""
        from .slurm import SLURM_ENDS, STATES, slurm_ended

        slurm_id = data.get("slurm_id")
        if record.get("state") != "finished" or data.get("slurm_state"):
            return record
        if self.array_in_slurm(slurm_id) != []:
            return record  # squeue failed, or the last supervisors are finishing
        ended = self.array_final_states(slurm_id)
        if ended is None:
            return record  # Slurm can't be asked now: next time
        by_slurm = [
            state
            for index, state in sorted(ended.items())
            if STATES.get(state) in SLURM_ENDS and not self.killed_by_tej(array_dir, index)
        ]
        if by_slurm:
            record = slurm_ended(record, STATES[by_slurm[0]], "Slurm: %s" % by_slurm[0])
            self.host.write_record(array_dir, record)
        first = by_slurm[0] if by_slurm else ended[min(ended)] if ended else "UNKNOWN"
        self.host.write_data(array_dir, dict(data, slurm_state=first))
        return record

    def killed_by_tej(self, array_dir, index):
        """Whether tej killed an array's task N (its runner.json says so)."""
        task_dir = os.path.join(array_dir, "jobs", str(index))
        return bool(self.host.read_data(task_dir).get("killed_by_tej"))

    def array_final_states(self, slurm_id):
        """{task index: Slurm state} of an ended array's tasks, from ``scontrol show job``
        (or sacct, once the controller forgot them); {} if Slurm knows none, None if it
        can't be asked now."""
        from .slurm import run_command

        proc = run_command(["scontrol", "show", "job", "-o", slurm_id])
        if proc is not None and proc.returncode == 0:
            states = {}
            for line in proc.stdout.splitlines():
                fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
                if fields.get("ArrayTaskId", "").isdigit() and fields.get("JobState"):
                    states[int(fields["ArrayTaskId"])] = fields["JobState"]
            if states:
                return states
        forgotten = proc is not None and "Invalid job id" in (proc.stderr or "")
        argv = ["sacct", "-n", "-P", "-X", "-j", slurm_id, "-o", "JobID,State"]
        proc = run_command(argv)
        if proc is None or proc.returncode != 0:
            return {} if forgotten else None
        states = {}
        for line in proc.stdout.splitlines():
            job, _, state = line.partition("|")
            index = job.rpartition("_")[2]
            if job.startswith(slurm_id + "_") and index.isdigit() and state.split():
                states[int(index)] = state.split()[0]
        return states if states or forgotten else None

    def settle_tasks(self, array_dir):
        """Record how Slurm ended the tasks of an array that never said so themselves."""
        from ..index import ids_in

        for state in self.host.ACTIVE_STATES:
            for name in ids_in(array_dir, state):
                task_dir = os.path.join(array_dir, "jobs", name)
                task = self.host.read_record(task_dir)
                if task is not None and task.get("state") not in END_STATES:
                    self.refresh(name, task_dir, task)

    def kill_array(self, array_dir, record, grace):
        """Kill an array: its pending tasks are cancelled, its running ones asked to end
        through their supervisors (kill_grace), then cancelled if they don't."""
        from .slurm import run_command

        slurm_id = self.host.read_data(array_dir).get("slurm_id")
        if not slurm_id or record.get("state") in END_STATES:
            return False, record
        record = dict(self.host.read_record(array_dir) or record, kill_requested=True)
        self.host.write_record(array_dir, record)
        deadline = time.time() + min(grace + 10, 30.0)
        run_command(["scancel", "--state=PENDING", slurm_id])
        run_command(["scancel", "--batch", "--signal=TERM", slurm_id])
        for stop, end in ((None, deadline - 5), (["scancel", slurm_id], deadline)):
            if stop is not None:
                run_command(stop)
            while time.time() < end:
                self.queried_at = None
                if self.array_in_slurm(slurm_id) == []:
                    break
                time.sleep(self.poll_interval)
        record = self.refresh_array(array_dir, self.host.read_record(array_dir) or record)
        return record.get("state") in ("killed", "cancelled"), record
