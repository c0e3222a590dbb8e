"""The `tej` command starts the agent while its command line loads, and never leaves it behind.

tej.launcher guesses the destination and connection options of a queue command from its
arguments and starts the agent's process first; the session takes that process over only
if it would have started the very same command, and any process nobody took over ends with
the command. These tests count the agent's starts with a --python wrapper that records them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INSTALLED, process_alive, run_tej, wait_until

from tej.launcher import connection_arguments

DEADLINE = 60.0


@pytest.fixture(autouse=True)
def no_tej_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TEJ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no settings file


# reading the arguments


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "host", "--id", "x"], {}),
        (["list", "user@host", "--json"], {}),
        (["status", "h", "--python", "py", "--id", "x"], {"--python": "py"}),
        (["status", "h", "--python=py3 -u", "--ssh-config", "cfg"], {"--python": "py3 -u"}),
        (["list", "h", "--connect-timeout", "5", "--no-reuse"], {"--connect-timeout": "5"}),
        (["list", "h", "--persist=600", "--reuse"], {"--persist": "600"}),
        (["sync", "h", "--id", "x", "--to", "out", "--delete"], {}),
    ],
)
def test_the_connection_options_are_found(args: list[str], expected: dict[str, str]) -> None:
    found = connection_arguments(args)
    assert found is not None
    assert found["destination"] == args[1]
    if "--no-reuse" in args or "--reuse" in args:
        assert found["--no-reuse"] == ("--no-reuse" in args)
    else:
        assert "--no-reuse" not in found  # not given: the settings file may say
    for option, value in expected.items():
        assert found[option] == value
    if "--ssh-config" in args:
        assert found["--ssh-config"] == "cfg"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--version"],
        ["status"],
        ["status", "--id", "x", "host"],  # the destination is not first: not worth guessing
        ["list", "--", "-oProxyCommand=x"],
        ["status", "host", "--help"],
        ["list", "host", "-h"],
        ["frobnicate", "host"],
    ],
)
def test_nothing_is_started_when_unsure(args: list[str]) -> None:
    assert connection_arguments(args) is None


def test_the_environment_is_read_as_click_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEJ_PYTHON", "python3.11")
    monkeypatch.setenv("TEJ_SSH_CONFIG", "")  # empty: ignored, as click does
    monkeypatch.setenv("TEJ_NO_REUSE", "yes")
    found = connection_arguments(["list", "host"])
    assert found == {"destination": "host", "--python": "python3.11", "--no-reuse": True}
    assert connection_arguments(["list", "host", "--python", "py"])["--python"] == "py"  # type: ignore[index]
    assert connection_arguments(["list", "host", "--reuse"])["--no-reuse"] is False  # type: ignore[index]
    monkeypatch.setenv("TEJ_NO_REUSE", "maybe")  # click refuses it: don't guess
    assert connection_arguments(["list", "host"]) is None


def test_nothing_is_started_while_completing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_TEJ_COMPLETE", "bash_complete")
    assert connection_arguments(["status", "host", "--id", "x"]) is None


# the command line, with the agent's starts counted


@pytest.fixture
def counted_python(tmp_path: Path) -> tuple[str, Path]:
    """A --python that records the pid of each agent it starts (exec keeps the pid)."""
    record = tmp_path / "starts"
    wrapper = tmp_path / "python-counted"
    wrapper.write_text(f'#!/bin/sh\necho $$ >> {record}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), record


def starts(record: Path) -> list[int]:
    return [int(line) for line in record.read_text().split()] if record.exists() else []


def test_the_early_agent_is_the_one_used(counted_python: tuple[str, Path], tmp_path: Path) -> None:
    python, record = counted_python
    queue = str(tmp_path / "queue")
    for _ in range(2):
        done = run_tej(
            "list", "local", "--queue", queue, "--python", python, cwd=tmp_path, tej=INSTALLED
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert len(starts(record)) == 2, "one agent per command"


def test_the_early_agent_follows_the_settings_file(
    counted_python: tuple[str, Path], tmp_path: Path
) -> None:
    """The launcher reads the settings file as the command line does: same agent command."""
    python, record = counted_python
    settings = tmp_path / "config" / "tej" / "config.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text(f'persist = 5\n[host."loc*"]\npython = "{python}"\nconnect_timeout = 7\n')
    queue = str(tmp_path / "queue")
    for _ in range(2):
        done = run_tej("list", "local", "--queue", queue, cwd=tmp_path)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert len(starts(record)) == 2, "one agent per command, the one the settings name"


def test_a_broken_settings_file_starts_nothing(
    counted_python: tuple[str, Path], tmp_path: Path
) -> None:
    python, record = counted_python
    settings = tmp_path / "config" / "tej" / "config.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text("persist = [\n")
    done = run_tej("list", "local", "--python", python, cwd=tmp_path)
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"Error: {settings}: "), done.stderr
    assert "line 1" in done.stderr or "end of document" in done.stderr, done.stderr
    assert starts(record) == []


def test_an_agent_started_for_bad_input_is_ended(
    counted_python: tuple[str, Path], tmp_path: Path
) -> None:
    python, record = counted_python
    queue = str(tmp_path / "queue")
    done = run_tej(
        "status",
        "local",
        "--queue",
        queue,
        "--python",
        python,
        "--id",
        "a/b",
        cwd=tmp_path,
        tej=INSTALLED,
    )
    assert done.returncode == 1, done
    assert done.stderr.startswith("Error: Invalid job identifier"), done.stderr
    assert "Traceback" not in done.stderr
    assert len(starts(record)) <= 1
    for pid in starts(record):
        wait_until(lambda pid=pid: not process_alive(pid), 5, f"the early agent {pid} to end")
    assert not Path(queue).exists()


def test_an_agent_started_for_a_failed_option_is_ended(
    counted_python: tuple[str, Path], tmp_path: Path
) -> None:
    python, record = counted_python
    done = run_tej("status", "local", "--python", python, cwd=tmp_path, tej=INSTALLED)  # no --id
    assert done.returncode == 2, done
    assert "Missing option '--id'" in done.stderr
    for pid in starts(record):
        wait_until(lambda pid=pid: not process_alive(pid), 5, f"the early agent {pid} to end")


def test_help_starts_nothing(counted_python: tuple[str, Path], tmp_path: Path) -> None:
    python, record = counted_python
    done = run_tej("status", "local", "--python", python, "--help", cwd=tmp_path, tej=INSTALLED)
    assert done.returncode == 0, done
    assert "Show the state of a job" in done.stdout
    assert starts(record) == []


def test_output_and_exit_code_survive_the_quick_exit(
    counted_python: tuple[str, Path], tmp_path: Path
) -> None:
    python, _ = counted_python
    queue = str(tmp_path / "queue")
    done = run_tej(
        "status",
        "local",
        "--queue",
        queue,
        "--python",
        python,
        "--id",
        "nojob",
        cwd=tmp_path,
        tej=INSTALLED,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "", "No job with that identifier\n")
    done = run_tej(
        "list", "local", "--queue", queue, "--python", python, "--json", cwd=tmp_path, tej=INSTALLED
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")


@pytest.mark.parametrize("settings", [None, 'connect_timeout = 9\n[host."some*"]\npersist = 5\n'])
def test_ssh_is_started_before_the_heavy_modules_load(tmp_path: Path, settings: str | None) -> None:
    """The look at the arguments and the start of ssh load only tej's small modules.

    Without a settings file, tej.config costs a stat; with one, a TOML parser (which loads
    re and typing, not counted then), but still nothing of the command line's.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text("#!/bin/sh\nexec cat > /dev/null\n")
    fake_ssh.chmod(0o755)
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import tej.launcher\n"
        "from tej import bootstrap\n"
        "tej.launcher._prestart(['status', 'somehost', '--id', 'x'])\n"
        "assert bootstrap.prestarted, 'ssh was not started'\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
        "bootstrap.discard_prestarted()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEJ_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", XDG_RUNTIME_DIR=str(tmp_path))
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    if settings is not None:
        (tmp_path / "config" / "tej").mkdir(parents=True)
        (tmp_path / "config" / "tej" / "config.toml").write_text(settings)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "tej.process" in loaded
    assert "tej.config" in loaded
    heavy = {"subprocess", "tempfile", "shlex", "dataclasses", "contextlib", "difflib"}
    heavy |= {"threading", "hashlib", "execnet", "click", "tej.api", "tej.cli", "tej.jobspec"}
    if settings is None:
        heavy |= {"typing", "re", "tomllib", "tomli"}
    assert not loaded & heavy
