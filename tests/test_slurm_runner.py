"""The slurm runner against a real one-node Slurm cluster, over the real loopback sshd.

Every test sets up a queue with `tej setup DEST --plugin slurm` and then uses the same
commands as with any runner: submit, status, wait, logs, download, kill, delete, list.
Slurm's own view is checked with `scontrol show job` where it matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ELAPSED,
    USAGE,
    Target,
    assert_one_line_error,
    one_line_answer,
    process_alive,
    read_record,
    ssh_target,
    wait_for_value,
    wait_until,
)
from slurm import SlurmCluster
from sshd import SshServer

pytestmark = [pytest.mark.ssh, pytest.mark.slurm, pytest.mark.timeout(120)]
SLURM_WAIT = 60.0


@pytest.fixture
def slurm(
    slurm_cluster: SlurmCluster, ssh_server: SshServer, server_tmp: str, tmp_path: Path
) -> Iterator[Target]:
    """An ssh target whose queue uses the slurm runner; the user's Slurm jobs end with it."""
    target = ssh_target(ssh_server, server_tmp, tmp_path)
    setup = target.cli("setup", "--plugin", "slurm", check=0)
    assert "(plugin: slurm)" in setup.stdout
    try:
        yield target
    finally:
        slurm_cluster.run("scancel", "-u", ssh_server.user)
        target.cleanup()


def scontrol(cluster: SlurmCluster, target: Target, job_id: str) -> dict[str, str]:
    """Slurm's record of a tej job (`scontrol show job`), as a dict."""
    slurm_id = json.loads((target.job_dir(job_id) / "runner.json").read_text())["slurm_id"]
    done = cluster.run("scontrol", "show", "job", "-o", slurm_id)
    assert done.returncode == 0, done.stderr
    return dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)


def status_json(target: Target, job_id: str) -> dict[str, Any]:
    """`tej status --json` of a job."""
    document: dict[str, Any] = json.loads(target.cli("status", "--id", job_id, "--json").stdout)
    return document


def wait_for_state(target: Target, job_id: str, *states: str) -> dict[str, Any]:
    """Poll `tej status --json` until the job is in one of states (on failure, say the last)."""
    return wait_for_value(
        lambda: status_json(target, job_id),
        lambda found: found["state"] in states,
        SLURM_WAIT,
        f"job {job_id} to be {'/'.join(states)}",
    )


