"""Run folders: one run per folder; the only way to write into an existing run's folder is to resume that run.

A run claims its folder before Hydra writes anything into it (``.hydra/``, the log): :class:`RunDirGuard`, a Hydra
callback (``configs/hydra/default.yaml``), runs at ``on_run_start`` (single runs) and ``on_multirun_start`` /
``on_job_start`` (sweeps). Claiming means: take ``.simko-run.lock`` (a ``filelock`` held while the process lives;
the OS releases it when the process dies, SIGKILL included) and create ``.simko-run.json`` exclusively
(``O_EXCL``). So of two runs given the same folder, one gets it and the other stops with a message naming it,
and a folder that holds files of anything else is refused too.

Resume (``simko.train`` only, ``ckpt_path``):

- ``ckpt_path=last`` continues the run in ``hydra.run.dir`` from its ``checkpoints/last.ckpt`` (a run killed
  before its first checkpoint starts again from step 0, in the same folder).
- ``ckpt_path=<run>/checkpoints/last.ckpt`` without ``hydra.run.dir`` continues in ``<run>`` (not a new folder).
- A checkpoint with a *new* ``hydra.run.dir`` branches: a new run that starts from that checkpoint's state.

Continuing a run in place moves the metrics rows and sample rows the killed attempt wrote after the checkpoint's
step to ``superseded/`` beside their files (:func:`simko.steplog.supersede_rows_after`,
:func:`simko.callbacks.samples.supersede_samples_after`: each writer does it for its own file, wherever the config
put it), deletes the temporary files a killed writer left (:func:`simko.atomic.remove_orphans`), and saves this
attempt's Hydra config in ``.hydra/resume-<id>/`` so the run's first ``.hydra/`` files stay as they were. A run
folder holding a symbolic link to a file is not continued (a run writes only into its own files).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from simko.config import RUN_ID

MARKER = ".simko-run.json"
LOCK = ".simko-run.lock"
OWN_FILES = {MARKER, LOCK}


class RunDirError(ValueError):
    """A run folder this run may not use, with the folder named in the message."""


def is_launched_child() -> bool:
    """True in the processes a launcher started for ranks other than global 0: Lightning's DDP children
    (``LOCAL_RANK``), another node (``NODE_RANK``, torchrun's ``GROUP_RANK``), torchrun's ``RANK``, SLURM's srun
    tasks (``SLURM_PROCID``)."""
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID"):
        try:
            if int(os.environ.get(var, "0") or 0) > 0:
                return True
        except ValueError:
            continue
    return False


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "") or 0)
    except ValueError:
        return 0


def launched_processes(config: DictConfig) -> str | None:
    """How this process knows it is one of several ranks started apart from each other, or None.

    Such ranks cannot agree on a default run folder name (it holds each process's start time and pid), so they
    must all be given the same ``hydra.run.dir``. Seen before the trainer exists: srun's ``SLURM_NTASKS`` (as
    Lightning's SLURMEnvironment reads it), a launcher's ``WORLD_SIZE`` (torchrun; Lightning's own DDP children,
    which it always hands ``hydra.run.dir``), or ``trainer.num_nodes`` > 1 (a node started by hand).
    """
    if _env_int("SLURM_NTASKS") > 1 and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return f"srun started {_env_int('SLURM_NTASKS')} tasks (SLURM_NTASKS)"
    if _env_int("WORLD_SIZE") > 1:
        return f"a launcher started {_env_int('WORLD_SIZE')} processes (WORLD_SIZE)"
    nodes = OmegaConf.select(config, "trainer.num_nodes", default=1)
    if isinstance(nodes, int) and nodes > 1:
        return f"trainer.num_nodes={nodes}"
    return None


def _console_logging_only(config: DictConfig) -> None:
    """No ``.hydra/`` and no log file from this process: the run folder is global rank 0's to write."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        logging_cfg = config.hydra.job_logging
        handlers = logging_cfg.get("handlers") or {}
        files = [name for name, handler in handlers.items() if "filename" in handler]
        for name in files:
            del handlers[name]
        sections = [logging_cfg.get("root")] + list((logging_cfg.get("loggers") or {}).values())
        for section in sections:
            if section is not None and section.get("handlers") is not None:
                section.handlers = [h for h in section.handlers if h not in files]


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> Path | None:
    """``ckpt_path`` as a file: ``last`` is ``<run_dir>/checkpoints/last.ckpt``, or None if the run has none yet."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        last = last_checkpoint(run_dir)
        return last if last.is_file() else None
    return Path(ckpt_path).expanduser().resolve()


def owning_run(ckpt: Path) -> Path | None:
    """The run folder a checkpoint lies in (``<run>/checkpoints/x.ckpt``), if it is one."""
    folder = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and ((folder / MARKER).is_file() or (folder / ".hydra").is_dir()):
        return folder
    return None


@dataclass
class RunPlan:
    run_dir: Path
    continue_run: bool  # True: continue the run that owns run_dir; False: a new run in a new (or empty) folder
    resume_step: int | None = None  # the RL step of the checkpoint a continued run resumes from (-1: none yet)


def plan_run(run_dir: Path, ckpt_path: str | None, run_dir_given: bool) -> RunPlan:
    """Decide where a training run writes, from ``hydra.run.dir`` and ``ckpt_path`` (see the module docstring)."""
    from simko.checkpointing import CheckpointError, checkpoint_step, is_full_checkpoint, read_checkpoint

    if ckpt_path in (None, ""):
        return RunPlan(run_dir, continue_run=False)
    if str(ckpt_path) == "last":
        if not run_dir_given:
            raise RunDirError(
                "ckpt_path=last continues the run in hydra.run.dir; name that run's folder: "
                "hydra.run.dir=logs/train/runs/<run> ckpt_path=last"
            )
        last = last_checkpoint(run_dir)
        if not run_dir.exists() or not any(run_dir.iterdir()):
            return RunPlan(run_dir, continue_run=False)  # nothing to continue yet: a new run in this folder
        step = checkpoint_step(read_checkpoint(last)) if last.is_file() else -1
        return RunPlan(run_dir, continue_run=True, resume_step=step)

    ckpt = Path(ckpt_path).expanduser().resolve()
    state = read_checkpoint(ckpt)
    if not is_full_checkpoint(state):
        raise CheckpointError(
            f"checkpoint {ckpt} holds weights only (no optimizer state), so a run can't continue exactly from it. "
            "Resume from the run's checkpoints/last.ckpt (full state), or evaluate this file with simko.eval"
        )
    owner = owning_run(ckpt)
    if owner is None or (run_dir_given and run_dir.resolve() != owner.resolve()):
        return RunPlan(run_dir, continue_run=False)  # a branch: a new run that starts from this state
    step = checkpoint_step(state)
    last = last_checkpoint(owner)
    head = checkpoint_step(read_checkpoint(last)) if last.is_file() and last.resolve() != ckpt else step
    if step < head:
        raise RunDirError(
            f"ckpt_path={ckpt} is step {step} of the run in {owner}, whose last.ckpt is at step {head}: continuing "
            f"that run from it would rewind it. Continue from its last.ckpt, or branch into a new folder with "
            f"hydra.run.dir=<new folder> ckpt_path={ckpt}"
        )
    return RunPlan(owner, continue_run=True, resume_step=step)


class RunClaim:
    """Exclusive use of a run folder by this process (see the module docstring)."""

    def __init__(self, run_dir: Path, continue_run: bool = False, allowed: set[str] = frozenset()) -> None:
        self.run_dir = run_dir
        self.allowed = OWN_FILES | set(allowed)
        if run_dir.is_symlink() and not run_dir.exists():
            target = os.readlink(run_dir)
            raise RunDirError(f"run folder {run_dir} is a symbolic link to {target}, which does not exist")
        run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(run_dir / LOCK)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunDirError(
                f"run folder {run_dir} is in use by another running process{_owner_text(run_dir)}. A run never "
                "writes into a folder another run owns: choose a new hydra.run.dir"
            ) from None
        try:
            self._claim(continue_run)
        except BaseException:
            self.release()
            raise

    def _claim(self, continue_run: bool) -> None:
        marker = self.run_dir / MARKER
        attempt = {"id": RUN_ID, "pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[1:]}
        if continue_run:
            if not marker.is_file() and not (self.run_dir / ".hydra").is_dir():
                raise RunDirError(f"{self.run_dir} is not a simko run folder (no {MARKER}, no .hydra/): not resumed")
            links = symlinked_files(self.run_dir)
            if links:
                raise RunDirError(
                    f"run folder {self.run_dir} holds a symbolic link, {links[0]} -> {os.readlink(links[0])}"
                    f"{f' (and {len(links) - 1} more)' if len(links) > 1 else ''}: a run writes only into its own "
                    "files, never through a link; put the file itself there, then continue the run"
                )
            info = json.loads(marker.read_text()) if marker.is_file() else {"attempts": []}
            info["attempts"].append(attempt)
            from simko.atomic import atomic_write

            atomic_write(marker, lambda f: f.write(json.dumps(info, indent=1).encode()))
            return
        others = sorted(p.name for p in self.run_dir.iterdir() if p.name not in self.allowed)
        if marker.exists():
            raise RunDirError(
                f"run folder {self.run_dir} belongs to another run{_owner_text(self.run_dir)}. A run never writes "
                f"into a folder another run owns: choose a new hydra.run.dir, or continue that run with "
                f"hydra.run.dir={self.run_dir} ckpt_path=last"
            )
        if others:
            raise RunDirError(
                f"run folder {self.run_dir} already holds files ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}) that no simko run wrote: choose a new hydra.run.dir"
            )
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise RunDirError(f"run folder {self.run_dir} was just claimed by another run: choose a new one") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"created": RUN_ID, "attempts": [attempt]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def release(self) -> None:
        self._lock.release()


def _owner_text(run_dir: Path) -> str:
    try:
        info = json.loads((run_dir / MARKER).read_text())
        last = info["attempts"][-1]
        return f" (started {info['created']}, last attempt pid {last['pid']} on {last['host']})"
    except (OSError, ValueError, KeyError, IndexError):
        return ""


_CONTINUED: dict[str, int | None] = {"step": None}


def continued_run_step() -> int | None:
    """When this process continues a run in its own folder: the RL step of the checkpoint it continues from (-1: the
    run had none yet). None for a new run (a branch included). The writers of the run's files read it to move aside
    what a killed attempt wrote after that step (``simko.steplog.StepCSVLogger``, ``RolloutSamples``)."""
    return _CONTINUED["step"]


def prepare_continued_run(run_dir: Path, resume_step: int) -> None:
    """Before a run continues in its folder: remove the files a killed writer left; the metrics and samples writers
    move aside what was written after ``resume_step`` when they open their files (see :func:`continued_run_step`)."""
    from simko.atomic import remove_orphans

    remove_orphans(run_dir)
    _CONTINUED["step"] = resume_step


def symlinked_files(run_dir: Path) -> list[Path]:
    """Symbolic links in ``run_dir`` (walked without following links) that do not point to a folder: a run would
    write through them into another file (a symlinked ``checkpoints/`` folder on another disk is fine)."""
    found = []
    for folder, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink() and not path.is_dir():
                found.append(path)
    return sorted(found)


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: this run's overrides, its folder and ``ckpt_path=last``."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # outside a Hydra run
        overrides = []
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    args = [*keep, f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    return "python -m simko.train " + " ".join(shlex.quote(a) for a in args)


def _fail(err: Exception) -> None:
    print(f"error: {str(err).strip()}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def _claiming(folder: Path) -> Iterator[None]:
    """Any error while claiming ``folder`` stops the run (exit status 2) with one message naming the folder.

    Hydra's callback runner catches an exception raised by a callback and only warns, so an error let through here
    would let the run go on in a folder it does not own (a lock file replaced by a directory did exactly that).
    """
    try:
        yield
    except (RunDirError, ValueError, FileNotFoundError) as err:  # messages that name the folder or the file
        _fail(err)
    except Exception as err:  # an unreadable, read-only or odd folder: OSError, and anything else
        _fail(RunDirError(f"run folder {folder} could not be claimed, so the run stops: {type(err).__name__}: {err}"))


def _given(config: DictConfig, key: str) -> bool:
    return any(str(o).split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


class RunDirGuard(Callback):
    """Hydra callback: claim the run (or sweep) folder before Hydra writes into it; plan resumes.

    Args:
        resume_key: the task config key naming a checkpoint to resume from (``ckpt_path`` for ``simko.train``);
            None for tasks that only read checkpoints (``simko.eval``).
        resume_file: a file by which a task continues its own run in a given ``hydra.run.dir`` without a checkpoint
            (``eval_state.json`` for ``simko.eval``): a folder holding it, or holding nothing but what a run writes
            before the task starts (a killed start), is continued; the task checks that its config is the same.
    """

    def __init__(self, resume_key: str | None = None, resume_file: str | None = None) -> None:
        self.resume_key = resume_key
        self.resume_file = resume_file
        self._claims: list[RunClaim] = []  # the run's, or the sweep's
        self._job_claim: RunClaim | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        launched = launched_processes(config)
        if launched and not _given(config, "hydra.run.dir"):
            _fail(
                RunDirError(
                    f"{launched}: give every rank the same run folder, hydra.run.dir=<folder> (on a filesystem all "
                    "nodes share); the default folder name holds each process's start time and pid, so the ranks "
                    "would not agree on it"
                )
            )
        if is_launched_child():  # rank 0 owns the folder; the other ranks' processes write nothing there
            _console_logging_only(config)
            return
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).expanduser().absolute()
        ckpt = OmegaConf.select(config, self.resume_key) if self.resume_key else None
        _CONTINUED["step"] = None
        with _claiming(run_dir):
            plan = plan_run(run_dir, ckpt, _given(config, "hydra.run.dir"))
            if self.resume_file and _given(config, "hydra.run.dir") and self._resumable(run_dir, config):
                plan = RunPlan(run_dir, continue_run=True, resume_step=-1)
            self._claims.append(RunClaim(plan.run_dir, continue_run=plan.continue_run))
            if plan.continue_run:
                prepare_continued_run(plan.run_dir, plan.resume_step)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(plan.run_dir)
            if plan.continue_run and config.hydra.output_subdir is not None:
                # This attempt's config goes beside the run's first one instead of overwriting it.
                config.hydra.output_subdir = f"{config.hydra.output_subdir}/resume-{RUN_ID}"

    def _resumable(self, run_dir: Path, config: DictConfig) -> bool:
        if not (run_dir / MARKER).is_file() or (run_dir / self.resume_file).is_symlink():
            return False
        if (run_dir / self.resume_file).is_file():
            return True
        started = OWN_FILES | {str(config.hydra.output_subdir), f"{config.get('task_name')}.log"}
        return all(p.name in started for p in run_dir.iterdir())

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launched = launched_processes(config)
        if launched:
            _fail(
                RunDirError(
                    f"{launched}: a sweep (-m) is not run across launched ranks (every rank would run every job "
                    "into folders of its own). Start one launch per setting, each with its own hydra.run.dir"
                )
            )
        if is_launched_child():
            return
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", ""))
        if "hydra.job.num" not in subdir and "hydra.job.id" not in subdir:
            _fail(
                RunDirError(
                    f"hydra.sweep.subdir={subdir!r} must contain ${{hydra.job.num}} (or ${{hydra.job.id}}): "
                    "otherwise two jobs of the sweep would write into one folder"
                )
            )
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).expanduser().absolute()
        with _claiming(sweep_dir):
            self._claims.append(RunClaim(sweep_dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_launched_child() or config.hydra.mode != RunMode.MULTIRUN:
            return
        # Hydra has just written this job's .hydra/ (and opened its log) inside the sweep folder this sweep owns.
        job_dir = Path(config.hydra.runtime.output_dir)
        written = {str(config.hydra.output_subdir), f"{config.hydra.job.name}.log", f"{config.get('task_name')}.log"}
        with _claiming(job_dir):
            self._job_claim = RunClaim(job_dir, allowed=written)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._job_claim is not None:
            self._job_claim.release()
            self._job_claim = None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        while self._claims:
            self._claims.pop().release()
