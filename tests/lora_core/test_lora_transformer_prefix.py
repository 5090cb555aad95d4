"""The ``lora_transformer_`` layout: Flux LoRAs as older OneTrainer saved them (:mod:`testsupport.onetrainer`:
the facts and where they are in its code), on a tiny diffusers ``FluxTransformer2DModel``.

Keys ``lora_transformer_<module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` /
``.alpha`` (a 0-dim tensor), every tensor in the output dtype (bf16 or fp16), a ``modelspec.*`` /
``ot_*`` header and no ``ss_network_*``. Applied in merge and low-rank mode against the fp64
reference of what the tool means (W + m * alpha/rank * up @ down), restored bit-exact.
diffusers' Flux loader (its "mixture" path) is the peer for the ``attn-only`` preset; it maps
every non-attention block key (``ff.net``, ``proj_mlp``) onto the whole block, so it cannot
load the ``attn-mlp`` preset. A file that also trains a text encoder (``lora_te1_`` CLIP-L,
``lora_te2_`` T5) is refused whole, saying why.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lora_core
from lora_core.errors import UnsupportedFormatError
from lora_core.inspection import header_adapter, summary
from lora_core.synthetic import write_safetensors
from testsupport import onetrainer as OT

from .conftest import assert_same, snapshot
from .test_layouts import reference

S = 0.8


def check_merge_and_lowrank(model, path, layers, strength=S):
    """Merge: every trained weight at the fp64 reference, nothing else moved; low-rank: the
    weights untouched, each trained module's output (bias included) at the reference; both
    restored bit-exact."""
    mods = dict(model.named_modules())
    want = reference(model, layers, strength)
    snap = snapshot(model)
    h = lora_core.apply(model, [(path, strength)])
    for n, w in want.items():
        assert torch.allclose(mods[n].weight.double(), w, atol=1e-5), n
    now = model.state_dict()
    assert {k for k, v in now.items() if not torch.equal(v, snap[k])} == {f"{n}.weight" for n in layers}
    h.restore()
    assert_same(model, snap)
    h = lora_core.apply(model, [(path, strength)], mode="lowrank")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "lowrank leaves the weights"
    g = torch.Generator().manual_seed(2)
    for n, w in want.items():
        x = torch.randn(3, mods[n].in_features, generator=g)
        y64 = x.double() @ w.T + (0 if mods[n].bias is None else snap[f"{n}.bias"].double())
        assert torch.allclose(mods[n](x).double(), y64, atol=1e-5), n
    h.restore()
    assert_same(model, snap)


@pytest.fixture
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()


def test_file_reads_as_the_tool_wrote_it(tmp_path, flux):
    path, sd = OT.write(tmp_path / "ot.safetensors", flux, alpha=2.0, dtype=torch.float16)
    assert "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight" in sd  # the README's example
    assert "lora_transformer_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in sd
    assert sd["lora_transformer_single_transformer_blocks_0_proj_mlp.alpha"].shape == ()
    assert {v.dtype for v in sd.values()} == {torch.float16}
    info = summary(path)
    assert info["layout"] == "kohya" and info["ranks"] == [4] and info["alphas"] == [2.0]
    assert info["dtypes"] == {"F16": 3 * 14}  # attn-mlp on 1 double + 1 single block: 14 Linears
    assert info["metadata"] == {"modelspec.architecture": "Flux.1-dev/lora"}  # no ss_network_* to trust
    assert "single_transformer_blocks_0_attn_to_q" in info["targets"]


@pytest.mark.parametrize("preset", ["attn-mlp", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_and_lowrank_match_fp64_and_restore(tmp_path, flux, preset, dtype):
    """Every Linear the preset trains (``full``: the embedders, norm_out, proj_out, the
    AdaLN linears too) at W + m * alpha/rank * up @ down, alpha read from its 0-dim tensor."""
    path, sd = OT.write(tmp_path / "ot.safetensors", flux, preset=preset, alpha=3.0, dtype=dtype, seed=1)
    layers = OT.layers(sd, flux)
    assert len(layers) == len(OT.lora_modules(flux, preset)) and (preset == "attn-mlp") == (len(layers) == 14)
    check_merge_and_lowrank(flux, path, layers, strength=S)


def _peer(model, path: str) -> dict:
    pytest.importorskip("peft")
    from diffusers import FluxPipeline

    sd = FluxPipeline.lora_state_dict(path)
    peer = copy.deepcopy(model)
    peer.load_lora_adapter({k.removeprefix("transformer."): v for k, v in sd.items()}, adapter_name="a", prefix=None)
    peer.fuse_lora(lora_scale=S, adapter_names=["a"])
    peer.unload_lora()
    return peer.state_dict()


def test_merge_matches_diffusers_flux_loader(tmp_path, flux):
    path, sd = OT.write(tmp_path / "ot.safetensors", flux, preset="attn-only", alpha=8.0, dtype=torch.bfloat16)
    theirs = _peer(flux, path)
    before = snapshot(flux)
    h = lora_core.apply(flux, [(path, S)])
    moved = 0
    for k, v in flux.state_dict().items():
        assert torch.allclose(v, theirs[k], atol=1e-6, rtol=1e-5), k
        moved += not torch.equal(v, before[k])
    assert moved == len(OT.layers(sd, flux)) == 11
    h.restore()
    assert_same(flux, before)
    # diffusers' mixture path names ff.net / proj_mlp keys by their block alone: it cannot load attn-mlp
    mlp, _ = OT.write(tmp_path / "mlp.safetensors", flux, preset="attn-mlp")
    with pytest.raises(ValueError, match="is not supported"):
        _peer(flux, mlp)


def test_text_encoder_keys_refuse_the_file_saying_why(tmp_path, flux):
    """OneTrainer writes a trained CLIP-L (``lora_te1_``) and T5 (``lora_te2_``) into the same
    file. lora_core binds the transformer only; rendering without them is not what the file
    means, so the file is refused whole, its text-encoder targets named; the model is untouched.
    Without those keys the transformer part applies as its own file does."""
    path, sd = OT.write(tmp_path / "te.safetensors", flux, text_encoders=True)
    te = sorted({k.split(".")[0] for k in sd if k.startswith("lora_te")})
    assert te and all(k.startswith(("lora_te1_text_model_", "lora_te2_encoder_block_")) for k in te)
    before = snapshot(flux)
    for read in (lambda: lora_core.apply(flux, [(path, S)]), lambda: header_adapter(path)):
        with pytest.raises(UnsupportedFormatError) as e:
            read()
        msg = str(e.value)
        assert msg.startswith(f"text-encoder LoRA: {len(te)} target(s) train a text encoder"), msg
        assert all(t in msg for t in te) and "diffusion transformer only" in msg and "te.safetensors" in msg
        assert_same(flux, before)
    only = write_safetensors(tmp_path / "transformer_only.safetensors",
                             {k: v for k, v in sd.items() if k.startswith("lora_transformer_")})
    check_merge_and_lowrank(flux, only, OT.layers(sd, flux), strength=S)
