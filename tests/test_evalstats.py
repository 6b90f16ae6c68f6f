"""Evaluation statistics: bootstrap intervals (over problems, seeds, paired), cover@τ, per-problem transitions
against a baseline, and the pass@1-against-pass@k frontier figure, on synthetic counts and run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from simko import plot
from simko.metrics import PassAtK
from simko.metrics.cover import cover_at_tau, per_problem_cover
from simko.metrics.transitions import read_counts, run_transitions, transitions
from simko.metrics.uncertainty import (
    bootstrap,
    count_statistics,
    paired_bootstrap,
    per_problem_pass_at_k,
    summarize_counts,
)


def _counts(rng, problems: int, n: int, a: float = 0.7, b: float = 1.3) -> np.ndarray:
    """Correct counts of ``problems`` problems whose success probabilities are drawn from Beta(a, b)."""
    return rng.binomial(n, rng.beta(a, b, size=problems))


# --- intervals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, problems", [(4, 3), (16, 37), (64, 200), (1024, 50)])
def test_point_estimates_equal_the_reported_pass_at_k_exactly(n, problems):
    rng = np.random.default_rng(n)
    correct = torch.from_numpy(rng.random((problems, n)) < rng.beta(0.5, 1.5, size=problems)[:, None])
    ks = [k for k in (1, 2, 4, 8, 16, 64, 256, 1024) if k <= n]
    metric = PassAtK(ks=ks)
    metric.update(correct)
    reported = metric.compute()  # what simko.eval writes into pass_at_k.json
    stats = summarize_counts([correct.sum(1).numpy()], n, ks, [0.5])
    assert stats["pass_at_k"] == {str(k): reported[k] for k in ks}  # bit for bit
    for k in ks:
        low, high = stats["pass_at_k_ci95"][str(k)]
        assert low <= reported[k] <= high
    # Several seeds: the mean over seeds of each seed's reported pass@k, as the reports average them.
    seeds = [_counts(rng, problems, n) for _ in range(3)]
    per_seed = []
    for c in seeds:
        metric = PassAtK(ks=ks)
        metric.update(torch.arange(n)[None, :] < torch.from_numpy(c)[:, None])
        per_seed.append(metric.compute())
    two_level = summarize_counts(seeds, n, ks, [0.5])
    assert two_level["pass_at_k"] == {str(k): float(np.mean([r[k] for r in per_seed])) for k in ks}
    assert two_level["bootstrap"]["seeds"] == 3 and "seeds, then problems" in two_level["bootstrap"]["scheme"]


def _beta_pass_at_k(a: float, b: float, k: int) -> float:
    """E[1 - (1 - p)^k] for p ~ Beta(a, b): 1 - B(a, b + k) / B(a, b)."""
    log_ratio = math.lgamma(b + k) + math.lgamma(a + b) - math.lgamma(b) - math.lgamma(a + b + k)
    return 1.0 - math.exp(log_ratio)


def test_problem_bootstrap_covers_the_population_pass_at_k_95_percent_of_the_time():
    """200 held-out sets of 100 problems drawn from one population: the 95 % intervals of pass@1 and pass@4 hold
    the population's value in 90-98.5 % of them (binomial noise of 200 trials: ± 3 %)."""
    rng = np.random.default_rng(0)
    a, b, n, ks = 0.7, 1.3, 16, [1, 4]
    truth = np.array([_beta_pass_at_k(a, b, k) for k in ks])
    hits = np.zeros(len(ks))
    trials = 200
    for trial in range(trials):
        values = per_problem_pass_at_k(_counts(rng, 100, n, a, b), n, ks)
        result = bootstrap(values, resamples=1000, seed=trial)
        hits += (result["low"] <= truth) & (truth <= result["high"])
    coverage = hits / trials
    assert ((0.90 <= coverage) & (coverage <= 0.985)).all(), coverage


