"""What a job costs and how far it got: resources, $TEJ_PROGRESS, `list --long`, `--watch`.

Against real jobs on `local` and over the loopback sshd; the live screens (`list --watch`,
`wait`) in a real terminal: a tmux session whose pane is read back as a person sees it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ELAPSED,
    USAGE,
    Target,
    assert_one_line_error,
    wait_until,
)
from terminal import Terminal

from tej import JobState, Resources
from tej.server.runners.slurm import parse_accounting, sacct_bytes, sacct_seconds
from tej.text import cut, display_width

pytestmark = pytest.mark.timeout(120)
MB = 1 << 20

# Python one-liners the jobs run: hold N MB resident, and burn CPU for S seconds.
HOLD = "x = bytearray({mb} << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\n"
SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"
WAIT_FOR_STOP = "while [ ! -f stop ]; do sleep 0.05; done\n"


def python_job(target: Target, name: str, body: str, script: str) -> Path:
    """A job whose start.sh runs script, with job.py (body) beside it."""
    return target.make_job(name, "#!/bin/sh\n" + script, files={"job.py": body})


def status_json(target: Target, job_id: str) -> dict[str, Any]:
    """`tej status --json` of a job."""
    document: dict[str, Any] = json.loads(target.cli("status", "--id", job_id, "--json").stdout)
    return document


def write_progress(target: Target, job_id: str, data: bytes) -> None:
    """Write the job's progress file as the job would (owned by the job's user)."""
    path = target.job_dir(job_id) / "progress"
    path.write_bytes(data)
    owner = target.job_dir(job_id).stat()
    os.chown(path, owner.st_uid, owner.st_gid)


def stop(target: Target, job_id: str) -> None:
    """Let a job that waits for its `stop` file end."""
    target.work(job_id, "stop").write_text("")
    target.wait_for(job_id)


# -- what a job costs ---------------------------------------------------------


def test_an_ended_job_has_its_peak_memory_and_cpu_time(target: Target) -> None:
    """The job's own processes, and an orphan the supervisor reaped, are counted."""
    body = HOLD.format(mb=120) + SPIN.format(seconds=0.6)
    orphan = shlex.quote(SPIN.format(seconds=0.6))
    script = f"python3 job.py\n( python3 -c {orphan} & )\nsleep 1.5\n"
    job_id = target.submit(python_job(target, "costly", body, script))
    target.wait_for(job_id)
    document = status_json(target, job_id)
    resources = document["resources"]
    assert resources["source"] == "tej", resources
    assert resources["max_rss"] >= 120 * MB, resources
    assert resources["max_rss"] < 1024 * MB, resources
    # 0.6 s in job.py, 0.6 s in the orphan (its parent exited at once: it was the supervisor's).
    assert resources["cpu_user"] + resources["cpu_system"] >= 1.1, resources
    text = target.cli("status", "--id", job_id, check=0).stdout
    assert re.fullmatch(rf"Job is finished \({ELAPSED}\) with exit code 0{USAGE}\n", text), text
    assert re.search(r"; peak memory 1[2-9]\d MB, CPU 0:00:0[1-9]\n", text), text
    with target.api() as remote:
        status = remote.status(job_id)
    assert isinstance(status.resources, Resources)
    assert status.resources.max_rss == resources["max_rss"]
    assert status.resources.cpu == pytest.approx(resources["cpu_user"] + resources["cpu_system"])
    assert status.to_json()["resources"] == resources


def test_a_killed_job_has_its_figures_too(target: Target) -> None:
    job_id = target.submit(target.make_job("killed", "#!/bin/sh\nsleep 30\n"))
    target.wait_for(job_id, ("running",))
    target.cli("kill", "--id", job_id, check=0)
    text = target.cli("status", "--id", job_id, check=0).stdout
    assert re.fullmatch(rf"Job was killed \({ELAPSED}\){USAGE}\n", text), text
    assert status_json(target, job_id)["resources"]["source"] == "tej"


