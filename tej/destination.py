"""Destinations: parsing what the user typed, and the command that reaches it."""

from __future__ import annotations

import os
import stat
import sys

from tej.errors import InvalidInput
from tej.protocol import DEFAULT_CONNECT_TIMEOUT

LOCAL = "local"
DEFAULT_REMOTE_PYTHON = "python3"
#: How long an idle ssh connection is kept for the next command (ControlPersist).
SHARED_CONNECTION_SECONDS = 60
#: Characters a host or user name can't have (besides whitespace).
_NOT_IN_NAMES = "@/'\"`$;&|<>()\\"
#: Characters a word of a remote command line needs no quotes for (as shlex.quote).
_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-")


# Plain classes rather than dataclasses or NamedTuples: `tej` builds these before it
# starts the agent, and importing dataclasses or typing would delay that (tej.launcher).
class _Value:
    """An immutable value, compared and hashed by its fields (its __slots__)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Value) or type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Destination(_Value):
    """Where jobs go: this machine (``local``) or a host reached with ssh."""

    __slots__ = ("host", "port", "user")

    def __init__(
        self, host: str | None = None, user: str | None = None, port: int | None = None
    ) -> None:
        self.host = host
        self.user = user
        self.port = port

    @property
    def is_local(self) -> bool:
        """Whether this is the embedded ``local`` destination (no ssh)."""
        return self.host is None

    def __str__(self) -> str:
        if self.host is None:
            return LOCAL
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None and ":" not in self.host:
            return f"{self.user}@{host}" if self.user else host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{host}{port}"


class ConnectOptions(_Value):
    """How to reach a destination and start the agent there.

    reuse_for: seconds an idle shared ssh connection stays open for the next command
    (0: no sharing).
    """

    __slots__ = (
        "connect_timeout",
        "keepalive_count",
        "keepalive_interval",
        "python",
        "reuse_for",
        "ssh_config",
    )

    def __init__(
        self,
        python: str | None = None,
        ssh_config: str | None = None,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        keepalive_interval: int = 10,
        keepalive_count: int = 3,
        reuse_for: int = SHARED_CONNECTION_SECONDS,
    ) -> None:
        self.python = python
        self.ssh_config = ssh_config
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.reuse_for = reuse_for

    def python_command(self, destination: Destination) -> list[str]:
        """The server's Python interpreter, as a command line."""
        if not self.python:  # the default: a path with spaces is still one word
            return [sys.executable if destination.is_local else DEFAULT_REMOTE_PYTHON]
        text = self.python
        import shlex

        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise InvalidInput(f"Invalid --python {text!r}: {exc}") from None
        if not words:
            raise InvalidInput("--python can't be empty")
        return words


def parse_destination(text: str) -> Destination:
    """Parse ``local``, ``[user@]host``, an ssh alias, or ``ssh://[user@]host[:port]``."""
    if text == LOCAL:
        return Destination()
    if text.startswith("ssh://"):
        return _parse_url(text)
    user, at, host = text.rpartition("@")
    if ":" in host and not _is_ipv6(host):
        raise InvalidInput(f"Invalid destination {text!r}: to give a port, use ssh://host:port")
    return _checked(text, host, user if at else None, None)


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _parse_url(text: str) -> Destination:
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidInput(f"Invalid destination {text!r}: {exc}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidInput(f"Invalid destination {text!r}: use ssh://[user@]host[:port]")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if ":" in userinfo:
        raise InvalidInput(f"Invalid destination {text!r}: passwords are not accepted in it")
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise InvalidInput(f"Invalid destination {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = hostport.partition(":")
    port = _parse_port(text, port_text)
    user = unquote(userinfo) if "@" in parts.netloc else None
    return _checked(text, unquote(host), user, port)


def _parse_port(text: str, port_text: str) -> int | None:
    if not port_text:
        return None
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or not (
        0 < int(port_text) < 65536
    ):
        raise InvalidInput(f"Invalid port in destination {text!r}")
    return int(port_text)


def _checked(text: str, host: str, user: str | None, port: int | None) -> Destination:
    if not host or host.startswith("-") or not _is_name(host):
        raise InvalidInput(
            f"Invalid destination {text!r}: expected local, [user@]host or ssh://..."
        )
    if user is not None and (not _is_name(user) or user.startswith("-") or ":" in user):
        raise InvalidInput(f"Invalid user name in destination {text!r}")
    return Destination(host=host, user=user, port=port)


def _is_name(text: str) -> bool:
    """Whether text can be a host or user name: no whitespace, nothing a shell would read."""
    return bool(text) and not any(char.isspace() or char in _NOT_IN_NAMES for char in text)


def _quote(word: str) -> str:
    """A word for a remote (POSIX shell) command line, quoted as shlex.quote would."""
    if word and all(char in _PLAIN for char in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def agent_command(destination: Destination, options: ConnectOptions, bootstrap: str) -> list[str]:
    """The command line that starts Python on the destination, running bootstrap.

    Python runs with -S (no site module): tej's code needs only the standard library,
    and site costs every connection a few milliseconds, more with .pth files.
    """
    python = [*options.python_command(destination), "-S", "-c", bootstrap]
    if destination.is_local:
        return python
    remote = " ".join(_quote(word) for word in python)
    return [*ssh_command(destination, options), remote]


def ssh_command(destination: Destination, options: ConnectOptions) -> list[str]:
    """The ssh command line (without the remote command) to reach a host."""
    assert destination.host is not None
    command = ["ssh", "-T", "-x", "-a"]
    if options.ssh_config:
        command += ["-F", os.path.expanduser(options.ssh_config)]
    settings = {
        "BatchMode": "yes",
        "ConnectTimeout": str(options.connect_timeout),
        "ServerAliveInterval": str(options.keepalive_interval),
        "ServerAliveCountMax": str(options.keepalive_count),
    }
    settings.update(_sharing_settings(options.reuse_for))
    for key, value in settings.items():
        command += ["-o", f"{key}={value}"]
    if destination.port is not None:
        command += ["-p", str(destination.port)]
    if destination.user is not None:
        command += ["-l", destination.user]
    return [*command, "--", destination.host]


def _sharing_settings(reuse_for: int) -> dict[str, str]:
    """ssh options that share one connection between commands (ControlMaster)."""
    directory = control_directory() if reuse_for > 0 else None
    if directory is None:
        return {"ControlMaster": "no", "ControlPath": "none"}
    return {
        "ControlMaster": "auto",
        "ControlPath": os.path.join(directory, "%C"),
        "ControlPersist": str(reuse_for),
    }


def _temporary_directory() -> str:
    """The folder for temporary files: $TMPDIR (or $TEMP, $TMP) if it is one, else /tmp.

    Not tempfile.gettempdir(): importing tempfile (shutil, random, re...) took a cold
    command about 9 ms before ssh could be started.
    """
    for name in ("TMPDIR", "TEMP", "TMP"):
        path = os.environ.get(name)
        if path and os.path.isdir(path):
            return path
    if os.path.isdir("/tmp"):
        return "/tmp"
    import tempfile

    return tempfile.gettempdir()


def control_directory() -> str | None:
    """A private folder for shared-connection sockets, or None if none can be had safely."""
    base = os.environ.get("XDG_RUNTIME_DIR") or _temporary_directory()
    path = os.path.join(base, f"tej-ssh-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # someone else's, or open to others: never put our sockets there
    return path
