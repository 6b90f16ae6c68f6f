"""Plots a researcher keeps: pass@k and training curves of several runs, with error bands over seeds.

    python -m simko.plot runs=[logs/eval/runs/A,logs/eval/runs/B] out=compare.png
    python -m simko.plot runs=[R1,R2,R3,R4] labels=[grpo,grpo,simko,simko] baseline=grpo

Runs with the same label are seeds of one method: their curves are drawn as the mean with a band of ± one
standard deviation over seeds. Without ``labels`` a run is named after what differs between the given runs (their
Hydra overrides, the seed aside, so seeds group by themselves; an evaluation is named after the checkpoint's
training run). A run folder holding ``pass_at_k.json`` (``simko.eval``) gives a pass@k curve (log-k axis, titled
with the held-out set, n, temperature and top-p); one holding a CSV log (``csv/metrics.csv``, ``simko.train``)
gives the reward and validation pass@k against the RL step and the concentration curves, mean p(rank k) (log
scale). With ``baseline=LABEL`` the concentration panels show log10 p(rank k) relative to that method and a
panel of pass@k differences is added: overlapping curves become readable, and so does their absence.
An evaluation with cover@τ in its ``pass_at_k.json`` adds the cover@τ curve as a panel.
Without ``out`` the figure goes to ``logs/plots/<date>_<time>.png`` of the project (never overwritten).

Two more modes read the evaluations' ``per_problem.csv``:

    python -m simko.plot frontier runs=[R1,R2,R3,R4] labels=[grpo,grpo,simko,simko] ks=[16,256]
    python -m simko.plot transitions run=logs/eval/runs/B baseline=logs/eval/runs/A ks=[1,16,256]

``frontier``: pass@1 against pass@k (one panel per k; default k = 16 and 256 where n allows, else the largest k),
every seed a point with its 95 % intervals over problems, every method's mean over seeds a diamond with its
interval over seeds and problems (``simko.metrics.uncertainty``). ``transitions``: the problems a run solves and
its baseline does not, and back, at each k (``simko.metrics.transitions``): printed, and written as CSV to
``out`` (default ``logs/plots/<date>_<time>_transitions.csv``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

# Line styles and markers of the ranks in the concentration panels: told apart in print and in greyscale.
RANK_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]
RANK_MARKERS = ["o", "s", "^", "D", "v"]
# Overrides that say where a run ran, not what it is: never part of a label.
_INFRA_PREFIXES = ("hydra.", "paths.", "callbacks.", "trainer.devices", "logger", "ckpt_path", "seed=")


# --- reading runs ---------------------------------------------------------------------------------------------


def read_summary(run: Path) -> dict | None:
    path = Path(run) / "pass_at_k.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_training_log(run: Path) -> pd.DataFrame | None:
    """The run's CSV metrics (all ``metrics.csv`` under it: a resumed run has several), one row per RL step.

    The index is the RL step. Rows without ``train/rl_step`` (validation, learning rate) belong to the last RL
    step logged before them, or to step 0 before the first one (validation before training).
    """
    files = sorted(Path(run).glob("**/metrics.csv"))
    if not files:
        return None
    frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    if "train/rl_step" not in frame:
        return frame.set_index("step") if "step" in frame else frame
    step = frame["train/rl_step"].ffill().fillna(0).astype(int)
    return frame.drop(columns=["train/rl_step"]).groupby(step.values).last().rename_axis("rl_step")


def run_overrides(run: Path) -> list[str]:
    """The Hydra overrides a run was started with (``.hydra/overrides.yaml``), or []."""
    path = Path(run) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _identity(run: Path) -> list[str]:
    """What a run is: its overrides without the infrastructure ones; an evaluation adds its checkpoint's run."""
    run = Path(run)
    own = [o for o in run_overrides(run) if not o.startswith(_INFRA_PREFIXES)]
    summary = read_summary(run)
    if summary is not None:
        ckpt = summary.get("config", {}).get("ckpt_path")
        if not ckpt:
            return ["base", *own]
        ckpt = Path(ckpt)
        trained = _identity(ckpt.parent.parent) or [ckpt.parent.parent.name]
        return [*trained, *([] if ckpt.stem == "last" else [ckpt.stem]), *own]
    return own


