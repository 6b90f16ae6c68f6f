"""The durable per-problem records of ``simko.eval`` and the summary built from them.

An evaluation writes one JSON line per problem into ``problems.jsonl`` as soon as the problem is scored (a whole
record per append, fsynced, opened without following links: :func:`simko.atomic.append`), so it holds no more than
one problem's n samples at a time and a killed run loses at most the problem it was on. ``eval_state.json`` pins
what the records depend on (the config's fingerprint, the selected problems, this folder's shard); a rerun into the
folder with the same config skips the recorded problems, and one with another config is refused.

:func:`summarize` builds ``pass_at_k.json`` and ``per_problem.csv`` from the records of one or more folders (an
unsharded run's own folder, or the shards of one evaluation: ``python -m simko.eval_merge``), always the same way,
so the merged shards equal the unsharded run. A record holds everything the summary needs: the ``per_problem.csv``
row, whether maj@n is right, the problem's solution-diversity values, its token sums of the concentration
diagnostics, its response-token, truncation and missing-answer counts and its wall time.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from simko.atomic import append, atomic_write
from simko.checks import ConfigError

RECORDS = "problems.jsonl"
STATE = "eval_state.json"
STATE_VERSION = 1
# Keys that never change a record: where files go, and which shard of the problems this call takes.
_UNFINGERPRINTED = ("paths", "hydra", "task_name")
DIVERSITY = ("distinct_correct", "solution_entropy", "solution_coverage")


def parse_shard(value) -> tuple[int, int] | None:
    """``eval.shard``: null (all problems) or ``"I/N"`` (0 <= I < N): the I-th of N contiguous ranges."""
    if value is None or value == "":
        return None
    try:
        index, count = (int(part) for part in str(value).split("/"))
    except ValueError:
        raise ConfigError(f"eval.shard={value!r}: must be I/N with integers 0 <= I < N (e.g. 0/4), or null") from None
    if not 0 <= index < count:
        raise ConfigError(f"eval.shard={value!r}: must be I/N with 0 <= I < N (e.g. 0/4)")
    return index, count


def shard_range(num_problems: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The problem indices ``[lo, hi)`` of a shard: N contiguous ranges whose sizes differ by at most one."""
    if shard is None:
        return 0, num_problems
    index, count = shard
    return index * num_problems // count, (index + 1) * num_problems // count


