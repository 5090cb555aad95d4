"""Pure scheduling policy: which queued job runs on which render worker.

No Ray, no I/O, no clock. The dispatcher (``farm/dispatcher.py``) owns time, actors and
retries, and drives a policy through the incremental protocol below. The baselines in
``farm/policies.py`` follow it too, and ``benchmarks/sim.py`` drives these very objects.

Protocol. The policy owns the queue, indexed by composition, so a decision costs
O(workers^2 + log queue), never a scan of the queue::

    policy = AffinityScheduler()            # or farm.policies.make("fifo"), ...
    policy.submit(jobs)                     # QueuedJob objects, at any time
    loop:
        views = [WorkerView(...), ...]      # a fresh snapshot of every known worker
        for job_id, worker_id in policy.assign(views, now):
            send the job to that worker; count it in that worker's ``inflight``
        for worker_id, uris in policy.prefetch(views).items():
            make uris local to that worker (node disk, then its adapter cache), best effort
        wait for a finished job or new jobs, or until ``policy.wake_at()`` when not None
        finished (ok, or failed for good): policy.done(job_id)
        retryable failure, dead actor:     policy.done(job_id, requeue=True)
        cancel queued jobs:                policy.cancel(job_ids) -> the ids it removed

Snapshot rules. ``inflight`` counts jobs sent and not yet finished. ``composition`` is
what the worker has loaded (None before its first; "" is the base model); while
``inflight > 0`` the policy uses the composition of the last job it sent there instead,
since that is what the worker holds once its local queue drains. Dead workers
(``alive=False``) get nothing; their jobs come back through ``done(requeue=True)`` and
keep their ``enqueued_at``, so they keep their age.

Guarantees: ``assign`` gives a worker at most ``capacity - inflight`` jobs and never
returns a job twice (an assigned job leaves the queue until ``done(requeue=True)``);
``submit`` of an id that is queued or assigned raises ``ValueError``.

Costs: a switch costs ``compose_cost_s`` plus, per adapter not in the worker's memory,
``load_cost_s`` (on its node's disk) or ``fetch_cost_s`` (remote): ``switch_cost``.
``AffinityScheduler`` documents its decisions; ``JobQueue`` is the shared index.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Container, Iterable, Sequence

from farm import plan as batch_plan


NO_WORK = -math.inf  # the "priority" of a composition with nothing queued


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    composition: str  # routing key; "" = base model, no LoRA
    loras: tuple[str, ...] = ()  # adapter uris the composition needs
    priority: int = 0  # higher first
    enqueued_at: float = 0.0  # seconds, same clock as ``now``
    work: float = 1.0  # render cost relative to the farm's typical job; ``render_cost_s`` is per unit


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    node_id: str = ""
    composition: str | None = None  # loaded now; None = nothing yet, "" = base model
    adapters: frozenset[str] = frozenset()  # uris in the worker's memory cache
    node_disk: frozenset[str] = frozenset()  # uris on its node's disk cache
    inflight: int = 0  # sent and not finished
    capacity: int = 2  # max inflight
    compose_cost_s: float = 1.0  # measured estimates
    render_cost_s: float = 1.0
    fetch_cost_s: float = 1.0  # per adapter, remote storage -> node
    load_cost_s: float = 0.1  # per adapter, node disk -> memory
    alive: bool = True


@dataclass(kw_only=True)
class CostEstimate:
    """A worker's seconds per compose, per rendered job and per remote fetch: a prior until
    the first measurement, then an EWMA (weight 0.3) of the measurements. The dispatcher
    and the simulator share it."""

    compose_s: float = 1.0
    render_s: float = 1.0
    fetch_s: float = 1.0
    _measured: frozenset[str] = frozenset()  # the fields that left their prior

    @property
    def measured(self) -> frozenset[str]:
        """The fields that left their prior."""
        return self._measured

    @property
    def load_s(self) -> float:
        """Seconds to load an adapter from the node's disk: not measured on its own, taken as
        the fetch estimate capped at 0.1 s."""
        return min(self.fetch_s, 0.1)

    def observe(self, *, compose_s: float = 0.0, render_s: float = 0.0, fetch_s: float = 0.0) -> None:
        """One finished job's measured seconds; 0 means not measured (no switch, no fetch)."""
        for name, value in (("compose_s", compose_s), ("render_s", render_s), ("fetch_s", fetch_s)):
            if value > 0:
                old = getattr(self, name) if name in self._measured else value
                setattr(self, name, 0.7 * old + 0.3 * value)
                self._measured |= {name}


