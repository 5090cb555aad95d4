"""Full-weight diffs through the family renames, in files written the way ComfyUI's LoraSave
extract node writes them for a model it holds in its own (native) names.

Facts from ComfyUI's public code (``comfy_extras/nodes_lora_extract.py``, ``comfy/lora.py``,
``comfy/utils.py``), not its code: the node walks the native model's state dict under the
``diffusion_model.`` prefix; in its ``standard`` type every 2-D ``.weight`` delta becomes
``lora_up.weight`` / ``lora_down.weight`` (fp16, no alpha tensor: the loader takes alpha =
rank), a 1-D ``.weight`` delta ``.diff``, and with ``bias_diff`` (on by default) every
``.bias`` delta ``.diff_b``; in its ``full_diff`` type every weight delta is a ``.diff``. The
loader applies ``diff`` as W += strength * diff. Native Flux (Black Forest Labs) names fuse
q|k|v into ``img_attn.qkv`` and q|k|v|mlp into ``single_blocks.N.linear1`` (rows in that
order), and its final modulation is (shift, scale) where diffusers' is (scale, shift);
native Z-Image (Lumina2 NextDiT) fuses q|k|v into ``attention.qkv``, calls ``to_out.0``
``attention.out`` and ``norm_q``/``norm_k`` ``q_norm``/``k_norm``, and keeps the top-level
``final_layer`` / ``x_embedder`` that diffusers files under ``all_final_layer.2-1`` /
``all_x_embedder.2-1``.

The maps below are written out here, independently of ``lora_core.families``; every value
is checked against W0 + s * delta computed in fp64 from the file's own (fp16) tensors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_core
from lora_core.api import mode_label
from lora_core.errors import ShapeMismatchError, UnsupportedFormatError
from testsupport import lora as T

from .conftest import assert_same, snapshot

S = 0.7
P = "diffusion_model."


def _flux_map() -> dict[str, tuple[tuple[str, ...], bool]]:
    """native module -> (diffusers modules whose rows it stacks, swap halves)."""
    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    qkv = tuple(d + f"attn.to_{c}" for c in "qkv")
    m = {
        "double_blocks.0.img_attn.qkv": qkv,
        "double_blocks.0.img_attn.proj": (d + "attn.to_out.0",),
        "double_blocks.0.txt_attn.qkv": tuple(d + f"attn.add_{c}_proj" for c in "qkv"),
        "double_blocks.0.txt_attn.proj": (d + "attn.to_add_out",),
        "double_blocks.0.img_mlp.0": (d + "ff.net.0.proj",),
        "double_blocks.0.img_mlp.2": (d + "ff.net.2",),
        "double_blocks.0.txt_mlp.0": (d + "ff_context.net.0.proj",),
        "double_blocks.0.txt_mlp.2": (d + "ff_context.net.2",),
        "double_blocks.0.img_mod.lin": (d + "norm1.linear",),
        "double_blocks.0.txt_mod.lin": (d + "norm1_context.linear",),
        "single_blocks.0.linear1": (*(s + f"attn.to_{c}" for c in "qkv"), s + "proj_mlp"),
        "single_blocks.0.linear2": (s + "proj_out",),
        "single_blocks.0.modulation.lin": (s + "norm.linear",),
        "img_in": ("x_embedder",),
        "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
        "final_layer.linear": ("proj_out",),
    }
    out = {k: (v, False) for k, v in m.items()}
    out["final_layer.adaLN_modulation.1"] = (("norm_out.linear",), True)
    return out


def _zimage_map() -> dict[str, tuple[tuple[str, ...], bool]]:
    m: dict[str, tuple[str, ...]] = {}
    for blk, adaln in (("layers.0", True), ("noise_refiner.0", True), ("context_refiner.0", False)):
        m[f"{blk}.attention.qkv"] = tuple(f"{blk}.attention.to_{c}" for c in "qkv")
        m[f"{blk}.attention.out"] = (f"{blk}.attention.to_out.0",)
        m[f"{blk}.attention.q_norm"] = (f"{blk}.attention.norm_q",)
        m[f"{blk}.attention.k_norm"] = (f"{blk}.attention.norm_k",)
        for leaf in ("feed_forward.w1", "feed_forward.w2", "attention_norm1", "ffn_norm2"):
            m[f"{blk}.{leaf}"] = (f"{blk}.{leaf}",)
        if adaln:
            m[f"{blk}.adaLN_modulation.0"] = (f"{blk}.adaLN_modulation.0",)
    m.update({"final_layer.linear": ("all_final_layer.2-1.linear",),
              "final_layer.adaLN_modulation.1": ("all_final_layer.2-1.adaLN_modulation.1",),
              "x_embedder": ("all_x_embedder.2-1",), "cap_embedder.0": ("cap_embedder.0",),
              "cap_embedder.1": ("cap_embedder.1",), "t_embedder.mlp.2": ("t_embedder.mlp.2",)})
    return {k: (v, False) for k, v in m.items()}


def _native_param(sd: dict, parts: tuple[str, ...], param: str, swap: bool) -> torch.Tensor | None:
    if any(f"{p}.{param}" not in sd for p in parts):
        return None
    t = torch.cat([sd[f"{p}.{param}"] for p in parts], 0)
    return torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]], 0) if swap else t


def extract(model: nn.Module, native: dict, kind: str, rank: int = 3, seed: int = 0):
    """``(state dict as LoraSave writes it, {diffusers param: fp64 delta per unit strength})``."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    file: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    for name, (parts, swap) in native.items():
        for param in ("weight", "bias"):
            base = _native_param(sd, parts, param, swap)
            if base is None:
                continue
            if param == "weight" and base.dim() == 2 and kind == "standard":
                up = (torch.randn(base.shape[0], rank, generator=g) * 0.05).half()
                down = (torch.randn(rank, base.shape[1], generator=g) * 0.05).half()
                file[f"{P}{name}.lora_up.weight"], file[f"{P}{name}.lora_down.weight"] = up, down
                delta = up.double() @ down.double()  # no alpha tensor: alpha = rank
            else:
                d = (torch.randn(base.shape, generator=g) * 0.02).half()
                file[f"{P}{name}.{'diff' if param == 'weight' else 'diff_b'}"] = d
                delta = d.double()
            if swap:  # back from native (shift, scale) to diffusers (scale, shift)
                h = delta.shape[0] // 2
                delta = torch.cat([delta[h:], delta[:h]], 0)
            rows = [sd[f"{p}.{param}"].shape[0] for p in parts]
            for p, piece in zip(parts, torch.split(delta, rows, 0)):
                want[f"{p}.{param}"] = piece
    return file, want


