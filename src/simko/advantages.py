"""Advantage estimators: rewards of a group of G responses per prompt -> one advantage per response.

Each estimator is a small pure function ``f(rewards: [P, G], **knobs) -> [P, G]`` in a registry, in the manner of
verl's ``core_algos``. A loss names its estimator and its knobs (``advantage: nsr``, ``advantage_kwargs: {...}``);
the knobs are checked when the loss is built. The functional loss API takes advantages directly, so scripts can
compute them however they like.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

ADVANTAGES: dict[str, Callable[..., Tensor]] = {}
_CHECKS: dict[str, Callable[..., None]] = {}


def register_advantage(name: str, check: Callable[..., None] | None = None):
    """Register ``fn(rewards, **knobs)``; ``check(**knobs)`` validates the knobs when a loss is built."""

    def deco(fn):
        ADVANTAGES[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn

    return deco


def _check(rewards: Tensor, min_group_size: int = 2) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, group_size], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < min_group_size:
        raise ValueError(f"group advantages need group_size >= {min_group_size}, got {rewards.shape[1]}")
    return rewards.float()


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_G R) / (std_G R + eps), std unbiased.

    ``norm_std=False`` is Dr.GRPO's variant (Liu et al. 2025): A_i = R_i - mean_G R.
    Groups whose rewards are all equal get A = 0.
    """
    rewards = _check(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not norm_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)


# ---------------------------------------------------------------------------------------------------------------
# PSR / NSR / W-REINFORCE: Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
# Reasoning", arXiv 2506.01347. Binary outcome rewards, no baseline and no std normalisation:
#   PSR (positive sample reinforcement):  A_i = +1 if correct_i else 0
#   NSR (negative sample reinforcement):  A_i = -1 if not correct_i else 0
#   W-REINFORCE = lambda * PSR + NSR:     A_i = +lambda if correct_i else -1     (lambda = 0.1 in the paper)
# A response is correct when its reward >= correct_threshold (reward == 1 for {0, 1} rewards).
# They need no group (any group size, even 1).


@register_advantage("psr")
def psr_advantages(rewards: Tensor, correct_threshold: float = 1.0) -> Tensor:
    """PSR (Zhu et al. 2025): A_i = 1[correct_i]; incorrect responses get 0 (no gradient)."""
    rewards = _check(rewards, min_group_size=1)
    return (rewards >= correct_threshold).float()


@register_advantage("nsr")
def nsr_advantages(rewards: Tensor, correct_threshold: float = 1.0) -> Tensor:
    """NSR (Zhu et al. 2025): A_i = -1[not correct_i]; correct responses get 0 (no gradient)."""
    rewards = _check(rewards, min_group_size=1)
    return torch.where(rewards < correct_threshold, -1.0, 0.0).to(rewards.dtype)  # (not -0.0 on correct)


def _check_w_reinforce(pos_weight: float = 0.1, **_) -> None:
    if pos_weight < 0:
        raise ValueError(f"w_reinforce pos_weight (lambda) must be >= 0, got {pos_weight}")


@register_advantage("w_reinforce", check=_check_w_reinforce)
def w_reinforce_advantages(rewards: Tensor, pos_weight: float = 0.1, correct_threshold: float = 1.0) -> Tensor:
    """W-REINFORCE (Zhu et al. 2025): A_i = +pos_weight if correct_i else -1 (pos_weight = lambda = 0.1)."""
    rewards = _check(rewards, min_group_size=1)
    correct = rewards >= correct_threshold
    return torch.where(correct, torch.full_like(rewards, float(pos_weight)), torch.full_like(rewards, -1.0))


def _check_passk(k: int = 4, **_) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"passk k must be an integer >= 1, got {k}")


