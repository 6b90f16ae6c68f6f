"""Where the Hydra configs live, the project root the path configs resolve against, and user modules to import.

The configs are a top-level folder of the repository (``configs/``), next to ``src/``; the package is installed
editable (``pip install -e .``). ``SIMKO_CONFIG_DIR`` points elsewhere, e.g. at a copy with your own groups.

It also registers the ``${simko_run_id:}`` resolver that names the default run folders (``configs/hydra``) and
``${simko_world_size:...}``, FSDP2's data-parallel size (``configs/trainer/fsdp2.yaml``).
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(os.environ.get("PROJECT_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_DIR = Path(os.environ.get("SIMKO_CONFIG_DIR", PROJECT_ROOT / "configs"))

# ${oc.env:PROJECT_ROOT} in configs/paths/default.yaml resolves to the repository root unless the user set it.
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))

# The default run folder name: date, time to the millisecond and the process id, fixed once per process. Two runs
# started in the same second (or millisecond) get different folders; the run-dir guard (simko.runs) refuses a
# folder another run already owns in any case.
_now = datetime.now()
RUN_ID = f"{_now:%Y-%m-%d_%H-%M-%S}-{_now.microsecond // 1000:03d}_{os.getpid()}"
OmegaConf.register_new_resolver("simko_run_id", lambda: RUN_ID, replace=True)


def world_size(devices, num_nodes) -> int:
    """``${simko_world_size:${trainer.devices},${trainer.num_nodes}}``: the number of processes of a run, for
    FSDP2's data-parallel mesh (``configs/trainer/fsdp2.yaml``). ``devices`` is a count or a list of device ids."""
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or not isinstance(num_nodes, int):
        raise ValueError(
            f"trainer.devices={devices!r} with trainer.num_nodes={num_nodes!r}: this strategy needs the number of "
            "processes per node as a count >= 1 (or a list of device ids), e.g. trainer.devices=8"
        )
    return count * num_nodes


OmegaConf.register_new_resolver("simko_world_size", world_size, replace=True)


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
