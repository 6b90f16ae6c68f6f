"""Prompt sources read from local files (JSONL, JSON list, parquet) or from Hugging Face datasets.

A source turns every row of a file into an example, the plain dict the trainer consumes::

    {"id": str, "question": str, "answer": str, "verifier": str}

The whole file is read and checked once, at construction, so a bad path or a malformed row fails at
start-up with one readable message instead of hours into a run.

Two layouts are common:

* flat rows (GSM8K, MATH-500 JSONL): ``question_field`` / ``answer_field`` name columns directly;
* verl parquet (the official SimKO files): ``preset="verl"`` reads the question from the chat messages
  in ``prompt`` and the answer from ``reward_model.ground_truth`` (see ``_VERL_PRESET``).

Field names may be dotted paths into nested values (``reward_model.ground_truth``, ``final_answer.0``).

Where the rows come from (``path``):

* a file: ``.jsonl`` / ``.json`` (JSON Lines or one JSON list), read with Python's ``json`` so that numbers stay
  exact (integers of any size as ints, decimals as ``Decimal``: an answer ``36472996377170786403`` is that number,
  not the float64 ``36472996377170788352`` a JSON-to-Arrow reader makes of it); or ``.parquet``, read with
  ``datasets``' parquet builder. A malformed file fails naming the file and the line (bad JSON, a byte that is not
  UTF-8), or says that it is empty;
* ``hf://NAME``: ``datasets.load_dataset(NAME, config_name, split=split)``, i.e. a dataset on the Hugging Face Hub
  (``hf://openai/gsm8k`` with ``config_name=main``: downloaded into ``cache_dir`` when online, read from there
  when offline) or a local folder of data files that ``load_dataset`` reads (``hf:///data/my_dataset``);
* a local folder: one written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``), or a folder of data files (``load_dataset(folder)``, as ``hf://``).

Gold answers, questions and ids are text. A number becomes its exact decimal text (``27.0`` is ``27``, ``2.50`` is
``2.5``). What can't be an exact answer is refused naming the file and the line (JSON) or row: ``NaN`` and
``Infinity``, and a float (a parquet or Arrow double column) that is integral and beyond 2**53, whose digits the
file no longer holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from simko.rewards.extract import extract_boxed

log = logging.getLogger(__name__)

ANSWER_FORMATS = ("plain", "gsm8k", "boxed_solution")

HF_PREFIX = "hf://"
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
    """Examples read from one local JSONL / JSON-list / parquet file (or a dataset, see below), in file order.

    Args:
        path: the file (``.jsonl``/``.json`` or ``.parquet``); ``hf://NAME`` for ``datasets.load_dataset(NAME)``
            (a Hub dataset name, or a local folder of data files); or a folder written by ``save_to_disk``.
        question_field, answer_field: dotted paths to the question and the gold answer; default to the
            preset's (``question``/``answer`` for flat files).
        id_field: dotted path to a row id; default ``"{folder}/{file stem}/{row index}"``.
        answer_format: how to read the gold out of the answer field: ``plain`` (as is), ``gsm8k`` (text
            after the last ``####``, commas removed), ``boxed_solution`` (content of the last ``\\boxed{}``
            of a worked solution).
        verifier: registered verifier name stored in every example (``math`` for math data).
        limit: keep only the first ``limit`` usable rows (quick runs, tests).
        where: keep only the rows whose fields have these values, ``{dotted field: value or list of values}``
            (all must match; values compared as text), e.g. ``{level: Level 1}`` for the easiest MATH problems.
            Applied before ``limit``; ids keep the row's position in the whole file.
        preset: ``"verl"`` for the verl parquet layout, ``"plain"``/None for flat rows.
        cache_dir: HF ``datasets`` cache folder (point it inside the run's logs so nothing lands in
            ``~/.cache``); None = the datasets default.
        split: the split of a dataset (``hf://`` or a folder): ``train`` (default), ``test``, ``train[:100]``, ...
        config_name: the dataset's configuration (``load_dataset``'s ``name``; GSM8K's is ``main``).
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
        split: str | None = None,
        config_name: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)} or None.")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"Unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}.")
        defaults = PRESETS[preset or "plain"]
        self.path = data_location(path)
        self.split = split
        self.config_name = config_name
        self.question_field = question_field or defaults["question_field"]
        self.answer_field = answer_field or defaults["answer_field"]
        self.id_field = id_field
        self.answer_format = answer_format
        self.verifier = verifier
        self.where = {str(k): _allowed_values(k, v) for k, v in dict(where or {}).items()}
        self.examples = self._read(limit, cache_dir)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, str]:
        # A copy, so a caller that adds fields (the rendered prompt) never alters the source.
        return dict(self.examples[index])

    def __repr__(self) -> str:
        where = f", where={ {k: sorted(v) for k, v in self.where.items()} }" if self.where else ""
        return f"LocalFileSource({str(self.path)!r}, rows={len(self)}{where})"

    # --- reading -----------------------------------------------------------------------------------

    def _read(self, limit: int | None, cache_dir: str | Path | None) -> list[dict[str, str]]:
        fields = [self.question_field, self.answer_field, self.id_field, *self.where]
        rows = _load_rows(self.path, fields, cache_dir, split=self.split, config_name=self.config_name)
        id_prefix = row_id_prefix(self.path, self.split)
        examples: list[dict[str, str]] = []
        empty_answers: list[int] = []
        for index, row in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            if not self._selected(row):
                continue
            try:
                example = self._example(row, index, id_prefix)
            except ValueError as error:
                raise ValueError(f"{self.path}: {row_place(rows, index)}: {error}") from None
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
        if not examples and self.where:
            raise ValueError(f"{self.path}: no row matches where={ {k: sorted(v) for k, v in self.where.items()} }.")
        if not examples:
            raise ValueError(f"{self.path}: no usable rows (every answer in {self.answer_field!r} was empty).")
        return examples

    def _selected(self, row: Mapping[str, Any]) -> bool:
        """Whether ``row`` passes every ``where`` condition (a missing or non-scalar value fails it)."""
        for field, allowed in self.where.items():
            value = get_path(row, field)
            try:
                if value is None or scalar_text(value) not in allowed:
                    return False
            except ValueError:
                return False
        return True

    def _example(self, row: Mapping[str, Any], index: int, id_prefix: str) -> dict[str, str]:
        question = question_text(self._required(row, self.question_field))
        answer = self._gold_answer(self._required(row, self.answer_field))
        if self.id_field is None:
            example_id = f"{id_prefix}/{index}"
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


