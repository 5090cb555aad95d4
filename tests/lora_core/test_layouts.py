"""Key layouts as the tools write them, on the diffusers Z-Image model.

Fixtures follow the tools' public code (facts, not code): musubi-tuner trains Z-Image with
kohya names ``lora_unet_layers_N_attention_to_q`` ... in bf16 with bf16 ``.alpha`` tensors
and ``ss_*`` header metadata; its ``convert_z_image_lora_to_comfy.py`` fuses q/k/v into
``lora_unet_layers_N_attention_qkv`` (down: the three downs stacked (3r, in); up:
block-diagonal (3·out, 3r); alpha·3, so each component keeps alpha/r) and renames
``attention_to_out_0`` to ``attention_out``; ``convert_lora.py --target other`` writes
``diffusion_model.layers.N.attention.to_q.lora_A.weight`` with alpha baked into A and B
(√(alpha/r) each) and no alpha key; before musubi 2040335 (2026-01-17) that converter turned
every ``_`` of the kohya name into ``.`` (``layers.N.attention.to.q``, ``feed.forward.w1``). Each is checked against an fp64 reference of what the
tool means, in merge and low-rank mode, restored bit-exact, and against diffusers + PEFT.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import lora_core
from lora_core.errors import TargetNotFoundError
from lora_core.safetensors_io import read_metadata
from testsupport import lora as T

from .conftest import assert_same, snapshot

R, ALPHA = 4, 2.0
ATTN = ("to_q", "to_k", "to_v")


@pytest.fixture
def zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    # the config tests/workers/test_other_pipelines.py builds the Z-Image pipeline with
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                    axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]).eval()


def musubi_layers(model, blocks=("layers.0",), seed=1, alpha=ALPHA):
    """What musubi trains: per block q, k, v, to_out.0, w1, w2, w3, bf16 factors."""
    mods = dict(model.named_modules())
    shapes = {}
    for blk in blocks:
        for leaf in (*(f"attention.{c}" for c in ATTN), "attention.to_out.0", "feed_forward.w1", "feed_forward.w2",
                     "feed_forward.w3"):
            m = mods[f"{blk}.{leaf}"]
            shapes[f"{blk}.{leaf}"] = (m.in_features, m.out_features)
    return T.random_layers(shapes, rank=R, seed=seed, alpha=alpha, dtype=torch.bfloat16)


def kohya_sd(layers, prefix="lora_unet_"):
    """sd-scripts saves every tensor, alpha included, in the save dtype (bf16 here)."""
    return {k: v.to(torch.bfloat16) for k, v in T.kohya_state_dict(layers, prefix=prefix).items()}


def comfy_sd(layers):
    """musubi's convert_z_image_lora_to_comfy.py output for ``layers``."""
    sd = {}
    blocks = sorted({n.rsplit(".attention.", 1)[0] for n in layers if ".attention." in n})
    for blk in blocks:
        stem = "lora_unet_" + blk.replace(".", "_") + "_attention_"
        parts = [layers[f"{blk}.attention.{c}"] for c in ATTN]
        sd[stem + "qkv.lora_down.weight"] = torch.cat([a for a, _, _ in parts], 0)
        sd[stem + "qkv.lora_up.weight"] = torch.block_diag(*[b for _, b, _ in parts])
        sd[stem + "qkv.alpha"] = torch.tensor(parts[0][2] * 3, dtype=torch.bfloat16)
        a, b, alpha = layers[f"{blk}.attention.to_out.0"]
        sd[stem + "out.lora_down.weight"], sd[stem + "out.lora_up.weight"] = a, b
        sd[stem + "out.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    rest = {n: v for n, v in layers.items() if ".attention." not in n}
    sd.update(kohya_sd(rest))
    return sd


def reference(model, layers, strength):
    """fp64 W + s·(alpha/r)·B@A for every trained module: what every tool means."""
    mods = dict(model.named_modules())
    return {n: T.reference_merge(mods[n].weight.data, [(a, b, alpha, strength)]) for n, (a, b, alpha) in layers.items()}


def check_merge_and_lowrank(model, path, layers, strength=0.8):
    mods = dict(model.named_modules())
    want = reference(model, layers, strength)
    snap = snapshot(model)
    h = lora_core.apply(model, [(path, strength)])
    now = model.state_dict()
    for n, w in want.items():
        assert torch.allclose(mods[n].weight.double(), w, atol=1e-5), n
    changed = {k for k, v in now.items() if not torch.equal(v, snap[k])}
    assert changed == {f"{n}.weight" for n in layers}, "only the trained modules move"
    h.restore()
    assert_same(model, snap)
    h = lora_core.apply(model, [(path, strength)], mode="lowrank")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()), "lowrank leaves the weights"
    x = torch.randn(3, 32)
    for n, w in want.items():
        x_n = torch.randn(3, mods[n].in_features) if mods[n].in_features != 32 else x
        bias = 0 if mods[n].bias is None else mods[n].bias.double()
        assert torch.allclose(mods[n](x_n).double(), x_n.double() @ w.T + bias, atol=1e-5), n
    h.restore()
    assert_same(model, snap)


