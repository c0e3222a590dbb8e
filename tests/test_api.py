"""End to end: the Python API (`tej.RemoteQueue`), over `local` and over SSH."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import (
    Target,
    kill_processes_under,
    process_alive,
    read_pid,
    wait_until,
)
from sshd import SshServer

import tej
from tej import JobState, JobStatus, KillResult, RemoteQueue, SetupResult

SLEEPER = "#!/bin/sh\nsleep 30\n"
GRANDPARENT = "#!/bin/sh\nsleep 300 &\necho $! > child.pid\nwait\n"


def wait_for_state(remote: RemoteQueue, job_id: str, *states: JobState) -> JobStatus:
    """Poll a job's status through an open RemoteQueue until it is in one of states."""

    def reached() -> JobStatus | None:
        status = remote.status(job_id)
        return status if status.state in states else None

    return wait_until(reached, message=f"job {job_id} to be {states}")


def test_one_session_does_everything(target: Target, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    job = target.make_job(
        "apijob",
        "#!/bin/sh\necho out > out.txt\nmkdir -p res/deep\necho r > res/deep/r.txt\nexit 6\n",
        files={"big.bin": data, "res/mode.sh": "#!/bin/sh\n"},
    )
    (job / "res" / "mode.sh").chmod(0o750)
    sleeper = target.make_job("sleeper", GRANDPARENT)
    with target.api() as remote:
        session = remote.session()
        job_id = remote.submit(str(job), job_id="api_job")
        assert job_id == "api_job"
        first = remote.status(job_id)
        assert isinstance(first, JobStatus) and first.id == job_id
        final = wait_for_state(remote, job_id, JobState.FINISHED)
        assert final.exit_code == 6
        assert [status.id for status in remote.list()] == [job_id]

        chunks = list(remote.read(job_id, "big.bin"))
        assert all(isinstance(chunk, bytes) for chunk in chunks)
        assert len(chunks) >= 2
        assert b"".join(chunks) == data
        assert b"".join(remote.read(job_id, "out.txt")) == b"out\n"

        local = tmp_path / "res-copy"
        assert remote.download(job_id, "res", str(local)) == str(local)
        assert (local / "deep" / "r.txt").read_text() == "r\n"
        assert stat.S_IMODE((local / "mode.sh").stat().st_mode) == 0o750
        remote.download(job_id, "big.bin", str(tmp_path / "big.bin"))
        assert (tmp_path / "big.bin").read_bytes() == data
        remote.download(job_id, ".", str(tmp_path / "everything"))
        assert (tmp_path / "everything" / "out.txt").read_text() == "out\n"

        running = remote.submit(str(sleeper))
        assert running.startswith("sleeper_")
        assert remote.status(running).state in (JobState.STARTING, JobState.RUNNING)
        wait_for_state(remote, running, JobState.RUNNING)
        child = wait_until(lambda: read_pid(target.work(running, "child.pid")))
        killed = remote.kill(running)
        assert isinstance(killed, KillResult)
        assert killed.killed is True
        assert killed.status.state is JobState.KILLED
        wait_until(lambda: not process_alive(child), timeout=5, message="the grandchild to die")
        again = remote.kill(running)
        assert (again.killed, again.status.state) == (False, JobState.KILLED)
        assert remote.kill(job_id).killed is False

        assert [status.id for status in remote.list()] == [job_id, running]
        remote.delete(job_id)
        remote.delete(running)
        assert remote.list() == []
        assert not target.job_dir(job_id).exists()
        assert remote.session() is session


def test_status_is_a_frozen_dataclass(target: Target) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    with target.api() as remote:
        job_id = remote.submit(str(target.make_job("frozen", "#!/bin/sh\nsleep 1\nexit 9\n")))
        status = wait_for_state(remote, job_id, JobState.FINISHED)
    assert dataclasses.is_dataclass(status)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.state = JobState.RUNNING  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.exit_code = 0  # type: ignore[misc]
    assert (status.id, status.state, status.exit_code) == (job_id, JobState.FINISHED, 9)
    assert not status.state.is_active
    assert status.started_at is not None and status.ended_at is not None
    assert status.started_at.utcoffset() == timedelta(0)
    after = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert before <= status.started_at <= status.ended_at <= after
    assert status.elapsed is not None and 1.0 <= status.elapsed < 20.0
    document = status.to_json()
    assert document["state"] == "finished" and document["ended_at"].endswith("Z")


def test_the_errors(target: Target, tmp_path: Path) -> None:
    for error in (tej.JobNotFound, tej.JobExists, tej.JobStillRunning, tej.InvalidInput):
        assert issubclass(error, tej.TejError)
    job = target.make_job("err", SLEEPER, files={"sub/file.txt": "x\n"})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with target.api() as remote:
        job_id = remote.submit(str(job), job_id="taken")
        wait_for_state(remote, job_id, JobState.RUNNING)

        def still_usable() -> None:
            assert remote.status(job_id).state is JobState.RUNNING

        with pytest.raises(tej.JobNotFound):
            remote.status("ghost")
        still_usable()
        with pytest.raises(tej.JobNotFound):
            remote.kill("ghost")
        with pytest.raises(tej.JobNotFound):
            remote.delete("ghost")
        with pytest.raises(tej.JobNotFound):
            remote.download("ghost", "sub/file.txt", str(downloads / "x"))
        with pytest.raises(tej.JobNotFound):
            list(remote.read("ghost", "sub/file.txt"))
        still_usable()
        with pytest.raises(tej.JobExists):
            remote.submit(str(job), job_id="taken")
        still_usable()
        with pytest.raises(tej.JobStillRunning) as running:
            remote.delete(job_id)
        assert "tej kill" in str(running.value)
        still_usable()
        for bad_id in ("..", "a/b", "a b", "$(x)", "x" * 129):
            with pytest.raises(tej.InvalidInput):
                remote.submit(str(job), job_id=bad_id)
            with pytest.raises(tej.InvalidInput):
                remote.status(bad_id)
        with pytest.raises(tej.InvalidInput):
            remote.submit(str(tmp_path / "missing"))
        with pytest.raises(tej.InvalidInput):
            remote.submit(str(job), script="no-such-script.sh")
        for escape in ("../job.json", "/etc/passwd", "sub/../../status.json"):
            with pytest.raises(tej.InvalidInput):
                remote.download(job_id, escape, str(downloads / "stolen"))
            with pytest.raises(tej.InvalidInput):
                list(remote.read(job_id, escape))
        with pytest.raises(tej.InvalidInput):
            remote.download(job_id, "sub/missing.txt", str(downloads / "missing.txt"))
        with pytest.raises(tej.InvalidInput):
            list(remote.read(job_id, "sub"))
        still_usable()
        assert [status.id for status in remote.list()] == [job_id]
        remote.delete(job_id, force=True)
        assert remote.list() == []
    assert os.listdir(downloads) == []


def test_script_arguments(target: Target) -> None:
    script = '#!/bin/sh\nprintf "%s|" "$@" > args.txt\n'
    with target.api() as remote:
        job_id = remote.submit(str(target.make_job("args", script)), args=["a b", "", "$HOME"])
        wait_for_state(remote, job_id, JobState.FINISHED)
        assert b"".join(remote.read(job_id, "args.txt")) == b"a b||$HOME|"


def test_closing_the_session_leaves_the_job_running(target: Target) -> None:
    remote = target.api()
    job_id = remote.submit(str(target.make_job("detached", "#!/bin/sh\nsleep 2\nexit 3\n")))
    remote.close()
    remote.close()
    with target.api() as other:
        wait_for_state(other, job_id, JobState.RUNNING)
        final = wait_for_state(other, job_id, JobState.FINISHED)
    assert final.exit_code == 3
    # A closed RemoteQueue connects again on its next call.
    assert remote.status(job_id).exit_code == 3
    remote.close()


def test_setup(target: Target) -> None:
    link = os.path.join(os.path.dirname(target.queue), "api-link")
    with target.api() as remote:
        with pytest.raises(tej.InvalidInput):
            remote.setup(runner="nope")
        result = remote.setup(links=[link])
        assert isinstance(result, SetupResult)
        batch_systems = ("sbatch",) if shutil.which("sbatch") else ()
        expected = SetupResult(
            os.path.abspath(target.queue), True, "default", (link,), batch_systems
        )
        assert result == expected
        assert remote.setup().unchanged is True
        with pytest.raises(tej.QueueError):
            remote.setup(runner="queue")
        assert remote.setup(force=True).created is False
    with target.api(queue=link) as linked:
        job_id = linked.submit(str(target.make_job()))
    assert target.job_dir(job_id).is_dir()


def test_default_link(default_link_home: Target) -> None:
    target = default_link_home
    with target.api() as remote:
        result = remote.setup(default_link=True)
    assert result.links == (os.path.join(target.home, ".tej"),)
    with RemoteQueue(target.destination, ssh_config=target.ssh_config) as default:
        job_id = default.submit(str(target.make_job()))
        assert [status.id for status in default.list()] == [job_id]
    assert target.job_dir(job_id).is_dir()


def test_a_refused_submit_leaves_nothing_behind(target: Target) -> None:
    with target.api() as remote:
        remote.submit(str(target.make_job("one")), job_id="once")
        with pytest.raises(tej.JobExists):
            remote.submit(
                str(target.make_job("two", files={"big": os.urandom(1 << 20)})), job_id="once"
            )
        broken = target.make_job("broken", files={"sub/run.sh": "#!/bin/sh\n"})
        with pytest.raises(tej.InvalidInput):
            remote.submit(str(broken), script="sub")
        assert [status.id for status in remote.list()] == ["once"]
    assert os.listdir(target.server_path("staging")) == []
    assert os.listdir(target.server_path("jobs")) == ["once"]
    assert not target.work("once", "big").exists()


def test_a_missing_server_python(target: Target) -> None:
    remote = RemoteQueue(
        target.destination,
        target.queue,
        ssh_config=target.ssh_config,
        python="/nonexistent/python3",
    )
    with pytest.raises(tej.ConnectionFailed) as failure, remote:
        pass
    assert "/nonexistent/python3" in str(failure.value)
    assert isinstance(failure.value, tej.TejError)


def test_invalid_destination() -> None:
    for text in ("bad host", "-oProxyCommand=x", "ssh://a:b@host", "ssh://host:99999"):
        with pytest.raises(tej.InvalidInput):
            RemoteQueue(text, "/nonexistent")


@pytest.mark.ssh
def test_ssh_url_destination(ssh_server: SshServer, server_tmp: str, tmp_path: Path) -> None:
    queue = os.path.join(server_tmp, "queue")
    job = tmp_path / "urljob"
    job.mkdir()
    (job / "start.sh").write_text("#!/bin/sh\nid -un > whoami.txt\n")
    try:
        with RemoteQueue(ssh_server.url, queue, ssh_config=ssh_server.config_path) as remote:
            job_id = remote.submit(str(job))
            wait_for_state(remote, job_id, JobState.FINISHED)
            assert b"".join(remote.read(job_id, "whoami.txt")) == f"{ssh_server.user}\n".encode()
        assert os.path.isdir(os.path.join(queue, "jobs", job_id))
        assert os.stat(os.path.join(queue, "jobs", job_id)).st_uid == ssh_server.uid
    finally:
        kill_processes_under(queue)


@pytest.mark.ssh
def test_unreachable_ssh_server(ssh_server: SshServer) -> None:
    remote = RemoteQueue(
        f"ssh://{ssh_server.user}@127.0.0.1:1", "/tmp/x", ssh_config=ssh_server.config_path
    )
    with pytest.raises(tej.ConnectionFailed) as failure, remote:
        pass
    assert "127.0.0.1" in str(failure.value)
    assert isinstance(failure.value, tej.TejError)


def test_a_status_built_from_the_agent_has_every_field() -> None:
    """from_agent fills the frozen dataclass directly: no field may be left out."""
    from tej.api import JobStatus

    status = JobStatus.from_agent({"id": "a", "state": "finished"})
    assert set(vars(status)) == {field.name for field in dataclasses.fields(JobStatus)}
    assert status == JobStatus(id="a", state=tej.JobState.FINISHED)
