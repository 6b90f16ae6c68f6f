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
