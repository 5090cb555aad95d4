"""The node-local disk cache behind ``LoraStore``: blobs by sha256, a URL index, leases, LRU eviction.

This module never talks to remote storage (``store.py`` injects the bytes), so its rules
can be tested with plain files. Layout under ``root``::

    blobs/<sha256>          complete, verified files; only ever created by os.replace
    index/<key>.json        URL key -> {"sha256", "nbytes", "identity"} (atomic writes)
    verified/<sha256>       "this blob hashed to its name while it had this inode, size, mtime"
    tmp/<pid>-<rand>.part   downloads in progress; never read as a blob
    leases/<sha256>.<pid>   "process <pid> is using this blob": eviction skips it
    locks/<key>.lock        one download per URL per node (filelock, across processes)
    gc.lock                 serialises eviction against leasing and committing

Why files rather than a database: several processes on one node (one per GPU worker)
share the cache, and every step here is one atomic filesystem operation, so a crash at
any point leaves either the old state or the new one. ``root`` must be node-local:
pid-based leases and ``flock`` mean nothing across machines.

Trust: ``root`` is private (created 0700; a symlink, another owner or a dir writable by
others is refused). A blob is served only once its bytes have hashed to its name; the
``verified`` marker saves re-hashing on every hit and is void once the blob's inode, size
or mtime changes (recency is kept in atime so that serving never changes mtime). A blob
that fails is evicted, and the caller fetches it again. Index records are checked before
use: a sha256 that is not 64 hex digits could name a path outside the cache.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterable

from filelock import FileLock

from .localfs import atomic_local_file, ensure_private_dir, hash_file, unlink_if_exists

__all__ = ["DiskCache", "pid_alive", "STALE_TEMP_S", "default_cache_dir"]

log = logging.getLogger("storage")

#: A temp file untouched this long is garbage even if its pid looks alive (pid reuse).
STALE_TEMP_S = 24 * 3600
_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> str:
    """``$LORA_FARM_CACHE``, else ``$XDG_CACHE_HOME/lora-farm``, else ``~/.cache/lora-farm``.

    The node-local cache every part of the farm shares by default (workers use the same
    rule), so a file fetched for a composition key is not fetched again to render. Per user,
    never a fixed path in a world-writable dir another user could pre-create or symlink;
    ``DiskCache`` creates it 0700 and refuses one that is not private.
    """
    if os.environ.get("LORA_FARM_CACHE"):
        return os.environ["LORA_FARM_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # the XDG rule
    return os.path.join(base, "lora-farm")


def _valid_record(record: Any) -> bool:
    """An index record the store may act on: its sha names a blob, its size is a count."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and _SHA256.fullmatch(record["sha256"]) is not None
        and type(record.get("nbytes")) is int
        and record["nbytes"] >= 0
        and isinstance(record.get("identity"), dict)
    )


