"""Starting the agent: the bootstrap that runs on the server, and the process that carries it.

The bootstrap, line by line on the agent's stdin:

1. stage one (any Python, 2.7 included) reports the server's version, and
   exits there if it is too old;
2. the loader (tej/loader.py, Python 3.8+) imports execnet's gateway_base and
   the agent's bundle (tej.server.bundle) from a private cache on the server
   (``$XDG_CACHE_HOME/tej``, else ``~/.cache/tej``, named by the digest of
   their sources and checked against it), so Python keeps their compiled form
   and a connection costs no compilation; it answers with the names it could
   not find there;
3. the session's first requests, if it sends them with the bootstrap (the
   handshake and one of tej.protocol.EARLY_OPERATIONS), else None: the loader
   answers them before execnet is loaded (a line of Python literals), so a
   command like `tej status` has its answer without execnet's start on the
   server, nor a round trip after it;
4. only then, and only for what the cache lacks, the sources are sent (and
   written to the cache, best effort: a read-only or full home runs them from
   memory).

The client writes lines 1 and 2 as soon as the process is started, so a cache
hit costs no round trip more than the version check. This module is kept
small, and imports little, so that `tej` can start the agent before it loads
anything else (see tej.launcher); tej.session takes the process over.
"""

from __future__ import annotations

import os
import time

from tej.destination import agent_command
from tej.errors import TejError
from tej.process import Process
from tej.protocol import sha256_hex

# Not `from typing import ...`: typing would be loaded before ssh is started.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

    from tej.destination import ConnectOptions, Destination

MIN_PYTHON = (3, 8)
BOOT_MARKER = b"TEJ-BOOT "
CACHE_MARKER = b"TEJ-CACHE"
EARLY_MARKER = b"TEJ-EARLY "
MAX_LOGIN_NOISE = 65536
BOOTSTRAP_LINE = "import sys;exec(eval(sys.stdin.readline()))"
# Stage one runs on any Python (2.7 included): it reports the version, and
# only then reads the loader, which needs Python 3.8.
STAGE_ONE = (
    "import sys\n"
    "v = sys.version_info\n"
    "sys.stdout.write('\\nTEJ-BOOT %d.%d.%d\\n' % (v[0], v[1], v[2]))\n"
    "sys.stdout.flush()\n"
    f"if v < {MIN_PYTHON!r}:\n"
    "    sys.exit(3)\n"
    "exec(eval(sys.stdin.readline()))\n"
)
GATEWAY_PREFIX = "tej_execnet_"
CHANGED_WHILE_RUNNING = "tej's own files changed while this command ran (an upgrade?): run it again"
LOADER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loader.py")


class Code:
    """A module the agent's side needs: its digest, its name in the server's cache, and its
    source (read only when the server's cache lacks it, and checked against the digest)."""

    def __init__(self, prefix: str, digest: str, read: Callable[[], str]) -> None:
        self.digest = digest
        self.name = f"{prefix}{digest[:16]}"
        self._read = read
        self._source: str | None = None

    @classmethod
    def of_source(cls, prefix: str, source: str) -> Code:
        """The Code of a source already read."""
        code = cls(prefix, sha256_hex(source.encode("utf-8")), lambda: source)
        code._source = source
        return code

    @property
    def source(self) -> str:
        """The module's source, as its digest says."""
        if self._source is None:
            source = self._read()
            if sha256_hex(source.encode("utf-8")) != self.digest:
                raise TejError(CHANGED_WHILE_RUNNING)
            self._source = source
        return self._source


class Bundle:
    """The agent's bundle (tej.server.bundle) under root: its name, its files' digests, and
    their sources (read only when the server's cache lacks them)."""

    def __init__(self, root: str) -> None:
        from tej.server.bundle import bundle_name, bundle_paths

        self.root = root
        self.digests = file_digests(root, bundle_paths(root))
        self.name = bundle_name(self.digests)
        self._sources: dict[str, str] | None = None

    @property
    def sources(self) -> dict[str, str]:
        """{relpath: source} of the bundle's files, as their digests say."""
        if self._sources is None:
            from tej.server.bundle import describe, read_bundle

            files = read_bundle(self.root)
            if describe(files) != (self.name, self.digests):
                raise TejError(CHANGED_WHILE_RUNNING)
            self._sources = {path: data.decode("utf-8") for path, data in files.items()}
        return self._sources


