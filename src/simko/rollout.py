"""Rollouts: G sampled responses per prompt as padded training tensors, whichever engine sampled them.

An engine (:mod:`simko.engines`) samples token ids; :func:`build_rollouts` turns prompt ids + response ids into
:class:`Rollouts` (left-padded prompt block, response block trimmed to the longest real response, masks, decoded
completions), so every engine shares one code path for padding, masks, trimming and decoding. The rest of this
module are its helpers (EOS ids, padding, the response mask). Sampling (:mod:`simko.engines`) and the update
(:mod:`simko.update`) both read this type; it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Rollouts:
    """N = num_prompts * group_size responses, prompt-major (rows ``i*G .. i*G+G-1`` share prompt ``i``).

    input_ids       [N, P + R]  left-padded prompt block (P columns), then the response block (R columns)
    attention_mask  [N, P + R]  1 on real prompt tokens and on response tokens up to the first EOS (included)
    response_mask   [N, R]      bool, the response part of ``attention_mask``: the tokens a loss is taken over
    completions     decoded response texts (special tokens skipped)
    truncated       [N]         bool: no EOS within max_new_tokens (the response was cut off)
    sampler_logprobs [N, R]     log-prob of each response token under the sampler at the sampling temperature,
                                0 on padding; None when the engine does not report them (HF: the policy is the
                                sampler, so the update recomputes them exactly)
    loss_rows       [N]         bool: the rows the loss is taken over (None: all). Rows left out (masked truncated
                                completions, dynamic sampling's unfilled slots: simko.sampling_filters) add no
                                token to the loss and its weights, but stay in the batch and in the diagnostics
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_len: int
    group_size: int
    completions: list[str]
    truncated: Tensor
    sampler_logprobs: Tensor | None = None
    loss_rows: Tensor | None = None

    @property
    def loss_mask(self) -> Tensor:
        """[N, R] the response tokens of the loss rows (``response_mask`` when every row has a loss)."""
        if self.loss_rows is None:
            return self.response_mask
        return self.response_mask & self.loss_rows[:, None]

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


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [B, max len] of token id lists, left-padded with ``pad_id``."""
    width = max((len(row) for row in ids), default=0)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return input_ids.to(device), mask.to(device)


def pad_token_id(tokenizer, eos: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def build_rollouts(
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    group_size: int,
    eos_token_ids: list[int],
    sampler_logprobs: Sequence[Sequence[float]] | None = None,
    device=None,
) -> Rollouts:
    """:class:`Rollouts` from the ids an engine sampled (the one constructor every engine uses).

    ``prompt_ids``: P prompts; ``response_ids``: P * G responses, prompt-major (rows ``i*G .. i*G+G-1`` answer
    prompt ``i``), each the sampled tokens in order; tokens after a row's first EOS are ignored, a row without EOS
    is truncated. ``sampler_logprobs``: per sampled token, the sampler's log-prob, or None.
    """
    if len(response_ids) != len(prompt_ids) * group_size:
        raise ValueError(
            f"{len(response_ids)} responses for {len(prompt_ids)} prompts x group_size {group_size}: "
            "an engine must return group_size responses per prompt, prompt-major"
        )
    pad_id = pad_token_id(tokenizer, eos_token_ids)
    prompt, prompt_mask = left_pad(prompt_ids, pad_id, device)
    input_ids = prompt.repeat_interleave(group_size, dim=0)
    attention_mask = prompt_mask.repeat_interleave(group_size, dim=0)

    # At least one column: rows with no new token keep one padding column, all masked.
    width = max(max((len(row) for row in response_ids), default=0), 1)
    response = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(response_ids), dtype=torch.long)
    for i, row in enumerate(response_ids):
        response[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        lengths[i] = len(row)
    response, lengths = response.to(input_ids.device), lengths.to(input_ids.device)
    in_row = torch.arange(width, device=response.device)[None, :] < lengths[:, None]
    response_mask = response_mask_from_tokens(response, eos_token_ids) & in_row
    has_eos = (torch.isin(response, torch.tensor(eos_token_ids, device=response.device)) & in_row).any(1)
    # Trim response columns that are padding in every row (generation ran to the longest one anyway).
    resp_len = max(int(response_mask.sum(1).max()), 1)
    response, response_mask = response[:, :resp_len], response_mask[:, :resp_len]
    response = torch.where(response_mask, response, torch.full_like(response, pad_id))
    logprobs = None
    if sampler_logprobs is not None:
        logprobs = torch.zeros(response_mask.shape, dtype=torch.float32)
        for i, row in enumerate(sampler_logprobs):
            row = list(row)[:resp_len]
            logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        logprobs = torch.where(response_mask, logprobs.to(response.device), 0.0)
    completions = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollouts(
        input_ids=torch.cat([input_ids, response], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_len=input_ids.shape[1],
        group_size=group_size,
        completions=completions,
        truncated=~has_eos,
        sampler_logprobs=logprobs,
    )
