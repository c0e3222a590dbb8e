"""The queue's index: kept right through crashes (real SIGKILLs), rebuilt, upgraded from format 1.

A crash is made real: TEJ_TEST_CRASH_AT names a point of an update where the agent or a
supervisor SIGKILLs itself (tej/server/index.py, crash_point). The next command must
find the index right, or repair it (docs/queue-format.md, "The index").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import Target, index_problems, process_alive, read_record, wait_until

from tej.protocol import END_STATES
from tej.server import layout

pytestmark = pytest.mark.timeout(180)
ENDED = ("finished", "killed", "timed_out", "lost", "cancelled")


def setup_queue(target: Target, max_running: int = 1) -> None:
    """Make the target's queue run jobs in turn."""
    target.cli("setup", "--plugin", "queue", "--option", f"max_running={max_running}", check=0)


def crashing(target: Target, point: str, command: str, *args: str) -> None:
    """Run a command whose agent (and the supervisors it starts) die at point."""
    saved = target.client_env
    target.client_env = dict(saved, TEJ_TEST_CRASH_AT=point)
    try:
        target.cli(command, *args)
    finally:
        target.client_env = saved


def listed(target: Target, *args: str) -> dict[str, dict[str, Any]]:
    """`tej list --json`, by job id."""
    jobs = json.loads(target.cli("list", "--json", *args, check=0).stdout)
    return {job["id"]: job for job in jobs}


def assert_index_right(target: Target) -> None:
    """After a command: the index agrees with the job folders (once supervisors settle)."""
    listed(target)  # the next command repairs what a crash left
    wait_until(lambda: not index_problems(target.queue), 30, "the index to agree")
    jobs = listed(target)
    for job_id, job in jobs.items():  # records read after the list: they may have moved on
        record = read_record(target.job_dir(job_id))
        if job["state"] in ENDED:
            assert job["state"] == record["state"], (job, record)
        else:
            assert record["state"] not in ENDED or job["state"] != "queued", (job, record)
    positions = sorted(job["position"][0] for job in jobs.values() if job["state"] == "queued")
    assert positions == list(range(1, len(positions) + 1))


def test_a_submit_killed_after_its_rename_is_queued_by_the_next_command(target: Target) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    setup_queue(target)
    blocker = target.submit(target.make_job("blocker", "#!/bin/sh\nsleep 30\n"))
    crashing(target, "job-renamed", "submit", "--id", "orphan", str(target.make_job()))
    assert (target.job_dir("orphan") / "status.json").exists()
    assert_index_right(target)
    assert listed(target)["orphan"]["position"] == [1, 1]
    target.cli("kill", "--id", blocker, check=0)
    assert target.wait_for("orphan")["state"] == "finished"
    assert_index_right(target)


@pytest.mark.parametrize(
    "point",
    ["status-written:queued", "marker-moved:queued", "line-dirty", "status-written:starting"],
)
def test_an_agent_killed_while_it_queues_a_job_leaves_a_queue_that_works(
    target: Target, point: str
) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    setup_queue(target)
    first = target.submit(target.make_job("first", "#!/bin/sh\nsleep 1\n"))
    crashing(target, point, "submit", "--id", "second", str(target.make_job()))
    assert_index_right(target)
    target.submit(target.make_job("third"), "--id", "third")
    for job_id in (first, "second", "third"):
        assert target.wait_for(job_id)["state"] in ("finished", "lost")
    assert_index_right(target)


@pytest.mark.parametrize("point", ["status-written:killed", "line-dirty"])
def test_an_agent_killed_while_it_kills_a_queued_job(target: Target, point: str) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    setup_queue(target)
    blocker = target.submit(target.make_job("blocker", "#!/bin/sh\nsleep 30\n"))
    for name in ("a", "b", "c"):
        target.submit(target.make_job(name), "--id", name)
    crashing(target, point, "kill", "--id", "b")
    assert_index_right(target)
    jobs = listed(target)
    queued = [job_id for job_id, job in jobs.items() if job["state"] == "queued"]
    assert jobs["c"]["position"] == [len(queued), len(queued)]
    target.cli("kill", "--id", blocker, check=0)
    for name in ("a", "c"):
        assert target.wait_for(name)["state"] == "finished"
    assert_index_right(target)


