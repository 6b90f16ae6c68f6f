"""Loss family tests: every gradient against an independent reference (float64 finite differences of a loss
written here from scratch, or SimKO's analytic gradient from shared/science/simko.md), plus the identities of
each method, the advantage estimators (pass@k against brute-force enumeration) and the YAML configs."""

from __future__ import annotations

import inspect
import itertools
import math
from collections import defaultdict

import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_config, loss_configs, make_loss
from simko.advantages import build_advantage
from simko.losses import (
    AGGREGATIONS,
    LOSSES,
    SimKOLoss,
    TokenStats,
    aggregate,
    aggregation_weight,
    build_loss,
    response_quantile_mask,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------------- fixtures
def ref_logits_stats(logits, tokens, top_k=0):
    """log pi(y), entropy, top-K log-probs and ids in the logits' own dtype, computed here from scratch."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    logprobs = logp.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    ids = logits.detach().argsort(-1, descending=True)[..., :top_k]
    return logprobs, entropy, logp.gather(-1, ids), ids


def stats64(logits, tokens, mask, top_k=0):
    """TokenStats in float64 (TokenStats.from_logits computes in float32, too coarse for finite differences)."""
    return TokenStats(*ref_logits_stats(logits, tokens, top_k), mask.bool())


class Batch:
    """16 responses = 4 groups of 4: mixed, all correct, all wrong, mixed. T=6, V=5, float64.

    Padding of various lengths (one row fully masked); half the sampled tokens are the argmax (top-1); most old
    log-probs are close to the current ones (|log r| in [0.02, 0.08]: no clip), 25% are far (|log r| = 1.5: the
    clip is active for about half of those, depending on the sign of A).
    """

    P, G, T, V = 4, 4, 6, 5

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        B, T, V = self.P * self.G, self.T, self.V
        self.B = B
        row_scale = torch.rand(B, 1, 1, generator=gen, dtype=F64) * 3 + 0.3  # rows of different entropy scales
        self.logits = torch.randn(B, T, V, generator=gen, dtype=F64) * row_scale
        random_tokens = torch.randint(0, V, (B, T), generator=gen)
        use_argmax = torch.rand(B, T, generator=gen) < 0.5
        self.tokens = torch.where(use_argmax, self.logits.argmax(-1), random_tokens)
        lengths = torch.tensor([6, 3, 6, 4, 0, 2, 6, 6, 1, 6, 5, 6, 6, 4, 6, 3])
        self.mask = torch.arange(T)[None, :] < lengths[:, None]
        self.rewards = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0], dtype=F64)
        lp0 = ref_logits_stats(self.logits, self.tokens)[0]
        sign = torch.where(torch.rand(B, T, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        offset = sign * (0.02 + 0.06 * torch.rand(B, T, generator=gen, dtype=F64))
        far = torch.rand(B, T, generator=gen) < 0.25
        offset = torch.where(far, sign * 1.5, offset)
        self.old_logprobs = lp0 - offset  # log r = offset
        self.ref_logprobs = lp0 + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)

    def grouped(self, per_response):
        return per_response.view(self.P, self.G)

    def select(self, keep):
        """The same batch with only the responses ``keep`` (as RLVR-Decomposed's ``batch.subset``)."""
        sub = Batch.__new__(Batch)
        sub.B = int(keep.sum())
        for name in ("logits", "tokens", "mask", "rewards", "old_logprobs", "ref_logprobs"):
            setattr(sub, name, getattr(self, name)[keep])
        return sub

    def advantages(self, loss_fn):
        # float32 values: PolicyLoss takes advantages in float32, so the float64 references use the same numbers
        return loss_fn.compute_advantages(self.grouped(self.rewards)).reshape(-1).float().to(F64)

    def loss(self, loss_fn, logits=None, top_k=None, advantages=None, **kwargs):
        logits = self.logits if logits is None else logits
        top_k = loss_fn.top_k if top_k is None else top_k
        adv = self.advantages(loss_fn) if advantages is None else advantages
        stats = stats64(logits, self.tokens, self.mask, top_k)
        kwargs.setdefault("ref_logprobs", self.ref_logprobs)
        return loss_fn(stats, old_logprobs=self.old_logprobs, advantages=adv, rewards=self.rewards, **kwargs)

    def grad(self, loss_fn, **kwargs):
        logits = self.logits.clone().requires_grad_(True)
        out = self.loss(loss_fn, logits=logits, **kwargs)
        out.loss.backward()
        return logits.grad, out


def finite_diff_grad(fn, x, eps=1e-6):
    """Central differences of the scalar ``fn(x)`` w.r.t. every entry of the float64 tensor ``x``."""
    x = x.detach().clone()
    flat = x.view(-1)
    grad = torch.zeros_like(flat)
    with torch.no_grad():
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            plus = float(fn(x))
            flat[i] = orig - eps
            minus = float(fn(x))
            flat[i] = orig
            grad[i] = (plus - minus) / (2 * eps)
    return grad.view_as(x)


# ------------------------------------------------------------------------------ reference losses (from scratch)
def ref_aggregate(values, mask, mode, norm_len=None):
    """The aggregations by their definitions, response by response (verl's agg_loss; Dr.GRPO's B x L)."""
    m = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * m).sum() / m.sum()
    rows = range(values.shape[0])
    if mode == "seq_mean_token_mean":  # mean over the responses with a valid token (verl: fully masked ones excluded)
        means = [(values[b] * m[b]).sum() / m[b].sum() for b in rows if m[b].sum() > 0]
        return torch.stack(means).sum() / len(means)
    if mode == "seq_mean_token_sum_norm":  # sum / (B * L), B counting every response (TRL's dr_grpo)
        length = values.shape[-1] if norm_len is None else norm_len
        return torch.stack([(values[b] * m[b]).sum() for b in rows]).sum() / (len(rows) * length)
    raise AssertionError(mode)


def ref_ppo_objective(logprobs, old_logprobs, adv, eps_low, eps_high, dual_clip_c=None):
    """Per-token PPO loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (Schulman et al. 2017); with dual clip
    (Ye et al. 2020) the loss of a token with A < 0 is at most -c A."""
    r = torch.exp(logprobs - old_logprobs)
    a = adv[:, None].expand_as(r)
    loss = -torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
    if dual_clip_c is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -dual_clip_c * a), loss)
    return loss


