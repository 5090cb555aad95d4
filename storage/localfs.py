"""Local-disk primitives the store, its cache and the output writer share.

Each is one atomic filesystem step, which is what lets a crash at any point leave either
the old state or the new one.
"""
from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

__all__ = ["unlink_if_exists", "sibling_temp", "atomic_local_file"]


def unlink_if_exists(path: str) -> None:
    """Remove ``path``; already gone is fine (another process, or a crash, got there first)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sibling_temp(path: str) -> str:
    """A hidden temp name next to ``path``: same directory, so the rename stays atomic."""
    head, name = posixpath.split(path)
    return posixpath.join(head, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_local_file(path: str) -> Iterator[IO[bytes]]:
    """A temp file in the target's directory, fsynced and renamed over ``path`` on success.

    A crash leaves at most a ``.<name>.<rand>.tmp`` file, never a truncated target.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = sibling_temp(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        unlink_if_exists(tmp)
