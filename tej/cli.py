"""The ``tej`` command line: parses, calls the API, prints. Nothing else."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tej import __version__, protocol
from tej.api import DEFAULT_QUEUE, JobState, JobStatus, RemoteQueue
from tej.errors import InvalidInput, JobNotFound, TejError

if TYPE_CHECKING:
    from datetime import datetime

EXIT_INTERRUPTED = 130
EXIT_JOB_LOST = 7
EXIT_JOB_TIMED_OUT = 124
F = TypeVar("F", bound="Callable[..., Any]")
T = TypeVar("T")


def format_elapsed(seconds: float | None) -> str:
    """Elapsed time as H:MM:SS."""
    total = int(seconds or 0)
    text = _ELAPSED.get(total)
    if text is None:  # `tej list` of many jobs formats the same few values again and again
        text = _ELAPSED[total] = f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"
    return text


_ELAPSED: dict[int, str] = {}


def describe_status(status: JobStatus) -> str:
    """The one-line text of `tej status`."""
    elapsed = format_elapsed(status.elapsed)
    if status.state is JobState.RUNNING:
        return f"Job is still running ({elapsed})"
    if status.state is JobState.STARTING:
        return "Job is starting"
    if status.state is JobState.QUEUED:
        if status.position:
            return f"Job is queued (position {status.position[0]} of {status.position[1]})"
        return f"Job is queued ({status.reason})" if status.reason else "Job is queued"
    if status.state is JobState.CANCELLED:
        return f"Job was cancelled ({status.reason or 'unknown reason'})"
    if status.state is JobState.FINISHED:
        text = f"Job is finished ({elapsed}) with exit code {status.exit_code}"
        return f"{text} ({status.reason})" if status.reason else text  # such as a failed start
    if status.state is JobState.SCHEDULED:
        return f"Job is scheduled to start at {format_local(status.scheduled_for)}"
    if status.state is JobState.TIMED_OUT:
        return f"Job timed out after {elapsed}"
    if status.state is JobState.KILLED and status.started_at is None:
        return "Job was cancelled before it started"
    if status.state is JobState.KILLED:
        return f"Job was killed ({elapsed})"
    return f"Job was lost ({status.reason or 'unknown reason'})"


def format_local(when: datetime | None) -> str:
    """A time in the local time zone, as YYYY-MM-DD HH:MM:SS TZ."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if when else "an unknown time"


def job_exit_code(status: JobStatus, use_job_code: bool) -> int:
    """The exit code of `tej wait`: see the README's table."""
    if status.state is JobState.LOST:
        return EXIT_JOB_LOST
    if not use_job_code:
        return 0
    if status.state is JobState.TIMED_OUT:
        return EXIT_JOB_TIMED_OUT
    if status.state is JobState.KILLED and (status.exit_code or 0) < 128:
        return 128 + signal.SIGTERM  # killed, even if its script caught SIGTERM and exited 0
    return status.exit_code if status.exit_code is not None else 128 + signal.SIGTERM


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    import json

    click.echo(json.dumps(document, indent=2, sort_keys=True))


def report_error(exc: TejError, as_json: bool) -> None:
    """Print an anticipated error: one line on stderr, or a JSON document."""
    if as_json:
        emit_json({"error": type(exc).__name__, "message": str(exc)})
    else:
        click.echo(f"{exc.prefix}{exc}", err=True)


