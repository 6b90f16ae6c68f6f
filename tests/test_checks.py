"""Start-up checks (simko.checks): every bad knob or bad input fails while the run is built, naming its key.

The configs are composed in process with Hydra's compose API and built with ``simko.train.build`` /
``simko.eval.evaluate``, as the entry points do. Where a check must come before the model, the model loader is
replaced by one that fails the test if it is called.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import simko.models
from helpers import UNTRAINED_TINY
from simko.checks import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(REPO))

    def compose_cfg(*overrides: str, config: str = "train"):
        base = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
        if config == "train":
            base += ["callbacks=none", "logger=[]"]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            return compose(config_name=config, overrides=[*base, *overrides])

    return compose_cfg


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the run gets as far as building the model."""

    def refuse(**kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(simko.models, "load_tiny", refuse)


def build(cfg):
    from simko.train import build as train_build

    return train_build(cfg)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.temperature=0"], "rollout.temperature=0"),
        (["rollout.temperature=-0.5"], "rollout.temperature=-0.5"),
        (["rollout.top_p=1.5"], "rollout.top_p=1.5"),
        (["rollout.top_p=0"], "rollout.top_p=0"),
        (["rollout.max_prompt_tokens=0"], "rollout.max_prompt_tokens=0"),
        (["module.val_temperature=0"], "module.val_temperature=0"),
        (["module.val_top_p=1.01"], "module.val_top_p=1.01"),
        (["module.val_samples=0"], "module.val_samples=0"),
        (["loss=simko", "loss.tau=abc"], "loss.tau='abc'"),
        (["loss=simko", "loss.k=two"], "loss.k='two'"),
        (["loss=grpo", "loss.clip_eps=[1]"], "loss.clip_eps=[1]"),
        (["loss=entropy_bonus", "loss.clip_eps=wide"], "loss.clip_eps='wide'"),  # a knob of the wrapped base loss
        (["loss=simko", "loss.alpha=2"], "loss.alpha=2: SimKO alpha must be in"),  # the loss's own range check
        (["loss=clip_cov", "loss.clip_cov_lb=9"], "loss.clip_cov_lb=9, loss.clip_cov_ub=5.0: "),
        (["+loss.foo=1"], "loss.foo=1: "),
        (["data=jsonl"], "data.train_source.path"),  # ??? left in the config
    ],
)
def test_bad_knobs_fail_before_the_model_naming_the_key(compose_cfg, no_model, overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace("[", r"\[").replace(".", r"\.")):
        build(compose_cfg(*overrides))


def test_a_missing_value_is_named_with_its_key(compose_cfg, no_model):
    with pytest.raises(ConfigError) as error:
        build(compose_cfg("data=jsonl"))
    assert "data.train_source.path" in str(error.value) and "???" in str(error.value)


