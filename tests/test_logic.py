"""Logic tasks: the exact verifiers (countdown, knights_knaves, mini_sudoku), the reasoning-gym and file sources,
and every data config added with them (logic tasks and offline math benchmarks).

Tests that read the shared offline data (../shared/data, or $SIMKO_DATA_DIR) skip when it is absent. Nothing is
downloaded; reasoning-gym generates offline.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import DATA_DIR, shared_file  # noqa: E402
from simko.data import PromptDataModule  # noqa: E402
from simko.data.logic import CountdownFileSource, KnightsKnavesFileSource, ReasoningGymSource  # noqa: E402
from simko.rewards import VERIFIERS, build_verifier, score_batch  # noqa: E402
from simko.rewards.logic import (  # noqa: E402
    countdown_answer,
    final_answer_text,
    is_countdown_solution,
    knights_knaves_answer,
    sudoku_answer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def tagged(text: str) -> str:
    return f"Let me think.\n<answer>{text}</answer>"


def as_completion(example: dict) -> str:
    """The example's reference solution written as a model would answer."""
    return tagged(example["solution"])


# --- final answer extraction --------------------------------------------------------------------------------


def test_final_answer_text_prefers_tag_then_box_then_last_line():
    assert final_answer_text("<answer>1</answer> \\boxed{2} \n3") == "1"
    assert final_answer_text("<ANSWER> a </ANSWER> then <answer>b</answer>") == "b"
    assert final_answer_text("x \\boxed{2}\n3") == "2"
    assert final_answer_text("work\n\nfirst\n3 + 4\n") == "3 + 4"
    assert final_answer_text("work\n\nrow 1\nrow 2\n", multiline=True) == "row 1\nrow 2"
    assert final_answer_text("<answer>cut off") == "<answer>cut off"  # an unclosed tag is no answer


# --- countdown verifier -------------------------------------------------------------------------------------

COUNTDOWN_GOLD = countdown_answer([1, 3, 4, 6], 24)


@pytest.mark.parametrize(
    "completion, expected",
    [
        (tagged("6 / (1 - 3/4)"), 1.0),  # needs exact fractions: 3/4 is not an integer
        ("so \\boxed{6 \\div \\left(1 - 3 / 4\\right)}", 1.0),  # LaTeX in a box
        ("reasoning...\n6/(1-3/4) = 24", 1.0),  # last line, with the result stated
        (tagged("(6 - 4 + 1) * 3"), 0.0),  # wrong value: 9
        (tagged("6/(1-3/4) = 25"), 0.0),  # states a wrong result
        (tagged("6 * 4 * 1"), 0.0),  # number missing (3)
        (tagged("6 * 4 * 1 * 3 / 3"), 0.0),  # number reused (3)
        (tagged("6 * 4 * (3 - 3 + 1) + 0"), 0.0),  # extra number
        (tagged("__import__('os').system('true')"), 0.0),  # code
        (tagged("6 ** 1 * 4 * 3 / 3"), 0.0),  # power
        (tagged("9**9**9**9"), 0.0),  # hung reasoning-gym's sympy-based scorer
        (tagged("(6 // 1) * 4 * (3 - 3)"), 0.0),  # floor division
        (tagged("6.0 / (1 - 3/4)"), 0.0),  # float literal
        (tagged("0x6 / (1 - 3/4)"), 0.0),  # hex literal
        (tagged("6 / (1 - 4/4) + 3"), 0.0),  # division by zero
        (tagged("(" * 150 + "6/(1-3/4)" + ")" * 150), 0.0),  # longer than MAX_EXPRESSION_CHARS
        (tagged("6/(1-3/4)" + "+1-1" * 1000), 0.0),  # huge expression
        ("", 0.0),
        ("I could not find it.", 0.0),
    ],
)
def test_countdown_verifier(completion, expected):
    verifier = build_verifier("countdown")
    assert verifier(completion, COUNTDOWN_GOLD) == expected
    assert verifier.num_errors == 0  # a bad completion is a plain 0.0, not an error


def test_countdown_unary_minus_and_malformed_gold():
    assert is_countdown_solution("-(2 - 5) * 3", [2, 5, 3], 9)
    verifier = build_verifier("countdown")
    bad_golds = ["not json", json.dumps({"numbers": [1.5], "target": 3})]
    assert verifier.score([tagged("1+2"), tagged("1+2")], bad_golds) == [0.0, 0.0]
    assert verifier.num_errors == 2  # a broken gold is counted, never raised


def test_countdown_adversarial_input_is_fast():
    verifier = build_verifier("countdown")
    nasty = ["<answer>" * 20_000, "(" * 100_000, "9" * 100_000, "<answer>" + "1+" * 50_000 + "1</answer>"]
    start = time.perf_counter()
    assert verifier.score(nasty, [COUNTDOWN_GOLD] * len(nasty)) == [0.0] * len(nasty)
    assert time.perf_counter() - start < 1.0


