"""Solution diversity beside pass@k: how many *different* correct solutions a policy finds, and how evenly.

pass@k says whether some sample is right; it does not say whether the right samples are one path repeated or
many. For each problem with n samples, of which the correct ones are mapped to a *solution key* (what counts
as the same solution is the task's business: ``register_solution_key``):

- ``distinct_correct``: the number of distinct keys among the correct samples (0 when none is correct);
- ``solution_entropy``: the Shannon entropy (nats) of the empirical key distribution of the correct samples,
  ``-sum_s p_s log p_s`` with ``p_s`` = share of the correct samples that are solution ``s``; 0 when all correct
  samples are one solution; averaged over the problems with at least one correct sample only;
- ``solution_coverage``: ``distinct_correct / num_solutions`` where the problem's number of solutions is known
  (e.g. from a brute-force solver), averaged over those problems.

All three depend on n (more samples find more solutions): compare them at equal n. A verifier without a
registered key falls back to the completion text with whitespace runs collapsed, i.e. distinct correct
*completions* (for a task with one short answer per problem that is 1 for every solved problem).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from simko.registry import Registry

SolutionKey = Callable[[str, str], "str | None"]
# The solution keys by verifier name, registered next to their verifiers (the modules of simko.rewards).
SOLUTION_KEYS: Registry[SolutionKey] = Registry("solution key", ("simko.rewards",))

_WHITESPACE = re.compile(r"\s+")


def register_solution_key(name: str) -> Callable[[SolutionKey], SolutionKey]:
    """Register ``f(completion, answer) -> key | None`` for the verifier ``name`` (None: not a correct solution)."""
    return SOLUTION_KEYS.register(name)


def text_key(completion: str, answer: str) -> str:
    """The fallback key: the completion with whitespace runs collapsed to one space, stripped."""
    return _WHITESPACE.sub(" ", completion).strip()


def solution_keys(
    completions: Sequence[str],
    answers: Sequence[str],
    verifier_names: Sequence[str],
    correct: Sequence[bool],
) -> list[str | None]:
    """The solution key of every correct completion, None for the incorrect ones."""
    if not len(completions) == len(answers) == len(verifier_names) == len(correct):
        raise ValueError(
            f"{len(completions)} completions, {len(answers)} answers, {len(verifier_names)} verifier names, "
            f"{len(correct)} verdicts"
        )
    keys: list[str | None] = []
    for completion, answer, name, ok in zip(completions, answers, verifier_names, correct):
        keys.append(SOLUTION_KEYS.get(name, text_key)(completion, answer) if ok else None)
    return keys


def grouped_solution_keys(
    examples: Sequence[dict], completions: Sequence[str], correct: Tensor
) -> tuple[list[list[str | None]], list[int | None]]:
    """Per problem: the solution keys of its n samples and its number of solutions (None where unknown), for
    ``SolutionDiversity.update``. ``completions`` are prompt-major (n per example); ``correct`` is ``[P, n]``."""
    n = correct.shape[1]
    flags = correct.reshape(-1).tolist()
    answers = [ex["answer"] for ex in examples for _ in range(n)]
    names = [ex["verifier"] for ex in examples for _ in range(n)]
    keys = solution_keys(completions, answers, names, flags)
    return [keys[i * n : (i + 1) * n] for i in range(len(examples))], [ex.get("num_solutions") for ex in examples]


def problem_diversity(keys: Sequence[str | None], num_solutions: int | None = None) -> dict[str, float]:
    """``distinct_correct``, ``solution_entropy`` (NaN without a correct sample) and ``solution_coverage`` (NaN
    when ``num_solutions`` is unknown) of one problem's samples; ``keys`` as from ``solution_keys``."""
    counts = Counter(key for key in keys if key is not None)
    total = sum(counts.values())
    entropy = 0.0 - sum(c / total * math.log(c / total) for c in counts.values()) if total else float("nan")
    coverage = len(counts) / num_solutions if num_solutions else float("nan")
    return {"distinct_correct": float(len(counts)), "solution_entropy": entropy, "solution_coverage": coverage}


class SolutionDiversity(Metric):
    """Mean ``distinct_correct``, ``solution_entropy`` and ``solution_coverage`` over problems (module docstring).

    ``update(keys, num_solutions)`` takes one list of solution keys per problem (None for incorrect samples) and
    optionally each problem's number of solutions (None where unknown). Per-problem values are concatenated
    across ranks, so the distributed value equals the single-process one over the union of problems.
    """

    full_state_update = False
    NAMES = ("distinct_correct", "solution_entropy", "solution_coverage")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.NAMES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, keys: Sequence[Sequence[str | None]], num_solutions: Sequence[int | None] | None = None) -> None:
        if num_solutions is None:
            num_solutions = [None] * len(keys)
        if len(num_solutions) != len(keys):
            raise ValueError(f"{len(keys)} problems but {len(num_solutions)} solution counts")
        rows = [problem_diversity(k, s) for k, s in zip(keys, num_solutions)]
        for name in self.NAMES:
            getattr(self, name).append(torch.tensor([row[name] for row in rows], dtype=torch.float64))

    def compute(self) -> dict[str, float]:
        out = {}
        for name in self.NAMES:
            state = getattr(self, name)
            values = state if isinstance(state, Tensor) else (torch.cat(state) if state else torch.zeros(0))
            values = values[~torch.isnan(values)]
            out[name] = float(values.mean()) if values.numel() else float("nan")
        return out