def check(model: nn.Module, before: dict, want: dict, s: float, atol: float = 2e-5) -> None:
    """Every Linear's output and every other parameter against fp64 W0 + s * delta."""
    ref = {k: v.double() + s * want[k] if k in want else v.double() for k, v in before.items()}
    g = torch.Generator().manual_seed(5)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            x = torch.randn(4, m.in_features, generator=g)
            y = x.double() @ ref[f"{name}.weight"].T
            if m.bias is not None:
                y = y + ref[f"{name}.bias"]
            assert torch.allclose(m(x).double(), y, atol=atol, rtol=0), name
    now = model.state_dict()
    for k, v in ref.items():
        mod = k.rpartition(".")[0]
        if mod and isinstance(model.get_submodule(mod), nn.Linear):
            continue  # checked by its output above (a low-rank branch leaves its weight as it was)
        assert torch.allclose(now[k].double(), v, atol=atol, rtol=0), k


@pytest.fixture
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()


@pytest.fixture
def zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                    axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]).eval()


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
@pytest.mark.parametrize("kind", ["standard", "full_diff"])
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_native_extract_lands_on_diffusers_modules(request, tmp_path, family, kind, mode):
    """BFL Flux / ComfyUI-native Z-Image extracts: fused qkv (and Flux linear1) weight diffs and
    bias diffs split by rows onto q, k, v (and proj_mlp), the final modulation's halves
    swapped, Z-Image's renamed norms and top-level layers found; old main:
    TargetNotFoundError for every renamed diff."""
    model = request.getfixturevalue(family)
    native = _flux_map() if family == "flux" else _zimage_map()
    sd, want = extract(model, native, kind)
    path = T.write_safetensors(tmp_path / f"{family}-{kind}.safetensors", sd)
    assert all(k.startswith(P) for k in sd) and all(v.dtype == torch.float16 for v in sd.values())
    assert any(k.endswith(".qkv.diff") for k in sd) == (kind == "full_diff") and any(k.endswith(".diff_b") for k in sd)
    before = snapshot(model)
    h = lora_core.apply(model, [(path, S)], mode=mode)
    check(model, before, want, S)
    if mode == "lowrank" and kind == "standard":
        assert h.branches and mode_label(h.updates, mode) == "lowrank+merge"
    if kind == "full_diff":
        assert not h.branches  # no low-rank pair in the file: everything merged
    h.restore()
    assert_same(model, before)