def _allowed_values(field: Any, value: Any) -> frozenset[str]:
    """The accepted values of one ``where`` condition, as text: a scalar or a non-empty list of scalars."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not values:
        raise ValueError(f"where.{field}: give a value or a non-empty list of values")
    try:
        return frozenset(scalar_text(v) for v in values)
    except ValueError as error:
        raise ValueError(f"where.{field}: {error}") from None


def data_location(path: str | Path) -> Path | str:
    """``hf://NAME`` as given (a dataset name); anything else as an absolute path without '..'."""
    if str(path).startswith(HF_PREFIX):
        name = str(path)[len(HF_PREFIX) :].rstrip("/")
        if not name:
            raise ValueError(f"{path!r}: name the dataset after {HF_PREFIX}, e.g. {HF_PREFIX}openai/gsm8k")
        return f"{HF_PREFIX}{name}"
    # abspath: absolute and without '..', so error messages and ids name the file plainly.
    return Path(os.path.abspath(Path(path).expanduser()))


def row_id_prefix(location: Path | str, split: str | None) -> str:
    """The default id of row ``i`` is ``{prefix}/{i}``: ``folder/stem`` of a file, ``name/split`` of a dataset."""
    if isinstance(location, Path) and not location.is_dir():
        return f"{location.parent.name}/{location.stem}"
    name = location[len(HF_PREFIX) :] if isinstance(location, str) else location.name
    return f"{name}/{split or 'train'}"


