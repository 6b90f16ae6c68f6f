"""Prompt sources read from local files (JSONL, JSON list, parquet).

A source turns every row of a file into an example, the plain dict the trainer consumes::

    {"id": str, "question": str, "answer": str, "verifier": str}

The whole file is read and checked once, at construction, so a bad path or a malformed row fails at
start-up with one readable message instead of hours into a run.

Two layouts are common:

* flat rows (GSM8K, MATH-500 JSONL): ``question_field`` / ``answer_field`` name columns directly;
* verl parquet (the official SimKO files): ``preset="verl"`` reads the question from the chat messages
  in ``prompt`` and the answer from ``reward_model.ground_truth`` (see ``_VERL_PRESET``).

Field names may be dotted paths into nested values (``reward_model.ground_truth``, ``final_answer.0``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simko.rewards.extract import extract_boxed

log = logging.getLogger(__name__)

ANSWER_FORMATS = ("plain", "gsm8k", "boxed_solution")

DATA_ROOT_HINT = (
    "The data root is configured by `paths.data_dir` (environment variable SIMKO_DATA_DIR); point it at "
    "a copy of the shared data folder, whose SOURCES.md files say where each file comes from."
)

# Known instruction wrappers baked into some prompt files. The trainer adds its own instruction through
# `prompt_template`, so a question keeps only the problem text; otherwise the model would read two
# (possibly contradicting) instructions. Inspected in the official SimKO parquet files:
#   * gsm8k_level1/test.parquet (MATH-500, SimpleRL-Zoo format) wraps every problem as
#     "Question:\n{problem}\nAnswer:\nLet's think step by step.\n" (its extra_info.question is the bare
#     problem, and the stripped text equals it for all 500 rows);
#   * math/, gsm8k_level1/train, amc23, aime2025 hold the bare problem (nothing to strip).
# The trailing instructions below are the common "boxed" suffixes used by verl-style datasets.
_WRAPPED_QUESTION = re.compile(r"\AQuestion:\n(?P<problem>.*)\nAnswer:\nLet's think step by step\.\n?\Z", re.S)
_INSTRUCTION_SUFFIXES = (
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let's think step by step and output the final answer within \\boxed{}.",
)

# verl layout: prompt = [{"role": "user", "content": ...}], reward_model.ground_truth = answer string, or a
# dict {"question", "target"[, "solution"]} (MATH, AMC23, AIME25).
_VERL_PRESET = {"question_field": "prompt", "answer_field": "reward_model.ground_truth"}
_PLAIN_PRESET = {"question_field": "question", "answer_field": "answer"}
PRESETS = {"verl": _VERL_PRESET, "plain": _PLAIN_PRESET}


class LocalFileSource:
    """Examples read from one local JSONL / JSON-list / parquet file, in file order.

    Args:
        path: the file (``.jsonl``/``.json`` or ``.parquet``).
        question_field, answer_field: dotted paths to the question and the gold answer; default to the
            preset's (``question``/``answer`` for flat files).
        id_field: dotted path to a row id; default ``"{folder}/{file stem}/{row index}"``.
        answer_format: how to read the gold out of the answer field: ``plain`` (as is), ``gsm8k`` (text
            after the last ``####``, commas removed), ``boxed_solution`` (content of the last ``\\boxed{}``
            of a worked solution).
        verifier: registered verifier name stored in every example (``math`` for math data).
        limit: keep only the first ``limit`` usable rows (quick runs, tests).
        preset: ``"verl"`` for the verl parquet layout, ``"plain"``/None for flat rows.
        cache_dir: HF ``datasets`` cache folder (point it inside the run's logs so nothing lands in
            ``~/.cache``); None = the datasets default.
    """

    def __init__(
        self,
        path: str | Path,
        question_field: str | None = None,
        answer_field: str | None = None,
        id_field: str | None = None,
        answer_format: str = "plain",
        verifier: str = "math",
        limit: int | None = None,
        preset: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)} or None.")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"Unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}.")
        defaults = PRESETS[preset or "plain"]
        # abspath: absolute and without '..', so error messages and ids name the file plainly.
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.question_field = question_field or defaults["question_field"]
        self.answer_field = answer_field or defaults["answer_field"]
        self.id_field = id_field
        self.answer_format = answer_format
        self.verifier = verifier
        self.examples = self._read(limit, cache_dir)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, str]:
        # A copy, so a caller that adds fields (the rendered prompt) never alters the source.
        return dict(self.examples[index])

    def __repr__(self) -> str:
        return f"LocalFileSource({str(self.path)!r}, rows={len(self)})"

    # --- reading -----------------------------------------------------------------------------------

    def _read(self, limit: int | None, cache_dir: str | Path | None) -> list[dict[str, str]]:
        rows = _load_rows(self.path, [self.question_field, self.answer_field, self.id_field], cache_dir)
        examples: list[dict[str, str]] = []
        empty_answers: list[int] = []
        for index, row in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            try:
                example = self._example(row, index)
            except ValueError as error:
                raise ValueError(f"{self.path}: row {index}: {error}") from None
            if not example["answer"]:
                # e.g. 2 of the 7,500 official MATH train rows have an empty target and an empty
                # \boxed{}: with no gold there is no reward signal, so the row is dropped (not an error).
                empty_answers.append(index)
                continue
            examples.append(example)
        if empty_answers:
            log.warning(
                "%s: dropped %d row(s) whose gold answer is empty (rows %s)",
                self.path,
                len(empty_answers),
                empty_answers[:10],
            )
        if not examples:
            raise ValueError(f"{self.path}: no usable rows (every answer in {self.answer_field!r} was empty).")
        return examples

    def _example(self, row: Mapping[str, Any], index: int) -> dict[str, str]:
        question = question_text(self._required(row, self.question_field))
        answer = self._gold_answer(self._required(row, self.answer_field))
        if self.id_field is None:
            example_id = f"{self.path.parent.name}/{self.path.stem}/{index}"
        else:
            example_id = scalar_text(self._required(row, self.id_field))
        return {"id": example_id, "question": question, "answer": answer, "verifier": self.verifier}

    def _required(self, row: Mapping[str, Any], field: str) -> Any:
        value = get_path(row, field)
        if value is None:
            raise ValueError(f"has no value for field {field!r}")
        return value

    def _gold_answer(self, value: Any) -> str:
        if isinstance(value, Mapping):
            value = _answer_from_ground_truth_dict(value, self.answer_field)
        text = scalar_text(value)
        if self.answer_format == "gsm8k":
            return gsm8k_final_answer(text)
        if self.answer_format == "boxed_solution":
            return extract_boxed(text) or ""
        return text.strip()


def _load_rows(path: Path, fields: Sequence[str | None], cache_dir: str | Path | None) -> list[dict[str, Any]]:
    """All rows of the file as Python dicts, restricted to the top-level columns the fields use."""
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}. {DATA_ROOT_HINT}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        builder = "parquet"
    elif suffix in (".jsonl", ".json"):
        builder = "json"  # the json builder reads both JSON Lines and a top-level JSON list
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet.")

    import datasets  # imported here: heavy, and only file sources need it

    dataset = datasets.load_dataset(
        builder,
        data_files=str(path),
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    top_level = {field.split(".", 1)[0] for field in fields if field}
    missing = sorted(top_level - set(dataset.column_names))
    if missing:
        # A whole column is absent: report it for the first row, as a row-level error would.
        raise ValueError(f"{path}: row 0 has no field {missing[0]!r} (columns: {sorted(dataset.column_names)}).")
    return dataset.select_columns(sorted(top_level)).to_list()


# --- value helpers (pure functions, unit-tested) ----------------------------------------------------


def get_path(value: Any, dotted: str) -> Any:
    """Follow a dotted path through dicts and lists (``a.b.0``); None where any step is missing."""
    for key in dotted.split("."):
        if isinstance(value, Mapping):
            value = value.get(key)
        elif isinstance(value, Sequence) and not isinstance(value, str) and key.lstrip("-").isdigit():
            position = int(key)
            value = value[position] if -len(value) <= position < len(value) else None
        else:
            return None
        if value is None:
            return None
    return value


def question_text(value: Any) -> str:
    """The problem text of a question field: a string, or chat messages (last user message wins)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        user_messages = [m for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if not user_messages:
            raise ValueError(f"chat-message question has no user message: {value!r:.200}")
        value = user_messages[-1].get("content") or ""
    return strip_instruction(scalar_text(value))


def strip_instruction(question: str) -> str:
    """Remove a known instruction wrapper/suffix, keeping only the problem (see _WRAPPED_QUESTION)."""
    wrapped = _WRAPPED_QUESTION.match(question)
    if wrapped:
        question = wrapped.group("problem")
    question = question.strip()
    for suffix in _INSTRUCTION_SUFFIXES:
        if question.endswith(suffix):
            question = question[: -len(suffix)].rstrip()
    return question


def _answer_from_ground_truth_dict(ground_truth: Mapping[str, Any], field: str) -> Any:
    """verl ground truth dicts carry the answer as ``target`` (MATH, AMC23, AIME25).

    When ``target`` is empty (4 MATH train rows) fall back to the last ``\\boxed{}`` of ``solution``,
    which is how the target was made in the first place (this recovers 2 of the 4).
    """
    for key in ("target", "answer"):
        if ground_truth.get(key) not in (None, ""):
            return ground_truth[key]
    if ground_truth.get("solution"):
        return extract_boxed(str(ground_truth["solution"])) or ""
    if "target" in ground_truth or "answer" in ground_truth:
        return ""  # present but empty: dropped by the caller
    raise ValueError(f"field {field!r} is a dict without 'target', 'answer' or 'solution': {sorted(ground_truth)}")


def scalar_text(value: Any) -> str:
    """A scalar as text; integral floats lose their ``.0`` (AMC23 stores 27.0 for the answer 27)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"expected a string or a number, got {type(value).__name__}: {value!r:.200}")


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K gold: the text after the last ``####``, thousands separators removed."""
    if "####" not in solution:
        return ""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")
