"""The update half of an RL step, as plain functions: ``RLVRModule.training_step``, ``benchmarks/loss_step.py`` and
the tests all run this code.

    old log-probs (only when a token is used after the policy moved) -> for each of ppo_epochs x mini-batches:
        zero_grad -> for each micro-batch: token statistics -> loss -> backward(loss * weight)  -> optimizer step

Mini-batches hold whole groups (the G rows of a prompt), shuffled once per epoch by a seeded generator, so every
row is used exactly once per epoch. A mini-batch's gradient is accumulated exactly over its micro-batches: the
loss of micro-batch ``m`` is scaled by ``w_m / sum w``, with ``w`` the denominator of the loss's aggregation over
the responses it is over (valid tokens for ``token_mean``, responses with a valid token for
``seq_mean_token_mean``, responses for ``seq_mean_token_sum_norm``;
:meth:`simko.losses.PolicyLoss.aggregation_weight`), which gives the gradient of the loss of the whole mini-batch
in one piece, however the micro-batches split the groups. Metrics are weighted the same way and averaged over the
updates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch
from torch import Tensor

from simko.correction import MismatchMeter, RolloutCorrection
from simko.losses import PolicyLoss, TokenStats
from simko.rollout import Rollouts

# (rows of Rollouts.rows, top_k) -> TokenStats of their response tokens under the policy (differentiable).
StatsFn = Callable[[dict[str, Tensor], int], TokenStats]


def minibatch_rows(
    num_rows: int, group_size: int, ppo_epochs: int, num_mini_batches: int, generator: torch.Generator, device=None
) -> list[Tensor]:
    """Row indices of every mini-batch of an RL step, in update order (epoch-major).

    Each epoch shuffles whole groups with ``generator`` and splits them into ``num_mini_batches`` near-equal parts
    (``tensor_split``; an empty part, when there are fewer groups than mini-batches, is skipped).
    """
    num_groups = num_rows // group_size
    out = []
    for _ in range(ppo_epochs):
        group_order = torch.randperm(num_groups, generator=generator)
        for groups in group_order.tensor_split(num_mini_batches):
            if len(groups) == 0:
                continue
            out.append((groups[:, None] * group_size + torch.arange(group_size)).reshape(-1).to(device))
    return out


def micro_batches(
    rows: Tensor, micro_batch_size: int, response_mask: Tensor, loss_fn: PolicyLoss, advantages: Tensor
) -> tuple[list[Tensor], list[float], float]:
    """(micro-batch row indices, their aggregation weights, the weights' sum) of one mini-batch."""
    micro = list(rows.split(micro_batch_size))
    weights = [loss_fn.aggregation_weight(response_mask[i], advantages[i]) for i in micro]
    return micro, weights, sum(weights) or 1.0


@torch.no_grad()
def sampled_logprobs(token_stats: StatsFn, rollouts: Rollouts, micro_batch_size: int) -> Tensor:
    """Log-probs [N, R] of the sampled tokens under the model behind ``token_stats`` (no grad), micro-batched."""
    mask = rollouts.response_mask
    out = torch.zeros(mask.shape, device=mask.device)
    for idx in torch.arange(rollouts.num_rows, device=mask.device).split(micro_batch_size):
        lp = token_stats(rollouts.rows(idx), 0).logprobs
        out[idx, : lp.shape[1]] = lp
    return out


def accumulate_gradients(
    loss_fn: PolicyLoss,
    rollouts: Rollouts,
    rows: Tensor,
    token_stats: StatsFn,
    advantages: Tensor,
    rewards: Tensor,
    micro_batch_size: int,
    metrics: dict[str, float],
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    stats_top_k: int | None = None,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    diagnose: Callable[[TokenStats], dict[str, float]] | None = None,
    diagnostics: dict[str, float] | None = None,
    correction: RolloutCorrection | None = None,
    mismatch: MismatchMeter | None = None,
    where: str = "",
) -> None:
    """Accumulate into the parameters' ``.grad`` the gradient of ``loss_fn`` over the rollout ``rows`` (one
    mini-batch), micro-batch by micro-batch; add the weighted loss metrics into ``metrics``.

    ``old_logprobs`` [N, R]: None means the rows are used by the policy that sampled them (ratio 1, the current
    log-probs detached). ``stats_top_k``: candidates computed per token (>= the loss's ``top_k``; more when
    ``diagnose`` needs them). ``diagnose(stats)`` sees each micro-batch's statistics and returns token sums
    (:func:`simko.diagnostics.concentration_sums`), added into ``diagnostics``. ``backward`` runs on each scaled
    loss, inside ``no_sync()`` for all but the last micro-batch (DDP: one gradient all-reduce per mini-batch). A
    non-finite loss raises before anything is applied.

    When the engine reported ``rollouts.sampler_logprobs``: ``mismatch`` (if given) accumulates the sampler-trainer
    mismatch of these rows (old log-probs vs the sampler's), and an enabled ``correction`` hands the loss its
    importance weights (``is_weights``) and adds ``rollout/is_weight_mean`` / ``rollout/is_capped_frac``.
    """
    top_k = loss_fn.top_k if stats_top_k is None else stats_top_k
    micro, weights, total_weight = micro_batches(rows, micro_batch_size, rollouts.loss_mask, loss_fn, advantages)
    for i, (idx, w) in enumerate(zip(micro, weights)):
        stats = token_stats(rollouts.rows(idx), top_k)
        if diagnose is not None and diagnostics is not None:
            for k, v in diagnose(stats).items():  # token sums (rows without loss too): they add up
                diagnostics[k] += v
        R = stats.mask.shape[1]
        if rollouts.loss_rows is not None:  # rows without loss (simko.sampling_filters): no token in the loss
            stats = replace(stats, mask=stats.mask & rollouts.loss_rows[idx, None])
        old = old_logprobs[idx, :R] if old_logprobs is not None else stats.logprobs.detach()
        is_weights = None
        if rollouts.sampler_logprobs is not None:
            sampler = rollouts.sampler_logprobs[idx, :R]
            if mismatch is not None:
                mismatch.add(old, sampler, stats.mask)
            if correction is not None and correction.enabled:
                is_weights = correction.weights(old, sampler, stats.mask)
                for k, v in correction.weight_metrics(is_weights, old, sampler, stats.mask).items():
                    metrics[f"rollout/{k}"] += v * w / total_weight
        out = loss_fn(
            stats.with_top_k(loss_fn.top_k),
            old_logprobs=old,
            advantages=advantages[idx],
            rewards=rewards[idx],
            ref_logprobs=ref_logprobs[idx, :R] if ref_logprobs is not None else None,
            is_weights=is_weights,
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()}{where}, micro-batch {i}: "
                f"metrics {out.metrics}. Stopping before the optimizer applies it."
            )
        with no_sync() if i < len(micro) - 1 else nullcontext():
            backward(out.loss * (w / total_weight))
        for k, v in out.metrics.items():
            metrics[k] += v * w / total_weight


