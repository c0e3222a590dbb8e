"""The server's Python: every supported version runs the agent, older ones are refused clearly.

The agent runs on the server's interpreter, which is not the client's: it must work on
Python 3.8 to 3.13, refuse anything older with one clear line (even Python 2.7), and need
nothing else from the server (no shell tools on its PATH).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sshd import SshServer, is_root

import tej

PYENV_ROOT = os.environ.get("PYENV_ROOT", "/root/.pyenv")
SUPPORTED = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
TOO_OLD = {"3.7": "python3.7", "3.6": "python3.6", "2.7": "python2.7"}
CLI_DEADLINE = 60.0
STATE_DEADLINE = 30.0
TOO_OLD_DEADLINE = 10.0
# The wrapper that starts the agent with a PATH that leads nowhere.
NOWHERE_PYTHON = '#!/bin/sh\nPATH=/nonexistent; export PATH; exec /usr/bin/python3 "$@"\n'
FINISHING_SCRIPT = '#!/bin/sh\necho hello\necho "$PATH" > path.txt\necho data > out.txt\n'
SLEEPING_SCRIPT = "#!/bin/sh\nexec /bin/sleep 30\n"


# helpers


def find_python(version: str, program: str | None = None) -> str | None:
    """The pyenv interpreter for version (3.8 -> .../3.8.*/bin/python3.8), if runnable here."""
    program = program or f"python{version}"
    pattern = os.path.join(PYENV_ROOT, "versions", f"{version}.*", "bin", program)
    found = sorted(path for path in glob.glob(pattern) if os.access(path, os.X_OK))
    return found[-1] if found else None


def require_python(version: str) -> str:
    """The interpreter for version; skip if absent, but fail in CI for the ones CI must have."""
    path = find_python(version)
    if path is not None:
        return path
    if os.environ.get("CI", "").lower() == "true":
        if version == "3.8":
            pytest.fail("CI must test the agent on Python 3.8, the oldest supported version")
        if version in ("3.12", "3.13") and not (find_python("3.12") or find_python("3.13")):
            pytest.fail("CI must test the agent on a recent Python (3.12 or 3.13)")
    pytest.skip(f"Python {version} is not installed under {PYENV_ROOT}/versions")


def clean_env() -> dict[str, str]:
    """The environment of tej commands, without settings that would leak from the caller."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TEJ_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_tej(*args: str, deadline: float = CLI_DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run `python -m tej ARGS...` and return its result; fail if it outlives deadline."""
    argv = [sys.executable, "-m", "tej", *args]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=deadline, env=clean_env(), check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"tej {' '.join(args)} did not end within {deadline:.0f} s")


def tej_ok(*args: str) -> str:
    """Run tej, require success without any message on stderr, return its stdout."""
    done = run_tej(*args)
    assert done.returncode == 0, f"tej {' '.join(args)}: exit {done.returncode}: {done.stderr}"
    assert done.stderr == "", done.stderr
    return done.stdout


class Target:
    """Where the tej commands of a test go: destination and its options."""

    def __init__(self, destination: str, *options: str) -> None:
        self.destination = destination
        self.options = list(options)

    def __call__(self, command: str, *args: str) -> str:
        return tej_ok(command, self.destination, *self.options, *args)

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_tej(command, self.destination, *self.options, *args)

    def status(self, job_id: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self("status", "--id", job_id, "--json"))
        return document

    def wait_for(self, job_id: str, states: tuple[str, ...]) -> dict[str, Any]:
        """Poll `status --json` until the job's state is one of states."""
        deadline = time.monotonic() + STATE_DEADLINE
        while True:
            status = self.status(job_id)
            if status["state"] in states:
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {status['state']} after {STATE_DEADLINE:.0f} s")
            time.sleep(0.05)


def make_job(parent: Path, name: str, script: str) -> str:
    """A job directory with an executable start.sh."""
    directory = parent / name
    directory.mkdir()
    start = directory / "start.sh"
    start.write_text(script)
    start.chmod(0o755)
    return str(directory)


def submit(target: Target, directory: str) -> str:
    """Submit a directory with `--json`; return the new job's id."""
    job_id: str = json.loads(target("submit", directory, "--json"))["id"]
    assert job_id.startswith(os.path.basename(directory) + "_"), job_id
    return job_id


def exercise_core_commands(target: Target, jobs: Path, path_seen: str | None = None) -> None:
    """Submit, status, list, download, kill and delete through target, checking each."""
    done_id = submit(target, make_job(jobs, "finishing", FINISHING_SCRIPT))
    status = target.wait_for(done_id, ("finished", "killed", "lost"))
    assert (status["state"], status["exit_code"]) == ("finished", 0), status
    assert status["id"] == done_id
    assert re.fullmatch(
        r"Job is finished \(\d+:\d\d:\d\d\) with exit code 0\n", target("status", "--id", done_id)
    ), "status text"

    rows = [line.split() for line in target("list").splitlines()]
    assert rows[0] == ["ID", "STATE", "ELAPSED", "EXIT"]
    assert [done_id, "finished"] in [row[:2] for row in rows[1:]], rows

    assert target("download", "--id", done_id, "out.txt:") == "data\n"
    if path_seen is not None:
        assert target("download", "--id", done_id, "path.txt:") == path_seen + "\n"

    sleep_id = submit(target, make_job(jobs, "sleeping", SLEEPING_SCRIPT))
    target.wait_for(sleep_id, ("running",))
    assert target("kill", "--id", sleep_id) == f"Job {sleep_id!r} killed\n"
    killed = target.status(sleep_id)
    assert killed["state"] == "killed", killed

    listed = {job["id"]: job["state"] for job in json.loads(target("list", "--json"))}
    assert listed == {done_id: "finished", sleep_id: "killed"}

    for job_id in (done_id, sleep_id):
        assert target("delete", "--id", job_id) == f"Deleted job {job_id!r}\n"
    assert json.loads(target("list", "--json")) == []
    gone = target.run("status", "--id", done_id)
    assert (gone.returncode, gone.stderr) == (3, "No job with that identifier\n"), gone


