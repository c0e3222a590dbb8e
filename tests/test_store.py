"""Content-addressed uploads, end to end: over `local` and the real loopback sshd.

The queue's store keeps each content once; a submit sends only what it lacks. Bytes sent
are counted with the API's progress callback (it reports the bytes put on the wire).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import Target, wait_until

import tej
from tej import hashcache, transfer
from tej.session import Session

MiB = 1 << 20
START = b"#!/bin/sh\ntrue\n"  # what Target.make_job writes by default


def blobs(target: Target) -> dict[str, Path]:
    """The store's blobs on the server, by name (DIGEST-MODE)."""
    return {path.name: path for path in target.server_path("store").glob("??/*")}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submit_counting(target: Target, directory: Path) -> tuple[str, int]:
    """Submit through the API; the job's id and the bytes sent."""
    sent: list[tuple[int, int]] = []
    with target.api() as remote:
        job_id = remote.submit(
            str(directory), progress=lambda done, total: sent.append((done, total))
        )
    assert len({total for _, total in sent}) <= 1, sent
    return job_id, sum(done for done, _ in sent)


def same_tree(local: Path, remote: Path) -> None:
    """remote holds local's files, with the same contents and modes."""
    for path in local.rglob("*"):
        other = remote / path.relative_to(local)
        if path.is_file() and not path.is_symlink():
            assert other.read_bytes() == path.read_bytes(), other
            assert stat.S_IMODE(other.stat().st_mode) == stat.S_IMODE(path.stat().st_mode), other


@pytest.mark.timeout(120)
def test_a_resubmit_sends_only_what_changed(target: Target) -> None:
    files: dict[str, bytes | str] = {
        f"d{i // 10}/f{i:02d}.txt": os.urandom(2000) for i in range(30)
    }
    files["big.bin"] = os.urandom(2 * MiB + 5)
    job = target.make_job("again", files=files)
    total = sum(path.stat().st_size for path in job.rglob("*") if path.is_file())
    first, sent = submit_counting(target, job)
    assert sent == total
    second, sent = submit_counting(target, job)
    assert sent == 0
    (job / "d1" / "f12.txt").write_bytes(b"changed\n")
    third, sent = submit_counting(target, job)
    assert sent == len(b"changed\n")
    for job_id in (first, second, third):
        assert target.wait_for(job_id)["state"] == "finished"
    same_tree(job, target.work(third))
    assert target.work(first, "d1", "f12.txt").read_bytes() == files["d1/f12.txt"]
    assert len(blobs(target)) == 33  # 32 contents, and the changed one


@pytest.mark.timeout(120)
def test_identical_files_are_sent_and_stored_once(target: Target) -> None:
    data = os.urandom(MiB)
    job = target.make_job("twins", files={"a.bin": data, "b/a.bin": data, "c.bin": data})
    job_id, sent = submit_counting(target, job)
    assert sent == MiB + len(START)
    assert set(blobs(target)) == {f"{digest(data)}-644", f"{digest(START)}-755"}
    work = target.work(job_id)
    inodes = {(work / name).stat().st_ino for name in ("a.bin", "b/a.bin", "c.bin")}
    assert len(inodes) == 3  # one job's files never share an inode
    assert all((work / name).read_bytes() == data for name in ("a.bin", "b/a.bin", "c.bin"))


@pytest.mark.timeout(120)
def test_a_job_that_changes_its_input_does_not_change_the_next_ones(target: Target) -> None:
    script = (
        "#!/bin/sh\necho appended >> data.txt\nprintf X | dd of=big.bin conv=notrunc 2>/dev/null\n"
    )
    big = os.urandom(MiB)
    job = target.make_job("writer", script, files={"data.txt": "original\n", "big.bin": big})
    first = target.submit(job)
    assert target.wait_for(first)["exit_code"] == 0
    assert target.work(first, "data.txt").read_text() == "original\nappended\n"
    second, sent = submit_counting(target, job)
    assert sent == len("original\n") + MiB  # both were written to: sent again
    assert target.wait_for(second)["exit_code"] == 0
    for job_id in (first, second):
        assert target.work(job_id, "data.txt").read_text() == "original\nappended\n"
        assert target.work(job_id, "big.bin").read_bytes() == b"X" + big[1:]
    assert (job / "data.txt").read_text() == "original\n"


