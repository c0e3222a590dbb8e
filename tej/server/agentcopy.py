"""The agent's copy in a queue, which supervisors, the fork server and batch scripts run.

A queue keeps the bundle of each tej version that started a supervisor in it,
as QUEUE/agent/tej_agent_DIGEST/ (tej.server.bundle): the agent writes it
from its own files when it first needs it, whole (built aside, then renamed),
so a supervisor never runs half a copy. Copies are never changed, and stay
while jobs may need them (a job queued by Slurm starts later with the copy
of the tej that submitted it).
"""

import errno
import os
import sys

from .bundle import own_files, own_name
from .files import make_private_dir, make_private_dirs, randrange, remove_tree, write_file_atomic
from .layout import AGENT_DIR

# Imports the copy as a package named after it (its folder is not put on sys.path,
# where a file of it could shadow a standard module), then runs its main().
BOOT_CODE = (
    "import sys; name = sys.argv[2]; package = type(sys)(name); "
    "package.__path__ = [sys.argv[1] + '/' + name]; sys.modules[name] = package; "
    "__import__(name + '.remote_agent'); "
    "sys.exit(sys.modules[name + '.remote_agent'].main(sys.argv[3:]))"
)


class AgentCommand(object):
    """A command line that runs the agent's copy: `python -S -c CODE ARGUMENTS...`.

    -S (no site module), as the agent itself runs: the copy needs only the
    standard library, and site costs every fork server a few milliseconds
    (tens with .pth files that import packages). A batch system runs the same
    Python code from a script, with the same arguments in sys.argv[1:] (see
    the Slurm runner).
    """

    def __init__(self, python, code, arguments):
        self.python = python
        self.code = code
        self.arguments = list(arguments)

    @property
    def argv(self):
        """The whole command line, as a list."""
        return [self.python, "-S", "-c", self.code] + self.arguments


class AgentCopy(object):
    """The agent's copy in a queue: QUEUE/agent/NAME, imported as the package NAME."""

    def __init__(self, folder, name):
        self.folder = folder
        self.name = name

    @property
    def path(self):
        """The copy's own folder."""
        return os.path.join(self.folder, self.name)

    def command(self, *arguments):
        """The command that runs the copy's main() with arguments (see remote_agent.main)."""
        return AgentCommand(sys.executable, BOOT_CODE, [self.folder, self.name] + list(arguments))

    def supervisor_command(self, job_dir):
        """The command that supervises a job in the foreground (for a batch system)."""
        return self.command("supervise", job_dir)

    def task_supervisor_command(self, array_dir):
        """The command that supervises an array's task in the foreground, its index the
        last argument, to be added (for a batch system's array job)."""
        return self.command("supervise-task", array_dir)


INSTALLED = set()  # type: set[str]  # the copies this process has seen in place


def queue_copy(queue):
    """This agent's copy in the queue, written there first if it is missing."""
    copy = AgentCopy(queue.path(AGENT_DIR), own_name())
    if copy.path not in INSTALLED:
        if not os.path.isdir(copy.path):
            write_copy(copy, own_files())
        INSTALLED.add(copy.path)
    return copy


def write_copy(copy, files):
    """Write the bundle's files as the copy's folder, atomically (built aside, then renamed)."""
    make_private_dirs(copy.folder)
    temporary = ".%s.new-%d-%d" % (copy.name, os.getpid(), randrange(1 << 30))
    building = os.path.join(copy.folder, temporary)
    make_private_dir(building)
    try:
        for path in sorted(files):
            parent = os.path.dirname(os.path.join(building, path))
            # Python caches compiled copies there: private before Python makes them.
            make_private_dirs(os.path.join(parent, "__pycache__"))
            write_file_atomic(os.path.join(building, path), files[path])
        try:
            os.rename(building, copy.path)
        except OSError as exc:  # another client wrote it meanwhile
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if os.path.isdir(building):
            remove_tree(building)


def running_copy():
    """The copy this process runs from (a supervisor's or fork server's own)."""
    package = sys.modules[__name__.split(".")[0]]
    folder = package.__path__[0]
    return AgentCopy(os.path.dirname(folder), os.path.basename(folder))
