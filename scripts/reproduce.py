"""Toy-scale reproduction of the SimKO claim: pass@k of GRPO, SimKO (paper defaults, and alpha 0.1 / lambda 1.5 as
``simko_strong``), entropy bonus and NSR, all from one warm start.

    python scripts/reproduce.py                      # the whole grid: 5 arms x 3 seeds + the base model
    python scripts/reproduce.py --losses grpo simko --seeds 0 --smoke   # 1 RL step each, n=4: a smoke run

For every (loss, seed) it runs ``python -m simko.train experiment=toy_<loss> seed=S``, then evaluates the last
checkpoint with ``python -m simko.eval`` (n samples per held-out problem); the warm-started base model is evaluated
the same way. It writes ``<out>/results.md`` (pass@k mean +- std over seeds, and the concentration diagnostics
of the model's own samples at evaluation), ``<out>/results.json`` and ``<out>/pass_at_k.png`` (pass@k curves
and p(rank k) against the RL step). Everything runs through the real entry points, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMOOTH_STEPS = 10  # rolling mean of the concentration curves (over RL steps, after the mean over seeds)
LOSSES = ("grpo", "simko", "simko_strong", "entropy_bonus", "nsr")  # experiment=toy_<name> each


EXECUTED: list[str] = []  # the train/eval runs this call executed (finished ones are reused)


def run(module: str, *overrides: str) -> None:
    EXECUTED.append(module)
    cmd = [sys.executable, "-m", module, *overrides]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def mean_std(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}" if len(arr) > 1 else f"{arr.mean():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=64, help="samples per held-out problem")
    parser.add_argument("--problems", type=int, default=256, help="held-out problems evaluated")
    parser.add_argument("--out", default=str(REPO / "logs" / "reproduce"))
    parser.add_argument("--smoke", action="store_true", help="1 RL step per run, n=4, 8 problems")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="more Hydra overrides for every train and eval run (model.*, paths.*, ...)",
    )
    parser.add_argument(
        "--runs-only",
        action="store_true",
        help="train + evaluate the (loss, seed) runs only: no base evaluation, no report (to split "
        "the grid over several processes; a final call without it reuses every finished run)",
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    n, problems = (4, 8) if args.smoke else (args.n, args.problems)
    train_extra = (
        ["rl_steps=1", "trainer.val_check_interval=1", "+trainer.limit_val_batches=1", "data.val_prompts=8"]
        if args.smoke
        else []
    ) + list(args.extra)
    eval_common = ["experiment=toy_eval", f"eval.n={n}", f"eval.limit={problems}", *args.extra]
    start = time.perf_counter()

    runs: dict[str, dict[int, Path]] = {}
    for loss in args.losses:
        for seed in args.seeds:
            run_dir = out / "train" / f"{loss}_seed{seed}"
            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                run(
                    "simko.train",
                    f"experiment=toy_{loss}",
                    f"seed={seed}",
                    f"hydra.run.dir={run_dir}",
                    "ckpt_path=last",  # a run killed earlier continues in its folder (a new one just starts)
                    "callbacks.progress=null",
                    *train_extra,
                )
            eval_dir = out / "eval" / f"{loss}_seed{seed}"
            if not (eval_dir / "pass_at_k.json").is_file():
                run(
                    "simko.eval",
                    *eval_common,
                    f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                    f"seed={seed}",
                    f"hydra.run.dir={eval_dir}",
                )
            runs.setdefault(loss, {})[seed] = run_dir
    if args.runs_only:
        print(f"runs done in {(time.perf_counter() - start) / 60:.1f} min")
        return
    base_dirs = []
    for seed in args.seeds:  # the base model, sampled with the same per-seed sampling streams
        eval_dir = out / "eval" / f"base_seed{seed}"
        if not (eval_dir / "pass_at_k.json").is_file():
            run("simko.eval", *eval_common, f"seed={seed}", f"hydra.run.dir={eval_dir}")
        base_dirs.append(eval_dir)

    results = {"base": [json.loads((d / "pass_at_k.json").read_text()) for d in base_dirs]}
    for loss in args.losses:
        results[loss] = [
            json.loads((out / "eval" / f"{loss}_seed{s}" / "pass_at_k.json").read_text()) for s in args.seeds
        ]
    write_report(results, runs, out, n, problems, args, time.perf_counter() - start)


def write_report(results: dict, runs: dict, out: Path, n: int, problems: int, args, seconds: float) -> None:
    import pandas as pd

    from simko.plot import plot_concentration, plot_pass_at_k

    ks = list(results["base"][0]["pass_at_k"])
    lines = [
        f"pass@k on {problems} held-out problems, n={n} samples each, mean ± std over seeds {args.seeds}",
        "",
        "| model | " + " | ".join(f"pass@{k}" for k in ks) + " |",
        "|---" * (len(ks) + 1) + "|",
    ]
    for name, summaries in results.items():
        cells = [mean_std([s["pass_at_k"][k] for s in summaries]) for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diag_keys = ["p_rank1", "p_rank2", "p_rank3", "p_rank2_hi", "p_rank3_hi", "entropy_mean"]
    lines += [
        "",
        "Concentration on the model's own samples at evaluation (mean over seeds):",
        "",
        "| model | " + " | ".join(diag_keys) + " |",
        "|---" * (len(diag_keys) + 1) + "|",
    ]
    for name, summaries in results.items():
        cells = [f"{np.mean([s['diagnostics'].get(k, np.nan) for s in summaries]):.4g}" for k in diag_keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`python scripts/reproduce.py --losses {' '.join(args.losses)} --seeds "
        f"{' '.join(map(str, args.seeds))}`: this call ran {len(EXECUTED)} train/eval runs in "
        f"{seconds / 60:.1f} min (finished runs under {out} are reused, not rerun).",
        f"Concentration curves in pass_at_k.png: mean over seeds, {SMOOTH_STEPS}-step rolling mean.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    mean_curves = {
        name: {"pass_at_k": {k: float(np.mean([s["pass_at_k"][k] for s in summaries])) for k in ks}}
        for name, summaries in results.items()
    }
    plot_pass_at_k(mean_curves, out / "pass_at_k.png", ax=axes[0])
    logs = {}
    for loss, seeds in runs.items():
        frames = [pd.read_csv(d / "csv" / "metrics.csv") for d in seeds.values()]
        frames = [f[f["train/rl_step"].notna()] for f in frames]
        mean = pd.concat(frames).groupby("train/rl_step", as_index=False).mean(numeric_only=True)
        diag = [c for c in mean if c.startswith("diag/")]
        mean[diag] = mean[diag].rolling(SMOOTH_STEPS, min_periods=1).mean()  # per-step noise hides the trend
        logs[loss] = mean
    colors = {name: f"C{i}" for i, name in enumerate(results)}  # the colours of the pass@k panel (base is C0)
    plot_concentration(logs, axes[1], ranks=(1, 2, 3), colors=colors)
    plot_concentration(logs, axes[2], ranks=(1, 2, 3), suffix="_hi", colors=colors)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)
    plt.close(fig)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'pass_at_k.png'}")


if __name__ == "__main__":
    main()
