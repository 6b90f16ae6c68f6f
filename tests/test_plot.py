"""simko.plot: runs grouped into seeds with bands, labels from what differs, one row per RL step, output under logs/."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from simko import plot


def _train_run(folder: Path, overrides: list[str], reward: float, layout: str = "sparse") -> Path:
    """A fake simko.train run folder: .hydra/overrides.yaml and csv/metrics.csv in today's sparse layout (val and
    LR on rows of their own) or one row per RL step."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "csv").mkdir()
    if layout == "sparse":
        rows = [{"step": 0, "val/pass@1": 0.1}]  # validation before the first RL step
        for s in (1, 2, 3, 4):
            rows.append({"step": s - 1, "train/rl_step": s, "train/reward": reward + s / 100, "diag/p_rank1": 0.8})
            rows.append({"step": s - 1, "lr-AdamW": 1e-3})
            if s % 2 == 0:
                rows.append({"step": s - 1, "val/pass@1": 0.1 + s / 10})
    else:
        rows = [{"train/rl_step": s, "train/reward": reward + s / 100, "val/pass@1": 0.1 + s / 10} for s in (1, 2)]
    pd.DataFrame(rows).to_csv(folder / "csv" / "metrics.csv", index=False)
    return folder


def _eval_run(folder: Path, ckpt: Path | None, pass1: float, temperature: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    summary = {
        "pass_at_k": {"1": pass1, "2": pass1 + 0.1, "4": pass1 + 0.2},
        "n": 4,
        "num_problems": 200,
        "config": {"ckpt_path": str(ckpt) if ckpt else None, "data": "simko.data.countdown_steps.CountdownStepsSource",
                   "dataset": "countdown_steps", "split": "test", "eval": {"temperature": temperature, "top_p": 1.0}},
    }  # fmt: skip
    (folder / "pass_at_k.json").write_text(json.dumps(summary))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(f"- ckpt_path={ckpt}\n- eval.n=4\n" if ckpt else "- eval.n=4\n")
    return folder


def test_training_log_is_one_row_per_rl_step_with_validation_at_its_step(tmp_path):
    run = _train_run(tmp_path / "run", ["loss=grpo"], 0.2)
    frame = plot.read_training_log(run)
    assert list(frame.index) == [0, 1, 2, 3, 4]
    assert frame["val/pass@1"].dropna().to_dict() == {0: 0.1, 2: pytest.approx(0.3), 4: pytest.approx(0.5)}
    assert frame.loc[3, "train/reward"] == pytest.approx(0.23) and frame.loc[3, "lr-AdamW"] == 1e-3
    dense = plot.read_training_log(_train_run(tmp_path / "dense", ["loss=grpo"], 0.2, layout="dense"))
    assert list(dense.index) == [1, 2] and dense.loc[2, "val/pass@1"] == pytest.approx(0.3)


def test_labels_name_what_differs_and_seeds_group(tmp_path):
    runs = [
        _train_run(
            tmp_path / f"2026-01-0{i}_12-00-00",
            ["experiment=testbed", f"loss={loss}", f"seed={seed}", f"hydra.run.dir=/x/{i}"],
            0.2,
        )  # fmt: skip
        for i, (loss, seed) in enumerate([("grpo", 0), ("grpo", 1), ("simko", 0), ("simko", 1)])
    ]
    groups = plot.group_runs(runs)
    assert {label: len(members) for label, members in groups.items()} == {"grpo": 2, "simko": 2}
    ckpt = runs[2] / "checkpoints" / "step000040.ckpt"
    evals = [_eval_run(tmp_path / "e1", ckpt, 0.3), _eval_run(tmp_path / "e2", None, 0.2)]
    assert plot.default_labels(evals) == ["testbed simko step000040", "base"]
    with pytest.raises(ValueError, match="labels"):
        plot.group_runs(runs, labels=["a"])


def test_pass_at_k_bands_title_and_clamped_axis(tmp_path):
    summaries = [json.loads((_eval_run(tmp_path / f"e{i}", None, p) / "pass_at_k.json").read_text())
                 for i, p in enumerate((0.2, 0.4))]  # fmt: skip
    fig, ax = plt.subplots()
    plot.plot_pass_at_k({"grpo": summaries}, ax=ax)
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_xscale() == "log"
    assert ax.get_title() == "pass@k: countdown_steps/test, 200 problems, n=4, T=1.0, top-p=1.0"
    (line,) = ax.get_lines()
    assert np.allclose(line.get_ydata(), [0.3, 0.4, 0.5])  # the mean over seeds
    assert len(ax.collections) == 1  # the ± std band
    assert line.get_label() == "grpo (2 seeds)"
    hot = json.loads((_eval_run(tmp_path / "hot", None, 0.2, temperature=0.6) / "pass_at_k.json").read_text())
    assert "T=" not in plot.describe_eval([summaries[0], hot])  # a setting that differs is not in the title
    plt.close(fig)


def test_plot_runs_writes_under_logs_by_default_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr("simko.config.PROJECT_ROOT", tmp_path)
    runs = [_train_run(tmp_path / f"r{i}", [f"loss={loss}", f"seed={i}"], 0.2 + i / 10)
            for i, loss in enumerate(["grpo", "grpo", "simko"])]  # fmt: skip
    runs.append(_eval_run(tmp_path / "ev", runs[0] / "checkpoints" / "last.ckpt", 0.3))
    first = plot.plot_runs([str(r) for r in runs[:3]], baseline="grpo")
    second = plot.plot_runs([str(r) for r in runs[:3]])
    assert first.parent == second.parent == tmp_path / "logs" / "plots" and first != second
    assert first.stat().st_size > 1000 and second.stat().st_size > 1000
    out = plot.plot_runs([str(r) for r in runs], out=str(tmp_path / "mixed.png"), labels=["a", "a", "b", "c"])
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="baseline"):
        plot.plot_runs([str(r) for r in runs[:3]], baseline="nsr")
