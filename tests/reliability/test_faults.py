"""Faults injected into tej with real processes, over `local` and a real sshd; nothing is mocked.

Each test injects one fault, then checks that nothing is lost and that no state lies:

- test_client_killed_during_upload: SIGKILL to `tej submit` (or to its connection: the ssh
  client, or the local agent) while a 50 MB file is being uploaded.
- test_ctrl_c_during_upload: SIGINT to `tej submit` while it uploads.
- test_file_shrinks_during_upload: a file of the job is truncated while RemoteQueue.submit
  sends it (an error in the middle of a pipeline of requests).
- test_client_killed_right_after_submit: SIGKILL to `tej submit` as soon as it prints the id.
- test_api_client_killed_while_the_job_runs: SIGKILL to a Python program blocked in
  RemoteQueue.wait() while its job runs.
- test_client_killed_during_download: SIGKILL (or SIGINT) to `tej download` half-way through
  a 400 MB file.
- test_connection_lost_during_logs_follow: SIGKILL to `tej logs --follow` (or to its
  connection, or SIGINT to it) while the job runs.
- test_supervisor_killed: SIGKILL to a running job's supervisor.
- test_job_killed_by_someone_else: SIGKILL to the job's own process, not through tej.
- test_reboot: the boot id changes under a running job (TEJ_BOOT_ID_PATH, over `local`).
- test_pid_reuse: the pid recorded for a lost job belongs to another process (a wrong start
  time in status.json).
- test_disk_full: a submit fills the queue's disk (an 8 MB tmpfs, mounted when root).
- test_silent_server: a server that accepts TCP and never says a word.
- test_link_stops_answering: the server's sshd serving a session is frozen with SIGSTOP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
from helpers import (
    ELAPSED,
    USAGE,
    SilentServer,
    Target,
    assert_one_line_error,
    kill_processes_under,
    process_alive,
    read_pid,
    run_tej,
    tej_env,
    wait_until,
)
from sshd import SshServer, is_root

import tej

REPO = Path(__file__).resolve().parents[2]
BIG_UPLOAD = 50 * 1024 * 1024
BIG_DOWNLOAD = 400 * 1024 * 1024
STALE = 7 * 3600.0  # older than the agent's STALE_UPLOAD (6 h)
T = TypeVar("T")

WAIT_FOR_GO = "#!/bin/sh\necho start\nwhile [ ! -e go ]; do sleep 0.05; done\necho end\nexit %d\n"
SLEEPER = "#!/bin/sh\nsleep 300 &\necho $! > child.pid\nsleep 300\n"


# helpers


@pytest.fixture
def tgt(target: Target) -> Target:
    """The `target`, with the CLI importing tej from this work tree."""
    target.client_env["PYTHONPATH"] = str(REPO)
    return target


def start_cli(target: Target, command: str, *args: str) -> subprocess.Popen[bytes]:
    """Start the CLI in the background, its stdout and stderr piped."""
    return target.popen(command, *args, stdin=subprocess.DEVNULL, text=False)


def stop(process: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> tuple[str, str]:
    """Send signum to a process, wait for it; returns its output as text.

    A process still there 30 s later is killed, and the test fails.
    """
    if process.poll() is None:  # never signal a reaped pid: it may be someone else's now
        process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(
            f"still running 30 s after signal {signum}: {err.decode(errors='replace')}"
        ) from None
    return out.decode(errors="replace"), err.decode(errors="replace")


def read_lines(process: subprocess.Popen[bytes], count: int, timeout: float = 60) -> list[str]:
    """Read count lines from a running process's stdout, with a deadline."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while data.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {count} lines in {timeout} s: {data!r}"
            if selector.select(remaining):
                chunk = os.read(fd, 4096)
                assert chunk, f"the process ended after {data!r}"
                data += chunk
    return data.decode().splitlines()


def staged_bytes(staging: Path) -> int:
    """How many bytes the files under the queue's staging area hold."""
    total = 0
    for folder, _dirs, files in os.walk(staging):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def holders(root: Path) -> list[int]:
    """The pids that hold a file open under root (e.g. an agent still writing an upload)."""
    prefix = str(root) + "/"
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(prefix) for link in links):
            found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = proc_stat(int(entry.name))
        if stat is not None and int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as stream:
        return int(next(line for line in stream if line.startswith("Uid:")).split()[1])


