"""A session: start the agent on a destination and exchange requests with it.

The agent is started through our own bootstrap (tej.bootstrap) rather than
execnet's ``makegateway``, for three reasons: the ssh command line is ours
(BatchMode, timeouts, keepalives, no forced compression), the server's stderr
is captured so failures become one clear line, and the server's Python version
is checked before execnet's own code is sent to it; and a fourth: execnet's
code and the agent are kept compiled in a cache on the server. The client's end
of the protocol is execnet's gateway_base too (tej.gateway).
"""

from __future__ import annotations

import itertools
import threading
from typing import IO, TYPE_CHECKING, Any

from tej.bootstrap import (
    BOOT_MARKER,
    BOOTSTRAP_LINE,
    CACHE_MARKER,
    EARLY_MARKER,
    MAX_LOGIN_NOISE,
    MIN_PYTHON,
    AgentIO,
    agent_bundle,
    boot_line,
    cache_names,
    cache_sources,
    prestarted,
    start,
)
from tej.destination import ConnectOptions, Destination, agent_command
from tej.errors import (
    ConnectionFailed,
    ProtocolError,
    ServerPythonError,
    TejError,
    error_from_reply,
)
from tej.gateway import gateway_base, open_gateway
from tej.protocol import EARLY_OPERATIONS, PROTOCOL_VERSION, RAW_MARKER, RAW_PLACEHOLDER

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from tej.process import Process

