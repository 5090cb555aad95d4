"""nunchaku-converted Qwen-Image LoRA files (``testsupport/nunchaku_converter.py`` writes them as the tool does).

What the tool means (``lora_core/formats/nunchaku_converted.py``): the file's branch replaces an SVDQ layer's
own, and the strength scales the ranks past the model's own rank (nunchaku's ``set_lora_strength``); an AWQ
modulation layer gets strength x the file's branch. Each case is checked against that in fp64, in merge and
low-rank mode, restored bit-exact, and against the original LoRA file applied by lora_core (the peer).
"""
from __future__ import annotations

import copy

import pytest
import torch

import lora_core
from lora_core.compose import plan
from lora_core.errors import CorruptFileError, NonFiniteError, ShapeMismatchError, UnsupportedFormatError
from lora_core.inspection import bind_report, header_adapter, summary
from lora_core.model_index import ModelIndex
from lora_core.nunchaku import pack_lowrank, unpack_lowrank
from testsupport import lora as T
from testsupport.nunchaku_converter import MODULATION, SVDQ, to_nunchaku

from .conftest import assert_same, snapshot

DIM, MLP, R, ALPHA = 32, 128, 8, 12.0  # the conftest ``qwen`` model's widths; alpha/rank 1.5
SHAPES = {"attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM), "attn.add_q_proj": (DIM, DIM),
          "attn.add_k_proj": (DIM, DIM), "attn.add_v_proj": (DIM, DIM), "attn.to_out.0": (DIM, DIM),
          "attn.to_add_out": (DIM, DIM), "img_mlp.net.0.proj": (DIM, MLP), "img_mlp.net.2": (MLP, DIM),
          "txt_mlp.net.0.proj": (DIM, MLP), "txt_mlp.net.2": (MLP, DIM), "img_mod.1": (DIM, 6 * DIM),
          "txt_mod.1": (DIM, 6 * DIM)}
# block 0: everything; block 1: q/k/v and the image modulation (its other SVDQ layers: base alone, with a base)
FULL = {**{f"transformer_blocks.0.{k}": v for k, v in SHAPES.items()},
        **{f"transformer_blocks.1.{k}": SHAPES[k] for k in ("attn.to_q", "attn.to_k", "attn.to_v", "img_mod.1")}}


def standin():
    return T.nunchaku_qwen_standin(DIM, MLP, layers=2)


def original(shapes=FULL, seed=3, rank=R, dtype=torch.bfloat16):
    return T.random_layers(shapes, rank=rank, seed=seed, alpha=ALPHA * rank / R, dtype=dtype)


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, m.in_features, generator=g) for n, m in model.named_modules()
            if type(m).__name__ in ("SVDQW4A4Linear", "AWQW4A16Linear")}


def outputs(model, xs):
    with torch.no_grad():
        return {n: model.get_submodule(n)(x).double() for n, x in xs.items()}


def tool_reference(model, sd, xs, s):
    """fp64: each layer with its branch replaced by the file's unpacked factors, the ranks past the
    layer's own scaled by ``s`` (SVDQ), or ``s`` x the file's branch added (AWQ); layers not in the file as they are."""
    out = {}
    for name, x in xs.items():
        m, x = model.get_submodule(name), x.double()
        y = x @ m.dense_ref.double().T + m.bias.double()
        down, up = sd.get(f"{name}.lora_down"), sd.get(f"{name}.lora_up")
        if hasattr(m, "proj_down"):
            r0 = m.proj_down.shape[1]
            if down is None:
                down, up = m.proj_down, m.proj_up
            d = unpack_lowrank(down, True)[:, : m.in_features].double()
            u = unpack_lowrank(up, False)[: m.out_features].double()
            y += (x @ d[:r0].T) @ u[:, :r0].T + s * (x @ d[r0:].T) @ u[:, r0:].T
        elif down is not None:  # modulation: unpacked, rows in nunchaku's order (the layer's own)
            y += s * (x @ down.double().T) @ up.double().T
        out[name] = y
    return out


