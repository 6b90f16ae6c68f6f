"""Checkpoint files: atomic writes (kill, full disk), weights-only reads with one readable error, no code execution
from any file a user is handed (checkpoints, Hugging Face folders)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import digit_tokenizer, random_qwen2
from simko.atomic import remove_orphans
from simko.checkpointing import AtomicCheckpointIO, CheckpointError, read_checkpoint

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path, zip_format: bool = True) -> Path:
    payload = {"state_dict": {"policy.w": torch.zeros(2)}, "rl_step": 1, "x": RunsCode(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))
    return path


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"policy.w": torch.arange(10_000.0)}, "rl_step": 3}, good)
    data = good.read_bytes()
    files = {
        "empty": tmp_path / "empty.ckpt",
        "truncated": tmp_path / "truncated.ckpt",
        "random": tmp_path / "random.ckpt",
        "text": tmp_path / "notes.ckpt",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(4096))
    files["text"].write_text("not a checkpoint\n")
    return files


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "text"])
def test_unreadable_checkpoint_gives_one_error_naming_the_file(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    assert "weights_only=False" not in message  # torch's advice to unpickle with code execution is not passed on


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "PWNED"
    path = write_malicious(tmp_path / "evil.ckpt", marker, zip_format)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert not marker.exists()
    assert str(path) in str(err.value)
    if zip_format:
        assert "execute code" in str(err.value) and "system" in str(err.value)


def test_checkpoint_io_loads_weights_only(tmp_path):
    marker = tmp_path / "PWNED"
    path = write_malicious(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC simulated in-process (half the file written, then the error): the old file is intact, no temporary
    file is left, and the error names the file. (A real full tmpfs: tests/test_runs.py.)"""
    target = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"policy.w": torch.ones(3)}, "rl_step": 1}, target)
    before = target.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"state_dict": {"policy.w": torch.zeros(10_000)}, "rl_step": 2}, target)
    assert err.value.errno == errno.ENOSPC and str(target) in str(err.value) and "unchanged" in str(err.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_real_full_disk_is_one_oserror_naming_the_file(tmp_path):
    """On a real full filesystem torch.save raises a RuntimeError of its zip writer while handling the ENOSPC; the
    IO turns it into one OSError(ENOSPC) naming the file, and leaves nothing behind."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the simulated ENOSPC test covers it")
    try:
        with pytest.raises(OSError) as err:
            AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}}, mount / "last.ckpt")
        assert err.value.errno == errno.ENOSPC and str(mount / "last.ckpt") in str(err.value)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("point", ["checkpoint.open", "checkpoint.written"])
def test_kill_during_a_checkpoint_write_leaves_the_old_file(tmp_path, point):
    """SIGKILL while the new checkpoint is being written, with $TMPDIR on another filesystem (/dev/shm): the target
    keeps its old content, nothing is written to $TMPDIR, and the orphaned temporary file (beside the target) is
    removed by remove_orphans."""
    tmpdir = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "elsewhere"
    tmpdir = tmpdir / f"simko-test-{os.getpid()}-{point}"
    tmpdir.mkdir(parents=True)
    target = tmp_path / "checkpoints" / "step000002.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"policy.w": torch.ones(3)}, "rl_step": 1}, target)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import torch
        from simko.checkpointing import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"policy.w": torch.zeros(1_000_000)}}}}, {str(target)!r})
        """
    )
    env = dict(os.environ, SIMKO_PAUSE_AT=point, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"SIMKO-PAUSE {point}"), line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert target.read_bytes() == before
    assert list(tmpdir.iterdir()) == []
    tmpdir.rmdir()
    orphans = [p for p in target.parent.iterdir() if p.name != target.name]
    assert len(orphans) == 1 and orphans[0].name.startswith(f".{target.name}.simko-tmp-")
    assert remove_orphans(tmp_path) == orphans
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert read_checkpoint(target)["rl_step"] == 1


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[*overrides, "paths.output_dir=/tmp/unused"])


@pytest.mark.parametrize("trainer", ["cpu", "ddp", "fsdp2"])
def test_trainers_get_the_atomic_io(trainer):
    from hydra.utils import instantiate

    from simko.checkpointing import install_atomic_checkpoint_io

    built = instantiate(compose_train(f"trainer={trainer}").trainer, logger=False, max_steps=1)
    install_atomic_checkpoint_io(built)  # what simko.train.build does
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)


def test_sharded_checkpoints_are_refused():
    from hydra.utils import instantiate

    from simko.checkpointing import install_atomic_checkpoint_io

    cfg = compose_train("trainer=fsdp2", "trainer.devices=2", "trainer.strategy.save_distributed_checkpoint=true")
    built = instantiate(cfg.trainer, logger=False, max_steps=1)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=false"):
        install_atomic_checkpoint_io(built)


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2", "fsdp"])
def test_every_shipped_strategy_saves_through_its_checkpoint_io(trainer, tmp_path, monkeypatch):
    """DDP, FSDP2 (ModelParallelStrategy, consolidated) and FSDP (full state dict) hand the file write to the
    CheckpointIO on rank 0, so the atomic IO covers them (FSDP's Trainer needs a GPU; its strategy does not)."""
    from hydra.utils import instantiate

    from simko import atomic

    strategy = instantiate(compose_train(f"trainer={trainer}").trainer.strategy)
    strategy.checkpoint_io = AtomicCheckpointIO()
    monkeypatch.setattr(strategy, "broadcast", lambda obj, src=0: obj)  # one process, no process group
    written = []
    real = atomic.atomic_write
    monkeypatch.setattr(atomic, "atomic_write", lambda target, write: written.append(target) or real(target, write))
    target = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {"policy.w": torch.ones(2)}, "rl_step": 1}, target)
    assert written == [target]
    assert read_checkpoint(target)["rl_step"] == 1


def test_hf_folder_with_a_malicious_pickle_or_remote_code_runs_nothing(tmp_path):
    """model=hf reads a local folder: a pickled pytorch_model.bin and custom code in it never execute."""
    from simko.models import load_pretrained

    marker = tmp_path / "PWNED"
    folder = tmp_path / "model"
    random_qwen2().save_pretrained(folder)
    digit_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, nothing may run
        load_pretrained(str(folder))
    assert not marker.exists()

    remote = tmp_path / "remote"
    random_qwen2().save_pretrained(remote)
    digit_tokenizer().save_pretrained(remote)
    (remote / "configuration_evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    config = (remote / "config.json").read_text()
    (remote / "config.json").write_text(
        config.replace("{", '{"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},', 1)
    )
    try:  # transformers refuses the custom code (trust_remote_code=False) or ignores it: either way it never runs
        load_pretrained(str(remote))
    except Exception:  # noqa: BLE001
        pass
    assert not marker.exists()
