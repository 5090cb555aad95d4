"""Fair share between submitters, and between the runs of one submitter, kept with affinity.

A *flow* is what takes turns: one submitter's runs, pooled, and each *small* run of its own
(``FlowQueue(by_run="small")``, the default: a run with at most ``SMALL_RUN`` of the queued
work when it arrives is split out of its submitter's pool until its last job leaves; a
larger run stays pooled for good, its tail included). ``by_run=True`` makes every run a
flow, ``False`` pools them all. Among the flows with
queued work at the top priority (priority stays first), workers are shared in
proportion to the submitters' weights (default 1), measured in worker-seconds of
rendering, and a small run is not left behind its submitter's large ones. Sharing is by
worker, never by job: a worker serves one flow's composition until it must yield, so a
submitter's turn is a whole stretch of one composition, not interleaved single jobs.
Pooling the large runs matters: runs of one submitter taking turns among themselves cost
recompositions nobody asked for (``benchmarks/RESULTS.md``, "fair share and run arrivals").

The rules (``FairRules``, used by ``AffinityScheduler`` only while two or more flows
have queued work at the top priority, and never under a batch plan; with one flow every
decision is the one ``fair=False`` makes):

* quota: submitter s gets ``K * w_s / W`` workers, W the summed weights of the submitters
  with queued work at the top priority; its *cap* is the quota rounded up, less one
  worker per whole quantum s is ahead in the ledger (hysteresis: a fractional worker
  alternates in turns of about a quantum; a submitter whose workers compose more, and so
  render less of their time, still gets its share of rendering);
* the ledger (``FairShare``): each submitter's rendering seconds, charged when its jobs
  are assigned, over its weight. A submitter whose queue was empty joins at the lowest
  usage of those queued (no credit banked while it had nothing to run). The quantum is
  ``max(quantum_s, tolerance * usage since the set of queued submitters changed)``: turns
  grow as a stretch of sharing goes on, its cumulative error stays near ``tolerance``;
* switch: compositions that want a worker (nobody holds them, or replication by today's
  rule; for a submitter under its cap, with the horizon of that run alone on its part
  of the quota), those of submitters furthest under their cap first, each to its
  cheapest eligible worker: today's (no work of its own at that priority), or one that
  *yields*: every flow with jobs of what it holds is another submitter's, at its cap and
  a quantum ahead (no lead asked for a submitter that has no worker and a quantum of
  queued work), or, for a *small* run (at most ``SMALL_RUN`` of the queued work)
  with fewer workers than its even part of its submitter's quota, a sibling run with
  more workers than it, on a composition with more than a quantum of work left per
  holder (else its natural switch comes soon enough). Among those, a worker whose
  composition has other holders first (they finish it: nothing is composed twice for
  it). A small run behind a large one so starts after the job its worker is on. No
  worker yields (but for a small run) while another, busy, with no queued work of its
  composition left, frees about as soon: that one takes the flow next round;
* continue: a worker takes more of its own composition, from the flow with jobs of it
  whose submitter is furthest under its cap, its own flow among equals (a composition
  shared by several flows serves them all without a recomposition).

``FlowQueue`` (``flows.py``) is a ``JobQueue`` that also indexes its jobs by flow.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .costs import switch_cost
from .flows import Flow, FlowQueue
from .policy import Slot
from .queue import NO_WORK
from .types import QueuedJob

SMALL_RUN = 0.02  # a run is small with at most this share of the queued work (at the top priority)


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The submitters' weights, each a positive finite number (every problem named at once)."""
    out, bad = {}, []
    for name, w in (weights or {}).items():
        try:
            value = float(w)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            bad.append(f"{name!r}: {w!r}")
        out[str(name)] = value
    if bad:
        raise ValueError(f"submitter weights must be positive numbers; bad: {', '.join(bad)}")
    return out


