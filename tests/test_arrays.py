"""Arrays and parameter sweeps (--array, --params) on the default runner, over `local` and
the real sshd, through the CLI and the API: one upload, one supervisor, a folder per task."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import Target, assert_one_line_error, wait_until

from tej.api import ArrayStatus, JobState
from tej.server.runners.line import settle_places

pytestmark = pytest.mark.timeout(180)

# Each task notes when it started and ended (for %N), writes to its input (which no
# other task may see), and exits with its index if the index is 3.
SCRIPT = """#!/bin/sh
start=$(date +%s.%N)
cat data/input
echo "task $TEJ_ARRAY_INDEX" >> data/input
echo "id=$TEJ_JOB_ID array=$TEJ_ARRAY_ID index=$TEJ_ARRAY_INDEX size=$TEJ_ARRAY_SIZE x=$TEJ_PARAM_X"
sleep 0.4
echo "$start $(date +%s.%N)" > times
[ "$TEJ_ARRAY_INDEX" = 3 ] && exit 3
exit 0
"""


def make_array_job(target: Target, name: str = "sweep", script: str = SCRIPT) -> Path:
    """A job directory: start.sh and data/input."""
    root = target.src_dir / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "input").write_text("the input\n")
    (root / "start.sh").write_text(script)
    (root / "start.sh").chmod(0o755)
    return root


def job_ids(target: Target) -> set[str]:
    """The jobs in the queue, from its folder."""
    try:
        return set(os.listdir(target.server_path("jobs")))
    except FileNotFoundError:
        return set()


def task_path(target: Target, array_id: str, index: int, *parts: str) -> Path:
    """A path in a task's folder on the server."""
    return target.server_path("jobs", array_id, "jobs", str(index), *parts)


def test_array_runs_every_task_at_most_n_at_once(target: Target) -> None:
    job = make_array_job(target)
    array = target.submit(job, "--array", "0-5%2", "--id", "sweep")
    assert array == "sweep"
    done = target.cli("wait", "--id", array, "--exit-code", check=3)
    assert re.match(r"Array is finished: 6 finished \(\d:\d\d:\d\d\) with exit code 3", done.stdout)
    status = target.status(array)
    assert status["state"] == "finished" and status["exit_code"] == 3
    assert status["array"]["counts"] == {"finished": 6}
    assert status["array"]["size"] == 6 and status["array"]["max_parallel"] == 2
    tasks = status["array"]["tasks"]
    assert [task["id"] for task in tasks] == [f"sweep.{index}" for index in range(6)]
    assert [task["exit_code"] for task in tasks] == [0, 0, 0, 3, 0, 0]
    # Each task saw the uploaded input, not another task's write to it.
    for index in range(6):
        out = target.ok("logs", "--id", f"sweep.{index}")
        assert out.startswith("the input\n"), out
        assert f"id=sweep.{index} array=sweep index={index} size=6 x=" in out
        assert (task_path(target, array, index, "work", "data", "input")).read_text() == (
            f"the input\ntask {index}\n"
        )
    assert target.work(array, "data", "input").read_text() == "the input\n"  # the template
    # %N held, from the tasks' own times: never more than 2 at once.
    spans = []
    for index in range(6):
        start, end = task_path(target, array, index, "work", "times").read_text().split()
        spans.append((float(start), float(end)))
    for start, _ in spans:
        assert sum(1 for other, end in spans if other <= start < end) <= 2, spans
    # A task is a job: its own status; an index not in the array is no job.
    assert target.status("sweep.3")["exit_code"] == 3
    missing = target.cli("status", "--id", "sweep.6")
    assert_one_line_error(missing, 3, prefix="No job")


def test_params_through_the_api(target: Target) -> None:
    job = make_array_job(target, "params")
    rows = [{"X": "a"}, {"X": "b b"}, {"X": "c"}]
    remote = target.remote()
    array = remote.submit(str(job), params=rows, max_parallel=3)
    final = remote.wait(array, timeout=60)
    assert isinstance(final, ArrayStatus)
    assert final.state is JobState.FINISHED and final.exit_code == 0
    status = remote.status(array, tasks=True)
    assert isinstance(status, ArrayStatus)
    assert status.size == 3 and status.counts == {"finished": 3}
    assert [task.state for task in status.tasks] == [JobState.FINISHED] * 3
    out = b"".join(remote.logs(f"{array}.1")).decode()
    assert f"id={array}.1 array={array} index=1 size=3 x=b b" in out
    assert (target.job_dir(array) / "params.jsonl").read_text().splitlines()[2] == '{"X":"c"}'


