"""Policy-gradient losses for RLVR: a registry of small classes over one shared PPO-clip core.

    from simko.losses import TokenStats, build_loss
    stats = TokenStats.from_logits(logits, tokens, mask, top_k=3, temperature=1.0)
    loss_fn = build_loss("grpo", clip_eps=0.2)
    out = loss_fn(stats, old_logprobs=old_lp, advantages=adv, rewards=rew)
    out.loss.backward(); out.metrics
"""

from simko.losses.aggregation import AGGREGATIONS, aggregate, aggregation_weight
from simko.losses.base import LOSSES, LossOutput, PolicyLoss, build_loss, kl_penalty, register_loss
from simko.losses.stats import TokenStats

# Importing a loss module registers it.
from simko.losses import grpo  # noqa: E402,F401

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
]
