"""What a job directory leaves out of its upload (`.tejignore` and tej.json's "exclude"),
and what `tej sync --exclude` leaves alone.

All use gitignore's syntax, matched with the pathspec library: `.tejignore`'s
patterns first, then tej.json's, so a later `!pattern` can take a file back.
An excluded folder is not read at all (git's rule: nothing inside it can be
taken back). tej.json is always sent; `.tejignore` too, unless it excludes
itself. pathspec is imported only when there are patterns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tej.errors import InvalidInput
from tej.jobspec import JOB_FILE

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

IGNORE_FILE = ".tejignore"
MAX_IGNORE_FILE_SIZE = 1 << 20
_ALWAYS_SENT = os.fsencode(JOB_FILE)


class Excludes:
    """The paths of a job directory left out of its upload."""

    def __init__(self, spec: GitIgnoreSpec, origin: str, kept: bytes | None = _ALWAYS_SENT) -> None:
        self.spec = spec
        #: What the patterns came from, for messages: ".tejignore", tej.json's "exclude".
        self.origin = origin
        self.kept = kept  # a path never left out, whatever the patterns say

    def __call__(self, relpath: bytes, is_folder: bool) -> bool:
        """Whether the entry at relpath (relative to the root, as bytes) is left out.

        Only for an entry whose folders are not left out (the scan doesn't enter those).
        """
        if relpath == self.kept:
            return False
        text = os.fsdecode(relpath)
        return bool(self.spec.match_file(text + "/" if is_folder else text))

    def excludes_file(self, relpath: str) -> bool:
        """Whether the file at relpath (with "/" between its parts) is left out, or a folder
        it is in."""
        parts = relpath.split("/")
        folders = ["/".join(parts[:end]) for end in range(1, len(parts))]
        if any(self(os.fsencode(folder), True) for folder in folders):
            return True
        return self(os.fsencode(relpath), False)


def load_excludes(directory: str, patterns: list[str]) -> Excludes | None:
    """The excludes of a job directory: its .tejignore, then patterns (tej.json's "exclude").

    None if there are none at all; InvalidInput for an invalid pattern.
    """
    path = os.path.join(directory, IGNORE_FILE)
    lines = _read_ignore_file(path) if os.path.lexists(path) else []
    sources = [(IGNORE_FILE, lines), (f'{JOB_FILE} "exclude"', patterns)]
    sources = [(name, found) for name, found in sources if any(map(_is_pattern, found))]
    if not sources:
        return None
    _check(lines, path, numbered=True)
    _check(patterns, f'{JOB_FILE} "exclude"')
    import pathspec

    spec = pathspec.GitIgnoreSpec.from_lines([*lines, *patterns])
    return Excludes(spec, " and ".join(name for name, _ in sources))


def sync_excludes(patterns: Sequence[str]) -> Excludes | None:
    """What `tej sync --exclude PATTERN...` leaves alone (None without patterns);
    InvalidInput for an invalid pattern."""
    if not any(map(_is_pattern, patterns)):
        return None
    _check(list(patterns), "--exclude")
    import pathspec

    return Excludes(pathspec.GitIgnoreSpec.from_lines(patterns), "--exclude", kept=None)


def _read_ignore_file(path: str) -> list[str]:
    try:
        if os.path.getsize(path) > MAX_IGNORE_FILE_SIZE:
            raise InvalidInput(f"{path} is larger than {MAX_IGNORE_FILE_SIZE // 1024} KiB")
        with open(path, encoding="utf-8") as stream:
            return stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"Can't read {path}: {exc}") from None


def _is_pattern(line: str) -> bool:
    return bool(line.strip()) and not line.startswith("#")


def _check(lines: list[str], where: str, numbered: bool = False) -> None:
    """Refuse an invalid pattern, naming it and where it is (with its line, if numbered)."""
    import re

    import pathspec

    for number, line in enumerate(lines, 1):
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except (ValueError, re.error):  # re.error: a character range such as [z-a]
            place = f"line {number} of {where}" if numbered else where
            raise InvalidInput(f"Invalid exclude pattern {line!r} ({place})") from None
