"""The keys/values of a prompt shared by several rows, computed once: used by sampling (the HF engine prefills each
prompt once for its G samples, :mod:`simko.engines.hf`) and by the update (each distinct prompt runs once per
micro-batch, :mod:`simko.forward`)."""

from __future__ import annotations

from torch import Tensor
from transformers import DynamicCache


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row, as ``generate`` computes them; left padding gets 0 (it is
    masked anyway), and positions after a row's last real token keep its last position."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefix_cache(model, ids: Tensor, mask: Tensor, position_ids: Tensor):
    """The KV cache of ``ids`` under ``model`` (autograd as the caller's mode), or None where it is not a plain
    ``DynamicCache`` of full-attention layers (sliding windows, static caches, ...): callers then keep the plain,
    unshared path."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if type(cache) is not DynamicCache or cache.get_seq_length() != ids.shape[1]:
        return None
    if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [None])):
        return None
    return cache