COMMON_OPTIONS = [
    click.argument("destination"),
    click.option(
        "--queue",
        default=DEFAULT_QUEUE,
        envvar="TEJ_QUEUE",
        show_default=True,
        help="Queue directory on the server (or a link to one).",
    ),
    click.option(
        "--ssh-config",
        envvar="TEJ_SSH_CONFIG",
        type=click.Path(dir_okay=False),
        help="ssh configuration file (passed as ssh -F).",
    ),
    click.option(
        "--python",
        envvar="TEJ_PYTHON",
        help="Python interpreter on the server [default: python3].",
    ),
    click.option(
        "--connect-timeout",
        envvar="TEJ_CONNECT_TIMEOUT",
        type=click.IntRange(1, 3600),
        default=protocol.DEFAULT_CONNECT_TIMEOUT,
        show_default=True,
        help="Seconds to wait for the server before giving up.",
    ),
    click.option(
        "--no-reuse",
        is_flag=True,
        envvar="TEJ_NO_REUSE",
        help="Don't share one ssh connection between commands.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
]


def queue_command(name: str | None = None) -> Callable[[F], click.Command]:
    """Declare a command that works on a queue: `tej NAME DESTINATION [options]`.

    The command's function receives an open RemoteQueue as `remote`. This is
    the one place where errors become messages and exit codes.
    """

    def decorate(function: F) -> click.Command:
        @functools.wraps(function)
        def run(
            destination: str,
            queue: str,
            ssh_config: str | None,
            python: str | None,
            connect_timeout: int,
            no_reuse: bool,
            as_json: bool,
            **kwargs: Any,
        ) -> None:
            remote: RemoteQueue | None = None
            try:
                remote = RemoteQueue(
                    destination,
                    queue,
                    python=python,
                    ssh_config=ssh_config,
                    connect_timeout=connect_timeout,
                    reuse_connection=not no_reuse,
                )
                try:  # connects on first use, so bad input costs no connection
                    function(remote=remote, as_json=as_json, **kwargs)
                finally:
                    remote.close(wait=False)  # the command ends next
            except TejError as exc:
                report_error(exc, as_json)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt:
                if remote is not None:
                    remote.abort()
                click.echo("Error: interrupted", err=True)
                sys.exit(EXIT_INTERRUPTED)

        for option in reversed(COMMON_OPTIONS):
            run = option(run)
        return cli.command(name)(run)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tej")
def cli() -> None:
    """Submit a job directory to a server over SSH, and come back for the results.

    DESTINATION is `local`, `[user@]host`, an alias from your ssh config,
    or `ssh://[user@]host[:port]`.
    """


@queue_command()
@click.option("--make-link", "links", multiple=True, help="Make a link at PATH to the queue.")
@click.option("--make-default-link", is_flag=True, help=f"Make a link at {DEFAULT_QUEUE}.")
@click.option("--force", is_flag=True, help="Reconfigure an existing queue; replace links.")
@click.option("--only-links", is_flag=True, help="Only make the links.")
@click.option(
    "--plugin",
    default="default",
    show_default=True,
    help="Runner of the queue: default (at once), queue (limits, order), slurm, or a plugin's.",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A setting of the runner, such as max_running=4 (repeatable).",
)
def setup(
    remote: RemoteQueue,
    as_json: bool,
    links: tuple[str, ...],
    make_default_link: bool,
    force: bool,
    only_links: bool,
    plugin: str,
    options: tuple[str, ...],
) -> None:
    """Create the queue on the server (else it is made on first use)."""
    result = remote.setup(
        links=links,
        default_link=make_default_link,
        force=force,
        only_links=only_links,
        runner=plugin,
        options=parse_pairs(options, "--option", "KEY=VALUE"),
    )
    if as_json:
        import dataclasses

        emit_json(dataclasses.asdict(result))
        return
    if not only_links:
        verb = "Created" if result.created else "Reconfigured"
        click.echo(f"{verb} queue {result.queue} (plugin: {result.runner})")
    for link in result.links:
        click.echo(f"Made link {link} -> {result.queue}")
    if "sbatch" in result.batch_systems and result.runner == "default" and not only_links:
        click.echo(
            "Note: this server has Slurm (sbatch). To run jobs through it: "
            f"tej setup {remote.destination} --force --plugin slurm",
            err=True,
        )


@queue_command()
@click.option("--id", "job_id", help="Identifier of the job [default: <dirname>_<user>_<random>].")
@click.option("--script", help="Script to run, relative to DIRECTORY [default: start.sh].")
@click.option("--max-runtime", help="Time limit (90, 90s, 15m, 2h, 1d); then it is killed.")
@click.option("--start-at", help="Start at this ISO 8601 time (naive: the server's time).")
@click.option("--delay", help="Start after this duration (90s, 15m, 2h).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="Add to the environment.")
@click.option(
    "--env-secret",
    "secrets",
    multiple=True,
    metavar="NAME",
    help="Pass $NAME (or a prompted value) to the job, never written on the server.",
)
@click.option("--stdout", help="Where stdout goes: tej (kept), discard, or a path in the job.")
@click.option("--stderr", help="Where stderr goes: tej, discard, stdout, or a path in the job.")
@click.option("--webhook", multiple=True, metavar="URL", help="POST the status here at the end.")
@click.option("--email", multiple=True, metavar="ADDRESS", help="Email a summary at the end.")
@click.option("--priority", type=int, help="Queue runner: higher starts first [default: 0].")
@click.option(
    "--after", multiple=True, metavar="ID", help="Queue runner: start once job ID has succeeded."
)
@click.option("--wait", "then_wait", is_flag=True, help="Wait for the job to end (see tej wait).")
@click.option("--exit-code", is_flag=True, help="With --wait: exit with the job's exit code.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.argument("directory")
def submit(
    remote: RemoteQueue,
    as_json: bool,
    job_id: str | None,
    directory: str,
    env: tuple[str, ...],
    secrets: tuple[str, ...],
    webhook: tuple[str, ...],
    email: tuple[str, ...],
    priority: int | None,
    after: tuple[str, ...],
    then_wait: bool,
    exit_code: bool,
    quiet: bool,
    **metadata: str | None,
) -> None:
    """Upload DIRECTORY and start its script (tej.json in it adds metadata).

    The queue's runner decides when: at once (default), in turn (queue), or
    through a batch system (slurm).
    """
    overrides: dict[str, Any] = dict(
        metadata,
        env=parse_env(env) if env else None,
        priority=priority,
        after=list(after) or None,
    )
    if webhook or email:
        overrides["notify"] = {
            **({"webhook": list(webhook)} if webhook else {}),
            **({"email": list(email)} if email else {}),
        }
    secret_values = {name: read_secret(name) for name in secrets}
    with ProgressBar("Uploading", quiet) as progress:
        new_id = remote.submit(
            directory, job_id=job_id, secrets=secret_values, progress=progress, **overrides
        )
    if not as_json:
        click.echo("Job submitted as:")
        click.echo(new_id)
    if not then_wait:
        if as_json:
            emit_json({"id": new_id})
        return
    status = wait_for_job(remote, new_id, None, show_progress=not as_json)
    if as_json:
        emit_json({"id": new_id, "status": status.to_json()})
    else:
        click.echo(describe_status(status))
    sys.exit(job_exit_code(status, exit_code))


def read_secret(name: str) -> str:
    """A secret's value: from this environment, else typed at a prompt (never echoed)."""
    if name in os.environ:
        return os.environ[name]
    if not sys.stdin.isatty():
        raise InvalidInput(f"--env-secret {name}: ${name} is not set and there is no terminal")
    return str(click.prompt(f"Value of {name}", hide_input=True, err=True))


class ProgressBar:
    """A transfer's progress bar on stderr: only on a terminal, only after a second."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self.started = time.monotonic()
        self.done = 0
        self.bar: Any = None

    def __call__(self, advance: int, total: int) -> None:
        self.done += advance
        if not self.enabled:
            return
        if self.bar is None and time.monotonic() - self.started >= 1.0:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
            self.bar.update(self.done)
        elif self.bar is not None:
            self.bar.update(advance)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    """NAME=VALUE pairs from --env."""
    return parse_pairs(pairs, "--env", "NAME=VALUE")


def parse_pairs(pairs: tuple[str, ...], option: str, form: str) -> dict[str, str]:
    """KEY=VALUE pairs from a repeatable option."""
    found = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise InvalidInput(f"Invalid {option} {pair!r}: use {form}")
        found[name] = value
    return found


def wait_for_job(
    remote: RemoteQueue, job_id: str, timeout: float | None, show_progress: bool
) -> JobStatus:
    """Wait for a job, showing its state and elapsed time on a terminal."""
    on_terminal = show_progress and sys.stderr.isatty()

    def progress(status: JobStatus) -> None:
        click.echo(f"\r\033[K{describe_status(status)}", err=True, nl=False)

    try:
        return remote.wait(
            job_id,
            timeout,
            on_progress=progress if on_terminal else None,
            interval=1.0 if on_terminal else 30.0,
        )
    finally:
        if on_terminal:
            click.echo("\r\033[K", err=True, nl=False)


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--timeout", help="Give up after this duration (90, 15m, 2h): exit code 6.")
@click.option("--exit-code", is_flag=True, help="Exit with the job's own exit code.")
def wait(
    remote: RemoteQueue, as_json: bool, job_id: str, timeout: str | None, exit_code: bool
) -> None:
    """Wait until a job ends, then show how it ended."""
    from tej import jobspec

    seconds = jobspec.duration(timeout, "--timeout", allow_zero=True) if timeout else None
    status = wait_for_job(remote, job_id, seconds, show_progress=not as_json)
    if as_json:
        emit_json(status.to_json())
    else:
        click.echo(describe_status(status))
    sys.exit(job_exit_code(status, exit_code))


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--stderr", "use_stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
@click.option("--tail", type=click.IntRange(0), help="Start with the last N lines.")
def logs(
    remote: RemoteQueue,
    as_json: bool,
    job_id: str,
    use_stderr: bool,
    follow: bool,
    tail: int | None,
) -> None:
    """Print a job's output."""
    stream = "stderr" if use_stderr else "stdout"
    chunks = remote.logs(job_id, stream, follow=follow, tail=tail)
    if as_json:
        text = b"".join(chunks).decode("utf-8", "replace")
        emit_json({"id": job_id, "stream": stream, "output": text})
        return
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
def status(remote: RemoteQueue, as_json: bool, job_id: str) -> None:
    """Show the state of a job."""
    try:
        result = remote.status(job_id)
    except JobNotFound:
        raise JobNotFound("No job with that identifier") from None
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(describe_status(result))


STATE_NAMES = [state.value for state in JobState]


@queue_command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATE_NAMES),
    help="Only the jobs in this state (repeatable).",
)
def list_jobs(remote: RemoteQueue, as_json: bool, states: tuple[str, ...]) -> None:
    """List the jobs in the queue, oldest first (printed as they arrive)."""
    if as_json:
        emit_json_list(job.to_json() for job in remote.iter_list(list(states) or None))
        return
    form = ""
    out = sys.stdout
    for batch in batched(remote.iter_rows(list(states) or None), 1000):
        rows = [
            (job["id"], job["state"], format_elapsed(job["elapsed"]), exit_text(job["exit_code"]))
            for job in batch
        ]
        if not form:  # the columns' widths: the header's and the first batch's
            rows.insert(0, ("ID", "STATE", "ELAPSED", "EXIT"))
            widths = [max(len(row[column]) for row in rows) for column in range(3)]
            form = "%%-%ds  %%-%ds  %%-%ds  %%s" % tuple(widths)
        out.write("".join((form % row).rstrip() + "\n" for row in rows))
    if not form:
        out.write("ID  STATE  ELAPSED  EXIT\n")
    out.flush()


def exit_text(code: int | None) -> str:
    """The EXIT column of a job."""
    return "" if code is None else str(code)


def batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Lists of up to size items, in order."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def emit_json_list(items: Iterator[Any]) -> None:
    """Print a JSON list as emit_json would, an item at a time (a long list never in memory)."""
    import json

    first = True
    for item in items:
        text = json.dumps(item, indent=2, sort_keys=True).replace("\n", "\n  ")
        click.echo(("[\n  " if first else ",\n  ") + text, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
def kill(remote: RemoteQueue, as_json: bool, job_id: str) -> None:
    """Kill a job and every process it started."""
    result = remote.kill(job_id)
    if as_json:
        emit_json({"killed": result.killed, "status": result.status.to_json()})
    elif result.killed:
        click.echo(f"Job {job_id!r} killed")
    elif result.status.state is JobState.LOST:
        click.echo(f"Job {job_id!r} is lost ({result.status.reason}): no process of it to kill")
    else:
        click.echo(f"Job {job_id!r} has already completed")


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--force", is_flag=True, help="Kill the job first if it is still running.")
def delete(remote: RemoteQueue, as_json: bool, job_id: str, force: bool) -> None:
    """Delete a job and its files from the server."""
    remote.delete(job_id, force=force)
    if as_json:
        emit_json({"id": job_id, "deleted": True})
    else:
        click.echo(f"Deleted job {job_id!r}")


@queue_command()
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([state for state in STATE_NAMES if state in protocol.END_STATES]),
    help="Only the jobs that ended this way (repeatable) [default: every ended job].",
)
@click.option("--older-than", help="Only the jobs that ended longer ago than this (7d, 12h).")
@click.option("--dry-run", is_flag=True, help="Only list the jobs that would be deleted.")
def prune(
    remote: RemoteQueue,
    as_json: bool,
    states: tuple[str, ...],
    older_than: str | None,
    dry_run: bool,
) -> None:
    """Delete ended jobs in bulk, and their files, from the server."""
    from tej import jobspec

    seconds = jobspec.duration(older_than, "--older-than", allow_zero=True) if older_than else None
    ids = remote.prune(list(states) or None, seconds, dry_run=dry_run)
    if as_json:
        emit_json({"ids": list(ids), "count": len(ids), "dry_run": dry_run})
    elif dry_run:
        for job_id in ids:
            click.echo(job_id)
        click.echo(f"{len(ids)} job{'' if len(ids) == 1 else 's'} would be deleted", err=True)
    else:
        click.echo(f"Deleted {len(ids)} job{'' if len(ids) == 1 else 's'}")


@queue_command()
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
def download(
    remote: RemoteQueue, as_json: bool, job_id: str, quiet: bool, specs: tuple[str, ...]
) -> None:
    """Download files of a job: `path` to ./<basename>, `path:` to stdout, `path:dest`."""
    plan = [parse_download_spec(spec) for spec in specs]
    if as_json and any(local is None for _, local in plan):
        raise InvalidInput("--json can't be combined with printing a file (path:)")
    saved = []
    for path, local in plan:
        if local is None:
            out = sys.stdout.buffer
            for chunk in remote.read(job_id, path):
                out.write(chunk)
            out.flush()
        else:
            with ProgressBar(f"Downloading {path}", quiet) as progress:
                written = remote.download(job_id, path, local, progress)
            saved.append({"path": path, "local": written})
    if as_json:
        emit_json({"id": job_id, "files": saved})


def parse_download_spec(spec: str) -> tuple[str, str | None]:
    """`path` -> (path, ./basename); `path:` -> (path, None: stdout); `path:dest`."""
    path, colon, local = spec.partition(":")
    if not path:
        raise InvalidInput(f"Invalid download {spec!r}: the path is empty")
    if colon and not local:
        return path, None
    name = os.path.basename(path.rstrip("/"))
    if name in ("", ".", "..") and (not local or os.path.isdir(local)):
        raise InvalidInput(f"Invalid download {spec!r}: give a new destination (path:dest)")
    if not local:
        return path, name
    if os.path.isdir(local):
        return path, os.path.join(local, name)
    return path, local


def main() -> None:
    """Entry point of the `tej` console script."""
    cli(prog_name="tej")
