"""``rollout.engine=hf``: sample with the policy itself, in ONE batched ``transformers`` ``generate`` call.

Generation is the dominant cost of an RLVR step (trl #2610): all G x prompts of a rank are decoded in one batched
call with the KV cache. The G rows of a group share their prompt, so the prompt is prefilled once per prompt (not
once per row) and its KV cache is repeated G times before decoding starts (:func:`shared_prompt_cache`). The
policy is the sampler, so there are no weights to sync and no sampler log-probs to report.

:func:`generate_rollouts` is the one-call convenience (tokenize, sample with this engine) for scripts and tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from simko.engines.base import RolloutEngine, Sampling, register_engine, tokenize_prompts
from simko.kv_cache import position_ids_from_mask, prefix_cache
from simko.rollout import Rollouts, build_rollouts, eos_ids, left_pad, pad_token_id


@register_engine("hf")
class HFEngine(RolloutEngine):
    """Batched ``policy.generate`` with the shared-prompt KV cache, seeded in a forked RNG.

    ``synced_gpus`` must be True under sharded data parallelism (FSDP): every rank then keeps stepping until all
    ranks are done, so the parameter all-gathers stay in lockstep.
    """

    def __init__(self, policy: torch.nn.Module, tokenizer, synced_gpus: bool = False):
        self.policy = policy
        self.tokenizer = tokenizer
        self.synced_gpus = synced_gpus

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy  # the live policy: nothing to copy

    def close(self) -> None:
        self.policy = None  # holds nothing else

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: Sampling) -> Rollouts:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        model, tokenizer = self.policy, self.tokenizer
        device = next(model.parameters()).device
        eos = eos_ids(model, tokenizer)
        prompt, prompt_mask = left_pad(prompt_ids, pad_token_id(tokenizer, eos), device)
        was_training = model.training
        model.eval()
        try:
            # Prefill each distinct prompt once (no RNG is drawn) and share its KV cache with the G rows of its group.
            cache = shared_prompt_cache(model, prompt, prompt_mask, group_size, sampling.max_new_tokens)
            extra = {} if cache is None else {"past_key_values": cache}
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(sampling.seed)
                out = model.generate(
                    input_ids=prompt.repeat_interleave(group_size, dim=0),
                    attention_mask=prompt_mask.repeat_interleave(group_size, dim=0),
                    **extra,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    # 0 disables top-k explicitly: otherwise generate falls back to the model's generation_config
                    # (often top_k=50) and the samples would not come from the distribution the loss scores.
                    top_k=0,
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad_token_id(tokenizer, eos),
                    use_cache=True,
                    synced_gpus=self.synced_gpus,
                )
        finally:
            model.train(was_training)
        responses = out[:, prompt.shape[1] :].tolist()
        return build_rollouts(tokenizer, prompt_ids, responses, group_size, eos, device=device)


def shared_prompt_cache(model, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int, max_new_tokens: int):
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
    cache = prefix_cache(model, ids, mask, position_ids_from_mask(mask))
    if cache is not None:
        cache.batch_repeat_interleave(group_size)
    return cache


def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    synced_gpus: bool = False,
) -> Rollouts:
    """Tokenize ``prompts`` and sample ``group_size`` responses each with the HF engine (scripts and tests; the
    trainer and ``simko.eval`` hold an engine of the configured kind)."""
    engine = HFEngine(model, tokenizer, synced_gpus=synced_gpus)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return engine.generate(tokenize_prompts(tokenizer, prompts, max_prompt_tokens), group_size, sampling)