def test_two_level_bootstrap_widens_with_seed_spread_and_reduces_to_problems_with_equal_seeds():
    rng = np.random.default_rng(1)
    values = per_problem_pass_at_k(_counts(rng, 150, 16), 16, [1, 16])
    one = bootstrap(values, resamples=500, seed=3)
    same = bootstrap(np.stack([values] * 4), resamples=500, seed=3)  # 4 seeds that agree on every problem
    for key in ("point", "low", "high"):
        np.testing.assert_allclose(same[key], one[key], rtol=0, atol=1e-12)
    shifts = np.array([-0.15, -0.05, 0.05, 0.15])[:, None, None]  # seeds that differ by a whole 0.3
    spread = bootstrap(np.clip(values[None] + shifts, 0, 1), resamples=500, seed=3)
    assert (spread["high"] - spread["low"])[0] > 1.5 * (one["high"] - one["low"])[0]  # pass@1 (pass@16 is near 1)


def test_bootstrap_is_seeded_and_the_resamples_are_a_knob():
    values = per_problem_pass_at_k(_counts(np.random.default_rng(2), 80, 8), 8, [1, 8])
    first, again = bootstrap(values, resamples=300, seed=7), bootstrap(values, resamples=300, seed=7)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    other = bootstrap(values, resamples=300, seed=8)
    assert not np.array_equal(first["low"], other["low"])
    assert summarize_counts([[1, 2]], 4, [1], [], resamples=123)["bootstrap"]["resamples"] == 123
    with pytest.raises(ValueError, match="resamples"):
        bootstrap(values, resamples=0)
    with pytest.raises(ValueError, match="seeds, problems, statistics"):
        bootstrap(np.zeros(5))


def test_paired_bootstrap_of_identical_arms_is_zero_and_pairing_removes_the_shared_spread():
    rng = np.random.default_rng(4)
    seeds = np.stack([per_problem_pass_at_k(_counts(rng, 120, 16), 16, [1, 4, 16]) for _ in range(3)])
    same = paired_bootstrap(seeds, seeds.copy(), resamples=500)
    assert (same["point"] == 0).all() and (same["low"] <= 0).all() and (same["high"] >= 0).all()
    assert np.abs(same["high"] - same["low"]).max() < 1e-12  # width ~0
    shifted = paired_bootstrap(np.clip(seeds + 0.05, 0, 1), seeds, resamples=500)
    unpaired_width = bootstrap(seeds, resamples=500)["high"] - bootstrap(seeds, resamples=500)["low"]
    assert ((shifted["high"] - shifted["low"]) < 0.5 * unpaired_width).all()  # the problems' spread cancels
    assert (shifted["low"] > 0).all()
    with pytest.raises(ValueError, match="same seeds x problems"):
        paired_bootstrap(seeds, seeds[:, :-1])


# --- cover@tau ---------------------------------------------------------------------------------------------------


def test_cover_at_tau_is_the_share_of_problems_with_success_rate_at_least_tau():
    counts, n = [0, 1, 3, 5, 10], 10  # rates 0, 0.1, 0.3, 0.5, 1
    assert cover_at_tau(counts, n, [0.0, 0.1, 0.3, 0.31, 0.5, 1.0]) == {
        "0": 1.0, "0.1": 0.8, "0.3": 0.6, "0.31": 0.4, "0.5": 0.4, "1": 0.2,
    }  # fmt: skip  # c/n = τ counts (0.3 x 10 is 3.0000000000000004 in floats)
    assert per_problem_cover([7], 10, [0.7]).tolist() == [[1.0]]
    with pytest.raises(ValueError, match=r"tau in \[0, 1\]"):
        cover_at_tau(counts, n, [1.5])
    with pytest.raises(ValueError, match="0 <= c <= n"):
        cover_at_tau([11], n, [0.5])


def test_pass_at_k_of_the_empirical_rates_is_the_beta_1_k_weighted_integral_of_cover():
    """The paper's identity, on the empirical rates p_i = c_i / n: mean_i 1 - (1 - p_i)^k = ∫ Cover@τ k (1-τ)^(k-1)
    dτ; the weight of large k sits near τ = 0, where guessing counts."""
    counts, n, k = _counts(np.random.default_rng(6), 300, 32), 32, 8
    plug_in = np.mean(1 - (1 - counts / n) ** k)
    taus = np.linspace(0, 1, 20001)
    cover = per_problem_cover(counts, n, taus).mean(0)
    density = k * (1 - taus) ** (k - 1)
    integral = np.sum((cover * density)[1:] * np.diff(taus))  # right Riemann sum: cover is left-continuous steps
    assert integral == pytest.approx(plug_in, abs=2e-3)


