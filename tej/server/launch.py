"""Launching supervisors: the fork server, forking, and the commands that run the queue's copy."""

import collections.abc  # noqa: F401 - for the type comments (loaded already)
import contextlib
import json
import os
import signal
import sys
import types  # noqa: F401 - for the type comments (loaded already)

from ..protocol import (
    DEFAULT_RUNNER,
    ERR_SERVER,
)
from .errors import (
    AgentError,
    describe_os_error,
)
from .files import (
    read_line_with_timeout,
)
from .layout import (
    SUPERVISOR_LOG,
)
from .processes import c_library, set_process_title
from .records import (
    START_TIMEOUT,
)

MAX_FD = 65536  # file descriptors a forked supervisor closes
#: A supervisor forked deeper than this (Python frames) runs in a new interpreter instead:
#: one forked by a supervisor (the queue runner's next job) inherits its stack, and each
#: generation adds to it, up to the recursion limit (see fresh_supervisor).
FRESH_AFTER = 200
#: Secrets up to this size go to a new interpreter through a pipe it is started with.
PIPE_ROOM = 60000


def start_supervisor(copy, job_dir, secrets):
    """Start the detached supervisor of a job, from the agent's copy; returns once it is forked.

    The job is then `starting`: the supervisor starts its script and records
    `running`, or records why it could not (see Supervisor.launch). The
    supervisor is forked, not started as a new interpreter: from this
    process if it has a single thread, else (the agent, under execnet) from
    a fork server, a single-threaded process this agent starts once.
    """
    meanwhile = MEANWHILE.pop() if MEANWHILE else None
    if threading_count() > 1:
        server = fork_server(copy)
        asked = server.ask(job_dir, secrets)
        if meanwhile is not None:
            meanwhile()
        report = server.answer() if asked else b""
    else:
        if meanwhile is not None:
            meanwhile()
        report = fork_supervisor(copy, job_dir, secrets)
    if not report.startswith(b"forked "):
        detail = report.decode("utf-8", "replace").strip()
        raise AgentError(
            ERR_SERVER,
            "Could not start the job's supervisor: %s"
            % (detail[len("failed ") :] if detail.startswith("failed ") else "no answer"),
        )


# Work to do while the next supervisor is forked (see while_forking): at most one.
MEANWHILE = []  # type: list[collections.abc.Callable[[], None]]


@contextlib.contextmanager
def while_forking(function):
    """Run function while the first supervisor started in the block is forked (the fork
    server works meanwhile), or at the block's end if none is; not if the block raises.

    function must not raise: a supervisor may be running by then.
    """
    MEANWHILE[:] = [function]
    try:
        yield
    except BaseException:
        del MEANWHILE[:]
        raise
    if MEANWHILE:
        del MEANWHILE[:]
        function()


def warm_fork_server(queue):
    """Start the queue's fork server now, for a submit on its way; best effort.

    Its interpreter then starts while the upload is laid out, rather than
    after: a connection's first submit waits less for its supervisor to be
    forked. Only under execnet (threads), for the default runner (which
    starts every job at once); nothing here fails the upload.
    """
    config = queue.config if isinstance(queue.config, dict) else {}
    if threading_count() <= 1 or config.get("runner", DEFAULT_RUNNER) != DEFAULT_RUNNER:
        return
    try:
        from .agentcopy import queue_copy

        fork_server(queue_copy(queue))
    except Exception:  # noqa: BLE001 - the submit starts it, or says why it can't
        pass


def threading_count():
    """How many threads this process runs (execnet starts them with _thread, not threading)."""
    import _thread

    return _thread._count() + 1


def fork_supervisor(copy, job_dir, secrets):
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
            os.write(write_end, spawn_supervisor(copy, job_dir, secrets))
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
    import resource  # noqa: F401 - the job's resource use, at its end
    import subprocess  # noqa: F401 - starting the job

    c_library()


def spawn_supervisor(copy, job_dir, secrets):
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
            if stack_depth() > FRESH_AFTER:
                fresh_supervisor(copy, job_dir, secrets, log)  # returns only if it can't
            code = run_forked_supervisor(copy, job_dir, secrets, log)
        finally:
            os._exit(code)
    os.close(log)
    return b"forked %d\n" % pid


def stack_depth():
    """How many Python frames the stack holds here."""
    frame, depth = sys._getframe(), 0  # type: (types.FrameType | None, int)
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def fresh_supervisor(copy, job_dir, secrets, log):
    """In a forked supervisor: become a new interpreter that supervises the job (the
    copy's `supervise JOBDIR`, its secrets on stdin), on a stack of its own.

    A supervisor that starts the next queued job forks it deep in its own stack, and
    the child's own next one deeper still: every so many generations, one starts
    afresh. Returns (the caller supervises in this process) if it can't.
    """
    data = json.dumps(secrets).encode("utf-8")
    if len(data) > PIPE_ROOM:  # more than a pipe holds before anyone reads it
        return
    try:
        read_end, write_end = os.pipe()
        os.write(write_end, data)
        os.close(write_end)
        detach(read_end, log)
        command = copy.supervisor_command(job_dir)
        os.execv(command.python, command.argv)
    except OSError as exc:
        os.write(2, ("tej supervisor: can't start afresh: %s\n" % exc).encode("utf-8", "replace"))


