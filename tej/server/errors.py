"""The error a request handler raises, and the checks of request arguments."""

import os

from ..protocol import (
    ERR_BAD_REQUEST,
    ERR_INTERNAL,
    MAX_OFFSET,
)


class AgentError(Exception):
    """An anticipated failure, sent to the client as an error reply."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def number_arg(value, name, low, high):
    """Check a numeric argument: a finite int or float within [low, high]."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not low <= value <= high:
        raise AgentError(ERR_BAD_REQUEST, "%s must be a number from %s to %s" % (name, low, high))
    return value


def checked_rows(rows, types):
    """Check a list of rows of the given types (ints non-negative); BadRequest otherwise."""
    if not isinstance(rows, list):
        raise AgentError(ERR_BAD_REQUEST, "Expected a list of rows")
    for row in rows:
        valid = isinstance(row, list) and len(row) == len(types)
        for value, kind in zip(row if valid else (), types):
            valid = valid and isinstance(value, kind)
            valid = valid and not (kind is int and not 0 <= value < MAX_OFFSET)
        if not valid:
            raise AgentError(ERR_BAD_REQUEST, "Invalid row %r" % (row,))
    return rows


def internal_error(exc):
    """The reply for an unexpected exception in a handler."""
    return {"ok": False, "error": ERR_INTERNAL, "message": "%s: %s" % (type(exc).__name__, exc)}


def describe_os_error(exc):
    """A one-line description of an OSError on the server."""
    name = exc.filename if exc.filename is not None else ""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    text = exc.strerror or str(exc)
    return "%s: %s" % (text, name) if name else text