_gateway_ids = itertools.count(1)


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
        #: The first request, answered by the loader: (op, args, reply), until it is asked
        #: (reply None: too long to come with the bootstrap, it comes first on the channel).
        self._early: tuple[str, dict[str, Any], Any] | None = None
        #: Whether execnet's gateway is still to be started (see _start_gateway).
        self._gateway_pending = False
        self._stderr: IO[bytes] | None = None
        self._io: AgentIO | None = None
        self._gateway: Any = None
        self._channel: Any = None
        #: The modules whose source had to be sent (not in the server's cache).
        self.sent_sources: tuple[str, ...] = ()
        #: Bytes the login scripts printed before the agent started (skipped).
        self.login_noise = 0
        #: All that ssh and the server wrote to stderr, when the session failed to open.
        self.failure_output = ""

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # opening and closing

    def open(self, first: tuple[str, dict[str, Any]] | None = None) -> None:
        """Start the agent on the destination and shake hands with it.

        first is the request the caller sends next, (op, args): if it is one of
        EARLY_OPERATIONS, it travels with the bootstrap, the loader answers it
        with the handshake before execnet starts on either side, and the call
        that sends it gets that answer (execnet starts with the next request).
        """
        argv = agent_command(self.destination, self.options, BOOTSTRAP_LINE)
        started = prestarted.pop(tuple(argv), None)
        if started is None:
            try:
                started = start(argv, () if first is None else (first[0],))
            except OSError as exc:
                self.close()
                raise self._start_failure(argv[0], exc) from None
        self._io, self._stderr = started
        early = first if first is not None and first[0] in EARLY_OPERATIONS else None
        try:
            if early is None:
                gateway_base()  # loaded while the server starts
            self._bootstrap(self._io, early)
            self._gateway_pending = True
            if early is None:
                self._start_gateway()
        except BaseException:
            self.close()
            raise

    def _start_gateway(self) -> None:
        """Start execnet on the agent's process, and the agent on it (the handshake too,
        unless the loader has answered it): once the loader has written its '1'."""
        assert self._io is not None
        self._gateway_pending = False
        try:
            started = self._io.read(1) == b"1"
            if started:
                self._channel = self._start_agent(self._io)
        except (EOFError, OSError, ValueError) as exc:
            raise self._lost(exc) from None
        if not started:
            self.close()
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        if not self._server:
            # Its reply is read with the first request's: no round trip of its own.
            self._send("hello", {"protocol": PROTOCOL_VERSION})
            self._hello_pending = True

    def command_for(self, code: str) -> list[str]:
        """The command line that runs Python code on the destination, beside this session.

        Over ssh it shares this session's connection (ControlMaster) when reuse is on.
        """
        return agent_command(self.destination, self.options, code)

    def _start_failure(self, program: str, exc: OSError) -> TejError:
        if self.destination.is_local:
            return ServerPythonError(
                f"Cannot run Python {program!r}: {exc.strerror}; choose one with --python"
            )
        return ConnectionFailed(f"Cannot run {program!r}: {exc.strerror}")

    def _bootstrap(self, io: AgentIO, early: tuple[str, dict[str, Any]] | None) -> None:
        """Check the server's Python, then load execnet's code there (and have early
        answered with the handshake); with a deadline."""
        watchdog = threading.Timer(self._bootstrap_timeout(), io.popen.kill)
        watchdog.daemon = True
        watchdog.start()
        hello = {"v": PROTOCOL_VERSION, "op": "hello", "args": {"protocol": PROTOCOL_VERSION}}
        requests = None
        if early is not None:
            requests = [hello, {"v": PROTOCOL_VERSION, "op": early[0], "args": early[1]}]
        try:
            try:  # noqa: SIM105 - if the process has exited, the version line says why
                io.write(boot_line(requests))
            except OSError:
                pass
            version = self._read_boot_line(io)
            if version < MIN_PYTHON:
                raise ServerPythonError(
                    f"Python {'.'.join(map(str, version))} on {self.destination} is too old: "
                    f"tej needs Python {'.'.join(map(str, MIN_PYTHON))} or newer (see --python)"
                )
            missing = self._read_cache_line(io)
            self.sent_sources = tuple(missing)
            if missing:
                io.write(boot_line(cache_sources(tuple(missing))))
            replies = self._read_early_line(io)
            if early is not None:
                if not isinstance(replies, list) or len(replies) != 2:
                    raise ProtocolError(f"Unexpected replies from the agent: {replies!r:.200}")
                self._server = self._result(replies[0])
                self._early = (*early, replies[1])
        except (EOFError, OSError, ValueError):
            raise self._failure_from_exit(watchdog.is_alive()) from None
        finally:
            watchdog.cancel()

    def _bootstrap_timeout(self) -> float:
        return self.options.connect_timeout * 2 + 30.0

    def _read_cache_line(self, io: AgentIO) -> list[str]:
        """The loader's answer: the names of the modules whose source it needs."""
        line = io.readline()
        if not line.startswith(CACHE_MARKER):
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        names = line[len(CACHE_MARKER) :].decode("ascii", "replace").split()
        if not set(names) <= set(cache_names()):
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        return names

    def _read_early_line(self, io: AgentIO) -> Any:
        """The loader's answers to the requests sent with the bootstrap (None if none), with
        the long bytes values that came raw before them put back (see
        tej.remote_agent.answer)."""
        line = io.readline()
        raw: list[bytes] = []
        if line.startswith(RAW_MARKER + b" "):
            try:
                lengths = [int(field) for field in line[len(RAW_MARKER) :].split()]
            except ValueError:
                raise ProtocolError(f"Unexpected replies from the agent: {line!r:.200}") from None
            data = memoryview(io.read(sum(lengths)))
            for length in lengths:
                raw.append(bytes(data[:length]))
                data = data[length:]
            line = io.readline()
        if not line.startswith(EARLY_MARKER):
            raise ProtocolError(f"The agent on {self.destination} did not start properly")
        import ast

        try:
            replies = ast.literal_eval(line[len(EARLY_MARKER) :].decode("ascii"))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ProtocolError(f"Unexpected replies from the agent: {line!r:.200}") from None
        return _put_raw(replies, raw) if raw else replies

    def _read_boot_line(self, io: AgentIO) -> tuple[int, ...]:
        """Skip what login scripts print, up to the line that gives Python's version."""
        noise = b""
        while len(noise) < MAX_LOGIN_NOISE:
            line = b""
            while not line.endswith(b"\n"):
                line += io.read(1)
            if line.startswith(BOOT_MARKER):
                self.login_noise = max(len(noise) - 1, 0)  # less stage one's own newline
                return tuple(int(part) for part in line[len(BOOT_MARKER) :].split(b"."))
            noise += line
        raise ProtocolError(
            f"The login scripts on {self.destination} print too much to standard output"
        )

    def _failure_from_exit(self, in_time: bool) -> TejError:
        """Explain why the agent's process ended during the bootstrap."""
        assert self._io is not None
        code = self._io.popen.wait(timeout=5)
        if code is None:
            self._io.popen.kill()
        self.failure_output = self.stderr_text()
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

    def _start_agent(self, io: AgentIO) -> Any:
        self._gateway = gateway = open_gateway(io, f"tej-{next(_gateway_ids)}")
        module = f"{agent_bundle().name}.remote_agent"  # the loader has imported it
        return gateway.remote_exec(f"import sys\nsys.modules[{module!r}].serve(channel)\n")

    def stderr_text(self) -> str:
        """What the server (or ssh) wrote to stderr so far."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stderr_tail(self) -> str:
        """The last meaningful line the server (or ssh) wrote to stderr."""
        lines = self.stderr_text().strip().splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1] if lines else ""

    def close(self, wait: bool = True) -> None:
        """End the session: stop the agent and its connection (jobs keep running).

        wait=False tells the agent to end without waiting for it to: for a process that
        exits next (the `tej` command), whose ssh then ends by itself.
        """
        gateway, self._gateway, self._channel = self._gateway, None, None
        pending, self._gateway_pending = self._gateway_pending, False
        self._hello_pending = False
        self._early = None
        if gateway is not None:
            gateway.exit()
        elif pending and self._io is not None:
            _close_quietly(self._io)  # the agent, serving already, ends at its end of input
        if self._io is not None and (wait or (gateway is None and not pending)):
            _stop_process(self._io.popen, timeout=0 if gateway is None and not pending else 3.0)
        if gateway is not None and wait:
            gateway.join(timeout=1.0)
        self._io = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # requests

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raises the matching TejError."""
        early = self._early
        if early is not None and early[:2] == (op, args):
            self._early = None
            if early[2] is not None:
                return self._result(early[2])  # answered by the loader (see open)
            self._start_gateway()  # the agent sends the answer first thing
        else:
            self._send(op, args)  # an early answer not asked for is dropped first
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
        early, self._early = self._early, None
        if self._gateway_pending:
            self._start_gateway()
        if early is not None and early[2] is None:
            self._receive_result()  # it comes first on the channel: not asked for, dropped
        if self._channel is None:
            raise ConnectionFailed(f"The session with {self.destination} is closed")
        try:
            self._channel.send({"v": PROTOCOL_VERSION, "op": op, "args": args})
        except (OSError, EOFError, ValueError) as exc:
            raise self._lost(exc) from None
        except BaseException:
            self.close()  # interrupted while sending: part of the request may have gone
            raise

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
        return self._result(reply)

    @staticmethod
    def _result(reply: Any) -> Any:
        """A reply's result; raises the TejError of an error reply."""
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ProtocolError(f"Unexpected reply from the agent: {reply!r:.200}")
        if reply["ok"]:
            return reply.get("result")
        raise error_from_reply(str(reply.get("error")), str(reply.get("message")))

    @property
    def is_open(self) -> bool:
        """Whether the session can still carry requests."""
        return self._channel is not None or self._gateway_pending

    def _lost(self, exc: BaseException) -> ConnectionFailed:
        detail = self.stderr_tail()
        self.close()
        reason = f": {detail}" if detail else " (the connection closed)"
        return ConnectionFailed(f"Lost the connection to {self.destination}{reason}")


def _put_raw(value: Any, raw: list[bytes]) -> Any:
    """value with each stand-in of a raw value (RAW_PLACEHOLDER and its number) replaced by it."""
    if isinstance(value, bytes):
        if not value.startswith(RAW_PLACEHOLDER):
            return value
        try:
            return raw[int(value[len(RAW_PLACEHOLDER) :])]
        except (ValueError, IndexError):
            raise ProtocolError("The agent's raw answer is malformed") from None
    if isinstance(value, dict):
        return {key: _put_raw(item, raw) for key, item in value.items()}
    if isinstance(value, list):
        return [_put_raw(item, raw) for item in value]
    if isinstance(value, tuple):
        return tuple(_put_raw(item, raw) for item in value)
    return value


def _close_quietly(io: AgentIO) -> None:
    """Close the agent's input (its end of the session), whatever state the pipe is in."""
    try:  # noqa: SIM105 - as _stop_process, without contextlib
        io.close_write()
    except OSError:
        pass


def _stop_process(process: Process, timeout: float) -> None:
    """Wait for a process to end by itself for up to timeout seconds, then kill it."""
    if process.wait(timeout=timeout) is None:
        process.kill()
        process.wait()
