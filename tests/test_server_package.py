"""The server's package: what a request loads, how it is laid out, and how supervisors show."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Target

from tej import RemoteQueue, protocol
from tej.server.bundle import own_files

# What a read-only request must not load: uploads, the supervisor, notifications, forking.
HEAVY = (
    "tej.server.store",
    "tej.server.upload",
    "tej.server.manifest",
    "tej.server.supervisor",
    "tej.server.notify",
    "tej.server.launch",
    "tej.server.handlers.upload",
)

LOADED_BY_STATUS = """
import json, sys
from tej.server.service import Connection
connection = Connection()
replies = [
    connection.handle({"v": %d, "op": "hello", "args": {"protocol": %d}}),
    connection.handle({"v": %d, "op": "status", "args": {"queue": sys.argv[1], "job_id": "j"}}),
]
print(json.dumps({"replies": replies, "modules": sorted(sys.modules)}))
"""


@pytest.mark.timeout(60)
def test_status_loads_neither_the_store_nor_the_supervisor(tmp_path: Path) -> None:
    version = protocol.PROTOCOL_VERSION
    code = LOADED_BY_STATUS % (version, version, version)
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "queue")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    found = json.loads(done.stdout)
    assert found["replies"][0]["ok"], found["replies"]
    assert found["replies"][1]["error"] == protocol.ERR_JOB_NOT_FOUND, found["replies"]
    assert "tej.server.handlers.jobs" in found["modules"]  # it did load what status needs
    assert [name for name in HEAVY if name in found["modules"]] == []


def test_every_server_module_is_small_and_its_functions_short() -> None:
    for path, data in own_files().items():
        text = data.decode("utf-8")
        assert text.count("\n") <= 600, f"{path} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 70, f"{path}: {node.name} has {length} lines"


@pytest.mark.timeout(90)
def test_a_supervisor_shows_as_tej_supervisor_and_its_job_in_ps(target: Target) -> None:
    """Over ssh too: the loopback server's processes are this machine's."""
    job = target.make_job("titled", "#!/bin/sh\nsleep 30\n")
    job_id = target.submit(job, "--id", "titled-job")
    pid = target.wait_for(job_id, ("running",))["supervisor"]["pid"]
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert comm == "tej-supervisor"
        assert args[0] == b"tej-supervisor titled-job", args[:3]
    finally:
        target.cli("kill", "--id", job_id)


OLD_AGENT = Path(__file__).parent / "data" / "tej_agent_single_file.py"


@pytest.mark.timeout(60)
def test_a_job_left_to_the_single_file_agent_of_an_earlier_tej_still_starts(
    tmp_path: Path,
) -> None:
    """A queue used by this tej, with a job that an earlier tej's supervisor starts later
    (a Slurm job pending through an upgrade): its copy, one file, still runs it."""
    queue = tmp_path / "queue"
    job = tmp_path / "job"
    job.mkdir()
    (job / "start.sh").write_text("#!/bin/sh\necho started by the old copy\n")
    (job / "start.sh").chmod(0o755)
    with RemoteQueue("local", str(queue)) as remote:
        first = remote.submit(str(job), job_id="first")
        assert remote.wait(first).exit_code == 0
        # The job as the earlier tej left it: made, not yet started, its copy in agent/.
        shutil.copytree(queue / "jobs" / first, queue / "jobs" / "pending")
        for name in ("stdout", "stderr", "supervisor.log"):
            (queue / "jobs" / "pending" / name).unlink(missing_ok=True)
        metadata = json.loads((queue / "jobs" / first / "job.json").read_text())
        (queue / "jobs" / "pending" / "job.json").write_text(
            json.dumps(dict(metadata, id="pending"))
        )
        record = {"id": "pending", "state": "queued", "submitted_at": "2026-01-01T00:00:00.000000Z"}
        (queue / "jobs" / "pending" / "status.json").write_text(json.dumps(record))
        old = queue / "agent" / "tej_agent_0123456789abcdef.py"
        shutil.copy(OLD_AGENT, old)
        code = "import sys; sys.path.insert(0, sys.argv[1]); import %s as agent; " % old.stem
        code += "sys.exit(agent.main(sys.argv[2:]))"
        argv = [sys.executable, "-c", code, str(old.parent), "supervise"]
        done = subprocess.run(
            [*argv, str(queue / "jobs" / "pending")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        status = remote.status("pending")
        assert (status.state.value, status.exit_code) == ("finished", 0)
        assert remote.status(first).exit_code == 0  # this tej's own jobs are untouched
    assert (queue / "jobs" / "pending" / "stdout").read_text() == "started by the old copy\n"


STARTS_THE_FORK_SERVER = """
import json, sys, threading, time
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # threads, as under execnet
from tej import transfer
from tej.server import launch
from tej.server.service import Connection
part = list(transfer.scan_tree(sys.argv[2]))[-1]
args = {"queue": sys.argv[1], "token": "0123456789abcdef", "manifest": part.manifest}
reply = Connection().handle({"v": %d, "op": "upload_begin", "args": args})
servers = list(launch.FORK_SERVERS.values())
print(json.dumps({"reply": repr(reply), "argv": [s.proc.args for s in servers if s.alive()]}))
"""


@pytest.mark.timeout(60)
def test_an_upload_starts_the_fork_server_before_its_submit(tmp_path: Path) -> None:
    """So that its interpreter (python -S, as the agent) starts while the upload is laid out."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "start.sh").write_text("#!/bin/sh\nexit 0\n")
    code = STARTS_THE_FORK_SERVER % protocol.PROTOCOL_VERSION
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "queue"), str(job)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    found = json.loads(done.stdout)
    assert "'ok': True" in found["reply"] and "missing" in found["reply"], found
    assert len(found["argv"]) == 1, "one fork server, running, though nothing was submitted"
    argv = found["argv"][0]
    assert argv[1:3] == ["-S", "-c"] and "fork-server" in argv, argv
