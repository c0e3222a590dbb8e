"""Shell completion's answers beyond click's own: destinations, and the queue's job ids.

Click completes the commands, options and paths; tej.cli asks this module for
destinations (``local``, the hosts of ``~/.ssh/config``, those named in tej's
configuration file) and for job ids, which only the server knows: they are
asked for over the shared connection, and given up silently after a second.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
from typing import TYPE_CHECKING

from tej import config
from tej.destination import LOCAL
from tej.errors import TejError

if TYPE_CHECKING:
    from tej.api import RemoteQueue

#: How long a completion waits for the server's list of jobs.
JOB_IDS_TIMEOUT = 1.0
#: How deep `Include` directives of an ssh config are followed.
MAX_INCLUDE_DEPTH = 8


def destinations(incomplete: str) -> list[str]:
    """The destinations that start with incomplete, sorted."""
    names = {LOCAL, *ssh_hosts(os.path.join(os.path.expanduser("~"), ".ssh", "config"))}
    with contextlib.suppress(TejError):  # a broken file says so when a command runs
        names.update(config.load().names())
    return sorted(name for name in names if name.startswith(incomplete))


def ssh_hosts(path: str, depth: int = 0, base: str | None = None) -> list[str]:
    """The host names of an ssh config's `Host` lines (patterns with * or ? and negations
    left out), following its `Include`s (relative ones are in the first file's folder)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return []
    base = base or os.path.dirname(path)
    hosts: list[str] = []
    for line in lines:
        keyword, _, rest = line.strip().replace("=", " ", 1).partition(" ")
        words = rest.split()
        if keyword.lower() == "host":
            hosts += [word for word in words if not any(char in word for char in "*?!")]
        elif keyword.lower() == "include" and depth < MAX_INCLUDE_DEPTH:
            for word in words:
                pattern = os.path.join(base, os.path.expanduser(word))
                for included in sorted(glob.glob(pattern)):
                    hosts += ssh_hosts(included, depth + 1, base)
    return hosts


def job_ids(remote: RemoteQueue, incomplete: str) -> list[str]:
    """The ids of the queue's jobs that start with incomplete; none if the server takes
    longer than JOB_IDS_TIMEOUT to answer, or fails."""
    found: list[str] = []

    def ask() -> None:
        try:
            found.extend(job.id for job in remote.list())
            remote.close(wait=False)
        except Exception:  # noqa: BLE001 - completion says nothing rather than fail
            found.clear()

    thread = threading.Thread(target=ask, name="tej-complete", daemon=True)
    thread.start()
    thread.join(JOB_IDS_TIMEOUT)
    if thread.is_alive():
        return []
    return [job_id for job_id in found if job_id.startswith(incomplete)]
