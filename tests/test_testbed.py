"""The multi-path testbed: countdown_steps solver, verifier, splits, diversity metrics and experiment configs."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest

from simko.data.countdown_steps import CountdownStepsSource, solve
from simko.metrics.diversity import SolutionDiversity, problem_diversity, solution_keys, text_key
from simko.rewards import build_verifier, score_batch
from simko.rewards.countdown_steps import MAX_COMPLETION_CHARS, Step, chain_text, parse_chain, solution_key
from simko.rewards.logic import countdown_answer

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- solver against brute force ------------------------------------------------------------------------------


def brute_force_keys(numbers: list[int], target: int) -> set[str]:
    """Every solution by a different route than the solver: all expression TREES over subsets of the numbers
    (not chains of pool moves), exact fractions, each internal node one step; a tree counts when every node is a
    positive integer and the root is the target. Key: the sorted canonical steps, as the verifier writes them."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    indices = tuple(range(len(numbers)))
    trees: dict[tuple[int, ...], list[tuple[Fraction, tuple[str, ...]]]] = {}
    for size in range(1, len(numbers) + 1):
        for subset in itertools.combinations(indices, size):
            if size == 1:
                trees[subset] = [(Fraction(numbers[subset[0]]), ())]
                continue
            found = []
            for left_size in range(1, size):
                for left in itertools.combinations(subset, left_size):
                    right = tuple(i for i in subset if i not in left)
                    for (lv, ls), (rv, rs) in itertools.product(trees[left], trees[right]):
                        for op, fn in ops.items():
                            if op == "/" and rv == 0:
                                continue
                            value = fn(lv, rv)
                            if value <= 0 or value.denominator != 1:
                                continue
                            a, b = int(lv), int(rv)
                            if op in "+*" and a < b:
                                a, b = b, a
                            found.append((value, ls + rs + (f"{a}{op}{b}={int(value)}",)))
            trees[subset] = found
    return {";".join(sorted(steps)) for value, steps in trees[indices] if value == target}


def solver_keys(numbers: list[int], target: int) -> set[str]:
    return {solution_key(chain_text(chain), countdown_answer(numbers, target)) for chain in solve(numbers, target)}


def test_solver_finds_exactly_the_brute_force_solutions_on_all_small_problems():
    checked = solved = 0
    for numbers in itertools.combinations_with_replacement(range(1, 6), 3):
        for target in range(1, 40):
            expected = brute_force_keys(list(numbers), target)
            chains = solve(list(numbers), target)
            assert len(chains) == len(expected), (numbers, target)
            assert solver_keys(list(numbers), target) == expected, (numbers, target)
            checked += 1
            solved += bool(expected)
    assert checked == 35 * 39 and solved > 300  # the sweep covers solvable and unsolvable problems


def test_solver_matches_brute_force_on_random_four_number_problems():
    rng = random.Random(0)
    many = 0
    for _ in range(40):
        numbers, target = [rng.randint(1, 9) for _ in range(4)], rng.randint(10, 50)
        expected = brute_force_keys(numbers, target)
        assert solver_keys(numbers, target) == expected, (numbers, target)
        assert len(solve(numbers, target)) == len(expected)
        many += len(expected) >= 3
    assert many >= 10


def test_every_solver_chain_is_correct_and_one_per_solution():
    numbers, target = [3, 5, 7, 9], 24
    chains = solve(numbers, target)
    texts = [chain_text(chain) for chain in chains]
    answer = countdown_answer(numbers, target)
    assert len(chains) >= 3 and len(set(texts)) == len(texts)
    assert score_batch(texts, [answer] * len(texts), "countdown_steps") == [1.0] * len(texts)
    keys = [solution_key(text, answer) for text in texts]
    assert None not in keys and len(set(keys)) == len(keys)
    assert solve([9, 7, 5, 3], 24) == chains  # the order of the numbers does not matter
    assert solve([1, 1], 5) == []
    with pytest.raises(ValueError, match="positive"):
        solve([0, 3], 3)


# --- verifier ---------------------------------------------------------------------------------------------------

ANSWER = countdown_answer([3, 5, 7, 9], 17)  # 9-7=2, 5*3=15, 15+2=17


