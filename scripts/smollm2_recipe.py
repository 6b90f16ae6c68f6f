"""SmolLM2-135M-Instruct learns MATH Level 1 on a CPU: the recipe ``experiment=smollm2_math_level1``, end to end.

    python scripts/smollm2_recipe.py              # GRPO and SimKO x seeds 0 1 x 40 RL steps, n = 64 on 100 problems
    python scripts/smollm2_recipe.py --quick      # the same recipe, 1 seed, 3 RL steps, n = 8 on 16 problems
    python scripts/smollm2_recipe.py --dry-run    # print the plan (every command, in order) and run nothing
    python scripts/smollm2_recipe.py --report     # only the report, from the runs already done

Every run goes through the real entry points, one at a time (two cores: a second job only slows both down), each
with ``OMP_NUM_THREADS=1`` unless set (vLLM's CPU engine with 2 OpenMP threads on a shared machine slowed down
about 5x against 1 thread, docs/results.md):

- per seed, per loss: ``simko.train experiment=smollm2_math_level1 loss=<loss> seed=<seed>`` (validation at RL steps
  0, 20 and 40 on 32 held-out problems, ``last.ckpt`` every 5), then ``simko.eval
  experiment=smollm2_math_level1_eval`` of its last checkpoint;
- once, after the first training run: the same evaluation of the pretrained model (the "before").

Finished runs are reused and an unfinished training run continues from its ``last.ckpt`` (``ckpt_path=last``,
exact), so a killed call is resumed by calling it again (``scripts/reproduce.py``'s Runner; a folder holds one
setting of steps, n and problems: ``<out>/<task>/grid.json``). Seeds are paired: the losses of one seed see the
same prompts in the same order and the same sampling seeds, and every evaluation samples the same problems with the
same sampling seed.

The report (``<out>/<task>/results.md``, ``results.json``, ``pass_at_k.png``, ``training.png``): pass@k before and
after with 95 % bootstrap intervals over the problems, the paired differences (after - base, SimKO - GRPO) per
seed with their intervals and over seeds, response length, truncation and answer-extraction rates, the train
reward, response length, truncation and concentration curves, and the per-step time split with wall times.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (  # noqa: E402  (scripts/ is not a package)
    REPO,
    Runner,
    Toy,
    check_grid_settings,
    eval_step,
    finished,
    md_table,
    paired,
    read,
    train_step,
)

RECIPE = Toy(
    name="smollm2_math_level1",
    title="SmolLM2-135M-Instruct on MATH Level 1 (vLLM rollouts, one CPU thread)",
    experiment="smollm2_math_level1",
    eval_experiment="smollm2_math_level1_eval",
    arms=("grpo", "simko"),
    seeds=(0, 1),
    n=64,
    problems=100,
    rl_steps=40,
    quick={"seeds": (0,), "rl_steps": 3, "n": 8, "problems": 16},
)
# --quick shows the whole loop, not learning: in-loop validation on 8 problems and one refill round of dynamic
# sampling instead of three keep its training runs to a few minutes each.
QUICK_TRAIN_EXTRA = ("data.val_prompts=8", "module.dynamic_sampling.max_extra_generations=1")
EVAL_SEED = 0  # the sampling seed of every evaluation (see evaluation())
KS_SHOWN = (1, 4, 16, 64)
TIME_COLUMNS = ("time/generate", "time/score", "time/update", "time/weight_sync")


# --- the plan ----------------------------------------------------------------------------------------------------


def evaluation(recipe: Toy, out: Path, run: str | None, seed: int) -> tuple:
    """The evaluation of a run's last checkpoint (``run=None``: the pretrained model), in ``eval/<run>_seed<seed>``.

    Every evaluation samples with the same seed (``EVAL_SEED``), whichever training seed it scores: the base model
    and the trained ones then draw their n completions of a problem from the same random streams (common random
    numbers), so their paired differences carry less sampling noise, and the base model is sampled once."""
    module, overrides, run_dir, done = eval_step(recipe, out, run, seed, "test", recipe.n, recipe.problems)
    overrides = [f"seed={EVAL_SEED}" if o.startswith("seed=") else o for o in overrides]
    return module, overrides, run_dir, done


def plan(recipe: Toy, out: Path, train_extra: list[str]) -> list[tuple]:
    """The commands in the order they run (arguments of ``Runner.command``): per seed, each loss's training run and
    its evaluation, so an interrupted call leaves whole seeds behind it. The base evaluation comes right after the
    first training run, which fails in minutes if anything in the training setup is broken, not after an hour."""
    steps = []
    for seed in recipe.seeds:
        for loss in recipe.arms:
            steps.append(train_step(recipe, out, loss, seed, train_extra))
            if not steps[:-1]:
                steps.append(evaluation(recipe, out, None, EVAL_SEED))
            steps.append(evaluation(recipe, out, loss, seed))
    return steps


def command_line(step: tuple, extra: list[str]) -> str:
    module, overrides, run_dir, _ = step
    resume = ["ckpt_path=last"] if module == "simko.train" else []
    return " ".join(["python", "-m", module, *overrides, *resume, f"hydra.run.dir={run_dir}", *extra])


def run_plan(steps: list[tuple], runner: Runner, out: Path, recipe: Toy) -> None:
    """Run the steps one after the other; append each executed one's wall time and load to ``timings.jsonl``."""
    log = out / recipe.name / "timings.jsonl"
    for step in steps:
        module, _, run_dir, done = step
        if finished(module, run_dir, done):
            continue
        load_before, start = os.getloadavg()[0], time.perf_counter()
        runner.command(*step)  # raises RuntimeError with the run's output if it fails
        record = {"module": module, "run": run_dir.name, "seconds": round(time.perf_counter() - start, 1),
                  "load_start": round(load_before, 2), "load_end": round(os.getloadavg()[0], 2),
                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"done {module} {run_dir.name} in {record['seconds'] / 60:.1f} min (load {load_before:.1f})", flush=True)


