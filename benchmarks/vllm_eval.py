#!/usr/bin/env python
"""pass@k evaluation throughput: ``simko.eval`` with ``rollout.engine=hf`` vs ``rollout.engine=vllm`` (a script).

Runs the real ``simko.eval.evaluate`` (configs/eval.yaml composed as the CLI composes it, plus the overrides
below) with each engine, alternating in ONE process (the order flips every round). Timed per run: the whole
``evaluate`` call, the engine's construction (vLLM: start-up and the first weight push), and the time inside
``engine.generate``; the rest is scoring, the concentration diagnostics (a teacher-forced forward over every
sample, the same work for both engines; ``--no-diagnostics`` turns them off) and writing the outputs. Reported:
medians, samples per second of generation, and the HF / vLLM ratios.

    python benchmarks/vllm_eval.py                      # tiny model, arithmetic: n=64 on 64 problems, 3 rounds
    python benchmarks/vllm_eval.py --model smollm2-135m --data gsm8k --max-new-tokens 128 --limit 8 --n 16
    python benchmarks/vllm_eval.py --repeats 1 --limit 8 --n 8        # smoke run

Needs ``make install-vllm``. Writes JSON to ``--out`` (logs/benchmarks/vllm_eval.json), prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from vllm_common import environment, log, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="simko-eval-bench-")  # ${hydra:...} outside a Hydra run
    return cfg


class Timed:
    """Wraps simko.eval's build_engine: times the engine's construction and every generate call."""

    def __init__(self):
        import simko.eval

        self.module = simko.eval
        self.original = simko.eval.build_engine
        self.build_s = self.generate_s = 0.0
        self.samples = self.tokens = 0

    def __enter__(self):
        outer = self

        def build_engine(*args, **kwargs):
            t0 = time.perf_counter()
            engine = outer.original(*args, **kwargs)
            outer.build_s += time.perf_counter() - t0
            generate = engine.generate

            def timed_generate(prompt_ids, group_size, sampling):
                t = time.perf_counter()
                r = generate(prompt_ids, group_size, sampling)
                outer.generate_s += time.perf_counter() - t
                outer.samples += r.num_rows
                outer.tokens += int(r.response_mask.sum())
                return r

            engine.generate = timed_generate
            return engine

        self.module.build_engine = build_engine
        return self

    def __exit__(self, *exc):
        self.module.build_engine = self.original


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="model config (tiny, smollm2-135m)")
    ap.add_argument("--data", default="arithmetic", help="data config whose held-out set is evaluated")
    ap.add_argument("--n", type=int, default=64, help="samples per problem (eval.n)")
    ap.add_argument("--limit", type=int, default=64, help="problems (eval.limit)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens (default: the config's)")
    ap.add_argument("--no-diagnostics", action="store_true", help="eval.diagnostics_top_k=0")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--cache-dir", default=str(ROOT / "logs" / "cache"))
    ap.add_argument("--out", default="logs/benchmarks/vllm_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from simko.eval import evaluate

    overrides = [
        f"model={args.model}",
        f"data={args.data}",
        f"eval.n={args.n}",
        f"eval.limit={args.limit}",
        f"paths.cache_dir={args.cache_dir}",
        f"rollout.vllm.kv_cache_gib={args.kv_cache_gib}",
    ]
    if args.max_new_tokens:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.no_diagnostics:
        overrides.append("eval.diagnostics_top_k=0")

    def run(engine: str) -> dict:
        cfg = compose([*overrides, f"rollout.engine={engine}"])
        with Timed() as timed:
            t0 = time.perf_counter()
            summary = evaluate(cfg, Path(cfg.paths.output_dir))
            total = time.perf_counter() - t0
        return {
            "total_s": total,
            "engine_build_s": timed.build_s,
            "generate_s": timed.generate_s,
            "rest_s": total - timed.build_s - timed.generate_s,
            "samples": timed.samples,
            "tokens": timed.tokens,
            "pass_at_k": summary["pass_at_k"],
        }

    records: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for r in range(args.repeats):
        order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
        for engine in order:
            records[engine].append(run(engine))
        last = {e: records[e][-1] for e in order}
        log(
            f"round {r + 1}/{args.repeats}: "
            + ", ".join(f"{e} total {x['total_s']:.1f} s (generate {x['generate_s']:.1f} s)" for e, x in last.items())
        )
    med = {e: {k: statistics.median(x[k] for x in v) for k in ("total_s", "engine_build_s", "generate_s", "rest_s")}
           for e, v in records.items()}  # fmt: skip
    sps = {e: sum(x["samples"] for x in v) / sum(x["generate_s"] for x in v) for e, v in records.items()}
    table = [
        f"{args.model} on {args.data}: n={args.n} x {args.limit} problems, {args.threads} thread(s), "
        f"{args.repeats} alternating rounds\n",
        "| engine | total s | engine start s | generate s | samples/s (generate) | rest s (score, diagnostics) |",
        "|---|---|---|---|---|---|",
    ]
    for e in ("hf", "vllm"):
        m = med[e]
        table.append(
            f"| {e} | {m['total_s']:.1f} | {m['engine_build_s']:.1f} | {m['generate_s']:.1f} | {sps[e]:.0f} "
            f"| {m['rest_s']:.1f} |"
        )
    ratio_total = med["hf"]["total_s"] / med["vllm"]["total_s"]
    ratio_gen = med["hf"]["generate_s"] / med["vllm"]["generate_s"]
    table.append(f"\nHF / vLLM: total {ratio_total:.2f}, generate {ratio_gen:.2f}")
    payload = {
        **environment("vllm_eval.py", argv),
        "overrides": overrides,
        "median": med,
        "generate_samples_per_s": sps,
        "ratio_hf_over_vllm": {"total": round(ratio_total, 3), "generate": round(ratio_gen, 3)},
        "records": records,
    }
    write_results(payload, table, args.out)


if __name__ == "__main__":
    main()
