"""The cost model (farm/scheduler/costs.py): the estimates learn as the dispatcher does, a
job weighs its steps x pixels, and a run's priors come from an earlier run's rows."""
from __future__ import annotations

import pytest

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.costs import CostEstimate, costs_from_rows, job_work


def test_cost_estimate_learns_like_the_dispatcher():
    from farm.dispatcher import WorkerBook
    from jobs.results import ResultRow

    est = CostEstimate(compose_s=1.0, render_s=1.0, fetch_s=1.0)
    est.observe(compose_s=0.0, render_s=2.0)  # the first measurement replaces the prior
    assert (est.compose_s, est.render_s, est.fetch_s) == (1.0, 2.0, 1.0)  # no switch, no fetch
    est.observe(render_s=1.0)  # then an EWMA
    assert est.render_s == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)
    for _ in range(40):
        est.observe(compose_s=5.0, render_s=0.5, fetch_s=0.2)
    assert [est.compose_s, est.render_s, est.fetch_s] == pytest.approx([5.0, 0.5, 0.2], abs=1e-4)
    book = WorkerBook("w0", None)  # the dispatcher's book is one; a row without a field learns nothing
    book.learn(ResultRow("j", "ok", compose_s=5.0, composition_key="k"))  # render_s 0: not measured
    assert (book.compose_s, book.render_s, book.switches) == (5.0, 1.0, 1)


def test_job_work_is_pixels_times_steps_against_the_mean():
    from types import SimpleNamespace as Job

    from farm.dispatcher import WorkerBook
    from jobs.results import ResultRow

    jobs = [Job(job_id="small", steps=4, width=512, height=512), Job(job_id="big", steps=4, width=1024, height=1024)]
    work = job_work(jobs)
    assert work["big"] == pytest.approx(4 * work["small"]) and sum(work.values()) == pytest.approx(2.0)
    book = WorkerBook("w0", None)
    book.learn(ResultRow("big", "ok", render_s=3.2, composition_key="k"), work["big"])  # 3.2 s for 1.6 units
    assert book.render_s == pytest.approx(2.0)  # seconds per unit of work, the policy's render_cost_s


def test_cost_priors_come_from_an_earlier_runs_rows():
    """A run into an output root that already holds results starts from what they measured:
    compose and fetch seconds as measured, render seconds scaled from the old jobs' steps x
    pixels to this run's mean job; failed rows and unmeasured fields teach nothing."""
    from types import SimpleNamespace as Job

    from farm.dispatcher import Dispatcher
    from jobs.results import ResultRow

    def row(i, status="ok", **kw):
        base = dict(job_id=f"old{i}", status=status, steps=4, width=512, height=512, finished_at=1000.0 + i)
        return ResultRow.from_dict({**base, **kw})

    assert costs_from_rows([], [Job(job_id="n", steps=4, width=512, height=512)]) is None
    assert costs_from_rows([row(0, compose_s=3.0, render_s=2.0, status="failed")], [Job(job_id="n", steps=4, width=512,
                                                                                          height=512)]) is None
    # 512^2 x 4 steps rendered in 2 s (one switch of 6 s among them, no fetch); this run's
    # mean job is 1024^2 x 8 steps, 8x the work: 16 s per job
    old = [row(i, render_s=2.0, compose_s=6.0 if i == 3 else 0.0) for i in range(10)]
    old.append(row(99, status="failed", render_s=500.0, compose_s=500.0))
    new = [Job(job_id="a", steps=8, width=1024, height=1024), Job(job_id="b", steps=8, width=1024, height=1024)]
    p = costs_from_rows(old, new)
    assert [p.compose_s, p.render_s, p.fetch_s] == pytest.approx([6.0, 16.0, 1.0])
    assert p.measured == frozenset(), "priors: the workers' first measurements replace them"
    view = Dispatcher({"w0": None, "w1": None}, AffinityScheduler(), "unused", priors=p)._views()
    assert {(v.compose_cost_s, v.render_cost_s, v.fetch_cost_s) for v in view} == {(p.compose_s, p.render_s, 1.0)}
    # the newest rows count most, as in the dispatcher's EWMA, and only the ``recent`` newest
    drift = [row(i, render_s=1.0 if i < 50 else 3.0) for i in range(60)]
    same = [Job(job_id="s", steps=4, width=512, height=512)]
    assert 2.9 < costs_from_rows(drift, same).render_s < 3.0
    assert costs_from_rows(drift, same, recent=10).render_s == pytest.approx(3.0)
