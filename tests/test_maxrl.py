"""MaxRL advantages (Tajwar, Zeng et al. 2026, arXiv 2602.02710) against references written from the official code,
tajwarfahim/maxrl: ``verl/trainer/ppo/core_algos.py::compute_maxrl_outcome_advantage`` (the estimator) and
``verl/trainer/ppo/maclaurin.py::maclaurin_weights`` (its truncated form, ``compute_maclaurin_outcome_advantage``),
and against the paper's truncated maximum-likelihood objective J_T = -sum_{k<=T} (1 - p)^k / k by exact expectation
over every possible group of outcomes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import make_loss
from simko.advantages import build_advantage
from simko.losses import build_loss
from test_losses import F64, Batch, finite_diff_grad, ref_ppo_loss


def official_maxrl(group: list[float], eps: float = 1e-6) -> list[float]:
    """compute_maxrl_outcome_advantage, one group: (score - mean) / (mean + eps), mean over the group's scores."""
    mean = sum(group) / len(group)
    return [(score - mean) / (mean + eps) for score in group]


def official_maclaurin(num_correct: int, n: int, order: int) -> tuple[float, float]:
    """maclaurin_weights for one problem, by its recurrence: w_succ = 1/n; r_2 = (f-1)/(n-1),
    r_{k+1} = r_k (f-k)/(n-k); w_fail = -(1/n) sum_{k=2}^{min(T, f)} r_k (no term when T < 2 or n < 2)."""
    f = n - num_correct
    if order < 2 or n < 2:
        return 1.0 / n, 0.0
    total, r = 0.0, (f - 1.0) / (n - 1.0)
    for k in range(2, min(order, n) + 1):
        if k <= f:
            total += r
        if k < min(order, n):
            r *= (f - k) / (n - k)
    return 1.0 / n, -total / n