def test_params_file_csv_and_resubmit_failed(target: Target) -> None:
    job = make_array_job(target, "csv")
    params = target.src_dir / "params.csv"
    params.write_bytes(b"\xef\xbb\xbfX,Y\r\n1,a\r\n2,b\r\n3,c\r\n4,d\r\n")  # a spreadsheet's
    array = target.submit(job, "--params", str(params), "--id", "csv", "--wait")
    assert target.status(array)["exit_code"] == 3
    again = target.cli(
        "resubmit", "--id", array, "--failed", "--as", "csv2", "--wait", "--exit-code"
    )
    assert again.returncode == 3, again
    status = target.status("csv2")
    assert [task["id"] for task in status["array"]["tasks"]] == ["csv2.3"]
    out = target.ok("logs", "--id", "csv2.3")
    assert "index=3 size=1 x=4" in out  # its index and its row kept
    # One task alone: a new array of that task.
    target.cli("resubmit", "--id", f"{array}.1", "--as", "csv3", "--wait", check=0)
    assert [task["id"] for task in target.status("csv3")["array"]["tasks"]] == ["csv3.1"]
    assert "index=1 size=1 x=2" in target.ok("logs", "--id", "csv3.1")
    refused = target.cli("resubmit", "--id", f"{array}.1", "--failed")
    assert "is one task" in assert_one_line_error(refused)


def test_kill_a_task_then_the_array_then_delete(target: Target) -> None:
    job = make_array_job(target, "long", "#!/bin/sh\necho started\nsleep 60\n")
    array = target.submit(job, "--array", "0-9%2", "--id", "long")
    for index in (0, 1):
        out = task_path(target, array, index, "stdout")
        wait_until(lambda out=out: out.exists() and "started" in out.read_text(), 30, "a start")
    killed = target.cli("kill", "--id", "long.0", check=0)
    assert "killed" in killed.stdout.lower(), killed.stdout
    assert target.status("long.0")["state"] == "killed"
    cancelled = target.cli("kill", "--id", "long.9", check=0)  # not started: never will be
    assert target.status("long.9")["state"] == "killed", cancelled.stdout
    target.cli("kill", "--id", array, check=0)
    status = wait_until(
        lambda: (found := target.status(array))["state"] in ("killed", "finished") and found
    )
    assert status["state"] == "killed"
    counts = status["array"]["counts"]
    assert "running" not in counts and "queued" not in counts, counts
    assert counts.get("cancelled", 0) >= 1 and sum(counts.values()) == 10, counts
    assert target.status("long.8")["state"] == "cancelled"
    target.cli("delete", "--id", array, check=0)
    assert array not in job_ids(target)
    assert_one_line_error(target.cli("status", "--id", "long.1"), 3, prefix="No job")


def test_download_puts_each_task_in_its_folder(target: Target) -> None:
    job = make_array_job(target, "dl", '#!/bin/sh\necho "out $TEJ_ARRAY_INDEX" > result.txt\n')
    array = target.submit(job, "--array", "1,3", "--id", "dl", "--wait")
    into = target.client_dir / "results"
    target.cli("download", "--id", array, "result.txt:" + str(into), check=0)
    found = sorted(str(path.relative_to(into)) for path in into.rglob("*") if path.is_file())
    assert found == ["dl.1/result.txt", "dl.3/result.txt"]
    assert (into / "dl.3" / "result.txt").read_text() == "out 3\n"
    target.cli("download", "--id", "dl.1", "result.txt:" + str(target.client_dir / "one"), check=0)
    assert (target.client_dir / "one").read_text() == "out 1\n"


BAD_INPUTS = [
    (["--array", "5-1"], "ends before it starts"),
    (["--array", "0-x"], "Invalid array spec"),
    (["--array", " "], "empty"),
    (["--array", "0-100000"], "100000"),
    (["--array", "0-9%0"], "%N"),
    (["--array", "0-3%2", "--max-parallel", "3"], "not both"),
    (["--id", "foo.3"], "names an array's task"),
    (["--max-parallel", "2"], "is for an array"),
    (["--params", "{empty}"], "empty"),
    (["--params", "{ragged}"], "2 values for 1 columns"),
    (["--params", "{duplicate}"], "given twice"),
    (["--params", "{badname}"], "invalid column name"),
    (["--params", "{nul}"], "NUL"),
    (["--params", "{latin1}"], "not UTF-8"),
    (["--params", "{toomany}"], "more than 100000 rows"),
    (["--params", "{unterminated}"], "not valid CSV: unexpected end of data"),
    (["--params", "{jsonarray}"], "one object per line, not an array"),
    (["--params", "{ragged}", "--array", "0-1"], "can't be combined"),
]
PARAMS_FILES = {
    "empty": b"",
    "ragged": b"X\n1\n2,3\n",
    "duplicate": b"X,X\n1,2\n",
    "badname": b"X-Y\n1\n",
    "nul": b"X\n1\x00\n",
    "latin1": b"X\n\xe9\n",
    "toomany": b"X\n" + b"1\n" * 100001,
    "unterminated": b'A\n"unterminated\n',
    "jsonarray": b"[1, 2]\n",
}


