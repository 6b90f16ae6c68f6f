"""The multi-path testbed: Countdown written as a chain of steps, with every correct solution enumerated.

    numbers 3 5 7 9 and target 24  ->  prompt "3 5 7 9 -> 24\\n", a right completion "9-7=2\\n5*3=15\\n15+2=17"...

The rules and what counts as one solution are in ``simko.rewards.countdown_steps`` (verifier ``countdown_steps``).
``solve(numbers, target)`` enumerates every solution by brute force (all pairs of pool values, all legal steps,
recursively: at most 6 x 4 x 3 x 4 x 1 x 4 = 1,152 chains for 4 numbers) and returns one canonical chain per
solution. The tiny model's warm start trains on the ``solution`` field of train examples, which is drawn
UNIFORMLY among a problem's solutions, so the base policy spreads its probability over the paths.

Splits: ``train`` (a stream, with replacement), ``val`` and ``test`` (fixed sets of distinct problems, in draw
order). Every problem belongs to one split by a keyed hash of its canonical form (the sorted numbers and the
target), independent of the seed, so no val or test problem can occur in training and val and test are disjoint,
whatever the seeds. ``val`` chooses hyperparameters and is validated in-loop; ``test`` is reported.
"""

from __future__ import annotations

import functools
import itertools
import random
from typing import Any

from simko.data.split import DistinctDraws, hash_unit
from simko.rewards.countdown_steps import Step, chain_text, solution_key_of
from simko.rewards.logic import countdown_answer

SPLITS = ("train", "val", "test")

# Rejection sampling gives up after this many draws in a row: only reached when the filters (split share,
# min_solutions, max_solutions) leave (nearly) no problem.
_MAX_DRAWS = 10_000


