"""What a researcher sees: the config in every logger, sample rollouts, the progress bar, a quiet console.

Unit tests of the pieces (run names, sample rows, progress-bar arithmetic, log routing, train mode) and
subprocess runs of ``python -m simko.train`` on the small tiny model of ``test_entry_points``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import sys

import pandas as pd
import pytest
import torch
import yaml

from helpers import digit_tokenizer, random_qwen2
from simko.callbacks.progress import format_metrics, total_rl_steps, updates_per_rl_step
from simko.callbacks.samples import RolloutSamples, markdown_table, sample_rows
from simko.console import log_lines_above_live_display, progress_bar_enabled, track
from simko.eval import PER_PROBLEM_COLUMNS, problem_row, write_outputs
from simko.logging_utils import git_state, run_identity
from simko.losses import build_loss
from simko.module import RLVRModule
from test_entry_points import SMALL_TINY, run

# ------------------------------------------------------------------ unit tests


def test_run_name_is_what_differs_group_is_the_multirun_tags_the_commit():
    ident = run_identity({"loss": "grpo", "experiment": None}, [], 0, git=("a" * 40, False))
    assert ident.name == "grpo-seed0" and ident.group is None and ident.tags == ["git-aaaaaaaaaa"]
    ident = run_identity(
        {"loss": "simko", "experiment": "toy_simko"},
        ["loss=simko", "seed=2", "loss.alpha=0.05", "paths.log_dir=/x", "logger=wandb", "rl_steps=100", "+ckpt_path=y"],
        2,
        sweep_dir="logs/train/multiruns/2026-01-02_03-04-05",
        git=("b" * 40, True),
    )
    assert ident.name == "toy_simko-simko-seed2-loss.alpha=0.05,rl_steps=100"
    assert ident.group == "train-2026-01-02_03-04-05"
    assert ident.tags == ["git-bbbbbbbbbb", "git-dirty"]
    assert run_identity({"loss": "grpo"}, [], 0).tags == []  # no git: no tag
    long = run_identity({"loss": "grpo"}, [f"model.k{i}={i}" for i in range(60)], 0)
    assert len(long.name) == 128 and long.name.endswith("...")


def test_git_state_of_a_checkout_and_of_a_plain_folder(tmp_path):
    assert git_state(tmp_path) == (None, None)
    commit, dirty = git_state()
    if commit is not None:  # the test suite runs from a git checkout in CI and here
        assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)


def _rollout(step=4, prompts=3, group=4):
    examples = [{"id": f"p{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "verifier": "exact"} for i in range(prompts)]
    completions = [f"{i + j}|x\nline \\boxed{{{i + j}}}" for i in range(prompts) for j in range(group)]
    rewards = torch.tensor([float(j == 1) for _ in range(prompts) for j in range(group)])
    return {
        "step": step,
        "examples": examples,
        "completions": completions,
        "rewards": rewards,
        "advantages": rewards - 0.25,
    }


def test_sample_rows_take_whole_groups_with_extracted_answers_and_rewards():
    rows = sample_rows(_rollout(), num_prompts=2)
    assert len(rows) == 8 and [r["prompt_index"] for r in rows] == [0] * 4 + [1] * 4
    first = rows[1]
    assert first["rl_step"] == 5 and first["prompt"] == "0+1=" and first["answer"] == "1" and first["id"] == "p0"
    assert first["extracted"] == "1" and first["reward"] == 1.0 and first["advantage"] == 0.75
    assert len(sample_rows(_rollout(), num_prompts=5, completions_per_prompt=2)) == 6
    table = markdown_table(rows[:1])
    assert table.count("\n") == 2 and "0\\|x<br>line" in table  # one row: pipes escaped, newline kept visible


def test_sample_rows_log_the_final_answer_that_the_examples_verifier_reads():
    """``extracted`` is what the reward was computed from. Before, it was the exact-match rule for every verifier:
    an unboxed math completion showed its last ``answer:`` line (math reads no box, so no final answer), and a
    countdown completion its box (countdown reads the ``<answer>`` tag first)."""
    countdown = '{"numbers": [1, 2], "target": 3}'
    examples = [{"id": "m", "prompt": "q", "answer": "10", "verifier": "math"},
                {"id": "c", "prompt": "q", "answer": countdown, "verifier": "countdown"}]  # fmt: skip
    completions = ["so 40 - 30 = 10.\nThe answer: 10", "\\boxed{2 - 1} or rather <answer>1 + 2</answer>"]
    rollout = {"step": 0, "examples": examples, "completions": completions, "rewards": torch.tensor([1.0, 1.0])}
    rows = sample_rows(rollout, num_prompts=2)
    assert [r["extracted"] for r in rows] == [None, "1 + 2"]
    assert json.loads(json.dumps(rows[0]))["extracted"] is None  # written to samples.jsonl as null


def test_samples_are_taken_at_step_one_and_every_n(tmp_path):
    cb = RolloutSamples(str(tmp_path / "s.jsonl"), every_n_steps=10)
    assert [s for s in range(1, 41) if cb.due(s)] == [1, 10, 20, 30, 40]
    assert not RolloutSamples(str(tmp_path / "s.jsonl"), every_n_steps=0).due(1)
    cb.write(sample_rows(_rollout(step=0), 1), loggers=[])
    cb.write(sample_rows(_rollout(step=9), 1), loggers=[])  # appended, never overwritten
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["rl_step"] for r in lines] == [1] * 4 + [10] * 4
    with pytest.raises(ValueError, match="num_prompts"):
        RolloutSamples(str(tmp_path / "s.jsonl"), num_prompts=0)


def test_progress_counts_rl_steps_not_optimizer_steps():
    class M:
        ppo_epochs, num_mini_batches = 2, 3

    assert updates_per_rl_step(M()) == 6 and total_rl_steps(720, M()) == 120
    assert total_rl_steps(-1, M()) == float("inf")  # no step limit
    values = {"train/reward": torch.tensor(0.4375), "val/pass@1": 0.25, "x": 1}
    shown = format_metrics(values, {"reward": "train/reward", "pass@1": "val/pass@1", "missing": "val/pass@8"})
    assert shown == {"reward": "0.438", "pass@1": "0.250"}


def test_no_progress_callback_means_no_bar_at_all():
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar

    assert not progress_bar_enabled({}, [LearningRateMonitor()])  # Lightning would add its TQDM bar
    assert progress_bar_enabled({}, [RichProgressBar()])
    assert not progress_bar_enabled({"enable_progress_bar": False}, [RichProgressBar()])


def test_track_yields_every_item_and_log_lines_follow_a_replaced_stream(monkeypatch):
    losses = []
    assert [i for i in track(range(5), "t", info=lambda: f"{len(losses)}") if losses.append(i) is None] == list(
        range(5)
    )
    handler = logging.StreamHandler(sys.__stderr__)
    logger = logging.getLogger("simko.test_console")
    logger.addHandler(handler)
    proxy = io.StringIO()
    monkeypatch.setattr(sys, "stderr", proxy)  # what rich does while a live display runs in a terminal
    try:
        with log_lines_above_live_display():
            assert handler.stream is proxy
        assert handler.stream is sys.__stderr__
    finally:
        logger.removeHandler(handler)


def test_fit_start_trains_in_train_mode_with_dropout_off():
    """Lightning expects train mode at fit start; the update must still compute what sampled the rollouts."""
    tok, model = digit_tokenizer(), random_qwen2()
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5  # a checkpoint trained with attention dropout
    module = RLVRModule(model, tok, build_loss("grpo"), optimizer=torch.optim.SGD, group_size=2)
    ids = torch.randint(2, 12, (2, 7))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    module.on_fit_start()
    assert all(m.training for m in module.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_per_problem_csv_has_prompt_and_a_sample_completion(tmp_path):
    example = {"prompt": "2+2=", "answer": "4"}
    rows = [problem_row("p0", example, ["4", "5"], ["4", "5"], [True, False])]
    summary = {"pass_at_k": {"1": 0.5, "2": 1.0}}
    write_outputs(summary, rows, tmp_path)
    frame = pd.read_csv(tmp_path / "per_problem.csv", dtype=str)
    assert list(frame.columns) == PER_PROBLEM_COLUMNS
    row = frame.iloc[0]
    assert (row["prompt"], row["sample_completion"], row["sample_correct"], row["c"]) == ("2+2=", "4", "1", "1")


# ------------------------------------------------------------------ runs of simko.train


@pytest.fixture(scope="module")
def console_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("console_cache")


def _args(cache, tmp_path, run_dir, *extra):
    paths = [f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / run_dir}"]
    return ["debug=fast", *paths, *SMALL_TINY, *extra]


# Lightning's bar ("Epoch 0/-2" rich, "Epoch 0: 100%|" TQDM) and the warnings of issue 14.4.
NOISE = ["LeafSpec", "eval mode", "litlogger", "sync_dist", "returned a view tensor", "Epoch "]


@pytest.mark.integration
def test_run_logs_config_and_samples_everywhere_with_an_rl_step_bar(console_cache, tmp_path):
    args = _args(console_cache, tmp_path, "many", "logger=many", "callbacks.samples.every_n_steps=1")
    proc = run("simko.train", *args)
    out = proc.stdout + proc.stderr
    run_dir = tmp_path / "many"
    # the composed config, resolved, in both loggers' hparams.yaml
    for sub in ("csv", "tensorboard"):
        hparams = yaml.safe_load((run_dir / sub / "hparams.yaml").read_text())
        assert hparams["loss"]["name"] == "grpo" and hparams["seed"] == 0 and hparams["rl_steps"] == 2, sub
        assert hparams["model"]["hidden_size"] == 64 and hparams["paths"]["output_dir"] == str(run_dir), sub
        assert hparams["run"]["name"].startswith("grpo-seed0-debug=fast,model.num_layers=2"), sub
        assert hparams["run"]["git_commit"] == git_state()[0], sub
    # TensorBoard: the HParams summary and the sample table as text
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = {
        v.tag
        for f in (run_dir / "tensorboard").glob("events.*")
        for ev in EventFileLoader(str(f)).Load()
        for v in ev.summary.value
    }
    assert "_hparams_/experiment" in tags and "samples/train/text_summary" in tags
    # samples.jsonl: 2 prompts x G=4 at each of the 2 steps
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["rl_step"] for r in rows] == [1] * 8 + [2] * 8
    assert all(r["prompt"].endswith("=") and r["reward"] in (0.0, 1.0) and "extracted" in r for r in rows)
    # the console: the bar in RL steps, one config line (the dump is in .hydra/), where things are at the end
    assert "RL step" in out and "2/2" in out and "s/step" in out
    assert "optimized_metric" not in out and "full config:" in out and (run_dir / ".hydra" / "config.yaml").exists()
    assert "RL step 0/2: val pass@1" in out  # the validation before the first step, one line
    assert "Validate metric" not in out  # not Lightning's table
    for what in ("run dir:", "last checkpoint:", "metrics:", "tensorboard:", "samples:"):
        assert what in out, what
    assert str(run_dir / "checkpoints" / "last.ckpt") in out
    for noise in NOISE:
        assert noise not in out, noise
    # continued from step 2 (last.ckpt, the full state) to step 3: the bar counts on from there
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run("simko.train", *_args(console_cache, tmp_path, "resumed", f"ckpt_path={ckpt}", "rl_steps=3"))
    assert re.search(r"RL step +\S+ 3/3", proc.stdout + proc.stderr), proc.stdout[-2000:]


@pytest.mark.integration
def test_fsdp2_run_without_bar_is_quiet(console_cache, tmp_path):
    """2 CPU processes: no library noise, no sync_dist advice, and callbacks.progress=null shows no bar."""
    proc = run(
        "simko.train",
        *_args(console_cache, tmp_path, "fsdp2", "trainer=fsdp2", "rl_steps=1", "callbacks.progress=null"),
    )
    out = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in out, noise
    assert "last checkpoint:" in out


def _wandb_records(path):
    """Records of an offline W&B run file (LevelDB log format: 32 KiB blocks of crc32/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.mark.integration
def test_wandb_offline_run_holds_config_name_group_tags_and_samples(console_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # in the dev extra
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(key, str(tmp_path / "wandb_home" / key))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [
        a
        for a in _args(
            console_cache,
            tmp_path,
            "x",
            "logger=wandb",
            "logger.wandb.offline=true",
            "rl_steps=1",
            "callbacks.progress=null",
        )
        if not a.startswith("hydra.run")
    ]
    sweep = tmp_path / "sweep"
    run("simko.train", "-m", "seed=3", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", *args)
    (run_file,) = (sweep / "0" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.display_name.startswith("grpo-seed3-debug=fast,model.num_layers=2")
    assert meta.run_group == "debug-sweep"  # the multirun's folder
    commit, dirty = git_state()
    if commit:
        assert f"git-{commit[:10]}" in meta.tags and ("git-dirty" in meta.tags) == dirty
    config = {
        u.key: json.loads(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    assert config["loss"]["name"] == "grpo" and config["seed"] == 3 and config["run"]["git_commit"] == commit
    (table,) = (run_file.parent / "files" / "media" / "table").glob("samples/train_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"][:5] == ["rl_step", "prompt_index", "id", "prompt", "completion"]
    assert len(content["data"]) == 8  # 2 prompts x G=4