@register_advantage("passk", check=_check_passk)
def passk_advantages(rewards: Tensor, k: int = 4, correct_threshold: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Pass@k Training with analytic advantages (Chen et al. 2025, arXiv 2508.10751, Sec. "Analytical Derivation").

    The reward of a k-subset of the group is pass@k = max over its members of correct_i. Taking every k-subset of
    the G responses as one "group member" of GRPO and giving each response the mean advantage of the subsets that
    contain it has a closed form in the number of incorrect responses N_neg of the group:

        mean   R_bar   = 1 - C(N_neg, k) / C(G, k)                       (mean pass@k over all k-subsets)
        std    sigma   = sqrt(R_bar * (1 - R_bar))                       (std of a {0, 1} reward over the subsets)
        correct:   A_pos = (1 - R_bar) / (sigma + eps)                    (every subset with it passes)
        incorrect: A_neg = (1 - R_bar - C(N_neg - 1, k - 1) / C(G - 1, k - 1)) / (sigma + eps)

    C(N_neg - 1, k - 1) / C(G - 1, k - 1) is the probability that a random k-subset containing a given incorrect
    response is all incorrect (fails). Groups with R_bar in {0, 1} (all wrong, or fewer than k wrong) get A = 0.
    k = 1 is GRPO with the population std. PKPO (Walder & Karkhanis 2025, arXiv 2505.15201) derives unbiased
    pass@k gradient estimators for the same objective; this is Chen et al.'s GRPO-normalised form (not verl's
    ``grpo_passk``, which is Tang et al. 2025's best-of-group variant).

    Raises ValueError unless 1 <= k <= G.
    """
    rewards = _check(rewards)
    group_size = rewards.shape[1]
    if not 1 <= int(k) <= group_size:
        raise ValueError(f"passk advantages need 1 <= k <= group_size; got k={k}, group_size={group_size}")
    k = int(k)
    correct = rewards >= correct_threshold
    num_neg = (~correct).sum(dim=1)  # [P] integers in 0..G
    # Both probabilities depend only on N_neg: tabulate them for N_neg = 0..G (exact integer binomials).
    all_fail = [math.comb(m, k) / math.comb(group_size, k) for m in range(group_size + 1)]
    neg_subset_fails = [
        math.comb(m - 1, k - 1) / math.comb(group_size - 1, k - 1) if m >= 1 else 0.0 for m in range(group_size + 1)
    ]
    all_fail = torch.tensor(all_fail, dtype=torch.float64, device=rewards.device)[num_neg]
    neg_subset_fails = torch.tensor(neg_subset_fails, dtype=torch.float64, device=rewards.device)[num_neg]
    mean = 1.0 - all_fail
    std = torch.sqrt(mean * (1.0 - mean))
    adv_pos = (1.0 - mean) / (std + eps)
    adv_neg = (1.0 - mean - neg_subset_fails) / (std + eps)
    return torch.where(correct, adv_pos[:, None], adv_neg[:, None]).to(rewards.dtype)


def build_advantage(name: str, **kwargs) -> Callable[[Tensor], Tensor]:
    """``rewards [P, G] -> advantages [P, G]`` of the estimator ``name`` with ``kwargs``, checked now."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ADVANTAGES))}")
    fn = ADVANTAGES[name]
    knobs = [p for p in inspect.signature(fn).parameters if p != "rewards"]
    unknown = sorted(set(kwargs) - set(knobs))
    if unknown:
        raise TypeError(f"advantage {name!r} has no knob {unknown} (advantage_kwargs); its knobs: {', '.join(knobs)}")
    if name in _CHECKS:
        _CHECKS[name](**kwargs)
    return lambda rewards: fn(rewards, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# MaxRL: Tajwar, Zeng et al. 2026, "Maximum Likelihood Reinforcement Learning", arXiv 2602.02710; official code
# tajwarfahim/maxrl (on verl), verl/trainer/ppo/core_algos.py. With p the success probability of a prompt, RL
# maximises p while maximum likelihood maximises log p = -sum_k (1 - p)^k / k = -sum_k fail@k / k; truncating the
# sum at order T gives J_T, with grad J_T = (1 - (1 - p)^T) grad log p: T = 1 is REINFORCE, T -> inf is ML.


def _check_maxrl(truncate_order: int | None = None, **_) -> None:
    if truncate_order is not None and (int(truncate_order) != truncate_order or truncate_order < 1):
        raise ValueError(f"maxrl truncate_order must be an integer >= 1 (or null), got {truncate_order}")


@register_advantage("maxrl", check=_check_maxrl)
def maxrl_advantages(
    rewards: Tensor, truncate_order: int | None = None, correct_threshold: float = 1.0, eps: float = 1e-6
) -> Tensor:
    """MaxRL advantages for binary rewards (the official ``compute_maxrl_outcome_advantage``):

        A_i = (R_i - mean_G R) / (mean_G R + eps)

    the group-centred reward normalised by the group mean (the success rate) instead of the std, so a prompt solved
    once in G gets (G - 1) on its success and -1 on each failure. Groups with all rewards equal get A = 0. Rewards
    must lie in [0, 1] (the estimator's derivation is for binary outcomes; a negative reward, e.g. from DAPO's
    overlong penalty, would make the mean 0 or negative and flip the sign): others raise ValueError.

    ``truncate_order`` = T (an integer >= 1) selects the official unbiased estimator of the order-T truncated
    objective instead (``compute_maclaurin_outcome_advantage`` / ``verl/trainer/ppo/maclaurin.py::
    maclaurin_weights``), on binary outcomes (correct = reward >= ``correct_threshold``); with f failures among the G
    responses:

        correct:   A = 1 / G
        incorrect: A = -(1 / G) * sum_{k=2}^{min(T, f)} C(f - 1, k - 1) / C(G - 1, k - 1)

    (the U-statistic of -grad fail@k / k over the k-subsets of the group; T = 1 is REINFORCE without a baseline,
    A = 1[correct] / G). As in the official code these weights carry the estimator's 1/G, and no baseline.
    """
    rewards = _check(rewards)
    if truncate_order is None:
        if rewards.numel() and (rewards.min() < 0 or rewards.max() > 1):
            raise ValueError(
                f"maxrl advantages need rewards in [0, 1] (binary outcomes), got min {rewards.min().item():g} and max "
                f"{rewards.max().item():g}; a reward shaping that makes rewards negative (module.overlong) does not "
                "fit MaxRL's group-mean normalisation"
            )
        mean = rewards.mean(dim=1, keepdim=True)
        return (rewards - mean) / (mean + eps)
    group_size, order = rewards.shape[1], int(truncate_order)
    correct = rewards >= correct_threshold
    num_fail = (~correct).sum(dim=1)  # [P] integers in 0..G
    # w_fail depends only on the number of failures f: tabulate it for f = 0..G with exact integer binomials.
    fail_weight = [
        -sum(math.comb(f - 1, k - 1) / math.comb(group_size - 1, k - 1) for k in range(2, min(order, f) + 1))
        / group_size
        for f in range(group_size + 1)
    ]
    fail_weight = torch.tensor(fail_weight, dtype=torch.float64, device=rewards.device)[num_fail]
    adv = torch.where(correct, torch.full_like(fail_weight[:, None], 1.0 / group_size), fail_weight[:, None])
    return adv.to(rewards.dtype)
