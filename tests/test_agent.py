"""Fast tests of the server-side agent, driven directly (no ssh, no execnet).

Jobs are real processes started by real supervisors; every wait polls with a deadline.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar, Union

import pytest
from helpers import folder_manifest, index_problems, read_record, wait_until

import tej.bootstrap
from tej import protocol, transfer
from tej.server import errors, files, launch, layout, listing, processes, records, store
from tej.server.agentcopy import AgentCopy, queue_copy
from tej.server.bundle import own_files, own_name
from tej.server.index import LIST_FIELDS, write_status
from tej.server.queue import open_queue
from tej.server.service import Connection

T = TypeVar("T")
DEADLINE = 15.0
PR_SET_CHILD_SUBREAPER = 36


class F(NamedTuple):
    """A file of a job directory to upload."""

    data: bytes
    mode: int = 0o644


class D(NamedTuple):
    """A folder of a job directory to upload."""

    mode: int = 0o755


class L(NamedTuple):
    """A symbolic link of a job directory to upload."""

    target: str


Entry = Union[F, D, L]


def script(body: str, mode: int = 0o755, shebang: str = "#!/bin/sh\n") -> dict[str, Entry]:
    """A job directory holding only start.sh."""
    return {"start.sh": F((shebang + body).encode(), mode)}


def entries_of(tree: dict[str, Entry]) -> list[transfer.Entry]:
    """The entries the client would scan and hash for a tree."""
    entries = []
    for path, entry in tree.items():
        if isinstance(entry, F):
            digest = hashlib.sha256(entry.data).hexdigest() if entry.data else ""
            entries.append(
                transfer.Entry(path.encode(), "f", entry.mode, len(entry.data), digest=digest)
            )
        elif isinstance(entry, D):
            entries.append(transfer.Entry(path.encode(), "d", entry.mode))
        else:
            entries.append(transfer.Entry(path.encode(), "l", 0o777, target=entry.target.encode()))
    return entries


def manifest_of(tree: dict[str, Entry]) -> dict[str, Any]:
    """The manifest the client would send for a tree."""
    return transfer.encode_manifest(entries_of(tree))


def wait_for(predicate: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def group_gone(pgid: int) -> bool:
    """Whether no process (zombies included) is left in a process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def process_gone(pid: int) -> bool:
    """Whether a process no longer exists at all (reaped)."""
    return not os.path.exists(f"/proc/{pid}")


def parent_pid(pid: int) -> int | None:
    """The parent of a live process, from /proc; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(text.rsplit(b")", 1)[1].split()[1])


def mode_of(path: Path) -> int:
    """The permission bits of a path (not following symlinks)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


class Harness:
    """An Agent after its handshake, with one default queue in a temporary directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.queue = str(tmp_path / "queue")
        self.agent = Connection()
        self.ok("hello", protocol=protocol.PROTOCOL_VERSION)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; the queue defaults to the harness's, a manifest to an empty one."""
        if op != "hello":
            args.setdefault("queue", self.queue)
        if op == "upload_begin":
            args.setdefault("manifest", manifest_of({}))
        reply = self.agent.handle({"v": protocol.PROTOCOL_VERSION, "op": op, "args": args})
        assert isinstance(reply, dict)
        return reply

    def ok(self, op: str, **args: Any) -> Any:
        """Send a request that must succeed; return its result."""
        reply = self.call(op, **args)
        assert reply["ok"], reply
        return reply["result"]

    def jobs_listed(self, queue: str | None = None) -> list[dict[str, Any]]:
        """The `list` reply, as one dict per job."""
        args = {"queue": queue} if queue else {}
        reply = self.ok("list", **args)
        assert list(reply["fields"]) == list(LIST_FIELDS)
        rows = json.loads(reply["rows"])
        for batch in range(1, reply["batches"]):
            more = self.ok("list_more", cursor=reply["cursor"], batch=batch, **args)
            rows += json.loads(more["rows"])
        assert len(rows) == reply["count"]
        return [dict(zip(reply["fields"], row)) for row in rows]

    def fail(self, error: str, op: str, **args: Any) -> str:
        """Send a request that must fail with the given error type; return its message."""
        reply = self.call(op, **args)
        assert not reply["ok"] and reply["error"] == error, reply
        return str(reply["message"])

    def begin(
        self,
        tree: dict[str, Entry],
        queue: str | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start an upload of a tree; the reply ({"token", "missing"} if it succeeded)."""
        manifest = manifest_of(tree) if manifest is None else manifest
        return self.call("upload_begin", queue=queue or self.queue, manifest=manifest)

    def send(
        self,
        tree: dict[str, Entry],
        result: dict[str, Any],
        queue: str | None = None,
        data: dict[str, bytes] | None = None,
    ) -> int:
        """Send what upload_begin asked for (data: what to send instead, per path); bytes sent."""
        files = list(tree.items())
        sent = 0
        for index, offset in json.loads(result["missing"]):
            path, entry = files[index]
            assert isinstance(entry, F)
            payload = (data or {}).get(path, entry.data)[offset:]
            if payload:
                chunks = [[index, offset, payload]]
                self.ok(
                    "upload_data", queue=queue or self.queue, token=result["token"], chunks=chunks
                )
                sent += len(payload)
        return sent

    def upload(
        self, tree: dict[str, Entry], queue: str | None = None, data: dict[str, bytes] | None = None
    ) -> str:
        """Start an upload of a tree and send what the store lacks; returns the upload token."""
        reply = self.begin(tree, queue)
        assert reply["ok"], reply
        self.send(tree, reply["result"], queue, data)
        return str(reply["result"]["token"])

    def submit_reply(
        self,
        tree: dict[str, Entry],
        queue: str | None = None,
        manifest: dict[str, Any] | None = None,
        token: str | None = None,
        **request: Any,
    ) -> dict[str, Any]:
        """Upload and submit a tree, installing the agent if asked; returns the reply."""
        queue = queue or self.queue
        if token is None:
            begun = self.begin(tree, queue, manifest)
            if not begun["ok"]:
                return begun
            self.send(tree, begun["result"], queue)
            token = begun["result"]["token"]
        request.setdefault("id_name", "job")
        request.setdefault("job", {"script": "start.sh", "args": []})
        return self.call("submit", queue=queue, token=token, **request)

    def submit(self, tree: dict[str, Entry], **request: Any) -> str:
        """Upload and submit a tree that must be accepted; returns the job id."""
        reply = self.submit_reply(tree, **request)
        assert reply["ok"], reply
        return str(reply["result"])

    def run(self, tree: dict[str, Entry], **request: Any) -> dict[str, Any]:
        """Submit a job and wait for its end; returns its final status."""
        return self.wait_end(self.submit(tree, **request), request.get("queue"))

    def status(self, job_id: str, queue: str | None = None) -> dict[str, Any]:
        """The job's public status."""
        return dict(self.ok("status", queue=queue or self.queue, job_id=job_id))

    def wait_running(self, job_id: str) -> dict[str, Any]:
        """Poll until the job runs (submit answers while it starts); returns its raw record."""
        return wait_for(
            lambda: (r := self.record(job_id))["state"] == protocol.STATE_RUNNING and r,
            f"job {job_id} to run",
        )

    def wait_end(self, job_id: str, queue: str | None = None) -> dict[str, Any]:
        """Poll the job's status until it is in an end state."""
        return wait_for(
            lambda: (s := self.status(job_id, queue))["state"] in protocol.END_STATES and s,
            f"job {job_id} to end",
        )

    def job_dir(self, job_id: str, queue: str | None = None) -> Path:
        """The job's directory in the queue."""
        return Path(queue or self.queue) / layout.JOBS_DIR / job_id

    def record(self, job_id: str) -> dict[str, Any]:
        """The job's raw status record (status.json, or job.json's stand-in before it)."""
        return read_record(self.job_dir(job_id))

    def jobs(self, queue: str | None = None) -> list[str]:
        """The names in the queue's jobs folder."""
        return sorted(os.listdir(Path(queue or self.queue) / layout.JOBS_DIR))

    def starting(self) -> bool:
        """Whether a job under tmp is still starting (its supervisor has not recorded it yet)."""
        for path in self.tmp.rglob(layout.STATUS_FILE):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("state") == protocol.STATE_STARTING:
                    return True
        return False

    def cleanup(self) -> None:
        """Kill whatever job is still alive under tmp, and wait for the supervisors."""
        supervisors = []
        deadline = time.monotonic() + DEADLINE
        while self.starting() and time.monotonic() < deadline:  # forked: let them record
            time.sleep(0.02)
        for path in self.tmp.rglob(layout.STATUS_FILE):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                identity = record.get("job")
                if processes.is_same_process(identity):
                    processes.signal_group(identity["pid"], signal.SIGKILL)
                supervisors.append(record.get("supervisor"))
        deadline = time.monotonic() + DEADLINE
        alive = processes.is_same_process
        while any(alive(s) for s in supervisors) and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """A fresh agent with a queue path under tmp_path (not created yet)."""
    h = Harness(tmp_path)
    yield h
    h.cleanup()


# -- the envelope ------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        "hello",
        None,
        ["list"],
        {"op": "list", "args": {}},
        {"v": protocol.PROTOCOL_VERSION + 1, "op": "list", "args": {}},
        {"v": "1", "op": "list", "args": {}},
        {"v": protocol.PROTOCOL_VERSION, "op": "frobnicate", "args": {}},
        {"v": protocol.PROTOCOL_VERSION, "args": {}},
        {"v": protocol.PROTOCOL_VERSION, "op": "list", "args": ["/tmp/q"]},
        {"v": protocol.PROTOCOL_VERSION, "op": "list", "args": None},
        {"v": protocol.PROTOCOL_VERSION, "op": "list", "args": {1: "/tmp/q"}},
        {"v": protocol.PROTOCOL_VERSION, "op": "list", "args": {"queue": "/q", "bogus": 1}},
        {"v": protocol.PROTOCOL_VERSION, "op": "status", "args": {"queue": "/q"}},
        {"v": protocol.PROTOCOL_VERSION, "op": "hello", "args": {"protocol": 1}},
    ],
)
def test_malformed_requests_get_bad_request_and_agent_keeps_serving(
    harness: Harness, request_: Any
) -> None:
    reply = harness.agent.handle(request_)
    assert reply["ok"] is False
    assert reply["error"] == protocol.ERR_BAD_REQUEST
    assert isinstance(reply["message"], str) and reply["message"]
    assert harness.jobs_listed() == []


