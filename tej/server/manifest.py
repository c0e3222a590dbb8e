"""Upload manifests: decoding and checking the columns the client sends."""

import os
import struct

from ..protocol import (
    ERR_BAD_REQUEST,
    ERR_INVALID,
    MAX_OFFSET,
)
from .errors import (
    AgentError,
    checked_rows,
)
from .files import (
    relative_parts,
    show,
)

MANIFEST_FIELDS = ("paths", "kinds", "modes", "sizes", "digests", "targets")


SUBMIT_FIELDS = frozenset(("job_id", "id_name", "job", "secrets", "params"))


def parse_manifest(manifest):
    """Decode and check a manifest; returns rows (kind, path, mode, size-or-target, digest).

    A manifest lists N entries, in columns: "paths" (bytes: the N relative
    paths, NUL-separated), "kinds" (str: N letters, d folder, f file, l
    symlink), "modes" and "sizes" (bytes: N little-endian uint16 and uint64;
    0 for folders and symlinks), "digests" (bytes: the 32-byte sha256 of
    each non-empty file, in order), "targets" (bytes: the symlinks' targets,
    NUL-separated, in order).
    """
    valid = isinstance(manifest, dict) and sorted(manifest) == sorted(MANIFEST_FIELDS)
    valid = valid and isinstance(manifest["kinds"], str)
    valid = valid and all(isinstance(manifest[name], bytes) for name in MANIFEST_FIELDS[2:])
    valid = valid and isinstance(manifest["paths"], bytes)
    if not valid:
        raise AgentError(
            ERR_BAD_REQUEST, "Invalid manifest: expected %s" % ", ".join(MANIFEST_FIELDS)
        )
    kinds = manifest["kinds"]
    count = len(kinds)
    paths = manifest["paths"].split(b"\0") if count or manifest["paths"] else []
    links = manifest["targets"].split(b"\0") if "l" in kinds or manifest["targets"] else []
    digests = manifest["digests"]
    if not set(kinds) <= set("dfl"):
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: kinds must be d, f or l")
    lengths = [len(paths), len(manifest["modes"]) // 2, len(manifest["sizes"]) // 8]
    if lengths != [count] * 3 or len(manifest["modes"]) % 2 or len(manifest["sizes"]) % 8:
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: its columns differ in length")
    modes = struct.unpack("<%dH" % count, manifest["modes"])
    sizes = struct.unpack("<%dQ" % count, manifest["sizes"])
    if count and (max(modes) > 0o7777 or max(sizes) >= MAX_OFFSET):
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: a mode or a size is out of range")
    check_paths(paths)
    rows = []
    hexes = digests.hex()
    files = symlinks = 0
    for kind, path, mode, size in zip(kinds, paths, modes, sizes):
        if kind == "f" and size:
            rows.append((kind, path, mode, size, hexes[files : files + 64]))
            files += 64
        elif size:
            raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: %s has a size" % show(path))
        elif kind == "l":
            rows.append((kind, path, mode, links[symlinks], ""))
            symlinks += 1
        else:
            rows.append((kind, path, mode, 0, ""))
    if len(hexes) != files or symlinks != len(links) or b"" in links:
        raise AgentError(ERR_BAD_REQUEST, "Invalid manifest: digests or targets don't match")
    return rows


def keep_part(path, manifest):
    """Append a manifest's part, as the client sent it, to a job's MANIFEST_FILE.

    Each column in MANIFEST_FIELDS order: its length (little-endian uint64),
    then its bytes ("kinds" in ASCII). resubmit lays the job's files out again
    from it (see read_parts).
    """
    data = []
    for name in MANIFEST_FIELDS:
        value = manifest[name]
        value = value.encode("ascii") if isinstance(value, str) else value
        data.append(struct.pack("<Q", len(value)) + value)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"".join(data))
    finally:
        os.close(fd)


def read_parts(path):
    """The manifest's parts a MANIFEST_FILE holds (as the client sent them); OSError if none."""
    with open(path, "rb") as stream:
        data = stream.read()
    parts, offset = [], 0
    try:
        while offset < len(data):
            part = {}
            for name in MANIFEST_FIELDS:
                (size,) = struct.unpack_from("<Q", data, offset)
                value = data[offset + 8 : offset + 8 + size]
                if len(value) != size:
                    raise ValueError("truncated")
                part[name] = value.decode("ascii") if name == "kinds" else value
                offset += 8 + size
            parts.append(part)
    except (struct.error, ValueError):
        raise AgentError(ERR_INVALID, "The job's record of its files (%s) is damaged" % path)
    return parts


def parse_part(manifest, contents, submit, more):
    """Check a part of a manifest and what comes with it; returns (rows, contents)."""
    if not isinstance(more, bool):
        raise AgentError(ERR_BAD_REQUEST, "more must be true or false")
    rows = parse_manifest(manifest)
    contents = checked_rows(contents or [], (int, bytes))
    if submit is not None and (not isinstance(submit, dict) or set(submit) - SUBMIT_FIELDS):
        raise AgentError(ERR_BAD_REQUEST, "submit must be a dict of submit's arguments")
    if more and (contents or submit is not None):
        raise AgentError(ERR_BAD_REQUEST, "contents and submit come with the manifest's last part")
    return rows, contents


def check_paths(paths, earlier=frozenset()):
    """Refuse paths that aren't plain relative paths, or that repeat (here or in earlier)."""
    joined = b"/" + b"/\0/".join(paths) + b"/"
    if b"//" in joined or b"/./" in joined or b"/../" in joined:
        for path in paths:
            if b"/".join(relative_parts(path)) != path or not path:
                raise AgentError(ERR_BAD_REQUEST, "Invalid path %s in the manifest" % show(path))
    if len(set(paths)) != len(paths) or not earlier.isdisjoint(paths):
        seen = set(earlier)
        for path in paths:
            if path in seen:
                raise AgentError(ERR_INVALID, "The manifest names %s twice" % show(path))
            seen.add(path)
