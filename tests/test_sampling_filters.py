"""simko.sampling_filters: zero-variance groups, dynamic sampling (DAPO), masked truncated completions (TRL) and the
soft overlong punishment (DAPO), against hand-computed references; the refill stream of the data module; the
module's RL step with them in a real Trainer."""

from __future__ import annotations

import copy
from collections import defaultdict

import pandas as pd
import pytest
import torch

from helpers import digit_tokenizer, fit_in_process, random_qwen2
from simko.forward import rollout_token_stats
from simko.losses import build_loss
from simko.module import RLVRModule
from simko.rollout import build_rollouts
from simko.sampling_filters import (
    DynamicSampling,
    OverlongPenalty,
    assemble_step_batch,
    check_filter_config,
    mask_rows,
    refill_seed,
    take_groups,
    zero_variance,
)
from simko.update import UpdateHooks, UpdateSchedule, accumulate_gradients

TOK = digit_tokenizer()  # <pad> = 0, <eos> = 1, "0".."9" = 2..11
EOS = [1]


def _part(tag: int, num_groups: int = 3, G: int = 2, truncate: tuple[int, ...] = ()):
    """Rollouts of ``num_groups`` prompts x G whose ids name (tag, group, row); rows in ``truncate`` have no EOS."""
    prompts = [[2 + tag, 2 + g] + [2] * g for g in range(num_groups)]  # different prompt lengths
    responses = []
    for row in range(num_groups * G):
        body = [2 + tag, 2 + row % 10] + [3] * (row % 3)
        responses.append(body if row in truncate else [*body, 1])
    logprobs = [[-0.01 * (tag + 1) * (i + 1) for i in range(len(r))] for r in responses]
    rollouts = build_rollouts(TOK, prompts, responses, G, EOS, sampler_logprobs=logprobs)
    examples = [{"prompt": f"p{tag}.{g}", "answer": "", "verifier": "x"} for g in range(num_groups)]
    return rollouts, examples


def _assemble(parts, scores, **kw):
    """assemble_step_batch over fixed rounds: round 0 is parts[0]; draw(k) returns parts[k] (and counts calls)."""
    calls = []

    def draw(k):
        calls.append(k)
        k %= len(parts)  # more rounds than parts: they come round again
        return parts[k][0], scores[k], parts[k][1]

    batch = assemble_step_batch(
        parts[0][0], scores[0], parts[0][1], max_new_tokens=8, tokenizer=TOK, eos_token_ids=EOS, draw=draw, **kw
    )
    return batch, calls


# --- zero-variance groups --------------------------------------------------------------------------------------


def test_zero_variance_compares_with_a_tolerance_not_std():
    rows = [[1.0, 1.0, 1.0], [0.0, 0.0, 1e-9], [0.0, 1.0, 0.0], [0.3, 0.1 + 0.2, 0.3]]
    scores = torch.tensor(rows, dtype=torch.float64)
    assert 0.1 + 0.2 != 0.3  # the third reward of the last group differs from 0.3 by float rounding
    assert zero_variance(scores, 1e-6).tolist() == [True, True, False, True]
    assert zero_variance(scores, 0.0).tolist() == [True, False, False, False]
    assert (scores.std(1) != 0).tolist() == [False, True, True, True]  # the filter trl #3708 users wrote


# --- overlong punishment ---------------------------------------------------------------------------------------


def test_overlong_penalty_is_dapos_linear_ramp():
    """DAPO eq. 13 with L_max = 20, L_cache = 5: 0 up to 15 tokens, ((20 - 5) - L) / 5 beyond, -1 at 20."""
    lengths = torch.tensor([1, 14, 15, 16, 17, 19, 20])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.2, -0.4, -0.8, -1.0])
    torch.testing.assert_close(OverlongPenalty(buffer=5).penalty(lengths, 20), expected)
    torch.testing.assert_close(OverlongPenalty(buffer=5, penalty_factor=0.5).penalty(lengths, 20), expected / 2)
    assert OverlongPenalty().penalty(lengths, 20).abs().sum() == 0  # buffer null: off
    torch.testing.assert_close(OverlongPenalty(buffer=20).penalty(torch.tensor([0, 10, 20]), 20),
                               torch.tensor([0.0, -0.5, -1.0]))  # fmt: skip
    with pytest.raises(ValueError, match=r"module.overlong.buffer=21: longer than rollout.max_new_tokens=20"):
        OverlongPenalty(buffer=21).check(20)
    with pytest.raises(ValueError, match=r"module.overlong.buffer=0"):
        OverlongPenalty(buffer=0)