# --- knights and knaves verifier ----------------------------------------------------------------------------

KK_GOLD = knights_knaves_answer(["Emma", "Liam", "Zoey"], [True, False, True])


@pytest.mark.parametrize(
    "completion, expected",
    [
        (tagged("(1) Emma is a knight\n(2) Liam is a knave\n(3) Zoey is a knight"), 1.0),
        (tagged("Zoey is a Knight, Liam is a knave, and Emma is a knight."), 1.0),  # any order, any case
        ("Work.\n\nEmma: knight\nLiam: knave\nZoey: knight", 1.0),  # last paragraph, "Name: role"
        ("\\boxed{Emma is a knight, Liam is a knave, Zoey is a knight}", 1.0),
        (tagged("(1) Emma is a knight\n(2) Liam is a knight\n(3) Zoey is a knight"), 0.0),  # one wrong
        (tagged("(1) Emma is a knight\n(2) Liam is a knave"), 0.0),  # Zoey missing
        (tagged("Emma is a knight, Liam is a knave, Zoey is a knight, Zoey is a knave"), 0.0),  # hedged
        (tagged("Emma is a knight, Liam is not a knight, Zoey is a knight"), 0.0),  # negation is no claim
        (tagged("I am not sure."), 0.0),  # unparseable
        ("", 0.0),
    ],
)
def test_knights_knaves_verifier(completion, expected):
    assert build_verifier("knights_knaves")(completion, KK_GOLD) == expected


def test_knights_knaves_puzzle_words():
    gold = knights_knaves_answer(["Ava", "Noah"], [False, True], words=("angel", "devil"))
    verifier = build_verifier("knights_knaves")
    assert verifier(tagged("(1) Ava is a devil\n(2) Noah is an angel"), gold) == 1.0
    assert verifier(tagged("Ava is a knave and Noah is a knight"), gold) == 1.0  # the standard words count too
    assert verifier(tagged("Ava is an angel and Noah is an angel"), gold) == 0.0
    assert verifier.score([tagged("Ava is a devil")], ["{}"]) == [0.0] and verifier.num_errors == 1


# --- mini sudoku verifier -----------------------------------------------------------------------------------

SUDOKU_SOLUTION = "1 2 4 3\n3 4 2 1\n2 1 3 4\n4 3 1 2"
SUDOKU_GOLD = sudoku_answer([[1, 0, 4, 3], [3, 0, 0, 1], [2, 0, 0, 4], [4, 3, 1, 0]])


@pytest.mark.parametrize(
    "completion, expected",
    [
        (tagged(SUDOKU_SOLUTION), 1.0),
        (tagged("[[1,2,4,3],[3,4,2,1],[2,1,3,4],[4,3,1,2]]"), 1.0),  # any separators
        ("Solved:\n\n" + SUDOKU_SOLUTION, 1.0),  # last paragraph
        (tagged("1 2 4 3\n3 4 2 1\n2 1 4 3\n4 3 1 2"), 0.0),  # column and box repeats
        (tagged("2 1 4 3\n3 4 1 2\n1 2 3 4\n4 3 2 1"), 0.0),  # a valid sudoku that breaks a clue
        (tagged("1 2 4 3\n3 4 2 1\n2 1 3 4\n4 3 1"), 0.0),  # 15 cells
        (tagged("1 2 4 _\n3 4 2 1\n2 1 3 4\n4 3 1 2"), 0.0),  # a cell left empty
        ("", 0.0),
    ],
)
def test_mini_sudoku_verifier(completion, expected):
    assert build_verifier("mini_sudoku")(completion, SUDOKU_GOLD) == expected


def test_logic_verifiers_are_registered_and_mix_in_one_batch():
    assert {"countdown", "knights_knaves", "mini_sudoku"} <= set(VERIFIERS)
    scores = score_batch(
        [tagged("6/(1-3/4)"), tagged("Emma is a knight, Liam is a knave, Zoey is a knave"), tagged(SUDOKU_SOLUTION)],
        [COUNTDOWN_GOLD, KK_GOLD, SUDOKU_GOLD],
        ["countdown", "knights_knaves", "mini_sudoku"],
    )
    assert scores == [1.0, 0.0, 1.0]


# --- reasoning-gym sources ----------------------------------------------------------------------------------

SMALL_COUNTDOWN = dict(min_numbers=3, max_numbers=4, min_value=1, max_value=99, min_target=10, max_target=100)
TASK_DIFFICULTY = {"countdown": SMALL_COUNTDOWN, "knights_knaves": {"n_people": 3}, "mini_sudoku": {}}


