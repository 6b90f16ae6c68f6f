"""Rollout-training mismatch metrics and truncated importance sampling, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

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