def default_labels(runs: Sequence[Path]) -> list[str]:
    """One label per run: the parts of its identity that not all runs of its kind (evaluations, training runs)
    share, seeds aside; else its whole identity, else its folder name. An evaluation of a checkpoint and the
    training run that wrote it get the same label, so they plot as one method."""
    runs = [Path(r) for r in runs]
    identities = [_identity(r) for r in runs]
    kinds = [read_summary(r) is not None for r in runs]
    labels = []
    for run, identity, kind in zip(runs, identities, kinds):
        same_kind = [i for i, k in zip(identities, kinds) if k == kind]
        shared = set.intersection(*(set(i) for i in same_kind)) if len(same_kind) > 1 else set()
        parts = [p.removeprefix("experiment=").removeprefix("loss=") for p in identity if p not in shared]
        labels.append(" ".join(parts) or " ".join(identity) or run.name)
    return labels


def group_runs(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """``{label: [run, ...]}`` in first-seen order; runs sharing a label are seeds of one method."""
    runs = [Path(r) for r in runs]
    labels = list(labels) if labels else default_labels(runs)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    groups: dict[str, list[Path]] = {}
    for label, run in zip(labels, runs):
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        groups.setdefault(str(label), []).append(run)
    return groups


def describe_eval(summaries: Sequence[dict]) -> str:
    """'countdown_steps/test, 200 problems, n=256, T=1.0, top-p=1.0': the settings all the summaries share (one that
    differs between them is left out here and shows in the labels)."""
    settings = {
        "held-out": _held_out,
        "problems": lambda s: s.get("num_problems"),
        "n": lambda s: s.get("n"),
        "T": lambda s: s.get("config", {}).get("eval", {}).get("temperature"),
        "top-p": lambda s: s.get("config", {}).get("eval", {}).get("top_p"),
    }
    parts = []
    for name, get in settings.items():
        values = {json.dumps(get(s)) for s in summaries}
        value = json.loads(values.pop()) if len(values) == 1 else None
        if value is not None:
            parts.append({"held-out": str(value), "problems": f"{value} problems"}.get(name, f"{name}={value}"))
    return ", ".join(parts)


def _held_out(summary: dict) -> str | None:
    """The evaluated set: 'countdown_steps/test' (data config name and split), else the data class name."""
    config = summary.get("config", {})
    dataset = config.get("dataset") or str(config.get("data", "")).rsplit(".", 1)[-1] or None
    split = config.get("split")
    return f"{dataset}/{split}" if dataset and split else dataset


# --- drawing --------------------------------------------------------------------------------------------------


def band(ax, x, rows, color, label=None, linestyle="-", marker=None, alpha=0.2, lw=1.5, interval=None) -> None:
    """Mean of ``rows`` (one row per seed) against ``x``, with a ± one standard deviation band (>= 2 seeds), or
    with ``interval`` (``[(low, high)]`` per x, e.g. a bootstrap interval) as the band where given."""
    values = np.asarray(rows, dtype=float).reshape(-1, len(x))
    mean = np.nanmean(values, axis=0)
    ax.plot(x, mean, color=color, label=label, linestyle=linestyle, marker=marker, markersize=3, lw=lw)
    if interval is not None:
        low, high = np.asarray(interval, dtype=float).T
        ax.fill_between(x, low, high, color=color, alpha=alpha, lw=0)
    elif values.shape[0] > 1:
        std = np.nanstd(values, axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, lw=0)


def colors_for(labels: Sequence[str]) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def plot_pass_at_k(
    groups: dict[str, list[dict] | dict],
    out: Path | None = None,
    ax=None,
    colors: dict[str, str] | None = None,
    intervals: dict[str, dict[str, list[float]]] | None = None,
) -> Path | None:
    """pass@k against k (log2 axis): mean ± std over each group's summaries (``pass_at_k.json`` contents; a single
    summary is a group of one, drawn with its 95 % interval over problems where it has one). ``intervals``
    (``{label: {k: [low, high]}}``, e.g. over seeds and problems) replace a group's band. Draws into ``ax``, or
    into a figure of its own saved to ``out``."""
    groups = {label: value if isinstance(value, list) else [value] for label, value in groups.items()}
    colors = colors or colors_for(list(groups))
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, summaries in groups.items():
        ks = [int(k) for k in summaries[0]["pass_at_k"]]
        rows = [[s["pass_at_k"][str(k)] for k in ks] for s in summaries]
        seeds = f" ({len(summaries)} seeds)" if len(summaries) > 1 else ""
        interval = (intervals or {}).get(label) or (summaries[0].get("pass_at_k_ci95") if len(summaries) == 1 else None)
        interval = [interval[str(k)] for k in ks] if interval else None  # the 95 % interval as the band
        name = f"{label}{seeds}" + (" (95 % CI)" if interval else "")
        band(ax, ks, rows, colors[label], label=name, marker="o", interval=interval)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (unbiased)")
    everything = [s for summaries in groups.values() for s in summaries]
    ax.set_title(("pass@k, bands 95 % CI: " if intervals else "pass@k: ") + describe_eval(everything), fontsize=9)
    ax.grid(alpha=0.3)
    if not own:
        return None
    ax.legend(fontsize=8, loc="lower right")  # pass@k rises with k: the lower right corner stays clear
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def plot_pass_at_k_difference(
    groups: dict[str, list[dict]],
    baseline: str,
    ax,
    colors: dict[str, str] | None = None,
    intervals: dict[str, dict[str, list[float]]] | None = None,
) -> None:
    """pass@k minus the baseline's, paired by position (seed i with seed i): mean ± std of the differences, or
    with ``intervals`` (``{label: {k: [low, high]}}``, the paired bootstrap's) as the bands."""
    colors = colors or colors_for(list(groups))
    base = groups[baseline]
    ks = [int(k) for k in base[0]["pass_at_k"]]
    for label, summaries in groups.items():
        if label == baseline:
            continue
        pairs = list(zip(summaries, base))
        rows = [[s["pass_at_k"][str(k)] - b["pass_at_k"][str(k)] for k in ks] for s, b in pairs]
        interval = [intervals[label][str(k)] for k in ks] if intervals and label in intervals else None
        band(ax, ks, rows, colors[label], label=label, marker="o", interval=interval)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel(f"pass@k − {baseline} (paired by seed)")
    spread = "95 % paired-bootstrap interval" if intervals else "mean ± std over seeds"
    ax.set_title(f"difference to {baseline}, {spread}", fontsize=9)
    ax.grid(alpha=0.3)


def plot_curve(
    logs: dict[str, list[pd.DataFrame]],
    column: str,
    ax,
    colors: dict[str, str] | None = None,
    ylabel: str | None = None,
    probability: bool = True,
    linestyle="-",
    smooth: int = 1,
) -> bool:
    """``column`` against the RL step, mean ± std over each group's runs (rolling mean over ``smooth`` steps).

    Returns False (drawing nothing) when no run has the column."""
    colors = colors or colors_for(list(logs))
    drawn = False
    for label, frames in logs.items():
        series = [f[column].dropna() for f in frames if column in f and f[column].notna().any()]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s.index) for s in series)))  # the steps every seed logged
        rows = [s.loc[steps].rolling(smooth, min_periods=1).mean().to_numpy() for s in series]
        band(ax, steps, rows, colors[label], label=label, linestyle=linestyle)
        drawn = True
    if drawn:
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel or column)
        if probability:
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    return drawn


