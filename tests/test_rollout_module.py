"""Rollouts, the rollout engines and the RL step's update loop: masks, trimming, the group shuffle, micro-batch
accumulation, old log-probs, engine weight syncs."""

import copy
from collections import defaultdict

import lightning.pytorch as pl
import pytest
import torch

from helpers import digit_tokenizer, random_qwen2
from simko.engines import HFEngine, Sampling, available_engines, build_engine, register_engine
from simko.forward import rollout_token_stats
from simko.losses import build_loss
from simko.module import RLVRModule
from simko.rollout import build_rollouts, generate_rollouts, response_mask_from_tokens, tokenize_prompts
from simko.update import accumulate_gradients, minibatch_rows, update_policy


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


@pytest.mark.parametrize(
    "loss_kwargs",
    [
        {"aggregation": "token_mean"},
        {"aggregation": "seq_mean_token_mean"},
        {"aggregation": "seq_mean_token_sum_norm", "norm_len": 6},
        {"advantage": "nsr", "subset": "nonzero_advantage"},  # NSR over the incorrect responses only
        {"advantage": "psr", "subset": "nonzero_advantage", "aggregation": "seq_mean_token_mean"},
    ],
    ids=str,
)
def test_micro_batch_accumulation_equals_one_batch(loss_kwargs):
    """The module's accumulation over micro-batches with the aggregation weights == the one-batch gradient."""
    big, small = _module(64, **loss_kwargs), _module(3, **loss_kwargs)
    small.policy.load_state_dict(big.policy.state_dict())
    r = generate_rollouts(big.policy, big.tokenizer, ["12+3=", "5+5=", "7+40="], group_size=4, max_new_tokens=6, seed=3)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    adv = big.loss_fn.compute_advantages(rewards.view(-1, 4)).reshape(-1)
    grads = []
    for mod in (big, small):
        mod.policy.zero_grad()
        rows = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11])  # shuffled groups, as a mini-batch
        stats_fn = lambda rows, top_k, mod=mod: mod.token_stats(mod.policy, rows, top_k)  # noqa: E731
        metrics = defaultdict(float)
        accumulate_gradients(mod.loss_fn, r, rows, stats_fn, adv, rewards, mod.micro_batch_size, metrics)
        grads.append((torch.cat([p.grad.flatten() for p in mod.policy.parameters()]), dict(metrics)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    assert grads[0][0].abs().sum() > 0
    assert grads[0][1]["loss"] == pytest.approx(grads[1][1]["loss"], rel=1e-5)


def test_minibatches_hold_whole_groups_and_use_every_row_once_per_epoch():
    G, groups = 4, 5
    gen = torch.Generator().manual_seed(0)
    batches = minibatch_rows(groups * G, G, ppo_epochs=3, num_mini_batches=2, generator=gen)
    assert [len(b) for b in batches] == [12, 8] * 3  # tensor_split: 3 + 2 groups
    epochs = [torch.cat(batches[i : i + 2]) for i in range(0, 6, 2)]
    for rows in epochs:
        assert torch.equal(rows.sort().values, torch.arange(groups * G))  # each row exactly once per epoch
    for rows in batches:
        for g in (rows // G).unique():
            assert torch.equal(rows[rows // G == g], g * G + torch.arange(G))  # whole groups, in order
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch
    again = minibatch_rows(groups * G, G, 3, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded
    # more mini-batches than groups: the empty ones are skipped, not run as empty updates
    assert [len(b) for b in minibatch_rows(2 * G, G, 1, 3, torch.Generator().manual_seed(0))] == [G, G]


@pytest.mark.parametrize("loss_kwargs", [{}, {"aggregation": "seq_mean_token_mean", "clip_eps": 0.05}])
def test_update_policy_ppo_epochs_and_mini_batches_match_a_float64_reference(loss_kwargs):
    """ppo_epochs=2 x num_mini_batches=2 with SGD: every update's gradient (micro-batched, float32, old log-probs
    of the sampling policy) equals a float64 reference computed in one batch per mini-batch, step by step."""
    tok, model = digit_tokenizer(), random_qwen2(seed=5)
    r = generate_rollouts(model, tok, ["12+3=", "5+5=", "71+40="], group_size=4, max_new_tokens=6, seed=2)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    loss_fn = build_loss("grpo", **loss_kwargs)
    adv = loss_fn.compute_advantages(rewards.view(-1, 4)).reshape(-1)
    lr = 2.0  # large: the policy moves, so the ratios of later updates are far from 1 (and clip)
    reference = copy.deepcopy(model).double()
    ref_old = rollout_token_stats(reference, r.rows(torch.arange(12)), 0, 1.0, share_prompt=False).logprobs.detach()

    def stats(m):
        return lambda rows, top_k: rollout_token_stats(m, rows, top_k, 1.0)

    calls = []
    grads = []
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> float:
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
        opt.step()
        return float(grads[-1].norm())

    counting = lambda rows, top_k: calls.append(torch.is_grad_enabled()) or stats(model)(rows, top_k)  # noqa: E731
    metrics, _ = update_policy(
        loss_fn,
        r,
        rewards,
        adv,
        counting,
        step,
        lambda: opt.zero_grad(set_to_none=True),
        torch.Generator().manual_seed(7),
        ppo_epochs=2,
        num_mini_batches=2,
        micro_batch_size=5,
    )
    assert calls.count(False) == 3  # the old log-probs: one no-grad pass over the 12 rows in micro-batches of 5
    batches = minibatch_rows(12, 4, 2, 2, torch.Generator().manual_seed(7))
    assert len(grads) == len(batches) == 4
    clipped = []
    for rows, got in zip(batches, grads):
        reference.zero_grad(set_to_none=True)
        s = rollout_token_stats(reference, r.rows(rows), 0, 1.0, share_prompt=False)
        R = s.mask.shape[1]
        out = loss_fn(s, old_logprobs=ref_old[rows, :R], advantages=adv[rows], rewards=rewards[rows])
        out.loss.backward()
        want = torch.cat([p.grad.flatten() for p in reference.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        clipped.append(out.metrics["clip_frac"])
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
    assert clipped[0] == 0 and max(clipped) > 0  # the first update is on-policy; later ones moved and clip
    assert metrics["grad_norm"] == pytest.approx(sum(float(g.norm()) for g in grads) / 4)


def test_on_policy_update_computes_no_old_logprobs():
    tok, model = digit_tokenizer(), random_qwen2(seed=5)
    r = generate_rollouts(model, tok, ["12+3=", "5+5="], group_size=4, max_new_tokens=6, seed=2)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0])
    loss_fn = build_loss("grpo")
    calls = []
    update_policy(
        loss_fn,
        r,
        rewards,
        loss_fn.compute_advantages(rewards.view(-1, 4)).reshape(-1),
        lambda rows, top_k: calls.append(torch.is_grad_enabled()) or rollout_token_stats(model, rows, top_k, 1.0),
        lambda: 0.0,
        lambda: model.zero_grad(set_to_none=True),
        torch.Generator().manual_seed(0),
        micro_batch_size=3,
    )
    assert calls == [True] * 3  # three micro-batches with autograd; no no-grad pass for old log-probs


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
    import simko.engines.hf as hf

    tok, model = digit_tokenizer(), random_qwen2(seed=2)
    prompts = ["12+3=", "5+5=", "71+40="]  # different lengths: left padding inside the shared cache
    assert (
        hf.shared_prompt_cache(
            model, *tok(prompts, return_tensors="pt", padding=True, padding_side="left").values(), 4, 6
        )
        is not None
    )
    cached = [generate_rollouts(model, tok, prompts, group_size=4, max_new_tokens=6, seed=s) for s in range(3)]
    monkeypatch.setattr(hf, "shared_prompt_cache", lambda *a, **k: None)
    plain = [generate_rollouts(model, tok, prompts, group_size=4, max_new_tokens=6, seed=s) for s in range(3)]
    for a, b in zip(cached, plain):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)


def test_shared_prompt_update_matches_the_plain_forward():
    """Prompt run once per group (keys/values indexed out to its rows) == every row recomputing it: values and
    parameter gradients, with mixed prompt lengths and a micro-batch that splits a group. In float64: in float32 the
    two paths' different summation orders moved single gradient entries by up to 1.4e-4 relative with one thread
    (OMP_NUM_THREADS=1), past the tolerance; in float64 the largest difference is 7.9e-7 on entries up to 38."""
    from simko.forward import _prompt_cache

    tok, model = digit_tokenizer(), random_qwen2(seed=4)
    r = generate_rollouts(model, tok, ["12+3=", "5+5=", "71+40="], group_size=4, max_new_tokens=6, seed=1)
    model = model.double()
    weights = torch.randn(r.response_mask.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
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
        assert a.logprobs.dtype == torch.float64
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_build_rollouts_pads_masks_trims_and_flags_truncation():
    tok = digit_tokenizer()  # <pad> = 0, <eos> = 1
    r = build_rollouts(
        tok,
        prompt_ids=[[3, 4], [5]],
        response_ids=[[7, 1, 9], [7, 8], [1], []],  # after EOS / no EOS (cut off) / only EOS / nothing
        group_size=2,
        eos_token_ids=[1],
        sampler_logprobs=[[-0.1, -0.2, -0.3], [-0.4, -0.5], [-0.6], []],
    )
    assert r.prompt_len == 2 and r.num_rows == 4
    assert r.input_ids.tolist() == [[3, 4, 7, 1], [3, 4, 7, 8], [0, 5, 1, 0], [0, 5, 0, 0]]
    assert r.response_mask.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0]]
    assert r.truncated.tolist() == [False, True, False, True]
    torch.testing.assert_close(r.sampler_logprobs, torch.tensor([[-0.1, -0.2], [-0.4, -0.5], [-0.6, 0.0], [0.0, 0.0]]))
    assert r.completions == ["5", "56", "", ""]  # ids 7, 8 are the characters 5, 6
    with pytest.raises(ValueError, match="group_size responses per prompt"):
        build_rollouts(tok, [[3]], [[1]], group_size=2, eos_token_ids=[1])


def test_hf_engine_takes_token_ids_and_reports_truncation():
    tok, model = digit_tokenizer(), random_qwen2(seed=3)
    ids = tokenize_prompts(tok, ["12+3=", "5+5="])
    assert ids == [
        tok("12+3=", add_special_tokens=False)["input_ids"],
        tok("5+5=", add_special_tokens=False)["input_ids"],
    ]
    assert tokenize_prompts(tok, ["12+3="], max_prompt_tokens=2) == [ids[0][:2]]
    engine = build_engine("hf", model, tok)
    assert isinstance(engine, HFEngine) and engine.name == "hf"
    r = engine.generate(ids, 8, Sampling(max_new_tokens=3, seed=0))
    assert r.sampler_logprobs is None and r.num_rows == 16
    has_eos = (r.response_tokens == tok.eos_token_id).any(1)
    assert torch.equal(r.truncated, ~has_eos) and r.truncated.any() and not r.truncated.all()
    assert torch.equal(r.input_ids, generate_rollouts(model, tok, ["12+3=", "5+5="], 8, 3, seed=0).input_ids)


def test_unknown_engine_fails_at_construction_naming_the_choices():
    tok, model = digit_tokenizer(), random_qwen2()
    with pytest.raises(ValueError, match="unknown rollout engine 'nope'.*hf"):
        build_engine("nope", model, tok)
    with pytest.raises(ValueError, match="unknown rollout engine 'nope'"):
        RLVRModule(model, tok, build_loss("grpo"), optimizer=torch.optim.SGD, engine="nope")
    with pytest.raises(TypeError, match="unexpected arguments"):
        RLVRModule(model, tok, build_loss("grpo"), optimizer=torch.optim.SGD, bogus={"x": 1})
    assert "hf" in available_engines()


@register_engine("test_recording")
class RecordingEngine(HFEngine):
    """The HF engine, recording when it samples and syncs (by the module's optimizer-step count)."""

    events: list = []
    module = None

    def generate(self, prompt_ids, group_size, sampling):
        self.events.append(("generate", self.module.global_step))
        return super().generate(prompt_ids, group_size, sampling)

    def sync_weights(self, policy):
        self.events.append(("sync", self.module.global_step))
        super().sync_weights(policy)


def test_training_step_with_epochs_and_mini_batches_syncs_the_engine_after_the_last_update(tmp_path):
    """A real Trainer, in process: 2 RL steps of ppo_epochs=2 x num_mini_batches=2. The engine samples step s at
    optimizer step 4s and is synced at fit start and after each RL step's 4th update; the policy moved."""
    from simko.data import ArithmeticSource, PromptDataModule

    tok, model = digit_tokenizer(), random_qwen2(seed=1)
    before = copy.deepcopy(model.state_dict())
    module = RLVRModule(
        model,
        tok,
        build_loss("grpo"),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        group_size=4,
        max_new_tokens=4,
        engine="test_recording",
        ppo_epochs=2,
        num_mini_batches=2,
        micro_batch_size=5,
        verifier=lambda completions, answers, names: [float(len(c) % 2) for c in completions],  # mixed groups
        diagnostics_top_k=3,
    )
    data = PromptDataModule(
        ArithmeticSource(seed=0, split="train"),
        prompts_per_step=3,
        prompt_template="{question}=",
        use_chat_template=False,
        tokenizer=tok,
    )
    RecordingEngine.events, RecordingEngine.module = [], module
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert RecordingEngine.events == [("sync", 0), ("generate", 0), ("sync", 4), ("generate", 4), ("sync", 8)]
    assert module.rl_step == 2 and module._engine is None  # closed at the end of fit
    logged = trainer.callback_metrics
    for key in ("time/weight_sync", "time/step", "train/grad_norm", "train/clip_frac", "diag/p_rank1"):
        assert key in logged, key
    assert logged["time/step"] >= logged["time/update"] + logged["time/weight_sync"]
    assert not any(k.startswith("mem/") for k in logged)  # the GPU peak memory: logged on CUDA only
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
