"""Toy reproductions of the pass@k question, each from one warm start: the arithmetic toy and the multi-path testbed.

    python scripts/reproduce.py                        # both toys' default grids, 2 runs side by side
    python scripts/reproduce.py --quick                # the testbed's quick grid (fewer arms, seeds and steps)
    python scripts/reproduce.py --quick --toy both     # both toys' quick grids
    python scripts/reproduce.py --toy testbed --jobs 2 # one toy
    python scripts/reproduce.py --smoke --losses grpo --seeds 0 1   # 1 RL step per run, n=4: the CI smoke run

* ``arithmetic``: the tiny model warm-started on 2-digit addition; arms ``experiment=toy_<arm>``; the last
  checkpoint is evaluated with ``experiment=toy_eval`` (n = 64 on 256 held-out problems).
* ``testbed``: the tiny model warm-started on countdown_steps (several correct chains of steps per problem,
  solutions drawn uniformly); arms ``experiment=testbed`` plus the arm's overrides in ``TESTBED_ARMS`` (mostly
  ``loss=<arm>``; ``kl_cov_mb2`` is KL-Cov at 2 mini-batches per batch); evaluated with ``experiment=testbed_eval``
  (n = 256 on 200 TEST problems). ``simko_tuned`` is the SimKO setting chosen on the VAL split among ``--sweep``
  (alpha x lambda x tau, on seed 0; the criterion is the mean of pass@k over k = 1, 2, 4, ..., 64 from n = 64 on
  200 val problems, the area under the log-k curve); the chosen setting then runs every seed and is reported on
  the test split. A setting's run name (``--losses simko_a0.05_l1.1_t0.8``) runs it as an arm without the sweep.
  Arms run seed by seed (every arm at the first seed, then the next), so a grid stopped early leaves whole seeds.
  ``--large-n 1024`` then evaluates ``--large-n-arms`` (``base``, arms, ``simko_tuned``, ``best_new``: the new arm
  with the best mean pass@k, on val if every new arm has a val evaluation, else on test) at that n, into
  ``eval_n<n>/``, and adds their table to the report.

Every run goes through the real entry points (``simko.sft`` builds each warm start once, then ``simko.train`` and
``simko.eval``), ``--jobs`` of them at a time, each with ``OMP_NUM_THREADS = cores / jobs`` unless set. Finished
runs are reused (a train run with ``checkpoints/last.ckpt``, an evaluation with ``pass_at_k.json``); an unfinished
evaluation of the same config continues in its folder after its last recorded problem, any other
unfinished one is moved aside (``<dir>.incomplete-<time>``), never overwritten. Seeds are paired: two arms with the
same seed share the warm start, the prompts and their order, and the sampling seeds. For each toy it writes
``<out>/<toy>/results.md`` (pass@k and cover@τ, mean over seeds with 95 % bootstrap intervals over seeds and
problems, the paired differences to GRPO with paired-bootstrap intervals, the problems that change hands against
GRPO, diversity and concentration, the sweep), ``results.json`` and three figures: ``pass_at_k.png`` (pass@k and
the paired difference to GRPO with the tables' intervals as bands, cover@τ, solution diversity), ``frontier.png``
(pass@1 against pass@k, seeds as points with intervals) and ``training.png`` (reward and val pass@k, val distinct
solutions and p(rank k) relative to GRPO, against the RL step); ``<out>/results.md`` joins both toys' tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMOOTH_STEPS = 10  # rolling mean of the per-step concentration curves (noisy at one RL step)
BOOTSTRAP_RESAMPLES = 2000  # the reports' 95 % intervals (simko.metrics.uncertainty), seeded
BOOTSTRAP_SEED = 0
REPORT_TAUS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # cover@tau in the tables (the figure: simko.eval's eval.cover_taus)
PAPER_SIMKO = (0.01, 1.1, 0.8)  # configs/loss/simko.yaml: the `simko` arm


@dataclass(frozen=True)
class Toy:
    name: str
    title: str
    experiment: str  # the train experiment (arithmetic: a prefix, toy_<arm>)
    eval_experiment: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    n: int
    problems: int
    sweep: tuple[tuple[float, float, float], ...] = ()
    sweep_seed: int = 0
    sweep_n: int = 64  # samples per val problem when scoring the sweep (the test protocol's 256 costs 4x)
    rl_steps: int | None = None  # None: the experiment's own
    quick: dict = field(default_factory=dict)

    @property
    def train_overrides(self) -> list[str]:
        return [] if self.rl_steps is None else [f"rl_steps={self.rl_steps}"]

    def train_args(self, run: str) -> list[str]:
        """Overrides of one run: an arm (a loss) or a SimKO sweep setting (``simko_a<alpha>_l<lambda>_t<tau>``)."""
        if self.name == "arithmetic":
            return [f"experiment=toy_{run}", *self.train_overrides]
        setting = parse_setting(run)
        if setting is not None:
            alpha, lam, tau = setting
            loss = ["loss=simko", f"loss.alpha={alpha}", f"loss.lam={lam}", f"loss.tau={tau}"]
        elif run in TESTBED_ARMS:
            loss = list(TESTBED_ARMS[run])
        else:
            raise ValueError(f"testbed: unknown arm {run!r}: one of {', '.join(TESTBED_ARMS)}, simko_tuned or a "
                             "SimKO setting simko_a<alpha>_l<lambda>_t<tau>")  # fmt: skip
        return [f"experiment={self.experiment}", *loss, *self.train_overrides]


# The testbed's arms: each a name for the overrides it adds to experiment=testbed. kl_cov's penalty
# |log pi - log pi_old| is 0 at one optimizer step per batch (log pi = log pi_old), so `kl_cov` equals GRPO there;
# `kl_cov_mb2` splits each batch into 2 mini-batches (2 optimizer steps, verl's ppo_mini_batch_size), so from the
# second one on the policy is off the sampler's and the penalty acts.
TESTBED_ARMS: dict[str, tuple[str, ...]] = {
    "grpo": ("loss=grpo",),
    "simko": ("loss=simko",),
    "entropy_bonus": ("loss=entropy_bonus",),
    "nsr": ("loss=nsr",),
    "w_reinforce": ("loss=w_reinforce",),
    "passk": ("loss=passk",),
    "kl_cov": ("loss=kl_cov",),
    "maxrl": ("loss=maxrl",),
    "sapo": ("loss=sapo",),
    "entropy_control": ("loss=entropy_control",),  # GRPO + EntroPIC's adaptive entropy controller
    "kl_cov_mb2": ("loss=kl_cov", "module.num_mini_batches=2"),
}
NEW_ARMS = ("maxrl", "sapo", "entropy_control", "kl_cov_mb2")  # added to the grid after its first full run


ARITHMETIC = Toy(
    name="arithmetic",
    title="Arithmetic toy (2-digit addition, one answer per problem)",
    experiment="toy_arithmetic",
    eval_experiment="toy_eval",
    arms=("grpo", "simko", "simko_strong", "entropy_bonus", "nsr"),
    seeds=(0, 1, 2),
    n=64,
    problems=256,
    quick={"arms": ("grpo", "simko_strong"), "seeds": (0, 1), "rl_steps": 80},
)
TESTBED = Toy(
    name="testbed",
    title="Multi-path testbed (countdown_steps: several correct chains of steps per problem)",
    experiment="testbed",
    eval_experiment="testbed_eval",
    arms=("grpo", "simko", "simko_tuned", "entropy_bonus", "nsr", "w_reinforce", "passk", "kl_cov", *NEW_ARMS),
    seeds=(0, 1, 2, 3, 4),
    n=256,
    problems=200,
    sweep=tuple(itertools.product((0.01, 0.05, 0.1), (1.1, 1.5), (0.5, 0.8))),
    quick={"arms": ("grpo", "simko"), "seeds": (0, 1), "n": 64, "rl_steps": 40, "sweep": ()},
)
TOYS = {"arithmetic": ARITHMETIC, "testbed": TESTBED}


def setting_name(alpha: float, lam: float, tau: float) -> str:
    """The run name of a SimKO setting; the paper's defaults are the ``simko`` arm itself."""
    return "simko" if (alpha, lam, tau) == PAPER_SIMKO else f"simko_a{alpha:g}_l{lam:g}_t{tau:g}"


