"""Arrays on the slurm runner, against the real one-node Slurm over the real loopback sshd:
one sbatch --array for the whole array, each task supervised on the node, kills of one
task and of the array, %N held (from the tasks' own timestamps)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import Target, wait_until
from slurm import SlurmCluster
from test_arrays import make_array_job, most_at_once, spans_of, task_path
from test_slurm_runner import SLURM_WAIT, slurm, status_json

pytestmark = [pytest.mark.ssh, pytest.mark.slurm, pytest.mark.timeout(180)]
__all__ = ["slurm"]  # the fixture, used by name

TIMED = """#!/bin/sh
start=$(date +%s.%N)
sleep 1
echo "$start $(date +%s.%N)" > times
echo "task $TEJ_ARRAY_INDEX of $TEJ_ARRAY_SIZE in $SLURM_ARRAY_JOB_ID"
[ "$TEJ_ARRAY_INDEX" = 4 ] && exit 7
exit 0
"""


def slurm_id(target: Target, array_id: str) -> str:
    """The array's Slurm job id, as tej kept it."""
    data = json.loads((target.job_dir(array_id) / "runner.json").read_text())
    return str(data["slurm_id"])


def ended(target: Target, job_id: str) -> dict:
    """Poll `tej status --json` until the job or array has ended."""
    return wait_until(
        lambda: (
            (found := status_json(target, job_id))["state"] not in ("queued", "running", "starting")
            and found
        ),
        SLURM_WAIT * 2,
        f"{job_id} to end",
    )


def test_an_array_is_one_sbatch_and_holds_its_n(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    job = make_array_job(slurm, "sweep", TIMED)
    array = slurm.submit(job, "--array", "0-5%2", "--id", "sweep")
    first = status_json(slurm, array)
    assert first["state"] in ("queued", "running"), first
    status = ended(slurm, array)
    assert status["state"] == "finished" and status["exit_code"] == 7, status
    assert status["array"]["counts"] == {"finished": 6}
    assert [task["exit_code"] for task in status["array"]["tasks"]] == [0, 0, 0, 0, 7, 0]
    # One Slurm job: every task's ArrayJobId is the one sbatch's id.
    job_id = slurm_id(slurm, array)
    done = slurm_cluster.run("scontrol", "show", "job", "-o", job_id)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    fields = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in lines]
    assert len(fields) == 6 and {found["ArrayJobId"] for found in fields} == {job_id}, fields
    assert sorted(int(found["ArrayTaskId"]) for found in fields) == list(range(6))
    out = slurm.cli("logs", "--id", f"{array}.4", check=0).stdout
    assert out == f"task 4 of 6 in {job_id}\n"
    assert slurm.status(f"{array}.4")["exit_code"] == 7
    spans = spans_of([task_path(slurm, array, index) for index in range(6)])
    assert most_at_once(spans) <= 2, spans


