"""FunctionVerifier: a plain ``f(completions, answers) -> list[float]`` behind the verifier API.

``isolated=True`` (default): ``f`` is called one item at a time (``f([completion], [answer])[0]``) in a
KillablePool, so a user scorer that hangs or crashes (reasoning-gym's countdown scorer ran sympy on model text and
hung on ``9**9**9**9``) costs that item a 0.0 and a counter, like MathVerifier; ``batch_timeout_s`` bounds a whole
``score`` call. ``f`` must then be importable by a worker process: a module-level function of a module file (or of
a script run as a file), not a lambda, a closure, or a function defined in a notebook, ``python -c`` or a script
read from standard input.

``isolated=False``: ``f`` gets the whole batch in the trainer's process; for cheap, trusted scorers, or ones that
need the batch. An exception scores the whole batch 0.0 and counts one error per item.

Return values: numbers (partial credit passes through as is; a pass@k "solve" is decided by the caller), None
counts as 0.0, NaN/inf are errors.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence

from simko.rewards.base import Verifier, check_timeouts, to_score
from simko.rewards.pool import KillablePool, main_is_importable

ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class FunctionVerifier(Verifier):
    def __init__(
        self,
        fn: ScoreFn,
        isolated: bool = True,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        start_method: str | None = None,
        batch_timeout_s: float | None = 60.0,
    ):
        super().__init__()
        check_timeouts(timeout_s, batch_timeout_s)
        self.fn = fn
        self.name = getattr(fn, "__name__", "function")
        self.timeout_s = timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.pool: KillablePool | None = None
        if isolated:
            try:
                pickle.dumps(fn)
            except Exception as e:
                raise TypeError(
                    f"verifier function {fn!r} can't be sent to a worker process ({e}); define it at module level, "
                    "or register it with isolated=False to run it in the trainer's process"
                ) from e
            if getattr(fn, "__module__", None) == "__main__" and not main_is_importable():
                raise TypeError(
                    f"verifier function {self.name!r} is defined in __main__ of a notebook, `python -c` or a script "
                    "read from standard input, which worker processes cannot import. Move it into a module file "
                    "(e.g. my_verifiers.py next to your script) and import it from there, or register it with "
                    "isolated=False to run it in this process (no timeout)"
                )
            # Import the function's module in each worker before its first task, so the import is not timed.
            preload = () if fn.__module__ in (None, "__main__") else (fn.__module__,)
            self.pool = KillablePool(num_workers, start_method=start_method, preload=preload)

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        if self.pool is not None:
            jobs = [(self.fn, c, a) for c, a in zip(completions, answers)]
            results = self.pool.map(call_on_one, jobs, self.timeout_s, budget_s=self.batch_timeout_s)
            return [self._score_of(r) for r in results]
        try:
            values = list(self.fn(completions, answers))
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} scores for {len(completions)} completions")
        except Exception as e:
            return [self._failed("error", f"{type(e).__name__}: {e}") for _ in completions]
        return values  # Verifier.score turns each into a score, counting the bad ones

    def start(self) -> None:
        if self.pool is not None:
            self.pool.start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def call_on_one(fn: ScoreFn, completion: str, answer: str) -> float:
    """``fn`` on a batch of one, in a pool worker."""
    values = list(fn([completion], [answer]))
    if len(values) != 1:
        raise ValueError(f"returned {len(values)} scores for 1 completion")
    return to_score(values[0])