def test_a_running_job_shows_its_current_memory_and_cpu(target: Target) -> None:
    body = HOLD.format(mb=100) + SPIN.format(seconds=0.3)
    body += "open('ready', 'w').close()\nimport time\nwhile True: time.sleep(1)\n"
    job_id = target.submit(python_job(target, "holder", body, "exec python3 job.py\n"))
    wait_until(lambda: target.work(job_id, "ready").exists(), message="the job to be ready")
    resources = status_json(target, job_id)["resources"]
    assert resources["source"] == "proc", resources
    assert 100 * MB <= resources["rss"] < 1024 * MB, resources
    assert "max_rss" not in resources
    assert resources["cpu_user"] + resources["cpu_system"] >= 0.25, resources
    text = target.cli("status", "--id", job_id, check=0).stdout
    pattern = rf"Job is still running \({ELAPSED}\); memory 1\d\d MB, CPU 0:00:0\d\n"
    assert re.fullmatch(pattern, text), text
    target.cli("kill", "--id", job_id, check=0)


def test_a_job_that_never_ran_has_no_figures(target: Target) -> None:
    job_id = target.submit(target.make_job("late", "#!/bin/sh\ntrue\n"), "--delay", "1h")
    target.wait_for(job_id, ("scheduled",))
    assert status_json(target, job_id)["resources"] is None
    target.cli("kill", "--id", job_id, check=0)
    document = status_json(target, job_id)
    assert (document["state"], document["resources"]) == ("killed", None)
    text = target.cli("status", "--id", job_id, check=0).stdout
    assert text == "Job was cancelled before it started\n"


# -- progress -----------------------------------------------------------------


def test_status_list_and_json_show_the_last_line_of_progress(target: Target) -> None:
    script = 'printf "%s\\n" "$TEJ_PROGRESS" > where.txt\n'
    script += 'echo "epoch 1/10" > "$TEJ_PROGRESS"\necho "epoch 2/10" >> "$TEJ_PROGRESS"\n'
    script += 'printf "epoch 3/10, loss 0.41\\n\\n" >> "$TEJ_PROGRESS"\n' + WAIT_FOR_STOP
    job_id = target.submit(target.make_job("progressing", "#!/bin/sh\n" + script))
    wait_until(lambda: status_json(target, job_id)["progress"], message="progress")
    where = target.work(job_id, "where.txt").read_text().strip()
    assert os.path.realpath(where) == os.path.realpath(target.job_dir(job_id) / "progress")
    assert status_json(target, job_id)["progress"] == "epoch 3/10, loss 0.41"
    text = target.cli("status", "--id", job_id, check=0).stdout
    pattern = rf"Job is still running \({ELAPSED}\): epoch 3/10, loss 0\.41(; memory .*)?\n"
    assert re.fullmatch(pattern, text), text
    lines = target.cli("list", check=0).stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "ELAPSED", "EXIT", "PROGRESS"]
    assert lines[1].split(None, 3)[3] == "epoch 3/10, loss 0.41", lines
    [listed] = json.loads(target.cli("list", "--json", check=0).stdout)
    assert listed["progress"] == "epoch 3/10, loss 0.41"
    stop(target, job_id)
    with target.api() as remote:
        assert remote.status(job_id).progress == "epoch 3/10, loss 0.41"  # kept once ended


def test_progress_is_cut_escaped_and_never_hangs(target: Target) -> None:
    job_id = target.submit(target.make_job("odd", "#!/bin/sh\n" + WAIT_FOR_STOP))
    target.wait_for(job_id, ("running",))
    long_line = "x" * 150 + "é" * 150
    write_progress(target, job_id, ("old line\n" * 3000 + long_line + "\n").encode())
    assert status_json(target, job_id)["progress"] == long_line[:200]
    write_progress(target, job_id, b"first\r50%\r60%\r")  # a progress bar's rewritten line
    assert status_json(target, job_id)["progress"] == "60%"
    write_progress(target, job_id, b"ok\n\xff\xfe\x1b[31mred\tend\n")
    assert status_json(target, job_id)["progress"] == "\\xff\\xfe\\x1b[31mred\\tend"
    text = target.cli("status", "--id", job_id, check=0).stdout
    assert "\x1b" not in text and "\\x1b[31mred" in text, text
    write_progress(target, job_id, b"A" * 199 + b"\xff\xff\n")  # cut before, not in, an escape
    assert status_json(target, job_id)["progress"] == "A" * 199
    text = target.cli("status", "--id", job_id, check=0).stdout
    assert "A" * 199 in text and "\\" not in text, text  # no half of \xff
    write_progress(target, job_id, b"A" * 196 + b"\xff\x1b\n")
    assert status_json(target, job_id)["progress"] == "A" * 196 + "\\xff"
    write_progress(target, job_id, b"x" * 200_000)  # one huge line: only its tail is read
    assert status_json(target, job_id)["progress"] == "x" * 200
    path = target.job_dir(job_id) / "progress"
    path.unlink()
    os.mkfifo(path)  # never opened for writing: reading it would block
    assert status_json(target, job_id)["progress"] is None
    path.unlink()
    path.symlink_to(target.work(job_id, "start.sh"))
    assert status_json(target, job_id)["progress"] is None
    path.unlink()
    assert status_json(target, job_id)["progress"] is None
    stop(target, job_id)


