"""farm/scheduler/batch_plan.py (pure) and the AffinityScheduler's use of it, checked by independent sums
and against the simulator."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.batch_plan import Following, Lane, make_plan, pack, span, switches
from farm.scheduler.sim import FarmModel, make_workload, simulate
from farm.scheduler.sim_bounds import lower_bounds
from farm.scheduler.types import QueuedJob, WorkerView


def flat(compose: float = 5.0):
    return lambda i, key, first: compose


def lane_end(pieces, lane: Lane, cost) -> float:
    """When a lane following ``pieces`` is done: recomputed here from the costs alone."""
    t, holds = lane.free_at, lane.holds
    for j, (key, n) in enumerate(pieces):
        if key != holds:
            t += cost(key, j == 0)
        t += n * lane.render_s
        holds = key
    return t


def random_case(seed: int):
    rng = random.Random(seed)
    k = rng.randint(1, 12)
    work = [(f"c{i}", rng.randint(1, 300)) for i in range(rng.randint(1, 40))]
    lanes = [Lane(rng.choice((0.0, rng.uniform(0, 20))), rng.choice((None, f"c{rng.randint(0, 50)}")),
                  rng.choice((1.0, rng.uniform(0.5, 2)))) for _ in range(k)]
    compose = {(i, key): rng.uniform(0.5, 10) for i in range(k) for key, _ in work}
    return work, lanes, (lambda i, key, first: compose[i, key] + (2.0 if first else 0.0))


@pytest.mark.parametrize("seed", range(30))
def test_every_job_planned_once_and_every_lane_ends_in_time(seed: int):
    work, lanes, switch = random_case(seed)
    pieces, end = make_plan(work, lanes, switch)
    got = Counter()
    for mine in pieces:
        for key, n in mine:
            assert n > 0
            got[key] += n
    assert got == Counter(dict(work))
    for i, (mine, lane) in enumerate(zip(pieces, lanes)):
        assert lane_end(mine, lane, lambda key, first: switch(i, key, first)) <= end + 1e-6
    # Splits only where nothing fits: at most one extra piece per lane beyond one per composition.
    assert switches(pieces, lanes) <= len(work) + len(lanes) - 1
    # No schedule ends before all work is done on the fastest lanes at once.
    total = sum(n for _, n in work) * min(lane.render_s for lane in lanes)
    assert end >= min(lane.free_at for lane in lanes) + total / len(lanes) - 1e-6


def test_equal_compositions_one_each_and_a_hot_one_split_evenly():
    lanes = [Lane() for _ in range(4)]
    pieces, end = make_plan([(c, 10) for c in "ABCD"], lanes, flat(5.0))
    assert sorted(p for mine in pieces for p in mine) == [(c, 10) for c in "ABCD"]
    assert end == pytest.approx(15.0, rel=0.06)
    pieces, end = make_plan([("H", 100)], lanes, flat(5.0), slack=0.0)
    assert sorted(n for mine in pieces for _, n in mine) == [25, 25, 25, 25]
    assert end == pytest.approx(30.0, rel=0.01)


def test_holders_keep_their_composition_without_a_switch():
    lanes = [Lane(holds="A"), Lane(holds="B"), Lane()]
    pieces, _ = make_plan([("A", 20), ("B", 20), ("C", 20)], lanes, flat(5.0))
    assert pieces[0][0] == ("A", 20) and pieces[1][0] == ("B", 20) and pieces[2] == [("C", 20)]
    assert switches(pieces, lanes) == 1


def test_slack_trades_a_little_time_for_fewer_splits():
    """Two compositions of 52 and 48 jobs on two lanes: the earliest end splits one of them;
    5% later, each fits whole."""
    lanes = [Lane(), Lane()]
    tight, t_end = make_plan([("A", 52), ("B", 48)], lanes, flat(1.0), slack=0.0)
    loose, l_end = make_plan([("A", 52), ("B", 48)], lanes, flat(1.0), slack=0.05)
    assert switches(tight, lanes) == 3 and switches(loose, lanes) == 2
    assert t_end < l_end <= t_end * 1.05 + 1e-9


def test_a_replan_keeps_the_running_plans_end():
    """Near the end, moving one job to an idle lane saves seconds: not worth a recomposition."""
    lanes = [Lane(2.0, "A"), Lane(2.0, "A"), Lane(0.0, None)]
    eager, _ = make_plan([("A", 4)], lanes, flat(1.0), slack=0.0)
    assert switches(eager, lanes) == 1  # the idle lane composes A for one job
    kept, end = make_plan([("A", 4)], lanes, flat(1.0), slack_s=5.0, at_least=0.0)
    assert switches(kept, lanes) == 0 and not kept[2]


def test_pack_says_when_the_work_does_not_fit():
    assert pack([("A", 10)], [Lane()], flat(5.0), 14.9) is None
    assert pack([("A", 10)], [Lane()], flat(5.0), 15.0) == [[("A", 10)]]
    with pytest.raises(ValueError):
        make_plan([("A", 1)], [], flat())
    assert make_plan([], [Lane()], flat()) == ([[]], 0.0)


def test_weights_balance_work_not_job_counts():
    """A's jobs are 3x the others': by work the lanes are A alone vs B + C + D; counting
    jobs puts 20 jobs on each lane, one of them with A and so 50% longer by work."""
    lanes = [Lane(), Lane()]
    work = [("A", 10), ("B", 10), ("C", 10), ("D", 10)]
    weight = {"A": 3.0}
    weighted, _ = make_plan(work, lanes, flat(1.0), weight=weight, slack=0.0)
    blind, _ = make_plan(work, lanes, flat(1.0), slack=0.0)
    assert sorted(sorted(k for k, _ in mine) for mine in weighted) == [["A"], ["B", "C", "D"]]
    assert span(weighted, lanes, flat(1.0), weight) == pytest.approx(33.0)  # 30 + 3 composes
    assert span(blind, lanes, flat(1.0), weight) > 40.0  # what the unweighted plan really costs


def test_following_counts_what_its_pieces_cover():
    queue = Counter({"A": 5, "B": 3})
    f = Following({"w0": [("A", 3), ("B", 3)], "w1": [("A", 2)], "w2": []}, queue.__getitem__)
    assert "w2" not in f and f.planned == 8 and f.covered == Counter({"A": 5, "B": 3})
    assert f.current("w0") == "A" and f.left("w0") == 3 and f.upcoming("w0") == ["A", "B"]
    queue["A"] -= 1
    f.took("w0")
    assert f.left("w0") == 2 and f.planned == 7
    queue["A"] += 1
    f.joined("A")  # a retry: the last unfinished piece of A (w1's) grows
    assert f.workers["w1"][0][1] == 3 and f.unplanned == 0 and f.loose(None) is None
    queue["C"] += 2
    f.joined("C")
    f.joined("C")  # no piece of C: unplanned, and C is loose
    assert f.unplanned == 2 and f.loose(None) == "C" and f.loose("C") == "C"
    queue["C"] = 0  # another rule took C's jobs: not loose any more
    assert f.loose(None) is None
    queue["A"] = 0  # A's jobs went elsewhere: w0 moves on to B, w1 leaves the plan
    assert f.current("w0") == "B" and f.current("w1") is None and "w1" not in f
    assert f.planned == sum(f.covered.values()) == 3


# ---- the scheduler with a plan -------------------------------------------------------------
LORA = ("s3://l/x.safetensors",)


def views(n: int, **kw) -> list[WorkerView]:
    return [WorkerView(f"w{i}", f"n{i // 4}", kw.get("comp", {}).get(f"w{i}"), capacity=2,
                       inflight=kw.get("inflight", {}).get(f"w{i}", 0), compose_cost_s=5.0,
                       alive=f"w{i}" not in kw.get("dead", ())) for i in range(n)]


def batch(sizes: dict[str, int], priority: int = 0) -> list[QueuedJob]:
    return [QueuedJob(f"{c}-{i}", c, LORA, priority) for c, n in sizes.items() for i in range(n)]


def test_batch_plan_beats_the_greedy_rules_in_the_simulator():
    """20 compositions on 16 workers (the benchmark's hard case): the plan recomposes less
    at a makespan within the target; the greedy rules (follow_plan=False) split small
    compositions in the end game."""
    work = make_workload(2000, 20, 0.6, 0)
    farm = FarmModel(16, compose_s=1.0, render_s=1.0)
    bounds = lower_bounds(work, farm)
    planned = simulate(AffinityScheduler(), work, farm)
    greedy = simulate(AffinityScheduler(follow_plan=False), work, farm)
    assert planned.recompositions <= 1.25 * bounds["recompositions"] < greedy.recompositions
    assert planned.makespan <= 1.15 * bounds["makespan"]


def test_a_worker_follows_its_pieces_in_order():
    policy = AffinityScheduler()
    policy.submit(batch({"A": 6, "B": 2, "C": 6}))
    first = policy.assign(views(2), 0.0)
    assert policy.plans_made == 1
    order = {w: [p[0] for p in d] for w, d in policy._following.workers.items()}
    done: dict[str, list[str]] = {w: [] for w in ("w0", "w1")}
    pairs = first
    while pairs:
        for job_id, wid in pairs:
            done[wid].append(job_id.split("-")[0])
            policy.done(job_id)
        pairs = policy.assign(views(2), 1.0)
    for wid, comps in done.items():
        assert list(dict.fromkeys(comps)) == order[wid]  # its pieces, each run once
    assert policy.pending == 0 and policy.plans_made == 1


def test_arrivals_while_a_plan_runs_switch_to_the_greedy_rules_until_drained():
    policy = AffinityScheduler()
    policy.submit(batch({"A": 10, "B": 10}))
    pairs = policy.assign(views(2), 0.0)
    assert policy._following
    policy.submit([QueuedJob("late", "C", LORA)])
    assert not policy._following and policy._online
    for _ in range(30):
        for job_id, _ in pairs:
            policy.done(job_id)
        pairs = policy.assign(views(2), 1.0)
    assert policy.pending == 0 and not policy._running
    policy.assign(views(2), 2.0)  # drained: the next submit is a batch again
    policy.submit(batch({"D": 4}))
    policy.assign(views(2), 3.0)
    assert policy.plans_made == 2


def test_mixed_priorities_use_the_greedy_rules():
    policy = AffinityScheduler()
    policy.submit(batch({"A": 5}) + batch({"B": 1}, priority=5))
    pairs = policy.assign([WorkerView("w0", routing_key="A", capacity=1)], 0.0)
    assert pairs == [("B-0", "w0")] and policy.plans_made == 0


def test_a_dead_workers_pieces_are_planned_again():
    policy = AffinityScheduler()
    policy.submit(batch({"A": 20, "B": 20, "C": 20}))
    policy.assign(views(3), 0.0)
    owner = next(w for w, d in policy._following.workers.items() if d[0][0] == "C")
    running = [j for j, (w, _) in policy._running.items() if w == owner]
    for job_id in running:
        policy.done(job_id, requeue=True)  # its actor died
    pairs = policy.assign(views(3, dead={owner}), 1.0)
    assert policy.plans_made == 2 and owner not in policy._following
    assert any(p[0] == "C" for d in policy._following.workers.values() for p in d) or any(j.startswith("C") for j, _ in pairs)


def test_a_retried_job_stays_in_its_piece():
    policy = AffinityScheduler()
    policy.submit(batch({"A": 10, "B": 10}))
    pairs = policy.assign(views(2), 0.0)
    job_id, wid = pairs[0]
    policy.done(job_id, requeue=True)  # transient failure: it comes back
    assert policy.plans_made == 1 and policy._following.covered[job_id.split("-")[0]] == 9
    where: dict[str, str] = {}
    inflight = {wid: 1, ("w1" if wid == "w0" else "w0"): 2}
    for step in range(20):
        for j, w in policy.assign(views(2, inflight=inflight), float(step)):
            where[j] = w
            policy.done(j)
    assert policy.pending == 0 and where[job_id] == wid
    assert {w for j, w in where.items() if j.startswith(job_id[0])} == {wid}  # no extra recomposition


def test_prefetch_hints_the_next_piece():
    policy = AffinityScheduler(prefetch_lead_s=100.0)
    jobs = [QueuedJob(f"A-{i}", "A", ("s3://a",)) for i in range(4)] + \
        [QueuedJob(f"B-{i}", "B", ("s3://b",)) for i in range(4)]
    policy.submit(jobs)
    policy.assign([WorkerView("w0", capacity=2)], 0.0)
    (first, second), = [[p[0] for p in d] for d in policy._following.workers.values()]
    hints = policy.prefetch([WorkerView("w0", routing_key=first, inflight=2, capacity=2)])
    assert hints["w0"] == [f"s3://{first.lower()}", f"s3://{second.lower()}"]
    # Before it starts its next piece (here: holding something else), that piece is the hint,
    # not a guess (the guess would be the largest composition nobody holds: the second).
    policy.assign([WorkerView("w0", routing_key=first, capacity=2)], 1.0)  # takes the first's last two
    hints = policy.prefetch([WorkerView("w0", routing_key="Z", capacity=2)])
    assert hints["w0"] == [f"s3://{second.lower()}"]


@pytest.mark.parametrize("seed", range(6))
def test_plan_bookkeeping_stays_consistent_in_the_simulator(seed: int):
    """Random farms and workloads (batch and bursty): after every decision the jobs the
    pieces cover add up, no piece is negative, and every job runs once (the simulator
    checks that)."""
    rng = random.Random(seed)

    class Checked(AffinityScheduler):
        def assign(self, workers, now):
            out = super().assign(workers, now)
            pieces = [p for d in self._following.workers.values() for p in d]
            assert all(p[1] >= 0 for p in pieces)
            assert self._following.planned == sum(self._following.covered.values()) == sum(p[1] for p in pieces)
            return out

    work = make_workload(rng.randint(50, 400), rng.randint(1, 30), rng.uniform(0.5, 1.5), seed,
                         arrival=rng.choice(("batch", "bursty")), span_s=rng.uniform(10, 200), bursts=3)
    farm = FarmModel(rng.randint(1, 8), compose_s=rng.uniform(0.5, 10), render_s=rng.uniform(0.3, 2),
                     prior_s=rng.choice((None, 1.0)))
    result = simulate(Checked(), work, farm)
    assert result.makespan >= lower_bounds(work, farm)["makespan"] - 1e-6
