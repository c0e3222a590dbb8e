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
OUTPUT_KEPT = protocol.OUTPUT_KEPT
OUTPUT_DISCARDED = protocol.OUTPUT_DISCARDED
STDERR_MERGED = protocol.STDERR_MERGED
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
    "exclude",
    "retries",
    "array",
)
NOTIFY_FIELDS = ("webhook", "email", "on", "smtp", "from")
_ENV_NAME = re.compile(protocol.ENV_NAME_REGEX)
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
    _check_keys(from_file, FIELDS + tuple(runner_fields()), JOB_FILE)
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
    if data.get("retries") is not None:
        job["retries"] = retries(data["retries"])
    if data.get("array") is not None:
        job["array"] = array_field(data["array"], data.get("max_parallel"))
    elif data.get("max_parallel") is not None:
        raise InvalidInput("--max-parallel is for an array (--array or --params)")
    job.update(_runner_fields(data))
    return job


def runner_fields() -> dict[str, str]:
    """The job fields that only some runners take, each with the built-in runner that owns it."""
    from tej.server.runners import builtin_fields

    return builtin_fields()  # type: ignore[no-any-return]


def _runner_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The runners' fields of a job, checked by the runners that own them."""
    from tej.server.runners import builtin_module

    fields: dict[str, Any] = {}
    for name in dict.fromkeys(runner_fields()[key] for key in data if key in runner_fields()):
        try:
            fields.update(builtin_module(name).check_fields(data))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    return fields


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInput(f"Unknown key {key!r} in {where}{hint}")


def duration(value: Any, field: str, allow_zero: bool = False) -> float:
    """Seconds from a number or a text like "90", "90s", "15m", "2h", "1d", "1h30m"."""
    try:
        return protocol.parse_duration(value, field, allow_zero)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def retries(value: Any) -> dict[str, Any]:
    """tej.json's "retries" (or --retries N), checked and normalized (see tej.protocol)."""
    try:
        return protocol.check_retries(value)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


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


def array_field(value: Any, max_parallel: Any = None) -> dict[str, Any]:
    """tej.json's "array" (a spec such as "0-99%8"; or the stored form, {"indexes": SPEC,
    "max_parallel": N}) with --max-parallel: {"indexes": SPEC without %N, "max_parallel": N}."""
    stored = None
    if isinstance(value, Mapping):
        stored, value = value.get("max_parallel"), value.get("indexes")
    try:
        _, percent = protocol.parse_array_spec(value)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if max_parallel is not None:
        if percent is not None:
            raise InvalidInput("Give %N in the array spec or --max-parallel, not both")
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise InvalidInput("--max-parallel must be a whole number of 1 or more")
        percent = max_parallel
    spec = str(value).strip().partition("%")[0].strip()
    return {"indexes": spec, "max_parallel": percent if percent is not None else stored}


def read_params_file(path: str) -> list[dict[str, str]]:
    """The rows of a --params file: CSV with a header, or JSON lines of flat objects."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(64 << 20)
    except OSError as exc:
        raise InvalidInput(f"Can't read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's CSV may begin with a BOM
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise InvalidInput(f"{path} is empty: give a header and one row per task")
    if "\0" in text:
        raise InvalidInput(f"{path} holds a NUL character")
    start = text.lstrip()[:1]
    if start == "[":
        raise InvalidInput(f"{path}: JSON lines hold one object per line, not an array")
    rows = _json_rows(text, path) if start == "{" else _csv_rows(text, path)
    check_params(rows, path)
    return rows


def _csv_rows(text: str, path: str) -> list[dict[str, str]]:
    import csv
    import io

    try:  # strict: a quote left open is an error, not a value that runs to the end
        lines = [row for row in csv.reader(io.StringIO(text), strict=True) if row]
    except csv.Error as exc:
        raise InvalidInput(f"{path} is not valid CSV: {exc}") from None
    header = lines[0]
    _check_columns(header, path)
    rows = []
    for number, values in enumerate(lines[1:], 2):
        if len(values) != len(header):
            raise InvalidInput(
                f"{path}, line {number}: {len(values)} values for {len(header)} columns"
            )
        rows.append(dict(zip(header, values)))
        if len(rows) > protocol.MAX_ARRAY_TASKS:
            break
    return rows


def _json_rows(text: str, path: str) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            pairs = json.loads(line, object_pairs_hook=lambda items: items)
        except ValueError as exc:
            raise InvalidInput(f"{path}, line {number}: not JSON ({exc})") from None
        if not isinstance(pairs, list):
            raise InvalidInput(f"{path}, line {number}: not a JSON object")
        _check_columns([key for key, _ in pairs], f"{path}, line {number}")
        row = {}
        for key, value in pairs:
            if isinstance(value, (dict, list)) or value is None:
                raise InvalidInput(f"{path}, line {number}: {key} must be a string or a number")
            row[key] = value if isinstance(value, str) else json.dumps(value)
        rows.append(row)
        if len(rows) > protocol.MAX_ARRAY_TASKS:
            break
    return rows


def _check_columns(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if not _ENV_NAME.match(name):
            raise InvalidInput(f"{where}: invalid column name {name!r} (use letters, digits, _)")
        if name in seen:
            raise InvalidInput(f"{where}: the column {name!r} is given twice")
        seen.add(name)


def check_params(rows: Any, where: str = "params") -> str:
    """Check params rows (a list of flat dicts of names to strings); their JSON lines text."""
    if not isinstance(rows, list) or not rows:
        raise InvalidInput(f"{where} has no rows: give one row per task")
    if len(rows) > protocol.MAX_ARRAY_TASKS:
        raise InvalidInput(f"{where} has more than {protocol.MAX_ARRAY_TASKS} rows (the limit)")
    lines = []
    for number, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidInput(f"{where}: row {number} is not a mapping")
        _check_columns(list(row), f"{where}, row {number}")
        for key, value in row.items():
            if not isinstance(value, str) or "\0" in value:
                raise InvalidInput(f"{where}, row {number}: {key} must be a string without NUL")
        lines.append(json.dumps(dict(row), separators=(",", ":")))
    return "\n".join(lines)
