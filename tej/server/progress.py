"""A job's progress: the last line it wrote to the file named by $TEJ_PROGRESS."""

import os
import stat

from .layout import PROGRESS_FILE

PROGRESS_LENGTH = 200  # characters shown of the last line
BLOCK = 4096  # bytes read at a time, from the end
SCAN_LIMIT = 65536  # bytes read at most, looking back for the start of the last line
SEPARATORS = (b"\n", b"\r")  # \r too: a progress bar that rewrites its line


def progress_path(job_dir):
    """The progress file of a job (in its folder, beside work/)."""
    return os.path.join(job_dir, PROGRESS_FILE)


def read_progress(job_dir):
    """The last non-empty line of the job's progress file, printable, at most 200 characters.

    None if there is none. Only the file's tail is read; a file that is not a
    regular file (a FIFO, a device, a symlink) is not read at all, and bytes that
    are not text are shown escaped.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | os.O_NOCTTY
    try:
        fd = os.open(progress_path(job_dir), flags)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        line = last_line(fd, info.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    return printable(line[: PROGRESS_LENGTH * 4], PROGRESS_LENGTH) or None


def last_line(fd, size):
    """The last non-empty line of a file, reading blocks back from its end (bytes)."""
    tail, start = b"", size
    while start > 0 and size - start < SCAN_LIMIT:
        begin = max(0, start - BLOCK)
        tail = os.pread(fd, start - begin, begin) + tail
        start = begin
        text = tail.rstrip(b"".join(SEPARATORS))
        cut = max(text.rfind(separator) for separator in SEPARATORS)
        if cut >= 0:
            return text[cut + 1 :]
    # The whole file is one line, or the line began before SCAN_LIMIT: what was read of it.
    return tail.rstrip(b"".join(SEPARATORS))


def printable(data, limit):
    """Text for a terminal, at most limit characters: invalid UTF-8 and control characters
    escaped (\\xff, \\x1b, \\t). The cut keeps whole escapes: never a lone backslash."""
    text = data.decode("utf-8", "surrogateescape")  # an invalid byte: one lone surrogate
    if text.isprintable():
        return text[:limit]
    pieces, length = [], 0
    for char in text:
        piece = char if char.isprintable() else escape(char)
        length += len(piece)
        if length > limit:
            break
        pieces.append(piece)
    return "".join(pieces)


def escape(char):
    """A character that is not printable, as an escape: \\xff for an invalid byte (a lone
    surrogate of surrogateescape), else as Python writes it (\\x1b, \\t, \\u200b)."""
    if 0xDC80 <= ord(char) <= 0xDCFF:
        return "\\x%02x" % (ord(char) - 0xDC00)
    return char.encode("unicode_escape").decode("ascii")
