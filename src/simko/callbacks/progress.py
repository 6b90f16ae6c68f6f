"""The training progress bar, in RL steps, and a log line per validation.

    RL step 12/120 ━━━━━━━━━━━━━━━━━━━━━━━━━ 0:00:14 • 0:01:40 reward 0.438 len 3.12 pass@1 0.297 s/step 0.93

Lightning's ``RichProgressBar`` counts batches of an epoch (``Epoch 0/-2`` here, where ``max_epochs=-1``, and the
batch index after a resume) and shows only what the module logged with ``prog_bar=True``. This one counts RL steps
(the module's ``rl_step`` over ``trainer.max_steps / (ppo_epochs x num_mini_batches)``, so a run resumed at step 12
of 120 shows ``12/120``) and shows the logged metrics named in ``metrics`` plus the wall time of the last RL step
(generate + score + update; validation excluded).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
    RichProgressBar,
    RichProgressBarTheme,
)
from rich.progress import TextColumn

from simko.console import log_lines_above_live_display

log = logging.getLogger(__name__)

# Label on the bar -> logged metric. Missing metrics (e.g. val/* before the first validation) are not shown.
DEFAULT_METRICS = {"reward": "train/reward", "len": "train/response_len", "pass@1": "val/pass@1"}
DESCRIPTION = "RL step"


def updates_per_rl_step(module: Any) -> int:
    """Optimizer steps per RL step (Lightning's ``global_step`` counts those)."""
    return int(getattr(module, "ppo_epochs", 1)) * int(getattr(module, "num_mini_batches", 1))


def total_rl_steps(max_steps: int | None, module: Any) -> float:
    """RL steps of the run: ``max_steps / updates per RL step``; ``inf`` without a step limit."""
    if max_steps is None or max_steps < 0:
        return math.inf
    return max_steps // updates_per_rl_step(module)


def format_metrics(values: dict[str, Any], names: dict[str, str]) -> dict[str, str]:
    """``{label: "0.438"}`` for the metrics of ``names`` (label -> key) present in ``values``."""
    shown = {}
    for label, key in names.items():
        if key in values:
            value = float(values[key])
            shown[label] = f"{value:.3f}" if abs(value) < 100 else f"{value:.4g}"
    return shown


class RLProgressBar(RichProgressBar):
    """Rich progress bar over RL steps (see the module docstring).

    Args:
        metrics: bar label -> logged metric name (default :data:`DEFAULT_METRICS`).
        log_every_n_steps: also log one line (to the console and ``<run>/train.log``) every N RL steps; the line is
            always logged after each validation. 0/None: only then.
        refresh_rate: redraws per second (Lightning's default is 100).
        leave, console_kwargs: as for Lightning's ``RichProgressBar``.
    """

    def __init__(
        self,
        metrics: dict[str, str] | None = None,
        log_every_n_steps: int | None = None,
        refresh_rate: int = 4,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        theme = RichProgressBarTheme(metrics_text_delimiter=" ")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.log_every_n_steps = log_every_n_steps or 0
        self._step_started: float | None = None
        self.step_seconds: float | None = None
        self._log_redirect = None

    # ------------------------------------------------------------------ the bar
    def configure_columns(self, trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomTimeColumn(style=self.theme.time),
        ]

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{DESCRIPTION:{max(len(DESCRIPTION), len(self.validation_description))}}"

    def _reset_rl_task(self, trainer, pl_module) -> None:
        if self.progress is None or self.train_progress_bar_id is None:
            return
        self.progress.reset(
            self.train_progress_bar_id,
            total=total_rl_steps(trainer.max_steps, pl_module),
            completed=int(getattr(pl_module, "rl_step", 0)),
            description=self._get_train_description(trainer.current_epoch),
            visible=True,
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._reset_rl_task(trainer, pl_module)

    def _initialize_train_progress_bar_id(self) -> None:  # Lightning calls it when resuming mid-epoch
        super()._initialize_train_progress_bar_id()
        self._reset_rl_task(self.trainer, self.trainer.lightning_module)

    def _init_progress(self, trainer) -> None:
        started = self.progress is None or self._progress_stopped
        super()._init_progress(trainer)
        if started and self.progress is not None and self._log_redirect is None:
            self._log_redirect = log_lines_above_live_display()
            self._log_redirect.__enter__()

    def _stop_progress(self) -> None:
        if self._log_redirect is not None:
            self._log_redirect.__exit__(None, None, None)
            self._log_redirect = None
        super()._stop_progress()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_started is not None:
            self.step_seconds = time.perf_counter() - self._step_started
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, int(pl_module.rl_step))
        self._update_metrics(trainer, pl_module)
        self.refresh()
        n = self.log_every_n_steps
        if n and pl_module.rl_step % n == 0 and trainer.is_global_zero and not _validation_follows(trainer, batch_idx):
            log.info("%s", self.status_line(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        shown = format_metrics(trainer.callback_metrics, self.metrics)
        if self.step_seconds is not None:
            shown["s/step"] = f"{self.step_seconds:.2f}"
        return shown

    # ------------------------------------------------------------------ log lines
    def status_line(self, trainer, pl_module, val: bool = False) -> str:
        """``RL step 20/120: reward 0.437 len 3.1 s/step 0.93; val pass@1 0.340 pass@2 0.45 mean@n 0.34``."""
        total = total_rl_steps(trainer.max_steps, pl_module)
        step = f"{DESCRIPTION} {pl_module.rl_step}" + (f"/{total}" if math.isfinite(total) else "")
        shown = self.get_metrics(trainer, pl_module)
        train = {k: v for k, v in shown.items() if not self.metrics.get(k, "").startswith("val/")}
        parts = [" ".join(f"{k} {v}" for k, v in train.items())] if pl_module.rl_step and train else []
        if val:
            values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = format_metrics(values, {k.removeprefix("val/"): k for k in values})
            parts.append("val " + " ".join(f"{k} {v}" for k, v in shown.items()))
        return f"{step}: " + "; ".join(parts)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "validate" and self.progress is not None and self.val_progress_bar_id is not None:
            # trainer.validate() before the first RL step: its bar goes, its result is the line below
            self.progress.update(self.val_progress_bar_id, advance=0, visible=False)
            self.refresh()
        if not trainer.sanity_checking and trainer.is_global_zero:
            log.info("%s", self.status_line(trainer, pl_module, val=True))


def _validation_follows(trainer, batch_idx: int) -> bool:
    """Does a validation (which logs its own line, with the train metrics) run right after this batch?"""
    every = getattr(trainer, "val_check_batch", None)
    return bool(trainer.enable_validation and isinstance(every, int) and every > 0 and (batch_idx + 1) % every == 0)