def test_overlong_penalty_is_added_to_the_reward_by_response_length():
    rollouts, examples = _part(0, num_groups=2, truncate=(1,))
    lengths = rollouts.response_mask.sum(1)  # EOS included, as verl's valid_response_length
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])
    batch = assemble_step_batch(
        rollouts, scores, examples, max_new_tokens=4, tokenizer=TOK, eos_token_ids=EOS, overlong=OverlongPenalty(2)
    )
    expected = scores + torch.clamp(-(lengths.float() - 2) / 2, max=0.0)
    torch.testing.assert_close(batch.rewards, expected)
    assert batch.rewards.tolist() != scores.tolist() and batch.scores is scores  # the verifier's stay as they were
    assert batch.metrics["overlong_penalty"] == pytest.approx(float((expected - scores).mean()))


# --- truncation ------------------------------------------------------------------------------------------------


def test_mask_truncated_takes_the_loss_off_truncated_rows_only():
    rollouts, examples = _part(0, num_groups=2, truncate=(0, 3))
    assert rollouts.truncated.tolist() == [True, False, False, True]
    scores = torch.tensor([0.0, 1.0, 1.0, 0.0])
    plain = assemble_step_batch(rollouts, scores, examples, max_new_tokens=8, tokenizer=TOK, eos_token_ids=EOS)
    assert plain.rollouts is rollouts and plain.metrics["truncated_frac"] == 0.5
    masked = assemble_step_batch(
        rollouts, scores, examples, max_new_tokens=8, tokenizer=TOK, eos_token_ids=EOS, mask_truncated=True
    )
    assert masked.rollouts.loss_mask.any(1).tolist() == [False, True, True, False]
    assert torch.equal(masked.rollouts.loss_mask[1:3], rollouts.response_mask[1:3])
    assert torch.equal(masked.rollouts.response_mask, rollouts.response_mask)  # the diagnostics see every row
    assert torch.equal(masked.rewards, scores)  # still in the group's baseline (TRL)
    assert masked.metrics["masked_truncated"] == 2.0


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_rows_without_loss_give_the_gradient_of_a_batch_with_zero_advantage_rows(aggregation):
    """Masked rows contribute no token: under token_mean and seq_mean_token_mean (over non-empty rows, as verl) the
    gradient equals the one of the kept rows alone; Dr.GRPO's constant divides by all rows (as TRL's dr_grpo)."""
    tok, model = TOK, random_qwen2(seed=2)
    rollouts, _ = _part(0, num_groups=2)
    loss = build_loss("grpo", aggregation=aggregation, norm_len=4)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    keep = torch.tensor([True, True, False, False])

    def grads(r, rows, adv):
        model.zero_grad(set_to_none=True)
        hooks = UpdateHooks(lambda rows_, k: rollout_token_stats(model, rows_, k, 1.0))
        accumulate_gradients(loss, r, scores, adv, rows, hooks, UpdateSchedule(micro_batch_size=2), defaultdict(float))
        return [p.grad.clone() for p in model.parameters()]

    masked = grads(mask_rows(rollouts, keep), torch.arange(4), advantages)
    if aggregation != "seq_mean_token_sum_norm":
        alone = take_groups([rollouts], [(0, 0)], tok, EOS)
        reference = grads(alone, torch.arange(2), advantages[:2])
    else:  # the same batch with the masked rows' advantages 0: their tokens give no gradient, their rows count
        reference = grads(rollouts, torch.arange(4), torch.where(keep, advantages, 0.0))
    for a, b in zip(masked, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- dynamic sampling ------------------------------------------------------------------------------------------

# G = 2, 3 groups a round. Informative groups: round 0: g1; round 1: g1; round 2: g0, g1.
SCORES = [
    torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]),
    torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0]),
    torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
]


def _rounds():
    return [_part(0, truncate=(4,)), _part(1), _part(2)]


