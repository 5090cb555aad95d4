"""The cost model, all of it: what a switch costs, what a job weighs, and the estimates
learned from measured seconds.

* ``switch_cost``: seconds for a worker to start a composition, from what it holds;
* ``job_work``: each job's render cost relative to its run's mean job (steps x pixels);
* ``CostEstimate``: a worker's seconds per compose, render and fetch, learned as an EWMA;
  the dispatcher's ``WorkerBook`` and the simulator both learn through it;
* ``costs_from_rows``: priors for a run from an earlier run's result rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from .types import WorkerView


class JobShape(Protocol):
    """What ``job_work`` weighs: a ``jobs.Job``, or a result row, which repeats its fields."""

    steps: int
    width: int
    height: int


class ShapedJob(JobShape, Protocol):
    """A job ``job_work`` weighs and keys by its id."""

    job_id: str


class MeasuredRow(JobShape, Protocol):
    """The fields of a result row (``jobs.results.ResultRow``) ``costs_from_rows`` reads."""

    status: str
    finished_at: float
    compose_s: float
    fetch_s: float
    render_s: float


@dataclass(kw_only=True)
class CostEstimate:
    """A worker's seconds per compose, per rendered job, per remote fetch and per swap to a
    prepared composition: a prior until
    the first measurement, then an EWMA (weight 0.3) of the measurements. The dispatcher
    and the simulator share it."""

    compose_s: float = 1.0
    render_s: float = 1.0
    fetch_s: float = 1.0
    swap_s: float = 0.05  # a switch to a composition the worker keeps prepared
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

    def observe(self, *, compose_s: float = 0.0, render_s: float = 0.0, fetch_s: float = 0.0,
                swap_s: float = 0.0) -> None:
        """One finished job's measured seconds; 0 means not measured (no switch, no fetch)."""
        for name, value in (("compose_s", compose_s), ("render_s", render_s), ("fetch_s", fetch_s),
                            ("swap_s", swap_s)):
            if value > 0:
                old = getattr(self, name) if name in self._measured else value
                setattr(self, name, 0.7 * old + 0.3 * value)
                self._measured |= {name}


def switch_cost(worker: WorkerView, composition: str, loras: Iterable[str], current: str | None) -> float:
    """Estimated seconds for ``worker``, holding ``current``, to start on ``composition``: what it
    holds is a set of tiers, each at its own cost: the composition itself (0), one it keeps
    prepared (a swap of tensors), else a compose; either way plus each adapter's way into
    memory (in memory already, on the node's disk, or remote): a worker reads a prepared
    composition's adapters too before it swaps (it knows the composition by their content)."""
    if current == composition:
        return 0.0
    cost = worker.swap_cost_s if composition in worker.prepared else worker.compose_cost_s
    for uri in loras:
        if uri not in worker.adapters:
            cost += worker.load_cost_s if uri in worker.node_disk else worker.fetch_cost_s
    return cost


def _pixel_steps(job: JobShape) -> float:
    return float(job.steps * job.width * job.height)


def job_work(jobs: Sequence[ShapedJob]) -> dict[str, float]:
    """Each job's render cost relative to the mean job of ``jobs``: steps x pixels, the
    transformer's work (attention's quadratic term ignored)."""
    raw = {j.job_id: _pixel_steps(j) for j in jobs}
    mean = sum(raw.values()) / len(raw) if raw else 1.0
    return {jid: (w / mean if mean > 0 else 1.0) for jid, w in raw.items()}


def costs_from_rows(rows: Sequence[MeasuredRow], jobs: Sequence[JobShape], recent: int = 256) -> CostEstimate | None:
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
