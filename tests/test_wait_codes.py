"""`tej wait --exit-code` for jobs that did not simply finish."""

from __future__ import annotations

from helpers import Target, wait_until

TRAPS_TERM = """#!/bin/sh
trap 'echo saving; exit 0' TERM
echo ready > ready.txt
while :; do sleep 0.1; done
"""


def test_a_killed_job_that_exits_0_on_sigterm_still_reports_killed(target: Target) -> None:
    job_id = target.submit(target.make_job("trap", TRAPS_TERM))
    wait_until(lambda: target.work(job_id, "ready.txt").exists(), message="the trap to be set")
    target.cli("kill", "--id", job_id, check=0)
    done = target.cli("wait", "--id", job_id, "--exit-code")
    assert done.returncode == 143, done
    assert done.stdout.startswith("Job was killed"), done