def _stamp(st: os.stat_result) -> list[int]:
    """What a change of a blob's bytes changes: inode (replaced), size, mtime (written)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process on this node (used to expire stale leases)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _temp_owner(name: str) -> int | None:
    """The pid encoded in a temp file name (``<pid>-<rand>.part``), or None if not ours."""
    head = name.split("-")[0]
    return int(head) if head.isdigit() else None


class DiskCache:
    """Blob storage with a byte budget; eviction removes least-recently-used unleased blobs.

    Recency is the blob's atime, touched on every hit, so all processes sharing the
    directory agree on the LRU order without shared memory.
    """

    def __init__(self, root: str, budget_bytes: int) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.budget_bytes = int(budget_bytes)
        ensure_private_dir(self.root)
        for sub in ("blobs", "index", "tmp", "leases", "locks", "verified"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._gc_lock = FileLock(os.path.join(self.root, "gc.lock"))
        self._url_locks: dict[str, FileLock] = {}
        self._pins: Counter[str] = Counter()
        self._mutex = threading.Lock()
        self.evictions = 0
        self.bytes_evicted = 0
        self.remove_stale_temps()

    # ---- paths and index -------------------------------------------------------------
    def blob_path(self, sha256: str) -> str:
        if not _SHA256.fullmatch(sha256):  # never a path out of the cache, whoever passes it
            raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha256[:80]!r}")
        return os.path.join(self.root, "blobs", sha256)

    def url_lock(self, key: str) -> FileLock:
        """The cross-process lock that makes one process the downloader of a URL."""
        with self._mutex:
            lock = self._url_locks.get(key)
            if lock is None:
                lock = self._url_locks[key] = FileLock(os.path.join(self.root, "locks", f"{key}.lock"))
            return lock

    def read_index(self, key: str) -> dict[str, Any] | None:
        """The record for ``key``; a malformed one is deleted and read as a miss (fetched again)."""
        path = os.path.join(self.root, "index", f"{key}.json")
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable JSON (or not UTF-8)
            record = None
        if not _valid_record(record):
            log.warning("cache index entry %s is malformed: dropped", path)
            unlink_if_exists(path)
            return None
        return record

    def write_index(self, key: str, record: dict[str, Any]) -> None:
        """Write atomically: a reader sees the old record or the new one, never half."""
        final = os.path.join(self.root, "index", f"{key}.json")
        with atomic_local_file(final, tmp=self.new_temp(".json")) as f:
            f.write(json.dumps(record, sort_keys=True).encode("utf-8"))

    def new_temp(self, suffix: str = ".part") -> str:
        """A fresh temp path inside the cache (same filesystem, so os.replace is atomic)."""
        return os.path.join(self.root, "tmp", f"{os.getpid()}-{uuid.uuid4().hex}{suffix}")

    def remove_stale_temps(self) -> int:
        """Delete temp files left by processes that died mid-download; returns the count."""
        removed = 0
        tmp_dir = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp_dir):
            path = os.path.join(tmp_dir, name)
            pid = _temp_owner(name)
            try:
                old = time.time() - os.stat(path).st_mtime > STALE_TEMP_S  # pid reused?
            except FileNotFoundError:
                continue
            if pid is None or old or not pid_alive(pid):
                unlink_if_exists(path)
                removed += 1
        return removed

    # ---- serving, committing, leases -------------------------------------------------
    def serve(self, sha256: str, *, nbytes: int | None = None, pin: bool = False) -> int | None:
        """Size of the blob if present (and of ``nbytes``), touched as recently used; else None.

        Checked under the gc lock so that a blob cannot be evicted between "it is there"
        and "it is leased". A blob whose size disagrees with the index, or whose bytes do
        not hash to its name, is evicted. Hashing runs outside the lock (it can take
        seconds); the lock then checks that the blob hashed is the one served.
        """
        path = self.blob_path(sha256)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if nbytes is not None and st.st_size != nbytes:
            log.warning("cache blob %s has %d bytes, expected %d: evicted", sha256, st.st_size, nbytes)
            return self._drop(sha256, st)
        if not self._verified(sha256, st):
            digest, _ = hash_file(path)
            if digest != sha256:
                log.warning("cache blob %s is corrupt (its bytes hash to %s): evicted", sha256, digest)
                return self._drop(sha256, st)
            self._mark_verified(sha256, st)
        with self._gc_lock:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return None
            if _stamp(now) != _stamp(st):  # replaced or written while we hashed: not what we checked
                return None
            _touch(path, now)
            if pin:
                self.pin(sha256)
            return now.st_size

    def _verified(self, sha256: str, st: os.stat_result) -> bool:
        try:
            with open(self._marker_path(sha256), encoding="utf-8") as f:
                return json.load(f) == _stamp(st)
        except (OSError, ValueError):
            return False

    def _mark_verified(self, sha256: str, st: os.stat_result) -> None:
        with atomic_local_file(self._marker_path(sha256), tmp=self.new_temp(".json")) as f:
            f.write(json.dumps(_stamp(st)).encode("utf-8"))

    def _marker_path(self, sha256: str) -> str:
        return os.path.join(self.root, "verified", sha256)

    def _drop(self, sha256: str, st: os.stat_result) -> None:
        """Evict a bad blob, unless it was replaced meanwhile (by a good one: leave that)."""
        with self._gc_lock:
            try:
                if _stamp(os.stat(self.blob_path(sha256))) != _stamp(st):
                    return None
            except FileNotFoundError:
                return None
            self._unlink_blob(sha256)
        return None

    def _unlink_blob(self, sha256: str) -> None:
        unlink_if_exists(self.blob_path(sha256))
        unlink_if_exists(self._marker_path(sha256))

    def commit(self, tmp: str, sha256: str, *, pin: bool = False) -> str:
        """Move a verified temp file into place as a blob, then enforce the budget.

        The caller hashed ``tmp`` to ``sha256``, so the blob is marked verified as it lands.
        """
        path = self.blob_path(sha256)
        with self._gc_lock:
            os.replace(tmp, path)
            st = os.stat(path)
            self._mark_verified(sha256, st)
            _touch(path, st)
            if pin:
                self.pin(sha256)
            self.evict(protect=(sha256,))
        return path

    def pin(self, sha256: str) -> None:
        """Mark a blob in use by this process (the first pin writes the lease file)."""
        with self._mutex:
            self._pins[sha256] += 1
            first = self._pins[sha256] == 1
        if first:
            open(self._lease_path(sha256), "a").close()

    def unpin(self, sha256: str) -> None:
        """Undo one ``pin``; the last one removes the lease file. Unknown shas are ignored."""
        with self._mutex:
            if self._pins[sha256] <= 0:
                self._pins.pop(sha256, None)
                return
            self._pins[sha256] -= 1
            last = self._pins[sha256] == 0
            if last:
                del self._pins[sha256]
        if last:
            unlink_if_exists(self._lease_path(sha256))

    def pinned(self) -> dict[str, int]:
        with self._mutex:
            return dict(self._pins)

    def _lease_path(self, sha256: str) -> str:
        return os.path.join(self.root, "leases", f"{sha256}.{os.getpid()}")

    def _leased(self) -> set[str]:
        """Blobs leased by any live process on the node; stale leases are cleaned up."""
        leased = set(self.pinned())
        lease_dir = os.path.join(self.root, "leases")
        for name in os.listdir(lease_dir):
            sha, _, pid = name.rpartition(".")
            if pid.isdigit() and pid_alive(int(pid)):
                if int(pid) != os.getpid():
                    leased.add(sha)
            else:
                unlink_if_exists(os.path.join(lease_dir, name))
        return leased

    # ---- budget ----------------------------------------------------------------------
    def blobs(self) -> list[tuple[float, int, str]]:
        """``(atime, size, sha256)`` of every blob, least recently used first."""
        out = []
        blob_dir = os.path.join(self.root, "blobs")
        for name in os.listdir(blob_dir):
            try:
                st = os.stat(os.path.join(blob_dir, name))
            except FileNotFoundError:  # evicted by another process while we listed
                continue
            out.append((st.st_atime, st.st_size, name))
        return sorted(out)

    def usage(self) -> int:
        return sum(size for _, size, _ in self.blobs())

    def evict(self, protect: Iterable[str] = ()) -> int:
        """Remove LRU blobs not in use until under budget; returns bytes freed.

        Callers hold the gc lock (``commit``) or take it here (``trim``). Blobs in use
        and ``protect`` (the one just fetched) are never removed, so a budget smaller
        than the working set overshoots rather than breaking a running job.
        """
        blobs = self.blobs()
        total = sum(size for _, size, _ in blobs)
        if total <= self.budget_bytes:
            return 0
        keep = self._leased() | set(protect)
        freed = 0
        for _, size, sha in blobs:
            if total - freed <= self.budget_bytes:
                break
            if sha in keep:
                continue
            self._unlink_blob(sha)
            freed += size
            self.evictions += 1
            self.bytes_evicted += size
            log.info("evicted blob %s (%d bytes) to stay under %d bytes", sha, size, self.budget_bytes)
        if total - freed > self.budget_bytes:
            log.warning("cache over budget (%d > %d bytes): the rest is in use", total - freed, self.budget_bytes)
        return freed

    def trim(self) -> int:
        """Enforce the budget now (e.g. after lowering it or releasing leases)."""
        with self._gc_lock:
            return self.evict()


def _touch(path: str, st: os.stat_result) -> None:
    """Mark a blob as just used: atime only, so mtime still says when its bytes were written
    (the verified marker depends on it). Explicit nanoseconds: "now" in utime is a coarse
    clock (one tick is several ms), which would tie blobs used in quick succession."""
    os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))

