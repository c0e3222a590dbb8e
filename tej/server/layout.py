"""The queue directory's format: the names of its files and folders (docs/queue-format.md)."""

from ..protocol import ERR_INVALID, ID_REGEX, job_id_problem
from .errors import AgentError

QUEUE_FORMAT = 2  # 2: the index (QUEUE/index); format 1 queues are upgraded in place
LINK_FORMAT = 1

QUEUE_CONFIG = "tej-queue.json"
LOCK_FILE = "queue.lock"
LIST_CACHE = "list-cache.json"  # format 1 only: removed by the upgrade to 2
JOBS_DIR = "jobs"
STAGING_DIR = "staging"
TRASH_DIR = "trash"
AGENT_DIR = "agent"
STORE_DIR = "store"
LEASES_DIR = "leases"

# The index (QUEUE/index: see index.py).
INDEX_DIR = "index"
INDEX_COMPLETE = "complete"  # written once the index is whole
INDEX_PENDING = "pending"  # intents: changes in progress
INDEX_SPARES = "spares"  # empty files that intents are renamed from and back to
INDEX_ROWS = "rows"  # the list rows of ended jobs
LINE_DIR = "line"  # the queue runner's waiting line (runners/line.py)

# In a job's folder.
JOB_FILE = "job.json"
STATUS_FILE = "status.json"
RUNNER_DATA = "runner.json"  # a job's private record kept by its runner
BLOBS_FILE = "blobs"
LAYOUT_PENDING = "layout-pending"  # a resubmitted job's files, left to its supervisor: a token
MANIFEST_FILE = "manifest"  # the manifest of the job's files as uploaded (for resubmit)
WORK_DIR = "work"
STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
SUPERVISOR_LOG = "supervisor.log"
PROGRESS_FILE = "progress"  # the job writes its progress here ($TEJ_PROGRESS)
PARAMS_FILE = "params.jsonl"  # an array's --params rows, one JSON object a line (row N: index N)
TASK_KILL = "kill-requested"  # in a task its array's supervisor runs: `tej kill` of the task
TASK_DELETED = "deleted"  # in a task's folder: its files were deleted (a tombstone), and when

STALE_UPLOAD = 6 * 3600.0  # an upload untouched this long was abandoned
STALE_TRASH = 3600.0  # a deletion interrupted this long ago


class LazyPattern(object):
    """A regular expression compiled on first use: re (and enum) are not imported for it
    by a request that never matches one (`tej status` of a job)."""

    def __init__(self, regex):
        self.regex = regex
        self.compiled = None

    def match(self, text):
        """re.match with this pattern."""
        if self.compiled is None:
            import re

            self.compiled = re.compile(self.regex)
        return self.compiled.match(text)


ID_PATTERN = LazyPattern(ID_REGEX)


def queue_root_of(job_dir):
    """The root of the queue a job's folder is in (a task's: its array's queue)."""
    import os

    root = os.path.dirname(os.path.dirname(job_dir))
    if os.path.isfile(os.path.join(root, JOB_FILE)):  # root is an array's folder
        root = os.path.dirname(os.path.dirname(root))
    return root


def job_path(root, job_id):
    """The folder of a job, or of a task (ARRAYID.N), whether or not it exists."""
    import os

    from ..protocol import task_id_parts

    path = os.path.join(root, JOBS_DIR, job_id)
    task = task_id_parts(job_id)
    if task is None or os.path.isdir(path):
        return path
    return os.path.join(root, JOBS_DIR, task[0], JOBS_DIR, str(task[1]))


def validate_job_id(job_id):
    """Raise AgentError unless job_id is a valid job identifier."""
    problem = job_id_problem(job_id)
    if problem is not None:
        raise AgentError(ERR_INVALID, problem)
