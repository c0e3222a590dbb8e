"""End to end: every `tej` command as a real subprocess, over `local` and over SSH."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import (
    ELAPSED,
    ISO_UTC,
    USAGE,
    Target,
    assert_one_line_error,
    one_line_answer,
    process_alive,
    read_pid,
    wait_until,
)

SLEEPER = "#!/bin/sh\nsleep 30\n"
EARLY_WRITER = "#!/bin/sh\necho early > early.txt\nsleep 30\n"
GRANDPARENT = "#!/bin/sh\nsleep 300 &\necho $! > child.pid\nwait\n"
# A child in a session (and process group) of its own, as daemons make.
ESCAPER = "#!/bin/sh\nsetsid sleep 300 &\necho $! > child.pid\nwait\n"


def login_user(target: Target) -> str:
    """The user tej logs in as on the target's server (over ssh, not the local one)."""
    return str(target.server.user) if target.kind == "ssh" else getpass.getuser()


def running_job(target: Target, script: str = SLEEPER) -> str:
    """Submit a job that keeps running, once it runs (the fixture kills it at the end)."""
    job_id = target.submit(target.make_job("sleeper", script))
    target.wait_for(job_id, ("running",))  # submit answers while it is starting
    return job_id


def finished_job(target: Target, script: str = "#!/bin/sh\nexit 3\n") -> str:
    """Submit a job and wait until it has finished."""
    job_id = target.submit(target.make_job("quick", script))
    target.wait_for(job_id)
    return job_id


def listing(path: Path) -> list[str]:
    """The names in a local folder, sorted."""
    return sorted(os.listdir(path))


# -- submit -------------------------------------------------------------------


def test_submit_prints_the_default_id_on_its_own_last_line(target: Target) -> None:
    job = target.make_job("myjob", "#!/bin/sh\necho hello\n")
    done = target.cli("submit", str(job), check=0)
    lines = done.stdout.splitlines()
    assert lines[0] == "Job submitted as:"
    user = re.escape(login_user(target))
    assert re.fullmatch(rf"myjob_{user}_\d{{6}}", lines[-1]), done.stdout
    assert len(lines) == 2
    assert target.job_dir(lines[-1]).is_dir()
    assert (target.work(lines[-1], "start.sh")).read_text() == "#!/bin/sh\necho hello\n"


@pytest.mark.parametrize("target", ["ssh"], indirect=True)
def test_default_id_names_the_login_user_given_in_the_destination(target: Target) -> None:
    """The seed's `tej submit user@server myjobdir`: myjobdir_user_NNNNNN, user the login one."""
    job = target.make_job("myjobdir")
    done = target.cli("submit", str(job), destination=target.server.url, check=0)
    job_id = done.stdout.splitlines()[-1]
    assert re.fullmatch(rf"myjobdir_{re.escape(target.server.user)}_\d{{6}}", job_id), job_id
    if target.server.user != getpass.getuser():  # the tests run as root: the login differs
        assert f"_{getpass.getuser()}_" not in job_id


def test_submit_default_id_from_an_odd_directory_name(target: Target) -> None:
    job = target.make_job("my job!")
    job_id = target.submit(Path(str(job) + "/"))
    assert re.fullmatch(rf"my_job__{re.escape(login_user(target))}_\d{{6}}", job_id), job_id
    assert target.job_dir(job_id).is_dir()


def test_submit_default_id_from_a_long_directory_name(target: Target) -> None:
    job_id = target.submit(target.make_job("a" * 150))
    assert len(job_id) <= 128
    assert re.fullmatch(rf"a+_{re.escape(login_user(target))}_\d{{6}}", job_id), job_id


def test_submit_with_explicit_id(target: Target) -> None:
    script = '#!/bin/sh\necho "$TEJ_JOB_ID $TEJ_JOB_DIR $(pwd)" > env.txt\ncat > stdin.txt\n'
    job_id = target.submit(target.make_job("envjob", script), "--id", "example_job")
    assert job_id == "example_job"
    assert target.wait_for("example_job")["exit_code"] == 0
    work = os.path.realpath(target.work(job_id))
    env = target.work(job_id, "env.txt").read_text().split()
    assert [env[0], os.path.realpath(env[1]), os.path.realpath(env[2])] == [job_id, work, work]
    assert target.work(job_id, "stdin.txt").read_text() == ""


def test_submit_accepts_an_id_of_128_characters(target: Target) -> None:
    long_id = "x" * 128
    assert target.submit(target.make_job(), "--id", long_id) == long_id