@pytest.mark.parametrize(("args", "expected"), BAD_INPUTS)
def test_bad_array_input_is_refused_before_anything_is_sent(
    target: Target, args: list[str], expected: str
) -> None:
    job = make_array_job(target, "bad")
    files = {}
    for name, data in PARAMS_FILES.items():
        files[name] = target.src_dir / f"{name}.params"
        files[name].write_bytes(data)
    args = [arg.format(**{name: str(path) for name, path in files.items()}) for arg in args]
    before = job_ids(target)
    message = assert_one_line_error(target.cli("submit", *args, str(job)))
    assert expected in message, message
    assert job_ids(target) == before


def test_json_array_in_tej_json(target: Target) -> None:
    job = make_array_job(target, "fromjson", "#!/bin/sh\necho $TEJ_ARRAY_INDEX\n")
    (job / "tej.json").write_text(json.dumps({"array": "0-999:500"}))
    array = target.submit(job, "--wait")
    status = target.status(array)
    assert [task["id"] for task in status["array"]["tasks"]] == [f"{array}.0", f"{array}.500"]
    assert target.ok("logs", "--id", f"{array}.500") == "500\n"


# the queue runner: every task is a queued unit under max_running and the array's %N

#: A task that notes its start and end times, and exits with $CODE if its index is 1.
TIMED = """#!/bin/sh
start=$(date +%s.%N)
sleep 0.3
echo "$start $(date +%s.%N)" > times
[ "$TEJ_ARRAY_INDEX" = 1 ] && exit ${CODE:-0}
exit 0
"""


def setup_queue_runner(target: Target, max_running: int) -> None:
    """Make the target's queue a queue-runner queue running at most max_running jobs."""
    target.cli("setup", "--plugin", "queue", "--option", f"max_running={max_running}", check=0)


