"""Notifications at a job's end: webhooks and emails, with retries."""

import json
import os
import sys
import time

from .files import (
    now_iso,
)
from .records import (
    public_status,
)


def send_notifications(job, record, job_dir):
    """Send the job's webhooks and emails for its end state; returns one result each."""
    notify = job.get("notify") or {}
    if record.get("state") not in notify.get("on", ()):
        return []
    status = public_status(job["id"], record)
    status.update(host=socket_hostname(), queue=os.path.dirname(os.path.dirname(job_dir)))
    results = []
    for url in notify.get("webhook", ()):
        results.append(with_retries("webhook", url, lambda url=url: post_webhook(url, status)))
    for address in notify.get("email", ()):
        send = lambda address=address: send_email(notify, address, status)  # noqa: E731
        results.append(with_retries("email", address, send))
    return results


def with_retries(kind, target, action, attempts=4, backoff=1.0):
    """Run action until it succeeds, backing off between attempts; log each failure."""
    error = None
    for attempt in range(1, attempts + 1):
        try:
            action()
            return {
                "kind": kind,
                "target": target,
                "ok": True,
                "attempts": attempt,
                "at": now_iso(),
            }
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, none is fatal
            error = "%s: %s" % (type(exc).__name__, exc)
            sys.stderr.write(
                "%s tej: %s %s failed (attempt %d): %s\n"
                % (now_iso(), kind, target, attempt, error)
            )
            sys.stderr.flush()
            if getattr(exc, "code", 500) in (400, 401, 403, 404, 405, 410, 422):
                break
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    return {
        "kind": kind,
        "target": target,
        "ok": False,
        "attempts": attempt,
        "error": error,
        "at": now_iso(),
    }


def socket_hostname():
    """This server's host name."""
    import socket

    return socket.gethostname()


def post_webhook(url, status):
    """POST the job's status as JSON to url."""
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(status).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": "tej"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        response.read()


def send_email(notify, address, status):
    """Send a short plain-text summary of the job's end through SMTP."""
    import smtplib
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = "tej: job %s %s" % (status["id"], status["state"].replace("_", " "))
    message["From"] = notify.get("from") or "tej@%s" % status["host"]
    message["To"] = address
    lines = ["Job %s on %s: %s." % (status["id"], status["host"], status["state"])]
    for key in ("exit_code", "signal", "reason", "started_at", "ended_at", "elapsed", "queue"):
        if status.get(key) is not None:
            lines.append("%s: %s" % (key.replace("_", " ").capitalize(), status[key]))
    message.set_content("\n".join(lines) + "\n")
    host, _, port = notify.get("smtp", "localhost:25").rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        smtp.send_message(message)
