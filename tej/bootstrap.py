"""Starting the agent: the bootstrap that runs on the server, and the process that carries it.

The bootstrap, line by line on the agent's stdin:

1. stage one (any Python, 2.7 included) reports the server's version, and
   exits there if it is too old;
2. the loader (Python 3.8+) imports execnet's gateway_base and the agent from
   a private cache on the server (``$XDG_CACHE_HOME/tej``, else
   ``~/.cache/tej``, files named by the digest of their source and checked
   against it), so Python keeps their compiled form and a connection costs no
   compilation; it answers with the names it could not find there;
3. only then, and only for those, the source is sent (and written to the
   cache, best effort: a read-only or full home just compiles it every time).

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
MAX_LOGIN_NOISE = 65536
#: Where the server keeps its cache of tej's code, under $XDG_CACHE_HOME or ~/.cache.
CACHE_DIR_NAME = "tej"
#: Cache files not rewritten for this long are removed (when the cache is written to).
CACHE_MAX_AGE = 30 * 86400
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
# The loader (stage two) runs in stage one's namespace, then serves execnet's
# protocol; tej_boot(modules, start) is appended with this connection's values.
LOADER = r'''
import os, stat, sys


def tej_cache_dir():
    """The private cache folder, made if missing; None if it can't be had safely."""
    try:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, CACHE_DIR_NAME)
        if not os.path.isabs(path):
            return None  # no home folder
        try:
            if not os.path.isdir(base):
                os.makedirs(base, 0o700)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        except OSError:
            pass
        info = os.lstat(path)
        # Code is imported from it: only a folder of ours that nobody else can even enter
        # (so that nothing in it, compiled copies included, can be someone else's doing).
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None
        return None if info.st_mode & 0o077 else path
    except Exception:  # no cache, whatever the reason: the source is sent instead
        return None


def tej_sha256(data):
    try:
        from _sha2 import sha256  # the built-in one: no OpenSSL to load
    except ImportError:
        try:
            from _sha256 import sha256
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def tej_import(name, path):
    """Import the file at path as module name (Python caches its compiled form)."""
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader(name, path)
    module = type(sys)(name)
    module.__file__ = path
    module.__loader__ = loader
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def tej_from_cache(cache, name, digest):
    """The module from the cache if its file is ours, private and intact; else None."""
    path = os.path.join(cache, name + ".py")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                return None
            if info.st_mode & 0o022:
                return None
            data = stream.read()
        if tej_sha256(data) != digest:
            return None
        return tej_import(name, path)
    except Exception:  # a damaged or vanished copy: the source is sent instead
        return None


