"""Sample, score and evaluate: the one path that ``RLVRModule`` (its RL steps and ``validation_step``) and
``simko.eval`` share.

:func:`sample_and_score` samples G completions per example with a rollout engine and scores them with the
examples' verifiers. :class:`SampleMetrics` accumulates over batches of scored samples the unbiased pass@k
(:class:`~simko.metrics.PassAtK`), the solution diversity of the correct samples
(:class:`~simko.metrics.SolutionDiversity`) and the token sums of the probability-concentration diagnostics of the
samples under the policy (:func:`~simko.diagnostics.concentration_sums`); :meth:`SampleMetrics.compute` returns
them over all ranks. A sample is correct when its score is >= 1.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from simko.diagnostics import concentration_over_ranks, concentration_sums
from simko.engines import RolloutEngine, Sampling, tokenize_prompts
from simko.losses.stats import StatsFn
from simko.metrics import PassAtK, SolutionDiversity
from simko.metrics.diversity import grouped_solution_keys
from simko.rollout import Rollouts

# (completions, gold answers, verifier names) -> one score per completion (simko.rewards.score_batch)
Scorer = Callable[[list[str], list[str], list[str]], list[float]]


def sample_and_score(
    engine: RolloutEngine,
    tokenizer,
    examples: Sequence[dict],
    group_size: int,
    sampling: Sampling,
    score: Scorer,
    max_prompt_tokens: int | None = None,
    device=None,
) -> tuple[Rollouts, Tensor, dict[str, float]]:
    """``group_size`` completions of each example's ``prompt`` (prompt-major), scored against its ``answer`` by
    its ``verifier``: (rollouts, scores [N] float32 on ``device``, ``time/generate`` and ``time/score``)."""
    t0 = time.perf_counter()
    prompt_ids = tokenize_prompts(tokenizer, [ex["prompt"] for ex in examples], max_prompt_tokens)
    rollouts = engine.generate(prompt_ids, group_size, sampling)
    t1 = time.perf_counter()
    answers = [ex["answer"] for ex in examples for _ in range(group_size)]
    names = [ex["verifier"] for ex in examples for _ in range(group_size)]
    scores = torch.tensor(score(rollouts.completions, answers, names), dtype=torch.float32, device=device)
    t2 = time.perf_counter()
    return rollouts, scores, {"time/generate": t1 - t0, "time/score": t2 - t1}


class SampleMetrics(torch.nn.Module):
    """pass@k, solution diversity and concentration diagnostics of scored samples, accumulated batch by batch.

    A module so that it moves with its owner's device; its metric states are not persistent (never in a
    checkpoint).

    Args:
        ks: the k of pass@k (each <= the samples per problem).
        diagnostics_top_k: ranks of the concentration diagnostics (0: none computed).
        diagnostics_tau: entropy quantile (per response) above which a token counts as high-entropy.
    """

    def __init__(self, ks: Sequence[int], diagnostics_top_k: int = 0, diagnostics_tau: float = 0.8):
        super().__init__()
        self.pass_at_k = PassAtK(ks=ks)
        self.diversity = SolutionDiversity()
        self.diagnostics_top_k = diagnostics_top_k
        self.diagnostics_tau = diagnostics_tau
        self.diagnostic_sums: dict[str, float] = defaultdict(float)

    @property
    def update_count(self) -> int:
        return self.pass_at_k.update_count

    def update(
        self,
        examples: Sequence[dict],
        rollouts: Rollouts,
        scores: Tensor,
        token_stats: StatsFn,
        micro_batch_size: int,
        diagnostic_rows: Tensor | None = None,
    ) -> Tensor:
        """Add one batch: ``rollouts`` of ``examples`` (n per example, prompt-major) and their ``scores`` [N].

        ``token_stats(rows, top_k)`` is the policy's forward for the diagnostics, run over ``diagnostic_rows``
        (default: every row) in micro-batches of ``micro_batch_size``. Returns ``correct`` [P, n].
        """
        n = rollouts.group_size
        correct = scores.view(-1, n) >= 1.0
        self.pass_at_k.update(correct)
        self.diversity.update(*grouped_solution_keys(examples, rollouts.completions, correct))
        if self.diagnostics_top_k:
            if diagnostic_rows is None:
                diagnostic_rows = torch.arange(rollouts.num_rows, device=scores.device)
            for idx in diagnostic_rows.split(micro_batch_size):
                stats = token_stats(rollouts.rows(idx), self.diagnostics_top_k)
                for key, value in concentration_sums(stats, self.diagnostics_tau).items():
                    self.diagnostic_sums[key] += value  # token sums: the means are over all diagnosed tokens
        return correct

    def take(self) -> dict:
        """This process's accumulated state, per problem, then reset: ``{"counts": [c per problem],
        "diversity": {name: value per problem (one problem: a float)}, "diagnostic_sums": {key: token sum}}``.
        What ``simko.eval`` records for each problem, so that any set of problems is summarized later."""
        counts = torch.cat(self.pass_at_k.counts).tolist() if self.pass_at_k.counts else []
        diversity = {}
        for name in self.diversity.NAMES:
            state = getattr(self.diversity, name)
            values = torch.cat(state).tolist() if state else []
            diversity[name] = values[0] if len(values) == 1 else values
        sums = dict(self.diagnostic_sums)
        self.pass_at_k.reset()
        self.diversity.reset()
        self.diagnostic_sums.clear()
        return {"counts": counts, "diversity": diversity, "diagnostic_sums": sums}

    def compute(self, strategy=None, device=None) -> tuple[dict, dict[str, float], dict[str, float]]:
        """(pass@k ``{k: mean, "mean@n": mean}``, diversity, diagnostics) over every rank's samples (torchmetrics'
        sync; the diagnostics' sums through the Lightning ``strategy``), then reset for the next evaluation."""
        pass_at_k = self.pass_at_k.compute()
        self.pass_at_k.reset()
        diversity = self.diversity.compute()
        self.diversity.reset()
        diagnostics = concentration_over_ranks(dict(self.diagnostic_sums), strategy, device)
        self.diagnostic_sums.clear()
        return pass_at_k, diversity, diagnostics
