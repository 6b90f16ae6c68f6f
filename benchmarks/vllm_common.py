"""What the vLLM benchmark scripts share: the run's environment record and the JSON/table output."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment(script: str, argv) -> dict:
    """The command line, library versions, machine and load average of this run."""
    import torch
    import vllm

    return {
        "command": " ".join([f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "machine": platform.processor() or platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(payload: dict, table: list[str], out: str) -> None:
    """Print the Markdown table and write ``payload`` (with the table) as JSON to ``out``."""
    print("\n".join(table))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "table": "\n".join(table)}, indent=2) + "\n")
    log(f"wrote {path}")