def test_a_delete_killed_after_its_rename_leaves_no_marker(target: Target) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    job_id = target.submit(target.make_job())
    target.wait_for(job_id)
    crashing(target, "job-trashed", "delete", "--id", job_id)
    assert not target.job_dir(job_id).exists()
    assert_index_right(target)
    assert listed(target) == {}


def test_a_supervisor_killed_as_it_records_the_end_is_repaired_and_the_queue_moves_on(
    target: Target,
) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    setup_queue(target)
    saved = target.client_env
    target.client_env = dict(saved, TEJ_TEST_CRASH_AT="status-written:finished")
    try:
        first = target.submit(target.make_job("first", "#!/bin/sh\nsleep 1\n"))
    finally:
        target.client_env = saved
    second = target.submit(target.make_job("second"))
    assert target.wait_for(first)["state"] == "finished"
    # Its supervisor died before moving it in the index and before starting the next job:
    # the next command does both.
    assert_index_right(target)
    assert target.wait_for(second)["state"] == "finished"
    assert listed(target, "--state", "finished").keys() == {first, second}


def test_list_state_filters_and_prune(target: Target) -> None:
    setup_queue(target, max_running=2)
    ok = target.submit(target.make_job("ok"), "--id", "ok")
    failed = target.submit(target.make_job("failed", "#!/bin/sh\nexit 3\n"), "--id", "failed")
    busy = target.submit(target.make_job("busy", "#!/bin/sh\nsleep 30\n"), "--id", "busy")
    for job_id in (ok, failed):
        target.wait_for(job_id)
    target.wait_for(busy, ("running",))
    assert listed(target, "--state", "running").keys() == {busy}
    assert listed(target, "--state", "finished", "--state", "running").keys() == {ok, failed, busy}
    text = target.cli("prune", "--dry-run", check=0)
    assert text.stdout.split() == [failed, ok]
    assert listed(target).keys() == {ok, failed, busy}
    assert target.cli("prune", "--older-than", "1h", check=0).stdout == "Deleted 0 jobs\n"
    pruned = json.loads(target.cli("prune", "--json", check=0).stdout)
    assert pruned == {"ids": [failed, ok], "count": 2, "dry_run": False}
    assert listed(target).keys() == {busy}
    assert not target.job_dir(ok).exists()
    wrong = target.cli("prune", "--state", "running")
    assert wrong.returncode == 2 and "running" in wrong.stderr
    target.cli("kill", "--id", busy, check=0)
    assert_index_right(target)


def test_a_long_list_comes_in_batches(target: Target) -> None:
    """More rows than one reply carries (listing.BATCH_ROWS), made directly on the server."""
    job_id = target.submit(target.make_job(), "--id", "model")
    target.wait_for(job_id)
    count = 5100
    owner = (target.server.uid, target.server.gid) if target.server else None
    clone_finished_jobs(Path(target.queue), "model", count, owner)
    shutil.rmtree(Path(target.queue) / "index")  # rebuilt by the next command
    jobs = target.cli("list", check=0).stdout.splitlines()
    assert len(jobs) == count + 2 and jobs[0].split() == ["ID", "STATE", "ELAPSED", "EXIT"]
    assert jobs[1].split()[:2] == ["clone-00000", "finished"]
    with target.api() as remote:
        assert sum(1 for _ in remote.iter_list(["finished"])) == count + 1
        assert remote.list(["running"]) == []
    assert index_problems(target.queue) == []


def test_rows_an_older_tej_wrote_list_the_same_and_get_their_heads(target: Target) -> None:
    """A segment line starts with its submit time and its head (a plain list's columns);
    an older tej wrote none: such rows list the same, and a full listing rewrites them."""
    if target.kind != "local":
        pytest.skip("the segments are rewritten on the server: one destination is enough")
    scripts = {
        "ok": "#!/bin/sh\ntrue\n",
        "failed": "#!/bin/sh\nexit 3\n",
        "noted": '#!/bin/sh\necho "epoch 3/10, loss 0.41" > "$TEJ_PROGRESS"\n',
    }
    for name, script in scripts.items():
        target.wait_for(target.submit(target.make_job(name, script), "--id", name))
    plain, full = target.cli("list", check=0).stdout, listed(target)
    rows = Path(target.queue) / "index" / "rows"
    for segment in rows.iterdir():
        lines = segment.read_text().splitlines(keepends=True)
        segment.write_text(
            "".join(line.split(" ", 1)[0] + line[line.index("\t") :] for line in lines)
        )
    assert target.cli("list", check=0).stdout == plain
    assert "epoch 3/10, loss 0.41" in plain and listed(target) == full
    heads = [line.split("\t", 1)[0] for segment in rows.iterdir() for line in segment.open()]
    assert len(heads) == 3 and all(" [" in head for head in heads), heads
    assert target.cli("list", check=0).stdout == plain
    assert index_problems(target.queue) == []


