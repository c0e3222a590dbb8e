"""tej's Slurm runner: each job goes to Slurm through sbatch.

This module runs on the server, inside tej's agent and supervisors (see
docs/runners.md): standard library only, Python 3.8 and newer. Slurm's
commands are run with argument lists, never through a shell.

The job's batch script is tej's own supervisor (a few lines of Python that
import the agent's copy in the queue), so a job under Slurm is supervised as
under the default runner: its exit code, max_runtime, kill_grace, outputs
and notifications behave the same. Slurm says when and where it runs:
squeue while it is pending or running, ``scontrol show job`` (or sacct, with
accounting) once it has ended without its supervisor saying so.

Slurm signals the processes of a job it ends itself (scancel, preemption, its
memory or time limit) one by one: the script may die of Slurm's signal before
the supervisor hears its own, and the supervisor then records the job finished
by a signal tej did not send. Slurm is asked about such a job (and only such:
one that exited with an exit code is never changed) once it has left squeue,
and its answer kept (runner.json's slurm_state): if Slurm ended it, the job
becomes killed or timed_out as below, reason "Slurm: STATE", with its exit
code and signal.

Slurm states, and what tej shows:

* PENDING, CONFIGURING, REQUEUED, REQUEUE_HOLD, REQUEUE_FED, RESV_DEL_HOLD:
  queued (with Slurm's reason);
* RUNNING, COMPLETING, SUSPENDED, STOPPED, SIGNALING, STAGE_OUT, RESIZING:
  running;
* COMPLETED, FAILED, SPECIAL_EXIT: finished, with the exit code;
* CANCELLED, PREEMPTED, OUT_OF_MEMORY: killed (with the reason);
* TIMEOUT, DEADLINE: timed_out;
* NODE_FAIL, BOOT_FAIL: lost; REVOKED: cancelled.
"""

import math
import os
import re
import signal
import time

from ...protocol import END_STATES, parse_duration
from .slurmarrays import SlurmArrays

# subprocess is imported where Slurm's commands are run: the client and the agent
# load this module to check a job's fields.

STATES = {
    "PENDING": "queued",
    "CONFIGURING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "RESV_DEL_HOLD": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "STOPPED": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "RESIZING": "running",
    "COMPLETED": "finished",
    "FAILED": "finished",
    "SPECIAL_EXIT": "finished",
    "CANCELLED": "killed",
    "PREEMPTED": "killed",
    "OUT_OF_MEMORY": "killed",
    "TIMEOUT": "timed_out",
    "DEADLINE": "timed_out",
    "NODE_FAIL": "lost",
    "BOOT_FAIL": "lost",
    "REVOKED": "cancelled",
}
#: How Slurm ends a job itself (scancel, preemption, its memory or time limit): the tej
#: states of those Slurm states, which say how a job ended that its supervisor saw end by
#: a signal tej did not send (see Runner.with_slurm_end).
SLURM_ENDS = ("killed", "timed_out")
SETTINGS = ("partition", "account", "qos")
#: tej.json "slurm" fields given as text, and the sbatch option each becomes.
TEXT_OPTIONS = {
    "partition": "--partition",
    "memory": "--mem",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
}
#: tej.json "slurm" fields given as counts, and the sbatch option each becomes.
COUNT_OPTIONS = {"cpus": "--cpus-per-task", "nodes": "--nodes", "gpus": "--gpus"}
#: The job fields this runner owns: tej.json's "slurm" object of sbatch settings.
JOB_FIELDS = ("slurm",)
SLURM_FIELDS = ("time", "extra_args") + tuple(sorted(TEXT_OPTIONS)) + tuple(sorted(COUNT_OPTIONS))
#: sacct's figures of a job's resource use: MaxRSS on its steps, CPU on the job.
ACCOUNTING_FIELDS = "JobID,State,MaxRSS,UserCPU,SystemCPU"
ACCOUNTING_WAIT = 300.0  # seconds after its end that a job's figures may take to reach sacct
SIZE_UNITS = "KMGTPE"
COMMAND_TIMEOUT = 60.0
QUERY_CACHE = 0.5  # seconds a squeue answer is reused for
BATCH_SCRIPT = "slurm-batch.py"


