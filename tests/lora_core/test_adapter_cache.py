"""AdapterCache with a fake loader: hits, misses, bytes, eviction, pins, in-flight dedupe."""
from __future__ import annotations

import threading
import time

import pytest

from lora_core.adapter_cache import AdapterCache


class Blob:
    def __init__(self, key, nbytes):
        self.key, self.nbytes = key, nbytes


class FakeLoader:
    def __init__(self, sizes, delay=0.0, fail=()):
        self.sizes, self.delay, self.fail = sizes, delay, set(fail)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, key):
        with self.lock:
            self.calls.append(key)
        time.sleep(self.delay)
        if key in self.fail:
            raise OSError(f"cannot load {key}")
        return Blob(key, self.sizes[key])


def test_hits_misses_bytes_and_lru_eviction():
    evicted = []
    loader = FakeLoader({"a": 40, "b": 40, "c": 40})
    c = AdapterCache(100, loader, on_evict=lambda k, v: evicted.append(k))
    c.get("a"); c.get("b"); c.get("a")
    assert (c.stats.hits, c.stats.misses, c.stats.bytes) == (1, 2, 80)
    c.get("c")  # over budget: b is least recently used
    assert evicted == ["b"] and c.stats.bytes == 80 and set(c.keys()) == {"a", "c"}
    c.get("b")
    assert loader.calls == ["a", "b", "c", "b"]
    assert c.stats.evictions == 2 and c.stats.loads == 4


def test_pinned_entries_survive():
    loader = FakeLoader({"a": 60, "b": 60, "c": 60})
    c = AdapterCache(100, loader)
    c.get("a"); c.pin("a")
    c.get("b")
    assert "a" in c and "b" not in c
    c.unpin("a")
    c.get("c")
    assert "a" not in c and "c" in c


def test_oversized_entry_returned_not_kept():
    c = AdapterCache(10, FakeLoader({"big": 50}))
    assert c.get("big").nbytes == 50
    assert "big" not in c and c.stats.bytes == 0


def test_concurrent_requests_load_once():
    loader = FakeLoader({"a": 10}, delay=0.2)
    c = AdapterCache(100, loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get("a"))) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert loader.calls == ["a"]
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_loader_error_reaches_every_waiter_and_is_not_cached():
    loader = FakeLoader({"x": 1}, delay=0.1, fail={"x"})
    c = AdapterCache(100, loader)
    errors = []

    def get():
        try:
            c.get("x")
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(errors) == 4 and loader.calls == ["x"]
    assert "x" not in c
    with pytest.raises(OSError):
        c.get("x")
    assert loader.calls == ["x", "x"]
