"""Shell completion, run the way bash, zsh and fish run it: through the `tej` launcher,
with click's environment variables, and in a real bash with the script it generates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    CLI_TIMEOUT,
    SilentServer,
    Target,
    client_side,
)

SHELLS = ("bash", "zsh", "fish")
#: What `tej` runs: its console script's entry point, the launcher.
LAUNCHER = [sys.executable, "-c", "from tej.launcher import main; main()"]
COMPLETION_TYPES = ("plain", "dir", "file")


def complete(shell: str, line: str, env: dict[str, str]) -> list[str]:
    """The values `tej` offers for the last word of line (empty after a space), as shell asks."""
    words = line.split()
    incomplete = "" if line.endswith(" ") else words[-1]
    variables = {"_TEJ_COMPLETE": f"{shell}_complete", "COMP_WORDS": line}
    if shell == "fish":
        variables["COMP_CWORD"] = incomplete
    else:
        variables["COMP_CWORD"] = str(len(words) if line.endswith(" ") else len(words) - 1)
    done = subprocess.run(
        LAUNCHER,
        capture_output=True,
        text=True,
        env={**env, **variables},
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    return parse(shell, done.stdout)


def parse(shell: str, output: str) -> list[str]:
    """The values in click's answer: `type,value` lines (bash; fish before click 8.4),
    else `type`, `value`, `help` lines."""
    lines = output.splitlines()
    kind, comma, _ = lines[0].partition(",") if lines else ("", "", "")
    if shell == "bash" or (comma and kind in COMPLETION_TYPES):
        return [line.partition(",")[2].partition("\t")[0] for line in lines if line]
    return lines[1::3]


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    env, _, _, _ = client_side(tmp_path)
    return env


@pytest.mark.parametrize("shell", SHELLS)
def test_commands_and_options(shell: str, client_env: dict[str, str]) -> None:
    assert complete(shell, "tej st", client_env) == ["status"]
    commands = complete(shell, "tej ", client_env)
    assert {"submit", "status", "logs", "list", "config", "download"} <= set(commands)
    options = complete(shell, "tej status local --", client_env)
    assert {"--id", "--queue", "--persist", "--no-reuse", "--reuse", "--json"} <= set(options)
    assert complete(shell, "tej submit local --std", client_env) == ["--stdout", "--stderr"]
    assert complete(shell, "tej submit local ", client_env) == [""]  # the shell's own folders


@pytest.mark.parametrize("shell", SHELLS)
def test_fixed_option_values(shell: str, client_env: dict[str, str]) -> None:
    assert complete(shell, "tej submit local --stderr ", client_env) == ["tej", "discard", "stdout"]
    assert complete(shell, "tej submit local --stdout d", client_env) == ["discard"]
    plugins = complete(shell, "tej setup local --plugin ", client_env)
    assert plugins[:3] == ["default", "queue", "slurm"]


@pytest.mark.parametrize("shell", SHELLS)
def test_destinations_from_ssh_config_and_settings(shell: str, client_env: dict[str, str]) -> None:
    home = Path(client_env["HOME"])
    (home / ".ssh" / "more").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host web1 web2\n  HostName example.org\n"
        "Host *.internal db? !bastion\n  User x\n"
        "host=mixedcase\n"
        "Include more/*.conf\n"
    )
    (home / ".ssh" / "more" / "a.conf").write_text("Host included\n")
    settings = home / ".config" / "tej" / "config.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text('[host."gpu1"]\nqueue = "/q"\n[host."gpu*"]\nqueue = "/q"\n')
    found = complete(shell, "tej status ", client_env)
    assert found == ["gpu1", "included", "local", "mixedcase", "web1", "web2"]
    assert complete(shell, "tej list w", client_env) == ["web1", "web2"]


def test_destinations_without_any_file(client_env: dict[str, str]) -> None:
    assert complete("bash", "tej list ", client_env) == ["local"]


def test_a_broken_settings_file_is_silent_while_completing(client_env: dict[str, str]) -> None:
    settings = Path(client_env["HOME"], ".config", "tej", "config.toml")
    settings.parent.mkdir(parents=True)
    settings.write_text("queue = [\n")
    assert complete("bash", "tej list ", client_env) == ["local"]
    assert complete("bash", "tej status local --id ", client_env) == []


def job_id_line(target: Target, command: str, incomplete: str) -> str:
    words = ["tej", command, target.destination, "--queue", target.queue, *target.ssh_args]
    return " ".join([*words, "--id", incomplete])


@pytest.mark.parametrize("shell", SHELLS)
def test_job_ids_come_from_the_server(target: Target, shell: str) -> None:
    for job_id in ("alpha1", "alpha2", "beta"):
        target.submit(target.make_job(job_id), "--id", job_id)
    assert complete(shell, job_id_line(target, "status", "al"), target.client_env) == [
        "alpha1",
        "alpha2",
    ]
    assert complete(shell, job_id_line(target, "logs", ""), target.client_env) == [
        "alpha1",
        "alpha2",
        "beta",
    ]
    line = f"tej submit {target.destination} --queue {target.queue} {' '.join(target.ssh_args)}"
    assert complete(shell, line + " --after b", target.client_env) == ["beta"]


def test_job_ids_are_given_up_after_a_second(
    silent_server: SilentServer, client_env: dict[str, str]
) -> None:
    """A server that never answers costs the completion a second, and says nothing."""
    line = f"tej status ssh://127.0.0.1:{silent_server.port} --id "
    started = time.monotonic()
    assert complete("bash", line, client_env) == []
    assert 1.0 <= time.monotonic() - started < 4.0  # a second, and starting Python


@pytest.fixture
def tej_bin(tmp_path: Path) -> Path:
    """A folder with a `tej` command, which runs the launcher as the console script does."""
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "tej"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'from tej.launcher import main; main()' \"$@\"\n"
    )
    script.chmod(0o755)
    return bin_dir


def with_tej(env: dict[str, str], bin_dir: Path) -> dict[str, str]:
    """env with bin_dir first on its PATH."""
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def run_bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run script in a real bash, after the README's line that installs the completion."""
    setup = 'eval "$(_TEJ_COMPLETE=bash_source tej)"\n'
    return subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", setup + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_the_readme_line_installs_the_completion_in_bash(
    client_env: dict[str, str], tej_bin: Path
) -> None:
    done = run_bash("complete -p tej", with_tej(client_env, tej_bin))
    assert done.returncode == 0, done
    assert done.stdout.strip() == "complete -o nosort -F _tej_completion tej", done.stdout


def test_bash_completes_through_the_generated_function(target: Target, tej_bin: Path) -> None:
    target.submit(target.make_job("x"), "--id", "only_job")
    env = with_tej(target.client_env, tej_bin)
    words = job_id_line(target, "kill", "on").split()
    done = run_bash(
        f"COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}\n"
        '_tej_completion tej; printf "%s\\n" "${COMPREPLY[@]}"\n'
        "COMPREPLY=(); COMP_WORDS=(tej d); COMP_CWORD=1\n"
        '_tej_completion tej; printf "%s\\n" "${COMPREPLY[@]}"\n',
        env,
    )
    assert done.returncode == 0, done
    assert done.stdout.split() == ["only_job", "delete", "doctor", "download"], done
