"""Test-wide settings: offline, the shared data root, quiet tokenizers; the datasets cache fixture."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SIMKO_DATA_DIR", str((REPO_ROOT.parent / "shared" / "data").resolve()))


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory) -> Path:
    """One `datasets` cache per test module, never ~/.cache."""
    return tmp_path_factory.mktemp("hf_datasets_cache")


@pytest.fixture
def compose_train(tmp_path):
    """``compose_train(*overrides)``: configs/train.yaml composed in process as ``python -m simko.train`` composes
    it (Hydra's compose API, as lightning-hydra-template's conftest), with this test's paths; hand it to
    ``simko.train.build`` to run the checks the CLI runs, without a subprocess per case."""
    from omegaconf import open_dict

    from helpers import compose_config

    def compose(*overrides: str):
        cfg = compose_config(
            [
                f"paths.log_dir={tmp_path}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                "callbacks.progress=null",
                *overrides,
            ]
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")  # ${hydra:runtime.output_dir} outside a Hydra run
        return cfg

    return compose
