"""The policy's teacher-forced forward over rollouts: the update's side, separate from sampling (``simko.engines``).

:func:`rollout_token_stats` runs the policy over the rows of a :class:`~simko.rollout.Rollouts` batch and returns
the :class:`~simko.losses.TokenStats` of their response tokens, the LM head applied in sequence chunks. The G rows
of a group share their prompt, so each distinct prompt can run once and hand its keys/values to its rows
(:func:`simko.kv_cache.prefix_cache`, which the HF engine uses to prefill each prompt once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.kv_cache import position_ids_from_mask, prefix_cache
from simko.losses.stats import TokenStats


def rollout_token_stats(
    model, rows: dict[str, Tensor], top_k: int, temperature: float, chunk_size: int = 256, share_prompt: bool = True
) -> TokenStats:
    """TokenStats of the response tokens of ``rows`` (see :meth:`Rollouts.rows`) under ``model``.

    ``logits_to_keep=1``: the model computes logits for one position only; the LM head is applied by
    :meth:`TokenStats.from_hidden` in chunks, so no [B, T, V] logits are kept for backward.

    ``share_prompt``: the rows of a group share their prompt, and under causal attention the prompt's hidden
    states never see the response. So each distinct prompt (all but its last token) runs through the model once,
    with autograd, and its per-layer keys/values are handed to the rows that share it (an index into a
    ``DynamicCache``); only the last prompt token and the response run per row. The gradient of a shared prompt
    position is the sum of its rows' gradients, exactly as when every row recomputes it; values agree with the
    unshared forward up to float rounding. With G = 8 and prompts as long as the responses this removes about
    half of the update's FLOPs and activations. It falls back to the plain forward where nothing is shared
    (one row per prompt, one-token prompts) or the model's cache is not a plain ``DynamicCache``.
    """
    attn = rows["attention_mask"]
    position_ids = position_ids_from_mask(attn)
    p = rows["prompt_len"]
    cache = _prompt_cache(model, rows, position_ids) if share_prompt else None
    if cache is None:
        out = model(
            input_ids=rows["input_ids"],
            attention_mask=attn,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = out.hidden_states[-1][:, p - 1 : -1]
    else:
        out = model(
            input_ids=rows["input_ids"][:, p - 1 :],
            attention_mask=attn,
            position_ids=position_ids[:, p - 1 :],
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        hidden = out.hidden_states[-1][:, :-1]
    return TokenStats.from_hidden(
        hidden,
        model.get_output_embeddings(),
        rows["response_tokens"],
        rows["response_mask"],
        top_k=top_k,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def _prompt_cache(model, rows: dict[str, Tensor], position_ids: Tensor):
    """KV cache of ``input_ids[:, :prompt_len - 1]`` computed once per distinct prompt, indexed out to every row
    (differentiable); None where the plain forward is kept (see :func:`rollout_token_stats`)."""
    group, p = rows.get("prompt_index"), rows["prompt_len"]
    if group is None or p < 2:
        return None
    unique, inverse = torch.unique(group, return_inverse=True)
    if len(unique) == len(group):
        return None
    # The first row of each distinct prompt stands for all of its rows.
    first = torch.full((len(unique),), len(group), dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(group), device=group.device), reduce="amin")
    cache = prefix_cache(
        model, rows["input_ids"][first, : p - 1], rows["attention_mask"][first, : p - 1], position_ids[first, : p - 1]
    )
    if cache is not None:
        cache.batch_select_indices(inverse)  # keys/values[inverse]: an index op, so gradients flow back
    return cache
