"""A job's metadata as the client sends it: checks, start time, where its output goes."""

import json
import os
import re
import time

from ..protocol import (
    DEFAULT_SCRIPT,
    ENV_NAME_REGEX,
    ERR_BAD_REQUEST,
    ERR_INVALID,
    MAX_DURATION,
    OUTPUT_DISCARDED,
    OUTPUT_KEPT,
    STDERR_MERGED,
    check_retries,
)
from .errors import (
    AgentError,
)
from .files import (
    relative_parts,
)
from .layout import (
    WORK_DIR,
)


def validate_job(job):
    """Check the job's metadata sent by the client; returns it normalized."""
    if not isinstance(job, dict) or not all(isinstance(key, str) for key in job):
        raise AgentError(ERR_BAD_REQUEST, "Job metadata must be a dict with string keys")
    script = job.get("script", DEFAULT_SCRIPT)
    args = job.get("args", [])
    if not isinstance(script, str) or not script:
        raise AgentError(ERR_INVALID, "The script must be a path")
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise AgentError(ERR_INVALID, "The script's arguments must be strings")
    relative_parts(os.fsencode(script))
    env = job.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in env.items()
    ):
        raise AgentError(ERR_INVALID, "env must map names to strings")
    for key in ("max_runtime", "kill_grace", "delay"):
        value = job.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and 0 <= value <= MAX_DURATION
        ):
            raise AgentError(ERR_INVALID, "%s must be a number of seconds" % key)
    for stream in ("stdout", "stderr"):
        check_output_target(stream, job.get(stream, OUTPUT_KEPT))
    if not isinstance(job.get("notify") or {}, dict):
        raise AgentError(ERR_INVALID, "notify must be a dict")
    job = dict(job, script=script, args=args, env=env)
    if job.get("retries") is not None:
        try:
            job["retries"] = check_retries(job["retries"])
        except ValueError as exc:
            raise AgentError(ERR_INVALID, str(exc))
    return job


def check_output_target(stream, target):
    """Refuse an output target that is neither a keyword nor a path inside the job."""
    if not isinstance(target, str) or not target:
        raise AgentError(ERR_INVALID, "%s must be a string" % stream)
    keywords = (OUTPUT_KEPT, OUTPUT_DISCARDED, STDERR_MERGED)
    if target in keywords:
        return
    if not relative_parts(os.fsencode(target)) or target.endswith(("/", "/.")):
        raise AgentError(ERR_INVALID, "Invalid %s path %r: name a file" % (stream, target))


def validate_secrets(secrets):
    """Check the secret environment variables of a submit."""
    if not isinstance(secrets, dict) or not all(
        isinstance(name, str) and re.match(ENV_NAME_REGEX, name) and isinstance(value, str)
        for name, value in secrets.items()
    ):
        raise AgentError(ERR_INVALID, "secrets must map variable names to strings")
    return secrets


def read_secrets(stream):
    """The secret environment variables the agent sends the supervisor on its stdin."""
    try:
        data = json.loads(stream.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start_time_of(job):
    """When a job should start (POSIX time), from its delay or start_at; None for now."""
    if job.get("delay") is not None:
        return time.time() + float(job["delay"])
    if job.get("start_at") is None:
        return None
    import datetime

    try:
        when = datetime.datetime.fromisoformat(str(job["start_at"]))
    except ValueError:
        raise AgentError(ERR_INVALID, "Invalid start_at %r" % (job["start_at"],))
    if when.tzinfo is None:  # naive: the server's local time
        start = time.mktime(when.timetuple()) + when.microsecond / 1e6
    else:
        start = when.timestamp()
    if start > time.time() + MAX_DURATION:
        raise AgentError(ERR_INVALID, "start_at is more than ten years away")
    return start


def check_script(work, script):
    """Refuse a script that isn't a regular file inside the job's directory."""
    path = os.path.join(work, script)
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(work) + "/"):
        raise AgentError(ERR_INVALID, "The script %s is outside the job's directory" % script)
    if not os.path.isfile(real):
        raise AgentError(ERR_INVALID, "The script %s is not a file in the job's directory" % script)


def output_path(job_dir, job, stream):
    """Where a job's stdout or stderr goes: a path, or None when discarded."""
    target = job.get(stream) or OUTPUT_KEPT
    if stream == "stderr" and target == STDERR_MERGED:
        raise AgentError(ERR_INVALID, "This job's stderr goes to its stdout: read stdout")
    if target == OUTPUT_DISCARDED:
        return None
    if target == OUTPUT_KEPT:
        return os.path.join(job_dir, stream)
    work = os.path.realpath(os.path.join(job_dir, WORK_DIR))
    path = os.path.join(work, target)
    real = os.path.realpath(os.path.dirname(path))
    if real != work and not real.startswith(work + "/"):
        raise AgentError(ERR_INVALID, "The %s path %r leaves the job's folder" % (stream, target))
    return path
