"""Verifiers: is a completion's final answer right? A score of 0.0/1.0 per completion, batched, never hanging.

    from simko.rewards import MathVerifier
    v = MathVerifier(timeout_s=5.0)
    v.score(completions: list[str], answers: list[str]) -> list[float]   # 0.0/1.0, batched, in a process pool
    v(completion: str, answer: str) -> float
    final_answer(completion, "math") -> str | None   # what the verifier named "math" compares

- base.py      the Verifier API (score, __call__, num_timeouts/num_errors, close, context manager)
- extract.py   the final answer in free model text, every rule (boxed, <answer> tag, answer: line, last line)
- pool.py      KillablePool: pebble worker processes, a per-task deadline and a per-batch budget; hung workers killed
- math.py      MathVerifier: math-verify equivalence, in the pool
- exact.py     ExactMatchVerifier: string / exact-number match for procedural tasks, in-process
- function.py  FunctionVerifier: a plain f(completions, answers) -> list[float] behind the same API
- logic.py     countdown, knights_knaves, mini_sudoku: exact checks of procedural logic puzzles
- countdown_steps.py  Countdown as a chain of steps, and its solution key (what counts as the same solution)
- registry.py  register_verifier / build_verifier / score_batch (a batch may mix verifiers) / check_verifier_names /
               final_answer (per verifier name)

Each verifier registers itself in its module (``@register_verifier``); ``VERIFIERS`` finds them by scanning this
package on its first lookup (:class:`simko.registry.Registry`).
"""

from simko.rewards.base import Verifier
from simko.rewards.exact import ExactMatchVerifier
from simko.rewards.extract import FINAL_ANSWER_WINDOW, extract_boxed, extract_final_answer, final_answer_text
from simko.rewards.function import FunctionVerifier
from simko.rewards.math import MathVerifier
from simko.rewards.pool import KillablePool, TaskResult
from simko.rewards.registry import (
    VERIFIERS,
    build_verifier,
    check_verifier_names,
    close_shared_verifiers,
    failure_counts,
    final_answer,
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
    "FINAL_ANSWER_WINDOW",
    "extract_boxed",
    "extract_final_answer",
    "final_answer_text",
    "final_answer",
    "check_verifier_names",
    "failure_counts",
    "VERIFIERS",
    "register_verifier",
    "build_verifier",
    "score_batch",
    "shared_verifier",
    "close_shared_verifiers",
]
