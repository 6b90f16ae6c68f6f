"""Rollouts and the RL step's bookkeeping: masks, trimming, micro-batch accumulation."""

import copy

import pytest
import torch

from helpers import digit_tokenizer, random_qwen2
from simko.losses import build_loss
from simko.module import RLVRModule
from simko.rollout import generate_rollouts, response_mask_from_tokens


def test_response_mask_stops_after_first_eos():
    resp = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 5, 5, 5]])
    mask = response_mask_from_tokens(resp, [1])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


def test_rollouts_are_seeded_and_prompt_major():
    tok, model = digit_tokenizer(), random_qwen2()
    a = generate_rollouts(model, tok, ["12+3=", "5+5="], group_size=3, max_new_tokens=5, seed=7)
    b = generate_rollouts(model, tok, ["12+3=", "5+5="], group_size=3, max_new_tokens=5, seed=7)
    c = generate_rollouts(model, tok, ["12+3=", "5+5="], group_size=3, max_new_tokens=5, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.num_rows == 6 and a.group_size == 3
    # rows 0..2 share prompt 0, rows 3..5 prompt 1 (left-padded)
    assert torch.equal(a.input_ids[0, : a.prompt_len], a.input_ids[2, : a.prompt_len])
    assert a.input_ids[3, 0].item() == tok.pad_token_id
    # attention mask = prompt mask + response mask
    assert torch.equal(a.attention_mask[:, a.prompt_len :].bool(), a.response_mask)


def test_rows_trim_padding_columns():
    tok, model = digit_tokenizer(), random_qwen2()
    r = generate_rollouts(model, tok, ["1+1=", "99+99="], group_size=2, max_new_tokens=6, seed=0)
    rows = r.rows(torch.tensor([0, 1]))  # only the short prompt: its left padding columns go
    assert rows["prompt_len"] == len("1+1=")
    assert rows["input_ids"].shape[1] == rows["prompt_len"] + rows["response_mask"].shape[1]
    assert rows["response_mask"][:, -1].any()  # no all-padding tail column


def _module(micro_batch_size: int, **kw) -> RLVRModule:
    tok, model = digit_tokenizer(), random_qwen2(seed=1)
    return RLVRModule(
        model,
        tok,
        build_loss("grpo", **kw),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        group_size=4,
        micro_batch_size=micro_batch_size,
        max_new_tokens=6,
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_accumulation_equals_one_batch(aggregation):
    """Gradient accumulated over micro-batches with the aggregation weights == the one-batch gradient."""
    from simko.losses import aggregation_weight

    big, small = _module(64, aggregation=aggregation), _module(3, aggregation=aggregation)
    small.policy.load_state_dict(big.policy.state_dict())
    r = generate_rollouts(big.policy, big.tokenizer, ["12+3=", "5+5=", "7+40="], group_size=4, max_new_tokens=6, seed=3)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    adv = big.loss_fn.compute_advantages(rewards.view(-1, 4)).reshape(-1)
    grads = []
    for mod in (big, small):
        mod.policy.zero_grad()
        micro = list(torch.arange(r.num_rows).split(mod.micro_batch_size))
        weights = [aggregation_weight(r.response_mask[i], aggregation) for i in micro]
        for idx, w in zip(micro, weights):
            stats = mod.token_stats(mod.policy, r.rows(idx), top_k=0)
            out = mod.loss_fn(stats, stats.logprobs.detach(), adv[idx], rewards[idx])
            (out.loss * w / sum(weights)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in mod.policy.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_group_size_below_two_is_refused():
    tok, model = digit_tokenizer(), random_qwen2()
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        RLVRModule(model, tok, build_loss("grpo"), optimizer=torch.optim.SGD, group_size=1)


def test_reference_built_only_for_kl_and_not_in_state_dict():
    tok, model = digit_tokenizer(), random_qwen2()
    no_kl = RLVRModule(model, tok, build_loss("grpo"), optimizer=torch.optim.SGD, group_size=2)
    assert no_kl._reference is None
    kl = RLVRModule(
        copy.deepcopy(model), tok, build_loss("grpo", kl_coef=0.01), optimizer=torch.optim.SGD, group_size=2
    )
    assert kl._reference is not None
    assert not any(p.requires_grad for p in kl._reference.parameters())
    assert all(k.startswith("policy.") for k in kl.state_dict())


def test_sampling_ignores_generation_config_top_k():
    """Samples come from softmax(logits / T) itself, not from a top-k filter in the model's generation_config."""
    tok, model = digit_tokenizer(), random_qwen2()
    model.generation_config.top_k = 1  # would make sampling greedy if it leaked in
    r = generate_rollouts(model, tok, ["12+3="], group_size=16, max_new_tokens=4, seed=0)
    assert len(set(r.completions)) > 1


def test_shared_prompt_cache_samples_what_the_plain_path_samples(monkeypatch):
    """Prefilling each prompt once and repeating its KV cache G times does not change the samples."""
    import simko.rollout as rollout

    tok, model = digit_tokenizer(), random_qwen2(seed=2)
    prompts = ["12+3=", "5+5=", "71+40="]  # different lengths: left padding inside the shared cache
    assert (
        rollout._shared_prompt_cache(
            model, *tok(prompts, return_tensors="pt", padding=True, padding_side="left").values(), 4, 6
        )
        is not None
    )
    cached = [generate_rollouts(model, tok, prompts, group_size=4, max_new_tokens=6, seed=s) for s in range(3)]
    monkeypatch.setattr(rollout, "_shared_prompt_cache", lambda *a, **k: None)
    plain = [generate_rollouts(model, tok, prompts, group_size=4, max_new_tokens=6, seed=s) for s in range(3)]
    for a, b in zip(cached, plain):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)


def test_shared_prompt_update_matches_the_plain_forward():
    """Prompt run once per group (keys/values indexed out to its rows) == every row recomputing it: values and
    parameter gradients, with mixed prompt lengths and a micro-batch that splits a group."""
    from simko.rollout import _prompt_cache, rollout_token_stats

    tok, model = digit_tokenizer(), random_qwen2(seed=4)
    r = generate_rollouts(model, tok, ["12+3=", "5+5=", "71+40="], group_size=4, max_new_tokens=6, seed=1)
    weights = torch.randn(r.response_mask.shape[1], generator=torch.Generator().manual_seed(0))
    for idx in (torch.arange(12), torch.tensor([2, 3, 4, 5, 6])):  # whole groups; a split group + one-row prompt
        rows = r.rows(idx)
        with torch.no_grad():
            assert _prompt_cache(model, rows, rows["attention_mask"].long().cumsum(-1) - 1) is not None
        results = []
        for share in (True, False):
            model.zero_grad(set_to_none=True)
            s = rollout_token_stats(model, rows, top_k=3, temperature=0.9, share_prompt=share)
            R = s.mask.shape[1]
            loss = ((s.logprobs + 0.3 * s.entropy + s.topk_logprobs.sum(-1)) * weights[:R] * s.mask).sum()
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((s, grads))
        (a, ga), (b, gb) = results
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
