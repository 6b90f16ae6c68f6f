"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617, Sec. 5).

Under policy gradient, the entropy change of a softmax policy is driven by the covariance between the log-prob of
an action and its advantage: confident tokens with positive advantage collapse the entropy. Both methods restrict
the update of the few tokens with the largest such covariance. Over the N valid tokens of the batch:

    Cov(y_i) = (log pi(y_i) - 1/N sum_j log pi(y_j)) * (A(y_i) - 1/N sum_j A(y_j))        (log pi detached)

Clip-Cov picks floor(r N) tokens uniformly at random (at least one) among those with Cov in (omega_low, omega_high)
that PPO's clip has not already stopped, and detaches their gradient:

    I_clip = Uniform( {i : omega_low < Cov(y_i) < omega_high}, floor(r N) )
    L_Clip-Cov = aggregate( PPO-clip_t if t not in I_clip;  PPO-clip_t with sg(ratio_t) if t in I_clip )

KL-Cov puts a penalty on the top-k fraction by covariance:

    I_KL = { i : Rank(Cov(y_i)) <= max(1, floor(k N)) }
    L_KL-Cov = aggregate( -A_t r_t + 1[t in I_KL] * beta * |log pi(y_t) - log pi_old(y_t)| )

Semantics follow verl's ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov`` (from the authors'
PRIME-RL/Entropy-Mechanism-of-RL): Clip-Cov keeps PPO's clip on the other tokens; KL-Cov uses no PPO clip (its
penalty is the trust region; ``ppo_clip=True`` restores the clip); the KL estimate is |log r| with coefficient
``kl_cov_coef`` (verl's ``ppo_kl_coef``). One difference: verl multiplies a Clip-Cov token's loss by 0, here its
ratio is detached, so the gradient is the same (zero) but the loss value stays comparable to GRPO's.
Defaults are the authors' Qwen2.5-7B recipes (``recipe/dapo/7b_clip_cov.sh``, ``7b_kl_cov.sh`` of
PRIME-RL/Entropy-Mechanism-of-RL): Clip-Cov r = 2e-4, omega = (1, 5) and PPO clip ratios 1 / 1 (the ratio is
clipped to [0, 2] only); KL-Cov k = 2e-3 (their ``k_percent: 0.2`` is a
percentage; 0.02 at 32B), beta = 1, no PPO clip. Their recipes also set ``clip_ratio_c: 10``, inert: the dual clip
is commented out in that fork's ``compute_policy_loss`` and absent from both losses.
The covariance is over the valid tokens of the (micro-)batch the loss sees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from simko.losses.aggregation import aggregate, masked_mean
from simko.losses.base import PolicyLoss, register_loss
from simko.losses.stats import TokenStats


def token_covariance(logprobs: Tensor, adv_tok: Tensor, mask: Tensor) -> Tensor:
    """Cov(y_t) [B, T] = (log pi_t - mean log pi) * (A_t - mean A), means over the valid tokens; 0 on padding."""
    logprobs = logprobs.detach()
    adv_tok = adv_tok.detach()
    centred_logprobs = logprobs - masked_mean(logprobs, mask)
    centred_adv = adv_tok - masked_mean(adv_tok, mask)
    return torch.where(mask, centred_logprobs * centred_adv, torch.zeros_like(logprobs))


def num_selected(fraction: float, num_valid: int) -> int:
    """max(1, floor(fraction * N)) tokens, or 0 when there is no valid token."""
    return max(1, int(fraction * num_valid)) if num_valid > 0 else 0


