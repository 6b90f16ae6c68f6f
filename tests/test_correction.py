"""Rollout-training mismatch metrics and truncated importance sampling, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import loss_configs
from simko.correction import MODES, MismatchMeter, RolloutCorrection, mismatch_metrics

# Two responses: row 0 has 3 valid tokens, row 1 has 2 (its last column is padding with arbitrary values).
TRAIN = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, -9.0]], dtype=torch.float64)
SAMPLER = torch.tensor([[-1.2, -0.5, -1.0], [-0.1, -3.5, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])
# log r = train - sampler on valid tokens
LOG_R = [[0.2, 0.0, -1.0], [-0.1, 0.5]]


def test_mismatch_metrics_by_hand():
    got = mismatch_metrics(TRAIN, SAMPLER, MASK)
    flat = [x for row in LOG_R for x in row]
    assert got["logp_abs_diff"] == pytest.approx(sum(abs(x) for x in flat) / 5)
    outside = [not (0.9 <= math.exp(x) <= 1.1) for x in flat]  # 0.2, -1.0, -0.1 (0.905: inside), 0.5
    assert outside == [True, False, True, False, True]
    assert got["ratio_outside_frac"] == pytest.approx(3 / 5)
    k3 = [sum(math.exp(x) - 1 - x for x in row) for row in LOG_R]
    assert got["seq_kl"] == pytest.approx(sum(k3) / 2)
    k1 = [sum(-x for x in row) for row in LOG_R]
    assert got["seq_kl_k1"] == pytest.approx(sum(k1) / 2)


def test_mismatch_meter_over_micro_batches_equals_one_call():
    meter = MismatchMeter()
    meter.add(TRAIN[:1], SAMPLER[:1], MASK[:1])
    meter.add(TRAIN[1:, :2], SAMPLER[1:, :2], MASK[1:, :2])  # micro-batches are trimmed to their own length
    for key, value in mismatch_metrics(TRAIN, SAMPLER, MASK).items():
        assert meter.result()[key] == pytest.approx(value)


def test_mismatch_metrics_zero_when_equal_and_ignore_empty_rows():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    got = mismatch_metrics(TRAIN, TRAIN.clone(), mask)
    assert got == {"logp_abs_diff": 0.0, "ratio_outside_frac": 0.0, "seq_kl": 0.0, "seq_kl_k1": 0.0}


def _expected(mode: str, cap: float, cap_min: float | None) -> list[list[float]]:
    """The weights written out from the definitions in simko.correction's docstring, token by token."""
    out = []
    for row in LOG_R:
        if mode.startswith("sequence"):
            ratios = [math.exp(sum(row))] * len(row)
        else:
            ratios = [math.exp(x) for x in row]
        if mode.endswith("truncate"):
            ws = [min(r, cap) if cap_min is None else max(min(r, cap), cap_min) for r in ratios]
        else:
            low = 1 / cap if cap_min is None else cap_min
            ws = [r if low <= r <= cap else 0.0 for r in ratios]
        out.append(ws + [0.0] * (3 - len(ws)))  # padding weighs 0
    return out


@pytest.mark.parametrize("cap, cap_min", [(1.1, None), (1.5, 0.5), (3.0, None)])
@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
def test_importance_weights_by_hand(mode, cap, cap_min):
    correction = RolloutCorrection(mode=mode, cap=cap, cap_min=cap_min)
    got = correction.weights(TRAIN, SAMPLER, MASK)
    assert got.dtype == TRAIN.dtype and not got.requires_grad
    torch.testing.assert_close(got, torch.tensor(_expected(mode, cap, cap_min), dtype=torch.float64))


def test_weights_are_detached_and_none_when_off():
    train = TRAIN.clone().requires_grad_(True)
    assert RolloutCorrection().weights(train, SAMPLER, MASK) is None
    w = RolloutCorrection(mode="token_truncate").weights(train, SAMPLER, MASK)
    assert not w.requires_grad


def test_sequence_weights_do_not_overflow():
    train = torch.zeros(1, 2000)
    sampler = torch.full((1, 2000), -1.0)  # log r = +1 per token: prod r = e^2000
    mask = torch.ones(1, 2000, dtype=torch.bool)
    w = RolloutCorrection(mode="sequence_truncate", cap=5.0).weights(train, sampler, mask)
    assert torch.isfinite(w).all() and torch.all(w == 5.0)
    w = RolloutCorrection(mode="sequence_mask", cap=5.0).weights(train, sampler, mask)
    assert torch.all(w == 0.0)


