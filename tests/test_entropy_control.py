"""Adaptive entropy control (``loss.entropy_control``), against references written from the official code:

- EntroPIC (arXiv 2511.15248), yk7333/EntroPIC: ``core_algos.py::compute_policy_loss_entropic`` (the term
  alpha * agg(-r |A|) over the tokens with pi > 0.95, log r clamped to [-20, 20]) and ``dp_actor.py::
  EntroPICDataParallelPPOActor.update_policy`` (alpha = clip(Kp e + Ki I, -1, 1), then I += e);
- Skywork-OR1's adaptive coefficient as TRL has it, ``trl/trainer/grpo_trainer.py::_compute_loss``
  (``use_adaptive_entropy``: c +/- delta within [min, max], the bonus only while the entropy <= target).

The loss gradients are checked in float64 against finite differences of a reference loss; the controllers' laws
against the official recurrences; the state against checkpoints (in process and through ``simko.train``).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from helpers import GlooSum, digit_tokenizer, fit_in_process, make_loss, random_qwen2, run_two_ranks
from simko.checkpointing import read_checkpoint
from simko.losses import build_loss
from simko.losses.entropy_control import AdaptiveEntropyCoef, EntroPIC
from simko.module import RLVRModule
from test_losses import F64, Batch, _Rows, finite_diff_grad, ref_aggregate, ref_logits_stats, ref_ppo_loss, stats64


# ----------------------------------------------------------------------------------------------- EntroPIC's term
def ref_entropic_term(batch, logits, adv, alpha, high_prob, mode="token_mean"):
    """alpha * (-r |A|) on the valid tokens with pi(y) > high_prob, aggregated with the policy term over all tokens.
    (The official code takes a separate mean over the high-probability tokens: see the test below.)"""
    logprobs = ref_logits_stats(logits, batch.tokens)[0]
    ratio = torch.exp(torch.clamp(logprobs - batch.old_logprobs, -20.0, 20.0))
    high = logprobs.detach() > math.log(high_prob)
    term = torch.where(high, -alpha * ratio * adv[:, None].abs(), torch.zeros_like(ratio))
    return ref_aggregate(term, batch.mask, mode)


@pytest.mark.parametrize(
    "alpha,high_prob,mode",
    [
        (0.4, 0.95, "token_mean"),
        (-0.7, 0.95, "token_mean"),
        (0.9, 0.6, "seq_mean_token_mean"),
        (-1.0, 0.6, "token_mean"),
    ],
)
def test_entropic_gradient_matches_finite_differences(alpha, high_prob, mode):
    batch = Batch()
    loss_fn = make_loss("entropy_control", aggregation=mode, entropy_control={"high_prob": high_prob})
    loss_fn.entropy_control.coef = alpha
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)

    def reference(z):
        return ref_ppo_loss(batch, z, adv, mode=mode) + ref_entropic_term(batch, z, adv, alpha, high_prob, mode)

    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    grpo_grad, _ = batch.grad(build_loss("grpo", aggregation=mode))
    high = (ref_logits_stats(batch.logits, batch.tokens)[0].exp() > high_prob) & batch.mask & (adv[:, None] != 0)
    assert high.sum() >= 3
    changed = (grad - grpo_grad).abs().amax(-1) > 1e-12
    assert changed.any() and not (changed & ~high).any()  # only the high-probability tokens
    assert out.metrics["entropy_control/coef"] == alpha


def test_entropic_term_is_the_official_one_times_the_share_of_high_probability_tokens():
    """compute_policy_loss_entropic adds alpha * agg_loss(-r |A|, mask=valid & pi > 0.95, token-mean): a mean over the
    high-probability tokens. Here the term joins the policy term's token mean over all tokens: N_high / N of it."""
    batch = Batch()
    loss_fn = make_loss("entropy_control")
    adv = batch.advantages(loss_fn)
    logprobs = ref_logits_stats(batch.logits, batch.tokens)[0]
    high = (logprobs > math.log(0.95)) & batch.mask
    ratio = torch.exp(logprobs - batch.old_logprobs)
    official = 0.5 * (-ratio * adv[:, None].abs())[high].sum() / high.sum()
    ours = ref_entropic_term(batch, batch.logits, adv, 0.5, 0.95)
    torch.testing.assert_close(ours, official * high.sum() / batch.mask.sum(), rtol=1e-12, atol=0)
    loss_fn.entropy_control.coef = 0.5
    with_term = batch.loss(loss_fn).loss - batch.loss(build_loss("grpo")).loss
    torch.testing.assert_close(with_term.detach(), ours, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------- the controllers
def official_entropic_alphas(entropies, target, kp, ki, limit=1.0):
    """dp_actor.py's loop with one micro-batch per mini-batch: alpha_m from e_m and the integral before it."""
    integral, alphas = 0.0, []
    for h in entropies:
        alphas.append(min(max(kp * (h - target) + ki * integral, -limit), limit))
        integral += h - target
    return alphas


def observe(controller, values):
    """One micro-batch whose valid tokens have these entropies (padded with masked garbage)."""
    entropy = torch.tensor([list(values) + [123.0]], dtype=F64)
    mask = torch.tensor([[True] * len(values) + [False]])
    controller.observe(entropy, mask)


def test_entropic_pi_law_is_the_official_one_an_update_later():
    entropies = [0.9, 0.7, 0.45, 0.3, 0.31, 0.2, 3.0, 2.5, 0.1]  # ... saturates at +1 after the jump
    controller = EntroPIC(target=0.3, kp=0.8, ki=0.05)
    applied = []
    for h in entropies:
        applied.append(controller.coef)  # what this update's loss uses
        observe(controller, [h - 0.1, h + 0.1])  # two tokens, mean h
        observe(controller, [h])  # a second micro-batch
        controller.update()
    official = official_entropic_alphas(entropies, 0.3, 0.8, 0.05)
    assert applied[0] == 0.0 and applied[1:] == pytest.approx(official[:-1], abs=1e-12)
    assert controller.coef == pytest.approx(official[-1], abs=1e-12) and max(official) == 1.0
    assert controller.integral == pytest.approx(sum(h - 0.3 for h in entropies), abs=1e-12)
    assert controller.measured == pytest.approx(0.1, abs=1e-12)
    # an update that observed no token (nowhere) leaves everything as it was
    before = controller.state_dict()
    controller.update()
    assert controller.state_dict() == before


def test_null_target_holds_the_first_measured_entropy():
    controller = EntroPIC(target=None, kp=0.5, ki=0.1)
    assert controller.metrics() == {"entropy_control/integral": 0.0}  # no target, no measurement yet
    for h in (0.8, 0.6, 0.5):
        observe(controller, [h])
        controller.update()
    assert controller.target == pytest.approx(0.8)  # the first update's entropy
    official = official_entropic_alphas([0.8, 0.6, 0.5], 0.8, 0.5, 0.1)
    assert controller.coef == pytest.approx(official[-1], abs=1e-12) and controller.coef < 0  # raise the entropy
    resumed = EntroPIC(target=None, kp=0.5, ki=0.1)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.state_dict() == controller.state_dict()
    fixed = EntroPIC(target=0.3, kp=0.5, ki=0.1)
    fixed.load_state_dict(controller.state_dict())
    assert fixed.target == 0.3  # a target given in the config wins over the checkpoint's
    assert make_loss("entropy_control").entropy_control.target is None  # the preset holds the starting entropy


def test_adaptive_coef_follows_trl():
    controller = AdaptiveEntropyCoef(target=0.5, init_coef=0.01, delta=0.004, min_coef=0.0, max_coef=0.02)
    expected_coef, applied = 0.01, []
    for h in [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.4, 0.5, 0.9]:
        applied.append(controller.bonus_coef())
        observe(controller, [h])
        controller.update()
        expected_coef = min(expected_coef + 0.004, 0.02) if h <= 0.5 else max(expected_coef - 0.004, 0.0)
        assert controller.coef == pytest.approx(expected_coef, abs=1e-15)
    # applied only after a measurement at or below the target (TRL's last entropy starts at inf)
    assert applied[:4] == [0.0] * 4 and applied[4] == pytest.approx(0.004) and applied[-1] == pytest.approx(0.02)
    assert controller.bonus_coef() == 0.0  # the last entropy (0.9) is above the target


def test_adaptive_coef_bonus_gradient_matches_finite_differences():
    batch = Batch()
    loss_fn = build_loss("grpo", entropy_control={"method": "adaptive_coef", "target": 2.0})
    controller = loss_fn.entropy_control
    controller.coef, controller.measured = 0.05, 1.5  # below the target: the bonus acts
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)

    def reference(z):
        entropy = ref_logits_stats(z, batch.tokens)[1]
        return ref_ppo_loss(batch, z, adv) - 0.05 * ref_aggregate(entropy, batch.mask, "token_mean")

    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    controller.measured = 2.5  # above: no bonus, GRPO's gradient
    torch.testing.assert_close(batch.grad(loss_fn)[0], batch.grad(build_loss("grpo"))[0], rtol=0, atol=0)


