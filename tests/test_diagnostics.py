"""Concentration diagnostics combine batches and ranks by token sums: the same keys everywhere, exact means."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import GlooSum, run_two_ranks
from simko.diagnostics import concentration_metrics, concentration_over_ranks, concentration_sums, metrics_from_sums
from simko.losses.stats import TokenStats, response_quantile_mask

TAU = 0.8


def _stats(seed: int, lengths: list[int], T: int = 6, V: int = 7, K: int = 3) -> TokenStats:
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(3 * torch.randn(len(lengths), T, V, generator=gen, dtype=torch.float64), -1)
    top, ids = logp.topk(K, -1)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    entropy = -(logp.exp() * logp).sum(-1)
    return TokenStats(logprobs=top[..., 0], entropy=entropy, topk_logprobs=top, topk_ids=ids, mask=mask)


# rank 0: responses of several tokens (high-entropy tokens exist); rank 1: one-token responses (a one-token
# response has no token strictly above its own quantile), so rank 1's batch has no high-entropy token.
BATCHES = {0: dict(seed=0, lengths=[6, 4, 5]), 1: dict(seed=1, lengths=[1, 1])}


def _reference(batches: list[TokenStats]) -> dict[str, float]:
    """Means over the pooled tokens of all batches, float64, straight from the definitions."""
    probs, probs_hi, entropies = [], [], []
    for s in batches:
        high = response_quantile_mask(s.entropy, s.mask, TAU)
        probs.append(s.topk_logprobs[s.mask])
        probs_hi.append(s.topk_logprobs[high])
        entropies.append(s.entropy[s.mask])
    out = {}
    for group, rows in (("", torch.cat(probs)), ("_hi", torch.cat(probs_hi))):
        for k in range(3):
            out[f"p_rank{k + 1}{group}"] = rows[:, k].exp().mean().item()
        for k in (1, 2):
            out[f"topk_gap{k + 1}{group}"] = (rows[:, 0] - rows[:, k]).mean().item()
    out["entropy_mean"] = torch.cat(entropies).mean().item()
    out["high_entropy_share"] = len(torch.cat(probs_hi)) / len(torch.cat(probs))
    return out


def test_sums_have_the_same_keys_with_or_without_high_entropy_tokens():
    with_hi, without_hi = (_stats(**BATCHES[r]) for r in (0, 1))
    assert response_quantile_mask(without_hi.entropy, without_hi.mask, TAU).sum() == 0
    # Per-batch means cannot be averaged over ranks key by key: one batch has no _hi values at all ...
    assert "p_rank2_hi" in concentration_metrics(with_hi, TAU)
    assert "p_rank2_hi" not in concentration_metrics(without_hi, TAU)
    # ... their token sums can: the same keys, zeros where nothing is selected.
    assert concentration_sums(with_hi, TAU).keys() == concentration_sums(without_hi, TAU).keys()
    assert concentration_sums(without_hi, TAU)["tokens_hi"] == 0


def test_added_sums_give_the_means_over_all_tokens():
    batches = [_stats(**BATCHES[0]), _stats(**BATCHES[1]), _stats(seed=2, lengths=[3, 6])]
    sums = {}
    for s in batches:
        for key, value in concentration_sums(s, TAU).items():
            sums[key] = sums.get(key, 0.0) + value
    got, expected = metrics_from_sums(sums), _reference(batches)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def _rank_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sums = concentration_sums(_stats(**BATCHES[rank]), TAU)
    queue.put((rank, concentration_over_ranks(sums, GlooSum())))
    dist.destroy_process_group()


def test_two_processes_log_the_same_keys_and_the_pooled_means():
    got = run_two_ranks(_rank_worker, port_salt=7)
    expected = _reference([_stats(**BATCHES[0]), _stats(**BATCHES[1])])
    assert got[0] == got[1]  # every rank logs the same keys and values: one all-reduce, nothing mismatched
    assert got[0].keys() == expected.keys()
    for key in expected:
        assert got[0][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def test_one_process_needs_no_collective():
    sums = concentration_sums(_stats(**BATCHES[0]), TAU)
    assert concentration_over_ranks(sums, None) == metrics_from_sums(sums)
    assert concentration_over_ranks({}, GlooSum()) == {}  # no diagnostics (top_k = 0): nothing to reduce
