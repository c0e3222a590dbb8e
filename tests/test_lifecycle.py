"""A job's life as tej.json shapes it, end to end, over `local` and over a real sshd.

Real processes only: the `tej` command line (or the Python API), real jobs under their
supervisor, a real HTTP server on loopback for webhooks and a real SMTP server (aiosmtpd)
for emails. Every outcome is awaited by polling with a deadline.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from helpers import USAGE, Target, wait_until
from sshd import free_port

from tej import JobState, JobStatus, TejError, WaitTimeout

DEADLINE = 20.0
CLI_DEADLINE = 60.0


# helpers


def make_job(parent: Path, body: str, job_file: dict[str, Any] | None = None) -> Path:
    """A new job directory under parent: start.sh running body with sh, and tej.json."""
    parent.mkdir(exist_ok=True)
    directory = parent / f"job{len(list(parent.iterdir()))}"
    directory.mkdir()
    start = directory / "start.sh"
    start.write_text("#!/bin/sh\n" + body)
    start.chmod(0o755)
    if job_file is not None:
        (directory / "tej.json").write_text(json.dumps(job_file))
    return directory


def parse_time(text: str) -> datetime:
    """A UTC time from `tej status --json`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def one_error_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """Check that tej failed with exit_code and one `Error: ...` line; return the message."""
    assert done.returncode == exit_code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(r"Error: [^\n]+\n", done.stderr), repr(done.stderr)
    return done.stderr[len("Error: ") :].rstrip("\n")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def process_group(pid: int) -> int | None:
    """The process group of a live process; None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[2])


def read_pid(path: Path) -> int | None:
    """The pid a job wrote to path, once written whole."""
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text()
        if text.endswith("\n"):
            return int(text)
    return None


# a webhook receiver and an SMTP server on loopback


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


class WebhookServer:
    """An HTTP server on 127.0.0.1 that records every request and answers with given codes."""

    def __init__(self, codes: Sequence[int] = ()) -> None:
        self.codes = list(codes)
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server.lock:
                    server.requests.append(
                        Request("POST", self.path, dict(self.headers.items()), body)
                    )
                    code = server.codes.pop(0) if server.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def received(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhooks() -> Iterator[Callable[..., WebhookServer]]:
    """A factory of webhook servers (answering codes in turn, then 200), closed after."""
    servers: list[WebhookServer] = []

    def start(codes: Sequence[int] = ()) -> WebhookServer:
        servers.append(WebhookServer(codes))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Mailbox:
    """An aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def received(self) -> list[tuple[str, list[str], EmailMessage]]:
        with self.lock:
            return list(self.messages)