def test_a_job_runs_through_slurm_and_finishes_with_its_exit_code(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    job = slurm.make_job(
        script='#!/bin/sh\necho "hello from $SLURM_JOB_ID"\necho result > out.txt\nexit 0\n'
    )
    job_id = slurm.submit(job, "--id", "ok")
    first = status_json(slurm, job_id)
    assert first["state"] in ("queued", "running", "finished")
    final = wait_for_state(slurm, job_id, "finished")
    assert final["exit_code"] == 0
    answer = one_line_answer(slurm.cli("status", "--id", job_id), 0)
    assert re.fullmatch(rf"Job is finished \(\d+:\d\d:\d\d\) with exit code 0{USAGE}", answer)
    # It ran under Slurm, named after the job, in the job's directory.
    record = scontrol(slurm_cluster, slurm, job_id)
    assert record["JobName"] == f"tej-{job_id}"
    assert record["JobState"] == "COMPLETED"
    assert record["WorkDir"] == str(slurm.work(job_id))
    logs = slurm.cli("logs", "--id", job_id, check=0).stdout
    assert re.fullmatch(r"hello from \d+\n", logs)
    slurm.cli("download", "--id", job_id, "out.txt", check=0)
    assert (slurm.client_dir / "out.txt").read_text() == "result\n"


def slurm_view(cluster: SlurmCluster, target: Target, job_id: str) -> str:
    """What Slurm and tej say of a job, for a failure's message."""
    runner = (target.job_dir(job_id) / "runner.json").read_text()
    slurm_id = json.loads(runner)["slurm_id"]
    queue = cluster.run("squeue", "-a", "-o", "%i %T %r").stdout
    job = cluster.run("scontrol", "show", "job", "-o", slurm_id).stdout
    nodes = cluster.run("sinfo", "-N", "-o", "%N %T %E").stdout
    status = target.cli("status", "--id", job_id, "--json", check=None).stdout
    return (
        f"runner.json: {runner}\nsqueue: {queue}\nscontrol: {job}\nsinfo: {nodes}\n"
        f"status: {status}\n{cluster.logs()}"
    )


@pytest.mark.timeout(240)
def test_a_slurm_job_has_its_supervisors_figures_without_accounting(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    """The test cluster keeps no accounting: sacct refuses, so the supervisor's figures stay
    once the job has left squeue (runner.json may remember that sacct has none: if it
    says anything, it says "none"). sacct's output is parsed in test_costs.py."""
    hold = "x = bytearray(80 << 20); x[::4096] = b'1' * len(x[::4096])"
    script = f'#!/bin/sh\npython3 -c "{hold}"\n'
    script += 'echo "all done" > "$TEJ_PROGRESS"\n'
    job_id = slurm.submit(slurm.make_job(script=script))
    wait_for_state(slurm, job_id, "finished")
    slurm_id = json.loads((slurm.job_dir(job_id) / "runner.json").read_text())["slurm_id"]

    def left_squeue() -> bool:
        listed = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        return slurm_id not in listed

    try:
        wait_until(left_squeue, 2 * SLURM_WAIT, "the job to leave squeue")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{slurm_view(slurm_cluster, slurm, job_id)}") from None
    final = status_json(slurm, job_id)
    resources = final["resources"]
    assert resources["source"] == "tej", resources
    assert resources["max_rss"] >= 80 << 20, resources
    assert final["progress"] == "all done"
    data = json.loads((slurm.job_dir(job_id) / "runner.json").read_text())
    assert data.get("accounting") in (None, "none"), data
    assert slurm_cluster.run("sacct", "-n", "-j", slurm_id).returncode != 0


def test_a_failing_job_keeps_its_exit_code(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\necho oops >&2\nexit 3\n"))
    waited = slurm.cli("wait", "--id", job_id, "--exit-code", timeout=SLURM_WAIT + 10)
    assert waited.returncode == 3, waited
    final = status_json(slurm, job_id)
    assert (final["state"], final["exit_code"]) == ("finished", 3)
    assert slurm.cli("logs", "--id", job_id, "--stderr", check=0).stdout == "oops\n"


def test_kill_a_running_job_kills_its_processes(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    script = "#!/bin/sh\nsleep 300 &\necho $! > child.pid\nwait\n"
    job_id = slurm.submit(slurm.make_job(script=script))
    wait_for_state(slurm, job_id, "running")
    pid_file = slurm.work(job_id, "child.pid")
    child = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30))
    answer = one_line_answer(slurm.cli("kill", "--id", job_id), 0)
    assert answer == f"Job {job_id!r} killed"
    final = status_json(slurm, job_id)
    assert final["state"] == "killed"
    assert final["started_at"] is not None
    wait_until(lambda: not process_alive(child), 15, "the job's child to die")
    wait_until(
        lambda: scontrol(slurm_cluster, slurm, job_id)["JobState"] in ("COMPLETED", "CANCELLED"),
        15,
        "Slurm to see the job end",
    )


def test_a_pending_job_is_queued_with_slurms_reason_and_kill_cancels_it(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    job = slurm.make_job(files={"tej.json": json.dumps({"slurm": {"extra_args": ["--hold"]}})})
    job_id = slurm.submit(job)
    answer = one_line_answer(slurm.cli("status", "--id", job_id), 0)
    assert answer == "Job is queued (Slurm: PENDING, JobHeldUser)"
    assert status_json(slurm, job_id)["state"] == "queued"
    slurm.cli("kill", "--id", job_id, check=0)
    final = status_json(slurm, job_id)
    assert final["state"] == "killed"
    assert final["started_at"] is None
    answer = one_line_answer(slurm.cli("status", "--id", job_id), 0)
    assert answer == "Job was cancelled before it started"
    assert scontrol(slurm_cluster, slurm, job_id)["JobState"] == "CANCELLED"


def test_scancel_outside_tej_shows_as_killed(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\nsleep 300\n"))
    wait_for_state(slurm, job_id, "running")
    slurm_id = json.loads((slurm.job_dir(job_id) / "runner.json").read_text())["slurm_id"]
    assert slurm_cluster.run("scancel", slurm_id).returncode == 0
    final = wait_for_state(slurm, job_id, "killed")
    assert final["exit_code"] is not None or final["signal"] is not None or final["reason"]


def test_retries_run_inside_the_one_slurm_job(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    script = (
        "#!/bin/sh\nn=$(cat count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > count\n"
        'echo "try $n in $SLURM_JOB_ID"\n[ "$n" -ge 3 ] && exit 0\nexit 5\n'
    )
    job_file = {"retries": {"max": 3, "delay": 1}, "max_runtime": 60}
    job = slurm.make_job(script=script, files={"tej.json": json.dumps(job_file)})
    job_id = slurm.submit(job)
    final = wait_for_state(slurm, job_id, "finished")
    assert final["exit_code"] == 0
    assert [(item["state"], item["exit_code"]) for item in final["attempts"]] == [
        ("finished", 5),
        ("finished", 5),
        ("finished", 0),
    ]
    answer = one_line_answer(slurm.cli("status", "--id", job_id), 0)
    assert re.search(r"with exit code 0 after 3 attempts(; peak memory .*)?$", answer), answer
    # One sbatch: every attempt ran in the same Slurm job, whose time limit covers them all.
    record = scontrol(slurm_cluster, slurm, job_id)
    logs = [
        slurm.cli("logs", "--id", job_id, "--attempt", str(k), check=0).stdout for k in (1, 2, 3)
    ]
    assert logs == [f"try {k} in {record['JobId']}\n" for k in (1, 2, 3)]
    assert record["JobState"] == "COMPLETED"
    assert record["TimeLimit"] == "00:05:00"  # 4 x (60 + 5) + 3 x 1 + 30 = 293 s


def test_kill_stops_the_retries_under_slurm(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    job = slurm.make_job(
        script="#!/bin/sh\nexit 1\n",
        files={"tej.json": json.dumps({"retries": {"max": 3, "delay": "5m"}})},
    )
    job_id = slurm.submit(job)
    wait_until(lambda: status_json(slurm, job_id).get("retry_at"), SLURM_WAIT, "the delay")
    one_line_answer(slurm.cli("kill", "--id", job_id), 0)
    final = status_json(slurm, job_id)
    assert final["state"] == "killed" and len(final["attempts"]) == 1


def runner_data(target: Target, job_id: str) -> dict[str, Any]:
    """What the Slurm runner keeps of a job (runner.json)."""
    data: dict[str, Any] = json.loads((target.job_dir(job_id) / "runner.json").read_text())
    return data


def running_record(target: Target, job_id: str) -> dict[str, Any]:
    """A job's status record once its supervisor has started its script (record["job"])."""
    return wait_for_value(
        lambda: read_record(target.job_dir(job_id)),
        lambda record: record.get("job"),
        SLURM_WAIT,
        f"job {job_id} to run",
    )


def kill_the_supervisor(target: Target, job_id: str) -> None:
    """SIGKILL a running job's supervisor (its batch script) on the node."""
    os.kill(running_record(target, job_id)["supervisor"]["pid"], signal.SIGKILL)


def receive(connection: socket.socket, data: bytes) -> bytes:
    """data and the next bytes a client sends on connection (fail if it closes first)."""
    chunk = connection.recv(65536)
    assert chunk, f"the request ended early: {data!r}"
    return data + chunk


def read_request_body(connection: socket.socket) -> bytes:
    """The body of the HTTP request a client sends on connection (a webhook's POST)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data = receive(connection, data)
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length, head
    while len(body) < int(length.group(1)):
        body = receive(connection, body)
    return body


def test_a_job_slurm_cancelled_after_its_script_died_of_sigterm_is_killed(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    """scancel's race, made certain: Slurm signals a job's processes one by one, and when
    the script dies of its SIGTERM before the supervisor hears its own, the supervisor
    records the job finished by a signal tej did not send. Here the script gets the SIGTERM
    from the test; the supervisor records its end and notifies a webhook, which holds it in
    the batch script while `scancel` makes the Slurm job CANCELLED. Once the job has left
    squeue, tej asks Slurm once and shows it killed, with the script's exit code and signal."""
    with socket.create_server(("127.0.0.1", 0)) as hook:
        hook.settimeout(SLURM_WAIT)
        webhook = f"http://127.0.0.1:{hook.getsockname()[1]}/"
        notify = json.dumps({"notify": {"webhook": webhook, "on": ["finished"]}})
        job = slurm.make_job(script="#!/bin/sh\nsleep 300\n", files={"tej.json": notify})
        job_id = slurm.submit(job)
        os.kill(running_record(slurm, job_id)["job"]["pid"], signal.SIGTERM)
        connection = hook.accept()[0]
        with connection:
            connection.settimeout(SLURM_WAIT)
            told = json.loads(read_request_body(connection))
            assert (told["state"], told["signal"]) == ("finished", "SIGTERM"), told
            slurm_id = runner_data(slurm, job_id)["slurm_id"]
            assert slurm_cluster.run("scancel", slurm_id).returncode == 0
            wait_for_value(
                lambda: scontrol(slurm_cluster, slurm, job_id)["JobState"],
                lambda state: state == "CANCELLED",
                SLURM_WAIT,
                "Slurm to cancel the job",
            )
            assert read_record(slurm.job_dir(job_id))["state"] == "finished"
            connection.sendall(b"HTTP/1.0 204 No Content\r\n\r\n")
    final = wait_for_state(slurm, job_id, "killed")
    assert (final["reason"], final["exit_code"], final["signal"]) == (
        "Slurm: CANCELLED",
        143,
        "SIGTERM",
    ), final
    assert [item["state"] for item in final["attempts"]] == ["killed"]
    assert runner_data(slurm, job_id)["slurm_state"] == "CANCELLED"
    answer = one_line_answer(slurm.cli("status", "--id", job_id), 0)
    assert re.fullmatch(rf"Job was killed \({ELAPSED}\)({USAGE})?", answer), answer
    revision = read_record(slurm.job_dir(job_id))["rev"]
    assert status_json(slurm, job_id) == final  # written once: later statuses only read it
    assert read_record(slurm.job_dir(job_id))["rev"] == revision


def test_a_script_killed_by_a_signal_slurm_did_not_send_stays_finished(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    """The script dies of a SIGTERM neither tej nor Slurm sent: Slurm's job COMPLETED, so
    the job stays finished with that signal, and tej asked Slurm once (runner.json)."""
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\nsleep 300\n"))
    os.kill(running_record(slurm, job_id)["job"]["pid"], signal.SIGTERM)
    asked = wait_for_value(
        lambda: (status_json(slurm, job_id), runner_data(slurm, job_id)),
        lambda found: "slurm_state" in found[1],
        SLURM_WAIT,
        f"tej to ask Slurm how job {job_id} ended",
    )
    final, data = asked
    assert (final["state"], final["exit_code"], final["signal"]) == ("finished", 143, "SIGTERM")
    assert final["reason"] is None, final
    assert data["slurm_state"] == "COMPLETED", data
    assert scontrol(slurm_cluster, slurm, job_id)["JobState"] == "COMPLETED"


def test_a_lost_job_is_given_to_slurm_again_when_its_retries_say_so(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    # The first attempt hangs until its supervisor (the batch script) is SIGKILLed on the
    # node: Slurm ends the batch, tej finds the job lost, and sbatch runs it again.
    script = "#!/bin/sh\nif [ ! -e first ]; then touch first; sleep 300; fi\necho again\n"
    job_file = {"retries": {"max": 1, "on": ["lost"]}}
    job = slurm.make_job(script=script, files={"tej.json": json.dumps(job_file)})
    job_id = slurm.submit(job)
    slurm_id = scontrol(slurm_cluster, slurm, job_id)["JobId"]
    kill_the_supervisor(slurm, job_id)
    final = wait_for_state(slurm, job_id, "finished")
    assert final["exit_code"] == 0
    assert [item["state"] for item in final["attempts"]] == ["lost", "finished"]
    assert "its supervisor died" in final["attempts"][0]["reason"]
    assert scontrol(slurm_cluster, slurm, job_id)["JobId"] != slurm_id  # a second sbatch
    assert slurm.cli("logs", "--id", job_id, check=0).stdout == "again\n"


def test_a_lost_job_without_retries_stays_lost(slurm: Target) -> None:
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\nsleep 300\n"))
    kill_the_supervisor(slurm, job_id)
    final = wait_for_state(slurm, job_id, "lost")
    assert "its supervisor died" in final["reason"]
    assert one_line_answer(slurm.cli("status", "--id", job_id), 0).startswith("Job was lost")


def test_max_runtime_times_out_and_becomes_slurms_time_limit(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\nsleep 300\n"), "--max-runtime", "2s")
    final = wait_for_state(slurm, job_id, "timed_out")
    assert 1.5 <= final["elapsed"] < 30, final
    assert scontrol(slurm_cluster, slurm, job_id)["TimeLimit"] == "00:01:00"
    waited = slurm.cli("wait", "--id", job_id, "--exit-code")
    assert waited.returncode == 124, waited


def test_slurm_settings_in_tej_json_become_sbatch_options(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    settings = {"slurm": {"cpus": 2, "time": "5m", "partition": slurm_cluster.partition}}
    job = slurm.make_job(files={"tej.json": json.dumps(settings)})
    job_id = slurm.submit(job)
    record = scontrol(slurm_cluster, slurm, job_id)
    assert record["TimeLimit"] == "00:05:00"
    assert record["Partition"] == slurm_cluster.partition
    assert record["NumCPUs"] == "2"
    wait_for_state(slurm, job_id, "finished")


def test_list_delete_and_delete_force(slurm: Target, slurm_cluster: SlurmCluster) -> None:
    done_id = slurm.submit(slurm.make_job("a"), "--id", "done")
    held = json.dumps({"slurm": {"extra_args": ["--hold"]}})
    held_id = slurm.submit(slurm.make_job("b", files={"tej.json": held}), "--id", "held")
    wait_for_state(slurm, done_id, "finished")
    listed = json.loads(slurm.cli("list", "--json", check=0).stdout)
    assert {job["id"]: job["state"] for job in listed} == {"done": "finished", "held": "queued"}
    refused = slurm.cli("delete", "--id", held_id)
    assert "still queued" in assert_one_line_error(refused, 4)
    slurm.cli("delete", "--id", held_id, "--force", check=0)
    slurm.cli("delete", "--id", done_id, check=0)
    assert json.loads(slurm.cli("list", "--json", check=0).stdout) == []
    assert not slurm.job_dir(held_id).exists()


def test_bad_input_for_the_slurm_runner(slurm: Target) -> None:
    job = slurm.make_job()
    slurm.client_env["TOKEN"] = "secret"
    refused = slurm.cli("submit", "--env-secret", "TOKEN", str(job))
    assert "can't take secrets" in assert_one_line_error(refused)
    bad = slurm.make_job("bad", files={"tej.json": json.dumps({"slurm": {"cpus": 0}})})
    assert "slurm.cpus" in assert_one_line_error(slurm.cli("submit", str(bad)))
    bad_arg = json.dumps({"slurm": {"extra_args": ["--no-such-sbatch-option"]}})
    refused = slurm.cli("submit", str(slurm.make_job("bad2", files={"tej.json": bad_arg})))
    assert "sbatch failed" in assert_one_line_error(refused)
    assert not list(Path(slurm.queue, "jobs").iterdir())  # nothing half-made
    unknown = slurm.cli("setup", "--force", "--plugin", "slurm", "--option", "nodes=3")
    assert "unknown option 'nodes'" in assert_one_line_error(unknown)


def test_setup_suggests_slurm_without_choosing_it(
    slurm_cluster: SlurmCluster, ssh_server: SshServer, server_tmp: str, tmp_path: Path
) -> None:
    target = ssh_target(ssh_server, server_tmp, tmp_path)
    try:
        done = target.cli("setup", check=0)
        assert "(plugin: default)" in done.stdout
        assert "has Slurm (sbatch)" in done.stderr and "--plugin slurm" in done.stderr
        config = json.loads(Path(target.queue, "tej-queue.json").read_text())
        assert config["runner"] == "default"
    finally:
        target.cleanup()


def test_a_delayed_job_waits_in_slurm_not_on_a_node(
    slurm: Target, slurm_cluster: SlurmCluster
) -> None:
    job_id = slurm.submit(slurm.make_job(script="#!/bin/sh\nexit 0\n"), "--delay", "3s")
    record = scontrol(slurm_cluster, slurm, job_id)
    assert (record["JobState"], record["Reason"]) == ("PENDING", "BeginTime")
    final = wait_for_state(slurm, job_id, "finished")
    assert final["exit_code"] == 0
    submitted = datetime.fromisoformat(final["submitted_at"].replace("Z", "+00:00"))
    started = datetime.fromisoformat(final["started_at"].replace("Z", "+00:00"))
    assert (started - submitted).total_seconds() >= 2.5


def test_doctor_checks_slurm(slurm: Target) -> None:
    """`tej doctor` on a Slurm queue: Slurm's commands are there and the cluster answers."""
    done = slurm.cli("doctor", "--json", check=0)
    checks = {check["name"]: check for check in json.loads(done.stdout)}
    assert checks["slurm"]["status"] == "ok", checks["slurm"]
    assert "the cluster answers" in checks["slurm"]["found"]
    assert checks["jobs"]["status"] == "skip"
    assert "runner slurm" in checks["queue"]["found"]