def clone_finished_jobs(
    queue: Path, model: str, count: int, owner: tuple[int, int] | None = None
) -> None:
    """Copies of a finished job, as tej lays them out (ids clone-00000...), older than it."""
    source = queue / "jobs" / model
    record = json.loads((source / "status.json").read_text())
    for number in range(count):
        job_id = f"clone-{number:05d}"
        target = queue / "jobs" / job_id
        target.mkdir(mode=0o700)
        (target / "job.json").write_text((source / "job.json").read_text())
        copy = dict(record, id=job_id, submitted_at=f"2000-01-01T00:00:00.{number:06d}Z")
        (target / "status.json").write_text(json.dumps(copy))
        for path in (target, target / "job.json", target / "status.json"):
            if owner is not None:
                os.chown(path, *owner)


def test_a_format_1_queue_is_upgraded_in_place(target: Target) -> None:
    """A queue as format 1 wrote it (no index, no tickets, a list cache) works as it was."""
    if target.kind != "local":
        pytest.skip("the upgrade happens on the server: one destination is enough")
    setup_queue(target)
    done = target.submit(target.make_job("done"), "--id", "done")
    target.wait_for(done)
    blocker = target.submit(target.make_job("blocker", "#!/bin/sh\nsleep 30\n"), "--id", "blocker")
    target.wait_for(blocker, ("running",))
    for name in ("q1", "q2"):
        target.submit(target.make_job(name), "--id", name)
    make_format_1(Path(target.queue))
    status = json.loads(target.cli("status", "--json", "--id", "q2", check=0).stdout)
    assert status["state"] == "queued" and status["position"] == [2, 2]
    config = json.loads((Path(target.queue) / layout.QUEUE_CONFIG).read_text())
    assert config["format"] == 2 and "upgraded_at" in config
    assert not (Path(target.queue) / layout.LIST_CACHE).exists()
    assert_index_right(target)
    assert listed(target).keys() == {"done", "blocker", "q1", "q2"}
    target.cli("kill", "--id", "blocker", check=0)
    for name in ("q1", "q2"):
        assert target.wait_for(name)["state"] == "finished"
    assert_index_right(target)


def make_format_1(queue: Path) -> None:
    """Turn a queue into what format 1 wrote: no index; records without tej 2's fields.

    Waits first for the supervisors of ended jobs to exit: one still filing its job's
    end in the index would write into the folder being removed."""
    for status in (queue / "jobs").glob("*/status.json"):
        record = json.loads(status.read_text())
        pid = (record.get("supervisor") or {}).get("pid")
        if record["state"] in END_STATES and pid:
            wait_until(lambda pid=pid: not process_alive(pid), message=f"supervisor {pid} to exit")
    shutil.rmtree(queue / "index")
    for status in (queue / "jobs").glob("*/status.json"):
        record = json.loads(status.read_text())
        for field in ("ticket", "rev"):
            record.pop(field, None)
        status.write_text(json.dumps(record))
    config = json.loads((queue / layout.QUEUE_CONFIG).read_text())
    (queue / layout.QUEUE_CONFIG).write_text(json.dumps(dict(config, format=1)))
    (queue / layout.LIST_CACHE).write_text('{"format": 2, "fields": [], "jobs": {}}')


def test_an_upgrade_killed_half_way_is_done_again(target: Target) -> None:
    if target.kind != "local":
        pytest.skip("the crash is set through the local agent's environment")
    for name in ("a", "b", "c", "d"):
        target.wait_for(target.submit(target.make_job(name), "--id", name))
    make_format_1(Path(target.queue))
    crashing(target, "rebuilding", "list")
    assert not (Path(target.queue) / "index" / "complete").exists()
    assert listed(target).keys() == {"a", "b", "c", "d"}
    assert_index_right(target)
