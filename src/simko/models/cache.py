"""Build a checkpoint folder once, atomically, and share it between runs and between the ranks of one run.

A cache entry is a plain folder (``save_pretrained`` output). It only ever appears complete: the builder writes
into a hidden temporary sibling and renames it into place, so an interrupted build leaves no half-written entry
that a later run would mistake for a good one. The builder holds a file lock (``filelock``: a file beside the
entry, removed before release) while it builds: a second builder of the same entry (another run started at the
same time) waits for it and then reuses its entry, and the other ranks of a run (only the local rank 0 builds)
wait on the lock instead of polling. A killed builder releases the lock with its process; the temporary folder
it leaves is removed by the next builder in that cache folder, once no live process owns it (its name carries
the builder's pid and host). Ranks on other nodes with a shared filesystem that does not share locks may build
too; the first rename wins and the others drop their copy.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "logs/cache"

# Temporary build folders and entries moved aside for a rebuild: ".<entry>.tmp-<pid>@<host>-<hex>" and
# ".<entry>.old-<pid>@<host>-<hex>" (folders written before the "@<host>" part existed have none).
_WORK_FOLDER = re.compile(r"\..+\.(?:tmp|old)-(?P<pid>\d+)(?:@(?P<host>[^/]*))?-[0-9a-f]{8}")


def is_builder_rank() -> bool:
    """True in the process that should build caches: the local rank 0 of its node. The local rank is
    ``LOCAL_RANK`` (Lightning, torchrun), else srun's ``SLURM_LOCALID``, else ``RANK``; unset: 0."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "RANK"):
        if os.environ.get(var, "") != "":
            return int(os.environ[var]) == 0
    return True


def build_once(
    target: str | Path,
    build: Callable[[Path], None],
    rebuild: bool = False,
    wait_timeout_s: float = 3600.0,
    poll_s: float = 2.0,
) -> Path:
    """Make sure the folder ``target`` exists, calling ``build(tmp_dir)`` to fill it if it does not.

    ``build`` writes everything into the empty folder it is given; that folder is then renamed to ``target``.
    ``rebuild=True`` replaces an existing entry (builder rank only). Other ranks wait up to ``wait_timeout_s``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_builder_rank():
        return _wait_for(target, wait_timeout_s, poll_s)
    remove_orphaned_work_folders(target.parent)
    if target.is_dir() and not rebuild:
        return target
    try:
        with _locked(target, wait_timeout_s):
            if target.is_dir() and not rebuild:
                log.info("cache %s was built by another process meanwhile; using it", target)
                return target
            _build(target, build, rebuild)
    except Timeout:
        raise TimeoutError(f"waited {wait_timeout_s:.0f} s for another process building the cache {target}") from None
    return target


def _build(target: Path, build: Callable[[Path], None], rebuild: bool) -> None:
    tmp = target.parent / f".{target.name}.tmp-{_owner()}"
    tmp.mkdir()
    try:
        build(tmp)
        if rebuild and target.is_dir():
            # Move the old entry aside first: a rename onto a non-empty folder fails.
            old = target.parent / f".{target.name}.old-{_owner()}"
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


def remove_orphaned_work_folders(cache_dir: str | Path) -> list[Path]:
    """Delete the temporary build folders in ``cache_dir`` whose builder process is gone (killed mid-build).

    A folder is kept if its builder runs on another host or is still alive here: only folders no live builder
    can be writing are removed. Returns the removed folders.
    """
    removed = []
    host = socket.gethostname()
    for path in Path(cache_dir).iterdir():
        match = _WORK_FOLDER.fullmatch(path.name)
        if not match or not path.is_dir() or match["host"] not in (None, host) or _alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a build that was killed", path)
        removed.append(path)
    return removed


def _wait_for(target: Path, timeout_s: float, poll_s: float) -> Path:
    """Wait until local rank 0 has built ``target``: on its lock while it builds, in ``poll_s`` steps before."""
    deadline = time.monotonic() + timeout_s
    if not target.is_dir():
        log.info("waiting for local rank 0 to build %s", target)
    while not target.is_dir():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for local rank 0 to build the cache {target}, and it never appeared. "
                "Check rank 0's log for an error, or build the cache beforehand in one process "
                "(e.g. `python -m simko.sft` for model=tiny) and launch again."
            )
        try:
            with _locked(target, remaining):  # blocks for as long as the builder holds it
                pass
        except Timeout:
            continue
        if not target.is_dir():  # the builder has not taken the lock yet
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return target


@contextmanager
def _locked(target: Path, timeout_s: float) -> Iterator[None]:
    """Hold the lock of ``target`` (a file beside it), and remove that file before letting go.

    Removing it while still holding it is safe: a process waiting on the removed file finds it unlinked once it
    gets the lock and locks a new file instead (filelock >= 4.3 checks this). So no lock file stays behind.
    """
    path = target.parent / f".{target.name}.lock"
    with FileLock(path).acquire(timeout=timeout_s):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
