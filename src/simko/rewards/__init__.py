"""Verifiable rewards: is a completion's final answer right? 0.0/1.0 per completion, batched, never hanging.

    from simko.rewards import MathVerifier
    v = MathVerifier(timeout_s=5.0)
    v.score(completions: list[str], answers: list[str]) -> list[float]   # 0.0/1.0, batched, in a process pool
    v(completion: str, answer: str) -> float

- base.py      the Verifier API (score, __call__, num_timeouts/num_errors, close, context manager)
- extract.py   extract_boxed / extract_final_answer: the final answer in free model text
- pool.py      KillablePool: worker processes with a per-task wall-clock deadline; hung workers killed, replaced
- math.py      MathVerifier: math-verify equivalence, in the pool
- exact.py     ExactMatchVerifier: string / exact-number match for procedural tasks, in-process
- function.py  FunctionVerifier: a plain f(completions, answers) -> list[float] behind the same API
- registry.py  register_verifier / build_verifier / score_batch (a batch may mix verifiers)
"""

from simko.rewards import logic  # noqa: E402,F401 - registers countdown, knights_knaves, mini_sudoku
from simko.rewards.base import Verifier
from simko.rewards.exact import ExactMatchVerifier
from simko.rewards.extract import extract_boxed, extract_final_answer
from simko.rewards.function import FunctionVerifier
from simko.rewards.math import MathVerifier
from simko.rewards.pool import KillablePool, TaskResult
from simko.rewards.registry import (
    VERIFIERS,
    build_verifier,
    close_shared_verifiers,
    failure_counts,
    register_verifier,
    score_batch,
    shared_verifier,
)

__all__ = [
    "Verifier",
    "MathVerifier",
    "ExactMatchVerifier",
    "FunctionVerifier",
    "KillablePool",
    "TaskResult",
    "extract_boxed",
    "extract_final_answer",
    "failure_counts",
    "VERIFIERS",
    "register_verifier",
    "build_verifier",
    "score_batch",
    "shared_verifier",
    "close_shared_verifiers",
]

# The multi-path testbed's verifier and its solution key (the diversity metrics' notion of "the same solution").
from simko.rewards import countdown_steps  # noqa: E402,F401 - registers countdown_steps