def test_hello_describes_the_server(harness: Harness) -> None:
    info = harness.ok("hello", protocol=protocol.PROTOCOL_VERSION)
    assert info["protocol"] == protocol.PROTOCOL_VERSION
    assert info["pid"] == os.getpid()
    assert info["python"] == "%d.%d.%d" % sys.version_info[:3]


@pytest.mark.timeout(30)
def test_a_job_deleted_while_it_is_read_is_not_reported_lost(tmp_path: Path) -> None:
    """A reader that saw a job running, then found its supervisor gone, reads its record
    again; a job deleted meanwhile (it ended) is not lost: it is as last seen."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    supervisor = {"pid": ended.pid, "start": 1, "boot": None}
    seen = {"state": "running", "supervisor": supervisor, "submitted_at": "2026-01-01T00:00:00Z"}
    gone = tmp_path / "jobs" / "deleted"
    assert records.supervised_record(str(gone), dict(seen))["state"] == "running"
    kept = tmp_path / "jobs" / "kept"
    kept.mkdir(parents=True)
    assert records.supervised_record(str(kept), dict(seen))["state"] == "lost"


def test_the_agent_needs_no_install_step(tmp_path: Path) -> None:
    """The agent copies itself: there is no install_agent request, and no hello is needed."""
    fresh = Connection()
    request = {"queue": str(tmp_path / "q"), "source": "print('not tej')"}
    reply = fresh.handle({"v": protocol.PROTOCOL_VERSION, "op": "install_agent", "args": request})
    assert reply["error"] == protocol.ERR_BAD_REQUEST
    assert "install_agent" in reply["message"]
    assert not os.path.lexists(tmp_path / "q")


# -- job identifiers -----------------------------------------------------------

VALID_IDS = ["a", "Job_1", "A-z_0.9+=@%:,", "x" * protocol.MAX_ID_LENGTH, "...", "-n", ".x"]
INVALID_IDS: list[Any] = [
    "",
    ".",
    "..",
    "a/b",
    "/abs",
    "a b",
    "a\nb",
    "a;b",
    "$HOME",
    "é",
    "x" * (protocol.MAX_ID_LENGTH + 1),
    5,
    ["a"],
    b"abc",
]


@pytest.mark.parametrize("job_id", VALID_IDS)
def test_valid_job_ids_are_accepted(harness: Harness, job_id: str) -> None:
    assert harness.submit(script("true\n"), job_id=job_id) == job_id
    assert harness.jobs() == [job_id]
    assert harness.wait_end(job_id)["id"] == job_id
    assert [job["id"] for job in harness.jobs_listed()] == [job_id]


@pytest.mark.parametrize("job_id", INVALID_IDS)
def test_invalid_job_ids_are_refused_by_submit(harness: Harness, job_id: Any) -> None:
    reply = harness.submit_reply(script("true\n"), job_id=job_id)
    assert (reply["ok"], reply.get("error")) == (False, protocol.ERR_INVALID)
    assert harness.jobs() == []


@pytest.mark.parametrize("job_id", INVALID_IDS)
@pytest.mark.parametrize("op", ["status", "kill", "delete"])
def test_invalid_job_ids_are_refused_by_job_operations(
    harness: Harness, op: str, job_id: Any
) -> None:
    harness.fail(protocol.ERR_INVALID, op, job_id=job_id)
    assert list(harness.tmp.iterdir()) == []


def test_every_operation_has_its_handler_and_no_other() -> None:
    """tej.protocol.OPERATIONS names each request's handler module; each module answers those."""
    import importlib

    modules = set(protocol.OPERATIONS.values())
    answered = {}
    for name in modules:
        module = importlib.import_module(f"tej.server.handlers.{name}")
        answered.update({op: name for op in module.HANDLERS})
    assert answered == protocol.OPERATIONS


@pytest.mark.parametrize("job_id", VALID_IDS + INVALID_IDS)
def test_client_job_id_rule_is_the_agent_s(job_id: Any) -> None:
    try:
        layout.validate_job_id(job_id)
    except errors.AgentError as exc:
        assert protocol.job_id_problem(job_id) == exc.message
    else:
        assert protocol.job_id_problem(job_id) is None


# -- the queue directory -------------------------------------------------------


def test_queue_is_created_private_on_first_upload(harness: Harness) -> None:
    harness.ok("upload_begin")
    root = Path(harness.queue)
    config = json.loads((root / layout.QUEUE_CONFIG).read_text())
    assert config["format"] == layout.QUEUE_FORMAT == 2
    assert config["runner"] == "default"
    for folder in (root, *(root / name for name in ("jobs", "staging", "trash", "agent", "index"))):
        assert mode_of(folder) == 0o700, folder


def test_queue_parents_are_created(harness: Harness) -> None:
    queue = str(harness.tmp / "deep" / "er" / "queue")
    harness.submit(script("true\n"), queue=queue, job_id="j")
    assert (Path(queue) / layout.QUEUE_CONFIG).is_file()


def test_empty_existing_directory_becomes_a_queue(harness: Harness) -> None:
    Path(harness.queue).mkdir()
    harness.ok("upload_begin")
    assert (Path(harness.queue) / layout.QUEUE_CONFIG).is_file()


def test_status_and_list_do_not_create_a_missing_queue(harness: Harness) -> None:
    assert harness.jobs_listed() == []
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "status", job_id="nope")
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "kill", job_id="nope")
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "delete", job_id="nope")
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "list_files", job_id="nope", path=b"")
    assert not os.path.lexists(harness.queue)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("upload_begin", {}),
        ("setup", {}),
        ("list", {}),
        ("status", {"job_id": "j"}),
        ("install_runner", {"runner": "echo", "source": "x"}),
    ],
)
def test_foreign_directory_is_refused_and_untouched(
    harness: Harness, op: str, args: dict[str, Any]
) -> None:
    root = Path(harness.queue)
    root.mkdir()
    (root / "precious.txt").write_text("mine")
    message = harness.fail(protocol.ERR_QUEUE, op, **args)
    assert "not a tej queue" in message
    assert [p.name for p in root.iterdir()] == ["precious.txt"]
    assert (root / "precious.txt").read_text() == "mine"


def test_plain_file_at_queue_path_is_refused(harness: Harness) -> None:
    Path(harness.queue).write_text("not json\n")
    harness.fail(protocol.ERR_QUEUE, "upload_begin")
    assert Path(harness.queue).read_text() == "not json\n"


def test_queue_of_a_newer_format_is_refused(harness: Harness) -> None:
    harness.ok("setup")
    config = Path(harness.queue) / layout.QUEUE_CONFIG
    config.write_text(json.dumps({"format": layout.QUEUE_FORMAT + 1}))
    for op, args in (("upload_begin", {}), ("list", {}), ("status", {"job_id": "j"})):
        assert "newer tej" in harness.fail(protocol.ERR_QUEUE, op, **args)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "1"}', "{}", ""])
def test_damaged_queue_config_is_a_queue_error(harness: Harness, text: str) -> None:
    harness.ok("setup")
    (Path(harness.queue) / layout.QUEUE_CONFIG).write_text(text)
    harness.fail(protocol.ERR_QUEUE, "list")
    harness.fail(protocol.ERR_QUEUE, "upload_begin")


# -- setup and links -------------------------------------------------------------


def test_setup_creates_a_queue(harness: Harness) -> None:
    result = harness.ok("setup", runner="default")
    batch_systems = ["sbatch"] if shutil.which("sbatch") else []
    assert result == {
        "queue": harness.queue,
        "created": True,
        "runner": "default",
        "links": [],
        "batch_systems": batch_systems,
        "unchanged": False,
    }
    assert json.loads((Path(harness.queue) / layout.QUEUE_CONFIG).read_text())["format"] == 2


def test_setup_again_with_the_same_settings_leaves_the_queue_alone(harness: Harness) -> None:
    harness.ok("setup", runner="queue", options={"max_running": "2"})
    config_path = Path(harness.queue) / layout.QUEUE_CONFIG
    before = config_path.read_bytes()
    link = str(harness.tmp / "link")
    result = harness.ok("setup", runner="queue", options={"max_running": "2"}, links=[link])
    assert (result["created"], result["unchanged"], result["links"]) == (False, True, [link])
    assert config_path.read_bytes() == before
    assert json.loads(Path(link).read_text())["tej_link"] == harness.queue


@pytest.mark.parametrize(
    ("args", "change"),
    [
        ({}, "runner would change from 'queue' to 'default'"),
        ({"runner": "queue"}, "max_running would change from 2 to 1"),
        ({"runner": "queue", "options": {"max_running": "3"}}, "from 2 to 3"),
    ],
)
def test_setup_with_other_settings_needs_force(
    harness: Harness, args: dict[str, Any], change: str
) -> None:
    harness.ok("setup", runner="queue", options={"max_running": "2"})
    config_path = Path(harness.queue) / layout.QUEUE_CONFIG
    before = config_path.read_bytes()
    link = str(harness.tmp / "link")
    message = harness.fail(protocol.ERR_QUEUE, "setup", links=[link], **args)
    assert "--force" in message and change in message, message
    assert config_path.read_bytes() == before
    assert not os.path.lexists(link)


def test_setup_with_force_rewrites_config_and_keeps_jobs(harness: Harness) -> None:
    job_id = harness.submit(script("true\n"), job_id="kept")
    harness.wait_end(job_id)
    config_path = Path(harness.queue) / layout.QUEUE_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, runner="old")))
    result = harness.ok("setup", force=True)
    assert result["created"] is False
    assert json.loads(config_path.read_text())["runner"] == "default"
    assert harness.status("kept")["state"] == protocol.STATE_FINISHED
    assert (harness.job_dir("kept") / "work" / "start.sh").is_file()


def test_setup_with_unknown_runner_is_invalid(harness: Harness) -> None:
    harness.fail(protocol.ERR_INVALID, "setup", runner="slurm-on-mars")
    assert not os.path.lexists(harness.queue)


def test_setup_link_redirects_later_operations(harness: Harness) -> None:
    link = str(harness.tmp / "home" / ".tej")
    assert harness.ok("setup", links=[link])["links"] == [link]
    assert json.loads(Path(link).read_text())["tej_link"] == harness.queue
    harness.run(script("true\n"), job_id="via-real")
    harness.run(script("true\n"), queue=link, job_id="via-link")
    assert harness.jobs() == ["via-link", "via-real"]
    assert harness.ok("status", queue=link, job_id="via-real")["state"] == "finished"
    assert {job["id"] for job in harness.jobs_listed(queue=link)} == {"via-link", "via-real"}


