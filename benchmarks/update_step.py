#!/usr/bin/env python
"""Benchmark the update's memory and speed knobs on one RL step's batch (a script, not a test).

Sides are settings of the update (``configs/train.yaml: module.*``), compared on the same rollout batch:

    padded     rows in micro-batches of 8 (one group), each padded to its longest row, the prompt shared
    auto       module.padding_free=auto: per micro-batch, packed (prompt once, responses packed) where cheaper
    ckpt_auto  the same with module.gradient_checkpointing
    ckpt64     module.gradient_checkpointing, all 64 rows in one padded micro-batch (does it fit in 24 GB?)

``--side LABEL=SPEC`` (repeatable) replaces the default sides (``DEFAULT_SIDES``). SPEC is comma-separated:
``mbs=N`` (rows per micro-batch), ``tokens=N`` (token budget), ``ckpt``, ``packed``, ``auto``
(``padding_free=auto``), ``noshare`` (no shared prompt), e.g.
``--side padded8=mbs=8 --side all=ckpt,tokens=4096,packed``.

One step is the update of ``RLVRModule.training_step`` with 1 PPO epoch, 1 mini-batch, the diagnostics off and
no optimizer step (``zero_grad`` then :func:`simko.update.accumulate_gradients`: forward, loss and backward of
every micro-batch), with GRPO (``--loss``).

The batch (``--lengths``):
* ``sampled``: SmolLM2-135M-Instruct's own samples, temperature 1, on the first ``--prompts`` GSM8K
  train questions (``$SIMKO_DATA_DIR/gsm8k/train.jsonl``, the gsm8k_train template, chat template) x
  ``--group-size``, ``--max-new-tokens``; sampled once with the HF engine (seed ``--seed``) and kept in
  ``--batch-file`` (token ids, JSON; ``benchmarks/data/update_batch_smollm2_8x8x128.json`` is in the
  repository), which later runs reuse;
* ``longtail`` (default): the same prompts, responses of random tokens with log-normal lengths of mean 35 % of
  the maximum (sd 0.8 in log space, clipped to 1 ... max; the longest row is the maximum);
* ``uniform``: the same prompts, every response ``--max-new-tokens`` random tokens (no padding to remove).

Time: the sides alternate in ONE process, the order rotating every repeat, so a slow-down of the machine hits
all; reported are each side's median step time and the ratio of each side's median to the first side's.

Memory, per side in a fresh subprocess (unless ``--no-memory``): the model and batch are loaded, then the peak RSS
of the first step above the RSS before it (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``;
a later step would start from an RSS that keeps what the allocator did not return) and the peak of allocated CPU
tensor bytes of a second step (``torch.profiler`` memory events, as ``benchmarks/loss_step.py``; allocations made
outside c10 are not counted).

``--per-token``: the bytes per token of one micro-batch's forward + backward with and without gradient
checkpointing (profiler peak of packed micro-batches of several token counts, least-squares slope), for the
extrapolation in docs/scaling.md.

    python benchmarks/update_step.py --threads 2                      # long-tailed lengths, the default sides
    python benchmarks/update_step.py --lengths uniform --threads 2
    python benchmarks/update_step.py --per-token --repeats 0 --no-memory

Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

from loss_step import GSM8K_TEMPLATE, gsm8k_examples, mixed_scores, no_gc  # noqa: E402
from simko.data import render_prompt  # noqa: E402
from simko.forward import disable_checkpointing, enable_checkpointing, rollout_token_stats  # noqa: E402
from simko.losses import build_loss  # noqa: E402
from simko.rollout import build_rollouts, eos_ids  # noqa: E402
from simko.update import UpdateHooks, UpdateSchedule, accumulate_gradients  # noqa: E402

MIB = 2**20
DEFAULT_SIDES = ["padded=mbs=8", "auto=auto,mbs=8", "ckpt_auto=ckpt,auto,mbs=8", "ckpt64=ckpt,mbs=64"]


# ---------------------------------------------------------------------------------------------- the batch
def load_model(args):
    if args.model == "smollm2":
        from simko.models import load_smollm2

        return load_smollm2(cache_dir=args.cache_dir)
    from simko.models import load_tiny

    return load_tiny(cache_dir=args.cache_dir)


def batch_ids(model, tok, args) -> dict:
    """Prompt and response token ids of the batch (``--lengths``); the sampled ones are cached in --batch-file."""
    examples, origin = gsm8k_examples(args.prompts)
    prompts = [render_prompt(ex, tok, GSM8K_TEMPLATE, use_chat_template=None) for ex in examples]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    key = dict(model=args.model, prompts=args.prompts, G=args.group_size, max_new=args.max_new_tokens, seed=args.seed)
    path = Path(args.batch_file)
    if args.lengths == "sampled":
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["key"] == key:
                return saved
            raise SystemExit(f"{path} holds the batch of {saved['key']}, not {key}: pass another --batch-file")
        from simko.engines.hf import generate_rollouts

        model.eval()
        t0 = time.perf_counter()
        r = generate_rollouts(
            model, tok, prompts, args.group_size, args.max_new_tokens, temperature=1.0, top_p=1.0, seed=args.seed
        )
        lengths = r.response_mask.sum(1).tolist()
        # Tokens up to and with the EOS, or all max_new_tokens when truncated (build_rollouts finds the EOS again).
        responses = [row[:n].tolist() for row, n in zip(r.response_tokens, lengths)]
        saved = dict(key=key, prompt_ids=prompt_ids, response_ids=responses, origin=origin,
                     generate_s=round(time.perf_counter() - t0, 1))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved))
        return saved
    gen = torch.Generator().manual_seed(args.seed)
    n = args.prompts * args.group_size
    M = args.max_new_tokens
    if args.lengths == "uniform":
        lengths = [M] * n
    else:  # long-tailed, mean 35 % of the maximum
        mu = torch.log(torch.tensor(0.35 * M)) - 0.8**2 / 2
        raw = torch.exp(mu + 0.8 * torch.randn(n, generator=gen))
        lengths = raw.round().clamp(1, M).long().tolist()
        lengths[int(torch.argmax(raw))] = M
    eos = eos_ids(model, tok)
    vocab = model.get_output_embeddings().weight.shape[0]
    ordinary = torch.tensor([t for t in range(min(vocab, 20000)) if t not in eos and t not in tok.all_special_ids])
    responses = []
    for length in lengths:
        body = ordinary[torch.randint(len(ordinary), (length,), generator=gen)].tolist()
        responses.append(body if length == M else body[:-1] + [eos[0]])
    return dict(key=key, prompt_ids=prompt_ids, response_ids=responses, origin=origin + f", {args.lengths} lengths")


def build_batch(args):
    model, tok = load_model(args)
    ids = batch_ids(model, tok, args)
    model.train()  # as in the update (dropout is 0)
    rollouts = build_rollouts(tok, ids["prompt_ids"], ids["response_ids"], args.group_size, eos_ids(model, tok))
    scores = mixed_scores(args.prompts, args.group_size, args.seed)
    lengths = rollouts.response_mask.sum(1)
    tokens = rollouts.attention_mask.sum(1)
    info = {
        "model": args.model,
        "lengths": args.lengths,
        "prompt_source": ids["origin"],
        "rows": rollouts.num_rows,
        "max_new_tokens": args.max_new_tokens,
        "prompt_cols": rollouts.prompt_len,
        "response_cols": rollouts.response_mask.shape[1],
        "response_tokens_mean": round(float(lengths.float().mean()), 1),
        "response_mean_frac_of_max": round(float(lengths.float().mean()) / args.max_new_tokens, 3),
        "truncated_rows": int((lengths == args.max_new_tokens).sum()),
        "tokens_total": int(tokens.sum()),
        "tokens_padded": int(rollouts.attention_mask.numel()),
        "generate_s": ids.get("generate_s"),
    }
    return model, rollouts, scores, info


# ---------------------------------------------------------------------------------------------- one step
def parse_side(text: str) -> tuple[str, dict]:
    label, _, spec = text.partition("=")
    side = dict(mbs=64, tokens=None, ckpt=False, packed=False, share=True)
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name in ("mbs", "tokens"):
            side[name] = int(value)
        elif name in ("ckpt", "packed"):
            side[name] = True
        elif name == "auto":
            side["packed"] = "auto"
        elif name == "noshare":
            side["share"] = False
        else:
            raise SystemExit(f"--side {text}: unknown knob {name!r} (mbs=N, tokens=N, ckpt, packed, auto, noshare)")
    return label, side


def schedule_of(side: dict) -> UpdateSchedule:
    return UpdateSchedule(micro_batch_size=side["mbs"], micro_batch_tokens=side["tokens"], share_prompt=side["share"])


def start_step(model, rollouts, scores, loss_fn, side: dict) -> torch.Tensor:
    """Checkpointing on or off as the side says, gradients cleared; the step's advantages [rows]."""
    if side["ckpt"]:
        enable_checkpointing(model)
    else:
        disable_checkpointing(model)
    model.zero_grad(set_to_none=True)
    return loss_fn.compute_advantages(scores.view(-1, rollouts.group_size)).reshape(-1)


