"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, the probability that at least one of k samples drawn without
replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form never forms a binomial coefficient, so it is exact in float64 for n in the thousands.
It is 1 exactly when n - c < k (every k-subset holds a correct sample) and 0 exactly when c = 0.
The bootstrap "best@k" of some peers (verl #7240) is biased low: only this estimator is offered.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct out of ``n`` samples."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    if c == 0:
        return 0.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_tensor(correct_counts: Tensor, n: int, k: int) -> Tensor:
    """Vectorised :func:`pass_at_k` over problems: ``correct_counts`` [P] (ints), same n for all -> [P] float64."""
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    c = correct_counts.to(torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)  # 1..n
    # log prod_{i=n-c+1}^{n} (1 - k/i): include factor i iff i > n - c, and only where 1 - k/i > 0
    factors = torch.log1p(-k / i).clamp(min=-torch.inf)  # -inf where i == k
    include = i[None, :] > (n - c)[:, None]
    log_fail = torch.where(include, factors[None, :], torch.zeros_like(factors)[None, :]).sum(1)
    out = 1.0 - torch.exp(log_fail)
    out = torch.where(n - c < k, torch.ones_like(out), out)
    return torch.where(c == 0, torch.zeros_like(out), out)
