"""Prompt data: file sources, procedural arithmetic, rendering, and the step-deterministic DataModule.

Tests that read the shared offline data (../shared/data, or $SIMKO_DATA_DIR) skip when it is absent;
everything else runs on small files written to tmp_path. Nothing is downloaded.
"""

from __future__ import annotations

import json
import operator
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import DATA_DIR, shared_file  # noqa: E402
from simko.data import ArithmeticSource, LocalFileSource, PromptDataModule, render_prompt  # noqa: E402
from simko.data.sources import get_path, gsm8k_final_answer, strip_instruction  # noqa: E402
from simko.rewards import extract_boxed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SIMKO_BOXED_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def char_tokenizer(chat_template: str | None = None):
    """A character-level tokenizer built in memory (no download), optionally with a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set("0123456789+-*=abcdefghijklmnopqrstuvwxyz <>|/\n"))
    vocab = {"[UNK]": 0, "[EOS]": 1, **{c: i + 2 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --- file sources ----------------------------------------------------------------------------------


def test_verl_parquet_files_read_as_they_are(datasets_cache):
    level1 = LocalFileSource(
        shared_file("simko-official/gsm8k_level1/train.parquet"), preset="verl", cache_dir=datasets_cache
    )
    assert len(level1) == 8388
    first = level1[0]
    assert first["answer"] == "180"  # ground_truth is a plain string here
    assert first["question"].startswith("Mrs. Gable")
    assert first["verifier"] == "math"
    assert set(first) == {"id", "question", "answer", "verifier"}

    math500 = LocalFileSource(
        shared_file("simko-official/gsm8k_level1/test.parquet"), preset="verl", cache_dir=datasets_cache
    )
    assert len(math500) == 500
    assert math500[0]["answer"] == "17"
    # The SimpleRL "Question: ... Answer: Let's think step by step." wrapper is stripped.
    assert math500[0]["question"].startswith("Let $a,$ $b,$ $c$")
    assert not any(e["question"].startswith("Question:") or "step by step" in e["question"] for e in math500.examples)

    amc = LocalFileSource(shared_file("simko-official/amc23/test.parquet"), preset="verl", cache_dir=datasets_cache)
    assert (len(amc), amc[0]["answer"]) == (40, "27")  # ground_truth is a {question, target} dict


def test_verl_math_train_uses_target_and_drops_rows_without_gold(datasets_cache):
    source = LocalFileSource(shared_file("simko-official/math/train.parquet"), preset="verl", cache_dir=datasets_cache)
    by_id = {e["id"]: e for e in source.examples}
    assert len(source) == 7498  # 7,500 rows, 2 with an empty target and an empty \boxed{}
    assert by_id["math/train/5"]["answer"] == "(3,-1)"  # the official target, not the raw \boxed{} text
    assert by_id["math/train/7301"]["answer"].startswith("\\begin{pmatrix}")  # empty target: from solution
    assert "math/train/5341" not in by_id


def test_gsm8k_gold_after_hashes_without_commas(tmp_path, datasets_cache):
    assert gsm8k_final_answer("step <<2*3=6>>6\n#### 1,234") == "1234"
    assert gsm8k_final_answer("no final line") == ""
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "work\n#### 12,000"}])
    assert LocalFileSource(path, answer_format="gsm8k", cache_dir=datasets_cache)[0]["answer"] == "12000"


def test_real_gsm8k_and_math500_jsonl(datasets_cache):
    gsm8k = LocalFileSource(shared_file("gsm8k/train.jsonl"), answer_format="gsm8k", limit=3, cache_dir=datasets_cache)
    assert [e["answer"] for e in gsm8k.examples] == ["72", "10", "5"]
    math500 = LocalFileSource(
        shared_file("benchmarks/math500/test.jsonl"), question_field="problem", cache_dir=datasets_cache
    )
    assert len(math500) == 500
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_json_list_dotted_paths_and_numbers(tmp_path, datasets_cache):
    path = tmp_path / "rows.json"
    path.write_text(
        json.dumps(
            [
                {"key": "a", "problem": {"text": "1+1?"}, "final": [2.0], "solution": "so \\boxed{\\frac{1}{2}}."},
                {"key": "b", "problem": {"text": "2.5*2?"}, "final": [5.5], "solution": "\\boxed{3} then \\boxed{4}"},
            ]
        )
    )
    source = LocalFileSource(
        path, question_field="problem.text", answer_field="final.0", id_field="key", cache_dir=datasets_cache
    )
    assert [(e["id"], e["question"], e["answer"]) for e in source.examples] == [
        ("a", "1+1?", "2"),
        ("b", "2.5*2?", "5.5"),
    ]
    boxed = LocalFileSource(
        path,
        question_field="problem.text",
        answer_field="solution",
        answer_format="boxed_solution",
        cache_dir=datasets_cache,
    )
    assert [e["answer"] for e in boxed.examples] == ["\\frac{1}{2}", "4"]


BIG = 36472996377170786403  # above 2**64: a float64 reads it as 36472996377170788352


def test_gold_numbers_round_trip_exactly(tmp_path, datasets_cache):
    """Numbers in JSON files are read exactly: integers of any size, decimals as written (without trailing zeros),
    so the true answer scores 1 and a near miss 0. They were read as float64 and the gold became another number."""
    path = tmp_path / "numbers.jsonl"
    path.write_text(
        f'{{"question": "q1", "answer": {BIG}}}\n'
        f'{{"question": "q2", "answer": -{BIG}}}\n'
        '{"question": "q3", "answer": 2.50}\n'
        '{"question": "q4", "answer": 27.0}\n'
        '{"question": "q5", "answer": 0.1}\n'
        '{"question": "q6", "answer": 1e400}\n'
        '{"question": "q7", "answer": 12345678901234567890.5}\n'
    )
    answers = [e["answer"] for e in LocalFileSource(path, cache_dir=datasets_cache).examples]
    assert answers == [str(BIG), f"-{BIG}", "2.5", "27", "0.1", "1" + "0" * 400, "12345678901234567890.5"]
    listed = tmp_path / "numbers.json"
    listed.write_text(f'[{{"question": "q", "answer": {BIG}, "id": {BIG + 1}}}]')
    example = LocalFileSource(listed, id_field="id", cache_dir=datasets_cache)[0]
    assert (example["answer"], example["id"]) == (str(BIG), str(BIG + 1))

    from simko.rewards import ExactMatchVerifier

    scores = ExactMatchVerifier().score([str(BIG), "36472996377170788352"], [answers[0], answers[0]])
    assert scores == [1.0, 0.0]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_finite_gold_is_refused_naming_file_and_line(tmp_path, datasets_cache, constant, suffix):
    """NaN became the gold answer "nan"; 1e400-style overflow failed without a line. Now: file and line."""
    rows = [f'{{"question": "q{i}", "answer": {i}}}' for i in range(3)]
    rows.append(f'{{"question": "q3", "answer": {constant}}}')
    path = tmp_path / f"bad{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]\n")
    with pytest.raises(ValueError) as error:
        LocalFileSource(path, cache_dir=datasets_cache)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "line 4" in message and constant in message, message
    # a NaN in a column the source does not use is no problem
    path.write_text('{"question": "q", "answer": "1", "score": NaN}\n')
    assert LocalFileSource(path, cache_dir=datasets_cache)[0]["answer"] == "1"


def test_parquet_floats_that_lost_digits_are_refused(tmp_path, datasets_cache):
    """A float column holds a large integer only approximately (beyond 2**53): refused, naming the row; an int64
    column round-trips exactly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    exact = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": pa.array([2**53 + 1], pa.int64())}), exact)
    assert LocalFileSource(exact, cache_dir=datasets_cache)[0]["answer"] == str(2**53 + 1)
    lossy = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": pa.array([27.0, float(BIG)], pa.float64())}), lossy)
    with pytest.raises(ValueError, match=rf"^{lossy}: row 1: .*2\*\*53"):
        LocalFileSource(lossy, cache_dir=datasets_cache)
    nan = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": pa.array([float("nan")], pa.float64())}), nan)
    with pytest.raises(ValueError, match=rf"^{nan}: row 0: .*nan"):
        LocalFileSource(nan, cache_dir=datasets_cache)


