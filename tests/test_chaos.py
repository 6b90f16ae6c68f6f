"""The chaos run, small (scripts/chaos.py; the full one: 100 RL steps, 10 kills, numbers in docs/robustness.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """20 RL steps killed 3 times (inside a verifier call, after a checkpoint was written but before its rename,
    and just before last.ckpt is replaced), each time resumed with ckpt_path=last: weights, snapshots and every
    metric (but time/*) bitwise equal to the uninterrupted run; no temporary file, no orphaned verifier worker."""
    out = tmp_path / "chaos"
    cmd = [
        sys.executable,
        "scripts/chaos.py",
        "--steps=20",
        "--kills=3",
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
    assert report["kills"] == 3 and report["kills_paused_at_point"] == 3
    assert report["problems"] == []