def test_measured_entropy_is_the_token_mean_whatever_the_micro_batches():
    """simko.update.accumulate_gradients in micro-batches of 3 rows: the controller measures the mini-batch's token
    mean of the entropy over the loss's tokens, and the gradient equals the one-batch gradient."""
    from simko.update import accumulate_gradients

    batch = Batch()
    one = make_loss("entropy_control", entropy_control={"high_prob": 0.6})
    one.entropy_control.coef = 0.3
    adv = batch.advantages(one)
    one_grad, _ = batch.grad(one)
    one.end_optimizer_step()
    entropy = ref_logits_stats(batch.logits, batch.tokens)[1]
    assert one.entropy_control.measured == pytest.approx(float(entropy[batch.mask].mean()), rel=1e-12)

    micro = make_loss("entropy_control", entropy_control={"high_prob": 0.6})
    micro.entropy_control.coef = 0.3
    logits = batch.logits.clone().requires_grad_(True)

    def token_stats(idx, top_k):
        length = max(int(batch.mask[idx].sum(-1).max()), 1)
        return stats64(logits[idx, :length], batch.tokens[idx, :length], batch.mask[idx, :length], top_k)

    rows = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15, 0, 1, 2, 3, 8, 9, 10, 11])
    accumulate_gradients(
        micro, _Rows(batch.mask), rows, token_stats, adv, batch.rewards, 3, defaultdict(float),
        old_logprobs=batch.old_logprobs,
    )  # fmt: skip
    micro.end_optimizer_step()
    torch.testing.assert_close(logits.grad, one_grad, rtol=1e-10, atol=1e-14)
    # the same measurement (float64 sums added in another order) and so the same next coefficient
    assert micro.entropy_control.measured == pytest.approx(one.entropy_control.measured, rel=1e-12)
    assert micro.entropy_control.coef == pytest.approx(one.entropy_control.coef, rel=1e-12) != 0.3


