"""Retries, end to end over `local` and the real sshd: attempts, their outputs, kill, lost jobs.

Real supervisors and real job processes; every outcome is awaited by polling with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import ELAPSED, USAGE, Target, assert_one_line_error, process_alive, wait_until

from tej import protocol
from tej.server.errors import AgentError
from tej.server.jobs import validate_job

pytestmark = pytest.mark.timeout(120)

# A script that fails (exit 5) until its third run, counting its runs in its own folder.
FAILS_TWICE = """#!/bin/sh
n=$(cat count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > count
echo "try $n"; echo "oops $n" >&2
[ "$n" -ge 3 ] && exit 0
exit 5
"""


def job_dir(target: Target, name: str, script: str, job_file: Any = None) -> Path:
    """A job directory: start.sh and, if given, tej.json."""
    root = target.src_dir / name
    root.mkdir(parents=True)
    (root / "start.sh").write_text(script)
    (root / "start.sh").chmod(0o755)
    if job_file is not None:
        (root / "tej.json").write_text(json.dumps(job_file))
    return root


def attempts_of(status: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The (state, exit code) of each attempt in `status --json`."""
    return [(item.get("state"), item.get("exit_code")) for item in status["attempts"]]


def test_a_script_that_fails_twice_ends_finished_after_three_attempts(target: Target) -> None:
    directory = job_dir(target, "twice", FAILS_TWICE, {"retries": {"max": 3, "on": "failure"}})
    job_id = target.submit(directory, "--wait")
    status = target.status(job_id)
    assert status["state"] == "finished" and status["exit_code"] == 0
    assert attempts_of(status) == [("finished", 5), ("finished", 5), ("finished", 0)]
    assert status["max_attempts"] == 4
    assert [item["attempt"] for item in status["attempts"]] == [1, 2, 3]
    for item in status["attempts"]:
        assert item["started_at"] <= item["ended_at"]
    text = target.status_text(job_id)
    assert re.fullmatch(
        rf"Job is finished \({ELAPSED}\) with exit code 0 after 3 attempts{USAGE}\n", text
    )
    # Each attempt's output stays readable; the default is the last one's.
    assert target.ok("logs", "--id", job_id) == "try 3\n"
    for attempt in (1, 2, 3):
        assert target.ok("logs", "--id", job_id, "--attempt", str(attempt)) == f"try {attempt}\n"
    assert target.ok("logs", "--id", job_id, "--stderr", "--attempt", "2") == "oops 2\n"
    assert target.ok("logs", "--id", job_id, "--tail", "1", "--attempt", "1") == "try 1\n"
    done = target.cli("logs", "--id", job_id, "--attempt", "4")
    assert "there is no attempt 4" in assert_one_line_error(done)
    # The same working directory, as each attempt left it.
    assert target.work(job_id, "count").read_text() == "3\n"


def test_max_reached_ends_finished_with_the_last_exit_code(target: Target) -> None:
    directory = job_dir(target, "always", "#!/bin/sh\necho run >> runs\nexit 4\n")
    job_id = target.submit(directory, "--retries", "2", "--wait")
    status = target.status(job_id)
    assert (status["state"], status["exit_code"]) == ("finished", 4)
    assert attempts_of(status) == [("finished", 4)] * 3
    assert target.work(job_id, "runs").read_text() == "run\n" * 3
    assert "with exit code 4 after 3 attempts" in target.status_text(job_id)


def test_exit_codes_and_timeouts_choose_what_is_retried(target: Target) -> None:
    listed = job_dir(target, "listed", "#!/bin/sh\nexit 9\n", {"retries": {"max": 2, "on": [3]}})
    job_id = target.submit(listed, "--wait")
    assert attempts_of(target.status(job_id)) == [("finished", 9)]  # 9 isn't listed
    slow = job_dir(
        target, "slow", "#!/bin/sh\nsleep 30\n", {"retries": 1, "max_runtime": 0.5, "kill_grace": 1}
    )
    job_id = target.submit(slow, "--wait")
    status = target.status(job_id)
    assert status["state"] == "timed_out"
    assert [item["state"] for item in status["attempts"]] == ["timed_out", "timed_out"]


def test_kill_during_the_delay_stops_the_retries(target: Target) -> None:
    directory = job_dir(
        target,
        "delayed",
        "#!/bin/sh\necho run >> runs\nexit 1\n",
        {"retries": {"max": 3, "delay": "1m"}},
    )
    job_id = target.submit(directory)
    wait_until(lambda: target.record(job_id).get("retry_at"), message="the delay")
    assert target.status_text(job_id).startswith("Job is waiting to retry (attempt 2 of 4 at ")
    assert target.ok("kill", "--id", job_id) == f"Job {job_id!r} killed\n"
    status = target.status(job_id)
    assert status["state"] == "killed"
    assert status["reason"] == "killed while waiting to retry (after attempt 1)"
    assert attempts_of(status) == [("finished", 1)]
    assert target.work(job_id, "runs").read_text() == "run\n"
    assert target.supervisor_gone(job_id)


def test_kill_during_an_attempt_stops_the_retries(target: Target) -> None:
    directory = job_dir(target, "killed", "#!/bin/sh\necho run >> runs\nsleep 30\n")
    job_id = target.submit(directory, "--retries", "3")
    wait_until(lambda: target.record(job_id).get("state") == "running", message="running")
    target.ok("kill", "--id", job_id)
    status = target.status(job_id)
    assert status["state"] == "killed" and [i["state"] for i in status["attempts"]] == ["killed"]


def test_a_lost_job_is_retried_by_the_next_command_once(target: Target) -> None:
    directory = job_dir(
        target,
        "lost",
        "#!/bin/sh\necho run >> runs\necho $$ > pid.$(cat runs | wc -l | tr -d ' ')\nsleep 60\n",
        {"retries": {"max": 2, "on": ["lost", "failure"]}, "kill_grace": 1},
    )
    job_id = target.submit(directory)
    wait_until(lambda: target.work(job_id, "pid.1").is_file(), message="the first attempt")
    first = int(target.work(job_id, "pid.1").read_text())
    os.kill(target.wait_for(job_id, ("running",))["supervisor"]["pid"], signal.SIGKILL)
    wait_until(lambda: target.supervisor_gone(job_id), message="the supervisor to die")
    # Two clients find it lost at once: one of them starts it again.
    both = [target.popen("status", "--id", job_id) for _ in range(2)]
    outputs = [process.communicate(timeout=60)[0] for process in both]
    assert all(process.returncode == 0 for process in both), outputs
    wait_until(lambda: target.work(job_id, "pid.2").is_file(), message="the second attempt")
    wait_until(lambda: not process_alive(first), message="the lost attempt's processes to end")
    status = target.status(job_id)
    assert status["state"] == "running"
    assert attempts_of(status)[0] == ("lost", None), status
    assert "the job's supervisor died" in status["attempts"][0]["reason"]
    assert target.status_text(job_id).startswith("Job is running (attempt 2 of 3, ")
    assert target.work(job_id, "runs").read_text() == "run\n" * 2  # no double start
    target.ok("kill", "--id", job_id)
    assert target.status(job_id)["state"] == "killed"


def test_a_lost_job_without_lost_in_its_retries_stays_lost(target: Target) -> None:
    directory = job_dir(target, "stays", "#!/bin/sh\nsleep 60\n", {"retries": 2, "kill_grace": 1})
    job_id = target.submit(directory)
    wait_until(lambda: target.record(job_id).get("state") == "running", message="running")
    os.kill(target.record(job_id)["supervisor"]["pid"], signal.SIGKILL)
    wait_until(lambda: target.supervisor_gone(job_id), message="the supervisor to die")
    assert target.status(job_id)["state"] == "lost"
    target.ok("kill", "--id", job_id)


def test_logs_follow_goes_on_through_the_attempts(target: Target) -> None:
    directory = job_dir(
        target,
        "follow",
        FAILS_TWICE.replace('echo "try $n"', 'echo "try $n"; [ $n = 1 ] && sleep 1'),
        {"retries": {"max": 3, "delay": 0.5}},
    )
    job_id = target.submit(directory)
    assert target.ok("logs", "--id", job_id, "--follow") == "try 1\ntry 2\ntry 3\n"


def test_the_api_reports_the_attempts(target: Target) -> None:
    directory = job_dir(target, "api", FAILS_TWICE)
    with target.api() as remote:
        job_id = remote.submit(str(directory), retries={"max": 5})
        status = remote.wait(job_id, timeout=30)
        assert status.attempt == 3 and status.max_attempts == 6
        assert [item["exit_code"] for item in status.attempts] == [5, 5, 0]
        assert b"".join(remote.logs(job_id, attempt=2)) == b"try 2\n"


def test_a_retried_job_keeps_its_place_in_the_queue_runner(target: Target) -> None:
    target.cli("setup", "--plugin", "queue", "--option", "max_running=1", check=0)
    first = job_dir(target, "first", FAILS_TWICE, {"retries": {"max": 3, "delay": 0.3}})
    second = job_dir(target, "second", "#!/bin/sh\ntrue\n")
    first_id = target.submit(first)
    second_id = target.submit(second)
    target.wait_for(second_id)
    one, two = target.status(first_id), target.status(second_id)
    assert attempts_of(one) == [("finished", 5), ("finished", 5), ("finished", 0)]
    assert two["started_at"] > one["ended_at"]  # it waited for every attempt


BAD_RETRIES = [
    ({"max": -1}, "retries.max must be a whole number from 0 to 100"),
    ({"max": 101}, "retries.max must be a whole number from 0 to 100"),
    ({"max": 2, "on": "sometimes"}, "Invalid retries.on value 'sometimes'"),
    ({"max": 2, "on": [0]}, "Invalid retries.on value 0"),
    ({"max": 2, "on": []}, "retries.on must be"),
    ({"max": 2, "delay": "soon"}, "Invalid duration for retries.delay"),
    ({"max": 2, "backoff": 0.5}, "retries.backoff must be a number from 1 to 100"),
    ({"max": 2, "tries": 3}, "Unknown key 'tries' in retries"),
    ("3", "retries must be a number or an object"),
]


@pytest.mark.parametrize(("retries", "message"), BAD_RETRIES)
def test_bad_retries_are_refused_before_anything_is_created(
    target: Target, retries: Any, message: str
) -> None:
    directory = job_dir(target, "bad", "#!/bin/sh\ntrue\n", {"retries": retries})
    done = target.cli("submit", str(directory))
    assert message in assert_one_line_error(done)
    assert not target.server_path("jobs").exists() or not os.listdir(target.server_path("jobs"))
    with pytest.raises(AgentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_job({"script": "start.sh", "retries": retries})  # the agent checks it too


def test_the_retries_option_is_checked() -> None:
    assert protocol.check_retries(3) == {"max": 3, "on": ["failure"], "delay": 0.0, "backoff": 1.0}
    done = subprocess.run(
        ["python3", "-m", "tej", "submit", "local", ".", "--retries", "-1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--retries" in done.stderr and "Traceback" not in done.stderr