# -- list --long --------------------------------------------------------------


def test_list_long_shows_memory_and_cpu(target: Target) -> None:
    body = HOLD.format(mb=60)
    finished = target.submit(python_job(target, "done", body, "python3 job.py\n"), "--id", "a")
    target.wait_for(finished)
    running = target.submit(target.make_job("run", "#!/bin/sh\n" + WAIT_FOR_STOP), "--id", "b")
    target.wait_for(running, ("running",))
    write_progress(target, running, b"step 7\n")
    lines = target.cli("list", "--long", check=0).stdout.splitlines()
    header = ["ID", "STATE", "ELAPSED", "EXIT", "MEMORY", "CPU", "PROGRESS"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line for line in lines[1:]}
    assert re.fullmatch(rf"a +finished +{ELAPSED} +0 +[6-9]\d(\.\d)? MB +0:00:0\d", rows["a"]), rows
    pattern = rf"b +running +{ELAPSED} +\d+(\.\d)? [KM]B +0:00:0\d +step 7"
    assert re.fullmatch(pattern, rows["b"]), rows
    stop(target, running)


# -- list --watch and wait, in a real terminal (tests/terminal.py) -------------


def tej_command(target: Target, command: str, *args: str) -> str:
    """The `tej` command line a person would type, as target.cli runs it."""
    argv = [sys.executable, "-m", "tej", command, target.destination, "--queue", target.queue]
    return shlex.join([*argv, *target.ssh_args, *args])


def test_list_watch_is_a_live_table_until_q(target: Target, terminal: Terminal) -> None:
    done = target.submit(target.make_job("first", "#!/bin/sh\nexit 3\n"), "--id", "first")
    target.wait_for(done)
    running = target.submit(target.make_job("live", "#!/bin/sh\n" + WAIT_FOR_STOP), "--id", "live")
    target.wait_for(running, ("running",))
    write_progress(target, running, b"epoch 3/10, loss 0.41\n")
    terminal.run("echo before-watch")
    terminal.run(tej_command(target, "list", "--watch"))
    screen = terminal.wait_for(lambda s: "epoch 3/10" in s, "the live table")
    lines = screen.splitlines()
    assert "2 jobs: 1 running, 1 finished" in lines[1], screen
    assert "before-watch" not in screen  # the alternate screen
    header = next(line for line in lines if line.startswith("ID"))
    assert header.split() == ["ID", "STATE", "ELAPSED", "MEMORY", "CPU", "PROGRESS"]
    rows = [line.split() for line in lines if line.startswith(("live", "first"))]
    assert [row[:2] for row in rows] == [["live", "running"], ["first", "finished"]], screen
    assert re.fullmatch(r"\d+(\.\d)? [KM]B", " ".join(rows[0][3:5])), screen
    # Refreshed by itself: new progress, then the job's end.
    write_progress(target, running, b"epoch 4/10, loss 0.37\n")
    terminal.wait_for(lambda s: "epoch 4/10, loss 0.37" in s, "the new progress", 10)
    target.work(running, "stop").write_text("")
    terminal.wait_for(lambda s: "2 jobs: 2 finished" in s, "the job's end", 10)
    terminal.keys("q")
    screen = terminal.wait_for(lambda s: "before-watch" in s, "the shell's screen back", 10)
    assert "PROGRESS" not in screen, screen
    terminal.run("echo exit=$?")
    terminal.wait_for(lambda s: "exit=0" in s, "the exit code")


