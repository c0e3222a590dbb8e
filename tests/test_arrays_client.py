"""Arrays in list, sync and delete, and the corners of arrays: retries of tasks, a lost array
supervisor, the default number of tasks at once, wait's exit code, kill from the API,
resubmit --failed with nothing failed. Over `local` and the real sshd, through the CLI and
the API (tests/test_arrays.py has the rest)."""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import pytest
from helpers import Target, assert_one_line_error, process_alive, wait_until
from terminal import Terminal
from test_costs import tej_command

from tej.api import ArrayStatus, JobState
from tej.errors import InvalidInput

pytestmark = pytest.mark.timeout(180)


def held_script(target: Target) -> str:
    """A task that says it started, waits for the file `go` in the queue, then writes result.txt."""
    go = target.server_path("go")
    return (
        "#!/bin/sh\n"
        'echo "started $TEJ_ARRAY_INDEX" > started.txt\n'
        f"while [ ! -e {go} ]; do sleep 0.05; done\n"
        'echo "done $TEJ_ARRAY_INDEX" > result.txt\n'
        '[ "$TEJ_ARRAY_INDEX" = 1 ] && exit 5\n'
        "exit 0\n"
    )


def release(target: Target) -> None:
    """Let the held tasks end."""
    target.server_path("go").write_text("")


def task_started(target: Target, task: str) -> bool:
    """Whether task ARRAYID.N wrote started.txt."""
    array_id, _, index = task.rpartition(".")
    return target.server_path("jobs", array_id, "jobs", index, "work", "started.txt").exists()


def json_list(target: Target, *args: str) -> list[dict[str, Any]]:
    """`tej list --json ARGS`."""
    rows = json.loads(target.ok("list", "--json", *args))
    assert isinstance(rows, list)
    return rows


