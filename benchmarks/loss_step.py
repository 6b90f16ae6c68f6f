#!/usr/bin/env python
"""Benchmark one RL update step of ``grpo`` vs ``simko`` on a fixed rollout batch (a script, not a test).

One update step is what ``RLVRModule.training_step`` does after generation and scoring, with one PPO epoch,
one mini-batch and the concentration diagnostics off (``module.diagnostics_top_k=0``), through the same code
(:func:`simko.update.accumulate_gradients`):

    zero_grad -> for each micro-batch: rollout_token_stats(top_k=loss.top_k) -> loss -> backward (accumulated)

so GRPO builds its token statistics with ``top_k=0`` and SimKO with ``top_k=3``: the top-K candidates, the
per-response entropy quantile and the smoothed ratio are the whole extra cost of SimKO. No optimizer step is
taken (it would be the same work for both losses). ``old_logprobs`` are the current detached log-probs.

The rollout batch is generated once per model and reused by every step, with fixed seeded verifier scores (every
group mixed, so no advantage is zero): both losses see identical inputs.

* Time: steps of the two losses alternate in ONE process (grpo, simko, simko, grpo, ...: the order flips every
  pair), so a slow-down of the machine hits both; reported are the median step time of each loss, the ratio of
  the medians and the median of the per-pair ratios.
* Memory: the peak of allocated CPU tensor memory during one step, from the allocator's own events
  (``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the c10 CPU allocator;
  the running sum of those events, from a state with no gradients, has its maximum at the step's peak). These
  profiled steps run first and double as the warm-up.
* ``--head-repeats N``: also times the LM head + loss stage alone (the only part that differs), whose GRPO ->
  SimKO difference is SimKO's extra cost with much less noise than the difference of two full steps.

On a shared CPU use ``--threads 1``: with more threads than free cores, OpenMP barriers make single steps
vary several-fold.

    /tmp/venv/bin/python benchmarks/loss_step.py --model both --repeats 7
    /tmp/venv/bin/python benchmarks/loss_step.py --model tiny --profile   # where does the time go (per op)

Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines off stderr

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from simko.data import ArithmeticSource, render_prompt  # noqa: E402
from simko.data.sources import gsm8k_final_answer  # noqa: E402
from simko.engines.hf import generate_rollouts  # noqa: E402
from simko.forward import rollout_token_stats  # noqa: E402
from simko.kv_cache import position_ids_from_mask  # noqa: E402
from simko.losses import build_loss  # noqa: E402
from simko.rollout import Rollouts  # noqa: E402
from simko.update import UpdateHooks, UpdateSchedule, accumulate_gradients  # noqa: E402

LOSSES = ("grpo", "simko")
MIB = 2**20

# configs/data/gsm8k_train.yaml's prompt template; used when no GSM8K file is found.
GSM8K_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
FALLBACK_QUESTIONS = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "10",
    ),
    ("A bakery makes 24 muffins per tray and bakes 7 trays. It sells 150 muffins. How many are left?", "18"),
    ("Tom has 3 boxes with 15 pencils each. He gives away 12 pencils. How many pencils does he have now?", "33"),
    (
        "A train travels 60 km per hour for 3 hours and then 40 km per hour for 2 hours. "
        "How far does it travel in total?",
        "260",
    ),
    ("Sara reads 12 pages a day. How many days does she need to read a 180-page book?", "15"),
    ("A shirt costs $25 and is on sale for 20% off. What is the sale price in dollars?", "20"),
    ("There are 5 rows of 8 chairs and 6 chairs are broken. How many chairs can be used?", "34"),
]


# ---------------------------------------------------------------------------------------------- the batch
def gsm8k_examples(n: int) -> tuple[list[dict[str, str]], str]:
    path = Path(os.environ.get("SIMKO_DATA_DIR", "/work/shared/data")) / "gsm8k" / "train.jsonl"
    if path.is_file():
        rows = []
        with path.open() as f:
            for line in f:
                if len(rows) == n:
                    break
                row = json.loads(line)
                rows.append({"question": row["question"], "answer": gsm8k_final_answer(row["answer"])})
        if len(rows) == n:
            return rows, str(path)
    if n > len(FALLBACK_QUESTIONS):
        raise ValueError(f"no GSM8K file at {path} and only {len(FALLBACK_QUESTIONS)} built-in questions")
    return [{"question": q, "answer": a} for q, a in FALLBACK_QUESTIONS[:n]], "built-in questions"


def build_batch(name: str, args) -> tuple[torch.nn.Module, Rollouts, torch.Tensor, dict]:
    """(model in train mode, fixed rollouts, fixed verifier scores [N], description) of one benchmark model."""
    from simko.models import load_smollm2, load_tiny

    if name == "tiny":
        model, tok = load_tiny(cache_dir=args.cache_dir)
        prompts_n, G, new_tokens = args.tiny_prompts, args.tiny_group_size, args.tiny_max_new_tokens
        source = ArithmeticSource(seed=0, split="train")  # configs/data/arithmetic.yaml
        examples = [source.example(i) for i in range(prompts_n)]
        prompts = [render_prompt(ex, tok, "{question}=", use_chat_template=False) for ex in examples]
        origin = "ArithmeticSource(seed=0, split=train)"
    else:
        model, tok = load_smollm2(cache_dir=args.cache_dir)
        prompts_n, G, new_tokens = args.smollm2_prompts, args.smollm2_group_size, args.max_new_tokens
        examples, origin = gsm8k_examples(prompts_n)
        prompts = [render_prompt(ex, tok, GSM8K_TEMPLATE, use_chat_template=None) for ex in examples]
    model.eval()
    t0 = time.perf_counter()
    rollouts = generate_rollouts(
        model, tok, prompts, group_size=G, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=args.seed
    )
    gen_s = time.perf_counter() - t0
    model.train()  # as during the update (dropout is 0 in both models)
    scores = mixed_scores(prompts_n, G, args.seed)
    lengths = rollouts.response_mask.sum(1)
    info = {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "vocab": model.get_output_embeddings().weight.shape[0],
        "prompts": prompts_n,
        "group_size": G,
        "rows": rollouts.num_rows,
        "prompt_source": origin,
        "max_new_tokens": new_tokens,
        "prompt_cols": rollouts.prompt_len,
        "response_cols": rollouts.response_mask.shape[1],
        "response_tokens_mean": round(float(lengths.float().mean()), 1),
        "response_tokens_total": int(lengths.sum()),
        "truncated_rows": int((lengths == new_tokens).sum()),
        "score_mean": round(float(scores.mean()), 3),
        "generate_s": round(gen_s, 2),
    }
    return model, rollouts, scores, info


def mixed_scores(num_prompts: int, group_size: int, seed: int) -> torch.Tensor:
    """{0, 1} verifier scores [P * G], seeded; every group has between 1 and G - 1 correct responses."""
    gen = torch.Generator().manual_seed(seed + 1)
    scores = torch.zeros(num_prompts, group_size)
    for p in range(num_prompts):
        n_correct = int(torch.randint(1, group_size, (1,), generator=gen))
        scores[p, torch.randperm(group_size, generator=gen)[:n_correct]] = 1.0
    return scores.reshape(-1)


# ---------------------------------------------------------------------------------------------- one step
def update_step(
    model, rollouts: Rollouts, scores: torch.Tensor, loss_fn, micro_batch_size: int, chunk_size: int
) -> float:
    """One update of RLVRModule.training_step (1 PPO epoch, 1 mini-batch, diagnostics off), no optimizer step;
    returns the mini-batch loss."""
    G = rollouts.group_size
    model.zero_grad(set_to_none=True)
    advantages = loss_fn.compute_advantages(scores.view(-1, G)).reshape(-1)
    metrics: dict[str, float] = defaultdict(float)
    hooks = UpdateHooks(
        lambda rows, top_k: rollout_token_stats(model, rows, top_k=top_k, temperature=1.0, chunk_size=chunk_size)
    )
    schedule = UpdateSchedule(micro_batch_size=micro_batch_size)
    accumulate_gradients(
        loss_fn, rollouts, scores, advantages, torch.arange(rollouts.num_rows), hooks, schedule, metrics
    )
    return metrics["loss"]


@contextmanager
def no_gc():
    """No cyclic garbage collection inside a timed step (collected in between)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_step(model, rollouts, scores, loss_fn, args) -> float:
    with no_gc():
        t0 = time.perf_counter()
        update_step(model, rollouts, scores, loss_fn, args.micro_batch_size, args.chunk_size)
        return time.perf_counter() - t0


