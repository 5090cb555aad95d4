"""RenderWorker writes PNGs off the model lock (``overlap_output``): the device renders the
next group, or the other concurrent call's group, while a group's images are encoded and
written. Proven by ordering, never by the clock: the injected image writer of one job
blocks until some other render has *started* (an event the backend sets), and the log of
renders and writes shows which came first. With ``overlap_output=False`` (the serial
order) that render cannot start while the write holds the model lock: the writer gives up
waiting after ``NEVER_S`` and the log shows the write ended first.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict

import pytest
import torch

from jobs.manifest import Job, LoraRef
from jobs.options import FarmOptions
from storage.output import write_bytes_atomic
from jobs.stamp import read_stamp
from lora_core.synthetic import comfy_extract_state_dict
from testsupport import lora as T
from testsupport.sleep import SleepBackend, sleep_transformer_shapes
from workers.worker import WRITER_THREADS, RenderWorker

pytestmark = pytest.mark.timeout(120)

#: How long a writer waits for a render that must start while it is blocked (a safety net:
#: the event comes at once when the worker overlaps).
SOON_S = 30.0
#: How long a writer waits for a render that must NOT start while it is blocked, before it
#: gives up and lets the test see the order (a longer wait only makes a wrong pass rarer).
NEVER_S = 1.0


class Probe:
    """The order of renders and writes across threads, and an event per logged step."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self._lock = threading.Lock()
        self._events: dict[tuple, threading.Event] = defaultdict(threading.Event)

    def note(self, *step) -> None:
        with self._lock:
            self.log.append(step)
            self._events[step].set()

    def wait(self, *step, timeout: float) -> bool:
        with self._lock:
            event = self._events[step]
        return event.wait(timeout)

    def before(self, first: tuple, then: tuple) -> bool:
        assert first in self.log and then in self.log, (first, then, self.log)
        return self.log.index(first) < self.log.index(then)


class ProbedBackend(SleepBackend):
    """The sleep backend (no sleeping) noting when each render starts, by the requests' seeds."""

    def __init__(self, probe: Probe, images_short: int = 0, **kw):
        super().__init__(**kw)
        self.probe = probe
        self.images_short = images_short

    def render(self, batch):
        for r in batch:
            self.probe.note("render", r.seed)
        images = super().render(batch)
        return images[: len(images) - self.images_short]


def make_worker(tmp_path, probe: Probe, *, overlap: bool, hold=None, fail=(), max_batch: int = 1,
                lora_mode: str = "merge", images_short: int = 0) -> RenderWorker:
    """A worker on ProbedBackend whose writer notes each write and, for a job id in ``hold``,
    first calls ``hold[job_id]()`` (which blocks); a job id in ``fail`` fails to write."""
    hold = hold or {}

    def writer(uri: str, png: bytes, opts) -> None:
        job_id = os.path.basename(uri)[: -len(".png")]
        probe.note("write-start", job_id)
        hold.get(job_id, lambda: None)()
        if job_id in fail:
            probe.note("write-end", job_id)
            raise OSError(28, "No space left on device")
        write_bytes_atomic(uri, png, opts)
        probe.note("write-end", job_id)

    return RenderWorker({"backend": "sleep"}, "w0", options=FarmOptions(max_batch=max_batch, lora_mode=lora_mode),
                        cache_dir=str(tmp_path / "cache"), overlap_output=overlap, image_writer=writer,
                        backend_factory=lambda spec, device: ProbedBackend(probe, images_short, device=device))


def job(job_id: str, seed: int, *loras: str) -> Job:
    return Job(job_id, "p", seed, tuple(LoraRef(u, 1.0) for u in loras), 2, 64, 64, 1.0)


def until_render(probe: Probe, seed: int, overlap: bool):
    """A hold: block until the render of ``seed`` has started (overlap) or NEVER_S passed (serial)."""
    return lambda: probe.wait("render", seed, timeout=SOON_S if overlap else NEVER_S)


