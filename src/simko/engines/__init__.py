"""Rollout engines: what samples the responses (``rollout.engine``). See :mod:`simko.engines.base`.

Each engine is a module of this package (``hf``, ``vllm``), imported when it is first asked for by name
(``build_engine``, ``check_engine``): ``import simko.engines`` imports no engine.
"""

from simko.engines.base import (
    ENGINES,
    RolloutEngine,
    Sampling,
    available_engines,
    build_engine,
    check_engine,
    register_engine,
    step_seed,
    tokenize_prompts,
)

__all__ = [
    "ENGINES",
    "RolloutEngine",
    "Sampling",
    "available_engines",
    "build_engine",
    "check_engine",
    "register_engine",
    "step_seed",
    "tokenize_prompts",
]