@pytest.mark.parametrize(
    "completion",
    [
        "9-7=2\n5*3=15\n15+2=17",
        "5*3=15\n9-7=2\n15+2=17",  # independent lines in another order
        "3*5=15\n9-7=2\n2+15=17",  # operands of + and * in either order
        " 9 - 7 = 2 \n\n5*3=15\n15+2=17\n",  # spaces and blank lines
    ],
)
def test_verifier_accepts_correct_chains(completion):
    assert build_verifier("countdown_steps")(completion, ANSWER) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "9-7=2\n5*3=15\n15+2=18",  # wrong arithmetic on the last line
        "9-7=3\n5*3=15\n15+3=18",  # a wrong intermediate, then used consistently
        "9-7=2\n5*3=15",  # does not use every number
        "9-7=2\n5*3=15\n15+2=17\n17-2=15",  # uses a number twice
        "7-9=-2\n5*3=15\n15-2=13",  # negative intermediate (not a step)
        "9-9=0\n5*3=15",  # a number the problem does not have
        "7/2=3\n9*5=45",  # inexact division
        "09-7=2\n5*3=15\n15+2=17",  # the evaluator reads decimal literals only
        "9-7=2\n5*3=15\n15+2=17\nso the answer is 17",  # text besides the steps
        "9-7=2\n5*3=15\n15+2=17=17",
        "\u0669-7=2\n5*3=15\n15+2=17",  # a Unicode digit
        "__import__('os').system('true')",
        "",
    ],
)
def test_verifier_rejects_wrong_or_malformed_chains(completion):
    verifier = build_verifier("countdown_steps")
    assert verifier(completion, ANSWER) == 0.0
    assert verifier.num_errors == 0  # a wrong completion is a plain 0, not an error


def test_verifier_rejects_zero_intermediates_and_is_bounded():
    answer = countdown_answer([4, 4, 5], 5)
    verifier = build_verifier("countdown_steps")
    assert verifier("4-4=0\n5+0=5", answer) == 0.0  # intermediates must be positive
    assert verifier("4/4=1\n5*1=5", answer) == 1.0
    # Only the first MAX_COMPLETION_CHARS characters are read: a correct chain after them does not count.
    assert verifier(" " * MAX_COMPLETION_CHARS + "4/4=1\n5*1=5", answer) == 0.0
    assert parse_chain("9" * 10 + "+1=" + "9" * 10) is None  # numbers have at most MAX_DIGITS digits
    assert verifier("4/4=1\n5*1=5", "not json") == 0.0 and verifier.num_errors == 1  # a bad gold is an error


def test_solution_key_identifies_reorderings_and_nothing_else():
    first = solution_key("9-7=2\n5*3=15\n15+2=17", ANSWER)
    assert first == solution_key("3*5=15\n9-7=2\n2+15=17", ANSWER) == "15+2=17;5*3=15;9-7=2"
    assert solution_key("9+3=12\n12-7=5\n5*5=25", ANSWER) is None  # not a correct chain
    # (9+5)+3 and 9+(5+3) are different chains of computation: different solutions.
    answer = countdown_answer([9, 5, 3, 1], 18)
    assert solution_key("9+5=14\n14+3=17\n17+1=18", answer) != solution_key("5+3=8\n9+8=17\n17+1=18", answer)
    assert Step(3, "*", 5, 15).canonical() == Step(5, "*", 3, 15)


# --- data splits --------------------------------------------------------------------------------------------------


def _key(example: dict) -> str:
    gold = json.loads(example["answer"])
    return f"{sorted(gold['numbers'])} -> {gold['target']}"


def test_splits_are_disjoint_and_held_out_problems_distinct():
    train = {_key(CountdownStepsSource(seed=s, split="train").example(i)) for s in (0, 1) for i in range(800)}
    val_source, test_source = CountdownStepsSource(split="val"), CountdownStepsSource(split="test")
    val = [_key(val_source.example(i)) for i in range(300)]
    test = [_key(test_source.example(i)) for i in range(300)]
    assert len(set(val)) == len(val) and len(set(test)) == len(test)  # distinct problems
    assert not train & set(val) and not train & set(test) and not set(val) & set(test)


def test_examples_are_deterministic_valid_and_filtered():
    source = CountdownStepsSource(seed=3, split="train", min_solutions=4)
    again = CountdownStepsSource(seed=3, split="train", min_solutions=4)
    examples = [source.example(i) for i in range(200)]
    assert examples == [again.example(i) for i in range(200)]
    assert examples != [CountdownStepsSource(seed=4, split="train", min_solutions=4).example(i) for i in range(200)]
    for example in examples:
        gold = json.loads(example["answer"])
        assert len(gold["numbers"]) == 4 and all(1 <= n <= 9 for n in gold["numbers"])
        assert 10 <= gold["target"] <= 50 and example["num_solutions"] >= 4
        assert example["question"] == " ".join(map(str, gold["numbers"])) + f" -> {gold['target']}"
        assert example["num_solutions"] == len(solve(gold["numbers"], gold["target"]))
    scores = score_batch([e["solution"] for e in examples], [e["answer"] for e in examples], "countdown_steps")
    assert scores == [1.0] * len(examples)


