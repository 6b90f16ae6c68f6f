"""The PPO-clip policy loss that every loss in this package shares, and the loss registry.

The base loss has the knobs every loss shares: the clip range, the aggregation, a KL term to a frozen reference,
the advantage estimator (``advantage``: GRPO's group normalisation, PSR/NSR/W-REINFORCE's fixed signs, pass@k,
...; :mod:`simko.advantages`) and an entropy bonus (``entropy_coef``). Losses that are only settings of these
knobs are YAML presets (``configs/loss/dapo.yaml``, ``nsr.yaml``, ...). A loss that changes the objective is a
small registered class with three hooks a subclass may override:

- :meth:`PolicyLoss.surrogate` returns the per-token ratio and advantage that enter the PPO-clip objective
  (GRPO: the plain ratio r and the broadcast advantage; SimKO: its smoothed ratio and lambda-scaled advantage).
- :meth:`PolicyLoss.token_penalty` returns a ``[B, T]`` term added to the per-token PPO loss before aggregation
  (KL-Cov's |log r| penalty on its selected tokens uses it).
- :meth:`PolicyLoss.extra_loss` returns an additional scalar term (the base's: the entropy bonus; an override
  adds ``super().extra_loss(...)`` to keep it).

Everything else (clipping, KL to a reference, aggregation, metrics) lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from simko.advantages import build_advantage
from simko.losses.aggregation import aggregate, check_aggregation, masked_mean
from simko.losses.stats import TokenStats
from simko.registry import class_registrar

LOSSES: dict[str, type[PolicyLoss]] = {}


register_loss = class_registrar(LOSSES, "loss")  # @register_loss("name") on a PolicyLoss subclass


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
    extra = -entropy_coef * aggregate(H) (the entropy bonus, H differentiable) unless a subclass adds more

    Args:
        clip_eps: PPO clip epsilon (low side, and high side unless ``clip_eps_high`` is set).
        clip_eps_high: DAPO's clip-higher upper epsilon; ``None`` means symmetric.
        aggregation: ``token_mean`` | ``seq_mean_token_mean`` | ``seq_mean_token_sum_norm`` (Dr.GRPO).
        norm_len: the constant of ``seq_mean_token_sum_norm``; ``None`` uses the batch's padded length.
        kl_coef: beta of the KL term to the frozen reference; 0 (default) loads no reference model.
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        advantage: name of the advantage estimator (see :mod:`simko.advantages`): ``grpo`` | ``psr`` | ``nsr`` |
            ``w_reinforce`` | ``passk``.
        advantage_kwargs: keyword arguments of the estimator (e.g. ``{norm_std: false}`` for Dr.GRPO, ``{k: 4}``
            for ``passk``); checked against its signature here.
        entropy_coef: beta_H of the entropy bonus ``-beta_H * aggregate(H)``, H differentiable (0: off).

    ``top_k`` (class or instance attribute): how many top-K candidates the loss needs in :class:`TokenStats`.
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
        advantage_kwargs: dict | None = None,
        entropy_coef: float = 0.0,
    ):
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if clip_eps_high is not None and not clip_eps_high > 0:
            raise ValueError(f"clip_eps_high must be > 0 or None, got {clip_eps_high}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (a bonus), got {entropy_coef}")
        self.clip_low = float(clip_eps)
        self.clip_high = float(clip_eps if clip_eps_high is None else clip_eps_high)
        self.aggregation = check_aggregation(aggregation)
        self.norm_len = norm_len
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.entropy_coef = float(entropy_coef)
        self._advantage_fn = build_advantage(advantage, **dict(advantage_kwargs or {}))  # Hydra: a DictConfig

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
        is_weights: Tensor | None = None,
    ) -> LossOutput:
        """Loss of one (micro-)batch. ``advantages``/``rewards``: [B], one per response; ``old_logprobs`` [B, T].

        ``is_weights`` [B, T] (detached): per-token importance weights from the sampler to ``old_logprobs``'s policy
        (:class:`simko.correction.RolloutCorrection`); they multiply each token's PPO term (not the penalty, the KL
        term or the extra loss), so they apply to every loss's surrogate alike. None: weight 1.
        """
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
        if is_weights is not None:
            if is_weights.shape != mask.shape:
                raise ValueError(f"is_weights must have shape {tuple(mask.shape)}, got {tuple(is_weights.shape)}")
            per_token = per_token * is_weights.detach()
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
        """Optional scalar added to the loss (None: nothing). The base: the entropy bonus when ``entropy_coef``.

        The classic maximum-entropy regulariser (e.g. Williams & Peng 1991; verl's ``entropy_coeff``). The entropy
        of :class:`TokenStats` is differentiable, so the bonus acts (in the official SimKO code it is detached and
        inert): per position, grad_z [-beta_H H(softmax(z))] = beta_H * p * (log p + H). It is aggregated like the
        policy term, so micro-batch weighting stays exact. Cui et al. 2025 (arXiv 2505.22617) report the
        coefficient is touchy: ~1e-3 barely moves entropy, 1e-2 can make it explode.
        """
        if self.entropy_coef == 0:
            return None
        entropy = aggregate(stats.entropy, stats.mask, self.aggregation, self.norm_len)
        metrics["entropy_bonus"] = float(entropy.detach())
        return -self.entropy_coef * entropy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
