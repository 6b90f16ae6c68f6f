"""PSR, NSR and W-REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
Reasoning", arXiv 2506.01347): GRPO's PPO-clip token-mean loss with fixed-sign advantages, no baseline and no
std normalisation (the estimators live in :mod:`simko.advantages`):

    PSR:          A_i = +1 on correct responses, 0 on incorrect ones       (reinforce what is right)
    NSR:          A_i = -1 on incorrect responses, 0 on correct ones       (penalise what is wrong)
    W-REINFORCE:  A_i = +lambda on correct, -1 on incorrect                (lambda * PSR + NSR, lambda = 0.1)
    loss = aggregate( max(-A_i r, -A_i clip(r, 1 - eps, 1 + eps_high)) )

Zhu et al. find NSR alone keeps pass@k at large k, PSR alone sharpens pass@1 and collapses diversity, and the
down-weighted positive term of W-REINFORCE balances the two.
"""

from __future__ import annotations

from simko.losses.base import PolicyLoss, register_loss


@register_loss("psr")
class PSRLoss(PolicyLoss):
    """Positive sample reinforcement: only correct responses (A = +1) give a gradient."""

    def __init__(self, correct_threshold: float = 1.0, **base_kwargs):
        super().__init__(advantage="psr", advantage_kwargs={"correct_threshold": correct_threshold}, **base_kwargs)


@register_loss("nsr")
class NSRLoss(PolicyLoss):
    """Negative sample reinforcement: only incorrect responses (A = -1) give a gradient."""

    def __init__(self, correct_threshold: float = 1.0, **base_kwargs):
        super().__init__(advantage="nsr", advantage_kwargs={"correct_threshold": correct_threshold}, **base_kwargs)


@register_loss("w_reinforce")
class WeightedReinforceLoss(PolicyLoss):
    """W-REINFORCE: A = +pos_weight (lambda, 0.1) on correct responses, -1 on incorrect ones."""

    def __init__(self, pos_weight: float = 0.1, correct_threshold: float = 1.0, **base_kwargs):
        if pos_weight < 0:
            raise ValueError(f"w_reinforce pos_weight (lambda) must be >= 0, got {pos_weight}")
        super().__init__(
            advantage="w_reinforce",
            advantage_kwargs={"pos_weight": pos_weight, "correct_threshold": correct_threshold},
            **base_kwargs,
        )
