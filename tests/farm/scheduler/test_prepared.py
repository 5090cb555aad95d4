"""What a worker holds is a set of tiers, each at its own switch cost (issue 16): the
composition itself, compositions it keeps prepared (its low-rank branch cache: a swap of
tensors), adapters in memory, on its node's disk, remote. The dispatcher learns the prepared
set and the swap's seconds from the rows; the simulator models the cache; the policy sends a
composition that comes back to a worker that still has it prepared."""
from __future__ import annotations

import pytest

from benchmarks.scheduler_prepared import Blind, table
from farm.books import PREPARED_GUESS, WorkerBook, prepared_guess
from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.costs import switch_cost
from farm.scheduler.sim import FarmModel, simulate
from farm.scheduler.types import QueuedJob, WorkerView
from jobs.results import ResultRow


def test_switch_cost_prices_each_tier():
    w = WorkerView("w0", routing_key="a", adapters=frozenset({"u1"}), node_disk=frozenset({"u2"}),
                   compose_cost_s=10.0, fetch_cost_s=3.0, load_cost_s=0.5, prepared=frozenset({"p"}),
                   swap_cost_s=0.02)
    assert switch_cost(w, "a", ("u9",), "a") == 0.0  # held
    assert switch_cost(w, "p", ("u9",), "a") == 0.02  # prepared: a swap, nothing fetched
    assert switch_cost(w, "b", ("u1",), "a") == 10.0  # adapters in memory: the compose alone
    assert switch_cost(w, "b", ("u1", "u2"), "a") == 10.5  # + one from the node's disk
    assert switch_cost(w, "b", ("u1", "u2", "u3"), "a") == 13.5  # + one remote


def row(key: str, mode: str = "lowrank", compose_s: float = 0.0, status: str = "ok") -> ResultRow:
    # the worker's row carries its content key (``lora_core``'s hash), never the policy's key
    return ResultRow("j", status, composition_key=f"content-{key}", lora_mode=mode, compose_s=compose_s,
                     render_s=1.0, error="" if status == "ok" else "boom")


def learn(book, key, **kw):
    first = kw.pop("first", True)
    book.learn(row(key, **kw), routing_key=key, first=first)


def test_the_book_learns_what_is_prepared_and_what_a_swap_costs():
    book = WorkerBook("w0", None)
    learn(book, "a", compose_s=4.0)  # composed a (low-rank): a's branches are now cached
    learn(book, "b", compose_s=4.0)
    assert list(book.prepared) == ["a", "b"] and book.compose_s == 4.0 and "swap_s" not in book.measured
    learn(book, "a", compose_s=0.03)  # back to a: a swap, learned as one, not as a compose
    assert book.swap_s == pytest.approx(0.03) and book.compose_s == 4.0
    assert list(book.prepared) == ["b", "a"]  # newest last, by the policy's key
    learn(book, "b", mode="merge", compose_s=5.0)  # auto mode merged b: a compose, and no branch of b held
    assert "b" not in book.prepared and book.swap_s == pytest.approx(0.03) and book.compose_s > 4.0
    learn(book, "a", compose_s=4.0)  # "prepared" but it took a compose (evicted by bytes): learned as one
    assert book.swap_s == pytest.approx(0.03)
    learn(book, "c", mode="lowrank+merge", compose_s=5.0)  # diffs were merged: not a pure swap
    assert "c" not in book.prepared
    learn(book, "d", status="failed")
    assert "d" not in book.prepared
    for i in range(PREPARED_GUESS + 3):
        learn(book, f"k{i}", compose_s=4.0)
    assert len(book.prepared) == PREPARED_GUESS and f"k{PREPARED_GUESS + 2}" in book.prepared
    book.forget()  # a restarted actor comes back empty
    assert not book.prepared and book.routing_key is None


def test_a_groups_rows_teach_its_compose_once_and_no_cache_credits_nothing():
    book = WorkerBook("w0", None)
    learn(book, "a", compose_s=4.0)
    learn(book, "b", compose_s=4.0)
    learn(book, "a", compose_s=0.05)
    for _ in range(3):  # the rest of that group: the same seconds on every row, learned once
        learn(book, "a", compose_s=0.05, first=False)
    assert book.compose_s == 4.0 and book.swap_s == pytest.approx(0.05)
    none = WorkerBook("w1", None, prepared_guess=prepared_guess(0))  # branch_cache_mb: 0
    learn(none, "a", compose_s=4.0)
    assert not none.prepared and prepared_guess(1024) == PREPARED_GUESS


def test_assign_sends_a_composition_to_the_worker_that_kept_it_prepared():
    views = [WorkerView("w0", routing_key="c", adapters=frozenset({"u"}), compose_cost_s=10.0),
             WorkerView("w1", routing_key="d", adapters=frozenset({"u"}), compose_cost_s=10.0,
                        prepared=frozenset({"a"}), swap_cost_s=0.05)]
    for policy, to in ((AffinityScheduler(), "w1"), (Blind(), "w0")):  # blind: a tie, the first worker
        policy.submit([QueuedJob("a0", "a", ("u",))])
        assert {w for _, w in policy.assign(views, 0.0)} == {to}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_that_bring_compositions_back_compose_less_with_the_tier(seed):
    from farm.scheduler.sim_fair import make_runs_workload

    work = make_runs_workload(600, 30, 0.9, seed, submitters=("a",), span_s=300.0)
    fewer = 0
    for workers, compose in ((4, 5.0), (8, 20.0)):
        farm = FarmModel(workers, compose_s=compose, render_s=1.0, prepared=4, swap_s=0.05)
        seen, blind = simulate(AffinityScheduler(), work, farm), simulate(Blind(), work, farm)
        assert seen.recompositions <= blind.recompositions and seen.swaps >= blind.swaps, (seen, blind)
        fewer += blind.recompositions - seen.recompositions
    assert fewer > 0


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


def test_the_dispatcher_credits_prepared_compositions_by_the_policys_keys():
    """Through the real Dispatcher (fake transport): a worker's rows carry its content keys, the
    policy's compositions are routing keys; what the book learns must match the latter."""
    import hashlib

    from tests.farm.test_dispatcher import FakeWorker, dispatch, make_jobs

    class LowRank(FakeWorker):
        def _row(self, job):  # as workers/worker.py writes rows: the composition's content hash
            key = hashlib.sha256("|".join(sorted(r.uri for r in job.loras)).encode()).hexdigest()[:32]
            return ResultRow.ok(job, output_uri=f"memory://out/images/{job.job_id}.png", composition_key=key,
                                worker_id=self.worker_id, fetch_s=0.0, compose_s=4.0, render_s=1.0, lora_mode="lowrank")

    jobs = make_jobs(6, sets=(("s3://b/a.safetensors",), ("s3://b/b.safetensors",)))
    d, *_ = dispatch([LowRank("w0")], jobs)
    (view,) = d.workers()
    assert view.prepared == {j.routing_key for j in jobs}
    j = jobs[0]
    assert switch_cost(view, j.routing_key, [r.uri for r in j.loras], "elsewhere") == view.swap_cost_s
