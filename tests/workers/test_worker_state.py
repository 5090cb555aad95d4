"""What RenderWorker.state() reports (DESIGN "farm workers"): model loads, compositions,
adapter bytes, device memory and measured images per second, next to every older key."""
from __future__ import annotations

import threading

import pytest
import torch

from jobs.manifest import Job, LoraRef
from jobs.options import FarmOptions
from lora_core import load_adapter
from testsupport import lora as T
from testsupport.sleep import SleepBackend, sleep_transformer_shapes
from workers import worker as worker_mod
from workers.worker import RenderWorker

#: The keys state() had before these were added: none may go.
OLDER_KEYS = {"worker_id", "node", "model_built", "composition", "adapters", "adapter_cache", "store", "device",
              "free_memory", "compose_s", "switches", "lora_mode", "render_s", "jobs_done", "jobs_failed"}
NEW_KEYS = {"model_loads", "compositions", "adapters_bytes", "device_memory", "images_per_s"}

RENDER_S = 0.02  # the sleep backend sleeps at least this per image


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("state-loras")
    out = {}
    for name, include, seed in [("a", ("attn.to_q",), 1), ("b", ("img_mlp",), 2)]:
        layers = T.random_layers(sleep_transformer_shapes(include=include), rank=4, seed=seed, scale=0.5)
        out[name] = T.write_safetensors(d / f"{name}.safetensors", T.peft_state_dict(layers))
    return out


def job(job_id: str, seed: int, *uris: str) -> Job:
    return Job(job_id, "p", seed, tuple(LoraRef(u, 1.0) for u in uris), 2, 64, 64, 1.0)


def make(tmp_path, builds: list | None = None, **kw) -> RenderWorker:
    def factory(spec, device):
        if builds is not None:
            builds.append(threading.current_thread().name)
        return SleepBackend(render_s=RENDER_S, device=device)

    return RenderWorker({"backend": "sleep"}, "w0", options=FarmOptions(lora_mode="merge", max_batch=2),
                        cache_dir=str(tmp_path / "cache"), backend_factory=factory, **kw)


def test_a_fresh_worker_reports_nothing_done(tmp_path):
    st = make(tmp_path).state()
    assert OLDER_KEYS | NEW_KEYS <= set(st), sorted(OLDER_KEYS | NEW_KEYS - set(st))
    assert (st["model_loads"], st["compositions"], st["switches"]) == (0, 0, 0)
    assert st["adapters_bytes"] == 0 and st["adapters"] == []
    assert st["device_memory"] is None and st["images_per_s"] == 0.0 and st["render_s"] == 0.0
    assert st["model_built"] is False


def test_after_renders_it_counts_loads_compositions_bytes_and_speed(tmp_path, loras):
    builds: list = []
    w = make(tmp_path, builds)
    out = str(tmp_path / "out")
    w.render([job("a0", 0, loras["a"]), job("a1", 1, loras["a"])], out)  # compose a
    w.render([job("b0", 2, loras["b"])], out)  # switch to b
    w.render([job("b1", 3, loras["b"])], out)  # b again: no switch
    w.render([job("a2", 4, loras["a"]), job("n0", 5)], out)  # back to a, then the base model
    st = w.state()
    assert st["model_loads"] == 1 and len(builds) == 1, builds
    assert st["compositions"] == st["switches"] == w.model.backend.switches == 4  # a, b, a, base
    expected = sum(load_adapter(loras[n]).nbytes for n in ("a", "b"))
    assert st["adapters_bytes"] == expected == sum(e["bytes"] for e in st["adapters"])
    assert st["device_memory"] is None  # a CPU worker
    # each image took at least RENDER_S (the backend sleeps it), so no more than 1/RENDER_S per second
    assert 0 < st["images_per_s"] <= 1 / RENDER_S
    assert st["images_per_s"] == pytest.approx(1 / st["render_s"])
    assert (st["jobs_done"], st["jobs_failed"]) == (6, 0)


def test_two_first_calls_at_once_build_the_model_once(tmp_path, loras):
    builds: list = []
    w = make(tmp_path, builds)
    outs: list = []
    threads = [threading.Thread(target=lambda i=i: outs.append(w.render([job(f"j{i}", i, loras["a"])],
                                                                        str(tmp_path / "out"))))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outs) == 2 and all(r.status == "ok" for rows in outs for r in rows)
    assert w.state()["model_loads"] == 1 and len(builds) == 1