# --------------------------------------------------------------------------------------------- ranks (gloo)
class _FakeModule:
    """What RLVRModule._sum_over_ranks reads: the device and the trainer's strategy."""

    device = torch.device("cpu")

    class trainer:  # noqa: N801
        strategy = GlooSum()


RANK_ENTROPIES = {0: [[0.9, 0.8, 0.7], [0.2], [1.5, 1.4]], 1: [[0.1], [0.3, 0.2, 0.25, 0.2], [0.9]]}


def _rank_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loss_fn = build_loss("grpo", entropy_control={"target": 0.5, "kp": 0.7, "ki": 0.1})
    states = []
    for values in RANK_ENTROPIES[rank]:  # one optimizer step each, different tokens on each rank
        observe(loss_fn.entropy_control, values)
        loss_fn.end_optimizer_step(lambda t: RLVRModule._sum_over_ranks(_FakeModule(), t))
        states.append(loss_fn.state_dict())
    queue.put((rank, states))
    dist.destroy_process_group()


def test_two_ranks_measure_the_pooled_entropy_and_keep_the_same_coefficient():
    got = run_two_ranks(_rank_worker, port_salt=11)
    assert got[0] == got[1]  # bitwise the same state on both ranks
    pooled = [sum(a + b) / len(a + b) for a, b in zip(RANK_ENTROPIES[0], RANK_ENTROPIES[1])]
    alphas = official_entropic_alphas(pooled, 0.5, 0.7, 0.1)
    for state, h, alpha in zip(got[0], pooled, alphas):
        assert state["entropy_control"]["measured"] == pytest.approx(h, rel=1e-12)
        assert state["entropy_control"]["coef"] == pytest.approx(alpha, abs=1e-12)


