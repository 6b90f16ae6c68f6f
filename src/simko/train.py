"""Train a policy with RLVR: ``python -m simko.train [overrides]`` (or ``simko-train``).

Everything is built from ``configs/train.yaml`` with ``hydra.utils.instantiate``:

    python -m simko.train loss=simko data=arithmetic trainer.max_steps=20
    python -m simko.train -m loss=grpo,simko seed=0,1,2
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from simko.checks import build_data, build_loss, check_against_model, check_train_config, check_world_size  # noqa: E402
from simko.config import check_config_dir, import_modules  # noqa: E402
from simko.console import progress_bar_enabled, quiet_library_warnings  # noqa: E402
from simko.logging_utils import log_run_outputs, log_run_start  # noqa: E402
from simko.models.lora import load_model  # noqa: E402
from simko.rewards import check_verifier_names  # noqa: E402

log = logging.getLogger(__name__)
# One RL step = several manual optimizer steps; checkpoints are taken after the step, which is what we want.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
quiet_library_warnings()

# Errors a bad config or bad input raises while the run is being built: reported as one message, no traceback.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, InstantiationException)


def exit_with_config_error(err: BaseException) -> None:
    message = str(err).strip() or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build(cfg: DictConfig):
    """Instantiate model, loss, data, module and trainer from a composed config."""
    import_modules(cfg.get("imports"))  # user modules (e.g. verifiers) before anything is built
    L.seed_everything(cfg.seed, workers=True)
    check_train_config(cfg)  # missing values, sampling and loss knobs: before anything is built
    loss = build_loss(cfg)  # first: a bad loss config fails before any model is built
    datamodule = build_data(cfg)  # files read and checked before the model; the tokenizer comes later
    policy, tokenizer = load_model(cfg.model)  # the loader, then LoRA when model.lora is set
    datamodule.set_tokenizer(tokenizer)
    check_against_model(policy, datamodule, loss, cfg.rollout.get("max_prompt_tokens"))
    module = instantiate(cfg.module, policy=policy, tokenizer=tokenizer, loss=loss, **cfg.rollout)
    examples = datamodule.examples_for_step(0, rank=0, world_size=1) + datamodule.val_examples(rank=0, world_size=1)
    check_verifier_names([ex["verifier"] for ex in examples], module.verifiers)  # a typo fails now, not at step 1
    if cfg.get("rl_steps"):
        with open_dict(cfg):  # Lightning counts optimizer updates; an RL step makes several
            cfg.trainer.max_steps = int(cfg.rl_steps) * module.ppo_epochs * module.num_mini_batches
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=progress_bar_enabled(cfg.trainer, callbacks),
    )
    check_world_size(datamodule, trainer.world_size)  # here, before DDP starts its processes
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    try:
        module, datamodule, trainer = build(cfg)
    except CONFIG_ERRORS as err:
        exit_with_config_error(err)
    log_run_start(trainer, cfg)  # the resolved config to every logger; one line on the console
    if cfg.get("validate_first") and not cfg.get("ckpt_path"):
        # the starting point of the val/* curves (step 0); the progress bar logs the result in one line
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    log_run_outputs(trainer, cfg)  # where the run dir, the last checkpoint and the metrics are
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(config_path=check_config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
