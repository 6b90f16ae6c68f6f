"""Multi-node: 2 "nodes" x 1 process on localhost (gloo) run the same RL steps as 2 processes on one node.

Each node is started as a user starts it on a cluster: by hand with Lightning's variables (MASTER_ADDR,
MASTER_PORT, NODE_RANK, WORLD_SIZE: LightningEnvironment), by two torchrun calls (TorchElasticEnvironment), and
by ``scripts/slurm/train.sbatch`` under a stand-in ``srun`` that starts the tasks with SLURM's variables
(SLURMEnvironment). The reference is ``trainer=ddp`` with 2 processes that Lightning starts on one node. The
nodes share this machine's filesystem, as cluster nodes share one: the run folder is the same path on both.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import SMALL_TINY, compose_config, rl_metrics
from simko.checkpointing import read_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Rewards vary with the response length (the overlong penalty), so the advantages and gradients are not zero;
# SimKO's top-K and λ paths run; no validation, one checkpoint at the end.
RUN = [
    "debug=fast",
    "callbacks.progress=null",
    *SMALL_TINY,
    "rl_steps=2",
    "loss=simko",
    "module.overlong.buffer=4",
    "validate_first=false",
    "trainer.limit_val_batches=0",
    "callbacks.model_checkpoint.every_n_steps=0",
]
COLUMNS = ["train/reward", "train/loss", "train/policy_loss", "train/grad_norm", "train/response_len", "diag/p_rank1"]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK"):
        env.pop(var, None)
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def by_hand(overrides: list[str], port: str) -> tuple[list[str], dict[int, dict[str, str]]]:
    """The command of a run of 2 nodes x 1 process started by hand, and each node's environment (LightningEnvironment:
    MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE)."""
    command = [sys.executable, "-m", "simko.train", *overrides, "trainer.devices=1", "trainer.num_nodes=2"]
    env = {i: environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(i), WORLD_SIZE="2") for i in (0, 1)}
    return command, env


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def finish(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Wait for every process; on a failure or a hang, stop the others and show every log."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc in procs.values():
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if any(proc.returncode != 0 for proc in procs.values()):
        shown = "\n".join(
            f"--- {name} (exit {procs[name].returncode}):\n{logs[name].read_text()[-5000:]}" for name in procs
        )
        raise AssertionError(f"a node failed or hung:\n{shown}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def args(cache_dir, tmp_path):
    def make(run_dir: Path, *extra: str) -> list[str]:
        return [*RUN, f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path}", f"hydra.run.dir={run_dir}", *extra]

    return make


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, cache_dir) -> Path:
    """The reference: ``trainer=ddp``, 2 processes on one node (Lightning starts the second)."""
    root = tmp_path_factory.mktemp("one_node")
    run_dir = root / "run"
    command = [sys.executable, "-m", "simko.train", *RUN, f"paths.cache_dir={cache_dir}", f"paths.log_dir={root}",
               f"hydra.run.dir={run_dir}", "trainer=ddp"]  # fmt: skip
    logs = {"one node": root / "out.log"}
    finish({"one node": start(command, environment(), logs["one node"])}, logs)
    return run_dir


def assert_same_run(run_dir: Path, reference: Path, rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Same rewards, losses, gradient norms, diagnostics at every RL step, and the same final weights."""
    ours, ref = rl_metrics(run_dir), rl_metrics(reference)
    assert list(ours.index) == list(ref.index) == [1.0, 2.0]
    assert (ref["train/grad_norm"] > 0).all()  # a real update, not a no-op
    pd.testing.assert_frame_equal(ours[COLUMNS], ref[COLUMNS], rtol=rtol, atol=atol)
    a = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(reference / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=max(atol, 1e-7))


def assert_written_by_rank_zero(run_dir: Path, rank_zero_log: Path) -> None:
    """The other node wrote nothing into the run folder: every line of the run's log file is one global rank 0
    printed, and the folder holds one run's files."""
    printed = rank_zero_log.read_text()
    for line in (run_dir / "debug.log").read_text().splitlines():
        assert line in printed, f"a line of {run_dir / 'debug.log'} that rank 0 did not print: {line}"
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


