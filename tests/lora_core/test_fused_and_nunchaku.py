"""Fused targets, nunchaku SVDQ concatenation and AWQ side path, BFL Flux and Z-Image names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_core
from testsupport import lora as T
from lora_core.model_index import ModelIndex
from lora_core.nunchaku import reorder_modulation_rows

from .conftest import assert_same, snapshot

DIM, MLP = 64, 128


def delta(layers, name, s):
    a, b, alpha = layers[name]
    return s * (alpha / a.shape[0]) * (b.double() @ a.double())


def qkv_layers(prefix, rank, seed, alpha):
    comps = {f"{prefix}.{c}": (DIM, DIM) for c in ("to_q", "to_k", "to_v")}
    return T.random_layers(comps, rank=rank, seed=seed, alpha=alpha)


def test_separate_qkv_fused_into_svdq_branch(tmp_path):
    model = T.nunchaku_qwen_standin(DIM, MLP)
    mod = model.transformer_blocks[0].attn.to_qkv
    x = torch.randn(2, 5, DIM).to(torch.bfloat16)
    base = mod(x).double()
    # each component has its own alpha/rank: q,k,v scaled separately (never alpha/3r)
    layers = {}
    for i, c in enumerate(("to_q", "to_k", "to_v")):
        layers.update(T.random_layers({f"transformer_blocks.0.attn.{c}": (DIM, DIM)}, rank=4, seed=10 + i, alpha=1.0 + i))
    path = T.write_safetensors(tmp_path / "qkv.safetensors", T.peft_state_dict(layers))
    snap = snapshot(model)
    old_rank = mod.rank
    h = lora_core.apply(model, [(path, 0.8)])
    assert mod.rank == T.round_up(old_rank + 12)
    dw = torch.cat([delta(layers, f"transformer_blocks.0.attn.{c}", 0.8) for c in ("to_q", "to_k", "to_v")], 0)
    want = base + x.double() @ dw.T
    got = mod(x).double()
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2)
    assert (got - base).abs().max() > 1e-3, "the LoRA must change the output"
    h.restore()
    assert mod.rank == old_rank
    assert_same(model, snap)
    assert torch.equal(mod(x), base.to(torch.bfloat16))


def test_already_fused_qkv_file_on_fused_and_on_dense_model(qwen, tmp_path):
    """A file with to_qkv keys: lands as-is on nunchaku, is split per component on diffusers."""
    inner = qwen.transformer_blocks[0].attn.to_q.out_features
    fused = T.random_layers({"transformer_blocks.0.attn.to_qkv": (inner, 3 * inner)}, rank=4, seed=3, alpha=2.0)
    path = T.write_safetensors(tmp_path / "fused.safetensors", T.peft_state_dict(fused))
    a, b, alpha = fused["transformer_blocks.0.attn.to_qkv"]
    mods = dict(qwen.named_modules())
    snap = snapshot(qwen)
    lora_core.apply(qwen, [(path, 1.0)])
    for i, c in enumerate(("to_q", "to_k", "to_v")):
        w = mods[f"transformer_blocks.0.attn.{c}"].weight
        want = snap[f"transformer_blocks.0.attn.{c}.weight"].double() + (alpha / 4) * (b[i * inner:(i + 1) * inner].double() @ a.double())
        assert torch.allclose(w.double(), want, atol=1e-6), c


def test_awq_modulation_side_path_reordered():
    model = T.nunchaku_qwen_standin(DIM, MLP)
    mod = model.transformer_blocks[0].img_mod[1]
    layers = T.random_layers({"transformer_blocks.0.img_mod.1": (DIM, 6 * DIM)}, rank=4, seed=5)
    x = torch.randn(3, DIM).to(torch.bfloat16)
    base = mod(x).double()
    snap = snapshot(model)
    h = lora_core.apply(model, [(T.peft_state_dict(layers), 1.0)])
    dw = reorder_modulation_rows(delta(layers, "transformer_blocks.0.img_mod.1", 1.0))
    assert torch.allclose(mod(x).double(), base + x.double() @ dw.T, atol=2e-2, rtol=2e-2)
    h.restore()
    assert_same(model, snap)


def test_dense_modulation_is_a_plain_delta(qwen):
    name = "transformer_blocks.0.img_mod.1"
    mods = dict(qwen.named_modules())
    layers = T.random_layers({name: (mods[name].in_features, mods[name].out_features)}, rank=2, seed=6)
    w0 = mods[name].weight.detach().clone()
    lora_core.apply(qwen, [(T.peft_state_dict(layers), 1.0)])
    assert torch.allclose(mods[name].weight.double(), w0.double() + delta(layers, name, 1.0), atol=1e-6)


def test_svdq_mlp_and_kohya_names(tmp_path):
    model = T.nunchaku_qwen_standin(DIM, MLP)
    layers = T.random_layers({"transformer_blocks.0.img_mlp.net.0.proj": (DIM, MLP),
                              "transformer_blocks.0.img_mlp.net.2": (MLP, DIM),
                              "transformer_blocks.0.attn.add_k_proj": (DIM, DIM)}, rank=8, seed=7, alpha=4)
    path = T.write_safetensors(tmp_path / "k.safetensors", T.kohya_state_dict(layers, prefix="lora_unet_"))
    up = model.transformer_blocks[0].img_mlp.net[2]
    x = torch.randn(4, MLP).to(torch.bfloat16)
    base = up(x).double()
    snap = snapshot(model)
    h = lora_core.apply(model, [(path, 0.5)])
    want = base + x.double() @ delta(layers, "transformer_blocks.0.img_mlp.net.2", 0.5).T
    assert torch.allclose(up(x).double(), want, atol=2e-2, rtol=2e-2)
    assert set(h.modules) == {"transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.2",
                              "transformer_blocks.0.attn.add_qkv_proj"}
    h.restore()
    assert_same(model, snap)


def test_svdq_restore_then_reapply_is_bit_identical(tmp_path):
    model = T.nunchaku_qwen_standin(DIM, MLP)
    layers = qkv_layers("transformer_blocks.0.attn", 4, 8, 4.0)
    sd = T.peft_state_dict(layers)
    h = lora_core.apply(model, [(sd, 1.0)])
    first = snapshot(model)
    h.restore()
    lora_core.apply(model, [(sd, 1.0)])
    for k, v in snapshot(model).items():
        assert torch.equal(v, first[k]), k


class ZImageBlock(nn.Module):
    def __init__(self, dim=32, hidden=48):
        super().__init__()
        self.feed_forward = nn.Module()
        self.feed_forward.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # w3 (value) first, then w1 (gate)
        self.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)


def test_zimage_w13_holds_w3_first():
    model = nn.Module()
    model.layers = nn.ModuleList([ZImageBlock()])
    layers = T.random_layers({"layers.0.feed_forward.w1": (32, 48), "layers.0.feed_forward.w3": (32, 48)}, rank=2, seed=9)
    w0 = model.layers[0].feed_forward.w13.weight.detach().clone().double()
    lora_core.apply(model, [(T.peft_state_dict(layers, prefix="diffusion_model."), 1.0)])
    want = w0 + torch.cat([delta(layers, "layers.0.feed_forward.w3", 1), delta(layers, "layers.0.feed_forward.w1", 1)], 0)
    assert torch.allclose(model.layers[0].feed_forward.w13.weight.double(), want, atol=1e-6)


def flux_like(dim=32, mlp=64, split=False):
    m = nn.Module()
    m.transformer_blocks = nn.ModuleList([nn.Module()])
    b = m.transformer_blocks[0]
    b.attn = nn.Module()
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        setattr(b.attn, n, nn.Linear(dim, dim))
    b.attn.to_out = nn.ModuleList([nn.Linear(dim, dim)])
    m.single_transformer_blocks = nn.ModuleList([nn.Module()])
    s = m.single_transformer_blocks[0]
    s.attn = nn.Module()
    for n in ("to_q", "to_k", "to_v"):
        setattr(s.attn, n, nn.Linear(dim, dim))
    s.proj_mlp = nn.Linear(dim, mlp)
    if split:
        s.proj_out = nn.Module()
        s.proj_out.linears = nn.ModuleList([nn.Linear(dim, dim, bias=False), nn.Linear(mlp, dim)])
    else:
        s.proj_out = nn.Linear(dim + mlp, dim)
    m.proj_out = nn.Linear(dim, 8)
    return m


def test_bfl_flux_names_split_by_model_widths():
    model = flux_like()
    layers = T.random_layers({"double_blocks.0.img_attn.qkv": (32, 96), "double_blocks.0.txt_attn.proj": (32, 32),
                              "single_blocks.0.linear1": (32, 32 * 3 + 64), "single_blocks.0.linear2": (96, 32),
                              "final_layer.linear": (32, 8)}, rank=4, seed=11)
    snap = snapshot(model)
    h = lora_core.apply(model, [(T.kohya_state_dict(layers, prefix="lora_unet_"), 1.0)])
    a, b, alpha = layers["single_blocks.0.linear1"]
    s = model.single_transformer_blocks[0]
    got_mlp = s.proj_mlp.weight.double() - snap["single_transformer_blocks.0.proj_mlp.weight"].double()
    assert torch.allclose(got_mlp, (alpha / 4) * b[96:].double() @ a.double(), atol=1e-6)
    assert len(h.modules) == 3 + 1 + 4 + 1 + 1
    h.restore()
    assert_same(model, snap)


def test_flux_single_proj_out_split_by_input_columns():
    dense, split = flux_like(), flux_like(split=True)
    layers = T.random_layers({"single_transformer_blocks.0.proj_out": (96, 32)}, rank=4, seed=12)
    a, b, alpha = layers["single_transformer_blocks.0.proj_out"]
    lin = split.single_transformer_blocks[0].proj_out.linears
    w0 = [lin[0].weight.detach().double().clone(), lin[1].weight.detach().double().clone()]
    lora_core.apply(split, [(T.peft_state_dict(layers), 1.0)])
    full = (alpha / 4) * b.double() @ a.double()
    assert torch.allclose(lin[0].weight.double(), w0[0] + full[:, :32], atol=1e-6)
    assert torch.allclose(lin[1].weight.double(), w0[1] + full[:, 32:], atol=1e-6)


def test_index_knows_structure():
    idx = ModelIndex(T.nunchaku_qwen_standin(DIM, MLP))
    assert idx.nunchaku_layout
    assert idx.slots["transformer_blocks.0.attn.to_k"].offset == DIM
    assert idx.kinds["transformer_blocks.0.img_mod.1"] == "awq"
    assert idx.interleaved("transformer_blocks.0.txt_mod.1")


def test_svdq_prepared_while_another_composition_is_held_then_swapped_in(tmp_path):
    """``prepare`` packs Y against the base even while X is applied; landing it is a swap of
    the prepared tensors, bit-identical to applying Y on a fresh base; a NaN is caught in
    ``prepare``, before anything is touched."""
    model = T.nunchaku_qwen_standin(DIM, MLP)
    index = ModelIndex(model)
    base = snapshot(model)
    ax = lora_core.load_adapter(T.peft_state_dict(qkv_layers("transformer_blocks.0.attn", 4, 8, 4.0)))
    ay = lora_core.load_adapter(T.peft_state_dict(qkv_layers("transformer_blocks.0.attn", 8, 9, 2.0)))
    h = lora_core.apply(model, [(ay, 0.7)])
    want_y = snapshot(model)
    h.restore()
    hx = lora_core.switch(index, None, lora_core.prepare(index, lora_core.plan([(ax, 0.8)], index), "merge"), "merge")
    at_x = snapshot(model)
    uy = lora_core.prepare(index, lora_core.plan([(ay, 0.7)], index), "merge")
    assert_same(model, at_x)  # preparing touched nothing
    packed = uy["transformer_blocks.0.attn.to_qkv"].packed
    hy = lora_core.switch(index, hx, uy, "merge")
    mod = model.transformer_blocks[0].attn.to_qkv
    assert mod.proj_down.data_ptr() == packed.down.data_ptr(), "the prepared branch itself, no copy"
    assert_same(model, want_y)
    bad = lora_core.plan([(ax, 0.8)], index)
    u = bad["transformer_blocks.0.attn.to_qkv"]
    bad[u.module] = lora_core.ModuleUpdate(u.module, u.kind, u.A, u.B * float("nan"))
    with pytest.raises(lora_core.errors.NonFiniteError):
        lora_core.prepare(index, bad, "merge")
    assert_same(model, want_y)
    lora_core.switch(index, hy, {}, "merge")
    assert_same(model, base)


def test_bfl_fused_qkv_onto_a_fused_svdq_module_costs_rank_r_not_3r():
    """A BFL ``img_attn.qkv`` layer (one A, B over q|k|v) onto nunchaku's fused ``to_qkv``:
    one term of the file's rank, not three copies of A; the output is base + the LoRA."""
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Module()])
    attn = model.transformer_blocks[0].attn = nn.Module()
    attn.to_qkv = T.SVDQW4A4Linear(DIM, 3 * DIM, rank=32, torch_dtype=torch.float32, seed=3)
    layers = T.random_layers({"double_blocks.0.img_attn.qkv": (DIM, 3 * DIM)}, rank=8, seed=4, alpha=4.0)
    x = torch.randn(2, 5, DIM)
    base = attn.to_qkv(x).double()
    snap = snapshot(model)
    h = lora_core.apply(model, [(T.kohya_state_dict(layers, prefix="lora_unet_"), 0.7)])
    assert attn.to_qkv.rank == 32 + 16, "rank 8 padded to 16, once"
    a, b, alpha = layers["double_blocks.0.img_attn.qkv"]
    want = base + x.double() @ (0.7 * (alpha / 8) * b.double() @ a.double()).T
    assert torch.allclose(attn.to_qkv(x).double(), want, atol=1e-4, rtol=1e-4)
    h.restore()
    assert_same(model, snap)