def _group(rollouts, g):
    G = rollouts.group_size
    rows = rollouts.rows(torch.arange(g * G, (g + 1) * G))
    return rows["response_tokens"][rows["response_mask"]].tolist(), rollouts.completions[g * G : (g + 1) * G]


def test_dynamic_sampling_keeps_the_first_informative_groups_in_draw_order():
    parts = _rounds()
    batch, calls = _assemble(parts, SCORES, dynamic_sampling=DynamicSampling(enabled=True, max_extra_generations=5))
    assert calls == [1, 2]  # 1 informative group after round 0, 2 after round 1, 4 after round 2: stop
    picks = [(0, 1), (1, 1), (2, 0)]  # the first 3 informative groups, in draw order
    for i, (p, g) in enumerate(picks):
        assert _group(batch.rollouts, i) == _group(parts[p][0], g)
    assert batch.scores.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert [ex["prompt"] for ex in batch.examples] == ["p0.1", "p1.1", "p2.0"]
    assert batch.rollouts.loss_rows is None  # every kept row trains
    assert batch.metrics == pytest.approx(
        dict(
            zero_var_groups=2,
            zero_var_frac=2 / 3,
            truncated_frac=1 / 6,
            dynamic_sampling_rounds=2,
            kept_groups=3,
            unfilled_groups=0,
        )  # fmt: skip
    )
    # the rebuilt batch is what build_rollouts makes of the picked ids (sampler log-probs carried along)
    rows = [(parts[p][0], g * 2 + j) for p, g in picks for j in (0, 1)]
    want = [r.sampler_logprobs[i][r.response_mask[i]] for r, i in rows]
    got = [batch.rollouts.sampler_logprobs[i][batch.rollouts.response_mask[i]] for i in range(6)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dynamic_sampling_budget_bounds_the_rounds_and_masks_the_unfilled_slots():
    parts = _rounds()
    batch, calls = _assemble(parts, SCORES, dynamic_sampling=DynamicSampling(enabled=True, max_extra_generations=1))
    assert calls == [1]
    # kept: (0, 1), (1, 1); one slot left: the first zero-variance group in draw order, (0, 0), without loss
    assert [ex["prompt"] for ex in batch.examples] == ["p0.0", "p0.1", "p1.1"]
    assert batch.rollouts.loss_rows.tolist() == [False, False, True, True, True, True]
    assert batch.metrics["kept_groups"] == 2 and batch.metrics["unfilled_groups"] == 1
    assert batch.metrics["dynamic_sampling_rounds"] == 1

    dropped_only, calls = _assemble(parts, SCORES, dynamic_sampling=DynamicSampling(True, max_extra_generations=0))
    assert calls == []
    assert dropped_only.rollouts.loss_rows.tolist() == [False, False, True, True, False, False]
    assert dropped_only.metrics["unfilled_groups"] == 2


def test_dynamic_sampling_draws_nothing_when_every_group_is_informative():
    rollouts, examples = _part(0)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0])
    batch, calls = _assemble([(rollouts, examples)], [scores], dynamic_sampling=DynamicSampling(enabled=True))
    assert calls == [] and batch.rollouts is rollouts and batch.examples == examples
    assert batch.metrics["dynamic_sampling_rounds"] == 0 and batch.metrics["zero_var_groups"] == 0


def test_dynamic_sampling_runs_as_many_rounds_as_the_shortest_rank():
    """A rank that is full keeps drawing while another rank is short (the collective says so): both ranks make the
    same generate calls. Its batch is still its first informative groups."""
    parts, decisions = _rounds(), []

    def any_rank(short):
        decisions.append(short)
        return True  # another rank is always short

    batch, calls = _assemble(
        parts, SCORES, dynamic_sampling=DynamicSampling(enabled=True, max_extra_generations=2), any_rank=any_rank
    )
    assert calls == [1, 2] and decisions == [True, True]
    assert [ex["prompt"] for ex in batch.examples] == ["p0.1", "p1.1", "p2.0"]
    batch, calls = _assemble(
        parts, SCORES, dynamic_sampling=DynamicSampling(enabled=True, max_extra_generations=9), any_rank=any_rank
    )
    assert calls == list(range(1, 10)) and batch.metrics["dynamic_sampling_rounds"] == 9


