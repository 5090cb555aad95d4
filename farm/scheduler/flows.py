"""``FlowQueue``: the job queue, also indexed by flow (one run of one submitter; ``fair.py``)."""
from __future__ import annotations

from collections import Counter
from typing import Mapping

from .queue import JobQueue
from .types import QueuedJob

Flow = tuple[str, str]  # (submitter, run)
_EMPTY = JobQueue()


class FlowQueue(JobQueue):
    """A ``JobQueue`` that also keeps, per flow, a ``JobQueue`` of that flow's jobs, and per
    composition the flows with jobs of it. The composition-wide operations are the base
    class's, unchanged; every removal (pop, cancel) goes through ``remove``."""

    def __init__(self, by_run: bool = True) -> None:
        super().__init__()
        self.by_run = by_run  # False: one flow per submitter, its runs pooled
        self._flows: dict[Flow, JobQueue] = {}
        self._by_key: dict[str, Counter[Flow]] = {}
        self._submitters: Counter[str] = Counter()

    def add(self, job: QueuedJob) -> None:
        super().add(job)
        f = self.flow_id(job)
        sub = self._flows.get(f)
        if sub is None:
            sub = self._flows[f] = JobQueue()
        sub.add(job)
        self._by_key.setdefault(job.routing_key, Counter())[f] += 1
        self._submitters[job.submitter] += 1

    def remove(self, job_id: str) -> QueuedJob | None:
        job = super().remove(job_id)
        if job is None:
            return None
        f = self.flow_id(job)
        sub = self._flows[f]
        sub.remove(job_id)
        if not len(sub):
            del self._flows[f]
        flows = self._by_key[job.routing_key]
        flows[f] -= 1
        if not flows[f]:
            del flows[f]
            if not flows:
                del self._by_key[job.routing_key]
        self._submitters[job.submitter] -= 1
        if not self._submitters[job.submitter]:
            del self._submitters[job.submitter]
        return job

    def flow_id(self, job: QueuedJob) -> Flow:
        return (job.submitter, job.run if self.by_run else "")

    def flows(self) -> list[Flow]:
        """The flows with queued jobs."""
        return list(self._flows)

    def flow(self, f: Flow) -> JobQueue:
        """Flow ``f``'s own queue (read only: remove through this queue, never that one)."""
        return self._flows.get(f, _EMPTY)

    def flows_of(self, key: str | None) -> Mapping[Flow, int]:
        """The flows with queued jobs of composition ``key``, and how many each has."""
        return self._by_key.get(key, {}) if key is not None else {}

    def submitters(self) -> list[str]:
        return list(self._submitters)

    def queued_of(self, submitter: str) -> int:
        return self._submitters.get(submitter, 0)

    def pop_from(self, f: Flow, key: str) -> QueuedJob:
        """Flow ``f``'s best-ranked job of composition ``key`` (KeyError when it has none)."""
        job_id = self.flow(f).peek(key)
        job = self.remove(job_id) if job_id is not None else None
        if job is None:
            raise KeyError(f"flow {f!r} has no queued job of composition {key!r}")
        return job


__all__ = ["Flow", "FlowQueue"]
