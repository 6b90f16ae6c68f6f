"""GRPO (Shao et al. 2024, arXiv 2402.03300) and every loss that is only a setting of the base loss's knobs.

The PPO-clip objective on the sampled token with group-normalised advantages. The variants are YAML presets of
``configs/loss/grpo.yaml`` (``defaults: [grpo]`` + overrides): ``dr_grpo`` (``aggregation:
seq_mean_token_sum_norm``, ``advantage_kwargs: {norm_std: false}``), ``dapo`` (``clip_eps_high``), ``psr`` /
``nsr`` / ``w_reinforce`` / ``passk`` / ``maxrl`` (``advantage:``), ``entropy_bonus`` (``entropy_coef``),
``entropy_control`` (``entropy_control``); ``kl_coef`` / ``kl_estimator`` add a KL to the frozen reference.
"""

from simko.losses.base import PolicyLoss, register_loss


@register_loss("grpo")
class GRPOLoss(PolicyLoss):
    """Exactly :class:`PolicyLoss`: ratio = pi/pi_old of the sampled token, advantage broadcast over tokens."""
