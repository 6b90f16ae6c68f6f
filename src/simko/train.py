"""Train a policy with RLVR: ``python -m simko.train [overrides]`` (or ``simko-train``).

Everything is built from ``configs/train.yaml`` with ``hydra.utils.instantiate``:

    python -m simko.train loss=simko data=arithmetic rl_steps=20
    python -m simko.train -m loss=grpo,simko seed=0,1,2
    python -m simko.train hydra.run.dir=logs/train/runs/<run> ckpt_path=last     # continue that run

The run length is ``rl_steps`` (RL steps); ``trainer.max_steps`` (Lightning's count of optimizer updates) is set
from it and refused when given. A run writes only into its own folder (``simko.runs``); checkpoints are atomic and
loaded weights-only (``simko.checkpointing``); metrics are one row per RL step (``simko.steplog``).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from simko.config import check_torch_extensions  # noqa: E402

check_torch_extensions()  # a torchvision built for another torch: the fix, before `import lightning` fails

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from simko.checkpointing import (  # noqa: E402
    GracefulStop,
    RecordConfig,
    RunCheckpoint,
    RunStopped,
    check_fits,
    check_same_loss,
    checkpoint_step,
    install_atomic_checkpoint_io,
    read_checkpoint,
    stop_agreed,
)
from simko.checks import (  # noqa: E402
    CONFIG_ERRORS,
    build_data,
    build_loss,
    check_against_model,
    check_train_config,
    check_world_size,
    exit_with_config_error,
)
from simko.config import check_config_dir, import_modules  # noqa: E402
from simko.console import progress_bar_enabled, quiet_library_warnings  # noqa: E402
from simko.engines import check_engine  # noqa: E402
from simko.logging_utils import log_run_outputs, log_run_start  # noqa: E402
from simko.models.lora import load_model  # noqa: E402
from simko.rewards import check_verifier_names  # noqa: E402
from simko.rewards.base import VerifierError  # noqa: E402
from simko.runs import (  # noqa: E402
    continued_run_step,
    resolve_ckpt_path,
    resume_command,
)
from simko.steplog import RLStepLogging  # noqa: E402
from simko.stopping import stop_signal, stopping_on_signals  # noqa: E402

log = logging.getLogger(__name__)
quiet_library_warnings()


def build(cfg: DictConfig, resume_step: int | None = None):
    """Instantiate model, loss, data, module and trainer from a composed config."""
    import_modules(cfg.get("imports"))  # user modules (e.g. verifiers) before anything is built
    L.seed_everything(cfg.seed, workers=True)
    check_train_config(cfg)  # missing values, sampling and loss knobs: before anything is built
    loss = build_loss(cfg)  # first: a bad loss config fails before any model is built
    engine = cfg.rollout.get("engine", "hf")
    check_engine(engine, cfg.rollout.get(engine))  # e.g. rollout.engine=vllm without vLLM: the install command
    datamodule = build_data(cfg)  # files read and checked before the model; the tokenizer comes later
    policy, tokenizer = load_model(cfg.model)  # the loader, then LoRA when model.lora is set
    datamodule.set_tokenizer(tokenizer)
    check_against_model(policy, datamodule, loss, cfg.rollout.get("max_prompt_tokens"))
    module = instantiate(cfg.module, policy=policy, tokenizer=tokenizer, loss=loss, **cfg.rollout)
    examples = datamodule.examples_for_step(0, rank=0, world_size=1) + datamodule.val_examples(rank=0, world_size=1)
    check_verifier_names([ex["verifier"] for ex in examples], module.verifiers)  # a typo fails now, not at step 1
    set_run_length(cfg, module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(RLStepLogging())  # every logger indexes by RL step; train/lr on the step's row
    # SIGTERM: stop at the next RL step boundary, with its checkpoint and the message that says how to continue
    callbacks.append(GracefulStop(report=partial(report_stop, cfg=cfg)))
    callbacks.append(RecordConfig({"loss": OmegaConf.to_container(cfg.loss, resolve=True)}))  # checked on resume
    loggers = build_loggers(cfg, resume_step)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=progress_bar_enabled(cfg.trainer, callbacks),
    )
    install_atomic_checkpoint_io(trainer)
    check_mini_batches(module, datamodule, trainer.world_size)
    check_world_size(datamodule, trainer.world_size)  # here, before DDP starts its processes
    return module, datamodule, trainer


def set_run_length(cfg: DictConfig, module) -> None:
    """``rl_steps`` is the run length; Lightning's ``max_steps`` (optimizer updates) is derived from it."""
    rl_steps = cfg.get("rl_steps")
    if isinstance(rl_steps, bool) or not isinstance(rl_steps, int) or rl_steps < 1:
        raise ValueError(f"rl_steps (the run length in RL steps) must be an integer >= 1, got {rl_steps!r}")
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps not in (None, -1):
        raise ValueError(
            f"trainer.max_steps={max_steps} is not how the run length is set here: Lightning counts optimizer "
            f"updates ({module.ppo_epochs * module.num_mini_batches} per RL step with module.ppo_epochs="
            f"{module.ppo_epochs} x module.num_mini_batches={module.num_mini_batches}) and train.py derives it "
            f"from rl_steps. Set rl_steps={max_steps} instead."
        )
    with open_dict(cfg):
        cfg.trainer.max_steps = rl_steps * module.ppo_epochs * module.num_mini_batches