def test_where_keeps_the_matching_rows_before_limit_with_their_file_ids(tmp_path, datasets_cache):
    rows = [
        {"question": "q0", "answer": "0", "level": "Level 2", "meta": {"year": 2001}},
        {"question": "q1", "answer": "1", "level": "Level 1", "meta": {"year": 2002}},
        {"question": "q2", "answer": "2", "level": "Level 3", "meta": {"year": 2002}},
        {"question": "q3", "answer": "3", "level": "Level 1", "meta": {"year": 2003}},
        {"question": "q4", "answer": "4", "level": "Level 1", "meta": {"year": 2002}},
    ]
    path = write_jsonl(tmp_path / "levels.jsonl", rows)
    level1 = LocalFileSource(path, where={"level": "Level 1"}, cache_dir=datasets_cache)
    assert [(e["id"], e["question"]) for e in level1.examples] == [
        ("test_where_keeps_the_matching_0/levels/1", "q1"),
        ("test_where_keeps_the_matching_0/levels/3", "q3"),
        ("test_where_keeps_the_matching_0/levels/4", "q4"),
    ]
    assert "where={'level': ['Level 1']}" in repr(level1)
    # a list of values, a dotted field compared as text (the JSON integer 2002 matches "2002"), limit after where
    both = LocalFileSource(
        path, where={"level": ["Level 1", "Level 3"], "meta.year": "2002"}, limit=2, cache_dir=datasets_cache
    )
    assert [e["question"] for e in both.examples] == ["q1", "q2"]
    with pytest.raises(ValueError, match=r"levels.jsonl: no row matches where=\{'level': \['Level 9'\]\}"):
        LocalFileSource(path, where={"level": "Level 9"}, cache_dir=datasets_cache)
    with pytest.raises(ValueError, match=r"row 0 has no field 'difficulty'"):
        LocalFileSource(path, where={"difficulty": "easy"}, cache_dir=datasets_cache)
    with pytest.raises(ValueError, match=r"where.level: give a value or a non-empty list"):
        LocalFileSource(path, where={"level": []}, cache_dir=datasets_cache)


