"""`tej doctor`: each failure the reliability tests inject is named, with what to do.

Real processes throughout: the loopback sshd (unknown host, refused port, a key it
refuses, a host key that changed), real Pythons (missing, too old), a queue that is a
file, a tmpfs filled to the brim, a supervisor killed with SIGKILL, a stale upload.
Every run checks that doctor prints every check and changes nothing on the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SilentServer, Target, process_alive, run_tej, tej_env, wait_until
from sshd import SshServer, is_root, login_script_lines
from test_pythons import find_python

from tej.doctor import CHECK_NAMES

DOCTOR_DEADLINE = 30.0


def doctor(target: Target, *args: str, **kwargs: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run `tej doctor --json` on a target; its exit code and its checks by name."""
    done = target.cli("doctor", "--json", *args, **kwargs)
    checks = json.loads(done.stdout)
    return done.returncode, check_list(checks)


def check_list(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The checks by name, after checking that all of them are there, each well formed."""
    names = [check["name"] for check in checks]
    assert set(CHECK_NAMES) <= set(names), names
    for check in checks:
        assert check["status"] in ("ok", "warn", "fail", "skip"), check
        assert check["found"], check
        if check["status"] == "fail":
            assert check["fix"], check
    return {check["name"]: check for check in checks}


def doctor_ssh(
    server: SshServer, destination: str, *args: str
) -> tuple[int, dict[str, Any], float]:
    """`tej doctor --json` against an ssh destination, timed; (exit code, checks, seconds)."""
    started = time.monotonic()
    done = run_tej(
        "doctor",
        destination,
        "--json",
        "--no-reuse",
        "--connect-timeout",
        "5",
        *args,
        env=tej_env(),
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, check_list(json.loads(done.stdout)), elapsed


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    """Every path under root, with its size and modification time (to see that nothing changed)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            info = os.lstat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (info.st_size, info.st_mtime)
    return found


# a destination that works


def test_doctor_passes_and_creates_nothing(target: Target) -> None:
    code, checks = doctor(target)
    assert code == 0, checks
    assert all(check["status"] in ("ok", "skip") for check in checks.values()), checks
    assert checks["python"]["status"] == "ok" and "Python 3." in checks["python"]["found"]
    assert "no queue yet" in checks["queue"]["found"]
    assert not target.server_path().exists(), "doctor made the queue"
    if target.kind == "ssh":
        assert f"as {target.server.user}" in checks["ssh"]["found"]


def test_doctor_text_has_one_line_per_check(target: Target) -> None:
    target.cli("setup", check=0)
    done = target.cli("doctor", check=0)
    lines = done.stdout.splitlines()
    assert len(lines) == len(CHECK_NAMES), lines
    for line, name in zip(lines, CHECK_NAMES):
        assert line[:6] in ("[ ok ]", "[skip]"), line
        assert line[7:].startswith(name), line
    assert "runner default" in done.stdout and "format 2" in done.stdout


# ssh fails


@pytest.mark.ssh
def test_unknown_host(ssh_server: SshServer) -> None:
    code, checks, elapsed = doctor_ssh(
        ssh_server, "nosuchhost.invalid", "--ssh-config", ssh_server.config_path
    )
    assert code == 1
    assert checks["ssh"]["status"] == "fail"
    assert "unknown host" in checks["ssh"]["found"], checks["ssh"]
    assert "nosuchhost.invalid" in checks["ssh"]["found"]
    assert all(checks[name]["status"] == "skip" for name in CHECK_NAMES[1:]), checks
    assert elapsed < DOCTOR_DEADLINE


@pytest.mark.ssh
def test_refused_port(ssh_server: SshServer) -> None:
    code, checks, elapsed = doctor_ssh(
        ssh_server, "ssh://127.0.0.1:1", "--ssh-config", ssh_server.config_path
    )
    assert code == 1
    assert checks["ssh"]["status"] == "fail" and "refused" in checks["ssh"]["found"], checks
    assert "port" in checks["ssh"]["fix"]
    assert elapsed < DOCTOR_DEADLINE


@pytest.mark.ssh
def test_silent_server_within_the_connect_timeout(
    ssh_server: SshServer, silent_server: SilentServer
) -> None:
    destination = f"ssh://127.0.0.1:{silent_server.port}"
    code, checks, elapsed = doctor_ssh(
        ssh_server, destination, "--ssh-config", ssh_server.config_path, "--connect-timeout", "2"
    )
    assert code == 1
    assert checks["ssh"]["status"] == "fail" and "no answer" in checks["ssh"]["found"], checks
    assert elapsed < 10, f"took {elapsed:.1f} s with --connect-timeout 2"


def config_with(server: SshServer, path: Path, old: str, new: str) -> str:
    """The test sshd's client config with one setting replaced; its path."""
    original = Path(server.config_path).read_text()
    assert old in original
    path.write_text(original.replace(old, new))
    return str(path)


@pytest.mark.ssh
def test_refused_key(ssh_server: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    config = config_with(ssh_server, tmp_path / "config", ssh_server.identity_file, str(stranger))
    code, checks, _ = doctor_ssh(ssh_server, ssh_server.alias, "--ssh-config", config)
    assert code == 1
    assert "refused the login" in checks["ssh"]["found"], checks["ssh"]
    assert "key" in checks["ssh"]["fix"]


@pytest.mark.ssh
@pytest.mark.parametrize("known", ["changed", "unknown"])
def test_host_key(ssh_server: SshServer, tmp_path: Path, known: str) -> None:
    """A host key that changed (a known_hosts with another key), or one never seen."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    if known == "changed":
        other = tmp_path / "other_host_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        key = Path(f"{other}.pub").read_text().split()[:2]
        host = f"[{ssh_server.host}]:{ssh_server.port}"
        known_hosts.write_text(f"{host} {' '.join(key)}\n")
    config = config_with(
        ssh_server,
        tmp_path / "config",
        "StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null",
        f"StrictHostKeyChecking yes\n  UserKnownHostsFile {known_hosts}\n"
        "  HostKeyAlgorithms ssh-ed25519",
    )
    code, checks, _ = doctor_ssh(ssh_server, ssh_server.alias, "--ssh-config", config)
    assert code == 1
    expected = "changed" if known == "changed" else "is unknown"
    assert expected in checks["ssh"]["found"], checks["ssh"]


@pytest.mark.ssh
def test_login_noise_is_a_warning(ssh_server: SshServer) -> None:
    lines = ["  echo 'hello from bashrc';;"]
    with login_script_lines(ssh_server, lines, "test_doctor login noise"):
        code, checks, _ = doctor_ssh(
            ssh_server, ssh_server.alias, "--ssh-config", ssh_server.config_path
        )
    assert code == 0, checks
    shell = checks["shell"]
    assert shell["status"] == "warn" and "print 18 bytes" in shell["found"], shell


# the server's Python


@pytest.mark.ssh
def test_no_python_over_ssh(ssh_server: SshServer) -> None:
    code, checks, _ = doctor_ssh(
        ssh_server,
        ssh_server.alias,
        "--ssh-config",
        ssh_server.config_path,
        "--python",
        "/nonexistent/python3",
    )
    assert code == 1
    assert checks["ssh"]["status"] == "ok"
    assert checks["shell"]["status"] == "ok" and "/bin/bash" in checks["shell"]["found"]
    python = checks["python"]
    assert python["status"] == "fail" and "/nonexistent/python3" in python["found"], python
    assert python["fix"].startswith("use --python /"), python  # the server's own python3


@pytest.mark.parametrize("version", ["3.7", "2.7"])
def test_old_python_and_a_better_one(tmp_path: Path, version: str) -> None:
    old = find_python(version)
    if old is None:
        pytest.skip(f"Python {version} is not installed")
    queue = tmp_path / "queue"
    done = run_tej(
        "doctor", "local", "--queue", str(queue), "--python", old, "--json", env=tej_env()
    )
    assert done.returncode == 1, done
    python = check_list(json.loads(done.stdout))["python"]
    assert "too old" in python["found"] and version in python["found"], python
    better = python["fix"].split("--python ")[1].split()[0]
    assert os.access(better, os.X_OK), python
    version_text = subprocess.run(
        [better, "-c", "import sys; print(sys.version_info >= (3, 8))"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert version_text.strip() == "True"
    assert not queue.exists()


# the queue


def test_queue_that_is_a_file(target: Target) -> None:
    queue = target.server_path()
    queue.parent.mkdir(parents=True, exist_ok=True)
    queue.write_text("not a queue\n")
    code, checks = doctor(target)
    assert code == 1
    assert checks["queue"]["status"] == "fail" and "is a file" in checks["queue"]["found"]
    assert "--queue" in checks["queue"]["fix"]
    assert queue.read_text() == "not a queue\n"


def test_a_link_is_shown(target: Target) -> None:
    target.cli("setup", check=0)
    link = os.path.join(os.path.dirname(target.queue), "shortcut")
    target.cli("setup", "--only-links", "--make-link", link, check=0)
    code, checks = doctor(target, queue=link)
    assert code == 0
    assert f"{link} -> " in checks["queue"]["found"], checks["queue"]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs, filled to the brim (root only)."""
    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=30)


def test_full_disk(tmp_path: Path, full_disk: Path) -> None:
    queue = full_disk / "queue"
    setup = run_tej("setup", "local", "--queue", str(queue), env=tej_env())
    assert setup.returncode == 0, setup
    fd = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    done = run_tej("doctor", "local", "--queue", str(queue), "--json", env=tej_env())
    assert done.returncode == 1, done
    disk = check_list(json.loads(done.stdout))["disk"]
    assert disk["status"] == "fail" and "no space left" in disk["found"], disk
    assert "tej delete" in disk["fix"]


def test_lost_job_and_stale_upload(target: Target) -> None:
    """A killed supervisor and an old staging area: warnings, and nothing is changed."""
    job_id = target.submit(target.make_job("sleeper", "#!/bin/sh\nexec sleep 60\n"))
    record = target.wait_for(job_id, ("running",))
    supervisor, main = record["supervisor"]["pid"], record["job"]["pid"]
    try:
        os.kill(supervisor, signal.SIGKILL)
        wait_until(lambda: not process_alive(supervisor), 10, "the supervisor to die")
        stale = target.server_path("staging", "0123456789abcdef0123")
        stale.mkdir()
        (stale / "part").write_bytes(b"x" * 3000)
        old = time.time() - 7 * 3600
        os.utime(stale, (old, old))
        before = snapshot(target.server_path())
        code, checks = doctor(target)
        assert code == 0, checks  # warnings only
        assert checks["jobs"]["status"] == "warn" and job_id in checks["jobs"]["found"]
        assert checks["staging"]["status"] == "warn", checks["staging"]
        assert "1 stale uploads hold 2.9 KB" in checks["staging"]["found"]
        assert snapshot(target.server_path()) == before, "doctor changed the queue"
    finally:
        os.killpg(main, signal.SIGKILL)