def test_native_extract_in_kohya_underscored_names(flux, tmp_path):
    """The same BFL names as a kohya-style file writes them (``lora_unet_`` + underscores)."""
    sd, want = extract(flux, _flux_map(), "full_diff", seed=3)
    under = {"lora_unet_" + k[len(P):].rsplit(".", 1)[0].replace(".", "_") + "." + k.rsplit(".", 1)[1]: v
             for k, v in sd.items()}
    path = T.write_safetensors(tmp_path / "kohya.safetensors", under)
    before = snapshot(flux)
    h = lora_core.apply(flux, [(path, S)], mode="merge")
    check(flux, before, want, S)
    h.restore()
    assert_same(flux, before)


def test_two_native_files_sum_into_the_same_split_rows(zimage, tmp_path):
    """Two extracts on the same fused qkv: each one's rows land on the same q/k/v, summed."""
    native = _zimage_map()
    sd1, w1 = extract(zimage, native, "full_diff", seed=1)
    sd2, w2 = extract(zimage, native, "full_diff", seed=2)
    p1 = T.write_safetensors(tmp_path / "1.safetensors", sd1)
    p2 = T.write_safetensors(tmp_path / "2.safetensors", sd2)
    before = snapshot(zimage)
    h = lora_core.apply(zimage, [(p1, 0.5), (p2, -0.25)], mode="merge")
    check(zimage, before, {k: 0.5 * w1[k] - 0.25 * w2[k] for k in w1}, 1.0)
    h.restore()
    assert_same(zimage, before)


def split_proj_out(dim=32, mlp=64):
    """Flux single block with ``proj_out`` split by input (as nunchaku's Flux keeps it): the
    attention half without a bias, the MLP half with it; y = W0 x[:dim] + W1 x[dim:] + b."""
    m = nn.Module()
    m.single_transformer_blocks = nn.ModuleList([nn.Module()])
    s = m.single_transformer_blocks[0]
    s.proj_out = nn.Module()
    s.proj_out.linears = nn.ModuleList([nn.Linear(dim, dim, bias=False), nn.Linear(mlp, dim)])
    return m


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_bfl_linear2_diff_splits_its_columns_between_the_halves(tmp_path, mode):
    torch.manual_seed(0)
    model = split_proj_out()
    lin = model.single_transformer_blocks[0].proj_out.linears
    g = torch.Generator().manual_seed(7)
    diff, diff_b = (torch.randn(32, 96, generator=g) * 0.02).half(), (torch.randn(32, generator=g) * 0.02).half()
    path = T.write_safetensors(tmp_path / "l2.safetensors", {f"{P}single_blocks.0.linear2.diff": diff,
                                                             f"{P}single_blocks.0.linear2.diff_b": diff_b})
    before = snapshot(model)
    w_full = torch.cat([lin[0].weight, lin[1].weight], 1).double() + S * diff.double()
    b_full = lin[1].bias.double() + S * diff_b.double()
    x = torch.randn(3, 96)
    h = lora_core.apply(model, [(path, S)], mode=mode)
    y = lin[0](x[:, :32]) + lin[1](x[:, 32:])
    assert torch.allclose(y.double(), x.double() @ w_full.T + b_full, atol=1e-5)
    assert torch.allclose(lin[0].weight.double(), w_full[:, :32], atol=1e-6)
    assert torch.allclose(lin[1].weight.double(), w_full[:, 32:], atol=1e-6)
    h.restore()
    assert_same(model, before)


