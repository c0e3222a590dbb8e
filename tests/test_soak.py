"""A soak under random faults: Hypothesis drives random sequences of operations against
the real agent (on `local` and over ssh), and checks the queue's invariants after each.

Operations: submit (with priorities and dependencies), array submit, kill (of a job, an
array or one task), delete, wait, list, prune,
setup with another `max_running`, a supervisor SIGKILLed, a client SIGKILLed in the middle
of an upload, concurrent clients. Invariants: no job lost or duplicated; a job's state
only moves forward; `max_running` never exceeded (from the jobs' own timestamps);
positions are a permutation of the jobs in the line (queued jobs, and arrays with tasks
still to start); no two jobs that may still run share an
inode of the store; the index agrees with the job folders (helpers.index_problems).

In the normal suite it runs a few derandomized sequences per destination (the same every
run: about a minute and a half for both); `TEJ_SOAK_SECONDS=3600 pytest tests/test_soak.py` runs
random ones for an hour per destination (TEJ_SOAK_EXAMPLES: sequences per round). A
failure prints the shortest sequence Hypothesis found that breaks an invariant.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Target,
    index_problems,
    kill_processes_under,
    make_job,
    wait_until,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tej import RemoteQueue
from tej.api import ArrayStatus
from tej.errors import InvalidInput, JobNotFound, JobStillRunning, WaitTimeout
from tej.protocol import ACTIVE_STATES as ACTIVE
from tej.protocol import END_STATES as ENDED
from tej.server.index import index_path
from tej.server.layout import INDEX_PENDING

# Without TEJ_SOAK_SECONDS: EXAMPLES sequences of STEPS steps, derandomized (the same
# every run, about 45 seconds per destination); with it, random ones until the time is up.
SECONDS = float(os.environ.get("TEJ_SOAK_SECONDS") or 0)
EXAMPLES = int(os.environ.get("TEJ_SOAK_EXAMPLES") or 6)
STEPS = 30
SCRIPT = "#!/bin/sh\ndate +%s.%N > t0\nsleep ${SOAK_SLEEP:-0}\ndate +%s.%N > t1\n"


def rank(state: str) -> int:
    """How far a state is along a job's life."""
    return 2 if state in ENDED else 1 if state == "running" else 0