def test_submit_with_script_in_a_subfolder(target: Target) -> None:
    job = target.make_job(
        "scripted",
        script="#!/bin/sh\necho wrong > ran.txt\n",
        files={"sub/run.sh": '#!/bin/sh\necho "$0 in $(pwd)" > ran.txt\nexit 4\n'},
    )
    (job / "sub" / "run.sh").chmod(0o755)
    job_id = target.submit(job, "--script", "sub/run.sh")
    status = target.wait_for(job_id)
    assert (status["state"], status["exit_code"]) == ("finished", 4)
    ran = target.work(job_id, "ran.txt").read_text()
    assert ran.startswith(str(target.work(job_id, "sub", "run.sh"))), ran


def test_submit_runs_a_non_executable_script_through_its_shebang(target: Target) -> None:
    job = target.make_job("plain", "#!/bin/sh\necho ran > ran.txt\nexit 7\n", script_mode=0o644)
    job_id = target.submit(job)
    status = target.wait_for(job_id)
    assert (status["state"], status["exit_code"]) == ("finished", 7)
    assert target.work(job_id, "ran.txt").read_text() == "ran\n"


def test_submit_uploads_the_whole_tree(target: Target) -> None:
    job = target.make_job(
        "tree",
        files={
            "sub/deep/data.txt": "deep data\n",
            "sub/tool.sh": "#!/bin/sh\n",
            "secret.txt": "private\n",
            "empty-file": b"",
        },
    )
    (job / "sub" / "tool.sh").chmod(0o750)
    (job / "secret.txt").chmod(0o600)
    (job / "empty").mkdir()
    (job / "a" / "b").mkdir(parents=True)
    (job / "sub" / "deep").chmod(0o750)
    (job / "link").symlink_to("sub/deep/data.txt")
    (job / "dangling").symlink_to("nowhere/at/all")
    (job / "sub" / "up").symlink_to("../secret.txt")
    os.symlink(b"/etc/hostname", os.path.join(os.fsencode(job), b"absolute"))
    bytes_name = os.path.join(os.fsencode(job), b"caf\xe9")
    with open(bytes_name, "wb") as stream:
        stream.write(b"latin-1 name\n")

    job_id = target.submit(job)
    work = os.fsencode(target.work(job_id))

    def mode(*parts: bytes) -> int:
        return stat.S_IMODE(os.lstat(os.path.join(work, *parts)).st_mode)

    assert Path(os.fsdecode(work), "sub/deep/data.txt").read_text() == "deep data\n"
    assert mode(b"sub", b"tool.sh") == 0o750
    assert mode(b"secret.txt") == 0o600
    assert mode(b"start.sh") == 0o755
    assert mode(b"sub", b"deep") == 0o750
    assert os.path.getsize(os.path.join(work, b"empty-file")) == 0
    assert os.listdir(os.path.join(work, b"empty")) == []
    assert os.listdir(os.path.join(work, b"a", b"b")) == []
    assert os.readlink(os.path.join(work, b"link")) == b"sub/deep/data.txt"
    assert os.readlink(os.path.join(work, b"dangling")) == b"nowhere/at/all"
    assert os.readlink(os.path.join(work, b"sub", b"up")) == b"../secret.txt"
    assert os.readlink(os.path.join(work, b"absolute")) == b"/etc/hostname"
    with open(os.path.join(work, b"caf\xe9"), "rb") as stream:
        assert stream.read() == b"latin-1 name\n"
    expected = sorted(os.listdir(os.fsencode(job)))
    assert sorted(os.listdir(work)) == expected


def test_submit_with_an_id_already_used_fails(target: Target) -> None:
    first = target.make_job("first", "#!/bin/sh\necho first > who.txt\n")
    target.submit(first, "--id", "dup")
    target.wait_for("dup")
    second = target.make_job("second", "#!/bin/sh\necho second > who.txt\n")
    done = target.cli("submit", "--id", "dup", str(second))
    message = assert_one_line_error(done)
    assert "dup" in message
    assert done.stdout == ""
    assert target.work("dup", "who.txt").read_text() == "first\n"
    assert not target.work("dup", "second").exists()
    assert [name for name in os.listdir(target.server_path("staging"))] == []


def test_submit_refuses_an_invalid_id(target: Target) -> None:
    job = str(target.make_job())
    for bad_id in ["..", "a/b", "a b", "$(x)", "x" * 129, "", "-x\ny"]:
        done = target.cli("submit", "--id", bad_id, job)
        assert_one_line_error(done, 1)
        assert done.stdout == ""
    jobs = target.server_path("jobs")
    assert not jobs.exists() or listing(jobs) == []


def test_submit_a_missing_directory(target: Target) -> None:
    missing = target.src_dir / "nothing-here"
    message = assert_one_line_error(target.cli("submit", str(missing)), 1)
    assert "nothing-here" in message


def test_submit_a_file_instead_of_a_directory(target: Target) -> None:
    path = target.src_dir / "afile"
    path.write_text("#!/bin/sh\n")
    message = assert_one_line_error(target.cli("submit", str(path)), 1)
    assert "afile" in message
    assert "director" in message.lower()