def assert_ours_match_peer(model, path, theirs, strength) -> int:
    """Ours merged at ``strength`` equals the peer's merged state dict ``theirs``, then restores
    bit-exact; returns how many tensors the peer changed (what it applied)."""
    snap = snapshot(model)
    h = lora_core.apply(model, [(path, strength)])
    changed = 0
    for k, v in model.state_dict().items():
        assert torch.allclose(v, theirs[k], atol=1e-5, rtol=1e-4), k
        changed += not torch.equal(theirs[k], snap[k])
    h.restore()
    assert_same(model, snap)
    return changed


def bake_alpha(layers):
    """musubi's ``--target other``: A and B each times sqrt(alpha / r), computed in bf16 as the
    tool computes it; the baked factors are the update at scale 1 (alpha = r)."""
    baked = {}
    for n, (a, b, al) in layers.items():
        f = (torch.tensor(al, dtype=torch.bfloat16) / R).sqrt()
        assert f.dtype == torch.bfloat16 and abs(float(f) - math.sqrt(al / R)) < 1e-2
        baked[n] = (a * f, b * f, float(R))
    return baked


def peer_merge(model, sd, strength):
    pytest.importorskip("peft")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    peer = copy.deepcopy(model)
    conv = _convert_non_diffusers_z_image_lora_to_diffusers({k: v.float() for k, v in sd.items()})
    peer.load_lora_adapter({k[len("transformer."):]: v for k, v in conv.items()}, adapter_name="a", prefix=None)
    peer.fuse_lora(lora_scale=strength, adapter_names=["a"])
    peer.unload_lora()
    return peer.state_dict()