def write_nowhere_python(path: Path) -> str:
    """Write the PATH-leads-nowhere wrapper at path; return its path."""
    path.write_text(NOWHERE_PYTHON)
    path.chmod(0o755)
    return str(path)


# every supported Python runs the agent


@pytest.mark.parametrize("version", SUPPORTED)
def test_agent_runs_on_server_python(version: str, tmp_path: Path) -> None:
    python = require_python(version)
    queue = str(tmp_path / "queue")
    with tej.RemoteQueue("local", queue, python=python) as remote:
        seen = remote.session().server["python"]
    assert seen.split(".")[:2] == version.split("."), f"agent ran on {seen}"

    target = Target("local", "--queue", queue, "--python", python)
    exercise_core_commands(target, tmp_path)


def test_jobs_are_supervised_by_the_chosen_python(tmp_path: Path) -> None:
    """The supervisor (the job's parent) is the --python interpreter, not the client's."""
    version = next(
        (v for v in SUPPORTED if find_python(v) and v != "%d.%d" % sys.version_info[:2]), None
    )
    if version is None:
        pytest.skip("no pyenv Python other than the client's one is installed")
    python = find_python(version)
    assert python is not None
    target = Target("local", "--queue", str(tmp_path / "queue"), "--python", python)
    script = "#!/bin/sh\nreadlink /proc/$PPID/exe > parent.txt\n"
    job_id = submit(target, make_job(tmp_path, "parent", script))
    assert target.wait_for(job_id, ("finished", "killed", "lost"))["exit_code"] == 0
    parent = target("download", "--id", job_id, "parent.txt:").strip()
    assert os.path.realpath(parent) == os.path.realpath(python)


# older Pythons are refused with one clear line


@pytest.mark.parametrize("version", list(TOO_OLD))
def test_too_old_python_is_refused_clearly(version: str, tmp_path: Path) -> None:
    python = find_python(version, TOO_OLD[version])
    if python is None:
        pytest.skip(f"Python {version} is not installed under {PYENV_ROOT}/versions")
    queue = tmp_path / "queue"
    job = make_job(tmp_path, "job", FINISHING_SCRIPT)
    started = time.monotonic()
    done = run_tej(
        "submit", "local", "--queue", str(queue), "--python", python, job, deadline=TOO_OLD_DEADLINE
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 5, done
    pattern = (
        rf"Error: Python {re.escape(version)}\.\d+ on local is too old: "
        r"tej needs Python 3\.8 or newer \(see --python\)\n"
    )
    assert re.fullmatch(pattern, done.stderr), done.stderr
    assert done.stdout == ""
    assert elapsed < TOO_OLD_DEADLINE
    assert not queue.exists(), "the agent must not run on a refused Python"


def test_too_old_python_through_the_api(tmp_path: Path) -> None:
    python = find_python("2.7", TOO_OLD["2.7"])
    if python is None:
        pytest.skip(f"Python 2.7 is not installed under {PYENV_ROOT}/versions")
    remote = tej.RemoteQueue("local", str(tmp_path / "queue"), python=python)
    with pytest.raises(tej.ServerPythonError, match=r"Python 2\.7\.\d+ on local is too old"):
        remote.list()
    remote.close()


# a server whose PATH leads nowhere


def test_agent_needs_no_path_locally(tmp_path: Path) -> None:
    python = write_nowhere_python(tmp_path / "python-nowhere")
    target = Target("local", "--queue", str(tmp_path / "queue"), "--python", python)
    exercise_core_commands(target, tmp_path, path_seen="/nonexistent")


@pytest.mark.ssh
def test_agent_needs_no_path_over_ssh(
    ssh_server: SshServer, server_tmp: str, tmp_path: Path
) -> None:
    python = write_nowhere_python(Path(server_tmp) / "python-nowhere")
    if is_root():
        os.chown(python, ssh_server.uid, ssh_server.gid)
    check = ssh_server.run_as_user([python, "-c", "import os; print(os.environ['PATH'])"])
    assert (check.returncode, check.stdout) == (0, "/nonexistent\n"), check
    queue = os.path.join(server_tmp, "queue")
    target = Target(
        ssh_server.alias,
        "--ssh-config",
        ssh_server.config_path,
        "--queue",
        queue,
        "--python",
        python,
    )
    exercise_core_commands(target, tmp_path, path_seen="/nonexistent")


def test_the_client_runs_on_python_3_8(tmp_path: Path) -> None:
    """The client's modules load and submit a job on the oldest Python it supports."""
    python = require_python("3.8")
    import execnet

    deps = tmp_path / "deps"  # execnet only: the installed click may need a newer Python
    deps.mkdir()
    (deps / "execnet").symlink_to(Path(execnet.__file__).parent)
    job = tmp_path / "job"
    job.mkdir()
    (job / "start.sh").write_text("#!/bin/sh\necho hello\n")
    (job / "start.sh").chmod(0o755)
    code = (
        "import sys, tej\n"
        "import tej.api, tej.transfer, tej.jobspec, tej.launcher, tej.rawstream\n"
        f"with tej.RemoteQueue('local', queue={str(tmp_path / 'queue')!r}) as remote:\n"
        f"    job_id = remote.submit({str(job)!r})\n"
        "    print(remote.wait(job_id, timeout=60).state.value)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEJ_", "PYTHON"))}
    env["PYTHONPATH"] = f"{Path(tej.__file__).parent.parent}:{deps}"
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.split() == ["finished"]