def test_train_solutions_are_drawn_uniformly_among_the_correct_ones():
    source = CountdownStepsSource(seed=0, split="train")
    positions, sizes = [], []
    for i in range(3000):
        example = source.example(i)
        gold = json.loads(example["answer"])
        texts = [chain_text(chain) for chain in solve(gold["numbers"], gold["target"])]
        positions.append(texts.index(example["solution"]))
        sizes.append(len(texts))
    # Uniform over the n solutions: E[(i + 1/2) / n] = 1/2, and the first (last) solution is drawn with
    # probability 1/n each time: observed counts within 4 standard deviations of their expectation.
    assert abs(sum((i + 0.5) / n for i, n in zip(positions, sizes)) / len(sizes) - 0.5) < 0.02
    expected = sum(1 / n for n in sizes)
    sigma = math.sqrt(sum((1 / n) * (1 - 1 / n) for n in sizes))
    for observed in (sum(i == 0 for i in positions), sum(i == n - 1 for i, n in zip(positions, sizes))):
        assert abs(observed - expected) < 4 * sigma, (observed, expected, sigma)


def test_problem_space_counts_every_problem_once():
    small = dict(min_numbers=3, max_numbers=3, min_value=1, max_value=4, min_target=5, max_target=12)
    space = CountdownStepsSource(**small, min_solutions=2).problem_space()
    assert space["problems"] == 20 * 8  # C(4 + 3 - 1, 3) multisets of 3 values in 1..4, 8 targets
    kept = [(m, t) for m in itertools.combinations_with_replacement(range(1, 5), 3) for t in range(5, 13)
            if len(brute_force_keys(list(m), t)) >= 2]  # fmt: skip
    assert space["kept"] == len(kept) == space["train"] + space["val"] + space["test"] > 0
    assert space["mean_solutions"] == pytest.approx(sum(len(brute_force_keys(list(m), t)) for m, t in kept) / len(kept))
    longest = max(len(chain_text(c)) for m, t in kept for c in solve(list(m), t))
    assert space["longest_solution_chars"] == longest >= len("4*4=16\n16-4=12")


def test_source_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        CountdownStepsSource(split="dev")
    with pytest.raises(ValueError, match="test_fraction"):
        CountdownStepsSource(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="min_solutions"):
        CountdownStepsSource(min_solutions=5, max_solutions=2)
    with pytest.raises(ValueError, match="passed the filters"):  # no test problem at all
        CountdownStepsSource(split="test", min_value=1, max_value=2, min_target=10, max_target=10).example(0)
    few = CountdownStepsSource(split="test", max_value=3, min_target=10, max_target=12, min_solutions=1)
    few.example(0)
    with pytest.raises(ValueError, match="distinct"):  # a handful of test problems, 50 asked for
        few.example(50)


# --- diversity metrics ----------------------------------------------------------------------------------------


