"""What a run tells its loggers and the console about itself: config, name, group, git commit, outputs.

- :func:`run_identity`: the run's name (after what differs: experiment, loss, seed, other overrides), its group
  (the multirun it belongs to) and its tags (the git commit, and ``git-dirty`` when tracked files were modified).
  ``configs/logger/wandb.yaml`` names W&B runs with it through the ``simko.run_name`` / ``simko.run_group`` /
  ``simko.run_tags`` resolvers; any of them can be overridden (``logger.wandb.name=my_run``).
- :func:`log_run_config`: the composed config, resolved, plus ``run.*`` (name, group, git) to every logger: CSV and
  TensorBoard write it to their ``hparams.yaml`` (TensorBoard's HParams tab gets it too), W&B to the run config.
- :func:`config_summary` / :func:`log_run_outputs`: one line about the run at the start (the full config is in
  ``<run>/.hydra/``), and where the run dir, the last checkpoint and the metrics are at the end.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Overrides that change where outputs go or what is logged, never what is trained: left out of run names.
_NAME_IGNORED_PREFIXES = ("paths.", "hydra.", "logger", "callbacks", "ckpt_path")
_NAME_BASE_KEYS = ("experiment", "loss", "seed")
MAX_NAME_LENGTH = 128  # W&B shows about that much; longer names are cut with "..."


@dataclass(frozen=True)
class RunIdentity:
    name: str
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    git_commit: str | None = None
    git_dirty: bool | None = None


def run_identity(
    choices: Mapping[str, Any],
    overrides: Iterable[str],
    seed: Any,
    sweep_dir: str | None = None,
    task_name: str = "train",
    git: tuple[str | None, bool | None] = (None, None),
) -> RunIdentity:
    """Name, group and tags of a run, from what differs between it and the default run.

    Args:
        choices: the config-group choices (Hydra's ``runtime.choices``: ``{"loss": "simko", "experiment": ...}``).
        overrides: the command-line overrides of this run (Hydra's ``overrides.task``; one job's in a multirun).
        seed: the run's seed.
        sweep_dir: the multirun folder when the run is one job of a multirun (its group), else None.
        task_name: ``task_name`` of the config (prefix of the group).
        git: ``(commit, dirty)`` of the code, see :func:`git_state`.

    The name is ``[experiment-]loss-seedN``, then every other override that changes the training (not paths,
    loggers, callbacks, resume) in command-line order: ``simko-seed0-loss.alpha=0.05,rl_steps=100``.
    """
    parts = []
    if choices.get("experiment"):
        parts.append(str(choices["experiment"]))
    parts.append(str(choices.get("loss") or "loss"))
    parts.append(f"seed{seed}")
    extras = [o for o in overrides if not _ignored_in_name(o)]
    name = "-".join(parts) + ("-" + ",".join(extras) if extras else "")
    if len(name) > MAX_NAME_LENGTH:
        name = name[: MAX_NAME_LENGTH - 3] + "..."
    group = f"{task_name}-{Path(sweep_dir).name}" if sweep_dir else None
    commit, dirty = git
    tags = []
    if commit:
        tags.append(f"git-{commit[:10]}")
        if dirty:
            tags.append("git-dirty")
    return RunIdentity(name=name, group=group, tags=tags, git_commit=commit, git_dirty=dirty)


def _ignored_in_name(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in _NAME_BASE_KEYS or key.startswith(_NAME_IGNORED_PREFIXES)


def git_state(root: str | os.PathLike | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout at ``root`` (default: the one this code runs from; dirty: a tracked
    file differs from the commit); ``(None, None)`` outside a checkout or without git."""
    root = str(root or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def _hydra_runtime() -> dict[str, Any]:
    """Choices, overrides and (multirun) sweep folder of the running Hydra job; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "choices": dict(hc.runtime.choices),
        "overrides": list(hc.overrides.task),
        "sweep_dir": hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None,
    }


_IDENTITY_CACHE: dict[Any, RunIdentity] = {}


def identity_of(cfg: DictConfig) -> RunIdentity:
    """:func:`run_identity` of the running job (git looked up once per process)."""
    runtime = _hydra_runtime()
    key = (tuple(sorted(runtime.get("choices", {}).items())), tuple(runtime.get("overrides", ())), str(cfg.get("seed")))
    if key not in _IDENTITY_CACHE:
        _IDENTITY_CACHE[key] = run_identity(
            runtime.get("choices", {}),
            runtime.get("overrides", []),
            cfg.get("seed"),
            sweep_dir=runtime.get("sweep_dir"),
            task_name=str(cfg.get("task_name", "train")),
            git=git_state(),
        )
    return _IDENTITY_CACHE[key]


def _register_resolvers() -> None:
    resolvers = {
        "simko.run_name": lambda *, _root_: identity_of(_root_).name,
        "simko.run_group": lambda *, _root_: identity_of(_root_).group,
        "simko.run_tags": lambda *, _root_: list(identity_of(_root_).tags),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config, resolved, with ``run.*``: name, group, tags, git commit and dirty flag."""
    params = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    identity = identity_of(cfg)
    params["run"] = {
        "name": identity.name,
        "group": identity.group,
        "tags": identity.tags,
        "git_commit": identity.git_commit,
        "git_dirty": identity.git_dirty,
    }
    return params


# TensorBoard's HParams tab lists these next to the hyperparameters (read from the scalars of the same name).
HPARAMS_METRICS = ("train/reward", "val/pass@1")


def log_run_config(trainer, cfg: DictConfig) -> dict[str, Any]:
    """Log :func:`run_config` to every logger of ``trainer`` (the loggers write on global rank 0 only)."""
    params = run_config(cfg)
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_hparams_summary(logger, params)
    return params


def _tensorboard_hparams_summary(logger, params: dict[str, Any]) -> None:
    """The HParams-tab summary, without the placeholder scalar Lightning writes with it (``hp_metric``): the
    metrics columns read the run's own ``train/reward`` / ``val/pass@1`` curves."""
    from lightning.fabric.utilities.logger import _flatten_dict
    from lightning.pytorch.utilities import rank_zero_only
    from torch.utils.tensorboard.summary import hparams

    if rank_zero_only.rank != 0:
        return
    flat = logger._sanitize_params(_flatten_dict(params))
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, dict.fromkeys(HPARAMS_METRICS, 0.0)):
        writer.add_summary(summary)


def log_run_start(trainer, cfg: DictConfig) -> None:
    """The config to every logger (:func:`log_run_config`) and its one-line summary to the console and log."""
    log_run_config(trainer, cfg)
    if trainer.is_global_zero:
        log.info("%s", config_summary(cfg))


def config_summary(cfg: DictConfig) -> str:
    """One line: the run's name, its config-group choices, its size; the full config is in ``<run>/.hydra/``."""
    runtime = _hydra_runtime()
    choices = runtime.get("choices", {})
    shown = [f"{g}={choices[g]}" for g in ("model", "loss", "data", "rollout", "trainer", "logger") if g in choices]
    for group in ("experiment", "debug"):
        if choices.get(group):
            shown.append(f"{group}={choices[group]}")
    size = []
    if cfg.get("rl_steps"):
        size.append(f"{cfg.rl_steps} RL steps")
    prompts = OmegaConf.select(cfg, "data.prompts_per_step", default=None)
    group_size = OmegaConf.select(cfg, "rollout.group_size", default=None)
    if prompts and group_size:
        size.append(f"{prompts} prompts x G={group_size}")
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
    where = f"; full config: {_short(Path(output_dir) / '.hydra' / 'config.yaml')}" if output_dir else ""
    return f"run {identity_of(cfg).name}: {' '.join(shown)}, {', '.join(size)}, seed {cfg.get('seed')}{where}"


def run_outputs(trainer, cfg: DictConfig) -> dict[str, str]:
    """Where a finished run put its outputs: run dir, last checkpoint, metrics (per logger), rollout samples."""
    out: dict[str, str] = {}
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_resolution_failure=False)
    if output_dir:
        out["run dir"] = str(output_dir)
    for callback in trainer.callbacks:
        last = getattr(callback, "last_model_path", None)
        if last:
            out["last checkpoint"] = str(last)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            out["metrics"] = str(Path(logger.log_dir) / "metrics.csv")
        elif isinstance(logger, TensorBoardLogger):
            out["tensorboard"] = str(logger.log_dir)
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            out["wandb"] = str(getattr(run, "url", None) or getattr(run, "dir", ""))
    for callback in trainer.callbacks:
        path = getattr(callback, "samples_path", None)
        if path and Path(path).exists():
            out["samples"] = str(path)
    return out


def log_run_outputs(trainer, cfg: DictConfig) -> None:
    """Log :func:`run_outputs`, one line each (global rank 0)."""
    if not trainer.is_global_zero:
        return
    outputs = run_outputs(trainer, cfg)
    width = max((len(k) for k in outputs), default=0)
    for key, value in outputs.items():
        log.info("%s %s", f"{key}:".ljust(width + 1), _short(value))


def _short(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies under it (shorter on screen), else as given."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd()))
    except ValueError:
        return text