def check_mini_batches(module, datamodule, world_size: int) -> None:
    """Every mini-batch needs a prompt group; with fewer groups an RL step would make fewer updates than
    ``num_mini_batches`` and the run would go on for more RL steps than ``rl_steps``."""
    groups = datamodule.prompts_per_step // max(world_size, 1)
    if module.num_mini_batches > groups:
        raise ValueError(
            f"module.num_mini_batches={module.num_mini_batches} is larger than the {groups} prompt groups each "
            f"process gets per RL step (data.prompts_per_step={datamodule.prompts_per_step} over {world_size} "
            f"process(es)): every mini-batch needs at least one group. Use module.num_mini_batches <= {groups}."
        )


def build_loggers(cfg: DictConfig, resume_step: int | None) -> list:
    continued = continued_run_step()  # -1: a run continued before its first checkpoint
    resume_step = continued if continued is not None else resume_step
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is None:
            continue
        extra = {}
        if resume_step is not None and str(conf.get("_target_", "")).endswith("TensorBoardLogger"):
            extra["purge_step"] = resume_step + 1  # TensorBoard drops what a killed attempt logged after it
        loggers.append(instantiate(conf, **extra))
    return loggers


def resume_checkpoint(cfg: DictConfig) -> tuple[Path | None, int | None]:
    """The checkpoint this run resumes from (``ckpt_path``; ``last`` = this run folder's) and its RL step.

    Read weights-only first, so a truncated, empty, foreign or malicious file fails here with one message naming
    it, before anything is built.
    """
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    if path is None:
        return None, None
    return path, checkpoint_step(read_checkpoint(path))


@contextmanager
def loggers_kept_open(trainer):
    """``trainer.validate`` finalizes the loggers at its end, and TensorBoard then starts a second event file for
    ``fit``; keep them open (flushed) across ``validate_first``, so a run has one."""
    for logger in trainer.loggers:
        logger.finalize = lambda status, logger=logger: logger.save()
    try:
        yield
    finally:
        for logger in trainer.loggers:
            del logger.finalize


def stop_signals(trainer) -> list[int]:
    """The signals that stop a run at an RL step boundary (``simko.runs``): SIGTERM, and SLURM's requeue signal when
    Lightning's SLURM environment requeues (``auto_requeue``, the default under SLURM)."""
    # Lightning's own signal connector reads the cluster environment from the accelerator connector, too.
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        return [signal.SIGTERM, environment.requeue_signal]
    return [signal.SIGTERM]