def plot_concentration(
    logs: dict[str, list[pd.DataFrame]],
    ax,
    ranks=(1, 2, 3),
    suffix: str = "",
    colors: dict[str, str] | None = None,
    baseline: str | None = None,
    smooth: int = 1,
    prefix: str = "diag/",
) -> list[Line2D]:
    """Mean probability of the rank-k candidate against the RL step: one colour per method, one line style and
    marker per rank. Without ``baseline``: p(rank k) on a log axis. With it: log10 p(rank k) − log10 of the
    baseline's p(rank k) at the same step and seed position (0 = no difference), mean ± std over seeds.
    Returns the legend entries of the ranks (for ``method_legend``)."""
    colors = colors or colors_for(list(logs))
    for j, k in enumerate(ranks):
        column = f"{prefix}p_rank{k}{suffix}"
        style = dict(linestyle=RANK_STYLES[j % len(RANK_STYLES)], marker=RANK_MARKERS[j % len(RANK_MARKERS)])
        for label, frames in logs.items():
            if baseline is not None and label == baseline:
                continue
            series = [f[column].dropna() for f in frames if column in f]
            if baseline is not None:
                base = [f[column].dropna() for f in logs[baseline] if column in f]
                series = [np.log10(s) - np.log10(b) for s, b in zip(series, base)]
            series = [s.dropna() for s in series if len(s)]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s.index) for s in series)))
            rows = [s.loc[steps].rolling(smooth, min_periods=1).mean().to_numpy() for s in series]
            band(ax, steps, rows, colors[label], linestyle=style["linestyle"], lw=1.2, alpha=0.12)
            every = max(1, len(steps) // 8)  # a few markers per curve: enough to tell the ranks apart
            ax.plot(steps[::every], np.nanmean(rows, axis=0)[::every], color=colors[label], ls="", ms=4,
                    marker=style["marker"])  # fmt: skip
    where = "high-entropy tokens (H > 0.8-quantile of the response)" if suffix else "all response tokens"
    where = where if baseline is None else where.split(" (")[0]
    if baseline is None:
        ax.set_yscale("log")
        ax.set_ylabel("mean probability")
        ax.set_title(f"p(rank k), {where}", fontsize=9)
    else:
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(f"log10 p(rank k) − {baseline}'s")
        ax.set_title(f"p(rank k) relative to {baseline}, {where}", fontsize=9)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    return [
        Line2D([], [], color="gray", linestyle=RANK_STYLES[j % len(RANK_STYLES)],
               marker=RANK_MARKERS[j % len(RANK_MARKERS)], label=f"p(rank {k})")
        for j, k in enumerate(ranks)
    ]  # fmt: skip


def method_legend(fig, labels: Sequence[str], colors: dict[str, str], styles: Sequence[Line2D] = ()) -> None:
    """One legend for the whole figure, below the panels (never over a curve): the methods' colours, then the
    line styles the panels use (``styles``, duplicates by label dropped)."""
    handles = [Line2D([], [], color=colors[label], lw=2, label=label) for label in labels]
    seen = set()
    for handle in styles:
        if handle.get_label() not in seen:
            seen.add(handle.get_label())
            handles.append(handle)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)


