"""The ``tej`` command line: parses, calls the API, prints (in the words of tej.text).

shutil and signal are imported where they are used: the commands that answer
quickest (`tej status`) need neither.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from click.core import ParameterSource
from click.shell_completion import CompletionItem

from tej import __version__, config, protocol
from tej.api import ArrayStatus, DryRun, JobState, JobStatus, RemoteQueue, status_of
from tej.config import DEFAULT_QUEUE
from tej.destination import SHARED_CONNECTION_SECONDS
from tej.errors import InvalidInput, JobNotFound, TejError
from tej.text import (
    array_cell,
    cut,
    describe_status,
    display_width,
    format_bytes,
    format_elapsed,
    progress_cell,
)

if TYPE_CHECKING:
    pass

EXIT_INTERRUPTED = 130
EXIT_JOB_LOST = 7
EXIT_JOB_TIMED_OUT = 124
F = TypeVar("F", bound="Callable[..., Any]")


def job_exit_code(status: JobStatus, use_job_code: bool) -> int:
    """The exit code of `tej wait`: see the README's table."""
    import signal

    if status.state is JobState.LOST:
        return EXIT_JOB_LOST
    if not use_job_code:
        return 0
    if status.state is JobState.TIMED_OUT:
        return EXIT_JOB_TIMED_OUT
    if status.state in (JobState.KILLED, JobState.CANCELLED) and (status.exit_code or 0) < 128:
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


def exit_with_error(exc: TejError, as_json: bool) -> NoReturn:
    """Report an anticipated error, and exit with its code."""
    report_error(exc, as_json)
    sys.exit(exc.exit_code)