def test_maxrl_advantages_equal_the_official_estimator():
    """Groups of 2..8 with every number of successes, and rewards in [0, 1] that are not binary (the official code
    takes the summed token rewards as they are)."""
    gen = torch.Generator().manual_seed(0)
    for group_size in range(2, 9):
        for num_correct in range(group_size + 1):
            order = torch.randperm(group_size, generator=gen).tolist()  # successes not first
            group = [1.0 if order[i] < num_correct else 0.0 for i in range(group_size)]
            got = build_advantage("maxrl")(torch.tensor([group]))[0].double()
            torch.testing.assert_close(got, torch.tensor(official_maxrl(group), dtype=F64), rtol=1e-6, atol=1e-6)
    partial = [[0.5, 0.25, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    got = build_advantage("maxrl")(torch.tensor(partial)).double()
    expected = torch.tensor([official_maxrl(g) for g in partial], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got[3].tolist() == pytest.approx([-1.0, -1.0, -1.0, 3.0], rel=1e-5)  # one success in 4: 1/p - 1 = 3
    assert got[1].abs().max() == 0 and got[2].abs().max() == 0  # all-equal groups: no gradient


@pytest.mark.parametrize("group_size", [2, 3, 5, 8])
def test_truncated_maxrl_equals_the_official_maclaurin_weights(group_size):
    for order, num_correct in itertools.product(range(1, group_size + 3), range(group_size + 1)):
        correct = [i < num_correct for i in range(group_size)][::-1]
        rewards = torch.tensor([[1.0 if c else 0.0 for c in correct]])
        got = build_advantage("maxrl", truncate_order=order)(rewards)[0].double()
        w_succ, w_fail = official_maclaurin(num_correct, group_size, order)
        expected = torch.tensor([w_succ if c else w_fail for c in correct], dtype=F64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    # T = 1 is REINFORCE without a baseline: 1/G on the successes, 0 on the failures
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(build_advantage("maxrl", truncate_order=1)(rewards), torch.tensor([[0.25, 0, 0, 0.25]]))


def expected_gradient(advantage_fn, theta: torch.Tensor, group_size: int) -> torch.Tensor:
    """E over every group of outcomes of (1/G) sum_i A_i grad log pi(y_i) (the token mean of G one-token responses),
    for a categorical policy softmax(theta) whose outcome 0 is the success."""
    logp = torch.log_softmax(theta, 0)
    total = torch.zeros_like(theta)
    for outcome in itertools.product(range(theta.numel()), repeat=group_size):
        prob = math.prod(float(logp[y].detach().exp()) for y in outcome)
        rewards = torch.tensor([[1.0 if y == 0 else 0.0 for y in outcome]])
        adv = advantage_fn(rewards)[0].double()
        surrogate = sum(adv[i] * logp[y] for i, y in enumerate(outcome)) / group_size
        total += prob * torch.autograd.grad(surrogate, theta, retain_graph=True)[0]
    return total


def truncated_ml_gradient(theta: torch.Tensor, order: int) -> torch.Tensor:
    """grad of the paper's J_T = -sum_{k=1}^{T} (1 - p)^k / k, p = softmax(theta)[0]."""
    p = torch.softmax(theta, 0)[0]
    return torch.autograd.grad(-sum((1 - p) ** k / k for k in range(1, order + 1)), theta)[0]


def test_maxrl_estimators_are_unbiased_for_the_truncated_ml_objective():
    """Exact expectations over all 3^G groups (G = 4): the truncated estimator of order T has expectation
    grad J_T / G (its weights carry 1/G, the token mean another), for T <= G; the mean-normalised estimator, with
    its group-mean baseline, has expectation grad J_{G-1} exactly (the success-only average is unbiased for J_G,
    the baseline removes the order-G term). eps = 0 for the identity (with eps = 1e-6 it holds to ~1e-6)."""
    theta = torch.tensor([-0.7, 0.4, 0.9], dtype=F64, requires_grad=True)
    group_size = 4
    for order in range(1, group_size + 1):
        got = expected_gradient(build_advantage("maxrl", truncate_order=order), theta, group_size)
        torch.testing.assert_close(got, truncated_ml_gradient(theta, order) / group_size, rtol=1e-6, atol=1e-9)
    mean_normalised = build_advantage("maxrl", eps=0.0)

    def maxrl_no_eps(rewards):  # 0 / 0 on all-failed groups is 0 in the official code (there: 0 / eps)
        return torch.nan_to_num(mean_normalised(rewards), nan=0.0)

    got = expected_gradient(maxrl_no_eps, theta, group_size)
    torch.testing.assert_close(got, truncated_ml_gradient(theta, group_size - 1), rtol=1e-6, atol=1e-9)
    assert (got - truncated_ml_gradient(theta, group_size)).abs().max() > 1e-2  # not J_G
    assert (got - truncated_ml_gradient(theta, 1)).abs().max() > 1e-2  # not REINFORCE's


@pytest.mark.parametrize("overrides", [{}, {"advantage_kwargs": {"truncate_order": 2}}])
def test_maxrl_preset_gradient_matches_finite_differences(overrides):
    """The maxrl preset is GRPO's PPO-clip loss with these advantages: value and gradient against the float64
    reference loss with the official advantages."""
    batch = Batch()
    loss_fn = make_loss("maxrl", **overrides)
    order = overrides.get("advantage_kwargs", {}).get("truncate_order")
    groups = batch.grouped(batch.rewards).tolist()
    if order is None:
        adv = torch.tensor([official_maxrl(g) for g in groups]).float().to(F64).reshape(-1)
    else:
        weights = [official_maclaurin(int(sum(g)), len(g), order) for g in groups]
        adv = torch.tensor([[w[0] if r == 1 else w[1] for r in g] for g, w in zip(groups, weights)]).float()
        adv = adv.to(F64).reshape(-1)
    torch.testing.assert_close(batch.advantages(loss_fn), adv, rtol=1e-6, atol=1e-7)
    grad, out = batch.grad(loss_fn, advantages=adv)
    reference = lambda z: ref_ppo_loss(batch, z, adv)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert grad.abs().max() > 0


def test_maxrl_is_an_estimator_of_any_loss_and_its_knobs_are_checked():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    for name in ("grpo", "simko", "sapo", "gspo"):
        loss_fn = build_loss(name, advantage="maxrl")
        torch.testing.assert_close(loss_fn.compute_advantages(rewards), build_advantage("maxrl")(rewards))
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="truncate_order must be an integer"):
            build_loss("grpo", advantage="maxrl", advantage_kwargs={"truncate_order": bad})
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\].*min -0.5"):
        build_advantage("maxrl")(torch.tensor([[1.0, -0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\].*max 2"):
        build_advantage("maxrl")(torch.tensor([[2.0, 0.0]]))
    # the truncated estimator binarises at correct_threshold, so a negative shaped reward is an incorrect answer
    got = build_advantage("maxrl", truncate_order=3)(torch.tensor([[1.0, -0.5, 0.0]]))
    assert got[0, 1] == got[0, 2] < 0 < got[0, 0]
