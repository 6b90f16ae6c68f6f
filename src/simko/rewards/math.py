"""MathVerifier: 1.0 if the completion's final answer equals the gold answer mathematically (math-verify).

Final answer: the content of the last complete ``\\boxed{...}`` (``extract_boxed``). Without any box, we fall back
to math-verify's own extraction (``LatexExtractionConfig`` + ``ExprExtractionConfig``: the last LaTeX block or plain
number/expression) over the completion's answer window (its last ``FINAL_ANSWER_WINDOW`` characters), because small
models often answer without a box and a strict format rule would give them almost no signal; ``require_boxed=True``
turns the fallback off. The fallback credits only a final value (``is_final_value``): math-verify's extraction of an
unboxed text is its last expression, and it decides equivalence symbolically, so a completion that restates the
question ("Evaluate $102^2 - 98^2$." for the gold 800, "Compute $\\dbinom{15}{3}$.") would otherwise score 1.0.
(The official SimKO code's fallback is the text after the last "the answer is", else the last number, compared
symbolically too: it credits "The answer is $\\dbinom{15}{3}$.".) A box that is opened but never closed (a
completion cut off mid-answer) scores 0.0 without a fallback. An empty box (``\\boxed{}``) is not a final answer:
small models copy the instruction's literal ``\\boxed{}`` and write their answer after it ("The answer is \\boxed{}
8."; SmolLM2-135M-Instruct on MATH Level 1: 1 to 2 % of its samples, a third to four fifths of its boxes), so empty
boxes are removed before the final answer is looked for.

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
from collections import Counter
from decimal import Decimal

from simko.rewards.base import Verifier, check_timeouts
from simko.rewards.extract import answer_window, extract_boxed, has_box_command
from simko.rewards.pool import KillablePool
from simko.rewards.registry import register_verifier

# An empty \boxed{} / \fbox{} (whitespace inside at most): the instruction's placeholder, not an answer.
_EMPTY_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{\s*\}")
# An unsigned integer or decimal numeral.
_NUMERAL = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
# Functions and operators that a final value does not contain (unless the gold answer does): trigonometric and
# other named functions, binomials, floors/ceilings, sums, products, integrals, limits and factorials.
_OPERATION = re.compile(
    r"\\(?:arc)?(?:sin|cos|tan|cot|sec|csc)h?(?![A-Za-z])"
    r"|\\(?:log|ln|lg|exp|[dt]?binom|choose|lfloor|lceil|sum|prod|int|lim|gcd|lcm|max|min|operatorname)(?![A-Za-z])"
    r"|(?<!\\)!(?!=)"
)
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))", re.ASCII)
# A plain number as math-verify's extraction returns it: signed, decimal, thousands-separated, a percentage.
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*(?:\\?%)?|[-+]?\.\d+", re.ASCII)


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
    if pred is None and not is_final_value(pred_parsed, gold_parsed):
        return 0.0  # the fallback found an expression to evaluate (the question restated), not a value
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def is_final_value(pred_parsed: list, gold_parsed: list) -> bool:
    """True if the answer math-verify extracted without a box states a value, rather than an expression that
    evaluates to one. Both arguments are ``parse`` results, ``[sympy value, the text it was read from]``.

    The answer's numbers (as written, unsigned) must be those of the gold answer as written, or, for a number when
    the gold is written in simplest form, those of the answer's own simplest form (sympy's evaluation of it).
    ``102^2 - 98^2``, ``\\dbinom{15}{3}`` and ``\\frac{84}{144}`` are not values of 800, 455 and 7/12, nor are
    ``t^3 \\cdot t^4`` or ``(x+2)(x+5)`` values of the gold ``t^7`` or ``x^2+7x+10``; ``800``, ``2\\sqrt{5}``,
    ``0.5`` for the gold ``\\frac{1}{2}``, ``37.5\\%``, ``(1,2)`` and ``7x+x^2+10`` are. Of an equation (``... =
    800``) the right-hand side is the answer.

    Without this, a completion that restates the question ("Evaluate $102^2 - 98^2$.") is rewarded: math-verify
    extracts the question's own expression and finds it equal to the gold answer symbolically."""
    if not pred_parsed or not gold_parsed:
        return False
    # An answer sympy cannot read is its text alone (math-verify then compares the strings).
    (value, text), (gold_value, gold_text) = _right_side(pred_parsed), _right_side(gold_parsed)
    if _operations(text) - _operations(gold_text):
        return False  # a function or operation the gold does not have: \sin 0^\circ, \dbinom{15}{3}, 5!
    written = _numerals(text)
    if written == _numerals(gold_text):
        return True  # the gold answer's own form
    if value is None or gold_value is None:
        return False
    value, gold_value = _evaluated(value), _evaluated(gold_value)
    gold_numerals = _value_numerals(gold_value)
    if gold_numerals is not None and not gold_numerals - _numerals(gold_text) and written == gold_numerals:
        return True  # math-verify read part of the gold (12 of the base-5 numeral 12_5, -2 of "-2 or -12")
    if getattr(value, "free_symbols", True) or gold_numerals != _numerals(gold_text):
        return False  # an expression in another form than the gold's, or a gold in a form it asks for (12\frac35)
    return written == _value_numerals(value)


def _right_side(parsed: list) -> tuple:
    """A ``parse`` result as (value or None, text), of an equation its right-hand side (math-verify gives some
    equations as their right-hand side's value and the whole equation's text), of a percentage its number."""
    from sympy import Expr, Mul, Rational
    from sympy.core.relational import Relational

    value, text = (parsed[0], parsed[-1]) if len(parsed) == 2 else (None, str(parsed[-1]))
    if isinstance(value, Relational):
        value = value.rhs
    if isinstance(value, Mul) and all(isinstance(arg, Expr) for arg in value.args):  # 37.5\% is 37.5 * 1/100
        factors = [arg for arg in value.args if _evaluated(arg) != Rational(1, 100)]
        value = Mul(*factors) if len(factors) < len(value.args) else value
    return value, text.rsplit("=", 1)[-1]


def _evaluated(expr):
    """``expr`` rebuilt bottom-up with sympy's automatic evaluation (math-verify builds some of it unevaluated:
    ``102^2 - 98^2`` stays a sum of powers)."""
    from sympy import UnevaluatedExpr

    if isinstance(expr, UnevaluatedExpr):
        return _evaluated(expr.args[0])
    args = getattr(expr, "args", ())
    if not args:
        return expr
    try:
        return expr.func(*[_evaluated(arg) for arg in args])
    except Exception:  # a type that cannot be rebuilt from its args (a matrix): taken as written
        return expr


def _value_numerals(value) -> Counter | None:
    """The numbers of a sympy value as sympy writes it (None for an integer too long to write: 4300+ digits)."""
    try:
        return _numerals(str(value))
    except ValueError:
        return None


def _operations(text: str) -> set[str]:
    """The LaTeX functions and operators in ``text`` that make an expression to evaluate, not a value."""
    return set(_OPERATION.findall(text))


def _numerals(text: str) -> Counter:
    """The unsigned numbers written in ``text``, as a multiset of values (``2.50`` and ``2.5`` are one value)."""
    return Counter(Decimal(n).normalize() for n in _NUMERAL.findall(_THOUSANDS_SEPARATOR.sub("", text)))


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