def test_data_is_read_before_the_model(compose_cfg, no_model, tmp_path):
    # Before: the model (a tiny warm start: minutes with an empty cache) was built before the data was read.
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(ConfigError, match="data.train_source") as error:
        build(compose_cfg("data=jsonl", f"data.train_source.path={missing}"))
    assert str(missing) in str(error.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    with pytest.raises(ConfigError, match="row 1") as error:
        build(compose_cfg("data=jsonl", f"data.train_source.path={bad}"))
    assert str(bad) in str(error.value) and "answer" in str(error.value)


def test_good_config_builds_and_data_gets_the_tokenizer(compose_cfg):
    module, datamodule, trainer = build(compose_cfg(*UNTRAINED_TINY))
    assert datamodule.tokenizer is module.tokenizer
    assert datamodule.examples_for_step(0)[0]["prompt"].endswith("=")


def test_loss_k_larger_than_the_vocabulary(compose_cfg):
    # Before: built fine, then torch.topk failed at the first RL step.
    with pytest.raises(ConfigError, match=r"^loss\.k=500: .*vocabulary has 100 tokens"):
        build(compose_cfg(*UNTRAINED_TINY, "loss=simko", "loss.k=500"))
    build(compose_cfg(*UNTRAINED_TINY, "loss=simko", "loss.k=100"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_file_prompt_longer_than_the_context_fails_at_start(compose_cfg, tmp_path):
    # The tiny model's context is 128 tokens (one per character); row 2's prompt has 300.
    short = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    path = write_jsonl(tmp_path / "long.jsonl", [*short, {"question": "9" * 300, "answer": "1"}])
    data = ["data=jsonl", f"data.train_source.path={path}", "data.prompt_template='{question}='"]
    with pytest.raises(ConfigError) as error:
        build(compose_cfg(*UNTRAINED_TINY, *data))
    message = str(error.value)
    assert "long/2' (train_source" in message and str(path) in message and "301 tokens" in message
    assert "max_position_embeddings=128" in message
    assert "rollout.max_prompt_tokens" in message

    # Cut to 64 tokens, the same file is fine; a cut longer than the context is refused.
    build(compose_cfg(*UNTRAINED_TINY, *data, "rollout.max_prompt_tokens=64"))
    with pytest.raises(ConfigError, match=r"^rollout\.max_prompt_tokens=1000: .*max_position_embeddings=128"):
        build(compose_cfg(*UNTRAINED_TINY, *data, "rollout.max_prompt_tokens=1000"))

    # The held-out file is checked at start too.
    cfg = compose_cfg(*UNTRAINED_TINY, *data)
    with open_dict(cfg):
        cfg.data.train_source.path = str(write_jsonl(tmp_path / "short.jsonl", short))
        cfg.data.val_source = {"_target_": "simko.data.LocalFileSource", "path": str(path)}
    with pytest.raises(ConfigError, match=r"long/2' \(val_source LocalFileSource\('.*long.jsonl'"):
        build(cfg)


def test_procedural_prompt_longer_than_the_context_fails_before_generation(compose_cfg):
    # Procedural prompts are made step by step: each batch is checked when it is rendered, before any rollout.
    template = "x" * 130 + "{question}="
    # At start: build() renders the first batch (its verifier names are checked there), so it fails right away.
    with pytest.raises(ValueError, match=r"'arithmetic/train/0/0' \(train_source, RL step 0\) has 1[34]\d tokens"):
        build(compose_cfg(*UNTRAINED_TINY, f"data.prompt_template='{template}'"))
    # And any later batch or the val set, when it is rendered.
    module, datamodule, trainer = build(compose_cfg(*UNTRAINED_TINY))
    datamodule.prompt_template = template
    with pytest.raises(ValueError, match=r"'arithmetic/train/0/64' \(train_source, RL step 1\) has 1[34]\d tokens"):
        datamodule.examples_for_step(1)
    with pytest.raises(ValueError, match="arithmetic/val/0/0"):
        datamodule.val_examples()


def test_world_size_is_checked_when_the_trainer_is_built(compose_cfg):
    with pytest.raises(ConfigError, match="prompts_per_step=3 .* world size"):
        build(compose_cfg(*UNTRAINED_TINY, "trainer=ddp", "data.prompts_per_step=3"))
    with pytest.raises(ConfigError, match="val set has 5 prompts"):
        build(compose_cfg(*UNTRAINED_TINY, "trainer=ddp", "data.val_prompts=5"))


# --- simko.eval ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.temperature=0", "eval.temperature=0"),
        ("eval.top_p=0", "eval.top_p=0"),
        ("eval.top_p=1.5", "eval.top_p=1.5"),
        ("eval.n=0", "eval.n=0"),
        ("eval.ks=[1,32]", r"eval.ks=\[1, 32\]"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0"),
        ("eval.diagnostics_tau=1.0", "eval.diagnostics_tau=1.0"),
        ("eval.cover_taus=[0.5,1.5]", r"eval.cover_taus=\[0.5, 1.5\]"),
        ("eval.bootstrap_resamples=10", "eval.bootstrap_resamples=10"),
    ],
)
def test_eval_sampling_knobs_fail_before_the_model(compose_cfg, no_model, tmp_path, override, key):
    from simko.eval import evaluate

    cfg = compose_cfg(override, config="eval")
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        evaluate(cfg, tmp_path / "out")


def test_eval_refuses_a_prompt_longer_than_the_context(compose_cfg, tmp_path):
    from simko.eval import evaluate

    path = write_jsonl(tmp_path / "long.jsonl", [{"question": "1" * 200, "answer": "1"}])
    cfg = compose_cfg(*UNTRAINED_TINY, config="eval")
    with open_dict(cfg):
        cfg.data.val_source = {"_target_": "simko.data.LocalFileSource", "path": str(path), "verifier": "exact"}
    with pytest.raises(ConfigError, match="long/0"):
        evaluate(cfg, tmp_path / "out")
