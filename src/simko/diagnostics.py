"""Probability-concentration diagnostics (the SimKO paper's argument, logged every RL step).

GRPO drives the probability of the top-1 candidate up and of the ranks 2..K down by orders of magnitude; SimKO
keeps them. We log, over valid response tokens and over the high-entropy ("forking") tokens of each response:
- ``p_rank{k}``: mean probability of the k-th most likely token, k = 1..top_k (plot on a log scale);
- ``topk_gap{k}``: mean log p(rank 1) - mean log p(rank k);
- the mean token entropy and the share of high-entropy tokens.
High-entropy = entropy strictly above the tau-quantile of the token's own response, as in SimKO.
"""

from __future__ import annotations

import torch

from simko.losses.stats import TokenStats, response_quantile_mask


@torch.no_grad()
def concentration_metrics(stats: TokenStats, tau: float = 0.8) -> dict[str, float]:
    """Diagnostics of one batch of token statistics (needs ``stats.top_k`` >= 1). Returns floats."""
    if stats.top_k == 0:
        return {}
    mask = stats.mask
    probs = stats.topk_logprobs.detach().float().exp()  # [B, T, K]
    logp = stats.topk_logprobs.detach().float()
    high = response_quantile_mask(stats.entropy, mask, tau)
    out: dict[str, float] = {}
    for name, sel in (("", mask), ("_hi", high)):
        n = sel.sum()
        if n == 0:
            continue
        mean_p = probs[sel].mean(0)  # [K]
        mean_logp = logp[sel].mean(0)
        for k in range(stats.top_k):
            out[f"p_rank{k + 1}{name}"] = float(mean_p[k])
        for k in range(1, stats.top_k):
            out[f"topk_gap{k + 1}{name}"] = float(mean_logp[0] - mean_logp[k])
    valid = mask.sum().clamp(min=1)
    out["entropy_mean"] = float((stats.entropy.detach() * mask).sum() / valid)
    out["high_entropy_share"] = float(high.sum() / valid)
    return out
