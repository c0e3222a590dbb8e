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


# submit --dry-run


def test_dry_run_lists_what_would_be_sent_and_creates_nothing(target: Target) -> None:
    job = target.make_job(
        "dry",
        files={
            ".tejignore": "*.log\nbuild/\n",
            "a.log": "x",
            "build/x.o": "x",
            "data.bin": "d" * 3000,
        },
    )
    done = target.cli("submit", "--dry-run", str(job), check=0)
    lines = done.stdout.splitlines()
    assert lines[0] == f"Would upload 3 files (3.0 KB) from {job} to {target.destination}:"
    assert [line.split()[0] for line in lines[1:-1]] == [".tejignore", "data.bin", "start.sh"]
    assert (
        lines[-1]
        == "The server has 0 of them (0 B): 3.0 KB would be sent. Nothing was created (dry run)."
    )
    assert not target.server_path().exists(), "the dry run made the queue"


def test_dry_run_counts_what_the_store_has(target: Target) -> None:
    job = target.make_job("dry", files={"same.bin": "s" * 5000, "changed.txt": "old"})
    target.submit(job)
    (job / "changed.txt").write_text("new content")
    before = sorted(os.listdir(target.server_path("jobs")))
    done = target.cli("submit", "--dry-run", "--json", str(job), check=0)
    plan = json.loads(done.stdout)
    on_server = {item["path"]: item["on_server"] for item in plan["files"]}
    assert on_server == {"changed.txt": False, "same.bin": True, "start.sh": True}, plan
    assert (plan["file_count"], plan["bytes"]) == (3, 5000 + 11 + len("#!/bin/sh\ntrue\n"))
    assert (plan["on_server_files"], plan["send_bytes"]) == (2, 11), plan
    assert sorted(os.listdir(target.server_path("jobs"))) == before
    assert os.listdir(target.server_path("staging")) == []


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        ((), {".tejignore": "start.sh\n"}, "excluded"),
        (("--wait",), {}, "--dry-run"),
        ((), {".tejignore": "ok\n\\\n"}, "Invalid exclude pattern"),
    ],
)
def test_dry_run_refuses_what_submit_refuses(
    target: Target, args: tuple[str, ...], files: dict[str, str], message: str
) -> None:
    job = target.make_job("dry", files=files)
    error = assert_one_line_error(target.cli("submit", "--dry-run", *args, str(job)))
    assert message in error, error
    assert not target.server_path().exists()


def test_dry_run_against_a_queue_that_is_a_file(target: Target) -> None:
    queue = target.server_path()
    queue.parent.mkdir(parents=True, exist_ok=True)
    queue.write_text("mine\n")
    error = assert_one_line_error(target.cli("submit", "--dry-run", str(target.make_job())))
    assert "is a file" in error, error
    assert queue.read_text() == "mine\n"
