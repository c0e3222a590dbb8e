"""tej's protocol, defined once: the client and the agent on the server both import it.

It is part of the code shipped to the server (see tej/server/bundle.py), so it
is standard library only, Python 3.8+, and imports nothing at load time (the
`tej` command reads it before ssh starts: see tej.launcher).

A request is ``{"v": PROTOCOL_VERSION, "op": NAME, "args": {...}}``; the reply
is ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": KIND, "message":
TEXT}``, KIND one of the ERR_ names below. (No ``from __future__ import
annotations``: the server would load __future__ for it.)
"""

PROTOCOL_VERSION = 2

#: Every operation, and the module of tej/server/handlers/ that answers it (a
#: function of the same name). A request loads only its own handler's module.
OPERATIONS = {
    "hello": "session",
    "setup": "setup",
    "install_runner": "setup",
    "upload_begin": "upload",
    "upload_manifest": "upload",
    "upload_data": "upload",
    "upload_abort": "upload",
    "submit": "upload",
    "store_has": "upload",
    "status": "jobs",
    "list": "jobs",
    "list_more": "jobs",
    "wait": "jobs",
    "kill": "jobs",
    "delete": "jobs",
    "prune": "jobs",
    "read_output": "output",
    "tail_offset": "output",
    "list_files": "files",
    "file_identity": "files",
    "read_chunks": "files",
    "sync_list": "sync",
    "sync_hash": "sync",
    "sync_read": "sync",
    "doctor": "doctor",
    "resubmit": "upload",
}
#: The operations a session's first request may be to travel with the bootstrap: the
#: loader answers it (and the handshake) before execnet is loaded (see tej/loader.py).
#: Read only, with small arguments: their replies are plain data (Python literals).
EARLY_OPERATIONS = ("status", "list", "sync_list")
#: In an early answer's line, what stands for a long bytes value sent raw before the line,
#: followed by the value's number (see tej.remote_agent.answer).
RAW_PLACEHOLDER = b"\0tej-raw "
#: The line before those raw values: RAW_MARKER, then each one's length.
RAW_MARKER = b"TEJ-RAW"

# Job states.
STATE_STARTING = "starting"
STATE_QUEUED = "queued"
STATE_SCHEDULED = "scheduled"
STATE_RUNNING = "running"
STATE_FINISHED = "finished"
STATE_KILLED = "killed"
STATE_TIMED_OUT = "timed_out"
STATE_LOST = "lost"
STATE_CANCELLED = "cancelled"
ACTIVE_STATES = (STATE_STARTING, STATE_QUEUED, STATE_SCHEDULED, STATE_RUNNING)
END_STATES = (STATE_FINISHED, STATE_KILLED, STATE_TIMED_OUT, STATE_LOST, STATE_CANCELLED)

# Error kinds of error replies (tej.errors maps each to an exception class).
ERR_BAD_REQUEST = "BadRequest"
ERR_INVALID = "InvalidInput"
ERR_JOB_NOT_FOUND = "JobNotFound"
ERR_JOB_EXISTS = "JobExists"
ERR_JOB_RUNNING = "JobRunning"
ERR_QUEUE = "QueueError"
ERR_RUNNER_MISSING = "RunnerMissing"
ERR_SERVER = "ServerError"
ERR_INTERNAL = "InternalError"

# Where a job's output goes (tej.json "stdout" and "stderr", besides a path in the job).
OUTPUT_KEPT = "tej"
OUTPUT_DISCARDED = "discard"
STDERR_MERGED = "stdout"

# Runners: the default one (tej.server.runners), and those in tej/server/runners/.
DEFAULT_RUNNER = "default"
BUILTIN_RUNNERS = ("queue", "slurm")

# Defaults.
DEFAULT_SCRIPT = "start.sh"
DEFAULT_CONNECT_TIMEOUT = 15
KILL_GRACE = 5.0

# Limits.
MAX_DURATION = 3650 * 86400.0  # ten years: longer is a mistake, and overflows timers
MAX_BLOCK = 30.0  # the longest a request waits on the server (wait, read_output)
MAX_OFFSET = 1 << 62
MAX_READ = 1 << 24
MAX_CHUNK = 1 << 20
MAX_ID_LENGTH = 128
MAX_RETRIES = 100  # retries.max: more attempts than this is a loop, not a retry
MAX_BACKOFF = 100.0  # retries.backoff: the factor the delay grows by at each retry
MAX_ARRAY_TASKS = 100000  # tasks in one array (--array, --params rows)
MAX_ARRAY_INDEX = 10**9  # the largest task index (Slurm's own limit is lower)
# The fields of a plain `tej list` (its short listing: see the agent's list).
LIST_HEAD = ("id", "state", "elapsed", "exit_code", "progress", "array")

