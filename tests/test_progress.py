"""Transfer progress: the API reports every byte moved; the CLI's bar never gets in the way."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import Target

SIZE = 3 * (1 << 20) + 12345  # several chunks, and a ragged end


def test_upload_and_download_report_every_byte(target: Target, tmp_path: Path) -> None:
    payload = os.urandom(SIZE)
    job = target.make_job("progress", files={"data.bin": payload, "small.txt": "hello\n"})
    total_size = SIZE + len("hello\n") + len("#!/bin/sh\ntrue\n")
    sent: list[tuple[int, int]] = []
    received: list[tuple[int, int]] = []
    with target.api() as remote:
        job_id = remote.submit(str(job), progress=lambda done, total: sent.append((done, total)))
        local = tmp_path / "copy.bin"
        remote.download(job_id, "data.bin", str(local), lambda d, t: received.append((d, t)))
    assert sum(done for done, _ in sent) == total_size
    assert {total for _, total in sent} == {total_size}
    assert sum(done for done, _ in received) == SIZE
    assert {total for _, total in received} == {SIZE}
    assert local.read_bytes() == payload


def test_quiet_transfers_from_the_cli(target: Target, tmp_path: Path) -> None:
    job = target.make_job("quiet", files={"data.bin": os.urandom(SIZE)})
    job_id = target.submit(job, "--quiet")
    target.wait_for(job_id)
    done = target.cli(
        "download", "--id", job_id, "--quiet", f"data.bin:{tmp_path / 'out.bin'}", check=0
    )
    assert done.stderr == ""
    assert (tmp_path / "out.bin").stat().st_size == SIZE
