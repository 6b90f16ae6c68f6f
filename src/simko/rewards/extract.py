"""Final answers in free model text: the one place that finds them (verifiers, eval's maj@n, the data sources).

- ``extract_boxed``: the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces nested.
- ``last_answer_tag``: the content of the last complete ``<answer>...</answer>``.
- ``extract_final_answer``: the rule of the exact-match verifier (boxed, else ``<answer>`` tag, else
  ``answer: X``, else the whole text).
- ``final_answer_text``: the rule of the logic verifiers (tag, else boxed, else the last line / paragraph).

Which rule a verifier uses is its ``Verifier.final_answer(completion)``; ``simko.rewards.final_answer(completion,
verifier_name)`` asks the verifier of that name.

These run in the trainer's process, outside any timeout, on whatever a model wrote. So every rule reads only the
last ``FINAL_ANSWER_WINDOW`` characters, and each is a single linear pass over them (no regex that backtracks
over the text, no rescan per candidate).
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Only the end of a completion holds its final answer, so every rule reads its last FINAL_ANSWER_WINDOW characters.
# 16384 characters are about 4096 tokens at ~4 characters per token, the longest response of the paper's protocol
# (max_new_tokens=4096), so a normal completion is read whole; a degenerate one (a megabyte of unclosed
# `\boxed{`) costs at most this much linear work: the slowest verifier took 26 ms on 100k-character adversarial
# completions on the busy 2-core machine (test_rewards.py::test_adversarial_completions_are_scored_in_linear_time).
FINAL_ANSWER_WINDOW = 16384

# One token per box opener, escaped pair (\{ \} \\ ...: set braces and LaTeX line breaks never nest) or brace.
_BOX_TOKEN = re.compile(r"(?P<box>\\(?:boxed|fbox)\s*\{)|(?P<escape>\\.)|(?P<brace>[{}])", re.S)
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_LINE = re.compile(r"\banswer\s*:\s*(.*)", re.I)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def answer_window(text: str) -> str:
    """The part of ``text`` that can hold its final answer: its last ``FINAL_ANSWER_WINDOW`` characters."""
    return text[-FINAL_ANSWER_WINDOW:]


def extract_boxed(text: str) -> str | None:
    """Content (stripped) of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); escaped braces (``\\{1,2\\}``) do not count. A box
    that never closes (a completion cut off mid-answer) is skipped, so an earlier complete box may be returned.
    "Last" is the box opened last: in ``\\boxed{a \\boxed{b}}`` that is ``b``.
    """
    text = answer_window(text)
    open_braces: list[int] = []  # per open brace: where its content starts if it opened a box, else -1
    last: tuple[int, int] | None = None  # (start, end) of the content of the complete box opened last
    for token in _BOX_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "box":
            open_braces.append(token.end())
        elif kind == "brace" and token.group() == "{":
            open_braces.append(-1)
        elif kind == "brace" and open_braces:  # "}" (a "}" that closes nothing is ignored)
            start = open_braces.pop()
            if start >= 0 and (last is None or start > last[0]):
                last = (start, token.start())
    return None if last is None else text[last[0] : last[1]].strip()


def has_box_command(text: str) -> bool:
    """True if the answer window of ``text`` mentions ``\\boxed``/``\\fbox`` at all, closed or not."""
    return _BOX_COMMAND.search(answer_window(text)) is not None


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` (case-insensitive), or None.

    Two reverse searches instead of a lazy regex: linear even on a text full of unclosed ``<answer>`` tags.
    """
    text = answer_window(text)
    lowered = text.lower()
    end = lowered.rfind("</answer>")
    if end < 0:
        return None
    start = lowered.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def extract_final_answer(text: str) -> str:
    """The answer the exact-match verifier compares, by the first rule that applies:

    1. the last complete ``\\boxed{...}``;
    2. the last ``<answer>...</answer>`` (the tag format of reasoning-gym / logic-task prompts);
    3. the rest of the line after the last ``answer:`` (case-insensitive, so ``Final Answer: 42`` works);
    4. the whole completion (its answer window).
    """
    text = answer_window(text)
    found = _first_found(text, extract_boxed, last_answer_tag, _last_answer_line)
    return found if found is not None else text.strip()


def final_answer_text(completion: str, multiline: bool = False) -> str:
    """The answer the logic verifiers read, by the first rule that applies:

    1. the last ``<answer>...</answer>``;
    2. the last complete ``\\boxed{...}``;
    3. the last non-empty line, or with ``multiline`` the last paragraph (the multi-line answers of
       Knights-and-Knaves and sudoku grids).
    """
    completion = answer_window(completion)
    found = _first_found(completion, last_answer_tag, extract_boxed)
    if found is not None:
        return found
    text = completion.strip()
    if multiline:
        return _PARAGRAPH_BREAK.split(text)[-1].strip()
    return text.rsplit("\n", 1)[-1].strip()


def _last_answer_line(text: str) -> str | None:
    lines = _ANSWER_LINE.findall(text)
    return lines[-1].strip() if lines else None


def _first_found(text: str, *rules: Callable[[str], str | None]) -> str | None:
    """What the first rule that finds something in ``text`` returns (None if none does)."""
    for rule in rules:
        found = rule(text)
        if found is not None:
            return found
    return None
