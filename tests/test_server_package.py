"""The server's package: what a request loads, how it is laid out, and how supervisors show."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Target, target_fixture  # noqa: F401 - the `target` fixture

from tej import protocol
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
