"""Full-weight diffs through the worker's ComposedModel on the real tiny backend: exact
switches in both modes, and the mode the result row reports (``lowrank+merge``)."""
from __future__ import annotations

import pytest
import torch

from lora_core import load_adapter
from lora_core.synthetic import comfy_extract_state_dict
from testsupport import lora as T
from workers.backends import make_backend
from workers.backends.base import RenderRequest
from workers.wrapper import ComposedModel
from workers.worker import png_bytes as png

REQ = RenderRequest(prompt="a red fox", negative_prompt="", seed=7, steps=2, width=64, height=64, guidance=1.0)


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    return make_backend({"backend": "tiny"}, device="cpu")


def extract(backend, d, seed):
    """A ComfyUI LoraSave file for the tiny model: pairs on attention, diffs on norms and biases."""
    tr = backend.transformer
    layers = T.random_layers(T.linear_shapes(tr, ("attn.to_q", "attn.to_v")), rank=4, seed=seed, scale=0.5)
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    for name, m in tr.named_modules():
        if name.endswith(("attn.norm_q", "attn.norm_k")):
            diffs[name] = {"weight": torch.randn(m.weight.shape, generator=g) * 0.5}
        elif name.endswith("attn.to_q"):
            diffs[name] = {"bias": torch.randn(m.bias.shape, generator=g) * 0.5}
    sd = comfy_extract_state_dict(layers, diffs, dtype=torch.bfloat16)
    return load_adapter(T.write_safetensors(d / f"x{seed}.safetensors", sd))


def render(model: ComposedModel, pairs) -> bytes:
    model.want(pairs)
    model.ensure()
    return png(model.backend.render([REQ])[0])


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_diff_compositions_switch_exactly_and_report_their_mode(backend, tmp_path, mode):
    a, b = extract(backend, tmp_path, 1), extract(backend, tmp_path, 2)
    before = {k: v.clone() for k, v in backend.transformer.state_dict().items()}
    m = ComposedModel(backend, lora_mode=mode)
    base = render(m, [])
    one = render(m, [(a, 1.0)])
    assert one != base
    assert m.held_label == ("lowrank+merge" if mode == "lowrank" else "merge")
    two = render(m, [(b, 0.8)])
    assert two not in (base, one)
    assert render(m, [(a, 1.0)]) == one, "A -> B -> A gives A's bytes"
    assert render(m, []) == base
    assert m.held_label == mode
    now = backend.transformer.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items()), "the model is back at its base, bit for bit"
    assert not any(mod._forward_hooks for mod in backend.transformer.modules())


def test_worker_rows_report_lowrank_plus_merge(backend, tmp_path):
    """A results row's ``lora_mode`` (a string column) says the diffs were merged; a plain
    LoRA job in the same run still reports ``lowrank``, and both rows are there."""
    from jobs.manifest import validate_manifest
    from jobs.options import FarmOptions
    from workers.worker import RenderWorker

    ext = T.write_safetensors(tmp_path / "ext.safetensors", comfy_extract_state_dict(
        {}, {"transformer_blocks.0.attn.norm_q": {"weight": torch.full((backend.transformer.get_submodule(
            "transformer_blocks.0.attn.norm_q").weight.shape[0],), 0.5)}}))
    plain = T.write_safetensors(tmp_path / "plain.safetensors", T.peft_state_dict(
        T.random_layers({"transformer_blocks.0.attn.to_q": (128, 128)}, rank=2, seed=1)))
    man = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                             "output": str(tmp_path / "out"),
                             "jobs": [{"prompt": "x", "loras": [{"uri": ext, "strength": 0.5}]},
                                      {"prompt": "y", "loras": [{"uri": plain, "strength": 0.5}]}]})
    w = RenderWorker(options=FarmOptions(lora_mode="lowrank"), cache_dir=str(tmp_path / "cache"), num_threads=1)
    rows = sorted(w.render(man.jobs, str(tmp_path / "out")), key=lambda r: r.lora_mode)
    assert [r.status for r in rows] == ["ok", "ok"], [r.error for r in rows]
    assert [r.lora_mode for r in rows] == ["lowrank", "lowrank+merge"]
