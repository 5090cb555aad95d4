"""The byte budget, leases and eviction of the store's disk cache.

Sources are memory:// files (no server needed); what is asserted is which blobs are left
on disk and the eviction counters.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import uuid

import fsspec
import pytest

from storage.store import LoraStore

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files():
    """Three 400-byte memory:// files: a, b, c."""
    mem = fsspec.filesystem("memory")
    root = f"/evict-{uuid.uuid4().hex}"
    out = {}
    for name in "abc":
        data = name.encode() * 400
        mem.pipe(f"{root}/{name}.safetensors", data)
        out[name] = (f"memory://{root}/{name}.safetensors", sha(data))
    return out


def present(store: LoraStore, files: dict, *names: str) -> dict[str, bool]:
    on_disk = set(os.listdir(os.path.join(store.disk.root, "blobs")))
    return {n: files[n][1] in on_disk for n in names}


def test_lru_blob_is_evicted_over_budget(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=1000)  # room for two of three
    store.fetch(files["a"][0])
    store.fetch(files["b"][0])
    store.fetch(files["a"][0])  # a is now more recent than b
    store.fetch(files["c"][0])
    assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
    stats = store.stats()
    assert (stats["evictions"], stats["bytes_evicted"], stats["cache_bytes"]) == (1, 400, 800)


def test_leased_blob_is_never_evicted(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=500)  # room for one
    with store.lease(files["a"][0]) as leased:
        store.fetch(files["b"][0])
        store.fetch(files["c"][0])
        assert os.path.exists(leased.path)
        assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
        assert store.stats()["leased"] == 1
    assert store.stats()["leased"] == 0
    store.fetch(files["b"][0])  # a is free again, and least recently used
    assert present(store, files, "a", "b", "c") == {"a": False, "b": True, "c": False}


def test_pin_and_release_count(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=500)
    a = store.fetch(files["a"][0], pin=True)
    store.fetch(files["a"][0], pin=True)
    store.release(a.sha256)
    store.fetch(files["b"][0])
    assert present(store, files, "a")["a"]  # still one lease left
    store.release(a.sha256)
    store.release(a.sha256)  # one too many: ignored
    assert store.trim() == 400
    assert present(store, files, "a", "b") == {"a": False, "b": True}


def test_file_larger_than_budget_is_served_then_evicted(tmp_path, files):
    store = LoraStore(tmp_path / "cache", budget_bytes=100)
    a = store.fetch(files["a"][0])
    assert os.path.exists(a.path)  # the file just fetched is protected
    store.fetch(files["b"][0])
    assert present(store, files, "a", "b") == {"a": False, "b": True}


def _exit_now() -> None:
    pass


def test_leases_of_other_processes(tmp_path, files):
    """A lease file of a live process protects a blob; one of a dead process does not."""
    store = LoraStore(tmp_path / "cache", budget_bytes=1000)  # room for two of three
    a = store.fetch(files["a"][0]).sha256  # the LRU one: evicted next, unless leased
    b = store.fetch(files["b"][0]).sha256
    leases = os.path.join(store.disk.root, "leases")
    open(os.path.join(leases, f"{a}.{os.getppid()}"), "w").close()  # our parent: alive
    dead = mp.get_context("spawn").Process(target=_exit_now)
    dead.start()
    dead.join()
    open(os.path.join(leases, f"{b}.{dead.pid}"), "w").close()
    store.fetch(files["c"][0])
    assert present(store, files, "a", "b", "c") == {"a": True, "b": False, "c": True}
    assert not os.path.exists(os.path.join(leases, f"{b}.{dead.pid}"))  # stale lease swept


def test_content_addressed_dedupe_across_urls(tmp_path):
    mem = fsspec.filesystem("memory")
    root = f"/dup-{uuid.uuid4().hex}"
    mem.pipe(f"{root}/one.safetensors", b"same bytes")
    mem.pipe(f"{root}/two.safetensors", b"same bytes")
    store = LoraStore(tmp_path / "cache")
    one = store.fetch(f"memory://{root}/one.safetensors")
    two = store.fetch(f"memory://{root}/two.safetensors", sha256=one.sha256)
    assert two.cached and two.path == one.path
    assert len(os.listdir(os.path.join(store.disk.root, "blobs"))) == 1