def test_math_level1_config_holds_the_level1_problems_of_math_train_and_test(datasets_cache, monkeypatch):
    import pandas as pd
    from hydra.utils import instantiate

    from helpers import compose_config

    monkeypatch.setenv("PROJECT_ROOT", str(REPO_ROOT))
    train_file, test_file = (
        shared_file("simko-official/math/train.parquet"),
        shared_file("simko-official/math/test.parquet"),
    )
    cfg = compose_config(["data=math_level1", f"paths.cache_dir={datasets_cache}"])
    datamodule = instantiate(cfg.data)
    for source, path in ((datamodule.train_source, train_file), (datamodule.val_source, test_file)):
        levels = pd.read_parquet(path, columns=["level"])["level"]
        assert len(source) == int((levels == "Level 1").sum())  # 564 train, 437 test
        assert all(levels[int(e["id"].rsplit("/", 1)[1])] == "Level 1" for e in source.examples)
    assert datamodule.val_prompts is None


def test_value_helpers():
    assert get_path({"a": {"b": [1, {"c": "x"}]}}, "a.b.1.c") == "x"
    assert get_path({"a": {}}, "a.b") is None
    assert extract_boxed("x \\boxed{a{b}c} y") == "a{b}c"  # the gold of a boxed_solution field
    assert extract_boxed("none") is None
    assert strip_instruction("Question:\nWhat?\nAnswer:\nLet's think step by step.\n") == "What?"
    assert (
        strip_instruction("What?\nPlease reason step by step, and put your final answer within \\boxed{}.") == "What?"
    )


