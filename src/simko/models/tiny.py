"""``model=tiny``: a ~3M-parameter Qwen2 with a character tokenizer, warm-started on procedural arithmetic.

Small enough to run RLVR end to end on a laptop CPU. The architecture is Qwen2 (the family of the SimKO
paper's models), so the same code paths (rotary positions, GQA, SDPA, tied embeddings, ``generate``) are
exercised as with a real checkpoint.

The warm-started checkpoint is cached under ``<cache_dir>/tiny-<hash>/`` where the hash covers every argument
that changes the weights; a second run with the same arguments loads it in about a second.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from simko.models.cache import DEFAULT_CACHE_DIR, build_once
from simko.models.char_tokenizer import build_char_tokenizer
from simko.models.pretrained import prepare_for_generation, resolve_dtype
from simko.models.summary import model_summary
from simko.models.warm_start import greedy_accuracy, supervised_warm_start

log = logging.getLogger(__name__)

# Bump when the tokenizer, the architecture code or the warm-start recipe change in a way the arguments do
# not show, so that old cache entries are not reused.
CACHE_FORMAT = 2  # 2: the warm-up of the warm start starts at lr 0 (transformers' cosine schedule)
METADATA_FILE = "simko_warm_start.json"

# simko.data.ArithmeticSource arguments of the warm-start data (besides seed and split). They should match the
# RL data config (configs/data/arithmetic.yaml) so the warm start is on the same problem distribution.
DEFAULT_TASK = {"min_digits": 1, "max_digits": 2, "ops": ["+"], "val_fraction": 0.1}


def build_tiny_model(
    vocab_size: int,
    num_layers: int = 4,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 688,
    max_position_embeddings: int = 128,
    rope_theta: float = 10000.0,
    attn_implementation: str = "sdpa",
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 Qwen2 causal LM (initialisation seeded by ``seed``), dropout 0."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = bos_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model.float().eval()


# The arguments of build_tiny_model that shape the weights: load_tiny takes them as **architecture.
ARCHITECTURE = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
)


def _architecture(given: dict[str, Any]) -> dict[str, Any]:
    """Every ARCHITECTURE argument, given or build_tiny_model's default, with the default's type: int()/float()
    so that e.g. rope_theta=10000 from Python and 10000.0 from YAML give the same cache entry."""
    unknown = sorted(set(given) - set(ARCHITECTURE))
    if unknown:
        raise TypeError(f"load_tiny got unexpected arguments {unknown}; architecture arguments: {list(ARCHITECTURE)}")
    params = inspect.signature(build_tiny_model).parameters
    return {k: type(params[k].default)(given.get(k, params[k].default)) for k in ARCHITECTURE}


def cache_key(args: dict[str, Any]) -> str:
    """Short stable hash of the arguments that determine the weights."""
    text = json.dumps({"format": CACHE_FORMAT, **args}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def arithmetic_source(task: dict[str, Any], seed: int, split: str):
    """The warm-start data: ``simko.data.ArithmeticSource(**task)``, or, when ``task`` has a ``source`` key (an
    import path such as ``simko.data.countdown_steps.CountdownStepsSource``), that class built with the other keys."""
    task = dict(task)
    path = task.pop("source", "simko.data.ArithmeticSource")  # lazy: models should not need the data package
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(seed=seed, split=split, **task)


def load_tiny(
    cache_dir: str = DEFAULT_CACHE_DIR,
    attn_implementation: str = "sdpa",
    warm_start_steps: int = 300,
    warm_start_lr: float = 1e-3,
    warm_start_batch_size: int = 128,
    warm_start_warmup_steps: int = 50,
    warm_start_weight_decay: float = 0.0,
    seed: int = 0,
    task: dict[str, Any] | None = None,
    prompt_template: str = "{question}=",
    eval_problems: int = 500,
    warm_start_device: str = "cpu",
    dtype: str = "float32",
    rebuild: bool = False,
    wait_timeout_s: float = 3600.0,
    warm_start_source: dict[str, Any] | None = None,
    **architecture: Any,
):
    """``(model, tokenizer)``: the tiny model after ``warm_start_steps`` supervised steps, cached on disk.

    ``task`` holds the ``simko.data.ArithmeticSource`` arguments of the warm-start data (default
    ``DEFAULT_TASK``); training uses its train split, and ``eval_problems`` problems of its val split measure
    the greedy accuracy stored next to the checkpoint. ``warm_start_steps=0`` gives the untrained model.
    ``dtype`` and ``attn_implementation`` apply when loading: the warm start always runs in fp32 with SDPA
    attention, so they do not change the cache entry. Neither does ``warm_start_device``, although training on
    another device (or with another number of CPU threads) gives slightly different weights.
    ``rebuild=True`` retrains even when the cache entry exists. ``warm_start_source`` replaces ``task`` by another
    source: ``{"source": "<import path of the class>", **its arguments}`` (``configs/experiment/testbed_task.yaml``);
    its examples' ``solution`` field (else ``answer``) is the completion trained on. ``**architecture``: the
    architecture arguments of :func:`build_tiny_model` (``ARCHITECTURE``), its defaults where not given.
    """
    task = _plain(warm_start_source) if warm_start_source else {**DEFAULT_TASK, **_plain(task or {})}
    weight_args = {
        "architecture": _architecture(architecture),
        "warm_start": {
            "steps": int(warm_start_steps),
            "lr": float(warm_start_lr),
            "batch_size": int(warm_start_batch_size),
            "warmup_steps": int(warm_start_warmup_steps),
            "weight_decay": float(warm_start_weight_decay),
            "seed": int(seed),
            "task": task,
            "prompt_template": str(prompt_template),
        },
    }
    target = Path(cache_dir) / f"tiny-{cache_key(weight_args)}"

    def build(folder: Path) -> None:
        tokenizer = build_char_tokenizer(model_max_length=weight_args["architecture"]["max_position_embeddings"])
        model = build_tiny_model(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            seed=seed,
            attn_implementation="sdpa",
            **weight_args["architecture"],
        )
        log.info("building %s: %s, %d warm-start steps", target, model_summary(model), warm_start_steps)
        start = time.perf_counter()
        losses = []
        if warm_start_steps > 0:
            with torch.enable_grad():  # also when built inside an evaluation (simko.eval runs under no_grad)
                losses = supervised_warm_start(
                    model,
                    tokenizer,
                    arithmetic_source(task, seed, "train"),
                    steps=warm_start_steps,
                    batch_size=warm_start_batch_size,
                    lr=warm_start_lr,
                    weight_decay=warm_start_weight_decay,
                    warmup_steps=warm_start_warmup_steps,
                    prompt_template=prompt_template,
                    device=warm_start_device,
                )
        train_seconds = time.perf_counter() - start
        accuracy = None
        if eval_problems > 0:
            val = arithmetic_source(task, seed, "val")
            examples = [val.example(i) for i in range(eval_problems)]
            accuracy = greedy_accuracy(model, tokenizer, examples, prompt_template)
            log.info("tiny model greedy accuracy on %d val problems: %.3f", eval_problems, accuracy)
        model.cpu().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        metadata = {
            **weight_args,
            "train_seconds": round(train_seconds, 2),
            "final_loss": losses[-1] if losses else None,
            "val_greedy_accuracy": accuracy,
            "val_problems": eval_problems,
        }
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")

    build_once(target, build, rebuild=rebuild, wait_timeout_s=wait_timeout_s)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation, local_files_only=True
    )
    # Not AutoTokenizer: it picks Qwen2Tokenizer from the model config (model_type qwen2), which drops the spaces and
    # newlines the character tokenizer keeps as tokens ("5 1 -> 6\n" would read as "51->6").
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target, local_files_only=True)
    log.info("loaded tiny model from %s: %s", target, model_summary(model))
    return prepare_for_generation(model, tokenizer)


def warm_start_metadata(folder: str | Path) -> dict[str, Any]:
    """What ``load_tiny`` recorded about a cache entry: its arguments, train time, val greedy accuracy."""
    return json.loads((Path(folder) / METADATA_FILE).read_text())


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) as plain dicts/lists, so they hash and serialise like YAML reads."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