def test_comfy_native_zimage_qkv_and_out(zimage, tmp_path):
    layers = musubi_layers(zimage, blocks=("layers.0", "noise_refiner.0", "context_refiner.0"))
    sd = comfy_sd(layers)
    assert sd["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (96, 3 * R)
    path = T.write_safetensors(tmp_path / "zimage_comfy.safetensors", sd,
                               metadata={"ss_network_module": "networks.lora_zimage", "ss_network_dim": str(R),
                                         "ss_network_alpha": str(ALPHA)})
    check_merge_and_lowrank(zimage, path, layers)
    assert_ours_match_peer(zimage, path, peer_merge(zimage, sd, 0.8), 0.8)


def test_comfy_native_qkv_dotted_with_diffusion_model_prefix(zimage):
    """The same names with dots (ComfyUI's own state-dict spelling) bind the same way."""
    layers = musubi_layers(zimage)
    sd = {k.replace("lora_unet_layers_0_attention_", "diffusion_model.layers.0.attention."): v
          for k, v in comfy_sd(layers).items() if "_attention_" in k}
    attn = {n: v for n, v in layers.items() if ".attention." in n}
    check_merge_and_lowrank(zimage, sd, attn)


def test_comfy_native_qkv_for_a_block_the_model_lacks_is_named(zimage):
    layers = musubi_layers(zimage)
    sd = {k.replace("layers_0_", "layers_7_"): v for k, v in comfy_sd(layers).items() if "qkv" in k}
    snap = snapshot(zimage)
    with pytest.raises(TargetNotFoundError, match="layers_7_attention_qkv"):
        lora_core.apply(zimage, [(sd, 1.0)])
    assert_same(zimage, snap)


def test_musubi_kohya_names_with_lora_transformer_prefix(zimage, tmp_path):
    """Older OneTrainer / ai-toolkit write ``lora_transformer_<underscored module>``."""
    layers = musubi_layers(zimage, seed=2)
    path = T.write_safetensors(tmp_path / "onetrainer.safetensors", kohya_sd(layers, prefix="lora_transformer_"))
    check_merge_and_lowrank(zimage, path, layers)


def test_musubi_target_other_alpha_baked_in(zimage, tmp_path):
    """``convert_lora.py --target other``: alpha folded into A and B as √(alpha/r), computed in
    the file's dtype (bf16 alpha tensor / r, ``.sqrt()``, times the bf16 factor), no alpha key,
    and the input's header passed through unchanged, so it still says ``ss_network_alpha`` 8
    over dim 4. The baked tensors are the update (scale 1); a loader that believed the header
    would scale by 2 again and fail every check below."""
    alpha = 8.0
    layers = musubi_layers(zimage, seed=3, alpha=alpha)
    header = {"ss_network_module": "networks.lora_zimage", "ss_network_dim": str(R),
              "ss_network_alpha": str(int(alpha))}
    baked = bake_alpha(layers)
    assert all(a.dtype == torch.bfloat16 for a, _, _ in baked.values())
    sd = T.peft_state_dict(baked, prefix="diffusion_model.", with_alpha=False)
    assert not any(k.endswith(".alpha") for k in sd)
    path = T.write_safetensors(tmp_path / "other.safetensors", sd, metadata=header)
    assert read_metadata(path) == header  # the file says alpha 8, its tensors carry it already
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing surprising to say: the tensors are the truth
        adapter = lora_core.load_adapter(path)
        assert {layer.alpha for layer in adapter.layers.values()} == {float(R)}  # scale alpha/r = 1
        check_merge_and_lowrank(zimage, path, baked)  # against fp64 W + B@A of the stored factors
    assert_ours_match_peer(zimage, path, peer_merge(zimage, sd, 1.0), 1.0)


def old_musubi_other(kohya):
    """``convert_lora.py --target other`` from 70aab8d (Z-Image support, 2025-12-07) to 2040335^:
    module = kohya name less ``lora_unet_`` with every ``_`` a ``.`` (its Wan / HunyuanVideo
    fix-ups touch no Z-Image name), A and B each times (alpha / dim).sqrt() in the file's dtype,
    no alpha key. Same alpha handling as the newer converter; only the names differ."""
    alphas = {k[:-len(".alpha")]: v for k, v in kohya.items() if k.endswith(".alpha")}
    sd = {}
    for key, w in kohya.items():
        name, _, role = key.partition(".")
        if role == "alpha":
            continue
        module = name[len("lora_unet_"):].replace("_", ".")
        down = role == "lora_down.weight"
        dim = w.shape[0] if down else w.shape[1]
        sd[f"diffusion_model.{module}.lora_{'A' if down else 'B'}.weight"] = w * (alphas[name] / dim).sqrt()
    return sd


def test_musubi_target_other_before_2040335_dotted_names(zimage, tmp_path):
    """The dotted names bind to diffusers' modules (attention, feed-forward, refiners and, with
    musubi's ``include_patterns``, ``adaLN_modulation.0``), scale 1 as the baked tensors mean.
    diffusers + PEFT drops the dotted attention / feed-forward names (refusing a file of nothing
    else); on the same tensors under 2040335's names it is the peer."""
    blocks = ("layers.0", "noise_refiner.0", "context_refiner.0")
    layers = musubi_layers(zimage, blocks=blocks, seed=7, alpha=8.0)
    mods = dict(zimage.named_modules())
    ada = {n: (mods[n].in_features, mods[n].out_features) for n in ("layers.0.adaLN_modulation.0",)}
    layers.update(T.random_layers(ada, rank=R, seed=8, alpha=8.0, dtype=torch.bfloat16))
    header = {"ss_network_module": "networks.lora_zimage", "ss_network_dim": str(R), "ss_network_alpha": "8"}
    sd = old_musubi_other(kohya_sd(layers))
    assert "diffusion_model.layers.0.attention.to.out.0.lora_A.weight" in sd
    assert "diffusion_model.noise.refiner.0.feed.forward.w1.lora_B.weight" in sd
    assert "diffusion_model.layers.0.adaLN.modulation.0.lora_A.weight" in sd
    path = T.write_safetensors(tmp_path / "other_old.safetensors", sd, metadata=header)
    baked = bake_alpha(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {layer.alpha for layer in lora_core.load_adapter(path).layers.values()} == {float(R)}
        check_merge_and_lowrank(zimage, path, baked)
    # diffusers fixes up noise.refiner / adaLN.modulation but not to.q / feed.forward: it drops those
    # with a warning and applies the rest (here adaLN alone), and refuses a file with nothing else
    before = snapshot(zimage)
    partial = peer_merge(zimage, sd, 1.0)
    assert {k for k, v in partial.items() if not torch.equal(v, before[k])} == {"layers.0.adaLN_modulation.0.weight"}
    with pytest.raises(ValueError, match="not found in the base model"):
        peer_merge(zimage, {k: v for k, v in sd.items() if "adaLN" not in k}, 1.0)
    fixed = {k.replace("to.q", "to_q").replace("to.k", "to_k").replace("to.v", "to_v").replace("to.out", "to_out")
             .replace("feed.forward", "feed_forward") if (".attention.to." in k or ".feed.forward." in k) else k: v
             for k, v in sd.items()}  # 2040335's fix-up
    changed = assert_ours_match_peer(zimage, path, peer_merge(zimage, fixed, 1.0), 1.0)
    assert changed == len(layers), "the peer applied every module"


def test_header_alpha_disagreeing_with_tensors_uses_tensors(zimage, tmp_path):
    """``ss_network_alpha`` is information: the ``.alpha`` tensors decide, as kohya's loader does."""
    layers = musubi_layers(zimage, seed=4, alpha=ALPHA)
    path = T.write_safetensors(tmp_path / "liar.safetensors", kohya_sd(layers),
                               metadata={"ss_network_alpha": "64", "ss_network_dim": "128",
                                         "ss_network_module": "networks.lora_zimage"})
    assert read_metadata(path)["ss_network_alpha"] == "64"  # the file really disagrees with itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: the tensors are the truth, nothing to warn about
        adapter = lora_core.load_adapter(path)
        check_merge_and_lowrank(zimage, path, layers)
    assert {layer.alpha for layer in adapter.layers.values()} == {ALPHA}


def test_nunchaku_marker_leaves_with_a_known_scheme_still_load():
    """Only the converter's bare suffixes mark it: a PEFT file on a module called ``mlp_fc1`` is ordinary."""
    from torch import nn

    model = nn.Module()
    model.mlp_fc1 = nn.Linear(8, 8)
    layers = T.random_layers({"mlp_fc1": (8, 8)}, rank=2, seed=5)
    snap, want = snapshot(model), reference(model, layers, 1.0)["mlp_fc1"]
    h = lora_core.apply(model, [(T.peft_state_dict(layers, prefix=""), 1.0)])
    assert torch.allclose(model.mlp_fc1.weight.double(), want, atol=1e-6)
    h.restore()
    assert_same(model, snap)


def test_dotted_name_with_two_underscored_readings_is_refused():
    """The dots-as-underscores reading binds only a name the model spells one way."""
    from torch import nn

    model = nn.Module()
    model.a_b, model.a = nn.Module(), nn.Module()
    model.a_b.c, model.a.b_c = nn.Linear(8, 8), nn.Linear(8, 8)  # both a_b_c in kohya spelling
    layers = T.random_layers({"a.b.c": (8, 8)}, rank=2, seed=9)
    snap = snapshot(model)
    with pytest.raises(TargetNotFoundError, match="a.b.c"):
        lora_core.apply(model, [(T.peft_state_dict(layers, prefix=""), 1.0)])
    assert_same(model, snap)
    model.a.b_c = nn.Identity()  # now one reading: it binds
    h = lora_core.apply(model, [(T.peft_state_dict(layers, prefix=""), 1.0)])
    assert not torch.equal(model.a_b.c.weight, snap["a_b.c.weight"])
    h.restore()
    assert torch.equal(model.a_b.c.weight, snap["a_b.c.weight"])


def test_comfy_native_qkv_onto_a_fused_svdq_to_qkv():
    """On nunchaku's Z-Image (``attention.to_qkv`` fused, SVDQ) the same file lands in the fused branch."""
    from torch import nn

    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    attn = model.layers[0].attention = nn.Module()
    attn.to_qkv = T.SVDQW4A4Linear(64, 3 * 64, rank=32, seed=3)
    attn.to_out = nn.ModuleList([nn.Linear(64, 64, bias=False)])
    shapes = {f"layers.0.attention.{c}": (64, 64) for c in (*ATTN, "to_out.0")}
    layers = T.random_layers(shapes, rank=R, seed=6, alpha=ALPHA, dtype=torch.bfloat16)
    sd = comfy_sd(layers)
    x = torch.randn(2, 64).to(torch.bfloat16)
    base = attn.to_qkv(x).double()
    snap = snapshot(model)
    h = lora_core.apply(model, [(sd, 0.7)])
    dw = torch.cat([0.7 * (ALPHA / R) * layers[f"layers.0.attention.{c}"][1].double()
                    @ layers[f"layers.0.attention.{c}"][0].double() for c in ATTN], 0)
    got = attn.to_qkv(x).double()
    assert torch.allclose(got, base + x.double() @ dw.T, atol=2e-2, rtol=2e-2)
    assert (got - base).abs().max() > 1e-3, "the LoRA must change the output"
    h.restore()
    assert_same(model, snap)
