"""Drives a scheduling policy over Ray actor handles.

A ``ray.wait`` loop: the policy (pure, ``farm/scheduler.py``) decides who renders what;
this module sends the work, keeps a few jobs in flight per worker so none idles between
jobs, turns finished calls into result rows (appended durably as they arrive), retries
transient failures and jobs lost with a dead actor elsewhere up to a limit, never
retries permanent ones (a bad LoRA), and on Ctrl-C stops sending, cancels what is in
flight and keeps every finished result.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from jobs.results import ResultRow

from .scheduler import CostEstimate, QueuedJob, WorkerView


@dataclass
class WorkerBook(CostEstimate):
    """What the dispatcher knows of one worker, from what it sent and got back."""

    worker_id: str
    handle: Any
    node_id: str = ""
    composition: str | None = None
    adapters: set[str] = field(default_factory=set)
    inflight: int = 0
    alive: bool = True
    deaths_in_a_row: int = 0
    last_key: str | None = None
    switches: int = 0

    def learn(self, row: dict, work: float = 1.0) -> None:
        """One result row; ``work``: its job's render cost relative to the run's mean job."""
        self.observe(compose_s=row.get("compose_s") or 0.0, render_s=(row.get("render_s") or 0.0) / work,
                     fetch_s=row.get("fetch_s") or 0.0)
        key = row.get("composition_key")
        if key and key != self.last_key:
            self.switches += 1
            self.last_key = key


def _pixel_steps(job: Any) -> float:
    return float(job.steps * job.width * job.height)


def job_work(jobs: Sequence[Any]) -> dict[str, float]:
    """Each job's render cost relative to the mean job of ``jobs``: steps x pixels, the
    transformer's work (attention's quadratic term ignored)."""
    raw = {j.job_id: _pixel_steps(j) for j in jobs}
    mean = sum(raw.values()) / len(raw) if raw else 1.0
    return {jid: (w / mean if mean > 0 else 1.0) for jid, w in raw.items()}


def costs_from_rows(rows: Sequence[Any], jobs: Sequence[Any], recent: int = 256) -> CostEstimate | None:
    """Cost priors for a run of ``jobs`` from an earlier run's result rows (its ``results.parquet``
    in the same output root), so the first plan is made from measured seconds, not 1 s
    guesses: the ``recent`` newest ``ok`` rows learned in order as the dispatcher learns them
    (``WorkerBook.learn``), render seconds per unit of this run's mean job. None when no row
    measured anything. The workers still replace each prior with their first measurement."""
    sizes = [_pixel_steps(j) for j in jobs]
    mean = sum(sizes) / len(sizes) if sizes else 0.0
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: r.finished_at)[-recent:]
    est = CostEstimate()
    for r in ok:
        size = _pixel_steps(r)
        est.observe(compose_s=r.compose_s, fetch_s=r.fetch_s,
                    render_s=r.render_s * mean / size if size > 0 and mean > 0 else 0.0)
    if not est.measured:
        return None
    return CostEstimate(compose_s=est.compose_s, render_s=est.render_s, fetch_s=est.fetch_s)


@dataclass
class RunStats:
    total: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    interrupted: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Dispatcher:
    def __init__(
        self,
        workers: dict[str, Any],
        policy,
        output_root: str,
        *,
        storage_options: dict | None = None,
        retries: int = 2,
        capacity: int = 2,
        on_rows: Callable[[list[ResultRow]], None] | None = None,
        progress=None,
        node_of: dict[str, str] | None = None,
        max_batch: int = 4,
        priors: CostEstimate | None = None,
    ):
        p = priors or CostEstimate()  # each worker's estimates start here (``costs_from_rows``)
        self.books = {wid: WorkerBook(wid, h, node_id=(node_of or {}).get(wid, ""), compose_s=p.compose_s,
                                      render_s=p.render_s, fetch_s=p.fetch_s) for wid, h in workers.items()}
        self.policy = policy
        self.output_root = output_root
        self.storage_options = storage_options or {}
        self.retries = retries
        self.capacity = capacity
        self.max_batch = max_batch
        self.on_rows = on_rows or (lambda rows: None)
        self.progress = progress
        self.pending: dict[Any, tuple[str, list[str]]] = {}
        self.attempts: dict[str, int] = defaultdict(int)
        self.jobs: dict[str, Any] = {}
        self.work: dict[str, float] = {}  # job id -> render cost relative to the run's mean job
        self.prefetched: set[tuple[str, str]] = set()
        self.stats = RunStats()

    # ---- views for the policy ------------------------------------------------------------
    def _views(self) -> list[WorkerView]:
        disk: dict[str, set[str]] = defaultdict(set)
        for b in self.books.values():
            disk[b.node_id] |= b.adapters
        return [
            WorkerView(worker_id=b.worker_id, node_id=b.node_id, composition=b.composition,
                       adapters=frozenset(b.adapters), node_disk=frozenset(disk[b.node_id]), inflight=b.inflight,
                       capacity=self.capacity, compose_cost_s=b.compose_s, render_cost_s=b.render_s,
                       fetch_cost_s=b.fetch_s, load_cost_s=b.load_s, alive=b.alive)
            for b in self.books.values()
        ]

    @property
    def switches(self) -> int:
        return sum(b.switches for b in self.books.values())

    # ---- the loop --------------------------------------------------------------------------
    def run(self, jobs: Sequence[Any]) -> RunStats:
        now = time.monotonic()
        self.stats.total = len(jobs)
        for j in jobs:
            self.jobs[j.job_id] = j
        self.work.update(job_work(jobs))
        self.policy.submit([QueuedJob(j.job_id, j.composition, tuple(r.uri for r in j.loras), j.priority, now,
                                      self.work[j.job_id]) for j in jobs])
        try:
            while self.pending or self._queued():
                self._send()
                self._collect()
                if not self.pending and self._queued() and not any(b.alive for b in self.books.values()):
                    self._fail_queued("no live worker left")
        except KeyboardInterrupt:
            self.stats.interrupted = True
            for ref in list(self.pending):
                ray.cancel(ref, force=False)
            self.pending.clear()
        return self.stats

    def _queued(self) -> int:
        return self.stats.total - self.stats.ok - self.stats.failed - sum(len(ids) for _, ids in self.pending.values())

    def _send(self) -> None:
        views = self._views()
        per_worker: dict[str, list[str]] = defaultdict(list)
        for job_id, wid in self.policy.assign(views, time.monotonic()):
            per_worker[wid].append(job_id)
        for wid, ids in per_worker.items():
            book = self.books[wid]
            # one call per composition keeps the worker's batching; the order is the policy's
            by_comp: dict[str, list[str]] = defaultdict(list)
            for jid in ids:
                by_comp[self.jobs[jid].composition].append(jid)
            # at least two calls in flight per worker where capacity allows, so the worker
            # starts the next call while the driver handles the previous one's result
            step = min(self.max_batch, max(1, self.capacity // 2))
            for comp, group in by_comp.items():
                for i in range(0, len(group), step):
                    chunk = group[i : i + step]
                    for jid in chunk:
                        self.attempts[jid] += 1
                    ref = book.handle.render.remote([self.jobs[j] for j in chunk], self.output_root, self.storage_options)
                    self.pending[ref] = (wid, chunk)
                    book.inflight += len(chunk)
                book.composition = comp
        self._prefetch(views)

    def _prefetch(self, views: list[WorkerView]) -> None:
        for wid, uris in self.policy.prefetch(views).items():
            fresh = [u for u in uris if (wid, u) not in self.prefetched]
            if not fresh or not self.books[wid].alive:
                continue
            self.prefetched.update((wid, u) for u in fresh)
            refs = [r for j in self.jobs.values() for r in j.loras if r.uri in fresh]
            unique = list({r.uri: r for r in refs}.values())
            self.books[wid].handle.prefetch.remote(unique)  # best effort; errors surface at render

    def _collect(self) -> None:
        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
        for ref in ready:
            self._collect_one(ref)

    def _collect_one(self, ref) -> None:
        wid, ids = self.pending.pop(ref)
        book = self.books[wid]
        book.inflight -= len(ids)
        try:
            rows = ray.get(ref)
            book.deaths_in_a_row = 0
        except (RayActorError, RayTaskError, GetTimeoutError, RayError) as e:
            self._lost(book, ids, e)
            return
        for row in rows:
            book.learn(row, self.work.get(row["job_id"], 1.0))
            if row["status"] == "ok":
                book.adapters.update(r.uri for r in self.jobs[row["job_id"]].loras)
            self._finish(row)

    def _lost(self, book: WorkerBook, ids: list[str], e: BaseException) -> None:
        """An actor died (or its call broke) with these jobs in hand: retry them elsewhere."""
        if isinstance(e, RayActorError):
            book.deaths_in_a_row += 1
            book.composition, book.adapters = None, set()  # a restarted actor comes back empty
            book.alive = book.deaths_in_a_row < 3
        for jid in ids:
            row = dict(job_id=jid, status="failed", worker_id=book.worker_id, error=f"{type(e).__name__}: {e}"[:2000],
                       transient=True, fetch_s=0.0, compose_s=0.0, render_s=0.0, output_uri="", composition_key="")
            self._finish(row)

    def _finish(self, row: dict) -> None:
        jid = row["job_id"]
        if row["status"] != "ok" and row.get("transient") and self.attempts[jid] <= self.retries:
            self.stats.retried += 1
            self.policy.done(jid, requeue=True)
            return
        self.policy.done(jid)
        self._record(row)

    def _record(self, row: dict) -> None:
        jid = row["job_id"]
        job = self.jobs[jid]
        values = {k: row.get(k) for k in ("output_uri", "composition_key", "worker_id", "fetch_s", "compose_s", "render_s",
                                          "error", "lora_mode")}
        result = ResultRow.from_job(job, row["status"], attempts=self.attempts[jid], **values)
        if row["status"] == "ok":
            self.stats.ok += 1
        else:
            self.stats.failed += 1
        self.on_rows([result])
        if self.progress is not None:
            self.progress(self)

    def _fail_queued(self, reason: str) -> None:
        for jid in self.policy.cancel(list(self.jobs)):  # only still-queued ids come back
            self._record(dict(job_id=jid, status="failed", error=reason))