def write_link(path: Path, target: str) -> None:
    """Write a tej link file by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tej_link": target, "format": layout.LINK_FORMAT}))


def test_chains_of_links_are_followed(harness: Harness) -> None:
    harness.run(script("true\n"), job_id="j")
    first, second = harness.tmp / "first", harness.tmp / "second"
    write_link(first, str(second))
    write_link(second, harness.queue)
    assert harness.ok("status", queue=str(first), job_id="j")["state"] == "finished"
    assert [job["id"] for job in harness.jobs_listed(queue=str(first))] == ["j"]


def test_relative_link_target_is_resolved_against_the_link_folder(harness: Harness) -> None:
    real = harness.tmp / "real"
    harness.run(script("true\n"), queue=str(real), job_id="j")
    link = harness.tmp / "sub" / "link"
    write_link(link, "../real")
    assert harness.ok("status", queue=str(link), job_id="j")["state"] == "finished"


@pytest.mark.parametrize("size", [1, 2, 3])
def test_a_loop_of_links_is_a_queue_error(harness: Harness, size: int) -> None:
    links = [harness.tmp / f"link{i}" for i in range(size)]
    for i, link in enumerate(links):
        write_link(link, str(links[(i + 1) % size]))
    assert "loop" in harness.fail(protocol.ERR_QUEUE, "list", queue=str(links[0]))
    harness.fail(protocol.ERR_QUEUE, "upload_begin", queue=str(links[0]))


def test_link_at_an_existing_directory_is_refused(harness: Harness) -> None:
    folder = harness.tmp / "folder"
    folder.mkdir()
    harness.fail(protocol.ERR_QUEUE, "setup", links=[str(folder)], only_links=True)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_link_over_a_plain_file_is_refused(harness: Harness) -> None:
    plain = harness.tmp / "notes.txt"
    plain.write_text("keep me")
    harness.fail(protocol.ERR_QUEUE, "setup", links=[str(plain)], only_links=True)
    assert plain.read_text() == "keep me"


def test_replacing_a_link_to_another_queue_needs_force(harness: Harness) -> None:
    link = str(harness.tmp / "link")
    other = str(harness.tmp / "other")
    harness.ok("setup", links=[link], only_links=True)
    harness.ok("setup", links=[link], only_links=True)  # same target: fine
    assert "force" in harness.fail(
        protocol.ERR_QUEUE, "setup", queue=other, links=[link], only_links=True
    )
    assert json.loads(Path(link).read_text())["tej_link"] == harness.queue
    harness.ok("setup", queue=other, links=[link], only_links=True, force=True)
    assert json.loads(Path(link).read_text())["tej_link"] == other


def test_only_links_makes_links_without_creating_the_queue(harness: Harness) -> None:
    link = str(harness.tmp / "link")
    result = harness.ok("setup", links=[link], only_links=True)
    assert result["created"] is False
    assert result["links"] == [link]
    assert not os.path.lexists(harness.queue)
    assert harness.jobs_listed(queue=link) == []
    assert not os.path.lexists(harness.queue)


def test_link_to_itself_is_refused(harness: Harness) -> None:
    harness.fail(protocol.ERR_INVALID, "setup", links=[harness.queue], only_links=True)


# -- submit ----------------------------------------------------------------------


def test_submit_writes_the_agent_copy_itself(harness: Harness) -> None:
    token = harness.upload(script("true\n"))
    job = {"script": "start.sh", "args": []}
    assert harness.jobs() == []
    assert harness.ok("submit", token=token, job_id="j", job=job) == "j"
    copy = Path(harness.queue) / "agent" / own_name()
    assert {path: (copy / path).read_bytes() for path in own_files()} == own_files()
    assert harness.wait_end("j")["exit_code"] == 0


def test_submitted_tree_arrives_as_sent(harness: Harness) -> None:
    tree: dict[str, Entry] = {
        "start.sh": F(b"#!/bin/sh\ntrue\n", 0o755),
        "data.txt": F(b"hello\n", 0o640),
        "empty.bin": F(b"", 0o600),
        "sub": D(0o750),
        "sub/deeper/nested.txt": F(b"nested", 0o644),
        "sub/deeper": D(0o755),
        "void": D(0o711),
        "link": L("data.txt"),
        "dirlink": L("sub/deeper"),
        "dangling": L("/nonexistent/target"),
    }
    job_id = harness.submit(tree, job_id="tree")
    work = harness.job_dir(job_id) / "work"
    assert (work / "start.sh").read_bytes() == b"#!/bin/sh\ntrue\n"
    assert mode_of(work / "start.sh") == 0o755
    assert (work / "data.txt").read_bytes() == b"hello\n"
    assert mode_of(work / "data.txt") == 0o640
    assert (work / "empty.bin").read_bytes() == b""
    assert (work / "sub" / "deeper" / "nested.txt").read_bytes() == b"nested"
    assert mode_of(work / "sub") == 0o750
    assert mode_of(work / "sub" / "deeper") == 0o755
    assert (work / "void").is_dir() and list((work / "void").iterdir()) == []
    assert mode_of(work / "void") == 0o711
    assert os.readlink(work / "link") == "data.txt"
    assert os.readlink(work / "dirlink") == "sub/deeper"
    assert os.readlink(work / "dangling") == "/nonexistent/target"
    job = json.loads((harness.job_dir(job_id) / layout.JOB_FILE).read_text())
    assert (job["id"], job["script"], job["args"]) == ("tree", "start.sh", [])
    record = harness.record(job_id)
    assert record["id"] == "tree" and record["submitted_at"]


def test_upload_missing_a_file_is_incomplete(harness: Harness) -> None:
    tree = {**script("true\n"), "data.txt": F(b"0123456789")}
    token = harness.upload(tree, data={"data.txt": b""})
    reply = harness.submit_reply(tree, token=token, job_id="j")
    assert (reply["error"], "incomplete" in reply["message"]) == (protocol.ERR_INVALID, True)
    assert harness.jobs() == []


def test_upload_with_wrong_size_is_incomplete(harness: Harness) -> None:
    tree = {**script("true\n"), "data.txt": F(b"0123456789")}
    token = harness.upload(tree, data={"data.txt": b"01234"})
    reply = harness.submit_reply(tree, token=token, job_id="j")
    assert (reply["error"], "incomplete" in reply["message"]) == (protocol.ERR_INVALID, True)
    assert harness.jobs() == []


@pytest.mark.parametrize("path", [b"../escape", b"a/../../escape", b"/abs/escape", b"a/.."])
def test_manifest_paths_that_escape_are_refused(harness: Harness, path: bytes) -> None:
    tree = script("true\n")
    manifest = transfer.encode_manifest([*entries_of(tree), transfer.Entry(path, "d", 0o755)])
    reply = harness.submit_reply(tree, manifest=manifest, job_id="j")
    assert reply.get("error") == protocol.ERR_INVALID, reply
    assert not os.path.lexists(harness.queue)  # checked before anything is written
    assert not (harness.tmp / "escape").exists() and not Path("/abs/escape").exists()


@pytest.mark.parametrize(
    "chunk",
    [
        [1, 0, b"x"],  # a file that wasn't asked for
        [5, 0, b"x"],  # no such file
        [0, 1, b"x"],  # not where the file's data has reached
        [0, 0, b"#!/bin/sh\ntrue\n and more"],  # past the file's end
    ],
)
def test_upload_data_for_what_was_not_asked_is_refused(harness: Harness, chunk: list[Any]) -> None:
    tree: dict[str, Entry] = {**script("true\n"), "empty": F(b"")}
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert json.loads(begun["missing"]) == [[0, 0]]
    harness.fail(protocol.ERR_INVALID, "upload_data", token=begun["token"], chunks=[chunk])
    assert not list((Path(harness.queue) / "store").glob("??/*"))


def test_script_reached_through_a_symlink_outside_is_refused(harness: Harness) -> None:
    outside = harness.tmp / "outside.sh"
    outside.write_text("#!/bin/sh\ntrue\n")
    outside.chmod(0o755)
    reply = harness.submit_reply({"start.sh": L(str(outside))}, job_id="j")
    assert reply.get("error") == protocol.ERR_INVALID and "outside" in reply["message"], reply
    assert harness.jobs() == []


def test_script_in_a_linked_folder_outside_is_refused(harness: Harness) -> None:
    (harness.tmp / "elsewhere").mkdir()
    (harness.tmp / "elsewhere" / "run.sh").write_text("#!/bin/sh\ntrue\n")
    tree: dict[str, Entry] = {"bin": L(str(harness.tmp / "elsewhere"))}
    reply = harness.submit_reply(tree, job_id="j", job={"script": "bin/run.sh"})
    assert reply.get("error") == protocol.ERR_INVALID, reply
    assert harness.jobs() == []


@pytest.mark.parametrize(
    ("tree", "script_path"),
    [
        ({"other.sh": F(b"true\n")}, "start.sh"),
        ({"start.sh": D()}, "start.sh"),
        ({"start.sh": F(b"true\n")}, "../start.sh"),
        ({"start.sh": F(b"true\n")}, "/bin/true"),
        ({"start.sh": F(b"true\n")}, ""),
    ],
)
def test_missing_or_bad_script_is_refused(
    harness: Harness, tree: dict[str, Entry], script_path: str
) -> None:
    reply = harness.submit_reply(tree, job_id="j", job={"script": script_path})
    assert reply.get("error") == protocol.ERR_INVALID, reply
    assert harness.jobs() == []


def test_duplicate_job_id_is_refused(harness: Harness) -> None:
    harness.run(script("echo first\n"), job_id="dup")
    reply = harness.submit_reply(script("echo second\n"), job_id="dup")
    assert reply.get("error") == protocol.ERR_JOB_EXISTS, reply
    assert (harness.job_dir("dup") / "stdout").read_text() == "first\n"


def test_default_id_is_name_user_and_six_digits(harness: Harness) -> None:
    """The agent names the job after the directory and the user it runs as."""
    job_id = harness.submit(script("true\n"), id_name="myjobdir")
    user = pwd.getpwuid(os.getuid()).pw_name
    assert re.fullmatch(rf"myjobdir_{re.escape(user)}_\d{{6}}", job_id)
    assert harness.jobs() == [job_id]


@pytest.mark.parametrize(
    ("name", "start"),
    [("a b", "a_b_"), ("../x", ".._x_"), ("x" * 200, "x" * 80 + "_"), ("", "job_")],
)
def test_default_id_from_an_odd_name_is_a_valid_id(harness: Harness, name: str, start: str) -> None:
    job_id = harness.submit(script("true\n"), id_name=name)
    assert job_id.startswith(start) and protocol.job_id_problem(job_id) is None, job_id


def test_default_ids_are_distinct(harness: Harness) -> None:
    ids = {harness.submit(script("true\n"), id_name="same") for _ in range(20)}
    assert len(ids) == 20
    assert harness.jobs() == sorted(ids)


@pytest.mark.parametrize("name", [None, 5, b"x"])
def test_bad_id_name_is_refused_cleanly(harness: Harness, name: Any) -> None:
    """A bad or absent name (with no job_id) gets a clean error, never an internal one."""
    reply = harness.submit_reply(script("true\n"), id_name=name)
    assert reply.get("error") in (protocol.ERR_INVALID, protocol.ERR_BAD_REQUEST), reply
    assert harness.jobs() == []


def test_longest_id_name_gives_a_usable_id(harness: Harness) -> None:
    """A name the agent accepts must give an id that status can look up."""
    reply = harness.submit_reply(script("true\n"), id_name="p" * protocol.MAX_ID_LENGTH)
    if reply["ok"]:
        job_id = reply["result"]
        assert len(job_id) <= protocol.MAX_ID_LENGTH
        harness.wait_end(job_id)
    else:
        assert reply["error"] == protocol.ERR_INVALID
        assert harness.jobs() == []


def test_failed_submit_leaves_no_way_to_write_outside_the_job(harness: Harness) -> None:
    """Staging keeps no symlink a later upload_data could write through."""
    outside = harness.tmp / "outside"
    outside.mkdir()
    tree: dict[str, Entry] = {"d": L(str(outside)), "d2": F(b"x")}
    token = harness.upload(tree, data={"d2": b""})
    harness.submit_reply(tree, token=token, job_id="j")  # no start.sh: refused
    assert not harness.call("upload_data", token=token, chunks=[[1, 0, b"x"]])["ok"]
    assert list(outside.iterdir()) == []


# -- running jobs ----------------------------------------------------------------


def test_running_job_is_running_with_a_start_time(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="sleeper")
    harness.wait_running(job_id)
    status = harness.status(job_id)
    assert status["state"] == protocol.STATE_RUNNING
    assert status["started_at"] and status["ended_at"] is None
    assert status["exit_code"] is None
    record = harness.record(job_id)
    assert not group_gone(record["job"]["pid"])
    assert record["supervisor"]["pid"] != record["job"]["pid"]


def test_kill_stops_the_job_and_its_process_group(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="victim")
    pgid = harness.wait_running(job_id)["job"]["pid"]
    result = harness.ok("kill", job_id=job_id)
    assert result["killed"] is True
    assert result["status"]["state"] == protocol.STATE_KILLED
    assert harness.status(job_id)["state"] == protocol.STATE_KILLED
    assert harness.status(job_id)["ended_at"]
    assert group_gone(pgid)


def read_pid_file(path: Path) -> int:
    """Wait until a job has written a pid to path; return it."""
    text = wait_for(lambda: path.is_file() and path.read_text(), f"a pid in {path}")
    assert text.endswith("\n"), text
    return int(text)


def test_kill_reaches_a_background_grandchild(harness: Harness) -> None:
    body = "sleep 300 &\necho $! > grandchild.pid\nwait\n"
    job_id = harness.submit(script(body), job_id="family")
    grandchild = read_pid_file(harness.job_dir(job_id) / "work" / "grandchild.pid")
    assert not process_gone(grandchild)
    assert harness.ok("kill", job_id=job_id)["killed"] is True
    assert process_gone(grandchild)
    assert group_gone(harness.record(job_id)["job"]["pid"])


def test_kill_uses_sigkill_after_the_grace_period(harness: Harness) -> None:
    """A job ignoring SIGTERM (script and child alike) is SIGKILLed once the grace is over."""
    body = "trap '' TERM\nsleep 300 &\necho $! > stubborn.pid\nwait\n"
    job = {"script": "start.sh", "args": [], "kill_grace": 0.5}
    job_id = harness.submit(script(body), job_id="stubborn", job=job)
    stubborn = read_pid_file(harness.job_dir(job_id) / "work" / "stubborn.pid")
    started = time.monotonic()
    assert harness.ok("kill", job_id=job_id)["killed"] is True
    assert time.monotonic() - started < DEADLINE / 2
    assert process_gone(stubborn)


def test_script_exit_leaves_no_background_process(harness: Harness) -> None:
    body = "sleep 300 &\necho $! > bg.pid\n"
    job_id = harness.submit(script(body), job_id="quitter")
    background = read_pid_file(harness.job_dir(job_id) / "work" / "bg.pid")
    assert harness.wait_end(job_id)["exit_code"] == 0
    assert wait_for(lambda: process_gone(background), "the background sleep to go")


def test_kill_of_a_finished_job_kills_nothing(harness: Harness) -> None:
    harness.run(script("true\n"), job_id="done")
    result = harness.ok("kill", job_id="done")
    assert result["killed"] is False
    assert result["status"]["state"] == protocol.STATE_FINISHED


def test_exit_code_is_recorded(harness: Harness) -> None:
    status = harness.run(script("exit 3\n"), job_id="three")
    assert (status["state"], status["exit_code"], status["signal"]) == ("finished", 3, None)
    assert status["started_at"] <= status["ended_at"]
    assert status["elapsed"] is not None and status["elapsed"] >= 0


def test_death_by_signal_is_recorded(harness: Harness) -> None:
    status = harness.run(script("kill -9 $$\n"), job_id="sigkilled")
    assert status["state"] == protocol.STATE_FINISHED
    assert (status["exit_code"], status["signal"]) == (137, "SIGKILL")


@pytest.mark.parametrize(
    ("shebang", "mode"),
    [
        ("#!/bin/sh\n", 0o644),
        ("#! /bin/sh -e\n", 0o644),
        ("", 0o644),
        ("", 0o755),
    ],
    ids=["shebang-not-executable", "shebang-with-argument", "plain-not-executable", "plain-exec"],
)
def test_scripts_run_like_a_shell_would(harness: Harness, shebang: str, mode: int) -> None:
    tree = script("echo ran > ran.txt\nexit 0\n", mode=mode, shebang=shebang)
    status = harness.run(tree, job_id="shell")
    stderr = (harness.job_dir("shell") / "stderr").read_text()
    assert status["exit_code"] == 0, stderr
    assert (harness.job_dir("shell") / "work" / "ran.txt").read_text() == "ran\n"


@pytest.mark.parametrize("mode", [0o755, 0o644])
def test_missing_interpreter_is_exit_126_or_127(harness: Harness, mode: int) -> None:
    tree = script("true\n", mode=mode, shebang="#!/nonexistent/interpreter\n")
    status = harness.run(tree, job_id="nointerp")
    assert status["state"] == protocol.STATE_FINISHED
    assert status["exit_code"] in (126, 127)
    assert status["reason"] == (
        "cannot run start.sh: its interpreter /nonexistent/interpreter is not found"
    ), status
    stderr = (harness.job_dir("nointerp") / "stderr").read_text()
    assert "start.sh" in stderr


def test_script_that_cannot_run_is_recorded_not_refused(harness: Harness) -> None:
    """submit answers once the supervisor is forked: a failed start is in the job's status."""
    tree = script("true\n", shebang="#!/etc/passwd\n")  # an interpreter that isn't executable
    status = harness.run(tree, job_id="noexec")
    assert (status["state"], status["exit_code"]) == (protocol.STATE_FINISHED, 126)
    assert status["reason"].startswith("cannot run start.sh: ")
    assert status["started_at"] and status["ended_at"]


