"""Queued jobs indexed by composition: the index every policy decides from."""
from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Container

from .types import QueuedJob

NO_WORK = -math.inf  # the "priority" of a composition with nothing queued


class _Comp:
    __slots__ = ("loras", "by_rank", "by_age", "count", "work", "ver")

    def __init__(self, loras: tuple[str, ...]) -> None:
        self.loras = loras
        self.by_rank: list[tuple[int, float, int, str]] = []  # (-priority, enqueued_at, seq, id)
        self.by_age: list[tuple[float, int, str]] = []  # (enqueued_at, seq, id)
        self.count = 0
        self.work = 0.0  # sum of the queued jobs' ``work``
        self.ver = 0


class JobQueue:
    """Queued jobs indexed by composition; every operation is O(log n) amortized.

    Heaps with lazy deletion: a job entry is live while its (id, seq) is still queued, a
    composition entry while its version is current, so removing a job never searches.
    Rank order: priority (high first), then ``enqueued_at``, then submission order.
    """

    def __init__(self) -> None:
        self._live: dict[str, tuple[QueuedJob, int]] = {}
        self._comps: dict[str, _Comp] = {}
        self._rank: list[tuple[int, float, int, str]] = []  # every job, rank order
        self._big: list[tuple[float, float, int, str]] = []  # (-top priority, -work, ver, key)
        self._old: list[tuple[float, int, str]] = []  # (oldest enqueued_at, ver, key)
        self._prio: Counter[int] = Counter()
        self._prio_work: dict[int, float] = {}  # priority -> summed work of its queued jobs
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def add(self, job: QueuedJob) -> None:
        if job.job_id in self._live:
            raise ValueError(f"job {job.job_id!r} is already queued")
        self._seq += 1
        self._live[job.job_id] = (job, self._seq)
        comp = self._comps.get(job.routing_key)
        if comp is None:
            comp = self._comps[job.routing_key] = _Comp(tuple(job.loras))
        entry = (-job.priority, job.enqueued_at, self._seq, job.job_id)
        heapq.heappush(comp.by_rank, entry)
        heapq.heappush(comp.by_age, (job.enqueued_at, self._seq, job.job_id))
        heapq.heappush(self._rank, entry)
        self._prio[job.priority] += 1
        self._prio_work[job.priority] = self._prio_work.get(job.priority, 0.0) + job.work
        comp.count += 1
        comp.work += job.work
        self._touch(job.routing_key, comp)

    def remove(self, job_id: str) -> QueuedJob | None:
        item = self._live.pop(job_id, None)
        if item is None:
            return None
        job = item[0]
        self._prio[job.priority] -= 1
        self._prio_work[job.priority] -= job.work
        if not self._prio[job.priority]:
            del self._prio[job.priority], self._prio_work[job.priority]
        comp = self._comps[job.routing_key]
        comp.count -= 1
        comp.work -= job.work
        self._touch(job.routing_key, comp)
        if len(self._rank) > 2 * len(self._live) + 1024:
            self._rank = [e for e in self._rank if self._is_live(e)]
            heapq.heapify(self._rank)
        return job

    def count(self, key: str | None) -> int:
        comp = self._comps.get(key) if key is not None else None
        return comp.count if comp else 0

    def loras(self, key: str) -> tuple[str, ...]:
        comp = self._comps.get(key)
        return comp.loras if comp else ()

    def top_priority(self, key: str | None) -> float:
        comp = self._comps.get(key) if key is not None else None
        return -self._head(comp.by_rank)[0] if comp else NO_WORK

    def pop(self, key: str) -> QueuedJob:
        """The best-ranked job of composition ``key`` (KeyError when it has none)."""
        return self._take(self._head(self._comps[key].by_rank))

    def peek(self, key: str) -> str | None:
        """The id of the job ``pop(key)`` would return, or None when ``key`` has none."""
        comp = self._comps.get(key)
        entry = self._head(comp.by_rank) if comp else None
        return entry[-1] if entry else None

    def top(self) -> float:
        """The highest priority queued (``NO_WORK`` when the queue is empty): O(levels)."""
        return max(self._prio) if self._prio else NO_WORK

    def pop_oldest(self, key: str) -> QueuedJob:
        return self._take(self._head(self._comps[key].by_age))

    def pop_first(self) -> QueuedJob | None:
        """The best-ranked job overall, composition-blind (for the baselines)."""
        entry = self._head(self._rank)
        return self._take(entry) if entry else None

    def work(self, key: str | None) -> float:
        """The summed ``work`` of composition ``key``'s queued jobs."""
        comp = self._comps.get(key) if key is not None else None
        return comp.work if comp else 0.0

    def count_at_least(self, priority: float) -> int:
        return sum(n for p, n in self._prio.items() if p >= priority)

    def work_at_least(self, priority: float) -> float:
        return sum(w for p, w in self._prio_work.items() if p >= priority)

    def compositions(self) -> int:
        return len(self._comps)

    def priorities(self) -> int:
        """How many distinct priority levels are queued."""
        return len(self._prio)

    def sizes(self) -> list[tuple[str, int, float]]:
        """(composition, queued jobs, their summed ``work``) for every composition with work:
        O(compositions)."""
        return [(key, comp.count, comp.work) for key, comp in self._comps.items()]

    def largest(self, exclude: Container[str | None], limit: int) -> list[tuple[float, float, int, str]]:
        """Up to ``limit`` composition entries by (top priority, summed work), skipping ``exclude``."""
        return self._scan(self._big, exclude, limit)  # type: ignore[return-value]

    def overdue(self, before: float, exclude: Container[str | None], limit: int) -> list[tuple[float, int, str]]:
        """Up to ``limit`` composition entries whose oldest job was enqueued at or before ``before``."""
        return self._scan(self._old, exclude, limit, before)  # type: ignore[return-value]

    # internals -------------------------------------------------------------------------
    def _is_live(self, entry: tuple) -> bool:
        item = self._live.get(entry[-1])
        return item is not None and item[1] == entry[-2]

    def _head(self, heap: list) -> tuple | None:
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _take(self, entry: tuple | None) -> QueuedJob:
        if entry is None:
            raise KeyError("no queued job")
        job = self.remove(entry[-1])
        assert job is not None  # _head returned a live entry
        return job

    def _touch(self, key: str, comp: _Comp) -> None:
        """Re-rank a composition after its jobs changed; its old entries go stale."""
        if comp.count == 0:
            del self._comps[key]
            return
        self._seq += 1
        comp.ver = self._seq  # globally unique, so a re-created composition never matches old entries
        for name in ("by_rank", "by_age"):
            heap = getattr(comp, name)
            if len(heap) > 2 * comp.count + 32:
                heap = [e for e in heap if self._is_live(e)]
                heapq.heapify(heap)
                setattr(comp, name, heap)
        heapq.heappush(self._big, (self._head(comp.by_rank)[0], -comp.work, comp.ver, key))
        heapq.heappush(self._old, (self._head(comp.by_age)[0], comp.ver, key))
        if len(self._big) > 2 * len(self._comps) + 1024:
            self._big = [e for e in self._big if self._comp_live(e)]
            self._old = [e for e in self._old if self._comp_live(e)]
            heapq.heapify(self._big)
            heapq.heapify(self._old)

    def _comp_live(self, entry: tuple) -> bool:
        comp = self._comps.get(entry[-1])
        return comp is not None and comp.ver == entry[-2]

    def _scan(self, heap: list, exclude: Container[str | None], limit: int, before: float | None = None) -> list[tuple]:
        """Entries in heap order without consuming them (popped, then pushed back)."""
        found: list[tuple] = []
        kept: list[tuple] = []
        while heap and len(found) < limit:
            entry = heap[0]
            if before is not None and entry[0] > before:
                break
            heapq.heappop(heap)
            if not self._comp_live(entry):
                continue
            kept.append(entry)
            if entry[-1] not in exclude:
                found.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return found