def exit_stopped(trainer, cfg: DictConfig, every_rank: bool = False) -> None:
    """After a stop on a signal: say what was saved and how to continue (requeue under SLURM), unless GracefulStop
    did before the ranks' barrier; exit 128 + signal. ``every_rank``: all ranks stop here (they agreed), so none
    leaves before rank 0 has reported (see GracefulStop)."""
    signum = stop_signal() or signal.SIGTERM
    stopper = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if trainer.is_global_zero and not (stopper is not None and stopper.reported):
        report_stop(trainer, cfg)
    if every_rank and trainer.world_size > 1:
        trainer.strategy.barrier("simko_stop")
    raise SystemExit(128 + signum)


def report_stop(trainer, cfg: DictConfig) -> None:
    """Global rank 0, after a stop on a signal: what was saved, the command that continues the run; under SLURM's
    requeue signal, requeue the job."""
    signum = stop_signal() or signal.SIGTERM
    name = signal.Signals(signum).name
    rl_step = int(trainer.lightning_module.rl_step)
    run_dir = Path(cfg.paths.output_dir)
    saver = next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)
    if saver is None:
        saved = "this run writes no checkpoints (callbacks.model_checkpoint is off): it can't be continued"
    elif saver.last_path.is_file():
        step = checkpoint_step(read_checkpoint(saver.last_path))
        saved = f"{saver.last_path} holds RL step {step}; continue the run with:\n  {resume_command(run_dir)}"
    else:
        saved = f"no RL step finished, so there is no checkpoint; start it again with:\n  {resume_command(run_dir)}"
    print(f"error: stopped by {name} after RL step {rl_step} of {cfg.rl_steps}: {saved}", file=sys.stderr)
    if signum != signal.SIGTERM:
        requeue_slurm_job()


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job, as Lightning's SLURM auto-requeue does."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job.replace("_", "").isdigit():
        print(f"error: no SLURM job id to requeue (SLURM_JOB_ID={job!r})", file=sys.stderr)
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        status = result.returncode
    except (OSError, subprocess.TimeoutExpired) as err:
        status = str(err)
    if status == 0:
        print(f"requeued SLURM job {job}: its command continues the run when it starts again", file=sys.stderr)
    else:
        print(f"error: `scontrol requeue {job}` failed ({status}): requeue the job yourself", file=sys.stderr)


def train(cfg: DictConfig) -> dict[str, float]:
    try:
        ckpt, resume_step = resume_checkpoint(cfg)
        if ckpt is not None:
            loss = OmegaConf.to_container(cfg.loss, resolve=True)
            check_same_loss(read_checkpoint(ckpt), loss, ckpt, continued=continued_run_step() is not None)
        module, datamodule, trainer = build(cfg, resume_step)
        if ckpt is not None:
            check_fits(read_checkpoint(ckpt), module, ckpt)  # another architecture: one message, not a traceback
    except CONFIG_ERRORS as err:
        exit_with_config_error(err)
    log_run_start(trainer, cfg)  # the resolved config to every logger; one line on the console
    with stopping_on_signals(stop_signals(trainer)):
        try:
            if cfg.get("validate_first") and ckpt is None:
                # the starting point of the val/* curves (step 0); the progress bar logs the result in one line
                with loggers_kept_open(trainer):
                    trainer.validate(module, datamodule=datamodule, verbose=False)
                if stop_agreed(trainer):  # the same answer on every rank: all of them stop here
                    exit_stopped(trainer, cfg, every_rank=True)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        except (RunStopped, SIGTERMException):
            exit_stopped(trainer, cfg)
        except VerifierError as err:  # a verifier broke its contract (not one score per completion): its bug
            print(f"error: {err} (at RL step {int(module.rl_step) + 1})", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                print(f"error: the disk is full: {err}", file=sys.stderr)
            elif err.errno == errno.ELOOP:  # a link put in place of a run's file (simko.atomic.append)
                print(f"error: {err}", file=sys.stderr)
            else:
                raise
            raise SystemExit(1) from None
    if stop_signal() is not None:  # it came during the last RL step: the run is complete
        log.info("received %s after the last RL step: the run is complete", signal.Signals(stop_signal()).name)
    log_run_outputs(trainer, cfg)  # where the run dir, the last checkpoint and the metrics are
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(config_path=check_config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
