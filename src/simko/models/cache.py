"""Build a checkpoint folder once, atomically, and share it between runs and between the ranks of one run.

A cache entry is a plain folder (``save_pretrained`` output). It only ever appears complete: the builder writes
into a hidden temporary sibling and renames it into place, so an interrupted build leaves no half-written entry
that a later run would mistake for a good one. Under data parallelism only the local rank 0 process builds; the
other ranks wait for the folder to appear. Ranks on other nodes with a shared filesystem may build too; the
first rename wins and the others drop their copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "logs/cache"


def is_builder_rank() -> bool:
    """True in the process that should build caches: LOCAL_RANK (else RANK) unset or 0."""
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    return int(rank) == 0


def build_once(
    target: str | Path,
    build: Callable[[Path], None],
    rebuild: bool = False,
    wait_timeout_s: float = 3600.0,
    poll_s: float = 2.0,
) -> Path:
    """Make sure the folder ``target`` exists, calling ``build(tmp_dir)`` to fill it if it does not.

    ``build`` writes everything into the empty folder it is given; that folder is then renamed to ``target``.
    ``rebuild=True`` replaces an existing entry (builder rank only).
    """
    target = Path(target)
    if not is_builder_rank():
        return _wait_for(target, wait_timeout_s, poll_s)
    if target.is_dir() and not rebuild:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        if rebuild and target.is_dir():
            # Move the old entry aside first: a rename onto a non-empty folder fails.
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("cache %s was written by another process meanwhile; using that one", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target


def _wait_for(target: Path, timeout_s: float, poll_s: float) -> Path:
    start = time.monotonic()
    if not target.is_dir():
        log.info("waiting for local rank 0 to build %s", target)
    while not target.is_dir():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for local rank 0 to build the cache {target}, and it never appeared. "
                "Check rank 0's log for an error, or build the cache beforehand in one process "
                "(e.g. `python -m simko.sft` for model=tiny) and launch again."
            )
        time.sleep(poll_s)
    return target
