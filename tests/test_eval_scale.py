"""pass@k to k = 1024: the estimator's numerics at n = 1024, and ``simko.eval``'s per-problem records (shards merged
by ``simko.eval_merge`` equal the unsharded run; a killed run resumed equals the uninterrupted one; a resume with
another config is refused). The entry points run as subprocesses on a small tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import torch

from helpers import SMALL_TINY
from simko import eval_merge
from simko.metrics import pass_at_k, pass_at_k_tensor

REPO = Path(__file__).resolve().parents[1]
# One evaluation config for every run here: 8 problems x n = 16 (warm-started SMALL_TINY: some correct, some not).
EVAL = ["eval.n=16", "eval.limit=8", "eval.diagnostics_samples=4", *SMALL_TINY]


def test_pass_at_k_matches_exact_fractions_at_n_1024():
    """The product form (scalar) and the log-space sum (tensor) against 1 - C(n-c, k) / C(n, k) in exact rationals,
    for n = 1024 and c, k across the range, pass@k near 0 and near 1 included."""
    n = 1024
    cs = [0, 1, 2, 3, 10, 100, 511, 512, 900, 1000, 1020, 1023, 1024]
    ks = [1, 2, 4, 16, 64, 100, 256, 512, 1000, 1021, 1024]
    for k in ks:
        got = pass_at_k_tensor(torch.tensor(cs), n, k).tolist()
        for c, tensor_value in zip(cs, got):
            exact = 1 - Fraction(comb(n - c, k), comb(n, k))
            want = float(exact)
            scalar = pass_at_k(n, c, k)
            assert scalar == pytest.approx(want, rel=1e-12, abs=1e-15), (c, k)
            assert tensor_value == pytest.approx(want, rel=1e-12, abs=1e-15), (c, k)
            if exact in (0, 1):  # exactly 0 without a correct sample, exactly 1 when every k-subset holds one
                assert scalar == tensor_value == want, (c, k)
    # A problem solved once in 1024 samples: pass@1 = 1/1024 exactly representable, pass@k = k/1024
    assert pass_at_k(n, 1, 1) == 1 / 1024 and pass_at_k_tensor(torch.tensor([1]), n, 256).item() == pytest.approx(0.25)


def _eval(folder: Path, cache: Path, *extra: str, check: bool = True, popen: bool = False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "simko.eval", *EVAL, f"paths.cache_dir={cache}", f"hydra.run.dir={folder}", *extra]
    if popen:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"simko.eval {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def _summary(folder: Path) -> dict:
    summary = json.loads((folder / "pass_at_k.json").read_text())
    summary.pop("seconds")  # wall time: the only field that differs between runs of the same problems
    summary.pop("shards", None)
    return summary


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, cache) -> Path:
    folder = tmp_path_factory.mktemp("evals") / "full"
    _eval(folder, cache)
    return folder


@pytest.mark.integration
def test_shards_merged_equal_the_unsharded_run(unsharded, cache, tmp_path, capsys):
    summary = _summary(unsharded)
    rows = [json.loads(line)["row"] for line in (unsharded / "problems.jsonl").read_text().splitlines()]
    assert len({r["sample_completion"] for r in rows}) > 1 and len({r["extracted"] for r in rows}) == 8
    for i in range(2):  # 8 problems in 2 shards: 0-3 and 4-7
        _eval(tmp_path / f"s{i}", cache, f"eval.shard={i}/2")
        assert not (tmp_path / f"s{i}" / "pass_at_k.json").exists()  # a shard writes its records only
    lines = [len((tmp_path / f"s{i}" / "problems.jsonl").read_text().splitlines()) for i in range(2)]
    assert lines == [4, 4]
    shards = [str(tmp_path / f"s{i}") for i in (1, 0)]
    merge = [sys.executable, "-m", "simko.eval_merge", *shards, "--out", str(tmp_path / "merged")]  # the real CLI
    proc = subprocess.run(merge, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _summary(tmp_path / "merged") == summary
    assert (tmp_path / "merged" / "per_problem.csv").read_bytes() == (unsharded / "per_problem.csv").read_bytes()
    # the merge never writes into a folder that holds files, and refuses an incomplete set of shards (in process)
    capsys.readouterr()
    assert eval_merge.main([*shards, "--out", str(tmp_path / "merged")]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert eval_merge.main([shards[0], "--out", str(tmp_path / "m2")]) == 2
    assert "4 of 8 problems are not recorded" in capsys.readouterr().err


@pytest.mark.integration
def test_resume_with_another_config_is_refused(unsharded, cache):
    before = {
        p.name: p.read_bytes()
        for p in unsharded.iterdir()
        if p.name in ("eval_state.json", "problems.jsonl", "pass_at_k.json", "per_problem.csv")
    }
    for override, named in (
        ("eval.n=8", "eval.n: 16 -> 8"),
        ("data.val_source.seed=3", "data.val_source.seed: 0 -> 3"),
    ):
        proc = _eval(unsharded, cache, override, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "holds an evaluation with another config" in proc.stderr and named in proc.stderr, proc.stderr[-2000:]
    after = {
        p.name: p.read_bytes()
        for p in unsharded.iterdir()
        if p.name in ("eval_state.json", "problems.jsonl", "pass_at_k.json", "per_problem.csv")
    }
    assert after == before and len(before) == 4  # nothing of the evaluation was touched


@pytest.mark.slow
@pytest.mark.integration
def test_killed_eval_resumed_equals_the_uninterrupted_run(unsharded, cache, tmp_path):
    folder = tmp_path / "killed"
    proc = _eval(folder, cache, popen=True)
    records = folder / "problems.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_file() and len(records.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the eval ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(records.read_bytes().splitlines())
    assert 3 <= written < 8 and not (folder / "pass_at_k.json").exists()
    with open(records, "ab") as f:  # a record a kill cut short: dropped on resume, that problem sampled again
        f.write(b'{"index": 7, "c": 3, "ro')
    resumed = _eval(folder, cache)
    assert f"{written} of 8 problems recorded" in resumed.stdout + resumed.stderr
    assert _summary(folder) == _summary(unsharded)
    assert (folder / "per_problem.csv").read_bytes() == (unsharded / "per_problem.csv").read_bytes()
    indices = [json.loads(line)["index"] for line in records.read_text().splitlines()]
    assert sorted(indices) == list(range(8))
    attempts = json.loads((folder / ".simko-run.json").read_text())["attempts"]
    assert len(attempts) == 2  # the run folder's marker records the resumed attempt