def test_take_groups_rebuilds_like_build_rollouts():
    (a, _), (b, _) = _part(0), _part(1, truncate=(0, 5))
    assert take_groups([a, b], [(0, 0), (0, 1), (0, 2)], TOK, EOS) is a
    both = take_groups([a, b], [(1, 2), (0, 0)], TOK, EOS)
    assert _group(both, 0) == _group(b, 2) and _group(both, 1) == _group(a, 0)
    assert both.truncated.tolist() == [False, True, False, False]
    assert both.completions == b.completions[4:6] + a.completions[0:2]
    assert both.prompt_len == max(len(x) for x in ([2 + 1, 2 + 2, 2, 2], [2, 2]))


def test_refill_seeds_are_distinct_per_step_rank_round_and_reproducible():
    from simko.engines import step_seed

    seeds = {refill_seed(0, s, r, k) for s in range(20) for r in range(4) for k in range(1, 4)}
    main = {step_seed(seed, s, r) for seed in range(4) for s in range(20) for r in range(4)}
    assert len(seeds) == 20 * 4 * 3 and not seeds & main
    assert refill_seed(3, 5, 1, 2) == refill_seed(3, 5, 1, 2) < 2**63


def test_filter_knobs_are_checked_by_name():
    check_filter_config({"dynamic_sampling": {"enabled": True}, "overlong": {"buffer": 4}}, 8)
    for cfg, message in (
        ({"dynamic_sampling": {"enabled": "yes"}}, r"module.dynamic_sampling.enabled='yes'"),
        ({"dynamic_sampling": {"max_extra_generations": -1}}, r"max_extra_generations=-1: must be >= 0"),
        ({"dynamic_sampling": {"tolerance": -0.1}}, r"tolerance=-0.1"),
        ({"dynamic_sampling": {"enabeld": True}}, r"module.dynamic_sampling: unknown knob\(s\) \['enabeld'\]"),
        ({"mask_truncated": 1}, r"module.mask_truncated=1"),
        ({"overlong": {"buffer": 9}}, r"buffer=9: longer than rollout.max_new_tokens=8"),
        ({"overlong": {"buffer": 2, "penalty_factor": -1}}, r"penalty_factor=-1"),
    ):
        with pytest.raises(ValueError, match=message):
            check_filter_config(cfg, 8)


def test_train_config_refuses_a_bad_filter_knob_at_start(compose_train, monkeypatch):
    from simko.checks import ConfigError, check_train_config
    from simko.config import PROJECT_ROOT

    monkeypatch.setenv("PROJECT_ROOT", str(PROJECT_ROOT))
    with pytest.raises(ConfigError, match=r"module.overlong.buffer=100: longer than rollout.max_new_tokens=8"):
        check_train_config(compose_train("module.overlong.buffer=100"))


# --- the refill stream of the data module ---------------------------------------------------------------------