def assert_close(got, want, before, rel):
    """Every layer within ``rel`` of the size of what the LoRA changed there (and at least one changed);
    the AWQ side path within 1e-2 (it multiplies in bf16)."""
    changed = 0
    for name in want:
        size = (want[name] - before[name]).abs().max().item()
        err = (got[name] - want[name]).abs().max().item()
        tol = max(rel, 1e-2) if name.endswith(MODULATION) else rel
        assert err <= tol * size + 1e-5, f"{name}: off by {err:.3g}, the LoRA moves it by {size:.3g}"
        changed += size > 1e-3
    assert changed


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_converted_against_the_model_lands_as_the_tool_means(tmp_path, mode, strength):
    model = standin()
    sd = to_nunchaku(original(), base=model)
    # as the converter writes it (q, k, v of rank 8 each: 24 ranks padded to 32, after the base 32): every SVDQ layer of each touched block, modulation only where trained
    assert set(sd) == {f"transformer_blocks.{b}.{leaf}.lora_{r}" for b in (0, 1) for leaf in SVDQ for r in ("down", "up")} \
        | {f"transformer_blocks.0.{m}.lora_{r}" for m in MODULATION for r in ("down", "up")} \
        | {f"transformer_blocks.1.img_mod.1.lora_{r}" for r in ("down", "up")}
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    path = T.write_safetensors(tmp_path / "converted.safetensors", sd)
    xs, snap = inputs(model), snapshot(model)
    before = outputs(model, xs)
    want = tool_reference(model, sd, xs, strength)
    h = lora_core.apply(model, [(path, strength)], mode=mode)
    # the layers the LoRA does not touch (their file branch is the base alone) are left alone
    assert "transformer_blocks.1.img_mlp.net.2" not in h.modules and "transformer_blocks.1.attn.to_qkv" in h.modules
    got = outputs(model, xs)
    assert_close(got, want, before, rel=1e-5 if strength == 1.0 else 1e-2)
    assert torch.equal(got["transformer_blocks.1.txt_mlp.net.0.proj"], before["transformer_blocks.1.txt_mlp.net.0.proj"])
    h.restore()
    assert_same(model, snap)


def test_converted_file_and_its_original_agree(tmp_path):
    """The peer: the original LoRA file, packed by lora_core itself, renders the same layers."""
    layers = original()
    ours, theirs = standin(), standin()
    converted = T.write_safetensors(tmp_path / "converted.safetensors", to_nunchaku(layers, base=theirs))
    orig = T.write_safetensors(tmp_path / "orig.safetensors", T.peft_state_dict(layers))
    xs = inputs(ours)
    before = outputs(ours, xs)
    lora_core.apply(ours, [(orig, 0.8)])
    lora_core.apply(theirs, [(converted, 0.8)])
    # the converter folds alpha/rank into the bf16 down (one rounding lora_core does not make)
    assert_close(outputs(theirs, xs), outputs(ours, xs), before, rel=2e-2)


def test_converted_against_another_checkpoint_is_refused_by_key(tmp_path):
    model = standin()
    other = copy.deepcopy(model)
    own = other.transformer_blocks[0].attn.to_out[0]
    own.proj_up.data[0, 0] += 1  # one value of one layer's own branch differs (its up: the up is named)
    path = T.write_safetensors(tmp_path / "elsewhere.safetensors", to_nunchaku(original(), base=other))
    snap = snapshot(model)
    with pytest.raises(UnsupportedFormatError, match=r"nunchaku-converted LoRA \(key 'transformer_blocks\.0\.attn\."
                       r"to_out\.0\.lora_up'\): its first 32 ranks are not this layer's own low-rank branch: this "
                       r"file was not converted against this checkpoint") as e:
        lora_core.apply(model, [(path, 1.0)])
    assert "elsewhere.safetensors" in str(e.value)
    assert_same(model, snap)
    # a checkpoint of another rank: converted against an r32 one (ranks 32..127), loaded on an r128 model. Refused
    # by its shapes: it may as well be an r32 file as a base-free one (nothing tells them apart)
    wide = T.nunchaku_qwen_standin(DIM, MLP, layers=2, rank=128)
    path = T.write_safetensors(tmp_path / "r32.safetensors", to_nunchaku(original(), base=model))
    with pytest.raises(UnsupportedFormatError, match=r"key 'transformer_blocks\.0\.attn\.add_qkv_proj\.lora_down'\): "
                       r"its branch \(rank 64, 32 in, 96 out, padded\) cannot begin with this layer's own \(rank 128"
                       r".*against another one \(nunchaku's have r32 and r128\), or without a base"):
        lora_core.apply(wide, [(path, 1.0)])


