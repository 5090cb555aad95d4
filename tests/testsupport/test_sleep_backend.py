"""The sleep backend: real LoRA files bind and merge, a switch sleeps C, a render sleeps R per image."""
from __future__ import annotations

import os
import time

import pytest
import torch

from lora_core import load_adapter
from testsupport import lora as T
from testsupport.sleep import SleepBackend, seed_colour, sleep_transformer_shapes
from workers.backends import make_backend
from workers.backends.base import BackendSpecError, RenderRequest
from workers.wrapper import ComposedModel
from workers.worker import png_bytes as png  # the farm's own encoder: the bytes it writes


def req(seed: int) -> RenderRequest:
    return RenderRequest(prompt="p", seed=seed, steps=2, width=1024, height=1024)



@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sleep-loras")
    out = {}
    for name, include, seed in [("a", ("attn.to_q", "attn.to_v"), 1), ("b", ("img_mlp",), 2)]:
        layers = T.random_layers(sleep_transformer_shapes(include=include), rank=4, seed=seed, scale=0.5)
        out[name] = T.write_safetensors(d / f"{name}.safetensors", T.peft_state_dict(layers))
    return out


def test_names_and_shapes_match_qwen_image_linears():
    b = make_backend({"backend": "sleep"}, device="cpu")
    assert isinstance(b, SleepBackend) and b.name == "sleep"
    shapes = T.linear_shapes(b.transformer)
    assert shapes == sleep_transformer_shapes()
    assert "transformer_blocks.0.attn.to_q" in shapes and "transformer_blocks.1.img_mlp.net.0.proj" in shapes
    again = make_backend({"backend": "sleep"}, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(b.transformer.parameters(), again.transformer.parameters()))


def test_real_lora_binds_merges_and_restores(lora_files):
    b = make_backend({"backend": "sleep"}, device="cpu")
    before = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    m = ComposedModel(b, lora_mode="merge")
    a = load_adapter(lora_files["a"])
    m.want([(a, 1.0)])
    m.ensure()
    changed = {k for k, v in b.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"transformer_blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("to_q", "to_v")}
    m.reset()
    assert all(torch.equal(v, before[k]) for k, v in b.transformer.state_dict().items()), "bit-exact restore"


def test_a_switch_sleeps_compose_s_once(lora_files):
    b = make_backend({"backend": "sleep", "compose_s": 0.3}, device="cpu")
    m = ComposedModel(b)
    a, bb = load_adapter(lora_files["a"]), load_adapter(lora_files["b"])
    m.want([(a, 1.0)])
    t0 = time.perf_counter()
    m.ensure()
    assert 0.3 <= time.perf_counter() - t0 < 1.5 and b.switches == 1
    m.want([(a, 1.0)])  # same key: no switch, no sleep
    t0 = time.perf_counter()
    assert m.ensure() == 0.0
    assert time.perf_counter() - t0 < 0.1 and b.switches == 1
    m.want([(a, 0.5), (bb, 1.0)])
    assert m.ensure() >= 0.3 and b.switches == 2
    assert m.stats.switches == 2 and m.stats.mean_s >= 0.3


def test_render_sleeps_per_image_and_is_deterministic():
    b = make_backend({"backend": "sleep", "render_s": 0.1}, device="cpu")
    t0 = time.perf_counter()
    imgs = b.render([req(1), req(2), req(1)])
    took = time.perf_counter() - t0
    assert 0.3 <= took < 1.5, took
    assert [im.size for im in imgs] == [(8, 8)] * 3, "small images whatever size is asked"
    assert imgs[0].getpixel((3, 5)) == seed_colour(1) and png(imgs[0]) == png(imgs[2])
    assert png(imgs[0]) != png(imgs[1])
    other = SleepBackend(render_s=0.0, image_size=4)
    assert png(other.render([req(2)])[0]) == png(other.render([req(2)])[0])
    assert other.render([req(2)])[0].size == (4, 4)
    assert len({seed_colour(s) for s in range(100)}) == 100


def test_noop_backend_does_not_sleep(lora_files, monkeypatch):
    calls = []
    monkeypatch.setattr(time, "sleep", lambda s: calls.append(s))
    b = make_backend({"backend": "sleep", "render_s": 0, "compose_s": 0}, device="cpu")
    m = ComposedModel(b)
    m.want([(load_adapter(lora_files["b"]), 1.0)])
    m.ensure()
    b.render([req(0)] * 4)
    assert calls == [] and b.switches == 1 and b.rendered == 4


def test_bad_spec_lists_every_problem():
    with pytest.raises(BackendSpecError) as e:
        make_backend({"backend": "sleep", "render_s": -1, "compose_s": "slow", "bogus": 1}, device="cpu")
    text = str(e.value)
    assert "bogus" in text
    with pytest.raises(BackendSpecError) as e:
        make_backend({"backend": "sleep", "render_s": -1, "compose_s": "slow"}, device="cpu")
    assert len(e.value.problems) == 2


def test_render_worker_end_to_end(lora_files, tmp_path):
    """The sleep backend under the real RenderWorker: fetch, bind, compose (sleep C), render (sleep R), PNG."""
    from jobs.manifest import Job, LoraRef
    from workers.worker import RenderWorker

    w = RenderWorker({"backend": "sleep", "render_s": 0.05, "compose_s": 0.2}, "w0", cache_dir=str(tmp_path / "cache"))
    jobs = [Job(f"j{i}", "p", i, (LoraRef(lora_files["a"], 1.0),), 2, 64, 64, 1.0) for i in range(3)]
    rows = w.render(jobs, str(tmp_path / "out"))
    assert [r.status for r in rows] == ["ok"] * 3, rows
    assert rows[0].compose_s >= 0.2 and 0.04 <= rows[0].render_s < 0.5
    assert w.model.backend.switches == 1


def test_a_ray_actor_builds_it_from_the_factory_it_is_given(lora_files, tmp_path):
    """A registration lives in the driver's process; an actor gets the factory itself (pickled by reference)."""
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
        os.environ.setdefault(k, v)
    import ray

    from farm.cluster import make_workers
    from jobs.manifest import Job, LoraRef
    from testsupport.sleep import make_sleep_backend

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        spec = {"backend": "sleep", "compose_s": 0.05}
        untold = make_workers(1, spec, worker_options=dict(cache_dir=str(tmp_path / "cache")))[0]
        told = make_workers(1, spec, worker_options=dict(cache_dir=str(tmp_path / "cache"),
                                                         backend_factory=make_sleep_backend))[0]
        job = Job("j0", "p", 0, (LoraRef(lora_files["a"], 1.0),), 2, 64, 64, 1.0)
        rows = ray.get(told.render.remote([job], str(tmp_path / "out")))
        assert [r.status for r in rows] == ["ok"], rows
        assert ray.get(told.state.remote())["switches"] == 1
        failed = ray.get(untold.render.remote([job], str(tmp_path / "out2")))  # the registration did not travel
        assert [r.status for r in failed] != ["ok"] and "unknown 'sleep'" in failed[0].error, failed
    finally:
        ray.shutdown()