def configure(options):
    """Check the queue's settings (defaults for every job); ValueError if bad."""
    unknown = sorted(set(options) - set(SETTINGS))
    if unknown:
        raise ValueError(
            "unknown option %r (this runner takes %s)" % (unknown[0], ", ".join(SETTINGS))
        )
    for key, value in options.items():
        if not value.strip() or "\0" in value:
            raise ValueError("%s can't be empty" % key)
    if run_command(["sbatch", "--version"]) is None:
        raise ValueError("sbatch is not available on this server (is Slurm's client installed?)")
    return dict(options)


def check_fields(job):
    """This runner's fields of a job (its "slurm" settings), checked and normalized.

    ValueError if one is bad. A duration in "time" may be a text ("2h").
    """
    value = job.get("slurm")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError('slurm must be an object of sbatch settings, such as {"cpus": 4}')
    return {"slurm": dict((key, check_setting(key, item)) for key, item in value.items())}


def check_setting(key, value):
    """One sbatch setting of a job, checked and normalized; ValueError if it is bad."""
    if key == "time":
        return parse_duration(value, "slurm.time")
    if key in COUNT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("slurm.%s must be a positive whole number" % key)
        return value
    if key == "extra_args":
        if not isinstance(value, list) or not all(isinstance(arg, str) for arg in value):
            raise ValueError("slurm.extra_args must be a list of strings")
        if any("\0" in arg for arg in value):
            raise ValueError("slurm.extra_args can't contain NUL characters")
        if any(not arg.startswith("-") for arg in value):
            raise ValueError("slurm.extra_args must be sbatch options, such as --exclusive")
        return list(value)
    if key in TEXT_OPTIONS:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise ValueError("slurm.%s must be a non-empty string" % key)
        return value
    import difflib

    close = difflib.get_close_matches(str(key), SLURM_FIELDS, n=1)
    hint = " (did you mean %r?)" % close[0] if close else ""
    raise ValueError("Unknown key %r in slurm%s" % (key, hint))


def run_command(argv):
    """Run a Slurm command; its CompletedProcess (text), or None if it can't be run."""
    import subprocess

    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def last_line(proc):
    """The last line a failed command printed, for an error message."""
    if proc is None:
        return "could not run it"
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else "exit code %d" % proc.returncode


def time_limit(seconds):
    """An sbatch --time value (whole minutes, rounded up; at least one)."""
    return str(max(1, math.ceil(seconds / 60.0)))


def exit_fields(text):
    """tej's exit_code and signal from Slurm's ExitCode ("3:0", "0:15")."""
    match = re.match(r"(\d+):(\d+)\Z", text or "")
    if not match:
        return {}
    code, signum = int(match.group(1)), int(match.group(2))
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "SIG%d" % signum
        return {"exit_code": 128 + signum, "signal": name}
    return {"exit_code": code}


