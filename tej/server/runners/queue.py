"""tej's queue runner: at most N jobs run at once; the others wait their turn.

This module runs on the server, inside tej's agent and supervisors (see
docs/runners.md): standard library only, Python 3.8 and newer.

* ``max_running`` (``tej setup DEST --plugin queue --option max_running=N``,
  1 by default) jobs run at once; the others are ``queued``.
* Waiting jobs start by ``priority`` (higher first, 0 by default), then in
  submission order.
* A job with ``after`` (job ids) starts only once all of those finished with
  exit code 0; if one of them fails, is killed, times out, is lost, is
  cancelled or is deleted before it succeeded, the job is ``cancelled``, with
  the reason (a job that succeeded may then be deleted: the jobs after it
  still start).
* A job with a start time waits for it under its supervisor (``scheduled``),
  then joins the queue.

There is no daemon: the queue moves on whenever a job ends (its supervisor
"ticks"), and whenever a client submits, kills, deletes or lists. Every
decision is taken under the queue's lock, so concurrent clients and
supervisors never start more than ``max_running`` jobs.
"""

import time

from ...protocol import job_id_problem
from .line import Line, read_state

#: The job fields this runner owns (tej.json's and the client's).
JOB_FIELDS = ("priority", "after")
MAX_PRIORITY = 1000000
DEFAULT_MAX_RUNNING = 1
MAX_RUNNING_LIMIT = 100000
OCCUPYING = ("starting", "running")  # the states that take a place
ENDINGS = {
    "killed": "was killed",
    "timed_out": "timed out",
    "lost": "was lost",
    "cancelled": "was cancelled",
}


def configure(options):
    """Check the queue's settings; returns them normalized (ValueError if bad)."""
    unknown = sorted(set(options) - {"max_running"})
    if unknown:
        raise ValueError("unknown option %r (this runner takes max_running)" % unknown[0])
    text = options.get("max_running", str(DEFAULT_MAX_RUNNING))
    try:
        value = int(text)
    except ValueError:
        raise ValueError("max_running must be a whole number, not %r" % text) from None
    if not 1 <= value <= MAX_RUNNING_LIMIT:
        raise ValueError("max_running must be from 1 to %d, not %d" % (MAX_RUNNING_LIMIT, value))
    return {"max_running": value}


def check_fields(job):
    """This runner's fields of a job, checked and normalized; ValueError if one is bad.

    job may come from tej.json (`after` a job id or a list of them) or from the
    client (normalized already).
    """
    fields = {}
    priority = job.get("priority")
    if priority is not None:
        whole = isinstance(priority, int) and not isinstance(priority, bool)
        if not whole or abs(priority) > MAX_PRIORITY:
            raise ValueError(
                "priority must be a whole number from -%d to %d" % (MAX_PRIORITY, MAX_PRIORITY)
            )
        fields["priority"] = priority
    after = job.get("after")
    if after:
        ids = [after] if isinstance(after, str) else after
        if not isinstance(ids, list) or not all(isinstance(item, str) for item in ids):
            raise ValueError("after must be a list of strings")
        for job_id in ids:
            if "\0" in job_id:
                raise ValueError("after can't contain NUL characters")
            if job_id_problem(job_id):
                raise ValueError("Invalid job identifier %r in after" % job_id)
        fields["after"] = list(dict.fromkeys(ids))
    return fields