def _load_rows(
    path: Path | str,
    fields: Sequence[str | None],
    cache_dir: str | Path | None,
    split: str | None = None,
    config_name: str | None = None,
) -> list[dict[str, Any]]:
    """All rows of the file or dataset as Python dicts, restricted to the top-level columns the fields use."""
    dataset = _load_dataset(path, None if cache_dir is None else str(cache_dir), split, config_name)
    if len(dataset) == 0:
        raise ValueError(f"{path}: no rows (the file or split is empty).")
    top_level = {field.split(".", 1)[0] for field in fields if field}
    missing = sorted(top_level - set(dataset.column_names))
    if missing:
        # A whole column is absent: report it for the first row, as a row-level error would.
        raise ValueError(f"{path}: row 0 has no field {missing[0]!r} (columns: {sorted(dataset.column_names)}).")
    try:
        return dataset.select_columns(sorted(top_level)).to_list()
    except UnicodeDecodeError as error:  # arrow keeps the bytes of a JSON string that is not UTF-8 until here
        raise _read_error(path, error) from None


def _load_dataset(path: Path | str, cache_dir: str | None, split: str | None, config_name: str | None):
    import datasets  # imported here: heavy, and only file sources need it

    if isinstance(path, str):  # hf://NAME
        return _load_named_dataset(path, path[len(HF_PREFIX) :], cache_dir, split, config_name)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
            if config_name is not None:
                raise ValueError(f"{path}: a save_to_disk folder has no configurations; set config_name to null.")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                name = split or "train"
                if name not in loaded:
                    raise ValueError(f"{path}: no split {name!r} (split=...); its splits: {sorted(loaded)}.")
                loaded = loaded[name]
            elif split is not None:
                raise ValueError(f"{path}: a single saved Dataset has no splits; set split to null.")
            return loaded
        return _load_named_dataset(path, str(path), cache_dir, split, config_name)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}. {DATA_ROOT_HINT}")
    if split is not None or config_name is not None:
        raise ValueError(
            f"{path}: split and config_name select part of a dataset (hf://NAME or a folder); a file is read whole: "
            "set them to null."
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonRows(path)
    if suffix != ".parquet":
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet.")
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:
        raise _read_error(path, error) from None


class NonFinite(str):
    """``NaN``, ``Infinity`` or ``-Infinity`` as written in a JSON file: kept as a marker (a column the source does
    not use may hold one), refused where a source reads it as a value (:func:`scalar_text`)."""


class JsonRows:
    """The rows of a JSON Lines file or of a file holding one JSON list, read with Python's ``json``: integers
    exact at any size, decimals as :class:`~decimal.Decimal`, non-finite constants as :class:`NonFinite`.

    ``datasets``' json builder goes through Arrow, which reads an integer beyond int64 as a float64 and so changes
    its digits, and turns ``NaN`` into a float. ``lines[i]`` is the line row ``i`` starts on (for messages). The
    interface is the part of ``datasets.Dataset`` that :func:`_load_rows` uses.
    """

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: {json_file_problem(path)}") from None
        if not text.strip():
            raise ValueError(f"{path}: the file is empty (no rows).")
        decoder = json.JSONDecoder(parse_float=Decimal, parse_constant=NonFinite)
        self.rows: list[Any] = []
        self.lines: list[int] = []
        try:
            if text.lstrip().startswith("["):
                self._read_list(text, decoder)
            else:
                for number, line in enumerate(text.split("\n"), 1):
                    if line.strip():
                        self.rows.append(decoder.decode(line))
                        self.lines.append(number)
        except json.JSONDecodeError as error:
            line = error.lineno if text.lstrip().startswith("[") else number
            raise ValueError(f"{path}: line {line}, column {error.colno}: invalid JSON ({error.msg}).") from None
        for row, line in zip(self.rows, self.lines):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line}: a row must be a JSON object {{...}}, got {type(row).__name__}.")
        self.column_names = list(dict.fromkeys(key for row in self.rows for key in row))

    def _read_list(self, text: str, decoder: json.JSONDecoder) -> None:
        """One JSON list, element by element, so that each row knows its line."""
        space = re.compile(r"\s*")
        position = space.match(text, text.index("[") + 1).end()
        if text.startswith("]", position):
            position += 1
        else:
            while True:
                row, end = decoder.raw_decode(text, position)
                self.rows.append(row)
                self.lines.append(text.count("\n", 0, position) + 1)
                position = space.match(text, end).end()
                if text.startswith("]", position):
                    position += 1
                    break
                if not text.startswith(",", position):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
                position = space.match(text, position + 1).end()
        if text[position:].strip():
            raise json.JSONDecodeError("Extra data", text, space.match(text, position).end())

    def __len__(self) -> int:
        return len(self.rows)

    def select_columns(self, columns: Sequence[str]) -> JsonRows:
        return self

    def to_list(self) -> JsonRowList:
        return JsonRowList(self.rows, self.lines)


