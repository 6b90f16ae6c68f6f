"""simko.models.lora: LoRA through peft. The adapter against peft's own PeftModel (merge) and the untouched base
model (adapters disabled = the KL reference), the merged weights an engine receives after an update, adapter-only
checkpoints and their refusals, simko.eval's loading of them."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import digit_tokenizer, fit_in_process, random_qwen2
from simko.engines import register_engine
from simko.engines.hf import HFEngine, generate_rollouts
from simko.forward import rollout_token_stats
from simko.losses import build_loss
from simko.models import lora
from simko.module import RLVRModule

TOK = digit_tokenizer()
SMALL = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _lora_model(seed=0, knobs=SMALL, perturb=True):
    """(base copy, LoRA model); with ``perturb`` the adapters' B matrices are non-zero (a trained adapter)."""
    model = random_qwen2(seed=seed)
    base = copy.deepcopy(model)
    lora.apply_lora(model, knobs)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base, model


def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


IDS = torch.tensor([[2, 3, 12, 4, 13], [5, 6, 12, 7, 13]])


def test_config_defaults_and_refusals():
    assert lora.check_lora_config(None) is None
    assert lora.check_lora_config({}) == {**lora.KNOBS, "alpha": 32.0}
    for knobs, message in (
        ({"r": 0}, r"model.lora.r=0"),
        ({"alpha": -1}, r"model.lora.alpha=-1"),
        ({"dropout": 0.05}, r"model.lora.dropout=0.05: must be 0.*dropout off"),
        ({"rank": 8}, r"unknown knob\(s\) \['rank'\]"),
        ({"target_modules": []}, r"model.lora.target_modules=\[\]"),
        ({"use_rslora": "yes"}, r"model.lora.use_rslora='yes'"),
    ):
        with pytest.raises(ValueError, match=message):
            lora.check_lora_config(knobs)
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['nope'\]: Target modules \{'nope'\} not found"):
        lora.apply_lora(random_qwen2(), {"target_modules": ["nope"]})


