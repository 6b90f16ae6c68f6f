"""scripts/gpu_smoke.sh and scripts/gpu_wheels.sh as far as a machine without a GPU can check them: the shell
syntax, and the smoke's CPU dry run (tiny model, 1 RL step) through the same script and runs as on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import compose_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PACKING_KNOBS = ("gradient_checkpointing", "micro_batch_tokens", "padding_free")


@pytest.mark.parametrize("script", ["gpu_smoke.sh", "gpu_wheels.sh", "slurm/train.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


def smoke(tmp_path: Path, name: str, **settings: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path / name / "out"),
        SMOKE_WORK=str(tmp_path / name / "work"),
        SMOKE_DEVICE="cpu",
        SMOKE_MODEL="tiny",
        SMOKE_STEPS="1",
        SMOKE_PROMPTS="2",
        SMOKE_GROUP="2",
        SMOKE_MAX_NEW_TOKENS="4",
        SMOKE_MICRO_BATCH_TOKENS="16",
        SMOKE_PYTEST="",
        OMP_NUM_THREADS="1",
        **settings,
    )
    return subprocess.run(["bash", "scripts/gpu_smoke.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_smoke_dry_run_on_cpu(tmp_path):
    """Every run of the smoke composes before any starts: while the packing knobs do not exist the smoke stops at
    once with Hydra's message naming the first one; the runs that exist run and fill the table. (FSDP2 on one
    process: composed here, run by tests/test_entry_points.py on two.)"""
    knobs = compose_config().module
    if all(k in knobs for k in PACKING_KNOBS):
        runs = ["plain", "ckpt_packed"]
    else:
        proc = smoke(tmp_path, "all")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Could not override 'module.gradient_checkpointing'" in proc.stdout
        assert "nothing was run" in proc.stdout and not (tmp_path / "all" / "work" / "runs").exists()
        runs = ["plain"]
    proc = smoke(tmp_path, "some", SMOKE_RUNS=",".join(runs))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "some" / "out"
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results] == runs and all(r["status"] == "ok" and r["steps"] == 1 for r in results)
    assert all(r["step_s"] > 0 and r["peak_gib"] != r["peak_gib"] for r in results)  # no CUDA: no peak (NaN)
    table = (out / "smoke.md").read_text()
    assert "| run | status | RL steps | s/step |" in table and "all ok" in table
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["smoke.md", "results.json", "runs.log", *(f"metrics-{r}.csv" for r in runs)]
    )
