"""Files left out of the upload: `.tejignore` and tej.json's "exclude" (gitignore syntax)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    Target,
    assert_one_line_error,
    make_job,
)

from tej import transfer
from tej.errors import InvalidInput
from tej.excludes import load_excludes


def uploaded(target: Target, job_id: str) -> list[str]:
    """Every path of the job's uploaded directory, folders with a trailing /, sorted."""
    root = target.work(job_id)
    found = []
    for parent, folders, files in os.walk(root):
        relative = os.path.relpath(parent, root)
        prefix = "" if relative == "." else relative + "/"
        found += [prefix + name + "/" for name in folders] + [prefix + name for name in files]
    return sorted(found)


def test_tejignore_leaves_files_and_folders_out(target: Target) -> None:
    job = target.make_job(
        files={
            ".tejignore": "# build products\n*.log\n!keep.log\n\nbuild/\n/data\n",
            "a.log": "x",
            "keep.log": "kept",
            "build/x.o": "x",
            "sub/build/y.o": "x",
            "sub/data": "kept: /data is anchored",
            "data/big.bin": "x",
            "src/main.py": "print()",
            "src/deep/run.log": "x",
        }
    )
    os.mkfifo(job / "build" / "fifo")  # never read: its folder is left out
    job_id = target.submit(job)
    assert uploaded(target, job_id) == [
        ".tejignore",
        "keep.log",
        "src/",
        "src/deep/",
        "src/main.py",
        "start.sh",
        "sub/",
        "sub/data",
    ]


def test_tej_json_exclude_and_what_is_always_sent(target: Target) -> None:
    job = target.make_job(
        files={
            ".tejignore": ".tejignore\n*.tmp\n",
            "tej.json": json.dumps({"exclude": ["*.json", "!b.tmp", "cache/"]}),
            "a.tmp": "x",
            "b.tmp": "taken back by tej.json",
            "c.json": "x",
            "cache/x": "x",
            "sub/tej.json": "x: only the root's is always sent",
        }
    )
    job_id = target.submit(job)
    assert uploaded(target, job_id) == ["b.tmp", "start.sh", "sub/", "tej.json"]


def test_an_excluded_unreadable_folder_is_not_read(target: Target) -> None:
    job = target.make_job(files={".tejignore": "secret/\nsock\n", "secret/x": "x"})
    os.mkfifo(job / "sock")  # can't be uploaded, but it is left out
    (job / "secret").chmod(0)
    try:
        job_id = target.submit(job)
    finally:
        (job / "secret").chmod(0o755)
    assert uploaded(target, job_id) == [".tejignore", "start.sh"]


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        ({".tejignore": "start.sh\n"}, [], "The script 'start.sh' is excluded by .tejignore"),
        (
            {"tej.json": '{"exclude": ["bin"]}', "bin/run": "#!/bin/sh\n"},
            ["--script", "bin/run"],
            "The script 'bin/run' is excluded by tej.json",
        ),
        ({".tejignore": "ok\n\\\n"}, [], "Invalid exclude pattern '\\\\' (line 2 of "),
        ({"tej.json": '{"exclude": ["!"]}'}, [], "Invalid exclude pattern '!' (tej.json"),
        ({"tej.json": '{"exclude": "*.log"}'}, [], "exclude must be a list of strings"),
        ({"tej.json": '{"excludes": []}'}, [], "Unknown key 'excludes' in tej.json"),
    ],
)
def test_bad_excludes_are_refused_before_anything_is_sent(
    target: Target, files: dict[str, str], args: list[str], expected: str
) -> None:
    job = target.make_job(files=files)
    message = assert_one_line_error(target.cli("submit", *args, str(job)), 1)
    assert expected in message, message
    assert not target.server_path("jobs").exists() or not os.listdir(target.server_path("jobs"))


def test_the_api_takes_exclude(target: Target) -> None:
    job = target.make_job(files={"tej.json": '{"exclude": ["a"]}', "a": "x", "b": "x"})
    with target.api() as queue:
        job_id = queue.submit(str(job), exclude=["b"])  # instead of tej.json's
    assert uploaded(target, job_id) == ["a", "start.sh", "tej.json"]


def test_excludes_match_as_git_does(tmp_path: Path) -> None:
    job = make_job(tmp_path, files={".tejignore": "/top\nlogs/\n*.o\n!keep.o\ndocs/**/*.md\n"})
    excludes = load_excludes(str(job), [])
    assert excludes is not None
    cases = {
        ("top", False): True,
        ("sub/top", False): False,
        ("logs", True): True,
        ("logs", False): False,  # a file named logs: "logs/" names folders
        ("a/b.o", False): True,
        ("keep.o", False): False,
        ("docs/x/y.md", False): True,
        ("docs/y.txt", False): False,
        ("tej.json", False): False,
    }
    for (path, is_folder), expected in cases.items():
        assert excludes(path.encode(), is_folder) is expected, path
    assert excludes.excludes_file("logs/run.sh")
    assert not excludes.excludes_file("src/run.sh")


def test_no_patterns_means_no_excludes(tmp_path: Path) -> None:
    job = make_job(tmp_path, files={".tejignore": "# nothing yet\n\n"})
    assert load_excludes(str(job), []) is None
    assert load_excludes(str(job), ["  "]) is None
    with pytest.raises(InvalidInput, match="line 1 of"):
        (job / ".tejignore").write_text("!\n")
        load_excludes(str(job), [])


def test_a_scan_without_excludes_loads_no_pattern_library(tmp_path: Path) -> None:
    """Directories without excludes pay nothing for them: pathspec isn't even imported."""
    job = make_job(tmp_path, files={f"d{n % 10}/f{n}": "x" for n in range(200)})
    code = (
        "import sys\n"
        "from tej import transfer\n"
        "from tej.excludes import load_excludes\n"
        f"root = {str(job)!r}\n"
        "excludes = load_excludes(root, [])\n"
        "assert excludes is None\n"
        "parts = list(transfer.scan_tree(root, excludes=excludes))\n"
        "print(sum(len(part.entries) for part in parts), 'pathspec' in sys.modules)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["211", "False"]  # 200 files, 10 folders, start.sh


def test_scan_leaves_excluded_entries_out(tmp_path: Path) -> None:
    job = make_job(tmp_path, files={".tejignore": "b/\n", "a/x": "x", "b/y": "y"})
    excludes = load_excludes(str(job), [])
    names = [entry.relpath for entry in transfer.scan(str(job), excludes)]
    assert names == [b"a", b".tejignore", b"start.sh", b"a/x"]