def test_the_factor_that_disagrees_is_named(tmp_path):
    """The base's down equal and its up not: the up named; non-zero padding on either side: that side named."""
    model = standin()
    other = copy.deepcopy(model)
    other.transformer_blocks[0].attn.to_out[0].proj_down.data[0, 0] += 1
    path = T.write_safetensors(tmp_path / "down.safetensors", to_nunchaku(original(), base=other))
    with pytest.raises(UnsupportedFormatError, match=r"key 'transformer_blocks\.0\.attn\.to_out\.0\.lora_down'\): "
                       "its first 32 ranks are not this layer's own"):
        lora_core.apply(model, [(path, 1.0)])
    key = "transformer_blocks.0.attn.to_out.0"
    for role, down in (("down", True), ("up", False)):
        sd = to_nunchaku(original(BASE_FREE), base=None)
        t = unpack_lowrank(sd[f"{key}.lora_{role}"], down)  # (16, 32) / (32, 16)
        junk = torch.full((16, 16), 0.5, dtype=t.dtype)
        sd[f"{key}.lora_{role}"] = pack_lowrank(torch.cat([t, junk], 1 if down else 0), down)  # 48 in / out
        path = T.write_safetensors(tmp_path / f"pad-{role}.safetensors", sd)
        with pytest.raises(ShapeMismatchError, match="48 wide where the model's module has 32, and the rest is not "
                           "zero padding") as e:
            lora_core.apply(model, [(path, 1.0)])
        assert e.value.key == f"{key}.lora_{role}"
    sd = to_nunchaku(original(BASE_FREE), base=None)
    sd[f"{key}.lora_up"] = pack_lowrank(torch.ones(DIM, 32, dtype=torch.bfloat16), False)  # rank 32, its down 16
    path = T.write_safetensors(tmp_path / "ranks.safetensors", sd)
    with pytest.raises(ShapeMismatchError, match="lora_down has rank 16 but its lora_up") as e:
        lora_core.load_adapter(path)
    assert f"{key}.lora_down" in str(e.value) and f"{key}.lora_up" in str(e.value)


@pytest.mark.parametrize("dtype, error", [(torch.int8, CorruptFileError), (torch.float8_e4m3fn, UnsupportedFormatError)])
def test_a_factor_of_another_dtype_is_named_by_key(tmp_path, dtype, error):
    """As any LoRA's factor: non-float is a corrupt file; 8-bit floats no converter writes (its packer takes
    bf16/fp16), refused on load and on a header-only read alike."""
    key = "transformer_blocks.0.attn.to_out.0.lora_down"
    sd = to_nunchaku(original(BASE_FREE), base=None)
    sd[key] = sd[key].to(dtype)
    path = T.write_safetensors(tmp_path / "odd.safetensors", sd)
    for load in (lora_core.load_adapter, header_adapter):
        with pytest.raises(error) as e:
            load(path)
        assert key in str(e.value) and "odd.safetensors" in str(e.value)


