"""Small offline fixtures shared by tests: a digit tokenizer and a random 2-layer Qwen2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = list("0123456789+=")
# The shared offline data root (conftest.py sets SIMKO_DATA_DIR to ../shared/data unless it is set).
DATA_DIR = Path(os.environ["SIMKO_DATA_DIR"])

# A small tiny model without a warm start: built in about a second (vocabulary 100, context 128 tokens), for runs
# that fail or stop before any training matters.
UNTRAINED_TINY = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.warm_start_steps=0",
    "model.eval_problems=0",
]

# A smaller tiny model than the default (2 layers, width 64), warm-started for a few steps only: the integration
# tests' model, built once per test module into its cache.
SMALL_TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.warm_start_steps=40",
    "model.eval_problems=32",
]


def rl_metrics(run_dir: Path):
    """A run's ``csv/metrics.csv`` rows of the RL steps (validation-only rows dropped), indexed by RL step."""
    import pandas as pd

    frame = pd.read_csv(Path(run_dir) / "csv" / "metrics.csv")
    return frame[frame["train/reward"].notna()].set_index("train/rl_step")


def shared_file(relative: str) -> Path:
    """A file under the shared data root; the calling test skips (naming the path) when it is absent."""
    path = DATA_DIR / relative
    if not path.is_file():
        pytest.skip(f"shared data file {path} not present (set SIMKO_DATA_DIR to the data root)")
    return path


def digit_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def random_qwen2(vocab_size: int = len(CHARS) + 2, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=1,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).float()


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_config(overrides=(), config_name: str = "train"):
    """The config the CLI composes from ``configs/`` with these overrides, in process (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def loss_configs() -> list[str]:
    """Every loss config (configs/loss/*.yaml): registered classes and presets."""
    return sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))


def make_loss(name: str, **overrides):
    """The loss of ``configs/loss/<name>.yaml`` as ``simko.train`` builds it, with some keys replaced."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config([f"loss={name}"]).loss, resolve=True)
    return instantiate(OmegaConf.merge(cfg, overrides))


def fit_in_process(module, tmp_path, max_steps: int, prompts_per_step: int, logger=False):
    """``Trainer.fit`` of ``module`` in this process on CPU, on 2-digit additions ("{question}=") rendered for
    ``module.tokenizer``, without checkpoints, validation or progress bar; returns the trainer."""
    import lightning.pytorch as pl

    from simko.data import ArithmeticSource, PromptDataModule

    data = PromptDataModule(
        ArithmeticSource(seed=0, split="train"),
        prompts_per_step=prompts_per_step,
        prompt_template="{question}=",
        use_chat_template=False,
        tokenizer=module.tokenizer,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return trainer


class GlooSum:
    """What the module needs of a Lightning strategy for an all-reduce: ``world_size`` and a summing ``reduce``."""

    world_size = 2

    def reduce(self, tensor, reduce_op="mean"):
        import torch.distributed as dist

        assert reduce_op == "sum"
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def run_two_ranks(worker, port_salt: int = 0) -> dict:
    """Run ``worker(rank, port, queue)`` in 2 spawned processes (it joins a gloo group on 127.0.0.1:port and puts
    ``(rank, result)`` on the queue); returns {rank: result} once both exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + (os.getpid() + port_salt) % 1000
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got
