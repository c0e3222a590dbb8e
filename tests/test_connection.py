"""Connection failures end quickly with one clear line; a session survives long use.

Every failure here goes through the real command line (or the API where the CLI has no
knob) against real processes: the loopback sshd, a port nobody listens on, a server that
accepts TCP and never says a word, a key the server does not know.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from helpers import SilentServer, run_tej, tej_env
from sshd import SshServer, login_script_lines

import tej

CLI_DEADLINE = 60.0
API_DEADLINE = 30.0
QUICK_TIMEOUT_LIMIT = 10.0
NOISE = "hello from bashrc"
T = TypeVar("T")


# helpers


def clean_env(path_prefix: str | None = None) -> dict[str, str]:
    """The environment of tej commands, without settings that would leak from the caller."""
    env = tej_env()
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return env


def error_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """Check that tej failed with exit_code and exactly one `Error: ...` line; return it."""
    assert done.returncode == exit_code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(r"Error: [^\n]+\n", done.stderr), repr(done.stderr)
    return done.stderr[len("Error: ") :].rstrip("\n")


def ssh_options(server: SshServer) -> list[str]:
    return ["--ssh-config", server.config_path]


def within(deadline: float, function: Callable[[], T]) -> T:
    """Run function in a thread; fail the test if it has not returned within deadline."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(function)
    try:
        return future.result(timeout=deadline)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"no answer within {deadline:.0f} s (hang)")
    finally:
        pool.shutdown(wait=False)


def make_job(parent: Path, script: str = "#!/bin/sh\necho hi > out.txt\n") -> str:
    directory = parent / "job"
    directory.mkdir()
    start = directory / "start.sh"
    start.write_text(script)
    start.chmod(0o755)
    return str(directory)


# the server cannot be reached


@pytest.mark.ssh
def test_unknown_host(ssh_server: SshServer) -> None:
    done = run_tej("list", "nosuchhost.invalid", *ssh_options(ssh_server))
    message = error_line(done, 5)
    assert "nosuchhost.invalid" in message
    assert re.search(r"resolve|not known|no address", message, re.IGNORECASE), message


@pytest.mark.ssh
def test_refused_port(ssh_server: SshServer) -> None:
    done = run_tej("list", "ssh://127.0.0.1:1", *ssh_options(ssh_server))
    message = error_line(done, 5)
    assert "ssh://127.0.0.1:1" in message
    assert "refused" in message.lower(), message


