"""Probability-concentration diagnostics (the SimKO paper's argument, logged every RL step).

GRPO drives the probability of the top-1 candidate up and of the ranks 2..K down by orders of magnitude; SimKO
keeps them. We log, over valid response tokens and over the high-entropy ("forking") tokens of each response:
- ``p_rank{k}``: mean probability of the k-th most likely token, k = 1..top_k (plot on a log scale);
- ``topk_gap{k}``: mean log p(rank 1) - mean log p(rank k);
- the mean token entropy and the share of high-entropy tokens.
High-entropy = entropy strictly above the tau-quantile of the token's own response, as in SimKO.

Every value is a mean over tokens, so batches are combined through their token sums (:func:`concentration_sums`,
the same keys for every batch): micro-batches and validation batches add them up, ranks all-reduce them
(:func:`concentration_over_ranks`), and :func:`metrics_from_sums` divides once. A batch without a high-entropy
token (every response of one token, or of equal entropies) adds zeros to the ``_hi`` sums instead of dropping
keys, so every rank takes part in the same all-reduce.
"""

from __future__ import annotations

import torch

from simko.losses.stats import TokenStats, response_quantile_mask

GROUPS = ("", "_hi")  # all valid tokens, high-entropy tokens


@torch.no_grad()
def concentration_sums(stats: TokenStats, tau: float = 0.8) -> dict[str, float]:
    """Token sums behind the diagnostics of one batch (needs ``stats.top_k`` >= 1; {} otherwise). The keys depend
    only on ``stats.top_k``: ``tokens{g}``, ``sum_p{k}{g}``, ``sum_logp{k}{g}`` for g in ("", "_hi"), and
    ``sum_entropy``."""
    if stats.top_k == 0:
        return {}
    mask = stats.mask
    logp = stats.topk_logprobs.detach().double()  # [B, T, K]; float64 sums: many batches and ranks add up
    probs = logp.exp()
    high = response_quantile_mask(stats.entropy, mask, tau)
    out: dict[str, float] = {}
    for group, sel in zip(GROUPS, (mask, high)):
        out[f"tokens{group}"] = float(sel.sum())
        sum_p, sum_logp = probs[sel].sum(0), logp[sel].sum(0)  # [K]; zeros when nothing is selected
        for k in range(stats.top_k):
            out[f"sum_p{k + 1}{group}"] = float(sum_p[k])
            out[f"sum_logp{k + 1}{group}"] = float(sum_logp[k])
    out["sum_entropy"] = float((stats.entropy.detach().double() * mask).sum())
    return out


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """The diagnostics of (added-up) token sums: means over the selected tokens. A group without a token (no
    high-entropy token anywhere) has no ``p_rank``/``topk_gap`` values rather than NaN."""
    if not sums:
        return {}
    top_k = sum(1 for key in sums if key.startswith("sum_p") and not key.endswith("_hi"))
    out: dict[str, float] = {}
    for group in GROUPS:
        n = sums[f"tokens{group}"]
        if n == 0:
            continue
        for k in range(1, top_k + 1):
            out[f"p_rank{k}{group}"] = sums[f"sum_p{k}{group}"] / n
        for k in range(2, top_k + 1):
            out[f"topk_gap{k}{group}"] = (sums[f"sum_logp1{group}"] - sums[f"sum_logp{k}{group}"]) / n
    valid = max(sums["tokens"], 1.0)
    out["entropy_mean"] = sums["sum_entropy"] / valid
    out["high_entropy_share"] = sums["tokens_hi"] / valid
    return out


def concentration_metrics(stats: TokenStats, tau: float = 0.8) -> dict[str, float]:
    """Diagnostics of one batch of token statistics (needs ``stats.top_k`` >= 1). Returns floats."""
    return metrics_from_sums(concentration_sums(stats, tau))


def concentration_over_ranks(sums: dict[str, float], strategy=None, device=None) -> dict[str, float]:
    """The diagnostics of this rank's token sums added over all ranks (one all-reduce through the Lightning
    ``strategy``; none or one process: these sums alone). Every rank returns the same keys and values."""
    if sums and strategy is not None and getattr(strategy, "world_size", 1) > 1:
        keys = sorted(sums)  # the same on every rank: they depend only on top_k
        total = torch.tensor([sums[key] for key in keys], dtype=torch.float64, device=device)
        total = strategy.reduce(total, reduce_op="sum")
        sums = dict(zip(keys, total.tolist()))
    return metrics_from_sums(sums)
