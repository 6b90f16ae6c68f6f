"""Checkpoints: written atomically, read without executing code, kept to what a researcher needs.

- :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin; ``simko.train`` installs it on every strategy
  it ships: single device, DDP, FSDP2 through ``ModelParallelStrategy`` and FSDP with full state dicts all save
  through it on rank 0): the file is written beside its target, fsynced and renamed (``simko.atomic``).
- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` with one readable error per failure (missing,
  empty, truncated or not a torch file, or holding objects whose unpickling could execute code).
- :class:`RunCheckpoint`: ``last.ckpt`` (full state: weights, optimizer, loops, data position) for resuming, and
  weights-only ``stepNNNNNN.ckpt`` snapshots, both named and scheduled in RL steps.
- :class:`GracefulStop`: on SIGTERM (or SLURM's requeue signal; ``simko.stopping.stopping_on_signals``) the run stops at
  the next RL step boundary, ``last.ckpt`` written for the last finished step; ``simko.train`` then exits non-zero.
- On resume, :func:`check_fits` (the weights' names and shapes against the built model) and :func:`check_same_loss`
  (the loss config :class:`RecordConfig` wrote into the checkpoint) turn another architecture or another loss into
  one message at start.
"""

from __future__ import annotations

import logging
import pickle
import re
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from simko import atomic, stopping
from simko.faults import pause_point

log = logging.getLogger(__name__)

LAST = "last.ckpt"
SNAPSHOT = re.compile(r"^step(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that can't be used, with the file named in the message."""


class RunStopped(Exception):
    """The run stopped at an RL step boundary because the process received ``signum`` (see :class:`GracefulStop`).

    ``rl_step``: the last finished RL step (``last.ckpt`` holds it when the run writes checkpoints).
    """

    def __init__(self, signum: int, rl_step: int) -> None:
        super().__init__(f"stopped by signal {signum} after RL step {rl_step}")
        self.signum = signum
        self.rl_step = rl_step


def stop_agreed(trainer: Trainer) -> bool:
    """Whether the run stops after the current RL step: this process, or under DDP any process, received a stop
    signal. Decided once per optimizer step (one boolean all-reduce) and cached, so every caller in that step, on
    every rank, gets the same answer."""
    key = (id(trainer), trainer.global_step)
    decided = getattr(trainer, "_simko_stop", None)
    if decided is not None and decided[0] == key:
        return decided[1]
    stop = stopping.stop_signal() is not None
    if trainer.world_size > 1:
        stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
    trainer._simko_stop = (key, stop)
    return stop


class GracefulStop(Callback):
    """Stop the run at the next RL step boundary once a stop signal arrived (``simko.stopping.stopping_on_signals``).

    The RL step in progress, and its validation when one is due, finish; :class:`RunCheckpoint` writes ``last.ckpt``
    for that step (also when none is due) and commits it; then :class:`RunStopped` is raised before the next step
    starts, and ``simko.train`` prints how to continue and exits with 128 + the signal number. The checkpoint is the
    one a scheduled save would have written at that step, so the continued run equals the uninterrupted one.
    ``trainer.should_stop`` is not used: Lightning runs an extra validation when it is set.

    Under DDP every process stops at the same step (:func:`stop_agreed`), and none leaves before global rank 0 has
    committed ``last.ckpt`` and run ``report`` (its message, and under SLURM the requeue): a barrier in
    :meth:`on_exception`. A launcher that ends every task once one exits non-zero (``srun --kill-on-bad-exit``,
    torchrun) would otherwise end rank 0 before it renamed the checkpoint or requeued the job.
    """

    def __init__(self, report: Callable[[Trainer], None] | None = None) -> None:
        self.report = report
        self.reported = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stopping.reclaim_stop_signals()  # Lightning installed its own handlers just before

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stopping.reclaim_stop_signals()  # trainer.validate (validate_first) installs them too

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        stop_agreed(trainer)  # decided here, at the end of the step, the same on every rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        if stop_agreed(trainer):
            raise RunStopped(stopping.stop_signal() or signal.SIGTERM, int(pl_module.rl_step))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, RunStopped):
            return
        for callback in trainer.callbacks:  # whatever the callbacks' order: the checkpoint first, then the message
            if isinstance(callback, RunCheckpoint):
                callback.commit(trainer)
        if trainer.is_global_zero and self.report is not None:
            self.report(trainer)
            self.reported = True
        if trainer.world_size > 1:  # every rank raised RunStopped at the same step: all of them get here
            trainer.strategy.barrier("simko_stop")


