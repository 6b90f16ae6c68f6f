"""How a ``[B, T]`` matrix of per-token losses becomes one scalar.

The same modes as verl / TRL:
- ``token_mean``: sum over all valid tokens / number of valid tokens (GRPO as in DAPO, SimKO's default).
- ``seq_mean_token_mean``: mean over each response's tokens, then mean over responses (original GRPO; length
  biased).
- ``seq_mean_token_sum_norm``: sum over each response's tokens / a constant (the max response length), then
  mean over responses (Dr.GRPO, Liu et al. 2025, arXiv 2503.20783).

For gradient accumulation a mini-batch is split into micro-batches; the exact mini-batch loss is
``sum_micro aggregate(micro) * weight(micro) / sum_micro weight(micro)`` with ``weight`` from
:func:`aggregation_weight` (tokens for token_mean, rows otherwise).
"""

from __future__ import annotations

from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def check_aggregation(mode: str) -> str:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")
    return mode


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", norm_len: int | None = None) -> Tensor:
    """Aggregate per-token ``values`` over ``mask``. An all-masked batch gives 0 (with a graph), never NaN."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(values.shape[0], 1)
    if mode == "seq_mean_token_sum_norm":
        denom = float(norm_len if norm_len is not None else values.shape[-1])
        per_seq = (values * mask).sum(-1) / max(denom, 1.0)
        return per_seq.sum() / max(values.shape[0], 1)
    check_aggregation(mode)
    raise AssertionError("unreachable")


def aggregation_weight(mask: Tensor, mode: str) -> float:
    """The weight of one micro-batch in its mini-batch (see the module docstring)."""
    return float(mask.sum()) if mode == "token_mean" else float(mask.shape[0])


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
