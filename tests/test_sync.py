"""`tej sync`: a job's files mirrored into a local folder, only what changed sent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    Target,
    assert_one_line_error,
    process_alive,
    wait_until,
)

from tej import rawstream
from tej.errors import ProtocolError

pytestmark = pytest.mark.timeout(120)
BINARY = bytes(range(256)) * 40


def sync_json(target: Target, job_id: str, *args: str, check: int = 0) -> dict[str, object]:
    """Run `tej sync --json`; its summary."""
    done = target.cli("sync", "--id", job_id, "--json", *args, check=check)
    summary: dict[str, object] = json.loads(done.stdout)
    return summary


def tree(root: Path) -> dict[str, object]:
    """A folder's files (content, mode, mtime), folders and symlinks, but .tej-sync."""
    found: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [name for name in dirs if name != ".tej-sync"]
        for name in dirs + files:
            path = Path(folder, name)
            relpath = os.path.relpath(path, root)
            if path.is_symlink():
                found[relpath] = ("link", os.readlink(path))
            elif path.is_dir():
                found[relpath] = ("dir",)
            else:
                info = path.stat()
                found[relpath] = (path.read_bytes(), info.st_mode & 0o777, info.st_mtime_ns)
    return found


@pytest.mark.parametrize(
    ("path", "valid"),
    [
        (b"a/b.txt", True),
        (b".a/..b/c.", True),
        (b"...", True),
        (b"..\n", True),
        (b"", False),
        (b"/etc/passwd", False),
        (b"a//b", False),
        (b"a/", False),
        (b".", False),
        (b"..", False),
        (b"../up", False),
        (b"a/../../up", False),
        (b"a/./b", False),
    ],
)
def test_a_listed_path_that_would_leave_the_folder_is_refused(path: bytes, valid: bool) -> None:
    """The agent's listing is checked on its columns, before anything is written."""
    from tej.server.handlers.sync import encode_rows
    from tej.sync import decode_listing

    rows = [(b"first", "f", 0o644, 1, 2, 3, b""), (path, "f", 0o644, 1, 2, 3, b"")]
    if valid:
        assert [row[0] for row in decode_listing(encode_rows(rows))] == [b"first", path]
    else:
        with pytest.raises(ProtocolError, match="invalid path"):
            decode_listing(encode_rows(rows))


def results_job(target: Target) -> str:
    """A finished job with folders, an empty file, modes, symlinks in and out, odd names."""
    job = target.make_job(
        "results",
        files={
            "out/log.txt": "line\n",
            "out/data.bin": BINARY,
            "out/deep/er/file.txt": "deep\n",
            "empty.txt": b"",
        },
    )
    with open(os.path.join(os.fsencode(job), b"out", b"caf\xe9"), "wb") as stream:
        stream.write(b"latin-1 name\n")
    (job / "out" / "data.bin").chmod(0o600)
    (job / "out" / "link").symlink_to("log.txt")
    (job / "escape").symlink_to("/etc/passwd")
    job_id = target.submit(job)
    target.wait_for(job_id)
    return job_id


def test_sync_mirrors_the_job_then_sends_only_what_changed(target: Target) -> None:
    job_id = results_job(target)
    first = sync_json(target, job_id)
    local = target.client_dir / job_id
    assert tree(local) == tree(target.work(job_id))
    assert first["files_sent"] == 6 and first["state"] == "finished"
    assert os.readlink(local / "escape") == "/etc/passwd"  # a symlink, never followed
    again = sync_json(target, job_id)
    assert (again["files_sent"], again["files_unchanged"]) == (0, 6)
    changed = target.work(job_id, "out", "log.txt")
    changed.write_text("LINE\n")  # the same size: its time and then its hash tell
    target.work(job_id, "new.txt").write_text("new\n")
    third = sync_json(target, job_id)
    assert (third["files_sent"], third["bytes_sent"]) == (2, 9)
    assert tree(local) == tree(target.work(job_id))


def test_a_touched_file_of_the_same_content_is_not_sent(target: Target) -> None:
    job_id = results_job(target)
    sync_json(target, job_id)
    os.utime(target.work(job_id, "out", "data.bin"), (1e9, 1e9))
    summary = sync_json(target, job_id)
    assert (summary["files_sent"], summary["files_unchanged"]) == (0, 6)
    assert (target.client_dir / job_id / "out" / "data.bin").stat().st_mtime == 1e9


