"""The client's end of execnet's protocol: execnet's gateway_base, loaded on its own.

The agent speaks execnet's protocol: on the server, gateway_base runs as a module
of its own (see tej.bootstrap). The client loads it the same way, from the
installed execnet package's folder, rather than importing the package: its
``__init__`` also imports the parts tej does not use (execnet's own bootstrap,
rsync, multi-gateway groups, and inspect to send functions' source), which cost
every command about as much time as gateway_base itself. All tej needs beyond
gateway_base is a gateway that sends source to run and ends the connection:
`AgentGateway`, execnet's `Gateway` without the rest.
"""

from __future__ import annotations

# _thread, not threading: the bootstrap finds gateway_base's file before ssh's handshake is
# done, and threading (with functools, collections...) would load with it.
import _thread
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

#: The name under which the client's copy of gateway_base is loaded.
MODULE_NAME = "tej._execnet_gateway_base"


def source_path() -> str | None:
    """The installed execnet's gateway_base.py (found without importing execnet).

    None if it is not a plain file (execnet inside a zip archive).
    """
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("execnet")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "gateway_base.py")
            if os.path.isfile(path):
                return path
    import execnet  # installed some other way: let the import system find it

    path = os.path.join(os.path.dirname(os.path.abspath(execnet.__file__)), "gateway_base.py")
    return path if os.path.isfile(path) else None


_loaded: list[ModuleType] = []  # gateway_base, once wholly loaded
_loading = _thread.allocate_lock()  # clients in several threads load it once


def gateway_base() -> ModuleType:
    """execnet's gateway_base, loaded once, on its own (its compiled form cached as usual).

    Its module is in sys.modules while it runs: another thread must not take it
    before it has run to its end, so loading holds a lock.
    """
    if not _loaded:
        with _loading:
            if not _loaded:
                _loaded.append(_load_gateway_base())
    return _loaded[0]


def _load_gateway_base() -> ModuleType:
    """Load gateway_base (see gateway_base)."""
    loaded = sys.modules.get(MODULE_NAME)
    if loaded is not None:
        return loaded
    path = source_path()
    if path is None:  # not a file: the package's own copy, however it was loaded
        from execnet import gateway_base as package_copy

        sys.modules[MODULE_NAME] = package_copy
        return package_copy
    from tej.loader import tej_import  # as the server loads it

    return tej_import(MODULE_NAME, path)  # type: ignore[no-any-return]


def gateway_source() -> str:
    """gateway_base's source, as the server's loader wants it."""
    path = source_path()
    if path is None:
        module: Any = gateway_base()
        return module.__loader__.get_source(module.__name__)  # type: ignore[no-any-return]
    with open(path, encoding="utf-8") as stream:
        return stream.read()


def open_gateway(io: Any, gateway_id: str) -> Any:
    """Start execnet's protocol on io (threads: a receiver); an `AgentGateway`."""
    base = gateway_base()
    io.execmodel = base.get_execmodel("thread")
    return _gateway_class(base)(io, gateway_id)


_agent_gateway: list[type] = []  # the class, once made


def _gateway_class(base: ModuleType) -> type:
    """AgentGateway, made once on the loaded gateway_base."""
    if _agent_gateway:
        return _agent_gateway[0]

    class AgentGateway(base.BaseGateway):  # type: ignore[name-defined,misc]
        """A gateway that runs source on the other side (as execnet's Gateway)."""

        def __init__(self, io: Any, gateway_id: str) -> None:
            super().__init__(io=io, id=gateway_id, _startcount=1)
            self._ended = False
            self._initreceive()

        def remote_exec(self, source: str) -> Any:
            """Run source on the other side, with `channel` in its globals; the channel."""
            channel = self.newchannel()
            payload = base.dumps_internal((source, None, None, {}))
            self._send(base.Message.CHANNEL_EXEC, channel.id, payload)
            return channel

        def exit(self) -> None:
            """Tell the other side to end, and close our writing end (once)."""
            if self._ended:
                return
            self._ended = True
            try:
                self._send(base.Message.GATEWAY_TERMINATE)
                self._io.close_write()
            except (ValueError, EOFError, OSError):
                pass  # the connection is gone already

    _agent_gateway.append(AgentGateway)
    return AgentGateway