def test_an_fp8_original_loads_and_lands(tmp_path, qwen):
    """The converter's peer, an ordinary LoRA in fp8 (torch has no isfinite for it): loads, lands as
    fp64 W + s·(alpha/r)·B@A of its fp8 values, and a NaN in it is named by key."""
    layers = original({"transformer_blocks.0.attn.to_out.0": (DIM, DIM)}, dtype=torch.float8_e4m3fn)
    sd = T.peft_state_dict(layers)
    path = T.write_safetensors(tmp_path / "fp8.safetensors", sd)
    m = qwen.transformer_blocks[0].attn.to_out[0]
    x = torch.randn(3, DIM)
    with torch.no_grad():
        before = m(x).double()
    a, b, _ = layers["transformer_blocks.0.attn.to_out.0"]
    want = before + 0.7 * (ALPHA / R) * (x.double() @ a.double().T) @ b.double().T
    h = lora_core.apply(qwen, [(path, 0.7)])
    with torch.no_grad():
        err = (m(x).double() - want).abs().max().item()
    assert err <= 1e-5 * (want - before).abs().max().item() + 1e-6
    h.restore()
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = sd[key].clone()
    sd[key].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    path = T.write_safetensors(tmp_path / "fp8-nan.safetensors", sd)
    with pytest.raises(NonFiniteError) as e:
        lora_core.load_adapter(path)
    assert e.value.key == key


BASE_FREE = {k: v for k, v in FULL.items() if "mlp" not in k}  # no block has all eight SVDQ layers
BLOCK0 = {k: v for k, v in FULL.items() if k.startswith("transformer_blocks.0.")}  # all 14 layers of block 0
# proven base-free: a block without all eight SVDQ layers, or (full coverage) an SVDQ layer of rank 16 < 32
NO_BASE = {"partial": (BASE_FREE, R), "full-r16": (BLOCK0, 16)}


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
@pytest.mark.parametrize("which", sorted(NO_BASE))
def test_converted_without_a_base_is_an_ordinary_lora_on_svdq(tmp_path, mode, which):
    model = standin()
    shapes, rank = NO_BASE[which]
    sd = to_nunchaku(original(shapes, rank=rank), base=None)
    assert ("transformer_blocks.0.img_mlp.net.2.lora_down" in sd) == (which == "full-r16")  # the LoRA's layers only
    path = T.write_safetensors(tmp_path / "nobase.safetensors", sd)
    assert summary(path)["base_part"] is False
    xs, snap = inputs(model), snapshot(model)
    before = outputs(model, xs)
    want = {}
    for name, x in xs.items():  # the layer's own branch kept, the file's added at the strength
        m, down = model.get_submodule(name), sd.get(f"{name}.lora_down")
        if down is None:
            want[name] = before[name]
            continue
        up = sd[f"{name}.lora_up"]
        if hasattr(m, "proj_down"):
            down, up = unpack_lowrank(down, True), unpack_lowrank(up, False)
        want[name] = before[name] + 0.7 * (x.double() @ down.double().T) @ up.double().T
    h = lora_core.apply(model, [(path, 0.7)], mode=mode)
    assert_close(outputs(model, xs), want, before, rel=1e-2)
    h.restore()
    assert_same(model, snap)


@pytest.mark.parametrize("mode", ["merge", "lowrank"])
@pytest.mark.parametrize("which", sorted(NO_BASE))
def test_converted_without_a_base_on_a_dense_model(tmp_path, qwen, mode, which):
    """Its unpacked factors are the LoRA: the same update as the original file (q/k/v split by rows,
    the modulation rows back in diffusers' order), checked against fp64 W + s·(alpha/r)·B@A."""
    shapes, rank = NO_BASE[which]
    layers = original(shapes, rank=rank)
    path = T.write_safetensors(tmp_path / "nobase.safetensors", to_nunchaku(layers, base=None))
    mods = dict(qwen.named_modules())
    x = {n: torch.randn(3, mods[n].in_features) for n in layers}
    snap = snapshot(qwen)
    with torch.no_grad():
        before = {n: mods[n](x[n]).double() for n in layers}
    want = {n: before[n] + 0.7 * (ALPHA / R) * (x[n].double() @ a.double().T) @ b.double().T
            for n, (a, b, _) in layers.items()}
    h = lora_core.apply(qwen, [(path, 0.7)], mode=mode)
    with torch.no_grad():
        got = {n: mods[n](x[n]).double() for n in layers}
    assert_close(got, want, before, rel=2e-2)  # the converter's bf16 alpha fold
    h.restore()
    assert_same(qwen, snap)