def ref_k3(logprobs, ref_logprobs):
    """verl's low_var_kl: x = log pi_ref - log pi clamped to [-20, 20], k3 = e^x - x - 1 clamped to [-10, 10]."""
    x = torch.clamp(ref_logprobs - logprobs, -20, 20)
    return torch.clamp(torch.exp(x) - x - 1, -10, 10)


def ref_ppo_loss(
    batch, logits, adv, eps_low=0.2, eps_high=0.2, mode="token_mean", kl_coef=0.0, norm_len=None, dual_clip_c=None
):
    logprobs = ref_logits_stats(logits, batch.tokens)[0]
    per_token = ref_ppo_objective(logprobs, batch.old_logprobs, adv, eps_low, eps_high, dual_clip_c)
    loss = ref_aggregate(per_token, batch.mask, mode, norm_len)
    if kl_coef:
        loss = loss + kl_coef * ref_aggregate(ref_k3(logprobs, batch.ref_logprobs), batch.mask, mode, norm_len)
    return loss


def ref_token_mean_entropy(batch, logits):
    return ref_aggregate(ref_logits_stats(logits, batch.tokens)[1], batch.mask, "token_mean")


def ref_covariance(batch, adv):
    """Cov_t = (log pi_t - mean) * (A_t - mean) over the valid tokens, by loops-free but separate arithmetic."""
    logprobs = ref_logits_stats(batch.logits, batch.tokens)[0]
    valid = batch.mask
    a_tok = adv[:, None].expand_as(logprobs)
    lp_mean = logprobs[valid].mean()
    a_mean = a_tok[valid].mean()
    return (logprobs - lp_mean) * (a_tok - a_mean)


def simko_reference(batch, adv, k, alpha, lam, tau, eps_low=0.2, eps_high=0.2):
    """SimKO's analytic gradient (simko.md) by hand, token by token, and its per-token coefficients.

    For a token whose PPO branch is unclipped:
        grad = -A~ r [ (1 - a) (e_y - p) + (a / K) sum_k (e_{c_k} - p) ] / N,   a = alpha * w * correct,
    since grad_z log softmax(z)_j = e_j - p. Returns (grad [B, T, V], coef [B, T], a [B, T], topk_ids).
    """
    z = batch.logits
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    logprobs = logp.gather(-1, batch.tokens[..., None]).squeeze(-1)
    entropy = -(p * logp).sum(-1)
    ratio = torch.exp(logprobs - batch.old_logprobs)
    topk_ids = z.argsort(-1, descending=True)[..., :k]
    n_valid = batch.mask.sum()
    grad = torch.zeros_like(z)
    coef = torch.zeros_like(ratio)
    mix = torch.zeros_like(ratio)
    eye = torch.eye(z.shape[-1], dtype=F64)
    for b in range(batch.B):
        valid = batch.mask[b]
        if not valid.any():
            continue
        q = torch.quantile(entropy[b][valid], tau)  # this response's own quantile
        for t in range(batch.T):
            if not valid[t]:
                continue
            a, r = float(adv[b]), float(ratio[b, t])
            if (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low):
                continue  # the clipped branch is active: no gradient
            forking = bool(entropy[b, t] > q)
            top1 = int(batch.tokens[b, t]) == int(z[b, t].argmax())
            a_used = lam * a if (a < 0 and top1 and forking) else a
            m = alpha if (forking and batch.rewards[b] >= 1) else 0.0
            dlog = lambda j, b=b, t=t: eye[j] - p[b, t]
            direction = (1 - m) * dlog(batch.tokens[b, t]) + (m / k) * sum(dlog(c) for c in topk_ids[b, t])
            coef[b, t] = -a_used * r / n_valid
            mix[b, t] = m
            grad[b, t] = coef[b, t] * direction
    return grad, coef, mix, topk_ids


