"""Procedural integer arithmetic prompts ("12+34" -> "46"), generated on the fly.

Used to train the tiny CPU model end to end without any data file. ``example(index)`` is a pure function
of (seed, split, index), so the RL batch of any step can be rebuilt exactly after a restart.

Train/val disjointness: the problem space is small (2-digit addition has 10,000 problems), so drawing
train and val with different seeds would overlap heavily. Instead every *problem* is assigned to a split
by a keyed hash of its text (about ``val_fraction`` of problems go to "val"), and each split only emits
problems of its own part: no val problem can ever appear in training, whatever the seeds. The partition
does not depend on the seed, so val sets of runs with different seeds are also disjoint from every
training stream.

The train split is a stream drawn with replacement. The val split is a fixed set of DISTINCT problems: val
example ``i`` is the ``i``-th new problem in the seeded draw sequence (the first N distinct problems the
generator draws, so their mix of operand lengths follows the training distribution), and pass@k over N val
problems is a mean over N different problems, not over repeats of the frequent ones.
"""

from __future__ import annotations

import operator
import random

from simko.data.split import DistinctDraws, hash_split

SPLITS = ("train", "val")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# Rejection sampling gives up after this many draws: only reached when a split's part of the problem
# space is (nearly) empty, e.g. 1-digit addition with a tiny val_fraction.
_MAX_DRAWS = 10_000


class ArithmeticSource:
    """Integer arithmetic with operands of ``min_digits``..``max_digits`` digits.

    Args:
        seed: stream seed; ``example(i)`` is deterministic in (seed, split, i).
        min_digits, max_digits: digit counts of each operand (drawn uniformly, so short operands are as
            frequent as long ones; 1-digit operands include 0).
        ops: operators to draw from, among ``+``, ``-``, ``*``. Subtraction puts the larger operand
            first, so answers are never negative (fewer symbols for a tiny model to learn).
        split: ``"train"`` (a stream, with replacement) or ``"val"`` (distinct problems): which hash-part of
            the problem space to draw from.
        val_fraction: share of the problem space reserved for ``val``.
        verifier: registered verifier name stored in every example.
    """

    def __init__(
        self,
        seed: int = 0,
        min_digits: int = 1,
        max_digits: int = 2,
        ops: tuple[str, ...] | list[str] = ("+",),
        split: str = "train",
        val_fraction: float = 0.1,
        verifier: str = "exact",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
        unknown = [op for op in ops if op not in OPERATIONS]
        if not ops or unknown:
            raise ValueError(f"ops must be a non-empty subset of {list(OPERATIONS)}, got {list(ops)}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        self.seed = seed
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.ops = tuple(ops)
        self.split = split
        self.val_fraction = val_fraction
        self.verifier = verifier
        # The val split's distinct problems, found so far in draw order (keyed by the question).
        self._distinct = DistinctDraws(self._keyed_draw, _MAX_DRAWS, "max_digits, ops, val_fraction")

    def __repr__(self) -> str:
        return (
            f"ArithmeticSource(seed={self.seed}, digits={self.min_digits}..{self.max_digits}, "
            f"ops={self.ops}, split={self.split!r})"
        )

    def example(self, index: int) -> dict[str, str]:
        if self.split == "train":
            question, answer = self._draw(index)
        else:
            question, answer = self._distinct.get(index, self)
        return {
            "id": f"arithmetic/{self.split}/{self.seed}/{index}",
            "question": question,
            "answer": answer,
            "verifier": self.verifier,
        }

    def _draw(self, index: int) -> tuple[str, str]:
        """Draw ``index`` of this split's seeded sequence (with replacement): (question, answer)."""
        # Seeding random.Random with a string hashes it with SHA-512: stable across processes and
        # Python runs (unlike hash()), so every rank and every restart sees the same problem.
        rng = random.Random(f"arithmetic/{self.seed}/{self.split}/{index}")
        for _ in range(_MAX_DRAWS):
            left, right = self._operand(rng), self._operand(rng)
            op = rng.choice(self.ops)
            if op == "-" and left < right:
                left, right = right, left
            question = f"{left}{op}{right}"
            if self.split_of(question) == self.split:
                return question, str(OPERATIONS[op](left, right))
        raise ValueError(
            f"{self!r}: no {self.split!r} problem found in {_MAX_DRAWS} draws; the problem space is too "
            f"small for val_fraction={self.val_fraction}."
        )

    def _keyed_draw(self, index: int) -> tuple[str, tuple[str, str]]:
        question, answer = self._draw(index)
        return question, (question, answer)

    def split_of(self, question: str) -> str:
        """The split a problem belongs to: a keyed hash of its text, independent of the seed."""
        return hash_split(question, b"simko-arithmetic-split", self.val_fraction)

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)
