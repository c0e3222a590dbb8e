"""A job's metadata: tej.json and the command line's overrides, validated on the client.

Everything is checked before anything is uploaded, so a mistake costs no
connection. The result is the plain dict the agent stores as the job's
metadata (see docs/tej-json.md).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tej import protocol
from tej.errors import InvalidInput

JOB_FILE = "tej.json"
MAX_JOB_FILE_SIZE = 1 << 20
OUTPUT_KEPT = "tej"
OUTPUT_DISCARDED = "discard"
STDERR_MERGED = "stdout"
NOTIFY_STATES = (protocol.STATE_FINISHED, protocol.STATE_KILLED, protocol.STATE_TIMED_OUT)

FIELDS = (
    "script",
    "args",
    "env",
    "max_runtime",
    "kill_grace",
    "stdout",
    "stderr",
    "start_at",
    "delay",
    "notify",
    "priority",
    "after",
    "slurm",
    "exclude",
)
NOTIFY_FIELDS = ("webhook", "email", "on", "smtp", "from")
#: tej.json's "slurm" object: sbatch settings, passed as arguments (never through a shell).
SLURM_FIELDS = (
    "partition",
    "time",
    "cpus",
    "memory",
    "nodes",
    "gpus",
    "account",
    "qos",
    "constraint",
    "extra_args",
)
MAX_PRIORITY = 1_000_000
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\Z")


def load_job_file(directory: str) -> dict[str, Any]:
    """The content of DIRECTORY/tej.json ({} when there is none)."""
    path = os.path.join(directory, JOB_FILE)
    if not os.path.lexists(path):
        return {}
    try:
        if os.path.getsize(path) > MAX_JOB_FILE_SIZE:
            raise InvalidInput(f"{path} is larger than {MAX_JOB_FILE_SIZE // 1024} KiB")
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"Can't read {path}: {exc}") from None
    if not text.strip():
        raise InvalidInput(f"{path} is empty: write {{}} for no metadata, or remove it")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a JSON object")
    return data


def build_job(
    from_file: Mapping[str, Any],
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's effective metadata: the command line wins over tej.json, tej.json over
    defaults (the user's settings, see tej.config), and those over tej's defaults.

    Overrides use the same names as tej.json; None means "not given". env and
    notify are merged key by key.
    """
    _check_keys(from_file, FIELDS, JOB_FILE)
    given = {key: value for key, value in overrides.items() if value is not None}
    if "start_at" in given or "delay" in given:
        from_file = {k: v for k, v in from_file.items() if k not in ("start_at", "delay")}
    layers = [defaults or {}, from_file, given]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    envs = [_env(layer["env"]) for layer in layers if "env" in layer]
    if len(envs) > 1:
        merged["env"] = {name: value for env in envs for name, value in env.items()}
    notifies = [_notify_mapping(layer["notify"]) for layer in layers if "notify" in layer]
    if len(notifies) > 1:
        merged["notify"] = {key: value for notify in notifies for key, value in notify.items()}
    return _validated(merged)


