"""The Dispatcher over an in-memory transport: retries, worker death, permanent failures,
Ctrl-C and prefetch hints, driven by the real policy (AffinityScheduler), with no Ray.

``FakeTransport`` plays the cluster: a call finishes ``seconds`` after it is sent on a
fake clock, completions come back soonest first, and a scripted worker decides what
each call returns or raises (the transport's own errors, as Ray's are mapped onto them).
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import pytest

from farm.dispatcher import Dispatcher
from farm.scheduler import AffinityScheduler
from farm.transport import TaskFailed, TransportError, WorkerLost
from jobs.manifest import validate_manifest
from jobs.results import ResultRow
from workers.holds import Holds, Rows


@dataclass
class Script:
    """What happens to jobs, whichever worker renders them."""

    flaky: Counter = field(default_factory=Counter)  # job id -> transient failures before it renders
    bad: set = field(default_factory=set)  # job ids that fail for good (a bad LoRA)


class FakeWorker:
    """A render worker: each ``render`` call either raises the next of ``faults`` (one per
    call, while any are left; ``forever``: the last one for every call after) or returns
    one row per job, and what it holds after them as a worker reports it (``Rows.holds``):
    every LoRA it rendered with in memory, no branch cache (its rows are merged)."""

    def __init__(self, worker_id: str, script: Script | None = None, *, faults: Sequence[TransportError] = (),
                 forever: bool = False, seconds: float = 1.0) -> None:
        self.worker_id, self.script, self.seconds = worker_id, script or Script(), seconds
        self.faults, self.forever = list(faults), forever
        self.calls: list[list[str]] = []  # job ids of each render call, in order
        self.prefetched: list[str] = []  # uris hinted
        self.held: dict[str, None] = {}  # uris it rendered with, in order
        self.lives = 0  # a fault ends a life: the next call is answered by a new process

    def render(self, jobs: Sequence[Any], output_root: str, storage_options: dict) -> list[ResultRow]:
        self.calls.append([j.job_id for j in jobs])
        if self.faults:
            self.lives += 1
            self.held = {}
            raise self.faults[0] if self.forever and len(self.faults) == 1 else self.faults.pop(0)
        rows = [self._row(j) for j in jobs]
        self.held.update((r.uri, None) for j, row in zip(jobs, rows) if row.status == "ok" for r in j.loras)
        return Rows(rows, Holds(f"{self.worker_id}#{self.lives}", len(self.calls), (), tuple(self.held)))

    def _row(self, job: Any) -> ResultRow:
        if job.job_id in self.script.bad:
            return ResultRow.failed(job, "LoraError: not a LoRA", worker_id=self.worker_id)
        if self.script.flaky[job.job_id] > 0:
            self.script.flaky[job.job_id] -= 1
            return ResultRow.failed(job, "OutOfMemoryError: try again", worker_id=self.worker_id, transient=True)
        key = "+".join(sorted(r.uri for r in job.loras)) or "base"
        return ResultRow.ok(job, output_uri=f"memory://out/images/{job.job_id}.png", composition_key=key,
                            worker_id=self.worker_id, fetch_s=0.0, compose_s=0.5, render_s=self.seconds, lora_mode="merge")

    def prefetch(self, loras: Sequence[Any]) -> int:
        self.prefetched.extend(r.uri for r in loras)
        return len(loras)


@dataclass
class _Call:
    worker: str
    method: str
    done_at: float
    job_ids: tuple[str, ...] = ()  # of a render call
    value: Any = None
    error: TransportError | None = None
    cancelled: bool = False


class FakeTransport:
    """The ``farm.transport.Transport`` protocol in memory, on a fake clock."""

    def __init__(self, start: float = 1000.0, *, interrupt_on_wait: int | None = None) -> None:
        self.clock = start
        self.calls: dict[int, _Call] = {}  # in flight
        self.sent: list[tuple[str, str]] = []  # (worker id, method) of every call
        self.log: list[tuple[str, str]] = []  # (worker id, method sent | "got" | "lost"), in order
        self.done: list[_Call] = []  # render calls read or cancelled, in order
        self.waits = 0
        self.interrupt_on_wait = interrupt_on_wait  # the n-th wait raises KeyboardInterrupt (Ctrl-C)
        self._ids = itertools.count()

    def submit(self, handle: FakeWorker, method: str, *args: Any) -> int:
        ref = next(self._ids)
        call = _Call(handle.worker_id, method, self.clock + handle.seconds,
                     tuple(j.job_id for j in args[0]) if method == "render" else ())
        try:
            call.value = getattr(handle, method)(*args)
        except TransportError as e:  # as Ray does: the failure shows when the result is read
            call.error = e
        self.calls[ref] = call
        self.sent.append((handle.worker_id, method))
        self.log.append((handle.worker_id, method))
        return ref

    def wait(self, refs: Sequence[int], *, num_returns: int = 1,
             timeout: float | None = None) -> tuple[list[int], list[int]]:
        self.waits += 1
        if self.waits == self.interrupt_on_wait:
            raise KeyboardInterrupt
        order = sorted(refs, key=lambda r: (self.calls[r].done_at, r))
        ready = [r for r in order[:num_returns]
                 if timeout is None or self.calls[r].done_at <= self.clock + timeout]
        self.clock = max(self.clock, self.calls[ready[-1]].done_at) if ready else self.clock + (timeout or 0.0)
        return ready, [r for r in refs if r not in ready]

    def get(self, ref: int) -> Any:
        call = self.calls.pop(ref)
        self.done.append(call)
        self.log.append((call.worker, "got" if call.error is None else "lost"))
        if call.error is not None:
            raise call.error
        return call.value

    def cancel(self, ref: int) -> None:
        call = self.calls.pop(ref)
        call.cancelled = True
        self.done.append(call)

    def now(self) -> float:
        return self.clock


def make_jobs(n: int, sets: Sequence[Sequence[str]] = ((), ("s3://b/a.safetensors",), ("s3://b/b.safetensors",))):
    """``n`` jobs cycling over LoRA ``sets`` (one routing key each; ``()`` is the base model)."""
    m = validate_manifest({"model": {"backend": "tiny"}, "output": "memory://out",
                           "jobs": [{"prompt": f"p{i}", "seed": i, "loras": [{"uri": u} for u in sets[i % len(sets)]]}
                                    for i in range(n)]})
    return list(m.jobs)


def dispatch(workers: Sequence[FakeWorker], jobs, transport: FakeTransport | None = None, policy=None, **kw):
    transport = transport or FakeTransport()
    rows: list[ResultRow] = []
    kw.setdefault("capacity", 2)
    d = Dispatcher({w.worker_id: w for w in workers}, policy or AffinityScheduler(), "memory://out", transport=transport,
                   on_rows=rows.extend, **kw)
    stats = d.run(jobs)
    return d, stats, {r.job_id: r for r in rows}, rows


def assert_one_row_per_job(rows: list[ResultRow], jobs) -> None:
    assert sorted(r.job_id for r in rows) == sorted(j.job_id for j in jobs), "every job exactly once"


def rendered(workers: Sequence[FakeWorker]) -> Counter:
    return Counter(jid for w in workers for call in w.calls for jid in call)


def test_every_job_renders_once_in_calls_of_one_composition():
    jobs = make_jobs(12)
    workers = [FakeWorker("w0"), FakeWorker("w1")]
    seen: list[int] = []
    d, stats, by_id, rows = dispatch(workers, jobs, capacity=4, max_batch=4, progress=lambda d: seen.append(d.stats.ok))
    assert_one_row_per_job(rows, jobs)
    assert (stats.total, stats.ok, stats.failed, stats.retried, stats.interrupted) == (12, 12, 0, 0, False)
    assert all(r.status == "ok" and r.attempts == 1 for r in rows)
    assert seen == list(range(1, 13)), "the progress callback once per recorded row"
    assert rendered(workers) == Counter({j.job_id: 1 for j in jobs})
    loras = {j.job_id: {r.uri for r in j.loras} for j in jobs}
    for w in workers:
        for call in w.calls:
            assert len(call) <= 2, "capacity 4: calls of capacity // 2 jobs, two in flight"
            assert len({frozenset(loras[j]) for j in call}) == 1, "one composition per call"
    assert {r.worker_id for r in rows} == {"w0", "w1"}
    assert d.in_flight() == {} and all(v.inflight == 0 for v in d.workers())


def test_the_policy_runs_on_the_transports_clock():
    class Watching(AffinityScheduler):
        times: list[float]

        def submit(self, jobs):
            jobs = list(jobs)
            self.submitted, self.times = {j.enqueued_at for j in jobs}, []
            super().submit(jobs)

        def assign(self, workers, now):
            self.times.append(now)
            return super().assign(workers, now)

    policy, transport = Watching(), FakeTransport(start=1000.0)
    dispatch([FakeWorker("w0", seconds=2.0)], make_jobs(4), transport, policy)
    assert policy.submitted == {1000.0}
    assert policy.times[0] == 1000.0 and policy.times == sorted(policy.times)
    assert policy.times[-1] == transport.clock > 1000.0


def test_a_transient_failure_is_retried():
    jobs = make_jobs(6)
    flaky = jobs[2].job_id
    workers = [FakeWorker("w0", Script(flaky=Counter({flaky: 1})))]
    d, stats, by_id, rows = dispatch(workers, jobs)
    assert_one_row_per_job(rows, jobs)
    assert by_id[flaky].status == "ok" and by_id[flaky].attempts == 2
    assert stats.retried == 1 and stats.ok == 6
    assert rendered(workers)[flaky] == 2


def test_a_transient_failure_gives_up_after_retries():
    jobs = make_jobs(3)
    flaky = jobs[0].job_id
    workers = [FakeWorker("w0", Script(flaky=Counter({flaky: 99})))]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=2)
    assert_one_row_per_job(rows, jobs)
    assert by_id[flaky].status == "failed" and by_id[flaky].attempts == 3
    assert by_id[flaky].error.startswith("OutOfMemoryError")
    assert (stats.ok, stats.failed, stats.retried) == (2, 1, 2)


def test_a_permanent_failure_is_never_retried():
    jobs = make_jobs(6)
    bad = jobs[1].job_id
    workers = [FakeWorker("w0", Script(bad={bad})), FakeWorker("w1", Script(bad={bad}))]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=5)
    assert_one_row_per_job(rows, jobs)
    assert by_id[bad].status == "failed" and by_id[bad].attempts == 1 and by_id[bad].error == "LoraError: not a LoRA"
    assert rendered(workers)[bad] == 1
    assert (stats.ok, stats.failed, stats.retried) == (5, 1, 0)


def test_jobs_lost_with_a_worker_that_died_are_retried():
    jobs = make_jobs(8)
    workers = [FakeWorker("w0", faults=[WorkerLost("ActorDiedError: the actor died")]), FakeWorker("w1")]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=2)
    lost = workers[0].calls[0]
    assert_one_row_per_job(rows, jobs)
    assert all(r.status == "ok" for r in rows)
    assert stats.retried == len(lost)
    assert all(by_id[j].attempts == 2 for j in lost)
    assert {v.worker_id: v.alive for v in d.workers()} == {"w0": True, "w1": True}, "one death: restarted, kept"
    assert len(workers[0].calls) > 1, "the restarted worker is sent work again"


def test_a_worker_that_dies_again_and_again_is_dropped():
    jobs = make_jobs(12)
    dead = FakeWorker("w0", faults=[WorkerLost("ActorDiedError: gone")], forever=True)
    workers = [dead, FakeWorker("w1")]
    transport = FakeTransport()
    d, stats, by_id, rows = dispatch(workers, jobs, transport, retries=4)
    assert_one_row_per_job(rows, jobs)
    assert all(r.status == "ok" and r.worker_id == "w1" for r in rows), "the dead worker's jobs went elsewhere"
    third = [n for n, event in enumerate(transport.log) if event == ("w0", "lost")][2]
    assert ("w0", "render") not in transport.log[third:], "dropped after three deaths in a row: sent nothing more"
    assert {v.worker_id: v.alive for v in d.workers()} == {"w0": False, "w1": True}
    assert stats.retried == sum(len(c) for c in dead.calls)


def test_a_call_that_broke_is_retried_without_counting_a_death():
    jobs = make_jobs(6)
    broken = [TaskFailed("RayTaskError: the call raised")] * 3
    workers = [FakeWorker("w0", faults=broken), FakeWorker("w1")]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=3)
    assert_one_row_per_job(rows, jobs)
    assert all(r.status == "ok" for r in rows)
    assert {v.worker_id: v.alive for v in d.workers()} == {"w0": True, "w1": True}, "a broken call is no death"
    assert stats.retried == sum(len(c) for c in workers[0].calls[:3])


def test_when_every_worker_is_dead_the_queue_fails_once_each():
    jobs = make_jobs(6)
    dead = FakeWorker("w0", faults=[WorkerLost("ActorDiedError: gone")], forever=True)
    d, stats, by_id, rows = dispatch([dead], jobs, retries=5)
    assert_one_row_per_job(rows, jobs)
    assert {(r.status, r.error) for r in rows} == {("failed", "no live worker left")}
    assert (stats.ok, stats.failed) == (0, 6)


def test_lost_jobs_out_of_retries_keep_the_transport_error():
    jobs = make_jobs(2, sets=[()])
    workers = [FakeWorker("w0", faults=[WorkerLost("ActorDiedError: gone")] * 2), FakeWorker("w1", seconds=50.0)]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=0, capacity=2, max_batch=1)
    assert_one_row_per_job(rows, jobs)
    lost = [r for r in rows if r.status == "failed"]
    assert lost and all(r.error == "ActorDiedError: gone" and r.worker_id == "w0" and r.composition_key == ""
                        for r in lost)


def test_ctrl_c_cancels_what_is_in_flight_and_keeps_what_finished():
    jobs = make_jobs(20)
    transport = FakeTransport(interrupt_on_wait=5)
    workers = [FakeWorker("w0"), FakeWorker("w1")]
    d, stats, by_id, rows = dispatch(workers, jobs, transport, capacity=4, max_batch=2)
    assert stats.interrupted
    got = [c for c in transport.done if not c.cancelled]
    cancelled = [c for c in transport.done if c.cancelled]
    assert got and cancelled
    assert sorted(by_id) == sorted(j for c in got for j in c.job_ids), "every finished call's rows kept"
    assert len(rows) == stats.ok and all(r.status == "ok" for r in rows) and stats.failed == 0
    assert not {j for c in cancelled for j in c.job_ids} & set(by_id), "a cancelled call records nothing"
    assert len(got) + len(cancelled) == len([m for _, m in transport.sent if m == "render"]), "nothing left running"
    assert d.in_flight() == {} and d.pending == {}
    # queued (and cancelled) jobs get no row: the next run of the manifest renders them
    assert stats.total - stats.ok - stats.failed == 20 - len(rows) > 0


def test_prefetch_hints_go_through_the_transport_once_per_worker_and_lora():
    sets = [("s3://b/a.safetensors",), ("s3://b/b.safetensors", "s3://b/c.safetensors"), ("s3://b/d.safetensors",)]
    jobs = make_jobs(18, sets)
    workers = [FakeWorker("w0"), FakeWorker("w1")]
    transport = FakeTransport()
    d, stats, by_id, rows = dispatch(workers, jobs, transport, capacity=2, max_batch=1)
    assert_one_row_per_job(rows, jobs)
    assert any(m == "prefetch" for _, m in transport.sent)
    uris = {u for s in sets for u in s}
    for w in workers:
        assert w.prefetched and set(w.prefetched) <= uris
        assert len(w.prefetched) == len(set(w.prefetched)), f"{w.worker_id}: each LoRA hinted once"


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_exactly_one_row_per_job_whatever_fails(retries):
    jobs = make_jobs(15)
    script = Script(flaky=Counter({j.job_id: i % 3 for i, j in enumerate(jobs)}), bad={jobs[4].job_id})
    workers = [FakeWorker("w0", script, faults=[WorkerLost("ActorDiedError: gone"), TaskFailed("boom")]),
               FakeWorker("w1", script, seconds=1.5), FakeWorker("w2", script, faults=[WorkerLost("x")] * 3)]
    d, stats, by_id, rows = dispatch(workers, jobs, retries=retries, capacity=4)
    assert_one_row_per_job(rows, jobs)
    assert stats.ok + stats.failed == 15 and not stats.interrupted
    assert all(r.attempts <= retries + 1 for r in rows)
    assert by_id[jobs[4].job_id].status == "failed" and by_id[jobs[4].job_id].attempts == 1


def test_collect_drains_what_is_in_flight_and_sends_nothing_new():
    jobs = make_jobs(8)
    transport = FakeTransport()
    workers = [FakeWorker("w0"), FakeWorker("w1")]
    rows: list[ResultRow] = []
    d = Dispatcher({w.worker_id: w for w in workers}, AffinityScheduler(), "memory://out", transport=transport,
                   capacity=2, max_batch=1)
    d.add_run("r", jobs, "memory://out", on_rows=rows.extend)
    d.step()  # sends a first round (and may collect)
    sent = [c for c in transport.sent if c[1] == "render"]
    assert d.has_run("r") and not d.has_run("other") and d.busy()
    while d.in_flight():
        d.collect(1.0)
    assert [c for c in transport.sent if c[1] == "render"] == sent, "a drain sends nothing new"
    counts = d.run_counts("r")
    assert counts["running"] == 0 and counts["queued"] == len(jobs) - len(rows) > 0
    assert sorted(d.worker_books()) == ["w0", "w1"] and d.worker_book("w0") is d.books["w0"]
    assert d.worker_book("nobody") is None
    books = d.worker_books()
    books.pop("w0")
    assert d.worker_book("w0") is not None, "a snapshot: changing it changes nothing"
