"""The chaos run, small (scripts/chaos.py; the full one: 100 RL steps, 10 SIGKILLs, 10 SIGTERMs, 50 Ctrl-Cs, numbers
in docs/robustness.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_preempted_and_interrupted_runs(tmp_path):
    """20 RL steps killed 3 times (inside a verifier call, after a checkpoint was written but before its rename,
    and just before last.ckpt is replaced), each time resumed with ckpt_path=last: weights, snapshots and every
    metric (but time/*) bitwise equal to the uninterrupted run; no temporary file, no orphaned verifier worker.
    The same run stopped 3 times by SIGTERM to its process group at random moments: non-zero exit each time, then
    equal to the uninterrupted run too. 3 Ctrl-Cs with a busy verifier pool: each exits within the deadline, nothing
    left running."""
    out = tmp_path / "chaos"
    cmd = [
        sys.executable,
        "scripts/chaos.py",
        "--steps=20",
        "--kills=3",
        "--sigterms=3",
        "--ctrl-c=3",
        f"--out={out}",
        f"--cache-dir={REPO / 'logs' / 'cache'}",  # the default tiny model's warm start, as `make train` caches it
        "--last-every=3",
        "--snapshot-every=10",
        "--points",
        "verify",
        "checkpoint.written",
        "checkpoint.commit",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sigkill"]["kills"] == 3 and report["sigkill"]["kills_paused_at_point"] == 3
    assert report["sigterm"]["non_zero_each_time"] and report["sigterm"]["signals"] >= 1
    assert report["ctrl_c"]["hung"] == 0 and report["ctrl_c"]["left_running"] == 0
    assert report["problems"] == []