def read_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """Load a checkpoint file without executing code from it, or raise :class:`CheckpointError` naming it.

    ``mmap=True`` maps tensors lazily (reading a few fields of a large checkpoint is cheap).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (ckpt_path=...)")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory (a distributed checkpoint); train with "
            "trainer.strategy.save_distributed_checkpoint=false or consolidate it first"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive whose directory is at the end: a truncated file has none.
        raise CheckpointError(
            f"checkpoint {path} is not a complete torch checkpoint ({size} bytes, no zip directory): it is "
            "truncated, or it is some other kind of file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python objects{what} that a weights-only load refuses, because unpickling "
            "them could execute code. It was not loaded. simko.train's checkpoints hold only tensors and plain "
            "values; do not load this file unless you know who wrote it and why"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt and could not be read: {first_line}") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} holds no 'state_dict': not a checkpoint written by simko.train")
    return state


def checkpoint_step(state: dict[str, Any]) -> int:
    """The RL step a checkpoint was taken after (0 for checkpoints of older versions without it)."""
    return int(state.get("rl_step", 0))


def check_fits(state: dict[str, Any], module: torch.nn.Module, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless its weights fit ``module`` (same names and shapes).

    Checked at start, so a checkpoint of another architecture (``model.*`` settings changed between runs) is one
    message instead of a traceback from inside ``trainer.fit``. A module that loads part of its state (a LoRA
    policy: ``strict_loading`` is False) may miss keys; it may not get unknown or misshapen ones.
    """
    saved, expected = state["state_dict"], module.state_dict()
    problems = [f"{k} is {tuple(saved[k].shape)} there, {tuple(expected[k].shape)} here"
                for k in saved if k in expected and tuple(saved[k].shape) != tuple(expected[k].shape)]  # fmt: skip
    unexpected = [k for k in saved if k not in expected]
    missing = [k for k in expected if k not in saved] if getattr(module, "strict_loading", True) else []
    if unexpected:
        problems.append(f"{len(unexpected)} weights this model has no place for ({', '.join(unexpected[:3])}, ...)")
    if missing:
        problems.append(f"{len(missing)} weights of this model missing from it ({', '.join(missing[:3])}, ...)")
    if problems:
        more = f"; and {len(problems) - 2} more differences" if len(problems) > 2 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {'; '.join(problems[:2])}{more}. It was written for another "
            "architecture: continue with the model settings (model.*) it was trained with"
        )


