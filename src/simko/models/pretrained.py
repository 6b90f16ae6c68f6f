"""Load any Hugging Face causal LM checkpoint from a local folder (``model=hf model.name_or_path=...``).

This project never downloads weights on its own: a name that is not an existing folder is an error at start,
before anything else is built, unless the user opts in with ``allow_download=True`` (and the hub is reachable).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A config string ("float32", "bf16", ...) as a torch dtype; "auto" is passed through to transformers."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def prepare_for_generation(model, tokenizer):
    """Left padding and a pad token, as batched ``generate`` with an attention mask needs.

    A tokenizer without a pad token gets its EOS token: padded positions are masked out, so which id
    fills them does not matter, only that it exists.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = model.generation_config
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def missing_model_message(name_or_path: str, allow_download: bool) -> str:
    what = "is a file, not a checkpoint folder" if Path(name_or_path).expanduser().is_file() else "does not exist"
    message = f"model path {name_or_path!r} {what} (model.name_or_path={name_or_path}); "
    if allow_download:
        return message + (
            "model.allow_download=true was set, but HF_HUB_OFFLINE=1 forbids the download. Unset HF_HUB_OFFLINE "
            "or point model.name_or_path at a local folder."
        )
    return message + (
        "this project never downloads weights on its own. Put the checkpoint (config.json, weights, tokenizer) "
        f"in a local folder, e.g. `hf download {name_or_path} --local-dir <folder>` on a machine with internet, "
        "and set model.name_or_path=<folder>; or set model.allow_download=true to let transformers fetch it."
    )


def load_pretrained(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    allow_download: bool = False,
):
    """``(model, tokenizer)`` from a local checkpoint folder (``save_pretrained`` layout).

    A hub id is only accepted with ``allow_download=True`` and HF_HUB_OFFLINE unset.
    """
    name_or_path = str(name_or_path)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        source, local_only = str(folder), True
    elif allow_download and not hub_offline():
        source, local_only = name_or_path, False
    else:
        raise FileNotFoundError(missing_model_message(name_or_path, allow_download))

    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        local_files_only=local_only,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local_only)
    return prepare_for_generation(model, tokenizer)
