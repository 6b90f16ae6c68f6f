"""The rollout-engine interface: what the trainer and ``simko.eval`` need from whatever samples the responses.

An engine turns prompt token ids into G sampled responses each, as :class:`~simko.rollout.Rollouts` built by
:func:`simko.rollout.build_rollouts` (so padding, masks, trimming and decoding are the same for every engine).
The update never asks the engine for gradients: the policy's own teacher-forced forward (:mod:`simko.forward`)
scores the sampled tokens.

Engines are found by name (``rollout.engine``): ``ENGINES`` (:class:`simko.registry.Registry`, lazy) imports
``simko.engines.<name>`` when that engine is first asked for, whose engine class registers itself with
:func:`register_engine`; no engine module is imported before it is asked for. A new engine is one file under
``src/simko/engines/`` and its knobs under ``rollout.<name>`` in ``configs/rollout/``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from simko.registry import Registry
from simko.rollout import Rollouts


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, RL step, rank): sampling is seeded per step, so a resumed
    run samples exactly what the uninterrupted run would have, without storing RNG state in checkpoints."""
    return (seed * 1_000_003 + step * 1_009 + rank * 7_919 + 17) % (2**63 - 1)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompt token ids as the engines take them: no special tokens added, truncated to ``max_prompt_tokens``."""
    enc = tokenizer(
        list(prompts),
        add_special_tokens=False,
        truncation=max_prompt_tokens is not None,
        max_length=max_prompt_tokens,
    )
    return [list(ids) for ids in enc["input_ids"]]


@dataclass(frozen=True)
class Sampling:
    """How to sample one batch. Top-k filtering is always off: the samples come from softmax(logits / T), nucleus
    filtered by ``top_p``, the distribution the loss scores."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # already per (run seed, RL step, rank): step_seed(...)


class RolloutEngine(ABC):
    """Samples responses for prompts given as token ids.

    Constructed as ``cls(policy, tokenizer, synced_gpus=..., **knobs)``: ``synced_gpus`` is True under sharded
    data parallelism (FSDP), where every rank must keep running forwards until all ranks are done; ``knobs`` are
    the engine's own config (``rollout.<name>``). A new engine samples from ``policy`` as it is at construction.
    """

    name: str

    @classmethod
    def check(cls, **knobs) -> None:
        """At start, before any model is built (:func:`check_engine`): raise when this engine cannot run here or
        ``knobs`` (``rollout.<name>``) are not its own. The base checks the knob names against the constructor's
        keyword arguments; an engine that needs more (vLLM: is it installed?) extends it."""
        parameters = inspect.signature(cls.__init__).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return
        own = set(parameters) - {"self", "policy", "tokenizer", "synced_gpus"}
        unknown = sorted(set(knobs) - own)
        if unknown:
            known = ", ".join(sorted(own)) or "none"
            raise TypeError(f"unknown rollout.{cls.name} knobs {unknown}; the {cls.name} engine's knobs: {known}")

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


def _check_engine_class(cls: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise TypeError(f"a rollout engine must be a simko.engines.RolloutEngine subclass, got {cls!r}")
    return cls


# The engines by name: the modules of this package, each imported only when its engine is asked for.
ENGINES: Registry[type[RolloutEngine]] = Registry(
    "rollout engine",
    ("simko.engines",),
    lazy=True,
    skip=("base",),
    config_key="rollout.engine",
    prepare=_check_engine_class,
)
register_engine = ENGINES.register  # @register_engine("name") on a RolloutEngine subclass


def available_engines() -> list[str]:
    """Engine names: the modules of this package other than ``base`` (imported or not), and any registered."""
    return ENGINES.names()


def check_engine(name: str, knobs: dict | None = None) -> None:
    """Fail at start, before any model is built, when engine ``name`` is unknown, cannot run here or ``knobs`` are
    not its own (:meth:`RolloutEngine.check`; vLLM: installed? the knob names)."""
    ENGINES.get(name).check(**dict(knobs or {}))


def build_engine(name: str, policy: torch.nn.Module, tokenizer, synced_gpus: bool = False, **knobs) -> RolloutEngine:
    """The engine registered as ``name`` (importing ``simko.engines.<name>`` first if needed)."""
    return ENGINES.build(name, policy, tokenizer, synced_gpus=synced_gpus, **knobs)
