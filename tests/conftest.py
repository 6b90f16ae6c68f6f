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
