"""The handshake."""

import os
import sys

from ...protocol import ERR_BAD_REQUEST, PROTOCOL_VERSION
from ..errors import AgentError


def hello(connection, protocol):
    """Check the client's protocol version and describe this server."""
    if protocol != PROTOCOL_VERSION:
        raise AgentError(ERR_BAD_REQUEST, "Protocol %r is not %d" % (protocol, PROTOCOL_VERSION))
    return {
        "protocol": PROTOCOL_VERSION,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "platform": sys.platform,
        "home": os.path.expanduser("~"),
        "pid": os.getpid(),
    }


HANDLERS = {"hello": hello}
