"""``PassAtK``: a torchmetrics Metric accumulating per-problem correctness and reporting mean pass@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from simko.metrics.pass_at_k import pass_at_k_tensor


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [n]


class PassAtK(Metric):
    """Mean unbiased pass@k over problems, plus mean@n.

    ``update(correct)`` takes a bool tensor ``[num_prompts, n]`` (n samples per prompt, the same n for every
    update). ``compute()`` returns ``{k: mean pass@k}`` for the configured ``ks`` and ``"mean@n"``. The state
    (per-problem correct counts) is concatenated across ranks, so the distributed value equals the
    single-process one over the union of problems.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8), **kwargs):
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        self.ks = sorted({int(k) for k in ks})
        self.add_state("counts", default=[], dist_reduce_fx="cat")
        self.add_state("n", default=torch.tensor(0), dist_reduce_fx="max")

    def update(self, correct: Tensor) -> None:
        if correct.dim() != 2:
            raise ValueError(f"PassAtK.update expects a bool tensor [num_prompts, n], got {tuple(correct.shape)}")
        n = correct.shape[1]
        if max(self.ks) > n:
            raise ValueError(
                f"pass@k with k={max(self.ks)} > n={n} samples per problem is undefined; "
                f"sample more or drop k (ks={self.ks})"
            )
        if int(self.n) not in (0, n):
            raise ValueError(f"PassAtK got n={n} samples per problem after n={int(self.n)}; keep n fixed")
        self.n = torch.tensor(n, device=self.n.device)
        self.counts.append(correct.bool().sum(1).to(torch.int64))

    def compute(self) -> dict:
        counts = (
            self.counts
            if isinstance(self.counts, Tensor)
            else (torch.cat(self.counts) if self.counts else torch.zeros(0, dtype=torch.int64))
        )
        n = int(self.n)
        if counts.numel() == 0:
            return {k: float("nan") for k in self.ks} | {"mean@n": float("nan")}
        out = {k: float(pass_at_k_tensor(counts, n, k).mean()) for k in self.ks}
        out["mean@n"] = float(counts.double().mean() / n)
        return out


def majority_at_n(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """maj@n: the share of problems whose most frequent extracted answer (ties: first seen) is correct.

    ``answers[p][i]`` is the extracted answer of sample i of problem p (None when nothing was extracted) and
    ``correct[p][i]`` its verdict; the majority answer's verdict is that of any sample carrying it.
    """
    hits = 0
    for ans, ok in zip(answers, correct):
        votes = Counter(a for a in ans if a is not None)
        if not votes:
            continue
        top = max(votes, key=lambda a: (votes[a], -ans.index(a)))
        hits += bool(ok[ans.index(top)])
    return hits / max(len(answers), 1)
