#!/usr/bin/env python3
"""tej's benchmark suite: tej against the SSH floor, and against the original tej 0.6.

    python3 bench/run.py [--smoke] [--runs N] [--output bench/RESULTS.md]

It starts its own sshd on loopback (tests/sshd.py, the server's default settings, so
compression is allowed), measures every row side by side in the same run (tej and its
baseline alternate run by run; medians are compared), prints one table and writes it,
with the date and the machine, to the output file. bench/README.md says what each row
measures. Timings never fail the script: it exits 0 whatever the ratios, and non-zero
only if something crashed (a row that could not be measured is marked `error`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import sshd  # noqa: E402  (tests/sshd.py: the loopback sshd the tests use)

MiB = 1 << 20
TEJ06_SPEC = "tej==0.6"
TEJ06_BIG_TIMEOUT = 3600.0
COMMAND_TIMEOUT = 1800.0
STATUS_JOB = "bench-status"
FILES_JOB = "bench-files"
RESUBMIT_JOB = "bench-resubmit"
SYNC_JOB = "bench-sync"
IDLE_PASSES = 8  # row S3: the idle passes of `sync --follow` measured
SSH_NAMES = ("tej", "ssh true")


@dataclass(frozen=True)
class Sizes:
    """How big each row's data is."""

    small_files: int  # row 4: the number of small files
    small_size: int  # row 4: bytes of each small file
    big_file: int  # row 4: the one incompressible file
    download: int  # row 6
    submits: int  # row 7
    list_jobs: int  # row 8
    rss_download: int  # row 9
    queued: int  # row 11: the long queue (the short one has SHORT_QUEUE jobs)
    list_many: int  # row 12
    prune: int  # row 13
    array_tasks: int  # row A4: the tasks of the array whose rate is measured


FULL = Sizes(
    10_000,
    10 * 1024,
    100 * MiB,
    200 * MiB,
    1000,
    10_000,
    1024 * MiB,
    10_000,
    100_000,
    5000,
    1000,
)
SMOKE = Sizes(50, 1024, 1 * MiB, 5 * MiB, 20, 200, 5 * MiB, 40, 300, 100, 100)
SHORT_QUEUE = 10
HEAD_JOBS = 6  # row 11: the jobs that start one after another (the next-start gaps)


@dataclass
class Row:
    """One line of the table."""

    key: str
    what: str
    tej: str = "-"
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: str = "-"
    detail: str = ""


class BenchError(Exception):
    """A command of the benchmark failed (tej or a baseline): the row can't be measured."""


# -- formatting ----------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    """A duration, in ms below a second."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_size(size: int) -> str:
    """A size in MiB or KiB."""
    return f"{size / MiB:g} MiB" if size >= MiB else f"{size / 1024:g} KiB"


def fmt_samples(times: Sequence[float]) -> str:
    """Every sample, in ms."""
    return ", ".join(f"{t * 1000:.0f}" for t in times) + " ms"


def verdict(ok: bool) -> str:
    """The `met` column."""
    return "yes" if ok else "**no**"


def median(values: Sequence[float]) -> float:
    """The median of samples."""
    return statistics.median(values)


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, columns padded."""
    header = ("#", "what", "tej", "baseline", "ratio", "target", "met")
    cells = [header] + [(r.key, r.what, r.tej, r.baseline, r.ratio, r.target, r.met) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


# -- the machine ---------------------------------------------------------------------------


def machine_info(bench: Bench) -> list[tuple[str, str]]:
    """What the results were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                memory = f"{int(text.split()[1]) / (1 << 20):.1f} GiB"
    system = platform.system()
    with contextlib.suppress(OSError):
        for text in Path("/etc/os-release").read_text().splitlines():
            if text.startswith("PRETTY_NAME="):
                system = text.split("=", 1)[1].strip().strip('"')
    ssh_version = _output(["ssh", "-V"], stderr=True)
    remote_python = _output(bench.server.ssh_argv("python3", "-V"))
    import tej

    commit = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "tej"])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", memory),
        ("OS", f"{system} (kernel {platform.release()})"),
        ("Python (client)", f"{platform.python_version()} ({sys.executable})"),
        (
            "tej CLI",
            f"{shlex.join(bench.tej_command)} (this checkout, pip-installed in a new venv)",
        ),
        ("Python (server, as the SSH user)", remote_python),
        ("OpenSSH", ssh_version),
        ("tej", f"{tej.__version__} (commit {commit}{', tej/ modified' if dirty else ''})"),
        ("load average at start", load),
    ]


def _output(argv: Sequence[str], stderr: bool = False) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (done.stderr if stderr else done.stdout).strip() or done.stderr.strip()


# -- the bench -----------------------------------------------------------------------------