def table(target: Target, *args: str) -> dict[str, list[str]]:
    """`tej list ARGS`: each row's cells by id (the PROGRESS cell as one)."""
    lines = target.ok("list", *args).splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "ELAPSED", "EXIT"], lines
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_list_shows_an_array_as_one_row_with_its_counts_and_tasks(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-3%1", "--id", "arr")
    target.submit(target.make_job("plain"), "--id", "plain", "--wait")
    wait_until(lambda: task_started(target, "arr.0"), 30, "arr.0 to start")
    rows = table(target)
    assert rows["arr"][0] == "running" and rows["arr"][-1] == "array of 4: 1 running, 3 queued"
    assert rows["plain"] == ["finished", rows["plain"][1], "0"], rows
    listed = {row["id"]: row for row in json_list(target)}
    assert listed["arr"]["array"] == {
        "size": 4,
        "max_parallel": 1,
        "indexes": "0-3",
        "counts": {"running": 1, "queued": 3},
    }
    assert "array" not in listed["plain"]
    tasks = table(target, "--tasks")
    assert list(tasks) == ["arr", "arr.0", "arr.1", "arr.2", "arr.3", "plain"], tasks
    assert [tasks[f"arr.{n}"][0] for n in range(4)] == ["running", "queued", "queued", "queued"]
    # --state picks arrays by their own state; with --tasks, tasks by theirs.
    assert "arr" not in table(target, "--state", "queued")
    assert list(table(target, "--tasks", "--state", "running")) == ["arr", "arr.0"]
    release(target)
    target.cli("wait", "--id", "arr", check=0)
    rows = table(target, "--tasks")
    assert rows["arr"] == ["finished", rows["arr"][1], "5", "array of 4: 4 finished"], rows
    assert rows["arr.1"][0] == "finished" and rows["arr.1"][2] == "5", rows
    # The ended array's row is in a segment of the index, with its counts.
    segments = target.server_path("index", "rows").iterdir()
    text = "".join(path.read_text() for path in segments)
    assert re.search(r'\tarr\tfinished\t.*\{"size":4,.*"counts":\{"finished":4\}', text), text
    # Through the API: an array is an ArrayStatus; its tasks follow it with tasks=True.
    remote = target.remote()
    array = next(job for job in remote.list() if job.id == "arr")
    assert isinstance(array, ArrayStatus) and array.counts == {"finished": 4}
    ids = [job.id for job in remote.list(["finished"], tasks=True)]
    assert ids == ["arr", "arr.0", "arr.1", "arr.2", "arr.3", "plain"]
    assert [job.id for job in remote.list("finished", tasks=True)] == ids  # one state alone


def test_sync_puts_each_task_in_its_folder_and_follows_the_array(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-2%3", "--id", "sw")
    wait_until(lambda: all(task_started(target, f"sw.{n}") for n in range(3)), 30, "starts")
    follow = target.popen("sync", "--id", "sw", "--follow", "--interval", "0.5")
    into = target.client_dir / "sw"
    wait_until(lambda: (into / "sw.2" / "started.txt").exists(), 30, "the first pass")
    assert not (into / "sw.2" / "result.txt").exists()
    release(target)
    out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    assert out.splitlines()[-1].startswith("./sw: "), out
    for index in range(3):
        assert (into / f"sw.{index}" / "result.txt").read_text() == f"done {index}\n"
        assert (into / f"sw.{index}" / "start.sh").exists()
    found = {path.name for path in into.iterdir()}
    assert found == {"sw.0", "sw.1", "sw.2"}, found
    # Again: nothing sent; --to and --json; one task alone, as a job.
    summary = json.loads(target.ok("sync", "--id", "sw", "--json"))
    assert summary["files_sent"] == 0 and summary["files_unchanged"] == 9, summary
    assert summary["state"] == "finished"
    elsewhere = target.client_dir / "elsewhere"
    target.ok("sync", "--id", "sw", "--to", str(elsewhere), "result.txt")
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("result.txt")) == [
        "sw.0/result.txt",
        "sw.1/result.txt",
        "sw.2/result.txt",
    ]
    target.ok("sync", "--id", "sw.1", "--to", str(target.client_dir / "one"))
    assert (target.client_dir / "one" / "result.txt").read_text() == "done 1\n"


def test_delete_a_task_keeps_a_tombstone(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-3%2", "--id", "del")
    wait_until(lambda: task_started(target, "del.1"), 30, "del.1 to start")
    # A running array, a running task, a queued task: refused as a running job is.
    for task in ("del", "del.0", "del.3"):
        message = assert_one_line_error(target.cli("delete", "--id", task))
        assert "kill it first" in message, message
    # --force cancels a queued task, then deletes it.
    target.ok("delete", "--id", "del.3", "--force")
    assert_one_line_error(target.cli("status", "--id", "del.3"), 3, prefix="No job 'del.3'")
    release(target)
    target.cli("wait", "--id", "del", check=0)
    before = target.status("del")
    assert before["exit_code"] == 5 and before["array"]["counts"] == {"finished": 3, "killed": 1}
    out = target.ok("delete", "--id", "del.1")
    assert out == "Deleted task 'del.1' (its array still counts how it ended)\n"
    folder = target.server_path("jobs", "del", "jobs", "1")
    assert sorted(os.listdir(folder)) == ["deleted", "job.json", "status.json"]
    for command in ("status", "logs", "delete"):
        message = assert_one_line_error(target.cli(command, "--id", "del.1"), 3, prefix="No job")
        assert message == "No job 'del.1': it was deleted", message
    # Its array still counts it as it ended; it never looks queued again.
    after = target.status("del")
    assert after["array"]["counts"] == before["array"]["counts"]
    assert after["exit_code"] == 5 and after["state"] == "finished"
    assert table(target, "--tasks")["del.1"][0] == "finished"
    into = target.client_dir / "dl"
    target.cli("download", "--id", "del", "result.txt:" + str(into), check=0)
    assert sorted(path.name for path in into.iterdir()) == ["del.0", "del.2"]


def test_delete_of_a_task_that_never_started(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-2%1", "--id", "nv")
    wait_until(lambda: task_started(target, "nv.0"), 30, "nv.0 to start")
    target.cli("kill", "--id", "nv", check=0)
    wait_until(lambda: target.status("nv")["state"] == "killed", 30, "the array's end")
    assert target.status("nv.2")["state"] == "cancelled"
    message = assert_one_line_error(target.cli("delete", "--id", "nv.2"))
    assert message == "Error: Task 'nv.2' never started: it has no files to delete", message
    assert target.status("nv.2")["state"] == "cancelled"
    killed = json.loads(target.ok("kill", "--id", "nv.2", "--json"))  # ended: nothing to do
    assert killed["killed"] is False and killed["status"]["state"] == "cancelled"
    assert not target.server_path("jobs", "nv", "jobs", "2").exists()


RETRIED = """#!/bin/sh
if [ ! -e tried ]; then touch tried; echo "first $TEJ_ARRAY_INDEX"; exit 4; fi
echo "second $TEJ_ARRAY_INDEX"
"""


def test_tasks_retry_on_their_own(target: Target) -> None:
    job = target.make_job("retried", RETRIED)
    (job / "tej.json").write_text(
        json.dumps({"array": "0-1", "retries": {"max": 2, "delay": "4s"}})
    )
    array = target.submit(job, "--id", "re")
    remote = target.remote()
    waiting = wait_until(lambda: (s := remote.status("re.0")).retry_at is not None and s, 30)
    assert waiting.state is JobState.RUNNING and waiting.attempt == 1
    text = target.status_text("re.0")
    assert text.startswith("Job is waiting to retry (attempt 2 of 3 at "), text
    done = target.cli("wait", "--id", array, "--exit-code", check=0)
    assert done.stdout.startswith("Array is finished: 2 finished"), done.stdout
    for index in (0, 1):
        assert target.ok("logs", "--id", f"re.{index}", "--attempt", "1") == f"first {index}\n"
        assert target.ok("logs", "--id", f"re.{index}") == f"second {index}\n"
        status = target.status(f"re.{index}")
        assert [attempt["exit_code"] for attempt in status["attempts"]] == [4, 0]
        assert status["exit_code"] == 0 and status["max_attempts"] == 3


def test_array_whose_supervisor_is_killed_is_lost(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-3%1", "--id", "lo")
    wait_until(lambda: task_started(target, "lo.0"), 30, "lo.0 to start")
    record = target.server_path("jobs", "lo", "jobs", "0", "status.json")
    wait_until(lambda: '"state": "running"' in record.read_text(), 10, "lo.0 to be running")
    supervisor = target.record("lo")["supervisor"]["pid"]
    script = json.loads(record.read_text())["job"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor), 10, "the array's supervisor to die")
    text = target.status_text("lo")
    assert text.startswith("Array is lost: 3 cancelled, 1 running ("), text
    assert text.endswith("(the job's supervisor died)\n"), text
    # Its running task is lost with it (its script runs on, an orphan: `tej kill` stops it);
    # the others never start.
    lost = target.status("lo.0")
    assert lost["state"] == "lost" and lost["reason"] == "the job's supervisor died", lost
    assert process_alive(script)
    unstarted = target.status("lo.2")
    assert unstarted["state"] == "cancelled", unstarted
    assert target.cli("wait", "--id", "lo").returncode == 7  # lost
    assert target.cli("kill", "--id", "lo.0").returncode == 0
    wait_until(lambda: not process_alive(script), 10, "lo.0's script to be killed")
    assert target.status("lo.0")["state"] == "killed"
    assert target.status("lo")["array"]["counts"] == {"killed": 1, "cancelled": 3}
    assert not target.server_path("jobs", "lo", "jobs", "1").exists()


TIMED = """#!/bin/sh
start=$(date +%s.%N)
sleep 1
echo "$start $(date +%s.%N)" > times
"""


def test_at_most_the_cpu_count_at_once_without_a_limit(target: Target) -> None:
    cpus = os.cpu_count() or 1  # the server is this machine
    job = target.make_job("timed", TIMED)
    size = 2 * cpus + 1
    array = target.submit(job, "--array", f"0-{size - 1}", "--id", "cpu", "--wait")
    assert target.status(array)["array"]["max_parallel"] is None
    spans = []
    for index in range(size):
        path = target.server_path("jobs", array, "jobs", str(index), "work", "times")
        start, end = path.read_text().split()
        spans.append((float(start), float(end)))
    most = max(sum(1 for other, end in spans if other <= start < end) for start, _ in spans)
    assert most <= cpus, spans
    assert most >= min(cpus, 2), spans  # and they do run side by side


def test_wait_exit_code_is_the_first_failed_task_by_index(target: Target) -> None:
    script = (
        "#!/bin/sh\n"
        '[ "$TEJ_ARRAY_INDEX" = 1 ] && sleep 1 && exit 5\n'
        '[ "$TEJ_ARRAY_INDEX" = 2 ] && exit 4\n'
        "exit 0\n"
    )
    array = target.submit(target.make_job("fails", script), "--array", "0-3", "--id", "ex")
    done = target.cli("wait", "--id", array, "--exit-code")
    assert done.returncode == 5, done  # task 1's, though task 2 failed first
    assert (
        done.stdout.startswith("Array is finished: 4 finished (") and "exit code 5" in done.stdout
    )
    assert target.cli("wait", "--id", "ex.2", "--exit-code").returncode == 4


def test_kill_an_array_from_the_api(target: Target) -> None:
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-4%2", "--id", "ka")
    wait_until(lambda: task_started(target, "ka.1"), 30, "two tasks to start")
    remote = target.remote()
    result = remote.kill("ka")
    assert result.killed is True and result.status.id == "ka"
    final = remote.wait("ka", timeout=60)
    assert isinstance(final, ArrayStatus) and final.state is JobState.KILLED
    assert final.counts == {"killed": 2, "cancelled": 3}, final.counts
    again = remote.kill("ka")
    assert again.killed is False and again.status.state is JobState.KILLED


def test_resubmit_failed_with_no_failed_task(target: Target) -> None:
    array = target.submit(target.make_job("fine"), "--array", "0-2", "--id", "ok", "--wait")
    before = sorted(os.listdir(target.server_path("jobs")))
    message = assert_one_line_error(target.cli("resubmit", "--id", array, "--failed"))
    assert message == "Error: Every task of array 'ok' finished with exit code 0", message
    assert sorted(os.listdir(target.server_path("jobs"))) == before


def test_list_watch_shows_an_array_and_its_tasks(target: Target, terminal: Terminal) -> None:
    target.submit(target.make_job("plain"), "--id", "plain", "--wait")
    job = target.make_job("held", held_script(target))
    target.submit(job, "--array", "0-2%1", "--id", "wa")
    wait_until(lambda: task_started(target, "wa.0"), 30, "wa.0 to start")
    # --state picks the rows as plain `list --state` does: the running array and task only.
    terminal.run(tej_command(target, "list", "--watch", "--tasks", "--state", "running"))
    screen = terminal.wait_for(lambda s: "array of 3" in s, "the live table")
    assert listed_ids(screen) == ["wa", "wa.0"], screen
    terminal.keys("q")
    terminal.wait_for(lambda s: "array of 3" not in s, "the shell's screen back", 10)
    terminal.run("clear; " + tej_command(target, "list", "--watch", "--tasks"))
    screen = terminal.wait_for(lambda s: "array of 3" in s, "the live table")
    rows = {line.split()[0]: line for line in screen.splitlines() if line.startswith("wa")}
    assert re.fullmatch(r"wa +running +\S+ +array of 3: 1 running, 2 queued", rows["wa"]), screen
    assert rows["wa.0"].split()[1] == "running" and rows["wa.2"].split()[1] == "queued", screen
    release(target)
    screen = terminal.wait_for(lambda s: "array of 3: 3 finished" in s, "the array's end", 60)
    # Ended, newest first: the array, its tasks right after it by index, as `list --tasks`.
    assert listed_ids(screen) == ["wa", "wa.0", "wa.1", "wa.2", "plain"], screen
    terminal.keys("q")
    terminal.wait_for(lambda s: "array of 3" not in s, "the shell's screen back", 10)


def listed_ids(screen: str) -> list[str]:
    """The ids of the rows of `list --watch`'s table, top to bottom."""
    lines = screen.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("ID "))
    return [line.split()[0] for line in lines[start + 1 :] if line.strip()]


LIMITED = """#!/bin/sh
case "$TEJ_ARRAY_INDEX" in
  0) exec sleep 60 ;;
  1) sleep 300 & echo $! > left.pid; exit 3 ;;
  *) exit 0 ;;
esac
"""


def test_tasks_keep_their_time_limit_and_leave_nothing_running(target: Target) -> None:
    # The array's supervisor runs its tasks itself: each keeps its own max_runtime and kill
    # grace, and what a task leaves in its process group is stopped when it ends.
    job = target.make_job("limited", LIMITED)
    (job / "tej.json").write_text(
        json.dumps({"array": "0-2", "max_runtime": "2s", "kill_grace": "1s"})
    )
    target.submit(job, "--id", "lim")
    done = target.cli("wait", "--id", "lim", "--exit-code", timeout=60)
    assert done.returncode == 143, done  # task 0: killed by SIGTERM at its time limit
    first, second, third = (target.status(f"lim.{index}") for index in (0, 1, 2))
    assert first["state"] == "timed_out" and first["signal"] == "SIGTERM", first
    assert second["state"] == "finished" and second["exit_code"] == 3, second
    assert third["state"] == "finished" and third["exit_code"] == 0, third
    left = target.server_path("jobs", "lim", "jobs", "1", "work", "left.pid")
    assert not process_alive(int(left.read_text()))
    for status in (first, second, third):
        assert status["resources"]["source"] == "tej", status
    counts = target.status("lim")["array"]["counts"]
    assert counts == {"timed_out": 1, "finished": 2}, counts


def test_kill_of_an_array_through_the_api_gives_its_counts(target: Target) -> None:
    job = target.make_job("stopped", "#!/bin/sh\nsleep 60\n")
    target.submit(job, "--array", "0-3%2", "--id", "ka")
    remote = target.remote()
    wait_until(lambda: remote.status("ka").counts.get("running") == 2, 30, "two tasks running")
    result = remote.kill("ka")
    assert result.killed and isinstance(result.status, ArrayStatus), result
    assert result.status.size == 4
    ended = remote.wait("ka", timeout=30)
    assert isinstance(ended, ArrayStatus) and ended.counts == {"killed": 2, "cancelled": 2}


def test_a_task_whose_script_cannot_run_ends_as_a_job_does(target: Target) -> None:
    job = target.make_job("broken", "#!/nowhere/interpreter\necho never\n")
    target.submit(job, "--array", "0-1", "--id", "br")
    done = target.cli("wait", "--id", "br", "--exit-code", timeout=60)
    assert done.returncode == 127, done
    for index in (0, 1):
        status = target.status(f"br.{index}")
        assert status["state"] == "finished" and status["exit_code"] == 127, status
        reason = "cannot run start.sh: its interpreter /nowhere/interpreter is not found"
        assert status["reason"] == reason, status
        assert len(status["attempts"]) == 1 and status.get("resources") is None, status
        assert target.ok("logs", "--id", f"br.{index}", "--stderr") == f"tej: {reason}\n"


def test_list_of_one_array_and_its_tasks(target: Target) -> None:
    script = '#!/bin/sh\necho "step $TEJ_ARRAY_INDEX" > "$TEJ_PROGRESS"\nexit $TEJ_ARRAY_INDEX\n'
    target.submit(target.make_job("listed", script), "--array", "0-2", "--id", "one", "--wait")
    target.submit(target.make_job("other"), "--id", "other", "--wait")
    rows = json_list(target, "--id", "one", "--tasks")
    assert [row["id"] for row in rows] == ["one", "one.0", "one.1", "one.2"], rows
    # An ended task keeps its last progress in its row, as an ended job does: read when it
    # ended, not by each listing (its progress file gone, the row still has it).
    target.server_path("jobs", "one", "jobs", "1", "progress").unlink()
    rows = json_list(target, "--id", "one", "--tasks")
    assert [row["progress"] for row in rows] == [None, "step 0", "step 1", "step 2"], rows
    assert target.status("one.1")["progress"] is None  # status reads the file itself
    assert rows[0]["array"]["counts"] == {"finished": 3}
    failed = json_list(target, "--id", "one", "--tasks", "--state", "running")
    assert [row["id"] for row in failed] == ["one"], failed  # its row whatever its state
    assert [row["id"] for row in json_list(target, "--id", "other")] == ["other"]
    assert [row["exit_code"] for row in json_list(target, "--id", "one.2")] == [2]
    text = target.ok("list", "--id", "one", "--tasks")
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["one", "one.0", "one.1", "one.2"]
    assert_one_line_error(target.cli("list", "--id", "nothing"), 3, prefix="No job")


def test_sync_delete_checks_every_task_folder_before_writing_any(target: Target) -> None:
    job = target.make_job("quick", "#!/bin/sh\necho r > result.txt\n")
    array_id = target.submit(job, "--array", "0-2", "--id", "qa")
    target.wait_for(array_id)
    into = target.client_dir / "mirror"
    (into / "qa.2").mkdir(parents=True)
    (into / "qa.2" / "mine.txt").write_text("mine\n")
    done = target.cli("sync", "--id", array_id, "--to", str(into), "--delete")
    assert "qa.2 holds other things" in assert_one_line_error(done, 1)
    assert sorted(os.listdir(into)) == ["qa.2"]  # qa.0 and qa.1 were not synced first
    assert os.listdir(into / "qa.2") == ["mine.txt"]


def test_an_array_spec_that_is_not_text_is_refused_by_the_api(target: Target) -> None:
    job = target.make_job("api-spec")
    with target.api() as remote:
        for spec in (5, [1, 2]):
            with pytest.raises(InvalidInput, match="is not text: use a range such as"):
                remote.submit(str(job), array=spec)
        with pytest.raises(InvalidInput, match="is empty"):
            remote.submit(str(job), array=" ")
    assert target.cli("list", "--json").stdout.strip() == "[]"
