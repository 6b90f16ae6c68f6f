"""TEMPORARY shim on the vllm branch (benchmark smoke runs): the structure branch's engines/hf.py replaces it."""

from __future__ import annotations

import torch

from simko.engines.base import RolloutEngine, Sampling, register_engine
from simko.rollout import _shared_prompt_cache, build_rollouts, eos_ids


@register_engine("hf")
class HFEngine(RolloutEngine):
    def __init__(self, policy, tokenizer, synced_gpus: bool = False):
        self.policy, self.tokenizer, self.synced_gpus = policy, tokenizer, synced_gpus

    def sync_weights(self, policy) -> None:
        self.policy = policy

    @torch.no_grad()
    def generate(self, prompt_ids, group_size: int, sampling: Sampling):
        model, tok = self.policy, self.tokenizer
        device = next(model.parameters()).device
        eos = eos_ids(model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        ids, mask = ids.to(device), mask.to(device)
        cache = _shared_prompt_cache(model, ids, mask, group_size, sampling.max_new_tokens)
        extra = {} if cache is None else {"past_key_values": cache}
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sampling.seed)
            out = model.generate(
                input_ids=ids.repeat_interleave(group_size, 0),
                attention_mask=mask.repeat_interleave(group_size, 0),
                **extra,
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                synced_gpus=self.synced_gpus,
            )
        model.train(was_training)
        return build_rollouts(tok, prompt_ids, out[:, width:].tolist(), group_size, eos, device=device)