def failed_report(exc):
    """The report of a supervisor that could not be forked: "failed WHY"."""
    detail = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
    return ("failed %s\n" % detail).encode("utf-8", "replace")


def run_forked_supervisor(copy, job_dir, secrets, log):
    """In the forked supervisor: a session and files of its own, then supervise; an exit code.

    Its stdin and stdout are /dev/null, its stderr supervisor.log.
    """
    try:
        detach(None, log)
        from .queue import HELD_LOCKS

        HELD_LOCKS.clear()  # the locks of the process it was forked from are not its own
        set_process_title(supervisor_title(job_dir))
        from .supervisor import supervise

        return supervise(job_dir, secrets)
    except BaseException as exc:  # noqa: BLE001 - the child must never return to its caller
        try:
            os.write(2, ("tej supervisor: %s\n" % exc).encode("utf-8", "replace"))
        except OSError:
            pass
        return 1


def detach(stdin, log):
    """In a forked supervisor: a session of its own (if it isn't one already), stdin (None:
    /dev/null), stdout /dev/null and stderr log, no other file of its parent's; in /."""
    # A fork server ignores SIGCHLD (see serve_forks); an ignored signal stays so in exec.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if os.getsid(0) != os.getpid():  # it is, if fresh_supervisor failed to exec
        os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd, target in ((0, devnull if stdin is None else stdin), (1, devnull), (2, log)):
        os.dup2(target, fd)
    close_inherited_files()
    os.chdir("/")


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

    def __init__(self, copy):
        import subprocess

        self.proc = subprocess.Popen(
            copy.command("fork-server", TITLE_ROOM).argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            cwd="/",
        )

    def start(self, job_dir, secrets):
        """Have a supervisor forked for job_dir; returns the report (empty if none came)."""
        return self.answer() if self.ask(job_dir, secrets) else b""

    def ask(self, job_dir, secrets):
        """Ask for a supervisor for job_dir (answer() reads the report); False if it can't be."""
        request = json.dumps({"job_dir": job_dir, "secrets": secrets}) + "\n"
        try:
            self.proc.stdin.write(request.encode("utf-8"))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            self.stop()
            return False
        return True

    def answer(self):
        """The report of the supervisor asked for (empty if none came in time)."""
        try:
            report = read_line_with_timeout(self.proc.stdout, START_TIMEOUT + 5)
        except OSError:
            report = b""
        if not report.endswith(b"\n"):  # no answer in time: a late one must not answer another
            self.stop()
        return report

    def stop(self):
        """Kill the fork server (the next submit starts another)."""
        self.proc.kill()
        self.proc.wait()

    def alive(self):
        """Whether the fork server still runs."""
        return self.proc.poll() is None


FORK_SERVERS = {}  # type: dict[str, ForkServer]  # by agent copy, in this agent
# The fork server's last argument: room in its command line for its supervisors' titles.
TITLE_ROOM = " " * 160


def fork_server(copy):
    """This agent's fork server for supervisors run from the copy (started if need be)."""
    server = FORK_SERVERS.get(copy.path)
    if server is None or not server.alive():
        server = FORK_SERVERS[copy.path] = ForkServer(copy)
    return server


def serve_forks(stdin, stdout):
    """The fork server's loop: fork a supervisor per request, until stdin closes.

    Each supervisor is forked once, as a child of this process: with SIGCHLD
    ignored, the kernel reaps them as they end, so none is left a zombie;
    they outlive this process, which ends with the connection.
    """
    from .agentcopy import running_copy

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    prepare_fork()
    copy = running_copy()
    warm = False
    for line in stdin:
        try:
            request = json.loads(line)
            secrets = request.get("secrets") or {}
            report = spawn_supervisor(copy, request["job_dir"], secrets)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            report = failed_report(exc)
        stdout.write(report.strip() + b"\n")
        stdout.flush()
        if not warm:  # once the first submit has its answer: it doesn't wait for this
            warm = warm_up()
    return 0


def warm_up():
    """Load the supervisor's own modules here, once, and freeze the objects so far; True.

    The supervisors forked later inherit the modules (each imported them before,
    about 8 ms) and, the objects frozen, their garbage collector doesn't walk
    them: it would write to each, and each page it writes to is copied from this
    process's (page faults were a fifth of a tiny job's cost).
    """
    import gc

    from . import arrays, queue, supervisor  # noqa: F401 - arrays: the row of an ended job

    gc.collect()
    gc.freeze()
    return True


def supervisor_title(job_dir):
    """What `ps` shows of a job's supervisor: tej-supervisor and the job's id."""
    return "tej-supervisor %s" % os.path.basename(job_dir)
