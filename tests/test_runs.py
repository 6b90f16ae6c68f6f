"""Run folders, resume and failure behaviour of ``python -m simko.train`` / ``simko.eval`` (subprocesses), and the
pieces behind them (run-dir claims, the per-step metrics file) in-process."""

from __future__ import annotations

import csv
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from simko.checkpointing import CheckpointError, read_checkpoint
from simko.runs import MARKER, RunClaim, RunDirError, plan_run
from simko.steplog import StepCSVLogger, supersede_rows_after
from test_checkpointing import bad_files, write_malicious
from test_entry_points import SMALL_TINY, metrics, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def args(cache, tmp_path):
    def make(run_dir: str | None, *extra: str) -> list[str]:
        out = ["debug=fast", f"paths.cache_dir={cache}", f"paths.log_dir={tmp_path}", "callbacks.progress=null"]
        if run_dir is not None:
            out.append(f"hydra.run.dir={tmp_path / run_dir}")
        return [*out, *SMALL_TINY, *extra]

    return make


def refused(proc, *needles: str) -> None:
    """A start-up refusal: non-zero exit, one readable message with every needle, no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def start_paused(cmd_args: list[str], point: str, log: Path) -> None:
    """Run simko.train until it pauses at ``point`` (simko.faults), then SIGKILL it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SIMKO_PAUSE_AT=point)
    with open(log, "w") as out:
        cmd = [sys.executable, "-m", "simko.train", *cmd_args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                out.write(line)
                if line.startswith("SIMKO-PAUSE"):
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait(timeout=600)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-4000:]


# ---------------------------------------------------------------------------------------------------- run folders


@pytest.mark.integration
def test_a_second_run_into_the_same_folder_is_refused(args, tmp_path):
    run("simko.train", *args("shared", "rl_steps=2"))
    folder = tmp_path / "shared"
    config = (folder / ".hydra" / "config.yaml").read_bytes()
    rows = (folder / "csv" / "metrics.csv").read_bytes()
    ckpts = sorted(p.name for p in (folder / "checkpoints").iterdir())
    proc = run("simko.train", *args("shared", "rl_steps=3", "seed=1"), check=False)
    refused(proc, str(folder), "belongs to another run", "ckpt_path=last")
    assert (folder / ".hydra" / "config.yaml").read_bytes() == config  # Hydra never got to overwrite it
    assert (folder / "csv" / "metrics.csv").read_bytes() == rows
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ckpts


@pytest.mark.integration
def test_sweep_folders_are_claimed_too(args, tmp_path):
    sweep = ["-m", "loss.name=bogus", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    common = [a for a in args(None) if not a.startswith("hydra.run.dir")]
    first = run("simko.train", *sweep, *common, check=False)
    assert (tmp_path / "sweep" / MARKER).is_file(), first.stderr[-2000:]
    refused(run("simko.train", *sweep, *common, check=False), str(tmp_path / "sweep"), "belongs to another run")
    shared_subdir = [*sweep[:2], f"hydra.sweep.dir={tmp_path / 's2'}", "hydra.sweep.subdir=x"]
    one_folder = run("simko.train", *shared_subdir, *common, check=False)
    refused(one_folder, "hydra.sweep.subdir", "hydra.job.num")


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder`` (links not followed): file bytes, link targets, folders."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = path.read_bytes()
    return out


@pytest.fixture
def mounts():
    """``mounts(path, *options)`` mounts a small tmpfs there (skips where mounting is not allowed); unmounted after."""
    done: list[Path] = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join(["size=4m", *options])
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        done.append(path)
        return path

    yield mount
    for path in reversed(done):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["lock_is_a_directory", "lock_is_a_symlink_loop", "read_only_folder", "dangling_link"])