def parse_setting(run: str) -> tuple[float, float, float] | None:
    if not run.startswith("simko_a"):
        return None
    alpha, lam, tau = run.removeprefix("simko_a").replace("_l", " ").replace("_t", " ").split()
    return float(alpha), float(lam), float(tau)


# --- running ---------------------------------------------------------------------------------------------------


class Runner:
    """Runs entry-point commands ``jobs`` at a time; a command whose output exists is skipped."""

    def __init__(self, jobs: int, extra: list[str]) -> None:
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.extra = extra
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        self.executed: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._run_locks: dict[Path, threading.Lock] = {}

    def command(self, module: str, overrides: list[str], run_dir: Path, done: Path) -> None:
        # Two jobs may need one run (the `simko` arm's seed 0 is also a sweep setting): the second waits for the
        # first instead of finding its folder unfinished and moving it aside.
        with self._lock:
            run_lock = self._run_locks.setdefault(run_dir, threading.Lock())
        with run_lock:
            self._command(module, overrides, run_dir, done)

    def _command(self, module: str, overrides: list[str], run_dir: Path, done: Path) -> None:
        if finished(module, run_dir, done):
            return
        if module == "simko.train":
            # An unfinished training run (killed, or with fewer steps) continues in its own folder from its
            # last.ckpt, exactly as if it had not stopped; a new folder just starts (simko.runs).
            overrides = [*overrides, "ckpt_path=last"]
        elif run_dir.exists() and not resumable_eval(run_dir, [*overrides, *self.extra]):
            # an unfinished evaluation of another config: keep it, start afresh next to it (one of this config
            # continues in its folder after its last recorded problem: simko.eval_store)
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
        cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}", *self.extra]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True)
        with self._lock:
            where = f"{run_dir.parent.parent.name}/{run_dir.parent.name}/{run_dir.name}"
            self.executed.append(f"{module} {where} {time.perf_counter() - start:.0f}s")
            # As each run ends, so that a grid stopped early still leaves its runs' wall times in its log.
            print(f"done {self.executed[-1]} (rc {proc.returncode})", flush=True)
        if proc.returncode != 0 or not finished(module, run_dir, done):
            raise RuntimeError(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")

    def submit(self, steps: list[tuple]) -> Future:
        """Run ``steps`` (arguments of ``command``) in order, in one pool slot."""

        def job() -> None:
            try:
                for step in steps:
                    self.command(*step)
            except RuntimeError as error:
                with self._lock:
                    self.failures.append(str(error))
                raise

        return self.pool.submit(job)


def resumable_eval(run_dir: Path, overrides: list[str]) -> bool:
    """Whether ``simko.eval`` would continue the unfinished evaluation in ``run_dir`` with these overrides (the same
    config fingerprint as its ``eval_state.json``)."""
    from hydra import compose, initialize_config_dir

    from simko.eval_store import STATE, differences, fingerprint

    state = run_dir / STATE
    if not state.is_file():
        return False
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[o for o in overrides if not o.startswith("hydra.")])
    return not differences(json.loads(state.read_text()).get("fingerprint", {}), fingerprint(cfg))