def fingerprint(cfg: DictConfig) -> dict:
    """Everything in the config that can change a record (model, checkpoint, data, engine, seed, eval knobs), as
    plain JSON; the checkpoint file's size and modification time stand for its contents. Interpolations are kept
    as written: what they point to is in the fingerprint too, except ``paths`` (where files go, e.g. the cache)."""
    full = OmegaConf.to_container(cfg, resolve=False)
    for key in _UNFINGERPRINTED:
        full.pop(key, None)
    full.get("eval", {}).pop("shard", None)
    ckpt = cfg.get("ckpt_path")
    if ckpt and Path(ckpt).is_file():  # a missing one: the loader's error names it
        stat = Path(ckpt).stat()
        full["ckpt_file"] = {"path": str(Path(ckpt).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return json.loads(json.dumps(full, default=str))


def _flat(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs (sorted)."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def _refuse(out_dir: Path, diff: list[str]) -> None:
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise ConfigError(
        f"run folder {out_dir} holds an evaluation with another config ({shown}): a resume must use the same "
        "config; evaluate into a new hydra.run.dir"
    )


def check_resume(out_dir: Path, fingerprint: dict) -> None:
    """Refuse, before anything is loaded, a rerun into a folder whose evaluation has another fingerprint."""
    path = out_dir / STATE
    if path.is_file() and not path.is_symlink():
        diff = differences(json.loads(path.read_text()).get("fingerprint", {}), fingerprint)
        if diff:
            _refuse(out_dir, diff)


def open_state(out_dir: Path, state: dict) -> None:
    """Write ``eval_state.json`` for a new evaluation, or check that the folder's evaluation is this one."""
    path = out_dir / STATE
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link: a run writes only into its own files")
    if path.is_file():
        old = json.loads(path.read_text())
        diff = differences(old.get("fingerprint", {}), state["fingerprint"])
        for key in ("num_problems", "shard", "range"):
            if old.get(key) != state[key]:
                diff.append(f"{key}: {old.get(key)} -> {state[key]}")
        if diff:
            _refuse(out_dir, diff)
        return
    atomic_write(path, lambda f: f.write(json.dumps(state, indent=1).encode()))


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {STATE}: not a simko.eval run folder")
    return json.loads(path.read_text())


def _complete_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every newline-terminated line of ``path``."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            yield offset, line
            offset += len(line)


def recorded_indices(out_dir: Path) -> set[int]:
    """The problems already recorded in this (own, claimed) folder; a record a kill cut short is removed first."""
    path = out_dir / RECORDS
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link: a run writes only into its own files")
    if not path.is_file():
        return set()
    done, end = set(), 0
    for offset, line in _complete_lines(path):
        done.add(int(json.loads(line)["index"]))
        end = offset + len(line)
    if end != path.stat().st_size:  # a torn last record (killed mid-append): drop it, it is sampled again
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
    return done


def write_record(out_dir: Path, record: dict) -> None:
    append(out_dir / RECORDS, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def summarize(folders: list[Path], out_dir: Path, write_outputs) -> dict:
    """``pass_at_k.json`` and ``per_problem.csv`` (through ``write_outputs(summary, rows, out_dir)``) from the
    records of ``folders``, which together must hold every selected problem exactly once, under one config."""
    from simko.diagnostics import concentration_over_ranks
    from simko.metrics.cover import DEFAULT_TAUS
    from simko.metrics.pass_at_k import pass_at_k_tensor
    from simko.metrics.uncertainty import DEFAULT_RESAMPLES, summarize_counts

    states = [read_state(folder) for folder in folders]
    first = states[0]
    for folder, state in zip(folders[1:], states[1:]):
        diff = differences(first["fingerprint"], state["fingerprint"])
        if diff or state["num_problems"] != first["num_problems"]:
            raise ConfigError(f"{folder} is another evaluation than {folders[0]} ({'; '.join(diff[:3])}): not merged")
    index: dict[int, tuple[Path, int, dict]] = {}  # problem -> (records file, offset, the record's small fields)
    for folder in folders:
        path = Path(folder) / RECORDS
        if path.is_file():
            for offset, line in _complete_lines(path):
                record = json.loads(line)
                i = int(record["index"])
                if i in index:
                    raise ConfigError(f"problem {i} is recorded in both {index[i][0].parent} and {folder}: not merged")
                record.pop("row")
                index[i] = (path, offset, record)
    total = int(first["num_problems"])
    missing = [i for i in range(total) if i not in index]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {total} problems are not recorded in {', '.join(map(str, folders))} (first: "
            f"{missing[0]}): finish or rerun those shards (same command, same hydra.run.dir) before merging"
        )
    order = sorted(index)
    small = [index[i][2] for i in order]
    ev = first["fingerprint"]["eval"]
    n = int(ev["n"])
    ks = sorted(int(k) for k in first["ks"])
    counts = torch.tensor([r["c"] for r in small], dtype=torch.int64)
    diversity = {}
    for name in DIVERSITY:
        values = torch.tensor([r["diversity"][name] for r in small], dtype=torch.float64)
        values = values[~torch.isnan(values)]
        diversity[name] = float(values.mean()) if values.numel() else float("nan")
    uncertainty = summarize_counts(  # 95 % bootstrap intervals over problems; cover@tau (simko.metrics.cover)
        [counts.tolist()], n, ks, ev.get("cover_taus") or DEFAULT_TAUS,
        resamples=int(ev.get("bootstrap_resamples") or DEFAULT_RESAMPLES), seed=int(ev.get("bootstrap_seed") or 0),
    )  # fmt: skip
    num_samples = total * n
    summary = {
        "pass_at_k": {str(k): float(pass_at_k_tensor(counts, n, k).mean()) for k in ks},
        **{key: uncertainty[key] for key in ("pass_at_k_ci95", "cover_at_tau", "cover_at_tau_ci95", "bootstrap")},
        "mean@n": float(counts.double().mean() / n),
        "maj@n": sum(r["majority_correct"] for r in small) / total,
        "n": n,
        "num_problems": total,
        "diagnostics": concentration_over_ranks(_summed(small, "diagnostic_sums")),
        "diversity": diversity,  # distinct correct solutions, their entropy and coverage (n samples)
        "response_tokens": sum(r["response_tokens"] for r in small) / num_samples,  # mean length, EOS included
        "truncated_frac": sum(r["truncated"] for r in small) / num_samples,  # no EOS within eval.max_new_tokens
        # no final answer by the verifier's own rule (math: no complete \boxed{}; it then falls back to
        # math-verify's extraction from the text, so such a sample can still score)
        "no_final_answer_frac": sum(r["no_final_answer"] for r in small) / num_samples,
        # wall time summed over problems (and shards): generate, score (the verifiers), diagnostics (their forward)
        "seconds": _summed(small, "seconds"),
        "config": first["config"],
    }
    if len(folders) > 1:
        summary["shards"] = [str(Path(f).resolve()) for f in folders]
    write_outputs(summary, _rows(index, order), out_dir)
    return summary


def _summed(records: list[dict], key: str) -> dict[str, float]:
    """The records' ``key`` dicts summed by name, in problem order: the same float sums for any sharding."""
    total: dict[str, float] = {}
    for record in records:
        for name, value in record[key].items():
            total[name] = total.get(name, 0.0) + value
    return total


def _rows(index: dict[int, tuple[Path, int, dict]], order: list[int]) -> Iterator[dict]:
    """The ``per_problem.csv`` rows in problem order, read one at a time from the records files."""
    handles: dict[Path, object] = {}
    try:
        for i in order:
            path, offset, _ = index[i]
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            f.seek(offset)
            yield json.loads(f.readline())["row"]
    finally:
        for f in handles.values():
            f.close()


def write_csv(rows, path: Path, columns: list[str]) -> None:
    def write(f) -> None:
        import io

        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        text.flush()
        text.detach()

    atomic_write(path, write)
