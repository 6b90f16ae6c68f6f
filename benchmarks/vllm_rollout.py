#!/usr/bin/env python
"""Rollout throughput: the HF engine (batched ``generate``, shared prompt cache) vs the vLLM engine (a script).

Both engines sample the same prompts (token ids) with the same settings (temperature 1, top-p 1, top-k off, G per
prompt, ``max_new_tokens``) through the rollout-engine interface the trainer uses (``simko.engines``), in ONE
process, alternating: every round runs each shape on both engines, and the order flips every round, so a slow-down
of this shared machine hits both. Reported per shape (P prompts x G samples x T max new tokens): median seconds
per ``generate`` call, generated tokens per second (response tokens up to and including EOS), the ratio of the
medians and the median of the per-round ratios. Also measured once: the vLLM engine's start-up (including the
first weight push) and the median time of a weight push (``sync_weights``). Samples differ between the engines
(different RNG streams), so each side's generated tokens are recorded.

SmolLM2 prompts are the first P questions of ``$SIMKO_DATA_DIR/gsm8k/train.jsonl`` rendered as
``configs/data/gsm8k_train.yaml`` does (its template + the chat template); tiny: arithmetic problems.

    python benchmarks/vllm_rollout.py                                   # SmolLM2, 1x8x32 and 8x8x128, 3 rounds
    python benchmarks/vllm_rollout.py --model tiny --shapes 2x4x8 --repeats 1     # smoke run

Needs ``make install-vllm``. Writes JSON to ``--out`` (logs/benchmarks/vllm_rollout.json), prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from vllm_common import environment, log, write_results  # noqa: E402

GSM8K_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def load(model: str, cache_dir: str):
    from simko.models import load_smollm2, load_tiny

    return load_smollm2(cache_dir=cache_dir) if model == "smollm2" else load_tiny(cache_dir=cache_dir)


def prompt_texts(model: str, tokenizer, count: int) -> list[str]:
    from simko.data import render_prompt

    if model == "tiny":
        from simko.data import ArithmeticSource

        source = ArithmeticSource(seed=0, split="train")
        examples = [source.example(i) for i in range(count)]
        return [render_prompt(ex, tokenizer, "{question}=", use_chat_template=False) for ex in examples]
    path = Path(os.environ.get("SIMKO_DATA_DIR", "/work/shared/data")) / "gsm8k" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    return [render_prompt({"question": r["question"]}, tokenizer, GSM8K_TEMPLATE, use_chat_template=None) for r in rows]


def parse_shape(text: str) -> tuple[int, int, int]:
    p, g, t = (int(x) for x in text.lower().split("x"))
    return p, g, t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--shapes", default="1x8x32,8x8x128", help="comma-separated PxGxT")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both engines; 1 on a shared CPU)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--cache-dir", default="logs/cache")
    ap.add_argument("--out", default="logs/benchmarks/vllm_rollout.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from simko.engines import Sampling, build_engine

    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    policy, tok = load(args.model, args.cache_dir)
    policy.eval()
    texts = prompt_texts(args.model, tok, max(p for p, _, _ in shapes))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    t0 = time.perf_counter()
    engines = {"hf": build_engine("hf", policy, tok)}
    t1 = time.perf_counter()
    engines["vllm"] = build_engine("vllm", policy, tok, kv_cache_gib=args.kv_cache_gib)
    startup = time.perf_counter() - t1
    syncs = []
    for _ in range(3):
        t = time.perf_counter()
        engines["vllm"].sync_weights(policy)
        syncs.append(time.perf_counter() - t)
    log(f"vLLM start-up {startup:.1f} s (HF {t1 - t0:.2f} s); weight push median {statistics.median(syncs):.3f} s")

    def run(name: str, shape, seed: int) -> dict:
        p, g, t = shape
        start = time.perf_counter()
        r = engines[name].generate(ids[:p], g, Sampling(max_new_tokens=t, temperature=1.0, top_p=1.0, seed=seed))
        wall = time.perf_counter() - start
        return {"s": wall, "tokens": int(r.response_mask.sum()), "truncated": int(r.truncated.sum())}

    for name in engines:  # warm-up: untimed, smallest shape
        run(name, min(shapes, key=lambda s: s[0] * s[1] * s[2]), seed=10_000)
    records = {f"{p}x{g}x{t}": {"hf": [], "vllm": []} for p, g, t in shapes}
    for r in range(args.repeats):
        order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
        for shape in shapes:
            key = "x".join(map(str, shape))
            for name in order:
                rec = run(name, shape, seed=r)
                records[key][name].append(rec)
            last = {n: records[key][n][-1] for n in order}
            log(f"round {r + 1}/{args.repeats} {key}: " + ", ".join(f"{n} {last[n]['s']:.2f} s" for n in order))
    for engine in engines.values():
        engine.close()

    results = []
    for key, per in records.items():
        med = {n: statistics.median(x["s"] for x in per[n]) for n in per}
        round_ratios = [h["s"] / v["s"] for h, v in zip(per["hf"], per["vllm"])]
        tps = {n: sum(x["tokens"] for x in per[n]) / sum(x["s"] for x in per[n]) for n in per}
        results.append(
            {
                "shape": key,
                "median_s": {n: round(v, 3) for n, v in med.items()},
                "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
                "ratio_hf_over_vllm": round(med["hf"] / med["vllm"], 3),
                "round_ratio_median": round(statistics.median(round_ratios), 3),
                "records": per,
            }
        )
    table = [
        f"{args.model}, {args.threads} thread(s), {args.repeats} alternating rounds; vLLM start-up {startup:.1f} s, "
        f"weight push {statistics.median(syncs):.3f} s\n",
        "| P x G x T | HF s (tok/s) | vLLM s (tok/s) | HF / vLLM time | per-round ratio (median) |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        m, t = res["median_s"], res["tokens_per_s"]
        table.append(
            f"| {res['shape']} | {m['hf']:.2f} ({t['hf']:.0f}) | {m['vllm']:.2f} ({t['vllm']:.0f}) "
            f"| {res['ratio_hf_over_vllm']:.2f} | {res['round_ratio_median']:.2f} |"
        )
    payload = {
        **environment("vllm_rollout.py", argv),
        "threads": args.threads,
        "vllm_startup_s": round(startup, 2),
        "weight_push_s": [round(s, 4) for s in syncs],
        "results": results,
    }
    write_results(payload, table, args.out)


if __name__ == "__main__":
    main()