def test_summary_carries_cover_and_intervals_beside_pass_at_k():
    stats = summarize_counts([[0, 2, 4, 4]], 4, [1, 4], [0.5, 1.0], resamples=200)
    assert stats["cover_at_tau"] == {"0.5": 0.75, "1": 0.5}  # pass@1 ("1") and cover@1 ("1") stay apart
    assert stats["pass_at_k"] == {"1": 0.625, "4": 0.75}
    assert set(stats["cover_at_tau_ci95"]) == {"0.5", "1"}
    names, values = count_statistics([[0, 2, 4, 4]], 4, [1, 4], [0.5, 1.0])
    assert names == ["pass@1", "pass@4", "cover@0.5", "cover@1"] and values.shape == (1, 4, 4)


# --- run folders: transitions and the frontier -------------------------------------------------------------------


def _eval_folder(folder: Path, counts, n: int, ids=None, ckpt: str | None = None) -> Path:
    """A simko.eval run folder: per_problem.csv (id, c, n and the other columns) and its pass_at_k.json."""
    folder.mkdir(parents=True)
    ids = list(ids if ids is not None else range(len(counts)))
    rows = [{"id": i, "c": int(c), "n": n, "answer": "1", "extracted": "[]", "prompt": "p", "sample_completion": "",
             "sample_correct": 0} for i, c in zip(ids, counts)]  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "per_problem.csv", index=False)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    summary = summarize_counts([counts], n, ks, [0.5, 1.0])
    summary |= {"n": n, "num_problems": len(counts), "config": {"ckpt_path": ckpt, "dataset": "countdown_steps",
                "split": "test", "eval": {"temperature": 1.0, "top_p": 1.0}}}  # fmt: skip
    (folder / "pass_at_k.json").write_text(json.dumps(summary))
    return folder


def test_transitions_count_problems_that_change_hands():
    # problem:            0  1  2  3  4  5
    base = np.array([0, 0, 8, 8, 1, 5])  # n = 8
    run = np.array([0, 6, 8, 0, 0, 5])
    rows = transitions(run, 8, base, 8, ks=[1, 8])
    by = {(r["criterion"], r["k"]): r for r in rows}
    # pass@1 >= 0.5 (c/n >= 0.5): base solves 2, 3, 5; the run 1, 2, 5
    assert by["pass@k>=0.5", 1] == {"criterion": "pass@k>=0.5", "k": 1, "solved_both": 2, "newly_solved": 1,
                                         "newly_unsolved": 1, "unsolved_both": 2, "net": 0, "problems": 6}  # fmt: skip
    # c > 0: base solves 2, 3, 4, 5; the run 1, 2, 5
    four = ("solved_both", "newly_solved", "newly_unsolved", "unsolved_both")
    assert [by["c>0", None][c] for c in four] == [2, 1, 2, 1]
    assert by["pass@k>=0.5", 8]["newly_unsolved"] == 2  # at k = n pass@k >= 0.5 is c > 0
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        transitions(run, 8, np.minimum(base, 4), 4, ks=[8])


