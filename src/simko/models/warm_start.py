"""Supervised warm start on prompt -> answer pairs, and greedy accuracy, for the tiny model.

RL with a 0/1 verifier reward learns nothing from a policy that never answers right, so the tiny model is first
trained a little on correct completions: prompt ``"12+34="`` -> ``"46<eos>"``, cross-entropy on the completion
tokens only. A short run is enough to reach a middling accuracy, which leaves RL room to improve it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from simko.console import track
from simko.kv_cache import position_ids_from_mask

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions without loss (prompt, padding), as transformers' loss expects


class ExampleSource(Protocol):
    def example(self, index: int) -> dict[str, Any]: ...


def completion_text(example: dict[str, Any]) -> str:
    """What the warm start trains on: the example's ``solution`` (one right completion, for tasks whose ``answer``
    is a verifier's gold such as ``countdown_steps``) when it has one, else its ``answer``."""
    return str(example.get("solution") or example["answer"])


def completion_batch(tokenizer, examples: list[dict[str, Any]], prompt_template: str) -> dict[str, Tensor]:
    """Left-padded ``prompt + completion + eos`` rows, with labels only on ``completion + eos``
    (``completion_text``: the answer, or the example's solution).

    Prompts are tokenized without special tokens, exactly as rollouts tokenize them, so the warm start sees
    the same token sequences RL will.
    """
    rows, label_rows = [], []
    for example in examples:
        prompt = tokenizer(prompt_template.format(**example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(completion_text(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        labels[i, width - len(row) :] = torch.tensor(label_row)
        attention_mask[i, width - len(row) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "labels": labels,
    }


def supervised_warm_start(
    model,
    tokenizer,
    source: ExampleSource,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    prompt_template: str = "{question}=",
    device: str = "cpu",
    log_every: int = 100,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps; returns the loss of every step.

    Step ``s`` uses examples ``s * batch_size ... (s + 1) * batch_size - 1`` of ``source``, so the data order is
    fixed by the source's seed alone.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    # Linear warm-up from 0, then cosine decay to 10 % of lr.
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(warmup_steps, steps), num_training_steps=steps, min_lr_rate=0.1
    )
    losses = []
    start = time.perf_counter()
    for step in track(range(steps), "warm start", info=lambda: f"loss {losses[-1]:.4f}", transient=True):
        examples = [source.example(step * batch_size + j) for j in range(batch_size)]
        batch = {k: v.to(device) for k, v in completion_batch(tokenizer, examples, prompt_template).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log.info(
                "warm start step %d/%d: loss %.4f, lr %.2e, %.1f s",
                step + 1, steps, sum(losses[-log_every:]) / len(losses[-log_every:]),
                schedule.get_last_lr()[0], time.perf_counter() - start,
            )  # fmt: skip
    model.eval()
    return losses


def text_before_eos(tokenizer, token_ids: list[int]) -> str:
    """The decoded response up to its first EOS, stripped."""
    if tokenizer.eos_token_id in token_ids:
        token_ids = token_ids[: token_ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_accuracy(
    model,
    tokenizer,
    examples: list[dict[str, Any]],
    prompt_template: str = "{question}=",
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> float:
    """Share of ``examples`` whose greedy completion (up to EOS, stripped) equals the answer exactly, or, for an
    example whose ``verifier`` is not ``exact``, that its verifier scores 1."""
    if not examples:
        raise ValueError("greedy_accuracy needs at least one example")
    if max_new_tokens is None:  # room for the longest answer, its EOS, and one token of slack
        max_new_tokens = max(len(completion_text(e)) for e in examples) + 2
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin : begin + batch_size]
        prompts = [prompt_template.format(**e) for e in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses = out[:, enc["input_ids"].shape[1] :].tolist()
        for example, response in zip(chunk, responses):
            text = text_before_eos(tokenizer, response)
            if example.get("verifier", "exact") == "exact":
                correct += text == str(example["answer"]).strip()
            else:  # a task with many right completions (countdown_steps, ...): its verifier decides
                from simko.rewards import score_batch

                correct += score_batch([text], [example["answer"]], example["verifier"])[0] >= 1.0
    model.train(was_training)
    return correct / len(examples)
