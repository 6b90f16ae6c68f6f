"""Chaos run: a training run killed with SIGKILL again and again, resumed each time, must equal the uninterrupted run.

    python scripts/chaos.py                       # 100 RL steps, 10 kills, into logs/chaos/
    python scripts/chaos.py --steps 20 --kills 3 --out /tmp/chaos   # the slow test's small version

1. The reference: one uninterrupted ``python -m simko.train`` run of ``--steps`` RL steps (``<out>/ref``).
2. The chaos run (``<out>/chaos``): the same command with ``hydra.run.dir=<out>/chaos ckpt_path=last``, started,
   killed with SIGKILL, started again, ``--kills`` times, then left to finish. Kills are aimed in turn at
   ``checkpoint.open`` (temporary checkpoint file created, empty), ``checkpoint.written`` (complete, not yet
   renamed), ``checkpoint.commit`` (a new ``last.ckpt`` about to replace the old one), ``verify`` (inside a
   verifier call, the killable process pool running) and a random moment: the trainer pauses at the chosen
   occurrence of that point (``SIMKO_PAUSE_AT``, ``simko.faults``) and is killed there; random kills come after a
   random delay.
3. Checks: the final weights (``last.ckpt``) and every weights-only snapshot are bitwise equal to the reference's;
   ``csv/metrics.csv`` has every RL step once and each value (all columns but ``time/*``) is the same text as the
   reference's; no temporary, pending, truncated or unreadable file is left; the verifier worker processes of
   killed attempts are gone. Exit status 1 if any check fails. A JSON report goes to ``<out>/report.json``.

The verifier is ``math`` (math-verify in the killable worker pool) wrapped in ``simko.faults.PauseVerifier``, so
kills land while worker processes exist.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
POINTS = ["checkpoint.open", "checkpoint.written", "checkpoint.commit", "verify", "random"]


def train_overrides(args, run_dir: Path) -> list[str]:
    verifier = (
        "{_target_:simko.faults.PauseVerifier,verifier:{_target_:simko.rewards.MathVerifier,timeout_s:5.0,"
        "num_workers:1}}"
    )
    return [
        f"rl_steps={args.steps}",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={args.cache_dir}",
        "callbacks.progress=null",
        "data.prompts_per_step=8",
        "data.val_prompts=16",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "module.micro_batch_size=32",
        "module.val_samples=4",
        "trainer.val_check_interval=10",
        "+data.train_source.verifier=math",
        "+data.val_source.verifier=math",
        "~module.verifiers.math",
        f"+module.verifiers.math={verifier}",
        f"callbacks.model_checkpoint.last_every_n_steps={args.last_every}",
        f"callbacks.model_checkpoint.every_n_steps={args.snapshot_every}",
        *args.extra,
    ]


def start(overrides: list[str], env_extra: dict[str, str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.update(env_extra)
    log = open(log_path, "a")
    log.write(f"\n===== {' '.join(overrides)} {env_extra}\n")
    log.flush()
    return subprocess.Popen(
        [sys.executable, "-m", "simko.train", *overrides],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.PIPE,
        text=True,
    )


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def committed_step(run_dir: Path) -> int | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("rl_step", 0))


def attempt(args, run_dir: Path, point: str, rng: random.Random, log_path: Path) -> dict:
    """Start the run, kill it at ``point`` (or let it finish when point is None); what happened."""
    env = {}
    nth = None
    before = committed_step(run_dir)
    remaining = args.steps - (before or 0)  # aim within what is left to run, so the point is reached
    saves = max(1, min(3, remaining // max(args.last_every, 1)))
    if point in ("checkpoint.open", "checkpoint.written", "checkpoint.commit"):
        nth = rng.randint(1, saves)
    elif point == "verify":
        nth = rng.randint(2, max(2, min(30, remaining)))
    if nth is not None:
        env = {"SIMKO_PAUSE_AT": f"{point}@{nth}"}
    t0 = time.perf_counter()
    proc = start([*train_overrides(args, run_dir), "ckpt_path=last"], env, log_path)
    paused = threading.Event()
    stderr_tail: list[str] = []

    def watch() -> None:
        for line in proc.stderr:
            stderr_tail.append(line)
            del stderr_tail[:-50]
            if line.startswith("SIMKO-PAUSE"):
                paused.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    record = {"point": point, "nth": nth, "committed_before": before}
    if point is None:
        proc.wait()
    elif point == "random":
        delay = rng.uniform(args.random_min_s, args.random_max_s)
        record["delay_s"] = round(delay, 2)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
    else:
        while not paused.is_set() and proc.poll() is None:
            paused.wait(0.05)
    killed = proc.poll() is None
    workers = []
    if killed:
        workers = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    watcher.join(timeout=5)
    with open(log_path, "a") as f:
        f.write("".join(stderr_tail))
    time.sleep(args.orphan_wait_s if workers else 0)
    record.update(
        killed=killed,
        paused_at_point=paused.is_set(),
        returncode=proc.returncode,
        seconds=round(time.perf_counter() - t0, 1),
        committed_after=committed_step(run_dir),
        last_logged_step=max(read_rows(run_dir), default=None) if (run_dir / "csv" / "metrics.csv").is_file() else None,
        worker_processes=len(workers),
        orphaned_workers=[p for p in workers if alive(p)],
    )
    for pid in record["orphaned_workers"]:  # leave nothing running behind us
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return record


def read_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[int, dict[str, str]] = {}
    for row in rows:
        step = int(float(row["step"]))
        if step in out:
            raise AssertionError(f"{run_dir}: step {step} has two rows")
        out[step] = row
    return out


def compare(ref: Path, chaos: Path) -> list[str]:
    from simko.checkpointing import read_checkpoint

    problems = []
    a, b = read_rows(ref), read_rows(chaos)
    if sorted(a) != sorted(b):
        problems.append(f"steps differ: ref {sorted(a)[:3]}..{max(a)} ({len(a)}), chaos {sorted(b)[:3]}..({len(b)})")
    for step in sorted(set(a) & set(b)):
        for key in sorted(set(a[step]) | set(b[step])):
            if key.startswith("time/"):
                continue
            if a[step].get(key, "") != b[step].get(key, ""):
                problems.append(f"step {step} {key}: ref {a[step].get(key)!r} chaos {b[step].get(key)!r}")
    files_a = sorted(p.name for p in (ref / "checkpoints").glob("*.ckpt"))
    files_b = sorted(p.name for p in (chaos / "checkpoints").glob("*.ckpt"))
    if files_a != files_b:
        problems.append(f"checkpoint files differ: ref {files_a}, chaos {files_b}")
    for name in sorted(set(files_a) & set(files_b)):
        sa = read_checkpoint(ref / "checkpoints" / name, mmap=False)["state_dict"]
        sb = read_checkpoint(chaos / "checkpoints" / name, mmap=False)["state_dict"]
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            problems.append(f"{name}: weights differ")
    leftovers = [
        str(p.relative_to(chaos))
        for p in chaos.rglob("*")
        if p.is_file() and (".simko-tmp-" in p.name or p.name.endswith(".simko-pending"))
    ]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "logs" / "chaos"))
    parser.add_argument("--cache-dir", default=str(REPO / "logs" / "cache"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--last-every", type=int, default=5, help="last.ckpt every N RL steps")
    parser.add_argument("--snapshot-every", type=int, default=20, help="weights-only snapshot every N RL steps")
    parser.add_argument("--random-min-s", type=float, default=8.0, help="random kills: earliest, after the start")
    parser.add_argument("--random-max-s", type=float, default=30.0)
    parser.add_argument("--orphan-wait-s", type=float, default=3.0, help="wait before looking for orphaned workers")
    parser.add_argument("--points", nargs="*", default=POINTS, choices=POINTS, help="kill points, used in turn")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ref, chaos = out / "ref", out / "chaos"
    for folder in (ref, chaos):
        if folder.exists():
            raise SystemExit(f"{folder} exists: choose a new --out (a chaos run starts from nothing)")
    log_path = out / "chaos.log"
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    proc = start(train_overrides(args, ref), {}, log_path)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed ({proc.returncode}):\n{err[-3000:]}")
    ref_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    attempts = []
    kills = 0
    while kills < args.kills:
        point = args.points[kills % len(args.points)]
        record = attempt(args, chaos, point, rng, log_path)
        attempts.append(record)
        print(json.dumps(record), flush=True)
        if record["killed"]:
            kills += 1
        elif record["returncode"] != 0:
            raise SystemExit(f"attempt failed without a kill ({record['returncode']}); see {log_path}")
        else:  # finished before the kill point came: nothing left to kill
            break
    final = attempt(args, chaos, None, rng, log_path)
    attempts.append(final)
    print(json.dumps(final), flush=True)
    chaos_seconds = time.perf_counter() - t1
    if final["returncode"] != 0:
        raise SystemExit(f"the final attempt failed ({final['returncode']}); see {log_path}")

    problems = compare(ref, chaos)
    orphans = sum(len(a["orphaned_workers"]) for a in attempts)
    if orphans:
        problems.append(f"{orphans} verifier worker processes outlived their killed trainer")
    report = {
        "steps": args.steps,
        "kills": kills,
        "kills_by_point": {p: sum(1 for a in attempts if a["killed"] and a["point"] == p) for p in POINTS},
        "kills_paused_at_point": sum(1 for a in attempts if a["killed"] and a["paused_at_point"]),
        "steps_logged_after_last_checkpoint": sum(
            max(0, (a["last_logged_step"] or 0) - (a["committed_after"] or 0)) for a in attempts if a["killed"]
        ),
        "reference_seconds": round(ref_seconds, 1),
        "chaos_seconds": round(chaos_seconds, 1),
        "attempts": attempts,
        "problems": problems,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "attempts"}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
