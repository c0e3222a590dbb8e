"""A real OpenSSH server on loopback, for tests.

`start_sshd()` runs `/usr/sbin/sshd` on 127.0.0.1 on a free port with throwaway host and
client keys, and returns an `SshServer` whose private ssh_config (`ssh -F config_path`)
logs in without prompts. As root the login is an unprivileged account, `tejtest`, created
if missing (real users are not root); otherwise it is the current user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SSHD = "/usr/sbin/sshd"
TEST_USER = "tejtest"
ALIAS = "tejtest"
HOST = "127.0.0.1"
BANNER_DEADLINE = 10.0
LOGIN_DEADLINE = 15.0
PORT_ATTEMPTS = 5
USER_LOCK = "/tmp/tej-sshd-useradd.lock"
# Sane environment for commands run as the SSH user, whatever the caller's environment.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"

# Options only newer OpenSSH versions know; each is kept only if this sshd accepts it.
# Penalties (OpenSSH 9.8+) would make deliberately failing connections in tests slow others.
OPTIONAL_SSHD_LINES = ("PerSourcePenalties no",)
# Every session gets SLURM_CONF=<tmpdir>/slurm.conf, where a test Slurm cluster (tests/slurm.py)
# writes its configuration: Slurm commands run over ssh find it, whatever the login shell.
SLURM_CONF_NAME = "slurm.conf"


class UserRunner(Protocol):
    """Runs an argv list as the SSH user on this machine, without ssh (see `run_as`)."""

    def __call__(
        self, argv: Sequence[str], *, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv; return its exit status and text output, never raising on failure."""
        ...


def is_root() -> bool:
    """Tell whether this process runs as root."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class SshServer:
    """A running sshd on loopback, and how to log in to it."""

    alias: str
    config_path: str
    host: str
    port: int
    user: str
    home: str
    uid: int
    gid: int
    identity_file: str
    log_path: str
    tmpdir: str
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    @property
    def slurm_conf(self) -> str:
        """The SLURM_CONF this sshd sets in its sessions; it exists while a test cluster runs."""
        return str(Path(self.tmpdir) / SLURM_CONF_NAME)

    @property
    def url(self) -> str:
        """The destination as an ssh URL, `ssh://USER@127.0.0.1:PORT`."""
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def ssh_argv(self, *command: str) -> list[str]:
        """Return the argv of `ssh -F config alias COMMAND...`."""
        return ["ssh", "-F", self.config_path, self.alias, *command]

    def run_as_user(
        self, argv: Sequence[str], *, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv on this machine as the SSH user, without ssh, in the user's home."""
        return run_as(self.user, self.home, argv, timeout=timeout, input=input)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of sshd's log."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop sshd and its connection processes, and remove the temporary files."""
        stop_process_tree(self.process)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def sshd_available() -> str | None:
    """Return None if a test sshd can run here, else the reason why not."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (install openssh-client)"
    if is_root():
        missing = [t for t in ("useradd", "usermod", "runuser") if shutil.which(t) is None]
        return f"missing as root: {', '.join(missing)}" if missing else None
    return _trial_start()


def _trial_start() -> str | None:
    """As non-root, find out by starting and stopping a server."""
    try:
        start_sshd().stop()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        return f"not root and cannot run sshd as {_current_user().pw_name}: {error}"
    return None


def start_sshd() -> SshServer:
    """Start sshd on a free loopback port and check that a login works."""
    account = ensure_test_user() if is_root() else _current_user()
    tmpdir = _make_tmpdir()
    try:
        return _start_in(tmpdir, account)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _start_in(tmpdir: Path, account: pwd.struct_passwd) -> SshServer:
    host_key, client_key = _make_keys(tmpdir)
    _write_authorized_key(tmpdir, account, client_key)
    for _attempt in range(PORT_ATTEMPTS):
        port = free_port()
        server = _launch(tmpdir, account, port, host_key, client_key)
        if server is None:
            continue
        try:
            _check_login(server)
        except BaseException:
            server.stop()
            raise
        return server
    raise RuntimeError(f"sshd found no free port in {PORT_ATTEMPTS} attempts")


def _launch(
    tmpdir: Path, account: pwd.struct_passwd, port: int, host_key: Path, client_key: Path
) -> SshServer | None:
    """Start sshd on port; return None if the port was taken meanwhile."""
    if is_root():  # sshd, and `sshd -t` in _sshd_accepts, refuse to run without it
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd_config = _write_sshd_config(tmpdir, port, host_key)
    client_config = _write_client_config(tmpdir, port, account.pw_name, client_key)
    log_path = tmpdir / "sshd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(sshd_config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    server = SshServer(
        alias=ALIAS,
        config_path=str(client_config),
        host=HOST,
        port=port,
        user=account.pw_name,
        home=account.pw_dir,
        uid=account.pw_uid,
        gid=account.pw_gid,
        identity_file=str(client_key),
        log_path=str(log_path),
        tmpdir=str(tmpdir),
        process=process,
    )
    if _wait_for_banner(server):
        return server
    stop_process_tree(process)
    if "Address already in use" in log_tail(str(log_path)):
        return None
    raise RuntimeError(f"sshd did not start on port {port}; log:\n{log_tail(str(log_path))}")


def _wait_for_banner(server: SshServer) -> bool:
    """Wait until sshd greets with its SSH-2.0 banner; False if it exits or never does."""
    deadline = time.monotonic() + BANNER_DEADLINE
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        if _read_banner(server.host, server.port).startswith(b"SSH-2.0"):
            return True
        time.sleep(0.05)
    return False


def _read_banner(host: str, port: int) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            return sock.recv(64)
    except OSError:
        return b""


def _check_login(server: SshServer) -> None:
    """Log in with `ssh -F config alias true` until it works; raise if it never does."""
    deadline = time.monotonic() + LOGIN_DEADLINE
    result = ""
    while time.monotonic() < deadline:
        remaining = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(
                server.ssh_argv("true"),
                check=False,
                capture_output=True,
                text=True,
                timeout=remaining,
            )
        except subprocess.TimeoutExpired:
            result = "ssh timed out"
            break
        if done.returncode == 0:
            return
        result = f"ssh exited {done.returncode}: {done.stderr.strip()}"
        if "Permission denied" in done.stderr:
            break  # Retrying cannot fix the keys or the account.
        time.sleep(0.2)
    raise RuntimeError(
        f"sshd on port {server.port} is up but login as {server.user} fails ({result}); "
        f"sshd log:\n{server.log_tail()}"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _make_tmpdir() -> Path:
    """Make the server's temporary directory, traversable by the SSH user."""
    # As root, stay out of a TMPDIR the unprivileged user could not traverse.
    tmpdir = Path(tempfile.mkdtemp(prefix="tej-sshd-", dir="/tmp" if is_root() else None))
    tmpdir.chmod(0o711)
    return tmpdir


