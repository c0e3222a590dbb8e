"""Arrays and parameter sweeps (--array, --params) on the default runner, over `local` and
the real sshd, through the CLI and the API: one upload, one supervisor, a folder per task."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import Target, assert_one_line_error, wait_until

from tej.api import ArrayStatus, JobState

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
    params.write_text("X,Y\n1,a\n2,b\n3,c\n4,d\n")
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
