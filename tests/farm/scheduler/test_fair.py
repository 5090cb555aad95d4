"""Fair share between submitters and runs (farm/scheduler/fair.py) in the policy and the simulator:
shares within the target at 1:1 and 1:2, no head-of-line blocking, today's decisions for one run."""
from __future__ import annotations

import random

import pytest

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.fair import FairShare, FlowQueue
from farm.scheduler.sim import FarmModel, make_workload, simulate
from farm.scheduler.sim_fair import (
    busy_windows, fair_shares, make_behind_workload, make_runs_workload, run_latency,
)
from farm.scheduler.types import QueuedJob, WorkerView


class Recording(AffinityScheduler):
    """The policy, keeping every ``assign`` answer (time, pairs) in order."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.log: list[tuple[float, list[tuple[str, str]]]] = []

    def assign(self, workers, now):
        out = super().assign(workers, now)
        self.log.append((now, out))
        return out


def _relabel(jobs: list[QueuedJob], run: str, submitter: str) -> list[QueuedJob]:
    return [QueuedJob(j.job_id, j.routing_key, j.loras, j.priority, j.enqueued_at, j.work, run=run,
                      submitter=submitter) for j in jobs]


@pytest.mark.parametrize("arrival,mixed,prior,label", [
    ("batch", False, None, ("", "")), ("batch", True, None, ("run-1", "alice")),
    ("bursty", False, None, ("", "")), ("bursty", True, 1.0, ("run-1", "alice")),
    ("batch", False, 1.0, ("run-1", "bob")),
])
def test_one_run_one_submitter_assigns_exactly_as_fair_false(arrival, mixed, prior, label):
    jobs = make_workload(400, 20, 1.0, 3, arrival=arrival, span_s=150.0, mixed_sizes=mixed)
    jobs = _relabel(jobs, *label)
    for workers, compose in ((3, 5.0), (8, 1.0)):
        farm = FarmModel(workers, compose, 1.0, prior_s=prior)
        fair, unfair = Recording(weights={"alice": 3.0, "bob": 0.5}), Recording(fair=False)
        a, b = simulate(fair, jobs, farm), simulate(unfair, jobs, farm)
        assert fair.log == unfair.log
        assert (a.makespan, a.recompositions) == (b.makespan, b.recompositions)
        assert fair.yields == {}


@pytest.mark.parametrize("weights,workers,jobs,seed", [
    ({"a": 1, "b": 1}, 4, 800, 1), ({"a": 1, "b": 2}, 4, 800, 1), ({"a": 1, "b": 2}, 8, 1200, 3),
])
def test_shares_follow_the_weights_while_both_have_queued_work(weights, workers, jobs, seed):
    farm = FarmModel(workers, 2.0, 1.0)
    work = make_runs_workload(jobs, 60, 0.9, seed, submitters=tuple(weights), span_s=40.0)
    fair = fair_shares(simulate(AffinityScheduler(weights=weights), work, farm).trace, weights)
    unfair = fair_shares(simulate(AffinityScheduler(fair=False), work, farm).trace, weights)
    assert fair["window_s"] > 60  # a long stretch where both have queued work
    assert fair["worst"] <= 0.10, fair
    assert unfair["worst"] > 0.10, unfair  # without fair share the same workload misses it
    for s, part in fair["submitters"].items():
        assert part["target"] == pytest.approx(weights[s] / sum(weights.values()))


@pytest.mark.parametrize("same_submitter", [False, True])
@pytest.mark.parametrize("workers,compose", [(2, 1.0), (8, 1.0), (8, 20.0), (16, 5.0)])
def test_a_small_run_behind_a_large_one_is_not_blocked(same_submitter, workers, compose):
    farm = FarmModel(workers, compose, 1.0)
    at = 50.0
    work, alone = make_behind_workload(2000, 20, 0.9, 0, small=20, at_s=at, same_submitter=same_submitter)
    by_itself = run_latency(simulate(AffinityScheduler(), alone, farm).trace)["small"]
    fair = simulate(AffinityScheduler(), work, farm)
    unfair = simulate(AffinityScheduler(fair=False), work, farm)
    assert run_latency(fair.trace)["small"] <= 2.0 * by_itself
    assert run_latency(unfair.trace)["small"] > 5.0 * by_itself  # head-of-line blocking without it
    first = min((t for t in fair.trace if t[0].run == "small"), key=lambda t: t[2])
    assert first[1] - at <= farm.render_s + 1e-9  # assigned once some worker has room: one job's time
    assert first[2] - at <= 2 * farm.render_s + 1e-9  # and started behind at most the one queued there


def test_priority_stays_first_whatever_the_weights():
    jobs = [QueuedJob(f"a{i}", f"ca{i % 2}", (f"ua{i % 2}",), 0, 0.0, run="big", submitter="a") for i in range(60)]
    jobs += [QueuedJob(f"b{i}", f"cb{i % 2}", (f"ub{i % 2}",), 5, 0.0, run="urgent", submitter="b") for i in range(10)]
    r = simulate(AffinityScheduler(weights={"a": 100.0, "b": 1.0}), jobs, FarmModel(2, 2.0, 1.0))
    start = {t[0].job_id: t[2] for t in r.trace}
    assert max(start[f"b{i}"] for i in range(10)) < min(start[f"a{i}"] for i in range(60))


def test_ledger_quotas_caps_and_no_banked_credit():
    share = FairShare({"a": 1, "b": 2}, tolerance=0.0, quantum_s=10.0)
    quota, cap, lead, _ = share.caps(["a", "b"], 3, 0.0)
    assert quota == pytest.approx({"a": 1.0, "b": 2.0}) and cap == {"a": 1, "b": 2}
    share.charge("a", 25.0)  # a is 2.5 quanta ahead of b: two workers fewer than its rounded-up quota
    quota, cap, lead, _ = share.caps(["a", "b"], 5, 0.0)
    assert lead == {"a": 25.0, "b": 0.0} and cap == {"a": max(0, 2 - 2), "b": 4}
    share.charge("b", 100.0)  # b: 50 per unit of weight
    share.caps(["b"], 5, 0.0)  # a's queue empties ...
    share.charge("b", 400.0)
    share.caps(["a", "b"], 5, 0.0)  # ... and fills again: it joins at b's usage, no credit for the gap
    assert share.since("a") == 0.0 and share.usage["a"] == share.usage["b"] == 250.0


def test_weights_are_checked_and_named():
    with pytest.raises(ValueError, match=r"'bob': -1.*'eve': 'x'|'eve'.*'bob'"):
        AffinityScheduler(weights={"alice": 2, "bob": -1, "eve": "x"})
    policy = AffinityScheduler()
    policy.set_weights({"alice": 3})
    assert policy.share.weight("alice") == 3.0 and policy.share.weight("nobody") == 1.0
    with pytest.raises(ValueError, match="'z': 0"):
        policy.set_weights({"z": 0})


@pytest.mark.parametrize("runs", ["all", "none", "small"])
def test_flow_queue_index_matches_its_jobs(runs):
    rng = random.Random(5)
    q, live = FlowQueue(by_run=runs), {}
    for step in range(3000):
        op = rng.random()
        if runs == "small" and op > 0.97:
            q.split_small(rng.uniform(0, 0.5))
        if op < 0.5 or not live:
            job = QueuedJob(f"j{step}", f"c{rng.randint(0, 6)}", (), rng.randint(0, 1), float(step),
                            run=f"r{rng.randint(0, 3)}", submitter=rng.choice("ab"))
            q.add(job)
            live[job.job_id] = job
        elif op < 0.7:
            job = live[rng.choice(sorted(live))]
            assert q.pop_from(q.flow_id(job), job.routing_key).routing_key == job.routing_key
            live = {j.job_id: j for j in live.values() if j.job_id in q}
        elif op < 0.85:
            del live[q.pop(rng.choice(sorted({j.routing_key for j in live.values()}))).job_id]
        else:
            q.remove(rng.choice(sorted(live)))
            live = {j.job_id: j for j in live.values() if j.job_id in q}
        if step % 100 == 0:
            flows = {q.flow_id(j) for j in live.values()}
            assert set(q.flows()) == flows and len(q) == len(live)
            if runs != "small":
                assert flows == {(j.submitter, j.run if runs == "all" else "") for j in live.values()}
            for f in flows:
                mine = [j for j in live.values() if q.flow_id(j) == f]
                assert len(q.flow(f)) == len(mine)
                for key in {j.routing_key for j in mine}:
                    assert q.flows_of(key)[f] == sum(j.routing_key == key for j in mine)
            assert sorted(q.submitters()) == sorted({j.submitter for j in live.values()})
    with pytest.raises(KeyError, match="no queued job"):
        q.pop_from(("nobody", ""), "c0")


def test_small_runs_split_out_as_they_arrive_and_large_ones_stay_pooled_for_good():
    q = FlowQueue(by_run="small")
    for i in range(100):
        q.add(QueuedJob(f"big{i}", f"c{i % 3}", (), run="big", submitter="a"))
    q.split_small(0.02)  # 100 of 100 queued: large
    for i in range(2):
        q.add(QueuedJob(f"small{i}", "c0", (), run="small", submitter="a"))
    q.add(QueuedJob("other0", "c1", (), run="other", submitter="b"))
    q.split_small(0.02)  # 2 (and 1) of 103: small
    assert sorted(q.flows()) == [("a", ""), ("a", "small"), ("b", "other")]
    assert dict(q.flows_of("c0")) == {("a", ""): 34, ("a", "small"): 2}
    while len(q.flow(("a", ""))) > 1:  # the large run's tail is small now, and stays pooled
        q.remove(q.flow(("a", "")).peek(next(k for k in ("c0", "c1", "c2") if q.flow(("a", "")).count(k))))
    q.split_small(1e9)
    assert ("a", "big") not in q.flows() and ("a", "") in q.flows()
    for i in range(2):  # a run's verdict outlives its queued jobs: a retried job rejoins its flow
        q.remove(f"small{i}")
    assert ("a", "small") not in q.flows()
    q.add(QueuedJob("small0", "c2", (), run="small", submitter="a"))
    assert q.flow_id(QueuedJob("x", "c2", (), run="small", submitter="a")) == ("a", "small")
    while len(q.flow(("a", ""))):  # every job of the large run on a worker, then one retried
        q.remove(q.flow(("a", "")).peek(next(k for k in ("c0", "c1", "c2") if q.flow(("a", "")).count(k))))
    q.add(QueuedJob("big0", "c0", (), run="big", submitter="a"))
    q.split_small(1.0)
    assert q.flow_id(QueuedJob("big0", "c0", (), run="big", submitter="a")) == ("a", "")
    with pytest.raises(ValueError, match="runs='small'"):
        FlowQueue(by_run=True).split_small(1.0)
    with pytest.raises(ValueError, match="must be one of"):
        FlowQueue(by_run="some")


def test_a_run_is_judged_against_the_work_at_its_own_priority():
    q = FlowQueue(by_run="small")
    q_jobs = [QueuedJob(f"big{i}", "c0", (), 0, run="big", submitter="a") for i in range(2000)]
    q_jobs += [QueuedJob(f"hi{i}", "c1", (), 1, run="hi", submitter="b") for i in range(300)]
    q_jobs += [QueuedJob(f"low{i}", "c2", (), 0, run="low", submitter="a") for i in range(20)]
    for job in q_jobs:
        q.add(job)
    q.split_small(0.02)  # 20 of the 2320 queued at priority 0 and above: small; 300 of 300 at 1: not
    assert sorted(q.flows()) == [("a", ""), ("a", "low"), ("b", "")]


def test_a_small_run_submitted_with_a_large_one_is_not_left_behind_it():
    """Both runs of one submitter arriving at once (a controller recovering them, two submits in
    one dispatcher step): the small one is judged at submit, so no batch plan of the pool hides it."""
    farm = FarmModel(4, 5.0, 1.0)
    work, alone = make_behind_workload(2000, 20, 0.9, 0, small=20, at_s=0.0, same_submitter=True)
    by_itself = run_latency(simulate(AffinityScheduler(), alone, farm).trace)["small"]
    latency = run_latency(simulate(AffinityScheduler(), work, farm).trace)["small"]
    assert latency <= 2.0 * by_itself, (latency, by_itself)


def test_one_submitters_large_runs_take_no_turns_among_themselves():
    """Runs of one submitter, each large when it arrives, are one flow: every decision is the
    one fair=False makes (with every run a flow of its own they would take turns)."""
    rng = random.Random(3)
    work = [QueuedJob(f"r{r}-{i}", f"c{r}-{rng.randint(0, 2)}", (f"u{r}",), 0, 30.0 * r, run=f"r{r}", submitter="a")
            for r in range(4) for i in range(150)]
    farm = FarmModel(4, 5.0, 1.0)
    logs = []
    for kw in ({}, {"fair": False}, {"fair_runs": True}):
        policy = Recording(**kw)
        simulate(policy, work, farm)
        logs.append(policy.log)
    assert logs[0] == logs[1]
    assert logs[2] != logs[1]


def test_cancel_and_requeue_keep_the_flow_index():
    policy = AffinityScheduler()
    policy.submit([QueuedJob(f"{s}{i}", "c", ("u",), run=s, submitter=s) for s in "ab" for i in range(3)])
    assert sorted(policy.cancel(["a0", "a1", "zz"])) == ["a0", "a1"]
    views = [WorkerView("w0", capacity=1)]
    (job_id, _), = policy.assign(views, 0.0)
    policy.done(job_id, requeue=True)
    assert sum(len(policy.queue.flow(f)) for f in policy.queue.flows()) == len(policy.queue) == 4


@pytest.mark.parametrize("seed", range(6))
def test_many_submitters_and_runs_keep_the_protocol(seed):
    """The simulator checks the protocol (no job twice, none to a full worker, none left)."""
    rng = random.Random(seed)
    subs = tuple("abcd"[: rng.randint(2, 4)])
    weights = {s: rng.choice((0.5, 1, 2, 3)) for s in subs}
    work = make_runs_workload(rng.randint(50, 400), rng.randint(3, 30), rng.uniform(0.5, 1.5), seed,
                              submitters=subs, span_s=rng.uniform(0, 200), run_jobs=(1, 60))
    work = [QueuedJob(j.job_id, j.routing_key, j.loras, rng.choice((0, 0, 1)), j.enqueued_at, j.work, run=j.run,
                      submitter=j.submitter) for j in work]
    farm = FarmModel(rng.randint(1, 8), rng.uniform(0.2, 10), 1.0, capacity=rng.randint(1, 3))
    r = simulate(AffinityScheduler(weights=weights, fair_runs=("small", True, False)[seed % 3]), work, farm)
    assert len(r.trace) == len(work)


def test_busy_windows_and_shares_by_hand():
    a = QueuedJob("a", "c", submitter="x", enqueued_at=0.0)
    b = QueuedJob("b", "c", submitter="y", enqueued_at=2.0)
    # (job, assigned, started, rendering began, finished)
    trace = [(a, 5.0, 5.0, 6.0, 9.0), (b, 4.0, 4.0, 4.0, 8.0)]
    assert busy_windows(trace) == [(2.0, 4.0)]  # both queued only while neither was assigned
    trace = [(a, 5.0, 5.0, 6.0, 9.0), (b, 7.0, 7.0, 7.0, 8.0), (QueuedJob("c", "c", submitter="y"), 0, 0, 0.0, 7.0)]
    shares = fair_shares(trace, {"y": 3})
    assert shares["window_s"] == 3.0  # [2, 5]: x's job assigned at 5
    assert shares["submitters"]["y"]["seconds"] == 3.0 and shares["submitters"]["x"]["seconds"] == 0.0
    assert shares["submitters"]["y"]["target"] == 0.75 and shares["worst"] == 1.0


def test_fair_benchmark_report_shape():
    from benchmarks import scheduler_fair as sf

    arrivals = [dict(sf.run_arrivals(0.9, 5.0, 4, w, 0, jobs=200, compositions=20), alpha=0.9, compose=5.0,
                     workers=4, weights=label) for label, w in sf.WEIGHTS.items()]
    behind = [dict(sf.run_behind(0.9, 5.0, 4, same, 0), alpha=0.9, compose=5.0, workers=4,
                   submitter="same" if same else "other") for same in (False, True)]
    text, summary = sf.report(arrivals, behind, "python -m benchmarks.scheduler --fair-sweep", "host", 1.0)
    assert text.startswith(sf.SECTION + "\n") and "python -m benchmarks.scheduler --fair-sweep" in text
    assert summary["1:2"]["configs"] == 1 and summary["behind, same submitter"]["configs"] == 1
    for r in arrivals:
        assert r["unfair"]["yields"] == 0 and r["fair"]["recomp_x_unfair"] == pytest.approx(
            r["fair"]["recompositions"] / r["unfair"]["recompositions"], abs=1e-3)
    assert all(r["fair"]["x_alone"] < r["unfair"]["x_alone"] for r in behind)
    for r in arrivals:  # against the bounds: nothing beats them
        assert r["lb_recompositions"] == r["compositions"]
        for name in ("fair", "unfair"):
            assert r[name]["recomp_x_lb"] >= 1.0 and r[name]["makespan_x_lb"] >= 1.0
        if r["witness"]["makespan"] <= 1.15 * r["lb_makespan"] - 0.2:  # within the target (rounding aside)
            assert r["witness"]["recompositions"] >= r["lb_recompositions_in_target"]
        # the witness knows the future, and the makespan bound holds for it too
        assert r["witness"]["recomp_x_lb"] >= 1.0 and r["witness"]["makespan"] >= r["lb_makespan"] - 0.05
        assert r["fair"]["recomp_x_witness"] == pytest.approx(
            r["fair"]["recompositions"] / r["witness"]["recompositions"], abs=1e-3)
    assert "**Arrivals against the lower bound and a witness**" in text and "| 1:2 | fair |" in text
    assert "| 1:1 | fair_every_run |" in text and "| 1:1 | witness |" in text


def _views(*held, render=1.0, compose=2.0):
    """WorkerViews w0, w1, ...: ``held`` is (composition, inflight) per worker, capacity 2."""
    return [WorkerView(f"w{i}", routing_key=c, inflight=n, capacity=2, compose_cost_s=compose, render_cost_s=render)
            for i, (c, n) in enumerate(held)]


def _jobs(submitter, run, comp, n, prefix=None):
    return [QueuedJob(f"{prefix or comp}-{i}", comp, (f"u-{comp}",), 0, 0.0, run=run, submitter=submitter)
            for i in range(n)]


def test_a_submitter_that_joins_with_no_worker_gets_one_without_a_lead():
    pol = AffinityScheduler()
    pol.submit(_jobs("alice", "ra", "ca0", 10) + _jobs("alice", "ra", "ca1", 10))
    first = pol.assign(_views((None, 0), (None, 0)), 0.0)  # alice alone: one composition per worker
    on = {w: {j.split("-")[0] for j, x in first if x == w} for w in ("w0", "w1")}
    assert on["w0"] | on["w1"] == {"ca0", "ca1"} and all(len(v) == 1 for v in on.values()), first
    for w in ("w0", "w1"):
        pol.done(next(j for j, x in first if x == w))
    pol.submit(_jobs("bob", "rb", "cb0", 10))  # bob joins level with alice (no lead): still one worker for him
    held = [(next(iter(on["w0"])), 1), (next(iter(on["w1"])), 1)]
    out = pol.assign(_views(*held), 1.0)
    to_bob = [w for j, w in out if j.startswith("cb0")]
    assert len(to_bob) == 1, out  # the worker that yields starts bob after the job it is on
    assert pol.yields and all(k[0] == "bob" for k in pol.yields)


def test_a_worker_running_dry_is_waited_for_rather_than_taking_one_off_unfinished_work():
    pol = AffinityScheduler(follow_plan=False)  # greedy from the start: one composition per worker
    pol.submit(_jobs("alice", "ra", "ca0", 2) + _jobs("alice", "ra", "ca1", 12))
    first = pol.assign(_views((None, 0), (None, 0)), 0.0)
    dry = next(w for j, w in first if j.startswith("ca0"))  # its composition has no queued job left
    busy = "w1" if dry == "w0" else "w0"
    assert sorted(j for j, w in first if w == dry) == ["ca0-0", "ca0-1"]
    pol.done(next(j for j, w in first if w == busy))
    pol.submit(_jobs("bob", "rb", "cb0", 10))
    pol.share.observe(["alice", "bob"])
    pol.share.charge("alice", 20.0)  # alice three quanta (2 x (compose + render)) ahead: her workers must yield
    held = {dry: ("ca0", 2), busy: ("ca1", 1)}
    out = pol.assign(_views(held["w0"], held["w1"]), 1.0)
    assert out and all(j.startswith("ca1") and w == busy for j, w in out), out  # no yield: the dry one frees soon
    for j in ("ca0-0", "ca0-1"):
        pol.done(j)
    held[dry] = ("ca0", 0)
    held[busy] = ("ca1", 2)
    out = pol.assign(_views(held["w0"], held["w1"]), 3.0)
    assert {w for j, w in out if j.startswith("cb0")} == {dry}, out  # bob starts on the worker that ran dry
    assert not pol.yields


def test_set_fair_switches_the_rules_off_and_on():
    work = make_runs_workload(300, 20, 0.9, 5, submitters=("a", "b"), span_s=20.0)
    farm = FarmModel(3, 2.0, 1.0)
    switched, unfair = Recording(), Recording(fair=False)
    switched.set_fair(False)
    simulate(switched, work, farm), simulate(unfair, work, farm)
    assert switched.log == unfair.log  # off: fair=False's decisions exactly
    with pytest.raises(ValueError, match="fair=True"):
        AffinityScheduler(fair=False).set_fair(True)