def switch_cost(worker: WorkerView, composition: str, loras: Iterable[str], current: str | None) -> float:
    """Estimated seconds for ``worker``, holding ``current``, to start on ``composition``."""
    if current == composition:
        return 0.0
    cost = worker.compose_cost_s
    for uri in loras:
        if uri not in worker.adapters:
            cost += worker.load_cost_s if uri in worker.node_disk else worker.fetch_cost_s
    return cost


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
        comp = self._comps.get(job.composition)
        if comp is None:
            comp = self._comps[job.composition] = _Comp(tuple(job.loras))
        entry = (-job.priority, job.enqueued_at, self._seq, job.job_id)
        heapq.heappush(comp.by_rank, entry)
        heapq.heappush(comp.by_age, (job.enqueued_at, self._seq, job.job_id))
        heapq.heappush(self._rank, entry)
        self._prio[job.priority] += 1
        self._prio_work[job.priority] = self._prio_work.get(job.priority, 0.0) + job.work
        comp.count += 1
        comp.work += job.work
        self._touch(job.composition, comp)

    def remove(self, job_id: str) -> QueuedJob | None:
        item = self._live.pop(job_id, None)
        if item is None:
            return None
        job = item[0]
        self._prio[job.priority] -= 1
        self._prio_work[job.priority] -= job.work
        if not self._prio[job.priority]:
            del self._prio[job.priority], self._prio_work[job.priority]
        comp = self._comps[job.composition]
        comp.count -= 1
        comp.work -= job.work
        self._touch(job.composition, comp)
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


class _Slot:
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

    def _slots(self, workers: Sequence[WorkerView]) -> list[_Slot]:
        slots, seen = [], set()
        for w in workers:
            if not w.alive or w.worker_id in seen:
                continue
            seen.add(w.worker_id)
            tail = self._tail.get(w.worker_id)
            slots.append(_Slot(w, tail[0] if tail and w.inflight > 0 else w.composition))
        return slots

    def _give(self, job: QueuedJob, slot: _Slot, out: list[tuple[str, str]], holders: Counter | None = None) -> None:
        if slot.spare <= 0:
            raise RuntimeError(f"policy {self.name} overfilled worker {slot.view.worker_id}")  # a bug, never input
        if holders is not None and slot.comp != job.composition:
            holders[slot.comp] -= 1
            holders[job.composition] += 1
        if slot.comp != job.composition:
            slot.delay += slot.view.compose_cost_s
        slot.spare -= 1
        slot.comp = job.composition
        slot.delay += slot.view.render_cost_s
        wid = slot.view.worker_id
        self._tail[wid] = (job.composition, tuple(job.loras))
        self._running[job.job_id] = (wid, job)
        self._newest = max(self._newest, job.enqueued_at)
        out.append((job.job_id, wid))