class Bench:
    """The server, the local scratch space, and how to run and time things."""

    def __init__(self, server: sshd.SshServer, work: Path, sizes: Sizes, smoke: bool) -> None:
        self.server = server
        self.work = work
        self.sizes = sizes
        self.smoke = smoke
        self.remote = Path(server.home) / f"tej-bench-{uuid.uuid4().hex[:8]}"
        self.make_remote_dir(self.remote)
        self.tiny = self.make_tiny_job(work / "tiny")
        self._files_job: Path | None = None
        self._big_dir: Path | None = None
        self.fresh_dirs: list[Path] = []  # made by fresh_remote_dir, removed at the end
        self.tej_python = sys.executable
        self.tej_command = [sys.executable, "-m", "tej"]  # the `tej` script, once installed
        self.install_tej()

    # processes

    def install_tej(self) -> None:
        """Install this checkout's tej into a throwaway venv, as a user would (pip install .).

        So the CLI rows time tej as installed: compiled by pip, beside execnet and click
        only, not run from the checkout (where PYTHONDONTWRITEBYTECODE would make every
        run compile it) nor with whatever this interpreter's site-packages load at start.
        """
        venv = self.work / "tej-venv"
        progress(f"installing tej from {ROOT} into {venv}")
        python = venv / "bin" / "python"
        quick = [
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(ROOT)],
        ]
        slow = [  # a pip older than 22.3 has no --python
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", str(ROOT)],
        ]
        for steps in (quick, slow):
            failed = None
            for argv in steps:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    failed = f"{shlex.join(argv)} failed: {done.stderr.strip()[-600:]}"
                    break
            if failed is None:
                self.tej_python = str(python)
                self.tej_command = [str(venv / "bin" / "tej")]  # what a user runs
                return
        if not self.smoke:
            raise BenchError(failed)
        progress(f"{failed}; smoke mode: running tej from the checkout instead")

    def tej_env(self, control: Path) -> dict[str, str]:
        """The environment of a tej CLI process: its own ssh socket folder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TEJ_", "PYTHON"))}
        env["XDG_RUNTIME_DIR"] = str(control)
        if self.tej_python == sys.executable:  # not installed (smoke mode): the checkout's
            env["PYTHONPATH"] = str(ROOT)
        return env

    def tej_argv(self, command: str, *args: str, queue: Path | str) -> list[str]:
        """`VENV/bin/tej COMMAND ALIAS --ssh-config CFG --queue QUEUE ARGS...`."""
        return [
            *self.tej_command,
            command,
            self.server.alias,
            "--ssh-config",
            self.server.config_path,
            "--queue",
            str(queue),
            *args,
        ]

    def time_tej(self, command: str, *args: str, queue: Path | str, control: Path) -> float:
        """Run the tej CLI once; return its wall time."""
        return self.time_cmd(self.tej_argv(command, *args, queue=queue), env=self.tej_env(control))

    def time_cmd(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = subprocess.PIPE,
        timeout: float = COMMAND_TIMEOUT,
    ) -> float:
        """Run a command; return its wall time; BenchError if it fails."""
        start = time.perf_counter()
        try:
            done = subprocess.run(
                list(argv), env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from None
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip()[-800:]
            raise BenchError(f"exit {done.returncode}: {shlex.join(argv)}: {tail}")
        return elapsed

    @contextlib.contextmanager
    def connection_scope(self) -> Iterator[Path]:
        """A fresh folder for tej's shared ssh connections; they are closed on leaving."""
        path = Path(tempfile.mkdtemp(prefix="ctl-", dir=self.work))
        try:
            yield path
        finally:
            close_masters(path)
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def api(self, queue: Path | str) -> Iterator[Any]:
        """A RemoteQueue over ssh, in its own connection scope."""
        import tej

        with self.connection_scope() as control:
            saved = os.environ.get("XDG_RUNTIME_DIR")
            os.environ["XDG_RUNTIME_DIR"] = str(control)
            try:
                remote = tej.RemoteQueue(
                    self.server.alias, queue=str(queue), ssh_config=self.server.config_path
                )
                with remote:
                    yield remote
            finally:
                if saved is None:
                    os.environ.pop("XDG_RUNTIME_DIR", None)
                else:
                    os.environ["XDG_RUNTIME_DIR"] = saved

    # files on the server (written directly, as the SSH user would own them)

    def make_remote_dir(self, path: Path) -> None:
        """Make a folder on the server side, owned by the SSH user."""
        path.mkdir(mode=0o755, parents=False, exist_ok=True)
        self.chown(path)

    def chown(self, path: Path) -> None:
        """Give path to the SSH user (only needed, and possible, as root)."""
        if sshd.is_root():
            os.chown(path, self.server.uid, self.server.gid, follow_symlinks=False)

    def remote_path(self, name: str) -> Path:
        """A fresh path in the benchmark's folder on the server (not created)."""
        return self.remote / f"{name}-{uuid.uuid4().hex[:6]}"

    def fresh_remote_dir(self, name: str) -> Path:
        """A new folder on the server, at the file system's root if root may make one there
        (a top-level folder goes to a block group where earlier rows removed nothing),
        else in the bench's folder."""
        try:
            path = Path(tempfile.mkdtemp(prefix=f"tej-bench-{name}-", dir="/"))
        except OSError:
            path = self.remote_path(name)
            path.mkdir(mode=0o755)
        path.chmod(0o755)
        self.chown(path)
        self.fresh_dirs.append(path)
        return path

    # local data

    @staticmethod
    def make_tiny_job(path: Path) -> Path:
        """A job directory with only a start.sh that exits at once."""
        path.mkdir(parents=True, exist_ok=True)
        script = path / "start.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        return path

    def big_dir(self) -> Path:
        """Row 4's directory: many small text files, one big incompressible file."""
        if self._big_dir is None:
            path = self.make_tiny_job(self.work / "bigjob")
            per_folder = 100
            for index in range(self.sizes.small_files):
                folder = path / f"d{index // per_folder:03d}"
                if index % per_folder == 0:
                    folder.mkdir()
                (folder / f"f{index:05d}.txt").write_bytes(small_content(self.sizes.small_size))
            write_random(path / "big.bin", self.sizes.big_file)
            self._big_dir = path
        return self._big_dir

    def files_job(self) -> Path:
        """A finished job, on the server, whose work folder rows 6 and 9 download from."""
        if self._files_job is None:
            queue = self.remote_path("q-files")
            with self.api(queue) as remote:
                remote.submit(str(self.tiny), job_id=FILES_JOB)
                remote.wait(FILES_JOB, timeout=60)
            work = queue / "jobs" / FILES_JOB / "work"
            if not work.is_dir():
                raise BenchError(f"no {work}: has docs/queue-format.md's layout changed?")
            self._files_job = queue
        return self._files_job


def small_content(size: int) -> bytes:
    """Text that compresses somewhat, as source and data files do (base64 of random)."""
    import base64

    return base64.b64encode(os.urandom(size * 3 // 4 + 3))[:size]


def write_random(path: Path, size: int, owner: tuple[int, int] | None = None) -> None:
    """An incompressible file of size bytes."""
    with open(path, "wb") as out:
        left = size
        while left > 0:
            out.write(os.urandom(min(left, 4 * MiB)))
            left -= 4 * MiB
    if owner is not None:
        os.chown(path, *owner)


def close_masters(folder: Path) -> None:
    """Close every ssh ControlMaster whose socket is under folder."""
    for path in folder.rglob("*"):
        if not _is_socket(path):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["ssh", "-F", "/dev/null", "-o", f"ControlPath={path}", "-O", "exit", "bench"],
                capture_output=True,
                timeout=10,
            )


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:
        return False


def remove_tree(path: Path) -> None:
    """Remove a folder, retrying while processes (supervisors) may still write in it."""
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.2)


def side_by_side(
    runs: int, tej_run: Callable[[], float], base_run: Callable[[], float], label: str
) -> tuple[list[float], list[float]]:
    """Alternate tej and its baseline, run by run (the order flips each run)."""
    tej_times: list[float] = []
    base_times: list[float] = []
    for index in range(runs):
        progress(f"{label}: run {index + 1}/{runs}")
        first, second = (tej_run, base_run) if index % 2 == 0 else (base_run, tej_run)
        for run in (first, second):
            os.sync()  # no run pays for writing back the previous one's files
            (tej_times if run is tej_run else base_times).append(run())
    return tej_times, base_times


