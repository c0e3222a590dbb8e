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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import Target, local_target, run_tej, ssh_target, tej_env, wait_until
from sshd import SshServer, is_root

import tej
from tej.protocol import END_STATES

PYENV_ROOT = os.environ.get("PYENV_ROOT", "/root/.pyenv")
SUPPORTED = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
TOO_OLD = {"3.7": "python3.7", "3.6": "python3.6", "2.7": "python2.7"}
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


def with_python(target: Target, python: str) -> Target:
    """target, its commands run with --python python and unbuffered output."""
    target.options = ["--python", python]
    target.client_env["PYTHONUNBUFFERED"] = "1"
    return target


def wait_for_status(target: Target, job_id: str, states: Sequence[str]) -> dict[str, Any]:
    """Poll `status --json` until the job's state is one of states; return that status."""

    def reached() -> dict[str, Any] | None:
        status = target.status(job_id)
        return status if status["state"] in states else None

    return wait_until(reached, STATE_DEADLINE, f"job {job_id} to be {'/'.join(states)}")


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
    job_id: str = json.loads(target.ok("submit", directory, "--json"))["id"]
    assert job_id.startswith(os.path.basename(directory) + "_"), job_id
    return job_id


def exercise_core_commands(target: Target, jobs: Path, path_seen: str | None = None) -> None:
    """Submit, status, list, download, kill and delete through target, checking each."""
    done_id = submit(target, make_job(jobs, "finishing", FINISHING_SCRIPT))
    status = wait_for_status(target, done_id, END_STATES)
    assert (status["state"], status["exit_code"]) == ("finished", 0), status
    assert status["id"] == done_id
    assert re.fullmatch(
        r"Job is finished \(\d+:\d\d:\d\d\) with exit code 0(; peak memory .*)?\n",
        target.ok("status", "--id", done_id),
    ), "status text"

    rows = [line.split() for line in target.ok("list").splitlines()]
    assert rows[0] == ["ID", "STATE", "ELAPSED", "EXIT"]
    assert [done_id, "finished"] in [row[:2] for row in rows[1:]], rows

    assert target.ok("download", "--id", done_id, "out.txt:") == "data\n"
    if path_seen is not None:
        assert target.ok("download", "--id", done_id, "path.txt:") == path_seen + "\n"

    sleep_id = submit(target, make_job(jobs, "sleeping", SLEEPING_SCRIPT))
    wait_for_status(target, sleep_id, ("running",))
    assert target.ok("kill", "--id", sleep_id) == f"Job {sleep_id!r} killed\n"
    killed = target.status(sleep_id)
    assert killed["state"] == "killed", killed

    listed = {job["id"]: job["state"] for job in json.loads(target.ok("list", "--json"))}
    assert listed == {done_id: "finished", sleep_id: "killed"}

    for job_id in (done_id, sleep_id):
        assert target.ok("delete", "--id", job_id) == f"Deleted job {job_id!r}\n"
    assert json.loads(target.ok("list", "--json")) == []
    gone = target.cli("status", "--id", done_id)
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

    target = with_python(local_target(tmp_path), python)
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
    target = with_python(local_target(tmp_path), python)
    script = "#!/bin/sh\nreadlink /proc/$PPID/exe > parent.txt\n"
    job_id = submit(target, make_job(tmp_path, "parent", script))
    assert wait_for_status(target, job_id, END_STATES)["exit_code"] == 0
    parent = target.ok("download", "--id", job_id, "parent.txt:").strip()
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
        "submit",
        "local",
        "--queue",
        str(queue),
        "--python",
        python,
        job,
        env=tej_env(PYTHONUNBUFFERED="1"),
        timeout=TOO_OLD_DEADLINE,
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
    target = with_python(local_target(tmp_path), python)
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
    target = with_python(ssh_target(ssh_server, server_tmp, tmp_path), python)
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
