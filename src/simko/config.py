"""Where the Hydra configs live, the project root the path configs resolve against, and user modules to import.

The configs are a top-level folder of the repository (``configs/``), next to ``src/``; the package is installed
editable (``pip install -e .``). ``SIMKO_CONFIG_DIR`` points elsewhere, e.g. at a copy with your own groups.
"""

from __future__ import annotations

import importlib
import os
import sys
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


def import_modules(modules) -> None:
    """Import the modules listed under the config's top-level ``imports`` key, before anything is built.

    This is how user code reaches the CLI: a module that registers a verifier (``@register_verifier``) is listed
    as ``imports=[my_pkg.my_verifiers]``. Names are imported as ``python -m`` would find them: installed packages
    and the current directory (added to ``sys.path`` when missing, e.g. under the ``simko-train`` script).
    """
    if isinstance(modules, str):
        modules = [modules]
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in modules or []:
        try:
            importlib.import_module(str(name))
        except ImportError as error:
            raise ImportError(
                f"imports: could not import {name!r} ({error}); list importable module names (a package or a "
                f"module of the current directory {os.getcwd()}, written with dots, without .py)"
            ) from error
