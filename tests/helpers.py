"""Shared helpers of the end-to-end tests: the `Target` of the `target` fixture, polling, jobs.

The fixtures themselves live in conftest.py: `target` runs every test twice, against `local`
(the embedded destination, a queue in a temporary directory and a temporary HOME) and
against the real loopback sshd (a queue in the SSH user's `server_tmp`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

from tej import JobState, JobStatus, RemoteQueue
from tej.protocol import END_STATES
from tej.server.records import first_record_of

REPO = Path(__file__).resolve().parents[1]
WORK_TREE = "work tree"  # `python -m tej` with this checkout first on the import path
INSTALLED = "installed"  # the `tej` console script that installing tej made (the entry point)
CLI_TIMEOUT = 60.0
WAIT_TIMEOUT = 30.0
T = TypeVar("T")
_DEFAULT_QUEUE = object()
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")
ELAPSED = r"\d+:\d\d:\d\d"
#: What `tej status` adds to an ended job's line: its peak memory and CPU time.
USAGE = r"; peak memory \d+(\.\d)? [KMGT]?B, CPU \d+:\d\d:\d\d"


def wait_until(
    predicate: Callable[[], T],
    timeout: float = WAIT_TIMEOUT,
    message: str = "",
    interval: float = 0.05,
) -> T:
    """Poll predicate until it returns something truthy, and return that; fail at the deadline.

    A short interval (such as 0.002 s) catches a transfer in the middle.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)


def wait_for_value(
    fetch: Callable[[], T],
    accept: Callable[[T], object],
    timeout: float = WAIT_TIMEOUT,
    message: str = "",
) -> T:
    """Poll fetch() until accept(value) holds, and return that value; at the deadline, fail
    saying the last value fetched (what a screen showed, a status last read)."""
    last: list[T] = []

    def accepted() -> list[T] | None:
        last[:] = [fetch()]
        return last if accept(last[0]) else None

    try:
        return wait_until(accepted, timeout, message)[0]
    except AssertionError as error:
        raise AssertionError(f"{error}; the last value was:\n{last[0] if last else None}") from None


def make_job(
    parent: Path,
    name: str = "job",
    script: str | None = "#!/bin/sh\ntrue\n",
    *,
    files: dict[str, bytes | str] | None = None,
    script_mode: int = 0o755,
) -> Path:
    """Create a job directory parent/name with start.sh (script, unless None) and extra files."""
    root = parent / name
    root.mkdir(parents=True)
    if script is not None:
        (root / "start.sh").write_text(script)
        (root / "start.sh").chmod(script_mode)
    for relpath, content in (files or {}).items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return root


def read_record(job_dir: Path) -> dict[str, Any]:
    """A job's status record as docs/queue-format.md defines it: its status.json, or for a
    job whose supervisor has written none yet, `starting` (since job.json was written)."""
    try:
        data = json.loads((job_dir / "status.json").read_text())
    except FileNotFoundError:
        data = first_record_of(str(job_dir))
    assert isinstance(data, dict), f"{job_dir} has neither status.json nor a readable job.json"
    return data


def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie counts as dead)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def read_pid(path: Path) -> int | None:
    """The pid written in a file by a job (`echo $! > file`), once complete."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


class CliResult(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """A finished `tej` run: stdout and stderr as text (bad bytes escaped), stdout_bytes raw."""

    def __init__(self, args: list[str], returncode: int, stdout: bytes, stderr: bytes) -> None:
        text = stdout.decode("utf-8", "surrogateescape")
        super().__init__(args, returncode, text, stderr.decode("utf-8", "replace"))
        self.stdout_bytes = stdout
        self.stderr_bytes = stderr


def tej_env(**extra: str) -> dict[str, str]:
    """The environment of a tej command: this process's without any TEJ_* setting, plus extra."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TEJ_")}
    env.update(extra)
    return env