def progress(message: str) -> None:
    """A line on stderr, to follow a long run."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio_row(
    key: str,
    what: str,
    tej_times: Sequence[float],
    base_times: Sequence[float],
    limit: float | None,
    names: tuple[str, str] = ("tej", "baseline"),
) -> Row:
    """A row whose ratio is tej's median time over the baseline's (lower is better)."""
    ratio = median(tej_times) / median(base_times)
    return Row(
        key,
        what,
        tej=fmt_time(median(tej_times)),
        baseline=fmt_time(median(base_times)),
        ratio=fmt_ratio(ratio, limit),
        target="-" if limit is None else f"<= {limit:.2f}",
        met="-" if limit is None else verdict(ratio <= limit),
        detail=f"{names[0]} {fmt_samples(tej_times)}; {names[1]} {fmt_samples(base_times)}",
    )


def fmt_ratio(ratio: float, limit: float | None) -> str:
    """A ratio to 2 decimals; 3 when small, or where 2 would hide its side of the limit."""
    if ratio < 0.1 or (limit is not None and f"{ratio:.2f}" == f"{limit:.2f}"):
        return f"{ratio:.3f}"
    return f"{ratio:.2f}"


# -- the rows ------------------------------------------------------------------------------


class Rows:
    """Each row's measurement."""

    def __init__(self, bench: Bench, runs: int, heavy_runs: int, mid_runs: int) -> None:
        self.b = bench
        self.runs = runs
        self.heavy_runs = heavy_runs
        self.mid_runs = mid_runs
        self._status_queue: Path | None = None
        self._tiny_queue: Path | None = None

    def ssh_true(self) -> float:
        """The floor: `ssh -F CFG ALIAS true`."""
        return self.b.time_cmd(self.b.server.ssh_argv("true"))

    def status_queue(self) -> Path:
        """A queue holding one finished job, STATUS_JOB (rows 1, 2, 10)."""
        if self._status_queue is None:
            queue = self.b.remote_path("q-status")
            with self.b.api(queue) as remote:
                remote.submit(str(self.b.tiny), job_id=STATUS_JOB)
                remote.wait(STATUS_JOB, timeout=60)
            self._status_queue = queue
        return self._status_queue

    def tiny_queue(self) -> Path:
        """An existing queue that tiny jobs are submitted to (rows 3, 10)."""
        if self._tiny_queue is None:
            queue = self.b.remote_path("q-tiny")
            with self.b.api(queue) as remote:
                remote.submit(str(self.b.tiny))
            self._tiny_queue = queue
        return self._tiny_queue

    def cold_status(self) -> float:
        with self.b.connection_scope() as control:
            return self.b.time_tej(
                "status", "--id", STATUS_JOB, queue=self.status_queue(), control=control
            )

    def row1(self) -> list[Row]:
        self.status_queue()
        tej_t, base_t = side_by_side(self.runs, self.cold_status, self.ssh_true, "row 1")
        return [ratio_row("1", "cold `tej status` vs `ssh true`", tej_t, base_t, 1.15, SSH_NAMES)]

    def row2(self) -> list[Row]:
        queue = self.status_queue()

        def warm() -> float:
            with self.b.connection_scope() as control:
                self.b.time_tej("status", "--id", STATUS_JOB, queue=queue, control=control)
                return self.b.time_tej("status", "--id", STATUS_JOB, queue=queue, control=control)

        tej_t, base_t = side_by_side(self.runs, warm, self.ssh_true, "row 2")
        return [
            ratio_row(
                "2", "warm `tej status` (2nd call) vs `ssh true`", tej_t, base_t, 0.35, SSH_NAMES
            )
        ]

    def cold_tiny_submit(self) -> float:
        with self.b.connection_scope() as control:
            return self.b.time_tej(
                "submit", str(self.b.tiny), queue=self.tiny_queue(), control=control
            )

    def row3(self) -> list[Row]:
        self.tiny_queue()
        tej_t, base_t = side_by_side(self.runs, self.cold_tiny_submit, self.ssh_true, "row 3")
        return [ratio_row("3", "submit a tiny job vs `ssh true`", tej_t, base_t, None, SSH_NAMES)]

    def fresh_queue_with_job(self, name: str) -> Path:
        """A new queue that already exists on the server (one tiny job in it)."""
        queue = self.b.remote_path(name)
        with self.b.api(queue) as remote:
            remote.submit(str(self.b.tiny))
        return queue

    def tar_ssh(self, directory: Path) -> float:
        """`tar c DIR | ssh ALIAS tar x -C DEST`, into a new folder."""
        dest = self.b.remote_path("tar")
        self.b.make_remote_dir(dest)
        ssh = shlex.join(self.b.server.ssh_argv("tar", "x", "-C", str(dest)))
        pipeline = f"set -o pipefail; tar c -C {shlex.quote(str(directory))} . | {ssh}"
        try:
            return self.b.time_cmd(["bash", "-c", pipeline])
        finally:
            remove_tree(dest)

    def rows4_5(self) -> list[Row]:
        directory = self.b.big_dir()
        progress(f"row 4/5: {directory} ready")
        first: list[float] = []
        again: list[float] = []
        changed = sorted(directory.glob("d000/*.txt"))[0]

        def tej_run() -> float:
            queue = self.fresh_queue_with_job("q-big")
            try:
                with self.b.connection_scope() as control:
                    first.append(
                        self.b.time_tej("submit", str(directory), queue=queue, control=control)
                    )
                    changed.write_bytes(small_content(self.b.sizes.small_size))
                    # The re-submit follows at once, as a user's would, in the same scope.
                    again.append(
                        self.b.time_tej("submit", str(directory), queue=queue, control=control)
                    )
                return first[-1]
            finally:
                remove_tree(queue)

        tej_t, base_t = side_by_side(
            self.mid_runs, tej_run, lambda: self.tar_ssh(directory), "row 4/5"
        )
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        what4 = (
            f"submit {self.b.sizes.small_files} small files + {fmt_size(self.b.sizes.big_file)}"
            f" incompressible ({size / MiB:.0f} MiB) vs `tar c | ssh tar x`"
        )
        row4 = ratio_row("4", what4, tej_t, base_t, 1.25, ("tej", "tar | ssh"))
        what5 = "re-submit, one small file changed, vs first submit"
        row5 = ratio_row("5", what5, again, first, 0.10, ("re-submit", "first submit"))
        row5.baseline += " (first submit)"
        return [row4, row5]

    def row6(self) -> list[Row]:
        size = self.b.sizes.download
        queue = self.b.files_job()
        work = queue / "jobs" / FILES_JOB / "work"
        write_random(work / "download.bin", size, self.owner())
        local = self.b.work / "download.bin"

        def tej_run() -> float:
            with self.b.connection_scope() as control:
                try:
                    return self.b.time_tej(
                        "download",
                        "--id",
                        FILES_JOB,
                        f"download.bin:{local}",
                        queue=queue,
                        control=control,
                    )
                finally:
                    local.unlink(missing_ok=True)

        def base_run() -> float:
            try:
                with open(local, "wb") as out:
                    argv = self.b.server.ssh_argv("cat", str(work / "download.bin"))
                    return self.b.time_cmd(argv, stdout=out)
            finally:
                local.unlink(missing_ok=True)

        tej_t, base_t = side_by_side(self.mid_runs, tej_run, base_run, "row 6")
        tej_rate = size / MiB / median(tej_t)
        base_rate = size / MiB / median(base_t)
        throughput = tej_rate / base_rate
        return [
            Row(
                "6",
                f"download {fmt_size(size)} incompressible vs `ssh cat > file` (throughput)",
                tej=f"{fmt_time(median(tej_t))} ({tej_rate:.0f} MiB/s)",
                baseline=f"{fmt_time(median(base_t))} ({base_rate:.0f} MiB/s)",
                ratio=fmt_ratio(throughput, 0.8),
                target=">= 0.80",
                met=verdict(throughput >= 0.8),
                detail=f"tej {fmt_samples(tej_t)}; ssh cat {fmt_samples(base_t)}",
            )
        ]

    def row_resubmit(self) -> list[Row]:
        """R1: resubmit of a job of row 4's directory vs a tiny submit, both cold."""
        queue = self.b.remote_path("q-resubmit")
        with self.b.api(queue) as remote:
            remote.submit(str(self.b.big_dir()), job_id=RESUBMIT_JOB)
            remote.wait(RESUBMIT_JOB, timeout=600)
            remote.submit(str(self.b.tiny))

        def resubmit() -> float:
            with self.b.connection_scope() as control:
                return self.b.time_tej(
                    "resubmit", "--id", RESUBMIT_JOB, queue=queue, control=control
                )

        def tiny() -> float:
            with self.b.connection_scope() as control:
                return self.b.time_tej("submit", str(self.b.tiny), queue=queue, control=control)

        tej_t, base_t = side_by_side(self.runs, resubmit, tiny, "row R1")
        files = self.b.sizes.small_files
        what = f"cold `tej resubmit` of a job of {files} files + {fmt_size(self.b.sizes.big_file)}"
        return [
            ratio_row(
                "R1",
                f"{what} vs cold submit of a tiny job",
                tej_t,
                base_t,
                1.5,
                ("resubmit", "tiny submit"),
            )
        ]

    def rows_arrays(self) -> list[Row]:
        """A1-A4: array submits vs a tiny submit, status of an array vs a job, task start rate."""
        queue = self.b.remote_path("q-arrays")
        tiny = str(self.b.tiny)

        def submit(*args: str) -> Callable[[], float]:
            def run() -> float:
                with self.b.connection_scope() as control:
                    elapsed = self.b.time_tej("submit", *args, tiny, queue=queue, control=control)
                if args:  # untimed: an array left running would load the runs that follow
                    stop_active(queue)
                return elapsed

            return run

        def stop_active(queue: Path | str) -> None:
            with self.b.api(queue) as remote:
                for job in remote.list(states=["starting", "running"]):
                    remote.kill(job.id)

        rows = []
        for key, size, limit in (("A1", 1000, 1.5), ("A2", 10000, 3.0)):
            spec = f"0-{size - 1}%1"  # %1: the array's tasks cost the measure little
            tej_t, base_t = side_by_side(self.runs, submit("--array", spec), submit(), key)
            what = f"cold submit of a tiny {size:,}-task array vs of a tiny job"
            rows.append(ratio_row(key, what, tej_t, base_t, limit, ("array", "tiny submit")))
        with self.b.api(queue) as remote:
            remote.submit(tiny, job_id="a-job")
            remote.submit(tiny, job_id="a-10k", array="0-9999%1")

        def status(job_id: str) -> Callable[[], float]:
            def run() -> float:
                with self.b.connection_scope() as control:
                    return self.b.time_tej("status", "--id", job_id, queue=queue, control=control)

            return run

        tej_t, base_t = side_by_side(self.runs, status("a-10k"), status("a-job"), "A3")
        what = "cold `tej status` of a 10,000-task array vs of a job"
        rows.append(ratio_row("A3", what, tej_t, base_t, 1.3, ("array", "job")))
        with self.b.api(queue) as remote:
            for job_id in ("a-10k",):
                remote.kill(job_id)
            tasks = self.b.sizes.array_tasks
            remote.submit(tiny, job_id="a-rate", array=f"0-{tasks - 1}%256")
            done = remote.wait("a-rate", timeout=600)
        rate = tasks / max(done.elapsed or 0.0, 1e-6)
        rows.append(
            Row(
                "A4",
                f"default runner: tasks started and ended per second ({tasks:,} `true` tasks,"
                " %256)",
                tej=f"{rate:.0f}/s",
                target=">= 300/s",
                met=verdict(rate >= 300),
                detail=f"{done.elapsed:.2f} s for {tasks:,} tasks",
            )
        )
        return rows

    def owner(self) -> tuple[int, int] | None:
        return (self.b.server.uid, self.b.server.gid) if sshd.is_root() else None

    def row7(self) -> list[Row]:
        count = self.b.sizes.submits

        def tej_run() -> float:
            # Each run's queue in a new folder of its own, removed with the bench's data at
            # the end: on a file system without a journal, the files a run removes make the
            # next creates in their block group dearer for up to minutes (bench/README.md).
            with self.b.api(self.b.fresh_remote_dir("r7") / "q") as remote:
                remote.submit(str(self.b.tiny))  # opens the session, creates the queue
                start = time.perf_counter()
                for _ in range(count):
                    remote.submit(str(self.b.tiny))
                return time.perf_counter() - start

        tej_t, base_t = side_by_side(self.heavy_runs, tej_run, self.ssh_true, "row 7")
        per_job = median(tej_t) / count
        rate = count / median(tej_t)
        return [
            Row(
                "7",
                f"{count} tiny submits in one API session: per job vs `ssh true`",
                tej=f"{per_job * 1000:.1f} ms/job ({rate:.0f} jobs/s)",
                baseline=fmt_time(median(base_t)),
                ratio=f"{per_job / median(base_t):.3f}",
                target=">= 200 jobs/s",
                met=verdict(rate >= 200),
                detail=f"tej {fmt_samples(tej_t)} for {count} jobs; ssh true {fmt_samples(base_t)}",
            )
        ]

    def row8(self) -> list[Row]:
        count = self.b.sizes.list_jobs
        queue = self.b.remote_path("q-list")
        with self.b.api(queue) as remote:
            template_id = remote.submit(str(self.b.tiny), job_id="bench-00000")
            remote.wait(template_id, timeout=60)
        progress(f"row 8: making {count} jobs")
        clone_jobs(queue / "jobs", template_id, count - 1, self.owner())
        self.reindex(queue)
        listed: list[int] = []

        def tej_run() -> float:
            with self.b.connection_scope() as control:
                argv = self.b.tej_argv("list", queue=queue)
                start = time.perf_counter()
                done = subprocess.run(
                    argv, env=self.b.tej_env(control), capture_output=True, timeout=600
                )
                elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise BenchError(f"tej list exited {done.returncode}: {done.stderr[-800:]!r}")
            listed.append(len(done.stdout.splitlines()) - 1)
            return elapsed

        def base_run() -> float:
            return self.b.time_cmd(self.b.server.ssh_argv("ls", str(queue / "jobs")))

        try:
            tej_t, base_t = side_by_side(self.runs, tej_run, base_run, "row 8")
        finally:
            remove_tree(queue)
        row = ratio_row(
            "8",
            f"`tej list` of {count} jobs vs `ssh ls QUEUE/jobs`",
            tej_t,
            base_t,
            2.0,
            ("tej list", "ssh ls"),
        )
        if any(n != count for n in listed):
            row.detail += f"; WARNING: tej list printed {sorted(set(listed))} jobs, not {count}"
        return [row]

    def reindex(self, queue: Path) -> None:
        """Have the index of a queue whose jobs were made directly built (untimed)."""
        shutil.rmtree(queue / "index", ignore_errors=True)
        progress("indexing the jobs made directly (one untimed `tej list`)")
        with self.b.connection_scope() as control:
            self.b.time_tej("list", queue=queue, control=control)

    def row9(self) -> list[Row]:
        size = self.b.sizes.rss_download
        queue = self.b.files_job()
        write_random(queue / "jobs" / FILES_JOB / "work" / "rss.bin", size, self.owner())
        local = self.b.work / "rss.bin"
        with self.b.connection_scope() as control:
            argv = self.b.tej_argv("download", "--id", FILES_JOB, f"rss.bin:{local}", queue=queue)
            progress(f"row 9: downloading {fmt_size(size)}")
            try:
                peak_kib, elapsed = peak_rss(argv, self.b.tej_env(control))
                got = local.stat().st_size
            finally:
                local.unlink(missing_ok=True)
        if got != size:
            raise BenchError(f"downloaded {got} bytes, not {size}")
        peak = peak_kib / 1024
        return [
            Row(
                "9",
                f"peak client RSS, `tej download` of {fmt_size(size)}",
                tej=f"{peak:.1f} MB",
                target="< 100 MB",
                met=verdict(peak < 100),
                detail=f"peak RSS of the tej process (its ssh child included); took "
                f"{fmt_time(elapsed)}",
            )
        ]

    # rows 11-13: the queue's index

    def queued_queue(self, name: str, fillers: int) -> tuple[Path, list[str], str]:
        """A queue runner's queue (max_running=1): HEAD_JOBS short jobs that start one after
        another, then fillers jobs that wait behind a long one; made directly in tej's
        layout, then indexed. Returns the queue, the head's ids and the last filler's id."""
        queue = self.b.remote_path(name)
        with self.b.api(queue) as remote:
            remote.setup(runner="queue", options={"max_running": "1"})
        head = [f"head-{n}" for n in range(HEAD_JOBS)]
        fill = [f"fill-{n:06d}" for n in range(fillers + 1)]
        progress(f"{name}: making {fillers} queued jobs")
        now = time.time()
        for number, job_id in enumerate(head + fill):
            script = "sleep 0.3" if number < HEAD_JOBS else "sleep 1000"
            make_queued_job(queue / "jobs", job_id, script, now - 1000 + number, self.owner())
        self.reindex(queue)  # starts the head
        return queue, head, fill[-1]

    def row11(self) -> list[Row]:
        sizes = {"short": SHORT_QUEUE, "long": self.b.sizes.queued}
        queues = {key: self.queued_queue(f"q-{key}", count) for key, count in sizes.items()}
        try:
            gaps = {key: self.next_start_gaps(*queues[key][:2]) for key in queues}
            calls = {"status": 50, "submit": 20}
            times: dict[tuple[str, str], list[float]] = {}
            with self.b.api(queues["short"][0]) as short, self.b.api(queues["long"][0]) as long:
                remotes = {"short": short, "long": long}
                for op, count in calls.items():
                    for run in range(self.runs):
                        order = ["short", "long"] if run % 2 == 0 else ["long", "short"]
                        for key in order:
                            queue, _, last = queues[key]
                            elapsed = time_calls(remotes[key], op, count, last, self.b.tiny)
                            times.setdefault((op, key), []).append(elapsed / count)
        finally:
            for queue, _, _ in queues.values():
                kill_and_remove(queue)
        rows = []
        for op in ("submit", "status"):
            what = f"`{op}` with {sizes['long']} jobs queued vs {SHORT_QUEUE} (API session)"
            rows.append(
                ratio_row(f"11{'a' if op == 'submit' else 'b'}", what,
                          times[(op, "long")], times[(op, "short")], 1.2,
                          (f"{sizes['long']} queued", f"{SHORT_QUEUE} queued"))
            )  # fmt: skip
        what = f"next queued job's start after one ends, {sizes['long']} queued vs {SHORT_QUEUE}"
        rows.append(ratio_row("11c", what, gaps["long"], gaps["short"], 1.2, ("long", "short")))
        return rows

    def next_start_gaps(self, queue: Path, head: list[str]) -> list[float]:
        """The time from each head job's end to the next one's start (their own records)."""
        records = []
        for job_id in head:
            path = queue / "jobs" / job_id / "status.json"
            deadline = time.monotonic() + 120
            while True:
                record = json.loads(path.read_text())
                if record.get("state") in ("finished", "killed", "lost", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{job_id} did not end: {record}")
                time.sleep(0.05)
            records.append(record)
        return [
            parse_time(after["started_at"]) - parse_time(before["ended_at"])
            for before, after in zip(records, records[1:])
        ]

    def row12(self) -> list[Row]:
        count = self.b.sizes.list_many
        queue = self.b.remote_path("q-list-many")
        with self.b.api(queue) as remote:
            template_id = remote.submit(str(self.b.tiny), job_id="bench-00000")
            remote.wait(template_id, timeout=60)
        progress(f"row 12: making {count} jobs")
        clone_jobs(queue / "jobs", template_id, count - 1, self.owner())
        self.reindex(queue)
        peaks: list[float] = []

        def tej_run() -> float:
            with self.b.connection_scope() as control:
                argv = self.b.tej_argv("list", queue=queue)
                peak, elapsed = peak_rss(argv, self.b.tej_env(control))
            peaks.append(peak / 1024)
            return elapsed

        def base_run() -> float:
            return self.b.time_cmd(self.b.server.ssh_argv("ls", str(queue / "jobs")))

        try:
            tej_t, base_t = side_by_side(self.runs, tej_run, base_run, "row 12")
        finally:
            remove_tree(queue)
        row = ratio_row(
            "12", f"`tej list` of {count} jobs vs `ssh ls QUEUE/jobs`", tej_t, base_t, 3.0,
            ("tej list", "ssh ls"),
        )  # fmt: skip
        row.detail += f"; peak client RSS {max(peaks):.1f} MB (target < 100 MB)"
        if max(peaks) >= 100:
            row.met = verdict(False)
        return [row]

    def row13(self) -> list[Row]:
        count = self.b.sizes.prune
        queue = self.b.remote_path("q-prune")
        with self.b.api(queue) as remote:
            template_id = remote.submit(str(self.b.tiny), job_id="bench-00000")
            remote.wait(template_id, timeout=60)
        progress(f"row 13: making {count} jobs")
        clone_jobs(queue / "jobs", template_id, count - 1, self.owner())
        self.reindex(queue)
        try:
            with self.b.connection_scope() as control:
                elapsed = self.b.time_tej("prune", queue=queue, control=control)
            left = len(os.listdir(queue / "jobs"))
        finally:
            remove_tree(queue)
        if left:
            raise BenchError(f"tej prune left {left} jobs")
        rate = count / elapsed
        return [
            Row(
                "13",
                f"`tej prune` of {count} finished jobs (cold command)",
                tej=f"{rate:.0f} jobs/s",
                baseline="-",
                target=">= 1000 jobs/s",
                met=verdict(rate >= 1000),
                detail=f"{fmt_time(elapsed)} for {count} jobs",
            )
        ]

    def row10(self, tej06: Tej06 | None, reason: str) -> list[Row]:
        keys = [
            ("10a", "tej 0.6: cold `status`, tej vs 0.6"),
            ("10b", "tej 0.6: submit a tiny job, tej vs 0.6"),
            ("10c", "tej 0.6: submit row 4's directory, tej vs 0.6"),
        ]
        if tej06 is None:
            return [Row(k, w, met="skipped", detail=reason) for k, w in keys]
        rows = []
        # a: status of a finished job.
        queue06 = self.b.remote_path("q06")
        tej06.submit(queue06, self.b.tiny, job_id=STATUS_JOB)
        tej06.wait_finished(queue06, STATUS_JOB)
        self.status_queue()
        tej_t, old_t = side_by_side(
            self.runs, self.cold_status, lambda: tej06.status(queue06, STATUS_JOB), "row 10a"
        )
        rows.append(self.versus06(keys[0], tej_t, old_t))
        # b: a tiny submit into an existing queue.
        self.tiny_queue()
        tej_t, old_t = side_by_side(
            self.runs, self.cold_tiny_submit, lambda: tej06.submit(queue06, self.b.tiny), "row 10b"
        )
        rows.append(self.versus06(keys[1], tej_t, old_t))

        # c: the big directory, each into a new queue.
        directory = self.b.big_dir()

        def tej_run() -> float:
            queue = self.fresh_queue_with_job("q-big")
            try:
                with self.b.connection_scope() as control:
                    return self.b.time_tej("submit", str(directory), queue=queue, control=control)
            finally:
                remove_tree(queue)

        def old_run() -> float:
            queue = self.b.remote_path("q06-big")
            try:
                tej06.submit(queue, self.b.tiny)
                return tej06.submit(queue, directory, timeout=TEJ06_BIG_TIMEOUT)
            finally:
                remove_tree(queue)

        try:
            tej_t, old_t = side_by_side(1, tej_run, old_run, "row 10c")
            rows.append(self.versus06(keys[2], tej_t, old_t))
        except BenchError as exc:
            rows.append(Row(*keys[2], met="error", detail=str(exc)))
        return rows

    @staticmethod
    def versus06(key: tuple[str, str], tej_t: list[float], old_t: list[float]) -> Row:
        row = ratio_row(key[0], key[1], tej_t, old_t, None, ("tej", "tej 0.6"))
        row.baseline += " (0.6)"
        ratio = median(tej_t) / median(old_t)
        row.target = "< 1 (tej ahead)"
        row.met = verdict(ratio < 1)
        return row

    # -- tej sync against rsync (rows S1, S2, S3) ----------------------------------------

    def sync_sources(self) -> tuple[Path, Path]:
        """A finished job whose folder holds row 4's small files and a row-6-sized big file
        (tej's source), and a copy of that folder (rsync's: each tool changes its own)."""
        queue = self.b.remote_path("q-sync")
        with self.b.api(queue) as remote:
            remote.submit(str(self.b.tiny), job_id=SYNC_JOB)
            remote.wait(SYNC_JOB, timeout=60)
        work = queue / "jobs" / SYNC_JOB / "work"
        owner = self.owner()
        progress(f"rows S: writing {self.b.sizes.small_files} files into {work}")
        for index in range(self.b.sizes.small_files):
            folder = work / f"d{index // 100:03d}"
            if index % 100 == 0:
                folder.mkdir()
                self.b.chown(folder)
            path = folder / f"f{index:05d}.txt"
            path.write_bytes(small_content(self.b.sizes.small_size))
            self.b.chown(path)
        write_random(work / "big.bin", self.b.sizes.download, owner)
        copy = self.b.remote_path("rsync-src")
        subprocess.run(["cp", "-a", str(work), str(copy)], check=True, timeout=600)
        return queue, copy

    def rsync(self, source: Path, dest: Path) -> float:
        """`rsync -a -e 'ssh -F CFG' ALIAS:SOURCE/ DEST/`."""
        ssh = shlex.join(self.b.server.ssh_argv()[:-1])
        remote = f"{self.b.server.alias}:{source}/"
        return self.b.time_cmd(["rsync", "-a", "-e", ssh, remote, f"{dest}/"])

    def sync(self, queue: Path, dest: Path) -> float:
        """A cold `tej sync ALIAS --id SYNC_JOB --to DEST`."""
        with self.b.connection_scope() as control:
            return self.b.time_tej(
                "sync", "--id", SYNC_JOB, "--to", str(dest), queue=queue, control=control
            )

    def rows_sync(self) -> list[Row]:
        ensure_rsync()
        queue, copy = self.sync_sources()
        work = queue / "jobs" / SYNC_JOB / "work"
        tej_dest, rsync_dest = self.b.work / "sync-tej", self.b.work / "sync-rsync"

        def first(run: Callable[[], float], dest: Path) -> Callable[[], float]:
            def timed() -> float:
                remove_tree(dest)
                return run()

            return timed

        try:
            tej_t, base_t = side_by_side(
                self.mid_runs,
                first(lambda: self.sync(queue, tej_dest), tej_dest),
                first(lambda: self.rsync(copy, rsync_dest), rsync_dest),
                "row S1",
            )
            changes = iter(range(10**6))

            def again(run: Callable[[], float], source: Path) -> Callable[[], float]:
                def timed() -> float:
                    name = f"d000/f{next(changes) % 100:05d}.txt"
                    (source / name).write_bytes(small_content(self.b.sizes.small_size))
                    return run()

                return timed

            tej_a, base_a = side_by_side(
                self.runs,
                again(lambda: self.sync(queue, tej_dest), work),
                again(lambda: self.rsync(copy, rsync_dest), copy),
                "row S2",
            )
            if tree_digest(tej_dest) != tree_digest(rsync_dest):
                raise BenchError("tej sync and rsync ended with different folders")
            try:
                idle = self.follow_idle(queue, work)
            except BenchError as exc:  # S1 and S2 stand without it
                idle = Row("S3", "row S3", met="error", detail=str(exc))
        finally:
            remove_tree(queue)
            remove_tree(copy)
        what = (
            f"first `tej sync` of {self.b.sizes.small_files} small files + "
            f"{fmt_size(self.b.sizes.download)} vs `rsync -a` over ssh"
        )
        row1 = ratio_row("S1", what, tej_t, base_t, 1.1, ("tej sync", "rsync"))
        what2 = "re-sync, one small file changed, vs `rsync -a` doing the same"
        row2 = ratio_row("S2", what2, tej_a, base_a, 1.0, ("tej sync", "rsync"))
        return [row1, row2, idle]

    def follow_idle(self, queue: Path, work: Path) -> Row:
        """Row S3: the requests and time of `sync --follow`'s passes where nothing changed."""
        job = self.b.make_tiny_job(self.b.work / "sleeper")
        # It runs until told to stop (or 10 minutes): after the first pass, however long
        # that pass took on a busy machine, and a few idle ones.
        (job / "start.sh").write_text(
            "#!/bin/sh\nfor _ in $(seq 6000); do [ -e stop ] && exit 0; sleep 0.1; done\n"
        )
        dest = self.b.work / "sync-follow"
        from tej import sync

        naps: list[float] = []

        def nap(seconds: float) -> None:
            naps.append(seconds)
            time.sleep(seconds)

        with self.b.api(queue) as remote:
            job_id = remote.submit(str(job))
            while remote.status(job_id).state.value == "starting":  # its script is read
                time.sleep(0.05)
            running = queue / "jobs" / job_id / "work"
            subprocess.run(["cp", "-a", f"{work}/.", str(running)], check=True, timeout=600)
            syncer = sync.Syncer(remote.session, str(queue), job_id, str(dest))
            summaries = []
            for summary in sync.follow(syncer, 0.5, sleep=nap):
                summaries.append(summary)
                if len(summaries) == IDLE_PASSES + 1:
                    (running / "stop").touch()
        # A pass shorter than the interval is followed by a nap of the rest of the interval.
        passes = [(0.5 - slept, summary) for summary, slept in zip(summaries, naps)]
        passes.append((0.0, summaries[-1]))
        remove_tree(dest)
        idle = [(t, s) for t, s in passes[1:-1] if not s.files_sent]
        if not idle:
            raise BenchError(f"sync --follow made no idle pass: {passes}")  # job too short?
        requests = sorted({s.requests for _, s in idle})
        return Row(
            "S3",
            f"`tej sync --follow`: an idle pass over {self.b.sizes.small_files + 1} files",
            tej=f"{'/'.join(map(str, requests))} request(s), "
            f"{fmt_time(median([t for t, _ in idle]))} each",
            target="1 round trip",
            met=verdict(requests == [1]),
            detail=f"{len(idle)} idle passes of {len(passes)}",
        )


def ensure_rsync() -> None:
    """Install rsync if it is missing (as root, with apt-get), for the sync rows' baseline."""
    if shutil.which("rsync"):
        return
    if sshd.is_root() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "rsync"], capture_output=True)
    if not shutil.which("rsync"):
        raise BenchError("rsync is missing (the baseline of rows S1 and S2): install it")