def test_two_nodes_by_hand_equal_one_node(args, one_node, tmp_path):
    """LightningEnvironment: each node started with MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE. Node 1
    starts first and waits at the rendezvous: it must leave the run folder empty for node 0 to claim (it used to
    write .hydra/ and the log there, and node 0 then refused the folder as another's)."""
    run_dir, port = tmp_path / "run", str(free_port())
    command, env = by_hand(args(run_dir, "trainer=ddp"), port)
    logs = {f"node {i}": tmp_path / f"node{i}.log" for i in (0, 1)}
    procs = {"node 1": start(command, env[1], logs["node 1"])}
    deadline = time.monotonic() + 120
    while "Initializing distributed" not in logs["node 1"].read_text() and procs["node 1"].poll() is None:
        assert time.monotonic() < deadline, logs["node 1"].read_text()
        time.sleep(0.5)
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(p.name for p in run_dir.iterdir())
    procs["node 0"] = start(command, env[0], logs["node 0"])
    finish(procs, logs)
    assert_same_run(run_dir, one_node)
    assert_written_by_rank_zero(run_dir, logs["node 0"])


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_by_torchrun_equal_one_node(args, one_node, tmp_path, rendezvous):
    """TorchElasticEnvironment: two torchrun calls, one per node, with the static rendezvous (--master-addr,
    --node-rank) or c10d's (--rdzv-endpoint; the node ranks come from the rendezvous)."""
    run_dir, port = tmp_path / "run", str(free_port())
    logs = {f"node {i}": tmp_path / f"node{i}.log" for i in (0, 1)}
    procs = {}
    for i in (0, 1):
        if rendezvous == "static":
            where = ["--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", port]
        else:
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]
        launcher = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", *where]
        command = [
            *launcher,
            "-m",
            "simko.train",
            *args(run_dir, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"),
        ]
        procs[f"node {i}"] = start(command, environment(), logs[f"node {i}"])
    finish(procs, logs)
    assert_same_run(run_dir, one_node)
    rank_zero = next(log for log in logs.values() if "Initializing distributed: GLOBAL_RANK: 0" in log.read_text())
    assert_written_by_rank_zero(run_dir, rank_zero)


FAKE_SRUN = """#!/usr/bin/env bash
# srun's stand-in: every task of the job on this machine, with the variables srun gives a task.
while [[ $1 == -* ]]; do shift; done
export SLURM_NTASKS=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE)) SLURM_STEP_ID=0 SLURM_NODELIST=$SLURM_JOB_NODELIST
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  for ((task = 0; task < SLURM_NTASKS_PER_NODE; task++)); do
    SLURM_NODEID=$node SLURM_LOCALID=$task SLURM_PROCID=$((node * SLURM_NTASKS_PER_NODE + task)) "$@" \\
      > "$SRUN_LOG_DIR/task$((node * SLURM_NTASKS_PER_NODE + task)).log" 2>&1 &
    pids+=($!)
  done
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def slurm_job(tmp_path: Path, job_id: str) -> dict[str, str]:
    """The variables of a 2-node x 1-task batch job, and a PATH whose srun is the stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    return environment(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        SRUN_LOG_DIR=str(tmp_path),
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="simko",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_JOB_NODELIST="127.0.0.1",
    )


def test_sbatch_script_under_srun_equals_one_node(args, one_node, tmp_path):
    """SLURMEnvironment: scripts/slurm/train.sbatch as a 2-node x 1-task job, srun standing in (ranks from
    SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID, the port from SLURM_JOB_ID). The script's own run folder and
    GPU settings are replaced by overrides, as a user's are."""
    run_dir = tmp_path / "run"
    job = slurm_job(tmp_path, job_id=str(20000 + free_port() % 10000))
    overrides = args(run_dir, "trainer.accelerator=cpu", "trainer.precision=32-true")
    proc = subprocess.run(["bash", "scripts/slurm/train.sbatch", *overrides], cwd=REPO, env=job, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("task*.log")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    assert "2 node(s) x 1 task(s)" in proc.stdout
    assert_same_run(run_dir, one_node)
    assert_written_by_rank_zero(run_dir, tmp_path / "task0.log")


def test_sbatch_script_dry_run_prints_the_srun_command(tmp_path):
    """The script's command for 4 nodes x 8 GPUs: devices and nodes from SLURM, the job's own run folder (absolute,
    the same on every node), resumed from its last checkpoint when requeued; user overrides last."""
    job = slurm_job(tmp_path, job_id="4242")
    job.update(SLURM_JOB_NUM_NODES="4", SLURM_NNODES="4", SLURM_NTASKS_PER_NODE="8", DRY_RUN="1", PYTHON="python")
    text = (REPO / "scripts" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    out = subprocess.run(["bash", "scripts/slurm/train.sbatch", "loss=simko"], cwd=REPO, env=job, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert out[:5] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "simko.train"]
    for arg in ("trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=8", "trainer.num_nodes=4", "ckpt_path=last"):
        assert arg in out, arg
    assert f"hydra.run.dir={REPO}/logs/train/runs/slurm-4242" in out and out[-1] == "loss=simko"
    # Outside a job, the script says so instead of starting anything.
    bare = subprocess.run(["bash", "scripts/slurm/train.sbatch"], cwd=REPO, env=environment(), capture_output=True,
                          text=True)  # fmt: skip
    assert bare.returncode != 0 and "run this script with sbatch" in bare.stderr


def test_two_nodes_fsdp2_equal_one_node_ddp(args, one_node, tmp_path):
    """FSDP2 (fully_shard over a data-parallel mesh of both nodes' processes) across 2 nodes runs the RL steps of
    DDP on one node (as FSDP2 on one node does: tests/test_entry_points.py)."""
    run_dir, port = tmp_path / "run", str(free_port())
    command, env = by_hand(args(run_dir, "trainer=fsdp2"), port)
    logs = {f"node {i}": tmp_path / f"node{i}.log" for i in (0, 1)}
    procs = {f"node {i}": start(command, env[i], logs[f"node {i}"]) for i in (0, 1)}
    finish(procs, logs)
    assert_same_run(run_dir, one_node, rtol=1e-4, atol=1e-6)


def test_fsdp2_mesh_spans_every_node():
    """trainer=fsdp2's data-parallel size is every process of every node (it was trainer.devices alone, so 2 nodes
    x 1 device failed at start: 'data_parallel_size=1 ... should equal the world size (2)')."""
    import simko.config  # noqa: F401  (registers the resolvers)

    cfg = compose_config(["trainer=fsdp2", "trainer.devices=4", "trainer.num_nodes=2"])
    assert cfg.trainer.strategy.data_parallel_size == 8
    assert compose_config(["trainer=fsdp2", "trainer.devices=[0,1]"]).trainer.strategy.data_parallel_size == 2
    with pytest.raises(Exception, match="trainer.devices='auto'"):
        _ = compose_config(["trainer=fsdp2", "trainer.devices=auto"]).trainer.strategy.data_parallel_size


def hydra_config(*overrides: str):
    """configs/train.yaml with its ``hydra`` node, as ``python -m simko.train`` composes it before it starts."""
    from hydra import compose, initialize_config_dir

    import simko.config  # noqa: F401  (registers the resolvers)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


LAUNCHED = {
    "torchrun's second node": {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"},
    "srun's first task": {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "simko"},
    "a node started by hand": {"NODE_RANK": "0"},
}


@pytest.fixture
def launched(monkeypatch, request):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in LAUNCHED[request.param].items():
        monkeypatch.setenv(var, value)
    return request.param


@pytest.mark.parametrize("launched", list(LAUNCHED), indirect=True)
def test_launched_ranks_must_name_the_run_folder(launched, tmp_path, capsys):
    """Ranks started apart cannot agree on the default folder name (time and pid): every rank stops at start with
    one message, before Hydra makes a folder, instead of node 0 writing one folder and node 1 another. So does a
    sweep across such ranks."""
    from simko.runs import RunDirGuard

    overrides = [f"paths.log_dir={tmp_path}", "trainer.num_nodes=2"]
    with pytest.raises(SystemExit) as exit_:
        RunDirGuard("ckpt_path").on_run_start(hydra_config(*overrides))
    assert exit_.value.code == 2
    assert "give every rank the same run folder, hydra.run.dir=<folder>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        RunDirGuard("ckpt_path").on_multirun_start(hydra_config(*overrides))
    assert "a sweep (-m) is not run across launched ranks" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("launched", ["torchrun's second node", "srun's first task"], indirect=True)
def test_other_ranks_write_nothing_into_the_run_folder(launched, tmp_path):
    """A rank other than global 0 keeps its log on the console and writes no .hydra/: the folder is rank 0's to
    claim and write (on a shared filesystem, the other node's files would have made rank 0 refuse it)."""
    from simko.runs import RunDirGuard

    cfg = hydra_config(f"hydra.run.dir={tmp_path / 'run'}")
    RunDirGuard("ckpt_path").on_run_start(cfg)
    rank_zero = launched == "srun's first task"
    assert (cfg.hydra.output_subdir is not None) == rank_zero
    assert ("file" in cfg.hydra.job_logging.handlers) == rank_zero
    assert ("file" in cfg.hydra.job_logging.root.handlers) == rank_zero
    assert (tmp_path / "run" / ".simko-run.json").is_file() == rank_zero  # rank 0 claimed the folder


@pytest.mark.vllm
@pytest.mark.slow  # 3 vLLM engine starts on CPU: 404 s on the loaded 2-core machine
def test_two_nodes_with_vllm_engines_equal_one_node(args, tmp_path):
    """rollout.engine=vllm across 2 nodes started by hand: each rank's colocated engine (external launcher on the
    trainer's group, on the rank's own device although node 1 has no LOCAL_RANK) samples what the 2 engines of a
    one-node run sample, and the training that follows is the same."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed (make install-vllm)")
    # head size 32 (hidden 64 / 2 heads): vLLM's CPU attention has no kernel for 16
    engine = ["rollout.engine=vllm", "rollout.vllm.kv_cache_gib=0.05", "model.num_heads=2", "model.num_kv_heads=1"]
    reference, run_dir, port = tmp_path / "one_node", tmp_path / "two_nodes", str(free_port())
    logs = {name: tmp_path / f"{name.replace(' ', '_')}.log" for name in ("one node", "node 0", "node 1")}
    one = [sys.executable, "-m", "simko.train", *args(reference, "trainer=ddp", *engine)]
    finish({"one node": start(one, environment(), logs["one node"])}, {"one node": logs["one node"]})
    two, env = by_hand(args(run_dir, "trainer=ddp", *engine), port)
    procs = {f"node {i}": start(two, env[i], logs[f"node {i}"]) for i in (0, 1)}
    finish(procs, {k: logs[k] for k in procs})
    assert_same_run(run_dir, reference, rtol=1e-5, atol=1e-7)
    assert (rl_metrics(run_dir)["time/weight_sync"] > 0).all()
