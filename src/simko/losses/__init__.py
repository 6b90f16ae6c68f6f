"""Policy-gradient losses for RLVR: one shared PPO-clip core with knobs, a few registered classes, YAML presets.

from simko.losses import TokenStats, build_loss
stats = TokenStats.from_logits(logits, tokens, mask, top_k=3, temperature=1.0)
loss_fn = build_loss("simko", k=3, alpha=0.01, lam=1.1, tau=0.8, clip_eps=0.2)
out = loss_fn(stats, old_logprobs=old_lp, advantages=adv, scores=scores)
out.loss.backward(); out.metrics

Each loss class lives in its own module of this package and registers itself (``@register_loss``); ``LOSSES``
finds them by scanning the package (:class:`simko.registry.Registry`), so a new loss is one file here plus its
``configs/loss/<name>.yaml``.
"""

from simko.losses.aggregation import AGGREGATIONS, aggregate, aggregation_weight
from simko.losses.base import LOSSES, LossOutput, PolicyLoss, build_loss, kl_penalty, register_loss
from simko.losses.stats import TokenStats, response_quantile_mask

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "LossOutput",
    "PolicyLoss",
    "TokenStats",
    "aggregate",
    "aggregation_weight",
    "build_loss",
    "kl_penalty",
    "register_loss",
    "response_quantile_mask",
]
