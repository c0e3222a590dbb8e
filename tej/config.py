"""Settings: the defaults of tej's options, from ``$XDG_CONFIG_HOME/tej/config.toml``.

The file has global settings at its top level and sections ``[host."PATTERN"]``
for destinations (as typed, with ``*`` globs; the first section that matches
wins). A setting comes from, first to last: the command line, the environment
(TEJ_QUEUE...), the destination's section, the global settings, tej's default.

`tej` reads this before it starts ssh (tej.launcher), so this module imports
nothing but os until a file is there to read; then tomllib (or tomli).
"""

from __future__ import annotations

import os

from tej.destination import SHARED_CONNECTION_SECONDS, ConnectOptions
from tej.errors import InvalidInput
from tej.protocol import DEFAULT_CONNECT_TIMEOUT

# Not `from typing import ...`: typing would be loaded before ssh is started.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    #: Checks a value read from the file: None if it is fine, else what it must be.
    Check = Callable[[object], "str | None"]

DEFAULT_QUEUE = "~/.tej"
MAX_CONNECT_TIMEOUT = 3600
MAX_PERSIST = 7 * 86400
FILE_NAME = os.path.join("tej", "config.toml")

#: Where a setting's value came from (Settings.origin).
FROM_COMMAND_LINE = "command line"
FROM_ENVIRONMENT = "environment"
FROM_HOST = "host section"
FROM_GLOBAL = "global section"
FROM_DEFAULT = "default"


def _text(value: object) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _whole(low: int, high: int) -> Check:
    def check(value: object) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return None
        return f"a whole number from {low} to {high}"

    return check


def _flag(value: object) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _duration(value: object) -> str | None:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return None
    return 'a duration, such as 90 or "2h"'


def _texts(value: object) -> str | None:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    ):
        return None
    return "a string or a list of strings"


def _env(value: object) -> str | None:
    if isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
        return None
    return 'a table of strings, such as {OMP_NUM_THREADS = "4"}'


def _table(value: object) -> str | None:
    return None if isinstance(value, dict) else "a table"


#: The options that decide how to connect, with their environment variables.
CONNECTION = {
    "queue": "TEJ_QUEUE",
    "python": "TEJ_PYTHON",
    "ssh_config": "TEJ_SSH_CONFIG",
    "connect_timeout": "TEJ_CONNECT_TIMEOUT",
    "no_reuse": "TEJ_NO_REUSE",
    "persist": "TEJ_PERSIST",
}
#: Every setting: what its value must be, and its default.
SETTINGS: dict[str, tuple[Check, object]] = {
    "queue": (_text, DEFAULT_QUEUE),
    "python": (_text, None),
    "ssh_config": (_text, None),
    "connect_timeout": (_whole(1, MAX_CONNECT_TIMEOUT), DEFAULT_CONNECT_TIMEOUT),
    "no_reuse": (_flag, False),
    "persist": (_whole(1, MAX_PERSIST), SHARED_CONNECTION_SECONDS),
    # submit's: defaults beneath the job's tej.json (same names, see docs/tej-json.md)
    "max_runtime": (_duration, None),
    "env": (_env, None),
    "stdout": (_text, None),
    "stderr": (_text, None),
    "webhook": (_texts, None),
    "email": (_texts, None),
    "notify": (_table, None),
}
SUBMIT_SETTINGS = ("max_runtime", "env", "stdout", "stderr", "webhook", "email", "notify")
HOST_TABLE = "host"


