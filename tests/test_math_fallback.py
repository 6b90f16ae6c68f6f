"""The math verifier's unboxed fallback credits a final value the model wrote, never the question restated.

Without a box, math-verify extracts the last expression of the text and decides equivalence symbolically, so a
completion that restates the question ("Evaluate $102^2 - 98^2$.") used to score 1: 17 of the first 100 held-out
MATH Level 1 problems, and most of the reward SmolLM2-135M collected in training (its logged completions below).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import compose_config, shared_file
from simko.rewards import MathVerifier, build_verifier
from simko.rewards.logic import knights_knaves_answer

REPO_ROOT = Path(__file__).resolve().parents[1]
KK_GOLD = knights_knaves_answer(["Emma", "Liam"], [True, False])


@pytest.fixture(scope="module")
def math_verifier():
    v = MathVerifier(timeout_s=10.0, num_workers=2)
    yield v
    v.close()


# (completion, gold): questions of MATH and completions SmolLM2-135M-Instruct wrote in training, all restating
# the problem's own expression, which equals the gold answer. Each scored 1.0 before.
RESTATED = [
    ("Evaluate: $102^2 - 98^2$", "800"),
    ("Compute $\\dbinom{15}{3}$.", "455"),
    ("The answer to this question is $\\dbinom{15}{3}$.", "455"),
    ("Compute $\\dbinom{15}{3}$. \nThe answer is $\\dbinom{15}{3}$.", "455"),
    ("The answer is $501^2 - 499^2$.", "2000"),
    ("Evaluate $\\dfrac{7}{45^2 - 38^2}$.", "\\frac{1}{83}"),  # a fraction the question states
    ("Simplify $\\frac{84}{144}$.", "\\frac{7}{12}"),
    ("Evaluate $(\\sqrt[3]{13})^6$.", "169"),
    ("The value of $(9! \\cdot 5! \\cdot 2!) / (8! \\cdot 6!)$ is $(9! \\cdot 5! \\cdot 2!) / (8! \\cdot 6!)$.", "3"),
    ("The result is $t^3\\cdot t^4$. This is a combination of three arithmetic functions.", "t^7"),
    ("Expand the product ${(x+2)(x+5)}$.", "x^2+7x+10"),
    ("Factor $r^2+10r+25$.", "(r+5)^2"),
    ("Convert $\\frac{63}{5}$ to a mixed number.", "12\\frac{3}{5}"),
    ("Compute $\\sin 0^\\circ$.", "0"),
    ("Evaluate $\\log_21$.", "0"),
]

# (completion, gold): final values written without a box, right; each scores 1.0 before and after.
UNBOXED_VALUES = [
    ("The answer is 800.", "800"),
    ("So $102^2 - 98^2 = 800$.", "800"),  # an equation: its right-hand side is the answer
    ("The answer is \\[i^{14762} + i^{14763} + i^{14764} + i^{14765} = 0.\\]", "0"),
    ("The answer is $\\frac{7}{12}$.", "\\frac{7}{12}"),
    ("The answer is $-\\frac{7}{12}$.", "-\\frac{7}{12}"),
    ("so it is 0.5", "\\frac{1}{2}"),
    ("The probability is $\\frac{1}{2}$.", "0.5"),
    ("which can be expressed as 37.5% by hand.", "\\frac{3}{8}"),
    ("The answer is $10\\%$.", "10"),
    ("It is $2\\sqrt{5}$.", "2\\sqrt{5}"),
    ("The answer is $\\frac{\\sqrt{3}}{2}$.", "\\frac{\\sqrt{3}}{2}"),
    ("The answer is $(1,2)$.", "(1,2)"),
    ("The product is $7x + x^2 + 10$.", "x^2+7x+10"),
    ("It factors as $(r+5)^2$.", "(r+5)^2"),
    ("That is $12\\frac{3}{5}$.", "12\\frac{3}{5}"),
    ("The answer is $1,234$.", "1234"),
    ("The median is thus 15.", "15"),
    ("The answer is $\\begin{pmatrix}11\\44\\end{pmatrix}$.", "\\begin{pmatrix}11\\44\\end{pmatrix}"),
    ("The angle is $30^\\circ$.", "30"),
    ("The answer is $\\text{(C)}$.", "C"),
]


def test_restating_the_question_scores_zero(math_verifier):
    scores = math_verifier.score([c for c, _ in RESTATED], [g for _, g in RESTATED])
    assert scores == [0.0] * len(RESTATED), [c for (c, _), s in zip(RESTATED, scores) if s]
    assert math_verifier.num_timeouts == 0


def test_a_final_value_without_a_box_still_scores_one(math_verifier):
    scores = math_verifier.score([c for c, _ in UNBOXED_VALUES], [g for _, g in UNBOXED_VALUES])
    assert scores == [1.0] * len(UNBOXED_VALUES), [c for (c, _), s in zip(UNBOXED_VALUES, scores) if not s]
    wrong = [("The answer is 801.", "800"), ("It is $2\\sqrt{6}$.", "2\\sqrt{5}"), ("so $x = 3$", "4")]
    assert math_verifier.score([c for c, _ in wrong], [g for _, g in wrong]) == [0.0] * len(wrong)


def test_a_boxed_answer_keeps_its_score(math_verifier):
    """The rule is the fallback's: a box is the model's stated answer and is compared as before, expressions too."""
    cases = [
        ("The answer is $\\boxed{800}$.", "800", 1.0),
        ("\\boxed{102^2 - 98^2}", "800", 1.0),
        ("\\boxed{\\dbinom{15}{3}}", "455", 1.0),
        ("\\boxed{\\frac{84}{144}}", "\\frac{7}{12}", 1.0),
        ("\\boxed{x^2+7x+10}", "(x+2)(x+5)", 1.0),
        ("\\boxed{801}", "800", 0.0),
        ("Evaluate $102^2 - 98^2$. \\boxed{801}", "800", 0.0),
    ]
    assert math_verifier.score([c for c, _, _ in cases], [g for _, g, _ in cases]) == [s for _, _, s in cases]


def test_the_fallback_never_rewards_an_expression_copied_from_the_question(math_verifier, monkeypatch, datasets_cache):
    """Each of the first 100 held-out MATH Level 1 questions, as its own completion: only a question whose last
    number is its plain answer ("... how many minutes ... to travel 20 miles?", gold 20) may score, since such a
    number is a value as the model would write it. Before the fix 17 scored, 15 of them by an expression."""
    from hydra.utils import instantiate

    shared_file("simko-official/math/test.parquet")
    monkeypatch.setenv("PROJECT_ROOT", str(REPO_ROOT))
    cfg = compose_config(["data=math_level1", f"paths.cache_dir={datasets_cache}"])
    source = instantiate(cfg.data).val_source
    problems = [source[i] for i in range(100)]  # the problems the recipe's evaluation uses
    scores = math_verifier.score([p["question"] for p in problems], [p["answer"] for p in problems])
    rewarded = [p for p, s in zip(problems, scores) if s]
    for p in rewarded:
        assert p["answer"].isdigit() and p["answer"] in p["question"], p
    assert len(rewarded) <= 2, [p["question"] for p in rewarded]


def test_a_hanging_fallback_expression_is_killed(math_verifier, monkeypatch):
    """Evaluating what the fallback extracted (to tell a value from an expression) runs in the killable worker."""
    monkeypatch.setattr(math_verifier, "timeout_s", 1.0)
    timeouts = math_verifier.num_timeouts
    scores = math_verifier.score(["The answer is $9^{9^{9^{9^{9}}}}$.", "The answer is 4."], ["1", "4"])
    assert scores == [0.0, 1.0]
    assert math_verifier.num_timeouts == timeouts + 1


@pytest.mark.parametrize(
    ("name", "completion", "answer", "expected"),
    [
        ("exact", "Compute 12+30. The answer is 12+30", "42", 0.0),
        ("exact", "12+30 = \\boxed{42}", "42", 1.0),
        ("exact", "Answer: 42", "42", 1.0),
        ("countdown", "<answer>(3 + 5) * 2</answer>", '{"numbers": [3, 5, 2], "target": 16}', 1.0),
        ("countdown", "<answer>16</answer>", '{"numbers": [3, 5, 2], "target": 16}', 0.0),
        ("knights_knaves", "Emma: knight\nLiam: knave", KK_GOLD, 1.0),
        ("knights_knaves", "Emma: knight\nLiam: knight", KK_GOLD, 0.0),
    ],
)
def test_other_verifiers_are_unchanged(name, completion, answer, expected):
    """The fallback rule is the math verifier's alone: the toy's exact match and the logic verifiers score as
    before."""
    with build_verifier(name) as verifier:
        assert verifier(completion, answer) == expected
