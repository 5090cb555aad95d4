"""Local-disk primitives the store, its cache and the output writer share.

Each is one atomic filesystem step, which is what lets a crash at any point leave either
the old state or the new one.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

from .errors import UnsafeCacheDirError

__all__ = ["unlink_if_exists", "sibling_temp", "atomic_local_file", "hash_file", "ensure_private_dir"]

MiB = 2**20


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
def atomic_local_file(path: str, *, mode: int | None = None, tmp: str | None = None) -> Iterator[IO[bytes]]:
    """A temp file, fsynced and renamed over ``path`` on success (binary: write bytes).

    A crash leaves at most the temp file, never a truncated target. The temp is ``tmp`` (a
    fresh path on the same filesystem: a cache names its temps so that its sweeper can tell a
    live writer's from a dead one's), or ``.<name>.<rand>.tmp`` beside ``path``. ``mode``: the
    file's permission bits, set exactly and from the start (no moment with wider ones); None:
    the umask's default.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = sibling_temp(path) if tmp is None else tmp
    try:
        if mode is None:
            f = open(tmp, "wb")
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        unlink_if_exists(tmp)


def hash_file(path: str, chunk: int = 8 * MiB) -> tuple[str, int]:
    """sha256 hex digest and byte count of a local file, read in fixed chunks."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    nbytes = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            nbytes += n
    return digest.hexdigest(), nbytes


def ensure_private_dir(path: str) -> None:
    """Create ``path`` mode 0700 if missing; refuse one another user could have planted files in.

    Refused (``UnsafeCacheDirError`` naming the path): a symlink (it could point anywhere),
    not a directory, owned by another uid, or writable by group or others. Ours and only
    readable by others (an old cache made with the umask) is tightened to 0700: nobody else
    could have written to it.
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheDirError("cache dir is a symlink: refused (give the real path)", source=path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheDirError("cache dir is not a directory", source=path)
    if st.st_uid != os.geteuid():
        raise UnsafeCacheDirError(
            f"cache dir is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): refused", source=path
        )
    if st.st_mode & 0o022:
        raise UnsafeCacheDirError(
            f"cache dir is writable by others (mode {stat.S_IMODE(st.st_mode):o}): refused; chmod 700 it", source=path
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