@dataclass
class SmtpServer:
    address: str
    mailbox: Mailbox


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server on 127.0.0.1, on a free port."""
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield SmtpServer(f"127.0.0.1:{port}", mailbox)
    controller.stop()


# webhooks


def test_webhook_posts_the_final_status(target: Target, webhooks: Any) -> None:
    hook = webhooks()
    job = make_job(target.src_dir, "echo hi\nexit 2\n", {"notify": {"webhook": hook.url}})
    job_id = target.submit(job)
    request = wait_until(hook.received, DEADLINE, "the webhook")[0]
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    body = request.json()
    assert body["id"] == job_id
    assert body["state"] == "finished"
    assert body["exit_code"] == 2
    assert body["host"] == socket.gethostname()
    assert body["queue"] == os.path.realpath(target.queue)
    started, ended = parse_time(body["started_at"]), parse_time(body["ended_at"])
    assert started <= ended
    status = wait_until(
        lambda: (s := target.status(job_id))["notifications"] and s, DEADLINE, "the record"
    )
    for key in ("id", "state", "exit_code", "signal", "started_at", "ended_at", "submitted_at"):
        assert body[key] == status[key], key
    [result] = status["notifications"]
    assert result["kind"] == "webhook"
    assert result["target"] == hook.url
    assert result["ok"] is True
    assert result["attempts"] == 1
    assert len(hook.received()) == 1


def test_webhook_is_retried_until_it_succeeds(target: Target, webhooks: Any) -> None:
    hook = webhooks(codes=[500, 500])
    job = make_job(target.src_dir, "exit 0\n", {"notify": {"webhook": hook.url}})
    job_id = target.submit(job)
    wait_until(lambda: len(hook.received()) >= 3, DEADLINE, "three deliveries")
    status = wait_until(
        lambda: (s := target.status(job_id))["notifications"] and s, DEADLINE, "the record"
    )
    [result] = status["notifications"]
    assert (result["ok"], result["attempts"]) == (True, 3)
    assert len(hook.received()) == 3
    assert all(request.json()["id"] == job_id for request in hook.received())


def test_webhook_refused_by_the_receiver_is_not_retried(target: Target, webhooks: Any) -> None:
    hook = webhooks(codes=[404])
    job = make_job(target.src_dir, "exit 0\n", {"notify": {"webhook": hook.url}})
    job_id = target.submit(job)
    status = wait_until(
        lambda: (s := target.status(job_id))["notifications"] and s, DEADLINE, "the record"
    )
    [result] = status["notifications"]
    assert (result["ok"], result["attempts"]) == (False, 1)
    assert "404" in result["error"], result["error"]
    assert len(hook.received()) == 1
    assert status["state"] == "finished"


def test_failed_webhook_is_recorded_and_changes_nothing(target: Target, webhooks: Any) -> None:
    hook = webhooks()
    closed = f"http://127.0.0.1:{free_port()}/nobody"
    job = make_job(target.src_dir, "exit 0\n", {"notify": {"webhook": [hook.url, closed]}})
    job_id = target.submit(job)
    waited = target.cli("wait", "--id", job_id, "--json")
    assert waited.returncode == 0, waited.stderr
    ended = json.loads(waited.stdout)
    assert ended["state"] == "finished"
    # The end is recorded first: the failing webhook is still being retried.
    assert all(result["target"] != closed for result in ended["notifications"])
    status = wait_until(
        lambda: (s := target.status(job_id))["notifications"] and s, DEADLINE, "the record"
    )
    good, bad = status["notifications"]
    assert (good["target"], good["ok"]) == (hook.url, True)
    assert (bad["kind"], bad["target"], bad["ok"], bad["attempts"]) == ("webhook", closed, False, 4)
    assert "refused" in bad["error"].lower(), bad["error"]
    assert (status["state"], status["exit_code"]) == ("finished", 0)
    assert status["ended_at"] == ended["ended_at"]
    log = (target.job_dir(job_id) / "supervisor.log").read_text()
    assert f"webhook {closed} failed (attempt 4)" in log


# email


def test_email_names_the_job(target: Target, smtp: SmtpServer) -> None:
    notify = {"email": "someone@example.org", "smtp": smtp.address, "from": "tej@example.net"}
    job = make_job(target.src_dir, "exit 1\n", {"notify": notify})
    job_id = target.submit(job)
    sender, recipients, message = wait_until(smtp.mailbox.received, DEADLINE, "the email")[0]
    assert sender == "tej@example.net"
    assert recipients == ["someone@example.org"]
    assert job_id in message["Subject"]
    assert "finished" in message["Subject"]
    assert message["To"] == "someone@example.org"
    assert message.get_content_type() == "text/plain"
    body = message.get_content()
    assert job_id in body
    assert "Exit code: 1" in body
    status = wait_until(
        lambda: (s := target.status(job_id))["notifications"] and s, DEADLINE, "the record"
    )
    [result] = status["notifications"]
    assert (result["kind"], result["target"], result["ok"]) == (
        "email",
        "someone@example.org",
        True,
    )


def test_email_only_for_the_chosen_end_states(target: Target, smtp: SmtpServer) -> None:
    quiet = make_job(
        target.src_dir,
        "exit 0\n",
        {"notify": {"email": "a@example.org", "smtp": smtp.address, "on": ["timed_out"]}},
    )
    quiet_id = target.submit(quiet, "--wait")
    loud = make_job(
        target.src_dir,
        "exit 0\n",
        {"notify": {"email": "b@example.org", "smtp": smtp.address, "on": ["finished"]}},
    )
    loud_id = target.submit(loud)
    wait_until(smtp.mailbox.received, DEADLINE, "the email of the job that notifies")
    wait_until(
        lambda: target.supervisor_gone(quiet_id), DEADLINE, "the quiet job's supervisor to exit"
    )
    [(_, recipients, message)] = smtp.mailbox.received()
    assert recipients == ["b@example.org"]
    assert loud_id in message["Subject"]
    assert target.status(quiet_id)["notifications"] == []


# nobody connected


def test_notification_arrives_after_the_client_is_gone(target: Target, webhooks: Any) -> None:
    hook = webhooks()
    job = make_job(target.src_dir, "sleep 2\necho done\n", {"notify": {"webhook": hook.url}})
    client = target.popen("submit", "--json", str(job))
    try:
        out, err = client.communicate(timeout=CLI_DEADLINE)
    finally:
        client.kill()
    assert client.returncode == 0, err
    job_id = json.loads(out)["id"]
    # The client left before the end (submit answers while the job is starting).
    assert target.record(job_id)["state"] in ("starting", "running")
    assert hook.received() == []
    request = wait_until(hook.received, DEADLINE, "the webhook, with no client connected")[0]
    body = request.json()
    assert (body["id"], body["state"], body["exit_code"]) == (job_id, "finished", 0)
    assert (target.job_dir(job_id) / "stdout").read_text() == "done\n"


# time limits


TREE_SCRIPT = """\
( sleep 1000 & echo $! > grandchild.pid; wait ) &
echo $! > child.pid
setsid sleep 1000 &
echo $! > escaped.pid
echo $$ > main.pid
sleep 1000
"""

STUBBORN_SCRIPT = """\
trap '' TERM
echo $$ > main.pid
while :; do sleep 1; done
"""


def job_pids(target: Target, job_id: str, names: Sequence[str]) -> list[int]:
    """Wait until the job wrote its pid files (it does at once); return those pids."""
    work = target.work(job_id)

    def written() -> list[int] | None:
        pids = [read_pid(work / f"{name}.pid") for name in names]
        return [pid for pid in pids if pid] if all(pids) else None

    return wait_until(written, DEADLINE, "the job's pid files")


def survivors(pids: Sequence[int]) -> list[int]:
    """The pids still alive, killed now so that none outlives the test."""
    alive = [pid for pid in pids if process_group(pid) is not None]
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return alive


def test_max_runtime_ends_the_whole_tree(target: Target) -> None:
    job = make_job(target.src_dir, TREE_SCRIPT, {"max_runtime": 1})
    job_id = target.submit(job)
    pids = job_pids(target, job_id, ["main", "child", "grandchild", "escaped"])
    waited = target.cli("wait", "--id", job_id, "--exit-code", timeout=DEADLINE)
    assert waited.returncode == 124, (waited.stdout, waited.stderr)
    assert re.fullmatch(rf"Job timed out after 0:00:0[1-4]{USAGE}\n", waited.stdout), waited.stdout
    assert survivors(pids) == []
    status = target.status(job_id)
    assert status["state"] == "timed_out"
    assert (status["signal"], status["exit_code"]) == ("SIGTERM", 128 + signal.SIGTERM)
    assert 1.0 <= status["elapsed"] < 4.0
    assert re.fullmatch(rf"Job timed out after 0:00:0[1-4]{USAGE}\n", target.status_text(job_id))
    listed = target.cli("list")
    assert re.search(rf"^{re.escape(job_id)}\s+timed_out\s", listed.stdout, re.M), listed.stdout


def test_max_runtime_kills_a_job_that_ignores_sigterm(target: Target) -> None:
    job = make_job(target.src_dir, STUBBORN_SCRIPT, {"max_runtime": 1, "kill_grace": 1})
    job_id = target.submit(job)
    pids = job_pids(target, job_id, ["main"])
    final = target.wait_for_state(
        job_id, JobState.TIMED_OUT, JobState.KILLED, JobState.FINISHED, timeout=DEADLINE
    )
    assert final.state is JobState.TIMED_OUT
    assert (final.signal, final.exit_code) == ("SIGKILL", 128 + signal.SIGKILL)
    assert final.elapsed is not None and 1.9 <= final.elapsed < 4.5  # 1 s, then 1 s of grace
    assert survivors(pids) == []


# scheduled start


def test_delayed_job_is_scheduled_then_runs(target: Target) -> None:
    job = make_job(target.src_dir, "touch ran\n", {"delay": "3s"})
    job_id = target.submit(job)
    scheduled = target.wait_for_state(
        job_id, JobState.SCHEDULED, timeout=DEADLINE
    )  # submit answers at starting
    assert scheduled.started_at is None
    assert scheduled.scheduled_for is not None and scheduled.submitted_at is not None
    delay = (scheduled.scheduled_for - scheduled.submitted_at).total_seconds()
    assert 2.9 <= delay <= 3.5, delay
    assert target.status_text(job_id).startswith("Job is scheduled to start at ")
    as_json = target.status(job_id)
    assert as_json["state"] == "scheduled"
    assert parse_time(as_json["scheduled_for"]) == scheduled.scheduled_for
    listed = target.cli("list")
    assert re.search(rf"^{re.escape(job_id)}\s+scheduled\s", listed.stdout, re.M), listed.stdout
    assert not (target.work(job_id) / "ran").exists()
    final = target.remote().wait(job_id, timeout=DEADLINE)
    assert (final.state, final.exit_code) == (JobState.FINISHED, 0)
    assert final.started_at is not None
    assert final.started_at >= scheduled.scheduled_for - timedelta(milliseconds=50)
    assert (target.work(job_id) / "ran").exists()


def test_job_killed_while_scheduled_never_starts(target: Target) -> None:
    job = make_job(target.src_dir, "touch ran\n", {"delay": 2})
    job_id = target.submit(job)
    scheduled_for = target.remote().status(job_id).scheduled_for
    assert scheduled_for is not None
    killed = target.cli("kill", "--id", job_id)
    assert (killed.returncode, killed.stdout) == (0, f"Job {job_id!r} killed\n"), killed.stderr
    status = target.status(job_id)
    assert (status["state"], status["started_at"]) == ("killed", None)
    assert target.status_text(job_id) == "Job was cancelled before it started\n"
    wait_until(lambda: target.supervisor_gone(job_id), DEADLINE, "the supervisor to exit")
    # Past the start time, with nothing left to start it, the job must not have run.
    wait_until(
        lambda: datetime.now(timezone.utc) > scheduled_for + timedelta(seconds=0.5),
        DEADLINE,
        "time",
    )
    assert not (target.work(job_id) / "ran").exists()
    assert target.status(job_id)["state"] == "killed"


def test_start_at_with_an_offset(target: Target) -> None:
    zone = timezone(timedelta(hours=-3, minutes=-30))
    start = (datetime.now(zone) + timedelta(seconds=3.5)).replace(microsecond=0)
    job = make_job(target.src_dir, "touch ran\n", {"start_at": start.isoformat()})
    job_id = target.submit(job)
    scheduled = target.wait_for_state(
        job_id, JobState.SCHEDULED, timeout=DEADLINE
    )  # submit answers at starting
    assert scheduled.scheduled_for == start
    final = target.remote().wait(job_id, timeout=DEADLINE)
    assert final.state is JobState.FINISHED
    assert final.started_at is not None and final.started_at >= start - timedelta(milliseconds=50)
    assert (target.work(job_id) / "ran").exists()


# where the output goes


def test_stdout_to_a_path_in_the_job(target: Target) -> None:
    job = make_job(target.src_dir, "echo one\necho two\necho oops >&2\n", {"stdout": "out/log.txt"})
    job_id = target.submit(job, "--wait")
    downloaded = target.cli("download", "--id", job_id, "out/log.txt:")
    assert (downloaded.returncode, downloaded.stdout) == (0, "one\ntwo\n"), downloaded.stderr
    assert target.cli("logs", "--id", job_id).stdout == "one\ntwo\n"
    assert target.cli("logs", "--id", job_id, "--stderr").stdout == "oops\n"
    assert mode_of(target.work(job_id) / "out" / "log.txt") == 0o600
    assert mode_of(target.job_dir(job_id) / "stderr") == 0o600
    assert not (target.job_dir(job_id) / "stdout").exists()


def test_stderr_merged_into_stdout(target: Target) -> None:
    job = make_job(target.src_dir, "echo a\necho b >&2\necho c\n", {"stderr": "stdout"})
    job_id = target.submit(job, "--wait")
    assert target.cli("logs", "--id", job_id).stdout == "a\nb\nc\n"
    message = one_error_line(target.cli("logs", "--id", job_id, "--stderr"), 1)
    assert "stdout" in message
    assert mode_of(target.job_dir(job_id) / "stdout") == 0o600
    assert not (target.job_dir(job_id) / "stderr").exists()


def test_discarded_output(target: Target) -> None:
    job = make_job(
        target.src_dir, "echo a\necho b >&2\n", {"stdout": "discard", "stderr": "discard"}
    )
    job_id = target.submit(job, "--wait")
    for option in ((), ("--stderr",)):
        message = one_error_line(target.cli("logs", "--id", job_id, *option), 1)
        assert "discarded" in message
    assert not (target.job_dir(job_id) / "stdout").exists()
    assert not (target.job_dir(job_id) / "stderr").exists()
    assert target.status(job_id)["state"] == "finished"


# tej wait and tej submit --wait


def test_wait_blocks_until_the_end(target: Target) -> None:
    job = make_job(target.src_dir, "sleep 1.5\nexit 3\n")
    job_id = target.submit(job)
    target.wait_for_state(job_id, JobState.RUNNING, timeout=DEADLINE)
    waited = target.cli("wait", "--id", job_id, timeout=DEADLINE)
    assert waited.returncode == 0, waited.stderr
    assert re.fullmatch(rf"Job is finished \(0:00:0[12]\) with exit code 3{USAGE}\n", waited.stdout)
    with_code = target.cli("wait", "--id", job_id, "--exit-code")
    assert with_code.returncode == 3, with_code.stderr


def test_wait_gives_up_after_its_timeout(target: Target) -> None:
    job = make_job(target.src_dir, "sleep 30\n")
    job_id = target.submit(job)
    begin = time.monotonic()
    waited = target.cli("wait", "--id", job_id, "--timeout", "1", timeout=DEADLINE)
    message = one_error_line(waited, 6)
    assert job_id in message and "running" in message, message
    assert time.monotonic() - begin < 10
    assert target.remote().status(job_id).state is JobState.RUNNING


def test_submit_and_wait(target: Target) -> None:
    job = make_job(target.src_dir, "echo hi\nexit 5\n")
    done = target.cli("submit", "--wait", str(job), timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "Job submitted as:", done.stdout
    assert re.fullmatch(rf"Job is finished \(0:00:0\d\) with exit code 5{USAGE}", lines[2])
    assert target.remote().status(lines[1]).exit_code == 5
    with_code = target.cli("submit", "--wait", "--exit-code", str(job), timeout=DEADLINE)
    assert with_code.returncode == 5, with_code.stderr


def test_a_script_that_cannot_run_is_reported_by_wait(target: Target) -> None:
    """submit answers once the job is starting: a failed start is the job's end, with why."""
    job = make_job(target.src_dir, "true\n")
    (job / "start.sh").write_text("#!/nonexistent/interpreter\ntrue\n")
    done = target.cli("submit", "--wait", "--exit-code", str(job), timeout=DEADLINE)
    assert done.returncode == 127, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "Job submitted as:", done.stdout
    assert re.fullmatch(
        r"Job is finished \(0:00:00\) with exit code 127 \(cannot run start\.sh: .+\)", lines[2]
    ), lines[2]
    status = target.status(lines[1])
    assert (status["state"], status["exit_code"]) == ("finished", 127)
    assert (
        status["reason"]
        == "cannot run start.sh: its interpreter /nonexistent/interpreter is not found"
    )


