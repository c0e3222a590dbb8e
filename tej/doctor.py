"""`tej doctor DESTINATION`: why a destination works, or doesn't, one check at a time.

The client makes the checks that need no agent (ssh itself, from ssh's own
messages; the server's Python, from the bootstrap's answer), then asks the
agent's read-only `doctor` handler (tej/server/handlers/doctor.py) for the
facts of the server, and judges them here. Nothing on the server is created
or changed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tej.bootstrap import MAX_LOGIN_NOISE, MIN_PYTHON
from tej.destination import ConnectOptions, Destination, _quote, ssh_command
from tej.errors import ConnectionFailed, ServerPythonError, TejError
from tej.session import Session
from tej.text import format_bytes

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
#: Less free space than this where the queue lives: a submit would fail.
MIN_FREE_BYTES = 1 << 20
MIN_FREE_INODES = 100
#: Less than this share of the disk free: a warning.
LOW_FREE_SHARE = 0.05
NOISE_FIX = "print nothing from ~/.bashrc (or your shell's) when not on a terminal"
CHECK_NAMES = ("ssh", "shell", "python", "cache", "queue", "disk", "staging", "jobs", "slurm")

# What ssh says, and what it means: (pattern of its stderr, reason, what to do).
SSH_FAILURES = [
    (
        r"Could not resolve hostname|Name or service not known|nodename nor servname|"
        r"No address associated",
        "unknown host: {host} can't be resolved",
        "check the name, or add a Host entry for it to your ssh config",
    ),
    (
        r"Connection refused",
        "refused: nothing accepts ssh connections at {host}{port}",
        "check the port, and that sshd runs on the server",
    ),
    (
        r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed",
        "the host key of {host} changed since you last logged in",
        "if the server was reinstalled: ssh-keygen -R {host}; if not, someone may be "
        "in the middle: ask its administrator",
    ),
    (
        r"Host key verification failed|No \S+ host key is known",
        "the host key of {host} is unknown (tej never asks to accept one)",
        "log in once with ssh {host} to check and accept its key",
    ),
    (
        r"Permission denied|Too many authentication failures",
        "the server refused the login (no key it accepts)",
        "check your key: ssh-add, IdentityFile in your ssh config, or the server's "
        "~/.ssh/authorized_keys",
    ),
    (
        r"timed out|Timed out",
        "no answer from {host} in time",
        "check that the host is up and reachable (network, VPN, firewall); "
        "--connect-timeout waits longer",
    ),
]
# Where a better Python may be, on the server: names on the PATH, and usual folders.
PYTHON_SEARCH = (
    'echo "TEJ-SHELL $SHELL"; '
    "for p in python3.14 python3.13 python3.12 python3.11 python3.10 python3.9 python3.8 "
    "python3 /usr/local/bin/python3.* /usr/bin/python3.* /opt/*/bin/python3.* "
    '"$HOME"/.pyenv/versions/*/bin/python3 "$HOME"/.local/bin/python3.*; do '
    'q=$(command -v "$p" 2>/dev/null) && echo "$q $("$q" -V 2>&1)"; done'
)


@dataclass(frozen=True)
class Check:
    """One check's outcome: its status (ok, warn, fail, skip), what was found, what to do."""

    name: str
    status: str
    found: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "status": self.status, "found": self.found, "fix": self.fix}


def run_checks(destination: Destination, queue: str, options: ConnectOptions) -> list[Check]:
    """Every check against a destination, in order; those that can't be made are skipped."""
    session = Session(destination, options)
    try:
        session.open()
        report = session.call("doctor", queue=queue)
    except ServerPythonError as exc:
        return [*reached(destination, session), *python_failure(destination, options, exc)]
    except TejError as exc:
        return [*connection_failure(destination, options, session, exc)]
    finally:
        session.close()
    checks = [*reached(destination, session, report)]
    checks += server_checks(session, report)
    return checks


def connection_failure(
    destination: Destination, options: ConnectOptions, session: Session, exc: TejError
) -> Iterator[Check]:
    """The checks when the agent could not be reached: why, and the rest skipped."""
    if isinstance(exc, ConnectionFailed) and not destination.is_local:
        reason, fix = ssh_reason(destination, session.failure_output or str(exc))
        yield Check("ssh", FAIL, reason, fix)
        yield from skipped(CHECK_NAMES[1:], "needs a connection")
        return
    yield from reached(destination, session)
    if "login scripts" in str(exc):  # they print too much before the agent can start
        yield Check("shell", FAIL, str(exc), NOISE_FIX)
    else:
        yield Check("shell", SKIP, "not checked: needs the agent")
        yield Check("agent", FAIL, str(exc), "the agent did not start or answer: see why above")
    yield from skipped(CHECK_NAMES[2:], "needs the agent")


