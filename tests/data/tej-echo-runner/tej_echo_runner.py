"""A tiny third-party tej runner (tests/test_queue_runner.py installs it as a plugin).

It runs on the server, inside tej's agent: standard library only. It takes one
option, ``greeting``; before starting each job at once under its supervisor, it
writes a marker into the job's directory (the runner's own record, runner.json):
the greeting, the runner's version, and the user, process and host that ran it.
"""

import os
import socket

DEFAULT_GREETING = "hello"
VERSION = "1.0"


def configure(options):
    """Check the queue's settings; returns them normalized (ValueError if bad)."""
    unknown = sorted(set(options) - {"greeting"})
    if unknown:
        raise ValueError("unknown option %r (this runner takes greeting)" % unknown[0])
    greeting = options.get("greeting", DEFAULT_GREETING)
    if not greeting:
        raise ValueError("greeting can't be empty")
    return {"greeting": greeting}


class Runner(object):
    """Greets each job in its directory, then starts it at once."""

    name = "echo"
    job_fields = ()
    initial_state = "starting"
    takes_secrets = True

    def __init__(self, host):
        self.host = host
        self.greeting = host.options.get("greeting", DEFAULT_GREETING)

    def submit(self, job_id, job_dir, job, secrets):
        """Write the marker, then start the job under its supervisor."""
        marker = {
            "runner": self.name,
            "version": VERSION,
            "greeting": "%s, %s" % (self.greeting, job_id),
            "uid": os.getuid(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        self.host.write_data(job_dir, marker)
        self.host.start_supervisor(job_dir, secrets)

    def refresh(self, job_id, job_dir, record):
        """The job's record (lost if its supervisor died)."""
        return self.host.supervised_record(job_dir, record)

    def kill(self, job_id, job_dir, record, grace):
        """Kill the job through its supervisor."""
        return self.host.kill_supervised(job_id, job_dir, record, grace)
