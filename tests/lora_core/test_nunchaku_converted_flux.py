"""nunchaku's converted Flux LoRA files (``to_nunchaku``'s Flux layout: ``lora_core/formats/nunchaku_flux.py``
has the facts and their sources; :func:`testsupport.nunchaku_converter.to_nunchaku_flux` writes them) on a tiny
diffusers ``FluxTransformer2DModel``: what nunchaku's loader gives such a file is the original LoRA's update at
the strength (the first 32 ranks of each W4A4 layer, its base checkpoint's branch, at scale 1 on nunchaku's own
model, are dropped here). Merge and low-rank mode against that fp64 reference, restored bit-exact, the original
file applied by lora_core as the peer, and the files nunchaku's converter never writes refused by key.
"""
from __future__ import annotations

import pytest
import torch

import lora_core
from lora_core.errors import UnsupportedFormatError
from lora_core.inspection import bind_report, format_summary, header_adapter, summary
from lora_core.model_index import ModelIndex
from lora_core.nunchaku import pack_lowrank
from lora_core.synthetic import linear_shapes, peft_state_dict, random_layers, write_safetensors
from testsupport.nunchaku_converter import fake_flux_base, to_nunchaku_flux

from .conftest import assert_same, snapshot
from .test_fused_and_nunchaku import flux_like
from .test_layouts import reference
from .test_lora_transformer_prefix import check_merge_and_lowrank, flux  # noqa: F401  (flux: a fixture)

R, ALPHA = 4, 2.0  # alpha/rank = 1/2: folded into A exactly, so the file's factors are the original's


def original(model, shared_qkv=False, seed=3):
    """A LoRA on every Linear of the blocks and on ``x_embedder`` (bf16); ``shared_qkv``: q, k, v
    with one down (as a BFL qkv converted to diffusers names has)."""
    shapes = {n: s for n, s in linear_shapes(model).items() if "blocks." in n or n == "x_embedder"}
    layers = random_layers(shapes, rank=R, seed=seed, alpha=ALPHA, dtype=torch.bfloat16)
    if shared_qkv:
        for n in [n for n in layers if n.endswith(("attn.to_k", "attn.to_v", "add_k_proj", "add_v_proj"))]:
            q = n.replace("to_k", "to_q").replace("to_v", "to_q").replace("add_k_proj", "add_q_proj").replace(
                "add_v_proj", "add_q_proj")
            layers[n] = (layers[q][0], layers[n][1], ALPHA)
    return layers


def converted(tmp_path, model, layers, name="converted.safetensors"):
    sd = to_nunchaku_flux(layers, model, fake_flux_base(model))
    return write_safetensors(tmp_path / name, sd), sd


def test_file_reads_as_the_tool_wrote_it(tmp_path, flux):
    path, sd = converted(tmp_path, flux, original(flux))
    assert sd["transformer_blocks.0.qkv_proj.lora_down"].shape == (32, 48)  # packed (in, 32 + 4 padded to 16)
    assert sd["single_transformer_blocks.0.mlp_fc2.lora_up"].shape == (32, 48)
    assert sd["single_transformer_blocks.0.norm.linear.lora_up"].shape == (96, 16)  # interleaved, rank-padded
    assert sd["x_embedder.lora_A.weight"].shape == (R, 8)  # outside the blocks: as to_diffusers left it
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    info = summary(path)
    assert info["layout"] == "nunchaku-converted-flux" and info["metadata"] == {}
    assert info["ranks"] == [R, 16]  # W4A4 layers past the base's 32 (4, padded to 16); modulation padded; x_embedder
    assert "single_transformer_blocks.0.attn.to_qkv" in info["targets"]
    assert "nunchaku-converted-flux (packed; each W4A4 layer's first 32 ranks" in format_summary(info)
    report = bind_report(header_adapter(path), ModelIndex(flux))  # header only: meta factors
    assert report["refused"] == {}
    for half in ("linears.0", "linears.1"):  # out_proj / mlp_fc2, each onto its columns of diffusers' proj_out
        assert report["bound"][f"single_transformer_blocks.0.proj_out.{half}"] == ["single_transformer_blocks.0.proj_out"]
    assert report["bound"]["transformer_blocks.0.attn.add_qkv_proj"] == [
        f"transformer_blocks.0.attn.add_{c}_proj" for c in "kqv"]