def ssh_reason(destination: Destination, output: str) -> tuple[str, str]:
    """Why ssh failed, from what it said, and what to do about it."""
    host = destination.host or ""
    port = f" port {destination.port}" if destination.port else ""
    for pattern, reason, fix in SSH_FAILURES:
        if re.search(pattern, output):
            return reason.format(host=host, port=port), fix.format(host=host)
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else "ssh failed"
    return f"ssh could not log in to {destination}: {detail}", f"try: ssh {destination} true"


def reached(
    destination: Destination, session: Session, report: dict[str, Any] | None = None
) -> Iterator[Check]:
    """The checks of ssh and the login shell, once ssh has logged in."""
    if destination.is_local:
        yield Check("ssh", SKIP, "local: no ssh")
    else:
        user = f" as {report['user']}" if report else ""
        yield Check("ssh", OK, f"logged in to {destination}{user}")
    if report is None:
        return
    if destination.is_local:
        yield Check("shell", SKIP, "local: no login shell")
        return
    shell = report.get("shell") or "unknown"
    noise = session.login_noise
    if noise >= MAX_LOGIN_NOISE:
        yield Check(
            "shell",
            FAIL,
            f"login shell {shell}: its startup files print {noise} bytes",
            NOISE_FIX,
        )
    elif noise:
        yield Check("shell", WARN, f"login shell {shell}: its startup files print {noise} bytes")
    else:
        yield Check("shell", OK, f"login shell {shell}")


def python_failure(
    destination: Destination, options: ConnectOptions, exc: ServerPythonError
) -> Iterator[Check]:
    """The Python check when the server's Python is missing or too old; a better one's path."""
    shell, better = look_for_pythons(destination, options)
    if destination.is_local:
        yield Check("shell", SKIP, "local: no login shell")
    else:
        yield Check("shell", OK if shell else SKIP, f"login shell {shell or 'unknown'}")
    if better:
        path, version = better[0]
        fix = f"use --python {path} (Python {version})"
    else:
        fix = "install Python 3.8 or newer there, and name it with --python"
    yield Check("python", FAIL, str(exc), fix)
    yield from skipped(CHECK_NAMES[3:], "needs a Python the agent runs on")


def look_for_pythons(
    destination: Destination, options: ConnectOptions
) -> tuple[str | None, list[tuple[str, str]]]:
    """The login shell, and the Pythons 3.8+ found on the destination, newest first:
    (path, version). Run with /bin/sh: there is no Python to run it with."""
    if destination.is_local:
        argv = ["/bin/sh", "-c", PYTHON_SEARCH]
    else:
        argv = [*ssh_command(destination, options), f"/bin/sh -c {_quote(PYTHON_SEARCH)}"]
    # stderr to a file: a shared connection's master process would hold a pipe open.
    with tempfile.TemporaryFile() as errors:
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                timeout=options.connect_timeout + 10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None, []
    found: dict[str, tuple[int, ...]] = {}
    shell = None
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("TEJ-SHELL "):
            shell = line[len("TEJ-SHELL ") :].strip() or None
        match = re.fullmatch(r"(/\S+) Python (\d+)\.(\d+)\.(\d+)\S*", line.strip())
        if match:
            version = tuple(int(part) for part in match.groups()[1:])
            if version >= MIN_PYTHON:
                found.setdefault(match.group(1), version)
    ranked = sorted(found.items(), key=lambda item: item[1], reverse=True)
    return shell, [(path, ".".join(map(str, version))) for path, version in ranked]


def skipped(names: tuple[str, ...], why: str) -> Iterator[Check]:
    """Checks that could not be made."""
    for name in names:
        yield Check(name, SKIP, f"not checked: {why}")


def server_checks(session: Session, report: dict[str, Any]) -> list[Check]:
    """The checks of the server's Python, cache and queue, from the agent's report."""
    python = report["python"]
    checks = [Check("python", OK, f"{python['executable']} (Python {python['version']})")]
    checks.append(cache_check(report["cache"], session))
    queue = report["queue"]
    checks.append(queue_check(queue))
    checks.append(disk_check(queue.get("disk")))
    checks += queue_content_checks(queue)
    return checks