def test_content_the_folder_has_elsewhere_is_copied_not_sent(target: Target) -> None:
    job = target.make_job("ckpt", files={"ckpt/latest.bin": os.urandom(200_000)})
    job_id = target.submit(job)
    target.wait_for(job_id)
    to = target.src_dir / "mirror"
    sync_json(target, job_id, "--to", str(to))
    work = target.work(job_id, "ckpt")
    os.rename(work / "latest.bin", work / "epoch3.bin")
    summary = sync_json(target, job_id, "--to", str(to), "--delete")
    assert (summary["files_copied"], summary["files_sent"], summary["files_deleted"]) == (1, 0, 1)
    assert (to / "ckpt" / "epoch3.bin").read_bytes() == (work / "epoch3.bin").read_bytes()
    assert not (to / "ckpt" / "latest.bin").exists()


def test_paths_exclude_and_dry_run(target: Target) -> None:
    job_id = results_job(target)
    to = target.src_dir / "part"
    dry = sync_json(target, job_id, "out", "--to", str(to), "--exclude", "*.bin", "--dry-run")
    assert dry["dry_run"] is True and not to.exists()
    assert sorted(dry["to_send"]) == ["out/caf\udce9", "out/deep/er/file.txt", "out/log.txt"]  # type: ignore[arg-type]
    summary = sync_json(target, job_id, "out", "--to", str(to), "--exclude", "*.bin")
    assert summary["files_sent"] == 3
    assert sorted(os.listdir(to)) == [".tej-sync", "out"]
    assert not (to / "out" / "data.bin").exists()
    assert (to / "out" / "deep" / "er" / "file.txt").read_text() == "deep\n"


def test_exclude_patterns_are_gitignore_patterns(target: Target) -> None:
    job = target.make_job(
        "patterns",
        files={
            "data/a.csv": "a\n",
            "out/data/b.csv": "b\n",
            "out/log.txt": "log\n",
            "out/keep.log": "keep\n",
            "out/drop.log": "drop\n",
            "cache/x.bin": "x\n",
            "notes/cache": "a file named cache\n",
        },
    )
    job_id = target.submit(job)
    target.wait_for(job_id)
    to = target.src_dir / "patterns-mirror"
    excludes = ["/data", "cache/", "*.log", "!keep.log"]
    summary = sync_json(target, job_id, "--to", str(to), *[f"--exclude={p}" for p in excludes])
    found = sorted(str(path.relative_to(to)) for path in to.rglob("*") if path.is_file())
    found = [path for path in found if not path.startswith(".tej-sync")]
    # /data: only the top folder; cache/: only folders; *.log, but keep.log taken back.
    assert found == ["notes/cache", "out/data/b.csv", "out/keep.log", "out/log.txt", "start.sh"]
    assert summary["files_sent"] == 5


def test_delete_removes_what_the_job_no_longer_has_and_nothing_else(target: Target) -> None:
    job_id = results_job(target)
    to = target.src_dir / "mirror"
    sync_json(target, job_id, "--to", str(to))
    target.work(job_id, "out", "log.txt").unlink()
    (to / "keep.tmp").write_text("mine\n")
    summary = sync_json(target, job_id, "--to", str(to), "--delete", "--exclude", "*.tmp")
    assert summary["files_deleted"] == 1
    assert not (to / "out" / "log.txt").exists()
    assert (to / "keep.tmp").read_text() == "mine\n"  # excluded: left alone
    assert (to / "out" / "link").is_symlink()  # a dangling link the job still has


def test_delete_refuses_a_folder_that_is_not_a_sync_of_the_job(target: Target) -> None:
    job_id = results_job(target)
    home = target.src_dir / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work\n")
    done = target.cli("sync", "--id", job_id, "--to", str(home), "--delete")
    assert "--force" in assert_one_line_error(done, 1)
    assert sorted(os.listdir(home)) == ["thesis.tex"]
    forced = sync_json(target, job_id, "--to", str(home), "--delete", "--force")
    assert forced["files_deleted"] == 1 and not (home / "thesis.tex").exists()


def test_delete_refuses_a_folder_that_held_other_things_before_its_first_sync(
    target: Target,
) -> None:
    job_id = results_job(target)
    home = target.src_dir / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work\n")
    sync_json(target, job_id, "--to", str(home))  # without --delete: nothing is deleted
    for _ in range(2):  # its marker remembers what the folder held
        done = target.cli("sync", "--id", job_id, "--to", str(home), "--delete")
        assert "--force" in assert_one_line_error(done, 1)
        assert (home / "thesis.tex").read_text() == "years of work\n"
    # A folder this job's first sync made is its mirror: --delete needs no --force there.
    mirror = target.src_dir / "mirror"
    sync_json(target, job_id, "--to", str(mirror))
    (mirror / "added.txt").write_text("later\n")
    assert sync_json(target, job_id, "--to", str(mirror), "--delete")["files_deleted"] == 1


