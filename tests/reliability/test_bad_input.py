"""Bad input: one clear line, a non-zero exit, and nothing changed on the server.

One table, one row per bad input. Each row is the real command line (`python -m tej`)
run against the loopback sshd as the unprivileged SSH user, and against `local` where
the row is not about SSH. A row gives the command, its options and positional arguments
(placeholders such as `{job}` are filled in by the row's setup), the expected exit code
and a regular expression the one-line message must match. Every row checks:

* the exit code;
* exactly one line on stderr, `Error: ...` (the `No job ...` answers come without
  `Error:`), nothing on stdout, no traceback;
* that the server's queue is unchanged: a snapshot of the queue tree (paths, types,
  sizes, modes, symlink targets, the content of every JSON file) is taken before and
  after (its content store included: a refused submit stores nothing). The queue is
  shared by the rows of a module and holds one finished job, so the commands that read a
  queue have something to read. Rows that make a queue of their own
  (not a queue, read-only, written by a newer tej...) snapshot it too;
* that the canary files named `x` (for `$(rm -rf x)`) survive, and that nothing was
  written to the client's working directory.

A few rows must work (login scripts that print, a file name that is not UTF-8): they
check that the job arrived whole instead, and that nothing else in the queue changed but
its content store.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    kill_processes_under,
    make_job,
    process_alive,
    read_record,
    run_tej,
    tej_env,
    wait_until,
)
from sshd import SshServer, is_root, login_script_lines

from tej.protocol import END_STATES

CLI_DEADLINE = 60.0
PYENV_ROOT = os.environ.get("PYENV_ROOT", "/root/.pyenv")
NOISE = "tej bad-input login noise"
FINISHED_ID = "finished_job"
ON_CI = os.environ.get("CI", "").lower() == "true"
# Root reads every file: the client runs without the capabilities that allow it.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


# -- the bench: a queue with one finished job, for every row of a module ------


@dataclass
class Bench:
    """Where the rows run: `local` or the loopback sshd, with a shared queue."""

    kind: str
    destination: str
    base: Path  # server side: holds the shared queue and the rows' own folders
    queue: Path
    client_home: Path
    ssh_config: str | None = None
    server: SshServer | None = None

    def own(self, path: Path) -> None:
        """Give a server-side tree to the SSH user (as root, files are root's otherwise)."""
        if self.server is None or not is_root():
            return
        for folder, dirs, files in os.walk(path):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.chown(name, self.server.uid, self.server.gid, follow_symlinks=False)

    def env(self) -> dict[str, str]:
        """The client's environment: a private HOME, no TEJ_* (run_tej adds the work tree)."""
        return tej_env(HOME=str(self.client_home), LANG="C.UTF-8", LC_ALL="C.UTF-8")


def run_on_bench(
    bench: Bench,
    command: str,
    *,
    queue: str,
    options: list[str],
    destination: str,
    positionals: list[str],
    cwd: Path,
    ssh_config: str | None,
    prefix: list[str] | None = None,
    deadline: float = CLI_DEADLINE,
) -> subprocess.CompletedProcess[str]:
    """`tej COMMAND --queue Q [--ssh-config F] OPTIONS -- DESTINATION POSITIONALS...`."""
    ssh = ["--ssh-config", ssh_config] if ssh_config else []
    done = run_tej(
        command,
        "--queue",
        queue,
        *ssh,
        *options,
        "--",
        destination,
        *positionals,
        env=bench.env(),
        cwd=cwd,
        timeout=deadline,
        prefix=prefix or [],
    )
    stdout = done.stdout_bytes.decode("utf-8", "replace")
    return subprocess.CompletedProcess(done.args, done.returncode, stdout, done.stderr)


def remove_tree(path: Path) -> None:
    """Remove a tree, even the parts a row made read-only or unreadable."""
    if not os.path.lexists(path):
        return
    for folder, dirs, _ in os.walk(path):
        for name in dirs:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def make_bench(kind: str, base_tmp: Path, server: SshServer | None) -> Bench:
    """A bench: an empty server-side folder, a queue in it with one finished job."""
    client_home = base_tmp / "client-home"
    client_home.mkdir()
    if server is None:
        base = base_tmp / "server"
        base.mkdir()
        bench = Bench("local", "local", base, base / "queue", client_home)
    else:
        parent = Path(server.home) / "tejtests"
        parent.mkdir(mode=0o755, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="bad-input-", dir=parent))
        bench = Bench("ssh", server.alias, base, base / "queue", client_home)
        bench.ssh_config, bench.server = server.config_path, server
        if is_root():
            os.chown(parent, server.uid, server.gid)
        bench.own(base)
    (base / "x").write_text("canary\n")  # for `$(rm -rf x)`
    bench.own(base / "x")
    job = make_job(
        base_tmp,
        "finished",
        "#!/bin/sh\necho done > out.txt\n",
        files={"sub/data.txt": "data\n"},
    )
    os.symlink("/etc/passwd", job / "escape")
    os.symlink("/etc", job / "escape-dir")
    done = run_on_bench(
        bench,
        "submit",
        queue=str(bench.queue),
        options=["--id", FINISHED_ID],
        destination=bench.destination,
        positionals=[str(job)],
        cwd=base_tmp,
        ssh_config=bench.ssh_config,
    )
    assert done.returncode == 0, done.stderr
    wait_for_end(bench, FINISHED_ID)
    return bench