def sacct_seconds(text):
    """Seconds from a sacct CPU time: [D-][HH:]MM:SS[.fff] ("00:00.004", "1-02:03:04")."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not 2 <= len(parts) <= 3:
        raise ValueError("not a sacct time: %r" % text)
    hours = int(parts[0]) if len(parts) == 3 else 0
    return ((int(days or 0) * 24 + hours) * 60 + int(parts[-2])) * 60 + float(parts[-1])


def sacct_bytes(text):
    """Bytes from a sacct size: "3268572K", "1.50G", "0" (no unit: bytes)."""
    match = re.match(r"(\d+(?:\.\d+)?)([%s]?)\Z" % SIZE_UNITS, text.strip())
    if not match:
        raise ValueError("not a sacct size: %r" % text)
    power = SIZE_UNITS.index(match.group(2)) + 1 if match.group(2) else 0
    return int(float(match.group(1)) * 1024**power)


def parse_accounting(text, slurm_id):
    """A job's resource use from `sacct -n -P -o ACCOUNTING_FIELDS` lines, or None.

    None if sacct has no figures for it (yet): no line, or still running, or
    no MaxRSS (no accounting of memory). Peak memory is the largest of its
    steps' MaxRSS; CPU times are the job's line (the sum of its steps).
    """
    rows = [line.split("|") for line in text.splitlines()]
    job = [row for row in rows if len(row) == 5 and row[0] == slurm_id]
    steps = [row for row in rows if len(row) == 5 and row[0].startswith(slurm_id + ".")]
    if not job or STATES.get(job[0][1].split(" ")[0]) not in END_STATES:
        return None
    try:
        peak = max([sacct_bytes(row[2]) for row in steps + job if row[2].strip()] or [-1])
        user, system = sacct_seconds(job[0][3]), sacct_seconds(job[0][4])
    except ValueError:
        return None
    if peak < 0:
        return None
    return {"max_rss": peak, "cpu_user": user, "cpu_system": system, "source": "slurm"}


def slurm_ended(record, state, reason):
    """A job's record, and its last attempt, ended as state for reason (as Slurm ended it);
    its exit code and signal stay."""
    record = dict(record, state=state, reason=reason)
    attempts = [dict(attempt) for attempt in record.get("attempts") or []]
    if attempts:
        attempts[-1].update(state=state, reason=reason)
        record["attempts"] = attempts
    return record


def retries_time(job, per_attempt):
    """The longest a job's attempts take, with the delays between them (see retries)."""
    policy = job.get("retries") or {}
    tries = 1 + int(policy.get("max") or 0)
    delay, backoff = float(policy.get("delay") or 0), float(policy.get("backoff") or 1)
    return tries * per_attempt + sum(delay * backoff**retry for retry in range(tries - 1))


