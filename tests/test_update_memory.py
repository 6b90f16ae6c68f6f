"""The update's memory and speed knobs (gradient checkpointing, token-budget micro-batches, padding-free packing)
compute what the padded row-count path computes: loss, gradients, metrics and diagnostics, for every loss config
and aggregation, on ragged lengths, in float64 (<= 1e-10 relative) and float32, under LoRA; rows packed together
never attend to each other."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

from helpers import digit_tokenizer, loss_configs, make_loss, random_qwen2
from simko.diagnostics import concentration_sums
from simko.forward import enable_checkpointing, is_checkpointed, rollout_token_stats
from simko.losses import build_loss
from simko.models import lora
from simko.rollout import build_rollouts
from simko.update import UpdateHooks, UpdateSchedule, token_budget_bins, update_policy

G, MAX_NEW = 4, 12


def ragged_rollouts(seed: int = 0):
    """3 prompts (2, 5 and 7 tokens) x G = 4 responses of 1 ... MAX_NEW tokens: one of a single token (its EOS),
    one truncated at MAX_NEW (no EOS), the rest in between; random token ids."""
    gen = torch.Generator().manual_seed(seed)
    tok = digit_tokenizer()
    prompts = [torch.randint(2, 14, (n,), generator=gen).tolist() for n in (2, 5, 7)]
    lengths = [1, MAX_NEW, 3, 7, 5, 2, 9, 4, 11, 6, 8, 3]
    responses = []
    for n in lengths:
        body = torch.randint(2, 14, (n,), generator=gen).tolist()
        responses.append(body if n == MAX_NEW else body[:-1] + [1])  # 1: <eos>
    r = build_rollouts(tok, prompts, responses, G, [1])
    assert r.response_mask.sum(1).tolist() == lengths and r.truncated.tolist() == [n == MAX_NEW for n in lengths]
    scores = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0])
    return r, scores


def run_update(model, loss_fn, r, scores, *, checkpointing=False, tokens=None, packed=False, share=False, mbs=5):
    """update_policy with 2 mini-batches (old log-probs computed), SGD, a frozen reference when the loss has a KL
    term (a LoRA policy's: its adapters disabled), the diagnostics on; returns (the gradient of every update,
    metrics, diagnostics, final parameters)."""
    model = copy.deepcopy(model)
    if checkpointing:
        assert enable_checkpointing(model) == 2
    frozen = random_qwen2(seed=9).to(next(model.parameters()).dtype).requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    grads = []

    def stats(m):
        return lambda rows, top_k: rollout_token_stats(m, rows, top_k, 0.9, share_prompt=share, padding_free=packed)

    def step() -> float:
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        opt.step()
        return float(grads[-1].norm())

    reference = lora.base_model_stats(stats(model), model) if lora.is_lora(model) else stats(frozen)
    hooks = UpdateHooks(
        stats(model),
        optimizer_step=step,
        zero_grad=lambda: opt.zero_grad(set_to_none=True),
        reference_stats=reference if loss_fn.needs_reference else None,
        diagnose=lambda s: concentration_sums(s.with_top_k(3), 0.8),
    )
    schedule = UpdateSchedule(
        num_mini_batches=2, micro_batch_size=mbs, micro_batch_tokens=tokens, share_prompt=share, shuffle_seed=3,
        stats_top_k=max(loss_fn.top_k, 3),
    )  # fmt: skip
    adv = loss_fn.compute_advantages(scores.view(-1, G)).reshape(-1)
    metrics, diagnostics = update_policy(loss_fn, r, scores, adv, hooks, schedule)
    return grads, metrics, diagnostics, torch.cat([p.detach().flatten() for p in model.parameters()])


# Aggregated like the loss, so equal however micro-batches split a mini-batch. Every other metric is a per-micro-batch
# mean or count averaged with the loss's aggregation weights: equal only for the same micro-batches.
EXACT_METRICS = ("loss", "policy_loss", "kl_ref", "grad_norm")


def assert_same(a, b, rel: float, same_micro_batches: bool = True):
    grads_a, metrics_a, diag_a, params_a = a
    grads_b, metrics_b, diag_b, params_b = b
    assert len(grads_a) == len(grads_b) == 2
    for x, y in zip(grads_a, grads_b):
        assert x.abs().max() > 0
        assert (x - y).abs().max() <= rel * x.abs().max(), float((x - y).abs().max() / x.abs().max())
    assert (params_a - params_b).abs().max() <= rel * params_a.abs().max()
    assert metrics_a.keys() == metrics_b.keys() and diag_a.keys() == diag_b.keys()
    for key in metrics_a if same_micro_batches else [k for k in metrics_a if k in EXACT_METRICS]:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=rel, abs=rel), key
    for key in diag_a:
        assert diag_b[key] == pytest.approx(diag_a[key], rel=rel, abs=rel), key


KNOBS = {
    "checkpointing": dict(checkpointing=True),
    "tokens": dict(tokens=24),  # 1 ... 19 tokens a row: micro-batches of 2 ... 9 rows
    "packed": dict(packed=True),
    "all": dict(checkpointing=True, tokens=24, packed=True),
}


@pytest.mark.parametrize("loss_name", loss_configs())
def test_every_loss_equals_the_padded_path_in_float64(loss_name):
    """Every loss config: each knob and all three together give the padded row-count path's gradients (each of
    2 updates), parameters, metrics and diagnostics to 1e-10 relative, in float64 on ragged lengths; packing with
    the shared prompt (and checkpointing) gives the padded shared-prompt path's. (The shared and unshared paths
    differ by ~1e-8 relative in float64 whatever the knobs: CPU sdpa in float64 is itself that far from eager
    attention, measured 2.6e-8, and its rounding depends on the shapes.) Clip-Cov and
    KL-Cov select tokens over each micro-batch, so their token-budget micro-batches are other micro-batches with
    other selections (as another micro_batch_size): they are compared with checkpointing and packing only."""
    from simko.losses.covariance import ClipCovLoss, KLCovLoss

    r, scores = ragged_rollouts()
    model = random_qwen2(seed=4).double()
    loss_fn = make_loss(loss_name, **({"advantage_kwargs": {"k": 2}} if loss_name == "passk" else {}))  # k < G
    base = run_update(model, loss_fn, r, scores)
    for knobs in KNOBS.values():
        same_micro_batches = "tokens" not in knobs
        if isinstance(loss_fn, (ClipCovLoss, KLCovLoss)) and not same_micro_batches:
            continue  # their token selection is over the micro-batch: other micro-batches, other tokens (by design)
        assert_same(base, run_update(model, loss_fn, r, scores, **knobs), 1e-10, same_micro_batches)
    shared = run_update(model, loss_fn, r, scores, share=True)
    assert_same(shared, run_update(model, loss_fn, r, scores, share=True, packed=True, checkpointing=True), 1e-10)
    if not isinstance(loss_fn, (ClipCovLoss, KLCovLoss)):  # whole groups in token budgets: the same gradient, to
        # the float64 sdpa rounding of other shapes (other micro-batches; up to 1.1e-7 measured, GSPO)
        shared_tokens = run_update(model, loss_fn, r, scores, share=True, packed=True, tokens=40)
        assert_same(shared, shared_tokens, 1e-6, same_micro_batches=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aggregation": "token_mean"},
        {"aggregation": "seq_mean_token_mean"},
        {"aggregation": "seq_mean_token_sum_norm", "norm_len": MAX_NEW},
    ],
    ids=lambda kw: kw["aggregation"],
)
def test_every_aggregation_equals_the_padded_path_float64_and_float32(kwargs):
    """Each aggregation: the knobs together equal the padded path in float64 (1e-10) and in float32 (1e-5:
    rounding of other summation orders); gradient checkpointing with the shared prompt equals the shared prompt
    without it bit for bit (the same operations, recomputed)."""
    r, scores = ragged_rollouts(seed=1)
    loss_fn = build_loss("simko", k=2, alpha=0.5, lam=1.5, tau=0.5, clip_eps=0.05, **kwargs)
    model = random_qwen2(seed=5)
    for m, rel in ((model.double(), 1e-10), (model, 1e-5)):
        base, knobs = run_update(m, loss_fn, r, scores), run_update(m, loss_fn, r, scores, **KNOBS["all"])
        assert_same(base, knobs, rel=rel, same_micro_batches=False)
    shared = run_update(model, loss_fn, r, scores, share=True, mbs=6)
    shared_checkpointed = run_update(model, loss_fn, r, scores, share=True, mbs=6, checkpointing=True)
    assert_same(shared, shared_checkpointed, rel=0.0)


def test_lora_with_every_knob_equals_the_padded_path():
    """A LoRA policy (peft, frozen base, float64): the knobs together and checkpointing with the shared prompt
    give the padded path's adapter gradients; the base stays frozen, no enable_input_require_grads needed."""
    r, scores = ragged_rollouts(seed=2)
    model = lora.apply_lora(random_qwen2(seed=6).double(), {"r": 4, "alpha": 8})
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters: gradients reach lora_A too, and the KL term is not 0
            torch.nn.init.normal_(p, std=0.1)
    loss_fn = build_loss("simko", k=2, tau=0.5, kl_coef=0.1)
    base = run_update(model, loss_fn, r, scores, mbs=12)
    assert base[1]["kl_ref"] > 0
    assert_same(base, run_update(model, loss_fn, r, scores, **KNOBS["all"]), rel=1e-10, same_micro_batches=False)
    shared = run_update(model, loss_fn, r, scores, share=True, mbs=12)
    assert_same(shared, run_update(model, loss_fn, r, scores, share=True, mbs=12, checkpointing=True), rel=0.0)
    packed = run_update(model, loss_fn, r, scores, share=True, mbs=12, checkpointing=True, packed=True)
    assert_same(shared, packed, rel=1e-10)


