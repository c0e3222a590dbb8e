"""`tej sync`: the small files changed since the last sync come with the listing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import Target
from test_sync import tree

from tej.server.handlers import sync as handler

pytestmark = pytest.mark.timeout(120)


def synced_job(target: Target, files: dict[str, str | bytes]) -> tuple[str, Path]:
    """A finished job holding files, synced once (through the API) into a local folder."""
    job_id = target.submit(target.make_job("preload", files=files))
    target.wait_for(job_id)
    local = target.src_dir / "synced"
    with target.api() as remote:
        first = remote.sync(job_id, str(local))
    assert first.files_sent == len(files) + 1  # and the job's script
    marker = json.loads((local / ".tej-sync" / "sync.json").read_text())
    assert isinstance(marker["listed_at"], int)
    return job_id, local


def test_a_resync_of_a_changed_small_file_is_one_request(target: Target) -> None:
    job_id, local = synced_job(target, {"a.txt": "one\n", "b.txt": "two\n", "c/d.bin": b"x" * 3000})
    target.work(job_id, "a.txt").write_text("ONE\n")  # the same size, new content
    target.work(job_id, "c", "d.bin").write_bytes(b"y" * 3000)  # raw with the early answer
    with target.api() as remote:
        summary = remote.sync(job_id, str(local))
    assert summary.requests == 1, summary
    assert (summary.files_sent, summary.bytes_sent, summary.files_unchanged) == (2, 3004, 2)
    assert tree(local) == tree(target.work(job_id))
    assert os.listdir(local / ".tej-sync" / "partial") == []


def test_a_preloaded_file_the_same_as_the_local_copy_is_unchanged(target: Target) -> None:
    job_id, local = synced_job(target, {"a.txt": "same\n", "b.txt": "other\n"})
    later = time.time_ns()
    os.utime(target.work(job_id, "a.txt"), ns=(later, later))  # its time only
    with target.api() as remote:
        summary = remote.sync(job_id, str(local))
    assert summary.requests == 1, summary
    assert (summary.files_sent, summary.files_unchanged) == (0, 3)
    assert (local / "a.txt").stat().st_mtime_ns == later
    assert tree(local) == tree(target.work(job_id))


def test_past_the_budget_files_are_read_as_before(target: Target) -> None:
    files: dict[str, str | bytes] = {f"f{index:02d}.txt": "old\n" * 2500 for index in range(40)}
    files["big.bin"] = b"b" * (handler.CONTENT_MAX + 1)
    job_id, local = synced_job(target, files)
    for index in range(40):  # 40 files of 10 kB: more than CONTENT_FILES
        target.work(job_id, f"f{index:02d}.txt").write_text("new\n" * 2500)
    target.work(job_id, "big.bin").write_bytes(b"B" * (handler.CONTENT_MAX + 1))
    with target.api() as remote:
        summary = remote.sync(job_id, str(local))
    assert summary.requests >= 2, summary  # the rest through sync_read
    assert summary.files_sent == 41
    assert tree(local) == tree(target.work(job_id))


def test_a_dry_run_asks_for_no_contents(target: Target) -> None:
    job_id, local = synced_job(target, {"a.txt": "one\n"})
    target.work(job_id, "a.txt").write_text("ONE\n")
    with target.api() as remote:
        syncer = remote._syncer(job_id, str(local), (), False, (), False, True, None)
        summary = syncer.run()
    assert summary.to_send == ("a.txt",) and summary.requests == 1
    assert syncer.preloaded == {}
    assert (local / "a.txt").read_text() == "one\n"


def test_excluded_files_are_left_alone(target: Target) -> None:
    job_id, local = synced_job(target, {"keep.txt": "one\n", "skip.log": "two\n"})
    target.work(job_id, "keep.txt").write_text("ONE\n")
    target.work(job_id, "skip.log").write_text("TWO\n")
    with target.api() as remote:
        summary = remote.sync(job_id, str(local), exclude=["*.log"])
    assert summary.requests == 1 and summary.files_sent == 1, summary
    assert (local / "keep.txt").read_text() == "ONE\n"
    assert (local / "skip.log").read_text() == "two\n"


def test_a_marker_without_listed_at_still_syncs(target: Target) -> None:
    job_id, local = synced_job(target, {"a.txt": "one\n"})
    path = local / ".tej-sync" / "sync.json"
    marker = json.loads(path.read_text())
    del marker["listed_at"]
    path.write_text(json.dumps(marker))
    target.work(job_id, "a.txt").write_text("ONE\n")
    with target.api() as remote:
        summary = remote.sync(job_id, str(local))
    assert summary.requests == 2 and summary.files_sent == 1, summary  # sync_read, as before
    assert (local / "a.txt").read_text() == "ONE\n"


def listed(work: bytes) -> dict[bytes, tuple[object, ...]]:
    rows: dict[bytes, tuple[object, ...]] = {}
    handler.walk(work, b"", rows)
    return rows


def test_the_agent_sends_only_files_still_as_listed_newest_first(tmp_path: Path) -> None:
    work = os.fsencode(os.path.realpath(tmp_path))
    for index in range(5):
        (tmp_path / f"f{index}").write_bytes(b"%d" % index * 100)
        os.utime(tmp_path / f"f{index}", ns=(index * 10**9, (10 + index) * 10**9))
    (tmp_path / "empty").write_bytes(b"")
    os.utime(tmp_path / "empty", ns=(0, 20 * 10**9))
    rows = listed(work)
    contents = handler.recent_contents(work, rows.values(), 12 * 10**9)
    assert [(c[0], c[3]) for c in contents] == [
        (b"empty", b""),
        (b"f4", b"4" * 100),
        (b"f3", b"3" * 100),
        (b"f2", b"2" * 100),
    ]
    (tmp_path / "f4").write_bytes(b"X" * 100)  # changed after the listing: not sent
    (tmp_path / "f3.new").write_bytes(b"3" * 100)
    os.utime(tmp_path / "f3.new", ns=(0, 13 * 10**9))
    os.replace(tmp_path / "f3.new", tmp_path / "f3")  # another file (inode), as listed else
    sent = [c[0] for c in handler.recent_contents(work, rows.values(), 12 * 10**9)]
    assert sent == [b"empty", b"f2"]


def test_the_agent_keeps_to_its_budget(tmp_path: Path) -> None:
    work = os.fsencode(os.path.realpath(tmp_path))
    count = handler.CONTENT_BUDGET // handler.CONTENT_MAX + 2
    for index in range(count):  # the newest: all can't fit in the budget
        (tmp_path / f"m{index}").write_bytes(b"m" * handler.CONTENT_MAX)
        os.utime(tmp_path / f"m{index}", ns=(0, (100 + index) * 10**9))
    (tmp_path / "big").write_bytes(b"b" * (handler.CONTENT_MAX + 1))
    contents = handler.recent_contents(work, listed(work).values(), 0)
    assert [c[0] for c in contents] == [b"m%d" % i for i in range(count - 1, 1, -1)]
    for index in range(handler.CONTENT_FILES + 8):  # older, and smaller
        (tmp_path / f"s{index:02d}").write_bytes(b"s" * 10)
        os.utime(tmp_path / f"s{index:02d}", ns=(0, (50 + index) * 10**9))
    for name in os.listdir(tmp_path):
        if name.startswith("m"):
            os.unlink(tmp_path / name)
    contents = handler.recent_contents(work, listed(work).values(), 0)
    assert len(contents) == handler.CONTENT_FILES
    assert [c[0] for c in contents][:2] == [b"s39", b"s38"]
