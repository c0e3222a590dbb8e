"""tej.json and the options of `tej submit`: every mistake is one line, and nothing is sent.

Validation is tested twice: directly (`jobspec.load_job_file` / `jobspec.build_job`) and
through the real command line against `local`, where a refused job must leave no trace:
the queue directory is not even created. The accepted cases check the effective metadata
that `tej status --json` shows.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from helpers import run_tej, tej_env

from tej import jobspec
from tej.errors import InvalidInput, TejError

MISSING = object()


# helpers


def make_job(parent: Path, job_file: Any = MISSING, name: str = "job") -> Path:
    """A job directory with a quick start.sh, and tej.json (text as is, else as JSON)."""
    directory = parent / name
    directory.mkdir()
    start = directory / "start.sh"
    start.write_text("#!/bin/sh\necho hello\n")
    start.chmod(0o755)
    if job_file is not MISSING:
        text = job_file if isinstance(job_file, (str, bytes)) else json.dumps(job_file)
        path = directory / "tej.json"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    return directory


def build(data: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The effective metadata of a tej.json holding data (a dict), with overrides."""
    return jobspec.build_job(data, overrides or {})


def cli_env(home: Path) -> dict[str, str]:
    """The environment of tej commands: a private HOME (made here), no TEJ_*."""
    home.mkdir(exist_ok=True)
    return tej_env(HOME=str(home))


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Check for exit code 1 and exactly one `Error: ...` line on stderr; return the message."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(r"Error: [^\n]+\n", done.stderr), repr(done.stderr)
    return done.stderr[len("Error: ") :].rstrip("\n")


def submit_json(tmp_path: Path, job: Path, *options: str) -> dict[str, Any]:
    """Submit job to a local queue with options, wait for it, return `status --json`."""
    queue = str(tmp_path / "queue")
    home = tmp_path / "home"
    env = cli_env(home)
    done = run_tej("submit", "local", "--queue", queue, "--json", *options, str(job), env=env)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["id"]
    waited = run_tej("wait", "local", "--queue", queue, "--id", job_id, env=env)
    assert waited.returncode == 0, waited.stderr
    status = run_tej("status", "local", "--queue", queue, "--id", job_id, "--json", env=env)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert isinstance(document, dict)
    return document


# the contents of tej.json that are refused, and a part of each message

