"""Integration: the training features (dynamic sampling, truncation masks, overlong punishment, LoRA) through the real
entry point, on 2 CPU processes where the feature must keep the ranks in lockstep, and across a resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from test_entry_points import SMALL_TINY, metrics, run

pytestmark = pytest.mark.integration

# More warm-start steps than test_entry_points' model: a reward above 0, so groups are mixed and zero-variance.
WARM = [*SMALL_TINY[:-2], "model.warm_start_steps=150", "model.eval_problems=32"]


@pytest.fixture(scope="module")
def features_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features_cache")


@pytest.fixture
def args(features_cache, tmp_path):
    def make(run_dir: str, *extra: str) -> list[str]:
        return [
            "debug=fast",
            f"paths.cache_dir={features_cache}",
            f"paths.log_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / run_dir}",
            "callbacks.progress=null",
            *WARM,
            *extra,
        ]

    return make


FILTERS = [
    "module.dynamic_sampling.enabled=true",
    "module.dynamic_sampling.max_extra_generations=2",
    "module.mask_truncated=true",
    "module.overlong.buffer=2",
]


def test_dynamic_sampling_on_two_processes_runs_in_lockstep_and_resumes_exactly(args, tmp_path):
    """DDP, 2 CPU processes: every rank runs the same number of extra rounds (a mismatch hangs or crashes the
    collectives), and a run resumed after step 1 trains step 2 as the uninterrupted run did."""
    run("simko.train", *args("full", "trainer=ddp", "rl_steps=2", *FILTERS), timeout=600)
    run("simko.train", *args("first", "trainer=ddp", "rl_steps=1", *FILTERS), timeout=600)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run("simko.train", *args("resumed", "trainer=ddp", "rl_steps=2", f"ckpt_path={ckpt}", *FILTERS), timeout=600)
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert list(full.index) == [1.0, 2.0] and list(resumed.index) == [2.0]
    for key in ("train/zero_var_groups", "train/dynamic_sampling_rounds", "train/kept_groups", "train/truncated_frac",
                "train/unfilled_groups", "train/overlong_penalty"):  # fmt: skip
        assert full[key].notna().all(), key
    assert (full["train/kept_groups"] + full["train/unfilled_groups"] == 4).all()  # 4 prompts per step, 2 ranks
    assert full["train/dynamic_sampling_rounds"].max() >= 1
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/kept_groups", "train/dynamic_sampling_rounds"]
    pd.testing.assert_frame_equal(full.loc[[2.0], cols], resumed[cols], rtol=1e-5)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


LORA = ["model.lora={r:4,alpha:8}", "loss.kl_coef=0.05", "module.overlong.buffer=4"]  # the penalty: non-zero updates


def test_lora_on_two_processes_ddp_equals_fsdp2_resumes_and_evaluates(args, tmp_path, features_cache):
    """LoRA with a KL term (its reference: the adapters disabled) on 2 CPU processes: DDP and FSDP2 train the same
    steps and adapters; checkpoints hold the adapter only; FSDP2 resumed after step 1 trains step 2 as the
    uninterrupted run did; simko.eval loads the adapter onto the base model."""
    for name, trainer, steps in (("ddp", "ddp", 2), ("fsdp2", "fsdp2", 2), ("first", "fsdp2", 1)):
        run("simko.train", *args(name, f"trainer={trainer}", f"rl_steps={steps}", *LORA), timeout=600)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run("simko.train", *args("resumed", "trainer=fsdp2", "rl_steps=2", f"ckpt_path={ckpt}", *LORA), timeout=600)
    ddp, fsdp2, resumed = (metrics(tmp_path / d) for d in ("ddp", "fsdp2", "resumed"))
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/kl_ref", "diag/p_rank1"]
    assert ddp["train/grad_norm"].gt(0).all() and ddp["train/kl_ref"].notna().all()
    pd.testing.assert_frame_equal(ddp[cols], fsdp2[cols], rtol=1e-4)
    pd.testing.assert_frame_equal(fsdp2.loc[[2.0], cols], resumed[cols], rtol=1e-5)
    last = {d: torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True) for d in ("ddp", "fsdp2")}
    for state in last.values():
        assert state["lora"]["r"] == 4 and all(".lora_" in k for k in state["state_dict"])
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in last["fsdp2"]["state_dict"].items():
        torch.testing.assert_close(last["ddp"]["state_dict"][key], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(resumed_state[key], value, rtol=1e-5, atol=1e-6)
    out = tmp_path / "ev"
    run("simko.eval", f"ckpt_path={tmp_path / 'ddp' / 'checkpoints' / 'last.ckpt'}", "eval.n=4", "eval.limit=8",
        f"paths.cache_dir={features_cache}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={out}", *WARM)  # fmt: skip
    assert (out / "pass_at_k.json").exists()


MEMORY_KNOBS = ["module.gradient_checkpointing=true", "module.micro_batch_tokens=40", "module.padding_free=true"]
PENALTY = "module.overlong.buffer=4"  # rewards shaped by length: non-zero updates


def test_memory_knobs_on_two_processes_fsdp2_equal_ddp_without_them(args, tmp_path):
    """Gradient checkpointing (before fully_shard), token-budget micro-batches (as many on both ranks: FSDP2's
    collectives hang otherwise) and packing under FSDP2 on 2 CPU processes train the steps DDP trains without
    them (the padded path, the shared prompt): rewards, losses, gradient norms, diagnostics and final weights."""
    run("simko.train", *args("ddp", "trainer=ddp", "rl_steps=2", PENALTY), timeout=600)
    run("simko.train", *args("fsdp2", "trainer=fsdp2", "rl_steps=2", PENALTY, *MEMORY_KNOBS), timeout=600)
    ddp, fsdp2 = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp2")
    cols = ["train/reward", "train/loss", "train/grad_norm", "diag/p_rank1", "train/response_len"]
    assert ddp["train/grad_norm"].gt(0).all()
    pd.testing.assert_frame_equal(ddp[cols], fsdp2[cols], rtol=1e-4)
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "fsdp2" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_memory_knobs_resume_exactly_on_two_processes(args, tmp_path):
    """DDP with the knobs resumed after step 1 trains step 2 as the uninterrupted run did (FSDP2 likewise)."""
    knobs = [PENALTY, *MEMORY_KNOBS]
    for trainer in ("ddp", "fsdp2"):
        run("simko.train", *args(f"{trainer}_full", f"trainer={trainer}", "rl_steps=2", *knobs), timeout=600)
        run("simko.train", *args(f"{trainer}_first", f"trainer={trainer}", "rl_steps=1", *knobs), timeout=600)
        ckpt = tmp_path / f"{trainer}_first" / "checkpoints" / "last.ckpt"
        resumed = args(f"{trainer}_resumed", f"trainer={trainer}", "rl_steps=2", f"ckpt_path={ckpt}", *knobs)
        run("simko.train", *resumed, timeout=600)
        full, again = metrics(tmp_path / f"{trainer}_full"), metrics(tmp_path / f"{trainer}_resumed")
        assert full["train/grad_norm"].gt(0).all()
        cols = ["train/reward", "train/loss", "train/grad_norm", "diag/p_rank1"]
        pd.testing.assert_frame_equal(full.loc[[2.0], cols], again[cols], rtol=1e-5)
        a = torch.load(tmp_path / f"{trainer}_full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / f"{trainer}_resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
