"""Exact 0.0/1.0 verifiers for logic tasks: ``countdown``, ``knights_knaves`` and ``mini_sudoku``.

Each example's ``answer`` is a JSON string describing the problem's gold (the verifier API passes one string per
completion), written by the ``*_answer`` functions below, which the data sources call, and read back here:

* countdown:      ``{"numbers": [44, 19, 35], "target": 98}``; any expression that uses every number exactly once
  with ``+ - * /`` and parentheses and equals the target is right (there is no unique gold string);
* knights_knaves: ``{"roles": {"Emma": "knight", "Liam": "knave"}, "words": {"knight": "pioneer", ...}}``;
  ``words`` (optional) are the puzzle's own names for the two roles (reasoning-gym says "pioneer"/"laggard",
  "saint"/"sinner", ...), accepted next to "knight"/"knave";
* mini_sudoku:    ``{"puzzle": [[0, 0, 2, 0], ...]}`` (0 = empty cell); any completed grid that keeps the clues and
  has every row, column and box a permutation of 1..n is right (generated puzzles have one solution anyway).

Final answer in a completion (``simko.rewards.extract.final_answer_text``): the last ``<answer>...</answer>``, else
the last complete ``\\boxed{...}``, else the last non-empty line (countdown) or the last paragraph (the multi-line
answers of K&K and sudoku). Partial credit is never given: a solve for pass@k is a 1.0.

Safety: all checks are bounded string work plus, for Countdown, an AST-whitelist evaluator on at most
``MAX_EXPRESSION_CHARS`` characters in exact fractions (never ``eval``/sympy: reasoning-gym's countdown scorer ran
``parse_expr`` on model text, which executes code and hung on ``9**9**9**9``). So these verifiers run in the
trainer's process without a worker pool.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction

from simko.rewards.base import Verifier
from simko.rewards.extract import final_answer_text
from simko.rewards.registry import register_verifier

# Longest Countdown expression that is parsed at all: 6 two-digit numbers with operators, spaces and a few levels
# of parentheses fit in ~60 characters; the cap keeps ast.parse and the evaluator trivially cheap.
MAX_EXPRESSION_CHARS = 200

_EXPRESSION_CHARS = re.compile(r"[0-9\s+\-*/()]+")
# Symbols models write for the operations and parentheses (LaTeX in a \boxed{}, Unicode), mapped to the ASCII
# ones the evaluator reads.
_SYMBOL_SPELLINGS = {
    "\\times": "*",
    "\\cdot": "*",
    "\\div": "/",
    "\\left(": "(",
    "\\right)": ")",
    "×": "*",
    "·": "*",
    "÷": "/",
    "−": "-",
    "–": "-",
}
_BINARY_OPERATIONS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # Fraction / Fraction: exact; raises ZeroDivisionError on 0
}


class _ExactLogicVerifier(Verifier):
    """In-process 0.0/1.0 scoring through ``is_correct(completion, answer)``.

    A wrong or malformed *completion* is a plain 0.0. An exception (a malformed gold, a non-string item) is a 0.0
    counted in ``num_errors``, so a bad row shows up in the counters instead of stopping the run.
    """

    def _score(self, completions: list[str], answers: list[str]) -> list[float]:
        scores = []
        for completion, answer in zip(completions, answers):
            try:
                scores.append(1.0 if self.is_correct(completion, answer) else 0.0)
            except Exception as error:  # noqa: BLE001 - see the class docstring
                scores.append(self._failed("error", f"{type(error).__name__}: {error}"))
        return scores

    multiline = True  # the final answer is the last paragraph (else the last line) when there is no tag or box

    def final_answer(self, completion: str) -> str:
        return final_answer_text(completion, multiline=self.multiline)

    def is_correct(self, completion: str, answer: str) -> bool:
        raise NotImplementedError


# --- Countdown ----------------------------------------------------------------------------------------------


def countdown_answer(numbers: Sequence[int], target: int) -> str:
    """The gold ``answer`` string of a Countdown problem."""
    return json.dumps({"numbers": [int(n) for n in numbers], "target": int(target)})


def parse_countdown_answer(answer: str) -> tuple[list[int], int]:
    gold = json.loads(answer)
    numbers, target = gold["numbers"], gold["target"]
    if not numbers or not all(isinstance(n, int) for n in numbers) or not isinstance(target, int):
        raise ValueError(f"countdown gold needs integer numbers and target, got {answer!r:.200}")
    return numbers, target


def countdown_question(numbers: Sequence[int], target: int) -> str:
    """The problem statement shared by the procedural and the file Countdown sources."""
    listed = ", ".join(str(int(n)) for n in numbers)
    return (
        f"Using the numbers [{listed}], create an expression that equals {int(target)}. "
        "You may use +, -, * and / with parentheses, and must use each number exactly once."
    )


def is_countdown_solution(expression: str, numbers: Sequence[int], target: int) -> bool:
    """True if ``expression`` uses each of ``numbers`` exactly once and equals ``target`` exactly.

    Accepted: integer literals, binary ``+ - * /``, unary minus and parentheses; a trailing ``= target`` is
    allowed. Everything else (names, calls, ``**``, ``//``, floats, ...) is rejected before anything is computed.
    """
    expression = expression.strip().strip("$").strip().removesuffix(".")
    for spelling, symbol in _SYMBOL_SPELLINGS.items():
        expression = expression.replace(spelling, symbol)
    if "=" in expression:
        left, _, right = expression.partition("=")
        if right.strip() != str(target):  # "expr = 97" for target 98 claims a wrong result
            return False
        expression = left
    if len(expression) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(expression):
        return False
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    literals = _whitelisted_literals(tree.body)
    if literals is None or sorted(literals) != sorted(int(n) for n in numbers):
        return False
    try:
        return _evaluate(tree.body) == target
    except ZeroDivisionError:
        return False


def _whitelisted_literals(node: ast.AST) -> list[int] | None:
    """The integer literals of an arithmetic AST, or None if any node is outside the whitelist."""
    if isinstance(node, ast.Constant):
        return [node.value] if type(node.value) is int else None  # bool is an int subclass: excluded
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _whitelisted_literals(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATIONS:
        left, right = _whitelisted_literals(node.left), _whitelisted_literals(node.right)
        return None if left is None or right is None else left + right
    return None


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of a whitelisted AST (see ``_whitelisted_literals``)."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand)
    return _BINARY_OPERATIONS[type(node.op)](_evaluate(node.left), _evaluate(node.right))


@register_verifier("countdown")
class CountdownVerifier(_ExactLogicVerifier):
    """1.0 if the final answer is an expression reaching the target with each given number exactly once."""

    name = "countdown"
    multiline = False

    def is_correct(self, completion: str, answer: str) -> bool:
        numbers, target = parse_countdown_answer(answer)
        return is_countdown_solution(self.final_answer(completion), numbers, target)


# --- Knights and Knaves -------------------------------------------------------------------------------------

ROLES = ("knight", "knave")


def knights_knaves_answer(names: Sequence[str], knights: Sequence[bool], words: tuple[str, str] = ROLES) -> str:
    """The gold ``answer`` string: each person's role (``knights[i]`` True = knight = truth-teller).

    ``words``: the puzzle's own names for (knight, knave), stored only when they differ from the defaults.
    """
    if len(names) != len(knights):
        raise ValueError(f"{len(names)} names but {len(knights)} roles")
    gold: dict = {"roles": {str(name): ROLES[0] if knight else ROLES[1] for name, knight in zip(names, knights)}}
    if tuple(words) != ROLES:
        gold["words"] = {ROLES[0]: str(words[0]), ROLES[1]: str(words[1])}
    return json.dumps(gold)


def knights_knaves_solution_text(names: Sequence[str], knights: Sequence[bool], words: tuple[str, str] = ROLES) -> str:
    """A right answer in the prompted format: ``(1) Emma is a knight\\n(2) Liam is a knave``."""
    return "\n".join(
        f"({i}) {name} is {_with_article(words[0] if knight else words[1])}"
        for i, (name, knight) in enumerate(zip(names, knights), start=1)
    )


def parse_role_claims(text: str, names: Sequence[str], words: dict[str, str]) -> dict[str, str] | None:
    """Each person's claimed role (``knight``/``knave``) in ``text``, or None if anyone is missing or ambiguous.

    A claim is ``Name is a knight``, ``Name: knave``, ``Name - knight`` (the puzzle's own words count too;
    case-insensitive). ``Name is not a knight`` is not a claim. A person claimed with both roles counts as
    unparseable, so hedging ("Emma is a knight ... Emma is a knave") never scores.
    """
    word_to_role = {role: role for role in ROLES} | {word.lower(): role for role, word in words.items()}
    alternatives = "|".join(sorted(map(re.escape, word_to_role), key=len, reverse=True))
    claims = {}
    for name in names:
        # [^\S\n]: spaces within one line: a name ending one line and a role word starting the next are no claim.
        # Each run of spaces belongs to exactly one part of the pattern, so a long run costs linear time (two
        # optional-space parts side by side were quadratic: 12 s on a name followed by 20k spaces).
        pattern = rf"\b{re.escape(name)}\b[^\S\n]*(?:(?:is\b|:|-|=)[^\S\n]*)?(?:an?[^\S\n]+)?({alternatives})s?\b"
        roles = {word_to_role[m.lower()] for m in re.findall(pattern, text, flags=re.IGNORECASE)}
        if len(roles) != 1:
            return None
        claims[name] = roles.pop()
    return claims


@register_verifier("knights_knaves")
class KnightsKnavesVerifier(_ExactLogicVerifier):
    """1.0 if the final answer gives every person's role and all of them are right."""

    name = "knights_knaves"

    def is_correct(self, completion: str, answer: str) -> bool:
        gold = json.loads(answer)
        roles: dict[str, str] = gold["roles"]
        if not roles or not set(roles.values()) <= set(ROLES):
            raise ValueError(f"knights_knaves gold needs roles in {ROLES}, got {answer!r:.200}")
        claims = parse_role_claims(self.final_answer(completion), list(roles), gold.get("words", {}))
        return claims == roles


def _with_article(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


# --- Mini Sudoku --------------------------------------------------------------------------------------------


def sudoku_answer(puzzle: Sequence[Sequence[int]]) -> str:
    """The gold ``answer`` string: the puzzle grid, 0 for an empty cell."""
    return json.dumps({"puzzle": [[int(cell) for cell in row] for row in puzzle]})


def parse_grid(text: str, size: int) -> list[list[int]] | None:
    """The ``size`` x ``size`` grid written in ``text`` (its digits, row by row, any separators), or None."""
    digits = re.findall(r"[0-9]", text)
    if len(digits) != size * size:
        return None
    return [[int(d) for d in digits[row * size : (row + 1) * size]] for row in range(size)]


def is_sudoku_solution(grid: list[list[int]], puzzle: list[list[int]]) -> bool:
    """True if ``grid`` keeps every clue of ``puzzle`` and each row, column and box holds 1..n once."""
    size = len(puzzle)
    box = math.isqrt(size)
    if box * box != size or len(grid) != size or any(len(row) != size for row in grid):
        return False
    if any(clue and clue != cell for clue_row, row in zip(puzzle, grid) for clue, cell in zip(clue_row, row)):
        return False
    full = set(range(1, size + 1))
    rows = [set(row) for row in grid]
    columns = [{grid[r][c] for r in range(size)} for c in range(size)]
    boxes = [
        {grid[r][c] for r in range(top, top + box) for c in range(left, left + box)}
        for top in range(0, size, box)
        for left in range(0, size, box)
    ]
    return all(group == full for group in rows + columns + boxes)


@register_verifier("mini_sudoku")
class MiniSudokuVerifier(_ExactLogicVerifier):
    """1.0 if the final answer is a valid completed grid that keeps the puzzle's clues."""

    name = "mini_sudoku"

    def is_correct(self, completion: str, answer: str) -> bool:
        puzzle = json.loads(answer)["puzzle"]
        grid = parse_grid(self.final_answer(completion), len(puzzle))
        return grid is not None and is_sudoku_solution(grid, puzzle)