@pytest.mark.ssh
def test_failed_authentication(ssh_server: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    original = Path(ssh_server.config_path).read_text()
    assert f"IdentityFile {ssh_server.identity_file}" in original
    config = tmp_path / "ssh_config"
    config.write_text(original.replace(ssh_server.identity_file, str(stranger)))
    # --no-reuse: a connection shared by earlier tests would log in without a key.
    done = run_tej("list", ssh_server.alias, "--ssh-config", str(config), "--no-reuse")
    message = error_line(done, 5)
    assert ssh_server.alias in message
    assert "Permission denied" in message, message


@pytest.mark.ssh
@pytest.mark.parametrize("python", ["/nonexistent/python3", "no-such-python3"])
def test_missing_python_on_the_server(ssh_server: SshServer, python: str) -> None:
    done = run_tej("list", ssh_server.alias, *ssh_options(ssh_server), "--python", python)
    message = error_line(done, 5)
    assert python in message
    assert "--python" in message


def test_missing_python_locally(tmp_path: Path) -> None:
    python = str(tmp_path / "no-such-python3")
    done = run_tej("list", "local", "--queue", str(tmp_path / "q"), "--python", python)
    message = error_line(done, 5)
    assert python in message
    assert "--python" in message


# a server that accepts TCP and never answers


@pytest.mark.ssh
def test_silent_server_times_out_through_the_api(
    ssh_server: SshServer, silent_server: SilentServer
) -> None:
    destination = f"ssh://127.0.0.1:{silent_server.port}"
    remote = tej.RemoteQueue(destination, ssh_config=ssh_server.config_path, connect_timeout=2)

    def connect() -> BaseException | None:
        try:
            remote.list()
        except tej.TejError as exc:
            return exc
        return None

    started = time.monotonic()
    error = within(API_DEADLINE, connect)
    elapsed = time.monotonic() - started
    remote.close()
    assert isinstance(error, tej.ConnectionFailed), error
    assert silent_server.connections, "ssh never reached the silent server"
    assert elapsed < QUICK_TIMEOUT_LIMIT, f"took {elapsed:.1f} s with connect_timeout=2"
    assert "\n" not in str(error)
    assert destination in str(error)


@pytest.mark.ssh
def test_silent_server_times_out_through_the_cli(
    ssh_server: SshServer, silent_server: SilentServer
) -> None:
    destination = f"ssh://127.0.0.1:{silent_server.port}"
    done = run_tej("list", destination, *ssh_options(ssh_server), timeout=CLI_DEADLINE)
    message = error_line(done, 5)
    assert destination in message
    assert silent_server.connections, "ssh never reached the silent server"


# destinations that do not parse never start ssh


@pytest.fixture
def fake_ssh(tmp_path: Path) -> tuple[str, Path]:
    """A directory holding an `ssh` that only records that it ran; and its record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ssh-ran"
    ssh = bin_dir / "ssh"
    ssh.write_text(f'#!/bin/sh\necho "$@" >> {record}\necho "fake ssh refuses" >&2\nexit 255\n')
    ssh.chmod(0o755)
    return str(bin_dir), record


def test_fake_ssh_is_what_tej_runs(fake_ssh: tuple[str, Path]) -> None:
    """The control of the next test: a valid destination does reach the fake ssh."""
    bin_dir, record = fake_ssh
    done = run_tej("list", "valid-host", env=clean_env(bin_dir))
    assert "fake ssh refuses" in error_line(done, 5)
    assert "valid-host" in record.read_text()


@pytest.mark.parametrize("destination", ["-oProxyCommand=x", "a b", "ssh://h:99999"])
def test_unparsable_destination(destination: str, fake_ssh: tuple[str, Path]) -> None:
    bin_dir, record = fake_ssh
    done = run_tej("list", "--", destination, env=clean_env(bin_dir))
    message = error_line(done, 1)
    assert repr(destination) in message or destination in message, message
    assert done.stdout == ""
    assert not record.exists(), f"ssh was started: {record.read_text()}"


# login scripts that print to stdout


@pytest.fixture
def noisy_login(ssh_server: SshServer) -> Iterator[None]:
    """Make the SSH user's ~/.bashrc and ~/.profile print to stdout; undo it afterwards.

    The noise is printed only for connections to this test session's sshd (its port is in
    $SSH_CONNECTION), so other test sessions logging in as the same user are not disturbed.
    """
    lines = [f"  echo '{NOISE}'; echo '{NOISE} again'; echo '';;"]
    with login_script_lines(ssh_server, lines, "test_connection login noise"):
        yield


@pytest.mark.ssh
@pytest.mark.usefixtures("noisy_login")
def test_login_noise_is_skipped(ssh_server: SshServer, server_tmp: str, tmp_path: Path) -> None:
    seen = subprocess.run(
        ssh_server.ssh_argv("true"), capture_output=True, text=True, timeout=30, check=False
    )
    assert NOISE in seen.stdout, "the login scripts do not print: the test proves nothing"
    target = [ssh_server.alias, *ssh_options(ssh_server), "--queue", f"{server_tmp}/queue"]
    done = run_tej("submit", *target, make_job(tmp_path), "--json")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    job_id = json.loads(done.stdout)["id"]
    status = run_tej("status", *target, "--id", job_id, "--json")
    assert (status.returncode, status.stderr) == (0, ""), status.stderr
    assert json.loads(status.stdout)["state"] in ("starting", "running", "finished")


# one session, many requests; a session that dies


@pytest.mark.ssh
def test_session_serves_many_requests(
    ssh_server: SshServer, server_tmp: str, tmp_path: Path
) -> None:
    remote = tej.RemoteQueue(
        ssh_server.alias, f"{server_tmp}/queue", ssh_config=ssh_server.config_path
    )
    with remote:
        session = remote.session()
        job_id = remote.submit(make_job(tmp_path))

        def ask() -> tuple[int, int]:
            found = missing = 0
            for number in range(500):
                if number == 250:
                    assert remote.status(job_id).id == job_id
                    found += 1
                    continue
                with pytest.raises(tej.JobNotFound):
                    remote.status(f"nosuchjob-{number}")
                missing += 1
            return found, missing

        assert within(API_DEADLINE * 2, ask) == (1, 499)
        assert remote.session() is session, "the session was reopened"
        assert session._io is not None and session._io.popen.poll() is None


def _lost_session_error(remote: tej.RemoteQueue) -> BaseException | None:
    try:
        remote.status("nosuchjob")
    except tej.TejError as exc:
        return exc
    return None


@pytest.mark.ssh
def test_killed_ssh_client_fails_the_next_call(ssh_server: SshServer, server_tmp: str) -> None:
    remote = tej.RemoteQueue(
        ssh_server.alias, f"{server_tmp}/queue", ssh_config=ssh_server.config_path
    )
    try:
        assert remote.list() == []
        io = remote.session()._io
        assert io is not None
        io.popen.kill()
        io.popen.wait(timeout=10)
        error = within(API_DEADLINE, lambda: _lost_session_error(remote))
    finally:
        remote.close()
    assert isinstance(error, tej.ConnectionFailed), error
    assert "\n" not in str(error), str(error)
    assert ssh_server.alias in str(error), str(error)


@pytest.mark.ssh
def test_killed_agent_fails_the_next_call(ssh_server: SshServer, server_tmp: str) -> None:
    """The server side ends the session: the agent's process (its pid from hello) is killed."""
    remote = tej.RemoteQueue(
        ssh_server.alias, f"{server_tmp}/queue", ssh_config=ssh_server.config_path
    )
    try:
        assert remote.list() == []
        pid = remote.session().server["pid"]
        with open(f"/proc/{pid}/status") as stream:
            owner = next(line for line in stream if line.startswith("Uid:")).split()[1]
        assert int(owner) == ssh_server.uid, "the pid from hello is not the SSH user's agent"
        os.kill(pid, 9)
        error = within(API_DEADLINE, lambda: _lost_session_error(remote))
    finally:
        remote.close()
    assert isinstance(error, tej.ConnectionFailed), error
    assert "\n" not in str(error), str(error)
    assert ssh_server.alias in str(error), str(error)


def test_a_session_uses_execnets_gateway_base_alone(tmp_path: Path) -> None:
    """The client speaks execnet's protocol without importing the execnet package."""
    code = (
        "import sys, tej\n"
        f"with tej.RemoteQueue('local', queue={str(tmp_path / 'queue')!r}) as remote:\n"
        "    remote.list()\n"
        "print('execnet' in sys.modules, 'tej._execnet_gateway_base' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=API_DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


RACE = """
import sys, threading
sys.setswitchinterval(1e-6)  # threads switch often: a race shows
from tej import gateway
barrier = threading.Barrier(16)
broken = []
def load():
    barrier.wait()
    try:
        gateway.gateway_base()._Serializer  # defined near the end of gateway_base
    except Exception as exc:
        broken.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(broken), broken[:1])
"""


@pytest.mark.timeout(120)
def test_clients_in_many_threads_load_gateway_base_once_and_whole() -> None:
    # Sixteen threads ask for gateway_base at once, in new interpreters: none may take
    # the module while another thread is still running it.
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-c", RACE], env=tej_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("0 "), done.stdout