def test_checkpointing_recomputes_blocks_only_under_autograd_and_keeps_parameter_names(monkeypatch):
    """Each block runs twice per autograd forward + backward (forward, recomputation), once under no_grad
    (generation, old log-probs); parameter and state-dict names are unchanged (the vLLM weight push and
    checkpoints read them); a deep copy (the frozen reference) checkpoints its own blocks; sampling is unchanged."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from simko.engines.hf import generate_rollouts

    r, _ = ragged_rollouts()
    plain = random_qwen2(seed=3)
    model = copy.deepcopy(plain)
    from simko.engines.vllm import full_weights

    names = [n for n, _ in model.named_parameters()], list(model.state_dict()), [n for n, _ in full_weights(model)]
    assert enable_checkpointing(model) == 2 and enable_checkpointing(model) == 2  # idempotent
    pushed = [n for n, _ in full_weights(model)]  # what the vLLM engine's weight sync sends
    assert ([n for n, _ in model.named_parameters()], list(model.state_dict()), pushed) == names
    calls = []
    forward = Qwen2DecoderLayer.forward
    monkeypatch.setattr(Qwen2DecoderLayer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    rows = r.rows(torch.arange(12))
    for share in (False, True):
        calls.clear()
        s = rollout_token_stats(model, rows, 0, 1.0, share_prompt=share)
        n_forward = len(calls)
        (s.logprobs * s.mask).sum().backward()
        assert len(calls) == 2 * n_forward, share  # every block recomputed in backward
    calls.clear()
    with torch.no_grad():
        rollout_token_stats(model, rows, 0, 1.0, share_prompt=False)
    assert len(calls) == 2
    copied = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in copied.model.layers)
    assert all(b.forward.__self__ is b for b in copied.model.layers)  # bound to the copy, not to the original
    tok = digit_tokenizer()
    a = generate_rollouts(plain, tok, ["12+3=", "5+5="], group_size=4, max_new_tokens=6, seed=0)
    b = generate_rollouts(model, tok, ["12+3=", "5+5="], group_size=4, max_new_tokens=6, seed=0)
    assert torch.equal(a.input_ids, b.input_ids)


def test_packed_rows_do_not_attend_to_each_other(monkeypatch):
    """Changing the tokens of other rows in a packed micro-batch leaves a row's statistics unchanged; with the
    packed-sequence mask broken (one causal sequence over all rows) they change, so the test can fail."""
    import transformers.masking_utils as masking

    r, _ = ragged_rollouts()
    model = random_qwen2(seed=7).double()
    rows = r.rows(torch.arange(8))  # rows 0 ... 7: two prompts
    other = copy.deepcopy(rows)
    other["input_ids"][:7] = (other["input_ids"][:7] + 3) % 14  # every row but the last
    last = slice(7, 8)

    def stats(x):
        s = rollout_token_stats(model, x, 3, 1.0, share_prompt=False, padding_free=True)
        return s.logprobs[last], s.entropy[last], s.topk_logprobs[last]

    with torch.no_grad():
        for a, b in zip(stats(rows), stats(other)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
        broken = [not torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(stats(rows), stats(other))]
    assert all(broken)


def test_packed_rows_with_a_shared_prompt_see_only_their_prompt_and_themselves(monkeypatch):
    """Packing with the shared prompt: changing the other prompts and every other row's response leaves a row's
    statistics unchanged; with a mask that lets rows see each other (causal over the whole packed part) they
    change."""
    import simko.forward as forward

    r, _ = ragged_rollouts()
    model = random_qwen2(seed=7).double()
    rows = r.rows(torch.arange(12))  # row 6: prompt 1 (rows 4 ... 7)
    other = copy.deepcopy(rows)
    p = other["prompt_len"]
    other["input_ids"][:4, :p] = (other["input_ids"][:4, :p] + 3) % 14  # prompt 0's rows: their prompt
    other["input_ids"][8:, :p] = (other["input_ids"][8:, :p] + 5) % 14  # prompt 2's rows
    for i in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11):  # every other row's response
        other["input_ids"][i, p:] = (other["input_ids"][i, p:] + 1) % 14
    mine = slice(6, 7)

    def stats(x):
        assert forward._shared_prompt_packed(model, x) is not None
        s = rollout_token_stats(model, x, 3, 1.0, share_prompt=True, padding_free=True)
        return s.logprobs[mine], s.entropy[mine], s.topk_logprobs[mine]

    with torch.no_grad():
        for a, b in zip(stats(rows), stats(other)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        mask = forward.shared_prompt_mask

        def leaky(part, inverse, prompt_mask):
            allowed = mask(part, inverse, prompt_mask)
            own = allowed[0, 0, :, prompt_mask.numel() :]
            allowed[0, 0, :, prompt_mask.numel() :] = torch.ones_like(own).tril()
            return allowed

        monkeypatch.setattr(forward, "shared_prompt_mask", leaky)
        broken = [not torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(stats(rows), stats(other))]
    assert all(broken)


def test_token_budget_bins_first_fit_decreasing():
    lengths = torch.tensor([5, 30, 8, 12, 3, 9, 7])
    bins = token_budget_bins(lengths, 20)
    assert [b.tolist() for b in bins] == [[1], [2, 3], [4, 5, 6], [0]]  # 30 alone; 12+8; 9+7+3; 5
    assert all(int(lengths[b].sum()) <= 20 for b in bins if len(b) > 1)
    assert sorted(torch.cat(bins).tolist()) == list(range(7))
    six = token_budget_bins(lengths, 20, num_bins=6)  # another rank runs 6: the fullest bins are halved
    assert len(six) == 6 and sorted(torch.cat(six).tolist()) == list(range(7))
    assert token_budget_bins(lengths, 20, num_bins=99).__len__() == 7  # at most one row each
    # Whole groups (rows 0-2, 3-4, 5-6) with their 2-token prompt counted once, where they fit in the budget:
    # group 0 is 5 + 30 + 8 - 2 * 2 = 39 > 20 tokens, so its rows go alone; group 1: 12 + 3 - 2 = 13; group 2: 14.
    groups, prompts = torch.tensor([0, 0, 0, 1, 1, 2, 2]), torch.full((7,), 2)
    bins = token_budget_bins(lengths, 20, groups=groups, prompt_lengths=prompts)
    assert [b.tolist() for b in bins] == [[1], [0, 5, 6], [3, 4], [2]]  # 30; 14 + 5; 13; 8


def test_micro_batch_tokens_agree_over_ranks_and_bad_values_fail():
    """split_rows asks the ranks for the largest count and runs that many micro-batches; a budget that is not a
    positive integer fails at the module's construction."""
    from simko.module import RLVRModule
    from simko.update import split_rows

    r, _ = ragged_rollouts()
    rows = torch.arange(12)
    schedule = UpdateSchedule(micro_batch_tokens=24)
    own = split_rows(rows, r, schedule, UpdateHooks(None))
    more = split_rows(rows, r, schedule, UpdateHooks(None, max_over_ranks=lambda n: n + 2))
    assert len(more) == len(own) + 2 and sorted(torch.cat(more).tolist()) == list(range(12))
    with pytest.raises(RuntimeError, match="raise micro_batch_tokens"):
        split_rows(rows[:2], r, schedule, UpdateHooks(None, max_over_ranks=lambda n: 5))
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match="micro_batch_tokens"):
            RLVRModule(random_qwen2(), digit_tokenizer(), build_loss("grpo"), torch.optim.SGD, micro_batch_tokens=bad)
    counts = defaultdict(int)
    for b in own:
        counts[len(b)] += 1
    assert sum(k * v for k, v in counts.items()) == 12


