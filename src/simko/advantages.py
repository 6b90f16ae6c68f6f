"""Advantage estimators: rewards of a group of G responses per prompt -> one advantage per response.

Each estimator is a small pure function ``f(rewards: [P, G]) -> [P, G]`` in a registry, in the manner of verl's
``core_algos``. A loss names its estimator (``advantage: grpo``); the functional loss API takes advantages
directly, so scripts can compute them however they like.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ADVANTAGES: dict[str, Callable[..., Tensor]] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


def _check(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, group_size], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group advantages need group_size >= 2, got {rewards.shape[1]}")
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


def build_advantage(name: str, **kwargs) -> Callable[[Tensor], Tensor]:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ADVANTAGES))}")
    fn = ADVANTAGES[name]
    return lambda rewards: fn(rewards, **kwargs)
