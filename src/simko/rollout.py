"""Rollouts: sample G responses per prompt with the policy and turn them into padded training tensors.

Generation is the dominant cost of an RLVR step (trl #2610): all G x prompts of a rank are decoded in ONE
batched ``generate`` call with the KV cache, and the response block is trimmed to the longest real response.
The G rows of a group share their prompt, so the prompt is prefilled once per prompt (not once per row) and its
KV cache is repeated G times before decoding starts (see ``_shared_prompt_cache``).
Sampling is seeded per (seed, step, rank) inside a forked RNG, so a resumed run samples exactly what the
uninterrupted run would have, without storing RNG state in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from simko.losses.stats import TokenStats


@dataclass
class Rollouts:
    """N = num_prompts * group_size responses, prompt-major (rows ``i*G .. i*G+G-1`` share prompt ``i``).

    input_ids       [N, P + R]  left-padded prompt block (P columns), then the response block (R columns)
    attention_mask  [N, P + R]  1 on real prompt tokens and on response tokens up to the first EOS (included)
    response_mask   [N, R]      bool, the response part of ``attention_mask``: the tokens a loss is taken over
    completions     decoded response texts (special tokens skipped)
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_len: int
    group_size: int
    completions: list[str]
    truncated: Tensor | None = None  # TEMPORARY (vllm branch shim of the structure contract)
    sampler_logprobs: Tensor | None = None  # TEMPORARY (vllm branch shim of the structure contract)

    @property
    def response_tokens(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: Tensor) -> dict[str, Tensor]:
        """Tensors of a subset of rows, with all-padding prompt columns and response tail columns trimmed."""
        attn = self.attention_mask[idx]
        resp_mask = self.response_mask[idx]
        first = int((attn[:, : self.prompt_len].sum(0) > 0).float().argmax()) if self.prompt_len else 0
        resp_len = max(int(resp_mask.sum(1).max()), 1)
        end = self.prompt_len + resp_len
        return {
            "input_ids": self.input_ids[idx, first:end],
            "attention_mask": attn[:, first:end],
            "prompt_len": self.prompt_len - first,
            "response_tokens": self.input_ids[idx, self.prompt_len : end],
            "response_mask": resp_mask[:, :resp_len],
            "prompt_index": idx // self.group_size,  # rows with the same index share their prompt
        }


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, RL step, rank)."""
    return (seed * 1_000_003 + step * 1_009 + rank * 7_919 + 17) % (2**63 - 1)


def response_mask_from_tokens(response: Tensor, eos_token_ids: list[int]) -> Tensor:
    """True up to and including the first EOS of each row (all True when a row has none: truncated)."""
    is_eos = torch.isin(response, torch.tensor(eos_token_ids, device=response.device))
    before_first_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    return before_first_eos


def eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config define no EOS token")
    return ids


def build_rollouts(tokenizer, prompt_ids, response_ids, group_size, eos_token_ids, sampler_logprobs=None, device=None):
    """TEMPORARY (vllm branch shim of the structure contract): Rollouts from prompt ids + response ids."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
    width = max((len(r) for r in prompt_ids), default=0)
    prompt = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, row in enumerate(prompt_ids):
        if row:
            prompt[i, width - len(row) :] = torch.tensor(row)
            prompt_mask[i, width - len(row) :] = 1
    input_ids, attention_mask = prompt.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
    rwidth = max(max((len(r) for r in response_ids), default=0), 1)
    response = torch.full((len(response_ids), rwidth), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in response_ids])
    for i, row in enumerate(response_ids):
        response[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    in_row = torch.arange(rwidth)[None, :] < lengths[:, None]
    is_eos = torch.isin(response, torch.tensor(eos_token_ids)) & in_row
    response_mask = response_mask_from_tokens(response, eos_token_ids) & in_row
    resp_len = max(int(response_mask.sum(1).max()), 1)
    response, response_mask = response[:, :resp_len], response_mask[:, :resp_len]
    response = torch.where(response_mask, response, torch.full_like(response, pad_id))
    logprobs = None
    if sampler_logprobs is not None:
        logprobs = torch.zeros(response_mask.shape)
        for i, row in enumerate(sampler_logprobs):
            row = list(row)[:resp_len]
            logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        logprobs = torch.where(response_mask, logprobs, 0.0).to(device)
    return Rollouts(
        input_ids=torch.cat([input_ids, response], 1).to(device),
        attention_mask=torch.cat([attention_mask, response_mask.long()], 1).to(device),
        response_mask=response_mask.to(device),
        prompt_len=width,
        group_size=group_size,
        completions=tokenizer.batch_decode(response, skip_special_tokens=True),
        truncated=(~is_eos.any(1)).to(device),
        sampler_logprobs=logprobs,
    )


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    synced_gpus: bool = False,
) -> Rollouts:
    """Sample ``group_size`` responses for each prompt in one batched ``generate`` call.

    ``top_k=0`` disables top-k filtering explicitly: otherwise ``generate`` falls back to the model's
    ``generation_config`` (often top_k=50), and the samples would not come from the distribution the loss scores.
    ``synced_gpus`` must be True under sharded data parallelism (FSDP): every rank then keeps stepping until all
    ranks are done, so the parameter all-gathers stay in lockstep.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = next(model.parameters()).device
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
    )
    input_ids = enc["input_ids"].to(device).repeat_interleave(group_size, dim=0)
    attention_mask = enc["attention_mask"].to(device).repeat_interleave(group_size, dim=0)
    prompt_len = input_ids.shape[1]
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    # Prefill each distinct prompt once (no RNG is drawn) and share its KV cache with the G rows of its group.
    cache = _shared_prompt_cache(
        model, enc["input_ids"].to(device), enc["attention_mask"].to(device), group_size, max_new_tokens
    )
    extra = {} if cache is None else {"past_key_values": cache}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **extra,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
    response = out[:, prompt_len:]
    if response.shape[1] == 0:  # max_new_tokens reached 0 new tokens: keep one padding column, all masked
        response = torch.full((out.shape[0], 1), pad_id, dtype=out.dtype, device=out.device)
    response_mask = response_mask_from_tokens(response, eos)
    if out.shape[1] == prompt_len:
        response_mask[:] = False
    # Trim response columns that are padding in every row (generation ran to the longest one anyway).
    resp_len = max(int(response_mask.sum(1).max()), 1)
    response, response_mask = response[:, :resp_len], response_mask[:, :resp_len]
    response = torch.where(response_mask, response, torch.full_like(response, pad_id))
    completions = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollouts(
        input_ids=torch.cat([input_ids, response], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_len=prompt_len,
        group_size=group_size,
        completions=completions,
    )


def _shared_prompt_cache(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int, max_new_tokens: int):
    """KV cache of ``prompt_ids[:, :-1]`` computed once per prompt, repeated ``group_size`` times along the batch.

    ``generate`` then only runs the last prompt token (and the new tokens) for all ``P * G`` rows: the prefill costs
    P rows instead of P * G. The cached keys/values are those ``generate``'s own prefill computes for every row of
    the group (same tokens, mask and positions; causal attention: prompt positions never see the response), up to
    float rounding, so the sampling distribution is unchanged (with the same seed, the tiny model and SmolLM2-135M
    sampled token-for-token the same rollouts as without it). Returns None where the plain path is kept: G = 1,
    one-token prompts, no new tokens, a ``generation_config.cache_implementation`` (static, offloaded, ...), or a
    model whose cache is not a plain ``DynamicCache`` of full-attention layers (then one prefill of P rows is lost).
    """
    if group_size < 2 or prompt_ids.shape[1] < 2 or max_new_tokens < 1:
        return None
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "cache_implementation", None) is not None:
        return None
    ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    # Positions as generate computes them from the attention mask (left padding: pads get position 0).
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = _prefix_cache(model, ids, mask, position_ids)
    if cache is not None:
        cache.batch_repeat_interleave(group_size)
    return cache


def _prefix_cache(model, ids: Tensor, mask: Tensor, position_ids: Tensor):
    """The KV cache of ``ids`` under ``model`` (autograd as the caller's mode), or None where it is not a plain
    ``DynamicCache`` of full-attention layers (sliding windows, static caches, ...): callers then keep the plain,
    unshared path."""
    from transformers import DynamicCache

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if type(cache) is not DynamicCache or cache.get_seq_length() != ids.shape[1]:
        return None
    if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [None])):
        return None
    return cache


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
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
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
    cache = _prefix_cache(
        model, rows["input_ids"][first, : p - 1], rows["attention_mask"][first, : p - 1], position_ids[first, : p - 1]
    )
    if cache is not None:
        cache.batch_select_indices(inverse)  # keys/values[inverse]: an index op, so gradients flow back
    return cache
