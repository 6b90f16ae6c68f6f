"""Policy-gradient losses for RLVR: one shared PPO-clip core with knobs, a few registered classes, YAML presets.

from simko.losses import TokenStats, build_loss
stats = TokenStats.from_logits(logits, tokens, mask, top_k=3, temperature=1.0)
loss_fn = build_loss("simko", k=3, alpha=0.01, lam=1.1, tau=0.8, clip_eps=0.2)
out = loss_fn(stats, old_logprobs=old_lp, advantages=adv, rewards=rew)
out.loss.backward(); out.metrics
"""

import importlib
import pkgutil

from simko.losses.aggregation import AGGREGATIONS, aggregate, aggregation_weight
from simko.losses.base import LOSSES, LossOutput, PolicyLoss, build_loss, kl_penalty, register_loss
from simko.losses.cispo import CISPOLoss
from simko.losses.covariance import ClipCovLoss, KLCovLoss
from simko.losses.grpo import GRPOLoss
from simko.losses.gspo import GSPOLoss
from simko.losses.simko import SimKOLoss
from simko.losses.stats import TokenStats, response_quantile_mask

# Importing a loss module registers it: every module of this package is imported, so a new loss is one file here
# (plus its configs/loss/<name>.yaml) and no list to extend.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "CISPOLoss",
    "ClipCovLoss",
    "GRPOLoss",
    "GSPOLoss",
    "KLCovLoss",
    "LossOutput",
    "PolicyLoss",
    "SimKOLoss",
    "TokenStats",
    "aggregate",
    "aggregation_weight",
    "build_loss",
    "kl_penalty",
    "register_loss",
    "response_quantile_mask",
]
