"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, Chen et al. 2025, arXiv 2506.13585, Sec. 3.1).

PPO-clip drops the gradient of a token whose ratio left the clip range; rare "forking" tokens (However, Wait, ...)
get clipped out after the first update. CISPO clips the importance-sampling weight instead and keeps every token's
gradient, REINFORCE-style:

    r_t  = pi(y_t|s_t) / pi_old(y_t|s_t),     r^_t = clip(r_t, 1 - eps_low, 1 + eps_high)
    J    = 1 / sum_i |y_i| * sum_i sum_t sg(r^_t) A_i log pi(y_t|s_t)                   (token_mean)
    grad = -sg(r^_t) A_i grad log pi(y_t|s_t) per token, for every token (none is dropped)

MiniMax-M1 sets no lower bound (eps_low large) and tunes only eps_high; here ``clip_eps: 1.0`` (the lower bound
1 - 1 = 0 never binds, as r >= 0) and ``clip_eps_high: 4.0`` (r^ <= 5: TRL's recommended epsilon_high = 5 for
``loss_type="cispo"``, from ScaleRL, arXiv 2510.13786; the paper gives no number). verl's ``cispo`` and NeMo-RL
take the same two-sided form with other defaults. One deliberate difference: the loss value is
-sg(r^_t) A_i per token (the gradient is the same), not the official -sg(r^_t) A_i log pi(y_t), whose value depends
on log pi and is not comparable with the other losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.losses.base import PolicyLoss, register_loss
from simko.losses.stats import TokenStats


@register_loss("cispo")
class CISPOLoss(PolicyLoss):
    """CISPO: the clipped, detached IS weight times the log-prob's gradient (see the module docstring).

    Args:
        clip_eps, clip_eps_high: the IS weight is clipped to [1 - clip_eps, 1 + clip_eps_high] (1.0 and 4.0:
            [0, 5], no lower bound).
        **base_kwargs: as :class:`PolicyLoss`; ``dual_clip_c`` is refused (CISPO has no PPO max to cap).
    """

    def __init__(self, clip_eps: float = 1.0, clip_eps_high: float | None = 4.0, **base_kwargs):
        super().__init__(clip_eps=clip_eps, clip_eps_high=clip_eps_high, **base_kwargs)
        if self.dual_clip_c is not None:
            raise ValueError("cispo has no PPO clip for a dual clip to cap: leave dual_clip_c null")

    def objective(self, ratio: Tensor, adv: Tensor, stats: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
        weight = torch.clamp(ratio.detach(), 1.0 - self.clip_low, 1.0 + self.clip_high)
        # value -A * weight, gradient -A * weight * grad log pi (log pi - sg(log pi) is 0 with gradient grad log pi)
        per_token = -adv * weight * (1.0 + stats.logprobs - stats.logprobs.detach())
        return per_token, {"clip_frac": weight != ratio.detach()}