def wait_for_end(bench: Bench, job_id: str) -> None:
    """Wait until a job has ended and its supervisor has exited.

    The supervisor files the end in the queue's index after it writes the record: a
    snapshot taken before it exits could see that filing as a change a row made.
    """
    job_dir = bench.queue / "jobs" / job_id

    def ended() -> bool:
        try:
            record = read_record(job_dir)
        except (OSError, ValueError):
            return False
        pid = (record.get("supervisor") or {}).get("pid")
        return record.get("state") in END_STATES and isinstance(pid, int) and not process_alive(pid)

    wait_until(ended, 30, f"job {job_id} to end and its supervisor to exit")


class Benches:
    """The module's benches, made on first use and removed at the end."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.made: dict[str, Bench] = {}

    def get(self, kind: str, server: SshServer | None) -> Bench:
        if kind not in self.made:
            self.made[kind] = make_bench(kind, self.factory.mktemp(f"bench-{kind}"), server)
        return self.made[kind]

    def remove(self) -> None:
        for bench in self.made.values():
            kill_processes_under(str(bench.base))
            remove_tree(bench.base)


@pytest.fixture(scope="module")
def benches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Benches]:
    made = Benches(tmp_path_factory)
    yield made
    made.remove()


# -- snapshots ----------------------------------------------------------------


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under root: its type, mode, size (files), target (links), JSON content."""
    found: dict[str, Any] = {}
    if not os.path.lexists(root):
        return found

    def describe(path: str) -> Any:
        info = os.lstat(path)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            return ("link", os.readlink(path))
        if stat.S_ISDIR(info.st_mode):
            return ("dir", mode)
        if stat.S_ISREG(info.st_mode):
            content: Any = None
            if path.endswith(".json"):
                with open(path, "rb") as stream:
                    content = stream.read()
            return ("file", mode, info.st_size, content)
        return ("other", stat.S_IFMT(info.st_mode), mode)

    found["."] = describe(str(root))
    if stat.S_ISDIR(os.lstat(root).st_mode):
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                full = os.path.join(folder, name)
                found[os.path.relpath(full, root)] = describe(full)
    return found


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two snapshots, one line each."""
    lines = [f"removed {path}" for path in sorted(set(before) - set(after))]
    lines += [f"added {path}" for path in sorted(set(after) - set(before))]
    lines += [
        f"changed {path}: {before[path]!r} -> {after[path]!r}"
        for path in sorted(set(before) & set(after))
        if before[path] != after[path]
    ]
    return lines


# -- the rows -----------------------------------------------------------------


@dataclass
class Context:
    """What a row's setup works with; it returns the row's placeholders."""

    bench: Bench
    tmp: Path  # client side, private to the row
    srv: Path  # server side, private to the row (owned by the SSH user)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # runs the client under this

    def job(self, name: str = "job", **kwargs: Any) -> Path:
        return make_job(self.tmp / "src", name, **kwargs)


Setup = Callable[[Context], dict[str, str]]


@dataclass(frozen=True)
class Row:
    """One bad input: the command and the answer expected."""

    name: str
    command: str
    positionals: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    code: int = 1
    message: str = ""  # a regular expression the one-line message must match
    setup: Setup | None = None
    where: tuple[str, ...] = ("local", "ssh")
    destination: str = "{destination}"
    no_job_answer: bool = False  # `No job ...`, printed without `Error:`
    works: bool = False  # not bad input after all: it must succeed
    snapshot: tuple[str, ...] = ("{queue}",)  # server-side trees that must be unchanged
    deadline: float = CLI_DEADLINE
    verify: Callable[[bytes], None] | None = None  # for rows that work: checks the job's files


# setups


def with_job(**kwargs: Any) -> Setup:
    """A row's job directory, built by make_job(**kwargs), as {job}."""

    def setup(ctx: Context) -> dict[str, str]:
        return {"job": str(ctx.job(**kwargs))}

    return setup