def test_adapters_train_alone_and_start_as_the_base_model():
    base, model = _lora_model(perturb=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    torch.testing.assert_close(_logits(model, IDS), _logits(base, IDS), rtol=0, atol=0)  # B = 0 at init


def test_adapters_disabled_is_the_base_model_and_the_kl_reference():
    base, model = _lora_model()
    assert not torch.allclose(_logits(model, IDS), _logits(base, IDS))
    with lora.adapters_disabled(model):
        torch.testing.assert_close(_logits(model, IDS), _logits(base, IDS), rtol=0, atol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # trainable again
    # the module's reference for a KL term: no copy of the model, the base model's statistics
    module = RLVRModule(model, TOK, build_loss("grpo", kl_coef=0.1), optimizer=torch.optim.SGD, group_size=2)
    assert module._reference is None
    rollouts = generate_rollouts(model, TOK, ["12+3=", "4+5="], group_size=2, max_new_tokens=3, seed=0)
    rows = rollouts.rows(torch.arange(4))
    ref = module._reference_stats()(rows, 3)
    want = rollout_token_stats(base, rows, 3, 1.0)
    torch.testing.assert_close(ref.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(module.token_stats(model, rows, 3).logprobs, want.logprobs)


def test_merged_weights_are_peft_merge_under_the_base_names():
    """The weights an engine reads equal peft's own merge (PeftModel.merge_and_unload) under the base model's names;
    a plain model loaded with them computes what the LoRA model computes. The policy's weights are not touched."""
    from peft import LoraConfig, get_peft_model

    base, model = _lora_model(knobs={**SMALL, "use_rslora": True})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = dict(lora.engine_view(model).state_dict(keep_vars=True))
    assert list(merged) == list(base.state_dict())  # names and order of the base model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                target_modules=SMALL["target_modules"]))  # fmt: skip
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing = peft_model.base_model.model.load_state_dict(adapters, strict=False)
    assert not missing.unexpected_keys
    reference = peft_model.merge_and_unload().state_dict()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-6, atol=1e-6)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logits(plain, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    view = lora.engine_view(model)
    assert view is lora.engine_view(model) and view.config is model.config  # the live policy otherwise
    assert next(view.parameters()) is next(model.parameters())
    assert lora.engine_view(base) is base


@register_engine("test_weight_recorder")
class WeightRecorder(HFEngine):
    """The HF engine, recording the state dict it is handed at construction and at every sync (what the vLLM engine
    pushes into vllm.LLM: simko.engines.vllm.full_weights reads policy.state_dict(keep_vars=True))."""

    received: list = []

    def __init__(self, policy, tokenizer, synced_gpus=False):
        super().__init__(policy, tokenizer, synced_gpus)
        self.received.append({k: v.detach().clone() for k, v in policy.state_dict(keep_vars=True).items()})

    def sync_weights(self, policy):
        self.received.append({k: v.detach().clone() for k, v in policy.state_dict(keep_vars=True).items()})
        super().sync_weights(policy)


def test_the_engine_receives_merged_weights_that_follow_the_update(tmp_path):
    base, model = _lora_model(perturb=False)
    module = RLVRModule(
        model,
        TOK,
        build_loss("grpo", kl_coef=0.05),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        group_size=4,
        max_new_tokens=4,
        engine="test_weight_recorder",
        verifier=lambda completions, answers, names: [float(len(c) % 2) for c in completions],
        diagnostics_top_k=0,
    )
    WeightRecorder.received = []
    fit_in_process(module, tmp_path, max_steps=2, prompts_per_step=3)
    received = WeightRecorder.received
    assert len(received) == 4  # construction, fit start, after each of the 2 RL steps
    names = list(base.state_dict())
    assert all(list(r) == names for r in received)  # base names only: no base_layer, no lora_A/B
    for key in names:
        torch.testing.assert_close(received[0][key], base.state_dict()[key])  # B = 0: the base model
    final = dict(lora.MergedWeights(model))
    for key in names:
        torch.testing.assert_close(received[-1][key], final[key])
    moved = [k for k in names if not torch.equal(received[-1][k], received[1][k])]
    assert moved and all(k.split(".")[-2] in SMALL["target_modules"] for k in moved)
    for key, value in model.state_dict().items():  # the frozen base weights never moved
        if "lora_" not in key:
            assert torch.equal(value, base.state_dict()[key.replace(".base_layer", "")]), key


def _checkpoint(model):
    return {"state_dict": {f"policy.{k}": v.clone() for k, v in model.state_dict().items()}}


def test_checkpoints_hold_the_adapter_and_resume_puts_the_base_back():
    base, model = _lora_model()
    ckpt = _checkpoint(model)
    lora.drop_base_weights(ckpt, model)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["lora"] == {**lora.check_lora_config(SMALL), "base_model": str(model.name_or_path)}
    _, fresh = _lora_model(perturb=False)  # a resumed run: the model config builds the base and fresh adapters
    lora.restore_base_weights(ckpt, fresh)
    assert ckpt["state_dict"].keys() == _checkpoint(model)["state_dict"].keys()
    fresh.load_state_dict({k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()})
    torch.testing.assert_close(_logits(fresh, IDS), _logits(model, IDS), rtol=0, atol=0)

    full = _checkpoint(base)
    lora.drop_base_weights(full, base)  # full fine-tuning: untouched
    assert full.keys() == {"state_dict"} and len(full["state_dict"]) == len(base.state_dict())
    with pytest.raises(ValueError, match="holds full fine-tuning weights, but model.lora is set"):
        lora.restore_base_weights(full, fresh)
    with pytest.raises(ValueError, match="holds a LoRA adapter .* but model.lora is null"):
        lora.restore_base_weights(ckpt, random_qwen2())
    _, other = _lora_model(knobs={**SMALL, "r": 2}, perturb=False)
    with pytest.raises(ValueError, match=r"holds a LoRA adapter with \{'r': 4.*this run's model.lora is \{'r': 2"):
        lora.restore_base_weights(ckpt, other)
    incomplete = copy.deepcopy(ckpt)
    incomplete["state_dict"] = {k: v for k, v in incomplete["state_dict"].items() if "lora_B" not in k}
    with pytest.raises(ValueError, match="lacks adapter weights"):
        lora.restore_base_weights(incomplete, fresh)


def test_eval_loads_the_adapter_onto_the_base_model_and_merges_it(tmp_path):
    from simko.eval import load_checkpoint_into

    base, model = _lora_model()
    ckpt = _checkpoint(model)
    lora.drop_base_weights(ckpt, model)
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    policy = copy.deepcopy(base)
    load_checkpoint_into(policy, str(path))
    assert not lora.is_lora(policy) and not any("lora_" in k for k in policy.state_dict())
    assert list(policy.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_logits(policy, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)


def loader(seed: int = 0):
    """A model config's loader (``_target_: test_lora.loader``)."""
    return random_qwen2(seed=seed), TOK


def test_load_model_takes_model_lora_off_the_loader_config():
    from omegaconf import OmegaConf

    def cfg(lora_knobs, target="test_lora.loader"):
        return OmegaConf.create({"_target_": target, "seed": 0, "lora": lora_knobs})

    plain, _ = lora.load_model(cfg(None))
    adapted, _ = lora.load_model(cfg({"r": 2}))
    skipped, _ = lora.load_model(cfg({"r": 2}), apply=False)  # simko.eval, simko.sft
    assert not lora.is_lora(plain) and not lora.is_lora(skipped)
    assert lora.lora_config(adapted)["r"] == 2 and lora.lora_config(adapted)["target_modules"] == "all-linear"
    with pytest.raises(ValueError, match="model.lora.r=0"):  # checked before the loader runs
        lora.load_model(cfg({"r": 0}, target="nowhere.to.be.found"))


def test_train_config_refuses_a_bad_lora_knob_at_start(compose_train, monkeypatch):
    from simko.checks import ConfigError, check_train_config
    from simko.config import PROJECT_ROOT

    monkeypatch.setenv("PROJECT_ROOT", str(PROJECT_ROOT))
    check_train_config(compose_train("model.lora={r:4}"))
    with pytest.raises(ConfigError, match=r"model.lora.dropout=0.1: must be 0"):
        check_train_config(compose_train("model.lora={dropout:0.1}"))