def test_output_leaving_the_job_is_a_failure_to_start(harness: Harness, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = {**script("echo hi\n"), "logs": L(str(outside))}
    job = {"script": "start.sh", "args": [], "stdout": "logs/out.txt"}
    status = harness.run(tree, job_id="escape", job=job)
    assert (status["state"], status["exit_code"]) == (protocol.STATE_FINISHED, 126)
    assert "cannot open its output" in status["reason"] and "leaves" in status["reason"]
    assert list(outside.iterdir()) == []


def test_a_job_deleted_as_its_record_is_read_is_no_job_not_lost(harness: Harness) -> None:
    harness.wait_end(harness.submit(script("true\n"), job_id="gone"))
    queue = open_queue(harness.queue)
    job_dir = queue.job_dir("gone")
    shutil.rmtree(job_dir)  # as delete --force does, between finding the folder and reading
    with pytest.raises(errors.AgentError) as raised:
        queue.record("gone", job_dir)
    assert raised.value.kind == protocol.ERR_JOB_NOT_FOUND


def unstarted_job(harness: Harness, job_id: str, job: str) -> tuple[Path, AgentCopy]:
    """A starting job made by hand, with job as its job.json; (its folder, the agent copy)."""
    harness.wait_end(harness.submit(script("true\n"), job_id=f"{job_id}-model"))
    job_dir = harness.job_dir(job_id)
    shutil.copytree(harness.job_dir(f"{job_id}-model") / "work", job_dir / "work")
    (job_dir / layout.JOB_FILE).write_text(job)
    record = {"id": job_id, "state": protocol.STATE_STARTING, "submitted_at": files.now_iso()}
    (job_dir / layout.STATUS_FILE).write_text(json.dumps(record))
    copy = queue_copy(open_queue(harness.queue))
    assert Path(copy.path).parent == Path(harness.queue) / layout.AGENT_DIR
    return job_dir, copy


def test_fork_server_forks_supervisors_that_leave_no_zombie(harness: Harness) -> None:
    job = {"id": "forked", "script": "start.sh", "args": [], "env": {}}
    job_dir, copy = unstarted_job(harness, "forked", json.dumps(job))
    server = launch.ForkServer(copy)
    try:
        report = server.start(str(job_dir), {})
        assert re.fullmatch(rb"forked \d+\n", report), report
        assert harness.wait_end("forked")["exit_code"] == 0
        # The server ignores SIGCHLD: the kernel reaps its supervisors, no zombie is left.
        wait_for(lambda: process_gone(int(report.split()[1])), "the supervisor to be reaped")
        failed = server.start(str(job_dir / "missing"), {})
        assert failed.startswith(b"failed No such file or directory"), failed
        assert server.alive()
    finally:
        server.proc.stdin.close()  # type: ignore[union-attr]
        assert server.proc.wait(timeout=DEADLINE) == 0


def test_supervisor_failing_before_the_start_makes_the_job_lost(harness: Harness) -> None:
    broken, copy = unstarted_job(harness, "broken", "{not json")
    command = copy.supervisor_command(str(broken)).argv
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=DEADLINE)
    assert done.returncode == 1
    status = harness.status("broken")
    assert status["state"] == protocol.STATE_LOST
    assert "supervisor failed before starting it" in status["reason"]
    assert "not valid JSON" in status["reason"]


