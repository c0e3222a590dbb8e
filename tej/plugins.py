"""The runners a client can set up a queue with: the built-in ones, and plugins'.

A runner runs on the server (see docs/runners.md). The built-in ones,
``default`` and those of tej/server/runners/, travel with the agent's bundle.
A plugin's is a stdlib-only module whose source the client sends when a queue
needs it; plugins register theirs under the entry-point group ``tej.runners``,
as ``NAME = "package.module"``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tej import protocol
from tej.errors import InvalidInput

ENTRY_POINT_GROUP = "tej.runners"


@dataclass(frozen=True)
class RunnerSource:
    """The server-side source of a plugin's runner (the agent names its copy by its digest)."""

    name: str
    source: str


def is_builtin(name: str) -> bool:
    """Whether a runner ships with tej (its server side travels in the agent's bundle)."""
    return name == protocol.DEFAULT_RUNNER or name in protocol.BUILTIN_RUNNERS


def available() -> list[str]:
    """The names of every runner this client can set up, default first."""
    return [protocol.DEFAULT_RUNNER, *sorted({*protocol.BUILTIN_RUNNERS, *_plugins()})]


def load(name: str) -> RunnerSource:
    """The source of a plugin's runner; InvalidInput naming the choices if there is none."""
    module = _plugins().get(name)
    if module is None:
        raise InvalidInput(f"Unknown plugin {name!r} (available: {', '.join(available())})")
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise InvalidInput(f"The plugin {name!r} names {module!r}, which is not a Python file")
    return RunnerSource(name, _read(spec.origin))


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
