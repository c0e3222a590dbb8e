"""Many clients at once on one queue, over a real sshd (and `local`); nothing is mocked.

The fault injected is concurrency: 20 clients in threads, half of them running the `tej`
command line, half using a RemoteQueue of their own, all on one queue at the same time:

- test_twenty_clients: every client submits three jobs from folders of the same name (so
  every default id has the same prefix) and one job with an id all of them ask for; then
  lists, deletes (--force) two other clients' short jobs, kills two other clients' long jobs
  and reads a status. Clients n and n + 10 do the same step on the same job at the same
  time, so every delete races with another delete (or a kill), and every kill with a kill.
  A watcher thread reads every status.json on the server all along.

Afterwards: no id was given twice and the contested id exactly once; no status.json was ever
torn; no command failed other than as expected (JobExists for the contested id, JobNotFound
for a job another client had just deleted); every job that was not deleted is there, in the
state it must have; no job was ever reported `lost`; nothing is left in staging or trash.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import Target, make_job, run_tej, wait_until

import tej

CLIENTS = 20
CONTESTED = "contested"
LONG = "#!/bin/sh\nsleep 60\n"
SHORT = "#!/bin/sh\nsleep 60\n"  # still running when deleted with --force
QUIET = "#!/bin/sh\necho $TEJ_JOB_ID\n"
LIVE_STATES = ("starting", "running", "finished", "killed")


class Failed(Exception):
    """A client's command failed in a way nothing justifies."""


class Client:
    """One client: the CLI (a new process per command) or a RemoteQueue of its own."""

    def __init__(self, target: Target, number: int, use_cli: bool) -> None:
        self.target = target
        self.number = number
        self.use_cli = use_cli
        self.remote: tej.RemoteQueue | None = None
        if not use_cli:
            self.remote = tej.RemoteQueue(
                target.destination, target.queue, ssh_config=target.ssh_config
            )

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    def cli(self, command: str, *args: str) -> tuple[int, str, str]:
        target = self.target
        done = run_tej(
            *target.argv(command, *args),
            env=target.client_env,
            cwd=target.client_dir,
            timeout=90,
            tej=target.tej,
        )
        if "Traceback" in done.stderr:
            raise Failed(f"client {self.number}: {command} {args}: {done.stderr}")
        return done.returncode, done.stdout, done.stderr

    def submit(self, directory: Path, job_id: str | None = None) -> str | None:
        """Submit; the id, or None when job_id was taken (JobExists)."""
        if self.remote is not None:
            try:
                return self.remote.submit(str(directory), job_id=job_id)
            except tej.JobExists:
                return None
        extra = ["--id", job_id] if job_id else []
        code, out, err = self.cli("submit", *extra, str(directory))
        if code == 4 and job_id is not None and "already exists" in err:
            return None
        if code != 0:
            raise Failed(f"client {self.number}: submit exited {code}: {err}")
        return out.splitlines()[-1]

    def list(self) -> list[dict[str, Any]]:
        if self.remote is not None:
            return [status.to_json() for status in self.remote.list()]
        code, out, err = self.cli("list", "--json")
        if code != 0:
            raise Failed(f"client {self.number}: list exited {code}: {err}")
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def status(self, job_id: str) -> dict[str, Any]:
        if self.remote is not None:
            return self.remote.status(job_id).to_json()
        code, out, err = self.cli("status", "--id", job_id, "--json")
        if code != 0:
            raise Failed(f"client {self.number}: status exited {code}: {err}")
        result: dict[str, Any] = json.loads(out)
        return result

    def kill(self, job_id: str, may_be_gone: bool = False) -> None:
        """Kill; with may_be_gone, a job another client deleted (JobNotFound) is fine."""
        if self.remote is not None:
            try:
                self.remote.kill(job_id)
            except tej.JobNotFound:
                if not may_be_gone:
                    raise
            return
        code, _out, err = self.cli("kill", "--id", job_id)
        if code != 0 and not (code == 3 and may_be_gone):
            raise Failed(f"client {self.number}: kill exited {code}: {err}")

    def delete(self, job_id: str) -> bool:
        """Delete with --force; False if another client deleted it first (JobNotFound)."""
        if self.remote is not None:
            try:
                self.remote.delete(job_id, force=True)
            except tej.JobNotFound:
                return False
            return True
        code, _out, err = self.cli("delete", "--id", job_id, "--force")
        if code == 3:
            return False
        if code != 0:
            raise Failed(f"client {self.number}: delete exited {code}: {err}")
        return True