# ====================================================================================== advantage estimators
def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = build_advantage("grpo")(rewards)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4))  # all-equal groups -> 0
    torch.testing.assert_close(adv[3], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))
    dr_grpo = build_advantage("grpo", norm_std=False)(rewards)
    torch.testing.assert_close(dr_grpo[3], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_psr_nsr_w_reinforce_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert build_advantage("psr")(rewards).tolist() == [[1, 0, 1], [0, 0, 0]]
    assert build_advantage("nsr")(rewards).tolist() == [[0, -1, 0], [-1, -1, -1]]
    torch.testing.assert_close(build_advantage("w_reinforce")(rewards), torch.tensor([[0.1, -1, 0.1], [-1.0, -1, -1]]))
    torch.testing.assert_close(build_advantage("w_reinforce", pos_weight=0.5)(rewards)[0], torch.tensor([0.5, -1, 0.5]))
    # threshold: a reward of 0.5 is correct at threshold 0.5, not at 1.0
    half = torch.tensor([[0.5, 0.0]])
    assert build_advantage("psr", correct_threshold=0.5)(half).tolist() == [[1, 0]]
    assert build_advantage("psr")(half).tolist() == [[0, 0]]
    # the estimators of the presets
    assert make_loss("nsr").compute_advantages(rewards).tolist() == [[0, -1, 0], [-1, -1, -1]]
    assert make_loss("psr").compute_advantages(rewards).tolist() == [[1, 0, 1], [0, 0, 0]]


def passk_brute_force(correct: list[bool], k: int, eps: float = 1e-6) -> list[float]:
    """Chen et al. 2025's definition: every k-subset is a group member with reward max(correct over it); GRPO
    normalises those rewards (population std over the subsets); a response gets the mean advantage of the subsets
    that contain it."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    rewards = torch.tensor([float(any(correct[i] for i in s)) for s in subsets], dtype=F64)
    mean, std = rewards.mean(), rewards.std(unbiased=False)
    adv = (rewards - mean) / (std + eps)
    return [float(torch.stack([adv[j] for j, s in enumerate(subsets) if i in s]).mean()) for i in range(len(correct))]


@pytest.mark.parametrize("group_size", [2, 3, 5, 6])
def test_passk_advantages_match_brute_force(group_size):
    for num_correct, k in itertools.product(range(group_size + 1), range(1, group_size + 1)):
        correct = [i < num_correct for i in range(group_size)]
        correct = correct[1::2] + correct[0::2]  # not sorted
        rewards = torch.tensor([correct], dtype=torch.float32)
        got = build_advantage("passk", k=k)(rewards)[0].double()
        torch.testing.assert_close(got, torch.tensor(passk_brute_force(correct, k), dtype=F64), atol=1e-5, rtol=1e-5)


def test_passk_k1_is_grpo_with_population_std_and_k_checked():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    centred = rewards - rewards.mean(1, keepdim=True)
    population_std = rewards.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(build_advantage("passk", k=1)(rewards), centred / (population_std + 1e-6))
    with pytest.raises(ValueError, match="k <= group_size"):
        build_advantage("passk", k=6)(rewards)
    with pytest.raises(ValueError, match="k <= group_size"):
        make_loss("passk", advantage_kwargs={"k": 6}).compute_advantages(rewards)
    for bad in (0, 1.5):  # refused when the loss is built, not at the first step
        with pytest.raises(ValueError, match="k must be"):
            build_loss("grpo", advantage="passk", advantage_kwargs={"k": bad})
    # through the generic advantage_kwargs of any loss
    simko_passk = build_loss("simko", advantage="passk", advantage_kwargs={"k": 2})
    torch.testing.assert_close(simko_passk.compute_advantages(rewards), build_advantage("passk", k=2)(rewards))


def test_advantage_knobs_are_checked_when_the_loss_is_built():
    with pytest.raises(TypeError, match="advantage 'nsr' has no knob \\['norm_std'\\].*correct_threshold"):
        build_loss("grpo", advantage="nsr", advantage_kwargs={"norm_std": False})
    with pytest.raises(ValueError, match="unknown advantage estimator 'bogus'"):
        build_loss("grpo", advantage="bogus")
    with pytest.raises(ValueError, match="pos_weight"):
        build_loss("grpo", advantage="w_reinforce", advantage_kwargs={"pos_weight": -0.5})


# ============================================================================= PPO-family gradients (FD, float64)
# (loss config, keys replaced in it, reference loss knobs): the presets as simko.train builds them
PPO_CASES = [
    ("grpo", {}, {}),
    ("grpo", {"clip_eps_high": 0.28}, {"eps_high": 0.28}),
    ("dapo", {}, {"eps_high": 0.28}),
    (
        "grpo",
        {"aggregation": "seq_mean_token_sum_norm", "norm_len": 6, "advantage_kwargs": {"norm_std": False}},
        {"mode": "seq_mean_token_sum_norm"},
    ),
    ("dr_grpo", {"norm_len": 10}, {"mode": "seq_mean_token_sum_norm", "norm_len": 10}),  # a constant, not T = 6
    ("grpo", {"aggregation": "seq_mean_token_mean"}, {"mode": "seq_mean_token_mean"}),  # row 4 is empty
    ("grpo", {"dual_clip_c": 3.0}, {"dual_clip_c": 3.0}),
    (
        "dapo",
        {"dual_clip_c": 1.5, "aggregation": "seq_mean_token_mean"},
        {"eps_high": 0.28, "dual_clip_c": 1.5, "mode": "seq_mean_token_mean"},
    ),
    ("grpo", {"kl_coef": 0.1, "kl_estimator": "k3"}, {"kl_coef": 0.1}),
    ("psr", {"subset": "all"}, {}),  # the whole batch, A = 0 on the others (the papers' subsets: below)
    ("nsr", {"subset": "all"}, {}),
    ("w_reinforce", {}, {}),
    ("passk", {"advantage_kwargs": {"k": 2}}, {}),
]


@pytest.mark.parametrize("name,overrides,ref_kwargs", PPO_CASES, ids=lambda v: str(v))
def test_ppo_family_gradient_matches_finite_differences(name, overrides, ref_kwargs):
    batch = Batch()
    loss_fn = make_loss(name, **overrides)
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    reference = lambda z: ref_ppo_loss(batch, z, adv, **ref_kwargs)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert out.metrics["clip_frac"] > 0  # the batch exercises clipped tokens
    assert grad[~batch.mask].abs().max() == 0  # padding gets no gradient


def test_fixed_sign_advantages_of_psr_nsr_w_reinforce():
    batch = Batch()
    correct = batch.rewards == 1
    torch.testing.assert_close(batch.advantages(make_loss("psr")), correct.to(F64))
    torch.testing.assert_close(batch.advantages(make_loss("nsr")), -(~correct).to(F64))
    torch.testing.assert_close(batch.advantages(make_loss("w_reinforce")), torch.where(correct, 0.1, -1.0).to(F64))


# ==================================================================== aggregation rules, PSR/NSR subsets (FD)
def test_seq_mean_token_mean_leaves_empty_responses_out_and_dr_grpo_needs_a_constant():
    values = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0], [9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # (mean(1, 3) + 5) / 2 non-empty responses (verl's agg_loss), not / 4 rows
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx(3.5)
    assert aggregate(values, mask, "seq_mean_token_sum_norm", norm_len=10).item() == pytest.approx(9 / 40)  # B L
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(3.0)
    assert aggregate(values, torch.zeros_like(mask), "seq_mean_token_mean").item() == 0.0
    assert [aggregation_weight(mask, m) for m in AGGREGATIONS] == [3.0, 2.0, 4.0]  # each mode's denominator
    with pytest.raises(ValueError, match="set norm_len"):
        build_loss("grpo", aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="norm_len must be an integer"):
        build_loss("grpo", aggregation="seq_mean_token_sum_norm", norm_len=0)


# (loss config, keys replaced, kept responses: "correct" | "incorrect", reference knobs)
SUBSET_CASES = [
    ("psr", {}, "correct", {}),
    ("nsr", {}, "incorrect", {}),
    ("nsr", {"aggregation": "seq_mean_token_mean"}, "incorrect", {"mode": "seq_mean_token_mean"}),
    ("psr", {"aggregation": "seq_mean_token_sum_norm", "norm_len": 6}, "correct", {"mode": "seq_mean_token_sum_norm"}),
    ("nsr", {"kl_coef": 0.1, "entropy_coef": 0.05}, "incorrect", {"kl_coef": 0.1, "entropy_coef": 0.05}),
]


@pytest.mark.parametrize("name,overrides,kept,ref_kwargs", SUBSET_CASES, ids=lambda v: str(v))
def test_psr_nsr_are_the_loss_of_the_subset_batch(name, overrides, kept, ref_kwargs):
    """RLVR-Decomposed's PSR/NSR: the batch subset to the correct (incorrect) responses, then the loss, KL and
    entropy bonus of that batch alone (its ray_trainer.py: batch.subset(correct_idx) before the actor update)."""
    batch = Batch()
    loss_fn = make_loss(name, **overrides)
    assert loss_fn.subset == "nonzero_advantage"
    keep = batch.rewards == 1 if kept == "correct" else batch.rewards != 1
    sub = batch.select(keep)
    adv = batch.advantages(loss_fn)
    entropy_coef = ref_kwargs.pop("entropy_coef", 0.0)
    mode = ref_kwargs.get("mode", "token_mean")

    def reference(z):
        loss = ref_ppo_loss(sub, z[keep], adv[keep], **ref_kwargs)
        entropy = ref_logits_stats(z[keep], sub.tokens)[1]
        return loss - entropy_coef * ref_aggregate(entropy, sub.mask, mode, ref_kwargs.get("norm_len"))

    grad, out = batch.grad(loss_fn)
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert grad[~keep].abs().max() == 0 and grad[keep].abs().max() > 0
    assert out.metrics["subset_frac"] == pytest.approx(float(keep.float().mean()))
    assert out.metrics["num_tokens"] == float(sub.mask.sum())


def test_whole_batch_psr_is_the_subset_gradient_times_the_token_share():
    """`subset: all` (the project's PSR before issue 13) scales the papers' token-mean gradient by N_sub / N."""
    batch = Batch()
    subset_grad, _ = batch.grad(make_loss("psr"))
    whole_grad, _ = batch.grad(make_loss("psr", subset="all"))
    share = int(batch.mask[batch.rewards == 1].sum()) / int(batch.mask.sum())
    assert 0.3 < share < 0.7
    torch.testing.assert_close(whole_grad, share * subset_grad, rtol=1e-12, atol=1e-15)
    # an empty subset (no correct response): zero loss and gradient, no NaN
    none_correct = batch.loss(make_loss("psr"), advantages=torch.zeros(batch.B, dtype=F64))
    assert none_correct.loss.item() == 0.0 and none_correct.metrics["subset_frac"] == 0.0


# ========================================================================================== KL to the reference
def test_k3_is_clamped_as_verl():
    from simko.losses import kl_penalty

    log_ratio = torch.tensor([0.0, 0.5, -0.5, 2.0, -2.0, -2.5, -2.7, 15.0, 28.0, -28.0, 69.0, -100.0], dtype=F64)
    lp = log_ratio.clone().requires_grad_(True)
    kl = kl_penalty(lp, torch.zeros_like(lp), "k3")
    kl.sum().backward()
    unclamped = torch.exp(-log_ratio) - 1 + log_ratio
    expected = torch.where(unclamped > 10, torch.full_like(unclamped, 10.0), unclamped)  # k3 >= 0: only the top
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-12, atol=1e-12)
    # gradient 1 - e^{-x} where the estimate is inside the clamp, 0 beyond it
    torch.testing.assert_close(lp.grad, torch.where(unclamped > 10, 0.0, 1 - torch.exp(-log_ratio)))
    assert kl[-4:].tolist() == [10.0] * 4 and unclamped[-3].item() > 1e12  # unclamped: 1.4e12 at -28 nats
    # float32 far beyond exp's range: finite value and gradient (unclamped: inf and NaN)
    far = torch.tensor([-100.0, 100.0, -1000.0], requires_grad=True)
    out = kl_penalty(far, torch.zeros(3), "k3")
    out.sum().backward()
    assert out.tolist() == [10.0, 10.0, 10.0] and far.grad.tolist() == [0.0, 0.0, 0.0]
    # k1 and k2 are not clamped (as verl)
    assert kl_penalty(torch.tensor([-30.0]), torch.zeros(1), "k1").item() == -30.0
    assert kl_penalty(torch.tensor([-30.0]), torch.zeros(1), "k2").item() == 450.0


def test_k3_term_gradient_with_far_reference_matches_finite_differences():
    batch = Batch()
    gen = torch.Generator().manual_seed(4)
    far = torch.rand(batch.B, batch.T, generator=gen) < 0.3
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]
    offsets = torch.tensor([25.0, -25.0, 5.0, -5.0, 1.0], dtype=F64)[
        torch.randint(0, 5, (batch.B, batch.T), generator=gen)
    ]
    batch.ref_logprobs = torch.where(far, lp0 + offsets, batch.ref_logprobs)  # some clamped, some not
    loss_fn = build_loss("grpo", kl_coef=0.5)
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    reference = lambda z: ref_ppo_loss(batch, z, adv, kl_coef=0.5)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    k3 = ref_k3(lp0, batch.ref_logprobs)
    assert (k3[batch.mask] == 10).any() and (k3[batch.mask] < 10).any()


# ===================================================================================================== dual clip
def test_dual_clip_caps_negative_advantage_tokens_and_is_off_in_every_preset():
    batch = Batch()
    loss_fn = build_loss("grpo", dual_clip_c=3.0)
    adv = batch.advantages(loss_fn)
    _, out = batch.grad(loss_fn)
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]
    r = torch.exp(lp0 - batch.old_logprobs)
    capped = (adv[:, None] < 0) & (r > 3.0) & batch.mask  # -A r > -A clip(r) and > -3 A
    assert capped.any()
    assert out.metrics["dual_clip_frac"] == pytest.approx(float(capped.sum() / batch.mask.sum()))
    grad_tok = batch.grad(loss_fn)[0].abs().amax(-1)
    assert grad_tok[capped].max() == 0 and batch.grad(build_loss("grpo"))[0].abs().amax(-1)[capped].min() > 0
    for name in loss_configs():  # as the SimKO, RLVR-Decomposed and Clip-Cov/KL-Cov code: off
        assert make_loss(name).dual_clip_c is None
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
            build_loss("grpo", dual_clip_c=bad)


def test_entropy_bonus_gradient_is_differentiable_and_matches_finite_differences():
    batch = Batch()
    assert make_loss("entropy_bonus").entropy_coef == 0.001 and type(make_loss("entropy_bonus")) is LOSSES["grpo"]
    loss_fn = make_loss("entropy_bonus", entropy_coef=0.05)
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    reference = lambda z: ref_ppo_loss(batch, z, adv) - 0.05 * ref_token_mean_entropy(batch, z)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    # the bonus really acts: it changes the gradient of the base loss
    grpo_grad, _ = batch.grad(build_loss("grpo"))
    assert (grad - grpo_grad).abs().max() > 1e-5


def test_entropy_coef_is_a_knob_of_every_loss():
    batch = Batch()
    simko_kwargs = dict(k=2, alpha=0.3, lam=1.5, tau=0.5, kl_coef=0.1)
    with_bonus = build_loss("simko", entropy_coef=0.05, **simko_kwargs)
    assert with_bonus.top_k == 2 and with_bonus.needs_reference and isinstance(with_bonus, SimKOLoss)
    rewards = batch.grouped(batch.rewards).float()
    torch.testing.assert_close(with_bonus.compute_advantages(rewards), build_advantage("grpo")(rewards))
    simko = build_loss("simko", **simko_kwargs)
    grad_bonus, out = batch.grad(with_bonus)
    grad_simko, _ = batch.grad(simko)
    entropy_term = lambda z: -0.05 * ref_token_mean_entropy(batch, z)  # noqa: E731
    fd_entropy = finite_diff_grad(entropy_term, batch.logits)
    torch.testing.assert_close(grad_bonus - grad_simko, fd_entropy, rtol=1e-6, atol=1e-8)
    assert "entropy_bonus" in out.metrics and "simko/forking_frac" in out.metrics
    assert "entropy_bonus" not in batch.loss(simko).metrics  # entropy_coef = 0: no term, no metric
    with pytest.raises(ValueError, match="entropy_coef"):
        build_loss("grpo", entropy_coef=-1.0)


# ================================================================================================= KL-Cov / Clip-Cov
@pytest.mark.parametrize("ppo_clip", [False, True])
def test_kl_cov_gradient_matches_finite_differences(ppo_clip):
    batch = Batch()
    loss_fn = build_loss("kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7, ppo_clip=ppo_clip)
    adv = batch.advantages(loss_fn)
    # the penalised tokens: the top floor(0.1 N) valid tokens by covariance, computed here independently
    cov = ref_covariance(batch, adv)
    n_valid = int(batch.mask.sum())
    num = max(1, int(0.1 * n_valid))
    valid_idx = batch.mask.flatten().nonzero().squeeze(-1)
    top = valid_idx[cov.flatten()[valid_idx].argsort(descending=True)[:num]]
    penalised = torch.zeros(batch.mask.numel(), dtype=torch.bool)
    penalised[top] = True
    penalised = penalised.view_as(batch.mask)

    eps = 0.2 if ppo_clip else math.inf

    def reference(z):
        logprobs = ref_logits_stats(z, batch.tokens)[0]
        ppo = ref_ppo_objective(logprobs, batch.old_logprobs, adv, eps, eps)
        penalty = 0.7 * (logprobs - batch.old_logprobs).abs() * penalised
        return ref_aggregate(ppo + penalty, batch.mask, "token_mean")

    grad, out = batch.grad(loss_fn)
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert out.metrics["kl_cov/penalised_frac"] == pytest.approx(num / n_valid)
    assert (out.metrics["clip_frac"] > 0) == ppo_clip


def clip_cov_candidates(batch, adv, lb, ub, eps=0.2):
    """Valid tokens with lb < Cov < ub that PPO's clip (at eps) has not already stopped, computed here."""
    logprobs = ref_logits_stats(batch.logits, batch.tokens)[0]
    r = torch.exp(logprobs - batch.old_logprobs)
    a = adv[:, None]
    clipped = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    cov = ref_covariance(batch, adv)
    return batch.mask & ~clipped & (cov > lb) & (cov < ub)


@pytest.mark.parametrize("eps", [1.0, 0.2])  # the official recipe's clip ratio 1, and PPO's 0.2
def test_clip_cov_gradient_matches_finite_differences(eps):
    batch = Batch()
    # clip_cov_ratio=1: every candidate is detached, so the reference needs no random draw
    loss_fn = build_loss("clip_cov", clip_cov_ratio=1.0, clip_cov_lb=0.0, clip_cov_ub=1e9, seed=0, clip_eps=eps)
    adv = batch.advantages(loss_fn)
    detached = clip_cov_candidates(batch, adv, 0.0, 1e9, eps)
    assert 0 < detached.sum() < batch.mask.sum()
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]

    def reference(z):
        logprobs = ref_logits_stats(z, batch.tokens)[0]
        logprobs = torch.where(detached, lp0, logprobs)  # detached tokens: value at z0, no dependence on z
        return ref_aggregate(ref_ppo_objective(logprobs, batch.old_logprobs, adv, eps, eps), batch.mask, "token_mean")

    grad, out = batch.grad(loss_fn)
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    assert out.metrics["clip_cov/detached_frac"] == pytest.approx(float(detached.sum() / batch.mask.sum()))
    assert out.metrics["clip_frac"] > 0  # the PPO clip acts on some tokens at both ranges


def test_clip_cov_and_kl_cov_presets_are_the_official_recipes():
    """recipe/dapo/7b_clip_cov.sh, 7b_kl_cov.sh (PRIME-RL/Entropy-Mechanism-of-RL)."""
    clip_cov, kl_cov = make_loss("clip_cov"), make_loss("kl_cov")
    assert (clip_cov.clip_low, clip_cov.clip_high) == (1.0, 1.0)  # clip_ratio_low = clip_ratio_high = 1
    assert (clip_cov.clip_cov_ratio, clip_cov.clip_cov_lb, clip_cov.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (kl_cov.kl_cov_ratio, kl_cov.kl_cov_coef, kl_cov.ppo_clip) == (2e-3, 1.0, False)  # k_percent 0.2 (%)
    for loss_fn in (clip_cov, kl_cov):
        assert loss_fn.aggregation == "token_mean" and loss_fn.entropy_coef == 0 and loss_fn.kl_coef == 0


def test_clip_cov_random_subset_is_seeded_and_sized():
    batch = Batch()
    n_valid = int(batch.mask.sum())
    ratio = 3.5 / n_valid  # floor(ratio * N) = 3 tokens

    def make(seed):
        return build_loss("clip_cov", clip_cov_ratio=ratio, clip_cov_lb=-1e9, clip_cov_ub=1e9, seed=seed, clip_eps=0.2)

    adv = batch.advantages(make(0))
    candidates = clip_cov_candidates(batch, adv, -1e9, 1e9)
    assert candidates.sum() > 3
    grpo_grad, _ = batch.grad(build_loss("grpo"))
    selections = []
    for seed in (0, 0, 1, 2, 3):
        grad, out = batch.grad(make(seed))
        changed = (grad - grpo_grad).abs().amax(-1) > 0
        assert changed.sum() <= 3 and (changed & ~candidates).sum() == 0  # only candidates are detached
        assert out.metrics["clip_cov/detached_frac"] == pytest.approx(3 / n_valid)
        selections.append(grad)
    assert torch.equal(selections[0], selections[1])  # same seed, same draw
    assert any(not torch.equal(selections[0], s) for s in selections[2:])
    # a generator can be passed in too
    loss_a, loss_b = make(None), make(None)
    loss_a.generator = torch.Generator().manual_seed(7)
    loss_b.generator = torch.Generator().manual_seed(7)
    assert torch.equal(batch.grad(loss_a)[0], batch.grad(loss_b)[0])


# =================================================================================================== GSPO, CISPO
def ref_gspo_loss(batch, logits, adv, eps_low, eps_high):
    """GSPO (Zheng et al. 2025, Eq. 5-7), response by response: s_i = exp(mean_t log(pi/pi_old)) of response i,
    loss = -1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) over the responses with tokens."""
    logprobs = ref_logits_stats(logits, batch.tokens)[0]
    terms = []
    for b in range(batch.B):
        valid = batch.mask[b]
        if not valid.any():
            continue
        s = torch.exp((logprobs[b][valid] - batch.old_logprobs[b][valid]).mean())
        terms.append(-torch.minimum(s * adv[b], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[b]))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("eps", [None, (0.1, 0.1), (0.05, 0.3)])  # None: the preset's 3e-4 / 4e-4
def test_gspo_gradient_matches_finite_differences_of_the_paper_objective(eps):
    batch = Batch()
    overrides = {} if eps is None else {"clip_eps": eps[0], "clip_eps_high": eps[1]}
    loss_fn = make_loss("gspo", **overrides)
    eps_low, eps_high = (3e-4, 4e-4) if eps is None else eps
    assert (loss_fn.clip_low, loss_fn.clip_high) == pytest.approx((eps_low, eps_high))
    adv = batch.advantages(loss_fn)
    grad, out = batch.grad(loss_fn)
    reference = lambda z: ref_gspo_loss(batch, z, adv, eps_low, eps_high)  # noqa: E731
    torch.testing.assert_close(out.loss.detach(), reference(batch.logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    # the batch exercises sequences in and out of the clip range (with A != 0)
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]
    seq = torch.stack(
        [(lp0[b] - batch.old_logprobs[b])[batch.mask[b]].mean() for b in range(batch.B) if batch.mask[b].any()]
    )
    moving = adv[batch.mask.any(-1)] != 0
    outside = (seq.exp() < 1 - eps_low) | (seq.exp() > 1 + eps_high)
    assert (moving & outside).any() and (eps is None or (moving & ~outside).any())


def test_gspo_on_policy_is_grpo_with_the_sequence_mean():
    """At ratio 1 the sequence ratio's gradient is the mean of the token ratios': GSPO = GRPO seq_mean_token_mean."""
    batch = Batch()
    batch.old_logprobs = ref_logits_stats(batch.logits, batch.tokens)[0]
    gspo_grad, _ = batch.grad(make_loss("gspo"))
    grpo_grad, _ = batch.grad(build_loss("grpo", aggregation="seq_mean_token_mean"))
    torch.testing.assert_close(gspo_grad, grpo_grad, rtol=1e-12, atol=1e-15)
    assert gspo_grad.abs().max() > 0


@pytest.mark.parametrize("eps_high", [None, 2.0, 0.2])  # None: the preset's [0, 5]
def test_cispo_gradient_matches_finite_differences_of_the_paper_objective(eps_high):
    """CISPO (MiniMax-M1, Eq. 4-5): J = 1/sum|o_i| sum_i,t sg(clip(r, 1 - eps_low, 1 + eps_high)) A_i log pi; the
    reference freezes the clipped weight at the current logits, so its finite differences are CISPO's gradient."""
    batch = Batch()
    loss_fn = make_loss("cispo", **({} if eps_high is None else {"clip_eps_high": eps_high}))
    eps_high = 4.0 if eps_high is None else eps_high
    assert (loss_fn.clip_low, loss_fn.clip_high) == (1.0, eps_high)
    adv = batch.advantages(loss_fn)
    lp0 = ref_logits_stats(batch.logits, batch.tokens)[0]
    weight = torch.clamp(torch.exp(lp0 - batch.old_logprobs), 0.0, 1 + eps_high)

    def reference(z):
        logprobs = ref_logits_stats(z, batch.tokens)[0]
        return ref_aggregate(-weight * adv[:, None] * logprobs, batch.mask, "token_mean")

    grad, out = batch.grad(loss_fn)
    torch.testing.assert_close(grad, finite_diff_grad(reference, batch.logits), rtol=1e-6, atol=1e-8)
    # the value: -sg(weight) A per token (the official -sg(weight) A log pi has the same gradient)
    value = ref_aggregate(-weight * adv[:, None].expand_as(weight), batch.mask, "token_mean")
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-12, atol=1e-12)
    clipped = (torch.exp(lp0 - batch.old_logprobs) > 1 + eps_high) & batch.mask
    assert out.metrics["clip_frac"] == pytest.approx(float(clipped.sum() / batch.mask.sum()))
    assert clipped.any() == (eps_high < 3.4)  # the batch's largest ratio is e^1.5 = 4.48
    # no token is dropped: every valid token with A != 0 has a gradient, clipped or not
    moving = batch.mask & (adv[:, None] != 0)
    assert grad.abs().amax(-1)[moving].min() > 0
    with pytest.raises(ValueError, match="dual_clip_c"):
        build_loss("cispo", dual_clip_c=3.0)


def test_cispo_on_policy_is_grpo():
    batch = Batch()
    batch.old_logprobs = ref_logits_stats(batch.logits, batch.tokens)[0]
    torch.testing.assert_close(batch.grad(make_loss("cispo"))[0], batch.grad(build_loss("grpo"))[0])


# ========================================================================================================= SimKO
SIMKO_KNOBS = dict(k=3, alpha=0.3, lam=1.7, tau=0.5)  # large knobs: differences far above the tolerances


def test_simko_gradient_matches_analytic_formula():
    batch = Batch()
    loss_fn = build_loss("simko", **SIMKO_KNOBS)
    adv = batch.advantages(loss_fn)
    ref_grad, coef, mix, topk_ids = simko_reference(batch, adv, **SIMKO_KNOBS)
    grad, out = batch.grad(loss_fn)
    # (tolerance: lam * A is formed in float32, as PolicyLoss takes advantages in float32)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-10)

    # The hand formula is itself the gradient of the linearised surrogate with frozen coefficients:
    #   J(z) = sum_t coef_t [ (1 - a_t) log pi_z(y_t) + (a_t / K) sum_k log pi_z(c_k,t) ]   (finite differences)
    def linearised(z):
        logp = torch.log_softmax(z, -1)
        own = logp.gather(-1, batch.tokens[..., None]).squeeze(-1)
        cands = logp.gather(-1, topk_ids).mean(-1)
        return (coef * ((1 - mix) * own + mix * cands)).sum()

    torch.testing.assert_close(finite_diff_grad(linearised, batch.logits), ref_grad, rtol=1e-6, atol=1e-8)
    # the batch exercises both mechanisms
    assert (mix > 0).any() and out.metrics["simko/neg_scaled_frac"] > 0 and out.metrics["clip_frac"] > 0


def test_simko_loss_value_equals_grpo_and_reduces_to_grpo():
    batch = Batch()
    grpo_grad, grpo_out = batch.grad(build_loss("grpo"))
    # ratio~ has the value r: with lam = 1 the loss value is exactly GRPO's while the gradient differs
    pos_grad, pos_out = batch.grad(make_loss("simko_pos_only", k=3, alpha=0.3, tau=0.5))
    assert torch.equal(pos_out.loss.detach(), grpo_out.loss.detach())
    assert (pos_grad - grpo_grad).abs().max() > 1e-3
    # lam scales the gradient of top-1 forking tokens of incorrect responses, never the value: the full SimKO
    # loss value and clip fraction are GRPO's exactly (the lam-scaled tokens are present in this batch)
    loss_fn = build_loss("simko", **SIMKO_KNOBS)
    adv = batch.advantages(loss_fn)
    stats = stats64(batch.logits, batch.tokens, batch.mask, 3)
    scaled = (adv[:, None] < 0) & stats.is_top1 & response_quantile_mask(stats.entropy, batch.mask, SIMKO_KNOBS["tau"])
    simko_out = batch.loss(loss_fn)
    assert torch.equal(simko_out.loss.detach(), grpo_out.loss.detach())
    assert scaled.any() and simko_out.metrics["clip_frac"] == grpo_out.metrics["clip_frac"]
    off_grad, _ = batch.grad(build_loss("simko", k=3, alpha=0.0, lam=1.0, tau=0.5))
    assert torch.equal(off_grad, grpo_grad)  # alpha=0, lam=1 => GRPO exactly


def test_simko_touches_only_forking_tokens_and_scales_only_top1_negatives():
    batch = Batch()
    loss_fn = build_loss("simko", **SIMKO_KNOBS)
    adv = batch.advantages(loss_fn)
    stats = stats64(batch.logits, batch.tokens, batch.mask, 3)
    forking = response_quantile_mask(stats.entropy, batch.mask, SIMKO_KNOBS["tau"])
    grpo_grad, _ = batch.grad(build_loss("grpo"))
    grad, _ = batch.grad(loss_fn)
    changed = (grad - grpo_grad).abs().amax(-1) > 1e-12
    assert changed.any() and not (changed & ~forking).any()

    neg_only_grad, _ = batch.grad(make_loss("simko_neg_only", k=3, lam=2.0, tau=0.5))
    top1 = batch.tokens == batch.logits.argmax(-1)
    scaled = (adv[:, None] < 0) & top1 & forking
    changed = (neg_only_grad - grpo_grad).abs().amax(-1) > 1e-12
    assert changed.any() and not (changed & ~scaled).any()
    torch.testing.assert_close(neg_only_grad[scaled], 2.0 * grpo_grad[scaled], rtol=1e-12, atol=0)  # 2.0: exact

    pos_only_grad, _ = batch.grad(make_loss("simko_pos_only", k=3, alpha=0.3, tau=0.5))
    correct_rows = (batch.rewards == 1)[:, None].expand_as(batch.mask)
    changed = (pos_only_grad - grpo_grad).abs().amax(-1) > 1e-12
    assert changed.any() and not (changed & ~(forking & correct_rows)).any()


def test_high_entropy_mask_is_per_response_quantile():
    gen = torch.Generator().manual_seed(1)
    T = 10
    entropy = torch.stack(
        [
            torch.rand(T, generator=gen) * 0.01,  # a confident response
            5.0 + torch.rand(T, generator=gen),  # a very uncertain one
            torch.rand(T, generator=gen),  # padded to 7 tokens
            torch.rand(T, generator=gen),  # one valid token
            torch.rand(T, generator=gen),  # no valid token
        ]
    )
    lengths = torch.tensor([10, 10, 7, 1, 0])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for tau in (0.5, 0.8):
        w = response_quantile_mask(entropy, mask, tau)
        for b in range(5):
            valid = mask[b]
            expected = torch.zeros(T, dtype=torch.bool)
            if valid.any():
                expected[valid] = entropy[b][valid] > torch.quantile(entropy[b][valid], tau)
            assert torch.equal(w[b], expected)
        assert w[0].sum() == round(10 * (1 - tau)) and w[1].sum() == round(10 * (1 - tau))  # ~ (1 - tau) per row
        assert not w[3].any() and not w[4].any()
        batch_quantile = torch.quantile(entropy[mask], tau)
        assert not torch.equal(w, (entropy > batch_quantile) & mask)  # a per-batch quantile would differ


def test_simko_knob_validation():
    for tau in (1.0, 1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match="tau"):
            build_loss("simko", tau=tau)
    for bad in ({"k": 0}, {"k": 1.5}, {"alpha": -0.1}, {"alpha": 1.5}, {"lam": 0.0}):
        with pytest.raises(ValueError):
            build_loss("simko", **bad)
    # the two ablation presets are SimKO with one half off
    assert (make_loss("simko_pos_only").lam, make_loss("simko_pos_only").alpha) == (1.0, 0.01)
    assert (make_loss("simko_neg_only").lam, make_loss("simko_neg_only").alpha) == (1.1, 0.0)
    assert build_loss("simko", k=5).top_k == 5 and build_loss("grpo").top_k == 0
    batch = Batch()
    with pytest.raises(ValueError, match="top_k"):
        batch.loss(build_loss("simko", k=3), top_k=2)
    # stats with more candidates than k (e.g. for diagnostics): the first k are used
    loss_fn = build_loss("simko", **SIMKO_KNOBS)
    wide = batch.loss(loss_fn, top_k=5)
    exact = batch.loss(loss_fn, top_k=3)
    assert torch.equal(wide.loss, exact.loss) and wide.metrics == exact.metrics


def test_docs_functional_api_float32_matches_analytic_gradient():
    batch = Batch(seed=3)
    logits = batch.logits.float().requires_grad_(True)
    rew = batch.rewards.float()
    adv = build_advantage("grpo")(batch.grouped(rew)).reshape(-1)
    old_lp = batch.old_logprobs.float()
    # --- as in docs/losses.md (Functional API)
    stats = TokenStats.from_logits(logits, batch.tokens, batch.mask, top_k=3, temperature=1.0)
    loss_fn = build_loss("simko", k=3, alpha=0.01, lam=1.1, tau=0.8, clip_eps=0.2)
    out = loss_fn(stats, old_logprobs=old_lp, advantages=adv, rewards=rew)
    out.loss.backward()
    # ---
    assert all(isinstance(v, float) for v in out.metrics.values())
    for key in ("simko/forking_frac", "simko/neg_scaled_frac", "simko/correct_in_topk_frac", "clip_frac"):
        assert 0.0 <= out.metrics[key] <= 1.0
    ref_batch = Batch(seed=3)
    ref_batch.logits = logits.detach().double()
    ref_batch.old_logprobs = old_lp.double()
    ref_grad = simko_reference(ref_batch, adv.double(), k=3, alpha=0.01, lam=1.1, tau=0.8)[0]
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


# ============================================================================ micro-batch weights (update.py)
class _Rows:
    """What of Rollouts simko.update.accumulate_gradients reads: ``response_mask``, ``rows``, the loss rows
    (``loss_rows``, ``loss_mask``: every row here) and ``sampler_logprobs`` (None: the policy sampled, as the HF
    engine)."""

    sampler_logprobs = None

    def __init__(self, mask):
        self.response_mask = self.loss_mask = mask
        self.loss_rows = None

    def rows(self, idx):
        return idx


# every aggregation, the PSR/NSR subset (with an empty response in it), dual clip, GSPO, CISPO, KL, entropy
MICRO_CASES = [
    ("grpo", {}),
    ("grpo", {"aggregation": "seq_mean_token_mean"}),
    ("dr_grpo", {"norm_len": 6}),
    ("psr", {}),  # row 4 (empty) is correct: in the subset
    ("psr", {"aggregation": "seq_mean_token_mean"}),
    ("psr", {"aggregation": "seq_mean_token_sum_norm", "norm_len": 8}),
    ("nsr", {"aggregation": "seq_mean_token_mean", "kl_coef": 0.1, "entropy_coef": 0.05}),
    ("w_reinforce", {"subset": "nonzero_advantage", "advantage_kwargs": {"pos_weight": 0.0}}),
    ("grpo", {"dual_clip_c": 2.0, "kl_coef": 0.1}),
    ("gspo", {"clip_eps": 0.1, "clip_eps_high": 0.1}),
    ("cispo", {"clip_eps_high": 2.0}),
    ("simko", {"k": 3, "alpha": 0.3, "lam": 1.7, "tau": 0.5, "aggregation": "seq_mean_token_mean"}),
]


@pytest.mark.parametrize("name,overrides", MICRO_CASES, ids=lambda v: str(v))
def test_micro_batched_gradient_equals_the_one_batch_gradient(name, overrides):
    """simko.update.accumulate_gradients with micro-batches of 3 rows (groups of 4 split across micro-batches,
    each micro-batch trimmed to its own longest response, as Rollouts.rows does) == the loss of the whole batch."""
    from simko.update import accumulate_gradients

    batch = Batch()
    loss_fn = make_loss(name, **overrides)
    adv = batch.advantages(loss_fn)
    one_grad, one_out = batch.grad(loss_fn)
    logits = batch.logits.clone().requires_grad_(True)

    def token_stats(idx, top_k):
        length = max(int(batch.mask[idx].sum(-1).max()), 1)
        return stats64(logits[idx, :length], batch.tokens[idx, :length], batch.mask[idx, :length], top_k)

    rows = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15, 0, 1, 2, 3, 8, 9, 10, 11])  # shuffled groups
    metrics = defaultdict(float)
    accumulate_gradients(
        loss_fn,
        _Rows(batch.mask),
        rows,
        token_stats,
        adv,
        batch.rewards,
        3,
        metrics,
        old_logprobs=batch.old_logprobs,
        ref_logprobs=batch.ref_logprobs,
    )
    torch.testing.assert_close(logits.grad, one_grad, rtol=1e-10, atol=1e-14)
    assert one_grad.abs().max() > 0
    assert metrics["loss"] == pytest.approx(one_out.metrics["loss"], rel=1e-10, abs=1e-14)