@pytest.mark.parametrize("shared_qkv", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_merge_and_lowrank_match_the_original_update_and_restore(tmp_path, flux, shared_qkv, strength):
    """Every module the original trains at W + s * alpha/rank * B @ A (fp64), nothing else moved: the base
    ranks dropped, q/k/v split by rows, out_proj/mlp_fc2 joined back into proj_out, modulation rows unshuffled."""
    layers = original(flux, shared_qkv)
    path, _ = converted(tmp_path, flux, layers)
    check_merge_and_lowrank(flux, path, layers, strength=strength)


def test_the_original_file_lands_the_same(tmp_path, flux):
    """The peer: the original LoRA file (diffusers names, kohya-free alpha) applied by lora_core."""
    layers = original(flux)
    path, _ = converted(tmp_path, flux, layers)
    peft = write_safetensors(tmp_path / "original.safetensors", peft_state_dict(layers))
    snap = snapshot(flux)
    h = lora_core.apply(flux, [(peft, 0.7)])
    theirs = {k: v.clone() for k, v in flux.state_dict().items()}
    h.restore()
    h = lora_core.apply(flux, [(path, 0.7)])
    for k, v in flux.state_dict().items():
        assert torch.allclose(v, theirs[k], atol=1e-7, rtol=0), k
    h.restore()
    assert_same(flux, snap)


def test_on_a_model_that_splits_proj_out(tmp_path):
    """out_proj / mlp_fc2 land on ``proj_out.linears.0/1`` of a model that has them (nunchaku's diffusers layout)."""
    dense, split = flux_like(), flux_like(split=True)
    layers = {n: l for n, l in random_layers(linear_shapes(dense), rank=R, seed=5, alpha=ALPHA,
                                             dtype=torch.bfloat16).items() if "blocks." in n}
    path, _ = converted(tmp_path, dense, layers)
    a, b, _ = layers["single_transformer_blocks.0.proj_out"]
    w0, w1 = (split.single_transformer_blocks[0].proj_out.linears[i].weight.detach().clone() for i in (0, 1))
    snap = snapshot(split)
    want = reference(split, {n: l for n, l in layers.items() if "proj_out" not in n}, 0.5)
    h = lora_core.apply(split, [(path, 0.5)])
    delta = 0.5 * ALPHA / R * b.double() @ a.double()
    lin = split.single_transformer_blocks[0].proj_out.linears
    assert torch.allclose(lin[0].weight.double(), w0.double() + delta[:, :32], atol=1e-6)
    assert torch.allclose(lin[1].weight.double(), w1.double() + delta[:, 32:], atol=1e-6)
    mods = dict(split.named_modules())
    for n, w in want.items():
        assert torch.allclose(mods[n].weight.double(), w, atol=1e-6), n
    h.restore()
    assert_same(split, snap)


def test_a_layer_of_32_ranks_or_fewer_is_refused_by_key(tmp_path, flux):
    _, sd = converted(tmp_path, flux, original(flux))
    sd = dict(sd)
    key = "transformer_blocks.0.mlp_context_fc1.lora_down"
    sd[key] = pack_lowrank(torch.randn(16, 32).to(torch.bfloat16), True)
    sd[key.replace("down", "up")] = pack_lowrank(torch.randn(128, 16).to(torch.bfloat16), False)
    path = write_safetensors(tmp_path / "r16.safetensors", sd)
    snap = snapshot(flux)
    with pytest.raises(UnsupportedFormatError, match=rf"key '{key}'.*rank 16, below the 32"):
        lora_core.apply(flux, [(path, 1.0)])
    assert_same(flux, snap)
    # the base alone everywhere (32 ranks on every W4A4 layer): no LoRA in it
    base_only = write_safetensors(tmp_path / "base.safetensors", to_nunchaku_flux({}, flux, fake_flux_base(flux)))
    with pytest.raises(UnsupportedFormatError, match=r"key 'single_transformer_blocks.0.mlp_fc1.lora_down'.*no "
                                                     r"layer has a rank past the first 32.*holds no LoRA"):
        lora_core.apply(flux, [(base_only, 1.0)])
    assert_same(flux, snap)


def test_a_bias_vector_or_an_unknown_module_is_refused_by_key(tmp_path, flux):
    _, sd = converted(tmp_path, flux, original(flux))
    for extra, why in (("transformer_blocks.0.attn.to_qkv.bias", "LoRA bias vector"),
                       ("transformer_blocks.0.norm_q.lora_down", "not a module nunchaku's Flux converter writes")):
        path = write_safetensors(tmp_path / "x.safetensors", {**sd, extra: torch.zeros(96, dtype=torch.bfloat16)})
        with pytest.raises(UnsupportedFormatError, match=rf"key '{extra}'.*{why}"):
            lora_core.load_adapter(path)