class Runner(object):
    """Runs jobs in turn, at most max_running at once, by priority and dependencies."""

    name = "queue"
    job_fields = JOB_FIELDS
    initial_state = "queued"
    takes_secrets = False

    def __init__(self, host):
        self.host = host
        self.max_running = int(host.options.get("max_running", DEFAULT_MAX_RUNNING))

    # the interface

    def check_job(self, job):
        """Refuse a bad priority, and dependencies on jobs that don't exist."""
        try:
            after = check_fields(job).get("after") or []
        except ValueError as exc:
            raise self.host.invalid(str(exc))
        for job_id in after:
            if not self.host.has_job(job_id):
                raise self.host.invalid("after: there is no job %r in this queue" % job_id)

    def prepare(self, job, record):
        """The new job's first record, complete before the job is visible to anyone."""
        record = dict(
            record,
            priority=job.get("priority", 0),
            after=job.get("after") or [],
            queued_at=time.time(),
        )
        if (record.get("start_time") or 0) > time.time():
            # Scheduled: its supervisor waits for the time, then calls admit().
            record.update(state="starting", admitted_at=self.host.now())
        return record

    def submit(self, job_id, job_dir, job, secrets):
        """Put a new job in the line (or start a scheduled job's supervisor); move the queue on."""
        if (self.host.read_record(job_dir) or {}).get("state") == "starting":
            self.host.start_supervisor(job_dir)
        try:
            self.repair(job_id)
        except Exception:  # noqa: BLE001 - the job is queued: the next command repairs it
            pass

    def repair(self, job_id):
        """Make sure a queued job is in the line (its submit may have died), and tick."""
        with self.host.lock():
            line = Line(self.host)
            line.load()  # first: building it again may give the job its ticket
            job_dir = self.host.job_path(job_id)
            record = self.host.read_record(job_dir)
            queued = record is not None and record.get("state") == "queued"
            if queued and not line.holds(job_id, record):
                line.join(job_id, record, bool(self.pending(record)))
                # Not durable: a ticket lost in a power cut is found again (see dispatch).
                self.host.write_record(job_dir, record, durable=False)
            self.dispatch(line)

    def admit(self, job_id, job_dir, record):
        """Called by a scheduled job's supervisor at its start time: join the queue."""
        if record.get("state") != "scheduled":
            return record  # started by tick() already
        with self.host.lock():
            line = Line(self.host)
            record = dict(self.host.read_record(job_dir) or record)
            if record.get("state") == "scheduled":
                record.pop("supervisor", None)
                record.update(state="queued", queued_at=record.get("start_time") or time.time())
                line.join(job_id, record, bool(self.pending(record)))
                self.host.write_record(job_dir, record)
            self.dispatch(line)
        return record

    def refresh(self, job_id, job_dir, record):
        """The job's record; a queued job's has its position in the queue."""
        return self.refresh_many([(job_id, job_dir, record)])[0]

    def refresh_many(self, jobs):
        """The records of several jobs, with the positions of the queued ones."""
        records = [self.host.supervised_record(job_dir, record) for _, job_dir, record in jobs]
        line = Line(self.host)
        for (_, job_dir, _), record in zip(jobs, records):
            if record.get("state") == "queued":
                if line.state is None:
                    line.state = read_state(line.folder) or self.rebuilt_line()
                if record.get("ticket") is None:  # given one as the line was built
                    record.update(self.host.read_record(job_dir) or {})
                record["position"] = line.position(record)
        return records

    def rebuilt_line(self):
        """The line's state after building it again (a queue just upgraded, or a crash)."""
        with self.host.lock():
            line = Line(self.host)
            state = line.load()
            line.save()
            return state

    def kill(self, job_id, job_dir, record, grace):
        """Take a queued job out of the queue; kill a running one through its supervisor."""
        if record.get("state") == "queued":
            with self.host.lock():
                current = self.host.read_record(job_dir) or record
                if current.get("state") == "queued":
                    line = Line(self.host)
                    current.update(
                        state="killed",
                        ended_at=self.host.now(),
                        reason="cancelled before it started",
                    )
                    line.leave(job_id, current)
                    self.host.write_record(job_dir, current)
                    line.save()
                    return True, current
            record = self.host.supervised_record(job_dir)  # it started meanwhile
        return self.host.kill_supervised(job_id, job_dir, record, grace)

    def tick(self):
        """Cancel jobs whose dependencies failed, and start jobs while there is room."""
        with self.host.lock():
            self.dispatch(Line(self.host))

    # the queue's logic (called under the lock)

    def dispatch(self, line):
        """Cancel the jobs that can no longer run, then start the next ones in turn.

        It reads the jobs that occupy a place, those that wait for others, and the
        line's head: not the whole queue.
        """
        try:
            records = Records(self.host)
            self.settle_dependencies(line, records)
            running = self.occupied()
            for _, ticket, job_id in line.walk():
                if running >= self.max_running:
                    break
                record = records.get(job_id)
                if not self.holds(job_id, record, ticket):
                    line.give_back(place_of(record or {})[0], ticket, job_id)  # a stale ticket
                    continue
                if self.pending(record):
                    continue  # still waiting for others
                self.start(job_id, record, line)
                running += 1
        finally:
            line.save()

    def holds(self, job_id, record, ticket):
        """Whether a job still holds a ticket of the line (one whose record lost its ticket,
        in a power cut, is given it again)."""
        if (record or {}).get("state") != "queued":
            return False
        if record.get("ticket") is None:
            record["ticket"] = ticket
            self.host.write_record(self.host.job_path(job_id), record, durable=False)
        return record["ticket"] == ticket

    def occupied(self):
        """How many jobs take a place: starting or running, and not lost."""
        count = 0
        for state in OCCUPYING:
            for job_id in self.host.job_ids_in(state):
                record = self.host.supervised_record(self.host.job_path(job_id))
                count += record.get("state") in OCCUPYING
        return count

    def settle_dependencies(self, line, records):
        """For the jobs that wait for others: note those that succeeded; cancel the doomed."""
        changed = True
        while changed:
            changed = False
            for job_id in line.waiting_for_others():
                record = records.get(job_id)
                if (record or {}).get("state") != "queued":
                    line.leave(job_id, record or {})
                    continue
                changed |= self.settle(job_id, record, records, line)

    def settle(self, job_id, record, records, line):
        """Note the dependencies of a job that succeeded; cancel it if one failed.

        A job that succeeded may be deleted before the jobs after it start: they
        must still start, so each remembers it (in after_done). Returns whether
        the job was cancelled.
        """
        job_dir = self.host.job_path(job_id)
        done = [dep for dep in self.pending(record) if succeeded(records.get(dep))]
        if done:
            record["after_done"] = (record.get("after_done") or []) + done
        reason = self.failed_dependency(record, records)
        if reason:
            record.update(state="cancelled", ended_at=self.host.now(), reason=reason)
        if reason:
            line.leave(job_id, record)
        elif not self.pending(record):
            line.settled(job_id)
        if done or reason:
            self.host.write_record(job_dir, record)
        return bool(reason)

    def pending(self, record):
        """The jobs a job waits for that weren't seen succeed yet."""
        done = record.get("after_done") or []
        return [job_id for job_id in record.get("after") or [] if job_id not in done]

    def failed_dependency(self, record, records):
        """Why a job can never start (a dependency failed), or None."""
        for dependency in self.pending(record):
            found = records.get(dependency)
            if found is None:
                return "job %s was deleted before it succeeded" % dependency
            state = found.get("state")
            if state == "finished" and found.get("exit_code") != 0:
                return "job %s failed with exit code %s" % (dependency, found.get("exit_code"))
            if state in ENDINGS:
                return "job %s %s" % (dependency, ENDINGS[state])
        return None

    def start(self, job_id, record, line):
        """Start a queued job under its supervisor; a failure to start is recorded."""
        job_dir = self.host.job_path(job_id)
        line.leave(job_id, record)
        record.update(state="starting", admitted_at=self.host.now())
        self.host.write_record(job_dir, record)
        line.save()  # before the fork: a crash while the supervisor starts leaves the line whole
        try:
            self.host.start_supervisor(job_dir)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the queue
            current = self.host.read_record(job_dir) or {}
            if current.get("state") == "starting" and not current.get("supervisor"):
                current.update(state="lost", ended_at=self.host.now(), reason=str(exc))
                self.host.write_record(job_dir, current)


class Records(object):
    """The records of the jobs dispatch reads, each read once (None: no such job)."""

    def __init__(self, host):
        self.host = host
        self.known = {}  # type: dict[str, dict[str, object] | None]

    def get(self, job_id):
        """A job's current record (a dead supervisor's job lost), or None if it is gone."""
        if job_id not in self.known:
            job_dir = self.host.job_path(job_id)
            record = self.host.read_record(job_dir) if self.host.has_job(job_id) else None
            self.known[job_id] = record and self.host.supervised_record(job_dir, record)
        return self.known[job_id]


def place_of(record):
    """A queued job's (priority, ticket) in the line."""
    return record.get("priority") or 0, record.get("ticket")


def succeeded(record):
    """Whether a job's record says it finished with exit code 0."""
    return bool(record) and record.get("state") == "finished" and record.get("exit_code") == 0