def test_transitions_command_matches_problems_by_id_prints_and_writes_csv(tmp_path, capsys):
    base = _eval_folder(tmp_path / "base", [0, 4, 2, 0], 4, ids=["a", "b", "c", "d"])
    run = _eval_folder(tmp_path / "run", [4, 0, 3, 0], 4, ids=["d", "c", "b", "a"])  # another order
    rows = run_transitions(run, base, ks=[1])
    # pass@1 >= 0.5: the baseline solves b, c; the run b, d
    assert [rows[0][c] for c in ("solved_both", "newly_solved", "newly_unsolved", "unsolved_both")] == [1, 1, 1, 1]
    assert rows[-1]["criterion"] == "c>0" and rows[-1]["newly_solved"] == 1 and rows[-1]["newly_unsolved"] == 1
    out = tmp_path / "t.csv"
    plot.main(["transitions", f"run={run}", f"baseline={base}", "ks=[1,4]", f"out={out}"])
    printed = capsys.readouterr().out
    assert "newly_solved" in printed and "c>0" in printed and f"wrote {out}" in printed
    table = pd.read_csv(out)
    assert table["criterion"].tolist() == ["pass@k>=0.5", "pass@k>=0.5", "c>0"] and table["problems"].eq(4).all()
    other = _eval_folder(tmp_path / "other", [1, 1, 1], 4, ids=["a", "b", "x"])
    with pytest.raises(ValueError, match="evaluated different problems"):
        run_transitions(other, base)
    with pytest.raises(FileNotFoundError, match="per_problem.csv"):
        read_counts(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: .*evaluated different problems"):  # the command: one line
        plot.main(["transitions", f"run={other}", f"baseline={base}"])
    with pytest.raises(SystemExit, match="usage"):
        plot.main(["transitions", f"run={run}"])


def test_frontier_has_seeds_as_points_with_intervals_and_means_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(7)
    runs, labels = [], []
    for arm, (a, b) in {"grpo": (2.0, 2.0), "simko": (1.0, 1.5)}.items():
        for seed in range(3):
            runs.append(_eval_folder(tmp_path / f"{arm}_seed{seed}", _counts(rng, 40, 32, a, b), 32))
            labels.append(arm)
    groups = plot.group_runs(runs, labels)
    points = plot.frontier_points(groups, [16], resamples=200)
    assert len(points["grpo"]["seeds"]) == 3 and points["simko"]["mean"] is not None
    for label, group in points.items():
        for run, cell in zip(groups[label], group["seeds"]):
            summary = json.loads((run / "pass_at_k.json").read_text())
            assert cell["pass@1"][0] == summary["pass_at_k"]["1"] and cell["pass@16"][0] == summary["pass_at_k"]["16"]
            assert cell["pass@16"][1] <= cell["pass@16"][0] <= cell["pass@16"][2]
        mean = np.mean([cell["pass@16"][0] for cell in group["seeds"]])
        assert group["mean"]["pass@16"][0] == pytest.approx(mean, abs=1e-15)
    # the axes hold every interval and zoom in on them, within [-0.01, 1.01]
    (xlo, xhi), (ylo, yhi) = plot.frontier_limits(points, 16)
    cells = [c for g in points.values() for c in [*g["seeds"], g["mean"]]]
    assert xlo <= min(c["pass@1"][1] for c in cells) and xhi >= max(c["pass@1"][2] for c in cells)
    assert ylo <= min(c["pass@16"][1] for c in cells) and yhi >= max(c["pass@16"][2] for c in cells)
    assert -0.01 <= xlo and xhi <= 1.01 and -0.01 <= ylo and yhi <= 1.01
    clustered = {"a": {"seeds": [{"pass@1": [0.25, 0.24, 0.26], "pass@16": [0.8, 0.78, 0.82]}], "mean": None}}
    (xlo, xhi), (ylo, yhi) = plot.frontier_limits(clustered, 16)
    assert xhi - xlo < 0.1 and yhi - ylo < 0.1
    assert plot.frontier_ks(1024) == [16, 256] and plot.frontier_ks(64) == [16] and plot.frontier_ks(8) == [8]
    with pytest.raises(ValueError, match="every k must be in"):
        plot.frontier_ks(32, [64])
    out = tmp_path / "frontier.png"
    plot.main(["frontier", f"runs=[{','.join(map(str, runs))}]", f"labels=[{','.join(labels)}]", f"out={out}",
               "resamples=200"])  # fmt: skip
    assert out.stat().st_size > 5000 and f"wrote {out}" in capsys.readouterr().out


def test_plot_runs_adds_a_cover_panel_and_a_single_evaluation_shows_its_interval(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(8)
    runs = [_eval_folder(tmp_path / f"r{i}", _counts(rng, 30, 8), 8) for i in range(2)]
    out = plot.plot_runs([str(r) for r in runs], str(tmp_path / "p.png"), ["a", "b"])
    assert out.stat().st_size > 5000
    summary = json.loads((runs[0] / "pass_at_k.json").read_text())
    fig, ax = plt.subplots()
    plot.plot_pass_at_k({"a": summary}, ax=ax)
    (band,) = ax.collections  # the interval over problems, not a std over seeds (there is one seed)
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(min(lo for lo, _ in summary["pass_at_k_ci95"].values()))
    assert high == pytest.approx(max(hi for _, hi in summary["pass_at_k_ci95"].values()))
    assert ax.get_legend_handles_labels()[1] == ["a (95 % CI)"]
    plt.close(fig)
