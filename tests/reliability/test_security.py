"""Security: private files, no shell anywhere, an agent that checks every request, secrets.

* The queue, every job folder and every file tej keeps are private to the SSH user (0700
  folders, 0600 files), even when the server's umask would make them public (000 here).
* No string the user gives reaches a shell: ids, script arguments, environment values,
  output paths, the queue path and file names full of `$(...)`, backticks, `;`, quotes and
  newlines arrive intact and nothing they name is ever run.
* The agent checks every request on its own: a systematic table of malformed requests
  (every argument of every operation replaced by values of the wrong type, hostile values,
  missing and unknown arguments, broken envelopes) gets an error reply, never an exception
  and never an InternalError.
* `--env-secret NAME` reaches the job, and nothing else: not the queue's files, not
  `status`/`list --json`, not the supervisor's environment or command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import stat
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import execnet
import pytest
from helpers import (
    Target,
    folder_manifest,
    kill_processes_under,
    process_alive,
    wait_until,
)
from sshd import SshServer, login_script_lines

import tej
from tej import protocol
from tej.server.service import Connection
from tej.transfer import Entry, encode_manifest

SECRET_NAME = "TEJ_TEST_SECRET"


def run_cli(
    target: Target, *args: str, queue: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`tej COMMAND DEST --queue Q [--ssh-config F] ARGS` with this worktree's code.

    The first of args is the command. The client runs with umask 000 (it is the server's
    umask for `local`).
    """
    command, *rest = args
    umask_000 = ["sh", "-c", 'umask 000 && exec "$@"', "sh"]
    done = target.cli(command, *rest, queue=queue or target.queue, env=env, prefix=umask_000)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout_bytes, done.stderr_bytes
    )