def test_submit_without_start_sh(target: Target) -> None:
    job = target.make_job("noscript", script=None, files={"other.sh": "#!/bin/sh\n"})
    message = assert_one_line_error(target.cli("submit", str(job)), 1)
    assert "start.sh" in message
    missing = assert_one_line_error(target.cli("submit", "--script", "nope.sh", str(job)), 1)
    assert "nope.sh" in missing
    jobs = target.server_path("jobs")
    assert not jobs.exists() or listing(jobs) == []


def test_submit_refuses_what_it_cannot_send(target: Target) -> None:
    job = target.make_job("fifo")
    os.mkfifo(job / "pipe")
    message = assert_one_line_error(target.cli("submit", str(job)), 1)
    assert "pipe" in message
    jobs = target.server_path("jobs")
    assert not jobs.exists() or listing(jobs) == []


def test_submit_json(target: Target) -> None:
    done = target.cli("submit", "--json", "--id", "j1", str(target.make_job()), check=0)
    assert json.loads(done.stdout) == {"id": "j1"}
    default = json.loads(target.cli("submit", "--json", str(target.make_job("b")), check=0).stdout)
    assert list(default) == ["id"]
    assert target.job_dir(default["id"]).is_dir()


# -- status -------------------------------------------------------------------


def test_status_of_a_running_job(target: Target) -> None:
    job_id = running_job(target)
    done = target.cli("status", "--id", job_id, check=0)
    pattern = rf"Job is still running \({ELAPSED}\)(; memory \d+(\.\d)? [KMG]?B, CPU {ELAPSED})?\n"
    assert re.fullmatch(pattern, done.stdout), done.stdout


def test_status_of_a_finished_job(target: Target) -> None:
    job_id = finished_job(target, "#!/bin/sh\nsleep 1\nexit 3\n")
    done = target.cli("status", "--id", job_id, check=0)
    pattern = rf"Job is finished \(0:00:0[1-9]\) with exit code 3{USAGE}\n"
    assert re.fullmatch(pattern, done.stdout), done.stdout


def test_status_of_a_killed_job(target: Target) -> None:
    job_id = running_job(target)
    target.cli("kill", "--id", job_id, check=0)
    done = target.cli("status", "--id", job_id, check=0)
    assert re.fullmatch(rf"Job was killed \({ELAPSED}\){USAGE}\n", done.stdout), done.stdout


def test_status_and_kill_of_a_job_whose_supervisor_died(target: Target) -> None:
    job_id = running_job(target, GRANDPARENT)
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    record = json.loads(target.job_dir(job_id).joinpath("status.json").read_text())
    supervisor = record["supervisor"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor), timeout=5, message="the supervisor to die")
    status = target.cli("status", "--id", job_id, check=0)
    assert re.fullmatch(r"Job was lost \(.*supervisor.*\)\n", status.stdout), status.stdout
    assert process_alive(child)
    done = target.cli("kill", "--id", job_id, check=0)
    assert done.stdout == f"Job '{job_id}' killed\n"
    wait_until(lambda: not process_alive(child), timeout=5, message=f"pid {child} to die")
    assert target.cli("status", "--id", job_id, check=0).stdout.startswith("Job was killed")


def test_prune_deletes_a_lost_job_and_kills_what_it_left(target: Target) -> None:
    job_id = running_job(target, GRANDPARENT)
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    record = json.loads(target.job_dir(job_id).joinpath("status.json").read_text())
    os.kill(record["supervisor"]["pid"], signal.SIGKILL)
    wait_until(lambda: "lost" in target.cli("status", "--id", job_id).stdout, message="lost")
    assert target.cli("prune", "--state", "lost", "--older-than", "1h").stdout == "Deleted 0 jobs\n"
    dry = target.cli("prune", "--state", "finished", "--dry-run")
    assert dry.stdout == "", dry  # a lost job is not finished
    assert target.cli("prune", "--state", "lost", "--dry-run").stdout == f"{job_id}\n"
    assert target.cli("prune", "--state", "lost").stdout == "Deleted 1 job\n"
    assert not target.job_dir(job_id).exists()
    wait_until(lambda: not process_alive(child), timeout=5, message=f"pid {child} to die")


def test_status_of_an_unknown_job(target: Target) -> None:
    target.submit(target.make_job())
    done = target.cli("status", "--id", "no_such_job")
    assert one_line_answer(done, 3) == "No job with that identifier"
    as_json = target.cli("status", "--json", "--id", "no_such_job", check=3)
    assert json.loads(as_json.stdout)["error"] == "JobNotFound"


def test_status_in_a_queue_that_does_not_exist_yet(target: Target) -> None:
    done = target.cli("status", "--id", "anything")
    assert one_line_answer(done, 3) == "No job with that identifier"


