"""Fault injection for the chaos test (``scripts/chaos.py``): stop the process at a named moment so it can be killed.

``SIMKO_PAUSE_AT=checkpoint.written@3`` makes the 3rd pass through ``pause_point("checkpoint.written")`` in this
process print ``SIMKO-PAUSE checkpoint.written 3`` to stderr and sleep (``SIMKO_PAUSE_S`` seconds, default an
hour), so that a driver watching stderr can SIGKILL it exactly there. Several points: comma-separated. Unset (the
normal case), a pause point costs one dictionary lookup.

Points: ``checkpoint.open`` (temporary file created, nothing written), ``checkpoint.written`` (complete, not yet
renamed), ``checkpoint.commit`` (a pending ``last.ckpt`` about to replace the old one), ``verify`` (a verifier call,
through :class:`PauseVerifier`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence

_counts: Counter[str] = Counter()


def _targets() -> dict[str, int | None]:
    spec = os.environ.get("SIMKO_PAUSE_AT", "")
    targets: dict[str, int | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        targets[name] = int(nth) if nth else None
    return targets


def pause_point(name: str) -> None:
    if "SIMKO_PAUSE_AT" not in os.environ:
        return
    targets = _targets()
    if name not in targets:
        return
    _counts[name] += 1
    nth = targets[name]
    if nth is None or _counts[name] == nth:
        print(f"SIMKO-PAUSE {name} {_counts[name]}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("SIMKO_PAUSE_S", "3600")))


class PauseVerifier:
    """Wraps a verifier (``score(completions, answers)``) with a ``verify`` pause point before each batched call;
    everything else (``num_timeouts``, ``num_errors``, ``start``, ``close``, ...) is the wrapped verifier's."""

    def __init__(self, verifier) -> None:
        self.inner = verifier

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        pause_point("verify")
        return self.inner.score(completions, answers)

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def start_a_child_and_hang(seconds: str, then: str = "hang") -> float:
    """A misbehaving check for the tests: start ``sleep <seconds>``, then hang (``then="hang"``) or die at once
    (``"die"``). Its child must not outlive it (``simko.rewards.pool``)."""
    subprocess.Popen(["sleep", seconds])
    if then == "die":
        os._exit(1)
    time.sleep(3600)
    return 0.0


def busy_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """A check that keeps its worker busy for about a second inside one C call (no Python signal handler runs
    there): the chaos script's busy verifier pool (``scripts/chaos.py --ctrl-c``)."""
    sum(range(3 * 10**7))
    return [0.0] * len(completions)