def submitted_id(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "Job submitted as:", lines
    return lines[-1]


# -- 0700 folders, 0600 files -------------------------------------------------


@contextlib.contextmanager
def login_block(server: SshServer, lines: list[str]) -> Iterator[None]:
    """Prepend lines to the SSH user's ~/.bashrc and ~/.profile for this sshd's port only."""
    with login_script_lines(server, lines, "test_security umask"):
        yield


def tej_files(queue: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every path under the queue that tej made, i.e. not a job's uploaded files.

    The store's blobs are uploaded files too (linked into the jobs, with their modes):
    their folders are tej's.
    """
    yield queue, os.lstat(queue)
    for folder, dirs, files in os.walk(queue):
        relative = Path(folder).relative_to(queue).parts
        if len(relative) >= 3 and relative[0] == "jobs" and relative[2] == "work":
            dirs[:] = []
            continue
        blobs = len(relative) == 2 and relative[0] == "store" and relative[1] != "leases"
        for name in dirs + ([] if blobs else files):
            path = Path(folder, name)
            if path.relative_to(queue).parts[2:3] != ("work",):
                yield path, os.lstat(path)


def test_queue_and_jobs_are_private(target: Target) -> None:
    """Everything tej writes is its owner's alone, even under umask 000."""
    if target.kind == "ssh":
        server = target.server
        with login_block(server, ["  umask 000;;"]):
            seen = subprocess.run(
                server.ssh_argv("-o", "ControlPath=none", "umask"),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert seen.stdout.strip() == "0000", "umask 000 is not in effect: proves nothing"
            private_jobs(target)
    else:
        private_jobs(target)


def private_jobs(target: Target) -> None:
    kept = target.make_job("kept", "#!/bin/sh\necho out; echo err >&2\n")
    (kept / "public.txt").write_text("mine\n")
    (kept / "public.txt").chmod(0o644)
    to_file = target.make_job(
        "tofile",
        "#!/bin/sh\necho out; echo err >&2\n",
        files={"tej.json": json.dumps({"stdout": "logs/deep/out.txt", "stderr": "err.txt"})},
    )
    sleeper = target.make_job("sleeper", "#!/bin/sh\nsleep 30\n")
    # --no-reuse: a connection shared from before the umask changed would hide it.
    ids = [
        submitted_id(run_cli(target, "submit", "--no-reuse", str(job))) for job in (kept, to_file)
    ]
    sleeper_id = submitted_id(run_cli(target, "submit", "--no-reuse", str(sleeper)))
    for job_id in ids:
        target.wait_for(job_id)
    killed = run_cli(target, "kill", "--no-reuse", "--id", sleeper_id)
    assert killed.returncode == 0, killed.stderr
    target.wait_for(sleeper_id)

    queue = Path(target.queue)
    owner = target.server.uid if target.server is not None else os.getuid()
    problems = []

    def expect(path: Path, mode: int) -> None:
        actual = stat.S_IMODE(os.lstat(path).st_mode)
        if actual != mode:
            problems.append(f"{path} is {actual:04o}, not {mode:04o}")

    # What tej keeps: folders 0700, files 0600, all the SSH user's.
    for path, info in tej_files(queue):
        if info.st_uid != owner:
            problems.append(f"{path} belongs to uid {info.st_uid}, not {owner}")
        if not stat.S_ISLNK(info.st_mode):
            expect(path, 0o700 if stat.S_ISDIR(info.st_mode) else 0o600)
    # The ones the issue names, in case tej_files missed them.
    expect(queue, 0o700)
    for job_id in [*ids, sleeper_id]:
        expect(queue / "jobs" / job_id, 0o700)
        for name in ("job.json", "status.json", "supervisor.log"):
            expect(queue / "jobs" / job_id / name, 0o600)
    kept_dir = queue / "jobs" / ids[0]
    for name in ("stdout", "stderr"):
        expect(kept_dir / name, 0o600)
    assert (kept_dir / "stdout").read_text() == "out\n"
    # The job's own files keep their modes; the output tej writes among them is private,
    # and so are the folders it makes for it.
    expect(kept_dir / "work" / "public.txt", 0o644)
    work = queue / "jobs" / ids[1] / "work"
    assert (work / "logs" / "deep" / "out.txt").read_text() == "out\n"
    for path in (work / "logs" / "deep" / "out.txt", work / "err.txt"):
        expect(path, 0o600)
    for path in (work / "logs", work / "logs" / "deep"):
        expect(path, 0o700)
    assert not problems, "\n".join(problems)


# -- no shell -----------------------------------------------------------------


def payloads(token: str) -> list[str]:
    """Strings that run `touch pwned-TOKEN-N` if anything hands them to a shell."""
    return [
        f"$(touch /tmp/pwned-{token}-1)",
        f"$(touch pwned-{token}-2)",
        f"`touch pwned-{token}-3`",
        f"; touch pwned-{token}-4 ;",
        f"| touch pwned-{token}-5",
        f"&& touch pwned-{token}-6 #",
        f"'; touch pwned-{token}-7; '",
        f'"; touch pwned-{token}-8; "',
        f"\ntouch pwned-{token}-9\n",
    ]


def pwned_files(token: str, trees: list[Path], folders: list[Path]) -> list[str]:
    """The files `pwned-TOKEN-N` in trees (recursively) or folders (their top level)."""
    pattern = re.compile(rf"pwned-{token}-\d+\Z")
    found = []
    for folder in [Path("/"), Path("/tmp"), *folders]:
        found += [str(path) for path in folder.glob(f"pwned-{token}-*")]
    for tree in trees:
        for parent, dirs, files in os.walk(tree):
            found += [os.path.join(parent, n) for n in dirs + files if pattern.match(n)]
    return sorted(set(found))


def test_the_payloads_work_in_a_shell(tmp_path: Path) -> None:
    """The control of the next test: each payload makes its file once a shell sees it.

    Each is tried bare, in single quotes and in double quotes, the ways a careless
    program would paste it into a command line.
    """
    token = uuid.uuid4().hex[:12]
    for payload in payloads(token):
        payload = payload.replace("/tmp/", f"{tmp_path}/")
        for quoted in (payload, f"'{payload}'", f'"{payload}"'):
            subprocess.run(
                ["sh", "-c", f"echo {quoted}"], cwd=tmp_path, capture_output=True, check=False
            )
    made = sorted(path.name for path in tmp_path.iterdir())
    assert made == sorted(f"pwned-{token}-{n}" for n in range(1, 10)), made


def test_no_user_string_reaches_a_shell(target: Target) -> None:
    token = uuid.uuid4().hex[:12]
    evil = payloads(token)
    names = [
        *(p for p in evil if "/" not in p),
        'it\'s "quoted" & | > <',
        "new\nline",
        "-rf",
        "*",
        "~",
        "$HOME",
        "x;y",
    ]
    script = f"bin/run {evil[0]} {evil[2]} ';.sh"
    output = f"out {evil[1]}.txt"
    job = target.make_job(
        "evil",
        None,
        files={
            script: "#!/bin/sh\nprintf '%s\\0' \"$@\" > args.bin\nprintf '%s' \"$X\" > env.bin\n",
            "tej.json": json.dumps({"args": [*evil, "a'b\"c", "line\nbreak", "*", "", " "]}),
            f"dir {evil[3]}/{evil[4]} inner": "nested\n",
        },
    )
    (job / script).chmod(0o755)
    for name in names:
        (job / name).write_text(name)
    queue = os.path.join(os.path.dirname(target.queue), f"q {evil[5]} {evil[6]}")
    job_id = f"-rf={token}%s:@,+x."
    done = run_cli(
        target,
        "submit",
        f"--id={job_id}",
        "--script",
        script,
        "--env",
        f"X={evil[7]}",
        "--stdout",
        output,
        str(job),
        queue=queue,
    )
    assert submitted_id(done) == job_id
    status_path = Path(queue, "jobs", job_id, "status.json")
    wait_until(
        lambda: (
            json.loads(status_path.read_text())["state"] == "finished"
            if status_path.exists()
            else False
        ),
        30,
        "the job to finish",
    )
    work = os.path.join(queue, "jobs", job_id, "work")
    status = json.loads(status_path.read_text())
    assert status["exit_code"] == 0, status
    expected_args = [*evil, "a'b\"c", "line\nbreak", "*", "", " "]
    with open(os.path.join(work, "args.bin"), "rb") as stream:
        assert stream.read() == b"".join(arg.encode() + b"\0" for arg in expected_args)
    with open(os.path.join(work, "env.bin"), "rb") as stream:
        assert stream.read() == evil[7].encode()
    assert sorted(os.listdir(work)) == sorted([*os.listdir(job), "args.bin", "env.bin", output])
    for name in names:
        with open(os.path.join(work, name)) as stream:
            assert stream.read() == name
    # Back down, names intact.
    back = run_cli(target, "download", "--id", job_id, ".:back", queue=queue)
    assert back.returncode == 0, back.stderr
    local = target.client_dir / "back"
    for name in names:
        assert (local / name).read_text() == name
    assert (local / f"dir {evil[3]}" / f"{evil[4]} inner").read_text() == "nested\n"
    listed = run_cli(target, "list", "--json", queue=queue)
    assert [item["id"] for item in json.loads(listed.stdout)] == [job_id]
    trees = [Path(queue), target.client_dir, Path(target.queue).parent]
    folders = [Path(target.home), target.client_dir.parent]
    assert not pwned_files(token, trees, folders)


# -- the agent checks every request -------------------------------------------

KNOWN_ERRORS = {
    protocol.ERR_BAD_REQUEST,
    protocol.ERR_INVALID,
    protocol.ERR_JOB_NOT_FOUND,
    protocol.ERR_JOB_EXISTS,
    protocol.ERR_JOB_RUNNING,
    protocol.ERR_QUEUE,
    protocol.ERR_SERVER,
}


def nested(depth: int) -> Any:
    value: Any = "deep"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# Values of every kind execnet can carry, none of them what any argument expects.
JUNK: list[tuple[str, Any]] = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("zero", 0),
    ("minus-one", -1),
    ("int64", 2**63),
    ("huge-int", 10**400),
    ("float", 1.5),
    ("nan", math.nan),
    ("inf", math.inf),
    ("minus-inf", -math.inf),
    ("complex", 1j),
    ("empty-str", ""),
    ("nul-str", "a\0b"),
    ("huge-str", "x" * 200_000),
    ("empty-bytes", b""),
    ("bytes", b"start.sh"),
    ("bad-utf8", b"\xff\xfe"),
    ("empty-list", []),
    ("list-of-none", [None]),
    ("empty-dict", {}),
    ("dict", {"a": 1}),
    ("int-keys", {1: 2}),
    ("tuple", (1, "a", b"b")),
    ("set", {1, 2}),
    ("frozenset", frozenset(["a"])),
    ("nested-40", nested(40)),
    ("nested-rows", [[[b"a", 0, b"x"]]]),
    ("bad-row", [[b"start.sh", -1, 5]]),
    ("short-row", [[b"start.sh", 0]]),
    ("str-row", [["start.sh", 0, 5]]),
    ("bool-row", [[b"start.sh", True, b"x"]]),
    ("huge-row", [[b"start.sh", 10**30, 10**30]]),
]

# Values of the right type that name what they must not: each must be refused.
HOSTILE: dict[str, list[tuple[str, Any]]] = {
    "job_id": [
        ("dotdot", ".."),
        ("dot", "."),
        ("slash", "a/b"),
        ("up", "../jobs"),
        ("absolute", "/etc"),
        ("newline", "a\nb"),
        ("shell", "$(touch pwned)"),
        ("long", "x" * 129),
    ],
    "token": [("dotdot", ".."), ("up", "../jobs"), ("absolute", "/tmp"), ("upper", "ABC")],
    "path": [
        ("dotdot", b".."),
        ("up", b"../job.json"),
        ("absolute", b"/etc/passwd"),
        ("inner-up", b"a/../../job.json"),
        ("nul", b"a\0b"),
        ("escape", b"escape"),
        ("escape-dir", b"escape-dir/passwd"),
    ],
    "stream": [("stdin", "stdin"), ("job-file", "job.json"), ("up", "../stdout")],
    "chunks": [
        ("up", [[b"../job.json", 0, 10]]),
        ("absolute", [[b"/etc/passwd", 0, 10]]),
        ("escape", [[b"escape", 0, 10]]),
        ("nul", [[b"a\0b", 0, 10]]),
        ("not-asked", [[1, 0, b"x"]]),
        ("past-end", [[0, 0, b"x" * 100]]),
        ("gap", [[0, 3, b"x"]]),
    ],
    "manifest": [
        ("up", folder_manifest(paths=b"../x")),
        ("absolute", folder_manifest(paths=b"/tmp/x")),
        ("inner-up", folder_manifest(paths=b"a/../../x")),
        ("dot", folder_manifest(paths=b".")),
        ("empty-path", folder_manifest(paths=b"")),
        ("twice", folder_manifest(paths=b"x\0x", kinds="dd", modes=b"\0\0" * 2, sizes=b"\0" * 16)),
        ("kind", folder_manifest(kinds="p")),
        ("mode", folder_manifest(modes=b"\xff\xff")),
        ("size", folder_manifest(kinds="f", sizes=b"\xff" * 8, digests=b"\0" * 32)),
        ("short-column", folder_manifest(sizes=b"\0" * 7)),
        ("dir-size", folder_manifest(sizes=b"\x01" + b"\0" * 7)),
        ("digest-count", folder_manifest(kinds="f", sizes=b"\x05" + b"\0" * 7)),
        ("extra-digest", folder_manifest(digests=b"\0" * 32)),
        ("link-no-target", folder_manifest(kinds="l")),
        ("link-empty-target", folder_manifest(kinds="l", targets=b"")),
        ("target-count", folder_manifest(kinds="l", targets=b"a\0b")),
        ("kinds-not-str", folder_manifest(kinds=b"d")),
        ("paths-not-bytes", folder_manifest(paths="x")),
        ("missing-column", {"paths": b"x", "kinds": "d"}),
        ("extra-column", dict(folder_manifest(), more=b"")),
        ("rows", [[b"x", "d", 0o755, 0]]),
    ],
    "job": [
        ("script-up", {"script": "../../job.json"}),
        ("script-absolute", {"script": "/bin/sh"}),
        ("stdout-up", {"stdout": "../../stdout"}),
        ("env-value", {"env": {"A": 1}}),
        ("args-nul-type", {"args": [b"x"]}),
    ],
    "secrets": [("bad-name", {"A=B": "x"}), ("not-text", {"A": b"x"})],
    "runner": [("unknown", "nosuchplugin")],
    "links": [("nul", ["a\0b"]), ("empty", [""]), ("self", ["{queue}"])],
    "protocol": [("next", protocol.PROTOCOL_VERSION + 1)],
}


# Odd values of the right type: any reply will do, but an answer, not an InternalError.
ODD: dict[str, list[tuple[str, Any]]] = {
    "contents_since": [("negative", -1), ("future", 2**62)],
    "queue": [
        ("missing", "{root}/missing/queue"),
        ("relative", "relative/queue"),
        ("file", "/etc/passwd"),
        ("device", "/dev/null"),
        ("root", "/"),
        ("proc", "/proc"),
    ],
    "offset": [("past-end", 10**9)],
    "length": [("huge", 10**12)],
    "lines": [("huge", 10**12)],
}


class Fuzzer:
    """An Agent serving a real queue with real jobs, and the valid arguments of every op."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue = str(root / "queue")
        self.agent = Connection()
        self.serial = 0
        self.call("hello", protocol=protocol.PROTOCOL_VERSION)
        self.submit("target", links={"escape": b"/etc/passwd", "escape-dir": b"/etc"})
        self.submit("victim")
        for job_id in ("target", "victim"):
            self.wait_for(job_id)

    def call(self, op: str, **args: Any) -> Any:
        reply = self.agent.handle({"v": protocol.PROTOCOL_VERSION, "op": op, "args": args})
        assert reply["ok"], (op, reply)
        return reply["result"]

    def staged(
        self, script: bytes = b"#!/bin/sh\necho hello\n", links: Any = None, send: bool = True
    ) -> str:
        """A fresh upload with a start.sh (sent, unless the store has it); returns its token."""
        digest = hashlib.sha256(script).hexdigest()
        entries = [Entry(b"start.sh", "f", 0o755, len(script), digest=digest)]
        for name, target in (links or {}).items():
            entries.append(Entry(name.encode(), "l", 0o777, target=target))
        begun = self.call("upload_begin", queue=self.queue, manifest=encode_manifest(entries))
        token = str(begun["token"])
        if send and json.loads(begun["missing"]):
            self.call("upload_data", queue=self.queue, token=token, chunks=[[0, 0, script]])
        return token

    def submit(
        self, job_id: str, script: bytes = b"#!/bin/sh\necho hello\n", links: Any = None
    ) -> None:
        token = self.staged(script, links)
        self.call("submit", queue=self.queue, token=token, job_id=job_id)

    def wait_for(self, job_id: str) -> None:
        wait_until(
            lambda: self.call("status", queue=self.queue, job_id=job_id)["state"] == "finished",
            30,
            f"{job_id} to finish",
        )

    def manifest_args(self, op: str) -> dict[str, Any]:
        """Arguments of upload_begin, or of the upload_manifest after one: a job submitted at once.

        The tree: a folder `x` (upload_manifest: sent before), then a new start.sh, sent along.
        """
        script = b"#!/bin/sh\necho %d\n" % self.serial
        token = "%x%08x" % (int(time.time()), self.serial)
        digest = hashlib.sha256(script).hexdigest()
        script_part = encode_manifest([Entry(b"start.sh", "f", 0o755, len(script), digest=digest)])
        submit = {"job_id": f"fuzz-{self.serial}", "job": {"script": "start.sh"}}
        args = {"queue": self.queue, "token": token, "submit": submit, "more": False}
        if op == "upload_begin":
            return dict(args, manifest=script_part, contents=[[0, script]])
        self.call(
            "upload_begin", queue=self.queue, token=token, manifest=folder_manifest(), more=True
        )
        return dict(args, manifest=script_part, contents=[[1, script]])

    def valid_args(self, op: str) -> dict[str, Any]:
        """Arguments that make op succeed, fresh for the ops that consume them.

        Also puts the agent back as the client leaves it (a valid hello), and the job
        that `delete` removes back in the queue.
        """
        self.call("hello", protocol=protocol.PROTOCOL_VERSION)
        queue = self.queue
        self.serial += 1
        if op == "delete" and not os.path.isdir(os.path.join(queue, "jobs", "victim")):
            self.submit("victim")
            self.wait_for("victim")
        if op in ("upload_begin", "upload_manifest"):
            return self.manifest_args(op)
        if op in ("upload_data", "upload_abort", "submit"):
            # A new script each time, so upload_data has something to send.
            script = b"#!/bin/sh\necho %d\n" % self.serial
            token = self.staged(script, send=op != "upload_data")
            return {
                "upload_data": {"queue": queue, "token": token, "chunks": [[0, 0, script[:5]]]},
                "upload_abort": {"queue": queue, "token": token},
                "submit": {
                    "queue": queue,
                    "token": token,
                    "job_id": f"fuzz-{self.serial}",
                    "id_name": "fuzz",
                    "job": {"script": "start.sh", "args": ["a"], "env": {"A": "1"}},
                    "secrets": {"S": "s"},
                    "params": None,
                },
            }[op]
        return {
            "hello": {"protocol": protocol.PROTOCOL_VERSION},
            "setup": {
                "queue": str(self.root / f"setup-{self.serial}"),
                "links": [str(self.root / f"link-{self.serial}")],
                "runner": "default",
                "force": False,
                "only_links": False,
                "runner_source": None,
                "options": {},
            },
            "install_runner": {"queue": queue, "runner": "echo", "source": "#"},
            "status": {"queue": queue, "job_id": "target", "tasks": False},
            "list": {
                "queue": queue,
                "states": ["finished", "running"],
                "tasks": True,
                "short": True,
                "job_id": "target",
            },
            "list_more": {"queue": queue, "cursor": "0123abcd", "batch": 1},
            "prune": {"queue": queue, "states": ["killed"], "older_than": 3600, "dry_run": True},
            "kill": {"queue": queue, "job_id": "target"},
            "delete": {"queue": queue, "job_id": "victim", "force": False},
            "list_files": {"queue": queue, "job_id": "target", "path": b"start.sh"},
            "file_identity": {"queue": queue, "job_id": "target", "path": b"start.sh"},
            "read_chunks": {"queue": queue, "job_id": "target", "chunks": [[b"start.sh", 0, 5]]},
            "wait": {"queue": queue, "job_id": "target", "timeout": 0},
            "read_output": {
                "queue": queue,
                "job_id": "target",
                "stream": "stdout",
                "offset": 0,
                "length": 100,
                "wait": 0,
                "attempt": 1,
            },
            "tail_offset": {
                "queue": queue,
                "job_id": "target",
                "stream": "stdout",
                "lines": 1,
                "attempt": 1,
            },
            "resubmit": {
                "queue": queue,
                "job_id": "target",
                "new_id": f"fuzz-{self.serial}",
                "job": {"script": "start.sh", "args": ["a"], "env": {"A": "1"}},
                "secrets": {"S": "s"},
            },
            "sync_list": {
                "queue": queue,
                "job_id": "target",
                "paths": [],
                "since": None,
                "missing_ok": False,
                "contents_since": 0,
            },
            "sync_hash": {"queue": queue, "job_id": "target", "files": [[b"start.sh", 5, 0, 0]]},
            "sync_read": {
                "queue": queue,
                "job_id": "target",
                "paths": b"start.sh",
                "numbers": struct.pack("<qqqqQ", 0, 5, 5, 0, 0),
                "checks": [[0, "0" * 64]],
            },
            "store_has": {"queue": queue, "digests": bytes(32), "modes": b"\xed\x01"},
            "doctor": {"queue": queue},
        }[op]


class Case:
    """One malformed request: made fresh when sent; must_refuse: only an error will do."""

    def __init__(
        self, description: str, make: Callable[[], Any], must_refuse: bool = False
    ) -> None:
        self.description = description
        self.make = make
        self.must_refuse = must_refuse


def with_arg(fuzzer: Fuzzer, op: str, name: str, value: Any) -> Callable[[], Any]:
    """A maker of op's valid request with one argument replaced ({queue}/{root} filled in)."""

    def make() -> Any:
        args = fuzzer.valid_args(op)
        fill = {"{queue}": args.get("queue", fuzzer.queue), "{root}": str(fuzzer.root)}

        def filled(item: Any) -> Any:
            if isinstance(item, str):
                for key, text in fill.items():
                    item = item.replace(key, text)
            elif isinstance(item, list):
                item = [filled(element) for element in item]
            return item

        return envelope(op, dict(args, **{name: filled(value)}))

    return make


def malformed_requests(fuzzer: Fuzzer) -> Iterator[Case]:
    """Every malformed request of the table."""
    for op, handler in sorted(all_handlers().items()):
        params = dict(list(inspect.signature(handler).parameters.items())[1:])  # not connection
        valid = fuzzer.valid_args(op)
        assert set(valid) == set(params), f"the table of {op} is out of date: {list(params)}"
        for name in params:
            for label, value in JUNK + ODD.get(name, []):
                yield Case(f"{op}({name}={label})", with_arg(fuzzer, op, name, value))
            for label, value in HOSTILE.get(name, []):
                yield Case(f"{op}({name}={label})", with_arg(fuzzer, op, name, value), True)
        for name, param in params.items():
            if param.default is inspect.Parameter.empty:
                without = with_arg(fuzzer, op, name, None)
                yield Case(
                    f"{op}(without {name})",
                    lambda without=without, name=name: drop(without(), name),
                    True,
                )
        yield Case(f"{op}(unknown argument)", with_arg(fuzzer, op, "bogus", 1), True)
    V = protocol.PROTOCOL_VERSION
    broken: list[tuple[str, Any]] = [
        ("not a dict", ["status"]),
        ("none", None),
        ("bytes", b'{"v": 2}'),
        ("no version", {"op": "list", "args": {}}),
        ("next version", {"v": V + 1, "op": "list", "args": {}}),
        ("version as text", {"v": str(V), "op": "list", "args": {}}),
        ("no op", {"v": V, "args": {}}),
        ("unknown op", {"v": V, "op": "rm_rf", "args": {}}),
        ("private method", {"v": V, "op": "reserve_id", "args": {}}),
        ("dunder op", {"v": V, "op": "__init__", "args": {}}),
        ("op as bytes", {"v": V, "op": b"list", "args": {}}),
        ("op as list", {"v": V, "op": ["list"], "args": {}}),
        ("op as dict", {"v": V, "op": {"list": 1}, "args": {}}),
        ("args as list", {"v": V, "op": "list", "args": [fuzzer.queue]}),
        ("args as none", {"v": V, "op": "list", "args": None}),
        ("args with int keys", {"v": V, "op": "list", "args": {1: fuzzer.queue}}),
        ("args with bytes keys", {"v": V, "op": "list", "args": {b"queue": fuzzer.queue}}),
    ]
    for label, request in broken:
        yield Case(f"envelope: {label}", lambda request=request: request, True)


def all_handlers() -> dict[str, Callable[..., Any]]:
    """Every operation's handler, as tej.protocol.OPERATIONS names them."""
    import importlib

    return {
        op: importlib.import_module(f"tej.server.handlers.{module}").HANDLERS[op]
        for op, module in protocol.OPERATIONS.items()
    }


def drop(request: dict[str, Any], name: str) -> dict[str, Any]:
    del request["args"][name]
    return request


def envelope(op: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"v": protocol.PROTOCOL_VERSION, "op": op, "args": args}


@pytest.fixture
def fuzzer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fuzzer]:
    """An agent in this process, its HOME and working directory in tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    try:
        yield Fuzzer(tmp_path)
    finally:
        kill_processes_under(str(tmp_path))


def test_the_agent_answers_every_malformed_request(fuzzer: Fuzzer) -> None:
    problems: list[str] = []
    internal: list[str] = []
    count = 0
    for case in malformed_requests(fuzzer):
        request = case.make()
        try:
            # What the agent receives is what went through execnet's serializer.
            request = execnet.loads(execnet.dumps(request))
        except execnet.DataFormatError as exc:
            problems.append(f"{case.description}: not serializable ({exc})")
            continue
        count += 1
        started = time.monotonic()
        try:
            reply = fuzzer.agent.handle(request)
        except BaseException as exc:  # noqa: BLE001 - that is the failure
            problems.append(f"{case.description}: raised {type(exc).__name__}: {exc}"[:300])
            continue
        elapsed = time.monotonic() - started
        if elapsed > 5:
            problems.append(f"{case.description}: took {elapsed:.1f} s")
        problems += check_reply(case, reply, internal)
    assert count >= 500, count
    report = []
    if problems:
        report += [f"{len(problems)} of {count} requests were mishandled:", *problems]
    if internal:
        report += [f"{len(internal)} of {count} requests got an InternalError:", *internal]
    assert not report, "\n".join(report)


def check_reply(case: Case, reply: Any, internal: list[str]) -> list[str]:
    """A well-formed reply that execnet can carry back; InternalErrors are listed apart."""
    description = case.description
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return [f"{description}: reply {reply!r:.200}"]
    try:
        execnet.dumps(reply)
    except execnet.DataFormatError as exc:
        return [f"{description}: the reply can't be sent back ({exc})"]
    if reply["ok"]:
        if case.must_refuse:
            return [f"{description}: accepted ({reply.get('result')!r:.100})"]
        return [] if "result" in reply else [f"{description}: ok without a result"]
    if reply.get("error") == protocol.ERR_INTERNAL:
        internal.append(f"{description}: {reply.get('message')!s:.200}")
        return []
    problems = []
    if reply.get("error") not in KNOWN_ERRORS:
        problems.append(f"{description}: unknown error type {reply.get('error')!r}")
    if not isinstance(reply.get("message"), str) or "\n" in reply["message"][:1000]:
        problems.append(f"{description}: message {reply.get('message')!r:.200}")
    return problems


def test_a_nan_duration_never_blocks_the_agent(fuzzer: Fuzzer) -> None:
    """`wait` and `read_output` block at most their duration: NaN must not mean forever."""
    fuzzer.submit("sleeper", script=b"#!/bin/sh\nexec sleep 60\n")
    queue = fuzzer.queue
    requests = {
        "wait(timeout=nan)": {"queue": queue, "job_id": "sleeper", "timeout": math.nan},
        "read_output(wait=nan)": {
            "queue": queue,
            "job_id": "sleeper",
            "stream": "stdout",
            "offset": 0,
            "length": 100,
            "wait": math.nan,
        },
    }
    threads = {}
    for description, args in requests.items():
        # An agent for each: a hung one stays blocked until the job dies (at teardown).
        request = envelope(description.split("(")[0], args)
        threads[description] = threading.Thread(
            target=Connection().handle, args=(request,), daemon=True
        )
        threads[description].start()
    deadline = time.monotonic() + 5
    for thread in threads.values():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [f"{name}: no answer in 5 s" for name, thread in threads.items() if thread.is_alive()]
    assert not hung, "\n".join(hung)


# -- secrets ------------------------------------------------------------------

SECRET_JOB = (
    "#!/bin/sh\n"
    f'printf "%s" "${SECRET_NAME}" | sha256sum | cut -d" " -f1 > secret.sha256\n'
    "echo started > started.txt\n"
    "exec sleep 60\n"
)


def secret_leaks(secret: str, root: Path) -> list[str]:
    """Files under root holding the secret (as is, in hex or in base64)."""
    import base64

    forms = [secret.encode(), secret.encode().hex().encode(), base64.b64encode(secret.encode())]
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError), open(path, "rb") as stream:
                data = stream.read()
            if any(form in data for form in forms):
                found.append(path)
    return found


def proc_bytes(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as stream:
        return stream.read()


def test_env_secret_reaches_only_the_job(target: Target) -> None:
    secret = "s3cr3t" + uuid.uuid4().hex
    job = target.make_job("secret", SECRET_JOB)
    if target.kind == "ssh":
        done = run_cli(
            target, "submit", "--env-secret", SECRET_NAME, str(job), env={SECRET_NAME: secret}
        )
        job_id = submitted_id(done)
    else:
        # `local` runs the agent in the client's environment, which would hold the secret:
        # the API takes it as a value instead.
        assert SECRET_NAME not in os.environ
        with tej.RemoteQueue("local", target.queue) as queue:
            job_id = queue.submit(str(job), secrets={SECRET_NAME: secret})
    work = target.work(job_id)
    wait_until(lambda: (work / "started.txt").exists(), 30, "the job to start")
    assert (work / "secret.sha256").read_text().strip() == hashlib.sha256(
        secret.encode()
    ).hexdigest(), "the job did not see the secret"
    record = target.wait_for(job_id, ("running",))  # recorded just after the job started
    supervisor, job_pid = record["supervisor"]["pid"], record["job"]["pid"]
    assert process_alive(supervisor) and process_alive(job_pid)
    # The control: the job's own environment does hold it, and this is how we would see it.
    assert secret.encode() in proc_bytes(job_pid, "environ")
    for name in ("environ", "cmdline"):
        assert secret.encode() not in proc_bytes(supervisor, name), f"supervisor's {name}"
    queue = Path(target.queue)
    assert not secret_leaks(secret, queue)
    shown = [
        run_cli(target, "status", "--id", job_id, "--json"),
        run_cli(target, "list", "--json"),
        run_cli(target, "logs", "--id", job_id),
        run_cli(target, "logs", "--id", job_id, "--stderr"),
    ]
    for done in shown:
        assert done.returncode == 0, done.stderr
        assert secret.encode() not in done.stdout + done.stderr
    metadata = json.loads(shown[0].stdout)["metadata"]
    assert metadata["secret_env"] == [SECRET_NAME]
    assert run_cli(target, "kill", "--id", job_id).returncode == 0
    target.wait_for(job_id)
    assert not secret_leaks(secret, queue)
    assert (target.job_dir(job_id) / "supervisor.log").exists()
