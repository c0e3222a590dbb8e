"""A session: start the agent on a destination and exchange requests with it.

The agent is started through our own bootstrap rather than execnet's
``makegateway``, for three reasons: the ssh command line is ours (BatchMode,
timeouts, keepalives, no forced compression), the server's stderr is captured
so failures become one clear line, and the server's Python version is checked
before execnet's own code is sent to it.

The bootstrap, line by line on the agent's stdin:

1. stage one (any Python, 2.7 included) reports the server's version, and
   exits there if it is too old;
2. the loader (Python 3.8+) imports execnet's gateway_base and the agent from
   a private cache on the server (``$XDG_CACHE_HOME/tej``, else
   ``~/.cache/tej``, files named by the digest of their source), so Python
   keeps their compiled form and a connection costs no compilation; it
   answers with the names it could not find there;
3. only then, and only for those, the source is sent (and written to the
   cache, best effort: a read-only or full home just compiles it every time).

The client writes lines 1 and 2 at once, so a cache hit costs no round trip
more than the version check, and the ssh connection is started before the
client imports execnet.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import subprocess
import tempfile
import threading
from typing import IO, TYPE_CHECKING, Any

from tej.destination import ConnectOptions, Destination, agent_command
from tej.errors import (
    ConnectionFailed,
    ProtocolError,
    ServerPythonError,
    TejError,
    error_from_reply,
)
from tej.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import execnet

MIN_PYTHON = (3, 8)
BOOT_MARKER = b"TEJ-BOOT "
CACHE_MARKER = b"TEJ-CACHE"
MAX_LOGIN_NOISE = 65536
#: Where the server keeps its cache of tej's code, under $XDG_CACHE_HOME or ~/.cache.
CACHE_DIR_NAME = "tej"
#: Cache files not rewritten for this long are removed (when the cache is written to).
CACHE_MAX_AGE = 30 * 86400
_BOOTSTRAP_LINE = "import sys;exec(eval(sys.stdin.readline()))"
# Stage one runs on any Python (2.7 included): it reports the version, and
# only then reads the loader, which needs Python 3.8.
_STAGE_ONE = (
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
_LOADER = r'''
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
        except OSError:
            pass
        info = os.lstat(path)
        # Only a folder of ours that nobody else can write to: code is imported from it.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None
        return None if info.st_mode & 0o022 else path
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


def tej_boot(modules, start):
    """Load the modules [(name, digest)], asking for the source of those not cached."""
    cache = tej_cache_dir()
    loaded = {}
    for name, digest in modules:
        if cache is not None:
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
_gateway_ids = itertools.count(1)


class _Code:
    """A module the agent's side needs: its source and its name in the server's cache."""

    def __init__(self, prefix: str, source: str) -> None:
        import hashlib

        self.source = source
        self.digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
        self.name = f"{prefix}{self.digest[:16]}"


@functools.lru_cache(maxsize=None)
def _agent() -> _Code:
    """The agent's code (named tej_agent_DIGEST, as its copy in a queue)."""
    with open(AGENT_PATH, encoding="utf-8") as stream:
        return _Code("tej_agent_", stream.read())


@functools.lru_cache(maxsize=None)
def _code() -> tuple[_Code, _Code]:
    """execnet's gateway_base and the agent, as the loader wants them."""
    from execnet import gateway_base

    loader: Any = gateway_base.__loader__
    return _Code("tej_execnet_", loader.get_source(gateway_base.__name__)), _agent()


def __getattr__(name: str) -> str:
    """AGENT_SOURCE and AGENT_DIGEST, read when first needed (not by every import)."""
    if name == "AGENT_SOURCE":
        return _agent().source
    if name == "AGENT_DIGEST":
        return _agent().name[len("tej_agent_") :]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cache_sources() -> dict[str, str]:
    """What the server's cache holds for this client: {module name: source}, file NAME.py."""
    return {code.name: code.source for code in _code()}


