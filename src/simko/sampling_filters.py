"""What of an RL step's sampled batch is trained on, and with which reward: zero-variance groups, dynamic sampling
(DAPO), masking of truncated completions (TRL) and DAPO's soft overlong punishment.

``RLVRModule.training_step`` samples and scores the step's prompts, then builds its :class:`StepBatch` with
:func:`assemble_step_batch`. Two words keep apart what is measured and what is optimized: a response's **score** is
its verifier's verdict, and its **reward** is the score plus the reward terms here (the overlong penalty), which is
what the advantages see. A loss that asks whether a response is correct (SimKO) reads the score.

1. **Zero-variance groups** are counted: groups whose G verifier scores are all equal (``max - min <= tolerance``,
   not ``std != 0``: scores computed in floating point can differ by rounding). Their group-centred advantages are
   0, so they train nothing but still dilute a token mean.
2. **Dynamic sampling** (:class:`DynamicSampling`, DAPO, Yu et al. 2025, arXiv 2503.14476; verl's
   ``algorithm.filter_groups``): drop the zero-variance groups and refill the batch from extra generation rounds,
   at most ``max_extra_generations`` of them. Round ``k`` of RL step ``s`` samples the prompts of the data module's
   refill stream for ``(s, k)`` (``PromptDataModule.refill_examples``, a stream of its own, so the main stream is
   untouched) with a seed hashed from (run seed, s, rank, k) (:func:`refill_seed`): the batch of a step stays a pure
   function of (seed, step, rank, world size) and the policy, so a resumed run trains what the uninterrupted run
   trained. Each rank filters its own share; after every round the ranks agree (one boolean all-reduce) on whether
   any of them is still short, so all ranks run the same number of rounds (generation under FSDP and the DDP
   all-reduces stay in lockstep). The first ``P`` informative groups (in draw order) are kept. When the budget runs
   out first, the rank trains on what it has: the missing slots are filled with zero-variance groups whose rows get
   no loss (the batch keeps its shape, so every rank makes the same optimizer steps; counted as
   ``train/unfilled_groups``). verl stops the run with an error there instead.
3. **Truncated completions** (no EOS within ``max_new_tokens``) get no loss when ``mask_truncated`` is set (TRL's
   ``mask_truncated_completions``); they still count in their group's advantage baseline, as in TRL.
4. **Overlong punishment** (:class:`OverlongPenalty`, DAPO's soft overlong punishment; verl's ``DAPORewardManager``
   with ``overlong_buffer``): a reward term that falls linearly from 0 at ``max_new_tokens - buffer`` tokens to
   ``-penalty_factor`` at ``max_new_tokens``, added to the verifier score: the reward the advantages see.

Rows without loss keep their place in the batch (:func:`mask_rows`: ``Rollouts.loss_rows``): they contribute no
token to the loss, its aggregation weights or the KL term, and are still seen by the diagnostics (``diag/*`` describe
every sampled token).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from simko.rollout import Rollouts, build_rollouts


@dataclass(frozen=True)
class DynamicSampling:
    """``module.dynamic_sampling``: DAPO's dynamic sampling (see the module docstring).

    Args:
        enabled: drop zero-variance groups and refill the batch (off: only count them).
        max_extra_generations: extra generation rounds per RL step at most (each samples the rank's share of
            prompts again, G rollouts each); 0 drops without refilling.
        tolerance: scores of a group that differ by at most this count as equal (also for the logged
            ``train/zero_var_groups``).
    """

    enabled: bool = False
    max_extra_generations: int = 3
    tolerance: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"module.dynamic_sampling.enabled={self.enabled!r}: must be true or false")
        if isinstance(self.max_extra_generations, bool) or not isinstance(self.max_extra_generations, int):
            raise ValueError(
                f"module.dynamic_sampling.max_extra_generations={self.max_extra_generations!r}: must be an integer"
            )
        if self.max_extra_generations < 0:
            raise ValueError(
                f"module.dynamic_sampling.max_extra_generations={self.max_extra_generations}: must be >= 0"
            )
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance >= 0:
            raise ValueError(f"module.dynamic_sampling.tolerance={self.tolerance!r}: must be a number >= 0")


@dataclass(frozen=True)
class OverlongPenalty:
    """``module.overlong``: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl ``overlong_buffer``).

    With L the response length in tokens (EOS included), L_max = ``max_new_tokens`` and B = ``buffer``:
    penalty = 0 for L <= L_max - B, ((L_max - B) - L) / B * penalty_factor for L_max - B < L <= L_max.
    A truncated response (L = L_max) gets ``-penalty_factor``.

    Args:
        buffer: the punished interval in tokens (DAPO: 4096 of 20480); None: off.
        penalty_factor: the penalty at L_max (DAPO: 1.0).
    """

    buffer: int | None = None
    penalty_factor: float = 1.0

    def __post_init__(self):
        if self.buffer is not None and (isinstance(self.buffer, bool) or not isinstance(self.buffer, int)):
            raise ValueError(f"module.overlong.buffer={self.buffer!r}: must be an integer number of tokens or null")
        if self.buffer is not None and self.buffer < 1:
            raise ValueError(f"module.overlong.buffer={self.buffer}: must be >= 1 (null turns the penalty off)")
        factor = self.penalty_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0:
            raise ValueError(f"module.overlong.penalty_factor={factor!r}: must be a number >= 0")

    @property
    def enabled(self) -> bool:
        return self.buffer is not None

    def check(self, max_new_tokens: int) -> None:
        if self.enabled and self.buffer > max_new_tokens:
            raise ValueError(
                f"module.overlong.buffer={self.buffer}: longer than rollout.max_new_tokens={max_new_tokens}, so "
                "every response would be punished; the buffer is the last part of max_new_tokens"
            )

    def penalty(self, lengths: Tensor, max_new_tokens: int) -> Tensor:
        """The (<= 0) reward term of responses of ``lengths`` tokens [N]."""
        if not self.enabled:
            return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
        expected = max_new_tokens - self.buffer
        excess = lengths.float() - expected
        return torch.clamp(-excess / self.buffer * float(self.penalty_factor), max=0.0)


def zero_variance(scores: Tensor, tolerance: float) -> Tensor:
    """[P] bool: the groups (rows of ``scores`` [P, G]) whose scores all lie within ``tolerance`` of each other."""
    return (scores.max(dim=1).values - scores.min(dim=1).values) <= tolerance


def refill_seed(seed: int, step: int, rank: int, round_: int) -> int:
    """The sampling seed of extra generation round ``round_`` (>= 1) of RL step ``step`` on ``rank``: a hash, so it
    collides with no main-stream seed (``simko.engines.step_seed``) of this or another run seed."""
    digest = hashlib.blake2b(f"refill/{seed}/{step}/{rank}/{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)


def check_filter_config(module_cfg, max_new_tokens: int | None) -> None:
    """The knobs of ``module.dynamic_sampling``, ``module.mask_truncated`` and ``module.overlong`` (start-up check,
    before anything is built); raises ValueError naming the key."""
    knob_group(DynamicSampling, module_cfg.get("dynamic_sampling"))
    mask = module_cfg.get("mask_truncated", False)
    if not isinstance(mask, bool):
        raise ValueError(f"module.mask_truncated={mask!r}: must be true or false")
    overlong = knob_group(OverlongPenalty, module_cfg.get("overlong"))
    if isinstance(max_new_tokens, int):
        overlong.check(max_new_tokens)


def knob_group(cls, values, key: str = ""):
    """A knob group (:class:`DynamicSampling`, :class:`OverlongPenalty`) given as itself, a mapping (Hydra) or None
    (the defaults); an unknown knob is refused by name."""
    if isinstance(values, cls):
        return values
    key = key or {DynamicSampling: "module.dynamic_sampling", OverlongPenalty: "module.overlong"}[cls]
    values = dict(values or {})
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        known = ", ".join(f.name for f in fields(cls))
        raise ValueError(f"{key}: unknown knob(s) {unknown}; its knobs: {known}")
    return cls(**values)


def check_refill_source(dynamic_sampling: DynamicSampling, datamodule) -> None:
    """Dynamic sampling draws its extra rounds from ``datamodule.refill_examples``: refuse at fit start without it."""
    if (
        dynamic_sampling.enabled
        and dynamic_sampling.max_extra_generations
        and not callable(getattr(datamodule, "refill_examples", None))
    ):
        raise ValueError(
            "module.dynamic_sampling.enabled=true refills the batch from the data module's refill_examples(step, "
            f"round), which {type(datamodule).__name__} does not have (use simko.data.PromptDataModule, or set "
            "module.dynamic_sampling.max_extra_generations=0 to only drop zero-variance groups)"
        )


def mask_rows(rollouts: Rollouts, keep: Tensor) -> Rollouts:
    """The same rollouts with the rows where ``keep`` [N] is False carrying no loss (``Rollouts.loss_rows``)."""
    if bool(keep.all()):
        return rollouts
    keep = keep.to(rollouts.response_mask.device)
    if rollouts.loss_rows is not None:
        keep = keep & rollouts.loss_rows
    return replace(rollouts, loss_rows=keep)


def take_groups(parts: list[Rollouts], picks: list[tuple[int, int]], tokenizer, eos_token_ids: list[int]) -> Rollouts:
    """The groups ``picks`` = [(part, group), ...] of several :class:`Rollouts` as one, in that order.

    Rebuilt from the sampled ids by :func:`simko.rollout.build_rollouts` (padding, masks, ``truncated``,
    completions as every engine builds them); the picks of one part, in its own order, return that part itself.
    """
    first = parts[picks[0][0]] if picks else parts[0]
    G = first.group_size
    if all(p == picks[0][0] for p, _ in picks) and [g for _, g in picks] == list(range(first.num_rows // G)):
        return first
    prompt_ids, response_ids, logprobs = [], [], []
    with_logprobs = all(part.sampler_logprobs is not None for part in parts)
    for p, g in picks:
        part = parts[p]
        P = part.prompt_len
        row = g * G
        prompt_ids.append(part.input_ids[row, :P][part.attention_mask[row, :P].bool()].tolist())
        for r in range(row, row + G):
            mask = part.response_mask[r]
            response_ids.append(part.response_tokens[r][mask].tolist())
            if with_logprobs:
                logprobs.append(part.sampler_logprobs[r][mask].tolist())
    return build_rollouts(
        tokenizer,
        prompt_ids,
        response_ids,
        G,
        eos_token_ids,
        sampler_logprobs=logprobs if with_logprobs else None,
        device=first.input_ids.device,
    )


@dataclass
class StepBatch:
    """What the update of one RL step trains on.

    rollouts: the trained groups (rows without loss: ``loss_rows``); scores: their verifier scores [N] (what a
    loss calls correct); rewards: scores plus the overlong penalty [N] (what the advantages see); examples: their
    prompts' examples; metrics: ``train/*`` of the filters.
    """

    rollouts: Rollouts
    scores: Tensor
    rewards: Tensor
    examples: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)


# Metrics that are counts: summed over ranks when logged (the others are averaged).
SUMMED_METRICS = ("zero_var_groups", "kept_groups", "unfilled_groups", "masked_truncated")

# (round >= 1) -> (rollouts, scores [N], examples) of an extra generation round of this rank
DrawFn = Callable[[int], tuple[Rollouts, Tensor, list[dict]]]
# this rank's "still short" -> whether any rank is (a collective: every rank calls it the same number of times)
AnyRankFn = Callable[[bool], bool]


def assemble_step_batch(
    rollouts: Rollouts,
    scores: Tensor,
    examples: list[dict],
    *,
    max_new_tokens: int,
    tokenizer,
    eos_token_ids: list[int],
    dynamic_sampling: DynamicSampling = DynamicSampling(),
    mask_truncated: bool = False,
    overlong: OverlongPenalty = OverlongPenalty(),
    draw: DrawFn | None = None,
    any_rank: AnyRankFn = bool,
) -> StepBatch:
    """The step's batch from its first generation (``rollouts``, ``scores`` [N], ``examples``; see the module
    docstring). ``draw(k)`` samples and scores extra round k (needed when dynamic sampling is on); ``any_rank``
    tells whether any rank is still short of informative groups (single process: ``bool``)."""
    G = rollouts.group_size
    num_groups = rollouts.num_rows // G
    zero = zero_variance(scores.view(-1, G), dynamic_sampling.tolerance)
    metrics = {
        "zero_var_groups": float(zero.sum()),
        "zero_var_frac": float(zero.float().mean()),
        "truncated_frac": float(rollouts.truncated.float().mean()),
    }
    keep_rows = torch.ones(rollouts.num_rows, dtype=torch.bool, device=scores.device)
    if dynamic_sampling.enabled:
        if draw is None:
            raise ValueError("dynamic sampling needs draw(round), the extra generation rounds")
        parts, part_scores, part_examples = [rollouts], [scores], [examples]
        informative = [(0, g) for g in range(num_groups) if not zero[g]]
        filler = [(0, g) for g in range(num_groups) if zero[g]]
        rounds = 0
        while rounds < dynamic_sampling.max_extra_generations and any_rank(len(informative) < num_groups):
            rounds += 1
            more, more_scores, more_examples = draw(rounds)
            parts.append(more)
            part_scores.append(more_scores)
            part_examples.append(more_examples)
            more_zero = zero_variance(more_scores.view(-1, G), dynamic_sampling.tolerance)
            informative += [(rounds, g) for g in range(len(more_zero)) if not more_zero[g]]
            filler += [(rounds, g) for g in range(len(more_zero)) if more_zero[g]]
        kept = informative[:num_groups]
        unfilled = filler[: num_groups - len(kept)]
        picks = sorted(kept + unfilled)
        rollouts = take_groups(parts, picks, tokenizer, eos_token_ids)
        scores = torch.cat([part_scores[p][g * G : (g + 1) * G] for p, g in picks])
        examples = [part_examples[p][g] for p, g in picks]
        unfilled_set = set(unfilled)
        keep_rows = torch.tensor([pick not in unfilled_set for pick in picks], device=scores.device)
        keep_rows = keep_rows.repeat_interleave(G)
        metrics.update(
            dynamic_sampling_rounds=float(rounds), kept_groups=float(len(kept)), unfilled_groups=float(len(unfilled))
        )
    if mask_truncated:
        keep_rows = keep_rows & ~rollouts.truncated.to(keep_rows.device)
        metrics["masked_truncated"] = float(rollouts.truncated.sum())
    rewards = scores
    if overlong.enabled:
        penalty = overlong.penalty(rollouts.response_mask.sum(1), max_new_tokens).to(scores.device)
        rewards = scores + penalty
        metrics["overlong_penalty"] = float(penalty.mean())
        metrics["overlong_frac"] = float((penalty < 0).float().mean())
    return StepBatch(mask_rows(rollouts, keep_rows), scores, rewards, examples, metrics)