def tej_argv(*args: str, tej: str = WORK_TREE) -> list[str]:
    """The command line of `tej ARGS...`, run from the work tree or the installed script."""
    if tej == WORK_TREE:
        return [sys.executable, "-m", "tej", *args]
    if tej == INSTALLED:
        beside = Path(sys.executable).with_name("tej")  # a venv's or pyenv's bin folder
        script = str(beside) if beside.is_file() else shutil.which("tej")
        if script is None:
            pytest.fail("no installed `tej` script beside this Python or on PATH (pip install .)")
        return [script, *args]
    raise ValueError(f"tej is {WORK_TREE!r} or {INSTALLED!r}, not {tej!r}")


def _process_env(env: dict[str, str] | None, tej: str) -> dict[str, str]:
    """env (by default tej_env()), with this checkout first on PYTHONPATH for the work tree."""
    env = dict(tej_env() if env is None else env)
    if tej == WORK_TREE:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_tej(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    input: bytes | None = None,
    timeout: float = CLI_TIMEOUT,
    tej: str = WORK_TREE,
    prefix: Sequence[str] = (),
) -> CliResult:
    """Run `tej ARGS...` (after the prefix command, if any) and return its result.

    tej says which tej runs: WORK_TREE or INSTALLED. env defaults to tej_env(); the run
    fails the test if it outlives timeout. It never raises on a non-zero exit.
    """
    argv = [*prefix, *tej_argv(*args, tej=tej)]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            cwd=None if cwd is None else str(cwd),
            env=_process_env(env, tej),
            input=input,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"tej {' '.join(args)} did not end within {timeout:g} s")
    return CliResult(argv, done.returncode, done.stdout, done.stderr)