INVALID: list[Any] = [
    # unknown keys, with a suggestion
    ({"max_runtim": 5}, "Unknown key 'max_runtim' in tej.json (did you mean 'max_runtime'?)"),
    ({"scrpt": "a.sh"}, "did you mean 'script'?"),
    ({"notify": {"webhooks": "http://h/"}}, "Unknown key 'webhooks' in notify"),
    ({"notify": {"emial": "a@b.c"}}, "did you mean 'email'?"),
    ({"zzzzzz": 1}, "Unknown key 'zzzzzz'"),
    # wrong types, field by field
    ({"script": 5}, "script"),
    ({"script": ""}, "script"),
    ({"args": "--fast"}, "args must be a list of strings"),
    ({"args": ["-n", 3]}, "args must be a list of strings"),
    ({"env": ["A=1"]}, "env must be an object"),
    ({"env": {"A": 1}}, "env A must be a string"),
    ({"env": {"A": None}}, "env A must be a string"),
    ({"max_runtime": True}, "max_runtime must be a duration"),
    ({"max_runtime": [5]}, "max_runtime must be a duration"),
    ({"max_runtime": {"s": 5}}, "max_runtime must be a duration"),
    ({"kill_grace": None}, "kill_grace must be a duration"),
    ({"kill_grace": "soon"}, "kill_grace"),
    ({"delay": False}, "delay must be a duration"),
    ({"stdout": 1}, "stdout"),
    ({"stderr": ["x"]}, "stderr"),
    ({"stdout": ""}, "stdout"),
    ({"start_at": 1700000000}, "start_at must be an ISO 8601 time"),
    ({"notify": "me@example.org"}, "notify must be an object"),
    ({"notify": []}, "notify must be an object"),
    ({"notify": {"webhook": 5}}, "notify.webhook must be a list of strings"),
    ({"notify": {"webhook": ["http://h/", 5]}}, "notify.webhook must be a list of strings"),
    ({"notify": {"email": {"a": "b"}}}, "notify.email must be a list of strings"),
    ({"notify": {"on": "finished!"}}, "Invalid state 'finished!' in notify.on"),
    ({"notify": {"smtp": 25}}, "Invalid notify.smtp 25"),
    # bad durations
    ({"max_runtime": "abc"}, "Invalid duration for max_runtime: 'abc'"),
    ({"max_runtime": "-5"}, "Invalid duration for max_runtime: '-5'"),
    ({"max_runtime": -5}, "max_runtime must be a positive duration"),
    ({"max_runtime": 0}, "max_runtime must be a positive duration"),
    ({"max_runtime": "0s"}, "max_runtime must be a positive duration"),
    ({"max_runtime": "5x"}, "Invalid duration for max_runtime: '5x'"),
    ({"max_runtime": "h"}, "Invalid duration for max_runtime"),
    ({"max_runtime": ""}, "Invalid duration for max_runtime"),
    ({"max_runtime": "1h-30m"}, "Invalid duration for max_runtime"),
    ({"max_runtime": "99999999999999d"}, "max_runtime"),  # the supervisor can't arm it
    ({"delay": "-1m"}, "Invalid duration for delay"),
    ({"delay": "99999999999999d"}, "delay"),  # the status can't show when it starts
    ({"kill_grace": 0}, "kill_grace must be a positive duration"),
    # bad start times
    ({"start_at": "tomorrow"}, "Invalid start_at 'tomorrow'"),
    ({"start_at": "2030-13-01T00:00:00"}, "Invalid start_at"),
    ({"start_at": "2030-01-01T25:00:00"}, "Invalid start_at"),
    ({"start_at": ""}, "Invalid start_at"),
    ({"start_at": "2030-01-01T00:00:00", "delay": 5}, "Give start_at or delay, not both"),
    # environment
    ({"env": {"1A": "x"}}, "Invalid environment variable name '1A'"),
    ({"env": {"A-B": "x"}}, "Invalid environment variable name 'A-B'"),
    ({"env": {"A=B": "x"}}, "Invalid environment variable name 'A=B'"),
    ({"env": {"": "x"}}, "Invalid environment variable name ''"),
    ({"env": {"A": "x\u0000y"}}, "env"),  # no process can receive it
    ({"args": ["a\u0000b"]}, "args"),  # no process can receive it
    # output paths must stay in the job directory
    ({"stdout": "../x"}, "stdout '../x' must be a path inside the job's directory"),
    ({"stdout": "/tmp/x"}, "stdout '/tmp/x' must be a path inside the job's directory"),
    ({"stdout": "a/../../x"}, "must be a path inside the job's directory"),
    ({"stderr": "../err"}, "stderr '../err' must be a path inside the job's directory"),
    ({"stdout": "."}, "stdout"),  # the job directory itself is no file
    ({"stdout": "logs/"}, "stdout"),  # a folder is no file
    ({"script": "../start.sh"}, "script '../start.sh' must be a path inside"),
    ({"script": "/bin/sh"}, "script '/bin/sh' must be a path inside"),
    # notifications
    ({"notify": {"webhook": "ftp://example.org/"}}, "Invalid webhook URL 'ftp://example.org/'"),
    ({"notify": {"webhook": "example.org/hook"}}, "Invalid webhook URL"),
    ({"notify": {"webhook": "http://"}}, "Invalid webhook URL"),
    ({"notify": {"email": "nobody"}}, "Invalid email address in notify.email: 'nobody'"),
    ({"notify": {"email": ["a@b.c", "a@b@c"]}}, "Invalid email address in notify.email"),
    ({"notify": {"email": "a b@c.d"}}, "Invalid email address"),
    ({"notify": {"from": "nobody"}}, "Invalid email address in notify.from"),
    ({"notify": {"on": ["running"]}}, "Invalid state 'running' in notify.on"),
    ({"notify": {"on": ["finished", "lost"]}}, "Invalid state 'lost' in notify.on"),
    ({"notify": {"smtp": "localhost"}}, "Invalid notify.smtp 'localhost'"),
    ({"notify": {"smtp": "localhost:0"}}, "Invalid notify.smtp"),
    ({"notify": {"smtp": "localhost:65536"}}, "Invalid notify.smtp"),
    ({"notify": {"smtp": ":25"}}, "Invalid notify.smtp"),
    ({"notify": {"smtp": "localhost:smtp"}}, "Invalid notify.smtp"),
]

