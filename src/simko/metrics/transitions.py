"""Per-problem transitions against a baseline: which problems a run solves that the baseline does not, and back.

A mean pass@k can stay put while problems change hands. Matching two evaluations of the same held-out problems
by id, each problem is solved or unsolved in each run by a criterion, and the four counts say where it went:

- ``pass@k>=0.5``: the problem's unbiased pass@k is at least 0.5 (k samples solve it more often than not);
- ``c>0``: at least one of its n samples is correct (the reasoning boundary at the sample budget n).

``newly_solved`` are solved by the run and not by the baseline, ``newly_unsolved`` the reverse; ``net`` is their
difference. The two runs may have different n; k goes up to the smaller one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simko.metrics.uncertainty import per_problem_pass_at_k

COLUMNS = ["criterion", "k", "solved_both", "newly_solved", "newly_unsolved", "unsolved_both", "net", "problems"]


def read_counts(run: str | Path) -> tuple[list[str], np.ndarray, int]:
    """Problem ids, correct counts and n of an evaluation folder's ``per_problem.csv`` (``simko.eval``)."""
    import pandas as pd

    path = Path(run) / "per_problem.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: per-problem counts come from a simko.eval run folder")
    frame = pd.read_csv(path, usecols=["id", "c", "n"], dtype={"id": str})
    if frame.empty:
        raise ValueError(f"{path} holds no problems")
    ns = set(frame["n"].astype(int))
    if len(ns) != 1:
        raise ValueError(f"{path}: problems sampled with different n ({sorted(ns)}); one evaluation has one n")
    ids = frame["id"].tolist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: problem ids repeat, so problems cannot be matched by id")
    return ids, frame["c"].to_numpy(dtype=np.int64), ns.pop()


def align(ids: Sequence[str], base_ids: Sequence[str], where: str = "run", base_where: str = "baseline") -> np.ndarray:
    """Index into ``ids`` of each of ``base_ids``: both runs must hold the same problems."""
    position = {pid: i for i, pid in enumerate(ids)}
    missing = [pid for pid in base_ids if pid not in position]
    extra = sorted(set(ids) - set(base_ids))
    if missing or extra:
        raise ValueError(
            f"{where} and {base_where} evaluated different problems: {len(missing)} only in {base_where} "
            f"(e.g. {missing[:3]}), {len(extra)} only in {where} (e.g. {extra[:3]})"
        )
    return np.array([position[pid] for pid in base_ids])


def transitions(
    counts: np.ndarray, n: int, base_counts: np.ndarray, base_n: int, ks: Sequence[int] | None = None
) -> list[dict]:
    """One row (``COLUMNS``) per criterion: ``pass@k>=0.5`` for each k of ``ks`` (default 1, 2, 4, ..., up to the
    smaller n, and that n), then ``c>0``. ``counts[i]`` and ``base_counts[i]`` are the same problem's."""
    counts, base_counts = np.asarray(counts), np.asarray(base_counts)
    if counts.shape != base_counts.shape:
        raise ValueError(f"transitions need the same problems in both runs, got {counts.shape} and {base_counts.shape}")
    top = min(int(n), int(base_n))
    if ks is None:
        from simko.metrics.passk_metric import default_ks

        ks = default_ks(top)
    bad = [k for k in ks if not 1 <= int(k) <= top]
    if bad:
        raise ValueError(f"transitions at k={bad}: k must be in [1, {top}] (the smaller n of the two runs)")
    # A tolerance: pass@1 of c = 2 of n = 4 is 0.5 exactly, and 0.49999999999999994 in the product form's floats.
    solved = per_problem_pass_at_k(counts, n, ks) >= 0.5 - 1e-12
    base_solved = per_problem_pass_at_k(base_counts, base_n, ks) >= 0.5 - 1e-12
    rows = [_row("pass@k>=0.5", int(k), solved[:, j], base_solved[:, j]) for j, k in enumerate(ks)]
    rows.append(_row("c>0", None, counts > 0, base_counts > 0))
    return rows


def _row(criterion: str, k: int | None, solved: np.ndarray, base: np.ndarray) -> dict:
    row = {
        "criterion": criterion,
        "k": k,
        "solved_both": int((solved & base).sum()),
        "newly_solved": int((solved & ~base).sum()),
        "newly_unsolved": int((~solved & base).sum()),
        "unsolved_both": int((~solved & ~base).sum()),
        "problems": int(len(solved)),
    }
    row["net"] = row["newly_solved"] - row["newly_unsolved"]
    return {key: row[key] for key in COLUMNS}


def run_transitions(run: str | Path, baseline: str | Path, ks: Sequence[int] | None = None) -> list[dict]:
    """``transitions`` of two ``simko.eval`` folders, their problems matched by id."""
    ids, counts, n = read_counts(run)
    base_ids, base_counts, base_n = read_counts(baseline)
    order = align(ids, base_ids, str(run), str(baseline))
    return transitions(counts[order], n, base_counts, base_n, ks)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (what ``python -m simko.plot transitions`` prints)."""
    cells = [[str(r[c]) if r[c] is not None else "n" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