def _parse_time(text: object) -> datetime:
    assert isinstance(text, str) and ISO_UTC.match(text), text
    when = datetime.strptime(text.rstrip("Z").ljust(26, "0")[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return when.replace(tzinfo=timezone.utc)


def _check_times(document: dict[str, object]) -> None:
    """started_at and ended_at (when set) are ISO 8601 UTC times of the last minutes."""
    now = datetime.now(timezone.utc)
    for key in ("started_at", "ended_at"):
        if document[key] is not None:
            assert abs(_parse_time(document[key]) - now) < timedelta(minutes=2), document


def test_status_json(target: Target) -> None:
    finished = finished_job(target, "#!/bin/sh\nsleep 0.3\nexit 2\n")
    document = json.loads(target.cli("status", "--json", "--id", finished, check=0).stdout)
    assert {"id", "state", "exit_code", "started_at", "ended_at", "elapsed"} <= set(document)
    assert (document["id"], document["state"], document["exit_code"]) == (finished, "finished", 2)
    assert document["started_at"] and document["ended_at"]
    _check_times(document)
    elapsed = document["elapsed"]
    assert isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
    assert 0.3 <= elapsed < 20.0
    started, ended = (_parse_time(document[key]) for key in ("started_at", "ended_at"))
    assert started <= ended
    assert abs((ended - started).total_seconds() - elapsed) < 0.01

    running = running_job(target)
    document = json.loads(target.cli("status", "--json", "--id", running, check=0).stdout)
    assert (document["state"], document["exit_code"], document["ended_at"]) == (
        "running",
        None,
        None,
    )
    _check_times(document)
    assert isinstance(document["elapsed"], (int, float)) and document["elapsed"] >= 0


# -- download -----------------------------------------------------------------


BINARY = bytes(range(256)) * 4 + b"\r\n\x00\xff"


def downloadable_job(target: Target) -> str:
    """A job with a few files and folders to download."""
    job = target.make_job(
        "dl",
        files={
            "output/log.txt": "log line\n",
            "input.bin": BINARY,
            "results.csv": "a,b\n1,2\n",
            "sub/data.txt": "data\n",
            "sub/inner/run.sh": "#!/bin/sh\n",
            "sub/private.txt": "private\n",
            "empty.txt": b"",
        },
    )
    with open(os.path.join(os.fsencode(job), b"sub", b"caf\xe9"), "wb") as stream:
        stream.write(b"latin-1 name\n")
    (job / "sub" / "inner" / "run.sh").chmod(0o750)
    (job / "sub" / "private.txt").chmod(0o600)
    (job / "sub" / "inner").chmod(0o750)
    (job / "sub" / "empty").mkdir()
    (job / "sub" / "link").symlink_to("data.txt")
    (job / "sub" / "dangling").symlink_to("missing-target")
    (job / "escape").symlink_to("/etc/passwd")
    (job / "escape-dir").symlink_to("/etc")
    (job / "up").symlink_to("../job.json")
    (job / "links").mkdir()
    (job / "links" / "etc").symlink_to("/etc")
    (job / "links" / "passwd").symlink_to("/etc/passwd")
    return target.submit(job)


def test_download_the_seed_example(target: Target) -> None:
    job_id = downloadable_job(target)
    dest = target.src_dir / "experiment.csv"
    done = target.cli(
        "download",
        "--id",
        job_id,
        "input.bin",
        "output/log.txt:",
        f"results.csv:{dest}",
        check=0,
    )
    assert done.stdout == "log line\n"
    assert (target.client_dir / "input.bin").read_bytes() == BINARY
    assert dest.read_text() == "a,b\n1,2\n"
    assert listing(target.client_dir) == ["input.bin"]


def test_download_to_the_current_directory(target: Target) -> None:
    job_id = downloadable_job(target)
    target.cli("download", "--id", job_id, "sub/data.txt", "empty.txt", check=0)
    target.cli("download", "--id", job_id, os.fsdecode(b"sub/caf\xe9"), check=0)
    assert listing(target.client_dir) == sorted(["caf\udce9", "data.txt", "empty.txt"])
    assert (target.client_dir / "data.txt").read_text() == "data\n"
    assert (target.client_dir / "empty.txt").read_bytes() == b""
    assert (target.client_dir / "caf\udce9").read_bytes() == b"latin-1 name\n"


def test_download_to_stdout_is_byte_exact(target: Target) -> None:
    job_id = downloadable_job(target)
    done = target.cli("download", "--id", job_id, "input.bin:", check=0)
    assert done.stdout_bytes == BINARY
    text = target.cli("download", "--id", job_id, "results.csv:", check=0)
    assert text.stdout_bytes == b"a,b\n1,2\n"
    empty = target.cli("download", "--id", job_id, "empty.txt:", check=0)
    assert empty.stdout_bytes == b""
    odd = target.cli("download", "--id", job_id, os.fsdecode(b"sub/caf\xe9:"), check=0)
    assert odd.stdout_bytes == b"latin-1 name\n"
    assert listing(target.client_dir) == []


def test_download_to_a_path_and_into_a_folder(target: Target) -> None:
    job_id = downloadable_job(target)
    (target.client_dir / "outdir").mkdir()
    target.cli(
        "download",
        "--id",
        job_id,
        "results.csv:renamed.csv",
        "sub/data.txt:outdir",
        f"input.bin:{target.src_dir}",
        check=0,
    )
    assert (target.client_dir / "renamed.csv").read_text() == "a,b\n1,2\n"
    assert listing(target.client_dir / "outdir") == ["data.txt"]
    assert (target.client_dir / "outdir" / "data.txt").read_text() == "data\n"
    assert (target.src_dir / "input.bin").read_bytes() == BINARY


def test_download_a_folder_recursively(target: Target) -> None:
    job_id = downloadable_job(target)
    target.cli("download", "--id", job_id, "sub", check=0)
    local = target.client_dir / "sub"
    names = ["caf\udce9", "dangling", "data.txt", "empty", "inner", "link", "private.txt"]
    assert listing(local) == sorted(names)
    assert (local / "caf\udce9").read_bytes() == b"latin-1 name\n"
    assert (local / "data.txt").read_text() == "data\n"
    assert (local / "inner" / "run.sh").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((local / "inner" / "run.sh").stat().st_mode) == 0o750
    assert stat.S_IMODE((local / "private.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((local / "inner").stat().st_mode) == 0o750
    assert listing(local / "empty") == []
    assert (local / "link").is_symlink() and os.readlink(local / "link") == "data.txt"
    assert (local / "dangling").is_symlink()
    assert os.readlink(local / "dangling") == "missing-target"
    target.cli("download", "--id", job_id, "sub:copy", check=0)
    assert listing(target.client_dir / "copy") == listing(local)


def test_download_keeps_symlinks_leaving_the_job_as_symlinks(target: Target) -> None:
    job_id = downloadable_job(target)
    target.cli("download", "--id", job_id, "links", check=0)
    local = target.client_dir / "links"
    assert listing(local) == ["etc", "passwd"]
    assert os.readlink(local / "etc") == "/etc"
    assert os.readlink(local / "passwd") == "/etc/passwd"


def test_download_the_whole_job_directory(target: Target) -> None:
    job_id = downloadable_job(target)
    target.cli("download", "--id", job_id, ".:everything", check=0)
    local = target.client_dir / "everything"
    assert (local / "input.bin").read_bytes() == BINARY
    assert (local / "sub" / "data.txt").read_text() == "data\n"
    assert os.readlink(local / "escape") == "/etc/passwd"
    assert listing(target.client_dir) == ["everything"]


REFUSED = [
    "../job.json",  # `..` to the current directory
    "../status.json:",  # `..` to stdout
    "sub/../../job.json:stolen",  # `..` inside, to a path
    "/etc/passwd",  # absolute
    "/etc/passwd:",
    "escape:",  # a symlink to a file outside
    "escape-dir/passwd",  # through a symlink to a folder outside
    "up",  # a relative symlink leaving the job's files
]


def test_download_refuses_paths_leaving_the_job(target: Target) -> None:
    job_id = downloadable_job(target)
    for spec in REFUSED:
        done = target.cli("download", "--id", job_id, spec)
        assert_one_line_error(done)
        assert done.stdout == "", spec
        assert listing(target.client_dir) == [], spec


def test_download_a_missing_file(target: Target) -> None:
    job_id = downloadable_job(target)
    for spec in ("nope.txt", "nope.txt:", "nope.txt:dest.txt", "sub/nope/deeper.txt"):
        done = target.cli("download", "--id", job_id, spec)
        message = assert_one_line_error(done)
        assert "nope" in message
        assert done.stdout == ""
    assert listing(target.client_dir) == []


def test_download_to_a_bad_local_place(target: Target) -> None:
    job_id = downloadable_job(target)
    (target.client_dir / "afile").write_text("keep\n")
    for spec in (
        "sub/data.txt:newdir/",  # a folder that does not exist
        "sub/data.txt:/nonexistent/data.txt",
        "sub/data.txt:afile/data.txt",  # a file where a folder should be
        "sub/data.txt:/proc/tej-test",  # a folder where nothing can be written
        "sub:/proc/tej-test",
    ):
        done = target.cli("download", "--id", job_id, spec)
        assert_one_line_error(done)
        assert listing(target.client_dir) == ["afile"], spec
    assert (target.client_dir / "afile").read_text() == "keep\n"


def test_download_from_an_unknown_job(target: Target) -> None:
    downloadable_job(target)
    done = target.cli("download", "--id", "no_such_job", "input.bin")
    assert "no_such_job" in one_line_answer(done, 3)
    assert done.stdout == ""
    assert listing(target.client_dir) == []


def test_download_while_the_job_runs(target: Target) -> None:
    job_id = running_job(target, EARLY_WRITER)
    wait_until(lambda: target.work(job_id, "early.txt").is_file(), message="early.txt")
    done = target.cli("download", "--id", job_id, "early.txt:", check=0)
    assert done.stdout == "early\n"
    target.cli("download", "--id", job_id, "early.txt", check=0)
    assert (target.client_dir / "early.txt").read_text() == "early\n"
    status = target.cli("status", "--id", job_id, check=0)
    assert status.stdout.startswith("Job is still running")


def test_a_5_mb_random_file_round_trips(target: Target) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    job_id = target.submit(target.make_job("big", files={"big.bin": data}))
    assert hashlib.sha256(target.work(job_id, "big.bin").read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )
    target.cli("download", "--id", job_id, "big.bin", check=0)
    assert (target.client_dir / "big.bin").read_bytes() == data
    printed = target.cli("download", "--id", job_id, "big.bin:", check=0)
    assert printed.stdout_bytes == data


# -- kill ---------------------------------------------------------------------


def test_kill_a_running_job_and_its_background_children(target: Target) -> None:
    job_id = running_job(target, GRANDPARENT)
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    assert process_alive(child)
    done = target.cli("kill", "--id", job_id, check=0)
    assert done.stdout == f"Job '{job_id}' killed\n"
    wait_until(lambda: not process_alive(child), timeout=5, message=f"pid {child} to die")
    status = target.cli("status", "--id", job_id, check=0)
    assert status.stdout.startswith("Job was killed")


def test_kill_reaches_a_child_that_left_the_process_group(target: Target) -> None:
    job_id = running_job(target, ESCAPER)
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    assert process_alive(child)
    done = target.cli("kill", "--id", job_id, check=0)
    assert done.stdout == f"Job '{job_id}' killed\n"
    wait_until(lambda: not process_alive(child), timeout=5, message=f"pid {child} to die")


def test_kill_a_finished_job(target: Target) -> None:
    job_id = finished_job(target)
    done = target.cli("kill", "--id", job_id, check=0)
    assert done.stdout == f"Job '{job_id}' has already completed\n"
    status = target.cli("status", "--id", job_id, check=0)
    assert status.stdout.startswith("Job is finished")


def test_kill_an_unknown_job(target: Target) -> None:
    done = target.cli("kill", "--id", "ghost")
    assert one_line_answer(done, 3) == "No job 'ghost'"


# -- delete -------------------------------------------------------------------


def test_delete_a_finished_job(target: Target) -> None:
    job_id = finished_job(target)
    assert target.job_dir(job_id).is_dir()
    done = target.cli("delete", "--id", job_id, check=0)
    assert done.stdout == f"Deleted job '{job_id}'\n"
    assert not target.job_dir(job_id).exists()
    assert listing(target.server_path("trash")) == []
    target.cli("status", "--id", job_id, check=3)
    assert job_id not in target.cli("list", check=0).stdout


def test_delete_a_running_job_is_refused(target: Target) -> None:
    job_id = running_job(target)
    done = target.cli("delete", "--id", job_id)
    message = assert_one_line_error(done, 4)
    assert "tej kill" in message
    assert target.job_dir(job_id).is_dir()
    assert target.cli("status", "--id", job_id, check=0).stdout.startswith("Job is still running")


def test_delete_force_kills_then_deletes(target: Target) -> None:
    job_id = running_job(target, GRANDPARENT)
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    done = target.cli("delete", "--force", "--id", job_id, check=0)
    assert done.stdout == f"Deleted job '{job_id}'\n"
    assert not target.job_dir(job_id).exists()
    wait_until(lambda: not process_alive(child), timeout=5, message=f"pid {child} to die")
    target.cli("status", "--id", job_id, check=3)


def test_delete_an_unknown_job(target: Target) -> None:
    done = target.cli("delete", "--id", "ghost")
    assert "ghost" in one_line_answer(done, 3)
    assert done.stdout == ""


# -- list ---------------------------------------------------------------------


def test_list(target: Target) -> None:
    empty = target.cli("list", check=0)
    assert [line for line in empty.stdout.splitlines() if not line.startswith("ID")] == []
    finished = target.submit(target.make_job("a", "#!/bin/sh\nexit 2\n"), "--id", "first")
    target.wait_for(finished)
    running = target.submit(target.make_job("b", SLEEPER), "--id", "second")
    target.wait_for(running, ("running",))  # submit answers while it is starting
    lines = target.cli("list", check=0).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] != "ID"}
    assert set(rows) == {finished, running}
    assert rows[finished][1] == "finished"
    assert re.fullmatch(ELAPSED, rows[finished][2])
    assert rows[finished][3:] == ["2"]
    assert rows[running][1] == "running"
    assert re.fullmatch(ELAPSED, rows[running][2])
    assert rows[running][3:] == []
    ids = [line.split()[0] for line in lines if line.split()[0] != "ID"]
    assert ids == [finished, running]


def test_list_json(target: Target) -> None:
    assert json.loads(target.cli("list", "--json", check=0).stdout) == []
    finished = target.submit(target.make_job("a", "#!/bin/sh\nexit 2\n"))
    target.wait_for(finished)
    running = target.submit(target.make_job("b", SLEEPER))
    target.wait_for(running, ("running",))  # submit answers while it is starting
    documents = json.loads(target.cli("list", "--json", check=0).stdout)
    assert [doc["id"] for doc in documents] == [finished, running]
    by_id = {doc["id"]: doc for doc in documents}
    assert (by_id[finished]["state"], by_id[finished]["exit_code"]) == ("finished", 2)
    assert (by_id[running]["state"], by_id[running]["exit_code"]) == ("running", None)
    for document in documents:
        assert {"id", "state", "exit_code", "started_at", "ended_at", "elapsed"} <= set(document)
        _check_times(document)
    single = json.loads(target.cli("status", "--json", "--id", finished).stdout)
    assert single.pop("metadata")["id"] == finished  # status adds the job's metadata
    assert single.pop("attempts")[0]["exit_code"] == 2  # and its attempts
    assert (single.pop("max_attempts"), single.pop("retry_at")) == (1, None)
    assert single == by_id[finished]


# -- setup --------------------------------------------------------------------


def test_setup_creates_the_queue(target: Target) -> None:
    done = target.cli("setup", check=0)
    assert target.queue in done.stdout
    assert target.server_path("tej-queue.json").is_file()
    assert target.server_path("jobs").is_dir()
    job_id = target.submit(target.make_job())
    assert target.job_dir(job_id).is_dir()


def test_setup_on_an_existing_queue_is_idempotent(target: Target) -> None:
    """The seed's setup line, run again: the queue is left alone and the link is made."""
    target.cli("setup", check=0)
    config = target.server_path("tej-queue.json").read_bytes()
    link = os.path.join(os.path.dirname(target.queue), "again")
    done = target.cli("setup", "--make-link", link, "--plugin=default", check=0)
    real = os.path.abspath(target.queue)
    assert done.stdout == (
        f"Queue {real} already set up (plugin: default)\nMade link {link} -> {real}\n"
    ), done.stdout
    assert target.server_path("tej-queue.json").read_bytes() == config


def test_setup_with_other_settings_needs_force(target: Target) -> None:
    target.cli("setup", check=0)
    message = assert_one_line_error(target.cli("setup", "--plugin", "queue"))
    assert "--force" in message and "from 'default' to 'queue'" in message, message
    message = assert_one_line_error(
        target.cli("setup", "--option", "max_running=2")
    )  # the default runner takes none
    assert "takes no options" in message, message
    job_id = target.submit(target.make_job())
    target.cli("setup", "--force", check=0)
    assert target.job_dir(job_id).is_dir()
    target.cli("status", "--id", job_id, check=0)


def test_setup_with_an_unknown_plugin(target: Target) -> None:
    message = assert_one_line_error(target.cli("setup", "--plugin", "nope"))
    assert "nope" in message
    assert not target.server_path().exists()


def test_setup_make_link(target: Target) -> None:
    link = os.path.join(os.path.dirname(target.queue), "shortcut")
    target.cli("setup", "--make-link", link, check=0)
    done = target.cli("submit", str(target.make_job("linked")), queue=link, check=0)
    job_id = done.stdout.splitlines()[-1]
    assert target.job_dir(job_id).is_dir()
    assert not Path(link).is_dir()
    target.wait_for(job_id)
    status = target.cli("status", "--id", job_id, queue=link, check=0)
    assert status.stdout.startswith("Job is finished")
    assert job_id in target.cli("list", queue=link, check=0).stdout
    target.cli("delete", "--id", job_id, queue=link, check=0)
    assert not target.job_dir(job_id).exists()


def test_setup_refuses_a_link_over_a_folder(target: Target) -> None:
    folder = target.server_path().parent / "a-folder"
    folder.mkdir()
    message = assert_one_line_error(target.cli("setup", "--make-link", str(folder)))
    assert str(folder) in message
    assert listing(folder) == []


def test_setup_only_links(target: Target) -> None:
    target.cli("setup", check=0)
    config_before = target.server_path("tej-queue.json").read_bytes()
    link = os.path.join(os.path.dirname(target.queue), "second-link")
    done = target.cli("setup", "--only-links", "--make-link", link, check=0)
    assert "Created" not in done.stdout and link in done.stdout
    assert target.server_path("tej-queue.json").read_bytes() == config_before
    job_id = target.cli("submit", str(target.make_job()), queue=link, check=0).stdout.split()[-1]
    assert target.job_dir(job_id).is_dir()


def test_setup_make_default_link(default_link_home: Target) -> None:
    target = default_link_home
    target.cli("setup", "--make-default-link", check=0)
    assert Path(target.home, ".tej").is_file()
    target.cli("submit", "--id", "by_default", str(target.make_job()), queue=None, check=0)
    assert target.job_dir("by_default").is_dir()
    target.wait_for("by_default")
    status = target.cli("status", "--id", "by_default", queue=None, check=0)
    assert status.stdout.startswith("Job is finished")


def test_json_of_kill_delete_download_and_setup(target: Target) -> None:
    setup = json.loads(target.cli("setup", "--json", check=0).stdout)
    assert setup["queue"] == os.path.abspath(target.queue) and setup["created"] is True
    job_id = running_job(target, EARLY_WRITER)
    wait_until(lambda: target.work(job_id, "early.txt").is_file(), message="early.txt")
    saved = json.loads(
        target.cli("download", "--json", "--id", job_id, "early.txt", check=0).stdout
    )
    assert saved["id"] == job_id
    assert [item["path"] for item in saved["files"]] == ["early.txt"]
    assert (target.client_dir / "early.txt").read_text() == "early\n"
    killed = json.loads(target.cli("kill", "--json", "--id", job_id, check=0).stdout)
    assert killed["killed"] is True and killed["status"]["state"] == "killed"
    deleted = json.loads(target.cli("delete", "--json", "--id", job_id, check=0).stdout)
    assert deleted == {"id": job_id, "deleted": True}
    missing = target.cli("kill", "--json", "--id", job_id, check=3)
    assert json.loads(missing.stdout)["error"] == "JobNotFound"


# -- errors reaching the server ---------------------------------------------


def test_unknown_destination_syntax(target: Target) -> None:
    done = target.cli("list", destination="bad host")
    assert_one_line_error(done, 1)


def test_unreachable_server(target: Target) -> None:
    if target.kind == "ssh":
        destination = f"ssh://{target.server.user}@127.0.0.1:1"
        done = target.cli("list", destination=destination)
        message = assert_one_line_error(done, 5)
        assert "127.0.0.1" in message
        target.cli("list", destination=target.server.url, check=0)
    else:
        done = target.cli("list", "--python", str(target.src_dir / "no-python"))
        message = assert_one_line_error(done, 5)
        assert "no-python" in message


# -- jobs outlive their client ------------------------------------------------


def test_the_job_survives_the_submitting_command(target: Target) -> None:
    job = target.make_job("survivor", "#!/bin/sh\nsleep 2\necho done > done.txt\nexit 5\n")
    job_id = target.submit(job)
    status = target.cli("status", "--id", job_id, check=0)
    assert status.stdout.startswith("Job is still running")
    assert not target.work(job_id, "done.txt").exists()
    wait_until(lambda: target.work(job_id, "done.txt").is_file(), message="done.txt")
    target.wait_for(job_id)
    done = target.cli("status", "--id", job_id, check=0)
    assert re.fullmatch(rf"Job is finished \(0:00:0[2-9]\) with exit code 5{USAGE}\n", done.stdout)


CLIENT = """
import sys, time
from tej import RemoteQueue
remote = RemoteQueue(sys.argv[1], sys.argv[2], ssh_config=sys.argv[3] or None)
remote.__enter__()
print(remote.submit(sys.argv[4]), flush=True)
time.sleep(120)
"""


def test_the_job_survives_a_killed_api_client(target: Target) -> None:
    job = target.make_job("orphan", "#!/bin/sh\nsleep 2\necho done > done.txt\nexit 4\n")
    argv = [sys.executable, "-c", CLIENT, target.destination, target.queue]
    argv += [target.ssh_config or "", str(job)]
    client = subprocess.Popen(
        argv, stdout=subprocess.PIPE, env=target.client_env, cwd=target.client_dir
    )
    try:
        selector = selectors.DefaultSelector()
        assert client.stdout is not None
        selector.register(client.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=30), "the client printed no job id"
        job_id = client.stdout.readline().decode().strip()
        assert client.poll() is None
    finally:
        client.kill()
        client.wait(timeout=10)
    assert job_id
    status = target.cli("status", "--id", job_id, check=0)
    assert status.stdout.startswith("Job is still running"), status.stdout
    target.wait_for(job_id)
    assert target.work(job_id, "done.txt").read_text() == "done\n"
    done = target.cli("status", "--id", job_id, check=0)
    assert re.fullmatch(rf"Job is finished \(0:00:0[2-9]\) with exit code 4{USAGE}\n", done.stdout)
