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
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from simko.config import check_config_dir  # noqa: E402
from simko.engines import check_engine  # noqa: E402

log = logging.getLogger(__name__)
# One RL step = several manual optimizer steps; checkpoints are taken after the step, which is what we want.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")

# Errors a bad config or bad input raises while the run is being built: reported as one message, no traceback.
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, InstantiationException)


def exit_with_config_error(err: BaseException) -> None:
    message = str(err).strip() or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build(cfg: DictConfig):
    """Instantiate model, loss, data, module and trainer from a composed config."""
    L.seed_everything(cfg.seed, workers=True)
    loss = instantiate(cfg.loss)  # first: a bad loss config fails before any model is built
    engine = cfg.rollout.get("engine", "hf")
    check_engine(engine, cfg.rollout.get(engine))  # e.g. rollout.engine=vllm without vLLM: the install command
    policy, tokenizer = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    module = instantiate(cfg.module, policy=policy, tokenizer=tokenizer, loss=loss, **cfg.rollout)
    if cfg.get("rl_steps"):
        with open_dict(cfg):  # Lightning counts optimizer updates; an RL step makes several
            cfg.trainer.max_steps = int(cfg.rl_steps) * module.ppo_epochs * module.num_mini_batches
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    try:
        module, datamodule, trainer = build(cfg)
    except CONFIG_ERRORS as err:
        exit_with_config_error(err)
    if trainer.is_global_zero:
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    if cfg.get("validate_first") and not cfg.get("ckpt_path"):
        trainer.validate(module, datamodule=datamodule)  # the starting point of the val/* curves (step 0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(config_path=check_config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