@pytest.mark.parametrize("task", sorted(TASK_DIFFICULTY))
def test_generated_examples_are_deterministic_and_their_solutions_score_one(task):
    difficulty = TASK_DIFFICULTY[task]
    source = ReasoningGymSource(task, seed=3, **difficulty)
    examples = [source.example(i) for i in range(40)]
    assert examples == [ReasoningGymSource(task, seed=3, **difficulty).example(i) for i in range(40)]
    assert examples != [ReasoningGymSource(task, seed=4, **difficulty).example(i) for i in range(40)]
    assert len({e["question"] for e in examples}) > 30
    for example in examples:
        assert set(example) == {"id", "question", "answer", "verifier", "solution"} and example["verifier"] == task
        assert all(isinstance(value, str) for value in example.values())
        assert "Format your" not in example["question"]  # reasoning-gym's answer format is replaced by ours
    verifier = build_verifier(task)
    assert verifier.score([as_completion(e) for e in examples], [e["answer"] for e in examples]) == [1.0] * 40


def test_difficulty_knobs_pass_through():
    countdown = ReasoningGymSource("countdown", min_numbers=5, max_numbers=5, min_target=100, max_target=200)
    for i in range(5):
        numbers, target = json.loads(countdown.example(i)["answer"]).values()
        assert len(numbers) == 5 and 100 <= target <= 200
    knights = ReasoningGymSource("knights_knaves", n_people=5)
    assert len(json.loads(knights.example(0)["answer"])["roles"]) == 5
    with pytest.raises(TypeError):
        ReasoningGymSource("knights_knaves", people=5)  # a typo fails at start
    with pytest.raises(ValueError, match="Unsupported task"):
        ReasoningGymSource("sudoku")


@pytest.mark.parametrize(
    "task, difficulty",
    [
        # Problem spaces small enough that independent draws repeat: only the partition keeps the splits apart.
        ("countdown", dict(min_numbers=2, max_numbers=2, min_value=1, max_value=9, min_target=1, max_target=20)),
        ("knights_knaves", dict(n_people=2)),
        ("mini_sudoku", dict(min_empty=1, max_empty=1)),
    ],
)
def test_train_and_val_problems_are_disjoint(task, difficulty):
    train = ReasoningGymSource(task, seed=0, split="train", val_fraction=0.3, **difficulty)
    val = ReasoningGymSource(task, seed=1, split="val", val_fraction=0.3, **difficulty)
    train_keys = {train.problem(i).key for i in range(300)}
    val_keys = {val.problem(i).key for i in range(300)}
    assert len(train_keys) < 300  # the draws do revisit problems
    assert len(val_keys) > 10 and not train_keys & val_keys
    assert {train.split_of(key) for key in train_keys} == {"train"}
    assert {val.split_of(key) for key in val_keys} == {"val"}
    train_questions = {train.example(i)["question"] for i in range(100)}
    assert not train_questions & {val.example(i)["question"] for i in range(100)}


def test_size_cycles_and_val_examples_are_cached():
    finite = ReasoningGymSource("mini_sudoku", size=5)
    assert [finite.example(i)["question"] for i in range(5, 10)] == [finite.example(i)["question"] for i in range(5)]
    val = ReasoningGymSource("mini_sudoku", split="val")
    first = val.example(0)
    first["question"] = "changed by a caller"
    assert val.example(0)["question"] != "changed by a caller"  # the cache hands out copies


# --- file sources -------------------------------------------------------------------------------------------


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """Brute force over orders, operators and bracketings (3-4 numbers): a reference answer for file rows."""

    def expressions(items):
        if len(items) == 1:
            yield str(items[0]), Fraction(items[0])
            return
        for split in range(1, len(items)):
            for (left, a), (right, b) in itertools.product(expressions(items[:split]), expressions(items[split:])):
                yield f"({left} + {right})", a + b
                yield f"({left} - {right})", a - b
                yield f"({left} * {right})", a * b
                if b:
                    yield f"({left} / {right})", a / b

    for order in itertools.permutations(numbers):
        for text, value in expressions(list(order)):
            if value == target:
                return text
    return None


def reference_countdown_solution(example: dict) -> str:
    """A right answer for a Countdown example without one (the files have none)."""
    gold = json.loads(example["answer"])
    solution = solve_countdown(gold["numbers"], gold["target"])
    assert solution is not None, example
    return solution


def test_countdown_file_rows(datasets_cache):
    source = CountdownFileSource(shared_file("benchmarks/countdown/test.parquet"), limit=5, cache_dir=datasets_cache)
    assert len(source) == 5 and source[0]["id"] == "countdown/test/0"
    verifier = build_verifier("countdown")
    for example in source.examples:
        gold = json.loads(example["answer"])
        assert str(gold["target"]) in example["question"] and example["verifier"] == "countdown"
        assert verifier(tagged(reference_countdown_solution(example)), example["answer"]) == 1.0


