"""The benchmark script keeps working: its smoke mode runs end to end (no timing is checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sshd import sshd_available

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ssh


@pytest.mark.timeout(240)  # about 40 s on a quiet machine; far more on a busy one
def test_bench_smoke(tmp_path: Path) -> None:
    reason = sshd_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the benchmark must run in CI, but sshd is unavailable: {reason}")
        pytest.skip(f"sshd unavailable: {reason}")
    output = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    text = output.read_text()
    for row in range(1, 10):
        line = re.search(rf"^\| {row} +\|.*\|$", text, re.MULTILINE)
        assert line, f"no row {row} in:\n{text}"
        assert "error" not in line.group(0), line.group(0)
    assert re.search(r"^\| 10", text, re.MULTILINE), text  # measured, or marked skipped
    assert "## Machine" in text and "OpenSSH" in text
