"""File primitives: atomic writes, private folders, safe relative paths, ISO times."""

import os
import time

from ..protocol import (
    ERR_INVALID,
    ERR_QUEUE,
)
from .errors import (
    AgentError,
)

POLL_INTERVAL = 0.02


def now_iso(when=None):
    """Format a POSIX time (default: now) as ISO 8601 UTC with microseconds."""
    when = time.time() if when is None else when
    micros = int((when % 1) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + ".%06dZ" % micros


def parse_iso(text):
    """Parse a time written by now_iso back into POSIX time."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hours, minutes, seconds = int(text[11:13]), int(text[14:16]), int(text[17:19])
    days = days_since_epoch(year, month, day)
    fraction = text[20:].rstrip("Z")
    whole = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return whole + (float("0." + fraction) if fraction else 0.0)


def days_since_epoch(year, month, day):
    """Days from 1970-01-01 to a date of the proleptic Gregorian calendar.

    As calendar.timegm counts them, without importing calendar (which loads datetime
    and locale: a millisecond of the first status of every connection).
    """
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def randrange(limit):
    """A random number in [0, limit)."""
    import random

    return random.randrange(limit)


def json_loads(text):
    """The value of a JSON document (a str): as json.loads, without importing json.

    json loads re and enum, which would be most of what a read-only request
    such as `tej status` imports; the C scanner that json.loads itself runs
    needs neither. Without that scanner (another Python), json.loads itself.
    ValueError if text is not one JSON value.
    """
    if _scanner is None or not isinstance(text, str):
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _scanner(text, start)
    except StopIteration:
        raise ValueError("Expecting value at %d" % start) from None
    if text[end:].strip(_JSON_SPACE):
        raise ValueError("Extra data at %d" % end)
    return value


class _JsonContext(object):
    """What the C scanner of json reads of a JSONDecoder (its defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(
        {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__
    )


def _json_scanner():
    """The C scanner of json, or None (another Python)."""
    try:
        from _json import make_scanner

        return make_scanner(_JsonContext())  # type: ignore[arg-type]
    except (ImportError, AttributeError, TypeError):
        return None


_JSON_SPACE = " \t\n\r"
_scanner = _json_scanner()


def write_json_atomic(path, data, durable=True):
    """Write JSON to path atomically: temp file, fsync (if durable), rename."""
    import json

    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_file_atomic(path, text.encode("utf-8"), durable)


def write_json_new(path, data):
    """Write JSON as write_json_atomic does, in a new file (none may be there), without a
    temporary file: for a folder nobody reads until it is renamed into place."""
    import json

    text = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(text)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_file_atomic(path, data, durable=True):
    """Write bytes to path atomically, private to its owner: temp file, fsync, rename.

    Without durable, no fsync: readers still never see a partial file, but
    a power cut may lose the write (for records that a crash makes moot).
    """
    tmp = "%s.tmp-%d-%d" % (path, os.getpid(), randrange(1 << 30))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:  # os calls, not a file object: a record is written at every submit and state
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def read_file(path):
    """A whole (small) file's bytes, in as few system calls as can be: open, read, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []  # type: list[bytes]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_json(path):
    """Read a JSON document; AgentError if it is not valid JSON."""
    data = read_file(path)
    try:
        return json_loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError too
        raise AgentError(ERR_QUEUE, "%s is not valid JSON" % path)


def remove_quietly(path):
    """Remove a file, ignoring its absence."""
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_tree(path):
    """Remove a directory tree, making read-only folders writable on the way."""

    def retry_writable(function, failed_path, _exc_info):
        parent = os.path.dirname(failed_path)
        try:
            os.chmod(parent, 0o700)
            function(failed_path)
        except OSError:
            pass

    import shutil

    shutil.rmtree(path, onerror=retry_writable)


#: When this process last looked for stale entries in a folder (see remove_stale).
_STALE_LOOKS = {}  # type: dict[str, float]
STALE_LOOK_INTERVAL = 60.0


def remove_stale(folder, age):
    """Remove what was left in folder by interrupted work, untouched for age seconds.

    A process looks at a folder at most once a minute: what is stale is hours old,
    and a connection submitting many jobs would list it at each.
    """
    now = time.time()
    if now - _STALE_LOOKS.get(folder, 0.0) < STALE_LOOK_INTERVAL:
        return
    _STALE_LOOKS[folder] = now
    try:
        names = os.listdir(folder)
    except OSError:
        return
    limit = time.time() - age
    for name in names:
        path = os.path.join(folder, name)
        try:
            if os.lstat(path).st_mtime < limit:
                remove_tree(path)
        except OSError:
            pass


def make_private_dirs(path):
    """Create a folder and any missing parents, each private to its owner (whatever the umask)."""
    if os.path.isdir(path):
        return
    make_private_dirs(os.path.dirname(path))
    try:
        make_private_dir(path)
    except FileExistsError:
        pass


def make_private_dir(path):
    """Create a directory readable only by its owner."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)


def relative_parts(relpath):
    """Split a relative path (bytes) into parts, refusing anything that escapes."""
    if not isinstance(relpath, bytes) or b"\0" in relpath:
        raise AgentError(ERR_INVALID, "Invalid path %r" % (relpath,))
    if relpath.startswith(b"/"):
        raise AgentError(ERR_INVALID, "Path %s is absolute" % show(relpath))
    parts = [part for part in relpath.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise AgentError(ERR_INVALID, "Path %s leaves the job's directory" % show(relpath))
    return parts


def show(path):
    """A printable form of a bytes path."""
    return repr(os.fsdecode(path))


def read_at(path, offset, length):
    """Read up to length bytes at offset (nothing if the file doesn't exist yet)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            return stream.read(length)
    except FileNotFoundError:
        return b""


def read_line_with_timeout(stream, timeout):
    """Read one line from a pipe, giving up (empty result) after timeout."""
    import select

    deadline = time.time() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.time()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            break
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    return data


def flush_file_system(path):
    """Make what was written to path's file system durable (syncfs; sync where it's missing)."""
    from .processes import c_library

    libc = c_library()
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()