class RecordConfig(Callback):
    """Write ``values`` (plain data: the run's resolved loss config) into every checkpoint as ``checkpoint["config"]``,
    so a resume can check it continues the state with the settings it was trained with (:func:`check_same_loss`)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self.values


def check_same_loss(state: dict[str, Any], loss: dict[str, Any], path: str | Path, continued: bool) -> None:
    """A run continued in its folder keeps its loss: raise :class:`CheckpointError` when ``loss`` (the resolved
    ``loss`` config) differs from the one the checkpoint's state was trained with. A branch (a new run from the
    checkpoint) may change it; that is logged. Checkpoints without the record (older ones) are not checked."""
    before = (state.get("config") or {}).get("loss")
    if not isinstance(before, dict):
        return
    changed = sorted((k for k in set(before) | set(loss) if before.get(k) != loss.get(k)), key=lambda k: k != "name")
    if not changed:
        return
    diffs = ", ".join(f"loss.{k}: {before.get(k)!r} -> {loss.get(k)!r}" for k in changed[:4])
    if not continued:
        log.info("branching from %s, trained with another loss (%s)", path, diffs)
        return
    raise CheckpointError(
        f"checkpoint {path} was trained with another loss ({diffs}{', ...' if len(changed) > 4 else ''}). A run keeps "
        "its loss: continue it with the loss settings it was trained with, or train this state with the new loss as "
        f"a new run: hydra.run.dir=<new folder> ckpt_path={path}"
    )


def is_full_checkpoint(state: dict[str, Any]) -> bool:
    """True when the checkpoint can resume a run exactly (it carries the optimizer state)."""
    return "optimizer_states" in state


def policy_state_dict(state: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The policy weights of a checkpoint (full or weights-only), keys without the ``policy.`` prefix."""
    policy = {k.removeprefix("policy."): v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    if not policy:
        raise CheckpointError(f"checkpoint {path} holds no 'policy.*' weights: not written by simko.train?")
    return policy


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary sibling, fsync, rename; loads are weights-only with readable errors.

    Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
    ``$TMPDIR`` and is moved (copied, across filesystems) into place: measured with ``TMPDIR=/dev/shm``, a kill
    during the copy left a truncated ``step000002.ckpt`` 3 times out of 3.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)

        def write(f) -> None:
            pause_point("checkpoint.open")  # the temporary file exists and is empty
            torch.save(checkpoint, f)
            pause_point("checkpoint.written")  # complete but not yet renamed into place

        try:
            atomic.atomic_write(target, write)
        except (OSError, RuntimeError) as err:
            # torch.save reports a full disk as an OSError, or as a RuntimeError of its zip writer raised while
            # handling that OSError: either way, one OSError naming the file.
            cause = root_os_error(err)
            if cause is None:
                raise
            raise OSError(
                cause.errno,
                f"writing checkpoint {target} failed ({cause.strerror or cause}); the previous file at that path, "
                "if any, is unchanged",
            ) from err

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise ValueError("simko never loads a checkpoint with weights_only=False (unpickling can execute code)")
        return read_checkpoint(path, mmap=False)


def root_os_error(err: BaseException | None) -> OSError | None:
    """The innermost OSError with an errno in an exception's cause/context chain (e.g. ENOSPC under torch.save)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            found = err
        err = err.__cause__ or err.__context__
    return found


def install_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Make ``trainer`` save through :class:`AtomicCheckpointIO` (replacing Lightning's default IO only).

    Sharded checkpoints (a folder per checkpoint: ``save_distributed_checkpoint=true`` of ModelParallelStrategy,
    ``state_dict_type=sharded`` of FSDP) bypass the CheckpointIO, so they are refused.
    """
    strategy = trainer.strategy
    sharded = getattr(strategy, "_save_distributed_checkpoint", False)  # ModelParallelStrategy (FSDP2)
    if sharded or getattr(strategy, "_state_dict_type", "") == "sharded":  # FSDPStrategy
        raise ValueError(
            "trainer.strategy writes sharded checkpoints (a folder each), which are not written atomically and "
            "which simko.eval can't read: keep trainer.strategy.save_distributed_checkpoint=false (FSDP2) or "
            "trainer.strategy.state_dict_type=full (FSDP)"
        )
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO):
        return
    if type(current) is not TorchCheckpointIO:
        log.warning("keeping the custom checkpoint IO %s: checkpoint writes may not be atomic", type(current).__name__)
        return
    strategy.checkpoint_io = AtomicCheckpointIO()


