"""Pass@k Training with analytic advantages (Chen et al. 2025, "Pass@k Training for Adaptively Balancing
Exploration and Exploitation of Large Reasoning Models", arXiv 2508.10751).

GRPO's PPO-clip loss whose group advantages come from the pass@k reward of the group's k-subsets instead of each
response's own reward (closed form in :func:`simko.advantages.passk_advantages`). With N_neg incorrect responses
in a group of G:

    R_bar = 1 - C(N_neg, k) / C(G, k),   sigma = sqrt(R_bar (1 - R_bar))
    A_pos = (1 - R_bar) / sigma,         A_neg = (1 - R_bar - C(N_neg - 1, k - 1) / C(G - 1, k - 1)) / sigma

Related: PKPO (Walder & Karkhanis 2025, arXiv 2505.15201), unbiased pass@k policy gradients.
"""

from __future__ import annotations

from simko.losses.base import PolicyLoss, register_loss


@register_loss("passk")
class PassKLoss(PolicyLoss):
    """PPO-clip loss with Chen et al.'s analytic pass@k advantages.

    Args:
        k: the k of pass@k; must be <= the group size G (checked when advantages are computed).
        correct_threshold: a response is correct when its reward >= this.
        **base_kwargs: as :class:`PolicyLoss` (``advantage`` is fixed to ``passk``).
    """

    def __init__(self, k: int = 4, correct_threshold: float = 1.0, **base_kwargs):
        if int(k) != k or k < 1:
            raise ValueError(f"passk k must be an integer >= 1, got {k}")
        super().__init__(
            advantage="passk", advantage_kwargs={"k": int(k), "correct_threshold": correct_threshold}, **base_kwargs
        )
        self.k = int(k)
