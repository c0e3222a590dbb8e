"""`tej resubmit`: a new job from the files an existing one was uploaded with, over `local`
and the real sshd; nothing is uploaded, the old job is left as it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import Target, assert_one_line_error

pytestmark = pytest.mark.timeout(120)

SCRIPT = """#!/bin/sh
echo "X=$X Y=$Y args=$*"
cat data/input
echo written > output
"""


def make_job(target: Target, name: str = "rerun", script: str = SCRIPT) -> Path:
    """A job directory: start.sh, data/input, other.sh, and tej.json with env and args."""
    root = target.src_dir / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "input").write_text("the input\n")
    (root / "start.sh").write_text(script)
    (root / "start.sh").chmod(0o755)
    (root / "other.sh").write_text("#!/bin/sh\necho other\n")
    (root / "other.sh").chmod(0o755)
    (root / "tej.json").write_text(json.dumps({"env": {"X": "1", "Y": "y"}, "args": ["a"]}))
    return root


def job_ids(target: Target) -> set[str]:
    """The jobs in the queue, from its folder."""
    return set(os.listdir(target.server_path("jobs")))


def test_resubmit_runs_the_uploaded_files_again_with_overrides(target: Target) -> None:
    directory = make_job(target)
    old = target.submit(directory, "--id", "first", "--wait")
    (directory / "data" / "input").write_text("changed locally: not sent\n")
    old_record = target.record(old)
    done = target.cli("resubmit", "--id", old, "--env", "X=2", "--wait", check=0)
    lines = done.stdout.splitlines()
    assert lines[0] == "Job submitted as:" and re.fullmatch(r"first_\d{6}", lines[1]), lines
    new = lines[1]
    assert target.ok("logs", "--id", new) == "X=2 Y=y args=a\nthe input\n"
    # The new job's tree is the upload's, not what the old job left (its output).
    assert not (target.work(new) / "output").exists() or target.status(new)["exit_code"] == 0
    metadata = target.status(new)["metadata"]
    assert metadata["env"] == {"X": "2", "Y": "y"} and metadata["args"] == ["a"]
    assert target.record(old) == old_record  # the old job is left as it was
    # --as picks the id; --script and --retries as submit's.
    target.cli(
        "resubmit", "--id", old, "--as", "again", "--script", "other.sh", "--retries", "2", check=0
    )
    target.wait_for("again")
    assert target.ok("logs", "--id", "again") == "other\n"
    assert target.status("again")["metadata"]["retries"]["max"] == 2
    # A resubmitted job can be resubmitted in turn.
    target.cli("resubmit", "--id", "again", "--as", "third", "--wait", check=0)
    assert target.ok("logs", "--id", "third") == "other\n"
    taken = target.cli("resubmit", "--id", old, "--as", "again")
    assert "already exists" in assert_one_line_error(taken)


def test_resubmit_through_the_api(target: Target) -> None:
    directory = make_job(target, "api")
    with target.api() as remote:
        old = remote.submit(str(directory), job_id="api-old")
        remote.wait(old, timeout=30)
        new = remote.resubmit(old, new_id="api-new", env={"Y": "z"}, args=["b"])
        assert remote.wait(new, timeout=30).exit_code == 0
        assert b"".join(remote.logs(new)) == b"X=1 Y=z args=b\nthe input\n"


def test_resubmit_of_a_job_that_wrote_to_its_input_is_refused(target: Target) -> None:
    script = "#!/bin/sh\necho overwritten > data/input\n"
    old = target.submit(make_job(target, "writes", script), "--id", "writes", "--wait")
    before = job_ids(target)
    done = target.cli("resubmit", "--id", old)
    message = assert_one_line_error(done)
    assert "no longer holds the uploaded content of data/input" in message
    assert job_ids(target) == before
    assert os.listdir(target.server_path("staging")) == []


def test_resubmit_of_a_job_that_is_gone_or_from_an_older_tej(target: Target) -> None:
    done = target.cli("resubmit", "--id", "nosuchjob")
    assert assert_one_line_error(done, 3, prefix="") == "No job 'nosuchjob'"
    old = target.submit(make_job(target, "older"), "--id", "older", "--wait")
    (target.job_dir(old) / "manifest").unlink()  # as a job submitted before resubmit existed
    before = job_ids(target)
    message = assert_one_line_error(target.cli("resubmit", "--id", old))
    assert "has no record of the files it was uploaded with" in message
    assert job_ids(target) == before
    bad = target.cli("resubmit", "--id", old, "--retries", "500")
    assert bad.returncode == 2 and "'--retries': 500 is not in the range" in bad.stderr


def test_a_resubmit_whose_content_the_store_lost_before_its_start_ends_lost(
    tmp_path: Path,
) -> None:
    # A resubmit (default runner) leaves its files to its supervisor: a content the store
    # lost between the request and the supervisor's start ends the job lost, saying which.
    import subprocess
    import sys

    from tej.api import RemoteQueue

    root = tmp_path / "job"
    (root / "data").mkdir(parents=True)
    (root / "data" / "input").write_text("the input\n")
    (root / "start.sh").write_text(SCRIPT)
    (root / "start.sh").chmod(0o755)
    queue = tmp_path / "queue"
    with RemoteQueue("local", queue=str(queue)) as remote:
        remote.submit(str(root), job_id="first")
        remote.wait("first", timeout=60)
        second = remote.resubmit("first", new_id="second")
        assert remote.wait(second, timeout=60).state.value == "finished"
    # A third job as a resubmit leaves it, before its supervisor starts: then the store
    # loses a content, and the supervisor is started.
    third = queue / "jobs" / "third"
    (third / "work").mkdir(parents=True)
    for name in ("job.json", "manifest"):
        (third / name).write_bytes((queue / "jobs" / "second" / name).read_bytes())
    record = {"id": "third", "state": "starting", "submitted_at": "2026-12-04T00:00:00Z"}
    (third / "status.json").write_text(json.dumps(record))
    (third / "layout-pending").write_text("0123456789abcdef")
    (third / "blobs").write_text("")
    for blob in (queue / "store").glob("??/*"):
        if blob.stat().st_size == len("the input\n"):
            blob.unlink()
    argv = [
        sys.executable,
        "-c",
        "import sys, tej.remote_agent as a; sys.exit(a.main(sys.argv[1:]))",
    ]
    subprocess.run([*argv, "supervise", str(third)], check=True, timeout=60)
    ended = json.loads((third / "status.json").read_text())
    assert ended["state"] == "lost", ended
    assert ended["reason"].startswith(
        "its files could not be laid out: The queue's store no "
        "longer holds the uploaded content of data/input"
    ), ended
    assert not (third / "stdout").exists()  # the script never ran
