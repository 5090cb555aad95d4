"""Dense merge and low-rank branch against an independent fp64 computation, per key scheme."""
from __future__ import annotations

import pytest
import torch

import lora_core
from testsupport import lora as T
from lora_core.model_index import ModelIndex

from .conftest import assert_same, snapshot

ALL = ("attn.", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in", "proj_out", "norm_out", "time_text_embed")


def shapes(model):
    return T.linear_shapes(model, ALL)


def expected(model, layer_sets):
    """{module: fp64 merged weight} from [(layers, strength), ...]."""
    out = {}
    for name, m in model.named_modules():
        terms = [(a, b, alpha, s) for layers, s in layer_sets if name in layers for a, b, alpha in [layers[name]]]
        if terms:
            out[name] = T.reference_merge(m.weight.data, terms)
    return out


def check_merged(model, want, tol=1e-6):
    mods = dict(model.named_modules())
    for name, w64 in want.items():
        got = mods[name].weight.data
        assert torch.allclose(got.double(), w64, atol=tol, rtol=0), name


@pytest.mark.parametrize(
    "writer",
    [
        lambda L: T.peft_state_dict(L, prefix="transformer."),
        lambda L: T.peft_state_dict(L, prefix="", adapter="default"),
        lambda L: T.peft_state_dict(L, prefix="base_model.model.", with_alpha=False),
        lambda L: T.peft_state_dict(L, prefix="diffusion_model."),
        lambda L: T.kohya_state_dict(L, prefix="lora_unet_", underscored=True),
        lambda L: T.kohya_state_dict(L, prefix="diffusion_model.", underscored=False),
        lambda L: T.kohya_state_dict(L, prefix="lycoris_", underscored=True),
    ],
    ids=["peft-transformer", "peft-default", "peft-base_model-noalpha", "peft-diffusion_model",
         "kohya-lora_unet", "kohya-dotted", "lycoris"],
)
def test_every_scheme_merges_exactly(qwen, tmp_path, writer):
    layers = T.random_layers(shapes(qwen), rank=4, seed=1, alpha=2.0)
    sd = writer(layers)
    if not any(k.endswith(".alpha") for k in sd):  # no alpha key means alpha = rank
        layers = {n: (a, b, float(a.shape[0])) for n, (a, b, _) in layers.items()}
    path = T.write_safetensors(tmp_path / "l.safetensors", sd)
    want = expected(qwen, [(layers, 0.7)])
    snap = snapshot(qwen)
    h = lora_core.apply(qwen, [(path, 0.7)], mode="merge")
    assert len(h.modules) == len(layers)
    check_merged(qwen, want)
    h.restore()
    assert_same(qwen, snap)


def test_several_loras_order_free_and_exact(qwen, tmp_path):
    l1 = T.random_layers(T.linear_shapes(qwen, ("attn.to_q", "img_mlp")), rank=4, seed=2, alpha=8)
    l2 = T.random_layers(T.linear_shapes(qwen, ("attn.to_q", "txt_mod")), rank=2, seed=3, alpha=1)
    p1 = T.write_safetensors(tmp_path / "a.safetensors", T.peft_state_dict(l1))
    p2 = T.write_safetensors(tmp_path / "b.safetensors", T.kohya_state_dict(l2))
    want = expected(qwen, [(l1, 0.5), (l2, -1.3)])
    h = lora_core.apply(qwen, [(p1, 0.5), (p2, -1.3)])
    check_merged(qwen, want)
    first = snapshot(qwen)
    h.restore()
    h2 = lora_core.apply(qwen, [(p2, -1.3), (p1, 0.5)])
    for k, v in snapshot(qwen).items():
        assert torch.equal(v, first[k]), "list order changed the merged bits"
    h2.restore()


def test_bf16_merge_runs_in_fp32_and_casts_once(qwen, tmp_path):
    qwen.to(torch.bfloat16)
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.to_k",)), rank=4, seed=4)
    path = T.write_safetensors(tmp_path / "l.safetensors", T.peft_state_dict(layers))
    mods = dict(qwen.named_modules())
    want = {n: T.reference_merge(mods[n].weight.data, [(a, b, al, 1.0)]).float().to(torch.bfloat16)
            for n, (a, b, al) in layers.items()}
    snap = snapshot(qwen)
    h = lora_core.apply(qwen, [(path, 1.0)])
    for n, w in want.items():
        assert mods[n].weight.dtype == torch.bfloat16
        # one rounding from fp32: within one bf16 ulp of the fp64 result
        assert torch.allclose(mods[n].weight.float(), w.float(), rtol=2 ** -7, atol=1e-6)
    h.restore()
    assert_same(qwen, snap)


def test_lowrank_branch_matches_merge_and_leaves_weights(qwen, tmp_path):
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.to_q", "attn.to_out", "img_mlp")), rank=4, seed=5)
    path = T.write_safetensors(tmp_path / "l.safetensors", T.peft_state_dict(layers))
    mods = dict(qwen.named_modules())
    snap = snapshot(qwen)
    x = torch.randn(3, 32)
    name = "transformer_blocks.0.attn.to_q"
    h = lora_core.apply(qwen, [(path, 0.9)], mode="lowrank")
    assert_weights = qwen.state_dict()
    for k, v in snap.items():
        assert torch.equal(assert_weights[k], v)
    a, b, alpha = layers[name]
    y = mods[name](x)
    ref = x.double() @ T.reference_merge(mods[name].weight.data, [(a, b, alpha, 0.9)]).T + mods[name].bias.double()
    assert torch.allclose(y.double(), ref, atol=1e-5)
    h.restore()
    assert_same(qwen, snap)


def test_composition_key_content_based_order_free_strength_sensitive(tmp_path, qwen):
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.to_q",)), rank=2, seed=6)
    sd = T.peft_state_dict(layers)
    p1 = T.write_safetensors(tmp_path / "one.safetensors", sd)
    p1_copy = T.write_safetensors(tmp_path / "renamed.safetensors", sd)
    other = T.random_layers(T.linear_shapes(qwen, ("attn.to_k",)), rank=2, seed=7)
    p2 = T.write_safetensors(tmp_path / "two.safetensors", T.peft_state_dict(other))
    k = lora_core.composition_key([(p1, 0.5), (p2, 1.0)])
    assert k == lora_core.composition_key([(p2, 1.0), (p1, 0.5)])
    assert k == lora_core.composition_key([(p2, 1.0), (p1_copy, 0.5)]), "names must not matter"
    assert k == lora_core.composition_key([(p2, 1.0), (p1, 0.5000000001)]), "rounded to 1e-6"
    assert k != lora_core.composition_key([(p2, 1.0), (p1, 0.6)])
    assert lora_core.composition_key([]) == lora_core.BASE_KEY
    assert lora_core.composition_key([(sd, 0.5), (p2, 1.0)]) != ""


def test_index_is_reusable(qwen, tmp_path):
    layers = T.random_layers(T.linear_shapes(qwen, ("attn.to_v",)), rank=2, seed=8)
    path = T.write_safetensors(tmp_path / "l.safetensors", T.peft_state_dict(layers))
    index = ModelIndex(qwen)
    snap = snapshot(qwen)
    for _ in range(3):
        lora_core.apply(qwen, [(path, 1.0)], index=index).restore()
    assert_same(qwen, snap)
