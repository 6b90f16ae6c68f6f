"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071), as a loss of the PPO family.

GRPO weighs each token by its own ratio pi/pi_old; GSPO uses one importance ratio per response, the length-normalised
(geometric-mean) sequence ratio, and clips that:

    s_i  = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp( 1/|y_i| sum_t log(pi(y_i,t|.) / pi_old(y_i,t|.)) )
    J    = 1/G sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i )       (paper: eps 3e-4 / 4e-4)

Written token by token as the paper's GSPO-token (and verl's ``gspo``): s_i,t = sg(s_i) * pi(y_i,t) / sg(pi(y_i,t)),
whose value is s_i at every token and whose gradient is s_i * grad log pi(y_i,t). With the ``seq_mean_token_mean``
aggregation (the default here, verl's fixed choice, TRL's ``loss_type="grpo"`` with
``importance_sampling_level="sequence"``) each response contributes the mean of |y_i| equal PPO terms, whose
gradient is exactly that of the sequence-level term: -A_i * s_i * 1/|y_i| sum_t grad log pi(y_i,t) where the clip
is inactive. (``token_mean`` instead weighs responses by their length, TRL's warning for its token-level loss
types.) verl also clamps log s_i,t at 10; the paper does not, and neither does this loss (``dual_clip_c`` caps the
loss of negative-advantage responses whose ratio grew large).
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.losses.base import PolicyLoss, register_loss
from simko.losses.stats import TokenStats


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B] log s_i = mean over the valid tokens of row i of log pi - log pi_old (0 for a row with none), detached."""
    valid = mask.to(logprobs.dtype)
    log_ratio = (logprobs.detach() - old_logprobs) * valid
    return log_ratio.sum(-1) / valid.sum(-1).clamp(min=1.0)


@register_loss("gspo")
class GSPOLoss(PolicyLoss):
    """GSPO: PPO-clip on the sequence-level importance ratio s_i (see the module docstring).

    Args:
        clip_eps, clip_eps_high: the clip range of s_i; the paper's 3e-4 and 4e-4 (s_i is a geometric mean over
            the tokens, so it moves far less than a token's ratio).
        aggregation: ``seq_mean_token_mean``, the paper's 1/G sum over responses.
        **base_kwargs: as :class:`PolicyLoss`.
    """

    def __init__(
        self,
        clip_eps: float = 3e-4,
        clip_eps_high: float | None = 4e-4,
        aggregation: str = "seq_mean_token_mean",
        **base_kwargs,
    ):
        super().__init__(clip_eps=clip_eps, clip_eps_high=clip_eps_high, aggregation=aggregation, **base_kwargs)

    def surrogate(
        self, stats: TokenStats, old_logprobs: Tensor, adv_tok: Tensor, scores: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        seq_log_ratio = sequence_log_ratio(stats.logprobs, old_logprobs, stats.mask)
        ratio = torch.exp(seq_log_ratio[:, None] + stats.logprobs - stats.logprobs.detach())
        with torch.no_grad():
            nonempty = stats.mask.any(-1)
            seq_ratio = seq_log_ratio[nonempty].exp()
            metrics = {"gspo/seq_ratio_mean": float(seq_ratio.mean()) if seq_ratio.numel() else 1.0}
        return ratio, adv_tok, metrics
