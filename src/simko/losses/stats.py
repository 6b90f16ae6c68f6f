"""Per-token statistics of the policy: the only thing a loss ever sees.

A policy-gradient loss for RLVR needs, per response token, the log-probability of the sampled token, the
entropy of the next-token distribution and (for SimKO and the diagnostics) the log-probabilities and ids of
the current top-K candidates. It never needs the full ``[B, T, V]`` logits. Computing these statistics from the
last hidden states in sequence chunks, with activation recomputation per chunk, keeps peak memory at
``O(B * chunk * V)`` instead of ``O(B * T * V)`` (trl #2709, #3678: the full fp32 log-softmax is what blows
memory on long responses).

All log-probabilities are of the *temperature-scaled* distribution ``softmax(logits / temperature)``: the
distribution the rollouts were sampled from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenStats:
    """Token statistics of one batch of responses. Shapes: ``B`` rows, ``T`` response positions, ``K`` = top_k.

    logprobs       [B, T]    log pi(y_t | s_t) of the sampled token; differentiable.
    entropy        [B, T]    entropy of pi(. | s_t); differentiable (detach it where a method wants it inert).
    topk_logprobs  [B, T, K] log pi(c_k | s_t) of the current top-K tokens, rank order; differentiable.
    topk_ids       [B, T, K] ids of those tokens (integer, no gradient).
    mask           [B, T]    True on real response tokens, False on padding.
    """

    logprobs: Tensor
    entropy: Tensor
    topk_logprobs: Tensor
    topk_ids: Tensor
    mask: Tensor

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[-1]

    @property
    def is_top1(self) -> Tensor:
        """[B, T] bool: the sampled token is the current argmax (ties: the first of them, as ``topk``)."""
        if self.top_k == 0:
            raise ValueError("TokenStats.is_top1 needs top_k >= 1")
        # Equal log-prob to the top-1 counts as top-1 (robust to ties between equal logits).
        return self.logprobs.detach() >= self.topk_logprobs[..., 0].detach()

    def with_top_k(self, k: int) -> TokenStats:
        """The same statistics restricted to the first ``k`` candidates (a loss gets exactly the K it asked for)."""
        if k > self.top_k:
            raise ValueError(f"asked for top-{k} candidates, the statistics hold {self.top_k}")
        return TokenStats(self.logprobs, self.entropy, self.topk_logprobs[..., :k], self.topk_ids[..., :k], self.mask)

    def select(self, rows: Tensor) -> TokenStats:
        """The statistics of some rows only (``rows``: [B] bool or indices); differentiable as indexing is."""
        parts = (self.logprobs, self.entropy, self.topk_logprobs, self.topk_ids, self.mask)
        return TokenStats(*(part[rows] for part in parts))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        tokens: Tensor,
        mask: Tensor,
        top_k: int = 0,
        temperature: float = 1.0,
    ) -> TokenStats:
        """Statistics from logits already aligned with ``tokens`` (``logits[b, t]`` predicts ``tokens[b, t]``).

        Differentiable in ``logits``. Convenient for tests and scripts; the training module uses
        :meth:`from_hidden`, which never materialises all logits at once.
        """
        _check_shapes(logits.shape[:-1], tokens, mask)
        logprobs, entropy, topk_lp, topk_ids = _token_stats(logits, tokens, top_k, temperature)
        return cls(logprobs, entropy, topk_lp, topk_ids, mask.bool())

    @classmethod
    def from_hidden(
        cls,
        hidden: Tensor,
        lm_head: torch.nn.Module,
        tokens: Tensor,
        mask: Tensor,
        top_k: int = 0,
        temperature: float = 1.0,
        chunk_size: int = 256,
    ) -> TokenStats:
        """Statistics from last hidden states ``[B, T, D]`` aligned with ``tokens`` (``hidden[b, t]`` predicts
        ``tokens[b, t]``), computed ``chunk_size`` positions at a time.

        Under autograd each chunk is wrapped in activation checkpointing: its ``[B, chunk, V]`` logits are freed
        after the forward and recomputed in the backward, so at most one chunk of logits is alive at a time.
        """
        _check_shapes(hidden.shape[:-1], tokens, mask)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        outs = []
        for start in range(0, hidden.shape[1], chunk_size):
            h = hidden[:, start : start + chunk_size]
            y = tokens[:, start : start + chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                outs.append(checkpoint(_head_stats, h, lm_head, y, top_k, temperature, use_reentrant=False))
            else:
                outs.append(_head_stats(h, lm_head, y, top_k, temperature))
        logprobs, entropy, topk_lp, topk_ids = (torch.cat(parts, dim=1) for parts in zip(*outs))
        return cls(logprobs, entropy, topk_lp, topk_ids, mask.bool())


def response_quantile_mask(entropy: Tensor, mask: Tensor, tau: float) -> Tensor:
    """[B, T] bool: valid tokens whose detached entropy is strictly above the tau-quantile of ITS OWN response.

    SimKO's forking tokens (w) and the diagnostics' high-entropy tokens. The quantile is ``torch.quantile``'s
    linear one over the valid tokens of each row (padding is set to NaN and ignored by ``nanquantile``). A row with
    no valid token has a NaN quantile and so no True.
    """
    entropy = entropy.detach()
    mask = mask.bool()
    masked_entropy = torch.where(mask, entropy, torch.full_like(entropy, float("nan")))
    quantile = torch.nanquantile(masked_entropy, tau, dim=-1, keepdim=True, interpolation="linear")
    return (entropy > quantile) & mask  # NaN compares False


def _check_shapes(lead_shape, tokens: Tensor, mask: Tensor) -> None:
    if tuple(lead_shape) != tuple(tokens.shape) or tuple(tokens.shape) != tuple(mask.shape):
        raise ValueError(
            f"TokenStats: logits/hidden lead shape {tuple(lead_shape)}, tokens {tuple(tokens.shape)} and "
            f"mask {tuple(mask.shape)} must all be [B, T]"
        )


def _head_stats(h: Tensor, lm_head: torch.nn.Module, tokens: Tensor, top_k: int, temperature: float):
    return _token_stats(lm_head(h), tokens, top_k, temperature)


def _token_stats(logits: Tensor, tokens: Tensor, top_k: int, temperature: float):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32; float64 stays float64 (tests)
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    ids = tokens.long().unsqueeze(-1)
    if top_k > 0:
        # Top-K ids from the logits (no copy), then ONE gather of the sampled token and the K columns from the one
        # log-softmax: its backward scatters into a single [B, T, V] buffer (two gathers would allocate and add
        # two; the official code even copies the logits K times).
        topk_ids = logits.detach().topk(top_k, dim=-1).indices
        ids = torch.cat([ids, topk_ids], dim=-1)
    else:
        topk_ids = logits.new_zeros((*tokens.shape, 0), dtype=torch.long)
    picked = logp.gather(-1, ids)
    logprobs, topk_lp = picked[..., 0], picked[..., 1:]
    return logprobs, entropy, topk_lp, topk_ids


# A model's forward over rollout rows (``Rollouts.rows``): (rows, top_k) -> TokenStats of their response tokens
# (simko.forward.rollout_token_stats with the model bound).
StatsFn = Callable[[dict[str, Tensor], int], TokenStats]
