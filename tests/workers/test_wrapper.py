"""ComposedModel on the real tiny backend: exact switches, lazy composition, step-cache reset."""
from __future__ import annotations


import pytest
import torch

from lora_core import load_adapter
from testsupport import lora as T
from lora_core.errors import LoraError
from workers.backends import make_backend
from workers.backends.base import RenderRequest
from workers.stepcache import StepCache
from workers.wrapper import ComposedModel
from workers.worker import png_bytes as png  # the farm's own encoder: the bytes it writes

REQ = RenderRequest(prompt="a red fox", negative_prompt="", seed=7, steps=2, width=64, height=64, guidance=1.0)


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    return make_backend({"backend": "tiny"}, device="cpu")


@pytest.fixture(scope="module")
def adapters(backend, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for name, include, seed in [("a", ("attn.to_q", "attn.to_v"), 1), ("b", ("img_mlp",), 2), ("bad", ("attn.to_k",), 3),
                                ("c", ("attn.to_q", "img_mlp"), 5)]:
        layers = T.random_layers(T.linear_shapes(backend.transformer, include), rank=4, seed=seed, scale=0.5)
        if name == "bad":  # finite factors whose product overflows: fails during merge, after others applied
            layers = {k: (a * 0 + 1e30, b * 0 + 1e30, al) for k, (a, b, al) in layers.items()}
            layers.update(T.random_layers(T.linear_shapes(backend.transformer, ("img_mlp",)), rank=2, seed=4))
        out[name] = load_adapter(T.write_safetensors(d / f"{name}.safetensors", T.peft_state_dict(layers)))
    return out



def render(model: ComposedModel, pairs) -> bytes:
    model.want(pairs)
    model.ensure()
    return png(model.backend.render([REQ])[0])


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_switches_are_exact(backend, adapters, mode):
    m = ComposedModel(backend, lora_mode=mode)
    base = render(m, [])
    assert render(m, []) == base, "same seed, same bytes"
    a1 = render(m, [(adapters["a"], 1.0)])
    assert a1 != base, "a LoRA changes the image"
    b = render(m, [(adapters["b"], 0.8)])
    assert b not in (base, a1)
    assert render(m, [(adapters["a"], 1.0)]) == a1, "A -> B -> A gives A's bytes"
    # C shares to_q with A and img_mlp with B: those modules go straight from A's (B's) merge to C's
    c = render(m, [(adapters["c"], 0.6)])
    assert c not in (base, a1, b)
    assert render(m, [(adapters["b"], 0.8)]) == b, "A -> C -> B gives B's bytes"
    assert render(m, [(adapters["c"], 0.6)]) == c
    assert render(m, []) == base, "no LoRA after a LoRA gives the base image exactly"
    fresh = ComposedModel(backend, lora_mode=mode)
    assert render(fresh, [(adapters["c"], 0.6)]) == c, "C after other compositions = C on a fresh base"
    fresh.reset()
    assert m.stats.switches == 7
    assert not any(mod._forward_hooks for mod in backend.transformer.modules())


def test_lowrank_switch_back_reuses_prepared_branches(backend, adapters, monkeypatch):
    import workers.wrapper as W

    calls = []
    real_plan = W.plan
    monkeypatch.setattr(W, "plan", lambda *a, **kw: calls.append(1) or real_plan(*a, **kw))
    m = ComposedModel(backend, lora_mode="lowrank")
    a = render(m, [(adapters["a"], 1.0)])
    c = render(m, [(adapters["c"], 0.6)])
    assert len(calls) == 2
    assert render(m, [(adapters["a"], 1.0)]) == a and render(m, [(adapters["c"], 0.6)]) == c
    assert len(calls) == 2, "switching back to a held composition plans nothing"
    sizes = [k.nbytes for k in m._prepared.values()]
    m.reset()
    small = ComposedModel(backend, lora_mode="lowrank", branch_cache_mb=max(sizes) / (1 << 20))
    render(small, [(adapters["a"], 1.0)])
    render(small, [(adapters["c"], 0.6)])
    assert sum(k.nbytes for k in small._prepared.values()) <= max(sizes), "bounded in bytes"
    assert render(small, [(adapters["a"], 1.0)]) == a
    small.reset()


def test_lazy_and_only_on_change(backend, adapters):
    m = ComposedModel(backend)
    m.want([(adapters["a"], 0.5)])
    assert m.pending and m.key == "base"
    assert m.ensure() > 0
    m.want([(adapters["a"], 0.5)])
    assert not m.pending and m.ensure() == 0.0
    assert m.stats.switches == 1
    m.reset()


def test_failed_composition_leaves_model_as_before(backend, adapters):
    m = ComposedModel(backend)
    m.want([(adapters["a"], 1.0)])
    m.ensure()
    before = {k: v.clone() for k, v in backend.transformer.state_dict().items()}
    m.want([(adapters["bad"], 1.0)])
    with pytest.raises(LoraError):
        m.ensure()
    after = backend.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert m.key != "base" and not m.pending
    m.reset()


def direct_call(transformer, t: float, seed: int = 0):
    """One denoising call on the transformer itself, as a step-by-step sampler makes it."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(1, 16, cfg.in_channels, generator=g)
    txt = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    with torch.no_grad():
        out = transformer(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 5),
                          timestep=torch.tensor([t]), img_shapes=[(1, 4, 4)], return_dict=False)
    return out[0]


def test_step_cache_reset_on_composition_change(backend, adapters):
    """Multi-stage: stage 2 continues the timestep schedule under another LoRA. Without the
    reset the cache would serve stage 1's output (ratios of 1.0 and a loose threshold make it
    skip); with it, the first call after the switch is computed under the new LoRA."""
    m = ComposedModel(backend)
    cache = StepCache(threshold=10.0, retention_ratio=0.0, k=10, mag_ratios=[1.0] * 8, verbose=False)
    backend.set_step_cache(cache)
    try:
        cache.begin_run(8)
        direct_call(backend.transformer, 1000.0)
        direct_call(backend.transformer, 900.0)
        m.want([(adapters["b"], 1.0)])
        m.ensure()
        skipped_before = cache.stats["skipped"]
        got = direct_call(backend.transformer, 800.0)
        assert cache.stats["skipped"] == skipped_before, "the call after a switch must be computed"
        backend.set_step_cache(None)
        want = direct_call(backend.transformer, 800.0)
        assert torch.equal(got, want)
    finally:
        backend.set_step_cache(None)
        m.reset()


def test_one_step_on_a_terminal_shift_schedule_is_a_clear_error(backend):
    """diffusers' stretch_shift_to_terminal divides by zero at one step: refuse, don't render NaN."""
    with pytest.raises(ValueError, match="steps must be >= 2"):
        backend.render([RenderRequest(prompt="x", seed=1, steps=1, width=64, height=64)])


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_device_move_recomposes_from_the_base(backend, adapters, mode):
    """The backend reports another device (cpu -> cpu:0 stands in for a move): the held
    composition is rebuilt from the base, prepared branches are dropped, and the image is
    the composition's own."""
    m = ComposedModel(backend, lora_mode=mode)
    want = render(m, [(adapters["c"], 0.6)])
    saved = backend.device
    try:
        backend.device = torch.device("cpu", 0)
        assert m.pending
        m.want([(adapters["c"], 0.6)])
        assert m.ensure() > 0 and not m.pending
        assert all(k[1] != "base" for k in m._prepared) and len(m._prepared) <= 1
        assert png(backend.render([REQ])[0]) == want
    finally:
        backend.device = saved
        m.reset()
    assert not any(mod._forward_hooks for mod in backend.transformer.modules())