def test_knights_knaves_file_rows(datasets_cache):
    paths = [shared_file(f"benchmarks/knights_knaves/{n}ppl/test.parquet") for n in (3, 7)]
    source = KnightsKnavesFileSource(paths, cache_dir=datasets_cache)
    assert len(source) == 200 and source[100]["id"] == "7ppl/test/0"
    assert len(json.loads(source[150]["answer"])["roles"]) == 7
    assert "<|im_start|>" not in source[0]["question"] and source[0]["question"].endswith("who is a knave?")
    verifier = build_verifier("knights_knaves")
    completions = [as_completion(e) for e in source.examples]
    assert verifier.score(completions, [e["answer"] for e in source.examples]) == [1.0] * 200
    assert len(KnightsKnavesFileSource(paths, limit=3, cache_dir=datasets_cache)) == 3


def test_missing_logic_file_names_the_path(tmp_path):
    missing = tmp_path / "countdown" / "train.parquet"
    with pytest.raises(FileNotFoundError, match="SIMKO_DATA_DIR") as error:
        CountdownFileSource(missing)
    assert str(missing) in str(error.value)


# --- data configs -------------------------------------------------------------------------------------------

# config -> overrides that keep its instantiation quick (file sources: a few rows; procedural: a few val prompts).
NEW_CONFIGS = {
    "countdown": ["data.val_prompts=4"],
    "knights_knaves": ["data.val_prompts=4"],
    "mini_sudoku": ["data.val_prompts=4"],
    "countdown_file": ["data.train_source.limit=8", "data.val_source.limit=4"],
    "knights_knaves_file": ["data.train_source.limit=8", "data.val_source.limit=4"],
    "math500": ["data.train_source.limit=8", "data.val_source.limit=4"],
    "gsm8k": ["data.train_source.limit=8", "data.val_source.limit=4"],
    "aime24": ["data.train_source.limit=8", "data.val_source.limit=4"],
    "amc23": ["data.train_source.limit=8", "data.val_source.limit=4"],
}
BENCHMARK_CONFIGS = {"math500", "gsm8k", "aime24", "amc23", "countdown_file", "knights_knaves_file"}


@pytest.fixture(scope="module")
def compose_data(datasets_cache):
    from hydra import compose, initialize_config_dir

    previous = {key: os.environ.get(key) for key in ("PROJECT_ROOT", "SIMKO_DATA_DIR")}
    os.environ["PROJECT_ROOT"] = str(REPO_ROOT)
    os.environ["SIMKO_DATA_DIR"] = str(DATA_DIR)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        yield lambda name, overrides: compose(
            overrides=["+seed=0", "+paths=default", f"paths.cache_dir={datasets_cache}", f"+data={name}", *overrides]
        )
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_new_data_configs_instantiate_and_golds_rescore(name, compose_data):
    from hydra.utils import instantiate

    shared_file("benchmarks/math500/test.jsonl")
    config = compose_data(name, NEW_CONFIGS[name])
    if name in BENCHMARK_CONFIGS:
        assert config.data.val_prompts is None  # a benchmark config evaluates every row of its val_source
    module = instantiate(config.data, tokenizer=None)
    assert isinstance(module, PromptDataModule)
    examples = module.examples_for_step(0) + module.val_examples()
    assert len(examples) == 8 + 4
    for example in examples:
        assert example["prompt"].startswith(example["question"]) and len(example["prompt"]) > len(example["question"])
    if examples[0]["verifier"] == "math":
        completions = [f"So the answer is \\boxed{{{e['answer']}}}." for e in examples]
        assert all("\\boxed{}" in e["prompt"] for e in examples)
    else:
        assert all("<answer>" in e["prompt"] for e in examples)
        completions = [as_completion(e) if e["solution"] else tagged(reference_countdown_solution(e)) for e in examples]
    golds, verifiers = [e["answer"] for e in examples], [e["verifier"] for e in examples]
    assert score_batch(completions, golds, verifiers) == [1.0] * len(examples)


def test_benchmark_golds_read_as_expected(compose_data):
    from hydra.utils import instantiate

    shared_file("benchmarks/amc23/test.jsonl")
    amc = instantiate(compose_data("amc23", ["data.train_source.limit=1"]).data.val_source)
    assert len(amc) == 40 and amc[0]["answer"] == "27"  # 27.0 in the file
    aime = instantiate(compose_data("aime24", ["data.train_source.limit=1"]).data.val_source)
    assert len(aime) == 30 and aime[7]["answer"] == "025"  # math-verify reads "025" as 25
    gsm8k = instantiate(compose_data("gsm8k", ["data.train_source.limit=1"]).data.val_source)
    assert len(gsm8k) == 1319 and gsm8k[0]["answer"] == "18"