def cache_check(cache: dict[str, Any], session: Session) -> Check:
    """The server's cache of tej's code."""
    path = cache["path"]
    if not cache["exists"]:
        return Check(
            "cache",
            WARN,
            f"no cache at {path}: tej's code is sent on every connection",
            f"make sure tej can create {path} (a home folder that is writable)",
        )
    if not cache.get("is_dir") or not cache.get("mine") or cache.get("mode", 0) & 0o077:
        mode = f"{cache.get('mode', 0):04o}"
        return Check(
            "cache",
            WARN,
            f"{path} is not a private folder of yours (mode {mode}): it is not used",
            f"chmod 700 {path}, or remove it (tej makes it again)",
        )
    sent = " (filled on this connection)" if session.sent_sources else ""
    size = format_bytes(cache.get("bytes", 0))
    return Check("cache", OK, f"{path}: {cache.get('entries', 0)} entries, {size}{sent}")


def queue_check(queue: dict[str, Any]) -> Check:
    """The queue's directory: links, format, owner, modes, runner."""
    links = "".join(f"{link} -> {target}; " for link, target in queue.get("links", []))
    if "error" in queue:
        return Check(
            "queue",
            FAIL,
            f"{links}{queue['error']}",
            "move it away, or choose another queue with --queue",
        )
    root = queue["root"]
    if not queue.get("exists"):
        return Check(
            "queue", OK, f"{links}no queue yet at {root}: tej setup or the first submit makes it"
        )
    options = ", ".join(f"{key}={value}" for key, value in sorted(queue["options"].items()))
    runner = f"runner {queue['runner']}" + (f" ({options})" if options else "")
    found = f"{links}{root}: format {queue['format']}, {runner}, mode {queue['mode']:04o}"
    if not queue["mine"]:
        return Check(
            "queue",
            FAIL,
            f"{found}, owned by uid {queue['owner']}, not you",
            "use a queue of your own (--queue)",
        )
    if queue["mode"] & 0o022:
        return Check("queue", WARN, f"{found}: others can write to it", f"chmod go-w {root}")
    return Check("queue", OK, found)


def disk_check(disk: dict[str, Any] | None) -> Check:
    """Free space and inodes where the queue lives."""
    if not disk:
        return Check("disk", SKIP, "not checked: no path to look at")
    if "error" in disk:
        return Check("disk", FAIL, f"can't read {disk['path']}: {disk['error']}")
    free, total = disk["free"], disk["total"]
    found = (
        f"{format_bytes(free)} free of {format_bytes(total)}, "
        f"{disk['free_inodes']} inodes free, on {disk['path']}"
    )
    inodes = disk["total_inodes"] and disk["free_inodes"] < MIN_FREE_INODES
    if free < MIN_FREE_BYTES or inodes:
        return Check(
            "disk",
            FAIL,
            f"no space left: {found}",
            "free some space (tej delete old jobs), or put the queue on another disk",
        )
    if total and free < LOW_FREE_SHARE * total:
        return Check("disk", WARN, f"little space left: {found}")
    return Check("disk", OK, found)


def queue_content_checks(queue: dict[str, Any]) -> Iterator[Check]:
    """Stale uploads, jobs whose supervisor is gone, and Slurm."""
    if not queue.get("exists"):
        yield from skipped(("staging", "jobs", "slurm"), "no queue")
        return
    staging = queue["staging"]
    if staging["stale"]:
        yield Check(
            "staging",
            WARN,
            f"{staging['stale']} stale uploads hold {format_bytes(staging['stale_bytes'])}",
            "the next tej submit removes them",
        )
    else:
        yield Check("staging", OK, f"{staging['count']} uploads in progress, none stale")
    lost = queue.get("lost")
    if lost is None:
        yield Check("jobs", SKIP, "Slurm tracks the jobs of this queue")
    elif lost:
        shown = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
        yield Check(
            "jobs",
            WARN,
            f"{len(lost)} jobs claim to run but their supervisor is gone: {shown}",
            f"tej status shows them lost; tej kill --id {lost[0]} ends what is left of one",
        )
    else:
        yield Check("jobs", OK, "every running job has its supervisor")
    yield slurm_check(queue)


def slurm_check(queue: dict[str, Any]) -> Check:
    """For the Slurm runner: its commands, and whether the cluster answers."""
    slurm = queue.get("slurm")
    if slurm is None:
        return Check("slurm", SKIP, f"not used (runner {queue['runner']})")
    missing = [name for name, path in slurm["commands"].items() if not path]
    if missing:
        return Check(
            "slurm",
            FAIL,
            f"{', '.join(missing)} not found on the server's PATH",
            "load Slurm's environment in your login files, or use another runner",
        )
    if not slurm.get("answers"):
        return Check(
            "slurm",
            FAIL,
            f"squeue fails: {slurm.get('error')}",
            "check that the cluster's controller runs (scontrol ping)",
        )
    return Check("slurm", OK, "sbatch, squeue, sacct found; the cluster answers")
