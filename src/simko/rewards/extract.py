"""Find the final answer in a model's free-text completion.

- ``extract_boxed``: the content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces nested.
- ``extract_final_answer``: what the exact-match verifier compares (boxed, else ``<answer>`` tag, else
  ``answer: X``, else the whole text).
"""

from __future__ import annotations

import re

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# An escaped pair (\{ \} \\ ...) is one token, so set braces and LaTeX line breaks never count as nesting.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_LINE = re.compile(r"\banswer\s*:\s*(.*)", re.I)


def extract_boxed(text: str) -> str | None:
    """Content (stripped) of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``); escaped braces (``\\{1,2\\}``) do not count. A box
    that never closes (a completion cut off mid-answer) is skipped, so an earlier complete box may be returned.
    """
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is not None:
            return text[match.end() : end].strip()
    return None


def has_box_command(text: str) -> bool:
    """True if ``text`` mentions ``\\boxed``/``\\fbox`` at all, closed or not."""
    return _BOX_COMMAND.search(text) is not None


def extract_final_answer(text: str) -> str:
    """The answer the exact-match verifier compares, by the first rule that applies:

    1. the last complete ``\\boxed{...}``;
    2. the last ``<answer>...</answer>`` (the tag format of reasoning-gym / logic-task prompts);
    3. the rest of the line after the last ``answer:`` (case-insensitive, so ``Final Answer: 42`` works);
    4. the whole completion.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    return text.strip()


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the brace opened just before ``start``, or None if it never closes."""
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, start):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None