# tej logs


def test_logs_whole_stderr_and_tail(target: Target) -> None:
    job = make_job(target.src_dir, "printf 'l1\\nl2\\nl3\\nl4\\n'\necho e1 >&2\n")
    job_id = target.submit(job, "--wait")
    assert target.cli("logs", "--id", job_id).stdout == "l1\nl2\nl3\nl4\n"
    assert target.cli("logs", "--id", job_id, "--stderr").stdout == "e1\n"
    assert target.cli("logs", "--id", job_id, "--tail", "2").stdout == "l3\nl4\n"
    as_json = json.loads(target.cli("logs", "--id", job_id, "--json").stdout)
    assert as_json == {"id": job_id, "stream": "stdout", "output": "l1\nl2\nl3\nl4\n"}


# The job says it is ready, then waits for the test's go before it prints the rest:
# so the follower is attached, and the lines are written while it streams.
FOLLOWED_SCRIPT = """\
echo ready
while [ ! -e go ]; do sleep 0.05; done
i=1
while [ $i -le 8 ]; do echo "line $i"; i=$((i + 1)); sleep 0.2; done
printf 'last line'
"""
FOLLOWED_OUTPUT = ["ready"] + [f"line {i}" for i in range(1, 9)] + ["last line"]


@pytest.mark.parametrize("stdout", ["tej", "out/log.txt"])
def test_logs_follow_streams_until_the_end(target: Target, stdout: str) -> None:
    job = make_job(target.src_dir, FOLLOWED_SCRIPT, {"stdout": stdout, "max_runtime": 30})
    job_id = target.submit(job)
    follower = target.popen("logs", "--id", job_id, "--follow")
    arrivals: list[tuple[float, str]] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            arrivals.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: arrivals, DEADLINE, "the first line")
        (target.work(job_id) / "go").touch()
        follower.wait(timeout=DEADLINE)
        reader.join(timeout=DEADLINE)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 0, follower.stderr.read() if follower.stderr else ""
    assert [line for _, line in arrivals] == FOLLOWED_OUTPUT
    assert target.remote().status(job_id).state is JobState.FINISHED
    streamed = arrivals[-1][0] - arrivals[1][0]
    assert streamed > 0.8, f"the lines came in a burst ({streamed:.2f} s), not as written"