@pytest.mark.timeout(120)
def test_a_running_job_shares_no_file_with_a_new_one(target: Target) -> None:
    script = "#!/bin/sh\nwhile [ ! -e go ]; do sleep 0.05; done\necho more >> data.txt\n"
    job = target.make_job("sweep", script, files={"data.txt": "original\n"})
    first = target.submit(job)
    target.wait_for(first, ("running",))
    second, sent = submit_counting(target, job)
    assert sent == 0  # copied on the server, not sent again
    files = [target.work(job_id, "data.txt") for job_id in (first, second)]
    assert files[0].stat().st_ino != files[1].stat().st_ino
    target.work(first, "go").touch()
    assert target.wait_for(first)["exit_code"] == 0
    assert [path.read_text() for path in files] == ["original\nmore\n", "original\n"]
    target.work(second, "go").touch()
    assert target.wait_for(second)["exit_code"] == 0


@pytest.mark.timeout(120)
def test_executable_bits_survive(target: Target) -> None:
    tool = "#!/bin/sh\necho tool ran\n"
    job = target.make_job(
        "modes",
        "#!/bin/sh\n./bin/tool.sh\n",
        files={"bin/tool.sh": tool, "bin/not-a-tool.sh": tool, "private.sh": tool, "ro.txt": tool},
    )
    for name, mode in (("bin/tool.sh", 0o755), ("private.sh", 0o700), ("ro.txt", 0o444)):
        (job / name).chmod(mode)
    for _ in range(2):  # the second links what the first stored
        job_id = target.submit(job)
        assert target.wait_for(job_id)["exit_code"] == 0
        assert target.cli("logs", "--id", job_id, check=0).stdout == "tool ran\n"
        same_tree(job, target.work(job_id))


@pytest.mark.timeout(120)
def test_deleting_jobs_removes_the_contents_no_job_uses(target: Target) -> None:
    shared = {"common.txt": "common\n"}
    first = target.submit(target.make_job("a", files={**shared, "a.txt": "only a\n"}))
    second = target.submit(target.make_job("b", files={**shared, "b.txt": "only b\n"}))
    for job_id in (first, second):
        target.wait_for(job_id)
    names = {text: f"{digest(text.encode())}-644" for text in ("common\n", "only a\n", "only b\n")}
    assert set(names.values()) <= set(blobs(target))
    target.cli("delete", "--id", first, check=0)
    assert names["only a\n"] not in blobs(target)
    assert {names["common\n"], names["only b\n"]} <= set(blobs(target))
    target.cli("delete", "--id", second, check=0)
    assert blobs(target) == {}