def test_problem_diversity_by_hand():
    row = problem_diversity(["a", "a", "b", None], num_solutions=4)
    assert row["distinct_correct"] == 2
    assert row["solution_entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert row["solution_coverage"] == 0.5
    one = problem_diversity(["a", "a"])
    assert one["distinct_correct"] == 1 and one["solution_entropy"] == 0.0 and math.isnan(one["solution_coverage"])
    none = problem_diversity([None, None], num_solutions=3)
    assert none["distinct_correct"] == 0 and math.isnan(none["solution_entropy"]) and none["solution_coverage"] == 0


def test_solution_diversity_metric_means_over_problems():
    metric = SolutionDiversity()
    metric.update([["a", "b", "c", "d"], [None, None, None, None]], num_solutions=[8, 2])
    metric.update([["x", "x", None, "y"]], num_solutions=[None])
    out = metric.compute()
    assert out["distinct_correct"] == pytest.approx((4 + 0 + 2) / 3)
    # Entropy over the solved problems only: ln 4 and the (2/3, 1/3) split.
    assert out["solution_entropy"] == pytest.approx((math.log(4) + 0.6365141682948128) / 2)
    assert out["solution_coverage"] == pytest.approx((4 / 8 + 0 / 2) / 2)  # where the solution count is known
    with pytest.raises(ValueError, match="solution counts"):
        metric.update([["a"]], num_solutions=[1, 2])


def test_solution_keys_use_the_task_key_or_the_text():
    answer = countdown_answer([3, 5, 7], 22)
    keys = solution_keys(
        ["3*5=15\n15+7=22", "5*3=15\n7+15=22", "7+5=12", "46", " 46\n"],
        [answer, answer, answer, "46", "46"],
        ["countdown_steps", "countdown_steps", "countdown_steps", "exact", "exact"],
        [True, True, False, True, True],
    )
    assert keys[0] == keys[1] == "15+7=22;5*3=15" and keys[2] is None
    assert keys[3] == keys[4] == text_key("46", "46") == "46"


# --- experiment configs: splits, paired seeds, one warm start --------------------------------------------------


@pytest.fixture(scope="module")
def compose_config():
    import os

    from hydra import compose, initialize_config_dir

    previous = os.environ.get("PROJECT_ROOT")
    os.environ["PROJECT_ROOT"] = str(REPO_ROOT)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        yield lambda name, overrides: compose(name, overrides=overrides)
    if previous is None:
        os.environ.pop("PROJECT_ROOT", None)
    else:
        os.environ["PROJECT_ROOT"] = previous


def _resolved(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def test_testbed_seeds_are_paired_across_losses_and_share_one_warm_start(compose_config):
    from hydra.utils import instantiate

    grpo = compose_config("train", ["experiment=testbed", "loss=grpo", "seed=3"])
    simko = compose_config("train", ["experiment=testbed", "loss=simko", "loss.alpha=0.1", "seed=3"])
    other_seed = compose_config("train", ["experiment=testbed", "loss=grpo", "seed=4"])
    assert simko.loss.name == "simko" and simko.loss.alpha == 0.1 and grpo.loss.name == "grpo"
    # Same seed: same data (order included) and sampling seed; any seed: the same warm start.
    assert _resolved(grpo.data) == _resolved(simko.data) and grpo.module.seed == simko.module.seed == 3
    first = [instantiate(c.data, tokenizer=None).examples_for_step(0) for c in (grpo, simko, other_seed)]
    assert first[0] == first[1] and first[0] != first[2]
    model = _resolved(grpo.model)
    assert model == _resolved(simko.model) == _resolved(other_seed.model)
    assert model["warm_start_source"]["source"] == "simko.data.countdown_steps.CountdownStepsSource"
    # The warm start of simko.eval's protocol and of simko.sft is the same cache entry as training's.
    evaluation = compose_config("eval", ["experiment=testbed_eval"])
    sft = compose_config("sft", ["experiment=testbed_task"])
    assert _resolved(evaluation.model) == model == _resolved(sft.model)
    # In-loop validation on the val split; the evaluation protocol on the test split, n = 256 on 200 problems.
    assert grpo.data.val_source.split == "val" and evaluation.data.val_source.split == "test"
    assert evaluation.eval.n == 256 and evaluation.data.val_prompts == 200
    assert evaluation.eval.max_new_tokens == grpo.rollout.max_new_tokens


def _reproduce_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_reproduce_sweep_names_selection_and_paired_statistics():
    reproduce = _reproduce_module()
    assert reproduce.setting_name(0.01, 1.1, 0.8) == "simko"  # the paper's defaults are the simko arm
    assert reproduce.parse_setting(reproduce.setting_name(0.05, 1.5, 0.5)) == (0.05, 1.5, 0.5)
    assert reproduce.TESTBED.train_args("simko_a0.1_l1.5_t0.5")[:5] == [
        "experiment=testbed", "loss=simko", "loss.alpha=0.1", "loss.lam=1.5", "loss.tau=0.5"
    ]  # fmt: skip
    assert reproduce.TESTBED.train_args("nsr")[:2] == ["experiment=testbed", "loss=nsr"]
    assert len(reproduce.TESTBED.sweep) == 12 and reproduce.PAPER_SIMKO in reproduce.TESTBED.sweep
    assert reproduce.choose_setting({"simko_a0.1_l1.5_t0.5": 0.4, "simko": 0.5}) == "simko"
    assert reproduce.choose_setting({"simko_a0.1_l1.5_t0.5": 0.5, "simko": 0.5}) == "simko"  # ties: the defaults
    assert reproduce.choose_setting({"simko": 0.4, "simko_a0.1_l1.5_t0.5": 0.5}) == "simko_a0.1_l1.5_t0.5"
    assert reproduce.selection_score({"pass_at_k": {"1": 0.2, "2": 0.4, "4": 0.9}}) == pytest.approx(0.5)
    stats = reproduce.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])  # per-seed values: differences 0.1, 0.2, 0.3
    assert stats["mean"] == pytest.approx(0.2) and 0.1 - 1e-12 <= stats["low"] < 0.2 < stats["high"] <= 0.3 + 1e-12
    assert stats["wins"] == 3 and stats["established"]  # every resample of the seeds is above 0
    assert not reproduce.paired([0.5, 0.3, 0.6], [0.4, 0.4, 0.4])["established"]  # 0.1, -0.1, 0.2: 0 inside
    names = {(toy, quick): [t.name for t in reproduce.selected_toys(toy, quick)] for toy in (None, "both")
             for quick in (False, True)}  # fmt: skip
    assert names == {(None, False): ["arithmetic", "testbed"], (None, True): ["testbed"],
                     ("both", False): ["arithmetic", "testbed"], ("both", True): ["arithmetic", "testbed"]}  # fmt: skip


