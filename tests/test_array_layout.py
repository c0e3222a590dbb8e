"""How an array's task gets its files: private, checked copies of the array's template
(its uploaded work/), over `local` and the real sshd; a template file that is not as
uploaded is never copied."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import Target, wait_until

pytestmark = pytest.mark.timeout(120)

STORE_MTIME = 946684800  # tej/server/store.py: the mtime of every uploaded file


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under root: its kind, mode and content (a symlink's target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[name] = ("l", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            found[name] = ("d", stat.S_IMODE(info.st_mode), b"")
        else:
            found[name] = ("f", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def test_a_task_gets_private_copies_of_the_whole_tree(target: Target) -> None:
    job = target.src_dir / "tree"
    (job / "deep" / "er").mkdir(parents=True)
    (job / "start.sh").write_text("#!/bin/sh\nexit 0\n")
    (job / "start.sh").chmod(0o755)
    (job / "deep" / "er" / "data").write_bytes(os.urandom(300_000))
    (job / "deep" / "same").write_text("twice\n")
    (job / "same").write_text("twice\n")
    (job / "same").chmod(0o640)
    (job / "empty").write_bytes(b"")
    (job / "deep").chmod(0o750)
    (job / "link").symlink_to("deep/same")
    array = target.submit(job, "--array", "0-1", "--id", "tree", "--wait")
    template = target.work(array)
    for index in (0, 1):
        work = target.server_path("jobs", array, "jobs", str(index), "work")
        assert tree(work) == tree(template)
        for name, (kind, _, _) in tree(work).items():
            if kind != "f":
                continue
            copy, original = (work / name).stat(), (template / name).stat()
            assert copy.st_ino != original.st_ino and copy.st_nlink == 1, name
            assert copy.st_mtime == STORE_MTIME, name
    assert target.status(array)["array"]["counts"] == {"finished": 2}


@pytest.mark.parametrize("how", ["replaced", "written"])
def test_a_template_file_not_as_uploaded_is_never_copied(target: Target, how: str) -> None:
    job = target.src_dir / how
    (job / "data").mkdir(parents=True)
    (job / "data" / "input").write_text("the input\n")
    gate = target.server_path(f"{how}-gate")  # where the server's user can see it
    (job / "start.sh").write_text(
        "#!/bin/sh\n"
        f'[ "$TEJ_ARRAY_INDEX" = 0 ] && while [ ! -e {gate} ]; do sleep 0.05; done\n'
        "cat data/input\n"
    )
    (job / "start.sh").chmod(0o755)
    array = target.submit(job, "--array", "0-1%1", "--id", how)
    wait_until(lambda: target.status(f"{array}.0")["state"] == "running", 30, "task 0 runs")
    path = target.work(array, "data", "input")
    if how == "replaced":  # a new file in its place: the store still has the content
        other = path.with_name("other")
        other.write_text("tampered\n")
        other.replace(path)
    else:  # written in place: the store's inode, so the store lost the content too
        with path.open("r+") as stream:
            stream.write("TAMPERED\n")
    gate.write_text("")
    wait_until(lambda: target.status(array)["state"] == "finished", 30, "the array's end")
    task = target.status(f"{array}.1")
    if how == "replaced":
        assert task["state"] == "finished" and task["exit_code"] == 0, task
        assert target.ok("logs", "--id", f"{array}.1") == "the input\n"
    else:
        assert task["state"] == "lost", task
        assert "no longer holds the uploaded content of data/input" in task["reason"]
        stdout = target.server_path("jobs", array, "jobs", "1", "stdout")
        assert not stdout.exists() or "TAMPERED" not in stdout.read_text()


@pytest.mark.parametrize("old_template", ["as uploaded", "replaced"])
def test_resubmit_failed_links_the_old_template(target: Target, old_template: str) -> None:
    job = target.src_dir / "rerun"
    (job / "data").mkdir(parents=True)
    (job / "data" / "input").write_text("the input\n")
    (job / "start.sh").write_text('#!/bin/sh\ncat data/input\nexit "$TEJ_ARRAY_INDEX"\n')
    (job / "start.sh").chmod(0o755)
    array = target.submit(job, "--array", "0-2", "--id", "rerun", "--wait")
    old = target.work(array)
    if old_template == "replaced":  # not as uploaded: the new one is laid out from the store
        other = old / "data" / "other"
        other.write_text("tampered\n")
        other.replace(old / "data" / "input")
    again = target.cli("resubmit", "--id", array, "--failed", "--as", "rerun2", "--wait")
    assert again.returncode == 0, again
    new = target.work("rerun2")
    assert tree(new) == {**tree(old), "data/input": ("f", 0o644, b"the input\n")}

    def linked(name: str) -> bool:
        return (new / name).stat().st_ino == (old / name).stat().st_ino

    if old_template == "as uploaded":  # the old template's files, linked
        assert linked("data/input") and linked("start.sh")
    else:  # from the store: the old template's replaced file is not the new one's
        assert not linked("data/input")
    status = target.status("rerun2")
    assert [task["id"] for task in status["array"]["tasks"]] == ["rerun2.1", "rerun2.2"]
    assert [task["exit_code"] for task in status["array"]["tasks"]] == [1, 2]
    assert target.ok("logs", "--id", "rerun2.2") == "the input\n"
