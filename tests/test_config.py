"""Settings from ~/.config/tej/config.toml: where each comes from, `tej config`, bad files,
and their effect on real commands (over `local` and the loopback sshd)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CLI_TIMEOUT,
    CliResult,
    Target,
    assert_one_line_error,
    client_side,
    ssh_target,
    wait_until,
)

from tej.config import glob_match

SETTINGS = """\
connect_timeout = 10
python = "py-global"
persist = 100

[host."gpu*"]
python = "py-host"
queue = "/q/host"
max_runtime = "12h"

[host."g*"]
queue = "/never"
ssh_config = "/never"
"""


class Client:
    """`tej` run as a subprocess with its own HOME, environment and settings file."""

    def __init__(self, tmp_path: Path) -> None:
        self.env, self.home, self.cwd, _ = client_side(tmp_path)
        self.path = self.home / ".config" / "tej" / "config.toml"

    def write(self, text: str) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        return self.path

    def run(self, *args: str, **env: str) -> CliResult:
        argv = [sys.executable, "-m", "tej", *args]
        done = subprocess.run(
            argv,
            capture_output=True,
            cwd=self.cwd,
            env={**self.env, **env},
            timeout=CLI_TIMEOUT,
            check=False,
        )
        result = CliResult(argv, done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def settings(self, *args: str, **env: str) -> dict[str, Any]:
        done = self.run("config", *args, "--json", **env)
        assert done.returncode == 0, done
        document: dict[str, Any] = json.loads(done.stdout)
        return document


@pytest.fixture
def client(tmp_path: Path) -> Client:
    return Client(tmp_path)


def origin(document: dict[str, Any], name: str) -> tuple[Any, str, str | None]:
    setting = document["settings"][name]
    return setting["value"], setting["source"], setting["detail"]


# -- where each setting comes from -------------------------------------------------


def test_each_setting_comes_from_the_first_place_that_has_it(client: Client) -> None:
    client.write(SETTINGS)
    document = client.settings("gpu1", "--persist", "7", TEJ_QUEUE="/q/env")
    assert document["file"] == str(client.path)
    assert document["file_found"] is True
    assert origin(document, "persist") == (7, "command line", None)
    assert origin(document, "queue") == ("/q/env", "environment", "TEJ_QUEUE")
    assert origin(document, "python") == ("py-host", "host section", "gpu*")
    assert origin(document, "max_runtime") == ("12h", "host section", "gpu*")
    assert origin(document, "ssh_config") == (None, "default", None)  # g* is never reached
    assert origin(document, "connect_timeout") == (10, "global section", None)
    assert origin(document, "no_reuse") == (False, "default", None)
    document = client.settings("gpu1", "--queue", "/q/cli", TEJ_QUEUE="/q/env")
    assert origin(document, "queue") == ("/q/cli", "command line", None)
    document = client.settings("other", "--reuse", TEJ_NO_REUSE="1")
    assert origin(document, "no_reuse") == (False, "command line", None)
    assert origin(document, "queue") == ("~/.tej", "default", None)
    assert origin(document, "python") == ("py-global", "global section", None)


def test_the_text_says_where_each_setting_comes_from(client: Client) -> None:
    client.write(SETTINGS)
    done = client.run("config", "gpu1", "--connect-timeout", "3", TEJ_PERSIST="9")
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == f"Settings for gpu1 (from {client.path}):"
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[1:]}
    assert rows["queue"] == ["/q/host", '[host."gpu*"]']
    assert rows["connect_timeout"] == ["3", "command line"]
    assert rows["persist"] == ["9", "environment TEJ_PERSIST"]
    assert rows["ssh_config"] == ["-", "default"]
    # g* matches gpu1 too, but only the first match counts: said, not an error
    assert done.stderr == "Note: [host.\"g*\"] matches 'gpu1' too, but the first match wins\n"


def test_without_a_file_everything_is_a_default(client: Client, tmp_path: Path) -> None:
    document = client.settings("somehost")
    assert document["file_found"] is False
    assert document["file"] == str(client.path)
    assert {setting["source"] for setting in document["settings"].values()} == {"default"}
    assert origin(document, "connect_timeout") == (15, "default", None)
    assert origin(document, "persist") == (60, "default", None)


def test_xdg_config_home_moves_the_file(client: Client, tmp_path: Path) -> None:
    client.write('queue = "/from/home"\n')
    elsewhere = tmp_path / "xdg"
    (elsewhere / "tej").mkdir(parents=True)
    (elsewhere / "tej" / "config.toml").write_text('queue = "/from/xdg"\n')
    document = client.settings("h", XDG_CONFIG_HOME=str(elsewhere))
    assert origin(document, "queue") == ("/from/xdg", "global section", None)
    assert origin(client.settings("h"), "queue") == ("/from/home", "global section", None)


def test_a_section_that_matches_nothing_is_not_an_error(client: Client) -> None:
    client.write('[host."nowhere*"]\nqueue = "/q"\n')
    done = client.run("config", "somehost")
    assert done.returncode == 0, done
    assert "no [host" in done.stderr and "'somehost'" in done.stderr
    document = client.settings("somehost")
    assert document["notes"] and origin(document, "queue")[1] == "default"


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("gpu*", "gpu1", True),
        ("gpu*", "gpu", True),
        ("gpu*", "agpu1", False),
        ("*.example.org", "alice@node.example.org", True),
        ("a*b*c", "abc", True),
        ("a*b*c", "acb", False),
        ("a*a", "a", False),
        ("*", "anything", True),
        ("ssh://[::1]:2222", "ssh://[::1]:2222", True),  # brackets are plain characters
        ("node?", "node1", False),  # only * is a glob
    ],
)
def test_host_patterns(pattern: str, text: str, matches: bool) -> None:
    assert glob_match(pattern, text) is matches


# -- bad files ----------------------------------------------------------------------

BAD_FILES = [
    ("queue = \n", "line 1"),
    ('connect_timeout = 10\n[host."a"\nqueue = "x"\n', "line 2"),
    ('qeue = "/q"\n', "unknown key 'qeue' (did you mean 'queue'?)"),
    (
        '[host."gpu*"]\npyhton = "p"\n',
        "unknown key 'pyhton' in [host.\"gpu*\"] (did you mean 'python'?)",
    ),
    ('[hosts."gpu*"]\nqueue = "/q"\n', "unknown key 'hosts' (did you mean 'host'?)"),
    ('[host."a".host]\nqueue = "/q"\n', "unknown key 'host' in [host.\"a\"]"),
    ('connect_timeout = "10"\n', "connect_timeout must be a whole number from 1 to 3600"),
    ("persist = 0\n", "persist must be a whole number from 1 to 604800"),
    ('no_reuse = "yes"\n', "no_reuse must be true or false"),
    ('[host."a"]\nqueue = 3\n', 'queue in [host."a"] must be a non-empty string'),
    ('env = ["A=1"]\n', "env must be a table of strings"),
    ('host = "gpu"\n', "host must be tables"),
    ("\xff", "not UTF-8 text"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_a_bad_file_is_a_one_line_error(client: Client, text: str, expected: str) -> None:
    path = client.write("")
    path.write_bytes(text.encode("latin-1"))
    for args in (["config", "gpu1"], ["status", "local", "--id", "x"]):
        message = assert_one_line_error(client.run(*args), 1)
        assert message.startswith(f"Error: {path}: "), message
        assert expected in message, message
    document = json.loads(client.run("list", "local", "--json").stdout)
    assert document["error"] == "InvalidInput"


def test_a_bad_submit_setting_is_refused_before_anything_is_sent(
    client: Client, tmp_path: Path
) -> None:
    client.write('max_runtime = 5\n[host."local"]\nmax_runtime = "12x"\n')
    message = assert_one_line_error(client.run("config", "local"), 1)
    assert message.startswith(f'Error: {client.path}, [host."local"]: '), message
    assert "'12x'" in message
    job = tmp_path / "job"
    job.mkdir()
    (job / "start.sh").write_text("#!/bin/sh\ntrue\n")
    queue = tmp_path / "queue"
    done = client.run("submit", "local", "--queue", str(queue), str(job))
    assert "'12x'" in assert_one_line_error(done, 1)
    assert not queue.exists()


# -- their effect ---------------------------------------------------------------------


def run_bare(target: Target, *args: str) -> CliResult:
    """`tej ARGS` with nothing added: no --queue, no --ssh-config (the settings give them)."""
    argv = [sys.executable, "-m", "tej", *args]
    done = subprocess.run(
        argv,
        capture_output=True,
        cwd=target.client_dir,
        env=target.client_env,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    result = CliResult(argv, done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def host_settings(target: Target, extra: str = "") -> str:
    lines = [f'[host."{target.destination}"]', f"queue = {json.dumps(target.queue)}"]
    if target.ssh_config:
        lines.append(f"ssh_config = {json.dumps(target.ssh_config)}")
    return "\n".join(lines) + "\n" + extra


def test_the_settings_give_the_queue_and_the_submit_defaults(target: Target) -> None:
    target.write_settings(
        'env = {A = "global", B = "global"}\nmax_runtime = 60\n'
        + host_settings(target, 'env = {A = "host", B = "host", C = "host"}\nmax_runtime = "2h"\n')
    )
    job = target.make_job(
        "job", "#!/bin/sh\necho $A $B $C $D\n", files={"tej.json": '{"env": {"B": "file"}}'}
    )
    done = run_bare(target, "submit", target.destination, str(job), "--env", "C=cli", "--wait")
    assert done.returncode == 0, done
    job_id = done.stdout.splitlines()[1]
    assert target.job_dir(job_id).is_dir()  # the queue named by the settings
    status = json.loads(
        run_bare(target, "status", target.destination, "--id", job_id, "--json").stdout
    )
    assert status["metadata"]["env"] == {"A": "host", "B": "file", "C": "cli"}
    assert status["metadata"]["max_runtime"] == 7200
    logs = run_bare(target, "logs", target.destination, "--id", job_id)
    assert logs.stdout == "host file cli\n"
    # tej.json, then the command line, win over the settings
    job2 = target.make_job("job2", files={"tej.json": '{"max_runtime": "1h"}'})
    job_id = target.submit(job2)
    status = json.loads(target.cli("status", "--id", job_id, "--json", check=0).stdout)
    assert status["metadata"]["max_runtime"] == 3600
    job_id = target.submit(job2, "--max-runtime", "90")
    status = json.loads(target.cli("status", "--id", job_id, "--json", check=0).stdout)
    assert status["metadata"]["max_runtime"] == 90


def test_the_settings_give_notifications(target: Target) -> None:
    target.write_settings(
        'webhook = "http://127.0.0.1:9/hook"\nnotify = {on = ["killed"], email = "a@b.org"}\n'
        + host_settings(target)
    )
    job_id = target.submit(target.make_job(), "--email", "me@example.org")
    status = json.loads(target.cli("status", "--id", job_id, "--json", check=0).stdout)
    notify = status["metadata"]["notify"]
    assert notify["webhook"] == ["http://127.0.0.1:9/hook"]
    assert notify["email"] == ["me@example.org"]  # the command line wins
    assert notify["on"] == ["killed"]


@pytest.mark.ssh
def test_persist_sets_how_long_the_shared_connection_stays(
    ssh_server: Any, server_tmp: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target = ssh_target(ssh_server, server_tmp, tmp_path)
    runtime = Path(tempfile.mkdtemp(prefix="tej-rt-"))  # short: a socket's path has a limit
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    target.client_env["XDG_RUNTIME_DIR"] = str(runtime)
    sockets = runtime / f"tej-ssh-{os.getuid()}"

    def masters() -> list[str]:
        return os.listdir(sockets) if sockets.is_dir() else []

    target.write_settings(host_settings(target, "persist = 2\n"))
    assert run_bare(target, "list", target.destination).returncode == 0
    wait_until(lambda: not masters(), 20, "the shared connection to close after 2 s")
    target.write_settings(host_settings(target, "persist = 600\n"))
    try:
        assert run_bare(target, "list", target.destination).returncode == 0
        wait_until(masters, 10, "the shared connection to stay")
        assert run_bare(target, "list", target.destination, "--no-reuse").returncode == 0
    finally:
        for name in masters():
            subprocess.run(
                [
                    "ssh",
                    "-F",
                    target.ssh_config or "",
                    "-S",
                    str(sockets / name),
                    "-O",
                    "exit",
                    "x",
                ],
                capture_output=True,
                timeout=10,
                check=False,
            )
    wait_until(lambda: not masters(), 10, "the shared connection to close")
