"""The queue runner's waiting line: the order of the queued jobs, kept in the queue's index.

Every queued job holds a ticket, a number taken when it joined the line, in
the line of its priority. The line is a few files in ``QUEUE/index/line/``,
changed only under the queue's lock (see queue.py):

* ``state.json``: for each priority with jobs waiting, the first ticket still
  held (``head``), the next one to give (``next``), the tickets given back
  out of turn (``holes``: jobs killed or cancelled while others were ahead of
  them), and the queued jobs that wait for others (``after``).
* ``PRIORITY/TICKET``: a symbolic link to the id of the job that holds it.
* ``dirty``: made before the first change a lock holder makes, removed once
  ``state.json`` is written. The next holder that finds it knows that one
  died in the middle (SIGKILL): it builds the line again from the queued
  jobs' records.

So a job's place costs a few numbers, whatever the length of the line:
the jobs of higher priorities, plus its ticket minus the head, minus the
holes in between; the next job to start is the head's link.
"""

import bisect
import json
import os

from ...protocol import STATE_QUEUED
from ..files import read_json, remove_quietly, remove_tree, write_file_atomic
from ..index import crash_point, ids_in, index_path
from ..layout import LINE_DIR

LINE_FORMAT = 1
STATE_FILE = "state.json"
DIRTY_FILE = "dirty"


class Line(object):
    """The waiting line, as one holder of the queue's lock sees and changes it."""

    def __init__(self, host):
        self.host = host
        self.folder = index_path(host.root, LINE_DIR)
        self.state = read_state(None)  # loaded when first needed (see the module's doc)
        self.dirty = False

    # reading (also without the lock, for positions)

    def load(self):
        """The line's state; built again first if a holder died while changing it."""
        if self.state is None:
            self.state = read_state(self.folder)
            if self.state is None:
                self.rebuild()
        return self.state

    def position(self, record):
        """[place, number of jobs queued] of a queued job's record, or None if unknown."""
        state = self.state if self.state is not None else read_state(self.folder)
        if state is None:
            return None
        try:
            priority, ticket = record["priority"] or 0, record["ticket"]
        except KeyError:
            return None
        lines = state["priorities"]
        entry = lines.get(str(priority))
        if entry is None or not entry["head"] <= ticket < entry["next"]:
            return None
        ahead = sum(size(other) for key, other in lines.items() if int(key) > priority)
        ahead += ticket - entry["head"] - bisect.bisect_left(entry["holes"], ticket)
        return [ahead + 1, sum(size(other) for other in lines.values())]

    def holds(self, job_id, record):
        """Whether a job is in the line, with the ticket its record names."""
        self.load()
        priority, ticket = record.get("priority") or 0, record.get("ticket")
        return self.position(record) is not None and self.holder(priority, ticket) == job_id

    def walk(self):
        """The queued jobs in the order they start: (priority, ticket, job id), head first."""
        lines = self.load()["priorities"]
        for key in sorted(lines, key=int, reverse=True):
            entry = lines.get(key)
            ticket = entry["head"] if entry else 0
            while entry is not None and ticket < entry["next"]:
                ticket = max(ticket, entry["head"])
                holes = entry["holes"]
                place = bisect.bisect_left(holes, ticket)
                if place == len(holes) or holes[place] != ticket:
                    job_id = self.holder(key, ticket)
                    if job_id is not None:
                        yield int(key), ticket, job_id
                ticket += 1
                entry = lines.get(key)  # the head may have moved (a job started)

    def holder(self, priority, ticket):
        """The id of the job that holds a ticket, or None."""
        try:
            return os.readlink(self.ticket_path(priority, ticket))
        except OSError:
            return None

    def ticket_path(self, priority, ticket):
        """The link of a ticket."""
        return os.path.join(self.folder, str(priority), "%012d" % ticket)

    def waiting_for_others(self):
        """The queued jobs that wait for others to succeed (after)."""
        return list(self.load()["after"])

    # changing (under the lock)

    def join(self, job_id, record, waits):
        """Give a job the next ticket of its priority (record["ticket"]); waits: it has after."""
        state = self.load()
        self.mark()
        priority = record.get("priority") or 0
        entry = state["priorities"].setdefault(str(priority), {"head": 0, "next": 0, "holes": []})
        ticket = entry["next"]
        entry["next"] += 1
        path = self.ticket_path(priority, ticket)
        if not os.path.isdir(os.path.dirname(path)):
            os.mkdir(os.path.dirname(path), 0o700)
        remove_quietly(path)
        os.symlink(job_id, path)
        if waits and job_id not in state["after"]:
            state["after"].append(job_id)
        record["ticket"] = ticket
        return ticket

    def settled(self, job_id):
        """A job no longer waits for others (it stays in the line)."""
        if job_id in self.load()["after"]:
            self.mark()
            self.load()["after"].remove(job_id)

    def leave(self, job_id, record):
        """Take a job out of the line (it started, or will never start)."""
        self.give_back(record.get("priority") or 0, record.get("ticket"), job_id)

    def give_back(self, priority, ticket, job_id):
        """Free a ticket: the head moves on, or the ticket becomes a hole."""
        state = self.load()
        self.mark()
        if job_id in state["after"]:
            state["after"].remove(job_id)
        entry = state["priorities"].get(str(priority))
        if ticket is None or entry is None or not entry["head"] <= ticket < entry["next"]:
            return
        if self.holder(priority, ticket) == job_id:
            remove_quietly(self.ticket_path(priority, ticket))
        if ticket != entry["head"]:
            if ticket not in entry["holes"]:
                bisect.insort(entry["holes"], ticket)
            return
        self.move_head(priority, entry)

    def move_head(self, priority, entry):
        """Move a line's head past the tickets no job holds any more."""
        holes = entry["holes"]
        entry["head"] += 1
        while entry["head"] < entry["next"]:
            if holes and holes[0] == entry["head"]:
                holes.pop(0)
            elif os.path.lexists(self.ticket_path(priority, entry["head"])):
                break
            entry["head"] += 1
        del holes[: bisect.bisect_left(holes, entry["head"])]
        if entry["head"] >= entry["next"]:
            del self.load()["priorities"][str(priority)]
            try:
                os.rmdir(os.path.dirname(self.ticket_path(priority, 0)))
            except OSError:
                pass

    def mark(self):
        """Before the first change: say the line is being changed (see DIRTY_FILE)."""
        if not self.dirty:
            if not os.path.isdir(self.folder):
                os.mkdir(self.folder, 0o700)
            os.close(os.open(os.path.join(self.folder, DIRTY_FILE), os.O_WRONLY | os.O_CREAT))
            self.dirty = True
            crash_point("line-dirty")

    def save(self):
        """Write the changes (state.json), then say the line is whole again."""
        if self.dirty:
            text = json.dumps(self.state, sort_keys=True).encode("utf-8")
            write_file_atomic(os.path.join(self.folder, STATE_FILE), text, durable=False)
            remove_quietly(os.path.join(self.folder, DIRTY_FILE))
            self.dirty = False

    def rebuild(self):
        """Build the line again from the records of the queued jobs (the index's queued/)."""
        root = self.host.root
        if os.path.isdir(self.folder):
            os.close(os.open(os.path.join(self.folder, DIRTY_FILE), os.O_WRONLY | os.O_CREAT))
            for name in os.listdir(self.folder):
                if name not in (DIRTY_FILE,):
                    path = os.path.join(self.folder, name)
                    (remove_tree if os.path.isdir(path) else remove_quietly)(path)
        self.state = {"format": LINE_FORMAT, "priorities": {}, "after": []}
        self.dirty = False
        queued = []
        for job_id in ids_in(root, "queued") + ids_in(root, "running"):
            job_dir = self.host.job_path(job_id)
            record = self.host.read_record(job_dir) or {}
            state = record.get("state")
            if state == "queued" or (state == "running" and record.get("in_line")):
                queued.append((record.get("queued_at") or 0, job_id, record))
        for _, job_id, record in sorted(queued, key=lambda item: item[:2]):
            ticket = record.get("ticket")
            self.join(job_id, record, bool(record.get("after")))
            if record["ticket"] != ticket:
                self.host.write_record(self.host.job_path(job_id), record)
        self.mark()
        self.save()