# tej.json files that are not a JSON object at all
BAD_FILES: list[Any] = [
    pytest.param("", "is empty", id="empty"),
    pytest.param("  \n\t\n", "is empty", id="blank"),
    pytest.param("[]", "must hold a JSON object", id="list"),
    pytest.param('"start.sh"', "must hold a JSON object", id="string"),
    pytest.param("null", "must hold a JSON object", id="null"),
    pytest.param("3", "must hold a JSON object", id="number"),
    pytest.param("{", "is not valid JSON", id="truncated"),
    pytest.param("{'script': 'a.sh'}", "is not valid JSON", id="single-quotes"),
    pytest.param('{"a": 1,}', "is not valid JSON", id="trailing-comma"),
    pytest.param(b'{"script": "\xff.sh"}', "Can't read", id="not-utf8"),
    pytest.param("{}" + " " * (1 << 20), "larger than 1024 KiB", id="huge"),
]


def invalid_params() -> list[Any]:
    """INVALID as pytest parameters, each named after its tej.json."""
    return [pytest.param(data, message, id=json.dumps(data)[:60]) for data, message in INVALID]


# validation, called directly


@pytest.mark.parametrize(("data", "message"), invalid_params())
def test_invalid_metadata_is_refused(tmp_path: Path, data: Any, message: str) -> None:
    job = make_job(tmp_path, data)
    with pytest.raises(InvalidInput) as caught:
        jobspec.build_job(jobspec.load_job_file(str(job)), {})
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(caught.value, TejError)


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_unreadable_job_file_is_refused(tmp_path: Path, text: Any, message: str) -> None:
    job = make_job(tmp_path, text)
    with pytest.raises(InvalidInput) as caught:
        jobspec.load_job_file(str(job))
    assert message in str(caught.value)
    assert "tej.json" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_job_file_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    (job / "tej.json").mkdir()
    with pytest.raises(InvalidInput, match="Can't read"):
        jobspec.load_job_file(str(job))


def test_no_job_file_means_defaults(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    assert jobspec.load_job_file(str(job)) == {}
    assert build({}) == {
        "script": "start.sh",
        "args": [],
        "env": {},
        "kill_grace": 5.0,
        "stdout": "tej",
        "stderr": "tej",
    }


def test_a_job_file_of_one_mebibyte_is_read(tmp_path: Path) -> None:
    text = '{"args": ["' + "x" * ((1 << 20) - 20) + '"]}'
    job = make_job(tmp_path, text.ljust(1 << 20))
    assert len(jobspec.load_job_file(str(job))["args"][0]) == (1 << 20) - 20


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("1.5h", 5400.0),
    ],
)
def test_good_durations(value: Any, seconds: float) -> None:
    assert build({"max_runtime": value})["max_runtime"] == seconds
    assert build({"kill_grace": value})["kill_grace"] == seconds
    assert build({"delay": value})["delay"] == seconds


def test_a_zero_delay_is_allowed() -> None:
    assert build({"delay": 0})["delay"] == 0


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("2030-01-02T03:04:05", "2030-01-02T03:04:05"),
        ("2030-01-02T03:04:05+02:00", "2030-01-02T03:04:05+02:00"),
        ("2030-01-02T03:04:05Z", "2030-01-02T03:04:05+00:00"),
        ("2030-01-02 03:04", "2030-01-02T03:04:00"),
    ],
)
def test_good_start_times(value: str, normalised: str) -> None:
    job = build({"start_at": value})
    assert job["start_at"] == normalised
    assert "delay" not in job


