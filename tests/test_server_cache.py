"""The server's cache of tej's code: used when it is safe and intact, never needed.

A connection imports execnet's gateway_base (a file) and the agent's bundle (a folder) from
a private folder on the server ($XDG_CACHE_HOME/tej, else ~/.cache/tej), where Python keeps
their compiled form;
the client sends their source only when the cache misses. Each test points the agent at a
cache folder of its own: through the environment for `local` (the agent inherits it), and
through a --python wrapper over ssh (as the unprivileged SSH user, so permissions apply).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SshServer, is_root

import tej
from tej import bootstrap, hashcache
from tej.errors import TejError
from tej.loader import CACHE_MAX_AGE, STAMP_FILE
from tej.protocol import sha256_hex
from tej.server.bundle import describe, read_bundle

NOBODY = 65534


def sources() -> dict[str, str]:
    """The cache's files as the client would have them written: {relative path: source}."""
    files = {}
    for name, source in bootstrap.cache_sources(bootstrap.cache_names()).items():
        if isinstance(source, str):
            files[f"{name}.py"] = source
        else:
            files.update({f"{name}/{path}": text for path, text in source.items()})
    return files


def names() -> set[str]:
    """The names the loader asks for: gateway_base's and the bundle's."""
    return set(bootstrap.cache_names())


def bundle_name() -> str:
    return bootstrap.agent_bundle().name


def compiled_names(cache: Path) -> set[str]:
    """The modules compiled in the cache, by what holds them (gateway_base, or the bundle)."""
    found = {path.name.split(".")[0] for path in (cache / "__pycache__").iterdir()}
    if any((cache / bundle_name()).rglob("__pycache__/*.pyc")):
        found.add(bundle_name())
    return found


def connect(remote: tej.RemoteQueue) -> tuple[str, ...]:
    """Open a new session, use it, close it; return the modules whose source was sent."""
    remote.close()
    assert remote.list() == []
    sent = remote.session().sent_sources
    remote.close()
    return sent


def plant(folder: Path, mode: int = 0o600) -> None:
    """Write correct copies of the cached files into folder."""
    for name, source in sources().items():
        path = folder / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(source)
        path.chmod(mode)


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """XDG_CACHE_HOME for the `local` agent: the cache is the `tej` folder in it."""
    base = tmp_path / "cache-home"
    base.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # for the agent: it inherits
    yield base / "tej"


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tej.RemoteQueue]:
    queue = tej.RemoteQueue("local", str(tmp_path / "queue"))
    yield queue
    queue.close()


# `local`: hit and miss, and the copies that are not used


def test_a_miss_then_a_hit(local_cache: Path, remote: tej.RemoteQueue) -> None:
    assert set(connect(remote)) == names(), "an empty cache: both sources are sent"
    assert stat.S_IMODE(local_cache.stat().st_mode) == 0o700
    for name, source in sources().items():
        path = local_cache / name
        assert path.read_text() == source
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert compiled_names(local_cache) == names()
    assert connect(remote) == (), "the second connection sends no source"
    assert connect(remote) == ()


def test_a_cache_writable_by_others_is_not_used(local_cache: Path, remote: tej.RemoteQueue) -> None:
    local_cache.mkdir()
    plant(local_cache)
    local_cache.chmod(0o777)
    before = listing(local_cache)
    assert set(connect(remote)) == names()
    assert listing(local_cache) == before, "tej wrote into a folder that others can write to"


def test_a_cache_others_can_enter_is_not_used(local_cache: Path, remote: tej.RemoteQueue) -> None:
    local_cache.mkdir()
    plant(local_cache)
    local_cache.chmod(0o755)
    before = listing(local_cache)
    assert set(connect(remote)) == names()
    assert listing(local_cache) == before


@pytest.mark.skipif(not is_root(), reason="only root can give a folder to someone else")
def test_a_cache_owned_by_someone_else_is_not_used(
    local_cache: Path, remote: tej.RemoteQueue
) -> None:
    local_cache.mkdir(mode=0o700)
    plant(local_cache)
    os.chown(local_cache, NOBODY, NOBODY)
    before = listing(local_cache)
    assert set(connect(remote)) == names()
    assert listing(local_cache) == before


def test_a_cached_file_writable_by_others_is_replaced(
    local_cache: Path, remote: tej.RemoteQueue
) -> None:
    local_cache.mkdir(mode=0o700)
    plant(local_cache, mode=0o666)
    assert set(connect(remote)) == names()
    for name in sources():
        assert stat.S_IMODE((local_cache / name).stat().st_mode) == 0o600
    assert connect(remote) == ()


def agent_copy(cache: Path) -> Path:
    """The agent's entry point in the cache's copy of the bundle."""
    return cache / bundle_name() / "remote_agent.py"


def test_a_changed_copy_is_not_run(
    local_cache: Path, remote: tej.RemoteQueue, tmp_path: Path
) -> None:
    assert set(connect(remote)) == names()
    agent = agent_copy(local_cache)
    good = agent.read_bytes()
    marker = tmp_path / "tampered"
    agent.write_bytes(b"open(%r, 'w').close()\n" % str(marker).encode() + good)
    shutil.rmtree(agent.parent / "__pycache__")
    assert connect(remote) == (bundle_name(),)
    assert not marker.exists(), "the changed copy was run"
    assert agent.read_bytes() == good, "the changed copy is replaced"
    assert connect(remote) == ()


