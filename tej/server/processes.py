"""Processes: identity across pid reuse and reboots, process groups, signals, reaping."""

import os
import time

BOOT_ID_PATH = os.environ.get("TEJ_BOOT_ID_PATH", "/proc/sys/kernel/random/boot_id")


def boot_id():
    """An identifier of the current boot of the server, or None."""
    try:
        with open(BOOT_ID_PATH) as stream:
            return stream.read().strip() or None
    except OSError:
        return None


_LOGIN_USER = []  # type: list[str]  # found once: it reads the password database


def login_user():
    """The name this agent runs as (the user tej logged in as), or "user" if it has none."""
    if not _LOGIN_USER:
        try:
            import pwd

            _LOGIN_USER.append(pwd.getpwuid(os.getuid()).pw_name)
        except (ImportError, KeyError):
            _LOGIN_USER.append(os.environ.get("USER") or "user")
    return _LOGIN_USER[0]


def process_start(pid):
    """The start time of a live process in clock ticks (None if unknowable or dead).

    Returns False when the process does not exist or is a zombie.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as stream:
            fields = stream.read().rsplit(b")", 1)[1].split()
    except (IOError, OSError, IndexError):
        return None if process_exists(pid) else False
    if fields[0] in (b"Z", b"X"):
        return False
    return int(fields[19])


def process_exists(pid):
    """Whether a process with this pid exists (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def identify_process(pid):
    """A record that identifies this process across pid reuse and reboots."""
    return {"pid": pid, "start": process_start(pid), "boot": boot_id()}


def is_same_process(identity):
    """Whether the process recorded in identity is still alive (not a reused pid)."""
    if not identity or not identity.get("pid"):
        return False
    if identity.get("boot") and identity.get("boot") != boot_id():
        return False
    start = process_start(identity["pid"])
    if start is False:
        return False
    return start is None or identity.get("start") in (None, start)


def group_exists(pgid):
    """Whether any live (non-zombie) process is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return has_live_member(pgid)


def live_processes():
    """(pid, parent pid, process group) of every non-zombie process; None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    processes = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as stream:
                fields = stream.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            processes.append((int(name), int(fields[1]), int(fields[2])))
    return processes


def has_live_member(pgid):
    """Whether a non-zombie process is in the group (True where /proc is absent)."""
    processes = live_processes()
    return processes is None or any(group == pgid for _, _, group in processes)


def descendants(root):
    """The pids of the live descendants of a process, even those that left its group."""
    children = {}  # type: dict[int, list[int]]
    for pid, parent, _ in live_processes() or ():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def owns_group(identity):
    """Whether the group led by this recorded process can only hold the job's processes.

    The group's id is the leader's pid: if that pid now belongs to another
    process, or the server rebooted, the group is not the job's.
    """
    if not identity or not identity.get("pid"):
        return False
    if identity.get("boot") and identity.get("boot") != boot_id():
        return False
    start = process_start(identity["pid"])
    return start is False or start is None or identity.get("start") in (None, start)


def signal_group(pgid, signum):
    """Send a signal to a process group, ignoring that it is gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


LIBC = []  # type: list[object]  # the C library, once loaded (see c_library)


def c_library():
    """The C library through ctypes, loaded once (forked supervisors inherit it); or None."""
    if not LIBC:
        try:
            import ctypes

            LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (ImportError, OSError):
            LIBC.append(None)
    return LIBC[0]


def become_subreaper(adopt=True):
    """On Linux, adopt the job's orphaned descendants, so they can be reaped and counted.

    adopt=False stops it: the job is over, and what this process starts next (the
    supervisor of the queue's next job) must not be re-parented to it.
    """
    try:
        c_library().prctl(36, 1 if adopt else 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except AttributeError:  # no C library, or no prctl: not Linux
        pass


def wait_for_child(pid):
    """Wait for the job's main process, reaping adopted orphans meanwhile."""
    while True:
        try:
            reaped, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if reaped == pid:
            return wait_status


def exits_within(pid, timeout):
    """Whether the child pid ends within timeout seconds (it is left to be reaped).

    Told by a pidfd (Python 3.9+, Linux 5.3+); where there is none, False at once.
    """
    open_pidfd = getattr(os, "pidfd_open", None)
    if open_pidfd is None:
        return False
    try:
        pidfd = open_pidfd(pid)
    except OSError:
        return False
    try:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))  # signals' handlers run meanwhile (PEP 475)
    finally:
        os.close(pidfd)


def spawn_script(command, work, env, out, err):
    """Start a job's (or a task's) command in work/, in a session of its own (stdin
    /dev/null, output to out and err); its pid.

    posix_spawn: this process is neither forked nor copied (its memory may be
    large), and an exec that fails raises OSError here. It has no working directory:
    this process moves there for the spawn (it must have no other thread), then back.
    """
    import signal

    null = os.open(os.devnull, os.O_RDONLY)
    here = os.getcwd()
    try:
        os.chdir(work)
        actions = [
            (os.POSIX_SPAWN_DUP2, null, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, err, 2),
        ]
        spawn = os.posix_spawn if "/" in command[0] else os.posix_spawnp
        return spawn(
            command[0],
            command,
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT),
        )
    finally:
        os.chdir(here)
        os.close(null)


def reap_children():
    """Reap every child that has exited, without blocking; whether any child is left."""
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if reaped == 0:
            return True


def reap_remaining(deadline):
    """Reap the children that are dying, so none is left a zombie (until deadline)."""
    while time.time() < deadline:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            time.sleep(0.01)


def terminate_group(pgid, grace, with_descendants=False):
    """Terminate a process group: SIGTERM, then SIGKILL after grace.

    with_descendants (for a supervisor): also every descendant of this
    process, which catches the job's processes that left its group.
    """
    import signal  # here: it loads enum, which reading a status does without

    for signum, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not job_alive(pgid, with_descendants):
            return
        signal_job(pgid, signum, with_descendants)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not job_alive(pgid, with_descendants):
                return
            time.sleep(0.02)


def job_alive(pgid, with_descendants):
    """Whether anything is left of the job's group (or of this process's descendants)."""
    # Without a child, this process has no descendant: none needs looking for in /proc.
    has_children = reap_children()
    if with_descendants and has_children and descendants(os.getpid()):
        return True
    return group_exists(pgid)


def signal_job(pgid, signum, with_descendants):
    """Signal the job's group (and this process's descendants)."""
    signal_group(pgid, signum)
    for pid in descendants(os.getpid()) if with_descendants else ():
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def signal_name(signum):
    """The name of a signal number, such as SIGKILL."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return "SIG%d" % signum


def set_process_title(title):
    """Show title as this process's name and command line in `ps` (on Linux; else nothing).

    The name (the title's first word, 15 bytes at most: tools that parse
    /proc/PID/stat, such as Slurm's process tracking, expect no space in it) is set
    with prctl; the command line is rewritten in place, within the room the
    process's own arguments take.
    """
    libc = c_library()
    if libc is None:
        return
    encoded = title.encode("utf-8", "replace")
    try:
        libc.prctl(15, encoded.split(b" ", 1)[0][:15], 0, 0, 0)  # PR_SET_NAME
        with open("/proc/self/stat", "rb") as stream:
            fields = stream.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start and arg_end
    except (AttributeError, OSError, IndexError, ValueError):
        return
    import ctypes

    room = end - start
    if room > 1:
        text = encoded[: room - 1]
        ctypes.memmove(start, text + b"\0" * (room - len(text)), room)