def exclude_patterns(from_file: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[str]:
    """The gitignore patterns of tej.json's "exclude" (or of the overrides', which win)."""
    value = overrides.get("exclude")
    if value is None:
        value = from_file.get("exclude", [])
    return _strings(value, "exclude")


def _validated(data: Mapping[str, Any]) -> dict[str, Any]:
    if "start_at" in data and "delay" in data:
        raise InvalidInput("Give start_at or delay, not both")
    job: dict[str, Any] = {
        "script": _relative_path(data.get("script", protocol.DEFAULT_SCRIPT), "script"),
        "args": _strings(data.get("args", []), "args"),
        "env": _env(data.get("env", {})),
        "kill_grace": duration(data.get("kill_grace", protocol.KILL_GRACE), "kill_grace"),
        "stdout": _output(data.get("stdout", OUTPUT_KEPT), "stdout"),
        "stderr": _output(data.get("stderr", OUTPUT_KEPT), "stderr"),
    }
    if data.get("max_runtime") is not None:
        job["max_runtime"] = duration(data["max_runtime"], "max_runtime")
    if "delay" in data:
        job["delay"] = duration(data["delay"], "delay", allow_zero=True)
    if "start_at" in data:
        job["start_at"] = parse_start_at(data["start_at"])
    if "notify" in data:
        job["notify"] = _notify(data["notify"])
    if data.get("priority") is not None:
        job["priority"] = _priority(data["priority"])
    if data.get("after"):
        job["after"] = _job_ids(data["after"], "after")
    if data.get("slurm") is not None:
        job["slurm"] = _slurm(data["slurm"])
    return job


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_PRIORITY:
        raise InvalidInput(
            f"priority must be a whole number from -{MAX_PRIORITY} to {MAX_PRIORITY}"
        )
    return value


def _job_ids(value: Any, field: str) -> list[str]:
    ids = _one_or_many(value, field)
    for job_id in ids:
        if protocol.job_id_problem(job_id):
            raise InvalidInput(f"Invalid job identifier {job_id!r} in {field}")
    return list(dict.fromkeys(ids))


def _slurm(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput('slurm must be an object of sbatch settings, such as {"cpus": 4}')
    _check_keys(value, SLURM_FIELDS, "slurm")
    slurm: dict[str, Any] = {}
    for key, item in value.items():
        if key == "time":
            slurm[key] = duration(item, "slurm.time")
        elif key in ("cpus", "nodes", "gpus"):
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise InvalidInput(f"slurm.{key} must be a positive whole number")
            slurm[key] = item
        elif key == "extra_args":
            slurm[key] = _strings(item, "slurm.extra_args")
            if any(not arg.startswith("-") for arg in slurm[key]):
                raise InvalidInput("slurm.extra_args must be sbatch options, such as --exclusive")
        else:
            if not isinstance(item, str) or not item.strip() or "\0" in item:
                raise InvalidInput(f"slurm.{key} must be a non-empty string")
            slurm[key] = item
    return slurm


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInput(f"Unknown key {key!r} in {where}{hint}")


def duration(value: Any, field: str, allow_zero: bool = False) -> float:
    """Seconds from a number or a text like "90", "90s", "15m", "2h", "1d", "1h30m"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidInput(f'{field} must be a duration such as 90, "15m" or "2h"')
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART.findall(text)
        if not parts or _DURATION_PART.sub("", text).strip():
            raise InvalidInput(f'Invalid duration for {field}: {value!r} (try "90s", "15m")')
        value = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    seconds = float(value)
    if not 0 <= seconds <= protocol.MAX_DURATION or (seconds == 0 and not allow_zero):
        raise InvalidInput(f"{field} must be a positive duration up to 10 years, not {value!r}")
    return seconds


def parse_start_at(value: Any) -> str:
    """Check an ISO 8601 time; returns it normalised (offset kept; naive means server time)."""
    if not isinstance(value, str):
        raise InvalidInput('start_at must be an ISO 8601 time, such as "2026-12-01T09:00:00"')
    text = value.strip()
    try:
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise InvalidInput(
            f"Invalid start_at {value!r}: use ISO 8601, such as 2026-12-01T09:00:00+01:00"
        ) from None
    return when.isoformat()


def _relative_path(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise InvalidInput(f"{field} must be the path of a file inside the job's directory")
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or parts[-1] in ("", "."):
        raise InvalidInput(f"{field} {value!r} must be a path inside the job's directory")
    return value


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput(f"{field} must be a list of strings")
    if any("\0" in item for item in value):
        raise InvalidInput(f"{field} can't contain NUL characters")
    return list(value)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidInput("env must be an object of NAME: value")
    for name, text in value.items():
        if not _ENV_NAME.match(str(name)):
            raise InvalidInput(f"Invalid environment variable name {name!r}")
        if not isinstance(text, str) or "\0" in text:
            raise InvalidInput(f"The value of env {name} must be a string (without NUL)")
    return dict(value)


def secret_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """Check secret environment variables (names like env's, string values)."""
    for name, value in secrets.items():
        if not _ENV_NAME.match(str(name)) or not isinstance(value, str):
            raise InvalidInput(f"Invalid secret {name!r}: use a variable name and a string value")
    return dict(secrets)


def _output(value: Any, field: str) -> str:
    special = (OUTPUT_KEPT, OUTPUT_DISCARDED) + ((STDERR_MERGED,) if field == "stderr" else ())
    if isinstance(value, str) and value in special:
        return value
    return _relative_path(value, field)


def _notify_mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput("notify must be an object with webhook, email, on, smtp")
    return value


def _notify(value: Any) -> dict[str, Any]:
    value = _notify_mapping(value)
    _check_keys(value, NOTIFY_FIELDS, "notify")
    webhooks = _one_or_many(value.get("webhook", []), "notify.webhook")
    emails = _one_or_many(value.get("email", []), "notify.email")
    for url in webhooks:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
            raise InvalidInput(f"Invalid webhook URL {url!r}: use http:// or https://")
    for address in emails:
        _email(address, "notify.email")
    states = _one_or_many(value.get("on", list(NOTIFY_STATES)), "notify.on")
    for state in states:
        if state not in NOTIFY_STATES:
            raise InvalidInput(
                f"Invalid state {state!r} in notify.on: use {', '.join(NOTIFY_STATES)}"
            )
    notify: dict[str, Any] = {"webhook": webhooks, "email": emails, "on": states}
    notify["smtp"] = _smtp(value.get("smtp", "localhost:25"))
    if "from" in value:
        notify["from"] = _email(value["from"], "notify.from")
    return notify


def _email(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise InvalidInput(f"Invalid email address in {field}: {value!r}")
    return value


def _one_or_many(value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    return _strings(items, field)


def _smtp(value: Any) -> str:
    text = value if isinstance(value, str) else ""
    host, _, port = text.rpartition(":")
    if not host.strip() or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"Invalid notify.smtp {value!r}: use host:port, such as localhost:25")
    return text
