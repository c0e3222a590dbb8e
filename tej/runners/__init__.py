"""The runners a queue can use: the built-in ones and those that plugins register.

A runner other than ``default`` is a stdlib-only module that runs on the
server (see docs/runners.md). The client never imports it: it ships its
source with the agent. Plugins register theirs under the entry-point group
``tej.runners``, as ``NAME = "package.module"``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tej import protocol
from tej.errors import InvalidInput

ENTRY_POINT_GROUP = "tej.runners"
#: The runners that ship with tej, by name: the module holding each one's server side.
BUILTIN = {"queue": "tej.runners.queue", "slurm": "tej.runners.slurm"}
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class RunnerSource:
    """The server-side source of a runner, and its digest."""

    name: str
    source: str

    @property
    def digest(self) -> str:
        """The first 16 hex digits of the source's SHA-256, as the agent names its copy."""
        return protocol.sha256_hex(self.source.encode("utf-8"))[:16]


def builtin_digests() -> dict[str, str]:
    """The digests of the built-in runners, which the agent checks its copies against.

    Plugins' are not sent: finding them costs every connection tens of
    milliseconds. A queue's plugin runner is installed again only when its
    copy is missing, or by `tej setup --force --plugin NAME`.
    """
    return {name: _builtin(name).digest for name in BUILTIN}


def available() -> list[str]:
    """The names of every runner this client can set up, default first."""
    return [protocol.DEFAULT_RUNNER, *sorted({*BUILTIN, *_plugins()})]


def load(name: str) -> RunnerSource:
    """The source of a runner; InvalidInput naming the choices if there is none."""
    if name in BUILTIN:
        return _builtin(name)
    module = _plugins().get(name)
    if module is None:
        raise InvalidInput(f"Unknown plugin {name!r} (available: {', '.join(available())})")
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise InvalidInput(f"The plugin {name!r} names {module!r}, which is not a Python file")
    return RunnerSource(name, _read(spec.origin))


def _builtin(name: str) -> RunnerSource:
    return RunnerSource(name, _read(os.path.join(_HERE, f"{name}.py")))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def _plugins() -> dict[str, str]:
    """The runners registered by installed packages, by name."""
    from importlib.metadata import entry_points

    if sys.version_info >= (3, 10):
        found = entry_points(group=ENTRY_POINT_GROUP)
    else:  # pragma: no cover - Python 3.8 and 3.9
        found = entry_points().get(ENTRY_POINT_GROUP, [])
    return {point.name: point.value.split(":")[0] for point in found}