def config_path() -> str:
    """Where the configuration file is: $XDG_CONFIG_HOME/tej/config.toml (~/.config/...)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, FILE_NAME)


class ConfigFile:
    """The settings of a configuration file: global ones, and by host pattern in order."""

    def __init__(
        self,
        path: str,
        found: bool = False,
        top: dict[str, object] | None = None,
        hosts: list[tuple[str, dict[str, object]]] | None = None,
    ) -> None:
        self.path = path
        self.found = found
        self.top = top or {}
        self.hosts = hosts or []

    def section_for(self, destination: str) -> tuple[str, dict[str, object]] | None:
        """The first [host."PATTERN"] section whose pattern matches destination."""
        for pattern, values in self.hosts:
            if glob_match(pattern, destination):
                return pattern, values
        return None

    def names(self) -> list[str]:
        """The host patterns that name one destination (no `*`)."""
        return [pattern for pattern, _ in self.hosts if "*" not in pattern]


_loaded: dict[str, ConfigFile] = {}


def load(path: str | None = None) -> ConfigFile:
    """Read and check the configuration file (once per process); empty if there is none."""
    path = path or config_path()
    if path not in _loaded:
        _loaded[path] = _read(path)
    return _loaded[path]


def _read(path: str) -> ConfigFile:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return ConfigFile(path)
    except OSError as exc:
        raise InvalidInput(f"Can't read {path}: {exc.strerror}") from None
    document = _parse(path, data)
    hosts = document.pop(HOST_TABLE, {})
    if not isinstance(hosts, dict):
        raise InvalidInput(f'{path}: host must be tables such as [host."gpu*"]')
    _check(path, document, "")
    sections = []
    for pattern, values in hosts.items():
        where = f' in [host."{pattern}"]'
        if not isinstance(values, dict):
            raise InvalidInput(f'{path}: host.{pattern} must be a table, such as [host."gpu*"]')
        _check(path, values, where)
        sections.append((pattern, values))
    return ConfigFile(path, True, document, sections)


def _parse(path: str, data: bytes) -> dict[str, Any]:
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the tomli dependency, before Python 3.11
        import tomli as tomllib
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: {exc}") from None


def _check(path: str, values: dict[str, object], where: str) -> None:
    for key, value in values.items():
        if key not in SETTINGS:
            import difflib

            known = [*SETTINGS, HOST_TABLE] if not where else list(SETTINGS)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInput(f"{path}: unknown key {key!r}{where}{hint}")
        problem = SETTINGS[key][0](value)
        if problem is not None:
            raise InvalidInput(f"{path}: {key}{where} must be {problem}, not {value!r}")


def glob_match(pattern: str, text: str) -> bool:
    """Whether text matches pattern, where `*` stands for any characters (and only `*`)."""
    if "*" not in pattern:
        return text == pattern
    first, *middle, last = pattern.split("*")
    if len(text) < len(first) + len(last) or not (text.startswith(first) and text.endswith(last)):
        return False
    position, end = len(first), len(text) - len(last)
    for part in middle:
        found = text.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return True


class Settings:
    """The settings in force for one destination, and where each came from."""

    def __init__(
        self,
        destination: str,
        file: ConfigFile,
        values: dict[str, Any],
        origins: dict[str, tuple[str, str | None]],
    ) -> None:
        self.destination = destination
        self.file = file
        self.values = values
        #: By setting: (FROM_..., detail: the environment variable or the host pattern).
        self.origins = origins

    @property
    def queue(self) -> str:
        """The queue directory on the server."""
        return str(self.values["queue"])

    @property
    def python(self) -> str | None:
        """The server's Python (None: the default)."""
        return _optional_text(self.values["python"])

    @property
    def ssh_config(self) -> str | None:
        """The ssh configuration file, if one is given."""
        return _optional_text(self.values["ssh_config"])

    @property
    def connect_timeout(self) -> int:
        """Seconds to wait for the server."""
        return int(self.values["connect_timeout"])

    @property
    def reuse(self) -> bool:
        """Whether commands share one ssh connection."""
        return not self.values["no_reuse"]

    @property
    def persist(self) -> int:
        """Seconds a shared connection stays open after the last command."""
        return int(self.values["persist"])

    @property
    def reuse_for(self) -> int:
        """Seconds a shared connection stays open after the last command (0: no sharing)."""
        return self.persist if self.reuse else 0

    def connect_options(self) -> ConnectOptions:
        """How to reach the destination (as tej.api.RemoteQueue makes them)."""
        return ConnectOptions(
            python=self.python,
            ssh_config=self.ssh_config,
            connect_timeout=self.connect_timeout,
            reuse_for=self.reuse_for,
        )

    def describe(self, name: str) -> str:
        """Where a setting came from, in words."""
        source, detail = self.origins[name]
        if source == FROM_HOST:
            return f'[host."{detail}"]'
        return f"{source} {detail}" if detail else source

    def notes(self) -> list[str]:
        """Warnings for `tej config`: sections that match nothing or are shadowed."""
        matching = [
            pattern for pattern, _ in self.file.hosts if glob_match(pattern, self.destination)
        ]
        if self.file.hosts and not matching:
            return [f'no [host."..."] section of {self.file.path} matches {self.destination!r}']
        return [
            f'[host."{pattern}"] matches {self.destination!r} too, but the first match wins'
            for pattern in matching[1:]
        ]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the file, and each setting's value and origin."""
        return {
            "destination": self.destination,
            "file": self.file.path,
            "file_found": self.file.found,
            "settings": {
                name: {
                    "value": value,
                    "source": self.origins[name][0],
                    "detail": self.origins[name][1],
                }
                for name, value in self.values.items()
            },
            "notes": self.notes(),
        }

    def submit_defaults(self) -> dict[str, Any]:
        """Submit's settings as job metadata (beneath tej.json), checked; InvalidInput if wrong.

        webhook and email are notify's, and win over the notify table's.
        """
        from tej import jobspec

        defaults: dict[str, Any] = {}
        notify: dict[str, Any] = {}
        for name in SUBMIT_SETTINGS:
            value = self.values[name]
            if value is None:
                continue
            part = {"notify": {name: value}} if name in ("webhook", "email") else {name: value}
            try:
                jobspec.build_job({}, part)
            except InvalidInput as exc:
                raise InvalidInput(f"{self.file.path}, {self.describe(name)}: {exc}") from None
            if name == "notify":
                notify = {**value, **notify}
            elif name in ("webhook", "email"):
                notify[name] = value
            else:
                defaults[name] = value
        if notify:
            defaults["notify"] = notify
        return defaults


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)


def resolve(
    destination: str,
    given: dict[str, object] | None = None,
    given_origins: dict[str, tuple[str, str | None]] | None = None,
) -> Settings:
    """The settings for destination (as typed): given ones (from the command line or the
    environment, as given_origins says), then the file's host section, global ones, defaults.
    """
    file = load()
    values: dict[str, Any] = {}
    origins: dict[str, tuple[str, str | None]] = {}
    section = file.section_for(destination)
    for name, (_, default) in SETTINGS.items():
        if given and name in given:
            values[name] = given[name]
            origins[name] = (given_origins or {}).get(name, (FROM_COMMAND_LINE, None))
        elif section is not None and name in section[1]:
            values[name], origins[name] = section[1][name], (FROM_HOST, section[0])
        elif name in file.top:
            values[name], origins[name] = file.top[name], (FROM_GLOBAL, None)
        else:
            values[name], origins[name] = default, (FROM_DEFAULT, None)
    return Settings(destination, file, values, origins)