def test_every_field_at_once(tmp_path: Path) -> None:
    data = {
        "script": "bin/run.sh",
        "args": ["--epochs", "10"],
        "env": {"OMP_NUM_THREADS": "4", "_X": ""},
        "max_runtime": "2h",
        "kill_grace": "30s",
        "stdout": "logs/train.log",
        "stderr": "stdout",
        "delay": "10m",
        "notify": {
            "webhook": "https://hooks.example.org/tej",
            "email": ["me@example.org"],
            "on": ["finished", "timed_out"],
            "smtp": "mail.example.org:587",
            "from": "tej@example.org",
        },
    }
    assert build(data) == {
        "script": "bin/run.sh",
        "args": ["--epochs", "10"],
        "env": {"OMP_NUM_THREADS": "4", "_X": ""},
        "max_runtime": 7200.0,
        "kill_grace": 30.0,
        "stdout": "logs/train.log",
        "stderr": "stdout",
        "delay": 600.0,
        "notify": {
            "webhook": ["https://hooks.example.org/tej"],
            "email": ["me@example.org"],
            "on": ["finished", "timed_out"],
            "smtp": "mail.example.org:587",
            "from": "tej@example.org",
        },
    }


def test_notify_defaults() -> None:
    assert build({"notify": {"webhook": "http://127.0.0.1:9/x"}})["notify"] == {
        "webhook": ["http://127.0.0.1:9/x"],
        "email": [],
        "on": ["finished", "killed", "timed_out"],
        "smtp": "localhost:25",
    }


@pytest.mark.parametrize("keyword", ["tej", "discard"])
def test_output_keywords(keyword: str) -> None:
    assert build({"stdout": keyword, "stderr": keyword})["stdout"] == keyword


def test_stderr_can_go_to_stdout() -> None:
    assert build({"stderr": "stdout"})["stderr"] == "stdout"


def test_stdout_named_stdout_is_a_file_in_the_job() -> None:
    # "stdout" is a keyword for stderr only: for stdout it is a plain relative path
    # (docs/tej-json.md), which the agent resolves inside the job's directory.
    assert build({"stdout": "stdout"})["stdout"] == "stdout"


def test_output_paths_inside_the_job() -> None:
    job = build({"stdout": "out/log.txt", "stderr": "out/err.txt"})
    assert (job["stdout"], job["stderr"]) == ("out/log.txt", "out/err.txt")


# the command line wins over tej.json, which wins over the defaults


def test_overrides_win_over_the_job_file() -> None:
    from_file = {
        "script": "a.sh",
        "max_runtime": "1h",
        "env": {"A": "file", "B": "file"},
        "stdout": "discard",
        "notify": {"webhook": "http://file/", "on": ["timed_out"]},
    }
    job = build(
        from_file,
        {
            "script": "b.sh",
            "max_runtime": "15m",
            "env": {"B": "cli", "C": "cli"},
            "stdout": None,  # None: not given on the command line
            "notify": {"webhook": ["http://cli/"]},
        },
    )
    assert job["script"] == "b.sh"
    assert job["max_runtime"] == 900.0
    assert job["env"] == {"A": "file", "B": "cli", "C": "cli"}
    assert job["stdout"] == "discard"
    assert job["notify"]["webhook"] == ["http://cli/"]
    assert job["notify"]["on"] == ["timed_out"]


@pytest.mark.parametrize(
    ("from_file", "overrides", "expected"),
    [
        ({"start_at": "2030-01-01T00:00:00"}, {"delay": "5s"}, {"delay": 5.0}),
        ({"delay": "1h"}, {"start_at": "2030-01-01T00:00:00"}, {"start_at": "2030-01-01T00:00:00"}),
        ({"delay": "1h"}, {"delay": "2s"}, {"delay": 2.0}),
    ],
)
def test_a_start_override_replaces_both_start_fields(
    from_file: dict[str, Any], overrides: dict[str, Any], expected: dict[str, Any]
) -> None:
    job = build(from_file, overrides)
    assert {key: job[key] for key in ("start_at", "delay") if key in job} == expected