def test_list_watch_quits_on_ctrl_c_and_fits_a_small_terminal(
    target: Target, terminal: Terminal
) -> None:
    for number in range(12):
        target.submit(target.make_job(f"j{number}", "#!/bin/sh\ntrue\n"), "--id", f"job{number}")
    terminal.tmux("resize-window", "-t", "t", "-x", "40", "-y", "10")
    terminal.run(tej_command(target, "list", "--watch"))
    screen = terminal.wait_for(lambda s: "more" in s, "the table, cut to the screen")
    assert all(len(line) <= 40 for line in screen.splitlines()), screen
    assert len(screen.rstrip("\n").splitlines()) <= 10, screen
    terminal.keys("C-c")
    back = terminal.wait_for(lambda s: "more" not in s, "the shell's screen back", 10)
    assert "--watch" in "".join(back.splitlines()), back  # the shell's screen: the command typed
    terminal.run("echo exit=$?")
    screen = terminal.wait_for(lambda s: re.search(r"^exit=\d+", s, re.M), "the exit code")
    assert "Error: interrupted" in screen and "exit=130" in screen, screen  # as wait's Ctrl-C


def test_list_watch_refuses_without_a_terminal(target: Target) -> None:
    done = target.cli("list", "--watch")
    message = assert_one_line_error(done, 1)
    assert "terminal" in message, message
    assert not os.path.exists(target.queue)  # refused before anything was asked


def test_wait_shows_the_progress_live_on_a_terminal(target: Target, terminal: Terminal) -> None:
    job_id = target.submit(target.make_job("waited", "#!/bin/sh\n" + WAIT_FOR_STOP))
    target.wait_for(job_id, ("running",))
    write_progress(target, job_id, b"epoch 3/10, loss 0.41\n")
    terminal.run(tej_command(target, "wait", "--id", job_id))
    terminal.wait_for(
        lambda s: re.search(rf"Job is still running \({ELAPSED}\): epoch 3/10, loss 0\.41", s),
        "the live line",
    )
    write_progress(target, job_id, b"epoch 9/10\n")
    terminal.wait_for(lambda s: "epoch 9/10" in s, "the new progress", 10)
    target.work(job_id, "stop").write_text("")
    screen = terminal.wait_for(lambda s: "Job is finished" in s, "the end")
    assert re.search(rf"Job is finished \({ELAPSED}\) with exit code 0{USAGE}", screen), screen
    assert "still running" not in screen, screen


WIDE = "\U0001f600" * 100  # emoji: each takes two columns of a terminal


def test_wide_characters_fit_the_terminal(target: Target, terminal: Terminal) -> None:
    # Cut to the terminal's columns, not characters: a line that wraps leaves a stale
    # row behind `wait`'s \r, and breaks the rows of `list` and `list --watch`.
    terminal.tmux("resize-window", "-t", "t", "-x", "100", "-y", "20")
    job_id = target.submit(target.make_job("wide", "#!/bin/sh\n" + WAIT_FOR_STOP), "--id", "w")
    target.wait_for(job_id, ("running",))
    write_progress(target, job_id, f"{WIDE} 1\n".encode())
    terminal.run("clear; " + tej_command(target, "wait", "--id", job_id))
    live = rf"Job is still running \(({ELAPSED})\)"
    screen = terminal.wait_for(lambda s: re.search(live, s), "the live line")
    first = seconds(re.search(live, screen).group(1))
    screen = terminal.wait_for(  # redrawn twice at least, one second apart
        lambda s: any(seconds(found) >= first + 2 for found in re.findall(live, s)),
        "the line redrawn",
        15,
    )
    assert screen.count("Job is still running") == 1, screen
    terminal.keys("C-c")
    terminal.wait_for(lambda s: "Error: interrupted" in s, "wait's end")
    terminal.tmux("resize-window", "-t", "t", "-x", "120", "-y", "20")
    for args in (("list", "--id", job_id), ("list", "--watch")):
        terminal.run("clear; " + tej_command(target, *args))
        screen = terminal.wait_for(lambda s: "\U0001f600..." in s, "the row, cut")
        rows = [line for line in screen.splitlines() if "\U0001f600" in line]
        assert len(rows) == 1 and rows[0].startswith("w "), screen  # one row, not wrapped
        if "--watch" in args:
            terminal.keys("q")
            terminal.wait_for(lambda s: "PROGRESS" not in s, "the shell's screen back", 10)
    stop(target, job_id)