def file_digests(root: str, relpaths: list[str]) -> dict[str, str]:
    """The sha256 (hex) of files under root, by relative path: from the client's hash cache
    where stat says a file is the one it hashed (tej.hashcache), so that a command names
    tej's code to the server without reading it."""
    from tej.hashcache import HashCache, file_stamp

    cache = HashCache(root)
    digests, keys = {}, []
    for relpath in relpaths:
        path = os.path.join(root, relpath)
        key = (os.fsencode(relpath), file_stamp(os.stat(path)))
        digest = cache.get(key)
        if digest is None:
            started = time.time_ns()
            with open(path, "rb") as stream:
                digest = sha256_hex(stream.read())
            cache.put(key, digest, started)
        digests[relpath] = digest
        keys.append(key)
    cache.save(keys)
    return digests


_codes: dict[str, Any] = {}


def gateway_code() -> Code:
    """execnet's gateway_base, as the server's cache names it."""
    if "execnet" not in _codes:
        from tej.gateway import gateway_source, source_path

        path = source_path()
        if path is None:  # not a plain file: read (and hashed) as the module's source
            _codes["execnet"] = Code.of_source(GATEWAY_PREFIX, gateway_source())
        else:
            folder, name = os.path.split(path)
            digest = file_digests(folder, [name])[name]
            _codes["execnet"] = Code(GATEWAY_PREFIX, digest, gateway_source)
    return _codes["execnet"]  # type: ignore[no-any-return]


def agent_bundle() -> Bundle:
    """The agent's bundle, as this client's files are."""
    if "bundle" not in _codes:
        _codes["bundle"] = Bundle(os.path.dirname(os.path.abspath(__file__)))
    return _codes["bundle"]  # type: ignore[no-any-return]


def cache_names() -> tuple[str, str]:
    """The names that the server's cache may lack: gateway_base's and the bundle's."""
    return gateway_code().name, agent_bundle().name


def cache_sources(names: tuple[str, ...]) -> dict[str, Any]:
    """What the server's cache lacks, by name (see cache_names): gateway_base's source, the
    bundle's sources ({relpath: source})."""
    gateway, bundle = gateway_code(), agent_bundle()
    sources = {gateway.name: lambda: gateway.source, bundle.name: lambda: bundle.sources}
    return {name: sources[name]() for name in names}


class AgentIO:
    """The agent's process, and its pipes as execnet's gateway reads and writes them."""

    def __init__(self, args: list[str], stderr: IO[bytes]) -> None:
        self.popen = process = Process(args, stderr)
        self._in = process.stdout
        self._out = process.stdin
        self.execmodel: Any = None  # set once execnet is imported

    def read(self, numbytes: int) -> bytes:
        """Read exactly numbytes bytes; EOFError if the pipe ends first."""
        buf = b""
        while numbytes > len(buf):
            data = self._in.read(numbytes - len(buf))
            if not data:
                raise EOFError(f"expected {numbytes} bytes, got {len(buf)}")
            buf += data
        return buf

    def readline(self) -> bytes:
        """One line, with its newline; EOFError if the pipe ends first."""
        line = self._in.readline()
        if not line.endswith(b"\n"):
            raise EOFError("the agent's output ended")
        return line

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def close_read(self) -> None:
        self._in.close()

    def close_write(self) -> None:
        self._out.close()

    def kill(self) -> None:
        self.popen.kill()

    def wait(self) -> int | None:
        return self.popen.wait()


def start(argv: list[str], ahead: tuple[str, ...] = ()) -> tuple[AgentIO, IO[bytes]]:
    """Start the agent's process and write the bootstrap's first two lines (OSError if not).

    ahead names the operation the session will likely send first: the agent imports
    what answering it needs while the client is still on its way (see tej/loader.py).
    """
    stderr = _temporary_file()
    try:
        io = AgentIO(argv, stderr)
    except BaseException:
        stderr.close()
        raise
    # While the server starts: import execnet, send the loader. If the process has exited
    # already, the version line (or its absence) says why.
    try:
        try:
            io.write(boot_line(STAGE_ONE))
            io.write(loader_lines(ahead))
        except OSError:
            pass
    except BaseException:
        _end(io, stderr)
        raise
    return io, stderr