@pytest.mark.timeout(120)
def test_content_that_does_not_match_its_hash_is_refused(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent checks every content it receives: a client's claim is never trusted."""
    job = target.make_job("liar", files={"data.txt": "the real content\n"})
    cache = tmp_path / "cache"
    target.client_env["XDG_CACHE_HOME"] = str(cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    # A stale cache entry (as if the file had changed within one timestamp tick).
    claimed = digest(b"what the cache says\n")
    entries = transfer.scan_directory(str(job))
    cache = hashcache.HashCache(str(job))
    trusted = time.time_ns() + hashcache.CACHE_MARGIN  # as if read long after they changed
    for entry in entries:
        if entry.kind == "f":
            content = (job / entry.relpath.decode()).read_bytes()
            key = (entry.relpath, entry.stamp)
            cache.put(key, claimed if entry.relpath == b"data.txt" else digest(content), trusted)
    cache.save((entry.relpath, entry.stamp) for entry in entries if entry.kind == "f")
    path = Path(cache.path)
    assert path.is_file()

    done = target.cli("submit", str(job))
    assert done.returncode == 1, done
    assert done.stderr.startswith("Error: ") and "not the one announced" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not any(name.startswith(claimed) for name in blobs(target))
    assert os.listdir(target.server_path("jobs")) == []
    assert os.listdir(target.server_path("staging")) == []
    path.unlink()  # without the lie, it goes through
    job_id = target.submit(job)
    assert target.work(job_id, "data.txt").read_text() == "the real content\n"


def staging_holders(staging: Path) -> list[int]:
    """Processes that hold a file open under staging (an agent still writing an upload)."""
    prefix = str(staging) + "/"
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd).startswith(prefix):
                    found.append(int(entry.name))
                    break
    return found


def partial_bytes(staging: Path) -> int:
    """The size of the contents arriving in staging areas."""
    total = 0
    for path in staging.glob("*/part-*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


@pytest.mark.timeout(180)
def test_an_interrupted_upload_resumes_without_sending_again_what_arrived(
    target: Target,
) -> None:
    files: dict[str, bytes | str] = {f"a{i:02d}.bin": os.urandom(MiB) for i in range(20)}
    files["z-big.bin"] = os.urandom(60 * MiB)
    job = target.make_job("resumed", files=files)
    total = sum(path.stat().st_size for path in job.rglob("*") if path.is_file())
    first = target.submit(target.make_job("first"))  # the queue exists, with START stored
    staging = target.server_path("staging")
    client = target.popen(
        "submit",
        str(job),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while partial_bytes(staging) < 8 * MiB:  # the small files are in, the big one half
            assert client.poll() is None, "the upload ended before it could be interrupted"
            assert time.monotonic() < deadline, "the upload did not start"
            time.sleep(0.002)
        os.killpg(client.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=30)
    wait_until(lambda: not staging_holders(staging), 15, "the agent to stop writing the upload")
    # What arrived: whole contents in the store (all of them this job's), and a partial one.
    arrived = sum(path.stat().st_size for path in blobs(target).values()) + partial_bytes(staging)
    assert 20 * MiB + len(START) < arrived < total, (arrived, total)

    job_id, sent = submit_counting(target, job)
    assert sent == total - arrived
    assert target.wait_for(job_id)["exit_code"] == 0
    same_tree(job, target.work(job_id))
    listed = json.loads(target.cli("list", "--json", check=0).stdout)
    assert [item["id"] for item in listed] == [first, job_id]


@pytest.mark.timeout(60)
def test_the_client_reads_an_unchanged_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's hash cache: a file is trusted while stat says it is the one it hashed."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "data.bin").write_bytes(os.urandom(MiB))
    (job / "new.bin").write_bytes(os.urandom(MiB))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hashcache, "CACHE_MARGIN", 0)  # no file is too recent to be trusted
    reads: list[bytes] = []
    original = transfer._hash_file

    def counting(path: bytes, size: int) -> str:
        reads.append(os.path.basename(path))
        return original(path, size)

    monkeypatch.setattr(transfer, "_hash_file", counting)
    entries = transfer.hash_files(str(job), transfer.scan_directory(str(job)))
    assert sorted(reads) == [b"data.bin", b"new.bin"]
    assert transfer.hash_files(str(job), transfer.scan_directory(str(job))) == entries
    assert len(reads) == 2
    (job / "data.bin").write_bytes(os.urandom(MiB))  # same size, new mtime and ctime
    changed = transfer.hash_files(str(job), transfer.scan_directory(str(job)))
    assert reads[2:] == [b"data.bin"] and changed != entries
    # Not trusted: a file that changed less than a timestamp tick before it was read.
    monkeypatch.setattr(hashcache, "CACHE_MARGIN", 3600 * 10**9)
    (job / "new.bin").write_bytes(os.urandom(MiB))
    for _ in range(2):
        transfer.hash_files(str(job), transfer.scan_directory(str(job)))
    assert reads[3:] == [b"new.bin", b"new.bin"]


def parts_job(target: Target, name: str, count: int) -> Path:
    """A job of count small files in folders of 50."""
    files: dict[str, bytes | str] = {f"d{i // 50:02d}/f{i:03d}.txt": f"{i}\n" for i in range(count)}
    return target.make_job(name, files=files)


@pytest.mark.timeout(120)
def test_a_small_change_costs_one_request(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest goes in parts; the changed file and the submit go with the last one."""
    monkeypatch.setattr(transfer, "PART_ENTRIES", 64)
    job = parts_job(target, "parts", 300)
    first, _ = submit_counting(target, job)
    parts = len(list(transfer.scan_tree(str(job))))
    assert parts > 2
    (job / "d03" / "f170.txt").write_text("changed\n")
    ops: list[str] = []
    send = Session._send

    def counting(self: Session, op: str, args: dict[str, Any]) -> None:
        ops.append(op)
        send(self, op, args)

    with target.api() as remote:
        monkeypatch.setattr(Session, "_send", counting)
        second = remote.submit(str(job))
    assert ops == ["upload_begin"] + ["upload_manifest"] * (parts - 1)
    for job_id in (first, second):
        assert target.wait_for(job_id)["exit_code"] == 0
    same_tree(job, target.work(second))
    assert target.work(first, "d03", "f170.txt").read_text() == "170\n"


@pytest.mark.timeout(120)
def test_a_problem_found_in_a_later_part_leaves_nothing(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "PART_ENTRIES", 16)
    job = parts_job(target, "late", 200)
    os.mkfifo(job / "d03" / "pipe")  # in the last folder read
    for connected in (True, False):  # the directory read as it is sent, or while connecting
        remote = target.api()
        try:
            if connected:
                remote.session()
            with pytest.raises(tej.InvalidInput, match="only files, folders and symlinks"):
                remote.submit(str(job))
            assert remote.list() == []
        finally:
            remote.close()
        assert os.listdir(target.server_path("staging")) == []
        assert os.listdir(target.server_path("store", "leases")) == []


@pytest.mark.timeout(60)
def test_only_small_files_never_seen_go_with_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    job = tmp_path / "job"
    job.mkdir()
    (job / "small.txt").write_bytes(b"s" * 100)
    (job / "big.bin").write_bytes(os.urandom(transfer.EAGER_BYTES + 1))

    def sent_along() -> list[bytes]:
        parts = list(transfer.scan_tree(str(job)))
        entries = [entry for part in parts for entry in part.entries]
        assert all(not part.eager for part in parts[:-1])
        return [entries[index].relpath for index, data in parts[-1].eager]

    assert sent_along() == [b"small.txt"]  # new
    assert sent_along() == []  # seen, if too recently to trust its digest yet
    (job / "small.txt").write_bytes(b"t" * 100)
    assert sent_along() == [b"small.txt"]  # changed
    Path(hashcache.HashCache(str(job)).path).write_bytes(hashcache.CACHE_MAGIC + b"garbage")
    assert sent_along() == [b"small.txt"]  # a damaged cache is an empty one


@pytest.mark.timeout(120)
def test_a_running_resubmitted_job_shares_no_file_with_a_new_one(target: Target) -> None:
    # Its supervisor lays its files out (default runner): its lease holds them all along.
    script = (
        "#!/bin/sh\nwhile [ ! -e go ]; do sleep 0.05; done\n"
        "if [ -e write ]; then echo more >> data.txt; fi\n"
    )
    job = target.make_job("again", script, files={"data.txt": "original\n"})
    first = target.submit(job)
    target.wait_for(first, ("running",))
    target.work(first, "go").touch()
    assert target.wait_for(first)["exit_code"] == 0
    second = target.cli("resubmit", "--id", first, check=0).stdout.splitlines()[1]
    target.wait_for(second, ("running",))
    third, sent = submit_counting(target, job)
    assert sent == 0
    files = [target.work(job_id, "data.txt") for job_id in (second, third)]
    assert files[0].stat().st_ino != files[1].stat().st_ino
    target.work(second, "write").touch()
    for job_id in (second, third):
        target.work(job_id, "go").touch()
        assert target.wait_for(job_id)["exit_code"] == 0
    assert [path.read_text() for path in files] == ["original\nmore\n", "original\n"]
