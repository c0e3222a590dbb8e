"""Runners: the default runner, the RunnerHost every runner gets, and opening a queue's runner."""

import os

from ...protocol import (
    ACTIVE_STATES,
    BUILTIN_RUNNERS,
    DEFAULT_RUNNER,
    END_STATES,
    ERR_BAD_REQUEST,
    ERR_INVALID,
    ERR_QUEUE,
    ERR_RUNNER_MISSING,
    ERR_SERVER,
    MAX_BLOCK,
    STATE_CANCELLED,
    STATE_FINISHED,
    STATE_KILLED,
    STATE_LOST,
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SCHEDULED,
    STATE_STARTING,
    STATE_TIMED_OUT,
    sha256_hex,
)
from ..errors import (
    AgentError,
)
from ..files import (
    make_private_dirs,
    now_iso,
    read_json,
    remove_quietly,
    write_file_atomic,
    write_json_atomic,
)
from ..index import ids_in, write_status
from ..layout import (
    AGENT_DIR,
    ID_PATTERN,
    JOB_FILE,
    JOBS_DIR,
    LOCK_FILE,
    RUNNER_DATA,
)
from ..processes import (
    group_exists,
    owns_group,
    terminate_group,
)
from ..queue import (
    QueueLock,
)
from ..records import (
    START_TIMEOUT,
    read_status_record,
    supervised_record,
    wait_for_state,
)


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

    def __init__(self, queue):
        self.queue = queue
        self.root = queue.root
        self.options = dict((queue.config or {}).get("options") or {})

    # the queue's jobs

    def job_ids(self):
        """The identifiers of the queue's jobs."""
        return self.queue.job_ids()

    def job_ids_in(self, state):
        """The identifiers of the jobs whose records say state, from the queue's index."""
        return ids_in(self.root, state)

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

    def supervised_record(self, job_dir, record=None, retry=True):
        """A job's status record, with a dead supervisor reported as lost.

        A lost job whose retries include "lost" is started again (retry=False: not).
        """
        found = supervised_record(job_dir, record)
        if retry and found.get("state") == STATE_LOST and not found.get("ended_at"):
            from ..retries import retry_if_lost

            found = retry_if_lost(self, job_dir, found)
        return found

    def write_record(self, job_dir, record, durable=True):
        """Replace a job's status record (atomically), and move the job in the queue's index.

        durable=False: without fsync, for a change a power cut may lose (readers still
        see the old record or the new one).
        """
        write_status(job_dir, record, durable)

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
        from ..agentcopy import queue_copy
        from ..launch import start_supervisor

        start_supervisor(queue_copy(self.queue), job_dir, secrets or {})

    def supervisor_command(self, job_dir):
        """The command (an AgentCommand: python, code, arguments) that supervises a job in
        the foreground, from the agent's copy in the queue (for a batch system)."""
        from ..agentcopy import queue_copy

        return queue_copy(self.queue).supervisor_command(job_dir)

    def task_supervisor_command(self, array_dir):
        """The command that reserves, lays out and supervises an array's task, for a batch
        system's array job: as supervisor_command, the task's index to be appended to
        .arguments."""
        from ..agentcopy import queue_copy

        return queue_copy(self.queue).task_supervisor_command(array_dir)

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


class DefaultRunner(object):
    """Runs each job at once, under its own supervisor on this machine."""

    name = DEFAULT_RUNNER
    job_fields = ()
    initial_state = STATE_STARTING
    takes_secrets = True
    supports_arrays = True  # one supervisor per array (server/arraysup.py)

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


RUNNER_CACHE = {}  # type: dict[str, object]  # plugin runner modules imported by this process


def builtin_module(name):
    """The module of a built-in runner (tej/server/runners/NAME.py)."""
    import importlib

    return importlib.import_module("." + name, __name__)


def builtin_fields():
    """The job fields only some runners take: {field: the built-in runner that owns it}."""
    return dict(
        (field, name) for name in BUILTIN_RUNNERS for field in builtin_module(name).JOB_FIELDS
    )


def plugin_module_name(name, digest):
    """The module name of a plugin runner's copy in a queue."""
    return "tej_runner_%s_%s" % (name, digest)


def open_runner(queue):
    """Give queue its runner (queue.runner), and return it.

    A plugin runner whose module is missing from the queue gives RunnerMissing:
    the client then installs it (install_runner) and asks again.
    """
    config = queue.config or {}
    name = config.get("runner") or DEFAULT_RUNNER
    host = RunnerHost(queue)
    if name == DEFAULT_RUNNER:
        queue.runner = DefaultRunner(host)
    elif name in BUILTIN_RUNNERS:
        queue.runner = builtin_module(name).Runner(host)
    else:
        module_name = config.get("runner_module")
        path = queue.path(AGENT_DIR, "%s.py" % module_name)
        if not isinstance(module_name, str) or not os.path.isfile(path):
            raise AgentError(ERR_RUNNER_MISSING, name)
        queue.runner = load_plugin_module(path, module_name).Runner(host)
    return queue.runner


def load_plugin_module(path, module_name):
    """Import a plugin runner's module from the queue (once per process); its .pyc is cached."""
    if module_name not in RUNNER_CACHE:
        import importlib.util

        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        RUNNER_CACHE[module_name] = module
    return RUNNER_CACHE[module_name]


def install_plugin(queue, name, source):
    """Write a plugin runner's module into the queue; returns (module name, module)."""
    digest = sha256_hex(source.encode("utf-8"))[:16]
    module_name = plugin_module_name(name, digest)
    target = queue.path(AGENT_DIR, "%s.py" % module_name)
    make_private_dirs(queue.path(AGENT_DIR, "__pycache__"))
    if not os.path.exists(target):
        write_file_atomic(target, source.encode("utf-8"))
    try:
        module = load_plugin_module(target, module_name)
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
        for job_id in ids_in(queue.root, STATE_QUEUED)
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
    """Refuse job fields and secrets the queue's runner doesn't take (naming one that does)."""
    for field, owner in builtin_fields().items():
        if job.get(field) is not None and field not in runner.job_fields:
            raise AgentError(
                ERR_INVALID,
                "%s needs a runner that supports it; this queue's runner is %r "
                "(see tej setup --plugin %s)" % (field, runner.name, owner),
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
        import signal

        signum = signal.SIGTERM
        if record.get("array_supervised"):  # its array's supervisor runs it (server/tasks.py)
            from ..layout import TASK_KILL

            os.close(os.open(os.path.join(job_dir, TASK_KILL), os.O_WRONLY | os.O_CREAT, 0o600))
            signum = signal.SIGUSR1
        try:
            os.kill(record["supervisor"]["pid"], signum)
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
    write_status(job_dir, record)
    return True, record
