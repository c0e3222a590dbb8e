"""tej's agent on the server: the entry point of tej's code there.

The agent is this file with the package beside it (tej/server and
tej/protocol.py, shipped together as one bundle: see tej/server/bundle.py),
standard library only, Python 3.8+. It has two roles:

* Under execnet, the loader (tej/loader.py) imports it from the server's
  cache and calls ``serve(channel)``: it answers the client's requests
  (tej/server/service.py) until the client closes the connection.
* Run from the agent's copy in a queue (tej/server/agentcopy.py), ``main``
  runs a job's supervisor (``supervise JOBDIR``), an array's task's
  (``supervise-task ARRAYDIR INDEX``: a batch system's array job) or the fork
  server that forks supervisors (``fork-server``).
"""

import sys

#: The connection that the requests sent with the bootstrap were answered on (see answer),
#: and the reply too long to go with the bootstrap's, sent first on the channel instead.
_early = []  # type: list[object]
_deferred = []  # type: list[object]
#: The longest answer (as text) that goes with the bootstrap: a longer one (a big listing)
#: is faster to send, and to read, in execnet's binary form.
EARLY_TEXT_LIMIT = 65536
#: A bytes value of an early answer this long goes raw, before the answers' line, not as
#: text (a listing's columns: written and read as they are, not escaped and parsed).
RAW_MIN = 1024


def prepare(ops):
    """Import what answering these operations needs (the client's requests are on their way)."""
    from .protocol import OPERATIONS
    from .server.service import handlers_of

    for op in ops:
        if op in OPERATIONS:
            handlers_of(op)


def answer(requests):
    """Answer the requests that came with the bootstrap, before execnet is loaded: what the
    loader writes (bytes), the replies' line of Python literals, after their raw values.

    Each bytes value of RAW_MIN bytes or more (or that looks like a stand-in) is
    protocol.RAW_PLACEHOLDER and its number in the line, and goes raw before it:
    ``TEJ-RAW LENGTH...`` (protocol.RAW_MARKER), the values, then ``TEJ-EARLY
    REPLIES``. The session's later requests (serve) go on the same connection,
    so what these leave in it (a listing's token) is kept. The last reply, if
    still too long as text, is None there: it is sent first on the channel.
    """
    from .server.service import Connection

    connection = Connection()
    _early.append(connection)
    replies = [connection.handle(request) for request in requests]
    raw = []  # type: list[bytes]
    pulled = _pull_raw(replies, raw)
    text = None if _longer(pulled, EARLY_TEXT_LIMIT) else ascii(pulled)
    if text is None or len(text) > EARLY_TEXT_LIMIT:
        _deferred.append(replies[-1])
        raw = []
        text = ascii(_pull_raw(replies[:-1], raw) + [None])
    head = b""
    if raw:
        from .protocol import RAW_MARKER

        head = RAW_MARKER + b"".join(b" %d" % len(value) for value in raw) + b"\n"
    return head + b"".join(raw) + b"TEJ-EARLY " + text.encode("ascii") + b"\n"


def _pull_raw(value, raw):
    """value with its long bytes values (and any that look like a stand-in) replaced by
    stand-ins, appended to raw."""
    if isinstance(value, bytes):
        from .protocol import RAW_PLACEHOLDER

        if len(value) < RAW_MIN and not value.startswith(RAW_PLACEHOLDER):
            return value
        raw.append(value)
        return RAW_PLACEHOLDER + b"%d" % (len(raw) - 1)
    if isinstance(value, dict):
        return dict((key, _pull_raw(item, raw)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_pull_raw(item, raw) for item in value)
    return value


def _longer(value, limit):
    """Whether the strings in value (nested in dicts, lists, tuples) are longer than limit
    in all: a long answer is known without writing it out first."""
    if isinstance(value, (str, bytes)):
        return len(value) > limit
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (str, bytes)):
                limit -= len(item)
            elif _longer(item, limit):
                return True
            if limit < 0:
                return True
    return False


def serve(channel):
    """Answer requests on an execnet channel until the client closes it."""
    from .server.service import serve as serve_requests

    if _deferred:
        channel.send(_deferred.pop())
    serve_requests(channel, _early.pop() if _early else None)


def main(argv):
    """Command-line entry point of the queue's copy: a supervisor, or the fork server."""
    if len(argv) == 2 and argv[0] == "supervise":
        from .server.launch import supervisor_title
        from .server.processes import set_process_title
        from .server.supervisor import supervise

        set_process_title(supervisor_title(argv[1]))
        return supervise(argv[1])
    if len(argv) == 3 and argv[0] == "supervise-task" and argv[2].isdigit():
        from .server.arraysup import supervise_task
        from .server.processes import set_process_title

        set_process_title(
            "tej-supervisor %s.%s" % (argv[1].rstrip("/").rsplit("/", 1)[-1], argv[2])
        )
        return supervise_task(argv[1], int(argv[2]))
    if argv[:1] == ["fork-server"]:
        from .server.launch import serve_forks

        return serve_forks(sys.stdin.buffer, sys.stdout.buffer)
    sys.stderr.write(
        "usage: tej-agent supervise JOBDIR | supervise-task ARRAYDIR INDEX | fork-server\n"
    )
    return 2