class _SvdqBackend:
    """What ComposedModel needs from a backend, around nunchaku SVDQ stand-in layers."""

    def __init__(self, transformer):
        self.transformer, self.device = transformer, torch.device("cpu")

    def reset_step_cache(self) -> None:
        pass


def _svdq_state(model) -> dict:
    return {n: (m.proj_down.detach().clone(), m.proj_up.detach().clone(), int(m.rank))
            for n, m in model.named_modules() if hasattr(m, "proj_down")}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a.values(), b.values()))


def test_svdq_prepared_branches_are_kept_alone_and_repacked_when_the_base_changes():
    """The cache of prepared SVDQ compositions holds their packed branches and nothing else
    (its byte count is what it holds), a switch back swaps them in, and after the base is
    edited in place a switch back packs against the new base instead of landing a stale branch."""
    model = T.nunchaku_qwen_standin(64, 128)
    comps = {f"transformer_blocks.0.attn.{c}": (64, 64) for c in ("to_q", "to_k", "to_v")}
    comps["transformer_blocks.0.img_mlp.net.0.proj"] = (64, 128)
    x = load_adapter(T.peft_state_dict(T.random_layers(comps, rank=4, seed=1, alpha=4.0)))
    y = load_adapter(T.peft_state_dict(T.random_layers(comps, rank=8, seed=2, alpha=4.0)))
    m = ComposedModel(_SvdqBackend(model), lora_mode="merge")
    for pairs in ([(x, 0.8)], [(y, 0.5)]):
        m.want(pairs)
        m.ensure()
    at_y = _svdq_state(model)
    for updates, nbytes, *_ in m._prepared.values():
        assert all(u.A is None and u.B is None for u in updates.values()), "no factors kept beside the packed branch"
        assert nbytes == sum(t.numel() * t.element_size() for u in updates.values() for t in (u.packed.down, u.packed.up))
    m.want([(x, 0.8)])
    m.ensure()
    at_x = _svdq_state(model)
    m.reset()
    qkv = model.transformer_blocks[0].attn.to_qkv
    with torch.no_grad():
        qkv.proj_up.mul_(2.0)  # new weights loaded into the same parameter
    m.want([(y, 0.5)])
    m.ensure()
    got = _svdq_state(model)
    m.reset()
    fresh = ComposedModel(_SvdqBackend(model), lora_mode="merge")
    fresh.want([(y, 0.5)])
    fresh.ensure()
    assert _same_state(got, _svdq_state(model)), "Y on the edited base, as a fresh model composes it"
    assert not _same_state(got, at_y)
    fresh.reset()
    with torch.no_grad():
        qkv.proj_up.mul_(0.5)  # back to the original values (a new version again)
    m.want([(x, 0.8)])
    m.ensure()
    assert _same_state(_svdq_state(model), at_x)
    m.reset()


