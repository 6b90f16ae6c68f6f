"""Warm-start the tiny model explicitly and measure it: ``python -m simko.sft [overrides]`` (or ``simko-sft``).

``model=tiny`` builds (or loads) its warm-started checkpoint whenever it is instantiated, so this script is
optional: it builds the cache ahead of a (multi-process) RL run and prints the greedy accuracy on held-out
problems, to choose ``model.warm_start_steps``:

    python -m simko.sft model.warm_start_steps=600
    python -m simko.sft -m model.warm_start_steps=100,300,1000
"""

from __future__ import annotations

import logging
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from simko.config import check_torch_extensions  # noqa: E402

check_torch_extensions()  # a torchvision built for another torch: the fix, before `import lightning` fails

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from simko.config import check_config_dir  # noqa: E402
from simko.models.lora import load_model  # noqa: E402

log = logging.getLogger(__name__)


def run_sft(cfg: DictConfig) -> float:
    """Build or load ``cfg.model`` (the tiny model) and return its greedy accuracy on held-out problems."""
    from simko.models.tiny import arithmetic_source, warm_start_metadata
    from simko.models.warm_start import greedy_accuracy

    if cfg.model.get("_target_") != "simko.models.load_tiny":
        raise ValueError(f"simko.sft warm-starts model=tiny only; this config's model is {cfg.model.get('_target_')}")
    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model, apply=False)  # the warm start trains the whole model
    ready_seconds = time.perf_counter() - start
    folder = model.name_or_path
    metadata = warm_start_metadata(folder)

    task = OmegaConf.to_container(cfg.model.get("warm_start_source") or cfg.model.task, resolve=True)
    val = arithmetic_source(task, seed=cfg.eval_seed, split="val")
    examples = [val.example(i) for i in range(cfg.eval_problems)]
    start = time.perf_counter()
    accuracy = greedy_accuracy(model, tokenizer, examples, cfg.model.prompt_template, cfg.eval_batch_size)
    eval_seconds = time.perf_counter() - start

    print(f"tiny model checkpoint: {folder}")
    print(
        f"  warm start: {metadata['warm_start']['steps']} steps, trained in {metadata['train_seconds']:.1f} s; "
        f"ready in {ready_seconds:.1f} s this run"
    )
    print(f"  greedy accuracy on {len(examples)} held-out problems: {accuracy:.3f} ({eval_seconds:.1f} s)")
    return accuracy


@hydra.main(config_path=check_config_dir(), config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_sft(cfg)


if __name__ == "__main__":
    main()