# ------------------------------------------------------------------------------------------ state, knobs, module
def test_state_round_trips_and_continues_bitwise():
    a = build_loss("simko", entropy_control={"target": 0.4, "ki": 0.2})
    for h in (0.9, 0.6, 0.5):
        observe(a.entropy_control, [h, h / 2])
        a.end_optimizer_step()
    b = build_loss("simko", entropy_control={"target": 0.4, "ki": 0.2})
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.entropy_control.coef != 0
    for h in (0.3, 0.2):
        for loss_fn in (a, b):
            observe(loss_fn.entropy_control, [h])
            loss_fn.end_optimizer_step()
    assert b.state_dict() == a.state_dict()
    assert build_loss("grpo").state_dict() == {}
    build_loss("grpo").load_state_dict(a.state_dict())  # a loss without a controller ignores it
    fresh = build_loss("grpo", entropy_control={"target": 0.4})
    fresh.load_state_dict({})  # a checkpoint without controller state: the controller starts afresh
    assert fresh.entropy_control.coef == 0.0
    other = build_loss("grpo", entropy_control={"method": "adaptive_coef", "target": 0.4})
    with pytest.raises(ValueError, match="checkpoint's entropy controller is 'entropic'.*'adaptive_coef'"):
        other.load_state_dict(a.state_dict())


def test_entropy_control_knobs_are_checked_when_the_loss_is_built():
    with pytest.raises(TypeError, match="needs a target entropy"):
        build_loss("grpo", entropy_control={"kp": 1.0})
    with pytest.raises(TypeError, match=r"'entropic' has no knob \['delta'\]"):
        build_loss("grpo", entropy_control={"target": 0.3, "delta": 0.1})
    with pytest.raises(ValueError, match="unknown entropy_control method 'pid'"):
        build_loss("grpo", entropy_control={"method": "pid", "target": 0.3})
    for bad in ({"target": -0.1}, {"kp": -1}, {"high_prob": 1.0}, {"max_alpha": 0}):
        with pytest.raises(ValueError):
            build_loss("grpo", entropy_control={"target": 0.3, **bad})
    for bad in ({"init_coef": 2.0}, {"delta": 0.0}, {"min_coef": 0.1, "init_coef": 0.0}):
        with pytest.raises(ValueError):
            build_loss("grpo", entropy_control={"method": "adaptive_coef", "target": 0.3, **bad})
    with pytest.raises(ValueError, match="leave entropy_coef at 0"):
        build_loss("grpo", entropy_coef=0.01, entropy_control={"method": "adaptive_coef", "target": 0.3})
    # EntroPIC and a fixed bonus combine; the preset is GRPO with the official gains
    assert build_loss("grpo", entropy_coef=0.01, entropy_control={"target": 0.3}).entropy_coef == 0.01
    preset = make_loss("entropy_control").entropy_control
    assert isinstance(preset, EntroPIC) and (preset.kp, preset.ki, preset.max_alpha) == (1.0, 0.01, 1.0)
    assert preset.log_high_prob == math.log(0.95)


def test_the_module_updates_the_controller_every_optimizer_step_logs_it_and_checkpoints_it(tmp_path):
    """A real Trainer in process: 2 RL steps of 2 epochs x 2 mini-batches = 8 controller updates; the logged
    coefficient and entropy are the controller's; on_save/on_load_checkpoint carry its state."""
    tok, model = digit_tokenizer(), random_qwen2(seed=1)
    loss_fn = build_loss("grpo", entropy_control={"target": 0.05, "kp": 0.5, "high_prob": 0.3})
    updates = []
    original = loss_fn.entropy_control.update
    loss_fn.entropy_control.update = lambda reduce=None: (updates.append(1), original(reduce))[1]
    module = RLVRModule(
        model, tok, loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), group_size=4, max_new_tokens=4,
        ppo_epochs=2, num_mini_batches=2, micro_batch_size=5,
        verifier=lambda completions, answers, names: [float(len(c) % 2) for c in completions],
    )  # fmt: skip
    trainer = fit_in_process(module, tmp_path, max_steps=8, prompts_per_step=3)
    assert len(updates) == 8 and module.rl_step == 2
    logged = trainer.callback_metrics
    state = loss_fn.state_dict()["entropy_control"]
    assert float(logged["train/entropy_control/entropy"]) == pytest.approx(state["measured"], rel=1e-6)
    assert float(logged["train/entropy_control/integral"]) == pytest.approx(state["integral"], rel=1e-6)
    assert state["coef"] != 0 and "train/entropy_control/coef" in logged
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["loss_state"] == loss_fn.state_dict()
    loss_fn.load_state_dict({"entropy_control": {**state, "coef": 0.0, "integral": 0.0}})
    module.on_load_checkpoint(checkpoint)
    assert loss_fn.state_dict()["entropy_control"] == state