def seconds(elapsed: str) -> int:
    """H:MM:SS as seconds."""
    hours, minutes, secs = (int(part) for part in elapsed.split(":"))
    return hours * 3600 + minutes * 60 + secs


def test_cut_counts_the_columns_a_terminal_gives() -> None:
    assert display_width("abc") == 3
    assert display_width("\u65e5\u672c\uff21") == 6  # CJK and a fullwidth A: two columns each
    assert display_width("e\u0301") == 1  # a combining accent takes none
    assert cut("\u65e5\u672c\u8a9e\u65e5\u672c", 8) == "\u65e5\u672c..."  # 7 columns: no half
    assert cut("e\u0301" * 5, 5) == "e\u0301" * 5
    assert cut("e\u0301" * 5, 4) == "e\u0301..."  # the accent kept with its letter
    assert cut("\U0001f600" * 3, 6) == "\U0001f600" * 3
    assert cut("\U0001f600" * 3, 3) == "\U0001f600"  # no room for ...: cut to the columns


# -- Slurm's accounting -------------------------------------------------------

# What sacct -n -P -o JobID,State,MaxRSS,UserCPU,SystemCPU prints: the job's line has
# no MaxRSS, its steps do; short CPU times are MM:SS.mmm, long ones [D-]HH:MM:SS.
SACCT_FINISHED = (
    "28097634|COMPLETED||03:14.512|00:21.030\n"
    "28097634.batch|COMPLETED|3268572K|03:14.500|00:21.020\n"
    "28097634.extern|COMPLETED|1528K|00:00.012|00:00.010\n"
)
SACCT_LONG = "42|TIMEOUT||1-02:03:04|01:00:00\n42.batch|CANCELLED by 0|1.50G|1-02:03:04|01:00:00\n"


def test_sacct_figures_are_read_from_its_real_output() -> None:
    found = parse_accounting(SACCT_FINISHED, "28097634")
    assert found == {
        "max_rss": 3268572 * 1024,
        "cpu_user": pytest.approx(194.512),
        "cpu_system": pytest.approx(21.03),
        "source": "slurm",
    }
    found = parse_accounting(SACCT_LONG, "42")
    assert found is not None
    assert found["max_rss"] == int(1.5 * (1 << 30))
    assert found["cpu_user"] == 86400 + 2 * 3600 + 3 * 60 + 4
    assert found["cpu_system"] == 3600
    assert parse_accounting("", "42") is None  # not in the database yet
    assert parse_accounting("42|RUNNING||00:01.000|00:00.100\n", "42") is None  # not over
    no_memory = "42|COMPLETED||00:01.000|00:00.100\n42.batch|COMPLETED||00:01.000|00:00.100\n"
    assert parse_accounting(no_memory, "42") is None  # memory not gathered: tej's figures
    assert parse_accounting(SACCT_FINISHED, "2809763") is None  # another job's lines
    assert sacct_seconds("00:00.004") == pytest.approx(0.004)
    assert sacct_seconds("01:02:03") == 3723
    assert (sacct_bytes("0"), sacct_bytes("12M")) == (0, 12 * MB)
    for bad in ("", "abc", "1:2:3:4"):
        with pytest.raises(ValueError):
            sacct_seconds(bad)
    with pytest.raises(ValueError):
        sacct_bytes("12Q")


def test_resources_round_trip_through_the_api_types() -> None:
    resources = Resources.from_agent({"source": "proc", "rss": 5 * MB, "cpu_user": 1.5})
    assert resources is not None
    assert (resources.memory, resources.cpu, resources.max_rss) == (5 * MB, 1.5, None)
    assert resources.to_json() == {"source": "proc", "rss": 5 * MB, "cpu_user": 1.5}
    assert Resources.from_agent(None) is None
    assert JobState.RUNNING.is_active
