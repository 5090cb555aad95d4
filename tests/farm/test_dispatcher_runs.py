"""The Dispatcher as the farm service drives it: many runs through one policy, added while it
steps, cancelled, and workers joining, leaving and coming back — over the in-memory transport."""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from farm.dispatcher import Dispatcher
from farm.scheduler import AffinityScheduler
from farm.transport import WorkerLost
from jobs.results import ResultRow
from tests.farm.test_dispatcher import FakeTransport, FakeWorker, make_jobs


class RootWorker(FakeWorker):
    """Also records which output root (run) each render call wrote to."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.roots: list[tuple[str, tuple[str, ...]]] = []

    def render(self, jobs: Sequence[Any], output_root: str, storage_options: dict) -> list[ResultRow]:
        self.roots.append((output_root, tuple(j.job_id for j in jobs)))
        return super().render(jobs, output_root, storage_options)


def service(workers, transport=None) -> tuple[Dispatcher, FakeTransport]:
    t = transport or FakeTransport()
    d = Dispatcher({}, AffinityScheduler(), "", transport=t, capacity=2)
    for w in workers:
        d.add_worker(w.worker_id, w, node_id="n0")
    return d, t


def drain(d: Dispatcher, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not d.busy():
            return
        d.step()
    raise AssertionError("the dispatcher never went idle")


def test_two_runs_with_the_same_job_ids_each_get_their_own_rows_and_output():
    jobs = make_jobs(6)
    workers = [RootWorker("w0"), RootWorker("w1")]
    d, _ = service(workers)
    rows: dict[str, list[ResultRow]] = {"a": [], "b": []}
    d.add_run("a", jobs, "memory://a", on_rows=rows["a"].extend)
    d.step()
    d.add_run("b", jobs, "memory://b", on_rows=rows["b"].extend)  # the same job ids, another run
    drain(d)
    for run in ("a", "b"):
        assert sorted(r.job_id for r in rows[run]) == sorted(j.job_id for j in jobs)
        assert d.run_counts(run) == {"total": 6, "ok": 6, "failed": 0, "queued": 0, "running": 0, "cancelled": 0}
        assert d.finished(run)
    written = Counter((root, jid) for w in workers for root, ids in w.roots for jid in ids)
    assert written == Counter({(f"memory://{r}", j.job_id): 1 for r in ("a", "b") for j in jobs})
    assert d.jobs == {} and d.attempts == {} and d.work == {}, "nothing of a finished job stays behind"
    d.drop_run("a")
    assert "a" not in d.runs and "b" in d.runs


def test_a_composition_held_for_one_run_serves_the_next_without_a_switch():
    sets = (("s3://b/a.safetensors",), ("s3://b/b.safetensors",))
    workers = [RootWorker("w0"), RootWorker("w1")]
    d, _ = service(workers)
    d.add_run("first", make_jobs(8, sets), "memory://1")
    drain(d)
    switches = d.switches
    assert switches == 2, "each worker composed once"
    d.add_run("second", make_jobs(8, sets), "memory://2")
    drain(d)
    assert d.switches == switches, "the second run's compositions were held: no worker switched"


def test_cancel_drops_the_queued_jobs_and_lets_in_flight_ones_finish():
    jobs = make_jobs(12)
    workers = [RootWorker("w0", seconds=5.0)]
    d, _ = service(workers)
    rows: list[ResultRow] = []
    d.add_run("r", jobs, "memory://r", on_rows=rows.extend)
    d.step(timeout=0)  # two calls sent, none finished
    inflight = {t.split("/", 1)[1] for ids in d.in_flight().values() for t in ids}  # tickets: run/job
    assert inflight and d.run_counts("r")["running"] == len(inflight)
    dropped = d.cancel_run("r")
    assert dropped == 12 - len(inflight)
    drain(d)
    assert {r.job_id for r in rows} == {t for t in inflight} and all(r.status == "ok" for r in rows)
    assert d.run_counts("r") == {"total": 12, "ok": len(inflight), "failed": 0, "queued": 0,
                                 "running": 0, "cancelled": dropped}
    assert d.finished("r") and not d.busy()


def test_a_worker_that_joins_later_takes_work_and_a_retired_one_gets_none():
    jobs = make_jobs(10)
    w0, w1 = RootWorker("w0"), RootWorker("w1")
    d, _ = service([w0])
    rows: list[ResultRow] = []
    d.add_run("r", jobs, "memory://r", on_rows=rows.extend)
    d.step()
    d.add_worker("w1", w1)
    d.remove_worker("w0")
    sent_to_w0 = len(w0.calls)
    drain(d)
    assert sorted(r.job_id for r in rows) == sorted(j.job_id for j in jobs)
    assert len(w0.calls) == sent_to_w0, "a retired worker is sent nothing more"
    assert w1.calls, "the new worker took the rest"
    d.revive("w0")
    assert not d.books["w0"].alive, "a retired worker is never revived"


def test_a_worker_given_up_on_is_revived_and_comes_back_empty():
    jobs = make_jobs(4)
    dead = RootWorker("w0", faults=[WorkerLost("ActorDiedError: gone")] * 3)
    d, _ = service([dead])
    rows: list[ResultRow] = []
    d.add_run("r", jobs, "memory://r", on_rows=rows.extend)
    for _ in range(20):  # three deaths in a row: the dispatcher stops sending to it
        d.step()
        if not d.books["w0"].alive:
            break
    assert not d.books["w0"].alive and d.busy(), "jobs wait for a worker (the service does not fail them)"
    d.revive("w0")  # Ray restarted it and it answered the controller's probe
    assert d.books["w0"].alive and d.books["w0"].routing_key is None
    drain(d)
    assert {r.job_id for r in rows} == {j.job_id for j in jobs}
    assert all(r.status == "ok" or r.transient for r in rows)


def test_a_row_for_a_job_the_call_did_not_carry_is_ignored_and_a_missing_one_retried():
    jobs = make_jobs(2, sets=((),))

    class Confused(RootWorker):
        def render(self, js, output_root, storage_options):
            rows = super().render(js, output_root, storage_options)
            if len(self.calls) == 1:  # the first call answers for another job, not its own
                other = next(j for j in jobs if j.job_id != js[0].job_id)
                return [ResultRow.ok(other, output_uri="x", composition_key="base", worker_id="w0", fetch_s=0,
                                     compose_s=0, render_s=1, lora_mode="merge")]
            return rows

    w = Confused("w0")
    d, _ = service([w])
    rows: list[ResultRow] = []
    d.add_run("r", jobs, "memory://r", on_rows=rows.extend)
    drain(d)
    assert sorted(r.job_id for r in rows) == sorted(j.job_id for j in jobs), "exactly one row per job"
    assert all(r.status == "ok" for r in rows)


def test_a_cancelled_runs_in_flight_job_that_fails_transiently_is_dropped_not_retried():
    jobs = make_jobs(4, sets=((),))
    w = RootWorker("w0", faults=[WorkerLost("ActorDiedError: gone")], seconds=5.0)
    d, _ = service([w])
    rows: list[ResultRow] = []
    d.add_run("r", jobs, "memory://r", on_rows=rows.extend)
    d.step(timeout=0)  # the first call is in flight; it will come back lost
    dropped = d.cancel_run("r")
    drain(d)
    lost = len(w.calls[0])
    sent = [jid for call in w.calls for jid in call]
    assert len(sent) == len(set(sent)), "no job of a cancelled run is sent twice"
    counts = d.run_counts("r")
    assert counts["cancelled"] == dropped + lost and counts["queued"] == counts["running"] == 0
    assert {r.job_id for r in rows}.isdisjoint(w.calls[0]), "a lost job of a cancelled run gets no row"
    assert d.finished("r") and not d.busy()
