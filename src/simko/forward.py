"""The policy's teacher-forced forward over rollouts: the update's side, separate from sampling (``simko.engines``).

:func:`rollout_token_stats` runs the policy over the rows of a :class:`~simko.rollout.Rollouts` batch and returns
the :class:`~simko.losses.TokenStats` of their response tokens, the LM head applied in sequence chunks. The G rows
of a group share their prompt, so each distinct prompt can run once and hand its keys/values to its rows
(:func:`simko.kv_cache.prefix_cache`, which the HF engine uses to prefill each prompt once). With
``padding_free`` the rows are packed into one sequence without padding, each distinct prompt once with
``share_prompt`` (:func:`packed_token_stats`).

Activation checkpointing of the transformer blocks, for the update's forward only (``module.gradient_checkpointing``):
:func:`enable_checkpointing` replaces each block's ``forward`` with one that, when autograd is on, runs the block
under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only the block's input is kept for backward and
its activations are recomputed there. Under ``torch.no_grad`` (generation, old and reference log-probs,
validation) the block runs as before. The replaced ``forward`` is an instance attribute, so parameter and
state-dict names stay what they were (the vLLM weight push and checkpoints see the same names).

transformers' own ``gradient_checkpointing_enable`` drops the KV cache in every block it checkpoints
(``GradientCheckpointingLayer``), which would cut the shared-prompt rows off their prompt. Here the cache is kept:
a block that appends to a ``DynamicCache`` runs on a read-only view of its layer (the keys/values present before
the block, plus the block's own), so the recomputation in backward sees the prefix the forward saw; the block's
keys/values are written into the real cache after it. The non-reentrant checkpoint needs no
``enable_input_require_grads`` under LoRA (frozen embeddings) and composes with FSDP2 when enabled before
``fully_shard`` (the recomputation runs inside the block's FSDP unit, after its pre-backward all-gather).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from simko.distributed import transformer_blocks
from simko.kv_cache import position_ids_from_mask, prefix_cache
from simko.losses.stats import TokenStats


def rollout_token_stats(
    model,
    rows: dict[str, Tensor],
    top_k: int,
    temperature: float,
    chunk_size: int = 256,
    share_prompt: bool = True,
    padding_free: bool | str = False,
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

    ``padding_free``: :func:`packed_token_stats`, the prompt shared there too with ``share_prompt``; ``"auto"``:
    packed where that computes fewer FLOPs than padding (:func:`packing_is_cheaper`).
    """
    if padding_free == "auto":
        padding_free = packing_is_cheaper(model, rows, share_prompt)
    if padding_free:
        return packed_token_stats(model, rows, top_k, temperature, chunk_size, share_prompt)
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


