"""SAPO (Gao et al. 2025, arXiv 2511.20347) against a float64 reference written from the official code: verl's
``verl/trainer/ppo/core_algos.py::compute_policy_loss_sapo`` (the same gate as TRL's ``loss_type="sapo"`` in
``trl/trainer/grpo_trainer.py::_compute_loss``): per token -sigmoid(tau (r - 1)) * 4 / tau * A with log r clamped to
[-20, 20], tau = tau_pos where A > 0 and tau_neg elsewhere, aggregated seq-mean-token-mean."""

from __future__ import annotations

import pytest
import torch

from helpers import make_loss
from simko.losses import build_loss
from test_losses import Batch, finite_diff_grad, ref_aggregate, ref_logits_stats
from test_losses import test_micro_batched_gradient_equals_the_one_batch_gradient as micro_batched_check


def ref_sapo_loss(batch, logits, adv, tau_pos, tau_neg, mode="seq_mean_token_mean"):
    logprobs = ref_logits_stats(logits, batch.tokens)[0]
    ratio = torch.exp(torch.clamp(logprobs - batch.old_logprobs, -20.0, 20.0))
    a = adv[:, None].expand_as(ratio)
    tau = torch.where(a > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    return ref_aggregate(-gate * a, batch.mask, mode)


CASES = [
    ({}, (1.0, 1.05, "seq_mean_token_mean")),  # the preset: the paper's temperatures
    ({"tau_pos": 0.5, "tau_neg": 3.0}, (0.5, 3.0, "seq_mean_token_mean")),
    ({"tau_pos": 2.0, "tau_neg": 2.0, "aggregation": "token_mean"}, (2.0, 2.0, "token_mean")),
]


@pytest.mark.parametrize("overrides,ref", CASES, ids=str)
def test_sapo_gradient_matches_finite_differences_of_the_official_objective(overrides, ref):
    batch = Batch()  # 25% of the tokens far off-policy (|log r| = 1.5): the gate acts
    loss_fn = make_loss("sapo", **overrides)
    tau_pos, tau_neg, mode = ref
    assert (loss_fn.tau_pos, loss_fn.tau_neg, loss_fn.aggregation) == (tau_pos, tau_neg, mode)
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    reference = lambda z: ref_sapo_loss(batch, z, adv, tau_pos, tau_neg, mode)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert grad[~batch.mask].abs().max() == 0


def test_sapo_on_policy_is_grpo_and_off_policy_tokens_are_attenuated_not_cut():
    batch = Batch()
    on_policy = Batch()
    on_policy.old_logprobs = ref_logits_stats(on_policy.logits, on_policy.tokens)[0]
    # r = 1: the gate's slope is 1, so SAPO's gradient is GRPO's with the same aggregation
    sapo_grad, _ = on_policy.grad(make_loss("sapo"))
    grpo_grad, _ = on_policy.grad(build_loss("grpo", aggregation="seq_mean_token_mean"))
    torch.testing.assert_close(sapo_grad, grpo_grad, rtol=1e-12, atol=1e-15)
    # off policy: per token, SAPO's gradient is PPO's unclipped one times 4 s (1 - s), s = sigmoid(tau (r - 1))
    loss_fn = make_loss("sapo", aggregation="token_mean")
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    unclipped, _ = batch.grad(build_loss("grpo", clip_eps=1e6))  # no clip: -A r grad log pi
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]
    r = torch.exp(lp0 - batch.old_logprobs)
    tau = torch.full_like(r, 1.05).masked_fill(adv[:, None].expand_as(r) > 0, 1.0)
    s = torch.sigmoid(tau * (r - 1))
    weight = 4 * s * (1 - s)
    torch.testing.assert_close(grad, weight[..., None] * unclipped, rtol=1e-9, atol=1e-14)
    far = (lp0 - batch.old_logprobs).abs() > 1.0  # |log r| = 1.5 (the others: <= 0.08)
    moving = batch.mask & (adv[:, None] != 0)
    assert (far & moving).any() and grad.abs().amax(-1)[moving].min() > 0  # no token is dropped
    assert weight[far & moving].max() < 0.9 and weight[far & moving].min() < 0.15 and weight[~far & moving].min() > 0.99
    assert out.metrics["sapo/gate_weight_mean"] == pytest.approx(float(weight[batch.mask].mean()), rel=1e-9)


@pytest.mark.parametrize("overrides", [{"tau_pos": 0.5, "tau_neg": 3.0}, {"aggregation": "token_mean"}], ids=str)
def test_sapo_micro_batched_gradient_equals_the_one_batch_gradient(overrides):
    """test_losses' check (simko.update.accumulate_gradients in micro-batches of 3 rows == the whole batch)."""
    micro_batched_check("sapo", overrides)


def test_sapo_knobs_are_checked():
    for bad in ({"tau_pos": 0.0}, {"tau_neg": -1.0}):
        with pytest.raises(ValueError, match="must be > 0"):
            build_loss("sapo", **bad)
    for bad in ({"dual_clip_c": 3.0}, {"clip_eps_high": 0.28}):
        with pytest.raises(ValueError, match="no PPO clip"):
            build_loss("sapo", **bad)
    preset = make_loss("sapo")
    assert (preset.tau_pos, preset.tau_neg, preset.aggregation) == (1.0, 1.05, "seq_mean_token_mean")