def job_with(prepare: Callable[[Path], None], **kwargs: Any) -> Setup:
    """A job directory, then prepare(job) to spoil it."""

    def setup(ctx: Context) -> dict[str, str]:
        job = ctx.job(**kwargs)
        prepare(job)
        return {"job": str(job)}

    return setup


def missing_directory(ctx: Context) -> dict[str, str]:
    return {"job": str(ctx.tmp / "src" / "nothing-here")}


def file_not_directory(ctx: Context) -> dict[str, str]:
    path = ctx.tmp / "src" / "afile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\ntrue\n")
    return {"job": str(path)}


def symlink_script(job: Path) -> None:
    os.symlink("/bin/true", job / "link.sh")


def unreadable(kind: str) -> Setup:
    """A file or folder the client can't read (as root: run without DAC capabilities)."""

    def setup(ctx: Context) -> dict[str, str]:
        if is_root():
            if shutil.which("setpriv") is None:
                pytest.skip("root reads every file, and setpriv is missing to drop that power")
            ctx.prefix = WITHOUT_DAC
        job = ctx.job()
        if kind == "file":
            path = job / "secret.bin"
            path.write_text("secret\n")
        else:
            path = job / "secret"
            path.mkdir()
            (path / "inner.txt").write_text("inner\n")
        path.chmod(0o000)
        # The control: this client really can't read it, or the row proves nothing.
        read = "open({!r}).close()" if kind == "file" else "import os; os.listdir({!r})"
        probe = [*ctx.prefix, sys.executable, "-c", read.format(str(path))]
        done = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=30)
        assert "PermissionError" in done.stderr, f"{path} is readable: the row proves nothing"
        return {"job": str(job)}

    return setup


def fifo(job: Path) -> None:
    os.mkfifo(job / "pipe")