def default_out(suffix: str = ".png") -> Path:
    from simko.config import PROJECT_ROOT

    folder = PROJECT_ROOT / "logs" / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out, i = folder / f"{stamp}{suffix}", 1
    while out.exists():  # never overwrite an earlier figure
        out, i = folder / f"{stamp}_{i}{suffix}", i + 1
    return out


def plot_runs(runs: list[str], out: str | None = None, labels: list[str] | None = None, baseline: str | None = None):
    """The figure of ``python -m simko.plot`` (module docstring); returns its path."""
    groups = group_runs(runs, labels)
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not one of the labels {list(groups)}")
    summaries = {label: [s for s in map(read_summary, members) if s] for label, members in groups.items()}
    summaries = {label: s for label, s in summaries.items() if s}
    logs = {label: [f for f in map(read_training_log, members) if f is not None] for label, members in groups.items()}
    logs = {label: f for label, f in logs.items() if f}
    for label, members in groups.items():
        if label not in summaries and label not in logs:
            raise FileNotFoundError(
                f"{members[0]} holds neither pass_at_k.json (simko.eval) nor csv/metrics.csv (simko.train)"
            )
    colors = colors_for(list(groups))
    panels = []
    if summaries:
        panels.append(lambda ax: plot_pass_at_k(summaries, ax=ax, colors=colors))
        if baseline in summaries and len(summaries) > 1:
            panels.append(lambda ax: plot_pass_at_k_difference(summaries, baseline, ax, colors))
        if any("cover_at_tau" in x for group in summaries.values() for x in group):
            panels.append(lambda ax: plot_cover(summaries, ax, colors))
    if logs:
        relative_to = baseline if baseline in logs else None
        panels.append(lambda ax: _reward_and_val(logs, ax, colors))
        panels.append(lambda ax: plot_concentration(logs, ax, colors=colors, baseline=relative_to))
        panels.append(lambda ax: plot_concentration(logs, ax, suffix="_hi", colors=colors, baseline=relative_to))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    styles = []
    for draw, ax in zip(panels, axes[0]):
        styles += draw(ax) or []
    method_legend(fig, list(groups), colors, styles)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out) if out else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _reward_and_val(logs: dict[str, list[pd.DataFrame]], ax, colors: dict[str, str]) -> list[Line2D]:
    """Train reward (solid), val pass@1 (dashed) and val pass@n (dotted) against the RL step; returns the legend
    entries of the three line styles."""
    handles = []
    if plot_curve(logs, "train/reward", ax, colors):
        handles.append(Line2D([], [], color="gray", label="train reward"))
    frames = [f for fs in logs.values() for f in fs]
    ks = sorted({int(c.split("@")[1]) for f in frames for c in f.columns if c.startswith("val/pass@")})
    for k, style in zip(sorted({ks[0], ks[-1]}) if ks else [], ["--", ":"]):
        if plot_curve(logs, f"val/pass@{k}", ax, colors, linestyle=style):
            handles.append(Line2D([], [], color="gray", linestyle=style, label=f"val pass@{k}"))
    ax.set_ylabel("reward / val pass@k")
    ax.set_title("train reward and validation pass@k", fontsize=9)
    return handles


