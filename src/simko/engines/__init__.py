"""Rollout engines: what samples the responses (``rollout.engine``). See :mod:`simko.engines.base`."""

from simko.engines.base import (
    ENGINES,
    RolloutEngine,
    Sampling,
    available_engines,
    build_engine,
    check_engine,
    register_engine,
)
from simko.engines.hf import HFEngine

__all__ = [
    "ENGINES",
    "HFEngine",
    "RolloutEngine",
    "Sampling",
    "available_engines",
    "build_engine",
    "check_engine",
    "register_engine",
]