def unix_socket(job: Path) -> None:
    # A socket's path must be short: bind it in a short folder, then move it in.
    short = Path(tempfile.mkdtemp(prefix="tej-s-", dir="/tmp"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(short / "s"))
        os.rename(short / "s", job / "listener.sock")
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert stat.S_ISSOCK(os.lstat(job / "listener.sock").st_mode)


def has_non_utf8_name(work: bytes) -> None:
    with open(os.path.join(work, b"caf\xe9.txt"), "rb") as stream:
        assert stream.read() == b"latin-1 name\n"
    assert sorted(os.listdir(work)) == [b"caf\xe9.txt", b"start.sh"]


def job_file(content: bytes) -> Callable[[Path], None]:
    def prepare(job: Path) -> None:
        (job / "tej.json").write_bytes(content)

    return prepare


def non_utf8_name(job: Path) -> None:
    with open(os.path.join(os.fsencode(job), b"caf\xe9.txt"), "wb") as stream:
        stream.write(b"latin-1 name\n")


def queue_dir(make: Callable[[Path], None]) -> Setup:
    """A queue path of the row's own, {srv}/q, made by make(path)."""

    def setup(ctx: Context) -> dict[str, str]:
        path = ctx.srv / "q"
        make(path)
        ctx.bench.own(ctx.srv)
        return {"job": str(ctx.job()), "queue": str(path)}

    return setup


def not_a_queue(path: Path) -> None:
    path.mkdir()
    (path / "precious.txt").write_text("not tej's\n")


def plain_file(path: Path) -> None:
    path.write_text("just a file\n")


def link_loop(path: Path) -> None:
    path.write_text(json.dumps({"format": 1, "tej_link": "q"}))


def real_queue(config: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir(mode=0o700)
        for name in ("jobs", "staging", "trash", "agent"):
            (path / name).mkdir(mode=0o700)
        (path / "tej-queue.json").write_bytes(config)

    return make


QUEUE_CONFIG = b'{"created_at": "2026-01-01T00:00:00.000000Z", "format": %d, "options": {}, "runner": "default"}\n'  # noqa: E501


def read_only_queue(path: Path) -> None:
    real_queue(QUEUE_CONFIG % 1)(path)
    for folder in (path / "jobs", path / "staging", path / "trash", path / "agent", path):
        folder.chmod(0o500)


def in_read_only_folder(ctx: Context) -> dict[str, str]:
    parent = ctx.srv / "ro"
    parent.mkdir()
    ctx.bench.own(ctx.srv)
    parent.chmod(0o500)
    return {"job": str(ctx.job()), "queue": str(parent / "queue")}


def missing_python_37(ctx: Context) -> dict[str, str]:
    found = sorted(glob.glob(os.path.join(PYENV_ROOT, "versions", "3.7*", "bin", "python3.7")))
    if not found:
        if ON_CI:
            pytest.fail(f"CI must have Python 3.7 under {PYENV_ROOT} to test a too old server")
        pytest.skip(f"Python 3.7 is not installed under {PYENV_ROOT}/versions")
    return {"job": str(ctx.job()), "python": found[-1]}


def stranger_key(ctx: Context) -> dict[str, str]:
    """An ssh config whose key the server does not authorize."""
    server = ctx.bench.server
    assert server is not None
    key = ctx.tmp / "stranger_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    original = Path(server.config_path).read_text()
    assert f"IdentityFile {server.identity_file}" in original
    config = ctx.tmp / "ssh_config"
    config.write_text(original.replace(server.identity_file, str(key)))
    return {"ssh_config": str(config)}


def noisy_login(noise: str) -> Setup:
    """Login scripts that run `noise` (only for this sshd's port); undone after the row."""

    def setup(ctx: Context) -> dict[str, str]:
        return make_noise(ctx, noise)

    return setup


def make_noise(ctx: Context, noise: str) -> dict[str, str]:
    server = ctx.bench.server
    assert server is not None
    noise_block = login_script_lines(server, [f"  {noise};;"], "test_bad_input login noise")
    noise_block.__enter__()
    ctx.cleanups.append(lambda: noise_block.__exit__(None, None, None))
    seen = subprocess.run(
        server.ssh_argv("-o", "ControlPath=none", "true"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert NOISE in seen.stdout, "the login scripts do not print: the row proves nothing"
    return {"job": str(ctx.job())}


BAD_IDS = [
    ("empty", "", r"identifier can't be empty"),
    ("dot", ".", r"Invalid job identifier '\.'"),
    ("dotdot", "..", r"Invalid job identifier '\.\.'"),
    ("slash", "a/b", r"Invalid job identifier 'a/b'"),
    ("space", "a b", r"Invalid job identifier 'a b'"),
    ("newline", "a\nb", r"Invalid job identifier 'a\\nb'"),
    ("subshell", "$(rm -rf x)", r"Invalid job identifier '\$\(rm -rf x\)'"),
    ("semicolon", ";ls", r"Invalid job identifier ';ls'"),
    ("129-chars", "x" * 129, r"Invalid job identifier 'x{129}': use at most 128"),
]

# fmt: off
ROWS: list[Row] = [
    # the job directory
    Row("dir-missing", "submit", ("{job}",), message=r"No such directory: .*nothing-here",
        setup=missing_directory),
    Row("dir-is-a-file", "submit", ("{job}",), message=r"Not a directory: .*afile",
        setup=file_not_directory),
    Row("no-start-sh", "submit", ("{job}",), message=r"No start\.sh in .*: add one, or .*--script",
        setup=with_job(script=None, files={"other.sh": "#!/bin/sh\n"})),
    Row("script-missing", "submit", ("{job}",), ("--script", "nope.sh"),
        message=r"No script 'nope\.sh' in", setup=with_job()),
    Row("script-dotdot", "submit", ("{job}",), ("--script", "../x"),
        message=r"script '\.\./x' must be a path inside", setup=with_job()),
    Row("script-absolute", "submit", ("{job}",), ("--script", "/bin/sh"),
        message=r"script '/bin/sh' must be a path inside", setup=with_job()),
    Row("script-symlink-out", "submit", ("{job}",), ("--script", "link.sh"),
        message=r"The script 'link\.sh' leads outside", setup=job_with(symlink_script)),
    Row("file-unreadable", "submit", ("{job}",), message=r"Can't read the file .*secret\.bin",
        setup=unreadable("file")),
    Row("folder-unreadable", "submit", ("{job}",), message=r"Can't read the folder .*secret",
        setup=unreadable("folder")),
    Row("fifo", "submit", ("{job}",),
        message=r"Can't upload .*pipe: only files, folders and symlinks", setup=job_with(fifo)),
    Row("socket", "submit", ("{job}",),
        message=r"Can't upload .*listener\.sock: only files, folders and symlinks",
        setup=job_with(unix_socket)),
    Row("name-not-utf8", "submit", ("{job}",), ("--id", "latin1_name"), code=0, works=True,
        setup=job_with(non_utf8_name), verify=has_non_utf8_name),
    Row("tej-json-empty", "submit", ("{job}",), message=r"tej\.json is empty",
        setup=job_with(job_file(b""))),
    Row("tej-json-blank", "submit", ("{job}",), message=r"tej\.json is empty",
        setup=job_with(job_file(b" \n\t\n"))),
    Row("tej-json-huge", "submit", ("{job}",), message=r"tej\.json is larger than 1024 KiB",
        setup=job_with(job_file(b'{"args": ["' + b"x" * (1 << 20) + b'"]}'))),
    Row("tej-json-unknown-key", "submit", ("{job}",),
        message=r"Unknown key 'maxruntime' in tej\.json \(did you mean 'max_runtime'\?\)",
        setup=job_with(job_file(b'{"maxruntime": "1h"}'))),
    Row("tej-json-not-json", "submit", ("{job}",), message=r"tej\.json is not valid JSON",
        setup=job_with(job_file(b'{"args": [}'))),
    Row("tej-json-not-object", "submit", ("{job}",), message=r"tej\.json must hold a JSON object",
        setup=job_with(job_file(b'["start.sh"]'))),
    Row("tej-json-not-utf8", "submit", ("{job}",), message=r"Can't read .*tej\.json",
        setup=job_with(job_file(b'{"args": ["\xff"]}'))),
    # ids, refused by submit and by delete
    *[
        Row(f"submit-id-{name}", "submit", ("{job}",), ("--id", value), message=message,
            setup=with_job())
        for name, value, message in BAD_IDS
    ],
    *[
        Row(f"delete-id-{name}", "delete", (), ("--id", value, "--force"), message=message)
        for name, value, message in BAD_IDS
    ],
    # jobs that don't exist: an answer, not an error
    Row("status-no-job", "status", (), ("--id", "no_such_job"), code=3, no_job_answer=True,
        message=r"^No job with that identifier$"),
    Row("kill-no-job", "kill", (), ("--id", "no_such_job"), code=3, no_job_answer=True,
        message=r"^No job 'no_such_job'$"),
    Row("delete-no-job", "delete", (), ("--id", "no_such_job"), code=3, no_job_answer=True,
        message=r"^No job 'no_such_job'$"),
    Row("logs-no-job", "logs", (), ("--id", "no_such_job"), code=3, no_job_answer=True,
        message=r"^No job 'no_such_job'$"),
    Row("wait-no-job", "wait", (), ("--id", "no_such_job"), code=3, no_job_answer=True,
        message=r"^No job 'no_such_job'$"),
    Row("download-no-job", "download", ("out.txt",), ("--id", "no_such_job"), code=3,
        no_job_answer=True, message=r"^No job 'no_such_job'$"),
    # an empty duration is not "no limit": a finished job is not pruned for it
    Row("prune-older-than-empty", "prune", (), ("--older-than", ""),
        message=r"Invalid duration for --older-than: ''"),
    Row("wait-timeout-empty", "wait", (), ("--id", FINISHED_ID, "--timeout", ""),
        message=r"Invalid duration for --timeout: ''"),
    # download paths
    Row("download-absolute", "download", ("/etc/passwd",), ("--id", FINISHED_ID),
        message=r"Path '/etc/passwd' is absolute"),
    Row("download-dotdot", "download", ("../x",), ("--id", FINISHED_ID),
        message=r"Path '\.\./x' leaves the job's directory"),
    Row("download-inner-dotdot", "download", ("a/../../x",), ("--id", FINISHED_ID),
        message=r"Path 'a/\.\./\.\./x' leaves the job's directory"),
    Row("download-symlink-out", "download", ("escape",), ("--id", FINISHED_ID),
        message=r"Path 'escape' leaves the job's directory"),
    Row("download-through-symlink", "download", ("escape-dir/passwd",), ("--id", FINISHED_ID),
        message=r"Path 'escape-dir/passwd' leaves the job's directory"),
    Row("download-missing", "download", ("nope.txt",), ("--id", FINISHED_ID),
        message=r"No file 'nope\.txt' in job 'finished_job'"),
    Row("download-missing-to-stdout", "download", ("sub/nope.txt:",), ("--id", FINISHED_ID),
        message=r"No file 'sub/nope\.txt' in job 'finished_job'"),
    # destinations
    Row("dest-option-injection", "list", destination="-oProxyCommand=x", where=("ssh",),
        message=r"Invalid destination '-oProxyCommand=x'"),
    Row("dest-space", "list", destination="a b", where=("ssh",),
        message=r"Invalid destination 'a b'"),
    Row("dest-empty", "list", destination="", where=("ssh",),
        message=r"Invalid destination ''"),
    Row("dest-port-0", "list", destination="ssh://h:0", where=("ssh",),
        message=r"Invalid port in destination 'ssh://h:0'"),
    Row("dest-port-99999", "list", destination="ssh://h:99999", where=("ssh",),
        message=r"Invalid port in destination 'ssh://h:99999'"),
    Row("dest-host-colon-port", "list", destination="host:22", where=("ssh",),
        message=r"Invalid destination 'host:22': to give a port, use ssh://host:port"),
    Row("dest-password", "list", destination="ssh://me:secret@h", where=("ssh",),
        message=r"passwords are not accepted"),
    Row("dest-unknown-host", "list", destination="nosuchhost.invalid", where=("ssh",), code=5,
        message=r"nosuchhost\.invalid.*(resolve|not known|no address)"),
    Row("dest-refused-port", "list", destination="ssh://127.0.0.1:1", where=("ssh",), code=5,
        message=r"Cannot connect to ssh://127\.0\.0\.1:1: .*refused"),
    Row("dest-auth-failed", "list", options=("--no-reuse",), where=("ssh",), code=5,
        message=r"Cannot connect to tejtest: .*Permission denied", setup=stranger_key),
    # the server's Python
    Row("python-missing", "submit", ("{job}",), ("--python", "/nonexistent/python3"), code=5,
        message=r"/nonexistent/python3.*--python", setup=with_job()),
    Row("python-3.7", "submit", ("{job}",), ("--python", "{python}"), code=5, where=("local",),
        message=r"Python 3\.7\.\d+ on local is too old: tej needs Python 3\.8",
        setup=missing_python_37),
    Row("login-noise", "submit", ("{job}",), ("--id", "noisy_login"), code=0, works=True,
        where=("ssh",), setup=noisy_login(f"echo '{NOISE}'; echo; echo '  {NOISE} again'")),
    # A correct tej answers in a second or two; this one must not wait for a timeout.
    Row("login-noise-no-newline", "submit", ("{job}",), ("--id", "noisy_login2"), code=0,
        works=True, where=("ssh",), deadline=15.0,
        setup=noisy_login(f"echo '{NOISE}'; printf '{NOISE} without a newline'")),
    # the queue
    Row("queue-not-a-queue", "submit", ("{job}",), message=r"q exists but is not a tej queue",
        setup=queue_dir(not_a_queue), snapshot=("{srv}",)),
    Row("queue-not-a-queue-list", "list", message=r"q exists but is not a tej queue",
        setup=queue_dir(not_a_queue), snapshot=("{srv}",)),
    Row("queue-is-a-file", "submit", ("{job}",), message=r"q is a file, not a tej queue or link",
        setup=queue_dir(plain_file), snapshot=("{srv}",)),
    Row("queue-link-loop", "submit", ("{job}",), message=r"Links form a loop",
        setup=queue_dir(link_loop), snapshot=("{srv}",)),
    Row("queue-format-99", "submit", ("{job}",),
        message=r"written by a newer tej \(format 99; this tej reads up to 2\): upgrade tej",
        setup=queue_dir(real_queue(QUEUE_CONFIG % 99)), snapshot=("{srv}",)),
    Row("queue-format-99-status", "status", (), ("--id", "any"),
        message=r"written by a newer tej", setup=queue_dir(real_queue(QUEUE_CONFIG % 99)),
        snapshot=("{srv}",)),
    Row("queue-config-not-json", "submit", ("{job}",), message=r"tej-queue\.json is not valid",
        setup=queue_dir(real_queue(b"{format")), snapshot=("{srv}",)),
    # root writes anywhere: these two need the unprivileged SSH user
    Row("queue-read-only", "submit", ("{job}",), where=("ssh",),
        message=r"Permission denied: .*/q/(staging|index)", setup=queue_dir(read_only_queue),
        snapshot=("{srv}",)),
    Row("queue-parent-read-only", "submit", ("{job}",), where=("ssh",),
        message=r"Permission denied: .*/ro/queue", setup=in_read_only_folder,
        snapshot=("{srv}",)),
]
# fmt: on


def cases() -> list[Any]:
    params = []
    for row in ROWS:
        for kind in row.where:
            marks = [pytest.mark.ssh] if kind == "ssh" else []
            params.append(pytest.param(row, kind, id=f"{kind}-{row.name}", marks=marks))
    return params


@pytest.mark.parametrize(("row", "kind"), cases())
def test_bad_input(
    row: Row, kind: str, benches: Benches, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue("ssh_server") if kind == "ssh" else None
    bench = benches.get(kind, server)
    srv = Path(tempfile.mkdtemp(prefix="row-", dir=bench.base))
    bench.own(srv)
    ctx = Context(bench, tmp_path, srv)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "x").write_text("canary\n")
    values = {
        "destination": bench.destination,
        "queue": str(bench.queue),
        "srv": str(srv),
        "ssh_config": bench.ssh_config or "",
    }
    try:
        if row.setup is not None:
            values.update(row.setup(ctx))
        trees = [Path(pattern.format_map(values)) for pattern in row.snapshot]
        trees.append(bench.queue)
        before = {tree: snapshot(tree) for tree in trees}
        done = run_on_bench(
            bench,
            row.command,
            queue=values["queue"],
            options=[option.format_map(values) for option in row.options],
            destination=row.destination.format_map(values),
            positionals=[arg.format_map(values) for arg in row.positionals],
            cwd=cwd,
            ssh_config=values["ssh_config"] or None,
            prefix=ctx.prefix,
            deadline=row.deadline,
        )
        assert "Traceback" not in done.stderr, done.stderr
        if row.works:
            check_success(row, bench, done, before)
        else:
            check_refusal(row, done)
            for tree in trees:
                changes = differences(before[tree], snapshot(tree))
                assert not changes, f"{tree} changed:\n" + "\n".join(changes)
        assert sorted(os.listdir(cwd)) == ["x"], "the command wrote to the client's folder"
        assert (bench.base / "x").read_text() == "canary\n"
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
        remove_tree(srv)


def check_refusal(row: Row, done: subprocess.CompletedProcess[str]) -> None:
    """Exit code, exactly one line on stderr (`Error: ...` or `No job ...`), no stdout."""
    assert done.returncode == row.code, (done.returncode, done.stderr)
    assert done.stdout == "", done.stdout
    assert re.fullmatch(r"[^\n]+\n", done.stderr), f"not one line: {done.stderr!r}"
    line = done.stderr.rstrip("\n")
    if row.no_job_answer:
        assert not line.startswith("Error:"), line
        message = line
    else:
        assert line.startswith("Error: "), line
        message = line[len("Error: ") :]
    assert re.search(row.message, message), f"{row.message!r} not found in {message!r}"


def check_success(
    row: Row, bench: Bench, done: subprocess.CompletedProcess[str], before: dict[Path, Any]
) -> None:
    """The job was submitted and arrived whole; nothing else in the queue changed."""
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    job_id = done.stdout.splitlines()[-1]
    assert done.stdout == f"Job submitted as:\n{job_id}\n"
    wait_for_end(bench, job_id)
    work = os.fsencode(bench.queue / "jobs" / job_id / "work")
    assert os.path.isfile(os.path.join(work, b"start.sh"))
    if row.verify is not None:
        row.verify(work)
    after = snapshot(bench.queue)
    changes = differences(before[bench.queue], after)
    # The job, and its files' contents in the store (a lease, blobs, shared link counts).
    # The index follows the job (its marker, its row: derived state, docs/queue-format.md).
    expected = re.compile(
        rf"added jobs/{re.escape(job_id)}\b|(added|removed|changed) (store|index)/"
    )
    unexpected = [line for line in changes if not expected.match(line)]
    assert not unexpected, "\n".join(unexpected)
