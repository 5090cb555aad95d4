"""``AffinityScheduler``: LoRA affinity, the policy the farm runs (rules in its docstring).

It decides from the ``JobQueue`` the base ``Policy`` keeps, prices switches with
``costs.switch_cost``, and for a batch follows a plan made by ``batch_plan``.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from .batch_plan import Following, Lane, make_plan
from .costs import switch_cost
from .fair import SMALL_RUN, FairRules, FairShare, Flow, FlowQueue
from .policy import Policy, Slot
from .queue import NO_WORK
from .types import QueuedJob, WorkerView


class AffinityScheduler(FairRules, Policy):
    """LoRA affinity: a plan for a batch, greedy rules for arrivals, and an age bound.

    A batch (the queue as submitted, one priority level) is planned once by
    ``batch_plan.py``: per worker, an ordered list of pieces ``(composition, jobs)`` that
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
    3. without a plan (``follow_plan=False``, several priority levels or, with ``fair``,
       several runs queued, or jobs that arrived while a plan ran, until the farm
       drains), the greedy rules (with ``fair``, and two or more runs queued at the top
       priority, first the fair-share rules of ``fair.py``):
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
    ``follow_plan`` (True: plan a batch; False: the greedy rules only), ``plan_slack``
    (0.05: the plan may end up to 5% later than the earliest it found, to split fewer
    compositions), ``replan_share`` (0.1),
    ``weigh_jobs`` (True: the plan counts a job as its ``work`` units, e.g. pixels x
    steps against the run's mean job, and ``render_cost_s`` is per unit; False: every
    job as one).
    ``horizon_s`` (greedy rules; None: the farm's queued work per worker, so a hot
    composition is replicated up to about its share of the farm and no further).
    ``prefetch_lead_s`` (None: 8 x ``fetch_cost_s``): how early before a worker runs dry
    to hint its next composition (its next piece, under a plan).

    Fair share (``fair.py``): ``fair`` (True: among runs of equal priority, workers are
    shared between submitters by ``weights``, default 1 each, in worker-seconds of
    rendering, by handing whole stretches of a composition to a submitter, and a small
    run behind a large one gets workers after the job they are on. While two or more
    runs have queued work at the top priority there is no batch plan and the greedy rules
    run with quotas; with one run every decision is the same as with ``fair=False``).
    ``fair_runs`` ("small": a submitter's runs pooled, but a run small when it arrives
    (``fair.SMALL_RUN`` of the queued work) is a flow of its own, so it is not left behind
    its submitter's large runs; True: every run a flow of its own, taking turns with its
    siblings; False: a submitter's runs all pooled).
    ``fair_tolerance`` (0.05) and ``fair_quantum_s`` (None: 2 x (compose + render)): the
    hysteresis of the shares, ``max(quantum, tolerance x usage)`` per unit of weight.
    ``set_weights`` changes the weights while it runs; ``yields`` counts the workers taken
    from unfinished work for fair share.
    """

    name = "affinity"

    def __init__(
        self, *, max_wait_s: float | None = 600.0, horizon_s: float | None = None,
        prefetch_lead_s: float | None = None, follow_plan: bool = True, plan_slack: float = 0.05,
        replan_share: float = 0.1, weigh_jobs: bool = True, fair: bool = True,
        weights: Mapping[str, float] | None = None, fair_tolerance: float = 0.05,
        fair_quantum_s: float | None = None, fair_runs: bool | str = "small",
    ) -> None:
        super().__init__()
        self.fair = fair
        self.share = FairShare(weights, tolerance=fair_tolerance, quantum_s=fair_quantum_s)
        self._tail_flow: dict[str, Flow] = {}  # worker -> the flow of the last job sent there
        self.yields: Counter = Counter()  # workers taken from unfinished work for fair share (fair.py)
        if fair:
            self.queue = FlowQueue(by_run=fair_runs)
        self.prefetch_lead_s = prefetch_lead_s
        self.max_wait_s = max_wait_s
        self.horizon_s = horizon_s
        self.follow_plan, self.plan_slack, self.replan_share = follow_plan, plan_slack, replan_share
        self.weigh_jobs = weigh_jobs
        self._following = Following({}, self.queue.count)  # the plan, while one runs
        self._plan_for: frozenset[str] = frozenset()  # the workers the plan was made for
        self._plan_end = -math.inf  # when the plan means to be done (the clock of ``now``)
        self._plan_slack_s = 0.0  # the first plan's slack, in seconds
        self._plan_costs = (0.0, 0.0)  # mean render and compose seconds it was made with
        self._online = False  # jobs arrived while a plan ran: no plans until the farm drains
        self.plans_made = 0

    # ---- fair share (fair.py) ---------------------------------------------------------
    def set_weights(self, weights: Mapping[str, float] | None) -> None:
        """New submitter weights (e.g. the farm config reloaded); usage so far is kept."""
        self.share.weights = FairShare(weights).weights

    def set_fair(self, on: bool) -> None:
        """Switch fair share on or off while it runs (a scheduler built with ``fair=True``: its
        queue keeps the flows either way; off, every decision is the one ``fair=False`` makes)."""
        if on and not isinstance(self.queue, FlowQueue):
            raise ValueError("set_fair(True) needs a scheduler built with fair=True (its queue tracks flows)")
        self.fair = bool(on)

    # ---- the batch plan (batch_plan.py) ------------------------------------------------
    def submit(self, jobs: Iterable[QueuedJob]) -> None:
        if self._following:  # arrivals while a plan runs: jobs trickle in, the greedy rules serve them
            self._online = True
            self._drop_plan()
        for job in jobs:
            super().submit((job,))
            self._following.joined(job.routing_key)
        if self.fair and isinstance(self.queue, FlowQueue) and self.queue.runs == "small":
            self.queue.split_small(SMALL_RUN)  # a run arrives whole: judged small or not now

    def done(self, job_id: str, *, requeue: bool = False) -> None:
        item = self._running.get(job_id)
        super().done(job_id, requeue=requeue)
        if item is not None and requeue:
            self._following.joined(item[1].routing_key)

    def _replan(self, slots: list[Slot], dead: set[str], now: float, *, ran_out: bool = False) -> None:
        """Plan the queue when there is no plan, or it is stale (many jobs it does not cover),
        or a worker joined or a planned one died, or the costs moved; with ``ran_out`` (a
        worker's pieces ran out), rebalance toward the same end time."""
        several = self.fair and isinstance(self.queue, FlowQueue) and len(self.queue.flows()) > 1
        if not self.follow_plan or self._online or self.queue.priorities() != 1 or several:
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

        lanes = [Lane(s.delay, s.comp, max(s.view.render_cost_s, 1e-3)) for s in slots]
        sizes = self.queue.sizes()
        work = [(key, n) for key, n, _ in sizes]
        weight = {key: units / n for key, n, units in sizes if units > 0} if self.weigh_jobs else {}
        if fresh:  # rebalancing a running plan: its end and its slack in seconds stay
            pieces, end = make_plan(work, lanes, switch, weight=weight, slack_s=self._plan_slack_s,
                                          at_least=self._plan_end - now)
            self._plan_for, self._plan_end = alive | self._plan_for, max(self._plan_end, now + end)
        else:
            pieces, end = make_plan(work, lanes, switch, weight=weight, slack=self.plan_slack)
            self._plan_slack_s, self._plan_costs = self.plan_slack * end, costs
            self._plan_for, self._plan_end = alive, now + end
        self._following = Following(
            {s.view.worker_id: mine for s, mine in zip(slots, pieces)}, self.queue.count)
        self.plans_made += 1

    def _drop_plan(self) -> None:
        self._following = Following({}, self.queue.count)

    def _follow_plan(self, slots: list[Slot], holders: Counter, out: list) -> bool:
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

    def _take_loose(self, free: list[Slot], holders: Counter, out: list) -> None:
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
        fair = self._round(slots)
        if fair is not None:  # two or more runs queued at the top priority: share the workers
            self._fair_greedy(slots, holders, out, fair)
        self._switch(slots, unplanned, holders, out)
        for s in unplanned:
            while s.spare > 0 and self.queue.count(s.comp):
                self._give(self.queue.pop(s.comp), s, out, holders)  # type: ignore[arg-type]
        return out

    def _serve_overdue(self, slots: list[Slot], holders: Counter, now: float, out: list) -> None:
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

    def _switch(self, slots: list[Slot], greedy: list[Slot], holders: Counter, out: list) -> None:
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

    def _cheapest(self, free: list[Slot], key: str, priority: float) -> tuple[Slot, float] | None:
        loras = self.queue.loras(key)
        best: tuple[tuple[bool, float], Slot] | None = None
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

        def lead(s: Slot) -> float:  # start early enough for a few files down one node link
            return self.prefetch_lead_s if self.prefetch_lead_s is not None else 8 * s.view.fetch_cost_s

        nxt: dict[int, str] = {}
        guessing: list[tuple[float, int, Slot]] = []  # (runway, order, slot): the soonest dry first
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
