"""AffinityScheduler (farm/scheduler/affinity.py) and JobQueue (queue.py) with fake workers: each
decision rule on its own."""
from __future__ import annotations

import time

import pytest

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.costs import switch_cost
from farm.scheduler.queue import JobQueue
from farm.scheduler.types import QueuedJob, WorkerView

LORA = {c: (f"s3://l/{c}-1.safetensors", f"s3://l/{c}-2.safetensors") for c in "ABCDEFGH"}


def jobs(comp: str, n: int, *, start: int = 0, priority: int = 0, at: float = 0.0) -> list[QueuedJob]:
    return [QueuedJob(f"{comp}{i}", comp, LORA[comp], priority, at) for i in range(start, start + n)]


def worker(wid: str, comp: str | None = None, inflight: int = 0, capacity: int = 2, **kw) -> WorkerView:
    kw.setdefault("adapters", frozenset(LORA.get(comp, ())) if comp else frozenset())
    return WorkerView(wid, kw.pop("node_id", "n0"), comp, inflight=inflight, capacity=capacity,
                      compose_cost_s=kw.pop("compose", 5.0), render_cost_s=1.0, **kw)


def by_worker(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job_id, wid in pairs:
        out.setdefault(wid, []).append(job_id)
    return out


def test_job_goes_to_the_worker_holding_its_composition():
    policy = AffinityScheduler()
    policy.submit(jobs("B", 1))
    pairs = policy.assign([worker("w0", "A"), worker("w1", "B"), worker("w2", "C")], 0.0)
    assert pairs == [("B0", "w1")]


def test_worker_stays_on_its_composition_while_it_has_work():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 6) + jobs("B", 6))
    ws = {"w0": worker("w0", "A", capacity=1), "w1": worker("w1", "B", capacity=1)}
    seen: dict[str, set[str]] = {"w0": set(), "w1": set()}
    for step in range(12):
        for job_id, wid in policy.assign(list(ws.values()), float(step)):
            seen[wid].add(job_id[0])
            policy.done(job_id)  # finishes at once: the worker is free again next call
    assert seen == {"w0": {"A"}, "w1": {"B"}}
    assert policy.pending == 0


def test_idle_worker_takes_the_cheapest_switch_and_the_biggest_composition_first():
    policy = AffinityScheduler()
    policy.submit(jobs("C", 2) + jobs("D", 9))
    cold = worker("cold", None)
    warm = worker("warm", "A", adapters=frozenset(LORA["D"]))  # A has no work left; D in memory
    pairs = by_worker(policy.assign([cold, warm], 0.0))
    assert all(j.startswith("D") for j in pairs["warm"])  # biggest backlog, cheapest worker for it
    assert all(j.startswith("C") for j in pairs["cold"])


def test_switch_cost_orders_memory_disk_remote():
    base = dict(compose_cost_s=5.0, fetch_cost_s=2.0, load_cost_s=0.1)
    uris = LORA["A"]
    mem = WorkerView("m", adapters=frozenset(uris), **base)
    disk = WorkerView("d", node_disk=frozenset(uris), **base)
    remote = WorkerView("r", **base)
    costs = [switch_cost(w, "A", uris, "B") for w in (mem, disk, remote)]
    assert costs == sorted(costs) and costs[0] < costs[1] < costs[2]
    assert switch_cost(mem, "A", uris, "A") == 0.0


def test_hot_composition_is_replicated_when_its_backlog_is_large():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 400))
    pairs = by_worker(policy.assign([worker("w0", "A", inflight=2), worker("w1", None)], 0.0))
    assert len(pairs.get("w1", [])) == 2  # 400 jobs / 1 holder >> compose + horizon


def test_hot_composition_is_never_pinned_to_one_worker():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 1000))
    pairs = by_worker(policy.assign([worker(f"w{i}") for i in range(4)], 0.0))
    assert len(pairs) >= 3


def test_no_replication_when_the_backlog_is_small():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 3))
    pairs = policy.assign([worker("w0", "A", inflight=1), worker("w1", None, compose=20.0)], 0.0)
    assert by_worker(pairs) == {"w0": ["A0"]}  # w0 clears 3 jobs long before w1 could compose