#: Agent processes started ahead of their session, by command line (see prestart).
prestarted: dict[tuple[str, ...], tuple[AgentIO, IO[bytes]]] = {}


def prestart(
    destination: Destination, options: ConnectOptions, ahead: tuple[str, ...] = ()
) -> None:
    """Start connecting now, for a session that will be opened soon (or not: discard).

    The next Session.open() whose command line is the same takes this process over, so
    the connection is made while the client does other work (the command line loads).
    """
    argv = agent_command(destination, options, BOOTSTRAP_LINE)
    if tuple(argv) not in prestarted:
        try:  # noqa: SIM105 - contextlib would load before ssh starts
            prestarted[tuple(argv)] = start(argv, ahead)
        except OSError:
            pass


def discard_prestarted() -> None:
    """End the processes that prestart() started and no session took over."""
    while prestarted:
        _end(*prestarted.popitem()[1])


def _end(io: AgentIO, stderr: IO[bytes]) -> None:
    """Kill a process that no session uses, and wait for it."""
    io.kill()
    io.popen.wait()
    for stream in (io.popen.stdin, io.popen.stdout, stderr):
        try:  # noqa: SIM105 - as above
            stream.close()
        except OSError:
            pass


def _temporary_file() -> IO[bytes]:
    """An unnamed temporary file for the process's stderr (without tempfile where it can)."""
    flags = getattr(os, "O_TMPFILE", 0)
    if flags:  # Linux: made unnamed, in one call
        try:
            fd = os.open(os.environ.get("TMPDIR") or "/tmp", flags | os.O_RDWR, 0o600)
        except OSError:
            pass
        else:
            return os.fdopen(fd, "w+b")
    import tempfile

    return tempfile.TemporaryFile()


def boot_line(value: object) -> bytes:
    """A line that the bootstrap on the server reads and evaluates."""
    return (ascii(value) + "\n").encode("ascii")


#: The part of the loader compiled on every connection (see tej/loader.py, stage two).
STAGE_TWO_START = "# -- stage two --"
STAGE_TWO_END = "# -- end of stage two --"


def loader_code() -> Code:
    """The loader (tej/loader.py), as the server's cache names it: ASCII only, so that the
    server reads its source by its length."""
    if "loader" not in _codes:
        with open(LOADER_PATH, encoding="utf-8") as stream:
            source = stream.read()
        if not source.isascii() or "\r" in source:
            raise RuntimeError(f"{LOADER_PATH} is not plain ASCII")  # a broken installation
        _codes["loader"] = Code.of_source("tej_loader_", source)
    return _codes["loader"]  # type: ignore[no-any-return]


def loader_source(ahead: tuple[str, ...] = ()) -> str:
    """The bootstrap's second line: the loader's stage two (a few functions of
    tej/loader.py) and its call, which runs the whole loader (its source read from
    the next characters of the input, in case the server's cache lacks it: see
    loader_lines) and boots this client's code."""
    loader = loader_code()
    _, found, rest = loader.source.partition(STAGE_TWO_START)
    stage_two = rest.partition(STAGE_TWO_END)[0]
    if not found or not stage_two:
        raise RuntimeError(f"{LOADER_PATH} has no stage two")  # a broken installation
    gateway, bundle = gateway_code(), agent_bundle()
    call = (gateway.name, gateway.digest), (bundle.name, bundle.digests), tuple(ahead)
    imports = "import os\nimport stat\nimport sys\n"
    # The source follows the line as it is, read by its length (ASCII: characters are
    # bytes): compiled as a string literal, it took the server a millisecond.
    read = f"sys.stdin.read({len(loader.source)})"
    return f"{imports}#{stage_two}\ntej_stage_two({read}, {loader.name!r}, {call!r})\n"


def loader_lines(ahead: tuple[str, ...] = ()) -> bytes:
    """The bootstrap's second line (loader_source), then the loader's source itself."""
    return boot_line(loader_source(ahead)) + loader_code().source.encode("ascii")
