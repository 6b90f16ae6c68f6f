"""Cover@τ (Dragoi et al. 2025, "Beyond Pass@k: Breadth-Depth Metrics for Reasoning Boundaries", arXiv 2510.08325).

    Cover@τ = (1 / T) Σ_i 1[p_i ≥ τ]

the share of the T problems whose success rate p_i is at least τ, with p_i estimated by the empirical rate
c_i / n of the n samples (c_i correct). It is a curve over τ ∈ [0, 1]: low τ is breadth (problems solved at
all), high τ depth (problems solved reliably). pass@k with k → ∞ counts every problem with p_i > 0 as solved,
which on tasks with few possible answers includes problems the model only guesses right now and then; Cover@τ
at τ well above the guessing rate does not. pass@k = ∫ Cover@τ · Beta(1, k) density dτ (the paper's identity):
the larger k, the more its weight sits near τ = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_taus(taus: Sequence[float]) -> list[float]:
    taus = [float(t) for t in taus]
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"cover@tau needs thresholds tau in [0, 1], got {taus}")
    return sorted(set(taus))


def per_problem_cover(counts: Sequence[int] | np.ndarray, n: int, taus: Sequence[float]) -> np.ndarray:
    """``[problems, len(taus)]`` indicators 1[c / n ≥ τ] (float64, for means and the bootstrap).

    Compared as c ≥ ceil(τ n) in integers (a tolerance of 1e-9 for τ n that is an integer in exact arithmetic,
    e.g. 0.3 x 10), so c / n = τ counts as covered whatever the float rounding of τ."""
    c = np.asarray(counts, dtype=np.int64)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"cover@tau needs 0 <= c <= n = {n} for every problem")
    need = np.ceil(np.asarray(check_taus(taus) if len(taus) else [], dtype=np.float64) * n - 1e-9)
    return (c[:, None] >= need[None, :]).astype(np.float64)


def cover_at_tau(counts: Sequence[int] | np.ndarray, n: int, taus: Sequence[float] = DEFAULT_TAUS) -> dict[str, float]:
    """``{"τ": Cover@τ}``: the mean over problems of ``per_problem_cover``."""
    taus = check_taus(taus)
    values = per_problem_cover(counts, n, taus).mean(0)
    return {tau_key(t): float(v) for t, v in zip(taus, values)}


def tau_key(tau: float) -> str:
    """The JSON key of a threshold: '0.1', '0.25', '1'."""
    return f"{float(tau):g}"
