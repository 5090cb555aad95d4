"""The simulator (farm/scheduler/sim.py, sim_bounds.py) and the scheduler benchmark: bounds hold,
policies are checked, CLI shape."""
from __future__ import annotations

import json
import random

import pytest

from benchmarks import scheduler as bench
from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.baselines import POLICIES, FifoPolicy, make
from farm.scheduler.sim import FarmModel, SimError, make_workload, simulate
from farm.scheduler.sim_bounds import lower_bounds, recompositions_needed
from farm.scheduler.types import QueuedJob


def random_case(seed: int) -> tuple[list[QueuedJob], FarmModel]:
    rng = random.Random(seed)
    farm = FarmModel(
        workers=rng.randint(1, 8), compose_s=rng.uniform(0.2, 20), render_s=rng.uniform(0.3, 3),
        fetch_s=rng.choice((None, 0.0, rng.uniform(0.1, 5))), capacity=rng.randint(1, 2),
        per_node=rng.randint(1, 4), memory_adapters=rng.randint(1, 12),
    )
    arrival = rng.choice(("batch", "bursty"))
    jobs = make_workload(rng.randint(1, 250), rng.randint(1, 40), rng.uniform(0.4, 1.6), seed,
                         arrival=arrival, span_s=rng.uniform(0, 200), bursts=rng.randint(1, 6),
                         mixed_sizes=seed % 2 == 1)
    return jobs, farm


@pytest.mark.parametrize("seed", range(25))
def test_no_policy_beats_the_lower_bounds(seed: int):
    jobs, farm = random_case(seed)
    bounds = lower_bounds(jobs, farm)
    assert bounds["recompositions"] == len({j.routing_key for j in jobs})
    for name in POLICIES:
        r = simulate(make(name), jobs, farm)
        assert r.makespan >= bounds["makespan"] - 1e-6, (name, r, bounds)
        assert r.recompositions >= bounds["recompositions"], (name, r, bounds)


def test_bound_is_tight_for_one_composition_on_one_worker():
    jobs = [QueuedJob(f"j{i}", "c", ("u",)) for i in range(10)]
    farm = FarmModel(1, compose_s=3.0, render_s=1.0, fetch_s=2.0)
    r = simulate(make("affinity"), jobs, farm)
    assert r.makespan == lower_bounds(jobs, farm)["makespan"] == 2.0 + 3.0 + 10.0
    assert r.recompositions == 1


def test_bound_charges_a_hot_composition_for_its_replicas():
    """One composition, 4 workers: every worker that helps pays a compose."""
    jobs = [QueuedJob(f"j{i}", "c", ("u",)) for i in range(40)]
    farm = FarmModel(4, compose_s=10.0, render_s=1.0, fetch_s=0.0)
    b = lower_bounds(jobs, farm)
    assert b["makespan"] == pytest.approx(10.0 + 40 / 4)  # all 4 compose, then 10 jobs each
    assert b["lp_compositions"] == pytest.approx(4.0)


def test_affinity_recomposes_once_per_composition_and_beats_fifo():
    jobs = make_workload(600, 12, 1.0, 3)
    farm = FarmModel(4, compose_s=5.0, render_s=1.0)
    ours, fifo = simulate(make("affinity"), jobs, farm), simulate(make("fifo"), jobs, farm)
    bounds = lower_bounds(jobs, farm)
    assert ours.recompositions <= 1.25 * bounds["recompositions"]
    assert ours.makespan <= 1.15 * bounds["makespan"]
    assert fifo.makespan >= 1.2 * ours.makespan


class Twice(FifoPolicy):
    def assign(self, workers, now):
        out = super().assign(workers, now)
        return out + out[:1]


class Greedy(FifoPolicy):
    def assign(self, workers, now):
        return [(j, workers[0].worker_id) for j in [self.queue.pop_first().job_id for _ in range(len(self.queue))]]


class Lazy(FifoPolicy):
    def assign(self, workers, now):
        return []


@pytest.mark.parametrize("policy, message", [(Twice, "twice"), (Greedy, "overfilled"), (Lazy, "never ran")])
def test_simulator_catches_protocol_breaks(policy, message):
    with pytest.raises(SimError, match=message):
        simulate(policy(), make_workload(20, 3, 1.0, 0), FarmModel(2))