def tree_digest(root: Path) -> dict[str, int]:
    """The size of every file under root (but .tej-sync), to compare two mirrors."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file() and ".tej-sync" not in path.parts
    }


def make_queued_job(
    jobs: Path, job_id: str, script: str, queued_at: float, owner: tuple[int, int] | None
) -> None:
    """A queued job of the queue runner, as tej lays it out (docs/queue-format.md)."""
    target = jobs / job_id
    work = target / "work"
    work.mkdir(mode=0o700, parents=True)
    job = {"args": [], "env": {}, "id": job_id, "kill_grace": 5.0, "script": "start.sh",
           "secret_env": [], "stderr": "tej", "stdout": "tej"}  # fmt: skip
    submitted = datetime.datetime.fromtimestamp(queued_at, datetime.timezone.utc)
    record = {"id": job_id, "state": "queued", "after": [], "priority": 0,
              "queued_at": queued_at,
              "submitted_at": submitted.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}  # fmt: skip
    (target / "job.json").write_text(json.dumps(job))
    (target / "status.json").write_text(json.dumps(record))
    (work / "start.sh").write_text(f"#!/bin/sh\n{script}\n")
    (work / "start.sh").chmod(0o755)
    if owner is not None:
        for path in (target, work, target / "job.json", target / "status.json", work / "start.sh"):
            os.chown(path, *owner)


def parse_time(text: str) -> float:
    """A time of a status record (ISO 8601, UTC) as POSIX time."""
    when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


def time_calls(remote: Any, op: str, count: int, last: str, tiny: Path) -> float:
    """count status calls (of the queue's last job) or tiny submits; their total time."""
    start = time.perf_counter()
    for _ in range(count):
        if op == "status":
            remote.status(last)
        else:
            remote.submit(str(tiny))
    return time.perf_counter() - start


def kill_and_remove(queue: Path) -> None:
    """Kill what runs in a queue of the benchmark (jobs and supervisors), then remove it."""
    root = str(queue)
    for _ in range(5):
        found = False
        for path in Path("/proc").glob("[0-9]*"):
            try:
                places = [os.readlink(path / "cwd"), os.readlink(path / "fd" / "2")]
            except OSError:
                continue
            if any(place.startswith(root + "/") for place in places):
                with contextlib.suppress(OSError):
                    os.kill(int(path.name), 9)
                    found = True
        if not found:
            break
        time.sleep(0.2)
    remove_tree(queue)


def clone_jobs(jobs: Path, template_id: str, count: int, owner: tuple[int, int] | None) -> None:
    """Make count copies of a finished job, with new ids, as tej lays them out."""
    template = jobs / template_id
    files: dict[str, tuple[bytes, int]] = {}
    for path in template.rglob("*"):
        if path.is_file():
            files[str(path.relative_to(template))] = (path.read_bytes(), path.stat().st_mode)
    folders = sorted(str(p.relative_to(template)) for p in template.rglob("*") if p.is_dir())
    for index in range(1, count + 1):
        job_id = f"bench-{index:05d}"
        target = jobs / job_id
        target.mkdir(mode=0o700)
        made = [target]
        for folder in folders:
            (target / folder).mkdir(mode=0o700)
            made.append(target / folder)
        for name, (data, mode) in files.items():
            if name in ("job.json", "status.json"):
                record = json.loads(data)
                record["id"] = job_id
                data = json.dumps(record, indent=1, sort_keys=True).encode()
            path = target / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o777)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            made.append(path)
        if owner is not None:
            for path in made:
                os.chown(path, *owner)