def test_a_link_of_the_job_replaces_a_local_folder_only_with_delete(target: Target) -> None:
    script = "#!/bin/sh\nmkdir d\necho x > d/x\nln -s d ld\n"
    job_id = target.submit(target.make_job("linker", script))
    target.wait_for(job_id)
    to = target.src_dir / "mirror"
    (to / "ld").mkdir(parents=True)
    (to / "ld" / "notes.txt").write_text("mine\n")
    done = target.cli("sync", "--id", job_id, "--to", str(to))
    assert "use --delete" in assert_one_line_error(done, 1)
    assert (to / "ld" / "notes.txt").read_text() == "mine\n"
    sync_json(target, job_id, "--to", str(to), "--delete", "--force")
    assert os.readlink(to / "ld") == "d" and (to / "ld" / "x").read_text() == "x\n"


def test_a_folder_that_became_a_file_is_a_file_after_one_pass(target: Target) -> None:
    job_id = results_job(target)
    to = target.src_dir / "mirror"
    sync_json(target, job_id, "--to", str(to))
    deep = target.work(job_id, "out", "deep")
    subprocess.run(["rm", "-rf", str(deep)], check=True)
    deep.write_text("now a file\n")
    summary = sync_json(target, job_id, "--to", str(to), "--delete")
    assert (to / "out" / "deep").read_text() == "now a file\n"
    assert summary["files_sent"] == 1, summary
    assert tree(to) == tree(target.work(job_id))


def test_links_named_as_paths_are_synced_as_links(target: Target) -> None:
    script = "#!/bin/sh\nmkdir d\necho x > d/x\nln -s d ld\nln -s d/x lx\nln -s . self\n"
    job_id = target.submit(target.make_job("links", script))
    target.wait_for(job_id)
    to = target.src_dir / "mirror"
    summary = sync_json(target, job_id, "--to", str(to), "ld", "lx", "self")
    assert summary["files_changing"] == 0, summary
    assert sorted(os.listdir(to)) == [".tej-sync", "ld", "lx", "self"]
    assert [os.readlink(to / name) for name in ("ld", "lx", "self")] == ["d", "d/x", "."]


def test_what_the_server_cant_read_is_named_not_said_to_change(target: Target) -> None:
    script = (
        "#!/bin/sh\necho ok > ok.txt\necho no > secret.txt\nchmod 000 secret.txt\n"
        "head -c 17000000 /dev/zero > big.bin\nchmod 000 big.bin\n"
        "mkdir locked\necho in > locked/a.txt\nchmod 000 locked\n"
    )
    job_id = target.submit(target.make_job("secrets", script))
    target.wait_for(job_id)
    if target.kind == "local" and os.geteuid() == 0:
        pytest.skip("root reads every file: the ssh destination's user can't")
    to = target.src_dir / "mirror"
    summary = sync_json(target, job_id, "--to", str(to))
    assert sorted(summary["unreadable"]) == [
        "big.bin (Permission denied)",
        "locked/ (Permission denied)",
        "secret.txt (Permission denied)",
    ], summary
    assert summary["files_changing"] == 0, summary
    assert (to / "ok.txt").read_text() == "ok\n" and not (to / "secret.txt").exists()
    done = target.cli("sync", "--id", job_id, "--to", str(to), check=0)
    assert "Warning: the server can't read locked/ (Permission denied) and 2 more" in done.stderr


def test_bad_input_is_one_line_and_writes_nothing(target: Target) -> None:
    job_id = results_job(target)
    a_file = target.client_dir / "a-file"
    a_file.write_text("x")
    target.work(job_id, "outside").symlink_to("/etc")
    cases = [
        (["--to", str(a_file)], "is not a folder"),
        (["--to", str(a_file / "sub")], "a-file is not a folder"),
        (["--to", ""], "--to is empty"),
        (["--follow", "--interval", "0"], "--interval"),
        (["--follow", "--interval", "-1"], "--interval"),
        (["--follow", "--interval", "0.0001"], "at least 0.1 seconds"),
        (["--interval", "5"], "--follow"),
        (["../queue"], "leaves the job"),
        (["/etc"], "leaves the job"),
        (["outside"], "leaves the job"),
        (["no-such-file"], "No file"),
        (["--exclude", "!"], "Invalid exclude pattern '!' (--exclude)"),
        (["--exclude", "[z-a]"], "Invalid exclude pattern '[z-a]' (--exclude)"),
    ]
    for args, message in cases:
        done = target.cli("sync", "--id", job_id, *args)
        assert message in assert_one_line_error(done), (args, done.stderr)
    assert sorted(os.listdir(target.client_dir)) == ["a-file"]
    done = target.cli("sync", "--id", "ghost")
    assert_one_line_error(done, 3, prefix="")


