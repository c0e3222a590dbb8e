"""The supervisor of one job: starts it on time, enforces its limits, records its end."""

import errno
import os
import signal
import sys
import time

from ..protocol import (
    DEFAULT_RUNNER,
    END_STATES,
    KILL_GRACE,
    OUTPUT_KEPT,
    STATE_FINISHED,
    STATE_KILLED,
    STATE_LOST,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SCHEDULED,
    STATE_STARTING,
    STATE_TIMED_OUT,
    STDERR_MERGED,
)
from .errors import (
    AgentError,
    describe_os_error,
)
from .files import (
    make_private_dirs,
    now_iso,
    read_json,
)
from .index import write_status
from .jobs import (
    output_path,
    read_secrets,
)
from .layout import (
    JOB_FILE,
    JOBS_DIR,
    LAYOUT_PENDING,
    STATUS_FILE,
    STDERR_FILE,
    WORK_DIR,
    queue_root_of,
)
from .notify import (
    send_notifications,
)
from .processes import (
    become_subreaper,
    exits_within,
    group_exists,
    identify_process,
    owns_group,
    reap_remaining,
    signal_job,
    signal_name,
    spawn_script,
    terminate_group,
    wait_for_child,
)
from .progress import progress_path
from .queue import open_queue
from .records import (
    first_record_of,
    read_status_record,
    supervised_record,
)
from .retries import (
    close_attempt,
    max_attempts,
    next_retry,
)
from .runners import (
    open_runner,
)
from .usage import (
    children_usage,
    job_resources,
)

# A job is recorded running once it has run this long: one that ends sooner goes from
# starting to its end, one record fewer (as an array's tasks do: server/tasks.py).
RUNNING_AFTER = 0.05


class Supervisor(object):
    """Starts one job (on time), enforces its time limit, records its end, notifies."""

    def __init__(self, job_dir, secrets):
        self.job_dir = job_dir
        self.job = read_json(os.path.join(job_dir, JOB_FILE))
        try:
            self.record = read_json(os.path.join(job_dir, STATUS_FILE))
        except FileNotFoundError:  # its first, as the agent gave it (job.json's submitted_at)
            self.record = first_record_of(job_dir, self.job)
            if self.record is None:
                raise
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
        if not self.lay_out():
            return 0
        if not self.wait_for_start_time():
            self.end(STATE_KILLED, reason="cancelled before it started")
            return 0
        if self.record.get("start_time") and not self.admitted():
            return 0  # queued: the runner starts the job later
        before = children_usage()  # what was reaped before is not the job's
        while True:
            if not self.wait_for_retry() or self.kill_requested:
                self.end(STATE_KILLED, reason=self.cancelled_reason())
                return 0
            state = self.attempt()
            delay = next_retry(self.job, self.record["attempts"], state, self.record["exit_code"])
            if delay is None:
                if self.record.get("job"):  # it ran (a script that could not start didn't)
                    # Before end(): the queue's tick may fork (and reap) the next job's supervisor.
                    self.record["resources"] = job_resources(before)
                self.end(state)
                return 0
            self.record.update(state=STATE_RUNNING, retry_at=time.time() + delay)
            self.save()

    def lay_out(self):
        """Lay the job's files out if its resubmit left them to its supervisor (see
        server/deferred.py); False if that failed (the job's end is recorded: lost)."""
        if not os.path.exists(os.path.join(self.job_dir, LAYOUT_PENDING)):
            return True
        from .deferred import lay_out_pending

        try:
            lay_out_pending(self.job_dir)
        except (OSError, AgentError) as exc:
            why = exc.message if isinstance(exc, AgentError) else describe_os_error(exc)
            self.end(STATE_LOST, reason="its files could not be laid out: %s" % why)
            return False
        return True

    def attempt(self):
        """Run the script once, from start to end; returns how this attempt ended.

        Its start and end are noted in the record's attempts (see retries).
        """
        self.timed_out = False
        clear_leftovers(self.record.get("job"), self.grace)
        rotate_outputs(self.job_dir, self.job, len(self.record.get("attempts") or []))
        pid = self.launch()
        if pid is None:
            state = STATE_FINISHED  # it could not start: exit code 126 or 127
        else:
            self.arm_time_limit()
            if not exits_within(pid, RUNNING_AFTER):
                self.save()  # running (a job that ends sooner goes from starting to its end)
            wait_status = wait_for_child(pid)
            terminate_group(self.pgid, self.grace, with_descendants=True)
            reap_remaining(time.time() + 1.0)
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.pgid, self.alarm_phase = None, None
            self.record.update(exit_code_fields(wait_status))
            state = self.end_state()
        close_attempt(self.record, state)
        return state

    def wait_for_retry(self):
        """Wait for the time of the next attempt, if there is one; False if killed meanwhile."""
        retry_at = self.record.pop("retry_at", None)
        while retry_at and not self.kill_requested and time.time() < retry_at:
            time.sleep(min(retry_at - time.time(), 0.2))
        return not self.kill_requested

    def cancelled_reason(self):
        """Why a job killed between attempts (or before its first) never ran again."""
        attempts = self.record.get("attempts")
        if not attempts:
            return "cancelled before it started"
        return "killed while waiting to retry (after attempt %d)" % len(attempts)

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
        runner = runner_of_job(self.job_dir)
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
        """Start the job, running in its record (written by attempt, see RUNNING_AFTER); its
        pid, or None if it could not start (recorded)."""
        started_at = now_iso()  # before the spawn: the job may be at work before it returns
        pid = self.open_and_start()
        if pid is None:
            return None
        self.pgid = pid
        self.record.update(state=STATE_RUNNING, job=identify_process(pid))
        self.start_attempt(started_at)
        return pid

    def open_and_start(self):
        """Open the job's outputs and start its script: what start_job returns; None if
        it could not start (recorded, with the exit code a shell would give)."""
        try:
            out, err = open_outputs(self.job_dir, self.job)
        except (OSError, AgentError) as exc:
            why = exc.message if isinstance(exc, AgentError) else describe_os_error(exc)
            return self.fail_to_start("cannot open its output: %s" % why, 126)
        try:
            return self.start_job(out, err)
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
            return self.fail_to_start(self.cannot_run(exc), code)
        finally:
            os.close(out)
            os.close(err)

    def start_attempt(self, started_at):
        """Note a new attempt in the record (the job's started_at is its first one's)."""
        attempts = self.record.setdefault("attempts", [])
        attempts.append({"attempt": len(attempts) + 1, "started_at": started_at})
        self.record.setdefault("started_at", started_at)
        for stale in ("exit_code", "signal", "reason"):
            self.record.pop(stale, None)
        self.record["max_attempts"] = max_attempts(self.job)

    def start_job(self, out, err):
        """Spawn the job's script in its own session, its output to out and err."""
        work = os.path.join(self.job_dir, WORK_DIR)
        script = os.path.join(work, self.job["script"])
        env = dict(os.environ, TEJ_JOB_ID=self.job["id"], TEJ_JOB_DIR=work)
        env["TEJ_PROGRESS"] = progress_path(os.path.abspath(self.job_dir))
        env.update(self.job.get("env") or {})
        env.update(self.secrets)
        args = list(self.job.get("args", []))
        try:
            return self.spawn(script_command(script) + args, work, env, out, err)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
            return self.spawn(["/bin/sh", script] + args, work, env, out, err)

    @staticmethod
    def spawn(argv, cwd, env, out, err):
        """Start argv in a session of its own, its output to out and err; its pid."""
        return spawn_script(argv, cwd, env, out, err)

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
        self.start_attempt(now_iso())
        self.record.update(exit_code=exit_code, reason=reason)

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
        tick_after_end(self.job_dir)
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
        write_status(self.job_dir, self.record, durable)