def test_reproduce_sweep_orchestration_and_report_with_a_fake_runner(tmp_path):
    """The testbed grid's control flow without subprocesses (2 jobs in threads): the sweep runs on one seed and is
    scored on the val split, the chosen setting then runs every seed (reusing the sweep's run), a run two jobs
    need is trained once, and the report and figures follow."""
    import dataclasses

    import pandas as pd

    from simko.metrics.uncertainty import summarize_counts

    reproduce = _reproduce_module()
    calls = []

    class FakeRunner(reproduce.Runner):
        def _command(self, module, overrides, run_dir, done):
            if done.exists():
                return
            assert not run_dir.exists(), f"{run_dir} started twice"
            calls.append((module, run_dir.parent.name, run_dir.name))
            # The sweep's simko_seed0 (submitted first) is slow, so the other job asks for it meanwhile.
            time.sleep(1.0 if run_dir.name == "simko_seed0" and module == "simko.train" else 0.02)
            good = 0.3 if "a0.1_l1.5_t0.5" in run_dir.name else 0.0  # the setting that should win the sweep
            if module == "simko.train":
                done.parent.mkdir(parents=True)
                done.write_bytes(b"")
                steps = range(1, 4)
                frame = pd.DataFrame({"train/rl_step": list(steps), "train/reward": [0.2 + good] * 3,
                                      "val/pass@4": [0.5] * 3, "val/distinct_correct": [2.0] * 3,
                                      "diag/p_rank1": [0.8] * 3, "diag/p_rank2": [0.1] * 3,
                                      "diag/p_rank1_hi": [0.6] * 3})  # fmt: skip
                (run_dir / "csv").mkdir()
                frame.to_csv(run_dir / "csv" / "metrics.csv", index=False)
            else:
                split = next(o.split("=")[1] for o in overrides if o.startswith("data.val_source.split="))
                run_dir.mkdir(parents=True)
                counts = [3, 1, 2, 2, 3, 1, 2, 2] if good else [1] * 8  # pass@1 0.5 (the winner) or 0.25, n = 4
                summary = summarize_counts([counts], 4, [1, 2, 4], [0.5, 1.0])
                summary |= {"n": 4, "num_problems": 8,
                            "diversity": {"distinct_correct": 2.0 + good, "solution_entropy": 0.5},
                            "diagnostics": {"p_rank1": 0.8}, "response_tokens": 20.0,
                            "config": {"data": "x.CountdownStepsSource", "dataset": "countdown_steps", "split": split,
                                       "eval": {"temperature": 1.0, "top_p": 1.0}, "ckpt_path": None}}  # fmt: skip
                ids = [f"p{i}" for i in range(8)][:: 1 if "seed1" in run_dir.name else -1]  # matched by id
                rows = {"id": ids, "c": counts[:: 1 if "seed1" in run_dir.name else -1], "n": [4] * 8}
                pd.DataFrame(rows).to_csv(run_dir / "per_problem.csv", index=False)
                done.write_text(json.dumps(summary))

    toy = dataclasses.replace(
        reproduce.TESTBED,
        arms=("grpo", "simko", "simko_tuned"),
        seeds=(0, 1, 2),
        n=4,
        problems=8,
        sweep=((0.01, 1.1, 0.8), (0.1, 1.5, 0.5)),
    )
    runner = FakeRunner(jobs=2, extra=[])
    state = reproduce.run_toy(toy, runner, tmp_path, None, [])
    reproduce.finish_sweep(toy, state, runner, tmp_path, [])
    reproduce.wait(state["futures"])
    assert not runner.failures
    assert state["selection"]["chosen"] == "simko_a0.1_l1.5_t0.5"
    trained = sorted(name for module, folder, name in calls if module == "simko.train")
    assert trained == sorted(
        ["simko_a0.1_l1.5_t0.5_seed0", "simko_a0.1_l1.5_t0.5_seed1", "simko_a0.1_l1.5_t0.5_seed2"]
        + [f"{arm}_seed{s}" for arm in ("grpo", "simko") for s in range(3)]
    )  # the sweep on seed 0 only; the chosen setting's seed-0 run is reused; the simko arm's seed 0 (also a sweep
    # setting, the paper's defaults) trained once though two jobs asked for it
    val_evals = sorted(name for module, folder, name in calls if folder == "eval_val")
    assert val_evals == ["simko_a0.1_l1.5_t0.5_seed0", "simko_seed0"]
    text = reproduce.write_report(toy, state, tmp_path, 1.0, runner)
    tuned = "simko_tuned (simko_a0.1_l1.5_t0.5)"
    payload = json.loads((tmp_path / "testbed" / "results.json").read_text())
    low, high = payload["intervals"][tuned]["pass_at_k_ci95"]["1"]
    assert f"| {tuned} | 0.500 [{low:.3f}, {high:.3f}] |" in text and low < 0.5 < high  # over seeds and problems
    assert "| model | cover@0.1 | cover@0.3 |" in text  # the cover@tau table
    assert f"| {tuned} | +6.0 / −0.0 | +0.0 / −0.0 |" in text  # transitions: c >= 2 of 4 on 6 problems, against 1
    paired = payload["paired_to_grpo"][tuned]["pass@1"]
    assert paired["mean"] == pytest.approx(0.25) and paired["wins"] == 3 and paired["low"] > 0 and paired["established"]
    assert f"| {tuned} | **+0.250 [{paired['low']:+.3f}, {paired['high']:+.3f}] (3/0)** |" in text  # paired Δ pass@1
    assert payload["paired_to_grpo"]["simko"]["pass@1"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "wins": 0,
                                                            "losses": 0, "seeds": 3, "established": False}  # fmt: skip
    for figure in ("pass_at_k.png", "training.png", "frontier.png"):
        assert (tmp_path / "testbed" / figure).stat().st_size > 0


