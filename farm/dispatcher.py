"""Drives a scheduling policy over worker handles through a transport.

A wait loop: the policy (pure, ``farm/scheduler``) decides who renders what; the
transport (``farm/transport.py``: Ray's by default, ``farm/ray_transport.py``) carries
the calls and keeps the clock. This module sends the work, keeps a few jobs in flight
per worker so none idles between jobs, turns finished calls into result rows (appended
durably as they arrive), retries transient failures and jobs lost with a dead worker
elsewhere up to a limit, never retries permanent ones (a bad LoRA), and on Ctrl-C stops
sending, cancels what is in flight and keeps every finished result.

One queue for many runs: ``run(jobs)`` is the one-shot path (`farm run`); the farm
service adds runs while it steps (``add_run`` / ``cancel_run`` / ``step``), each with its
own output root, storage options and row sink, all through the one policy, so a
composition a worker holds for one run serves the next. Inside the dispatcher a job is a
*ticket* (``run_id/job_id``; the bare job id for the one-shot run): two runs may hold jobs
of the same id. Workers join and leave while it runs (``add_worker`` / ``remove_worker`` /
``revive``).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from jobs.results import ResultRow

from .books import RunBook, RunStats, WorkerBook, ticket
from .scheduler.costs import CostEstimate, job_work
from .scheduler.types import QueuedJob, WorkerView
from .transport import Ref, Transport, TransportError, WorkerLost

__all__ = ["Dispatcher", "RunBook", "RunStats", "WorkerBook", "ticket"]


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
        self._priors = priors or CostEstimate()  # each worker's estimates start here (``costs_from_rows``)
        self.books = {wid: self._book(wid, h, (node_of or {}).get(wid, "")) for wid, h in workers.items()}
        self.policy = policy
        self.output_root = output_root
        self.storage_options = storage_options or {}
        self.retries = retries
        self.capacity = capacity
        self.max_batch = max_batch
        self.on_rows = on_rows or (lambda rows: None)
        self.progress = progress
        self._transport = transport  # None: Ray's, made on first use (importing this module imports no ray)
        self.pending: dict[Ref, tuple[str, list[str]]] = {}  # call -> (worker id, its tickets)
        self._call_run: dict[Ref, str] = {}  # call -> its run id (one run per call: one output root)
        self._call_epoch: dict[Ref, int] = {}  # call -> its worker book's epoch when sent (WorkerBook.report)
        self.attempts: dict[str, int] = defaultdict(int)  # ticket -> sends
        self.jobs: dict[str, Any] = {}  # ticket -> Job, while queued or in flight
        self.run_of: dict[str, str] = {}  # ticket -> run id
        self.runs: dict[str, RunBook] = {}
        self.work: dict[str, float] = {}  # ticket -> render cost relative to its run's mean job
        self.prefetched: set[tuple[str, str]] = set()
        self.stats = RunStats()  # over every run

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

    def worker_book(self, worker_id: str) -> WorkerBook | None:
        """What the dispatcher keeps of one worker (None: not joined, or removed)."""
        return self.books.get(worker_id)

    def worker_books(self) -> dict[str, WorkerBook]:
        """A snapshot (a new dict; the books themselves are live): worker id -> its book."""
        return dict(self.books)

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is carried (added, not yet dropped)."""
        return run_id in self.runs

    def _views(self) -> list[WorkerView]:
        disk: dict[str, set[str]] = defaultdict(set)
        for b in self.books.values():
            disk[b.node_id] |= b.adapters | b.fetched
        return [
            WorkerView(worker_id=b.worker_id, node_id=b.node_id, routing_key=b.routing_key,
                       adapters=frozenset(b.adapters), node_disk=frozenset(disk[b.node_id]), inflight=b.inflight,
                       capacity=self.capacity, compose_cost_s=b.compose_s, render_cost_s=b.render_s,
                       fetch_cost_s=b.fetch_s, load_cost_s=b.load_s, alive=b.alive,
                       prepared=frozenset(b.prepared), swap_cost_s=b.swap_s)
            for b in self.books.values()
        ]

    @property
    def switches(self) -> int:
        return sum(b.switches for b in self.books.values())

    # ---- workers joining and leaving (the farm service) -----------------------------------
    def add_worker(self, worker_id: str, handle: Any, node_id: str = "") -> None:
        """A new worker (or a replaced handle): it starts empty, with this dispatcher's priors."""
        self.books[worker_id] = self._book(worker_id, handle, node_id)

    def _book(self, worker_id: str, handle: Any, node_id: str) -> WorkerBook:
        p = self._priors
        return WorkerBook(worker_id, handle, node_id=node_id, compose_s=p.compose_s, render_s=p.render_s,
                          fetch_s=p.fetch_s)

    def remove_worker(self, worker_id: str) -> None:
        """Send it nothing more; what it has in flight still lands."""
        book = self.books.get(worker_id)
        if book is not None:
            book.alive = False
            book.retired = True

    def revive(self, worker_id: str) -> None:
        """A worker Ray restarted answers again: it came back empty."""
        book = self.books.get(worker_id)
        if book is not None and not book.retired:
            book.alive, book.deaths_in_a_row = True, 0
            book.forget()

    # ---- runs ----------------------------------------------------------------------------
    def add_run(self, run_id: str, jobs: Sequence[Any], output_root: str, *, storage_options: dict | None = None,
                on_rows: Callable[[list[ResultRow]], None] | None = None, priority: int | None = None,
                submitter: str = "") -> RunBook:
        """Queue ``jobs`` of one run; ``priority`` (when given) is every job's, else each job's own."""
        if run_id in self.runs:
            raise ValueError(f"run {run_id!r} is already in the dispatcher")
        book = RunBook(run_id, output_root, dict(storage_options or {}), on_rows or (lambda rows: None))
        book.stats.total = len(jobs)
        self.runs[run_id] = book
        self.stats.total += len(jobs)
        now = self.transport.now()
        work = job_work(jobs)
        queued = []
        for j in jobs:
            t = ticket(run_id, j.job_id)
            self.jobs[t], self.run_of[t], self.work[t] = j, run_id, work[j.job_id]
            book.tickets.add(t)
            queued.append(QueuedJob(t, j.routing_key, tuple(r.uri for r in j.loras),
                                    j.priority if priority is None else priority, now, work[j.job_id],
                                    run=run_id, submitter=submitter))
        self.policy.submit(queued)
        return book

    def cancel_run(self, run_id: str) -> int:
        """Drop the run's queued jobs (no rows for them); in-flight ones finish. Returns how many were dropped."""
        book = self.runs.get(run_id)
        if book is None:
            return 0
        book.cancelling = True
        dropped = self.policy.cancel([t for t in book.tickets if t in self.jobs])
        for t in dropped:
            self._forget(t)
        book.cancelled += len(dropped)
        self.stats.total -= len(dropped)
        return len(dropped)

    def run_counts(self, run_id: str) -> dict[str, int]:
        """``total, ok, failed, queued, running, cancelled`` of one run, now."""
        book = self.runs[run_id]
        running = sum(len(ids) for ref, (_, ids) in self.pending.items() if self._call_run.get(ref) == run_id)
        left = len(book.tickets)
        return {"total": book.stats.total, "ok": book.stats.ok, "failed": book.stats.failed,
                "queued": left - running, "running": running, "cancelled": book.cancelled}

    def finished(self, run_id: str) -> bool:
        """Nothing of the run queued or in flight."""
        return not self.runs[run_id].tickets

    def drop_run(self, run_id: str) -> None:
        """Forget a finished run's book (a long-lived farm would otherwise keep every run)."""
        book = self.runs.get(run_id)
        if book is not None and not book.tickets:
            del self.runs[run_id]

    # ---- the loop --------------------------------------------------------------------------
    def run(self, jobs: Sequence[Any]) -> RunStats:
        """The one-shot path: ``jobs`` into the constructor's output root, until all are done."""
        self.add_run("", jobs, self.output_root, storage_options=self.storage_options, on_rows=self.on_rows)
        try:
            while self.pending or self._queued():
                self.step()
                if not self.pending and self._queued() and not any(b.alive for b in self.books.values()):
                    self._fail_queued("no live worker left")
        except KeyboardInterrupt:
            self.stats.interrupted = True
            self.cancel_in_flight()
        return self.stats

    def step(self, timeout: float = 0.5) -> None:
        """Send what the policy assigns, then collect calls that finish within ``timeout`` seconds."""
        self._send()
        self.collect(timeout)

    def busy(self) -> bool:
        return bool(self.pending) or self._queued() > 0

    def cancel_in_flight(self) -> None:
        for ref in list(self.pending):
            self.transport.cancel(ref)
        self.pending.clear()
        self._call_run.clear()
        self._call_epoch.clear()

    def _queued(self) -> int:
        return len(self.jobs) - sum(len(ids) for _, ids in self.pending.values())

    def _send(self) -> None:
        views = self._views()
        per_worker: dict[str, list[str]] = defaultdict(list)
        for job_id, wid in self.policy.assign(views, self.transport.now()):
            per_worker[wid].append(job_id)
        for wid, ids in per_worker.items():
            book = self.books[wid]
            # one call per run and composition keeps the worker's batching; the order is the policy's
            by_comp: dict[tuple[str, str], list[str]] = defaultdict(list)
            for t in ids:
                by_comp[(self.run_of[t], self.jobs[t].routing_key)].append(t)
            # at least two calls in flight per worker where capacity allows, so the worker
            # starts the next call while the driver handles the previous one's result
            step = min(self.max_batch, max(1, self.capacity // 2))
            for (run_id, comp), group in by_comp.items():
                run = self.runs[run_id]
                for i in range(0, len(group), step):
                    chunk = group[i : i + step]
                    for t in chunk:
                        self.attempts[t] += 1
                    ref = self.transport.submit(book.handle, "render", [self.jobs[t] for t in chunk], run.output_root,
                                                run.storage_options)
                    self.pending[ref] = (wid, chunk)
                    self._call_run[ref] = run_id
                    self._call_epoch[ref] = book.epoch
                    book.inflight += len(chunk)
                book.routing_key = comp
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

    def collect(self, timeout: float = 0.5) -> None:
        """Collect calls that finish within ``timeout`` seconds and send nothing new (a drain)."""
        if not self.pending:
            if timeout > 0 and self._queued():
                time.sleep(min(timeout, 0.05))  # queued work and no call out: the policy is waiting; do not spin
            return
        ready, _ = self.transport.wait(list(self.pending), num_returns=1, timeout=timeout)
        for ref in ready:
            self._collect_one(ref)

    def _collect_one(self, ref: Ref) -> None:
        wid, ids = self.pending.pop(ref)
        run_id = self._call_run.pop(ref, "")
        sent_at = self._call_epoch.pop(ref, None)
        book = self.books[wid]
        book.inflight -= len(ids)
        try:
            rows = self.transport.get(ref)
            book.deaths_in_a_row = 0
        except TransportError as e:
            self._lost(book, ids, e)
            return
        sent = set(ids)
        learned: set[str] = set()  # compositions whose compose seconds this call has taught
        for row in rows:
            t = ticket(run_id, row.job_id)
            if t not in sent:
                continue  # not a job this call carried (a misbehaving worker): never a row for another job
            sent.discard(t)
            key = self.jobs[t].routing_key
            book.learn(row, self.work.get(t, 1.0), routing_key=key, first=key not in learned)
            learned.add(key)
            if row.status == "ok":
                book.fetched.update(r.uri for r in self.jobs[t].loras)
            self._finish(t, row)
        # what it holds after them (workers.holds.Rows): the truth, unless it came from a process since lost
        book.report(getattr(rows, "holds", None), sent_at)
        for t in ids:
            if t in sent:  # the worker returned no row for it
                self._finish(t, ResultRow.failed(self.jobs[t], "the worker returned no result for this job",
                                                 worker_id=wid, transient=True))

    def _lost(self, book: WorkerBook, ids: list[str], e: TransportError) -> None:
        """A worker died (or its call broke) with these jobs in hand: retry them elsewhere."""
        if isinstance(e, WorkerLost):
            book.deaths_in_a_row += 1
            book.forget()  # a restarted actor comes back empty
            book.alive = book.deaths_in_a_row < 3
        for t in ids:
            self._finish(t, ResultRow.failed(self.jobs[t], str(e)[:2000], worker_id=book.worker_id, transient=True))

    def _finish(self, t: str, row: ResultRow) -> None:
        run = self.runs[self.run_of[t]]
        if row.status != "ok" and row.transient and run.cancelling:  # would be retried: dropped as queued ones are
            self.policy.done(t)
            self._forget(t)
            run.cancelled += 1
            self.stats.total -= 1
            return
        if row.status != "ok" and row.transient and self.attempts[t] <= self.retries:
            self.stats.retried += 1
            self.runs[self.run_of[t]].stats.retried += 1
            self.policy.done(t, requeue=True)
            return
        self.policy.done(t)
        self._record(t, row)

    def _record(self, t: str, row: ResultRow) -> None:
        result = row.recorded(self.attempts[t])
        run = self.runs[self.run_of[t]]
        for stats in (self.stats, run.stats):
            if row.status == "ok":
                stats.ok += 1
            else:
                stats.failed += 1
        self._forget(t)
        run.on_rows([result])
        if self.progress is not None:
            self.progress(self)

    def _forget(self, t: str) -> None:
        """A ticket that is done (or dropped): nothing of it stays in the dispatcher."""
        run_id = self.run_of.pop(t, None)
        self.jobs.pop(t, None)
        self.work.pop(t, None)
        self.attempts.pop(t, None)
        if run_id is not None and run_id in self.runs:
            self.runs[run_id].tickets.discard(t)

    def _fail_queued(self, reason: str) -> None:
        for t in self.policy.cancel(list(self.jobs)):  # only still-queued ids come back
            self._record(t, ResultRow.failed(self.jobs[t], reason))
