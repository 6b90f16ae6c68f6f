"""The PPO-clip policy loss that every loss in this package shares, and the loss registry.

A loss is a small class with two hooks a subclass may override:

- :meth:`PolicyLoss.surrogate` returns the per-token ratio and advantage that enter the PPO-clip objective
  (GRPO: the plain ratio r and the broadcast advantage; SimKO: its smoothed ratio and lambda-scaled advantage).
- :meth:`PolicyLoss.token_penalty` returns a ``[B, T]`` term added to the per-token PPO loss before aggregation
  (KL-Cov's |log r| penalty on its selected tokens uses it).
- :meth:`PolicyLoss.extra_loss` returns an additional scalar term.

Everything else (clipping, KL to a reference, aggregation, metrics) lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from simko.advantages import build_advantage
from simko.losses.aggregation import aggregate, check_aggregation, masked_mean
from simko.losses.stats import TokenStats

LOSSES: dict[str, type[PolicyLoss]] = {}


def register_loss(name: str) -> Callable[[type], type]:
    def deco(cls):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = cls
        cls.name = name
        return cls

    return deco


def build_loss(name: str, **kwargs) -> PolicyLoss:
    """Build a registered loss by name with the same keyword arguments as its ``configs/loss/<name>.yaml``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL divergence").

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r with log r = log pi - log pi_ref.
    k3 (the "low-var" estimator of GRPO) is unbiased and always >= 0.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


class PolicyLoss:
    """PPO-clip policy loss with GRPO group advantages (the base every registered loss derives from).

    loss = aggregate( max(-A~ * ratio~, -A~ * clip(ratio~, 1 - eps, 1 + eps_high)) + penalty_t + beta * KL_t ) + extra

    Args:
        clip_eps: PPO clip epsilon (low side, and high side unless ``clip_eps_high`` is set).
        clip_eps_high: DAPO's clip-higher upper epsilon; ``None`` means symmetric.
        aggregation: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm`` (Dr.GRPO).
        norm_len: the constant of ``seq_mean_token_sum_norm``; ``None`` uses the batch's padded length.
        kl_coef: beta of the KL term to the frozen reference; 0 (default) loads no reference model.
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        advantage: name of the advantage estimator (see :mod:`simko.advantages`).
        norm_std: divide group-centred rewards by their std (GRPO) or not (Dr.GRPO); for ``advantage: grpo``.
        advantage_kwargs: extra keyword arguments of the advantage estimator (e.g. ``{k: 4}`` for ``passk``).
        top_k: how many top-K candidates the loss needs in :class:`TokenStats` (0 for GRPO).
    """

    name = "base"
    top_k = 0

    def __init__(
        self,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        aggregation: str = "token_mean",
        norm_len: int | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        advantage: str = "grpo",
        norm_std: bool = True,
        advantage_kwargs: dict | None = None,
    ):
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if clip_eps_high is not None and not clip_eps_high > 0:
            raise ValueError(f"clip_eps_high must be > 0 or None, got {clip_eps_high}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        self.clip_low = float(clip_eps)
        self.clip_high = float(clip_eps if clip_eps_high is None else clip_eps_high)
        self.aggregation = check_aggregation(aggregation)
        self.norm_len = norm_len
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.advantage_name = advantage
        adv_kwargs = {"norm_std": norm_std} if advantage == "grpo" else {}
        adv_kwargs.update(dict(advantage_kwargs or {}))  # dict(): Hydra may pass a DictConfig
        self.advantage_kwargs = adv_kwargs
        self._advantage_fn = build_advantage(advantage, **adv_kwargs)

    # ------------------------------------------------------------------ public API
    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must build a frozen reference model (only for a KL term)."""
        return self.kl_coef > 0

    def compute_advantages(self, rewards: Tensor) -> Tensor:
        """rewards [P, G] -> advantages [P, G] with this loss's estimator."""
        return self._advantage_fn(rewards)

    def __call__(
        self,
        stats: TokenStats,
        old_logprobs: Tensor,
        advantages: Tensor,
        rewards: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> LossOutput:
        """Loss of one (micro-)batch. ``advantages``/``rewards``: [B], one per response; ``old_logprobs`` [B, T]."""
        mask = stats.mask
        if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages must have shape [B]={mask.shape[0]}, got {tuple(advantages.shape)}")
        if old_logprobs.shape != mask.shape:
            raise ValueError(f"old_logprobs must have shape {tuple(mask.shape)}, got {tuple(old_logprobs.shape)}")
        if self.needs_reference and ref_logprobs is None:
            raise ValueError(f"loss {self.name!r} has kl_coef={self.kl_coef} > 0 and needs ref_logprobs")
        if rewards is None:
            rewards = (advantages > 0).float()
        old_logprobs = old_logprobs.detach()
        adv_tok = advantages.detach().float()[:, None].expand_as(stats.logprobs)

        ratio, adv_used, metrics = self.surrogate(stats, old_logprobs, adv_tok, rewards.detach().float())
        unclipped = -adv_used * ratio
        clipped = -adv_used * torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        per_token = torch.maximum(unclipped, clipped)
        penalty = self.token_penalty(stats, old_logprobs, adv_tok, metrics)
        if penalty is not None:
            per_token = per_token + penalty
        policy_loss = aggregate(per_token, mask, self.aggregation, self.norm_len)
        loss = policy_loss

        with torch.no_grad():
            log_ratio = stats.logprobs.detach() - old_logprobs
            metrics.update(
                policy_loss=float(policy_loss.detach()),
                clip_frac=float(masked_mean((clipped > unclipped).float(), mask)),
                approx_kl=float(masked_mean(0.5 * log_ratio.square(), mask)),
                entropy=float(masked_mean(stats.entropy.detach(), mask)),
                num_tokens=float(mask.sum()),
            )
        if self.kl_coef > 0:
            kl = kl_penalty(stats.logprobs, ref_logprobs.detach(), self.kl_estimator)
            kl_loss = aggregate(kl, mask, self.aggregation, self.norm_len)
            loss = loss + self.kl_coef * kl_loss
            metrics["kl_ref"] = float(kl_loss.detach())
        extra = self.extra_loss(stats, metrics)
        if extra is not None:
            loss = loss + extra
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss=loss, metrics=metrics)

    # ------------------------------------------------------------------ hooks
    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, rewards: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Per-token (ratio, advantage) of the PPO-clip objective, and any loss-specific metrics."""
        return torch.exp(stats.logprobs - old_logprobs), adv_tok, {}

    def token_penalty(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, metrics: dict[str, float]
    ) -> Tensor | None:
        """Optional ``[B, T]`` term added to the per-token PPO loss before aggregation (None: nothing)."""
        return None

    def extra_loss(self, stats: TokenStats, metrics: dict[str, float]) -> Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
