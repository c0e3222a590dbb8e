"""Shared helpers of the end-to-end tests: the `target` fixture, polling, job builders.

`target` runs every test twice: against `local` (the embedded destination, a queue in a
temporary directory and a temporary HOME) and against the real loopback sshd (a queue in
the SSH user's `server_tmp`). Test modules import it as `from helpers import target_fixture`.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

from tej import RemoteQueue

CLI_TIMEOUT = 60.0
WAIT_TIMEOUT = 30.0
T = TypeVar("T")
_DEFAULT_QUEUE = object()
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")
ELAPSED = r"\d+:\d\d:\d\d"
END_STATES = ("finished", "killed", "lost")


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
    """Where the tests send jobs: `local` or the loopback sshd, with one queue."""

    kind: str
    destination: str
    queue: str
    home: str  # HOME on the server side (where `~/.tej` is)
    client_env: dict[str, str]
    client_dir: Path  # default cwd of CLI runs
    src_dir: Path  # where job directories are built
    ssh_config: str | None = None
    server: Any = None
    extra_cleanup: list[Callable[[], None]] = field(default_factory=list)

    # the command line

    @property
    def ssh_args(self) -> list[str]:
        """The --ssh-config option, for ssh targets."""
        return ["--ssh-config", self.ssh_config] if self.ssh_config else []

    def cli(
        self,
        command: str,
        *args: str,
        check: int | None = None,
        cwd: Path | str | None = None,
        queue: Any = _DEFAULT_QUEUE,
        destination: str | None = None,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        """Run `python -m tej COMMAND DEST --queue Q [--ssh-config F] ARGS...` in client_dir.

        check asserts the exit code; queue=None leaves --queue out (the default `~/.tej`).
        A traceback on stderr always fails the test.
        """
        queue_args = (
            [] if queue is None else ["--queue", self.queue if queue is _DEFAULT_QUEUE else queue]
        )
        argv = [
            sys.executable,
            "-m",
            "tej",
            command,
            destination or self.destination,
            *queue_args,
            *self.ssh_args,
            *args,
        ]
        done = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            cwd=str(cwd or self.client_dir),
            env=self.client_env,
            timeout=timeout,
        )
        result = CliResult(argv, done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        if check is not None:
            assert result.returncode == check, result
        return result

    def submit(self, job_dir: Path, *args: str) -> str:
        """Submit a job directory with the CLI; return its id."""
        done = self.cli("submit", *args, str(job_dir), check=0)
        lines = done.stdout.splitlines()
        assert lines[0] == "Job submitted as:", done.stdout
        return lines[-1]

    # the API

    def api(self, destination: str | None = None, queue: str | None = None) -> RemoteQueue:
        """A RemoteQueue on this target (use it in a `with` block)."""
        return RemoteQueue(
            destination or self.destination, queue or self.queue, ssh_config=self.ssh_config
        )

    def wait_for(
        self, job_id: str, states: Sequence[str] = END_STATES, timeout: float = WAIT_TIMEOUT
    ) -> dict[str, Any]:
        """Poll the job's status file on the server until its state is one of states.

        Returns the status record (`state`, `exit_code`...). Reading the file costs no
        connection; tests check what tej itself reports with `status`.
        """
        path = self.job_dir(job_id) / "status.json"

        def reached() -> dict[str, Any] | None:
            try:
                record: dict[str, Any] = json.loads(path.read_text())
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

    def make_job(
        self, name: str = "job", script: str | None = "#!/bin/sh\ntrue\n", **kwargs: Any
    ) -> Path:
        """Build a job directory on the client side."""
        return make_job(self.src_dir, name, script, **kwargs)

    # cleanup

    def cleanup(self) -> None:
        """Kill every process left running in the queue, then run the extra cleanup steps."""
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEJ_")}
    env["HOME"] = str(client_home)
    return env, client_home, client_dir, src_dir


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


@pytest.fixture(name="target", params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def target_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Target]:
    """A destination and a fresh queue: `local` or the loopback sshd."""
    if request.param == "local":
        env, client_home, client_dir, src_dir = client_side(tmp_path)
        # The in-process API's local agent inherits HOME too: `~/.tej` stays in tmp_path.
        monkeypatch.setenv("HOME", str(client_home))
        for name in ("TEJ_QUEUE", "TEJ_SSH_CONFIG", "TEJ_PYTHON"):
            monkeypatch.delenv(name, raising=False)
        target = Target(
            kind="local",
            destination="local",
            queue=str(tmp_path / "queue"),
            home=str(client_home),
            client_env=env,
            client_dir=client_dir,
            src_dir=src_dir,
        )
    else:
        server = request.getfixturevalue("ssh_server")
        target = ssh_target(server, request.getfixturevalue("server_tmp"), tmp_path)
    # The API in this process and the command line share the client's hash cache, as a user's do.
    client_cache = str(tmp_path / "client-home" / ".cache")
    monkeypatch.setenv("XDG_CACHE_HOME", client_cache)
    target.client_env["XDG_CACHE_HOME"] = client_cache
    try:
        yield target
    finally:
        target.cleanup()


@pytest.fixture(name="default_link_home")
def default_link_fixture(target: Target) -> Target:
    """Set aside an existing `~/.tej` of the server's HOME, and remove the test's one after."""
    default = Path(target.home, ".tej")
    aside = Path(target.home, f".tej.aside-{os.getpid()}")
    if os.path.lexists(default):
        os.rename(default, aside)

    def restore() -> None:
        if default.is_dir() and not default.is_symlink():
            shutil.rmtree(default)
        elif os.path.lexists(default):
            default.unlink()
        if os.path.lexists(aside):
            os.rename(aside, default)

    target.extra_cleanup.append(restore)
    return target


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
    runner's line holds each queued job once, at the ticket its record names.
    """
    root = Path(queue)
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
            record = json.loads((root / "jobs" / job_id / "status.json").read_text())
        except (OSError, ValueError):
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
