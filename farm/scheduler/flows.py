"""``FlowQueue``: the job queue, also indexed by flow (one run of one submitter; ``fair.py``)."""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Mapping

from .queue import JobQueue
from .types import QueuedJob

Flow = tuple[str, str]  # (submitter, run); run "" = the submitter's pooled runs
_EMPTY = JobQueue()
#: ``FlowQueue`` modes: every run a flow; a submitter's runs pooled; pooled but the small runs split out
RUNS = ("all", "none", "small")
#: runs whose verdict ("small") is remembered after their last queued job left (a retry rejoins it)
VERDICTS_KEPT = 4096


class FlowQueue(JobQueue):
    """A ``JobQueue`` that also keeps, per flow, a ``JobQueue`` of that flow's jobs, and per
    composition the flows with jobs of it. The composition-wide operations are the base
    class's, unchanged; every removal (pop, cancel) goes through ``remove``.

    ``runs``: "all" (``True``), every run is a flow of its own; "none" (``False``), one flow
    per submitter, its runs pooled; "small", pooled, except the runs ``split_small`` finds
    small as they arrive (``fair.py``: a small run gets a turn of its own). A run's verdict
    stays while it has queued jobs and, after that, for the ``VERDICTS_KEPT`` runs judged
    last: a retried job of a run whose other jobs are all on workers rejoins its run's flow."""

    def __init__(self, by_run: bool | str = True) -> None:
        super().__init__()
        runs = {True: "all", False: "none"}.get(by_run, by_run)  # type: ignore[call-overload]
        if runs not in RUNS:
            raise ValueError(f"FlowQueue runs must be one of {RUNS}, got {by_run!r}")
        self.runs = runs
        self._flows: dict[Flow, JobQueue] = {}
        self._by_key: dict[str, Counter[Flow]] = {}
        self._submitters: Counter[str] = Counter()
        self._verdict: OrderedDict[Flow, bool] = OrderedDict()  # run -> split out ("small")
        self._run_jobs: dict[Flow, dict[str, QueuedJob]] = {}  # each run's queued jobs ("small")
        self._fresh: set[Flow] = set()  # runs with queued jobs and no verdict yet

    def add(self, job: QueuedJob) -> None:
        super().add(job)
        if self.runs == "small":
            run = (job.submitter, job.run)
            if run not in self._verdict:
                self._fresh.add(run)
            self._run_jobs.setdefault(run, {})[job.job_id] = job
        self._index(job, self.flow_id(job))
        self._submitters[job.submitter] += 1

    def remove(self, job_id: str) -> QueuedJob | None:
        job = super().remove(job_id)
        if job is None:
            return None
        self._unindex(job, self.flow_id(job))
        if self.runs == "small":
            run = (job.submitter, job.run)
            jobs = self._run_jobs[run]
            del jobs[job_id]
            if not jobs:
                del self._run_jobs[run]
                self._fresh.discard(run)
        self._submitters[job.submitter] -= 1
        if not self._submitters[job.submitter]:
            del self._submitters[job.submitter]
        return job

    def _index(self, job: QueuedJob, f: Flow) -> None:
        sub = self._flows.get(f)
        if sub is None:
            sub = self._flows[f] = JobQueue()
        sub.add(job)
        self._by_key.setdefault(job.routing_key, Counter())[f] += 1

    def _unindex(self, job: QueuedJob, f: Flow) -> None:
        sub = self._flows[f]
        sub.remove(job.job_id)
        if not len(sub):
            del self._flows[f]
        flows = self._by_key[job.routing_key]
        flows[f] -= 1
        if not flows[f]:
            del flows[f]
            if not flows:
                del self._by_key[job.routing_key]

    def flow_id(self, job: QueuedJob) -> Flow:
        if self.runs == "all" or self._verdict.get((job.submitter, job.run)):
            return (job.submitter, job.run)
        return (job.submitter, "")

    def split_small(self, share: float) -> None:
        """("small") Judge each run queued since the last call, once, as it arrives: with at
        most ``share`` of the work queued at its own (top) priority it becomes a flow of its
        own (its jobs keep their places in every other index); a larger one stays in its
        submitter's pool for good (its tail, once small, gets no turns of its own)."""
        if self.runs != "small":
            raise ValueError("FlowQueue.split_small needs runs='small'")
        for run in sorted(self._fresh):
            jobs = self._run_jobs[run]
            top = max(j.priority for j in jobs.values())
            small = sum(j.work for j in jobs.values()) <= share * self.work_at_least(top)
            self._verdict[run] = small
            if small:
                for job in jobs.values():
                    self._unindex(job, (run[0], ""))
                    self._index(job, run)
        self._fresh.clear()
        while len(self._verdict) > VERDICTS_KEPT:
            old = next((r for r in self._verdict if r not in self._run_jobs), None)
            if old is None:
                break
            del self._verdict[old]

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


__all__ = ["Flow", "FlowQueue", "RUNS"]