class FairShare:
    """The ledger: per submitter, rendering seconds charged at assignment, over its weight."""

    def __init__(self, weights: Mapping[str, float] | None = None, *, tolerance: float = 0.05,
                 quantum_s: float | None = None) -> None:
        if not 0 <= tolerance < 1:
            raise ValueError(f"fair_tolerance must be in [0, 1), got {tolerance!r}")
        if quantum_s is not None and not quantum_s >= 0:
            raise ValueError(f"fair_quantum_s must be >= 0 seconds, got {quantum_s!r}")
        self.weights = check_weights(weights)
        self.tolerance, self.quantum_s = tolerance, quantum_s
        self.usage: dict[str, float] = {}  # seconds / weight
        self.seconds: Counter[str] = Counter()  # seconds charged, per submitter
        self._epoch: tuple[frozenset[str], float] = (frozenset(), 0.0)  # (queued submitters, lowest usage then)

    def weight(self, submitter: str) -> float:
        return self.weights.get(submitter, 1.0)

    def charge(self, submitter: str, seconds: float) -> None:
        self.usage[submitter] = self.usage.get(submitter, 0.0) + seconds / self.weight(submitter)
        self.seconds[submitter] += seconds

    def caps(self, submitters: Iterable[str], workers: int, quantum_s: float) -> tuple[
            dict[str, float], dict[str, int], dict[str, float], float]:
        """(quota, cap, lead) per submitter with queued work, and the quantum, for ``workers``
        workers; ``quantum_s`` is the quantum's floor when the constructor's is None."""
        who = sorted(set(submitters))
        self.observe(who)
        usage = {s: self.usage.get(s, 0.0) for s in who}
        low = min(usage.values())
        quantum = max(quantum_s if self.quantum_s is None else self.quantum_s,
                      self.tolerance * (low - self._epoch[1]))
        lead = {s: u - low for s, u in usage.items()}
        total = sum(self.weight(s) for s in who)
        quota = {s: workers * self.weight(s) / total for s in who}
        cap = {}
        for s in who:  # rounded up, one worker less per whole quantum ahead
            steps = math.floor(lead[s] / quantum) if quantum > 0 else int(lead[s] > 0)
            cap[s] = max(0, math.ceil(quota[s] - 1e-9) - steps)
        return quota, cap, lead, quantum

    def observe(self, queued: Iterable[str]) -> None:
        """The submitters with queued work now. One that was not queued before joins at the
        lowest usage of those that were (no credit banked while it had nothing to run);
        those keep their leads, a debt carried into the next stretch of sharing."""
        who = frozenset(queued)
        before = self._epoch[0]
        if who == before:
            return
        stay = [self.usage.get(s, 0.0) for s in who & before]
        if stay:
            for s in who - before:
                self.usage[s] = max(self.usage.get(s, 0.0), min(stay))
        self._epoch = (who, min((self.usage.get(s, 0.0) for s in who), default=0.0))

    def since(self, submitter: str) -> float:
        """Usage ahead of the lowest of those queued now (what the caps compare)."""
        low = min((self.usage.get(s, 0.0) for s in self._epoch[0]), default=0.0)
        return self.usage.get(submitter, 0.0) - low


@dataclass
class Round:
    """One ``assign`` call's view of the flows: quotas and caps per submitter, who serves whom."""

    priority: float
    flows: set[Flow]  # with queued work at ``priority``
    small: set[Flow]  # of those, runs with at most ``SMALL_RUN`` of the queued work
    quota: dict[str, float]
    cap: dict[str, int]
    lead: dict[str, float]  # submitter -> usage ahead of the lowest
    quantum: float
    sub_work: Counter = field(default_factory=Counter)  # submitter -> its queued work at ``priority`` (units)
    serving: dict[str, Flow] = field(default_factory=dict)  # worker id -> flow it serves
    n: Counter = field(default_factory=Counter)  # flow -> workers serving it
    n_sub: Counter = field(default_factory=Counter)  # submitter -> workers serving it

    def fits(self, f: Flow, mine: Flow | None = None) -> bool:
        """Flow ``f``'s submitter may have one more worker (or keep ``mine``'s) within its cap."""
        s = f[0]
        return f in self.flows and self.n_sub[s] - (mine is not None and mine[0] == s) < self.cap[s]

    def share(self, f: Flow) -> float:
        """Workers serving ``f``'s submitter over its quota (inf for a flow not sharing)."""
        return self.n_sub[f[0]] / self.quota[f[0]] if f in self.flows else math.inf

    def even(self, f: Flow) -> float:
        """``f``'s even part of its submitter's quota, between the submitter's runs sharing."""
        return self.quota[f[0]] / sum(1 for g in self.flows if g[0] == f[0])

    def move(self, worker_id: str, f: Flow | None) -> None:
        old = self.serving.pop(worker_id, None)
        if old is not None:
            self.n[old] -= 1
            self.n_sub[old[0]] -= 1
        if f is not None and f in self.flows:
            self.serving[worker_id] = f
            self.n[f] += 1
            self.n_sub[f[0]] += 1