def test_prepared_keys_are_the_cached_swaps_least_recent_first(backend, adapters):
    """What a worker reports of its branch cache: the content keys of low-rank compositions it
    would swap back to, oldest first, as the byte bound evicts them; a merge holds no branch."""
    m = ComposedModel(backend, lora_mode="lowrank")
    keys = {}
    for name, s in (("a", 1.0), ("b", 0.8), ("c", 0.6)):
        render(m, [(adapters[name], s)])
        keys[name] = m.key
    assert m.prepared_keys() == (keys["a"], keys["b"], keys["c"])
    render(m, [(adapters["a"], 1.0)])  # a swap back: a is the most recent now
    assert m.prepared_keys() == (keys["b"], keys["c"], keys["a"])
    size = {key: kept.nbytes for (_, key), kept in m._prepared.items()}
    m.reset()
    bound = size[keys["a"]] + size[keys["b"]] - 1  # b fits, not beside a
    small = ComposedModel(backend, lora_mode="lowrank", branch_cache_mb=bound / (1 << 20))
    for name, s in (("a", 1.0), ("b", 0.8)):
        render(small, [(adapters[name], s)])
    assert small.prepared_keys() == (keys["b"],), "a was evicted by bytes"
    small.reset()
    merged = ComposedModel(backend, lora_mode="merge")
    render(merged, [(adapters["a"], 1.0)])
    assert merged.prepared_keys() == ()
    merged.reset()


def test_prepared_keys_drop_svdq_branches_a_base_change_made_stale():
    """Packed SVDQ branches are swaps (reported) until their base changes in place: then the
    report says empty, as a switch back would pack again."""
    model = T.nunchaku_qwen_standin(64, 128)
    comps = {f"transformer_blocks.0.attn.{c}": (64, 64) for c in ("to_q", "to_k", "to_v")}
    x = load_adapter(T.peft_state_dict(T.random_layers(comps, rank=4, seed=1, alpha=4.0)))
    y = load_adapter(T.peft_state_dict(T.random_layers(comps, rank=8, seed=2, alpha=4.0)))
    m = ComposedModel(_SvdqBackend(model), lora_mode="merge")
    held = []
    for pairs in ([(x, 0.8)], [(y, 0.5)]):
        m.want(pairs)
        m.ensure()
        held.append(m.key)
    assert m.prepared_keys() == tuple(held)
    m.reset()
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_qkv.proj_up.mul_(2.0)  # new weights into the same parameter
    assert m.prepared_keys() == () and not m._prepared
