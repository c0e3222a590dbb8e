"""Big downloads as a raw byte stream beside the session, close to `ssh host cat`.

The session's requests carry data in chunks, through execnet, which copies and
frames every byte in Python at both ends. For a big file, the agent only
checks the path (the same rules as any download) and names the file by its
device and inode; a second command through the same SSH connection (shared
with ControlMaster, so no new handshake) then sends the file's bytes as they
are, with sendfile, and refuses to send if the file is no longer that one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from tej.errors import ConnectionFailed

if TYPE_CHECKING:
    from tej.session import Session

#: Files at least this big go through a raw stream.
RAW_STREAM_MIN = 16 << 20
PROGRESS_INTERVAL = 0.1  # seconds between looks at how much has arrived
_WRONG_FILE = 3  # the stream command's exit code when the file changed under it
_UNREADABLE = 4  # its exit code when it may not read the file (permissions)

# Runs on the server's Python (3.8+), with the path, device, inode, the offset to start
# from and the (size, mtime_ns) the file must keep while it is read (or None) filled in.
_SENDER = """import os, sys
path, device, inode, expect = {path!r}, {device!r}, {inode!r}, {expect!r}
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
except PermissionError:
    sys.exit({unreadable})
except OSError:
    sys.exit({wrong})
info = os.fstat(fd)
if (info.st_dev, info.st_ino) != (device, inode):
    sys.exit({wrong})
if expect is not None and (info.st_size, info.st_mtime_ns) != expect:
    sys.exit({wrong})
out, offset = sys.stdout.fileno(), {offset!r}
while True:
    try:
        sent = os.sendfile(out, fd, offset, 1 << 24)
    except OSError:
        sent = os.write(out, os.pread(fd, 1 << 20, offset))
    if not sent:
        break
    offset += sent
info = os.fstat(fd)
if expect is not None and (info.st_size, info.st_mtime_ns) != expect:
    sys.exit({wrong})
"""


class RawStreamFailed(ConnectionFailed):
    """The raw stream could not deliver the file; received says how much it did."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message)
        self.received = received


class FileChanged(RawStreamFailed):
    """The file was replaced or modified while it was being read."""


class FileUnreadable(RawStreamFailed):
    """The server may not read the file (its permissions)."""


def download_to(
    session: Session,
    identity: list[object],
    out: BinaryIO,
    advance: Callable[[int], None],
    offset: int = 0,
    expect: tuple[int, int] | None = None,
) -> None:
    """Write a file's bytes from a raw stream to out; RawStreamFailed if not all.

    The stream's command writes into out itself: no byte goes through Python
    here. Progress is read from the file's size while it grows. offset: the
    bytes out holds already (it is positioned at its end), sent from there
    on. expect: the (size, mtime_ns) the file must have before and after it is
    read, else it changed meanwhile (RawStreamFailed).
    """
    path, device, inode, size = identity[0], identity[1], identity[2], int(identity[3])  # type: ignore[call-overload]
    code = _SENDER.format(
        path=path,
        device=device,
        inode=inode,
        expect=expect,
        offset=offset,
        wrong=_WRONG_FILE,
        unreadable=_UNREADABLE,
    )
    proc = subprocess.Popen(
        session.command_for(code),
        stdin=subprocess.DEVNULL,
        stdout=out.fileno(),
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    received = 0
    try:
        while True:
            try:
                code_ = proc.wait(timeout=PROGRESS_INTERVAL)
            except subprocess.TimeoutExpired:
                code_ = None
            now = os.fstat(out.fileno()).st_size - offset
            if now > received:
                advance(now - received)
                received = now
            if code_ is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code_ == _WRONG_FILE:
        raise FileChanged("the file changed while it was being downloaded", received)
    if code_ == _UNREADABLE:
        raise FileUnreadable("Permission denied", received)
    if code_ != 0 or received != size - offset:
        done = offset + received
        raise RawStreamFailed(f"the download stopped after {done} of {size} bytes", received)
