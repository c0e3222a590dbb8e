"""tej.process starts the agent's local process (ssh, or Python) with posix_spawn."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import wait_until

from tej.process import Process

pytestmark = pytest.mark.timeout(60)


def spawn(*argv: str) -> tuple[Process, tempfile._TemporaryFileWrapper[bytes]]:
    stderr = tempfile.NamedTemporaryFile()  # noqa: SIM115 - closed by the tests
    return Process(list(argv), stderr.file), stderr  # type: ignore[arg-type]


def test_pipes_carry_stdin_to_stdout_and_stderr_goes_to_the_file() -> None:
    process, stderr = spawn("sh", "-c", "cat; echo oops >&2; exit 3")
    process.stdin.write(b"hello\n")
    process.stdin.close()
    assert process.stdout.read() == b"hello\n"
    assert process.wait() == 3
    assert process.poll() == 3
    assert Path(stderr.name).read_bytes() == b"oops\n"
    process.stdout.close()


def test_wait_with_a_timeout_returns_none_while_it_runs_and_kill_ends_it() -> None:
    process, _ = spawn("sleep", "30")
    started = time.monotonic()
    assert process.wait(timeout=0.2) is None
    assert time.monotonic() - started >= 0.2
    process.kill()
    assert process.wait(timeout=10) == -signal.SIGKILL
    process.kill()  # ended already: nothing happens


def test_a_missing_program_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        spawn("tej-no-such-program-here")


def test_the_child_has_its_own_session() -> None:
    process, _ = spawn(sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid())")
    assert process.stdout.read().split() == [b"True"]
    assert process.wait(timeout=30) == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_the_child_does_not_ignore_sigpipe_as_python_does() -> None:
    process, _ = spawn("sh", "-c", "grep SigIgn /proc/self/status")
    ignored = int(process.stdout.read().split()[1], 16)
    assert process.wait(timeout=30) == 0
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_the_child_gets_no_other_descriptor() -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        process, _ = spawn("sh", "-c", "ls /proc/self/fd || ls /dev/fd")
        fds = sorted(int(name) for name in process.stdout.read().split())
        assert process.wait(timeout=30) == 0
    finally:
        os.close(read_end)
        os.close(write_end)
    assert fds[:3] == [0, 1, 2]
    assert len(fds) <= 4  # and the folder ls reads


@pytest.mark.parametrize("closed", ["<&-", ">&-", "<&- >&-"])
def test_a_parent_without_stdin_or_stdout_still_wires_the_child_right(
    closed: str, tmp_path: Path
) -> None:
    """Descriptors 0-2 are free in such a parent: the pipes and file land there."""
    report = tmp_path / "report"
    code = (
        "import sys, tempfile\n"
        "from tej.process import Process\n"
        "err = tempfile.TemporaryFile()\n"
        "p = Process(['sh', '-c', 'echo oops >&2; cat'], err)\n"
        "p.stdin.write(b'data'); p.stdin.close()\n"
        "out = p.stdout.read(); code = p.wait(timeout=30)\n"
        "err.seek(0)\n"
        f"open({str(report)!r}, 'w').write(repr((out, err.read(), code)))\n"
    )
    done = subprocess.run(
        ["sh", "-c", f'exec {closed} "$0" -c "$1"', sys.executable, code],
        capture_output=closed == "<&-",
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert report.read_text() == repr((b"data", b"oops\n", 0))


def test_a_dropped_process_is_reaped_once_it_has_ended() -> None:
    process, _ = spawn("true")
    pid = process.pid
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z")
    del process  # running or not, nobody waits for it now
    gc.collect()
    spawn("true")[0].wait(timeout=30)  # starting another reaps it
    assert not Path(f"/proc/{pid}").exists() or "Z" not in Path(f"/proc/{pid}/stat").read_text()
