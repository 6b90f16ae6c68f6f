"""Where the Hydra configs live, and the project root the path configs resolve against.

The configs are a top-level folder of the repository (``configs/``), next to ``src/``; the package is installed
editable (``pip install -e .``). ``SIMKO_CONFIG_DIR`` points elsewhere, e.g. at a copy with your own groups.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(os.environ.get("PROJECT_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_DIR = Path(os.environ.get("SIMKO_CONFIG_DIR", PROJECT_ROOT / "configs"))

# ${oc.env:PROJECT_ROOT} in configs/paths/default.yaml resolves to the repository root unless the user set it.
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


def check_config_dir() -> str:
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise FileNotFoundError(
            f"Hydra configs not found at {CONFIG_DIR} (expected {CONFIG_DIR / 'train.yaml'}). Install the "
            "repository editable (`pip install -e .`) or set SIMKO_CONFIG_DIR to a folder holding train.yaml."
        )
    return str(CONFIG_DIR)
