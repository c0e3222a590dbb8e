"""`tej doctor`'s look at the server: what it finds, read only (it creates and changes nothing).

The reply is plain facts (paths, numbers, names); the client (tej/doctor.py)
judges them and says what to do.
"""

import os
import stat
import sys
import time

from ...protocol import ACTIVE_STATES, DEFAULT_RUNNER, STATE_QUEUED
from ..errors import AgentError
from ..layout import JOBS_DIR, STAGING_DIR, STALE_UPLOAD
from ..processes import login_user
from ..queue import read_link, read_queue_config, resolve_queue_path
from ..records import read_status_record, supervised_record

#: The server's cache of tej's code, as tej/loader.py finds it (it is sent alone, as source).
CACHE_DIR_NAME = "tej"
#: Slurm's commands the Slurm runner uses.
SLURM_COMMANDS = ("sbatch", "squeue", "sacct")


def doctor(connection, queue):
    """What the server looks like to tej: its user, Python, cache, and the queue at `queue`."""
    return {
        "user": login_user(),
        "shell": _login_shell(),
        "python": {"executable": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3]},
        "cache": describe_cache(),
        "queue": describe_queue(queue),
    }


def _login_shell():
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_shell
    except (ImportError, KeyError):
        return os.environ.get("SHELL")


def describe_cache():
    """The server's cache folder: where, whether it is private, how much it holds."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, CACHE_DIR_NAME)
    found = {"path": path, "exists": False}
    try:
        info = os.lstat(path)
    except OSError:
        return found
    found.update(
        exists=True,
        is_dir=stat.S_ISDIR(info.st_mode),
        mine=info.st_uid == os.getuid(),
        mode=stat.S_IMODE(info.st_mode),
    )
    if found["is_dir"]:
        found["entries"] = len(os.listdir(path))
        found["bytes"] = tree_size(path)
    return found


def tree_size(path):
    """The bytes the files under path hold (what can be read of them)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def describe_queue(text):
    """The queue the path leads to: links, configuration, owner, modes, disk, jobs."""
    found = {"given": text, "links": link_chain(text)}
    try:
        root = resolve_queue_path(text)
        found["root"] = root
        config = read_queue_config(root)
    except AgentError as exc:
        found["error"] = exc.message
        if isinstance(text, str) and text and "\0" not in text:
            found["disk"] = describe_disk(os.path.expanduser(text))
        return found
    found["disk"] = describe_disk(root)
    found["exists"] = config is not None
    if config is None:
        return found
    info = os.stat(root)
    found.update(
        format=config.get("format"),
        runner=config.get("runner") or DEFAULT_RUNNER,
        options=config.get("options") or {},
        owner=info.st_uid,
        mine=info.st_uid == os.getuid(),
        mode=stat.S_IMODE(info.st_mode),
        staging=describe_staging(os.path.join(root, STAGING_DIR)),
    )
    if found["runner"] == "slurm":
        found["slurm"] = describe_slurm()
    else:
        found["lost"] = lost_jobs(os.path.join(root, JOBS_DIR))
    return found


def link_chain(text):
    """The link files the path goes through, as [path, target] pairs (none: a plain path)."""
    chain = []  # type: list[list[str]]
    if not isinstance(text, str) or not text or "\0" in text:
        return chain
    path = os.path.abspath(os.path.expanduser(text))
    while os.path.isfile(path) and len(chain) < 20:
        target = read_link(path)
        if target is None:
            break
        chain.append([path, target])
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(target)))
    return chain


def describe_disk(path):
    """Free space and inodes on the filesystem holding path (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        info = os.statvfs(path)
    except OSError as exc:
        return {"path": path, "error": exc.strerror}
    return {
        "path": path,
        "free": info.f_bavail * info.f_frsize,
        "total": info.f_blocks * info.f_frsize,
        "free_inodes": info.f_favail,
        "total_inodes": info.f_files,
    }


def describe_staging(folder):
    """Uploads in the staging area: how many, how many are stale, and what those hold."""
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    limit = time.time() - STALE_UPLOAD
    stale = []
    for name in names:
        try:
            if os.lstat(os.path.join(folder, name)).st_mtime < limit:
                stale.append(name)
        except OSError:
            pass
    held = sum(tree_size(os.path.join(folder, name)) for name in stale)
    return {"count": len(names), "stale": len(stale), "stale_bytes": held}


def lost_jobs(folder):
    """The jobs whose record says they run (or start) but whose supervisor is gone."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    lost = []
    for name in names:
        job_dir = os.path.join(folder, name)
        record = read_status_record(job_dir)
        if not record or record.get("state") not in ACTIVE_STATES:
            continue
        if record.get("state") == STATE_QUEUED:
            continue
        if supervised_record(job_dir, record).get("state") not in ACTIVE_STATES:
            lost.append(name)
    return lost


def describe_slurm():
    """Slurm's commands on this server, and whether the cluster answers squeue."""
    import shutil

    from ..runners.slurm import last_line, run_command

    commands = {name: shutil.which(name) for name in SLURM_COMMANDS}
    found = {"commands": commands}  # type: dict[str, object]

    if commands["squeue"]:
        proc = run_command(["squeue", "-h", "-u", str(os.getuid()), "-o", "%i"])
        found["answers"] = proc is not None and proc.returncode == 0
        if not found["answers"]:
            found["error"] = last_line(proc)
    return found


HANDLERS = {"doctor": doctor}
