"""The train/held-out partition of a procedural problem space: a keyed hash of the problem, independent of seeds."""

from __future__ import annotations

import hashlib


def hash_split(text: str, key: bytes, val_fraction: float) -> str:
    """``"val"`` for about ``val_fraction`` of all problems, ``"train"`` for the rest, decided by a keyed 64-bit
    BLAKE2b hash of ``text`` (the problem, or its canonical key): the same on every rank, run and seed."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=key).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"