def test_overrides_are_validated_too() -> None:
    with pytest.raises(InvalidInput, match="Give start_at or delay, not both"):
        build({}, {"start_at": "2030-01-01T00:00:00", "delay": "5s"})
    with pytest.raises(InvalidInput, match="Invalid duration for max_runtime: 'soon'"):
        build({"max_runtime": "1h"}, {"max_runtime": "soon"})
    with pytest.raises(InvalidInput, match="Invalid environment variable name"):
        build({"env": {"A": "1"}}, {"env": {"B C": "2"}})


def test_unknown_keys_are_refused_even_with_overrides() -> None:
    with pytest.raises(InvalidInput, match="did you mean 'delay'"):
        build({"dealy": 5}, {"delay": 5})


# through the command line: one line, exit code 1, nothing reaches the server

# Options of `tej submit` that are refused (with a part of the message).
INVALID_OPTIONS: list[tuple[Sequence[str], str]] = [
    (["--max-runtime", "abc"], "Invalid duration for max_runtime: 'abc'"),
    (["--max-runtime", "0"], "max_runtime must be a positive duration"),
    (["--max-runtime", "-5"], "Invalid duration for max_runtime"),
    (["--delay", "5x"], "Invalid duration for delay: '5x'"),
    (["--start-at", "next monday"], "Invalid start_at 'next monday'"),
    (["--start-at", "2030-01-01T00:00:00", "--delay", "5"], "Give start_at or delay, not both"),
    (["--env", "NOEQUALS"], "Invalid --env 'NOEQUALS': use NAME=VALUE"),
    (["--env", "=x"], "Invalid --env"),
    (["--env", "1A=x"], "Invalid environment variable name '1A'"),
    (["--stdout", "../x"], "must be a path inside the job's directory"),
    (["--stderr", "/tmp/err"], "must be a path inside the job's directory"),
    (["--script", "../start.sh"], "must be a path inside"),
    (["--webhook", "ftp://h/"], "Invalid webhook URL 'ftp://h/'"),
    (["--email", "nobody"], "Invalid email address in notify.email: 'nobody'"),
]


def refused_by_cli(tmp_path: Path, job: Path, options: Sequence[str]) -> str:
    """Submit job with options to a fresh local queue; check it is refused; return the message."""
    queue = tmp_path / "queue"
    try:
        env = cli_env(tmp_path / "home")
        done = run_tej("submit", "local", "--queue", str(queue), *options, str(job), env=env)
    finally:
        stop_supervisors(queue)
    message = one_error_line(done)
    assert done.stdout == "", done.stdout
    assert not queue.exists(), "a refused job reached the server"
    return message


def stop_supervisors(queue: Path) -> None:
    """SIGTERM the supervisor of every active job in queue (a submit wrongly accepted)."""
    for status_file in queue.glob("jobs/*/status.json"):
        record = json.loads(status_file.read_text())
        pid = (record.get("supervisor") or {}).get("pid")
        if record.get("state") not in ("scheduled", "running") or not pid:
            continue
        with contextlib.suppress(OSError):  # a supervisor's stderr is its supervisor.log
            if os.readlink(f"/proc/{pid}/fd/2") == str(status_file.parent / "supervisor.log"):
                os.kill(pid, signal.SIGTERM)


def describe(job: Path, options: Sequence[str]) -> str:
    """A case of the CLI tests: its tej.json (shortened) and options."""
    path = job / "tej.json"
    content = path.read_bytes()[:60] if path.is_file() else b"no tej.json"
    return f"{content!r} {' '.join(options)}"


def check_all(cases: Sequence[tuple[Path, Path, Sequence[str], str]]) -> None:
    """Run refused_by_cli for (tmp, job, options, message) cases concurrently; report all."""

    def check(case: tuple[Path, Path, Sequence[str], str]) -> str | None:
        tmp, job, options, message = case
        try:
            text = refused_by_cli(tmp, job, options)
        except AssertionError as exc:
            return f"{describe(job, options)}: {str(exc).splitlines()[0]}"
        if message not in text:
            return f"{describe(job, options)}: {message!r} not in {text!r}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        failures = [failure for failure in pool.map(check, cases) if failure]
    assert not failures, "\n".join(failures)


