"""Activation checkpointing of the policy's transformer blocks, for the update's forward only.

:func:`enable` replaces each block's ``forward`` (an instance attribute, so parameter and state-dict names stay
what they were: the vLLM weight push and checkpoints see the same names) with one that, when autograd is on, runs
the block under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only the block's input is kept for
backward and its activations are recomputed there. Under ``torch.no_grad`` (generation, old and reference
log-probs, validation) the block runs as before, with no checkpoint in the way.

transformers' own ``gradient_checkpointing_enable`` drops the KV cache in every block it checkpoints
(``GradientCheckpointingLayer``), which would cut the rows of the shared-prompt forward (:mod:`simko.forward`)
off their prompt. Here the cache is kept: a block that appends to a ``DynamicCache`` runs on a read-only view of
its layer (the keys/values present before the block, plus the block's own), so the recomputation in backward
sees the same prefix the forward saw; the block's keys/values are written into the real cache after it. The
non-reentrant checkpoint needs no ``enable_input_require_grads`` under LoRA (frozen embeddings) and composes with
FSDP2 when enabled before ``fully_shard`` (the recomputation runs inside the block's FSDP unit, after its
pre-backward all-gather).
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from simko.distributed import transformer_blocks


def enable(model: torch.nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` in its autograd forwards; returns the number of blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        if not is_enabled(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def disable(model: torch.nn.Module) -> None:
    """Undo :func:`enable` (benchmarks compare both in one process)."""
    for block in transformer_blocks(model):
        if is_enabled(block):
            del block.forward


def is_enabled(block: torch.nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


class _LayerView:
    """One cache layer as the block's attention sees it: ``update`` returns the keys/values present before the
    block followed by the new ones, and stores nothing (so a recomputation gets the same result)."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.prefix = (keys, values)
        self.keys = self.values = None

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self.prefix
        self.keys = key_states if keys is None else torch.cat([keys, key_states], dim=-2)
        self.values = value_states if values is None else torch.cat([values, value_states], dim=-2)
        return self.keys, self.values


def _checkpointed_forward(self, hidden_states, *args, **kwargs):
    forward = types.MethodType(type(self).forward, self)  # the class's own (FSDP2's subclass inherits it)
    if not torch.is_grad_enabled():
        return forward(hidden_states, *args, **kwargs)
    cache = kwargs.get("past_key_values")
    if cache is None:
        return checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
    layer_idx = getattr(getattr(self, "self_attn", None), "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if layer_idx is None or layers is None or type(layers[layer_idx]).__name__ != "DynamicLayer":
        raise NotImplementedError(
            f"gradient checkpointing with a KV cache supports DynamicCache layers of blocks with self_attn.layer_idx "
            f"({type(self).__name__}, {type(cache).__name__}); set module.share_prompt=false"
        )
    layer = layers[layer_idx]
    before = (layer.keys, layer.values) if layer.is_initialized and layer.keys.numel() else (None, None)

    def run(h, *inner_args):
        view = _LayerView(*before)
        out = forward(h, *inner_args, **{**kwargs, "past_key_values": _CacheView(view, layer_idx)})
        return out, view.keys, view.values

    out, keys, values = checkpoint(run, hidden_states, *args, use_reentrant=False)
    # What DynamicLayer.update leaves (set here directly: lazy_initialization's signature varies across versions).
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.keys, layer.values, layer.is_initialized = keys, values, True
    return out


class _CacheView:
    """The cache argument of one block: only its own layer, read-only (:class:`_LayerView`)."""

    def __init__(self, layer: _LayerView, layer_idx: int):
        self.layer, self.layer_idx = layer, layer_idx

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx != self.layer_idx:
            raise RuntimeError(f"block of layer {self.layer_idx} updated the cache of layer {layer_idx}")
        return self.layer.update(key_states, value_states)