class _Rows:
    def __init__(self, n):
        self.rows = [{"id": i, "question": f"{i}+{i}", "answer": str(2 * i), "verifier": "math"} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return dict(self.rows[i])


@pytest.mark.parametrize("kind", ["procedural", "file"])
def test_refill_stream_is_a_pure_function_of_seed_step_round(kind):
    from simko.data import ArithmeticSource, PromptDataModule

    def data(seed=0):
        source = ArithmeticSource(seed=0, split="train") if kind == "procedural" else _Rows(50)
        return PromptDataModule(source, prompts_per_step=4, seed=seed, use_chat_template=False, tokenizer=TOK)

    dm = data()
    first = dm.refill_examples(3, 1, 0, 1)
    assert first == data().refill_examples(3, 1, 0, 1)  # a fresh data module (a resumed run) draws the same
    assert dm.refill_examples(3, 1, 0, 2) + dm.refill_examples(3, 1, 1, 2) == first  # ranks slice the same draw
    others = [dm.refill_examples(s, k, 0, 1) for s, k in ((3, 2), (4, 1), (2, 1))]
    questions = [[e["question"] for e in x] for x in (first, *others, data(seed=1).refill_examples(3, 1, 0, 1))]
    assert len({tuple(q) for q in questions}) == len(questions)
    main = [e["question"] for e in dm.examples_for_step(3, 0, 1)]
    assert main != questions[0] and dm.examples_for_step(3, 0, 1) == data().examples_for_step(3, 0, 1)
    if kind == "file":
        assert len(set(questions[0])) == 4  # distinct rows within a round
    with pytest.raises(ValueError, match="refill rounds count from 1"):
        dm.refill_examples(3, 0, 0, 1)


# --- the RL step, in a real Trainer ----------------------------------------------------------------------------


def _train(tmp_path, steps=2, **module_kw):
    from lightning.pytorch.loggers import CSVLogger

    tok, model = TOK, random_qwen2(seed=1)
    generated = []

    def verifier(completions, answers, names):
        generated.append(len(completions))
        # mixed groups for odd answers; even answers score 0 whatever is sampled: their groups have zero variance
        return [float(len(c) % 2) if int(a) % 2 else 0.0 for c, a in zip(completions, answers)]

    module = RLVRModule(
        model,
        tok,
        build_loss("grpo"),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        group_size=4,
        max_new_tokens=4,
        micro_batch_size=8,
        verifier=verifier,
        diagnostics_top_k=0,
        **module_kw,
    )
    fit_in_process(module, tmp_path, steps, prompts_per_step=4, logger=CSVLogger(tmp_path))
    frame = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    return frame[frame["train/reward"].notna()].reset_index(drop=True), copy.deepcopy(model.state_dict()), generated


def test_training_step_refills_and_logs_and_is_reproducible(tmp_path):
    ds = dict(enabled=True, max_extra_generations=2)
    frame, weights, generated = _train(tmp_path / "a", steps=3, dynamic_sampling=ds, mask_truncated=True)
    for key in ("train/zero_var_groups", "train/zero_var_frac", "train/truncated_frac", "train/kept_groups",
                "train/dynamic_sampling_rounds", "train/unfilled_groups", "train/masked_truncated"):  # fmt: skip
        assert frame[key].notna().all(), key
    rounds = frame["train/dynamic_sampling_rounds"]
    assert len(generated) == 3 + rounds.sum() and rounds.max() >= 1  # one scoring per generation round
    assert (frame["train/kept_groups"] + frame["train/unfilled_groups"] == 4).all()
    assert (rounds[frame["train/zero_var_groups"] == 0] == 0).all()
    again, weights_again, _ = _train(tmp_path / "b", steps=3, dynamic_sampling=ds, mask_truncated=True)
    cols = [c for c in frame if c.startswith("train/")]
    pd.testing.assert_frame_equal(frame[cols], again[cols])
    for key in weights:
        assert torch.equal(weights[key], weights_again[key]), key


def test_dynamic_sampling_needs_a_refill_stream(tmp_path):
    from simko.sampling_filters import check_refill_source

    with pytest.raises(ValueError, match="refill_examples"):
        check_refill_source(DynamicSampling(enabled=True), object())
    check_refill_source(DynamicSampling(enabled=True, max_extra_generations=0), object())
    check_refill_source(DynamicSampling(), object())


def test_rows_without_loss_are_still_in_the_diagnostics():
    from simko.diagnostics import concentration_sums

    model = random_qwen2(seed=4)
    rollouts, _ = _part(0, num_groups=2)
    loss = build_loss("grpo")
    stats = lambda rows_, k: rollout_token_stats(model, rows_, k, 1.0)
    seen = []

    def diagnose(s):
        seen.append(s.mask.sum().item())
        return concentration_sums(s, 0.8)

    out = {}
    for keep in (torch.ones(4, dtype=torch.bool), torch.tensor([False, False, False, True])):
        diagnostics, metrics = defaultdict(float), defaultdict(float)
        hooks = UpdateHooks(stats, diagnose=diagnose)
        schedule = UpdateSchedule(micro_batch_size=2, stats_top_k=3)
        accumulate_gradients(loss, mask_rows(rollouts, keep), torch.ones(4), torch.ones(4), torch.arange(4), hooks,
                             schedule, metrics, diagnostics=diagnostics)  # fmt: skip
        out[int(keep.sum())] = (dict(diagnostics), metrics["num_tokens"])
    per_micro = [rollouts.response_mask[:2].sum().item(), rollouts.response_mask[2:].sum().item()]
    assert seen == per_micro * 2  # two micro-batches of 2 rows, the first without loss in the second run
    assert out[4][0] == pytest.approx(out[1][0]) and out[1][1] == rollouts.response_mask[3].sum().item()
