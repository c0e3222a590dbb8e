"""Runners end to end: the queue runner (limits, priority, dependencies) and a plugin's runner.

Over `local` and the real loopback sshd (the `target` fixture), through the `tej` command
line and the Python API; nothing is mocked. Jobs that must wait for the test loop until a
`release` file appears in their folder (the test creates it on the server side). Every
outcome is awaited by polling with a deadline; a queued job is started by whatever ends or
ticks the queue, so after submitting, no client stays connected: the tests read the status
files on the server.

The third-party runner is tests/data/tej-echo-runner, a tiny package that registers the
runner `echo` under the entry-point group `tej.runners`; it is pip-installed into a
temporary folder put on the client's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Target,
    assert_one_line_error,
    one_line_answer,
    process_alive,
    wait_until,
)

from tej import InvalidInput, JobState
from tej.protocol import END_STATES

REPO = Path(__file__).resolve().parents[1]
ECHO_PLUGIN = REPO / "tests" / "data" / "tej-echo-runner"
#: A job that runs until the test creates `release` in its folder, then exits with $CODE.
BLOCKER = "#!/bin/sh\nwhile [ ! -e release ]; do sleep 0.05; done\nexit ${CODE:-0}\n"
#: A job that leaves a trace of having run at all.
MARKED = "#!/bin/sh\ntouch ran\nexit ${CODE:-0}\n"


# helpers


def setup_queue(target: Target, max_running: int = 1) -> None:
    """Make the target's queue a queue-runner queue running at most max_running jobs."""
    done = target.cli("setup", "--plugin", "queue", "--option", f"max_running={max_running}")
    assert done.returncode == 0, done
    assert done.stdout == f"Created queue {os.path.realpath(target.queue)} (plugin: queue)\n"


def queue_config(target: Target) -> dict[str, Any]:
    """The queue's configuration file, read on the server."""
    config: dict[str, Any] = json.loads(target.server_path("tej-queue.json").read_text())
    return config


def record(target: Target, job_id: str) -> dict[str, Any]:
    """A job's status record as written on the server."""
    found: dict[str, Any] = json.loads((target.job_dir(job_id) / "status.json").read_text())
    return found


def state(target: Target, job_id: str) -> str | None:
    """A job's state as written on the server (None while the file is being replaced)."""
    try:
        return str(record(target, job_id)["state"])
    except (OSError, ValueError):
        return None


