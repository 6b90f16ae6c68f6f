"""How long verification takes on degenerate completions, in the trainer's process and in the worker pool.

    python benchmarks/verifiers.py                                   # both parts, the issue's sizes
    python benchmarks/verifiers.py --hangs 8 --completions 64 --timeout 1 --budget 2    # a quick smoke run

1. Extraction: the final-answer rules and the in-process verifiers (exact, countdown, knights_knaves,
   mini_sudoku) on adversarial completions of --chars characters (unclosed boxes, open braces, unclosed <answer>
   tags, a name followed by spaces). These run outside any timeout, so each must be fast.
2. A batch: MathVerifier on --completions completions of which --hangs hang math-verify
   (``\\boxed{9^{9^{9^{9^{9}}}}}``), with --timeout per check on 2 workers, without a batch budget and with
   --budget seconds.

Runs on older checkouts too (PYTHONPATH=<old>/src): what they lack is reported as such.
"""

from __future__ import annotations

import argparse
import time

from simko.rewards import MathVerifier, build_verifier, extract_boxed, extract_final_answer

HANG = r"\boxed{9^{9^{9^{9^{9}}}}}"


def adversarial(chars: int) -> dict[str, str]:
    return {
        "unclosed boxes": ("\\boxed{" * (chars // 7 + 1))[:chars],
        "open braces": "\\boxed{" + "{" * chars,
        "unclosed <answer>": ("<answer>" * (chars // 8 + 1))[:chars],
        "name + spaces": "<answer>Emma" + " " * chars + "x</answer>",
    }


def time_extraction(chars: int, limit_s: float) -> None:
    checks = {
        "extract_boxed": extract_boxed,
        "extract_final_answer": extract_final_answer,
        "exact": lambda t: build_verifier("exact")(t, "5"),
        "countdown": lambda t: build_verifier("countdown")(t, '{"numbers": [1, 2], "target": 3}'),
        "knights_knaves": lambda t: build_verifier("knights_knaves")(t, '{"roles": {"Emma": "knight"}}'),
        "mini_sudoku": lambda t: build_verifier("mini_sudoku")(t, '{"puzzle": [[0, 0], [0, 0]]}'),
    }
    print(f"| input ({chars} chars) | " + " | ".join(checks) + " |")
    print("|---" * (len(checks) + 1) + "|")
    for name, text in adversarial(chars).items():
        cells = []
        for check in checks.values():
            start = time.perf_counter()
            check(text)
            cells.append(f"{time.perf_counter() - start:.3f}")
            if float(cells[-1]) > limit_s:  # quadratic code: stop before it takes minutes per cell
                cells += ["skipped"] * (len(checks) - len(cells))
                break
        print(f"| {name} | " + " | ".join(cells) + " s |")


def time_batch(completions: int, hangs: int, timeout_s: float, budget_s: float) -> None:
    every = max(1, completions // max(1, hangs))
    # Non-hanging items need math-verify too (\frac{2i}{2} against i), as in a real batch.
    texts = [HANG if i % every == 0 and i // every < hangs else rf"\boxed{{\frac{{{2 * i}}}{{2}}}}"
             for i in range(completions)]  # fmt: skip
    golds = [str(i) for i in range(completions)]
    for budget in (None, budget_s):
        try:
            verifier = MathVerifier(timeout_s=timeout_s, num_workers=2, batch_timeout_s=budget)
        except TypeError:  # a checkout without batch budgets: measure it once, without
            if budget is not None:
                print(f"batch budget {budget}: not supported by this checkout")
                continue
            verifier = MathVerifier(timeout_s=timeout_s, num_workers=2)
        verifier.start()
        start = time.perf_counter()
        scores = verifier.score(texts, golds)
        elapsed = time.perf_counter() - start
        verifier.close()
        print(
            f"{completions} completions, {hangs} hangs, timeout {timeout_s:g} s, 2 workers, batch budget {budget}: "
            f"{elapsed:.1f} s; {int(sum(scores))} scored 1.0, {verifier.num_timeouts} timeouts"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--extraction-limit", type=float, default=10.0, help="stop a row after a check this slow")
    parser.add_argument("--completions", type=int, default=512)
    parser.add_argument("--hangs", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--skip-batch", action="store_true")
    args = parser.parse_args()
    time_extraction(args.chars, args.extraction_limit)
    if not args.skip_batch:
        time_batch(args.completions, args.hangs, args.timeout, args.budget)


if __name__ == "__main__":
    main()
