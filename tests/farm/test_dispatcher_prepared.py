"""The dispatcher's prepared sets come from the workers' own reports (issue 16: "the workers
report what they hold"): real RenderWorkers (the sleep backend, low-rank mode, a branch cache
small enough to evict) behind the in-memory transport. After each run the book's prepared set
is the worker's branch cache, by the policy's routing keys, and a composition that comes back
goes to the worker that still holds it prepared."""
from __future__ import annotations

from typing import Any, Sequence

import pytest

from farm.dispatcher import Dispatcher
from farm.transport import WorkerLost
from farm.scheduler import AffinityScheduler
from farm.scheduler.costs import switch_cost
from jobs.manifest import Job, LoraRef
from jobs.options import FarmOptions
from jobs.results import ResultRow
from testsupport import lora as T
from testsupport.sleep import SleepBackend, sleep_transformer_shapes
from tests.farm.test_dispatcher import FakeTransport
from workers.holds import Holds, Rows
from workers.worker import RenderWorker

COMPOSE_S = 0.05  # the sleep backend's switch: what the dispatcher learns a compose costs
NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, str]:
    """One file per composition, each on the same modules at the same rank: the same branch bytes."""
    d = tmp_path_factory.mktemp("prepared-loras")
    return {n: T.write_safetensors(d / f"{n}.safetensors", T.peft_state_dict(
        T.random_layers(sleep_transformer_shapes(include=("attn.to_q",)), rank=4, seed=i, scale=0.5)))
        for i, n in enumerate(NAMES)}


class Local:
    """A real RenderWorker as FakeTransport's handle: its calls run in this process. Prefetch
    hints are recorded, not run (background loads would make what it holds racy to assert)."""

    def __init__(self, worker: RenderWorker, seconds: float = 1.0) -> None:
        self.worker, self.worker_id, self.seconds = worker, worker.worker_id, seconds
        self.calls: list[list[str]] = []

    def render(self, jobs: Sequence[Job], output_root: str, storage_options: dict) -> Any:
        self.calls.append([j.job_id for j in jobs])
        return self.worker.render(jobs, output_root, storage_options)

    def prefetch(self, loras: Sequence[Any]) -> int:
        return len(loras)


def worker(tmp_path, wid: str, cache_bytes: int, adapter_bytes: int = 2 << 30) -> Local:
    opts = FarmOptions(lora_mode="lowrank", max_batch=2, branch_cache_mb=cache_bytes / (1 << 20))
    return Local(RenderWorker({"backend": "sleep"}, wid, options=opts, cache_dir=str(tmp_path / "cache"),
                              adapter_cache_bytes=adapter_bytes,
                              backend_factory=lambda spec, device: SleepBackend(compose_s=COMPOSE_S, device=device)))


def jobs_of(loras: dict[str, str], run: str, names: str, per: int) -> list[Job]:
    return [Job(f"{run}-{n}{i}", "p", i, (LoraRef(loras[n], 1.0),), 2, 64, 64, 1.0) for n in names for i in range(per)]


def one_branch_bytes(tmp_path, loras) -> int:
    probe = worker(tmp_path, "probe", 1 << 30).worker
    probe.render(jobs_of(loras, "probe", "a", 1), str(tmp_path / "probe"))
    ((_, kept),) = probe.model._prepared.items()
    return kept.nbytes


class Farm:
    """A dispatcher over ``workers``; runs one at a time to the end; maps content keys back."""

    def __init__(self, workers: Sequence[Local], root: str) -> None:
        self.transport = FakeTransport()
        self.d = Dispatcher({}, AffinityScheduler(), "", transport=self.transport, capacity=2)
        self.root, self.routing_of, self.rows = root, {}, []
        for w in workers:
            self.d.add_worker(w.worker_id, w, node_id="n0")

    def run(self, run_id: str, jobs: list[Job]) -> list[ResultRow]:
        by_id = {j.job_id: j for j in jobs}
        got: list[ResultRow] = []
        self.d.add_run(run_id, jobs, f"{self.root}/{run_id}", on_rows=got.extend)
        for _ in range(10_000):
            if not self.d.busy():
                break
            self.d.step()
        assert sorted(r.job_id for r in got) == sorted(by_id) and all(r.status == "ok" for r in got), got
        for r in got:
            self.routing_of.setdefault(r.composition_key, set()).add(by_id[r.job_id].routing_key)
        self.rows += got
        return got

    def cached(self, w: Local) -> set[str]:
        """What ``w`` really holds prepared, by routing keys."""
        return {rk for (_, key) in w.worker.model._prepared for rk in self.routing_of.get(key, ())}


