"""A byte-budget LRU of loaded adapters. It does no I/O itself: the loader is injected.

Concurrent ``get`` calls for the same key load once (in-flight dedupe): the first caller
runs the loader, the others wait on its result (or its error). Pinned entries are never
evicted; an entry larger than the whole budget is returned but not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _InFlight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = None
        self.error: BaseException | None = None


class AdapterCache(Generic[V]):
    def __init__(
        self,
        budget_bytes: int,
        loader: Callable[[Hashable], V],
        size_of: Callable[[V], int] = lambda v: int(getattr(v, "nbytes")),
        on_evict: Callable[[Hashable, V], None] | None = None,
    ):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget = budget_bytes
        self._loader = loader
        self._size_of = size_of
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._pins: dict[Hashable, int] = {}
        self._inflight: dict[Hashable, _InFlight] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Hashable) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return self._items[key][0]
            self.stats.misses += 1
            flight = self._inflight.get(key)
            owner = flight is None
            if owner:
                flight = self._inflight[key] = _InFlight()
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        return self._load(key, flight)

    def _load(self, key: Hashable, flight: _InFlight) -> V:
        try:
            value = self._loader(key)
            flight.value = value
            with self._lock:
                self.stats.loads += 1
                self._insert(key, value)
            return value
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()

    def _insert(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        if size > self.budget and not self._pins.get(key):
            return
        self._items[key] = (value, size)
        self.stats.bytes += size
        self._evict()

    def _evict(self) -> None:
        victims = []
        for k in list(self._items):
            if self.stats.bytes <= self.budget:
                break
            if self._pins.get(k):
                continue
            value, size = self._items.pop(k)
            self.stats.bytes -= size
            self.stats.evictions += 1
            victims.append((k, value))
        if self._on_evict:
            for k, v in victims:
                self._on_evict(k, v)

    def pin(self, key: Hashable) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n <= 0:
                self._pins.pop(key, None)
            else:
                self._pins[key] = n
            self._evict()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def entries(self) -> list[tuple[Hashable, int]]:
        with self._lock:
            return [(k, size) for k, (_, size) in self._items.items()]