# the Python API


def test_api_wait_and_logs(target: Target) -> None:
    remote = target.remote()
    long_job = remote.submit(str(make_job(target.src_dir, "sleep 30\n")))
    begin = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        remote.wait(long_job, timeout=1)
    assert 0.9 <= time.monotonic() - begin < 5
    assert isinstance(caught.value, TejError)
    assert long_job in str(caught.value)
    remote.kill(long_job)

    body = "for i in 1 2 3 4 5; do echo chunk$i; echo err$i >&2; sleep 0.2; done\nexit 4\n"
    job_id = remote.submit(str(make_job(target.src_dir, body)), env={"UNUSED": "1"})
    chunks = list(remote.logs(job_id, stream="stdout", follow=True))
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    assert b"".join(chunks) == b"".join(b"chunk%d\n" % i for i in range(1, 6))
    final = remote.wait(job_id, timeout=DEADLINE)
    assert isinstance(final, JobStatus)
    assert (final.id, final.state, final.exit_code) == (job_id, JobState.FINISHED, 4)
    metadata = remote.status(job_id).metadata
    assert metadata is not None and metadata["env"] == {"UNUSED": "1"}
    errors = b"".join(remote.logs(job_id, stream="stderr"))
    assert errors == b"".join(b"err%d\n" % i for i in range(1, 6))
    assert b"".join(remote.logs(job_id, tail=2)) == b"chunk4\nchunk5\n"
