"""Logic-task prompt sources: Countdown, Knights-and-Knaves and 4x4 Mini Sudoku, procedural or read from files.

* ``ReasoningGymSource``: problems generated offline by the PyPI package ``reasoning-gym`` (Apache-2.0), endless,
  ``example(index)`` a pure function of (task, difficulty, seed, split, index);
* ``CountdownFileSource`` / ``KnightsKnavesFileSource``: the shipped TinyZero Countdown and Logic-RL K&K parquet
  files (question text built here from the raw fields: their baked-in ``prompt`` holds a model's chat template).

Every example is ``{"id", "question", "answer", "verifier", "solution"}``: ``answer`` is the JSON gold that the
task's verifier in ``simko.rewards.logic`` reads (a Countdown gold is the numbers and the target, since many
expressions are right); ``solution`` is one right final answer in the prompted format, or "" when the file has
none (Countdown files). ``question`` holds only the problem: the answer-format instruction is the config's
``prompt_template``, as for math.

Train/val disjointness (as in ``ArithmeticSource``): reasoning-gym's ``create_dataset(seed=S)[i]`` seeds its
generator with ``S + i``, so separate seeds share problems (seed 1's item 0 is seed 0's item 1) and small problem
spaces repeat anyway. Instead, each draw reads item ``h`` of one generator, where ``h`` is a 64-bit hash of
(task, seed, split, index, attempt), and every *problem* belongs to a split by a keyed hash of its canonical key:
the sorted numbers and target (Countdown), the logical statements without names or wording (K&K), the clue grid
(sudoku). A split emits only its own problems, so no val problem can occur in training whatever the seeds and the
difficulty, as long as both sources use the same ``val_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simko.data.sources import _load_rows, data_location, row_id_prefix
from simko.data.split import hash_split
from simko.rewards.logic import (
    countdown_answer,
    countdown_question,
    knights_knaves_answer,
    knights_knaves_solution_text,
    sudoku_answer,
)

SPLITS = ("train", "val")

# Rejection sampling of a split's problems gives up after this many draws (expected: 1 / share of the split).
_MAX_DRAWS = 1_000

# reasoning-gym's own answer-format lines: the config's prompt_template says how to answer instead.
_KK_FORMAT_HINT = re.compile(r"\s*\(Format your answer like: .*\)\s*\Z", re.S)
_SUDOKU_FORMAT_HINT = re.compile(r"\n?Format your response as .*\Z", re.S)


@dataclass(frozen=True)
class LogicProblem:
    key: str  # canonical problem: decides the split
    question: str
    answer: str  # JSON gold for the verifier
    solution: str  # one right final answer


def _countdown_problem(entry: Mapping[str, Any]) -> LogicProblem:
    meta = entry["metadata"]
    numbers, target = [int(n) for n in meta["numbers"]], int(meta["target"])
    return LogicProblem(
        key=f"countdown {sorted(numbers)} {target}",
        question=countdown_question(numbers, target),
        answer=countdown_answer(numbers, target),
        solution=str(meta["expression"]),
    )


def _knights_knaves_problem(entry: Mapping[str, Any]) -> LogicProblem:
    meta = entry["metadata"]
    names = [str(name) for name in meta["names"]]
    knights = [bool(knight) for knight in meta["solution"]]
    words = (str(meta["knight_knave_terms"]["knight"]), str(meta["knight_knave_terms"]["knave"]))
    return LogicProblem(
        # The statements refer to people by position, so renamed or reworded copies of a puzzle share a key.
        key=f"knights_knaves {json.dumps(_plain(meta['statements']))}",
        question=_KK_FORMAT_HINT.sub("", entry["question"]),
        answer=knights_knaves_answer(names, knights, words),
        solution=knights_knaves_solution_text(names, knights, words),
    )


def _mini_sudoku_problem(entry: Mapping[str, Any]) -> LogicProblem:
    puzzle = _plain(entry["metadata"]["puzzle"])
    return LogicProblem(
        key=f"mini_sudoku {json.dumps(puzzle)}",
        question=_SUDOKU_FORMAT_HINT.sub("", entry["question"].rstrip()),
        answer=sudoku_answer(puzzle),
        solution=str(entry["answer"]),
    )


# Supported reasoning-gym tasks: how an item becomes a LogicProblem; the verifier has the task's name.
TASKS: dict[str, Callable[[Mapping[str, Any]], LogicProblem]] = {
    "countdown": _countdown_problem,
    "knights_knaves": _knights_knaves_problem,
    "mini_sudoku": _mini_sudoku_problem,
}


class ReasoningGymSource:
    """Endless procedural logic problems from reasoning-gym, split into disjoint train and val parts.

    Args:
        task: one of ``TASKS`` (``countdown``, ``knights_knaves``, ``mini_sudoku``); also the verifier's name.
        seed: stream seed; ``example(i)`` is deterministic in (task, difficulty, seed, split, i).
        split: ``"train"`` or ``"val"``: which hash-part of the problem space to draw from.
        val_fraction: share of the problem space reserved for ``val`` (use the same value for both sources).
        size: if set, the stream cycles through its first ``size`` problems (a finite training set).
        **difficulty: the task's reasoning-gym config fields, passed through and validated at construction:
            countdown: ``min_numbers``, ``max_numbers``, ``min_value``, ``max_value``, ``min_target``,
            ``max_target``, ``operators``; knights_knaves: ``n_people``, ``depth_constraint``,
            ``width_constraint``; mini_sudoku: ``min_empty``, ``max_empty``.
    """

    def __init__(
        self,
        task: str,
        seed: int = 0,
        split: str = "train",
        val_fraction: float = 0.1,
        size: int | None = None,
        **difficulty: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"Unsupported task {task!r}; supported: {sorted(TASKS)}.")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 or None, got {size}.")
        import reasoning_gym  # imported here: ~2 s, and only these sources need it

        self.task = task
        self.seed = seed
        self.split = split
        self.val_fraction = val_fraction
        self.size = size
        # Hydra passes lists as ListConfig; reasoning-gym's configs expect tuples (e.g. countdown's operators).
        self.difficulty = {
            key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            for key, value in difficulty.items()
        }
        # Builds and validates the task's config now, so a wrong difficulty key fails at start-up. The generator's
        # own seed stays 0: items are addressed by hashed indices (see the module docstring).
        self._generator = reasoning_gym.create_dataset(task, seed=0, **self.difficulty)
        self._to_problem = TASKS[task]
        # The val set is re-read at every validation and costs ~1/val_fraction draws per problem: keep it.
        self._cache: dict[int, dict[str, Any]] | None = {} if split == "val" else None

    def __repr__(self) -> str:
        return f"ReasoningGymSource({self.task!r}, seed={self.seed}, split={self.split!r}, {self.difficulty})"

    def example(self, index: int) -> dict[str, Any]:
        if self.size is not None:
            index %= self.size
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        example = self._draw(index)
        if self._cache is not None:
            self._cache[index] = example
        return dict(example)

    def split_of(self, key: str) -> str:
        """The split a problem belongs to: a keyed hash of its canonical key, independent of the seed."""
        return hash_split(key, b"simko-logic-split", self.val_fraction)

    def problem(self, index: int) -> LogicProblem:
        """The problem behind ``example(index)`` (with its canonical key)."""
        if self.size is not None:
            index %= self.size
        for attempt in range(_MAX_DRAWS):
            problem = self._to_problem(self._generator[self._item_index(index, attempt)])
            if self.split_of(problem.key) == self.split:
                return problem
        raise ValueError(
            f"{self!r}: no {self.split!r} problem found in {_MAX_DRAWS} draws; the problem space is too small "
            f"for val_fraction={self.val_fraction}."
        )

    def _draw(self, index: int) -> dict[str, Any]:
        problem = self.problem(index)
        return {
            "id": f"{self.task}/{self.split}/{self.seed}/{index}",
            "question": problem.question,
            "answer": problem.answer,
            "verifier": self.task,
            "solution": problem.solution,
        }

    def _item_index(self, index: int, attempt: int) -> int:
        text = f"{self.task}/{self.seed}/{self.split}/{index}/{attempt}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# --- file sources ---------------------------------------------------------------------------------------------


class _LogicFileSource:
    """Examples built from the rows of one or more local files (parquet / JSONL), in file order.

    Each ``path`` may also be ``hf://NAME`` or a dataset folder, read as by ``LocalFileSource`` (``split`` and
    ``config_name`` then select the part of each dataset).
    """

    columns: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        limit: int | None = None,
        cache_dir: str | Path | None = None,
        split: str | None = None,
        config_name: str | None = None,
    ) -> None:
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        self.paths = [data_location(p) for p in paths]
        self.examples: list[dict[str, Any]] = []
        for file in self.paths:
            # _load_rows fails with the expected path and the data-root setting when the file is missing.
            prefix = row_id_prefix(file, split)
            for row_index, row in enumerate(_load_rows(file, self.columns, cache_dir, split, config_name)):
                if limit is not None and len(self.examples) >= limit:
                    return
                try:
                    example = self._example(row)
                except (KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"{file}: row {row_index}: {type(error).__name__}: {error}") from None
                self.examples.append({"id": f"{prefix}/{row_index}", **example})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.examples[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({[str(p) for p in self.paths]}, rows={len(self)})"

    def _example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class CountdownFileSource(_LogicFileSource):
    """Countdown rows with ``nums`` (3-4 integers) and ``target`` (TinyZero's files); no reference solution."""

    columns = ("nums", "target")

    def _example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        numbers, target = [int(n) for n in row["nums"]], int(row["target"])
        return {
            "question": countdown_question(numbers, target),
            "answer": countdown_answer(numbers, target),
            "verifier": "countdown",
            "solution": "",
        }


class KnightsKnavesFileSource(_LogicFileSource):
    """Knights-and-Knaves rows with ``quiz``, ``names`` and ``solution`` (True = knight; Logic-RL's files)."""

    columns = ("quiz", "names", "solution")

    def _example(self, row: Mapping[str, Any]) -> dict[str, Any]:
        names, knights = [str(n) for n in row["names"]], [bool(k) for k in row["solution"]]
        return {
            "question": str(row["quiz"]).strip(),
            "answer": knights_knaves_answer(names, knights),
            "verifier": "knights_knaves",
            "solution": knights_knaves_solution_text(names, knights),
        }


def _plain(value: Any) -> Any:
    """Nested tuples/lists of numpy scalars as plain Python lists of ints/strs/bools (stable JSON keys)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar
    return value
