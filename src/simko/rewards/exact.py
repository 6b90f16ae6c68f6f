"""ExactMatchVerifier: 1.0 if the completion's final answer is the gold string, for procedural tasks.

Final answer: ``extract_final_answer``, the base class's ``final_answer`` (last ``\\boxed{}``, else last
``<answer>...</answer>``, else the rest of the line after the last ``answer:``, else the whole completion). Both
sides are normalised the same way: whitespace runs collapsed, surrounding ``$``, ``**`` and a trailing period
dropped, case folded unless ``case_sensitive``. If both then read as plain numbers (``46``, ``46.0``, ``-3.5``,
``1,234``, ``7/2``) they are compared exactly as fractions, so ``46`` == ``46.0`` and ``0.5`` == ``1/2`` but
``0.333`` != ``1/3``.

It only runs string operations on bounded input (no ``eval``, no sympy, no exponent notation), so it runs in the
trainer's process without a pool; ``num_timeouts`` stays 0.
"""

from __future__ import annotations

import re
from fractions import Fraction

from simko.rewards.base import Verifier
from simko.rewards.registry import register_verifier

_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_RATIO = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_MAX_NUMBER_CHARS = 64  # longer "numbers" are compared as strings


@register_verifier("exact")
class ExactMatchVerifier(Verifier):
    """String (or exact numeric) match of the final answer against the gold answer.

    Args:
        case_sensitive: compare case-sensitively (default: case-insensitive, ``Knight`` == ``knight``).
        numeric: also compare as numbers when both sides read as numbers.
    """

    name = "exact"

    def __init__(self, case_sensitive: bool = False, numeric: bool = True):
        super().__init__()
        self.case_sensitive = case_sensitive
        self.numeric = numeric

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        scores = []
        for completion, answer in zip(completions, answers):
            try:
                scores.append(1.0 if self.matches(self.final_answer(completion), answer) else 0.0)
            except Exception as e:  # e.g. a non-string item: that item's 0.0, not the run
                scores.append(self._failed("error", f"{type(e).__name__}: {e}"))
        return scores

    def matches(self, pred: str, gold: str) -> bool:
        pred, gold = self.normalise(pred), self.normalise(gold)
        if not pred or not gold:
            return False
        if pred == gold:
            return True
        if self.numeric:
            pred_number, gold_number = parse_number(pred), parse_number(gold)
            return pred_number is not None and pred_number == gold_number
        return False

    def normalise(self, text: str) -> str:
        text = " ".join(text.split()).strip("$* ")
        text = text.removesuffix(".").strip()
        return text if self.case_sensitive else text.casefold()


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number if it is a plain decimal, ``1,234``-style integer/decimal or ``a/b``, else None."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _DECIMAL.fullmatch(text):
        return Fraction(text)
    ratio = _RATIO.fullmatch(text)
    if ratio and int(ratio.group(2)) != 0:
        return Fraction(int(ratio.group(1)), int(ratio.group(2)))
    return None