# --- the warm start on the testbed's solutions -------------------------------------------------------------------


def test_warm_start_trains_on_solutions_and_scores_greedy_chains_with_the_verifier(tmp_path):
    import torch

    from simko.models import build_char_tokenizer, load_tiny, warm_start_metadata
    from simko.models.tiny import DEFAULT_TASK
    from simko.models.warm_start import IGNORE_INDEX, completion_batch, greedy_accuracy

    tokenizer = build_char_tokenizer()
    example = CountdownStepsSource(split="train").example(0)
    batch = completion_batch(tokenizer, [example], "{question}\n")
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labels, skip_special_tokens=True) == example["solution"]  # the chain, not the gold JSON

    class Scripted(torch.nn.Module):
        """generate() answers prompt i with a scripted completion: right for the first example, wrong after."""

        def __init__(self, completions):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.completions = completions

        def generate(self, input_ids, max_new_tokens, **kwargs):
            rows = [
                tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in self.completions
            ]
            width = max(map(len, rows))
            rows = [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
            return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    examples = [CountdownStepsSource(split="val").example(i) for i in range(2)]
    # A right chain other than the example's own solution: the verifier decides, not a string match.
    other = next(c for c in solve(*_gold(examples[0])) if chain_text(c) != examples[0]["solution"])
    model = Scripted([chain_text(other), examples[0]["solution"]])  # the second is right for the first problem only
    assert greedy_accuracy(model, tokenizer, examples, "{question}\n") == 0.5

    small = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    few = dict(warm_start_steps=2, warm_start_batch_size=4, warm_start_warmup_steps=1, eval_problems=4)
    source = {"source": "simko.data.countdown_steps.CountdownStepsSource", "min_solutions": 4}
    model, _ = load_tiny(
        cache_dir=str(tmp_path), **small, **few, warm_start_source=source, prompt_template="{question}\n"
    )
    metadata = warm_start_metadata(model.name_or_path)
    assert metadata["warm_start"]["task"] == source and 0 <= metadata["val_greedy_accuracy"] <= 1
    arithmetic, _ = load_tiny(cache_dir=str(tmp_path), **small, **few)
    assert arithmetic.name_or_path != model.name_or_path
    assert warm_start_metadata(arithmetic.name_or_path)["warm_start"]["task"] == DEFAULT_TASK  # unchanged key


def _gold(example: dict) -> tuple[list[int], int]:
    gold = json.loads(example["answer"])
    return gold["numbers"], gold["target"]


def test_cached_tiny_tokenizer_keeps_spaces_and_newlines(tmp_path):
    """The testbed's prompts and chains have spaces and newlines: the tokenizer load_tiny loads back from its cache
    must tokenize them as build_char_tokenizer does (AutoTokenizer picked Qwen2Tokenizer, which dropped them)."""
    from simko.models import build_char_tokenizer, load_tiny

    small = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    _, tokenizer = load_tiny(cache_dir=str(tmp_path), **small, warm_start_steps=0, eval_problems=0)
    text = "5 1 2 1 -> 11\n9-7=2\n"
    expected = build_char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected and len(expected) == len(text)
    assert tokenizer.decode(expected) == text


def test_eval_diagnostics_rows_are_the_first_samples_of_each_problem():
    from simko.eval import _diagnostics_rows

    assert _diagnostics_rows(2, 4, 2).tolist() == [0, 1, 4, 5]
    assert _diagnostics_rows(2, 3, None).tolist() == [0, 1, 2, 3, 4, 5]
    assert _diagnostics_rows(1, 3, 8).tolist() == [0, 1, 2]  # more than n: all of them


def test_reproduce_refuses_to_mix_grid_settings_in_one_folder(tmp_path):
    """Runs are reused by folder name: runs of 40 steps (a quick grid) must never stand in for the full grid's."""
    import dataclasses

    reproduce = _reproduce_module()
    reproduce.check_grid_settings(reproduce.TESTBED, tmp_path, [], [])
    fewer_arms = dataclasses.replace(reproduce.TESTBED, arms=("grpo",))
    reproduce.check_grid_settings(fewer_arms, tmp_path, [], [])
    with pytest.raises(SystemExit, match="another grid setting"):
        reproduce.check_grid_settings(dataclasses.replace(reproduce.TESTBED, rl_steps=40), tmp_path, [], [])
    with pytest.raises(SystemExit, match="another --out"):
        reproduce.check_grid_settings(reproduce.TESTBED, tmp_path, [], ["paths.cache_dir=/elsewhere"])


def test_reproduce_report_leaves_diversity_out_for_one_answer_per_problem(tmp_path):
    """The arithmetic toy has one answer per problem: its distinct_correct is pass@n and its solution entropy 0,
    so neither goes in its tables or figures (the report printed both, and a Δ distinct_correct equal to Δ pass@n,
    before). The testbed's summaries carry a finite solution_coverage and keep them."""
    import dataclasses
    import types

    import pandas as pd

    from simko.metrics.uncertainty import summarize_counts

    reproduce = _reproduce_module()
    for toy, coverage in ((reproduce.ARITHMETIC, float("nan")), (reproduce.TESTBED, 0.5)):
        toy = dataclasses.replace(toy, arms=("grpo", "simko"), seeds=(0, 1), sweep=())
        folder = tmp_path / toy.name
        for run in ("base", "grpo", "simko"):
            for seed in (0, 1):
                counts = {"base": [0, 0, 1, 1, 0, 1, 0, 0], "grpo": [1, 0, 1, 1, 0, 1, 0, 1],
                          "simko": [1, 1, 1, 1, 0, 1, 0, 1]}[run]  # fmt: skip
                summary = summarize_counts([counts], 2, [1, 2], [0.5, 1.0])
                summary |= {"n": 2, "num_problems": 8,
                            "diversity": {"distinct_correct": 0.3 + sum(counts) / 100, "solution_entropy": 0.0,
                                          "solution_coverage": coverage},
                            "diagnostics": {"p_rank1": 0.8}, "response_tokens": 3.0,
                            "config": {"data": "x.Source", "eval": {"temperature": 1.0}}}  # fmt: skip
                (folder / "eval" / f"{run}_seed{seed}").mkdir(parents=True)
                (folder / "eval" / f"{run}_seed{seed}" / "pass_at_k.json").write_text(json.dumps(summary))
                per_problem = pd.DataFrame({"id": range(8), "c": counts, "n": 2})
                per_problem.to_csv(folder / "eval" / f"{run}_seed{seed}" / "per_problem.csv", index=False)
                if run != "base":
                    (folder / "train" / f"{run}_seed{seed}" / "csv").mkdir(parents=True)
                    frame = pd.DataFrame({"train/rl_step": [1, 2], "train/reward": [0.2, 0.3],
                                          "val/distinct_correct": [1.0, 1.0], "diag/p_rank1": [0.8, 0.8],
                                          "diag/p_rank1_hi": [0.6, 0.6]})  # fmt: skip
                    frame.to_csv(folder / "train" / f"{run}_seed{seed}" / "csv" / "metrics.csv", index=False)
        runner = types.SimpleNamespace(executed=[])
        text = reproduce.write_report(toy, {"arms": toy.arms}, tmp_path, 1.0, runner)
        paths = toy.name == "testbed"
        assert ("distinct_correct" in text) == paths and ("solution_entropy" in text) == paths
        assert "| model | Δ pass@1 | Δ pass@2 |" in text  # the mid and the last k are one column here
        assert "| simko | +0.062 [+0.000, +0.188] (2/0) | +0.125 [+0.000, +0.375] (2/0) |" in text  # paired Δ pass@k
        assert (folder / "pass_at_k.png").stat().st_size > 0 and (folder / "training.png").stat().st_size > 0


def test_reproduce_every_testbed_arm_composes_and_builds_its_loss(compose_config):
    """Each arm of the testbed grid (and a SimKO sweep setting) as reproduce.py passes it to simko.train composes in
    process and builds its loss; the table's extra overrides reach the config (kl_cov_mb2: 2 mini-batches)."""
    from hydra.utils import instantiate

    reproduce = _reproduce_module()
    toy = reproduce.TESTBED
    assert set(reproduce.NEW_ARMS) <= set(toy.arms) and set(toy.arms) - {"simko_tuned"} <= set(reproduce.TESTBED_ARMS)
    configs = {}
    for arm in [*reproduce.TESTBED_ARMS, reproduce.setting_name(0.05, 1.1, 0.8)]:
        cfg = compose_config("train", [*toy.train_args(arm), "seed=0"])
        assert cfg.task_name == "testbed" and cfg.rl_steps == 60, arm
        loss = instantiate(cfg.loss)
        assert loss is not None, arm
        configs[arm] = cfg
    assert configs["kl_cov_mb2"].loss.name == configs["kl_cov"].loss.name == "kl_cov"
    assert configs["kl_cov_mb2"].module.num_mini_batches == 2 and configs["kl_cov"].module.num_mini_batches == 1
    assert configs["maxrl"].loss.advantage == "maxrl" and configs["sapo"].loss.name == "sapo"
    assert configs["entropy_control"].loss.entropy_control.method == "entropic"
    assert configs["simko_a0.05_l1.1_t0.8"].loss.alpha == 0.05
    with pytest.raises(ValueError, match="unknown arm 'kl_cov_mb3'"):
        toy.train_args("kl_cov_mb3")


def test_reproduce_grid_runs_seed_major_and_large_n_picks_its_runs(tmp_path):
    """Every arm at a seed before the next seed (a stopped grid leaves whole seeds); --large-n-arms resolves base,
    simko_tuned (the one SimKO setting among the arms) and best_new (on test when no val evaluation exists)."""
    import json
    from dataclasses import replace

    reproduce = _reproduce_module()
    setting = reproduce.setting_name(0.05, 1.1, 0.8)
    toy = replace(reproduce.TESTBED, arms=("grpo", "maxrl", "sapo", setting), seeds=(0, 1), sweep=())

    class Recorder:
        def __init__(self):
            self.steps = []

        def submit(self, steps):
            self.steps.append(steps)

    runner = Recorder()
    state = reproduce.run_toy(toy, runner, tmp_path, None, [])
    order = [steps[0][2].name for steps in runner.steps]
    assert order == [f"{run}_seed{s}" for s in (0, 1) for run in ("base", *toy.arms)]
    for arm, score in (("maxrl", 0.3), ("sapo", 0.5)):
        for seed in (0, 1):
            path = tmp_path / "testbed" / "eval" / f"{arm}_seed{seed}" / "pass_at_k.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"pass_at_k": {"1": score, "2": score + seed * 0.1}}))
    runs = reproduce.large_n_runs(toy, state, tmp_path, ["base", "grpo", "simko_tuned", "best_new"], [0])
    assert runs == {"base": None, "grpo": "grpo", "simko_tuned": setting, "best_new": "sapo"}
    assert state["best_new"]["split"].startswith("test")
    step = reproduce.large_n_step(toy, tmp_path, "sapo", 0, 1024)
    assert step[2] == tmp_path / "testbed" / "eval_n1024" / "sapo_seed0" and "eval.n=1024" in step[1]