def runner_of_job(job_dir):
    """The runner of the queue a job is in (for a supervisor); None for the default one."""
    queue = open_queue(queue_root_of(job_dir), with_runner=False)
    if not queue.exists or queue.config.get("runner", DEFAULT_RUNNER) == DEFAULT_RUNNER:
        return None
    return open_runner(queue)


def tick_after_end(job_dir):
    """Let the queue's runner react to a job's end (start the next queued job...)."""
    try:
        runner = runner_of_job(job_dir)
        tick = getattr(runner, "tick", None)
        if tick is not None:
            tick()
    except Exception as exc:  # noqa: BLE001 - the job's end is recorded: log, don't fail
        sys.stderr.write("%s tej: the queue's runner failed: %s\n" % (now_iso(), exc))
        sys.stderr.flush()


def clear_leftovers(identity, grace):
    """Stop what a lost attempt left running (its processes), before the job runs again."""
    if identity and owns_group(identity) and group_exists(identity["pid"]):
        terminate_group(identity["pid"], grace)


def rotate_outputs(job_dir, job, done):
    """Before attempt done + 1 (not the first): keep attempt done's output as stdout.DONE.

    Only the output tej keeps (stdout and stderr in the job's folder): a path in
    the job's files is appended to by every attempt.
    """
    if not done:
        return
    for stream in ("stdout", "stderr"):
        if (job.get(stream) or OUTPUT_KEPT) != OUTPUT_KEPT:
            continue
        path = os.path.join(job_dir, stream)
        try:
            os.rename(path, "%s.%d" % (path, done))
        except OSError:
            pass  # not written (or kept already, by a supervisor lost since)


def exit_code_fields(wait_status):
    """The exit code (128 + N for a signal, as in a shell) and signal name of a wait status."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        return {"exit_code": 128 + signum, "signal": signal_name(signum)}
    return {"exit_code": os.WEXITSTATUS(wait_status)}


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


def supervise(job_dir, secrets=None):
    """Entry point of the supervisor process (secrets: read from stdin if None)."""
    try:
        if os.path.isdir(os.path.join(job_dir, JOBS_DIR)):  # an array: one supervisor for all
            from .arraysup import ArraySupervisor

            secrets = read_secrets(sys.stdin) if secrets is None else secrets
            return ArraySupervisor(job_dir, secrets).run()
        return Supervisor(job_dir, secrets).run()
    except Exception as exc:  # noqa: BLE001 - logged in supervisor.log, and recorded
        sys.stderr.write("%s tej supervisor: %s\n" % (now_iso(), exc))
        sys.stderr.flush()
        record_supervisor_failure(job_dir, exc)
        return 1


def record_supervisor_failure(job_dir, exc):
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
        write_status(job_dir, record)
    except OSError:
        return
    tick_after_end(job_dir)
