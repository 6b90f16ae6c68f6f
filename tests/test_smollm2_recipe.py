"""The SmolLM2 recipe (configs/experiment/smollm2_math_level1*.yaml, scripts/smollm2_recipe.py) without running it:
its configs compose and build as the CLI builds them (the tiny model and the HF engine substituted, so no vLLM and no
SmolLM2 weights are needed), its GPU twin composes, the script's plan is the documented commands (each composes), its
bootstrap interval is right, and its report is written from runs on disk."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from helpers import UNTRAINED_TINY, compose_config, shared_file
from simko.losses.grpo import GRPOLoss
from simko.losses.simko import SimKOLoss
from simko.train import build

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "{question}\nGive a short solution (at most three sentences) and put the final answer in \\boxed{{}}."


def load_recipe_script():
    spec = importlib.util.spec_from_file_location("smollm2_recipe", REPO / "scripts" / "smollm2_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def project_root(monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(REPO))


@pytest.mark.parametrize("loss", ["grpo", "simko"])
def test_recipe_composes_and_builds_with_its_pinned_settings(compose_train, loss):
    shared_file("simko-official/math/train.parquet")
    shared_file("simko-official/math/test.parquet")
    as_shipped = compose_train("experiment=smollm2_math_level1", f"loss={loss}")
    assert as_shipped.model._target_ == "simko.models.load_smollm2"
    assert as_shipped.rollout.engine == "vllm" and as_shipped.rollout.vllm.kv_cache_gib == 2.0
    assert as_shipped.data.use_chat_template is True and as_shipped.data.prompt_template == TEMPLATE
    assert as_shipped.rl_steps == 40 and as_shipped.trainer.val_check_interval == 20
    checkpoints = as_shipped.callbacks.model_checkpoint
    assert (checkpoints.last_every_n_steps, checkpoints.every_n_steps) == (5, 0)

    # built as simko.train builds it, with the tiny model, the HF engine and no chat template (the tiny has none)
    cfg = compose_train(
        "experiment=smollm2_math_level1", f"loss={loss}", "model=tiny", *UNTRAINED_TINY, "rollout.engine=hf",
        "data.use_chat_template=null", "model.max_position_embeddings=4096",
    )  # fmt: skip
    module, datamodule, trainer = build(cfg)
    assert type(module.loss_fn) is {"grpo": GRPOLoss, "simko": SimKOLoss}[loss]
    assert (module.group_size, module.max_new_tokens, module.temperature, module.top_p) == (8, 128, 0.7, 1.0)
    assert module.val_sampling == {"group_size": 4, "temperature": 0.7, "top_p": 1.0}
    assert (module.micro_batch_size, module.ppo_epochs, module.num_mini_batches) == (8, 1, 1)
    assert module.dynamic_sampling.enabled and module.dynamic_sampling.max_extra_generations == 3
    optimizer = module.optimizer_factory([__import__("torch").nn.Parameter(__import__("torch").zeros(1))])
    assert optimizer.param_groups[0]["lr"] == 1e-5
    assert trainer.max_steps == 40
    assert datamodule.prompts_per_step == 4 and datamodule.val_prompts == 32
    assert len(datamodule.train_source) == 564 and len(datamodule.val_source) == 437  # MATH Level 1: train, test


def test_recipe_prompt_is_the_chatml_of_smollm2():
    """What SmolLM2 reads: its ChatML template with the default system message the template adds, the question and
    the instruction, and the assistant turn opened (the response ends with its EOS, <|im_end|>)."""
    from simko.data import render_prompt
    from simko.models.smollm2 import CACHE_NAME

    cached = REPO / "logs" / "cache" / CACHE_NAME
    if not (cached / "tokenizer.json").is_file():
        pytest.skip(f"the converted SmolLM2 checkpoint is not cached in {cached} (any model=smollm2-135m run makes it)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
    prompt = render_prompt({"question": "What is $1+1$?"}, tokenizer, TEMPLATE, use_chat_template=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is $1+1$?\nGive a short solution (at most three sentences) and put the final answer "
        "in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"


def test_recipe_gpu_twin_composes(compose_train):
    """The documented copy-paste path to GPUs: a Qwen2.5 model, FSDP2 on 8 GPUs, bf16 autocast over fp32 weights."""
    cfg = compose_train(
        "experiment=smollm2_math_level1", "model=hf", "model.name_or_path=/models/Qwen2.5-0.5B-Instruct",
        "trainer=fsdp2", "trainer.accelerator=gpu", "trainer.devices=8", "trainer.precision=bf16-mixed",
        "rollout.vllm.kv_cache_gib=null", "data.prompts_per_step=64", "module.micro_batch_size=16", "rl_steps=200",
    )  # fmt: skip
    assert cfg.model._target_ == "simko.models.load_pretrained" and cfg.model.dtype == "float32"
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert (cfg.trainer.devices, cfg.trainer.precision) == (8, "bf16-mixed")
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm.kv_cache_gib is None
    assert cfg.data.prompt_template == TEMPLATE and cfg.rollout.temperature == 0.7
    recipe = (REPO / "configs" / "experiment" / "smollm2_math_level1.yaml").read_text()
    assert "model.name_or_path=/models/Qwen2.5-0.5B-Instruct" in recipe and "trainer=fsdp2" in recipe


def test_eval_protocol_composes():
    cfg = compose_config(["experiment=smollm2_math_level1_eval"], config_name="eval")
    assert (cfg.eval.n, cfg.eval.limit, cfg.eval.temperature, cfg.eval.top_p) == (64, 100, 0.7, 1.0)
    assert cfg.eval.max_new_tokens == 128 and cfg.data.prompt_template == TEMPLATE
    assert cfg.rollout.engine == "vllm" and cfg.model._target_ == "simko.models.load_smollm2"


def test_plan_is_the_documented_commands_and_each_composes(tmp_path, capsys):
    recipe = load_recipe_script()
    recipe.main(["--dry-run", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# 9 commands, one at a time")
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 9
    kinds = [(c[2], next(o for o in c if o.startswith("hydra.run.dir=")).rsplit("/", 2)[-2:]) for c in commands]
    assert kinds == [
        ("simko.train", ["train", "grpo_seed0"]), ("simko.eval", ["eval", "base_seed0"]),
        ("simko.eval", ["eval", "grpo_seed0"]),
        ("simko.train", ["train", "simko_seed0"]), ("simko.eval", ["eval", "simko_seed0"]),
        ("simko.train", ["train", "grpo_seed1"]), ("simko.eval", ["eval", "grpo_seed1"]),
        ("simko.train", ["train", "simko_seed1"]), ("simko.eval", ["eval", "simko_seed1"]),
    ]  # fmt: skip
    for command in commands:
        overrides = [o for o in command[3:] if not o.startswith(("hydra.run.dir=", "ckpt_path="))]
        cfg = compose_config(overrides, config_name="train" if command[2] == "simko.train" else "eval")
        if command[2] == "simko.eval":  # every evaluation: n = 64 on 100 problems, sampled with seed 0
            assert (cfg.eval.n, cfg.eval.limit, cfg.seed) == (64, 100, 0)
            trained = [o for o in command if o.startswith("ckpt_path=")]
            assert not trained or trained[0].endswith(command[-1].rsplit("/", 1)[-1] + "/checkpoints/last.ckpt")
        else:
            assert cfg.rl_steps == 40 and "ckpt_path=last" in command  # a killed run continues where it stopped
    quick = load_recipe_script()
    quick.main(["--dry-run", "--quick", "--out", str(tmp_path / "q")])
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    train = [line for line in lines if "simko.train" in line]
    assert len(lines) == 5 and len(train) == 2
    assert all("rl_steps=3" in line and "data.val_prompts=8" in line for line in train)
    assert all("eval.n=8 eval.limit=16" in line for line in lines if "simko.eval" in line)


def test_bootstrap_interval_over_problems():
    recipe = load_recipe_script()
    constant = np.full(50, 0.25)
    assert recipe.bootstrap_interval_over_problems(constant) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(1)
    values = rng.random(400)
    mean, low, high = recipe.bootstrap_interval_over_problems(values, reps=4000)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(mean - 1.96 * se, abs=0.15 * se) and high == pytest.approx(
        mean + 1.96 * se, abs=0.15 * se
    )
    # paired: the interval of the difference, not of either side; problems resampled jointly
    shifted = values + 0.01
    assert recipe.bootstrap_interval_over_problems(shifted, values) == pytest.approx((0.01, 0.01, 0.01))
    counts = np.array([0, 1, 64, 32])
    assert recipe.per_problem_pass_at_k(counts, 64, 1).tolist() == pytest.approx([0, 1 / 64, 1, 0.5])
    assert recipe.per_problem_pass_at_k(counts, 64, 64).tolist() == [0.0, 1.0, 1.0, 1.0]


def _write_eval(folder: Path, counts: list[int], n: int, tokens: float) -> None:
    folder.mkdir(parents=True)
    with open(folder / "per_problem.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "c", "n"])
        writer.writeheader()
        writer.writerows({"id": f"math/test/{i}", "c": c, "n": n} for i, c in enumerate(counts))
    from simko.metrics import pass_at_k

    summary = {
        "pass_at_k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in (1, 2, 4, 8, 16)},
        "n": n, "num_problems": len(counts), "response_tokens": tokens, "truncated_frac": 0.1,
        "no_final_answer_frac": 0.5, "diagnostics": {"p_rank1": 0.8}, "seconds": {"generate": 1.0},
        "config": {"held_out": "LocalFileSource(test)",
                   "eval": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128}},
    }  # fmt: skip
    (folder / "pass_at_k.json").write_text(json.dumps(summary))


def _write_training_log(folder: Path, rewards: list[float]) -> None:
    (folder / "csv").mkdir(parents=True)
    with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
        columns = ["step", "train/rl_step", "train/reward", "train/response_len", "train/truncated_frac",
                   "diag/p_rank1", "diag/p_rank2", "diag/p_rank3", "diag/p_rank1_hi", "diag/p_rank2_hi",
                   "diag/p_rank3_hi", "time/generate", "time/score", "time/update", "time/weight_sync",
                   "val/pass@1"]  # fmt: skip
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerow([0, "", "", "", "", "", "", "", "", "", "", "", "", "", "", 0.05])
        for step, reward in enumerate(rewards, 1):
            val = 0.1 if step == len(rewards) else ""
            writer.writerow([step, step, reward, 60 - step, 0.1, 0.8, 0.1, 0.03, 0.5, 0.2, 0.1, 10, 0.5, 40, 0.3, val])


def test_report_from_runs_on_disk(tmp_path):
    """The report's tables and figures from evaluations and training logs on disk; an unfinished run is named."""
    recipe_script = load_recipe_script()
    recipe = recipe_script.configured(recipe_script.main.__globals__["argparse"].Namespace(
        quick=False, seeds=[0, 1], rl_steps=12, n=16, problems=6, losses=None))  # fmt: skip
    task = tmp_path / recipe.name
    _write_eval(task / "eval" / "base_seed0", [0, 1, 2, 0, 8, 0], 16, 70.0)
    for loss, seed, counts in (("grpo", 0, [1, 3, 4, 0, 12, 1]), ("simko", 0, [1, 2, 4, 1, 10, 0]),
                               ("grpo", 1, [2, 2, 5, 0, 9, 0]), ("simko", 1, [1, 3, 3, 1, 11, 1])):  # fmt: skip
        _write_eval(task / "eval" / f"{loss}_seed{seed}", counts, 16, 60.0)
        _write_training_log(task / "train" / f"{loss}_seed{seed}", [0.1 + 0.01 * s for s in range(12)])
    (task / "timings.jsonl").write_text(json.dumps({"module": "simko.train", "run": "grpo_seed0", "seconds": 600,
        "load_start": 1.2, "load_end": 3.4, "finished_at": "2026-12-07 21:00:00"}) + "\n")  # fmt: skip
    text = recipe_script.write_report(recipe, tmp_path, echo_ids={"math/test/4"})
    assert "| base | 0 | 0.115 [" in text  # pass@1 of the base: mean of c / 16 over the 6 problems
    assert "| grpo − base | 0 |" in text and "| simko − grpo | 1 |" in text and "| grpo − base | 2 seeds |" in text
    # train reward and length, the first and the last 6 of 12 steps: the two windows never overlap
    assert "| 12 | 0.125 → 0.185 | 56.5 → 50.5 |" in text and "first and the last 6 RL steps" in text
    assert "| grpo | 0 | 10.0 | 0.5 | 40.0 | 0.3 | 50.8 | 79 % |" in text
    assert "| simko.train | grpo_seed0 | 10.0 | 1.2 → 3.4 |" in text
    assert "Not finished yet: train grpo_seed0" in text  # no last.ckpt: listed, not counted as done
    # problem 4 (8, 12, 10, 9, 11 of 16 correct) is left out of the "others" and makes the "echo" subset alone
    assert "1 of the 6 problems are solved by restating the question" in text
    assert "| base | 0 | 0.037 [0.000, 0.087] | 0.400 [0.000, 0.800] | 0.500 [0.500, 0.500] |" in text  # others, echo
    for figure in ("pass_at_k.png", "training.png"):
        assert (task / figure).stat().st_size > 10_000
    payload = json.loads((task / "results.json").read_text())
    mean, low, high = payload["paired"]["grpo-base_seed0_pass@1"]
    assert mean == pytest.approx(np.mean([1, 2, 2, 0, 4, 1]) / 16) and low <= mean <= high