class AffinityScheduler(Policy):
    """LoRA affinity: a plan for a batch, greedy rules for arrivals, and an age bound.

    A batch (the queue as submitted, one priority level) is planned once by
    ``farm/plan.py``: per worker, an ordered list of pieces ``(composition, jobs)`` that
    ends all workers near the earliest end the plan can reach, splitting a composition
    over workers only where it must (each piece is one recomposition). Each ``assign``:

    1. age bound (``_serve_overdue``): a composition nobody holds whose oldest job has
       been overtaken for ``max_wait_s`` goes to the cheapest worker that breaks no
       affinity; after twice that, to the cheapest worker whatever it holds;
    2. plan: every worker with pieces left takes jobs of its current piece (a piece whose
       jobs went elsewhere is skipped). When a worker's pieces run out, the rest of the
       queue is planned again toward the same end time, in the same slack (seconds), so
       a worker that is early takes only work that would otherwise end late; while a
       plan runs, a worker without pieces takes only jobs no piece covers. A new plan is
       made when jobs it does not cover reach ``replan_share`` of those it does (e.g.
       retries), a worker joins, a planned one dies, or the mean render or compose
       estimate moves by 1.5x;
    3. without a plan (``plan=False``, several priority levels queued, or jobs that
       arrived while a plan ran, until the farm drains), the greedy rules:
       switch: compositions that want a worker, best first by (top priority, time to
       clear), each to its cheapest eligible worker. A composition nobody holds always
       wants one; a held one only while ``backlog * render / holders > switch + horizon``
       (replication). Eligible: a worker whose own composition has no work at that
       priority or above, so affinity is only broken for higher-priority work; then
       continue: every worker with room takes more of its own composition.

    "Cheapest" ranks workers by (own composition still has work, time until free + the
    ``switch_cost``), so memory beats node disk beats remote, and idle beats busy.

    Options: ``max_wait_s`` (None: no age bound). Age is counted against the newest job
    already assigned, not the clock, so a batch submitted at once is never reordered.
    ``plan`` (True), ``plan_slack`` (0.05: the plan may end up to 5% later than the
    earliest it found, to split fewer compositions), ``replan_share`` (0.1),
    ``weigh_jobs`` (True: the plan counts a job as its ``work`` units, e.g. pixels x
    steps against the run's mean job, and ``render_cost_s`` is per unit; False: every
    job as one).
    ``horizon_s`` (greedy rules; None: the farm's queued work per worker, so a hot
    composition is replicated up to about its share of the farm and no further).
    ``prefetch_lead_s`` (None: 8 x ``fetch_cost_s``): how early before a worker runs dry
    to hint its next composition (its next piece, under a plan).
    """

    name = "affinity"

    def __init__(
        self, *, max_wait_s: float | None = 600.0, horizon_s: float | None = None,
        prefetch_lead_s: float | None = None, plan: bool = True, plan_slack: float = 0.05,
        replan_share: float = 0.1, weigh_jobs: bool = True,
    ) -> None:
        super().__init__()
        self.prefetch_lead_s = prefetch_lead_s
        self.max_wait_s = max_wait_s
        self.horizon_s = horizon_s
        self.plan, self.plan_slack, self.replan_share = plan, plan_slack, replan_share
        self.weigh_jobs = weigh_jobs
        self._following = batch_plan.Following({}, self.queue.count)  # the plan, while one runs
        self._plan_for: frozenset[str] = frozenset()  # the workers the plan was made for
        self._plan_end = -math.inf  # when the plan means to be done (the clock of ``now``)
        self._plan_slack_s = 0.0  # the first plan's slack, in seconds
        self._plan_costs = (0.0, 0.0)  # mean render and compose seconds it was made with
        self._online = False  # jobs arrived while a plan ran: no plans until the farm drains
        self.plans_made = 0

    # ---- the batch plan (farm/plan.py) -------------------------------------------------
    def submit(self, jobs: Iterable[QueuedJob]) -> None:
        if self._following:  # arrivals while a plan runs: jobs trickle in, the greedy rules serve them
            self._online = True
            self._drop_plan()
        for job in jobs:
            super().submit((job,))
            self._following.joined(job.composition)

    def done(self, job_id: str, *, requeue: bool = False) -> None:
        item = self._running.get(job_id)
        super().done(job_id, requeue=requeue)
        if item is not None and requeue:
            self._following.joined(item[1].composition)

    def _replan(self, slots: list[_Slot], dead: set[str], now: float, *, ran_out: bool = False) -> None:
        """Plan the queue when there is no plan, or it is stale (many jobs it does not cover),
        or a worker joined or a planned one died, or the costs moved; with ``ran_out`` (a
        worker's pieces ran out), rebalance toward the same end time."""
        if not self.plan or self._online or self.queue.priorities() != 1:
            self._drop_plan()
            return
        alive = frozenset(s.view.worker_id for s in slots)
        costs = (sum(s.view.render_cost_s for s in slots) / len(slots),
                 sum(s.view.compose_cost_s for s in slots) / len(slots))
        f = self._following
        fresh = (alive <= self._plan_for and not any(w in f for w in dead)
                 and f.unplanned <= self.replan_share * f.planned
                 and all(0.67 <= a / b <= 1.5 for a, b in zip(costs, self._plan_costs) if b > 0))
        if fresh and not ran_out:
            return
        loras = self.queue.loras

        def switch(i: int, key: str, first: bool) -> float:
            s = slots[i]
            if first:
                return switch_cost(s.view, key, loras(key), s.comp)
            missing = sum(1 for u in loras(key) if u not in s.view.adapters)
            return s.view.compose_cost_s + missing * s.view.load_cost_s  # prefetched while it renders

        lanes = [batch_plan.Lane(s.delay, s.comp, max(s.view.render_cost_s, 1e-3)) for s in slots]
        sizes = self.queue.sizes()
        work = [(key, n) for key, n, _ in sizes]
        weight = {key: units / n for key, n, units in sizes if units > 0} if self.weigh_jobs else {}
        if fresh:  # rebalancing a running plan: its end and its slack in seconds stay
            pieces, end = batch_plan.plan(work, lanes, switch, weight=weight, slack_s=self._plan_slack_s,
                                          at_least=self._plan_end - now)
            self._plan_for, self._plan_end = alive | self._plan_for, max(self._plan_end, now + end)
        else:
            pieces, end = batch_plan.plan(work, lanes, switch, weight=weight, slack=self.plan_slack)
            self._plan_slack_s, self._plan_costs = self.plan_slack * end, costs
            self._plan_for, self._plan_end = alive, now + end
        self._following = batch_plan.Following(
            {s.view.worker_id: mine for s, mine in zip(slots, pieces)}, self.queue.count)
        self.plans_made += 1

    def _drop_plan(self) -> None:
        self._following = batch_plan.Following({}, self.queue.count)

    def _follow_plan(self, slots: list[_Slot], holders: Counter, out: list) -> bool:
        """Every planned worker takes jobs of its current piece; True when one's pieces ran out."""
        f, ran_out = self._following, False
        for s in slots:
            wid = s.view.worker_id
            if wid not in f:
                continue
            while s.spare > 0:
                key = f.current(wid)
                if key is None:  # its pieces ran out: it left the plan
                    ran_out = True
                    break
                self._give(self.queue.pop(key), s, out, holders)
                f.took(wid)
        return ran_out

    def _take_loose(self, free: list[_Slot], holders: Counter, out: list) -> None:
        """While a plan runs, workers without pieces take only the jobs no piece covers: their
        own composition's first, then the composition with the most such jobs."""
        f = self._following
        for s in free:
            while s.spare > 0 and (key := f.loose(s.comp)) is not None:
                self._give(self.queue.pop(key), s, out, holders)
                f.took_loose(key)

    def assign(self, workers: Sequence[WorkerView], now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        slots = self._slots(workers)
        if not len(self.queue) and not self._running:
            self._online = False  # drained: the next submit is a batch again
        if not slots or not len(self.queue):
            return out
        holders: Counter[str | None] = Counter(s.comp for s in slots)
        self._serve_overdue(slots, holders, now, out)
        dead = {w.worker_id for w in workers if not w.alive}
        self._replan(slots, dead, now)
        if self._follow_plan(slots, holders, out) and len(self.queue):
            self._replan(slots, dead, now, ran_out=True)
            self._follow_plan(slots, holders, out)
        unplanned = [s for s in slots if s.view.worker_id not in self._following]
        if self._following:
            self._take_loose(unplanned, holders, out)
            return out
        self._switch(slots, unplanned, holders, out)
        for s in unplanned:
            while s.spare > 0 and self.queue.count(s.comp):
                self._give(self.queue.pop(s.comp), s, out, holders)  # type: ignore[arg-type]
        return out

    def _serve_overdue(self, slots: list[_Slot], holders: Counter, now: float, out: list) -> None:
        """Age bound. Age counts against the newest job already assigned, not the clock:
        a job is overtaken only once later arrivals run, so a batch submitted at once is
        never reordered by it. Overtaken by ``max_wait_s``, a composition nobody holds
        takes a worker that breaks no affinity (its own composition has no work left or
        other holders); by twice that, the cheapest worker, whatever it holds."""
        free = [s for s in slots if s.spare > 0]
        if self.max_wait_s is None or not free:
            return
        newest = min(now, self._newest)
        held = {c for c, n in holders.items() if n > 0}
        for entry in self.queue.overdue(newest - self.max_wait_s, held, len(slots)):
            key, force = entry[-1], entry[0] <= newest - 2 * self.max_wait_s
            loras = self.queue.loras(key)
            ranked = []
            for s in free:
                own = self.queue.count(s.comp)
                orphans = own > 0 and holders[s.comp] == 1
                if force or not orphans:
                    ranked.append(((orphans, own > 0, s.delay + switch_cost(s.view, key, loras, s.comp)), s))
            if not ranked:
                continue
            slot = min(ranked, key=lambda r: r[0])[1]
            self._give(self.queue.pop_oldest(key), slot, out, holders)
            if slot.spare == 0:
                free.remove(slot)
                if not free:
                    return

    def _switch(self, slots: list[_Slot], greedy: list[_Slot], holders: Counter, out: list) -> None:
        free = [s for s in greedy if s.spare > 0]
        if not free:
            return
        rate = sum(s.view.render_cost_s for s in slots) / len(slots)
        compose = sum(s.view.compose_cost_s for s in slots) / len(slots)
        held = {c for c, n in holders.items() if n > 0}
        wants: list[tuple[float, float, str]] = []
        for key in held:
            if self.queue.count(key):
                wants.append(self._want(key, holders, rate))
        for entry in self.queue.largest(held, sum(s.spare for s in free)):
            wants.append((entry[0], self._rank(entry[-1], self.queue.work(entry[-1]) * rate + compose), entry[-1]))
        heapq.heapify(wants)
        while wants and free:
            neg_prio, _, key = heapq.heappop(wants)
            best = self._cheapest(free, key, -neg_prio)
            if best is None:
                continue
            slot, cost = best
            if holders[key] > 0 and (self.queue.work(key) * rate / holders[key]
                                     <= cost + self._horizon(-neg_prio, len(slots), held, rate, compose)):
                continue  # its holders clear it soon enough: another compose would be waste
            for _ in range(min(slot.spare, self.queue.count(key))):
                self._give(self.queue.pop(key), slot, out, holders)
            held.add(key)
            if slot.spare == 0:
                free.remove(slot)
            if self.queue.count(key):
                heapq.heappush(wants, self._want(key, holders, rate))

    def _want(self, key: str, holders: Counter, rate: float) -> tuple[float, Any, str]:
        return (-self.queue.top_priority(key), self._rank(key, self.queue.work(key) * rate / holders[key]), key)

    def _rank(self, key: str, clear_s: float) -> Any:
        """Within a priority level, the greedy rules serve compositions in this order (lowest
        first): the longest time to clear (per holder, with a compose for one nobody holds)."""
        return -clear_s

    def _cheapest(self, free: list[_Slot], key: str, priority: float) -> tuple[_Slot, float] | None:
        loras = self.queue.loras(key)
        best: tuple[tuple[bool, float], _Slot] | None = None
        for s in free:
            own = self.queue.top_priority(s.comp)
            if own >= priority:
                continue  # its own composition has work at least as urgent: keep affinity
            rank = (own != NO_WORK, s.delay + switch_cost(s.view, key, loras, s.comp))
            if best is None or rank < best[0]:
                best = (rank, s)
        return (best[1], best[0][1]) if best else None

    def _horizon(self, priority: float, workers: int, held: set, rate: float, compose: float) -> float:
        if self.horizon_s is not None:
            return self.horizon_s
        unheld = max(0, self.queue.compositions() - sum(1 for c in held if self.queue.count(c)))
        return (self.queue.work_at_least(priority) * rate + unheld * compose) / workers

    def prefetch(self, workers: Sequence[WorkerView]) -> dict[str, list[str]]:
        """Per worker, the uris missing from its memory (fetch to the node, then warm it) for the
        composition it was last sent and, when that composition runs dry within about a
        local queue's worth of jobs, for the composition it takes next: its next planned
        piece, or for a worker without a plan, a guess (the largest compositions nobody holds)."""
        slots = self._slots(workers)
        holders: Counter[str | None] = Counter(s.comp for s in slots)

        def lead(s: _Slot) -> float:  # start early enough for a few files down one node link
            return self.prefetch_lead_s if self.prefetch_lead_s is not None else 8 * s.view.fetch_cost_s

        nxt: dict[int, str] = {}
        guessing: list[tuple[float, int, _Slot]] = []  # (runway, order, slot): the soonest dry first
        for n, s in enumerate(slots):
            mine = self._following.upcoming(s.view.worker_id)  # its current and next pieces
            if not mine:
                runway = self.queue.work(s.comp) / max(holders[s.comp], 1) * s.view.render_cost_s
                if runway <= lead(s):  # its composition's queued work per holder runs out soon
                    guessing.append((runway, n, s))
            elif mine[0] != s.comp:
                nxt[id(s)] = mine[0]  # its next piece starts once its local queue drains
            elif len(mine) > 1 and self._following.left(s.view.worker_id) * s.view.render_cost_s <= lead(s):
                nxt[id(s)] = mine[1]
        upcoming = self.queue.largest({c for c in holders if c is not None}, len(guessing))
        nxt.update((id(g[-1]), entry[-1]) for g, entry in zip(sorted(guessing), upcoming))  # one guess per worker
        hints: dict[str, list[str]] = {}
        for s in slots:
            tail = self._tail.get(s.view.worker_id)
            wanted = list(tail[1]) if tail and tail[0] == s.comp else []
            if id(s) in nxt:
                wanted += self.queue.loras(nxt[id(s)])
            lacking = [u for u in dict.fromkeys(wanted) if u not in s.view.adapters]
            if lacking:
                hints[s.view.worker_id] = lacking
        return hints
