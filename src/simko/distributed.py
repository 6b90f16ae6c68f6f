"""Helpers for the sharded strategies (configs/trainer/fsdp*.yaml)."""

from __future__ import annotations

import torch

DECODER_BLOCKS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")


def transformer_block_policy(block_names: tuple[str, ...] | list[str] = DECODER_BLOCKS):
    """An FSDP1 ``auto_wrap_policy`` that wraps every decoder block, matched by class name.

    By name rather than by class so the YAML needs no import of a model-specific class; add names for other
    architectures (``trainer.strategy.auto_wrap_policy.block_names=[...]``).
    """
    names = set(block_names)

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return True if recurse else type(module).__name__ in names

    return policy