class Soak(RuleBasedStateMachine):
    """One queue, driven at random; see the module's doc."""

    target: Target
    counter = itertools.count()
    done: Counter[str] = Counter()  # how many times each rule and check ran
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.remote: RemoteQueue | None = None
        self.queue = ""
        self.seen: dict[str, str] = {}  # job id -> the last state seen
        self.gone: set[str] = set()  # deleted or pruned
        self.maybe: set[str] = set()  # submits cut short: the job may exist or not
        self.limits = [2]  # every max_running set
        self.orphaned: set[str] = set()  # jobs whose supervisor was SIGKILLed
        self.number = 0

    # setting up and tearing down

    @initialize(
        target=jobs,
        sleeps=st.lists(st.sampled_from(["0", "0.3", "3"]), max_size=4),
        arrays=st.lists(st.integers(2, 4), max_size=2),
    )
    def open_queue(self, sleeps: list[str], arrays: list[int]) -> MultipleResults[str]:
        """A new queue (queue runner, max_running 2), and a few jobs and arrays to start
        with (Hypothesis enables a random subset of the rules in each sequence: submit may
        be left out)."""
        self.queue = f"{self.target.queue}-{next(self.counter)}"
        self.remote = RemoteQueue(
            self.target.destination, self.queue, ssh_config=self.target.ssh_config
        )
        self.remote.setup(runner="queue", options={"max_running": "2"})
        jobs = [self.submit(sleep, 0, False) for sleep in sleeps]
        return multiple(*jobs, *[self.submit_array(size, "", "0.3") for size in arrays])

    def teardown(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.queue:
            kill_processes_under(self.queue)

    def count(self, name: str) -> None:
        Soak.done[name] += 1

    def new_id(self) -> str:
        self.number += 1
        return f"j{self.number}"

    def api(self) -> RemoteQueue:
        assert self.remote is not None
        return self.remote

    def cli(self, *args: str) -> subprocess.Popen[bytes]:
        """Start a tej command on this queue (a client of its own)."""
        argv = [sys.executable, "-m", "tej", args[0], self.target.destination]
        argv += ["--queue", self.queue, *self.target.ssh_args, *args[1:]]
        return subprocess.Popen(
            argv,
            env=self.target.client_env,
            cwd=str(self.target.client_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def job_dir(self, name: str, big: bool = False) -> Path:
        path = self.target.src_dir / f"soak-{name}"
        if not path.exists():
            files: dict[str, bytes | str] = {"data.bin": os.urandom(8 << 20)} if big else {}
            make_job(self.target.src_dir, f"soak-{name}", SCRIPT, files=files)
        return path

    # operations

    @rule(
        target=jobs,
        sleep=st.sampled_from(["0", "0.3", "3"]),
        priority=st.sampled_from([0, 0, 1, -1]),
        after=st.booleans(),
    )
    def submit(self, sleep: str, priority: int, after: bool) -> str:
        self.count("submit")
        job_id = self.new_id()
        deps = [sorted(self.seen)[-1]] if after and self.seen else []
        try:
            self.api().submit(
                str(self.job_dir("tiny")),
                job_id=job_id,
                env={"SOAK_SLEEP": sleep},
                priority=priority,
                after=deps or None,
            )
        except InvalidInput:  # the job it was to wait for was deleted
            assert deps and deps[0] in self.gone | self.maybe
            return job_id
        self.seen[job_id] = "queued"
        return job_id

    @rule(
        target=jobs,
        size=st.integers(2, 4),
        parallel=st.sampled_from(["", "%1"]),
        sleep=st.sampled_from(["0", "0.3"]),
    )
    def submit_array(self, size: int, parallel: str, sleep: str) -> str:
        """An array: its tasks take places of max_running, as jobs do."""
        self.count("submit_array")
        job_id = self.new_id()
        self.api().submit(
            str(self.job_dir("tiny")),
            job_id=job_id,
            array=f"0-{size - 1}{parallel}",
            env={"SOAK_SLEEP": sleep},
        )
        self.seen[job_id] = "queued"
        return job_id

    @rule(job=jobs, task=st.integers(0, 3))
    def kill_a_task(self, job: str, task: int) -> None:
        """Kill task N of the job (refused if the job is not an array that has one)."""
        with contextlib.suppress(JobNotFound):  # not an array, no such task, or deleted
            self.api().kill(f"{job}.{task}")

    @rule(job=jobs)
    def kill(self, job: str) -> None:
        try:
            self.api().kill(job)
        except JobNotFound:
            assert job not in self.seen or job in self.gone

    @rule(job=jobs, force=st.booleans())
    def delete(self, job: str, force: bool) -> None:
        try:
            self.api().delete(job, force=force)
        except JobNotFound:
            assert job not in self.seen or job in self.gone
        except JobStillRunning:
            assert self.seen.get(job) in (*ACTIVE, "lost") or job in self.maybe
            return
        self.gone.add(job)

    @rule(job=jobs)
    def wait(self, job: str) -> None:
        try:
            self.api().wait(job, timeout=0.5)
        except JobNotFound:
            assert job not in self.seen or job in self.gone
        except WaitTimeout:
            pass  # still running

    @rule(limit=st.integers(1, 3))
    def setup(self, limit: int) -> None:
        self.api().setup(runner="queue", options={"max_running": str(limit)}, force=True)
        self.limits.append(limit)

    @rule(older=st.sampled_from([None, 3600.0]))
    def prune(self, older: float | None) -> None:
        pruned = self.api().prune(older_than=older)
        # (Whether they had ended is the server's to check: jobs end between two looks.)
        assert set(pruned) <= (set(self.seen) | self.maybe) - self.gone, pruned
        self.gone.update(pruned)

    @rule(job=jobs)
    def kill_a_supervisor(self, job: str) -> None:
        """SIGKILL the job's supervisor, if the job is running (rules never depend on the
        queue's state to choose: Hypothesis must be able to replay a sequence)."""
        try:
            record = json.loads((Path(self.queue) / "jobs" / job / "status.json").read_text())
            if record.get("state") == "running":
                os.kill(record["supervisor"]["pid"], signal.SIGKILL)
                self.orphaned.add(job)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # gone, or it ended meanwhile

    @rule(delay=st.sampled_from([0.05, 0.3, 0.8]))
    def kill_a_client_mid_upload(self, delay: float) -> None:
        job_id = self.new_id()
        self.maybe.add(job_id)
        process = self.cli("submit", "--id", job_id, str(self.job_dir("big", big=True)))
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()

    @rule(count=st.integers(2, 3))
    def concurrent_clients(self, count: int) -> None:
        ids = [self.new_id() for _ in range(count)]
        self.maybe.update(ids)
        processes = [
            self.cli("submit", "--id", job_id, str(self.job_dir("tiny"))) for job_id in ids
        ]
        processes.append(self.cli("list"))
        for process in processes:
            process.wait(timeout=120)

    # invariants

    @invariant()
    def the_queue_is_whole(self) -> None:
        if self.remote is None:
            return
        self.count("the_queue_is_whole")
        jobs = wait_until(self.listed_whole, 10, "list to show every job folder")[0]
        ids = [job.id for job in jobs]
        expected = set(self.seen) - self.gone
        assert expected <= set(ids), f"jobs lost: {sorted(expected - set(ids))}"
        assert set(ids) <= expected | self.maybe, f"unknown jobs: {set(ids) - expected}"
        for job in jobs:
            self.check_forward(job.id, job.state.value)
        in_line = [job for job in jobs if job.position]
        positions = sorted(job.position[0] for job in in_line)
        assert positions == list(range(1, len(in_line) + 1)), f"positions are not 1..n: {jobs}"
        assert all(job.position[1] == len(in_line) for job in in_line)
        for job in jobs:  # in the line: queued jobs, and arrays with tasks still to start
            if job.state.value == "queued":
                assert job.position, job
            elif job.position:
                assert isinstance(job, ArrayStatus) and job.state.is_active, job
                assert job.counts.get("queued"), job
        self.check_index()
        self.check_max_running()
        self.check_store()

    def listed_whole(self) -> tuple[list[Any]] | None:
        """The jobs listed once they match the job folders (a submit whose client was
        SIGKILLed may still be finishing: its job is listed once it is in the index)."""
        jobs = self.api().list()
        ids = [job.id for job in jobs]
        assert len(ids) == len(set(ids)), "a job is listed twice"
        return (jobs,) if set(ids) == set(os.listdir(Path(self.queue) / "jobs")) else None

    def check_forward(self, job_id: str, state: str) -> None:
        old = self.seen.get(job_id)
        if old is not None and rank(old) == 2:
            assert state == old or (old == "lost" and state == "killed"), (job_id, old, state)
        elif old is not None:
            assert rank(state) >= rank(old), (job_id, old, state)
        self.seen[job_id] = state
        self.maybe.discard(job_id)

    def check_index(self) -> None:
        def agrees() -> bool:
            return not index_problems(self.queue)

        try:  # an intent of a live writer is a moment's (long on a machine under load)
            wait_until(agrees, 20, "the index to agree")
        except AssertionError:
            problems = index_problems(self.queue)
            writers = intent_writers(index_path(self.queue, INDEX_PENDING))
            raise AssertionError(f"the index disagrees: {problems}; {writers}") from None

    def check_max_running(self) -> None:
        """At no time did more jobs run than the highest max_running ever set (lost ones
        aside: their processes may outlive their SIGKILLed supervisors)."""
        events = []
        for job_id, state in self.seen.items():
            if state == "lost" or job_id in self.orphaned or job_id in self.gone:
                continue
            job_dir = Path(self.queue) / "jobs" / job_id
            events += run_interval(job_dir)
            if (job_dir / "jobs").is_dir():  # an array: each task takes a place
                for task_dir in (job_dir / "jobs").iterdir():
                    if record_state(task_dir) != "lost":
                        events += run_interval(task_dir)
        running = 0
        for _, step in sorted(events, key=lambda event: (event[0], event[1])):
            running += step
            assert running <= max(self.limits), f"{running} jobs ran at once"

    def check_store(self) -> None:
        """No two jobs that may still run share an inode (the store's promise)."""
        owners: dict[int, str] = {}
        for job_id, state in self.seen.items():
            if state not in ACTIVE:
                continue
            for path in (Path(self.queue) / "jobs" / job_id / "work").glob("*"):
                try:
                    inode = path.stat().st_ino
                except OSError:
                    continue
                assert owners.setdefault(inode, job_id) == job_id, (job_id, owners[inode])


def intent_writers(pending: str) -> list[str]:
    """The processes named by the intents left in pending (ID~HOST~PID~START~N): each
    one's command line, or that it is gone."""
    found = []
    for name in sorted(os.listdir(pending)):
        parts = name.split("~")
        pid = parts[2] if len(parts) == 5 and parts[2].isdigit() else None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            argv = "(gone)"
        found.append(f"{name}: {argv[:200] if pid else '(not an intent name)'}")
    return found


def run_interval(job_dir: Path) -> list[tuple[float, int]]:
    """When the script in job_dir started and ended (POSIX times), as events counting the
    jobs running; none if it never started."""
    work = job_dir / "work"
    try:
        start = float((work / "t0").read_text())
    except (OSError, ValueError):
        return []
    try:
        end = float((work / "t1").read_text())
    except (OSError, ValueError):  # killed: it ended when its record says
        end = ended_at(job_dir / "status.json")
    return [(start, 1), (end, -1)]


def record_state(job_dir: Path) -> str | None:
    """The state in a job folder's status.json, None if it can't be read."""
    try:
        return json.loads((job_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def ended_at(path: Path) -> float:
    """When a job's record says it ended (POSIX time); now if it hasn't."""
    try:
        text = json.loads(path.read_text()).get("ended_at")
    except (OSError, ValueError):
        text = None
    if not text:
        return time.time()
    when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.timeout((SECONDS or 300) + 600)
def test_soak(target: Target) -> None:
    Soak.target = target
    deadline = time.monotonic() + SECONDS
    while True:
        run_state_machine_as_test(
            Soak,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                derandomize=not SECONDS,
                suppress_health_check=list(HealthCheck),
            ),
        )
        if time.monotonic() >= deadline:
            break
    assert Soak.done["submit"] >= EXAMPLES and Soak.done["the_queue_is_whole"] >= EXAMPLES
    assert Soak.done["submit_array"] >= 1
