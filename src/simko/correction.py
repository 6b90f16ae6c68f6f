"""Rollout-training mismatch: measured every RL step, and corrected with truncated importance sampling.

A sampler other than the policy itself (vLLM: other kernels, other reduction orders, bf16 on GPU) gives the sampled
tokens slightly different probabilities than the trainer's forward does (trl #4159, #6789: 4-8 % of tokens
outside a +-10 % ratio on a 0.5B model). PPO's ratio is taken against the trainer's log-probs of the policy that
sampled (pi_old), so the samples come from pi_sampler, not from pi_old, and the gradient is biased by
pi_old / pi_sampler. With the engine's per-token log-probs (``Rollouts.sampler_logprobs``):

- :func:`mismatch_metrics`: ``rollout/logp_abs_diff`` (mean |log pi_old - log pi_sampler| over response tokens),
  ``rollout/ratio_outside_frac`` (fraction of tokens whose ratio pi_old / pi_sampler is outside [0.9, 1.1]),
  ``rollout/seq_kl`` (a per-sequence estimate of KL(pi_sampler || pi_old): the sum over the response of the k3
  estimator ``r - 1 - log r``, r = pi_old / pi_sampler, which is >= 0 and unbiased under samples of the sampler;
  mean over sequences) and ``rollout/seq_kl_k1`` (the same with ``-log r``, unbiased too, noisier, may be < 0).
- :class:`RolloutCorrection`: importance weights w = pi_old / pi_sampler that multiply each token's PPO term in the
  loss (``PolicyLoss.__call__(..., is_weights=w)``), so they compose with every loss, SimKO included ("decoupled"
  PPO: TRL's ``vllm_importance_sampling_*``, verl's ``rollout_correction``; this is an independent
  implementation). Off by default (``mode: none``). Modes:

  ================== ==============================================================================
  token_truncate     w_t = min(r_t, cap)  (and max(., cap_min) when cap_min is set)
  token_mask         w_t = r_t inside [cap_min, cap], else 0  (cap_min default 1 / cap)
  sequence_truncate  w = min(prod_t r_t, cap) for every token of the response (max(., cap_min) if set)
  sequence_mask      w = prod_t r_t inside [cap_min, cap], else 0, for every token of the response
  ================== ==============================================================================

  The log-ratio is clamped to [-20, 20] before ``exp`` (a sequence's product over thousands of tokens would
  overflow). Weights are detached and 0 on padding; a masked token still counts in the aggregation's
  denominator, as in TRL (its contribution is zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
RATIO_BAND = (0.9, 1.1)  # rollout/ratio_outside_frac counts tokens whose ratio is outside this band
LOG_RATIO_BOUND = 20.0


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    count = mask.sum()
    return float((x * mask).sum() / count) if count > 0 else 0.0


class MismatchMeter:
    """Accumulates :func:`mismatch_metrics` over micro-batches: token means over all their valid tokens, the
    sequence KL over all their non-empty rows (so the result equals one call on the concatenated batch)."""

    def __init__(self):
        self.tokens = self.rows = 0.0
        self.abs_diff = self.outside = self.k3 = self.k1 = 0.0

    @torch.no_grad()
    def add(self, train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> None:
        mask = mask.bool()
        m = mask.float()
        log_ratio = torch.where(mask, train_logprobs.float() - sampler_logprobs.float(), 0.0)
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        outside = (ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])
        rows = mask.any(1)
        self.tokens += float(m.sum())
        self.rows += float(rows.sum())
        self.abs_diff += float((log_ratio.abs() * m).sum())
        self.outside += float((outside.float() * m).sum())
        self.k3 += float(((ratio - 1.0 - log_ratio) * m).sum())
        self.k1 += float((-log_ratio * m).sum())

    def result(self) -> dict[str, float]:
        tokens, rows = max(self.tokens, 1.0), max(self.rows, 1.0)
        return {
            "logp_abs_diff": self.abs_diff / tokens,
            "ratio_outside_frac": self.outside / tokens,
            "seq_kl": self.k3 / rows,
            "seq_kl_k1": self.k1 / rows,
        }


def mismatch_metrics(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Mismatch between the trainer's log-probs of the sampled tokens and the sampler's, all ``[B, T]``.

    Keys (without the ``rollout/`` prefix the module adds): ``logp_abs_diff``, ``ratio_outside_frac``,
    ``seq_kl``, ``seq_kl_k1``. Means over the valid tokens (``mask``) resp. over rows with at least one.
    """
    meter = MismatchMeter()
    meter.add(train_logprobs, sampler_logprobs, mask)
    return meter.result()


@dataclass(frozen=True)
class RolloutCorrection:
    """Truncated (or masked) importance sampling from the sampler to the trainer's pi_old (``rollout.correction``).

    Args:
        mode: ``none`` (default: no weights; the mismatch is still logged) or one of :data:`MODES`.
        cap: C_max, the weight's upper bound (truncate: clamped to it; mask: zeroed above it). > 1.
        cap_min: C_min. truncate: clamp from below (default: none); mask: zero below (default: 1 / cap). < cap.
    """

    mode: str = "none"
    cap: float = 2.0
    cap_min: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown rollout.correction.mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.cap > 1.0:
            raise ValueError(f"rollout.correction.cap must be > 1, got {self.cap}")
        if self.cap_min is not None and not 0.0 <= self.cap_min < self.cap:
            raise ValueError(f"rollout.correction.cap_min must be in [0, cap={self.cap}), got {self.cap_min}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @torch.no_grad()
    def weights(self, train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Tensor | None:
        """Per-token weights ``[B, T]`` (detached, 0 on padding), or None when ``mode`` is ``none``.

        ``train_logprobs``: the trainer's log-probs of the sampled tokens under the policy that sampled (pi_old),
        ``sampler_logprobs``: the sampler's (``Rollouts.sampler_logprobs``), ``mask``: the valid response tokens.
        """
        if not self.enabled:
            return None
        mask = mask.bool()
        log_ratio = torch.where(mask, train_logprobs.detach().float() - sampler_logprobs.float(), 0.0)
        level, kind = self.mode.split("_")
        if level == "sequence":
            log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        if kind == "truncate":
            weight = ratio.clamp(min=self.cap_min, max=self.cap)
        else:
            low = 1.0 / self.cap if self.cap_min is None else self.cap_min
            weight = torch.where((ratio >= low) & (ratio <= self.cap), ratio, 0.0)
        return torch.where(mask, weight, 0.0).to(train_logprobs.dtype)

    @torch.no_grad()
    def weight_metrics(self, weights: Tensor, train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor):
        """``is_weight_mean`` and ``is_capped_frac`` (tokens whose weight differs from their ratio: truncated or
        masked), over the valid tokens."""
        mask = mask.bool()
        m = mask.float()
        log_ratio = torch.where(mask, train_logprobs.float() - sampler_logprobs.float(), 0.0)
        if self.mode.startswith("sequence"):
            log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        capped = ~torch.isclose(weights.float(), ratio)
        return {"is_weight_mean": _masked_mean(weights.float(), m), "is_capped_frac": _masked_mean(capped.float(), m)}
