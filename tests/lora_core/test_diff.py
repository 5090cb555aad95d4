"""Full-weight diffs (``.diff`` / ``.diff_b``) as ComfyUI's LoraSave writes them: W += s*diff,
b += s*diff_b (no alpha), merged in every mode, restored bit-exactly; refused on packed weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_core
from lora_core import diffs
from lora_core.api import mode_label
from lora_core.errors import NonFiniteError, TargetNotFoundError, UnsupportedFormatError
from lora_core.model_index import ModelIndex
from lora_core.synthetic import comfy_extract_state_dict, kohya_state_dict
from testsupport import lora as T

from .conftest import assert_same, snapshot

B0 = "transformer_blocks.0"
LORA_ON = (f"{B0}.attn.to_q", f"{B0}.attn.to_k", f"{B0}.img_mlp.net.2")


def fixture(model, seed=0, dtype=torch.float16):
    """ComfyUI extract: LoRA on 2-D weights, ``.diff`` on norm weights (and one Linear weight
    that also has a LoRA, as a full-rank residual), ``.diff_b`` on biases; stored in fp16 as
    the node does (the tests use float32 where they need exact values)."""
    mods = dict(model.named_modules())
    layers = T.random_layers({n: (mods[n].in_features, mods[n].out_features) for n in LORA_ON}, rank=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d = {
        f"{B0}.attn.norm_q": {"weight": torch.randn(16, generator=g) * 0.1},
        f"{B0}.attn.to_q": {"bias": torch.randn(32, generator=g) * 0.1},
        f"{B0}.attn.to_k": {"weight": torch.randn(32, 32, generator=g) * 0.01},
        "proj_out": {"bias": torch.randn(16, generator=g) * 0.1},
    }
    layers = {n: (a.to(dtype), b.to(dtype), al) for n, (a, b, al) in layers.items()}
    d = {n: {p: t.to(dtype) for p, t in ps.items()} for n, ps in d.items()}
    return layers, d


def reference(model, layers, d, s):
    """{param name: fp64 value} of what ComfyUI means: W + s*(B@A) (alpha = rank) + s*diff."""
    sd = model.state_dict()
    out = {}
    for name, (a, b, alpha) in layers.items():
        out[f"{name}.weight"] = T.reference_merge(sd[f"{name}.weight"], [(a, b, alpha, s)])
    for name, ps in d.items():
        for p, t in ps.items():
            k = f"{name}.{p}"
            out[k] = out.get(k, sd[k].double()) + s * t.double()
    return out


@pytest.mark.parametrize("naming", ["dotted", "kohya"])
def test_comfy_extract_merge_matches_fp64_and_restores(qwen, tmp_path, naming):
    layers, d = fixture(qwen)
    if naming == "dotted":
        sd = comfy_extract_state_dict(layers, d)
    else:  # kohya-style names with alpha tensors; alpha applies to the pairs, never to the diffs
        sd = kohya_state_dict({n: (a, b, 2.0) for n, (a, b, _) in layers.items()})
        sd.update({k.replace("diffusion_model.", "lora_unet_").replace(".", "_").replace("_diff", ".diff"): v
                   for k, v in comfy_extract_state_dict({}, d).items()})
        layers = {n: (a, b, 2.0) for n, (a, b, _) in layers.items()}
    path = T.write_safetensors(tmp_path / "extract.safetensors", sd)
    adapter = lora_core.load_adapter(path)  # old main: UnsupportedFormatError: full-weight diff
    names = set(d) if naming == "dotted" else {n.replace(".", "_") for n in d}
    assert set(adapter.diffs) == names and len(adapter.layers) == len(LORA_ON)
    before = snapshot(qwen)
    want = reference(qwen, layers, d, 0.7)
    h = lora_core.apply(qwen, [(path, 0.7)], mode="merge")
    now = qwen.state_dict()
    for k, v in want.items():
        assert torch.allclose(now[k].double(), v, atol=1e-6, rtol=0), k
    untouched = set(before) - set(want)
    assert all(torch.equal(now[k], before[k]) for k in untouched)
    h.restore()
    assert_same(qwen, before)


def test_lowrank_merges_the_diffs_and_branches_the_pairs(qwen, tmp_path):
    layers, d = fixture(qwen)
    path = T.write_safetensors(tmp_path / "extract.safetensors", comfy_extract_state_dict(layers, d))
    before = snapshot(qwen)
    want = reference(qwen, {}, d, 0.5)  # the dense part only; the pairs are branches
    x = torch.randn(3, 32)
    to_k = qwen.get_submodule(f"{B0}.attn.to_k")
    a, b, _ = layers[f"{B0}.attn.to_k"]
    h = lora_core.apply(qwen, [(path, 0.5)], mode="lowrank")
    now = qwen.state_dict()
    for k, v in want.items():
        assert torch.allclose(now[k].double(), v, atol=1e-6, rtol=0), k
    assert set(h.branches) == set(LORA_ON)
    assert torch.equal(now[f"{B0}.attn.to_q.weight"], before[f"{B0}.attn.to_q.weight"])  # its LoRA is a branch
    y64 = x.double() @ want[f"{B0}.attn.to_k.weight"].T + before[f"{B0}.attn.to_k.bias"].double() \
        + 0.5 * (x.double() @ a.double().T @ b.double().T)
    assert torch.allclose(to_k(x).double(), y64, atol=1e-4)
    assert mode_label(h.updates, "lowrank") == "lowrank+merge" and mode_label(h.updates, "merge") == "merge"
    h.restore()
    assert_same(qwen, before)


def test_switch_between_diff_compositions_restores_bit_exact(qwen, tmp_path):
    index = ModelIndex(qwen)
    before = snapshot(qwen)
    p1 = T.write_safetensors(tmp_path / "a.safetensors", comfy_extract_state_dict(*fixture(qwen, seed=1)))
    p2 = T.write_safetensors(tmp_path / "b.safetensors", comfy_extract_state_dict(*fixture(qwen, seed=2)))
    plans = {p: lora_core.plan([(lora_core.load_adapter(p), 1.0)], index) for p in (p1, p2)}
    h = lora_core.switch(index, None, plans[p1], "merge")
    once = snapshot(qwen)
    h = lora_core.switch(index, h, plans[p2], "merge")
    h = lora_core.switch(index, h, plans[p1], "merge")
    assert_same(qwen, once)
    assert lora_core.switch(index, h, {}, "merge") is None
    assert_same(qwen, before)


def test_diff_b_on_a_module_without_bias_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    before = snapshot(model)
    path = T.write_safetensors(tmp_path / "nb.safetensors", {"diffusion_model.0.diff_b": torch.ones(8)})
    with pytest.raises(TargetNotFoundError, match=r"has no bias") as e:
        lora_core.apply(model, [(path, 1.0)])
    assert e.value.key == "diffusion_model.0.diff_b" and e.value.source == path
    assert_same(model, before)


def test_failed_composition_leaves_the_model_exactly_as_before(qwen, tmp_path):
    layers, d = fixture(qwen, dtype=torch.float32)
    d["proj_out"]["bias"] = torch.full((16,), 3e38)  # finite in the file, Inf once scaled and added
    path = T.write_safetensors(tmp_path / "inf.safetensors", comfy_extract_state_dict(layers, d, dtype=torch.float32))
    before = snapshot(qwen)
    with pytest.raises(NonFiniteError, match="proj_out.bias"):
        lora_core.apply(qwen, [(path, 2.0)], mode="merge")
    assert_same(qwen, before)


def test_unknown_diff_target_is_named_with_the_lora_ones(qwen, tmp_path):
    path = T.write_safetensors(tmp_path / "x.safetensors", {"diffusion_model.nope.norm.diff": torch.ones(4)})
    before = snapshot(qwen)
    with pytest.raises(TargetNotFoundError, match=r"nope\.norm \(full-weight diff"):
        lora_core.apply(qwen, [(path, 1.0)])
    assert_same(qwen, before)


def test_svdq_weight_diff_is_refused_by_key_but_its_bias_applies(tmp_path):
    model = T.nunchaku_qwen_standin(layers=1, modulation=False)
    before = snapshot(model)
    qkv = "transformer_blocks.0.attn.to_qkv"
    bad = {f"diffusion_model.{qkv}.diff": torch.zeros(192, 64), f"diffusion_model.{qkv}.diff_b": torch.ones(192)}
    with pytest.raises(UnsupportedFormatError, match=r"quantized.*to_qkv\.diff "):
        lora_core.apply(model, [(T.write_safetensors(tmp_path / "w.safetensors", bad), 1.0)])
    assert_same(model, before)
    # a bias diff on a component (to_q inside nunchaku's fused to_qkv) lands in its rows
    ok = T.write_safetensors(tmp_path / "b.safetensors", {"diffusion_model.transformer_blocks.0.attn.to_k.diff_b":
                                                          torch.full((64,), 0.25)})
    h = lora_core.apply(model, [(ok, 2.0)])
    bias = model.get_submodule(qkv).bias
    want = before[f"{qkv}.bias"].double().clone()
    want[64:128] += 0.5
    assert torch.allclose(bias.double(), want, atol=1e-2)
    h.restore()
    assert_same(model, before)


def test_split_keys_strips_containers():
    rest, found = diffs.split_keys(["lora_unet_a_b.diff", "diffusion_model.x.y.diff_b", "m.lora_up.weight"])
    assert rest == ["m.lora_up.weight"] and found == {"a_b": {"weight": "lora_unet_a_b.diff"},
                                                      "x.y": {"bias": "diffusion_model.x.y.diff_b"}}


def test_fp8_weight_diff_is_fused_into_the_master_then_quantized(tmp_path):
    from lora_core.targets.fp8 import quantize, quantize_modules

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8))
    quantize_modules(model, ["0", "1"])
    before, master0 = snapshot(model), model[0].master.clone()
    g = torch.Generator().manual_seed(4)
    dw, db = torch.randn(8, 16, generator=g) * 0.1, torch.randn(8, generator=g)
    lay = T.random_layers({"1": (8, 8)}, rank=2, seed=5)
    sd = comfy_extract_state_dict(lay, {"0": {"weight": dw, "bias": db}, "1": {"weight": dw[:, :8]}}, dtype=torch.float32)
    h = lora_core.apply(model, [(T.write_safetensors(tmp_path / "f.safetensors", sd), 0.5)])
    q, s = quantize(model[0].master.float() + dw * 0.5)
    assert torch.equal(model[0].qweight, q) and torch.equal(model[0].scale, s)
    assert torch.allclose(model[0].bias.double(), before["0.bias"].double() + 0.5 * db.double(), atol=1e-6)
    a, b, alpha = lay["1"]
    w64 = T.reference_merge(model[1].master, [(a, b, alpha, 0.5)]) + 0.5 * dw[:, :8].double()
    deq = (model[1].qweight.float() * model[1].scale).double()  # e4m3 keeps 3 mantissa bits
    assert ((deq - w64).abs() <= w64.abs() * 2 ** -3 + 1e-3).all()
    assert torch.equal(model[0].master, master0), "the master is never changed"
    h.restore()
    assert_same(model, before)


def test_full_diff_file_is_merged_in_every_mode(qwen, tmp_path):
    """LoraSave's ``full_diff`` type: every weight as ``.diff``, no pairs; the same weights in
    merge and low-rank mode (nothing can be a branch), restored bit-exactly."""
    g = torch.Generator().manual_seed(9)
    d = {n: {"weight": torch.randn(m.weight.shape, generator=g) * 0.01, "bias": torch.randn(m.bias.shape, generator=g) * 0.01}
         for n, m in qwen.named_modules() if n.startswith(B0) and isinstance(m, nn.Linear)}
    d = {n: {p: t.half() for p, t in ps.items()} for n, ps in d.items()}  # as the node stores them
    path = T.write_safetensors(tmp_path / "full.safetensors", comfy_extract_state_dict({}, d))
    adapter = lora_core.load_adapter(path)
    assert adapter.scheme == "diff" and not adapter.layers
    before = snapshot(qwen)
    want = reference(qwen, {}, d, -0.3)
    got = {}
    for mode in ("merge", "lowrank"):
        h = lora_core.apply(qwen, [(adapter, -0.3)], mode=mode)
        assert not h.branches and mode_label(h.updates, mode) == ("lowrank+merge" if mode == "lowrank" else "merge")
        got[mode] = snapshot(qwen)
        h.restore()
        assert_same(qwen, before)
    assert all(torch.equal(got["merge"][k], got["lowrank"][k]) for k in before)
    for k, v in want.items():
        assert torch.allclose(got["merge"][k].double(), v, atol=1e-6, rtol=0), k


def test_header_inspection_reads_an_extract_file(qwen, tmp_path):
    """``farm lora inspect`` / ``validate --deep`` read the header only: the diff keys are split
    off there too, not reported as unknown."""
    from lora_core.inspection import header_adapter

    path = T.write_safetensors(tmp_path / "extract.safetensors", comfy_extract_state_dict(*fixture(qwen)))
    assert set(header_adapter(path).layers) == set(LORA_ON)


def deinterleave(y: torch.Tensor) -> torch.Tensor:
    """nunchaku's Qwen-Image block reads its modulation output as ``view(B, -1, 6).transpose(1, 2)``."""
    return y.view(y.shape[0], -1, 6).transpose(1, 2).reshape(y.shape[0], -1)


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
def test_nunchaku_interleaved_modulation_bias_diff_lands_permuted(tmp_path, mode):
    """``img_mod.1.diff_b`` / ``txt_mod.1.diff_b`` in the diffusers order (shift1|scale1|gate1|...)
    on nunchaku's AWQ modulation, whose output row j*6+c is chunk c's element j: the bias gets
    the diff at those rows, so the block's de-interleaved output moves by exactly s * diff_b;
    old main: UnsupportedFormatError (interleaved)."""
    model = T.nunchaku_qwen_standin(layers=1)  # img_mod.1 / txt_mod.1 are AWQ, bias bf16, 6*64 outputs
    before = snapshot(model)
    g = torch.Generator().manual_seed(11)
    names = ("transformer_blocks.0.img_mod.1", "transformer_blocks.0.txt_mod.1")
    d = {n: (torch.randn(384, generator=g) * 0.5).half() for n in names}  # fp16, as LoraSave stores it
    path = T.write_safetensors(tmp_path / "m.safetensors", {f"diffusion_model.{n}.diff_b": t for n, t in d.items()})
    s, x = 0.75, torch.randn(3, 64).to(torch.bfloat16)
    mods = {n: model.get_submodule(n) for n in names}
    y0 = {n: deinterleave(m(x).double()) for n, m in mods.items()}
    h = lora_core.apply(model, [(path, s)], mode=mode)
    assert not h.branches
    for n, m in mods.items():
        dim = 64
        # independent of lora_core: row j*6+c of the stored bias <- diffusers row c*dim+j
        want = before[f"{n}.bias"].double().clone()
        for c in range(6):
            for j in range(dim):
                want[j * 6 + c] += s * d[n][c * dim + j].double()
        tol = want.abs() * 2 ** -8 + 1e-6  # one bf16 rounding of the sum
        assert ((m.bias.double() - want).abs() <= tol).all(), n
        in_file_order = before[f"{n}.bias"].double() + s * d[n].double()
        assert not ((m.bias.double() - in_file_order).abs() <= tol).all(), "the permutation is what is tested"
        # what the block sees: its chunks moved by s * diff_b, in the diffusers order
        assert torch.allclose(deinterleave(m(x).double()), y0[n] + s * d[n].double(), atol=1e-2, rtol=1e-2), n
    h.restore()
    assert_same(model, before)


def test_nunchaku_modulation_weight_diff_is_refused_by_key(tmp_path):
    """A ``.diff`` on the AWQ (packed 4-bit) modulation weight cannot be added: refused naming
    the key, the bias diff of the same file not applied either (nothing is touched)."""
    model = T.nunchaku_qwen_standin(layers=1)
    before = snapshot(model)
    key = "diffusion_model.transformer_blocks.0.img_mod.1.diff"
    path = T.write_safetensors(tmp_path / "w.safetensors", {
        key: torch.zeros(384, 64).half(), "diffusion_model.transformer_blocks.0.img_mod.1.diff_b": torch.ones(384).half()})
    with pytest.raises(UnsupportedFormatError, match=r"quantized.*img_mod\.1\.diff \(from ") as e:
        lora_core.apply(model, [(path, 1.0)])
    assert "diff_b" not in str(e.value)
    assert_same(model, before)