def test_kill_right_after_submit_stops_the_starting_job(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="early")
    result = harness.ok("kill", job_id=job_id)
    assert result["killed"] is True
    assert result["status"]["state"] == protocol.STATE_KILLED
    record = harness.record(job_id)
    assert record["state"] == protocol.STATE_KILLED
    if record.get("job"):  # it started before the kill reached it
        assert group_gone(record["job"]["pid"])


def test_output_goes_to_private_files(harness: Harness) -> None:
    harness.run(script("echo to-out\necho to-err >&2\n"), job_id="talk")
    for name, text in (("stdout", "to-out\n"), ("stderr", "to-err\n")):
        path = harness.job_dir("talk") / name
        assert path.read_text() == text
        assert mode_of(path) == 0o600


def test_job_gets_its_args_env_and_working_directory(harness: Harness) -> None:
    body = 'printf "%s|%s|%s|%s\\n" "$TEJ_JOB_ID" "$(pwd -P)" "$1" "$2" > seen.txt\n'
    job = {"script": "start.sh", "args": ["a b", "$x;y"]}
    harness.run(script(body), job_id="argv", job=job)
    work = harness.job_dir("argv") / "work"
    expected = f"argv|{os.path.realpath(work)}|a b|$x;y\n"
    assert (work / "seen.txt").read_text() == expected


def test_job_starts_with_default_signal_handling(harness: Harness) -> None:
    """The job must not inherit the supervisor's ignored SIGHUP/SIGINT/SIGPIPE."""
    harness.run(script("grep SigIgn /proc/$$/status > sigign.txt\n"), job_id="sigs")
    mask = int((harness.job_dir("sigs") / "work" / "sigign.txt").read_text().split()[1], 16)
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE, signal.SIGTERM):
        assert not mask & (1 << (signum - 1)), f"{signum.name} is ignored in the job"


# -- lost jobs ---------------------------------------------------------------------


@contextlib.contextmanager
def playing_init() -> Iterator[None]:
    """Make this test process the reaper of orphans, as init is on a real server."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap_orphans_of(pgid: int) -> None:
    """Reap, in the background, the group's processes as they are orphaned to us."""
    wait_for(lambda: parent_pid(pgid) in (os.getpid(), None), f"{pgid} to be orphaned")

    def reap() -> None:
        deadline = time.monotonic() + 2 * DEADLINE
        while not group_gone(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)
            time.sleep(0.01)

    threading.Thread(target=reap, daemon=True).start()


def test_dead_supervisor_makes_the_job_lost_then_kill_and_delete_work(harness: Harness) -> None:
    job = {"script": "start.sh", "args": [], "kill_grace": 1}
    with playing_init():
        job_id = harness.submit(script("sleep 30\n"), job_id="orphan", job=job)
        record = harness.wait_running(job_id)
        pgid = record["job"]["pid"]
        os.kill(record["supervisor"]["pid"], signal.SIGKILL)
        # Forked twice from this process, the supervisor is our child now (we play init);
        # forked by a fork server (when this process has threads), it is the server's.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record["supervisor"]["pid"], 0)
        reap_orphans_of(pgid)
        lost = wait_for(
            lambda: (s := harness.status(job_id))["state"] == protocol.STATE_LOST and s,
            "the job to be lost",
        )
        assert "supervisor" in lost["reason"]
        assert [item["state"] for item in harness.jobs_listed()] == [protocol.STATE_LOST]
        assert not group_gone(pgid)
        result = harness.ok("kill", job_id=job_id)
        assert result["killed"] is True
        assert result["status"]["state"] == protocol.STATE_KILLED
        # The orphans are dead; "init" (this test's reaper) collects them when it gets to it.
        wait_for(lambda: group_gone(pgid), "the orphaned group to be reaped")
    harness.ok("delete", job_id=job_id)
    assert harness.jobs() == []


def test_status_from_an_earlier_boot_is_lost_by_restart(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="rebooted")
    harness.wait_running(job_id)
    path = harness.job_dir(job_id) / layout.STATUS_FILE
    original = path.read_text()
    record = json.loads(original)
    assert record["supervisor"]["boot"] == processes.boot_id()
    record["supervisor"]["boot"] = "00000000-another-boot"
    path.write_text(json.dumps(record))
    status = harness.status(job_id)
    assert status["state"] == protocol.STATE_LOST
    assert "restart" in status["reason"]
    path.write_text(original)
    assert harness.status(job_id)["state"] == protocol.STATE_RUNNING


def test_missing_status_file_is_lost(harness: Harness) -> None:
    harness.run(script("true\n"), job_id="j")
    (harness.job_dir("j") / layout.STATUS_FILE).unlink()  # a power cut lost it
    # Without its status.json, a job is `starting` since its job.json was written (as a
    # new job is until its supervisor writes one), with no supervisor: lost after 60 s.
    old = time.time() - 61
    os.utime(harness.job_dir("j") / layout.JOB_FILE, (old, old))
    assert harness.status("j")["state"] == protocol.STATE_LOST


def test_a_job_is_starting_until_its_supervisor_writes_its_first_record(
    harness: Harness,
) -> None:
    """The default runner's job has no status.json until its supervisor writes one: it
    is `starting` since its job.json was written (docs/queue-format.md)."""
    job_id = harness.submit(script("sleep 30\n"), job_id="young")
    assert harness.status(job_id)["state"] in (protocol.STATE_STARTING, protocol.STATE_RUNNING)
    job_file = harness.job_dir(job_id) / layout.JOB_FILE
    running = harness.wait_running(job_id)  # written once it has run 50 ms
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(job_file.stat().st_mtime))
    assert running["submitted_at"].startswith(submitted)
    assert harness.status(job_id)["state"] == protocol.STATE_RUNNING
    harness.ok("kill", job_id=job_id)


# -- delete ------------------------------------------------------------------------


def test_delete_of_a_running_job_needs_force(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="busy")
    pgid = harness.wait_running(job_id)["job"]["pid"]
    harness.fail(protocol.ERR_JOB_RUNNING, "delete", job_id=job_id)
    assert harness.status(job_id)["state"] == protocol.STATE_RUNNING
    harness.ok("delete", job_id=job_id, force=True)
    assert group_gone(pgid)
    assert harness.jobs() == []
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "status", job_id=job_id)


def test_delete_of_a_finished_job_removes_its_directory(harness: Harness) -> None:
    harness.run({**script("true\n"), "sub": D(), "sub/f": F(b"x")}, job_id="gone")
    harness.ok("delete", job_id="gone")
    assert not harness.job_dir("gone").exists()
    assert list((Path(harness.queue) / layout.TRASH_DIR).iterdir()) == []
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "status", job_id="gone")


def test_delete_of_an_unknown_job_is_not_found(harness: Harness) -> None:
    harness.ok("setup")
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "delete", job_id="nobody")


# -- download side -------------------------------------------------------------------


@pytest.fixture
def finished_job(harness: Harness) -> str:
    """A finished job whose directory has files, folders and symlinks."""
    tree: dict[str, Entry] = {
        **script("true\n"),
        "data.txt": F(b"hello world", 0o640),
        "sub": D(0o750),
        "sub/inner.txt": F(b"inner"),
        "sub/deeper": D(),
        "sub/deeper/x.bin": F(b"\0\1\2", 0o600),
        "inside": L("data.txt"),
        "out": L(str(harness.tmp)),
        "out_file": L("/etc/hostname"),
    }
    harness.run(tree, job_id="results")
    return "results"


def test_list_files_of_a_file(harness: Harness, finished_job: str) -> None:
    rows = harness.ok("list_files", job_id=finished_job, path=b"data.txt")
    assert rows == [[b"", "f", 0o640, 11]]


def test_list_files_of_a_folder_is_recursive(harness: Harness, finished_job: str) -> None:
    rows = harness.ok("list_files", job_id=finished_job, path=b"sub")
    assert rows[0] == [b"", "d", 0o750, 0]
    assert sorted(map(tuple, rows[1:])) == [
        (b"deeper", "d", 0o755, 0),
        (b"deeper/x.bin", "f", 0o600, 3),
        (b"inner.txt", "f", 0o644, 5),
    ]


def test_list_files_of_the_whole_job_shows_symlinks_unfollowed(
    harness: Harness, finished_job: str
) -> None:
    rows = {row[0]: row for row in harness.ok("list_files", job_id=finished_job, path=b"")}
    assert rows[b"out"][1:] == ["l", 0o777, str(harness.tmp).encode()]
    assert rows[b"inside"][1:] == ["l", 0o777, b"data.txt"]
    assert rows[b"start.sh"][1] == "f"
    assert b"out/queue" not in rows


def test_read_chunks_reads_ranges(harness: Harness, finished_job: str) -> None:
    chunks = [[b"data.txt", 6, 5], [b"data.txt", 0, 100], [b"sub/deeper/x.bin", 1, 1]]
    assert harness.ok("read_chunks", job_id=finished_job, chunks=chunks) == [
        b"world",
        b"hello world",
        b"\1",
    ]


def test_symlink_inside_the_job_is_followed(harness: Harness, finished_job: str) -> None:
    assert harness.ok("list_files", job_id=finished_job, path=b"inside") == [[b"", "f", 0o640, 11]]


@pytest.mark.parametrize("path", [b"out", b"out/queue", b"out_file"])
def test_symlinks_leaving_the_job_are_refused(
    harness: Harness, finished_job: str, path: bytes
) -> None:
    message = harness.fail(protocol.ERR_INVALID, "list_files", job_id=finished_job, path=path)
    assert "leaves" in message
    chunks = [[path, 0, 10]]
    message = harness.fail(protocol.ERR_INVALID, "read_chunks", job_id=finished_job, chunks=chunks)
    assert "leaves" in message