class FairRules:
    """Mixin for ``AffinityScheduler``: the greedy rules with fair share (module docstring).
    Uses the scheduler's ``queue`` (a ``FlowQueue``), ``share``, ``_give`` and cost helpers."""

    queue: FlowQueue
    share: FairShare
    fair: bool
    # workers taken from unfinished work: (for submitter, its composition had other holders,
    # to replicate one held already) -> how many
    yields: Counter

    def _round(self, slots: list[Slot]) -> Round | None:
        """None unless two or more flows have queued work at the top priority."""
        q = self.queue
        if not self.fair or not isinstance(q, FlowQueue):
            return None
        top = q.top()
        if q.runs == "small":
            q.split_small(SMALL_RUN)  # runs not judged at submit (``AffinityScheduler.submit``)
        active = [f for f in q.flows() if q.flow(f).top() == top]
        if len(active) < 2:
            self.share.observe(s for s, _ in active)
            return None
        turn = 2 * sum(s.view.compose_cost_s + s.view.render_cost_s for s in slots) / len(slots)
        quota, cap, lead, quantum = self.share.caps((f[0] for f in active), len(slots), turn)
        work = {f: q.flow(f).work_at_least(top) for f in active}
        limit = SMALL_RUN * sum(work.values())
        r = Round(top, set(active), {f for f in active if work[f] <= limit}, quota, cap, lead, quantum)
        for f in active:
            r.sub_work[f[0]] += work[f]
        for s in slots:
            f = self._tail_flow.get(s.view.worker_id)  # type: ignore[attr-defined]
            if f in r.flows and s.comp is not None and q.flow(f).count(s.comp):
                r.move(s.view.worker_id, f)
        return r

    def _give(self, job: QueuedJob, slot: Slot, out: list, holders: Counter | None = None) -> None:
        super()._give(job, slot, out, holders)  # type: ignore[misc]
        if isinstance(self.queue, FlowQueue):
            self._tail_flow[slot.view.worker_id] = self.queue.flow_id(job)  # type: ignore[attr-defined]
        self.share.charge(job.submitter, job.work * slot.view.render_cost_s)

    def _fair_greedy(self, slots: list[Slot], holders: Counter, out: list, r: Round) -> None:
        """Switch (flows under their cap first), then continue; what is left, today's rules."""
        free = [s for s in slots if s.spare > 0]
        rate = sum(s.view.render_cost_s for s in slots) / len(slots)
        compose = sum(s.view.compose_cost_s for s in slots) / len(slots)
        held = {c for c, n in holders.items() if n > 0}
        wants: list[tuple] = []
        for f in r.flows:
            fq = self.queue.flow(f)
            keys = [k for k in held if fq.count(k)] + [e[-1] for e in fq.largest(held, sum(s.spare for s in free))]
            wants += [w for k in keys if (w := self._fair_want(f, k, holders, rate, compose, r))]
        heapq.heapify(wants)
        while wants and free:
            popped = heapq.heappop(wants)
            key, f = popped[-2], popped[-1]
            now = self._fair_want(f, key, holders, rate, compose, r)
            if now is None:
                continue
            if now != popped:  # its rank moved since it was pushed
                heapq.heappush(wants, now)
                continue
            best = self._fair_cheapest(free, key, f, r, -popped[0], holders)
            if best is None:
                continue
            slot, cost = best
            if holders[key] > 0 and (self.queue.work(key) * rate / holders[key]
                                     <= cost + self._fair_horizon(f, r, len(slots), held, rate, compose)):
                continue  # its holders clear it soon enough
            if f not in r.small and self.queue.count(slot.comp) and self._dries_soon(slots, slot):
                continue  # a worker running dry takes it next round (a small run does not wait for it)
            if self.queue.count(slot.comp):  # it leaves work of its composition: a yield
                self.yields[(f[0], holders[slot.comp] > 1, holders[key] > 0)] += 1
            for _ in range(min(slot.spare, self.queue.count(key))):
                g = f if self.queue.flow(f).count(key) else self._fair_pick(slot, key, r)
                self._fair_give(self.queue.pop_from(g, key), slot, out, holders, r)
            held.add(key)
            if slot.spare == 0:
                free.remove(slot)
            if (w := self._fair_want(f, key, holders, rate, compose, r)) is not None:
                heapq.heappush(wants, w)
        for s in slots:
            while s.spare > 0 and self.queue.count(s.comp):
                self._fair_give(self.queue.pop_from(self._fair_pick(s, s.comp, r), s.comp), s, out, holders, r)

    def _fair_want(self, f: Flow, key: str, holders: Counter, rate: float, compose: float, r: Round) -> tuple | None:
        fq = self.queue.flow(f)
        if not fq.count(key):
            return None
        work = self.queue.work(key) * rate  # a replica serves every flow's jobs of it
        clear = work / holders[key] if holders[key] > 0 else work + compose
        return (-fq.top_priority(key), not r.fits(f), r.share(f), self.share.since(f[0]), r.n[f] > 0,
                self._rank(key, clear), key, f)  # type: ignore[attr-defined]

    def _fair_cheapest(self, free: list[Slot], key: str, f: Flow, r: Round, priority: float,
                       holders: Counter) -> tuple[Slot, float] | None:
        """Today's ``_cheapest``, where a worker that must yield to ``f`` is eligible too: one
        whose composition has other holders first (they finish it: no recomposition lost)."""
        loras = self.queue.loras(key)
        best: tuple[tuple[bool, bool, float], Slot] | None = None
        for s in free:
            own = self.queue.top_priority(s.comp)
            if own >= priority and not self._yields(s, f, r, holders):
                continue
            rank = (own != NO_WORK, own != NO_WORK and holders[s.comp] <= 1,
                    s.delay + switch_cost(s.view, key, loras, s.comp))
            if best is None or rank < best[0]:
                best = (rank, s)
        return (best[1], best[0][2]) if best else None

    def _yields(self, s: Slot, f: Flow, r: Round, holders: Counter) -> bool:
        """Slot ``s`` should leave its composition for flow ``f``: every flow with jobs of what
        ``s`` holds is either another submitter's, at its cap even without ``s`` and a quantum
        ahead of ``f``'s (which fits under its own; no lead is asked while ``f``'s submitter
        has no worker at all and a quantum of queued work: one that joins starts after the job
        its worker is on, and a trickle of one-job runs does not pull workers off), or a
        sibling run of ``f`` with more workers while ``f`` is a small run short of its even
        part and ``s``'s composition has more than a quantum of work left per holder (a
        small run behind a large one starts)."""
        soon = self.queue.work(s.comp) * s.view.render_cost_s <= r.quantum * max(1, holders[s.comp])
        mine = r.serving.get(s.view.worker_id)
        # a submitter with no worker and a turn's worth of queued work is not asked for a lead
        joining = r.n_sub[f[0]] == 0 and r.sub_work[f[0]] * s.view.render_cost_s >= r.quantum
        for h in self.queue.flows_of(s.comp):
            if h not in r.flows:
                continue  # lower priority work
            if h == f:
                return False
            if h[0] == f[0]:  # a sibling: not when its composition ends within a quantum anyway
                if soon or not (f in r.small and r.n[f] < r.even(f) and r.n[h] > max(1, r.n[f] + 1)):
                    return False
            elif not r.fits(f) or r.fits(h, mine) or (not joining and r.lead[h[0]] - r.lead[f[0]] <= r.quantum):
                return False
        return True

    def _dries_soon(self, slots: list[Slot], slot: Slot) -> bool:
        """Another worker, busy, with no queued work of its composition left, is free about as
        soon as ``slot`` could start (within one compose and one render of it): better that one
        than taking ``slot`` off unfinished work, which someone must compose again."""
        bound = slot.delay + slot.view.compose_cost_s + slot.view.render_cost_s
        return any(s is not slot and s.spare <= 0 and not self.queue.count(s.comp) and s.delay <= bound
                   for s in slots)

    def _fair_pick(self, s: Slot, key: str, r: Round) -> Flow:
        """Whose job of ``key`` slot ``s`` takes: a flow whose submitter fits under its cap,
        furthest under it first, its own flow first among equals."""
        mine = r.serving.get(s.view.worker_id)

        def rank(h: Flow) -> tuple:
            return (not r.fits(h, mine), h not in r.flows, r.share(h), h != mine, self.share.since(h[0]), h)
        return min(self.queue.flows_of(key), key=rank)

    def _fair_give(self, job: QueuedJob, s: Slot, out: list, holders: Counter, r: Round) -> None:
        f = self.queue.flow_id(job)
        if r.serving.get(s.view.worker_id) != f:
            r.move(s.view.worker_id, f)
        self._give(job, s, out, holders)

    def _fair_horizon(self, f: Flow, r: Round, workers: int, held: set, rate: float, compose: float) -> float:
        """The replication horizon: today's, or for a flow under its cap, that flow's alone on its quota."""
        farm = self._horizon(r.priority, workers, held, rate, compose)  # type: ignore[attr-defined]
        if not r.fits(f) or getattr(self, "horizon_s", None) is not None:
            return farm
        fq = self.queue.flow(f)
        unheld = max(0, fq.compositions() - sum(1 for c in held if fq.count(c)))
        return min(farm, (fq.work_at_least(r.priority) * rate + unheld * compose) / max(r.even(f), 1.0))


__all__ = ["FairRules", "FairShare", "Flow", "FlowQueue", "Round", "check_weights"]
