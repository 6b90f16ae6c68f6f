"""Rollout engines (TEMPORARY shim on the vllm branch until the structure branch's engines package merges)."""

from simko.engines.base import ENGINES, RolloutEngine, Sampling, build_engine, register_engine

__all__ = ["ENGINES", "RolloutEngine", "Sampling", "build_engine", "register_engine"]