def connection_process(client: subprocess.Popen[bytes]) -> int:
    """The CLI's connection: its `ssh` child, or the local agent (a python child)."""

    def find() -> int | None:
        names = {pid: proc_name(pid) for pid in children(client.pid)}
        kids = [pid for pid, name in names.items() if name == "ssh" or name.startswith("python")]
        return kids[0] if kids else None

    return wait_until(find, 10, "the CLI's connection process")


def list_json(target: Target) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(target.cli("list", "--json", check=0).stdout)
    return result


def status_json(target: Target, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(target.cli("status", "--id", job_id, "--json").stdout)
    return result


def status_line(target: Target, job_id: str) -> str:
    return target.cli("status", "--id", job_id, check=0).stdout


def status_record(target: Target, job_id: str) -> dict[str, Any]:
    """The raw status.json of a job, as written on the server."""
    record: dict[str, Any] = json.loads((target.job_dir(job_id) / "status.json").read_text())
    return record


def big_file(path: Path, size: int) -> None:
    """A file of size bytes of zeros (sparse: instant to make, whole to read)."""
    with open(path, "wb") as stream:
        stream.truncate(size)


def within(timeout: float, function: Callable[[], T]) -> T:
    """Run function in a thread; fail if it has not returned after timeout seconds."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", function()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still blocked after {timeout} s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    result: T = value
    return result


# the client dies during an upload


@pytest.mark.parametrize("victim", ["client", "connection"])
def test_client_killed_during_upload(tgt: Target, victim: str) -> None:
    """A half-finished upload never becomes a job; its staging area goes once it is stale."""
    tgt.submit(tgt.make_job("first"))  # the queue exists: only the upload is under test
    job = tgt.make_job("upload")
    big_file(job / "big.bin", BIG_UPLOAD)
    staging = tgt.server_path("staging")
    client = start_cli(tgt, "submit", str(job))
    doomed = client.pid if victim == "client" else connection_process(client)
    try:
        wait_until(lambda: staged_bytes(staging) > 0, 60, "the upload to start", interval=0.002)
        os.kill(doomed, signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        _out, err = stop(client)
    assert staged_bytes(staging) < BIG_UPLOAD, "the upload ended before the kill"
    assert "Traceback" not in err, err
    if victim == "connection":
        assert client.returncode == 5, (client.returncode, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    # The dying session's agent lets go of the staging area.
    wait_until(lambda: not holders(staging), 15, "the agent to stop writing the upload")

    jobs = list_json(tgt)
    assert [item["id"] for item in jobs] == [jobs[0]["id"]], jobs
    assert sorted(os.listdir(tgt.server_path("jobs"))) == [jobs[0]["id"]]
    leftovers = os.listdir(staging)
    if victim == "client":
        assert len(leftovers) == 1, leftovers
    else:
        # The client saw the connection drop and threw the upload away through a new one
        # (unless the old agent, still draining its requests, wrote a chunk after that).
        assert len(leftovers) <= 1, leftovers

    # A fresh leftover may be someone's upload in progress: the next submit keeps it...
    second = tgt.submit(tgt.make_job("second"))
    assert os.listdir(staging) == leftovers
    # ...and removes it once it is stale.
    old = time.time() - STALE
    for name in leftovers:
        os.utime(staging / name, (old, old))
    third = tgt.submit(tgt.make_job("third"))
    assert os.listdir(staging) == []
    assert {item["id"] for item in list_json(tgt)} == {jobs[0]["id"], second, third}
    assert tgt.wait_for(third)["state"] == "finished"


def test_ctrl_c_during_upload(tgt: Target) -> None:
    """Ctrl-C: exit 130 with one line, no job, and the upload is thrown away at once."""
    job = tgt.make_job("upload")
    big_file(job / "big.bin", BIG_UPLOAD)
    staging = tgt.server_path("staging")
    client = start_cli(tgt, "submit", str(job))
    try:
        wait_until(lambda: staged_bytes(staging) > 0, 60, "the upload to start", interval=0.002)
    finally:
        out, err = stop(client, signal.SIGINT)
    assert (client.returncode, err, out) == (130, "Error: interrupted\n", ""), (client, err, out)
    assert list_json(tgt) == []
    assert os.listdir(tgt.server_path("jobs")) == []
    wait_until(lambda: os.listdir(staging) == [], 10, "the staging area to be emptied")


def test_file_shrinks_during_upload(tgt: Target) -> None:
    """A file cut short while it is sent: a clear error, no job, and the session still works."""
    job = tgt.make_job("shrinking")
    big_file(job / "a.bin", BIG_UPLOAD)
    big_file(job / "z.bin", 8 * 1024 * 1024)
    staging = tgt.server_path("staging")
    with tgt.api() as remote:
        assert remote.list() == []

        def shrink() -> None:
            wait_until(lambda: staged_bytes(staging) > 0, 60, "the upload to start", interval=0.002)
            os.truncate(job / "z.bin", 0)

        shrinker = threading.Thread(target=shrink, daemon=True)
        shrinker.start()
        with pytest.raises(tej.InvalidInput, match="shrank"):
            remote.submit(str(job))
        shrinker.join(timeout=60)
        # The session is still in step: each call gets its own answer.
        assert remote.list() == []
        with pytest.raises(tej.JobNotFound):
            remote.status("nosuchjob")
        job_id = remote.submit(str(tgt.make_job("after")))
        assert remote.wait(job_id, timeout=30).state is tej.JobState.FINISHED
        assert [status.id for status in remote.list()] == [job_id]
    assert os.listdir(staging) == []


# the client dies after submitting


def test_client_killed_right_after_submit(tgt: Target) -> None:
    """SIGKILL once the id is printed: the job runs to its end and its exit code is recorded."""
    client = start_cli(tgt, "submit", str(tgt.make_job("quick", "#!/bin/sh\nsleep 1\nexit 3\n")))
    try:
        lines = read_lines(client, 2)
    finally:
        stop(client)
    assert lines[0] == "Job submitted as:", lines
    job_id = lines[1]
    assert tgt.wait_for(job_id)["state"] == "finished"
    assert re.fullmatch(
        rf"Job is finished \({ELAPSED}\) with exit code 3{USAGE}\n", status_line(tgt, job_id)
    )
    assert status_json(tgt, job_id)["exit_code"] == 3


API_CLIENT = """
import sys
from tej import RemoteQueue
destination, queue, ssh_config, directory = sys.argv[1:]
with RemoteQueue(destination, queue, ssh_config=ssh_config or None) as remote:
    job_id = remote.submit(directory)
    print(job_id, flush=True)
    remote.wait(job_id)
print("the wait returned", flush=True)
"""


def test_api_client_killed_while_the_job_runs(tgt: Target) -> None:
    """SIGKILL to a program blocked in RemoteQueue.wait(): the job's end is still recorded."""
    job = tgt.make_job("waited", WAIT_FOR_GO % 4)
    argv = [sys.executable, "-c", API_CLIENT, tgt.destination, tgt.queue]
    argv += [tgt.ssh_config or "", str(job)]
    client = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=tgt.client_env,
        cwd=str(tgt.client_dir),
    )
    try:
        job_id = read_lines(client, 1)[0]
        tgt.wait_for(job_id, ("running",))
        assert client.poll() is None, "the client stopped waiting"
    finally:
        out, err = stop(client)
    assert client.returncode == -signal.SIGKILL and "the wait returned" not in out, (out, err)
    assert status_json(tgt, job_id)["state"] == "running"
    tgt.work(job_id, "go").touch()
    assert tgt.wait_for(job_id)["state"] == "finished"
    assert re.fullmatch(
        rf"Job is finished \({ELAPSED}\) with exit code 4{USAGE}\n", status_line(tgt, job_id)
    )
    assert tgt.cli("logs", "--id", job_id, check=0).stdout == "start\nend\n"