def start_tej(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    tej: str = WORK_TREE,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start `tej ARGS...` as run_tej would, without waiting: popen are Popen's options."""
    cwd = None if cwd is None else str(cwd)
    return subprocess.Popen(tej_argv(*args, tej=tej), cwd=cwd, env=_process_env(env, tej), **popen)


def assert_one_line_error(
    result: CliResult, code: int | None = None, prefix: str = "Error: "
) -> str:
    """Check a failed command: non-zero exit (or code), one line on stderr, no traceback.

    The line starts with prefix; nothing else is printed on stdout. Returns the message.
    """
    assert "Traceback" not in result.stderr, result.stderr
    if code is None:
        assert result.returncode != 0, result
    else:
        assert result.returncode == code, result
    message = result.stderr.strip()
    assert message.startswith(prefix), result.stderr
    assert "\n" not in message, result.stderr
    assert result.stdout == "", result.stdout
    return message


def one_line_answer(result: CliResult, code: int) -> str:
    """The single line a command answered (on stdout or stderr), checking its exit code."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, result
    return lines[0]


@dataclass
class Target:
    """Where the tests send jobs: `local` or the loopback sshd, with one queue.

    tej says which tej its command lines run: the work tree (the default) or the installed
    `tej` script. options are given to every command (such as `--python`).
    """

    kind: str
    destination: str
    queue: str
    home: str  # HOME on the server side (where `~/.tej` is)
    client_env: dict[str, str]
    client_dir: Path  # default cwd of CLI runs
    src_dir: Path  # where job directories are built
    ssh_config: str | None = None
    server: Any = None
    tej: str = WORK_TREE
    options: list[str] = field(default_factory=list)
    extra_cleanup: list[Callable[[], None]] = field(default_factory=list)
    _remote: RemoteQueue | None = field(default=None, repr=False)

    # the command line

    @property
    def ssh_args(self) -> list[str]:
        """The --ssh-config option, for ssh targets."""
        return ["--ssh-config", self.ssh_config] if self.ssh_config else []

    def argv(
        self,
        command: str,
        *args: str,
        queue: Any = _DEFAULT_QUEUE,
        destination: str | None = None,
    ) -> list[str]:
        """The arguments of `tej COMMAND DEST --queue Q [--ssh-config F] OPTIONS ARGS...`.

        queue=None leaves --queue out (the default `~/.tej`).
        """
        queue_args = (
            [] if queue is None else ["--queue", self.queue if queue is _DEFAULT_QUEUE else queue]
        )
        destination = destination or self.destination
        return [command, destination, *queue_args, *self.ssh_args, *self.options, *args]

    def cli(
        self,
        command: str,
        *args: str,
        check: int | None = None,
        cwd: Path | str | None = None,
        queue: Any = _DEFAULT_QUEUE,
        destination: str | None = None,
        timeout: float = CLI_TIMEOUT,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> CliResult:
        """Run `tej COMMAND DEST --queue Q [--ssh-config F] OPTIONS ARGS...` in client_dir.

        check asserts the exit code; queue=None leaves --queue out (the default `~/.tej`);
        env adds to client_env. A traceback on stderr always fails the test.
        """
        result = run_tej(
            *self.argv(command, *args, queue=queue, destination=destination),
            env={**self.client_env, **(env or {})},
            cwd=cwd or self.client_dir,
            timeout=timeout,
            tej=self.tej,
            prefix=prefix,
        )
        assert "Traceback" not in result.stderr, result.stderr
        if check is not None:
            assert result.returncode == check, result
        return result

    def ok(self, command: str, *args: str) -> str:
        """Run a command that must succeed with nothing on stderr; return its stdout."""
        done = self.cli(command, *args)
        assert done.returncode == 0, (
            f"tej {command} {' '.join(args)}: exit {done.returncode}: {done.stderr}"
        )
        assert done.stderr == "", done.stderr
        return done.stdout

    def popen(self, command: str, *args: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start `tej COMMAND DEST --queue Q ...` in client_dir; text pipes unless popen says."""
        options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return start_tej(
            *self.argv(command, *args),
            env=self.client_env,
            cwd=self.client_dir,
            tej=self.tej,
            **options,
        )

    def submit(self, job_dir: Path, *args: str) -> str:
        """Submit a job directory with the CLI (--wait allowed); return its id."""
        done = self.cli("submit", *args, str(job_dir), check=0)
        lines = done.stdout.splitlines()
        assert lines[0] == "Job submitted as:", done.stdout
        assert "--wait" in args or len(lines) == 2, done.stdout  # then the end state
        return lines[1]

    def status(self, job_id: str) -> dict[str, Any]:
        """`tej status --json`, which must succeed with nothing on stderr."""
        document = json.loads(self.ok("status", "--id", job_id, "--json"))
        assert isinstance(document, dict)
        return document

    def status_text(self, job_id: str) -> str:
        """`tej status`, which must succeed."""
        done = self.cli("status", "--id", job_id)
        assert done.returncode == 0, done.stderr
        return str(done.stdout)

    # the API

    def api(self, destination: str | None = None, queue: str | None = None) -> RemoteQueue:
        """A RemoteQueue on this target (use it in a `with` block)."""
        return RemoteQueue(
            destination or self.destination, queue or self.queue, ssh_config=self.ssh_config
        )

    def remote(self) -> RemoteQueue:
        """One API session for the whole test (connected on first use, closed by cleanup)."""
        if self._remote is None:
            self._remote = RemoteQueue(
                self.destination, self.queue, ssh_config=self.ssh_config, connect_timeout=15
            )
        return self._remote

    def wait_for_state(
        self, job_id: str, *states: JobState, timeout: float = WAIT_TIMEOUT
    ) -> JobStatus:
        """Poll the job's status through the API (remote()) until it is in one of states."""

        def reached() -> JobStatus | None:
            status = self.remote().status(job_id)
            return status if status.state in states else None

        what = f"job {job_id} to be {'/'.join(state.value for state in states)}"
        return wait_until(reached, timeout, what)

    def wait_for(
        self, job_id: str, states: Sequence[str] = END_STATES, timeout: float = WAIT_TIMEOUT
    ) -> dict[str, Any]:
        """Poll the job's status file on the server until its state is one of states.

        Returns the status record (`state`, `exit_code`...). Reading the file costs no
        connection; tests check what tej itself reports with `status`.
        """

        def reached() -> dict[str, Any] | None:
            try:
                record = self.record(job_id)
            except (OSError, ValueError):
                return None
            return record if record.get("state") in states else None

        return wait_until(reached, timeout, f"job {job_id} to be {'/'.join(states)}")

    # the server side (root can read the SSH user's files directly)

    def server_path(self, *parts: str | bytes) -> Path:
        """A path on the server, relative to the queue directory."""
        return Path(os.path.join(self.queue, *[os.fsdecode(part) for part in parts]))

    def job_dir(self, job_id: str) -> Path:
        """The directory of a job on the server."""
        return self.server_path("jobs", job_id)

    def work(self, job_id: str, *parts: str | bytes) -> Path:
        """A path inside a job's uploaded directory on the server."""
        return self.server_path("jobs", job_id, "work", *parts)

    def record(self, job_id: str) -> dict[str, Any]:
        """The job's status record, read from the disk (no connection)."""
        return read_record(self.job_dir(job_id))

    def supervisor_gone(self, job_id: str) -> bool:
        """Whether the job's supervisor, as its record names it, has exited."""
        pid = (self.record(job_id).get("supervisor") or {}).get("pid")
        return isinstance(pid, int) and not process_alive(pid)

    def write_settings(self, text: str) -> Path:
        """Write the client's settings file (~/.config/tej/config.toml); return its path."""
        path = Path(self.client_env["HOME"], ".config", "tej", "config.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def make_job(
        self, name: str = "job", script: str | None = "#!/bin/sh\ntrue\n", **kwargs: Any
    ) -> Path:
        """Build a job directory on the client side."""
        return make_job(self.src_dir, name, script, **kwargs)

    # cleanup

    def cleanup(self) -> None:
        """Close remote(), kill every process left running in the queue, run the extra steps."""
        if self._remote is not None:
            self._remote.close()
        kill_processes_under(os.path.abspath(self.queue))
        kill_processes_under(os.path.realpath(self.queue))
        for step in self.extra_cleanup:
            step()


def kill_processes_under(root: str) -> None:
    """SIGKILL every process working in root, naming it, or logging into it (stray jobs,
    their supervisors: a supervisor's stderr is its job's supervisor.log).

    Waits until they are gone, so no supervisor writes into root while it is removed.
    """
    killed = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        with contextlib.suppress(OSError):
            argv.append(os.readlink(entry / "fd" / "2"))
        inside = [path for path in [cwd, *argv] if path == root or path.startswith(root + "/")]
        if inside and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    wait_until(lambda: not any(process_alive(pid) for pid in killed), 10, "stray processes")


def client_side(tmp_path: Path) -> tuple[dict[str, str], Path, Path, Path]:
    """The client's environment, HOME, working folder and job sources, under tmp_path."""
    client_home, client_dir, src_dir = (
        tmp_path / name for name in ("client-home", "client", "src")
    )
    for path in (client_home, client_dir, src_dir):
        path.mkdir()
    env = tej_env(HOME=str(client_home))
    env.pop("XDG_CONFIG_HOME", None)  # settings, if a test writes any: ~/.config/tej/config.toml
    return env, client_home, client_dir, src_dir


def local_target(tmp_path: Path) -> Target:
    """A target on `local`, its queue in tmp_path, the client's HOME the server's."""
    env, client_home, client_dir, src_dir = client_side(tmp_path)
    return Target(
        kind="local",
        destination="local",
        queue=str(tmp_path / "queue"),
        home=str(client_home),
        client_env=env,
        client_dir=client_dir,
        src_dir=src_dir,
    )


def ssh_target(server: Any, server_tmp: str, tmp_path: Path) -> Target:
    """A target on the loopback sshd, its queue in the SSH user's server_tmp."""
    env, _, client_dir, src_dir = client_side(tmp_path)
    return Target(
        kind="ssh",
        destination=server.alias,
        queue=os.path.join(server_tmp, "queue"),
        home=server.home,
        client_env=env,
        client_dir=client_dir,
        src_dir=src_dir,
        ssh_config=server.config_path,
        server=server,
    )


class SilentServer:
    """A TCP server on loopback that accepts connections and holds them without a word."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for connection in self.connections:
            connection.close()


def folder_manifest(**columns: Any) -> dict[str, Any]:
    """An upload manifest of one folder `x`, with some columns replaced (see parse_manifest)."""
    manifest: dict[str, Any] = {
        "paths": b"x",
        "kinds": "d",
        "modes": b"\xed\x01",
        "sizes": b"\0" * 8,
        "digests": b"",
        "targets": b"",
    }
    manifest.update(columns)
    return manifest


def index_problems(queue: str | Path) -> list[str]:
    """What the queue's index (QUEUE/index, docs/queue-format.md) says wrong of its job folders.

    Each job has one marker, in the folder of the state its record says; no marker is
    left of a job that is gone; no intent is left of a writer that died; the queue
    runner's line holds each queued job once, at the ticket its record names. A queue
    that moves while it is read (a job starts, a link goes) is a problem of the moment:
    callers that watch a live queue poll until none is left.
    """
    try:
        return _index_problems(Path(queue))
    except FileNotFoundError as error:
        return [f"the queue changed while it was read: {error}"]


def _index_problems(root: Path) -> list[str]:
    """index_problems, for a queue that stands still."""
    jobs = {path.name for path in (root / "jobs").iterdir()} if (root / "jobs").is_dir() else set()
    index = root / "index"
    states = [
        "starting", "queued", "scheduled", "running",
        "finished", "killed", "timed_out", "lost", "cancelled",
    ]  # fmt: skip
    markers = {state: set(os.listdir(index / state)) for state in states}
    problems = []
    for job_id in sorted(jobs):
        try:
            record = read_record(root / "jobs" / job_id)
        except (OSError, ValueError, KeyError):
            record = {"state": "lost"}
        state = record.get("state") if record.get("state") in states else "lost"
        found = [name for name, ids in markers.items() if job_id in ids]
        if found != [state]:
            problems.append(f"{job_id} is {state} but its markers are in {found}")
    for state, ids in markers.items():
        problems += [f"{job_id} is gone but has a marker in {state}" for job_id in ids - jobs]
    pending = os.listdir(index / "pending")
    problems += [f"an intent is left: {name}" for name in pending]
    return problems + line_problems(root, markers["queued"])


def line_problems(root: Path, queued: set[str]) -> list[str]:
    """What the queue runner's line (QUEUE/index/line) says wrong of the queued jobs."""
    line = root / "index" / "line"
    if not (line / "state.json").exists() or (line / "dirty").exists():
        return [] if not queued else ["the line is missing or dirty (rebuilt when next used)"]
    state = json.loads((line / "state.json").read_text())
    holders: dict[str, str] = {}
    for key, entry in state["priorities"].items():
        for ticket in range(entry["head"], entry["next"]):
            link = line / key / f"{ticket:012d}"
            if os.path.lexists(link) and ticket not in entry["holes"]:
                holders[os.readlink(link)] = f"{key}/{ticket}"
    problems = [f"{job_id} is in the line but not queued" for job_id in set(holders) - queued]
    for job_id in queued:
        record = json.loads((root / "jobs" / job_id / "status.json").read_text())
        where = f"{record.get('priority') or 0}/{record.get('ticket')}"
        if holders.get(job_id) != where:
            problems.append(f"{job_id} is queued at {where} but the line has {holders.get(job_id)}")
    return problems
