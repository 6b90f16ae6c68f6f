"""A one-line description of a model for logs: class, parameter counts, dtype, attention implementation."""

from __future__ import annotations

from torch import nn


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def model_summary(model: nn.Module) -> str:
    """E.g. ``Qwen2ForCausalLM: 2.94M parameters (2.94M trainable, 0.03M embedding), float32, attn=sdpa``.

    Tied weights (embedding = output layer) are counted once.
    """
    params = list(model.parameters())  # nn.Module.parameters() already skips tied duplicates
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    parts = [f"{_millions(trainable)} trainable"]
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None:
        parts.append(f"{_millions(embeddings.weight.numel())} embedding")
    text = f"{type(model).__name__}: {_millions(total)} parameters ({', '.join(parts)})"
    if params:
        text += f", {params[0].dtype}".replace("torch.", "")
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn:
        text += f", attn={attn}"
    return text