def test_each_render_reports_what_the_worker_holds(tmp_path, loras):
    """``render`` returns its rows with ``holds``: the branch cache's content keys (the rows'
    ``composition_key``), least recent first, and the URIs of the adapters in memory, as the
    worker's caches evict them; later reports count higher."""
    one = max(load_adapter(loras[n]).nbytes for n in ("a", "b"))  # the adapter cache holds one file
    w = RenderWorker({"backend": "sleep"}, "w0", options=FarmOptions(lora_mode="lowrank"), adapter_cache_bytes=one,
                     cache_dir=str(tmp_path / "cache"), backend_factory=lambda spec, device: SleepBackend(device=device))
    out = str(tmp_path / "out")
    first = w.render([job("a0", 0, loras["a"])], out)
    (ka,) = {r.composition_key for r in first}
    assert first.holds.prepared == (ka,) and first.holds.adapters == (loras["a"],)
    second = w.render([job("b0", 1, loras["b"])], out)
    (kb,) = {r.composition_key for r in second}
    assert second.holds.prepared == (ka, kb) and second.holds.adapters == (loras["b"],), "a left memory"
    assert second.holds.origin == first.holds.origin and second.holds.seq > first.holds.seq
    assert w.state()["prepared"] == [ka, kb]
    merged = make(tmp_path / "m").render([job("m0", 2, loras["a"])], out)
    assert merged.holds.prepared == () and merged.holds.adapters == (loras["a"],), "a merge keeps no branch"


class OomOnce(SleepBackend):
    """The sleep backend, out of device memory on the render after ``fail`` is set."""

    fail = False

    def render(self, batch):
        if self.fail:
            self.fail = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().render(batch)


def test_a_group_that_fails_after_its_switch_still_reports_what_the_switch_evicted(tmp_path, loras):
    """The branch cache holds one composition: switching to b evicts a before b renders; b's
    render runs out of memory. The call's rows fail, and its report says what the cache holds
    now (b), not the earlier report's a, which the dispatcher would keep crediting."""
    size = {}
    for n in ("a", "b"):
        probe = RenderWorker({"backend": "sleep"}, "p", options=FarmOptions(lora_mode="lowrank"),
                             cache_dir=str(tmp_path / "probe"), backend_factory=lambda spec, device: SleepBackend())
        probe.render([job(f"{n}0", 0, loras[n])], str(tmp_path / "probe-out"))
        size[n] = probe.model._prepared[next(iter(probe.model._prepared))].nbytes
    w = RenderWorker({"backend": "sleep"}, "w0", cache_dir=str(tmp_path / "cache"),
                     options=FarmOptions(lora_mode="lowrank", branch_cache_mb=max(size.values()) / (1 << 20)),
                     backend_factory=lambda spec, device: OomOnce(device=device))
    out = str(tmp_path / "out")
    first = w.render([job("a0", 0, loras["a"])], out)
    (ka,) = {r.composition_key for r in first}
    assert first.holds.prepared == (ka,)
    w.model.backend.fail = True
    failed = w.render([job("b0", 1, loras["b"])], out)
    assert [r.status for r in failed] == ["failed"] and failed[0].transient
    assert w.model.key != ka, "b was switched to before its render failed"
    assert failed.holds.seq > first.holds.seq
    assert failed.holds.prepared == w.model.prepared_keys() == (w.model.key,), "a was evicted: not reported"


def test_device_memory_is_torchs_allocation_on_a_cuda_device(monkeypatch):
    """The CUDA branch without a GPU: torch's counters stand in, and a CPU device is None."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: seen.append(dev) or 12345)
    assert worker_mod._device_memory("cuda:0") == 12345 and seen == [torch.device("cuda:0")]
    assert worker_mod._device_memory(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_on_a_real_gpu(tmp_path, loras):
    w = RenderWorker({"backend": "sleep"}, "w0", options=FarmOptions(lora_mode="merge"), device="cuda",
                     cache_dir=str(tmp_path / "cache"), backend_factory=lambda spec, device: SleepBackend(device=device))
    assert w.render([job("g0", 0, loras["a"])], str(tmp_path / "out"))[0].status == "ok"
    st = w.state()
    assert st["device_memory"] == torch.cuda.memory_allocated(w.model.backend.device) > 0