def fused_zimage_standin(dim=32, hidden=48, svdq=False):
    """Z-Image as nunchaku fuses it: ``attention.to_qkv`` and ``feed_forward.w13`` (w3 first)."""
    m = nn.Module()
    m.layers = nn.ModuleList([nn.Module()])
    blk = m.layers[0]
    blk.attention, blk.feed_forward = nn.Module(), nn.Module()
    blk.attention.to_qkv = (T.SVDQW4A4Linear(dim, 3 * dim, rank=16, torch_dtype=torch.float32, seed=2) if svdq
                            else nn.Linear(dim, 3 * dim, bias=False))
    blk.attention.norm_q = nn.RMSNorm(dim // 2)
    blk.feed_forward.w13 = nn.Linear(dim, 2 * hidden, bias=False)
    return m


def test_native_diffs_onto_a_model_that_fuses_them(tmp_path):
    """``attention.qkv.diff`` onto a fused ``to_qkv`` lands whole at its rows (q|k|v); ``w1`` /
    ``w3`` diffs land inside ``w13`` with w3 first; the renamed norm is found."""
    torch.manual_seed(0)
    model = fused_zimage_standin()
    g = torch.Generator().manual_seed(8)
    qkv, w1, w3 = (torch.randn(96, 32, generator=g) * 0.02, torch.randn(48, 32, generator=g) * 0.02,
                   torch.randn(48, 32, generator=g) * 0.02)
    qn = torch.randn(16, generator=g) * 0.02
    sd = {f"{P}layers.0.attention.qkv.diff": qkv, f"{P}layers.0.feed_forward.w1.diff": w1,
          f"{P}layers.0.feed_forward.w3.diff": w3, f"{P}layers.0.attention.q_norm.diff": qn}
    path = T.write_safetensors(tmp_path / "fused.safetensors", {k: v.half() for k, v in sd.items()})
    h16 = {k: v.half().double() for k, v in sd.items()}
    before = snapshot(model)
    h = lora_core.apply(model, [(path, S)], mode="merge")
    d = {k[len(P) + len("layers.0."):]: v for k, v in h16.items()}  # "attention.qkv.diff" ...

    def now(name):
        return model.get_submodule(f"layers.0.{name}").weight.double() - before[f"layers.0.{name}.weight"].double()

    assert torch.allclose(now("attention.to_qkv"), S * d["attention.qkv.diff"], atol=1e-6)
    w3_first = torch.cat([d["feed_forward.w3.diff"], d["feed_forward.w1.diff"]], 0)
    assert torch.allclose(now("feed_forward.w13"), S * w3_first, atol=1e-6)
    assert torch.allclose(now("attention.norm_q"), S * d["attention.q_norm.diff"], atol=1e-6)
    h.restore()
    assert_same(model, before)


def test_native_qkv_weight_diff_on_a_packed_fused_module_is_refused_by_key(tmp_path):
    model = fused_zimage_standin(svdq=True)
    path = T.write_safetensors(tmp_path / "q.safetensors", {
        f"{P}layers.0.attention.qkv.diff": torch.zeros(96, 32).half(),
        f"{P}layers.0.attention.q_norm.diff": torch.ones(16).half()})
    before = snapshot(model)
    with pytest.raises(UnsupportedFormatError, match=r"layers\.0\.attention\.qkv\.diff"):
        lora_core.apply(model, [(path, 1.0)])
    assert_same(model, before)


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_norm_and_bias_diffs_apply_on_a_model_whose_attention_is_svdq(tmp_path, mode):
    """The unquantized tensors of a quantized model take their diffs: the renamed norm
    (``q_norm`` -> ``norm_q``) and the fused SVDQ ``to_qkv``'s dense bias (native
    ``attention.qkv.diff_b``); the packed weight and its low-rank factors stay as they were."""
    model = fused_zimage_standin(svdq=True)
    g = torch.Generator().manual_seed(12)
    qn, qb = (torch.randn(16, generator=g) * 0.1).half(), (torch.randn(96, generator=g) * 0.1).half()
    path = T.write_safetensors(tmp_path / "n.safetensors", {f"{P}layers.0.attention.q_norm.diff": qn,
                                                            f"{P}layers.0.attention.qkv.diff_b": qb})
    before = snapshot(model)
    h = lora_core.apply(model, [(path, S)], mode=mode)
    assert not h.branches
    now = model.state_dict()
    changed = {"layers.0.attention.norm_q.weight": qn, "layers.0.attention.to_qkv.bias": qb}
    for k, d in changed.items():
        assert torch.allclose(now[k].double(), before[k].double() + S * d.double(), atol=1e-6, rtol=0), k
    assert all(torch.equal(now[k], v) for k, v in before.items() if k not in changed)
    h.restore()
    assert_same(model, before)


def test_a_fused_diff_whose_rows_do_not_add_up_is_a_shape_error(zimage, tmp_path):
    path = T.write_safetensors(tmp_path / "bad.safetensors",
                               {f"{P}layers.0.attention.qkv.diff": torch.zeros(90, 32).half()})
    before = snapshot(zimage)
    with pytest.raises(ShapeMismatchError, match=r"attention\.qkv\.diff"):
        lora_core.apply(zimage, [(path, 1.0)])
    assert_same(zimage, before)
