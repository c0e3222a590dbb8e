"""The agent's bundle: the files of tej that run on the server, named by their digest.

The bundle is tej/protocol.py, tej/remote_agent.py and tej/server/ (less the
loader, which is sent on its own). The client ships it; the server keeps it
in its cache as a folder named tej_agent_DIGEST (see tej/loader.py), imported
as a package of that name; the agent copies it into each queue it starts
supervisors from (QUEUE/agent/tej_agent_DIGEST/), whole and atomically.
"""

import os
import sys

from ..protocol import sha256_hex

PREFIX = "tej_agent_"
LOADER_FILE = "loader.py"  # tej/loader.py: not in the bundle


def bundle_paths(root):
    """The relative paths of the bundle's files under root (the tej package's folder), sorted."""
    paths = ["protocol.py", "remote_agent.py"]
    for folder, dirs, files in os.walk(os.path.join(root, "server")):
        dirs[:] = sorted(name for name in dirs if name != "__pycache__")
        relative = os.path.relpath(folder, root)
        paths.extend(relative + "/" + name for name in files if name.endswith(".py"))
    return sorted(paths)


def bundle_name(digests):
    """The bundle's name, from the digests of its files ({relpath: hex digest})."""
    listing = "".join("%s %s\n" % (path, digests[path]) for path in sorted(digests))
    return PREFIX + sha256_hex(listing.encode("utf-8"))[:16]


def read_bundle(root):
    """The bundle's files under root: {relpath: bytes}."""
    files = {}
    for path in bundle_paths(root):
        with open(os.path.join(root, path), "rb") as stream:
            files[path] = stream.read()
    return files


def describe(files):
    """(name, {relpath: digest}) of a bundle's files."""
    digests = dict((path, sha256_hex(data)) for path, data in files.items())
    return bundle_name(digests), digests


OWN = {}  # type: dict[str, object]  # this agent's bundle: "name", and "files" once read


def own_root():
    """The package this code is part of: tej_agent_DIGEST on the server, else tej."""
    return sys.modules[__name__.split(".")[0]]


def own_name():
    """The name of the bundle this code runs from."""
    if "name" not in OWN:
        root = own_root()
        OWN["name"] = (
            root.__name__ if root.__name__.startswith(PREFIX) else describe(own_files())[0]
        )
    return OWN["name"]


def own_files():
    """The files of the bundle this code runs from: {relpath: bytes}.

    On the server, the root package is the bundle (from the cache's folder, or
    from memory: see tej/loader.py); elsewhere (tests, `local` in process) it
    is the tej package, whose bundle is read from its files.
    """
    if "files" not in OWN:
        root = own_root()
        sources = getattr(root, "tej_sources", None)
        OWN["files"] = sources if sources is not None else read_bundle(root.__path__[0])
    return OWN["files"]
