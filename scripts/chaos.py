"""Chaos run: a training run killed, preempted and interrupted again and again must equal the uninterrupted run.

    python scripts/chaos.py          # 100 RL steps: 10 SIGKILLs, 10 SIGTERMs, 50 Ctrl-Cs, into logs/chaos/
    python scripts/chaos.py --steps 20 --kills 3 --sigterms 2 --ctrl-c 3 --out /tmp/chaos   # the slow test's

1. The reference: one uninterrupted ``python -m simko.train`` run of ``--steps`` RL steps (``<out>/ref``).
2. SIGKILL (``<out>/chaos``): the same command with ``hydra.run.dir=<out>/chaos ckpt_path=last``, started, killed
   with SIGKILL, started again, ``--kills`` times, then left to finish. Kills are aimed in turn at
   ``checkpoint.open`` (temporary checkpoint file created, empty), ``checkpoint.written`` (complete, not yet
   renamed), ``checkpoint.commit`` (a new ``last.ckpt`` about to replace the old one), ``verify`` (inside a
   verifier call, the killable process pool running) and a random moment: the trainer pauses at the chosen
   occurrence of that point (``SIMKO_PAUSE_AT``, ``simko.faults``) and is killed there; random kills come after a
   random delay.
3. SIGTERM (``<out>/sigterm``): the same with SIGTERM to the run's whole process group (as a scheduler preempting a
   job signals every process of it) after a random delay (start-up, validation, an RL step, a checkpoint write:
   wherever it lands), until ``--sigterms`` signals were sent or the run finished. Each stopped attempt must exit
   non-zero (143 once the run's handler is installed, -15 before), with ``last.ckpt`` at the last finished step;
   an attempt whose run had already finished may exit 0. Then left to finish.
4. Checks of both runs: the final weights (``last.ckpt``) and every weights-only snapshot are bitwise equal to the
   reference's; ``csv/metrics.csv`` has every RL step once and each value (all columns but ``time/*``) is the same
   text as the reference's; no temporary, pending, truncated or unreadable file is left; the verifier worker
   processes of killed attempts are gone.
5. Ctrl-C (``<out>/ctrl-c-NN``, ``--ctrl-c`` trials): a run whose verifier pool is busy (each check about a second
   inside one C call, some killed at their 1 s timeout) gets SIGINT to its process group, as a terminal's Ctrl-C,
   inside its 1st to 3rd verifier batch; the time until the process has exited is measured, and a trial slower than
   ``--ctrl-c-deadline-s`` counts as hung. The report gives the maximum. No process of the run may be left.

Exit status 1 if any check fails. A JSON report goes to ``<out>/report.json``.

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


def start(overrides: list[str], env_extra: dict[str, str], log_path: Path, own_group: bool = False) -> subprocess.Popen:
    """``python -m simko.train`` with stdout to the log and stderr piped; ``own_group``: in its own process group
    (signalled as a whole, as a terminal or a scheduler does)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.update(env_extra)
    with open(log_path, "a") as log:
        log.write(f"\n===== {' '.join(overrides)} {env_extra}\n")
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "simko.train", *overrides],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=own_group,
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return ""


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


BUSY_VERIFIER = (
    "{_target_:simko.faults.PauseVerifier,verifier:{_target_:simko.rewards.FunctionVerifier,"
    "fn:{_target_:hydra.utils.get_method,path:simko.faults.busy_reward},timeout_s:1.0,batch_timeout_s:10.0,"
    "num_workers:2}}"
)