def update_policy(
    loss_fn: PolicyLoss,
    rollouts: Rollouts,
    rewards: Tensor,
    advantages: Tensor,
    token_stats: StatsFn,
    optimizer_step: Callable[[], float],
    zero_grad: Callable[[], None],
    generator: torch.Generator,
    *,
    ppo_epochs: int = 1,
    num_mini_batches: int = 1,
    micro_batch_size: int = 16,
    reference_stats: StatsFn | None = None,
    stats_top_k: int | None = None,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    diagnose: Callable[[TokenStats], dict[str, float]] | None = None,
    correction: RolloutCorrection | None = None,
    where: str = "",
) -> tuple[dict[str, float], dict[str, float]]:
    """All ``ppo_epochs x num_mini_batches`` optimizer updates of one RL step.

    ``optimizer_step()`` clips, steps (and schedules) and returns the gradient norm; ``reference_stats`` is the
    frozen reference's forward when the loss has a KL term. ``diagnose`` sees the statistics of the first
    mini-batch, under the policy that sampled the rollouts. Returns (loss metrics and ``grad_norm`` averaged over
    the updates, the diagnostics' token sums over the first mini-batch).

    When the engine reported ``rollouts.sampler_logprobs``, the metrics also hold the sampler-trainer mismatch of
    the whole batch (``rollout/logp_abs_diff``, ``rollout/ratio_outside_frac``, ``rollout/seq_kl``,
    ``rollout/seq_kl_k1``; :mod:`simko.correction`), measured against the old log-probs (the policy that
    sampled), and ``correction`` (off by default) reweights every token's PPO term by its importance weight.
    """
    # Old log-probs are needed only if some token is used after the policy has moved.
    needs_old = ppo_epochs * num_mini_batches > 1
    old_logprobs = sampled_logprobs(token_stats, rollouts, micro_batch_size) if needs_old else None
    ref_logprobs = sampled_logprobs(reference_stats, rollouts, micro_batch_size) if reference_stats else None
    device = rollouts.response_mask.device
    batches = minibatch_rows(rollouts.num_rows, rollouts.group_size, ppo_epochs, num_mini_batches, generator, device)
    metrics: dict[str, float] = defaultdict(float)
    diagnostics: dict[str, float] = defaultdict(float)
    mismatch = MismatchMeter() if rollouts.sampler_logprobs is not None else None
    if mismatch is not None and old_logprobs is not None:  # the old log-probs of every row exist already
        mismatch.add(old_logprobs, rollouts.sampler_logprobs, rollouts.response_mask)
    # Otherwise there is one update (ppo_epochs x num_mini_batches == 1): its micro-batches see every row once.
    in_loop = mismatch if old_logprobs is None else None
    for n, rows in enumerate(batches):
        zero_grad()
        accumulate_gradients(
            loss_fn,
            rollouts,
            rows,
            token_stats,
            advantages,
            rewards,
            micro_batch_size,
            metrics,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            stats_top_k=stats_top_k,
            backward=backward,
            no_sync=no_sync,
            diagnose=diagnose if n == 0 else None,
            diagnostics=diagnostics,
            correction=correction,
            mismatch=in_loop if n == 0 else None,
            where=where,
        )
        metrics["grad_norm"] += optimizer_step()
    out = {k: v / max(len(batches), 1) for k, v in metrics.items()}
    if mismatch is not None:
        out.update({f"rollout/{k}": v for k, v in mismatch.result().items()})
    return out, dict(diagnostics)
