"""The agent's service: a connection's requests, each answered by its handler.

A request is ``{"v": PROTOCOL_VERSION, "op": NAME, "args": {...}}``; its
handler is the function HANDLERS[NAME] of the module of tej/server/handlers/
that tej.protocol.OPERATIONS names, called with the connection and the
arguments. The module is imported on the first request that needs it, so a
connection that only reads loads no more than reading needs. Every request
gets a reply, whatever happens: an error reply names the error's kind.
"""

from ..protocol import ERR_BAD_REQUEST, ERR_SERVER, OPERATIONS, PROTOCOL_VERSION
from .errors import AgentError, describe_os_error, internal_error


class Connection(object):
    """One client's connection: what its requests share (uploads, listings in progress)."""

    def __init__(self):
        self.uploads = {}  # token -> Upload, see handlers/upload.py
        self.sync_listings = {}  # token -> the last listing of a sync, see handlers/sync.py
        self.listings = {}  # cursor -> (the rows of a listing, short), see handlers/jobs.py

    def handle(self, request):
        """Answer one request with a reply dict; never raises."""
        try:
            handler, args = self.handler_of(request)
            return {"ok": True, "result": handler(self, **args)}
        except AgentError as exc:
            return {"ok": False, "error": exc.kind, "message": exc.message}
        except TypeError as exc:
            if exc.__traceback__ and exc.__traceback__.tb_next:  # raised inside the handler: a bug
                return internal_error(exc)
            return {"ok": False, "error": ERR_BAD_REQUEST, "message": "Bad arguments: %s" % exc}
        except OSError as exc:
            return {"ok": False, "error": ERR_SERVER, "message": describe_os_error(exc)}
        except Exception as exc:  # noqa: BLE001 - the agent must answer, whatever happens
            return internal_error(exc)

    def handler_of(self, request):
        """Check a request's envelope; return its handler and arguments."""
        if not isinstance(request, dict):
            raise AgentError(ERR_BAD_REQUEST, "A request must be a dict")
        if request.get("v") != PROTOCOL_VERSION:
            raise AgentError(ERR_BAD_REQUEST, "Unsupported protocol version %r" % request.get("v"))
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(op, str) or op not in OPERATIONS:
            raise AgentError(ERR_BAD_REQUEST, "Unknown operation %r" % (op,))
        if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
            raise AgentError(ERR_BAD_REQUEST, "Arguments must be a dict")
        return handlers_of(op)[op], args


def handlers_of(op):
    """The HANDLERS of the module that answers op (one of OPERATIONS), imported on first use."""
    # __import__, not importlib's import_module: importlib would load more modules.
    return __import__("handlers." + OPERATIONS[op], globals(), None, ["HANDLERS"], 1).HANDLERS


def serve(channel, connection=None):
    """Answer requests on an execnet channel until the client closes it (on connection, if
    the loader has answered the session's first requests on it already)."""
    if connection is None:
        connection = Connection()
    for request in channel:
        channel.send(connection.handle(request))