class JsonRowList(list):
    """Rows (dicts) that remember the line each starts on."""

    def __init__(self, rows: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(rows)
        self.lines = lines


def row_place(rows: Sequence[Any], index: int) -> str:
    """``row 3`` or, for a JSON file, ``row 3 (line 4)``: where a message points."""
    lines = getattr(rows, "lines", None)
    return f"row {index} (line {lines[index]})" if lines else f"row {index}"


def _read_error(path: Path | str, error: Exception) -> ValueError:
    """A file that ``datasets`` could not read, named with the line at fault (its own errors name neither)."""
    problem = json_file_problem(path) if isinstance(path, Path) and path.suffix.lower() != ".parquet" else None
    return ValueError(f"{path}: {problem or f'could not be read ({type(error).__name__}: {error}).'}")


def _load_named_dataset(
    where: Path | str, name: str, cache_dir: str | None, split: str | None, config_name: str | None
):
    """``datasets.load_dataset(name, config_name, split=split)``: a Hub dataset or a local folder of data files."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split or "train", cache_dir=cache_dir)
    except Exception as error:
        hint = ""
        if datasets.config.HF_HUB_OFFLINE and isinstance(where, str):
            hint = (
                " (HF_HUB_OFFLINE is set: a Hub dataset is read only from the datasets cache, paths.cache_dir; "
                "load it once online to fill it)"
            )
        raise ValueError(
            f"{where}: datasets.load_dataset({name!r}, {config_name!r}, split={split or 'train'!r}) failed{hint}: "
            f"{type(error).__name__}: {error}"
        ) from None


def json_file_problem(path: Path) -> str | None:
    """Where a JSON / JSON Lines file is malformed ("line 7, column 12: ..."), or None when nothing is found."""
    data = path.read_bytes()
    if not data.strip():
        return "the file is empty (no rows)."
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            return (
                f"line {number}, column {error.start + 1}: byte 0x{line[error.start]:02x} is not UTF-8; "
                "save the file as UTF-8."
            )
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):  # one JSON list
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})."
        return None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}, column {error.colno}: invalid JSON ({error.msg})."
        if not isinstance(value, dict):
            return f"line {number}: a JSON Lines row must be an object {{...}}, got {type(value).__name__}."
    return None


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
    """A scalar as exact text; integral numbers lose their ``.0`` (AMC23 stores 27.0 for the answer 27).

    Refused (ValueError): ``NaN``/``Infinity``, and an integral float beyond 2**53, whose digits are not the
    number that was written (``36472996377170786403`` read as a float64 is ``36472996377170788352``).
    """
    if isinstance(value, NonFinite):
        raise ValueError(f"{value} is not a number an answer can be; write the value as a string if it is meant")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Decimal):  # a JSON decimal, exactly as written
        return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a number an answer can be")
        if value.is_integer():
            if abs(value) >= 2**53:
                raise ValueError(
                    f"{value!r} is a float beyond 2**53: its digits are not exact (float64 keeps 53 bits), so the "
                    "number that was meant is lost; store such answers as strings or as an integer column"
                )
            return str(int(value))
        return repr(value)
    if isinstance(value, (str, int)):
        return str(value)
    raise ValueError(f"expected a string or a number, got {type(value).__name__}: {value!r:.200}")


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K gold: the text after the last ``####``, thousands separators removed."""
    if "####" not in solution:
        return ""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")
