#!/usr/bin/env python
"""Time the bootstrap of the evaluation intervals: ``simko.metrics.uncertainty.bootstrap`` against
``scipy.stats.bootstrap`` (a script, not a test).

The case is one report's table: per-problem values of ``--stats`` statistics (pass@k for several k, cover@τ for
several τ) on ``--problems`` problems, ``--resamples`` percentile-bootstrap resamples. Three sides, alternating in
one process (the order flips every round), median wall time of each:

* ``ours``: one multinomial draw of problem weights per resample, shared by every statistic, two matrix products;
* ``scipy, per statistic``: ``scipy.stats.bootstrap(method="percentile", vectorized=True)`` once per statistic
  (each statistic gets its own draws: pass@1 and pass@256 no longer share a resample);
* ``scipy, one draw``: one call that resamples problem indices and computes every statistic from them (the way to
  share the draws through scipy's API).

It also prints the largest difference between our interval bounds and scipy's per-statistic ones (different random
draws: Monte Carlo noise of the percentiles, about 1e-3 at 2000 resamples). scipy is not a dependency of the
project: ``pip install scipy`` first. Use ``--threads 1`` on a shared machine.

    python benchmarks/bootstrap.py                                   # 1024 problems x 20 statistics, 2000 resamples
    python benchmarks/bootstrap.py --problems 200 --resamples 1000 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=1024)
    parser.add_argument("--stats", type=int, default=20)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy loads its BLAS

    import numpy as np
    from scipy.stats import bootstrap as scipy_bootstrap

    from simko.metrics.uncertainty import bootstrap

    values = np.random.default_rng(0).random((args.problems, args.stats))

    def ours():
        result = bootstrap(values, resamples=args.resamples, seed=0)
        return result["low"], result["high"]

    def scipy_per_statistic():
        results = [
            scipy_bootstrap((values[:, j],), np.mean, vectorized=True, n_resamples=args.resamples,
                            method="percentile", random_state=0)
            for j in range(args.stats)
        ]  # fmt: skip
        return np.array([r.confidence_interval.low for r in results]), np.array(
            [r.confidence_interval.high for r in results]
        )

    def scipy_one_draw():
        def statistic(index, axis=-1):  # index: [..., problems] -> [stats, ...]
            return np.moveaxis(values[index].mean(axis=-2), -1, 0)

        result = scipy_bootstrap((np.arange(args.problems),), statistic, vectorized=True, n_resamples=args.resamples,
                                 method="percentile", random_state=0)  # fmt: skip
        return result.confidence_interval.low, result.confidence_interval.high

    sides = {"ours": ours, "scipy, per statistic": scipy_per_statistic, "scipy, one draw": scipy_one_draw}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["ours"]))
    print(f"{args.problems} problems x {args.stats} statistics, {args.resamples} resamples, {args.threads} thread(s), "
          f"median of {args.rounds} alternating rounds:")  # fmt: skip
    print("| side | median s | x ours |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts):.3f} | {np.median(ts) / base:.1f} |")
    (low, high), (s_low, s_high) = ours(), scipy_per_statistic()
    print(f"largest |ours - scipy| of the bounds: {max(np.abs(low - s_low).max(), np.abs(high - s_high).max()):.2e}")


if __name__ == "__main__":
    main()
