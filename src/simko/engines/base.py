"""TEMPORARY shim on the vllm branch: the rollout-engine contract of /work/plan (structure creates the real file)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from simko.rollout import Rollouts

ENGINES: dict[str, type] = {}


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class RolloutEngine(ABC):
    name: str

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: Sampling) -> Rollouts: ...

    @abstractmethod
    def sync_weights(self, policy: torch.nn.Module) -> None: ...

    def close(self) -> None:  # noqa: B027 (optional hook)
        return None


def register_engine(name: str):
    def deco(cls):
        ENGINES[name] = cls
        cls.name = name
        return cls

    return deco


def build_engine(name: str, policy, tokenizer, synced_gpus: bool = False, **knobs) -> RolloutEngine:
    if name not in ENGINES:
        importlib.import_module(f"simko.engines.{name}")
    return ENGINES[name](policy, tokenizer, synced_gpus=synced_gpus, **knobs)
