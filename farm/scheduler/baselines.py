"""Baseline policies, on the same protocol as ``AffinityScheduler`` (``affinity.py``).

They exist to be measured against (``benchmarks/scheduler.py``), and each is a fair
rendering of what a farm would get without LoRA-aware scheduling:

* ``fifo``: composition-blind; the best-ranked queued job (priority, then age) goes to
  the first worker with room, in the order the workers are given.
* ``least_loaded``: the same job order; each job to the worker with the fewest inflight.
* ``serve_multiplex``: Ray Serve model multiplexing (``@serve.multiplexed``, routed by
  ``PowerOfTwoChoicesRequestRouter`` + ``MultiplexMixin``, Ray 2.60), with a "model" =
  a composition. Modelled from Ray's source:

  - at most ``2 * replicas`` requests are being routed at once, in FIFO order (Serve
    caps its routing tasks there); the rest wait in the queue;
  - a request's first attempt goes to replicas that have its model loaded; when none
    has, to the replicas with the fewest models loaded, except that while an earlier
    request of that model is already falling back, it gets no candidate and retries
    (Serve's ``_multiplexed_model_id_fallback_match``);
  - later attempts, within the matching timeout (uniform in [1, 2] s), go to the
    replicas with the fewest models loaded, and after it to any replica;
  - each attempt samples two candidates and takes the one with room and the shorter
    queue; a failed attempt backs off 0.025 s * 2^attempt, at most 0.5 s;
  - each replica keeps an LRU of ``max_models_per_replica`` (3) models, updated when a
    request is sent there (Serve learns it when the model is loaded: we are generous).

  Modelling choice: Serve keeps up to 3 *separate* models in a replica, and switching
  between them is free. A merged-LoRA model holds exactly one composition, so here a
  replica's LRU is only its *routing* view: switching to a composition in it costs the
  warm price (adapters already in memory: compose only), any other the cold price
  (fetch + compose). The simulator charges that through the worker's real adapter
  cache, the same cost model for every policy. Attempts that would happen while every
  replica is full are not simulated one by one: such requests count as having tried,
  and retry at once when a replica frees up (generous again: no backoff gap).
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .affinity import AffinityScheduler
from .policy import Policy, Slot
from .types import QueuedJob, WorkerView


class FifoPolicy(Policy):
    name = "fifo"

    def assign(self, workers: Sequence[WorkerView], now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for slot in self._slots(workers):
            while slot.spare > 0 and len(self.queue):
                self._give(self.queue.pop_first(), slot, out)  # type: ignore[arg-type]
        return out


class LeastLoadedPolicy(Policy):
    name = "least_loaded"

    def assign(self, workers: Sequence[WorkerView], now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heap = [(s.view.inflight, i, s) for i, s in enumerate(self._slots(workers)) if s.spare > 0]
        heapq.heapify(heap)
        while heap and len(self.queue):
            load, i, slot = heapq.heappop(heap)
            self._give(self.queue.pop_first(), slot, out)  # type: ignore[arg-type]
            if slot.spare > 0:
                heapq.heappush(heap, (load + 1, i, slot))
        return out


@dataclass
class _Routing:
    """A request being routed, with the state Serve keeps in its routing context."""

    job: QueuedJob
    since: float
    timeout: float
    tried: bool = False
    attempt: int = 0
    next_try: float = field(default=0.0)


class ServeMultiplexPolicy(Policy):
    name = "serve_multiplex"

    def __init__(self, *, max_models_per_replica: int = 3, match_timeout_s: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.max_models = max_models_per_replica
        self.match_timeout_s = match_timeout_s
        self._rng = random.Random(seed)
        self._models: dict[str, list[str]] = {}  # replica -> loaded models, most recent last
        self._routing: dict[str, _Routing] = {}  # insertion order = FIFO
        self._fallback: set[str] = set()
        self._wake: float | None = None

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self._routing)

    def submit(self, jobs: Iterable[QueuedJob]) -> None:
        for job in jobs:
            if job.job_id in self._routing:
                raise ValueError(f"job {job.job_id!r} is already queued")
            super().submit([job])

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        ids = list(job_ids)
        gone = [j for j in ids if self._routing.pop(j, None) is not None]
        return gone + super().cancel(j for j in ids if j not in gone)

    def wake_at(self) -> float | None:
        return self._wake

    def assign(self, workers: Sequence[WorkerView], now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        slots = self._slots(workers)
        self._wake = None
        if not slots:
            return out
        while len(self._routing) < 2 * len(slots) and len(self.queue):
            job = self.queue.pop_first()
            assert job is not None
            timeout = self._rng.uniform(self.match_timeout_s, 2 * self.match_timeout_s)
            self._routing[job.job_id] = _Routing(job, now, timeout, next_try=now)
        room = sum(s.spare for s in slots if s.spare > 0)
        for job_id, req in list(self._routing.items()):
            if room <= 0:
                req.tried = True  # its attempt now would find every replica full
                continue
            if req.next_try > now:
                continue
            slot = self._route(req, slots, now)
            if slot is None:
                req.tried, req.attempt = True, req.attempt + 1
                req.next_try = now + min(0.025 * 2**req.attempt, 0.5)
                continue
            del self._routing[job_id]
            self._give(req.job, slot, out)
            self._load(slot.view.worker_id, req.job.routing_key)
            room -= 1
        if room > 0 and self._routing:
            self._wake = min(r.next_try for r in self._routing.values())
        return out

    def _route(self, req: _Routing, slots: list[Slot], now: float) -> Slot | None:
        model = req.job.routing_key
        if not req.tried:
            cands = [s for s in slots if model in self._models.get(s.view.worker_id, ())]
            if cands:
                self._fallback.discard(model)
            elif model in self._fallback:
                return None  # an earlier request of this model is already loading it somewhere
            else:
                cands = self._fewest(slots)
                self._fallback.add(model)
        elif now - req.since < req.timeout:
            cands = self._fewest(slots)
        else:
            cands = slots
        picks = self._rng.sample(cands, min(2, len(cands)))
        open_ = [s for s in picks if s.spare > 0]
        return min(open_, key=lambda s: s.view.capacity - s.spare) if open_ else None

    def _fewest(self, slots: list[Slot]) -> list[Slot]:
        n = min(len(self._models.get(s.view.worker_id, ())) for s in slots)
        return [s for s in slots if len(self._models.get(s.view.worker_id, ())) == n]

    def _load(self, worker_id: str, model: str) -> None:
        lru = self._models.setdefault(worker_id, [])
        if model in lru:
            lru.remove(model)
        lru.append(model)
        del lru[: -self.max_models]


POLICIES: dict[str, type[Policy]] = {
    "affinity": AffinityScheduler,
    "fifo": FifoPolicy,
    "least_loaded": LeastLoadedPolicy,
    "serve_multiplex": ServeMultiplexPolicy,
}


def make(name: str, **options: Any) -> Policy:
    """A fresh policy by name (``POLICIES``); options go to its constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    return cls(**options)
