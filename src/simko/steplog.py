"""Metrics indexed by RL step: one CSV row per step, durable rows, resumable.

- :class:`RLStepLogging` (a callback) logs ``step`` = the RL step with every train and validation metric, so every
  logger indexes by RL step: the train metrics of step N and the validation run after step N both land at N
  (``validate_first`` at 0). It also logs ``train/lr`` (the learning rate the step's first update used) on the
  same row; Lightning's ``LearningRateMonitor`` logged it on a row of its own, one step off.
- :class:`StepCSVLogger`: Lightning's ``CSVLogger`` with one row per step (train + validation + lr merged), every
  finished row appended and fsynced, a header change written beside the file and renamed, and an existing
  ``metrics.csv`` continued instead of deleted (Lightning's writer deleted the earlier rows when a run resumed into
  its folder).
- :func:`supersede_rows_after`: on resume, the rows a killed attempt logged after the checkpoint's step are moved
  to ``superseded/`` beside the file (the resumed run logs those steps again), so the main file is one run.
  :class:`StepCSVLogger` does it for its own file, wherever ``save_dir``/``name``/``version`` put it.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from simko import atomic, runs

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


class RLStepLogging(Callback):
    """Index every logged metric by the RL step it describes (``step``), and log ``train/lr`` with them."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if trainer.optimizers:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
            pl_module.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        pl_module.log("step", float(pl_module.rl_step), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation after RL step N describes the policy after N steps (validate_first: N = 0).
        pl_module.log("step", float(pl_module.rl_step), on_step=False, on_epoch=True, sync_dist=True)  # equal on ranks


class _StepRows(ExperimentWriter):
    """``metrics.csv`` with one row per step; rows are written once their step is over."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.path = Path(self.metrics_file_path)
        self.metrics_keys = _read_header(self.path)
        self._rows: dict[int, dict[str, Any]] = {}

    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv``: it is this run's own (a resume appends to it)."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if step is None:
            step = max(self._rows, default=-1) + 1
        row = self._rows.setdefault(int(step), {"step": int(step)})
        row.update({k: v.item() if isinstance(v, Tensor) else v for k, v in metrics_dict.items()})

    def save(self) -> None:
        """Write the rows of finished steps (all but the newest, which may still get validation metrics)."""
        if self._rows:
            newest = max(self._rows)
            self._write([s for s in sorted(self._rows) if s < newest])

    def flush(self) -> None:
        """Write every row, the newest included (its step is over: a checkpoint follows, or the run ends)."""
        self._write(sorted(self._rows))

    def _write(self, steps: list[int]) -> None:
        if not steps:
            return
        rows = [self._rows[s] for s in steps]
        new_keys = sorted(set().union(*rows) - set(self.metrics_keys) - {"step"})
        if new_keys or not self.metrics_keys:
            keys = ["step", *sorted((set(self.metrics_keys) | set(new_keys)) - {"step"})]
            self._rewrite_header(keys)
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=self.metrics_keys, restval="").writerows(rows)
        atomic.append(self.path, text.getvalue().encode())  # whole rows or nothing; never through a symlink
        for s in steps:
            del self._rows[s]

    def _rewrite_header(self, keys: list[str]) -> None:
        """A new column: rewrite the file with the wider header, beside it, then rename (never in place)."""
        old_rows = []
        if self.path.is_symlink():
            raise OSError(errno.ELOOP, f"{self.path} is a symbolic link: a run writes only into its own files")
        if self.path.is_file():
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f))

        def write(f) -> None:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=keys, restval="")
            writer.writeheader()
            writer.writerows(old_rows)
            f.write(text.getvalue().encode())

        atomic.atomic_write(self.path, write)
        self.metrics_keys = keys


class StepCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (same folder layout, ``hparams.yaml``), one durable row per RL step."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _StepRows:  # type: ignore[override]
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            step = runs.continued_run_step()
            if step is not None:  # this run continues in its folder: this logger's own file, wherever it is
                supersede_rows_after(Path(self.log_dir) / METRICS_FILE, step)
            self._experiment = _StepRows(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Tensor | float], step: int | None = None) -> None:
        self.experiment.log_metrics(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR), step)

    @rank_zero_only
    def flush_rows(self) -> None:
        """Write every pending row now (``RunCheckpoint`` calls this before ``last.ckpt`` moves past the step)."""
        self.experiment.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()


def _read_header(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def supersede_rows_after(path: str | Path, step: int, aside_dir: str | Path | None = None) -> Path | None:
    """Move the rows of ``path`` (a ``metrics.csv``) with ``step`` > ``step`` to a file in ``aside_dir``.

    Those rows were logged by an attempt that was killed after its last checkpoint (taken at ``step``); the resumed
    run logs the same steps again. A last line without its newline (the kill landed mid-write) goes aside too. The
    main file is rewritten beside itself and renamed; the aside file is written first, so a kill in between leaves
    a duplicate, never a loss. Returns the aside file, or None when nothing had to move.
    """
    path = Path(path)
    if not path.is_file():
        return None
    lines = path.read_bytes().decode().splitlines(keepends=True)
    if not lines:
        return None
    header, body = lines[0], lines[1:]
    columns = next(csv.reader([header]))
    if "step" not in columns:
        raise ValueError(f"{path} has no 'step' column: not a metrics file written by simko.train")
    index = columns.index("step")
    keep, aside = [header], [header]
    for line in body:
        cells = next(csv.reader([line]), [])
        complete = line.endswith("\n") and len(cells) > index and cells[index] != ""
        if complete and float(cells[index]) <= step:
            keep.append(line)
        else:
            aside.append(line if line.endswith("\n") else line + "\n")
    if len(aside) == 1:
        return None
    aside_dir = Path(aside_dir) if aside_dir is not None else path.parent / "superseded"
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
    aside_path = aside_dir / f"{path.stem}.after-step{step}.{stamp}{path.suffix}"
    atomic.atomic_write(aside_path, lambda f: f.write("".join(aside).encode()))
    atomic.atomic_write(path, lambda f: f.write("".join(keep).encode()))
    log.info("resuming after step %d: moved %d rows logged after it to %s", step, len(aside) - 1, aside_path)
    return aside_path