class Runner(SlurmArrays):
    """Submits jobs with sbatch and follows them with squeue and scontrol."""

    name = "slurm"
    job_fields = JOB_FIELDS
    initial_state = "queued"
    takes_secrets = False
    poll_interval = 0.25
    supports_arrays = True  # one sbatch --array for the whole array

    def __init__(self, host):
        self.host = host
        self.queried_at = None
        self.active = {}

    # the interface

    def check_job(self, job):
        """Refuse sbatch settings that aren't right (the client checks them too)."""
        try:
            check_fields(job)
        except ValueError as exc:
            raise self.host.invalid(str(exc))

    def submit(self, job_id, job_dir, job, secrets):
        """Hand the job to Slurm; its batch script is the job's supervisor.

        An array is one sbatch --array=SPEC%N, whose task N's batch script reserves,
        lays out and supervises task N.
        """
        script = self.write_batch_script(job_dir, job.get("array") is not None)
        argv = self.sbatch_command(job_id, job_dir, job, script)
        if job.get("array") is not None:
            spec, parallel = job["array"]["indexes"], job["array"].get("max_parallel")
            argv.insert(1, "--array=%s%s" % (spec, "%%%d" % parallel if parallel else ""))
        record = self.host.read_record(job_dir) or {}
        start_time = max(record.get("start_time") or 0, record.get("retry_at") or 0)
        if start_time:  # Slurm holds it until then, not the supervisor on a node
            argv.insert(1, "--begin=now+%d" % max(0, math.ceil(start_time - time.time())))
        proc = run_command(argv)
        if proc is None or proc.returncode != 0:
            raise self.host.failure("sbatch failed: %s" % last_line(proc))
        slurm_id = proc.stdout.strip().split(";")[0]
        if not slurm_id.isdigit():
            raise self.host.failure("sbatch gave no job id: %r" % proc.stdout.strip())
        self.host.write_data(job_dir, {"slurm_id": slurm_id})

    def refresh(self, job_id, job_dir, record):
        """The job's record, from its supervisor's reports and from Slurm."""
        if record.get("kept_by_tasks"):
            return self.refresh_array(job_dir, record)
        if record.get("state") in END_STATES:
            return self.after_end(job_dir, record)
        slurm_id = self.slurm_id(job_dir)
        if not slurm_id:
            return record  # being submitted
        active = self.query()
        if active is None:
            return dict(record, reason="Slurm does not answer (squeue failed)")
        if slurm_id in active:
            return self.while_active(record, *active[slurm_id])
        # Ended: its supervisor may have said how; otherwise ask Slurm.
        latest = self.host.read_record(job_dir) or record
        if latest.get("state") not in END_STATES:
            latest = self.record_end(job_dir, slurm_id, latest)
            if latest.get("state") == "lost" and "_" not in slurm_id:  # not a task
                latest = self.retry_lost(job_id, job_dir, slurm_id, latest)
        return self.after_end(job_dir, latest) if latest.get("state") in END_STATES else latest

    def refresh_many(self, jobs):
        """The records of several jobs, with one squeue for all."""
        self.queried_at = None
        return [self.refresh(*job) for job in jobs]

    def kill(self, job_id, job_dir, record, grace):
        """Cancel a pending job; ask a running job's supervisor to kill it (kill_grace)."""
        if record.get("kept_by_tasks"):
            return self.kill_array(job_dir, record, grace)
        slurm_id = self.slurm_id(job_dir)
        record = self.refresh(job_id, job_dir, record)
        if not slurm_id or record.get("state") in END_STATES:
            return False, record
        self.host.write_data(job_dir, dict(self.host.read_data(job_dir), killed_by_tej=True))
        deadline = time.time() + min(grace + 10, 30.0)
        if record.get("supervisor") and record.get("state") == "running":
            run_command(["scancel", "--batch", "--signal=TERM", slurm_id])
            record = self.wait_for_end(job_id, job_dir, record, deadline - 5)
        if record.get("state") not in END_STATES:
            run_command(["scancel", slurm_id])
            record = self.wait_for_end(job_id, job_dir, record, deadline)
        return record.get("state") == "killed", record

    # Slurm's view

    def query(self):
        """The user's active Slurm jobs: id -> (state, reason); None if squeue fails."""
        if self.queried_at is not None and time.time() - self.queried_at < QUERY_CACHE:
            return self.active
        proc = run_command(["squeue", "-h", "-u", str(os.getuid()), "-o", "%i|%T|%r"])
        if proc is None or proc.returncode != 0:
            return None
        active = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                active[parts[0]] = (parts[1], parts[2])
        self.active, self.queried_at = active, time.time()
        return active

    def while_active(self, record, slurm_state, reason):
        """A pending or running job's record, as Slurm sees it."""
        state = STATES.get(slurm_state, "running")
        if state == "queued":
            why = "" if reason in ("None", "") else ", %s" % reason
            return dict(record, state="queued", reason="Slurm: %s%s" % (slurm_state, why))
        if record.get("state") == "queued":  # started; its supervisor will say so
            return dict(record, state="running", reason=None)
        return record

    def record_end(self, job_dir, slurm_id, record):
        """Ask Slurm how an ended job ended, and record it for good."""
        ended = self.final_state(slurm_id)
        if ended is None:
            return dict(record, reason="Slurm has no record of job %s yet" % slurm_id)
        slurm_state, exit_code = ended
        state = STATES.get(slurm_state, "lost")
        if state not in END_STATES:  # squeue missed it between two states
            return record
        if state == "finished" and record.get("supervisor"):
            state = "lost"  # the batch script ended, yet its supervisor never said how
        record = dict(record, state=state, ended_at=self.host.now())
        record.update(exit_fields(exit_code))
        if slurm_state == "UNKNOWN":
            record["reason"] = "Slurm no longer knows job %s" % slurm_id
        elif state == "lost" and slurm_state in ("COMPLETED", "FAILED"):
            record["reason"] = "its supervisor died (Slurm: %s, exit code %s)" % (
                slurm_state,
                exit_code or "?",
            )
        elif state == "killed" and not record.get("started_at"):
            record["reason"] = "cancelled before it started"
        elif slurm_state not in ("COMPLETED", "FAILED"):
            record["reason"] = "Slurm: %s" % slurm_state
        self.host.write_record(job_dir, record)
        return record

    def retry_lost(self, job_id, job_dir, slurm_id, record):
        """A lost job's record, or, if its retries include "lost", that of its new attempt:
        given to Slurm again with sbatch (its supervisor, which retries failures itself
        inside the one Slurm job, is gone). Under the queue's lock, so one client does it."""
        from ..retries import close_attempt, next_retry

        job = self.host.read_job(job_dir)
        attempts = record.get("attempts") or [{}]
        delay = next_retry(job, attempts, "lost", None) if job else None
        if delay is None:
            return record
        with self.host.lock():
            current = self.host.read_record(job_dir) or record
            if (
                current.get("state") != "lost"
                or self.host.read_data(job_dir).get("slurm_id") != slurm_id
            ):
                return current  # another client retried it
            current = dict(current)
            if (current.get("attempts") or [{}])[-1].get("ended_at") is None:
                close_attempt(current, "lost", current.get("reason"))
            for stale in ("supervisor", "ended_at", "exit_code", "signal"):
                current.pop(stale, None)
            current.update(state="queued", reason="retried after its attempt was lost")
            if delay:
                current["retry_at"] = time.time() + delay
            self.host.write_record(job_dir, current)
            try:
                self.submit(job_id, job_dir, job, {})
            except Exception as exc:  # noqa: BLE001 - recorded: the job is lost for good
                current.update(state="lost", ended_at=self.host.now(), reason=str(exc))
                self.host.write_record(job_dir, current)
        return current

    def final_state(self, slurm_id):
        """(Slurm state, ExitCode) of an ended job; ("UNKNOWN", "") if Slurm forgot it.

        None if Slurm can't be asked now (the answer may come later).
        """
        proc = run_command(["scontrol", "show", "job", "-o", slurm_id])
        if proc is not None and proc.returncode == 0:
            fields = dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)
            if fields.get("JobState"):
                return fields["JobState"], fields.get("ExitCode", "")
        forgotten = proc is not None and "Invalid job id" in (proc.stderr or "")
        proc = run_command(["sacct", "-n", "-P", "-X", "-j", slurm_id, "-o", "State,ExitCode"])
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            state, _, exit_code = proc.stdout.strip().splitlines()[0].partition("|")
            return state.split()[0], exit_code
        return ("UNKNOWN", "") if forgotten else None

    def after_end(self, job_dir, record):
        """An ended job's record, with what Slurm says of it once it has left squeue (each
        asked once, and kept): how Slurm ended it (with_slurm_end), then its figures of
        resource use (with_accounting)."""
        return self.with_accounting(job_dir, self.with_slurm_end(job_dir, record))

    def with_slurm_end(self, job_dir, record):
        """An ended job's record, as Slurm ended it if its supervisor recorded it finished by
        a signal tej did not send: Slurm signals the processes of a job it ends itself
        (scancel, preemption, its memory or time limit) one by one, the script's may come
        before the supervisor's. If Slurm's state is one of SLURM_ENDS, the job is killed or
        timed_out, reason "Slurm: STATE" (its exit code and signal stay). Slurm is asked
        once the job has left squeue, and its answer kept (runner.json's slurm_state)."""
        if record.get("state") != "finished" or not record.get("signal"):
            return record  # an exit code, or an end tej made: the supervisor's to say
        data = self.host.read_data(job_dir)
        slurm_id = self.slurm_id(job_dir, data)
        if not slurm_id or data.get("slurm_state") or not self.left_squeue(slurm_id):
            return record
        ended = self.final_state(slurm_id)
        state = STATES.get(ended[0], "lost") if ended else None
        if state not in END_STATES:
            return record  # Slurm can't be asked now, or squeue missed it: next time
        if state in SLURM_ENDS:
            record = slurm_ended(record, state, "Slurm: %s" % ended[0])
            self.host.write_record(job_dir, record)
        self.host.write_data(job_dir, dict(data, slurm_state=ended[0]))
        return record

    def left_squeue(self, slurm_id):
        """Whether a job is no longer in squeue (False if squeue fails)."""
        active = self.query()
        return active is not None and slurm_id not in active

    def with_accounting(self, job_dir, record):
        """An ended job's record with Slurm's figures of its resource use, when Slurm keeps
        accounting (asked once the job has left squeue, and kept); else the supervisor's."""
        if (record.get("resources") or {}).get("source") == "slurm":
            return record
        data = self.host.read_data(job_dir)
        slurm_id = self.slurm_id(job_dir, data)
        if not slurm_id or data.get("accounting") or not self.left_squeue(slurm_id):
            return record  # asked already, or its steps are still being accounted
        proc = run_command(["sacct", "-n", "-P", "-j", slurm_id, "-o", ACCOUNTING_FIELDS])
        if proc is None:
            return record
        found = parse_accounting(proc.stdout, slurm_id) if proc.returncode == 0 else None
        if found is not None:
            record = dict(record, resources=found)
            self.host.write_record(job_dir, record)
            self.host.write_data(job_dir, dict(data, accounting="slurm"))
        elif proc.returncode != 0 or self.accounting_is_late(record):
            self.host.write_data(job_dir, dict(data, accounting="none"))  # keep tej's
        return record

    @staticmethod
    def accounting_is_late(record):
        """Whether a job ended too long ago for its figures to be still on their way."""
        from ..files import parse_iso

        ended = record.get("ended_at")
        return not ended or time.time() - parse_iso(ended) > ACCOUNTING_WAIT

    def wait_for_end(self, job_id, job_dir, record, deadline):
        """Poll the job until it has ended, or deadline."""
        while record.get("state") not in END_STATES and time.time() < deadline:
            time.sleep(self.poll_interval)
            self.queried_at = None
            record = self.refresh(job_id, job_dir, self.host.read_record(job_dir) or record)
        return record

    # sbatch

    def write_batch_script(self, job_dir, array=False):
        """Write the job's batch script: Python that runs tej's supervisor for the job
        (for an array: for its task $SLURM_ARRAY_TASK_ID)."""
        if array:
            command = self.host.task_supervisor_command(job_dir)
        else:
            command = self.host.supervisor_command(job_dir)
        python, code, arguments = command.python, command.code, command.arguments
        if re.search(r"\s", python) or len(python) > 120:
            raise self.host.failure("Python's path %r can't be a #! line" % python)
        argv = repr(arguments)
        if array:
            argv = "%s + [__import__('os').environ['SLURM_ARRAY_TASK_ID']]" % argv
        text = "#!%s\nimport sys\nsys.argv[1:] = %s\n%s\n" % (python, argv, code)
        from ..files import remove_quietly

        path = os.path.join(job_dir, BATCH_SCRIPT)
        remove_quietly(path)  # a retry's submit writes it again
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        return path

    def sbatch_command(self, job_id, job_dir, job, script):
        """sbatch's arguments for a job: the queue's settings, then the job's."""
        argv = [
            "sbatch",
            "--parsable",
            "--job-name=tej-%s" % job_id,
            "--chdir=%s" % os.path.join(job_dir, "work"),
            "--output=%s" % os.path.join(job_dir, "supervisor.log"),
            "--open-mode=append",
        ]
        for key in SETTINGS:
            if self.host.options.get(key):
                argv.append("%s=%s" % (TEXT_OPTIONS[key], self.host.options[key]))
        slurm = job.get("slurm") or {}
        limit = slurm.get("time")
        if limit is None and job.get("max_runtime"):
            # tej's supervisor enforces max_runtime to the second; Slurm's limit
            # leaves it the grace period to do so, for every attempt (retries).
            limit = retries_time(job, job["max_runtime"] + job.get("kill_grace", 5.0)) + 30
        if limit is not None:
            argv.append("--time=%s" % time_limit(limit))
        for key, option in sorted(TEXT_OPTIONS.items()):
            if slurm.get(key):
                argv.append("%s=%s" % (option, slurm[key]))
        for key, option in sorted(COUNT_OPTIONS.items()):
            if slurm.get(key):
                argv.append("%s=%d" % (option, slurm[key]))
        return argv + list(slurm.get("extra_args") or []) + [script]