class RunCheckpoint(Callback):
    """``last.ckpt`` for resuming and weights-only snapshots, every N RL steps.

    Args:
        dirpath: the run's ``checkpoints/`` folder.
        last_every_n_steps: replace ``last.ckpt`` (full state: weights, optimizer, loop and data position) every
            this many RL steps, and always after the last step. This is where a killed run resumes from.
        every_n_steps: also write ``stepNNNNNN.ckpt`` (N = the RL step) every this many RL steps (0: never).
        snapshot_weights_only: snapshots hold the weights only (a third of a full checkpoint with AdamW); ``false``
            makes them full checkpoints (resumable into a new run folder).
        keep_snapshots: keep only the newest this many snapshots (null: keep all).

    ``last.ckpt`` is replaced only once everything the run logged for that step is on disk: it is written as
    ``.last.ckpt.simko-pending`` when the step's training ends and renamed into place when the next step starts
    (or training ends), after the step's validation and the loggers' flush. So the metrics file always holds
    every row up to the step ``last.ckpt`` was taken at, and a resume never leaves a gap.

    Why not Lightning's ``ModelCheckpoint``: it schedules and names files by ``global_step``, which counts
    optimizer updates (``ppo_epochs x num_mini_batches`` per RL step); it saves before the step's metrics reach
    the loggers; and over an existing ``last.ckpt`` it writes ``last-v1.ckpt`` instead of replacing it, so a
    later resume from ``last.ckpt`` silently rewound.
    """

    def __init__(
        self,
        dirpath: str | Path,
        last_every_n_steps: int = 10,
        every_n_steps: int = 40,
        snapshot_weights_only: bool = True,
        keep_snapshots: int | None = None,
    ) -> None:
        for name, value in (("last_every_n_steps", last_every_n_steps), ("every_n_steps", every_n_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"callbacks.model_checkpoint.{name} must be an integer >= 0, got {value!r}")
        if keep_snapshots is not None and (not isinstance(keep_snapshots, int) or keep_snapshots < 1):
            raise ValueError(f"callbacks.model_checkpoint.keep_snapshots must be null or >= 1, got {keep_snapshots!r}")
        self.dirpath = Path(dirpath)
        self.last_every_n_steps = last_every_n_steps
        self.every_n_steps = every_n_steps
        self.snapshot_weights_only = snapshot_weights_only
        self.keep_snapshots = keep_snapshots
        self._pending: Path | None = None
        self._validating = False

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    @property
    def pending_path(self) -> Path:
        return self.dirpath / f".{LAST}{atomic.PENDING_SUFFIX}"

    @property
    def last_model_path(self) -> str:
        """``last.ckpt`` once written, else "" (the attribute Lightning's ModelCheckpoint has: the end-of-run
        summary reads it)."""
        return str(self.last_path) if self.last_path.is_file() else ""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for path in atomic.remove_orphans(self.dirpath):  # this process owns the run folder (simko.runs)
                log.info("removed %s, left by an interrupted checkpoint write", path)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = int(pl_module.rl_step)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save_snapshot(trainer, step)
        due = self.last_every_n_steps and step % self.last_every_n_steps == 0
        if final or due or stop_agreed(trainer):  # a stop signal: this step's last.ckpt (GracefulStop)
            try:
                trainer.save_checkpoint(self.pending_path, weights_only=False)
            except OSError as err:
                cause = root_os_error(err) or err
                raise OSError(
                    err.errno,
                    f"writing {self.last_path} for RL step {step} failed ({cause.strerror or cause}); "
                    f"{self.last_path} still holds the previous checkpoint",
                ) from err
            self._pending = self.pending_path

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        self.commit(trainer)  # the previous step is complete: its validation ran and its rows are logged

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.commit(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validating = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validating = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A stop at a step boundary (GracefulStop) commits the finished step's pending ``last.ckpt``, if this
        callback's ``on_train_batch_start`` did not run before the stop; so does Lightning's own SIGTERM stop (a
        signal that came before GracefulStop took the handler back), unless it cut a validation short, whose
        metrics the step would then lack. Any other error leaves ``last.ckpt`` as it was."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, RunStopped) or (isinstance(exception, SIGTERMException) and not self._validating):
            self.commit(trainer)

    def commit(self, trainer: Trainer) -> None:
        if self._pending is None:
            return
        self._pending = None
        for logger in trainer.loggers:  # rows of the step first, then the checkpoint that follows them
            flush = getattr(logger, "flush_rows", None)
            flush() if flush is not None else logger.save()
        if trainer.is_global_zero:
            pause_point("checkpoint.commit")
            atomic.commit(self.pending_path, self.last_path)

    def _save_snapshot(self, trainer: Trainer, step: int) -> None:
        trainer.save_checkpoint(self.dirpath / f"step{step:06d}.ckpt", weights_only=self.snapshot_weights_only)
        if self.keep_snapshots is None or not trainer.is_global_zero:
            return
        snapshots = sorted(
            (int(m.group(1)), p) for p in self.dirpath.iterdir() if (m := SNAPSHOT.match(p.name)) is not None
        )
        for _, old in snapshots[: -self.keep_snapshots]:
            old.unlink(missing_ok=True)
            log.info("removed snapshot %s (callbacks.model_checkpoint.keep_snapshots=%d)", old, self.keep_snapshots)
