"""Overlay several runs: pass@k curves (from eval folders) and concentration curves (from training logs).

    python -m simko.plot runs=[logs/eval/runs/A,logs/eval/runs/B] out=compare.png
    python -m simko.plot runs=[logs/train/runs/X,logs/train/runs/Y] labels=[grpo,simko]

A run folder holding ``pass_at_k.json`` (written by ``simko.eval``) contributes a pass@k curve (log-k axis).
A run folder holding a CSV log (``csv/metrics.csv``, written by ``simko.train``) contributes its concentration
curves: mean p(rank k) of the top-K candidates against the training step, on a log scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def plot_pass_at_k(summaries: dict[str, dict], out: Path, ax=None) -> Path | None:
    """pass@k against k (log2 axis) for each ``{label: pass_at_k.json content}``."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5, 4))
    for label, summary in summaries.items():
        ks = [int(k) for k in summary["pass_at_k"]]
        ax.plot(ks, [summary["pass_at_k"][str(k)] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title("pass@k (unbiased estimator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if own:
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
    return None


def read_training_log(run: Path) -> pd.DataFrame | None:
    files = sorted(run.glob("**/metrics.csv"))
    if not files:
        return None
    frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return frame


def plot_concentration(
    logs: dict[str, pd.DataFrame], ax, ranks=(1, 2, 3, 5, 10), suffix: str = "", colors: dict[str, str] | None = None
) -> None:
    """Mean probability of the rank-k candidate against the RL step (log y): one colour per run, one line style
    per rank (``colors`` maps run labels to colours, default C0, C1, ... in order)."""
    from matplotlib.lines import Line2D

    styles = ["-", "--", ":", "-.", (0, (1, 4))]
    colors = colors or {label: f"C{i}" for i, label in enumerate(logs)}
    for label, frame in logs.items():
        step_col = "train/rl_step" if "train/rl_step" in frame else "step"
        for j, k in enumerate(ranks):
            col = f"diag/p_rank{k}{suffix}"
            if col in frame:
                data = frame[[step_col, col]].dropna()
                ax.plot(data[step_col], data[col], linestyle=styles[j % len(styles)], color=colors[label], lw=1)
    handles = [Line2D([], [], color=colors[label], label=label) for label in logs]
    handles += [
        Line2D([], [], color="gray", linestyle=styles[j % len(styles)], label=f"p(rank {k})")
        for j, k in enumerate(ranks)
    ]
    ax.set_yscale("log")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean probability")
    ax.set_title(
        "p(rank k), " + ("high-entropy tokens (H > 0.8-quantile of the response)" if suffix else "all response tokens"),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="center right", framealpha=0.8)


def plot_runs(runs: list[str], out: str, labels: list[str] | None = None) -> Path:
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    summaries, logs = {}, {}
    for label, run in zip(labels, runs):
        path = Path(run)
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {path} does not exist")
        if (path / "pass_at_k.json").is_file():
            summaries[label] = json.loads((path / "pass_at_k.json").read_text())
        frame = read_training_log(path)
        if frame is not None:
            logs[label] = frame
        if label not in summaries and label not in logs:
            raise FileNotFoundError(
                f"{path} holds neither pass_at_k.json (simko.eval) nor csv/metrics.csv (simko.train)"
            )
    panels = (1 if summaries else 0) + (2 if logs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if summaries:
        plot_pass_at_k(summaries, Path(out), ax=axes.pop(0))
    if logs:
        plot_concentration(logs, axes.pop(0))
        plot_concentration(logs, axes.pop(0), suffix="_hi")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def main() -> None:
    cfg = OmegaConf.from_cli()
    if "runs" not in cfg:
        raise SystemExit("usage: python -m simko.plot runs=[DIR,DIR,...] [labels=[a,b,...]] [out=FILE.png]")
    out = plot_runs(
        [str(r) for r in cfg.runs],
        str(cfg.get("out", "runs.png")),
        [str(x) for x in cfg.labels] if cfg.get("labels") else None,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