def pending_tasks(cluster: SlurmCluster, job_id: str) -> list[str]:
    """The ids of an array job's pending tasks, one by one (squeue -r)."""
    done = cluster.run("squeue", "-r", "-h", "-t", "PENDING", "-j", job_id, "-o", "%i")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_kill_a_task_then_the_array(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    job = make_array_job(slurm, "long", "#!/bin/sh\necho started\nsleep 120\n")
    array = slurm.submit(job, "--array", "0-5%2", "--id", "long")
    for index in (0, 1):
        out: Path = task_path(slurm, array, index, "stdout")
        wait_until(
            lambda out=out: out.exists() and "started" in out.read_text(), SLURM_WAIT, "a start"
        )
    slurm.cli("kill", "--id", f"{array}.0", check=0)
    task = ended(slurm, f"{array}.0")
    assert task["state"] == "killed", task
    out = task_path(slurm, array, 2, "stdout")  # its place goes to the next task
    wait_until(lambda: out.exists() and "started" in out.read_text(), SLURM_WAIT, "long.2")
    job_id = slurm_id(slurm, array)
    assert f"{job_id}_5" in pending_tasks(slurm_cluster, job_id)
    slurm.cli("kill", "--id", f"{array}.5", check=0)  # pending: Slurm's task is cancelled
    assert slurm.status(f"{array}.5")["state"] == "killed"
    assert f"{job_id}_5" not in pending_tasks(slurm_cluster, job_id)
    slurm.cli("kill", "--id", array, check=0)
    status = ended(slurm, array)
    assert status["state"] == "killed", status
    counts = status["array"]["counts"]
    assert counts == {"killed": 4, "cancelled": 2}, counts  # 0, 1, 2, 5 killed
    assert slurm.status(f"{array}.4")["state"] == "cancelled"


def test_a_task_whose_supervisor_died_gets_its_end_from_slurm(slurm: Target) -> None:
    script = '#!/bin/sh\n[ "$TEJ_ARRAY_INDEX" = 0 ] && sleep 300\nexit 0\n'
    array = slurm.submit(make_array_job(slurm, "lost", script), "--array", "0-1", "--id", "lost")
    status_file = task_path(slurm, array, 0, "status.json")

    def running() -> dict | None:
        try:
            record = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("job") else None

    record = wait_until(running, SLURM_WAIT, "task 0 to run")
    os.kill(record["supervisor"]["pid"], signal.SIGKILL)
    status = ended(slurm, array)
    assert status["array"]["counts"] == {"finished": 1, "lost": 1}, status
    task = slurm.status(f"{array}.0")
    assert task["state"] == "lost" and "its supervisor died" in task["reason"], task
    # The array's exit code is its first failed task's (Slurm's, for a lost one).
    assert status["state"] == "finished" and status["exit_code"] == task["exit_code"] != 0


def test_an_array_cancelled_outside_tej_shows_as_killed(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    # exec: the script is the process Slurm signals (a shell whose child died of it would
    # exit 143 itself, an exit code tej never rewrites: see docs/runners.md).
    job = make_array_job(slurm, "outside", "#!/bin/sh\necho started\nexec sleep 300\n")
    array = slurm.submit(job, "--array", "0-1", "--id", "outside")
    for index in (0, 1):
        out: Path = task_path(slurm, array, index, "stdout")
        wait_until(
            lambda out=out: out.exists() and "started" in out.read_text(), SLURM_WAIT, "a start"
        )
    # Every task runs: none is left pending for the array's end to be seen as a cancel.
    assert slurm_cluster.run("scancel", slurm_id(slurm, array)).returncode == 0
    status = ended(slurm, array)
    assert status["state"] == "killed" and status["reason"] == "Slurm: CANCELLED", status
    for index in (0, 1):
        task = ended(slurm, f"{array}.{index}")
        assert task["state"] == "killed", task
    assert status_json(slurm, array)["array"]["counts"] == {"killed": 2}


def test_an_array_whose_pending_task_tej_killed_stays_finished(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    script = '#!/bin/sh\necho started\n[ "$TEJ_ARRAY_INDEX" = 0 ] && sleep 3\nexit 0\n'
    array = slurm.submit(make_array_job(slurm, "one", script), "--array", "0-1%1", "--id", "one")
    out = task_path(slurm, array, 0, "stdout")
    wait_until(lambda: out.exists() and "started" in out.read_text(), SLURM_WAIT, "task 0")
    slurm.cli("kill", "--id", f"{array}.1", check=0)  # Slurm's ID_1 ends CANCELLED
    runner = slurm.job_dir(array) / "runner.json"

    def asked() -> dict | None:  # once Slurm was asked how the array ended
        status = status_json(slurm, array)
        return status if "slurm_state" in json.loads(runner.read_text()) else None

    status = wait_until(asked, SLURM_WAIT * 2, "Slurm to be asked how the array ended")
    assert status["state"] == "finished" and not status.get("reason"), status
    assert status["array"]["counts"] == {"finished": 1, "killed": 1}, status
    done = slurm_cluster.run("scontrol", "show", "job", "-o", f"{slurm_id(slurm, array)}_1")
    assert "JobState=CANCELLED" in done.stdout, done.stdout