# ---------------------------------------------------------------------------------------- through simko.train
# The small tiny model of test_entry_points warm-started for 400 steps (not 40): rewards are mixed in the first RL
# steps, so the loss and the EntroPIC term move the weights. The preset: target null (the first update's entropy,
# restored from the checkpoint too), the official gains.
CONTROLLED = ["model.warm_start_steps=400", "loss=entropy_control"]


@pytest.fixture(scope="module")
def train_args(tmp_path_factory):
    from test_entry_points import SMALL_TINY

    cache = tmp_path_factory.mktemp("cache")

    def args(tmp_path, run_dir, *extra):
        return ["debug=fast", f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}", "callbacks.progress=null",
                f"hydra.run.dir={tmp_path / run_dir}", *SMALL_TINY, *CONTROLLED, *extra]  # fmt: skip

    return args


@pytest.mark.integration
def test_resumed_run_with_entropy_control_equals_the_uninterrupted_one(tmp_path, train_args):
    """loss=entropy_control, 4 RL steps vs 2 + resume from step 2's last.ckpt: every metric (but time/*), the
    controller's state and the final weights bitwise equal. Resuming from the same checkpoint with the controller's
    state removed gives another coefficient and loss at step 3: the test sees the state."""
    from test_entry_points import metrics, run

    run("simko.train", *train_args(tmp_path, "full", "rl_steps=4"))
    run("simko.train", *train_args(tmp_path, "first", "rl_steps=2"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(ckpt)
    assert saved["loss_state"]["entropy_control"]["coef"] != 0
    run("simko.train", *train_args(tmp_path, "resumed", "rl_steps=4", f"ckpt_path={ckpt}"))
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert list(resumed.index) == [3.0, 4.0]
    cols = [c for c in full.columns if not c.startswith("time/")]
    assert "train/entropy_control/coef" in cols and "train/entropy_control/entropy" in cols
    pd.testing.assert_frame_equal(full.loc[[3.0, 4.0], cols], resumed[cols], check_exact=True)
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["loss_state"] == b["loss_state"] and a["loss_state"]["entropy_control"]["target"] is not None
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert full["train/grad_norm"].iloc[:3].gt(0).all() and full["train/loss"].iloc[:3].ne(0).all()  # it trains

    stateless = tmp_path / "stateless.ckpt"
    torch.save({k: v for k, v in saved.items() if k != "loss_state"}, stateless)
    run("simko.train", *train_args(tmp_path, "stateless", "rl_steps=3", f"ckpt_path={stateless}"))
    lost = metrics(tmp_path / "stateless")
    assert lost.loc[3.0, "train/entropy_control/coef"] == 0.0 != full.loc[3.0, "train/entropy_control/coef"]
    assert lost.loc[3.0, "train/loss"] != full.loc[3.0, "train/loss"]  # the term acts on high-probability tokens


@pytest.mark.slow
@pytest.mark.integration
def test_entropy_control_on_two_processes_ddp_equals_fsdp2(tmp_path, train_args):
    """2 CPU processes under DDP and FSDP2: the controller's all-reduce goes through each strategy, and both run the
    same steps with the same coefficients and measured entropies (the logs are rank 0's; the ranks agree by the
    gloo test above)."""
    from test_entry_points import metrics, run

    for trainer in ("ddp", "fsdp2"):
        run("simko.train", *train_args(tmp_path, trainer, f"trainer={trainer}", "rl_steps=3"))
    ddp, fsdp2 = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp2")
    cols = ["train/loss", "train/grad_norm", "train/entropy_control/coef", "train/entropy_control/entropy"]
    pd.testing.assert_frame_equal(ddp[cols], fsdp2[cols], rtol=1e-4)
    # target null: the first update's entropy, so alpha = kp * 0 after it; then the error acts
    coef = ddp["train/entropy_control/coef"]
    assert coef.loc[1.0] == coef.loc[2.0] == 0.0 != coef.loc[3.0] and ddp.loc[3.0, "train/grad_norm"] > 0
