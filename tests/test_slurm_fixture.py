"""The one-node Slurm fixture works for the SSH user over real ssh: submit, states, cancel."""

from __future__ import annotations

import shlex
import subprocess
import time

import pytest
from slurm import SlurmCluster
from sshd import SshServer

pytestmark = [pytest.mark.ssh, pytest.mark.slurm]

DEADLINE = 30.0
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def ssh(
    server: SshServer, command: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a shell command as the SSH user over ssh, with a deadline."""
    return subprocess.run(
        server.ssh_argv(command),
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        input=input,
    )


def submit(server: SshServer, directory: str, script: str, *options: str) -> str:
    """Write script to directory/job.sh over ssh, `sbatch --parsable` it there; return its id."""
    path = f"{directory}/job.sh"
    written = ssh(server, f"cat > {shlex.quote(path)}", input=script)
    assert written.returncode == 0, written.stderr
    argv = ["sbatch", "--parsable", *options, path]
    done = ssh(server, f"cd {shlex.quote(directory)} && {shlex.join(argv)}")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.isdigit(), done.stdout
    return job_id


def job_fields(server: SshServer, job_id: str) -> dict[str, str]:
    """Parse `scontrol show job -o ID` (one line of KEY=VALUE words) into a dict."""
    done = ssh(server, f"scontrol show job -o {job_id}")
    assert done.returncode == 0, done.stderr
    pairs = (word.partition("=") for word in done.stdout.split())
    return {key: value for key, _sep, value in pairs}


def wait_for_state(
    server: SshServer, job_id: str, states: tuple[str, ...], deadline: float = DEADLINE
) -> dict[str, str]:
    """Poll the job until its JobState is one of states; return its fields then."""
    end = time.monotonic() + deadline
    fields = job_fields(server, job_id)
    while fields["JobState"] not in states:
        assert fields["JobState"] not in FINAL_STATES, f"job {job_id} ended: {fields}"
        assert time.monotonic() < end, f"job {job_id} not in {states} after {deadline} s: {fields}"
        time.sleep(0.1)
        fields = job_fields(server, job_id)
    return fields


def squeue_state(server: SshServer, job_id: str) -> str:
    """Return `squeue -h -j ID -o '%T|%r'` (state and reason) for the job."""
    done = ssh(server, f"squeue -h -j {job_id} -o '%T|%r'")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(60)
def test_slurm_commands_find_the_cluster_over_ssh(
    ssh_server: SshServer, slurm_cluster: SlurmCluster
) -> None:
    done = ssh(ssh_server, 'echo "$SLURM_CONF"; sinfo -h -o "%P %T %D"')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [slurm_cluster.conf_path, "debug* idle 1"]


@pytest.mark.timeout(60)
def test_job_completes_with_exit_code_zero(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    job_id = submit(ssh_server, server_tmp, "#!/bin/sh\necho hello from $SLURM_JOB_ID\n")
    fields = wait_for_state(ssh_server, job_id, ("COMPLETED",))
    assert fields["ExitCode"] == "0:0"
    assert fields["Reason"] == "None"
    assert fields["UserId"].startswith(f"{ssh_server.user}(")
    assert fields["WorkDir"] == server_tmp
    assert fields["StdOut"] == f"{server_tmp}/slurm-{job_id}.out"
    output = ssh(ssh_server, f"cat {fields['StdOut']}")
    assert output.stdout == f"hello from {job_id}\n"


@pytest.mark.timeout(60)
def test_failing_job_is_failed_with_its_exit_code(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    job_id = submit(ssh_server, server_tmp, "#!/bin/bash\necho oops >&2\nexit 3\n")
    fields = wait_for_state(ssh_server, job_id, ("FAILED",))
    assert (fields["ExitCode"], fields["Reason"]) == ("3:0", "NonZeroExitCode")


@pytest.mark.timeout(60)
def test_python_batch_script(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    script = "#!/usr/bin/python3\nimport os\nprint(os.getcwd())\nraise SystemExit(4)\n"
    job_id = submit(ssh_server, server_tmp, script)
    fields = wait_for_state(ssh_server, job_id, ("FAILED",))
    assert fields["ExitCode"] == "4:0"
    assert ssh(ssh_server, f"cat {fields['StdOut']}").stdout == f"{server_tmp}\n"


@pytest.mark.timeout(60)
def test_scancel_of_a_running_job_is_cancelled(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    job_id = submit(ssh_server, server_tmp, "#!/bin/sh\nsleep 300\n")
    wait_for_state(ssh_server, job_id, ("RUNNING",))
    done = ssh(ssh_server, f"scancel {job_id}")
    assert done.returncode == 0, done.stderr
    fields = wait_for_state(ssh_server, job_id, ("CANCELLED",))
    # Slurm signals the job's processes one by one: sh dies of the SIGTERM (0:15), or its
    # sleep does first and sh exits with 128 + 15 before its own SIGTERM lands (143:0).
    assert fields["ExitCode"] in ("0:15", "143:0")


@pytest.mark.timeout(60)
def test_squeue_prints_state_and_reason(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    job_id = submit(ssh_server, server_tmp, "#!/bin/sh\nsleep 300\n", "--hold")
    assert squeue_state(ssh_server, job_id) == "PENDING|JobHeldUser"
    assert ssh(ssh_server, f"scontrol release {job_id}").returncode == 0
    wait_for_state(ssh_server, job_id, ("RUNNING",))
    assert squeue_state(ssh_server, job_id) == "RUNNING|None"
    assert ssh(ssh_server, f"scancel {job_id}").returncode == 0
    wait_for_state(ssh_server, job_id, ("CANCELLED",))
    # A finished job is left out unless asked for by state; it is still known to scontrol.
    assert squeue_state(ssh_server, job_id) == ""


@pytest.mark.timeout(60)
def test_time_limits_are_accepted_and_rounded_up_to_minutes(
    ssh_server: SshServer, slurm_cluster: SlurmCluster, server_tmp: str
) -> None:
    # A job over its limit ends TIMEOUT only 60-90 s late (slurmctld checks every 30 s),
    # too slow for this suite, so only the accepted limits are checked.
    for option, limit in [("--time=1", "00:01:00"), ("--time=0:05", "00:01:00")]:
        job_id = submit(ssh_server, server_tmp, "#!/bin/sh\ntrue\n", option, "--hold")
        fields = job_fields(ssh_server, job_id)
        assert fields["TimeLimit"] == limit, option
        assert ssh(ssh_server, f"scancel {job_id}").returncode == 0
