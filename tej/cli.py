"""The ``tej`` command line: parses, calls the API, prints. Nothing else."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tej import __version__
from tej.api import DEFAULT_QUEUE, JobState, JobStatus, RemoteQueue
from tej.errors import InvalidInput, TejError

EXIT_INTERRUPTED = 130
F = TypeVar("F", bound=Callable[..., Any])


def format_elapsed(seconds: float | None) -> str:
    """Elapsed time as H:MM:SS."""
    total = int(seconds or 0)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def describe_status(status: JobStatus) -> str:
    """The one-line text of `tej status`."""
    elapsed = format_elapsed(status.elapsed)
    if status.state is JobState.RUNNING:
        return f"Job is still running ({elapsed})"
    if status.state is JobState.STARTING:
        return "Job is starting"
    if status.state is JobState.FINISHED:
        return f"Job is finished ({elapsed}) with exit code {status.exit_code}"
    if status.state is JobState.KILLED:
        return f"Job was killed ({elapsed})"
    return f"Job was lost ({status.reason or 'unknown reason'})"


def emit_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def tej_command(function: F) -> F:
    """Run a command body; the one place where errors become messages and exit codes."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return function(*args, **kwargs)
        except TejError as exc:
            if as_json:
                emit_json({"error": type(exc).__name__, "message": str(exc)})
            else:
                click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def queue_options(function: F) -> F:
    """The options every command shares: destination, queue, connection, output."""
    decorators = [
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
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def open_queue(
    destination: str, queue: str, ssh_config: str | None, python: str | None
) -> RemoteQueue:
    """The RemoteQueue a command works on."""
    return RemoteQueue(destination, queue, python=python, ssh_config=ssh_config)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tej")
def cli() -> None:
    """Submit a job directory to a server over SSH, and come back for the results.

    DESTINATION is `local`, `[user@]host`, an alias from your ssh config,
    or `ssh://[user@]host[:port]`.
    """


@cli.command()
@queue_options
@click.option("--make-link", "links", multiple=True, help="Make a link at PATH to the queue.")
@click.option("--make-default-link", is_flag=True, help=f"Make a link at {DEFAULT_QUEUE}.")
@click.option("--force", is_flag=True, help="Reconfigure an existing queue; replace links.")
@click.option("--only-links", is_flag=True, help="Only make the links.")
@click.option("--plugin", default="default", show_default=True, help="Runner of the queue.")
@tej_command
def setup(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    links: tuple[str, ...],
    make_default_link: bool,
    force: bool,
    only_links: bool,
    plugin: str,
) -> None:
    """Create the queue on the server (else it is made on first use)."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        result = remote.setup(
            links=links,
            default_link=make_default_link,
            force=force,
            only_links=only_links,
            runner=plugin,
        )
    if as_json:
        emit_json(
            {
                "queue": result.queue,
                "created": result.created,
                "runner": result.runner,
                "links": list(result.links),
            }
        )
        return
    if not only_links:
        verb = "Created" if result.created else "Reconfigured"
        click.echo(f"{verb} queue {result.queue} (plugin: {result.runner})")
    for link in result.links:
        click.echo(f"Made link {link} -> {result.queue}")


@cli.command()
@queue_options
@click.option("--id", "job_id", help="Identifier of the job [default: <dirname>_<user>_<random>].")
@click.option("--script", help="Script to run, relative to DIRECTORY [default: start.sh].")
@click.argument("directory", type=click.Path(file_okay=True, dir_okay=True))
@tej_command
def submit(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    job_id: str | None,
    script: str | None,
    directory: str,
) -> None:
    """Upload DIRECTORY and start its script at once."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        new_id = remote.submit(directory, job_id=job_id, script=script)
    if as_json:
        emit_json({"id": new_id})
    else:
        click.echo("Job submitted as:")
        click.echo(new_id)


@cli.command()
@queue_options
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@tej_command
def status(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    job_id: str,
) -> None:
    """Show the state of a job."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        try:
            result = remote.status(job_id)
        except TejError as exc:
            if type(exc).__name__ == "JobNotFound" and not as_json:
                click.echo("No job with that identifier")
                sys.exit(exc.exit_code)
            raise
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(describe_status(result))


@cli.command(name="list")
@queue_options
@tej_command
def list_jobs(
    destination: str, queue: str, ssh_config: str | None, python: str | None, as_json: bool
) -> None:
    """List the jobs in the queue."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        jobs = remote.list()
    if as_json:
        emit_json([job.to_json() for job in jobs])
        return
    rows = [("ID", "STATE", "ELAPSED", "EXIT")]
    for job in jobs:
        code = "" if job.exit_code is None else str(job.exit_code)
        rows.append((job.id, job.state.value, format_elapsed(job.elapsed), code))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@cli.command()
@queue_options
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@tej_command
def kill(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    job_id: str,
) -> None:
    """Kill a job and every process it started."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        try:
            result = remote.kill(job_id)
        except TejError as exc:
            if type(exc).__name__ == "JobNotFound" and not as_json:
                click.echo(f"No job {job_id!r}")
                sys.exit(exc.exit_code)
            raise
    if as_json:
        emit_json({"killed": result.killed, "status": result.status.to_json()})
    elif result.killed:
        click.echo(f"Job {job_id!r} killed")
    else:
        click.echo(f"Job {job_id!r} has already completed")


@cli.command()
@queue_options
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--force", is_flag=True, help="Kill the job first if it is still running.")
@tej_command
def delete(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    job_id: str,
    force: bool,
) -> None:
    """Delete a job and its files from the server."""
    with open_queue(destination, queue, ssh_config, python) as remote:
        remote.delete(job_id, force=force)
    if as_json:
        emit_json({"id": job_id, "deleted": True})
    else:
        click.echo(f"Deleted job {job_id!r}")


@cli.command()
@queue_options
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@tej_command
def download(
    destination: str,
    queue: str,
    ssh_config: str | None,
    python: str | None,
    as_json: bool,
    job_id: str,
    specs: tuple[str, ...],
) -> None:
    """Download files of a job: `path` to ./<basename>, `path:` to stdout, `path:dest`."""
    plan = [parse_download_spec(spec) for spec in specs]
    if as_json and any(local is None for _, local in plan):
        raise InvalidInput("--json can't be combined with printing a file (path:)")
    saved = []
    with open_queue(destination, queue, ssh_config, python) as remote:
        for path, local in plan:
            if local is None:
                out = click.get_binary_stream("stdout")
                for chunk in remote.read(job_id, path):
                    out.write(chunk)
                out.flush()
            else:
                saved.append({"path": path, "local": remote.download(job_id, path, local)})
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
    if not name or name in (".", ".."):
        raise InvalidInput(f"Invalid download {spec!r}: give a destination (path:dest)")
    if not local:
        return path, name
    if os.path.isdir(local):
        return path, os.path.join(local, name)
    return path, local


def main() -> None:
    """Entry point of the `tej` console script."""
    cli(prog_name="tej")