def test_svdq_prepared_branch_is_refused_when_the_base_changed():
    """A prepared update keeps only its packed branch (no factors beside it). Offered to a
    module whose base was edited in place since (new weights loaded into the same
    parameters), it is refused with a clear error and the model is left as it was;
    ``still_fits`` says so beforehand, and preparing again lands the LoRA on the new base.
    ``apply`` (plan, then land) always builds on what the module holds."""
    model = T.nunchaku_qwen_standin(DIM, MLP)
    index = ModelIndex(model)
    ad = lora_core.load_adapter(T.peft_state_dict(qkv_layers("transformer_blocks.0.attn", 4, 8, 4.0)))
    stale = lora_core.prepare(index, lora_core.plan([(ad, 0.7)], index), "merge")
    assert all(u.A is None and u.B is None and u.packed is not None for u in stale.values())
    assert lora_core.still_fits(index, stale)
    mod = model.transformer_blocks[0].attn.to_qkv
    with torch.no_grad():
        mod.proj_down.mul_(0.5)  # in place: same Parameter, new version
    assert not lora_core.still_fits(index, stale)
    before = snapshot(model)
    with pytest.raises(lora_core.errors.StaleBranchError, match="to_qkv.*prepare it again"):
        lora_core.switch(index, None, stale, "merge")
    assert_same(model, before)
    assert "_lora_farm_base" not in mod.__dict__
    again = lora_core.prepare(index, lora_core.plan([(ad, 0.7)], index), "merge")
    h = lora_core.switch(index, None, again, "merge")
    got = snapshot(model)
    h.restore()
    fresh = lora_core.apply(model, [(ad, 0.7)])
    for k, v in snapshot(model).items():
        assert torch.equal(v, got[k]), k
    fresh.restore()
    assert_same(model, before)
    mod.proj_down = nn.Parameter(mod.proj_down.detach() * 2, requires_grad=False)  # replaced while at base
    new_base = mod.proj_down
    assert not lora_core.still_fits(index, again)
    h = lora_core.apply(model, [(ad, 0.7)])
    composed = lora_core.nunchaku.unpack_lowrank(mod.proj_down.data, down=True)
    assert torch.equal(composed[:32], lora_core.nunchaku.unpack_lowrank(new_base.data, down=True)[:32])
    h.restore()
    assert mod.proj_down is new_base and "_lora_farm_base" not in mod.__dict__