def test_fixed_horizon_controls_replication():
    """``horizon_s`` is the greedy rules' knob (no plan: online arrivals, mixed priorities)."""
    eager = AffinityScheduler(horizon_s=0.0, follow_plan=False)
    eager.submit(jobs("A", 30))
    lazy = AffinityScheduler(horizon_s=1000.0, follow_plan=False)
    lazy.submit(jobs("A", 30))
    ws = [worker("w0", "A", inflight=2), worker("w1", None)]
    assert by_worker(eager.assign(ws, 0.0)).get("w1")
    assert not by_worker(lazy.assign(ws, 0.0)).get("w1")


def test_rare_composition_is_not_starved_by_a_stream_of_hot_jobs():
    """Two workers on A, fed new A jobs forever: the old B job gets a replica's slot."""
    policy = AffinityScheduler(max_wait_s=30.0)
    policy.submit(jobs("B", 1, at=0.0))
    ws = {"w0": "A", "w1": "A"}
    served_at = None
    for t in range(200):
        policy.submit(jobs("A", 2, start=2 * t, at=float(t)))
        views = [worker(w, c, capacity=1) for w, c in ws.items()]
        for job_id, wid in policy.assign(views, float(t)):
            ws[wid] = job_id[0]
            policy.done(job_id)
            if job_id == "B0":
                served_at = t
    assert served_at is not None and served_at <= 31


def test_starvation_guard_breaks_affinity_after_twice_the_bound():
    """Every worker is the last holder of a composition with work: only the hard bound moves one."""
    policy = AffinityScheduler(max_wait_s=10.0)
    policy.submit(jobs("B", 1, at=0.0))
    ws = {"w0": "A", "w1": "C"}
    served_at = None
    for t in range(100):
        policy.submit(jobs("A", 1, start=t, at=float(t)) + jobs("C", 1, start=t, at=float(t)))
        for job_id, wid in policy.assign([worker(w, c, capacity=1) for w, c in ws.items()], float(t)):
            ws[wid] = job_id[0]
            policy.done(job_id)
            if job_id == "B0":
                served_at = t
    assert served_at is not None and 10 < served_at <= 21


def test_batch_submitted_at_once_is_not_reordered_by_the_age_bound():
    policy = AffinityScheduler(max_wait_s=1.0)
    policy.submit(jobs("A", 50) + jobs("B", 1))
    for t in range(20):  # far past max_wait_s on the clock, but nothing was overtaken
        pairs = policy.assign([worker("w0", "A", capacity=1)], 100.0 + t)
        assert [j[0][0] for j in pairs] == ["A"]
        policy.done(pairs[0][0])


def test_higher_priority_runs_first_and_may_break_affinity():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 5) + jobs("B", 1, priority=5))
    pairs = policy.assign([worker("w0", "A", capacity=1)], 0.0)
    assert pairs == [("B0", "w0")]


def test_priority_orders_jobs_within_a_composition():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 3) + jobs("A", 1, start=3, priority=2))
    pairs = policy.assign([worker("w0", "A", capacity=1)], 0.0)
    assert pairs == [("A3", "w0")]


def test_capacity_is_never_exceeded_and_dead_workers_get_nothing():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 20) + jobs("B", 20) + jobs("C", 20))
    ws = [worker("w0", "A", inflight=1, capacity=2), worker("w1", "B", capacity=3),
          worker("w2", None, capacity=2, alive=False), worker("w3", "C", inflight=2, capacity=2)]
    got = by_worker(policy.assign(ws, 0.0))
    assert len(got.get("w0", [])) <= 1 and len(got.get("w1", [])) <= 3
    assert "w2" not in got and "w3" not in got


def test_requeue_cancel_and_duplicates():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 3))
    with pytest.raises(ValueError):
        policy.submit(jobs("A", 1))
    (first, _), *_ = policy.assign([worker("w0", "A", capacity=1)], 0.0)
    with pytest.raises(ValueError):
        policy.submit([QueuedJob(first, "A", LORA["A"])])  # still assigned
    policy.done(first, requeue=True)  # its actor died: it comes back
    assert policy.pending == 3
    assert sorted(policy.cancel(["A1", "A2", "nope"])) == ["A1", "A2"]
    assert policy.assign([worker("w1", None, capacity=4)], 1.0) == [(first, "w1")]


