"""The agent's walk of a job's tree (tej/server/treewalk.py): on two cores once it is big,
and always the same rows as one process would list.

Each walk runs in a Python process of its own, as the agent does (a pytest worker has
threads, and the walk forks only in a process that has one).
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tej

pytestmark = pytest.mark.timeout(120)

ROOT = str(Path(tej.__file__).resolve().parent.parent)
WALKER = """
import marshal, os, sys, threading
sys.path.insert(0, {root!r})
from tej.server import treewalk
treewalk.SHARE_AFTER = {share_after!r}
started = []
real_start = treewalk.start_child
def counting(fd, folders):
    child = real_start(fd, folders)
    started.append(len(folders) if child is not None else -1)
    return child
treewalk.start_child = counting
if {fail_child!r}:
    treewalk.child_walk = lambda fd, folders, parent_end, out: os._exit(3)
if {with_thread!r}:
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
rows = {{}}
treewalk.walk({folder!r}, b"", rows)
sys.stdout.buffer.write(marshal.dumps((rows, started)))
"""


def walk_in_process(
    folder: Path, share_after: int = 100, fail_child: bool = False, with_thread: bool = False
) -> tuple[dict[bytes, tuple[Any, ...]], list[int]]:
    """The rows of a walk of folder in a new process, and the sizes of the shares it forked."""
    code = WALKER.format(
        root=ROOT,
        share_after=share_after,
        fail_child=fail_child,
        with_thread=with_thread,
        folder=os.fsencode(folder),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    rows, started = marshal.loads(done.stdout)
    return rows, started


def make_tree(root: Path, folders: int, files: int) -> None:
    """folders folders of files files each, with a symlink and a nested folder in each."""
    for number in range(folders):
        folder = root / f"d{number:03d}"
        (folder / "inner").mkdir(parents=True)
        for index in range(files):
            (folder / f"f{index}.txt").write_text(f"{number}-{index}\n")
        (folder / "inner" / "deep.txt").write_text("deep\n")
        (folder / "link").symlink_to("../elsewhere")
    (root / "top.txt").write_text("top\n")


@pytest.fixture
def big_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_tree(root, folders=20, files=12)  # 20 x 15 + 1 entries: 301 rows (shared after 100)
    return root


def test_a_big_tree_is_walked_on_two_cores_and_listed_whole(big_tree: Path) -> None:
    serial, none = walk_in_process(big_tree, share_after=10**9)
    assert none == []
    assert len(serial) == 20 * 16 + 1  # each folder's row, its 15 entries, top.txt
    shared, started = walk_in_process(big_tree)
    assert len(started) == 1 and started[0] >= 2, "one child, for some of the folders"
    assert shared == serial


def test_a_tree_in_one_folder_is_shared_at_that_folder_s_level(tmp_path: Path) -> None:
    make_tree(tmp_path / "job" / "results", folders=20, files=12)
    serial, _ = walk_in_process(tmp_path / "job", share_after=10**9)
    shared, started = walk_in_process(tmp_path / "job")
    assert len(started) == 1
    assert shared == serial
    assert b"results/d000/inner/deep.txt" in shared


def test_a_small_tree_forks_nothing(tmp_path: Path) -> None:
    make_tree(tmp_path / "small", folders=5, files=10)
    rows, started = walk_in_process(tmp_path / "small", share_after=1000)
    assert started == []
    assert len(rows) == 5 * 14 + 1


def test_a_child_that_fails_leaves_its_folders_to_the_parent(big_tree: Path) -> None:
    serial, _ = walk_in_process(big_tree, share_after=10**9)
    shared, started = walk_in_process(big_tree, fail_child=True)
    assert len(started) == 1
    assert shared == serial


def test_a_process_with_threads_does_not_fork(big_tree: Path) -> None:
    serial, _ = walk_in_process(big_tree, share_after=10**9)
    rows, started = walk_in_process(big_tree, with_thread=True)
    assert started == []
    assert rows == serial
