"""How a ``[B, T]`` matrix of per-token losses becomes one scalar.

The same modes as verl / TRL:
- ``token_mean``: sum over all valid tokens / number of valid tokens (GRPO as in DAPO, SimKO's default).
- ``seq_mean_token_mean``: mean over each response's tokens, then mean over the responses that have a valid token
  (original GRPO; length biased). A response with no valid token is left out of the mean, as verl's ``agg_loss``
  does (it would otherwise count as a zero and shrink the loss by N_nonempty / N).
- ``seq_mean_token_sum_norm``: sum over each response's tokens / a constant length L, then mean over the B
  responses: sum / (B * L) (Dr.GRPO, Liu et al. 2025, arXiv 2503.20783; TRL's ``dr_grpo``). verl's ``agg_loss``
  divides by L only, so its loss (and gradient) is this one times the rows of its micro-batch.

For gradient accumulation a mini-batch is split into micro-batches; the exact mini-batch loss is
``sum_micro aggregate(micro) * weight(micro) / sum_micro weight(micro)`` with ``weight`` from
:func:`aggregation_weight`: the denominator of each mode (valid tokens; responses with a valid token; responses).
That holds whatever rows a micro-batch holds, groups split or not, as long as ``norm_len`` is a constant (the
padded length of a micro-batch is not: :class:`simko.losses.PolicyLoss` requires ``norm_len``).
"""

from __future__ import annotations

from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def check_aggregation(mode: str) -> str:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")
    return mode


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", norm_len: int | None = None) -> Tensor:
    """Aggregate per-token ``values`` over ``mask``. An all-masked batch gives 0 (with a graph), never NaN.

    ``norm_len``: the constant L of ``seq_mean_token_sum_norm``; None uses the padded length ``values.shape[-1]``.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq_mean_token_mean":
        tokens = mask.sum(-1)
        per_seq = (values * mask).sum(-1) / tokens.clamp(min=1.0)
        return per_seq.sum() / (tokens > 0).sum().clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        denom = float(norm_len if norm_len is not None else values.shape[-1])
        per_seq = (values * mask).sum(-1) / max(denom, 1.0)
        return per_seq.sum() / max(values.shape[0], 1)
    check_aggregation(mode)
    raise AssertionError("unreachable")


def aggregation_weight(mask: Tensor, mode: str) -> float:
    """The weight of one micro-batch in its mini-batch: the denominator of ``mode`` (see the module docstring)."""
    if mode == "token_mean":
        return float(mask.sum())
    if mode == "seq_mean_token_mean":
        return float(mask.any(-1).sum())
    check_aggregation(mode)
    return float(mask.shape[0])


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