def test_cli_refuses_every_invalid_job_file(tmp_path: Path) -> None:
    cases = []
    for i, (data, message) in enumerate(INVALID):
        case_tmp = tmp_path / f"case{i:02d}"
        case_tmp.mkdir()
        cases.append((case_tmp, make_job(case_tmp, data, name=f"json{i:02d}"), (), message))
    check_all(cases)


def test_cli_refuses_every_unreadable_job_file(tmp_path: Path) -> None:
    cases = []
    for param in BAD_FILES:
        text, message = param.values
        case_tmp = tmp_path / param.id
        case_tmp.mkdir()
        cases.append((case_tmp, make_job(case_tmp, text, name=param.id), (), message))
    check_all(cases)


def test_cli_refuses_every_invalid_option(tmp_path: Path) -> None:
    cases = []
    for i, (options, message) in enumerate(INVALID_OPTIONS):
        case_tmp = tmp_path / f"case{i:02d}"
        case_tmp.mkdir()
        cases.append((case_tmp, make_job(case_tmp, name=f"opt{i:02d}"), options, message))
    check_all(cases)


def test_cli_names_the_unknown_key_and_suggests_one(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"max_runtim": "5m"})
    message = refused_by_cli(tmp_path, job, ())
    assert message == "Unknown key 'max_runtim' in tej.json (did you mean 'max_runtime'?)"


# the effective metadata is stored with the job and shown by `tej status --json`


def test_status_shows_the_effective_metadata(tmp_path: Path) -> None:
    job = make_job(
        tmp_path,
        {
            "max_runtime": "1h",
            "kill_grace": "2s",
            "env": {"A": "file", "B": "file"},
            "stdout": "out/log.txt",
            "start_at": "2000-01-01T00:00:00+00:00",
            "args": ["x"],
        },
    )
    status = submit_json(
        tmp_path,
        job,
        "--max-runtime",
        "90s",
        "--env",
        "B=cli",
        "--env",
        "C=cli=with=equals",
        "--delay",
        "0",
        "--stderr",
        "stdout",
    )
    metadata = status["metadata"]
    assert metadata["id"] == status["id"]
    assert metadata["max_runtime"] == 90.0
    assert metadata["kill_grace"] == 2.0
    assert metadata["env"] == {"A": "file", "B": "cli", "C": "cli=with=equals"}
    assert metadata["stdout"] == "out/log.txt"
    assert metadata["stderr"] == "stdout"
    assert metadata["delay"] == 0
    assert "start_at" not in metadata  # --delay replaced tej.json's start_at
    assert metadata["args"] == ["x"]
    assert metadata["script"] == "start.sh"
    assert status["state"] == "finished"


def test_cli_start_at_replaces_the_job_files_delay(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"delay": "1h"})
    past = (datetime.now(timezone.utc) - timedelta(minutes=5)).replace(microsecond=0)
    status = submit_json(tmp_path, job, "--start-at", past.isoformat())
    assert status["metadata"]["start_at"] == past.isoformat()
    assert "delay" not in status["metadata"]
    assert status["state"] == "finished"  # a start time in the past means now


def test_cli_webhook_and_email_replace_the_job_files_lists(tmp_path: Path) -> None:
    job = make_job(
        tmp_path,
        {
            "max_runtime": 60,
            "notify": {"webhook": "http://file.invalid/", "email": "file@x.y", "on": ["killed"]},
        },
    )
    status = submit_json(tmp_path, job, "--webhook", "http://cli.invalid/a", "--email", "c@x.y")
    notify = status["metadata"]["notify"]
    assert notify["webhook"] == ["http://cli.invalid/a"]
    assert notify["email"] == ["c@x.y"]
    assert notify["on"] == ["killed"]  # kept from tej.json: a finished job notifies nobody
    assert status["notifications"] == []
    assert status["metadata"]["max_runtime"] == 60.0


def test_job_file_metadata_is_stored_without_overrides(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"env": {"GREETING": "hi"}, "stdout": "discard", "max_runtime": 30})
    status = submit_json(tmp_path, job)
    metadata = status["metadata"]
    assert metadata["env"] == {"GREETING": "hi"}
    assert metadata["stdout"] == "discard"
    assert metadata["max_runtime"] == 30.0
    assert "notify" not in metadata