def spans_of(folders: list[Path]) -> list[tuple[float, float]]:
    """(start, end) of each task or job, from the `times` file its script wrote."""
    spans = []
    for folder in folders:
        start, end = (folder / "work" / "times").read_text().split()
        spans.append((float(start), float(end)))
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of spans running at one moment."""
    return max(sum(1 for other, end in spans if other <= start < end) for start, _ in spans)


def test_queue_runner_holds_max_running_and_the_arrays_n(target: Target) -> None:
    setup_queue_runner(target, 3)
    job = make_array_job(target, "qsweep", TIMED)
    array = target.submit(job, "--array", "0-5%2", "--id", "qa", "--env", "CODE=5")
    other = target.submit(make_array_job(target, "qother", TIMED), "--array", "0-3", "--id", "qb")
    done = target.cli("wait", "--id", array, "--exit-code", check=5)
    assert "Array is finished: 6 finished" in done.stdout, done.stdout
    target.cli("wait", "--id", other, "--exit-code", check=0)
    status = target.status(array)
    assert status["state"] == "finished" and status["exit_code"] == 5
    assert status["array"]["counts"] == {"finished": 6}
    assert [task["exit_code"] for task in status["array"]["tasks"]] == [0, 5, 0, 0, 0, 0]
    mine = spans_of([task_path(target, array, index) for index in range(6)])
    theirs = spans_of([task_path(target, other, index) for index in range(4)])
    assert most_at_once(mine) <= 2, mine  # the array's %2
    assert most_at_once(mine + theirs) <= 3, mine + theirs  # the queue's max_running
    assert most_at_once(mine + theirs) == 3  # qb's tasks used the third place meanwhile
    assert target.status(other)["array"]["counts"] == {"finished": 4}


def test_queue_runner_priority_and_after_naming_an_array(target: Target) -> None:
    setup_queue_runner(target, 1)
    blocker = make_array_job(
        target, "block", "#!/bin/sh\nwhile [ ! -e release ]; do sleep 0.05; done\n"
    )
    first = target.submit(blocker, "--id", "first")
    low = target.submit(make_array_job(target, "low", TIMED), "--array", "0-1", "--id", "low")
    high = target.submit(
        make_array_job(target, "high", TIMED), "--array", "0-2", "--id", "high", "--priority", "5"
    )
    after = target.submit(make_array_job(target, "after", MARK), "--id", "after", "--after", high)
    failing = target.submit(
        make_array_job(target, "failing", TIMED),
        "--array",
        "0-2",
        "--id",
        "failing",
        "--env",
        "CODE=4",
    )
    doomed = target.submit(make_array_job(target, "dep", MARK), "--id", "dep", "--after", failing)
    status = target.status(high)
    assert status["state"] == "queued" and status["array"]["counts"] == {"queued": 3}
    assert status["position"] == [1, 5]  # an array is one place in the line, by priority
    (target.job_dir(first) / "work" / "release").write_text("")
    target.cli("wait", "--id", doomed, check=0)
    high_spans = spans_of([task_path(target, high, index) for index in range(3)])
    low_spans = spans_of([task_path(target, low, index) for index in range(2)])
    assert max(end for _, end in high_spans) <= min(start for start, _ in low_spans)
    assert most_at_once(high_spans + low_spans) == 1
    # after names an array: it ran once every task finished with 0...
    assert target.status(after)["state"] == "finished"
    assert (target.work(after, "ran")).exists()
    # ...and a failed task cancels the job after its array.
    assert target.status(failing)["exit_code"] == 4
    found = target.status(doomed)
    assert found["state"] == "cancelled" and "failing failed" in found["reason"], found
    assert not target.work(doomed, "ran").exists()


MARK = "#!/bin/sh\ntouch ran\n"


def test_a_running_array_keeps_its_place_in_the_line(target: Target) -> None:
    """An array whose later tasks wait holds its place: its status shows it, and the jobs
    behind it count from it."""
    setup_queue_runner(target, 1)
    script = "#!/bin/sh\nwhile [ ! -e ../../../work/release ]; do sleep 0.05; done\n"
    array = target.submit(make_array_job(target, "held", script), "--array", "0-1", "--id", "a")
    behind = target.submit(make_array_job(target, "behind", MARK), "--id", "behind")
    wait_until(lambda: target.status(array)["array"]["counts"] == {"running": 1, "queued": 1})
    status = target.status(array)
    assert status["state"] == "running" and status["position"] == [1, 2], status
    assert target.status(behind)["position"] == [2, 2]
    text = target.status_text(array)
    assert text.startswith("Array is running: 1 running, 1 queued (") and text.endswith(
        ", position 1 of 2\n"
    ), text
    listed = {job["id"]: job for job in json.loads(target.ok("list", "--json"))}
    assert listed[array]["position"] == [1, 2] and listed[behind]["position"] == [2, 2]
    (target.job_dir(array) / "work" / "release").write_text("")
    target.cli("wait", "--id", behind, check=0)
    assert target.status(array)["position"] is None


def listed(job_id: str, place: list[int] | None, counts: dict[str, int] | None = None) -> Any:
    """A status as the agent lists it: its place in the line, an array's counts."""
    status: dict[str, Any] = {"id": job_id, "position": place}
    if counts is not None:
        status["array"] = {"counts": counts}
    return status


def test_an_array_that_just_left_the_line_gives_up_its_place() -> None:
    """The agent reads the line before an array's counts, without a lock: an array whose
    last task started in between comes with the place it had. It has left the line: it
    gets none, and the jobs behind it move up (the soak's places stay 1 to N)."""
    statuses = [
        listed("left", [1, 4], {"running": 2}),
        listed("array", [2, 4], {"running": 1, "queued": 1}),
        listed("ended", None, {"finished": 2}),
        listed("queued", [3, 4]),
        listed("last", [4, 4]),
    ]
    settle_places(statuses)
    places = [status["position"] for status in statuses]
    assert places == [None, [1, 3], None, [2, 3], [3, 3]]
    alone = [listed("left", [2, 5], {"starting": 1, "finished": 1})]  # a status of one job
    settle_places(alone)
    assert alone[0]["position"] is None
    held = [listed("array", [1, 2], {"running": 1, "queued": 1}), listed("queued", [2, 2])]
    settle_places(held)
    assert [status["position"] for status in held] == [[1, 2], [2, 2]]