def test_weight_metrics():
    correction = RolloutCorrection(mode="token_truncate", cap=1.1)
    w = correction.weights(TRAIN, SAMPLER, MASK)
    got = correction.weight_metrics(w, TRAIN, SAMPLER, MASK)
    flat = [w for row, n in zip(_expected("token_truncate", 1.1, None), (3, 2)) for w in row[:n]]
    assert got["is_weight_mean"] == pytest.approx(sum(flat) / 5)
    assert got["is_capped_frac"] == pytest.approx(2 / 5)  # e^0.2 and e^0.5 are above 1.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "tis"}, "unknown rollout.correction.mode"),
        ({"mode": "token_truncate", "cap": 1.0}, "cap must be > 1"),
        ({"mode": "token_mask", "cap": 2.0, "cap_min": 2.0}, "cap_min must be in"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCorrection(**kwargs)


# ------------------------------------------------------------------------------------ in the loss core, every loss
def _weights(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(batch.B, batch.T, generator=gen, dtype=torch.float64) * 2
    return torch.where(batch.mask, w, 0.0)


def test_is_weights_multiply_the_grpo_ppo_term_by_hand():
    from helpers import make_loss
    from test_losses import Batch, ref_aggregate, ref_logits_stats, ref_ppo_objective

    batch = Batch()
    loss_fn = make_loss("grpo")
    w = _weights(batch, 1)
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn, is_weights=w)
    logits = batch.logits.clone().requires_grad_(True)
    logprobs = ref_logits_stats(logits, batch.tokens)[0]
    ref = ref_aggregate(ref_ppo_objective(logprobs, batch.old_logprobs, adv, 0.2, 0.2) * w, batch.mask, "token_mean")
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("name", loss_configs())
def test_is_weights_compose_with_every_loss(name):
    """For every loss config: weight 1 changes nothing; the weights enter linearly (value and gradient), through
    exactly the PPO part of policy_loss; clip decisions, the KL term and the extra loss do not see them."""
    from helpers import make_loss
    from test_losses import Batch

    kl = {"kl_coef": 0.1} if name in ("grpo", "simko") else {}  # a KL term must stay unweighted too
    loss_fn = make_loss(name, **kl)
    batch = Batch()
    grad, adv = batch.grad, batch.advantages(make_loss("grpo"))  # nonzero advantages for every loss

    def seeded_grad(loss_fn, **kw):  # Clip-Cov draws its random token subset from the global RNG
        torch.manual_seed(0)
        return grad(loss_fn, advantages=adv, **kw)

    batch.grad = seeded_grad
    g_none, none = batch.grad(loss_fn)
    g_one, one = batch.grad(loss_fn, is_weights=batch.mask.to(torch.float64))
    torch.testing.assert_close(one.loss, none.loss)
    torch.testing.assert_close(g_one, g_none)
    w1, w2 = _weights(batch, 1), _weights(batch, 2)
    zero = torch.zeros_like(w1)
    g0, l0 = batch.grad(loss_fn, is_weights=zero)
    g1, l1 = batch.grad(loss_fn, is_weights=w1)
    g2, l2 = batch.grad(loss_fn, is_weights=w2)
    g12, l12 = batch.grad(loss_fn, is_weights=w1 + 0.5 * w2)
    torch.testing.assert_close(l12.loss - l0.loss, (l1.loss - l0.loss) + 0.5 * (l2.loss - l0.loss))
    torch.testing.assert_close(g12 - g0, (g1 - g0) + 0.5 * (g2 - g0))
    assert not torch.allclose(g1, g_none)  # the weights do act
    ppo_part = one.metrics["policy_loss"] - l0.metrics["policy_loss"]
    assert one.loss.item() - l0.loss.item() == pytest.approx(ppo_part, rel=1e-9, abs=1e-12)
    assert l1.metrics["clip_frac"] == one.metrics["clip_frac"]
    if kl:
        assert l0.metrics["kl_ref"] == one.metrics["kl_ref"]


def test_is_weights_shape_is_checked():
    from helpers import make_loss
    from test_losses import Batch

    batch = Batch()
    with pytest.raises(ValueError, match="is_weights must have shape"):
        batch.loss(make_loss("grpo"), is_weights=torch.ones(batch.B, batch.T + 1, dtype=torch.float64))


# ------------------------------------------------------------------------------------- in the update (simko.update)
def _rollouts_with_sampler(model, tok, offset_seed=0):
    from simko.engines.hf import generate_rollouts
    from simko.forward import rollout_token_stats

    r = generate_rollouts(model, tok, ["12+3=", "5+5=", "71+40="], group_size=4, max_new_tokens=6, seed=2)
    with torch.no_grad():
        lp = rollout_token_stats(model, r.rows(torch.arange(r.num_rows)), 0, 1.0).logprobs
    gen = torch.Generator().manual_seed(offset_seed)
    noise = 0.3 * torch.randn(lp.shape, generator=gen)
    r.sampler_logprobs = torch.where(r.response_mask[:, : lp.shape[1]], lp + noise, 0.0)
    return r, lp


@pytest.mark.parametrize("ppo_epochs", [1, 2])
@pytest.mark.parametrize("mode", ["none", "token_truncate", "sequence_mask"])
def test_update_logs_the_mismatch_and_applies_the_correction(mode, ppo_epochs):
    """update_policy: rollout/* equal mismatch_metrics of (the sampling policy's log-probs, the sampler's) over the
    whole batch, and the gradient of the (first) update equals the loss's with the hand-made weights."""
    import copy

    from helpers import digit_tokenizer, random_qwen2
    from simko.forward import rollout_token_stats
    from simko.losses import build_loss
    from simko.update import UpdateHooks, UpdateSchedule, update_policy

    tok, model = digit_tokenizer(), random_qwen2(seed=5)
    r, lp = _rollouts_with_sampler(model, tok)
    scores = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    loss_fn = build_loss("grpo")
    adv = loss_fn.compute_advantages(scores.view(-1, 4)).reshape(-1)
    correction = RolloutCorrection(mode=mode, cap=1.2)
    reference = copy.deepcopy(model)
    grads = []

    def step() -> float:
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return 0.0  # no optimizer step: every update sees the sampling policy

    hooks = UpdateHooks(
        lambda rows, top_k: rollout_token_stats(model, rows, top_k, 1.0),
        optimizer_step=step,
        zero_grad=lambda: model.zero_grad(set_to_none=True),
    )
    schedule = UpdateSchedule(ppo_epochs=ppo_epochs, micro_batch_size=5, shuffle_seed=7, correction=correction)
    metrics, _ = update_policy(loss_fn, r, scores, adv, hooks, schedule)
    R = lp.shape[1]
    mask, sampler = r.response_mask[:, :R], r.sampler_logprobs[:, :R]
    for key, value in mismatch_metrics(lp, sampler, mask).items():
        assert metrics[f"rollout/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert metrics["rollout/ratio_outside_frac"] > 0.3  # noise of 0.3 nats: most ratios are outside +-10 %
    s = rollout_token_stats(reference, r.rows(torch.arange(12)), 0, 1.0)
    weights = correction.weights(lp, sampler, mask)
    out = loss_fn(s, old_logprobs=lp, advantages=adv, scores=scores, is_weights=weights)
    out.loss.backward()
    want = torch.cat([p.grad.flatten() for p in reference.parameters()])
    for got in grads:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if correction.enabled:
        assert 0 < metrics["rollout/is_capped_frac"] < 1
    else:
        assert "rollout/is_weight_mean" not in metrics


def test_hf_rollouts_log_no_mismatch():
    from helpers import digit_tokenizer, random_qwen2
    from simko.engines.hf import generate_rollouts
    from simko.forward import rollout_token_stats
    from simko.losses import build_loss
    from simko.update import UpdateHooks, UpdateSchedule, update_policy

    tok, model = digit_tokenizer(), random_qwen2(seed=5)
    r = generate_rollouts(model, tok, ["12+3="], group_size=4, max_new_tokens=4, seed=2)
    loss_fn = build_loss("grpo")
    scores = torch.tensor([1.0, 0, 0, 1])
    hooks = UpdateHooks(
        lambda rows, top_k: rollout_token_stats(model, rows, top_k, 1.0),
        optimizer_step=lambda: 0.0,
        zero_grad=lambda: model.zero_grad(set_to_none=True),
    )
    schedule = UpdateSchedule(correction=RolloutCorrection(mode="token_truncate"))
    metrics, _ = update_policy(
        loss_fn, r, scores, loss_fn.compute_advantages(scores.view(1, 4)).reshape(-1), hooks, schedule
    )
    assert not any(k.startswith("rollout/") for k in metrics)