def in_thread(fn, *args):
    out: dict = {}

    def run():
        out["value"] = fn(*args)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two LoRA files for the sleep transformer: ``plain`` (pairs only) and ``with_diff`` (a
    bias diff too, so under ``lora_mode: lowrank`` its rows say ``lowrank+merge``)."""
    d = tmp_path_factory.mktemp("overlap-loras")
    plain = T.random_layers(sleep_transformer_shapes(include=("attn.to_q",)), rank=2, seed=1, scale=0.5)
    with_diff = T.random_layers(sleep_transformer_shapes(include=("attn.to_v",)), rank=2, seed=2, scale=0.5)
    bias = {"transformer_blocks.0.attn.to_q": {"bias": torch.randn(32, generator=torch.Generator().manual_seed(3))}}
    return {"plain": T.write_safetensors(d / "plain.safetensors", T.peft_state_dict(plain)),
            "with_diff": T.write_safetensors(d / "diff.safetensors", comfy_extract_state_dict(with_diff, bias))}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_next_group_renders_while_this_groups_write_is_blocked(tmp_path, overlap):
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=overlap, hold={"j0": until_render(probe, 1, overlap)})
    rows = w.render([job("j0", 0), job("j1", 1)], str(tmp_path / "out"))
    assert [(r.job_id, r.status) for r in rows] == [("j0", "ok"), ("j1", "ok")], rows
    assert probe.before(("render", 0), ("write-start", "j0"))
    if overlap:  # group 1 composed and rendered while group 0's PNG was still being written
        assert probe.before(("render", 1), ("write-end", "j0")), probe.log
    else:  # the serial order: the device waited for the encoder
        assert probe.before(("write-end", "j0"), ("render", 1)), probe.log
    for r in rows:
        with open(r.output_uri, "rb") as f:
            assert read_stamp(f.read(4096))["job_id"] == r.job_id
    assert (w.jobs_done, w.jobs_failed) == (2, 0)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_the_other_call_renders_while_this_calls_write_is_blocked(tmp_path, overlap):
    """Two calls at once, as the threaded actor runs them (workers.actor.CONCURRENT_CALLS)."""
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=overlap, hold={"a0": until_render(probe, 11, overlap)})
    a, a_out = in_thread(lambda: (w.render([job("a0", 10)], str(tmp_path / "out")), probe.note("returned", "a"))[0])
    assert probe.wait("render", 10, timeout=SOON_S)  # A holds or held the model lock: now B asks for it
    b, b_out = in_thread(lambda: (w.render([job("b0", 11)], str(tmp_path / "out")), probe.note("returned", "b"))[0])
    a.join(SOON_S)
    b.join(SOON_S)
    assert not a.is_alive() and not b.is_alive()
    if overlap:
        assert probe.before(("render", 11), ("write-end", "a0")), probe.log
    else:
        assert probe.before(("write-end", "a0"), ("render", 11)), probe.log
    assert probe.before(("write-end", "a0"), ("returned", "a"))  # a call returns once its own images are written
    assert [r.job_id for r in a_out["value"]] == ["a0"] and [r.job_id for r in b_out["value"]] == ["b0"]
    assert all(r.status == "ok" for r in a_out["value"] + b_out["value"])
    assert (w.jobs_done, w.jobs_failed) == (2, 0)


def test_a_row_reports_what_the_model_held_when_it_rendered(tmp_path, loras):
    """A's PNG is encoded and written only after B has switched the model to B's composition
    (the writer pool is kept busy until then, so A's write task cannot even start); A's row
    and its stamp still carry A's key and mode: captured under the lock, not read later."""
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=True, lora_mode="lowrank")
    gate = threading.Event()
    busy = [w._writer_pool().submit(gate.wait, SOON_S) for _ in range(WRITER_THREADS)]
    a, a_out = in_thread(w.render, [job("a0", 20, loras["with_diff"])], str(tmp_path / "out"))
    assert probe.wait("render", 20, timeout=SOON_S)
    b, b_out = in_thread(w.render, [job("b0", 21, loras["plain"])], str(tmp_path / "out"))
    assert probe.wait("render", 21, timeout=SOON_S)  # B's composition is on the model now
    assert ("write-start", "a0") not in probe.log
    gate.set()
    a.join(SOON_S)
    b.join(SOON_S)
    assert all(f.result() for f in busy)
    (ra,), (rb,) = a_out["value"], b_out["value"]
    assert ra.status == rb.status == "ok", (ra.error, rb.error)
    assert w.model.key == rb.composition_key != ra.composition_key  # the model holds B's
    assert (ra.lora_mode, rb.lora_mode) == ("lowrank+merge", "lowrank")
    for row in (ra, rb):
        with open(row.output_uri, "rb") as f:
            stamp = read_stamp(f.read(4096))
        assert (stamp["key"], stamp["mode"]) == (row.composition_key, row.lora_mode)
    # the same composition alone on a fresh worker: the key A's row reports is A's own
    alone = make_worker(tmp_path / "alone", Probe(), overlap=False, lora_mode="lowrank")
    (again,) = alone.render([job("a0", 20, loras["with_diff"])], str(tmp_path / "alone-out"))
    assert again.composition_key == ra.composition_key


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_a_failed_write_fails_its_job_only(tmp_path, overlap):
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=overlap, fail={"j1"}, max_batch=4)  # one group of three
    jobs = [job("j0", 0), job("j1", 1), job("j2", 2), Job("k0", "p", 3, (), 2, 128, 128, 1.0)]  # k0: another size
    rows = w.render(jobs, str(tmp_path / "out"))
    assert [(r.job_id, r.status) for r in rows] == [("j0", "ok"), ("j1", "failed"), ("j2", "ok"), ("k0", "ok")]
    bad = rows[1]
    assert bad.error.startswith("OSError: [Errno 28] No space left on device"), bad.error
    assert bad.composition_key == "" and not bad.transient and bad.worker_id == "w0"
    assert not os.path.exists(tmp_path / "out" / "images" / "j1.png")
    assert all(os.path.exists(r.output_uri) for r in rows if r.status == "ok")
    assert (w.jobs_done, w.jobs_failed) == (3, 1)
    st = w.state()
    assert (st["jobs_done"], st["jobs_failed"]) == (3, 1)


