"""The verifier API every verifier in this package shares. A verifier's verdict is a completion's **score**; the
trainer adds any reward term (an overlong penalty) to get the reward the advantages see (simko.sampling_filters).

    v.score(completions, answers) -> list[float]   # one score per completion, batched
    v(completion, answer) -> float                  # one item
    v.final_answer(completion) -> str | None        # the part of the completion this verifier compares
    v.num_timeouts, v.num_errors                    # items that cost a 0.0 because the check hung or failed
    v.start(), v.close() / with v: ...              # start / release worker processes, if any

A subclass implements ``_score(completions, answers)`` (lists of equal, non-zero length) and, when its rule
differs from the default (``extract_final_answer``), ``final_answer``. A failed check is never an exception in
the trainer: it is a 0.0 score and a counter, so one degenerate completion can't stop a run.

What ``score`` makes of ``_score``'s result:

- not one value per completion (a shorter or longer list, None, a number): :class:`VerifierError` naming the
  verifier. That is a bug in the verifier, and padding or cutting the list would train on scores of the wrong
  completions, so the run stops.
- a value that is not a score (NaN, inf, a string, a list, or beyond ``MAX_ABS_SCORE``): 0.0 and one more
  ``num_errors``, with a warning naming the verifier, as for a check that raised. ``None`` is 0.0 ("does not
  apply"), not an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from simko.rewards.extract import extract_final_answer
from simko.rewards.pool import TaskResult

logger = logging.getLogger(__name__)

# The largest |score| taken. Scores, rewards, advantages and the group statistics are float32: a score of 1e39 is
# inf there, and sums of squares of scores near 1e19 overflow; 1e15 leaves room for a million rows.
MAX_ABS_SCORE = 1e15


class VerifierError(ValueError):
    """A verifier returned something that is not one score per completion; the message names the verifier."""


class Verifier:
    """Base class: subclass it, implement ``_score``, and register it with ``register_verifier``."""

    name = "verifier"
    # Class-level defaults, so a subclass that forgets super().__init__() still counts (instances get their own
    # values on the first increment).
    num_timeouts = 0
    num_errors = 0
    _warned: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.num_timeouts = 0
        self.num_errors = 0

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        # Numeric golds (an int column in a dataset) are compared as their text.
        completions, answers = list(completions), [str(a) if isinstance(a, (int, float)) else a for a in answers]
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        if not completions:
            return []
        values = self._score(completions, answers)
        check_score_count(values, len(completions), self.name)
        scores = []
        for value in values:
            try:
                scores.append(to_score(value))
            except (TypeError, ValueError) as e:
                scores.append(self._failed("error", f"bad score value: {e}"))
        return scores

    def __call__(self, completion: str, answer: str) -> float:
        return self.score([completion], [answer])[0]

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        raise NotImplementedError

    def final_answer(self, completion: str) -> str | None:
        """The final answer of ``completion`` as this verifier reads it (None: it has none), for maj@n and logs.

        Default: ``extract_final_answer`` (last box, else ``<answer>`` tag, else ``answer: X``, else the text).
        """
        return extract_final_answer(completion)

    def start(self) -> None:
        """Start worker processes now, if the verifier has any (else they start on the first ``score``)."""

    def close(self) -> None:
        """Stop worker processes, if any; a later ``score`` starts them again."""

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _score_of(self, result: TaskResult) -> float:
        """A pool result as a score: the value if the check finished, else 0.0 and one more timeout/error."""
        if result.status == "ok":
            try:
                return to_score(result.value)
            except (TypeError, ValueError) as e:
                return self._failed("error", f"bad score value: {e}")
        return self._failed(result.status, result.message)

    def _failed(self, status: str, message: str) -> float:
        if status == "timeout":
            self.num_timeouts += 1
        else:
            self.num_errors += 1
        # Warn once per kind so a bad verifier is visible without flooding the log; the counters keep the tally.
        if status not in self._warned:
            self._warned = self._warned | {status}
            logger.warning(
                "%s verifier: a check %s (%s); it scores 0.0 (further ones are only counted)",
                self.name,
                "timed out" if status == "timeout" else "failed",
                message,
            )
        return 0.0


def check_timeouts(timeout_s: float, batch_timeout_s: float | None) -> None:
    """A worker-pool verifier's limits: a positive per-check timeout, a positive (or no) per-batch budget."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if batch_timeout_s is not None and not batch_timeout_s > 0:
        raise ValueError(f"batch_timeout_s must be > 0 or None (no limit), got {batch_timeout_s}")


def to_score(value: Any) -> float:
    """A verifier's return value as a float score: None counts as 0.0 (not applicable); anything but a number
    (a string too), NaN, inf and |value| > ``MAX_ABS_SCORE`` raise TypeError/ValueError."""
    if value is None:
        return 0.0
    if isinstance(value, (str, bytes)):
        raise TypeError(f"score must be a number, got the {type(value).__name__} {value!r:.50}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"score must be a number, got {type(value).__name__}: {value!r:.50}") from None
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {value!r}")
    if abs(score) > MAX_ABS_SCORE:
        raise ValueError(f"score {score:g} is beyond +-{MAX_ABS_SCORE:g}, where float32 statistics overflow")
    return score


def check_score_count(values: Any, count: int, name: str) -> None:
    """Raise :class:`VerifierError` unless ``values`` is a sequence of ``count`` scores."""
    try:
        got = len(values)
    except TypeError:
        got = None
    if got != count or isinstance(values, (str, bytes, dict)):
        what = f"{got} scores" if got is not None else f"a {type(values).__name__}"
        raise VerifierError(
            f"verifier {name!r} returned {what} for {count} completions: a verifier must return one score per "
            "completion, in order"
        )


def checked_scores(values: Any, count: int, name: str) -> list[float]:
    """``count`` scores as floats, or :class:`VerifierError` naming the verifier (for scorers that are not a
    :class:`Verifier`, whose bad values can't be counted as failed checks)."""
    check_score_count(values, count, name)
    try:
        return [to_score(v) for v in values]
    except (TypeError, ValueError) as e:
        raise VerifierError(f"verifier {name!r} returned a bad score value: {e}") from None
