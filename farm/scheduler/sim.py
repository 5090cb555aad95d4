"""Discrete-event simulation of the render farm, driving the real policy objects.

The simulator plays the dispatcher of the protocol (``farm.scheduler``'s docstring): it
submits jobs as they arrive, calls ``assign`` after every batch of simultaneous events,
sends the jobs to the workers' local queues, starts background fetches from ``prefetch``
and sets a timer at ``wake_at``. It also checks the policy: a job assigned twice, to a dead or
full worker, or left in the queue when nothing more can happen, raises ``SimError``.

Cost model (all in seconds; the same for every policy):

* workers run their local queue one job at a time (``capacity`` bounds the queue, not
  parallelism); a job costs ``render_s`` x its ``work``;
* a job whose composition differs from the worker's current one first costs a switch:
  ``compose_s`` (one recomposition) plus, per adapter not in the worker's memory,
  ``load_s`` when it is on the node's disk, the rest of its download when the node is
  fetching it and that ends sooner, else ``fetch_s`` (a remote fetch of its own, which
  then lands on the node's disk);
* memory holds ``memory_adapters`` adapters (LRU); node disks keep everything;
* with ``prepared`` > 0 a worker keeps that many compositions prepared (LRU, as the
  low-rank branch cache does): switching back to one costs ``swap_s``, nothing composed,
  plus reading its adapters not in memory as above (the worker knows a composition by its
  adapters' content, so it reads them first, as ``costs.switch_cost`` prices it); it
  counts as a swap, not a recomposition;
* prefetch hints download onto the node's disk in the background, one file at a time
  per node, then load into the hinted worker's memory (``load_s``), overlapping renders;
* the policy is shown the true costs, or with ``prior_s``, what the dispatcher would
  know: ``costs.CostEstimate`` learned from each finished job, starting at
  ``prior_s`` (its disk load too: ``CostEstimate.load_s``, as the dispatcher reports it).

Workloads: ``n_compositions`` compositions, each of 1-3 adapters from a shared pool of
``max(3, n_compositions // 2)``; each job picks a composition with Zipf(alpha)
popularity. Arrivals: all at t=0 (``batch``) or in ``bursts`` groups at random times over
``span_s`` (``bursty``). The bounds a schedule is measured against are in ``sim_bounds``.
"""
from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .costs import CostEstimate
from .policy import Policy
from .types import QueuedJob, WorkerView


class SimError(RuntimeError):
    """The policy broke the protocol (or left work that can never be assigned)."""


@dataclass(frozen=True)
class FarmModel:
    workers: int
    compose_s: float = 5.0
    render_s: float = 1.0
    fetch_s: float | None = None  # per adapter, remote -> node; None: render_s
    load_s: float | None = None  # per adapter, node disk -> memory; None: fetch / 10
    capacity: int = 2
    per_node: int = 4
    memory_adapters: int = 12
    prepared: int = 0  # compositions each worker keeps prepared (branch cache, LRU); 0: none
    swap_s: float = 0.05  # a switch to one of them
    prior_s: float | None = None  # None: the policy sees the true costs; else learned from this prior

    @property
    def fetch(self) -> float:
        return self.render_s if self.fetch_s is None else self.fetch_s

    @property
    def load(self) -> float:
        return self.fetch / 10 if self.load_s is None else self.load_s


@dataclass(frozen=True)
class SimResult:
    policy: str
    makespan: float
    recompositions: int
    p95_wait: float
    mean_wait: float
    remote_fetches: int
    swaps: int = 0  # switches to a composition the worker kept prepared (not recompositions)
    # per finished job: (job, assigned, started on its worker, rendering began, finished); ``sim_fair`` reads it
    trace: tuple[tuple[QueuedJob, float, float, float, float], ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "makespan": round(self.makespan, 3), "recompositions": self.recompositions,
            "p95_wait": round(self.p95_wait, 3), "mean_wait": round(self.mean_wait, 3),
            "remote_fetches": self.remote_fetches, "swaps": self.swaps,
        }


