"""Merge the shards of one evaluation into the summary of the unsharded run.

    python -m simko.eval_merge logs/eval/runs/shard0 logs/eval/runs/shard1 ... --out logs/eval/runs/merged

Each folder is a ``simko.eval eval.shard=I/N`` run of the same config (checked: model, checkpoint, data, n,
sampling, seed, ...); together they must hold every selected problem exactly once. The merge writes
``pass_at_k.json``, ``per_problem.csv`` and ``pass_at_k.png`` into ``--out`` (a new or empty folder), built from the
per-problem records exactly as an unsharded run builds its own, so they equal that run's files (``seconds`` is the
wall time summed over the shards; the merged summary also names its ``shards``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simko.checks import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simko.eval_merge", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="the shards' run folders (simko.eval eval.shard=I/N)")
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the merged summary")
    args = parser.parse_args(argv)
    from simko.eval import write_outputs
    from simko.eval_store import summarize

    try:
        if args.out.is_symlink() or (args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir()))):
            raise ConfigError(f"--out {args.out} exists and is not an empty folder: the merge never overwrites files")
        for folder in args.folders:
            if not folder.is_dir():
                raise ConfigError(f"{folder} is not a folder")
        summary = summarize(list(args.folders), args.out, write_outputs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = "  ".join(f"pass@{k}={v:.3f}" for k, v in summary["pass_at_k"].items())
    print(f"{summary['num_problems']} problems x n={summary['n']} from {len(args.folders)} shards: {table}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
