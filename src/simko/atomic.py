"""Files that are either complete or absent: write beside the target, fsync, rename.

``os.replace`` is atomic only within one filesystem, so the temporary file is a hidden sibling of the target
(never in ``$TMPDIR``: Lightning's own checkpoint save goes through fsspec, whose temporary file is in
``$TMPDIR``, and with ``TMPDIR=/dev/shm`` a kill during the final copy left a truncated checkpoint). A kill or a
full disk at any moment leaves the old target untouched and, at worst, a temporary file whose name marks it as
ours (``.<name>.simko-tmp-<pid>-<hex>``); :func:`remove_orphans` deletes those when the run that owns the folder
starts again.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".simko-tmp-"
PENDING_SUFFIX = ".simko-pending"


def temp_path(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary sibling of ``target``, fsync it and rename it onto ``target``.

    On any error (ENOSPC included) the temporary file is removed and the error re-raised; ``target`` is then
    exactly what it was before.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def append(path: str | Path, data: bytes) -> None:
    """Append ``data`` (whole records) to ``path`` and fsync: all of it, or nothing.

    The file is opened with ``O_NOFOLLOW``, so a symbolic link put in place of a run's file is an error naming it,
    never a write into the link's target. On a failed write (a full disk) the file is cut back to its size before,
    so no half record is left for the next append to continue; the OSError names the file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(err.errno, f"{path} is a symbolic link: a run writes only into its own files") from None
        raise
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)
            raise OSError(err.errno, f"appending to {path} failed ({err.strerror}); the file is as it was") from err
    finally:
        os.close(fd)


def commit(source: Path, target: Path) -> None:
    """Rename a complete file (e.g. a pending checkpoint) onto ``target``, durably."""
    os.replace(source, target)
    fsync_dir(target.parent)


def remove_orphans(root: str | Path) -> list[Path]:
    """Delete the temporary and pending files a killed writer left under ``root``; returns what was removed.

    Only call this in a folder the calling process owns (a run directory it has locked): another live writer's
    temporary file would otherwise be deleted under it.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in root.rglob(".*"):
        if path.is_file() and (TMP_MARK in path.name or path.name.endswith(PENDING_SUFFIX)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