# --- cover@tau, the frontier, transitions ---------------------------------------------------------------------


def plot_cover(groups: dict[str, list[dict]], ax, colors: dict[str, str] | None = None) -> None:
    """Cover@τ against τ (``cover_at_tau`` of the summaries): mean ± std over each group's seeds."""
    colors = colors or colors_for(list(groups))
    for label, summaries in groups.items():
        summaries = [x for x in summaries if "cover_at_tau" in x]
        if not summaries:
            continue
        taus = list(summaries[0]["cover_at_tau"])
        band(ax, [float(t) for t in taus], [[x["cover_at_tau"][t] for t in taus] for x in summaries], colors[label],
             label=label, marker="o")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("τ (success rate c/n at least)")
    ax.set_ylabel("cover@τ (share of problems)")
    ax.set_title("cover@τ: problems solved at least a share τ of the time", fontsize=9)
    ax.grid(alpha=0.3)


FRONTIER_KS = (16, 256)


def frontier_ks(n: int, ks: Sequence[int] | None = None) -> list[int]:
    """The k of the frontier's panels: ``ks`` (default 16 and 256) up to n; none of them: n itself."""
    if n < 2:
        raise ValueError(f"the frontier needs n >= 2 samples per problem (pass@1 against pass@k), got n={n}")
    chosen = [int(k) for k in (ks or FRONTIER_KS) if 1 < int(k) <= n]
    if ks and len(chosen) < len(ks):
        raise ValueError(f"frontier ks={list(ks)}: every k must be in [2, n={n}] (the smallest n of the runs)")
    return chosen or [n]