# the client dies during a download


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_client_killed_during_download(tgt: Target, tmp_path: Path, signum: int) -> None:
    """SIGKILL or Ctrl-C half-way through a download: nothing at the destination."""
    script = f"#!/bin/sh\ntruncate -s {BIG_DOWNLOAD} big.bin\n"
    job_id = tgt.submit(tgt.make_job("maker", script))
    assert tgt.wait_for(job_id)["exit_code"] == 0
    folder = tmp_path / "downloads"
    folder.mkdir()
    destination = folder / "big.bin"

    def partial_bytes() -> int:
        return sum(path.stat().st_size for path in folder.glob(".tej-partial-*"))

    client = start_cli(tgt, "download", "--id", job_id, f"big.bin:{destination}")
    try:
        wait_until(partial_bytes, 60, "the download to start", interval=0.002)
        caught = partial_bytes()
    finally:
        out, err = stop(client, signum)
    assert caught < BIG_DOWNLOAD, "the download ended before the signal"
    assert not os.path.lexists(destination), "a partial download is at the destination"
    if signum == signal.SIGINT:
        assert (client.returncode, err, out) == (130, "Error: interrupted\n", ""), (client, err)
        assert os.listdir(folder) == [], "Ctrl-C left a partial file behind"
    else:
        assert client.returncode == -signal.SIGKILL

    tgt.cli("download", "--id", job_id, f"big.bin:{destination}", check=0)
    assert destination.stat().st_size == BIG_DOWNLOAD