def tej_from_source(cache, name, source):
    """The module from its source: written to the cache and imported, or just run."""
    if cache is not None:
        path = os.path.join(cache, name + ".py")
        temporary = "%s.tmp-%d" % (path, os.getpid())
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(temporary, flags, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(source.encode("utf-8"))
            os.replace(temporary, path)
            try:  # a compiled copy that failed to load
                from importlib.util import cache_from_source

                os.unlink(cache_from_source(path))
            except Exception:
                pass
            return tej_import(name, path)
        except Exception:  # a read-only or full disk: run it from memory
            try:
                os.unlink(temporary)
            except OSError:
                pass
    module = type(sys)(name)
    sys.modules[name] = module
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def tej_prune(cache, keep):
    """Remove what older versions of tej left in the cache."""
    import time

    limit = time.time() - CACHE_MAX_AGE
    for folder in (cache, os.path.join(cache, "__pycache__")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for entry in names:
            if entry.split(".")[0] in keep:
                continue
            path = os.path.join(folder, entry)
            try:
                if os.lstat(path).st_mtime < limit:
                    os.unlink(path)
            except OSError:
                pass


class TejLazyModule(type(sys)):
    """A module that is imported when first used, not when a module imports it."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.tej_real(), attr)

    def tej_real(self):
        """The module itself, imported now (and put in sys.modules in this one's place)."""
        if sys.modules.get(self.__name__) is self:
            sys.modules.pop(self.__name__, None)
        real = __import__(self.__name__)
        self.__dict__.update(real.__dict__)
        return real


class TejProtocol(object):
    """Stands for typing.Protocol as a base class (see tej_typing_stand_in)."""


def tej_typing_stand_in():
    """What execnet's gateway_base uses of typing as it runs, without loading typing.

    It needs a base class for its protocols, overload and cast; the rest is in
    annotations, which it doesn't evaluate. Anything else makes its import fail,
    and it is imported again with typing itself.
    """
    module = type(sys)("typing")
    module.TYPE_CHECKING = False
    module.Protocol = TejProtocol
    module.overload = lambda function: function
    module.cast = lambda kind, value: value
    for name in ("Any", "Callable", "Iterator", "Literal", "MutableSet"):
        setattr(module, name, None)  # in annotations only
    return module


def tej_from_cache_lightly(cache, name, digest):
    """tej_from_cache for execnet's gateway_base, without what it needs only rarely.

    It imports traceback (with linecache, tokenize, textwrap...) only to format
    errors, binding format_exception as a default argument, and typing only for
    its annotations: they would take a quarter of the server's start-up. So
    traceback stands in until it is used, and typing while gateway_base loads.
    """
    if "traceback" not in sys.modules:
        lazy = sys.modules["traceback"] = TejLazyModule("traceback")
        lazy.format_exception = lambda *args, **kwargs: (
            lazy.tej_real().format_exception(*args, **kwargs)
        )
    if "typing" in sys.modules:
        return tej_from_cache(cache, name, digest)
    stand_in = sys.modules["typing"] = tej_typing_stand_in()
    try:
        module = tej_from_cache(cache, name, digest)
    finally:
        if sys.modules.get("typing") is stand_in:
            del sys.modules["typing"]
    return module if module is not None else tej_from_cache(cache, name, digest)


def tej_boot(modules, start):
    """Load the modules [(name, digest)], asking for the source of those not cached."""
    cache = tej_cache_dir()
    loaded = {}
    for name, digest in modules:
        if cache is not None and name == start:
            loaded[name] = tej_from_cache_lightly(cache, name, digest)
        elif cache is not None:
            loaded[name] = tej_from_cache(cache, name, digest)
    missing = [name for name, _ in modules if loaded.get(name) is None]
    sys.stdout.write("TEJ-CACHE%s\n" % "".join(" " + name for name in missing))
    sys.stdout.flush()
    if missing:
        sources = eval(sys.stdin.readline())
        for name in missing:
            loaded[name] = tej_from_source(cache, name, sources[name])
        if cache is not None:
            tej_prune(cache, [name for name, _ in modules])
    base = loaded[start]
    io = base.init_popen_io(base.get_execmodel("thread"))
    io.write(b"1")
    base.serve(io, id="tej-agent")
    # The client has closed the session: end now, without the interpreter's cleanup,
    # which the client would wait for (supervisors are detached: they go on).
    sys.stderr.flush()
    os._exit(0)
'''.replace("CACHE_DIR_NAME", repr(CACHE_DIR_NAME)).replace("CACHE_MAX_AGE", str(CACHE_MAX_AGE))

AGENT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_agent.py")


class Code:
    """A module the agent's side needs: its source and its name in the server's cache."""

    def __init__(self, prefix: str, source: str) -> None:
        self.source = source
        self.digest = sha256_hex(source.encode("utf-8"))
        self.name = f"{prefix}{self.digest[:16]}"


_codes: dict[str, Code] = {}


def agent_code() -> Code:
    """The agent's code (named tej_agent_DIGEST, as its copy in a queue)."""
    if "agent" not in _codes:
        with open(AGENT_PATH, encoding="utf-8") as stream:
            _codes["agent"] = Code("tej_agent_", stream.read())
    return _codes["agent"]


def all_code() -> tuple[Code, Code]:
    """execnet's gateway_base and the agent, as the loader wants them."""
    if "execnet" not in _codes:
        from tej.gateway import gateway_source

        _codes["execnet"] = Code("tej_execnet_", gateway_source())
    return _codes["execnet"], agent_code()


def cache_sources() -> dict[str, str]:
    """What the server's cache holds for this client: {module name: source}, file NAME.py."""
    return {code.name: code.source for code in all_code()}


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


def start(argv: list[str]) -> tuple[AgentIO, IO[bytes]]:
    """Start the agent's process and write the bootstrap's first two lines (OSError if not)."""
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
            io.write(boot_line(loader_source()))
        except OSError:
            pass
    except BaseException:
        _end(io, stderr)
        raise
    return io, stderr


#: Agent processes started ahead of their session, by command line (see prestart).
prestarted: dict[tuple[str, ...], tuple[AgentIO, IO[bytes]]] = {}


def prestart(destination: Destination, options: ConnectOptions) -> None:
    """Start connecting now, for a session that will be opened soon (or not: discard).

    The next Session.open() whose command line is the same takes this process over, so
    the connection is made while the client does other work (the command line loads).
    """
    argv = agent_command(destination, options, BOOTSTRAP_LINE)
    if tuple(argv) not in prestarted:
        try:  # noqa: SIM105 - contextlib would load before ssh starts
            prestarted[tuple(argv)] = start(argv)
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


def loader_source() -> str:
    """The loader's source, with the modules this client wants."""
    modules = [(code.name, code.digest) for code in all_code()]
    return f"{LOADER}\ntej_boot({modules!r}, {modules[0][0]!r})\n"