def parse_time(text: str) -> datetime:
    """A time of a status record (ISO 8601, UTC)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def started_at(found: dict[str, Any]) -> datetime:
    return parse_time(found["started_at"])


def ended_at(found: dict[str, Any]) -> datetime:
    return parse_time(found["ended_at"])


def release(target: Target, job_id: str) -> None:
    """Let a BLOCKER job end."""
    target.work(job_id, "release").write_text("")


def status_json(target: Target, job_id: str) -> dict[str, Any]:
    """`tej status --json`."""
    done = target.cli("status", "--id", job_id, "--json", check=0)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def status_text(target: Target, job_id: str) -> str:
    """The one line `tej status` prints."""
    return one_line_answer(target.cli("status", "--id", job_id), 0)


def submit_blocker(target: Target, name: str = "blocker", *args: str) -> str:
    """Submit a BLOCKER job and wait until it runs."""
    job_id = target.submit(target.make_job(name, BLOCKER), *args)
    target.wait_for(job_id, ("running",))
    return job_id


def most_at_once(intervals: Sequence[tuple[float, float]]) -> int:
    """The largest number of intervals [start, end] that overlap at one instant.

    An interval that ends at the instant another starts doesn't overlap it.
    """
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


def queue_leftovers(target: Target) -> list[str]:
    """What is left in the queue's parent folder under the queue's name (a half-made queue)."""
    parent, name = os.path.split(target.queue)
    return sorted(entry for entry in os.listdir(parent) if entry.startswith(name))


# 1. setup


@pytest.mark.timeout(60)
def test_setup_records_the_runner_and_its_options(target: Target) -> None:
    setup_queue(target, 2)
    config = queue_config(target)
    assert config["runner"] == "queue"
    assert config["options"] == {"max_running": 2}
    # A built-in runner travels in the agent's bundle: nothing of it is installed on its own.
    assert "runner_module" not in config
    assert not list(target.server_path("agent").glob("tej_runner_*"))
    # The API does the same; --json shows the runner.
    other = os.path.join(os.path.dirname(target.queue), "api-queue")
    with target.api(queue=other) as remote:
        result = remote.setup(runner="queue", options={"max_running": "3"})
    assert (result.runner, result.created) == ("queue", True)
    config = json.loads(Path(other, "tej-queue.json").read_text())
    assert (config["runner"], config["options"]) == ("queue", {"max_running": 3})
    # Reconfiguring with --force keeps the queue, with the new option.
    done = target.cli(
        "setup", "--force", "--plugin", "queue", "--option", "max_running=5", "--json"
    )
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["runner"] == "queue"
    assert queue_config(target)["options"] == {"max_running": 5}


BAD_SETUPS = [
    (["--plugin", "queue", "--option", "max_running=0"], "max_running must be from 1 to"),
    (["--plugin", "queue", "--option", "max_running=abc"], "max_running must be a whole number"),
    (["--plugin", "queue", "--option", "foo=1"], "unknown option 'foo'"),
    (["--plugin", "nosuch"], "Unknown plugin 'nosuch' (available: default, queue, slurm)"),
    (["--plugin", "queue", "--option", "max_running"], "Invalid --option 'max_running'"),
    (["--plugin", "queue", "--option", "=2"], "Invalid --option '=2'"),
]


@pytest.mark.timeout(120)
def test_setup_with_bad_options_fails_and_makes_no_queue(target: Target) -> None:
    for args, message in BAD_SETUPS:
        done = target.cli("setup", *args)
        assert message in assert_one_line_error(done), (args, done.stderr)
        assert queue_leftovers(target) == [], args
    with target.api() as remote, pytest.raises(InvalidInput, match="max_running"):
        remote.setup(runner="queue", options={"max_running": "-1"})
    assert queue_leftovers(target) == []
    # A queue that exists keeps its configuration when a reconfiguration is refused.
    target.cli("setup", check=0)
    before = queue_config(target)
    for args, message in BAD_SETUPS:
        done = target.cli("setup", "--force", *args)
        assert message in assert_one_line_error(done), (args, done.stderr)
        assert queue_config(target) == before, args
    # ... and still runs jobs at once.
    job_id = target.submit(target.make_job("after-refusal"))
    assert target.wait_for(job_id)["exit_code"] == 0


@pytest.mark.timeout(90)
def test_the_runner_of_a_queue_with_queued_jobs_cannot_change(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    waiting = target.submit(target.make_job("waiting", MARKED))
    # The default runner would never start the queued job, nor kill or delete it.
    message = assert_one_line_error(target.cli("setup", "--force"))
    assert message == (
        f"Error: Can't change the runner of {os.path.realpath(target.queue)} from 'queue' to "
        f"'default' while jobs are queued in it (1, such as {waiting}): kill or delete them first"
    )
    assert queue_config(target)["runner"] == "queue"
    # The same runner with other settings is fine.
    done = target.cli("setup", "--force", "--plugin", "queue", "--option", "max_running=1")
    assert done.returncode == 0, done
    assert state(target, waiting) == "queued"
    assert one_line_answer(target.cli("kill", "--id", waiting), 0) == f"Job {waiting!r} killed"
    done = target.cli("setup", "--force")  # nothing waits any more
    assert done.returncode == 0, done
    assert queue_config(target)["runner"] == "default"
    # The running job ends as usual under the default runner.
    release(target, blocker)
    assert target.wait_for(blocker)["exit_code"] == 0


# 2. the limit


@pytest.mark.timeout(240)
def test_max_running_holds_with_twenty_concurrent_submits(target: Target) -> None:
    setup_queue(target, 2)
    script = "#!/bin/sh\ndate +%s.%N > began\nsleep 0.6\ndate +%s.%N > ended\n"
    folders = [target.make_job(f"many{number}", script) for number in range(20)]
    with ThreadPoolExecutor(len(folders)) as pool:  # each submit is a `tej` process of its own
        ids = list(pool.map(target.submit, folders))
    assert len(set(ids)) == 20
    # Nobody is connected any more: the jobs' supervisors start the queued ones.
    records = {job_id: target.wait_for(job_id, END_STATES, timeout=150) for job_id in ids}
    assert {job_id: (r["state"], r["exit_code"]) for job_id, r in records.items()} == {
        job_id: ("finished", 0) for job_id in ids
    }
    by_status = [(started_at(r).timestamp(), ended_at(r).timestamp()) for r in records.values()]
    by_script = [
        (
            float(target.work(job_id, "began").read_text()),
            float(target.work(job_id, "ended").read_text()),
        )
        for job_id in ids
    ]
    assert most_at_once(by_status) == 2, sorted(by_status)
    assert most_at_once(by_script) == 2, sorted(by_script)


@pytest.mark.timeout(10)
def test_most_at_once() -> None:
    assert most_at_once([]) == 0
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1
    assert most_at_once([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


# 3. priority


@pytest.mark.timeout(120)
def test_higher_priority_starts_first_then_submission_order(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    low = target.submit(target.make_job("low", MARKED), "--priority", "0")
    high = target.submit(target.make_job("high", MARKED), "--priority", "10")
    mid = target.submit(target.make_job("mid", MARKED), "--priority", "5")
    mid2 = target.submit(target.make_job("mid2", MARKED, files={"tej.json": '{"priority": 5}'}))
    low2 = target.submit(target.make_job("low2", MARKED))  # 0 by default
    negative = target.submit(target.make_job("negative", MARKED), "--priority", "-3")
    expected = [high, mid, mid2, low, low2, negative]
    for job_id in expected:
        assert state(target, job_id) == "queued"
        assert not target.work(job_id, "ran").exists()
    assert [status_json(target, job_id)["position"] for job_id in expected] == [
        [place, 6] for place in range(1, 7)
    ]
    release(target, blocker)
    records = {job_id: target.wait_for(job_id) for job_id in expected}
    assert all(r["state"] == "finished" and r["exit_code"] == 0 for r in records.values())
    assert sorted(expected, key=lambda job_id: started_at(records[job_id])) == expected
    # One at a time: each started once the one before had ended.
    for first, second in zip([blocker, *expected], expected):
        assert started_at(records[second]) >= ended_at(target.wait_for(first)), (first, second)


@pytest.mark.timeout(60)
def test_priority_is_refused_out_of_range(target: Target) -> None:
    setup_queue(target, 1)
    folder = target.make_job("huge")
    message = assert_one_line_error(target.cli("submit", "--priority", "10000001", str(folder)))
    assert "priority must be a whole number" in message
    bad = target.make_job("bad", files={"tej.json": '{"priority": "high"}'})
    assert "priority" in assert_one_line_error(target.cli("submit", str(bad)))
    assert os.listdir(target.server_path("jobs")) == []


# 4. dependencies


@pytest.mark.timeout(90)
def test_after_starts_only_once_the_dependency_succeeded(target: Target) -> None:
    setup_queue(target, 2)  # room for both: only the dependency holds the second back
    first = submit_blocker(target, "first")
    second = target.submit(target.make_job("second", MARKED), "--after", first)
    third = target.submit(
        target.make_job("third", MARKED, files={"tej.json": json.dumps({"after": [first, second]})})
    )
    assert status_text(target, second) == "Job is queued (position 1 of 2)"
    assert state(target, third) == "queued"
    assert not target.work(second, "ran").exists()
    release(target, first)
    done = {job_id: target.wait_for(job_id) for job_id in (first, second, third)}
    assert [done[job_id]["exit_code"] for job_id in (first, second, third)] == [0, 0, 0]
    assert started_at(done[second]) >= ended_at(done[first])
    assert started_at(done[third]) >= ended_at(done[second])
    assert status_json(target, third)["metadata"]["after"] == [first, second]


@pytest.mark.timeout(90)
def test_a_failed_dependency_cancels_its_dependents_in_cascade(target: Target) -> None:
    setup_queue(target, 2)
    failing = submit_blocker(target, "failing", "--env", "CODE=3")
    child = target.submit(target.make_job("child", MARKED), "--after", failing)
    grandchild = target.submit(target.make_job("grandchild", MARKED), "--after", child)
    killed = submit_blocker(target, "killed")
    orphan = target.submit(target.make_job("orphan", MARKED), "--after", killed)
    bystander = target.submit(target.make_job("bystander", MARKED))
    release(target, failing)
    assert target.wait_for(failing)["exit_code"] == 3
    cancelled = target.wait_for(child, ("cancelled",))
    assert cancelled["reason"] == f"job {failing} failed with exit code 3"
    assert cancelled.get("started_at") is None
    assert target.wait_for(grandchild, ("cancelled",))["reason"] == f"job {child} was cancelled"
    assert (
        status_text(target, child) == f"Job was cancelled (job {failing} failed with exit code 3)"
    )
    assert status_text(target, grandchild) == f"Job was cancelled (job {child} was cancelled)"
    document = status_json(target, child)
    assert (document["state"], document["started_at"]) == ("cancelled", None)
    # A killed dependency cancels too; a job that depends on nothing runs.
    one_line_answer(target.cli("kill", "--id", killed), 0)
    assert target.wait_for(orphan, ("cancelled",))["reason"] == f"job {killed} was killed"
    assert target.wait_for(bystander)["exit_code"] == 0
    for job_id in (child, grandchild, orphan):
        assert not target.work(job_id, "ran").exists(), job_id
    # `tej wait` on a cancelled job answers at once; --exit-code makes it a failure.
    done = target.cli("wait", "--id", child, "--exit-code")
    assert done.returncode != 0, done
    assert done.stdout == f"Job was cancelled (job {failing} failed with exit code 3)\n"


@pytest.mark.timeout(60)
def test_after_a_job_that_does_not_exist_is_refused(target: Target) -> None:
    setup_queue(target, 1)
    folder = target.make_job("orphan")
    message = assert_one_line_error(target.cli("submit", "--after", "nosuch", str(folder)))
    assert message == "Error: after: there is no job 'nosuch' in this queue"
    in_file = target.make_job("in-file", files={"tej.json": '{"after": ["nosuch"]}'})
    assert "nosuch" in assert_one_line_error(target.cli("submit", str(in_file)))
    message = assert_one_line_error(target.cli("submit", "--after", "bad/id", str(folder)))
    assert "bad/id" in message
    assert os.listdir(target.server_path("jobs")) == []
    assert os.listdir(target.server_path("staging")) == []


@pytest.mark.timeout(90)
def test_deleting_a_dependency_that_succeeded_does_not_cancel_its_dependents(
    target: Target,
) -> None:
    setup_queue(target, 1)
    first = target.submit(target.make_job("first", MARKED))
    assert target.wait_for(first)["exit_code"] == 0
    blocker = submit_blocker(target)
    second = target.submit(target.make_job("second", MARKED), "--after", first)
    assert state(target, second) == "queued"
    target.cli("delete", "--id", first, check=0)  # a succeeded job, cleaned up
    assert state(target, second) == "queued"
    release(target, blocker)
    found = target.wait_for(second, END_STATES)
    assert (found["state"], found["exit_code"]) == ("finished", 0), found


# 5. position


@pytest.mark.timeout(90)
def test_status_of_a_queued_job_shows_its_position(target: Target) -> None:
    setup_queue(target, 1)
    submit_blocker(target)
    waiting = [target.submit(target.make_job(f"waiting{number}", MARKED)) for number in range(3)]
    for place, job_id in enumerate(waiting, 1):
        assert status_text(target, job_id) == f"Job is queued (position {place} of 3)"
    urgent = target.submit(target.make_job("urgent", MARKED), "--priority", "1")
    done = target.cli("status", "--id", urgent, check=0)
    assert done.stdout == "Job is queued (position 1 of 4)\n"
    assert done.stderr == ""
    document = status_json(target, urgent)
    assert (document["state"], document["position"]) == ("queued", [1, 4])
    assert document["started_at"] is None
    assert status_text(target, waiting[2]) == "Job is queued (position 4 of 4)"
    with target.api() as remote:
        assert remote.status(waiting[0]).position == (2, 4)
        assert remote.status(waiting[0]).state is JobState.QUEUED
        listed = {status.id: status for status in remote.list()}
    assert listed[waiting[1]].position == (3, 4)
    text = target.cli("list", check=0).stdout
    assert sum(" queued " in line for line in text.splitlines()) == 4, text


# 6. kill, delete, wait


@pytest.mark.timeout(90)
def test_killing_a_queued_job_takes_it_out_of_the_queue(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    doomed = target.submit(target.make_job("doomed", MARKED))
    following = target.submit(target.make_job("following", MARKED))
    assert one_line_answer(target.cli("kill", "--id", doomed), 0) == f"Job {doomed!r} killed"
    found = record(target, doomed)
    assert (found["state"], found.get("started_at")) == ("killed", None)
    assert status_text(target, doomed) == "Job was cancelled before it started"
    assert status_text(target, following) == "Job is queued (position 1 of 1)"
    # Killing the running job lets the next one start.
    assert one_line_answer(target.cli("kill", "--id", blocker), 0) == f"Job {blocker!r} killed"
    assert target.wait_for(following)["exit_code"] == 0
    assert record(target, doomed)["state"] == "killed"
    assert not target.work(doomed, "ran").exists()
    assert one_line_answer(target.cli("kill", "--id", doomed), 0) == (
        f"Job {doomed!r} has already completed"
    )


@pytest.mark.timeout(90)
def test_deleting_a_queued_job_needs_force(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    queued = target.submit(target.make_job("queued", MARKED))
    following = target.submit(target.make_job("following", MARKED))
    message = assert_one_line_error(target.cli("delete", "--id", queued), 4)
    assert f"Job {queued!r} is still queued" in message
    assert state(target, queued) == "queued"
    done = target.cli("delete", "--id", queued, "--force", check=0)
    assert done.stdout == f"Deleted job {queued!r}\n"
    assert not target.job_dir(queued).exists()
    assert status_text(target, following) == "Job is queued (position 1 of 1)"
    release(target, blocker)
    assert target.wait_for(following)["exit_code"] == 0


@pytest.mark.timeout(90)
def test_wait_on_a_queued_job_returns_once_it_has_run(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    queued = target.submit(target.make_job("queued", MARKED), "--env", "CODE=5")
    waiting = target.popen("wait", "--id", queued, "--exit-code")
    try:
        # The waiting client is connected: one more status call proves it waits, not ended.
        assert status_text(target, queued) == "Job is queued (position 1 of 1)"
        assert waiting.poll() is None
        release(target, blocker)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 5, (out, err)
    assert out.startswith("Job is finished (") and re.search(
        r"\) with exit code 5(;.*)?\n\Z", out
    ), out
    assert target.work(queued, "ran").exists()


# 7. a start time


@pytest.mark.timeout(90)
def test_a_delayed_job_joins_the_queue_at_its_time(target: Target) -> None:
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    delayed = target.submit(target.make_job("delayed", MARKED), "--delay", "3s")
    target.wait_for(delayed, ("scheduled",))  # submit answers while it is starting
    document = status_json(target, delayed)
    assert document["state"] == "scheduled"
    scheduled_for = parse_time(document["scheduled_for"])
    assert status_text(target, delayed).startswith("Job is scheduled to start at ")
    target.wait_for(delayed, ("queued",), timeout=20)
    assert datetime.now(scheduled_for.tzinfo) >= scheduled_for
    assert state(target, blocker) == "running"  # the queue is full: it waits its turn
    assert status_text(target, delayed) == "Job is queued (position 1 of 1)"
    assert not target.work(delayed, "ran").exists()
    release(target, blocker)
    found = target.wait_for(delayed)
    assert found["exit_code"] == 0
    assert started_at(found) >= ended_at(target.wait_for(blocker))
    assert started_at(found) >= scheduled_for
    # With room in the queue, it starts at its time.
    soon = target.submit(target.make_job("soon", MARKED), "--delay", "1s")
    scheduled_for = parse_time(status_json(target, soon)["scheduled_for"])
    found = target.wait_for(soon)
    assert found["exit_code"] == 0
    assert started_at(found) >= scheduled_for


@pytest.mark.timeout(120)
def test_jobs_due_at_once_do_not_exceed_max_running(target: Target) -> None:
    setup_queue(target, 2)
    script = "#!/bin/sh\ndate +%s.%N > began\nsleep 0.5\ndate +%s.%N > ended\n"
    when = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()
    ids = [
        target.submit(target.make_job(f"due{number}", script), "--start-at", when)
        for number in range(5)
    ]
    records = [target.wait_for(job_id, END_STATES, timeout=60) for job_id in ids]
    assert [(r["state"], r["exit_code"]) for r in records] == [("finished", 0)] * 5
    assert min(started_at(r) for r in records) >= parse_time(when)
    intervals = [
        (
            float(target.work(job_id, "began").read_text()),
            float(target.work(job_id, "ended").read_text()),
        )
        for job_id in ids
    ]
    assert most_at_once(intervals) == 2, sorted(intervals)
    by_status = [(started_at(r).timestamp(), ended_at(r).timestamp()) for r in records]
    assert most_at_once(by_status) == 2, sorted(by_status)


@pytest.mark.timeout(60)
def test_killing_a_scheduled_job_cancels_it(target: Target) -> None:
    setup_queue(target, 1)
    later = target.submit(target.make_job("later", MARKED), "--delay", "1h")
    target.wait_for(later, ("scheduled",))  # submit answers while it is starting
    assert one_line_answer(target.cli("kill", "--id", later), 0) == f"Job {later!r} killed"
    found = target.wait_for(later, END_STATES)
    assert (found["state"], found.get("started_at")) == ("killed", None), found
    assert status_text(target, later) == "Job was cancelled before it started"
    # The queue is free for the next one.
    following = target.submit(target.make_job("following", MARKED))
    assert target.wait_for(following)["exit_code"] == 0
    assert not target.work(later, "ran").exists()


# 8. what a runner doesn't support


@pytest.mark.timeout(60)
def test_secrets_are_refused_by_the_queue_runner(target: Target) -> None:
    setup_queue(target, 1)
    target.client_env["TEJ_TEST_SECRET"] = "hunter2"
    folder = target.make_job("secret")
    message = assert_one_line_error(
        target.cli("submit", "--env-secret", "TEJ_TEST_SECRET", str(folder))
    )
    assert message.startswith("Error: The queue runner can't take secrets"), message
    assert "hunter2" not in message
    assert os.listdir(target.server_path("jobs")) == []
    assert os.listdir(target.server_path("staging")) == []


@pytest.mark.timeout(60)
def test_queue_fields_on_a_default_queue_are_refused(target: Target) -> None:
    target.cli("setup", check=0)
    first = target.submit(target.make_job("first"))
    folder = target.make_job("prioritized")
    message = assert_one_line_error(target.cli("submit", "--priority", "3", str(folder)))
    assert "priority needs a runner that supports it" in message, message
    assert "'default'" in message and "--plugin queue" in message, message
    message = assert_one_line_error(target.cli("submit", "--after", first, str(folder)))
    assert "after needs a runner" in message and "--plugin queue" in message, message
    in_file = target.make_job("in-file", files={"tej.json": '{"priority": 1}'})
    assert "--plugin queue" in assert_one_line_error(target.cli("submit", str(in_file)))
    assert os.listdir(target.server_path("jobs")) == [first]


# 9. a lost job


@pytest.mark.timeout(90)
def test_a_lost_job_does_not_block_the_queue(target: Target) -> None:
    setup_queue(target, 1)
    doomed = submit_blocker(target, "doomed")
    following = target.submit(target.make_job("following", MARKED))
    supervisor = record(target, doomed)["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor), 10, "the supervisor to die")
    assert state(target, following) == "queued"  # nothing ticked the queue yet
    text = target.cli("list", check=0).stdout  # which ticks it
    assert any(line.split()[:2] == [doomed, "lost"] for line in text.splitlines()), text
    assert target.wait_for(following)["exit_code"] == 0
    assert status_text(target, doomed) == "Job was lost (the job's supervisor died)"


@pytest.mark.timeout(90)
def test_a_client_whose_agent_is_not_in_the_queue_installs_it_before_starting_jobs(
    target: Target,
) -> None:
    setup_queue(target, 1)
    doomed = submit_blocker(target, "doomed")
    following = target.submit(target.make_job("following", MARKED))
    supervisor = record(target, doomed)["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor), 10, "the supervisor to die")
    # As if the queue had been used only by another version of tej: its agent's copy only.
    (ours,) = target.server_path("agent").glob("tej_agent_*")
    ours.rename(ours.with_name("tej_agent_0000000000000000"))
    target.cli("list", check=0)  # ticks the queue: the job starts from this client's agent
    found = target.wait_for(following, END_STATES)
    assert (found["state"], found["exit_code"]) == ("finished", 0), found
    assert (ours / "remote_agent.py").is_file()


# 10. a runner from a plugin


def pip_install(package: Path, folder: Path) -> Path:
    """Install a package's folder into folder with pip, offline (no index, no isolation)."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    argv += ["--no-build-isolation", "--disable-pip-version-check", "--root-user-action=ignore"]
    done = subprocess.run(
        [*argv, "--target", str(folder), str(package)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (folder / "tej_echo_runner.py").is_file()
    return folder


@pytest.fixture(scope="module")
def echo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/data/tej-echo-runner installed into a folder of its own."""
    return pip_install(ECHO_PLUGIN, tmp_path_factory.mktemp("echo-plugin"))


@pytest.fixture
def with_plugin(target: Target, echo_plugin: Path) -> Iterator[Target]:
    """The target, its client seeing the plugin on its PYTHONPATH."""
    target.client_env["PYTHONPATH"] = str(echo_plugin)  # run_tej puts the work tree first
    yield target


def without_plugin(target: Target) -> None:
    target.client_env.pop("PYTHONPATH", None)


def server_uid(target: Target) -> int:
    return int(target.server.uid) if target.server is not None else os.getuid()


@pytest.mark.timeout(120)
def test_a_plugin_runner_runs_jobs_on_the_server(with_plugin: Target) -> None:
    target = with_plugin
    done = target.cli("setup", "--plugin", "echo", "--option", "greeting=hi", check=0)
    assert done.stdout.endswith("(plugin: echo)\n"), done.stdout
    config = queue_config(target)
    assert (config["runner"], config["options"]) == ("echo", {"greeting": "hi"})
    script = "#!/bin/sh\ncat ../runner.json > seen.json\n"
    job_id = target.submit(target.make_job("greeted", script))
    assert target.wait_for(job_id)["exit_code"] == 0
    marker = json.loads((target.job_dir(job_id) / "runner.json").read_text())
    assert marker["runner"] == "echo"
    assert marker["greeting"] == f"hi, {job_id}"
    assert marker["uid"] == server_uid(target)  # the SSH user's, over ssh
    assert marker["pid"] != os.getpid()
    assert json.loads(target.work(job_id, "seen.json").read_text()) == marker  # written first
    assert re.search(r"with exit code 0(;.*)?\Z", status_text(target, job_id))
    # Its options are checked by the plugin, on the server.
    message = assert_one_line_error(
        target.cli("setup", "--force", "--plugin", "echo", "--option", "colour=red")
    )
    assert message == "Error: echo runner: unknown option 'colour' (this runner takes greeting)"
    assert queue_config(target)["options"] == {"greeting": "hi"}


@pytest.mark.timeout(120)
def test_a_plugin_queue_works_from_a_client_without_the_plugin(with_plugin: Target) -> None:
    target = with_plugin
    target.cli("setup", "--plugin", "echo", "--option", "greeting=hey", check=0)
    without_plugin(target)
    job_id = target.submit(target.make_job("plain"))
    assert target.wait_for(job_id)["exit_code"] == 0
    assert json.loads((target.job_dir(job_id) / "runner.json").read_text())["greeting"] == (
        f"hey, {job_id}"
    )
    assert one_line_answer(target.cli("kill", "--id", job_id), 0).endswith("already completed")
    # Without the plugin, it can't be set up...
    message = assert_one_line_error(target.cli("setup", "--force", "--plugin", "echo"))
    assert message == "Error: Unknown plugin 'echo' (available: default, queue, slurm)"
    # ... nor used once its module is gone from the queue.
    module = queue_config(target)["runner_module"]
    target.server_path("agent", f"{module}.py").unlink()
    message = assert_one_line_error(target.cli("list"))
    assert "uses the runner 'echo'" in message and "install its plugin" in message, message


@pytest.mark.timeout(120)
def test_a_client_with_the_plugin_reinstalls_its_module(with_plugin: Target) -> None:
    target = with_plugin
    target.cli("setup", "--plugin", "echo", check=0)
    module = queue_config(target)["runner_module"]
    target.server_path("agent", f"{module}.py").unlink()
    job_id = target.submit(target.make_job("again"))
    assert target.wait_for(job_id)["exit_code"] == 0
    assert target.server_path("agent", f"{module}.py").is_file()
    marker = json.loads((target.job_dir(job_id) / "runner.json").read_text())
    assert marker["greeting"] == f"hello, {job_id}"


@pytest.mark.timeout(120)
def test_a_newer_plugin_replaces_the_queues_copy(with_plugin: Target, tmp_path: Path) -> None:
    target = with_plugin
    target.cli("setup", "--plugin", "echo", check=0)
    first = target.submit(target.make_job("first"))
    assert target.wait_for(first)["exit_code"] == 0
    old_module = queue_config(target)["runner_module"]
    # Version 2 of the plugin.
    source = tmp_path / "tej-echo-runner-2"
    source.mkdir()
    for name in ("pyproject.toml", "tej_echo_runner.py"):
        text = (ECHO_PLUGIN / name).read_text()
        text = text.replace('version = "1.0"', 'version = "2.0"')
        (source / name).write_text(text.replace('VERSION = "1.0"', 'VERSION = "2.0"'))
    newer = pip_install(source, tmp_path / "newer")
    target.client_env["PYTHONPATH"] = str(newer)
    # A plugin's newer version is installed by setting the queue up again (a built-in
    # runner's, by the client at once: finding plugins would cost every connection).
    target.cli("setup", "--force", "--plugin", "echo", check=0)
    second = target.submit(target.make_job("second"))
    assert target.wait_for(second)["exit_code"] == 0
    marker = json.loads((target.job_dir(second) / "runner.json").read_text())
    assert (marker["version"], marker["greeting"]) == ("2.0", f"hello, {second}")
    new_module = queue_config(target)["runner_module"]
    assert new_module != old_module
    assert target.server_path("agent", f"{new_module}.py").is_file()
    assert json.loads((target.job_dir(first) / "runner.json").read_text())["version"] == "1.0"


@pytest.mark.timeout(120)
def test_raising_max_running_starts_waiting_jobs_at_once(target: Target) -> None:
    target.cli("setup", "--plugin", "queue", "--option", "max_running=1", check=0)
    gate = target.server_path("gate")
    script = f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
    first = target.submit(target.make_job("first", script))
    second = target.submit(target.make_job("second", script))
    target.wait_for(first, ("running",))
    assert status_text(target, second) == "Job is queued (position 1 of 1)"
    target.cli("setup", "--force", "--plugin", "queue", "--option", "max_running=2", check=0)
    target.wait_for(second, ("running",), timeout=15)
    gate.touch()
    for job_id in (first, second):
        assert target.wait_for(job_id)["exit_code"] == 0


@pytest.mark.timeout(240)
def test_hundreds_of_jobs_run_in_turn_each_started_by_the_last(target: Target) -> None:
    # Each job's supervisor starts the next: a chain of 200 supervisors, none lost.
    setup_queue(target, 1)
    blocker = submit_blocker(target)
    job = target.make_job("marked", MARKED)
    with target.api() as remote:
        ids = [remote.submit(str(job), job_id=f"chain{number:03d}") for number in range(200)]
    release(target, blocker)  # nobody is connected any more: the supervisors carry on
    last = target.wait_for(ids[-1], END_STATES, timeout=200)
    assert last["state"] == "finished", last
    states = {job_id: state(target, job_id) for job_id in ids}
    others = {job_id: found for job_id, found in states.items() if found != "finished"}
    assert not others, others
