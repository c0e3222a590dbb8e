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
* An array holds one place in the line; at its turn its next tasks start, each
  taking a place, up to its own %N; the array leaves the line when its last
  task has started. Its record is kept by its tasks (arrays.note_task_change).

There is no daemon: the queue moves on whenever a job ends (its supervisor
"ticks"), and whenever a client submits, kills, deletes or lists. Every
decision is taken under the queue's lock, so concurrent clients and
supervisors never start more than ``max_running`` jobs.
"""

import os
import time

from ...protocol import job_id_problem
from ..layout import JOBS_DIR
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
    supports_arrays = True  # one place in the line, its tasks started at its turn

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
        if job.get("array") is not None:  # its tasks keep its record; it waits in the line
            record.update(kept_by_tasks=True, in_line=True)
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
            if waiting(record) and not line.holds(job_id, record):
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
        """The job's record, with its position if it waits in the line (see refresh_many)."""
        return self.refresh_many([(job_id, job_dir, record)])[0]

    def refresh_many(self, jobs):
        """The records of several jobs, with the positions of those waiting in the line
        (queued jobs, and arrays some of whose tasks are still to start)."""
        records = [self.host.supervised_record(job_dir, record) for _, job_dir, record in jobs]
        line = Line(self.host)
        for (_, job_dir, _), record in zip(jobs, records):
            if waiting(record):
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
        if record.get("kept_by_tasks"):
            return self.kill_array(job_id, job_dir, grace)
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
                if record.get("kept_by_tasks"):
                    running = self.start_tasks(job_id, record, line, running)
                    continue
                self.start(job_id, record, line)
                running += 1
        finally:
            line.save()

    def holds(self, job_id, record, ticket):
        """Whether a job still holds a ticket of the line (one whose record lost its ticket,
        in a power cut, is given it again)."""
        if not waiting(record):
            return False
        if record.get("ticket") is None:
            record["ticket"] = ticket
            self.host.write_record(self.host.job_path(job_id), record, durable=False)
        return record["ticket"] == ticket

    def occupied(self):
        """How many jobs take a place: starting or running, and not lost (an array's:
        its tasks that are)."""
        count = 0
        for state in OCCUPYING:
            for job_id in self.host.job_ids_in(state):
                job_dir = self.host.job_path(job_id)
                record = self.host.supervised_record(job_dir)
                if record.get("kept_by_tasks"):
                    count += self.running_tasks(job_dir)
                else:
                    count += record.get("state") in OCCUPYING
        return count

    def running_tasks(self, array_dir):
        """How many of an array's tasks take a place (from the array's own index)."""
        from ..index import ids_in

        count = 0
        for state in OCCUPYING:
            for name in ids_in(array_dir, state):
                task_dir = os.path.join(array_dir, JOBS_DIR, name)
                count += self.host.supervised_record(task_dir).get("state") in OCCUPYING
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
        self.start_supervisor(job_dir)

    def start_supervisor(self, job_dir, prepare=None):
        """Start a job's supervisor (after prepare(), if given); a failure is recorded."""
        try:
            if prepare is not None:
                prepare()
            self.host.start_supervisor(job_dir)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the queue
            current = self.host.read_record(job_dir) or {}
            if current.get("state") == "starting" and not current.get("supervisor"):
                current.update(state="lost", ended_at=self.host.now(), reason=str(exc))
                self.host.write_record(job_dir, current)

    # arrays (called under the lock, but kill_array)

    def start_tasks(self, array_id, record, line, running):
        """Start an array's next tasks while there are places and it is under its %N;
        returns how many places are taken then. It leaves the line with its last task.

        The tasks are reserved (their folders made, starting) and the array's record
        written before any supervisor starts: a task that ends at once can't see the
        array's record change under it.
        """
        from ..arrays import array_indexes, new_task_record, read_params, reserve_task, task_job

        array_dir = self.host.job_path(array_id)
        job = self.host.read_job(array_dir)
        if job is None:
            line.leave(array_id, record)
            return running
        limit = job["array"].get("max_parallel") or self.max_running
        indexes = array_indexes(job)
        position, room = record.get("next_task") or 0, limit - self.running_tasks(array_dir)
        params, reserved = None, []
        while position < len(indexes) and running < self.max_running and room > 0:
            if params is None:
                params = read_params(array_dir) or []
            index = indexes[position]
            position += 1
            task = task_job(job, array_id, index, params[index] if params else None)
            first = dict(new_task_record(), admitted_at=self.host.now())
            task_dir = reserve_task(array_dir, task, first)
            if task_dir is not None:  # else cancelled on its own before it started
                reserved.append(task_dir)
                running, room = running + 1, room - 1
        if position == (record.get("next_task") or 0):
            return running  # at its %N: the next in line goes first
        record["next_task"] = position
        if position >= len(indexes):
            line.leave(array_id, record)
            record["in_line"] = False
        if reserved and record.get("state") != "running":
            record.update(state="running", started_at=self.host.now())
        self.host.write_record(array_dir, record, durable=False)
        line.save()
        for task_dir in reserved:
            self.start_supervisor(task_dir, lambda task_dir=task_dir: self.lay_out(task_dir))
        return running

    def lay_out(self, task_dir):
        """Lay a reserved task's work/ out from its array's manifest."""
        from ..arrays import array_of_task, lay_out_task

        lay_out_task(self.host.queue, array_of_task(task_dir), task_dir)

    def kill_array(self, array_id, array_dir, grace):
        """Kill an array: it leaves the line (its unstarted tasks are cancelled), then its
        running tasks are killed through their supervisors; the last one's end is the array's."""
        from ..arrays import settle_array
        from ..index import ids_in

        with self.host.lock():
            record = self.host.read_record(array_dir) or {}
            if record.get("state") in self.host.END_STATES:
                return False, record
            line = Line(self.host)
            if waiting(record):
                line.leave(array_id, record)
            record.update(in_line=False, kill_requested=True)
            self.host.write_record(array_dir, record)
            line.save()
        for state in OCCUPYING:
            for name in ids_in(array_dir, state):
                task_dir = os.path.join(array_dir, JOBS_DIR, name)
                task_id = "%s.%s" % (array_id, name)
                found = self.host.supervised_record(task_dir)
                self.host.kill_supervised(task_id, task_dir, found, grace)
        record = settle_array(array_dir, self.host.read_record(array_dir) or record)
        return True, record


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


def waiting(record):
    """Whether a job's record says it holds a place in the line: queued, or an array
    some of whose tasks are still to start."""
    state = (record or {}).get("state")
    return state == "queued" or (state == "running" and bool(record.get("in_line")))


def place_of(record):
    """A queued job's (priority, ticket) in the line."""
    return record.get("priority") or 0, record.get("ticket")


def succeeded(record):
    """Whether a job's record says it finished with exit code 0."""
    return bool(record) and record.get("state") == "finished" and record.get("exit_code") == 0
