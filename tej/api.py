"""The Python API: a queue of jobs on a destination, reached through one session."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar

from tej import plugins, protocol
from tej.config import DEFAULT_QUEUE
from tej.destination import SHARED_CONNECTION_SECONDS, ConnectOptions, parse_destination
from tej.errors import (
    ConnectionFailed,
    InvalidInput,
    JobNotFound,
    ProtocolError,
    QueueError,
    RunnerMissing,
    TejError,
    WaitTimeout,
)
from tej.session import Session

if TYPE_CHECKING:  # imported where used, so that commands load only what they need
    from tej import transfer
    from tej.excludes import Excludes
    from tej.sync import Syncer, SyncSummary

T = TypeVar("T")
DEFAULT_SCRIPT = protocol.DEFAULT_SCRIPT


class JobState(str, Enum):
    """The state of a job, as recorded on the server."""

    STARTING = protocol.STATE_STARTING
    QUEUED = protocol.STATE_QUEUED
    SCHEDULED = protocol.STATE_SCHEDULED
    RUNNING = protocol.STATE_RUNNING
    FINISHED = protocol.STATE_FINISHED
    KILLED = protocol.STATE_KILLED
    TIMED_OUT = protocol.STATE_TIMED_OUT
    LOST = protocol.STATE_LOST
    CANCELLED = protocol.STATE_CANCELLED

    @property
    def is_active(self) -> bool:
        """Whether the job may still be running."""
        return self.value in protocol.ACTIVE_STATES


@dataclass(frozen=True)
class Resources:
    """What a job used: memory in bytes, CPU time in seconds.

    Once it has ended: its peak memory (``max_rss``, the kernel's maximum resident
    set size of the largest of its processes) and the CPU time of the job and of
    every process it waited for. While it runs: its current memory (``rss``) and
    CPU time, summed over its process group (on Linux). ``source`` says where they
    come from: ``tej`` (its supervisor), ``slurm`` (Slurm's accounting), ``proc``
    (the server's /proc, now).
    """

    source: str
    max_rss: int | None = None
    rss: int | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None

    @property
    def cpu(self) -> float | None:
        """User and system CPU time together, in seconds."""
        if self.cpu_user is None and self.cpu_system is None:
            return None
        return (self.cpu_user or 0.0) + (self.cpu_system or 0.0)

    @property
    def memory(self) -> int | None:
        """The memory figure there is: the peak once ended, the current one while running."""
        return self.max_rss if self.max_rss is not None else self.rss

    @classmethod
    def from_agent(cls, data: Any) -> Resources | None:
        """From the agent's plain dict (None stays None; unknown keys are ignored)."""
        if not isinstance(data, dict):
            return None
        return cls(
            source=str(data.get("source") or "tej"),
            max_rss=data.get("max_rss"),
            rss=data.get("rss"),
            cpu_user=data.get("cpu_user"),
            cpu_system=data.get("cpu_system"),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, without the figures that are unknown."""
        fields = ("source", "max_rss", "rss", "cpu_user", "cpu_system")
        values = {name: getattr(self, name) for name in fields}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class JobStatus:
    """What is known of a job; times are in UTC, elapsed in seconds."""

    id: str
    state: JobState
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = None
    submitted_at: datetime | None = None
    scheduled_for: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    elapsed: float | None = None
    #: Where the runner orders its queue: (place, number of jobs in the line), of a queued
    #: job, or of an array some of whose tasks wait in the line (it holds one place).
    position: tuple[int, int] | None = None
    notifications: tuple[dict[str, Any], ...] = ()
    metadata: dict[str, Any] | None = None
    #: What it used (see Resources); None if unknown (not started, lost, not Linux).
    resources: Resources | None = None
    #: The last line the job wrote to $TEJ_PROGRESS (at most 200 characters, escaped).
    progress: str | None = None
    #: Each run of the script so far (several with retries): attempt, started_at,
    #: ended_at, state, exit_code, signal, reason (times as ISO 8601 text).
    attempts: tuple[dict[str, Any], ...] = ()
    #: How many times the script may run in all (1 + retries.max); None before it starts.
    max_attempts: int | None = None
    #: When the next attempt starts, while the job waits to retry.
    retry_at: datetime | None = None

    @property
    def attempt(self) -> int:
        """The number of the current (or last) attempt; 0 before the first."""
        return len(self.attempts)

    @classmethod
    def from_agent(cls, data: dict[str, Any]) -> JobStatus:
        """Build a status from the agent's plain-dict form.

        Its fields are set at once: a frozen dataclass's __init__ sets them one by one
        through object.__setattr__, which costs `tej list` of 10,000 jobs ~20 ms.
        """
        status = object.__new__(cls)
        status.__dict__.update(
            id=data["id"],
            state=JobState(data["state"]),
            exit_code=data.get("exit_code"),
            signal=data.get("signal"),
            reason=data.get("reason"),
            submitted_at=_parse_time(data.get("submitted_at")),
            scheduled_for=_parse_time(data.get("scheduled_for")),
            started_at=_parse_time(data.get("started_at")),
            ended_at=_parse_time(data.get("ended_at")),
            elapsed=data.get("elapsed"),
            position=tuple(data["position"]) if data.get("position") else None,
            notifications=tuple(data.get("notifications") or ()),
            metadata=data.get("metadata"),
            resources=Resources.from_agent(data.get("resources")),
            progress=data.get("progress"),
            attempts=tuple(data.get("attempts") or ()),
            max_attempts=data.get("max_attempts"),
            retry_at=_parse_time(data.get("retry_at")),
        )
        return status

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ISO 8601 UTC times)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason,
            "submitted_at": _format_time(self.submitted_at),
            "scheduled_for": _format_time(self.scheduled_for),
            "started_at": _format_time(self.started_at),
            "ended_at": _format_time(self.ended_at),
            "elapsed": self.elapsed,
            "position": list(self.position) if self.position else None,
            "notifications": list(self.notifications),
            "resources": self.resources.to_json() if self.resources else None,
            "progress": self.progress,
            **({"metadata": self.metadata} if self.metadata is not None else {}),
            **(self._attempts_json() if self.max_attempts is not None else {}),
        }

    def _attempts_json(self) -> dict[str, Any]:
        """The attempts' fields, which `status` has (not `list`)."""
        return {
            "attempts": list(self.attempts),
            "max_attempts": self.max_attempts,
            "retry_at": _format_time(self.retry_at),
        }


@dataclass(frozen=True)
class ArrayStatus(JobStatus):
    """An array's status: its own (state: running while any task may still run; exit_code:
    0 if every task finished with 0, else the first failed task's, by index), its tasks'
    counts per state, and with status(..., tasks=True), each task's status."""

    #: How many tasks it has, at most how many run at once (None: the server's CPUs).
    size: int = 0
    max_parallel: int | None = None
    #: Its task indexes, as an array spec ("0-99", "1,3,5-9").
    indexes: str = ""
    #: How many tasks are in each state (states with none left out).
    counts: Mapping[str, int] = field(default_factory=dict)
    #: Each task's status (id ARRAYID.N, state, exit code, times), if asked for.
    tasks: tuple[JobStatus, ...] = ()

    @classmethod
    def from_agent(cls, data: dict[str, Any]) -> ArrayStatus:
        """Build an array's status from the agent's plain-dict form."""
        status = super().from_agent(data)
        array = data["array"]
        status.__dict__.update(
            size=array["size"],
            max_parallel=array.get("max_parallel"),
            indexes=array["indexes"],
            counts=dict(array.get("counts") or {}),
            tasks=tuple(JobStatus.from_agent(task) for task in array.get("tasks") or ()),
        )
        return status  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: a job's, with "array": counts, fields and tasks."""
        tasks = [{key: task.to_json()[key] for key in TASK_FIELDS} for task in self.tasks]
        array = {
            "size": self.size,
            "max_parallel": self.max_parallel,
            "indexes": self.indexes,
            "counts": dict(self.counts),
            **({"tasks": tasks} if self.tasks else {}),
        }
        return {**super().to_json(), "array": array}


TASK_FIELDS = ("id", "state", "exit_code", "submitted_at", "started_at", "ended_at", "elapsed")


def status_of(data: dict[str, Any]) -> JobStatus:
    """A job's status, or an array's (ArrayStatus), from the agent's reply."""
    return ArrayStatus.from_agent(data) if data.get("array") else JobStatus.from_agent(data)


@dataclass(frozen=True)
class KillResult:
    """The outcome of a kill: whether this call killed the job, and its status."""

    killed: bool
    status: JobStatus


@dataclass(frozen=True)
class SetupResult:
    """The outcome of a setup: the real queue path, and the links made to it."""

    queue: str
    created: bool
    runner: str
    links: tuple[str, ...]
    #: Batch systems found on the server (such as "sbatch"), which a runner could use.
    batch_systems: tuple[str, ...] = ()
    #: The queue existed with this runner and options already, and was left alone.
    unchanged: bool = False


@dataclass(frozen=True)
class DryRunFile:
    """A file submit would upload: its path, its size, whether the server's store has it."""

    path: str
    size: int
    on_server: bool


@dataclass(frozen=True)
class DryRun:
    """What submit would upload (after excludes), and what of it the server's store has."""

    directory: str
    files: tuple[DryRunFile, ...]
    folders: int = 0
    symlinks: int = 0
    #: Bytes submit would send: each content the store lacks, once.
    send_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """The size of all the files."""
        return sum(item.size for item in self.files)

    @property
    def held_bytes(self) -> int:
        """The size of the files whose content the server's store has."""
        return sum(item.size for item in self.files if item.on_server)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "directory": self.directory,
            "files": [
                {"path": item.path, "size": item.size, "on_server": item.on_server}
                for item in self.files
            ],
            "file_count": len(self.files),
            "folders": self.folders,
            "symlinks": self.symlinks,
            "bytes": self.total_bytes,
            "on_server_files": sum(item.on_server for item in self.files),
            "on_server_bytes": self.held_bytes,
            "send_bytes": self.send_bytes,
        }


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    if sys.version_info >= (3, 11):  # reads the Z itself
        return datetime.fromisoformat(text)
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def _format_time(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if when else None


def check_job_id(job_id: str) -> str:
    """Return job_id if it is a valid identifier; InvalidInput otherwise."""
    problem = protocol.job_id_problem(job_id)
    if problem is not None:
        raise InvalidInput(problem)
    return job_id


class RemoteQueue:
    """A queue of jobs on a destination (``local``, ``user@host``, ``ssh://...``).

    Use it as a context manager: one connection serves every call made in
    the block. Every failure is raised as a :class:`tej.TejError`. A
    connection that stops answering is detected after about three times
    keepalive_interval seconds; connect_timeout bounds the connection's setup.
    With reuse_connection, commands share one ssh connection, which stays open
    `persist` seconds after the last one.
    """

    def __init__(
        self,
        destination: str = "local",
        queue: str = DEFAULT_QUEUE,
        *,
        python: str | None = None,
        ssh_config: str | None = None,
        connect_timeout: int = protocol.DEFAULT_CONNECT_TIMEOUT,
        reuse_connection: bool = True,
        keepalive_interval: int = 10,
        persist: int = SHARED_CONNECTION_SECONDS,
    ) -> None:
        self.destination = parse_destination(destination)
        self.queue = queue
        self.options = ConnectOptions(
            python=python,
            ssh_config=ssh_config,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
            reuse_for=persist if reuse_connection else 0,
        )
        self._session: Session | None = None

    def __enter__(self) -> RemoteQueue:
        self.session()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def session(self, first: tuple[str, dict[str, Any]] | None = None) -> Session:
        """The open session, connecting on first use (and again after a lost connection).

        first is the request the caller sends next, (op, args): a new session sends it
        with the agent's bootstrap when it can (see Session.open).
        """
        if self._session is None or not self._session.is_open:
            session = Session(self.destination, self.options)
            session.open(first)
            self._session = session
        return self._session

    def abort(self) -> None:
        """Drop the connection at once, without waiting for the server (after Ctrl-C)."""
        if self._session is not None:
            self._session.abort()
            self._session = None

    def close(self, wait: bool = True) -> None:
        """Close the connection (jobs keep running on the server).

        wait=False doesn't wait for the server's side to end: for a process about to exit.
        """
        if self._session is not None:
            self._session.close(wait)
            self._session = None

    def _call(self, op: str, **args: Any) -> Any:
        """Send a request about the queue, installing the plugin runner it lacks first.

        The agent copies itself and the built-in runners into a queue; only a
        plugin runner's module is sent, when the queue lacks it.
        """
        installed: set[str] = set()  # the plugins installed: once each
        while True:
            try:
                request = {"queue": self.queue, **args}
                return self.session((op, request)).call(op, **request)
            except RunnerMissing as exc:
                name = str(exc)
                if name in installed:
                    raise
                installed.add(name)
                source = self._runner_source(name)
                self.session().call("install_runner", queue=self.queue, runner=name, source=source)

    @staticmethod
    def _runner_source(name: str) -> str:
        """The source of the runner a queue uses, to install it there."""
        try:
            return plugins.load(name).source
        except InvalidInput:
            raise QueueError(
                f"This queue uses the runner {name!r}, which this tej client doesn't have: "
                "install its plugin"
            ) from None

    # operations

    def setup(
        self,
        *,
        links: Sequence[str] = (),
        default_link: bool = False,
        force: bool = False,
        only_links: bool = False,
        runner: str = "default",
        options: Mapping[str, str] | None = None,
    ) -> SetupResult:
        """Create the queue (or reconfigure it with force) and make links to it.

        A queue that exists with this runner and options already is left alone
        (the result's unchanged); another runner or options need force.

        runner names the queue's runner (see tej.plugins.available()); options
        are its settings, such as {"max_running": "4"} for the queue runner.
        """
        all_links = [*links, DEFAULT_QUEUE] if default_link else list(links)
        request: dict[str, Any] = {"runner": runner, "options": dict(options or {})}
        if not plugins.is_builtin(runner):
            request["runner_source"] = plugins.load(runner).source
        result = self._call("setup", links=all_links, force=force, only_links=only_links, **request)
        return SetupResult(
            result["queue"],
            result["created"],
            result["runner"],
            tuple(result["links"]),
            tuple(result.get("batch_systems") or ()),
            bool(result.get("unchanged")),
        )

    def submit(
        self,
        directory: str,
        *,
        job_id: str | None = None,
        secrets: Mapping[str, str] | None = None,
        progress: transfer.Progress | None = None,
        defaults: Mapping[str, Any] | None = None,
        **metadata: Any,
    ) -> str:
        """Upload a directory and start its script; returns the job's id.

        It returns once the job's supervisor is forked on the server: the job
        is then STARTING, and RUNNING a moment later; a script that can't be
        started ends FINISHED with exit code 127 or 126 and a reason.
        metadata overrides the directory's tej.json, with the same names
        (script, args, env, max_runtime, kill_grace, stdout, stderr, start_at,
        delay, notify, exclude); see docs/tej-json.md. defaults are metadata
        beneath tej.json's (such as the user's settings, tej.config). Files
        that .tejignore or exclude leave out are not sent. secrets are environment
        variables for the job that are never written to disk on the server
        nor shown by status. progress, if given, is called with (bytes just
        sent, total bytes to send): only the contents the server's store lacks
        are sent (and the few small files that changed since the directory was
        last read, with its manifest), so the total can be less than the
        directory's size, or 0. The job's metadata is checked before anything is
        sent; the directory as it is read, and a problem found there throws away
        what was sent.
        """
        from tej import jobspec, transfer

        secret_env = jobspec.secret_env(secrets or {})
        metadata, params = _array_params(metadata)
        job, excludes = _prepare_job(directory, job_id, defaults, metadata, params is not None)
        # The server names a job without an id after the directory and the user it runs as.
        name = os.path.basename(os.path.abspath(directory))
        request = {"job_id": job_id, "id_name": name, "job": job, "secrets": secret_env}
        if params is not None:
            request["params"] = params
        if self._session is not None and self._session.is_open:
            session = self.session()
            parts = transfer.scan_tree(directory, excludes=excludes)  # read as they are sent
        else:  # the directory is read and hashed while the connection is being made
            parts = _read_ahead(transfer.scan_tree(directory, excludes=excludes))
            try:
                session = self.session()
            except TejError:
                for _ in parts:  # a problem with the directory is reported first
                    pass
                raise
        token = transfer.new_token()
        try:
            plan = transfer.begin_upload(session, self.queue, parts, token, submit=request)
            if plan.job_id is not None:  # nothing was missing: it is submitted
                if progress is not None and plan.sent:
                    progress(plan.sent, plan.sent)
                return plan.job_id
            transfer.upload_tree(session, self.queue, plan, directory, progress)
            return str(self._call("submit", token=token, **request))
        except ConnectionFailed:
            raise  # no reconnecting to a server that is gone: its stale cleanup will do
        except BaseException:
            # An interrupted request has closed the session (Session.call, pipeline):
            # the upload is then thrown away through a new one.
            self._abort_upload(token)
            raise

    def dry_run(
        self,
        directory: str,
        *,
        job_id: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        **metadata: Any,
    ) -> DryRun:
        """What submit would upload, and how much of it the server's store has already.

        The job is checked as submit checks it; nothing is created on the server
        (not even the queue): the store is only asked which contents it holds.
        """
        from tej import transfer

        metadata, params = _array_params(metadata)
        _, excludes = _prepare_job(directory, job_id, defaults, metadata, params is not None)
        parts = transfer.scan_tree(directory, excludes=excludes)
        entries = [entry for part in parts for entry in part.entries]
        files = [entry for entry in entries if entry.kind == "f"]
        contents = sorted({(entry.digest, entry.mode) for entry in files if entry.size})
        held: set[tuple[str, int]] = set()
        if contents:
            import struct

            reply = self._call(
                "store_has",
                digests=bytes.fromhex("".join(digest for digest, _ in contents)),
                modes=struct.pack(f"<{len(contents)}H", *(mode for _, mode in contents)),
            )
            if not isinstance(reply, str) or len(reply) != len(contents):
                raise ProtocolError(f"Unexpected reply from the agent: {reply!r:.200}")
            held = {key for key, flag in zip(contents, reply) if flag == "1"}
        rows = tuple(
            DryRunFile(os.fsdecode(entry.relpath), entry.size, (entry.digest, entry.mode) in held)
            for entry in files
        )
        to_send = {(entry.digest, entry.mode): entry.size for entry in files if entry.size}
        for key in held:
            to_send.pop(key, None)
        return DryRun(
            directory,
            rows,
            folders=sum(entry.kind == "d" for entry in entries),
            symlinks=sum(entry.kind == "l" for entry in entries),
            send_bytes=sum(to_send.values()),
        )

    def resubmit(
        self,
        job_id: str,
        *,
        new_id: str | None = None,
        secrets: Mapping[str, str] | None = None,
        failed: bool = False,
        **metadata: Any,
    ) -> str:
        """Start a new job from the files an existing one was uploaded with; its id.

        Of an array, a new array; with failed, of only its tasks that didn't finish
        with 0 (each keeps its index, and its params row). Of a task (ARRAYID.N), a new
        array of that one task, as with failed. TEJ_ARRAY_SIZE is the new array's size.

        Nothing is uploaded: the server lays the new job out from its store. The
        new job has the old one's metadata, but for what metadata overrides
        (submit's names; env is merged). new_id: its id (by default, one like
        submit's, from the old id). The old job is left as it is. InvalidInput
        if the store no longer holds one of the files' contents.
        """
        from tej import jobspec

        task = protocol.task_id_parts(job_id)
        if task is not None:  # one task of an array: a new array of that one task
            if failed or metadata.get("array") is not None:
                raise InvalidInput(f"{job_id!r} is one task: --failed and --array take an array")
            job_id, index = task
            metadata = {**metadata, "array": {"indexes": str(index), "max_parallel": None}}
        old_status = self.status(job_id, tasks=failed)
        old = old_status.metadata
        if old is None:
            raise InvalidInput(f"Job {job_id!r} has no readable metadata: submit it again")
        if failed:
            metadata = {**metadata, "array": _failed_tasks(old_status, metadata)}
        base = {key: value for key, value in old.items() if key not in ("id", "secret_env")}
        job = jobspec.build_job(base, metadata)
        secret_env = jobspec.secret_env(secrets or {})
        if new_id is not None:
            check_job_id(new_id)
        return str(
            self._call("resubmit", job_id=job_id, new_id=new_id, job=job, secrets=secret_env)
        )

    def _abort_upload(self, token: str) -> None:
        if self._session is None:
            return
        with contextlib.suppress(TejError):
            self._call("upload_abort", token=token)

    def status(self, job_id: str, *, tasks: bool = False) -> JobStatus:
        """The status of a job; JobNotFound if there is none with that id.

        An array's is an ArrayStatus (with tasks: each task's status too); task N of
        an array is ARRAYID.N.
        """
        args = {"tasks": True} if tasks else {}
        return status_of(self._call("status", job_id=check_job_id(job_id), **args))

    def list(
        self,
        states: Sequence[str] | None = None,
        *,
        tasks: bool = False,
        job_id: str | None = None,
    ) -> list[JobStatus]:
        """The status of every job in the queue (or of those in states), oldest first.

        An array is an ArrayStatus (its counts, no tasks); with tasks, its tasks (in
        states too) follow it, by index, each a JobStatus of id ARRAYID.N. job_id: that
        job only (whatever its state; with tasks, an array's tasks in states).
        """
        return list(self.iter_list(states, tasks=tasks, job_id=job_id))

    def iter_list(
        self,
        states: Sequence[str] | None = None,
        *,
        tasks: bool = False,
        job_id: str | None = None,
    ) -> Iterator[JobStatus]:
        """The statuses of list(), yielded as their batches arrive (the server sends
        a few thousand at a time), so that a long queue is never all in memory."""
        for fields, rows in self.iter_row_batches(states, tasks=tasks, job_id=job_id):
            for row in rows:
                yield status_of(dict(zip(fields, row)))

    def iter_row_batches(
        self,
        states: Sequence[str] | None = None,
        *,
        tasks: bool = False,
        short: bool = False,
        job_id: str | None = None,
    ) -> Iterator[tuple[Sequence[str], Sequence[Sequence[Any]]]]:
        """The jobs of iter_list() as the agent sends them, a batch at a time: (field
        names, rows), each row a list of values in the fields' order (times as ISO 8601
        text; "array": an array's size and counts, else None). Cheaper than JobStatus
        for a long queue; the next batches are requested while one is read. short: only
        the fields a plain `tej list` shows (id, state, elapsed, exit_code, progress,
        array), several times fewer bytes to send and decode."""
        wanted = None if states is None else _check_states(states)
        args: dict[str, Any] = {} if wanted is None else {"states": wanted}
        if tasks:
            args["tasks"] = True
        if short:
            args["short"] = True
        if job_id is not None:
            args["job_id"] = check_job_id(job_id)
        reply = self._call("list", **args)
        fields = reply["fields"]
        yield fields, json.loads(reply["rows"])
        cursor = reply.get("cursor")
        if cursor is None:
            return
        requests = (
            ("list_more", {"queue": self.queue, "cursor": cursor, "batch": batch})
            for batch in range(1, reply["batches"])
        )
        for more in self.session().pipeline(requests, window=4):
            yield fields, json.loads(more["rows"])

    def prune(
        self,
        states: Sequence[str] | None = None,
        older_than: float | None = None,
        *,
        dry_run: bool = False,
    ) -> Sequence[str]:
        """Delete ended jobs in bulk: those in states (all ended ones by default) that
        ended more than older_than seconds ago (if given); returns their ids.

        As delete does: jobs waiting for a pruned job learn how it ended, and the
        store's blobs only pruned jobs used are freed; an active job is never
        pruned. dry_run: only say which would be.
        """
        args: dict[str, Any] = {"dry_run": dry_run}
        if states is not None:
            args["states"] = _check_states(states)
        if older_than is not None:
            args["older_than"] = older_than
        return list(self._call("prune", **args)["ids"])

    def kill(self, job_id: str) -> KillResult:
        """Kill a job's whole process group (SIGTERM, then SIGKILL after a grace period)."""
        result = self._call("kill", job_id=check_job_id(job_id))
        return KillResult(result["killed"], status_of(result["status"]))

    def delete(self, job_id: str, *, force: bool = False) -> None:
        """Delete a job and its files; a running job only with force (killed first).

        An array's task (ARRAYID.N): its files are deleted, and its id is then not
        found, but its array keeps its record (counted in the state it ended in);
        a task that never started (its array ended) has none: InvalidInput.
        """
        self._call("delete", job_id=check_job_id(job_id), force=force)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[JobStatus], None] | None = None,
        interval: float = protocol.MAX_BLOCK,
    ) -> JobStatus:
        """Block until the job ends and return its final status.

        Raises WaitTimeout if timeout seconds pass first. on_progress is called
        with the job's status about every `interval` seconds while it runs.
        """
        check_job_id(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            block = interval if deadline is None else min(interval, deadline - time.monotonic())
            status = status_of(self._call("wait", job_id=job_id, timeout=max(block, 0)))
            if not status.state.is_active:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"Job {job_id!r} is still {status.state.value} after {timeout:g} s"
                )
            if on_progress is not None:
                on_progress(status)

    def logs(
        self,
        job_id: str,
        stream: str = "stdout",
        follow: bool = False,
        tail: int | None = None,
        attempt: int | None = None,
    ) -> Iterator[bytes]:
        """Yield the job's output (stdout or stderr) in chunks.

        attempt: the output of that attempt of a job with retries (1 for the
        first); by default, the current one's. With follow, new output is
        streamed as it is written, until the job ends and every last byte has
        been delivered (without attempt, following the later attempts too).
        tail starts at the last `tail` lines.
        """
        from tej import transfer

        check_job_id(job_id)
        if stream not in ("stdout", "stderr"):
            raise InvalidInput(f"stream must be stdout or stderr, not {stream!r}")
        if attempt is not None and (isinstance(attempt, bool) or attempt < 1):
            raise InvalidInput(f"attempt must be 1 or more, not {attempt!r}")
        pinned = {} if attempt is None else {"attempt": attempt}
        offset = 0
        if tail is not None:
            offset = self._call("tail_offset", job_id=job_id, stream=stream, lines=tail, **pinned)
        while True:
            reply = self._call(
                "read_output",
                job_id=job_id,
                stream=stream,
                offset=offset,
                length=transfer.CHUNK_SIZE,
                wait=protocol.MAX_BLOCK if follow else 0,
                **pinned,
            )
            if reply["data"]:
                offset = reply["offset"]
                pinned = pinned or ({"attempt": reply["attempt"]} if reply["attempt"] else {})
                yield reply["data"]
            elif follow and attempt is None and reply["attempt"] < reply["attempts"]:
                pinned, offset = {"attempt": reply["attempt"] + 1}, 0  # on to the next one
            elif reply["ended"] or not follow:
                return

    def download(
        self, job_id: str, path: str, local: str, progress: transfer.Progress | None = None
    ) -> str:
        """Download a job's file or folder (path relative to the job) to local, atomically.

        progress, if given, is called with (bytes just received, total bytes).
        """
        from tej import transfer

        entries = transfer.list_remote(self.session(), self.queue, check_job_id(job_id), path)
        transfer.download_tree(self.session(), self.queue, job_id, path, entries, local, progress)
        return local

    def download_tasks(
        self, array_id: str, path: str, folder: str, progress: transfer.Progress | None = None
    ) -> Sequence[str]:
        """Download a file or folder of every task of an array that started, each into
        folder/ARRAYID.N/ (under its base name); returns the local paths written."""
        status = self.status(array_id, tasks=True)
        if not isinstance(status, ArrayStatus):
            raise InvalidInput(f"{array_id!r} is not an array")
        written = []
        name = os.path.basename(path.rstrip("/")) or status.id
        for task in status.tasks:
            if task.started_at is None:
                continue  # never ran: it has no files
            local = os.path.join(folder, task.id, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                written.append(self.download(task.id, path, local, progress))
            except JobNotFound:  # the task was deleted (tej delete --id ARRAYID.N)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(local))
        return written

    def read(self, job_id: str, path: str) -> Iterator[bytes]:
        """Yield the content of a job's file, chunk by chunk."""
        from tej import transfer

        entries = transfer.list_remote(self.session(), self.queue, check_job_id(job_id), path)
        if entries[0].kind != "f":
            raise InvalidInput(f"{path} is a folder, not a file")
        yield from transfer.stream_file(self.session(), self.queue, job_id, path, entries[0].size)

    def sync(
        self,
        job_id: str,
        to: str,
        paths: Sequence[str] = (),
        delete: bool = False,
        *,
        exclude: Sequence[str] = (),
        force: bool = False,
        dry_run: bool = False,
        progress: transfer.Progress | None = None,
    ) -> SyncSummary:
        """Mirror a job's files (or the paths named, in it) into the local folder to.

        Only what changed since the last sync is sent (see tej.sync); each file
        appears whole. delete removes local files the job doesn't have (within
        the paths synced); in a folder that holds anything but a previous sync
        of this job, only with force. exclude: globs of paths left alone.
        dry_run changes nothing, and the summary lists what would be done.
        """
        syncer = self._syncer(job_id, to, paths, delete, exclude, force, dry_run, progress)
        return syncer.run()

    def sync_follow(
        self,
        job_id: str,
        to: str,
        paths: Sequence[str] = (),
        delete: bool = False,
        *,
        interval: float = 5.0,
        exclude: Sequence[str] = (),
        force: bool = False,
        progress: transfer.Progress | None = None,
    ) -> Iterator[SyncSummary]:
        """sync again every interval seconds until the job has ended; yields each pass's summary.

        A pass where nothing changed on the server costs one request. The last
        pass is made after the job ended, so it holds the job's last files.
        """
        from tej import sync

        sync.check_interval(interval)
        syncer = self._syncer(job_id, to, paths, delete, exclude, force, False, progress)
        return sync.follow(syncer, interval)

    def sync_tasks(
        self,
        array_id: str,
        to: str,
        paths: Sequence[str] = (),
        delete: bool = False,
        *,
        exclude: Sequence[str] = (),
        force: bool = False,
        dry_run: bool = False,
        progress: transfer.Progress | None = None,
    ) -> SyncSummary:
        """sync() of every task of an array that started, each into to/ARRAYID.N/, over
        this one connection; the summary is their sum (its state: the array's). A
        path a task doesn't have (yet) is left out of its sync, not an error."""
        passes = self._array_passes(
            array_id, to, paths, delete, exclude, force, dry_run, progress, follow=False
        )
        return next(passes)

    def sync_tasks_follow(
        self,
        array_id: str,
        to: str,
        paths: Sequence[str] = (),
        delete: bool = False,
        *,
        interval: float = 5.0,
        exclude: Sequence[str] = (),
        force: bool = False,
        progress: transfer.Progress | None = None,
    ) -> Iterator[SyncSummary]:
        """sync_tasks again every interval seconds until the array has ended; yields each
        pass's summary. A task is synced once more after it ended, then left alone."""
        from tej import sync

        sync.check_interval(interval)
        return self._array_passes(
            array_id, to, paths, delete, exclude, force, False, progress, interval=interval
        )

    def _array_passes(
        self,
        array_id: str,
        to: str,
        paths: Sequence[str],
        delete: bool,
        exclude: Sequence[str],
        force: bool,
        dry_run: bool,
        progress: transfer.Progress | None,
        follow: bool = True,
        interval: float = 5.0,
    ) -> Iterator[SyncSummary]:
        """The passes of sync_tasks(_follow): each syncs the tasks that started and had
        not ended at their last pass (each task keeps its Syncer: an idle pass of a
        task costs one request); the last one is made once the array has ended."""
        from tej import sync

        check_job_id(array_id)
        sync.check_folder(to)
        syncers: dict[str, Syncer] = {}
        done: set[str] = set()
        while True:
            started = time.monotonic()
            status = self.status(array_id, tasks=True)
            if not isinstance(status, ArrayStatus):
                raise InvalidInput(f"{array_id!r} is not an array")
            if not dry_run:
                os.makedirs(to, exist_ok=True)
            due = [t.id for t in status.tasks if t.started_at is not None and t.id not in done]
            new = [task_id for task_id in due if task_id not in syncers]
            for task_id in new:  # every new task's folder is checked before any is written
                local = os.path.join(to, task_id)
                syncers[task_id] = self._syncer(
                    task_id, local, paths, delete, exclude, force, dry_run, progress
                )
            total = sync.SyncSummary(dry_run=dry_run, requests=1)
            for task_id in due:  # started, and not synced since it ended
                try:
                    summary = syncers[task_id].run(missing_ok=True, idle_ok=task_id not in new)
                except JobNotFound:  # deleted meanwhile (tej delete --id ARRAYID.N)
                    done.add(task_id)
                    continue
                if summary.state not in protocol.ACTIVE_STATES:
                    done.add(task_id)
                total = total + summary
            yield total + sync.SyncSummary(state=status.state.value)
            if not follow or not status.state.is_active:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _syncer(
        self,
        job_id: str,
        to: str,
        paths: Sequence[str],
        delete: bool,
        exclude: Sequence[str],
        force: bool,
        dry_run: bool,
        progress: transfer.Progress | None,
    ) -> Syncer:
        """Check a sync's arguments and its local folder, before anything is sent."""
        from tej import sync

        check_job_id(job_id)
        syncer = sync.Syncer(
            self.session,
            self.queue,
            job_id,
            to,
            paths,
            delete=delete,
            exclude=exclude,
            dry_run=dry_run,
            progress=progress,
            destination=str(self.destination),
        )
        sync.prepare_destination(to, job_id, delete, force, dry_run)
        return syncer


def _failed_tasks(status: JobStatus, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The array field of a re-run of an array's failed tasks (resubmit --failed)."""
    if not isinstance(status, ArrayStatus):
        raise InvalidInput(f"{status.id!r} is not an array: --failed re-runs an array's tasks")
    if status.state.is_active:
        raise InvalidInput(f"Array {status.id!r} is still {status.state.value}: wait for it first")
    if metadata.get("array") is not None:
        raise InvalidInput("--failed chooses the tasks: leave out --array")
    failed = [
        int(task.id.rpartition(".")[2])
        for task in status.tasks
        if task.state is not JobState.FINISHED or task.exit_code != 0
    ]
    if not failed:
        raise InvalidInput(f"Every task of array {status.id!r} finished with exit code 0")
    return {"indexes": protocol.format_indexes(sorted(failed)), "max_parallel": status.max_parallel}


def _array_params(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """submit's metadata without params (rows, one per task), and the rows as JSON lines.

    With params, the job is an array of one task per row (indexes 0 to rows - 1).
    """
    from tej import jobspec

    metadata = dict(metadata)
    rows = metadata.pop("params", None)
    if rows is None:
        return metadata, None
    if metadata.get("array") is not None:
        raise InvalidInput("--params and --array can't be combined: a task per row of params")
    text = jobspec.check_params(rows)
    metadata["array"] = f"0-{len(rows) - 1}"
    return metadata, text


def _prepare_job(
    directory: str,
    job_id: str | None,
    defaults: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    with_params: bool = False,
) -> tuple[dict[str, Any], Excludes | None]:
    """Check a job before anything is sent; its metadata, and what leaves files out."""
    from tej import jobspec, transfer
    from tej.excludes import load_excludes

    from_file = jobspec.load_job_file(directory)
    if with_params and from_file.get("array") is not None:
        raise InvalidInput("--params can't be combined with tej.json's array: a task per row")
    job = jobspec.build_job(from_file, dict(metadata), defaults)
    transfer.check_directory(directory)
    excludes = load_excludes(directory, jobspec.exclude_patterns(from_file, dict(metadata)))
    _check_script(directory, job["script"])
    if excludes is not None and excludes.excludes_file(job["script"]):
        raise InvalidInput(f"The script {job['script']!r} is excluded by {excludes.origin}")
    if job_id is not None:
        problem = protocol.new_job_id_problem(job_id)
        if problem is not None:
            raise InvalidInput(problem)
    return job, excludes


def _check_states(states: Sequence[str | JobState]) -> list[str]:
    """States' names, checked; one state alone (a string) is taken as a list of one."""
    if isinstance(states, str):  # a JobState too
        states = [states]
    return [_check_state(state) for state in states]


def _check_state(state: str | JobState) -> str:
    """A job state's name, checked (InvalidInput if it is none)."""
    value = state.value if isinstance(state, JobState) else state
    if value not in protocol.ACTIVE_STATES + protocol.END_STATES:
        states = ", ".join(protocol.ACTIVE_STATES + protocol.END_STATES)
        raise InvalidInput(f"Unknown job state {value!r} (one of {states})")
    return value


def _read_ahead(items: Iterator[T]) -> Iterator[T]:
    """Start running an iterator in a thread, ahead of its consumer.

    The iterator returned yields its items, then raises its error if it had one.
    """
    found: SimpleQueue[tuple[bool, Any]] = SimpleQueue()

    def run() -> None:
        try:
            for item in items:
                found.put((True, item))
            found.put((False, None))
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            found.put((False, exc))

    def consume() -> Iterator[T]:
        while True:
            more, item = found.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item

    threading.Thread(target=run, name="tej-scan", daemon=True).start()
    return consume()


def _check_script(directory: str, script: str) -> None:
    """Refuse a script that is not a file inside the job directory."""
    if os.path.isabs(script) or ".." in script.split("/"):
        raise InvalidInput(f"The script {script!r} must be a path inside {directory}")
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(directory, script))
    if not real.startswith(root + os.sep):
        raise InvalidInput(f"The script {script!r} leads outside {directory}")
    if not os.path.isfile(real):
        if script == DEFAULT_SCRIPT:
            raise InvalidInput(
                f"No {DEFAULT_SCRIPT} in {directory}: add one, or name the script with --script"
            )
        raise InvalidInput(f"No script {script!r} in {directory}")