def size(entry):
    """How many jobs a line of one priority holds."""
    return entry["next"] - entry["head"] - len(entry["holes"])


def read_state(folder):
    """The line's state.json, or None if it must be built again (missing, dirty, damaged)."""
    if folder is None:
        return None
    if os.path.exists(os.path.join(folder, DIRTY_FILE)):
        return None
    try:
        state = read_json(os.path.join(folder, STATE_FILE))
    except Exception:  # noqa: BLE001 - missing or damaged: built again
        return None
    if not isinstance(state, dict) or state.get("format") != LINE_FORMAT:
        return None
    return state


def settle_places(statuses):
    """Give statuses (one listing's, or one job's) their places in the queue runner's line
    as their arrays' counts tell them.

    The line is read before an array's counts, and without a lock: an array whose last
    task started in between comes with the place it had a moment before, though its
    counts show no task left to start. It has left the line: it gets no place, and the
    jobs behind it move up, so that a listing's places are still 1 to N.
    """
    stale = sorted(
        status["position"][0]
        for status in statuses
        if status.get("position")
        and status.get("array")
        and not status["array"]["counts"].get(STATE_QUEUED)
    )
    if not stale:
        return
    for status in statuses:
        place = status.get("position")
        if not place:
            continue
        ahead = bisect.bisect_left(stale, place[0])
        if ahead < len(stale) and stale[ahead] == place[0]:
            status["position"] = None
        else:
            status["position"] = [place[0] - ahead, place[1] - len(stale)]