def test_a_folder_that_cannot_be_claimed_stops_the_run(args, tmp_path, mounts, how):
    """Any failure to claim a run folder stops the run with one message naming the folder, and nothing in it changes.

    Hydra's callback runner turns an exception of a callback into a warning: a lock file replaced by a directory
    let a second run overwrite a finished run (exit 0, a UserWarning)."""
    folder = tmp_path / "done"
    if how == "read_only_folder":
        mounts(folder)
    fake_run(folder, 2)
    if how == "lock_is_a_directory":
        (folder / ".simko-run.lock").mkdir()
    elif how == "lock_is_a_symlink_loop":
        (folder / ".simko-run.lock").symlink_to(folder / ".simko-run.lock")
    elif how == "read_only_folder":
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    elif how == "dangling_link":
        folder = tmp_path / "link"
        folder.symlink_to(tmp_path / "missing" / "target")
    before = snapshot(tmp_path)
    proc = run("simko.train", *args(None, "rl_steps=2", f"hydra.run.dir={folder}"), check=False, timeout=300)
    refused(proc, f"run folder {folder}")
    assert proc.returncode == 2 and "UserWarning" not in proc.stderr
    assert snapshot(tmp_path) == before


def test_default_run_folder_names_are_unique_per_process():
    """The default run (and sweep) folder is date_time-milliseconds_pid: two runs started in the same second get
    different folders (it was date_time, and two such runs shared one)."""
    from hydra import compose, initialize_config_dir

    from simko.config import RUN_ID

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert str(cfg.hydra.run.dir).endswith(f"/train/runs/{RUN_ID}")
    assert str(cfg.hydra.sweep.dir).endswith(f"/train/multiruns/{RUN_ID}")
    date, clock, pid = RUN_ID.split("_")
    assert pid == str(os.getpid()) and len(clock.split("-")) == 4  # hours-minutes-seconds-milliseconds


def test_run_folder_claims(tmp_path):
    first = RunClaim(tmp_path / "a")
    with pytest.raises(RunDirError, match="in use by another running process"):
        RunClaim(tmp_path / "a")  # the lock is held while the first run lives
    first.release()
    with pytest.raises(RunDirError, match="belongs to another run"):
        RunClaim(tmp_path / "a")
    RunClaim(tmp_path / "a", continue_run=True).release()  # its own resume may continue it
    info = json.loads((tmp_path / "a" / MARKER).read_text())
    assert len(info["attempts"]) == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("someone else's")
    with pytest.raises(RunDirError, match="notes.txt"):
        RunClaim(tmp_path / "b")
    with pytest.raises(RunDirError, match="not a simko run folder"):
        RunClaim(tmp_path / "b", continue_run=True)


def fake_run(folder: Path, *steps: int, weights_only_step: int | None = None) -> None:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"created": "x", "attempts": []}))
    for step in steps:
        state = {"state_dict": {"policy.w": torch.ones(1)}, "rl_step": step, "optimizer_states": [{}]}
        name = "last.ckpt" if step == max(steps) else f"step{step:06d}.ckpt"
        torch.save(state, folder / "checkpoints" / name)
    if weights_only_step is not None:
        torch.save(
            {"state_dict": {"policy.w": torch.ones(1)}, "rl_step": weights_only_step},
            folder / "checkpoints" / f"step{weights_only_step:06d}.ckpt",
        )


