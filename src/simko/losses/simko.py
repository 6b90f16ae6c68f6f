"""SimKO: Simple Pass@K Policy Optimization (Peng et al. 2025, arXiv 2510.14807; v3: "Beyond the Sampled Token:
Preserving Candidate Support in RLVR", method "CaSP"). Semantics of the official ``compute_policy_loss_simko``
(github.com/CLR-Lab/SimKO), written as equations; see ``shared/science/simko.md``.

GRPO concentrates probability on the sampled token: the top-1 probability grows and the other top-K candidates
collapse, which hurts pass@K. SimKO changes the gradient, never the loss value, on "forking" tokens only:

    r        = pi(y|s) / pi_old(y|s)                       (PPO ratio of the sampled token y)
    c_1..c_K = top-K tokens of the current pi(.|s)          (detached ids)
    H        = entropy of pi(.|s), detached
    q_i      = tau-quantile of H over the valid tokens of response i   (linear; per response, not per batch)
    w        = 1[H > q_i]                                   (strict; tau = 0.8 => ~20% of each response)
    mix      = alpha * w
    ratio~   = (1 - mix) r + (mix / K) sum_k sg(r) exp(log pi(c_k|s) - sg(log pi(c_k|s)))    if correct_i
             = r                                                                               otherwise
    A~       = lam * A_i   if A_i < 0 and y == argmax pi(.|s) and w
             = A_i         otherwise
    loss     = aggregate( max(-A~ ratio~, -A~ clip(ratio~, 1 - eps, 1 + eps_high)) )

Since lam > 0 factors out of the max, lam * A in the official code equals scaling the token's GRADIENT by lam.
We do exactly that, through the ratio: ratio~ <- ratio~ + (lam - 1) * (ratio~ - sg(ratio~)) on the scaled
tokens, whose value is unchanged. So ratio~ has the value r everywhere, and the loss value, clip decisions and
the clip fraction are GRPO's bit for bit (lam included); only the gradient differs. Its gradient on a
correct, unclipped token is  A r [ (1 - alpha w) grad log pi(y) + (alpha w / K) sum_k grad log pi(c_k) ]:
with alpha = 0.01, K = 3 the sampled token keeps 0.99 of the positive gradient and each top-3 candidate gets
0.0033. On an incorrect response, the negative gradient of a forking token that is the current top-1 is scaled
by lam. Groups that are all correct or all wrong have A = 0 and are untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.losses.aggregation import masked_mean
from simko.losses.base import PolicyLoss, register_loss
from simko.losses.stats import TokenStats, response_quantile_mask


def smoothed_ratio(ratio: Tensor, topk_logprobs: Tensor, mix: Tensor) -> Tensor:
    """ratio~ = r + mix * (r_topk - r), with r_topk = sg(r) * mean_k exp(log pi(c_k) - sg(log pi(c_k))).

    Written as r plus a correction whose value is exactly 0 (each exp(...) is exp(0) = 1, their mean exactly 1),
    so ratio~ equals r bit for bit while its gradient is (1 - mix) grad r + (mix / K) r sum_k grad log pi(c_k).
    """
    topk_ratio = ratio.detach() * torch.exp(topk_logprobs - topk_logprobs.detach()).mean(dim=-1)
    return ratio + mix * (topk_ratio - ratio)


def _share(numerator: Tensor, denominator: Tensor) -> float:
    return float(numerator.sum() / denominator.sum().clamp(min=1))


@register_loss("simko")
class SimKOLoss(PolicyLoss):
    """SimKO loss (see the module docstring for the equations).

    Args:
        k: number of top-K candidates that share the positive gradient (the loss's ``top_k``).
        alpha: share of the positive gradient moved from the sampled token to the top-K, in [0, 1].
        lam: factor on the negative gradient of top-1 forking tokens of incorrect responses (> 0; 1 = off).
        tau: entropy quantile level defining forking tokens, in (0, 1). The official default 1.0 makes w = 0 and
            silently turns SimKO into GRPO, so it is refused.
        correct_threshold: a response is correct when its verifier score >= this (score == 1 for {0, 1} scores).
        clip_eps, clip_eps_high, kl_coef, **base_kwargs: as :class:`PolicyLoss`.
    """

    def __init__(
        self,
        k: int = 3,
        alpha: float = 0.01,
        lam: float = 1.1,
        tau: float = 0.8,
        correct_threshold: float = 1.0,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        **base_kwargs,
    ):
        super().__init__(clip_eps=clip_eps, clip_eps_high=clip_eps_high, kl_coef=kl_coef, **base_kwargs)
        if int(k) != k or k < 1:
            raise ValueError(f"SimKO k (number of top-K candidates) must be an integer >= 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SimKO alpha must be in [0, 1], got {alpha}")
        if not lam > 0:
            raise ValueError(f"SimKO lam must be > 0 (1 disables the negative scaling), got {lam}")
        if not 0.0 < tau < 1.0:
            raise ValueError(
                f"SimKO tau must be in (0, 1), got {tau}: tau is the per-response entropy quantile above which "
                "tokens are treated (w = 1[H > q_tau]); tau >= 1 selects no token and silently turns SimKO into "
                "GRPO (the official code's default tau=1.0 does exactly that), tau <= 0 selects all but the minimum. "
                "The paper's runs use tau=0.8."
            )
        self.k = int(k)
        self.top_k = self.k  # instance attribute: the trainer builds TokenStats with top_k = loss.top_k
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.tau = float(tau)
        self.correct_threshold = float(correct_threshold)

    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, scores: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        if stats.top_k < self.k:
            raise ValueError(
                f"loss {self.name!r} with k={self.k} needs TokenStats with top_k >= {self.k}, got {stats.top_k}; "
                "build them with top_k=loss_fn.top_k"
            )
        mask = stats.mask
        ratio = torch.exp(stats.logprobs - old_logprobs)
        forking = response_quantile_mask(stats.entropy, mask, self.tau)  # w
        correct = (scores >= self.correct_threshold)[:, None].expand_as(mask)
        # Extra columns (stats built with a larger top_k for diagnostics) are ignored: the first k are the top-k.
        topk_logprobs = stats.topk_logprobs[..., : self.k]

        mix = self.alpha * (forking & correct).to(ratio.dtype)
        ratio_used = smoothed_ratio(ratio, topk_logprobs, mix)

        negative = (adv_tok < 0) & mask
        scaled = negative & stats.is_top1 & forking
        if self.lam != 1.0:
            # Gradient x lam, value unchanged (see the module docstring): equals the official lam * A.
            ratio_used = ratio_used + ((self.lam - 1.0) * scaled) * (ratio_used - ratio_used.detach())

        with torch.no_grad():
            correct_tok = correct & mask
            in_topk = stats.logprobs.detach() >= topk_logprobs[..., -1].detach()  # ties count as in the top-K
            metrics = {
                "simko/forking_frac": _share(forking, mask),
                "simko/neg_scaled_frac": _share(scaled, negative),
                "simko/correct_in_topk_frac": _share(in_topk & correct_tok, correct_tok),
                "simko/forking_entropy": float(masked_mean(stats.entropy.detach(), forking)),
            }
        return ratio_used, adv_tok, metrics
