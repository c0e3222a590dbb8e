"""A session's first request travels with the bootstrap: the loader answers it (status, list,
sync_list) before execnet starts, and the session goes on over execnet as usual after it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Target

import tej
from tej import protocol
from tej.server.files import json_loads

SYNC_DEADLINE = 120.0


def finished_job(target: Target, **kwargs: object) -> str:
    """A job submitted with the CLI, once it has finished."""
    job_id = target.submit(target.make_job(**kwargs))  # type: ignore[arg-type]
    target.wait_for(job_id)
    return job_id


@pytest.mark.timeout(120)
def test_status_is_answered_with_the_bootstrap_and_the_session_goes_on(target: Target) -> None:
    job_id = finished_job(target)
    with target.api() as remote:  # opened without a first request: execnet starts at once
        assert remote.session()._gateway is not None
    remote = target.api()
    try:
        assert remote.status(job_id).state is tej.JobState.FINISHED
        session = remote.session()
        assert session._gateway is None, "the first request went over execnet"
        assert session.server["protocol"] == protocol.PROTOCOL_VERSION  # the handshake's too
        assert [status.id for status in remote.list()] == [job_id]  # execnet starts here
        assert remote.session() is session and session._gateway is not None
        assert remote.status(job_id).exit_code == 0
    finally:
        remote.close()


@pytest.mark.timeout(120)
def test_an_early_error_reply_leaves_the_session_usable(target: Target) -> None:
    job_id = finished_job(target)
    remote = target.api()
    try:
        with pytest.raises(tej.JobNotFound):
            remote.status("nosuchjob")
        session = remote.session()
        assert remote.status(job_id).state is tej.JobState.FINISHED
        assert remote.session() is session
    finally:
        remote.close()


@pytest.mark.timeout(300)
def test_a_long_first_listing_comes_raw_with_the_bootstrap(target: Target) -> None:
    """A listing's columns (bytes) travel raw before the early answers' line, not as text:
    a sync where nothing changed starts no execnet at all."""
    names = [f"a-file-with-a-rather-long-name-{number:05d}.txt" for number in range(2000)]
    job_id = finished_job(target, files={name: name for name in names})
    remote = target.api()
    try:
        summary = remote.sync(job_id, str(target.src_dir / "mirror"))
        assert remote.session()._gateway is not None  # for the files' contents
    finally:
        remote.close()
    assert summary.files_sent == len(names) + 1  # and start.sh
    mirrored = [name for name in os.listdir(target.src_dir / "mirror") if name != ".tej-sync"]
    assert sorted(mirrored) == sorted([*names, "start.sh"])
    again = target.api()  # a new session: its first listing is long too
    try:
        assert again.sync(job_id, str(target.src_dir / "mirror")).files_unchanged == len(names) + 1
        assert again.session()._gateway is None, "the listing went over execnet"
    finally:
        again.close()


def test_the_cli_answers_status_and_its_errors_with_the_bootstrap(target: Target) -> None:
    job_id = finished_job(target)
    assert target.status(job_id)["state"] == "finished"
    done = target.cli("status", "--id", "nosuchjob", check=3)
    assert done.stderr == "No job with that identifier\n", done.stderr


READ_STATUS = """
import sys
sys.path.insert(0, sys.argv[1])
from tej.server.service import Connection
connection = Connection()
args = {"queue": sys.argv[2], "job_id": sys.argv[3]}
reply = connection.handle({"v": %d, "op": "status", "args": args})
print(ascii([reply["ok"], sorted(sys.modules)]))
"""


@pytest.mark.timeout(120)
def test_reading_a_status_loads_neither_json_nor_re(target: Target) -> None:
    if target.kind != "local":
        pytest.skip("the server's modules are looked at on this machine")
    job_id = finished_job(target)
    root = str(Path(tej.__file__).parent.parent)
    where = (target.queue, job_id)
    done = subprocess.run(
        [sys.executable, "-S", "-c", READ_STATUS % protocol.PROTOCOL_VERSION, root, *where],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ok, modules = ast.literal_eval(done.stdout)
    assert ok, done.stdout
    assert [name for name in ("json", "re", "enum", "signal") if name in modules] == []


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": [1.5, true, false, null, "x\\u00e9\\n"]}',
        " \n[1,2] \n",
        '"s"',
        "-0",
        "1e5",
        '{"a": NaN, "b": -Infinity}',
        '{"k": 1, "k": 2}',
        '{"a": "\\ud800"}',
    ],
)
def test_json_loads_reads_what_json_reads(text: str) -> None:
    import json

    assert repr(json_loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize("text", ["", " ", '{"a":1} x', '{"a":', "[1,]", "\ufeff{}", "123abc"])
def test_json_loads_refuses_what_json_refuses(text: str) -> None:
    import json

    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        json_loads(text)


def test_raw_values_come_back_whole_and_a_look_alike_is_not_taken_for_one() -> None:
    """What the agent sends raw (long bytes values, and any that begins like a stand-in)
    is put back in place by the client, whatever the nesting."""
    from tej import remote_agent
    from tej.session import _put_raw

    look_alike = protocol.RAW_PLACEHOLDER + b"0"
    replies = [
        {"ok": True, "result": {"paths": b"a\0" * 4000, "removed": look_alike, "n": 3}},
        {"ok": True, "result": [b"short", (b"\xff" * 2000, "text"), None]},
    ]
    raw: list[bytes] = []
    pulled = remote_agent._pull_raw(replies, raw)
    assert len(raw) == 3
    assert len(ascii(pulled)) < 500  # the long values are not in the line
    assert _put_raw(ast.literal_eval(ascii(pulled)), raw) == replies