def test_a_damaged_copy_is_detected_by_its_digest(
    local_cache: Path, remote: tej.RemoteQueue
) -> None:
    """Same size, same time: Python alone would trust its compiled copy; the digest does not."""
    assert set(connect(remote)) == names()
    agent = agent_copy(local_cache)
    good = agent.read_bytes()
    info = agent.stat()
    agent.write_bytes(good[:100] + b"\0" * 100 + good[200:])
    os.utime(agent, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert connect(remote) == (bundle_name(),)
    assert agent.read_bytes() == good
    assert connect(remote) == ()


def test_an_intact_bundle_is_stamped_and_a_stale_stamp_is_not_trusted(
    local_cache: Path, remote: tej.RemoteQueue
) -> None:
    """Once found intact, the bundle's files are known by their stat (a stamp), not hashed."""
    assert set(connect(remote)) == names()
    stamp = local_cache / bundle_name() / STAMP_FILE
    stamped = stamp.read_text()
    assert sorted(line.split()[0] for line in stamped.splitlines()) == sorted(
        bootstrap.agent_bundle().digests
    )
    assert stat.S_IMODE(stamp.stat().st_mode) == 0o600
    assert connect(remote) == ()
    assert stamp.read_text() == stamped, "an intact bundle's stamp is kept as it is"
    stamp.write_text("garbage\n")
    assert connect(remote) == (), "a stale stamp: the files are hashed, and found intact"
    assert stamp.read_text() == stamped, "then stamped again"
    agent = agent_copy(local_cache)
    good = agent.read_bytes()
    agent.write_bytes(good.replace(b"def serve", b"def SERVE"))
    assert connect(remote) == (bundle_name(),), "a file changed since its stamp is hashed"
    assert agent.read_bytes() == good


def test_the_loader_runs_compiled_from_the_cache_and_only_as_sent(
    local_cache: Path, remote: tej.RemoteQueue, tmp_path: Path
) -> None:
    """The loader's bulk is compiled once: later connections compile its stage two only."""
    loader = bootstrap.loader_code()
    cached = local_cache / f"{loader.name}.py"
    assert set(connect(remote)) == names()
    assert cached.read_text() == loader.source, "the loader caches itself"
    assert connect(remote) == ()
    assert list((local_cache / "__pycache__").glob(f"{loader.name}.*.pyc")), "run compiled"
    marker = tmp_path / "tampered"
    cached.write_text(f"open({str(marker)!r}, 'w').close()\n" + loader.source)
    assert connect(remote) == ()
    assert not marker.exists(), "a cached loader unlike the one sent was run"
    assert cached.read_text() == loader.source, "and it is written again"


def test_a_damaged_compiled_copy_is_replaced(local_cache: Path, remote: tej.RemoteQueue) -> None:
    """Python trusts a compiled copy by its header: the loader replaces a damaged one itself."""
    assert set(connect(remote)) == names()
    damaged = {}
    for compiled in local_cache.rglob("__pycache__/*.pyc"):
        data = compiled.read_bytes()
        damaged[compiled] = data[:16] + b"\xff" * (len(data) - 16)  # header kept
        compiled.write_bytes(damaged[compiled])
    assert len(damaged) >= 2
    assert connect(remote) == (), "the sources are intact: none is sent"
    for compiled, data in damaged.items():
        assert compiled.read_bytes() != data, f"{compiled} was not replaced"
    assert connect(remote) == ()


def test_a_cache_that_cannot_be_made_costs_nothing_but_the_source(
    monkeypatch: pytest.MonkeyPatch, remote: tej.RemoteQueue
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/tej-test-cache")  # not even root can write here
    assert set(connect(remote)) == names()
    assert set(connect(remote)) == names()


def test_old_versions_are_pruned_on_a_miss(local_cache: Path, remote: tej.RemoteQueue) -> None:
    local_cache.mkdir(mode=0o700)
    (local_cache / "__pycache__").mkdir(mode=0o700)
    old = [local_cache / "tej_agent_0123456789abcdef.py"]
    old.append(local_cache / "__pycache__" / "tej_agent_0123456789abcdef.cpython-311.pyc")
    recent = local_cache / "tej_agent_fedcba9876543210.py"
    for path in [*old, recent]:
        path.write_text("raise SystemExit('never imported')\n")
    month_ago = os.path.getmtime(recent) - CACHE_MAX_AGE - 60
    for path in old:
        os.utime(path, (month_ago, month_ago))
    assert set(connect(remote)) == names()
    assert not any(path.exists() for path in old), listing(local_cache)
    assert recent.exists(), "a recent copy may be another client's"


# over ssh, as the SSH user: a read-only cache, and the home's default cache


def wrapper_python(server_tmp: str, server: SshServer, cache_home: str) -> str:
    """A --python that runs the server's python3 with XDG_CACHE_HOME=cache_home."""
    path = Path(server_tmp) / "python-cache"
    path.write_text(f'#!/bin/sh\nXDG_CACHE_HOME={cache_home} exec python3 "$@"\n')
    path.chmod(0o755)
    if is_root():
        os.chown(path, server.uid, server.gid)
    return str(path)


def ssh_remote(server: SshServer, server_tmp: str, python: str | None) -> tej.RemoteQueue:
    return tej.RemoteQueue(
        server.alias,
        f"{server_tmp}/queue",
        ssh_config=server.config_path,
        python=python,
        reuse_connection=False,
    )


@pytest.mark.ssh
def test_a_read_only_cache_over_ssh(ssh_server: SshServer, server_tmp: str) -> None:
    cache_home = Path(server_tmp) / "cache-home"
    (cache_home / "tej").mkdir(parents=True)
    if is_root():
        for path in (cache_home, cache_home / "tej"):
            os.chown(path, ssh_server.uid, ssh_server.gid)
    (cache_home / "tej").chmod(0o500)
    remote = ssh_remote(ssh_server, server_tmp, wrapper_python(server_tmp, ssh_server, cache_home))
    try:
        assert set(connect(remote)) == names()
        assert set(connect(remote)) == names()
    finally:
        remote.close()
        (cache_home / "tej").chmod(0o700)
    assert listing(cache_home / "tej") == []


@pytest.mark.ssh
def test_a_fresh_cache_over_ssh(ssh_server: SshServer, server_tmp: str) -> None:
    cache_home = Path(server_tmp) / "cache-home"
    remote = ssh_remote(ssh_server, server_tmp, wrapper_python(server_tmp, ssh_server, cache_home))
    try:
        assert set(connect(remote)) == names()
        assert connect(remote) == ()
    finally:
        remote.close()
    cache = cache_home / "tej"
    info = cache.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (ssh_server.uid, 0o700)
    loader = bootstrap.loader_code().name  # the loader caches itself
    assert {path.stem for path in cache.glob("*.py")} | {bundle_name()} == names() | {loader}
    assert (cache / bundle_name() / "remote_agent.py").is_file()


@pytest.mark.ssh
def test_the_default_cache_is_in_the_home(ssh_server: SshServer, server_tmp: str) -> None:
    """Without XDG_CACHE_HOME: ~/.cache/tej, shared by every connection of the user."""
    remote = ssh_remote(ssh_server, server_tmp, None)
    try:
        connect(remote)
        assert connect(remote) == ()
    finally:
        remote.close()
    cache = Path(ssh_server.home) / ".cache" / "tej"
    assert set(sources()) <= {str(path.relative_to(cache)) for path in cache.rglob("*")}


def test_the_cache_is_not_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home that is a file: no cache, and the commands work as ever."""
    home = tmp_path / "home-file"
    home.write_text("")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    remote = tej.RemoteQueue("local", str(tmp_path / "queue"))
    try:
        assert set(connect(remote)) == names()
    finally:
        remote.close()


# -- the client's side: naming its code without reading it ------------------------------------


def copied_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tej package (the bundle's files), with a hash cache of its own."""
    root = tmp_path / "tej"
    shutil.copytree(Path(tej.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "client-cache"))
    return root


def counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what the bootstrap hashes from now on (its files' contents)."""
    hashed: list[int] = []
    original = bootstrap.sha256_hex

    def counting(data: bytes) -> str:
        hashed.append(len(data))
        return original(data)

    monkeypatch.setattr(bootstrap, "sha256_hex", counting)
    return hashed


def test_the_client_names_its_bundle_from_stat_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copied_package(tmp_path, monkeypatch)
    monkeypatch.setattr(hashcache, "CACHE_MARGIN", 0)  # the copies are trusted at once
    expected = describe(read_bundle(str(root)))
    hashed = counting_hashes(monkeypatch)
    first = bootstrap.Bundle(str(root))
    assert (first.name, first.digests) == expected
    assert len(hashed) == len(expected[1]), "each file read and hashed once"
    second = bootstrap.Bundle(str(root))
    assert (second.name, second.digests) == expected
    assert len(hashed) == len(expected[1]), "then named from the hash cache: nothing read"
    (root / "server" / "files.py").write_text("# changed\n")
    third = bootstrap.Bundle(str(root))
    assert len(hashed) == len(expected[1]) + 1, "a file whose stamp changed is hashed again"
    assert third.name != first.name
    assert third.digests["server/files.py"] == sha256_hex(b"# changed\n")


def test_sources_that_changed_since_they_were_named_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle's sources are read only when a server lacks them: if a file changed since its
    digest was taken, sending it under that digest would poison the server's cache."""
    root = copied_package(tmp_path, monkeypatch)
    bundle = bootstrap.Bundle(str(root))
    (root / "server" / "files.py").write_text("# changed while the command ran\n")
    with pytest.raises(TejError, match="files changed while this command ran"):
        bundle.sources  # noqa: B018 - the property reads them
    intact = bootstrap.Bundle(str(root))
    assert intact.sources["server/files.py"] == "# changed while the command ran\n"
