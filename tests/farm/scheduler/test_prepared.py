"""What a worker holds is a set of tiers, each at its own switch cost (issue 16): the
composition itself, compositions it keeps prepared (its low-rank branch cache: a swap of
tensors), adapters in memory, on its node's disk, remote. The simulator models the cache; the
policy sends a composition that comes back to a worker that still has it prepared. (The
dispatcher's side, the workers' reports of what they hold: tests/farm/test_books.py and
tests/farm/test_dispatcher_prepared.py.)"""
from __future__ import annotations

import pytest

from benchmarks.scheduler_prepared import Blind, table
from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.costs import switch_cost
from farm.scheduler.sim import FarmModel, simulate
from farm.scheduler.types import QueuedJob, WorkerView


def test_switch_cost_prices_each_tier():
    w = WorkerView("w0", routing_key="a", adapters=frozenset({"u1"}), node_disk=frozenset({"u2"}),
                   compose_cost_s=10.0, fetch_cost_s=3.0, load_cost_s=0.5, prepared=frozenset({"p"}),
                   swap_cost_s=0.02)
    assert switch_cost(w, "a", ("u9",), "a") == 0.0  # held
    assert switch_cost(w, "p", ("u1",), "a") == 0.02  # prepared, its adapter in memory: a swap alone
    # prepared, its adapters not in memory: the worker reads them before it swaps, tier by tier
    assert switch_cost(w, "p", ("u1", "u2"), "a") == pytest.approx(0.52)
    assert switch_cost(w, "p", ("u1", "u2", "u9"), "a") == pytest.approx(3.52)
    assert switch_cost(w, "b", ("u1",), "a") == 10.0  # adapters in memory: the compose alone
    assert switch_cost(w, "b", ("u1", "u2"), "a") == 10.5  # + one from the node's disk
    assert switch_cost(w, "b", ("u1", "u2", "u3"), "a") == 13.5  # + one remote


def test_assign_sends_a_composition_to_the_worker_that_kept_it_prepared():
    views = [WorkerView("w0", routing_key="c", adapters=frozenset({"u"}), compose_cost_s=10.0),
             WorkerView("w1", routing_key="d", adapters=frozenset({"u"}), compose_cost_s=10.0,
                        prepared=frozenset({"a"}), swap_cost_s=0.05)]
    for policy, to in ((AffinityScheduler(), "w1"), (Blind(), "w0")):  # blind: a tie, the first worker
        policy.submit([QueuedJob("a0", "a", ("u",))])
        assert {w for _, w in policy.assign(views, 0.0)} == {to}


def test_a_prepared_composition_whose_adapters_are_remote_is_no_bargain():
    """A swap still reads the composition's adapters into memory first: a worker that keeps it
    prepared but must fetch its file from remote storage loses to one that holds the file in
    memory and composes faster than the fetch."""
    views = [WorkerView("w0", routing_key="c", adapters=frozenset({"u"}), compose_cost_s=1.0),
             WorkerView("w1", routing_key="d", compose_cost_s=1.0, fetch_cost_s=10.0, prepared=frozenset({"a"}),
                        swap_cost_s=0.05)]
    assert switch_cost(views[1], "a", ("u",), "d") == pytest.approx(10.05)
    policy = AffinityScheduler()
    policy.submit([QueuedJob("a0", "a", ("u",))])
    assert [w for _, w in policy.assign(views, 0.0)] == ["w0"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_that_bring_compositions_back_compose_less_with_the_tier(seed):
    from farm.scheduler.sim_fair import make_runs_workload

    work = make_runs_workload(600, 30, 0.9, seed, submitters=("a",), span_s=300.0)
    seen_r = blind_r = seen_swaps = blind_swaps = 0
    for workers, compose in ((4, 5.0), (8, 20.0)):
        farm = FarmModel(workers, compose_s=compose, render_s=1.0, prepared=4, swap_s=0.05)
        seen, blind = simulate(AffinityScheduler(), work, farm), simulate(Blind(), work, farm)
        # an online greedy policy: one configuration may tie-break its way to one more
        assert seen.recompositions <= blind.recompositions + 1, (seen, blind)
        seen_r, blind_r = seen_r + seen.recompositions, blind_r + blind.recompositions
        seen_swaps, blind_swaps = seen_swaps + seen.swaps, blind_swaps + blind.swaps
    assert seen_r < blind_r and seen_swaps > blind_swaps, (seen_r, blind_r, seen_swaps, blind_swaps)


def test_without_a_cache_nothing_is_a_swap():
    jobs = [QueuedJob(f"{c}{i}-{at}", c, (f"u-{c}",), 0, at) for at, comps in ((0.0, "ab"), (10.0, "c"), (20.0, "a"))
            for c in comps for i in range(4)]
    r = simulate(AffinityScheduler(), jobs, FarmModel(2, compose_s=5.0, render_s=1.0))
    assert r.swaps == 0 and r.as_dict()["swaps"] == 0


def test_the_benchmark_table_names_every_configuration():
    from benchmarks.scheduler_prepared import one

    rows = [one(0.9, 5.0, 2, jobs=200), one(1.2, 20.0, 4, jobs=200)]
    text = table(rows, "python -m benchmarks.scheduler_prepared")
    assert "python -m benchmarks.scheduler_prepared" in text and text.count("\n| 0.9 | 5 | 2 |") == 1
    assert all(r["tier"]["recompositions"] + r["tier"]["swaps"] > 0 for r in rows)


def test_the_simulated_swap_reads_the_adapters_not_in_memory_first():
    """As ``switch_cost`` prices it: a composition that comes back prepared is a swap, plus its
    adapter read from the node's disk when memory dropped it meanwhile (one adapter fits)."""
    from farm.scheduler.baselines import FifoPolicy

    jobs = [QueuedJob(f"j{i}", c, (f"u-{c}",), 0, 0.0) for i, c in enumerate("aba")]
    farm = FarmModel(1, compose_s=5.0, render_s=1.0, fetch_s=3.0, load_s=0.5, memory_adapters=1, prepared=2,
                     swap_s=0.05, capacity=1)
    r = simulate(FifoPolicy(), jobs, farm)
    assert (r.recompositions, r.swaps, r.remote_fetches) == (2, 1, 2)
    # a: fetch 3 + compose 5 + render 1; b: the same; a again: disk 0.5 + swap 0.05 + render 1
    assert r.makespan == pytest.approx(9.0 + 9.0 + 1.55)
    roomy = simulate(FifoPolicy(), jobs, FarmModel(1, compose_s=5.0, render_s=1.0, fetch_s=3.0, load_s=0.5,
                                                   memory_adapters=2, prepared=2, swap_s=0.05, capacity=1))
    assert roomy.makespan == pytest.approx(9.0 + 9.0 + 1.05)  # u-a still in memory: the swap alone