def test_worker_busy_on_a_composition_counts_as_holding_it():
    """w0 was just sent A jobs but still reports B loaded: A's next job goes to w0."""
    policy = AffinityScheduler()
    policy.submit(jobs("A", 3))
    policy.assign([worker("w0", "B", capacity=2)], 0.0)
    pairs = policy.assign([worker("w0", "B", inflight=1, capacity=2), worker("w1", "C", capacity=2)], 1.0)
    assert by_worker(pairs) == {"w0": ["A2"]}


def test_prefetch_names_the_adapters_needed_next():
    policy = AffinityScheduler()
    policy.submit(jobs("A", 2) + jobs("B", 5) + jobs("C", 3))
    policy.assign([worker("w0", "A", capacity=1), worker("w1", None, capacity=1)], 0.0)
    views = [worker("w0", "A", inflight=1, capacity=1), worker("w1", None, inflight=1, capacity=1)]
    hints = policy.prefetch(views)
    assert hints["w1"] == list(LORA["B"])  # sent B, nothing in memory yet
    assert hints["w0"] == list(LORA["C"])  # A runs dry first; C is the next composition nobody holds
    warm = [worker("w0", "A", inflight=1, capacity=1, adapters=frozenset(LORA["A"] + LORA["C"])), views[1]]
    assert "w0" not in policy.prefetch(warm)


def test_queue_orders_and_forgets_cheaply():
    q = JobQueue()
    for j in jobs("A", 3) + jobs("B", 2, priority=1) + jobs("C", 1, at=-5.0):
        q.add(j)
    assert q.count("A") == 3 and q.top_priority("B") == 1 and q.compositions() == 3
    assert [e[-1] for e in q.largest(set(), 3)] == ["B", "A", "C"]
    assert [e[-1] for e in q.overdue(-1.0, set(), 3)] == ["C"]
    assert q.remove("A1").job_id == "A1" and q.remove("A1") is None
    assert q.pop("A").job_id == "A0" and q.pop_first().job_id == "B0"
    assert q.count_at_least(1) == 1 and len(q) == 3
    for _ in range(5000):  # churn: lazily deleted entries are compacted away
        q.add(QueuedJob("x", "X"))
        q.remove("x")
    assert len(q._rank) < 2000 and len(q._big) < 2000


def test_decision_is_cheap_with_ten_thousand_queued():
    policy = AffinityScheduler()
    policy.submit([QueuedJob(f"j{i}", f"c{i % 500}", (f"u{i % 500}",), 0, 0.0) for i in range(10_000)])
    ws = [worker(f"w{i}", f"c{i}", inflight=1) for i in range(16)]
    policy.assign(ws, 0.0)
    t0 = time.perf_counter()
    n = 0
    for step in range(200):
        n += len(policy.assign([worker(f"w{step % 16}", f"c{step % 16}", inflight=1)], float(step)))
    per_job = (time.perf_counter() - t0) / max(n, 1)
    assert n == 200 and per_job < 2e-3  # ~60 us here; generous for slow CI


def test_queue_sums_work_and_ranks_compositions_by_it():
    q = JobQueue()
    for i in range(3):
        q.add(QueuedJob(f"s{i}", "S", (), 0, 0.0, 0.25))  # three thumbnails
    q.add(QueuedJob("b0", "B", (), 0, 0.0, 2.25))  # one large image
    q.add(QueuedJob("p0", "P", (), 1, 0.0, 1.0))
    assert q.work("S") == 0.75 and q.work("B") == 2.25 and q.work("nope") == 0.0
    assert [e[-1] for e in q.largest(set(), 3)] == ["P", "B", "S"]  # priority first, then work
    assert q.work_at_least(0) == 4.0 and q.work_at_least(1) == 1.0
    q.remove("b0")
    assert q.work("B") == 0.0 and q.work_at_least(0) == 1.75
    assert q.sizes() == [("S", 3, 0.75), ("P", 1, 1.0)]