def complete_destination(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of DESTINATION: local, ssh config hosts, tej's configured hosts."""
    from tej import completion

    return completion.destinations(incomplete)


def complete_job_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a job id: the queue's jobs, if the server answers within a second."""
    from tej import completion

    # While an option's value is completed, click parses no arguments: the destination,
    # first, is then left in ctx.args.
    destination = ctx.params.get("destination") or next(iter(ctx.args), None)
    if not destination:
        return []
    try:
        remote = open_queue(destination, resolve_settings(ctx, destination))
    except TejError:
        return []
    return completion.job_ids(remote, incomplete)


def complete_runner(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of --plugin: the runners this client has, plugins' too."""
    from tej import plugins

    return [name for name in plugins.available() if name.startswith(incomplete)]


def complete_directory(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of a local folder: the shell's own (tej checks it, not click)."""
    return [CompletionItem(incomplete, type="dir")]


def complete_words(*words: str) -> Callable[[click.Context, click.Parameter, str], list[str]]:
    """Shell completion of an option's fixed values."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        return [word for word in words if word.startswith(incomplete)]

    return complete


COMMON_OPTIONS = [
    click.argument("destination", shell_complete=complete_destination),
    click.option(
        "--queue",
        envvar=config.CONNECTION["queue"],
        help=f"Queue directory on the server (or a link to one) [default: {DEFAULT_QUEUE}].",
    ),
    click.option(
        "--ssh-config",
        envvar=config.CONNECTION["ssh_config"],
        type=click.Path(dir_okay=False),
        help="ssh configuration file (passed as ssh -F).",
    ),
    click.option(
        "--python",
        envvar=config.CONNECTION["python"],
        help="Python interpreter on the server [default: python3].",
    ),
    click.option(
        "--connect-timeout",
        envvar=config.CONNECTION["connect_timeout"],
        type=click.IntRange(1, config.MAX_CONNECT_TIMEOUT),
        help=f"Seconds to wait for the server [default: {protocol.DEFAULT_CONNECT_TIMEOUT}].",
    ),
    click.option(
        "--no-reuse/--reuse",
        default=None,
        envvar=config.CONNECTION["no_reuse"],
        help="Don't share one ssh connection between commands (--reuse: do).",
    ),
    click.option(
        "--persist",
        envvar=config.CONNECTION["persist"],
        type=click.IntRange(1, config.MAX_PERSIST),
        metavar="SECONDS",
        help="Keep a shared ssh connection open this long after the last command "
        f"[default: {SHARED_CONNECTION_SECONDS}].",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
]


def common_options(function: F) -> F:
    """Give a command the destination and the options every command takes."""
    for option in reversed(COMMON_OPTIONS):
        function = option(function)
    return function


def resolve_settings(ctx: click.Context, destination: str) -> config.Settings:
    """The settings for destination: the command line's, the environment's, the file's."""
    given: dict[str, object] = {}
    origins: dict[str, tuple[str, str | None]] = {}
    for name, variable in config.CONNECTION.items():
        source = ctx.get_parameter_source(name)
        if source is ParameterSource.COMMANDLINE:
            origins[name] = (config.FROM_COMMAND_LINE, None)
        elif source is ParameterSource.ENVIRONMENT:
            origins[name] = (config.FROM_ENVIRONMENT, variable)
        else:
            continue
        given[name] = ctx.params[name]
    return config.resolve(destination, given, origins)


def open_queue(destination: str, settings: config.Settings) -> RemoteQueue:
    """The queue the settings name (connecting on first use)."""
    return RemoteQueue(
        destination,
        settings.queue,
        python=settings.python,
        ssh_config=settings.ssh_config,
        connect_timeout=settings.connect_timeout,
        reuse_connection=settings.reuse,
        persist=settings.persist,
    )


def queue_command(
    name: str | None = None, with_settings: bool = False
) -> Callable[[F], click.Command]:
    """Declare a command that works on a queue: `tej NAME DESTINATION [options]`.

    The command's function receives an open RemoteQueue as `remote` (and the
    Settings as `settings`, if with_settings). This is the one place where
    errors become messages and exit codes.
    """

    def decorate(function: F) -> click.Command:
        @functools.wraps(function)
        def run(destination: str, as_json: bool, **kwargs: Any) -> None:
            for setting in config.CONNECTION:
                del kwargs[setting]  # read from the context, with their sources
            remote: RemoteQueue | None = None
            try:
                settings = resolve_settings(click.get_current_context(), destination)
                if with_settings:
                    kwargs["settings"] = settings
                remote = open_queue(destination, settings)
                try:  # connects on first use, so bad input costs no connection
                    function(remote=remote, as_json=as_json, **kwargs)
                finally:
                    remote.close(wait=False)  # the command ends next
            except TejError as exc:
                exit_with_error(exc, as_json)
            except KeyboardInterrupt:
                if remote is not None:
                    remote.abort()
                click.echo("Error: interrupted", err=True)
                sys.exit(EXIT_INTERRUPTED)

        return cli.command(name)(common_options(run))

    return decorate


ID_OPTION = click.option(
    "--id",
    "job_id",
    required=True,
    shell_complete=complete_job_id,
    help="Identifier of the job.",
)


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
    shell_complete=complete_runner,
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
    if result.unchanged:
        click.echo(f"Queue {result.queue} already set up (plugin: {result.runner})")
    elif not only_links:
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


JOB_OPTIONS = [
    click.option("--script", help="Script to run, relative to DIRECTORY [default: start.sh]."),
    click.option("--max-runtime", help="Time limit (90, 90s, 15m, 2h, 1d); then it is killed."),
    click.option("--start-at", help="Start at this ISO 8601 time (naive: the server's time)."),
    click.option("--delay", help="Start after this duration (90s, 15m, 2h)."),
    click.option(
        "--env", "env", multiple=True, metavar="NAME=VALUE", help="Add to the environment."
    ),
    click.option(
        "--env-secret",
        "secrets",
        multiple=True,
        metavar="NAME",
        help="Pass $NAME (or a prompted value) to the job, never written on the server.",
    ),
    click.option(
        "--stdout",
        shell_complete=complete_words("tej", "discard"),
        help="Where stdout goes: tej (kept), discard, or a path in the job.",
    ),
    click.option(
        "--stderr",
        shell_complete=complete_words("tej", "discard", "stdout"),
        help="Where stderr goes: tej, discard, stdout, or a path in the job.",
    ),
    click.option(
        "--webhook", multiple=True, metavar="URL", help="POST the status here at the end."
    ),
    click.option("--email", multiple=True, metavar="ADDRESS", help="Email a summary at the end."),
    click.option("--priority", type=int, help="Queue runner: higher starts first [default: 0]."),
    click.option(
        "--after",
        multiple=True,
        metavar="ID",
        shell_complete=complete_job_id,
        help="Queue runner: start once job ID has succeeded.",
    ),
    click.option(
        "--retries",
        type=click.IntRange(0, protocol.MAX_RETRIES),
        help="Run the script again, up to N times, when it fails (tej.json: retries).",
    ),
    click.option(
        "--array",
        metavar="SPEC",
        help="An array: a task per index (0-99, 1,3,5-9, 0-999:10; %N: at most N at once).",
    ),
    click.option(
        "--max-parallel",
        type=click.IntRange(1),
        metavar="N",
        help="An array's tasks: at most N at once [default: the server's CPUs].",
    ),
    click.option(
        "--wait", "then_wait", is_flag=True, help="Wait for the job to end (see tej wait)."
    ),
    click.option("--exit-code", is_flag=True, help="With --wait: exit with the job's exit code."),
]


def job_options(function: F) -> F:
    """Give a command the options of a job's metadata (submit's and resubmit's), and --wait."""
    for option in reversed(JOB_OPTIONS):
        function = option(function)
    return function


def job_overrides(
    metadata: dict[str, Any],
    env: tuple[str, ...],
    webhook: tuple[str, ...],
    email: tuple[str, ...],
    priority: int | None,
    after: tuple[str, ...],
    retries: int | None,
) -> dict[str, Any]:
    """The job metadata the command line gives (tej.json's names; None: not given)."""
    overrides: dict[str, Any] = dict(
        metadata,
        env=parse_env(env) if env else None,
        priority=priority,
        after=list(after) or None,
        retries=None if retries is None else {"max": retries},
    )
    if webhook or email:
        overrides["notify"] = {
            **({"webhook": list(webhook)} if webhook else {}),
            **({"email": list(email)} if email else {}),
        }
    return overrides


@queue_command(with_settings=True)
@click.option("--id", "job_id", help="Identifier of the job [default: <dirname>_<user>_<random>].")
@job_options
@click.option(
    "--params",
    "params_file",
    metavar="FILE",
    help="An array: a task per row of FILE (CSV with a header, or JSON lines).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show what would be uploaded, and what the server has of it; create nothing.",
)
@click.argument("directory", shell_complete=complete_directory)
def submit(
    remote: RemoteQueue,
    settings: config.Settings,
    as_json: bool,
    job_id: str | None,
    directory: str,
    env: tuple[str, ...],
    secrets: tuple[str, ...],
    webhook: tuple[str, ...],
    email: tuple[str, ...],
    priority: int | None,
    after: tuple[str, ...],
    retries: int | None,
    then_wait: bool,
    exit_code: bool,
    quiet: bool,
    dry_run: bool,
    params_file: str | None,
    **metadata: str | None,
) -> None:
    """Upload DIRECTORY and start its script (tej.json in it adds metadata).

    The queue's runner decides when: at once (default), in turn (queue), or
    through a batch system (slurm). With --array or --params, an array of
    tasks, each ARRAYID.N, from one upload.
    """
    overrides = job_overrides(metadata, env, webhook, email, priority, after, retries)
    if params_file is not None:
        from tej import jobspec

        if overrides.get("array") is not None:
            raise InvalidInput("--params and --array can't be combined: a task per row of params")
        overrides["params"] = jobspec.read_params_file(params_file)
    defaults = settings.submit_defaults()
    if dry_run:
        if then_wait:
            raise InvalidInput("--dry-run submits nothing to wait for: leave out --wait")
        plan = remote.dry_run(directory, job_id=job_id, defaults=defaults, **overrides)
        show_dry_run(plan, str(remote.destination), as_json)
        return
    secret_values = {name: read_secret(name) for name in secrets}
    with ProgressBar("Uploading", quiet) as progress:
        new_id = remote.submit(
            directory,
            job_id=job_id,
            secrets=secret_values,
            progress=progress,
            defaults=defaults,
            **overrides,
        )
    report_submitted(remote, new_id, as_json, then_wait, exit_code)


@queue_command()
@ID_OPTION
@click.option("--as", "new_id", help="Identifier of the new job [default: like submit's].")
@click.option(
    "--failed", is_flag=True, help="Of an array: only its tasks that didn't finish with 0."
)
@job_options
def resubmit(
    remote: RemoteQueue,
    as_json: bool,
    job_id: str,
    new_id: str | None,
    failed: bool,
    env: tuple[str, ...],
    secrets: tuple[str, ...],
    webhook: tuple[str, ...],
    email: tuple[str, ...],
    priority: int | None,
    after: tuple[str, ...],
    retries: int | None,
    then_wait: bool,
    exit_code: bool,
    **metadata: str | None,
) -> None:
    """Start a new job from the files job ID was uploaded with (nothing is uploaded).

    It has the job's script and metadata, but for the options given.
    """
    overrides = job_overrides(metadata, env, webhook, email, priority, after, retries)
    secret_values = {name: read_secret(name) for name in secrets}
    created = remote.resubmit(
        job_id, new_id=new_id, secrets=secret_values, failed=failed, **overrides
    )
    report_submitted(remote, created, as_json, then_wait, exit_code)


def report_submitted(
    remote: RemoteQueue, new_id: str, as_json: bool, then_wait: bool, exit_code: bool
) -> None:
    """Say which job was submitted; with --wait, wait for it and exit as `tej wait` does."""
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


def show_dry_run(plan: DryRun, destination: str, as_json: bool) -> None:
    """Print what `tej submit --dry-run` found."""

    if as_json:
        emit_json(plan.to_json())
        return
    others = [f"{plan.folders} folder{'s' if plan.folders != 1 else ''}"] if plan.folders else []
    if plan.symlinks:
        others.append(f"{plan.symlinks} symlink{'s' if plan.symlinks != 1 else ''}")
    also = f" and {', '.join(others)}" if others else ""
    count = len(plan.files)
    click.echo(
        f"Would upload {count} file{'s' if count != 1 else ''} "
        f"({format_bytes(plan.total_bytes)}){also} from {plan.directory} to {destination}:"
    )
    sizes = [format_bytes(item.size) for item in plan.files]
    width = max((len(item.path) for item in plan.files), default=0)
    size_width = max((len(size) for size in sizes), default=0)
    for item, size in zip(plan.files, sizes):
        note = "  (on the server)" if item.on_server else ""
        click.echo(f"  {item.path.ljust(width)}  {size.rjust(size_width)}{note}")
    held = sum(item.on_server for item in plan.files)
    click.echo(
        f"The server has {held} of them ({format_bytes(plan.held_bytes)}): "
        f"{format_bytes(plan.send_bytes)} would be sent. Nothing was created (dry run)."
    )


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
        # One line, cut to the terminal's width: \r must bring the cursor back to its start.
        import shutil

        width = shutil.get_terminal_size().columns
        click.echo(f"\r\033[K{describe_status(status, width)}", err=True, nl=False)

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
@ID_OPTION
@click.option("--timeout", help="Give up after this duration (90, 15m, 2h): exit code 6.")
@click.option("--exit-code", is_flag=True, help="Exit with the job's own exit code.")
def wait(
    remote: RemoteQueue, as_json: bool, job_id: str, timeout: str | None, exit_code: bool
) -> None:
    """Wait until a job ends, then show how it ended."""
    from tej import jobspec

    seconds = (
        jobspec.duration(timeout, "--timeout", allow_zero=True) if timeout is not None else None
    )
    status = wait_for_job(remote, job_id, seconds, show_progress=not as_json)
    if as_json:
        emit_json(status.to_json())
    else:
        click.echo(describe_status(status))
    sys.exit(job_exit_code(status, exit_code))


@queue_command()
@ID_OPTION
@click.option("--stderr", "use_stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
@click.option("--tail", type=click.IntRange(0), help="Start with the last N lines.")
@click.option(
    "--attempt",
    type=click.IntRange(1),
    metavar="K",
    help="The output of attempt K of a job with retries [default: the current one].",
)
def logs(
    remote: RemoteQueue,
    as_json: bool,
    job_id: str,
    use_stderr: bool,
    follow: bool,
    tail: int | None,
    attempt: int | None,
) -> None:
    """Print a job's output."""
    stream = "stderr" if use_stderr else "stdout"
    chunks = remote.logs(job_id, stream, follow=follow, tail=tail, attempt=attempt)
    if as_json:
        text = b"".join(chunks).decode("utf-8", "replace")
        emit_json({"id": job_id, "stream": stream, "output": text})
        return
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


@queue_command()
@ID_OPTION
def status(remote: RemoteQueue, as_json: bool, job_id: str) -> None:
    """Show the state of a job."""
    try:
        result = remote.status(job_id, tasks=as_json)
    except JobNotFound:
        if protocol.task_id_parts(job_id) is not None:
            raise  # the server's words: no such task, or it was deleted
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
@click.option("--long", "-l", "long_form", is_flag=True, help="Add peak memory and CPU columns.")
@click.option("--watch", "-w", is_flag=True, help="A live table, refreshed every 2 s (q: quit).")
@click.option("--tasks", "-t", is_flag=True, help="List each array's tasks (ARRAYID.N) after it.")
@click.option("--id", "job_id", help="Only this job (with --tasks, an array and its tasks).")
def list_jobs(
    remote: RemoteQueue,
    as_json: bool,
    states: tuple[str, ...],
    long_form: bool,
    watch: bool,
    tasks: bool,
    job_id: str | None,
) -> None:
    """List the jobs in the queue, oldest first (printed as they arrive).

    An array is one row, with its tasks' counts; --state picks arrays by their own
    state (and, with --tasks, tasks by theirs). With --id, that job's row only,
    whatever its state (and with --tasks, its tasks in --state).
    """
    if watch and job_id is not None:
        raise InvalidInput("--watch shows the whole queue: it can't be combined with --id")
    if watch:
        from tej import watch as live

        if as_json:
            raise InvalidInput("--watch shows a live table: it can't be combined with --json")
        live.check_terminal()
        live.watch(remote, tasks=tasks, states=list(states) or None)
        return
    wanted = list(states) or None
    if as_json:
        found = remote.iter_list(wanted, tasks=tasks, job_id=job_id)
        emit_json_list(job.to_json() for job in found)
        return
    import shutil

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    batches = remote.iter_row_batches(wanted, tasks=tasks, short=not long_form, job_id=job_id)
    if long_form:  # the widths of the memory and CPU columns need every job
        jobs = [status_of(dict(zip(fields, row))) for fields, rows in batches for row in rows]
        click.echo("\n".join(job_table(jobs, long_form, width)))
        return
    print_rows(batches, width)


def print_rows(
    batches: Iterator[tuple[Sequence[str], Sequence[Sequence[Any]]]], width: int | None
) -> None:
    """Print `tej list`'s table as the batches of rows arrive: the columns' widths are the
    header's and the first batch's, and a PROGRESS column if a job of the first batch has
    one."""
    form, progress = "", False
    out = sys.stdout
    for fields, rows in batches:
        if not rows:
            continue
        at = dict((name, fields.index(name)) for name in protocol.LIST_HEAD)
        ident, state, elapsed, code = at["id"], at["state"], at["elapsed"], at["exit_code"]
        cells = [
            (row[ident], row[state], format_elapsed(row[elapsed]), exit_text(row[code]))
            for row in rows
        ]
        notes = [row[at["progress"]] or array_cell(row[at["array"]]) for row in rows]
        if not form:  # the columns' widths: the header's and the first batch's
            progress = any(notes)
            cells.insert(0, ("ID", "STATE", "ELAPSED", "EXIT"))
            notes.insert(0, "PROGRESS")
            widths = [max(len(row[column]) for row in cells) for column in range(4)]
            form = "  ".join("%%-%ds" % size for size in widths)
        lines = [form % row for row in cells]
        if progress:
            lines = [add_progress(line, note, width) for line, note in zip(lines, notes)]
        out.write("".join(line.rstrip() + "\n" for line in lines))
    if not form:
        out.write("ID  STATE  ELAPSED  EXIT\n")
    out.flush()


def add_progress(line: str, progress: str | None, width: int | None) -> str:
    """A row of `tej list` with its progress, cut to the terminal's width."""
    text = line + "  "
    room = None if width is None else width - 1 - display_width(text)
    return text + (cut(progress or "", room) if room is None or room > 3 else "")


def job_table(jobs: list[JobStatus], long_form: bool, width: int | None) -> list[str]:
    """The lines of `tej list`: aligned columns, the progress last (cut to width), if any."""
    header = ("ID", "STATE", "ELAPSED", "EXIT", "MEMORY", "CPU", "PROGRESS")
    rows: list[tuple[str, ...]] = [header if long_form else header[:4] + header[6:]]
    for job in jobs:
        code = "" if job.exit_code is None else str(job.exit_code)
        cells = [job.id, job.state.value, format_elapsed(job.elapsed), code]
        if long_form:
            cells += usage_cells(job)
        rows.append((*cells, progress_cell(job)))
    if not any(row[-1] for row in rows[1:]):  # no PROGRESS column when nobody wrote one
        rows = [(*row[:-1], "") for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        text = "  ".join(cell.ljust(size) for cell, size in zip(row, widths)) + "  "
        room = None if width is None else width - 1 - display_width(text)
        lines.append((text + (cut(row[-1], room) if room is None or room > 3 else "")).rstrip())
    return lines


def usage_cells(job: JobStatus) -> list[str]:
    """The MEMORY and CPU cells of a job (peak once ended, current while it runs)."""
    resources = job.resources
    if resources is None:
        return ["", ""]
    memory = resources.memory
    cpu = resources.cpu
    return [
        "" if memory is None else format_bytes(memory),
        "" if cpu is None else format_elapsed(round(cpu)),
    ]


def exit_text(code: int | None) -> str:
    """The EXIT column of a job."""
    return "" if code is None else str(code)


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
@ID_OPTION
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
@ID_OPTION
@click.option("--force", is_flag=True, help="Kill the job first if it is still running.")
def delete(remote: RemoteQueue, as_json: bool, job_id: str, force: bool) -> None:
    """Delete a job and its files from the server."""
    remote.delete(job_id, force=force)
    if as_json:
        emit_json({"id": job_id, "deleted": True})
    elif protocol.task_id_parts(job_id) is not None:
        click.echo(f"Deleted task {job_id!r} (its array still counts how it ended)")
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

    seconds = (
        jobspec.duration(older_than, "--older-than", allow_zero=True)
        if older_than is not None
        else None
    )
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
    """Download files of a job: `path` to ./<basename>, `path:` to stdout, `path:dest`.

    Of an array: from every task, each into ARRAYID.N/ under the destination
    (`path` to ./ARRAYID.N/<basename>, `path:folder` to folder/ARRAYID.N/<basename>).
    """
    plan = [parse_download_spec(spec) for spec in specs]
    if as_json and any(local is None for _, local in plan):
        raise InvalidInput("--json can't be combined with printing a file (path:)")
    if protocol.task_id_parts(job_id) is None and isinstance(remote.status(job_id), ArrayStatus):
        download_array(remote, as_json, job_id, quiet, specs)
        return
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


def download_array(
    remote: RemoteQueue, as_json: bool, array_id: str, quiet: bool, specs: tuple[str, ...]
) -> None:
    """tej download of an array: every task's files into ARRAYID.N/ under the destination."""
    saved = []
    for spec in specs:
        path, _, folder = spec.partition(":")
        if ":" in spec and not folder:
            raise InvalidInput("An array's files can't be printed (path:): give a folder")
        with ProgressBar(f"Downloading {path}", quiet) as progress:
            for local in remote.download_tasks(array_id, path, folder or ".", progress):
                saved.append({"path": path, "local": local})
    if as_json:
        emit_json({"id": array_id, "files": saved})


@queue_command("sync")
@click.option("--id", "job_id", required=True, help="Identifier of the job.")
@click.option("--to", "to", help="Local folder to mirror into [default: ./ID].")
@click.option(
    "--follow", "-f", is_flag=True, help="Sync again every --interval until the job ends."
)
@click.option("--interval", help="With --follow: seconds between passes (90, 15m) [default: 5].")
@click.option("--delete", is_flag=True, help="Remove local files the job doesn't have.")
@click.option("--force", is_flag=True, help="--delete in a folder that isn't a sync of this job.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave these paths alone.")
@click.option("--dry-run", "-n", is_flag=True, help="Only say what would be done.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
def sync_job(
    remote: RemoteQueue,
    as_json: bool,
    job_id: str,
    to: str | None,
    follow: bool,
    interval: str | None,
    delete: bool,
    force: bool,
    exclude: tuple[str, ...],
    dry_run: bool,
    quiet: bool,
    paths: tuple[str, ...],
) -> None:
    """Mirror a job's files (or the PATHs in it) into a local folder, sending what changed.

    Of an array: every task that started, each into ARRAYID.N/ under the folder
    [default: ./ARRAYID]; with --follow, until the array has ended.
    """
    from tej import jobspec

    if interval is not None and not follow:
        raise InvalidInput("--interval goes with --follow")
    if follow and dry_run:
        raise InvalidInput("--dry-run can't be combined with --follow")
    seconds = jobspec.duration(interval, "--interval") if interval is not None else 5.0
    folder = to if to is not None else os.path.join(".", job_id)
    array = is_array_sync(remote, job_id, folder)
    options: dict[str, Any] = {"exclude": exclude, "force": force}
    with ProgressBar("Syncing", quiet or as_json) as progress:
        options["progress"] = progress
        if not follow:
            once = remote.sync_tasks if array else remote.sync
            summary = once(job_id, folder, paths, delete, dry_run=dry_run, **options)
            report_sync(summary, folder, as_json)
            return
        again = remote.sync_tasks_follow if array else remote.sync_follow
        passes = again(job_id, folder, paths, delete, interval=seconds, **options)
        total = None
        for summary in passes:
            total = summary if total is None else total.then(summary)
            if not as_json and (
                summary.files_sent or summary.files_copied or summary.files_deleted
            ):
                click.echo(f"{time.strftime('%H:%M:%S')} {describe_sync(summary)}")
    assert total is not None
    report_sync(total, folder, as_json)


def is_array_sync(remote: RemoteQueue, job_id: str, folder: str) -> bool:
    """Whether `tej sync --id job_id` syncs an array's tasks: one request more, unless the
    id is a task's (ARRAYID.N) or the folder holds a previous sync of this very job (a
    re-sync, as fast as before)."""
    from tej import sync

    if protocol.task_id_parts(job_id) is not None:
        return False
    marker = sync.read_marker(folder) if os.path.isdir(folder) else None
    if marker is not None and marker.get("job_id") == job_id:
        return False
    return isinstance(remote.status(job_id), ArrayStatus)


def describe_sync(summary: Any) -> str:
    """What a sync did, in words."""
    verb = "would be " if summary.dry_run else ""
    files = "file" if summary.files_sent == 1 else "files"
    return (
        f"{summary.files_sent} {files} {verb}sent ({format_size(summary.bytes_sent)}), "
        f"{summary.files_copied} {verb}copied locally, {summary.files_unchanged} unchanged, "
        f"{summary.files_deleted} {verb}deleted"
    )


def report_sync(summary: Any, folder: str, as_json: bool) -> None:
    """Print a sync's summary (and, for a dry run, what it would do)."""
    if as_json:
        emit_json(summary.to_json())
        return
    for verb, names in (("send", summary.to_send), ("copy", summary.to_copy)):
        for name in names:
            click.echo(f"would {verb} {name}")
    for name in summary.to_delete:
        click.echo(f"would delete {name}")
    click.echo(f"{folder}: {describe_sync(summary)}")
    if summary.unreadable:
        more = len(summary.unreadable) - 1
        click.echo(
            f"Warning: the server can't read {summary.unreadable[0]}"
            + (f" and {more} more files" if more else ""),
            err=True,
        )
    if summary.files_changing:
        click.echo(
            f"Warning: {summary.files_changing} files kept changing while they were read: "
            "sync again to get them",
            err=True,
        )


def format_size(size: int) -> str:
    """A size in bytes, KiB, MiB or GiB."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


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


@cli.command("config")
@common_options
def show_config(destination: str, as_json: bool, **_: object) -> None:
    """Show the settings for DESTINATION, and where each comes from.

    Settings come from the command line, the environment (TEJ_QUEUE...), then
    the configuration file ($XDG_CONFIG_HOME/tej/config.toml): the first
    [host."PATTERN"] section matching DESTINATION, then its global settings.
    """
    from tej.destination import parse_destination

    try:
        parse_destination(destination)
        settings = resolve_settings(click.get_current_context(), destination)
        settings.submit_defaults()  # checks them
    except TejError as exc:
        exit_with_error(exc, as_json)
    if as_json:
        emit_json(settings.to_json())
        return
    for note in settings.notes():
        click.echo(f"Note: {note}", err=True)
    file = settings.file
    found = "from" if file.found else "no file at"
    click.echo(f"Settings for {destination} ({found} {file.path}):")
    rows = [
        (name, show_value(value), settings.describe(name))
        for name, value in settings.values.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    for name, value, origin in rows:
        click.echo(f"{name.ljust(widths[0])}  {value.ljust(widths[1])}  {origin}")


def show_value(value: object) -> str:
    """A setting's value as text: strings as they are, other values as JSON, none as -."""
    import json

    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)


DOCTOR_MARKS = {"ok": "[ ok ]", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}


@cli.command()
@common_options
def doctor(destination: str, as_json: bool, **_: object) -> None:
    """Check that DESTINATION works with tej, and say what to do where it doesn't.

    One line per check: ssh, the login shell, the server's Python, its cache of
    tej's code, the queue, free space, stale uploads, lost jobs, Slurm. Exits 1
    if a check fails. Nothing is created or changed on the server.
    """
    from tej import doctor as checks
    from tej.destination import parse_destination

    try:
        where = parse_destination(destination)
        settings = resolve_settings(click.get_current_context(), destination)
        found = checks.run_checks(where, settings.queue, settings.connect_options())
    except TejError as exc:
        exit_with_error(exc, as_json)
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        emit_json([check.to_json() for check in found])
    else:
        width = max(len(check.name) for check in found)
        for check in found:
            click.echo(f"{DOCTOR_MARKS[check.status]} {check.name.ljust(width)}  {check.found}")
            if check.fix and check.status in ("fail", "warn"):
                click.echo(f"       {' ' * width}  -> {check.fix}")
    sys.exit(1 if any(check.status == "fail" for check in found) else 0)


def main() -> None:
    """Entry point of the `tej` console script."""
    cli(prog_name="tej")