# --- intervals over problems -------------------------------------------------------------------------------------


def per_problem_counts(eval_dir: Path) -> tuple[list[str], np.ndarray, int]:
    """(problem ids, correct counts c, n) from an evaluation's ``per_problem.csv``."""
    with open(eval_dir / "per_problem.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ns = {int(r["n"]) for r in rows}
    if len(ns) != 1:
        raise ValueError(f"{eval_dir}: problems with different n {sorted(ns)}")
    return [r["id"] for r in rows], np.array([int(r["c"]) for r in rows]), ns.pop()


def per_problem_pass_at_k(counts: np.ndarray, n: int, k: int) -> np.ndarray:
    """The unbiased pass@k of each problem, ``1 - C(n - c, k) / C(n, k)`` (simko.metrics.uncertainty)."""
    from simko.metrics.uncertainty import per_problem_pass_at_k as pass_at_k_per_problem

    return pass_at_k_per_problem(counts, n, [k])[:, 0]


def bootstrap_interval_over_problems(
    values: np.ndarray, baseline: np.ndarray | None = None, reps: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over problems of ``values`` (per-problem pass@k) and its 95 % percentile
    bootstrap interval over the problems (simko.metrics.uncertainty). With ``baseline`` (the same problems, same
    order) it is the mean paired difference ``values - baseline`` and its interval, resampling problems jointly.

    The interval covers the sampling of the problems (and of the n completions of each), not the training seed: the
    seeds are resampled in the over-seeds rows."""
    from simko.metrics.uncertainty import bootstrap, paired_bootstrap

    values = np.asarray(values, dtype=float)[:, None]
    if baseline is None:
        result = bootstrap(values, resamples=reps, seed=seed)
    else:
        result = paired_bootstrap(values, np.asarray(baseline, dtype=float)[:, None], resamples=reps, seed=seed)
    return float(result["point"][0]), float(result["low"][0]), float(result["high"][0])


def interval_text(mean: float, low: float, high: float, signed: bool = False) -> str:
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if signed else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


# --- problems the question itself solves -------------------------------------------------------------------------


# The math verifier's rule for answers without a box that echo.json was computed under.
ECHO_FALLBACK = "final value"


def echo_solved_problems(recipe: Toy, out: Path) -> set[str]:
    """Ids of the evaluated problems whose own question text, scored as a completion, gets reward 1.

    Without a box the math verifier reads math-verify's extraction of the text, the last expression in it. It
    credits only a final value (not ``102^2 - 98^2`` for the gold 800: 17 of the 100 problems scored before it
    did), so what is left are questions whose last number is the plain answer. On such problems a sample that
    restates the question is rewarded without computing anything, so the report gives pass@k on the other problems
    too. Cached in ``<out>/<task>/echo.json``; a cache without ``"fallback": "final value"`` was written under the
    verifier that credited expressions and is recomputed."""
    cache = out / recipe.name / "echo.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("fallback") == ECHO_FALLBACK:
            return set(cached["echo_solved"])
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from simko.config import CONFIG_DIR
    from simko.rewards import score_batch

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"experiment={recipe.eval_experiment}"])
    source = instantiate(cfg.data).val_source
    problems = [source[i] for i in range(min(len(source), recipe.problems))]
    verifiers = instantiate(cfg.eval.verifiers)
    try:
        scores = score_batch([p["question"] for p in problems], [p["answer"] for p in problems],
                             [p["verifier"] for p in problems], verifiers=verifiers)  # fmt: skip
    finally:
        for verifier in verifiers.values():
            verifier.close()
    solved = [p["id"] for p, score in zip(problems, scores) if score >= 1.0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    payload = {"problems": len(problems), "fallback": ECHO_FALLBACK, "echo_solved": solved}
    cache.write_text(json.dumps(payload, indent=1) + "\n")
    return set(solved)


# --- the report --------------------------------------------------------------------------------------------------


def run_key(run: str, seed: int) -> tuple[str, int]:
    """The evaluation a run of this seed is compared with: the base model has one, sampled with ``EVAL_SEED``."""
    return (run, EVAL_SEED) if run == "base" else (run, seed)


def eval_dir(out: Path, recipe: Toy, run: str | None, seed: int) -> Path:
    return out / recipe.name / "eval" / f"{run or 'base'}_seed{seed}"


def train_dir(out: Path, recipe: Toy, loss: str, seed: int) -> Path:
    return out / recipe.name / "train" / f"{loss}_seed{seed}"


def write_report(recipe: Toy, out: Path, echo_ids: set[str] | None = None) -> str:
    """results.md / results.json / figures from whatever runs are finished (missing ones are listed, not invented).
    ``echo_ids``: the problems the question itself solves (``echo_solved_problems``); pass@k is also given without
    them."""
    from simko.plot import read_training_log

    folder = out / recipe.name
    evals, missing = {}, []
    for run, seed in [(None, EVAL_SEED), *((loss, seed) for seed in recipe.seeds for loss in recipe.arms)]:
        path = eval_dir(out, recipe, run, seed)
        if (path / "pass_at_k.json").is_file():
            evals[(run or "base", seed)] = path
        else:
            missing.append(f"eval {path.name}")
    logs = {}
    for loss in recipe.arms:
        for seed in recipe.seeds:
            path = train_dir(out, recipe, loss, seed)
            frame = read_training_log(path) if path.is_dir() else None
            if frame is not None:
                logs[(loss, seed)] = frame
            if not (path / "checkpoints" / "last.ckpt").is_file() or not finished(
                "simko.train", path, path / "checkpoints" / "last.ckpt"
            ):
                missing.append(f"train {path.name}")

    lines = [f"## {recipe.title}", ""]
    summaries = {key: read(path / "pass_at_k.json") for key, path in evals.items()}
    counts = {key: per_problem_counts(path) for key, path in evals.items()}
    payload: dict = {"missing": missing, "evals": {}, "paired": {}, "training": {}, "timings": {}}
    if summaries:
        first = next(iter(summaries.values()))
        n = first["n"]
        ks = [k for k in KS_SHOWN if k <= n]
        lines += [
            f"pass@k on {first['num_problems']} held-out problems ({first['config'].get('held_out')}), n = {n} samples "
            f"each at T = {first['config']['eval']['temperature']}, top-p {first['config']['eval']['top_p']}, at "
            f"most {first['config']['eval']['max_new_tokens']} new tokens; [95 % bootstrap interval over the "
            "problems]. tokens: mean response length (EOS included); cut: share of samples without EOS within the "
            "budget; no box: share without a complete \\boxed{} (the math verifier then reads math-verify's own "
            "extraction of the text).",
            "",
        ]
        rows = []
        for (run, seed), summary in summaries.items():
            _, c, n_run = counts[(run, seed)]
            cells = []
            for k in ks:
                cells.append(interval_text(*bootstrap_interval_over_problems(per_problem_pass_at_k(c, n_run, k))))
            rows.append([run, str(seed), *cells, f"{summary['response_tokens']:.1f}",
                         f"{summary.get('truncated_frac', float('nan')):.3f}",
                         f"{summary.get('no_final_answer_frac', float('nan')):.3f}"])  # fmt: skip
            payload["evals"][f"{run}_seed{seed}"] = {
                "pass_at_k": summary["pass_at_k"], "response_tokens": summary["response_tokens"],
                "truncated_frac": summary.get("truncated_frac"), "no_final_answer_frac":
                summary.get("no_final_answer_frac"), "diagnostics": summary.get("diagnostics"),
                "seconds": summary.get("seconds")}  # fmt: skip
        order = {name: i for i, name in enumerate(("base", *recipe.arms))}
        rows.sort(key=lambda r: (order.get(r[0], 99), r[1]))
        lines += md_table(["model", "seed", *[f"pass@{k}" for k in ks], "tokens", "cut", "no box"], rows)
        lines += ["", *paired_section(recipe, counts, ks, payload)]
        if echo_ids:
            lines += ["", *echo_section(recipe, counts, ks, echo_ids, payload)]
    lines += ["", *training_section(recipe, logs, payload)]
    lines += ["", *timing_section(recipe, folder, logs, evals, payload)]
    if missing:
        lines += ["", "Not finished yet: " + ", ".join(missing) + "."]
    text = "\n".join(lines) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text(text)
    (folder / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    figures(recipe, summaries, counts, logs, folder)
    return text


def paired_section(recipe: Toy, counts: dict, ks: list[int], payload: dict) -> list[str]:
    """After - base and SimKO - GRPO per seed (intervals over problems), then over seeds (the toys' rule)."""
    comparisons = [(loss, "base") for loss in recipe.arms] + [
        (a, b) for i, b in enumerate(recipe.arms) for a in recipe.arms[i + 1 :]
    ]
    rows, over_seeds = [], []
    for a, b in comparisons:
        per_seed = {k: ([], []) for k in ks}  # per k: the per-problem pass@k of a and of b, one array per seed
        for seed in recipe.seeds:
            key_a, key_b = run_key(a, seed), run_key(b, seed)
            if key_a not in counts or key_b not in counts:
                continue
            ids_a, c_a, n_a = counts[key_a]
            ids_b, c_b, n_b = counts[key_b]
            if ids_a != ids_b:
                raise ValueError(f"{a} and {b} at seed {seed} were evaluated on different problems")
            cells = []
            for k in ks:
                values_a, values_b = per_problem_pass_at_k(c_a, n_a, k), per_problem_pass_at_k(c_b, n_b, k)
                result = bootstrap_interval_over_problems(values_a, values_b)
                per_seed[k][0].append(values_a)
                per_seed[k][1].append(values_b)
                bold = result[1] > 0 or result[2] < 0  # the interval excludes 0
                cells.append(f"**{interval_text(*result, signed=True)}**" if bold else interval_text(*result, True))
                payload["paired"][f"{a}-{b}_seed{seed}_pass@{k}"] = result
            rows.append([f"{a} − {b}", str(seed), *cells])
        if len(per_seed[ks[0]][0]) > 1:
            cells = []
            for k in ks:
                p = paired(*per_seed[k])  # seeds, then problems resampled; the same draws for both arms
                text = f"{interval_text(p['mean'], p['low'], p['high'], signed=True)} ({p['wins']}/{p['losses']})"
                cells.append(f"**{text}**" if p["established"] else text)
                payload["paired"][f"{a}-{b}_over_seeds_pass@{k}"] = p
            over_seeds.append([f"{a} − {b}", f"{len(per_seed[ks[0]][0])} seeds", *cells])
    if not rows:
        return []
    return [
        "Paired differences on the same problems. Per seed: mean difference of per-problem pass@k [95 % bootstrap "
        "interval over the problems]; **bold**: the interval excludes 0. Over seeds: the mean difference [95 % paired "
        "bootstrap interval, seeds then problems resampled] (seeds above/below 0); **bold**: the interval excludes 0.",
        "",
        *md_table(["difference", "seed", *[f"Δ pass@{k}" for k in ks]], rows + over_seeds),
    ]


def echo_section(recipe: Toy, counts: dict, ks: list[int], echo_ids: set[str], payload: dict) -> list[str]:
    """pass@k on the problems that restating the question does not solve, and on those it does, with the paired
    difference to the base model on the first kind."""
    ids = next(iter(counts.values()))[0]
    keep = np.array([i not in echo_ids for i in ids])
    shown = [ks[0], ks[-1]]
    rows = []
    for (run, seed), (_, c, n) in counts.items():
        cells = []
        for subset in (keep, ~keep):
            for k in shown:
                cells.append(interval_text(*bootstrap_interval_over_problems(per_problem_pass_at_k(c[subset], n, k))))
        if run != "base" and run_key("base", seed) in counts:
            _, c_base, n_base = counts[run_key("base", seed)]
            diff = bootstrap_interval_over_problems(
                per_problem_pass_at_k(c[keep], n, 1), per_problem_pass_at_k(c_base[keep], n_base, 1)
            )
            payload["paired"][f"{run}-base_seed{seed}_pass@1_without_echo"] = diff
            bold = diff[1] > 0 or diff[2] < 0
            cells.append(f"**{interval_text(*diff, signed=True)}**" if bold else interval_text(*diff, signed=True))
        else:
            cells.append("–")
        rows.append([run, str(seed), *cells])
    order = {name: i for i, name in enumerate(("base", *recipe.arms))}
    rows.sort(key=lambda r: (order.get(r[0], 99), r[1]))
    kept, echoed = int(keep.sum()), int((~keep).sum())
    header = [*(f"pass@{k}, {kept} others" for k in shown), *(f"pass@{k}, {echoed} echo" for k in shown)]
    return [
        f"{echoed} of the {len(ids)} problems are solved by restating the question: its text, scored as a "
        "completion, gets reward 1 (math-verify evaluates the expression the question asks to compute). pass@k on "
        f"the {kept} other problems and on those {echoed}, and Δ pass@1 (after − base) on the {kept} others:",
        "",
        *md_table(["model", "seed", *header, f"Δ pass@1, {kept} others"], rows),
    ]


def training_section(recipe: Toy, logs: dict, payload: dict) -> list[str]:
    if not logs:
        return []
    rows, windows = [], set()
    for (loss, seed), frame in logs.items():
        steps = frame[frame["train/reward"].notna()] if "train/reward" in frame else frame.iloc[:0]
        if steps.empty:
            continue
        window = min(10, max(1, len(steps) // 2))  # the first and the last `window` steps never overlap
        windows.add(window)
        head, tail = steps.iloc[:window], steps.iloc[-window:]
        val = frame["val/pass@1"].dropna() if "val/pass@1" in frame else None
        record = {
            "steps": int(steps.index.max()),
            "reward_first10": float(head["train/reward"].mean()),
            "reward_last10": float(tail["train/reward"].mean()),
            "length_first10": float(head["train/response_len"].mean()),
            "length_last10": float(tail["train/response_len"].mean()),
            "truncated_first10": float(head.get("train/truncated_frac", head["train/reward"] * np.nan).mean()),
            "truncated_last10": float(tail.get("train/truncated_frac", tail["train/reward"] * np.nan).mean()),
            "p_rank1_first10": float(head.get("diag/p_rank1", head["train/reward"] * np.nan).mean()),
            "p_rank1_last10": float(tail.get("diag/p_rank1", tail["train/reward"] * np.nan).mean()),
            "val_pass@1": {int(s): float(v) for s, v in val.items()} if val is not None else {},
        }
        payload["training"][f"{loss}_seed{seed}"] = record
        val_text = " → ".join(f"{v:.3f}" for v in record["val_pass@1"].values())
        rows.append([loss, str(seed), str(record["steps"]),
                     f"{record['reward_first10']:.3f} → {record['reward_last10']:.3f}",
                     f"{record['length_first10']:.1f} → {record['length_last10']:.1f}",
                     f"{record['truncated_first10']:.3f} → {record['truncated_last10']:.3f}",
                     f"{record['p_rank1_first10']:.3f} → {record['p_rank1_last10']:.3f}", val_text])  # fmt: skip
    window = "/".join(str(w) for w in sorted(windows))
    return [
        f"Training (means of the first and the last {window} RL steps; val pass@1 on the first held-out problems "
        "at each validation, `data.val_prompts` of them × `module.val_samples` samples):",
        "",
        *md_table(
            ["loss", "seed", "RL steps", "train reward", "response tokens", "truncated", "p(rank 1)", "val pass@1"],
            rows,
        ),  # fmt: skip
    ]


def timing_section(recipe: Toy, folder: Path, logs: dict, evals: dict, payload: dict) -> list[str]:
    lines = []
    rows = []
    for (loss, seed), frame in logs.items():
        cols = [c for c in TIME_COLUMNS if c in frame]
        if not cols:
            continue
        med = {c: float(frame[c].median()) for c in cols}
        total = sum(med.values())
        payload["timings"][f"{loss}_seed{seed}"] = med
        rows.append([loss, str(seed), *[f"{med.get(c, float('nan')):.1f}" for c in TIME_COLUMNS], f"{total:.1f}",
                     f"{100 * med.get('time/update', 0) / total:.0f} %" if total else "–"])  # fmt: skip
    if rows:
        lines += [
            "Per RL step, median seconds (`time/*` of metrics.csv; the machine's load is in the wall-time table):",
            "",
            *md_table(["loss", "seed", "generate", "score", "update", "weight sync", "step", "update share"], rows),
            "",
        ]
    log = folder / "timings.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        payload["timings"]["runs"] = records
        rows = [[r["module"], r["run"], f"{r['seconds'] / 60:.1f}", f"{r['load_start']:.1f} → {r['load_end']:.1f}",
                 r["finished_at"]] for r in records]  # fmt: skip
        lines += [
            "Wall time of each executed run (load: the 1-minute load average of the 2-core machine at start and end):",
            "",
            *md_table(["entry point", "run", "minutes", "load", "finished"], rows),
        ]
    return lines


def figures(recipe: Toy, summaries: dict, counts: dict, logs: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simko.plot import colors_for, method_legend, plot_concentration, plot_curve

    names = ["base", *recipe.arms]
    colors = colors_for(names)
    if summaries:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        for (run, seed), (_, c, n) in counts.items():
            ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= n]
            stats = [bootstrap_interval_over_problems(per_problem_pass_at_k(c, n, k)) for k in ks]
            mean, low, high = (np.array(x) for x in zip(*stats))
            style = "-" if seed == recipe.seeds[0] else "--"
            axes[0].plot(ks, mean, color=colors[run], linestyle=style, marker="o", ms=3, label=f"{run} seed {seed}")
            axes[0].fill_between(ks, low, high, color=colors[run], alpha=0.12, lw=0)
            if run != "base" and run_key("base", seed) in counts:
                _, c_base, n_base = counts[run_key("base", seed)]
                diff = [
                    bootstrap_interval_over_problems(
                        per_problem_pass_at_k(c, n, k), per_problem_pass_at_k(c_base, n_base, k)
                    )
                    for k in ks
                ]
                mean, low, high = (np.array(x) for x in zip(*diff))
                axes[1].plot(ks, mean, color=colors[run], linestyle=style, marker="o", ms=3)
                axes[1].fill_between(ks, low, high, color=colors[run], alpha=0.12, lw=0)
        first = next(iter(summaries.values()))
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k")
            ax.grid(alpha=0.3)
        axes[0].set_ylim(0, 1)
        axes[0].set_ylabel("pass@k (unbiased)")
        axes[0].set_title(f"held-out pass@k, {first['num_problems']} problems, n={first['n']}, "
                          "95 % bootstrap intervals over problems", fontsize=9)  # fmt: skip
        axes[0].legend(fontsize=7, loc="lower right")
        axes[1].axhline(0, color="black", lw=0.8)
        axes[1].set_ylabel("pass@k − base (same problems, same seed)")
        axes[1].set_title("after − before, per seed (solid: first seed, dashed: second)", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "pass_at_k.png", dpi=120)
        plt.close(fig)
    if logs:
        grouped = {loss: [f for (lo, _), f in logs.items() if lo == loss] for loss in recipe.arms}
        grouped = {loss: frames for loss, frames in grouped.items() if frames}
        fig, axes = plt.subplots(1, 5, figsize=(27, 4.8))
        plot_curve(grouped, "train/reward", axes[0], colors, ylabel="mean train reward", probability=False, smooth=5)
        axes[0].set_title("train reward (5-step rolling mean; mean ± std over seeds)", fontsize=9)
        plot_curve(grouped, "val/pass@1", axes[0], colors, linestyle="--", probability=False)
        plot_curve(grouped, "train/response_len", axes[1], colors, ylabel="tokens", probability=False, smooth=5)
        axes[1].set_title("response length (tokens, EOS included)", fontsize=9)
        plot_curve(grouped, "train/truncated_frac", axes[2], colors, ylabel="share of rollouts", smooth=5)
        axes[2].set_title("truncated at the budget (no EOS)", fontsize=9)
        styles = plot_concentration(grouped, axes[3], colors=colors, smooth=5)
        plot_concentration(grouped, axes[4], colors=colors, suffix="_hi", smooth=5)
        method_legend(fig, list(grouped), colors, styles)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(folder / "training.png", dpi=120)
        plt.close(fig)


# --- main --------------------------------------------------------------------------------------------------------


def configured(args) -> Toy:
    recipe = replace(RECIPE, **RECIPE.quick) if args.quick else RECIPE
    changes = {}
    for key, value in (("seeds", args.seeds), ("rl_steps", args.rl_steps), ("n", args.n), ("problems", args.problems),
                       ("arms", args.losses)):  # fmt: skip
        if value is not None:
            changes[key] = tuple(value) if isinstance(value, list) else value
    return replace(recipe, **changes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 RL steps, n = 8 on 16 problems (≤ 20 min)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--losses", nargs="+")
    parser.add_argument("--rl-steps", type=int)
    parser.add_argument("--n", type=int, help="samples per held-out problem")
    parser.add_argument("--problems", type=int, help="held-out problems evaluated")
    parser.add_argument("--out", help="default: logs/smollm2 (--quick: logs/smollm2_quick)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    recipe = configured(args)
    out = Path(args.out or REPO / "logs" / ("smollm2_quick" if args.quick else "smollm2")).resolve()
    train_extra = [*(QUICK_TRAIN_EXTRA if args.quick else ()), *args.extra]  # train_step adds seed=, callbacks
    steps = plan(recipe, out, train_extra)
    if args.dry_run:
        print(f"# {len(steps)} commands, one at a time, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}:")
        for step in steps:
            done = " (done: reused)" if finished(step[0], step[2], step[3]) else ""
            print(command_line(step, []) + done)
        return
    if not args.report:
        check_grid_settings(recipe, out, train_extra, [])
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        runner = Runner(jobs=1, extra=[])
        start = time.perf_counter()
        try:
            run_plan(steps, runner, out, recipe)
        finally:
            runner.pool.shutdown()
        print(f"runs done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    text = write_report(recipe, out, echo_solved_problems(recipe, out))
    command = "python scripts/smollm2_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command}`\n\n{text}")
    print(f"wrote {out / recipe.name / 'results.md'} and its figures")


if __name__ == "__main__":
    main()
