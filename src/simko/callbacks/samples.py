"""Sample rollouts as text: what the policy wrote, what the verifier extracted, what it was rewarded.

At RL step 1 and every ``every_n_steps`` RL steps after, :class:`RolloutSamples` takes the first
``num_prompts`` prompts of the step's batch (of global rank 0; with all their G completions, or the first
``completions_per_prompt``) from ``RLVRModule.last_rollout`` and writes one row per completion (``extracted``: the
final answer as the example's verifier reads it, ``simko.rewards.final_answer``; None where it reads none)

    rl_step, prompt_index, id, prompt, completion, extracted, answer, verifier, reward, advantage

to ``<run>/samples.jsonl`` (always; appended, so nothing written earlier is lost), to TensorBoard as a text table
(tag ``samples/train``) and to W&B as a table (``samples/train``) when those loggers are configured. TRL's
``log_completions`` and verl's ``log_val_generations`` do the same for their trainers.

A step's rows are appended as one write that either lands whole or leaves the file as it was (``simko.atomic.append``:
a full disk cuts nothing in half; a symbolic link in the file's place is refused). When a run continues in its
folder, the rows a killed attempt wrote after the checkpoint's step, and a last line cut short, move to
``superseded/`` beside the file (:func:`supersede_samples_after`), as ``metrics.csv`` rows do: the file then holds
each step once, like the metrics.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from simko import atomic, runs
from simko.rewards import final_answer

log = logging.getLogger(__name__)

COLUMNS = ["rl_step", "prompt_index", "id", "prompt", "completion", "extracted", "answer", "verifier", "reward",
           "advantage"]  # fmt: skip
TAG = "samples/train"


def sample_rows(
    last_rollout: dict[str, Any],
    num_prompts: int,
    completions_per_prompt: int | None = None,
    verifiers: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rows (one per completion) for the first ``num_prompts`` prompts of a rollout batch.

    ``last_rollout``: ``{"step": 0-based RL step, "examples": [...], "completions": [...] (prompt-major, G per
    prompt), "rewards": [N], "advantages": [N]}`` as :class:`simko.module.RLVRModule` sets it. ``verifiers``: the
    module's verifier instances by name (``module.verifiers``), whose rule extracts the logged final answer.
    """
    examples, completions = last_rollout["examples"], last_rollout["completions"]
    if not examples:
        return []
    group_size = len(completions) // len(examples)
    rewards = _as_list(last_rollout["rewards"])
    advantages = _as_list(last_rollout.get("advantages"))
    per_prompt = group_size if completions_per_prompt is None else min(group_size, completions_per_prompt)
    rows = []
    for i, example in enumerate(examples[:num_prompts]):
        for j in range(per_prompt):
            row = i * group_size + j
            completion = completions[row]
            rows.append(
                {
                    "rl_step": int(last_rollout["step"]) + 1,
                    "prompt_index": i,
                    "id": example.get("id"),
                    "prompt": example.get("prompt", example.get("question")),
                    "completion": completion,
                    # what the reward was computed from: the example's verifier's own rule (math: the last box)
                    "extracted": final_answer(completion, example.get("verifier"), verifiers),
                    "answer": example.get("answer"),
                    "verifier": example.get("verifier"),
                    "reward": rewards[row],
                    "advantage": advantages[row] if advantages else None,
                }
            )
    return rows


def _as_list(values: Any) -> list[float]:
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().tolist()
    return [float(v) for v in values]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table (TensorBoard renders text summaries as Markdown)."""
    columns = ["prompt_index", "prompt", "completion", "extracted", "answer", "reward", "advantage"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


class RolloutSamples(Callback):
    """Log a bounded sample of each ``every_n_steps``-th RL step's rollouts (see the module docstring).

    Args:
        path: the JSONL file (``configs/callbacks/default.yaml``: ``<run>/samples.jsonl``).
        every_n_steps: RL steps between samples (the first RL step is always sampled); 0 disables.
        num_prompts: prompts per sample (each with its completions).
        completions_per_prompt: completions per prompt (None: all G).
    """

    def __init__(
        self, path: str, every_n_steps: int = 10, num_prompts: int = 2, completions_per_prompt: int | None = None
    ) -> None:
        if every_n_steps < 0 or num_prompts < 1:
            raise ValueError(
                f"RolloutSamples: every_n_steps must be >= 0 and num_prompts >= 1 (got {every_n_steps}, {num_prompts})"
            )
        self.samples_path = Path(path)
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.completions_per_prompt = completions_per_prompt

    def due(self, rl_step: int) -> bool:
        """Sample at RL step ``rl_step`` (1-based)?"""
        return self.every_n_steps > 0 and (rl_step == 1 or rl_step % self.every_n_steps == 0)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and runs.continued_run_step() is not None:  # this run continues in its folder
            supersede_samples_after(self.samples_path, int(pl_module.rl_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = getattr(pl_module, "last_rollout", None)
        if not trainer.is_global_zero or last is None or not self.due(int(last["step"]) + 1):
            return
        rows = sample_rows(last, self.num_prompts, self.completions_per_prompt, getattr(pl_module, "verifiers", None))
        if rows:
            self.write(rows, trainer.loggers)

    def write(self, rows: list[dict[str, Any]], loggers: list) -> None:
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.append(self.samples_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        step = rows[0]["rl_step"]
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(TAG, markdown_table(rows), global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_table(key=TAG, columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows])


def supersede_samples_after(path: str | Path, step: int) -> Path | None:
    """Move the rows of ``path`` (a samples file) with ``rl_step`` > ``step``, and a last line cut short, to a file in
    ``superseded/`` beside it; the main file is rewritten beside itself and renamed (the aside file is written
    first). Returns the aside file, or None when nothing had to move."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    keep, aside = [], []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True):
        try:
            complete = line.endswith("\n") and int(json.loads(line)["rl_step"]) <= step
        except (ValueError, KeyError, TypeError):
            complete = False
        (keep if complete else aside).append(line if line.endswith("\n") else line + "\n")
    if not aside:
        return None
    aside_path = (
        path.parent / "superseded" / f"{path.stem}.after-step{step}.{datetime.now():%Y-%m-%d_%H-%M-%S-%f}{path.suffix}"
    )
    atomic.atomic_write(aside_path, lambda f: f.write("".join(aside).encode()))
    atomic.atomic_write(path, lambda f: f.write("".join(keep).encode()))
    log.info("resuming after step %d: moved %d sample rows written after it to %s", step, len(aside), aside_path)
    return aside_path