# the client dies while following the logs


@pytest.mark.parametrize("victim", ["client", "connection", "ctrl-c"])
def test_connection_lost_during_logs_follow(tgt: Target, victim: str) -> None:
    """`tej logs --follow` dies (or loses its connection): the job's outcome is still recorded."""
    job_id = tgt.submit(tgt.make_job("followed", WAIT_FOR_GO % 5))
    client = start_cli(tgt, "logs", "--id", job_id, "--follow")
    try:
        assert read_lines(client, 1) == ["start"]
        if victim == "ctrl-c":
            os.kill(client.pid, signal.SIGINT)
        else:
            doomed = client.pid if victim == "client" else connection_process(client)
            os.kill(doomed, signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        _out, err = stop(client)
    if victim == "connection":
        assert client.returncode == 5, (client.returncode, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("Error: "), err
    elif victim == "ctrl-c":
        assert (client.returncode, err) == (130, "Error: interrupted\n"), (client, err)
    else:
        assert client.returncode == -signal.SIGKILL
    assert status_json(tgt, job_id)["state"] == "running"
    tgt.work(job_id, "go").touch()
    assert tgt.wait_for(job_id)["state"] == "finished"
    assert re.fullmatch(
        rf"Job is finished \({ELAPSED}\) with exit code 5{USAGE}\n", status_line(tgt, job_id)
    )
    assert tgt.cli("logs", "--id", job_id, "--follow", check=0).stdout == "start\nend\n"


# the supervisor or the job dies


def running_sleeper(target: Target) -> tuple[str, dict[str, Any], int]:
    """A running job (a sleep, with a background sleep): its id, its record, its child's pid."""
    job_id = target.submit(target.make_job("sleeper", SLEEPER))
    record = target.wait_for(job_id, ("running",))
    child = wait_until(lambda: read_pid(target.work(job_id, "child.pid")), message="child.pid")
    return job_id, record, child


def test_supervisor_killed(tgt: Target) -> None:
    """SIGKILL to the supervisor: `lost`, not running; kill ends every process; delete works."""
    job_id, record, child = running_sleeper(tgt)
    supervisor, main = record["supervisor"]["pid"], record["job"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not process_alive(supervisor), 10, "the supervisor to die")

    assert status_line(tgt, job_id) == "Job was lost (the job's supervisor died)\n"
    assert status_json(tgt, job_id)["state"] == "lost"
    assert [(item["id"], item["state"]) for item in list_json(tgt)] == [(job_id, "lost")]
    assert process_alive(main) and process_alive(child), "the job died with its supervisor"

    assert tgt.cli("kill", "--id", job_id, check=0).stdout == f"Job '{job_id}' killed\n"
    wait_until(lambda: not (process_alive(main) or process_alive(child)), 10, "the job to die")
    assert status_json(tgt, job_id)["state"] == "killed"
    tgt.cli("delete", "--id", job_id, check=0)
    assert list_json(tgt) == []
    assert not tgt.job_dir(job_id).exists()


def test_job_killed_by_someone_else(tgt: Target) -> None:
    """SIGKILL to the job, not by tej: the supervisor saw it, so `finished`, 137, SIGKILL."""
    job_id, record, child = running_sleeper(tgt)
    os.kill(record["job"]["pid"], signal.SIGKILL)
    assert tgt.wait_for(job_id)["state"] == "finished"
    status = status_json(tgt, job_id)
    assert (status["state"], status["exit_code"], status["signal"]) == ("finished", 137, "SIGKILL")
    assert re.fullmatch(
        rf"Job is finished \({ELAPSED}\) with exit code 137{USAGE}\n", status_line(tgt, job_id)
    )
    wait_until(lambda: not process_alive(child), 10, "the job's leftover child to be ended")


# the server reboots (a changed boot id)


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test leaves running on purpose; SIGKILLed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("target", ["local"], indirect=True)
def test_reboot(tgt: Target, tmp_path: Path, strays: list[int]) -> None:
    """After a "reboot", a job recorded as running is `lost`, and its pids are never signalled.

    The agent under `local` inherits the client's environment, and the supervisor the agent's,
    so TEJ_BOOT_ID_PATH makes them all read the boot id from a file the test controls.
    """
    boot = tmp_path / "boot_id"
    boot.write_text("11111111-2222-3333-4444-555555555555\n")
    tgt.client_env["TEJ_BOOT_ID_PATH"] = str(boot)
    job_id, record, child = running_sleeper(tgt)
    supervisor, main = record["supervisor"]["pid"], record["job"]["pid"]
    strays += [supervisor, main, child]
    assert record["supervisor"]["boot"] == "11111111-2222-3333-4444-555555555555"
    assert status_json(tgt, job_id)["state"] == "running"

    boot.write_text("99999999-2222-3333-4444-555555555555\n")
    status = status_json(tgt, job_id)
    assert status["state"] == "lost" and "restart" in status["reason"], status
    assert re.fullmatch(r"Job was lost \(.*restart.*\)\n", status_line(tgt, job_id))

    killed = json.loads(tgt.cli("kill", "--id", job_id, "--json", check=0).stdout)
    assert killed["killed"] is False, killed
    assert all(process_alive(pid) for pid in (supervisor, main, child)), "tej signalled them"
    tgt.cli("delete", "--id", job_id, check=0)
    assert list_json(tgt) == []
    assert not tgt.job_dir(job_id).exists()
    assert all(process_alive(pid) for pid in (supervisor, main, child)), "tej signalled them"


# a recorded pid now belongs to another process


def test_pid_reuse(tgt: Target, strays: list[int]) -> None:
    """A lost job whose recorded pid is now another process's: kill and delete spare it."""
    job_id, record, child = running_sleeper(tgt)
    supervisor, main = record["supervisor"]["pid"], record["job"]["pid"]
    os.kill(supervisor, signal.SIGKILL)
    for kill, pid in ((os.killpg, main), (os.kill, child)):
        with contextlib.suppress(ProcessLookupError):  # gone with its group, and reaped
            kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(map(process_alive, (supervisor, main, child))), 10, "the job to die")

    # Someone else's process, which tej could signal (same user), leading its own group.
    owner: dict[str, Any] = {}
    if tgt.kind == "ssh" and is_root():
        owner = {"user": tgt.server.uid, "group": tgt.server.gid}
    decoy = subprocess.Popen(["sleep", "120"], start_new_session=True, **owner)
    strays.append(decoy.pid)
    stat = proc_stat(decoy.pid)
    assert stat is not None
    start = int(stat[19])
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    forged = {"pid": decoy.pid, "start": start + 12345, "boot": boot}
    path = tgt.job_dir(job_id) / "status.json"
    owner_ids = os.stat(path)
    path.write_text(json.dumps(dict(record, state="running", supervisor=forged, job=forged)))
    os.chown(path, owner_ids.st_uid, owner_ids.st_gid)

    status = status_json(tgt, job_id)
    assert status["state"] == "lost", status
    killed = json.loads(tgt.cli("kill", "--id", job_id, "--json", check=0).stdout)
    assert killed["killed"] is False, killed
    assert decoy.poll() is None, "tej signalled a process that is not the job's"
    tgt.cli("delete", "--id", job_id, check=0)
    assert not tgt.job_dir(job_id).exists()
    assert decoy.poll() is None, "tej signalled a process that is not the job's"
    decoy.kill()
    decoy.wait()


# the server's disk fills up


@pytest.fixture
def small_disk(ssh_server: SshServer, server_tmp: str) -> Iterator[Path]:
    """An 8 MB tmpfs owned by the SSH user, mounted in its home (root only)."""
    if not is_root():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the disk-full test must run in CI, which runs as root")
        pytest.skip("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="disk-", dir=server_tmp))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        os.chown(mount_point, ssh_server.uid, ssh_server.gid)
        yield mount_point
    finally:
        kill_processes_under(str(mount_point))
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)
        mount_point.rmdir()


TICKER = (
    "#!/bin/sh\ni=0\nwhile [ ! -e stop ]; do echo tick $i; i=$((i+1)); sleep 0.05; done\n"
    "echo done\n"
)


@pytest.mark.ssh
@pytest.mark.parametrize("target", ["ssh"], indirect=True)
def test_disk_full(tgt: Target, small_disk: Path) -> None:
    """A submit that fills the disk fails clearly and leaves nothing; running jobs go on."""
    disk = dataclasses.replace(tgt, queue=str(small_disk / "queue"))
    running = disk.submit(disk.make_job("ticker", TICKER))
    disk.wait_for(running, ("running",))
    big = disk.make_job("big")
    big_file(big / "big.bin", 20 * 1024 * 1024)

    done = disk.cli("submit", str(big))
    message = assert_one_line_error(done)
    assert "space" in message.lower(), message
    assert [item["id"] for item in list_json(disk)] == [running]
    assert os.listdir(disk.server_path("staging")) == []

    def ticks() -> int:
        return disk.work(running, "..", "stdout").read_text().count("tick")

    after_failure = ticks()
    wait_until(lambda: ticks() > after_failure + 5, 10, "the running job to keep writing")
    assert status_json(disk, running)["state"] == "running"
    small = disk.submit(disk.make_job("small", "#!/bin/sh\necho small\n"))
    assert disk.wait_for(small)["exit_code"] == 0
    assert disk.cli("logs", "--id", small, check=0).stdout == "small\n"
    disk.work(running, "stop").touch()
    status = disk.wait_for(running)
    assert (status["state"], status["exit_code"]) == ("finished", 0), status
    assert disk.cli("logs", "--id", running, check=0).stdout.endswith("done\n")


# the connection hangs


@pytest.mark.ssh
@pytest.mark.parametrize("sharing", [[], ["--no-reuse"]], ids=["shared", "no-reuse"])
def test_silent_server(
    ssh_server: SshServer, silent_server: SilentServer, tmp_path: Path, sharing: list[str]
) -> None:
    """`tej status --connect-timeout 2` against a server that never answers: exit 5 in ~10 s."""
    destination = f"ssh://{ssh_server.user}@127.0.0.1:{silent_server.port}"
    args = ["status", destination, "--id", "x"]
    args += ["--ssh-config", ssh_server.config_path, "--connect-timeout", "2", *sharing]
    started = time.monotonic()
    done = run_tej(*args, env=tej_env(HOME=str(tmp_path)), timeout=60)
    elapsed = time.monotonic() - started
    assert silent_server.connections, "ssh never reached the silent server"
    assert elapsed < 10, f"took {elapsed:.1f} s with --connect-timeout 2"
    assert done.returncode == 5, done
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done
    assert done.stderr.startswith("Error: ") and destination in done.stderr, done.stderr


def sshd_serving(pid: int) -> int:
    """The sshd process that carries the session of a process on the server (an ancestor)."""
    current = pid
    while current > 1:
        stat = proc_stat(current)
        assert stat is not None, f"pid {current} vanished"
        current = int(stat[1])
        if proc_name(current) == "sshd":
            return current
    raise AssertionError(f"no sshd above pid {pid}")


@pytest.mark.ssh
def test_link_stops_answering(ssh_server: SshServer, server_tmp: str) -> None:
    """The server's side of a session freezes: the next call fails within ~15 s."""
    remote = tej.RemoteQueue(
        ssh_server.alias,
        f"{server_tmp}/queue",
        ssh_config=ssh_server.config_path,
        keepalive_interval=1,
        reuse_connection=False,
    )
    frozen = None
    try:
        assert remote.list() == []
        frozen = sshd_serving(remote.session().server["pid"])
        assert proc_uid(frozen) == ssh_server.uid, "not the SSH user's own sshd process"
        os.kill(frozen, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(tej.ConnectionFailed) as failure:
            within(30, remote.list)
        elapsed = time.monotonic() - started
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        remote.close()
    assert elapsed < 15, f"took {elapsed:.1f} s with keepalive_interval=1"
    assert "\n" not in str(failure.value)