def peak_rss(argv: Sequence[str], env: dict[str, str]) -> tuple[int, float]:
    """Run argv; return its peak resident memory (KiB, from wait4) and its wall time."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        process.returncode = code
        if code != 0:
            errors.seek(0)
            raise BenchError(f"exit {code}: {shlex.join(argv)}: {errors.read()[-800:]!r}")
    return usage.ru_maxrss, elapsed


# -- the original tej 0.6 ------------------------------------------------------------------


class Tej06:
    """The original tej 0.6 (paramiko), in a throwaway venv, logging in with the test key."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.venv = bench.work / "tej06-venv"
        self.home = bench.work / "tej06-home"
        self.program = self.venv / "bin" / "tej"

    def install(self) -> None:
        """Make the venv and install tej 0.6; BenchError with the reason if it can't."""
        progress(f"row 10: installing {TEJ06_SPEC} into {self.venv}")
        for argv in (
            [sys.executable, "-m", "venv", str(self.venv)],
            # tej 0.6 imports pkg_resources, gone from setuptools 81 and from new venvs.
            [
                str(self.venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                TEJ06_SPEC,
                "setuptools<81",
            ],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-600:]}")
        # paramiko finds the key in ~/.ssh and checks the host in ~/.ssh/known_hosts.
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        shutil.copy(self.b.server.identity_file, ssh_dir / "id_ed25519")
        (ssh_dir / "id_ed25519").chmod(0o600)
        scan = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(self.b.server.port), self.b.server.host],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if scan.returncode != 0 or not scan.stdout.strip():
            raise BenchError(f"ssh-keyscan failed: {scan.stderr.strip()}")
        (ssh_dir / "known_hosts").write_text(scan.stdout)
        self.status_text(self.b.remote_path("q06-probe"), "probe")  # can it log in?

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}

    def argv(self, command: str, queue: Path, *args: str) -> list[str]:
        return [str(self.program), command, self.b.server.url, "--queue", str(queue), *args]

    def submit(
        self, queue: Path, directory: Path, job_id: str | None = None, timeout: float = 600
    ) -> float:
        args = ["--id", job_id] if job_id else []
        argv = self.argv("submit", queue, *args, str(directory))
        return self.b.time_cmd(argv, env=self.env(), timeout=timeout)

    def status(self, queue: Path, job_id: str) -> float:
        return self.b.time_cmd(self.argv("status", queue, "--id", job_id), env=self.env())

    def status_text(self, queue: Path, job_id: str) -> str:
        done = subprocess.run(
            self.argv("status", queue, "--id", job_id),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0 and "doesn't exist" not in done.stderr:
            raise BenchError(f"tej 0.6 status failed ({done.returncode}): {done.stderr[-600:]}")
        return done.stdout.strip()

    def wait_finished(self, queue: Path, job_id: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.status_text(queue, job_id).startswith("finished"):
                return
            time.sleep(0.2)
        raise BenchError(f"tej 0.6 job {job_id} did not finish")


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1-2 runs (< 60 s)")
    parser.add_argument("--runs", type=int, help="runs of the light rows [7; smoke: 2]")
    parser.add_argument(
        "--output",
        help="where to write the results [bench/RESULTS.md; with --rows: nowhere]",
    )
    parser.add_argument(
        "--rows",
        help="measure only these rows, e.g. 1,2,7 (printed, written only with --output)",
    )
    parser.add_argument("--no-tej06", action="store_true", help="skip row 10 (tej 0.6)")
    parser.add_argument("--tej06", action="store_true", help="run row 10 in smoke mode too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    runs = max(1, args.runs or (2 if args.smoke else 7))
    heavy = 1 if args.smoke else min(runs, 3)
    mid = 1 if args.smoke else min(runs, 7)
    reason = sshd.sshd_available()
    if reason is not None:
        print(f"error: cannot start a loopback sshd: {reason}", file=sys.stderr)
        return 2
    import tej

    if Path(tej.__file__).resolve().parent.parent != ROOT:
        print(f"error: tej is imported from {tej.__file__}, not from {ROOT}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="tej-bench-"))
    progress(f"data in {work}; starting sshd")
    server = sshd.start_sshd()
    bench: Bench | None = None
    rows: list[Row] = []
    info: list[tuple[str, str]] = []
    crashed = False
    try:
        bench = Bench(server, work, sizes, args.smoke)
        info = machine_info(bench)
        measure = Rows(bench, runs, heavy, mid)
        steps: list[tuple[list[str], Callable[[], list[Row]]]] = [
            (["1"], measure.row1),
            (["2"], measure.row2),
            (["3"], measure.row3),
            (["4", "5"], measure.rows4_5),
            (["6"], measure.row6),
            (["7"], measure.row7),
            (["8"], measure.row8),
            (["9"], measure.row9),
            (["S1", "S2", "S3"], measure.rows_sync),
            (["R1"], measure.row_resubmit),
            (["A1", "A2", "A3", "A4"], measure.rows_arrays),
            (["11"], measure.row11),
            (["12"], measure.row12),
            (["13"], measure.row13),
        ]
        wanted = set(args.rows.split(",")) if args.rows else None
        for keys, step in steps:
            if wanted is not None and not wanted.intersection(keys):
                continue
            try:
                rows += step()
            except Exception as exc:  # noqa: BLE001 - reported in the table, then exit 1
                crashed = True
                traceback.print_exc()
                rows += [Row(k, f"row {k}", met="error", detail=f"{exc}") for k in keys]
        tej06, why = None, "smoke mode: tej 0.6 is not installed"
        if wanted is not None and "10" not in wanted:
            why = "not asked for (--rows)"
        elif args.no_tej06:
            why = "--no-tej06"
        elif args.tej06 or not args.smoke:
            try:
                tej06 = Tej06(bench)
                tej06.install()
                why = ""
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                tej06, why = None, f"tej 0.6 could not run here: {exc}"
                progress(why)
        try:
            if wanted is None or "10" in wanted:
                rows += measure.row10(tej06, why)
        except Exception as exc:  # noqa: BLE001
            crashed = True
            traceback.print_exc()
            rows += [Row("10", "tej 0.6", met="error", detail=str(exc))]
    finally:
        progress("stopping sshd, removing data")
        close_masters(work)
        server.stop()
        if bench is not None:
            remove_tree(bench.remote)
            for folder in bench.fresh_dirs:
                remove_tree(folder)
        remove_tree(work)
    finished = datetime.datetime.now(datetime.timezone.utc)
    report = render(rows, info, args, runs, heavy, mid, sizes, started, finished)
    print(table(rows))
    if args.rows and not args.output:
        return 1 if crashed else 0
    output = Path(args.output or ROOT / "bench" / "RESULTS.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(f"\nwritten to {output}", file=sys.stderr)
    return 1 if crashed else 0


def render(
    rows: Sequence[Row],
    info: Sequence[tuple[str, str]],
    args: argparse.Namespace,
    runs: int,
    heavy: int,
    mid: int,
    sizes: Sizes,
    started: datetime.datetime,
    finished: datetime.datetime,
) -> str:
    """The RESULTS.md document."""
    minutes = (finished - started).total_seconds() / 60
    command = "python3 bench/run.py" + (" --smoke" if args.smoke else "")
    if args.runs:
        command += f" --runs {args.runs}"
    if args.rows:
        command += f" --rows {args.rows}"
    lines = [
        "# tej benchmark results" + (" (smoke: tiny sizes, not meaningful)" if args.smoke else ""),
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC ({minutes:.1f} min) with `{command}`. "
        "Loopback sshd started by the script (server defaults: compression allowed). "
        "tej and its baseline alternate run by run, each after a `sync`; each cell is the "
        "median. "
        f"Runs: {runs} for rows 1, 2, 3, 8, 10a, 10b, 12; {mid} for rows 4, 5, 6; {heavy} for "
        "row 7; 1 for rows 9, 10c and 13. What each row measures: [README.md](README.md).",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in info]
    lines += [
        f"- sizes: {sizes.small_files} files of {fmt_size(sizes.small_size)} + "
        f"{fmt_size(sizes.big_file)} (row 4), {fmt_size(sizes.download)} (row 6), "
        f"{sizes.submits} submits (row 7), {sizes.list_jobs} jobs (row 8), "
        f"{fmt_size(sizes.rss_download)} (row 9), {sizes.queued} vs {SHORT_QUEUE} queued "
        f"(row 11), {sizes.list_many} jobs (row 12), {sizes.prune} jobs (row 13)",
        "",
        "## Results",
        "",
        table(rows),
        "",
        "## Samples and notes",
        "",
    ]
    lines += [f"- row {r.key}: {r.detail}" for r in rows if r.detail]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