def test_rows_come_back_in_group_order_with_failures_in_place(tmp_path, loras):
    """Interleaved compositions: rows are per group as before (the group's first job decides the
    group's place), a bad LoRA fails its own group, written groups keep their slots."""
    probe = Probe()
    missing = str(tmp_path / "missing.safetensors")
    w = make_worker(tmp_path, probe, overlap=True, max_batch=2)
    jobs = [job("a0", 0, loras["plain"]), job("x0", 1, missing), job("b0", 2), job("a1", 3, loras["plain"]),
            job("a2", 4, loras["plain"]), job("b1", 5)]
    rows = w.render(jobs, str(tmp_path / "out"))
    assert [r.job_id for r in rows] == ["a0", "a1", "a2", "x0", "b0", "b1"]
    assert [r.status for r in rows] == ["ok", "ok", "ok", "failed", "ok", "ok"], [r.error for r in rows]
    assert len({r.composition_key for r in rows if r.job_id.startswith("a")}) == 1
    assert (w.jobs_done, w.jobs_failed) == (5, 1)


def test_a_call_keeps_at_most_one_earlier_group_writing(tmp_path):
    """Double buffering: group 1 renders while group 0 writes, but group 2 waits for group 0's
    write (a call never holds more than two groups of decoded images)."""
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=True, hold={"j0": lambda: probe.wait("render", 2, timeout=NEVER_S)})
    rows = w.render([job("j0", 0), job("j1", 1), job("j2", 2)], str(tmp_path / "out"))
    assert [r.status for r in rows] == ["ok"] * 3
    assert probe.before(("render", 1), ("write-end", "j0"))
    assert probe.before(("write-end", "j0"), ("render", 2)), probe.log


def test_a_backend_returning_too_few_images_fails_the_group(tmp_path):
    probe = Probe()
    w = make_worker(tmp_path, probe, overlap=True, max_batch=4, images_short=1)
    rows = w.render([job("j0", 0), job("j1", 1)], str(tmp_path / "out"))
    assert [r.status for r in rows] == ["failed", "failed"]
    assert "returned 1 images for a batch of 2" in rows[0].error
    assert not any(s[0] == "write-start" for s in probe.log)
    assert (w.jobs_done, w.jobs_failed) == (0, 2)