def peak_allocated_bytes(model, rollouts, scores, loss_fn, args) -> tuple[int, str]:
    """Peak of allocated CPU tensor bytes during one step above the state before it (no gradients yet), and the
    innermost op running at that moment.

    The profiler's ``[memory]`` events are the c10 CPU allocator's allocations (+bytes) and frees (-bytes) in
    time order; their running sum is the memory allocated since the profile started, and its maximum the peak.
    """
    model.zero_grad(set_to_none=True)
    with no_gc(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update_step(model, rollouts, scores, loss_fn, args.micro_batch_size, args.chunk_size)
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    peak_ns = None
    for t, nbytes in memory:
        live += nbytes
        if live > peak:
            peak, peak_ns = live, t
    running = [e for e in events if e.name() != "[memory]" and e.start_ns() <= (peak_ns or 0) <= e.end_ns()]
    autograd = [e.name() for e in running if e.name().startswith("autograd::engine::evaluate_function")]
    where = min(running, key=lambda e: e.duration_ns()).name() if running else "?"
    where += (" in " + min(autograd, key=len).split(": ")[-1]) if autograd else " (forward)"
    model.zero_grad(set_to_none=True)
    return peak, where


def print_profile(model, rollouts, scores, loss_fn, args) -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update_step(model, rollouts, scores, loss_fn, args.micro_batch_size, args.chunk_size)
    print(f"\n### {loss_fn.name}: top ops by self CPU time (one step)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def head_only_times(model, rollouts, scores, losses, args) -> dict:
    """Time the part of the step that differs between the losses, alone: TokenStats from the (detached) last
    hidden states of the first micro-batch + loss + backward through the LM head, alternating, ``--head-repeats``
    times each. Its GRPO -> SimKO difference is SimKO's whole extra cost, measured with far less noise than the
    difference of two full steps."""
    from simko.losses import TokenStats

    rows = rollouts.rows(torch.arange(min(args.micro_batch_size, rollouts.num_rows)))
    with torch.no_grad():
        attn = rows["attention_mask"]
        out = model(
            input_ids=rows["input_ids"],
            attention_mask=attn,
            use_cache=False,
            logits_to_keep=1,
            position_ids=position_ids_from_mask(attn),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][:, rows["prompt_len"] - 1 : -1].clone()
    lm_head = model.get_output_embeddings()
    G = rollouts.group_size
    n_rows = hidden.shape[0]

    def run(loss_fn) -> float:
        h = hidden.clone().requires_grad_(True)
        lm_head.zero_grad(set_to_none=True)
        with no_gc():
            t0 = time.perf_counter()
            stats = TokenStats.from_hidden(
                h,
                lm_head,
                rows["response_tokens"],
                rows["response_mask"],
                top_k=loss_fn.top_k,
                temperature=1.0,
                chunk_size=args.chunk_size,
            )
            adv = loss_fn.compute_advantages(scores[:n_rows].view(-1, G)).reshape(-1)
            out = loss_fn(stats, old_logprobs=stats.logprobs.detach(), advantages=adv, scores=scores[:n_rows])
            out.loss.backward()
            return time.perf_counter() - t0

    for n in LOSSES:
        run(losses[n])
    times: dict[str, list[float]] = {n: [] for n in LOSSES}
    for r in range(args.head_repeats):
        for n in LOSSES if r % 2 == 0 else LOSSES[::-1]:
            times[n].append(run(losses[n]))
    model.zero_grad(set_to_none=True)
    median = {n: statistics.median(times[n]) for n in LOSSES}
    return {
        "rows": n_rows,
        "median_s": {n: round(median[n], 5) for n in LOSSES},
        "simko_extra_s": round(median["simko"] - median["grpo"], 5),
        "times_s": {n: [round(t, 5) for t in times[n]] for n in LOSSES},
    }


# ---------------------------------------------------------------------------------------------- run
def bench_model(name: str, args) -> dict:
    model, rollouts, scores, info = build_batch(name, args)
    losses = {n: build_loss(n) for n in LOSSES}  # configs/loss/{grpo,simko}.yaml defaults
    log(f"[{name}] {info}")

    if args.profile:
        for n in LOSSES:
            update_step(model, rollouts, scores, losses[n], args.micro_batch_size, args.chunk_size)
            print_profile(model, rollouts, scores, losses[n], args)

    # Memory first: these profiled steps also warm the process up (first-touch allocations, lazy init).
    peaks: dict[str, list[int]] = {n: [] for n in LOSSES}
    peak_at: dict[str, str] = {}
    for _ in range(args.memory_repeats):
        for n in LOSSES:
            nbytes, peak_at[n] = peak_allocated_bytes(model, rollouts, scores, losses[n], args)
            peaks[n].append(nbytes)
    log(f"[{name}] peak allocated MiB: " + ", ".join(f"{n} {max(peaks[n]) / MIB:.1f}" for n in LOSSES))

    for _ in range(args.warmup):
        for n in LOSSES:
            timed_step(model, rollouts, scores, losses[n], args)

    repeats = args.smollm2_repeats if name == "smollm2" and args.smollm2_repeats is not None else args.repeats
    times: dict[str, list[float]] = {n: [] for n in LOSSES}
    for r in range(repeats):
        order = LOSSES if r % 2 == 0 else LOSSES[::-1]
        for n in order:
            times[n].append(timed_step(model, rollouts, scores, losses[n], args))
        log(f"[{name}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in LOSSES))

    head = head_only_times(model, rollouts, scores, losses, args) if args.head_repeats else None

    timed = repeats > 0  # --repeats 0: memory only
    median = {n: statistics.median(times[n]) if timed else None for n in LOSSES}
    pair_ratios = [s / g for g, s in zip(times["grpo"], times["simko"])]
    peak = {n: max(peaks[n]) for n in LOSSES}
    micro_rows = min(args.micro_batch_size, rollouts.num_rows)
    full_logsoftmax = micro_rows * info["response_cols"] * info["vocab"] * 4
    return {
        **info,
        "micro_batch_rows": micro_rows,
        "chunk_size": args.chunk_size,
        "times_s": {n: [round(t, 5) for t in times[n]] for n in LOSSES},
        "median_s": {n: round(median[n], 5) if timed else None for n in LOSSES},
        "time_ratio": round(median["simko"] / median["grpo"], 4) if timed else None,
        "pair_ratio_median": round(statistics.median(pair_ratios), 4) if timed else None,
        "peak_bytes": {n: peaks[n] for n in LOSSES},
        "peak_MiB": {n: round(peak[n] / MIB, 2) for n in LOSSES},
        "peak_during": peak_at,
        "memory_ratio": round(peak["simko"] / peak["grpo"], 4),
        "full_BTV_fp32_MiB": round(full_logsoftmax / MIB, 2),
        "param_MiB": round(sum(p.numel() * p.element_size() for p in model.parameters()) / MIB, 2),
        "head_only": head,
    }


def markdown(results: list[dict]) -> str:
    head = (
        "| model | rows x resp tokens | grpo median s | simko median s | time ratio | pair ratio (median) "
        "| grpo peak MiB | simko peak MiB | memory ratio | full [B,T,V] fp32 MiB |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['rows']} x {r['response_cols']} | {_f(r['median_s']['grpo'])} "
            f"| {_f(r['median_s']['simko'])} | {_f(r['time_ratio'])} | {_f(r['pair_ratio_median'])} "
            f"| {r['peak_MiB']['grpo']:.1f} | {r['peak_MiB']['simko']:.1f} | {r['memory_ratio']:.3f} "
            f"| {r['full_BTV_fp32_MiB']:.1f} |"
        )
    heads = [r for r in results if r.get("head_only")]
    if heads:
        lines += [
            "",
            "| model | LM head + loss only: grpo median s | simko median s | SimKO extra s | extra / grpo full step |",
            "|---|---|---|---|---|",
        ]
        for r in heads:
            h = r["head_only"]
            lines.append(
                f"| {r['model']} | {h['median_s']['grpo']:.4f} | {h['median_s']['simko']:.4f} "
                f"| {h['simko_extra_s']:.4f} "
                f"| {_f(r['median_s']['grpo'] and h['simko_extra_s'] / r['median_s']['grpo'], 4)} |"
            )
    return "\n".join(lines)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny", "smollm2", "both"), default="both")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per loss (alternating); 0: memory only")
    p.add_argument("--smollm2-repeats", type=int, default=None, help="override --repeats for SmolLM2")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds (one step of each loss) before timing, after the memory steps",
    )
    p.add_argument("--memory-repeats", type=int, default=1, help="profiled steps per loss for the peak (run first)")
    p.add_argument(
        "--head-repeats",
        type=int,
        default=0,
        help="also time the LM head + loss stage alone (SimKO's extra cost), N times per loss; 0: off",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see the note above)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="SmolLM2 rollout length")
    p.add_argument("--chunk-size", type=int, default=256, help="TokenStats chunk (module.stats_chunk_size)")
    p.add_argument("--micro-batch-size", type=int, default=64, help="rows per forward/backward (as train.yaml)")
    p.add_argument("--tiny-prompts", type=int, default=16)
    p.add_argument("--tiny-group-size", type=int, default=8)
    p.add_argument("--tiny-max-new-tokens", type=int, default=8)
    p.add_argument("--smollm2-prompts", type=int, default=4)
    p.add_argument("--smollm2-group-size", type=int, default=4)
    p.add_argument("--cache-dir", default="logs/cache", help="model cache (load_tiny / load_smollm2)")
    p.add_argument("--seed", type=int, default=0, help="rollout sampling and score seed")
    p.add_argument("--profile", action="store_true", help="also print a per-op profile of one step per loss")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--out", default="logs/benchmarks/loss_step.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_repeats < 1 or args.repeats < 0 or args.warmup < 0 or args.head_repeats < 0:
        raise SystemExit("--memory-repeats must be >= 1; --repeats, --warmup, --head-repeats >= 0")
    torch.set_num_threads(args.threads)
    models = ("tiny", "smollm2") if args.model == "both" else (args.model,)
    started = time.perf_counter()
    results = [bench_model(m, args) for m in models]
    table = markdown(results)
    print(table)
    payload = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
