"""Policy-gradient losses for RLVR: a registry of small classes over one shared PPO-clip core.

from simko.losses import TokenStats, build_loss
stats = TokenStats.from_logits(logits, tokens, mask, top_k=3, temperature=1.0)
loss_fn = build_loss("simko", k=3, alpha=0.01, lam=1.1, tau=0.8, clip_eps=0.2)
out = loss_fn(stats, old_logprobs=old_lp, advantages=adv, rewards=rew)
out.loss.backward(); out.metrics
"""

# Importing a loss module registers it.
from simko.losses import covariance, entropy_bonus, grpo, passk, reinforce_family, simko  # noqa: E402,F401
from simko.losses.aggregation import AGGREGATIONS, aggregate, aggregation_weight
from simko.losses.base import LOSSES, LossOutput, PolicyLoss, build_loss, kl_penalty, register_loss
from simko.losses.covariance import ClipCovLoss, KLCovLoss  # noqa: E402
from simko.losses.entropy_bonus import EntropyBonusLoss  # noqa: E402
from simko.losses.grpo import GRPOLoss  # noqa: E402
from simko.losses.passk import PassKLoss  # noqa: E402
from simko.losses.reinforce_family import NSRLoss, PSRLoss, WeightedReinforceLoss  # noqa: E402
from simko.losses.simko import SimKOLoss, SimKONegOnlyLoss, SimKOPosOnlyLoss  # noqa: E402
from simko.losses.stats import TokenStats

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "ClipCovLoss",
    "EntropyBonusLoss",
    "GRPOLoss",
    "KLCovLoss",
    "LossOutput",
    "NSRLoss",
    "PSRLoss",
    "PassKLoss",
    "PolicyLoss",
    "SimKOLoss",
    "SimKONegOnlyLoss",
    "SimKOPosOnlyLoss",
    "TokenStats",
    "WeightedReinforceLoss",
    "aggregate",
    "aggregation_weight",
    "build_loss",
    "kl_penalty",
    "register_loss",
]
