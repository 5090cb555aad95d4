"""The base policy: the protocol (package docstring) and the bookkeeping every policy shares.

A subclass decides ``assign``: it walks the ``Slot`` of each alive worker and hands jobs
to them with ``Policy._give``, which keeps the guarantees (never past capacity, never a
job twice) and remembers what each worker will hold.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

from .queue import JobQueue
from .types import QueuedJob, WorkerView


class Slot:
    """One alive worker during one ``assign`` call: what it will hold, what room is left."""

    __slots__ = ("view", "comp", "spare", "delay")

    def __init__(self, view: WorkerView, comp: str | None) -> None:
        self.view, self.comp = view, comp
        self.spare = view.capacity - view.inflight
        self.delay = view.inflight * view.render_cost_s  # a busy worker starts new work later


class Policy:
    """The protocol and the queue bookkeeping every policy shares; subclasses decide ``assign``."""

    name = "policy"

    def __init__(self) -> None:
        self.queue = JobQueue()
        self._running: dict[str, tuple[str, QueuedJob]] = {}  # assigned, not done
        self._tail: dict[str, tuple[str, tuple[str, ...]]] = {}  # worker -> last job's composition, loras
        self._newest = -math.inf  # latest enqueued_at of any job assigned so far

    def submit(self, jobs: Iterable[QueuedJob]) -> None:
        for job in jobs:
            if job.job_id in self._running:
                raise ValueError(f"job {job.job_id!r} is already assigned")
            self.queue.add(job)

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        """Drop queued jobs; assigned ones are the dispatcher's to stop. Returns those removed."""
        return [j for j in job_ids if self.queue.remove(j) is not None]

    def done(self, job_id: str, *, requeue: bool = False) -> None:
        """A job left its worker; with ``requeue`` it queues again, keeping its age."""
        item = self._running.pop(job_id, None)
        if item is not None and requeue:
            self.queue.add(item[1])

    @property
    def pending(self) -> int:
        return len(self.queue)

    def wake_at(self) -> float | None:
        """When ``assign`` may decide differently with no new event (None: only on events)."""
        return None

    def prefetch(self, workers: Sequence[WorkerView]) -> dict[str, list[str]]:
        return {}

    def assign(self, workers: Sequence[WorkerView], now: float) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _slots(self, workers: Sequence[WorkerView]) -> list[Slot]:
        slots, seen = [], set()
        for w in workers:
            if not w.alive or w.worker_id in seen:
                continue
            seen.add(w.worker_id)
            tail = self._tail.get(w.worker_id)
            slots.append(Slot(w, tail[0] if tail and w.inflight > 0 else w.routing_key))
        return slots

    def _give(self, job: QueuedJob, slot: Slot, out: list[tuple[str, str]], holders: Counter | None = None) -> None:
        if slot.spare <= 0:
            raise RuntimeError(f"policy {self.name} overfilled worker {slot.view.worker_id}")  # a bug, never input
        if holders is not None and slot.comp != job.routing_key:
            holders[slot.comp] -= 1
            holders[job.routing_key] += 1
        if slot.comp != job.routing_key:
            slot.delay += slot.view.compose_cost_s
        slot.spare -= 1
        slot.comp = job.routing_key
        slot.delay += slot.view.render_cost_s
        wid = slot.view.worker_id
        self._tail[wid] = (job.routing_key, tuple(job.loras))
        self._running[job.job_id] = (wid, job)
        self._newest = max(self._newest, job.enqueued_at)
        out.append((job.job_id, wid))
