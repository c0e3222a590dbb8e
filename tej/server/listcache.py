"""The list cache: the rows of ended jobs, so that `list` needn't read every job."""

import json
import os

from .errors import (
    AgentError,
)
from .files import (
    read_json,
    write_file_atomic,
)
from .layout import (
    STATUS_FILE,
)

LIST_CACHE_FORMAT = 2  # 2: rows (values in LIST_FIELDS order), not status dicts


LIST_FIELDS = (
    "id",
    "state",
    "exit_code",
    "signal",
    "reason",
    "submitted_at",
    "scheduled_for",
    "started_at",
    "ended_at",
    "elapsed",
    "position",
    "notifications",
    "resources",
    "progress",
)


class ListCache(object):
    """The list rows of ended jobs, kept so that `list` needn't read every job.

    An entry is keyed by the (inode, mtime) of the job's status.json: status
    files are replaced, never edited, so any change misses the cache. It is
    only a cache: lost, unreadable or unwritable, it is rebuilt.
    """

    def __init__(self, path):
        self.path = path
        self.entries = {}  # type: dict[str, list[object]]  # job id -> [key, row]
        self.used = {}  # type: dict[str, list[object]]  # the entries of the jobs seen
        self.changed = False
        try:
            data = read_json(path)
            # Rows of another format or layout (LIST_FIELDS) are not used.
            if (
                isinstance(data, dict)
                and data.get("format") == LIST_CACHE_FORMAT
                and data.get("fields") == list(LIST_FIELDS)
            ):
                self.entries = data.get("jobs") or {}
        except (OSError, AgentError):
            pass

    @staticmethod
    def key(job_dir):
        """The cache key of a job's status file, or None if it has none."""
        try:
            info = os.stat(job_dir + "/" + STATUS_FILE)
        except OSError:
            return None
        return [info.st_ino, info.st_mtime_ns]

    def get(self, job_id, key):
        """The cached row of a job, if its status file is unchanged."""
        entry = self.entries.get(job_id)
        if key is None or not isinstance(entry, list) or len(entry) != 2 or entry[0] != key:
            return None
        row = entry[1]
        if not isinstance(row, list) or len(row) != len(LIST_FIELDS):
            return None
        self.used[job_id] = entry
        return row

    def put(self, job_id, key, row):
        """Remember the row of an ended job."""
        self.used[job_id] = [key, row]
        self.changed = True

    def save(self):
        """Write the entries of the jobs seen (dropping deleted ones), if anything changed."""
        if not self.changed and len(self.used) == len(self.entries):
            return
        try:
            data = {"format": LIST_CACHE_FORMAT, "fields": LIST_FIELDS, "jobs": self.used}
            write_file_atomic(self.path, json.dumps(data).encode("utf-8"), durable=False)
        except OSError:
            pass
