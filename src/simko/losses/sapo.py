"""SAPO: Soft Adaptive Policy Optimization (Gao et al. 2025, Qwen team, arXiv 2511.20347).

PPO's hard clip drops the gradient of a token once its ratio leaves [1 - eps, 1 + eps]; SAPO replaces the clip by a
smooth gate of the token's ratio, so the gradient fades out instead of stopping:

    r_t  = pi(y_t|s_t) / pi_old(y_t|s_t)
    f(r) = sigmoid(tau (r - 1)) * 4 / tau,      tau = tau_pos if A > 0 else tau_neg
    L    = aggregate( -f(r_t) A )                (seq_mean_token_mean: the paper's 1/G sum_i 1/|y_i| sum_t)
    grad = -A * 4 s (1 - s) * r_t * grad log pi(y_t),   s = sigmoid(tau (r_t - 1))

At r = 1 the weight 4 s (1 - s) r is 1, so on-policy SAPO is GRPO with the sequence mean; the weight falls off on
both sides of 1 (off-policy tokens are attenuated, never cut), faster for larger tau. tau_neg > tau_pos damps the
negative updates more: they raise the logits of many unsampled tokens (the paper's argument for asymmetry).

Follows verl's ``compute_policy_loss_sapo`` (``verl/trainer/ppo/core_algos.py``), as TRL's ``loss_type="sapo"``:
the log ratio clamped to [-20, 20] before the exp (no gradient beyond, as there), tau_pos = 1.0 and tau_neg = 1.05
(the paper's Qwen3-30B-A3B values, verl's and TRL's defaults), rollout importance weights multiplying the per-token
term. verl always aggregates SAPO as ``seq-mean-token-mean``; here that is the preset's default and ``aggregation``
stays a knob. SAPO has no clip: ``clip_eps`` is unused, ``clip_eps_high`` and ``dual_clip_c`` are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.losses.aggregation import masked_mean
from simko.losses.base import PolicyLoss, register_loss
from simko.losses.stats import TokenStats

LOG_RATIO_CLAMP = 20.0  # verl's SAPO clamps log r to [-20, 20] before the exp


def sapo_gate(ratio: Tensor, tau: Tensor) -> Tensor:
    """f(r) = sigmoid(tau (r - 1)) * 4 / tau: value 2 / tau at r = 1, slope 1 there (the PPO surrogate's)."""
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


@register_loss("sapo")
class SAPOLoss(PolicyLoss):
    """SAPO: the soft, temperature-controlled gate f(r) in place of PPO's clip (see the module docstring).

    Args:
        tau_pos: gate temperature of tokens with A > 0 (1.0).
        tau_neg: gate temperature of tokens with A <= 0 (1.05; larger decays faster).
        aggregation: ``seq_mean_token_mean`` (the paper's and verl's); any other mode is allowed.
        **base_kwargs: as :class:`PolicyLoss`; ``clip_eps`` is unused, ``clip_eps_high`` and ``dual_clip_c`` must
            stay null (there is no clip to widen or cap).
    """

    def __init__(
        self,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        aggregation: str = "seq_mean_token_mean",
        **base_kwargs,
    ):
        super().__init__(aggregation=aggregation, **base_kwargs)
        for name, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
            if not value > 0:
                raise ValueError(f"sapo {name} must be > 0 (a gate temperature), got {value}")
        if self.dual_clip_c is not None or base_kwargs.get("clip_eps_high") is not None:
            raise ValueError("sapo has no PPO clip: leave clip_eps_high and dual_clip_c null (its gate is tau_pos/neg)")
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)

    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, rewards: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        ratio = torch.exp((stats.logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        with torch.no_grad():  # SAPO's counterpart of the clip fraction: the gate's mean gradient weight 4 s (1 - s)
            s = torch.sigmoid(self._tau(adv_tok, ratio) * (ratio.detach() - 1.0))
            weight = masked_mean(4.0 * s * (1.0 - s), stats.mask)
        return ratio, adv_tok, {"sapo/gate_weight_mean": float(weight) if stats.mask.any() else 1.0}

    def objective(self, ratio: Tensor, adv: Tensor, stats: TokenStats) -> tuple[Tensor, dict[str, Tensor]]:
        # no token is ever clipped: clip_frac is 0, logged as verl does for SAPO (the gate's action: gate_weight_mean)
        return -sapo_gate(ratio, self._tau(adv, ratio)) * adv, {"clip_frac": torch.zeros_like(stats.mask)}

    def _tau(self, adv: Tensor, like: Tensor) -> Tensor:
        """tau_pos where A > 0, tau_neg elsewhere (A = 0 included, as verl)."""
        return torch.full_like(like, self.tau_neg).masked_fill(adv > 0, self.tau_pos)  # in like's dtype (float64 too)
