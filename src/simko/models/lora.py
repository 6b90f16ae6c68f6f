"""LoRA fine-tuning with ``peft`` (``model.lora.*`` in the model configs; ``null`` = full fine-tuning).

:func:`load_model` is how ``simko.train`` builds the policy: the model config's loader (``_target_``) runs as before,
then, when ``model.lora`` is set, :func:`apply_lora` injects LoRA adapters into the loaded model in place
(``peft.inject_adapter_in_model``): the model keeps its class, its ``generate``, its config and its tokenizer, only
the targeted ``nn.Linear`` layers become ``peft`` LoRA layers, and every other parameter is frozen. So the update,
the engines, the sharding and the checkpoints see the same kind of module as in full fine-tuning. What differs:

- **The reference model is free.** A loss with a KL term scores its reference with the adapters disabled
  (:func:`base_model_stats`): the frozen base, with no copy of the model (full fine-tuning deep-copies it).
- **Checkpoints hold the adapter.** ``RLVRModule.on_save_checkpoint`` keeps only the adapter's weights of
  ``policy.*`` (:func:`drop_base_weights`) and records the LoRA config and the base model under
  ``checkpoint["lora"]``; a resume puts the base weights of the model it built back before loading
  (:func:`restore_base_weights`), and ``simko.eval`` applies the recorded adapter to its base model, loads it and
  merges it (:func:`load_adapter_checkpoint`).
- **Engines that copy weights receive merged ones.** :class:`MergedLoRAPolicy` is what the module hands to the rollout
  engine: the live policy in every respect (``generate``, forward, parameters, config), except that its
  ``state_dict()`` yields W + B A * scaling under the base model's names, computed one tensor at a time as it is read
  (the policy's own weights are never modified, so nothing drifts by rounding). The HF engine samples with the live
  (unmerged) policy as before; the vLLM engine's ``sync_weights`` reads ``state_dict()``.

LoRA dropout must be 0: the RL step turns dropout off so that the update scores the function that sampled the
rollouts (``RLVRModule.on_fit_start``), which would silently turn a LoRA dropout off too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name; one adapter per policy
KNOBS = {
    "r": 16,  # rank
    "alpha": 32,  # lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    "dropout": 0.0,
    "target_modules": "all-linear",  # peft's shortcut: every linear layer but the output layer; or a list of names
    "use_rslora": False,
}


def check_lora_config(lora: Any) -> dict | None:
    """``model.lora`` as a plain dict with every knob (defaults filled in), or None for full fine-tuning; a bad knob
    raises ValueError naming ``model.lora.<knob>``."""
    if lora is None:
        return None
    if isinstance(lora, DictConfig):
        lora = OmegaConf.to_container(lora, resolve=True)
    if not isinstance(lora, Mapping):
        raise ValueError(f"model.lora={lora!r}: must be a mapping of LoRA knobs ({', '.join(KNOBS)}) or null")
    unknown = sorted(set(lora) - set(KNOBS))
    if unknown:
        raise ValueError(f"model.lora: unknown knob(s) {unknown}; the knobs: {', '.join(KNOBS)}")
    cfg = {**KNOBS, **lora}
    r, alpha, dropout = cfg["r"], cfg["alpha"], cfg["dropout"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"model.lora.r={r!r}: must be an integer >= 1 (the adapter's rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"model.lora.alpha={alpha!r}: must be a number > 0")
    if dropout != 0:
        raise ValueError(
            f"model.lora.dropout={dropout!r}: must be 0. The RL step runs with dropout off so that the update "
            "scores the function that sampled the rollouts (RLVRModule.on_fit_start), which would turn a LoRA dropout "
            "off too"
        )
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        targets = targets.strip()
    elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        targets = list(targets)
    else:
        raise ValueError(
            f"model.lora.target_modules={targets!r}: must be a list of module names (e.g. [q_proj, v_proj]), "
            "a regex, or all-linear"
        )
    if not isinstance(cfg["use_rslora"], bool):
        raise ValueError(f"model.lora.use_rslora={cfg['use_rslora']!r}: must be true or false")
    return {**cfg, "alpha": float(alpha), "dropout": 0.0, "target_modules": targets}


def load_model(model_cfg: Any, apply: bool = True):
    """``(model, tokenizer)`` of a model config (``configs/model/*.yaml``): its loader, then LoRA when
    ``model.lora`` is set and ``apply`` (``simko.eval`` takes the adapter from the checkpoint instead)."""
    from hydra.utils import instantiate

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    lora = check_lora_config(cfg.pop("lora", None))  # before the (slow) model load
    model, tokenizer = instantiate(cfg)
    if apply and lora is not None:
        apply_lora(model, lora)
    return model, tokenizer


def apply_lora(model: torch.nn.Module, lora: Mapping) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place (every other parameter frozen); returns ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = check_lora_config(lora)
    if is_lora(model):
        raise ValueError("the model already has LoRA adapters")
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=0.0,
        target_modules=lora["target_modules"],
        use_rslora=lora["use_rslora"],
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as error:  # peft: no module matched the targets
        raise ValueError(f"model.lora.target_modules={lora['target_modules']!r}: {error}") from None
    model._simko_lora = dict(lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %s of %s parameters trainable (%.2f%%)", lora["r"], lora["alpha"],
             lora["target_modules"], f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))  # fmt: skip
    return model


def is_lora(model: Any) -> bool:
    return getattr(model, "_simko_lora", None) is not None


def lora_config(model: Any) -> dict | None:
    """The LoRA knobs ``model`` was built with (None: full fine-tuning)."""
    return dict(model._simko_lora) if is_lora(model) else None


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base model: every LoRA layer computes its base layer only (peft ``enable_adapters``)."""
    layers = [layer for _, layer in _lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def base_model_stats(stats_fn, model: torch.nn.Module):
    """``stats_fn(rows, top_k)`` (the policy's token statistics) computed with the adapters disabled: the frozen
    reference of a KL term, without a copy of the model."""

    def reference(rows, top_k):
        with adapters_disabled(model):
            return stats_fn(rows, top_k)

    return reference


# --- merged weights for the engines -------------------------------------------------------------------------------


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2: gather the shards


class MergedWeights(Mapping):
    """The state dict of a LoRA model with its adapters merged, under the base model's names, computed per key as it
    is read (``W + B A * scaling``; under FSDP2 each tensor is all-gathered when read, a collective, so every rank
    must read the same keys in the same order)."""

    def __init__(self, model: torch.nn.Module):
        self._state = model.state_dict(keep_vars=True)
        self._names: dict[str, str] = {}  # merged name -> state-dict name
        self._layers: dict[str, torch.nn.Module] = {}  # merged weight name -> its LoRA layer
        layers = dict(_lora_layers(model))
        for key in self._state:
            owner, _, leaf = key.rpartition(".")
            if any(part.startswith("lora_") for part in key.split(".")):
                continue  # the adapter itself: merged into its base weight
            if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in layers:
                merged = f"{owner.removesuffix('.base_layer')}.{leaf}"
                if leaf == "weight":
                    self._layers[merged] = layers[owner.removesuffix(".base_layer")]
            else:
                merged = key
            self._names[merged] = key

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = _full(self._state[self._names[name]])
        layer = self._layers.get(name)
        if layer is None or ADAPTER in getattr(layer, "merged_adapters", ()):
            return tensor
        A, B = _full(layer.lora_A[ADAPTER].weight), _full(layer.lora_B[ADAPTER].weight)
        delta = (B.to(torch.float32) @ A.to(torch.float32)) * layer.scaling[ADAPTER]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        return (tensor.to(torch.float32) + delta).to(tensor.dtype)


class MergedLoRAPolicy:
    """A LoRA policy as a rollout engine sees it: the live policy in every respect (attributes, ``generate``, calls,
    parameters), except that ``state_dict()`` is :class:`MergedWeights` (what an engine that copies weights loads)."""

    def __init__(self, policy: torch.nn.Module):
        object.__setattr__(self, "_policy", policy)

    def __getattr__(self, name: str):
        return getattr(self._policy, name)

    def __call__(self, *args, **kwargs):
        return self._policy(*args, **kwargs)

    def state_dict(self, *args, **kwargs) -> MergedWeights:
        return MergedWeights(self._policy)


def engine_view(policy: torch.nn.Module):
    """What the module hands to its rollout engine: the policy, or the :class:`MergedLoRAPolicy` of a LoRA policy
    (one per policy, so an engine may keep a (weak) reference to what it was synced with)."""
    if not is_lora(policy):
        return policy
    view = policy.__dict__.get("_simko_engine_view")
    if view is None:
        view = policy.__dict__["_simko_engine_view"] = MergedLoRAPolicy(policy)
    return view


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and put the plain base layers back, in place (for evaluation)."""
    for name, layer in list(_lora_layers(model)):
        layer.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    model._simko_lora = None
    return model


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


def drop_base_weights(checkpoint: dict, policy: torch.nn.Module, prefix: str = "policy.") -> None:
    """Keep only the adapter of ``policy`` in ``checkpoint["state_dict"]`` (the frozen base weights come from the
    model config again) and record the LoRA config and the base model under ``checkpoint["lora"]``."""
    if not is_lora(policy):
        return
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(prefix) and not _is_adapter_key(k)]:
        del state[key]
    checkpoint["lora"] = {**lora_config(policy), "base_model": str(getattr(policy, "name_or_path", ""))}


def check_checkpoint_matches(checkpoint: Mapping, policy: torch.nn.Module, where: str) -> None:
    """A LoRA checkpoint loads into a LoRA policy of the same config, a full one into a full one; else say so."""
    saved = checkpoint.get("lora")
    current = lora_config(policy)
    if saved is None and current is None:
        return
    if saved is None:
        raise ValueError(
            f"{where} holds full fine-tuning weights, but model.lora is set ({current}); resume it without "
            "model.lora (model.lora=null)"
        )
    saved_knobs = {k: v for k, v in saved.items() if k in KNOBS}
    if current is None:
        raise ValueError(
            f"{where} holds a LoRA adapter ({saved_knobs}), but model.lora is null; resume it with the same model.lora"
        )
    if saved_knobs != current:
        raise ValueError(f"{where} holds a LoRA adapter with {saved_knobs}, but this run's model.lora is {current}")


def restore_base_weights(checkpoint: dict, policy: torch.nn.Module, prefix: str = "policy.") -> None:
    """Put the base weights of ``policy`` (frozen, as the model config built them) back into an adapter-only
    ``checkpoint["state_dict"]``, so the strict load of a resume sees every key."""
    check_checkpoint_matches(checkpoint, policy, "the checkpoint")
    if not is_lora(policy) or "state_dict" not in checkpoint:
        return
    state = checkpoint["state_dict"]
    own = policy.state_dict()
    missing = [k for k in own if _is_adapter_key(k) and prefix + k not in state]
    if missing:
        raise ValueError(f"the LoRA checkpoint lacks adapter weights {missing[:3]}: it is incomplete")
    for key, value in own.items():
        if not _is_adapter_key(key):
            state.setdefault(prefix + key, value)


def load_adapter_checkpoint(policy: torch.nn.Module, checkpoint: Mapping, where: str) -> None:
    """``simko.eval``: apply the checkpoint's LoRA config to the base ``policy``, load its adapter and merge it."""
    lora = {k: v for k, v in checkpoint["lora"].items() if k in KNOBS}
    base = checkpoint["lora"].get("base_model")
    if base and base != str(getattr(policy, "name_or_path", base)):
        log.warning("%s: the adapter was trained on %s, the model config loaded %s", where, base, policy.name_or_path)
    apply_lora(policy, lora)
    state = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    missing, unexpected = policy.load_state_dict(state, strict=False)
    missing = [k for k in missing if _is_adapter_key(k)]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    merge_and_unload(policy)