@functools.lru_cache(maxsize=65_536)
def _solve_sorted(numbers: tuple[int, ...], target: int) -> tuple[tuple[Step, ...], ...]:
    # Steps are plain (a, op, b, result) tuples while searching: ~3x faster than building Step objects per node.
    chains: list[tuple[tuple[int, str, int, int], ...]] = []

    def extend(pool: tuple[int, ...], chain: tuple) -> None:
        if len(pool) == 1:
            if pool[0] == target:
                chains.append(chain)
            return
        for i, j in itertools.combinations(range(len(pool)), 2):
            rest = pool[:i] + pool[i + 1 : j] + pool[j + 1 :]
            hi, lo = max(pool[i], pool[j]), min(pool[i], pool[j])
            extend(rest + (hi + lo,), chain + ((hi, "+", lo, hi + lo),))
            extend(rest + (hi * lo,), chain + ((hi, "*", lo, hi * lo),))
            if hi > lo:
                extend(rest + (hi - lo,), chain + ((hi, "-", lo, hi - lo),))
            if hi % lo == 0:
                extend(rest + (hi // lo,), chain + ((hi, "/", lo, hi // lo),))

    extend(numbers, ())
    solutions: dict[str, tuple[Step, ...]] = {}
    for chain in chains:
        steps = tuple(Step(*step) for step in chain)
        key = solution_key_of(steps)
        # One written form per solution: the smallest of its step orders (deterministic).
        if key not in solutions or steps < solutions[key]:
            solutions[key] = steps
    return tuple(solutions[key] for key in sorted(solutions))


def solve(numbers: list[int] | tuple[int, ...], target: int) -> list[tuple[Step, ...]]:
    """Every solution of the problem (one canonical chain each, sorted by solution key); [] if there is none."""
    if not numbers or any(int(n) < 1 for n in numbers):
        raise ValueError(f"countdown_steps numbers must be positive integers, got {list(numbers)}")
    return list(_solve_sorted(tuple(sorted(int(n) for n in numbers)), int(target)))


def question_text(numbers: list[int], target: int) -> str:
    return " ".join(str(n) for n in numbers) + f" -> {target}"


class CountdownStepsSource:
    """Procedural countdown_steps problems with at least ``min_solutions`` solutions each.

    Args:
        seed: stream seed; ``example(i)`` is deterministic in (seed, split, i) and the difficulty arguments.
        split: ``"train"``, ``"val"`` or ``"test"``.
        min_numbers, max_numbers: how many numbers a problem has (drawn uniformly).
        min_value, max_value: range of each number (drawn uniformly, with replacement).
        min_target, max_target: range of the target (drawn uniformly; unsolvable draws are rejected).
        min_solutions, max_solutions: keep only problems with this many distinct solutions (None: no upper bound).
        val_fraction, test_fraction: shares of the problem space held out (same values in every source).
        verifier: registered verifier name stored in every example.

    Examples: ``{"id", "question", "answer", "verifier", "solution", "num_solutions"}``; ``answer`` is the
    verifier's JSON gold, ``solution`` one canonical chain drawn uniformly among the problem's solutions.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        min_numbers: int = 4,
        max_numbers: int = 4,
        min_value: int = 1,
        max_value: int = 9,
        min_target: int = 10,
        max_target: int = 50,
        min_solutions: int = 3,
        max_solutions: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        verifier: str = "countdown_steps",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if not 2 <= min_numbers <= max_numbers <= 5:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers <= 5, got {min_numbers}, {max_numbers}.")
        if not 1 <= min_value <= max_value:
            raise ValueError(f"need 1 <= min_value <= max_value, got {min_value}, {max_value}.")
        if not 1 <= min_target <= max_target:
            raise ValueError(f"need 1 <= min_target <= max_target, got {min_target}, {max_target}.")
        if min_solutions < 1 or (max_solutions is not None and max_solutions < min_solutions):
            raise ValueError(f"need 1 <= min_solutions <= max_solutions, got {min_solutions}, {max_solutions}.")
        if not (0.0 < val_fraction and 0.0 < test_fraction and val_fraction + test_fraction < 1.0):
            raise ValueError(
                f"val_fraction and test_fraction must be positive with a sum below 1, got {val_fraction}, "
                f"{test_fraction}."
            )
        self.seed = seed
        self.split = split
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.min_value, self.max_value = min_value, max_value
        self.min_target, self.max_target = min_target, max_target
        self.min_solutions, self.max_solutions = min_solutions, max_solutions
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.verifier = verifier
        # The val/test split's distinct problems, found so far in draw order (keyed by numbers and target).
        self._distinct = DistinctDraws(self._draw, _MAX_DRAWS, "value or target range, val_fraction / test_fraction")

    def __repr__(self) -> str:
        return (
            f"CountdownStepsSource(seed={self.seed}, split={self.split!r}, numbers={self.min_numbers}.."
            f"{self.max_numbers} in {self.min_value}..{self.max_value}, target {self.min_target}..{self.max_target}, "
            f"solutions>={self.min_solutions})"
        )

    def example(self, index: int) -> dict[str, Any]:
        problem = self._draw(index)[1] if self.split == "train" else dict(self._distinct.get(index, self))
        return {"id": f"countdown_steps/{self.split}/{self.seed}/{index}", **problem, "verifier": self.verifier}

    @staticmethod
    def problem_key(numbers: list[int], target: int) -> str:
        return f"{sorted(numbers)} -> {target}"

    def split_of(self, numbers: list[int], target: int) -> str:
        """The split a problem belongs to: a keyed hash of its canonical form, independent of the seed."""
        unit = hash_unit(self.problem_key(numbers, target), b"simko-countdown-steps-split")
        if unit < self.val_fraction:
            return "val"
        return "test" if unit < self.val_fraction + self.test_fraction else "train"

    def problem_space(self) -> dict[str, float]:
        """Every problem the difficulty arguments allow (the multisets of numbers x the targets), solved: how many
        there are, how many pass the solution filters, their split sizes, mean number of solutions and the longest
        solution chain (characters, for ``rollout.max_new_tokens``). Seconds for 4 numbers in 1..9; it grows fast
        with ``max_value`` and ``max_numbers``."""
        counts = {"problems": 0, "kept": 0, "train": 0, "val": 0, "test": 0}
        solutions = longest = 0
        for count in range(self.min_numbers, self.max_numbers + 1):
            values = range(self.min_value, self.max_value + 1)
            for numbers in itertools.combinations_with_replacement(values, count):
                for target in range(self.min_target, self.max_target + 1):
                    counts["problems"] += 1
                    chains = solve(numbers, target)
                    found = len(chains)
                    if found < self.min_solutions or (self.max_solutions and found > self.max_solutions):
                        continue
                    longest = max(longest, *(len(chain_text(chain)) for chain in chains))
                    counts["kept"] += 1
                    counts[self.split_of(list(numbers), target)] += 1
                    solutions += found
        return {**counts, "mean_solutions": solutions / max(counts["kept"], 1), "longest_solution_chars": longest}

    def _draw(self, index: int) -> tuple[str, dict[str, Any]]:
        """Draw ``index`` of this split's seeded sequence (with replacement): (canonical key, problem fields)."""
        # A string seed is hashed with SHA-512: the same problem in every process and Python run.
        rng = random.Random(f"countdown_steps/{self.seed}/{self.split}/{index}")
        for _ in range(_MAX_DRAWS):
            count = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(self.min_value, self.max_value) for _ in range(count)]
            target = rng.randint(self.min_target, self.max_target)
            if self.split_of(numbers, target) != self.split:
                continue
            solutions = solve(numbers, target)
            if len(solutions) < self.min_solutions or (self.max_solutions and len(solutions) > self.max_solutions):
                continue
            return self.problem_key(numbers, target), {
                "question": question_text(numbers, target),
                "answer": countdown_answer(numbers, target),
                "solution": chain_text(rng.choice(solutions)),  # uniform over the solutions
                "num_solutions": len(solutions),
            }
        raise ValueError(f"{self!r}: no {self.split!r} problem passed the filters in {_MAX_DRAWS} draws.")