def test_two_applies_stack_on_svdq_like_on_dense(tmp_path):
    """``apply`` X, then ``apply`` Y without restoring: the SVDQ branch holds both (as a dense
    merge would), equal in output to X and Y applied together; restoring Y then X is exact."""
    model = T.nunchaku_qwen_standin(DIM, MLP)
    mod = model.transformer_blocks[0].attn.to_qkv
    x = torch.randn(2, 5, DIM).to(torch.bfloat16)
    sx = T.peft_state_dict(qkv_layers("transformer_blocks.0.attn", 4, 8, 4.0))
    sy = T.peft_state_dict(qkv_layers("transformer_blocks.0.attn", 4, 9, 2.0))
    snap = snapshot(model)
    both = lora_core.apply(model, [(sx, 0.8), (sy, 0.5)])
    want = mod(x).double()
    both.restore()
    hx = lora_core.apply(model, [(sx, 0.8)])
    only_x = mod(x).double()
    hy = lora_core.apply(model, [(sy, 0.5)])
    got = mod(x).double()
    assert (got - only_x).abs().max() > 1e-3, "Y is on top of X, not instead of it"
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2)
    hy.restore()
    assert torch.equal(mod(x).double(), only_x)
    hx.restore()
    assert_same(model, snap)


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("model_name", ["qwen bf16", "qwen fp16", "flux split fp16", "nunchaku"])
def test_branch_factors_planned_in_the_module_dtype_equal_fp32_then_cast(qwen, model_name, lora_dtype):
    """``plan(..., branch_targets(index, "lowrank"))`` builds runtime-branch factors straight in
    the module's dtype: bit for bit what the fp32 plan gives cast afterwards, for plain
    layers, a fused qkv file split over q/k/v, a file's columns split over two modules, the
    AWQ modulation rows reordered, and several adapters at several strengths. SVDQ
    factors are built in their packed branch's dtype too (they are cast to it to be packed);
    merged modules stay fp32."""
    import copy

    from lora_core.adapter import load_adapter

    if model_name.startswith("qwen"):
        model = copy.deepcopy(qwen).to(torch.bfloat16 if "bf16" in model_name else torch.float16)
        inner = model.transformer_blocks[0].attn.to_q.out_features
        shapes = T.linear_shapes(model, ("transformer_blocks.0.attn.to_out", "img_mlp", "img_mod"))
        extra = {"transformer_blocks.0.attn.to_qkv": (inner, 3 * inner)}  # fused file onto split q, k, v
    elif model_name.startswith("flux"):
        model = flux_like(split=True).to(torch.float16)
        shapes = {"double_blocks.0.img_attn.qkv": (32, 96), "single_blocks.0.linear2": (96, 32)}  # proj_out by columns
        extra = {}
    else:
        model = T.nunchaku_qwen_standin(DIM, MLP)  # AWQ modulation: a branch; SVDQ: fp32 plan
        shapes = {"transformer_blocks.0.img_mod.1": (DIM, 6 * DIM), "transformer_blocks.0.attn.to_q": (DIM, DIM),
                  "transformer_blocks.0.attn.to_k": (DIM, DIM), "transformer_blocks.0.attn.to_v": (DIM, DIM)}
        extra = {}
    pairs = []
    for seed, strength in ((1, 0.8), (2, -0.55), (3, 1.7)):
        layers = T.random_layers({**shapes, **extra}, rank=3 + seed, seed=seed, alpha=2.5 * seed, scale=0.3)
        sd = {k: v.to(lora_dtype) for k, v in T.peft_state_dict(layers, prefix="").items()}
        pairs.append((load_adapter(sd), strength))
    index = ModelIndex(model)
    where = lora_core.branch_targets(index, "lowrank")
    got, ref = lora_core.plan(pairs, index, where), lora_core.plan(pairs, index)
    assert got.keys() == ref.keys() and len(got) >= 2
    branches = 0
    for name, u in got.items():
        to = where(name)
        dtype, device = to if to is not None else (torch.float32, torch.device("cpu"))
        for mine, theirs in ((u.A, ref[name].A), (u.B, ref[name].B)):
            assert mine.dtype == dtype and mine.device == device, name
            assert torch.equal(mine, theirs.to(dtype)), name
        branches += to is not None and dtype != torch.float32
    assert branches >= 1
    if model_name == "nunchaku":
        assert where("transformer_blocks.0.attn.to_qkv") == (torch.bfloat16, torch.device("cpu"))
        assert where("transformer_blocks.0.img_mod.1") == (torch.bfloat16, torch.device("cpu"))
