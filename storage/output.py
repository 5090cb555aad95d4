"""Write outputs (images, results.parquet) to any fsspec URL so readers never see half a file.

How "atomic" is achieved depends on the storage:

* **Local disk**: write a temp file in the target directory, fsync, ``os.replace``. A
  crash leaves at most a ``.<name>.<rand>.tmp`` file, never a truncated target.
* **Object stores** (s3, gcs, azure, memory, ...): a rename there is a copy plus a delete,
  so a temp name buys nothing. Instead the final key is written once, with the whole
  payload, in one put. An S3 object only becomes visible when its upload completes, so
  readers see the old object or the new one.
* **Other filesystems with a real rename** (sftp, hdfs, ...): upload to a temp name next to
  the target, then ``fs.mv``.

``exclusive(url)`` serialises writers of one file where the storage can (a ``filelock`` on
local disk, a process lock for ``memory://``); ``read_versioned`` / ``write_if_unchanged``
are a compare-and-swap where the store has one (S3's conditional puts on the ETag), so a
writer that merges into a shared file never replaces a version it has not read.

``ensure_under(root, path)`` joins a relative output path under the output root and
refuses anything that would escape it (``..``, absolute paths, another bucket): job ids
and file names come from user manifests.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
from filelock import FileLock

from .fetch import classify_fetch_error
from .localfs import atomic_local_file, sibling_temp
from .urls import is_local, open_filesystem, protocol_of

__all__ = ["write_bytes_atomic", "ensure_under", "OBJECT_STORES", "exclusive", "LockTimeout", "Version", "read_versioned",
           "write_if_unchanged"]

#: Protocols whose "rename" is a copy: write the final name once, with the full payload.
OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "memory", "http", "https"}
)


def ensure_under(root: str, path: str) -> str:
    """``path`` (relative, or a URL/absolute path) resolved under ``root``; ValueError if outside.

    Works on URLs (``s3://bucket/out`` + ``images/a.png``) and local paths alike; the
    result keeps the root's protocol. Symlinks are not resolved: the guard is about
    names coming from manifests, not about an attacker with write access to the root.
    """
    if not path:
        raise ValueError("empty output path")
    root_proto, root_path = fsspec.core.split_protocol(root)
    proto, rest = fsspec.core.split_protocol(path)
    if proto is not None and (proto or "file") != (root_proto or "file"):
        raise ValueError(f"{path!r} is not under {root!r} (different protocol)")
    # a URL names its full path (bucket included); a bare path is relative to the root
    joined = posixpath.normpath(rest if proto is not None else posixpath.join(root_path, rest))
    base = posixpath.normpath(root_path)
    if (root_proto or "file") not in ("file", "local"):
        inside = joined == base or joined.startswith(base.rstrip("/") + "/")
    else:
        absolute, abs_base = os.path.abspath(joined), os.path.abspath(base)
        inside = absolute == abs_base or absolute.startswith(abs_base.rstrip(os.sep) + os.sep)
    if not inside or joined == base:
        raise ValueError(f"{path!r} escapes the output root {root!r}")
    return f"{root_proto}://{joined}" if root_proto else joined


def write_bytes_atomic(
    url: str, data: bytes, storage_options: dict[str, Any] | None = None, *, root: str | None = None
) -> str:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file; returns the URL.

    With ``root``, ``url`` is a path relative to it and may not escape it.
    """
    final = ensure_under(root, url) if root is not None else url
    fs, path = open_filesystem(final, storage_options)
    if is_local(fs):
        with atomic_local_file(path) as f:
            f.write(data)
    elif protocol_of(final) in OBJECT_STORES:
        _retry_io(lambda: fs.pipe_file(path, data))
    else:
        tmp = sibling_temp(path)
        _retry_io(lambda: fs.pipe_file(tmp, data))
        _move(fs, tmp, path)
    return final


def _move(fs: Any, tmp: str, path: str) -> None:
    try:
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # noqa: BLE001 - best effort; the original error matters
            pass
        raise


def _retry_io(fn: Callable[[], Any], retries: int = 3) -> None:
    """Retry an idempotent upload on transient errors; re-raise the original otherwise.

    Outputs keep the storage library's own exception types (not ``FetchError``) because
    callers record them per job, not per LoRA file.
    """
    for attempt in range(retries + 1):
        try:
            fn()
            return
        except Exception as e:  # noqa: BLE001 - classified, re-raised unless transient
            cls, _ = classify_fetch_error(e)
            if not cls.transient or attempt == retries:
                raise
            time.sleep(0.2 * 2**attempt)


#: Protocols with a compare-and-swap put (``If-Match`` / ``If-None-Match`` on the ETag).
CAS_STORES = frozenset({"s3", "s3a"})
_process_locks: dict[str, threading.Lock] = {}


class LockTimeout(TimeoutError):
    """Another writer held ``exclusive``'s lock past the timeout; the message names the lock."""


_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def exclusive(url: str, storage_options: dict[str, Any] | None = None, timeout_s: float = -1) -> Iterator[bool]:
    """Hold the writers' lock of ``url`` while the block runs; yields whether there is one.

    Local disk: a ``filelock`` on ``.<name>.lock`` next to it (across processes); ``memory://``
    lives in one process, so a process lock is the whole story there. Elsewhere (object
    stores) there is no lock to take and this yields False: use ``write_if_unchanged``.
    ``LockTimeout`` (naming the lock) when another holder keeps it past ``timeout_s`` (-1: wait).
    """
    fs, path = open_filesystem(url, storage_options)
    if is_local(fs):
        head, name = os.path.split(path)
        os.makedirs(head or ".", exist_ok=True)
        lock_path = os.path.join(head, f".{name}.lock")
        try:
            lock = FileLock(lock_path, timeout=timeout_s)
            lock.acquire()
        except TimeoutError as e:
            raise LockTimeout(f"lock {lock_path} held by another writer for over {timeout_s:g} s") from e
        try:
            yield True
        finally:
            lock.release()
    elif protocol_of(url) == "memory":
        with _process_locks_guard:
            plock = _process_locks.setdefault(path, threading.Lock())
        if not plock.acquire(timeout=timeout_s):
            raise LockTimeout(f"lock of {url} held by another writer for over {timeout_s:g} s")
        try:
            yield True
        finally:
            plock.release()
    else:
        yield False


@dataclass(frozen=True)
class Version:
    """What ``read_versioned`` saw: ``cas`` when the store can compare-and-swap, ``etag`` None = absent."""

    cas: bool
    etag: str | None = None


def read_versioned(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes | None, Version]:
    """The bytes of ``url`` (None when absent) and the version they are, for ``write_if_unchanged``.

    The ETag is read before the bytes: if the object changes in between, the bytes are newer
    than the ETag and the conditional write fails (and is retried), never the reverse.
    """
    fs, path = open_filesystem(url, storage_options)
    cas = protocol_of(url) in CAS_STORES
    etag = None
    try:
        if cas:
            fs.invalidate_cache(path)
            etag = fs.info(path)["ETag"]
        return fs.cat_file(path), Version(cas, etag)
    except FileNotFoundError:
        return None, Version(cas, None)


def write_if_unchanged(url: str, data: bytes, version: Version, storage_options: dict[str, Any] | None = None) -> bool:
    """Write ``data`` whole unless ``url`` changed since ``version`` was read; False when it did.

    Without a compare-and-swap (``version.cas`` False) this is ``write_bytes_atomic``: the
    caller holds ``exclusive`` where the storage has a lock, and otherwise accepts last-writer-wins.
    """
    if not version.cas:
        write_bytes_atomic(url, data, storage_options)
        return True
    fs, path = open_filesystem(url, storage_options)
    cond = {"IfMatch": version.etag} if version.etag is not None else {"IfNoneMatch": "*"}
    try:
        fs.pipe_file(path, data, **cond)
    except (FileExistsError, OSError) as e:
        fs.invalidate_cache(path)
        try:
            now = fs.info(path)["ETag"]
        except FileNotFoundError:
            now = None
        if now != version.etag:
            return False  # another writer got there first: the 412 (s3fs reports it as an OSError)
        raise e
    finally:
        fs.invalidate_cache(path)
    return True