def frontier_points(
    groups: dict[str, list[Path]], ks: Sequence[int], resamples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """pass@1 and pass@k with 95 % intervals: each run's (over its problems) and each group's mean over its runs
    (over seeds and problems; the runs' problems matched by id). ``{label: {"seeds": [{"run", "pass@1": [point,
    low, high], "pass@k": ...}], "mean": {...}}}``."""
    from simko.metrics.transitions import align, read_counts
    from simko.metrics.uncertainty import summarize_counts

    ks = [1, *ks]
    out = {}
    for label, runs in groups.items():
        read = [read_counts(run) for run in runs]
        seeds = []
        for run, (_, counts, n) in zip(runs, read):
            stats = summarize_counts([counts], n, ks, [], resamples=resamples, seed=seed)
            seeds.append({"run": str(run), **_frontier_cells(stats, ks)})
        ids0, _, n0 = read[0]
        if len(runs) > 1 and all(n == n0 for _, _, n in read):
            counts = [c[align(ids, ids0, str(run), str(runs[0]))] for run, (ids, c, _) in zip(runs, read)]
            mean = _frontier_cells(summarize_counts(counts, n0, ks, [], resamples=resamples, seed=seed), ks)
        else:
            mean = None
        out[label] = {"seeds": seeds, "mean": mean}
    return out


def _frontier_cells(stats: dict, ks: Sequence[int]) -> dict:
    return {f"pass@{k}": [stats["pass_at_k"][str(k)], *stats["pass_at_k_ci95"][str(k)]] for k in ks}


def frontier_limits(points: dict[str, dict], k: int, margin: float = 0.1) -> tuple[tuple, tuple]:
    """(x limits, y limits) of the pass@1-against-pass@k panel: every point's interval with a margin of ``margin``
    of the span (at least 0.02), within [-0.01, 1.01]. Arms often differ by a few hundredths; on 0..1 axes they
    would sit on top of each other."""
    cells = [cell for group in points.values() for cell in [*group["seeds"], group["mean"]] if cell is not None]

    def limits(key: str) -> tuple[float, float]:
        lo, hi = min(cell[key][1] for cell in cells), max(cell[key][2] for cell in cells)
        pad = max((hi - lo) * margin, 0.02)
        return max(lo - pad, -0.01), min(hi + pad, 1.01)

    return limits("pass@1"), limits(f"pass@{k}")


def plot_frontier(points: dict[str, dict], ks: Sequence[int], out: Path, title: str = "") -> Path:
    """One panel per k: pass@1 (x) against pass@k (y), seeds as points, means over seeds as diamonds, both with
    their 95 % intervals as error bars (``frontier_points``)."""
    colors = colors_for(list(points))
    fig, axes = plt.subplots(1, len(ks), figsize=(5.2 * len(ks), 4.8), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for label, group in points.items():
            marks = [(p, dict(fmt="o", ms=4, alpha=0.55, lw=0.8)) for p in group["seeds"]]
            if group["mean"] is not None:
                marks.append((group["mean"], dict(fmt="D", ms=7, mec="black", lw=1.6)))
            for cell, style in marks:
                (x, xlo, xhi), (y, ylo, yhi) = cell["pass@1"], cell[f"pass@{k}"]
                ax.errorbar(x, y, xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], color=colors[label],
                            capsize=2, **style)  # fmt: skip
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")  # pass@k >= pass@1: points lie above the diagonal
        xlim, ylim = frontier_limits(points, k)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_xlabel("pass@1")
        ax.set_ylabel(f"pass@{k}")
        ax.set_title(f"pass@1 against pass@{k}", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    styles = [
        Line2D([], [], color="gray", marker="o", ls="", label="seed (95 % CI over problems)"),
        Line2D([], [], color="gray", marker="D", mec="black", ls="", label="mean (95 % CI over seeds and problems)"),
    ]
    method_legend(fig, list(points), colors, styles)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_frontier_runs(
    runs: list[str], out: str | None = None, labels: list[str] | None = None, ks: Sequence[int] | None = None,
    resamples: int = 1000,
) -> Path:  # fmt: skip
    """The figure of ``python -m simko.plot frontier`` (module docstring); returns its path."""
    from simko.metrics.transitions import read_counts

    groups = group_runs(runs, labels)
    n = min(read_counts(run)[2] for members in groups.values() for run in members)
    chosen = frontier_ks(n, ks)
    summaries = [s for members in groups.values() for s in map(read_summary, members) if s]
    points = frontier_points(groups, chosen, resamples=resamples)
    return plot_frontier(points, chosen, Path(out) if out else default_out(), describe_eval(summaries))


def transitions_command(run: str, baseline: str, out: str | None = None, ks: Sequence[int] | None = None) -> Path:
    """``python -m simko.plot transitions``: print the table, write it as CSV; returns the CSV's path."""
    from simko.metrics.transitions import COLUMNS, format_table, run_transitions

    rows = run_transitions(run, baseline, ks)
    print(f"transitions of {run} against {baseline} (problems matched by id):")
    print(format_table(rows))
    path = Path(out) if out else default_out("_transitions.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return path


USAGE = """usage:
  python -m simko.plot runs=[DIR,DIR,...] [labels=[a,b,...]] [baseline=LABEL] [out=FILE.png]
  python -m simko.plot frontier runs=[DIR,...] [labels=[a,b,...]] [ks=[16,256]] [resamples=1000] [out=FILE.png]
  python -m simko.plot transitions run=DIR baseline=DIR [ks=[1,16,256]] [out=FILE.csv]"""


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(argv)
    except (FileNotFoundError, ValueError) as err:  # a missing folder, runs that do not match: one line, no traceback
        raise SystemExit(f"error: {err}") from None


def _main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("frontier", "transitions") else None
    cfg = OmegaConf.from_cli(argv)
    ks = [int(k) for k in cfg.ks] if cfg.get("ks") else None
    if mode == "transitions":
        if "run" not in cfg or "baseline" not in cfg:
            raise SystemExit(USAGE)
        out = transitions_command(str(cfg.run), str(cfg.baseline), str(cfg.out) if cfg.get("out") else None, ks)
        print(f"wrote {out}")
        return
    if "runs" not in cfg:
        raise SystemExit(USAGE)
    if mode == "frontier":
        out = plot_frontier_runs(
            [str(r) for r in cfg.runs],
            str(cfg.out) if cfg.get("out") else None,
            [str(x) for x in cfg.labels] if cfg.get("labels") else None,
            ks,
            int(cfg.get("resamples") or 1000),
        )
        print(f"wrote {out}")
        return
    out = plot_runs(
        [str(r) for r in cfg.runs],
        str(cfg.out) if cfg.get("out") else None,
        [str(x) for x in cfg.labels] if cfg.get("labels") else None,
        str(cfg.baseline) if cfg.get("baseline") else None,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