def test_an_array_killed_before_any_task_ran_is_cancelled(target: Target) -> None:
    setup_queue_runner(target, 1)
    blocker = target.submit(make_array_job(target, "qblock", "#!/bin/sh\nsleep 60\n"))
    target.wait_for(blocker, ("running",))
    array = target.submit(make_array_job(target, "qwait", TIMED), "--array", "0-3", "--id", "qw")
    target.cli("kill", "--id", "qw.2", check=0)  # one task first: the array still never ran
    target.cli("kill", "--id", array, check=0)
    status = target.status(array)
    assert status["state"] == "cancelled", status
    assert status["exit_code"] is None and status["started_at"] is None, status
    done = target.cli("wait", "--id", array, "--exit-code", check=143)  # not a success
    assert "Array is cancelled" in done.stdout, done.stdout
    target.cli("kill", "--id", blocker, check=0)


def test_queue_runner_kill_a_task_and_the_array(target: Target) -> None:
    setup_queue_runner(target, 2)
    job = make_array_job(target, "qlong", "#!/bin/sh\necho started\nsleep 60\n")
    array = target.submit(job, "--array", "0-5", "--id", "ql")
    for index in (0, 1):
        out = task_path(target, array, index, "stdout")
        wait_until(lambda out=out: out.exists() and "started" in out.read_text(), 30, "a start")
    assert target.status(array)["array"]["counts"] == {"running": 2, "queued": 4}
    target.cli("kill", "--id", "ql.5", check=0)  # not started: cancelled, never starts
    target.cli("kill", "--id", "ql.0", check=0)  # its place goes to ql.2
    out = task_path(target, array, 2, "stdout")
    wait_until(lambda: out.exists() and "started" in out.read_text(), 30, "ql.2's start")
    assert target.status("ql.0")["state"] == "killed"
    target.cli("kill", "--id", array, check=0)
    status = wait_until(
        lambda: (found := target.status(array))["state"] not in ("running", "queued") and found
    )
    assert status["state"] == "killed", status
    counts = status["array"]["counts"]
    assert counts == {"killed": 4, "cancelled": 2}, counts  # 0, 1, 2, 5 killed; 3, 4 never ran
    assert target.status("ql.4")["state"] == "cancelled"
    target.cli("delete", "--id", array, check=0)
    assert array not in job_ids(target)


def test_an_array_whose_end_was_not_recorded_is_repaired_on_status(target: Target) -> None:
    setup_queue_runner(target, 2)
    job = make_array_job(target, "repair", "#!/bin/sh\nexit 0\n")
    array = target.submit(job, "--array", "0-2", "--id", "rep")
    target.cli("wait", "--id", array, "--exit-code", check=0)
    path = target.job_dir(array) / "status.json"
    record = json.loads(path.read_text())
    assert record["state"] == "finished" and record["kept_by_tasks"], record
    # As if the last task's writer died between its end and the array's.
    for key in ("ended_at", "exit_code"):
        record.pop(key)
    path.write_text(json.dumps(dict(record, state="running")))
    os.replace(
        target.server_path("index", "finished", array),
        target.server_path("index", "running", array),
    )
    status = target.status(array)
    assert status["state"] == "finished" and status["exit_code"] == 0, status
    assert json.loads(path.read_text())["state"] == "finished"
    assert os.path.exists(target.server_path("index", "finished", array))


def test_a_running_array_keeps_its_place_when_the_line_is_built_again(target: Target) -> None:
    setup_queue_runner(target, 1)
    release = target.server_path("release")
    script = '#!/bin/sh\nwhile [ ! -e "$REL" ]; do sleep 0.05; done\ntouch ran\n'
    job = make_array_job(target, "inline", script)
    array = target.submit(job, "--array", "0-2", "--id", "inl", "--env", f"REL={release}")
    later = target.submit(make_array_job(target, "later", MARK), "--id", "later")
    wait_until(lambda: task_path(target, array, 0).is_dir(), 30, "the first task's start")
    record = json.loads((target.job_dir(array) / "status.json").read_text())
    assert record["state"] == "running" and record["in_line"] and record["next_task"] == 1
    # The line is lost (as after a crash in the middle of a change): it is built again,
    # the running array keeping its place ahead of the job submitted after it.
    target.server_path("index", "line", "state.json").unlink()
    assert target.status(later)["position"] == [2, 2]
    release.write_text("")
    target.cli("wait", "--id", later, check=0)
    assert target.status(array)["array"]["counts"] == {"finished": 3}
    ends = [task_path(target, array, index, "work", "ran").stat().st_mtime for index in range(3)]
    assert max(ends) <= target.work(later, "ran").stat().st_mtime
