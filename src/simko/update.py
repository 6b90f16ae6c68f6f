"""The update half of an RL step, as plain functions: ``RLVRModule.training_step``, ``benchmarks/loss_step.py`` and
the tests all run this code. It knows no Lightning: what it calls into the model, the optimizer and the strategy
comes in one :class:`UpdateHooks`, the counts and knobs in one :class:`UpdateSchedule`.

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

Micro-batches are ``micro_batch_size`` rows in mini-batch order, or, with ``micro_batch_tokens``, bins of at most
that many tokens (prompt + response) filled largest first (:func:`token_budget_bins`; whole groups, the prompt
counted once, when the forward shares it), so each forward holds at most that many tokens whatever the lengths.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from simko.correction import MismatchMeter, RolloutCorrection
from simko.losses import PolicyLoss, TokenStats
from simko.losses.stats import StatsFn
from simko.rollout import Rollouts


@dataclass(frozen=True)
class UpdateHooks:
    """What the update calls: the model's forwards, the optimizer and the strategy's gradient plumbing.

    Args:
        token_stats: the policy's forward, ``(rows, top_k) -> TokenStats`` (differentiable).
        optimizer_step: clips, steps the optimizer (and the schedule) and returns the gradient norm before
            clipping; required by :func:`update_policy`.
        zero_grad: clears the gradients before each mini-batch; required by :func:`update_policy`.
        reference_stats: the frozen reference's forward when the loss has a KL term (None: no reference).
        backward: runs on each micro-batch's scaled loss (Lightning: ``manual_backward``).
        no_sync: the context for all but the last micro-batch of a mini-batch (DDP: no gradient all-reduce).
        diagnose: ``diagnose(stats) -> token sums`` of the concentration diagnostics
            (:func:`simko.diagnostics.concentration_sums`), seen by the first mini-batch (None: off).
        max_over_ranks: the largest of an integer over all ranks, so that every rank runs as many token-budget
            micro-batches (FSDP's collectives run per forward); the identity on one process.
    """

    token_stats: StatsFn
    optimizer_step: Callable[[], float] | None = None
    zero_grad: Callable[[], None] | None = None
    reference_stats: StatsFn | None = None
    backward: Callable[[Tensor], None] = Tensor.backward
    no_sync: Callable[[], AbstractContextManager] = nullcontext
    diagnose: Callable[[TokenStats], dict[str, float]] | None = None
    max_over_ranks: Callable[[int], int] = int


@dataclass(frozen=True)
class UpdateSchedule:
    """How the update walks one RL step's batch.

    Args:
        ppo_epochs: passes over the batch.
        num_mini_batches: optimizer steps per pass (whole groups each).
        micro_batch_size: rows per forward/backward.
        micro_batch_tokens: tokens (prompt + response) per forward/backward instead (:func:`token_budget_bins`);
            None: ``micro_batch_size`` rows.
        share_prompt: the forward runs each prompt once per micro-batch (:mod:`simko.forward`): token budgets then
            keep a prompt's rows together where they fit and count the prompt once.
        shuffle_seed: seeds the group shuffle of every epoch (:func:`minibatch_rows`).
        stats_top_k: top-K candidates computed per token (>= the loss's ``top_k``; more when ``diagnose`` needs
            them); None: the loss's.
        correction: importance weights from the sampler to the old policy (:class:`simko.correction.
            RolloutCorrection`; None or disabled: off).
        where: appended to the non-finite-loss error (e.g. `` at RL step 7``).
    """

    ppo_epochs: int = 1
    num_mini_batches: int = 1
    micro_batch_size: int = 16
    micro_batch_tokens: int | None = None
    share_prompt: bool = False
    shuffle_seed: int = 0
    stats_top_k: int | None = None
    correction: RolloutCorrection | None = None
    where: str = ""


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


def token_budget_bins(
    lengths: Tensor, budget: int, num_bins: int = 0, groups: Tensor | None = None, prompt_lengths: Tensor | None = None
) -> list[Tensor]:
    """Positions into ``lengths`` [n] grouped into bins of at most ``budget`` tokens: first-fit decreasing (units
    largest first, ties by position, each into the first bin it fits; a unit larger than the budget gets a bin of
    its own). A unit is a row, or with ``groups`` [n] (the rows' prompt ids) and ``prompt_lengths`` [n] a whole
    group, whose prompt counts once (the forward shares it), as long as the group fits in the budget; a group that
    does not is split into its rows. With ``num_bins`` above the count that needs, the bins with the most tokens (of
    more than one row) are halved until there are that many. Each bin lists its positions in increasing order; the
    bins come in the order they were opened (largest units first). Deterministic."""
    units: list[tuple[int, list[int]]] = []
    if groups is None:
        units = [(int(n), [i]) for i, n in enumerate(lengths)]
    else:
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups.tolist()):
            members.setdefault(g, []).append(i)
        for rows in members.values():
            cost = sum(int(lengths[i]) for i in rows) - (len(rows) - 1) * int(prompt_lengths[rows[0]])
            units += [(cost, rows)] if cost <= budget else [(int(lengths[i]), [i]) for i in rows]
    units.sort(key=lambda unit: (-unit[0], unit[1][0]))
    bins: list[list[int]] = []
    loads: list[int] = []
    for cost, rows in units:
        for b, load in enumerate(loads):
            if load + cost <= budget:
                bins[b] += rows
                loads[b] += cost
                break
        else:
            bins.append(list(rows))
            loads.append(cost)
    while len(bins) < num_bins:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            break
        b = max(splittable, key=lambda b: (loads[b], -b))
        rows = sorted(bins[b], key=lambda i: (-int(lengths[i]), i))  # longest first: alternate between the halves
        bins[b], half = rows[0::2], rows[1::2]
        loads[b] = sum(int(lengths[i]) for i in bins[b])
        bins.insert(b + 1, half)
        loads.insert(b + 1, sum(int(lengths[i]) for i in half))
    return [torch.tensor(sorted(rows), dtype=torch.long) for rows in bins]


def split_rows(rows: Tensor, rollouts: Rollouts, schedule: UpdateSchedule, hooks: UpdateHooks) -> list[Tensor]:
    """The micro-batches (row indices) of ``rows``: ``micro_batch_size`` rows in order, or the token-budget bins of
    their tokens (prompt + response; with ``schedule.share_prompt`` whole groups, each prompt counted once), as many
    on every rank (``hooks.max_over_ranks``)."""
    if schedule.micro_batch_tokens is None:
        return list(rows.split(schedule.micro_batch_size))
    attention_mask = rollouts.attention_mask[rows].cpu()
    lengths = attention_mask.sum(1)
    groups = prompts = None
    if schedule.share_prompt:
        groups = (rows // rollouts.group_size).cpu()
        prompts = attention_mask[:, : rollouts.prompt_len].sum(1)
    budget = schedule.micro_batch_tokens
    bins = token_budget_bins(lengths, budget, 0, groups, prompts)
    count = hooks.max_over_ranks(len(bins))
    if count > len(bins):
        bins = token_budget_bins(lengths, budget, count, groups, prompts)
    if len(bins) != count:  # fewer rows here than micro-batches elsewhere: cannot match the other ranks' forwards
        raise RuntimeError(
            f"micro_batch_tokens: {len(rows)} rows on this rank make {len(bins)} micro-batches, another rank runs "
            f"{count}; raise micro_batch_tokens"
        )
    return [rows[b.to(rows.device)] for b in bins]


def micro_batch_weights(
    micro: list[Tensor], response_mask: Tensor, loss_fn: PolicyLoss, advantages: Tensor
) -> tuple[list[float], float]:
    """(the aggregation weights of the micro-batches ``micro`` of one mini-batch, the weights' sum)."""
    weights = [loss_fn.aggregation_weight(response_mask[i], advantages[i]) for i in micro]
    return weights, sum(weights) or 1.0


@torch.no_grad()
def sampled_logprobs(token_stats: StatsFn, rollouts: Rollouts, micro: list[Tensor]) -> Tensor:
    """Log-probs [N, R] of the sampled tokens under the model behind ``token_stats`` (no grad), over the row
    micro-batches ``micro``, in the dtype of the model's log-probs (float32 for float32 and bfloat16 models,
    float64 for float64 ones)."""
    mask = rollouts.response_mask
    out = None
    for idx in micro:
        lp = token_stats(rollouts.rows(idx), 0).logprobs
        if out is None:
            out = torch.zeros(mask.shape, dtype=lp.dtype, device=mask.device)
        out[idx, : lp.shape[1]] = lp
    return out if out is not None else torch.zeros(mask.shape, device=mask.device)


def accumulate_gradients(
    loss_fn: PolicyLoss,
    rollouts: Rollouts,
    scores: Tensor,
    advantages: Tensor,
    rows: Tensor,
    hooks: UpdateHooks,
    schedule: UpdateSchedule,
    metrics: dict[str, float],
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    diagnostics: dict[str, float] | None = None,
    mismatch: MismatchMeter | None = None,
) -> None:
    """Accumulate into the parameters' ``.grad`` the gradient of ``loss_fn`` over the rollout ``rows`` (one
    mini-batch), micro-batch by micro-batch; add the weighted loss metrics into ``metrics``.

    ``scores`` [N]: the verifier's scores (what a loss calls correct: SimKO); ``advantages`` [N]. ``old_logprobs``
    [N, R]: None means the rows are used by the policy that sampled them (ratio 1, the current log-probs detached).
    ``diagnostics``: when given (and ``hooks.diagnose`` is set), each micro-batch's diagnostic token sums are added
    into it. ``hooks.backward`` runs on each scaled loss, inside ``hooks.no_sync()`` for all but the last
    micro-batch (DDP: one gradient all-reduce per mini-batch). A non-finite loss raises before anything is applied.

    When the engine reported ``rollouts.sampler_logprobs``: ``mismatch`` (if given) accumulates the sampler-trainer
    mismatch of these rows (old log-probs vs the sampler's), and an enabled ``schedule.correction`` hands the loss
    its importance weights (``is_weights``) and adds ``rollout/is_weight_mean`` / ``rollout/is_capped_frac``.
    """
    top_k = loss_fn.top_k if schedule.stats_top_k is None else schedule.stats_top_k
    correction = schedule.correction
    micro = split_rows(rows, rollouts, schedule, hooks)
    weights, total_weight = micro_batch_weights(micro, rollouts.loss_mask, loss_fn, advantages)
    for i, (idx, w) in enumerate(zip(micro, weights)):
        stats = hooks.token_stats(rollouts.rows(idx), top_k)
        if hooks.diagnose is not None and diagnostics is not None:
            for k, v in hooks.diagnose(stats).items():  # token sums (rows without loss too): they add up
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
            scores=scores[idx],
            ref_logprobs=ref_logprobs[idx, :R] if ref_logprobs is not None else None,
            is_weights=is_weights,
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()}{schedule.where}, micro-batch {i}: "
                f"metrics {out.metrics}. Stopping before the optimizer applies it."
            )
        with hooks.no_sync() if i < len(micro) - 1 else nullcontext():
            hooks.backward(out.loss * (w / total_weight))
        for k, v in out.metrics.items():
            metrics[k] += v * w / total_weight


def update_policy(
    loss_fn: PolicyLoss,
    rollouts: Rollouts,
    scores: Tensor,
    advantages: Tensor,
    hooks: UpdateHooks,
    schedule: UpdateSchedule,
) -> tuple[dict[str, float], dict[str, float]]:
    """All ``ppo_epochs x num_mini_batches`` optimizer updates of one RL step.

    ``rollouts``: the step batch (rows without loss: ``loss_rows``); ``scores`` [N]: their verifier scores;
    ``advantages`` [N]: from the rewards (:meth:`PolicyLoss.compute_advantages`). ``hooks.diagnose`` sees the
    statistics of the first mini-batch, under the policy that sampled the rollouts. Returns (loss metrics and
    ``grad_norm`` averaged over the updates, the diagnostics' token sums over the first mini-batch).

    When the engine reported ``rollouts.sampler_logprobs``, the metrics also hold the sampler-trainer mismatch of
    the whole batch (``rollout/logp_abs_diff``, ``rollout/ratio_outside_frac``, ``rollout/seq_kl``,
    ``rollout/seq_kl_k1``; :mod:`simko.correction`), measured against the old log-probs (the policy that
    sampled), and ``schedule.correction`` (off by default) reweights every token's PPO term by its importance
    weight.
    """
    if hooks.optimizer_step is None or hooks.zero_grad is None:
        raise ValueError("update_policy needs hooks.optimizer_step and hooks.zero_grad")
    # Old log-probs are needed only if some token is used after the policy has moved.
    needs_old = schedule.ppo_epochs * schedule.num_mini_batches > 1
    device = rollouts.response_mask.device
    reference = hooks.reference_stats
    every_row = []
    if needs_old or reference is not None:
        every_row = split_rows(torch.arange(rollouts.num_rows, device=device), rollouts, schedule, hooks)
    old_logprobs = sampled_logprobs(hooks.token_stats, rollouts, every_row) if needs_old else None
    ref_logprobs = sampled_logprobs(reference, rollouts, every_row) if reference is not None else None
    generator = torch.Generator().manual_seed(schedule.shuffle_seed)
    batches = minibatch_rows(
        rollouts.num_rows, rollouts.group_size, schedule.ppo_epochs, schedule.num_mini_batches, generator, device
    )
    metrics: dict[str, float] = defaultdict(float)
    diagnostics: dict[str, float] = defaultdict(float)
    mismatch = MismatchMeter() if rollouts.sampler_logprobs is not None else None
    if mismatch is not None and old_logprobs is not None:  # the old log-probs of every row exist already
        mismatch.add(old_logprobs, rollouts.sampler_logprobs, rollouts.response_mask)
    # Otherwise there is one update (ppo_epochs x num_mini_batches == 1): its micro-batches see every row once.
    in_loop = mismatch if old_logprobs is None else None
    for n, rows in enumerate(batches):
        hooks.zero_grad()
        accumulate_gradients(
            loss_fn,
            rollouts,
            scores,
            advantages,
            rows,
            hooks,
            schedule,
            metrics,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            diagnostics=diagnostics if n == 0 else None,
            mismatch=in_loop if n == 0 else None,
        )
        metrics["grad_norm"] += hooks.optimizer_step()
    out = {k: v / max(len(batches), 1) for k, v in metrics.items()}
    if mismatch is not None:
        out.update({f"rollout/{k}": v for k, v in mismatch.result().items()})
    return out, dict(diagnostics)
