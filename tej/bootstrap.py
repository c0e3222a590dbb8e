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

from tej.destination import agent_command
from tej.process import Process
from tej.protocol import sha256_hex

# Not `from typing import ...`: typing would be loaded before ssh is started.
TYPE_CHECKING = False
if TYPE_CHECKING:
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
LOADER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loader.py")


class Code:
    """A module the agent's side needs: its source and its name in the server's cache."""

    def __init__(self, prefix: str, source: str) -> None:
        self.source = source
        self.digest = sha256_hex(source.encode("utf-8"))
        self.name = f"{prefix}{self.digest[:16]}"


class Bundle:
    """The agent's bundle (tej.server.bundle): its name, and its files' sources and digests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        from tej.server.bundle import describe

        self.name, self.digests = describe(files)
        self.sources = {path: data.decode("utf-8") for path, data in files.items()}


_codes: dict[str, Any] = {}


def gateway_code() -> Code:
    """execnet's gateway_base, as the server's cache names it."""
    if "execnet" not in _codes:
        from tej.gateway import gateway_source

        _codes["execnet"] = Code("tej_execnet_", gateway_source())
    return _codes["execnet"]  # type: ignore[no-any-return]


def agent_bundle() -> Bundle:
    """The agent's bundle, read from this client's files once."""
    if "bundle" not in _codes:
        from tej.server.bundle import read_bundle

        _codes["bundle"] = Bundle(read_bundle(os.path.dirname(os.path.abspath(__file__))))
    return _codes["bundle"]  # type: ignore[no-any-return]


def cache_sources() -> dict[str, Any]:
    """What the server's cache holds for this client, by name: gateway_base's source, and
    the bundle's sources ({relpath: source})."""
    bundle = agent_bundle()
    return {gateway_code().name: gateway_code().source, bundle.name: bundle.sources}


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
    """The loader (tej/loader.py), as the server's cache names it."""
    with open(LOADER_PATH, encoding="utf-8") as stream:
        return Code("tej_loader_", stream.read())


def loader_source(ahead: tuple[str, ...] = ()) -> str:
    """The bootstrap's second line: the loader's stage two (a few functions of
    tej/loader.py) and its call, which runs the whole loader (its source read from
    the next characters of the input, in case the server's cache lacks it: see
    loader_lines) and boots this client's code."""
    source = _loader_text()
    _, found, rest = source.partition(STAGE_TWO_START)
    stage_two = rest.partition(STAGE_TWO_END)[0]
    if not found or not stage_two:
        raise RuntimeError(f"{LOADER_PATH} has no stage two")  # a broken installation
    name = loader_code().name
    gateway, bundle = gateway_code(), agent_bundle()
    call = (gateway.name, gateway.digest), (bundle.name, bundle.digests), tuple(ahead)
    imports = "import os\nimport stat\nimport sys\n"
    # The source follows the line as it is, read by its length (ASCII: characters are
    # bytes): compiled as a string literal, it took the server a millisecond.
    read = f"sys.stdin.read({len(source)})"
    return f"{imports}#{stage_two}\ntej_stage_two({read}, {name!r}, {call!r})\n"


def loader_lines(ahead: tuple[str, ...] = ()) -> bytes:
    """The bootstrap's second line (loader_source), then the loader's source itself."""
    return boot_line(loader_source(ahead)) + _loader_text().encode("ascii")


def _loader_text() -> str:
    """tej/loader.py's source: ASCII only, so that the server reads it by its length."""
    with open(LOADER_PATH, encoding="utf-8") as stream:
        source = stream.read()
    if not source.isascii() or "\r" in source:
        raise RuntimeError(f"{LOADER_PATH} is not plain ASCII")  # a broken installation
    return source
