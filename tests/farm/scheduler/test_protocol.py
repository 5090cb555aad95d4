"""Every policy (ours and the baselines, farm/scheduler/baselines.py) obeys the protocol, on random
fake farms."""
from __future__ import annotations

import random

import pytest

from farm.scheduler.baselines import POLICIES, ServeMultiplexPolicy, make
from farm.scheduler.types import QueuedJob, WorkerView


def random_jobs(rng: random.Random, n: int, comps: int, start: int = 0, at: float = 0.0) -> list[QueuedJob]:
    out = []
    for i in range(start, start + n):
        c = rng.randrange(comps)
        out.append(QueuedJob(f"j{i}", f"c{c}", (f"u{c}", f"u{c + 1}"), rng.choice((0, 0, 0, 1)), at))
    return out


def drive(policy, rng: random.Random, workers: int = 5, n: int = 300, comps: int = 12, arrivals: int = 5) -> dict:
    """A fake dispatcher: random capacities, deaths, completions and retries; checks every reply."""
    state = {f"w{i}": {"comp": None, "run": [], "cap": rng.randint(1, 3), "alive": True} for i in range(workers)}
    per_batch = n // arrivals
    assigned_once: dict[str, str] = {}
    finished: set[str] = set()
    submitted = 0
    t = 0.0
    while len(finished) < n:
        t += 1.0
        if submitted < n and rng.random() < 0.3:
            policy.submit(random_jobs(rng, per_batch, comps, submitted, t))
            submitted += per_batch
        if rng.random() < 0.02:  # a worker dies: its jobs come back
            w = state[rng.choice(list(state))]
            if sum(s["alive"] for s in state.values()) > 1 and w["alive"]:
                w["alive"] = False
                for job_id in w["run"]:
                    policy.done(job_id, requeue=True)
                    assigned_once.pop(job_id)
                w["run"] = []
        views = [WorkerView(w, "n0", s["comp"], inflight=len(s["run"]), capacity=s["cap"], alive=s["alive"])
                 for w, s in state.items()]
        room = {v.worker_id: v.capacity - v.inflight for v in views}
        for job_id, wid in policy.assign(views, t):
            assert state[wid]["alive"], f"{policy.name} gave {job_id} to dead {wid}"
            room[wid] -= 1
            assert room[wid] >= 0, f"{policy.name} overfilled {wid}"
            assert job_id not in assigned_once and job_id not in finished, f"{policy.name} assigned {job_id} twice"
            assigned_once[job_id] = wid
            state[wid]["run"].append(job_id)
            state[wid]["comp"] = f"c{job_id}"  # any non-None marker; policies use their own tail
        for s in state.values():  # each worker finishes its oldest job with some chance
            if s["run"] and rng.random() < 0.5:
                job_id = s["run"].pop(0)
                policy.done(job_id)
                finished.add(job_id)
        policy.prefetch(views)  # must not raise, any time
        assert t < 100_000, f"{policy.name} stalled with {policy.pending} queued"
    assert policy.pending == 0
    return {"finished": finished, "submitted": submitted}


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_every_job_assigned_exactly_once_within_capacity(name: str, seed: int):
    rng = random.Random(seed)
    out = drive(make(name), rng)
    assert out["finished"] == {f"j{i}" for i in range(out["submitted"])}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_nothing_for_dead_or_full_workers(name: str):
    policy = make(name)
    policy.submit(random_jobs(random.Random(0), 20, 3))
    views = [WorkerView("dead", alive=False), WorkerView("full", inflight=2, capacity=2)]
    assert policy.assign(views, 0.0) == []
    assert policy.assign([], 0.0) == []
    assert policy.pending == 20


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cancel_and_requeue(name: str):
    policy = make(name)
    policy.submit(random_jobs(random.Random(1), 10, 3))
    with pytest.raises(ValueError):
        policy.submit(random_jobs(random.Random(1), 1, 3))
    pairs = policy.assign([WorkerView("w0", capacity=1)], 0.0)
    assert len(pairs) == 1
    job_id = pairs[0][0]
    assert policy.cancel([job_id]) == []  # assigned: the dispatcher's to stop, not the queue's
    policy.done(job_id, requeue=True)
    left = [f"j{i}" for i in range(10)]
    assert sorted(policy.cancel(left)) == sorted(left)
    assert policy.pending == 0
    assert isinstance(policy.prefetch([WorkerView("w0")]), dict)


def test_fifo_and_least_loaded_follow_arrival_order():
    jobs = [QueuedJob(f"j{i}", f"c{i % 3}", (), 0, float(i)) for i in range(4)]
    fifo, least = make("fifo"), make("least_loaded")
    fifo.submit(jobs)
    least.submit(jobs)
    ws = [WorkerView("a", "c1", inflight=1, capacity=2), WorkerView("b", "c0", capacity=2)]
    assert fifo.assign(ws, 0.0) == [("j0", "a"), ("j1", "b"), ("j2", "b")]
    assert least.assign(ws, 0.0) == [("j0", "b"), ("j1", "a"), ("j2", "b")]


def test_serve_multiplex_prefers_a_replica_with_the_model_then_the_emptiest():
    policy = ServeMultiplexPolicy(seed=0)
    policy.submit([QueuedJob("x0", "X", ()), QueuedJob("y0", "Y", ())])
    ws = [WorkerView(f"r{i}", capacity=4) for i in range(4)]
    first = dict(policy.assign(ws, 0.0))
    policy.submit([QueuedJob("x1", "X", ())])
    assert dict(policy.assign(ws, 0.1))["x1"] == first["x0"]  # model X is loaded there
    assert first["x0"] != first["y0"]  # fewest-models fallback spreads new models


def test_serve_multiplex_keeps_three_models_per_replica():
    policy = ServeMultiplexPolicy(seed=0)
    for i, m in enumerate("ABCD"):
        policy.submit([QueuedJob(f"{m}{i}", m, ())])
        policy.assign([WorkerView("r0", capacity=8)], float(i))
    assert policy._models["r0"] == ["B", "C", "D"]


def test_serve_multiplex_wakes_up_to_retry():
    """Two random picks may both miss the one open replica: then it asks to be woken."""
    outcomes = set()
    for seed in range(40):
        policy = ServeMultiplexPolicy(seed=seed)
        policy.submit([QueuedJob(f"j{i}", "X", ()) for i in range(6)])
        ws = [WorkerView(f"r{i}", inflight=1 if i else 0, capacity=1) for i in range(4)]
        pairs = policy.assign(ws, 0.0)
        outcomes.add(bool(pairs))
        if pairs:
            assert pairs[0][1] == "r0" and policy.wake_at() is None
        else:
            assert 0.0 < policy.wake_at() <= 0.5
    assert outcomes == {True, False}
