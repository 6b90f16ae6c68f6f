"""MathVerifier: 1.0 if the completion's final answer equals the gold answer mathematically (math-verify).

Final answer: the content of the last complete ``\\boxed{...}`` (``extract_boxed``). Without any box, we fall back
to math-verify's own extraction (``LatexExtractionConfig`` + ``ExprExtractionConfig``: the last LaTeX block or plain
number/expression) over the completion's answer window (its last ``FINAL_ANSWER_WINDOW`` characters), because small
models often answer without a box and a strict format rule would give them almost no signal; ``require_boxed=True``
turns the fallback off. A box that is opened but never closed (a completion cut off mid-answer) scores 0.0 without a
fallback. An empty box (``\\boxed{}``) is not a final answer: small models copy the instruction's literal ``\\boxed{}``
and write their answer after it ("The answer is \\boxed{} 8."; SmolLM2-135M-Instruct on MATH Level 1: 1 to 2 % of its
samples, a third to four fifths of its boxes), so empty boxes are removed before the final answer is looked for.

Equivalence: ``math_verify.verify(parse(gold), parse(pred))``, both sides wrapped as ``$...$`` (this parses
``10\\%`` where a ``\\boxed{}`` wrapper does not; on MATH-500 both wrappings agree on every gold). It handles
``\\frac12`` = ``0.5``, ``10`` = ``10.0``, ``1,234`` = ``1234``, ``(1,2)`` != ``(2,1)`` but the list ``1,2`` = ``2,1``,
units and ``\\text{}``. A gold given as a whole solution works too: its last box is used.

Every math-verify call runs in a worker process of a KillablePool with a wall-clock ``timeout_s``: verify can hang
for ever in C code that no signal interrupts (sympy evaluating ``9^{9^{9^{9^{9}}}}``; Math-Verify issue #65), so
math-verify's own ``signal.alarm`` timeouts are switched off and the pool's kill is the one timeout. A batch has a
wall-clock budget too (``batch_timeout_s``): checks not finished by then score 0.0 and count as timeouts.
"""

from __future__ import annotations

import functools
import logging
import re

from simko.rewards.base import Verifier, check_timeouts
from simko.rewards.extract import answer_window, extract_boxed, has_box_command
from simko.rewards.pool import KillablePool
from simko.rewards.registry import register_verifier

# An empty \boxed{} / \fbox{} (whitespace inside at most): the instruction's placeholder, not an answer.
_EMPTY_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{\s*\}")


@register_verifier("math")
class MathVerifier(Verifier):
    """Math answers checked by math-verify in a pool of killable worker processes.

    Args:
        timeout_s: wall-clock seconds per item; a slower check is killed and scores 0.0 (``num_timeouts``).
        batch_timeout_s: wall-clock seconds for one ``score`` call (None: no limit); checks not finished by then
            score 0.0, count in ``num_timeouts``, and their workers are killed.
        num_workers: worker processes, started on the first ``score`` and reused.
        require_boxed: score 0.0 when the completion has no ``\\boxed{}`` instead of falling back to math-verify's
            extraction of the final answer.
        start_method: ``"forkserver"`` (default) or ``"spawn"``.
    """

    name = "math"

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        require_boxed: bool = False,
        start_method: str | None = None,
        batch_timeout_s: float | None = 60.0,
    ):
        super().__init__()
        check_timeouts(timeout_s, batch_timeout_s)
        self.timeout_s = timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.require_boxed = require_boxed
        self.pool = KillablePool(num_workers, start_method=start_method, preload=("math_verify",), initializer=warm_up)

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        scores = [0.0] * len(completions)
        jobs, job_items = [], []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            try:
                gold = _gold_text(answer)
                text = without_empty_boxes(completion)
                pred = extract_boxed(text)
                if pred is None and (self.require_boxed or has_box_command(text) or not text.strip()):
                    continue  # no final answer to check: 0.0 without a round trip to a worker
            except Exception as e:  # e.g. None instead of a string: that item's 0.0, not the run
                scores[i] = self._failed("error", f"{type(e).__name__}: {e}")
                continue
            if pred and _same_text(pred, gold):
                scores[i] = 1.0  # identical strings are equal; also covers golds math-verify cannot parse
                continue
            # Send only what the worker needs: the boxed answer, or the answer window for the fallback extraction.
            jobs.append((pred, answer_window(text) if pred is None else None, gold))
            job_items.append(i)
        results = self.pool.map(is_equivalent, jobs, self.timeout_s, budget_s=self.batch_timeout_s)
        for i, result in zip(job_items, results):
            scores[i] = self._score_of(result)
        return scores

    def final_answer(self, completion: str) -> str | None:
        """The last complete box that is not empty (None without one: the fallback extraction is math-verify's, in a
        worker)."""
        return extract_boxed(without_empty_boxes(completion))

    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        self.pool.close()


def without_empty_boxes(completion: str) -> str:
    """The answer window of ``completion`` with every empty ``\\boxed{}`` / ``\\fbox{}`` removed."""
    return _EMPTY_BOX.sub("", answer_window(completion))


def is_equivalent(pred: str | None, completion: str | None, gold: str) -> float:
    """1.0 if ``pred`` (a boxed answer) or, when it is None, the final answer math-verify finds in ``completion``
    equals ``gold``. Runs inside a pool worker."""
    parse, verify, config = _math_verify()
    if not gold:
        raise ValueError("empty gold answer")
    gold_parsed = parse(f"${gold}$", config, parsing_timeout=None)
    pred_parsed = parse(f"${pred}$" if pred is not None else completion, config, parsing_timeout=None)
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def warm_up() -> None:
    """Run once per worker before its first task: imports math-verify and fills its parser caches (~0.2 s), so
    that cost never counts against an item's deadline."""
    is_equivalent("\\frac{1}{2}", None, "0.5")
    is_equivalent(None, "so x = 2", "2")


@functools.cache
def _math_verify():
    # Imported lazily: the trainer process never needs sympy/math-verify, only the workers do.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # With its alarm timeouts off, math-verify warns once per process that we must time it ourselves: we do.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return parse, verify, (LatexExtractionConfig(), ExprExtractionConfig())


def _gold_text(answer: str) -> str:
    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())