class _AgentIO:
    """The agent's process, and its pipes as execnet's gateway reads and writes them."""

    def __init__(self, args: list[str], stderr: IO[bytes]) -> None:
        self.popen = process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        assert process.stdin is not None and process.stdout is not None
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
        with contextlib.suppress(OSError):
            self.popen.kill()

    def wait(self) -> int | None:
        return self.popen.wait()


class Session:
    """One connection to the agent on a destination, serving many requests."""

    def __init__(
        self,
        destination: Destination,
        options: ConnectOptions | None = None,
        request_timeout: float = 300.0,
    ) -> None:
        self.destination = destination
        self.options = options or ConnectOptions()
        self.request_timeout = request_timeout
        self._server: dict[str, Any] = {}
        self._hello_pending = False
        self._stderr: IO[bytes] | None = None
        self._io: _AgentIO | None = None
        self._group: execnet.Group | None = None
        self._channel: Any = None
        #: The modules whose source had to be sent (not in the server's cache).
        self.sent_sources: tuple[str, ...] = ()

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # opening and closing

    def open(self) -> None:
        """Start the agent on the destination and shake hands with it."""
        argv = agent_command(self.destination, self.options, _BOOTSTRAP_LINE)
        started = _prestarted.pop(tuple(argv), None)
        if started is None:
            try:
                started = _start(argv)
            except OSError as exc:
                self.close()
                raise self._start_failure(argv[0], exc) from None
        self._io, self._stderr = started
        try:
            self._bootstrap(self._io)
            self._channel = self._start_agent(self._io)
            # Its reply is read with the first request's: no round trip of its own.
            digest = _agent().name[len("tej_agent_") :]
            self._send("hello", {"protocol": PROTOCOL_VERSION, "digest": digest})
            self._hello_pending = True
        except BaseException:
            self.close()
            raise

    def _start_failure(self, program: str, exc: OSError) -> TejError:
        if self.destination.is_local:
            return ServerPythonError(
                f"Cannot run Python {program!r}: {exc.strerror}; choose one with --python"
            )
        return ConnectionFailed(f"Cannot run {program!r}: {exc.strerror}")

    def _bootstrap(self, io: _AgentIO) -> None:
        """Check the server's Python, then load execnet's code there; with a deadline."""
        watchdog = threading.Timer(self._bootstrap_timeout(), io.popen.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            version = self._read_boot_line(io)
            if version < MIN_PYTHON:
                raise ServerPythonError(
                    f"Python {'.'.join(map(str, version))} on {self.destination} is too old: "
                    f"tej needs Python {'.'.join(map(str, MIN_PYTHON))} or newer (see --python)"
                )
            missing = self._read_cache_line(io)
            self.sent_sources = tuple(missing)
            if missing:
                io.write(_line({name: cache_sources()[name] for name in missing}))
            if io.read(1) != b"1":
                raise ProtocolError(f"The agent on {self.destination} did not start properly")
        except (EOFError, OSError, ValueError):
            raise self._failure_from_exit(watchdog.is_alive()) from None
        finally:
            watchdog.cancel()

    def _bootstrap_timeout(self) -> float:
        return self.options.connect_timeout * 2 + 30.0

    def _read_cache_line(self, io: _AgentIO) -> list[str]:
        """The loader's answer: the names of the modules whose source it needs."""
        line = io.readline()
        if not line.startswith(CACHE_MARKER):
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        names = line[len(CACHE_MARKER) :].decode("ascii", "replace").split()
        if not set(names) <= set(cache_sources()):
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        return names

    def _read_boot_line(self, io: _AgentIO) -> tuple[int, ...]:
        """Skip what login scripts print, up to the line that gives Python's version."""
        noise = b""
        while len(noise) < MAX_LOGIN_NOISE:
            line = b""
            while not line.endswith(b"\n"):
                line += io.read(1)
            if line.startswith(BOOT_MARKER):
                return tuple(int(part) for part in line[len(BOOT_MARKER) :].split(b"."))
            noise += line
        raise ProtocolError(
            f"The login scripts on {self.destination} print too much to standard output"
        )

    def _failure_from_exit(self, in_time: bool) -> TejError:
        """Explain why the agent's process ended during the bootstrap."""
        assert self._io is not None
        try:
            code = self._io.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._io.popen.kill()
            code = None
        detail = self.stderr_tail()
        where = self.destination
        if not in_time:
            return ConnectionFailed(
                f"Timed out connecting to {where} after {self._bootstrap_timeout():.0f} s"
            )
        if code == 255 and not where.is_local:
            return ConnectionFailed(f"Cannot connect to {where}: {detail or 'ssh failed'}")
        if code in (126, 127):
            python = " ".join(self.options.python_command(where))
            return ServerPythonError(
                f"Cannot run {python!r} on {where}: {detail or 'not found'}; "
                "install Python 3.8+ there or choose it with --python"
            )
        if not detail:
            python = " ".join(self.options.python_command(where))
            return ServerPythonError(
                f"{python!r} on {where} exited (code {code}) without starting the agent: "
                "is it a Python interpreter? Choose one with --python"
            )
        return ConnectionFailed(
            f"The agent could not start on {where} (exit code {code}): {detail}"
        )

    def _start_agent(self, io: _AgentIO) -> Any:
        import execnet
        from execnet import gateway_base

        io.execmodel = gateway_base.get_execmodel("thread")
        spec = execnet.XSpec(f"popen//id=tej-{next(_gateway_ids)}")
        spec.execmodel = "thread"
        self._group = execnet.Group()
        gateway = execnet.Gateway(io, spec)
        self._group._register(gateway)
        return gateway.remote_exec(f"import sys\nsys.modules[{_agent().name!r}].serve(channel)\n")

    def stderr_tail(self) -> str:
        """The last meaningful line the server (or ssh) wrote to stderr."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1] if lines else ""

    def close(self) -> None:
        """End the session: stop the agent and its connection (jobs keep running)."""
        group, self._group, self._channel = self._group, None, None
        self._hello_pending = False
        gateways = list(group) if group is not None else []
        for gateway in gateways:
            gateway.exit()
        if self._io is not None:
            _stop_process(self._io.popen, timeout=0 if not gateways else 3.0)
        for gateway in gateways:
            gateway.join(timeout=1.0)
        self._io = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # requests

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raises the matching TejError."""
        self._send(op, args)
        try:
            return self._receive()
        except ProtocolError:
            self.close()
            raise
        except TejError:
            raise  # an error reply: the exchange is complete, the session still in step
        except BaseException:
            self.close()  # interrupted mid-exchange: its reply would answer the next call
            raise

    def pipeline(
        self, requests: Iterable[tuple[str, dict[str, Any]]], window: int = 8
    ) -> Iterator[Any]:
        """Send requests keeping up to window of them in flight; yield results in order.

        On an error reply, no new request is sent, the ones in flight are
        drained (so the session stays usable) and the first error is raised.
        Anything else that interrupts it with replies in flight (a local error
        while producing requests, Ctrl-C) closes the session, whose next call
        reconnects, so no reply ever answers the wrong request.
        """
        in_flight = 0
        error: TejError | None = None
        try:
            for op, args in requests:
                if in_flight >= window:
                    in_flight -= 1
                    result, error = self._receive_result()
                    if error is not None:
                        break
                    yield result
                self._send(op, args)
                in_flight += 1
            while in_flight:
                in_flight -= 1
                result, failure = self._receive_result()
                error = error or failure
                if error is None:
                    yield result
        except BaseException:
            if in_flight:
                self.close()
            raise
        if error is not None:
            raise error

    def _receive_result(self) -> tuple[Any, TejError | None]:
        """The next reply: (result, None), or (None, the error it reports)."""
        try:
            return self._receive(), None
        except (ConnectionFailed, ProtocolError):
            raise
        except TejError as exc:
            return None, exc

    def abort(self) -> None:
        """End the session at once, without waiting for the agent (after Ctrl-C)."""
        if self._io is not None:
            self._io.kill()
        self.close()

    def _send(self, op: str, args: dict[str, Any]) -> None:
        if self._channel is None:
            raise ConnectionFailed(f"The session with {self.destination} is closed")
        try:
            self._channel.send({"v": PROTOCOL_VERSION, "op": op, "args": args})
        except (OSError, EOFError, ValueError) as exc:
            raise self._lost(exc) from None

    @property
    def server(self) -> dict[str, Any]:
        """What the agent's handshake says of the server: python, platform, home, pid."""
        self._finish_hello()
        return self._server

    def _finish_hello(self) -> None:
        """Read the handshake's reply, if it is still on its way; a failed one closes."""
        if not self._hello_pending:
            return
        self._hello_pending = False
        try:
            self._server = self._receive()
        except BaseException:
            self.close()
            raise

    def _receive(self) -> Any:
        self._finish_hello()
        channel = self._channel
        if channel is None:
            raise ConnectionFailed(f"The session with {self.destination} is closed")
        try:
            reply = channel.receive(timeout=self.request_timeout)
        except channel.TimeoutError:
            self.close()
            raise ConnectionFailed(
                f"No answer from {self.destination} in {self.request_timeout:.0f} s"
            ) from None
        except (OSError, EOFError, channel.RemoteError) as exc:
            raise self._lost(exc) from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ProtocolError(f"Unexpected reply from the agent: {reply!r:.200}")
        if reply["ok"]:
            return reply.get("result")
        raise error_from_reply(str(reply.get("error")), str(reply.get("message")))

    @property
    def is_open(self) -> bool:
        """Whether the session can still carry requests."""
        return self._channel is not None

    def _lost(self, exc: BaseException) -> ConnectionFailed:
        detail = self.stderr_tail()
        self.close()
        reason = f": {detail}" if detail else " (the connection closed)"
        return ConnectionFailed(f"Lost the connection to {self.destination}{reason}")


def _start(argv: list[str]) -> tuple[_AgentIO, IO[bytes]]:
    """Start the agent's process and write the bootstrap's first two lines (OSError if not)."""
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the session
    try:
        io = _AgentIO(argv, stderr)
    except BaseException:
        stderr.close()
        raise
    # While the server starts: import execnet, send the loader. If the process has exited
    # already, the version line (or its absence) says why.
    with contextlib.suppress(OSError):
        io.write(_line(_STAGE_ONE))
        io.write(_line(_loader()))
    return io, stderr


#: Agent processes started ahead of their session, by command line (see prestart).
_prestarted: dict[tuple[str, ...], tuple[_AgentIO, IO[bytes]]] = {}


def prestart(destination: Destination, options: ConnectOptions) -> None:
    """Start connecting now, for a session that will be opened soon (or not: discard).

    The next Session.open() whose command line is the same takes this process over, so
    the connection is made while the client does other work (the command line loads).
    """
    argv = agent_command(destination, options, _BOOTSTRAP_LINE)
    if tuple(argv) not in _prestarted:
        with contextlib.suppress(OSError):
            _prestarted[tuple(argv)] = _start(argv)


def discard_prestarted() -> None:
    """End the processes that prestart() started and no session took over."""
    while _prestarted:
        _, (io, stderr) = _prestarted.popitem()
        io.kill()
        with contextlib.suppress(OSError):
            io.popen.wait()
        for stream in (io.popen.stdin, io.popen.stdout, stderr):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


def _line(value: object) -> bytes:
    """A line that the bootstrap on the server reads and evaluates."""
    return (ascii(value) + "\n").encode("ascii")


def _loader() -> str:
    """The loader's source, with the modules this client wants."""
    modules = [(code.name, code.digest) for code in _code()]
    return f"{_LOADER}\ntej_boot({modules!r}, {modules[0][0]!r})\n"


def _stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a process to end by itself for up to timeout seconds, then kill it."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
