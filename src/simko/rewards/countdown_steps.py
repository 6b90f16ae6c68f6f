"""``countdown_steps``: Countdown written as a chain of steps, one operation per line, and what a solution *is*.

A problem is some numbers and a target (the gold ``answer`` is ``simko.rewards.logic.countdown_answer``'s JSON,
``{"numbers": [3, 5, 7, 9], "target": 24}``). A completion is a chain of lines ``a<op>b=c``::

    9-7=2
    5*3=15
    15+2=17

Rules (the verifier and the solver in ``simko.data.countdown_steps`` implement the same ones):

* ``op`` is one of ``+ - * /``; ``a``, ``b`` and ``c`` are decimal integers and ``c`` must be a POSITIVE
  integer equal to ``a op b`` exactly (so no negative, zero or fractional intermediate results);
* ``a`` and ``b`` are taken from the pool: the given numbers and the results of earlier lines, each usable once
  (a line consumes its operands and adds its result);
* the chain uses every given number: after the last line the pool holds exactly one value, the target.

The arithmetic of each line is decided by the AST-whitelist evaluator of the ``countdown`` verifier
(``simko.rewards.logic.is_countdown_solution``, exact fractions); this module only splits lines with a regular
expression and keeps the pool. Nothing in a completion is ever executed, and the work is bounded: at most
``MAX_COMPLETION_CHARS`` characters are read and every number has at most ``MAX_DIGITS`` digits.

**Distinct solutions.** Two chains are the same solution when they make the same multiset of steps, with the
operands of ``+`` and ``*`` in either order: ``5*3=15`` and ``3*5=15`` are one step, and chains that only
reorder independent lines are one solution. ``solution_key`` maps a correct chain to that canonical multiset;
the diversity metrics (``simko.metrics.diversity``) count distinct keys.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from simko.metrics.diversity import register_solution_key
from simko.rewards.logic import _ExactLogicVerifier, is_countdown_solution, parse_countdown_answer
from simko.rewards.registry import register_verifier

# A chain of 5 steps on 4-digit numbers fits in ~75 characters; longer completions are read only this far.
MAX_COMPLETION_CHARS = 400
MAX_DIGITS = 9
OPERATIONS = ("+", "-", "*", "/")
COMMUTATIVE = ("+", "*")

# [0-9], not \d: \d also matches the other Unicode digits, which int() would read.
_LINE = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}})([-+*/])([0-9]{{1,{MAX_DIGITS}}})=([0-9]{{1,{MAX_DIGITS}}})")


@dataclass(frozen=True, order=True)
class Step:
    """One line ``a<op>b=result``."""

    a: int
    op: str
    b: int
    result: int

    def text(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"

    def canonical(self) -> Step:
        """The same step with the operands of ``+`` and ``*`` larger first (``-`` and ``/`` have one order)."""
        if self.op in COMMUTATIVE and self.a < self.b:
            return Step(self.b, self.op, self.a, self.result)
        return self


def chain_text(steps: Iterable[Step]) -> str:
    return "\n".join(step.text() for step in steps)


def solution_key_of(steps: Iterable[Step]) -> str:
    """The canonical multiset of a chain's steps, as text (the canonical step texts, sorted, ``;``-joined)."""
    return ";".join(sorted(step.canonical().text() for step in steps))


def parse_chain(completion: str) -> list[Step] | None:
    """The steps of ``completion`` (non-empty lines, spaces ignored), or None if any line is not ``a<op>b=c`` with
    decimal integers written without leading zeros.

    Only the arithmetic claimed is read here; whether it is right is ``check_chain``'s business.
    """
    steps = []
    for line in completion[:MAX_COMPLETION_CHARS].split("\n"):
        line = line.replace(" ", "").strip()
        if not line:
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        a, op, b, result = match.groups()
        step = Step(int(a), op, int(b), int(result))
        if step.text() != line:  # leading zeros: the line must be what the evaluator will read
            return None
        steps.append(step)
    return steps or None


def check_chain(steps: Sequence[Step], numbers: Sequence[int], target: int) -> bool:
    """True if ``steps`` follow the rules of the module docstring for ``numbers`` and ``target``."""
    pool = Counter(int(n) for n in numbers)
    for step in steps:
        if step.result <= 0:
            return False
        # The evaluator of the `countdown` verifier on the line as written: literals exactly {a, b}, value exactly
        # `result` (exact fractions, so 7/2=3 is wrong).
        if not is_countdown_solution(step.text(), [step.a, step.b], step.result):
            return False
        pool[step.a] -= 1
        pool[step.b] -= 1
        if pool[step.a] < 0 or pool[step.b] < 0:
            return False
        pool[step.result] += 1
    return +pool == Counter({int(target): 1})


@register_verifier("countdown_steps")
class CountdownStepsVerifier(_ExactLogicVerifier):
    """1.0 if the completion is a chain of steps that uses every number once and ends at the target."""

    name = "countdown_steps"

    def is_correct(self, completion: str, answer: str) -> bool:
        numbers, target = parse_countdown_answer(answer)
        steps = parse_chain(completion)
        return steps is not None and check_chain(steps, numbers, target)


@register_solution_key("countdown_steps")
def solution_key(completion: str, answer: str) -> str | None:
    """The canonical solution of a completion (see the module docstring), or None when it is not a correct one."""
    numbers, target = parse_countdown_answer(answer)
    steps = parse_chain(completion)
    if steps is None or not check_chain(steps, numbers, target):
        return None
    return solution_key_of(steps)