def test_real_text_round_trip_flags_dropped_special_tokens():
    """scripts/smollm2_real_text.py: a special token inside a response vanishes from the text the verifier reads
    (build_rollouts decodes with skip_special_tokens=True); the trailing EOS does not count."""
    from helpers import digit_tokenizer

    spec = importlib.util.spec_from_file_location("smollm2_real_text", REPO / "scripts" / "smollm2_real_text.py")
    real_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_text)
    tok = digit_tokenizer()
    one, two, pad, eos = tok.convert_tokens_to_ids(["1", "2", "<pad>", "<eos>"])
    clean = real_text.round_trip(tok, [one, two, eos], [eos])
    assert clean == {"text_changes": False, "ids_differ": False, "special_inside": [],
                     "text_without_skip_differs": False}  # fmt: skip
    dropped = real_text.round_trip(tok, [one, pad, two, eos], [eos])
    assert dropped["special_inside"] == [pad] and dropped["text_without_skip_differs"]
    assert dropped["ids_differ"] and not dropped["text_changes"]  # "12" re-encodes without the <pad>


def test_echo_solved_problems_are_found_and_cached(tmp_path):
    """2 of the 100 evaluated MATH Level 1 problems score 1 when the completion restates the question: those whose
    last number is the plain answer (17 before the math verifier's fallback credited only a final value: "Evaluate:
    $102^2 - 98^2$" -> 102^2 - 98^2 = 800, the gold). Found once, then cached; a cache written under the old
    verifier is recomputed."""
    shared_file("simko-official/math/test.parquet")
    recipe_script = load_recipe_script()
    stale = tmp_path / "smollm2_math_level1" / "echo.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"problems": 100, "echo_solved": ["math/test/301"]}))  # no "fallback" key
    echo = recipe_script.echo_solved_problems(recipe_script.RECIPE, tmp_path)
    assert echo == {"math/test/498", "math/test/838"}
    cached = json.loads(stale.read_text())
    assert cached["problems"] == 100 and set(cached["echo_solved"]) == echo
    assert recipe_script.echo_solved_problems(recipe_script.RECIPE, tmp_path) == echo  # read back, not recomputed