def test_missing_file_names_path_and_data_root_setting(tmp_path):
    missing = tmp_path / "nowhere" / "train.parquet"
    with pytest.raises(FileNotFoundError) as error:
        LocalFileSource(missing)
    message = str(error.value)
    assert str(missing) in message and "paths.data_dir" in message and "SIMKO_DATA_DIR" in message


def test_missing_field_names_file_row_and_field(tmp_path, datasets_cache):
    rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"question": "c"}]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(ValueError) as error:
        LocalFileSource(path, cache_dir=datasets_cache)
    message = str(error.value)
    assert str(path) in message and "row 2" in message and "'answer'" in message

    with pytest.raises(ValueError, match=r"row 0 .*'problem'"):
        LocalFileSource(path, question_field="problem", cache_dir=datasets_cache)  # column absent everywhere


def good_lines(count: int) -> list[str]:
    return [json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) for i in range(count)]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file is empty"),
        # before: "Expected object or value" / "An error occurred while generating the dataset", no file, no line
        ("invalid.jsonl", ("\n".join(good_lines(6)) + '\n{"question": "7+1", "answer": \n').encode(), "line 7, column"),
        # before: a bare UnicodeDecodeError
        ("latin1.jsonl", ("\n".join(good_lines(2)) + '\n{"question": "caf\xe9"}\n').encode("latin-1"), "line 3"),
        ("list.json", b'[{"question": "1+1", "answer": "2"},\n {"question": "2+2" "answer": "4"}]', "line 2, column"),
        ("scalar.jsonl", b'{"question": "1+1", "answer": "2"}\n[1, 2]\n', "line 2"),
        ("garbage.parquet", b"PAR1 this is not parquet", "could not be read"),
    ],
)
def test_unreadable_files_name_the_file_and_line(tmp_path, datasets_cache, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:  # before: StopIteration() for an empty file
        LocalFileSource(path, cache_dir=datasets_cache)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message, message


def test_logic_file_sources_name_the_file_and_line(tmp_path, datasets_cache):
    from simko.data.logic import CountdownFileSource

    path = tmp_path / "countdown.jsonl"
    path.write_text('{"nums": [1, 2, 3], "target": 6}\n{"nums": [1, 2], "target": \n')
    with pytest.raises(ValueError, match=f"^{path}: line 2, column"):
        CountdownFileSource(path, cache_dir=datasets_cache)


# --- datasets: hf://NAME and dataset folders ---------------------------------------------------------------


def test_hf_dataset_name_reads_through_load_dataset(tmp_path, datasets_cache):
    # hf://NAME is datasets.load_dataset(NAME, config_name, split=split): a Hub name when online; here (offline) a
    # local folder of data files, which is the same call.
    folder = tmp_path / "toy_gsm8k"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"{i}+{i}?", "answer": f"#### {2 * i}"} for i in (1, 2)])
    write_jsonl(folder / "test.jsonl", [{"question": "3+3?", "answer": "#### 6"}])
    train = LocalFileSource(f"hf://{folder}", answer_format="gsm8k", cache_dir=datasets_cache)
    test = LocalFileSource(f"hf://{folder}", split="test", answer_format="gsm8k", cache_dir=datasets_cache)
    assert [e["answer"] for e in train.examples] == ["2", "4"] and test[0]["answer"] == "6"
    assert test[0]["id"] == f"{folder}/test/0"
    # The folder path itself (without hf://) reads the same way.
    assert LocalFileSource(folder, split="test", answer_format="gsm8k", cache_dir=datasets_cache)[0] == {
        **test[0],
        "id": "toy_gsm8k/test/0",
    }
    with pytest.raises(ValueError, match="split='validation'"):
        LocalFileSource(f"hf://{folder}", split="validation", cache_dir=datasets_cache)


