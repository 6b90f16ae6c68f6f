"""The train/held-out partition of a procedural problem space: a keyed hash of the problem, independent of seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any


def hash_unit(text: str, key: bytes) -> float:
    """A keyed 64-bit BLAKE2b hash of ``text`` (the problem, or its canonical key) as a number in [0, 1): the same
    on every rank, run and seed. Splits are intervals of it."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_split(text: str, key: bytes, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of all problems, ``"train"`` for the rest (:func:`hash_unit`)."""
    return "val" if hash_unit(text, key) < val_fraction else "train"


class DistinctDraws:
    """The distinct problems of a seeded draw sequence, in draw order, found once and extended as needed: a
    held-out split is its first N distinct problems. ``draw(i)`` returns (key, problem) for draw ``i``; a draw
    whose key was seen is skipped, and ``max_misses`` skips in a row mean the split has no more problems."""

    def __init__(self, draw: Callable[[int], tuple[str, Any]], max_misses: int, widen: str) -> None:
        self.draw, self.max_misses, self.widen = draw, max_misses, widen
        self.problems: list[Any] = []
        self._seen: set[str] = set()
        self._next_draw = 0

    def get(self, index: int, owner: Any) -> Any:
        """Problem ``index``; ``owner`` (the source, with its ``split``) names itself in the error."""
        misses = 0
        while len(self.problems) <= index:
            key, problem = self.draw(self._next_draw)
            self._next_draw += 1
            if key in self._seen:
                misses += 1
                if misses >= self.max_misses:
                    raise ValueError(
                        f"{owner!r}: asked for held-out problem {index}, but only {len(self.problems)} distinct "
                        f"{owner.split!r} problems turned up ({self.max_misses} draws in a row found nothing new). Ask "
                        f"for fewer (data.val_prompts, eval.limit) or widen the task ({self.widen})."
                    )
                continue
            misses = 0
            self._seen.add(key)
            self.problems.append(problem)
        return self.problems[index]
