"""pass@k: the unbiased estimator against brute force, and the torchmetrics accumulator (incl. 2-process DDP)."""

import itertools
import os
from math import comb

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simko.metrics import PassAtK, default_ks, majority_at_n, pass_at_k, pass_at_k_tensor


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 13))
def test_pass_at_k_equals_brute_force_for_all_small_n(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = brute_force_pass_at_k(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            got = pass_at_k_tensor(torch.tensor([c]), n, k)[0].item()
            assert got == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_edges_are_exact_and_large_n_is_stable():
    assert pass_at_k(1024, 0, 512) == 0.0
    assert pass_at_k(1024, 513, 512) == 1.0  # n - c < k: every subset has a correct sample
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    expected = 1 - comb(1024 - 10, 100) / comb(1024, 100)  # exact integers, then one division
    assert pass_at_k(1024, 10, 100) == pytest.approx(expected, rel=1e-12)
    counts = torch.arange(0, 1025, 7)
    vec = pass_at_k_tensor(counts, 1024, 256)
    assert torch.isfinite(vec).all() and (vec[1:] >= vec[:-1]).all()
    for c, v in zip(counts.tolist(), vec.tolist()):
        assert v == pytest.approx(pass_at_k(1024, c, 256), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_passatk_metric_and_refusals():
    m = PassAtK(ks=[1, 2, 4])
    m.update(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]).bool())
    m.update(torch.tensor([[1, 1, 1, 1]]).bool())
    out = m.compute()
    assert out[1] == pytest.approx((0.25 + 0 + 1) / 3)
    assert out[4] == pytest.approx((1 + 0 + 1) / 3)
    assert out["mean@n"] == pytest.approx(5 / 12)
    with pytest.raises(ValueError, match="k=8 > n=4"):
        PassAtK(ks=[1, 8]).update(torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep n fixed"):
        m.update(torch.zeros(1, 8, dtype=torch.bool))
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(12) == [1, 2, 4, 8, 12]


def test_majority_at_n():
    answers = [["4", "4", "5"], ["7", None, "8"], [None, None, None]]
    correct = [[True, True, False], [False, False, True], [False, False, False]]
    assert majority_at_n(answers, correct) == pytest.approx(1 / 3)


def _ddp_worker(rank: int, world: int, port: int, correct: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = PassAtK(ks=[1, 2, 4, 8])
    for chunk in correct.tensor_split(world)[rank].split(3):  # uneven shards and several updates
        metric.update(chunk)
    out = metric.compute()
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def test_passatk_under_two_process_ddp_equals_single_process():
    gen = torch.Generator().manual_seed(0)
    correct = torch.rand(13, 8, generator=gen) < torch.rand(13, 1, generator=gen)
    single = PassAtK(ks=[1, 2, 4, 8])
    single.update(correct)
    expected = single.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, correct, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