def random_subset(candidates: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """A [B, T] bool mask with min(num, #candidates) of the True entries of ``candidates``, uniformly at random.

    The permutation is drawn on the CPU from ``generator`` (the global RNG when None), so a seeded generator gives
    the same subset on any device.
    """
    flat_idx = candidates.flatten().nonzero().squeeze(-1)
    if flat_idx.numel() > num:
        perm = torch.randperm(flat_idx.numel(), generator=generator)[:num]
        flat_idx = flat_idx[perm.to(flat_idx.device)]
    selected = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    selected[flat_idx] = True
    return selected.view_as(candidates)


def top_fraction(scores: Tensor, mask: Tensor, num: int) -> Tensor:
    """A [B, T] bool mask of the ``num`` valid entries with the largest ``scores``."""
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if num > 0:
        masked_scores = scores.masked_fill(~mask, -math.inf).flatten()
        selected[masked_scores.topk(num).indices] = True
    return selected.view_as(mask) & mask


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


@register_loss("clip_cov")
class ClipCovLoss(PolicyLoss):
    """Clip-Cov: GRPO's PPO-clip loss with the gradient of a few random high-covariance tokens detached.

    Args:
        clip_cov_ratio: r, the fraction of valid tokens whose gradient is detached (2e-4).
        clip_cov_lb, clip_cov_ub: omega_low < Cov < omega_high, the covariance band tokens are drawn from (1, 5).
        clip_eps: the PPO clip epsilon, 1.0 as the official recipe (both sides; ``clip_eps_high`` may differ).
        seed: seeds this loss's own generator (deterministic draws); None draws from torch's global RNG (which
            ``seed_everything`` seeds). ``loss.generator`` may also be replaced by any CPU ``torch.Generator``.
        **base_kwargs: as :class:`PolicyLoss`.
    """

    def __init__(
        self,
        clip_cov_ratio: float = 2e-4,
        clip_cov_lb: float = 1.0,
        clip_cov_ub: float = 5.0,
        seed: int | None = None,
        clip_eps: float = 1.0,
        **base_kwargs,
    ):
        super().__init__(clip_eps=clip_eps, **base_kwargs)
        self.clip_cov_ratio = _check_fraction("clip_cov_ratio", clip_cov_ratio)
        if not clip_cov_lb < clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {clip_cov_lb} and {clip_cov_ub}")
        self.clip_cov_lb = float(clip_cov_lb)
        self.clip_cov_ub = float(clip_cov_ub)
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, scores: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        mask = stats.mask
        ratio = torch.exp(stats.logprobs - old_logprobs)
        with torch.no_grad():
            clipped_ratio = torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
            clipped_by_ppo = -adv_tok * clipped_ratio > -adv_tok * ratio
            cov = token_covariance(stats.logprobs, adv_tok, mask)
            candidates = mask & ~clipped_by_ppo & (cov > self.clip_cov_lb) & (cov < self.clip_cov_ub)
            num = num_selected(self.clip_cov_ratio, int(mask.sum()))
            selected = random_subset(candidates, num, self.generator)
        ratio = torch.where(selected, ratio.detach(), ratio)
        metrics = {
            "clip_cov/detached_frac": float(selected.sum() / mask.sum().clamp(min=1)),
            "clip_cov/candidate_frac": float(candidates.sum() / mask.sum().clamp(min=1)),
            "clip_cov/cov_mean": float(masked_mean(cov, mask)),
        }
        return ratio, adv_tok, metrics


@register_loss("kl_cov")
class KLCovLoss(PolicyLoss):
    """KL-Cov: a |log pi - log pi_old| penalty on the top ``kl_cov_ratio`` fraction of tokens by covariance.

    Args:
        kl_cov_ratio: k, the fraction of valid tokens penalised (2e-3; the paper uses 2e-4 at 32B).
        kl_cov_coef: beta, the penalty coefficient (verl's ``ppo_kl_coef``, 1.0). Distinct from ``kl_coef``, the
            KL to the reference model of :class:`PolicyLoss`.
        ppo_clip: also clip the ratio as PPO (False: as the paper/verl, the plain -A r surrogate).
        **base_kwargs: as :class:`PolicyLoss` (``clip_eps``/``clip_eps_high`` only matter with ``ppo_clip``).
    """

    def __init__(self, kl_cov_ratio: float = 2e-3, kl_cov_coef: float = 1.0, ppo_clip: bool = False, **base_kwargs):
        super().__init__(**base_kwargs)
        self.kl_cov_ratio = _check_fraction("kl_cov_ratio", kl_cov_ratio)
        if kl_cov_coef < 0:
            raise ValueError(f"kl_cov_coef must be >= 0, got {kl_cov_coef}")
        self.kl_cov_coef = float(kl_cov_coef)
        self.ppo_clip = bool(ppo_clip)
        if not self.ppo_clip:
            # clamp(r, -inf, inf) == r: the PPO objective reduces to -A r (and clip_frac reads 0).
            self.clip_low = self.clip_high = math.inf

    def token_penalty(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, metrics: dict[str, float]
    ) -> Tensor:
        mask = stats.mask
        with torch.no_grad():
            cov = token_covariance(stats.logprobs, adv_tok, mask)
            selected = top_fraction(cov, mask, num_selected(self.kl_cov_ratio, int(mask.sum())))
        abs_log_ratio = (stats.logprobs - old_logprobs).abs()
        penalty = self.kl_cov_coef * torch.where(selected, abs_log_ratio, torch.zeros_like(abs_log_ratio))
        with torch.no_grad():
            metrics["kl_cov/penalised_frac"] = float(selected.sum() / mask.sum().clamp(min=1))
            metrics["kl_cov/penalty"] = float(aggregate(penalty.detach(), mask, self.aggregation, self.norm_len))
            metrics["kl_cov/abs_log_ratio"] = float(masked_mean(abs_log_ratio.detach(), mask))
            metrics["kl_cov/cov_mean"] = float(masked_mean(cov, mask))
        return penalty