def test_follow_gets_every_file_whole_until_the_job_ends(target: Target) -> None:
    script = (
        "#!/bin/sh\nmkdir -p res\n"
        "for i in 1 2 3 4 5 6; do head -c 300000 /dev/urandom > res/.tmp; "
        "mv res/.tmp res/part$i.bin; echo $i >> res/log.txt; sleep 0.3; done\n"
        "echo last > res/final.txt\n"
    )
    job_id = target.submit(target.make_job("writer", script))
    done = target.cli(
        "sync", "--id", job_id, "--follow", "--interval", "0.2", "--delete", "--json", timeout=60
    )
    assert done.returncode == 0, done
    summary = json.loads(done.stdout)
    assert summary["state"] == "finished"
    local = target.client_dir / job_id
    assert (local / "res" / "final.txt").read_text() == "last\n"
    assert tree(local) == tree(target.work(job_id))  # res/.tmp, seen in a pass, deleted


def test_follow_with_the_api_yields_a_pass_each_and_idle_passes_cost_one_request(
    target: Target,
) -> None:
    job_id = target.submit(target.make_job("sleeper", "#!/bin/sh\necho a > a.txt\nsleep 2\n"))
    passes = []
    with target.api() as remote:
        for summary in remote.sync_follow(job_id, str(target.src_dir / "f"), interval=0.2):
            passes.append(summary)
    assert passes[-1].state == "finished" and len(passes) >= 3
    idle = [p for p in passes[1:-1] if not p.files_sent]
    assert idle and all(p.requests == 1 for p in idle), passes
    assert (target.src_dir / "f" / "a.txt").read_text() == "a\n"


def test_a_file_changing_while_it_is_read_is_sent_again_not_torn(target: Target) -> None:
    """A writer rewrites a file (each version one repeated byte) while it is synced, again
    and again: every local copy is the file as it was at one moment, never two versions
    mixed. (Any length: `cat` rewrites it in place, through every size up to the whole; a
    copy of the file while it stood still at one of them is not torn.)"""
    script = (
        "#!/bin/sh\nwhile [ ! -e stop ]; do for c in a b c d; do "
        "python3 -c \"import sys; open('f.tmp', 'wb').write(sys.argv[1].encode() * 3000000)\" $c; "
        "cat f.tmp > data.txt; done; done\n"
    )
    job_id = target.submit(target.make_job("rewriter", script.replace("N", "3000000")))
    target.wait_for(job_id, ("running",))
    wait_until(lambda: target.work(job_id, "data.txt").exists(), message="the first version")
    with target.api() as remote:
        for _ in range(6):
            summary = remote.sync(job_id, str(target.src_dir / "m"), ["data.txt"])
            data = (target.src_dir / "m" / "data.txt").read_bytes() if summary.files_sent else b""
            assert len(set(data)) <= 1, "a torn file"
            assert len(data) <= 3000000
    target.work(job_id, "stop").write_text("")
    target.wait_for(job_id)


def test_a_transfer_killed_midway_resumes_where_it_stopped(target: Target) -> None:
    size = 4 * rawstream.RAW_STREAM_MIN
    job_id = target.submit(target.make_job("bigjob"))
    target.wait_for(job_id)
    with open(target.work(job_id, "big.bin"), "wb") as out:
        out.write(os.urandom(size))
    expected = target.work(job_id, "big.bin").read_bytes()
    argv = [sys.executable, "-m", "tej", "sync", target.destination, "--queue", target.queue]
    argv += [*target.ssh_args, "--id", job_id]
    for attempt in range(5):  # a kill may land after the last byte: then try again
        to = target.src_dir / f"big{attempt}"
        partials = to / ".tej-sync" / "partial"
        client = subprocess.Popen(
            [*argv, "--to", str(to)], env=target.client_env, stdout=subprocess.DEVNULL
        )

        def midway(partials: Path = partials) -> bool:
            found = list(partials.glob("*")) if partials.exists() else []
            return any(0 < path.stat().st_size < size // 2 for path in found if path.exists())

        try:
            wait_until(midway, 30, "a partial file", interval=0.002)
        finally:
            kill_tree(client.pid)
            client.wait()
        if not (to / "big.bin").exists():
            break
        assert (to / "big.bin").read_bytes() == expected  # never half-written in place
    assert not (to / "big.bin").exists(), "each of 5 syncs ended before it was killed"
    done = min(path.stat().st_size for path in partials.glob("*"))
    summary = sync_json(target, job_id, "--to", str(to))
    assert summary["bytes_sent"] <= size - done + 200
    assert (to / "big.bin").read_bytes() == target.work(job_id, "big.bin").read_bytes()
    assert list(partials.glob("*")) == []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started (the client dying with its ssh)."""
    family = [pid]
    for _ in range(3):  # children, grandchildren...
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) in family:
                family.append(int(entry.name))
    for member in set(family):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    wait_until(lambda: not any(process_alive(p) for p in family[1:]), 10, "the client's children")