def finished(module: str, run_dir: Path, done: Path) -> bool:
    """An evaluation is done when it wrote its summary; a training run when its last.ckpt is at its final RL step
    (last.ckpt is also written every few steps during the run, so its existence alone says nothing)."""
    if not done.is_file():
        return False
    if module != "simko.train":
        return True
    from omegaconf import OmegaConf

    from simko.checkpointing import checkpoint_step, read_checkpoint

    rl_steps = OmegaConf.load(run_dir / ".hydra" / "config.yaml").rl_steps
    return checkpoint_step(read_checkpoint(done)) >= int(rl_steps)


def train_step(toy: Toy, out: Path, run: str, seed: int, extra: list[str]) -> tuple:
    run_dir = out / toy.name / "train" / f"{run}_seed{seed}"
    overrides = [*toy.train_args(run), f"seed={seed}", "callbacks.progress=null", *extra]
    return ("simko.train", overrides, run_dir, run_dir / "checkpoints" / "last.ckpt")


def eval_step(toy: Toy, out: Path, run: str | None, seed: int, split: str, n: int, problems: int) -> tuple:
    """Evaluate a run's last checkpoint (``run=None``: the warm-started base model) on the test or val split."""
    folder = "eval" if split == "test" else "eval_val"
    eval_dir = out / toy.name / folder / f"{run or 'base'}_seed{seed}"
    overrides = [f"experiment={toy.eval_experiment}", f"eval.n={n}", f"eval.limit={problems}", f"seed={seed}"]
    if toy.name == "testbed":  # the arithmetic toy has one held-out split
        overrides += [f"data.val_source.split={split}", f"data.val_prompts={problems}"]
    if run is not None:
        overrides.append(f"ckpt_path={out / toy.name / 'train' / f'{run}_seed{seed}' / 'checkpoints' / 'last.ckpt'}")
    return ("simko.eval", overrides, eval_dir, eval_dir / "pass_at_k.json")