# Retries: what "on" may name besides exit codes.
RETRY_ON_FAILURE = "failure"  # a non-zero exit code, or a timeout
RETRY_ON_LOST = "lost"  # the supervisor died (killed, a reboot): retried by the next command

# Names: what job identifiers, environment variables and runners are made of.
ID_PUNCTUATION = "_-.+=@%:,"  # besides ASCII letters and digits
ID_CHARACTERS = r"A-Za-z0-9" + ID_PUNCTUATION.replace("-", r"\-")  # a regex's [class]
ID_REGEX = r"[%s]+\Z" % ID_CHARACTERS
#: The same characters as a set: job_id_problem checks an id without loading re.
_ID_SET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" + ID_PUNCTUATION
)
ENV_NAME_REGEX = r"[A-Za-z_][A-Za-z0-9_]*\Z"
RUNNER_NAME_REGEX = r"[a-z][a-z0-9_]{0,63}\Z"


def job_id_problem(job_id: object) -> "str | None":
    """Why job_id is not a valid job identifier, or None if it is."""
    if not isinstance(job_id, str) or not job_id:
        return "A job identifier can't be empty"
    if job_id in (".", "..") or len(job_id) > MAX_ID_LENGTH or not _ID_SET.issuperset(job_id):
        return "Invalid job identifier %r: use at most %d letters, digits and _-.+=@%%:," % (
            job_id,
            MAX_ID_LENGTH,
        )
    return None


def task_id_parts(job_id: str) -> "tuple[str, int] | None":
    """(array id, index) if job_id names a task (ARRAYID.N), else None."""
    head, dot, tail = job_id.rpartition(".")
    if not dot or not head or not tail.isdigit() or not tail.isascii():
        return None
    return head, int(tail)


def new_job_id_problem(job_id: object) -> "str | None":
    """Why job_id can't be given to a new job (or array), or None if it can.

    One that ends in "." and digits is a task's (ARRAYID.N), never a job's.
    """
    problem = job_id_problem(job_id)
    if problem is None and task_id_parts(job_id) is not None:  # type: ignore[arg-type]
        return (
            "Invalid job identifier %r: one that ends in '.' and digits names an array's task"
            % (job_id,)
        )
    return problem


def parse_array_spec(text: object) -> "tuple[list[int], int | None]":
    """The task indexes of an array spec (Slurm's: "0-99", "1,3,5-9", "0-999:10", then an
    optional "%N") and its N (None without); ValueError, saying why, if it is not one."""
    if text is None or (isinstance(text, str) and not text.strip()):
        raise ValueError("The array spec is empty: use a range such as 0-99")
    if not isinstance(text, str):
        raise ValueError('The array spec %r is not text: use a range such as "0-99"' % (text,))
    spec, percent, limit = text.strip().partition("%")
    parallel = None
    if percent:
        if not limit.isdigit() or not limit.isascii() or int(limit) < 1:
            raise ValueError(
                "Invalid array spec %r: %%N must be a whole number of 1 or more" % text
            )
        parallel = int(limit)
    indexes = set()  # type: set[int]
    for part in spec.split(","):
        indexes.update(array_range(part.strip(), text))
        if len(indexes) > MAX_ARRAY_TASKS:
            break
    if len(indexes) > MAX_ARRAY_TASKS:
        raise ValueError(
            "Invalid array spec %r: more than %d tasks (the limit)" % (text, MAX_ARRAY_TASKS)
        )
    return sorted(indexes), parallel


def array_range(part: str, text: str) -> range:
    """The indexes of one part of an array spec: N, A-B or A-B:STEP."""
    bounds, colon, step_text = part.partition(":")
    first, dash, last = bounds.partition("-")
    numbers = [first, last if dash else first, step_text if colon else "1"]
    if not all(number.isdigit() and number.isascii() for number in numbers):
        raise ValueError(
            "Invalid array spec %r: use indexes and ranges such as 0-99, 1,3,5-9 or 0-999:10" % text
        )
    start, end, step = (int(number) for number in numbers)
    if end < start:
        raise ValueError("Invalid array spec %r: the range %s ends before it starts" % (text, part))
    if step < 1 or end > MAX_ARRAY_INDEX:
        raise ValueError(
            "Invalid array spec %r: a step of 1 or more, indexes up to %d" % (text, MAX_ARRAY_INDEX)
        )
    if (end - start) // step >= MAX_ARRAY_TASKS:
        raise ValueError(
            "Invalid array spec %r: more than %d tasks (the limit)" % (text, MAX_ARRAY_TASKS)
        )
    return range(start, end + 1, step)


