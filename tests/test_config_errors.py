"""Bad configs and bad input fail at start with a clear message, checked in process: the config is composed as the
CLI composes it (tests/conftest.py ``compose_train``) and handed to ``simko.train.build``, the function the CLI
runs. What only the CLI shows (one ``error:`` line, exit status 2, no traceback) is checked once, in
tests/test_entry_points.py."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException

from helpers import UNTRAINED_TINY
from simko.checks import CONFIG_ERRORS
from simko.train import build


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.name=bogus"], "unknown loss 'bogus'"),
        (["loss=simko", "loss.tau=1.0"], "SimKO tau must be in (0, 1)"),
        (["loss=nsr", "+loss.advantage_kwargs.norm_std=false"], "advantage 'nsr' has no knob ['norm_std']"),
        (["loss.advantage_kwargs={k: 0}", "loss.advantage=passk"], "passk k must be an integer >= 1"),
        (["loss.entropy_coef=-0.1"], "entropy_coef must be >= 0"),
        (["rollout.group_size=1"], "rollout.group_size=1: must be an integer >= 2"),
        (["rollout.engine=nope"], "unknown rollout engine 'nope' (rollout.engine); available: hf"),
        (["module.micro_batch_size=0"], "micro_batch_size must be >= 1"),
        (["trainer.max_steps=2"], "Set rl_steps=2 instead"),
        (["rl_steps=0"], "rl_steps (the run length in RL steps) must be an integer >= 1"),
        (
            ["data.prompts_per_step=4", "module.num_mini_batches=8"],
            "module.num_mini_batches=8 is larger than the 4 prompt groups",
        ),
    ],
)
def test_bad_config_fails_at_start_with_a_clear_message(compose_train, overrides, message):
    cfg = compose_train(*UNTRAINED_TINY, *overrides)
    with pytest.raises(CONFIG_ERRORS) as err:
        build(cfg)
    assert message in str(err.value)


def test_bad_model_path_fails_naming_it(compose_train):
    with pytest.raises(CONFIG_ERRORS, match="/no/such/model"):
        build(compose_train("model=hf", "model.name_or_path=/no/such/model"))


def test_unknown_config_group_option_names_it(compose_train):
    with pytest.raises(MissingConfigException, match="Could not find 'loss/bogus'"):
        compose_train("loss=bogus")


def test_missing_answer_field_names_file_and_row(compose_train, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    cfg = compose_train(
        *UNTRAINED_TINY,
        "data=jsonl",
        f"data.train_source.path={bad}",
        "data.train_source.verifier=exact",
        "data.val_source=null",
    )
    with pytest.raises(CONFIG_ERRORS) as err:
        build(cfg)
    assert str(bad) in str(err.value) and "row 1" in str(err.value) and "answer" in str(err.value)


def test_a_good_config_builds(compose_train):
    module, datamodule, trainer = build(compose_train(*UNTRAINED_TINY, "loss=simko", "rl_steps=3"))
    assert module.loss_fn.top_k == 3 and module.engine_name == "hf" and trainer.max_steps == 3