def make_workload(
    n_jobs: int, n_compositions: int, alpha: float, seed: int, *,
    arrival: str = "batch", span_s: float = 0.0, bursts: int = 8, mixed_sizes: bool = False,
) -> list[QueuedJob]:
    """Jobs with Zipf(alpha) composition popularity; ``enqueued_at`` is the arrival time.
    ``mixed_sizes``: each composition's jobs have one size, its ``work`` 0.25, 1 or 2.25
    (512, 1024 or 1536 pixels square against 1024), drawn at random; else all 1."""
    rng = random.Random(seed)
    pool = [f"s3://loras/l{i:04d}.safetensors" for i in range(max(3, n_compositions // 2))]
    loras = [tuple(sorted(rng.sample(pool, rng.randint(1, 3)))) for _ in range(n_compositions)]
    weights = [1.0 / (rank + 1) ** alpha for rank in range(n_compositions)]
    order = list(range(n_compositions))
    rng.shuffle(order)  # popularity rank unrelated to the composition's name
    picks = rng.choices(order, weights=weights, k=n_jobs)
    if arrival == "batch":
        times = [0.0] * n_jobs
    elif arrival == "bursty":
        starts = sorted([0.0] + [rng.uniform(0, span_s) for _ in range(bursts - 1)])
        times = sorted(rng.choice(starts) for _ in range(n_jobs))
    else:
        raise ValueError(f"arrival must be 'batch' or 'bursty', not {arrival!r}")
    size = [rng.choice((0.25, 1.0, 2.25)) if mixed_sizes else 1.0 for _ in range(n_compositions)]
    return [
        QueuedJob(f"j{i:06d}", f"c{c:05d}", loras[c], 0, t, size[c])
        for i, (c, t) in enumerate(zip(picks, times))
    ]


@dataclass(eq=False)
class _Worker:
    wid: str
    node: str
    comp: str | None = None
    mem: OrderedDict = field(default_factory=OrderedDict)
    prep: OrderedDict = field(default_factory=OrderedDict)  # compositions kept prepared (LRU)
    queue: deque = field(default_factory=deque)
    busy: bool = False
    costs: CostEstimate | None = None  # what the dispatcher would have learned (FarmModel.prior_s)


@dataclass(eq=False)
class _Node:
    disk: set = field(default_factory=set)
    fetching: dict = field(default_factory=dict)  # uri -> time it lands
    link_free: float = 0.0
    frozen: frozenset | None = None


class Simulation:
    """One run of one policy over one workload; ``run()`` returns a ``SimResult``."""

    def __init__(self, policy: Policy, jobs: Sequence[QueuedJob], farm: FarmModel) -> None:
        self.policy, self.farm, self.jobs = policy, farm, list(jobs)
        self.workers = [_Worker(f"w{i}", f"n{i // farm.per_node}") for i in range(farm.workers)]
        if farm.prior_s is not None:
            for w in self.workers:
                w.costs = CostEstimate(compose_s=farm.prior_s, render_s=farm.prior_s, fetch_s=farm.prior_s)
        self.nodes = {w.node: _Node() for w in self.workers}
        self.by_id = {w.wid: w for w in self.workers}
        self.events: list[tuple[float, int, str, object]] = []
        self.order = 0
        self.pending: dict[str, QueuedJob] = {}
        self.waits: list[float] = []
        self.recompositions = self.remote = self.finished = self.swaps = 0
        self.makespan = 0.0
        self.next_tick = -1.0
        self.warming: set[tuple[_Worker, str]] = set()
        self.trace: list[tuple[QueuedJob, float, float, float, float]] = []
        self.assigned: dict[str, float] = {}  # job id -> when the policy assigned it

    def push(self, t: float, kind: str, data: object = None) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, self.order, kind, data))

    def run(self) -> SimResult:
        arrivals: dict[float, list[QueuedJob]] = {}
        for job in self.jobs:
            arrivals.setdefault(job.enqueued_at, []).append(job)
        for t, batch in arrivals.items():
            self.push(t, "arrive", batch)
        budget = 1000 * len(self.jobs) + 10_000  # a policy that loops without progress fails, not hangs
        while self.events:
            budget -= 1
            if budget < 0:
                raise SimError(f"{self.policy.name}: no progress after {1000 * len(self.jobs) + 10_000} rounds")
            now, decide = self.events[0][0], False
            while self.events and self.events[0][0] == now:
                kind, data = heapq.heappop(self.events)[2:]
                self.handle(now, kind, data)
                decide |= kind in ("arrive", "finish", "tick")  # a landed file changes no decision
            if decide:
                self.dispatch(now)
        if self.finished != len(self.jobs):
            raise SimError(f"{self.policy.name}: {len(self.jobs) - self.finished} jobs never ran")
        w = np.array(self.waits) if self.waits else np.zeros(1)
        return SimResult(self.policy.name, self.makespan, self.recompositions,
                         float(np.percentile(w, 95)), float(w.mean()), self.remote, self.swaps, tuple(self.trace))

    def handle(self, now: float, kind: str, data: object) -> None:
        if kind == "arrive":
            for job in data:  # type: ignore[attr-defined]
                self.pending[job.job_id] = job
            self.policy.submit(data)  # type: ignore[arg-type]
        elif kind == "finish":
            worker, job, compose_s, fetch_s, swapped = data  # type: ignore[misc]
            began = now - self.farm.render_s * job.work
            self.trace.append((job, self.assigned.pop(job.job_id), began - fetch_s - compose_s, began, now))
            if worker.costs is not None:  # as the dispatcher learns from the job's result row
                worker.costs.observe(compose_s=0.0 if swapped else compose_s, swap_s=compose_s if swapped else 0.0,
                                     render_s=self.farm.render_s, fetch_s=fetch_s)
            self.policy.done(job.job_id)
            self.finished += 1
            self.makespan = max(self.makespan, now)
            worker.busy = False
            self.start_next(worker, now)
        elif kind == "fetched":
            node, uri = data  # type: ignore[misc]
            node.disk.add(uri)
            node.fetching.pop(uri, None)
            node.frozen = None
        elif kind == "warm":
            worker, uri = data  # type: ignore[misc]
            self.warming.discard((worker, uri))
            self.remember(worker, uri)

    def view(self, w: _Worker) -> WorkerView:
        f, node = self.farm, self.nodes[w.node]
        if node.frozen is None:
            node.frozen = frozenset(node.disk)
        c = w.costs
        compose, render, fetch = (c.compose_s, c.render_s, c.fetch_s) if c else (f.compose_s, f.render_s, f.fetch)
        return WorkerView(
            w.wid, w.node, w.comp, frozenset(w.mem), node.frozen, len(w.queue) + w.busy,
            f.capacity, compose, render, fetch, c.load_s if c else f.load, True,
            frozenset(w.prep), c.swap_s if c else f.swap_s,
        )

    def dispatch(self, now: float) -> None:
        views = [self.view(w) for w in self.workers]
        room = {v.worker_id: v.capacity - v.inflight for v in views}
        pairs = self.policy.assign(views, now)
        for job_id, wid in pairs:
            job = self.pending.pop(job_id, None)
            if job is None:
                raise SimError(f"{self.policy.name} assigned {job_id} twice or before it arrived")
            room[wid] -= 1
            self.assigned[job_id] = now
            if room[wid] < 0:
                raise SimError(f"{self.policy.name} overfilled {wid}")
            self.by_id[wid].queue.append(job)
        for wid in dict.fromkeys(wid for _, wid in pairs):
            self.start_next(self.by_id[wid], now)
        if pairs:
            views = [self.view(w) for w in self.workers]
        for wid, uris in self.policy.prefetch(views).items():
            self.prefetch(self.by_id[wid], uris, now)
        wake = self.policy.wake_at()
        if wake is not None and wake > now and (self.next_tick <= now or wake < self.next_tick):
            self.next_tick = wake
            self.push(wake, "tick")

    def prefetch(self, w: _Worker, uris: Sequence[str], now: float) -> None:
        """Download onto the node (one file at a time per node), then warm the worker's memory."""
        node = self.nodes[w.node]
        for uri in uris:
            if uri in w.mem or (w, uri) in self.warming:
                continue
            if uri in node.disk:
                ready = now
            elif uri in node.fetching:
                ready = node.fetching[uri]
            else:
                node.link_free = ready = max(node.link_free, now) + self.farm.fetch
                node.fetching[uri] = ready
                self.remote += 1
                self.push(ready, "fetched", (node, uri))
            self.warming.add((w, uri))
            self.push(ready + self.farm.load, "warm", (w, uri))

    def start_next(self, w: _Worker, now: float) -> None:
        if w.busy or not w.queue:
            return
        job = w.queue.popleft()
        self.waits.append(now - job.enqueued_at)
        fetch = compose = 0.0
        swapped = False
        if job.routing_key != w.comp:
            if job.routing_key in w.prep:  # its prepared branches are swapped in, once its adapters are read
                fetch, compose, swapped = self.materialize(w, job.loras, now), self.farm.swap_s, True
                self.swaps += 1
            else:
                fetch, compose = self.materialize(w, job.loras, now), self.farm.compose_s
                self.recompositions += 1
            w.comp = job.routing_key
            if self.farm.prepared > 0:
                _touch(w.prep, job.routing_key, self.farm.prepared)
        w.busy = True
        self.push(now + fetch + compose + self.farm.render_s * job.work, "finish", (w, job, compose, fetch, swapped))

    def materialize(self, w: _Worker, loras: Sequence[str], now: float) -> float:
        """Seconds to get ``loras`` into the worker's memory (a sequential pull)."""
        node, f, cost = self.nodes[w.node], self.farm, 0.0
        for uri in loras:
            if uri in w.mem:
                w.mem.move_to_end(uri)
                continue
            if uri in node.disk:
                cost += f.load
            elif uri in node.fetching and node.fetching[uri] - now < cost + f.fetch:
                cost = max(cost, node.fetching[uri] - now) + f.load  # its download ends sooner
            else:
                cost += f.fetch
                self.remote += 1
                node.fetching[uri] = now + cost
                self.push(now + cost, "fetched", (node, uri))
            self.remember(w, uri)
        return cost

    def remember(self, w: _Worker, uri: str) -> None:
        _touch(w.mem, uri, self.farm.memory_adapters)


def _touch(lru: OrderedDict, key: str, size: int) -> None:
    """``key`` used now in an LRU of ``size`` entries: newest last, the oldest dropped."""
    lru[key] = True
    lru.move_to_end(key)
    if len(lru) > size:
        lru.popitem(last=False)


def simulate(policy: Policy, jobs: Sequence[QueuedJob], farm: FarmModel) -> SimResult:
    return Simulation(policy, jobs, farm).run()