def format_indexes(indexes: "list[int]") -> str:
    """A compact array spec (no %N) of sorted, distinct indexes: "0-99", "1,3,5-9"."""
    parts = []
    start = previous = -2
    for index in [*list(indexes), -2]:
        if index == previous + 1 and index >= 0:
            previous = index
            continue
        if start >= 0:
            parts.append(str(start) if start == previous else "%d-%d" % (start, previous))
        start = previous = index
    return ",".join(parts)


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, field: str, allow_zero: bool = False) -> float:
    """Seconds from a number or a text like "90", "90s", "15m", "2h", "1d", "1h30m".

    ValueError, naming field, if it isn't one (or is zero, unless allow_zero).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError('%s must be a duration such as 90, "15m" or "2h"' % field)
    seconds = value
    if isinstance(value, str):
        import re

        part = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
        text = value.strip().lower()
        parts = part.findall(text)
        if not parts or part.sub("", text).strip():
            raise ValueError('Invalid duration for %s: %r (try "90s", "15m")' % (field, value))
        seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    seconds = float(seconds)
    if not 0 <= seconds <= MAX_DURATION or (seconds == 0 and not allow_zero):
        raise ValueError("%s must be a positive duration up to 10 years, not %r" % (field, value))
    return seconds


def check_retries(value: object) -> "dict[str, object]":
    """tej.json's "retries" (a number of retries, or an object), normalized; ValueError if bad.

    The result: {"max": N, "on": [...], "delay": seconds, "backoff": factor}, "on" a
    list of exit codes and of "failure" and "lost".
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"max": value}
    if not isinstance(value, dict):
        raise ValueError('retries must be a number or an object such as {"max": 3}')
    unknown = sorted(set(value) - {"max", "on", "delay", "backoff"})
    if unknown:
        raise ValueError("Unknown key %r in retries (use max, on, delay, backoff)" % unknown[0])
    count = value.get("max", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_RETRIES:
        raise ValueError("retries.max must be a whole number from 0 to %d" % MAX_RETRIES)
    on = value.get("on", RETRY_ON_FAILURE)
    on = [on] if isinstance(on, (str, int)) and not isinstance(on, bool) else on
    if not isinstance(on, list) or not on:
        raise ValueError('retries.on must be "failure", "lost", or a list of those and exit codes')
    for item in on:
        if item in (RETRY_ON_FAILURE, RETRY_ON_LOST):
            continue
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 255:
            raise ValueError(
                'Invalid retries.on value %r: use "failure", "lost" or exit codes from 1 to 255'
                % (item,)
            )
    delay = parse_duration(value.get("delay", 0), "retries.delay", allow_zero=True)
    backoff = value.get("backoff", 1)
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)):
        raise ValueError("retries.backoff must be a number from 1 to %g" % MAX_BACKOFF)
    if not 1 <= backoff <= MAX_BACKOFF:
        raise ValueError("retries.backoff must be a number from 1 to %g" % MAX_BACKOFF)
    unique = list(dict.fromkeys(on))
    return {"max": count, "on": unique, "delay": delay, "backoff": float(backoff)}


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of data, in hex, from Python's built-in module if it has one.

    hashlib would load OpenSSL, which costs a command more than hashing tej's
    code does (a few hundred kilobytes).
    """
    return _sha256_class()(data).hexdigest()  # type: ignore[no-any-return]


_SHA256 = []  # type: list[type]  # the class sha256_hex uses, once found


def _sha256_class() -> type:
    """Python's built-in SHA-256 (hashlib's if it has none), found once: an import that
    fails is not remembered, and looking for it again costs a search of sys.path."""
    if not _SHA256:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # 3.12+
        except ImportError:
            try:
                from _sha256 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
            except ImportError:
                from hashlib import sha256  # type: ignore[assignment,unused-ignore]
        _SHA256.append(sha256)
    return _SHA256[0]