def test_hf_name_offline_says_why_without_downloading(datasets_cache):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match=r"hf://openai/gsm8k: .*HF_HUB_OFFLINE is set"):
        LocalFileSource("hf://openai/gsm8k", config_name="main", cache_dir=datasets_cache)


def test_save_to_disk_folders(tmp_path, datasets_cache):
    import datasets

    rows = [{"problem": "1+2", "solution": "\\boxed{3}"}, {"problem": "2+2", "solution": "\\boxed{4}"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    splits = {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows[1:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "two"))
    fields = dict(question_field="problem", answer_field="solution", answer_format="boxed_solution")
    assert [e["answer"] for e in LocalFileSource(tmp_path / "one", **fields).examples] == ["3", "4"]
    assert LocalFileSource(tmp_path / "two", split="test", **fields)[0]["answer"] == "4"
    with pytest.raises(ValueError, match=r"no split 'dev' .*\['test', 'train'\]"):
        LocalFileSource(tmp_path / "two", split="dev", **fields)


def test_split_on_a_plain_file_is_refused(tmp_path, datasets_cache):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "1", "answer": "1"}])
    with pytest.raises(ValueError, match="a file is read whole"):
        LocalFileSource(path, split="test", cache_dir=datasets_cache)


def test_file_data_configs_take_a_dataset_name(monkeypatch, tmp_path, datasets_cache):
    """Any file-backed data config reads hf://NAME with one override of its path (and split / config_name)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    folder = tmp_path / "toy_gsm8k"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(4)])
    write_jsonl(folder / "test.jsonl", [{"question": "9+1?", "answer": "#### 10"}])
    monkeypatch.setenv("PROJECT_ROOT", str(REPO_ROOT))
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        config = compose(
            overrides=[
                "+seed=0",
                "+paths=default",
                f"paths.cache_dir={datasets_cache}",
                "+data=gsm8k_train",
                f"data.train_source.path=hf://{folder}",
                f"data.val_source.path=hf://{folder}",
                "data.val_source.split=test",
            ]
        )
    module = instantiate(config.data)
    assert len(module.train_source) == 4 and module.val_examples()[0]["answer"] == "10"


# --- procedural arithmetic -------------------------------------------------------------------------


def test_arithmetic_is_deterministic_and_correct():
    source = ArithmeticSource(seed=3, ops=("+", "-", "*"))
    assert [source.example(i) for i in range(50)] == [
        ArithmeticSource(seed=3, ops=("+", "-", "*")).example(i) for i in range(50)
    ]
    assert [source.example(i) for i in range(50)] != [
        ArithmeticSource(seed=4, ops=("+", "-", "*")).example(i) for i in range(50)
    ]
    for i in range(200):
        example = source.example(i)
        assert example["verifier"] == "exact"
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", example["question"]).groups()  # no eval() of any text
        assert str({"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))) == example["answer"]
        assert int(example["answer"]) >= 0


def test_arithmetic_train_and_val_are_disjoint():
    # 2-digit addition: ~10,000 problems, so these draws revisit most of each part of the space.
    train = {ArithmeticSource(seed=0, split="train").example(i)["question"] for i in range(3000)}
    val_source = ArithmeticSource(seed=1, split="val")
    val = {val_source.example(i)["question"] for i in range(900)}
    assert len(val) == 900 and not train & val


def test_arithmetic_val_problems_are_distinct_and_stable():
    source = ArithmeticSource(seed=0, split="val")
    questions = [source.example(i)["question"] for i in range(256)]
    assert len(set(questions)) == 256
    # the same problems in any order of access, from a fresh instance (ranks, restarts)
    assert [ArithmeticSource(seed=0, split="val").example(i)["question"] for i in reversed(range(256))] == questions[
        ::-1
    ]
    # about 10% of the 10,000 problems of 1-2 digit addition are held out: asking for more fails clearly
    tiny = ArithmeticSource(seed=0, split="val", min_digits=1, max_digits=1)  # 100 problems, ~10 held out
    with pytest.raises(ValueError, match="distinct 'val' problems"):
        tiny.example(99)


# --- rendering -------------------------------------------------------------------------------------


def test_render_prompt_plain_and_chat():
    example = {"id": "x", "question": "12+34", "answer": "46", "verifier": "exact"}
    assert render_prompt(example, None, "{question}=") == "12+34="
    assert render_prompt(example, char_tokenizer(), "{question}=") == "12+34="
    chat = char_tokenizer(CHAT_TEMPLATE)
    assert render_prompt(example, chat, "{question}=") == "<|user|>12+34=\n<|assistant|>"
    assert render_prompt(example, chat, "{question}=", use_chat_template=False) == "12+34="
    boxed = render_prompt({"question": "q"}, None, SIMKO_BOXED_TEMPLATE)
    assert boxed == "q\nPlease reason step by step, and put your final answer within \\boxed{}."
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt(example, char_tokenizer(), "{question}", use_chat_template=True)
    with pytest.raises(ValueError, match="problem"):
        render_prompt(example, None, "{problem}")


# --- the DataModule --------------------------------------------------------------------------------


def arithmetic_module(**overrides) -> PromptDataModule:
    arguments = dict(
        train_source=ArithmeticSource(seed=0),
        val_source=ArithmeticSource(seed=0, split="val"),
        prompts_per_step=4,
        val_prompts=8,
        prompt_template="{question}=",
        tokenizer=char_tokenizer(),
    )
    return PromptDataModule(**(arguments | overrides))


@pytest.fixture
def ten_row_source(tmp_path, datasets_cache) -> LocalFileSource:
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    return LocalFileSource(write_jsonl(tmp_path / "ten.jsonl", rows), cache_dir=datasets_cache)


def test_batches_depend_only_on_seed_step_rank_and_world(ten_row_source):
    module = arithmetic_module()
    again = arithmetic_module()
    assert module.examples_for_step(5) == again.examples_for_step(5)
    assert module.examples_for_step(5) != module.examples_for_step(6)
    assert all(e["prompt"] == e["question"] + "=" for e in module.examples_for_step(5))

    files = PromptDataModule(ten_row_source, prompts_per_step=4, seed=1)
    assert files.examples_for_step(7) == PromptDataModule(ten_row_source, prompts_per_step=4, seed=1).examples_for_step(
        7
    )
    assert files.examples_for_step(0) != PromptDataModule(ten_row_source, prompts_per_step=4, seed=2).examples_for_step(
        0
    )
    # 5 steps x 4 prompts = two epochs of 10 rows: each epoch visits every row exactly once.
    stream = [e["answer"] for step in range(5) for e in files.examples_for_step(step)]
    assert sorted(stream[:10]) == sorted(stream[10:]) == sorted(str(i) for i in range(10))


@pytest.mark.parametrize("use_files", [False, True])
def test_rank_shards_partition_the_global_batch(use_files, ten_row_source):
    module = PromptDataModule(ten_row_source, prompts_per_step=4) if use_files else arithmetic_module()
    for step in (0, 3):
        whole = module.examples_for_step(step, rank=0, world_size=1)
        shards = [module.examples_for_step(step, rank=r, world_size=2) for r in range(2)]
        assert shards[0] + shards[1] == whole and len(shards[0]) == 2


def test_prompts_per_step_must_divide_by_world_size():
    module = arithmetic_module(prompts_per_step=6)
    with pytest.raises(ValueError, match="divisible by the world size"):
        module.examples_for_step(0, rank=0, world_size=4)
    module.trainer = SimpleNamespace(global_rank=1, world_size=4)
    with pytest.raises(ValueError, match="divisible by the world size"):
        module.train_dataloader()


def test_resume_continues_with_the_next_unconsumed_step():
    module = arithmetic_module()
    batches = iter(module.train_dataloader())
    trained = module.on_after_batch_transfer(next(batches), 0)  # step 0 is trained
    trained = module.on_after_batch_transfer(next(batches), 0)  # step 1 is trained
    prefetched = next(batches)  # step 2 fetched ahead by Lightning, but never trained
    assert (trained["step"], prefetched["step"]) == (1, 2)
    state = module.state_dict()
    assert state == {"next_step": 2}

    resumed = arithmetic_module()
    resumed.load_state_dict(state)
    first = next(iter(resumed.train_dataloader()))
    assert first["step"] == 2 and first["examples"] == prefetched["examples"]


def test_val_set_is_fixed_and_rank_sharded():
    module = arithmetic_module()
    whole = module.val_examples(rank=0, world_size=1)
    assert len(whole) == 8 and whole == arithmetic_module().val_examples(rank=0, world_size=1)
    assert module.val_examples(0, 2) + module.val_examples(1, 2) == whole
    batches = list(module.val_dataloader())
    assert [len(b) for b in batches] == [4, 4] and [e for b in batches for e in b] == whole
    assert arithmetic_module(val_source=None).val_dataloader() == []


def test_lightning_fit_resume_trains_each_step_once(tmp_path):
    """Real Lightning loop (with its one-batch prefetch and validation): resume continues exactly."""
    import lightning.pytorch as pl
    import torch

    class RecordSteps(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.steps: list[int] = []
            self.val_batches: list[int] = []

        def training_step(self, batch, batch_idx):
            self.steps.append(batch["step"])
            assert len(batch["examples"]) == 4 and all(isinstance(e["prompt"], str) for e in batch["examples"])
            return (self.weight - 1.0).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.val_batches.append(len(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(max_steps):
        return pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=1,
            default_root_dir=tmp_path,
        )

    model, module = RecordSteps(), arithmetic_module()
    first = trainer(3)
    first.fit(model, datamodule=module)
    assert model.steps == [0, 1, 2] and module.next_step == 3
    assert model.val_batches and set(model.val_batches) == {4}
    first.save_checkpoint(tmp_path / "last.ckpt")

    model, module = RecordSteps(), arithmetic_module()
    trainer(5).fit(model, datamodule=module, ckpt_path=tmp_path / "last.ckpt")
    assert model.steps == [3, 4]


def test_data_configs_instantiate(monkeypatch, datasets_cache):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.setenv("PROJECT_ROOT", str(REPO_ROOT))
    monkeypatch.setenv("SIMKO_DATA_DIR", str(DATA_DIR))
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        arithmetic = instantiate(
            compose(overrides=["+seed=0", "+paths=default", "+data=arithmetic"]).data, tokenizer=None
        )
        assert isinstance(arithmetic, PromptDataModule) and arithmetic.prompt_template == "{question}="
        assert arithmetic.examples_for_step(0)[0]["prompt"].endswith("=")

        shared_file("simko-official/gsm8k_level1/train.parquet")
        for name in ("math_train", "simko_level1", "gsm8k_train"):
            config = compose(
                overrides=[
                    "+seed=0",
                    "+paths=default",
                    f"paths.cache_dir={datasets_cache}",
                    f"+data={name}",
                    "data.train_source.limit=4",
                    "data.val_source.limit=4",
                ]
            )
            module = instantiate(config.data, tokenizer=char_tokenizer(CHAT_TEMPLATE))
            prompt = module.examples_for_step(0)[0]["prompt"]
            assert prompt.startswith("<|user|>") and "\\boxed{}" in prompt, name
            assert len(module.val_examples()) == 4