def test_the_books_prepared_set_is_the_workers_branch_cache(tmp_path, loras):
    size = one_branch_bytes(tmp_path, loras)
    w = worker(tmp_path, "w0", cache_bytes=2 * size + size // 2)  # two compositions fit, not three
    farm = Farm([w], str(tmp_path / "out"))
    routing = {n: jobs_of(loras, "x", n, 1)[0].routing_key for n in NAMES}
    book = farm.d.worker_book("w0")
    for run, names, holds in (("r1", "ab", "ab"), ("r2", "c", "bc"), ("r3", "a", "ca"), ("r4", "d", "ad")):
        farm.run(run, jobs_of(loras, run, names, 3))
        assert len(w.worker.model._prepared) == len(holds), "the worker's cache is bounded: it evicts"
        assert book.prepared == farm.cached(w) == {routing[n] for n in holds}, run
    assert w.worker.model.backend.switches >= 5


def test_a_composition_that_comes_back_goes_to_the_worker_that_kept_it_prepared(tmp_path, loras):
    """Two workers: one renders a then c, the other b then d; a and b come back, each to the
    worker that kept it prepared (a swap there), though both now hold something else and the
    adapters left memory (the adapter cache holds one file): without the report they cost the same."""
    from lora_core import load_adapter

    size = one_branch_bytes(tmp_path, loras)
    one_file = load_adapter(loras["a"]).nbytes
    ws = [worker(tmp_path, f"w{i}", cache_bytes=4 * size, adapter_bytes=one_file) for i in range(2)]
    farm = Farm(ws, str(tmp_path / "out"))
    farm.run("r1", jobs_of(loras, "r1", "ab", 4))
    took = {wid: {r.composition_key for r in farm.rows if r.worker_id == wid} for wid in ("w0", "w1")}
    assert all(len(keys) == 1 for keys in took.values()), f"one composition per worker: {took}"
    holder = {rk: wid for wid, (key,) in ((w, tuple(k)) for w, k in took.items()) for rk in farm.routing_of[key]}
    farm.run("r2", jobs_of(loras, "r2", "cd", 4))
    views = {v.worker_id: v for v in farm.d.workers()}
    back = jobs_of(loras, "r3", "ab", 2)
    for j in back:
        mine, other = views[holder[j.routing_key]], views["w1" if holder[j.routing_key] == "w0" else "w0"]
        uris = [r.uri for r in j.loras]
        assert j.routing_key in mine.prepared and j.routing_key != mine.routing_key
        assert not set(uris) & (mine.adapters | other.adapters), "the adapters left memory"
        assert set(uris) <= mine.node_disk, "on the node's disk: the swap reads them from there"
        swap = switch_cost(mine, j.routing_key, uris, mine.routing_key)
        assert swap == pytest.approx(mine.swap_cost_s + len(uris) * mine.load_cost_s), "a swap after the reads"
        assert swap < switch_cost(other, j.routing_key, uris, other.routing_key), "a swap is the cheaper switch"
    rows = farm.run("r3", back)
    assert {r.job_id: r.worker_id for r in rows} == {j.job_id: holder[j.routing_key] for j in back}


class Dying:
    """A worker process that dies with two calls out: the first call (slow) renders and
    reports holding a prepared, the second (quick) is lost with the process. Ray answers
    the lost one first."""

    worker_id = "w0"

    def __init__(self) -> None:
        self.calls = 0

    @property
    def seconds(self) -> float:  # read as each call is sent: the first is the slow one
        return 2.0 if self.calls == 0 else 1.0

    def render(self, jobs: Sequence[Job], output_root: str, storage_options: dict) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise WorkerLost("ActorDiedError: the actor died")
        rows = [ResultRow.ok(j, output_uri=f"{output_root}/{j.job_id}.png", composition_key="content-a",
                             worker_id=self.worker_id, fetch_s=0.0, compose_s=0.5, render_s=1.0, lora_mode="lowrank")
                for j in jobs]
        return Rows(rows, Holds("old-process", 1, ("content-a",), tuple(r.uri for j in jobs for r in j.loras)))

    def prefetch(self, loras: Sequence[Any]) -> int:
        return len(loras)


def test_a_report_of_a_process_lost_meanwhile_is_not_the_truth(loras):
    """The review's case: calls X and Y out, the actor dies during Y; Y's loss is read first
    (the book forgets: the restarted actor is empty), then X's rows with the dead process's
    report. Its rows count; its report does not (that process never reported before, so only
    the call's send time tells it apart)."""
    d = Dispatcher({}, AffinityScheduler(), "", transport=FakeTransport(), capacity=2)
    d.add_worker("w0", Dying(), node_id="n0")
    rows: list[ResultRow] = []
    d.add_run("r", jobs_of(loras, "r", "a", 2), "memory://out", on_rows=rows.extend)
    d.step(timeout=0)
    assert len(d.pending) == 2
    d.collect(10.0)  # Y: lost
    book = d.worker_book("w0")
    assert book.epoch == 1 and book.prepared == frozenset()
    d.collect(10.0)  # X: its rows, and the dead process's report
    assert [r.status for r in rows] == ["ok"]
    assert book.prepared == frozenset() and book.adapters == set(), "the restarted actor holds nothing"