def test_resume_plans(tmp_path):
    run_dir = tmp_path / "r"
    fake_run(run_dir, 2, 4, weights_only_step=3)
    plan = plan_run(tmp_path / "default", str(run_dir / "checkpoints" / "last.ckpt"), run_dir_given=False)
    assert plan.run_dir == run_dir and plan.continue_run and plan.resume_step == 4  # continues in its own folder
    plan = plan_run(run_dir, "last", run_dir_given=True)
    assert plan.continue_run and plan.resume_step == 4
    plan = plan_run(tmp_path / "branch", str(run_dir / "checkpoints" / "step000002.ckpt"), run_dir_given=True)
    assert plan.run_dir == tmp_path / "branch" and not plan.continue_run  # a new run from that state
    with pytest.raises(RunDirError, match="rewind"):
        plan_run(tmp_path / "default", str(run_dir / "checkpoints" / "step000002.ckpt"), run_dir_given=False)
    with pytest.raises(CheckpointError, match="weights only"):
        plan_run(tmp_path / "x", str(run_dir / "checkpoints" / "step000003.ckpt"), run_dir_given=True)
    with pytest.raises(RunDirError, match="hydra.run.dir"):
        plan_run(tmp_path / "default", "last", run_dir_given=False)
    assert not plan_run(tmp_path / "new", "last", run_dir_given=True).continue_run  # nothing to continue yet


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.integration
def test_killed_run_resumes_in_its_own_folder_exactly(args, tmp_path):
    """Kill a 4-step run just before its last.ckpt (taken at step 4) replaces the one of step 2, after rows 3-4 were
    written; resume it by naming its last.ckpt: it continues in the same folder, rows 3-4 move to csv/superseded/,
    steps 3-4 are recomputed, and rows and weights equal an uninterrupted run's."""
    every = "callbacks.model_checkpoint.last_every_n_steps=2"
    run("simko.train", *args("full", "rl_steps=4", every))
    start_paused(args("killed", "rl_steps=4", every, "logger=many"), "checkpoint.commit@2", tmp_path / "killed.log")
    folder = tmp_path / "killed"
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["rl_step"] == 2
    first_config = (folder / ".hydra" / "config.yaml").read_bytes()

    resume = [*args(None, "rl_steps=4", every, "logger=many"), f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"]
    run("simko.train", *resume)
    assert not (tmp_path / "debug").exists()  # no second folder
    full, resumed = metrics(tmp_path / "full"), metrics(folder)
    assert list(resumed.index) == [1.0, 2.0, 3.0, 4.0]
    raw = pd.read_csv(folder / "csv" / "metrics.csv")
    assert list(raw["step"]) == [0, 1, 2, 3, 4]  # one row per step, the killed attempt's 3-4 replaced
    cols = [c for c in full.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(full[cols], resumed[cols], check_exact=True)
    aside = list((folder / "csv" / "superseded").iterdir())
    assert len(aside) == 1 and list(pd.read_csv(aside[0])["step"]) == [3, 4]
    names = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000001.ckpt", "step000002.ckpt", "step000003.ckpt", "step000004.ckpt"]
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert b["rl_step"] == 4 and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (folder / ".hydra" / "config.yaml").read_bytes() == first_config
    assert len(list((folder / ".hydra").glob("resume-*/config.yaml"))) == 1
    # TensorBoard: the resumed attempt purges what the killed one logged after step 2: one curve, each step once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard")).Reload()
    reward = [(e.step, e.value) for e in events.Scalars("train/reward")]
    assert [step for step, _ in reward] == [1, 2, 3, 4]
    assert [value for _, value in reward] == pytest.approx(list(full["train/reward"]), abs=1e-7)


PAUSED_EXACT = (
    "+module.verifiers.exact={_target_:simko.faults.PauseVerifier,verifier:{_target_:simko.rewards.ExactMatchVerifier}}"
)


def signal_when_paused(cmd_args: list[str], point: str, signum: int, env_extra: dict | None = None):
    """Run simko.train; when it passes ``point`` (simko.faults, a 3 s pause) send it ``signum``; the finished run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SIMKO_PAUSE_AT=point, SIMKO_PAUSE_S="3")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "simko.train", *cmd_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    try:
        for line in proc.stderr:
            stderr.append(line)
            if line.startswith("SIMKO-PAUSE"):
                proc.send_signal(signum)
                break
        stderr.extend(proc.stderr)
        stdout = proc.stdout.read()
        proc.wait(timeout=600)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "".join(stderr))


@pytest.mark.integration
def test_sigterm_saves_the_step_in_progress_exits_143_and_the_run_continues_exactly(args, tmp_path):
    """SIGTERM (preemption) exited 0 in about a second with no checkpoint, losing the steps since the last one, and
    a scheduler recorded the run as completed. Now: SIGTERM inside RL step 2's scoring (last.ckpt due only at
    steps 3 and 4) finishes step 2 and its validation, writes last.ckpt for it, prints the command that continues the
    run and exits 143; that command then gives the uninterrupted run's metrics and weights."""
    common = ["rl_steps=4", "callbacks.model_checkpoint.last_every_n_steps=3", PAUSED_EXACT]
    run("simko.train", *args("full", *common))
    # verify calls: step 0's validation (1 batch), step 1, step 2: the 3rd is inside RL step 2
    proc = signal_when_paused(args("stopped", *common), "verify@3", signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    folder = tmp_path / "stopped"
    assert "stopped by SIGTERM after RL step 2 of 4" in proc.stderr
    assert f"{folder / 'checkpoints' / 'last.ckpt'} holds RL step 2" in proc.stderr
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["rl_step"] == 2
    assert list(pd.read_csv(folder / "csv" / "metrics.csv")["step"]) == [0, 1, 2]  # step 2's validation too
    command = shlex.split(proc.stderr.split("continue the run with:\n", 1)[1].splitlines()[0])
    assert command[:3] == ["python", "-m", "simko.train"] and "ckpt_path=last" in command
    resumed = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, again = metrics(tmp_path / "full"), metrics(folder)
    cols = [c for c in full.columns if not c.startswith("time/")]
    pd.testing.assert_frame_equal(full[cols], again[cols], check_exact=True)
    assert list(pd.read_csv(folder / "csv" / "metrics.csv")["step"]) == [0, 1, 2, 3, 4]
    a = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(folder / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_slurm_requeue_signal_saves_requeues_and_exits_non_zero(args, tmp_path):
    """Under SLURM with Lightning's auto-requeue, the requeue signal (SIGUSR1, `sbatch --signal=USR1@90`) stops the
    run like SIGTERM, then requeues the job with `scontrol requeue <job id>` (a fake scontrol here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "simko",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    common = ["rl_steps=4", "callbacks.model_checkpoint.last_every_n_steps=3", PAUSED_EXACT]
    proc = signal_when_paused(args("slurm", *common), "verify@2", signal.SIGUSR1, slurm)
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-3000:]
    assert "stopped by SIGUSR1 after RL step 1 of 4" in proc.stderr and "requeued SLURM job 4242" in proc.stderr
    assert calls.read_text().split() == ["requeue", "4242"]
    assert read_checkpoint(tmp_path / "slurm" / "checkpoints" / "last.ckpt")["rl_step"] == 1


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["truncated", "malicious"])  # every kind in-process: test_checkpointing.py
def test_resume_from_a_bad_checkpoint_fails_with_one_message(args, tmp_path, kind):
    marker = tmp_path / "PWNED"
    path = write_malicious(tmp_path / "evil.ckpt", marker) if kind == "malicious" else bad_files(tmp_path)[kind]
    proc = run("simko.train", *args("resume_bad", "rl_steps=2", f"ckpt_path={path}"), check=False, timeout=300)
    refused(proc, f"checkpoint {path}")
    assert "weights_only=False" not in proc.stderr
    assert not marker.exists()


@pytest.mark.integration
def test_eval_of_a_malicious_checkpoint_runs_nothing(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = write_malicious(tmp_path / "evil.ckpt", marker)
    proc = run(
        "simko.eval",
        f"ckpt_path={path}",
        "eval.n=2",
        "eval.limit=2",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'ev'}",
        *SMALL_TINY,
        check=False,
        timeout=300,
    )
    assert not marker.exists()
    refused(proc, f"checkpoint {path}", "execute code")


# ---------------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size_kb = 2600
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the in-process ENOSPC tests cover it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_full_disk_keeps_the_last_checkpoint_and_earlier_rows(args, tmp_path, small_tmpfs):
    """A real full disk (a 2.6 MB tmpfs as the run folder): the run stops with one message, last.ckpt is a complete
    checkpoint, metrics.csv holds every step up to it, and no temporary file is left."""
    folder = small_tmpfs / "run"
    overrides = [a for a in args(None, "rl_steps=30") if not a.startswith("hydra.run.dir")]
    proc = run("simko.train", *overrides, f"hydra.run.dir={folder}", check=False, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "disk is full" in proc.stderr and "No space left" in proc.stderr, proc.stderr[-3000:]
    last = read_checkpoint(folder / "checkpoints" / "last.ckpt")
    lines = (folder / "csv" / "metrics.csv").read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    steps = [int(r["step"]) for r in csv.DictReader(complete)]
    assert steps == list(range(len(steps))) and steps[-1] >= last["rl_step"] >= 1
    assert not [p for p in folder.rglob(".*") if ".simko-tmp-" in p.name]
    for ckpt in (folder / "checkpoints").glob("*.ckpt"):  # every checkpoint file there is complete
        read_checkpoint(ckpt)


def test_metrics_rows_survive_a_failed_append(tmp_path, monkeypatch):
    """ENOSPC simulated in-process on a row append: the rows written before are intact."""
    logger = StepCSVLogger(tmp_path, name="csv", version="")
    for step in range(3):
        logger.log_metrics({"train/reward": 0.5 + step}, step)
    logger.flush_rows()
    before = (tmp_path / "csv" / "metrics.csv").read_text()
    logger.log_metrics({"train/reward": 9.0}, 3)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        logger.flush_rows()
    monkeypatch.undo()
    assert (tmp_path / "csv" / "metrics.csv").read_text().startswith(before)
    assert list(pd.read_csv(tmp_path / "csv" / "metrics.csv")["step"])[:3] == [0, 1, 2]


def test_one_row_per_step_and_superseded_rows(tmp_path):
    logger = StepCSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"val/pass@1": 0.25}, 0)
    logger.log_metrics({"train/reward": 0.5, "train/lr": 1e-5}, 1)
    logger.save()  # step 0 is over: written; step 1 may still get validation metrics
    logger.log_metrics({"val/pass@1": 0.5}, 1)
    logger.log_metrics({"train/reward": 0.75, "train/lr": 1e-5}, 2)
    logger.finalize("success")
    path = tmp_path / "csv" / "metrics.csv"
    frame = pd.read_csv(path)
    assert list(frame["step"]) == [0, 1, 2] and list(frame.columns)[0] == "step"
    assert frame.loc[1, "val/pass@1"] == 0.5 and frame.loc[1, "train/reward"] == 0.5
    with open(path, "a") as f:
        f.write("3,0.1,0.1")  # a row cut by a kill: no newline
    aside = supersede_rows_after(path, 1)
    assert list(pd.read_csv(path)["step"]) == [0, 1]
    assert aside.parent == tmp_path / "csv" / "superseded"
    moved = aside.read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in moved] == ["2", "3"] and moved[-1] == "3,0.1,0.1"
    # a new logger continues the same file
    again = StepCSVLogger(tmp_path, name="csv", version="")
    again.log_metrics({"train/reward": 0.8, "train/lr": 1e-5}, 2)
    again.finalize("success")
    assert list(pd.read_csv(path)["step"]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------- samples, links


def sample_row(step: int, index: int) -> dict:
    return {"rl_step": step, "prompt_index": index, "completion": "x" * 2000, "reward": 1.0}


def test_a_full_disk_never_leaves_half_a_sample_row(tmp_path, mounts):
    """A disk full while samples.jsonl was appended to left its last line cut mid-record, with an error that did not
    name the file (and a resume then appended onto the broken line). Now the file is as it was and the error names
    it. A real full disk: a small tmpfs, nearly filled."""
    from simko.callbacks.samples import RolloutSamples

    disk = mounts(tmp_path / "disk", "size=64k")
    samples = RolloutSamples(str(disk / "samples.jsonl"))
    samples.write([sample_row(1, 0)], [])
    before = (disk / "samples.jsonl").read_bytes()
    (disk / "filler").write_bytes(b"\0" * (64 * 1024 - 3 * 4096 - len(before)))
    with pytest.raises(OSError) as error:
        samples.write([sample_row(10, i) for i in range(20)], [])
    assert error.value.errno == errno.ENOSPC and str(disk / "samples.jsonl") in str(error.value)
    assert (disk / "samples.jsonl").read_bytes() == before


def test_supersede_samples_after_a_step(tmp_path):
    """Rows a killed attempt wrote after the checkpoint's step, and a last line cut by a kill or a full disk, move
    aside (as metrics.csv rows do), so the resumed run's rows follow a complete line and each step is there once."""
    from simko.callbacks.samples import supersede_samples_after

    path = tmp_path / "samples.jsonl"
    lines = [json.dumps(sample_row(s, 0)) + "\n" for s in (1, 10, 20)]
    path.write_text("".join(lines) + '{"rl_step": 30, "compl')
    aside = supersede_samples_after(path, 10)
    assert path.read_text() == "".join(lines[:2])
    assert aside.parent == tmp_path / "superseded" and aside.read_text() == lines[2] + '{"rl_step": 30, "compl\n'
    assert supersede_samples_after(path, 10) is None


@pytest.mark.parametrize("what", ["samples", "metrics"])
def test_appends_never_follow_a_symbolic_link(tmp_path, what):
    """samples.jsonl symlinked to another file received 24 rows of model text on resume. Every file a run appends
    to is opened with O_NOFOLLOW: a link there is an error naming it, and its target is untouched."""
    from simko.callbacks.samples import RolloutSamples

    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's\n")
    if what == "samples":
        (tmp_path / "samples.jsonl").symlink_to(outside)
        write = lambda: RolloutSamples(str(tmp_path / "samples.jsonl")).write([sample_row(1, 0)], [])  # noqa: E731
    else:
        logger = StepCSVLogger(tmp_path, name="csv", version="")
        logger.log_metrics({"train/reward": 0.5}, 0)
        logger.flush_rows()
        (tmp_path / "csv" / "metrics.csv").unlink()
        (tmp_path / "csv" / "metrics.csv").symlink_to(outside)
        logger.log_metrics({"train/reward": 0.5}, 1)
        write = logger.flush_rows
    with pytest.raises(OSError, match="symbolic link"):
        write()
    assert outside.read_text() == "someone else's\n"


@pytest.mark.integration
@pytest.mark.parametrize("where", ["version", "outside"])
def test_resume_follows_the_csv_loggers_real_path_and_samples_agree(args, tmp_path, where):
    """Resume found metrics.csv only at <run>/*/metrics.csv: with logger.csv.version=v0 steps were logged twice, and
    with logger.csv.save_dir outside the run a row cut by a kill stayed and the resumed run crashed ("dict contains
    fields not in fieldnames: None"). samples.jsonl got the replayed steps' rows again. Now both files hold every
    step once after a resume."""
    folder = tmp_path / "run"
    csv_dir = folder / "csv" / "v0" if where == "version" else tmp_path / "elsewhere" / "csv"
    logger = ["logger.csv.version=v0"] if where == "version" else [f"logger.csv.save_dir={tmp_path / 'elsewhere'}"]
    common = [
        "rl_steps=4",
        "callbacks.model_checkpoint.last_every_n_steps=2",
        "callbacks.samples.every_n_steps=1",
        *logger,
    ]
    start_paused(args("run", *common), "checkpoint.commit@2", tmp_path / "killed.log")
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["rl_step"] == 2
    assert list(pd.read_csv(csv_dir / "metrics.csv")["step"]) == [0, 1, 2, 3, 4]  # 3-4 logged before the kill
    with open(csv_dir / "metrics.csv", "a") as f:
        f.write("5,0.1,0.1")  # and a row cut mid-write
    run("simko.train", *args("run", *common, "ckpt_path=last"))
    assert list(pd.read_csv(csv_dir / "metrics.csv")["step"]) == [0, 1, 2, 3, 4]
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    keys = [(r["rl_step"], r["prompt_index"], r["completion"]) for r in rows]
    assert sorted({r["rl_step"] for r in rows}) == [1, 2, 3, 4] and len(keys) == 4 * 2 * 4  # 2 prompts x G=4, once
    assert [r["rl_step"] for r in rows] == sorted(r["rl_step"] for r in rows)


@pytest.mark.integration
@pytest.mark.parametrize("link", ["samples.jsonl", "train.log", "csv/metrics.csv"])
def test_resume_refuses_a_run_folder_with_a_symlinked_file(args, tmp_path, link):
    """A file of the run folder replaced by a symbolic link (to a file outside it): continuing the run is refused
    at start, naming the link, and the link's target gets nothing."""
    folder = tmp_path / "run"
    fake_run(folder, 2)
    (folder / "csv").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's\n")
    (folder / link).symlink_to(outside)
    proc = run("simko.train", *args("run", "rl_steps=4", "ckpt_path=last"), check=False, timeout=300)
    refused(proc, f"{folder / link}", "symbolic link")
    assert outside.read_text() == "someone else's\n"


# ---------------------------------------------------------------------------------------------------- one-line errors


@pytest.mark.integration
def test_continuing_with_another_architecture_or_loss_is_one_message(args, tmp_path):
    """Continuing a run with another model architecture ended in a state-dict traceback from inside fit, and with
    another loss it was accepted silently. Both are one message now (a new loss is a branch into a new folder)."""
    run("simko.train", *args("run", "rl_steps=1"))
    folder = tmp_path / "run"
    before = snapshot(folder)
    wider = run("simko.train", *args("run", "rl_steps=2", "ckpt_path=last", "model.intermediate_size=96"), check=False)
    refused(wider, f"checkpoint {folder / 'checkpoints' / 'last.ckpt'} does not fit this model", "mlp")
    other_loss = run("simko.train", *args("run", "rl_steps=2", "ckpt_path=last", "loss=simko"), check=False)
    refused(other_loss, f"{folder / 'checkpoints' / 'last.ckpt'} was trained with another loss", "loss.name: 'grpo'")
    kept = lambda files: {k: v for k, v in files.items() if k.startswith(("checkpoints", "csv", "samples"))}  # noqa: E731
    assert kept(snapshot(folder)) == kept(before)  # the attempts' log lines and configs are all they added


@pytest.mark.integration
def test_a_chat_template_refused_by_the_sandbox_is_one_message(args, tmp_path):
    """A tokenizer whose chat template reaches into Python objects (refused by jinja's sandbox) ended in a
    SecurityError traceback; now one message naming the tokenizer and the way out."""
    from helpers import digit_tokenizer, random_qwen2

    folder = tmp_path / "model"
    random_qwen2().save_pretrained(folder)
    tokenizer = digit_tokenizer()
    tokenizer.chat_template = "{{ messages[0]['content'].__class__.__mro__ }}"
    tokenizer.save_pretrained(folder)
    overrides = [a for a in args("run", "rl_steps=1") if not a.startswith("model.")]
    hf = ["model=hf", f"model.name_or_path={folder}", "data.use_chat_template=true"]
    proc = run("simko.train", *overrides, *hf, check=False)
    refused(proc, f"the chat template of the tokenizer {folder} failed (SecurityError", "data.use_chat_template=false")


@pytest.mark.integration
def test_a_verifier_that_breaks_its_contract_stops_the_run_with_one_message(args, tmp_path):
    """A verifier returning fewer rewards than completions was padded with 0.0 and trained on; now the run stops
    at that step with one message naming the verifier (exit 1)."""
    (tmp_path / "short_verifier.py").write_text(
        "from simko.rewards import Verifier\n"
        "class Short(Verifier):\n"
        "    name = 'short'\n"
        "    def _score(self, completions, answers):\n"
        "        return [1.0] * (len(completions) - 1)\n"
    )
    proc = run(
        "simko.train",
        *args("run", "rl_steps=2", "validate_first=false", "imports=[short_verifier]"),
        "+module.verifiers.exact={_target_:short_verifier.Short}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: verifier 'short' returned 15 scores for 16 completions" in proc.stderr, proc.stderr[-3000:]
    assert "at RL step 1" in proc.stderr and "Traceback" not in proc.stderr