def update_step(model, rollouts, scores, loss_fn, side: dict, chunk_size: int) -> float:
    advantages = start_step(model, rollouts, scores, loss_fn, side)
    metrics: dict[str, float] = defaultdict(float)
    hooks = UpdateHooks(
        lambda rows, top_k: rollout_token_stats(
            model, rows, top_k, 1.0, chunk_size, share_prompt=side["share"], padding_free=side["packed"]
        )
    )
    rows = torch.arange(rollouts.num_rows)
    accumulate_gradients(loss_fn, rollouts, scores, advantages, rows, hooks, schedule_of(side), metrics)
    return metrics["loss"]


def flop_count(model, rollouts, side: dict) -> dict:
    """What a side computes, counted from its micro-batches (no timing, so independent of the machine's load):
    token positions through the blocks, attention score entries (queries x keys of each dense attention call:
    sdpa with a mask computes all of them, a packed sequence's block-diagonal mask included), LM-head positions,
    and the FLOPs of one step (:func:`simko.forward.forward_flops`; backward twice the forward; checkpointing
    adds the blocks' forward). ``packed="auto"`` counts the choice the forward makes per micro-batch."""
    from simko.forward import forward_counts, forward_flops, packing_is_cheaper
    from simko.update import split_rows

    micro = split_rows(torch.arange(rollouts.num_rows), rollouts, schedule_of(side), UpdateHooks(None))
    positions = scores = head = flops = chosen = 0
    for idx in micro:
        rows = rollouts.rows(idx)
        packed = side["packed"]
        if packed == "auto":
            packed = packing_is_cheaper(model, rows, side["share"])
        chosen += bool(packed)
        n_pos, n_scores, n_head = forward_counts(model, rows, side["share"], bool(packed))
        positions, scores, head = positions + n_pos, scores + n_scores, head + n_head
        forward = forward_flops(model, rows, side["share"], bool(packed))
        head_flops = 2 * model.config.vocab_size * model.config.hidden_size * n_head
        flops += 3 * forward + ((forward - head_flops) if side["ckpt"] else 0)
    return dict(micro_batches=len(micro), packed_micro_batches=chosen, positions=positions, score_entries=scores,
                head_positions=head, step_TFLOP=round(flops / 1e12, 3))  # fmt: skip