def warm_start(toy: Toy, runner: Runner, out: Path) -> None:
    """Build the toy's warm start once, before runs side by side could race to build the same cache entry."""
    experiment = "testbed_task" if toy.name == "testbed" else None
    overrides = [f"experiment={experiment}"] if experiment else []
    overrides += [o for o in runner.extra if o.startswith(("model.", "paths."))]
    marker = out / toy.name / "sft" / "done"
    if marker.exists():
        return
    if marker.parent.exists():  # an interrupted build: its folder is that run's own, so start afresh next to it
        marker.parent.rename(marker.parent.with_name(f"sft.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
    cmd = [
        sys.executable,
        "-m",
        "simko.sft",
        *overrides,
        f"hydra.run.dir={out / toy.name / 'sft'}",
        "eval_problems=100",
    ]
    print("$", " ".join(cmd), flush=True)
    # It runs alone: every core unless OMP_NUM_THREADS is set (on a machine loaded by other jobs, 2 threads on 2
    # cores ran 100 arithmetic warm-start steps in 413 s, ~27x the idle time; set OMP_NUM_THREADS=1 there). The
    # weights differ in the last float digits with the thread count; the first build is the cache entry.
    env = dict(runner.env, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(f"warm start of {toy.name}: {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(proc.stdout)


def check_grid_settings(toy: Toy, out: Path, train_extra: list[str], extra: list[str]) -> None:
    """Finished runs are reused by folder name, so a folder must only ever hold runs of one setting of what changes
    a run's result (steps, n, problems, overrides; arms and seeds may grow): recorded in ``<out>/<toy>/grid.json``
    on the first call, and a later call with other settings stops before running anything."""
    settings = {"rl_steps": toy.rl_steps, "n": toy.n, "problems": toy.problems, "sweep_n": toy.sweep_n,
                "sweep_seed": toy.sweep_seed, "train_extra": train_extra, "extra": extra}  # fmt: skip
    path = out / toy.name / "grid.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            raise SystemExit(
                f"{path.parent} holds the runs of another grid setting ({recorded}); this call has {settings}. "
                "Reusing them would mix the two: pass another --out."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def selection_score(summary: dict) -> float:
    """The sweep's criterion: mean pass@k over k = 1, 2, 4, ..., n (the area under the log-k pass@k curve)."""
    return float(np.mean(list(summary["pass_at_k"].values())))


def choose_setting(scores: dict[str, float]) -> str:
    """The best-scoring setting; ties go to the paper's defaults (``simko``), then to the first listed."""
    best = max(scores.values())
    tied = [name for name, score in scores.items() if score == best]
    return "simko" if "simko" in tied else tied[0]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def run_toy(toy: Toy, runner: Runner, out: Path, args, extra: list[str]) -> dict:
    """Submit a toy's grid; returns {"futures", "runs": {arm: run name}, "after": callable} for the report."""
    arms = [a for a in toy.arms if a != "simko_tuned" or toy.sweep]
    futures, sweep_futures = [], []
    sweep = [setting_name(*s) for s in toy.sweep] if "simko_tuned" in arms else []
    for run in sweep:  # first: the choice of simko_tuned waits for these
        steps = [train_step(toy, out, run, toy.sweep_seed, extra)]
        steps.append(eval_step(toy, out, run, toy.sweep_seed, "val", min(toy.sweep_n, toy.n), toy.problems))
        sweep_futures.append(runner.submit(steps))
    # Seed-major: the base and every arm at the first seed, then the next seed, so a grid stopped early leaves whole
    # seeds; the base first, as every row of the report is read against it.
    for seed in toy.seeds:
        futures.append(runner.submit([eval_step(toy, out, None, seed, "test", toy.n, toy.problems)]))
        for arm in arms:
            if arm == "simko_tuned":
                continue
            steps = [
                train_step(toy, out, arm, seed, extra),
                eval_step(toy, out, arm, seed, "test", toy.n, toy.problems),
            ]
            futures.append(runner.submit(steps))
    return {"arms": arms, "sweep": sweep, "sweep_futures": sweep_futures, "futures": futures}


def finish_sweep(toy: Toy, state: dict, runner: Runner, out: Path, extra: list[str]) -> None:
    """Choose simko_tuned on the val split and submit its runs on every seed (seed sweep_seed is reused)."""
    if not state["sweep"]:
        return
    wait(state["sweep_futures"])
    if any(f.exception() for f in state["sweep_futures"]):
        return  # the failures are reported at the end
    scores = {}
    for run in state["sweep"]:
        scores[run] = selection_score(
            read(out / toy.name / "eval_val" / f"{run}_seed{toy.sweep_seed}" / "pass_at_k.json")
        )
    chosen = choose_setting(scores)
    criterion = "mean of pass@k over k = 1, 2, 4, ..., n"
    state["selection"] = {"criterion": criterion, "scores": scores, "chosen": chosen, "seed": toy.sweep_seed}
    print(f"{toy.name}: simko_tuned = {chosen} (val mean pass@k {scores[chosen]:.4f})", flush=True)
    for seed in toy.seeds:
        steps = [
            train_step(toy, out, chosen, seed, extra),
            eval_step(toy, out, chosen, seed, "test", toy.n, toy.problems),
        ]
        state["futures"].append(runner.submit(steps))


def best_new_arm(toy: Toy, state: dict, out: Path) -> dict:
    """The new arm (NEW_ARMS) of the grid with the best mean pass@k over k = 1, 2, 4, ..., n (the sweep's
    criterion): on the val split where every new arm has a val evaluation at the sweep seed, else on the test
    split, mean over the grid's seeds (a choice made on the reported split: the report says so)."""
    candidates = [arm for arm in state["arms"] if arm in NEW_ARMS]
    if not candidates:
        raise SystemExit(f"{toy.name}: --large-n-arms best_new needs one of {', '.join(NEW_ARMS)} among the arms")
    val = [out / toy.name / "eval_val" / f"{arm}_seed{toy.sweep_seed}" / "pass_at_k.json" for arm in candidates]
    if all(path.is_file() for path in val):
        scores = {arm: selection_score(read(path)) for arm, path in zip(candidates, val, strict=True)}
        split = f"val, seed {toy.sweep_seed}"
    else:
        test = {
            arm: [out / toy.name / "eval" / f"{arm}_seed{s}" / "pass_at_k.json" for s in toy.seeds]
            for arm in candidates
        }
        scores = {arm: float(np.mean([selection_score(read(path)) for path in paths])) for arm, paths in test.items()}
        split = f"test, mean over seeds {' '.join(map(str, toy.seeds))}"
    chosen = max(scores, key=scores.get)
    return {"chosen": chosen, "scores": scores, "split": split}


def large_n_runs(toy: Toy, state: dict, out: Path, arms: list[str], seeds: list[int]) -> dict[str, str | None]:
    """``--large-n-arms`` as run names: ``base`` (the warm start), ``simko_tuned`` (the sweep's choice, or the one
    SimKO setting among the arms), ``best_new`` (``best_new_arm``), or an arm of the grid."""
    runs: dict[str, str | None] = {}
    for arm in arms:
        if arm == "base":
            runs["base"] = None
        elif arm == "simko_tuned":
            settings = [a for a in state["arms"] if parse_setting(a)]
            if state.get("selection"):
                runs[arm] = state["selection"]["chosen"]
            elif len(settings) == 1:
                runs[arm] = settings[0]
            else:
                raise SystemExit("--large-n-arms simko_tuned: no sweep, and not one SimKO setting among the arms")
        elif arm == "best_new":
            state["best_new"] = best_new_arm(toy, state, out)
            runs[arm] = state["best_new"]["chosen"]
        elif arm in state["arms"]:
            runs[arm] = arm
        else:
            raise SystemExit(f"--large-n-arms {arm}: not an arm of this grid ({', '.join(state['arms'])})")
    return runs


def large_n_step(toy: Toy, out: Path, run: str | None, seed: int, n: int) -> tuple:
    """A test evaluation at ``n`` samples per problem, in ``eval_n<n>/`` (the grid's own n stays in ``eval/``)."""
    module, overrides, _, _ = eval_step(toy, out, run, seed, "test", n, toy.problems)
    eval_dir = out / toy.name / f"eval_n{n}" / f"{run or 'base'}_seed{seed}"
    return (module, overrides, eval_dir, eval_dir / "pass_at_k.json")


def large_n_table(toy: Toy, state: dict, out: Path) -> list[str]:
    spec = state.get("large_n")
    if not spec:
        return []
    n, rows, ks = spec["n"], [], None
    for label, run in spec["runs"].items():
        for seed in spec["seeds"]:
            path = out / toy.name / f"eval_n{n}" / f"{run or 'base'}_seed{seed}" / "pass_at_k.json"
            if not path.is_file():
                continue
            summary = read(path)
            ks = ks or list(summary["pass_at_k"])
            name = label if run in (None, label) else f"{label} ({run})"
            rows.append([name, str(seed), *(f"{summary['pass_at_k'][k]:.3f}" for k in ks)])
    if not rows:
        return []
    lines = ["", f"pass@k at n = {n} on the same {toy.problems} test problems (one seed each):", ""]
    lines += md_table(["model", "seed", *(f"pass@{k}" for k in ks)], rows)
    if state.get("best_new"):
        best = state["best_new"]
        scores = ", ".join(f"{arm} {score:.4f}" for arm, score in best["scores"].items())
        lines += ["", f"best_new = **{best['chosen']}**: the best mean pass@k over k = 1, 2, 4, ..., n on "
                  f"{best['split']} among the new arms ({scores})."]  # fmt: skip
    return lines


# --- report ----------------------------------------------------------------------------------------------------


def nanmean(values) -> float:
    """The mean of the finite values; NaN (without numpy's warning) when there is none."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else float("nan")


def nanstd(values) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired(values, baseline, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """The difference to the baseline, paired: ``values`` and ``baseline`` are [seeds, problems] per-problem
    values (seeds paired by position, problems by id), or [seeds] per-seed values (a metric without per-problem
    values: seeds only). The mean difference with its 95 % paired-bootstrap interval (``simko.metrics.uncertainty``:
    the same seeds and problems drawn for both arms), the seeds above/below the baseline; established = the
    interval excludes 0."""
    from simko.metrics.uncertainty import paired_bootstrap

    arm, base = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    arm, base = arm.reshape(len(arm), -1, 1), base.reshape(len(base), -1, 1)  # [seeds, problems, 1 statistic]
    if not (np.isfinite(arm).all() and np.isfinite(base).all()):
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "wins": 0, "losses": 0,
                "seeds": len(arm), "established": False}  # fmt: skip
    result = paired_bootstrap(arm, base, resamples=resamples, seed=BOOTSTRAP_SEED)
    per_seed = arm.mean(axis=(1, 2)) - base.mean(axis=(1, 2))
    low, high = float(result["low"][0]), float(result["high"][0])
    return {"mean": float(result["point"][0]), "low": low, "high": high, "wins": int((per_seed > 0).sum()),
            "losses": int((per_seed < 0).sum()), "seeds": len(arm),
            "established": bool(low > 0 or high < 0)}  # fmt: skip


def _metric(summary: dict, name: str) -> float:
    if name.startswith("pass@"):
        return summary["pass_at_k"][name.removeprefix("pass@")]
    if name in summary.get("diversity", {}):
        return summary["diversity"][name]
    if name == "response_tokens":
        return summary.get("response_tokens", float("nan"))
    return summary.get("diagnostics", {}).get(name, float("nan"))


DIVERSITY = ("distinct_correct", "solution_entropy", "solution_coverage")


def has_solution_paths(results: dict[str, list[dict]]) -> bool:
    """Whether the task has several correct solutions per problem: its verifier counts them (``solution_coverage``
    is finite). With one answer per problem (the arithmetic toy) distinct_correct is only pass@n and the solution
    entropy is 0, so the report and figures leave the diversity metrics out."""
    coverage = [s.get("diversity", {}).get("solution_coverage", np.nan) for runs in results.values() for s in runs]
    return any(np.isfinite(coverage))


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_report(toy: Toy, state: dict, out: Path, seconds: float, runner: Runner) -> str:
    from simko.plot import read_training_log

    folder = out / toy.name
    runs = {arm: arm for arm in state["arms"]}
    if "simko_tuned" in runs:
        runs["simko_tuned"] = state["selection"]["chosen"]
    label = {arm: (f"simko_tuned ({run})" if arm == "simko_tuned" else arm) for arm, run in runs.items()}
    results = {"base": [read(folder / "eval" / f"base_seed{s}" / "pass_at_k.json") for s in toy.seeds]}
    for arm, run in runs.items():
        results[label[arm]] = [read(folder / "eval" / f"{run}_seed{s}" / "pass_at_k.json") for s in toy.seeds]
    runs_of = {"base": "base", **{label[arm]: run for arm, run in runs.items()}}
    counts, n = read_counts_by_seed(folder, runs_of, toy.seeds)
    first = results["base"][0]
    ks = list(first["pass_at_k"])
    from simko.metrics.uncertainty import summarize_counts

    intervals = {
        name: summarize_counts(counts[name], n, [int(k) for k in ks], REPORT_TAUS, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        for name in results
    }
    held_out = first["config"].get("dataset") or first["config"]["data"]
    if first["config"].get("split"):
        held_out += "/" + first["config"]["split"]
    lines = [
        f"## {toy.title}",
        "",
        f"pass@k on {first['num_problems']} held-out problems ({held_out}), n={first['n']} samples each at "
        f"T={first['config']['eval']['temperature']}, mean over seeds {' '.join(map(str, toy.seeds))} (base: the "
        f"warm start, sampled with the same seeds) [95 % interval: {BOOTSTRAP_SCHEME}]:",
        "",
    ]
    rows = [[name] + [with_interval(intervals[name], "pass_at_k", k) for k in ks] for name in results]
    lines += md_table(["model"] + [f"pass@{k}" for k in ks], rows)
    taus = list(intervals["base"]["cover_at_tau"])
    lines += [
        "",
        "cover@τ: the share of problems whose success rate c/n is at least τ (mean over seeds [95 % interval, "
        "the same bootstrap]); large-k pass@k also counts problems solved by rare lucky samples, cover@τ at high τ "
        "does not:",
        "",
        *md_table(
            ["model"] + [f"cover@{t}" for t in taus],
            [[name] + [with_interval(intervals[name], "cover_at_tau", t) for t in taus] for name in results],
        ),
    ]

    paths = has_solution_paths(results)
    compare = list(dict.fromkeys([f"pass@{ks[0]}", f"pass@{ks[len(ks) // 2]}", f"pass@{ks[-1]}"]))  # k: 1, mid, n
    compare += ["cover@0.5"] + (["distinct_correct", "solution_entropy"] if paths else [])
    stats: dict[str, dict] = {}
    if "grpo" in results:
        rows = []
        for name in results:
            if name == "grpo":
                continue
            stats[name] = {
                m: paired(*(_per_problem(counts[x], n, m, results[x]) for x in (name, "grpo"))) for m in compare
            }
            cells = [
                f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}] ({p['wins']}/{p['losses']})"
                if np.isfinite(p["mean"])
                else "–"
                for p in stats[name].values()
            ]
            rows.append([name] + [f"**{c}**" if p["established"] else c for c, p in zip(cells, stats[name].values())])
        lines += [
            "",
            f"Paired difference to GRPO: mean [95 % paired-bootstrap interval: the same seeds, paired by position, "
            f"and the same problems drawn for both arms; diversity metrics: over the {len(toy.seeds)} seeds only] "
            "(seeds above/below GRPO); **bold**: established, the interval excludes 0:",
            "",
            *md_table(["model"] + [f"Δ {m}" for m in compare], rows),
        ]
    if "grpo" in results:
        lines += ["", *transitions_table(counts, n, "grpo")]
    diag = [*(DIVERSITY if paths else ()), "response_tokens", "p_rank1", "p_rank2", "p_rank3", "p_rank2_hi",
            "p_rank3_hi", "entropy_mean"]  # fmt: skip
    rows = [[name] + [f"{nanmean([_metric(s, m) for s in summaries]):.4g}" for m in diag]
            for name, summaries in results.items()]  # fmt: skip
    about_diversity = (
        "Diversity of the correct samples and concentration of all samples at evaluation, mean over seeds "
        "(distinct_correct: distinct correct solutions per problem among the n samples; solution_entropy: nats, over "
        "solved problems; solution_coverage: distinct_correct / the solver's count of solutions; "
        if paths
        else "Concentration of all samples at evaluation, mean over seeds (one answer per problem, so no solution "
        "diversity; "
    )
    lines += [
        "",
        about_diversity + "response_tokens: mean response length, EOS included; p_rank k: mean probability of the "
        "k-th likeliest token, _hi: on high-entropy tokens):",
        "",
        *md_table(["model", *diag], rows),
    ]
    if state.get("selection"):
        sel = state["selection"]
        ranked = sorted(sel["scores"].items(), key=lambda item: -item[1])
        lines += [
            "",
            f"SimKO sweep on seed {sel['seed']}, scored on the val split by the {sel['criterion']}; "
            f"chosen: **{sel['chosen']}**",
            "",
            *md_table(["setting", "val mean pass@k"], [[run, f"{score:.4f}"] for run, score in ranked]),
        ]
    lines += large_n_table(toy, state, out)
    lines += [
        "",
        f"Figures: `{toy.name}/pass_at_k.png`, `{toy.name}/frontier.png` (pass@1 against pass@k, seeds as points "
        f"with their 95 % intervals), `{toy.name}/training.png` (its p(rank k) curves: {SMOOTH_STEPS}-step "
        f"rolling means of the per-step diagnostics). This call ran {len(runner.executed)} "
        f"train/eval runs in {seconds / 60:.1f} min (finished runs under {out} are reused, not rerun).",
    ]
    text = "\n".join(lines) + "\n"
    (folder / "results.md").write_text(text)
    payload = {"results": results, "intervals": intervals, "paired_to_grpo": stats, "selection": state.get("selection"),
               "runs": runs}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(payload, indent=2, default=str))

    logs = {}
    for arm, run in runs.items():
        frames = [read_training_log(folder / "train" / f"{run}_seed{seed}") for seed in toy.seeds]
        for frame in frames:
            diag_cols = [c for c in frame if c.startswith("diag/")]  # training.png: a 10-step rolling mean
            frame[diag_cols] = frame[diag_cols].rolling(SMOOTH_STEPS, min_periods=1).mean()
        logs[label[arm]] = frames
    ks_int = [int(k) for k in ks]  # the figure's bands: the intervals of the tables, at every k
    bands = {name: intervals[name]["pass_at_k_ci95"] for name in results}
    diff_bands = {}
    if "grpo" in results:
        from simko.metrics.uncertainty import interval_dict, paired_bootstrap, per_problem_pass_at_k

        values = {name: np.stack([per_problem_pass_at_k(c, n, ks_int) for c in counts[name]]) for name in results}
        diff_bands = {
            name: interval_dict(ks, paired_bootstrap(values[name], values["grpo"], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED))
            for name in results
            if name != "grpo"
        }
    figures(results, logs, folder, paths, bands, diff_bands)
    frontier_figure({name: [folder / "eval" / f"{run}_seed{s}" for s in toy.seeds] for name, run in runs_of.items()},
                    n, folder / "frontier.png", describe(results))  # fmt: skip
    return text


BOOTSTRAP_SCHEME = (
    f"percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples of the seeds, then of the problems (one draw shared "
    "by the drawn seeds)"
)


def read_counts_by_seed(folder: Path, runs: dict[str, str], seeds) -> tuple[dict[str, list[np.ndarray]], int]:
    """Correct counts per problem of every arm's evaluation on each seed (``eval/<run>_seed<s>/per_problem.csv``),
    every one in the problem order of the first (problems matched by id), and their common n."""
    from simko.metrics.transitions import align, read_counts

    reference, counts, ns = None, {}, set()
    for name, run in runs.items():
        counts[name] = []
        for seed in seeds:
            path = folder / "eval" / f"{run}_seed{seed}"
            ids, c, n = read_counts(path)
            reference = reference or (ids, path)
            counts[name].append(c[align(ids, reference[0], str(path), str(reference[1]))])
            ns.add(n)
    if len(ns) != 1:
        raise SystemExit(f"{folder}: the evaluations used different n ({sorted(ns)}); the report compares equal n")
    return counts, ns.pop()


def transitions_table(counts: dict[str, list[np.ndarray]], n: int, baseline: str) -> list[str]:
    """Problems newly solved / newly unsolved against the baseline at the same seed (``simko.metrics.transitions``),
    mean over seeds, for pass@1 >= 0.5 and for c > 0 (a correct sample among the n)."""
    from simko.metrics.transitions import transitions

    rows = []
    for name, seeds in counts.items():
        if name == baseline:
            continue
        per_seed = [transitions(c, n, b, n, ks=[1]) for c, b in zip(seeds, counts[baseline])]
        cells = []
        for i in (0, 1):  # the pass@1 >= 0.5 row, the c > 0 row
            gained = np.mean([rows_[i]["newly_solved"] for rows_ in per_seed])
            lost = np.mean([rows_[i]["newly_unsolved"] for rows_ in per_seed])
            cells.append(f"+{gained:.1f} / −{lost:.1f}")
        rows.append([name, *cells])
    return [
        f"Problems that change hands against {baseline} at the same seed: newly solved / newly unsolved, mean over "
        "seeds (`python -m simko.plot transitions` gives every k):",
        "",
        *md_table(["model", "pass@1 ≥ 0.5", "c > 0 (of n)"], rows),
    ]


def with_interval(stats: dict, key: str, name: str) -> str:
    low, high = stats[f"{key}_ci95"][name]
    return f"{stats[key][name]:.3f} [{low:.3f}, {high:.3f}]"


def _per_problem(counts: list[np.ndarray], n: int, metric: str, summaries: list[dict]) -> np.ndarray:
    """[seeds, problems] per-problem values of pass@k or cover@τ, else [seeds] per-seed values of the summaries."""
    from simko.metrics.cover import per_problem_cover
    from simko.metrics.uncertainty import per_problem_pass_at_k

    if metric.startswith("pass@"):
        return np.stack([per_problem_pass_at_k(c, n, [int(metric.removeprefix("pass@"))])[:, 0] for c in counts])
    if metric.startswith("cover@"):
        return np.stack([per_problem_cover(c, n, [float(metric.removeprefix("cover@"))])[:, 0] for c in counts])
    return np.array([_metric(s, metric) for s in summaries])


def describe(results: dict[str, list[dict]]) -> str:
    from simko.plot import describe_eval

    return describe_eval([s for summaries in results.values() for s in summaries])


def frontier_figure(groups: dict[str, list[Path]], n: int, out: Path, title: str) -> None:
    """pass@1 against pass@k (k = 16 and 256 where n allows, else n) for every arm: ``simko.plot frontier``."""
    from simko.plot import frontier_ks, frontier_points, plot_frontier

    if n < 2:
        return  # pass@1 against pass@1 says nothing
    ks = frontier_ks(n)
    plot_frontier(frontier_points(groups, ks, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED), ks, out, title)


def figures(
    results: dict[str, list[dict]],
    logs: dict,
    folder: Path,
    paths: bool = True,
    bands: dict | None = None,
    diff_bands: dict | None = None,
) -> None:
    import matplotlib.pyplot as plt

    from simko.plot import (
        colors_for,
        method_legend,
        plot_concentration,
        plot_cover,
        plot_curve,
        plot_pass_at_k,
        plot_pass_at_k_difference,
    )

    names = list(results)
    colors = colors_for(names)
    fig, axes = plt.subplots(1, 5 if paths else 3, figsize=(26 if paths else 16, 4.8))
    plot_pass_at_k(results, ax=axes[0], colors=colors, intervals=bands)
    if "grpo" in results:
        plot_pass_at_k_difference(results, "grpo", axes[1], colors, intervals=diff_bands)
    plot_cover(results, axes[2], colors)
    panels = (
        ((axes[3], "distinct_correct", "distinct correct solutions per problem"),
         (axes[4], "solution_entropy", "entropy of the correct solutions (nats)"))
        if paths else ()
    )  # fmt: skip
    for ax, metric, title in panels:
        values = [[s.get("diversity", {}).get(metric, np.nan) for s in results[n]] for n in names]
        means, stds = [nanmean(v) for v in values], [nanstd(v) for v in values]
        ax.bar(range(len(names)), means, yerr=stds, color=[colors[n] for n in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title}, n={results[names[0]][0]['n']} (mean ± std over seeds)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    method_legend(fig, names, colors)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(folder / "pass_at_k.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 5 if paths else 4, figsize=(27 if paths else 22, 4.8))
    plot_curve(logs, "train/reward", axes[0], colors, ylabel="mean train reward")
    axes[0].set_title("train reward (mean ± std over seeds)", fontsize=9)
    ks = sorted(
        {int(c.split("@")[1]) for fs in logs.values() for f in fs for c in f.columns if c.startswith("val/pass@")}
    )
    if ks:
        plot_curve(logs, f"val/pass@{ks[-1]}", axes[1], colors, ylabel=f"val pass@{ks[-1]}")
        axes[1].set_title(f"validation pass@{ks[-1]} (val split, n={ks[-1]})", fontsize=9)
    if paths:
        if not plot_curve(logs, "val/distinct_correct", axes[2], colors, probability=False, ylabel="distinct correct"):
            axes[2].set_visible(False)
        axes[2].set_title("validation: distinct correct solutions per problem", fontsize=9)
    styles = []
    for ax, suffix in zip(axes[-2:], ("", "_hi")):  # the last two panels, after the optional distinct-solutions one
        baseline = "grpo" if "grpo" in logs and len(logs) > 1 else None
        styles = plot_concentration(logs, ax, colors=colors, baseline=baseline, suffix=suffix)
    method_legend(fig, [n for n in names if n in logs], colors, styles)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(folder / "training.png", dpi=120)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------------


def selected_toys(toy: str | None, quick: bool) -> list[Toy]:
    """``--toy``, whose default is both toys, and for ``--quick`` the testbed only: on a fresh clone its warm start
    (about 10 min) and quick runs fit in 20 min; the arithmetic toy's would add its own warm start and 4 min of
    runs on a task that cannot tell the methods apart (``--quick --toy both`` runs them too)."""
    toy = toy or ("testbed" if quick else "both")
    return list(TOYS.values()) if toy == "both" else [TOYS[toy]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", choices=["arithmetic", "testbed", "both"], help="default: both (--quick: testbed)")
    parser.add_argument("--quick", action="store_true", help="the quick grids (fewer arms, seeds and RL steps)")
    parser.add_argument("--smoke", action="store_true", help="1 RL step per run, n=4, 8 problems (CI)")
    parser.add_argument("--losses", nargs="+", help="arms (default: the toy's own); simko_tuned needs --sweep")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the toy's own)")
    parser.add_argument("--n", type=int, help="samples per held-out problem (default: the toy's own)")
    parser.add_argument("--problems", type=int, help="held-out problems evaluated (default: the toy's own)")
    parser.add_argument("--rl-steps", type=int, help="RL steps of every train run (default: the experiment's)")
    parser.add_argument("--sweep", nargs="*", metavar="ALPHA:LAMBDA:TAU", help="the testbed's SimKO settings")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    parser.add_argument("--out", help="default: logs/reproduce (logs/reproduce_quick, logs/reproduce_smoke)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every train/eval run")
    parser.add_argument("--runs-only", action="store_true", help="train + evaluate only, no report")
    parser.add_argument("--large-n", type=int, help="testbed: also evaluate --large-n-arms at this n (eval_n<N>/)")
    parser.add_argument("--large-n-arms", nargs="+", default=["base", "grpo", "simko_tuned", "best_new"],
                        help="base, grid arms, simko_tuned, best_new (the new arm with the best mean pass@k: on val "
                        "if every new arm has a val evaluation, else on test)")  # fmt: skip
    parser.add_argument("--large-n-seeds", nargs="+", type=int, default=[0], help="seeds of the --large-n evals")
    args = parser.parse_args()
    default_out = "reproduce_smoke" if args.smoke else "reproduce_quick" if args.quick else "reproduce"
    out = Path(args.out or REPO / "logs" / default_out).resolve()
    toys = selected_toys(args.toy, args.quick)
    train_extra = []
    if args.smoke:
        train_extra = [
            "trainer.val_check_interval=1",
            "+trainer.limit_val_batches=1",
            "data.val_prompts=8",
        ]
    configured = []
    for toy in toys:
        changes = dict(toy.quick) if args.quick else {}
        if args.smoke:
            changes.update(n=4, problems=8, rl_steps=1)
        options = (("arms", args.losses), ("seeds", args.seeds), ("n", args.n), ("problems", args.problems),
                   ("rl_steps", args.rl_steps))  # fmt: skip
        for key, value in options:
            if value is not None:
                changes[key] = tuple(value) if isinstance(value, list) else value
        if args.sweep is not None and toy.name == "testbed":
            changes["sweep"] = tuple(tuple(float(x) for x in s.split(":")) for s in args.sweep)
        configured.append(replace(toy, **changes))

    for toy in configured:
        if "simko_tuned" in toy.arms and not toy.sweep:
            raise SystemExit(f"{toy.name}: arm simko_tuned needs SimKO settings to choose from (--sweep)")
        if toy.name == "testbed":
            for arm in toy.arms:
                if arm != "simko_tuned":
                    try:
                        toy.train_args(arm)
                    except ValueError as error:
                        raise SystemExit(f"--losses: {error}") from None
    for toy in configured:
        check_grid_settings(toy, out, train_extra, list(args.extra))
    runner = Runner(args.jobs, list(args.extra))
    start = time.perf_counter()
    for toy in configured:
        warm_start(toy, runner, out)
    states = {toy.name: run_toy(toy, runner, out, args, train_extra) for toy in configured}
    for toy in configured:
        finish_sweep(toy, states[toy.name], runner, out, train_extra)
    for toy in configured:
        wait(states[toy.name]["futures"])
    if args.large_n and not runner.failures:
        for toy in configured:
            if toy.name != "testbed":
                continue
            state = states[toy.name]
            runs = large_n_runs(toy, state, out, args.large_n_arms, args.large_n_seeds)
            state["large_n"] = {"n": args.large_n, "runs": runs, "seeds": args.large_n_seeds}
            wait([runner.submit([large_n_step(toy, out, run, seed, args.large_n)])
                  for run in runs.values() for seed in args.large_n_seeds])  # fmt: skip
    runner.pool.shutdown()
    if runner.failures:
        raise SystemExit(f"{len(runner.failures)} run(s) failed:\n\n" + "\n\n".join(runner.failures))
    print(f"runs done in {(time.perf_counter() - start) / 60:.1f} min: {len(runner.executed)} executed", flush=True)
    for line in runner.executed:  # module, run folder, wall seconds
        print("  ", line)
    if args.runs_only:
        return
    seconds = time.perf_counter() - start
    texts = [write_report(toy, states[toy.name], out, seconds, runner) for toy in configured]
    command = "python scripts/reproduce.py " + " ".join(sys.argv[1:])
    (out / "results.md").write_text(f"`{command}`\n\n" + "\n".join(texts))
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'} and the figures under {out}")


if __name__ == "__main__":
    main()