# ============================================================================================ every loss / config
@pytest.mark.parametrize("name", loss_configs())
def test_all_masked_batch_gives_zero_loss_and_gradient(name):
    loss_fn = make_loss(name)  # every default of the config
    B, T, V = 4, 5, 6
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    stats = TokenStats.from_logits(logits, tokens, mask, top_k=loss_fn.top_k)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = loss_fn.compute_advantages(rewards.view(1, 4)).reshape(-1)
    out = loss_fn(stats, old_logprobs=stats.logprobs.detach() - 0.1, advantages=adv, rewards=rewards)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics


def constructor_defaults(name) -> dict:
    """Every keyword a registered loss accepts, with its default, following **kwargs up to PolicyLoss."""
    params: dict = {}
    for c in (c for c in LOSSES[name].__mro__ if "__init__" in vars(c) and c is not object):
        sig = inspect.signature(c.__init__)
        for p in list(sig.parameters.values())[1:]:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def loss_config(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"loss={name}"]).loss, resolve=True)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_has_a_config_listing_its_defaults(name):
    cfg = loss_config(name)
    assert cfg.pop("_target_") == "simko.losses.build_loss" and cfg.pop("name") == name
    assert cfg == constructor_defaults(name)


@pytest.mark.parametrize("name", loss_configs())
def test_every_loss_config_builds_and_lists_every_knob(name):
    """Registered classes and presets alike: the composed config names a registered class and sets every one of
    its knobs (a preset through ``defaults:``), and simko.train's instantiate builds it."""
    from hydra.utils import instantiate

    composed = compose_config([f"loss={name}"])
    cfg = loss_config(name)
    assert cfg["name"] in LOSSES, f"{name}.yaml names no registered loss"
    assert set(cfg) - {"_target_", "name"} == set(constructor_defaults(cfg["name"]))
    loss_fn = instantiate(composed.loss)
    assert type(loss_fn) is LOSSES[cfg["name"]]
    adv = loss_fn.compute_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]))
    assert adv.shape == (1, 8) and torch.isfinite(adv).all()
    assert loss_fn.needs_reference is False and isinstance(loss_fn.top_k, int)
