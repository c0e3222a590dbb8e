"""Shared fixtures: a real sshd on loopback, a one-node Slurm, helpers to act as the SSH user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SilentServer, Target, local_target, ssh_target
from slurm import SlurmCluster, slurm_available, start_slurm
from sshd import SshServer, UserRunner, is_root, sshd_available, start_sshd
from terminal import Terminal

# Tests that share one thing of this machine run in one pytest-xdist worker (the suite
# runs with `--dist loadgroup`, see tests/run.sh), one after another: the fixtures named
# here -> the group. Every other test is on its own (its sshd, Slurm, folders and ports).
SHARED = {
    "slurm_cluster": "slurm",  # one Slurm cluster per worker that needs one: one in all
    "default_link_home": "ssh-home",  # the SSH user's own ~/.tej
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the tests that use a shared thing in its worker group."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, group in SHARED.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
                break


@pytest.fixture(scope="session")
def ssh_server() -> Iterator[SshServer]:
    """Yield a real sshd on 127.0.0.1 for the session; skip if unavailable, but fail in CI."""
    reason = sshd_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"SSH tests must run in CI, but sshd is unavailable: {reason}")
        pytest.skip(f"sshd unavailable: {reason}")
    server = start_sshd()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm_cluster(ssh_server: SshServer) -> Iterator[SlurmCluster]:
    """Yield a one-node Slurm cluster whose commands work over ssh_server as the SSH user.

    Its slurm.conf is written where ssh_server's sessions find it (SLURM_CONF, set by sshd).
    Skips if Slurm cannot run here, but fails in CI.
    """
    reason = slurm_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Slurm tests must run in CI, but Slurm is unavailable: {reason}")
        pytest.skip(f"Slurm unavailable: {reason}")
    cluster = start_slurm(ssh_server.tmpdir, conf_path=ssh_server.slurm_conf)
    try:
        _check_slurm_over_ssh(ssh_server, cluster)
        yield cluster
    finally:
        cluster.stop()


def _check_slurm_over_ssh(server: SshServer, cluster: SlurmCluster) -> None:
    """Raise unless `sinfo` run over ssh as the SSH user sees the cluster's idle node."""
    argv = server.ssh_argv("sinfo -h -o '%P %T'")  # One shell command line.
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or done.stdout.split() != [f"{cluster.partition}*", "idle"]:
        raise RuntimeError(
            f"sinfo over ssh exited {done.returncode}: {(done.stdout + done.stderr).strip()}\n"
            f"{cluster.logs()}"
        )


@pytest.fixture
def server_tmp(ssh_server: SshServer) -> Iterator[str]:
    """Yield a fresh empty directory in the SSH user's home, owned by that user; remove it after."""
    base = Path(ssh_server.home) / "tejtests"
    base.mkdir(mode=0o755, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="t-", dir=base))
    if is_root():
        os.chown(base, ssh_server.uid, ssh_server.gid)
        os.chown(path, ssh_server.uid, ssh_server.gid)
    yield str(path)
    _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """Remove a tree, even parts a test made read-only (which only stops a non-root owner)."""
    try:
        shutil.rmtree(path)
    except PermissionError:
        path.chmod(0o700)
        for parent, dirnames, _files in os.walk(path):
            for name in dirnames:
                os.chmod(os.path.join(parent, name), 0o700, follow_symlinks=False)
        shutil.rmtree(path)


@pytest.fixture
def ssh_user_run(ssh_server: SshServer) -> UserRunner:
    """Return `run(argv, *, timeout=30.0, input=None)`, which runs argv as the SSH user here.

    It runs without ssh (via runuser when root), in the user's home, and returns a
    CompletedProcess with text stdout and stderr; it never raises on a non-zero exit.
    """
    return ssh_server.run_as_user


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A TCP server on loopback that accepts connections and never says a word."""
    server = SilentServer()
    yield server
    server.close()


# the destination of the end-to-end tests


@pytest.fixture(name="target", params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def target_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Target]:
    """A destination and a fresh queue: `local` or the loopback sshd."""
    if request.param == "local":
        target = local_target(tmp_path)
        # The in-process API's local agent inherits HOME too: `~/.tej` stays in tmp_path.
        monkeypatch.setenv("HOME", target.home)
        for name in ("TEJ_QUEUE", "TEJ_SSH_CONFIG", "TEJ_PYTHON"):
            monkeypatch.delenv(name, raising=False)
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


@pytest.fixture
def terminal(target: Target, tmp_path: Path) -> Iterator[Terminal]:
    """A real terminal (tmux) whose shell runs where the target's client does."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = Terminal(tmp_path / "tmux.sock", target.client_env, target.client_dir)
    try:
        yield session
    finally:
        session.close()