def test_padding_free_auto_packs_where_that_computes_less():
    """padding_free="auto" packs a micro-batch where the counted FLOPs are fewer (ragged lengths) and pads where
    they are not (equal lengths: a packed sequence attends over its whole length); either way it is exact."""
    from simko.forward import forward_counts, packing_is_cheaper
    from simko.module import RLVRModule

    r, scores = ragged_rollouts()
    model = random_qwen2(seed=4).double()
    rows = r.rows(torch.arange(12))
    for share in (True, False):
        assert packing_is_cheaper(model, rows, share)
        packed, padded = forward_counts(model, rows, share, True), forward_counts(model, rows, share, False)
        assert packed[0] < padded[0] and packed[1] > padded[1]  # fewer positions, more attention entries
    equal = build_rollouts(digit_tokenizer(), [[3, 4, 5, 6, 7]] * 2, [[5] * 11 + [1]] * 8, G, [1])
    for share in (True, False):
        assert not packing_is_cheaper(model, equal.rows(torch.arange(8)), share)
    for share in (True, False):
        base = run_update(model, make_loss("simko"), r, scores, share=share)
        assert_same(base, run_update(model, make_loss("simko"), r, scores, share=share, packed="auto"), 1e-10)
    with pytest.raises(ValueError, match="padding_free must be true, false or auto"):
        RLVRModule(random_qwen2(), digit_tokenizer(), build_loss("grpo"), torch.optim.SGD, padding_free="yes")
