"""Big downloads as a raw stream beside the session (tej.rawstream), over local and ssh."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from helpers import Target

import tej
from tej import rawstream

pytestmark = pytest.mark.timeout(120)
SIZE = rawstream.RAW_STREAM_MIN + 12345


@pytest.fixture
def big_job(target: Target) -> tuple[Target, str, bytes]:
    """A finished job whose directory holds a file just big enough for a raw stream."""
    data = os.urandom(SIZE)
    job = target.make_job("big", files={"data.bin": data})
    job_id = target.submit(job, "--quiet")
    target.wait_for(job_id)
    return target, job_id, data


def test_a_big_download_arrives_whole_and_counts_its_progress(
    big_job: tuple[Target, str, bytes], tmp_path: Path
) -> None:
    target, job_id, data = big_job
    seen: list[tuple[int, int]] = []
    (tmp_path / "out").mkdir()
    local = tmp_path / "out" / "data.bin"
    with target.api() as remote:
        remote.download(job_id, "data.bin", str(local), progress=lambda n, t: seen.append((n, t)))
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sum(n for n, _ in seen) == SIZE and {t for _, t in seen} == {SIZE}
    assert [p.name for p in local.parent.iterdir()] == ["data.bin"]  # no partial file left


def test_the_stream_refuses_a_file_that_is_not_the_one_checked(
    big_job: tuple[Target, str, bytes], tmp_path: Path
) -> None:
    target, job_id, data = big_job
    with target.api() as remote:
        session = remote.session()
        identity = session.call(
            "file_identity", queue=remote.queue, job_id=job_id, path=b"data.bin"
        )
        assert identity[3] == SIZE
        seen: list[int] = []
        with open(tmp_path / "whole", "wb") as out:
            rawstream.download_to(session, identity, out, seen.append)
        assert (tmp_path / "whole").read_bytes() == data
        assert sum(seen) == SIZE
        replaced = [identity[0], identity[1], identity[2] + 1, identity[3]]
        with open(tmp_path / "other", "wb") as out, pytest.raises(
            rawstream.RawStreamFailed
        ) as failure:
            rawstream.download_to(session, replaced, out, seen.append)
        assert failure.value.received == 0
        assert "changed" in str(failure.value)
        assert (tmp_path / "other").read_bytes() == b""


def test_file_identity_keeps_the_download_rules(big_job: tuple[Target, str, bytes]) -> None:
    target, job_id, _ = big_job
    with target.api() as remote:
        session = remote.session()
        for path, message in ((b"../status.json", "leaves"), (b"", "not a file")):
            with pytest.raises(tej.InvalidInput, match=message):
                session.call("file_identity", queue=remote.queue, job_id=job_id, path=path)
