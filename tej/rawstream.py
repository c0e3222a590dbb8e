"""Big downloads as a raw byte stream beside the session, close to `ssh host cat`.

The session's requests carry data in chunks, through execnet, which copies and
frames every byte in Python at both ends. For a big file, the agent only
checks the path (the same rules as any download) and names the file by its
device and inode; a second command through the same SSH connection (shared
with ControlMaster, so no new handshake) then sends the file's bytes as they
are, with sendfile, and refuses to send if the file is no longer that one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from tej.errors import ConnectionFailed

if TYPE_CHECKING:
    from tej.session import Session

#: Files at least this big go through a raw stream.
RAW_STREAM_MIN = 16 << 20
READ_SIZE = 1 << 20
_WRONG_FILE = 3  # the stream command's exit code when the file changed under it

# Runs on the server's Python (3.8+), with the path, device and inode filled in.
_SENDER = """import os, sys
path, device, inode = {path!r}, {device!r}, {inode!r}
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
except OSError:
    sys.exit({wrong})
info = os.fstat(fd)
if (info.st_dev, info.st_ino) != (device, inode):
    sys.exit({wrong})
out, offset = sys.stdout.fileno(), 0
while True:
    try:
        sent = os.sendfile(out, fd, offset, 1 << 24)
    except OSError:
        sent = os.write(out, os.pread(fd, 1 << 20, offset))
    if not sent:
        break
    offset += sent
"""


class RawStreamFailed(ConnectionFailed):
    """The raw stream could not deliver the file; received says how much it did."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


def stream(
    session: Session, identity: list[object], size: int, advance: Callable[[int], None]
) -> Iterator[bytes]:
    """Yield a file's bytes from a raw stream; RawStreamFailed if not all of them came."""
    path, device, inode = identity[0], identity[1], identity[2]
    code = _SENDER.format(path=path, device=device, inode=inode, wrong=_WRONG_FILE)
    proc = subprocess.Popen(
        session.command_for(code),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    received = 0
    try:
        assert proc.stdout is not None
        while True:
            data = proc.stdout.read1(READ_SIZE)  # type: ignore[attr-defined]
            if not data:
                break
            received += len(data)
            advance(len(data))
            yield data
    finally:
        if proc.poll() is None:
            proc.kill()
        code_ = proc.wait()
    if code_ == _WRONG_FILE:
        raise RawStreamFailed("the file changed while it was being downloaded", received)
    if code_ != 0 or received != size:
        raise RawStreamFailed(f"the download stopped after {received} of {size} bytes", received)
