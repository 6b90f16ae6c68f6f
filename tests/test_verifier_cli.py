"""User verifiers through the real command line: ``imports=[...]`` (examples/my_verifiers.py) and the start-up check
of verifier names. Subprocesses on the small tiny model, 1 RL step."""

import json

import pandas as pd
import pytest

from test_entry_points import REPO, SMALL_TINY, run

pytestmark = pytest.mark.integration

USER_VERIFIER = ["+data.train_source.verifier=digits", "+data.val_source.verifier=digits"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def common(cache, tmp_path, name: str) -> list[str]:
    return [f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / name}", *SMALL_TINY]


def test_user_verifier_module_plugs_into_train_and_eval(cache, tmp_path):
    run(
        "simko.train",
        "debug=fast",
        "rl_steps=1",
        "callbacks.progress=null",
        "imports=[examples.my_verifiers]",
        *USER_VERIFIER,
        *common(cache, tmp_path, "train"),
        cwd=REPO,
    )
    frame = pd.read_csv(tmp_path / "train" / "csv" / "metrics.csv")
    steps = frame[frame["train/reward"].notna()]
    assert list(steps["train/rl_step"]) == [1.0]
    # The worker processes imported examples.my_verifiers and unpickled `digits`: no check failed or hung.
    assert steps["verifier/errors"].iloc[0] == 0 and steps["verifier/timeouts"].iloc[0] == 0

    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    run(
        "simko.eval",
        f"ckpt_path={ckpt}",
        "imports=[examples.my_verifiers]",
        "+data.val_source.verifier=digits",
        "eval.n=2",
        "eval.limit=4",
        *common(cache, tmp_path, "eval"),
        cwd=REPO,
    )
    summary = json.loads((tmp_path / "eval" / "pass_at_k.json").read_text())
    assert summary["num_problems"] == 4 and 0.0 <= summary["pass_at_k"]["1"] <= 1.0


def test_unknown_verifier_fails_at_start_and_says_how_to_import(cache, tmp_path):
    proc = run(
        "simko.train",
        "debug=fast",
        "callbacks.progress=null",
        *USER_VERIFIER,  # `digits` exists only once examples.my_verifiers is imported
        *common(cache, tmp_path, "unknown"),
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unknown verifier(s) ['digits']" in proc.stderr and "imports=[" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "unknown" / "csv").exists()  # no RL step ran

    proc = run("simko.train", "imports=[no_such_module]", *common(cache, tmp_path, "noimport"), check=False)
    assert proc.returncode == 2 and "could not import 'no_such_module'" in proc.stderr