def test_workloads_are_reproducible_and_shaped():
    a = make_workload(300, 20, 1.1, 7, arrival="bursty", span_s=50.0, bursts=4)
    assert a == make_workload(300, 20, 1.1, 7, arrival="bursty", span_s=50.0, bursts=4)
    assert len({j.enqueued_at for j in a}) <= 4 and max(j.enqueued_at for j in a) <= 50.0
    assert all(1 <= len(j.loras) <= 3 for j in a)
    with pytest.raises(ValueError):
        make_workload(10, 2, 1.0, 0, arrival="poisson")


def test_cli_prints_one_json_object_with_every_policy(capsys):
    argv = "--jobs 200 --compositions 10 --workers 3 --alpha 1.0 --compose-cost 4 --render-cost 1 --seed 2 --json"
    assert bench.main(argv.split()) == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("affinity", "fifo", "least_loaded", "serve_multiplex"):
        assert set(out[name]) >= {"makespan", "recompositions", "p95_wait"}
        assert out[name]["makespan"] >= out["lower_bound_makespan"]
    assert out["lower_bound_recompositions"] <= 10


def test_report_section_replaces_only_its_own(tmp_path):
    rows = []
    for scenario in bench.SCENARIOS:
        r = bench.run_one(60, 5, 2, 1.0, 2.0, 1.0, 0)
        r["scenario"] = scenario
        rows.append(r)
    cost = bench.decision_cost(queued=500, workers=4, compositions=20, steps=50)
    text, summary = bench.report(rows, [cost], "python -m benchmarks.scheduler --sweep", "test box", 1.0,
                                 write_plot=False)
    assert text.startswith(bench.SECTION) and "| 20 |" in text
    assert summary["decision_cost"][0]["us_per_job"] > 0
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Store\n\nkeep me\n\n## Scheduler (simulation)\n\nold\n\n## Later\n\nme too\n")
    bench.write_section(text, str(path))
    bench.write_section(text, str(path))
    body = path.read_text()
    assert "keep me" in body and "me too" in body and "\nold\n" not in body
    assert body.count(bench.SECTION) == 1
    bench.plot(rows, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_recompositions_needed_at_a_makespan():
    """sizes 10, 1, 1; R = C = F = 1: by T = 7 a worker has 5 s of rendering after fetch and
    compose, so the 10-job composition needs 2 workers: 4 compositions; by T = 3, 1 s each:
    10 + 1 + 1; below F + C nothing can finish."""
    jobs = [QueuedJob(f"j{i}", "big", ("a",), 0, 0.0) for i in range(10)]
    jobs += [QueuedJob("s1", "s1", ("b",), 0, 0.0), QueuedJob("s2", "s2", ("c",), 0, 0.0)]
    farm = FarmModel(4, compose_s=1.0, render_s=1.0, fetch_s=1.0)
    assert recompositions_needed(jobs, farm, 7.0) == 4
    assert recompositions_needed(jobs, farm, 3.0) == 12
    assert recompositions_needed(jobs, farm, 2.0) == float("inf")
    # never below one per composition, and never above the makespan LP's need at its own bound
    b = lower_bounds(jobs, farm)
    assert 3 <= recompositions_needed(jobs, farm, b["makespan"]) and b["lp_compositions"] <= recompositions_needed(
        jobs, farm, b["makespan"])


def test_recompositions_needed_with_arrivals():
    """One worker, R = C = 1, no fetch: x and y 5 jobs each at t=0, one more each at t=10.
    Composing each once means holding one across t=10 and leaving the other's 5 early
    jobs until then: x 0-6, idle holding x, x's new job 10-11, y composed 11-12 and its 6
    jobs 12-18. Ending before 18 needs a third composition; before 13 (after t=10: 2 jobs
    and a compose) nothing fits."""
    jobs = [QueuedJob(f"{c}{i}", c, (c,), 0, 0.0) for c in "xy" for i in range(5)]
    jobs += [QueuedJob(f"{c}9", c, (c,), 0, 10.0) for c in "xy"]
    farm = FarmModel(1, compose_s=1.0, render_s=1.0, fetch_s=0.0)
    assert recompositions_needed(jobs, farm, 18.0) == 2
    assert recompositions_needed(jobs, farm, 17.9) == 3
    assert recompositions_needed(jobs, farm, 12.9) == float("inf")
    # no schedule beats the bound at its own makespan (affinity: 15 s with 3, fifo: 16 s with 4)
    for seed in range(12):
        w = jobs if seed == 0 else make_workload(300, 12, 1.0, seed, arrival="bursty", span_s=100.0)
        f = farm if seed == 0 else FarmModel(1 + seed % 3, compose_s=3.0, render_s=1.0)
        for policy in (AffinityScheduler(), FifoPolicy()):
            r = simulate(policy, w, f)
            assert r.recompositions >= recompositions_needed(w, f, r.makespan), (seed, r)


def test_told_deferring_holds_back_a_composition_more_jobs_will_come_for():
    """One worker, R = C = 1, no fetch: x gets a job at t=0 and two at t=10; y, ten jobs at
    t=5. Told arrivals alone compose x at 0 (nothing else is queued), y at 5, then x again:
    3 (x 0-2, y 5-16, x 16-19). Holding x back (one job of work, within the budget)
    composes each once and ends one render later (y 5-16, x 16-20). With no budget, it is the told-arrivals schedule. (The greedy
    rules only: a first batch is planned, and the plan holds nothing back.)"""
    jobs = [QueuedJob("x0", "x", ("x",), 0, 0.0)]
    jobs += [QueuedJob(f"y{i}", "y", ("y",), 0, 5.0) for i in range(10)]
    jobs += [QueuedJob(f"x{i}", "x", ("x",), 0, 10.0) for i in (1, 2)]
    farm = FarmModel(1, compose_s=1.0, render_s=1.0, fetch_s=0.0, load_s=0.0)
    told = simulate(bench.ToldArrivals(jobs, follow_plan=False), jobs, farm)
    held = simulate(bench.ToldArrivalsDeferring(jobs, budget_s=5.0, follow_plan=False), jobs, farm)
    none = simulate(bench.ToldArrivalsDeferring(jobs, budget_s=0.0, follow_plan=False), jobs, farm)
    assert told.recompositions == 3 and none.recompositions == 3
    assert held.recompositions == 2
    assert (told.makespan, none.makespan, held.makespan) == (19.0, 19.0, 20.0)
    best = bench.told_deferring(jobs, farm, makespan_target=20.0, follow_plan=False)
    assert (best["recompositions"], best["makespan"], best["budget_renders"]) == (2, 20.0, 5.0)




def test_simulated_policy_can_learn_its_costs_from_a_prior():
    """With ``prior_s`` the policy is shown what a dispatcher would have learned: at first
    the prior, then estimates that approach the true costs."""
    seen: list[tuple[float, float]] = []

    class Watching(FifoPolicy):
        def assign(self, workers, now):
            seen.append((workers[0].render_cost_s, workers[0].compose_cost_s))
            return super().assign(workers, now)

    jobs = [QueuedJob(f"j{i}", "c", ("u",)) for i in range(30)]
    farm = FarmModel(1, compose_s=4.0, render_s=0.25, fetch_s=0.0, prior_s=1.0)
    learned = simulate(Watching(), jobs, farm)
    assert seen[0] == (1.0, 1.0)
    assert seen[-1] == (0.25, 4.0)  # one compose, then renders: both measured
    told = simulate(FifoPolicy(), jobs, FarmModel(1, compose_s=4.0, render_s=0.25, fetch_s=0.0))
    assert learned.makespan == told.makespan  # what the policy is shown changes no cost




def test_plan_weighs_jobs_by_their_work():
    """Compositions whose jobs differ in size (0.25 / 1 / 2.25 units): counting jobs the
    plan misjudges the lanes, and the batch ends later; weighing them it does not."""
    work = make_workload(2000, 20, 0.6, 0, mixed_sizes=True)
    assert {j.work for j in work} == {0.25, 1.0, 2.25}
    farm = FarmModel(16, compose_s=5.0, render_s=1.0)
    bound = lower_bounds(work, farm)["makespan"]
    weighed = simulate(AffinityScheduler(), work, farm)
    counted = simulate(AffinityScheduler(weigh_jobs=False), work, farm)
    assert weighed.makespan <= 1.15 * bound < counted.makespan