def _make_keys(tmpdir: Path) -> tuple[Path, Path]:
    """Generate a host key and a client key; return their private key paths."""
    host_key, client_key = tmpdir / "ssh_host_ed25519_key", tmpdir / "client_ed25519"
    for path in (host_key, client_key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tej-test", "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return host_key, client_key


def _write_authorized_key(tmpdir: Path, account: pwd.struct_passwd, client_key: Path) -> None:
    """Authorize the client key in a file the user owns (sshd reads it as the user)."""
    directory = tmpdir / "authorized"
    directory.mkdir(mode=0o711)
    directory.chmod(0o711)
    keys = directory / account.pw_name
    keys.write_text(Path(f"{client_key}.pub").read_text())
    keys.chmod(0o600)
    if is_root():
        os.chown(keys, account.pw_uid, account.pw_gid)


def _write_sshd_config(tmpdir: Path, port: int, host_key: Path) -> Path:
    lines = [
        f"ListenAddress {HOST}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {tmpdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmpdir / 'authorized'}/%u",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "LogLevel VERBOSE",
        "PermitRootLogin no",
        # Tests open many connections at once (parallel tests, ControlMaster sessions).
        "MaxStartups 100",
        "MaxSessions 100",
        "Subsystem sftp internal-sftp",
    ]
    # No AcceptEnv: the client's environment does not leak into the server.
    path = tmpdir / "sshd_config"
    path.write_text("\n".join(lines) + "\n")
    optional = [*OPTIONAL_SSHD_LINES, f"SetEnv SLURM_CONF={tmpdir / SLURM_CONF_NAME}"]
    accepted = [line for line in optional if _sshd_accepts(path, line)]
    path.write_text("\n".join(lines + accepted) + "\n")
    return path


def _sshd_accepts(config: Path, line: str) -> bool:
    """Tell whether sshd accepts config plus one more line (`sshd -t`)."""
    trial = config.with_suffix(".trial")
    trial.write_text(config.read_text() + line + "\n")
    try:
        done = subprocess.run(
            [SSHD, "-t", "-f", str(trial)], check=False, capture_output=True, timeout=30
        )
    finally:
        trial.unlink()
    return done.returncode == 0


def _write_client_config(tmpdir: Path, port: int, user: str, client_key: Path) -> Path:
    common = [
        f"IdentityFile {client_key}",
        "IdentitiesOnly yes",
        "StrictHostKeyChecking no",
        "UserKnownHostsFile /dev/null",
        "BatchMode yes",
        "LogLevel ERROR",
        "ConnectTimeout 10",
    ]
    # ssh takes the first value it reads, so the alias section must come first.
    lines = [f"Host {ALIAS}", f"  HostName {HOST}", f"  Port {port}", f"  User {user}"]
    lines += [f"  {line}" for line in common]
    lines += ["", "Host *"] + [f"  {line}" for line in common]
    path = tmpdir / "ssh_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def ensure_test_user() -> pwd.struct_passwd:
    """As root, create the unprivileged login `tejtest` if missing; allow key-only logins."""
    with _user_lock():
        try:
            account = pwd.getpwnam(TEST_USER)
        except KeyError:
            _run_checked(["useradd", "-m", "-s", "/bin/bash", TEST_USER])
            account = pwd.getpwnam(TEST_USER)
        # With UsePAM no, sshd refuses the locked password `!` that useradd writes.
        _run_checked(["usermod", "-p", "*", TEST_USER])
    os.makedirs(account.pw_dir, mode=0o755, exist_ok=True)
    os.chown(account.pw_dir, account.pw_uid, account.pw_gid)
    return account


LOGIN_FILES_LOCK = "/tmp/tej-test-login-files.lock"


@contextlib.contextmanager
def login_script_lines(server: SshServer, lines: Sequence[str], tag: str) -> Iterator[None]:
    """Prepend lines to the SSH user's ~/.bashrc and ~/.profile, for this sshd's port only.

    Each line is a shell `case` branch body ending in `;;`. Other test sessions logging in
    as the same user (on other ports) are not affected; edits are serialized by a lock, and
    the block (and any file created for it) is removed afterwards. Prepended because
    Debian's .bashrc returns early for non-interactive shells.
    """
    block = "\n".join(
        [
            f"# >>> tej tests: {tag} >>>",
            f'case "$SSH_CONNECTION" in *" {server.port}")',
            *lines,
            "esac",
            f"# <<< tej tests: {tag} <<<",
            "",
        ]
    )
    paths = [Path(server.home) / name for name in (".bashrc", ".profile")]
    created: list[Path] = []
    with _file_lock(LOGIN_FILES_LOCK):
        for path in paths:
            if not path.exists():
                path.write_text("")
                if is_root():
                    os.chown(path, server.uid, server.gid)
                created.append(path)
            path.write_text(block + path.read_text())
    try:
        yield
    finally:
        with _file_lock(LOGIN_FILES_LOCK):
            for path in paths:
                text = path.read_text().replace(block, "", 1)
                if path in created and not text:
                    path.unlink()
                else:
                    path.write_text(text)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive lock on a file, shared by parallel test processes."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _user_lock() -> Iterator[None]:
    """Serialize account changes between parallel test processes."""
    with _file_lock(USER_LOCK):
        yield


def _run_checked(argv: list[str]) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def _current_user() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


def run_as(
    user: str, home: str, argv: Sequence[str], *, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv as user (via runuser when root), in home, with a minimal environment."""
    env = {
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "PATH": USER_PATH,
        "LANG": "C.UTF-8",
    }
    if is_root():
        argv = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", user, "--", *argv]
    else:
        env["PATH"] = os.environ.get("PATH", USER_PATH)
    return subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        cwd=home,
        env=env,
    )


def log_tail(path: str, lines: int = 30) -> str:
    """Return the last lines of a log file, or a note if it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(text.splitlines()[-lines:])


def stop_process_tree(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate a process and its current descendants: TERM, then KILL after grace."""
    pids = [*descendants(process.pid), process.pid] if process.poll() is None else []
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    _signal_all([pid for pid in pids if _alive(pid)], signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


def _signal_all(pids: Sequence[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def descendants(root: int) -> list[int]:
    """PIDs below root in the process tree (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_table():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _parent_table() -> Iterator[tuple[int, int]]:
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _read_stat(int(entry.name))
        if stat is not None:
            yield int(entry.name), int(stat[1])


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, ..."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    """Tell whether pid runs; a zombie waiting for its parent to reap it counts as dead."""
    stat = _read_stat(pid)
    return stat is not None and stat[0] != "Z"
