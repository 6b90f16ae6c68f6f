"""GRPO (Shao et al. 2024, arXiv 2402.03300) with the usual variants as flags.

The PPO-clip objective on the sampled token with group-normalised advantages. Variants, one flag each:
``aggregation`` (token_mean | seq_mean_token_mean | seq_mean_token_sum_norm = Dr.GRPO), ``norm_std=False``
(Dr.GRPO), ``clip_eps_high`` (DAPO clip-higher), ``kl_coef``/``kl_estimator`` (KL to the frozen reference).
"""

from simko.losses.base import PolicyLoss, register_loss


@register_loss("grpo")
class GRPOLoss(PolicyLoss):
    """Exactly :class:`PolicyLoss`: ratio = pi/pi_old of the sampled token, advantage broadcast over tokens."""