@pytest.mark.parametrize(
    "path", [b"..", b"../status.json", b"sub/../../job.json", b"/etc/hostname", b"a\0b"]
)
def test_escaping_download_paths_are_refused(
    harness: Harness, finished_job: str, path: bytes
) -> None:
    harness.fail(protocol.ERR_INVALID, "list_files", job_id=finished_job, path=path)
    harness.fail(protocol.ERR_INVALID, "read_chunks", job_id=finished_job, chunks=[[path, 0, 1]])


def test_missing_download_path_is_invalid(harness: Harness, finished_job: str) -> None:
    message = harness.fail(protocol.ERR_INVALID, "list_files", job_id=finished_job, path=b"nope")
    assert "nope" in message
    harness.fail(protocol.ERR_INVALID, "read_chunks", job_id=finished_job, chunks=[[b"nope", 0, 1]])


def test_download_from_an_unknown_job_is_not_found(harness: Harness, finished_job: str) -> None:
    harness.fail(protocol.ERR_JOB_NOT_FOUND, "list_files", job_id="other", path=b"")


# -- the content store ----------------------------------------------------------


def blobs_of(harness: Harness) -> dict[str, Path]:
    """The store's blobs, by name (DIGEST-MODE)."""
    return {path.name: path for path in (Path(harness.queue) / "store").glob("??/*")}


def blob_name(data: bytes, mode: int = 0o644) -> str:
    return f"{hashlib.sha256(data).hexdigest()}-{mode:03o}"


def asked(begun: dict[str, Any]) -> list[list[int]]:
    """The [index, offset] pairs an upload_begin reply asks for."""
    return list(json.loads(begun["missing"]))


def kill_connection(harness: Harness) -> None:
    """What the death of the agent's process does: its files close, nothing is cleaned up."""
    for upload in harness.agent.uploads.values():
        upload.discard_files()
    harness.agent = Connection()
    harness.ok("hello", protocol=protocol.PROTOCOL_VERSION)


def test_only_what_the_store_lacks_is_asked_for(harness: Harness) -> None:
    tree: dict[str, Entry] = {
        **script("true\n"),
        "sub": D(),
        "sub/a.txt": F(b"a" * 1000),
        "b.bin": F(os.urandom(5000)),
        "empty": F(b""),
    }
    first = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(first) == [[0, 0], [2, 0], [3, 0]]
    assert harness.send(tree, first) == len(tree["start.sh"].data) + 1000 + 5000  # type: ignore
    one = harness.submit(tree, token=first["token"], job_id="one")
    again = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(again) == []
    harness.ok("upload_abort", token=again["token"])
    changed = {**tree, "sub/a.txt": F(b"b" * 1000)}
    begun = harness.ok("upload_begin", manifest=manifest_of(changed))
    assert asked(begun) == [[2, 0]]
    assert harness.send(changed, begun) == 1000
    two = harness.submit(changed, token=begun["token"], job_id="two")
    assert harness.wait_end(two)["exit_code"] == 0
    for job_id, source in ((one, tree), (two, changed)):
        work = harness.job_dir(job_id) / "work"
        for name, entry in source.items():
            if isinstance(entry, F):
                assert (work / name).read_bytes() == entry.data
                assert os.stat(work / name).st_mtime == store.STORE_MTIME
    assert set(blobs_of(harness)) == {
        blob_name(entry.data, entry.mode)
        for entry in (*tree.values(), changed["sub/a.txt"])
        if isinstance(entry, F) and entry.data
    }


def test_same_content_is_stored_once_and_files_never_share_an_inode(harness: Harness) -> None:
    data = os.urandom(3000)
    tree: dict[str, Entry] = {
        **script("true\n"),
        "a.txt": F(data),
        "sub/b.txt": F(data),
        "run.sh": F(data, 0o755),
        "secret": F(data, 0o200),  # not readable by its owner: copied, never linked
    }
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == [[0, 0], [1, 0]]  # start.sh, then the content, once
    harness.send(tree, begun)
    job_id = harness.submit(tree, token=begun["token"], job_id="dup")
    work = harness.job_dir(job_id) / "work"
    inodes = {os.stat(work / name).st_ino for name in ("a.txt", "sub/b.txt", "run.sh", "secret")}
    assert len(inodes) == 4
    assert [mode_of(work / name) for name in ("a.txt", "run.sh", "secret")] == [
        0o644,
        0o755,
        0o200,
    ]
    assert all((work / name).read_bytes() == data for name in ("a.txt", "run.sh", "secret"))
    blobs = blobs_of(harness)
    assert set(blobs) == {blob_name(data), blob_name(tree["start.sh"].data, 0o755)}  # type: ignore
    assert blobs[blob_name(data)].stat().st_ino == os.stat(work / "a.txt").st_ino


def test_executable_bits_survive(harness: Harness) -> None:
    tool = b"#!/bin/sh\necho tool ran\n"
    tree: dict[str, Entry] = {
        **script("./bin/tool.sh > out.txt\n"),
        "bin/tool.sh": F(tool, 0o755),
        "bin/copy.sh": F(tool, 0o644),
        "private.sh": F(tool, 0o700),
    }
    for job_id in ("first", "second"):  # the second links what the first stored
        assert harness.run(tree, job_id=job_id)["exit_code"] == 0
        work = harness.job_dir(job_id) / "work"
        assert (work / "out.txt").read_text() == "tool ran\n"
        modes = [mode_of(work / name) for name in ("bin/tool.sh", "bin/copy.sh", "private.sh")]
        assert modes == [0o755, 0o644, 0o700]


def test_a_job_writing_to_its_input_does_not_change_the_next_ones(harness: Harness) -> None:
    tree = {**script("echo more >> data.txt\nchmod 600 mode.txt\n"), "data.txt": F(b"original\n")}
    tree["mode.txt"] = F(b"mode\n")
    assert harness.run(tree, job_id="first")["exit_code"] == 0
    first = harness.job_dir("first") / "work"
    assert (first / "data.txt").read_text() == "original\nmore\n"
    # The store's copy was written to through the job's link, and chmod-ed: both are
    # dropped when next seen, and asked for again.
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == [[1, 0], [2, 0]]
    harness.send(tree, begun)
    second = harness.submit(tree, token=begun["token"], job_id="second")
    assert harness.wait_end(second)["exit_code"] == 0
    assert (harness.job_dir("second") / "work" / "data.txt").read_text() == "original\nmore\n"
    assert (first / "data.txt").read_text() == "original\nmore\n"
    assert mode_of(harness.job_dir("second") / "work" / "mode.txt") == 0o600
    assert blob_name(b"original\n") in blobs_of(harness)


def test_a_running_job_never_shares_a_file_with_a_new_one(harness: Harness) -> None:
    body = "while [ ! -e go ]; do sleep 0.02; done\necho more >> data.txt\n"
    tree = {**script(body), "data.txt": F(b"original\n")}
    first = harness.submit(tree, job_id="first")
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == []  # copied on the server from the running job's blob
    second = harness.submit(tree, token=begun["token"], job_id="second")
    data = [harness.job_dir(job_id) / "work" / "data.txt" for job_id in (first, second)]
    assert data[0].stat().st_ino != data[1].stat().st_ino
    # The store keeps the fresh copy: later jobs share it with the second job only.
    assert blobs_of(harness)[blob_name(b"original\n")].stat().st_ino == data[1].stat().st_ino
    (harness.job_dir(first) / "work" / "go").touch()
    assert harness.wait_end(first)["exit_code"] == 0
    assert data[0].read_text() == "original\nmore\n"
    assert data[1].read_text() == "original\n"
    (harness.job_dir(second) / "work" / "go").touch()
    assert harness.wait_end(second)["exit_code"] == 0


def test_a_pending_upload_holds_its_blobs_too(harness: Harness) -> None:
    """Two uploads of one content at the same time get two inodes (either may run first)."""
    tree = {**script("true\n"), "data.txt": F(b"shared\n")}
    first = harness.upload(tree)
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == []
    staged = Path(harness.queue) / "staging"
    inodes = {path.stat().st_ino for path in staged.glob("*/work/data.txt")}
    assert len(inodes) == 2
    for token, job_id in ((first, "one"), (begun["token"], "two")):
        harness.submit(tree, token=token, job_id=job_id)
        harness.wait_end(job_id)


def test_content_that_does_not_match_its_digest_is_refused(harness: Harness) -> None:
    tree = {**script("true\n"), "data.txt": F(b"good content")}
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    start = [[0, 0, tree["start.sh"].data]]
    harness.ok("upload_data", token=begun["token"], chunks=start)
    message = harness.fail(
        protocol.ERR_INVALID, "upload_data", token=begun["token"], chunks=[[1, 0, b"evil content"]]
    )
    assert "data.txt" in message and "not the one announced" in message
    assert blob_name(b"good content") not in blobs_of(harness)
    assert blob_name(b"evil content") not in blobs_of(harness)
    reply = harness.submit_reply(tree, token=begun["token"], job_id="j")
    assert reply.get("error") == protocol.ERR_INVALID and "incomplete" in reply["message"], reply
    assert harness.jobs() == []
    assert os.listdir(Path(harness.queue) / "staging") == []


def test_deleting_a_job_removes_the_blobs_only_it_used(harness: Harness) -> None:
    shared = {**script("true\n"), "common.txt": F(b"common\n")}
    harness.run({**shared, "a.bin": F(b"only a\n")}, job_id="a")
    harness.run({**shared, "b.bin": F(b"only b\n")}, job_id="b")
    names = [blob_name(data) for data in (b"common\n", b"only a\n", b"only b\n")]
    assert set(names) <= set(blobs_of(harness))
    harness.ok("delete", job_id="a")
    assert names[1] not in blobs_of(harness)
    assert {names[0], names[2]} <= set(blobs_of(harness))
    harness.ok("delete", job_id="b")
    assert blobs_of(harness) == {}