def packed_token_stats(
    model, rows: dict[str, Tensor], top_k: int, temperature: float, chunk_size: int = 256, share_prompt: bool = False
) -> TokenStats:
    """:func:`rollout_token_stats` without padding: the real tokens of all rows (prompt, then response) packed into
    one sequence of batch size 1, with position ids restarting at 0 on each row and no attention mask, from which
    transformers builds a block-diagonal causal mask (sdpa, eager: ``find_packed_sequence_indices``; flash
    attention: variable-length kernels from the same position ids), so no token attends to another row. The LM
    head runs on the real response positions only; the statistics come back as ``[rows, response columns]``, zero
    on padding (masked).

    ``share_prompt`` (sdpa attention): each distinct prompt (all but its last token) runs once, packed
    with the other distinct prompts, and the rows' last prompt token and response are packed after them with a mask
    in which each row sees its own prompt and itself (:func:`_shared_prompt_packed`): neither padding nor G copies of
    a prompt are computed. Where nothing is shared it is the plain packing above."""
    shared = _shared_prompt_packed(model, rows) if share_prompt else None
    if shared is not None:
        out_hidden, packed_index = shared
    else:
        attn = rows["attention_mask"].bool()
        out = model(
            input_ids=rows["input_ids"][attn][None],
            position_ids=position_ids_from_mask(attn)[attn][None],
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        out_hidden = out.hidden_states[-1]
        # The packed index of every padded position (valid where attn is set); the hidden state that predicts
        # response token t of a row sits at its column prompt_len - 1 + t.
        packed_index = (attn.flatten().long().cumsum(0).view(attn.shape) - 1)[:, rows["prompt_len"] - 1 :]
    response_mask = rows["response_mask"].bool()
    B, R = response_mask.shape
    hidden = out_hidden[:, packed_index[:, :R][response_mask]]
    tokens = rows["response_tokens"][response_mask][None]
    packed = TokenStats.from_hidden(
        hidden,
        model.get_output_embeddings(),
        tokens,
        torch.ones_like(tokens, dtype=torch.bool),
        top_k=top_k,
        temperature=temperature,
        chunk_size=chunk_size * B,  # as many positions per chunk as the padded path's B rows x chunk_size
    )

    def unpack(x: Tensor) -> Tensor:
        full = x.new_zeros((B, R, *x.shape[2:]))
        full[response_mask] = x[0]
        return full

    return TokenStats(
        unpack(packed.logprobs),
        unpack(packed.entropy),
        unpack(packed.topk_logprobs),
        unpack(packed.topk_ids),
        response_mask,
    )


def packing_is_cheaper(model, rows: dict[str, Tensor], share_prompt: bool) -> bool:
    """Whether the packed forward of ``rows`` computes fewer FLOPs than the padded one (:func:`forward_flops`).
    Packing removes padding but, without a variable-length kernel, attends over the whole packed sequence: it wins
    on ragged lengths and loses on nearly equal ones (``benchmarks/update_step.py`` counts both on SmolLM2)."""
    return forward_flops(model, rows, share_prompt, packed=True) < forward_flops(model, rows, share_prompt, False)


def forward_counts(model, rows: dict[str, Tensor], share_prompt: bool, packed: bool) -> tuple[int, int, int]:
    """(token positions through the blocks, attention score entries, LM-head positions) of the forward of ``rows``
    (:func:`rollout_token_stats` with these knobs). Score entries are the queries x keys of each attention call:
    sdpa with a mask computes every entry, so a packed sequence costs the square of its length; flash attention's
    variable-length kernel only each row's own."""
    attn = rows["attention_mask"].bool()
    B, W = attn.shape
    p = rows["prompt_len"]
    R = W - p
    varlen = getattr(model.config, "_attn_implementation", None) in ("flash_attention_2", "flash_attention_3")
    group = rows.get("prompt_index")
    distinct = len(torch.unique(group)) if group is not None else B
    shared = share_prompt and p >= 2 and distinct < B
    head = int(rows["response_mask"].sum()) if packed else B * R
    if shared and packed and not varlen:  # as _shared_prompt_packed (flash attention: plain packing)
        prefix = distinct * (p - 1)
        L = int(attn[:, p - 1 :].sum())
        return prefix + L, distinct * (p - 1) ** 2 + L * (prefix + L), head
    if shared and not packed:
        return distinct * (p - 1) + B * (R + 1), distinct * (p - 1) ** 2 + B * (R + 1) * W, head
    if packed:
        lengths = attn.sum(1)
        T = int(lengths.sum())
        return T, int((lengths * lengths).sum()) if varlen else T * T, head
    return B * W, B * W * W, head


def forward_flops(model, rows: dict[str, Tensor], share_prompt: bool, packed: bool) -> int:
    """FLOPs of the forward of ``rows`` from :func:`forward_counts`: 2 x block parameters per token position,
    4 x hidden x layers per attention score entry, 2 x vocab x hidden per LM-head position."""
    positions, scores, head = forward_counts(model, rows, share_prompt, packed)
    config = model.config
    blocks = getattr(model, "_simko_block_params", None)
    if blocks is None:
        blocks = sum(param.numel() for block in transformer_blocks(model) for param in block.parameters())
        object.__setattr__(model, "_simko_block_params", blocks)
    hidden = config.hidden_size
    attention = 4 * hidden * config.num_hidden_layers * scores
    return 2 * blocks * positions + attention + 2 * config.vocab_size * hidden * head


def _shared_prompt_packed(model, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(last hidden states [1, L, D] of the rows' packed last prompt token + response, the packed index [B, 1 + R] of
    each of those columns) with each distinct prompt run once; None where nothing is shared, the attention is not
    sdpa or eager (flash attention takes no such mask) or the cache is not a plain ``DynamicCache``.

    The distinct prompts but their last token run as one batch (:func:`simko.kv_cache.prefix_cache`, left padding
    masked); their keys/values are laid end to end as one prefix of ``u * (p - 1)`` positions. The rows' parts follow
    it as one packed sequence, with a 4D boolean mask: a query of row i sees the real positions of its own prompt's
    stretch of the prefix, and its own row up to itself."""
    group, p = rows.get("prompt_index"), rows["prompt_len"]
    if group is None or p < 2 or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return None
    unique, inverse = torch.unique(group, return_inverse=True)
    if len(unique) == len(group):
        return None
    attn = rows["attention_mask"].bool()
    position_ids = position_ids_from_mask(attn)
    first = _first_of_each(inverse, len(unique))
    prompt_mask = attn[first, : p - 1]
    cache = prefix_cache(model, rows["input_ids"][first, : p - 1], prompt_mask.long(), position_ids[first, : p - 1])
    if cache is None:
        return None
    for layer in cache.layers:  # [u, heads, p - 1, d] -> [1, heads, u * (p - 1), d]: the prompts end to end
        layer.keys, layer.values = (x.transpose(0, 1).flatten(1, 2)[None] for x in (layer.keys, layer.values))
    part = attn[:, p - 1 :]  # each row's last prompt token and its real response tokens
    allowed = shared_prompt_mask(part, inverse, prompt_mask)
    out = model(
        input_ids=rows["input_ids"][:, p - 1 :][part][None],
        attention_mask=allowed,
        position_ids=position_ids[:, p - 1 :][part][None],
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    packed_index = part.flatten().long().cumsum(0).view(part.shape) - 1
    return out.hidden_states[-1], packed_index


def shared_prompt_mask(part: Tensor, inverse: Tensor, prompt_mask: Tensor) -> Tensor:
    """The [1, 1, L, u * (p - 1) + L] boolean mask (True: attends) of the rows' packed parts (``part`` [B, 1 + R]:
    the columns of each row that are packed, in row order) over the distinct prompts' prefix (``prompt_mask``
    [u, p - 1]: its real positions; ``inverse`` [B]: each row's prompt) and the packed parts."""
    row_of = torch.arange(len(inverse), device=part.device)[:, None].expand_as(part)[part]
    own = (row_of[:, None] == row_of[None, :]).tril()  # packed in row order: causal within the row
    width = prompt_mask.shape[1]
    prefix_owner = torch.arange(len(prompt_mask), device=part.device).repeat_interleave(width)
    sees_prefix = (inverse[row_of][:, None] == prefix_owner[None, :]) & prompt_mask.flatten()[None, :]
    return torch.cat([sees_prefix, own], dim=1)[None, None]  # sdpa's boolean mask


def _first_of_each(inverse: Tensor, count: int) -> Tensor:
    """The first row of each of ``count`` distinct prompts (``inverse``: each row's prompt)."""
    first = torch.full((count,), len(inverse), dtype=torch.long, device=inverse.device)
    return first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin")


def _prompt_cache(model, rows: dict[str, Tensor], position_ids: Tensor):
    """KV cache of ``input_ids[:, :prompt_len - 1]`` computed once per distinct prompt, indexed out to every row
    (differentiable); None where the plain forward is kept (see :func:`rollout_token_stats`)."""
    group, p = rows.get("prompt_index"), rows["prompt_len"]
    if group is None or p < 2:
        return None
    unique, inverse = torch.unique(group, return_inverse=True)
    if len(unique) == len(group):
        return None
    first = _first_of_each(inverse, len(unique))  # the first row of each distinct prompt stands for all of its rows
    cache = prefix_cache(
        model, rows["input_ids"][first, : p - 1], rows["attention_mask"][first, : p - 1], position_ids[first, : p - 1]
    )
    if cache is not None:
        cache.batch_select_indices(inverse)  # keys/values[inverse]: an index op, so gradients flow back
    return cache


# ---------------------------------------------------------------------------------------------- checkpointing
def enable_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` in its autograd forwards; returns the number of blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        if not is_checkpointed(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (benchmarks compare both in one process)."""
    for block in transformer_blocks(model):
        if is_checkpointed(block):
            del block.forward


def is_checkpointed(block: torch.nn.Module) -> bool:
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