def ctrl_c_trial(args, run_dir: Path, rng: random.Random, log_path: Path) -> dict:
    """Start a run whose verifier pool is busy (each check a second or two in one C call, some killed at their
    timeout), press Ctrl-C (SIGINT to the process group, as a terminal does) inside its n-th verifier batch, and
    time how long the process takes to exit."""
    overrides = [
        *train_overrides(args, run_dir),
        "validate_first=false",
        "~module.verifiers.math",
        f"+module.verifiers.math={BUSY_VERIFIER}",
    ]
    nth = rng.randint(1, 3)
    marker = {"SIMKO_PAUSE_AT": "verify", "SIMKO_PAUSE_S": "0"}  # a marker on stderr before each verifier batch
    proc = start(overrides, marker, log_path, own_group=True)  # the Ctrl-C goes to its group, not to this script
    seen = 0
    tail: list[str] = []
    for line in proc.stderr:
        tail.append(line)
        if line.startswith("SIMKO-PAUSE verify"):
            seen += 1
            if seen == nth:
                break
    delay = rng.uniform(0.0, args.ctrl_c_max_delay_s)
    time.sleep(delay)
    record = {"nth_batch": nth, "delay_s": round(delay, 2), "finished_first": proc.poll() is not None}
    family = [proc.pid, *descendants(proc.pid)]
    t0 = time.perf_counter()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    drain = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        proc.wait(timeout=args.ctrl_c_deadline_s)
        record["hung"] = False
    except subprocess.TimeoutExpired:
        record["hung"] = True
        record["stacks"] = py_spy_dump(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    record["exit_s"] = round(time.perf_counter() - t0, 2)
    record["returncode"] = proc.returncode
    drain.join(timeout=5)
    deadline = time.monotonic() + args.orphan_wait_s
    while any(alive(p) for p in family[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    record["left_running"] = [f"{p} {cmdline(p)}" for p in family[1:] if alive(p)]
    kill_leftovers_and_log(family, tail, log_path)
    return record


def kill_leftovers_and_log(family: list[int], tail: list[str], log_path: Path) -> None:
    """SIGKILL what of the trial's process tree is still alive (after it was recorded), and append the output's
    last 40 lines to the trial's log."""
    for pid in [p for p in family[1:] if alive(p)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    with open(log_path, "a") as f:
        f.write("".join(tail[-40:]))


def py_spy_dump(pid: int) -> str:
    """The Python stacks of a hung process, if py-spy is installed (for the report)."""
    try:
        out = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        return out.stdout[-6000:]
    except (OSError, subprocess.TimeoutExpired):
        return ""


def sigterm_attempt(args, run_dir: Path, rng: random.Random | None, log_path: Path) -> dict:
    """Start the run; after a random delay SIGTERM its process group (``rng`` None: let it finish); what happened."""
    before = committed_step(run_dir)
    proc = start([*train_overrides(args, run_dir), "ckpt_path=last"], {}, log_path, own_group=True)
    tail: list[str] = []
    drain = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
    drain.start()
    record: dict = {"committed_before": before}
    if rng is None:
        proc.wait()
    else:
        delay = rng.uniform(args.sigterm_min_s, args.sigterm_max_s)
        record["delay_s"] = round(delay, 2)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
    record["signalled"] = proc.poll() is None
    family = [proc.pid, *descendants(proc.pid)] if record["signalled"] else []
    if record["signalled"]:
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=args.sigterm_deadline_s)
        except subprocess.TimeoutExpired:
            record["stuck"] = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        record["exit_s"] = round(time.perf_counter() - t0, 2)
    drain.join(timeout=10)
    deadline = time.monotonic() + args.orphan_wait_s
    while any(alive(p) for p in family[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)
    record.update(
        returncode=proc.returncode,
        committed_after=committed_step(run_dir),
        last_logged_step=max(read_rows(run_dir), default=None) if (run_dir / "csv" / "metrics.csv").is_file() else None,
        said_how_to_continue=any("ckpt_path=last" in line for line in tail),
        left_running=[f"{p} {cmdline(p)}" for p in family[1:] if alive(p)],
    )
    kill_leftovers_and_log(family, tail, log_path)
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


def ctrl_c_summary(trials: list[dict], args) -> dict:
    stopped = [t for t in trials if not t["finished_first"]]
    return {
        "trials": len(trials),
        "interrupted": len(stopped),
        "hung": sum(t["hung"] for t in trials),
        "deadline_s": args.ctrl_c_deadline_s,
        "max_exit_s": max((t["exit_s"] for t in stopped), default=None),
        "median_exit_s": sorted(t["exit_s"] for t in stopped)[len(stopped) // 2] if stopped else None,
        "returncodes": sorted({t["returncode"] for t in trials}),
        "left_running": sum(len(t["left_running"]) for t in trials),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL trials")
    parser.add_argument("--sigterms", type=int, default=10, help="SIGTERM trials (to the process group)")
    parser.add_argument("--ctrl-c", type=int, default=50, help="Ctrl-C trials with a busy verifier pool")
    parser.add_argument("--out", default=str(REPO / "logs" / "chaos"))
    parser.add_argument("--cache-dir", default=str(REPO / "logs" / "cache"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--last-every", type=int, default=5, help="last.ckpt every N RL steps")
    parser.add_argument("--snapshot-every", type=int, default=20, help="weights-only snapshot every N RL steps")
    parser.add_argument("--random-min-s", type=float, default=8.0, help="random kills: earliest, after the start")
    parser.add_argument("--random-max-s", type=float, default=30.0)
    parser.add_argument("--sigterm-min-s", type=float, default=2.0, help="SIGTERM: earliest, after the start")
    parser.add_argument("--sigterm-max-s", type=float, default=20.0)
    parser.add_argument("--sigterm-deadline-s", type=float, default=300.0, help="a stop slower than this is stuck")
    parser.add_argument("--orphan-wait-s", type=float, default=3.0, help="wait before looking for orphaned workers")
    parser.add_argument("--points", nargs="*", default=POINTS, choices=POINTS, help="kill points, used in turn")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--ctrl-c-deadline-s", type=float, default=60.0, help="a Ctrl-C trial slower than this hung")
    parser.add_argument("--ctrl-c-max-delay-s", type=float, default=1.5, help="Ctrl-C up to this long into a batch")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ref, chaos, preempted = out / "ref", out / "chaos", out / "sigterm"
    for folder in (ref, chaos, preempted, *out.glob("ctrl-c-*")):
        if folder.exists():
            raise SystemExit(f"{folder} exists: choose a new --out (a chaos run starts from nothing)")
    log_path = out / "chaos.log"
    rng = random.Random(args.seed)
    report: dict = {"steps": args.steps}
    problems: list[str] = []

    if args.kills or args.sigterms:
        t0 = time.perf_counter()
        proc = start(train_overrides(args, ref), {}, log_path)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the reference run failed ({proc.returncode}):\n{err[-3000:]}")
        report["reference_seconds"] = round(time.perf_counter() - t0, 1)

    if args.kills:
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
        if final["returncode"] != 0:
            raise SystemExit(f"the final attempt failed ({final['returncode']}); see {log_path}")
        problems += [f"sigkill: {p}" for p in compare(ref, chaos)]
        orphans = sum(len(a["orphaned_workers"]) for a in attempts)
        if orphans:
            problems.append(f"sigkill: {orphans} verifier worker processes outlived their killed trainer")
        report["sigkill"] = {
            "kills": kills,
            "kills_by_point": {p: sum(1 for a in attempts if a["killed"] and a["point"] == p) for p in POINTS},
            "kills_paused_at_point": sum(1 for a in attempts if a["killed"] and a["paused_at_point"]),
            "steps_logged_after_last_checkpoint": sum(
                max(0, (a["last_logged_step"] or 0) - (a["committed_after"] or 0)) for a in attempts if a["killed"]
            ),
            "seconds": round(time.perf_counter() - t1, 1),
            "attempts": attempts,
        }

    if args.sigterms:
        t2 = time.perf_counter()
        attempts = []
        while sum(1 for a in attempts if a["signalled"]) < args.sigterms and len(attempts) < 3 * args.sigterms:
            record = sigterm_attempt(args, preempted, rng, log_path)
            attempts.append(record)
            print(json.dumps(record), flush=True)
            finished = record["committed_after"] == args.steps
            if record["signalled"] and record["returncode"] == 0 and not finished:
                problems.append(f"sigterm: exit status 0 while the run was not finished: {record}")
            behind = (record["committed_after"] or 0) != (record["last_logged_step"] or 0)
            if record["signalled"] and record["returncode"] == 143 and behind:
                problems.append(f"sigterm: stopped with last.ckpt behind the last logged step: {record}")
            if record["left_running"]:
                problems.append(f"sigterm: processes left running: {record['left_running']}")
            if finished:
                break
        final = sigterm_attempt(args, preempted, None, log_path)
        attempts.append(final)
        print(json.dumps(final), flush=True)
        if final["returncode"] != 0:
            raise SystemExit(f"the final SIGTERM-run attempt failed ({final['returncode']}); see {log_path}")
        problems += [f"sigterm: {p}" for p in compare(ref, preempted)]
        stopped = [a for a in attempts if a.get("signalled")]
        report["sigterm"] = {
            "signals": len(stopped),
            "returncodes": sorted({a["returncode"] for a in stopped}),
            "non_zero_each_time": all(a["returncode"] != 0 for a in stopped),
            # 143: the run's handler stopped it at an RL step boundary (last.ckpt at that step, if one finished);
            # -15: the default action, before the handler is installed (start-up) or after the last step
            "stopped_at_a_step_boundary": sum(1 for a in stopped if a["returncode"] == 143),
            "steps_logged_after_last_checkpoint": sum(
                max(0, (a["last_logged_step"] or 0) - (a["committed_after"] or 0)) for a in stopped
            ),
            "during_start_up": sum(
                1 for a in stopped if a["returncode"] == -signal.SIGTERM and a["committed_after"] != args.steps
            ),
            "after_the_last_step": sum(1 for a in stopped if a["committed_after"] == args.steps),
            "max_exit_s": max((a["exit_s"] for a in stopped), default=None),
            "seconds": round(time.perf_counter() - t2, 1),
            "attempts": attempts,
        }

    if args.ctrl_c:
        t3 = time.perf_counter()
        trials = []
        for i in range(args.ctrl_c):
            trials.append(ctrl_c_trial(args, out / f"ctrl-c-{i:02d}", rng, log_path))
            print(json.dumps(trials[-1]), flush=True)
        summary = ctrl_c_summary(trials, args)
        if summary["hung"]:
            problems.append(f"ctrl-c: {summary['hung']} of {len(trials)} trials hung (> {args.ctrl_c_deadline_s} s)")
        if summary["left_running"]:
            problems.append(f"ctrl-c: {summary['left_running']} processes left running")
        report["ctrl_c"] = {**summary, "seconds": round(time.perf_counter() - t3, 1), "trials_detail": trials}

    report["problems"] = problems
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(brief(report), indent=1))
    return 1 if problems else 0


def brief(report: dict) -> dict:
    """The report without the per-attempt records."""
    return {
        k: ({kk: vv for kk, vv in v.items() if kk not in ("attempts", "trials_detail")} if isinstance(v, dict) else v)
        for k, v in report.items()
    }


if __name__ == "__main__":
    sys.exit(main())