class StatusWatcher:
    """Reads every status.json of the queue over and over, recording any torn one."""

    def __init__(self, queue: str) -> None:
        self.jobs = Path(queue, "jobs")
        self.reads = 0
        self.torn: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                names = os.listdir(self.jobs)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    text = (self.jobs / name / "status.json").read_text()
                except (FileNotFoundError, NotADirectoryError):
                    continue  # deleted meanwhile
                self.reads += 1
                try:
                    json.loads(text)
                except ValueError:
                    self.torn.append(f"{name}: {text!r}")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def run_clients(count: int, work: Callable[[int], None]) -> list[str]:
    """Run work(i) for every client in its own thread; returns the errors they raised."""
    errors: list[str] = []

    def run(number: int) -> None:
        try:
            work(number)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported at the end
            errors.append(f"client {number}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=110)
    assert not any(thread.is_alive() for thread in threads), "a client is stuck"
    return errors


def test_twenty_clients(target: Target) -> None:
    target.cli("setup", check=0)
    clients = [Client(target, number, use_cli=number % 2 == 0) for number in range(CLIENTS)]
    long_ids: dict[int, str] = {}
    short_ids: dict[int, str] = {}
    quiet_ids: dict[int, str] = {}
    contested: dict[int, str | None] = {}
    seen_states: list[tuple[str, str]] = []  # (id, state) from every list and status
    deleted: list[str] = []
    submitted = threading.Barrier(CLIENTS, timeout=100)
    watcher = StatusWatcher(target.queue)

    def work(number: int) -> None:
        client = clients[number]
        folders = target.src_dir / f"client-{number}"
        # Same folder name for every job of every client: the same default id prefix.
        long_ids[number] = str(client.submit(make_job(folders / "long", "conc", LONG)))
        short_ids[number] = str(client.submit(make_job(folders / "short", "conc", SHORT)))
        quiet_ids[number] = str(client.submit(make_job(folders / "quiet", "conc", QUIET)))
        contested[number] = client.submit(make_job(folders / "same", "conc", QUIET), CONTESTED)
        submitted.wait()
        seen_states.extend((item["id"], item["state"]) for item in client.list())
        # Clients n and n + 10 (the same kind) race at each step on the same job of another.
        first = short_ids[(number + 3) % 10]
        if client.delete(first):
            deleted.append(first)
        client.kill(long_ids[(number + 1) % 10])
        second = short_ids[10 + (number + 5) % 10]
        if number >= 10:
            client.kill(second, may_be_gone=True)  # races with the other's delete
        if client.delete(second):
            deleted.append(second)
        client.kill(long_ids[10 + (number + 7) % 10])
        status = client.status(quiet_ids[(number + 5) % CLIENTS])
        seen_states.append((status["id"], status["state"]))
        seen_states.extend((item["id"], item["state"]) for item in client.list())

    try:
        errors = run_clients(CLIENTS, work)
    finally:
        watcher.stop()
        for client in clients:
            client.close()
    assert errors == [], "\n".join(errors)

    # No id collision; the contested id went to exactly one client.
    all_ids = [*long_ids.values(), *short_ids.values(), *quiet_ids.values()]
    assert len(all_ids) == 3 * CLIENTS
    assert len(set(all_ids)) == len(all_ids), "an id was given twice"
    assert CONTESTED not in all_ids
    assert all(job_id.startswith("conc_") for job_id in all_ids)
    winners = [number for number, job_id in contested.items() if job_id is not None]
    assert len(winners) == 1 and contested[winners[0]] == CONTESTED, contested

    # Every status.json read during the run parsed; nothing was ever reported lost.
    assert watcher.reads > 0
    assert watcher.torn == [], watcher.torn
    lost = [(job_id, state) for job_id, state in seen_states if state not in LIVE_STATES]
    assert lost == [], lost
    # Each short job was deleted by exactly one of the two clients that raced to.
    assert sorted(deleted) == sorted(short_ids.values())

    # Every job that was not deleted is there, in the state it must have.
    def settled() -> list[dict[str, Any]] | None:
        jobs: list[dict[str, Any]] = json.loads(target.cli("list", "--json", check=0).stdout)
        return jobs if all(job["state"] not in ("starting", "running") for job in jobs) else None

    jobs = {job["id"]: job for job in wait_until(settled, 30, "every job to end")}
    assert set(jobs) == {*long_ids.values(), *quiet_ids.values(), CONTESTED}
    for job_id in long_ids.values():
        assert jobs[job_id]["state"] == "killed", jobs[job_id]
    for job_id in [*quiet_ids.values(), CONTESTED]:
        assert (jobs[job_id]["state"], jobs[job_id]["exit_code"]) == ("finished", 0), jobs[job_id]
        logs = target.cli("logs", "--id", job_id, check=0).stdout
        assert logs == f"{job_id}\n"
    for job_id in jobs:
        json.loads((target.job_dir(job_id) / "status.json").read_text())
    assert os.listdir(target.server_path("staging")) == []
    assert os.listdir(target.server_path("trash")) == []