def test_unused_blobs_are_collected_once_stale(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = {**script("true\n"), "kept.txt": F(b"kept\n")}
    harness.run(kept, job_id="kept")
    token = harness.upload({**script("true\n"), "dropped.txt": F(b"dropped\n")})
    harness.ok("upload_abort", token=token)  # what arrived stays in the store...
    assert blob_name(b"dropped\n") in blobs_of(harness)
    harness.ok("upload_begin")
    assert blob_name(b"dropped\n") in blobs_of(harness)  # ...for a while
    monkeypatch.setattr(store, "STALE_UPLOAD", -1.0)
    monkeypatch.setattr(store, "STORE_GC_INTERVAL", 0.0)
    harness.ok("upload_begin")
    # start.sh, small and shared with "kept", was copied for the aborted upload without
    # reading the leases (a few small blobs: see Upload.read_leases), the copy replacing
    # it in the store: it went with the upload, as dropped.txt did.
    assert set(blobs_of(harness)) == {blob_name(b"kept\n")}


def test_many_small_blobs_of_an_ended_job_are_linked_and_a_few_are_copied(
    harness: Harness,
) -> None:
    from tej.server.upload import COPY_FREELY

    many = {f"f{number}.txt": F(b"file %d\n" % number) for number in range(COPY_FREELY + 2)}
    tree: dict[str, Entry] = {**script("true\n"), **many}
    harness.run(tree, job_id="first")
    # Many small blobs shared with a job: the leases are read (cheaper than the copies),
    # and the job has ended, so they are linked (a re-submit of unchanged files).
    harness.run(tree, job_id="second")
    first, second = (harness.job_dir(job_id) / "work" for job_id in ("first", "second"))
    assert all((first / name).stat().st_ino == (second / name).stat().st_ino for name in many)
    # A few: copied without reading the leases, the copy replacing the blob in the store.
    harness.run({**script("true\n"), "f0.txt": many["f0.txt"]}, job_id="third")
    third = harness.job_dir("third") / "work" / "f0.txt"
    assert third.stat().st_ino != (second / "f0.txt").stat().st_ino
    assert blobs_of(harness)[blob_name(b"file 0\n")].stat().st_ino == third.stat().st_ino
    assert (second / "f0.txt").read_bytes() == third.read_bytes() == b"file 0\n"


def test_intents_are_spare_files_renamed_not_created(harness: Harness) -> None:
    tree: dict[str, Entry] = script("true\n")
    index = Path(harness.queue) / "index"

    def run(job_id: str) -> None:  # and wait for the supervisor's last intent to end
        harness.run(tree, job_id=job_id)
        wait_until(lambda: not os.listdir(index / "pending"), 10, "the intents to end")

    run("first")
    spares = {path.stat().st_ino for path in (index / "spares").iterdir()}
    assert spares  # the intents of this connection, and of the job's supervisor
    for job_id in ("second", "third"):
        run(job_id)
    # The same files went from spares/ to pending/ and back: none was made or removed.
    assert {path.stat().st_ino for path in (index / "spares").iterdir()} == spares
    assert index_problems(harness.queue) == []


def test_a_queue_without_spares_gets_them(harness: Harness) -> None:
    tree: dict[str, Entry] = script("true\n")
    harness.run(tree, job_id="first")
    spares = Path(harness.queue) / "index" / "spares"
    shutil.rmtree(spares)  # as a queue indexed by an older tej
    harness.run(tree, job_id="second")
    harness.ok("delete", job_id="first")
    assert list(spares.iterdir())
    assert os.listdir(Path(harness.queue) / "index" / "pending") == []
    assert index_problems(harness.queue) == []


def test_an_interrupted_upload_resumes_where_it_stopped(harness: Harness) -> None:
    big = os.urandom(3 * transfer.CHUNK_SIZE + 12345)
    tree = {**script("true\n"), "small.txt": F(b"small\n"), "big.bin": F(big)}
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == [[0, 0], [1, 0], [2, 0]]
    harness.send(tree, begun, data={"big.bin": big[: transfer.CHUNK_SIZE + 7]})
    kill_connection(harness)
    again = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(again) == [[2, transfer.CHUNK_SIZE + 7]]
    assert harness.send(tree, again) == len(big) - transfer.CHUNK_SIZE - 7
    job_id = harness.submit(tree, token=again["token"], job_id="resumed")
    assert (harness.job_dir(job_id) / "work" / "big.bin").read_bytes() == big
    assert harness.wait_end(job_id)["exit_code"] == 0


def test_a_partial_content_still_being_written_is_left_alone(harness: Harness) -> None:
    big = os.urandom(2 * transfer.CHUNK_SIZE)
    tree = {**script("true\n"), "big.bin": F(big)}
    writer = harness.ok("upload_begin", manifest=manifest_of(tree))
    harness.send(tree, writer, data={"big.bin": big[:1000]})
    other = Harness(harness.tmp)  # another connection, while the first one lives
    begun = other.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(begun) == [[1, 0]]
    other.send(tree, begun)
    other.submit(tree, token=begun["token"], job_id="other")
    chunks = [[1, 1000, big[1000:]]]
    harness.ok("upload_data", token=writer["token"], chunks=chunks)
    harness.submit(tree, token=writer["token"], job_id="writer")
    for job_id in ("other", "writer"):
        assert (harness.job_dir(job_id) / "work" / "big.bin").read_bytes() == big
        harness.wait_end(job_id)


def test_a_damaged_partial_content_is_sent_again(harness: Harness) -> None:
    data = os.urandom(5000)
    tree = {**script("true\n"), "data.bin": F(data)}
    begun = harness.ok("upload_begin", manifest=manifest_of(tree))
    harness.send(tree, begun, data={"data.bin": data[:2000]})
    kill_connection(harness)
    part = next((Path(harness.queue) / "staging").glob("*/part-*"))
    part.write_bytes(b"x" * 5000)  # whole, but not the content
    again = harness.ok("upload_begin", manifest=manifest_of(tree))
    assert asked(again) == [[1, 0]]
    harness.send(tree, again)
    job_id = harness.submit(tree, token=again["token"], job_id="j")
    assert (harness.job_dir(job_id) / "work" / "data.bin").read_bytes() == data
    harness.wait_end(job_id)


# -- manifests in parts, contents and submit sent along ------------------------------


def parts_of(tree: dict[str, Entry], size: int) -> list[dict[str, Any]]:
    """The manifest of a tree, in parts of size entries (the last one shorter)."""
    entries = entries_of(tree)
    return [
        transfer.encode_manifest(entries[at : at + size]) for at in range(0, len(entries), size)
    ]


def staging_of(harness: Harness) -> list[str]:
    return os.listdir(Path(harness.queue) / "staging")


def test_a_manifest_in_parts_is_laid_out_as_one(harness: Harness) -> None:
    tree: dict[str, Entry] = {
        **script("true\n"),
        "d": D(),
        "d/a.txt": F(b"a" * 100),
        "d/twin.txt": F(b"a" * 100, 0o600),
        "e": D(0o700),
        "e/b.txt": F(b"b" * 100),
        "e/link": L("../d/a.txt"),
        "e/empty": F(b""),
    }
    first = harness.ok("upload_begin", manifest=manifest_of(tree))
    harness.send(tree, first)
    harness.submit(tree, token=first["token"], job_id="one")
    changed = {**tree, "e/b.txt": F(b"c" * 100)}
    parts = parts_of(changed, 3)

    def send_parts(token: str, count: int) -> None:
        for number, part in enumerate(parts[:count]):
            op = "upload_manifest" if number else "upload_begin"
            assert harness.ok(op, token=token, manifest=part, more=True) == {"token": token}

    # Nothing can be sent or submitted before the manifest is whole.
    token = transfer.new_token()
    send_parts(token, len(parts) - 1)
    harness.fail(protocol.ERR_INVALID, "upload_data", token=token, chunks=[[5, 0, b"c" * 100]])
    harness.fail(protocol.ERR_INVALID, "submit", token=token, job_id="early")
    assert staging_of(harness) == []  # a failed submit leaves nothing
    token = transfer.new_token()
    send_parts(token, len(parts) - 1)
    last = harness.ok("upload_manifest", token=token, manifest=parts[-1])
    assert asked(last) == [[5, 0]]  # an index in the whole tree
    harness.fail(protocol.ERR_INVALID, "upload_manifest", token=token, manifest=parts[-1])
    harness.send(changed, last)
    two = harness.submit(changed, token=token, job_id="two")
    work = harness.job_dir(two) / "work"
    for name, entry in changed.items():
        if isinstance(entry, F):
            assert (work / name).read_bytes() == entry.data
            assert stat.S_IMODE(os.stat(work / name).st_mode) == entry.mode
    assert os.readlink(work / "e" / "link") == "../d/a.txt"
    assert stat.S_IMODE(os.stat(work / "e").st_mode) == 0o700
    assert (work / "d" / "a.txt").stat().st_ino != (work / "d" / "twin.txt").stat().st_ino
    assert harness.wait_end(two)["exit_code"] == 0


def test_a_path_repeated_in_a_later_part_is_refused(harness: Harness) -> None:
    tree: dict[str, Entry] = {**script("true\n"), "a": D(), "b": D()}
    token = transfer.new_token()
    parts = parts_of(tree, 2)
    harness.ok("upload_begin", token=token, manifest=parts[0], more=True)
    message = harness.fail(protocol.ERR_INVALID, "upload_manifest", token=token, manifest=parts[0])
    assert "names 'start.sh' twice" in message
    assert staging_of(harness) == []
    assert not list((Path(harness.queue) / "store" / "leases").iterdir())


def test_manifests_in_parts_at_the_same_time_never_share_an_inode(harness: Harness) -> None:
    """Two uploads that link the same blobs part by part, interleaved: each sees the other."""
    tree: dict[str, Entry] = {**script("true\n"), **{f"f{i}": F(b"%d" % i) for i in range(6)}}
    harness.submit(tree, job_id="stored")
    harness.wait_end("stored")
    other = Connection()  # another connection, on the same queue
    other.handle({"v": 2, "op": "hello", "args": {"protocol": 2}})
    parts = parts_of(tree, 3)
    tokens = [transfer.new_token(), transfer.new_token()]
    for number, part in enumerate(parts):
        for client, token in zip((harness.agent, other), tokens):
            args = {"queue": harness.queue, "token": token, "manifest": part}
            args["more"] = number < len(parts) - 1
            op = "upload_manifest" if number else "upload_begin"
            reply = client.handle({"v": 2, "op": op, "args": args})
            assert reply["ok"], reply
            if not args["more"]:
                assert asked(reply["result"]) == []
    staged = Path(harness.queue) / "staging"
    for index in range(6):
        inodes = {path.stat().st_ino for path in staged.glob(f"*/work/f{index}")}
        assert len(inodes) == 2, index  # at worst both copied, never shared
    for connection in (harness.agent, other):
        for upload in connection.uploads.values():
            upload.discard_files()


def test_a_client_token_must_be_new_and_well_formed(harness: Harness) -> None:
    token = transfer.new_token()
    harness.ok("upload_begin", token=token, manifest=manifest_of({}), more=True)
    harness.fail(protocol.ERR_INVALID, "upload_begin", token=token, manifest=manifest_of({}))
    for bad in ("../jobs", "ABCDEF0123456789", "0123", "0" * 33, 12):
        harness.fail(protocol.ERR_BAD_REQUEST, "upload_begin", token=bad, manifest=manifest_of({}))
    for bad_more in ({"more": 1}, {"more": True, "contents": [[0, b"x"]]}):
        harness.fail(protocol.ERR_BAD_REQUEST, "upload_begin", manifest=manifest_of({}), **bad_more)
    assert staging_of(harness) == [token]


def test_contents_sent_along_and_submit_make_one_request(harness: Harness) -> None:
    tree: dict[str, Entry] = {**script("true\n"), "a.txt": F(b"a" * 100), "b.txt": F(b"b" * 9)}
    first = harness.ok("upload_begin", manifest=manifest_of(tree))
    harness.send(tree, first)
    harness.submit(tree, token=first["token"], job_id="one")
    harness.wait_end("one")
    changed = {**tree, "b.txt": F(b"changed")}
    sent = [[0, tree["start.sh"].data], [2, b"changed"]]  # type: ignore[union-attr]
    submit = {"job_id": "two", "job": {"script": "start.sh"}}
    reply = harness.ok("upload_begin", manifest=manifest_of(changed), contents=sent, submit=submit)
    assert (asked(reply), reply["job_id"]) == ([], "two")  # start.sh, stored, was ignored
    assert (harness.job_dir("two") / "work" / "b.txt").read_bytes() == b"changed"
    assert harness.wait_end("two")["exit_code"] == 0
    assert blob_name(b"changed") in blobs_of(harness)
    # Something still missing: the upload waits for it, then for submit.
    more = {**changed, "c.txt": F(b"c" * 10)}
    reply = harness.ok("upload_begin", manifest=manifest_of(more), submit=submit)
    assert asked(reply) == [[3, 0]] and "job_id" not in reply
    harness.send(more, reply)
    assert harness.submit(more, token=reply["token"], job_id="three") == "three"


def test_contents_sent_along_are_checked(harness: Harness) -> None:
    tree: dict[str, Entry] = {**script("true\n"), "a.txt": F(b"the real content\n")}
    for contents in ([[1, b"what the client says\n"]], [[1, b"the real content\n!"]]):
        submit = {"job_id": "liar", "job": {"script": "start.sh"}}
        harness.fail(
            protocol.ERR_INVALID,
            "upload_begin",
            manifest=manifest_of(tree),
            contents=contents,
            submit=submit,
        )
        assert staging_of(harness) == []
        assert not (Path(harness.queue) / "jobs" / "liar").exists()
    assert not any(
        name.startswith(blob_name(b"the real content\n")[:64]) for name in blobs_of(harness)
    )


def test_a_failed_submit_sent_along_leaves_nothing(harness: Harness) -> None:
    tree = script("true\n")
    harness.submit(tree, job_id="taken")
    submit = {"job_id": "taken", "job": {"script": "start.sh"}}
    harness.fail(protocol.ERR_JOB_EXISTS, "upload_begin", manifest=manifest_of(tree), submit=submit)
    assert staging_of(harness) == []
    assert not harness.agent.uploads


def test_a_submit_sent_along_starts_the_job_in_a_new_queue(harness: Harness) -> None:
    tree = script("true\n")
    contents = [[0, tree["start.sh"].data]]  # type: ignore[union-attr]
    submit = {"job_id": "j", "job": {"script": "start.sh"}}
    reply = harness.ok("upload_begin", manifest=manifest_of(tree), contents=contents, submit=submit)
    assert asked(reply) == [] and reply["job_id"] == "j"  # a new queue: the agent copies itself
    assert harness.wait_end("j")["exit_code"] == 0


MANIFEST = folder_manifest()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"paths": b"../x"}, protocol.ERR_INVALID),
        ({"paths": b"/x"}, protocol.ERR_INVALID),
        ({"paths": b"a/./b"}, protocol.ERR_BAD_REQUEST),
        ({"paths": b"a//b"}, protocol.ERR_BAD_REQUEST),
        ({"paths": b""}, protocol.ERR_BAD_REQUEST),
        ({"paths": b"x\0x", "kinds": "dd", "modes": b"\0\0" * 2, "sizes": b"\0" * 16}, "Inv"),
        ({"kinds": "x"}, protocol.ERR_BAD_REQUEST),
        ({"kinds": b"d"}, protocol.ERR_BAD_REQUEST),
        ({"modes": b"\0\x10"}, protocol.ERR_BAD_REQUEST),  # 0o10000
        ({"modes": b"\0"}, protocol.ERR_BAD_REQUEST),
        ({"sizes": b"\0" * 9}, protocol.ERR_BAD_REQUEST),
        ({"sizes": b"\x01" + b"\0" * 7}, protocol.ERR_BAD_REQUEST),  # a folder with a size
        ({"kinds": "f", "sizes": b"\0" * 7 + b"\x40"}, protocol.ERR_BAD_REQUEST),  # 2**62
        ({"kinds": "f", "sizes": b"\x05" + b"\0" * 7}, protocol.ERR_BAD_REQUEST),  # no digest
        ({"digests": b"\0" * 32}, protocol.ERR_BAD_REQUEST),  # a digest for nothing
        ({"kinds": "f", "sizes": b"\x05" + b"\0" * 7, "digests": b"\0" * 31}, "Bad"),
        ({"kinds": "l"}, protocol.ERR_BAD_REQUEST),  # no target
        ({"kinds": "l", "targets": b"a\0b"}, protocol.ERR_BAD_REQUEST),
        ({"targets": b"a"}, protocol.ERR_BAD_REQUEST),  # a target for nothing
        ({"extra": b""}, protocol.ERR_BAD_REQUEST),
        ({"paths": None}, protocol.ERR_BAD_REQUEST),
        ({"kinds": "", "modes": b"", "sizes": b""}, protocol.ERR_BAD_REQUEST),  # paths for nothing
    ],
)
def test_bad_manifests_are_refused_before_anything_is_written(
    harness: Harness, change: dict[str, Any], error: str
) -> None:
    manifest = {k: v for k, v in {**MANIFEST, **change}.items() if v is not None}
    error = {"Inv": protocol.ERR_INVALID, "Bad": protocol.ERR_BAD_REQUEST}.get(error, error)
    harness.fail(error, "upload_begin", manifest=manifest)
    assert not os.path.lexists(harness.queue)


