"""Peak memory and wall time of ``python -m simko.eval`` as the problems and n grow: memory must not grow with
n x problems (each problem's n samples are recorded and dropped before the next problem).

    python benchmarks/eval_memory.py --sizes 256x4 256x16 1024x4 --cache-dir logs/cache

Each size ``NxP`` is one evaluation of P problems x n samples in a fresh process (a new run folder under a
temporary directory); its peak resident set size is read from the kernel (``getrusage`` of the child, Linux: KiB).
Extra arguments after ``--`` go to ``simko.eval`` (e.g. ``-- model=tiny eval.diagnostics_samples=32``). Peak RSS
equal at 4 and 16 problems and growing with n only by one problem's samples is the claim; run it alone (two
cores: another job changes the wall times, not the memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)
"""


def measure(n: int, problems: int, cache_dir: str, extra: list[str], folder: Path) -> dict:
    cmd = [sys.executable, "-m", "simko.eval", f"eval.n={n}", f"eval.limit={problems}", f"paths.cache_dir={cache_dir}",
           f"hydra.run.dir={folder}", *extra]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    line = [x for x in out.stdout.splitlines() if x.startswith("MAXRSS_KIB")]
    if not line or line[0].split()[2] != "0":
        raise SystemExit(f"simko.eval failed for n={n} x {problems} problems:\n{out.stderr[-3000:]}")
    summary = json.loads((folder / "pass_at_k.json").read_text())
    return {"n": n, "problems": problems, "peak_rss_mib": int(line[0].split()[1]) / 1024, "wall_s": seconds,
            "pass@1": summary["pass_at_k"]["1"], "seconds": summary["seconds"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["256x4", "256x16", "1024x4"], help="NxP: n samples x P problems")
    ap.add_argument("--cache-dir", default="logs/cache")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(args.sizes):
            n, problems = (int(x) for x in size.lower().split("x"))
            row = measure(n, problems, args.cache_dir, extra, Path(tmp) / f"run{i}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
