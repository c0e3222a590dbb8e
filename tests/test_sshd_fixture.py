"""The real-sshd fixture works: logins by alias and by address, and a usable remote python3."""

from __future__ import annotations

import ast
import subprocess

from sshd import SshServer, UserRunner

DEADLINE = 30.0


def ssh(server: SshServer, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ssh with the server's private config and a deadline."""
    argv = ["ssh", "-F", server.config_path, *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=DEADLINE)


def test_login_by_alias(ssh_server: SshServer) -> None:
    done = ssh(ssh_server, ssh_server.alias, "true")
    assert done.returncode == 0, done.stderr


def test_login_by_address_runs_in_home(ssh_server: SshServer) -> None:
    target = f"{ssh_server.user}@{ssh_server.host}"
    done = ssh(ssh_server, "-p", str(ssh_server.port), target, "echo $HOME")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ssh_server.home


def test_login_is_the_expected_user(ssh_server: SshServer) -> None:
    done = ssh(ssh_server, ssh_server.alias, "id -u; id -g")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(ssh_server.uid), str(ssh_server.gid)]


def test_remote_python3_is_recent_enough(ssh_server: SshServer) -> None:
    code = "import sys; print(tuple(sys.version_info[:2]))"
    done = ssh(ssh_server, ssh_server.alias, f"python3 -c '{code}'")
    assert done.returncode == 0, done.stderr
    assert ast.literal_eval(done.stdout.strip()) >= (3, 8)


def test_url_names_the_server(ssh_server: SshServer) -> None:
    assert ssh_server.url == f"ssh://{ssh_server.user}@127.0.0.1:{ssh_server.port}"


def test_server_tmp_is_an_empty_directory_the_user_owns(
    ssh_server: SshServer, server_tmp: str, ssh_user_run: UserRunner
) -> None:
    assert server_tmp.startswith(ssh_server.home + "/")
    done = ssh_user_run(["stat", "-c", "%u %a", server_tmp])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == str(ssh_server.uid)
    assert ssh_user_run(["ls", "-A", server_tmp]).stdout == ""


def test_files_written_over_ssh_are_seen_as_the_user(
    ssh_server: SshServer, server_tmp: str, ssh_user_run: UserRunner
) -> None:
    done = ssh(ssh_server, ssh_server.alias, f"echo hello > {server_tmp}/greeting")
    assert done.returncode == 0, done.stderr
    seen = ssh_user_run(["cat", f"{server_tmp}/greeting"])
    assert (seen.returncode, seen.stdout) == (0, "hello\n")
    whoami = ssh_user_run(["id", "-un"])
    assert whoami.stdout.strip() == ssh_server.user
