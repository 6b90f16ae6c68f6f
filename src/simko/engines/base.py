"""The rollout-engine interface: what the trainer and ``simko.eval`` need from whatever samples the responses.

An engine turns prompt token ids into G sampled responses each, as :class:`~simko.rollout.Rollouts` built by
:func:`simko.rollout.build_rollouts` (so padding, masks, trimming and decoding are the same for every engine).
The update never asks the engine for gradients: the policy's own teacher-forced forward (:mod:`simko.forward`)
scores the sampled tokens.

Engines are found by name (``rollout.engine``): :func:`build_engine` imports ``simko.engines.<name>`` on first
use, whose engine class registers itself with :func:`register_engine`. A new engine is one file under
``src/simko/engines/`` and its knobs under ``rollout.<name>`` in ``configs/rollout/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from simko.registry import class_registrar
from simko.rollout import Rollouts

ENGINES: dict[str, type[RolloutEngine]] = {}


@dataclass(frozen=True)
class Sampling:
    """How to sample one batch. Top-k filtering is always off: the samples come from softmax(logits / T), nucleus
    filtered by ``top_p``, the distribution the loss scores."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # already per (run seed, RL step, rank): simko.rollout.step_seed(...)


class RolloutEngine(ABC):
    """Samples responses for prompts given as token ids.

    Constructed as ``cls(policy, tokenizer, synced_gpus=..., **knobs)``: ``synced_gpus`` is True under sharded
    data parallelism (FSDP), where every rank must keep running forwards until all ranks are done; ``knobs`` are
    the engine's own config (``rollout.<name>``). A new engine samples from ``policy`` as it is at construction.
    """

    name: str

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: Sampling) -> Rollouts:
        """``group_size`` responses per prompt, rows prompt-major (rows ``i*G .. i*G+G-1`` answer prompt ``i``).

        ``prompt_ids`` are token ids as the module tokenized them (no special tokens added).
        """

    @abstractmethod
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """From now on sample from ``policy`` as it is now. Called once per RL step after its last optimizer step
        (and at fit start), timed as ``time/weight_sync``."""

    @abstractmethod
    def close(self) -> None:
        """Release what the engine holds (processes, device memory). The engine is not used afterwards."""


register_engine = class_registrar(ENGINES, "rollout engine")  # @register_engine("name") on a RolloutEngine


def available_engines() -> list[str]:
    """Engine names: the modules of this package other than ``base`` (registered or not yet imported)."""
    here = Path(__file__).parent
    return sorted({m.name for m in pkgutil.iter_modules([str(here)]) if m.name != "base"} | set(ENGINES))


def check_engine(name: str, knobs: dict | None = None) -> None:
    """Fail at start, before any model is built, when engine ``name`` cannot run here or ``knobs`` are not its
    own: the engine class's optional ``check(**knobs)`` (vLLM: installed? the knob names)."""
    if name not in ENGINES and name in available_engines():
        importlib.import_module(f"simko.engines.{name}")
    check = getattr(ENGINES.get(name), "check", None)
    if check is not None:
        check(**dict(knobs or {}))


def build_engine(name: str, policy: torch.nn.Module, tokenizer, synced_gpus: bool = False, **knobs) -> RolloutEngine:
    """The engine registered as ``name`` (importing ``simko.engines.<name>`` first if needed)."""
    if name not in ENGINES and name in available_engines():
        importlib.import_module(f"simko.engines.{name}")
    if name not in ENGINES:
        available = ", ".join(available_engines())
        raise ValueError(f"unknown rollout engine {name!r} (rollout.engine); available: {available}")
    return ENGINES[name](policy, tokenizer, synced_gpus=synced_gpus, **knobs)