def timed_step(model, rollouts, scores, loss_fn, side, args) -> float:
    with no_gc():
        t0 = time.perf_counter()
        update_step(model, rollouts, scores, loss_fn, side, args.chunk_size)
        return time.perf_counter() - t0


def profiled_peak(fn) -> int:
    """Peak of allocated CPU tensor bytes while ``fn`` runs (the running sum of the allocator's events)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with no_gc(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_of_side(args) -> None:
    """(In a fresh subprocess) the peak RSS of the first step above the RSS before it, then the peak allocated
    bytes of a second step."""
    model, rollouts, scores, _ = build_batch(args)
    loss_fn = build_loss(args.loss)
    label, side = parse_side(args.memory_side)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    update_step(model, rollouts, scores, loss_fn, side, args.chunk_size)
    rss_peak = (rss_kib("VmHWM") - before) * 1024
    model.zero_grad(set_to_none=True)
    allocated = profiled_peak(lambda: update_step(model, rollouts, scores, loss_fn, side, args.chunk_size))
    print("MEMORY " + json.dumps(dict(label=label, rss_peak_bytes=rss_peak, allocated_peak_bytes=allocated)))


def memory_subprocess(side_text: str, argv: list[str], timeout: int) -> dict:
    cmd = [sys.executable, __file__, *argv, "--memory-side", side_text]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return dict(label=side_text.partition("=")[0], error=f"exit {proc.returncode}: {tail}")


def per_token(model, rollouts, scores, loss_fn, args) -> dict:
    """Profiler peak of one packed micro-batch of the first n rows (several n), with and without checkpointing;
    the least-squares slope in bytes per token."""
    tokens = rollouts.attention_mask.sum(1)
    out = {}
    for ckpt in (False, True):
        points = []
        for n in args.per_token_rows:
            n = min(n, rollouts.num_rows)
            side = dict(mbs=n, tokens=None, ckpt=ckpt, packed=True, share=False)
            sub_rows = torch.arange(n)

            def step(side=side, sub_rows=sub_rows):
                adv = start_step(model, rollouts, scores, loss_fn, side)
                # The LM head's chunk at args.chunk_size positions whatever the rows (packing multiplies it by
                # the rows): its logits are the same size at every point, so the slope is the blocks' alone.
                chunk = max(1, args.chunk_size // side["mbs"])
                hooks = UpdateHooks(lambda rows, k: rollout_token_stats(model, rows, k, 1.0, chunk,
                                                                        padding_free=True))  # fmt: skip
                accumulate_gradients(loss_fn, rollouts, scores, adv, sub_rows, hooks,
                                     UpdateSchedule(micro_batch_size=side["mbs"]), defaultdict(float))  # fmt: skip

            step()
            model.zero_grad(set_to_none=True)
            points.append((int(tokens[:n].sum()), profiled_peak(step)))
            model.zero_grad(set_to_none=True)
        xs, ys = zip(*points)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x in xs), 1)
        out["checkpointing" if ckpt else "plain"] = dict(points=points, bytes_per_token=round(slope))
    return out


# ---------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--lengths", choices=["sampled", "longtail", "uniform"], default="longtail")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="grpo")
    p.add_argument("--side", action="append", default=None, help="LABEL=SPEC, repeatable (see the docstring)")
    p.add_argument("--repeats", type=int, default=5, help="0: count and measure memory only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory subprocesses")
    p.add_argument("--memory-timeout", type=int, default=1800)
    p.add_argument("--per-token", action="store_true")
    p.add_argument("--per-token-rows", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--cache-dir", default="logs/cache")
    p.add_argument(
        "--batch-file", default=None, help="default: benchmarks/data/update_batch_<model>_<P>x<G>x<max>.json"
    )
    p.add_argument("--out", default="logs/benchmarks/update_step.json")
    p.add_argument("--memory-side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_file is None:
        name = f"update_batch_{args.model}_{args.prompts}x{args.group_size}x{args.max_new_tokens}.json"
        args.batch_file = str(Path(__file__).resolve().parent / "data" / name)
    if args.memory_side is not None:
        return memory_of_side(args)
    side_texts = args.side or DEFAULT_SIDES
    sides = dict(parse_side(t) for t in side_texts)

    model, rollouts, scores, info = build_batch(args)
    log(f"batch: {info}")
    flops = {label: flop_count(model, rollouts, side) for label, side in sides.items()}
    log(f"counted: {flops}")
    loss_fn = build_loss(args.loss)
    losses = {}
    for label, side in sides.items():  # warm-up; the sides' losses agree (the knobs are exact)
        for _ in range(args.warmup):
            losses[label] = update_step(model, rollouts, scores, loss_fn, side, args.chunk_size)
    log(f"losses: {losses}")
    times: dict[str, list[float]] = {label: [] for label in sides}
    labels = list(sides)
    for r in range(args.repeats):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            times[label].append(timed_step(model, rollouts, scores, loss_fn, sides[label], args))
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    result = dict(info, sides=sides, counted=flops, losses=losses, times_s=times)
    if args.repeats:
        median = {k: statistics.median(v) for k, v in times.items()}
        result["median_s"] = median
        result["time_ratio_to_first"] = {k: round(v / median[labels[0]], 4) for k, v in median.items()}
    if not args.no_memory:
        child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        child_argv = strip_flags(child_argv, ("--side", "--out", "--repeats", "--warmup", "--per-token-rows"))
        child_argv = [a for a in child_argv if a not in ("--per-token", "--no-memory")]
        child_argv += ["--batch-file", args.batch_file]
        result["memory"] = {}
        for text in side_texts:
            mem = memory_subprocess(text, child_argv, args.memory_timeout)
            result["memory"][mem["label"]] = mem
            log(f"memory: {mem}")
    if args.per_token:
        result["per_token"] = per_token(model, rollouts, scores, loss_fn, args)
        log(f"per token: {result['per_token']}")
    result["machine"] = dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__)
    result["command"] = " ".join([sys.executable, *sys.argv])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given flags and their values (``--flag v`` and ``--flag=v``; nargs+ values too)."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = False
        if a.split("=")[0] in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['rows']} rows, {result['lengths']} lengths (mean "
        f"{result['response_tokens_mean']} of {result['max_new_tokens']} response tokens), "
        f"{result['tokens_total']} tokens ({result['tokens_padded']} padded)",
        "",
        "| side | knobs | micro-batches | positions | score entries | step TFLOP | median s | time ratio | "
        "peak RSS MiB | peak allocated MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, side in result["sides"].items():
        mem = result.get("memory", {}).get(label, {})
        median = result.get("median_s", {}).get(label)
        ratio = result.get("time_ratio_to_first", {}).get(label)
        knobs = ", ".join(f"{k}={v}" for k, v in side.items() if v not in (None, False))
        rss = f"{mem['rss_peak_bytes'] / MIB:.0f}" if "rss_peak_bytes" in mem else mem.get("error", "-")[:40]
        alloc = f"{mem['allocated_peak_bytes'] / MIB:.0f}" if "allocated_peak_bytes" in mem else "-"
        c = result["counted"][label]
        lines.append(f"| {label} | {knobs} | {c['micro_batches']} | {c['positions']} | {c['score_entries']} | "
                     f"{c['step_TFLOP']} | {median if median is None else round(median, 3)} | {ratio} | {rss} | "
                     f"{alloc} |")  # fmt: skip
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
