"""Drives a scheduling policy over worker handles through a transport.

A wait loop: the policy (pure, ``farm/scheduler``) decides who renders what; the
transport (``farm/transport.py``: Ray's by default, ``farm/ray_transport.py``) carries
the calls and keeps the clock. This module sends the work, keeps a few jobs in flight
per worker so none idles between jobs, turns finished calls into result rows (appended
durably as they arrive), retries transient failures and jobs lost with a dead worker
elsewhere up to a limit, never retries permanent ones (a bad LoRA), and on Ctrl-C stops
sending, cancels what is in flight and keeps every finished result.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from jobs.results import ResultRow

from .scheduler.costs import CostEstimate, job_work
from .scheduler.types import QueuedJob, WorkerView
from .transport import Ref, Transport, TransportError, WorkerLost


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

    def learn(self, row: ResultRow, work: float = 1.0) -> None:
        """One result row; ``work``: its job's render cost relative to the run's mean job."""
        self.observe(compose_s=row.compose_s, render_s=row.render_s / work, fetch_s=row.fetch_s)
        key = row.composition_key
        if key and key != self.last_key:
            self.switches += 1
            self.last_key = key


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
        transport: Transport | None = None,
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
        self._transport = transport  # None: Ray's, made on first use (importing this module imports no ray)
        self.pending: dict[Ref, tuple[str, list[str]]] = {}  # call -> (worker id, its job ids)
        self.attempts: dict[str, int] = defaultdict(int)
        self.jobs: dict[str, Any] = {}
        self.work: dict[str, float] = {}  # job id -> render cost relative to the run's mean job
        self.prefetched: set[tuple[str, str]] = set()
        self.stats = RunStats()

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            from .ray_transport import RayTransport

            self._transport = RayTransport()
        return self._transport

    # ---- read-only views: for the policy, progress callbacks and tests --------------------
    def workers(self) -> list[WorkerView]:
        """A snapshot of every worker as the policy sees it (composition, adapters, in flight, alive)."""
        return self._views()

    def in_flight(self) -> dict[str, tuple[str, ...]]:
        """A snapshot: worker id -> the job ids it has in flight (workers with none left out)."""
        held: dict[str, list[str]] = defaultdict(list)
        for wid, ids in self.pending.values():
            held[wid].extend(ids)
        return {wid: tuple(ids) for wid, ids in held.items()}

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
        now = self.transport.now()
        self.stats.total = len(jobs)
        for j in jobs:
            self.jobs[j.job_id] = j
        self.work.update(job_work(jobs))
        self.policy.submit([QueuedJob(j.job_id, j.routing_key, tuple(r.uri for r in j.loras), j.priority, now,
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
                self.transport.cancel(ref)
            self.pending.clear()
        return self.stats

    def _queued(self) -> int:
        return self.stats.total - self.stats.ok - self.stats.failed - sum(len(ids) for _, ids in self.pending.values())

    def _send(self) -> None:
        views = self._views()
        per_worker: dict[str, list[str]] = defaultdict(list)
        for job_id, wid in self.policy.assign(views, self.transport.now()):
            per_worker[wid].append(job_id)
        for wid, ids in per_worker.items():
            book = self.books[wid]
            # one call per composition keeps the worker's batching; the order is the policy's
            by_comp: dict[str, list[str]] = defaultdict(list)
            for jid in ids:
                by_comp[self.jobs[jid].routing_key].append(jid)
            # at least two calls in flight per worker where capacity allows, so the worker
            # starts the next call while the driver handles the previous one's result
            step = min(self.max_batch, max(1, self.capacity // 2))
            for comp, group in by_comp.items():
                for i in range(0, len(group), step):
                    chunk = group[i : i + step]
                    for jid in chunk:
                        self.attempts[jid] += 1
                    ref = self.transport.submit(book.handle, "render", [self.jobs[j] for j in chunk], self.output_root,
                                                self.storage_options)
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
            self.transport.submit(self.books[wid].handle, "prefetch", unique)  # best effort; errors surface at render

    def _collect(self) -> None:
        if not self.pending:
            return
        ready, _ = self.transport.wait(list(self.pending), num_returns=1, timeout=0.5)
        for ref in ready:
            self._collect_one(ref)

    def _collect_one(self, ref: Ref) -> None:
        wid, ids = self.pending.pop(ref)
        book = self.books[wid]
        book.inflight -= len(ids)
        try:
            rows = self.transport.get(ref)
            book.deaths_in_a_row = 0
        except TransportError as e:
            self._lost(book, ids, e)
            return
        for row in rows:
            book.learn(row, self.work.get(row.job_id, 1.0))
            if row.status == "ok":
                book.adapters.update(r.uri for r in self.jobs[row.job_id].loras)
            self._finish(row)

    def _lost(self, book: WorkerBook, ids: list[str], e: TransportError) -> None:
        """A worker died (or its call broke) with these jobs in hand: retry them elsewhere."""
        if isinstance(e, WorkerLost):
            book.deaths_in_a_row += 1
            book.composition, book.adapters = None, set()  # a restarted actor comes back empty
            book.alive = book.deaths_in_a_row < 3
        for jid in ids:
            self._finish(ResultRow.failed(self.jobs[jid], str(e)[:2000], worker_id=book.worker_id, transient=True))

    def _finish(self, row: ResultRow) -> None:
        jid = row.job_id
        if row.status != "ok" and row.transient and self.attempts[jid] <= self.retries:
            self.stats.retried += 1
            self.policy.done(jid, requeue=True)
            return
        self.policy.done(jid)
        self._record(row)

    def _record(self, row: ResultRow) -> None:
        result = row.recorded(self.attempts[row.job_id])
        if row.status == "ok":
            self.stats.ok += 1
        else:
            self.stats.failed += 1
        self.on_rows([result])
        if self.progress is not None:
            self.progress(self)

    def _fail_queued(self, reason: str) -> None:
        for jid in self.policy.cancel(list(self.jobs)):  # only still-queued ids come back
            self._record(ResultRow.failed(self.jobs[jid], reason))