def test_a_base_free_file_of_rank_32_or_more_everywhere_is_ambiguous(tmp_path, qwen):
    """Rank 64 on all 14 layers of its block, converted without a base: every SVDQ layer has >= 32 ranks
    and its block all eight, as a file converted against an r32 checkpoint. Refused on a dense model
    (nothing to check the leading ranks against) and on the SVDQ model (they are not its own), by key."""
    path = T.write_safetensors(tmp_path / "r64.safetensors", to_nunchaku(original(BLOCK0, rank=64), base=None))
    assert summary(path)["base_part"] is True
    snap = snapshot(qwen)
    with pytest.raises(UnsupportedFormatError, match=r"key 'transformer_blocks\.0\.attn\.add_qkv_proj\.lora_down'\): "
                       r"every block this file touches has all eight of nunchaku's SVDQ layers, none with fewer than 32 "
                       r"ranks.*a file converted without a base from a LoRA that trains all eight SVDQ layers of every "
                       r"block it touches with rank >= 32 reads the same"):
        lora_core.apply(qwen, [(path, 1.0)])
    assert_same(qwen, snap)
    model = standin()
    snap = snapshot(model)
    with pytest.raises(UnsupportedFormatError, match=r"key 'transformer_blocks\.0\.attn\.add_qkv_proj\.lora_down'\): "
                       r"its first 32 ranks are not this layer's own low-rank branch: .*or without a base"):
        lora_core.apply(model, [(path, 1.0)])
    assert_same(model, snap)


def test_converted_with_a_base_is_refused_on_a_dense_model(tmp_path, qwen):
    path = T.write_safetensors(tmp_path / "withbase.safetensors", to_nunchaku(original(), base=standin()))
    snap = snapshot(qwen)
    with pytest.raises(UnsupportedFormatError, match=r"nunchaku-converted LoRA \(key 'transformer_blocks\.0\.attn\."
                       r"add_qkv_proj\.lora_down'\): every block this file touches has all eight of nunchaku's SVDQ "
                       r"layers.*load it on the nunchaku model it was converted against, or use the original LoRA"):
        lora_core.apply(qwen, [(path, 1.0)])
    assert_same(qwen, snap)


def test_header_only_bind_and_inspect(tmp_path, qwen):
    """``farm lora inspect`` / ``validate --deep`` read the header only: the layout and the unpacked
    shapes; on the SVDQ model the base ranks are dropped by shape, on a dense one such a file is refused."""
    model = standin()
    path = T.write_safetensors(tmp_path / "withbase.safetensors", to_nunchaku(original(), base=model))
    info = summary(path)
    assert info["layout"] == "nunchaku-converted"
    assert info["targets"]["transformer_blocks.0.attn.to_qkv"] == {"rank": 32 + 32, "alpha": 64.0, "in": DIM, "out": 3 * DIM}
    assert info["targets"]["transformer_blocks.1.img_mlp.net.2"]["rank"] == 32  # the base alone
    assert info["targets"]["transformer_blocks.0.img_mod.1"] == {"rank": 16, "alpha": 16.0, "in": DIM, "out": 6 * DIM}
    adapter = header_adapter(path)
    real = plan([(lora_core.load_adapter(path), 1.0)], ModelIndex(model))
    assert sorted(plan([(adapter, 1.0)], ModelIndex(model))) == sorted(real)
    assert "transformer_blocks.1.img_mlp.net.2" not in real and len(real) == 8 + 2 + 2
    report = bind_report(adapter, ModelIndex(qwen))
    assert sorted(report["bound"]) == sorted(f"transformer_blocks.{b}.{m}" for b, m in
                                             (("0", "img_mod.1"), ("0", "txt_mod.1"), ("1", "img_mod.1")))
    assert all("every block this file touches" in why for why in report["refused"].values())
    assert len(report["refused"]) == 16
