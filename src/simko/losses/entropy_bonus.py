"""Entropy bonus on top of any registered loss: loss = base_loss - beta_H * aggregate(H), H differentiable.

The classic maximum-entropy regulariser (e.g. Williams & Peng 1991; the ``entropy_coeff`` of verl). In the official
SimKO code the entropy passed to this term is detached, so the bonus there is inert; here the entropy of
:class:`TokenStats` is differentiable and the bonus really acts:

    grad_z [-beta_H H(softmax(z))] = beta_H * p * (log p + H)     per position, for logits z and p = softmax(z)

The entropy is aggregated like the base loss's policy term (its ``aggregation``/``norm_len``), so micro-batch
weighting stays consistent. Cui et al. 2025 (arXiv 2505.22617) report the coefficient is touchy: ~1e-3 barely
moves entropy, 1e-2 can make it explode.
"""

from __future__ import annotations

from torch import Tensor

from simko.losses.aggregation import aggregate
from simko.losses.base import LossOutput, build_loss, register_loss
from simko.losses.stats import TokenStats


@register_loss("entropy_bonus")
class EntropyBonusLoss:
    """Wraps the registered loss ``base`` (built with ``**base_kwargs``) and subtracts ``entropy_coef`` times its
    aggregated, differentiable token entropy.

    It behaves as the wrapped loss everywhere else: ``top_k``, ``needs_reference``, ``compute_advantages``,
    ``aggregation`` and any other attribute are the base loss's.
    """

    name = "entropy_bonus"

    def __init__(self, base: str = "grpo", entropy_coef: float = 0.001, **base_kwargs):
        if base == self.name:
            raise ValueError("entropy_bonus cannot wrap itself")
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (a bonus), got {entropy_coef}")
        self.base = build_loss(base, **base_kwargs)
        self.entropy_coef = float(entropy_coef)

    @property
    def top_k(self) -> int:
        return self.base.top_k

    @property
    def needs_reference(self) -> bool:
        return self.base.needs_reference

    def compute_advantages(self, rewards: Tensor) -> Tensor:
        return self.base.compute_advantages(rewards)

    def __getattr__(self, attr: str):
        # Only called for attributes not found on the wrapper: aggregation, norm_len, clip_low, ...
        if attr == "base":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(attr)
        return getattr(self.base, attr)

    def __call__(self, stats: TokenStats, *args, **kwargs) -> LossOutput:
        out = self.base(stats, *args, **kwargs)
        entropy = aggregate(stats.entropy, stats.mask, self.base.aggregation, self.base.norm_len)
        loss = out.loss - self.entropy_coef * entropy
        metrics = dict(out.metrics, entropy_bonus=float(entropy.detach()), loss=float(loss.detach()))
        return LossOutput(loss=loss, metrics=metrics)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r}, entropy_coef={self.entropy_coef})"