@pytest.mark.parametrize("manifest", [None, b"[]", [], {}, "x", MANIFEST["paths"]])
def test_a_manifest_of_the_wrong_type_is_a_bad_request(harness: Harness, manifest: Any) -> None:
    harness.fail(protocol.ERR_BAD_REQUEST, "upload_begin", manifest=manifest)
    assert not os.path.lexists(harness.queue)


# -- the module itself -----------------------------------------------------------------


def test_agent_is_standard_library_only_and_python38() -> None:
    """Every file of the bundle parses as Python 3.8 and imports only the standard library
    (or the bundle itself, by relative imports); the client ships exactly these files."""
    roots = set()
    for path, data in own_files().items():
        tree = ast.parse(data.decode("utf-8"), filename=path, feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module, ast.dump(node)
                roots.add(node.module.split(".")[0])
    assert {"os", "json", "ctypes"} <= roots  # nested imports are seen too
    builtin_hashes = {"_sha2", "_sha256"}  # one or the other, by Python version
    assert sorted(roots - sys.stdlib_module_names - builtin_hashes) == []
    assert "remote_agent.py" in own_files() and "protocol.py" in own_files()
    shipped = tej.bootstrap.agent_bundle()
    assert shipped.name == own_name()
    assert {path: text.encode() for path, text in shipped.sources.items()} == own_files()


# -- the index's rows of ended jobs ------------------------------------------------


def test_list_rows_follow_changes_deletes_and_survive_damage(harness: Harness) -> None:
    first = harness.run(script("exit 3\n"), job_id="first")
    harness.run(script("true\n"), job_id="second")
    assert first["exit_code"] == 3
    listed = {job["id"]: job for job in harness.jobs_listed()}
    assert (listed["first"]["exit_code"], listed["second"]["exit_code"]) == (3, 0)
    rows = Path(harness.queue) / "index" / "rows"
    assert len(os.listdir(rows)) >= 2  # a segment per ended job
    # A record written again after the end (as when notifications are recorded) is listed so.
    record = harness.record("first")
    write_status(str(harness.job_dir("first")), dict(record, reason="changed"))
    assert {job["id"]: job["reason"] for job in harness.jobs_listed()}["first"] == "changed"
    # A deleted job leaves the list.
    harness.ok("delete", job_id="second")
    assert [job["id"] for job in harness.jobs_listed()] == ["first"]
    # Rows are only derived: damaged or lost, they are read again from the job folders.
    for name in os.listdir(rows):
        (rows / name).write_text("first\tfinished\tnot a number\n")
    assert [job["reason"] for job in harness.jobs_listed()] == ["changed"]
    shutil.rmtree(rows)
    assert [job["reason"] for job in harness.jobs_listed()] == ["changed"]


def test_many_row_segments_are_merged(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "MERGE_SEGMENTS", 2)
    for name in ("a", "b", "c", "d"):
        harness.run(script("true\n"), job_id=name)
    rows = Path(harness.queue) / "index" / "rows"
    assert len(os.listdir(rows)) > 2
    assert [job["id"] for job in harness.jobs_listed()] == ["a", "b", "c", "d"]
    assert len(os.listdir(rows)) == 1
    assert [job["id"] for job in harness.jobs_listed()] == ["a", "b", "c", "d"]


def test_list_never_caches_a_running_job(harness: Harness) -> None:
    job_id = harness.submit(script("sleep 30\n"), job_id="busy")
    harness.wait_running(job_id)
    assert [job["state"] for job in harness.jobs_listed()] == [protocol.STATE_RUNNING]
    assert harness.ok("kill", job_id=job_id)["killed"] is True
    assert [job["state"] for job in harness.jobs_listed()] == [protocol.STATE_KILLED]


@pytest.mark.parametrize("when", [0.0, 951782400.5, 1709164800.25, 4102444799.999999, 1e9])
def test_times_read_back_as_written(when: float) -> None:
    """parse_iso (its own calendar arithmetic) reads now_iso's text back to the microsecond."""
    import calendar

    text = files.now_iso(when)
    assert abs(files.parse_iso(text) - when) < 2e-6
    whole = calendar.timegm(time.gmtime(int(when)))
    assert int(files.parse_iso(text)) == whole
